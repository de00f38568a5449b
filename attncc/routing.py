"""Routed blocks: sparsity chosen from the data (BiFormer's bi-level routing, NSA-style block selection).

``route_blocks(top_k, block)`` is a mask whose visible kv blocks are picked per (batch, query head, query
block) from q and k themselves: pool each block's rows of q and of k (mean over its real rows; a last
short block averages what it has), score every kv block by ``pooled_q . pooled_k``, keep the ``top_k``.
The spec lowers it to an ``attn.select`` op (:class:`attncc.ir.ops.SelectOp`) whose kv-block list feeds
the tiled attention through ``InBlocks``, exactly like a list the user passes to
:func:`attncc.block_indices`; every call selects again, before the kernel runs. Selection is not
differentiable; the attention on the kept blocks is (gradients reach q, k and v through it).

>>> import torch, attncc as ac
>>> spec = ac.AttentionSpec(num_heads=2, head_dim=16, mask=ac.route_blocks(top_k=2, block=16))
>>> kern = ac.compile(spec, target="cpu")
>>> q, k, v = (torch.randn(1, 2, 64, 16) for _ in range(3))
>>> kern(q, k, v).shape
torch.Size([1, 2, 64, 16])
>>> bm = kern.block_map(64, 64, q=q, k=k)  # the map this q and k select: 2 of 4 kv blocks per query block
>>> bm.num_computed_blocks, bm.num_maps
(16, 2)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import sympy
import torch

from attncc.dsl import Expr, Meta
from attncc.errors import SpecError
from attncc.ir import exprs as X

DEFAULT_NAME = "routed_blocks"


@dataclass(frozen=True)
class Route:
    """How a routed mask selects its kv blocks (the attributes of its ``attn.select`` op)."""

    top_k: int
    block: tuple[int, int]  # (bq, bkv): runs of tokens in the kernel's order
    grid: tuple[int, ...] = ()  # a token grid whose ``region``-sized regions are the blocks
    region: tuple[int, ...] = ()
    pool: str = "mean"
    causal: bool = False
    include_self: bool = True


def region_major(grid: tuple[int, ...], region: tuple[int, ...]) -> torch.Tensor:
    """int64 [prod(grid)]: the row-major token index at each region-major position (regions in row-major
    order, tokens row-major inside each region).

    >>> region_major((2, 4), (2, 2)).tolist()
    [0, 1, 4, 5, 2, 3, 6, 7]
    """
    idx = torch.arange(math.prod(grid))
    split: list[int] = []
    for g, r in zip(grid, region, strict=True):
        split += [g // r, r]
    axes = len(grid)
    idx = idx.reshape(split).permute(*range(0, 2 * axes, 2), *range(1, 2 * axes, 2))
    return idx.reshape(-1)


def token_order(spec: object) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(gather, scatter) index of a spec routed over a grid: the call gathers q, k and v region-major with the
    first and puts o and lse back with the second; None when the spec keeps the tokens' order."""
    for _, route in getattr(spec, "selectors", ()):
        if route.grid:
            return _orders(route.grid, route.region)
    return None


