"""Scorer checkpoints: kvpress's KVzap layout both ways (against files real kvpress wrote), checksums, and every
broken checkpoint refused with one line naming the file."""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from kvzap_lab.checkpoint import CheckpointError, load_scorer
from kvzap_lab.policies.gbdt import GBDTScorer
from kvzap_lab.policies.kvzap_linear import KVzapLinear
from kvzap_lab.policies.kvzap_mlp import KVzapMLP
from kvzap_lab.policy import get_policy
from kvzap_lab.surrogate import synthetic_split

GOLDEN = Path(__file__).parent / "golden" / "kvpress"
# the golden models' shapes (tests/golden/kvpress/make_golden.py)
INPUT_DIM, OUTPUT_DIM, N_MODULES, WIDTH = 16, 3, 2, 6


def _golden(name):
    io = load_file(GOLDEN / name / "predictions.safetensors")
    return io["x"], io["y"]


@pytest.fixture(scope="module")
def data():
    return synthetic_split(1200, N_MODULES, INPUT_DIM, OUTPUT_DIM, seed=0)


@pytest.fixture(scope="module")
def trained(data):
    """A lab linear and MLP scorer of the golden models' shapes."""
    linear = KVzapLinear().fit(data.X_train, data.y_train, manifest=data.manifest)
    mlp = KVzapMLP(width=WIDTH, epochs=2, batch_size=256).fit(data.X_train, data.y_train, manifest=data.manifest)
    return {"kvzap_linear": linear, "kvzap_mlp": mlp}


@pytest.mark.parametrize("name, cls", [("kvzap_linear", KVzapLinear), ("kvzap_mlp", KVzapMLP)])
def test_kvpress_written_checkpoints_load_and_predict_as_kvpress(tmp_path, name, cls):
    x, y = _golden(name)
    scorer = load_scorer(GOLDEN / name)
    assert type(scorer) is cls and scorer.trained_for_["model_fingerprint"] is None
    assert (scorer.trained_for_["n_layers"], scorer.trained_for_["hidden_size"]) == (N_MODULES, INPUT_DIM)
    np.testing.assert_allclose(scorer.predict(x).numpy(), y.numpy(), rtol=0, atol=1e-6)
    # the older module_list.* names of the same weights load too
    legacy = load_file(GOLDEN / name / "model.safetensors")
    shutil.copytree(GOLDEN / name, out := tmp_path / name)
    save_file({k.replace("layers.", "module_list.", 1): v for k, v in legacy.items()}, out / "model.safetensors")
    np.testing.assert_allclose(load_scorer(out).predict(x).numpy(), y.numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["kvzap_linear", "kvzap_mlp"])
def test_lab_checkpoints_have_exactly_kvpress_keys_shapes_and_config(tmp_path, trained, name):
    trained[name].save(tmp_path / "ck")
    ours, theirs = load_file(tmp_path / "ck" / "model.safetensors"), load_file(GOLDEN / name / "model.safetensors")
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    assert all(v.dtype == torch.float32 for v in ours.values())
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    golden_config = json.loads((GOLDEN / name / "config.json").read_text())
    kvpress_fields = {k: v for k, v in golden_config.items() if k != "transformers_version"}
    assert {k: config[k] for k in kvpress_fields} == kvpress_fields  # model_type, dims, architectures, dtype
    assert set(config) - set(golden_config) == {"kvzap_lab"}  # the lab's facts live where kvpress ignores them
    sha = hashlib.sha256((tmp_path / "ck" / "model.safetensors").read_bytes()).hexdigest()
    assert config["kvzap_lab"]["weights_sha256"] == sha
    assert config["kvzap_lab"]["trained_for"]["model_fingerprint"] == "synthetic-model"


