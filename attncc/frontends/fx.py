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
import math
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
from attncc.ir.core import Graph, Op, Value
from attncc.ir.ops import InputOp, MaskOp, PVOp, QKOp, ReturnOp, RopeOp, ScaleOp, ScoreModOp, SoftmaxOp, TensorOp
from attncc.passes.normalize import boolean
from attncc.rope import NAMES as ROPE_NAMES

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
        self.scores: set[fx.Node] = set()  # score-chain nodes: what reads them is never taken as data
        self._clear: set[fx.Node] = set()  # nodes known not to depend on the scores

    def value(self, arg: Any) -> SymTensor:
        if isinstance(arg, fx.Node):
            if arg not in self.memo:
                try:
                    self.memo[arg] = self._checked(arg, self._node(arg))
                except UnsupportedError as exc:
                    self.memo[arg] = self._computed(arg, exc)
            return self.memo[arg]
        if isinstance(arg, bool):
            return constant(sympy.true if arg else sympy.false)
        if isinstance(arg, int | float):
            return constant(X.to_sympy_number(arg))
        raise UnsupportedError(f"cannot evaluate {arg!r} symbolically")

    def _node(self, node: fx.Node) -> SymTensor:
        if node.op in ("placeholder", "get_attr"):
            return self._whole(node)
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
        if target is torch.diff:
            return self._diff(node)
        if target is torch.cumsum or (node.op == "call_method" and name == "cumsum"):
            return self._cumsum(node)
        if target is torch.masked_fill or (node.op == "call_method" and name == "masked_fill"):
            exprs, shape = broadcast(*(self.value(a) for a in args[:3]))
            t, c, fill = exprs
            return SymTensor(sympy.Piecewise((fill, _as_bool(c)), (t, True)), shape)
        if target in (torch.triu, torch.tril) or (node.op == "call_method" and name in ("triu", "tril")):
            t = self.value(args[0])
            if t.ndim != 2:
                raise UnsupportedError(f"{name} of a {t.ndim}-d tensor")
            k = int(args[1]) if len(args) > 1 else int(kwargs.get("diagonal", 0))
            upper = target is torch.triu or target == "triu"
            keep = sympy.Ge(DIMS[1] - DIMS[0], k) if upper else sympy.Le(DIMS[1] - DIMS[0], k)
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
        if node.op == "call_method" and name in (
            "unsqueeze",
            "expand",
            "view",
            "reshape",
            "new_zeros",
            "new_ones",
            "repeat",
        ):
            return self._method(node, name)
        if target in (torch.unsqueeze,):
            return self.value(args[0]).unsqueeze(int(args[1]))
        if target is operator.getitem:
            return self._getitem(node)
        fn = _torch_function(node)
        if fn is not None:  # everything else elementwise: the tracer's table (attncc.torchfuncs)
            return self._traced(node, fn)
        raise UnsupportedError(f"`{name}` ({node.op}) in the mask's producer graph is not lifted")

    def _checked(self, node: fx.Node, value: SymTensor) -> SymTensor:
        """``value`` unless the node's dtype changes what it holds in a way an expression does not say:
        rounding to bfloat16/float16 (Falcon builds ALiBi in bfloat16) or truncating a float to an
        integer. Those are read as runtime tensors instead (the graph computes them exactly as the model
        does). Steps on the scores are exempt: kernels compute scores in float32 or wider, as SDPA does."""
        if node.op in ("placeholder", "get_attr"):  # a graph input holds its values as they are
            return value
        out, expr = getattr(example_value(node), "dtype", None), sympy.sympify(value.expr)
        if out is None or out is torch.bool or X.is_boolean(expr) or self._reads_scores(node):
            return value
        if out in (torch.bfloat16, torch.float16) and not expr.is_number:
            raise UnsupportedError(f"{node.name} is rounded to {out}")
        if not out.is_floating_point and not out.is_complex and expr.is_integer is not True:
            inputs = [getattr(example_value(a), "dtype", None) for a in node.all_input_nodes]
            if any(d is not None and d.is_floating_point for d in inputs):
                raise UnsupportedError(f"{node.name} truncates a float to {out}")
        return value

    def _computed(self, node: fx.Node, why: UnsupportedError) -> SymTensor:
        """A value the evaluator cannot write as an index expression (a cumsum of data, a bias built
        with permute/embedding...) but that does not depend on the scores: the graph still computes it,
        and the kernel reads it as a runtime tensor at the element's own indices."""
        value = example_value(node)
        if self._reads_scores(node) or not isinstance(value, torch.Tensor) or value.ndim == 0:
            raise why
        log.info("attncc: %s is read as a runtime tensor (%s)", node.name, why)
        return self._whole(node)

    def _reads_scores(self, node: fx.Node) -> bool:
        """Whether ``node`` depends on a score-chain node: a walk over its ancestors (iterative: a
        value computed from the activations has the whole model above it). Nodes a finished walk
        visited without meeting the scores are remembered as clear."""
        if not self.scores:
            return False
        stack, seen = [node], set()
        while stack:
            n = stack.pop()
            if n in self.scores:
                return True
            if n in seen or n in self._clear:
                continue
            seen.add(n)
            stack.extend(n.all_input_nodes)
        self._clear |= seen
        return False

    def _diff(self, node: fx.Node) -> SymTensor:
        """``torch.diff(x, dim=d, prepend=p)`` with n = 1 and at most one prepended element."""
        args = dict(zip(("input", "n", "dim", "prepend", "append"), node.args, strict=False)) | dict(node.kwargs)
        x = self.value(args["input"])
        dim = int(args.get("dim", -1)) % x.ndim
        if int(args.get("n", 1)) != 1 or args.get("append") is not None:
            raise UnsupportedError("diff with n != 1 or append")
        d = DIMS[dim]
        if args.get("prepend") is None:
            shape = tuple(n - 1 if i == dim else n for i, n in enumerate(x.shape))
            return SymTensor(x.expr.xreplace({d: d + 1}) - x.expr, shape)
        p = self.value(args["prepend"]).aligned(x.ndim)
        if p.shape[dim] != 1:
            raise UnsupportedError(f"diff with a prepend of {p.shape[dim]} elements")
        first = x.expr.xreplace({d: 0}) - p.expr  # one prepended element: the length stays x's
        return SymTensor(
            sympy.Piecewise((first, sympy.Eq(d, 0)), (x.expr - x.expr.xreplace({d: d - 1}), True)), x.shape
        )

    def _cumsum(self, node: fx.Node) -> SymTensor:
        """``cumsum`` along a dim the value does not vary on: value x (index + 1)."""
        x = self.value(node.args[0])
        dim = int(node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)) % x.ndim
        expr = sympy.Piecewise((1, x.expr), (0, True)) if X.is_boolean(x.expr) else x.expr
        if DIMS[dim] in expr.free_symbols:
            raise UnsupportedError("cumsum of a value that varies along the summed dim")
        return SymTensor(expr * (DIMS[dim] + 1), x.shape)

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
        if name == "repeat":  # out[i] = t[i mod n] along each repeated dim
            reps = node.args[1:] if not isinstance(node.args[1], tuple | list) else tuple(node.args[1])
            if not all(isinstance(r, int) for r in reps) or -1 in t.shape:
                raise UnsupportedError(f"repeat{tuple(reps)} of a tensor of shape {t.shape}")
            t = t.aligned(len(reps))
            mapping = {DIMS[i]: sympy.Mod(DIMS[i], n) for i, (n, r) in enumerate(zip(t.shape, reps)) if n > 1 and r > 1}
            return SymTensor(t.expr.xreplace(mapping), tuple(n * r for n, r in zip(t.shape, reps, strict=True)))
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

    def _getitem(self, node: fx.Node) -> SymTensor:
        base, index = node.args
        items = index if isinstance(index, tuple) else (index,)
        t = self.value(base)  # a graph input is a runtime tensor read whole; index tensors then move its indices
        if items and all(isinstance(i, fx.Node) for i in items):
            return self._take(t, items)
        out, dim = t, 0
        for item in items:
            if item is None:
                out = out.unsqueeze(dim)
                dim += 1
            elif isinstance(item, slice) and item == slice(None):
                dim += 1
            elif isinstance(item, slice):
                out = _sliced(out, dim, item)
                dim += 1
            elif item is Ellipsis:
                dim = out.ndim - sum(1 for i in items[items.index(item) + 1 :] if i is not None)
            else:
                raise UnsupportedError(f"indexing a symbolic tensor with {item!r}")
        return out

    def _whole(self, node: fx.Node) -> SymTensor:
        """A real tensor used as a whole (a learned bias added to the scores, a boolean mask passed
        in): a runtime-tensor read at the element's own indices (index 0 along its size-1 dims)."""
        value = example_value(node)
        if not isinstance(value, torch.Tensor) or value.ndim == 0:
            raise UnsupportedError(f"{node.name} is not a tensor with dims to index")
        shape = shape_of(node)
        name = f"t_{node.name}"
        self.tensors[name] = node
        data = X.tensor_base(name)[tuple(DIMS[i] if n != 1 else 0 for i, n in enumerate(shape))]
        return SymTensor(sympy.Ne(data, 0) if value.dtype is torch.bool else data, shape)

    def _take(self, t: SymTensor, items: tuple[Any, ...]) -> SymTensor:
        """``t[i0, i1, ...]`` with one integer index tensor per leading dim (advanced indexing): the
        element at the broadcast indices, so ``positions[batch, q]`` reads ``positions`` at (b, q)."""
        dtypes = [getattr(example_value(i), "dtype", None) for i in items]
        if len(items) > t.ndim or any(d is None or d.is_floating_point or d is torch.bool for d in dtypes):
            raise UnsupportedError(f"indexing a symbolic tensor with {[i.name for i in items]}")
        parts = [self.value(i) for i in items]
        exprs, shape = broadcast(*parts)
        rest = t.shape[len(items) :]
        lead = len(shape)
        mapping = {DIMS[i]: e for i, e in enumerate(exprs)}
        mapping |= {DIMS[len(items) + j]: DIMS[lead + j] for j in range(len(rest))}
        return SymTensor(t.expr.xreplace(mapping), (*shape, *rest))


