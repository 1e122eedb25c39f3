"""Trainable scorers (ridge, MLP, boosted trees): fit quality, estimator contract, checkpoints, train CLI."""

import json

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.linear_model import Ridge

from kvzap_lab import cli
from kvzap_lab import train as train_mod
from kvzap_lab.model import describe, fingerprint, random_tiny_model
from kvzap_lab.policies.gbdt import GBDTScorer, flatten_trees, predict_trees
from kvzap_lab.policies.kvzap_linear import KVzapLinear
from kvzap_lab.policies.kvzap_mlp import KVzapMLP
from kvzap_lab.policy import get_policy
from kvzap_lab.surrogate import (
    ModelMismatchError,
    limited_threads,
    projection_flops_per_token,
    r2_spearman_mse,
    synthetic_split,
)

N_LAYERS, HIDDEN, KV_HEADS = 2, 24, 2
FAST_MLP = dict(epochs=10, batch_size=128, width=16)
FAST_GBDT = dict(max_iter=15, max_rows=3000)


def synthetic(n=5000, seed=0, hidden=HIDDEN, fingerprint_="synthetic-model"):
    return synthetic_split(n, N_LAYERS, hidden, KV_HEADS, seed=seed, model_fingerprint=fingerprint_)


@pytest.fixture(scope="module")
def data():
    return synthetic()


@pytest.fixture(scope="module")
def mlp(data):
    return KVzapMLP(**FAST_MLP).fit(data.X_train, data.y_train, manifest=data.manifest)


def test_ridge_matches_sklearn(data):
    linear = KVzapLinear(alpha=3.0).fit(data.X_train, data.y_train)
    for layer in range(N_LAYERS):
        ref = Ridge(alpha=3.0).fit(data.X_train[:, layer], data.y_train[:, layer])
        W, b = linear.weights_[0]
        np.testing.assert_allclose(W[layer].numpy(), ref.coef_, atol=1e-4)
        np.testing.assert_allclose(b[layer].numpy(), ref.intercept_, atol=1e-4)
    assert linear.flops_per_token() == 2 * HIDDEN * KV_HEADS * N_LAYERS


def test_mlp_beats_linear_on_nonlinear_targets(data, mlp):
    r2_mlp = r2_spearman_mse(data.y_test, mlp.predict(data.X_test))["r2"]
    r2_lin = r2_spearman_mse(data.y_test, KVzapLinear().fit(data.X_train, data.y_train).predict(data.X_test))["r2"]
    assert min(r2_mlp) > 0.8 and min(r2_mlp) > max(r2_lin) + 0.1
    assert len(mlp.validation_mse_) == N_LAYERS
    assert mlp.flops_per_token() == 2 * (HIDDEN * 16 + 16 * KV_HEADS) * N_LAYERS
    default = KVzapMLP(epochs=1).fit(data.X_train[:500], data.y_train[:500])
    assert default.weights_[0][0].shape == (N_LAYERS, HIDDEN // 8, HIDDEN)  # default width hidden/8


def test_mlp_is_a_seeded_sklearn_estimator(data, mlp):
    twin = clone(mlp)
    assert twin.get_params() == mlp.get_params() and not hasattr(twin, "weights_")
    twin.fit(data.X_train, data.y_train)
    np.testing.assert_array_equal(twin.predict(data.X_test), mlp.predict(data.X_test))
    other = clone(mlp).set_params(seed=1, depth=2, width=5).fit(data.X_train, data.y_train)
    assert len(other.weights_) == 3 and not np.array_equal(other.predict(data.X_test), mlp.predict(data.X_test))
    # torch in -> torch out; score() is predict() per layer, transposed to [b, kv_heads, t]
    x = torch.from_numpy(data.X_test[:7])
    assert isinstance(mlp.predict(x), torch.Tensor)
    scores = mlp.score(x[:, 1][None], 1)
    np.testing.assert_allclose(scores[0].T.numpy(), mlp.predict(data.X_test[:7])[:, 1], atol=1e-5)


def test_gbdt_flattened_trees_match_sklearn(data):
    X, y = data.X_train[:, 0], data.y_train[:, 0]
    with limited_threads(1):
        estimators = [HistGradientBoostingRegressor(max_iter=10, max_features=0.5, random_state=h).fit(X, y[:, h]) for h in range(KV_HEADS)]
    ours = predict_trees(flatten_trees(estimators), data.X_test[:, 0].astype(np.float64), chunk=97)
    ref = np.stack([est.predict(data.X_test[:, 0]) for est in estimators], axis=1)
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-9)


def test_gbdt_scorer_fits(data):
    gbdt = GBDTScorer(**FAST_GBDT).fit(data.X_train, data.y_train)
    r2 = r2_spearman_mse(data.y_test, gbdt.predict(data.X_test))["r2"]
    assert min(r2) > 0.4
    stumps = GBDTScorer(**FAST_GBDT, max_depth=1).fit(data.X_train, data.y_train)
    assert stumps.flops_per_token() == N_LAYERS * KV_HEADS * FAST_GBDT["max_iter"]  # one comparison per stump
    assert gbdt.flops_per_token() > 3 * stumps.flops_per_token()


