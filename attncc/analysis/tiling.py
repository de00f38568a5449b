"""Build concrete block maps from a mask: closed-form bands, or classified tiles.

* Banded masks (see :mod:`attncc.analysis.bands`): each band's bounds are evaluated once per query row
  and reduced per q-block, O(Sq) time and O(number of q-blocks) memory; no (q, kv) pair is ever
  evaluated, so a 1M-token causal map takes milliseconds.
* Block-index lists (``InBlocks(...) & rest``, :func:`attncc.block_indices`): the listed tiles are the
  only candidates; ``rest`` is classified on them alone, O(list size), and the map is kept sparse.
* A mask that is not banded, at lengths with few (batch, head, row, key) points (a decoding step, a batch of short
  prompts): the mask is read at every point (:func:`_from_points`); exact, and no range tables of runtime tensors.
* Other masks: every tile is classified at once by three-valued interval analysis
  (:mod:`attncc.ir.boxeval`), O(number of tiles). Tiles the analysis cannot decide are split in
  halves and re-analysed, a bounded number of times; what is still undecided is marked partial
  (sound) and logged. Runtime tensors enter through range-min/max tables built in O(S log S).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import sympy

from attncc.analysis.bands import Band, bands_of
from attncc.analysis.blockmap import EMPTY, FULL, PARTIAL, BlockMap
from attncc.ir import exprs as X
from attncc.ir import pointeval
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
    listed: tuple[X.InBlocks, sympy.Basic] | None = None  # mask == InBlocks(...) & rest, contiguous blocks
    read_bands: tuple[Band, ...] | None = None  # not banded, but bands whose bounds read runtime tensors by b or h


FIND: Any = object()  # recipe(bands=FIND): find the bands here


def recipe(mask: sympy.Basic, constants: Mapping[str, np.ndarray] | None = None, bands: Any = FIND) -> Recipe:
    """Analyse ``mask`` (normalized) once: its bands if banded (``bands`` gives them when a pass
    already found them, None when it found the mask is not banded), and what it depends on."""
    consts = dict(constants or {})
    per_batch = _depends(mask, X.b)
    if bands is FIND:
        bands = None if per_batch else bands_of(mask, frozenset(consts))
    read = frozenset(str(a.base) for a in mask.atoms(sympy.Indexed)) - frozenset(consts)
    listed = _listed(mask)
    read_bands = bands_of(mask, frozenset(consts), read) if bands is None and read and listed is None else None
    return Recipe(
        mask,
        tuple(bands) if bands is not None else None,
        _depends(mask, X.h),
        per_batch,
        {n: TensorRanges(v) for n, v in consts.items()},
        listed,
        tuple(read_bands) if read_bands is not None else None,
    )


def _listed(mask: sympy.Basic) -> tuple[X.InBlocks, sympy.Basic] | None:
    """(the block list, the rest) when the mask is a block list of contiguous blocks AND'ed with the rest."""
    terms = list(mask.args) if isinstance(mask, sympy.And) else [mask]
    for term in terms:
        if isinstance(term, X.InBlocks) and term.blocks is not None:
            rest = sympy.And(*(t for t in terms if t is not term))
            return term, rest
    return None


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
    given = tensors or {}
    if rec.bands is None and rec.listed is None:
        found = _from_points(rec, q_len, kv_len, block, num_heads, batch, given)  # (no range tables built)
        if found is not None:
            return found
    tables = {**rec.constants, **{n: TensorRanges(np.asarray(v)) for n, v in given.items()}}
    sizes = {X.Sq: Box.point(q_len), X.Skv: Box.point(kv_len), X.H: Box.point(num_heads), X.B: Box.point(batch)}
    if rec.listed is not None and rec.listed[0].blocks == block and rec.listed[0].tensor in given:
        lists = np.asarray(given[rec.listed[0].tensor])
        return _from_list(rec, q_len, kv_len, block, num_heads, batch, lists, tables, sizes)
    if rec.listed is not None and rec.listed[0].blocks != block:
        log.info("block map of %s: tiles %s differ from the list's blocks %s; classifying every tile",
                 rec.listed[0].tensor, block, rec.listed[0].blocks)  # fmt: skip
    if rec.bands is not None and q_len <= block[0]:  # one q-block (a decoding step): every row at once
        return build_lengths(rec, q_len, [kv_len], block, num_heads, batch, tensors)[0]
    if rec.read_bands is not None and q_len <= block[0]:  # bounds reading runtime tensors (own lengths), many points
        found = _read_banded(list(rec.read_bands), q_len, kv_len, block, hm, bm, tables, sizes)
        if found is not None:
            return found
    if rec.bands is not None:
        comp, full = _banded(list(rec.bands), q_len, kv_len, block, hm, tables, sizes)
        both, map_of = _dedupe(np.stack([comp, full], 1).reshape(1, hm, 2, *comp.shape[1:]))
        return BlockMap.banded(block, q_len, kv_len, both[:, 0], both[:, 1], map_of)
    state, map_of = _dedupe(classify(rec.mask, q_len, kv_len, block, hm, bm, tables, sizes))
    return BlockMap.listed(block, q_len, kv_len, state, map_of)


