"""torch functions and tensor methods applied to symbolic expressions while tracing
FlexAttention-style callables.

``torch.where(q >= kv, score, -inf)`` inside a traced ``score_mod`` reaches :func:`dispatch`
through ``Expr.__torch_function__``; ``q_idx.clamp(0, 7)`` reaches :func:`method` through
``Expr.__getattr__``. Both read one table, so every operation works in both spellings. Everything
elementwise with a meaning over integers and reals is here: arithmetic, comparisons (also between
conditions), logical ops, min/max/clamp, abs/sign/floor/ceil/round/trunc,
exp/exp2/log/log2/log10/sqrt/rsqrt/pow/tanh/sigmoid/sin/cos, where, ``*_like`` constants and dtype
conversions.

>>> import torch, attncc as ac
>>> torch.exp2(-((ac.h + 1) * 8.0 / 4)).sym
2**(-2*h - 2)
>>> (ac.q - ac.kv).clamp(-4, 4).sym
Min(4, Max(-4, -kv + q))
>>> (ac.q < 4).long().sym
Piecewise((1, q < 4), (0, True))
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import sympy
import torch

from attncc import dsl
from attncc.dsl import Expr, TraceError


def _scalar(x: Any) -> Any:
    """0-d tensors captured by a callable (e.g. torch.tensor(-inf)) become Python numbers."""
    if isinstance(x, torch.Tensor):
        if x.dim() != 0:
            raise TraceError(f"a {tuple(x.shape)} tensor was used as a value; index it with symbols")
        return x.item()
    return x


def _lift(x: Any) -> Expr:
    return dsl.lift(_scalar(x))


def _where(cond: Any, a: Any = None, c: Any = None) -> Expr:
    if a is None or c is None:
        raise TraceError("torch.where(cond) with one argument returns indices; give both branches")
    return dsl.where(_scalar(cond), _scalar(a), _scalar(c))


def _clamp(x: Any, min: Any = None, max: Any = None) -> Expr:
    out = _lift(x)
    if min is not None:
        out = dsl.maximum(out, _scalar(min))
    if max is not None:
        out = dsl.minimum(out, _scalar(max))
    return out


def _binary(fn: Callable[[Expr, Any], Any]) -> Callable[..., Any]:
    def apply(a: Any, c: Any, *, alpha: Any = None, **_: Any) -> Any:
        return fn(_lift(a), _scalar(c) if alpha is None else _lift(c) * _scalar(alpha))

    return apply


def _unary(fn: Callable[[object], Expr]) -> Callable[..., Expr]:
    return lambda x, *_, **__: fn(_scalar(x))


def _div(a: Any, c: Any, *, rounding_mode: str | None = None) -> Expr:
    if rounding_mode == "floor":
        return _lift(a) // _scalar(c)
    if rounding_mode == "trunc":
        return dsl.trunc(_lift(a) / _scalar(c))
    if rounding_mode is not None:
        raise TraceError(f"torch.div rounding_mode={rounding_mode!r}; use None, 'floor' or 'trunc'")
    return _lift(a) / _scalar(c)


def _fmod(a: Any, c: Any) -> Expr:
    """C-style remainder (sign of the dividend): a - trunc(a / c) * c."""
    x, y = _lift(a), _lift(c)
    return x - dsl.trunc(x / y) * y


def _logical(op: str) -> Callable[..., Expr]:
    def apply(a: Any, c: Any) -> Expr:
        x, y = dsl.as_condition(_scalar(a)), dsl.as_condition(_scalar(c))
        return {"and": x & y, "or": x | y, "xor": x ^ y}[op]

    return apply


def _bitwise(op: str) -> Callable[..., Expr]:
    def apply(a: Any, c: Any) -> Expr:
        x, y = _lift(a), _lift(c)
        if not (x.is_boolean and y.is_boolean):
            raise TraceError(f"bitwise_{op} on integers has no symbolic form in attncc; use it on conditions")
        return _logical(op)(x, y)

    return apply


def _not(a: Any) -> Expr:
    return ~dsl.as_condition(_scalar(a))


def _bitwise_not(a: Any) -> Expr:
    x = _lift(a)
    if not x.is_boolean:
        raise TraceError("bitwise_not (~) of an integer has no symbolic form in attncc; use it on conditions")
    return ~x


def _constant(value: float | None) -> Callable[..., Expr]:
    """``zeros_like`` / ``ones_like`` (value given) and ``full_like`` (value from the call)."""

    def apply(x: Any, fill: Any = None, *, dtype: Any = None, **_: Any) -> Expr:
        v = _scalar(fill) if value is None else value
        if dtype is torch.bool or (dtype is None and isinstance(x, Expr) and x.is_boolean):
            return dsl.lift(bool(v))
        if dtype is not None and dtype.is_floating_point:
            return dsl.lift(float(v))
        return dsl.lift(v)

    return apply


def _to(x: Any, *args: Any, dtype: Any = None, **_: Any) -> Expr:
    """``x.to(dtype)`` (devices and other arguments are ignored): conditions become 0/1 for numeric
    dtypes, floats are truncated toward zero for integer dtypes, numbers become ``!= 0`` for bool."""
    dtype = dtype if dtype is not None else next((a for a in args if isinstance(a, torch.dtype)), None)
    if dtype is None:
        return _lift(x)
    if dtype is torch.bool:
        return dsl.as_condition(_scalar(x))
    if dtype.is_floating_point:
        return dsl.as_number(_scalar(x))
    return _to_int(x)


def _to_int(x: Any, *_: Any, **__: Any) -> Expr:
    e = dsl.as_number(_scalar(x))
    return e if e.sym.is_integer else dsl.trunc(e)


def _pow(a: Any, c: Any) -> Expr:
    return _lift(a) ** _scalar(c)


_FLOAT = _unary(dsl.as_number)

# torch functions and tensor-method names -> handler (a method's self is the handler's first argument)
_OPS: dict[str, Callable[..., Any]] = {
    "where": _where,
    "abs": _unary(lambda x: abs(_lift(x))),
    "absolute": _unary(lambda x: abs(_lift(x))),
    "neg": _unary(lambda x: -_lift(x)),
    "negative": _unary(lambda x: -_lift(x)),
    "clamp": _clamp,
    "clip": _clamp,
    "clamp_min": lambda x, m: _clamp(x, min=m),
    "clamp_max": lambda x, m: _clamp(x, max=m),
    "minimum": lambda a, c: dsl.minimum(_scalar(a), _scalar(c)),
    "maximum": lambda a, c: dsl.maximum(_scalar(a), _scalar(c)),
    "fmin": lambda a, c: dsl.minimum(_scalar(a), _scalar(c)),
    "fmax": lambda a, c: dsl.maximum(_scalar(a), _scalar(c)),
    "sign": _unary(dsl.sign),
    "sgn": _unary(dsl.sign),
    "floor": _unary(dsl.floor),
    "ceil": _unary(dsl.ceil),
    "round": _unary(dsl.round_),
    "trunc": _unary(dsl.trunc),
    "fix": _unary(dsl.trunc),
    "exp": _unary(dsl.exp),
    "exp2": _unary(dsl.exp2),
    "log": _unary(dsl.log),
    "log2": _unary(dsl.log2),
    "log10": _unary(dsl.log10),
    "sqrt": _unary(dsl.sqrt),
    "rsqrt": _unary(lambda x: 1 / dsl.sqrt(x)),
    "reciprocal": _unary(lambda x: 1 / _lift(x)),
    "square": _unary(lambda x: _lift(x) * _lift(x)),
    "pow": _pow,
    "float_power": _pow,
    "tanh": _unary(dsl.tanh),
    "sigmoid": _unary(dsl.sigmoid),
    "sin": _unary(dsl.sin),
    "cos": _unary(dsl.cos),
    "logical_and": _logical("and"),
    "logical_or": _logical("or"),
    "logical_xor": _logical("xor"),
    "logical_not": _not,
    "bitwise_and": _bitwise("and"),
    "bitwise_or": _bitwise("or"),
    "bitwise_xor": _bitwise("xor"),
    "bitwise_not": _bitwise_not,
    "floor_divide": _binary(lambda a, c: a // c),
    "remainder": _binary(lambda a, c: a % c),
    "fmod": _fmod,
    "div": _div,
    "divide": _div,
    "true_divide": _binary(lambda a, c: a / c),
    "add": _binary(lambda a, c: a + c),
    "sub": _binary(lambda a, c: a - c),
    "subtract": _binary(lambda a, c: a - c),
    "mul": _binary(lambda a, c: a * c),
    "multiply": _binary(lambda a, c: a * c),
    "eq": _binary(lambda a, c: a == c),
    "ne": _binary(lambda a, c: a != c),
    "not_equal": _binary(lambda a, c: a != c),
    "lt": _binary(lambda a, c: a < c),
    "less": _binary(lambda a, c: a < c),
    "le": _binary(lambda a, c: a <= c),
    "less_equal": _binary(lambda a, c: a <= c),
    "gt": _binary(lambda a, c: a > c),
    "greater": _binary(lambda a, c: a > c),
    "ge": _binary(lambda a, c: a >= c),
    "greater_equal": _binary(lambda a, c: a >= c),
    "zeros_like": _constant(0),
    "ones_like": _constant(1),
    "full_like": _constant(None),
}

# tensor methods only (no torch function of the name applies to an index value)
_METHODS: dict[str, Callable[..., Any]] = {
    **_OPS,
    "to": _to,
    "type": _to,
    "long": _to_int,
    "int": _to_int,
    "short": _to_int,
    "float": _FLOAT,
    "double": _FLOAT,
    "half": _FLOAT,
    "bfloat16": _FLOAT,
    "bool": _unary(dsl.as_condition),
    "type_as": lambda x, other: _lift(x),
    "new_full": lambda x, size, fill, **kw: _constant(None)(x, fill, **kw),
    "contiguous": _unary(_lift),
    "clone": _unary(_lift),
    "detach": _unary(_lift),
}

_TABLE: dict[Any, Callable[..., Any]] = {getattr(torch, n): f for n, f in _OPS.items() if hasattr(torch, n)}
_TABLE[torch.Tensor.__getitem__] = lambda x, index: x[index]  # x[None], x[...] on an index value
for _name in ("to", "long", "int", "float", "double", "bool", "type_as"):
    _TABLE[getattr(torch.Tensor, _name)] = _METHODS[_name]
_TABLE[torch.nn.functional.sigmoid] = _OPS["sigmoid"]
_TABLE[torch.nn.functional.tanh] = _OPS["tanh"]


def dispatch(func: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """Apply the attncc equivalent of ``func`` or raise TraceError naming it."""
    handler = _TABLE.get(func)
    if handler is None:
        tensor_method = getattr(torch.Tensor, getattr(func, "__name__", ""), None) is func
        name = getattr(func, "__name__", repr(func))
        if tensor_method and name in _METHODS:
            return _METHODS[name](*args, **kwargs)
        raise TraceError(
            f"torch.{name} has no symbolic equivalent in attncc; elementwise arithmetic, comparisons, "
            f"logical ops, rounding and math functions are traced (e.g. {', '.join(sorted(_OPS)[:12])}, ...)"
        )
    return handler(*args, **kwargs)


def handles(func: Any) -> bool:
    """True when ``func`` (a torch function) has a symbolic equivalent here."""
    try:
        return func in _TABLE
    except TypeError:  # unhashable
        return False


def has_method(name: str) -> bool:
    """True when the tensor method ``name`` has a symbolic equivalent here."""
    return name in _METHODS


def method(value: Expr, name: str) -> Any:
    """``value.name`` for a tensor method the tracer knows (bound to ``value``), else AttributeError."""
    if name in _METHODS:
        return functools.partial(_METHODS[name], value)
    if name == "item" or name == "tolist":
        raise TraceError(
            f"`.{name}()` of a symbolic index is data-dependent Python; keep it a tensor expression "
            "(use torch.where for choices)"
        )
    if name.startswith("_") or name not in dir(torch.Tensor):
        raise AttributeError(f"'Expr' object has no attribute {name!r}")
    if name.endswith("_") and name[:-1] in _METHODS:
        raise TraceError(f"in-place `.{name}()` cannot be traced; use the out-of-place `.{name[:-1]}()`")
    raise TraceError(f"tensor method `.{name}()` has no symbolic equivalent in attncc")


def sympy_nodes() -> list[type]:
    """The sympy node kinds traced callables produce (each target's emitters must handle them)."""
    return [
        sympy.Add, sympy.Mul, sympy.Pow, sympy.floor, sympy.ceiling, sympy.Mod, sympy.Min, sympy.Max,
        sympy.Abs, sympy.sign, sympy.Piecewise, sympy.exp, sympy.log, sympy.tanh, sympy.sin, sympy.cos,
        sympy.Indexed, sympy.Eq, sympy.Ne, sympy.Lt, sympy.Le, sympy.Gt, sympy.Ge, sympy.And, sympy.Or,
        sympy.Not, sympy.Xor, sympy.ITE,
    ]  # fmt: skip
