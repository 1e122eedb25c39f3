"""Decode-time overhead of the KVzap-MLP policy, and its FLOPs relative to the model's linear projections.

    python benchmarks/overhead.py [--checkpoint DIR] [--prompt-tokens 1024] [--decode 128] [--repeats 5]
                                  [--evict-every 8] [--compact-every 32] [--json]

One process, one prompt, the same decode tokens (teacher-forced, so every mode does identical work), three
modes, each on its own copy of the model, decoded side by side step by step (each decode step of one mode is
followed by the same step of the others, the order rotating), so a slow spell of this shared machine falls on
every mode alike:

- ``hf``: plain transformers decoding with a ``DynamicCache`` (no engine at all);
- ``engine_full``: the eviction engine with no policy (full cache through the compacted-cache code path);
- ``mlp``: the engine with the KVzap-MLP policy (scoring every token, evicting, compacting).

Prefill (chunked, 128 tokens) is not timed; the time per decoded token is, as CPU time of this process (one
torch thread: robust when other jobs share the machine) and as wall time, summed over the steps of a repeat.
Ratios are per repeat; the median over ``--repeats`` is reported with its range. Target: ``mlp / hf <= 1.10``
on CPU. The MLP is ``--checkpoint`` (a trained ``kvzap_mlp``), else one fitted here on oracle scores of a few
task contexts (timing does not depend on the fit; compression does), with tau calibrated for ``--compression``.
FLOPs ratio: scorer FLOPs per token / FLOPs per token of the model's q, k, v, o and MLP projections.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import time

import torch

from kvzap_lab import tasks
from kvzap_lab.engine import DEFAULT_CHUNK, DEFAULT_COMPACT_EVERY, DEFAULT_EVICT_EVERY, evicting
from kvzap_lab.model import MODEL_HELP, load_model
from kvzap_lab.policy import Policy, calibrate, get_policy
from kvzap_lab.surrogate import projection_flops_per_token
from kvzap_lab.train import quick_mlp_fit


def fitted_mlp(model, tokenizer, n_contexts: int, context_tokens: int, compression: float, seed: int):
    """A KVzap-MLP fitted on oracle scores of ``n_contexts`` task contexts, and tau for ``compression``."""
    samples = []
    for i, task in enumerate(("single_needle", "kv_retrieval", "multi_value")):
        samples += tasks.make_samples(task, tokenizer, n_contexts // 3 + (i < n_contexts % 3), context_tokens, seed)
    scorer, X = quick_mlp_fit(model, tokenizer, [s.context_ids for s in samples], epochs=3, seed=seed)
    return scorer, calibrate(scorer.predict(X), compression)


def decode_steps(model, prompt: torch.Tensor, tokens: torch.Tensor, policy: Policy | None, engine: bool, **schedule):
    """A generator: prefills ``prompt`` (first ``next``), then runs one teacher-forced decode step per ``next``;
    finally yields the compression at the end (0 without the engine). ``schedule``: ``evict_every`` and
    ``compact_every`` for :func:`~kvzap_lab.engine.evicting`."""
    with (evicting(model, policy, **schedule) if engine else contextlib.nullcontext()) as run:
        cache = run.new_cache() if engine else None
        for start in range(0, prompt.shape[1], DEFAULT_CHUNK):
            cache = model(input_ids=prompt[:, start : start + DEFAULT_CHUNK], cache=cache, logits_to_keep=1).cache
        yield
        for i in range(tokens.shape[1]):
            cache = model(input_ids=tokens[:, i : i + 1], cache=cache).cache
            yield
        yield cache.compression().overall if engine else 0.0


def side_by_side(models: dict, prompt: torch.Tensor, tokens: torch.Tensor, modes: dict, **schedule) -> dict:
    """Decode ``tokens`` in every mode, interleaved step by step (rotating order). Returns, per mode, CPU and
    wall seconds per decoded token and the final compression."""
    runs = {m: decode_steps(models[m], prompt, tokens, *modes[m], **schedule) for m in modes}
    for run in runs.values():
        next(run)  # prefill, untimed
    cpu, wall = dict.fromkeys(modes, 0.0), dict.fromkeys(modes, 0.0)
    names = list(modes)
    for i in range(tokens.shape[1]):
        for m in names[i % len(names) :] + names[: i % len(names)]:
            c, w = time.process_time(), time.perf_counter()
            next(runs[m])
            cpu[m] += time.process_time() - c
            wall[m] += time.perf_counter() - w
    n = tokens.shape[1]
    measured = {m: (cpu[m] / n, wall[m] / n, next(runs[m])) for m in modes}
    for run in runs.values():
        run.close()  # leaves the evicting() blocks: the model copies are plain again
    return measured


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="testbed", help=MODEL_HELP)
    parser.add_argument("--checkpoint", default=None, help="a trained kvzap_mlp directory (default: fit one here)")
    parser.add_argument("--tau", type=float, default=None,
                        help="threshold (default: calibrated for --compression; with --checkpoint, its own rule)")
    parser.add_argument("--compression", type=float, default=0.75)
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--decode", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--evict-every", type=int, default=DEFAULT_EVICT_EVERY, help="engine: decode steps between evictions")
    parser.add_argument("--compact-every", type=int, default=DEFAULT_COMPACT_EVERY, help="engine: decode steps between compactions")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: least noise on a shared CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, device="cpu", dtype=torch.float32)
    if args.checkpoint:
        policy = get_policy("kvzap_mlp", checkpoint=args.checkpoint, model=model)
        scorer, rule = policy.scorer, policy.rule
    else:
        scorer, rule = fitted_mlp(model, tokenizer, 12, 512, args.compression, args.seed)
    if args.tau is not None:
        rule = type(rule)(tau=args.tau, window=rule.window, sinks=rule.sinks)
    policy = Policy("kvzap_mlp", scorer, rule)
    torch.set_grad_enabled(False)  # the decode generators interleave: no per-generator grad context

    sample = tasks.make_samples("single_needle", tokenizer, 1, args.prompt_tokens, args.seed)[0]
    prompt = torch.tensor([sample.input_ids])
    gen = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(10, model.config.vocab_size, (1, args.decode), generator=gen)
    modes = {"hf": (None, False), "engine_full": (None, True), "mlp": (policy, True)}
    models = {m: copy.deepcopy(model) for m in modes}  # each mode's hooks stay on its own copy
    schedule = {"evict_every": args.evict_every, "compact_every": args.compact_every}
    side_by_side(models, prompt, tokens[:, :8], modes, **schedule)  # warm-up
    times = {m: [] for m in modes}
    walls = {m: [] for m in modes}
    for _ in range(args.repeats):
        measured = side_by_side(models, prompt, tokens, modes, **schedule)
        for m, (cpu, wall, _) in measured.items():
            times[m].append(cpu)
            walls[m].append(wall)
    compression = measured["mlp"][2]
    ms = {m: 1e3 * statistics.median(t) for m, t in times.items()}
    wall_ms = {m: 1e3 * statistics.median(t) for m, t in walls.items()}

    def ratio(a: str, b: str, clock: dict) -> tuple[float, float, float]:
        per_repeat = [x / y for x, y in zip(clock[a], clock[b])]
        return statistics.median(per_repeat), min(per_repeat), max(per_repeat)

    mlp_over_hf = ratio("mlp", "hf", times)
    result = {
        "model": args.model,
        "prompt_tokens": prompt.shape[1],
        "decode_tokens": args.decode,
        "repeats": args.repeats,
        "threads": args.threads,
        "evict_every": args.evict_every,
        "compact_every": args.compact_every,
        "cpu_ms_per_token": {m: round(v, 3) for m, v in ms.items()},
        "wall_ms_per_token": {m: round(v, 3) for m, v in wall_ms.items()},
        "wall_mlp_over_hf": round(ratio("mlp", "hf", walls)[0], 3),
        "mlp_over_hf": round(mlp_over_hf[0], 3),
        "mlp_over_hf_range": [round(mlp_over_hf[1], 3), round(mlp_over_hf[2], 3)],
        "mlp_over_engine_full": round(ratio("mlp", "engine_full", times)[0], 3),
        "engine_full_over_hf": round(ratio("engine_full", "hf", times)[0], 3),
        "mlp_compression": round(compression, 3),
        "scorer_flops_ratio": scorer.flops_per_token() / projection_flops_per_token(model.config),
    }
    if args.json:
        print(json.dumps(result))
    else:
        for mode, v in ms.items():
            spread = f"{1e3 * min(times[mode]):.3f}-{1e3 * max(times[mode]):.3f}"
            print(f"{mode:<12} CPU {v:8.3f} ms/token (range {spread})   wall {wall_ms[mode]:8.3f} ms/token")
        print(f"CPU time, median of per-repeat ratios: mlp / hf = {result['mlp_over_hf']} "
              f"(range {mlp_over_hf[1]:.3f}-{mlp_over_hf[2]:.3f})   mlp / engine_full = {result['mlp_over_engine_full']}   "
              f"engine_full / hf = {result['engine_full_over_hf']}   (target mlp / hf <= 1.10); "
              f"wall: mlp / hf = {result['wall_mlp_over_hf']}")
        print(f"MLP compression {compression:.3f}; scorer FLOPs / projection FLOPs = {result['scorer_flops_ratio']:.4%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
