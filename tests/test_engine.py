"""The eviction engine: exact attention over the compacted cache, DMS semantics, batching, bad input."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from kvzap_lab.engine import Offer, eviction_run, evicting, generate, left_pad, release
from kvzap_lab.model import (
    SUPPORTED_ARCHITECTURES,
    UnsupportedModelError,
    attention_override,
    capture_attention_inputs,
    describe,
    random_tiny_model,
)
from kvzap_lab.policy import Policy, Threshold, TopK

WINDOW, SINKS, CHUNK = 8, 2, 16


@dataclass
class TableScorer:
    """Fixed random scores by (layer, KV head, position): a fixed random keep decision for ``Threshold(0)``."""

    table: torch.Tensor  # [layers, kv_heads, max_positions]
    accumulates_attention = False

    def score(self, hidden, layer, *, keys=None, values=None, positions=None):
        b, t = positions.shape
        return self.table[layer][:, positions.reshape(-1)].reshape(-1, b, t).transpose(0, 1)


def table_policy(model, seed=0, window=WINDOW, sinks=SINKS):
    spec = describe(model)
    table = torch.randn(spec.n_layers, spec.n_kv_heads, spec.max_positions, generator=torch.Generator().manual_seed(seed))
    return Policy("table", TableScorer(table), Threshold(tau=0.0, window=window, sinks=sinks))


def masked_reference(model, ids, mask, policy, chunk, decode_tokens, evict_every):
    """Full-cache forwards (DynamicCache) where each layer's mask hides the pairs the policy evicts.

    Eviction points: after every multi-token forward and every ``evict_every`` decode steps. Evicted before a
    forward: real pairs with position <= (row's last position at the latest eviction point) - window, not
    sinks, whose fixed score is < 0. Returns the logits of every forward.
    """
    spec = describe(model)
    table, window, sinks = policy.scorer.table, policy.rule.window, policy.rule.sinks
    all_ids = torch.cat([ids, decode_tokens], 1)
    valid = torch.cat([mask.bool(), torch.ones_like(decode_tokens, dtype=torch.bool)], 1)
    positions = (valid.long().cumsum(1) - 1).clamp_min(0)
    b, n = all_ids.shape
    bounds = list(range(0, ids.shape[1], chunk)) + list(range(ids.shape[1], n)) + [n]
    masks = {}

    def layer_fn(layer):
        def fn(module, query, key, value, attention_mask, base, **kwargs):
            return base(module, query, key, value, masks[layer], **kwargs)

        return fn

    cache, out, since, last = None, [], 0, torch.full((b,), -(10**6))
    with attention_override(model, {i: layer_fn(i) for i in range(spec.n_layers)}), torch.no_grad():
        for start, end in zip(bounds[:-1], bounds[1:]):
            pos_k = positions[:, :end]
            old_enough = (pos_k <= (last - max(window, 1))[:, None]) & (pos_k >= sinks) & (torch.arange(end) < start)
            causal = torch.arange(end)[None, :] <= torch.arange(start, end)[:, None]  # [q, kv]
            for layer in range(spec.n_layers):
                keep = table[layer][:, pos_k] >= 0  # [kv_heads, b, kv]
                evicted = old_enough[None] & ~keep
                allowed = valid[None, :, None, :end] & ~evicted[:, :, None, :] & causal[None, None]  # [h, b, q, kv]
                allowed = allowed | ~allowed.any(-1, keepdim=True)  # padding queries: finite garbage
                masks[layer] = allowed.transpose(0, 1).repeat_interleave(spec.group_size, 1)
            res = model(all_ids[:, start:end], position_ids=positions[:, start:end], cache=cache, use_cache=True)
            cache = res.cache
            out.append(res.logits)
            since += 1
            if end - start > 1 or since >= evict_every:  # an eviction point: decisions up to the last position
                last, since = positions[:, end - 1], 0
    return out


@pytest.mark.parametrize("model_type, evict_every", [("llama", 1), ("qwen3", 1), ("llama", 5)])
def test_compacted_cache_matches_masked_full_cache(model_type, evict_every):
    model = random_tiny_model(model_type, seed=1)
    policy = table_policy(model)
    gen = torch.Generator().manual_seed(2)
    rows = [torch.randint(3, 128, (70,), generator=gen).tolist(), torch.randint(3, 128, (41,), generator=gen).tolist()]
    ids, mask = left_pad(rows, 0)
    decode_tokens = torch.randint(3, 128, (2, 55), generator=gen)
    reference = masked_reference(model, ids, mask, policy, CHUNK, decode_tokens, evict_every)

    got = []
    with evicting(model, policy, evict_every=evict_every, compact_every=7) as run, torch.no_grad():
        cache = run.new_cache()
        for start in range(0, ids.shape[1], CHUNK):
            end = min(start + CHUNK, ids.shape[1])
            got.append(model(ids[:, start:end], attention_mask=mask[:, :end], cache=cache).logits)
        for t in range(decode_tokens.shape[1]):
            got.append(model(decode_tokens[:, t : t + 1], cache=cache).logits)
    assert len(got) == len(reference) == math.ceil(70 / CHUNK) + 55
    n_prefill = math.ceil(70 / CHUNK)
    for s, (g, r) in enumerate(zip(got, reference)):
        real = mask[:, s * CHUNK : (s + 1) * CHUNK].bool() if s < n_prefill else torch.ones(2, 1, dtype=torch.bool)
        torch.testing.assert_close(g[real], r[real], atol=1e-5, rtol=0, msg=f"forward {s}")
    # The pairs were really removed: about half of the evictable ones are gone, and the storage shrank.
    compression = cache.compression()
    assert 0.3 < compression.overall < 0.6
    assert cache.bytes_held() < 0.85 * cache.full_bytes()
    assert cache.compression().per_layer_head.shape == (2, 2)


def test_short_sequences_compact_sooner_so_waiting_evicted_pairs_stay_few():
    """Every pair outside the window is evicted at every step: between compactions the stored-but-evicted pairs
    grow by one per row and step. On a 40-token prompt they stay within seen / 16 steps' worth, not the
    ``compact_every`` (32) steps' worth that a long sequence may hold."""
    model = random_tiny_model("llama", seed=4)
    policy = Policy("evict_all", TableScorer(torch.zeros(2, 2, 1024)), Threshold(tau=1.0, window=4, sinks=1))
    ids = torch.randint(3, 128, (1, 80), generator=torch.Generator().manual_seed(5))
    waiting = []
    with evicting(model, policy, evict_every=1, compact_every=32) as run, torch.no_grad():
        cache = run.new_cache()
        model(ids[:, :40], cache=cache)
        for t in range(40, 80):
            model(ids[:, t : t + 1], cache=cache)
            layer = cache.layers[0]
            waiting.append((layer.stored - int(layer.kept().sum())) // 2)  # per row (2 KV heads)
            assert int(layer.kept().sum()) == 2 * (1 + 4)  # sinks and window only
    assert max(waiting) <= cache.seen // 16 and max(waiting) >= 2  # compactions every 2 to 5 steps here


def held_positions(cache, layer, row, head):
    lay = cache.layers[layer]
    alive = lay.alive[row, head, : lay.used]
    return sorted(lay.positions[row, head, : lay.used][alive].tolist())


def test_sinks_window_and_current_token_are_never_evicted():
    model = random_tiny_model("llama")
    spec = describe(model)
    low = torch.full((spec.n_layers, spec.n_kv_heads, spec.max_positions), -100.0)
    policy = Policy("evict_all", TableScorer(low), Threshold(tau=0.0, window=5, sinks=3))
    ids = torch.randint(3, 128, (1, 40))
    with evicting(model, policy, evict_every=1) as run, torch.no_grad():
        out = model(ids)
        for _ in range(4):
            out = model(out.logits[:, -1:].argmax(-1), cache=out.cache)
    expected = [0, 1, 2] + list(range(44 - 5, 44))
    for layer in range(spec.n_layers):
        for head in range(spec.n_kv_heads):
            assert held_positions(run.cache, layer, 0, head) == expected
    assert run.cache.compression().overall == pytest.approx(1 - 8 / 44)
    # window=0 still keeps the token being decoded
    policy0 = Policy("evict_all", TableScorer(low), Threshold(tau=0.0, window=0, sinks=0))
    with evicting(model, policy0, evict_every=1) as run, torch.no_grad():
        out = model(ids)
        model(out.logits[:, -1:].argmax(-1), cache=out.cache)
    assert held_positions(run.cache, 0, 0, 0) == [40]


def test_accumulated_attention_adds_the_attention_mass_of_each_kv_group():
    model = random_tiny_model("llama", attn_implementation="eager")
    spec = describe(model)

    class Accumulating:
        accumulates_attention = True

        def score(self, hidden, layer, *, keys=None, values=None, positions=None):
            return torch.zeros(keys.shape[:3])

    policy = Policy("acc", Accumulating(), TopK(keep_ratio=1.0))
    ids = torch.randint(3, 128, (1, 30))
    with torch.no_grad():
        weights = model(ids, output_attentions=True).attentions  # per layer [b, heads, q, kv]
        with evicting(model, policy) as run:
            out = model(ids[:, :20])
            for t in range(20, 30):
                out = model(ids[:, t : t + 1], cache=out.cache)
    for layer in range(spec.n_layers):
        expected = weights[layer].view(1, spec.n_kv_heads, spec.group_size, 30, 30).sum((2, 3))
        lay = run.cache.layers[layer]
        torch.testing.assert_close(lay.scores[:, :, : lay.used], expected, atol=1e-5, rtol=1e-5)


def test_full_cache_engine_matches_hf_generate_with_left_padding():
    model = random_tiny_model("qwen3", seed=3)
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (33, 20, 27)]
    ids, mask = left_pad(rows, 0)
    with torch.no_grad():
        hf = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    result = generate(model, rows, None, 12, eos_token_id=[], chunk_size=8)
    assert result.tokens == hf[:, ids.shape[1] :].tolist()
    assert result.compression.overall == 0.0


def test_batched_rows_evict_independently():
    model = random_tiny_model("llama", seed=4)
    policy = table_policy(model, seed=5, window=4, sinks=1)
    gen = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (50, 23)]
    batched = generate(model, rows, policy, 15, eos_token_id=[], chunk_size=16)
    for i, row in enumerate(rows):
        alone = generate(model, [row], policy, 15, eos_token_id=[], chunk_size=16)
        assert batched.tokens[i] == alone.tokens[0]
        assert batched.compression.per_row[i].item() == pytest.approx(alone.compression.overall, abs=1e-9)
    assert batched.compression.per_row[0] != batched.compression.per_row[1]


