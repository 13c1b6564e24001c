"""Actor sampling with a KV cache: single prompts for rollouts, and migratable decode batches.

``DecodeBatch`` is one generation instance's running batch, as in continuous batching: samples
leave the batch the step they finish (so a long tail decodes at a small batch size), and
``extract``/``absorb`` move live samples with their KV caches and their own samplers between
instances (RLHFuse's migration; here the caches travel as tensors instead of over RDMA).

Instances whose samples have generated different numbers of tokens hold caches of different
lengths. A merged batch left-pads the shorter caches with zeros and masks them out; each sample
keeps its own position ids, so attention and rotary embeddings see exactly the sequence a
sample would see alone (the tests compare against decoding samples one by one).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import DynamicCache


@torch.no_grad()
def sample_response(
    model: nn.Module,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    generator: torch.Generator,
    *,
    eos_token_id: int | None = None,
    temperature: float = 1.0,
) -> tuple[list[int], list[float]]:
    """Sample one response; returns (tokens, their log-probs under the sampling distribution)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    ids = torch.tensor([list(prompt_ids)])
    out = model(input_ids=ids, use_cache=True)
    cache = out.past_key_values
    logits = out.logits[:, -1]
    tokens: list[int] = []
    logprobs: list[float] = []
    for _ in range(max_new_tokens):
        logp = torch.log_softmax(logits.float() / temperature, dim=-1)
        token = int(torch.multinomial(logp.exp(), 1, generator=generator))
        tokens.append(token)
        logprobs.append(float(logp[0, token]))
        if eos_token_id is not None and token == eos_token_id:
            break
        out = model(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits = out.logits[:, -1]
    return tokens, logprobs


@dataclass
class MigrationPayload:
    """Live samples leaving an instance, with everything needed to continue decoding them."""

    sample_ids: list[int]
    keys: list[Tensor]
    """Per layer ``(n, kv_heads, seq, head_dim)``."""
    values: list[Tensor]
    attention_mask: Tensor
    """(n, seq) 1 where the cache holds a real token."""
    positions: Tensor
    """(n,) position id of each sample's next input token."""
    next_tokens: Tensor
    """(n,) last sampled token, not yet in the cache."""
    tokens: list[list[int]]
    logprobs: list[list[float]]
    targets: list[int]
    generator_states: list[Tensor]
    """Each sample's own sampler state: it continues the same random stream wherever it decodes."""


def _left_pad(t: Tensor, length: int, dim: int) -> Tensor:
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([torch.zeros(shape, dtype=t.dtype), t], dim=dim)


def sample_generators(seed: int, sample_ids: Sequence[int]) -> list[torch.Generator]:
    """One sampler per sample, seeded from (seed, sample id): a sample draws the same tokens
    whichever instance decodes it and whatever else shares its batch (up to float noise in the
    logits of different batch shapes)."""
    return [torch.Generator().manual_seed(seed * 1_000_003 + int(s)) for s in sample_ids]


class DecodeBatch:
    """Batched sampling (temperature 1) of prompts of any length; each sample stops at its target
    length or, when ``eos_ids`` is given, at the first end-of-sequence token (included).

    Forced targets (no ``eos_ids``) fix a benchmark's work in advance (the tokens themselves are
    sampled); the live trainer passes the model's end tokens and a maximum length. Prompts are
    left-padded into one batch with a padding mask, each sample keeping its own position ids.
    """

    def __init__(
        self,
        model: nn.Module,
        sample_ids: Sequence[int],
        prompts: Sequence[Sequence[int]],
        targets: Sequence[int],
        generators: Sequence[torch.Generator],
        *,
        eos_ids: frozenset[int] | None = None,
        pad_token_id: int = 0,
    ) -> None:
        if not len(prompts) == len(sample_ids) == len(targets) == len(generators):
            raise ValueError(
                f"{len(sample_ids)} ids, {len(prompts)} prompts, {len(targets)} targets, {len(generators)} generators"
            )
        if any(t < 1 for t in targets):
            raise ValueError(f"targets must be >= 1, got {list(targets)}")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        self.model = model
        self.eos_ids = eos_ids
        self.generators = list(generators)
        self.sample_ids = list(sample_ids)
        self.targets = list(targets)
        self.tokens: list[list[int]] = [[] for _ in sample_ids]
        self.logprobs: list[list[float]] = [[] for _ in sample_ids]
        self.finished: dict[int, tuple[list[int], list[float]]] = {}
        self.cache: DynamicCache | None = None
        n = len(prompts)
        width = max((len(p) for p in prompts), default=1)
        self.attention_mask = torch.zeros(n, width, dtype=torch.long)
        ids = torch.full((n, width), pad_token_id, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(list(prompt))
            self.attention_mask[row, width - len(prompt) :] = 1
        self.positions = self.attention_mask.sum(dim=1)
        self.next_tokens = torch.zeros(n, dtype=torch.long)
        if n:
            position_ids = (self.attention_mask.cumsum(dim=1) - 1).clamp(min=0)
            with torch.no_grad():
                out = model(input_ids=ids, attention_mask=self.attention_mask, position_ids=position_ids,
                            use_cache=True)
            self.cache = out.past_key_values
            self._sample(out.logits[:, -1])

    def __len__(self) -> int:
        return len(self.sample_ids)

    def _sample(self, logits: Tensor) -> list[int]:
        logp = torch.log_softmax(logits.float(), dim=-1)
        probs = logp.exp()
        chosen = torch.stack(
            [torch.multinomial(probs[row], 1, generator=g) for row, g in enumerate(self.generators)]
        ).squeeze(1)
        picked = logp.gather(1, chosen.unsqueeze(1)).squeeze(1)
        self.next_tokens = chosen
        done_rows = []
        for row, (tok, lp) in enumerate(zip(chosen.tolist(), picked.tolist(), strict=True)):
            self.tokens[row].append(int(tok))
            self.logprobs[row].append(float(lp))
            ended = self.eos_ids is not None and int(tok) in self.eos_ids
            if ended or len(self.tokens[row]) >= self.targets[row]:
                done_rows.append(row)
        done = [self.sample_ids[row] for row in done_rows]
        for row in done_rows:
            self.finished[self.sample_ids[row]] = (self.tokens[row], self.logprobs[row])
        if done_rows:
            self._keep([row for row in range(len(self)) if row not in set(done_rows)])
        return done

    def _keep(self, rows: list[int]) -> None:
        idx = torch.tensor(rows, dtype=torch.long)
        self.sample_ids = [self.sample_ids[r] for r in rows]
        self.targets = [self.targets[r] for r in rows]
        self.tokens = [self.tokens[r] for r in rows]
        self.logprobs = [self.logprobs[r] for r in rows]
        self.generators = [self.generators[r] for r in rows]
        self.attention_mask = self.attention_mask[idx]
        self.positions = self.positions[idx]
        self.next_tokens = self.next_tokens[idx]
        if self.cache is not None:
            if rows:
                self.cache.batch_select_indices(idx)
            else:
                self.cache = None

    @torch.no_grad()
    def step(self) -> list[int]:
        """Decode one token for every live sample; returns the sample ids that finished."""
        if not len(self):
            return []
        mask = torch.cat([self.attention_mask, torch.ones(len(self), 1, dtype=torch.long)], dim=1)
        out = self.model(
            input_ids=self.next_tokens.unsqueeze(1),
            attention_mask=mask,
            position_ids=self.positions.unsqueeze(1),
            past_key_values=self.cache,
            use_cache=True,
        )
        self.cache = out.past_key_values
        self.attention_mask = mask
        self.positions = self.positions + 1
        return self._sample(out.logits[:, -1])

    def extract(self, sample_ids: Sequence[int] | None = None) -> MigrationPayload:
        """Remove live samples (default: all) from this batch, with their caches."""
        wanted = set(self.sample_ids if sample_ids is None else sample_ids)
        rows = [r for r, s in enumerate(self.sample_ids) if s in wanted]
        idx = torch.tensor(rows, dtype=torch.long)
        layers: list[Any] = [] if self.cache is None else list(self.cache.layers)
        payload = MigrationPayload(
            sample_ids=[self.sample_ids[r] for r in rows],
            keys=[layer.keys[idx].clone() for layer in layers],
            values=[layer.values[idx].clone() for layer in layers],
            attention_mask=self.attention_mask[idx].clone(),
            positions=self.positions[idx].clone(),
            next_tokens=self.next_tokens[idx].clone(),
            tokens=[list(self.tokens[r]) for r in rows],
            logprobs=[list(self.logprobs[r]) for r in rows],
            targets=[self.targets[r] for r in rows],
            generator_states=[self.generators[r].get_state() for r in rows],
        )
        self._keep([r for r in range(len(self)) if r not in set(rows)])
        return payload

    def absorb(self, payload: MigrationPayload) -> None:
        """Add migrated samples; both sides' caches are left-padded to a common length."""
        if not payload.sample_ids:
            return
        generators = []
        for state in payload.generator_states:
            g = torch.Generator()
            g.set_state(state)
            generators.append(g)
        if not len(self) or self.cache is None:
            self.attention_mask = payload.attention_mask
            self.positions = payload.positions
            self.next_tokens = payload.next_tokens
            self.cache = DynamicCache(ddp_cache_data=list(zip(payload.keys, payload.values, strict=True)))
        else:
            length = max(self.attention_mask.shape[1], payload.attention_mask.shape[1])
            merged = []
            layers: list[Any] = list(self.cache.layers)
            for layer, k_in, v_in in zip(layers, payload.keys, payload.values, strict=True):
                keys = torch.cat([_left_pad(layer.keys, length, 2), _left_pad(k_in, length, 2)])
                values = torch.cat([_left_pad(layer.values, length, 2), _left_pad(v_in, length, 2)])
                merged.append((keys, values))
            self.cache = DynamicCache(ddp_cache_data=merged)
            self.attention_mask = torch.cat(
                [_left_pad(self.attention_mask, length, 1), _left_pad(payload.attention_mask, length, 1)]
            )
            self.positions = torch.cat([self.positions, payload.positions])
            self.next_tokens = torch.cat([self.next_tokens, payload.next_tokens])
        self.sample_ids += payload.sample_ids
        self.targets += payload.targets
        self.tokens += payload.tokens
        self.logprobs += payload.logprobs
        self.generators += generators
