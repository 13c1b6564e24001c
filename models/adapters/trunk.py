"""Token log-probabilities of (prompt, response) sequences under base + LoRA, computed fast.

LoRA lives only in the last ``n`` decoder layers, so everything below them (embeddings and the
first ``L - n`` layers) is a frozen *trunk* whose output depends on the token ids alone. The
trunk's hidden states are computed once per sequence (no grad) and cached; scoring and every
training step then run only the adapted layers, the final norm and the LM head, and the head
only at response positions. On SmolLM2 with ``n = 2`` that is 2 of 30 layers.

Sequences are right-padded and attention is plain causal, so a valid position never attends to
padding (all padding comes after it) and no padding mask is needed. The result equals a full
forward pass of the wrapped model (tested against it).

Encoding matches the inference engine: the prompt is one user turn rendered with the
tokenizer's chat template (``add_generation_prompt``), the response is its text followed by the
end-of-turn token, the token the engine stops on.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

END_OF_TURN_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>")


@dataclass(frozen=True)
class EncodedPair:
    """Token ids of one (prompt, response) sequence; the response starts at ``n_prompt``."""

    ids: tuple[int, ...]
    n_prompt: int

    @property
    def n_response(self) -> int:
        return len(self.ids) - self.n_prompt


class ChatEncoder:
    """Prompt and response to token ids, the way the engine formats a prompt request."""

    def __init__(self, tokenizer: Any, max_prompt_tokens: int, max_response_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.max_prompt_tokens = max_prompt_tokens
        self.max_response_tokens = max_response_tokens
        self.end_id = _end_of_turn_id(tokenizer)

    def encode_prompt(self, prompt: str) -> list[int]:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                           add_generation_prompt=True, tokenize=False)
            return list(tok.encode(text, add_special_tokens=False))
        return list(tok.encode(prompt, add_special_tokens=False))

    def encode(self, prompt: str, response: str) -> EncodedPair:
        """Prompts longer than the limit keep their end (the turn header the response follows)."""
        p = self.encode_prompt(prompt)[-self.max_prompt_tokens:]
        r = list(self.tokenizer.encode(response, add_special_tokens=False))[: self.max_response_tokens - 1]
        return EncodedPair(tuple(p + r + [self.end_id]), len(p))


def _end_of_turn_id(tokenizer: Any) -> int:
    vocab = tokenizer.get_vocab() if callable(getattr(tokenizer, "get_vocab", None)) else {}
    for token in END_OF_TURN_TOKENS:
        if token in vocab:
            return int(vocab[token])
    if getattr(tokenizer, "eos_token_id", None) is None:
        raise ValueError("tokenizer has neither an end-of-turn token nor an eos_token_id")
    return int(tokenizer.eos_token_id)


def _decoder(model: Any) -> Any:
    """The ``LlamaModel``-like module (embed_tokens, layers, norm, rotary_emb) inside any wrapping."""
    inner = model
    for _ in range(4):
        if hasattr(inner, "layers") and hasattr(inner, "embed_tokens"):
            return inner
        inner = inner.model if hasattr(inner, "model") else inner.base_model
    raise ValueError(f"cannot find the decoder layers in {type(model).__name__}")


def _lm_head(model: Any) -> Any:
    inner = model
    for _ in range(4):
        if hasattr(inner, "lm_head"):
            return inner.lm_head
        inner = inner.model if hasattr(inner, "model") else inner.base_model
    raise ValueError(f"cannot find the LM head in {type(model).__name__}")


def _causal_mask(length: int, dtype: torch.dtype) -> torch.Tensor:
    mask = torch.full((length, length), torch.finfo(dtype).min, dtype=dtype).triu(1)
    return mask[None, None]


class TrunkScorer:
    """Cached-trunk forward of a causal LM whose trainable part is its last ``n_top`` layers.

    ``model`` may be the bare transformers model or a peft wrapper around it; the top layers
    are called through whatever modules are in place, so LoRA applies (or not, inside peft's
    ``disable_adapter()``).
    """

    def __init__(self, model: Any, n_top: int, cache_size: int = 2048) -> None:
        self.model = model
        self.decoder = _decoder(model)
        self.head = _lm_head(model)
        n_layers = len(self.decoder.layers)
        if not 1 <= n_top <= n_layers:
            raise ValueError(f"n_top must be within [1, {n_layers}], got {n_top}")
        self.split = n_layers - n_top
        self.cache_size = cache_size
        self._trunk: OrderedDict[tuple[int, ...], torch.Tensor] = OrderedDict()

    def _positions(self, hidden: torch.Tensor) -> tuple[torch.Tensor, Any]:
        pos = torch.arange(hidden.shape[1], device=hidden.device)[None]
        return pos, self.decoder.rotary_emb(hidden, position_ids=pos)

    def _run(self, hidden: torch.Tensor, layers: Sequence[Any]) -> torch.Tensor:
        pos, rope = self._positions(hidden)
        mask = _causal_mask(hidden.shape[1], hidden.dtype).to(hidden.device)
        for layer in layers:
            out = layer(hidden, attention_mask=mask, position_ids=pos, position_embeddings=rope)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    @torch.no_grad()
    def trunk_states(self, seqs: Sequence[EncodedPair]) -> list[torch.Tensor]:
        """Hidden states entering the first adapted layer, one (T, H) tensor per sequence."""
        missing = list({s.ids for s in seqs if s.ids not in self._trunk})
        device = self.head.weight.device
        for start in range(0, len(missing), 16):
            chunk = missing[start:start + 16]
            width = max(len(ids) for ids in chunk)
            ids = torch.zeros((len(chunk), width), dtype=torch.long, device=device)
            for row, seq_ids in enumerate(chunk):
                ids[row, : len(seq_ids)] = torch.tensor(seq_ids, device=device)
            hidden = self._run(self.decoder.embed_tokens(ids), self.decoder.layers[: self.split])
            for row, seq_ids in enumerate(chunk):
                self._trunk[seq_ids] = hidden[row, : len(seq_ids)].clone()
        out = []
        for s in seqs:
            self._trunk.move_to_end(s.ids)
            out.append(self._trunk[s.ids])
        while len(self._trunk) > max(self.cache_size, len(seqs)):
            self._trunk.popitem(last=False)
        return out

    def clear(self) -> None:
        """Forget every cached trunk state (the frozen layers changed: a new base version)."""
        self._trunk.clear()

    def export_states(self) -> dict[tuple[int, ...], torch.Tensor]:
        return dict(self._trunk)

    def import_states(self, states: dict[tuple[int, ...], torch.Tensor]) -> None:
        """Add previously exported trunk states (same base model and split, or they are wrong)."""
        for ids, state in states.items():
            self._trunk[tuple(ids)] = state

    def logprobs(self, seqs: Sequence[EncodedPair]) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of response-token log-probs, response length) per sequence; differentiable
        through the adapted layers when grad is enabled."""
        states = self.trunk_states(seqs)
        width = max(s.shape[0] for s in states)
        hidden = states[0].new_zeros((len(states), width, states[0].shape[1]))
        for row, state in enumerate(states):
            hidden[row, : state.shape[0]] = state
        hidden = self.decoder.norm(self._run(hidden, self.decoder.layers[self.split:]))
        device = hidden.device
        rows: list[int] = []
        cols: list[int] = []
        targets: list[int] = []
        for i, s in enumerate(seqs):
            # position t predicts token t + 1: response tokens are predicted from n_prompt - 1 on
            rows.extend([i] * s.n_response)
            cols.extend(range(s.n_prompt - 1, len(s.ids) - 1))
            targets.extend(s.ids[s.n_prompt:])
        owner = torch.tensor(rows, device=device)
        picked = hidden[owner, torch.tensor(cols, device=device)]
        logits = self.head(picked).float()
        tgt = torch.tensor(targets, device=device)
        token_lp = logits.gather(1, tgt[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
        sums = torch.zeros(len(seqs), device=device, dtype=token_lp.dtype)
        sums = sums.index_add(0, owner, token_lp)
        counts = torch.tensor([s.n_response for s in seqs], device=device, dtype=token_lp.dtype)
        return sums, counts
