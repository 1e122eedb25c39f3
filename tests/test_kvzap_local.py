"""KVzap-local (KVzap-MLP with a causal convolution over the previous hidden states): causality, the same scores
in a one-chunk prefill, chunks and decoding (padding and forks included), context 0 is KVzap-MLP, it learns a
target that depends on the previous token, save/load, bad options, wrong-family checkpoints, collected neighbours,
and a study trial."""

from __future__ import annotations

import json

import numpy as np
import optuna
import pytest
import torch

from kvzap_lab import cli, collect, data
from kvzap_lab.cache import CompactCache
from kvzap_lab.checkpoint import CheckpointError
from kvzap_lab.engine import evicting, generate, prefill
from kvzap_lab.model import describe, load_model
from kvzap_lab.policies.kvzap_local import KVzapLocal
from kvzap_lab.policies.kvzap_mlp import KVzapMLP
from kvzap_lab.policy import Policy, Scorer, Threshold, get_policy
from kvzap_lab.study import cli as study_cli
from kvzap_lab.study.bench import default_data_dir
from kvzap_lab.surrogate import r2_spearman_mse, synthetic_split
from kvzap_lab.train import fit_and_evaluate

FAST = dict(epochs=6, batch_size=128)


def rows_with_previous(n: int, n_layers: int, hidden: int, k: int, seed: int):
    """Sequences of random hidden states ``[n, L, H]``; each row's ``k`` previous states (zeros before the first
    one) and a target per (layer, 2 heads) made mostly of the previous token: ``y_t = 2 tanh(2 a·h_(t-1)) +
    0.5 b·h_t - 6``."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, n_layers, hidden)).astype(np.float32)
    padded = np.concatenate([np.zeros((k, n_layers, hidden), np.float32), X])
    previous = np.stack([padded[i : i + n] for i in range(k)], axis=1)  # [n, k, L, H], oldest first
    a, b = rng.normal(size=(2, n_layers, hidden, 2)) / np.sqrt(hidden)
    y = 2 * np.tanh(2 * np.einsum("nlh,lhk->nlk", previous[:, -1], a)) + 0.5 * np.einsum("nlh,lhk->nlk", X, b) - 6
    return X, previous, y.astype(np.float32)


@pytest.fixture(scope="module")
def synthetic():
    X, previous, y = rows_with_previous(4000, 2, 24, 4, seed=0)
    return X, previous, y, 3200


def test_it_learns_what_the_previous_token_says_and_kvzap_mlp_cannot(synthetic):
    X, previous, y, cut = synthetic
    recipe = dict(width=8, epochs=15, lr=2e-2, batch_size=128)
    local = KVzapLocal(context=2, **recipe).fit(X[:cut], y[:cut], previous=previous[:cut])
    mlp = KVzapMLP(**recipe).fit(X[:cut], y[:cut])
    r2_local = np.mean(r2_spearman_mse(y[cut:], local.predict(X[cut:], previous=previous[cut:]))["r2"])
    r2_mlp = np.mean(r2_spearman_mse(y[cut:], mlp.predict(X[cut:]))["r2"])
    assert r2_local > 0.85 and r2_mlp < 0.2, (r2_local, r2_mlp)  # 0.93 and 0.06
    assert local.weights_["conv"][..., 1].abs().max() > 0.5  # it learnt to read the previous token


def test_context_0_is_kvzap_mlp_exactly():
    split = synthetic_split(1500, 2, 24, 2, seed=1)
    local = KVzapLocal(context=0, width=6, **FAST).fit(split.X_train, split.y_train)
    mlp = KVzapMLP(width=6, **FAST).fit(split.X_train, split.y_train)
    np.testing.assert_array_equal(local.predict(split.X_test), mlp.predict(split.X_test))
    assert local.flops_per_token() == mlp.flops_per_token() + 2 * 2 * 6  # one tap per unit and layer
    assert [w.shape for w, _ in local.fused_weights()] == [w.shape for w, _ in mlp.weights_]  # the fused kernel runs it


def test_flops_count_both_maps_and_the_taps(synthetic):
    X, previous, y, _ = synthetic
    local = KVzapLocal(context=4, width=5, epochs=1).fit(X, y, previous=previous)
    assert local.flops_per_token() == 2 * 2 * 5 * (24 + 5 + 2)
    assert local.fused_weights() is None  # score() reads the previous hidden states


@pytest.fixture(scope="module")
def testbed():
    return load_model("testbed", device="cpu")


@pytest.fixture(scope="module")
def scorer(testbed):
    """A KVzap-local scorer of the test bed with random (not trained) weights: every tap matters."""
    spec = describe(testbed[0])
    X, previous, y = rows_with_previous(300, spec.n_layers, spec.hidden_size, 3, seed=2)
    y = np.repeat(y[:, :, :1], spec.n_kv_heads, axis=2)
    local = KVzapLocal(context=3, width=8, epochs=1).fit(X, y, previous=previous)
    local.weights_["conv"] = torch.randn(local.weights_["conv"].shape, generator=torch.Generator().manual_seed(0))
    return local


class Recording(Scorer):
    """Scores with ``inner`` and keeps ``(layer, positions, scores)`` of every call."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []
        self.context = inner.context

    def score(self, hidden, layer, **kwargs):
        out = self.inner.score(hidden, layer, **kwargs)
        self.calls.append((layer, kwargs["positions"], out))
        return out


