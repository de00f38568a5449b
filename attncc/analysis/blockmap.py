"""BlockMap: which (q-block, kv-block) tiles a kernel computes, and which of them need mask code.

Two storage forms, one interface:

* ``banded``: per map and q-block, a few disjoint kv-block ranges of computed tiles and of full
  tiles (O(number of q-blocks)); kernels iterate ranges with no index tensors.
* ``listed``: a tile state grid (EMPTY / PARTIAL / FULL), from which the compressed lists
  (kv_num_blocks, kv_indices, their full-tile twins and the transposed q lists for backward)
  are derived.
* ``sparse``: only the computed tiles, per (map, q-block) row: CSR ``ptr`` over the rows, the kv
  block and the state of each tile (O(tiles computed)); what a block-index list
  (:func:`attncc.block_indices`) yields, never expanded to a grid unless asked (``to_dense``).

Maps are stored once per distinct (batch, head) structure (``map_of[b, h]`` names the map a
batch and head use): a head-independent mask has one map, and heads with equal windows share.
Counts are over the stored maps.

>>> import attncc as ac
>>> kern = ac.compile(ac.AttentionSpec(num_heads=8, head_dim=64, mask=ac.causal()), target="reference")
>>> bm = kern.block_map(4096, 4096)
>>> bm.block_size, bm.num_computed_blocks, bm.num_full_blocks, bm.num_partial_blocks
((64, 64), 2080, 2016, 64)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

EMPTY, PARTIAL, FULL = 0, 1, 2


@dataclass(frozen=True, eq=False)
class BlockMap:
    """Tile map of one attention at concrete lengths. See the module docstring."""

    block_size: tuple[int, int]
    q_len: int
    kv_len: int
    kind: str
    map_of: np.ndarray = field(repr=False)  # int [Bm, Hm] -> index of the stored map
    computed: np.ndarray | None = field(default=None, repr=False)  # banded: [U, nq, R, 2] kv-block ranges
    full: np.ndarray | None = field(default=None, repr=False)  # banded: [U, nq, R, 2]
    state: np.ndarray | None = field(default=None, repr=False)  # listed: int8 [U, nq, nkv]
    ptr: np.ndarray | None = field(default=None, repr=False)  # sparse: int64 [U * nq + 1] row starts
    cols: np.ndarray | None = field(default=None, repr=False)  # sparse: kv block of each computed tile
    cell: np.ndarray | None = field(default=None, repr=False)  # sparse: int8 PARTIAL / FULL of each tile

    @staticmethod
    def banded(
        block: tuple[int, int], q_len: int, kv_len: int, computed: np.ndarray, full: np.ndarray, map_of: np.ndarray
    ) -> BlockMap:
        return BlockMap(block, q_len, kv_len, "banded", map_of, computed=computed, full=full)

    @staticmethod
    def listed(block: tuple[int, int], q_len: int, kv_len: int, state: np.ndarray, map_of: np.ndarray) -> BlockMap:
        return BlockMap(block, q_len, kv_len, "listed", map_of, state=state)

    @staticmethod
    def sparse(
        block: tuple[int, int], q_len: int, kv_len: int, ptr: np.ndarray, cols: np.ndarray, cell: np.ndarray,
        map_of: np.ndarray,
    ) -> BlockMap:  # fmt: skip
        return BlockMap(block, q_len, kv_len, "sparse", map_of, ptr=ptr, cols=cols, cell=cell)

    def tiles(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Every computed tile as (map, q-block, kv-block, state) arrays, ordered by map, q-block, kv-block."""
        if self.kind == "sparse":
            assert self.ptr is not None and self.cols is not None and self.cell is not None
            rows = np.repeat(np.arange(self.ptr.size - 1), np.diff(self.ptr))
            return rows // self.num_q_blocks, rows % self.num_q_blocks, self.cols, self.cell
        st = self.unique_states()
        u, r, c = np.nonzero(st)
        return u, r, c, st[u, r, c]

    def tiles_key(self) -> tuple[Any, ...]:
        """What :meth:`tiles` depends on: two maps with one key (a decoding step's and the next's, when the new key
        falls in the same kv block) have the same tiles, and so the same tile lists."""
        arrays = (self.map_of, self.computed, self.full, self.state, self.ptr, self.cols, self.cell)
        held = tuple(None if a is None else (a.dtype.str, a.shape, a.tobytes()) for a in arrays)
        return (self.kind, self.num_q_blocks, self.num_kv_blocks, *held)

    def shares_tiles(self, other: BlockMap) -> bool:
        """Whether ``other`` holds this map's arrays themselves (the same objects, as
        :func:`attncc.analysis.tiling.build_lengths` gives a length whose tiles are those of the length before) at the
        same numbers of blocks: then the two have the same tiles, and so the same tile lists. False says nothing.

        >>> import attncc as ac
        >>> from attncc.analysis.tiling import build_lengths, recipe
        >>> a, b, c = build_lengths(recipe(ac.causal(align="bottom_right").sym), 1, [65, 66, 129], (64, 64), 1, 1)
        >>> a.shares_tiles(b), b.shares_tiles(c)  # 66 keys: the new key in 65's second kv block; 129: a third block
        (True, False)
        """
        arrays = ("map_of", "computed", "full", "state", "ptr", "cols", "cell")
        return (
            self.kind == other.kind
            and (self.num_q_blocks, self.num_kv_blocks) == (other.num_q_blocks, other.num_kv_blocks)
            and all(getattr(self, a) is getattr(other, a) for a in arrays)
        )

    # ---- shape ------------------------------------------------------------------------------
    @property
    def num_q_blocks(self) -> int:
        return -(-self.q_len // self.block_size[0])

    @property
    def num_kv_blocks(self) -> int:
        return -(-self.kv_len // self.block_size[1])

    @property
    def maps_shape(self) -> tuple[int, int]:
        """(Bm, Hm): 1 where the mask does not depend on the batch / head."""
        return int(self.map_of.shape[0]), int(self.map_of.shape[1])

    @property
    def num_maps(self) -> int:
        """Distinct maps stored."""
        if self.kind == "sparse":
            assert self.ptr is not None
            return (self.ptr.size - 1) // self.num_q_blocks
        arr = self.computed if self.kind == "banded" else self.state
        assert arr is not None
        return int(arr.shape[0])

    # ---- counts -----------------------------------------------------------------------------
    @staticmethod
    def _count(ranges: np.ndarray) -> int:
        return int(np.maximum(ranges[..., 1] - ranges[..., 0] + 1, 0).sum())

    @property
    def num_computed_blocks(self) -> int:
        """Tiles a kernel computes (partial + full), summed over the stored maps."""
        if self.kind == "banded":
            assert self.computed is not None
            return self._count(self.computed)
        if self.kind == "sparse":
            assert self.cols is not None
            return int(self.cols.size)
        assert self.state is not None
        return int((self.state != EMPTY).sum())

    @property
    def num_full_blocks(self) -> int:
        if self.kind == "banded":
            assert self.full is not None
            return self._count(self.full)
        if self.kind == "sparse":
            assert self.cell is not None
            return int((self.cell == FULL).sum())
        assert self.state is not None
        return int((self.state == FULL).sum())

    @property
    def num_partial_blocks(self) -> int:
        return self.num_computed_blocks - self.num_full_blocks

    @property
    def computed_fraction(self) -> float:
        return self.num_computed_blocks / (self.num_maps * self.num_q_blocks * self.num_kv_blocks)

    def predicted_flops(self, head_dim: int, num_heads: int, batch: int = 1, value_dim: int | None = None) -> float:
        """2 * bq * bkv * (head_dim + value_dim) FLOPs per computed tile (QK^T and PV), over all heads; value_dim
        defaults to head_dim."""
        per_map = self.num_computed_blocks / self.num_maps
        bq, bkv = self.block_size
        dims = head_dim + (head_dim if value_dim is None else value_dim)
        return 2.0 * bq * bkv * dims * per_map * num_heads * batch

    # ---- dense and list forms ---------------------------------------------------------------
    def states(self) -> np.ndarray:
        """int8 [Bm, Hm, nq, nkv] with EMPTY / PARTIAL / FULL (materializes the grid)."""
        return self.unique_states()[self.map_of]

    def unique_states(self) -> np.ndarray:
        """int8 [U, nq, nkv]: the stored maps as grids."""
        if self.kind == "listed":
            assert self.state is not None
            return self.state
        if self.kind == "sparse":
            u, r, c, cell = self.tiles()
            grid = np.zeros((self.num_maps, self.num_q_blocks, self.num_kv_blocks), np.int8)
            grid[u, r, c] = cell
            return grid
        assert self.computed is not None and self.full is not None
        kb = np.arange(self.num_kv_blocks)
        out = np.zeros((*self.computed.shape[:2], self.num_kv_blocks), np.int8)
        for ranges, value in ((self.computed, PARTIAL), (self.full, FULL)):
            lo, hi = ranges[..., 0, None], ranges[..., 1, None]
            inside = ((kb >= lo) & (kb <= hi)).any(-2)
            out[inside] = value
        return out

    def to_dense(self) -> torch.Tensor:
        """bool [Hm, nq, nkv] of computed tiles ([Bm, Hm, nq, nkv] when the mask depends on b)."""
        dense = torch.from_numpy(self.states() != EMPTY)
        return dense[0] if dense.shape[0] == 1 else dense

    def lists(self) -> dict[str, torch.Tensor]:
        """FlexAttention-style compressed lists, int32, shapes [Bm, Hm, nq] / [Bm, Hm, nq, nkv].

        kv_num_blocks / kv_indices list the partial tiles, full_kv_* the full ones; q_* and
        full_q_* are the transposed lists (per kv-block) for the backward pass.
        """
        st = torch.from_numpy(self.states())
        out: dict[str, torch.Tensor] = {}
        for prefix, value in (("", PARTIAL), ("full_", FULL)):
            sel = st == value
            for axis, name in ((-1, "kv"), (-2, "q")):
                chosen = sel if axis == -1 else sel.transpose(-1, -2)
                num = chosen.sum(-1, dtype=torch.int32)
                idx = torch.argsort(chosen.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
                out[f"{prefix}{name}_num_blocks"], out[f"{prefix}{name}_indices"] = num, idx
        return out

    def to_flex(self, mask_mod: object | None = None) -> object:
        """This map as a ``torch.nn.attention.flex_attention.BlockMask``."""
        from torch.nn.attention.flex_attention import BlockMask

        lists = self.lists()
        return BlockMask.from_kv_blocks(
            lists["kv_num_blocks"],
            lists["kv_indices"],
            lists["full_kv_num_blocks"],
            lists["full_kv_indices"],
            BLOCK_SIZE=self.block_size,
            mask_mod=mask_mod,
            seq_lengths=(self.q_len, self.kv_len),
        )

    def summary(self) -> str:
        return (
            f"{self.kind} block map {self.num_q_blocks}x{self.num_kv_blocks} tiles of {self.block_size[0]}x"
            f"{self.block_size[1]}, {self.num_maps} distinct map(s) for (batch, head) {self.maps_shape}: "
            f"{self.num_computed_blocks} computed "
            f"({self.computed_fraction:.1%}), {self.num_full_blocks} full, {self.num_partial_blocks} partial"
        )
