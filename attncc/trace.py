"""Trace FlexAttention-style callables into attncc expressions.

``mask_mod(b, h, q_idx, kv_idx) -> bool`` and ``score_mod(score, b, h, q_idx, kv_idx) -> score``
are called once with symbolic arguments. Tensors they capture (closure variables or globals,
e.g. ``doc_ids``) become runtime tensors of the same name whose values are bound automatically
at call time. Anything untraceable raises a SpecError that names the file, line and reason.

>>> import torch, attncc as ac
>>> doc_ids = torch.tensor([0, 0, 1, 1])
>>> t = trace_mask(lambda b, h, q_idx, kv_idx: doc_ids[q_idx] == doc_ids[kv_idx])
>>> t.expr, sorted(t.captured)
(Expr(Eq(doc_ids[q], doc_ids[kv])), ['doc_ids'])
"""

from __future__ import annotations

import inspect
import linecache
import os
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sympy
import torch

from attncc import dsl
from attncc.dsl import Expr, TensorRef
from attncc.errors import SpecError
from attncc.ir import exprs as X

_PKG_DIR = os.path.dirname(os.path.abspath(__file__))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


@dataclass(frozen=True)
class Traced:
    """A traced callable: its expression and the tensors it captured, by name."""

    expr: Expr
    captured: dict[str, torch.Tensor]


def _dtype_kind(t: torch.Tensor) -> str:
    if t.dtype == torch.bool:
        return "bool"
    return "float" if t.is_floating_point() else "int"


class _Swapper:
    """Clones a traced callable and the helpers it calls, with captured tensors made symbolic.

    Tensors with one or more dims become :class:`TensorRef`s of their variable's name (renamed
    ``name_1``, ... when two different tensors share a name); 0-d tensors become their value
    (a constant of the spec). Helper functions the callable reaches through globals, closures
    or tuples of functions (``and_masks(m1, m2)``) are cloned the same way, so a tensor read by
    a helper is captured too. Functions of torch and attncc themselves are left as they are.
    """

    def __init__(self) -> None:
        self.captured: dict[str, torch.Tensor] = {}
        self.names: dict[int, str] = {}  # id(tensor) -> its runtime name
        self.clones: dict[int, types.FunctionType] = {}

    def value(self, name: str, value: Any, depth: int) -> Any:
        if isinstance(value, torch.Tensor):
            return self.tensor(name, value)
        if isinstance(value, types.FunctionType) and depth < _MAX_DEPTH and not _is_library(value):
            return self.function(value, depth + 1)
        if isinstance(value, tuple | list) and any(isinstance(x, types.FunctionType) for x in value):
            return type(value)(self.value(name, x, depth) for x in value)
        return value

    def tensor(self, name: str, value: torch.Tensor) -> Any:
        if value.dim() == 0:
            if value.requires_grad:
                raise SpecError(
                    f"captured 0-d tensor {name!r} requires grad: attncc bakes 0-d tensors in as constants; "
                    f"capture a 1-element tensor and index it ({name}[0]) to pass it at call time"
                )
            return value.item()
        if id(value) not in self.names:
            unique, i = name, 0
            while unique in self.captured:
                i += 1
                unique = f"{name}_{i}"
            self.names[id(value)] = unique
            self.captured[unique] = value
        return TensorRef(self.names[id(value)], _dtype_kind(value))

    def function(self, fn: types.FunctionType, depth: int) -> types.FunctionType:
        if id(fn) in self.clones:
            return self.clones[id(fn)]
        self.clones[id(fn)] = fn  # while its globals are swapped: a helper that calls itself sees the original
        code = fn.__code__
        glob = dict(fn.__globals__)
        for name in _global_names(code):
            if name in glob:
                glob[name] = self.value(name, glob[name], depth)
        cells = None
        if fn.__closure__:
            cells = tuple(
                types.CellType(self.value(name, _cell_value(cell), depth))
                for name, cell in zip(code.co_freevars, fn.__closure__, strict=True)
            )
        clone = types.FunctionType(code, glob, fn.__name__, fn.__defaults__, cells)
        clone.__kwdefaults__ = fn.__kwdefaults__
        self.clones[id(fn)] = clone
        return clone


_MAX_DEPTH = 8