def test_hf_generate_inside_evicting_uses_true_positions():
    model = random_tiny_model("llama", seed=6)
    policy = table_policy(model, seed=7)
    ids = torch.randint(3, 128, (1, 48), generator=torch.Generator().manual_seed(3))
    ours = generate(model, ids, policy, 10, eos_token_id=[], chunk_size=48)
    with evicting(model, policy) as run, torch.no_grad():
        hf = model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert hf[0, 48:].tolist() == ours.tokens[0]
    assert run.cache.seen == 57 and run.cache.compression().overall > 0.2


def test_bad_input_gets_clear_errors():
    model = random_tiny_model("llama")
    scorer = TableScorer(torch.zeros(2, 2, 1024))
    with pytest.raises(ValueError, match="NaN"):
        Threshold(tau=float("nan"))
    with pytest.raises(ValueError, match="window"):
        with evicting(model, Policy("p", scorer, Threshold(tau=0.0, window=-1))):
            pass
    with pytest.raises(ValueError, match="expected"):
        wrong_heads = TableScorer(torch.zeros(2, 3, 1024))
        with evicting(model, Policy("p", wrong_heads, Threshold(tau=0.0))), torch.no_grad():
            model(torch.randint(3, 128, (1, 5)))
    with pytest.raises(ValueError, match="attention_mask must be 2-D"):
        with evicting(model, Policy("p", scorer, Threshold(tau=0.0))), torch.no_grad():
            model(torch.randint(3, 128, (1, 5)), attention_mask=torch.ones(1, 4, dtype=torch.long))
    from kvzap_lab.policies.kvzap_linear import KVzapLinear
    from kvzap_lab.surrogate import ModelMismatchError

    gen = torch.Generator().manual_seed(0)
    other = KVzapLinear().fit(torch.randn(64, 2, 32, generator=gen).numpy(), torch.randn(64, 2, 2, generator=gen).numpy())
    with pytest.raises(ModelMismatchError, match="hidden_size"):
        with evicting(model, Policy("kvzap_linear", other, Threshold(tau=0.0))):
            pass
    gpt2 = torch.nn.Module()
    gpt2.config = type("Config", (), {"model_type": "gpt2"})()
    with pytest.raises(UnsupportedModelError, match="not supported"):
        with evicting(gpt2, None):
            pass
    # The model is restored after an error inside the block.
    assert model.config._attn_implementation == "sdpa"


