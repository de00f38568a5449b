"""Emit Python/PyTorch source for an attncc expression: one small emitter per sympy node.

The text calls :mod:`attncc.codegen.helpers` (imported as ``H_``) so it works on Python
numbers and broadcastable tensors alike; runtime tensors are read from the dict ``T``.

>>> import sympy
>>> from attncc.ir.exprs import q, kv
>>> emit(sympy.And(sympy.Le(kv, q), sympy.Le(q, kv + 255)))
'H_.logical_and((kv <= q), (q <= kv + 255))'
"""

from __future__ import annotations

import sympy

from attncc.codegen.printer import Printer
from attncc.ir.exprs import exact_division, expr_str


class TorchPrinter(Printer):
    """Python over numbers and broadcastable tensors, through ``H_`` (:mod:`attncc.codegen.helpers`)."""

    language = "PyTorch"

    def number(self, e: sympy.Basic) -> str:
        if e is sympy.oo:
            return "math.inf"
        if e is sympy.S.NegativeInfinity:
            return "(-math.inf)"
        if isinstance(e, sympy.Integer):  # one no int64 holds is a float (torch would refuse the Python int)
            return str(int(e)) if abs(int(e)) < 2**63 else repr(float(e))
        if isinstance(e, sympy.Rational):
            return f"({e.p}/{e.q})"
        return repr(float(e))

    def where(self, cond: str, a: str, b: str) -> str:
        return f"H_.where({cond}, {a}, {b})"

    def call(self, name: str, e: sympy.Basic) -> str:
        return f"H_.{name}({', '.join(self.emit(a) for a in e.args)})"

    def mul(self, e: sympy.Mul) -> str:
        num, den = e.as_numer_denom()
        if den != 1 and den.is_number:
            return f"({self.emit(num)})/{self.number(den)}"
        coeff, rest = e.as_coeff_Mul()
        if coeff == -1:
            return f"-({self.emit(rest)})"
        return self.factors(e)

    def floor(self, e: sympy.floor) -> str:
        if (division := exact_division(e.args[0])) is not None:
            num, den = division
            return f"H_.floordiv({self.emit(num)}, {den})"
        return f"H_.floor({self.emit(e.args[0])})"

    def ceiling(self, e: sympy.ceiling) -> str:
        if (division := exact_division(e.args[0])) is not None:
            num, den = division
            return f"-H_.floordiv(-({self.emit(num)}), {den})"
        return f"H_.ceil({self.emit(e.args[0])})"

    def pow(self, e: sympy.Pow) -> str:
        if e.exp == sympy.Rational(1, 2):
            return f"H_.unary('sqrt', {self.emit(e.base)})"
        return f"H_.power({self.emit(e.base)}, {self.emit(e.exp)})"

    def mod(self, e: sympy.Mod) -> str:
        return self.call("mod", e)

    def minmax(self, e: sympy.Min | sympy.Max) -> str:
        return self.call("minimum" if isinstance(e, sympy.Min) else "maximum", e)

    def abs(self, e: sympy.Abs) -> str:
        return f"abs({self.emit(e.args[0])})"

    def indexed(self, e: sympy.Indexed) -> str:
        idx = ", ".join(self.emit(i) for i in e.indices)
        return f"H_.index(T[{str(e.base)!r}], {str(e.base)!r}, ({idx},), {expr_str(e)!r})"

    def in_blocks(self, e: sympy.Basic) -> str:
        name = str(e.args[0].base)
        return f"H_.in_blocks(T[{name!r}], {', '.join(self.emit(i) for i in e.args[1:])})"

    def logical(self, e: sympy.Basic) -> str:
        name = {sympy.And: "logical_and", sympy.Or: "logical_or", sympy.Xor: "logical_xor"}[type(e)]
        return self.call(name, e)

    def logical_not(self, e: sympy.Not) -> str:
        return self.call("logical_not", e)

    def true(self, e: sympy.Basic) -> str:
        return "True"

    def false(self, e: sympy.Basic) -> str:
        return "False"

    def heaviside(self, e: sympy.Heaviside) -> str:
        x = self.emit(e.args[0])
        return f"H_.where({x} > 0, 1.0, H_.where({x} < 0, 0.0, 0.5))"

    def unary(self, e: sympy.Function) -> str:
        return f"H_.unary({type(e).__name__!r}, {self.emit(e.args[0])})"


_PRINTER = TorchPrinter()


def emit(expr: sympy.Basic) -> str:
    """Python source that evaluates ``expr`` (names: b, h, q, kv, score, B, H, Sq, Skv, T)."""
    return _PRINTER.emit(expr)
