"""CoMiGS: per-user mixtures of LoRA experts (generalists shared, specialists local).

- ``lora_moe``: the mixture layer over a frozen Llama MLP, its balancing loss, averaging helpers.
- ``tail``: run only the adapted last layers from cached hidden states of a frozen base.
- ``comigs``: clients with bi-level alternating updates and generalist aggregation; the local and
  FedAvg baselines are configurations of the same client.

Pure: torch and transformers modules only, no I/O.
"""
