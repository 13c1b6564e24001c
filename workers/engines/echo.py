"""An engine that answers instantly by echoing the prompt's tokens: for measuring the event plane.

``flywheel worker --engine echo`` serves a catalogue model's decisions with it, so a benchmark
(``flywheel bench request-plane``) measures gateway -> router -> worker -> gateway and nothing of
a model. It honours the engine contract in one iteration: the prefill yields the whole answer
(the prompt's words, up to ``max_tokens``) and finishes the sequence (``length`` when it was cut,
``stop`` otherwise). Words are the tokens: a word's id is its index in a vocabulary that grows as
words are seen, so encoding is exact and decoding gives the words back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from workers.engines.base import Engine, EngineRequest, TokenOutput


class WordTokenizer:
    """Whitespace words <-> ids; the chat template is ``role: content`` lines."""

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}
        self._words: list[str] = []

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        out = []
        for word in text.split():
            found = self._ids.get(word)
            if found is None:
                found = self._ids[word] = len(self._words)
                self._words.append(word)
            out.append(found)
        return out

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return " ".join(self._words[i] for i in ids)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = False) -> str:
        text = "\n".join(f"{m['role']}: {m['content']}" for m in messages)
        return text + ("\nassistant:" if add_generation_prompt else "")


class EchoEngine(Engine):
    """Answers each sequence with its own prompt tokens, in the iteration that prefills it."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.tokenizer = WordTokenizer()
        self._requests: dict[str, EngineRequest] = {}
        self._answered: set[str] = set()

    def encode_prompt(self, prompt: str, chat: bool = True) -> list[int]:
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}]) if chat else prompt
        return self.tokenizer.encode(text) or self.tokenizer.encode("(empty)")

    def submit(self, request: EngineRequest) -> None:
        self._requests[request.request_id] = request

    def execute(self, batch: Sequence[str]) -> dict[str, TokenOutput]:
        out: dict[str, TokenOutput] = {}
        for rid in batch:
            if rid in self._answered:  # padding after the end (static batching)
                out[rid] = TokenOutput((), "", True, None)
                continue
            request = self._requests[rid]
            limit = request.sampling.max_tokens
            ids = request.prompt_ids[:limit]
            out[rid] = TokenOutput(tuple(ids), self.tokenizer.decode(ids), True,
                                   "length" if len(request.prompt_ids) > limit else "stop",
                                   logprobs=tuple(0.0 for _ in ids))
            self._answered.add(rid)
        return out

    def release(self, request_id: str) -> None:
        self._requests.pop(request_id, None)
        self._answered.discard(request_id)

    def load_adapter(self, adapter_hash: str, path: str) -> None:
        raise NotImplementedError("the echo engine serves no adapters (it has no weights)")

    def unload_adapter(self, adapter_hash: str) -> None:
        return None

    def load_checkpoint(self, version: str, path: str) -> None:
        raise NotImplementedError("the echo engine loads no checkpoints (it has no weights)")

    @property
    def model_version(self) -> str:
        return "echo"

    @property
    def adapters(self) -> tuple[str, ...]:
        return ()

    @property
    def active(self) -> tuple[str, ...]:
        return tuple(self._requests)
