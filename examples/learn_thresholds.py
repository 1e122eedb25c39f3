"""Learn per-layer, per-head thresholds of the KVzap-MLP scorer in ``KVEvictionThreshold-v0`` (cross-entropy method).

    OMP_NUM_THREADS=1 python examples/learn_thresholds.py [--checkpoint DIR] [--iterations 8] [--population 8]

The agent's action is a threshold per layer and KV head, ``tau [layers, kv_heads]``, held for a whole episode:
candidates whose KVzap-MLP score is below it are evicted. CEM draws a population ``tau ~ N(mu, sigma^2)``;
row 0 is ``mu`` itself, so its reward is the current policy's. All members play the same training samples at
once, one row each of the batched vector env (common random numbers); the elite fraction refits ``mu`` and
``sigma``. ``mu`` starts at a uniform ``--tau0``.

Without ``--checkpoint`` a KVzap-MLP scorer is first fitted (seeded, a minute at most) on oracle scores of
``--scorer-contexts`` task contexts, drawn with another seed than the episodes.

The question the lab exists for: on held-out samples, do the learned thresholds beat the best *uniform* tau at
the same compression? The two uniform taus bracketing the learned compression are found by bisection (rounds of
``--population`` taus evaluated at once); their scores, interpolated linearly to the learned compression, are
the uniform tau at equal compression. All are reported side by side (reward, accuracy, KL, oracle mass
retained, compression).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from kvzap_lab import collect, oracle
from kvzap_lab.envs import KVEvictionVectorEnv
from kvzap_lab.model import MODEL_HELP, fingerprint, load_model
from kvzap_lab.policies.kvzap_mlp import KVzapMLP
from kvzap_lab.policy import Policy, Threshold
from kvzap_lab.tasks import make_samples

TAU_RANGE = (-15.0, 5.0)  # thresholds are clipped to this range of log-scores


def quick_mlp_scorer(model, tokenizer, task: str, n_contexts: int, context_tokens: int, seed: int, epochs: int = 10) -> KVzapMLP:
    """A KVzap-MLP fitted on every token of ``n_contexts`` task contexts: hidden states -> oracle log-scores.

    The task prompt and the repeat prompt share their prefix, so the oracle's hidden states are the prompt's
    (as :mod:`kvzap_lab.collect` checks)."""
    contexts = collect.task_contexts(tokenizer, [task], n_contexts, context_tokens, seed)
    if contexts[0].prefix != list(oracle.repeat_template(tokenizer).prefix):
        raise ValueError("the task prompt and the repeat prompt differ in prefix; collect a dataset with python -m kvzap_lab.collect")
    results = oracle.score_contexts(model, tokenizer, [c.ids for c in contexts], return_hidden=True)
    X = torch.cat([r.hidden for r in results]).numpy()  # [n, layers, hidden]
    y = torch.cat([r.scores.permute(2, 0, 1) for r in results]).numpy()  # [n, layers, kv_heads]
    return KVzapMLP(epochs=epochs, seed=seed).fit(X, y, manifest={"model_fingerprint": fingerprint(model)})


@dataclass
class Scores:
    """Per-row means over the evaluated samples: ``[N]`` each."""

    reward: np.ndarray
    compression: np.ndarray
    accuracy: np.ndarray
    kl: np.ndarray
    oracle_mass_retained: np.ndarray

    def row(self, i: int) -> dict:
        return {k: float(v[i]) for k, v in vars(self).items()}


def evaluate_taus(venv: KVEvictionVectorEnv, taus: np.ndarray, samples: list[int]) -> Scores:
    """Play every sample in ``samples`` once with each row's thresholds ``taus [N, layers, kv_heads]``."""
    keys = ("compression", "accuracy", "kl", "oracle_mass_retained")
    totals = {k: np.zeros(venv.num_envs) for k in ("reward",) + keys}
    actions = taus.astype(np.float32)
    for k in samples:
        venv.reset(options={"sample": k})
        returns, finished = np.zeros(venv.num_envs), np.zeros(venv.num_envs, dtype=bool)
        while not finished.all():
            _, reward, terminated, _, info = venv.step(actions)
            returns += np.where(finished, 0.0, reward)
            for key in keys:
                totals[key] += np.where(terminated & ~finished, info.get(key, 0.0), 0.0)
            finished |= terminated
        totals["reward"] += returns
    return Scores(**{k: v / len(samples) for k, v in totals.items()})


def cem(venv: KVEvictionVectorEnv, samples: list[int], tau0: float, iterations: int, elite_fraction: float = 0.25,
        sigma0: float = 1.5, sigma_min: float = 0.1, seed: int = 0, progress: bool = True) -> tuple[np.ndarray, list[dict]]:
    """Cross-entropy method over ``tau [layers, kv_heads]``; returns the final ``mu`` and per-iteration stats
    (``mu_reward``: the reward of that iteration's ``mu``, row 0 of the population)."""
    rng = np.random.default_rng(seed)
    shape = venv.single_action_space.shape
    mu, sigma = np.full(shape, tau0), np.full(shape, sigma0)
    n_elite = max(1, int(round(elite_fraction * venv.num_envs)))
    history = []
    for iteration in tqdm(range(iterations), desc="CEM", disable=not progress):
        population = np.concatenate([mu[None], mu + sigma * rng.standard_normal((venv.num_envs - 1, *shape))])
        population = population.clip(*TAU_RANGE)
        scores = evaluate_taus(venv, population, samples)
        elite = population[np.argsort(-scores.reward, kind="stable")[:n_elite]]
        history.append({"iteration": iteration, "mu_reward": float(scores.reward[0]), "best_reward": float(scores.reward.max()),
                        "mu_compression": float(scores.compression[0])})
        mu, sigma = elite.mean(0), np.maximum(elite.std(0), sigma_min)
    return mu, history


