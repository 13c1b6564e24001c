"""Workers: inference (UELLM scheduling over torch or vLLM engines) and training processes."""
