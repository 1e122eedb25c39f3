"""Cost of the KVzip+ oracle relative to a plain prefill, batched against one context at a time, and its memory.

    python benchmarks/oracle_cost.py [--model testbed|smollm2-135m|DIR] [--lengths 512 1024 2048] [--repeats 3]
                                     [--batch 16 --batch-tokens 1100] [--chunk-size 2048] [--threads N]
                                     [--wide] [--no-memory] [--json]

Time (CPU time of this process, ``time.process_time``, so that other jobs on the machine do not count; run with
``--threads 1`` on a shared machine, as idle worker threads would otherwise spin):

- for each context length, a plain prefill of the context (``model(prefix + context, logits_to_keep=1)``, what
  generation does first) and the oracle on the same context run alternately ``--repeats`` times in this process;
  the medians and their ratio are printed (target: oracle <= 2.5x prefill). A third column times the same
  forward passes as the oracle with the model's own sdpa attention and no scoring: the floor for an oracle built
  on these passes.
- with ``--batch B``: ``score_contexts`` on B contexts of about ``--batch-tokens`` tokens (lengths spread by
  +-10 %, so rows are padded) at once, against the same contexts one at a time, alternately; the ratio of the
  per-context times (target: batched <= one at a time).

Memory: each oracle configuration (context length x chunk size) runs once in a fresh subprocess; we report the
growth of the process's peak resident set (VmHWM, reset through /proc/self/clear_refs after loading the model
and a warm-up) during that one call. This counts everything the call allocates (activations, attention blocks,
the KV cache), not just torch tensors; it is Linux-only and has page granularity.

Model: ``--model`` (default the bundled test bed). ``--wide``: a random 4-layer Llama of hidden size 512, where the
linear layers weigh more than on the test bed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from kvzap_lab import oracle
from kvzap_lab.model import MODEL_HELP, describe, load_model, random_tiny_model

WIDE = dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=2, head_dim=64, intermediate_size=1536)
TEMPLATE = oracle.RepeatTemplate(prefix=(1, 3, 203), middle=tuple(range(200, 211)))  # the wide model's template


def bench_model(name: str, wide: bool = False):
    """``(model, template, label)``: ``name`` loaded in float32 on CPU; with ``wide``, a random 4-layer Llama of
    hidden size 512 (linear layers weigh more, as in large models)."""
    if wide:
        model = random_tiny_model("llama", num_hidden_layers=4, vocab_size=1024, max_position_embeddings=4096, **WIDE)
        return model, TEMPLATE, "random wide llama (hidden 512, 8 heads / 2 KV heads, head_dim 64, MLP 1536)"
    model, tokenizer = load_model(name, device="cpu", dtype=torch.float32)
    return model, oracle.repeat_template(tokenizer), name


def context(n: int, seed: int = 0, vocab: int = 700) -> list[int]:
    return torch.randint(10, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def repeat_passes(model, template, ids: list[int], chunk_size: int | None) -> None:
    """The forward passes the oracle runs (prefill of the context, then each chunk's repeat on the cache), with
    the model's own sdpa attention and no scoring: the floor of any exact oracle built on these passes."""
    from transformers import DynamicCache

    prefix = list(template.prefix)
    size = oracle.repeat_chunk(model, template, len(ids), chunk_size)
    chunks = [ids[i : i + size] for i in range(0, len(ids), size)]
    cache = DynamicCache()
    with torch.no_grad():
        model.model(input_ids=torch.tensor([prefix + ids]), cache=cache, use_cache=True)
        for k, chunk in enumerate(chunks):
            step = template.lead(k, chunks[k - 1][-oracle.DEFAULT_ANCHOR :] if k else []) + chunk
            model.model(input_ids=torch.tensor([step]), cache=cache, use_cache=True)
            cache.crop(-len(step))


def alternate(functions: dict, repeats: int) -> dict[str, float]:
    """Median CPU seconds of each function, run alternately ``repeats`` times after one warm-up round."""
    for fn in functions.values():
        fn()
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            start = time.process_time()
            fn()
            times[name].append(time.process_time() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def time_lengths(model, template, lengths, repeats, chunk_size, vocab) -> list[dict]:
    rows = []
    for n in lengths:
        ids = context(n, vocab=vocab)
        prompt = torch.tensor([list(template.prefix) + ids])

        def prefill():
            with torch.no_grad():
                model(input_ids=prompt, logits_to_keep=1)

        medians = alternate(
            {
                "prefill": prefill,
                "oracle": lambda: oracle.oracle_scores(model, template, ids, chunk_size=chunk_size),
                "passes": lambda: repeat_passes(model, template, ids, chunk_size),
            },
            repeats,
        )
        p, o, f = medians["prefill"], medians["oracle"], medians["passes"]
        rows.append({"tokens": n, "prefill_s": round(p, 4), "oracle_s": round(o, 4), "ratio": round(o / p, 2),
                     "passes_s": round(f, 4), "passes_ratio": round(f / p, 2)})
    return rows


def time_batch(model, template, batch: int, tokens: int, repeats: int, chunk_size, vocab) -> dict:
    """Per-context CPU seconds of ``score_contexts`` on ``batch`` contexts at once vs one at a time."""
    spread = torch.randint(-tokens // 10, tokens // 10 + 1, (batch,), generator=torch.Generator().manual_seed(1))
    contexts = [context(tokens + int(d), seed=100 + i, vocab=vocab) for i, d in enumerate(spread)]

    def together():
        oracle.score_contexts(model, template, contexts, chunk_size=chunk_size, return_hidden=True)

    def one_by_one():
        for c in contexts:
            oracle.score_contexts(model, template, [c], chunk_size=chunk_size, return_hidden=True)

    medians = alternate({"batched": together, "one_at_a_time": one_by_one}, repeats)
    b, s = medians["batched"] / batch, medians["one_at_a_time"] / batch
    return {"contexts": batch, "tokens": [min(map(len, contexts)), max(map(len, contexts))],
            "batched_s_per_context": round(b, 4), "one_at_a_time_s_per_context": round(s, 4), "ratio": round(b / s, 3)}


def _peak_rss_kib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def memory_probe(name: str, n: int, chunk_size: int | None, wide: bool) -> dict:
    """Run one oracle call in this (fresh) process and return the peak RSS growth in MiB."""
    model, template, _ = bench_model(name, wide)
    ids = context(n)
    oracle.oracle_scores(model, template, ids[:64], chunk_size=chunk_size)  # warm-up: libraries, thread pools
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset VmHWM to the current RSS
    before = _peak_rss_kib()
    oracle.oracle_scores(model, template, ids, chunk_size=chunk_size)
    return {"tokens": n, "chunk_size": chunk_size, "peak_growth_mib": round((_peak_rss_kib() - before) / 1024, 1)}


def measure_memory(name: str, lengths, chunk_sizes, wide: bool) -> list[dict]:
    rows = []
    for n in lengths:
        for chunk_size in chunk_sizes:
            cmd = [sys.executable, __file__, "--model", name, "--memory-probe", str(n), "--chunk-size", str(chunk_size or 0)]
            cmd += ["--threads", str(torch.get_num_threads())] + (["--wide"] if wide else [])
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="testbed", help=MODEL_HELP)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=0, help="contexts scored together (0: skip the batch timing)")
    parser.add_argument("--batch-tokens", type=int, default=1100, help="tokens per context of the batch timing")
    parser.add_argument("--chunk-size", type=int, default=oracle.DEFAULT_CHUNK, help="oracle chunk (0 = unchunked)")
    parser.add_argument("--memory-tokens", type=int, nargs="+", default=[1000, 2000], help="contexts for memory")
    parser.add_argument("--memory-chunks", type=int, nargs="+", default=[0, 2048, 512], help="0 = unchunked")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory probes")
    parser.add_argument("--wide", action="store_true", help="a random wider Llama instead of --model")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--memory-probe", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    chunk_size = args.chunk_size or None
    if args.memory_probe:
        print(json.dumps(memory_probe(args.model, args.memory_probe, chunk_size, args.wide)))
        return 0

    model, template, label = bench_model(args.model, args.wide)
    spec = describe(model)
    vocab = min(model.config.vocab_size, 20_000)
    timing = time_lengths(model, template, args.lengths, args.repeats, chunk_size, vocab)
    batch = time_batch(model, template, args.batch, args.batch_tokens, args.repeats, chunk_size, vocab) if args.batch else None
    memory = [] if args.no_memory else measure_memory(args.model, args.memory_tokens, [c or None for c in args.memory_chunks], args.wide)
    report = {"model": label, "threads": torch.get_num_threads(), "chunk_size": chunk_size, "timing": timing,
              "batch": batch, "memory": memory}
    print(f"model: {label} ({spec.n_layers} layers, hidden {spec.hidden_size}, {spec.n_heads} heads / "
          f"{spec.n_kv_heads} KV heads), {torch.get_num_threads()} threads, oracle chunk {chunk_size or 'none'}")
    print("tokens  prefill_s  oracle_s  oracle/prefill  passes_s  passes/prefill (same passes, sdpa, no scoring)")
    for row in timing:
        print(f"{row['tokens']:6d}  {row['prefill_s']:9.4f}  {row['oracle_s']:8.4f}  {row['ratio']:13.2f}x  "
              f"{row['passes_s']:8.4f}  {row['passes_ratio']:13.2f}x")
    if batch:
        print(f"batch of {batch['contexts']} contexts ({batch['tokens'][0]}-{batch['tokens'][1]} tokens): "
              f"{batch['batched_s_per_context']:.3f} s per context batched, {batch['one_at_a_time_s_per_context']:.3f} s "
              f"one at a time: {batch['ratio']:.3f}x")
    if memory:
        print("peak RSS growth of one oracle call (fresh process each):")
    for row in memory:
        chunk = row["chunk_size"] or "none (one forward)"
        print(f"  {row['tokens']:6d} tokens, chunk {chunk!s:>18}: {row['peak_growth_mib']:8.1f} MiB")
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
