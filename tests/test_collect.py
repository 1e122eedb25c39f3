"""Training-data collection: shards, manifest, split, resume after kill -9, and loading with integrity checks."""

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kvzap_lab import cli, collect, data, faults, oracle
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


BASE = ["--tasks", "single_needle", "copy", "kv_retrieval", "--n-sequences", 7, "--context-tokens", 64]
BASE += ["--tokens-per-sequence", 20, "--shard-size", 2, "--batch-size", 3, "--test-fraction", 0.3, "--dtype", "float32"]


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
    assert cli.run(collect.main, ["--model", str(checkpoint), "--out", str(out), *map(str, BASE), "--seed", "1"]) == 2
    assert "differ in: plan, seed, split" in capsys.readouterr().err
    too_long = ["--model", checkpoint, "--out", tmp_path / "long", "--tasks", "copy", "--context-tokens", 1010]
    assert cli.run(collect.main, [str(a) for a in too_long]) == 2
    assert "1010 tokens leaves no room for a repeat chunk" in capsys.readouterr().err
    assert not list((tmp_path / "long").iterdir())  # refused before anything is written
    code, replaced = run_cli(["--model", checkpoint, "--out", out, *BASE[:-2], "--overwrite"], capsys)  # bfloat16
    assert code == 0 and replaced["shards_written"] == 4
    bf16 = load_dataset(out)
    assert bf16.X_train.dtype == torch.float32 and load_dataset(out, dtype=None).X_train.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.X_train, dataset.X_train, atol=0.02, rtol=0.01)
    torch.testing.assert_close(bf16.y_train, dataset.y_train)
    layer1 = load_dataset(out, layers=[1])
    assert layer1.X_train.shape == (100, 1, 64) and layer1.y_test.shape == (40, 1, 2)
    assert layer1.manifest["shapes"]["layers"] == 1 and layer1.manifest["loaded_layers"] == [1]
    torch.testing.assert_close(layer1.X_train[:, 0], bf16.X_train[:, 1], atol=0, rtol=0)
    torch.testing.assert_close(layer1.y_test[:, 0], bf16.y_test[:, 1], atol=0, rtol=0)


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
    """A dataset written through the data module (two train shards, one test shard), all recorded."""
    out = tmp_path / "ds"
    out.mkdir()
    plan = [{"file": f"{split}-{k:05d}.safetensors", "split": split, "sequences": [k]}
            for k, split in enumerate(["train", "train", "test"])]
    manifest = {"format": data.FORMAT, "model": {"name": "tiny", "fingerprint": fingerprint(model)},
                "shapes": {"layers": 2, "hidden": 64, "kv_heads": 2}, "dtype": "float32", "plan": plan, "n_shards": 3}
    assert data.create_manifest(out, manifest)["complete"] is False
    for k, entry in enumerate(plan):
        rows = {"X": torch.randn(4, 2, 64), "y": torch.randn(4, 2, 2), "sequence": torch.full((4,), k),
                "position": torch.arange(4)}
        data.write_record(out, dict(entry, n=4, sha256=data.write_shard(out, entry["file"], rows)))
    return out


def test_load_dataset_names_bad_shards_and_other_models(tmp_path):
    model = random_tiny_model("llama", seed=0)
    out = small_dataset(tmp_path, model)
    dataset = load_dataset(out, model)
    assert dataset.X_train.shape == (8, 2, 64) and dataset.X_test.shape == (4, 2, 64)
    assert not list(out.glob("*.tmp")) and dataset.manifest["complete"]
    mask = os.umask(0o022)
    os.umask(mask)
    assert all((p.stat().st_mode & 0o777) == 0o666 & ~mask for p in out.iterdir())  # files honour the umask

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

    (out / data.record_name("train-00001.safetensors")).unlink()  # a shard without its record does not count
    with pytest.raises(DatasetError, match=r"unfinished collection \(2 of 3 shards\).* rerun the same collect"):
        load_dataset(out)
    assert load_dataset(out, allow_partial=True).X_train.shape == (4, 2, 64)
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        load_dataset(tmp_path)
    assert data.create_manifest(out, {"format": data.FORMAT, "plan": []})["plan"] != []  # the first creator wins

    # a dataset of the first format (finished shards listed in the manifest) still loads for training
    v1 = data.read_manifest(out) | {"format": data.FORMAT_V1, "complete": True}
    v1["shards"] = [dict(entry, n=4, sha256=data.sha256_file(out / entry["file"])) for entry in v1.pop("plan")]
    for entry in v1["shards"]:
        (out / data.record_name(entry["file"])).unlink(missing_ok=True)
    (out / data.MANIFEST).write_text(json.dumps(v1))
    assert load_dataset(out, model).X_train.shape == (8, 2, 64)


def shard_digests(directory: Path) -> dict[str, str]:
    """{shard file: sha256 of its bytes} of every shard file present (recorded or not)."""
    return {p.name: data.sha256_file(p) for p in sorted(directory.glob("*.safetensors"))}


