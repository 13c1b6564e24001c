"""The RLHF trainer: PPO over served rollouts, stage-fused execution, versioned checkpoints.

- ``models``: actor / reference / critic / reward builds (tiny Llama for tests, SmolLM2 + LoRA).
- ``batch``: rollouts -> padded batches -> scored experience (GAE, KL penalty).
- ``trainer``: ``Trainer`` with ``add_rollout``/``add_reward``/``score_expired``/``ready``/``step``.
- ``checkpoint``: the shared checkpoint format, stored content-addressed.
- ``distributed``: torch.distributed collectives (gloo on CPU, NCCL on GPU; no-ops for one process).
- ``generation``: KV-cached sampling and migratable decode batches (inter-stage fusion).
- ``pipeline``: executes a fused actor+critic pipeline schedule over torch.distributed p2p.
- ``fusion``: worker processes running one PPO iteration fused or unfused (the benchmark).

The Kafka consumer lives elsewhere and only calls ``Trainer``.
"""
