"""The fuse pass: the decomposed chain qk -> scale -> score_mod -> mask -> softmax -> pv
becomes one ``attn.fused`` op.

before:
    %s  = attn.qk %q, %k {groups = 1}
    %s1 = attn.scale %s {factor = 0.125}
    %s2 = attn.mask %s1 {pred = "kv <= q", form = "causal"}
    %p  = attn.softmax %s2
    %o  = attn.pv %p, %v {groups = 1}
after:
    %o  = attn.fused %q, %k, %v {groups = 1, scale = 0.125, score_mod = "score", mask = "kv <= q", form = "causal"}

Fusion is refused (the graph is returned unchanged and the reason logged) when an
intermediate value has another user, or when the chain has ops it cannot absorb.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import sympy

from attncc.ir.core import Graph, Op, Value
from attncc.ir.exprs import score
from attncc.ir.ops import FusedOp, MaskOp, PVOp, QKOp, ScaleOp, ScoreModOp, SoftmaxOp
from attncc.passes.base import Pass

log = logging.getLogger("attncc.passes.fuse")


class Refused(Exception):
    """Why a chain cannot be fused (logged, never raised out of the pass)."""


@dataclass(frozen=True)
class Fuse(Pass):
    """Fuse every decomposed attention chain into one attn.fused op."""

    name: ClassVar[str] = "fuse"

    def run(self, graph: Graph) -> Graph:
        for pv in graph.ops_of(PVOp):
            try:
                chain, fused = _match(graph, pv)  # type: ignore[arg-type]
            except Refused as why:
                log.info("fuse: not fusing %s: %s", pv.result, why)
                continue
            drop = {id(op) for op in chain}
            ops = tuple(fused if op is pv else op for op in graph.ops if id(op) not in drop or op is pv)
            graph = Graph(graph.name, ops)
        return graph


def _single_use(graph: Graph, value: Value, op: Op) -> None:
    users = graph.users(value)
    if len(users) != 1:
        raise Refused(f"{value} (from {op.name}) has {len(users)} users; fusing would recompute it")


def _match(graph: Graph, pv: PVOp) -> tuple[list[Op], FusedOp]:
    chain: list[Op] = []
    soft = graph.producer(pv.probs)
    if not isinstance(soft, SoftmaxOp):
        raise Refused(f"the probabilities come from {soft.name}, not attn.softmax")
    _single_use(graph, pv.probs, soft)
    chain.append(soft)
    value, scale, mod, mask = soft.scores, 1.0, score, sympy.true
    form = ""
    while True:
        op = graph.producer(value)
        _single_use(graph, value, op)
        chain.append(op)
        if isinstance(op, MaskOp):
            if mod != score or scale != 1.0 or mask != sympy.true:
                raise Refused("a mask applied before a score mod or scale, or two masks")
            mask, form, value = op.pred, op.form, op.scores
        elif isinstance(op, ScoreModOp):
            if scale != 1.0:
                raise Refused("a score mod applied before the scale")
            mod, value = mod.subs(score, op.expr), op.scores
        elif isinstance(op, ScaleOp):
            scale, value = scale * op.factor, op.scores
        elif isinstance(op, QKOp):
            if op.groups != pv.groups:
                raise Refused(f"qk groups={op.groups} but pv groups={pv.groups}")
            return chain, FusedOp(pv.result, op.q, op.k, pv.v, pv.groups, scale, mod, mask, form)
        else:
            raise Refused(f"{op.name} between attn.qk and attn.softmax cannot be absorbed")
