"""Valid example events of every contract: documentation by example, and the seeds that tests,
fuzzing and benchmarks start from."""

from __future__ import annotations

from typing import Any

from streams import events as ev

FIXED_TIME = 1_764_000_000_000


def _env(cid: str = "req-1", user: str = "user-1") -> dict[str, Any]:
    return ev.envelope(cid, "tenant-a", user, event_id=f"evt-{cid}", event_time_ms=FIXED_TIME)


def inference_request(request_id: str = "req-1", user: str = "user-1", **overrides: Any) -> dict[str, Any]:
    record = ev.inference_request(user_id=user, tenant_id="tenant-a", prompt="What is 2+3?",
                                  request_id=request_id, max_tokens=32, budget_usd=0.01,
                                  willingness_to_pay=1.0, slo_class="interactive",
                                  deadline_ms=FIXED_TIME + 5000)
    record.update(_env(request_id, user))
    record.update(overrides)
    return record


def samples() -> dict[str, dict[str, Any]]:
    req = inference_request()
    return {
        "InferenceRequest": req,
        "RoutingDecision": {
            **_env(), "request": req, "model": "smollm2-135m",
            "candidates": [{"model": "smollm2-135m", "score": 1010.0, "global_rating": 1005.0,
                            "local_rating": 1015.0, "expected_quality": 0.55, "expected_cost_usd": 1e-5,
                            "live": True, "within_budget": True}],
            "fallbacks": ["gemma3-270m"], "router_name": "eagle", "router_version": "1",
            "reason": "best within budget", "feedback_offset": 41, "exploratory": False},
        "ResponseChunk": {**_env(), "request_id": "req-1", "index": 0, "delta": "2 + 3", "model": "smollm2-135m"},
        "InferenceResponse": {
            **_env(), "request_id": "req-1", "model": "smollm2-135m", "model_version": "base",
            "adapter_version": None, "text": "2 + 3 = 5", "prompt_tokens": 12, "completion_tokens": 7,
            "queue_ms": 1.5, "first_token_ms": 40.0, "total_ms": 300.0, "finish_reason": "stop",
            "worker_id": "w1", "cost_usd": 1.3e-6, "error": None, "admission": None},
        "Feedback": ev.feedback(user_id="user-1", request_id="req-1", kind="pairwise", tenant_id="tenant-a",
                                pairwise={"request_id_a": "req-1", "model_a": "smollm2-135m",
                                          "request_id_b": "req-2", "model_b": "gemma3-270m", "winner": "a"})
        | {"event_id": "evt-fb", "event_time": FIXED_TIME},
        "Rollout": {**_env(), "request_id": "req-1", "model": "smollm2-135m", "model_version": "base",
                    "prompt": "What is 2+3?", "response": "5", "prompt_token_ids": [1, 2, 3],
                    "response_token_ids": [4, 5], "token_logprobs": [-0.5, -0.25], "source": "live",
                    "adapter_version": None, "temperature": 0.0, "top_p": 1.0},
        "Reward": {**_env(), "request_id": "req-1", "reward": 0.75, "source": "feedback", "feedback_id": "evt-fb"},
        "AdapterPublished": {**_env(), "adapter_hash": "ab" * 32, "base_model": "smollm2-135m", "version": 3,
                             "uri": "artifacts/adapters/abab", "rank": 4, "parent_hash": None,
                             "rollback": False, "metrics": {"loss": 0.5}, "base_version": "base"},
        "ModelPublished": {**_env(), "model": "smollm2-135m", "version": "v2", "checkpoint_hash": "cd" * 32,
                           "uri": "artifacts/checkpoints/cdcd", "step": 2, "parent_version": "v1",
                           "metrics": {"kl": 0.01}},
        "WorkerHeartbeat": {**_env(), "worker_id": "w1", "model": "smollm2-135m", "model_version": "base",
                            "healthy": True, "queue_length": 2, "running": 4, "tokens_per_s": 55.0,
                            "memory_rss_mb": 900.0, "loaded_adapters": ["ab" * 32], "policy": "slo_odbs",
                            "interval_ms": 2000, "device": "cpu",
                            "step_cost": {"decode_base_s": 0.03, "decode_per_row_s": 0.003, "decode_per_cell_s": 1e-6,
                                          "prefill_base_s": 0.02, "prefill_per_token_s": 1e-4, "overhead_s": 1e-4,
                                          "samples": 64},
                            "max_batch": 32, "backlog_s": 1.5, "mean_output_tokens": 40.0, "kv_blocks_total": 512,
                            "kv_blocks_used": 40, "preemptions": 1, "rejected": 0, "rerouted": 0, "shortened": 0},
        "DeadLetter": {**_env(), "stage": "router", "origin_topic": "flywheel.requests", "origin_partition": 0,
                       "origin_offset": 17, "origin_key": b"user-1", "origin_value": b"\x00garbage",
                       "origin_headers": [{"key": "traceparent", "value": b"00-abc"}],
                       "reason": "unknown magic byte", "error_type": "SerializationError", "attempts": 1},
    }
