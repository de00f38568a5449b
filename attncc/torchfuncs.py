"""torch functions applied to symbolic expressions while tracing FlexAttention-style callables.

``torch.where(q >= kv, score, -inf)`` inside a traced ``score_mod`` reaches :func:`dispatch`
through ``Expr.__torch_function__`` and becomes the equivalent attncc expression.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from attncc import dsl
from attncc.dsl import Expr, TraceError


def _where(cond: Any, a: Any, c: Any) -> Expr:
    return dsl.where(cond, _scalar(a), _scalar(c))


def _scalar(x: Any) -> Any:
    """0-d tensors captured by a callable (e.g. torch.tensor(-inf)) become Python numbers."""
    if isinstance(x, torch.Tensor):
        if x.dim() != 0:
            raise TraceError(f"a {tuple(x.shape)} tensor was used as a value; index it with symbols")
        return x.item()
    return x


def _clamp(x: Any, min: Any = None, max: Any = None) -> Expr:
    out = dsl.lift(_scalar(x))
    if min is not None:
        out = dsl.maximum(out, _scalar(min))
    if max is not None:
        out = dsl.minimum(out, _scalar(max))
    return out


def _binary(fn: Callable[[Any, Any], Any]) -> Callable[..., Any]:
    return lambda a, c: fn(dsl.lift(_scalar(a)), _scalar(c))


_TABLE: dict[Any, Callable[..., Any]] = {
    torch.where: _where,
    torch.abs: abs,
    torch.clamp: _clamp,
    torch.clip: _clamp,
    torch.minimum: lambda a, c: dsl.minimum(_scalar(a), _scalar(c)),
    torch.maximum: lambda a, c: dsl.maximum(_scalar(a), _scalar(c)),
    torch.tanh: dsl.tanh,
    torch.exp: dsl.exp,
    torch.log: dsl.log,
    torch.sqrt: dsl.sqrt,
    torch.logical_and: _binary(lambda a, c: a & c),
    torch.logical_or: _binary(lambda a, c: a | c),
    torch.logical_not: lambda a: ~dsl.lift(a),
    torch.floor_divide: _binary(lambda a, c: a // c),
    torch.remainder: _binary(lambda a, c: a % c),
    torch.eq: _binary(lambda a, c: a == c),
    torch.ne: _binary(lambda a, c: a != c),
    torch.lt: _binary(lambda a, c: a < c),
    torch.le: _binary(lambda a, c: a <= c),
    torch.gt: _binary(lambda a, c: a > c),
    torch.ge: _binary(lambda a, c: a >= c),
    torch.add: _binary(lambda a, c: a + c),
    torch.sub: _binary(lambda a, c: a - c),
    torch.mul: _binary(lambda a, c: a * c),
    torch.div: _binary(lambda a, c: a / c),
}


def dispatch(func: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """Apply the attncc equivalent of ``func`` or raise TraceError naming it."""
    handler = _TABLE.get(func)
    if handler is None:
        name = getattr(func, "__name__", repr(func))
        known = sorted(getattr(f, "__name__", "?") for f in _TABLE)
        raise TraceError(f"torch.{name} has no symbolic equivalent in attncc; supported: {known}")
    if func is torch.div and kwargs.get("rounding_mode") == "floor":
        return dsl.lift(_scalar(args[0])) // _scalar(args[1])
    if func is torch.div and kwargs.get("rounding_mode") is not None:
        raise TraceError(f"torch.div rounding_mode={kwargs['rounding_mode']!r} is not supported; use //")
    return handler(*args, **{k: v for k, v in kwargs.items() if k != "rounding_mode"})
