"""Mask-building subgraphs of ONNX models lifted back to attncc mask expressions.

Exporters build an attention mask from index tensors: ``Range`` or ``arange`` constants, comparisons, ``And`` /
``Or`` / ``Not``, ``Where``, arithmetic, ``Unsqueeze`` / ``Reshape`` / ``Expand`` for broadcasting, and ``Gather``
reads of a runtime padding mask (transformers' vmap'd mask functions flatten it and gather with computed
indices). :func:`lift_mask` walks that subgraph once, at rewrite time, and returns one expression in ``b, h, q,
kv`` whose runtime tensors are the graph inputs it reads, so the block-sparse passes prove the tiles of its index
part (causal, windows) and the mask is never materialized as an N x N tensor.

Each tensor of the subgraph is one of

- a number array (``Num``): it depends on constants and input shapes only, and is computed by the ``onnx``
  reference evaluator node by node (shapes are static in exported models);
- a view of a graph input (``View``): the input's coordinates at each element, as integer arrays, carried through
  ``Reshape``, ``Flatten``, ``Gather``, ``Slice``, ``Transpose``, ``Unsqueeze`` / ``Squeeze`` and ``Expand``;
- a symbolic element (``Sym``): an attncc expression in placeholder axis symbols ``_a0, _a1, ...`` (axis i of the
  tensor; size-1 axes never appear).

Where a number array meets a symbolic value it becomes an expression: one value; an affine function of the axis
indices (``arange`` constants, ``b * S + kv`` gather indices); a boolean band over two axes (a constant causal
or window mask); else a read of the constant as a runtime tensor passed at call time (its block map is then
classified per call, as a block layout's is). A view becomes a read of the input with affine coordinates.
Anything else (an op not listed, a view index that is not affine, a dynamic shape) is a :class:`NotLifted` with
the reason; the caller then reads the mask's values at run time instead.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import onnx
import sympy
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import attncc as ac
from attncc.dsl import Expr
from attncc.errors import SpecError
from attncc.ir import exprs as X

_RESERVED = {"q", "k", "v", "b", "h", "kv", "score"}
_AXES = [sympy.Symbol(f"_a{i}", integer=True, nonnegative=True) for i in range(8)]


class NotLifted(Exception):
    """The mask subgraph has something :func:`lift_mask` does not lift; the message says what."""


@dataclass(frozen=True)
class Sym:
    """A symbolic tensor: its shape, the expression of its element at (``_a0``, ``_a1``, ...), and its element
    kind (``b`` bool, ``i`` integer, ``f`` float: ONNX's Div truncates integers)."""

    shape: tuple[int, ...]
    expr: Expr
    kind: str


@dataclass(frozen=True)
class View:
    """A graph input seen through index-moving ops: ``coords[i]`` is the input's i-th coordinate of each element."""

    name: str
    dtype: np.dtype
    coords: tuple[np.ndarray, ...]
    as_bool: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.coords[0].shape) if self.coords else ()


Value = np.ndarray | View | Sym


@dataclass
class MaskLift:
    """A lifted mask: ``expr`` over [B, H, Sq, Skv] (b, h, q, kv), the graph inputs it reads (attncc tensor name
    -> (graph input name, the dtype attncc passes: ``int`` or ``float``)), and the constant tensors it reads (name
    -> array)."""

    expr: Expr
    inputs: dict[str, tuple[str, str]] = field(default_factory=dict)
    constants: dict[str, np.ndarray] = field(default_factory=dict)
    shape: tuple[int, ...] = ()  # the mask's shape, left-padded with 1s to rank 4
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # graph input -> its declared shape


def _kind(dtype: np.dtype) -> str:
    return "b" if dtype == np.bool_ else "f" if dtype.kind == "f" else "i"


def _rename(e: Expr, mapping: Mapping[int, int | Expr]) -> Expr:
    subs = {_AXES[i]: (t if isinstance(t, Expr) else _AXES[t]) for i, t in mapping.items()}
    return Expr(e.sym.xreplace({k: (v.sym if isinstance(v, Expr) else v) for k, v in subs.items()}), e.meta)


