"""Prompt formats: the chat template and the plain completion format for base models."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.loader import _fingerprint
from models.prompting import COMPLETION_STOPS, render


class TemplateTokenizer:
    """Stands in for a tokenizer with a chat template (only ``apply_chat_template`` is used)."""

    def apply_chat_template(self, turns, add_generation_prompt: bool, tokenize: bool) -> str:
        body = "".join(f"<{t['role']}>{t['content']}</{t['role']}>" for t in turns)
        return body + ("<assistant>" if add_generation_prompt else "")


def test_completion_format_renders_question_and_answer_turns() -> None:
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
             {"role": "assistant", "content": "Paris"}, {"role": "user", "content": " And of Japan? "}]
    out = render("completion", None, turns)
    assert out.text == "Be brief.\n\nQuestion: Capital of France?\nAnswer: Paris\nQuestion: And of Japan?\nAnswer:"
    assert out.add_special_tokens and out.stop == COMPLETION_STOPS


def test_chat_format_uses_the_template_and_adds_no_special_tokens() -> None:
    out = render("chat", TemplateTokenizer(), [{"role": "user", "content": "hi"}])
    assert out.text == "<user>hi</user><assistant>"
    assert not out.add_special_tokens and out.stop == ()


def test_unknown_format_and_missing_user_turn_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown prompt format"):
        render("haiku", None, [{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="user turn"):
        render("completion", None, [{"role": "system", "content": "hi"}])


def test_converted_model_cache_is_keyed_by_the_converter_versions(tmp_path: Path) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    old = {"transformers": "5.17.0", "gguf": "0.19.0", "torch": "2.15.0"}
    new = {**old, "transformers": "5.24.0"}
    assert _fingerprint(gguf, old) != _fingerprint(gguf, new)
    assert _fingerprint(gguf, old) == _fingerprint(gguf, dict(old))
