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
    block: tuple[int, ...]  # (bq, bkv) of token runs, or one region size per grid axis
    grid: tuple[int, ...] = ()
    pool: str = "mean"
    causal: bool = False
    include_self: bool = True

    def regions(self, length: int) -> torch.Tensor:
        """int64 [length]: the block (or grid region) of each token position."""
        pos = torch.arange(length)
        if not self.grid:
            return pos // self.block[0]
        region = torch.zeros_like(pos)
        rest = pos
        for axis in reversed(range(len(self.grid))):
            coord = rest % self.grid[axis]
            rest = rest // self.grid[axis]
            stride = math.prod(-(-g // r) for g, r in zip(self.grid[axis + 1 :], self.block[axis + 1 :], strict=True))
            region = region + (coord // self.block[axis]) * stride
        return region


def _block_expr(index: sympy.Expr, route: Route, axis: int) -> sympy.Expr:
    """The block (or region) number of a query (axis 0) or key (axis 1) position, as an index expression."""
    if not route.grid:
        return sympy.floor(index / route.block[axis])
    from attncc.masks import coords

    out = sympy.Integer(0)
    parts = coords(index, route.grid)
    for a, (c, r) in enumerate(zip(parts, route.block, strict=True)):
        stride = math.prod(-(-g // rr) for g, rr in zip(route.grid[a + 1 :], route.block[a + 1 :], strict=True))
        out = out + sympy.floor(c / r) * stride
    return out


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
    row-major grid and the blocks are its ``block``-sized regions (BiFormer), for self attention over
    the whole grid. ``causal=True`` ranks only kv blocks up to the query block and adds ``q >= kv``;
    ``include_self`` keeps the query's own block (it counts as one of the ``top_k``). ``name`` names the
    selected list (as ``kern.block_map``, dumps and the plan show it). See the module docstring.
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise SpecError(f"route_blocks(top_k) must be a positive int, got {top_k!r}")
    if pool != "mean":
        raise SpecError(f"route_blocks(pool={pool!r}): only 'mean' pooling is implemented")
    requires: tuple[tuple[sympy.Basic, str], ...] = ()
    if grid is not None:
        from attncc.masks import grid_of, per_axis

        shape = grid_of(grid, "route_blocks(grid)")
        sizes = tuple(per_axis(shape, block, "route_blocks(block)"))
        if causal:
            raise SpecError("route_blocks(grid=...) is for non-causal image grids; causal=True needs 1-d blocks")
        n = math.prod(shape)
        requires = ((sympy.Eq(X.Sq, n) & sympy.Eq(X.Skv, n), f"route_blocks(grid={shape}) needs {n} queries and keys"),)
        route = Route(top_k, sizes, shape, pool, causal, include_self)
    else:
        pair = (block, block) if isinstance(block, int) else tuple(block)
        if len(pair) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in pair):
            raise SpecError(f"route_blocks(block) must be a positive int or (bq, bkv), got {block!r}")
        if include_self and pair[0] != pair[1]:
            raise SpecError(f"route_blocks(include_self=True) needs equal query and kv blocks, got {pair}")
        route = Route(top_k, (int(pair[0]), int(pair[1])), (), pool, causal, include_self)
    origin = X.tensor_base(name)[0, 0, 0, 0]
    member = X.InBlocks(origin, X.b, X.h, _block_expr(X.q, route, 0), _block_expr(X.kv, route, 1))
    expr = sympy.And(member, sympy.Le(X.kv, X.q)) if causal else member
    return Expr(expr, Meta(requires=requires, dtypes=((name, "int"),), selectors=((name, route),)))


def num_blocks(route: Route, q_len: int, kv_len: int) -> tuple[int, int]:
    """(query blocks, kv blocks) at these lengths."""
    if route.grid:
        n = math.prod(-(-g // r) for g, r in zip(route.grid, route.block, strict=True))
        return n, n
    return -(-q_len // route.block[0]), -(-kv_len // route.block[1])


def _pool(x: torch.Tensor, regions: torch.Tensor, n: int) -> torch.Tensor:
    """Mean of the rows of each region: [B, H, S, D] -> [B, H, n, D] (float64 on CPU: the ranking is exact)."""
    dtype = torch.float64 if x.device.type == "cpu" else torch.float32
    regions = regions.to(x.device)
    total = torch.zeros(*x.shape[:2], n, x.shape[3], dtype=dtype, device=x.device)
    total.index_add_(2, regions, x.to(dtype))
    count = torch.bincount(regions, minlength=n).to(dtype).clamp(min=1)
    return total / count[:, None]


@torch.no_grad()
def select(route: Route, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """int64 [B, Hq, query blocks, min(top_k, kv blocks)]: the kept kv blocks, best first, -1 padding."""
    B, H, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    nq, nkv = num_blocks(route, Sq, Skv)
    pq = _pool(q, route.regions(Sq), nq)
    pk = _pool(k, route.regions(Skv), nkv)
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