def test_generation_stops_at_eos_and_at_the_first_mismatch_with_expected():
    model = random_tiny_model("llama", seed=8)
    rows = [torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (30, 22)]
    free = generate(model, rows, None, 12, eos_token_id=[])
    eos = free.tokens[0][4]
    stopped = generate(model, rows, None, 12, eos_token_id=eos)
    assert stopped.tokens[0] == free.tokens[0][: free.tokens[0].index(eos) + 1]
    expected = [free.tokens[0][:3] + [-5, 7], free.tokens[1]]
    checked = generate(model, rows, None, 12, eos_token_id=[], expected=expected)
    assert checked.tokens == [free.tokens[0][:4], free.tokens[1]]


# Importing transformers' Gemma3 takes ~10 s of CPU (it pulls in its multimodal stack): slow-marked.
ARCHITECTURES = [pytest.param(m, marks=pytest.mark.slow) if m == "gemma3_text" else m for m in sorted(SUPPORTED_ARCHITECTURES)]


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_full_cache_engine_matches_plain_forward_for_every_architecture(model_type):
    """Chunked prefill and decode steps through the engine give the model's own logits (Gemma3's sliding-window
    layers included: the sequence is longer than its window of 32)."""
    model = random_tiny_model(model_type, seed=0)
    ids = torch.randint(3, 128, (1, 70), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids).logits
        with evicting(model, None) as run:
            cache = run.new_cache()
            got = [model(ids[:, s : s + 16], cache=cache).logits for s in range(0, 64, 16)]
            got += [model(ids[:, t : t + 1], cache=cache).logits for t in range(64, 70)]
    torch.testing.assert_close(torch.cat(got, 1), reference, atol=1e-5, rtol=0)


