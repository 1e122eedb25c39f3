"""What every trial is measured on: the model, the oracle dataset (reused, or collected once on first use) and
the fixed, seeded held-out task samples, answered with a chunked prefill or from prefills shared by every trial."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from kvzap_lab.policy import Policy
from kvzap_lab.study.config import Collection, StudyError


@dataclass
class Bench:
    """The model, the oracle dataset and the held-out samples (``{task: [Sample]}``) every trial evaluates on.

    ``chunk_size`` is the evaluation's prefill chunk: with 0 each batch of ``batch_size`` samples is prefilled
    once, in one chunk, with the full cache (:func:`kvzap_lab.engine.prefill`), kept, and every policy (the
    full cache, each trial's) branches from it: exactly what its own one-chunk prefill would give, without
    paying the prefill again. Memory: per batch the full cache and the hidden states of every layer.
    """

    model: object
    tokenizer: object
    spec: object
    dataset: object
    samples: dict
    chunk_size: int
    batch_size: int
    last_fit: tuple = (None, None)  # (arguments as JSON, scorer) of the last scorer fitted on ``dataset``
    prefills: dict = field(default_factory=dict)  # {task: [Prefill per batch]} when chunk_size is 0

    def with_samples(self, samples: dict) -> Bench:
        """The same bench on other samples (its own prefills; the last fit is shared)."""
        return replace(self, samples=samples, prefills={})

    def fit(self, factory, arguments: dict):
        """``factory(**arguments)`` fitted on the oracle dataset, or the same scorer again when the previous fit had
        the same arguments (the start points differ only in the rule: they share one fit)."""
        key = json.dumps(arguments, sort_keys=True, default=str)
        if self.last_fit[0] != key:
            scorer = factory(**arguments)
            scorer.fit(self.dataset.X_train.numpy(), self.dataset.y_train.numpy(), manifest=self.dataset.manifest,
                       model=self.model, positions=self.dataset.positions_train, previous=self.dataset.previous_train)
            self.last_fit = (key, scorer)
        return self.last_fit[1]

    def run(self, policy: Policy | None, task: str) -> dict:
        """Accuracy and compression of ``policy`` (``None``: full cache) on ``task``'s samples (see
        :meth:`kvzap_lab.evaluate.Tally.result`); each sample stops at its own stop tokens or budget."""
        from kvzap_lab.engine import prefill
        from kvzap_lab.evaluate import Tally, batches, generation_args, run_cell

        samples = self.samples[task]
        if self.chunk_size:
            return run_cell(self.model, policy, samples, None, self.batch_size, self.chunk_size, tokenizer=self.tokenizer)
        groups = batches(samples, self.batch_size)
        if task not in self.prefills:
            self.prefills[task] = [prefill(self.model, [s.input_ids for s in batch]) for batch in groups]
        tally = Tally()
        for batch, started in zip(groups, self.prefills[task]):
            tally.add(batch, started.branch(policy, **generation_args(batch)), self.tokenizer)
        return tally.result()


def default_data_dir(results: Path, name: str, fingerprint: str, short: str, neighbours: int = 0) -> Path:
    """``<results>/data/<model>`` (where ``kvzap_lab.collect`` writes by default) unless it holds another model's
    data; then ``<results>/data/<model>-<fingerprint>``. With ``neighbours`` K > 0 (a scorer's ``study_neighbours``),
    ``-neighboursK`` is appended: a dataset whose rows also store their K previous hidden states."""
    from kvzap_lab import data

    suffix = f"-neighbours{neighbours}" if neighbours else ""
    shared = results / "data" / f"{name}{suffix}"
    manifest = data.read_manifest(shared) if shared.exists() else None
    if manifest is None or manifest["model"]["fingerprint"] == fingerprint:
        return shared
    return results / "data" / f"{short}{suffix}"


def load_data(model, tokenizer, name: str, data_dir: Path, recipe: Collection, context_tokens: int, seed: int,
              train_rows: int = 0, neighbours: int = 0):
    """The oracle dataset in ``data_dir`` (checked against ``model``), collected there first if absent or
    unfinished: ``python -m kvzap_lab.collect --tasks all`` with the ``recipe``'s counts, contexts of at most
    ``context_tokens``, ``--neighbours neighbours`` and collect's other defaults. ``name``: the model's short name,
    recorded in the manifest as the command does. ``train_rows`` > 0: at most that many training rows (see
    :func:`subsample`)."""
    from kvzap_lab import collect, data, oracle, tasks

    manifest = data.read_manifest(data_dir) if data_dir.exists() else None
    if manifest is None or not manifest.get("complete"):
        context = min(recipe.context_tokens, context_tokens)
        rows = min(recipe.tokens_per_sequence, context_tokens)
        print(f"collecting an oracle dataset in {data_dir} (reused by later studies): {recipe.sequences} task contexts "
              f"of {context} tokens, {rows} rows each", file=sys.stderr)
        contexts = collect.task_contexts(tokenizer, list(tasks.TASKS), recipe.sequences, context, seed)
        settings = {  # python -m kvzap_lab.collect --tasks all with these counts: its other defaults
            "model_name": name,
            "source": {"kind": "tasks", "tasks": list(tasks.TASKS), "context_tokens": context},
            "seed": seed,
            "test_fraction": 0.1,
            "tokens_per_sequence": rows,
            "decode_tokens": 0,
            "dtype": "float32",
            "oracle": {"normalize": True, "chunk_size": oracle.DEFAULT_CHUNK, "anchor": oracle.DEFAULT_ANCHOR},
        } | ({"neighbours": neighbours} if neighbours else {})
        try:
            collect.collect(model, tokenizer, contexts, data_dir, settings)
        except (ValueError, FileNotFoundError) as err:
            raise StudyError(f"collecting the oracle dataset into {data_dir} failed: {err}; pass --data DIR to use another") from None
    try:  # a subsample is drawn from the storage dtype (bfloat16 for a real model: half the memory of float32)
        dataset = data.load_dataset(data_dir, model=model, dtype=None if train_rows else torch.float32)
    except data.DatasetError as err:
        raise StudyError(f"{err} (or pass --data DIR)") from None
    return subsample(dataset, train_rows, seed) if train_rows else dataset


def subsample(dataset, train_rows: int, seed: int):
    """``dataset`` with at most ``train_rows`` training rows drawn at random (seeded), held-out rows in the same
    proportion, in their order, ``X`` in float32."""
    generator = torch.Generator().manual_seed(seed)
    n_train, n_test = len(dataset.y_train), len(dataset.y_test)
    keep_train = min(train_rows, n_train)
    keep_test = min(n_test, max(1, round(n_test * keep_train / n_train))) if n_test else 0
    train = torch.randperm(n_train, generator=generator)[:keep_train].sort().values
    test = torch.randperm(n_test, generator=generator)[:keep_test].sort().values
    rows = lambda t, kept: None if t is None else t[kept]
    return replace(
        dataset,
        X_train=dataset.X_train[train].float(), y_train=dataset.y_train[train], groups_train=dataset.groups_train[train],
        X_test=dataset.X_test[test].float(), y_test=dataset.y_test[test], groups_test=dataset.groups_test[test],
        positions_train=rows(dataset.positions_train, train), positions_test=rows(dataset.positions_test, test),
        previous_train=rows(dataset.previous_train, train), previous_test=rows(dataset.previous_test, test),
    )