# maps of at most this many (batch, head, row, key) points are read at each point; more where the mask reads runtime
# tensors (classifying tiles builds their range tables first): ~1-1.5 ms per million points against 3-9 ms of
# classification for a padded or per-batch document mask of 0.5-8M points (B x n x n)
POINT_MAP, POINT_MAP_READING = 1 << 16, 1 << 21


def _from_points(
    rec: Recipe,
    q_len: int,
    kv_len: int,
    block: tuple[int, int],
    num_heads: int,
    batch: int,
    tensors: Mapping[str, np.ndarray],
) -> BlockMap | None:
    """The map of a mask that is not banded, read at every (batch, head, row, key) point
    (:func:`attncc.ir.pointeval.mask_at`): exact, and for few points (a decoding step's, a batch of short prompts')
    cheaper than classifying the tiles, which builds range tables of each runtime tensor first (a padded batch's
    ``attention_mask[b, kv]``, new each step), and than the bands that read tensors (``kv < lens[b]``: 65 against
    330 us at B=8, 1.1K keys, one query). None where there are no points or more than ``POINT_MAP``
    (``POINT_MAP_READING`` with runtime tensors), a tensor holds a value that is not finite, or the mask has a node
    without a point rule: the caller bands or classifies.

    >>> import attncc as ac
    >>> rec = recipe(((ac.kv <= ac.tensor("pos")[0]) & (ac.tensor("am")[ac.b, ac.kv] != 0)).sym)
    >>> am = np.ones((2, 300)); am[1, :70] = 0  # the second sequence left-padded by 70
    >>> bm = build(rec, 1, 300, (64, 64), 1, 2, {"pos": np.array([299]), "am": am})
    >>> bm.kind, bm.states().reshape(2, -1).tolist()
    ('listed', [[2, 2, 2, 2, 2], [0, 1, 2, 2, 2]])
    """
    hm, bm = (num_heads if rec.per_head else 1), (batch if rec.per_batch else 1)
    if not 0 < bm * hm * q_len * kv_len <= (POINT_MAP_READING if tensors else POINT_MAP):
        return None
    values = {
        **{n: r.values for n, r in rec.constants.items()},
        **{n: np.asarray(v, np.float64) for n, v in tensors.items()},
    }
    if not all(np.isfinite(v).all() for v in values.values()):
        return None
    f64, (bq, bkv) = np.float64, block
    nq, nkv = -(-q_len // bq), -(-kv_len // bkv)
    rows = np.minimum(np.arange(nq * bq if nq > 1 else q_len, dtype=f64), q_len - 1)  # (past the end: the last row
    keys = np.minimum(np.arange(nkv * bkv, dtype=f64), kv_len - 1)  # or key again: a tile's states do not change)
    dense = pointeval.mask_at(rec.mask, {
        X.b: np.arange(bm, dtype=f64)[:, None, None, None], X.h: np.arange(hm, dtype=f64)[None, :, None, None],
        X.q: rows[None, None, :, None], X.kv: keys[None, None, None, :],
        X.Sq: float(q_len), X.Skv: float(kv_len), X.H: float(num_heads), X.B: float(batch),
    }, values)  # fmt: skip
    if dense is None:
        return None
    tiles = np.broadcast_to(dense, (bm, hm, rows.size, keys.size)).reshape(bm, hm, nq, -1, nkv, bkv)
    some, every = tiles.any((3, 5)), tiles.all((3, 5))
    state, map_of = _dedupe(np.where(every, FULL, np.where(some, PARTIAL, EMPTY)).astype(np.int8))
    return BlockMap.listed(block, q_len, kv_len, state, map_of)


def _read_banded(
    bands: list[Band],
    q_len: int,
    kv_len: int,
    block: tuple[int, int],
    hm: int,
    bm: int,
    tables: Mapping[str, TensorRanges],
    sizes: Env,
) -> BlockMap | None:
    """The one-q-block map of bands whose bounds read runtime tensors by batch entry or head (a batch of sequences
    of their own lengths: ``kv < lens[b]``): each (batch, head)'s bounds at every row, then ``_one_block``'s ranges;
    None where a bound is not finite (a tensor value that is not, or a read that may leave its tensor), for the
    caller to classify the tiles instead.

    >>> import attncc as ac
    >>> rec = recipe((ac.kv < ac.tensor("lens")[ac.b]).sym)
    >>> sizes = {X.Sq: Box.point(1), X.Skv: Box.point(300)}
    >>> bm = _read_banded(list(rec.read_bands), 1, 300, (64, 64), 1, 2, {"lens": TensorRanges([64, 200])}, sizes)
    >>> bm.kind, bm.states().reshape(2, -1).tolist()  # 64 keys: a full tile; 200: three full, then 8 keys of one
    ('banded', [[2, 0, 0, 0, 0], [2, 2, 2, 1, 0]])
    >>> build(rec, 1, 300, (64, 64), 1, 2, {"lens": np.array([64, 200])}).kind  # so few points: read at each
    'listed'
    """
    rows = np.arange(q_len)
    lows = [_band_lo(b, rows, hm, tables, sizes, bm)[None] for b in bands]  # [1, M, Sq]: M = bm x hm maps
    highs = [_band_hi(b, rows, kv_len, hm, tables, sizes, bm)[None] for b in bands]
    if not all(np.isfinite(x).all() for x in lows + highs):
        return None
    comp, full = _ranges_at_rows(lows, highs, np.array([kv_len]), q_len, block[1])
    both = np.stack([comp[0], full[0]], 1).astype(np.int64)  # (block numbers: integers, as the other maps hold)
    both, map_of = _dedupe(both.reshape(bm, hm, 2, *comp.shape[2:]))
    return BlockMap.banded(block, q_len, kv_len, both[:, 0], both[:, 1], map_of)


def build_lengths(
    rec: Recipe,
    q_len: int,
    kv_lens: Sequence[int],
    block: tuple[int, int],
    num_heads: int,
    batch: int,
    tensors: Mapping[str, np.ndarray] | None = None,
) -> list[BlockMap]:
    """The block maps at one query length and each of ``kv_lens``: ``[build(rec, q_len, n, ...) for n in kv_lens]``.

    Where the map has one q-block and the mask is banded (a decoding step), the maps of all the lengths are
    worked out together, as arrays over the lengths: a generation loop's next steps cost about one map. A length
    whose tiles are those of the length before it (its new key falls in the same kv block) gets that map's arrays,
    the same objects, read-only (``BlockMap.shares_tiles`` then answers without reading them).

    >>> import attncc as ac
    >>> rec = recipe((ac.sinks(4) | ac.causal(align="bottom_right")).sym)
    >>> [m.num_computed_blocks for m in build_lengths(rec, 1, [64, 65, 200], (64, 64), 1, 1)]
    [1, 2, 4]
    """
    hm = num_heads if rec.per_head else 1
    if rec.bands is None or q_len > block[0] or rec.listed is not None:
        return [build(rec, q_len, n, block, num_heads, batch, tensors) for n in kv_lens]
    tables = {**rec.constants, **{n: TensorRanges(np.asarray(v)) for n, v in (tensors or {}).items()}}
    lengths = np.asarray(kv_lens, dtype=np.int64)
    sizes = {X.Sq: Box.point(q_len), X.Skv: Box.point(lengths[:, None, None]), X.H: Box.point(num_heads),
             X.B: Box.point(batch)}  # fmt: skip
    comp, full = _one_block(list(rec.bands), q_len, lengths, block[1], hm, tables, sizes)
    nkv = -(-lengths // block[1])
    same = np.zeros(lengths.size, bool)  # the tiles of the length before: its arrays are shared (next steps in a block)
    rest = tuple(range(1, comp.ndim))
    same[1:] = (nkv[1:] == nkv[:-1]) & (comp[1:] == comp[:-1]).all(rest) & (full[1:] == full[:-1]).all(rest)
    maps: list[BlockMap] = []
    for i, n in enumerate(kv_lens):
        if not same[i]:  # (else the arrays of the length before)
            if hm == 1:  # one map a length: no heads to dedupe
                computed, full_of, map_of = comp[i], full[i], np.zeros((1, 1), np.int64)
            else:
                both, map_of = _dedupe(np.stack([comp[i], full[i]], 1).reshape(1, hm, 2, *comp.shape[2:]))
                computed, full_of = both[:, 0], both[:, 1]
            for a in (computed, full_of, map_of):
                a.flags.writeable = False  # (shared by the maps)
        maps.append(BlockMap.banded(block, q_len, int(n), computed, full_of, map_of))
    return maps


def _one_block(
    bands: list[Band],
    q_len: int,
    kv_lens: np.ndarray,
    bkv: int,
    hm: int,
    tables: Mapping[str, TensorRanges],
    sizes: Env,
) -> tuple[np.ndarray, np.ndarray]:
    """(computed, full) kv-block ranges [K, hm, 1, R, 2] of a one-q-block map at each of K key lengths.

    Every band's bounds are evaluated at every row and length at once ([K, hm, Sq]). A band computes the
    blocks from its first visible row's low bound to its last one's high bound (the bounds are non-decreasing
    in q). A block is full where the union of the bands covers it at every row: one band's full range in closed
    form; for several, the covered blocks of each row's merged intervals, counted over the rows.
    """
    rows = np.arange(q_len)[None, None, :]
    lows = [_band_lo(b, rows, hm, tables, sizes) for b in bands]  # [K, hm, Sq] each
    highs = [_band_hi(b, rows, kv_lens[:, None, None], hm, tables, sizes) for b in bands]
    return _ranges_at_rows(lows, highs, kv_lens, q_len, bkv)


def _ranges_at_rows(
    lows: list[np.ndarray], highs: list[np.ndarray], kv_lens: np.ndarray, q_len: int, bkv: int
) -> tuple[np.ndarray, np.ndarray]:
    """``_one_block``'s (computed, full) ranges [K, M, 1, R, 2] from each band's clipped bounds at every row
    ([K, M, Sq] each, M maps)."""
    kv = kv_lens[:, None]  # [K, 1]
    nkv = -(-kv // bkv)
    comps = []
    for lo, hi in zip(lows, highs, strict=True):
        seen = hi >= lo
        some, first = seen.any(-1), seen.argmax(-1)
        last = q_len - 1 - seen[..., ::-1].argmax(-1)
        c_lo = np.take_along_axis(lo, first[..., None], -1)[..., 0] // bkv
        c_hi = np.take_along_axis(hi, last[..., None], -1)[..., 0] // bkv
        comps.append(np.stack([np.where(some, c_lo, 1), np.where(some, c_hi, 0)], -1))
    comp = merge_ranges(np.stack(comps, -2))  # [K, M, nb, 2]
    if len(lows) == 1:  # visible at every row, between the last row's low bound and the first row's high one
        lo, hi = lows[0], highs[0]
        f_start = np.ceil(lo[..., -1] / bkv)
        f_end = np.where(hi[..., 0] >= kv - 1, nkv - 1, np.floor((hi[..., 0] + 1) / bkv) - 1)
        ok = (hi >= lo).all(-1) & (f_start <= f_end)
        full = np.stack([np.where(ok, f_start, 1), np.where(ok, f_end, 0)], -1)[..., None, :].astype(np.int64)
    else:
        merged = merge_ranges(np.stack([np.stack(lows, -1), np.stack(highs, -1)], -1))  # [K, M, Sq, nb, 2]
        lo, hi = merged[..., 0], merged[..., 1]
        k_end = kv[..., None, None]
        start = -(-lo // bkv)
        end = np.where(hi >= k_end - 1, nkv[..., None, None] - 1, (hi + 1) // bkv - 1)
        ok = (lo <= hi) & (start <= end)  # (each row's covered block ranges are disjoint: a gap's block is not one)
        width, maps = int(nkv.max()) + 1, lo.shape[1]
        at = np.arange(kv_lens.size * maps).reshape(kv_lens.size, maps, 1, 1) * width
        steps = np.bincount((at + start)[ok], minlength=at.size * width) - np.bincount(
            (at + end + 1)[ok], minlength=at.size * width
        )
        covered = np.cumsum(steps.reshape(kv_lens.size, maps, width), -1)[..., :-1] == q_len
        full = _runs(covered)
    slots = max(comp.shape[-2], full.shape[-2])
    return _pad_slots(comp, slots)[:, :, None], _pad_slots(full, slots)[:, :, None]


def _runs(on: np.ndarray) -> np.ndarray:
    """The runs of True in ``on`` [..., n] as inclusive ranges [..., R, 2], in order (unused slots hold (1, 0)).

    >>> _runs(np.array([[True, True, False, True], [False] * 4])).tolist()
    [[[0, 1], [3, 3]], [[1, 0], [1, 0]]]
    """
    flat = on.reshape(-1, on.shape[-1]).astype(np.int8)
    edge = np.diff(np.pad(flat, ((0, 0), (1, 1))), axis=-1)  # +1 where a run starts, -1 just after it ends
    row, start = np.nonzero(edge == 1)
    end = np.nonzero(edge == -1)[1] - 1
    count = np.bincount(row, minlength=flat.shape[0])
    slot = np.arange(row.size) - np.repeat(np.cumsum(count) - count, count)
    out = np.tile(np.array([1, 0], dtype=np.int64), (flat.shape[0], max(int(count.max(initial=0)), 1), 1))
    out[row, slot] = np.stack([start, end], -1)
    return out.reshape(*on.shape[:-1], *out.shape[1:])


def _pad_slots(ranges: np.ndarray, slots: int) -> np.ndarray:
    """``ranges`` [..., R, 2] with empty ranges (1, 0) appended up to ``slots``."""
    pad = slots - ranges.shape[-2]
    if pad <= 0:
        return ranges
    empty = np.tile(np.array([1, 0], dtype=np.int64), (*ranges.shape[:-2], pad, 1))
    return np.concatenate([ranges, empty], -2)


def _from_list(
    rec: Recipe,
    q_len: int,
    kv_len: int,
    block: tuple[int, int],
    num_heads: int,
    batch: int,
    lists: np.ndarray,
    tables: Mapping[str, TensorRanges],
    sizes: Env,
) -> BlockMap:
    """The sparse map of ``InBlocks & rest``: each listed tile, classified by ``rest`` alone."""
    assert rec.listed is not None
    _, rest = rec.listed
    nq, nkv = -(-q_len // block[0]), -(-kv_len // block[1])
    hm = num_heads if lists.shape[1] > 1 or _depends(rest, X.h) else 1
    bm = batch if lists.shape[0] > 1 or _depends(rest, X.b) else 1
    rows = np.broadcast_to(lists[:, :, :nq], (bm, hm, nq, lists.shape[3]))
    bb, hh, qb, slot = np.nonzero((rows >= 0) & (rows < nkv))
    kb = rows[bb, hh, qb, slot].astype(np.int64)
    order = np.lexsort((kb, qb, hh, bb))
    bb, hh, qb, kb = bb[order], hh[order], qb[order], kb[order]
    if rest is sympy.true:
        cell = np.full(kb.size, FULL, np.int8)
    else:
        q0, k0 = qb * block[0], kb * block[1]
        q1, k1 = np.minimum(q0 + block[0], q_len) - 1.0, np.minimum(k0 + block[1], kv_len) - 1.0
        env = tile_env(sizes, q0.astype(np.float64), q1, k0.astype(np.float64), k1, hh.astype(np.float64),
                       bb.astype(np.float64))  # fmt: skip
        may_t, may_f = (np.broadcast_to(a, kb.shape) for a in evaluate(rest, env, tables))
        cell = np.where(~may_t, EMPTY, np.where(~may_f, FULL, PARTIAL)).astype(np.int8)
        undecided = np.flatnonzero(may_t & may_f)
        if undecided.size:
            flat = np.ravel_multi_index((bb[undecided], hh[undecided], qb[undecided], kb[undecided]), (bm, hm, nq, nkv))
            cell[undecided] = _refine(rest, flat, (bm, hm, nq, nkv), block, q_len, kv_len, tables, sizes)
    kept = cell != EMPTY
    rows_of = (bb * hm + hh)[kept] * nq + qb[kept]
    ptr = np.concatenate([[0], np.cumsum(np.bincount(rows_of, minlength=bm * hm * nq))]).astype(np.int64)
    map_of = np.arange(bm * hm, dtype=np.int64).reshape(bm, hm)
    return BlockMap.sparse(block, q_len, kv_len, ptr, kb[kept].astype(np.int32), cell[kept], map_of)


DEDUPE_BY_BYTES = 64  # up to this many (batch, head) maps are told apart by their bytes in a dict


def _dedupe(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keep one copy of each distinct (batch, head) map: (unique [U, ...], map_of [Bm, Hm])."""
    bm, hm = maps.shape[:2]
    if bm * hm == 1:
        return maps.reshape(1, *maps.shape[2:]), np.zeros((1, 1), np.int64)
    flat = maps.reshape(bm * hm, -1)
    if bm * hm <= DEDUPE_BY_BYTES:  # a few maps (a decoding batch's): a dict of their bytes, no sort
        seen: dict[bytes, int] = {}
        rank_of = np.array([seen.setdefault(row.tobytes(), len(seen)) for row in flat], np.int64)
        firsts = np.unique(rank_of, return_index=True)[1]
        return flat[firsts].reshape(-1, *maps.shape[2:]), rank_of.reshape(bm, hm)
    _, first, inverse = np.unique(flat, axis=0, return_index=True, return_inverse=True)
    order = np.argsort(first)  # number the maps in order of first use: head 0 gets map 0
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return flat[first[order]].reshape(-1, *maps.shape[2:]), rank[inverse.reshape(-1)].reshape(bm, hm)


# ---- banded ---------------------------------------------------------------------------------
def _eval_at(
    bounds: tuple[sympy.Expr, ...],
    pick: np.ufunc,
    qpos: np.ndarray,
    hm: int,
    tables: Mapping[str, TensorRanges],
    sizes: Env,
    bm: int | None = None,
) -> np.ndarray:
    """max (or min) of the bounds at query rows ``qpos`` ([hm, n] or [n]) for every head: [hm, n] (with the
    lengths in ``sizes`` arrays that broadcast, such as K key lengths [K, 1, 1]: [K, hm, n]). ``bm``: for every
    batch entry and head, batch-major (bounds that read runtime tensors by b: ``Recipe.read_bands``): [bm * hm, n]."""
    qpos = np.asarray(qpos, dtype=np.float64)
    rows, heads = (qpos if qpos.ndim >= 2 else qpos[None, :]), np.tile(np.arange(hm, dtype=np.float64), bm or 1)
    maps = {X.h: heads[:, None]}
    if bm is not None:
        maps[X.b] = np.repeat(np.arange(bm, dtype=np.float64), hm)[:, None]
    points = {**{s: box.lo for s, box in sizes.items()}, X.q: rows, **maps}
    shape = np.broadcast_shapes(*(np.shape(p) for p in points.values()))  # [hm, n]; [K, hm, n] at K key lengths
    found = pointeval.at(tuple(bounds), points, "max" if pick is np.maximum else "min")  # (a map per decoded token)
    if found is not None:
        return found if found.shape == shape else np.broadcast_to(found, shape)
    env = {**sizes, X.q: Box.point(rows), **{s: Box.point(v) for s, v in maps.items()}}
    values = [np.broadcast_to(interval(e, env, tables).lo, shape) for e in bounds]
    return pick.reduce(values) if len(values) > 1 else values[0]


def _visible_rows(
    width_at: Callable[[np.ndarray], np.ndarray], q_len: int, bq: int, hm: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per head, the interval [qa, qz] of rows with width >= 0 (empty: qa > qz), width concave.

    Width is evaluated at every q-block's first and last row, then at the rows of the one block
    where the interval starts (and ends) inside: O(number of q-blocks + bq) points.
    """
    nq = -(-q_len // bq)
    starts = np.arange(nq) * bq
    ends = np.minimum(starts + bq, q_len) - 1
    w = width_at(np.broadcast_to(np.concatenate([starts, ends]), (hm, 2 * nq)))
    ok_s, ok_e = w[:, :nq] >= 0, w[:, nq:] >= 0
    touched = ok_s | ok_e
    if not touched.any(-1).all():  # some head's visible rows (if any) sit strictly inside one block
        return _first_last(width_at(np.broadcast_to(np.arange(q_len), (hm, q_len))) >= 0, q_len)
    first_b = touched.argmax(-1)
    last_b = nq - 1 - touched[:, ::-1].argmax(-1)
    heads = np.arange(hm)
    offsets = np.arange(bq)
    in_first = np.minimum(starts[first_b][:, None] + offsets, q_len - 1)
    in_last = np.minimum(starts[last_b][:, None] + offsets, q_len - 1)
    ok_first = width_at(in_first) >= 0
    ok_last = ok_first if (first_b == last_b).all() else width_at(in_last) >= 0  # (one q-block: decoding)
    qa = np.where(ok_s[heads, first_b], starts[first_b], in_first[heads, ok_first.argmax(-1)])
    last_ok = ok_last & (in_last <= ends[last_b][:, None])
    qz = np.where(ok_e[heads, last_b], ends[last_b], in_last[heads, bq - 1 - last_ok[:, ::-1].argmax(-1)])
    return qa, qz


def _first_last(ok: np.ndarray, q_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Per head, the first and last rows where ``ok`` [..., hm, q_len] holds (none: first > last)."""
    some = ok.any(-1)
    return np.where(some, ok.argmax(-1), 1), np.where(some, q_len - 1 - ok[:, ::-1].argmax(-1), 0)


def _band_lo(
    band: Band, pos: np.ndarray, hm: int, tables: Mapping[str, TensorRanges], sizes: Env, bm: int | None = None
) -> np.ndarray:
    """First visible key of the band at query rows ``pos``, clipped to 0: [hm, n] ([bm * hm, n]: ``_eval_at``)."""
    return np.maximum(_eval_at(band.lows, np.maximum, pos, hm, tables, sizes, bm), 0)


def _band_hi(
    band: Band,
    pos: np.ndarray,
    kv_len: int | np.ndarray,
    hm: int,
    tables: Mapping[str, TensorRanges],
    sizes: Env,
    bm: int | None = None,
) -> np.ndarray:
    """Last visible key of the band at query rows ``pos``, clipped to kv_len - 1 (lengths [K, 1, 1]: [K, hm, n]):
    [hm, n] ([bm * hm, n]: ``_eval_at``)."""
    return np.minimum(_eval_at(band.highs, np.minimum, pos, hm, tables, sizes, bm), kv_len - 1)


def _band_ranges(
    band: Band, q_len: int, kv_len: int, block: tuple[int, int], hm: int, tables: Mapping[str, TensorRanges], sizes: Env
) -> tuple[np.ndarray, np.ndarray]:
    """(computed, full) kv-block ranges [hm, nq, 2] of one band (empty: start > end).

    The clipped bounds lo(q) = max(lows, 0) and hi(q) = min(highs, Skv - 1) are non-decreasing,
    and hi - lo is concave, so the rows with a visible key form one interval [qa, qz]
    (:func:`_visible_rows`); each q-block then needs its bounds at two rows only:
    O(number of q-blocks) time and memory, whatever the length.
    """
    bq, bkv = block
    nq, nkv = -(-q_len // bq), -(-kv_len // bkv)

    lo_at = functools.partial(_band_lo, band, hm=hm, tables=tables, sizes=sizes)  # at rows pos: [hm, n]
    hi_at = functools.partial(_band_hi, band, kv_len=kv_len, hm=hm, tables=tables, sizes=sizes)
    qa, qz = _visible_rows(lambda pos: hi_at(pos) - lo_at(pos), q_len, bq, hm)
    qs = np.repeat((np.arange(nq) * bq)[None, :], hm, 0)
    qe = np.minimum(qs + bq, q_len) - 1
    first, final = np.maximum(qs, qa[:, None]), np.minimum(qe, qz[:, None])
    rows = first <= final
    # the computed range's bounds at each block's first and last visible rows, the full range's at its last and first
    lows, highs = (
        lo_at(np.concatenate([np.where(rows, first, 0), qe], -1)),
        hi_at(np.concatenate([np.where(rows, final, 0), qs], -1)),
    )
    c_lo, f_lo, c_hi, f_hi = lows[:, :nq], lows[:, nq:], highs[:, :nq], highs[:, nq:]
    comp = np.stack([np.where(rows, c_lo // bkv, 1), np.where(rows, c_hi // bkv, 0)], -1)
    all_rows = (qa[:, None] <= qs) & (qe <= qz[:, None])
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
    comp, full = merge_ranges(np.stack([p[0] for p in parts], -2)), merge_ranges(np.stack([p[1] for p in parts], -2))
    if len(bands) > 1:
        full = _jointly_full(bands, parts, full, q_len, kv_len, block, hm, tables, sizes)
        comp = _pad_slots(comp, full.shape[-2])  # one slot count for both
    return comp, full


JOINT_CHECK_LIMIT = 1 << 24  # (candidate tile, row) pairs checked for joint coverage before giving up


def _jointly_full(
    bands: list[Band],
    parts: list[tuple[np.ndarray, np.ndarray]],
    full: np.ndarray,
    q_len: int,
    kv_len: int,
    block: tuple[int, int],
    hm: int,
    tables: Mapping[str, TensorRanges],
    sizes: Env,
) -> np.ndarray:
    """Add the tiles that several bands cover together but none alone (e.g. ``kv > q | kv <= q``).

    Such a tile is partial in every band that reaches it, so it is an edge tile of some band: the
    candidates are the computed-but-not-full blocks of each band (O(q-blocks) of them), and each is
    checked row by row against the union of the bands' intervals at that row. O(candidates x bq).
    """
    bq, bkv = block
    edges = []
    for comp_b, full_b in parts:
        c_lo, c_hi, f_lo, f_hi = comp_b[..., 0], comp_b[..., 1], full_b[..., 0], full_b[..., 1]
        has_full = f_lo <= f_hi
        edges.append((c_lo, np.where(has_full, np.minimum(f_lo - 1, c_hi), c_hi)))
        edges.append((np.where(has_full, np.maximum(f_hi + 1, c_lo), c_hi + 1), c_hi))
    width = max(int((hi - lo + 1).max(initial=0)) for lo, hi in edges)
    if width <= 0:
        return full
    if width * full.shape[0] * full.shape[1] * len(edges) > JOINT_CHECK_LIMIT:
        log.info("tiles left partial after refinement: band edges %d blocks wide are too many to check", width)
        return full
    heads, qbs, kbs = [], [], []
    for lo, hi in edges:
        for offset in range(width):
            h, qb = np.nonzero(lo + offset <= hi)
            heads.append(h)
            qbs.append(qb)
            kbs.append(lo[h, qb] + offset)
    h, qb, kb = np.concatenate(heads), np.concatenate(qbs), np.concatenate(kbs)
    if h.size == 0:
        return full

    def covered(h: np.ndarray, kb: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Is tile column block kb inside the union of the bands at every one of ``rows`` [C, n]?"""
        flat = np.broadcast_to(rows.reshape(-1), (hm, rows.size))
        pick = (h[:, None], np.arange(rows.size).reshape(rows.shape))
        lows = [_band_lo(b, flat, hm, tables, sizes)[pick] for b in bands]
        highs = [_band_hi(b, flat, kv_len, hm, tables, sizes)[pick] for b in bands]
        merged = merge_ranges(np.stack([np.stack(lows, -1), np.stack(highs, -1)], -1))  # [C, n, R, 2]
        k0 = (kb * bkv)[:, None, None]
        k1 = np.minimum(kb * bkv + bkv - 1, kv_len - 1)[:, None, None]
        return ((merged[..., 0] <= k0) & (merged[..., 1] >= k1)).any(-1).all(-1)  # type: ignore[no-any-return]

    known = ((full[h, qb, :, 0] <= kb[:, None]) & (kb[:, None] <= full[h, qb, :, 1])).any(-1)
    h, qb, kb = h[~known], qb[~known], kb[~known]
    ends = np.stack([qb * bq, np.minimum(qb * bq + bq, q_len) - 1], -1)
    keep = covered(h, kb, ends)  # the block's first and last rows first: most candidates fail there
    h, qb, kb = h[keep], qb[keep], kb[keep]
    if h.size * bq > JOINT_CHECK_LIMIT:
        log.info("%d tiles left partial after refinement: too many to check for joint coverage by bands", h.size)
        return full
    keep = covered(h, kb, np.minimum(qb[:, None] * bq + np.arange(bq), q_len - 1))
    if not keep.any():
        return full
    h, qb, kb = h[keep], qb[keep], kb[keep]
    order = np.lexsort((kb, qb, h))
    h, qb, kb = h[order], qb[order], kb[order]
    same = np.r_[False, (h[1:] == h[:-1]) & (qb[1:] == qb[:-1])]
    run_start = np.maximum.accumulate(np.where(~same, np.arange(h.size), 0))
    slot = np.arange(h.size) - run_start
    extra = np.tile(np.array([1, 0], dtype=np.int64), (*full.shape[:2], int(slot.max()) + 1, 1))
    extra[h, qb, slot] = np.stack([kb, kb], -1)
    return merge_ranges(np.concatenate([full, extra], -2))


def merge_ranges(ranges: np.ndarray) -> np.ndarray:
    """Merge [..., R, 2] inclusive ranges into disjoint, sorted ones (unused slots hold (1, 0))."""
    if ranges.shape[-2] == 1:  # one range per row (one band): nothing to merge; an empty one becomes (1, 0)
        one = ranges.astype(np.int64)
        return np.where(one[..., :1] <= one[..., 1:], one, np.array([1, 0], dtype=np.int64))
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
def tile_env(
    sizes: Env, lo_q: np.ndarray, hi_q: np.ndarray, lo_k: np.ndarray, hi_k: np.ndarray, hs: np.ndarray, bs: np.ndarray
) -> dict[sympy.Basic, Box]:
    """The boxes of q in [lo_q, hi_q] and kv in [lo_k, hi_k] at heads ``hs`` and batch entries ``bs`` (arrays that
    broadcast; points where lo == hi), with ``sizes``: the environment :func:`evaluate` reads a mask in."""
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
    env = tile_env(
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
        refine = _at_points if undecided.size * min(bq, q_len) * min(bkv, kv_len) <= POINTS else _refine
        state.reshape(-1)[undecided] = refine(mask, undecided, state.shape, block, q_len, kv_len, tables, sizes)
    return state


POINTS = 1 << 15  # undecided tiles of at most this many points (decoding's few) are read at each point


def _at_points(
    mask: sympy.Basic,
    tiles: np.ndarray,
    shape: tuple[int, ...],
    block: tuple[int, int],
    q_len: int,
    kv_len: int,
    tables: Mapping[str, TensorRanges],
    sizes: Env,
) -> np.ndarray:
    """``_refine`` by the mask at every point of the ``tiles``: full where it is proven true at each point, empty
    where proven false at each, else partial (sound; exact where every point is decided, as it is unless a tensor
    read may leave its tensor). For the few undecided tiles of a decoding step's map (a batch's own lengths, a
    document's edge) one pass over their points is cheaper than boxes split until decided.

    >>> import attncc as ac
    >>> from attncc.ir.boxeval import TensorRanges
    >>> tiles, shape = np.array([1, 4]), (2, 1, 1, 4)  # (batch 0, kv block 1), (batch 1, kv block 0)
    >>> lens = {"lens": TensorRanges([70, 64])}
    >>> _at_points((ac.kv < ac.tensor("lens")[ac.b]).sym, tiles, shape, (64, 64), 1, 200, lens, {}).tolist()
    [1, 2]
    """
    bb, hh, qb, kb = np.unravel_index(tiles, shape)
    rows, cols = np.arange(min(block[0], q_len)), np.arange(min(block[1], kv_len))
    qs = np.minimum(qb[:, None, None] * block[0] + rows[None, :, None], q_len - 1).astype(np.float64)
    ks = np.minimum(kb[:, None, None] * block[1] + cols[None, None, :], kv_len - 1).astype(np.float64)
    env = tile_env(sizes, qs, qs, ks, ks, hh[:, None, None].astype(np.float64), bb[:, None, None].astype(np.float64))
    points = (tiles.size, rows.size, cols.size)  # (a point past a tile's end repeats its last row or key)
    may_t, may_f = (np.broadcast_to(a, points) for a in evaluate(mask, env, tables))
    true, false = may_t & ~may_f, may_f & ~may_t
    full, empty = true.all((1, 2)), false.all((1, 2))
    unsure = ~full & ~empty & ~(true.any((1, 2)) & false.any((1, 2)))  # partial only for an undecided point
    if unsure.any():
        log.info("block map: %d of %d undecided tiles left partial after refinement (a point undecided: sound, maybe "
                 "not tight)", int(unsure.sum()), tiles.size)  # fmt: skip
    return np.where(full, FULL, np.where(empty, EMPTY, PARTIAL)).astype(np.int8)


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
        env = tile_env(sizes, q_lo, q_hi, k_lo, k_hi, hh[owner].astype(np.float64), bb[owner].astype(np.float64))
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