def _is_library(fn: types.FunctionType) -> bool:
    path = os.path.abspath(fn.__code__.co_filename)
    return path.startswith((_PKG_DIR, _TORCH_DIR))


def _global_names(code: types.CodeType) -> set[str]:
    """Global names read by ``code`` and by the functions and lambdas defined inside it."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def _swap_tensors(fn: types.FunctionType) -> tuple[types.FunctionType, dict[str, torch.Tensor]]:
    """A copy of ``fn`` (and of the helpers it calls) whose captured tensors are symbolic."""
    swapper = _Swapper()
    clone = swapper.function(fn, 0)
    return clone, swapper.captured


def _cell_value(cell: types.CellType) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell (variable not yet assigned)
        return None


def _where(fn: Callable[..., Any], exc: BaseException) -> str:
    """'file:line: `source`' of the user's frame where ``exc`` was raised."""
    tb = exc.__traceback__
    spot = None
    while tb is not None:
        path = os.path.abspath(tb.tb_frame.f_code.co_filename)
        if not path.startswith((_PKG_DIR, _TORCH_DIR)):
            spot = (tb.tb_frame.f_code.co_filename, tb.tb_lineno)
        tb = tb.tb_next
    if spot is None:
        code = getattr(fn, "__code__", None)
        spot = (code.co_filename, code.co_firstlineno) if code else ("<unknown>", 0)
    line = linecache.getline(spot[0], spot[1]).strip()
    return f"{spot[0]}:{spot[1]}" + (f": `{line}`" if line else "")


def _call(fn: Callable[..., Any], args: list[Expr], label: str) -> tuple[Any, dict[str, torch.Tensor]]:
    if not callable(fn):
        raise SpecError(f"{label} must be an attncc expression or a callable, got {type(fn).__name__}")
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError) as exc:
        raise SpecError(f"{label}: cannot read the signature of {fn!r}: {exc}") from exc
    positional = [p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) != len(args) and not any(p.kind == p.VAR_POSITIONAL for p in params.values()):
        names = "score, b, h, q_idx, kv_idx" if len(args) == 5 else "b, h, q_idx, kv_idx"
        raise SpecError(f"{label} must take {len(args)} arguments ({names}); {fn!r} takes {len(positional)}")
    target, captured = _swap_tensors(fn) if isinstance(fn, types.FunctionType) else (fn, {})
    try:
        return target(*args), captured
    except SpecError as exc:
        raise SpecError(f"{label} cannot be traced at {_where(fn, exc)}: {exc}") from exc
    except Exception as exc:
        raise SpecError(
            f"{label} cannot be traced at {_where(fn, exc)}: {type(exc).__name__}: {exc}. "
            "attncc traces arithmetic, comparisons, &/|/~, torch.where and indexing of captured tensors"
        ) from exc


def trace_mask(fn: Callable[..., Any]) -> Traced:
    """Trace ``mask_mod(b, h, q_idx, kv_idx)`` into a boolean expression."""
    out, captured = _call(fn, [dsl.b, dsl.h, dsl.q, dsl.kv], "mask_mod")
    expr = dsl.lift(out) if isinstance(out, bool | Expr) else None
    if expr is None:
        raise SpecError(f"mask_mod must return a condition, got {type(out).__name__} {out!r}")
    if not expr.is_boolean:
        if isinstance(expr.sym, sympy.Indexed) and captured.get(str(expr.sym.base)) is not None:
            return Traced(expr != 0, captured)
        raise SpecError(f"mask_mod returned `{X.expr_str(expr.sym)}`, a number; a mask must be a condition")
    return Traced(expr, captured)


def trace_score_mod(fn: Callable[..., Any]) -> Traced:
    """Trace ``score_mod(score, b, h, q_idx, kv_idx)`` into a numeric expression."""
    out, captured = _call(fn, [dsl.score, dsl.b, dsl.h, dsl.q, dsl.kv], "score_mod")
    if not isinstance(out, Expr | int | float) or isinstance(out, bool):
        raise SpecError(f"score_mod must return a number, got {type(out).__name__} {out!r}")
    expr = dsl.lift(out)
    if expr.is_boolean:
        raise SpecError(f"score_mod returned the condition `{X.expr_str(expr.sym)}`; it must return a score")
    return Traced(expr, captured)
