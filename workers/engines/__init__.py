"""Inference engines behind one interface: torch/transformers (CPU or CUDA) and vLLM (GPU)."""
