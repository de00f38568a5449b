"""Neighborhood attention (NATTEN rules) on 1-3 d token grids, with dilation, stride and causality.

Per axis with length n, kernel k, dilation d, stride s, query coordinate x and key coordinate y:

* dilation groups: x and y must agree modulo d; inside a group, x' = x // d, y' = y // d and the
  group length is n' = ceil((n - x mod d) / d).
* non-causal: L = min((x' // s) * s + s // 2, n' - 1); the window centre c = clamp(L, k // 2, n' - 1 - r)
  with r = k // 2 + k % 2 - 1, and the key is visible iff c - k // 2 <= y' <= c + r. The window
  shifts at the borders, so every query sees exactly k keys per axis.
* causal: L = min((x' // s) * s + s - 1, n' - 1); visible iff y' <= x' and L - y' < k.

The mask is the AND over axes. stride 1 is plain NA; stride k is blocked attention (GNA).
"""

from __future__ import annotations

from collections.abc import Sequence

import sympy

from attncc.dsl import Expr
from attncc.errors import SpecError
from attncc.ir import exprs as X
from attncc.masks import coords, grid_of, on_grid, per_axis


def _axis(x: sympy.Expr, y: sympy.Expr, n: int, k: int, d: int, s: int, causal: bool) -> sympy.Basic:
    parts: list[sympy.Basic] = []
    if d > 1:
        parts.append(sympy.Eq(sympy.Mod(x, d), sympy.Mod(y, d)))
        xd, yd = sympy.floor(x / d), sympy.floor(y / d)
        group = sympy.floor((n - sympy.Mod(x, d) + d - 1) / d)
    else:
        xd, yd, group = x, y, sympy.Integer(n)
    base = sympy.floor(xd / s) * s if s > 1 else xd
    if causal:
        last = sympy.Min(base + s - 1, group - 1)
        parts += [sympy.Le(yd, xd), sympy.Lt(last - yd, k)]
    else:
        r = k // 2 + k % 2 - 1
        last = sympy.Min(base + s // 2, group - 1)
        centre = sympy.Max(k // 2, sympy.Min(last, group - 1 - r))
        parts += [sympy.Le(centre - k // 2, yd), sympy.Le(yd, centre + r)]
    return sympy.And(*parts)


def neighborhood(
    grid: int | Sequence[int],
    kernel: int | Sequence[int],
    dilation: int | Sequence[int] = 1,
    causal: bool | Sequence[bool] = False,
    stride: int | Sequence[int] = 1,
) -> Expr:
    """Neighborhood attention on a 1-3 d grid of ``prod(grid)`` tokens (row-major), as NATTEN.

    >>> import attncc as ac
    >>> m = ac.neighborhood(grid=(8, 8), kernel=(3, 3))   # each token sees a 3x3 neighborhood
    """
    g = grid_of(grid, "neighborhood")
    ks = per_axis(g, kernel, "neighborhood(kernel)")
    ds = per_axis(g, dilation, "neighborhood(dilation)")
    ss = per_axis(g, stride, "neighborhood(stride)")
    cs = [bool(c) for c in ([causal] * len(g) if isinstance(causal, bool) else list(causal))]
    if len(cs) != len(g):
        raise SpecError(f"neighborhood(causal) has {len(cs)} entries but the grid has {len(g)} axes")
    parts = []
    for axis, (x, y) in enumerate(zip(coords(X.q, g), coords(X.kv, g), strict=True)):
        n, k, d, s = g[axis], ks[axis], ds[axis], ss[axis]
        if k < 1 or d < 1 or s < 1:
            raise SpecError(f"neighborhood axis {axis}: kernel, dilation, stride must be >= 1, got {k}, {d}, {s}")
        if k * d > n:
            raise SpecError(
                f"neighborhood axis {axis}: kernel {k} x dilation {d} = {k * d} exceeds the axis length {n}; "
                "lower the kernel or dilation"
            )
        if s > k:
            raise SpecError(f"neighborhood axis {axis}: stride {s} must not exceed the kernel {k}")
        parts.append(_axis(x, y, n, k, d, s, cs[axis]))
    return on_grid(sympy.And(*parts), g, "neighborhood")
