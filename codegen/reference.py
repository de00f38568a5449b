"""The reference target: dense PyTorch source generated from an ``attn.fused`` op.

It is the oracle for every other target: exact shared semantics, autograd for gradients
(including gradients of float runtime tensors such as a relative-bias table), fp32 compute for
fp16/bf16 inputs and fp64 for fp64 inputs. Memory is O(B * H * Sq * Skv).
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any

import sympy

from attncc.codegen.emit_torch import emit
from attncc.errors import LoweringError
from attncc.ir.core import Graph
from attncc.ir.exprs import expr_str
from attncc.ir.ops import FusedOp, InputOp, RopeOp, TensorOp

TEMPLATE = """\
# attncc reference kernel for @{name}
# dense PyTorch; fully masked rows give 0 and lse = -inf
import math

import torch

from attncc import rope as R_
from attncc.codegen import helpers as H_

SCALE = {scale!r}
GROUPS = {groups}
TABLES = {tables}


def mask_mod(b, h, q, kv, B, H, Sq, Skv, T):
    # mask: {mask_text}
    return {mask_code}


def score_mod(score, b, h, q, kv, B, H, Sq, Skv, T):
    # score_mod: {mod_text}
    return {mod_code}


def forward(q, k, v, T, return_lse=False):
    B, H, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    T = dict(T)
    T.update({{n: torch.tensor(vals, device=q.device, dtype=dtype if n in FLOAT_TABLES else torch.int64)
              for n, vals in TABLES.items()}})
    qf, kf, vf = q.to(dtype), k.to(dtype), v.to(dtype)
{rope_code}    qf = qf.view(B, Hkv, GROUPS, Sq, D)  # kv head = h // GROUPS, never copied
    s = torch.einsum("bjgqd,bjkd->bjgqk", qf, kf).reshape(B, H, Sq, Skv) * SCALE
    ib = torch.arange(B, device=q.device).view(B, 1, 1, 1)
    ih = torch.arange(H, device=q.device).view(1, H, 1, 1)
    iq = torch.arange(Sq, device=q.device).view(1, 1, Sq, 1)
    ik = torch.arange(Skv, device=q.device).view(1, 1, 1, Skv)
    s = torch.as_tensor(score_mod(s, ib, ih, iq, ik, B, H, Sq, Skv, T), dtype=dtype).expand(B, H, Sq, Skv)
    keep = torch.as_tensor(mask_mod(ib, ih, iq, ik, B, H, Sq, Skv, T), device=q.device)
    s = torch.where(keep.expand(B, H, Sq, Skv), s, -math.inf)
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    denom = p.sum(dim=-1, keepdim=True)
    visible = denom != 0  # a NaN score makes the row (and its lse) NaN, as in torch
    p = p / torch.where(visible, denom, torch.ones_like(denom))
    o = torch.einsum("bjgqk,bjkd->bjgqd", p.view(B, Hkv, GROUPS, Sq, Skv), vf).reshape(B, H, Sq, -1)
    o = o.to(q.dtype)
    if not return_lse:
        return o
    safe = torch.where(visible, denom, torch.ones_like(denom))
    lse = torch.where(visible, torch.log(safe) + m, -math.inf).squeeze(-1)
    return o, lse
