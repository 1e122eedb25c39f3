"""Oracle training data on disk: safetensors shards, one record per finished shard, and a ``manifest.json``.

A dataset directory holds ``manifest.json`` (model fingerprint, oracle settings, seed, shapes and the *plan*: every
shard's file name, split and sequences), the shards ``train-00000.safetensors``, ``test-00000.safetensors``, ...
and, for each finished shard, its record ``train-00000.json`` (its rows and sha256). Every file is written
through :mod:`kvzap_lab.io` (a temporary file moved into place), a shard before its record. So:

- a reader sees a consistent dataset: a shard counts once its record exists, and :func:`read_manifest` merges the
  records into the manifest's ``shards`` list (``complete`` when every planned shard has one);
- several processes (or machines sharing the directory) can fill one dataset at once with no lock: the manifest is
  created once (the first process wins; the others check that their settings match) and each shard belongs to
  one worker, whose record is its own file;
- a ``kill -9`` loses at most the shard in progress (a shard moved into place without its record is collected
  again).

Each shard holds ``X [n, layers, hidden]`` (hidden state entering each attention layer, in the dataset's storage
dtype), ``y [n, layers, kv_heads]`` (oracle log-scores, float32), ``sequence [n]`` (the sequence each row comes
from; the train/test split is by sequence), ``position [n]`` (the token's offset in its context) and, in a dataset
collected with ``--neighbours K``, ``previous [n, K, layers, hidden]`` (the hidden states of the K tokens before,
oldest first, zeros before the context's first token).

:func:`load_dataset` is what training code calls.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from kvzap_lab import io

MANIFEST = "manifest.json"
FORMAT = "kvzap-lab/oracle-data/v2"
FORMAT_V1 = "kvzap-lab/oracle-data/v1"  # read for training (finished shards listed in the manifest itself)
SPLITS = ("train", "test")
_SHARD_SUFFIX = ".safetensors"


class DatasetError(ValueError):
    """A dataset directory that cannot be used as asked (corrupt shard, other model, unfinished collection)."""


@dataclass
class Dataset:
    """A loaded oracle dataset: ``X_* [n, layers, hidden]``, ``y_* [n, layers, kv_heads]`` float32, ``groups_* [n]``
    int64 sequence ids (for grouped cross-validation), the ``manifest`` dict, and ``positions_* [n]`` int64: the
    position each row's hidden state had in the forward pass that computed it (see :func:`absolute_positions`;
    None for a dataset whose shards hold no positions), and ``previous_* [n, K, layers, hidden]``: the hidden states of
    each row's K previous tokens (a dataset collected with ``--neighbours K``; else None)."""

    X_train: torch.Tensor
    y_train: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor
    manifest: dict
    groups_train: torch.Tensor
    groups_test: torch.Tensor
    positions_train: torch.Tensor | None = None
    positions_test: torch.Tensor | None = None
    previous_train: torch.Tensor | None = None
    previous_test: torch.Tensor | None = None


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def record_name(shard: str) -> str:
    """The record file of shard ``shard`` (``train-00003.safetensors`` -> ``train-00003.json``)."""
    return shard.removesuffix(_SHARD_SUFFIX) + ".json"


def write_shard(directory: Path, name: str, tensors: dict[str, torch.Tensor]) -> str:
    """Write ``tensors`` atomically as ``directory/name`` (safetensors) and return the file's sha256."""
    path = Path(directory) / name
    io.atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp)))
    return sha256_file(path)


def write_record(directory: Path, entry: dict) -> None:
    """Record a finished shard (``entry``: its plan entry plus ``n`` and ``sha256``); written after the shard."""
    io.atomic_write_json(Path(directory) / record_name(entry["file"]), entry, indent=1)


def remove_shard(directory: Path, name: str) -> None:
    """Forget a shard: its record first (so no reader trusts the file meanwhile), then the file."""
    (Path(directory) / record_name(name)).unlink(missing_ok=True)
    (Path(directory) / name).unlink(missing_ok=True)


