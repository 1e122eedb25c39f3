"""KV-cache eviction as a Gymnasium environment over the real decode loop, rewarded against the KVzip+ oracle.

The env is a thin adapter over the engine: :class:`~kvzap_lab.engine.EvictionRun` with an
:class:`~kvzap_lab.engine.Offer` finds, at its eviction points, the pairs that left the sliding window and evicts
the ones the agent drops (:mod:`kvzap_lab.envs.rollout` feeds the tokens and keeps the score). Other modules:
:mod:`~kvzap_lab.envs.config` (options), :mod:`~kvzap_lab.envs.references` (oracle tables and full-cache
log-probs), :mod:`~kvzap_lab.envs.vector` (the batched vector env), :mod:`~kvzap_lab.envs.agent` (any threshold
policy as an agent).
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from torch import Tensor, nn

from kvzap_lab.envs.config import SCORE_BOUND, EnvConfig, configure
from kvzap_lab.envs.rollout import Rollout
from kvzap_lab.model import describe
from kvzap_lab.policy import Threshold


def env_spaces(config: EnvConfig) -> tuple[spaces.Dict, spaces.Space]:
    """The observation and action spaces of one env (see :class:`KVEvictionEnv`)."""
    spec = describe(config.model)
    L, H, C, D, bound = spec.n_layers, spec.n_kv_heads, config.max_candidates, spec.hidden_size, config.hidden_bound
    obs = {
        "candidate_mask": spaces.Box(0.0, 1.0, (C,), np.float32),
        "positions": spaces.Box(0.0, 1.0, (C,), np.float32),
        "occupancy": spaces.Box(0.0, 1.0, (L, H), np.float32),
        "progress": spaces.Box(0.0, 1.0, (1,), np.float32),
    }
    if config.observation == "full":
        obs["hidden"] = spaces.Box(-bound, bound, (L, C, D), np.float32)
    if config.policy is not None:
        obs["scores"] = spaces.Box(-SCORE_BOUND, SCORE_BOUND, (L, H, C), np.float32)
    if config.action_type == "threshold":
        action = spaces.Box(*config.threshold_range, (L, H), np.float32)
    else:
        action = spaces.MultiBinary(L * H * C) if config.flat_actions else spaces.MultiBinary([L, H, C])
    return spaces.Dict(obs), action


def check_action(action, config: EnvConfig, space: spaces.Space, batch: int | None) -> np.ndarray:
    """One action (``batch=None``) or ``batch`` actions as a numpy array: keep flags (bool) ``[.., L, H, C]`` or
    thresholds (float32) ``[.., L, H]``; a clear error for a wrong shape, dtype or value."""
    expected = space.shape if batch is None else (batch, *space.shape)
    if isinstance(action, Tensor):
        action = action.detach().cpu().numpy()
    action = np.asarray(action)
    if action.shape != tuple(expected):
        what = "thresholds [layers, kv_heads]" if config.action_type == "threshold" else (
            "keep flags [layers * kv_heads * max_candidates]" if config.flat_actions else "keep flags [layers, kv_heads, max_candidates]")
        raise ValueError(f"action must have shape {tuple(expected)} ({what}); got {action.shape}")
    if config.action_type == "binary":
        if not (action.dtype == np.bool_ or np.issubdtype(action.dtype, np.integer) or np.issubdtype(action.dtype, np.floating)):
            raise TypeError(f"a keep/evict action is an array of 0/1 (MultiBinary: int8; bool and float 0.0/1.0 work too); got dtype {action.dtype}")
        if action.dtype != np.bool_ and (
            action.min() < 0 or action.max() > 1 or (action.dtype.kind == "f" and not ((action == 0) | (action == 1)).all())
        ):
            raise ValueError("a keep/evict action holds only 0 (evict) and 1 (keep)")
        return action.astype(bool)
    if not np.issubdtype(action.dtype, np.floating):
        raise TypeError(f"a threshold action is a float array (Box, float32); got dtype {action.dtype}")
    low, high = config.threshold_range
    if np.isnan(action).any() or action.min() < low or action.max() > high:
        raise ValueError(f"threshold actions are finite log-score thresholds in [{low:g}, {high:g}]")
    return action.astype(np.float32)


def keep_flags(actions: np.ndarray, rollout: Rollout, rows: list[int]) -> np.ndarray:
    """Keep flags ``[N, L, H, C]`` of checked ``actions`` (one per row): binary flags as they are (unflattened), or
    the candidates whose stored score reaches the row's thresholds, through :class:`Threshold`."""
    r, config = rollout, rollout.c
    if config.action_type == "binary":
        return actions.reshape(r.n, r.L, r.H, r.C)
    keep = np.ones((r.n, r.L, r.H, r.C), dtype=bool)
    for i in rows:
        rule = Threshold(tau=actions[i].tolist(), window=config.window, sinks=config.sinks)
        scores = r.candidate_scores(i)  # [L, H, C]
        valid = ~torch.isnan(scores)
        for layer in range(r.L):
            keep[i, layer] = rule.keep(scores[layer][None].nan_to_num(0.0), layer, valid[layer][None])[0].numpy()
    return keep


