"""The test-bed training script (a few steps of a tiny config: resumable after kill -9, deterministic) and the
bundled checkpoint's accuracy (short form of `python -m kvzap_lab.testbed eval --json`)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

TINY = [
    "--hidden-size", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1", "--intermediate-size", "64",
    "--tokens-per-step", "700", "--warmup", "2", "--max-context", "256", "--tokenizer-lines", "1500",
]  # fmt: skip


def _train(out, steps, *extra, wait=True):
    cmd = [sys.executable, "-m", "kvzap_lab.testbed", "train", "--out", str(out), "--steps", str(steps), *TINY, *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, timeout=300)


def test_training_resumes_after_kill_and_matches_an_uninterrupted_run(tmp_path):
    steps = 8
    straight = _train(tmp_path / "a" / "model", steps, "--every", "4")
    summary = json.loads(straight.stdout.strip().splitlines()[-1])
    assert summary["step"] == steps

    out = tmp_path / "b" / "model"
    state = out.parent / "model.train_state.pt"
    proc = _train(out, steps, "--every", "1", wait=False)
    deadline = time.time() + 240
    while time.time() < deadline:
        if state.exists() and torch.load(state, weights_only=True)["step"] >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(state, weights_only=True)["step"]
    assert 3 <= killed_at < steps, "the run should have been killed mid-way"
    resumed = _train(out, steps, "--every", "1")
    assert f"resuming from step {killed_at}" in resumed.stderr
    a = load_file(tmp_path / "a" / "model" / "model.safetensors")
    b = load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    meta = json.loads((out / "training.json").read_text())
    assert meta["step"] == steps
    # Resuming with other settings is refused rather than silently mixing two recipes.
    with pytest.raises(subprocess.CalledProcessError) as err:
        _train(out, steps + 1, "--every", "1")
    assert "was written with another config" in err.value.stderr


@pytest.mark.slow
def test_bundled_testbed_meets_accuracy_targets_short_form():
    cmd = [sys.executable, "-m", "kvzap_lab.testbed", "eval", "--json", "--n", "40", "--context-tokens", "512",
           "--tasks", "single_needle,multi_key_needle,copy", "--device", "cpu"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["context_tokens"] == 512
    accuracy = summary["accuracy"]
    # What the bundled model does reliably: retrieve a lone needle and repeat its context (the KVzip pretext).
    # Telling several keys apart (multi_key_needle, 0.2 at 200 samples) is not there yet; see README.
    assert accuracy["single_needle"] >= 0.9
    assert accuracy["copy"] >= 0.95
    assert set(accuracy) == {"single_needle", "multi_key_needle", "copy"}