def test_lab_maps_are_kvpress_modules(trained):
    """The lab's prediction is a plain nn.Linear / Linear-GELU-Linear of the saved weights (what kvpress runs)."""
    x = torch.randn(9, N_MODULES, INPUT_DIM) * 2
    for scorer in trained.values():
        modules = []
        for layer in range(N_MODULES):
            maps = [torch.nn.Linear(INPUT_DIM if i == 0 else W.shape[2], W.shape[1]) for i, (W, _) in enumerate(scorer.weights_)]
            for m, (W, b) in zip(maps, scorer.weights_):
                m.weight.data, m.bias.data = W[layer].clone(), b[layer].clone()
            modules.append(maps[0] if len(maps) == 1 else torch.nn.Sequential(maps[0], torch.nn.GELU(), maps[1]))
        with torch.no_grad():
            reference = torch.stack([m(x[:, i]) for i, m in enumerate(modules)], dim=1)
        np.testing.assert_allclose(scorer.predict(x).numpy(), reference.numpy(), rtol=0, atol=1e-5)


def _corrupt(ck: Path, case: str) -> str:
    """Break checkpoint ``ck`` (a kvpress golden copy, or a lab save) as ``case`` says; returns the expected message."""
    config_path, weights_path = ck / "config.json", ck / "model.safetensors"
    config, tensors = json.loads(config_path.read_text()), load_file(weights_path)
    if case == "truncated config":
        config_path.write_text(config_path.read_text()[:40])
        return r"config.json is not valid JSON \(.*\): the file is truncated or corrupted"
    if case == "modified weight":  # a lab checkpoint: its sha256 no longer matches
        tensors["layers.0.weight"][0, 0] = 1.5e37
        save_file(tensors, weights_path, metadata={"format": "pt"})
        return r"model.safetensors does not match the sha256 recorded in .*config.json: the weights were modified"
    if case == "128-dim config, 16-dim weights":
        config_path.write_text(json.dumps(config | {"input_dim": 128}))
        return r"model.safetensors: layers.0.weight has shape \[3, 16\], but .*config.json \(input_dim 128, hidden_dim None, output_dim 3\) makes it \[3, 128\]"
    if case == "neither layout":
        save_file({k.replace("layers.", "encoder."): v for k, v in tensors.items()}, weights_path)
        return r"model.safetensors has neither KVzap tensor layout \(expected layers.\{i\}.\* as kvpress writes, or the older module_list"
    if case == "both layouts":
        save_file(tensors | {k.replace("layers.", "module_list."): v.clone() for k, v in tensors.items()}, weights_path)
        return r"model.safetensors has both KVzap tensor layouts"
    if case == "missing tensor":
        del tensors["layers.1.bias"]
        save_file(tensors, weights_path)
        return r"model.safetensors does not fit .*config.json \(n_modules 2, depth 0\): missing layers.1.bias"
    if case == "unexpected tensor":
        save_file(tensors | {"layers.2.weight": tensors["layers.1.weight"].clone()}, weights_path)
        return r"does not fit .*config.json \(n_modules 2, depth 0\): unexpected layers.2.weight"
    if case == "non-finite weight":
        tensors["layers.1.bias"][2] = float("nan")
        save_file(tensors, weights_path)
        return r"model.safetensors: tensor layers.1.bias holds 1 NaN/inf values; the scorer is broken"
    if case == "absurd weight":
        tensors["layers.0.weight"][1, 3] = -1.5e37
        save_file(tensors, weights_path)
        return r"model.safetensors: tensor layers.0.weight holds \|w\| = 1.5e\+37 > 1e\+06"
    if case == "not safetensors":
        weights_path.write_bytes(b"\x00" * 40)
        return r"model.safetensors is not a readable safetensors file"
    if case == "config not an object":
        config_path.write_text("[1, 2]")
        return r"config.json must hold a JSON object; got list"
    if case == "bad n_modules":
        config_path.write_text(json.dumps(config | {"n_modules": 0}))
        return r"config.json: n_modules must be an int >= 1; got 0"
    if case == "invalid recorded params":
        config["kvzap_lab"]["params"]["alpha"] = -1.0
        config_path.write_text(json.dumps(config))
        return r"config.json: KVzapLinear: alpha must be a finite float >= 0; got -1.0"
    if case == "trained_for disagrees":
        config["kvzap_lab"]["trained_for"]["n_kv_heads"] = 8
        config_path.write_text(json.dumps(config))
        return r"config.json does not fit its weights: n_kv_heads 8 vs 3 in the weights"
    if case == "neither lab nor kvzap config":
        config_path.write_text(json.dumps({"model_type": "llama"}))
        return r"config.json is neither a kvzap-lab scorer nor a KVzap checkpoint \(model_type 'llama'\)"
    raise AssertionError(case)


