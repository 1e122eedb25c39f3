"""Episodes over the engine: ``N`` rows fed through one batched forward per step, decided through the engine's offers.

A :class:`Rollout` holds one :class:`~kvzap_lab.engine.EvictionRun` with an :class:`~kvzap_lab.engine.Offer`
(the engine finds the pairs that left the window at its eviction points and evicts the ones the agent drops), and
per row an :class:`Episode`: the tokens to feed (prompt chunks, then teacher-forced or greedy answer tokens), the
predictions, the KL to the full cache and the oracle mass lost. The envs turn its results into observations,
rewards and infos.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from kvzap_lab import tasks
from kvzap_lab.engine import Offer, Pending, eviction_run, left_pad
from kvzap_lab.envs.config import SCORE_BOUND, EnvConfig
from kvzap_lab.envs.references import Reference
from kvzap_lab.model import describe


@dataclass
class Episode:
    """One row's episode: where it is, what it decided, what it earned."""

    sample: tasks.Sample
    ref: Reference
    total: int  # T: tokens the episode feeds at most (prompt + answer - 1)
    fed: int = 0
    cand_start: int = 0  # the candidates of the last forward: positions cand_start .. cand_start + cand_count - 1
    cand_count: int = 0
    predicted: list[int] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    lost: float = 0.0
    kept_decided: int = 0
    offered: int = 0  # candidates offered so far (positions)
    evicted_last: int = 0  # pairs evicted by the last decision
    finished: bool = False  # no forward left
    done: bool = False  # terminated
    diverged: bool = False  # greedy: a generated token differs from the reference

    @property
    def n_prompt(self) -> int:
        return len(self.sample.input_ids)

    def next_tokens(self, chunk: int, decoding: str) -> list[int]:
        if self.finished:
            return []
        if self.fed < self.n_prompt:
            return self.sample.input_ids[self.fed : self.fed + chunk]
        k = self.fed - self.n_prompt  # the answer token fed now
        return [self.predicted[k] if decoding == "greedy" else self.sample.answer_ids[k]]


