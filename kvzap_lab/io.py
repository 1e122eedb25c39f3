"""Atomic, durable file output: the one place the lab writes results, datasets and checkpoints.

Every writer goes through a temporary file (or directory) beside its destination, flushed to disk with
``fsync``, given the mode a plain ``open`` would give under the process's umask (``mkstemp`` and ``mkdtemp``
would leave 0600 / 0700), then moved into place with ``os.replace``, and the parent directory is synced so the
rename survives a crash. A reader therefore sees the old file or the new one, never a torn one, also after
``kill -9``. Leftover temporaries of a killed writer are named ``.{name}.*.tmp`` and removed by
:func:`remove_temporaries`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

TMP_SUFFIX = ".tmp"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_tree(root: Path) -> None:
    """fsync every file under ``root`` and ``root`` itself, and give them umask-honouring modes."""
    mask = _umask()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)
    os.chmod(root, 0o777 & ~mask)
    _fsync_directory(root)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Write ``path`` atomically: ``write(tmp)`` fills a temporary file beside it, which is synced and renamed.

    Args:
        path: the destination file; its parent directory is created if needed.
        write: called with the temporary file's path; writes the whole content there.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    _fsync_directory(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, obj, *, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON (with a final newline) to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Build a directory atomically: fill the yielded temporary directory; on success it replaces ``path``.

    An existing ``path`` is replaced (moved aside, then deleted); on an exception the temporary directory is
    removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX))
    try:
        yield tmp
        _sync_tree(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old.", suffix=TMP_SUFFIX))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_directory(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_temporaries(directory: str | Path) -> list[str]:
    """Delete the temporaries a killed writer left in ``directory``; returns their names."""
    stale = sorted(Path(directory).glob(f".*{TMP_SUFFIX}"))
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return [p.name for p in stale]


def check_writable(directory: str | Path) -> Path:
    """Create ``directory`` if needed and prove a file can be written there, before any long work starts.

    Raises:
        PermissionError: naming the directory, when it cannot be created or written.
    """
    directory = Path(directory)
    blocking = next((p for p in (directory, *directory.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise PermissionError(f"cannot write to {directory}: {blocking} is a file, not a directory; choose another output location")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".write-probe.", suffix=TMP_SUFFIX)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise PermissionError(
            f"cannot write to {directory} ({err.strerror or err}); choose a writable output location"
        ) from None
    return directory
