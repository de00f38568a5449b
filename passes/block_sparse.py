"""The block-sparse pass: tile an ``attn.fused`` op and record how its tiles are found.

before:
    %o = attn.fused %q, %k, %v {groups = 1, scale = 0.125, score_mod = "score", mask = "kv <= q", form = "causal"}
after:
    %o = attn.tiled %q, %k, %v {..., bq = 64, bkv = 64, layout = "banded", bands = ["0 .. q"],
                                kv_blocks = ["0 .. qb"], full_blocks = ["0 .. qb - 1"]}

The tile status itself (empty / partial / full) is proven at map-build time for concrete
lengths (:mod:`attncc.analysis.tiling`): symbolically for banded masks, by interval analysis otherwise,
never by evaluating the mask on the whole Q x KV grid. A mask the analysis cannot handle
is tiled densely (every tile partial) and the reason logged.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import sympy

from attncc.analysis import costmodel
from attncc.analysis.bands import bands_of, block_ranges
from attncc.errors import SpecError, UnsupportedError
from attncc.ir.boxeval import TensorRanges
from attncc.ir.core import Graph, Op
from attncc.ir.exprs import Skv, Sq, in_blocks
from attncc.ir.ops import AttentionOp, FusedOp, TensorOp, TiledOp
from attncc.passes.base import Pass

log = logging.getLogger("attncc.passes.block_sparse")

LIST_TILES = (16, 32, 64, 128)  # block sizes of a block list that become the tiles (every target builds these)


def _tables(op: AttentionOp, graph: Graph) -> tuple[dict[str, np.ndarray], bool]:
    """The constant tables' values, and whether the mask reads a runtime tensor (the cost model then costs it
    dense)."""
    values = {t.tensor: np.asarray(t.values) for t in graph.ops_of(TensorOp) if isinstance(t, TensorOp) and t.values}
    return values, bool({str(a.base) for a in op.mask.atoms(sympy.Indexed)} - set(values))


def _probe(op: AttentionOp, graph: Graph) -> str | None:
    """Why the mask cannot be analysed (None when it can): try it on a tiny tile grid."""
    from attncc.analysis import tiling  # runtime module; imported here to keep the pass import light

    tables = {t.tensor: np.zeros(4) for t in graph.ops_of(TensorOp) if isinstance(t, TensorOp) and t.ndim == 1}
    tables.update(
        {t.tensor: np.zeros((4,) * t.ndim) for t in graph.ops_of(TensorOp) if isinstance(t, TensorOp) and t.ndim > 1}
    )
    try:
        tiling.classify(
            op.mask.subs({Sq: 8, Skv: 8}), 8, 8, (4, 4), 1, 1, {n: TensorRanges(v) for n, v in tables.items()}
        )
    except UnsupportedError as exc:
        return str(exc)
    return None


@dataclass(frozen=True)
class BlockSparse(Pass):
    """Split each attention into bq x bkv tiles; banded masks get closed-form kv ranges. Tiles left at 0
    (``block-sparse{target=cpu,n=4096}``) are chosen by the cost model for ``target`` at ``n`` x ``n``, and
    so are the backward tiles (``costmodel.backward_tiles``) unless ``bwd_bq``, ``bwd_bkv`` name them.
    Given tiles (``block-sparse{bq=64,bkv=64}``) serve the backward too, and so do the tiles of a block list."""

    name: ClassVar[str] = "block-sparse"
    bq: int = 0
    bkv: int = 0
    target: str = "cpu"
    n: int = 4096
    bwd_bq: int = 0
    bwd_bkv: int = 0
    register_blocks: int = 0  # 1: the target's bf16 backward skips inside partial tiles (cpu without AMX)

    def __post_init__(self) -> None:
        """Tiles come in pairs of positive sizes (or both 0: the cost model's); a lone or negative one is an error
        rather than ignored.

        >>> BlockSparse(bwd_bq=32)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        attncc.errors.SpecError: block-sparse: bwd_bq=32 without bwd_bkv; name both (e.g. ...) or neither
        """
        for a, b in (("bq", "bkv"), ("bwd_bq", "bwd_bkv")):
            x, y = getattr(self, a), getattr(self, b)
            if x < 0 or y < 0:
                raise SpecError(f"block-sparse: {a}={x}, {b}={y}: tile sizes must be positive (or both 0 to let the "
                                "cost model choose)")  # fmt: skip
            if (x > 0) != (y > 0):
                given, missing = (a, b) if x > 0 else (b, a)
                raise SpecError(f"block-sparse: {given}={getattr(self, given)} without {missing}; name both "
                                f"(e.g. {a}=32,{b}=128) or neither")  # fmt: skip
        if self.n <= 0:
            raise SpecError(f"block-sparse: n={self.n}: the cost model's sequence length must be positive")

    def run(self, graph: Graph) -> Graph:
        ops: list[Op] = []
        for op in graph.ops:
            if isinstance(op, FusedOp):
                op = self._tile(op, graph)
            ops.append(op)
        return Graph(graph.name, tuple(ops))

    def tiles(self, op: AttentionOp, values: dict[str, np.ndarray], runtime: bool) -> tuple[int, int]:
        """(bq, bkv): the options, or the cost model's choice when they are left at 0 (``values``, ``runtime``:
        as ``_tables`` gives them)."""
        if self.bq > 0:  # (__post_init__: tiles come in pairs)
            return self.bq, self.bkv
        for listed in in_blocks(op.mask):  # tiles equal to a block list's blocks: its map is read from the list
            if listed.blocks is not None and all(n in LIST_TILES for n in listed.blocks):
                return listed.blocks
        heads, head_dim = int(op.q.shape[1]), int(op.q.shape[3])
        chosen = costmodel.choose_tiles(op.mask, self.target, heads, head_dim, self.n, values, runtime)
        log.debug("block-sparse: %s tiles %s chosen by the %s cost model at %d", op.result, chosen, self.target, self.n)
        return chosen

    def backward_tiles(
        self, op: AttentionOp, tiles: tuple[int, int], values: dict[str, np.ndarray], runtime: bool
    ) -> tuple[int, int]:
        """(bwd_bq, bwd_bkv) of the tiled op: the options, else the cost model's when it chose the forward's too
        (and no block list fixes the tiles); (0, 0) when they are the forward's."""
        if self.bwd_bq > 0:
            chosen = (self.bwd_bq, self.bwd_bkv)
        elif self.bq > 0 or in_blocks(op.mask):
            chosen = tiles
        else:
            heads = int(op.q.shape[1])
            blocks = bool(self.register_blocks)
            chosen = costmodel.backward_tiles(op.mask, self.target, tiles, heads, self.n, values, runtime, blocks)
        return (0, 0) if chosen == tiles else chosen

    def _tile(self, op: AttentionOp, graph: Graph) -> TiledOp:
        fields = {f.name: getattr(op, f.name) for f in dataclasses.fields(op)}
        values, runtime = _tables(op, graph)
        bq, bkv = self.tiles(op, values, runtime)
        bwd_bq, bwd_bkv = self.backward_tiles(op, (bq, bkv), values, runtime)
        base = TiledOp(**fields, bq=bq, bkv=bkv, bwd_bq=bwd_bq, bwd_bkv=bwd_bkv)
        if op.mask is sympy.true:
            return base
        bands = None if runtime else bands_of(op.mask, frozenset(values))
        if bands is not None:
            ranges = [block_ranges(b, bq, bkv) for b in bands]
            return dataclasses.replace(
                base,
                layout="banded",
                bands=tuple((b.lo, b.hi) for b in bands),
                kv_blocks=tuple(r[0] for r in ranges),
                full_blocks=tuple(r[1] for r in ranges),
            )
        if (why := _probe(op, graph)) is not None:
            log.info("block-sparse: tiling %s densely, the mask cannot be analysed: %s", op.result, why)
            return base
        return dataclasses.replace(base, layout="runtime" if runtime else "static")
