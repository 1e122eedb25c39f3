"""Soft eviction: equal to the hard engine at hard gates and at T -> 0, on the test bed and a tiny random Llama with
GQA; gradients reach the scorer and not the backbone; the schedule is the engine's."""

from __future__ import annotations

import math

import pytest
import torch

from kvzap_lab import tasks
from kvzap_lab.engine import evicting
from kvzap_lab.model import describe, load_model, random_tiny_model
from kvzap_lab.policies.gbdt import GBDTScorer
from kvzap_lab.policies.kvzap_linear import KVzapLinear
from kvzap_lab.policies.kvzap_mlp import KVzapMLP
from kvzap_lab.policy import Policy, Threshold
from kvzap_lab.soft_eviction import NoGradientError, Schedule, ScorerNet, soft_forward, visibility


def random_scorer(model, seed: int, width: int | None = 8) -> KVzapLinear:
    """A KVzap MLP (or linear, ``width=None``) scorer with random weights for ``model``."""
    spec = describe(model)
    g = torch.Generator().manual_seed(seed)
    L, D, H = spec.n_layers, spec.hidden_size, spec.n_kv_heads
    scorer = KVzapMLP(width=width) if width else KVzapLinear()
    scorer.trained_for_ = {"model_fingerprint": None, "n_layers": L, "hidden_size": D, "n_kv_heads": H}
    dims = [D] + ([width] if width else []) + [H]
    scorer.weights_ = [
        (torch.randn(L, o, i, generator=g) / math.sqrt(i), torch.randn(L, o, generator=g)) for i, o in zip(dims, dims[1:])
    ]
    return scorer


def engine_logits(model, policy, ids: torch.Tensor, prompt: int, chunk: int, evict_every: int):
    """The engine fed as ``generate`` feeds it, teacher-forced: the prompt in chunks, then one token per forward."""
    with evicting(model, policy, evict_every=evict_every) as run:
        cache = run.new_cache()
        bounds = list(range(0, prompt, chunk)) + list(range(prompt, ids.shape[1])) + [ids.shape[1]]
        out = [model(input_ids=ids[:, a:b], cache=cache).logits for a, b in zip(bounds, bounds[1:])]
    return torch.cat(out, 1), cache.compression().overall


def median_tau(model, net, ids) -> float:
    """A threshold that evicts about half the pairs: the median score of a full-cache forward."""
    vis = visibility([(ids.shape[1], ids.shape[1])] * len(ids), Schedule(), window=0, sinks=0)
    out = soft_forward(model, net, ids, vis, tau=0.0, gate="hard")
    return float(torch.cat([s.detach().flatten() for s in out.scores]).median())


@pytest.fixture(scope="module")
def testbed():
    model, tokenizer = load_model("testbed", device="cpu")
    sample = tasks.make_samples("multi_key_needle", tokenizer, 1, 96, seed=3)[0]
    ids = torch.tensor([sample.input_ids + sample.answer_ids[:-1]])
    return model, ids, len(sample.input_ids)


def tiny_llama():
    model = random_tiny_model("llama", seed=1, num_hidden_layers=3)  # GQA: 4 query heads, 2 KV heads
    assert describe(model).group_size == 2
    ids = torch.randint(3, 128, (2, 70), generator=torch.Generator().manual_seed(0))
    return model, ids, 57  # 57 = 3 chunks of 16 + a one-token chunk (a single-token forward for the engine)


@pytest.mark.parametrize("evict_every", [1, 3])
@pytest.mark.parametrize("bed", ["testbed", "tiny_llama"])
def test_hard_gates_equal_the_engine_and_small_temperature_tends_to_it(bed, evict_every, request):
    """Engine settings: prompt prefilled in chunks of 16, then teacher-forced one token per forward, window 8, sinks 4,
    ``evict_every`` 1 (DMS) and 3; the soft model follows the same schedule."""
    model, ids, prompt = request.getfixturevalue("testbed") if bed == "testbed" else tiny_llama()
    scorer = random_scorer(model, seed=evict_every)
    net = ScorerNet(scorer)
    tau = median_tau(model, net, ids)
    window, sinks, chunk = 8, 4, 16
    policy = Policy("mlp", scorer, Threshold(tau=tau, window=window, sinks=sinks))
    with torch.no_grad():
        expected, compression = engine_logits(model, policy, ids, prompt, chunk, evict_every)
    vis = visibility([(prompt, ids.shape[1])] * len(ids), Schedule(chunk_size=chunk, evict_every=evict_every), window, sinks)
    with torch.no_grad():
        hard = soft_forward(model, net, ids, vis, tau=tau, gate="hard")
        full = model(ids).logits
    assert 0.3 < compression < 0.7  # a real test: about half the pairs are evicted
    assert (expected - full).abs().max() > 1e-2  # and eviction changes the logits
    torch.testing.assert_close(hard.logits, expected, atol=2e-4, rtol=1e-4)
    assert float(hard.expected_compression()) == pytest.approx(compression, abs=1e-6)  # float32 sums

    # T -> 0: the sigmoid gates tend to the hard ones. The bound holds once no judged score is within ~25 T of tau.
    margin = min(float((s - tau).abs()[vis.judged[:, None].expand_as(s)].min()) for s in hard.scores)
    temperature = margin / 25
    with torch.no_grad():
        soft = soft_forward(model, net, ids, vis, tau=tau, temperature=temperature)
        warm = soft_forward(model, net, ids, vis, tau=tau, temperature=50 * margin)
    torch.testing.assert_close(soft.logits, expected, atol=2e-4, rtol=1e-4)
    assert (warm.logits - expected).abs().max() > 1e-3  # a warm gate is a different model


