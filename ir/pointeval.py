"""Bound expressions evaluated at points, compiled once per expression into one numpy function.

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
    fn = "np.maximum" if pick == "max" else "np.minimum"
    body = functools.reduce(lambda acc, p: f"{fn}({acc}, {p})", parts[1:], parts[0])
    params = ", ".join(str(s) for s in ARGS)
    space: dict[str, object] = {"np": np, "_floor": _floor, "_ceil": _ceil, "_mod": _mod}
    exec(f"def point({params}):\n    return {body}\n", space)  # the source: sympy nodes emitted below
    return space["point"]  # type: ignore[return-value]


def _floor(x: np.ndarray) -> np.ndarray:
    return np.floor(x + 1e-9)  # as boxeval: a quotient a hair under an integer is that integer


def _ceil(x: np.ndarray) -> np.ndarray:
    return np.ceil(x - 1e-9)


def _mod(a: np.ndarray, n: float) -> np.ndarray:
    return a - n * np.floor(a / n)


def _emit(e: sympy.Basic) -> str | None:
    """Python source of ``e`` over ``ARGS``; None where some node has no point rule."""
    if e in ARGS:
        return str(e)
    if e.is_number:
        value = float(e)  # type: ignore[arg-type]
        return f"({value!r})" if np.isfinite(value) else None
    parts = [_emit(a) for a in e.args]
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
        fn = "np.minimum" if isinstance(e, sympy.Min) else "np.maximum"
        return functools.reduce(lambda acc, p: f"{fn}({acc}, {p})", parts[1:], parts[0])  # type: ignore[arg-type]
    if isinstance(e, sympy.Mod) and e.args[1].is_number and e.args[1] > 0:
        return f"_mod({parts[0]}, {parts[1]})"
    return None
