"""Env overhead: one ``KVEvictionEnv.step`` against one bare engine decode step, and vector-env throughput.

    OMP_NUM_THREADS=1 python benchmarks/env_overhead.py [--model smollm2-135m] [--policy oracle --tau -6] [--reps 5] [--json]

1. Step overhead. The same policy (``--policy`` with a ``Threshold(--tau)`` rule), the same sample (the
   ``copy`` task: a long teacher-forced decode) and the same tokens, measured side by side step by step: the
   bare engine (``with evicting(model, policy, evict_every=1)`` on its own copy of the model: prefill in
   chunks, then one ``model(...)`` per reference token) and the env (``KVEvictionEnv`` with
   ``PolicyAgent(policy)``, teacher forcing, ``evict_every=1``) alternate decode steps (the order alternating
   too), so a slow spell of this shared machine falls on both alike. Per repetition: the ratio of the summed
   step times; the median over ``--reps`` is reported with its range. The env step excludes the agent's
   ``act`` (timed apart). The achieved compressions of both are printed (they must match).
2. Vector throughput. Episodes per second of ``KVEvictionVectorEnv`` at N = 1, 4, 8 and of the single env
   (references cached, the same pool of ``single_needle`` samples), in interleaved repetitions.
"""

from __future__ import annotations

import argparse
import copy as copy_module
import json
import statistics
import time

import torch

from kvzap_lab import tasks
from kvzap_lab.engine import evicting
from kvzap_lab.envs import KVEvictionEnv, KVEvictionVectorEnv, PolicyAgent, ReferenceCache
from kvzap_lab.model import MODEL_HELP, load_model
from kvzap_lab.policy import Threshold, get_policy


DONE = object()  # what a step generator yields after its last timed step (its compression comes next)


def bare_steps(model, policy, sample, chunk: int):
    """A generator: prefills ``sample`` with the bare engine (first ``next``), then one teacher-forced decode
    step per ``next`` (yielding 0.0: no agent), then ``DONE``, then the compression."""
    ids = torch.tensor([sample.input_ids])
    with torch.no_grad(), evicting(model, policy, evict_every=1) as run:
        cache = run.new_cache()
        for start in range(0, ids.shape[1], chunk):
            model(input_ids=ids[:, start : start + chunk], cache=cache, logits_to_keep=1)
        yield
        for token in sample.answer_ids[:-1]:
            model(input_ids=torch.tensor([[token]]), cache=cache, logits_to_keep=1)
            yield 0.0
        yield DONE
        yield cache.compression().overall


def env_steps(env: KVEvictionEnv, agent: PolicyAgent):
    """A generator: resets ``env`` and runs its prefill steps (first ``next``), then one decode-phase ``env.step``
    per ``next``, yielding the seconds its ``agent.act`` took; ``DONE`` after the terminating step (not timed:
    it runs no forward), then the compression."""
    obs, info = env.reset(options={"sample": 0})
    while info["phase"] != "decode":
        obs, _, _, _, info = env.step(agent.act(obs))
    yield
    while True:
        started = time.perf_counter()
        action = agent.act(obs)
        acted = time.perf_counter() - started
        obs, _, terminated, _, info = env.step(action)
        if terminated:
            break
        yield acted
    yield DONE
    yield info["compression"]


def side_by_side(bare_model, env: KVEvictionEnv, agent: PolicyAgent, policy, sample, chunk: int) -> dict:
    """One repetition: bare engine and env decode steps alternate (the order alternating too). Mean seconds per
    step of each (the env's without ``act``), mean ``act`` seconds, steps taken, both final compressions."""
    runs = {"bare": bare_steps(bare_model, policy, sample, chunk), "env": env_steps(env, agent)}
    for run in runs.values():
        next(run)  # prefill, untimed
    seconds, acts, steps = {"bare": 0.0, "env": 0.0}, 0.0, {"bare": 0, "env": 0}
    active, i = list(runs), 0
    while active:
        for name in active[:: 1 if i % 2 == 0 else -1]:
            started = time.perf_counter()
            acted = next(runs[name])
            elapsed = time.perf_counter() - started
            if acted is DONE:
                active.remove(name)
                continue
            seconds[name] += elapsed - acted
            acts += acted
            steps[name] += 1
        i += 1
    result = {name: seconds[name] / max(steps[name], 1) for name in runs}
    result |= {"act": acts / max(steps["env"], 1), "steps": steps}
    result |= {f"{name}_compression": next(run) for name, run in runs.items()}
    for run in runs.values():
        run.close()
    return result