LAB_CASES = {"modified weight", "invalid recorded params", "trained_for disagrees"}  # need the lab's kvzap_lab entry


@pytest.mark.parametrize("case", [
    "truncated config", "modified weight", "128-dim config, 16-dim weights", "neither layout", "both layouts",
    "missing tensor", "unexpected tensor", "non-finite weight", "absurd weight", "not safetensors", "config not an object",
    "bad n_modules", "invalid recorded params", "trained_for disagrees", "neither lab nor kvzap config",
])
def test_broken_checkpoints_are_refused_with_one_line_naming_the_file(tmp_path, trained, case):
    ck = tmp_path / "ck"
    if case in LAB_CASES:
        trained["kvzap_linear"].save(ck)
    else:
        shutil.copytree(GOLDEN / "kvzap_linear", ck)
    message = _corrupt(ck, case)
    with pytest.raises(CheckpointError, match=message) as err:
        get_policy("linear", checkpoint=ck)
    assert "\n" not in str(err.value) and str(ck) in str(err.value)


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"scorer checkpoint {tmp_path / 'nope'} does not exist"):
        load_scorer(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="is not a scorer checkpoint: missing model.safetensors"):
        load_scorer(tmp_path / "half")


def test_broken_weights_are_refused_at_save_and_the_old_checkpoint_stays(tmp_path, trained, data):
    scorer = trained["kvzap_mlp"]
    scorer.save(tmp_path / "ck")
    before = load_scorer(tmp_path / "ck").predict(data.X_test)
    for bad in (float("inf"), 2e6):
        broken = KVzapMLP(width=WIDTH).set_params(**scorer.get_params())
        broken.trained_for_ = scorer.trained_for_
        broken.weights_ = [(W.clone(), b.clone()) for W, b in scorer.weights_]
        broken.weights_[1][0][1, 2, 3] = bad
        with pytest.raises(CheckpointError, match=r"the weights to save to .*ck/model.safetensors: tensor layers.1.2.weight holds"):
            broken.save(tmp_path / "ck")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temporaries left
    np.testing.assert_array_equal(load_scorer(tmp_path / "ck").predict(data.X_test), before)


def test_boosted_tree_checkpoints_are_checked(tmp_path, data):
    gbdt = GBDTScorer(max_iter=3, max_rows=500).fit(data.X_train, data.y_train, manifest=data.manifest)
    gbdt.save(tmp_path / "ck")
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert config["model_type"] == "kvzap_lab_gbdt" and len(config["kvzap_lab"]["weights_sha256"]) == 64
    np.testing.assert_array_equal(load_scorer(tmp_path / "ck").predict(data.X_test), gbdt.predict(data.X_test))
    config_path, weights_path = tmp_path / "ck" / "config.json", tmp_path / "ck" / "model.safetensors"
    tensors, good = load_file(weights_path), weights_path.read_bytes()
    inner = np.flatnonzero(~tensors["layer0.is_leaf"].numpy())[0]
    tensors["layer0.left"][inner] = inner  # a cycle: the traversal would never end
    save_file(tensors, weights_path)
    config["kvzap_lab"]["weights_sha256"] = hashlib.sha256(weights_path.read_bytes()).hexdigest()
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model.safetensors \(layer 0\): tree arrays point outside their nodes"):
        load_scorer(tmp_path / "ck")
    weights_path.write_bytes(good)
    config["kvzap_lab"]["weights_sha256"] = hashlib.sha256(good).hexdigest()
    config["kvzap_lab"]["trained_for"]["hidden_size"] = 2  # the trees split on features beyond it
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config.json does not fit its weights: hidden_size 2 vs features up to \d+"):
        load_scorer(tmp_path / "ck")
