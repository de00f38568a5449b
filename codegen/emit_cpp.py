"""Emit C++ for an attncc expression: one small emitter per sympy node, type-aware.

Index arithmetic stays in ``int64_t`` (floor division and modulo follow Python/sympy rules via
``fdiv`` / ``fmod_i``); anything touching the score or a rational becomes ``double``. Runtime
tensors are read through generated accessors ``T_<name>(cx, i, ...)`` that check bounds.

>>> import sympy
>>> from attncc.ir.exprs import q, kv
>>> emit(sympy.And(sympy.Le(kv, q), sympy.Le(q, kv + 255)))
'((kv <= q) && (q <= (kv + 255)))'
"""

from __future__ import annotations

from collections.abc import Callable

import sympy

from attncc.errors import UnsupportedError
from attncc.ir.dispatch import handler_for
from attncc.ir.exprs import exact_division, expr_str

Code = tuple[str, bool]  # (C++ text, is an integer expression)
INT_SYMBOLS = {"b", "h", "q", "kv", "B", "H", "Sq", "Skv"}


def _num(e: sympy.Basic) -> Code:
    if e is sympy.oo:
        return "INF", False
    if e is sympy.S.NegativeInfinity:
        return "(-INF)", False
    if isinstance(e, sympy.Integer):
        return f"INT64_C({int(e)})" if abs(int(e)) > 2**31 else str(int(e)), True
    return repr(float(e)), False


def _as_double(c: Code) -> str:
    return f"(double)({c[0]})" if c[1] else c[0]


def _add(e: sympy.Add) -> Code:
    parts = [_emit(a) for a in sorted(e.args, key=lambda t: (t.is_number, sympy.default_sort_key(t)))]
    is_int = all(p[1] for p in parts)
    text = parts[0][0]
    for p in parts[1:]:
        text += f" - {p[0][1:]}" if p[0].startswith("-") and " " not in p[0] else f" + {p[0]}"
    return f"({text})" if len(parts) > 1 else text, is_int


def _mul(e: sympy.Mul) -> Code:
    num, den = e.as_numer_denom()
    if den != 1 and den.is_number:
        return f"({_as_double(_emit(num))} / {float(den)!r})", False
    parts = [_emit(a) for a in e.args]
    if len(parts) == 2 and e.args[0] == -1:
        return f"(-{parts[1][0]})", parts[1][1]
    return "(" + " * ".join(p[0] for p in parts) + ")", all(p[1] for p in parts)


def _floor(e: sympy.floor) -> Code:
    if (division := exact_division(e.args[0])) is not None:
        num, den = division
        return f"fdiv({_emit(num)[0]}, {den})", True
    return f"(int64_t)__builtin_floor({_as_double(_emit(e.args[0]))})", True


def _ceiling(e: sympy.ceiling) -> Code:
    if (division := exact_division(e.args[0])) is not None:
        num, den = division
        return f"(-fdiv(-({_emit(num)[0]}), {den}))", True
    return f"(int64_t)__builtin_ceil({_as_double(_emit(e.args[0]))})", True


def _mod(e: sympy.Mod) -> Code:
    a, m = _emit(e.args[0]), _emit(e.args[1])
    if a[1] and m[1]:
        return f"fmod_i({a[0]}, {m[0]})", True
    return f"fmod_f({_as_double(a)}, {_as_double(m)})", False


def _minmax(e: sympy.Min | sympy.Max) -> Code:
    fn = "min_of" if isinstance(e, sympy.Min) else "max_of"
    parts = [_emit(a) for a in e.args]
    is_int = all(p[1] for p in parts)
    ty = "int64_t" if is_int else "double"
    out = parts[0][0] if is_int else _as_double(parts[0])
    for p in parts[1:]:
        out = f"{fn}<{ty}>({out}, {p[0] if is_int else _as_double(p)})"
    return out, is_int


def _abs(e: sympy.Abs) -> Code:
    a = _emit(e.args[0])
    return (f"abs_i({a[0]})", True) if a[1] else (f"__builtin_fabs({a[0]})", False)