@dataclass
class PlainScorer:
    """A KVzap scorer seen only through ``score()``: the engine cannot fuse it."""

    inner: object
    accumulates_attention = False

    def score(self, hidden, layer, **kwargs):
        return self.inner.score(hidden, layer, **kwargs)


def fused_and_plain_policies(model, seed=0):
    from kvzap_lab.policies.kvzap_mlp import KVzapMLP

    spec, gen = describe(model), torch.Generator().manual_seed(seed)
    X = torch.randn(256, spec.n_layers, spec.hidden_size, generator=gen)
    mlp = KVzapMLP(epochs=1).fit(X.numpy(), torch.randn(256, spec.n_layers, spec.n_kv_heads, generator=gen).numpy())
    rule = Threshold(tau=0.0, window=4, sinks=1)
    return Policy("mlp", mlp, rule), Policy("plain", PlainScorer(mlp), rule)


def test_kvzap_scorers_run_through_the_fused_kernel_with_the_same_decisions():
    from kvzap_lab.engine import fused_weights

    model = random_tiny_model("llama", seed=9)
    fused, plain = fused_and_plain_policies(model)
    assert len(fused_weights(model, fused)) == 2 and fused_weights(model, plain) is None
    gen = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (40, 29)]
    a = generate(model, rows, fused, 20, eos_token_id=[], chunk_size=16)
    b = generate(model, rows, plain, 20, eos_token_id=[], chunk_size=16)
    assert a.tokens == b.tokens
    assert a.compression.overall == b.compression.overall > 0.1


