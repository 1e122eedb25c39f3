"""Any registered policy with a threshold rule, acting in ``KVEviction-v0``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvzap_lab.envs.config import SCORE_BOUND
from kvzap_lab.policy import Policy, Threshold, get_policy


@dataclass
class PolicyAgent:
    """Any policy with a threshold rule, acting in ``KVEviction-v0``: keep a candidate iff ``rule.keep`` keeps its
    score (``obs["scores"]``, so make the env with the same policy: ``gym.make(id, policy=agent.policy)``).

    Decisions in the env are final when a pair leaves the window, which is exactly what a
    :class:`~kvzap_lab.policy.Threshold` rule does in the engine (a kept pair's score never drops below tau, also
    when attention accumulates on it). Budget rules (``TopK``) re-decide held pairs at every step and are refused.
    """

    policy: Policy | str

    def __post_init__(self):
        if isinstance(self.policy, str):
            self.policy = get_policy(self.policy)
        rule = self.policy.rule
        if not isinstance(rule, Threshold):
            raise ValueError(
                f"policy {self.policy.name!r} has a {type(rule).__name__} rule, which re-decides held pairs at every "
                "step; env decisions are final when a pair leaves the window: give it a Threshold rule "
                "(kvzap_lab.policy.calibrate picks tau for a target compression)"
            )
        if np.abs(np.asarray(rule.tau, dtype=np.float64)).max() >= SCORE_BOUND:
            raise ValueError(f"the env clips scores to +-{SCORE_BOUND:g}: thresholds must lie strictly inside; got {rule.tau}")

    def act(self, obs: dict) -> np.ndarray:
        """Keep flags ``int8 [L, H, C]`` for one observation, or ``[N, L, H, C]`` for a batched one."""
        if "scores" not in obs:
            raise ValueError("the observation has no 'scores': make the env with policy=agent.policy")
        scores = torch.from_numpy(np.asarray(obs["scores"]))
        batched = scores.dim() == 4
        scores = scores if batched else scores[None]
        mask = torch.from_numpy(np.asarray(obs["candidate_mask"])).bool()
        mask = mask if batched else mask[None]
        valid = mask[:, None, :].expand(-1, scores.shape[2], -1)
        keep = torch.stack([self.policy.rule.keep(scores[:, layer], layer, valid) for layer in range(scores.shape[1])], 1)
        keep = (keep | ~valid[:, None]).numpy().astype(np.int8)
        return keep if batched else keep[0]