def _aligned(s: Sym, rank: int) -> Expr:
    """``s``'s expression with its axes renamed for right-aligned broadcasting into ``rank`` axes."""
    shift = rank - len(s.shape)
    return _rename(s.expr, {i: i + shift for i in reversed(range(len(s.shape)))}) if shift else s.expr


def _compressed(a: np.ndarray) -> np.ndarray:
    """``a`` with each broadcast axis (stride 0, as Expand makes them) cut to one element: same values."""
    return a[tuple(slice(0, 1) if st == 0 and n > 1 else slice(None) for st, n in zip(a.strides, a.shape, strict=True))]


def _affine(a: np.ndarray) -> Expr | None:
    """``c + sum_i s_i * _a{i}`` when the integer array ``a`` is exactly that, else None."""
    if a.dtype.kind not in "iub" or a.size == 0:
        return None
    a = np.asarray(_compressed(a), np.int64)
    origin = (0,) * a.ndim
    c = int(a[origin]) if a.ndim else int(a)
    steps = []
    for i, n in enumerate(a.shape):
        steps.append(int(a[tuple(1 if j == i else 0 for j in range(a.ndim))]) - c if n > 1 else 0)
    fit = np.full(a.shape, c, np.int64)
    for i, s in enumerate(steps):
        if s:
            fit = fit + s * np.arange(a.shape[i]).reshape([-1 if j == i else 1 for j in range(a.ndim)])
    if not np.array_equal(fit, a):
        return None
    out = ac.dsl.lift(c)
    for i, s in enumerate(steps):
        if s:
            out = out + s * Expr(_AXES[i])
    return out


def _band(a: np.ndarray) -> Expr | None:
    """A boolean array that varies along one or two axes as a threshold or band over them, else None."""
    a = _compressed(a)
    varying = [i for i, n in enumerate(a.shape) if n > 1 and not (a == a.take([0], axis=i)).all()]
    if len(varying) == 1:
        (i,) = varying
        line = np.moveaxis(a, i, -1).reshape(-1, a.shape[i])[0]
        idx = np.nonzero(line)[0]
        if idx.size and np.array_equal(idx, np.arange(idx[0], idx[-1] + 1)):
            x = Expr(_AXES[i])
            return (x >= int(idx[0])) & (x <= int(idx[-1]))
        return None
    if len(varying) != 2:
        return None
    i, j = varying
    found = plane_band(np.moveaxis(a, (i, j), (-2, -1)).reshape(-1, a.shape[i], a.shape[j])[0])
    if found is None:
        return None
    lo, hi = found
    row, col = Expr(_AXES[i]), Expr(_AXES[j])
    parts = ([] if lo is None else [col >= row + lo]) + ([] if hi is None else [col <= row + hi])
    return parts[0] & parts[1] if len(parts) == 2 else parts[0] if parts else ac.dsl.lift(True)


def plane_band(plane: np.ndarray) -> tuple[int | None, int | None] | None:
    """(lo, hi) when the boolean [rows, cols] array keeps exactly lo <= col - row <= hi (None: that side does not
    bind within the array), else None (also for an empty one)."""
    rows, cols = np.nonzero(plane)
    if rows.size == 0:
        return None
    d = cols - rows
    lo, hi = int(d.min()), int(d.max())
    offsets = np.arange(plane.shape[1])[None, :] - np.arange(plane.shape[0])[:, None]
    if not np.array_equal(plane, (offsets >= lo) & (offsets <= hi)):
        return None
    return (None if lo <= -(plane.shape[0] - 1) else lo), (None if hi >= plane.shape[1] - 1 else hi)


_LAYOUT_BLOCKS = (128, 64, 32, 16, 8)


