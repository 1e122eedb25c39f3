"""KVzap-shared (one MLP for all layers, with a layer embedding): fit quality, folding into per-layer maps,
checkpoints, bad options, the engine and evaluation, the study's search space."""

from __future__ import annotations

import json

import numpy as np
import optuna
import pytest
import torch
from safetensors.torch import load_file, save_file

from kvzap_lab import cli, collect, evaluate, oracle, tasks
from kvzap_lab.checkpoint import CheckpointError
from kvzap_lab.engine import fused_weights, generate
from kvzap_lab.model import describe, load_model, random_tiny_model
from kvzap_lab.policies.kvzap_linear import KVzapLinear
from kvzap_lab.policies.kvzap_mlp import KVzapMLP
from kvzap_lab.policies.kvzap_shared import KVzapShared, _forward
from kvzap_lab.policy import Policy, Threshold, calibrate, get_policy
from kvzap_lab.study.search import build_space, trainable_factory
from kvzap_lab.studies.space import suggest
from kvzap_lab.surrogate import r2_spearman_mse, synthetic_split

FAST = dict(epochs=10, batch_size=128, width=16, embedding_dim=4)


@pytest.fixture(scope="module")
def data():
    return synthetic_split(5000, n_layers=2, hidden=24, n_kv_heads=2)


@pytest.fixture(scope="module")
def shared(data):
    return KVzapShared(**FAST).fit(data.X_train, data.y_train, manifest=data.manifest)


