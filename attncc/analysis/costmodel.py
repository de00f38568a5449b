"""Pick tile sizes per target with a small cost model.

cost(bq, bkv) = computed_tiles * (4 * bq * bkv * D / rate(bq, bkv) + overhead)

``rate`` grows with the tile's arithmetic intensity and saturates at the target's preferred
tile; ``overhead`` is a per-tile cost (loop, softmax rescale, index loads; on the cpu it grows with D,
see OVERHEAD_PER_D). Computed
tiles come from the real block map at a representative length (the grid size for grid masks,
else 4096). Masks with runtime tensors are costed as dense. Users override with
``ac.compile(spec, tiles=(bq, bkv))``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import sympy

from attncc.analysis.blockmap import FULL, PARTIAL, BlockMap
from attncc.errors import UnsupportedError
from attncc.ir import exprs as X
from attncc.ir.boxeval import Box, evaluate
from attncc.spec import AttentionSpec

if TYPE_CHECKING:
    from attncc.analysis import tiling

CANDIDATES = {
    "triton": [(128, 64), (64, 64), (128, 128), (64, 32)],
    "cpu": [(64, 64), (128, 64), (32, 64), (64, 128)],
    "reference": [(64, 64)],
}
SATURATE = {"triton": 128 * 64, "cpu": 64 * 64, "reference": 64 * 64}
OVERHEAD = {"triton": 2.0e4, "cpu": 5.0e4, "reference": 0.0}  # in FLOP-equivalents per tile, at D = 64
# Targets whose per-tile overhead is OVERHEAD * D / 64: the cpu's runs of tiles rescale, load and store D-wide
# accumulator rows and pack D-wide K and V panels. With a fixed overhead the model gave causal masks 64 x 64 tiles at
# D >= 128, where 128 x 64 ran 1.05x (fp32) and 1.02x (bf16) faster at D = 128 and 1.04x and 1.09x at D = 256 (4K,
# H = 8, AMX machine, 2026-12-03; the fp32 backward, on the forward's tiles, the same). Only causal at D >= 128 and
# prefix-LM at D = 256 changed among cpu.py's masks.
OVERHEAD_PER_D = {"cpu"}
# Tiles of the backwards that gain from other tiles than the forward's. cpu: the native bf16 backward (AMX tiles or
# AVX512_BF16), whose dQ += dS K product loads and stores its fp32 dQ rows once per kv block: wider kv tiles give it
# more depth per load (its cost per computed key falls as 1 + DQ_TRAFFIC / bkv), while their edges compute more
# keys that the mask drops. Measured 2026-12-03 at 4K, H=8, D=64 and 128 (AMX machine): against the forward's
# tiles, 32 x 128 was 1.0-1.13x faster on causal, sliding window, prefix-LM, document and 2-D neighborhood;
# 32 x 256 another 1.04-1.07x on causal and 0.93-0.99x on sliding window (31% more keys computed) and document.
# Runtime masks (costed dense) take the first candidate. The forward and the fp32 backward keep their tiles.
# `benchmarks/cpu_backward_tiles.py` times the choice against the forward's tiles (BENCHMARKS.md, issue 17).
BACKWARD_CANDIDATES = {"cpu": [(32, 128), (32, 256)]}
DQ_TRAFFIC = 25.6  # keys: 1.2x at bkv = 128, 1.1x at 256 (fitted to the causal and sliding-window runs above)
# Where the native bf16 backward runs AVX512_BF16 register blocks instead (a CPU without AMX, or
# ATTNCC_CPU_ISA=avx512), each block of RANGE_ROWS rows computes, in every tile, the keys of its rows' kept range,
# rounded out to 16 (the half of a 32-key panel): a tile wide enough to span a gap in a row's keys computes the gap.
# Measured 2026-12-03 on Zen 4 (4K, H=8, D=64 and 128): on the 2-D neighborhood (a query's keys are short runs one
# grid row apart) the forward's 64 x 64 tiles ran the backward 1.15x faster than the model's 32 x 128 (range keys
# 2.0M against 2.9M per map); on causal, prefix-LM, sliding-window and document masks, whose rows keep one run of
# keys (the same range keys at every width), every candidate was within 0.97-1.04x of the others (32 x 256: 0.88x on
# the sliding window). So there the backward keeps the forward's tiles when theirs hold RANGE_SLACK times fewer.
RANGE_ROWS = 12
RANGE_POINTS = 96 * 4096  # the mask evaluated at about this many points (~30 ms): 8 blocks of rows at n = 4K, 1 at 32K
RANGE_SLACK = 1.1


def representative_length(spec: AttentionSpec) -> int:
    for cond, _ in spec.requires:
        for atom in sympy.preorder_traversal(cond):
            if isinstance(atom, sympy.Eq) and atom.lhs in (X.Sq, X.Skv) and atom.rhs.is_Integer:
                return int(atom.rhs)
            if isinstance(atom, sympy.Eq) and atom.rhs in (X.Sq, X.Skv) and atom.lhs.is_Integer:
                return int(atom.lhs)
    return 4096


def choose_tiles(
    mask: sympy.Basic,
    target: str,
    num_heads: int,
    head_dim: int,
    n: int = 4096,
    constants: dict[str, np.ndarray] | None = None,
    runtime: bool = False,
) -> tuple[int, int]:
    """The cheapest candidate tile for ``target`` under the model above, for ``mask`` (normalized) at ``n`` x
    ``n``; ``constants``: per-head tables' values; ``runtime``: the mask reads runtime tensors (costed dense).
    The block-sparse pass calls this when its pipeline options leave the tiles open."""
    from attncc.analysis import tiling

    candidates = CANDIDATES.get(target, CANDIDATES["cpu"])
    if len(candidates) == 1:
        return candidates[0]
    rec = None if runtime else tiling.recipe(mask, constants or {})
    best, best_cost = candidates[0], math.inf
    for bq, bkv in candidates:
        tiles: float = -(-n // bq) * -(-n // bkv)  # dense: runtime tensors, or a mask the analysis cannot bound
        if rec is not None:
            try:
                tiles = _computed_per_map(rec, n, (bq, bkv), num_heads)
            except UnsupportedError:
                rec = None
        rate = min(1.0, (bq * bkv) / SATURATE[target]) ** 0.5
        overhead = OVERHEAD[target] * (head_dim / 64 if target in OVERHEAD_PER_D else 1.0)
        cost = tiles * (4 * bq * bkv * head_dim / rate + overhead)
        if cost < best_cost:
            best, best_cost = (bq, bkv), cost
    return best


def _computed_per_map(rec: tiling.Recipe, n: int, tiles: tuple[int, int], num_heads: int) -> float:
    """Computed tiles per (batch, head) map of the block map at ``n`` x ``n`` (UnsupportedError where the analysis
    cannot bound the mask)."""
    from attncc.analysis import tiling

    bm = tiling.build(rec, n, n, tiles, num_heads, 1)
    return bm.num_computed_blocks / bm.num_maps


def backward_tiles(
    mask: sympy.Basic,
    target: str,
    tiles: tuple[int, int],
    num_heads: int,
    n: int = 4096,
    constants: dict[str, np.ndarray] | None = None,
    runtime: bool = False,
    register_blocks: bool = False,
) -> tuple[int, int]:
    """The tiles ``target``'s backwards walk when the forward walks ``tiles`` (``tiles`` itself for a target
    without :data:`BACKWARD_CANDIDATES`): the candidate with the fewest computed keys weighted by
    ``1 + DQ_TRAFFIC / bkv`` at ``n`` x ``n`` (arguments as :func:`choose_tiles`); ``register_blocks``: the bf16
    backward runs register blocks that skip inside partial tiles (cpu without AMX), which keep the forward's tiles
    where those hold :data:`RANGE_SLACK` times fewer keys in their rows' ranges.

    >>> import attncc as ac
    >>> from attncc.passes.normalize import boolean
    >>> def mask(m):
    ...     return boolean(ac.AttentionSpec(num_heads=8, head_dim=64, mask=m).mask)
    >>> backward_tiles(mask(ac.causal()), "cpu", (64, 64), 8), backward_tiles(mask(ac.causal()), "triton", (128, 64), 8)
    ((32, 256), (128, 64))
    >>> backward_tiles(mask(ac.sliding_window(255)), "cpu", (64, 64), 8)  # 256-key tiles: 31% more keys
    (32, 128)
    >>> nat = mask(ac.neighborhood((64, 64), (15, 15)))  # a query's keys: 15 runs of 15, one grid row apart
    >>> backward_tiles(nat, "cpu", (64, 64), 8), backward_tiles(nat, "cpu", (64, 64), 8, register_blocks=True)
    ((32, 128), (64, 64))
    """
    from attncc.analysis import tiling

    candidates = BACKWARD_CANDIDATES.get(target)
    if not candidates:
        return tiles
    if runtime:
        return candidates[0]
    rec = tiling.recipe(mask, constants or {})
    best, best_cost = candidates[0], math.inf
    for bq, bkv in candidates:
        try:
            computed = _computed_per_map(rec, n, (bq, bkv), num_heads)
        except UnsupportedError:
            return candidates[0]
        cost = computed * bq * bkv * (1 + DQ_TRAFFIC / bkv)
        if cost < best_cost:
            best, best_cost = (bq, bkv), cost
    if register_blocks and rec.bands is None:  # (a band's rows keep one run of keys: the same range at every width)
        ours, theirs = _range_keys(rec, n, (best[1], tiles[1]), num_heads)
        if theirs * RANGE_SLACK < ours:
            return tiles
    return best


def _range_keys(rec: tiling.Recipe, n: int, widths: Sequence[int], num_heads: int) -> list[float]:
    """Keys x rows per map that register blocks of RANGE_ROWS rows compute at tiles of each of ``widths`` keys, each
    block over the 16-rounded range of its rows' kept keys in every tile; estimated on blocks spread over ``n`` rows,
    as many as RANGE_POINTS allows (the mask evaluated at those rows and every key, for up to 8 heads)."""
    from attncc.analysis import tiling

    hm = min(num_heads, 8) if rec.per_head else 1
    blocks = min(8, max(1, RANGE_POINTS // (RANGE_ROWS * n * hm)), max(1, n // RANGE_ROWS))
    starts = ((np.arange(blocks) + 0.5) * (n / blocks)).astype(np.int64) // RANGE_ROWS * RANGE_ROWS
    qpos = np.minimum(starts[:, None] + np.arange(RANGE_ROWS)[None, :], n - 1).reshape(-1)
    q = qpos.astype(np.float64)[None, :, None]
    kv = np.arange(n, dtype=np.float64)[None, None, :]
    heads = np.arange(hm, dtype=np.float64)[:, None, None]
    env = tiling.tile_env({X.Sq: Box.point(n), X.Skv: Box.point(n)}, q, q, kv, kv, heads, np.zeros((1, 1, 1)))
    keep = np.broadcast_to(np.asarray(evaluate(rec.mask, env, rec.constants)[0]), (hm, qpos.size, n))
    keys = []
    for bkv in widths:
        nkv = -(-n // bkv)
        padded = np.zeros((hm, qpos.size, nkv * bkv), dtype=bool)
        padded[..., :n] = keep
        kept = np.any(padded.reshape(hm, blocks, RANGE_ROWS, nkv, bkv), axis=2)  # a block's keys per tile
        first = kept.argmax(-1)
        last = bkv - 1 - kept[..., ::-1].argmax(-1)
        width = np.where(kept.any(-1), -(-(last + 1) // 16) * 16 - first // 16 * 16, 0)
        keys.append(float(width.sum()) * n / blocks / hm)
    return keys


# ---- head placement (the head-shard pass and ac.shard_heads) ----------------------------------------------

# A partial tile's time relative to a full one's, per target. cpu: measured 1.18-1.32 at 64 x 64 tiles for masks
# evaluated per element (``benchmarks/sharding.py --part tiles``); triton: an estimate, never measured on a GPU;
# reference: dense, every tile costs the same.
PARTIAL_COST = {"cpu": 1.25, "triton": 1.5, "reference": 1.0}
EXACT_GROUPS = 12  # up to this many kv-head groups the balance is searched exhaustively (branch and bound)


def partial_cost(target: str) -> float:
    """:data:`PARTIAL_COST` of ``target`` (the cpu figure for a target without one)."""
    return PARTIAL_COST.get(target, PARTIAL_COST["cpu"])


def head_costs(bm: BlockMap, num_heads: int, target: str = "cpu") -> np.ndarray:
    """float64 [num_heads]: each query head's work in full-tile units (full tiles + partial tiles x
    ``partial_cost(target)``), summed over the map's batch entries; a map shared by all heads gives every head
    its cost."""
    states = bm.states()  # [Bm, Hm, nq, nkv]
    weight = partial_cost(target)
    per = ((states == FULL).sum((2, 3)) + weight * (states == PARTIAL).sum((2, 3))).sum(0).astype(np.float64)
    return np.broadcast_to(per, (num_heads,)).copy() if per.shape[0] == 1 else per


def balance(costs: Sequence[float], world: int, equal_counts: bool = True) -> tuple[int, ...]:
    """The rank of each item (a kv-head group) so that the largest rank's cost is small: exhaustive branch
    and bound up to EXACT_GROUPS items, else longest-processing-time first improved by pairwise swaps.
    ``equal_counts``: every rank gets len(costs) / world items (needs divisibility; PyTorch's tensor
    parallelism splits heads evenly).

    >>> balance([5, 4, 3, 3, 3, 2], 2)    # LPT alone would give 11 vs 9; the exact split is 10 vs 10
    (0, 1, 1, 0, 1, 0)
    """
    n = len(costs)
    cap = n // world if equal_counts else n
    if equal_counts and n % world:
        raise ValueError(f"{n} groups do not split evenly over {world} ranks")
    order = sorted(range(n), key=lambda i: -costs[i])
    owner = _lpt(costs, order, world, cap)
    if n <= EXACT_GROUPS:
        return _exact(costs, order, world, cap, owner)
    return _improve(costs, owner, world, moves=not equal_counts)


def _loads(costs: Sequence[float], owner: Sequence[int], world: int) -> list[float]:
    loads = [0.0] * world
    for i, r in enumerate(owner):
        loads[r] += costs[i]
    return loads


def _lpt(costs: Sequence[float], order: list[int], world: int, cap: int) -> list[int]:
    owner, loads, counts = [0] * len(costs), [0.0] * world, [0] * world
    for i in order:
        r = min((r for r in range(world) if counts[r] < cap), key=lambda r: loads[r])
        owner[i], loads[r], counts[r] = r, loads[r] + costs[i], counts[r] + 1
    return owner


def _exact(costs: Sequence[float], order: list[int], world: int, cap: int, start: list[int]) -> tuple[int, ...]:
    best, best_max = list(start), max(_loads(costs, start, world))
    loads, counts, owner = [0.0] * world, [0] * world, [0] * len(costs)

    def search(k: int) -> None:
        nonlocal best, best_max
        if k == len(order):
            if max(loads) < best_max - 1e-12:
                best, best_max = list(owner), max(loads)
            return
        i, seen = order[k], set()
        for r in range(world):
            key = (loads[r], counts[r])
            if counts[r] >= cap or key in seen or loads[r] + costs[i] >= best_max - 1e-12:
                continue  # full, symmetric to a rank tried already, or no better than the best found
            seen.add(key)
            owner[i], loads[r], counts[r] = r, loads[r] + costs[i], counts[r] + 1
            search(k + 1)
            loads[r], counts[r] = loads[r] - costs[i], counts[r] - 1

    search(0)
    return tuple(best)


def _improve(costs: Sequence[float], owner: list[int], world: int, moves: bool) -> tuple[int, ...]:
    """Swap pairs of items between the most loaded rank and another (or, with ``moves``, move one item off it)
    while that lowers the larger of the two ranks' loads."""
    owner = list(owner)
    for _ in range(100 * len(costs)):
        loads = _loads(costs, owner, world)
        top = max(range(world), key=lambda r: loads[r])
        best: tuple[float, int, int] | None = None
        for i in (i for i, r in enumerate(owner) if r == top):
            candidates = [(j, other, costs[j]) for j, other in enumerate(owner) if other != top]
            if moves:
                candidates += [(-1 - r, r, 0.0) for r in range(world) if r != top]  # j < 0: a move to rank r
            for j, other, cj in candidates:
                if cj >= costs[i]:
                    continue
                delta = costs[i] - cj
                new_max = max(loads[top] - delta, loads[other] + delta)
                if new_max < loads[top] - 1e-12 and (best is None or new_max < best[0]):
                    best = (new_max, i, j)
        if best is None:
            break
        _, i, j = best
        if j < 0:
            owner[i] = -1 - j
        else:
            owner[i], owner[j] = owner[j], owner[i]
    return tuple(owner)
