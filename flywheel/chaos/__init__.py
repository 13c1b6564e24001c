"""Reliability tooling: fault injection, fuzzing, load and soak (``flywheel chaos``)."""
