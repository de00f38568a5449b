"""FX front end: find attention in a torch.fx graph and lift it into attncc specs.

Sites: ``scaled_dot_product_attention`` calls (is_causal, boolean or additive float attn_mask,
scale, enable_gqa) and decomposed ``matmul -> (scale) -> (mask) -> softmax -> matmul`` chains.
The mask's producer subgraph (arange, where, triu/tril, indexing of runtime tensors,
unsqueeze/view/expand, and every elementwise op the FlexAttention tracer knows: one table,
:mod:`attncc.torchfuncs`) is evaluated symbolically (:mod:`attncc.frontends.symtensor`) into an
attncc mask; K/V heads repeated by expand + reshape or repeat_interleave become GQA. A site that
cannot be lifted keeps its original op and the reason is recorded; nothing is computed differently
to get a lift.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
import torch.fx as fx

from attncc import torchfuncs
from attncc.dsl import Expr, lift
from attncc.errors import AttnccError, UnsupportedError
from attncc.frontends.symtensor import DIMS, SymTensor, arange, broadcast, constant
from attncc.ir import exprs as X

log = logging.getLogger("attncc.frontends.fx")
aten = torch.ops.aten
NEG_BIG = -1e30  # additive masks at or below this are "masked"


@dataclass
class Lifted:
    """What a site lifts to: a mask (sympy over b, h, q, kv), a bias, tensors it reads, GQA sources."""

    mask: sympy.Basic = sympy.true
    bias: sympy.Expr | None = None
    tensors: dict[str, fx.Node] = field(default_factory=dict)


def example_value(node: Any) -> Any:
    """The example value (a fake tensor) dynamo recorded for an FX node; a non-node is returned as is."""
    return node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else node


def shape_of(node: Any) -> tuple[int, ...]:
    """The node's shape; a symbolic size (dynamic sequence length) is -1."""
    v = example_value(node)
    if not isinstance(v, torch.Tensor):
        raise UnsupportedError(f"{node} has no tensor metadata")
    return tuple(int(s) if isinstance(s, int) else -1 for s in v.shape)


