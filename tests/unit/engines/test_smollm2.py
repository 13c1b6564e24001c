"""The real SmolLM2-135M from its PyPI wheel: batched serving gives the same greedy text as alone."""

from __future__ import annotations

import pytest
import torch

from workers.engines.base import SamplingParams
from workers.serving import FinalEvent, ServeRequest, ServingConfig, ServingLoop

pytestmark = pytest.mark.model

QUESTIONS = [
    "What is 12 times 7?",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether?",
    "Name three primary colours.",
]


def _serve(loop: ServingLoop, prompts: list[str], tag: str) -> dict[str, FinalEvent]:
    for i, p in enumerate(prompts):
        loop.admit(ServeRequest(f"{tag}{i}", p, SamplingParams(max_tokens=16)))
    finals: dict[str, FinalEvent] = {}
    while loop.has_work():
        finals.update({e.request_id: e for e in loop.step() if isinstance(e, FinalEvent)})
    return finals


def test_smollm2_batched_generation_matches_single() -> None:
    from workers.engines.torch_engine import TorchEngine

    torch.set_num_threads(1)
    engine = TorchEngine.from_catalog("smollm2-135m", device="cpu")
    loop = ServingLoop(engine, config=ServingConfig(policy="fcfs_continuous"))
    batched = _serve(loop, QUESTIONS, "b")
    alone = _serve(loop, QUESTIONS[1:2], "s")
    assert batched["b1"].text == alone["s0"].text
    assert all(f.text.strip() and 1 <= f.output_tokens <= 16 for f in batched.values())
