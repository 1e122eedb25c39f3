"""KVzap-rich (hidden state plus the pair's key, value, ‖W_O,h v‖ and position): features from the engine equal
the fit-time features, causality, fit/predict/save/load, FLOPs, bad options, wrong-family checkpoints, dataset
positions, and a study trial."""

from __future__ import annotations

import json

import numpy as np
import optuna
import pytest
import torch

from kvzap_lab import cli, collect, data, oracle
from kvzap_lab.checkpoint import CheckpointError
from kvzap_lab.engine import generate
from kvzap_lab.kvpress import export_press
from kvzap_lab.model import (SUPPORTED_ARCHITECTURES, capture_attention_inputs, describe, fingerprint, load_model,
                             random_tiny_model)
from kvzap_lab.policies.kvzap_mlp import KVzapMLP
from kvzap_lab.policies.kvzap_rich import FEATURES, KVzapRich, attention_inputs, parse_features
from kvzap_lab.policy import Policy, Scorer, Threshold, get_policy
from kvzap_lab.study import cli as study_cli
from kvzap_lab.surrogate import projection_flops_per_token, r2_spearman_mse
from kvzap_lab.train import fit_and_evaluate, make_scorer

ALL = "+".join(FEATURES)
FAST = dict(epochs=4, batch_size=64, width=8)


@pytest.fixture(scope="module")
def testbed():
    return load_model("testbed", device="cpu")


@pytest.fixture(scope="module")
def oracle_rows(testbed):
    """Oracle rows of eight test-bed contexts: ``X [n, L, H]``, ``y [n, L, K]``, absolute ``positions [n]`` (the
    oracle reads each context after the template's prefix), and the number of rows of the last context."""
    model, tokenizer = testbed
    contexts = collect.task_contexts(tokenizer, ["single_needle", "kv_retrieval"], 8, 96, 7)
    results = oracle.score_contexts(model, tokenizer, [c.ids for c in contexts], return_hidden=True)
    prefix = len(oracle.repeat_template(tokenizer).prefix)
    X = torch.cat([r.hidden for r in results]).numpy()
    y = torch.cat([r.scores.permute(2, 0, 1) for r in results]).numpy()
    positions = torch.cat([prefix + torch.arange(len(r.hidden)) for r in results])
    return X, y, positions, len(results[-1].hidden)


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    """A tiny oracle dataset collected on the test bed."""
    out = tmp_path_factory.mktemp("rich") / "data"
    argv = ["--n-sequences", "3", "--context-tokens", "48", "--tokens-per-sequence", "8", "--test-fraction", "0.34",
            "--tasks", "single_needle", "--out", str(out)]
    assert collect.main(argv) == 0
    return out


@pytest.fixture(scope="module")
def rich(testbed, oracle_rows):
    X, y, positions, held = oracle_rows
    manifest = {"model_fingerprint": fingerprint(testbed[0])}
    return KVzapRich(features=ALL, **FAST).fit(X[:-held], y[:-held], manifest=manifest, model=testbed[0],
                                               positions=positions[:-held])


