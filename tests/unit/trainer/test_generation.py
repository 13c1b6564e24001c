"""Migratable decode batches: prompts of any length, end tokens, samplers that travel with samples."""

from __future__ import annotations

import torch

from workers.trainer.generation import DecodeBatch, sample_generators
from workers.trainer.models import build_tiny_models, causal_lm_logits

PROMPTS = [[5, 9, 11], [7, 3, 3, 8, 21, 4], [40], [13, 13, 2 + 10, 6]]
IDS = [10, 11, 12, 13]


def full_forward_logprobs(model: torch.nn.Module, prompt: list[int], tokens: list[int]) -> list[float]:
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logp = torch.log_softmax(causal_lm_logits(model, ids)[0].float(), dim=-1)
    return [float(logp[len(prompt) - 1 + t, tok]) for t, tok in enumerate(tokens)]


def run(batch: DecodeBatch) -> None:
    while len(batch):
        batch.step()


def test_logprobs_of_left_padded_and_migrated_samples_equal_a_full_forward() -> None:
    torch.set_num_threads(1)
    model = build_tiny_models(seed=0).actor.eval()
    targets = [9, 4, 12, 7]
    alone = DecodeBatch(model, IDS, PROMPTS, targets, sample_generators(3, IDS))
    run(alone)
    a = DecodeBatch(model, IDS[:2], PROMPTS[:2], targets[:2], sample_generators(3, IDS[:2]))
    b = DecodeBatch(model, IDS[2:], PROMPTS[2:], targets[2:], sample_generators(3, IDS[2:]))
    for _ in range(2):
        a.step()
        b.step()
    b.absorb(a.extract())  # the tail migrates with its caches and samplers
    run(b)
    finished = {**a.finished, **b.finished}
    for sid, prompt in zip(IDS, PROMPTS, strict=True):
        tokens, logprobs = finished[sid]
        assert len(tokens) == targets[IDS.index(sid)]
        assert torch.allclose(torch.tensor(logprobs), torch.tensor(full_forward_logprobs(model, prompt, tokens)),
                              atol=1e-4)
        # The sample's own sampler makes it draw the same tokens wherever it was decoded.
        assert tokens == alone.finished[sid][0]


def test_a_sample_stops_at_its_first_end_token() -> None:
    model = build_tiny_models(seed=0).actor.eval()
    probe = DecodeBatch(model, [0], [PROMPTS[1]], [12], sample_generators(1, [0]))
    run(probe)
    tokens = probe.finished[0][0]
    end = tokens[3]
    stopped = DecodeBatch(model, [0], [PROMPTS[1]], [12], sample_generators(1, [0]), eos_ids=frozenset({end}))
    run(stopped)
    got = stopped.finished[0][0]
    assert got == tokens[: tokens.index(end) + 1]
