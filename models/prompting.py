"""How each catalogued model is prompted: its chat template, or a plain completion format.

An instruction-tuned model (SmolLM2-135M-Instruct) is prompted through its chat template. A base
model (Gemma-3-270M: its GGUF carries no chat template, and with Gemma's turn format it echoes the
question) is prompted as a plain completion that it continues naturally::

    [system text, blank line]
    Question: <user turn>
    Answer: <assistant turn>
    Question: <last user turn>
    Answer:

and generation stops where the model starts the next question on its own. Which format each model
uses is ``ModelSpec.prompt_format`` in ``core/catalog.py``; it was chosen from measured per-topic
accuracy (``flywheel bench tasks``, docs/MODELS.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from core.catalog import ModelSpec

COMPLETION_STOPS = ("\nQuestion:", "\n\n\n")
"""Where a completion-prompted base model has finished its answer and starts a new question."""


@dataclass(frozen=True)
class RenderedPrompt:
    text: str
    add_special_tokens: bool
    """Whether the tokenizer adds its own special tokens (BOS) when encoding ``text``: a chat
    template writes them itself, a plain completion relies on the tokenizer."""
    stop: tuple[str, ...]
    """Stop strings the format needs on top of the request's own."""


def render(fmt: str, tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> RenderedPrompt:
    """The prompt text for ``messages`` (role/content dicts) in format ``fmt``.

    Raises ``ValueError`` for an unknown format or a conversation the format cannot express (no
    user turn); the chat template's own errors propagate (e.g. a role order it rejects).
    """
    turns = [{"role": m["role"], "content": m["content"]} for m in messages]
    if not any(t["role"] == "user" for t in turns):
        raise ValueError("a prompt needs at least one user turn")
    if fmt == "chat":
        text = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        return RenderedPrompt(text, add_special_tokens=False, stop=())
    if fmt == "completion":
        return RenderedPrompt(_completion_text(turns), add_special_tokens=True, stop=COMPLETION_STOPS)
    raise ValueError(f"unknown prompt format {fmt!r}; known: chat, completion")


def _completion_text(turns: Sequence[Mapping[str, str]]) -> str:
    system = "\n".join(t["content"].strip() for t in turns if t["role"] == "system")
    lines = [system, ""] if system else []
    for turn in turns:
        if turn["role"] == "user":
            lines.append(f"Question: {turn['content'].strip()}")
        elif turn["role"] == "assistant":
            lines.append(f"Answer: {turn['content'].strip()}")
    if turns[-1]["role"] != "assistant":
        lines.append("Answer:")
    return "\n".join(lines)


def prompt_ids(spec: ModelSpec, tokenizer: Any, messages: Sequence[Mapping[str, str]],
               fmt: str | None = None) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Token ids of ``messages`` for model ``spec`` (in its catalogued format unless ``fmt`` is
    given) and the stop strings that format adds."""
    rendered = render(fmt or spec.prompt_format, tokenizer, messages)
    ids = tokenizer.encode(rendered.text, add_special_tokens=rendered.add_special_tokens)
    return tuple(int(i) for i in ids), rendered.stop
