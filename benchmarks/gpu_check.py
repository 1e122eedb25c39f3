"""GPU check of kvzap_lab.kernels: Triton vs torch correctness at realistic shapes, timings side by side, and an
end-to-end run of the eviction engine on the device.

    bash benchmarks/gpu_check.sh                       # on a CUDA machine (torch + triton + transformers)
    python benchmarks/gpu_check.py --device cpu --dry  # the same code paths on CPU, Triton interpreted, tiny shapes

Sections (each reports PASS / FAIL / SKIPPED; the exit status is 1 when any section FAILs):
1. scorer: ``score_and_threshold`` Triton vs torch, linear and MLP, fp32 and bf16, t = 1 and 2048 (D=4096,
   M=512, H=8). Scores must agree to 1e-4 (atol and rtol; only the summation order differs) and keep masks
   exactly, except for scores within that tolerance of tau.
2. compact: ``compact`` Triton vs torch, bitwise, b=1, kv_heads=8, cap=4096, d=128, fp32 and bf16, contiguous
   and strided inputs, with and without rounding the capacity.
3. timings: median time per call of each path (same inputs, same run) and the ratio triton / torch.
4. engine: if ``kvzap_lab.engine`` imports, a random tiny Llama generates through the engine with a KVzap-like
   MLP policy whose scorer calls the kernels: with nothing evicted it must give the full cache's tokens; with
   eviction, the device run is compared with a CPU run (torch paths): compression must agree to 0.02, token
   agreement is reported. A missing module is reported as SKIPPED, not a failure.
5. env: ``KVEviction-v0`` episodes (test-bed model, knorm policy) on the device and on CPU: compression and oracle
   mass retained must agree to 0.02.

Results are printed; when ``$OUT`` is set they are also written to ``$OUT/gpu_check.json`` and ``$OUT/gpu_check.txt``.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

ARGS = None
LINES: list[str] = []


def log(line: str = "") -> None:
    print(line, flush=True)
    LINES.append(line)


@dataclass
class Shapes:
    """Problem sizes: scorer ``hidden [t, D]``, MLP width ``M``, ``H`` KV heads; cache ``[b, kv_heads, cap, d]``."""

    tokens: tuple[int, ...]
    D: int
    M: int
    H: int
    b: int
    kv_heads: int
    cap: int
    d: int


FULL = Shapes(tokens=(1, 2048), D=4096, M=512, H=8, b=1, kv_heads=8, cap=4096, d=128)
DRY = Shapes(tokens=(1, 16), D=64, M=32, H=2, b=1, kv_heads=2, cap=96, d=16)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_per_call(fn, device: torch.device, rounds: int, calls: int) -> float:
    """Median over ``rounds`` of the wall time per call of ``calls`` back-to-back calls, in ms (after a warm-up)."""
    fn()
    sync(device)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync(device)
        times.append((time.perf_counter() - start) / calls * 1e3)
    return statistics.median(times)


def make_scorer_case(shapes: Shapes, mlp: bool, dtype: torch.dtype, t: int, device, seed: int):
    """Random ``hidden [t, D]``, scorer weights (scores O(1)) and a per-head tau: each head's mean score, +0.01 on
    even heads and -0.01 on odd ones (so that t = 1 keeps some heads and drops others)."""
    from kvzap_lab.kernels import ScorerWeights, score_and_threshold_torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    D, M, H = shapes.D, shapes.M, shapes.H
    out = M if mlp else H
    tensors = [torch.randn(D, out, generator=g) / D**0.5, torch.randn(out, generator=g) * 0.1]
    if mlp:
        tensors += [torch.randn(M, H, generator=g) / M**0.5, torch.randn(H, generator=g) * 0.1]
    weights = ScorerWeights(*tensors).to(device, dtype)
    hidden = torch.randn(t, D, generator=g).to(device, dtype)
    reference, _ = score_and_threshold_torch(hidden, weights, 0.0)
    tau = reference.mean(dim=-1) + 0.01 * (1 - 2 * (torch.arange(H, device=device) % 2))
    return hidden, weights, tau


def check_scorer(shapes: Shapes, device, timings: list) -> dict:
    from kvzap_lab.kernels import score_and_threshold_torch, score_and_threshold_triton

    tol = 1e-4
    cases = []
    for mlp in (False, True):
        for dtype in (torch.float32, torch.bfloat16):
            for t in shapes.tokens:
                name = f"{'mlp' if mlp else 'linear'} {str(dtype).removeprefix('torch.')} t={t}"
                hidden, weights, tau = make_scorer_case(shapes, mlp, dtype, t, device, seed=len(cases))
                ref_scores, ref_keep = score_and_threshold_torch(hidden, weights, tau)
                scores, keep = score_and_threshold_triton(hidden, weights, tau)
                sync(device)
                allowed = tol + tol * ref_scores.abs()
                diff = (scores - ref_scores).abs()
                near_tau = (ref_scores - tau[:, None]).abs() <= allowed
                keep_mismatch = int(((keep != ref_keep) & ~near_tau).sum())
                self_consistent = bool(torch.equal(keep, scores >= tau[:, None]))
                ok = bool((diff <= allowed).all()) and keep_mismatch == 0 and self_consistent
                cases.append(
                    dict(case=name, ok=ok, max_abs_diff=float(diff.max()), keep_mismatch=keep_mismatch, keep_is_scores_ge_tau=self_consistent, kept_fraction=float(keep.float().mean()))
                )
                log(f"  {'ok  ' if ok else 'FAIL'} {name:<24} max|diff| {float(diff.max()):.2e}  keep mismatches {keep_mismatch}  kept {float(keep.float().mean()):.2f}")
                timings.append(
                    dict(
                        op="score_and_threshold",
                        case=f"{name} D={shapes.D}" + (f" M={shapes.M}" if mlp else "") + f" H={shapes.H}",
                        torch_ms=time_per_call(lambda: score_and_threshold_torch(hidden, weights, tau), device, ARGS.rounds, ARGS.calls),
                        triton_ms=time_per_call(lambda: score_and_threshold_triton(hidden, weights, tau), device, ARGS.rounds, ARGS.calls),
                    )
                )
    return dict(ok=all(c["ok"] for c in cases), cases=cases)


def make_cache_layer(shapes: Shapes, dtype: torch.dtype, device, seed: int, spare: int = 0):
    """A cache layer ``[b, kv_heads, cap (+ spare), d]``: head h keeps about (h + 1) / (kv_heads + 1) of its slots,
    the last cap/16 slots are empty (position -1, keep False). With ``spare`` the tensors are views of longer
    buffers (strided, as in a cache with headroom)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    b, h, cap, d = shapes.b, shapes.kv_heads, shapes.cap, shapes.d
    full = cap + spare
    keys, values = (torch.randn(b, h, full, d, generator=g).to(dtype) for _ in range(2))
    positions = torch.arange(full).repeat(b, h, 1)
    scores = torch.randn(b, h, full, generator=g)
    rate = (torch.arange(h) + 1.0) / (h + 1)
    keep = torch.rand(b, h, full, generator=g) < rate[None, :, None]
    empty = cap // 16
    positions[..., cap - empty :] = -1
    keep[..., cap - empty :] = False
    return tuple(x.to(device)[:, :, :cap] for x in (keys, values, positions, scores, keep))


