"""Trainable scorers (ridge, MLP, boosted trees): fit quality, estimator contract, checkpoints, train CLI."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from sklearn.base import clone
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.linear_model import Ridge
from torch import nn

from kvzap_lab import train as train_mod
from kvzap_lab.checkpoint import load_scorer
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


class KVzapReference(nn.Module):
    """The module layout of NVIDIA's KVzapModel (kvpress): one Linear or Linear-GELU-Linear per layer."""

    def __init__(self, input_dim, output_dim, hidden_dim, n_modules):
        super().__init__()
        make = (lambda: nn.Linear(input_dim, output_dim)) if hidden_dim is None else (
            lambda: nn.Sequential(nn.Linear(input_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, output_dim)))
        self.module_list = nn.ModuleList(make() for _ in range(n_modules))

    def forward(self, x):
        return torch.stack([m(x[:, i]) for i, m in enumerate(self.module_list)], dim=1)


@pytest.mark.parametrize("hidden_dim", [None, 6])
def test_kvzap_checkpoint_format_both_ways(tmp_path, data, hidden_dim):
    x = torch.from_numpy(data.X_test)
    # ours -> theirs: strict state-dict load into the kvpress layout gives the same outputs
    ours = (KVzapLinear() if hidden_dim is None else KVzapMLP(**FAST_MLP | {"width": hidden_dim})).fit(data.X_train, data.y_train)
    ours.save(tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["model_type"] == "kvzap"
    assert {k: config[k] for k in ("input_dim", "output_dim", "hidden_dim", "n_modules")} == dict(
        input_dim=HIDDEN, output_dim=KV_HEADS, hidden_dim=hidden_dim, n_modules=N_LAYERS)
    theirs = KVzapReference(HIDDEN, KV_HEADS, hidden_dim, N_LAYERS)
    theirs.load_state_dict(load_file(tmp_path / "ours" / "model.safetensors"), strict=True)
    with torch.no_grad():
        np.testing.assert_allclose(theirs(x).numpy(), ours.predict(data.X_test), atol=1e-4)
    # theirs -> ours: an official checkpoint (no kvzap_lab entry) loads and predicts like the module
    official = KVzapReference(HIDDEN, KV_HEADS, hidden_dim, N_LAYERS)
    (tmp_path / "official").mkdir()
    save_file(official.state_dict(), tmp_path / "official" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "official" / "config.json").write_text(json.dumps(
        {"model_type": "kvzap", "architectures": ["KVzapModel"], "input_dim": HIDDEN, "output_dim": KV_HEADS,
         "hidden_dim": hidden_dim, "n_modules": N_LAYERS}))
    loaded = load_scorer(tmp_path / "official")
    assert isinstance(loaded, KVzapLinear if hidden_dim is None else KVzapMLP)
    with torch.no_grad():
        np.testing.assert_allclose(loaded.predict(x).numpy(), official(x).numpy(), atol=1e-5)


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
    with pytest.raises(TypeError, match="holds a KVzapLinear, not a GBDTScorer"):
        GBDTScorer.load(tmp_path / "ck")
    with pytest.raises(TypeError, match="holds a KVzapLinear, not a KVzapMLP"):
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
    train_mod.main(["--policy", "mlp", "--data", "unused", "--out", str(out), "--set", "epochs=10", "--set", "width=16", "--set", "batch_size=128", "--json"])
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
