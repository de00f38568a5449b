"""Build concrete block maps from a mask: closed-form bands, or classified tiles.

* Banded masks (see :mod:`attncc.bands`): each band's bounds are evaluated once per query row
  and reduced per q-block, O(Sq) time and O(number of q-blocks) memory; no (q, kv) pair is ever
  evaluated, so a 1M-token causal map takes milliseconds.
* Other masks: every tile is classified at once by three-valued interval analysis
  (:mod:`attncc.ir.boxeval`), O(number of tiles). Tiles the analysis cannot decide are split in
  halves and re-analysed, a bounded number of times; what is still undecided is marked partial
  (sound) and logged. Runtime tensors enter through range-min/max tables built in O(S log S).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import sympy

from attncc.bands import Band, bands_of
from attncc.blockmap import EMPTY, FULL, PARTIAL, BlockMap
from attncc.ir import exprs as X
from attncc.ir.boxeval import Box, Env, TensorRanges, evaluate, interval

log = logging.getLogger("attncc.tiling")

REFINE_ROUNDS = 24
REFINE_BUDGET = 8  # boxes per tile, on average, that refinement may evaluate in one round


def _depends(expr: sympy.Basic, sym: sympy.Symbol) -> bool:
    return sym in expr.free_symbols or any(sym in i.free_symbols for a in expr.atoms(sympy.Indexed) for i in a.indices)


@dataclass(frozen=True)
class Recipe:
    """Everything symbolic about a mask's map, worked out once per kernel."""

    mask: sympy.Basic
    bands: tuple[Band, ...] | None
    per_head: bool
    per_batch: bool
    constants: dict[str, TensorRanges]


def recipe(mask: sympy.Basic, constants: Mapping[str, np.ndarray] | None = None) -> Recipe:
    """Analyse ``mask`` (normalized) once: its bands if banded, and what it depends on."""
    consts = dict(constants or {})
    per_batch = _depends(mask, X.b)
    bands = None if per_batch else bands_of(mask, frozenset(consts))
    return Recipe(
        mask,
        tuple(bands) if bands is not None else None,
        _depends(mask, X.h),
        per_batch,
        {n: TensorRanges(v) for n, v in consts.items()},
    )


def build(
    rec: Recipe,
    q_len: int,
    kv_len: int,
    block: tuple[int, int],
    num_heads: int,
    batch: int,
    tensors: Mapping[str, np.ndarray] | None = None,
) -> BlockMap:
    """The block map at these lengths; ``tensors`` holds the runtime tensors' values."""
    hm = num_heads if rec.per_head else 1
    bm = batch if rec.per_batch else 1
    tables = {**rec.constants, **{n: TensorRanges(np.asarray(v)) for n, v in (tensors or {}).items()}}
    sizes = {X.Sq: Box.point(q_len), X.Skv: Box.point(kv_len), X.H: Box.point(num_heads), X.B: Box.point(batch)}
    if rec.bands is not None:
        comp, full = _banded(list(rec.bands), q_len, kv_len, block, hm, tables, sizes)
        both, map_of = _dedupe(np.stack([comp, full], 1).reshape(1, hm, 2, *comp.shape[1:]))
        return BlockMap.banded(block, q_len, kv_len, both[:, 0], both[:, 1], map_of)
    state, map_of = _dedupe(classify(rec.mask, q_len, kv_len, block, hm, bm, tables, sizes))
    return BlockMap.listed(block, q_len, kv_len, state, map_of)


