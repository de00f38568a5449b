"""An op-by-op interpreter of any attncc graph, decomposed or fused, in float64.

Passes are checked with it: interpreting a graph before and after a pass must agree. It is
deliberately naive (dense, one op at a time) and shares no code with the reference template
beyond the expression emitter.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from attncc.codegen import helpers
from attncc.codegen.emit_torch import emit
from attncc.errors import UnsupportedError
from attncc.ir.core import Graph, Op
from attncc.ir.ops import (
    AttentionOp,
    InputOp,
    MaskOp,
    PVOp,
    QKOp,
    ReturnOp,
    RopeOp,
    ScaleOp,
    ScoreModOp,
    SoftmaxOp,
    TensorOp,
)

_ARGS = "score, b, h, q, kv, B, H, Sq, Skv, T"


def _fn(expr: Any) -> Any:
    return eval(f"lambda {_ARGS}: {emit(expr)}", {"H_": helpers, "math": math})


def _grids(shape: tuple[int, ...]) -> dict[str, Any]:
    B, H, Sq, Skv = shape
    return {
        "b": torch.arange(B).view(B, 1, 1, 1),
        "h": torch.arange(H).view(1, H, 1, 1),
        "q": torch.arange(Sq).view(1, 1, Sq, 1),
        "kv": torch.arange(Skv).view(1, 1, 1, Skv),
        "B": B,
        "H": H,
        "Sq": Sq,
        "Skv": Skv,
    }


def _expand_heads(
    x: torch.Tensor, groups: int, heads: str = "", T: dict[str, torch.Tensor] | None = None
) -> torch.Tensor:
    if heads:  # a runtime head table: query head h reads kv head T[heads][h]
        return x.index_select(1, (T or {})[heads].long())
    return x.repeat_interleave(groups, dim=1)  # fine here: the interpreter is a test oracle


def _apply(score: torch.Tensor, expr: Any, T: dict[str, torch.Tensor]) -> torch.Tensor:
    out = _fn(expr)(score, T=T, **_grids(tuple(score.shape)))
    return torch.as_tensor(out, dtype=torch.float64).expand(score.shape)


def _masked(score: torch.Tensor, pred: Any, T: dict[str, torch.Tensor]) -> torch.Tensor:
    keep = torch.as_tensor(_fn(pred)(score, T=T, **_grids(tuple(score.shape))))
    return torch.where(keep.expand(score.shape), score, -math.inf)


def _softmax(s: torch.Tensor) -> torch.Tensor:
    m = s.amax(-1, keepdim=True)
    p = torch.exp(s - torch.where(torch.isfinite(m), m, 0.0))
    d = p.sum(-1, keepdim=True)
    return p / torch.where(d > 0, d, 1.0)


def _step(op: Op, env: dict[str, torch.Tensor], T: dict[str, torch.Tensor]) -> torch.Tensor | None:
    get = lambda field: env[getattr(op, field).name]
    if isinstance(op, InputOp | TensorOp):
        return None
    if isinstance(op, RopeOp):
        x, half, n = get("x"), get("x").shape[-1] // 2, get("x").shape[2]
        cos, sin = ((t if t.dim() == 3 else t[None])[:, None, -n:] for t in (T["rope_cos"], T["rope_sin"]))
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin
    if isinstance(op, QKOp):
        return get("q") @ _expand_heads(get("k"), op.groups, op.heads, T).transpose(-1, -2)
    if isinstance(op, ScaleOp):
        return get("scores") * op.factor
    if isinstance(op, ScoreModOp):
        return _apply(get("scores"), op.expr, T)
    if isinstance(op, MaskOp):
        return _masked(get("scores"), op.pred, T)
    if isinstance(op, SoftmaxOp):
        return _softmax(get("scores"))
    if isinstance(op, PVOp):
        return get("probs") @ _expand_heads(get("v"), op.groups, op.heads, T)
    if isinstance(op, AttentionOp):
        s = get("q") @ _expand_heads(get("k"), op.groups, op.heads, T).transpose(-1, -2) * op.scale
        s = _masked(_apply(s, op.score_mod, T), op.mask, T)
        return _softmax(s) @ _expand_heads(get("v"), op.groups, op.heads, T)
    raise UnsupportedError(f"the interpreter has no rule for {op.name}")


def interpret(
    graph: Graph, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tensors: dict[str, torch.Tensor] | None = None
) -> torch.Tensor:
    """Evaluate ``graph`` on q, k, v (cast to float64); returns the attn.return value."""
    T = {n: (t.double() if t.is_floating_point() else t) for n, t in (tensors or {}).items()}
    for op in graph.ops_of(TensorOp):
        assert isinstance(op, TensorOp)
        if op.values:
            T[op.tensor] = torch.tensor(op.values, dtype=torch.float64 if op.dtype == "float" else torch.int64)
    env = {"q": q.double(), "k": k.double(), "v": v.double()}
    for op in graph.ops:
        if isinstance(op, ReturnOp):
            return env[op.out.name]
        value = _step(op, env, T)
        if value is not None and op.result is not None:
            env[op.result.name] = value
    raise UnsupportedError(f"graph @{graph.name} has no attn.return")
