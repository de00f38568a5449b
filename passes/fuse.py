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

The steps between qk and softmax may come in any order (front ends emit them as the model wrote
them): scales before the first score mod fold into ``scale``, later ones into the score mod, masks
AND together, and a step after a mask must keep a masked score at -inf (see :func:`keeps_masked`).
Fusion is refused (the graph is returned unchanged and the reason logged; :func:`why_not` returns
it) when an intermediate value has another user, or when the chain has ops it cannot absorb.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import sympy

from attncc.ir.core import Graph, Op, Value
from attncc.ir.exprs import score, to_sympy_number
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


def why_not(graph: Graph) -> str | None:
    """Why the graph's ``attn.pv`` chain does not fuse (the fuse pass's logged reason); None when it does."""
    for pv in graph.ops_of(PVOp):
        try:
            _match(graph, pv)  # type: ignore[arg-type]
        except Refused as why:
            return str(why)
    return None


def _single_use(graph: Graph, value: Value, op: Op) -> None:
    users = graph.users(value)
    if len(users) != 1:
        raise Refused(f"{value} (from {op.name}) has {len(users)} users; fusing would recompute it")


def keeps_masked(expr: sympy.Expr) -> bool:
    """True when the score mod ``expr`` leaves a masked score (-inf) at -inf, so a mask applied
    before it still masks: an additive bias, ``c * score`` with c > 0, ``score - 2``... but not
    ``30 * tanh(score / 30)`` (-inf becomes -30: the "masked" keys would still get weight).

    >>> from attncc.ir.exprs import score, to_sympy_number
    >>> keeps_masked(score + sympy.Symbol("bias")), keeps_masked(30 * sympy.tanh(score / 30))
    (True, False)
    """
    rest = sympy.expand(expr - score)
    if score not in rest.free_symbols:
        return not rest.has(sympy.oo, -sympy.oo, sympy.zoo, sympy.nan)
    return bool(expr.subs(score, -sympy.oo) == -sympy.oo)


def _match(graph: Graph, pv: PVOp) -> tuple[list[Op], FusedOp]:
    """The chain softmax <- (scale | score_mod | mask)* <- qk feeding ``pv``, folded in program order.

    Scales before the first score mod multiply ``scale``; later ones scale the score mod. Masks AND
    together. A step after a mask must keep a masked score at -inf (a positive scale, an additive
    bias); one that does not (a tanh softcap after the mask) is refused: the fused op masks last.
    """
    chain: list[Op] = []
    soft = graph.producer(pv.probs)
    if not isinstance(soft, SoftmaxOp):
        raise Refused(f"the probabilities come from {soft.name}, not attn.softmax")
    _single_use(graph, pv.probs, soft)
    chain.append(soft)
    value, steps = soft.scores, []
    while True:
        op = graph.producer(value)
        _single_use(graph, value, op)
        chain.append(op)
        if isinstance(op, QKOp):
            break
        if not isinstance(op, MaskOp | ScoreModOp | ScaleOp):
            raise Refused(f"{op.name} between attn.qk and attn.softmax cannot be absorbed")
        steps.append(op)
        value = op.scores
    if op.groups != pv.groups:
        raise Refused(f"qk groups={op.groups} but pv groups={pv.groups}")
    if op.heads != pv.heads:
        raise Refused(f"qk reads kv heads by {op.heads or 'h // groups'!r} but pv by {pv.heads or 'h // groups'!r}")
    scale, mod, mask, form = 1.0, score, sympy.true, ""
    for step in reversed(steps):
        if isinstance(step, MaskOp):
            mask, form = (step.pred, step.form) if mask == sympy.true else (sympy.And(mask, step.pred), "")
        elif isinstance(step, ScaleOp):
            if mask != sympy.true and step.factor <= 0:
                raise Refused(f"a scale of {step.factor} after the mask turns its -inf into +inf or nan")
            if mod == score:
                scale *= step.factor
            else:
                mod = to_sympy_number(step.factor) * mod
        else:
            if mask != sympy.true and not keeps_masked(step.expr):
                raise Refused(
                    f"the score mod {step.expr} comes after the mask and maps a masked score (-inf) to "
                    f"{step.expr.subs(score, -sympy.oo)}, so masked keys would still get weight; apply the mask last"
                )
            mod = step.expr.subs(score, mod)
    return chain, FusedOp(pv.result, op.q, op.k, pv.v, pv.groups, scale, mod, mask, form, pv.heads)
