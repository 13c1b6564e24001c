"""Preemption in the torch engine and the serving loop: a request taken out of the batch to free KV
memory resumes, by recompute or by swap, with exactly the tokens it would have produced anyway."""

from __future__ import annotations

import dataclasses

import pytest

from core.scheduling.kv import KvBudget
from core.scheduling.policies import SchedulerConfig
from workers.engines.base import EngineRequest, SamplingParams
from workers.engines.torch_engine import TorchEngine
from workers.serving import FinalEvent, ServeRequest, ServingConfig, ServingLoop

GREEDY = SamplingParams(max_tokens=24, ignore_eos=True)


def _run(engine: TorchEngine, rid: str, prompt: str, preempt_at: dict[int, bool] | None = None) -> list[int]:
    """Generate for one request (beside a neighbour); at step i, preempt it (swap or recompute)."""
    engine.submit(EngineRequest(rid, tuple(engine.encode_prompt(prompt, chat=False)), GREEDY))
    engine.submit(EngineRequest(f"{rid}-n", tuple(engine.encode_prompt("neighbour", chat=False)), GREEDY))
    tokens: list[int] = []
    for i in range(GREEDY.max_tokens):
        if preempt_at and i in preempt_at:
            engine.preempt(rid, swap=preempt_at[i])
            engine.execute([f"{rid}-n"])  # the others go on without it
        out = engine.execute([rid, f"{rid}-n"])
        tokens.extend(out[rid].token_ids)
        if out[rid].finished:
            break
    engine.release(rid)
    engine.release(f"{rid}-n")
    return tokens


@pytest.mark.parametrize("swap", [False, True])
def test_a_preempted_sequence_resumes_with_the_same_greedy_tokens(engine: TorchEngine, swap: bool) -> None:
    plain = _run(engine, "plain", "The quick brown fox")
    preempted = _run(engine, "pre", "The quick brown fox", {5: swap, 11: swap})
    assert preempted == plain and len(plain) == GREEDY.max_tokens
    assert engine.active == ()


def test_a_preempted_sequence_is_not_a_running_row(engine: TorchEngine) -> None:
    engine.submit(EngineRequest("new", (5, 6, 7), GREEDY))
    engine.submit(EngineRequest("other", (8, 9), GREEDY))
    engine.preempt("new")  # not resident yet: nothing to do
    engine.execute(["new", "other"])
    engine.preempt("new")
    assert set(engine.execute(["other"])) == {"other"}  # the preempted row need not be in the batch
    with pytest.raises(ValueError, match="running sequences must be in every batch"):
        engine.execute(["new"])  # but a running one still must
    assert len(engine.execute(["new", "other"])["new"].token_ids) == 1  # resumed by recompute
    engine.release("new")
    engine.release("other")


def test_the_serving_loop_preempts_under_a_tiny_kv_budget_and_answers_everyone_identically(
        engine: TorchEngine) -> None:
    prompts = {f"r{i}": f"prompt {i} " * (i + 1) for i in range(4)}

    def serve(kv: KvBudget, preemption: str) -> tuple[dict[str, FinalEvent], int]:
        cfg = SchedulerConfig(max_batch=4, kv=kv, preemption=preemption)  # type: ignore[arg-type]
        loop = ServingLoop(engine, config=ServingConfig(policy="fcfs_continuous", scheduler=cfg))
        for rid, text in prompts.items():
            loop.admit(ServeRequest(rid, text, dataclasses.replace(GREEDY, max_tokens=30), prompt_ids=tuple(
                engine.encode_prompt(text, chat=False))))
        finals: dict[str, FinalEvent] = {}
        while loop.has_work():
            finals.update({e.request_id: e for e in loop.step() if isinstance(e, FinalEvent)})
        return finals, loop.scheduler.preemptions

    free, n_free = serve(KvBudget(), "recompute")
    assert n_free == 0
    for preemption, swap_blocks in (("recompute", 0), ("swap", 64)):
        tight, n = serve(KvBudget(block_tokens=8, total_blocks=20, swap_blocks=swap_blocks), preemption)
        assert n > 0, preemption
        assert {r: f.text for r, f in tight.items()} == {r: f.text for r, f in free.items()}
        assert sum(f.preemptions for f in tight.values()) == n
    assert engine.active == ()