COLLECT = [sys.executable, "-m", "kvzap_lab.collect", "--tasks", "single_needle", "copy", "--n-sequences", "10",
           "--context-tokens", "64", "--tokens-per-sequence", "16", "--shard-size", "1", "--batch-size", "2", "--json"]


def start_collect(out: Path, *extra: str, kill_at: str | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in (faults.ENV_VAR, "RANK", "WORLD_SIZE")}
    env |= {"OMP_NUM_THREADS": "1", **({faults.ENV_VAR: kill_at} if kill_at else {})}
    return subprocess.Popen([*COLLECT, "--out", str(out), *extra], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, dict | None]:
    out, _ = proc.communicate()
    return proc.returncode, json.loads(out.strip().splitlines()[-1]) if proc.returncode == 0 else None


@pytest.mark.slow
def test_two_workers_a_kill_9_and_a_resume_equal_one_process(tmp_path):
    """Two worker processes share one dataset; worker 1 kills itself (SIGKILL) right after moving its second
    shard into place, before recording it; rerunning worker 1 finishes the dataset, whose every shard equals (sha256)
    a one-process run's."""
    shared, single = tmp_path / "shared", tmp_path / "single"
    workers = [start_collect(shared, "--num-workers", "2", "--worker-index", "0"),
               start_collect(shared, "--num-workers", "2", "--worker-index", "1", kill_at="collect.shard-written:2")]
    alone = start_collect(single)
    (code0, summary0), (code1, _) = finish(workers[0]), finish(workers[1])
    assert code0 == 0 and summary0["worker"] == [0, 2] and summary0["shards_written"] == 5
    assert code1 == -signal.SIGKILL
    manifest = data.read_manifest(shared)
    recorded = {e["file"] for e in manifest["shards"]}
    present = set(shard_digests(shared))
    assert not manifest["complete"] and len(recorded) == 5 + 1  # worker 1 recorded its first shard only
    orphan = present - recorded
    assert len(orphan) == 1  # in place but unrecorded: it does not count, and the resume writes it again
    assert len(load_dataset(shared, allow_partial=True).y_train) + len(load_dataset(shared, allow_partial=True).y_test) == 16 * 6
    with pytest.raises(DatasetError, match="unfinished collection"):
        load_dataset(shared)

    code, resumed = finish(start_collect(shared, "--num-workers", "2", "--worker-index", "1"))
    assert code == 0 and resumed["complete"] and (resumed["shards_resumed"], resumed["shards_written"]) == (1, 4)
    assert not list(shared.glob(".*.tmp"))
    code, one = finish(alone)
    assert code == 0 and one["complete"] and one["shards_written"] == 10
    assert shard_digests(shared) == shard_digests(single) and len(shard_digests(single)) == 10
    assert data.read_manifest(shared)["shards"] == data.read_manifest(single)["shards"]
    torch.testing.assert_close(load_dataset(shared).X_train, load_dataset(single).X_train, atol=0, rtol=0)


def test_resume_re_verifies_every_shard_and_collects_a_bad_one_again(checkpoint, tmp_path, capsys):
    out = tmp_path / "data"
    args = ["--model", checkpoint, "--out", out, *BASE]
    assert run_cli(args, capsys)[0] == 0
    before = shard_digests(out)
    truncated, missing = out / "train-00001.safetensors", out / "test-00000.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:100])
    missing.unlink()
    code, summary = run_cli(args, capsys)
    assert code == 0 and summary["complete"]
    assert (summary["shards_repaired"], summary["shards_written"], summary["shards_resumed"]) == (2, 2, 2)
    assert shard_digests(out) == before


def test_workers_come_from_flags_or_torchrun(tmp_path, capsys):
    assert collect.resolve_workers(None, None, {}) == (1, 0)
    assert collect.resolve_workers(None, None, {"WORLD_SIZE": "4", "RANK": "3"}) == (4, 3)
    assert collect.resolve_workers(2, 1, {"WORLD_SIZE": "4", "RANK": "3"}) == (2, 1)  # flags win
    with pytest.raises(ValueError, match=r"worker index must be in \[0, 2\) for 2 workers, got 2"):
        collect.resolve_workers(2, 2, {})
    with pytest.raises(ValueError, match="--worker-index needs --num-workers"):
        collect.resolve_workers(None, 1, {})
    assert cli.run(collect.main, ["--num-workers", "2", "--worker-index", "2", "--out", str(tmp_path / "w")]) == 2
    assert capsys.readouterr().err.strip().endswith("got 2")
    assert cli.run(collect.main, ["--num-workers", "2", "--overwrite", "--out", str(tmp_path / "w")]) == 2
    assert "would let them delete each other's shards" in capsys.readouterr().err