def _layout(a: np.ndarray) -> tuple[tuple[int, int], int, np.ndarray] | None:
    """A boolean array varying along two axes whose tiles of b x b (b from 128 down to 8, the last row and column
    of tiles ragged) are each all true or all false: ((row axis, column axis), b, the [tiles, tiles] table)."""
    c = _compressed(a)
    varying = [i for i, n in enumerate(c.shape) if n > 1 and not (c == c.take([0], axis=i)).all()]
    if len(varying) != 2:
        return None
    i, j = varying
    plane = np.moveaxis(c, (i, j), (-2, -1)).reshape(-1, c.shape[i], c.shape[j])[0]
    for size in _LAYOUT_BLOCKS:
        table = plane[::size, ::size]
        grown = np.repeat(np.repeat(table, size, axis=0), size, axis=1)[: plane.shape[0], : plane.shape[1]]
        if min(plane.shape) > size and np.array_equal(grown, plane):
            return (i, j), size, table
    return None


class _Lifter:
    def __init__(self, proto: onnx.ModelProto) -> None:
        self.proto = proto
        self.producer = {o: n for n in proto.graph.node for o in n.output if o}
        self.inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
        self.inputs = {i.name: i for i in proto.graph.input if i.name not in self.inits}
        self.opsets = {o.domain or "": o.version for o in proto.opset_import}
        self.memo: dict[str, Value] = {}
        self.lifted = MaskLift(ac.dsl.lift(True))

    # ---- values ----
    def value(self, name: str) -> Value:
        if name not in self.memo:
            self.memo[name] = self._value(name)
        return self.memo[name]

    def _value(self, name: str) -> Value:
        if name in self.inits:
            return self.inits[name]
        if name in self.inputs:
            info = self.inputs[name]
            dims = info.type.tensor_type.shape.dim
            if not all(d.HasField("dim_value") for d in dims):
                raise NotLifted(f"graph input {name!r} has no static shape")
            shape = tuple(d.dim_value for d in dims)
            self.lifted.input_shapes[name] = shape
            dtype = helper.tensor_dtype_to_np_dtype(info.type.tensor_type.elem_type)
            return View(name, np.dtype(dtype), tuple(np.indices(shape, dtype=np.int64)))
        node = self.producer.get(name)
        if node is None:
            raise NotLifted(f"tensor {name!r} has no producer")
        args = [self.value(i) if i else None for i in node.input]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.domain not in ("", "ai.onnx"):
            raise NotLifted(f"{node.op_type} of domain {node.domain}")
        if all(a is None or isinstance(a, np.ndarray) for a in args):
            return self._fold(node, cast(list[np.ndarray | None], args), list(node.output).index(name))
        if list(node.output).index(name) != 0:
            raise NotLifted(f"output {name!r} of {node.op_type}")
        op = _OPS.get(node.op_type)
        if op is None:
            raise NotLifted(f"{node.op_type} ({node.name or name}) on a tensor that depends on a graph input")
        return op(self, args, attrs)

    def _fold(self, node: onnx.NodeProto, args: list[np.ndarray | None], out: int) -> np.ndarray:
        feeds = {n: a for n, a in zip(node.input, args, strict=True) if n and a is not None}
        try:
            evaluator = ReferenceEvaluator(node, opsets={"": self.opsets.get("", 18)})
            return np.asarray(cast(list[Any], evaluator.run(None, feeds))[out])
        except Exception as exc:  # e.g. a subgraph reading outer names: the mask is then read by value
            raise NotLifted(f"{node.op_type} ({node.name or node.output[0]}) not evaluated here: {exc}") from exc

    # ---- conversions ----
    def sym(self, v: Value) -> Sym:
        if isinstance(v, Sym):
            return v
        if isinstance(v, View):
            return self._read(v)
        return Sym(tuple(v.shape), self._constant(v), _kind(v.dtype))

    def _constant(self, a: np.ndarray) -> Expr:
        flat = a.reshape(-1)
        if flat.size and (flat == flat[0]).all():
            x = flat[0]
            return ac.dsl.lift(bool(x) if a.dtype == np.bool_ else int(x) if a.dtype.kind in "iu" else float(x))
        found = _band(a) if a.dtype == np.bool_ else _affine(a)
        if found is not None:
            return found
        name = f"onnx_const{len(self.lifted.constants)}"
        layout = _layout(a) if a.dtype == np.bool_ else None
        if layout is not None:  # whole tiles visible or not: the tiles' table, read at floor(row / b), floor(col / b)
            (i, j), size, table = layout
            self.lifted.constants[name] = table.astype(np.int64)
            row, col = ac.dsl.floor(Expr(_AXES[i]) / size), ac.dsl.floor(Expr(_AXES[j]) / size)
            return ac.tensor(name, "int")[row, col] != 0
        kind = "float" if a.dtype.kind == "f" else "int"
        self.lifted.constants[name] = a.astype(np.float32 if kind == "float" else np.int64)
        index = [Expr(_AXES[i]) if n > 1 else 0 for i, n in enumerate(a.shape)]
        read = ac.tensor(name, kind)[tuple(index)] if index else ac.tensor(name, kind)[0]
        return read != 0 if a.dtype == np.bool_ else read

    def _read(self, v: View) -> Sym:
        index = []
        for c in v.coords:
            e = self._index(c)
            if e is None:
                raise NotLifted(f"graph input {v.name!r} is read at coordinates that are not affine in the indices")
            index.append(e)
        kind = "float" if v.dtype.kind == "f" else "int"
        tname = next((t for t, (g, _) in self.lifted.inputs.items() if g == v.name), None)
        if tname is None:
            tname = re.sub(r"\W", "_", v.name)
            if not tname.isidentifier() or tname in _RESERVED or tname in self.lifted.inputs:
                tname = f"onnx_in{len(self.lifted.inputs)}_{tname}".replace("__", "_")
            self.lifted.inputs[tname] = (v.name, kind)
        read = ac.tensor(tname, kind)[tuple(index) if index else 0]
        boolean = v.as_bool or v.dtype == np.bool_
        return Sym(v.shape, (read != 0) if boolean else read, "b" if boolean else _kind(v.dtype))

    @staticmethod
    def _index(c: np.ndarray) -> Expr | None:
        flat = c.reshape(-1)
        if flat.size and (flat == flat[0]).all():
            return ac.dsl.lift(int(flat[0]))
        return _affine(np.asarray(c))


