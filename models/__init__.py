"""Model code shared by workers, agents and benchmarks: loading the catalogued models from their
PyPI wheels (``models.loader``) and training per-user LoRA adapters (``models.adapters``).

torch, transformers and peft only: no Kafka, faust or database imports. It sits beside ``core``
(it imports ``core`` and nothing else of the project), below agents and workers.
"""
