"""Scorer checkpoints: a directory with ``config.json`` and ``model.safetensors``; nothing is ever pickled.

KVzap-linear and KVzap-MLP directories are kvpress ``KVzapModel`` checkpoints (kvpress 0.5.5): the config holds
``KVzapConfig``'s fields (``model_type: "kvzap"``, ``input_dim``, ``output_dim``, ``hidden_dim`` (null for
linear), ``n_modules``) and the tensors are ``layers.{i}.weight|bias`` (one ``nn.Linear`` per layer) or
``layers.{i}.0.*`` / ``layers.{i}.2.*`` (Linear-GELU-Linear), so ``KVzapModel.from_pretrained(DIR)`` loads a lab
scorer with no missing or unexpected key and predicts what the lab predicts, and NVIDIA's scorers load here.
Reading also accepts the older ``module_list.*`` names. The lab's own facts go in a ``kvzap_lab`` entry of the
config, which kvpress keeps as an unused attribute: policy name and constructor params, the model the scorer was
trained for, its depth, and the sha256 of ``model.safetensors``. Deeper MLPs (``depth`` > 1, not a kvpress
model) and boosted trees (flat node arrays) use other ``model_type`` values.

A load checks everything before it returns a scorer (nothing is loaded half-way), and each failure is one line
that names the file: unreadable or truncated JSON, a weights file that does not match its recorded sha256 or is
not safetensors, neither tensor layout, missing or unexpected tensors, shapes that disagree with the config, and
non-finite or absurd (|w| > 1e6) weights, which are refused at save time too.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from kvzap_lab import io

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
KVZAP_PREFIX = "layers"  # kvpress's KVzapModel.layers
LEGACY_PREFIX = "module_list"  # earlier KVzap code
MAX_ABS_WEIGHT = 1e6  # no trained scorer comes near this; a larger weight is corruption or a diverged fit


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be used as it is; the message names the file and what is wrong."""


# ----------------------------------------------------------------------------------------------- files


def write_directory(path: str | Path, config: dict, tensors: dict[str, torch.Tensor | np.ndarray]) -> None:
    """Atomically (re)place directory ``path`` with ``config.json`` and ``model.safetensors`` (see :func:`fill_directory`)."""
    tensors = _as_tensors(tensors)
    check_weights(tensors, f"the weights to save to {Path(path) / WEIGHTS_NAME}")
    with io.atomic_directory(path) as tmp:
        fill_directory(tmp, config, tensors)


def fill_directory(directory: Path, config: dict, tensors: dict[str, torch.Tensor | np.ndarray]) -> str:
    """Write ``config.json`` and ``model.safetensors`` into ``directory`` (a temporary one of an atomic write).

    The tensors are checked (finite, |w| <= 1e6) first; the sha256 of the weights file is returned and recorded
    in the config's ``kvzap_lab`` entry, if it has one.
    """
    tensors = _as_tensors(tensors)
    check_weights(tensors, f"the weights to save as {WEIGHTS_NAME}")
    save_file(tensors, directory / WEIGHTS_NAME, metadata={"format": "pt"})
    digest = hashlib.sha256((directory / WEIGHTS_NAME).read_bytes()).hexdigest()
    if "kvzap_lab" in config:
        config = config | {"kvzap_lab": config["kvzap_lab"] | {"weights_sha256": digest}}
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return digest


def _as_tensors(tensors: dict) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(np.ascontiguousarray(v) if isinstance(v, np.ndarray) else v).contiguous() for k, v in tensors.items()}


def read_directory(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config, tensors)`` of a checkpoint directory, with the weights file checked against its recorded sha256.

    Raises:
        FileNotFoundError: ``path`` or one of its two files is missing.
        CheckpointError: the config is not a JSON object, or the weights file is modified or not safetensors.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"scorer checkpoint {path} does not exist (expected a directory with {CONFIG_NAME} and {WEIGHTS_NAME})")
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} is not a scorer checkpoint: missing {', '.join(missing)}")
    config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config_path} is not valid JSON ({err}): the file is truncated or corrupted; save the scorer again") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path} must hold a JSON object; got {type(config).__name__}")
    data = weights_path.read_bytes()
    recorded = (config.get("kvzap_lab") or {}).get("weights_sha256")
    if recorded is not None and hashlib.sha256(data).hexdigest() != recorded:
        raise CheckpointError(
            f"{weights_path} does not match the sha256 recorded in {config_path}: the weights were modified or "
            "corrupted; save or train the scorer again"
        )
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{weights_path} is not a readable safetensors file ({err})") from None
    return config, tensors


