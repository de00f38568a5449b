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

import sympy

from attncc.codegen.printer import Printer
from attncc.errors import UnsupportedError
from attncc.ir.exprs import exact_division

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


class TritonPrinter(Printer):
    """Triton over a tile (``tl``), Python/sympy integer semantics through the template's helpers."""

    language = "Triton"

    def symbol(self, e: sympy.Symbol) -> str:
        if str(e) not in NAMES:
            raise UnsupportedError(f"symbol {e} has no meaning inside a Triton tile")
        return NAMES[str(e)]

    def number(self, e: sympy.Basic) -> str:
        if e is sympy.oo:
            return 'float("inf")'
        if e is sympy.S.NegativeInfinity:
            return '(-float("inf"))'
        if isinstance(e, sympy.Integer) and abs(int(e)) < 2**63:
            return str(int(e))
        return repr(float(e))

    def where(self, cond: str, a: str, b: str) -> str:
        return f"tl.where({cond}, {a}, {b})"

    def mul(self, e: sympy.Mul) -> str:
        num, den = e.as_numer_denom()
        if den != 1 and den.is_number:
            return f"(({self.emit(num)}) / {float(den)!r})"
        if e.as_coeff_Mul()[0] == -1:
            return f"-({self.emit(-e)})"
        return self.factors(e)

    def floor(self, e: sympy.floor) -> str:
        if (division := exact_division(e.args[0])) is not None:
            num, den = division
            return f"_fdiv({self.emit(num)}, {den})"
        return f"tl.floor({self.emit(e.args[0])})"

    def ceiling(self, e: sympy.ceiling) -> str:
        if (division := exact_division(e.args[0])) is not None:
            num, den = division
            return f"(-_fdiv(-({self.emit(num)}), {den}))"
        return f"tl.ceil({self.emit(e.args[0])})"

    def pow(self, e: sympy.Pow) -> str:
        base, exp = self.emit(e.base), self.emit(e.exp)
        if e.exp == sympy.Rational(1, 2):
            return f"tl.sqrt(({base}) * 1.0)"
        if e.base == 2:
            return f"tl.exp2(({exp}) * 1.0)"
        if e.exp == -1:
            return f"(1.0 / ({base}))"
        if e.exp == 2:
            return f"(({base}) * ({base}))"
        return f"tl.exp(tl.log(({base}) * 1.0) * ({exp}))"

    def mod(self, e: sympy.Mod) -> str:
        return f"_fmod({self.emit(e.args[0])}, {self.emit(e.args[1])})"

    def minmax(self, e: sympy.Min | sympy.Max) -> str:
        fn = "tl.minimum" if isinstance(e, sympy.Min) else "tl.maximum"
        out = self.emit(e.args[0])
        for a in e.args[1:]:
            out = f"{fn}({out}, {self.emit(a)})"
        return out

    def abs(self, e: sympy.Abs) -> str:
        return f"tl.abs({self.emit(e.args[0])})"

    def indexed(self, e: sympy.Indexed) -> str:
        return f"_ld_{e.base}(T_{e.base}, TD_{e.base}, ERR, {', '.join(self.emit(i) for i in e.indices)})"

    def in_blocks(self, e: sympy.Basic) -> str:
        name = e.args[0].base
        return f"_in_{name}(T_{name}, TD_{name}, {', '.join(self.emit(i) for i in e.args[1:])})"

    def logical(self, e: sympy.Basic) -> str:
        op = {sympy.And: "&", sympy.Or: "|", sympy.Xor: "^"}[type(e)]
        return "(" + f" {op} ".join(self.emit(a) for a in e.args) + ")"

    def logical_not(self, e: sympy.Not) -> str:
        return f"(~{self.emit(e.args[0])})"

    def true(self, e: sympy.Basic) -> str:
        return "(offs_m[:, None] >= 0)"

    def false(self, e: sympy.Basic) -> str:
        return "(offs_m[:, None] < 0)"

    def heaviside(self, e: sympy.Heaviside) -> str:
        x = self.emit(e.args[0])
        return f"tl.where(({x}) > 0, 1.0, tl.where(({x}) < 0, 0.0, 0.5))"

    def unary(self, e: sympy.Function) -> str:
        x = self.emit(e.args[0])
        if isinstance(e, sympy.tanh):
            return f"_tanh({x})"
        if isinstance(e, sympy.sign):
            return f"tl.where(({x}) > 0, 1.0, tl.where(({x}) < 0, -1.0, 0.0))"
        return f"tl.{type(e).__name__}(({x}) * 1.0)"  # exp, log, sin, cos


_PRINTER = TritonPrinter()


def emit(expr: sympy.Basic) -> str:
    """Triton text that evaluates ``expr`` on a tile (see the module docstring for the names)."""
    return _PRINTER.emit(expr)