@pytest.mark.parametrize("name, params", [("linear", {}), ("mlp", FAST_MLP), ("gbdt", FAST_GBDT)])
def test_save_load_roundtrip_without_pickle(tmp_path, data, name, params):
    scorer = get_policy(name, **params).scorer.fit(data.X_train, data.y_train, manifest=data.manifest)
    scorer.save(tmp_path / "ck")
    scorer.save(tmp_path / "ck")  # overwriting an existing checkpoint is atomic too
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temp leftovers
    loaded = get_policy(name, checkpoint=tmp_path / "ck").scorer
    assert type(loaded) is type(scorer) and loaded.get_params() == scorer.get_params()
    np.testing.assert_array_equal(loaded.predict(data.X_test), scorer.predict(data.X_test))
    assert loaded.trained_for_["model_fingerprint"] == "synthetic-model"


def test_bad_training_data_is_rejected(data):
    X, y = data.X_train[:200].copy(), data.y_train[:200].copy()
    X[3, 1, 5] = np.nan
    with pytest.raises(ValueError, match=r"X contains 1 NaN/inf values \(first at index \[3, 1, 5\]\)"):
        KVzapLinear().fit(X, y)
    y[0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="y contains 1 NaN/inf"):
        KVzapMLP().fit(data.X_train[:200], y)
    with pytest.raises(ValueError, match=r"y must be log-scores \[n, layers, kv_heads\] matching X"):
        KVzapLinear().fit(data.X_train[:200], data.y_train[:100])
    manifest = data.manifest | {"hidden_size": HIDDEN + 8, "n_kv_heads": 4}
    with pytest.raises(ModelMismatchError, match="hidden_size: model has 32, data has 24, n_kv_heads: model has 4, data has 2"):
        KVzapLinear().fit(data.X_train, data.y_train, manifest=manifest)
    with pytest.raises(RuntimeError, match="not fitted"):
        KVzapMLP().predict(data.X_test)


def test_scorer_refuses_another_model(tmp_path):
    model = random_tiny_model("llama", seed=0)
    spec = describe(model)
    ds = synthetic(n=400, hidden=spec.hidden_size, fingerprint_=fingerprint(model))
    linear = KVzapLinear().fit(ds.X_train, ds.y_train, manifest=ds.manifest)
    linear.check_model(model)  # the model it was trained for
    linear.save(tmp_path / "ck")
    assert get_policy("linear", checkpoint=tmp_path / "ck", model=model).scorer.trained_for_ == linear.trained_for_
    with pytest.raises(ModelMismatchError, match="trained for model fingerprint"):
        get_policy("linear", checkpoint=tmp_path / "ck", model=random_tiny_model("llama", seed=1))
    with pytest.raises(ModelMismatchError, match="n_layers: scorer 2, model 3"):
        linear.check_model(random_tiny_model("llama", seed=0, num_hidden_layers=3))
    with pytest.raises(ModelMismatchError, match="trained for hidden size 64 and 2 layers; got hidden size 32"):
        linear.score(torch.randn(1, 5, 32), 0)
    with pytest.raises(ValueError, match="holds a KVzapLinear, not a GBDTScorer: load it as policy 'kvzap_linear'"):
        GBDTScorer.load(tmp_path / "ck")
    with pytest.raises(ValueError, match="holds a KVzapLinear, not a KVzapMLP"):
        get_policy("mlp", checkpoint=tmp_path / "ck")


def test_flops_ratio_is_analytic():
    model = random_tiny_model("llama", seed=0)
    c = model.config
    head_dim = c.hidden_size // c.num_attention_heads
    per_layer = c.hidden_size * head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads) + 3 * c.hidden_size * c.intermediate_size
    assert projection_flops_per_token(c) == 2 * per_layer * c.num_hidden_layers


