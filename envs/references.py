"""What an episode is rewarded against: the oracle table and the full cache's next-token log-probs of each sample,
computed once per sample; and episodes cut from plain text."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from kvzap_lab import tasks
from kvzap_lab.engine import release
from kvzap_lab.evaluate import oracle_table


def text_window_samples(tokenizer, text: str, context_tokens: int, answer_tokens: int = 16) -> list[tasks.Sample]:
    """Episodes cut from plain text: consecutive windows of ``context_tokens`` tokens (the context, after the BOS
    token) each followed by the next ``answer_tokens`` tokens as the reference continuation (task ``"text"``,
    exact match; ``info["token_accuracy"]`` gives the per-token view)."""
    if context_tokens < 1 or answer_tokens < 2:
        raise ValueError(f"need context_tokens >= 1 and answer_tokens >= 2; got {context_tokens}, {answer_tokens}")
    ids = tokenizer.encode(text, add_special_tokens=False)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    step = context_tokens + answer_tokens
    samples = [
        tasks.Sample("text", bos + ids[s : s + context_tokens], (len(bos), len(bos) + context_tokens), "", "",
                     ids[s + context_tokens : s + step])
        for s in range(0, len(ids) - step + 1, step)
    ]
    if not samples:
        raise ValueError(f"the text has {len(ids)} tokens: too few for one window of {context_tokens} + {answer_tokens}")
    return samples


@dataclass
class Reference:
    """What an episode is rewarded against, computed once per sample.

    ``table [L, H, n_prompt]``: oracle log KVzip+ by position (+inf outside the context), exactly what the
    ``oracle`` policy reads; ``weights [L, H, n_prompt]``: ``exp(table) / Z`` on the context, 0 elsewhere;
    ``log_probs [A, vocab]``: full-cache next-token log-probs at each answer position (teacher-forced).
    """

    table: Tensor
    weights: np.ndarray
    log_probs: Tensor


def sample_key(sample: tasks.Sample) -> tuple:
    """A sample's identity: its prompt tokens, context span and reference answer tokens."""
    return tuple(sample.input_ids), tuple(sample.context_span), tuple(sample.answer_ids)


class ReferenceCache:
    """Oracle tables and full-cache log-probs per sample (:class:`Reference`), computed in batches on first use."""

    def __init__(self, model: nn.Module, tokenizer, batch_size: int = 8):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.entries: dict[tuple, Reference] = {}

    @torch.no_grad()
    def get(self, samples: Sequence[tasks.Sample]) -> list[Reference]:
        """The references of ``samples``, computing the missing ones (detaching any eviction run from the model)."""
        missing = list({sample_key(s): s for s in samples if sample_key(s) not in self.entries}.values())
        if missing:
            release(self.model)
        for start in range(0, len(missing), self.batch_size):
            batch = missing[start : start + self.batch_size]
            tables = oracle_table(self.model, self.tokenizer, batch)  # [b, L, H, width]
            for sample, table, log_probs in zip(batch, tables, self._full_log_probs(batch)):
                table = table[..., : len(sample.input_ids)].contiguous()
                scores = table.double().exp().masked_fill(~torch.isfinite(table), 0.0)
                self.entries[sample_key(sample)] = Reference(table, (scores / scores.sum()).numpy(), log_probs)
        return [self.entries[sample_key(s)] for s in samples]

    def _full_log_probs(self, batch: list[tasks.Sample]) -> list[Tensor]:
        """Next-token log-probs of a full cache at every answer position: ``[A, vocab]`` per sample (one forward
        over prompt + answer[:-1], right-padded)."""
        rows = [s.input_ids + s.answer_ids[:-1] for s in batch]
        width = max(map(len, rows))
        device = next(self.model.parameters()).device
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
        logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        out = []
        for i, s in enumerate(batch):
            n = len(s.input_ids)
            out.append(torch.log_softmax(logits[i, n - 1 : n - 1 + len(s.answer_ids)], -1))
        return out
