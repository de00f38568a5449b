"""Emit C++ for an attncc expression: the shared printer (:mod:`attncc.codegen.printer`), type-aware.

Index arithmetic stays in ``int64_t`` (floor division and modulo follow Python/sympy rules via
``fdiv`` / ``fmod_i``); anything touching the score or a rational becomes ``double``
(:meth:`CppPrinter.integral` says which, one rule per node kind). Runtime tensors are read through
generated accessors ``T_<name>(cx, i, ...)`` that check bounds.

>>> import sympy
>>> from attncc.ir.exprs import q, kv
>>> emit(sympy.And(sympy.Le(kv, q), sympy.Le(q, kv + 255)))
'((kv <= q) && (q <= (kv + 255)))'
>>> emit(sympy.floor((q - kv) / 4) + kv / 2)
'(((double)(kv) / 2.0) + fdiv(((-kv) + q), 4))'
"""

from __future__ import annotations

import functools

import sympy

from attncc.codegen.printer import Printer
from attncc.ir.exprs import exact_division

INT_SYMBOLS = {"b", "h", "q", "kv", "B", "H", "Sq", "Skv"}
BOOLEAN = (sympy.logic.boolalg.Boolean,)


class CppPrinter(Printer):
    """C++: integers stay ``int64_t`` where every part is integral, the rest is ``double``."""

    language = "C++"
    CALLS = {sympy.tanh: "tanh", sympy.exp: "exp", sympy.log: "log", sympy.sin: "sin", sympy.cos: "cos"}
    LOGICAL = {sympy.And: "&&", sympy.Or: "||", sympy.Xor: "!="}

    # ---- the type rule ------------------------------------------------------------------------------------
    @functools.lru_cache(maxsize=4096)  # noqa: B019 (one module-level printer; expressions are immutable)
    def integral(self, e: sympy.Basic) -> bool:
        """Whether the C++ text of ``e`` is an integer (``int64_t`` or a boolean)."""
        if isinstance(e, sympy.Symbol):
            return str(e) in INT_SYMBOLS
        if isinstance(e, BOOLEAN):
            return True  # relations, And/Or/Not, ITE of conditions: C++ bool
        if e.is_number:
            return isinstance(e, sympy.Integer) and abs(int(e)) < 2**63
        if isinstance(e, sympy.floor | sympy.ceiling):
            return True
        if isinstance(e, sympy.Mul):
            den = e.as_numer_denom()[1]
            return (den == 1 or not den.is_number) and all(self.integral(a) for a in e.args)
        if isinstance(e, sympy.Add | sympy.Mod | sympy.Min | sympy.Max | sympy.Abs):
            return all(self.integral(a) for a in e.args)
        if isinstance(e, sympy.Piecewise):
            return all(self.integral(v) for v, _ in e.args)
        return False  # tensor reads, pow, sqrt, tanh...: double

    def double(self, e: sympy.Basic) -> str:
        text = self.emit(e)
        return f"(double)({text})" if self.integral(e) else text

    # ---- what C++ says its own way ------------------------------------------------------------------------
    def number(self, e: sympy.Basic) -> str:
        if e is sympy.oo:
            return "INF"
        if e is sympy.S.NegativeInfinity:
            return "(-INF)"
        if isinstance(e, sympy.Integer) and abs(int(e)) < 2**63:  # larger ones are doubles: no int64_t holds them
            return f"INT64_C({int(e)})" if abs(int(e)) > 2**31 else str(int(e))
        return repr(float(e))

    def add(self, e: sympy.Add) -> str:
        parts = [self.emit(a) for a in sorted(e.args, key=lambda t: (t.is_number, sympy.default_sort_key(t)))]
        text = parts[0]
        for p in parts[1:]:
            text += f" - {p[1:]}" if p.startswith("-") and " " not in p else f" + {p}"
        return f"({text})" if len(parts) > 1 else text

    def mul(self, e: sympy.Mul) -> str:
        num, den = e.as_numer_denom()
        if den != 1 and den.is_number:
            return f"({self.double(num)} / {float(den)!r})"
        if len(e.args) == 2 and e.args[0] == -1:
            return f"(-{self.emit(e.args[1])})"
        return "(" + " * ".join(self.emit(a) for a in e.args) + ")"

    def pow(self, e: sympy.Pow) -> str:
        if e.exp == sympy.Rational(1, 2):
            return f"__builtin_sqrt({self.double(e.base)})"
        return f"__builtin_pow({self.double(e.base)}, {self.double(e.exp)})"

    def floor(self, e: sympy.floor) -> str:
        if (division := exact_division(e.args[0])) is not None:
            return f"fdiv({self.emit(division[0])}, {division[1]})"
        return f"(int64_t)__builtin_floor({self.double(e.args[0])})"

    def ceiling(self, e: sympy.ceiling) -> str:
        if (division := exact_division(e.args[0])) is not None:
            return f"(-fdiv(-({self.emit(division[0])}), {division[1]}))"
        return f"(int64_t)__builtin_ceil({self.double(e.args[0])})"

    def mod(self, e: sympy.Mod) -> str:
        if self.integral(e):
            return f"fmod_i({self.emit(e.args[0])}, {self.emit(e.args[1])})"
        return f"fmod_f({self.double(e.args[0])}, {self.double(e.args[1])})"

    def minmax(self, e: sympy.Min | sympy.Max) -> str:
        fn, ty = "min_of" if isinstance(e, sympy.Min) else "max_of", "int64_t" if self.integral(e) else "double"
        text = self.emit if self.integral(e) else self.double
        out = text(e.args[0])
        for a in e.args[1:]:
            out = f"{fn}<{ty}>({out}, {text(a)})"
        return out

    def abs(self, e: sympy.Abs) -> str:
        return f"abs_i({self.emit(e.args[0])})" if self.integral(e) else f"__builtin_fabs({self.emit(e.args[0])})"

    def branch(self, whole: sympy.Piecewise, value: sympy.Basic) -> str:
        return self.emit(value) if self.integral(whole) else self.double(value)

    def where(self, cond: str, a: str, b: str) -> str:
        return f"({cond} ? {a} : {b})"

    def indexed(self, e: sympy.Indexed) -> str:
        return f"T_{e.base}(cx, {', '.join(self.emit(i) for i in e.indices)})"

    def in_blocks(self, e: sympy.Basic) -> str:
        return f"L_{e.args[0].base}(cx, {', '.join(self.emit(i) for i in e.args[1:])})"

    def logical(self, e: sympy.Basic) -> str:
        return "(" + f" {self.LOGICAL[type(e)]} ".join(self.emit(a) for a in e.args) + ")"

    def logical_not(self, e: sympy.Not) -> str:
        return f"(!{self.emit(e.args[0])})"

    def true(self, e: sympy.Basic) -> str:
        return "true"

    def false(self, e: sympy.Basic) -> str:
        return "false"

    def heaviside(self, e: sympy.Basic) -> str:
        x = self.double(e.args[0])
        return f"({x} > 0.0 ? 1.0 : ({x} < 0.0 ? 0.0 : 0.5))"

    def unary(self, e: sympy.Basic) -> str:
        if isinstance(e, sympy.sign):
            return f"sign_f({self.double(e.args[0])})"
        return f"__builtin_{self.CALLS[type(e)]}({self.double(e.args[0])})"


PRINTER = CppPrinter()


def emit(expr: sympy.Basic) -> str:
    """C++ text that evaluates ``expr`` (variables b, h, q, kv, score, B, H, Sq, Skv, cx)."""
    return PRINTER.emit(expr)
