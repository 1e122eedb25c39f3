"""REINFORCE on the KVzap-MLP scorer in the vector env: keep a pair with probability sigma((s - tau) / T), learn from the
episode reward with a leave-one-out baseline, start from the supervised scorer.

    OMP_NUM_THREADS=1 python examples/reinforce_scorer.py --checkpoint DIR [--iterations 30] [--episodes 8] [--json]

One file, read top to bottom (CleanRL style): a typed :class:`Args`, then the algorithm in :func:`train`, then the
held-out comparison in :func:`evaluate_scorers`. Each iteration plays ``--episodes`` episodes of one training sample
at once, one per row of ``KVEvictionVectorEnv`` (the same sample in every row): at every step the candidates'
hidden states (``obs["hidden"]``) go through the scorer's MLP, each candidate is kept with probability
``sigma((s - tau) / T)`` (sampled), and the log-probability of the decisions is summed per row. The return of
row ``i`` is its episode reward ``R_i``; its baseline is the mean of the other rows' returns (leave one out), and
the loss ``-mean_i (R_i - b_i) * sum_t log pi_i,t`` is minimised with Adam. At ``T -> 0`` the policy is the
scorer's own hard threshold at ``tau``, which is what evaluation runs.

The result is an ordinary scorer checkpoint (the scorer class's own ``save``) that ``evaluate``, the envs and the
study load unchanged. Without ``--checkpoint`` a supervised scorer is first fitted (as ``learn_thresholds.py``
does) and saved beside the result. The held-out comparison runs the supervised and the learned scorer at tau and
around it (``--eval-tau-offsets``; greedy decoding: accuracy, compression, reward): compare them at equal
compression, not at equal tau (the learned scores may shift). ``--json`` ends with the result as one line.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kvzap_lab.envs import KVEvictionVectorEnv, PolicyAgent
from kvzap_lab.envs.config import shared_model
from kvzap_lab.policies.kvzap_mlp import KVzapMLP
from kvzap_lab.policy import Policy, Threshold
from kvzap_lab.tasks import make_samples


@dataclass
class Args:
    checkpoint: str | None = None
    """a supervised KVzap-MLP scorer directory (python -m kvzap_lab.train); None: fit one (script use only)"""
    out: str = "results/rl/reinforce"
    """where the learned scorer is saved (an ordinary scorer checkpoint)"""
    model: str = "testbed"
    task: str = "single_needle"
    context_tokens: int = 256
    n_train: int = 8
    """training samples (seed ``seed``); held-out samples come after them"""
    n_heldout: int = 16
    iterations: int = 30
    """policy-gradient updates; each plays ``episodes`` episodes of one training sample"""
    episodes: int = 8
    """episodes per update (vector env rows, same sample): the leave-one-out baseline needs >= 2"""
    tau: float = -6.0
    """threshold on the scorer's log-score: keep probability sigma((s - tau) / temperature)"""
    temperature: float = 1.0
    learning_rate: float = 3e-4
    window: int = 32
    sinks: int = 4
    chunk_size: int = 64
    memory_weight: float = 1.0
    fidelity_weight: float = 1.0
    oracle_weight: float = 1.0
    eval_tau_offsets: str = "-1,0,1"
    """held-out evaluation at tau plus each of these offsets (comma-separated): accuracy against compression"""
    seed: int = 0
    progress: bool = True


def mlp_scores(weights: list[tuple[torch.Tensor, torch.Tensor]], hidden: torch.Tensor) -> torch.Tensor:
    """The KVzap-MLP's log-scores, differentiable in ``weights`` (``(W [L, out, in], b [L, out])`` per map, GELU
    between maps): ``hidden [N, L, C, D]`` -> ``[N, L, H, C]``."""
    x = hidden
    for i, (W, b) in enumerate(weights):
        x = torch.einsum("nlci,loi->nlco", F.gelu(x) if i else x, W) + b[None, :, None, :]
    return x.transpose(2, 3)


