"""Bad input, table-driven, across the CLIs (collect, train, evaluate, testbed, study, kvpress): each row is one
case and must end with exit code 2 and one line naming the problem, before any work starts.

Each CLI's ``main`` runs in-process through :func:`kvzap_lab.cli.run` (what its ``python -m`` entry does), so the
table is fast; argparse's own errors exit through SystemExit with the same code and a last line ``error: ...``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from kvzap_lab import cli, collect, evaluate, kvpress, study, testbed, train
from kvzap_lab.policies.kvzap_linear import KVzapLinear
from kvzap_lab.surrogate import synthetic_split


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, Path]:
    """A good scorer checkpoint and its broken variants, a non-LLM model dir, a plain file (an output location
    below it cannot be created), and a scratch folder."""
    root = tmp_path_factory.mktemp("bad_input")
    split = synthetic_split(400, 2, 64, 2, seed=0, model_fingerprint="synthetic-model")
    good = root / "checkpoint"
    KVzapLinear().fit(split.X_train, split.y_train, manifest=split.manifest).save(good)

    def variant(name, change) -> Path:
        path = root / name
        shutil.copytree(good, path)
        change(path)
        return path

    def truncate(path):
        text = (path / "config.json").read_text()
        (path / "config.json").write_text(text[: len(text) // 3])

    def widen(path):  # a 128-dim config over 64-dim weights
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps(config | {"input_dim": 128}))

    def poison(path):  # a NaN weight, with its sha256 recorded again: the weight check itself must refuse it
        tensors = load_file(path / "model.safetensors")
        next(iter(tensors.values())).view(-1)[0] = float("nan")
        save_file(tensors, path / "model.safetensors")
        config = json.loads((path / "config.json").read_text())
        config["kvzap_lab"]["weights_sha256"] = hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
        (path / "config.json").write_text(json.dumps(config))

    bert = root / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    a_file = root / "a_file"
    a_file.write_text("not a directory")
    return {"good": good, "truncated": variant("truncated", truncate), "wide": variant("wide", widen),
            "nan": variant("nan", poison), "bert": bert, "file": a_file, "tmp": root}


EVAL = ["--tasks", "single_needle", "--context-tokens", "64", "--n-samples", "1"]  # a tiny grid, should it start

# (id, CLI main, argv with {placeholders} from `paths`, what the one line must say)
CASES = [
    # a model that does not exist, and a config that is no causal LM
    ("collect-missing-model", collect.main, ["--model", "{tmp}/nope", "--out", "{tmp}/c1"], "cannot load a model config from"),
    ("evaluate-missing-model", evaluate.main, ["--model", "{tmp}/nope", "--out", "{tmp}/e1.jsonl"], "cannot load a model config from"),
    ("testbed-missing-model", testbed.main, ["eval", "--model", "{tmp}/nope"], "cannot load a model config from"),
    ("collect-non-llm", collect.main, ["--model", "{bert}", "--out", "{tmp}/c2"], "model type 'bert' is not supported"),
    ("evaluate-non-llm", evaluate.main, ["--model", "{bert}", "--out", "{tmp}/e2.jsonl"], "model type 'bert' is not supported"),
    # bad checkpoints, named by file
    ("evaluate-truncated-config", evaluate.main, ["--policies", "kvzap_linear@{truncated}", "--out", "{tmp}/e3.jsonl", *EVAL],
     "truncated/config.json is not valid JSON"),
    ("kvpress-truncated-config", kvpress.main, ["--checkpoint", "{truncated}", "--out", "{tmp}/k1"], "truncated/config.json is not valid JSON"),
    ("evaluate-128-dim-config-64-dim-weights", evaluate.main, ["--policies", "kvzap_linear@{wide}", "--out", "{tmp}/e4.jsonl", *EVAL],
     "has shape [2, 64], but"),
    ("kvpress-128-dim-config-64-dim-weights", kvpress.main, ["--checkpoint", "{wide}", "--out", "{tmp}/k2"], "(input_dim 128"),
    ("evaluate-nan-weights", evaluate.main, ["--policies", "kvzap_linear@{nan}", "--out", "{tmp}/e5.jsonl", *EVAL], "holds 1 NaN/inf values"),
    ("kvpress-nan-weights", kvpress.main, ["--checkpoint", "{nan}", "--out", "{tmp}/k3"], "holds 1 NaN/inf values"),
    # scorer parameters refused before training
    ("train-alpha-infinity", train.main, ["--policy", "linear", "--data", "{tmp}", "--out", "{tmp}/t1", "--set", "alpha=Infinity"],
     "alpha must be a finite float >= 0; got inf"),
    ("train-epochs-negative", train.main, ["--policy", "mlp", "--data", "{tmp}", "--out", "{tmp}/t2", "--set", "epochs=-1"],
     "epochs must be an int >= 1; got -1"),
    ("train-local-context-negative", train.main, ["--policy", "local", "--data", "{tmp}", "--out", "{tmp}/t4", "--set",
     "context=-1"], "KVzapLocal: context must be an int in [0, 64]; got -1"),
    ("train-local-context-too-long", train.main, ["--policy", "local", "--data", "{tmp}", "--out", "{tmp}/t5", "--set",
     "context=65"], "KVzapLocal: context must be an int in [0, 64]; got 65"),
    ("collect-neighbours-negative", collect.main, ["--neighbours", "-1", "--out", "{tmp}/c5"], "--neighbours: must be an int >= 0"),
    # a checkpoint of one scorer family loaded as another
    ("evaluate-linear-checkpoint-as-local", evaluate.main, ["--policies", "kvzap_local@{good}", "--out", "{tmp}/e7.jsonl", *EVAL],
     "holds a KVzapLinear, not a KVzapLocal: load it as policy 'kvzap_linear'"),
    # counts
    ("testbed-eval-n-0", testbed.main, ["eval", "--n", "0"], "must be an int >= 1; got 0"),
    ("testbed-eval-n-samples-0", testbed.main, ["eval", "--n-samples", "0"], "must be an int >= 1; got 0"),
    ("testbed-train-steps-0", testbed.main, ["train", "--steps", "0", "--out", "{tmp}/tb"], "--steps must be >= 1; got 0"),
    ("testbed-train-steps-negative", testbed.main, ["train", "--steps", "-5", "--out", "{tmp}/tb"], "--steps must be >= 1; got -5"),
    ("evaluate-n-samples-0", evaluate.main, ["--n-samples", "0"], "--n-samples: must be an int >= 1; got 0"),
    ("collect-n-sequences-0", collect.main, ["--n-sequences", "0", "--out", "{tmp}/c3"], "--n-sequences: must be an int >= 1; got 0"),
    ("study-n-trials-0", study.main, ["--policy", "mlp", "--n-trials", "0", "--results", "{tmp}/s1"], "n-trials"),
    # thresholds
    ("evaluate-nan-tau", evaluate.main, ["--taus", "nan"], "--taus: must be a finite number; got nan"),
    ("kvpress-nan-tau", kvpress.main, ["--checkpoint", "{good}", "--tau", "NaN", "--out", "{tmp}/k4"], "NaN"),
    # unknown tasks
    ("evaluate-unknown-task", evaluate.main, ["--tasks", "nope"], "unknown ['nope']; choose from single_needle"),
    ("testbed-unknown-task", testbed.main, ["eval", "--tasks", "nope"], "unknown ['nope']; choose from single_needle"),
    ("collect-unknown-task", collect.main, ["--tasks", "nope", "--out", "{tmp}/c4"], "unknown tasks ['nope']"),
    ("study-max-flops-ratio-negative", study.main, ["--policy", "mlp", "--max-flops-ratio", "-0.1", "--results", "{tmp}/s4"],
     "argument --max-flops-ratio: must be in [0, 1]; got -0.1"),
    ("study-max-flops-ratio-above-1", study.main, ["--policy", "mlp", "--max-flops-ratio", "2", "--results", "{tmp}/s5"],
     "argument --max-flops-ratio: must be in [0, 1]; got 2"),
    ("study-unknown-task", study.main, ["--policy", "mlp", "--tasks", "nope", "--results", "{tmp}/s2"], "nope"),
    # output locations that cannot be written (below a file: refused as root too)
    ("collect-unwritable-out", collect.main, ["--out", "{file}/sub"], "a_file is a file, not a directory"),
    ("train-unwritable-out", train.main, ["--policy", "linear", "--data", "{tmp}", "--out", "{file}/sub"], "a_file is a file, not a directory"),
    ("evaluate-unwritable-out", evaluate.main, ["--out", "{file}/e.jsonl"], "a_file is a file, not a directory"),
    ("testbed-unwritable-out", testbed.main, ["train", "--steps", "1", "--out", "{file}/tb"], "a_file is a file, not a directory"),
    ("kvpress-unwritable-out", kvpress.main, ["--checkpoint", "{good}", "--out", "{file}/press"], "a_file is a file, not a directory"),
    ("study-unwritable-results", study.main, ["--policy", "mlp", "--results", "{file}/s"], "a_file"),
    # a malformed tracking URI, refused at once
    ("train-malformed-tracking-uri", train.main,
     ["--policy", "linear", "--data", "{tmp}", "--out", "{tmp}/t3", "--tracking-uri", "htp:/bad uri"], "unknown scheme 'htp'"),
    ("evaluate-malformed-tracking-uri", evaluate.main, ["--tracking-uri", "htp:/bad uri", "--out", "{tmp}/e6.jsonl"], "unknown scheme 'htp'"),
    ("study-malformed-tracking-uri", study.main, ["--policy", "mlp", "--tracking-uri", "htp:/bad uri", "--results", "{tmp}/s3"],
     "unknown scheme 'htp'"),
]


@pytest.mark.parametrize(("main", "argv", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line(main, argv, message, paths, capsys, monkeypatch):
    monkeypatch.delenv("KVZAP_LAB_DEBUG", raising=False)
    argv = [a.format(**paths) for a in argv]
    try:
        code = cli.run(main, argv)
    except SystemExit as exit_:  # argparse's own errors (usage, then one error line)
        code = exit_.code
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err
    assert "error: " in lines[-1] and message in lines[-1], lines[-1]
    assert [line for line in lines if "error: " in line] == [lines[-1]]  # the problem is said once, on one line
