"""Lower an AttentionSpec to the decomposed IR graph that the pass pipeline starts from, and read a
spec back from a fused graph (:func:`spec_of`: how front ends that emit IR get their kernel).

>>> import attncc as ac
>>> from attncc.ir import print_ir
>>> print(print_ir(spec_to_ir(ac.AttentionSpec(num_heads=2, head_dim=16, mask=ac.causal()))), end="")
attn.graph @attention {
  %q = attn.input {arg = "q"} : [B, 2, Sq, 16]
  %k = attn.input {arg = "k"} : [B, 2, Skv, 16]
  %v = attn.input {arg = "v"} : [B, 2, Skv, 16]
  %s = attn.qk %q, %k {groups = 1} : [B, 2, Sq, Skv]
  %s1 = attn.scale %s {factor = 0.25} : [B, 2, Sq, Skv]
  %s2 = attn.mask %s1 {pred = "kv <= q", form = ""} : [B, 2, Sq, Skv]
  %p = attn.softmax %s2 : [B, 2, Sq, Skv]
  %o = attn.pv %p, %v {groups = 1} : [B, 2, Sq, 16]
  attn.return %o
}
"""

from __future__ import annotations

import sympy

from attncc.dsl import Expr, Meta
from attncc.errors import UnsupportedError
from attncc.ir import exprs as X
from attncc.ir.core import Graph, Op, Value
from attncc.ir.ops import (
    FusedOp,
    InputOp,
    LinearOp,
    MaskOp,
    PVOp,
    QKOp,
    ReturnOp,
    RopeOp,
    ScaleOp,
    ScoreModOp,
    SelectOp,
    SoftmaxOp,
    TensorOp,
)
from attncc.linear import LinearAttentionSpec
from attncc.spec import AttentionSpec


def linear_to_ir(spec: LinearAttentionSpec) -> Graph:
    """The graph of a feature-map linear attention: inputs, one ``attn.linear`` op, return (Sq = Skv is
    checked at call time).

    >>> import attncc as ac
    >>> from attncc.ir.text import print_op
    >>> graph = linear_to_ir(ac.linear_attention(num_heads=2, head_dim=8, feature_map="identity"))
    >>> print(print_op(graph.ops[3]))  # doctest: +ELLIPSIS
    %o = attn.linear %q, %k, %v {groups = 1, phi = "x", causal = 1, normalize = 1, ...} : [B, 2, Sq, 8]
    """
    hq, hkv, d = (sympy.Integer(n) for n in (spec.num_heads, int(spec.num_kv_heads or 0), spec.head_dim))
    q, k, v = Value("q", (X.B, hq, X.Sq, d)), Value("k", (X.B, hkv, X.Skv, d)), Value("v", (X.B, hkv, X.Skv, d))
    out = Value("o", (X.B, hq, X.Sq, d))
    linear = LinearOp(out, q, k, v, spec.groups, spec.phi, int(spec.causal), int(spec.normalize), spec.eps, spec.chunk)
    ops: list[Op] = [InputOp(q, "q"), InputOp(k, "k"), InputOp(v, "v"), linear, ReturnOp(None, out)]
    return Graph(spec.name, tuple(ops))


def spec_to_ir(spec: AttentionSpec) -> Graph:
    """The decomposed graph (rope ->) qk -> scale -> score_mod -> mask -> softmax -> pv of ``spec``."""
    hq, hkv, d = sympy.Integer(spec.num_heads), sympy.Integer(int(spec.num_kv_heads or 0)), sympy.Integer(spec.head_dim)
    dv = sympy.Integer(int(spec.value_dim or spec.head_dim))
    q = Value("q", (X.B, hq, X.Sq, d))
    k = Value("k", (X.B, hkv, X.Skv, d))
    v = Value("v", (X.B, hkv, X.Skv, dv))
    ops: list[Op] = [InputOp(q, "q"), InputOp(k, "k"), InputOp(v, "v")]
    routes = dict(spec.selectors)
    for t in spec.tensors:
        if t.name in routes:  # a kv-block list the graph selects from q and k
            r = routes[t.name]
            ops.append(SelectOp(Value(t.name), t.name, t.ndim, t.dtype, t.values, q=q, k=k, top_k=r.top_k,
                                block=r.block, grid=r.grid, region=r.region, pool=r.pool, causal=int(r.causal),
                                include_self=int(r.include_self)))  # fmt: skip
        else:
            ops.append(TensorOp(Value(t.name), t.name, t.ndim, t.dtype, t.values))
    if spec.rope:
        q, k = Value("q1", q.shape), Value("k1", k.shape)
        ops += [RopeOp(q, ops[0].result), RopeOp(k, ops[1].result)]  # type: ignore[arg-type]
    scores = Value("s", (X.B, hq, X.Sq, X.Skv))
    ops.append(QKOp(scores, q, k, spec.groups, spec.head_table))
    n = 1

    def next_scores() -> Value:
        nonlocal n
        value = Value(f"s{n}", scores.shape)
        n += 1
        return value

    cur = next_scores()
    ops.append(ScaleOp(cur, scores, float(spec.scale or 1.0)))
    if spec.score_mod != X.score:
        prev, cur = cur, next_scores()
        ops.append(ScoreModOp(cur, prev, spec.score_mod))
    if spec.mask != sympy.true:
        prev, cur = cur, next_scores()
        ops.append(MaskOp(cur, prev, spec.mask))
    probs = Value("p", scores.shape)
    out = Value("o", (X.B, hq, X.Sq, dv))
    ops += [SoftmaxOp(probs, cur), PVOp(out, probs, v, spec.groups, spec.head_table), ReturnOp(None, out)]
    return Graph(spec.name, tuple(ops))


def spec_of(graph: Graph, name: str) -> AttentionSpec:
    """The spec of a graph whose attention the ``fuse`` pass fused into one ``attn.fused`` op: the
    inverse of :func:`spec_to_ir` (front ends emit decomposed IR; this reads what the pass recognized).

    >>> import attncc as ac
    >>> from attncc.passes import parse_pipeline, run_pipeline
    >>> spec = ac.AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=16, mask=ac.sliding_window(8))
    >>> fused = run_pipeline(spec_to_ir(spec), parse_pipeline("canonicalize,fuse")).graph
    >>> back = spec_of(fused, spec.name)
    >>> back.num_kv_heads, back.scale, back.mask
    (2, 0.25, (kv <= q) & (q <= kv + 8))
    """
    fused = [op for op in graph.ops if isinstance(op, FusedOp)]
    if len(fused) != 1:
        raise UnsupportedError(f"@{graph.name} has {len(fused)} fused attention ops after the fuse pass, not one")
    op = fused[0]
    dtypes = tuple((t.tensor, t.dtype) for t in graph.ops if isinstance(t, TensorOp))
    tables = tuple((t.tensor, t.values) for t in graph.ops if isinstance(t, TensorOp) and t.values)
    meta = Meta(tables=tables, dtypes=tuple(d for d in dtypes if d[0] not in dict(tables)))
    hq, hkv, d, dv = (int(n) for n in (op.q.shape[1], op.k.shape[1], op.q.shape[3], op.v.shape[3]))
    return AttentionSpec(
        name=name,
        num_heads=hq,
        num_kv_heads=hkv,
        head_dim=d,
        value_dim=dv,
        mask=None if op.mask == sympy.true else Expr(op.mask, meta),
        score_mod=None if op.score_mod == X.score else Expr(op.score_mod, meta),
        scale=op.scale,
        rope=any(isinstance(o, RopeOp) for o in graph.ops),
    )