@pytest.mark.parametrize("gate", ["soft", "straight_through"])
def test_gradients_reach_the_scorer_and_not_the_backbone(gate):
    model, ids, prompt = tiny_llama()
    net = ScorerNet(random_scorer(model, seed=0))
    vis = visibility([(prompt, ids.shape[1])] * 2, Schedule(chunk_size=16, evict_every=1), window=8, sinks=4)
    tau = median_tau(model, net, ids)
    out = soft_forward(model, net, ids, vis, tau=tau, temperature=0.5, gate=gate, noise=torch.Generator().manual_seed(0))
    (out.logits.logsumexp(-1).mean() + out.expected_compression()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())  # the backbone's flags are restored after the forward
    if gate == "straight_through":  # the forward is the hard rule's (on noisy margins: a sample of keep decisions)
        assert set(torch.cat([g.flatten() for g in out.gates]).tolist()) == {0.0, 1.0}
        with torch.no_grad():
            plain = soft_forward(model, net, ids, vis, tau=tau, gate="straight_through")
            hard = soft_forward(model, net, ids, vis, tau=tau, gate="hard")
        torch.testing.assert_close(plain.logits, hard.logits, atol=1e-6, rtol=0)


def test_scorer_net_computes_the_scorer_and_writes_back_an_ordinary_scorer(tmp_path):
    model, ids, _ = tiny_llama()
    for width in (8, None):
        scorer = random_scorer(model, seed=2, width=width)
        net = ScorerNet(scorer)
        hidden = torch.randn(2, 5, describe(model).hidden_size)
        torch.testing.assert_close(net(hidden, 1), scorer.score(hidden, 1))
        with torch.no_grad():
            net.weights[-1].add_(1.0)  # shift every score by one
        trained = net.to_scorer()
        assert type(trained) is type(scorer) and trained.get_params() == scorer.get_params()
        trained.save(tmp_path / f"w{width}")
        loaded = type(scorer).load(tmp_path / f"w{width}", model=model)
        torch.testing.assert_close(loaded.score(hidden, 1), scorer.score(hidden, 1) + 1)
    with pytest.raises(NoGradientError, match="no gradient"):
        ScorerNet(GBDTScorer())


def test_schedule_follows_the_engine_counter():
    sizes, evicts = Schedule(chunk_size=16, evict_every=3).forwards(33, 40)
    assert sizes == [16, 16, 1] + [1] * 7
    # multi-token chunks are eviction points; the one-token chunk is the first of the single-token forwards
    assert evicts == [True, True, False, False, True, False, False, True, False, False]
    vis = visibility([(33, 40)], Schedule(chunk_size=16, evict_every=3), window=4, sinks=2)
    judged = vis.judged[0]
    # At the first point (after token 15) positions <= 11 are judged, except the sinks 0 and 1.
    assert not judged[:2].any() and judged[2:12].all()
    # Token 11 is judged after forward 0: forward 0 sees it in full, forward 1 through its gate.
    assert not vis.gated[0, 15, 11] and vis.gated[0, 16, 11] and not vis.gated[0, 16, 12]
    # The last point is after forward 7 (token 37): positions <= 33 are judged by the end, 34.. never.
    assert judged[33] and not judged[34:].any()
    with pytest.raises(ValueError, match="evict_every"):
        Schedule(evict_every=0)
    with pytest.raises(ValueError, match="temperature"):
        model, ids, prompt = tiny_llama()
        soft_forward(model, ScorerNet(random_scorer(model, 0)), ids, visibility([(prompt, 70)] * 2, Schedule(), 8, 4),
                     tau=0.0, temperature=0.0)