def remove_temporaries(directory: Path, names: list[str]) -> list[str]:
    """Delete the temporaries a killed writer left for the files ``names`` (a worker's own shards and records:
    other workers may be writing theirs). Returns the names removed."""
    stale = sorted(p for name in names for p in Path(directory).glob(f".{name}.*{io.TMP_SUFFIX}"))
    for path in stale:
        path.unlink(missing_ok=True)
    return [p.name for p in stale]


def create_manifest(directory: Path, manifest: dict) -> dict:
    """Create ``manifest.json`` unless it exists (atomically: one of several concurrent creators wins); returns
    the manifest on disk as :func:`read_manifest` gives it."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.exists():
        staging = io.atomic_write_json(directory / f".{MANIFEST}.{uuid.uuid4().hex}{io.TMP_SUFFIX}", manifest, indent=1)
        try:
            os.link(staging, path)  # fails if another process created it first: theirs stands
        except FileExistsError:
            pass
        finally:
            staging.unlink(missing_ok=True)
    return read_manifest(directory)


def read_manifest(directory: Path) -> dict | None:
    """The manifest of a dataset directory with its finished shards merged in (``shards``: the records of the
    planned shards, in plan order; ``complete``), or None when there is none yet."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path} is not valid JSON ({err}); delete the directory and collect again") from err
    if manifest.get("format") == FORMAT_V1:
        return manifest
    if manifest.get("format") != FORMAT:
        raise DatasetError(
            f"{path} is not a kvzap-lab oracle dataset (format {manifest.get('format')!r}, want {FORMAT!r})"
        )
    shards = []
    for planned in manifest["plan"]:
        record = _read_record(directory, planned)
        if record is not None:
            shards.append(record)
    return dict(manifest, shards=shards, complete=len(shards) == len(manifest["plan"]))


def _read_record(directory: Path, planned: dict) -> dict | None:
    """A planned shard's record, or None when it has none (or one for another plan: a stale file)."""
    path = directory / record_name(planned["file"])
    try:
        record = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    keys = ("file", "split", "sequences")
    return record if all(record.get(k) == planned[k] for k in keys) else None


def shard_problem(directory: Path, entry: dict) -> str | None:
    """Why a finished shard cannot be used (missing, or its sha256 differs from its record), or None."""
    path = Path(directory) / entry["file"]
    if not path.exists():
        return f"shard {entry['file']} listed in {directory} is missing"
    actual = sha256_file(path)
    if actual != entry["sha256"]:
        return (
            f"shard {entry['file']} in {directory} is corrupt or truncated: sha256 {actual[:12]}... but its record "
            f"says {entry['sha256'][:12]}..."
        )
    return None


def _read_shard(directory: Path, entry: dict, layers: list[int] | None) -> dict[str, torch.Tensor]:
    problem = shard_problem(directory, entry)
    if problem:
        raise DatasetError(f"{problem}; rerun the same collect command (it collects the shard again)")
    try:
        with safe_open(str(directory / entry["file"]), "pt") as handle:
            tensors = {}
            for key in handle.keys():
                if key in ("X", "y") and layers is not None:
                    tensors[key] = handle.get_slice(key)[:, layers[0] : layers[-1] + 1][:, [i - layers[0] for i in layers]]
                elif key == "previous" and layers is not None:
                    tensors[key] = handle.get_slice(key)[:, :, layers[0] : layers[-1] + 1][:, :, [i - layers[0] for i in layers]]
                else:
                    tensors[key] = handle.get_tensor(key)
            return tensors
    except SafetensorError as err:  # sha matched the record, so the writer itself was broken
        raise DatasetError(f"shard {entry['file']} in {directory} cannot be read: {err}") from err