def scores_by_position(calls, n_layers: int) -> dict[tuple[int, int, int], torch.Tensor]:
    """``{(row, layer, position): scores [kv_heads]}`` over every call."""
    out = {}
    for layer, positions, scores in calls:
        for row in range(positions.shape[0]):
            for column, position in enumerate(positions[row].tolist()):
                out[row, layer, position] = scores[row, :, column]
    return out


def stored_scores(cache: CompactCache) -> dict[tuple[int, int, int], torch.Tensor]:
    """``{(row, layer, position): scores [kv_heads]}`` the engine stored for the held (real) tokens."""
    out = {}
    for idx, layer in enumerate(cache.layers):
        for row in range(layer.alive.shape[0]):
            held = layer.alive[row, 0, : layer.used]
            for position, scores in zip(layer.positions[row, 0, : layer.used][held].tolist(), layer.scores[row, :, : layer.used][:, held].T):
                out[row, idx, position] = scores
    return out


def run(model, scorer, prompts, chunk_size: int, evict_every: int = 1, new_tokens: int = 7):
    recording = Recording(scorer)
    generate(model, prompts, Policy("local", recording, Threshold(tau=-1e9, window=4, sinks=1)), new_tokens,
             eos_token_id=[], chunk_size=chunk_size, evict_every=evict_every)
    return scores_by_position(recording.calls, describe(model).n_layers)


def test_prefill_in_one_chunk_in_chunks_and_decoding_give_each_token_the_same_score(testbed, scorer):
    """Left-padded rows of different lengths; one chunk, chunks of 5, token by token (chunk 1), and decoding steps
    scored one by one or three at a time: every token's score is the same."""
    model, _ = testbed
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(5, 800, (n,), generator=generator).tolist() for n in (23, 17)]
    reference = run(model, scorer, prompts, chunk_size=64)
    assert len(reference) == describe(model).n_layers * (23 + 6 + 17 + 6)  # each row's prompt and 6 decoded tokens
    for chunk_size, evict_every in ((5, 1), (1, 1), (64, 3)):
        other = run(model, scorer, prompts, chunk_size=chunk_size, evict_every=evict_every)
        assert other.keys() == reference.keys()
        for key, value in reference.items():
            torch.testing.assert_close(other[key], value, atol=2e-5, rtol=1e-5, msg=f"{key}, chunk {chunk_size}")


def test_a_tokens_score_does_not_change_with_later_tokens_and_needs_the_earlier_ones(testbed, scorer):
    model, _ = testbed
    prompt = torch.randint(5, 800, (30,), generator=torch.Generator().manual_seed(4)).tolist()
    base = run(model, scorer, [prompt], chunk_size=64, new_tokens=1)
    later = run(model, scorer, [prompt[:20] + [7] * 10], chunk_size=64, new_tokens=1)
    earlier = run(model, scorer, [[7] + prompt[1:]], chunk_size=64, new_tokens=1)
    n_layers = describe(model).n_layers
    for layer in range(n_layers):
        for position in range(20):
            torch.testing.assert_close(later[0, layer, position], base[0, layer, position])
    # the token at position 3 sees position 0 through its convolution only (layer 0: no attention before it)
    assert not torch.allclose(earlier[0, 0, 3], base[0, 0, 3])
    torch.testing.assert_close(earlier[0, 0, 4], base[0, 0, 4])  # 4 tokens back: out of its context of 3


