"""Call-time interval bounds with exactness, over the one interval evaluator (:mod:`attncc.ir.boxeval`).

``bounds(expr, env)`` returns an :class:`Interval` that contains every value ``expr`` takes when
each symbol ranges over its interval in ``env`` (and each runtime tensor over its value range in
``tables``, unknown tensors being unbounded). The result is *sound*, not always tight: it is tight
(``exact=True``) when every symbol occurs at most once and only monotone operations combine them,
which covers the affine index expressions of every builtin.

>>> from attncc.ir.exprs import q, kv
>>> bounds(q - kv + 3, {q: Interval(0, 9), kv: Interval(0, 9)})
Interval(lo=-6.0, hi=12.0, exact=True)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import sympy

from attncc.errors import UnsupportedError
from attncc.ir.boxeval import Box, interval

INF = math.inf


@dataclass(frozen=True, slots=True)
class Interval:
    """Closed interval [lo, hi]; ``exact`` says both ends are attained."""

    lo: float
    hi: float
    exact: bool = True

    def __post_init__(self) -> None:
        if self.lo > self.hi:
            raise ValueError(f"empty interval [{self.lo}, {self.hi}]")

    def inexact(self) -> Interval:
        return Interval(self.lo, self.hi, False)

    def union(self, other: Interval) -> Interval:
        return Interval(min(self.lo, other.lo), max(self.hi, other.hi), False)


TOP = Interval(-INF, INF, False)
BOOL = Interval(0, 1, False)
Env = Mapping[sympy.Basic, Interval]


TableRanges = Mapping[str, Interval]


class _Fixed:
    """A tensor known only by the range of its values (what :class:`boxeval.TensorRanges` answers)."""

    def __init__(self, r: Interval) -> None:
        self.box = Box(np.asarray(r.lo, dtype=np.float64), np.asarray(r.hi, dtype=np.float64))

    def query(self, boxes: list[Box]) -> Box:
        return self.box


def _value(expr: sympy.Basic, env: Env, tables: TableRanges) -> tuple[float, float]:
    """[lo, hi] of ``expr`` by the one interval evaluator (:func:`attncc.ir.boxeval.interval`); unknown
    symbols and tensors are unbounded, and what the evaluator has no rule for is unbounded too."""
    boxes = {s: Box(np.asarray(i.lo, dtype=np.float64), np.asarray(i.hi, dtype=np.float64)) for s, i in env.items()}
    ranges: dict[str, Any] = {}
    for acc in expr.atoms(sympy.Indexed):
        ranges[str(acc.base)] = _Fixed(tables.get(str(acc.base), TOP))
    labels = {acc.base.label for acc in expr.atoms(sympy.Indexed)}
    for sym in expr.free_symbols - set(env) - labels:
        boxes[sym] = Box(np.asarray(-INF), np.asarray(INF))
    try:
        box = interval(expr, boxes, ranges)
    except UnsupportedError:
        return -INF, INF
    lo, hi = float(np.min(box.lo)), float(np.max(box.hi))
    return (-INF, INF) if math.isnan(lo) or math.isnan(hi) else (lo, hi)


def bounds(expr: sympy.Basic, env: Env, tables: TableRanges | None = None) -> Interval:
    """A sound interval for ``expr``; booleans are evaluated as 0/1."""
    tables = tables or {}
    if isinstance(expr, sympy.logic.boolalg.Boolean) and not isinstance(expr, sympy.Symbol):
        return BOOL
    lo, hi = _value(expr, env, tables)
    if lo == -INF and hi == INF:
        return TOP
    return Interval(lo, hi, _exact(expr, env, tables) and not _repeats(expr))


def _constant(expr: sympy.Basic, env: Env, tables: TableRanges) -> bool:
    lo, hi = _value(expr, env, tables)
    return lo == hi


def _exact(e: sympy.Basic, env: Env, t: TableRanges) -> bool:
    """Whether both ends of ``e``'s interval are attained: each part exact and combined monotonically (a
    product with at most one varying factor, a modulo that does not wrap, one piecewise branch, ...)."""
    if isinstance(e, sympy.Integer | sympy.Rational | sympy.Float):
        return True
    if e in env:
        return env[e].exact
    if isinstance(e, sympy.Indexed):
        return t.get(str(e.base), TOP).exact
    parts = lambda: all(_exact(a, env, t) for a in e.args)
    if isinstance(e, sympy.Add | sympy.Min | sympy.Max | sympy.floor | sympy.ceiling | sympy.Abs):
        return parts()
    if isinstance(e, sympy.tanh | sympy.exp | sympy.sign):
        return parts()
    if isinstance(e, sympy.log):
        return _value(e.args[0], env, t)[0] >= 0 and parts()
    if isinstance(e, sympy.Mul):
        return parts() and sum(not _constant(a, env, t) for a in e.args) <= 1
    if isinstance(e, sympy.Mod):
        (alo, ahi), (mlo, mhi) = _value(e.args[0], env, t), _value(e.args[1], env, t)
        wraps = not (mlo == mhi and 0 < mlo < INF and alo > -INF and ahi < INF)
        return not wraps and math.floor(alo / mlo) == math.floor(ahi / mlo) and _exact(e.args[0], env, t)
    if isinstance(e, sympy.Pow):
        blo, bhi = _value(e.base, env, t)
        if blo == bhi and blo > 0:
            return _exact(e.exp, env, t)
        if e.exp.is_Integer:
            n = int(e.exp)
            return ((n >= 0 and blo >= 0) or (n < 0 and blo > 0)) and _exact(e.base, env, t)
        return False
    if isinstance(e, sympy.Piecewise):
        return len(e.args) == 1 and _exact(e.args[0][0], env, t)
    return False  # symbols without a range, sin, cos, anything else: claim only soundness


def _repeats(expr: sympy.Basic) -> bool:
    seen: set[sympy.Basic] = set()
    for node in sympy.preorder_traversal(expr):
        if isinstance(node, sympy.Symbol):
            if node in seen:
                return True
            seen.add(node)
    return False