def make_env(args: Args, num_envs: int, samples, decoding: str = "teacher", policy: Policy | None = None) -> KVEvictionVectorEnv:
    model, tokenizer = shared_model(args.model)
    return KVEvictionVectorEnv(
        num_envs, model, tokenizer, samples=samples, policy=policy, window=None if policy else args.window,
        sinks=None if policy else args.sinks, chunk_size=args.chunk_size, decoding=decoding, hidden_bound=1e4,
        oracle_weight=args.oracle_weight, fidelity_weight=args.fidelity_weight, memory_weight=args.memory_weight,
    )


def train(args: Args, scorer: KVzapMLP | None = None) -> KVzapMLP:
    """REINFORCE with a leave-one-out baseline from the supervised ``scorer`` (default: ``args.checkpoint``);
    returns the learned scorer (also saved to ``args.out``)."""
    if args.episodes < 2 or args.iterations < 1 or not args.temperature > 0 or not math.isfinite(args.tau):
        raise ValueError(f"need episodes >= 2, iterations >= 1, temperature > 0 and a finite tau; got {args}")
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    model, tokenizer = shared_model(args.model)
    if scorer is None:
        scorer = KVzapMLP.load(args.checkpoint, model=model)
    weights = [(W.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()) for W, b in scorer.weights_]
    probe = torch.randn(3, len(weights[0][0]), 1, weights[0][0].shape[2])  # [N, L, C=1, D]
    expected = torch.as_tensor(scorer.predict(probe[:, :, 0].numpy()))  # [N, L, H]
    if not torch.allclose(mlp_scores(weights, probe)[..., 0].detach(), expected, atol=1e-4):
        raise RuntimeError("mlp_scores does not reproduce KVzapMLP.predict: the scorer's weight layout changed")
    optimizer = torch.optim.Adam([p for pair in weights for p in pair], lr=args.learning_rate)

    pool = make_samples(args.task, tokenizer, args.n_train, args.context_tokens, seed=args.seed)
    env = make_env(args, args.episodes, pool)
    env.reset(seed=args.seed)  # prepares every sample's reference
    rng = np.random.default_rng(args.seed)
    for iteration in tqdm(range(args.iterations), desc="REINFORCE", disable=not args.progress):
        obs, _ = env.reset(options={"sample": int(rng.integers(len(pool)))})
        log_prob = torch.zeros(args.episodes)
        returns, done = np.zeros(args.episodes), np.zeros(args.episodes, dtype=bool)
        while not done.all():
            hidden = torch.from_numpy(obs["hidden"])  # [N, L, C, D]
            mask = torch.from_numpy(obs["candidate_mask"]).bool()[:, None, None, :]  # [N, 1, 1, C]
            keep_prob = torch.sigmoid((mlp_scores(weights, hidden) - args.tau) / args.temperature)
            keep = torch.bernoulli(keep_prob.detach(), generator=None)
            chosen = torch.where(keep.bool(), keep_prob, 1 - keep_prob).clamp_min(1e-12).log()
            log_prob = log_prob + (chosen * mask).sum((1, 2, 3)) * torch.from_numpy(~done)
            obs, reward, terminated, _, info = env.step(keep.to(torch.int8).numpy())
            returns += np.where(done, 0.0, reward)
            done |= terminated
        advantage = torch.from_numpy(returns - (returns.sum() - returns) / (args.episodes - 1)).float()
        loss = -(advantage * log_prob).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if args.progress:
            tqdm.write(f"iter {iteration:>3}  mean return {returns.mean():+.4f}  spread {np.ptp(returns):.4f}")
    env.close()

    learned = KVzapMLP(**scorer.get_params())
    learned.trained_for_ = dict(scorer.trained_for_)
    learned.weights_ = [(W.detach().contiguous(), b.detach().contiguous()) for W, b in weights]
    learned.save(args.out)
    return learned


