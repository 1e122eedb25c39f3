"""Stable-Baselines3 PPO on ``KVEvictionThreshold-v0``: a threshold per layer and KV head at every step, learned from
the env reward, unmodified SB3 (``pip install -e .[rl]``).

    OMP_NUM_THREADS=1 python examples/sb3_thresholds.py [--total-timesteps 4096] [--n-envs 4] [--json]

The env is made with ``observation="compact"`` (the scorer's scores, positions, occupancy, progress: no hidden
states) and ``threshold_range=(--tau-low, --tau-high)``, wrapped in ``FlattenObservation`` (SB3 wants 1-D
observations) and ``RescaleAction`` (PPO's actions in [-1, 1] map onto that range). ``--n-envs`` envs made by name share one loaded model. After training, PPO's
deterministic thresholds are compared on held-out samples (greedy decoding) with a uniform threshold
``--tau-baseline`` applied by the same env: mean reward, accuracy, compression, oracle mass retained.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass

import gymnasium as gym
import numpy as np
from gymnasium.wrappers import FlattenObservation, RescaleAction
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.vec_env import DummyVecEnv
from tqdm.auto import tqdm

import kvzap_lab  # noqa: F401  registers the env ids
from kvzap_lab.envs.config import shared_model
from kvzap_lab.tasks import make_samples


@dataclass
class Args:
    model: str = "testbed"
    policy: str = "oracle"
    """the scorer whose scores are thresholded (a trained one needs --checkpoint)"""
    checkpoint: str | None = None
    task: str = "single_needle"
    context_tokens: int = 256
    n_train: int = 8
    n_heldout: int = 16
    total_timesteps: int = 4096
    n_envs: int = 4
    n_steps: int = 128
    """PPO rollout length per env"""
    learning_rate: float = 3e-4
    tau_low: float = -12.0
    tau_high: float = 0.0
    tau_baseline: float = -6.0
    window: int = 32
    memory_weight: float = 1.0
    seed: int = 0
    out: str = "results/rl/sb3_thresholds.zip"
    progress: bool = True


def make_env(args: Args, samples, decoding: str = "teacher") -> gym.Env:
    env = gym.make(
        "kvzap_lab/KVEvictionThreshold-v0", model=args.model, samples=samples, policy=args.policy,
        checkpoint=args.checkpoint, window=args.window, observation="compact", decoding=decoding,
        threshold_range=(args.tau_low, args.tau_high), memory_weight=args.memory_weight,
    )
    one = np.ones(env.action_space.shape, np.float32)
    return RescaleAction(FlattenObservation(env), -one, one)


class Progress(BaseCallback):
    """A tqdm bar over the timesteps, with the mean return of the episodes finished since the last update."""

    def __init__(self, total: int, enabled: bool):
        super().__init__()
        self.bar, self.returns, self.current = tqdm(total=total, desc="PPO", disable=not enabled), [], None

    def _on_step(self) -> bool:
        rewards, dones = self.locals["rewards"], self.locals["dones"]
        self.current = rewards.copy() if self.current is None else self.current + rewards
        self.returns += self.current[dones].tolist()
        self.current[dones] = 0.0
        self.bar.update(len(rewards))
        if self.returns:
            self.bar.set_postfix(mean_return=f"{np.mean(self.returns[-16:]):+.3f}")
        return True

    def _on_training_end(self) -> None:
        self.bar.close()


def train(args: Args) -> PPO:
    """PPO on ``--n-envs`` threshold envs over the training samples; returns the trained model (saved to ``out``)."""
    _, tokenizer = shared_model(args.model)
    pool = make_samples(args.task, tokenizer, args.n_train, args.context_tokens, seed=args.seed)
    venv = DummyVecEnv([lambda: make_env(args, pool) for _ in range(args.n_envs)])
    venv.seed(args.seed)
    agent = PPO("MlpPolicy", venv, n_steps=args.n_steps, batch_size=args.n_steps, learning_rate=args.learning_rate,
                seed=args.seed, verbose=0)
    agent.set_logger(Logger(folder=None, output_formats=[]))  # the bar reports; SB3's default makes a temp folder per run
    agent.learn(total_timesteps=args.total_timesteps, callback=Progress(args.total_timesteps, args.progress))
    agent.save(args.out)
    venv.close()
    return agent


def evaluate(args: Args, act) -> dict:
    """Held-out samples (after the training ones, same seed), greedy decoding; ``act(obs) -> action in [-1, 1]``."""
    _, tokenizer = shared_model(args.model)
    pool = make_samples(args.task, tokenizer, args.n_train + args.n_heldout, args.context_tokens, seed=args.seed)[args.n_train :]
    env = make_env(args, pool, decoding="greedy")
    totals = {"reward": 0.0, "accuracy": 0.0, "compression": 0.0, "oracle_mass_retained": 0.0}
    for k in range(len(pool)):
        obs, _ = env.reset(options={"sample": k})
        done = False
        while not done:
            obs, reward, done, _, info = env.step(act(obs))
            totals["reward"] += reward
        for key in ("accuracy", "compression", "oracle_mass_retained"):
            totals[key] += info[key]
    env.close()
    return {k: v / len(pool) for k, v in totals.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for field, default in asdict(Args()).items():
        if isinstance(default, bool):
            parser.add_argument(f"--{field.replace('_', '-')}", action=argparse.BooleanOptionalAction, default=default)
        else:
            parser.add_argument(f"--{field.replace('_', '-')}", type=type(default) if default is not None else str, default=default)
    parser.add_argument("--json", action="store_true")
    parsed = vars(parser.parse_args(argv))
    as_json = parsed.pop("json")
    args = Args(**parsed)
    started = time.perf_counter()
    agent = train(args)
    uniform = 2 * (args.tau_baseline - args.tau_low) / (args.tau_high - args.tau_low) - 1  # in RescaleAction's [-1, 1]
    shape = make_env(args, make_samples(args.task, shared_model(args.model)[1], 1, args.context_tokens, 0)).action_space.shape
    result = {
        "ppo": evaluate(args, lambda obs: agent.predict(obs, deterministic=True)[0]),
        f"uniform tau={args.tau_baseline:g}": evaluate(args, lambda obs: np.full(shape, uniform, np.float32)),
        "seconds": None,
    }
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(f"held-out ({args.n_heldout} samples, greedy)   reward   accuracy  compression  oracle kept")
    for name, s in result.items():
        if isinstance(s, dict):
            print(f"  {name:<22} {s['reward']:+.4f}  {s['accuracy']:.3f}     {s['compression']:.3f}        {s['oracle_mass_retained']:.4f}")
    print(f"PPO saved to {args.out} ({result['seconds']} s)")
    if as_json:
        print(json.dumps(result | {"args": asdict(args)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