def check_seed(seed) -> None:
    if seed is not None and (not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or not 0 <= seed < 2**128):
        raise ValueError(f"seed must be an int in [0, 2**128) or None; got {seed!r}")


def sample_option(options, n_pool: int, n: int | None) -> list[int] | None:
    """The sample indices of ``reset(options={"sample": k or [k, ...]})`` (one per row), or ``None``."""
    if not options or "sample" not in options:
        return None
    unknown = set(options) - {"sample"}
    if unknown:
        raise ValueError(f"unknown reset options {sorted(unknown)}; the env takes options={{'sample': index}}")
    picks = options["sample"]
    picks = [picks] * (n or 1) if np.isscalar(picks) else list(picks)
    if len(picks) != (n or 1):
        raise ValueError(f"options['sample'] must be one index or {n} indices; got {len(picks)}")
    for k in picks:
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 0 <= k < n_pool:
            raise ValueError(f"options['sample'] must be sample indices in [0, {n_pool}); got {k!r}")
    return [int(k) for k in picks]


class KVEvictionEnv(gym.Env):
    """Keep or evict the KV pairs leaving the sliding window, one model forward per step.

    ## Description
    An episode is one task sample (:func:`kvzap_lab.tasks.make_samples`) or one text window
    (:func:`kvzap_lab.envs.references.text_window_samples`). The prompt is prefilled in chunks of ``chunk_size``
    tokens, then the answer is decoded one token per forward: teacher-forced on the reference answer
    (``decoding="teacher"``, episodes comparable across policies) or greedily (``"greedy"``: the model's own tokens,
    stopping at the end token, at the answer's length or, on exact-match tasks, at the first wrong token, as
    :mod:`kvzap_lab.evaluate` does). Every forward runs in the eviction engine with the real compacted cache. At
    its eviction points (after every prefill chunk and every ``evict_every`` decode steps) the engine offers the
    pairs that left the window (``window`` most recent tokens) since the previous point, sinks (``sinks`` first
    tokens) excepted: the step's **candidates**, at most ``max_candidates`` positions, the same in every layer and
    KV head. Each is decided once (DMS/KVzap semantics); evicted pairs leave the attention at once.

    Step ``t``: ``step(action)`` applies the decisions to the current candidates, runs the next forward and
    returns the candidates it produced.

    ## Action Space
    ``KVEviction-v0``: ``MultiBinary([L, H, C])`` keep flags (1 = keep; slots beyond the candidates are ignored),
    or ``MultiBinary(L * H * C)`` with ``flat_actions=True`` (Stable-Baselines3 wants 1-D); int, bool or float
    0/1 arrays are accepted. ``KVEvictionThreshold-v0``: thresholds ``Box(low, high, [L, H])`` (``threshold_range``,
    default +-1000; wrap with ``gymnasium.wrappers.RescaleAction`` for [-1, 1] agents): a candidate is kept iff the
    ``policy``'s stored score of it is ``>= tau[l, h]`` (:class:`~kvzap_lab.policy.Threshold`).
    ``L`` layers, ``H`` KV heads, ``C = max_candidates``, ``D`` hidden size.

    ## Observation Space
    A ``Dict`` of float32 ``Box`` es, candidates in position order, unused slots zero:

    - ``candidate_mask [C]``: 1 for a real candidate;
    - ``positions [C]``: candidate position / ``T`` (``T`` = prompt + answer - 1 tokens fed), in [0, 1);
    - ``occupancy [L, H]``: pairs held / tokens seen;  ``progress [1]``: tokens fed / ``T``;
    - ``hidden [L, C, D]`` (``observation="full"``, the default): hidden state entering each attention layer at each
      candidate (what a KVzap scorer reads), clipped to ``+-hidden_bound``. ``observation="compact"`` leaves it
      out (it is ``L * C * D`` floats: ~38 MB per step at 8 B scale);
    - ``scores [L, H, C]`` (with a ``policy``): its scorer's stored scores of the candidates, clipped to +-1000.

    ## Rewards
    With ``w_o, w_f, w_m`` = ``oracle_weight, fidelity_weight, memory_weight``::

        r_t = - w_o * sum_{(l,h,p) evicted at t} s[l,h,p] / Z                       (oracle term)
              - w_f * sum_{j predicted by the forward of t} KL(P_full,j || P_comp,j) / A   (fidelity term)
              - w_m * (pairs kept at t) / (L * H * T)                              (memory term)

    ``s = exp(log KVzip+)`` is the oracle importance of each context pair (template, question and answer pairs
    weigh 0), ``Z`` its sum over the sample's context, ``A`` the answer length, ``P_full,j`` / ``P_comp,j`` the
    next-token distributions of a full / the compressed cache at answer position ``j`` (in greedy mode only while
    the generated tokens equal the reference). The final step also pays ``- w_m * (pairs held never offered) /
    (L * H * T)``, so an episode sums to ``- w_o * (oracle mass lost) - w_f * mean KL - w_m * (pairs held at the
    end) / (L * H * T)`` (under teacher forcing the memory term is ``- w_m * (1 - compression)``).

    ## Episode End
    The episode terminates with the step that decides the candidates of the last forward; there is no truncation.
    ``info`` carries ``compression``, ``kl`` (mean so far), ``oracle_mass_retained``, ``phase``, the step's reward
    ``terms``, and at the end ``accuracy`` (:func:`kvzap_lab.tasks.score_answer`), ``token_accuracy``, ``answer_ids``.

    ## Arguments
    ``gym.make("kvzap_lab/KVEviction-v0", model="testbed", **options)``: ``model`` is a name (loaded once per
    process and shared by every env that names it) or a loaded model with ``tokenizer=``; several envs may share
    one model (they take turns on it; between steps the model carries the hooks of the env that stepped last:
    ``kvzap_lab.engine.release(model)`` before using it plainly). Options (:func:`kvzap_lab.envs.config.configure`): the sample pool
    (``samples=`` or ``task``, ``n_samples``, ``context_tokens``, ``sample_seed``), ``policy`` (a name or a
    :class:`~kvzap_lab.policy.Policy`; ``checkpoint=`` for a trained scorer), ``window``, ``sinks``,
    ``chunk_size`` (64), ``evict_every`` (1), ``compact_every``, ``max_candidates`` (default
    ``max(chunk_size, evict_every)``), ``decoding``, ``action_type``, ``observation``, ``flat_actions``,
    ``threshold_range``, the reward weights, ``hidden_bound``, ``device``, ``reference_cache`` (share oracle
    references between envs), ``render_mode`` (``"ansi"``).

    ``reset(seed=s)`` draws a sample with the env's seeded generator; ``options={"sample": k}`` picks sample ``k``.
    The oracle table and full-cache log-probs of a sample are computed at the first reset that draws it, then cached.
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(self, model: str | nn.Module = "testbed", tokenizer=None, render_mode: str | None = None, **options):
        if render_mode not in (None, *self.metadata["render_modes"]):
            raise ValueError(f"render_mode must be None or one of {self.metadata['render_modes']}; got {render_mode!r}")
        self.render_mode = render_mode
        self.config = configure(model, tokenizer, **options)
        self.observation_space, self.action_space = env_spaces(self.config)
        self.rollout = Rollout(self.config, 1)
        self._sample = None

    @property
    def episode(self):
        """The current :class:`~kvzap_lab.envs.rollout.Episode` (sample, tokens fed, predictions, ...)."""
        return self.rollout.episodes[0]

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        check_seed(seed)
        super().reset(seed=seed)
        pool = self.config.samples
        picked = sample_option(options, len(pool), None)
        self._sample = picked[0] if picked else int(self.np_random.integers(len(pool)))
        (reference,) = self.config.references.get([pool[self._sample]])
        self.rollout.start()
        self.rollout.begin(0, pool[self._sample], reference)
        self.rollout.forward()
        obs = {k: v[0] for k, v in self.rollout.observe().items()}
        return obs, self.rollout.info(0, self.rollout.kept()[0], None) | {"sample": self._sample}

    def step(self, action):
        if self.episode is None:
            raise RuntimeError("call reset() before step()")
        if self.episode.done:
            raise RuntimeError("the episode is over (terminated): call reset() to start the next one")
        action = check_action(action, self.config, self.action_space, None)
        rewards, infos, obs = self.rollout.step(keep_flags(action[None], self.rollout, [0]), [0])
        terminated = self.episode.done
        if terminated:
            self.rollout.close()
        return {k: v[0] for k, v in obs.items()}, float(rewards[0]), terminated, False, infos[0] | {"sample": self._sample}

    def render(self) -> str | None:
        """``render_mode="ansi"``: one line on the episode (tokens fed, phase, compression, oracle mass kept, KL, the
        candidates on offer and the pairs the last decision evicted)."""
        if self.render_mode is None:
            gym.logger.warn("render() without a render_mode: make the env with render_mode='ansi'")
            return None
        e = self.episode
        if e is None:
            return "KVEviction: not started (call reset())\n"
        info = self.rollout.info(0, self.rollout.kept()[0], None)
        line = (f"KVEviction sample {self._sample}: {e.fed}/{e.total} tokens ({info['phase']}), compression "
                f"{info['compression']:.3f}, oracle mass kept {info['oracle_mass_retained']:.4f}, KL {info['kl']:.4f}, "
                f"{e.cand_count} candidates offered, {e.evicted_last} pairs evicted last step")
        if e.done:
            line += f", done: accuracy {info['accuracy']:.0f}, answer {e.predicted}"
        return line + "\n"

    def close(self):
        self.rollout.close()
        super().close()
