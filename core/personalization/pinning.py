"""Version pinning: an adapter is served only on the base weights it was trained on.

The trainer publishes new base versions (``v1``, ``v2``, ...) that workers hot-load beneath
every user's adapter. A LoRA delta or a mixture of experts trained against base ``v1`` is not
the same function on ``v2``: served there it would be an untested model. So every adapter
records the base version it was trained on, and a worker serves it only while that version is
the one loaded; otherwise the request is served by the base alone (and the response says so:
its ``adapter_version`` is empty, its ``model_version`` names the base). The personaliser
re-bases adapters when a new base appears (retrained from the user's signals within a budget);
users it does not reach fall back to the base until their next update.

Adapters written before versions were recorded carry no pin; they were trained on the
original weights and count as pinned to ``base``.
"""

from __future__ import annotations

ORIGINAL = "base"
"""The version name of the catalogue's original weights (what workers serve before any step)."""


def servable(adapter_base_version: str | None, serving_version: str) -> bool:
    """May an adapter trained on ``adapter_base_version`` serve on ``serving_version``?"""
    return (adapter_base_version or ORIGINAL) == serving_version
