"""Scorer checkpoints: a directory with ``config.json`` and ``model.safetensors``; nothing is ever pickled.

KVzap-linear and KVzap-MLP directories use NVIDIA's KVzap layout (kvpress ``KVzapModel``: config keys
``input_dim``, ``output_dim``, ``hidden_dim`` (null for linear), ``n_modules``; tensors
``module_list.{layer}.weight|bias`` or ``module_list.{layer}.{0,2}.weight|bias``), so official scorers load
here and ours load there. kvzap-lab adds a ``kvzap_lab`` entry to the config (policy name, constructor params,
and the model the scorer was trained for), which kvpress ignores. Boosted trees store flat node arrays.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def write_directory(path: str | Path, config: dict, tensors: dict[str, np.ndarray]) -> None:
    """Atomically (re)place directory ``path`` with ``config.json`` and ``model.safetensors``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp", dir=path.parent))
    try:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_directory(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """``(config, tensors)`` of a checkpoint directory; raises FileNotFoundError naming what is missing."""
    path = Path(path)
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} is not a scorer checkpoint: missing {', '.join(missing)}")
    return json.loads((path / CONFIG_NAME).read_text()), load_file(path / WEIGHTS_NAME)


def save_scorer(scorer, path: str | Path) -> None:
    """Save a fitted trainable scorer (see :class:`kvzap_lab.surrogate.TrainableScorer`)."""
    config = scorer._config() | {
        "kvzap_lab": {"policy": scorer.policy_name, "params": scorer.get_params(), "trained_for": scorer.trained_for_}
    }
    write_directory(path, config, scorer._state())


def load_scorer(path: str | Path, model=None):
    """Load a scorer saved by kvzap-lab or an official NVIDIA KVzap checkpoint; with ``model``, raise
    :class:`~kvzap_lab.surrogate.ModelMismatchError` if it was trained for another model."""
    from kvzap_lab.policies.kvzap_linear import KVzapLinear
    from kvzap_lab.policies.kvzap_mlp import KVzapMLP
    from kvzap_lab.policy import resolve_policy

    config, tensors = read_directory(path)
    ours = config.get("kvzap_lab")
    if ours is not None:
        scorer = resolve_policy(ours["policy"])(**ours["params"])
        scorer.trained_for_ = ours["trained_for"]
    elif config.get("model_type") == "kvzap":  # an official KVzap checkpoint: shapes only, no model fingerprint
        hidden_dim = config["hidden_dim"]
        scorer = KVzapLinear() if hidden_dim is None else KVzapMLP(width=hidden_dim)
        scorer.trained_for_ = {
            "model_fingerprint": None,
            "n_layers": config["n_modules"],
            "hidden_size": config["input_dim"],
            "n_kv_heads": config["output_dim"],
        }
    else:
        raise ValueError(f"{path}/config.json is neither a kvzap-lab scorer nor a KVzap checkpoint (model_type {config.get('model_type')!r})")
    scorer._set_state(config, tensors)
    if model is not None:
        scorer.check_model(model)
    return scorer