"""


@dataclass(frozen=True)
class ReferenceKernel:
    """Generated source and the module it defines (``forward(q, k, v, T, return_lse)``)."""

    source: str
    module: types.ModuleType

    def __call__(self, q: Any, k: Any, v: Any, tensors: dict[str, Any], return_lse: bool = False) -> Any:
        return self.module.forward(q, k, v, tensors, return_lse)


def fused_op(graph: Graph) -> FusedOp:
    fused = graph.ops_of(FusedOp)
    if len(fused) != 1:
        raise LoweringError(
            f"the reference target needs exactly one attn.fused op, @{graph.name} has {len(fused)}; "
            "run the 'fuse' pass (it logs why it refused)"
        )
    op = fused[0]
    assert isinstance(op, FusedOp)
    return op


def grad_tables(graph: Graph) -> list[TensorOp]:
    """Float runtime tensors read by the score mod: the ones whose gradients the kernels can return."""
    op = fused_op(graph)
    read = {str(a.base) for a in op.score_mod.atoms(sympy.Indexed)}
    return [
        t
        for t in graph.ops_of(TensorOp)
        if isinstance(t, TensorOp) and t.dtype == "float" and not t.values and t.tensor in read
    ]


def table_derivatives(op: FusedOp, tensor: str) -> list[tuple[sympy.Indexed, sympy.Basic]]:
    """Each read of ``tensor`` in the score mod, with d score_mod / d (the entry it reads): a kernel adds
    dL/d(score_mod) times that derivative to the entry's gradient.

    >>> import attncc as ac, sympy
    >>> from attncc.codegen.reference import table_derivatives
    >>> from attncc.lower import spec_to_ir
    >>> from attncc.passes.base import parse_pipeline, run_pipeline
    >>> mod = ac.score * 2 + ac.tensor("bias")[ac.h, ac.q - ac.kv + 8]
    >>> spec = ac.AttentionSpec(num_heads=2, head_dim=8, score_mod=mod)
    >>> g = run_pipeline(spec_to_ir(spec), parse_pipeline("canonicalize,fuse")).graph
    >>> [(str(occ), str(d)) for occ, d in table_derivatives(fused_op(g), "bias")]
    [('bias[h, -kv + q + 8]', '1')]
    """
    occurrences = sorted(
        (a for a in op.score_mod.atoms(sympy.Indexed) if str(a.base) == tensor), key=sympy.default_sort_key
    )
    entry = sympy.Symbol("entry", real=True)
    return [(occ, sympy.diff(op.score_mod.xreplace({occ: entry}), entry).xreplace({entry: occ})) for occ in occurrences]


ROPE_CODE = """\
    # attn.rope on q and k: x * cos + rotate_half(x) * sin (tables: one row per key position)
    qf, kf = (R_.apply(x, T["rope_cos"], T["rope_sin"]) for x in (qf, kf))
"""


def has_rope(graph: Graph) -> bool:
    """True when the fused op reads q and k through attn.rope ops on the inputs (the kernels then
    rotate in their prologue); a rope on only one of them, or not on an input, is refused."""
    op = fused_op(graph)
    found = []
    for operand, arg in ((op.q, "q"), (op.k, "k")):
        producer = graph.producer(operand)
        if isinstance(producer, RopeOp):
            source = graph.producer(producer.x)
            if not (isinstance(source, InputOp) and source.arg == arg):
                raise LoweringError(f"attn.rope must read the input %{arg} directly; it reads {producer.x}")
            found.append(arg)
        elif not isinstance(producer, InputOp):
            raise LoweringError(f"the fused op's {arg} operand comes from {producer.name}, which no target can absorb")
    if len(found) == 1:
        raise LoweringError(f"attn.rope on {found[0]} only; RoPE rotates q and k with the same tables")
    return bool(found)


def render(graph: Graph) -> str:
    """Fill the template's holes from the graph's fused op and constant tables."""
    op = fused_op(graph)
    tables = {t.tensor: list(t.values) for t in graph.ops_of(TensorOp) if isinstance(t, TensorOp) and t.values}
    floats = {t.tensor for t in graph.ops_of(TensorOp) if isinstance(t, TensorOp) and t.dtype == "float"}
    text = TEMPLATE.format(
        name=graph.name,
        scale=op.scale,
        groups=op.groups,
        tables=repr(tables),
        mask_text=expr_str(op.mask),
        mask_code=emit(op.mask),
        mod_text=expr_str(op.score_mod),
        mod_code=emit(op.score_mod),
        rope_code=ROPE_CODE if has_rope(graph) else "",
    )
    return text.replace("TABLES = ", f"FLOAT_TABLES = {sorted(floats)!r}\nTABLES = ", 1)


def build(graph: Graph) -> ReferenceKernel:
    """Render and load the reference kernel of ``graph``."""
    source = render(graph)
    module = types.ModuleType(f"attncc_reference_{graph.name.replace('-', '_').replace('.', '_')}")
    exec(compile(source, f"<attncc reference @{graph.name}>", "exec"), module.__dict__)
    return ReferenceKernel(source, module)