def one_function_many_layers(n: int, n_layers: int, hidden: int = 24, seed: int = 0):
    """``n`` rows of ``n_layers`` layers whose log-scores are one nonlinear function of the layer's hidden state
    (:func:`synthetic_split`'s, with the same projection in every layer), shifted by a per-layer offset."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, n_layers, hidden)).astype(np.float32)
    z = X @ (rng.normal(size=(hidden, 2)) / np.sqrt(hidden))
    y = 2 * np.tanh(2 * z) + z**2 - 6 + np.arange(n_layers)[:, None] + 0.1 * rng.normal(size=z.shape)
    return X, y.astype(np.float32)


def test_fit_recovers_a_nonlinear_signal_that_the_linear_scorer_cannot(data, shared):
    r2 = r2_spearman_mse(data.y_test, shared.predict(data.X_test))["r2"]
    r2_linear = r2_spearman_mse(data.y_test, KVzapLinear().fit(data.X_train, data.y_train).predict(data.X_test))["r2"]
    assert min(r2) > 0.85 and min(r2) > max(r2_linear) + 0.15
    assert shared.trained_for_ == {"model_fingerprint": "synthetic-model", "n_layers": 2, "hidden_size": 24, "n_kv_heads": 2}
    assert np.isfinite(shared.validation_mse_) and shared.validation_mse_ < 0.3


def test_sharing_one_function_across_layers_needs_fewer_rows_than_one_mlp_per_layer():
    """Eight layers with one function: the shared network sees 8x the rows per weight and beats per-layer MLPs."""
    X, y = one_function_many_layers(1250, n_layers=8)
    X, y, Xt, yt = X[:250], y[:250], X[250:], y[250:]
    params = dict(epochs=30, batch_size=64, width=16, patience=30)
    r2_shared = np.mean(r2_spearman_mse(yt, KVzapShared(embedding_dim=4, **params).fit(X, y).predict(Xt))["r2"])
    r2_mlp = np.mean(r2_spearman_mse(yt, KVzapMLP(**params).fit(X, y).predict(Xt))["r2"])
    assert r2_shared > r2_mlp + 0.05, (r2_shared, r2_mlp)


@pytest.mark.parametrize("depth", [1, 2])
def test_folded_per_layer_maps_predict_what_the_shared_network_does(data, depth):
    scorer = KVzapShared(width=8, embedding_dim=3, depth=depth, epochs=2).fit(data.X_train, data.y_train)
    w, x = scorer.weights_, torch.from_numpy(data.X_test)
    direct = _forward(w, (x - w["x_mean"]) / w["x_std"], torch.arange(2))
    torch.testing.assert_close(scorer.predict(x), direct, atol=1e-5, rtol=1e-5)
    assert len(scorer.maps_) == depth + 1 and (scorer.fused_weights() is None) == (depth > 1)
    # the FLOPs of KVzap-MLP at the same width and depth (the embedding's gains and shifts fold away) ...
    assert scorer.flops_per_token() == 2 * 2 * (24 * 8 + (depth - 1) * 8 * 8 + 8 * 2)
    # ... from fewer parameters than one network per layer
    mlp_params = 2 * (24 * 8 + 8 + (depth - 1) * (8 * 8 + 8) + 8 * 2 + 2)  # two layers, one network each
    assert sum(v.numel() for k, v in w.items() if not k.startswith("x_")) < mlp_params
    # score() for the engine: [b, t, hidden] -> [b, kv_heads, t], the same numbers
    out = scorer.score(x[:6, 1].reshape(2, 3, 24), layer=1)
    torch.testing.assert_close(out, direct[:6, 1].reshape(2, 3, 2).transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_save_load_round_trip_and_integrity_checks(tmp_path, data, shared):
    shared.save(tmp_path / "ck")
    loaded = get_policy("shared", checkpoint=tmp_path / "ck").scorer
    assert type(loaded) is KVzapShared and loaded.get_params() == shared.get_params()
    np.testing.assert_array_equal(loaded.predict(data.X_test), shared.predict(data.X_test))
    assert loaded.trained_for_ == shared.trained_for_
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert config["model_type"] == "kvzap_lab_shared_mlp" and config["kvzap_lab"]["policy"] == "kvzap_shared"

    weights = load_file(tmp_path / "ck" / "model.safetensors")
    tampered = tmp_path / "tampered"
    shared.save(tampered)
    save_file(weights | {"head.bias": weights["head.bias"] + 1}, tampered / "model.safetensors")
    with pytest.raises(CheckpointError, match="does not match the sha256 recorded"):
        KVzapShared.load(tampered)
    del config["kvzap_lab"]["weights_sha256"]  # a file without a digest is still checked value by value
    (tampered / "config.json").write_text(json.dumps(config))
    save_file(weights | {"trunk.0.weight": torch.full_like(weights["trunk.0.weight"], float("nan"))}, tampered / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"trunk.0.weight holds \d+ NaN/inf values"):
        KVzapShared.load(tampered)
    save_file({k: v for k, v in weights.items() if k != "film.0.bias"}, tampered / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"does not fit .*config.json \(depth 1\): missing \['film.0.bias'\]"):
        KVzapShared.load(tampered)
    save_file(weights | {"x_std": -weights["x_std"]}, tampered / "model.safetensors")
    with pytest.raises(CheckpointError, match="x_std holds values <= 0"):
        KVzapShared.load(tampered)
    (tampered / "config.json").write_text(json.dumps(config | {"embedding_dim": 5}))
    save_file(weights, tampered / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"embedding has shape \[2, 4\], but .* makes it \[2, 5\]"):
        KVzapShared.load(tampered)


def test_a_checkpoint_of_another_family_is_refused_in_one_line(tmp_path, data, capsys):
    mlp = KVzapMLP(width=8, epochs=1).fit(data.X_train, data.y_train)
    mlp.save(tmp_path / "mlp")
    for load in (lambda: KVzapShared.load(tmp_path / "mlp"), lambda: get_policy("shared", checkpoint=tmp_path / "mlp")):
        with pytest.raises(CheckpointError, match=r"^\S+mlp holds a KVzapMLP, not a KVzapShared: load it as policy 'kvzap_mlp'$"):
            load()
    # from a CLI: one line and exit code 2 (the family is checked before the model)
    argv = ["--policies", f"shared@{tmp_path / 'mlp'}", "--taus", "-7", "--tasks", "single_needle",
            "--context-tokens", "96", "--n-samples", "2", "--out", str(tmp_path / "eval")]
    assert cli.run(evaluate.main, argv) == 2
    assert capsys.readouterr().err.strip().endswith("mlp holds a KVzapMLP, not a KVzapShared: load it as policy 'kvzap_mlp'")
    # an MLP's tensors filed under this family's name: refused by their model_type, before any tensor is read
    config = json.loads((tmp_path / "mlp" / "config.json").read_text())
    config["kvzap_lab"] |= {"policy": "kvzap_shared", "params": KVzapShared().get_params()}
    (tmp_path / "mlp" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model_type 'kvzap' is not a shared-across-layers scorer's"):
        KVzapShared.load(tmp_path / "mlp")


BAD_OPTIONS = [
    ("width", 0, "width must be None or an int >= 1; got 0"),
    ("embedding_dim", 0, "embedding_dim must be an int >= 1; got 0"),
    ("depth", 1.5, "depth must be an int >= 1; got 1.5"),
    ("lr", 0.0, "lr must be a finite float > 0; got 0.0"),
    ("validation_fraction", 1.0, r"validation_fraction must be a finite float in \(0, 1\); got 1.0"),
    ("batch_size", True, "batch_size must be an int >= 1; got True"),
    ("weight_decay", float("nan"), "weight_decay must be a finite float >= 0; got nan"),
]


@pytest.mark.parametrize("name, value, message", BAD_OPTIONS, ids=[f"{n}={v}" for n, v, _ in BAD_OPTIONS])
def test_options_out_of_range_are_refused_before_any_work(data, name, value, message):
    with pytest.raises(ValueError, match=f"^KVzapShared: {message}$"):
        KVzapShared(**{name: value}).fit(data.X_train, data.y_train)


def test_too_few_rows_for_a_validation_split_is_a_clear_error(data):
    with pytest.raises(ValueError, match="1 training rows are too few to carve a validation split of 0.05"):
        KVzapShared().fit(data.X_train[:1], data.y_train[:1])


class PlainScorer:
    """The scorer seen only through ``score()``: the engine cannot fuse it."""

    accumulates_attention = False

    def __init__(self, inner):
        self.inner = inner

    def score(self, hidden, layer, **kwargs):
        return self.inner.score(hidden, layer, **kwargs)


def test_the_engine_evicts_with_it_fused_at_depth_1_and_through_score_deeper():
    model = random_tiny_model("llama", seed=9)
    spec, gen = describe(model), torch.Generator().manual_seed(0)
    X = torch.randn(256, spec.n_layers, spec.hidden_size, generator=gen).numpy()
    y = torch.randn(256, spec.n_layers, spec.n_kv_heads, generator=gen).numpy()
    rule = Threshold(tau=0.0, window=4, sinks=1)
    rows = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (40, 29)]
    for depth in (1, 2):
        scorer = KVzapShared(depth=depth, epochs=1).fit(X, y)
        fused, plain = Policy("shared", scorer, rule), Policy("plain", PlainScorer(scorer), rule)
        assert (fused_weights(model, fused) is not None) == (depth == 1) and fused_weights(model, plain) is None
        a = generate(model, rows, fused, 12, eos_token_id=[], chunk_size=16)
        b = generate(model, rows, plain, 12, eos_token_id=[], chunk_size=16)
        assert a.tokens == b.tokens
        assert a.compression.overall == pytest.approx(b.compression.overall) and a.compression.overall > 0.1


def test_fitted_on_the_test_bed_oracle_it_compresses_needle_prompts():
    model, tokenizer = load_model("testbed", device="cpu")
    contexts = collect.task_contexts(tokenizer, ["single_needle"], 6, 96, 1000)
    results = oracle.score_contexts(model, tokenizer, [c.ids for c in contexts], return_hidden=True)
    X = torch.cat([r.hidden for r in results]).numpy()
    y = torch.cat([r.scores.permute(2, 0, 1) for r in results]).numpy()
    held = len(results[-1].hidden)  # the last context's tokens
    scorer = KVzapShared(epochs=10, batch_size=64).fit(X[:-held], y[:-held])
    assert np.mean(r2_spearman_mse(y[-held:], scorer.predict(X[-held:]))["r2"]) > 0.35  # it learned the oracle (0.45)
    scorer.check_model(model)
    rule = calibrate(scorer.predict(X), 0.5, window=16)
    samples = tasks.make_samples("single_needle", tokenizer, 4, 96, seed=0)
    end = tokenizer.convert_tokens_to_ids(tasks.END)
    result = evaluate.run_cell(model, Policy("shared", scorer, rule), samples, end, batch_size=4, chunk_size=32)
    assert result["compression"] > 0.25 and 0.0 <= result["accuracy"] <= 1.0


def test_the_study_finds_its_search_space_under_both_names():
    spec = describe(random_tiny_model("llama", seed=0))
    scores = np.zeros((10, spec.n_layers, spec.n_kv_heads))
    for name in ("shared", "kvzap_shared"):
        space = build_space(name, trainable_factory(name), spec, scores, ["depth=1,2"])
        assert {"width", "embedding_dim", "depth", "lr", "epochs", "weight_decay"} == set(space.scorer)
        baseline = space.baseline(-7.0)
        assert baseline["width"] == spec.hidden_size // 8 and baseline["embedding_dim"] == 8 and baseline["depth"] == 1
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    params = suggest(trial, space.scorer)
    KVzapShared(**params)._check_params()  # every sampled point is a valid scorer
