"""Bound expressions (and whole masks) evaluated at points, compiled once per expression into one numpy function.

A banded block map evaluates each band's bounds at query rows: points, not boxes. Interval arithmetic
(:func:`attncc.ir.boxeval.interval`) gives the right answer there too, but walks the sympy tree and
builds boxes on every call: about a millisecond per map, which a decoding step (a new key length each
token, so a new map) pays in full. :func:`at` compiles the bounds once into a Python function of their
symbols and then costs a few numpy operations.

It takes the same operations in the same order as ``interval(expr, env).lo`` on point boxes (sums left
to right, products from 1.0, floor and ceiling with the same 1e-9 nudge, Mod by a positive constant), so
wherever its result is finite it is those floats. It answers None, and the caller falls back to
``interval``, where the expression has a node it does not compile (tensor reads, Piecewise, powers,
transcendental functions, symbols other than the size and index symbols) or the result is not finite
(an infinite bound, or inf - inf where interval arithmetic widens instead).

:func:`mask_at` does the same for a whole boolean mask at (b, h, q, kv) points, tensor reads included (each read
must be an element of its tensor, else None): a decoding step's map read at every point
(:func:`attncc.analysis.tiling._from_points`).

>>> import numpy as np
>>> from attncc.ir import exprs as X
>>> at((X.Skv - X.Sq + X.q,), {X.q: np.arange(3.0), X.Sq: 3.0, X.Skv: 10.0}).tolist()
[7.0, 8.0, 9.0]
>>> at((sympy.floor(X.q / 3) * 3, X.q - 1), {X.q: np.array([5.0, 6.0])}, pick="min").tolist()
[3.0, 5.0]
>>> at((sympy.Indexed(sympy.IndexedBase("w"), X.h),), {X.h: np.array([0.0])}) is None  # a tensor read
True
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import numpy as np
import sympy

from attncc.ir import exprs as X

ARGS = (X.q, X.h, X.b, X.Sq, X.Skv, X.H, X.B)  # the symbols a compiled bound may read, in its parameter order
PointFn = Callable[..., np.ndarray]


def at(
    exprs: tuple[sympy.Basic, ...], values: Mapping[sympy.Symbol, np.ndarray | float], pick: str = "max"
) -> np.ndarray | None:
    """The largest (``pick="max"``) or smallest (``"min"``) of ``exprs`` at the points ``values`` (each symbol's
    value: an array, the arrays broadcast together), as float64; None where some expression is not compiled or the
    result is not finite everywhere (then ``interval`` answers)."""
    fn = compiled(exprs, pick)
    if fn is None:
        return None
    with np.errstate(invalid="ignore", over="ignore"):
        out = np.asarray(fn(*[values.get(s, np.nan) for s in ARGS]), dtype=np.float64)
    return out if np.isfinite(out).all() else None


@functools.lru_cache(maxsize=1024)
def compiled(exprs: tuple[sympy.Basic, ...], pick: str = "max") -> PointFn | None:
    """The Python function of ``ARGS`` computing the ``pick`` of ``exprs``, or None where a node has no point rule."""
    parts = [_emit(e) for e in exprs]
    if not parts or any(p is None for p in parts):
        return None
    body = _nested("np.maximum" if pick == "max" else "np.minimum", parts)  # type: ignore[arg-type]
    return _defined("point", ", ".join(str(s) for s in ARGS), body)


def _defined(name: str, params: str, body: str) -> PointFn:
    """The function ``name(params)`` returning ``body`` (source emitted from sympy nodes here), with its helpers."""
    space: dict[str, object] = {"np": np, "_floor": _floor, "_ceil": _ceil, "_mod": _mod, "_read": _read}
    exec(f"def {name}({params}):\n    return {body}\n", space)
    return space[name]  # type: ignore[return-value]


def _nested(fn: str, parts: list[str]) -> str:
    """``fn`` applied pairwise, left to right: ``fn(fn(a, b), c)``."""
    return functools.reduce(lambda acc, p: f"{fn}({acc}, {p})", parts[1:], parts[0])


def _floor(x: np.ndarray) -> np.ndarray:
    return np.floor(x + 1e-9)  # as boxeval: a quotient a hair under an integer is that integer


def _ceil(x: np.ndarray) -> np.ndarray:
    return np.ceil(x - 1e-9)


def _mod(a: np.ndarray, n: float) -> np.ndarray:
    return a - n * np.floor(a / n)


def _emit(e: sympy.Basic, names: tuple[sympy.Symbol, ...] = ARGS) -> str | None:
    """Python source of ``e`` over ``names``; None where some node has no point rule. Tensor reads (``T_``, the
    tensors by name, read through ``_read``) only where ``names`` has kv: a mask's, not a bound's."""
    if e in names:
        return str(e)
    if e.is_number:
        value = float(e)  # type: ignore[arg-type]
        return f"({value!r})" if np.isfinite(value) else None
    if isinstance(e, sympy.Indexed) and X.kv in names:
        index = [_emit(i, names) for i in e.indices]
        return None if None in index else f"_read(T_, {str(e.base)!r}, {', '.join(index)})"  # type: ignore[arg-type]
    parts = [_emit(a, names) for a in e.args]
    if any(p is None for p in parts):
        return None
    if isinstance(e, sympy.Add):
        return "(" + " + ".join(parts) + ")"  # type: ignore[arg-type]
    if isinstance(e, sympy.Mul):
        return "(1.0 * " + " * ".join(parts) + ")"  # type: ignore[arg-type]
    if isinstance(e, sympy.floor | sympy.ceiling | sympy.Abs):
        fn = {sympy.floor: "_floor", sympy.ceiling: "_ceil", sympy.Abs: "np.abs"}[type(e)]
        return f"{fn}({parts[0]})"
    if isinstance(e, sympy.Min | sympy.Max):
        return _nested("np.minimum" if isinstance(e, sympy.Min) else "np.maximum", parts)  # type: ignore[arg-type]
    if isinstance(e, sympy.Mod) and e.args[1].is_number and e.args[1] > 0:
        return f"_mod({parts[0]}, {parts[1]})"
    return None


# ---- masks at points --------------------------------------------------------------------------
MASK_ARGS = (X.q, X.kv, X.h, X.b, X.Sq, X.Skv, X.H, X.B)  # a compiled mask's parameters, then the tensors


class _Unread(Exception):
    """A point's read of a tensor is not one of its elements (out of range, or not at an integer)."""


