"""IR core: values, tensor types, the op base class and graphs.

A :class:`Graph` is a straight-line list of ops in SSA form, ending in ``attn.return``. Each op
is a frozen dataclass whose first field is its ``result`` value; its operands are named fields
holding :class:`Value`s (listed in ``operands``) and its attributes are the remaining fields
(kinds listed in ``attrs``). Graphs are never edited in place: passes build new ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import sympy

from attncc.errors import VerifyError
from attncc.ir.attrs import Attr

Shape = tuple[sympy.Expr, ...]

#: attribute kinds understood by the printer and parser
ATTR_KINDS = frozenset({"int", "float", "str", "expr", "bool", "ints", "floats", "bands"})


@dataclass(frozen=True, slots=True)
class Value:
    """An SSA value: a name (printed ``%name``) and a shape (sympy dims)."""

    name: str
    shape: Shape = ()

    def __str__(self) -> str:
        return f"%{self.name}"


@dataclass(frozen=True, slots=True)
class Op:
    """Base of every IR op. Subclasses set ``name``, ``operands`` and ``attrs``."""

    name: ClassVar[str] = ""
    operands: ClassVar[tuple[str, ...]] = ()
    attrs: ClassVar[dict[str, Attr]] = {}
    optional: ClassVar[frozenset[str]] = frozenset()  # attributes printed only when not at their default

    result: Value | None

    def operand_values(self) -> Iterator[tuple[str, Value]]:
        for field in self.operands:
            yield field, getattr(self, field)

    def attr_values(self) -> Iterator[tuple[str, object]]:
        for field in self.attrs:
            yield field, getattr(self, field)

    def result_shape(self) -> Shape | None:
        """The shape the result must have given the operands, or None when not derivable."""
        return None

    def verify(self) -> None:
        """Check op-local invariants; raise VerifyError naming the op."""

    def fail(self, message: str) -> VerifyError:
        return VerifyError(f"{self.name}: {message}")

    def replace(self, **changes: object) -> Op:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Graph:
    """A named straight-line SSA graph of ops, the last of which is ``attn.return``."""

    name: str
    ops: tuple[Op, ...]

    def producer(self, value: Value) -> Op:
        for op in self.ops:
            if op.result == value:
                return op
        raise KeyError(value.name)

    def users(self, value: Value) -> list[Op]:
        return [op for op in self.ops if any(v == value for _, v in op.operand_values())]

    def ops_of(self, cls: type[Op]) -> list[Op]:
        return [op for op in self.ops if isinstance(op, cls)]

    def verify(self) -> None:
        """SSA order, unique names, per-op invariants and result shapes."""
        defined: dict[str, Value] = {}
        if not self.ops or self.ops[-1].name != "attn.return":
            raise VerifyError(f"graph @{self.name}: must end with attn.return")
        for op in self.ops:
            for field, value in op.operand_values():
                if defined.get(value.name) != value:
                    raise VerifyError(
                        f"{op.name}: operand {field}={value} is not defined before use"
                        + (" (shape differs from its definition)" if value.name in defined else "")
                    )
            op.verify()
            if op.result is None:
                continue
            if op.result.name in defined:
                raise VerifyError(f"{op.name}: value %{op.result.name} is defined twice")
            expected = op.result_shape()
            if expected is not None and tuple(expected) != tuple(op.result.shape):
                raise VerifyError(
                    f"{op.name}: result %{op.result.name} has shape {list(op.result.shape)}, expected {list(expected)}"
                )
            defined[op.result.name] = op.result