class Evaluator:
    """Evaluate the mask-producing part of a graph symbolically, node by node (memoized)."""

    # & and | on attention masks: also on 0/1 integer masks (a padding mask kept as int64), read as != 0.
    # Every other elementwise op goes through the tracer's table (attncc.torchfuncs, see _traced).
    ELEMENTWISE = {
        operator.and_: sympy.And,
        torch.logical_and: sympy.And,
        torch.bitwise_and: sympy.And,
        aten.logical_and.default: sympy.And,
        aten.bitwise_and.Tensor: sympy.And,
        operator.or_: sympy.Or,
        torch.logical_or: sympy.Or,
        torch.bitwise_or: sympy.Or,
        aten.logical_or.default: sympy.Or,
        aten.bitwise_or.Tensor: sympy.Or,
    }
    PASSTHROUGH = {"to", "bool", "long", "int", "float", "contiguous", "clone", "detach", "type_as", "type"}

    def __init__(self, graph: fx.Graph) -> None:
        self.graph = graph
        self.memo: dict[fx.Node, SymTensor] = {}
        self.tensors: dict[str, fx.Node] = {}

    def value(self, arg: Any) -> SymTensor:
        if isinstance(arg, fx.Node):
            if arg not in self.memo:
                self.memo[arg] = self._node(arg)
            return self.memo[arg]
        if isinstance(arg, bool):
            return constant(sympy.true if arg else sympy.false)
        if isinstance(arg, int | float):
            return constant(X.to_sympy_number(arg))
        raise UnsupportedError(f"cannot evaluate {arg!r} symbolically")

    def _node(self, node: fx.Node) -> SymTensor:
        if node.op in ("placeholder", "get_attr"):
            raise UnsupportedError(f"{node.name} is data, not an index expression")
        target, args, kwargs = node.target, node.args, node.kwargs
        name = getattr(target, "__name__", str(target))
        if target in (torch.arange, aten.arange.default, aten.arange.start, aten.arange.start_step):
            if len(args) == 1 and not isinstance(args[0], int):  # arange(symbolic length)
                return arange(shape_of(node)[0])
            ints = [int(a) for a in args if isinstance(a, int)]
            if not 1 <= len(ints) <= 3 or len(ints) != len(args):
                raise UnsupportedError(f"arange with arguments {args!r}")
            start, end, step = (
                (0, ints[0], 1) if len(ints) == 1 else (ints[0], ints[1], ints[2] if len(ints) == 3 else 1)
            )
            n = max(0, -(-(end - start) // step))
            return arange(n, start, step)
        if target in self.ELEMENTWISE:
            parts = [self.value(a) for a in args[:2]]
            exprs, shape = broadcast(*parts)
            exprs = [_as_bool(e) for e in exprs]
            return SymTensor(self.ELEMENTWISE[target](*exprs), shape)
        if target in (operator.invert, torch.logical_not, torch.bitwise_not, aten.logical_not.default):
            t = self.value(args[0])
            return SymTensor(sympy.Not(_as_bool(t.expr)), t.shape)
        if target in (operator.neg, torch.neg):
            t = self.value(args[0])
            return SymTensor(-t.expr, t.shape)
        if target in (torch.where, aten.where.self):
            exprs, shape = broadcast(*(self.value(a) for a in args[:3]))
            c, a, b = exprs
            if X.is_boolean(a) and X.is_boolean(b):
                return SymTensor(sympy.ITE(_as_bool(c), a, b), shape)
            return SymTensor(sympy.Piecewise((a, _as_bool(c)), (b, True)), shape)
        if target in (torch.triu, torch.tril):
            t = self.value(args[0])
            if t.ndim != 2:
                raise UnsupportedError(f"{name} of a {t.ndim}-d tensor")
            k = int(args[1]) if len(args) > 1 else int(kwargs.get("diagonal", 0))
            keep = sympy.Ge(DIMS[1] - DIMS[0], k) if target is torch.triu else sympy.Le(DIMS[1] - DIMS[0], k)
            zero = sympy.false if X.is_boolean(t.expr) else sympy.Integer(0)
            if X.is_boolean(t.expr):
                return SymTensor(sympy.And(keep, t.expr), t.shape)
            return SymTensor(sympy.Piecewise((t.expr, keep), (zero, True)), t.shape)
        if target in (torch.ones, torch.zeros, torch.full, torch.ones_like, torch.zeros_like):
            return self._filled(node)
        if node.op == "call_method" and name in self.PASSTHROUGH:
            inner = self.value(args[0])
            if name == "bool" or kwargs.get("dtype") is torch.bool or torch.bool in args[1:]:
                return SymTensor(_as_bool(inner.expr), inner.shape)
            return inner
        if node.op == "call_method" and name in ("unsqueeze", "expand", "view", "reshape", "new_zeros", "new_ones"):
            return self._method(node, name)
        if target in (torch.unsqueeze,):
            return self.value(args[0]).unsqueeze(int(args[1]))
        if target is operator.getitem:
            return self._getitem(node)
        fn = _torch_function(node)
        if fn is not None:  # everything else elementwise: the tracer's table (attncc.torchfuncs)
            return self._traced(node, fn)
        raise UnsupportedError(f"`{name}` ({node.op}) in the mask's producer graph is not lifted")

    def _traced(self, node: fx.Node, fn: Any) -> SymTensor:
        """An elementwise op evaluated by the FlexAttention tracer's table on the broadcast operands."""
        values = [self.value(a) if isinstance(a, fx.Node) else a for a in node.args]
        kwargs = {k: self.value(v) if isinstance(v, fx.Node) else v for k, v in node.kwargs.items()}
        tensors = [v for v in [*values, *kwargs.values()] if isinstance(v, SymTensor)]
        if not tensors:
            raise UnsupportedError(f"`{fn}` in the mask's producer graph has no symbolic operand")
        exprs, shape = broadcast(*tensors)
        wrapped = iter(Expr(e) for e in exprs)
        args = [next(wrapped) if isinstance(v, SymTensor) else v for v in values]
        kw = {k: next(wrapped) if isinstance(v, SymTensor) else v for k, v in kwargs.items()}
        try:
            out = torchfuncs.method(args[0], fn)(*args[1:], **kw) if isinstance(fn, str) else fn(*args, **kw)
        except (AttnccError, TypeError, AttributeError) as exc:
            raise UnsupportedError(f"`{node.target}` in the mask's producer graph: {exc}") from exc
        return SymTensor(lift(out).sym, shape)

    def _filled(self, node: fx.Node) -> SymTensor:
        shape = shape_of(node)
        value = 1 if node.target in (torch.ones, torch.ones_like) else 0
        if node.target is torch.full:
            value = node.args[1]
        dtype = node.kwargs.get("dtype")
        if dtype is torch.bool:
            return SymTensor(sympy.true if value else sympy.false, shape)
        return SymTensor(X.to_sympy_number(value), shape)

    def _method(self, node: fx.Node, name: str) -> SymTensor:
        if name in ("new_zeros", "new_ones"):
            return self._filled_like(node, 1 if name == "new_ones" else 0)
        t = self.value(node.args[0])
        if name == "unsqueeze":
            return t.unsqueeze(int(node.args[1]))
        target_shape = shape_of(node)
        if name == "expand":
            return t.expand(target_shape)
        # view / reshape that only adds or removes size-1 dims
        if [s for s in t.shape if s != 1] != [s for s in target_shape if s != 1]:
            raise UnsupportedError(f"{name} from {t.shape} to {target_shape} mixes index dims")
        big_old = [i for i, s in enumerate(t.shape) if s != 1]
        big_new = [i for i, s in enumerate(target_shape) if s != 1]
        mapping = {DIMS[o]: DIMS[n] for o, n in zip(big_old, big_new, strict=True)}
        return SymTensor(t.expr.xreplace(mapping), target_shape)

    def _filled_like(self, node: fx.Node, value: int) -> SymTensor:
        shape = shape_of(node)
        dtype = node.kwargs.get("dtype")
        if dtype is torch.bool:
            return SymTensor(sympy.true if value else sympy.false, shape)
        return SymTensor(sympy.Integer(value), shape)

    def _data(self, node: Any) -> tuple[fx.Node, bool] | None:
        """(graph input, converted to bool?) when ``node`` is a graph input seen through dtype/device
        conversions (``.to``, ``.bool()``, ...); None when it is computed from indices."""
        to_bool = False
        while isinstance(node, fx.Node):
            if node.op in ("placeholder", "get_attr"):
                return node, to_bool
            name = getattr(node.target, "__name__", str(node.target))
            if node.op == "call_method" and name in self.PASSTHROUGH:
                to_bool = (
                    to_bool or name == "bool" or node.kwargs.get("dtype") is torch.bool or torch.bool in node.args[1:]
                )
                node = node.args[0]
                continue
            return None
        return None

    def _getitem(self, node: fx.Node) -> SymTensor:
        base, index = node.args
        items = index if isinstance(index, tuple) else (index,)
        source = self._data(base)
        if source is not None:
            return self._gather(source[0], items, source[1])
        t = self.value(base)
        out, dim = t, 0
        for item in items:
            if item is None:
                out = out.unsqueeze(dim)
                dim += 1
            elif isinstance(item, slice) and item == slice(None):
                dim += 1
            elif item is Ellipsis:
                dim = out.ndim - sum(1 for i in items[items.index(item) + 1 :] if i is not None)
            else:
                raise UnsupportedError(f"indexing a symbolic tensor with {item!r}")
        return out

    def _gather(self, base: fx.Node, items: tuple[Any, ...], to_bool: bool = False) -> SymTensor:
        """A real tensor indexed by symbolic index tensors: a runtime-tensor access."""
        if any(not isinstance(i, fx.Node) for i in items) or len(items) != len(shape_of(base)):
            raise UnsupportedError(f"{base.name} is indexed by {items!r}; only one index tensor per dim is lifted")
        parts = [self.value(i) for i in items]
        exprs, shape = broadcast(*parts)
        name = f"t_{base.name}"
        self.tensors[name] = base
        data = X.tensor_base(name)[tuple(exprs)]
        dtype = getattr(example_value(base), "dtype", None)
        return SymTensor(sympy.Ne(data, 0) if (to_bool or dtype is torch.bool) else data, shape)


_OPERATORS = {
    operator.add: torch.add,
    operator.sub: torch.sub,
    operator.mul: torch.mul,
    operator.truediv: torch.true_divide,
    operator.floordiv: torch.floor_divide,
    operator.mod: torch.remainder,
    operator.pow: torch.pow,
    operator.abs: torch.abs,
    operator.lt: torch.lt,
    operator.le: torch.le,
    operator.gt: torch.gt,
    operator.ge: torch.ge,
    operator.eq: torch.eq,
    operator.ne: torch.ne,
}


def _torch_function(node: fx.Node) -> Any:
    """The torch function (or tensor-method name) an FX node applies, where attncc.torchfuncs traces it:
    ``torch.clamp``, ``Tensor.abs``, ``aten.minimum.default`` (by its name), ``operator.truediv``."""
    target = node.target
    if node.op == "call_method":
        return target if isinstance(target, str) and torchfuncs.has_method(target) else None
    if target in _OPERATORS:
        return _OPERATORS[target]
    if isinstance(target, torch._ops.OpOverload):
        target = getattr(torch, target._schema.name.split("::")[-1], None)
    return target if target is not None and torchfuncs.handles(target) else None


def _as_bool(e: sympy.Basic) -> sympy.Basic:
    if X.is_boolean(e):
        return e
    if e.is_number:
        return sympy.true if e != 0 else sympy.false
    return sympy.Ne(e, 0)


def to_mask(value: SymTensor, shape4: tuple[int, int, int, int]) -> tuple[sympy.Basic, sympy.Expr | None]:
    """Map a [B?, H?, Sq, Skv] symbolic mask onto b, h, q, kv; return (mask, additive bias)."""
    t = value.aligned(4)
    for have, want in zip(t.shape, shape4, strict=True):
        if have not in (1, want) and -1 not in (have, want):
            raise UnsupportedError(f"attn_mask shape {value.shape} does not broadcast to {shape4}")
    expr = t.expr.xreplace({DIMS[0]: X.b, DIMS[1]: X.h, DIMS[2]: X.q, DIMS[3]: X.kv})
    if X.is_boolean(expr):
        return expr, None
    if isinstance(expr, sympy.Piecewise) and len(expr.args) == 2:
        (a, cond), (c, _) = expr.args
        if a == 0 and c.is_number and float(c) <= NEG_BIG:
            return cond, None
        if c == 0 and a.is_number and float(a) <= NEG_BIG:
            return sympy.Not(cond), None
    if expr.is_number and float(expr) == 0:
        return sympy.true, None
    return sympy.true, expr


def lift_mask(graph: fx.Graph, mask_node: Any, shape4: tuple[int, int, int, int]) -> Lifted:
    """Lift the node producing an SDPA attn_mask (or None) into a mask and/or bias."""
    if mask_node is None:
        return Lifted()
    ev = Evaluator(graph)
    try:
        sym = ev.value(mask_node)
    except (UnsupportedError, AttnccError, TypeError, ValueError) as exc:
        raise UnsupportedError(f"the attention mask could not be traced back to index expressions: {exc}") from exc
    mask, bias = to_mask(sym, shape4)
    return Lifted(mask, bias, ev.tensors)
