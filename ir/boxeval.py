"""Vectorized three-valued evaluation of a mask over many boxes at once.

Each box is a range of (b, h, q, kv) values, given as numpy arrays of lower and upper bounds
that broadcast together (e.g. q bounds of shape [nq, 1] and kv bounds of shape [1, nkv] for a
whole tile grid). :func:`evaluate` returns two boolean arrays:

* ``may_true``  - some point of the box may be visible (False proves the box empty);
* ``may_false`` - some point of the box may be masked (False proves the box full).

Both are *sound* over-approximations computed with interval arithmetic; on a box that is a
single point they are exact. Runtime tensors are bounded with range-min/max queries over their
values (:class:`TensorRanges`), so a document mask costs O(S log S) to prepare and O(1) per box.

>>> import numpy as np, sympy
>>> from attncc.ir.exprs import q, kv
>>> env = {q: Box(np.array([[0], [64]]), np.array([[63], [127]])), kv: Box(np.array([[0, 64]]), np.array([[63, 127]]))}
>>> t, f = evaluate(sympy.Le(kv, q), env)
>>> t.astype(int).tolist(), f.astype(int).tolist()      # diagonal tiles partial, upper empty, lower full
([[1, 0], [1, 1]], [[1, 1], [0, 1]])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import sympy

from attncc.errors import UnsupportedError
from attncc.ir.exprs import InBlocks, expr_str, is_boolean

Array = np.ndarray


@dataclass(frozen=True)
class Box:
    """Elementwise intervals [lo, hi] (float64 arrays that broadcast)."""

    lo: Array
    hi: Array

    @staticmethod
    def point(x: float | Array) -> Box:
        a = np.asarray(x, dtype=np.float64)
        return Box(a, a)


class TensorRanges:
    """Range min/max of a runtime tensor's values over index boxes, by sparse tables.

    1-d tensors, and 2-d ones up to ``MAX_2D`` table entries, answer any box exactly (O(1) per
    box after an O(S log S) build). Otherwise a box that is a single index is exact and a wider
    one gets the whole tensor's range (sound; refinement narrows the boxes).
    """

    MAX_2D = 1 << 22

    def __init__(self, values: Array) -> None:
        self.values = np.asarray(values, dtype=np.float64)
        self.vmin, self.vmax = float(self.values.min()), float(self.values.max())
        self._tables: dict[tuple[int, ...], tuple[Array, Array]] = {}
        shape = self.values.shape
        levels = [max(1, int(np.log2(n)) + 1) for n in shape]
        self._stack: tuple[Array, Array] | None = None
        if self.values.ndim == 1:
            self._build(levels)
            keys = sorted(self._tables)
            lo, hi = np.full((len(keys), shape[0]), np.inf), np.full((len(keys), shape[0]), -np.inf)
            for row, key in enumerate(keys):  # each level's table, padded to the tensor's length
                level_lo, level_hi = self._tables[key]
                lo[row, : level_lo.shape[0]], hi[row, : level_hi.shape[0]] = level_lo, level_hi
            self._stack = (lo, hi)
        elif self.values.ndim == 2 and self.values.size * levels[0] * levels[1] <= self.MAX_2D:
            self._build(levels)

    def _build(self, levels: list[int]) -> None:
        base = (self.values, self.values)
        self._tables[(0,) * self.values.ndim] = base
        for axis in range(self.values.ndim):
            for key in list(self._tables):
                lo, hi = self._tables[key]
                for lv in range(1, levels[axis]):
                    span = 1 << (lv - 1)
                    n = lo.shape[axis] - span
                    if n <= 0:
                        break
                    a = [slice(None)] * lo.ndim
                    c = [slice(None)] * lo.ndim
                    a[axis], c[axis] = slice(0, n), slice(span, span + n)
                    lo, hi = np.minimum(lo[tuple(a)], lo[tuple(c)]), np.maximum(hi[tuple(a)], hi[tuple(c)])
                    new_key = list(key)
                    new_key[axis] = lv
                    self._tables[tuple(new_key)] = (lo, hi)

    def query(self, index: list[Box]) -> Box:
        """Bounds of the values over each box; unbounded where an index may leave the tensor, so
        such tiles stay partial and the kernel's own bounds check reports the bad read."""
        box = self._query(index)
        outside = np.logical_or.reduce(
            [
                np.broadcast_to((b.lo < 0) | (b.hi > n - 1), box.lo.shape)
                for b, n in zip(index, self.values.shape, strict=True)
            ]
        )
        if outside.any():
            return Box(np.where(outside, -np.inf, box.lo), np.where(outside, np.inf, box.hi))
        return box

    def _query(self, index: list[Box]) -> Box:
        shape = self.values.shape
        los = [np.clip(b.lo, 0, n - 1).astype(np.int64) for b, n in zip(index, shape, strict=True)]
        his = [np.clip(b.hi, 0, n - 1).astype(np.int64) for b, n in zip(index, shape, strict=True)]
        parts = np.broadcast_arrays(*los, *his)
        los, his = list(parts[: len(shape)]), list(parts[len(shape) :])
        if self._stack is not None:  # 1-d: one gather per end, no loops
            lo, hi = los[0], his[0]
            level = np.floor(np.log2(np.maximum(hi - lo + 1, 1))).astype(np.int64)
            other = hi - np.left_shift(1, level) + 1
            mins, maxs = self._stack
            return Box(np.minimum(mins[level, lo], mins[level, other]), np.maximum(maxs[level, lo], maxs[level, other]))
        if self._tables:
            return self._sparse_query(los, his)
        point = np.logical_and.reduce([lo == hi for lo, hi in zip(los, his, strict=True)])
        vals = self.values[tuple(los)]
        return Box(np.where(point, vals, self.vmin), np.where(point, vals, self.vmax))

    def _sparse_query(self, los: list[Array], his: list[Array]) -> Box:
        levels = [
            np.floor(np.log2(np.maximum(hi - lo + 1, 1))).astype(np.int64) for lo, hi in zip(los, his, strict=True)
        ]
        out_lo, out_hi = np.empty(los[0].shape), np.empty(los[0].shape)
        keys = np.stack(levels, -1).reshape(-1, len(levels))
        flat_levels = [lv.reshape(-1) for lv in levels]
        flat_lo, flat_hi = [x.reshape(-1) for x in los], [x.reshape(-1) for x in his]
        res_lo, res_hi = out_lo.reshape(-1), out_hi.reshape(-1)
        for key in np.unique(keys, axis=0):
            sel = np.logical_and.reduce([fl == k for fl, k in zip(flat_levels, key, strict=True)])
            tlo, thi = self._tables[tuple(int(k) for k in key)]
            starts = [fl[sel] for fl in flat_lo]
            ends = [fh[sel] - (1 << int(k)) + 1 for fh, k in zip(flat_hi, key, strict=True)]
            corners = np.array(np.meshgrid(*[[0, 1]] * len(key))).reshape(len(key), -1).T
            mins, maxs = [], []
            for corner in corners:
                idx = tuple(e if c else s for s, e, c in zip(starts, ends, corner, strict=True))
                mins.append(tlo[idx])
                maxs.append(thi[idx])
            res_lo[sel] = np.minimum.reduce(mins)
            res_hi[sel] = np.maximum.reduce(maxs)
        return Box(out_lo, out_hi)