class Rollout:
    """``N`` episodes sharing one model, one engine run and one batched cache (row ``i`` is episode ``i``)."""

    def __init__(self, config: EnvConfig, n: int):
        self.c, self.n = config, n
        spec = describe(config.model)
        self.L, self.H, self.D, self.C = spec.n_layers, spec.n_kv_heads, spec.hidden_size, config.max_candidates
        self.device = next(config.model.parameters()).device
        self.episodes: list[Episode | None] = [None] * n
        self.run = None
        self.cache = None
        self.pending: Pending | None = None  # the engine's offer of the last forward
        self._weights = np.zeros((n, self.L, self.H, self.C))  # oracle weights of the candidates
        self._scorer = None if config.policy is None else config.policy.scorer
        self._table: Tensor | None = None  # the oracle tables of the rows, for a scorer that takes them

    def start(self) -> None:
        """A fresh engine run and cache for all rows (the previous run, if any, is dropped)."""
        if self.run is not None:
            self.run.detach()
        offer = Offer(self.c.window, self.c.sinks, hidden=self.c.observation == "full")
        self.run = eviction_run(self.c.model, self.c.policy, evict_every=self.c.evict_every,
                                compact_every=self.c.compact_every, offer=offer)
        self.cache, self.pending = self.run.new_cache(), None
        self.episodes = [None] * self.n

    def close(self) -> None:
        """Take the run's hooks off the model."""
        if self.run is not None:
            self.run.detach()

    def begin(self, row: int, sample: tasks.Sample, ref: Reference) -> None:
        """Start ``sample`` in ``row``: the row's old pairs are dropped and its positions restart at 0."""
        if self.cache.real_seen is not None:
            self.run.restart_row(row)
        self.episodes[row] = Episode(sample, ref, len(sample.input_ids) + len(sample.answer_ids) - 1)
        if hasattr(self._scorer, "set_scores"):  # the oracle policy reads the tables of its rows
            width = max(len(e.sample.input_ids) for e in self.episodes if e is not None)
            self._table = torch.full((self.n, self.L, self.H, width), torch.inf)
            for i, e in enumerate(self.episodes):
                if e is not None:
                    self._table[i, :, :, : e.n_prompt] = e.ref.table

    @torch.no_grad()
    def forward(self) -> dict[int, float]:
        """One batched forward of every row's next tokens; returns the fidelity KL of each row that predicted an
        answer token, and reads the candidates the engine offers."""
        feeds = [e.next_tokens(self.c.chunk_size, self.c.decoding) if e is not None else [] for e in self.episodes]
        if not any(feeds):
            return {}
        ids, valid = left_pad(feeds, self.c.model.config.pad_token_id or 0, self.device)
        mask = None if bool(valid.all()) else torch.cat([valid.new_ones(self.n, self.cache.seen), valid], 1)
        self.run.attach()  # another env may have used the model since our last forward
        if self._table is not None:  # set at every forward: envs may share one policy object
            self._scorer.set_scores(self._table)
        logits = self.c.model(input_ids=ids, attention_mask=mask, cache=self.cache, logits_to_keep=1).logits[:, -1]
        predicting = []
        for i, (e, f) in enumerate(zip(self.episodes, feeds)):
            if f:
                e.fed += len(f)
                if e.fed >= e.n_prompt:
                    predicting.append(i)
        kls = self._predict(logits, predicting)
        self._read_offer()
        return kls

    def _predict(self, logits: Tensor, rows: list[int]) -> dict[int, float]:
        """Record the greedy token each of ``rows`` predicted (``logits [N, vocab]``), decide whether its decoding is
        over, and return its KL to the full cache (where the reference applies)."""
        if not rows:
            return {}
        log_probs = torch.log_softmax(logits[rows].float(), -1)
        tokens = log_probs.argmax(-1).tolist()
        scored, references = [], []
        for i, token in zip(rows, tokens):
            e = self.episodes[i]
            k = e.fed - e.n_prompt  # answer index this forward predicted
            reference, last = e.sample.answer_ids[k], k == len(e.sample.answer_ids) - 1
            scored.append(not e.diverged)  # the full-cache reference holds while the tokens fed are the reference's
            references.append(e.ref.log_probs[k])
            e.predicted.append(token)
            if self.c.decoding == "teacher":
                e.finished = last
            else:
                e.diverged |= token != reference
                wrong = token != reference and e.sample.stops_early  # exact match is lost: evaluate stops too
                e.finished = last or token == self.c.eos_token_id or token in e.sample.stop_ids or wrong
        full = torch.stack(references)
        kl = (full.exp() * (full - log_probs)).sum(-1).clamp_min(0).tolist()
        out = {}
        for i, value, ok in zip(rows, kl, scored):
            if ok:
                self.episodes[i].kl.append(value)
                out[i] = value
        return out

    def _read_offer(self) -> None:
        """Note each row's candidates (the engine's offer) and their oracle weights."""
        self.pending = self.run.pending()
        self._weights[:] = 0.0
        starts = [0] * self.n if self.pending is None else self.pending.start.tolist()
        counts = [0] * self.n if self.pending is None else self.pending.count.tolist()
        for i, e in enumerate(self.episodes):
            if e is None:
                continue
            e.cand_start, e.cand_count = starts[i], counts[i]
            if e.cand_count > self.C:
                raise RuntimeError(f"the engine offered {e.cand_count} candidates, more than max_candidates={self.C}")
            if e.cand_count:
                w = e.ref.weights[:, :, e.cand_start : e.cand_start + e.cand_count]
                self._weights[i, :, :, : w.shape[2]] = w

    def candidate_scores(self, row: int) -> Tensor:
        """Stored scores of ``row``'s candidates (unclipped): ``[L, H, C]``, NaN beyond the candidates."""
        scores = torch.full((self.L, self.H, self.C), torch.nan)
        if self.pending is not None and self.pending.scores is not None:
            got = self.pending.scores[row]
            scores[..., : got.shape[-1]] = got.cpu()
        return scores

    @torch.no_grad()
    def decide(self, keep: np.ndarray, rows: list[int]) -> dict[int, tuple[float, int]]:
        """Apply ``keep [N, L, H, C]`` (bool) to the candidates of ``rows`` (any other row keeps its candidates);
        returns per row (oracle mass lost, pairs kept)."""
        out = {i: (0.0, 0) for i in rows}
        pending = self.pending
        if pending is None:
            return out
        width = pending.mask.shape[-1]
        flags = np.ones(tuple(pending.mask.shape), dtype=bool)
        flags[rows] = keep[rows, :, :, :width]
        self.run.decide(torch.from_numpy(flags))
        for i in rows:
            e = self.episodes[i]
            n_kept = int(keep[i, :, :, : e.cand_count].sum())
            lost = float(self._weights[i][~keep[i]].sum())
            e.lost += lost
            e.kept_decided += n_kept
            e.offered += e.cand_count
            e.evicted_last = e.cand_count * self.L * self.H - n_kept
            e.cand_count = 0
            out[i] = (lost, n_kept)
        self.pending = None
        return out

    def observe(self, kept: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The batched observation ``{key: [N, ...]}`` of the current candidates (fresh arrays); ``kept`` is
        :meth:`kept` if already at hand."""
        L, H, C = self.L, self.H, self.C
        obs = {
            "candidate_mask": np.zeros((self.n, C), np.float32),
            "positions": np.zeros((self.n, C), np.float32),
            "occupancy": np.zeros((self.n, L, H), np.float32),
            "progress": np.zeros((self.n, 1), np.float32),
        }
        full = self.c.observation == "full"
        if full:
            obs["hidden"] = np.zeros((self.n, L, C, self.D), np.float32)
        pending = self.pending
        kept = self.kept() if kept is None else kept  # [N, L, H]
        for i, e in enumerate(self.episodes):
            if e is None:
                continue
            if e.cand_count and not e.done:
                lo, n = e.cand_start, e.cand_count
                if full:
                    bound = self.c.hidden_bound
                    obs["hidden"][i, :, :n] = pending.hidden[i, :, :n].clamp(-bound, bound).cpu().numpy()
                obs["candidate_mask"][i, :n] = 1.0
                obs["positions"][i, :n] = np.arange(lo, lo + n, dtype=np.float32) / e.total
            obs["occupancy"][i] = kept[i] / max(e.fed, 1)
            obs["progress"][i] = e.fed / e.total
        if self.c.policy is not None:
            scores = np.zeros((self.n, L, H, C), np.float32)
            if pending is not None:
                s = pending.scores.nan_to_num(0.0, posinf=SCORE_BOUND, neginf=-SCORE_BOUND).clamp(-SCORE_BOUND, SCORE_BOUND)
                scores[..., : s.shape[-1]] = s.cpu().numpy()
                scores *= obs["candidate_mask"][:, None, None, :]
            obs["scores"] = scores
        return obs

    def kept(self) -> np.ndarray:
        """Pairs held per row, layer and KV head: ``[N, L, H]``."""
        if self.cache is None or not self.cache.layers[0].is_initialized:
            return np.zeros((self.n, self.L, self.H))
        return torch.stack([layer.kept() for layer in self.cache.layers], 1).cpu().numpy()

    def step(self, keep: np.ndarray, deciding: list[int]) -> tuple[np.ndarray, list[dict], dict[str, np.ndarray]]:
        """Decide the candidates of the ``deciding`` rows with ``keep [N, L, H, C]``, end the finished episodes, run
        the next forward for the others. Returns the rewards ``[N]``, per-row infos (``terminated`` in each) and the
        batched observation."""
        w_o, w_f, w_m = self.c.weights
        decisions = self.decide(keep, deciding)
        rewards = np.zeros(self.n)
        terms = {i: {"oracle": -decisions[i][0], "fidelity": 0.0, "memory": 0.0} for i in deciding}
        for i in deciding:
            e = self.episodes[i]
            terms[i]["memory"] = -decisions[i][1] / (self.L * self.H * e.total)
            if e.finished:
                e.done = True
        kls = self.forward()
        kept = self.kept()
        infos = [{} for _ in range(self.n)]
        for i, e in enumerate(self.episodes):
            if e is None:
                continue
            t = terms.setdefault(i, {"oracle": 0.0, "fidelity": 0.0, "memory": 0.0})
            if i in kls:
                t["fidelity"] = -kls[i] / len(e.sample.answer_ids)
            if e.done and i in deciding:  # the pairs held that were never offered pay at the end
                t["memory"] -= float(kept[i].sum() - e.kept_decided) / (self.L * self.H * e.total)
            rewards[i] = w_o * t["oracle"] + w_f * t["fidelity"] + w_m * t["memory"]
            infos[i] = self.info(i, kept[i], t)
        return rewards, infos, self.observe(kept)

    def info(self, row: int, kept: np.ndarray, terms: dict | None) -> dict:
        """The info dict of ``row`` (``kept [L, H]``: its pairs held; ``terms``: its reward terms of this step)."""
        e = self.episodes[row]
        info = {
            "compression": float(1.0 - kept.sum() / max(e.fed * kept.size, 1)),
            "kl": float(np.mean(e.kl)) if e.kl else 0.0,
            "oracle_mass_retained": float(1.0 - e.lost),
            "phase": "prefill" if e.fed < e.n_prompt else "decode",
            "terms": dict(terms or {"oracle": 0.0, "fidelity": 0.0, "memory": 0.0}),
            "terminated": e.done,
        }
        if e.done:
            reference = e.sample.answer_ids
            info["accuracy"] = float(tasks.score_answer(e.sample, e.predicted, self.c.tokenizer))
            hits = sum(p == t for p, t in zip(e.predicted, reference))
            info["token_accuracy"] = hits / len(reference)
            info["answer_ids"] = np.asarray(e.predicted, dtype=np.int64)
        return info