def mask_at(
    mask: sympy.Basic, values: Mapping[sympy.Symbol, np.ndarray | float], tensors: Mapping[str, np.ndarray]
) -> np.ndarray | None:
    """The boolean ``mask`` at the points ``values`` (each of ``MASK_ARGS``' values; the arrays broadcast), reading
    ``tensors`` (float64 arrays by name); None where a node has no point rule or a read is not an element of its
    tensor (the caller then classifies). The same float64 operations as ``boxeval.evaluate`` on point boxes.

    >>> import attncc as ac
    >>> mask = ((ac.kv <= ac.tensor("pos")[0]) & (ac.tensor("am")[ac.b, ac.kv] != 0)).sym
    >>> at_points = {X.b: np.arange(2.0)[:, None], X.kv: np.arange(4.0)[None, :]}
    >>> mask_at(mask, at_points, {"pos": np.array([2.0]), "am": np.array([[1.0, 1, 1, 1], [0, 0, 1, 1]])}).tolist()
    [[True, True, True, False], [False, False, True, False]]
    >>> mask_at(mask, at_points, {"pos": np.array([2.0]), "am": np.ones((2, 3))}) is None  # kv 3 is not read
    True
    """
    fn = compiled_mask(mask)
    if fn is None:
        return None
    try:
        with np.errstate(invalid="ignore", over="ignore"):
            return np.asarray(fn(*[values.get(s, np.nan) for s in MASK_ARGS], tensors), dtype=bool)
    except _Unread:
        return None


@functools.lru_cache(maxsize=256)
def compiled_mask(mask: sympy.Basic) -> PointFn | None:
    """The Python function of ``MASK_ARGS`` and the tensors computing ``mask``, or None where a node has no rule."""
    body = _emit_bool(mask)
    if body is None:
        return None
    return _defined("mask", ", ".join(str(s) for s in (*MASK_ARGS, "T_")), body)


def _emit_bool(e: sympy.Basic) -> str | None:
    if e is sympy.true or e is sympy.false:
        return str(bool(e))
    if isinstance(e, sympy.And | sympy.Or | sympy.Not):
        parts = [_emit_bool(a) for a in e.args]
        if None in parts:
            return None
        if isinstance(e, sympy.Not):
            return f"np.logical_not({parts[0]})"
        return _nested("np.logical_and" if isinstance(e, sympy.And) else "np.logical_or", parts)  # type: ignore[arg-type]
    if isinstance(e, sympy.core.relational.Relational) and e.rel_op in ("<", "<=", ">", ">=", "==", "!="):
        a, b = (_emit(x, MASK_ARGS) for x in e.args)
        return None if a is None or b is None else f"({a} {e.rel_op} {b})"
    return None


def _read(tensors: Mapping[str, np.ndarray], name: str, *index: np.ndarray | float) -> np.ndarray:
    """``tensors[name]`` at ``index`` (float arrays of integers that broadcast); ``_Unread`` where one is not."""
    t = tensors[name]
    at = []
    for i, size in zip(index, t.shape, strict=True):
        x = np.asarray(i)
        k = x.astype(np.int64)
        if (k != x).any() or (k < 0).any() or (k >= size).any():
            raise _Unread(name)
        at.append(k)
    return t[tuple(at)]
