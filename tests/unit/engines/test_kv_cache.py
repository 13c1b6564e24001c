import torch

from workers.engines.kv_cache import RowKVCache, build_mask


def test_decode_mask_sees_each_rows_own_tokens_and_the_new_one() -> None:
    mask, pos = build_mask([3, 1], width=3, q=1)
    assert mask.shape == (2, 1, 1, 4)
    assert mask[0, 0, 0].tolist() == [True, True, True, True]
    assert mask[1, 0, 0].tolist() == [False, False, True, True]
    assert pos.tolist() == [[3], [1]]


def test_prefill_mask_is_causal_per_row_and_padding_attends_only_to_itself() -> None:
    mask, pos = build_mask([0, -2], width=0, q=3)  # row 1 has 1 token left-padded by 2
    assert mask[0, 0].tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    assert mask[1, 0].tolist() == [[True, False, False], [False, True, False], [False, False, True]]
    assert pos.tolist() == [[0, 1, 2], [0, 0, 0]]
    sliding, _ = build_mask([0], width=0, q=4, sliding_window=2)
    assert sliding[0, 0, 3].tolist() == [False, False, True, True]


def _cache(**kw: int) -> RowKVCache:
    return RowKVCache(num_layers=2, kv_heads=1, head_dim=2, dtype=torch.float32, device="cpu", **kw)


def _prefilled(lengths: list[int], base: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    p = max(lengths)
    k = torch.zeros(len(lengths), 1, p, 2)
    for j, n in enumerate(lengths):
        k[j, 0, p - n :, 0] = base + j * 10 + torch.arange(n, dtype=torch.float32)
    return [k.clone(), k.clone()], [k.clone(), k.clone()]


def _row_tokens(c: RowKVCache, row: int) -> list[float]:
    n = c.row_len[row]
    return c.k[0][row, 0, c.end - n : c.end, 0].tolist()


def test_rows_join_leave_and_survive_relayouts() -> None:
    c = _cache(rows_cap=1, margin=2, headroom=1)
    c.append_rows(*_prefilled([3, 1], base=100.0), lengths=[3, 1])  # grows rows and the left margin
    assert c.rows == 2 and c.width == 3
    assert _row_tokens(c, 0) == [100.0, 101.0, 102.0] and _row_tokens(c, 1) == [110.0]
    for step in range(3):  # forces right-edge relayouts with headroom 1
        c.reserve(1)
        new = torch.full((2, 1, 1, 2), 500.0 + step)
        keys, _ = c.write(0, new, new)
        c.write(1, new, new)
        assert keys.shape[2] == c.width + 1
        c.advance(1)
    assert _row_tokens(c, 1) == [110.0, 500.0, 501.0, 502.0]
    moved = c.remove_row(0)  # the last row moves into slot 0
    assert moved == 1 and c.rows == 1
    assert _row_tokens(c, 0) == [110.0, 500.0, 501.0, 502.0]
    assert c.width == 4
