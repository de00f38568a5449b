"""The canonicalize pass: normal forms, constant folding, builtin recognition.

before:
    %s1 = attn.scale %s {factor = 0.125}
    %s2 = attn.score_mod %s1 {expr = "score/2"}
    %s3 = attn.mask %s2 {pred = "q - kv >= 0", form = ""}
after:
    %s1 = attn.scale %s {factor = 0.0625}
    %s3 = attn.mask %s1 {pred = "kv <= q", form = "causal"}

Folds: a score mod ``c * score`` multiplies the scale; an identity score mod, a scale of 1 and a
mask that is always true disappear (their users read the operand instead).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import sympy

from attncc.ir.core import Graph, Op, Value
from attncc.ir.exprs import score
from attncc.ir.ops import AttentionOp, MaskOp, ScaleOp, ScoreModOp
from attncc.passes import normalize
from attncc.passes.base import Pass
from attncc.passes.recognize import form_of


def simplify_score_mod(expr: sympy.Expr) -> tuple[sympy.Expr, float]:
    """Split ``c * score`` into (score, c); anything else is returned with factor 1."""
    coeff, rest = expr.as_coeff_Mul()
    if rest == score and coeff.is_number and coeff > 0:
        return score, float(coeff)
    return expr, 1.0


@dataclass(frozen=True)
class Canonicalize(Pass):
    """Normalize mask and score expressions; fold constants; recognize builtin forms."""

    name: ClassVar[str] = "canonicalize"

    def run(self, graph: Graph) -> Graph:
        ops: list[Op] = []
        renamed: dict[Value, Value] = {}
        for op in graph.ops:
            op = _rebind(op, renamed)
            if isinstance(op, ScoreModOp):
                expr, factor = simplify_score_mod(op.expr)
                scale_at = _scale_index(ops, op.scores)
                if factor != 1.0 and scale_at is None:
                    expr, factor = op.expr, 1.0  # c*score not fed by a scale: keep it as written
                if scale_at is not None and factor != 1.0:
                    prev = ops[scale_at]
                    assert isinstance(prev, ScaleOp)
                    ops[scale_at] = dataclasses.replace(prev, factor=prev.factor * factor)
                if expr == score:
                    renamed[op.result] = op.scores  # type: ignore[index]
                    continue
                op = dataclasses.replace(op, expr=expr)
            elif isinstance(op, MaskOp):
                pred = normalize.boolean(op.pred)
                if pred == sympy.true:
                    renamed[op.result] = op.scores  # type: ignore[index]
                    continue
                op = dataclasses.replace(op, pred=pred, form=form_of(pred))
            elif isinstance(op, AttentionOp):
                expr, factor = simplify_score_mod(op.score_mod)
                mask = normalize.boolean(op.mask)
                op = dataclasses.replace(op, score_mod=expr, scale=op.scale * factor, mask=mask, form=form_of(mask))
            ops.append(op)
        return Graph(graph.name, tuple(_drop_unit_scales(ops)))


def _scale_index(ops: list[Op], value: Value) -> int | None:
    for i, op in enumerate(ops):
        if isinstance(op, ScaleOp) and op.result == value:
            return i
    return None


def _rebind(op: Op, renamed: dict[Value, Value]) -> Op:
    changes = {f: renamed[v] for f, v in op.operand_values() if v in renamed}
    return dataclasses.replace(op, **changes) if changes else op  # type: ignore[arg-type]


def _drop_unit_scales(ops: list[Op]) -> list[Op]:
    out: list[Op] = []
    dropped: dict[Value, Value] = {}
    for op in ops:
        op = _rebind(op, dropped)
        if isinstance(op, ScaleOp) and op.factor == 1.0:
            dropped[op.result] = op.scores  # type: ignore[index]
            continue
        out.append(op)
    return out