def test_train_cli(tmp_path, monkeypatch, capsys, data):
    monkeypatch.setattr(train_mod, "_load_dataset", lambda path, model=None: data)
    out = tmp_path / "run"
    assert 0 == train_mod.main(["--policy", "mlp", "--data", "unused", "--out", str(out), "--set", "epochs=10", "--set", "width=16", "--set", "batch_size=128", "--json"])
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["policy"] == "kvzap_mlp" and summary["params"]["width"] == 16 and summary["params"]["epochs"] == 10
    assert len(summary["per_layer"]["r2"]) == N_LAYERS and summary["r2"] > 0.7 and 0 < summary["spearman"] <= 1
    assert any(line.startswith(" mean") for line in lines)
    assert (out / "pred_vs_true.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "metrics.json").read_text())["r2"] == summary["r2"]
    scorer = get_policy("mlp", checkpoint=out / "scorer").scorer
    r2 = r2_spearman_mse(data.y_test, scorer.predict(data.X_test))["r2"]
    assert np.isclose(np.mean(r2), summary["r2"])
    with pytest.raises(ValueError, match="not trainable"):
        train_mod.main(["--policy", "knorm", "--data", "unused", "--out", str(out)])
    with pytest.raises(ValueError, match="unknown policy 'boosted'; known policies"):
        train_mod.main(["--policy", "boosted", "--data", "unused", "--out", str(out)])


@pytest.mark.slow
def test_train_cli_on_a_collected_dataset(tmp_path):
    """End to end on the real data path: collect a tiny oracle dataset on the test bed, train from the shell."""
    import subprocess
    import sys

    from kvzap_lab.collect import main as collect
    from kvzap_lab.model import load_model

    data_dir, out = tmp_path / "data", tmp_path / "run"
    collect(["--n-sequences", "6", "--context-tokens", "64", "--tokens-per-sequence", "32", "--test-fraction", "0.34",
             "--out", str(data_dir)])
    proc = subprocess.run([sys.executable, "-m", "kvzap_lab.train", "--policy", "linear", "--data", str(data_dir),
                           "--out", str(out), "--json"], capture_output=True, text=True, check=True)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["n_train"] == 4 * 32 and summary["n_test"] == 2 * 32 and len(summary["per_layer"]["r2"]) == 4
    model, _ = load_model("testbed")
    scorer = get_policy("linear", checkpoint=out / "scorer", model=model).scorer
    assert scorer.trained_for_["model_fingerprint"] == fingerprint(model)
    with pytest.raises(ModelMismatchError):
        scorer.check_model(random_tiny_model("llama", seed=0, hidden_size=128, num_hidden_layers=4))


INVALID_PARAMS = [
    ("linear", "alpha", float("inf"), "KVzapLinear: alpha must be a finite float >= 0; got inf"),
    ("linear", "alpha", float("nan"), "alpha must be a finite float >= 0; got nan"),
    ("linear", "alpha", -1.0, "alpha must be a finite float >= 0; got -1.0"),
    ("mlp", "epochs", 0, "KVzapMLP: epochs must be an int >= 1; got 0"),
    ("mlp", "epochs", -1, "epochs must be an int >= 1; got -1"),
    ("mlp", "epochs", 2.5, "epochs must be an int >= 1; got 2.5"),
    ("mlp", "lr", 0.0, r"lr must be a finite float > 0; got 0.0"),
    ("mlp", "lr", float("inf"), r"lr must be a finite float > 0; got inf"),
    ("mlp", "width", 0, "width must be None or an int >= 1; got 0"),
    ("mlp", "depth", 0, "depth must be an int >= 1; got 0"),
    ("mlp", "batch_size", 0, "batch_size must be an int >= 1; got 0"),
    ("mlp", "grad_clip", -1.0, "grad_clip must be a finite float > 0"),
    ("mlp", "validation_fraction", 1.0, r"validation_fraction must be a finite float in \(0, 1\); got 1.0"),
    ("mlp", "seed", -1, "seed must be an int >= 0; got -1"),
    ("mlp", "verbose", "yes", "verbose must be a bool; got 'yes'"),
    ("gbdt", "max_iter", 0, "GBDTScorer: max_iter must be an int >= 1; got 0"),
    ("gbdt", "learning_rate", float("inf"), "learning_rate must be a finite float > 0; got inf"),
    ("gbdt", "max_features", 1.5, r"max_features must be a finite float in \(0, 1\]; got 1.5"),
    ("gbdt", "max_depth", 0, "max_depth must be None or an int >= 1; got 0"),
    ("gbdt", "max_leaf_nodes", 1, "max_leaf_nodes must be an int >= 2; got 1"),
    ("gbdt", "l2_regularization", -0.5, "l2_regularization must be a finite float >= 0"),
    ("gbdt", "max_rows", True, "max_rows must be an int >= 1; got True"),
]


@pytest.mark.parametrize("policy, name, value, message", INVALID_PARAMS, ids=[f"{p}-{n}={v}" for p, n, v, _ in INVALID_PARAMS])
def test_invalid_parameters_are_refused_before_any_work(data, policy, name, value, message):
    X = data.X_train[:50].copy()
    X[0, 0, 0] = np.nan  # data validation would fail too: the parameters are checked first
    scorer = get_policy(policy, **{name: value}).scorer
    with pytest.raises(ValueError, match=message):
        scorer.fit(X, data.y_train[:50])
    assert not hasattr(scorer, "trained_for_")


def test_train_cli_refuses_bad_parameters_with_exit_2(tmp_path, capsys):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "kvzap_lab.train", "--policy", "linear", "--set", "alpha=Infinity",
                           "--data", str(tmp_path / "no-data"), "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == ["python -m kvzap_lab.train: error: KVzapLinear: alpha must be a finite float >= 0; got inf"]
    for argv, message in [
        (["--policy", "mlp", "--set", "epochs=-1"], "KVzapMLP: epochs must be an int >= 1; got -1"),
        (["--policy", "mlp", "--set", "widht=8"], "unexpected keyword argument 'widht'; parameters of 'mlp': width, depth"),
        (["--policy", "mlp", "--set", "width"], "--set takes key=value"),
    ]:
        assert cli.run(train_mod.main, argv + ["--data", str(tmp_path / "no-data"), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and message in err, err
    assert not (tmp_path / "out").exists()
