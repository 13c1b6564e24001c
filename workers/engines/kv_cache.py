"""A KV cache for iteration-level batching in transformers: rows join and leave between steps.

Layout. Per layer one buffer ``[rows_cap, kv_heads, cols_cap, head_dim]``. Rows are
*right-aligned*: every row's tokens end at the shared column ``end``, and row i holds its
``row_len[i]`` tokens in columns ``[end - row_len[i], end)``. A decode step writes all rows' new
keys at column ``end`` and attends over the window ``[end - max(row_len), end]`` through an
explicit 4D mask, so

* a step never copies the cache (transformers' DynamicCache re-concatenates it every step);
* a joining row copies only its own prefilled keys in (at ``end - prompt_len``);
* a leaving row is replaced by the last row (one row copied), so active rows stay ``[0, rows)``
  and the forward runs on exactly the active rows;
* the window shrinks by itself when the longest row leaves (it is a view).

Columns left of a row's tokens hold zeros or stale finite values from departed rows; the mask
gives them exactly zero weight, so a row's result does not depend on its neighbours. The buffer
is re-laid out (one copy of the live window) only when the right edge is reached or a joining
prompt is longer than the space left of ``end``.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class _RowLayer(CacheLayerMixin):
    """One layer's view of a ``RowKVCache``; all geometry lives in the owner."""

    is_sliding = False

    def __init__(self, owner: RowKVCache, layer_idx: int) -> None:
        super().__init__()
        self.owner = owner
        self.layer_idx = layer_idx
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        return None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self.owner.write(self.layer_idx, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.width + query_length, 0

    def get_seq_length(self) -> int:
        return self.owner.width

    def get_max_length(self) -> int:
        return -1


class RowKVCache(Cache):
    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, *, dtype: torch.dtype,
                 device: torch.device | str, rows_cap: int = 8, margin: int = 256,
                 headroom: int = 128) -> None:
        super().__init__(layers=[_RowLayer(self, i) for i in range(num_layers)])
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.margin, self.headroom = margin, headroom
        self.rows = 0
        self.row_len: list[int] = []
        self.end = margin
        self._alloc(rows_cap, margin + headroom)

    # --- geometry -----------------------------------------------------------------------------
    def _alloc(self, rows_cap: int, cols_cap: int) -> None:
        shape = (rows_cap, self.kv_heads, cols_cap, self.head_dim)
        n = len(self.layers)
        self.k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(n)]
        self.v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(n)]

    @property
    def rows_cap(self) -> int:
        return self.k[0].shape[0]

    @property
    def cols_cap(self) -> int:
        return self.k[0].shape[2]

    @property
    def width(self) -> int:
        """Columns of the live window (the longest row)."""
        return max(self.row_len, default=0)

    def _relayout(self, rows_cap: int, new_end: int, extra_right: int) -> None:
        """Copy the live window into fresh buffers ending at ``new_end`` with room on the right."""
        w = self.width
        new_end = max(new_end, w)
        old_k, old_v, old_end = self.k, self.v, self.end
        self._alloc(rows_cap, new_end + max(extra_right, self.headroom))
        if self.rows and w:
            for dst, src in ((self.k, old_k), (self.v, old_v)):
                for layer_dst, layer_src in zip(dst, src, strict=True):
                    src_win = layer_src[: self.rows, :, old_end - w: old_end]
                    layer_dst[: self.rows, :, new_end - w: new_end] = src_win
        self.end = new_end

    def reserve(self, new_cols: int) -> None:
        """Make room for ``new_cols`` more columns on the right (call before a step)."""
        if self.end + new_cols > self.cols_cap:
            self._relayout(self.rows_cap, max(self.margin, self.width), new_cols + self.headroom)

    # --- the forward pass ---------------------------------------------------------------------
    def write(self, layer_idx: int, key: torch.Tensor,
              value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = key.shape[2]
        if key.shape[0] != self.rows:
            raise RuntimeError(f"cache has {self.rows} rows, forward has {key.shape[0]}")
        start = self.end - self.width
        self.k[layer_idx][: self.rows, :, self.end: self.end + q] = key
        self.v[layer_idx][: self.rows, :, self.end: self.end + q] = value
        return (self.k[layer_idx][: self.rows, :, start: self.end + q],
                self.v[layer_idx][: self.rows, :, start: self.end + q])

    def advance(self, q: int) -> None:
        """Commit a step of ``q`` tokens for every row (after the forward pass)."""
        self.end += q
        self.row_len = [n + q for n in self.row_len]

    # --- membership -------------------------------------------------------------------------
    def append_rows(self, keys: list[torch.Tensor], values: list[torch.Tensor], lengths: list[int]) -> None:
        """Add rows prefilled elsewhere: per layer ``[m, kv_heads, P, head_dim]`` whose row j holds
        its ``lengths[j]`` tokens right-aligned at column P."""
        m = len(lengths)
        need_rows = self.rows + m
        longest = max(lengths)
        if need_rows > self.rows_cap or longest > self.end:
            rows_cap = self.rows_cap
            while rows_cap < need_rows:
                rows_cap *= 2
            self._relayout(rows_cap, max(self.end - self._dead_left(), longest, self.margin), self.headroom)
        p = keys[0].shape[2]
        for j, n in enumerate(lengths):
            r = self.rows + j
            for layer in range(len(self.layers)):
                self.k[layer][r, :, self.end - n: self.end] = keys[layer][j, :, p - n: p]
                self.v[layer][r, :, self.end - n: self.end] = values[layer][j, :, p - n: p]
        self.rows = need_rows
        self.row_len.extend(lengths)

    def extract_row(self, i: int) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
        """Copies of row i's keys and values per layer (``[1, kv_heads, n, head_dim]``) and n, in a
        layout ``append_rows`` takes back (swap-out)."""
        if not 0 <= i < self.rows:
            raise IndexError(f"row {i} out of range (rows={self.rows})")
        n = self.row_len[i]
        keys = [k[i: i + 1, :, self.end - n: self.end].clone() for k in self.k]
        values = [v[i: i + 1, :, self.end - n: self.end].clone() for v in self.v]
        return keys, values, n

    def _dead_left(self) -> int:
        return self.end - self.width

    def remove_row(self, i: int) -> int | None:
        """Drop row i by moving the last row into its place; returns the moved row's old index."""
        if not 0 <= i < self.rows:
            raise IndexError(f"row {i} out of range (rows={self.rows})")
        last = self.rows - 1
        moved = None
        if i != last:
            n = self.row_len[last]
            for buf in (*self.k, *self.v):
                buf[i, :, self.end - n: self.end] = buf[last, :, self.end - n: self.end]
            self.row_len[i] = n
            moved = last
        self.row_len.pop()
        self.rows = last
        if self.rows == 0:
            self.end = max(self.margin, 0)
        return moved


def build_mask(row_len: list[int], width: int, q: int, sliding_window: int | None = None,
               device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean attention mask ``[rows, 1, q, width + q]`` (True = attend) and position ids ``[rows, q]``.

    Column j < width is token (j - width + row_len[i]) of row i (negative = padding); column
    width + t is the t-th new token. A prefill passes width=0 and row_len[i] = -(padding of row i),
    so its new tokens at positions < 0 are padding; such query rows attend to themselves only,
    which keeps them finite without touching real rows.
    """
    lens = torch.tensor(row_len, dtype=torch.long, device=device).unsqueeze(1)  # [rows, 1]
    cols = torch.arange(width + q, device=device).unsqueeze(0)  # [1, K]
    key_pos = cols - width + lens  # [rows, K]
    q_pos = lens + torch.arange(q, device=device).unsqueeze(0)  # [rows, q]
    kp = key_pos.unsqueeze(1)  # [rows, 1, K]
    qp = q_pos.unsqueeze(2)  # [rows, q, 1]
    mask = (kp >= 0) & (kp <= qp)
    if sliding_window is not None:
        mask &= (qp - kp) < sliding_window
    pad_query = (q_pos < 0).unsqueeze(2)  # [rows, q, 1]
    own_col = (cols.unsqueeze(1) == (width + torch.arange(q, device=device)).view(1, q, 1))
    mask = torch.where(pad_query, own_col.expand_as(mask), mask)
    return mask.unsqueeze(1), q_pos.clamp(min=0)