def episodes_per_second(env, agent: PolicyAgent, n_episodes: int, vector: bool) -> float:
    """Completed episodes per second (the first ``n_episodes`` to finish)."""
    obs, _ = env.reset(seed=0)
    done, started = 0, time.perf_counter()
    while done < n_episodes:
        obs, _, terminated, _, _ = env.step(agent.act(obs))
        if vector:
            done += int(terminated.sum())
        elif terminated:
            done += 1
            obs, _ = env.reset()
    return done / (time.perf_counter() - started)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="testbed", help=MODEL_HELP)
    parser.add_argument("--policy", default="oracle")
    parser.add_argument("--tau", type=float, default=-6.0)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--copy-tokens", type=int, default=256, help="context (= answer) length of the copy sample")
    parser.add_argument("--context-tokens", type=int, default=256, help="context length of the throughput samples")
    parser.add_argument("--episodes", type=int, default=16, help="episodes per throughput measurement")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    model, tokenizer = load_model(args.model)
    policy = get_policy(args.policy, rule=Threshold(tau=args.tau, window=args.window))
    agent = PolicyAgent(policy)
    copy = tasks.make_samples("copy", tokenizer, 1, args.copy_tokens, seed=0)
    bare_model = copy_module.deepcopy(model)  # before any hook: the env holds the model's hooks mid-episode
    env = KVEvictionEnv(model, tokenizer, samples=copy, policy=policy, chunk_size=args.chunk)
    env.reset(options={"sample": 0})  # references cached, warm-up; sets the oracle table the bare run reads too
    side_by_side(bare_model, env, agent, policy, copy[0], args.chunk)  # warm-up
    runs = [side_by_side(bare_model, env, agent, policy, copy[0], args.chunk) for _ in range(args.reps)]
    env.close()
    ratios = [r["env"] / r["bare"] for r in runs]
    bare, stepped = statistics.median(r["bare"] for r in runs), statistics.median(r["env"] for r in runs)
    bare_compression, env_compression = runs[-1]["bare_compression"], runs[-1]["env_compression"]
    result = {
        "device": str(next(model.parameters()).device),
        "threads": torch.get_num_threads(),
        "bare_step_ms": 1e3 * bare,
        "env_step_ms": 1e3 * stepped,
        "agent_act_ms": 1e3 * statistics.median(r["act"] for r in runs),
        "step_ratio": statistics.median(ratios),
        "step_ratio_range": [min(ratios), max(ratios)],
        "bare_compression": bare_compression,
        "env_compression": env_compression,
    }
    print(f"decode step ({args.policy}, tau={args.tau}, copy {args.copy_tokens} tokens, {args.reps} reps of alternating steps, "
          f"{result['device']}, {result['threads']} threads)")
    print(f"  bare engine {result['bare_step_ms']:.3f} ms | env.step {result['env_step_ms']:.3f} ms | "
          f"ratio {result['step_ratio']:.3f} (range {min(ratios):.3f}-{max(ratios):.3f}; target <= 1.25) | agent.act {result['agent_act_ms']:.3f} ms")
    print(f"  compression: bare {bare_compression:.4f}, env {env_compression:.4f}")

    pool = tasks.make_samples("single_needle", tokenizer, 8, args.context_tokens, seed=0)
    references = ReferenceCache(model, tokenizer)
    references.get(pool)  # computed once, shared: throughput excludes the oracle passes
    options = dict(samples=pool, policy=policy, chunk_size=args.chunk, reference_cache=references)
    envs = {"single": KVEvictionEnv(model, tokenizer, **options)}
    envs |= {f"vector N={n}": KVEvictionVectorEnv(n, model, tokenizer, **options) for n in (1, 4, 8)}
    rates: dict[str, list[float]] = {name: [] for name in envs}
    for _ in range(args.reps):
        for name, env_ in envs.items():
            rates[name].append(episodes_per_second(env_, agent, args.episodes, name != "single"))
    throughput = {name: statistics.median(r) for name, r in rates.items()}
    result["episodes_per_second"] = throughput
    result["vector8_over_single"] = throughput["vector N=8"] / throughput["single"]
    print(f"episode throughput (single_needle {args.context_tokens} tokens, {args.episodes} episodes, median of {args.reps})")
    for name, rate in throughput.items():
        print(f"  {name:<12} {rate:7.2f} episodes/s  ({rate / throughput['single']:.2f}x single env)")
    print(f"  N=8 over one env: {result['vector8_over_single']:.2f}x (target >= 4)")
    for env_ in envs.values():
        env_.close()
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