def check_compact(shapes: Shapes, device, timings: list) -> dict:
    from kvzap_lab.kernels import compact_torch, compact_triton

    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        for spare, multiple in ((0, 1), (shapes.cap // 4, 128)):
            name = f"{str(dtype).removeprefix('torch.')} {'strided' if spare else 'contiguous'} multiple={multiple}"
            layer = make_cache_layer(shapes, dtype, device, seed=len(cases), spare=spare)
            expected = compact_torch(*layer, multiple)
            got = compact_triton(*layer, multiple)
            sync(device)
            equal = [a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(got, expected)]
            ok = all(equal)
            cases.append(dict(case=name, ok=ok, outputs_bitwise_equal=equal, new_capacity=expected[0].shape[2], lengths=expected[4].tolist()))
            log(f"  {'ok  ' if ok else 'FAIL'} {name:<32} bitwise equal (keys, values, positions, scores, lengths): {equal}  new cap {expected[0].shape[2]}")
            if not spare:
                timings.append(
                    dict(
                        op="compact",
                        case=f"{name} b={shapes.b} kv_heads={shapes.kv_heads} cap={shapes.cap} d={shapes.d}",
                        torch_ms=time_per_call(lambda: compact_torch(*layer, multiple), device, ARGS.rounds, ARGS.calls),
                        triton_ms=time_per_call(lambda: compact_triton(*layer, multiple), device, ARGS.rounds, ARGS.calls),
                    )
                )
    return dict(ok=all(c["ok"] for c in cases), cases=cases)


@dataclass
class KernelMLPScorer:
    """A KVzap-like MLP scorer with random weights (one :class:`ScorerWeights` per layer) scoring through
    ``kvzap_lab.kernels.score_and_threshold``: ``hidden [b, t, D] -> [b, kv_heads, t]``."""

    weights: list
    accumulates_attention: bool = False

    def score(self, hidden, layer, *, keys=None, values=None, positions=None):
        from kvzap_lab.kernels import score_and_threshold

        return score_and_threshold(hidden, self.weights[layer], 0.0)[0]


def check_engine(device, dry: bool) -> dict:
    """Generate with the engine on ``device`` (nothing evicted vs full cache; with eviction vs CPU)."""
    try:
        from kvzap_lab import engine
        from kvzap_lab.kernels import ScorerWeights
        from kvzap_lab.model import describe, random_tiny_model
        from kvzap_lab.policy import Policy, Threshold
    except Exception as err:  # a missing or incomplete module: reported, not a failure
        log(f"  SKIPPED: the engine is not available ({err.__class__.__name__}: {err})")
        return dict(ok=None, skipped=f"{err.__class__.__name__}: {err}")

    def policy_for(model, tau):
        spec = describe(model)
        g = torch.Generator().manual_seed(1)
        width = spec.hidden_size // 8
        weights = [
            ScorerWeights(torch.randn(spec.hidden_size, width, generator=g) / spec.hidden_size**0.5, torch.zeros(width), torch.randn(width, spec.n_kv_heads, generator=g) / width**0.5, torch.zeros(spec.n_kv_heads)).to(next(model.parameters()).device)
            for _ in range(spec.n_layers)
        ]
        return Policy(name="kvzap-like-mlp", scorer=KernelMLPScorer(weights), rule=Threshold(tau=tau, window=8, sinks=2))

    n_prompt, n_new = (40, 6) if dry else (300, 24)
    g = torch.Generator().manual_seed(2)
    same_length = torch.randint(3, 128, (2, n_prompt), generator=g).tolist()
    ragged = [same_length[0], same_length[1][: n_prompt * 2 // 3]]
    model = random_tiny_model("llama", seed=0).to(device)
    results = {}

    full = engine.generate(model, same_length, None, n_new, eos_token_id=-1)
    kept_all = engine.generate(model, same_length, policy_for(model, -1e9), n_new, eos_token_id=-1)
    results["nothing_evicted"] = dict(
        tokens_equal_full_cache=kept_all.tokens == full.tokens, compression=kept_all.compression.overall
    )
    ok_full = kept_all.tokens == full.tokens and kept_all.compression.overall == 0.0
    log(f"  {'ok  ' if ok_full else 'FAIL'} nothing evicted vs full cache on {device}: tokens equal {kept_all.tokens == full.tokens}, compression {kept_all.compression.overall:.3f}")

    evicting_here = engine.generate(model, ragged, policy_for(model, 0.0), n_new, eos_token_id=-1)
    cpu_model = random_tiny_model("llama", seed=0)
    evicting_cpu = engine.generate(cpu_model, ragged, policy_for(cpu_model, 0.0), n_new, eos_token_id=-1)
    gap = abs(evicting_here.compression.overall - evicting_cpu.compression.overall)
    agree = sum(a == b for x, y in zip(evicting_here.tokens, evicting_cpu.tokens) for a, b in zip(x, y)) / sum(len(x) for x in evicting_cpu.tokens)
    results["evicting_vs_cpu"] = dict(
        compression_device=evicting_here.compression.overall,
        compression_cpu=evicting_cpu.compression.overall,
        token_agreement=agree,
        bytes_held_over_full=evicting_here.bytes_held / evicting_here.full_bytes,
    )
    ok_cpu = gap <= 0.02
    log(
        f"  {'ok  ' if ok_cpu else 'FAIL'} evicting (tau 0, batch 2 left-padded) {device} vs cpu: compression "
        f"{evicting_here.compression.overall:.3f} vs {evicting_cpu.compression.overall:.3f}, token agreement {agree:.2f} "
        f"(informational: fp32 rounding can flip a near-tie), bytes held / full {evicting_here.bytes_held / evicting_here.full_bytes:.3f}"
    )
    return dict(ok=ok_full and ok_cpu, **results)


def check_env(device, dry: bool) -> dict:
    """Episodes of ``KVEviction-v0`` on ``device`` and on CPU (test-bed model, knorm policy with a threshold, the
    same samples): compression must agree to 0.02 and oracle mass retained to 0.02; rewards are reported."""
    import gymnasium as gym
    import numpy as np

    from kvzap_lab.envs import PolicyAgent
    from kvzap_lab.policy import Threshold, get_policy

    n_samples, context = (1, 64) if dry else (4, 512)
    policy = get_policy("knorm", rule=Threshold(tau=-5.0, window=16, sinks=4))
    ends = {}
    for where in (device, torch.device("cpu")):
        env = gym.make("kvzap_lab/KVEviction-v0", model="testbed", task="single_needle", n_samples=n_samples,
                       context_tokens=context, policy=policy, chunk_size=128, device=str(where))
        on = next(env.unwrapped.config.model.parameters()).device
        if on.type != where.type:
            raise RuntimeError(f"env asked for {where} runs on {on}")
        agent, rows = PolicyAgent(policy), []
        for k in range(n_samples):
            obs, _ = env.reset(options={"sample": k})
            total, done = 0.0, False
            while not done:
                obs, reward, done, _, info = env.step(agent.act(obs))
                total += reward
            rows.append((info["compression"], info["oracle_mass_retained"], total, info["accuracy"]))
        env.close()
        ends[where.type] = np.asarray(rows).mean(0).tolist()
    dev, cpu = ends[device.type], ends["cpu"]
    ok = abs(dev[0] - cpu[0]) <= 0.02 and abs(dev[1] - cpu[1]) <= 0.02
    log(
        f"  {'ok  ' if ok else 'FAIL'} KVEviction-v0 on {device} vs cpu ({n_samples} x {context} tokens): compression "
        f"{dev[0]:.3f} vs {cpu[0]:.3f}, oracle retained {dev[1]:.3f} vs {cpu[1]:.3f}, episode reward {dev[2]:.3f} vs "
        f"{cpu[2]:.3f}, accuracy {dev[3]:.2f} vs {cpu[3]:.2f}"
    )
    return dict(ok=ok, device=dict(zip(("compression", "oracle_retained", "reward", "accuracy"), dev)),
                cpu=dict(zip(("compression", "oracle_retained", "reward", "accuracy"), cpu)))


def environment(device) -> dict:
    from kvzap_lab import kernels

    info = dict(python=platform.python_version(), torch=torch.__version__, device=str(device))
    for name in ("triton", "transformers"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    info["triton_interpreted"] = kernels.INTERPRETED
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    return info


def write_outputs(results: dict) -> None:
    out = os.environ.get("OUT")
    if not out:
        return
    from kvzap_lab.io import atomic_write_text

    for name, text in (("gpu_check.json", json.dumps(results, indent=2, default=str)), ("gpu_check.txt", "\n".join(LINES) + "\n")):
        atomic_write_text(Path(out) / name, text)
    print(f"results written to {out}/gpu_check.json and {out}/gpu_check.txt")


def main() -> int:
    global ARGS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (Triton through its interpreter)")
    parser.add_argument("--dry", action="store_true", help="tiny shapes and one timing round: checks the script itself")
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds (median taken); default 7, 1 with --dry")
    parser.add_argument("--calls", type=int, default=None, help="back-to-back calls per timing round; default 20, 1 with --dry")
    parser.add_argument("--skip-engine", action="store_true", help="skip the end-to-end engine and env checks")
    ARGS = parser.parse_args()
    ARGS.rounds = ARGS.rounds or (1 if ARGS.dry else 7)
    ARGS.calls = ARGS.calls or (1 if ARGS.dry else 20)
    device = torch.device(ARGS.device)
    if device.type == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before kvzap_lab.kernels imports triton
    elif not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu --dry to check the script on CPU", file=sys.stderr)
        return 2
    shapes = DRY if ARGS.dry else FULL
    results = dict(environment=environment(device), shapes=vars(shapes), sections={})
    log(f"== gpu_check: {json.dumps(results['environment'])}")
    timings: list[dict] = []
    sections = [("scorer", lambda: check_scorer(shapes, device, timings)), ("compact", lambda: check_compact(shapes, device, timings))]
    if not ARGS.skip_engine:
        sections.append(("engine", lambda: check_engine(device, ARGS.dry)))
        sections.append(("env", lambda: check_env(device, ARGS.dry)))
    for name, run in sections:
        log(f"== {name}")
        start = time.perf_counter()
        try:
            results["sections"][name] = run()
        except Exception as err:  # report and go on with the other sections
            log(traceback.format_exc().rstrip())
            results["sections"][name] = dict(ok=False, error=f"{err.__class__.__name__}: {err}")
        results["sections"][name]["seconds"] = round(time.perf_counter() - start, 1)

    log(f"== timings (ms per call, median of {ARGS.rounds} rounds x {ARGS.calls} calls; ratio = triton / torch)")
    if ARGS.dry:
        log("   (dry run: Triton is interpreted or shapes are tiny; these numbers only show the code runs)")
    log(f"  {'op':<20} {'case':<52} {'torch':>9} {'triton':>9} {'ratio':>7}")
    for row in timings:
        row["ratio"] = row["triton_ms"] / row["torch_ms"]
        log(f"  {row['op']:<20} {row['case']:<52} {row['torch_ms']:>9.4f} {row['triton_ms']:>9.4f} {row['ratio']:>7.2f}")
    results["timings"] = timings

    verdicts = {name: {True: "PASS", False: "FAIL", None: "SKIPPED"}[s["ok"]] for name, s in results["sections"].items()}
    results["verdicts"] = verdicts
    log("== summary: " + ", ".join(f"{k} {v}" for k, v in verdicts.items()))
    write_outputs(results)
    return 1 if "FAIL" in verdicts.values() else 0


if __name__ == "__main__":
    sys.exit(main())
