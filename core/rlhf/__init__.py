"""RLHF core: PPO maths and the two RLHFuse stage fusions, as pure functions and small classes.

- ``ppo``: masked statistics, whitening, KL-penalised per-token rewards, GAE, the clipped policy
  and value losses (free functions on tensors; no model, optimiser or collective inside).
- ``interstage``: generation/inference fusion. Per-sample subtasks; when unfinished samples fall
  to ``rt`` of the batch, the long tail migrates to fewer generation instances and the freed
  instances start reference/reward/critic inference on finished samples at once.
- ``pipeline``: the fused actor+critic training pipeline: schedules as per-node ordered task
  lists, a replay simulator, a validator (dependency order, deadlock freedom, memory bound), the
  1F1B / GPipe baselines and a lower bound.
- ``anneal``: the simulated-annealing search (FlexFusion) over those task lists.

Nothing here imports Kafka, faust, a database or ``torch.distributed``: the trainer in
``workers/trainer`` does collectives and passes reduced statistics in.
"""
