"""The batched vector env: ``N`` episodes through one model forward per step, with ``NEXT_STEP`` autoreset."""

from __future__ import annotations

import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space
from torch import nn

from kvzap_lab.envs.config import configure
from kvzap_lab.envs.kv_eviction import check_action, check_seed, env_spaces, keep_flags, sample_option
from kvzap_lab.envs.references import sample_key
from kvzap_lab.envs.rollout import Rollout


class KVEvictionVectorEnv(VectorEnv):
    """``num_envs`` episodes of :class:`~kvzap_lab.envs.kv_eviction.KVEvictionEnv` (same options, spaces per row)
    through one batched model forward per step.

    A row whose episode terminated at step ``t`` starts a new sample at step ``t + 1`` (its action is ignored, its
    reward is 0) while the other rows go on; rows in different phases share the forward with left padding inside
    the step. Every sample's reference is prepared (batched) at the first ``reset``. With ``evict_every > 1``, a
    row's prefill chunk is an eviction point for every row (the engine evicts after every multi-token forward).
    """

    metadata = {"autoreset_mode": AutoresetMode.NEXT_STEP, "render_modes": []}

    def __init__(self, num_envs: int = 1, model: str | nn.Module = "testbed", tokenizer=None, **options):
        if not isinstance(num_envs, (int, np.integer)) or isinstance(num_envs, bool) or num_envs < 1:
            raise ValueError(f"num_envs must be an int >= 1; got {num_envs!r}")
        self.num_envs = int(num_envs)
        self.config = configure(model, tokenizer, **options)
        self.single_observation_space, self.single_action_space = env_spaces(self.config)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self.rollout = Rollout(self.config, self.num_envs)
        self._autoreset = np.zeros(self.num_envs, dtype=bool)
        self._sample_index = np.zeros(self.num_envs, dtype=np.int64)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        check_seed(seed)
        super().reset(seed=seed)
        pool = self.config.samples
        picks = sample_option(options, len(pool), self.num_envs)
        if picks is None:
            picks = self.np_random.integers(len(pool), size=self.num_envs).tolist()
        self.config.references.get(pool)  # every sample of the pool, batched: autoresets then need no oracle pass
        rows = self.rollout
        rows.start()
        for i, k in enumerate(picks):
            rows.begin(i, pool[k], self.config.references.entries[sample_key(pool[k])])
        self._sample_index[:] = picks
        rows.forward()
        self._autoreset[:] = False
        kept = rows.kept()
        infos = {}
        for i in range(self.num_envs):
            infos = self._add_info(infos, rows.info(i, kept[i], None) | {"sample": int(picks[i])}, i)
        return rows.observe(kept), infos

    def step(self, actions):
        rows = self.rollout
        if rows.run is None:
            raise RuntimeError("call reset() before step()")
        actions = check_action(actions, self.config, self.single_action_space, self.num_envs)
        pool = self.config.samples
        restarting = np.flatnonzero(self._autoreset).tolist()
        for i in restarting:
            k = int(self.np_random.integers(len(pool)))
            rows.begin(i, pool[k], self.config.references.entries[sample_key(pool[k])])
            self._sample_index[i] = k
        deciding = [i for i in range(self.num_envs) if i not in restarting]
        rewards, row_infos, obs = rows.step(keep_flags(actions, rows, deciding), deciding)
        terminations = np.array([rows.episodes[i].done for i in range(self.num_envs)])
        terminations[restarting] = False
        rewards[restarting] = 0.0
        self._autoreset = terminations.copy()
        infos = {}
        for i, info in enumerate(row_infos):
            infos = self._add_info(infos, info | {"sample": int(self._sample_index[i])}, i)
        return obs, rewards, terminations, np.zeros(self.num_envs, dtype=bool), infos

    def close_extras(self, **kwargs):
        self.rollout.close()


def make_vector_env(num_envs: int = 1, **kwargs) -> KVEvictionVectorEnv:
    """Vector entry point of both env ids (``gymnasium.make_vec(id, num_envs=N, vectorization_mode=
    "vector_entry_point")``); ``max_episode_steps`` is refused (episodes end by themselves)."""
    if kwargs.pop("max_episode_steps", None) is not None:
        raise ValueError("KVEviction episodes end by themselves: max_episode_steps is not supported")
    if kwargs.pop("render_mode", None) is not None:
        raise ValueError("the vector env does not render: render a single KVEvictionEnv (render_mode='ansi')")
    return KVEvictionVectorEnv(num_envs, **kwargs)
