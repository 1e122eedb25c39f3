"""What a task instance is (:class:`Sample`) and how its text pieces become token ids (:class:`PieceEncoder`)."""

from __future__ import annotations

from dataclasses import dataclass, field

TASKS = ("single_needle", "multi_key_needle", "multi_value", "kv_retrieval", "variable_tracking", "copy")
# How a sample's generated answer is scored (see kvzap_lab.tasks.scoring).
SCORINGS = ("exact", "token_accuracy", "contains", "recall")


@dataclass
class Sample:
    """One task instance.

    ``input_ids`` is the prompt to prefill (through the generation prompt and the answer prefix);
    ``context_span = (start, end)`` are the token offsets of the context inside it, the part eviction acts on;
    ``answer_ids`` the reference continuation (answer, then the end-of-turn token).

    What generation and scoring need, in one place:

    - ``scoring``: ``"exact"`` (generated ids equal ``answer_ids``: the test bed), ``"token_accuracy"`` (fraction of
      ``answer_ids`` reproduced at their position: the test bed's copy), ``"contains"`` (RULER: fraction of
      ``references`` contained in the normalised output text) or ``"recall"`` (fraction of the words of
      ``references[0]`` reproduced in order: copy on chat models); see :func:`kvzap_lab.tasks.score_answer`;
    - ``references``: the strings a ``contains``/``recall`` scorer looks for;
    - ``stop_ids``: generation stops at the first of these tokens (e.g. ``<|im_end|>``);
    - ``max_new_tokens``: the generation budget (default ``len(answer_ids)``).
    """

    task: str
    input_ids: list[int]
    context_span: tuple[int, int]
    question: str
    answer: str
    answer_ids: list[int]
    meta: dict = field(default_factory=dict)
    scoring: str = "exact"
    references: tuple[str, ...] = ()
    stop_ids: tuple[int, ...] = ()
    max_new_tokens: int = 0

    def __post_init__(self):
        if self.scoring not in SCORINGS:
            raise ValueError(f"unknown scoring {self.scoring!r}; scorings: {', '.join(SCORINGS)}")
        if self.max_new_tokens <= 0:
            self.max_new_tokens = len(self.answer_ids)

    @property
    def context_ids(self) -> list[int]:
        start, end = self.context_span
        return self.input_ids[start:end]

    @property
    def stops_early(self) -> bool:
        """Whether generation may stop at the first token that differs from ``answer_ids`` (exact match needs no more)."""
        return self.scoring == "exact"


class PieceEncoder:
    """Encodes text pieces (no special tokens added) with a per-piece cache: filler sentences repeat."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[str, list[int]] = {}

    def __call__(self, piece: str) -> list[int]:
        ids = self.cache.get(piece)
        if ids is None:
            ids = self.tokenizer.encode(piece, add_special_tokens=False)
            self.cache[piece] = ids
        return ids

    def special(self, token: str) -> int:
        """The id of special token ``token``; ValueError if the tokenizer does not know it."""
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no {token!r} token")
        return token_id


def encoder(tokenizer) -> PieceEncoder:
    """The :class:`PieceEncoder` of ``tokenizer``, created once and kept on it."""
    cached = getattr(tokenizer, "_kvzap_task_encoder", None)
    if cached is None:
        cached = PieceEncoder(tokenizer)
        tokenizer._kvzap_task_encoder = cached
    return cached
