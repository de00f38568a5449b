"""Typed op attributes: each kind prints itself in the IR text and parses itself back.

An op declares ``attrs = {"groups": INT, "mask": EXPR, ...}``; :mod:`attncc.ir.text` prints
``name = kind.print(value)`` and parses with ``kind.parse(json_value, tensors)`` without knowing any kind.

>>> from attncc.ir.exprs import q, kv
>>> BANDS.print(((kv, q),)), BANDS.parse(["kv .. q"], [])
('["kv .. q"]', ((kv, q),))
>>> FLOATS.print((1, 2.5)), INTS.parse([0, 1], [])
('[1.0, 2.5]', (0, 1))
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import sympy

from attncc.ir.exprs import expr_str, parse_expr


class Attr:
    """An attribute kind: ``print`` a value as JSON text, ``parse`` it back from the decoded JSON (``tensors``:
    names expressions may index). ``parse`` raises ValueError or TypeError on a value of another kind."""

    kind = "str"

    def print(self, value: Any) -> str:
        return json.dumps(value)

    def parse(self, raw: Any, tensors: Sequence[str]) -> Any:
        if not isinstance(raw, str):
            raise TypeError(f"{raw!r} is not a string")
        return raw


class IntAttr(Attr):
    kind = "int"

    def print(self, value: Any) -> str:
        return json.dumps(int(value))

    def parse(self, raw: Any, tensors: Sequence[str]) -> Any:
        return int(raw)


class FloatAttr(Attr):
    kind = "float"

    def print(self, value: Any) -> str:
        return repr(float(value))

    def parse(self, raw: Any, tensors: Sequence[str]) -> Any:
        return float(raw)


class IntsAttr(Attr):
    kind = "ints"

    def print(self, value: Any) -> str:
        return json.dumps([int(x) for x in value])

    def parse(self, raw: Any, tensors: Sequence[str]) -> Any:
        return tuple(int(x) for x in raw)


class FloatsAttr(Attr):
    kind = "floats"

    def print(self, value: Any) -> str:
        return "[" + ", ".join(repr(float(x)) for x in value) + "]"

    def parse(self, raw: Any, tensors: Sequence[str]) -> Any:
        return tuple(float(x) for x in raw)


class ExprAttr(Attr):
    """A sympy expression (numeric or boolean), printed in attncc's expression syntax."""

    kind = "expr"

    def print(self, value: Any) -> str:
        if not isinstance(value, sympy.Basic):
            raise TypeError(f"{value!r} is not an expression")
        return json.dumps(expr_str(value))

    def parse(self, raw: Any, tensors: Sequence[str]) -> Any:
        return parse_expr(str(raw), list(tensors))


class BandsAttr(Attr):
    """Pairs of expressions ``lo .. hi`` (a band's bounds, in keys or in blocks)."""

    kind = "bands"

    def print(self, value: Any) -> str:
        return json.dumps([f"{expr_str(lo)} .. {expr_str(hi)}" for lo, hi in value])

    def parse(self, raw: Any, tensors: Sequence[str]) -> Any:
        pairs = [str(item).split(" .. ") for item in raw]
        return tuple((parse_expr(lo, list(tensors)), parse_expr(hi, list(tensors))) for lo, hi in pairs)


STR, INT, FLOAT = Attr(), IntAttr(), FloatAttr()
INTS, FLOATS, EXPR, BANDS = IntsAttr(), FloatsAttr(), ExprAttr(), BandsAttr()