Env = Mapping[sympy.Basic, Box]
Tables = Mapping[str, TensorRanges]


def interval(expr: sympy.Basic, env: Env, tables: Tables) -> Box:
    """Sound elementwise interval of a numeric expression."""
    if expr in env:
        return env[expr]
    if expr.is_number:
        return Box.point(float(expr))
    if isinstance(expr, sympy.Indexed):
        name = str(expr.base)
        if name not in tables:
            raise UnsupportedError(f"tensor {name!r} has no values to bound `{expr_str(expr)}`")
        return tables[name].query([interval(i, env, tables) for i in expr.indices])
    handler = _NUMERIC.get(type(expr))
    if handler is None:
        raise UnsupportedError(f"no interval rule for {type(expr).__name__} in `{expr_str(expr)}`")
    return handler(expr, env, tables)


def _add(e: sympy.Add, env: Env, t: Tables) -> Box:
    parts = [interval(a, env, t) for a in e.args]
    with np.errstate(invalid="ignore"):  # -inf + inf: the sum is unbounded on that side
        lo, hi = sum(p.lo for p in parts), sum(p.hi for p in parts)
    lo = np.nan_to_num(lo, nan=-np.inf, posinf=np.inf, neginf=-np.inf)  # type: ignore[arg-type]
    return Box(lo, np.nan_to_num(hi, nan=np.inf, posinf=np.inf, neginf=-np.inf))  # type: ignore[arg-type]


