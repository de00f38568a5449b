"""The reference target: dense PyTorch source generated from an ``attn.fused`` op.

It is the oracle for every other target: exact shared semantics, autograd for gradients
(including gradients of float runtime tensors such as a relative-bias table), fp32 compute for
fp16/bf16 inputs and fp64 for fp64 inputs. Memory is O(B * H * Sq * Skv).
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sympy
import torch

from attncc.codegen import helpers
from attncc.codegen.emit_torch import emit
from attncc.codegen.target import Call, with_rope
from attncc.plan import KernelPlan, LinearPlan

TEMPLATE = """\
# attncc reference kernel for @{name}
# dense PyTorch; fully masked rows give 0 and lse = -inf
import math

import torch

from attncc import rope as R_
from attncc.codegen import helpers as H_

SCALE = {scale!r}
GROUPS = {groups}
HEAD_TABLE = {head_table!r}  # runtime table naming each query head's kv head ("" for h // GROUPS)
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
    T = {{n: t.to(dtype) if t.is_floating_point() else t for n, t in T.items()}}  # bf16 tables compute in fp32
    T.update({{n: torch.tensor(vals, device=q.device, dtype=dtype if n in FLOAT_TABLES else torch.int64)
              for n, vals in TABLES.items()}})
    qf, kf, vf = q.to(dtype), k.to(dtype), v.to(dtype)
{rope_code}    groups = GROUPS
    if HEAD_TABLE:  # dynamic grouping: each query head's kv head gathered (the dense reference may copy)
        kf, vf = (x.index_select(1, T[HEAD_TABLE].long()) for x in (kf, vf))
        Hkv, groups = H, 1
    qf = qf.view(B, Hkv, groups, Sq, D)  # kv head = h // GROUPS, never copied
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
    o = torch.einsum("bjgqk,bjkd->bjgqd", p.view(B, Hkv, groups, Sq, Skv), vf).reshape(B, H, Sq, -1)
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
    plan: KernelPlan

    def __call__(self, q: Any, k: Any, v: Any, tensors: dict[str, Any], return_lse: bool = False) -> Any:
        return self.module.forward(q, k, v, tensors, return_lse)

    def unsupported(self, call: Call) -> str | None:
        return None  # the reference runs every call

    def run(self, call: Call) -> tuple[torch.Tensor, torch.Tensor]:
        return self(call.q, call.k, call.v, with_rope(call.tensors, call.rope), True)  # type: ignore[no-any-return]

    def prepare(self, call: Call) -> None:
        return None  # (a reference call is generated PyTorch: validation is not its cost)


ROPE_CODE = """\
    # attn.rope on q and k: x * cos + rotate_half(x) * sin (tables: one row per key position)
    qf, kf = (R_.apply(x, T["rope_cos"], T["rope_sin"]) for x in (qf, kf))
"""


def render(plan: KernelPlan) -> str:
    """Fill the template's holes from the plan (constant tables written in)."""
    tables = {t.tensor: list(t.values) for t in plan.tensors if t.values}
    floats = {t.tensor for t in plan.tensors if t.dtype == "float"}
    text = TEMPLATE.format(
        name=plan.name,
        scale=plan.scale,
        groups=plan.groups,
        head_table=plan.head_table,
        tables=repr(tables),
        **plan.expression_holes(emit),
        rope_code=ROPE_CODE if plan.rope else "",
    )
    return text.replace("TABLES = ", f"FLOAT_TABLES = {sorted(floats)!r}\nTABLES = ", 1)


def build(plan: KernelPlan) -> ReferenceKernel:
    """Render and load the reference kernel of ``plan``."""
    source = render(plan)
    module = types.ModuleType(f"attncc_reference_{plan.name.replace('-', '_').replace('.', '_')}")
    exec(compile(source, f"<attncc reference @{plan.name}>", "exec"), module.__dict__)
    return ReferenceKernel(source, module, plan)


# ---- feature-map linear attention (attncc.linear) -----------------------------------------------


def phi_fn(expr: sympy.Expr) -> Callable[[torch.Tensor], torch.Tensor]:
    """A torch function evaluating a feature-map expression elementwise (differentiable)."""
    fn = eval(f"lambda x: {emit(expr)}", {"H_": helpers, "math": math})
    return lambda t: torch.as_tensor(fn(t)).to(t.dtype) + torch.zeros_like(t)


def linear(spec: LinearPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Dense linear attention of a plan (the oracle of the triton target); fp32 compute for fp16/bf16."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    phi = phi_fn(spec.phi)
    g = spec.groups
    fq = phi(q.to(dtype))
    fk = phi(k.to(dtype)).repeat_interleave(g, 1)
    vv = v.to(dtype).repeat_interleave(g, 1)
    a = fq @ fk.transpose(-1, -2)
    if spec.causal:
        a = torch.tril(a)
    out = a @ vv
    if spec.normalize:
        out = out / (a.sum(-1, keepdim=True) + spec.eps)
    return out.to(q.dtype)