def test_an_unwritable_output_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")  # no directory can be made below it, even as root
    loads = []
    monkeypatch.setattr(collect, "load_model", lambda *a, **k: loads.append(1))
    assert cli.run(collect.main, ["--out", str(blocker / "data")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cannot write to" in err and str(blocker / "data") in err and not loads


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
    code, summary = run_cli([*args, "--decode-tokens", 6, "--tokens-per-sequence", 4, "--test-fraction", 0, "--dtype", "float32"], capsys)
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


class StubCorpus:
    """The shape of kvzap_lab.corpus.Corpus that collection uses: name, split(split, seed), manifest()."""

    name = "stub"

    def __init__(self, texts: dict[str, list[str]]):
        self.texts = texts

    def split(self, split, seed=0):
        return [type("Document", (), {"text": t})() for t in self.texts[split]]

    def manifest(self):
        return {"name": self.name, "sha256": "0" * 64}


def test_corpus_windows_keep_the_corpus_split_and_draw_lengths_in_range(checkpoint):
    _, tokenizer = load_model(checkpoint, device="cpu")
    corpus = StubCorpus({
        "train": [f"the red fox {i} sees the owl . the owl is calm in the morning ." * 6 for i in range(30)],
        "test": [f"var alpha = {i} . var beta = alpha ." * 8 for i in range(12)],
    })
    contexts = collect.corpus_contexts(tokenizer, corpus, 20, (40, 60), seed=3, prefix=[1, 2], test_fraction=0.2)
    assert [c.split for c in contexts] == ["train"] * 16 + ["test"] * 4
    assert all(40 <= len(c.ids) <= 60 and c.prefix == [1, 2] for c in contexts)
    assert all("alpha" in tokenizer.decode(c.ids) for c in contexts if c.split == "test")
    assert not any("alpha" in tokenizer.decode(c.ids) for c in contexts if c.split == "train")
    again = collect.corpus_contexts(tokenizer, corpus, 20, (40, 60), seed=3, prefix=[1, 2], test_fraction=0.2)
    assert [c.ids for c in again] == [c.ids for c in contexts]  # seeded
    other = collect.corpus_contexts(tokenizer, corpus, 20, (40, 60), seed=4, prefix=[1, 2], test_fraction=0.2)
    assert [c.ids for c in other] != [c.ids for c in contexts]
    with pytest.raises(ValueError, match="holds .* test windows of 40-60 tokens, fewer than the 30 asked"):
        collect.corpus_contexts(tokenizer, corpus, 60, (40, 60), seed=3, prefix=[], test_fraction=0.5)
    assert collect.token_range("750:1250") == (750, 1250) and collect.token_range("64") == (64, 64)
    for bad in ("0", "9:3", "a:b"):
        with pytest.raises(argparse.ArgumentTypeError, match="MIN:MAX"):
            collect.token_range(bad)


def test_kvpress_definition_labels(checkpoint, tmp_path, capsys):
    out = tmp_path / "kvpress"
    args = ["--model", checkpoint, "--out", out, "--tasks", "copy", "--n-sequences", 2, "--context-tokens", 40,
            "--tokens-per-sequence", 6, "--test-fraction", 0, "--oracle-definition", "kvpress"]
    code, _ = run_cli(args, capsys)
    assert code == 0
    model, tokenizer = load_model(checkpoint, device="cpu")
    dataset = load_dataset(out, model)
    assert dataset.manifest["oracle"]["definition"] == "kvpress"
    context = collect.task_contexts(tokenizer, ["copy"], 2, 40, seed=0)[0]
    scores = oracle.oracle_scores(model, tokenizer, context.ids, definition="kvpress")
    positions = collect.sample_positions(len(context.ids), 6, seed=0, sequence=0)
    rows = dataset.groups_train == 0
    torch.testing.assert_close(dataset.y_train[rows], scores[:, :, positions].permute(2, 0, 1), atol=1e-5, rtol=0)


@pytest.mark.real_model
def test_a_short_collection_on_smollm2(smollm2, tmp_path):
    model, tokenizer = smollm2
    corpus = StubCorpus({"train": [(REPO / "README.md").read_text()], "test": [collect.__doc__]})
    prefix = list(oracle.repeat_template(tokenizer).prefix)
    contexts = collect.corpus_contexts(tokenizer, corpus, 3, (90, 130), seed=0, prefix=prefix, test_fraction=0.34)
    settings = {"model_name": "smollm2-135m", "source": {"kind": "corpus", "corpus": corpus.manifest()}, "seed": 0,
                "test_fraction": 0.34, "tokens_per_sequence": 12, "decode_tokens": 0, "dtype": "bfloat16",
                "oracle": {"normalize": True, "chunk_size": 2048, "anchor": 8}}
    summary = collect.collect(model, tokenizer, contexts, tmp_path / "d", settings, shard_size=2, batch_size=2,
                              show_progress=False)
    assert (summary["n_train"], summary["n_test"], summary["complete"]) == (24, 12, True)
    dataset = load_dataset(tmp_path / "d", model)
    assert dataset.X_train.shape == (24, 30, 576) and dataset.y_train.shape == (24, 30, 3)
    result = oracle.score_contexts(model, tokenizer, [contexts[0].ids], return_hidden=True)[0]
    positions = collect.sample_positions(len(contexts[0].ids), 12, seed=0, sequence=0)
    rows = dataset.groups_train == 0
    torch.testing.assert_close(dataset.y_train[rows], result.scores[:, :, positions].permute(2, 0, 1), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(dataset.X_train[rows], result.hidden[positions].bfloat16().float(), atol=0, rtol=0)