def _pow(e: sympy.Pow) -> Code:
    if e.exp == sympy.Rational(1, 2):
        return f"__builtin_sqrt({_as_double(_emit(e.base))})", False
    base, ex = _emit(e.base), _emit(e.exp)
    return f"__builtin_pow({_as_double(base)}, {_as_double(ex)})", False


def _piecewise(e: sympy.Piecewise) -> Code:
    branches = [(_emit(v), c) for v, c in e.args]
    is_int = all(b[0][1] for b in branches)
    out = None
    for value, cond in reversed(branches):
        text = value[0] if is_int else _as_double(value)
        out = text if out is None and cond == sympy.true else f"({_emit(cond)[0]} ? {text} : {out})"
    if out is None:
        raise UnsupportedError(f"Piecewise {expr_str(e)} has no default branch")
    return out, is_int


def _indexed(e: sympy.Indexed) -> Code:
    idx = ", ".join(_emit(i)[0] for i in e.indices)
    return f"T_{e.base}(cx, {idx})", False


def _rel(op: str) -> Callable[[sympy.Basic], Code]:
    return lambda e: (f"({_emit(e.lhs)[0]} {op} {_emit(e.rhs)[0]})", True)


def _join(op: str) -> Callable[[sympy.Basic], Code]:
    return lambda e: ("(" + f" {op} ".join(_emit(a)[0] for a in e.args) + ")", True)


def _unary(fn: str) -> Callable[[sympy.Basic], Code]:
    return lambda e: (f"__builtin_{fn}({_as_double(_emit(e.args[0]))})", False)


_TABLE: dict[type, Callable[..., Code]] = {
    sympy.Add: _add,
    sympy.Mul: _mul,
    sympy.Pow: _pow,
    sympy.floor: _floor,
    sympy.ceiling: _ceiling,
    sympy.Mod: _mod,
    sympy.Min: _minmax,
    sympy.Max: _minmax,
    sympy.Abs: _abs,
    sympy.Piecewise: _piecewise,
    sympy.Indexed: _indexed,
    sympy.LessThan: _rel("<="),
    sympy.StrictLessThan: _rel("<"),
    sympy.GreaterThan: _rel(">="),
    sympy.StrictGreaterThan: _rel(">"),
    sympy.Eq: _rel("=="),
    sympy.Ne: _rel("!="),
    sympy.And: _join("&&"),
    sympy.Or: _join("||"),
    sympy.Xor: _join("!="),
    sympy.Not: lambda e: (f"(!{_emit(e.args[0])[0]})", True),
    sympy.ITE: lambda e: (f"({_emit(e.args[0])[0]} ? {_emit(e.args[1])[0]} : {_emit(e.args[2])[0]})", True),
    sympy.logic.boolalg.BooleanTrue: lambda e: ("true", True),
    sympy.logic.boolalg.BooleanFalse: lambda e: ("false", True),
    sympy.tanh: _unary("tanh"),
    sympy.exp: _unary("exp"),
    sympy.log: _unary("log"),
    sympy.sin: _unary("sin"),
    sympy.cos: _unary("cos"),
    sympy.sign: lambda e: (f"sign_f({_as_double(_emit(e.args[0]))})", False),
}


def _emit(expr: sympy.Basic) -> Code:
    if isinstance(expr, sympy.Symbol):
        return str(expr), str(expr) in INT_SYMBOLS
    if expr.is_number and not isinstance(expr, sympy.logic.boolalg.BooleanAtom):
        return _num(expr)
    emitter = handler_for(_TABLE, expr)
    if emitter is None:
        raise UnsupportedError(f"no C++ emitter for {type(expr).__name__} in `{expr_str(expr)}`")
    return emitter(expr)


def emit(expr: sympy.Basic) -> str:
    """C++ text that evaluates ``expr`` (variables b, h, q, kv, score, B, H, Sq, Skv, cx)."""
    return _emit(expr)[0]
