"""The engine interface: what the serving loop needs from torch or vLLM.

The scheduling policy decides which sequences run in each iteration; the engine only executes.
Contract of one iteration, ``execute(batch)``:

* every sequence that was ``submit``-ted and not yet ``release``-d must be in ``batch``
  (rows are never paused; a policy that stops running a sequence releases it);
* a sequence in ``batch`` for the first time is prefilled, which yields its first token; every
  other sequence decodes exactly one token;
* a sequence whose generation has ended (EOS, stop string, ``max_tokens``) may stay in the
  batch as padding (static batching); it then yields an empty output with ``finished=True``;
* a ``preempt``-ed sequence leaves the running rows but keeps its state (tokens, text, sampler):
  it is not in the batches that follow until it is resumed, by being in a batch again. Resuming
  recomputes its KV (a prefill over prompt and generated tokens, which yields its next token) or,
  when it was swapped out, restores the KV and decodes as usual.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

BASE_ADAPTER = "__base__"
"""Adapter name meaning "no adapter" (peft's convention for mixed batches)."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0
    """0 means greedy."""
    top_p: float = 1.0
    seed: int | None = None
    """Per-request seed: the same seed and prompt give the same sample whatever the batch."""
    stop: tuple[str, ...] = ()
    """Generation ends before the first occurrence of any of these strings (not included)."""
    ignore_eos: bool = False
    """Keep generating past EOS until ``max_tokens`` (benchmarks with fixed output lengths)."""

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens} must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"temperature={self.temperature} must be >= 0 and top_p={self.top_p} in (0, 1]")


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    adapter: str | None = None
    """Hash of a loaded LoRA adapter; None or ``BASE_ADAPTER`` for the base model."""

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError(f"request {self.request_id!r} has an empty prompt")


@dataclass(frozen=True)
class TokenOutput:
    """One sequence's result of one iteration."""

    token_ids: tuple[int, ...]
    text: str
    """Newly final text (held back while it could still be the start of a stop string)."""
    finished: bool
    finish_reason: str | None = None
    """``stop`` (EOS or a stop string) or ``length`` (max_tokens), once finished."""
    logprobs: tuple[float, ...] = ()
    """Log-probability of each token in ``token_ids`` under the model (temperature 1), for RL
    rollouts; engines that cannot report them leave this empty."""


class Engine(ABC):
    """A model that runs iterations over a changing set of sequences."""

    model_name: str

    @abstractmethod
    def encode_prompt(self, prompt: str, chat: bool = True) -> list[int]:
        """Token ids of a user prompt (through the chat template when ``chat``)."""

    @abstractmethod
    def submit(self, request: EngineRequest) -> None:
        """Register a sequence; it is prefilled in the next ``execute`` that includes it."""

    @abstractmethod
    def execute(self, batch: Sequence[str]) -> dict[str, TokenOutput]:
        """Run one iteration over ``batch`` (see the module docstring)."""

    @abstractmethod
    def release(self, request_id: str) -> None:
        """Free a sequence's state (finished or aborted). Unknown ids are ignored."""

    @abstractmethod
    def load_adapter(self, adapter_hash: str, path: str) -> None:
        """Make a LoRA adapter directory available under its content hash (idempotent)."""

    @abstractmethod
    def unload_adapter(self, adapter_hash: str) -> None:
        """Forget an adapter; in-flight sequences using it must have been released."""

    @abstractmethod
    def load_checkpoint(self, version: str, path: str) -> None:
        """Copy a (partial) checkpoint's tensors into the live base weights."""

    def adapter_servable(self, adapter_hash: str) -> bool:
        """May this loaded adapter serve on the weights loaded now (``core.personalization.pinning``)?
        Engines that do not track adapters' base versions serve them only on the original weights."""
        return self.model_version == "base"

    @property
    @abstractmethod
    def model_version(self) -> str:
        """Version of the base weights currently served (``base`` until a checkpoint is loaded)."""

    @property
    @abstractmethod
    def adapters(self) -> tuple[str, ...]:
        """Hashes of the loaded adapters."""

    @property
    @abstractmethod
    def active(self) -> tuple[str, ...]:
        """Ids of submitted, not yet released sequences."""

    # --- optional: preemption (engines that manage their own KV memory leave these alone) ----------
    @property
    def supports_preemption(self) -> bool:
        """Whether ``preempt`` works (a policy with a KV budget needs it)."""
        return False

    @property
    def supports_swap(self) -> bool:
        """Whether ``preempt(..., swap=True)`` keeps the KV in host memory."""
        return False

    def preempt(self, request_id: str, swap: bool = False) -> None:
        """Take a running sequence out of the batch, freeing (or swapping out) its KV."""
        raise NotImplementedError(f"{type(self).__name__} cannot preempt sequences")

    @property
    def kv_bytes_per_token(self) -> int | None:
        """Bytes of KV cache one token of context takes (None: the engine does not say)."""
        return None

    @property
    def device_name(self) -> str:
        """Where the engine runs (``cpu``, ``cuda:0``...), for heartbeats and cost models."""
        return "cpu"