def uniform_bracket(venv: KVEvictionVectorEnv, target: float, samples: list[int], rounds: int = 4) -> list[tuple[float, dict]]:
    """The uniform taus just below and just above ``target`` compression on ``samples`` (compression grows with
    tau), as ``[(tau, scores), (tau, scores)]``: each round evaluates ``N`` taus spread over the current bracket at
    once, then narrows it."""
    lo, hi = TAU_RANGE
    shape = venv.single_action_space.shape
    below = above = None
    for _ in range(rounds):
        grid = np.linspace(lo, hi, venv.num_envs)
        scores = evaluate_taus(venv, np.broadcast_to(grid[:, None, None], (venv.num_envs, *shape)), samples)
        for i, (tau, compression) in enumerate(zip(grid, scores.compression)):
            if compression <= target and (below is None or compression >= below[1]["compression"]):
                below = (float(tau), scores.row(i))
            if compression >= target and (above is None or compression <= above[1]["compression"]):
                above = (float(tau), scores.row(i))
        lo, hi = (below or (lo,))[0], (above or (hi,))[0]
    if below is None or above is None:
        raise ValueError(f"no uniform tau in {TAU_RANGE} reaches compression {target:.3f} on both sides")
    return [below, above]


def interpolate(bracket: list[tuple[float, dict]], target: float) -> dict:
    """Linear interpolation of the bracket's scores at ``target`` compression (the uniform tau at equal compression)."""
    (_, low), (_, high) = bracket
    span = high["compression"] - low["compression"]
    weight = 0.0 if span == 0 else (target - low["compression"]) / span
    return {k: low[k] + weight * (high[k] - low[k]) for k in low}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="testbed", help=MODEL_HELP)
    parser.add_argument("--checkpoint", default=None, help="a trained KVzap-MLP scorer (python -m kvzap_lab.train); default: fit one")
    parser.add_argument("--task", default="single_needle")
    parser.add_argument("--context-tokens", type=int, default=256)
    parser.add_argument("--n-train", type=int, default=4, help="training samples (every CEM member plays all)")
    parser.add_argument("--n-heldout", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--population", type=int, default=8, help="CEM population = vector env rows")
    parser.add_argument("--tau0", type=float, default=-7.0, help="starting uniform threshold")
    parser.add_argument("--memory-weight", type=float, default=1.0)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--scorer-contexts", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    model, tokenizer = load_model(args.model)
    if args.checkpoint:
        scorer = KVzapMLP.load(args.checkpoint, model=model)
    else:
        scorer = quick_mlp_scorer(model, tokenizer, args.task, args.scorer_contexts, args.context_tokens, seed=args.seed + 1000)
    policy = Policy("kvzap_mlp", scorer, Threshold(window=args.window))
    pool = make_samples(args.task, tokenizer, args.n_train + args.n_heldout, args.context_tokens, seed=args.seed)
    train, heldout = list(range(args.n_train)), list(range(args.n_train, len(pool)))
    venv = KVEvictionVectorEnv(args.population, model, tokenizer, samples=pool, policy=policy, action_type="threshold",
                               memory_weight=args.memory_weight)
    start_reward = evaluate_taus(venv, np.full((args.population, *venv.single_action_space.shape), args.tau0), train).reward[0]
    mu, history = cem(venv, train, args.tau0, args.iterations, seed=args.seed)
    learned_train = evaluate_taus(venv, np.broadcast_to(mu, (args.population, *mu.shape)), train).row(0)
    learned = evaluate_taus(venv, np.broadcast_to(mu, (args.population, *mu.shape)), heldout).row(0)
    bracket = uniform_bracket(venv, learned["compression"], heldout)
    uniform = interpolate(bracket, learned["compression"])
    venv.close()

    for h in history:
        print(f"iter {h['iteration']:>2}  mu reward {h['mu_reward']:+.4f}  best {h['best_reward']:+.4f}  "
              f"compression {h['mu_compression']:.3f}")
    print(f"train reward: start (uniform tau={args.tau0}) {start_reward:+.4f} -> learned {learned_train['reward']:+.4f}")
    print("learned tau [layers x kv_heads]:\n" + np.array2string(mu, precision=2))
    print(f"held-out ({len(heldout)} samples)      reward   accuracy  KL      oracle kept  compression")
    rows = [("learned per-head tau", learned)] + [(f"uniform tau={tau:+.2f}", s) for tau, s in bracket]
    for name, s in rows + [("uniform, interpolated", uniform)]:
        print(f"  {name:<26} {s['reward']:+.4f}  {s['accuracy']:.3f}     {s['kl']:.4f}  {s['oracle_mass_retained']:.4f}       "
              f"{s['compression']:.3f}")
    verdict = "beats" if learned["reward"] > uniform["reward"] else "does not beat"
    print(f"learned thresholds {verdict} the uniform tau at equal compression on held-out reward "
          f"({time.perf_counter() - started:.0f} s)")
    result = {"start_reward": float(start_reward), "learned_train": learned_train, "learned_heldout": learned,
              "uniform_heldout": uniform, "uniform_bracket": bracket, "tau": mu.tolist(), "history": history}
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
