"""A paged KV-cache budget, as vLLM keeps it: blocks of ``block_tokens`` tokens per request.

The ledger is accounting only (no tensors): a running request holds ``ceil(context /
block_tokens)`` device blocks; a request swapped out holds the same number of host blocks
instead. Policies ask it whether a request fits before admitting it, grow a request's holding by
one block when its context crosses a block boundary, and preempt someone when a running request
cannot grow. ``total_blocks == 0`` means no limit (the ledger still counts).

Invariants: ``used <= total`` (when limited) and ``swap_used <= swap_blocks``; a request holds
device blocks or host blocks, never both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class KvBudget:
    block_tokens: int = 16
    """Tokens per block (vLLM's default block size)."""
    total_blocks: int = 0
    """Device blocks of the worker's KV budget; 0 = unlimited."""
    swap_blocks: int = 0
    """Host blocks for swapped-out requests; 0 = preemption always recomputes."""
    watermark_blocks: int = 0
    """Blocks kept free when admitting new requests, so running ones can grow (vLLM's watermark)."""

    def __post_init__(self) -> None:
        if self.block_tokens < 1:
            raise ValueError(f"block_tokens={self.block_tokens} must be >= 1")
        if self.total_blocks < 0 or self.swap_blocks < 0 or self.watermark_blocks < 0:
            raise ValueError(f"total_blocks={self.total_blocks}, swap_blocks={self.swap_blocks} and "
                             f"watermark_blocks={self.watermark_blocks} must be >= 0")
        if self.total_blocks and self.watermark_blocks >= self.total_blocks:
            raise ValueError(f"watermark_blocks={self.watermark_blocks} must be < total_blocks={self.total_blocks}")

    @property
    def limited(self) -> bool:
        return self.total_blocks > 0

    @classmethod
    def from_memory(cls, budget_bytes: float, bytes_per_token: float, block_tokens: int = 16,
                    swap_bytes: float = 0.0, watermark: float = 0.01) -> KvBudget:
        """Blocks that fit a memory budget for a model with ``bytes_per_token`` of KV per token."""
        if budget_bytes <= 0 or bytes_per_token <= 0:
            raise ValueError(f"budget_bytes={budget_bytes} and bytes_per_token={bytes_per_token} must be > 0")
        block_bytes = bytes_per_token * block_tokens
        total = max(int(budget_bytes // block_bytes), 2)
        return cls(block_tokens=block_tokens, total_blocks=total, swap_blocks=int(swap_bytes // block_bytes),
                   watermark_blocks=min(max(int(total * watermark), 0), total - 1))


class BlockLedger:
    def __init__(self, budget: KvBudget | None = None) -> None:
        self.budget = budget or KvBudget()
        self._device: dict[str, int] = {}
        self._host: dict[str, int] = {}
        self.used = 0
        self.swap_used = 0
        self.peak_used = 0

    def blocks_for(self, tokens: float) -> int:
        return max(math.ceil(tokens / self.budget.block_tokens), 1) if tokens > 0 else 0

    @property
    def free(self) -> float:
        """Device blocks not held (``inf`` when unlimited)."""
        return self.budget.total_blocks - self.used if self.budget.limited else math.inf

    def held(self, request_id: str) -> int:
        return self._device.get(request_id, 0)

    def is_swapped(self, request_id: str) -> bool:
        return request_id in self._host

    # --- admission and growth ---------------------------------------------------------------------
    def can_admit(self, tokens: float) -> bool:
        """Whether a new request of ``tokens`` context fits and leaves the watermark free."""
        return self.blocks_for(tokens) <= self.free - self.budget.watermark_blocks

    def grow(self, request_id: str, tokens: float) -> bool:
        """Hold enough blocks for ``tokens`` of context; False (nothing changed) if they are not free."""
        need = self.blocks_for(tokens) - self._device.get(request_id, 0)
        if need <= 0:
            return True
        if need > self.free:
            return False
        self._device[request_id] = self._device.get(request_id, 0) + need
        self.used += need
        self.peak_used = max(self.peak_used, self.used)
        return True

    def release(self, request_id: str) -> int:
        """Drop every block the request holds (device and host); returns the device blocks freed."""
        n = self._device.pop(request_id, 0)
        self.used -= n
        self.swap_used -= self._host.pop(request_id, 0)
        return n

    # --- swapping ---------------------------------------------------------------------------------
    def can_swap_out(self, request_id: str) -> bool:
        return self._device.get(request_id, 0) <= self.budget.swap_blocks - self.swap_used

    def swap_out(self, request_id: str) -> int:
        """Move a request's blocks to host memory; returns how many moved."""
        n = self._device.pop(request_id, 0)
        if n > self.budget.swap_blocks - self.swap_used:
            self._device[request_id] = n
            raise ValueError(f"no host space to swap out {request_id!r} ({n} blocks)")
        self.used -= n
        self._host[request_id] = n
        self.swap_used += n
        return n

    def swap_in(self, request_id: str) -> bool:
        """Bring a swapped request's blocks back; False (nothing changed) if they are not free."""
        n = self._host.get(request_id, 0)
        if n > self.free:
            return False
        del self._host[request_id]
        self.swap_used -= n
        self._device[request_id] = n
        self.used += n
        self.peak_used = max(self.peak_used, self.used)
        return True
