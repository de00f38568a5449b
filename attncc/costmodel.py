"""Pick tile sizes per target with a small cost model.

cost(bq, bkv) = computed_tiles * (4 * bq * bkv * D / rate(bq, bkv) + overhead)

``rate`` grows with the tile's arithmetic intensity and saturates at the target's preferred
tile; ``overhead`` is a fixed per-tile cost (loop, softmax rescale, index loads). Computed
tiles come from the real block map at a representative length (the grid size for grid masks,
else 4096). Masks with runtime tensors are costed as dense. Users override with
``ac.compile(spec, tiles=(bq, bkv))``.
"""

from __future__ import annotations

import math

import numpy as np
import sympy

from attncc.ir import exprs as X
from attncc.spec import AttentionSpec

CANDIDATES = {
    "triton": [(128, 64), (64, 64), (128, 128), (64, 32)],
    "cpu": [(64, 64), (128, 64), (32, 64), (64, 128)],
    "reference": [(64, 64)],
}
SATURATE = {"triton": 128 * 64, "cpu": 64 * 64, "reference": 64 * 64}
OVERHEAD = {"triton": 2.0e4, "cpu": 5.0e4, "reference": 0.0}  # in FLOP-equivalents per tile


def representative_length(spec: AttentionSpec) -> int:
    for cond, _ in spec.requires:
        for atom in sympy.preorder_traversal(cond):
            if isinstance(atom, sympy.Eq) and atom.lhs in (X.Sq, X.Skv) and atom.rhs.is_Integer:
                return int(atom.rhs)
            if isinstance(atom, sympy.Eq) and atom.rhs in (X.Sq, X.Skv) and atom.lhs.is_Integer:
                return int(atom.lhs)
    return 4096


def choose_tiles(spec: AttentionSpec, mask: sympy.Basic, target: str) -> tuple[int, int]:
    """The cheapest candidate tile for ``target`` under the model above."""
    from attncc import tiling

    candidates = CANDIDATES.get(target, CANDIDATES["cpu"])
    if len(candidates) == 1:
        return candidates[0]
    n = representative_length(spec)
    constants = {t.name: np.asarray(t.values) for t in spec.tensors if t.values}
    runtime = any(not t.values for t in spec.tensors)
    rec = None if runtime else tiling.recipe(mask, constants)
    best, best_cost = candidates[0], math.inf
    for bq, bkv in candidates:
        tiles: float
        if runtime:
            tiles = -(-n // bq) * -(-n // bkv)
        else:
            assert rec is not None
            bm = tiling.build(rec, n, n, (bq, bkv), spec.num_heads, 1)
            tiles = bm.num_computed_blocks / bm.num_maps
        rate = min(1.0, (bq * bkv) / SATURATE[target]) ** 0.5
        cost = tiles * (4 * bq * bkv * spec.head_dim / rate + OVERHEAD[target])
        if cost < best_cost:
            best, best_cost = (bq, bkv), cost
    return best
