"""Rollouts need each generated token's log-probability: the engine reports it under the model
(temperature 1), and the serving loop hands the whole sequence to the final event."""

import torch

from tests.unit.engines.conftest import ByteTokenizer, tiny_llama
from workers.engines.base import SamplingParams
from workers.engines.torch_engine import TorchEngine
from workers.serving import FinalEvent, ServeRequest, ServingLoop


def test_final_carries_token_ids_and_logprobs_that_match_a_reference_forward():
    model = tiny_llama()
    engine = TorchEngine(model, ByteTokenizer(), "tiny", device="cpu")
    loop = ServingLoop(engine)
    loop.admit(ServeRequest("r1", "hello", SamplingParams(max_tokens=6, temperature=0.0)))
    finals = []
    while loop.has_work():
        finals += [e for e in loop.step() if isinstance(e, FinalEvent)]
    (final,) = finals
    assert len(final.output_token_ids) == final.output_tokens == len(final.output_logprobs)
    ids = list(final.prompt_token_ids) + list(final.output_token_ids)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    reference = torch.log_softmax(logits, dim=-1)
    start = len(final.prompt_token_ids)
    for i, (token, logp) in enumerate(zip(final.output_token_ids, final.output_logprobs, strict=True)):
        assert abs(reference[start - 1 + i, token].item() - logp) < 1e-4