# ---- op handlers: (lifter, args, attrs) -> Value; number-only nodes never reach them ----
Handler = Callable[[_Lifter, list[Value | None], dict[str, object]], Value]
_OPS: dict[str, Handler] = {}


def _op(*names: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        for n in names:
            _OPS[n] = fn
        return fn

    return register


def _num(v: Value | None, what: str) -> np.ndarray:
    if not isinstance(v, np.ndarray):
        raise NotLifted(f"{what} depends on a graph input's values")
    return v


def _ints(v: Value | None, what: str) -> list[int]:
    return [int(x) for x in _num(v, what).reshape(-1)]


def _data(args: list[Value | None]) -> View | Sym:
    """The data operand of a shape or index op: a view or a symbolic value. A number array reaches here only when
    another operand (a shape, axes, indices) depends on a graph input: not lifted."""
    x = args[0]
    if not isinstance(x, View | Sym):
        raise NotLifted("a shape or index operand that depends on a graph input")
    return x


def _move(v: View | Sym, fn: Callable[[np.ndarray], np.ndarray], what: str) -> View | Sym:
    """Apply an index-moving function to a view's coordinates; a symbolic value moves only as a reshape that keeps
    its non-unit axes in order (the shape ``fn`` gives is read from a one-element probe's broadcast)."""
    if isinstance(v, View):
        return View(v.name, v.dtype, tuple(np.asarray(fn(c)) for c in v.coords), v.as_bool)
    return _resized(v, tuple(fn(np.broadcast_to(np.zeros((), np.int8), v.shape)).shape), what)


def _resized(v: Sym, shape: tuple[int, ...], what: str) -> Sym:
    """``v`` reshaped to ``shape`` where that only adds or drops axes of size 1."""
    old = [i for i, n in enumerate(v.shape) if n > 1]
    new = [i for i, n in enumerate(shape) if n > 1]
    if [v.shape[i] for i in old] != [shape[i] for i in new]:
        raise NotLifted(f"{what} of a symbolic {v.shape} to {shape} mixes its axes")
    return Sym(shape, _rename(v.expr, dict(zip(old, new, strict=True))), v.kind)


@_op("Identity")
def _identity(lf: _Lifter, args: list[Value | None], attrs: dict[str, object]) -> Value:
    assert args[0] is not None
    return args[0]


@_op("Shape")
def _shape(lf: _Lifter, args: list[Value | None], attrs: dict[str, object]) -> Value:
    x = _data(args)
    start, end = int(attrs.get("start", 0)), attrs.get("end")  # type: ignore[call-overload]
    return np.asarray(x.shape[start : None if end is None else int(end)], np.int64)  # type: ignore[call-overload]


@_op("Size")
def _size(lf: _Lifter, args: list[Value | None], attrs: dict[str, object]) -> Value:
    x = _data(args)
    return np.asarray(int(np.prod(x.shape)), np.int64)


@_op("Cast")
def _cast(lf: _Lifter, args: list[Value | None], attrs: dict[str, object]) -> Value:
    x = args[0]
    to = np.dtype(helper.tensor_dtype_to_np_dtype(int(attrs["to"])))  # type: ignore[call-overload]
    if isinstance(x, View):
        if to == np.bool_:
            return View(x.name, x.dtype, x.coords, True)
        x = lf.sym(x)  # integer ids and positions cast to float stay exact below 2**24
    assert isinstance(x, Sym)
    kind = _kind(to)
    if kind == "b":
        return x if x.kind == "b" else Sym(x.shape, x.expr != 0, "b")
    if x.kind == "b":
        return Sym(x.shape, ac.where(x.expr, 1, 0), kind)
    if kind == "i" and x.kind == "f":  # float -> int truncates toward zero
        return Sym(x.shape, ac.dsl.trunc(x.expr), kind)
    return Sym(x.shape, x.expr, kind)


def _unary(fn: Callable[[Expr], Expr], kind: str | None = None) -> Handler:
    def handle(lf: _Lifter, args: list[Value | None], attrs: dict[str, object]) -> Value:
        s = lf.sym(args[0])  # type: ignore[arg-type]
        return Sym(s.shape, fn(s.expr), kind or s.kind)

    return handle


_OPS.update({
    "Not": _unary(lambda e: ~e, "b"),
    "Abs": _unary(abs),
    "Neg": _unary(lambda e: -e),
    "Floor": _unary(ac.dsl.floor),
    "Ceil": _unary(ac.dsl.ceil),
})  # fmt: skip


_ARITHMETIC: dict[str, Callable[[Expr, Expr], Expr]] = {
    "Add": lambda a, b: a + b,
    "Sub": lambda a, b: a - b,
    "Mul": lambda a, b: a * b,
    "Max": lambda a, b: ac.maximum(a, b),
    "Min": lambda a, b: ac.minimum(a, b),
}
_LOGICAL: dict[str, Callable[[Expr, Expr], Expr]] = {
    "Equal": lambda a, b: a == b,
    "Less": lambda a, b: a < b,
    "LessOrEqual": lambda a, b: a <= b,
    "Greater": lambda a, b: a > b,
    "GreaterOrEqual": lambda a, b: a >= b,
    "And": lambda a, b: a & b,
    "Or": lambda a, b: a | b,
    "Xor": lambda a, b: a ^ b,
}


def _elementwise(lf: _Lifter, args: list[Value | None], fn: Callable[..., Expr], kind: str | None = None) -> Sym:
    """``fn`` of the arguments broadcast right-aligned; the kind given, else the first argument's (ONNX's
    arithmetic takes one type)."""
    syms = [lf.sym(a) for a in args if a is not None]
    try:
        shape = np.broadcast_shapes(*(s.shape for s in syms))
    except ValueError as exc:
        raise NotLifted(str(exc)) from exc
    return Sym(tuple(shape), fn(*(_aligned(s, len(shape)) for s in syms)), kind or syms[0].kind)


def _binary(fn: Callable[[Expr, Expr], Expr], kind: str | None) -> Handler:
    return lambda lf, args, attrs: _elementwise(lf, args, fn, kind)


_OPS.update({name: _binary(fn, None) for name, fn in _ARITHMETIC.items()})
_OPS.update({name: _binary(fn, "b") for name, fn in _LOGICAL.items()})


@_op("Div")
def _div(lf: _Lifter, args: list[Value | None], attrs: dict[str, object]) -> Value:
    out = _elementwise(lf, args, lambda a, b: a / b)
    return Sym(out.shape, ac.dsl.trunc(out.expr), "i") if out.kind == "i" else out  # integers: toward zero


@_op("Mod")
def _mod(lf: _Lifter, args: list[Value | None], attrs: dict[str, object]) -> Value:
    if attrs.get("fmod"):
        raise NotLifted("Mod with fmod=1")
    return _elementwise(lf, args, lambda a, b: a % b)  # integers, fmod=0: the divisor's sign, as Python's %


@_op("Where")
def _where(lf: _Lifter, args: list[Value | None], attrs: dict[str, object]) -> Value:
    out = _elementwise(lf, args, lambda c, a, b: ac.where(c, a, b))
    return Sym(out.shape, out.expr, lf.sym(args[1]).kind)  # type: ignore[arg-type]


@_op("Unsqueeze")
def _unsqueeze(lf: _Lifter, args: list[Value | None], attrs: dict[str, object]) -> Value:
    x = _data(args)
    axes = _ints(args[1], "Unsqueeze axes") if len(args) > 1 else [int(a) for a in attrs["axes"]]  # type: ignore[attr-defined]
    rank = len(x.shape) + len(axes)
    return _move(x, lambda c: np.expand_dims(c, tuple(a % rank for a in axes)), "Unsqueeze")


@_op("Squeeze")
def _squeeze(lf: _Lifter, args: list[Value | None], attrs: dict[str, object]) -> Value:
    x = _data(args)
    given = args[1] if len(args) > 1 else attrs.get("axes")
    axes = None if given is None else tuple(int(a) for a in np.asarray(given).reshape(-1))
    return _move(x, lambda c: np.squeeze(c, axes), "Squeeze")


@_op("Reshape")
def _reshape(lf: _Lifter, args: list[Value | None], attrs: dict[str, object]) -> Value:
    x = _data(args)
    dims = _ints(args[1], "Reshape shape")
    if attrs.get("allowzero"):
        raise NotLifted("Reshape with allowzero=1")
    target = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return _move(x, lambda c: c.reshape(target), "Reshape")


@_op("Flatten")
def _flatten(lf: _Lifter, args: list[Value | None], attrs: dict[str, object]) -> Value:
    x = _data(args)
    axis = int(attrs.get("axis", 1)) % (len(x.shape) + 1)  # type: ignore[call-overload]
    outer = int(np.prod(x.shape[:axis]))
    return _move(x, lambda c: c.reshape(outer, -1), "Flatten")


@_op("Expand")
def _expand(lf: _Lifter, args: list[Value | None], attrs: dict[str, object]) -> Value:
    x = _data(args)
    shape = np.broadcast_shapes(x.shape, tuple(_ints(args[1], "Expand shape")))
    if isinstance(x, Sym):
        return Sym(tuple(shape), _aligned(x, len(shape)), x.kind)
    return _move(x, lambda c: np.broadcast_to(c, shape), "Expand")


@_op("Transpose")
def _transpose(lf: _Lifter, args: list[Value | None], attrs: dict[str, object]) -> Value:
    x = _data(args)
    perm = [int(p) for p in attrs.get("perm", range(len(x.shape))[::-1])]  # type: ignore[attr-defined]
    if isinstance(x, Sym):
        return Sym(tuple(x.shape[p] for p in perm), _rename(x.expr, {p: i for i, p in enumerate(perm)}), x.kind)
    return _move(x, lambda c: np.transpose(c, perm), "Transpose")


@_op("Gather")
def _gather(lf: _Lifter, args: list[Value | None], attrs: dict[str, object]) -> Value:
    data, idx = args[0], args[1]
    axis = int(attrs.get("axis", 0))  # type: ignore[call-overload]
    if not isinstance(data, View):
        raise NotLifted("Gather from a computed tensor")
    at = _num(idx, "Gather indices")
    n = data.shape[axis]
    at = np.where(at < 0, at + n, at)
    return _move(data, lambda c: np.take(c, at, axis=axis), "Gather")


@_op("Slice")
def _slice(lf: _Lifter, args: list[Value | None], attrs: dict[str, object]) -> Value:
    x = _data(args)
    starts, ends = _ints(args[1], "Slice starts"), _ints(args[2], "Slice ends")
    axes = _ints(args[3], "Slice axes") if len(args) > 3 and args[3] is not None else list(range(len(starts)))
    steps = _ints(args[4], "Slice steps") if len(args) > 4 and args[4] is not None else [1] * len(starts)
    index: list[slice] = [slice(None)] * len(x.shape)
    for a, s, e, st in zip(axes, starts, ends, steps, strict=True):
        index[a % len(x.shape)] = slice(s, e, st)
    if isinstance(x, View):
        return _move(x, lambda c: c[tuple(index)], "Slice")
    picked = [np.arange(n)[sl] for n, sl in zip(x.shape, index, strict=True)]
    mapping: dict[int, int | Expr] = {}
    for i, rows in enumerate(picked):
        if x.shape[i] > 1:  # axis i now reads rows[a_i] = start + step * a_i
            first, step = int(rows[0]) if rows.size else 0, int(rows[1] - rows[0]) if rows.size > 1 else 0
            mapping[i] = first + step * Expr(_AXES[i]) if rows.size > 1 else ac.dsl.lift(first)
    return Sym(tuple(len(r) for r in picked), _rename(x.expr, mapping), x.kind)


def lift_mask(proto: onnx.ModelProto, name: str) -> MaskLift:
    """The tensor ``name`` of ``proto`` (an attention mask over [B, H, Sq, Skv], broadcast right-aligned) as an
    attncc expression. Raises :class:`NotLifted` with the reason.

    >>> import numpy as np
    >>> from onnx import TensorProto, helper
    >>> nodes = [helper.make_node("Range", ["zero", "n", "one"], ["i"]),
    ...          helper.make_node("Unsqueeze", ["i", "ax"], ["col"]),
    ...          helper.make_node("LessOrEqual", ["i", "col"], ["causal"]),
    ...          helper.make_node("Unsqueeze", ["pad", "ax12"], ["pad4"]),
    ...          helper.make_node("Cast", ["pad4"], ["keep_kv"], to=TensorProto.BOOL),
    ...          helper.make_node("And", ["causal", "keep_kv"], ["mask"])]
    >>> inits = [helper.make_tensor(n, TensorProto.INT64, s, v) for n, s, v in
    ...          [("zero", [], [0]), ("n", [], [6]), ("one", [], [1]), ("ax", [1], [1]), ("ax12", [2], [1, 2])]]
    >>> pad = helper.make_tensor_value_info("pad", TensorProto.INT64, [2, 6])
    >>> out = helper.make_tensor_value_info("mask", TensorProto.BOOL, None)
    >>> model = helper.make_model(helper.make_graph(nodes, "m", [pad], [out], inits))
    >>> lifted = lift_mask(model, "mask")
    >>> lifted.expr, lifted.inputs
    (Expr((kv <= q) & Ne(pad[b, kv], 0)), {'pad': ('pad', 'int')})
    """
    lf = _Lifter(proto)
    try:
        s = lf.sym(lf.value(name))
    except (SpecError, ValueError, IndexError, TypeError) as exc:  # what numpy or sympy refuse: read by value
        raise NotLifted(f"{type(exc).__name__}: {exc}") from exc
    if len(s.shape) > 4:
        raise NotLifted(f"a mask of rank {len(s.shape)}")
    expr = _aligned(s, 4)
    targets = dict(enumerate((X.b, X.h, X.q, X.kv)))
    lf.lifted.expr = Expr(expr.sym.xreplace({_AXES[i]: t for i, t in targets.items()}), expr.meta)
    if lf.lifted.expr.sym.free_symbols & set(_AXES):
        raise NotLifted("the mask has more axes than [B, H, Sq, Skv]")
    lf.lifted.shape = (1,) * (4 - len(s.shape)) + tuple(s.shape)
    return lf.lifted
