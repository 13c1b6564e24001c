"""The paged KV ledger: blocks held, growth, the watermark, swapping."""

import math

import pytest

from core.scheduling.kv import BlockLedger, KvBudget


def test_blocks_round_up_and_growth_stops_at_the_budget() -> None:
    ledger = BlockLedger(KvBudget(block_tokens=16, total_blocks=4))
    assert ledger.blocks_for(1) == 1 and ledger.blocks_for(16) == 1 and ledger.blocks_for(17) == 2
    assert ledger.grow("a", 30) and ledger.held("a") == 2
    assert ledger.grow("a", 32) and ledger.held("a") == 2  # still fits in two blocks
    assert ledger.grow("b", 20) and ledger.free == 0
    assert not ledger.grow("a", 33)  # a third block is not free: nothing changes
    assert ledger.held("a") == 2 and ledger.used == 4
    assert ledger.release("b") == 2 and ledger.free == 2
    assert ledger.peak_used == 4


def test_the_watermark_is_kept_free_for_admissions_only() -> None:
    ledger = BlockLedger(KvBudget(block_tokens=10, total_blocks=10, watermark_blocks=2))
    assert ledger.can_admit(80) and not ledger.can_admit(81)
    assert ledger.grow("a", 100)  # a running request may use the watermark


def test_swapping_moves_blocks_between_device_and_host() -> None:
    ledger = BlockLedger(KvBudget(block_tokens=10, total_blocks=4, swap_blocks=3))
    ledger.grow("a", 30)
    assert ledger.can_swap_out("a")
    assert ledger.swap_out("a") == 3 and ledger.used == 0 and ledger.is_swapped("a")
    ledger.grow("b", 20)
    assert not ledger.swap_in("a")  # 3 blocks needed, 2 free
    ledger.release("b")
    assert ledger.swap_in("a") and ledger.held("a") == 3 and ledger.swap_used == 0
    ledger.grow("c", 10)
    with pytest.raises(ValueError, match="no host space"):
        ledger.swap_out("a") if ledger.swap_out("c") else None


def test_unlimited_budget_and_sizing_from_memory() -> None:
    assert BlockLedger().free == math.inf and BlockLedger().can_admit(10**9)
    budget = KvBudget.from_memory(64 * 2**20, bytes_per_token=46_080, block_tokens=16, swap_bytes=32 * 2**20)
    assert budget.total_blocks == 64 * 2**20 // (46_080 * 16) and budget.swap_blocks == budget.total_blocks // 2
    with pytest.raises(ValueError, match="watermark_blocks=5 must be < total_blocks=5"):
        KvBudget(total_blocks=5, watermark_blocks=5)
