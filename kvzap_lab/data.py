"""Oracle training data on disk: safetensors shards plus a ``manifest.json``, written atomically.

A dataset directory holds ``train-00000.safetensors``, ``test-00000.safetensors``, ... and ``manifest.json``
(model fingerprint, oracle settings, seed, split, shapes, and the finished shards with their sha256). Every file
is written to a temporary file in the same directory and moved into place with ``os.replace``, and the manifest
is rewritten after each shard, so a collection killed at any moment leaves only finished, listed shards.

Each shard holds ``X [n, layers, hidden]`` (hidden state entering each attention layer), ``y [n, layers,
kv_heads]`` (oracle log-scores), ``sequence [n]`` (the sequence each row comes from; the train/test split is by
sequence) and ``position [n]`` (the token's offset in its context).

:func:`load_dataset` is what training code calls.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

MANIFEST = "manifest.json"
FORMAT = "kvzap-lab/oracle-data/v1"
SPLITS = ("train", "test")


class DatasetError(ValueError):
    """A dataset directory that cannot be used as asked (corrupt shard, other model, unfinished collection)."""


@dataclass
class Dataset:
    """A loaded oracle dataset: ``X_* [n, layers, hidden]`` float32, ``y_* [n, layers, kv_heads]`` float32,
    ``groups_* [n]`` int64 sequence ids (for grouped cross-validation), and the ``manifest`` dict."""

    X_train: torch.Tensor
    y_train: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor
    manifest: dict
    groups_train: torch.Tensor
    groups_test: torch.Tensor


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, fsync it, then move it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_temporaries(directory: Path) -> list[str]:
    """Delete the temporary files a killed writer left in ``directory``; returns their names."""
    stale = sorted(Path(directory).glob(".*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return [p.name for p in stale]


def write_shard(directory: Path, name: str, tensors: dict[str, torch.Tensor]) -> str:
    """Write ``tensors`` atomically as ``directory/name`` (safetensors) and return the file's sha256."""
    path = Path(directory) / name
    _atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp)))
    return sha256_file(path)


def write_manifest(directory: Path, manifest: dict) -> None:
    """Write ``manifest.json`` atomically."""
    text = json.dumps(manifest, indent=1, sort_keys=True)
    _atomic_write(Path(directory) / MANIFEST, lambda tmp: tmp.write_text(text))


def read_manifest(directory: Path) -> dict | None:
    """The manifest of a dataset directory, or None when there is none yet."""
    path = Path(directory) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path} is not valid JSON ({err}); delete the directory and collect again") from err
    if manifest.get("format") != FORMAT:
        raise DatasetError(
            f"{path} is not a kvzap-lab oracle dataset (format {manifest.get('format')!r}, want {FORMAT!r})"
        )
    return manifest


def _read_shard(directory: Path, entry: dict) -> dict[str, torch.Tensor]:
    path = directory / entry["file"]
    if not path.exists():
        raise DatasetError(f"shard {entry['file']} listed in {directory / MANIFEST} is missing")
    actual = sha256_file(path)
    if actual != entry["sha256"]:
        raise DatasetError(
            f"shard {entry['file']} in {directory} is corrupt or truncated: sha256 {actual[:12]}... but the "
            f"manifest recorded {entry['sha256'][:12]}...; delete it and its manifest entry (or the directory) "
            "and rerun the collection"
        )
    try:
        return load_file(str(path))
    except SafetensorError as err:  # sha matched the manifest, so the writer itself was broken
        raise DatasetError(f"shard {entry['file']} in {directory} cannot be read: {err}") from err


def load_dataset(path: str | Path, model=None, *, allow_partial: bool = False) -> Dataset:
    """Load every shard of a dataset directory, checking each shard's sha256 against the manifest.

    ``model`` (a model, or a fingerprint string from :func:`kvzap_lab.model.fingerprint`) must be the one the
    data was collected on. An unfinished collection raises unless ``allow_partial``.
    """
    directory = Path(path)
    manifest = read_manifest(directory)
    if manifest is None:
        raise FileNotFoundError(
            f"no {MANIFEST} in {directory}: not a dataset directory; build one with `python -m kvzap_lab.collect`"
        )
    if model is not None:
        from kvzap_lab.model import fingerprint

        wanted = model if isinstance(model, str) else fingerprint(model)
        if manifest["model"]["fingerprint"] != wanted:
            raise DatasetError(
                f"{directory} was collected on model {manifest['model']['name']!r} (fingerprint "
                f"{manifest['model']['fingerprint']}) but the requested model has fingerprint {wanted}; "
                "collect data for this model"
            )
    if not manifest.get("complete") and not allow_partial:
        raise DatasetError(
            f"{directory} is an unfinished collection ({len(manifest['shards'])} of {manifest['n_shards']} shards); "
            "rerun the same collect command to finish it, or pass allow_partial=True"
        )
    shapes = manifest["shapes"]
    layers, hidden, kv_heads = shapes["layers"], shapes["hidden"], shapes["kv_heads"]
    parts: dict[str, list[dict[str, torch.Tensor]]] = {split: [] for split in SPLITS}
    for entry in manifest["shards"]:
        parts[entry["split"]].append(_read_shard(directory, entry))

    def cat(split: str, key: str, tail: tuple[int, ...], dtype) -> torch.Tensor:
        tensors = [shard[key] for shard in parts[split]]
        return torch.cat(tensors).to(dtype) if tensors else torch.empty((0, *tail), dtype=dtype)

    return Dataset(
        X_train=cat("train", "X", (layers, hidden), torch.float32),
        y_train=cat("train", "y", (layers, kv_heads), torch.float32),
        X_test=cat("test", "X", (layers, hidden), torch.float32),
        y_test=cat("test", "y", (layers, kv_heads), torch.float32),
        manifest=manifest,
        groups_train=cat("train", "sequence", (), torch.int64),
        groups_test=cat("test", "sequence", (), torch.int64),
    )
