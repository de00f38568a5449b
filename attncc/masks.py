"""Builtin masks. Each returns a boolean :class:`~attncc.dsl.Expr` over b, h, q, kv.

Lengths: ``Sq`` and ``Skv`` are the query and key lengths at call time. Window sizes may be
Python ints or per-head expressions (:func:`attncc.per_head`).

>>> import attncc as ac
>>> (ac.causal() & ac.sliding_window(3)).sym
(kv <= q) & (q - 3 <= kv)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import sympy

from attncc.dsl import Expr, Meta, TensorRef, lift
from attncc.errors import SpecError
from attncc.ir import exprs as X

IntOrExpr = int | Expr


def _nonneg(value: IntOrExpr, label: str) -> Expr:
    if isinstance(value, bool) or not isinstance(value, int | Expr):
        raise SpecError(f"{label} must be an int or an expression, got {value!r}")
    if isinstance(value, int) and value < 0:
        raise SpecError(f"{label} must be >= 0, got {value}")
    return lift(value)


def _aligned(align: str, label: str) -> Expr:
    """The query's position among the keys: ``q`` (``"top_left"``) or ``q + (Skv - Sq)`` (``"bottom_right"``: the
    last query sits at the last key, as in decoding with a KV cache)."""
    if align == "top_left":
        return ac_q()
    if align == "bottom_right":
        return Expr(X.q + X.Skv - X.Sq)
    raise SpecError(f"{label}(align={align!r}): align must be 'top_left' or 'bottom_right'")


def causal(align: str = "top_left") -> Expr:
    """Each query sees itself and earlier keys.

    align="top_left": ``q >= kv``; align="bottom_right": ``q + (Skv - Sq) >= kv`` (the last
    query sees the last key, as in decoding with a KV cache).
    """
    return ac_kv() <= _aligned(align, "causal")


def sliding_window(left: IntOrExpr, right: IntOrExpr = 0, align: str = "top_left") -> Expr:
    """Keys within ``left`` before and ``right`` after the query: ``q - left <= kv <= q + right``.

    ``sliding_window(255)`` is causal with a 256-key window (the query and 255 before it). With
    ``align="bottom_right"`` the query stands at ``q + (Skv - Sq)``, as :func:`causal`'s: decoding
    from a KV cache with a windowed model (Mistral, Gemma's local layers).

    >>> sliding_window(255, align="bottom_right").sym
    (kv <= Skv - Sq + q) & (Skv - Sq + q - 255 <= kv)
    """
    lo, hi = _nonneg(left, "sliding_window(left)"), _nonneg(right, "sliding_window(right)")
    at = _aligned(align, "sliding_window")
    return (at - lo <= ac_kv()) & (ac_kv() <= at + hi)


def ac_q() -> Expr:
    return Expr(X.q)


def ac_kv() -> Expr:
    return Expr(X.kv)


def prefix_lm(n: IntOrExpr, align: str = "top_left") -> Expr:
    """Bidirectional over the first ``n`` keys, causal after: ``kv < n | kv <= q`` (the causal part aligned as
    :func:`causal`'s ``align``)."""
    return (ac_kv() < _nonneg(n, "prefix_lm(n)")) | causal(align)


def sinks(n: IntOrExpr) -> Expr:
    """The first ``n`` keys are always visible (attention sinks): ``kv < n``. Combine with ``|``."""
    return ac_kv() < _nonneg(n, "sinks(n)")


def dilated_window(window: int, dilation: int, causal: bool = True) -> Expr:
    """Every ``dilation``-th key: causal: ``kv = q - i*dilation`` for i in [0, window);
    non-causal: ``|q - kv| <= (window // 2) * dilation`` with ``(q - kv) % dilation == 0``."""
    if window < 1 or dilation < 1:
        raise SpecError(f"dilated_window(window={window}, dilation={dilation}): both must be >= 1")
    d = X.q - X.kv
    same = sympy.Eq(sympy.Mod(d, dilation), 0)
    if causal:
        return Expr(sympy.And(same, sympy.Le(0, d), sympy.Le(d, (window - 1) * dilation)))
    return Expr(sympy.And(same, sympy.Le(sympy.Abs(d), (window // 2) * dilation)))


def document(ids: TensorRef, kv_ids: TensorRef | None = None, batched: bool = False) -> Expr:
    """Queries see keys of the same document: ``ids[q] == ids[kv]`` (``ids[b, q]`` if batched).

    ``kv_ids`` gives the keys' ids when they differ from the queries' (cross attention).
    """
    for t in (ids, kv_ids):
        if t is not None and not isinstance(t, TensorRef):
            raise SpecError(f"document() takes tensors declared with ac.tensor(name), got {t!r}")
    qi = TensorRef(ids.name, ids.dtype or "int")
    ki = TensorRef(kv_ids.name, kv_ids.dtype or "int") if kv_ids else qi
    if batched:
        return qi[X.b, X.q] == ki[X.b, X.kv]
    return qi[X.q] == ki[X.kv]


def block_layout(layout: TensorRef, block: int | Sequence[int] = (64, 64), per_head: bool = False) -> Expr:
    """A block-sparse layout: the tile (q // bq, kv // bkv) is visible where ``layout`` is true.

    ``layout`` is [nq, nkv] (or [H, nq, nkv] with ``per_head=True``), bool or 0/1.
    """
    bq, bkv = _pair(block, "block_layout(block)")
    ref = TensorRef(layout.name, layout.dtype or "bool")
    idx = (sympy.floor(X.q / bq), sympy.floor(X.kv / bkv))
    return ref[(X.h, *idx) if per_head else idx] != 0


def block_indices(indices: TensorRef, block: int | Sequence[int] = (64, 64)) -> Expr:
    """Visible where the key's block is listed for the query's block: ``kv // bkv`` is one of
    ``indices[b, h, q // bq, :]``.

    ``indices`` is an int tensor ``[B or 1, H or 1, ceil(Sq / bq), K]`` of kv-block numbers, ``-1`` padding
    each row to the fixed capacity ``K`` (a size-1 batch or head dim is shared). The block map is read
    from the list (O(its size), no dense grid); it composes with ``&``, ``|`` and every other mask.
    Entries outside ``[-1, ceil(Skv / bkv))`` and repeated entries in a row are errors at call time.

    >>> import torch, attncc as ac
    >>> spec = ac.AttentionSpec(num_heads=1, head_dim=8, mask=ac.block_indices(ac.tensor("kv_blocks"), 16))
    >>> lists = torch.tensor([[[[0, -1], [0, 1], [2, -1]]]])  # q-blocks 0, 1, 2 of 16 rows each
    >>> ac.compile(spec, target="reference").block_map(48, 48, kv_blocks=lists).to_dense().int().tolist()
    [[[1, 0, 0], [1, 1, 0], [0, 0, 1]]]
    """
    if not isinstance(indices, TensorRef):
        raise SpecError(f"block_indices() takes a tensor declared with ac.tensor(name), got {indices!r}")
    if indices.dtype not in (None, "int"):
        raise SpecError(
            f"block_indices(): tensor {indices.name!r} holds block numbers; declare it int, not {indices.dtype}"
        )
    bq, bkv = _pair(block, "block_indices(block)")
    origin = X.tensor_base(indices.name)[0, 0, 0, 0]
    member = X.InBlocks(origin, X.b, X.h, sympy.floor(X.q / bq), sympy.floor(X.kv / bkv))
    return Expr(member, Meta(dtypes=((indices.name, "int"),)))


def _pair(value: int | Sequence[int], label: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(not isinstance(v, int) or v < 1 for v in pair):
        raise SpecError(f"{label} must be a positive int or a pair of them, got {value!r}")
    return pair[0], pair[1]


def per_axis(grid: int | Sequence[int], value: int | Sequence[int], label: str) -> list[int]:
    """``value`` (one int for every axis, or one per axis) as a list with an entry per grid axis."""
    n = 1 if isinstance(grid, int) else len(grid)
    vals = [value] * n if isinstance(value, int) else list(value)
    if len(vals) != n:
        raise SpecError(f"{label} has {len(vals)} entries but the grid has {n} axes")
    return vals


def grid_of(grid: int | Sequence[int], label: str) -> tuple[int, ...]:
    """``grid`` checked (1 to 3 positive ints) and as a tuple."""
    g = (grid,) if isinstance(grid, int) else tuple(grid)
    if not 1 <= len(g) <= 3 or any(not isinstance(n, int) or n < 1 for n in g):
        raise SpecError(f"{label}: grid must be 1 to 3 positive ints, got {grid!r}")
    return g


def coords(index: sympy.Expr, grid: tuple[int, ...]) -> list[sympy.Expr]:
    """Row-major coordinates of a flat token index on ``grid``."""
    out = []
    for axis, n in enumerate(grid):
        inner = math.prod(grid[axis + 1 :])
        c = sympy.floor(index / inner) if inner > 1 else index
        out.append(sympy.Mod(c, n) if axis > 0 else c)
    return out


def on_grid(expr: sympy.Basic, grid: tuple[int, ...], label: str) -> Expr:
    """``expr`` as a mask that requires both lengths to equal the grid's size."""
    n = math.prod(grid)
    need = (
        sympy.And(sympy.Eq(X.Sq, n), sympy.Eq(X.Skv, n)),
        f"{label} needs q and kv lengths equal to the grid's {n} tokens",
    )
    return Expr(expr, Meta(requires=(need,)))


def block_local(grid: int | Sequence[int], block: int | Sequence[int], halo: int | Sequence[int] = 0) -> Expr:
    """Window/block attention on an N-d grid (MaxViT block, HaloNet with ``halo``).

    Per axis with block P and halo r: ``floor(x/P)*P - r <= y < (floor(x/P)+1)*P + r``.
    """
    g = grid_of(grid, "block_local")
    blocks, halos = per_axis(g, block, "block_local(block)"), per_axis(g, halo, "block_local(halo)")
    if any(p < 1 for p in blocks) or any(r < 0 for r in halos):
        raise SpecError(f"block_local: blocks must be >= 1 and halos >= 0, got {blocks}, {halos}")
    parts = []
    for x, y, p, r in zip(coords(X.q, g), coords(X.kv, g), blocks, halos, strict=True):
        start = sympy.floor(x / p) * p
        if r == 0:
            parts.append(sympy.Eq(sympy.floor(x / p), sympy.floor(y / p)))
        else:
            parts.append(sympy.And(sympy.Le(start - r, y), sympy.Lt(y, start + p + r)))
    return on_grid(sympy.And(*parts), g, "block_local")


def grid_attention(grid: int | Sequence[int], groups: int | Sequence[int]) -> Expr:
    """MaxViT grid (dilated global) attention: ``x mod (n/G) == y mod (n/G)`` on every axis."""
    g = grid_of(grid, "grid_attention")
    gs = per_axis(g, groups, "grid_attention(groups)")
    parts = []
    for x, y, n, G in zip(coords(X.q, g), coords(X.kv, g), g, gs, strict=True):
        if G < 1 or n % G:
            raise SpecError(f"grid_attention: axis of length {n} is not divisible by groups={G}")
        parts.append(sympy.Eq(sympy.Mod(x, n // G), sympy.Mod(y, n // G)))
    return on_grid(sympy.And(*parts), g, "grid_attention")
