"""Emit Triton for an attncc expression over a tile: one small emitter per sympy node.

Inside a kernel, ``q`` is the column of query positions ``offs_m[:, None]``, ``kv`` the row of
key positions ``offs_n[None, :]``, ``score`` the tile of scores ``s``; ``b`` and ``h`` are
scalars. Floor division and modulo follow Python/sympy semantics through the template's
``_fdiv`` / ``_fmod`` helpers; runtime tensors are read with ``_ld_<name>(...)`` helpers that
bounds-check and flag bad reads.

>>> import sympy
>>> from attncc.ir.exprs import q, kv
>>> emit(sympy.And(sympy.Le(kv, q), sympy.Le(q, kv + 255)))
'((offs_n[None, :] <= offs_m[:, None]) & (offs_m[:, None] <= offs_n[None, :] + 255))'
"""

from __future__ import annotations

from collections.abc import Callable

import sympy

from attncc.errors import UnsupportedError
from attncc.ir.dispatch import handler_for
from attncc.ir.exprs import exact_division, expr_str

NAMES = {
    "q": "offs_m[:, None]",
    "kv": "offs_n[None, :]",
    "score": "s",
    "b": "b",
    "h": "h",
    "qb": "qb",
    "x": "x",
    "B": "B",
    "H": "H",
    "Sq": "SQ",
    "Skv": "SKV",
}


def _num(e: sympy.Basic) -> str:
    if e is sympy.oo:
        return 'float("inf")'
    if e is sympy.S.NegativeInfinity:
        return '(-float("inf"))'
    if isinstance(e, sympy.Integer):
        return str(int(e))
    return repr(float(e))


def _add(e: sympy.Add) -> str:
    terms = sorted(e.args, key=lambda t: (t.is_number, sympy.default_sort_key(t)))
    out = emit(terms[0])
    for t in terms[1:]:
        coeff = t.as_coeff_Mul()[0]
        out += f" - {emit(-t)}" if coeff.is_number and coeff < 0 else f" + {emit(t)}"
    return out


def _mul(e: sympy.Mul) -> str:
    num, den = e.as_numer_denom()
    if den != 1 and den.is_number:
        return f"(({emit(num)}) / {float(den)!r})"
    if e.as_coeff_Mul()[0] == -1:
        return f"-({emit(-e)})"
    return "*".join(f"({emit(a)})" if isinstance(a, sympy.Add) else emit(a) for a in e.args)


def _floor(e: sympy.floor) -> str:
    if (division := exact_division(e.args[0])) is not None:
        num, den = division
        return f"_fdiv({emit(num)}, {den})"
    return f"tl.floor({emit(e.args[0])})"


def _ceiling(e: sympy.ceiling) -> str:
    if (division := exact_division(e.args[0])) is not None:
        num, den = division
        return f"(-_fdiv(-({emit(num)}), {den}))"
    return f"tl.ceil({emit(e.args[0])})"


def _pow(e: sympy.Pow) -> str:
    if e.exp == sympy.Rational(1, 2):
        return f"tl.sqrt(({emit(e.base)}) * 1.0)"
    if e.base == 2:
        return f"tl.exp2(({emit(e.exp)}) * 1.0)"
    if e.exp == -1:
        return f"(1.0 / ({emit(e.base)}))"
    if e.exp == 2:
        return f"(({emit(e.base)}) * ({emit(e.base)}))"
    return f"tl.exp(tl.log(({emit(e.base)}) * 1.0) * ({emit(e.exp)}))"


def _minmax(e: sympy.Min | sympy.Max) -> str:
    fn = "tl.minimum" if isinstance(e, sympy.Min) else "tl.maximum"
    out = emit(e.args[0])
    for a in e.args[1:]:
        out = f"{fn}({out}, {emit(a)})"
    return out


def _piecewise(e: sympy.Piecewise) -> str:
    out = None
    for value, cond in reversed(e.args):
        out = emit(value) if out is None and cond == sympy.true else f"tl.where({emit(cond)}, {emit(value)}, {out})"
    if out is None:
        raise UnsupportedError(f"Piecewise {expr_str(e)} has no default branch")
    return out


def _indexed(e: sympy.Indexed) -> str:
    return f"_ld_{e.base}(T_{e.base}, TD_{e.base}, ERR, {', '.join(emit(i) for i in e.indices)})"


def _rel(op: str) -> Callable[[sympy.Basic], str]:
    return lambda e: f"({emit(e.lhs)} {op} {emit(e.rhs)})"


def _join(op: str) -> Callable[[sympy.Basic], str]:
    return lambda e: "(" + f" {op} ".join(emit(a) for a in e.args) + ")"


_TABLE: dict[type, Callable[..., str]] = {
    sympy.Add: _add,
    sympy.Mul: _mul,
    sympy.Pow: _pow,
    sympy.floor: _floor,
    sympy.ceiling: _ceiling,
    sympy.Mod: lambda e: f"_fmod({emit(e.args[0])}, {emit(e.args[1])})",
    sympy.Min: _minmax,
    sympy.Max: _minmax,
    sympy.Abs: lambda e: f"tl.abs({emit(e.args[0])})",
    sympy.Piecewise: _piecewise,
    sympy.Indexed: _indexed,
    sympy.ITE: lambda e: f"tl.where({emit(e.args[0])}, {emit(e.args[1])}, {emit(e.args[2])})",
    sympy.LessThan: _rel("<="),
    sympy.StrictLessThan: _rel("<"),
    sympy.GreaterThan: _rel(">="),
    sympy.StrictGreaterThan: _rel(">"),
    sympy.Eq: _rel("=="),
    sympy.Ne: _rel("!="),
    sympy.And: _join("&"),
    sympy.Or: _join("|"),
    sympy.Xor: _join("^"),
    sympy.Not: lambda e: f"(~{emit(e.args[0])})",
    sympy.logic.boolalg.BooleanTrue: lambda e: "(offs_m[:, None] >= 0)",
    sympy.logic.boolalg.BooleanFalse: lambda e: "(offs_m[:, None] < 0)",
    sympy.tanh: lambda e: f"_tanh({emit(e.args[0])})",
    sympy.exp: lambda e: f"tl.exp(({emit(e.args[0])}) * 1.0)",
    sympy.log: lambda e: f"tl.log(({emit(e.args[0])}) * 1.0)",
    sympy.sign: lambda e: f"tl.where(({emit(e.args[0])}) > 0, 1.0, tl.where(({emit(e.args[0])}) < 0, -1.0, 0.0))",
    sympy.Heaviside: lambda e: f"tl.where(({emit(e.args[0])}) > 0, 1.0, tl.where(({emit(e.args[0])}) < 0, 0.0, 0.5))",
    sympy.sin: lambda e: f"tl.sin(({emit(e.args[0])}) * 1.0)",
    sympy.cos: lambda e: f"tl.cos(({emit(e.args[0])}) * 1.0)",
}


def emit(expr: sympy.Basic) -> str:
    """Triton text that evaluates ``expr`` on a tile (see the module docstring for the names)."""
    if isinstance(expr, sympy.Symbol):
        if str(expr) not in NAMES:
            raise UnsupportedError(f"symbol {expr} has no meaning inside a Triton tile")
        return NAMES[str(expr)]
    if expr.is_number and not isinstance(expr, sympy.logic.boolalg.BooleanAtom):
        return _num(expr)
    emitter = handler_for(_TABLE, expr)
    if emitter is None:
        raise UnsupportedError(f"no Triton emitter for {type(expr).__name__} in `{expr_str(expr)}`")
    return emitter(expr)