def test_on_cpu_one_batched_matmul_scores_every_layer_as_the_per_layer_scorer_does():
    """Without Triton, the fused scorers of all layers run as one stacked matmul per map at each eviction point;
    the scores stored with the pairs are the scorer's own, in prefill chunks and in batches of decode steps."""
    from kvzap_lab.kernels import INTERPRETED

    model = random_tiny_model("llama", seed=9, num_hidden_layers=3)
    ids = torch.randint(3, 128, (2, 60), generator=torch.Generator().manual_seed(2))
    caches = {}
    for policy in fused_and_plain_policies(model, seed=3):
        with torch.no_grad(), evicting(model, policy, evict_every=4) as run:
            assert (run.stacked is not None) == (policy.name == "mlp" and not INTERPRETED)
            cache = run.new_cache()
            for start in range(0, 48, 16):
                model(ids[:, start : start + 16], cache=cache)
            for t in range(48, 60):
                model(ids[:, t : t + 1], cache=cache)
        caches[policy.name] = cache
    for fused, plain in zip(caches["mlp"].layers, caches["plain"].layers):
        held = fused.alive[:, :, : fused.used]
        assert torch.equal(held, plain.alive[:, :, : plain.used]) and 0 < held.sum() < held.numel()
        torch.testing.assert_close(fused.scores[:, :, : fused.used][held], plain.scores[:, :, : plain.used][held], atol=1e-5, rtol=1e-5)


def run_with_offers(model, policy, ids, mask, decode_tokens, evict_every, decide, hidden=False):
    """Chunked prefill and decode steps with decisions from outside: ``decide(pending) -> keep`` at every offer.
    Returns (logits of every forward, offers seen, cache)."""
    rule = policy.rule if policy is not None else Threshold(window=WINDOW, sinks=SINKS)
    offer = Offer(window=rule.window, sinks=rule.sinks, hidden=hidden)
    logits, offers = [], []
    with evicting(model, policy, evict_every=evict_every, compact_every=7, offer=offer) as run, torch.no_grad():
        cache = run.new_cache()
        forwards = [(ids[:, s : s + CHUNK], mask[:, : s + CHUNK]) for s in range(0, ids.shape[1], CHUNK)]
        forwards += [(decode_tokens[:, t : t + 1], None) for t in range(decode_tokens.shape[1])]
        for tokens, m in forwards:
            logits.append(model(tokens, attention_mask=m, cache=cache).logits)
            pending = run.pending()
            if pending is not None:
                offers.append(pending)
                run.decide(decide(pending))
    return logits, offers, cache


@pytest.mark.parametrize("evict_every", [1, 3])
def test_decisions_from_outside_equal_the_rule_inside(evict_every):
    """A Threshold rule applied through pending()/decide() gives the engine's own run: same logits, same pairs
    held; every position outside the final window and the sinks is offered exactly once, in order."""
    model = random_tiny_model("llama", seed=1)
    policy = table_policy(model)
    gen = torch.Generator().manual_seed(2)
    rows = [torch.randint(3, 128, (70,), generator=gen).tolist(), torch.randint(3, 128, (41,), generator=gen).tolist()]
    ids, mask = left_pad(rows, 0)
    decode_tokens = torch.randint(3, 128, (2, 30), generator=gen)
    expected = []
    with evicting(model, policy, evict_every=evict_every, compact_every=7) as run, torch.no_grad():
        cache = run.new_cache()
        for s in range(0, ids.shape[1], CHUNK):
            expected.append(model(ids[:, s : s + CHUNK], attention_mask=mask[:, : s + CHUNK], cache=cache).logits)
        for t in range(decode_tokens.shape[1]):
            expected.append(model(decode_tokens[:, t : t + 1], cache=cache).logits)

    def by_rule(pending):
        layers = [policy.rule.keep(pending.scores[:, i].nan_to_num(0.0), i, pending.mask[:, i]) for i in range(2)]
        return torch.stack(layers, 1)

    got, offers, ours = run_with_offers(model, policy, ids, mask, decode_tokens, evict_every, by_rule)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=0)
    for layer in range(2):
        for row in range(2):
            for head in range(2):
                assert held_positions(ours, layer, row, head) == held_positions(cache, layer, row, head)
    for row, n in enumerate((70, 41)):
        offered = [p for o in offers for p in o.positions[row].tolist() if p >= 0]
        assert offered == list(range(SINKS, n + 30 - 1 - WINDOW + 1))
    assert ours.compression().overall == cache.compression().overall > 0.2


