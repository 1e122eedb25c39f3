"""python -m kvzap_lab.evaluate: grid, scoring, resume, outputs and bad input, on a tiny random model."""

from __future__ import annotations

import dataclasses
import json

import pytest

from kvzap_lab import cli, evaluate, tasks
from kvzap_lab.model import random_tiny_model
from kvzap_lab.stats import wilson_interval
from kvzap_lab.testbed import train_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tokenizer = train_tokenizer(vocab_size=300)
    model = random_tiny_model(
        "llama", seed=0, vocab_size=len(tokenizer), max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model, tokenizer


def test_cell_accuracy_is_exact_match_of_greedy_answers(model_dir):
    _, model, tokenizer = model_dir
    samples = tasks.make_samples("kv_retrieval", tokenizer, 3, 40, seed=0)
    end = tokenizer.convert_tokens_to_ids(tasks.END)
    free = evaluate.generate(model, [s.input_ids for s in samples], None, 6, eos_token_id=[])
    assert all(end not in row for row in free.tokens)
    # The model's own greedy continuation is the reference answer of samples 0 and 2, not of sample 1.
    answers = [free.tokens[0], [free.tokens[1][0] + 1] + free.tokens[1][1:], free.tokens[2]]
    samples = [dataclasses.replace(s, answer_ids=a, max_new_tokens=len(a)) for s, a in zip(samples, answers)]
    result = evaluate.run_cell(model, None, samples, end, batch_size=2, chunk_size=16)
    assert result["accuracy"] == pytest.approx(2 / 3)
    assert (result["accuracy_low"], result["accuracy_high"]) == pytest.approx(wilson_interval(2 / 3, 3))
    assert result["compression"] == 0.0


def test_cli_runs_the_grid_resumes_and_plots(model_dir, tmp_path, capsys, monkeypatch):
    path, _, _ = model_dir
    out = tmp_path / "eval.jsonl"
    argv = [
        "--model", str(path), "--policies", "full", "oracle", "streaming_llm", "--taus", "-50", "50",
        "--keep-ratios", "0.5", "--tasks", "single_needle", "--context-tokens", "48", "--n-samples", "3",
        "--batch-size", "2", "--window", "4", "--sinks", "1", "--chunk-size", "16", "--out", str(out), "--json",
    ]
    assert evaluate.main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    records = evaluate.read_records(out)
    assert summary["cells"] == len(records) == 4
    by = {(r["policy"], json.dumps(r["setting"])): r for r in records}
    assert by[("full", "{}")]["compression"] == 0.0
    keep_all, evict_all = by[("oracle", '{"tau": -50.0}')], by[("oracle", '{"tau": 50.0}')]
    assert keep_all["compression"] < 0.05 < 0.4 < evict_all["compression"]
    assert evict_all["bytes_ratio"] < 0.9
    half = by[("streaming_llm", '{"keep_ratio": 0.5}')]["compression"]
    assert 0.2 < half < 0.8
    assert all(r["n_samples"] == 3 and 0.0 <= r["accuracy"] <= 1.0 for r in records)
    assert (tmp_path / "eval.png").stat().st_size > 1000

    # A rerun computes nothing; a widened grid computes only the new cell.
    calls = []
    real_run_cell = evaluate.run_cell
    monkeypatch.setattr(evaluate, "run_cell", lambda *a, **k: calls.append(1) or real_run_cell(*a, **k))
    evaluate.main(argv)
    assert calls == [] and evaluate.read_records(out) == records
    evaluate.main([*argv[:3], "full", "--taus", "0", *argv[argv.index("--keep-ratios"):]])
    assert calls == [] and len(evaluate.read_records(out)) == 4
    evaluate.main(argv + ["--keep-ratios", "0.25"])
    assert calls == [1] and len(evaluate.read_records(out)) == 5
    quarter = evaluate.read_records(out)[-1]
    assert quarter["setting"] == {"keep_ratio": 0.25} and quarter["compression"] > half + 0.1


def test_per_layer_taus_threshold_each_layer_on_its_own(model_dir, tmp_path, capsys):
    """The tiny model has 2 layers: keeping every pair in layer 0 and evicting every candidate in layer 1
    lands halfway between keeping all and evicting all; a tau list of the wrong length is refused."""
    path, _, _ = model_dir
    out = tmp_path / "eval.jsonl"
    argv = [
        "--model", str(path), "--policies", "oracle", "--taus", "-50", "50", "--tasks", "single_needle",
        "--context-tokens", "48", "--n-samples", "3", "--batch-size", "3", "--window", "4", "--sinks", "1",
        "--chunk-size", "16", "--out", str(out), "--json",
    ]
    assert evaluate.main(argv) == 0
    assert evaluate.main([*argv[:5], "0", "--tau-offsets=-50,50", *argv[7:]]) == 0
    by = {json.dumps(r["setting"]): r["compression"] for r in evaluate.read_records(out)}
    keep_all, evict_all = by['{"tau": -50.0}'], by['{"tau": 50.0}']
    split = by['{"tau": 0.0, "tau_offsets": [-50.0, 50.0]}']
    assert split == pytest.approx((keep_all + evict_all) / 2, abs=1e-9)
    assert "oracle tau=0 tau_offsets=-50,50" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main([*argv[:5], "0", "--tau-offsets=-1,-2,-3", *argv[7:]])
    assert "--tau-offsets has 3 values; the model has 2 layers" in capsys.readouterr().err


def test_bad_arguments_get_clear_errors(model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        evaluate.main(["--taus", "inf"])
    assert "finite" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(["--tau-offsets=-2,x"])
    assert "one per layer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(["--keep-ratios", "1.5"])
    assert "[0, 1]" in capsys.readouterr().err
    with pytest.raises(ValueError, match="known policies"):
        evaluate.parse_policy("no_such_policy")
    with pytest.raises(ValueError, match="checkpoint"):
        evaluate.parse_policy("kvzap_mlp")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate.parse_policy(f"kvzap_mlp@{tmp_path / 'missing'}")


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory, chat_tokenizer):
    """A tiny random Llama with the ChatML test tokenizer: the chat-model path of evaluate."""
    model = random_tiny_model(
        "llama", seed=0, vocab_size=len(chat_tokenizer), max_position_embeddings=512,
        pad_token_id=chat_tokenizer.pad_token_id, bos_token_id=chat_tokenizer.bos_token_id,
        eos_token_id=chat_tokenizer.eos_token_id,
    )
    path = tmp_path_factory.mktemp("tiny_chat")
    model.save_pretrained(path)
    chat_tokenizer.save_pretrained(path)
    return path, model


def test_chat_model_cells_stop_at_end_of_turn_or_budget_and_score_ruler_style(chat_model_dir, chat_tokenizer, monkeypatch):
    _, model = chat_model_dir
    samples = tasks.make_samples("multi_value", chat_tokenizer, 3, 128, seed=0, n_needles=2)
    calls = []
    real_generate = evaluate.generate

    def spy(model, prompts, policy, max_new_tokens, **kw):
        calls.append((max_new_tokens, kw["eos_token_id"], kw["expected"]))
        out = real_generate(model, prompts, policy, max_new_tokens, **kw)
        # Row 0 answers both values then ends its turn; row 1 one value; row 2 both, but after its end of turn.
        eos = chat_tokenizer.eos_token_id
        ids = lambda text: chat_tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
        out.tokens = [
            ids(" " + samples[0].answer) + [eos],
            ids(" " + samples[1].references[0]) + [eos],
            [eos] + ids(" " + samples[2].answer),
        ]
        return out

    monkeypatch.setattr(evaluate, "generate", spy)
    result = evaluate.run_cell(model, None, samples, None, 3, 16, tokenizer=chat_tokenizer)
    assert calls == [(max(s.max_new_tokens for s in samples), [chat_tokenizer.eos_token_id], None)]
    assert result["accuracy"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert result["accuracy_low"] < result["accuracy"] < result["accuracy_high"]


def test_cli_on_a_chat_model_records_intervals_and_refuses_contexts_beyond_the_window(chat_model_dir, tmp_path, capsys):
    path, _ = chat_model_dir
    out = tmp_path / "eval.jsonl"
    argv = [
        "--model", str(path), "--policies", "full", "streaming_llm", "--keep-ratios", "0.5", "--tasks", "single_needle",
        "kv_retrieval", "--context-tokens", "64", "--n-samples", "3", "--batch-size", "3", "--window", "4", "--sinks", "1",
        "--chunk-size", "16", "--out", str(out), "--json",
    ]
    assert evaluate.main(argv) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    records = evaluate.read_records(out)
    assert len(records) == 4 and summary["cells"] == 4
    for r in records:
        assert r["accuracy_low"] <= r["accuracy"] <= r["accuracy_high"] and r["accuracy_high"] - r["accuracy_low"] > 0.3
        assert r["seconds_per_sample"] == pytest.approx(r["seconds"] / 3, abs=1e-3) and len(r["samples"]) == 16
    assert {s["n_samples"] for s in summary["summary"]} == {6}  # pooled over the two tasks
    assert "acc [95% CI]" in captured.err and "s/sample" in captured.err
    too_long = [*argv[: argv.index("--context-tokens") + 1], "600", *argv[argv.index("--n-samples") :]]
    assert cli.run(evaluate.main, too_long) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # (after the weight-loading bar) one line, no traceback
    assert last.startswith("python -m kvzap_lab.evaluate: error: a single_needle sample with a 600-token context")
    assert "512-token window" in last


def test_a_changed_sample_set_is_not_resumed_from_a_stale_record(model_dir, tmp_path, monkeypatch):
    """The resume key holds a digest of the samples: the same cell with other samples runs again."""
    path, _, _ = model_dir
    out = tmp_path / "eval.jsonl"
    argv = ["--model", str(path), "--policies", "full", "--tasks", "single_needle", "--context-tokens", "48",
            "--n-samples", "2", "--chunk-size", "16", "--out", str(out), "--json"]
    assert evaluate.main(argv) == 0
    real = tasks.make_samples
    monkeypatch.setattr(tasks, "make_samples", lambda *a, **k: [dataclasses.replace(s, max_new_tokens=s.max_new_tokens + 1) for s in real(*a, **k)])
    assert evaluate.main(argv) == 0
    records = evaluate.read_records(out)
    assert len(records) == 2 and records[0]["samples"] != records[1]["samples"]


@pytest.mark.real_model
def test_smollm2_full_cache_answers_single_needles(smollm2):
    """An evaluate cell on SmolLM2: greedy answers with its chat template stop at <|im_end|> and find the needle."""
    model, tokenizer = smollm2
    samples = tasks.make_samples("single_needle", tokenizer, 4, 256, seed=0)
    result = evaluate.run_cell(model, None, samples, None, 4, 128, tokenizer=tokenizer)
    assert result["accuracy"] >= 0.75 and result["compression"] == 0.0


def _grid_records(model_dir, tmp_path, chunk_size, name="eval.jsonl"):
    path, _, _ = model_dir
    out = tmp_path / name
    argv = [
        "--model", str(path), "--policies", "full", "oracle", "knorm", "accumulated_attention", "random", "--taus", "-3", "1",
        "--keep-ratios", "0.3", "--tasks", "single_needle", "kv_retrieval", "--context-tokens", "64", "--n-samples", "5",
        "--batch-size", "2", "--window", "4", "--sinks", "1", "--chunk-size", str(chunk_size), "--out", str(out), "--json",
    ]  # fmt: skip
    assert evaluate.main(argv) == 0
    return {(r["policy"], json.dumps(r["setting"]), r["task"]): r for r in evaluate.read_records(out)}


def test_shared_prefill_equals_one_chunk_prefill_per_cell(model_dir, tmp_path, capsys):
    shared = _grid_records(model_dir, tmp_path, 0, "shared.jsonl")
    per_cell = _grid_records(model_dir, tmp_path, 10_000, "per_cell.jsonl")  # one chunk: the same semantics
    assert shared.keys() == per_cell.keys() and len(shared) == 2 * 6
    for key, record in shared.items():
        for field in ("accuracy", "compression", "compression_min", "compression_max", "bytes_ratio"):
            assert record[field] == pytest.approx(per_cell[key][field], abs=1e-9), (key, field)
    assert max(r["compression"] for r in shared.values()) > 0.3  # the policies did evict
    assert not list(tmp_path.glob(".*partial*"))


def test_shared_prefill_resumes_at_the_next_batch_after_kill_9(model_dir, tmp_path):
    import os
    import subprocess
    import sys

    from kvzap_lab import faults

    path, _, _ = model_dir
    argv = [sys.executable, "-m", "kvzap_lab.evaluate", "--model", str(path), "--policies", "full", "oracle", "knorm",
            "--taus", "-3", "--keep-ratios", "0.3", "--tasks", "single_needle", "--context-tokens", "64", "--n-samples", "5",
            "--batch-size", "2", "--window", "4", "--sinks", "1", "--chunk-size", "0", "--json"]  # fmt: skip
    killed_out, fresh_out = tmp_path / "killed.jsonl", tmp_path / "fresh.jsonl"
    env = dict(os.environ, **{faults.ENV_VAR: "evaluate.batch:2"})
    killed = subprocess.run([*argv, "--out", str(killed_out)], env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9
    partial = json.loads((tmp_path / ".killed.jsonl.partial.json").read_text())
    assert partial["batches"] == 2 and not killed_out.exists()
    resumed = subprocess.run([*argv, "--out", str(killed_out)], capture_output=True, text=True, timeout=600)
    fresh = subprocess.run([*argv, "--out", str(fresh_out)], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == fresh.returncode == 0, resumed.stderr + fresh.stderr
    strip = lambda records: [{k: v for k, v in r.items() if not k.startswith("seconds")} for r in records]  # noqa: E731
    assert strip(evaluate.read_records(killed_out)) == strip(evaluate.read_records(fresh_out))
    assert not (tmp_path / ".killed.jsonl.partial.json").exists()