def _mul(e: sympy.Mul, env: Env, t: Tables) -> Box:
    first = e.args[0]
    if len(e.args) == 2 and first.is_number and first.is_finite and first != 0:  # c * x (and -x): the general rule's
        c, b = float(first), interval(e.args[1], env, t)  # floats, without the products it would discard
        return Box(c * b.lo, c * b.hi) if c > 0 else Box(c * b.hi, c * b.lo)
    acc = Box.point(1.0)
    for a in e.args:
        b = interval(a, env, t)
        ends = (acc.lo, acc.hi)
        with np.errstate(invalid="ignore"):  # 0 * inf bounds a product of finite values: it is 0, not NaN
            cands = [np.nan_to_num(x * y, nan=0.0, posinf=np.inf, neginf=-np.inf) for x in ends for y in (b.lo, b.hi)]
        acc = Box(np.minimum.reduce(np.broadcast_arrays(*cands)), np.maximum.reduce(np.broadcast_arrays(*cands)))
    return acc


def _floor(e: sympy.floor, env: Env, t: Tables) -> Box:
    a = interval(e.args[0], env, t)
    return Box(np.floor(a.lo + 1e-9), np.floor(a.hi + 1e-9))


def _ceiling(e: sympy.ceiling, env: Env, t: Tables) -> Box:
    a = interval(e.args[0], env, t)
    return Box(np.ceil(a.lo - 1e-9), np.ceil(a.hi - 1e-9))


def _mod(e: sympy.Mod, env: Env, t: Tables) -> Box:
    a, m = interval(e.args[0], env, t), interval(e.args[1], env, t)
    if not (np.all(m.lo == m.hi) and np.all(m.lo > 0)):
        raise UnsupportedError(f"Mod by a non-constant or non-positive value in `{expr_str(e)}`")
    n = m.lo
    with np.errstate(invalid="ignore"):  # an unbounded side (a tensor read) gives inf - inf in the unused branch
        same = np.floor(a.lo / n) == np.floor(a.hi / n)
        lo = np.where(same, a.lo - n * np.floor(a.lo / n), 0.0)
        hi = np.where(same, a.hi - n * np.floor(a.lo / n), n - 1)
    return Box(lo, hi)


def _minmax(e: sympy.Min | sympy.Max, env: Env, t: Tables) -> Box:
    parts = [interval(a, env, t) for a in e.args]
    red = np.minimum if isinstance(e, sympy.Min) else np.maximum
    return Box(
        red.reduce(np.broadcast_arrays(*(p.lo for p in parts))), red.reduce(np.broadcast_arrays(*(p.hi for p in parts)))
    )


def _abs(e: sympy.Abs, env: Env, t: Tables) -> Box:
    a = interval(e.args[0], env, t)
    lo = np.where(a.lo >= 0, a.lo, np.where(a.hi <= 0, -a.hi, 0.0))
    return Box(lo, np.maximum(np.abs(a.lo), np.abs(a.hi)))