def check_weights(tensors: dict[str, torch.Tensor], where: str) -> None:
    """Raise :class:`CheckpointError` if a floating-point tensor holds NaN/inf or a value with |w| > 1e6."""
    for key, value in tensors.items():
        if not value.is_floating_point() or value.numel() == 0:
            continue
        value = value.float()
        if not torch.isfinite(value).all():
            raise CheckpointError(f"{where}: tensor {key} holds {int((~torch.isfinite(value)).sum())} NaN/inf values; the scorer is broken (retrain it)")
        largest = value.abs().max().item()
        if largest > MAX_ABS_WEIGHT:
            raise CheckpointError(f"{where}: tensor {key} holds |w| = {largest:.3g} > {MAX_ABS_WEIGHT:g}; the scorer is broken (retrain it)")


# ----------------------------------------------------------------------------------------------- KVzap layout


def kvzap_key(layer: int, linear: int, depth: int, prefix: str = KVZAP_PREFIX) -> str:
    """Name of the ``linear``-th map of ``layer`` (``depth`` hidden layers): ``layers.3`` or ``layers.3.2``."""
    return f"{prefix}.{layer}" + (f".{2 * linear}" if depth else "")


def kvzap_config(input_dim: int, output_dim: int, hidden_dim: int | None, n_modules: int, depth: int) -> dict:
    """The config fields of kvpress's ``KVzapConfig`` (``depth`` > 1 gets another ``model_type``: kvpress has none)."""
    return {
        "model_type": "kvzap" if depth <= 1 else "kvzap_lab_deep_mlp",
        "architectures": ["KVzapModel"],
        "input_dim": input_dim,
        "output_dim": output_dim,
        "hidden_dim": hidden_dim,
        "n_modules": n_modules,
        "dtype": "float32",
    }