class Recording(Scorer):
    """Scores with ``inner`` and keeps what the engine passed: ``(layer, hidden, keys, values, positions, out)``."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def score(self, hidden, layer, *, keys=None, values=None, positions=None):
        out = self.inner.score(hidden, layer, keys=keys, values=values, positions=positions)
        self.calls.append((layer, hidden, keys, values, positions, out))
        return out


def engine_calls(model, scorer, prompt: list[int], new_tokens: int = 4, chunk_size: int = 1024) -> list:
    recording = Recording(scorer)
    generate(model, [prompt], Policy("rich", recording, Threshold(tau=-1e9, window=4, sinks=1)), new_tokens,
             eos_token_id=[], chunk_size=chunk_size, evict_every=1)
    return recording.calls


def test_the_engine_passes_the_keys_values_and_positions_the_fit_computes(testbed, rich):
    """Features from the engine's keys, values and positions == features from hidden states and the model's
    attention, in prefill and decoding; so score() == predict() on the same tokens."""
    model, _ = testbed
    prompt = torch.randint(5, 800, (37,), generator=torch.Generator().manual_seed(0)).tolist()
    calls = engine_calls(model, rich, prompt, chunk_size=16)
    assert {c[1].shape[1] for c in calls} >= {16, 5, 1}  # prefill chunks and decoding steps
    n_layers = describe(model).n_layers
    for layer, hidden, keys, values, positions, out in calls:
        k, v = attention_inputs(model, layer, hidden[0], positions[0])
        torch.testing.assert_close(k, keys[0].transpose(0, 1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v, values[0].transpose(0, 1), atol=1e-5, rtol=1e-5)
    steps = [calls[i : i + n_layers] for i in range(0, len(calls), n_layers)]
    for step in steps:  # one chunk or decoding step: every layer's hidden states -> predict's rows
        assert [c[0] for c in step] == list(range(n_layers))
        X = torch.stack([c[1][0] for c in step], dim=1)  # [t, L, H]
        predicted = rich.predict(X.numpy(), positions=step[0][4][0])
        scored = torch.stack([c[5][0].T for c in step], dim=1)  # [t, L, K]
        np.testing.assert_allclose(scored.numpy(), predicted, atol=1e-4, rtol=1e-4)
    assert steps[0][0][4][0].tolist() == list(range(16))  # absolute positions, as the model's RoPE saw them


class Zeros(Scorer):
    def score(self, hidden, layer, *, keys=None, values=None, positions=None):
        return torch.zeros(keys.shape[:3])


@pytest.mark.parametrize("model_type", sorted(SUPPORTED_ARCHITECTURES))
def test_fit_time_keys_and_values_are_the_engines_on_every_supported_architecture(model_type):
    """Each architecture's own projections, norms (Qwen3's k_norm) and RoPE (Gemma3's local one) make the keys."""
    model = random_tiny_model(model_type, seed=3, num_hidden_layers=2 if model_type != "gemma3_text" else 6)
    prompt = torch.randint(3, 128, (45,), generator=torch.Generator().manual_seed(2)).tolist()
    calls = engine_calls(model, Zeros(), prompt, new_tokens=3, chunk_size=20)
    assert len(calls) >= 3 * describe(model).n_layers
    for layer, hidden, keys, values, positions, _ in calls:
        k, v = attention_inputs(model, layer, hidden[0], positions[0])
        torch.testing.assert_close(k, keys[0].transpose(0, 1).float(), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(v, values[0].transpose(0, 1).float(), atol=1e-5, rtol=1e-4)


def test_a_tokens_score_does_not_change_when_later_tokens_arrive(testbed, rich):
    model, _ = testbed
    prompt = torch.randint(5, 800, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    short = engine_calls(model, rich, prompt[:24], new_tokens=1)
    long = engine_calls(model, rich, prompt, new_tokens=1)
    for a, b in zip(short[: describe(model).n_layers], long):  # the one-chunk prefill of each layer
        assert a[0] == b[0]
        torch.testing.assert_close(a[5], b[5][:, :, :24], atol=1e-5, rtol=1e-5)


def test_it_learns_more_of_the_oracle_than_kvzap_mlp_on_the_same_rows(testbed, oracle_rows, rich):
    X, y, positions, held = oracle_rows
    r2_rich = np.mean(r2_spearman_mse(y[-held:], rich.predict(X[-held:], positions=positions[-held:]))["r2"])
    r2_mlp = np.mean(r2_spearman_mse(y[-held:], KVzapMLP(**FAST).fit(X[:-held], y[:-held]).predict(X[-held:]))["r2"])
    assert r2_rich > 0.3 and r2_rich > r2_mlp - 0.05, (r2_rich, r2_mlp)  # no worse on 96-token contexts


def test_flops_count_the_wider_first_map_and_the_quadratic_forms(testbed, rich):
    spec = describe(testbed[0])
    extra = 2 * spec.n_kv_heads * spec.head_dim + spec.n_heads + 1
    mlp = 2 * spec.n_layers * ((spec.hidden_size + extra) * 8 + 8 * spec.n_kv_heads)
    quadratic = spec.n_layers * spec.n_heads * (2 * (spec.head_dim**2 + spec.head_dim) + 1)
    assert rich.flops_per_token() == mlp + quadratic
    assert 0 < rich.flops_per_token() / projection_flops_per_token(testbed[0].config) < 0.1


def test_save_load_round_trip(tmp_path, testbed, oracle_rows, rich):
    X, _, positions, held = oracle_rows
    rich.save(tmp_path / "ck")
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert config["model_type"] == "kvzap_lab_rich_mlp" and config["kvzap_lab"]["params"]["features"] == ALL
    loaded = get_policy("rich", checkpoint=tmp_path / "ck", model=testbed[0]).scorer
    assert type(loaded) is KVzapRich and loaded.get_params() == rich.get_params()
    np.testing.assert_array_equal(loaded.predict(X[-held:], positions=positions[-held:]),
                                  rich.predict(X[-held:], positions=positions[-held:]))
    without_model = KVzapRich.load(tmp_path / "ck")  # scores what the engine passes; predicting from X needs the model
    prompt = list(range(5, 30))
    torch.testing.assert_close(engine_calls(testbed[0], without_model, prompt)[0][5], engine_calls(testbed[0], rich, prompt)[0][5])
    with pytest.raises(ValueError, match=r"^kvzap_rich predicts from hidden states through the model's attention"):
        without_model.predict(X[-held:], positions=positions[-held:])


def test_checkpoints_of_another_family_are_refused_in_one_line(tmp_path, testbed, oracle_rows, rich):
    X, y, _, _ = oracle_rows
    KVzapMLP(width=8, epochs=1).fit(X, y).save(tmp_path / "mlp")
    with pytest.raises(CheckpointError, match=r"^\S+mlp holds a KVzapMLP, not a KVzapRich: load it as policy 'kvzap_mlp'$"):
        get_policy("rich", checkpoint=tmp_path / "mlp")
    rich.save(tmp_path / "rich")
    with pytest.raises(CheckpointError, match=r"^\S+rich holds a KVzapRich, not a KVzapMLP: load it as policy 'kvzap_rich'$"):
        KVzapMLP.load(tmp_path / "rich")
    config = json.loads((tmp_path / "mlp" / "config.json").read_text())  # an MLP's tensors filed under this family
    config["kvzap_lab"] |= {"policy": "kvzap_rich", "params": KVzapRich().get_params()}
    (tmp_path / "mlp" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model_type 'kvzap' is not a rich-input scorer's"):
        KVzapRich.load(tmp_path / "mlp")
    with pytest.raises(ValueError, match=r"kvpress runs KVzap linear and MLP scorers only; got a KVzapRich$"):
        export_press(Policy("rich", rich, Threshold()), tmp_path / "press")  # its MLP reads more than hidden states


BAD = [
    (dict(features="key+query"), r"^KVzapRich: features must be any of key, value, wo_norm, log_position joined with"),
    (dict(features="key+key"), r"^KVzapRich: features must be any of"),
    (dict(features=3), r"^KVzapRich: features must be any of"),
    (dict(width=0), r"^KVzapRich: width must be None or an int >= 1; got 0$"),
    (dict(lr=-1.0), r"^KVzapRich: lr must be a finite float > 0; got -1.0$"),
]


@pytest.mark.parametrize("params, message", BAD, ids=[str(p) for p, _ in BAD])
def test_bad_options_are_one_line_errors_before_any_work(testbed, oracle_rows, params, message):
    X, y, positions, _ = oracle_rows
    with pytest.raises(ValueError, match=message):
        KVzapRich(**params).fit(X, y, model=testbed[0], positions=positions)


def test_missing_inputs_and_another_model_are_one_line_errors(testbed, oracle_rows):
    X, y, positions, _ = oracle_rows
    with pytest.raises(ValueError, match=r"^kvzap_rich computes each row's key, value and ‖W_O v‖ with the model's"):
        KVzapRich(**FAST).fit(X, y, positions=positions)
    with pytest.raises(ValueError, match=r"^kvzap_rich needs each row's absolute position"):
        KVzapRich(**FAST).fit(X, y, model=testbed[0])
    with pytest.raises(ValueError, match=r"^positions must hold one position per row: \d+; got 3$"):
        KVzapRich(**FAST).fit(X, y, model=testbed[0], positions=positions[:3])
    other = random_tiny_model("llama", seed=0)
    with pytest.raises(ValueError, match=r"^kvzap_rich: the data has 4 layers, hidden 128"):
        KVzapRich(**FAST).fit(X, y, model=other, positions=positions)
    with pytest.raises(ValueError, match=r"^kvzap_rich: the data was collected on model fingerprint abc; the model"):
        KVzapRich(**FAST).fit(X, y, manifest={"model_fingerprint": "abc"}, model=testbed[0], positions=positions)
    with pytest.raises(ValueError, match=r"unexpected keyword arguments \['widht'\]; parameters of 'rich': features, width, depth"):
        make_scorer("rich", {"widht": 8})  # the signature is features, then KVzap-MLP's parameters
    assert parse_features("none") == () and parse_features("log_position+key") == ("log_position", "key")


def test_dataset_positions_are_the_positions_the_hidden_states_had(collected, testbed):
    """A collected test-bed dataset: each row's X is the hidden state of the model's forward over the oracle's
    prefix and the context at ``positions_*`` (its stored offset plus the prefix)."""
    model, tokenizer = testbed
    dataset = data.load_dataset(collected)
    prefix = len(oracle.repeat_template(tokenizer).prefix)
    contexts = collect.task_contexts(tokenizer, ["single_needle"], 3, 48, 0)
    offsets = dataset.positions_train - prefix
    assert prefix == 3 and offsets.min() >= 0 and len(dataset.positions_test) == len(dataset.X_test)
    row, sequence = 0, int(dataset.groups_train[0])
    with torch.no_grad(), capture_attention_inputs(model) as hidden:
        model.model(input_ids=torch.tensor([contexts[sequence].prefix + contexts[sequence].ids]))
    at = int(dataset.positions_train[row])
    torch.testing.assert_close(dataset.X_train[row], torch.stack([hidden[i][0, at] for i in sorted(hidden)]),
                               atol=1e-4, rtol=1e-4)
    # what `train` and benchmarks/surrogate_fit.py call: the model and the dataset's positions reach the fit
    _, summary = fit_and_evaluate("rich", dataset, dict(FAST, features="key+log_position"), model=model)
    assert summary["policy"] == "kvzap_rich" and np.isfinite(summary["r2"]) and 0 < summary["flops_ratio"] < 0.1
    with pytest.raises(ValueError, match=r"^kvzap_rich computes each row's key"):
        fit_and_evaluate("rich", dataset, FAST)  # no model: `train --policy rich` without --model


def test_a_study_trial_runs_with_policy_rich(collected, tmp_path):
    argv = ["--policy", "rich", "--model", "testbed", "--data", str(collected), "--results", str(tmp_path),
            "--tasks", "single_needle", "--samples-per-task", "2", "--context-tokens", "48", "--n-trials", "1",
            "--space", "epochs=2", "--space", "features=wo_norm,key+log_position", "--verify-samples", "2"]
    assert cli.run(study_cli.main, argv, prog=study_cli.PROG) == 0
    (name,) = optuna.get_all_study_names(f"sqlite:///{tmp_path / 'optuna.db'}")
    (trial,) = [t for t in optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'optuna.db'}").trials
                if t.state.is_finished()]
    assert name.startswith("kvzap_rich") and trial.params["features"] in ("wo_norm", "key+log_position")
    result = trial.user_attrs["result"]
    assert 0.0 <= result["r2"] <= 1.0 and 0.0 < result["flops_ratio"] < 0.1  # scorer FLOPs / the model's projections
