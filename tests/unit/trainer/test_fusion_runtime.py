"""The fused PPO runtime on 2 real gloo ranks (tiny models): every schedule makes the same update.

Fused (annealed actor+critic schedule), unfused (sequential 1F1B) and data-parallel training of
the same rewarded rollouts from the same weights must agree with each other and with the
single-process ``Trainer`` (plain SGD, so weights compare gradients; the gradient-norm clip is
set low enough to be active, which checks that pipeline ranks clip by the *global* norm).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.rlhf.anneal import AnnealConfig
from core.rlhf.buffer import OffPolicyConfig
from core.rlhf.pipeline import sequential_schedule
from tests.unit.trainer.factories import make_rollouts
from workers.trainer.checkpoint import CheckpointMeta, read_trainable_state, trainable_state
from workers.trainer.fusion import FusionCluster, GenerateItem, GivenSample, IterationPlan
from workers.trainer.fusion_plan import StageTimes, build_problem, plan_schedules
from workers.trainer.models import ModelSpec, causal_lm_logits
from workers.trainer.trainer import Trainer, TrainerConfig

TINY = {"vocab_size": 256, "hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1,
        "intermediate_size": 64}
SPEC = ModelSpec(kind="tiny", tiny=TINY, seed=0)
# The live structure in miniature: a LoRA on the actor's last layer (its first pipeline stage is
# a frozen trunk with no backward work) and a critic training only its last layer and head.
LORA = ModelSpec(kind="tiny", tiny={**TINY, "num_layers": 4}, seed=0, tiny_lora=True, lora_layers=(3,),
                 lora_rank=4, critic_layers=4, critic_trainable_layers=1)
CASES = {"full": (SPEC, None, None), "lora": (LORA, (2,), (2,))}
REWARDS = [1.0, -0.5, 0.25, -1.0]
LR, CLIP = 0.5, 0.05


def given_samples(spec: ModelSpec = SPEC) -> tuple[list[GivenSample], list]:
    rollouts = make_rollouts(spec.build(), 4, prompt_len=5, max_new=7)
    given = [GivenSample(i, r.prompt_token_ids, r.response_token_ids, r.response_logprobs, REWARDS[i])
             for i, r in enumerate(rollouts)]
    return given, rollouts


def schedules() -> tuple:
    problem = build_problem(2, StageTimes((1e-3, 1e-3), (2e-3, 2e-3), (1e-3, 5e-4), (2e-3, 1e-3)))
    plans = plan_schedules(problem, AnnealConfig(iterations=300, memory_iterations=50, restarts=1))
    assert plans["sim_fused"] <= plans["sim_unfused"]
    return sequential_schedule(problem), plans["fused"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_unfused_and_data_parallel_updates_agree_with_one_process(tmp_path: Path, case: str) -> None:
    torch.set_num_threads(1)
    spec, actor_cuts, critic_cuts = CASES[case]
    given, rollouts = given_samples(spec)
    sequential, fused = schedules()
    variants = {"unfused": (False, sequential), "fused": (True, fused), "data_parallel": (False, None)}
    states = {}
    with FusionCluster(spec, 2, actor_lr=LR, critic_lr=LR, max_grad_norm=CLIP, optimizer="sgd", pin=False,
                       start_method="fork", actor_cuts=actor_cuts, critic_cuts=critic_cuts) as cluster:
        initial = cluster.digests()
        for name, (is_fused, schedule) in variants.items():
            cluster.reset()
            plan = IterationPlan(given=tuple(given), fused=is_fused, n_minibatches=1, n_microbatches=2,
                                 schedule=schedule, inference_microbatch=2)
            report = cluster.run_iteration(plan)
            assert report.batch_size == 4 and report.metrics["response_tokens"] > 0
            after = cluster.digests()
            assert after[0] == after[1] != initial[0]  # trained, and the ranks re-synced
            _, path = cluster.export(tmp_path / name, CheckpointMeta("tiny-llama", "v1", 1))
            state = read_trainable_state(path)
            assert state is not None
            states[name] = state
    models = spec.build()
    trainer = Trainer(models, TrainerConfig(store_root=tmp_path / "single", batch_size=4, minibatch_size=4,
                                            max_grad_norm=CLIP, off_policy=OffPolicyConfig(max_staleness=None)))
    trainer.actor_opt = torch.optim.SGD(models.actor_parameters(), lr=LR)
    trainer.critic_opt = torch.optim.SGD(models.critic_parameters(), lr=LR)
    for r, reward in zip(rollouts, REWARDS, strict=True):
        trainer.add_rollout(r)
        trainer.add_reward(r.request_id, reward)
    trainer.step()
    single = trainable_state(models.actor, models.critic)
    fresh = spec.build()
    start = trainable_state(fresh.actor, fresh.critic)
    moved = max(float((single[k] - start[k]).abs().max()) for k in single)
    assert moved > 1e-3
    for name, state in states.items():
        for key, tensor in single.items():
            assert torch.allclose(state[key], tensor, atol=1e-5), (name, key)


@pytest.mark.parametrize("fused", [False, True])
def test_live_iteration_generates_new_samples_and_trains_on_given_ones(fused: bool) -> None:
    torch.set_num_threads(1)
    given, _ = given_samples()
    sequential, annealed = schedules()
    prompts = [(3, 4, 5), (9, 8, 7, 6, 5)]
    plan = IterationPlan(
        generate=tuple(GenerateItem(100 + i, p, 12) for i, p in enumerate(prompts)),
        given=tuple(given),
        fused=fused,
        rt=0.5,
        eos_ids=frozenset({2}),
        n_minibatches=1,
        n_microbatches=2,
        inference_microbatch=2,
        schedule=annealed if fused else sequential,
    )
    with FusionCluster(SPEC, 2, pin=False, start_method="fork") as cluster:
        before = cluster.digests()
        report = cluster.run_iteration(plan)
        assert cluster.digests()[0] != before[0]
    assert report.batch_size == len(given)  # trained on the given samples only
    assert set(report.generated) == {100, 101}
    reference = SPEC.build().reference
    assert reference is not None
    for sid, prompt in zip((100, 101), prompts, strict=True):
        tokens, behaviour, ref = report.generated[sid]
        assert 1 <= len(tokens) <= 12 and (len(tokens) == 12 or tokens[-1] == 2)
        ids = torch.tensor([list(prompt) + tokens])
        with torch.no_grad():
            logp = torch.log_softmax(causal_lm_logits(reference, ids)[0], dim=-1)
        expected = [float(logp[len(prompt) - 1 + t, tok]) for t, tok in enumerate(tokens)]
        assert ref == pytest.approx(expected, abs=1e-4)  # reference inference ran on the finished sample
        assert len(behaviour) == len(tokens)
    if not fused:  # the barrier: no sample is scored before the last one finished
        last_finish = max(t for t, kind, _, _ in report.events if kind == "finished")
        assert all(t >= last_finish for t, kind, _, _ in report.events if kind == "score")
