"""The Prometheus metrics of Flywheel's processes, defined once (Grafana's dashboard uses these names).

Transport metrics (records processed, dead letters) live in ``streams``; these are the service's.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)

REQUESTS_ROUTED = Counter("flywheel_router_decisions_total", "Routing decisions", ["model", "reason"])
FEEDBACK_APPLIED = Counter("flywheel_router_feedback_applied_total", "Feedback events applied to ratings")
ROUTER_RATING = Gauge("flywheel_router_global_rating", "Global ELO rating", ["model"])
ROUTING_SECONDS = Histogram("flywheel_router_decision_seconds", "Time to route one request (embedding included)",
                            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1))

RESPONSES = Counter("flywheel_worker_responses_total", "Final responses produced", ["model", "finish_reason"])
TOKENS = Counter("flywheel_worker_tokens_total", "Tokens generated", ["model"])
REQUEST_LATENCY = Histogram("flywheel_worker_request_seconds", "Request latency, arrival to final token", ["model"],
                            buckets=LATENCY_BUCKETS)
QUEUE_LENGTH = Gauge("flywheel_worker_queue_length", "Requests waiting in the scheduler", ["model", "worker"])
RUNNING = Gauge("flywheel_worker_running", "Sequences in the running batch", ["model", "worker"])
SLO = Counter("flywheel_worker_slo_total", "Requests by SLO outcome", ["model", "met"])

ADAPTERS_PUBLISHED = Counter("flywheel_adapters_published_total", "Per-user adapters published")
ADAPTER_UPDATE_SECONDS = Histogram("flywheel_adapter_update_seconds", "Time to train one adapter update",
                                   buckets=LATENCY_BUCKETS)
TRAINER_STEPS = Counter("flywheel_trainer_steps_total", "PPO steps completed")
TRAINER_REWARD = Gauge("flywheel_trainer_mean_reward", "Mean reward of the last PPO batch")

REWARDS_PUBLISHED = Counter("flywheel_rewards_total", "Reward events published", ["source"])
REWARD_EXAMPLES = Counter("flywheel_reward_model_examples_total", "Feedback examples folded into the reward model",
                          ["status"])
REWARD_MODEL_ACCURACY = Gauge("flywheel_reward_model_accuracy",
                              "Balanced held-out accuracy of the reward model, overall (all) and on each model's "
                              "answers (NaN: too few held out)", ["model"])
REWARD_MODEL_USABLE = Gauge("flywheel_reward_model_usable", "1 while the reward model may score a model's rollouts",
                            ["model"])

GATEWAY_REQUESTS = Counter("flywheel_gateway_requests_total", "Gateway HTTP requests by endpoint and status",
                           ["endpoint", "status"])
GATEWAY_INFLIGHT = Gauge("flywheel_gateway_inflight", "Requests the gateway is waiting on")
