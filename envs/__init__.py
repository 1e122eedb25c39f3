"""Gymnasium environments over the real decode loop.

``import kvzap_lab`` registers them (this module imports only gymnasium's registry; the env module, with torch
and the model code, is imported by ``gymnasium.make`` through the string entry points):

- ``kvzap_lab/KVEviction-v0``: keep/evict flags per candidate (``MultiBinary([layers, kv_heads, max_candidates])``);
- ``kvzap_lab/KVEvictionThreshold-v0``: thresholds per layer and KV head applied to a scorer's scores.

Both have a native batched vector env: ``gymnasium.make_vec(id, num_envs=N, vectorization_mode="vector_entry_point")``.
The public classes are importable from here (loaded on first use): ``KVEvictionEnv``, ``KVEvictionVectorEnv``,
``PolicyAgent``, ``ReferenceCache``, ``text_window_samples``. Modules: ``kv_eviction`` (the env), ``vector``,
``rollout`` (episodes over the engine), ``references``, ``config`` (options), ``agent``.
"""

import importlib

from gymnasium.envs.registration import register, registry

_MODULE = "kvzap_lab.envs.kv_eviction"
_VECTOR = "kvzap_lab.envs.vector"
ENV_IDS = ("kvzap_lab/KVEviction-v0", "kvzap_lab/KVEvictionThreshold-v0")


def register_envs() -> None:
    """Register both env ids (idempotent)."""
    for env_id, action_type in zip(ENV_IDS, ("binary", "threshold")):
        if env_id not in registry:
            register(
                id=env_id,
                entry_point=f"{_MODULE}:KVEvictionEnv",
                vector_entry_point=f"{_VECTOR}:make_vector_env",
                kwargs={"action_type": action_type},
            )


register_envs()

_EXPORTS = {
    "KVEvictionEnv": "kv_eviction",
    "KVEvictionVectorEnv": "vector",
    "PolicyAgent": "agent",
    "ReferenceCache": "references",
    "text_window_samples": "references",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
