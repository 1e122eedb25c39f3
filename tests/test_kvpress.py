"""The kvpress export, lab side: folded thresholds decide as the lab's rule, the press directory is a KVzap checkpoint
plus press settings, and what kvpress cannot express is refused. (kvpress itself runs the exported presses in CI,
in its own venv: .ci/kvpress.sh.)"""

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from kvzap_lab import cli
from kvzap_lab import kvpress as kvpress_mod
from kvzap_lab.checkpoint import load_scorer
from kvzap_lab.kvpress import export_press, fold_thresholds
from kvzap_lab.policies.gbdt import GBDTScorer
from kvzap_lab.policies.kvzap_linear import KVzapLinear
from kvzap_lab.policies.kvzap_mlp import KVzapMLP
from kvzap_lab.policy import Policy, Threshold, TopK, calibrate, get_policy
from kvzap_lab.surrogate import synthetic_split

N_LAYERS, HIDDEN, KV_HEADS = 3, 16, 2


@pytest.fixture(scope="module")
def data():
    return synthetic_split(1500, N_LAYERS, HIDDEN, KV_HEADS, seed=1)


@pytest.fixture(scope="module")
def scorers(data):
    return {"linear": KVzapLinear().fit(data.X_train, data.y_train, manifest=data.manifest),
            "mlp": KVzapMLP(width=4, epochs=2, batch_size=256).fit(data.X_train, data.y_train, manifest=data.manifest)}


def _predict(weights, x):
    for i, (W, b) in enumerate(weights):
        x = torch.einsum("nli,loi->nlo", torch.nn.functional.gelu(x) if i else x, W) + b
    return x


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("per", ["layer", "head"])
def test_folded_thresholds_decide_as_the_lab_rule(data, scorers, kind, per):
    scorer = scorers[kind]
    x = torch.from_numpy(data.X_test)
    lab = scorer.predict(x)
    tau = calibrate(scorer.predict(data.X_train), 0.5, per=per).tau  # taus on the scores' own scale
    folded, T = fold_thresholds(scorer.weights_, tau)
    taus = torch.as_tensor(tau).reshape(N_LAYERS, -1).expand(N_LAYERS, KV_HEADS)
    exported = _predict(folded, x)
    np.testing.assert_allclose(exported.numpy(), (lab - taus + T).numpy(), rtol=0, atol=1e-5)
    assert T == pytest.approx(float(taus.mean()))
    lab_evicts, kvpress_evicts = lab < taus, exported < T
    near_tie = (lab - taus).abs() < 1e-5
    assert 0.3 < lab_evicts.float().mean() < 0.7 and torch.equal(lab_evicts[~near_tie], kvpress_evicts[~near_tie])
    # only the last bias moves
    assert all(torch.equal(W, W2) for (W, _), (W2, _) in zip(scorer.weights_, folded))
    assert all(torch.equal(b, b2) for (_, b), (_, b2) in zip(scorer.weights_[:-1], folded[:-1]))