@functools.lru_cache(maxsize=64)
def _orders(grid: tuple[int, ...], region: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(gather, scatter) of a grid, built once per grid and region (callers only index with them)."""
    perm = region_major(grid, region)
    return perm, torch.argsort(perm)


def check_spec(mask: sympy.Basic, score_mod: sympy.Basic, rope: bool, selectors: tuple[tuple[str, Route], ...]) -> None:
    """A grid-routed spec runs on region-major tokens: nothing else in it may read token positions."""
    for name, route in selectors:
        if not route.grid:
            continue
        others = mask.xreplace({a: sympy.true for a in mask.atoms(X.InBlocks) if a.tensor == name})
        reads = [what for what, e in (("mask", others), ("score_mod", score_mod)) if e.has(X.q, X.kv)]
        if reads or rope:
            raise SpecError(
                f"route_blocks(grid={list(route.grid)}) reorders the tokens region-major for its kernel, so the "
                f"rest of the spec may not depend on token positions; the {' and '.join(reads) or 'rope tables'} "
                "do. Lay the tokens out region-major yourself and use 1-d route_blocks(block=region size) instead"
            )


def route_blocks(
    top_k: int,
    block: int | Sequence[int] = 64,
    pool: str = "mean",
    causal: bool = False,
    include_self: bool = True,
    grid: Sequence[int] | None = None,
    name: str = DEFAULT_NAME,
) -> Expr:
    """Keep, per (batch, query head, query block), the ``top_k`` kv blocks of highest pooled affinity.

    ``block``: the block size (int, or (bq, bkv)); with ``grid=(H, W)`` (or 1-3 axes) the tokens are a
    row-major grid and the blocks are its ``block``-sized regions (BiFormer), for self attention over the
    whole grid: the call gathers q, k and v region-major (each region a contiguous block, so the kernel skips
    whole tiles; O(S * D) copies) and puts the output back in the tokens' order. ``causal=True`` ranks only kv
    blocks up to the query block and adds ``q >= kv``; ``include_self`` keeps the query's own block (it counts
    as one of the ``top_k``). ``name`` names the selected list (as ``kern.block_map``, dumps and the plan show
    it). See the module docstring.
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise SpecError(f"route_blocks(top_k) must be a positive int, got {top_k!r}")
    if pool != "mean":
        raise SpecError(f"route_blocks(pool={pool!r}): only 'mean' pooling is implemented")
    requires: tuple[tuple[sympy.Basic, str], ...] = ()
    if grid is not None:
        from attncc.masks import grid_of, per_axis

        shape = grid_of(grid, "route_blocks(grid)")
        region = tuple(per_axis(shape, block, "route_blocks(block)"))
        if causal:
            raise SpecError("route_blocks(grid=...) is for non-causal image grids; causal=True needs 1-d blocks")
        if any(g % r for g, r in zip(shape, region, strict=True)):
            raise SpecError(f"route_blocks: regions {list(region)} must tile the grid {list(shape)}; pad the grid")
        n = math.prod(shape)
        requires = ((sympy.Eq(X.Sq, n) & sympy.Eq(X.Skv, n), f"route_blocks(grid={shape}) needs {n} queries and keys"),)
        size = math.prod(region)
        route = Route(top_k, (size, size), shape, region, pool, causal, include_self)
    else:
        pair = (block, block) if isinstance(block, int) else tuple(block)
        if len(pair) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in pair):
            raise SpecError(f"route_blocks(block) must be a positive int or (bq, bkv), got {block!r}")
        if include_self and pair[0] != pair[1]:
            raise SpecError(f"route_blocks(include_self=True) needs equal query and kv blocks, got {pair}")
        route = Route(top_k, (int(pair[0]), int(pair[1])), (), (), pool, causal, include_self)
    origin = X.tensor_base(name)[0, 0, 0, 0]
    member = X.InBlocks(origin, X.b, X.h, sympy.floor(X.q / route.block[0]), sympy.floor(X.kv / route.block[1]))
    expr = sympy.And(member, sympy.Le(X.kv, X.q)) if causal else member
    return Expr(expr, Meta(requires=requires, dtypes=((name, "int"),), selectors=((name, route),)))


def num_blocks(route: Route, q_len: int, kv_len: int) -> tuple[int, int]:
    """(query blocks, kv blocks) at these lengths."""
    return -(-q_len // route.block[0]), -(-kv_len // route.block[1])


def _pool(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean of each run of ``block`` rows (the last run averages the rows it has): [B, H, S, D] -> [B, H, n, D],
    summed in x's precision (fp32 for half inputs), returned in float64 on the CPU so the ranking is exact."""
    B, H, S, D = x.shape
    whole = S // block * block
    x = x if x.dtype in (torch.float32, torch.float64) else x.float()
    parts = [x[:, :, :whole].reshape(B, H, whole // block, block, D).mean(3)]
    if whole < S:
        parts.append(x[:, :, whole:].mean(2, keepdim=True))
    pooled = torch.cat(parts, 2) if len(parts) > 1 else parts[0]
    return pooled.double() if x.device.type == "cpu" else pooled


@torch.no_grad()
def select(route: Route, q: torch.Tensor, k: torch.Tensor, kv_head_of: torch.Tensor | None = None) -> torch.Tensor:
    """int64 [B, Hq, query blocks, min(top_k, kv blocks)]: the kept kv blocks, best first, -1 padding. Query
    head h pairs with kv head ``h // groups``, or ``kv_head_of[h]`` (a runtime head table)."""
    B, H, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    nq, nkv = num_blocks(route, Sq, Skv)
    pq, pk = _pool(q, route.block[0]), _pool(k, route.block[1])
    if kv_head_of is not None:  # pooled keys are small: gathered per query head
        affinity = pq @ pk.index_select(1, kv_head_of.to(pk.device).long()).transpose(-1, -2)
    else:
        groups = H // Hkv
        affinity = torch.einsum("bjgqd,bjkd->bjgqk", pq.view(B, Hkv, groups, nq, D), pk).reshape(B, H, nq, nkv)
    qb = torch.arange(nq, device=q.device)[:, None]
    kb = torch.arange(nkv, device=q.device)[None, :]
    if route.causal:
        affinity = affinity.masked_fill(kb > qb, -math.inf)
    if route.include_self:
        affinity = affinity.masked_fill(kb == qb, math.inf)
    values, picked = affinity.topk(min(route.top_k, nkv), dim=-1)
    return torch.where(values == -math.inf, -1, picked)
