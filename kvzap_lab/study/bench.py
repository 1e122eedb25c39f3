"""What every trial is measured on: the model, the oracle dataset (reused, or collected once on first use) and
the fixed, seeded held-out task samples."""

from __future__ import annotations

import inspect
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from kvzap_lab.policy import Policy
from kvzap_lab.study.config import COLLECT_CONTEXT_TOKENS, COLLECT_SEQUENCES, COLLECT_TOKENS_PER_SEQUENCE, StudyError


@dataclass
class Bench:
    """The model, the oracle dataset and the held-out samples (``{task: [Sample]}``) every trial evaluates on."""

    model: object
    tokenizer: object
    spec: object
    dataset: object
    samples: dict
    end_id: int
    last_fit: tuple = (None, None)  # (arguments as JSON, scorer) of the last scorer fitted on ``dataset``

    def fit(self, factory, arguments: dict):
        """``factory(**arguments)`` fitted on the oracle dataset, or the same scorer again when the previous fit had
        the same arguments (the start points differ only in the rule: they share one fit)."""
        key = json.dumps(arguments, sort_keys=True, default=str)
        if self.last_fit[0] != key:
            scorer = factory(**arguments)
            extra = {"manifest": self.dataset.manifest} if "manifest" in inspect.signature(factory.fit).parameters else {}
            scorer.fit(self.dataset.X_train.numpy(), self.dataset.y_train.numpy(), **extra)
            self.last_fit = (key, scorer)
        return self.last_fit[1]

    def run(self, policy: Policy | None, task: str) -> dict:
        """Accuracy and compression of ``policy`` (``None``: full cache) on ``task``'s samples, one batch."""
        from kvzap_lab.engine import DEFAULT_CHUNK
        from kvzap_lab.evaluate import run_cell

        samples = self.samples[task]
        return run_cell(self.model, policy, samples, self.end_id, len(samples), DEFAULT_CHUNK)


def model_name(model: str) -> str:
    """Short model name used in default paths and study names."""
    return "testbed" if model == "testbed" else Path(model).name


def default_data_dir(results: Path, name: str, fingerprint: str, short: str) -> Path:
    """``<results>/data/<model>`` (where ``kvzap_lab.collect`` writes by default) unless it holds another model's
    data; then ``<results>/data/<model>-<fingerprint>``."""
    from kvzap_lab import data

    shared = results / "data" / name
    manifest = data.read_manifest(shared) if shared.exists() else None
    return shared if manifest is None or manifest["model"]["fingerprint"] == fingerprint else results / "data" / short


def load_data(model, tokenizer, name: str, data_dir: Path, context_tokens: int, seed: int):
    """The oracle dataset in ``data_dir`` (checked against ``model``), collected there first with the README's
    recipe (every task; contexts of at most ``context_tokens``) if absent or unfinished. ``name``: the model's
    short name, recorded in the manifest as ``python -m kvzap_lab.collect`` does."""
    from kvzap_lab import collect, data, oracle, tasks

    manifest = data.read_manifest(data_dir) if data_dir.exists() else None
    if manifest is None or not manifest.get("complete"):
        print(f"collecting a small oracle dataset in {data_dir} (reused by later studies)", file=sys.stderr)
        context = min(COLLECT_CONTEXT_TOKENS, context_tokens)
        contexts = collect.task_contexts(tokenizer, list(tasks.TASKS), COLLECT_SEQUENCES, context, seed)
        settings = {  # python -m kvzap_lab.collect --tasks all with these counts: its other defaults
            "model_name": name,
            "source": {"kind": "tasks", "tasks": list(tasks.TASKS), "context_tokens": context},
            "seed": seed,
            "test_fraction": 0.1,
            "tokens_per_sequence": min(COLLECT_TOKENS_PER_SEQUENCE, context_tokens),
            "decode_tokens": 0,
            "dtype": "float32",
            "oracle": {"normalize": True, "chunk_size": oracle.DEFAULT_CHUNK, "anchor": oracle.DEFAULT_ANCHOR},
        }
        try:
            collect.collect(model, tokenizer, contexts, data_dir, settings)
        except (ValueError, FileNotFoundError) as err:
            raise StudyError(f"collecting the oracle dataset into {data_dir} failed: {err}; pass --data DIR to use another") from None
    try:
        return data.load_dataset(data_dir, model=model)
    except data.DatasetError as err:
        raise StudyError(f"{err} (or pass --data DIR)") from None