def test_a_global_tau_leaves_the_scorer_as_it_is(scorers):
    weights = scorers["mlp"].weights_
    assert fold_thresholds(weights, -6.0) == (weights, -6.0)
    assert fold_thresholds(weights, float("-inf"))[1] == float("-inf")  # keep everything: still one threshold
    with pytest.raises(ValueError, match="per-layer or per-head taus must be finite"):
        fold_thresholds(weights, [-6.0, float("inf"), -6.0])
    with pytest.raises(ValueError, match=r"taus of shape \[2, 2\] do not fit a scorer of 3 layers and 2 KV heads"):
        fold_thresholds(weights, [[-6.0, -6.0], [-6.0, -6.0]])


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_export_writes_a_kvzap_checkpoint_and_the_press_settings(tmp_path, data, scorers, kind):
    rule = Threshold(tau=[[-6.5, -5.0], [-6.0, -6.2], [-4.0, -7.5]], window=0, sinks=3)
    export_press(Policy(name=kind, scorer=scorers[kind], rule=rule), tmp_path / "press")
    settings = json.loads((tmp_path / "press" / "press.json").read_text())
    assert settings["threshold"] == pytest.approx(-35.2 / 6) and settings["sliding_window_size"] == 1  # lab: max(window, 1)
    assert (settings["sinks"], settings["decoding"]) == (3, True)
    config = json.loads((tmp_path / "press" / "config.json").read_text())
    assert config["model_type"] == "kvzap" and "kvzap_lab" not in config  # a plain kvpress checkpoint
    keys = set(load_file(tmp_path / "press" / "model.safetensors"))
    assert keys == {f"layers.{i}{'' if kind == 'linear' else f'.{j}'}.{p}" for i in range(N_LAYERS)
                    for j in ((0,) if kind == "linear" else (0, 2)) for p in ("weight", "bias")}
    exported = load_scorer(tmp_path / "press")  # read as any KVzap checkpoint: the folded scorer
    folded, _ = fold_thresholds(scorers[kind].weights_, rule.tau)
    np.testing.assert_allclose(exported.predict(data.X_test), _predict(folded, torch.from_numpy(data.X_test)).numpy(), atol=1e-6)


def test_what_kvpress_cannot_express_is_refused(tmp_path, data, scorers):
    deep = KVzapMLP(width=4, depth=2, epochs=1).fit(data.X_train[:300], data.y_train[:300])
    gbdt = GBDTScorer(max_iter=2, max_rows=300).fit(data.X_train, data.y_train)
    cases = [
        (Policy("budget", scorers["mlp"], TopK(budget=8)), r"kvpress's DMSPress applies one threshold; a TopK rule cannot be expressed"),
        (Policy("deep", deep, Threshold()), r"a KVzap MLP of depth 2 has no kvpress model"),
        (Policy("gbdt", gbdt, Threshold()), r"kvpress runs KVzap linear and MLP scorers only; got a GBDTScorer"),
        (get_policy("knorm"), r"kvpress runs KVzap linear and MLP scorers only; got a KNormScorer"),
        (get_policy("accumulated_attention"), r"got a AccumulatedAttentionScorer"),
        (Policy("unfitted", KVzapLinear(), Threshold()), r"KVzapLinear is not fitted"),
    ]
    for policy, message in cases:
        with pytest.raises((ValueError, RuntimeError), match=message) as err:
            export_press(policy, tmp_path / "press")
        assert "\n" not in str(err.value)
    assert not (tmp_path / "press").exists()


def test_export_cli(tmp_path, capsys, data, scorers):
    scorers["linear"].save(tmp_path / "scorer")
    code = cli.run(kvpress_mod.main, ["--checkpoint", str(tmp_path / "scorer"), "--tau", "[-6, -5, -7]", "--window", "8",
                                      "--out", str(tmp_path / "press")])
    assert code == 0 and "load_press" in capsys.readouterr().out
    settings = json.loads((tmp_path / "press" / "press.json").read_text())
    assert settings["tau"] == [-6.0, -5.0, -7.0] and settings["sliding_window_size"] == 8 and settings["threshold"] == -6.0
    scorer, out = ["--checkpoint", str(tmp_path / "scorer")], ["--out", str(tmp_path / "p2")]
    for argv, message in [
        (scorer + ["--tau=-6,5"] + out, "--tau takes a number or a JSON list"),
        (scorer + ["--tau", "NaN"] + out, r"tau must be a float, a per-layer list or a \[layers\]\[kv_heads\] list without NaN"),
        (["--checkpoint", str(tmp_path / "none")] + out, "scorer checkpoint .*none does not exist"),
    ]:
        assert cli.run(kvpress_mod.main, argv) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.startswith("python -m kvzap_lab.kvpress: error:") and re.search(message, err), err
    assert not (tmp_path / "p2").exists()