def test_offers_carry_scores_and_hidden_states_and_want_a_decision():
    model = random_tiny_model("llama", seed=3)
    spec = describe(model)
    ids = torch.randint(3, 128, (2, 48), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    with torch.no_grad(), capture_attention_inputs(model) as captured:
        model(ids)
        reference = torch.stack([captured[i] for i in range(spec.n_layers)], 1)  # [b, L, n, D]
    policy = table_policy(model)
    _, offers, cache = run_with_offers(model, policy, ids, mask, ids[:, :0], 1, lambda p: p.mask, hidden=True)
    assert cache.compression().overall == 0  # everything kept
    for pending in offers:
        assert pending.hidden.shape[:3] == (2, spec.n_layers, pending.positions.shape[1])
        for row in range(2):
            n = int(pending.count[row])
            pos = pending.positions[row, :n]
            torch.testing.assert_close(pending.hidden[row, :, :n], reference[row][:, pos], atol=1e-5, rtol=0)
            expected = policy.scorer.table[:, :, pos]  # [L, H, n]
            torch.testing.assert_close(pending.scores[row, :, :, :n], expected)
            assert pending.mask[row, :, :, :n].all() and not pending.mask[row, :, :, n:].any()
    with evicting(model, None, offer=Offer(window=4, sinks=0)) as run, torch.no_grad():
        cache = run.new_cache()
        model(ids[:, :16], cache=cache)
        pending = run.pending()
        assert pending.scores is None and pending.hidden is None and pending.count.tolist() == [12, 12]
        with pytest.raises(RuntimeError, match="decide"):
            model(ids[:, 16:17], cache=cache)
        with pytest.raises(ValueError, match="shape"):
            run.decide(torch.ones(2, 2, 2, 3, dtype=torch.bool))
        run.decide(torch.zeros_like(pending.mask))
        assert cache.compression().overall == pytest.approx(12 / 16)
    with pytest.raises(RuntimeError, match="offer"):
        with evicting(model, None) as run:
            run.pending()
    with pytest.raises(ValueError, match="differs from the policy"):
        with evicting(model, policy, offer=Offer(window=WINDOW + 1, sinks=SINKS)):
            pass


def test_runs_sharing_one_model_take_turns():
    """Two runs on one model, forward by forward in turn (each attaching before its forward), give what each gives
    alone; the model is plain between them once released."""
    model = random_tiny_model("llama", seed=5)
    gen = torch.Generator().manual_seed(6)
    seqs = [torch.randint(3, 128, (1, 40), generator=gen) for _ in range(2)]
    policies = [table_policy(model, seed=1), table_policy(model, seed=2)]
    alone = []
    for ids, policy in zip(seqs, policies):
        with evicting(model, policy, evict_every=1) as run, torch.no_grad():
            cache = run.new_cache()
            alone.append([model(ids[:, :16], cache=cache).logits] + [model(ids[:, t : t + 1], cache=cache).logits for t in range(16, 40)])
    runs = [eviction_run(model, policy, evict_every=1) for policy in policies]
    caches = [run.new_cache() for run in runs]
    together = [[], []]
    with torch.no_grad():
        for step in [(0, 16)] + [(t, t + 1) for t in range(16, 40)]:
            for i, run in enumerate(runs):
                run.attach()
                together[i].append(model(seqs[i][:, step[0] : step[1]], cache=caches[i]).logits)
        release(model)
        plain = model(seqs[0]).logits
    for a, b in zip(alone, together):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, atol=1e-6, rtol=0)
    assert model.config._attn_implementation == "sdpa" and plain.shape == (1, 40, 128)
