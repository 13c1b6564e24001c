"""Test factories: the example events of every contract live in ``streams.samples``."""

from streams.samples import FIXED_TIME, inference_request, samples

__all__ = ["FIXED_TIME", "inference_request", "samples"]