def absolute_positions(manifest: dict, offsets: torch.Tensor) -> torch.Tensor:
    """Rows' stored offsets in their contexts -> the positions their hidden states had: after the oracle's prompt
    prefix (``manifest["oracle"]["template"][0]``) when the rows are context tokens, as they are without decoding
    (a task context read after other prompt tokens had that many instead: exact for the test bed's tasks, whose
    prompts start with the template's prefix); the offsets themselves for decoded rows (collected without a prefix)."""
    prefix = 0 if manifest.get("decode_tokens") else len((manifest.get("oracle") or {}).get("template", [[]])[0])
    return offsets.long() + prefix


def load_dataset(
    path: str | Path,
    model=None,
    *,
    allow_partial: bool = False,
    dtype: torch.dtype | None = torch.float32,
    layers: list[int] | None = None,
) -> Dataset:
    """Load every finished shard of a dataset directory, checking each shard's sha256 against its record.

    Args:
        path: the dataset directory.
        model: a model, or a fingerprint string from :func:`kvzap_lab.model.fingerprint`: must be the one the data
            was collected on.
        allow_partial: load an unfinished collection (its finished shards) instead of raising.
        dtype: the dtype of ``X`` (None: the storage dtype, e.g. bfloat16: half the memory of float32). ``y`` is
            float32.
        layers: load only these layers of ``X`` and ``y`` (sorted indices; memory scales with their count); the
            returned manifest's ``shapes`` then count them and ``loaded_layers`` lists them.

    Raises:
        FileNotFoundError: no manifest; DatasetError: another model, an unfinished collection, a bad shard.
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
    if not manifest["complete"] and not allow_partial:
        raise DatasetError(
            f"{directory} is an unfinished collection ({len(manifest['shards'])} of {manifest['n_shards']} shards); "
            "rerun the same collect command to finish it, or pass allow_partial=True"
        )
    shapes = manifest["shapes"]
    n_layers = shapes["layers"]
    if layers is not None:
        layers = sorted(set(layers))
        if not layers or layers[0] < 0 or layers[-1] >= n_layers:
            raise ValueError(f"layers must be indices in [0, {n_layers}), got {layers}")
        n_layers = len(layers)
        # The manifest describes what was loaded: a scorer fitted on it has len(layers) layers.
        manifest = dict(manifest, shapes=dict(shapes, layers=n_layers), loaded_layers=layers)
    stored = getattr(torch, manifest.get("dtype", "float32"))
    parts: dict[str, list[dict[str, torch.Tensor]]] = {split: [] for split in SPLITS}
    for entry in manifest["shards"]:
        parts[entry["split"]].append(_read_shard(directory, entry, layers))

    def cat(split: str, key: str, tail: tuple[int, ...], target: torch.dtype) -> torch.Tensor:
        """The shards' ``key`` rows in one ``target`` tensor, each shard freed once copied (peak: the stored
        shards plus the result, not a converted copy of every shard besides)."""
        out = torch.empty((sum(len(shard[key]) for shard in parts[split]), *tail), dtype=target)
        row = 0
        for shard in parts[split]:
            rows = shard.pop(key)
            out[row : row + len(rows)] = rows
            row += len(rows)
        return out

    x_tail, y_tail = (n_layers, shapes["hidden"]), (n_layers, shapes["kv_heads"])
    k = manifest.get("neighbours", 0)
    return Dataset(
        X_train=cat("train", "X", x_tail, dtype or stored),
        y_train=cat("train", "y", y_tail, torch.float32),
        X_test=cat("test", "X", x_tail, dtype or stored),
        y_test=cat("test", "y", y_tail, torch.float32),
        manifest=manifest,
        groups_train=cat("train", "sequence", (), torch.int64),
        groups_test=cat("test", "sequence", (), torch.int64),
        **{f"positions_{split}": absolute_positions(manifest, cat(split, "position", (), torch.int64))
           if all("position" in shard for shard in parts[split]) else None for split in SPLITS},
        **{f"previous_{split}": cat(split, "previous", (k, *x_tail), dtype or stored) if k else None for split in SPLITS},
    )
