"""Sound interval arithmetic over attncc expressions.

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
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import sympy

from attncc.ir.dispatch import handler_for

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


def _mul(a: Interval, b: Interval) -> Interval:
    prods = []
    for x in (a.lo, a.hi):
        for y in (b.lo, b.hi):
            prods.append(0.0 if (x == 0 or y == 0) else x * y)
    constant = a.lo == a.hi or b.lo == b.hi
    return Interval(min(prods), max(prods), a.exact and b.exact and constant)


def _add(items: list[Interval]) -> Interval:
    lo = sum(i.lo for i in items)
    hi = sum(i.hi for i in items)
    if math.isnan(lo) or math.isnan(hi):
        return TOP
    return Interval(lo, hi, all(i.exact for i in items))


def _floor(a: Interval) -> Interval:
    return Interval(_fl(a.lo), _fl(a.hi), a.exact)


def _fl(x: float) -> float:
    return x if math.isinf(x) else float(math.floor(x))


def _ce(x: float) -> float:
    return x if math.isinf(x) else float(math.ceil(x))


def _mod(a: Interval, m: Interval) -> Interval:
    if m.lo != m.hi or m.lo <= 0 or math.isinf(m.lo):
        return TOP if m.lo <= 0 else Interval(0, m.hi, False)
    n = m.lo
    if not math.isinf(a.lo) and not math.isinf(a.hi) and _fl(a.lo / n) == _fl(a.hi / n):
        return Interval(a.lo - n * _fl(a.lo / n), a.hi - n * _fl(a.lo / n), a.exact)
    return Interval(0, n - 1 if float(n).is_integer() else n, False)


def _pow(base: Interval, exp: sympy.Expr, env: Env, tables: TableRanges) -> Interval:
    e = bounds(exp, env, tables)
    if base.lo == base.hi and base.lo > 0:  # c ** x, monotone in x
        c = base.lo
        vals = [c**x if not math.isinf(x) else (INF if (x > 0) == (c > 1) else 0.0) for x in (e.lo, e.hi)]
        return Interval(min(vals), max(vals), e.exact)
    if e.lo == e.hi and float(e.lo).is_integer():
        n = int(e.lo)
        if n >= 0 and base.lo >= 0:
            return Interval(base.lo**n, base.hi**n, base.exact)
        if n >= 0 and n % 2 == 0:
            hi = max(base.lo**n, base.hi**n)
            lo = 0.0 if base.lo <= 0 <= base.hi else min(base.lo**n, base.hi**n)
            return Interval(lo, hi, False)
        if n < 0 and base.lo > 0:
            return Interval(base.hi**n, base.lo**n, base.exact)
    return TOP


TableRanges = Mapping[str, Interval]
_MONOTONE: dict[type, Callable[[float], float]] = {
    sympy.tanh: math.tanh,
    sympy.exp: lambda x: math.exp(x) if x < 700 else INF,
    sympy.sign: lambda x: float((x > 0) - (x < 0)),
    sympy.log: lambda x: math.log(x) if x > 0 else -INF,  # only for x >= 0 (see _h_log)
}


def bounds(expr: sympy.Basic, env: Env, tables: TableRanges | None = None) -> Interval:
    """A sound interval for ``expr``; booleans are evaluated as 0/1."""
    tables = tables or {}
    if isinstance(expr, sympy.Integer | sympy.Rational | sympy.Float):
        v = float(expr)
        return Interval(v, v)
    if expr in env:
        return env[expr]
    if isinstance(expr, sympy.Symbol):
        return TOP
    if isinstance(expr, sympy.Indexed):
        return tables.get(str(expr.base), TOP)
    handler = handler_for(_HANDLERS, expr)
    if handler is None:
        return TOP
    result = handler(expr, env, tables)
    if result.exact and _repeats(expr):
        return result.inexact()
    return result


def _repeats(expr: sympy.Basic) -> bool:
    seen: set[sympy.Basic] = set()
    for node in sympy.preorder_traversal(expr):
        if isinstance(node, sympy.Symbol):
            if node in seen:
                return True
            seen.add(node)
    return False


def _h_add(e: sympy.Add, env: Env, t: TableRanges) -> Interval:
    return _add([bounds(a, env, t) for a in e.args])


def _h_mul(e: sympy.Mul, env: Env, t: TableRanges) -> Interval:
    acc = Interval(1, 1)
    for a in e.args:
        acc = _mul(acc, bounds(a, env, t))
    return acc


def _h_floor(e: sympy.floor, env: Env, t: TableRanges) -> Interval:
    return _floor(bounds(e.args[0], env, t))


def _h_ceiling(e: sympy.ceiling, env: Env, t: TableRanges) -> Interval:
    a = bounds(e.args[0], env, t)
    return Interval(_ce(a.lo), _ce(a.hi), a.exact)


def _h_mod(e: sympy.Mod, env: Env, t: TableRanges) -> Interval:
    return _mod(bounds(e.args[0], env, t), bounds(e.args[1], env, t))


def _h_minmax(e: sympy.Min | sympy.Max, env: Env, t: TableRanges) -> Interval:
    parts = [bounds(a, env, t) for a in e.args]
    pick = min if isinstance(e, sympy.Min) else max
    return Interval(pick(p.lo for p in parts), pick(p.hi for p in parts), all(p.exact for p in parts))


def _h_abs(e: sympy.Abs, env: Env, t: TableRanges) -> Interval:
    a = bounds(e.args[0], env, t)
    if a.lo >= 0:
        return a
    if a.hi <= 0:
        return Interval(-a.hi, -a.lo, a.exact)
    return Interval(0, max(-a.lo, a.hi), a.exact)


def _h_pow(e: sympy.Pow, env: Env, t: TableRanges) -> Interval:
    return _pow(bounds(e.base, env, t), e.exp, env, t)


def _h_piecewise(e: sympy.Piecewise, env: Env, t: TableRanges) -> Interval:
    parts = [bounds(expr, env, t) for expr, _cond in e.args]
    acc = parts[0]
    for p in parts[1:]:
        acc = acc.union(p)
    return acc.inexact() if len(parts) > 1 else acc


def _h_monotone(e: sympy.Function, env: Env, t: TableRanges) -> Interval:
    a = bounds(e.args[0], env, t)
    f = _MONOTONE[type(e)]
    return Interval(f(a.lo), f(a.hi), a.exact)


def _h_log(e: sympy.log, env: Env, t: TableRanges) -> Interval:
    a = bounds(e.args[0], env, t)
    return TOP if a.lo < 0 else _h_monotone(e, env, t)  # NaN below 0 lies in no interval: claim nothing


def _h_bool(e: sympy.Basic, env: Env, t: TableRanges) -> Interval:
    return BOOL


_HANDLERS: dict[type, Callable[..., Interval]] = {
    sympy.Add: _h_add,
    sympy.Mul: _h_mul,
    sympy.floor: _h_floor,
    sympy.ceiling: _h_ceiling,
    sympy.Mod: _h_mod,
    sympy.Min: _h_minmax,
    sympy.Max: _h_minmax,
    sympy.Abs: _h_abs,
    sympy.Pow: _h_pow,
    sympy.Piecewise: _h_piecewise,
    sympy.tanh: _h_monotone,
    sympy.exp: _h_monotone,
    sympy.sign: _h_monotone,
    sympy.log: _h_log,
    sympy.sin: lambda e, env, t: Interval(-1, 1, False),
    sympy.cos: lambda e, env, t: Interval(-1, 1, False),
    sympy.logic.boolalg.Boolean: _h_bool,
}
