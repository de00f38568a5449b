"""The declaration language: symbolic index expressions that compose with Python operators.

``ac.q``, ``ac.kv``, ``ac.b``, ``ac.h`` and ``ac.score`` are :class:`Expr` objects; arithmetic
(``+ - * / // % ** abs``), comparisons and boolean ``& | ~`` build new ones. Runtime tensors are
declared with :func:`tensor` and indexed by expressions; :func:`per_head` makes a constant table
indexed by the head. torch functions (``torch.where``, ``torch.abs``, ...) work on them too, so
FlexAttention-style callables trace unchanged.

>>> import attncc as ac
>>> m = (ac.q >= ac.kv) & (ac.q - ac.kv < 128)
>>> m
Expr((q >= kv) & (-kv + q < 128))
>>> doc = ac.tensor("doc")
>>> doc[ac.q] == doc[ac.kv]
Expr(Eq(doc[q], doc[kv]))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import sympy

from attncc.errors import SpecError
from attncc.ir import exprs as X

Number = int | float | bool


@dataclass(frozen=True)
class Meta:
    """What an expression needs besides its formula.

    requires: (condition over B, H, Sq, Skv, message) pairs checked at call time.
    tables: constant tables by name (per-head parameters).
    dtypes: declared dtype ("int" | "float" | "bool") of runtime tensors by name.
    selectors: kv-block lists the spec computes from q and k (:class:`attncc.routing.Route`) by name.
    """

    requires: tuple[tuple[sympy.Basic, str], ...] = ()
    tables: tuple[tuple[str, tuple[float, ...]], ...] = ()
    dtypes: tuple[tuple[str, str], ...] = ()
    selectors: tuple[tuple[str, Any], ...] = ()

    def merge(self, other: Meta) -> Meta:
        if self is other or other == EMPTY:
            return self
        if self == EMPTY:
            return other
        return Meta(
            requires=_union(self.requires, other.requires),
            tables=_union_named(self.tables, other.tables, "per-head table"),
            dtypes=_union_named(self.dtypes, other.dtypes, "tensor"),
            selectors=_union_named(self.selectors, other.selectors, "routed block list"),
        )


def _union(a: tuple[Any, ...], b: tuple[Any, ...]) -> tuple[Any, ...]:
    return a + tuple(x for x in b if x not in a)


def _union_named(a: tuple[Any, ...], b: tuple[Any, ...], what: str) -> tuple[Any, ...]:
    known = dict(a)
    for name, value in b:
        if name in known and known[name] != value:
            raise SpecError(
                f"two different {what}s are both named {name!r} ({known[name]} vs {value}); give them distinct names"
            )
    return _union(a, b)


EMPTY = Meta()


class Expr:
    """A symbolic expression over the index symbols (wraps a sympy object)."""

    __slots__ = ("meta", "sym")
    __hash__ = None  # type: ignore[assignment]  # == builds an expression, so no hashing

    def __init__(self, sym: sympy.Basic, meta: Meta = EMPTY) -> None:
        self.sym = sym
        self.meta = meta

    def __repr__(self) -> str:
        return f"Expr({X.expr_str(self.sym)})"

    @property
    def is_boolean(self) -> bool:
        return X.is_boolean(self.sym)

    def __bool__(self) -> bool:
        raise TraceError(
            f"the truth value of symbolic expression `{X.expr_str(self.sym)}` is not known when "
            "the spec is declared: Python `if`, `and`, `or`, `not`, `min`, `max` cannot be traced; "
            "use `&`, `|`, `~`, ac.where(cond, a, b), ac.minimum, ac.maximum (or torch.where)"
        )

    def __index__(self) -> int:
        raise TraceError(
            f"symbolic expression `{X.expr_str(self.sym)}` was used as a Python integer "
            "(e.g. range(), list indexing or int()); only declared tensors can be indexed by it"
        )

    __int__ = __index__

    def __float__(self) -> float:
        raise TraceError(f"symbolic expression `{X.expr_str(self.sym)}` was converted to float")

    # arithmetic -------------------------------------------------------------------------
    def _num(self, other: object, op: str) -> tuple[sympy.Expr, sympy.Expr, Meta]:
        o = lift(other)
        for side in (self, o):
            if side.is_boolean:
                raise SpecError(
                    f"operator {op} needs numbers but `{X.expr_str(side.sym)}` is boolean; "
                    "use ac.where(cond, 1, 0) to turn a condition into a number"
                )
        return self.sym, o.sym, self.meta.merge(o.meta)

    def _arith(self, other: object, op: str, fn: Callable[[Any, Any], sympy.Basic]) -> Expr:
        a, c, meta = self._num(other, op)
        return Expr(fn(a, c), meta)

    def _rarith(self, other: object, op: str, fn: Callable[[Any, Any], sympy.Basic]) -> Expr:
        a, c, meta = self._num(other, op)
        return Expr(fn(c, a), meta)

    def __add__(self, o: object) -> Expr:
        return self._arith(o, "+", lambda a, c: a + c)

    def __radd__(self, o: object) -> Expr:
        return self._rarith(o, "+", lambda a, c: a + c)

    def __sub__(self, o: object) -> Expr:
        return self._arith(o, "-", lambda a, c: a - c)

    def __rsub__(self, o: object) -> Expr:
        return self._rarith(o, "-", lambda a, c: a - c)

    def __mul__(self, o: object) -> Expr:
        return self._arith(o, "*", lambda a, c: a * c)

    def __rmul__(self, o: object) -> Expr:
        return self._rarith(o, "*", lambda a, c: a * c)

    def __truediv__(self, o: object) -> Expr:
        return self._arith(o, "/", lambda a, c: a / c)

    def __rtruediv__(self, o: object) -> Expr:
        return self._rarith(o, "/", lambda a, c: a / c)

    def __floordiv__(self, o: object) -> Expr:
        return self._arith(o, "//", _floordiv)

    def __rfloordiv__(self, o: object) -> Expr:
        return self._rarith(o, "//", _floordiv)

    def __mod__(self, o: object) -> Expr:
        return self._arith(o, "%", sympy.Mod)

    def __rmod__(self, o: object) -> Expr:
        return self._rarith(o, "%", sympy.Mod)

    def __pow__(self, o: object) -> Expr:
        return self._arith(o, "**", lambda a, c: a**c)

    def __rpow__(self, o: object) -> Expr:
        return self._rarith(o, "**", lambda a, c: a**c)

    def __neg__(self) -> Expr:
        return self._arith(0, "-", lambda a, _: -a)

    def __pos__(self) -> Expr:
        return self

    def __abs__(self) -> Expr:
        return self._arith(0, "abs", lambda a, _: sympy.Abs(a))

    # comparisons ------------------------------------------------------------------------
    def __lt__(self, o: object) -> Expr:
        return self._arith(o, "<", sympy.Lt)

    def __le__(self, o: object) -> Expr:
        return self._arith(o, "<=", sympy.Le)

    def __gt__(self, o: object) -> Expr:
        return self._arith(o, ">", sympy.Gt)

    def __ge__(self, o: object) -> Expr:
        return self._arith(o, ">=", sympy.Ge)

    def __eq__(self, o: object) -> Expr:  # type: ignore[override]
        if (pair := self._conditions(o)) is not None:  # two conditions: equal truth values
            a, c, meta = pair
            return Expr(sympy.Or(sympy.And(a, c), sympy.And(sympy.Not(a), sympy.Not(c))), meta)
        return self._arith(o, "==", lambda a, c: sympy.Eq(a, c))

    def __ne__(self, o: object) -> Expr:  # type: ignore[override]
        if (pair := self._conditions(o)) is not None:
            a, c, meta = pair
            return Expr(sympy.Xor(a, c), meta)
        return self._arith(o, "!=", lambda a, c: sympy.Ne(a, c))

    def _conditions(self, other: object) -> tuple[sympy.Basic, sympy.Basic, Meta] | None:
        """Both sides as conditions when one is a condition and the other a condition or 0/1 (as
        torch compares booleans); None otherwise."""
        o = lift(other)
        if not (self.is_boolean or o.is_boolean):
            return None
        sides = []
        for side in (self, o):
            if side.is_boolean:
                sides.append(side.sym)
            elif side.sym in (sympy.Integer(0), sympy.Integer(1)):
                sides.append(sympy.true if side.sym == 1 else sympy.false)
            else:
                return None  # a condition against another number: _arith's error says what to do
        return sides[0], sides[1], self.meta.merge(o.meta)

    # boolean ----------------------------------------------------------------------------
    def _bool(self, other: object, op: str) -> tuple[sympy.Basic, sympy.Basic, Meta]:
        o = lift(other)
        for side in (self, o):
            if not side.is_boolean:
                raise SpecError(
                    f"operator {op} combines conditions but `{X.expr_str(side.sym)}` is a number; "
                    "compare it first (e.g. `x != 0`)"
                )
        return self.sym, o.sym, self.meta.merge(o.meta)

    def __and__(self, o: object) -> Expr:
        a, c, meta = self._bool(o, "&")
        return Expr(sympy.And(a, c), meta)

    __rand__ = __and__

    def __or__(self, o: object) -> Expr:
        a, c, meta = self._bool(o, "|")
        return Expr(sympy.Or(a, c), meta)

    __ror__ = __or__

    def __xor__(self, o: object) -> Expr:
        a, c, meta = self._bool(o, "^")
        return Expr(sympy.Xor(a, c), meta)

    def __invert__(self) -> Expr:
        a, _, meta = self._bool(True, "~")
        return Expr(sympy.Not(a), meta)

    # the tensor methods FlexAttention's own combinators call (and_masks, or_masks, noop_mask) ---
    device = None  # symbolic values live on no device; new_* below ignore the device they are given

    def new_ones(self, *size: Any, dtype: Any = None, **_: Any) -> Expr:
        """The constant 1 (``True`` for ``dtype=torch.bool``): ``b.new_ones(())`` in ``noop_mask``."""
        return _constant(1, size, dtype, "new_ones")

    def new_zeros(self, *size: Any, dtype: Any = None, **_: Any) -> Expr:
        """The constant 0 (``False`` for ``dtype=torch.bool``)."""
        return _constant(0, size, dtype, "new_zeros")

    def __getattr__(self, name: str) -> Any:
        """Tensor methods on index values while tracing (``q_idx.clamp(0, 7)``, ``.long()``, ...)."""
        from attncc.torchfuncs import method

        return method(self, name)

    def __getitem__(self, index: object) -> Expr:
        """``x[None]``, ``x[...]``, ``x[()]``: a symbolic value is one element."""
        if (
            index is None
            or index is Ellipsis
            or index == ()
            or (isinstance(index, tuple) and all(i is None or i is Ellipsis for i in index))
        ):
            return self
        raise TraceError(
            f"`{X.expr_str(self.sym)}` is one symbolic element and cannot be indexed by {index!r}; "
            "index a declared or captured tensor with it instead"
        )

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        from attncc.torchfuncs import dispatch

        return dispatch(func, args, kwargs or {})


class TraceError(SpecError):
    """A traced callable did something that has no symbolic meaning."""


def _constant(value: int, size: tuple[Any, ...], dtype: Any, label: str) -> Expr:
    shape = size[0] if len(size) == 1 and isinstance(size[0], tuple | list) else size
    if tuple(shape) not in ((), (1,)):
        raise TraceError(f"{label}{tuple(shape)}: a traced mask or score works on one element; use a 0-d size ()")
    if str(dtype) == "torch.bool":
        return lift(bool(value))
    return lift(float(value) if dtype is not None and getattr(dtype, "is_floating_point", False) else value)


def _floordiv(a: sympy.Expr, c: sympy.Expr) -> sympy.Expr:
    return sympy.floor(a / c)


def lift(value: object) -> Expr:
    """Turn a Python number or bool (or an Expr) into an Expr."""
    if isinstance(value, Expr):
        return value
    if isinstance(value, bool | int | float):
        return Expr(X.to_sympy_number(value))
    if isinstance(value, sympy.Basic):
        return Expr(value)
    raise SpecError(
        f"cannot use a {type(value).__name__} ({value!r}) in an attncc expression; "
        "use numbers, index symbols or declared tensors (ac.tensor)"
    )


@dataclass(frozen=True)
class TensorRef:
    """A runtime tensor passed by name at call time, indexable by expressions.

    >>> import attncc as ac
    >>> ac.tensor("doc_ids")[ac.q]
    Expr(doc_ids[q])
    """

    name: str
    dtype: str | None = None
    _meta: Meta = field(default=EMPTY, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise SpecError(f"tensor name must be a str, got {type(self.name).__name__} {self.name!r}")
        if not self.name.isidentifier() or self.name in {"q", "k", "v", "b", "h", "kv", "score"}:
            raise SpecError(f"tensor name {self.name!r} must be an identifier other than q, k, v, b, h, kv, score")
        if self.dtype not in (None, "int", "float", "bool"):
            raise SpecError(f"tensor {self.name!r}: dtype must be 'int', 'float' or 'bool', got {self.dtype!r}")

    def __getitem__(self, index: object) -> Expr:
        items = index if isinstance(index, tuple) else (index,)
        parts = [lift(i) for i in items]
        meta = self._meta
        for p in parts:
            if p.is_boolean:
                raise SpecError(f"tensor {self.name!r} indexed by a condition `{X.expr_str(p.sym)}`")
            meta = meta.merge(p.meta)
        if self.dtype is not None:
            meta = meta.merge(Meta(dtypes=((self.name, self.dtype),)))
        return Expr(X.tensor_base(self.name)[tuple(p.sym for p in parts)], meta)


def tensor(name: str, dtype: str | None = None) -> TensorRef:
    """Declare a runtime tensor; pass it at call time as a keyword: ``kern(q, k, v, name=t)``."""
    return TensorRef(name, dtype)


def per_head(values: Sequence[Number], name: str = "per_head") -> Expr:
    """A constant table indexed by the query head: ``per_head([64, 128])`` is ``table[h]``.

    Its length must equal ``num_heads`` (checked when the spec is built).

    >>> import attncc as ac
    >>> ac.sliding_window(ac.per_head([64, 128, 256, 512], name="window")).sym
    (kv <= q) & (q - window[h] <= kv)
    """
    vals = tuple(float(v) for v in values)
    if not vals:
        raise SpecError(f"per_head table {name!r} is empty")
    meta = Meta(tables=((name, vals),), dtypes=((name, "int" if all(v.is_integer() for v in vals) else "float"),))
    return TensorRef(name, _meta=meta)[X.h]


def where(cond: object, a: object, c: object) -> Expr:
    """``a`` where ``cond`` holds, else ``c`` (numbers or conditions on both branches)."""
    cnd, x, y = lift(cond), lift(a), lift(c)
    if not cnd.is_boolean:
        raise SpecError(f"where(): condition `{X.expr_str(cnd.sym)}` is not boolean")
    if x.is_boolean != y.is_boolean:
        raise SpecError("where(): both branches must be conditions or both numbers")
    meta = cnd.meta.merge(x.meta).merge(y.meta)
    if x.is_boolean:
        return Expr(sympy.ITE(cnd.sym, x.sym, y.sym), meta)
    return Expr(sympy.Piecewise((x.sym, cnd.sym), (y.sym, True)), meta)


def _fold(fn: Callable[..., sympy.Basic], values: Sequence[object], label: str) -> Expr:
    parts = [lift(v) for v in values]
    if not parts or any(p.is_boolean for p in parts):
        raise SpecError(f"{label}() needs one or more numbers")
    meta = EMPTY
    for p in parts:
        meta = meta.merge(p.meta)
    return Expr(fn(*(p.sym for p in parts)), meta)


def minimum(*values: object) -> Expr:
    """Symbolic min (Python's ``min`` cannot compare symbolic values)."""
    return _fold(sympy.Min, values, "minimum")


def maximum(*values: object) -> Expr:
    """Symbolic max."""
    return _fold(sympy.Max, values, "maximum")


def clamp(x: object, lo: object, hi: object) -> Expr:
    """``minimum(maximum(x, lo), hi)``."""
    return minimum(maximum(x, lo), hi)


def _unary(fn: Callable[[sympy.Expr], sympy.Expr], label: str) -> Callable[[object], Expr]:
    def apply(x: object) -> Expr:
        return _fold(fn, [x], label)

    apply.__name__ = label
    apply.__doc__ = f"Symbolic {label}."
    return apply


def _round_half_even(x: sympy.Expr) -> sympy.Expr:
    """torch.round: to the nearest integer, ties to the even one."""
    r = sympy.floor(x + sympy.Rational(1, 2))
    tie_to_odd = sympy.And(sympy.Eq(x + sympy.Rational(1, 2), r), sympy.Eq(sympy.Mod(r, 2), 1))
    return sympy.Piecewise((r - 1, tie_to_odd), (r, True))


def _trunc(x: sympy.Expr) -> sympy.Expr:
    """Toward zero (torch.trunc, and float -> int conversion)."""
    if x.is_integer:
        return x
    return sympy.Piecewise((sympy.floor(x), x >= 0), (sympy.ceiling(x), True))


tanh = _unary(sympy.tanh, "tanh")
exp = _unary(sympy.exp, "exp")
log = _unary(sympy.log, "log")
sqrt = _unary(sympy.sqrt, "sqrt")
sign = _unary(sympy.sign, "sign")
floor = _unary(sympy.floor, "floor")
ceil = _unary(sympy.ceiling, "ceil")
round_ = _unary(_round_half_even, "round")
trunc = _unary(_trunc, "trunc")
sin = _unary(sympy.sin, "sin")
cos = _unary(sympy.cos, "cos")
exp2 = _unary(lambda x: sympy.Integer(2) ** x, "exp2")
log2 = _unary(lambda x: sympy.log(x) / sympy.log(2), "log2")
log10 = _unary(lambda x: sympy.log(x) / sympy.log(10), "log10")
sigmoid = _unary(lambda x: 1 / (1 + sympy.exp(-x)), "sigmoid")


def as_number(x: object) -> Expr:
    """A condition as the number 1 or 0 (``cond.float()``, ``cond.long()``); numbers unchanged."""
    e = lift(x)
    if not e.is_boolean:
        return e
    return Expr(sympy.Piecewise((sympy.Integer(1), e.sym), (sympy.Integer(0), True)), e.meta)


def as_condition(x: object) -> Expr:
    """A number as the condition ``x != 0`` (``x.bool()``); conditions unchanged."""
    e = lift(x)
    return e if e.is_boolean else e != 0


b = Expr(X.b)
h = Expr(X.h)
q = Expr(X.q)
kv = Expr(X.kv)
score = Expr(X.score)