def test_a_branch_of_a_shared_prefill_scores_as_its_own_prefill(testbed, scorer):
    model, _ = testbed
    prompts = [list(range(5, 40)), list(range(50, 70))]
    recording = Recording(scorer)
    pre = prefill(model, prompts)
    pre.branch(Policy("local", recording, Threshold(tau=-1e9, window=4, sinks=1)), 4, eos_token_id=[], evict_every=1)
    branched = scores_by_position(recording.calls, describe(model).n_layers)
    own = run(model, scorer, prompts, chunk_size=64, new_tokens=4)
    assert branched.keys() == own.keys()
    for key, value in own.items():
        torch.testing.assert_close(branched[key], value, atol=2e-5, rtol=1e-5)


def test_the_cache_keeps_recent_hidden_states_per_row_through_padding_forks_and_restarts():
    cache = CompactCache(1)
    layer = cache.layers[0]
    first = torch.arange(1.0, 13.0).view(2, 3, 2)
    real = torch.tensor([[True, True, True], [False, True, True]])  # row 1: one padding token first
    previous, arranged, source = layer.advance_recent(first, real, 2)
    assert source.tolist() == [[0, 1, 2], [-1, 1, 2]]  # row 1's padding moved first, a previous token in its slot
    stream = torch.cat([previous, arranged], dim=1)  # each row: 2 previous tokens (zeros: before the start), then its own
    torch.testing.assert_close(stream[0], torch.cat([torch.zeros(2, 2), first[0]]))
    torch.testing.assert_close(stream[1, 1:], torch.cat([torch.zeros(2, 2), first[1, 1:]]))
    twin = cache.fork()
    previous, _, _ = layer.advance_recent(torch.zeros(2, 1, 2), torch.tensor([[True], [False]]), 2)
    torch.testing.assert_close(previous[0], first[0, 1:])
    torch.testing.assert_close(layer.recent[1], first[1, 1:])  # row 1 fed padding only: its previous tokens stay
    torch.testing.assert_close(twin.layers[0].recent, first[:, 1:])  # the fork has its own copy
    cache.real_seen = torch.tensor([5, 5])
    cache.restart_row(1)
    assert layer.recent[1].abs().sum() == 0 and layer.recent[0].abs().sum() > 0


def test_rows_padded_between_their_tokens_score_as_if_alone(testbed, scorer):
    """Rows fed different numbers of tokens in one forward (the env's batches): padding in the middle of a row's
    stream is skipped, its previous tokens are its real ones."""
    model, _ = testbed
    tokens = torch.randint(5, 800, (2, 12), generator=torch.Generator().manual_seed(5))
    feeds = [(tokens[:, :4], None), (tokens[:, 4:9], [5, 2]), (tokens[:, 9:12], [3, 3])]  # row 1 lags: 2 of 5, ...
    policy = Policy("local", scorer, Threshold(tau=-1e9, window=64, sinks=1))
    with evicting(model, policy) as run:
        cache, fed, masks = run.new_cache(), [[], []], []
        for ids, counts in feeds:
            counts = counts or [ids.shape[1]] * 2
            step = torch.zeros_like(ids)
            real = torch.zeros(ids.shape, dtype=torch.long)
            for row, count in enumerate(counts):  # left-padded: each row's next `count` tokens at the end
                take = tokens[row, len(fed[row]) : len(fed[row]) + count]
                step[row, ids.shape[1] - count :] = take
                real[row, ids.shape[1] - count :] = 1
                fed[row] += take.tolist()
            masks.append(real)
            model(input_ids=step, attention_mask=torch.cat(masks, 1), cache=cache)
    ragged = stored_scores(cache)
    assert len(ragged) == (12 + 9) * describe(model).n_layers  # row 1 fed 4 + 2 + 3 tokens
    for row in range(2):
        with evicting(model, policy) as run:
            alone = run.new_cache()
            model(input_ids=torch.tensor([fed[row]]), cache=alone)
        for (_, layer, position), value in stored_scores(alone).items():
            torch.testing.assert_close(ragged[row, layer, position], value, atol=2e-5, rtol=1e-5, msg=f"row {row}")


