"""The one settings object: every process reads its environment here, once, at its entry point.

All variables carry the ``FLYWHEEL_`` prefix (``FLYWHEEL_KAFKA_BOOTSTRAP``,
``FLYWHEEL_DATABASE_URL``, ...). Secrets are ``SecretStr`` so they never appear in logs or
reprs. Deeper code receives small frozen configs derived from this object, never the object
itself.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLYWHEEL_", extra="ignore")

    # --- where local state lives (embedded Kafka and Postgres data, artifacts, jar cache)
    home: Path = Field(default=Path(".flywheel"), description="local state directory")

    # --- Kafka
    kafka_bootstrap: str | None = Field(
        default=None, description="bootstrap servers of an external cluster; unset = the local broker"
    )
    kafka_broker: Literal["apache", "tansu", "auto"] = "auto"
    kafka_port: int = 19092
    kafka_controller_port: int = 19093
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = None
    kafka_ssl_certfile: Path | None = None
    kafka_ssl_keyfile: Path | None = None
    kafka_ssl_check_hostname: bool = True
    topic_prefix: str = Field(default="", description="prefix for every topic name (replays, tests)")
    topic_partitions: int = 3
    replication_factor: int = 1

    # --- Schema registry: unset = the embedded registry kept in Postgres
    schema_registry_url: str | None = None
    schema_registry_username: str | None = None
    schema_registry_password: SecretStr | None = None

    # --- Postgres: unset = the embedded server under ``home``
    database_url: SecretStr | None = None
    postgres_port: int = 15432

    # --- Observability
    otlp_endpoint: str | None = Field(default=None, description="OTLP/HTTP traces endpoint")
    trace_sample_ratio: float = Field(default=1.0, ge=0.0, le=1.0,
                                      description="share of new traces sampled (at their root)")
    metrics_port: int = Field(default=0, description="Prometheus port; 0 = pick a free one")
    metrics_host: str = Field(default="127.0.0.1", description="interface of the metrics endpoint")
    log_level: str = "INFO"

    # --- Gateway
    gateway_host: str = "127.0.0.1"
    gateway_port: int = 8080
    max_prompt_chars: int = 32_000
    max_tokens_limit: int = 1024
    gateway_api_keys: SecretStr | None = Field(
        default=None, description='JSON map of API key -> user id, e.g. {"sk-alice": "alice"}; unset = open')
    gateway_max_inflight: int = Field(default=256, description="outstanding requests before 429")
    gateway_max_lag: int = Field(default=500, description="unprocessed records (router + workers) before 429")
    gateway_request_timeout_s: float = 300.0
    gateway_max_body_bytes: int = Field(default=1_000_000, description="larger HTTP bodies get 413")

    # --- Router
    router_algorithm: Literal["local_quality", "eagle"] = Field(
        default="local_quality", description="the live ranking rule (docs/ROUTING.md): local quality with bounded "
                                             "exploration, or Eagle's global + local ELO")
    router_instance: str = Field(default="", description="this router process's name within its deployment (its "
                                                         "transactional id); distinct per router process on one "
                                                         "host; empty: the host name (one router per host or "
                                                         "container)")
    router_threads: int = Field(default=1, ge=1, description="torch threads of the router's prompt embedding; one "
                                                            "is fastest beside other processes (a contended "
                                                            "second thread made one embedding 12x slower)")
    router_learn: bool = Field(default=True, description="apply feedback to the ratings (false: ratings stay "
                                                          "at their initial values, as in the loop benchmark's "
                                                          "frozen arm)")

    # --- Trainer and personaliser
    rollout_sample: float = Field(default=0.25, ge=0, le=1, description="share of responses sent as Rollouts")
    trainer_model: str = "smollm2-135m"
    trainer_batch_size: int = Field(default=8, ge=1, description="rewarded rollouts per PPO step")
    trainer_reward_timeout_s: float = Field(
        default=300.0, ge=0, description="a rollout with no Reward by then is dropped and counted")
    trainer_ranks: int = Field(default=2, ge=1, description="gloo rank processes of the fused PPO runtime")
    trainer_threads_per_rank: int = Field(default=1, ge=1, description="torch threads of each trainer rank")
    trainer_microbatches: int = Field(default=2, ge=1, description="pipeline micro-batches per PPO mini-batch")
    trainer_generate: int = Field(
        default=4, ge=0, description="live prompts the trainer answers per iteration (rewarded later)")
    trainer_max_new_tokens: int = Field(default=48, ge=1, description="longest trainer-generated response")
    trainer_fused: bool = Field(default=True, description="RLHFuse fusion on (False: the unfused baseline)")
    trainer_rt: float = Field(default=0.2, ge=0, le=1, description="tail-migration threshold (share unfinished)")
    trainer_actor_lr: float = Field(default=5e-5, gt=0, description="actor (LoRA) learning rate")
    trainer_critic_lr: float = Field(default=1e-4, gt=0, description="critic learning rate")
    trainer_max_staleness: int = Field(
        default=4, ge=0, description="train on rollouts of the newest N+1 published versions only")
    trainer_adapter_rollouts: Literal["exclude", "correct"] = Field(
        default="exclude", description="adapter-served rollouts: excluded, or importance-corrected")
    trainer_sampled_only: bool = Field(
        default=False, description="train only on rollouts sampled at temperature 1 without top-p")
    trainer_min_interval_s: float = Field(
        default=0.0, ge=0, description="seconds between the starts of two PPO iterations (CPU duty cycle)")
    personalizer_min_events: int = Field(default=8, ge=1, description="feedback events before a user's first update")
    personalizer_model: str = Field(default="smollm2-135m", description="base model the per-user adapters train on")
    personalizer_update_budget_s: float = Field(default=20.0, gt=0, description="wall-time bound of one adapter update")
    personalizer_join_wait_s: float = Field(
        default=10.0, ge=0, description="how long feedback waits for the response it is about to be seen")
    personalizer_base_batch: float = Field(
        default=12.0, gt=0, description="ASLS: pending signal weight that triggers an update at neutral agreement")
    personalizer_min_batch: float = Field(default=1.5, gt=0, description="ASLS: never update on less pending weight")
    personalizer_max_updates_per_hour: float = Field(default=30.0, gt=0, description="ASLS: per-user update cap")
    personalizer_agree_octaves: float = Field(
        default=3.0, ge=0, description="ASLS: how much agreement with the adapter postpones updates (0: none)")
    personalizer_adapter_kind: Literal["lora", "comigs"] = Field(
        default="comigs",
        description="per-user adapter: a LoRA, or a CoMiGS mixture of generalist and specialist experts")
    personalizer_round_users: int = Field(
        default=2, ge=1, description="CoMiGS: distinct users whose updates make one generalist-averaging round")
    personalizer_rebase_budget_s: float = Field(
        default=120.0, ge=0, description="seconds spent re-basing users' adapters onto a new base version")
    personalizer_rebase_steps: int = Field(default=8, ge=0, description="training steps of one re-base")

    # --- Rewards
    reward_model_min_accuracy: float = Field(
        default=0.65, ge=0, le=1,
        description="the reward model scores unrated rollouts only while its balanced held-out accuracy, "
                    "less two standard errors, on the answers of the model whose rollouts it scores, is >= this")
    reward_model_min_heldout: int = Field(
        default=30, ge=1, description="held-out feedback examples before the reward model's accuracy counts")
    reward_model_timeout_s: float = Field(
        default=120.0, ge=0,
        description="a rollout without feedback for this long is scored by the reward model "
                    "(keep below FLYWHEEL_TRAINER_REWARD_TIMEOUT_S, when the trainer lets it go)")
    reward_join_wait_s: float = Field(
        default=10.0, ge=0, description="how long a feedback example waits for the texts it is about")
    # --- Serving
    worker_policy: Literal["slo_goodput", "slo_odbs", "fcfs_continuous", "fcfs_static", "sjf"] = Field(
        default="slo_goodput", description="the workers' scheduling policy (docs/SCHEDULING.md)")
    worker_max_batch: int = Field(default=32, ge=1, description="rows per engine iteration")
    worker_dtype: Literal["float32", "bfloat16", "int8-weight"] = Field(
        default="float32", description="torch engine weight precision on CPUs (docs/SCHEDULING.md, engine benchmark)")
    worker_kv_budget_mb: float = Field(default=384.0, ge=0, description="paged KV budget per worker; 0 = unlimited")
    worker_kv_block_tokens: int = Field(default=16, ge=1, description="tokens per KV block")
    worker_preemption: Literal["recompute", "swap"] = Field(
        default="swap", description="how a preempted request gives up its KV")
    worker_swap_budget_mb: float = Field(default=256.0, ge=0, description="host memory for swapped-out KV")
    worker_shorten_min_tokens: int = Field(
        default=16, ge=0, description="admission control shortens a hopeless request to at least this many "
                                      "tokens instead of rejecting it; 0 = never shorten")
    worker_reroute: bool = Field(default=True, description="hand hopeless requests to a cheaper live model")
    worker_aging_s: float = Field(default=60.0, gt=0, description="waiting this long promotes a request one SLO class")
    worker_tensor_parallel: int = Field(default=1, ge=1, description="vLLM tensor-parallel size (set by the deployer)")
    worker_pipeline_parallel: int = Field(default=1, ge=1, description="vLLM pipeline stages (set by the deployer)")
    worker_pipeline_layers: str = Field(
        default="", description="layers per pipeline stage, e.g. '20,10' (HELR's split; set by the deployer)")
    background_nice: int = Field(default=10, ge=0, le=19, description="nice value of trainer and personaliser")
    background_max_wait_s: float = Field(
        default=20.0, ge=0, description="longest a learning step waits for busy workers to go quiet")

    @property
    def artifacts_dir(self) -> Path:
        return self.home / "artifacts"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read from the environment once."""
    return Settings()
