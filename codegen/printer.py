"""The shared base of the expression printers: one dispatch, the structure every language shares.

A printer maps each sympy node kind to a method (:data:`Printer.METHODS`); a language subclasses
:class:`Printer` and overrides what differs (numbers, symbols, calls, operators), in the manner of tinygrad's
``cstyle`` renderers. Sums, piecewise folds, ``ITE`` and comparisons are written once here. The Python-syntax
targets (``emit_torch`` for the reference, ``emit_triton``) and C++ (``emit_cpp``, which adds one type rule:
whether each subexpression is an integer) print through it.

>>> import sympy
>>> from attncc.ir.exprs import q, kv
>>> class Plain(Printer):
...     language = "plain"
...     def where(self, c, a, b):
...         return f"({a} if {c} else {b})"
>>> Plain().emit(sympy.Piecewise((q + 1, q > kv), (0, True)))
'(q + 1.0 if (kv < q) else 0.0)'
"""

from __future__ import annotations

from typing import Any

import sympy

from attncc.errors import UnsupportedError
from attncc.ir.dispatch import handler_for
from attncc.ir.exprs import InBlocks, expr_str

RELATIONS = {
    sympy.LessThan: "<=",
    sympy.StrictLessThan: "<",
    sympy.GreaterThan: ">=",
    sympy.StrictGreaterThan: ">",
    sympy.Eq: "==",
    sympy.Ne: "!=",
}


class Printer:
    """Print attncc expressions in one language: ``emit(expr) -> str``."""

    language = "?"
    METHODS: dict[type, str] = {
        sympy.Symbol: "symbol",
        sympy.Add: "add",
        sympy.Mul: "mul",
        sympy.Pow: "pow",
        sympy.floor: "floor",
        sympy.ceiling: "ceiling",
        sympy.Mod: "mod",
        sympy.Min: "minmax",
        sympy.Max: "minmax",
        sympy.Abs: "abs",
        sympy.Piecewise: "piecewise",
        sympy.ITE: "ite",
        sympy.Indexed: "indexed",
        InBlocks: "in_blocks",
        **dict.fromkeys(RELATIONS, "relation"),
        sympy.And: "logical",
        sympy.Or: "logical",
        sympy.Xor: "logical",
        sympy.Not: "logical_not",
        sympy.logic.boolalg.BooleanTrue: "true",
        sympy.logic.boolalg.BooleanFalse: "false",
        sympy.Heaviside: "heaviside",
        **dict.fromkeys((sympy.tanh, sympy.exp, sympy.log, sympy.sign, sympy.sin, sympy.cos), "unary"),
    }

    def emit(self, expr: sympy.Basic) -> str:
        if expr.is_number and not isinstance(expr, sympy.logic.boolalg.Boolean):
            return self.number(expr)
        name = handler_for(self.METHODS, expr)
        method = getattr(self, name, None) if name is not None else None
        if method is None:
            raise UnsupportedError(f"no {self.language} emitter for {type(expr).__name__} in `{expr_str(expr)}`")
        return str(method(expr))

    # ---- written once -------------------------------------------------------------------------------------
    def add(self, e: sympy.Add) -> str:
        terms = sorted(e.args, key=lambda t: (t.is_number, sympy.default_sort_key(t)))
        out = self.emit(terms[0])
        for t in terms[1:]:
            coeff = t.as_coeff_Mul()[0]
            out += f" - {self.emit(-t)}" if coeff.is_number and coeff < 0 else f" + {self.emit(t)}"
        return out

    def factors(self, e: sympy.Mul) -> str:
        """A product's factors joined by ``*``, sums parenthesized."""
        return "*".join(f"({self.emit(a)})" if isinstance(a, sympy.Add) else self.emit(a) for a in e.args)

    def piecewise(self, e: sympy.Piecewise) -> str:
        out = None
        for value, cond in reversed(e.args):
            if out is None and cond == sympy.true:
                out = self.branch(e, value)
            else:
                out = self.where(self.emit(cond), self.branch(e, value), str(out))
        if out is None:
            raise UnsupportedError(f"Piecewise {expr_str(e)} has no default branch")
        return out

    def branch(self, whole: sympy.Piecewise, value: sympy.Basic) -> str:
        """One value of a Piecewise (a typed language converts it to the type of the whole)."""
        return self.emit(value)

    def ite(self, e: sympy.ITE) -> str:
        return self.where(*(self.emit(a) for a in e.args))

    def relation(self, e: Any) -> str:
        return f"({self.emit(e.lhs)} {RELATIONS[type(e)]} {self.emit(e.rhs)})"

    # ---- what each language says its own way ----------------------------------------------------------------
    def number(self, e: sympy.Basic) -> str:
        return repr(float(e))

    def symbol(self, e: sympy.Symbol) -> str:
        return str(e)

    def where(self, cond: str, a: str, b: str) -> str:
        raise NotImplementedError