def _dedupe(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keep one copy of each distinct (batch, head) map: (unique [U, ...], map_of [Bm, Hm])."""
    bm, hm = maps.shape[:2]
    if bm * hm == 1:
        return maps.reshape(1, *maps.shape[2:]), np.zeros((1, 1), np.int64)
    flat = maps.reshape(bm * hm, -1)
    _, first, inverse = np.unique(flat, axis=0, return_index=True, return_inverse=True)
    order = np.argsort(first)  # number the maps in order of first use: head 0 gets map 0
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return flat[first[order]].reshape(-1, *maps.shape[2:]), rank[inverse.reshape(-1)].reshape(bm, hm)


# ---- banded ---------------------------------------------------------------------------------
def _eval_rows(
    bounds: tuple[sympy.Expr, ...], pick: np.ufunc, q_len: int, hm: int, tables: Mapping[str, TensorRanges], sizes: Env
) -> np.ndarray:
    """max (or min) of the bounds, for every query row and head: [hm, q_len]."""
    env = {
        **sizes,
        X.q: Box.point(np.arange(q_len, dtype=np.float64)[None, :]),
        X.h: Box.point(np.arange(hm, dtype=np.float64)[:, None]),
    }
    values = [np.broadcast_to(interval(e, env, tables).lo, (hm, q_len)) for e in bounds]
    return pick.reduce(values) if len(values) > 1 else values[0]


def _band_ranges(
    band: Band, q_len: int, kv_len: int, block: tuple[int, int], hm: int, tables: Mapping[str, TensorRanges], sizes: Env
) -> tuple[np.ndarray, np.ndarray]:
    """(computed, full) kv-block ranges [hm, nq, 2] of one band (empty: start > end)."""
    bq, bkv = block
    nq, nkv = -(-q_len // bq), -(-kv_len // bkv)
    lo = np.maximum(_eval_rows(band.lows, np.maximum, q_len, hm, tables, sizes), 0)
    hi = np.minimum(_eval_rows(band.highs, np.minimum, q_len, hm, tables, sizes), kv_len - 1)
    pad = nq * bq - q_len
    real = np.pad(np.ones(q_len, bool), (0, pad)).reshape(nq, bq)
    lo = np.pad(lo, ((0, 0), (0, pad)), constant_values=np.inf).reshape(hm, nq, bq)
    hi = np.pad(hi, ((0, 0), (0, pad)), constant_values=-np.inf).reshape(hm, nq, bq)
    rows = lo <= hi
    any_row = rows.any(-1)
    c_start = np.where(rows, lo, np.inf).min(-1)
    c_end = np.where(rows, hi, -np.inf).max(-1)
    c_start, c_end = np.where(any_row, c_start, bkv), np.where(any_row, c_end, 0)  # empty rows: (1, 0)
    comp = np.stack([c_start // bkv, c_end // bkv], -1)
    all_rows = (rows | ~real).all(-1)
    f_lo = np.where(real, lo, -np.inf).max(-1)
    f_hi = np.where(real, hi, np.inf).min(-1)
    f_start = np.ceil(f_lo / bkv)
    f_end = np.where(f_hi >= kv_len - 1, nkv - 1, np.floor((f_hi + 1) / bkv) - 1)
    ok = all_rows & (f_start <= f_end)
    full = np.stack([np.where(ok, f_start, 1), np.where(ok, f_end, 0)], -1)
    return comp.astype(np.int64), full.astype(np.int64)


def _banded(
    bands: list[Band],
    q_len: int,
    kv_len: int,
    block: tuple[int, int],
    hm: int,
    tables: Mapping[str, TensorRanges],
    sizes: Env,
) -> tuple[np.ndarray, np.ndarray]:
    parts = [_band_ranges(b, q_len, kv_len, block, hm, tables, sizes) for b in bands]
    return merge_ranges(np.stack([p[0] for p in parts], -2)), merge_ranges(np.stack([p[1] for p in parts], -2))


def merge_ranges(ranges: np.ndarray) -> np.ndarray:
    """Merge [..., R, 2] inclusive ranges into disjoint, sorted ones (unused slots hold (1, 0))."""
    start, end = ranges[..., 0].astype(np.int64), ranges[..., 1].astype(np.int64)
    valid = start <= end
    big = np.iinfo(np.int64).max // 4
    start, end = np.where(valid, start, big), np.where(valid, end, -1)
    order = np.argsort(start, axis=-1, kind="stable")
    start, end = np.take_along_axis(start, order, -1), np.take_along_axis(end, order, -1)
    valid = start <= end
    run_end = np.maximum.accumulate(end, axis=-1)
    new_group = np.ones_like(valid)
    new_group[..., 1:] = start[..., 1:] > run_end[..., :-1] + 1
    group = np.cumsum(new_group, axis=-1) - 1
    out = np.empty(ranges.shape, dtype=np.int64)
    for g in range(ranges.shape[-2]):
        member = valid & (group == g)
        some = member.any(-1)
        out[..., g, 0] = np.where(some, np.where(member, start, big).min(-1), 1)
        out[..., g, 1] = np.where(some, np.where(member, end, -1).max(-1), 0)
    return out


# ---- classified -----------------------------------------------------------------------------
def _tile_env(
    sizes: Env, lo_q: np.ndarray, hi_q: np.ndarray, lo_k: np.ndarray, hi_k: np.ndarray, hs: np.ndarray, bs: np.ndarray
) -> dict[sympy.Basic, Box]:
    return {**sizes, X.q: Box(lo_q, hi_q), X.kv: Box(lo_k, hi_k), X.h: Box.point(hs), X.b: Box.point(bs)}


def classify(
    mask: sympy.Basic,
    q_len: int,
    kv_len: int,
    block: tuple[int, int],
    hm: int,
    bm: int,
    tables: Mapping[str, TensorRanges],
    sizes: Env | None = None,
) -> np.ndarray:
    """int8 [bm, hm, nq, nkv]: EMPTY, PARTIAL or FULL per tile (sound; tight where decided)."""
    sizes = sizes or {X.Sq: Box.point(q_len), X.Skv: Box.point(kv_len)}
    bq, bkv = block
    nq, nkv = -(-q_len // bq), -(-kv_len // bkv)
    q0 = (np.arange(nq) * bq).astype(np.float64)
    k0 = (np.arange(nkv) * bkv).astype(np.float64)
    env = _tile_env(
        sizes,
        q0[None, None, :, None],
        np.minimum(q0 + bq, q_len)[None, None, :, None] - 1,
        k0[None, None, None, :],
        np.minimum(k0 + bkv, kv_len)[None, None, None, :] - 1,
        np.arange(hm, dtype=np.float64)[None, :, None, None],
        np.arange(bm, dtype=np.float64)[:, None, None, None],
    )
    may_t, may_f = (np.broadcast_to(a, (bm, hm, nq, nkv)) for a in evaluate(mask, env, tables))
    state = np.where(~may_t, EMPTY, np.where(~may_f, FULL, PARTIAL)).astype(np.int8)
    undecided = np.flatnonzero(may_t & may_f)
    if undecided.size:
        state.reshape(-1)[undecided] = _refine(mask, undecided, state.shape, block, q_len, kv_len, tables, sizes)
    return state


def _refine(
    mask: sympy.Basic,
    tiles: np.ndarray,
    shape: tuple[int, ...],
    block: tuple[int, int],
    q_len: int,
    kv_len: int,
    tables: Mapping[str, TensorRanges],
    sizes: Env,
) -> np.ndarray:
    """Split undecided tiles into halves until each is proven empty, full or mixed."""
    bb, hh, qb, kb = np.unravel_index(tiles, shape)
    n = tiles.size
    has_t, has_f = np.zeros(n, bool), np.zeros(n, bool)
    owner = np.arange(n)
    q0, k0 = qb * block[0], kb * block[1]
    boxes = [q0, np.minimum(q0 + block[0], q_len) - 1, k0, np.minimum(k0 + block[1], kv_len) - 1]
    for _ in range(REFINE_ROUNDS):
        owner, boxes = _split(owner, boxes)
        if owner.size > REFINE_BUDGET * n + 4096:
            break
        q_lo, q_hi, k_lo, k_hi = (b.astype(np.float64) for b in boxes)
        env = _tile_env(sizes, q_lo, q_hi, k_lo, k_hi, hh[owner].astype(np.float64), bb[owner].astype(np.float64))
        may_t, may_f = (np.broadcast_to(a, owner.shape) for a in evaluate(mask, env, tables))
        has_t[owner[may_t & ~may_f]] = True
        has_f[owner[may_f & ~may_t]] = True
        keep = may_t & may_f & ~(has_t & has_f)[owner]
        owner, boxes = owner[keep], [b[keep] for b in boxes]
        if not owner.size:
            break
    unresolved = np.zeros(n, bool)
    unresolved[owner] = True
    if unresolved.any():
        log.info(
            "block map: %d of %d undecided tiles left partial after refinement (sound, maybe not tight)",
            int(unresolved.sum()),
            n,
        )
    return np.where(unresolved | (has_t & has_f), PARTIAL, np.where(has_t, FULL, EMPTY)).astype(np.int8)


def _split(owner: np.ndarray, boxes: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    q0, q1, k0, k1 = boxes
    along_q = (q1 - q0) >= (k1 - k0)
    qm, km = (q0 + q1) // 2, (k0 + k1) // 2
    a = [q0, np.where(along_q, qm, q1), k0, np.where(along_q, k1, km)]
    b = [np.where(along_q, qm + 1, q0), q1, np.where(along_q, k0, km + 1), k1]
    return np.concatenate([owner, owner]), [np.concatenate([x, y]) for x, y in zip(a, b, strict=True)]
