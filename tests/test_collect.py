"""Training-data collection: shards, manifest, split, resume after kill -9, and loading with integrity checks."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kvzap_lab import collect, data, oracle
from kvzap_lab.data import DatasetError, load_dataset
from kvzap_lab.model import TESTBED_PATH, capture_attention_inputs, fingerprint, load_model, random_tiny_model
from kvzap_lab.tasks import make_samples

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A small checkpoint directory (random Llama with GQA + the test-bed tokenizer) that the CLI can load."""
    from transformers import AutoTokenizer

    from kvzap_lab.testbed import train_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(TESTBED_PATH) if (TESTBED_PATH / "tokenizer.json").exists() else None
    tokenizer = tokenizer or train_tokenizer()
    model = random_tiny_model(
        "llama",
        seed=11,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run_cli(args, capsys):
    code = collect.main([str(a) for a in args] + ["--json"])
    lines = capsys.readouterr().out.strip().splitlines()
    return code, json.loads(lines[-1]) if code == 0 else None


BASE = ["--tasks", "single_needle,copy,kv_retrieval", "--n-sequences", 7, "--context-tokens", 64]
BASE += ["--tokens-per-sequence", 20, "--shard-size", 2, "--batch-size", 3, "--test-fraction", 0.3]


def test_collect_tasks_rows_are_oracle_scores_and_prompt_hidden_states(checkpoint, tmp_path, capsys):
    out = tmp_path / "data"
    code, summary = run_cli(["--model", checkpoint, "--out", out, *BASE], capsys)
    assert code == 0
    assert (summary["sequences_train"], summary["sequences_test"]) == (5, 2)
    assert (summary["n_train"], summary["n_test"]) == (100, 40)
    assert summary["X_shape"] == [100, 2, 64] and summary["y_shape"] == [100, 2, 2]
    model, tokenizer = load_model(checkpoint, device="cpu")
    dataset = load_dataset(out, model)
    assert dataset.X_train.shape == (100, 2, 64) and dataset.y_test.shape == (40, 2, 2)
    assert dataset.X_train.dtype == torch.float32
    assert not set(dataset.groups_train.tolist()) & set(dataset.groups_test.tolist())  # split by sequence
    manifest = dataset.manifest
    assert manifest["complete"] and manifest["model"]["fingerprint"] == fingerprint(model)
    assert manifest["oracle"]["normalize"] and manifest["seed"] == 0 and manifest["n_shards"] == 4

    # every row is the oracle's score and the prompt's hidden state at the sampled token
    contexts = collect.task_contexts(tokenizer, ["single_needle", "copy", "kv_retrieval"], 7, 64, seed=0)
    shard = load_file(str(out / manifest["shards"][0]["file"]))
    sequence = int(shard["sequence"][0])
    rows = shard["sequence"] == sequence
    positions = shard["position"][rows]
    assert len(positions) == 20 and len(set(positions.tolist())) == 20
    context = contexts[sequence]
    scores = oracle.oracle_scores(model, tokenizer, context.ids)
    torch.testing.assert_close(shard["y"][rows], scores[:, :, positions].permute(2, 0, 1), atol=1e-5, rtol=0)
    with torch.no_grad(), capture_attention_inputs(model) as hidden:
        model(torch.tensor([context.prefix + context.ids]))
    start = len(context.prefix)
    expected_x = torch.stack([hidden[i][0, start + positions] for i in range(2)], dim=1)
    torch.testing.assert_close(shard["X"][rows], expected_x, atol=1e-5, rtol=0)

    # a second run resumes everything; other settings are refused; --overwrite replaces
    code, again = run_cli(["--model", checkpoint, "--out", out, *BASE], capsys)
    assert code == 0 and again["shards_written"] == 0 and again["shards_resumed"] == 4
    assert collect.main(["--model", str(checkpoint), "--out", str(out), *map(str, BASE), "--seed", "1"]) == 2
    assert "differ in: seed, split" in capsys.readouterr().err
    too_long = ["--model", checkpoint, "--out", tmp_path / "long", "--tasks", "copy", "--context-tokens", 1010]
    assert collect.main([str(a) for a in too_long]) == 2
    assert "1010 tokens leaves no room for a repeat chunk" in capsys.readouterr().err
    assert not (tmp_path / "long").exists()  # refused before anything is written
    code, replaced = run_cli(["--model", checkpoint, "--out", out, *BASE, "--dtype", "bfloat16", "--overwrite"], capsys)
    assert code == 0 and replaced["shards_written"] == 4
    bf16 = load_dataset(out)
    assert bf16.X_train.dtype == torch.float32
    torch.testing.assert_close(bf16.X_train, dataset.X_train, atol=0.02, rtol=0.01)
    torch.testing.assert_close(bf16.y_train, dataset.y_train)


def test_collect_text_files(checkpoint, tmp_path, capsys):
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text("the red fox sees the owl . " * 30)
    second.write_text("var alpha = 12345 . var beta = alpha . " * 12)
    out = tmp_path / "text"
    args = ["--model", checkpoint, "--out", out, "--text-files", first, second, "--context-tokens", 50]
    code, summary = run_cli(args + ["--n-sequences", 100, "--tokens-per-sequence", 8, "--kvzip"], capsys)
    assert code == 0
    model, tokenizer = load_model(checkpoint, device="cpu")
    windows = collect.text_contexts(tokenizer, [first, second], 100, 50, 0, [])
    assert summary["sequences_train"] + summary["sequences_test"] == len(windows) < 100  # all windows, no more
    dataset = load_dataset(out, model)
    assert dataset.manifest["source"]["kind"] == "text" and not dataset.manifest["oracle"]["normalize"]
    sequence = int(dataset.groups_train[0])
    plain = oracle.oracle_scores(model, tokenizer, windows[sequence].ids, normalize=False)
    positions = collect.sample_positions(len(windows[sequence].ids), 8, seed=0, sequence=sequence)
    rows = dataset.groups_train == sequence
    torch.testing.assert_close(dataset.y_train[rows], plain[:, :, positions].permute(2, 0, 1), atol=1e-5, rtol=0)

    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00 not utf-8")
    with pytest.raises(ValueError, match="bad.txt is not UTF-8"):
        collect.text_contexts(tokenizer, [bad], 4, 50, 0, [])
    with pytest.raises(FileNotFoundError, match="missing.txt does not exist"):
        collect.text_contexts(tokenizer, [tmp_path / "missing.txt"], 4, 50, 0, [])
    with pytest.raises(ValueError, match="unknown tasks \\['nope'\\]"):
        collect.task_contexts(tokenizer, ["nope"], 4, 50, 0)


def small_dataset(tmp_path, model):
    """A dataset written through the data module (two train shards, one test shard)."""
    out = tmp_path / "ds"
    out.mkdir()
    shards = []
    for k, split in enumerate(["train", "train", "test"]):
        rows = {"X": torch.randn(4, 2, 64), "y": torch.randn(4, 2, 2), "sequence": torch.full((4,), k),
                "position": torch.arange(4)}
        name = f"{split}-{k:05d}.safetensors"
        shards.append({"file": name, "split": split, "n": 4, "sha256": data.write_shard(out, name, rows)})
    manifest = {"format": data.FORMAT, "model": {"name": "tiny", "fingerprint": fingerprint(model)},
                "shapes": {"layers": 2, "hidden": 64, "kv_heads": 2}, "shards": shards, "n_shards": 3,
                "complete": True}
    data.write_manifest(out, manifest)
    return out


def test_load_dataset_names_bad_shards_and_other_models(tmp_path):
    model = random_tiny_model("llama", seed=0)
    out = small_dataset(tmp_path, model)
    dataset = load_dataset(out, model)
    assert dataset.X_train.shape == (8, 2, 64) and dataset.X_test.shape == (4, 2, 64)
    assert not list(out.glob("*.tmp"))

    with pytest.raises(DatasetError, match="collected on model 'tiny' .* requested model has fingerprint"):
        load_dataset(out, random_tiny_model("llama", seed=1))

    shard = out / "train-00001.safetensors"
    original = shard.read_bytes()
    shard.write_bytes(original[: len(original) // 2])
    with pytest.raises(DatasetError, match="shard train-00001.safetensors .* corrupt or truncated"):
        load_dataset(out)
    flipped = bytearray(original)
    flipped[-3] ^= 0xFF
    shard.write_bytes(bytes(flipped))
    with pytest.raises(DatasetError, match="train-00001.safetensors .* corrupt or truncated"):
        load_dataset(out)
    shard.unlink()
    with pytest.raises(DatasetError, match="shard train-00001.safetensors listed in .* is missing"):
        load_dataset(out)
    shard.write_bytes(original)

    manifest = data.read_manifest(out)
    manifest["complete"] = False
    data.write_manifest(out, manifest)
    with pytest.raises(DatasetError, match="unfinished collection .* rerun the same collect command"):
        load_dataset(out)
    assert load_dataset(out, allow_partial=True).X_train.shape == (8, 2, 64)
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        load_dataset(tmp_path)


@pytest.mark.slow
def test_collection_survives_kill_9_and_resumes_to_the_same_data(checkpoint, tmp_path, capsys):
    args = ["--model", str(checkpoint), "--tasks", "single_needle,copy", "--n-sequences", "24"]
    args += ["--context-tokens", "64", "--tokens-per-sequence", "16", "--shard-size", "1", "--batch-size", "1"]
    killed, fresh = tmp_path / "killed", tmp_path / "fresh"
    command = [sys.executable, "-m", "kvzap_lab.collect", *args, "--out", str(killed)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        manifest = data.read_manifest(killed) if (killed / data.MANIFEST).exists() else None
        if manifest and len(manifest["shards"]) >= 3:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    manifest = data.read_manifest(killed)
    assert not manifest["complete"], "the collection finished before it could be killed; make it longer"
    listed = {e["file"] for e in manifest["shards"]}
    # A half-written shard is never visible (it is a temporary until complete); a kill between a shard's move into
    # place and the manifest's rewrite leaves that one complete shard unlisted, and the resume writes it again.
    present = {p.name for p in killed.glob("*.safetensors")}
    assert listed <= present and len(present - listed) <= 1
    partial = load_dataset(killed, allow_partial=True)  # every listed shard verifies
    assert len(partial.y_train) + len(partial.y_test) == 16 * len(listed)

    code, summary = run_cli([*args, "--out", killed], capsys)  # the same command again resumes
    assert code == 0 and summary["shards_resumed"] == len(listed) and summary["shards_written"] == 24 - len(listed)
    assert not list(killed.glob("*.tmp"))  # temporaries left by the kill are cleaned on resume
    assert run_cli([*args, "--out", fresh], capsys)[0] == 0
    resumed, uninterrupted = load_dataset(killed), load_dataset(fresh)
    assert [e["sequences"] for e in resumed.manifest["shards"]] != [] and sorted(
        (e["file"], e["sequences"]) for e in resumed.manifest["shards"]
    ) == sorted((e["file"], e["sequences"]) for e in uninterrupted.manifest["shards"])
    for name in ("X_train", "y_train", "X_test", "y_test", "groups_train", "groups_test"):
        torch.testing.assert_close(getattr(resumed, name), getattr(uninterrupted, name), atol=1e-5, rtol=0)


def test_x_comes_from_the_prompt_that_holds_the_context(checkpoint, tmp_path):
    """A context read after other tokens than the repeat template's prefix gets its X from its own prompt."""
    model, tokenizer = load_model(checkpoint, device="cpu")
    ids = tokenizer.encode(" the red fox sees the owl . the owl is calm in the morning .", add_special_tokens=False)
    prefix = tokenizer.encode("<|bos|><|user|>\nsome other preamble :", add_special_tokens=False)
    settings = {"model_name": "tiny", "source": {"kind": "test"}, "seed": 3, "test_fraction": 0.0,
                "tokens_per_sequence": 5, "decode_tokens": 0, "dtype": "float32",
                "oracle": {"normalize": True, "chunk_size": 2048, "anchor": 8}}
    summary = collect.collect(model, tokenizer, [collect.Context(ids, prefix, "test")], tmp_path / "d", settings,
                              show_progress=False)
    assert (summary["n_train"], summary["n_test"]) == (5, 0)
    dataset = load_dataset(tmp_path / "d", model)
    positions = collect.sample_positions(len(ids), 5, seed=3, sequence=0)
    with torch.no_grad(), capture_attention_inputs(model) as hidden:
        model(torch.tensor([prefix + ids]))
    expected = torch.stack([hidden[i][0, len(prefix) + positions] for i in range(2)], dim=1)
    torch.testing.assert_close(dataset.X_train, expected, atol=1e-5, rtol=0)
    scores = oracle.oracle_scores(model, tokenizer, ids)  # y: the oracle on the context alone
    torch.testing.assert_close(dataset.y_train, scores[:, :, positions].permute(2, 0, 1), atol=1e-5, rtol=0)


def test_decode_phase_rows_come_from_generated_tokens(checkpoint, tmp_path, capsys):
    out = tmp_path / "decode"
    args = ["--model", checkpoint, "--out", out, "--tasks", "single_needle", "--n-sequences", 2, "--context-tokens", 48]
    code, summary = run_cli([*args, "--decode-tokens", 6, "--tokens-per-sequence", 4, "--test-fraction", 0], capsys)
    assert code == 0 and summary["n_train"] == 8
    model, tokenizer = load_model(checkpoint, device="cpu")
    dataset = load_dataset(out, model)
    assert dataset.manifest["decode_tokens"] == 6
    context = collect.task_contexts(tokenizer, ["single_needle"], 2, 48, seed=0)[1]
    prompt = context.prefix + context.ids + context.suffix
    assert prompt == make_samples("single_needle", tokenizer, 2, 48, seed=0)[1].input_ids  # the whole task prompt
    generated = collect.greedy_continuation(model, prompt, 6)
    with torch.no_grad(), capture_attention_inputs(model) as hidden:
        logits = model(torch.tensor([prompt + generated])).logits[0]
    assert logits[len(prompt) - 1 : -1].argmax(-1).tolist() == generated  # greedy, teacher-forced check
    positions = collect.sample_positions(6, 4, seed=0, sequence=1)
    rows = dataset.groups_train == 1
    expected_x = torch.stack([hidden[i][0, len(prompt) + positions] for i in range(2)], dim=1)
    torch.testing.assert_close(dataset.X_train[rows], expected_x, atol=1e-5, rtol=0)
    scores = oracle.decode_oracle_scores(model, tokenizer, prompt, generated)
    torch.testing.assert_close(dataset.y_train[rows], scores[:, :, positions].permute(2, 0, 1), atol=1e-5, rtol=0)
