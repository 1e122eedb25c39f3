"""Cost of the KVzip+ oracle relative to a plain prefill, and its peak memory chunked vs unchunked.

    python benchmarks/oracle_cost.py [--lengths 512 1024 2048] [--repeats 3] [--chunk-size 2048] [--threads N]
                                     [--wide] [--json]

Time (CPU time of this process, ``time.process_time``, so that other jobs on the machine do not count; run with
``--threads 1`` on a shared machine, as idle worker threads would otherwise spin): for each context length, a
plain prefill of the context (``model(prefix + context, logits_to_keep=1)``, what generation does first) and
the oracle on the same context run alternately ``--repeats`` times in this process; the medians and their
ratio are printed (target: oracle <= 2.5x prefill). A third column times the same forward passes as the
oracle with the model's own sdpa attention and no scoring: the floor for an exact oracle.

Memory: each oracle configuration (context length x chunk size) runs once in a fresh subprocess; we report the
growth of the process's peak resident set (VmHWM, reset through /proc/self/clear_refs after loading the model
and a warm-up) during that one call. This counts everything the call allocates (activations, attention-row
blocks, the KV cache), not just torch tensors; it is Linux-only and has page granularity.

Model: the bundled test bed; when it is missing, a random Llama of the test bed's shape (said in the output).
``--wide``: a random 4-layer Llama of hidden size 512, where the linear layers weigh more than on the test bed.
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
from kvzap_lab.model import describe, load_model, random_tiny_model


WIDE = dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=2, head_dim=64, intermediate_size=1536)


def bench_model(wide: bool = False):
    """``(model, template, label)``: the test bed; with ``wide``, a random 4-layer Llama of hidden size 512 (linear
    layers weigh more, as in large models)."""
    if wide:
        model = random_tiny_model("llama", num_hidden_layers=4, vocab_size=1024, max_position_embeddings=4096, **WIDE)
        return model, TEMPLATE, "random wide llama (hidden 512, 8 heads / 2 KV heads, head_dim 64, MLP 1536)"
    model, tokenizer = load_model("testbed", device="cpu", dtype=torch.float32)
    return model, oracle.repeat_template(tokenizer), "testbed"


TEMPLATE = oracle.RepeatTemplate(prefix=(1, 3, 203), middle=tuple(range(200, 211)))  # the wide model: a repeat template of the test bed's size


def context(n: int, seed: int = 0) -> list[int]:
    return torch.randint(10, 700, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def repeat_passes(model, template, ids: list[int], chunk_size: int | None) -> None:
    """The forward passes the oracle runs (prefill of the context, then each chunk's repeat on the cache), with
    the model's own sdpa attention and no scoring: the floor of any exact oracle built on these passes."""
    from transformers import DynamicCache

    prefix, middle = list(template.prefix), list(template.middle)
    size = oracle.repeat_chunk(model, template, len(ids), chunk_size)
    chunks = [ids[i : i + size] for i in range(0, len(ids), size)]
    cache = DynamicCache()
    with torch.no_grad():
        model.model(input_ids=torch.tensor([prefix + ids]), cache=cache, use_cache=True)
        for k, chunk in enumerate(chunks):
            step = middle + (chunks[k - 1][-oracle.DEFAULT_ANCHOR :] if k else []) + chunk
            model.model(input_ids=torch.tensor([step]), cache=cache, use_cache=True)
            cache.crop(-len(step))


def time_lengths(model, template, lengths, repeats, chunk_size) -> list[dict]:
    rows = []
    for n in lengths:
        ids = context(n)
        prompt = torch.tensor([list(template.prefix) + ids])

        def prefill():
            with torch.no_grad():
                model(input_ids=prompt, logits_to_keep=1)

        def score():
            oracle.oracle_scores(model, template, ids, chunk_size=chunk_size)

        def passes():
            repeat_passes(model, template, ids, chunk_size)

        prefill(), score(), passes()  # warm-up
        times = {"prefill": [], "oracle": [], "passes": []}
        for _ in range(repeats):
            for name, fn in (("prefill", prefill), ("oracle", score), ("passes", passes)):
                start = time.process_time()
                fn()
                times[name].append(time.process_time() - start)
        p, o, f = (statistics.median(times[k]) for k in ("prefill", "oracle", "passes"))
        rows.append({"tokens": n, "prefill_s": round(p, 4), "oracle_s": round(o, 4), "ratio": round(o / p, 2),
                     "passes_s": round(f, 4), "passes_ratio": round(f / p, 2)})
    return rows


def _peak_rss_kib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def memory_probe(n: int, chunk_size: int | None, wide: bool) -> dict:
    """Run one oracle call in this (fresh) process and return the peak RSS growth in MiB."""
    model, template, _ = bench_model(wide)
    ids = context(n)
    oracle.oracle_scores(model, template, ids[:64], chunk_size=chunk_size)  # warm-up: libraries, thread pools
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset VmHWM to the current RSS
    before = _peak_rss_kib()
    oracle.oracle_scores(model, template, ids, chunk_size=chunk_size)
    return {"tokens": n, "chunk_size": chunk_size, "peak_growth_mib": round((_peak_rss_kib() - before) / 1024, 1)}


def measure_memory(lengths, chunk_sizes, wide: bool) -> list[dict]:
    rows = []
    for n in lengths:
        for chunk_size in chunk_sizes:
            cmd = [sys.executable, __file__, "--memory-probe", str(n), "--chunk-size", str(chunk_size or 0)]
            cmd += ["--threads", str(torch.get_num_threads())] + (["--wide"] if wide else [])
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=oracle.DEFAULT_CHUNK, help="oracle chunk (0 = unchunked)")
    parser.add_argument("--memory-tokens", type=int, nargs="+", default=[1000, 2000], help="contexts for memory")
    parser.add_argument("--memory-chunks", type=int, nargs="+", default=[0, 2048, 512], help="0 = unchunked")
    parser.add_argument("--wide", action="store_true", help="a random wider Llama instead of the test bed")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--memory-probe", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, args.chunk_size or None, args.wide)))
        return 0

    model, template, label = bench_model(args.wide)
    spec = describe(model)
    timing = time_lengths(model, template, args.lengths, args.repeats, args.chunk_size or None)
    memory = measure_memory(args.memory_tokens, [c or None for c in args.memory_chunks], args.wide)
    report = {"model": label, "threads": torch.get_num_threads(), "chunk_size": args.chunk_size or None,
              "timing": timing, "memory": memory}
    print(f"model: {label} ({spec.n_layers} layers, hidden {spec.hidden_size}, {spec.n_heads} heads / "
          f"{spec.n_kv_heads} KV heads), {torch.get_num_threads()} threads, oracle chunk {args.chunk_size or 'none'}")
    print("tokens  prefill_s  oracle_s  oracle/prefill  passes_s  passes/prefill (same passes, sdpa, no scoring)")
    for row in timing:
        print(f"{row['tokens']:6d}  {row['prefill_s']:9.4f}  {row['oracle_s']:8.4f}  {row['ratio']:13.2f}x  "
              f"{row['passes_s']:8.4f}  {row['passes_ratio']:13.2f}x")
    print("peak RSS growth of one oracle call (fresh process each):")
    for row in memory:
        chunk = row["chunk_size"] or "none (one forward)"
        print(f"  {row['tokens']:6d} tokens, chunk {chunk!s:>18}: {row['peak_growth_mib']:8.1f} MiB")
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