def test_a_restarted_row_scores_its_new_sequence_as_a_fresh_run(testbed, scorer):
    """A row restarted while decoded tokens of its old sequence still await scoring (``evict_every`` 4): its new
    tokens' previous tokens are zeros, not the old sequence's (the old ones are dead: no real token precedes)."""
    model, _ = testbed
    old, new = list(range(5, 25)), list(range(100, 112))
    policy = Policy("local", scorer, Threshold(tau=-1e9, window=64, sinks=1))
    with evicting(model, policy, evict_every=4) as run:
        cache = run.new_cache()
        model(input_ids=torch.tensor([old]), cache=cache)
        for token in (30, 31):  # decoded, not scored yet
            model(input_ids=torch.tensor([[token]]), cache=cache)
        run.restart_row(0)
        model(input_ids=torch.tensor([new]), cache=cache)
    with evicting(model, policy) as run:
        fresh = run.new_cache()
        model(input_ids=torch.tensor([new]), cache=fresh)
    restarted, expected = stored_scores(cache), stored_scores(fresh)
    assert restarted.keys() == expected.keys() and len(expected) == len(new) * describe(model).n_layers
    for key, value in expected.items():
        torch.testing.assert_close(restarted[key], value, atol=2e-5, rtol=1e-5)


def test_save_load_round_trip(tmp_path, synthetic):
    X, previous, y, cut = synthetic
    local = KVzapLocal(context=2, width=6, epochs=2).fit(X[:cut], y[:cut], previous=previous[:cut], manifest={"model_fingerprint": "m"})
    local.save(tmp_path / "ck")
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert config["model_type"] == "kvzap_lab_local_mlp" and config["context"] == 2
    loaded = get_policy("local", checkpoint=tmp_path / "ck").scorer
    assert type(loaded) is KVzapLocal and loaded.get_params() == local.get_params() and loaded.context == 2
    np.testing.assert_array_equal(loaded.predict(X[cut:], previous=previous[cut:]), local.predict(X[cut:], previous=previous[cut:]))