def _piecewise(e: sympy.Piecewise, env: Env, t: Tables) -> Box:
    lo = hi = None
    for value, cond in e.args:
        v = interval(value, env, t)
        may, _ = evaluate(cond, env, t)
        vlo, vhi = np.where(may, v.lo, np.inf), np.where(may, v.hi, -np.inf)
        lo = vlo if lo is None else np.minimum(lo, vlo)
        hi = vhi if hi is None else np.maximum(hi, vhi)
    assert lo is not None and hi is not None
    return Box(lo, hi)


def _pow(e: sympy.Pow, env: Env, t: Tables) -> Box:
    base, ex = interval(e.base, env, t), interval(e.exp, env, t)
    if np.all(base.lo == base.hi) and np.all(base.lo > 0):
        a, c = base.lo**ex.lo, base.lo**ex.hi
        return Box(np.minimum(a, c), np.maximum(a, c))
    if e.exp.is_Integer:  # x**n: monotone pieces (even powers fold at 0; negative powers need 0 outside)
        n = int(e.exp)
        with np.errstate(divide="ignore", over="ignore"):
            a, c = base.lo.astype(float) ** n, base.hi.astype(float) ** n
        lo, hi = np.minimum(a, c), np.maximum(a, c)
        if n % 2 == 0 and n > 0:
            lo = np.where((base.lo <= 0) & (base.hi >= 0), 0.0, lo)
        if n < 0:
            spans_zero = (base.lo <= 0) & (base.hi >= 0)
            lo, hi = np.where(spans_zero, -np.inf, lo), np.where(spans_zero, np.inf, hi)
        return Box(lo, hi)
    if e.exp.is_number and e.exp.is_real:  # x**p, p not an integer: monotone for x >= 0, NaN below 0
        p = float(e.exp)
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            a, c = np.maximum(base.lo, 0.0) ** p, np.maximum(base.hi, 0.0) ** p
        maybe_nan = base.lo < 0 if p > 0 else base.lo <= 0
        return Box(np.where(maybe_nan, -np.inf, np.minimum(a, c)), np.where(maybe_nan, np.inf, np.maximum(a, c)))
    raise UnsupportedError(f"no interval rule for the power `{expr_str(e)}`")


def _log(e: sympy.log, env: Env, t: Tables) -> Box:
    """log is -inf at 0 and NaN below it: a box reaching below 0 is unbounded both ways (never a proof)."""
    a = interval(e.args[0], env, t)
    with np.errstate(divide="ignore", invalid="ignore"):
        lo, hi = np.log(np.maximum(a.lo, 0.0)), np.log(np.maximum(a.hi, 0.0))
    below = a.lo < 0
    return Box(np.where(below, -np.inf, lo), np.where(below, np.inf, hi))


def _monotone(fn: Callable[[Array], Array]) -> Callable[..., Box]:
    def rule(e: sympy.Function, env: Env, t: Tables) -> Box:
        a = interval(e.args[0], env, t)
        return Box(fn(a.lo), fn(a.hi))

    return rule


_NUMERIC: dict[type, Callable[..., Box]] = {
    sympy.Add: _add,
    sympy.Mul: _mul,
    sympy.floor: _floor,
    sympy.ceiling: _ceiling,
    sympy.Mod: _mod,
    sympy.Min: _minmax,
    sympy.Max: _minmax,
    sympy.Abs: _abs,
    sympy.Piecewise: _piecewise,
    sympy.Pow: _pow,
    sympy.tanh: _monotone(np.tanh),
    sympy.exp: _monotone(np.exp),
    sympy.sign: _monotone(np.sign),
    sympy.log: _log,
    sympy.sin: lambda e, env, t: Box(np.array(-1.0), np.array(1.0)),
    sympy.cos: lambda e, env, t: Box(np.array(-1.0), np.array(1.0)),
}

Tri = tuple[Array, Array]  # (may_true, may_false)


