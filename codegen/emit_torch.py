"""Emit Python/PyTorch source for an attncc expression: one small emitter per sympy node.

The text calls :mod:`attncc.codegen.helpers` (imported as ``H_``) so it works on Python
numbers and broadcastable tensors alike; runtime tensors are read from the dict ``T``.

>>> import sympy
>>> from attncc.ir.exprs import q, kv
>>> emit(sympy.And(sympy.Le(kv, q), sympy.Le(q, kv + 255)))
'H_.logical_and((kv <= q), (q <= kv + 255))'
"""

from __future__ import annotations

from collections.abc import Callable

import sympy

from attncc.errors import UnsupportedError
from attncc.ir.dispatch import handler_for
from attncc.ir.exprs import exact_division, expr_str

Emitter = Callable[[sympy.Basic], str]


def _args(e: sympy.Basic) -> list[str]:
    return [emit(a) for a in e.args]


def _number(e: sympy.Basic) -> str:
    if e is sympy.oo:
        return "math.inf"
    if e is sympy.S.NegativeInfinity:
        return "(-math.inf)"
    if isinstance(e, sympy.Integer):
        return str(int(e))
    if isinstance(e, sympy.Rational):
        return f"({e.p}/{e.q})"
    return repr(float(e))


def _add(e: sympy.Add) -> str:
    terms = sorted(e.args, key=lambda t: (t.is_number, sympy.default_sort_key(t)))
    out = emit(terms[0])
    for t in terms[1:]:
        coeff = t.as_coeff_Mul()[0]
        if coeff.is_number and coeff < 0:
            out += f" - {emit(-t)}"
        else:
            out += f" + {emit(t)}"
    return out


def _mul(e: sympy.Mul) -> str:
    num, den = e.as_numer_denom()
    if den != 1 and den.is_number:
        return f"({emit(num)})/{_number(den)}"
    coeff, rest = e.as_coeff_Mul()
    if coeff == -1:
        return f"-({emit(rest)})"
    return "*".join(f"({emit(a)})" if isinstance(a, sympy.Add) else emit(a) for a in e.args)


def _floor(e: sympy.floor) -> str:
    if (division := exact_division(e.args[0])) is not None:
        num, den = division
        return f"H_.floordiv({emit(num)}, {den})"
    return f"H_.floor({emit(e.args[0])})"


def _ceiling(e: sympy.ceiling) -> str:
    if (division := exact_division(e.args[0])) is not None:
        num, den = division
        return f"-H_.floordiv(-({emit(num)}), {den})"
    return f"H_.ceil({emit(e.args[0])})"


def _pow(e: sympy.Pow) -> str:
    if e.exp == sympy.Rational(1, 2):
        return f"H_.unary('sqrt', {emit(e.base)})"
    return f"H_.power({emit(e.base)}, {emit(e.exp)})"


def _piecewise(e: sympy.Piecewise) -> str:
    out = None
    for value, cond in reversed(e.args):
        out = emit(value) if out is None and cond == sympy.true else f"H_.where({emit(cond)}, {emit(value)}, {out})"
    if out is None:
        raise UnsupportedError(f"Piecewise {expr_str(e)} has no default branch")
    return out


def _indexed(e: sympy.Indexed) -> str:
    idx = ", ".join(emit(i) for i in e.indices)
    return f"H_.index(T[{str(e.base)!r}], {str(e.base)!r}, ({idx},), {expr_str(e)!r})"


def _rel(op: str) -> Emitter:
    return lambda e: f"({emit(e.lhs)} {op} {emit(e.rhs)})"


def _call(name: str) -> Emitter:
    return lambda e: f"H_.{name}({', '.join(_args(e))})"


_TABLE: dict[type, Emitter] = {
    sympy.Symbol: str,
    sympy.Add: _add,  # type: ignore[dict-item]
    sympy.Mul: _mul,  # type: ignore[dict-item]
    sympy.Pow: _pow,  # type: ignore[dict-item]
    sympy.floor: _floor,  # type: ignore[dict-item]
    sympy.ceiling: _ceiling,  # type: ignore[dict-item]
    sympy.Mod: _call("mod"),
    sympy.Min: _call("minimum"),
    sympy.Max: _call("maximum"),
    sympy.Abs: lambda e: f"abs({emit(e.args[0])})",
    sympy.Piecewise: _piecewise,  # type: ignore[dict-item]
    sympy.ITE: lambda e: f"H_.where({', '.join(_args(e))})",
    sympy.Indexed: _indexed,  # type: ignore[dict-item]
    sympy.LessThan: _rel("<="),
    sympy.StrictLessThan: _rel("<"),
    sympy.GreaterThan: _rel(">="),
    sympy.StrictGreaterThan: _rel(">"),
    sympy.Eq: _rel("=="),
    sympy.Ne: _rel("!="),
    sympy.And: _call("logical_and"),
    sympy.Or: _call("logical_or"),
    sympy.Not: _call("logical_not"),
    sympy.Xor: _call("logical_xor"),
    sympy.logic.boolalg.BooleanTrue: lambda e: "True",
    sympy.logic.boolalg.BooleanFalse: lambda e: "False",
    sympy.Heaviside: lambda e: f"H_.where({emit(e.args[0])} > 0, 1.0, H_.where({emit(e.args[0])} < 0, 0.0, 0.5))",
}
for _fn in ("tanh", "exp", "log", "sign", "sin", "cos"):
    _TABLE[getattr(sympy, _fn)] = (lambda n: lambda e: f"H_.unary({n!r}, {emit(e.args[0])})")(_fn)


def emit(expr: sympy.Basic) -> str:
    """Python source that evaluates ``expr`` (names: b, h, q, kv, score, B, H, Sq, Skv, T)."""
    if expr.is_number and not isinstance(expr, sympy.logic.boolalg.Boolean):
        return _number(expr)
    emitter = handler_for(_TABLE, expr)
    if emitter is None:
        raise UnsupportedError(f"no PyTorch emitter for {type(expr).__name__} in `{expr_str(expr)}`")
    return emitter(expr)
