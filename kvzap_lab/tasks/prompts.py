"""Prompts for any tokenizer: its own chat template, or plain text when it has none; exact context spans.

A task prompt is one user message ``{instruction}\\n{context}\\n{question}``, then the generation prompt, then
the answer prefix (RULER's prompts end with the start of the answer: the model completes it)::

    chat:   template(user message, add_generation_prompt=True) + answer_prefix
    plain:  [bos] + user message + "\\n" + answer_prefix                     (tokenizers without a chat template)

The chat template is rendered once with a placeholder as the message, so whatever it adds (a default system
prompt, a bos token) is kept as it puts it; the text is encoded without adding special tokens (the template
holds bos when the model wants one, so it is never doubled); a plain prompt starts with bos only when the
tokenizer adds one to plain text.

The ids are assembled from pieces (the text before the context, the context's own ids, the text after it), so
the context span is exact by construction. The context starts with a newline and the text before it ends with
a non-space character, so for byte-level BPE tokenizers (SmolLM2, Llama 3, Qwen) the pieces are the tokens
the whole text encodes to (tested on SmolLM2).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvzap_lab.tasks.sample import PieceEncoder

PROMPT_STYLES = ("auto", "chat", "plain")
_PLACEHOLDER = "\x00KVZAP-LAB-MESSAGE\x00"


@dataclass(frozen=True)
class Frame:
    """The text around the user message (``before`` + message + ``after``) and the bos ids that open it."""

    style: str
    before: str
    after: str
    bos: tuple[int, ...] = ()


def frame(tokenizer, style: str = "auto") -> Frame:
    """How ``tokenizer`` wraps a user message: its chat template (``"chat"``), plain text (``"plain"``), or the
    template when it has one (``"auto"``).

    Raises:
        ValueError: ``style="chat"`` for a tokenizer without a chat template, or an unknown style.
    """
    if style not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {style!r}; styles: {', '.join(PROMPT_STYLES)}")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if style == "chat" and not has_template:
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__} has no chat template; "
            "set tokenizer.chat_template or use the plain-text prompt (style='plain')"
        )
    if has_template and style != "plain":
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": _PLACEHOLDER}], add_generation_prompt=True, tokenize=False
        )
        if text.count(_PLACEHOLDER) != 1:
            raise ValueError("the tokenizer's chat template does not hold the user message verbatim; use style='plain'")
        before, after = text.split(_PLACEHOLDER)
        return Frame("chat", before, after)
    bos = tokenizer.bos_token_id
    plain = tokenizer.encode("a", add_special_tokens=False)
    adds_bos = bos is not None and tokenizer.encode("a", add_special_tokens=True)[: len(plain) + 1] == [bos, *plain]
    return Frame("plain", "", "\n", (bos,) if adds_bos else ())


def build_prompt(
    encode: PieceEncoder, fr: Frame, instruction: str, context_ids: list[int], question: str, answer_prefix: str
) -> tuple[list[int], tuple[int, int]]:
    """Prompt ids and the context span ``(start, end)``: ``fr.before + instruction``, the context (which should
    start with a newline), ``"\\n" + question + fr.after + answer_prefix``."""
    head = list(fr.bos) + encode(fr.before + instruction)
    tail = encode("\n" + question + fr.after + answer_prefix)
    return head + list(context_ids) + tail, (len(head), len(head) + len(context_ids))