def test_checkpoints_of_another_family_are_refused_in_one_line(tmp_path, synthetic):
    X, previous, y, _ = synthetic
    KVzapMLP(width=4, epochs=1).fit(X, y).save(tmp_path / "mlp")
    with pytest.raises(CheckpointError, match=r"^\S+mlp holds a KVzapMLP, not a KVzapLocal: load it as policy 'kvzap_mlp'$"):
        get_policy("local", checkpoint=tmp_path / "mlp")
    KVzapLocal(context=1, width=4, epochs=1).fit(X, y, previous=previous).save(tmp_path / "local")
    with pytest.raises(CheckpointError, match=r"^\S+local holds a KVzapLocal, not a KVzapMLP: load it as policy 'kvzap_local'$"):
        KVzapMLP.load(tmp_path / "local")
    config = json.loads((tmp_path / "mlp" / "config.json").read_text())  # an MLP's tensors filed under this family
    config["kvzap_lab"] |= {"policy": "kvzap_local", "params": KVzapLocal().get_params()}
    (tmp_path / "mlp" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model_type 'kvzap' is not a local-context scorer's"):
        KVzapLocal.load(tmp_path / "mlp")
    config = json.loads((tmp_path / "local" / "config.json").read_text())  # a context that its weights do not have
    config["kvzap_lab"]["params"]["context"] = 3
    (tmp_path / "local" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"context 1 differs from the scorer's parameter context 3$"):
        KVzapLocal.load(tmp_path / "local")


BAD = [
    (dict(context=-1), r"^KVzapLocal: context must be an int in \[0, 64\]; got -1$"),
    (dict(context=65), r"^KVzapLocal: context must be an int in \[0, 64\]; got 65$"),
    (dict(context=2.0), r"^KVzapLocal: context must be an int in \[0, 64\]; got 2.0$"),
    (dict(width=0), r"^KVzapLocal: width must be None or an int >= 1; got 0$"),
    (dict(lr=-1.0), r"^KVzapLocal: lr must be a finite float > 0; got -1.0$"),
]


@pytest.mark.parametrize("params, message", BAD, ids=[str(p) for p, _ in BAD])
def test_bad_options_are_one_line_errors_before_any_work(synthetic, params, message):
    X, previous, y, _ = synthetic
    with pytest.raises(ValueError, match=message):
        KVzapLocal(**params).fit(X, y, previous=previous)


def test_missing_or_short_previous_states_are_one_line_errors(synthetic):
    X, previous, y, _ = synthetic
    with pytest.raises(ValueError, match=r"^kvzap_local reads each row's 4 previous hidden states: previous=\[n, >= 4"):
        KVzapLocal(context=4).fit(X, y)
    with pytest.raises(ValueError, match=r"^previous must be \[n, >= 8, layers, hidden\] = \[4000, >= 8, 2, 24\] "
                                         r"\(context 8\); got \[4000, 4, 2, 24\]$"):
        KVzapLocal(context=8).fit(X, y, previous=previous)
    broken = previous.copy()
    broken[5, 0, 1, 2] = np.nan
    with pytest.raises(ValueError, match=r"^previous must hold finite floats \(hidden states\); clean the dataset$"):
        KVzapLocal(context=4).fit(X, y, previous=broken)
    fitted = KVzapLocal(context=1, width=4, epochs=1).fit(X, y, previous=previous)
    with pytest.raises(ValueError, match=r"^kvzap_local scores from the 1 previous hidden states"):
        fitted.score(torch.zeros(1, 3, 24), 0)
    # float16 previous states (a real model's storage dtype) are read batch by batch in float32
    half = KVzapLocal(context=1, width=4, epochs=1).fit(X, y, previous=torch.from_numpy(previous).half())
    np.testing.assert_allclose(half.predict(X, previous=previous), fitted.predict(X, previous=previous), atol=0.05)


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    """A tiny test-bed dataset whose rows store their 3 previous hidden states."""
    out = tmp_path_factory.mktemp("local") / "data"
    argv = ["--n-sequences", "3", "--context-tokens", "48", "--tokens-per-sequence", "24", "--test-fraction", "0.34",
            "--tasks", "single_needle", "--neighbours", "3", "--out", str(out)]
    assert collect.main(argv) == 0
    return out


def test_collected_neighbours_are_the_hidden_states_of_the_tokens_before(collected, testbed):
    out = collected
    dataset = data.load_dataset(out)
    assert dataset.previous_train.shape == (len(dataset.X_train), 3, *dataset.X_train.shape[1:])
    assert data.load_dataset(out, layers=[1, 3]).previous_train.shape[2] == 2
    checked = 0
    for i in range(1, len(dataset.X_train)):  # consecutive rows of a sequence: one's X is the next one's previous
        same = dataset.groups_train[i] == dataset.groups_train[i - 1]
        gap = int(dataset.positions_train[i] - dataset.positions_train[i - 1])
        if same and 1 <= gap <= 3:
            torch.testing.assert_close(dataset.previous_train[i, 3 - gap], dataset.X_train[i - 1])
            checked += 1
    assert checked >= 5
    first = dataset.positions_train - dataset.positions_train.min()  # offsets 0..2 have zeros before the context
    assert (dataset.previous_train[first == 0] == 0).all()
    _, summary = fit_and_evaluate("local", dataset, dict(context=2, width=4, epochs=1), model=testbed[0])
    assert summary["policy"] == "kvzap_local" and 0 < summary["flops_ratio"] < 0.1


def test_the_study_collects_its_own_dataset_with_the_scorers_neighbours(tmp_path):
    assert default_data_dir(tmp_path, "testbed", "fp", "testbed-fp", KVzapLocal.study_neighbours) == tmp_path / "data" / "testbed-neighbours8"
    assert default_data_dir(tmp_path, "testbed", "fp", "testbed-fp") == tmp_path / "data" / "testbed"


def test_a_study_trial_runs_with_policy_local(collected, tmp_path):
    argv = ["--policy", "local", "--model", "testbed", "--data", str(collected), "--results", str(tmp_path),
            "--tasks", "single_needle", "--samples-per-task", "2", "--context-tokens", "48", "--n-trials", "1",
            "--space", "epochs=2", "--space", "context=0,2", "--verify-samples", "2"]
    assert cli.run(study_cli.main, argv, prog=study_cli.PROG) == 0
    (name,) = optuna.get_all_study_names(f"sqlite:///{tmp_path / 'optuna.db'}")
    (trial,) = [t for t in optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'optuna.db'}").trials
                if t.state.is_finished()]
    assert name.startswith("kvzap_local") and trial.params["context"] in (0, 2)
    result = trial.user_attrs["result"]
    assert 0.0 <= result["r2"] <= 1.0 and 0.0 < result["flops_ratio"] < 0.1
