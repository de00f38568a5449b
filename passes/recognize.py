"""Recognize builtin mask forms in a normalized mask, for readable IR and for later passes.

>>> import sympy
>>> from attncc.ir.exprs import q, kv
>>> form_of(sympy.And(sympy.Le(kv, q), sympy.Le(q, kv + 255)))
'sliding_window(255, 0)'
"""

from __future__ import annotations

import sympy

from attncc.analysis.bands import relation_band
from attncc.ir.exprs import InBlocks, Skv, Sq, q


def _band(rel: sympy.Basic) -> tuple[str, sympy.Expr] | None:
    """``kv - q <= c`` -> ("hi", c); ``q - kv <= c`` -> ("lo", c); ``kv <= c - 1`` -> ("sink", c): the band
    :func:`attncc.analysis.bands.relation_band` finds (no tables), named."""
    band = relation_band(rel)
    if band is None:
        return None
    (lo,), (hi,) = band.lows, band.highs
    if hi == Skv - 1 and lo.coeff(q) == 1:
        return "lo", q - lo
    if lo == 0 and hi.coeff(q) == 1:
        return "hi", hi - q
    if lo == 0 and hi.coeff(q) == 0 and hi.is_number:
        return "sink", hi + 1
    return None


def _atom(expr: sympy.Basic) -> str | None:
    band = _band(expr)
    if band is not None:
        kind, c = band
        if kind == "hi" and c == 0:
            return "causal"
        if kind == "hi" and sympy.simplify(c - (Skv - Sq)) == 0:
            return "causal(bottom_right)"
        if kind == "sink":
            return f"sinks({c})"
        return None
    if isinstance(expr, sympy.Eq) and all(isinstance(s, sympy.Indexed) for s in expr.args):
        return f"document({expr.args[0].base})"
    if isinstance(expr, sympy.Ne) and isinstance(expr.args[0], sympy.Indexed) and expr.args[1] == 0:
        return f"block_layout({expr.args[0].base})"
    if isinstance(expr, InBlocks) and expr.blocks is not None:
        return f"block_indices({expr.tensor}, {expr.blocks})"
    return None


def _window(expr: sympy.And) -> tuple[str, list[sympy.Basic]]:
    """Pull a q/kv band out of a conjunction: sliding_window(left, right)."""
    lo = hi = None
    rest: list[sympy.Basic] = []
    for a in expr.args:
        band = _band(a)
        if band and band[0] == "lo" and band[1].is_number and lo is None:
            lo = band[1]
        elif band and band[0] == "hi" and band[1].is_number and hi is None:
            hi = band[1]
        else:
            rest.append(a)
    if lo is not None and hi is not None and lo >= 0 and hi >= 0:
        return f"sliding_window({lo}, {hi})", rest
    return "", list(expr.args)


def form_of(expr: sympy.Basic) -> str:
    """A builtin-style description of ``expr``, or "" when some part is not a builtin form."""
    if expr == sympy.true:
        return "full"
    if (atom := _atom(expr)) is not None:
        return atom
    if isinstance(expr, sympy.And):
        head, rest = _window(expr)
        parts = ([head] if head else []) + [form_of(a) for a in rest]
        return "" if "" in parts else " & ".join(sorted(parts))
    if isinstance(expr, sympy.Or):
        parts = sorted(form_of(a) for a in expr.args)
        if "" in parts:
            return ""
        sinks = [p for p in parts if p.startswith("sinks(")]
        if parts == sorted(["causal", *sinks]) and len(sinks) == 1:
            return f"prefix_lm({sinks[0][6:-1]})"
        return " | ".join(parts)
    return ""