def _rel(e: sympy.core.relational.Relational, env: Env, t: Tables) -> Tri:
    d = interval(e.lhs - e.rhs, env, t)
    if isinstance(e, sympy.LessThan):
        return d.lo <= 0, d.hi > 0
    if isinstance(e, sympy.StrictLessThan):
        return d.lo < 0, d.hi >= 0
    if isinstance(e, sympy.GreaterThan):
        return d.hi >= 0, d.lo < 0
    if isinstance(e, sympy.StrictGreaterThan):
        return d.hi > 0, d.lo <= 0
    eq_may = (d.lo <= 0) & (d.hi >= 0)
    eq_maynot = (d.lo != 0) | (d.hi != 0)
    return (eq_may, eq_maynot) if isinstance(e, sympy.Eq) else (eq_maynot, eq_may)


def evaluate(expr: sympy.Basic, env: Env, tables: Tables | None = None) -> Tri:
    """(may_true, may_false) of a boolean mask expression over the boxes in ``env``."""
    t = tables or {}
    if expr is sympy.true:
        return np.array(True), np.array(False)
    if expr is sympy.false:
        return np.array(False), np.array(True)
    if isinstance(expr, sympy.core.relational.Relational):
        return _rel(expr, env, t)
    if isinstance(expr, sympy.And | sympy.Or):
        parts = [evaluate(a, env, t) for a in expr.args]
        trues = np.broadcast_arrays(*(p[0] for p in parts))
        falses = np.broadcast_arrays(*(p[1] for p in parts))
        if isinstance(expr, sympy.And):
            return np.logical_and.reduce(trues), np.logical_or.reduce(falses)
        return np.logical_or.reduce(trues), np.logical_and.reduce(falses)
    if isinstance(expr, sympy.Not):
        may_t, may_f = evaluate(expr.args[0], env, t)
        return may_f, may_t
    if isinstance(expr, sympy.ITE):
        (ct, cf), (at, af), (bt, bf) = (evaluate(a, env, t) for a in expr.args)
        return (ct & at) | (cf & bt), (ct & af) | (cf & bf)
    if isinstance(expr, sympy.Xor):
        acc = evaluate(expr.args[0], env, t)
        for a in expr.args[1:]:
            nt, nf = evaluate(a, env, t)
            acc = ((acc[0] & nf) | (acc[1] & nt), (acc[0] & nt) | (acc[1] & nf))
        return acc
    if isinstance(expr, InBlocks):
        return _in_blocks(expr, env, t)
    if not is_boolean(expr):
        raise UnsupportedError(f"`{expr_str(expr)}` is not a condition")
    raise UnsupportedError(f"no three-valued rule for {type(expr).__name__} in `{expr_str(expr)}`")


def _in_blocks(e: InBlocks, env: Env, t: Tables) -> Tri:
    """Exact where the box is one (batch, head, query block, kv block): whether the list holds it; a box
    spanning several blocks is undecided (refinement splits it)."""
    if e.tensor not in t:
        raise UnsupportedError(f"block list {e.tensor!r} has no values to decide `{expr_str(e)}`")
    lists = t[e.tensor].values
    if lists.ndim != 4:
        raise UnsupportedError(f"block list {e.tensor!r} must be 4-d [B|1, H|1, query blocks, K], got {lists.shape}")
    parts = [interval(a, env, t) for a in e.args[1:]]
    exact = np.logical_and.reduce(np.broadcast_arrays(*(p.lo == p.hi for p in parts)))
    n_kv = int(max(lists.max(initial=-1), 0)) + 1
    grid = np.zeros((*lists.shape[:3], n_kv + 1), bool)  # membership, one column past the largest entry
    at = np.nonzero(lists >= 0)
    grid[(*at[:3], lists[at].astype(np.int64))] = True
    idx = []
    for dim, p in enumerate(parts):
        size = grid.shape[dim]
        i = np.clip(np.nan_to_num(p.lo, nan=0.0, posinf=size - 1, neginf=0), 0, size - 1).astype(np.int64)
        idx.append(np.zeros_like(i) if dim < 2 and size == 1 else i)
    hit = grid[tuple(np.broadcast_arrays(*idx))]
    return np.where(exact, hit, True), np.where(exact, ~hit, True)
