"""KV bytes held by the compacted cache relative to a full cache, at several compressions.

    python benchmarks/memory.py [--model testbed] [--context-tokens 1024] [--decode 64] [--batch 1] [--json]

One prompt (a ``single_needle`` task sample; ``--batch`` > 1 stacks samples of different lengths with left
padding) is prefilled in 128-token chunks and followed by ``--decode`` teacher-forced tokens, once with plain
transformers (its ``DynamicCache`` is the full-cache reference, measured in the same run) and once per policy
and threshold with the eviction engine. Policies:

- ``random``: i.i.d. scores, so every head evicts about the same fraction (no head imbalance);
- ``oracle``: KVzip+ scores of the context, whose heads keep very different counts (the realistic case: a layer's
  storage is as long as its longest head, so imbalance costs padding).

Thresholds target compressions of 50 %, 75 % and 90 % of the context (quantiles of the scores); the achieved
compression ``c`` (over prompt and generated tokens) is what is reported. Columns: bytes held / full at the end
and at the peak during decoding, the target ``(1 - c) + 10 %``, and the part of the held slots that is padding
(``imbalance``: the longest head of each layer over the mean, averaged over layers).
"""

from __future__ import annotations

import argparse
import contextlib
import json

import numpy as np
import torch

from kvzap_lab import tasks
from kvzap_lab.engine import DEFAULT_CHUNK, evicting, full_cache_bytes, left_pad
from kvzap_lab.oracle import oracle_table
from kvzap_lab.model import MODEL_HELP, load_model
from kvzap_lab.policy import Policy, Threshold, get_policy

TARGETS = (0.5, 0.75, 0.9)


def run(model, ids, mask, tokens, policy: Policy | None, engine: bool) -> dict:
    """Prefill + teacher-forced decoding; bytes held at the end and at the peak during decoding."""
    with torch.no_grad(), (evicting(model, policy, evict_every=1) if engine else contextlib.nullcontext()) as run_:
        cache = run_.new_cache() if engine else None
        for start in range(0, ids.shape[1], DEFAULT_CHUNK):
            end = start + DEFAULT_CHUNK
            cache = model(input_ids=ids[:, start:end], attention_mask=mask[:, : min(end, ids.shape[1])], cache=cache).cache
        peak = 0
        for i in range(tokens.shape[1]):
            full_mask = torch.cat([mask, torch.ones_like(tokens[:, : i + 1])], 1)
            cache = model(input_ids=tokens[:, i : i + 1], attention_mask=full_mask, cache=cache).cache
            peak = max(peak, cache.bytes_held() if engine else full_cache_bytes(cache))
    if not engine:
        return {"bytes": full_cache_bytes(cache), "peak": peak}
    kept = torch.stack([layer.kept() for layer in cache.layers]).double()  # [layers, b, h]
    imbalance = (kept.flatten(1).max(1).values / kept.flatten(1).mean(1).clamp_min(1)).mean().item()
    return {
        "bytes": cache.bytes_held(), "peak": peak, "full_estimate": cache.full_bytes(),
        "compression": cache.compression().overall, "imbalance": imbalance,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="testbed", help=MODEL_HELP)
    parser.add_argument("--context-tokens", type=int, default=1024)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    model, tokenizer = load_model(args.model, device="cpu", dtype=torch.float32)
    samples = [
        tasks.make_samples("single_needle", tokenizer, 1, args.context_tokens - 16 * i, args.seed + i)[0]
        for i in range(args.batch)
    ]
    ids, mask = left_pad([s.input_ids for s in samples], tokenizer.pad_token_id)
    tokens = torch.randint(10, model.config.vocab_size, (args.batch, args.decode), generator=torch.Generator().manual_seed(args.seed))
    full = run(model, ids, mask, tokens, None, engine=False)

    table = oracle_table(model, tokenizer, samples)
    context_scores = torch.cat([table[i, :, :, s.context_span[0] : s.context_span[1]].flatten() for i, s in enumerate(samples)])
    policies = {
        "random": lambda tau: get_policy("random", seed=args.seed, rule=Threshold(tau=tau)),
        "oracle": lambda tau: get_policy("oracle", rule=Threshold(tau=tau)),
    }
    quantiles = {
        "random": [float(np.quantile(np.random.default_rng(0).standard_normal(200_000), c)) for c in TARGETS],
        "oracle": [float(torch.quantile(context_scores, c)) for c in TARGETS],
    }
    rows = []
    for name, make in policies.items():
        for target, tau in zip(TARGETS, quantiles[name]):
            policy = make(tau)
            if name == "oracle":
                policy.scorer.set_scores(table)
            res = run(model, ids, mask, tokens, policy, engine=True)
            c = res["compression"]
            rows.append({
                "policy": name, "target": target, "tau": round(tau, 3), "compression": round(c, 4),
                "held_over_full": round(res["bytes"] / full["bytes"], 4),
                "peak_over_full": round(res["peak"] / full["peak"], 4),
                "bound": round(1 - c + 0.10, 4),
                "within_bound": res["peak"] / full["peak"] <= 1 - c + 0.10,
                "imbalance": round(res["imbalance"], 3),
                "full_estimate_matches": res["full_estimate"] == full["bytes"],
            })
    result = {"model": args.model, "prompt_tokens": ids.shape[1], "decode": args.decode, "batch": args.batch,
              "full_bytes": full["bytes"], "rows": rows}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"full cache (DynamicCache): {full['bytes']} bytes for {ids.shape[1] + args.decode} tokens x batch {args.batch}")
        print(f"{'policy':<8} {'target':>6} {'tau':>8} {'c':>6} {'held/full':>9} {'peak/full':>9} {'bound':>6} {'ok':>3} {'imbal':>6}")
        for r in rows:
            print(f"{r['policy']:<8} {r['target']:>6.2f} {r['tau']:>8.3f} {r['compression']:>6.3f} {r['held_over_full']:>9.3f} "
                  f"{r['peak_over_full']:>9.3f} {r['bound']:>6.3f} {'yes' if r['within_bound'] else 'NO':>3} {r['imbalance']:>6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
