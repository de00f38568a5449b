"""``ac.onnx.export``: an attncc spec as an ONNX graph.

The ``Attention`` operator where it expresses the spec (no mask or causal: opset 23; causal with a left window:
opset 25's ``left_window_size``; ``softcap``; ``scale``; GQA through the head counts of k and v). Anything else
becomes a decomposed graph that computes the mask and the score mod from index tensors (``Range`` over the query
and key positions, arithmetic, comparisons, ``Where``): never a materialized N x N constant. Graph inputs
``q`` [B, Hq, Sq, D], ``k``, ``v`` [B, Hkv, Skv, D], then the spec's 1-D runtime tensors by name; output ``y``
[B, Hq, Sq, D]. A row with no visible key is 0, as attncc returns it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import sympy
from onnx import TensorProto, helper, numpy_helper

import attncc as ac
from attncc.errors import UnsupportedError
from attncc.ir import exprs as X

INT, FLOAT, BOOL = "int", "float", "bool"


class _Graph:
    """Nodes and initializers of the graph under construction; ``emit`` returns (tensor name, kind)."""

    def __init__(
        self, heads: int, q_len: int, kv_len: int, tables: dict[str, tuple[float, ...]], tensors: set[str]
    ) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0
        self.heads, self.q_len, self.kv_len = heads, q_len, kv_len
        self.tables, self.tensors = tables, tensors
        self.cache: dict[Any, tuple[str, str]] = {}

    def name(self, stem: str) -> str:
        self.count += 1
        return f"{stem}_{self.count}"

    def node(self, op: str, inputs: list[str], **attrs: Any) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def const(self, value: Any, kind: str) -> str:
        key = ("const", kind, repr(value))
        if key not in self.cache:
            dtype = {INT: np.int64, FLOAT: np.float32, BOOL: np.bool_}[kind]
            name = self.name("c")
            self.inits.append(numpy_helper.from_array(np.asarray(value, dtype), name))
            self.cache[key] = (name, kind)
        return self.cache[key][0]

    def index(self, axis: int, length: int | None) -> str:
        """0..length-1 as int64, shaped to broadcast along ``axis`` of [B, H, Sq, Skv] (None: q's batch size)."""
        key = ("index", axis, length)
        if key not in self.cache:
            end = (
                self.const(length, INT)
                if length is not None
                else self.node("Gather", [self.node("Shape", ["q"]), self.const(0, INT)])
            )
            r = self.node("Range", [self.const(0, INT), end, self.const(1, INT)])
            shape = [1, 1, 1, 1]
            shape[axis] = -1
            self.cache[key] = (self.node("Reshape", [r, self.const(shape, INT)]), INT)
        return self.cache[key][0]

    def cast(self, value: tuple[str, str], kind: str) -> str:
        name, have = value
        if have == kind:
            return name
        to = {INT: TensorProto.INT64, FLOAT: TensorProto.FLOAT, BOOL: TensorProto.BOOL}[kind]
        return self.node("Cast", [name], to=to)

    def emit(self, e: sympy.Basic, score: str | None = None) -> tuple[str, str]:
        """The tensor computing ``e`` over the index tensors (and ``score``), with its kind."""
        if e in (sympy.true, sympy.S.true):
            return self.const(True, BOOL), BOOL
        if e in (sympy.false, sympy.S.false):
            return self.const(False, BOOL), BOOL
        if e.is_Number:
            if e.is_Integer:
                return self.const(int(e), INT), INT
            return self.const(float(e), FLOAT), FLOAT
        if isinstance(e, sympy.Symbol):
            if e == X.score and score is not None:
                return score, FLOAT
            if e == X.q:
                return self.index(2, self.q_len), INT
            if e == X.kv:
                return self.index(3, self.kv_len), INT
            if e == X.Sq:
                return self.const(self.q_len, INT), INT
            if e == X.Skv:
                return self.const(self.kv_len, INT), INT
            if e == X.h:
                return self.index(1, self.heads), INT
            if e == X.H:
                return self.const(self.heads, INT), INT
            if e == X.b:
                return self.index(0, None), INT
            raise UnsupportedError(f"export: no ONNX form for the symbol {e}")
        args = [self.emit(a, score) for a in e.args] if not isinstance(e, sympy.Indexed) else []
        kind = FLOAT if any(k == FLOAT for _, k in args) else INT
        if isinstance(e, (sympy.Add, sympy.Mul)):
            op = "Add" if isinstance(e, sympy.Add) else "Mul"
            out = self.cast(args[0], kind)
            for a in args[1:]:
                out = self.node(op, [out, self.cast(a, kind)])
            return out, kind
        if isinstance(e, sympy.Pow):
            if e.exp == -1:
                return self.node("Div", [self.const(1.0, FLOAT), self.cast(args[0], FLOAT)]), FLOAT
            if e.exp == sympy.Rational(1, 2):
                return self.node("Sqrt", [self.cast(args[0], FLOAT)]), FLOAT
            if e.exp.is_Integer and e.exp > 0:
                out = args[0][0]
                for _ in range(int(e.exp) - 1):
                    out = self.node("Mul", [out, args[0][0]])
                return out, args[0][1]
            return self.node("Pow", [self.cast(args[0], FLOAT), self.cast(args[1], FLOAT)]), FLOAT
        if isinstance(e, sympy.floor) and (division := X.exact_division(e.args[0])) is not None:
            num, den = division
            top = self.cast(self.emit(num, score), INT)
            d = self.const(int(den), INT)
            return self.node("Div", [self.node("Sub", [top, self.node("Mod", [top, d])]), d]), INT  # floor, any sign
        if isinstance(e, (sympy.floor, sympy.ceiling)):
            return self.node("Floor" if isinstance(e, sympy.floor) else "Ceil", [self.cast(args[0], FLOAT)]), FLOAT
        if isinstance(e, sympy.Mod):
            return self.node("Mod", [self.cast(args[0], kind), self.cast(args[1], kind)], fmod=int(kind == FLOAT)), kind
        if isinstance(e, sympy.Abs):
            return self.node("Abs", [args[0][0]]), args[0][1]
        if isinstance(e, (sympy.Min, sympy.Max)):
            return self.node(type(e).__name__, [self.cast(a, kind) for a in args]), kind
        if isinstance(e, sympy.core.relational.Relational):
            op = {sympy.LessThan: "LessOrEqual", sympy.StrictLessThan: "Less", sympy.GreaterThan: "GreaterOrEqual",
                  sympy.StrictGreaterThan: "Greater", sympy.Eq: "Equal", sympy.Ne: "Equal"}[type(e)]  # fmt: skip
            out = self.node(op, [self.cast(args[0], kind), self.cast(args[1], kind)])
            return (self.node("Not", [out]) if isinstance(e, sympy.Ne) else out), BOOL
        if isinstance(e, (sympy.And, sympy.Or, sympy.Xor)):
            op = {sympy.And: "And", sympy.Or: "Or", sympy.Xor: "Xor"}[type(e)]
            out = args[0][0]
            for a in args[1:]:
                out = self.node(op, [out, a[0]])
            return out, BOOL
        if isinstance(e, sympy.Not):
            return self.node("Not", [args[0][0]]), BOOL
        if isinstance(e, sympy.Piecewise):  # args: (value, condition) pairs, values already emitted in ``args``
            values = args[0::2]
            out_kind = FLOAT if any(k == FLOAT for _, k in values) else INT
            out = self.cast(values[-1], out_kind)
            for value, (cond, _) in zip(reversed(values[:-1]), reversed(args[1:-1:2]), strict=True):
                out = self.node("Where", [cond, self.cast(value, out_kind), out])
            return out, out_kind
        if isinstance(e, (sympy.tanh, sympy.exp, sympy.log)):
            op = {sympy.tanh: "Tanh", sympy.exp: "Exp", sympy.log: "Log"}[type(e)]
            return self.node(op, [self.cast(args[0], FLOAT)]), FLOAT
        if isinstance(e, sympy.Indexed):
            return self.indexed(e, score)
        raise UnsupportedError(f"export: no ONNX form for `{X.expr_str(e)}` ({type(e).__name__}) yet")

    def indexed(self, e: sympy.Indexed, score: str | None) -> tuple[str, str]:
        name = str(e.base)
        if len(e.indices) != 1:
            raise UnsupportedError(f"export: `{X.expr_str(e)}` reads a {len(e.indices)}-D tensor (1-D tensors only)")
        (i,) = e.indices
        if i == X.h and name in self.tables:  # a constant per-head table: [1, H, 1, 1]
            values = np.asarray(self.tables[name], np.float32).reshape(1, -1, 1, 1)
            return self.const(values.tolist(), FLOAT), FLOAT
        if name in self.tables:
            table = self.const(list(self.tables[name]), FLOAT)
        elif name in self.tensors:
            table = name
        else:
            raise UnsupportedError(f"export: tensor {name!r} is neither a runtime input nor a constant table")
        at = self.cast(self.emit(i, score), INT)
        return self.node("Gather", [table, at]), (FLOAT if name in self.tables else INT)


def _window(mask: sympy.Basic) -> int | None:
    """w when ``mask`` is causal & sliding_window(w), else None."""
    if not isinstance(mask, sympy.And) or len(mask.args) != 2:
        return None
    for rel in mask.args:
        if not isinstance(rel, sympy.LessThan):
            return None
    if sympy.Le(X.kv, X.q) not in mask.args:
        return None
    other = next(r for r in mask.args if r != sympy.Le(X.kv, X.q))
    gap = sympy.expand(other.rhs - other.lhs)  # >= 0 where visible: kv - q + w
    if gap.coeff(X.kv) == 1 and gap.coeff(X.q) == -1:
        w = gap - X.kv + X.q
        if w.is_Integer and int(w) >= 0:
            return int(w)
    return None


def export(spec: ac.AttentionSpec, path: str | Path, q_len: int, kv_len: int) -> onnx.ModelProto:
    """Write ``spec`` as an ONNX model at ``path`` for ``q_len`` queries over ``kv_len`` keys; returns it.

    >>> import attncc as ac, tempfile, os
    >>> out = os.path.join(tempfile.mkdtemp(), "causal.onnx")
    >>> m = export(ac.AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=16, mask=ac.causal()), out, 32, 32)
    >>> [n.op_type for n in m.graph.node], m.opset_import[0].version
    (['Attention'], 23)
    """
    if spec.kv_head_of is not None or spec.rope or spec.selectors:
        raise UnsupportedError(f"export: spec {spec.name!r} uses a runtime head table, RoPE or routed blocks")
    H, Hkv, D, Dv = spec.num_heads, int(spec.num_kv_heads or spec.num_heads), spec.head_dim, int(spec.value_dim or 0)
    mask = spec.mask if spec.mask is not None else sympy.true
    mod = spec.score_mod if spec.score_mod is not None else X.score
    scale = spec.scale if spec.scale is not None else 1 / math.sqrt(D)
    tables = {t.name: tuple(t.values) for t in spec.tensors if t.values}
    runtime = [t.name for t in spec.runtime_tensors()]
    inputs = [
        helper.make_tensor_value_info("q", TensorProto.FLOAT, ["B", H, q_len, D]),
        helper.make_tensor_value_info("k", TensorProto.FLOAT, ["B", Hkv, kv_len, D]),
        helper.make_tensor_value_info("v", TensorProto.FLOAT, ["B", Hkv, kv_len, Dv]),
        *[helper.make_tensor_value_info(t, TensorProto.INT64, [None]) for t in runtime],
    ]
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", H, q_len, Dv])
    softcap = _softcap(mod)
    window = _window(mask)
    plain_mask = mask in (sympy.true, sympy.Le(X.kv, X.q)) or window is not None
    if plain_mask and (mod == X.score or softcap is not None) and q_len == kv_len:
        attrs: dict[str, Any] = {"scale": float(scale)}
        if mask != sympy.true:
            attrs["is_causal"] = 1
        if softcap is not None:
            attrs["softcap"] = softcap
        if window is not None:
            attrs["left_window_size"] = window
        node = helper.make_node("Attention", ["q", "k", "v"], ["y"], **attrs)
        graph = helper.make_graph([node], spec.name, inputs, [output])
        opset = 25 if window is not None else 23
    else:
        graph = _decomposed(spec, mask, mod, scale, q_len, kv_len, tables, set(runtime), inputs, output)
        opset = 23
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return model


def _softcap(mod: sympy.Basic) -> float | None:
    """c when ``mod`` is c * tanh(score / c)."""
    for c in mod.atoms(sympy.Number):
        if c > 0 and sympy.simplify(mod - c * sympy.tanh(X.score / c)) == 0:
            return float(c)
    return None


def _decomposed(
    spec: ac.AttentionSpec, mask: sympy.Basic, mod: sympy.Basic, scale: float, q_len: int, kv_len: int,
    tables: dict[str, tuple[float, ...]], runtime: set[str], inputs: list[onnx.ValueInfoProto],
    output: onnx.ValueInfoProto,
) -> onnx.GraphProto:  # fmt: skip
    g = _Graph(spec.num_heads, q_len, kv_len, tables, runtime)
    H, Hkv = spec.num_heads, int(spec.num_kv_heads or spec.num_heads)
    k, v = "k", "v"
    if Hkv != H:  # GQA: each kv head read by H / Hkv query heads (repeated in the graph, not in the inputs)
        k, v = (g.node("Reshape", [g.node("Expand", [g.node("Unsqueeze", [t, g.const([2], INT)]),
                                                     g.const([1, 1, H // Hkv, 1, 1], INT)]),
                                   g.const([0, H, kv_len, width], INT)])
                for t, width in ((k, spec.head_dim), (v, spec.value_dim)))  # fmt: skip
    kt = g.node("Transpose", [k], perm=[0, 1, 3, 2])
    scores = g.node("Mul", [g.node("MatMul", ["q", kt]), g.const(float(scale), FLOAT)])
    if mod != X.score:
        scores = g.cast(g.emit(mod, scores), FLOAT)
    if mask != sympy.true:
        keep = g.emit(mask)[0]
        scores = g.node("Where", [keep, scores, g.const(-np.inf, FLOAT)])
    p = g.node("Softmax", [scores], axis=-1)
    p = g.node("Where", [g.node("IsNaN", [p]), g.const(0.0, FLOAT), p])  # rows with no visible key: 0
    g.nodes.append(helper.make_node("MatMul", [p, v], ["y"]))
    return helper.make_graph(g.nodes, spec.name, inputs, [output], initializer=g.inits)