def kvzap_state(weights: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """kvpress's state dict of stacked maps ``[(W [layers, out, in], b [layers, out]), ...]`` (GELU between)."""
    depth = len(weights) - 1
    state = {}
    for i, (W, b) in enumerate(weights):
        for layer in range(W.shape[0]):
            key = kvzap_key(layer, i, depth)
            state[f"{key}.weight"], state[f"{key}.bias"] = W[layer].float().clone(), b[layer].float().clone()
    return state


def _positive_int(config: dict, key: str, config_path: Path, none_ok: bool = False) -> int | None:
    value = config.get(key, "missing")
    if value is None and none_ok:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(f"{config_path}: {key} must be an int >= 1{' or null' if none_ok else ''}; got {value!r}")
    return value


def kvzap_weights(config: dict, tensors: dict[str, torch.Tensor], path: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Stacked maps ``[(W [layers, out, in], b [layers, out]), ...]`` (float32) from a KVzap checkpoint in either
    layout, after checking the exact key set, every shape against the config, and the values."""
    config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    d_in, d_out = _positive_int(config, "input_dim", config_path), _positive_int(config, "output_dim", config_path)
    width, n = _positive_int(config, "hidden_dim", config_path, none_ok=True), _positive_int(config, "n_modules", config_path)
    ours = config.get("kvzap_lab") or {}
    depth = ours.get("depth", config.get("depth", 0 if width is None else 1))
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0 or (depth == 0) != (width is None):
        raise CheckpointError(f"{config_path}: depth {depth!r} does not fit hidden_dim {width!r} (linear: null and 0; MLP: an int and >= 1)")
    prefixes = {key.split(".", 1)[0] for key in tensors}
    layouts = [p for p in (KVZAP_PREFIX, LEGACY_PREFIX) if p in prefixes]
    if len(layouts) != 1:
        found = ", ".join(sorted(tensors)[:3]) or "no tensors"
        raise CheckpointError(
            f"{weights_path} has {'both' if layouts else 'neither'} KVzap tensor layout{'s' if layouts else ''} "
            f"(expected {KVZAP_PREFIX}.{{i}}.* as kvpress writes, or the older {LEGACY_PREFIX}.{{i}}.*); found {found}"
        )
    dims = [d_in] + [width] * depth + [d_out]
    expected = {}
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        for layer in range(n):
            key = kvzap_key(layer, i, depth, layouts[0])
            expected[f"{key}.weight"], expected[f"{key}.bias"] = (b, a), (b,)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        detail = "; ".join(f"{what} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                           for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys)
        raise CheckpointError(f"{weights_path} does not fit {config_path} (n_modules {n}, depth {depth}): {detail}")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise CheckpointError(
                f"{weights_path}: {key} has shape {list(tensors[key].shape)}, but {config_path} (input_dim {d_in}, "
                f"hidden_dim {width}, output_dim {d_out}) makes it {list(shape)}"
            )
    check_weights(tensors, str(weights_path))
    return [
        (torch.stack([tensors[f"{kvzap_key(layer, i, depth, layouts[0])}.weight"].float() for layer in range(n)]),
         torch.stack([tensors[f"{kvzap_key(layer, i, depth, layouts[0])}.bias"].float() for layer in range(n)]))
        for i in range(depth + 1)
    ]


# ----------------------------------------------------------------------------------------------- scorers


def save_scorer(scorer, path: str | Path) -> None:
    """Save a fitted trainable scorer (see :class:`kvzap_lab.surrogate.TrainableScorer`) to directory ``path``."""
    config, state = scorer._config(), scorer._state()
    ours = {"policy": scorer.policy_name, "params": scorer.get_params(), "trained_for": scorer.trained_for_}
    config["kvzap_lab"] = config.get("kvzap_lab", {}) | ours
    scorer._check_params()
    write_directory(path, config, state)


def load_scorer(path: str | Path, model=None):
    """Load a scorer saved by kvzap-lab or a KVzap checkpoint written by kvpress (NVIDIA's scorers); with
    ``model``, raise :class:`~kvzap_lab.surrogate.ModelMismatchError` if it was trained for another model.

    Raises:
        FileNotFoundError, CheckpointError: a missing, unreadable or inconsistent checkpoint (one line naming the file).
    """
    from kvzap_lab.policies.kvzap_linear import KVzapLinear
    from kvzap_lab.policies.kvzap_mlp import KVzapMLP
    from kvzap_lab.policy import resolve_policy

    path = Path(path)
    config, tensors = read_directory(path)
    ours = config.get("kvzap_lab")
    if ours is not None:
        try:
            scorer = resolve_policy(ours["policy"])(**ours["params"])
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{path / CONFIG_NAME}: its kvzap_lab entry does not describe a known scorer ({err})") from None
        trained_for = ours.get("trained_for")
    elif config.get("model_type") == "kvzap":  # a kvpress / NVIDIA checkpoint: shapes only, no model fingerprint
        hidden_dim = config.get("hidden_dim")
        scorer = KVzapLinear() if hidden_dim is None else KVzapMLP(width=hidden_dim)
        trained_for = {"model_fingerprint": None, "n_layers": config.get("n_modules"), "hidden_size": config.get("input_dim"),
                       "n_kv_heads": config.get("output_dim")}
    else:
        raise CheckpointError(f"{path / CONFIG_NAME} is neither a kvzap-lab scorer nor a KVzap checkpoint (model_type {config.get('model_type')!r})")
    try:
        scorer._check_params()
    except ValueError as err:
        raise CheckpointError(f"{path / CONFIG_NAME}: {err}") from None
    scorer._set_state(config, tensors, path)  # checks every tensor; sets nothing on failure
    scorer._check_trained_for(trained_for, path / CONFIG_NAME)
    scorer.trained_for_ = trained_for
    if model is not None:
        scorer.check_model(model)
    return scorer