def evaluate_scorers(args: Args, scorers: dict[str, KVzapMLP]) -> list[dict]:
    """Held-out samples (after the training ones, same seed), greedy decoding, each scorer's hard threshold at
    ``args.tau`` plus each of ``args.eval_tau_offsets`` through :class:`PolicyAgent`: one row per (scorer, tau)
    with the mean reward, accuracy, compression and oracle mass retained."""
    model, tokenizer = shared_model(args.model)
    pool = make_samples(args.task, tokenizer, args.n_train + args.n_heldout, args.context_tokens, seed=args.seed)[args.n_train :]
    rows = []
    for name, scorer in scorers.items():
        for offset in (float(x) for x in args.eval_tau_offsets.split(",")):
            policy = Policy(name, scorer, Threshold(tau=args.tau + offset, window=args.window, sinks=args.sinks))
            agent, env = PolicyAgent(policy), make_env(args, len(pool), pool, decoding="greedy", policy=policy)
            obs, _ = env.reset(options={"sample": list(range(len(pool)))})  # one row per held-out sample
            totals = {"reward": 0.0, "accuracy": 0.0, "compression": 0.0, "oracle_mass_retained": 0.0}
            done = np.zeros(len(pool), dtype=bool)
            while not done.all():
                obs, reward, terminated, _, info = env.step(agent.act(obs))
                totals["reward"] += float(reward[~done].sum())
                ending = terminated & ~done
                if ending.any():  # the vector env's infos carry "accuracy" only on steps where a row ends
                    for key in ("accuracy", "compression", "oracle_mass_retained"):
                        totals[key] += float(info[key][ending].sum())
                done |= terminated
            env.close()
            rows.append({"scorer": name, "tau": args.tau + offset} | {k: v / len(pool) for k, v in totals.items()})
    return rows


def parse_args(argv=None) -> tuple[Args, bool]:
    """Every :class:`Args` field as a flag (``--n-train 8``, ``--no-progress``), and ``--json``: ``(args, json)``."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for field, default in asdict(Args()).items():
        kind = type(default) if default is not None else str
        if kind is bool:
            parser.add_argument(f"--{field.replace('_', '-')}", action=argparse.BooleanOptionalAction, default=default)
        else:
            parser.add_argument(f"--{field.replace('_', '-')}", type=kind, default=default)
    parser.add_argument("--json", action="store_true")
    parsed = vars(parser.parse_args(argv))
    as_json = parsed.pop("json")
    return Args(**parsed), as_json


def main(argv=None) -> int:
    args, as_json = parse_args(argv)
    started = time.perf_counter()
    model, tokenizer = shared_model(args.model)
    if args.checkpoint is None:  # a supervised start, fitted as learn_thresholds.py does, saved as a checkpoint
        from learn_thresholds import quick_mlp_scorer  # this script's folder is on sys.path

        supervised = quick_mlp_scorer(model, tokenizer, args.task, 32, args.context_tokens, seed=args.seed + 1000)
        args.checkpoint = str(Path(args.out).with_name(Path(args.out).name + "-supervised"))
        supervised.save(args.checkpoint)
    supervised = KVzapMLP.load(args.checkpoint, model=model)
    learned = train(args, supervised)
    result = {"args": asdict(args), "heldout": evaluate_scorers(args, {"supervised": supervised, "rl": learned}),
              "seconds": round(time.perf_counter() - started, 1)}
    print(f"held-out ({args.n_heldout} samples, greedy)  tau     reward   accuracy  compression  oracle kept")
    for s in result["heldout"]:
        print(f"  {s['scorer']:<12} {s['tau']:+6.2f}  {s['reward']:+.4f}  {s['accuracy']:.3f}     {s['compression']:.3f}        "
              f"{s['oracle_mass_retained']:.4f}")
    print(f"learned scorer saved to {args.out} ({result['seconds']} s)")
    if as_json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