_OPERATORS = {
    operator.add: torch.add,
    operator.sub: torch.sub,
    operator.mul: torch.mul,
    operator.truediv: torch.true_divide,
    operator.iadd: torch.add,  # `x *= c` on a fresh intermediate (dynamo records the in-place operator)
    operator.isub: torch.sub,
    operator.imul: torch.mul,
    operator.itruediv: torch.true_divide,
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


def _sliced(t: SymTensor, dim: int, item: slice) -> SymTensor:
    """``t[..., start:stop:step, ...]`` along ``dim`` (integer bounds; a symbolic length only when the
    slice keeps its end)."""
    n = t.shape[dim]
    if any(v is not None and not isinstance(v, int) for v in (item.start, item.stop, item.step)):
        raise UnsupportedError(f"slicing a symbolic tensor with {item!r}")
    if n == -1 and item.stop is not None:
        raise UnsupportedError(f"slicing a dim of symbolic length with {item!r}")
    start, stop, step = item.indices(n) if n != -1 else (item.start or 0, None, item.step or 1)
    if step < 1:
        raise UnsupportedError(f"slicing with step {step}")
    size = -1 if stop is None else max(0, -(-(stop - start) // step))
    d = DIMS[dim]
    expr = t.expr.xreplace({d: start + step * d}) if size != 1 else t.expr.xreplace({d: start})
    return SymTensor(expr, (*t.shape[:dim], size, *t.shape[dim + 1 :]))


def _as_bool(e: sympy.Basic) -> sympy.Basic:
    if X.is_boolean(e):
        return e
    if e.is_number:
        return sympy.true if e != 0 else sympy.false
    return sympy.Ne(e, 0)


def lift_mask(graph: fx.Graph, mask_node: Any, shape4: tuple[int, int, int, int]) -> Lifted:
    """Lift the node producing an SDPA attn_mask (or None) into a mask and/or bias."""
    if mask_node is None:
        return Lifted()
    ev = Evaluator(graph)
    try:
        sym = ev.value(mask_node)
    except (UnsupportedError, AttnccError, TypeError, ValueError) as exc:
        raise UnsupportedError(f"the attention mask could not be traced back to index expressions: {exc}") from exc
    mask, bias = _as_mask(_indexed(sym, shape4))
    return Lifted(mask, bias, ev.tensors)


def _kv_source(node: Any) -> tuple[Any, int]:
    """(node, repeat factor): see through HF's repeat_kv (expand + reshape) and repeat_interleave."""
    if not isinstance(node, fx.Node):
        return node, 1
    name = getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method" and name == "reshape":
        inner = node.args[0]
        if isinstance(inner, fx.Node) and inner.op == "call_method" and inner.target == "expand":
            src = inner.args[0]
            if isinstance(src, fx.Node) and src.target is operator.getitem:
                base, index = src.args
                if isinstance(index, tuple) and len(index) == 5 and index[2] is None:
                    rep = shape_of(inner)[2]
                    return base, rep
    if node.target in (torch.repeat_interleave,) or (node.op == "call_method" and name == "repeat_interleave"):
        reps, dim = node.args[1], node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else None)
        if isinstance(reps, int) and dim == 1:
            return node.args[0], reps
    return node, 1


def _called(node: Any, *targets: Any) -> bool:
    """``node`` calls one of ``targets`` (functions, or method names as strings)."""
    if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method"):
        return False
    return any(node.target is t or node.target == t for t in targets)


def _without_empty_cache(node: Any) -> Any:
    """See through ``torch.cat([empty, x], dim=-2)``: a KV cache's first step (Hugging Face's
    DynamicCache concatenates the new keys to an empty tensor)."""
    if not _called(node, torch.cat) or node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0) not in (-2, 2):
        return node
    parts = list(node.args[0])
    live = [p for p in parts if not (isinstance(p, fx.Node) and shape_of(p) == (0,))]
    return live[0] if len(live) == 1 else node


def _rope_of(node: Any) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """(x, cos, sin) when ``node`` is ``x * cos + rotate_half(x) * sin`` (rotate-half convention,
    ``rotate_half(x) = cat((-x[..., D/2:], x[..., :D/2]), -1)``), else None."""
    if not _called(node, operator.add, torch.add) or len(node.args) != 2:
        return None
    for a, b in (node.args, node.args[::-1]):
        if not (_called(a, operator.mul, torch.mul) and _called(b, operator.mul, torch.mul)):
            continue
        for x, cos in (a.args, a.args[::-1]):
            for rot, sin in (b.args, b.args[::-1]):
                if _is_rotate_half(rot, x) and _rope_table(cos, x) and _rope_table(sin, x):
                    return x, cos, sin
    return None


def _is_rotate_half(rot: Any, x: Any) -> bool:
    if not (_called(rot, torch.cat) and isinstance(x, fx.Node)):
        return False
    dim = rot.kwargs.get("dim", rot.args[1] if len(rot.args) > 1 else 0)
    parts = rot.args[0]
    if dim not in (-1, 3) or len(parts) != 2 or not _called(parts[0], operator.neg, torch.neg):
        return False
    shape = shape_of(x)
    if len(shape) != 4 or shape[-1] < 2 or shape[-1] % 2:
        return False
    half = shape[-1] // 2
    return _is_slice(parts[0].args[0], x, half, None) and _is_slice(parts[1], x, None, half)


def _is_slice(node: Any, x: fx.Node, start: int | None, stop: int | None) -> bool:
    """``node`` is ``x[..., start:stop]``."""
    if not (_called(node, operator.getitem) and node.args[0] is x):
        return False
    index = node.args[1]
    if not (isinstance(index, tuple) and len(index) == 2 and index[0] is Ellipsis and isinstance(index[1], slice)):
        return False
    sl = index[1]
    return (sl.start in (start, 0 if start is None else start)) and sl.stop == stop and sl.step in (None, 1)


def _rope_table(node: Any, x: fx.Node) -> bool:
    """A cos/sin table that broadcasts over heads: [S, D] or [B|1, 1, S, D], float, no gradient."""
    value = example_value(node)
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.requires_grad:
        return False
    shape, xs = shape_of(node), shape_of(x)
    return (len(shape) == 2 and shape == xs[2:]) or (
        len(shape) == 4 and shape[0] in (1, xs[0]) and shape[1] == 1 and shape[2:] == xs[2:]
    )


def _fused_rope(q: Any, k: Any) -> tuple[fx.Node, fx.Node, list[fx.Node]] | None:
    """(q source, k source, [cos, sin]) when q and k are rotated by the same RoPE tables right
    before attention; the kernel then applies the rotation itself."""
    rq, rk = _rope_of(q), _rope_of(_without_empty_cache(k))
    if rq is None or rk is None:
        if rq is not None or rk is not None:
            log.info("attncc: RoPE found on %s only; left to the graph", "q" if rq else "k")
        return None
    if rq[1:] != rk[1:] or shape_of(rq[0])[2] != shape_of(rk[0])[2]:
        log.info("attncc: q and k are rotated with different tables or lengths; RoPE left to the graph")
        return None
    return rq[0], rk[0], [rq[1], rq[2]]


# --- attention sites as decomposed IR -------------------------------------------------------------


@dataclass
class Site:
    """One attention site of an FX graph as decomposed IR (:mod:`attncc.ir.ops`) plus the FX nodes that
    feed it. Each FX step between ``q @ k^T`` and softmax becomes one IR op in the model's order
    (``attn.scale``, ``attn.score_mod``, ``attn.mask``); whether the chain is one attention, and what
    it fuses to, is the ``fuse`` pass's decision, not the front end's."""

    node: fx.Node  # what the site's output replaces: the SDPA call or the ``@ v`` matmul
    graph: Graph
    inputs: dict[str, Any]  # "q", "k", "v", every runtime tensor's name and the rope tables -> FX node
    note: str = ""  # what was left in the graph and why (a partial rotary embedding)
    # (FX node of a 0-d tensor, its traced value) for a scale the graph reads from a tensor (``torch.compile(...,
    # dynamic=True)`` passes a module's float attribute as one): the kernel holds the value, each call checks it
    checks: list[tuple[Any, float]] = field(default_factory=list)


SOFTMAX = (torch.softmax, torch.nn.functional.softmax, torch.Tensor.softmax, "softmax")
MATMULS = (torch.matmul, operator.matmul, torch.bmm, torch.baddbmm, torch.einsum, "matmul", "bmm", "baddbmm")
# between softmax and ``@ v``: conversions and dropout in eval (``F.dropout(p, rate, training=False)``)
PROBS_PASSTHROUGH = {"to", "type", "type_as", "float", "half", "bfloat16", "contiguous"}
LOOKBACK = 12  # FX steps walked from a softmax back to the score matmul


def is_softmax(node: Any, last_dim: bool = True) -> bool:
    """``node`` is a softmax (over the last dim when ``last_dim``)."""
    if not (isinstance(node, fx.Node) and node.op in ("call_function", "call_method") and node.target in SOFTMAX):
        return False
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    return not last_dim or dim in (-1, 3)


def activation_product(node: Any) -> bool:
    """``node`` is a matmul of two activations (not of an activation and a weight)."""
    if not (isinstance(node, fx.Node) and node.op in ("call_function", "call_method") and node.target in MATMULS):
        return False
    if node.target in (torch.baddbmm, "baddbmm"):  # input + alpha * batch1 @ batch2
        operands = [a for a in (*node.args[1:3], node.kwargs.get("batch1"), node.kwargs.get("batch2")) if a is not None]
        operands = [a for a in operands if isinstance(a, fx.Node)]
    else:
        operands = [a for a in node.args if isinstance(a, fx.Node)]
    live = [a for a in operands if a.op != "get_attr" and not isinstance(example_value(a), torch.nn.Parameter)]
    return len(live) >= 2


def _reaches_product(node: Any, budget: int) -> bool:
    if not isinstance(node, fx.Node) or node.op in ("placeholder", "get_attr") or budget <= 0:
        return False
    return activation_product(node) or any(_reaches_product(a, budget - 1) for a in node.all_input_nodes)


def score_chain(soft: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
    """(the product of two activations a softmax reads, the FX steps in between in program order), or
    None when the softmax reads no such product within ``LOOKBACK`` steps (it is not attention).
    Each step must read the scores through exactly one operand (``scores + scores`` is refused)."""
    node: Any = soft.args[0] if soft.args else None
    steps: list[fx.Node] = []
    for _ in range(LOOKBACK):
        if not isinstance(node, fx.Node) or node.op in ("placeholder", "get_attr"):
            return None
        if activation_product(node):
            return node, steps[::-1]
        steps.append(node)
        on_path = [a for a in node.all_input_nodes if _reaches_product(a, LOOKBACK)]
        if len(on_path) > 1:
            raise UnsupportedError(f"{node.name} reads the scores through {len(on_path)} operands")
        if not on_path:
            return None
        node = on_path[0]
    return None


def _probs_source(node: Any) -> tuple[Any, str]:
    """(what ``node`` is, seen through dtype conversions and dropout, the dropout in training that
    stands in the way or "") between softmax and ``@ v``."""
    training = ""
    while isinstance(node, fx.Node) and node.op in ("call_function", "call_method"):
        name = getattr(node.target, "__name__", str(node.target))
        same_shape = name in ("view", "reshape") and shape_of(node) == shape_of(node.args[0])
        if node.op == "call_method" and (name in PROBS_PASSTHROUGH or same_shape):
            node = node.args[0]
        elif node.target in (torch.nn.functional.dropout, torch.dropout):
            args = dict(zip(("input", "p", "training"), node.args, strict=False)) | dict(node.kwargs)
            rate = float(args.get("p", 0.5))
            if rate != 0.0 and args.get("training", node.target is torch.nn.functional.dropout):
                training = f"dropout (p={rate}) in training on the probabilities ({node.name})"
            node = args["input"]
        else:
            break
    return node, training


class SiteBuilder:
    """Emits one site's decomposed IR: q/k/v (GQA sources and RoPE seen through), the runtime tensors
    its masks read, qk, the score steps, softmax, pv."""

    def __init__(self, node: fx.Node) -> None:
        self.node, self.evaluator = node, Evaluator(node.graph)
        self.steps: list[Op] = []
        self.n = 0

    def start(self, q: Any, k: Any, v: Any) -> None:
        qs, ks, vs = shape_of(q), shape_of(k), shape_of(v)
        if len(qs) != 4 or len(ks) != 4 or len(vs) != 4:
            raise UnsupportedError(f"q/k/v are not 4-d ({qs}, {ks}, {vs})")
        if ks[-1] != qs[-1]:
            raise UnsupportedError(f"key head_dim {ks[-1]} differs from query head_dim {qs[-1]}")
        k0, rk = _kv_source(k)
        v0, rv = _kv_source(v)
        if rk != rv:
            k0, v0 = k, v
        self.rope = _fused_rope(q, k0)
        self.note = "" if self.rope is not None else _partial_rotary(q)
        if self.rope is not None:
            q, k0 = self.rope[0], self.rope[1]
        self.q, self.k, self.v = q, k0, v0
        self.heads, self.kv_heads, self.head_dim, self.value_dim = qs[1], shape_of(k0)[1], qs[-1], vs[-1]
        if self.heads % self.kv_heads:
            raise UnsupportedError(f"{self.heads} query heads do not divide into {self.kv_heads} kv heads")
        self.shape4 = (qs[0], qs[1], qs[2], ks[2])
        self.scores = Value("s", (X.B, sympy.Integer(self.heads), X.Sq, X.Skv))

    def _next(self) -> Value:
        self.n += 1
        return Value(f"s{self.n}", self.scores.shape)

    @property
    def current(self) -> Value:
        return self.steps[-1].result if self.steps else self.scores  # type: ignore[return-value]

    def scale(self, factor: float) -> None:
        self.steps.append(ScaleOp(self._next(), self.current, factor))

    def mask_or_bias(self, mask: sympy.Basic, bias: sympy.Expr | None) -> None:
        """An additive mask/bias read off an SDPA ``attn_mask`` or a ``scores + t`` step."""
        if bias is not None:
            self.steps.append(ScoreModOp(self._next(), self.current, X.score + bias))
        if mask != sympy.true:
            self.steps.append(MaskOp(self._next(), self.current, boolean(mask), ""))

    def step(self, fx_node: fx.Node, scores_in: fx.Node) -> None:
        """One FX step of the score chain, evaluated with the scores as the symbol ``score``."""
        self.evaluator.memo[scores_in] = SymTensor(X.score, tuple(self.shape4))
        self.evaluator.scores.add(scores_in)
        try:
            value = self.evaluator.value(fx_node)
        except (UnsupportedError, AttnccError, TypeError, ValueError) as exc:
            raise UnsupportedError(f"the step {fx_node.name} on the scores is not lifted: {exc}") from exc
        expr = _indexed(value, self.shape4)
        if X.score not in expr.free_symbols:
            raise UnsupportedError(f"the step {fx_node.name} replaces the scores by {expr}")
        self._emit(expr)

    def _emit(self, expr: sympy.Basic) -> None:
        """IR ops for one step's value ``expr`` of ``score``: a scale, an additive mask or bias, a
        masked fill (``Piecewise((-inf, c), (f(score), True))``: f, then the mask), or a score mod."""
        if expr == X.score:
            return
        coeff, rest = expr.as_coeff_Mul()
        if rest == X.score and coeff.is_number:
            return self.scale(float(coeff))
        if isinstance(expr, sympy.Piecewise) and len(expr.args) == 2:
            (a, cond), (c, _) = expr.args
            for masked, keep, other in ((a, sympy.Not(cond), c), (c, cond, a)):
                if _masked_value(masked) and X.score in other.free_symbols:
                    self._emit(other)
                    return self.mask_or_bias(keep, None)
        bias = sympy.expand(expr - X.score) if expr.is_Add else None
        if bias is not None and X.score not in bias.free_symbols:
            return self.mask_or_bias(*_as_mask(bias))
        self.steps.append(ScoreModOp(self._next(), self.current, expr))

    def finish(self, name: str) -> Site:
        hq, hkv, d, dv = (sympy.Integer(n) for n in (self.heads, self.kv_heads, self.head_dim, self.value_dim))
        q, k, v = Value("q", (X.B, hq, X.Sq, d)), Value("k", (X.B, hkv, X.Skv, d)), Value("v", (X.B, hkv, X.Skv, dv))
        ops: list[Op] = [InputOp(q, "q"), InputOp(k, "k"), InputOp(v, "v")]
        inputs: dict[str, Any] = {"q": self.q, "k": self.k, "v": self.v}
        for tname, tnode in self.evaluator.tensors.items():
            ops.append(TensorOp(Value(tname), tname, max(1, len(shape_of(tnode))), _kind(tnode)))
            inputs[tname] = tnode
        if self.rope is not None:
            q, k = Value("q1", q.shape), Value("k1", k.shape)
            ops += [RopeOp(q, ops[0].result), RopeOp(k, ops[1].result)]  # type: ignore[arg-type]
            inputs.update(zip(ROPE_NAMES, self.rope[2], strict=True))
        groups = self.heads // self.kv_heads
        probs, out = Value("p", self.scores.shape), Value("o", (X.B, hq, X.Sq, dv))
        ops += [QKOp(self.scores, q, k, groups), *self.steps, SoftmaxOp(probs, self.current)]
        ops += [PVOp(out, probs, v, groups), ReturnOp(None, out)]
        return Site(self.node, Graph(name, tuple(ops)), inputs, self.note)


def _partial_rotary(q: Any) -> str:
    """Why RoPE stays in the graph, or "" when q shows no rotation attncc leaves there: q is
    ``cat(rotate(q[..., :r]), q[..., r:])`` (GPT-NeoX, Phi, GPT-J) or rotated in the interleaved layout
    (GPT-J's ``rotate_every_two``: pairs (2i, 2i + 1)); the kernels' RoPE prologue rotates whole heads
    in the rotate-half layout (pairs (i, i + D/2))."""
    while _called(q, "permute", "transpose", "contiguous", "to", torch.transpose):  # GPT-J rotates [B, S, H, D]
        q = q.args[0]
    rotated, partial = q, ""
    if _called(q, torch.cat) and len(q.args[0]) == 2 and isinstance(q.args[0][0], fx.Node):
        rotated = q.args[0][0]
        r, d = shape_of(rotated)[-1], shape_of(q)[-1]
        partial = f"partial rotary embedding (rotary_dim {r} < head_dim {d})"
    if _interleaved_rotation(rotated):
        layout = "interleaved (GPT-J) rotary layout, pairs (2i, 2i+1)"
        what = f"{partial}, {layout}" if partial else layout
        return f"{what} left in the graph: the kernels' RoPE prologue rotates whole heads in pairs (i, i + D/2)"
    if partial and _rope_of(rotated) is not None:
        return f"{partial} left in the graph: the kernels' RoPE prologue rotates whole heads; q and k arrive rotated"
    return ""


def _interleaved_rotation(node: Any) -> bool:
    """``x * cos + rotate_every_two(x) * sin`` where ``rotate_every_two`` stacks (-x[..., 1::2], x[..., ::2])
    on a new last dim and flattens it (GPT-J, CodeGen)."""
    if not (_called(node, operator.add, torch.add) and len(node.args) == 2):
        return False
    for product in node.args:
        if _called(product, operator.mul, torch.mul):
            for factor in product.args:
                flat = _called(factor, "flatten", torch.flatten) and isinstance(factor.args[0], fx.Node)
                if flat and _called(factor.args[0], torch.stack):
                    return True
    return False


def _indexed(value: SymTensor, shape4: tuple[int, int, int, int]) -> sympy.Basic:
    """A [B?, H?, Sq, Skv] symbolic value over b, h, q, kv."""
    t = value.aligned(4)
    for have, want in zip(t.shape, shape4, strict=True):
        if have not in (1, want) and -1 not in (have, want):
            raise UnsupportedError(f"a value of shape {value.shape} does not broadcast to the scores {shape4}")
    return t.expr.xreplace({DIMS[0]: X.b, DIMS[1]: X.h, DIMS[2]: X.q, DIMS[3]: X.kv})


def _masked_value(e: sympy.Basic) -> bool:
    return bool(e.is_number and float(e) <= NEG_BIG)


def _as_mask(expr: sympy.Basic) -> tuple[sympy.Basic, sympy.Expr | None]:
    """(mask, additive bias) of an additive ``attn_mask`` / ``scores + t`` operand over b, h, q, kv."""
    if X.is_boolean(expr):
        return expr, None
    if isinstance(expr, sympy.Add):  # a bias plus an additive mask: each term read on its own
        parts = [_as_mask(term) for term in expr.args]
        mask = sympy.And(*(m for m, _ in parts))
        biases = [b for _, b in parts if b is not None]
        return mask, sympy.Add(*biases) if biases else None
    if isinstance(expr, sympy.Piecewise) and len(expr.args) == 2:  # -inf where masked, a bias (or 0) elsewhere
        (a, cond), (c, _) = expr.args
        if _masked_value(c) and not _masked_value(a):
            return cond, None if a == 0 else a
        if _masked_value(a) and not _masked_value(c):
            return sympy.Not(cond), None if c == 0 else c
    if expr.is_number and float(expr) == 0:
        return sympy.true, None
    return sympy.true, expr


def _kind(node: fx.Node) -> str:
    dtype = getattr(example_value(node), "dtype", None)
    return "bool" if dtype is torch.bool else ("float" if dtype is not None and dtype.is_floating_point else "int")


def sdpa_site(node: fx.Node) -> Site:
    """``scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)`` as IR:
    scale, the attn_mask as a mask or an additive bias, ``kv <= q`` for is_causal (top-left, as torch)."""
    names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale"]
    a = dict(zip(names, node.args, strict=False)) | dict(node.kwargs)
    if float(a.get("dropout_p", 0.0) or 0.0) != 0.0:
        raise UnsupportedError(f"dropout_p={a['dropout_p']} (attncc computes attention without dropout)")
    site = SiteBuilder(node)
    site.start(a["query"], a["key"], a["value"])
    scale, checks = a.get("scale"), list[tuple[fx.Node, float]]()
    if isinstance(scale, fx.Node):  # a float attribute traced as a tensor (dynamic=True): its value, checked per call
        scale, checks = _traced_scale(scale)
    site.scale(1.0 / math.sqrt(site.head_dim) if scale is None else float(scale))
    if a.get("attn_mask") is not None:
        lifted = lift_mask(node.graph, a["attn_mask"], site.shape4)
        site.evaluator.tensors.update(lifted.tensors)
        site.mask_or_bias(lifted.mask, lifted.bias)
    if a.get("is_causal", False):
        site.mask_or_bias(sympy.Le(X.kv, X.q), None)
    found = site.finish(f"site_{node.name}")
    found.checks = checks
    return found


def _traced_scale(node: fx.Node) -> tuple[float, list[tuple[fx.Node, float]]]:
    """The value of an SDPA ``scale`` that the graph reads as ``t.item()`` of a 0-d tensor ``t`` (what
    ``torch.compile(..., dynamic=True)`` makes of a module's float attribute, such as HF's ``self.scaling``), and the
    check that keeps it honest: the kernel is compiled with the traced value, and each call compares ``t`` with it."""
    value = example_value(node)
    hint = getattr(getattr(value, "node", None), "hint", value)
    if not (node.op == "call_method" and node.target == "item" and isinstance(node.args[0], fx.Node)):
        raise UnsupportedError(f"scale is the graph value {node.name} ({node.op} {node.target}), not a number")
    if not isinstance(hint, int | float):
        raise UnsupportedError(f"scale {node.name} has no traced value to compile with")
    return float(hint), [(node.args[0], float(hint))]


def softmax_of(node: fx.Node) -> fx.Node | None:
    """The last-dim softmax whose probabilities the matmul ``node`` multiplies (through dtype
    conversions and dropout in eval), or None."""
    if not (node.target in (torch.matmul, operator.matmul) and len(node.args) == 2):
        return None
    soft = _probs_source(node.args[0])[0]
    return soft if is_softmax(soft) else None


def decomposed_site(node: fx.Node) -> Site | None:
    """``softmax(steps(q @ k^T)) @ v`` read from the ``@ v`` matmul ``node`` as IR, one op per step; None
    when ``node`` is not the product of a last-dim softmax of such scores with a value tensor."""
    soft = softmax_of(node)
    if soft is None:
        return None
    if training := _probs_source(node.args[0])[1]:
        raise UnsupportedError(f"{training}: attncc computes attention without dropout")
    found = score_chain(soft)
    if found is None:
        return None
    qk, steps = found
    if not (qk.target in (torch.matmul, operator.matmul) and len(qk.args) == 2):
        raise UnsupportedError(f"the scores {qk.name} are a {qk.target} product, not q @ k.transpose(-2, -1)")
    q, kt = qk.args
    transposed = isinstance(kt, fx.Node) and (kt.target == "transpose" or kt.target is torch.transpose)
    if not transposed or sorted(int(d) % 4 for d in kt.args[1:3]) != [2, 3]:
        raise UnsupportedError(f"the scores {qk.name} are not q @ k.transpose(-2, -1)")
    site = SiteBuilder(node)
    site.start(q, kt.args[0], node.args[1])
    prev = qk
    for step in steps:
        site.step(step, prev)
        prev = step
    return site.finish(f"site_{node.name}")
