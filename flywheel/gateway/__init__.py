"""The OpenAI-compatible HTTP gateway and the live dashboard."""
