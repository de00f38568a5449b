"""Triton kernels for feature-map linear attention (chunked, as in Lightning Attention-2).

Per (batch, head) one program walks the sequence in chunks of C rows. Causal: inside a chunk
the (phi(Q) phi(K)^T) tile is masked lower-triangular (intra), and a running state
S = sum phi(k) v^T, z = sum phi(k) carries everything before the chunk (inter). Non-causal: the
state is summed over the whole sequence first. Backward: dQ walks forward with the same state;
dK and dV walk backward with R = sum phi(q) dnum^T, r = sum dden phi(q), for every query head of
the kv head's group. The feature map's derivative comes from sympy.
"""

from __future__ import annotations

from typing import Any

import sympy
import torch

from attncc.codegen.emit_triton import emit
from attncc.codegen.triton import interpreting, load
from attncc.ir.exprs import expr_str
from attncc.linear import X
from attncc.plan import LinearPlan

TEMPLATE = '''\
# attncc triton linear-attention kernels for @{name}
# feature map phi(x) = {phi_text}; chunk {chunk}; causal {causal}; normalize {normalize}
import triton
import triton.language as tl


@triton.jit
def _phi(x):
    return {phi_code} + 0.0 * x


@triton.jit
def _dphi(x):
    # d phi / dx = {dphi_text}
    return {dphi_code} + 0.0 * x


@triton.jit
def _feat(P, rows, offs_d, SEQ, D: tl.constexpr):
    """phi of a chunk of rows, zero outside the sequence and the head dim (phi(0) may be != 0)"""
    m = (rows[:, None] < SEQ) & (offs_d[None, :] < D)
    raw = tl.load(P + rows[:, None] * D + offs_d[None, :], mask=m, other=0.0).to(tl.float32)
    return tl.where(m, _phi(raw), 0.0), raw, m


@triton.jit
def _rows(P, rows, offs_d, SEQ, D: tl.constexpr):
    """a chunk of rows as stored (zero outside the sequence and the head dim)"""
    m = (rows[:, None] < SEQ) & (offs_d[None, :] < D)
    return tl.load(P + rows[:, None] * D + offs_d[None, :], mask=m, other=0.0).to(tl.float32)


@triton.jit
def lin_fwd(Q, K, V, O, DEN, SEQ, H, HKV, GROUPS, EPS,
            D: tl.constexpr, BLOCK_D: tl.constexpr, C: tl.constexpr, CAUSAL: tl.constexpr,
            NORMALIZE: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    kvh = b * HKV + h // GROUPS
    offs_c = tl.arange(0, C)
    offs_d = tl.arange(0, BLOCK_D)
    S = tl.zeros([BLOCK_D, BLOCK_D], tl.float32)
    z = tl.zeros([BLOCK_D], tl.float32)
    if not CAUSAL:
        for c0 in range(0, SEQ, C):
            fk, _, _ = _feat(K + kvh * SEQ * D, c0 + offs_c, offs_d, SEQ, D)
            v = _rows(V + kvh * SEQ * D, c0 + offs_c, offs_d, SEQ, D)
            S += tl.dot(tl.trans(fk), v)
            z += tl.sum(fk, 0)
    for c0 in range(0, SEQ, C):
        rows = c0 + offs_c
        fq, _, m = _feat(Q + bh * SEQ * D, rows, offs_d, SEQ, D)
        num = tl.dot(fq, S)
        den = tl.sum(fq * z[None, :], 1)
        if CAUSAL:
            fk, _, _ = _feat(K + kvh * SEQ * D, rows, offs_d, SEQ, D)
            vm = (rows[:, None] < SEQ) & (offs_d[None, :] < D)
            v = tl.load(V + kvh * SEQ * D + rows[:, None] * D + offs_d[None, :], mask=vm, other=0.0).to(tl.float32)
            a = tl.where(rows[:, None] >= rows[None, :], tl.dot(fq, tl.trans(fk)), 0.0)
            num += tl.dot(a, v)
            den += tl.sum(a, 1)
            S += tl.dot(tl.trans(fk), v)
            z += tl.sum(fk, 0)
        den = den + EPS
        out = num / den[:, None] if NORMALIZE else num
        tl.store(O + bh * SEQ * D + rows[:, None] * D + offs_d[None, :], out.to(O.dtype.element_ty), mask=m)
        tl.store(DEN + bh * SEQ + rows, den, mask=rows < SEQ)


@triton.jit
def _grads_out(DO, O, DEN, bh, rows, offs_d, SEQ, D: tl.constexpr, NORMALIZE: tl.constexpr):
    """d num and d den of a chunk, from dO (o = num / den)"""
    m = (rows[:, None] < SEQ) & (offs_d[None, :] < D)
    do = tl.load(DO + bh * SEQ * D + rows[:, None] * D + offs_d[None, :], mask=m, other=0.0).to(tl.float32)
    if NORMALIZE:
        o = tl.load(O + bh * SEQ * D + rows[:, None] * D + offs_d[None, :], mask=m, other=0.0).to(tl.float32)
        den = tl.load(DEN + bh * SEQ + rows, mask=rows < SEQ, other=1.0)
        return do / den[:, None], -tl.sum(do * o, 1) / den
    return do, tl.sum(do * 0.0, 1)


@triton.jit
def lin_bwd_dq(Q, K, V, O, DO, DEN, DQ, SEQ, H, HKV, GROUPS,
               D: tl.constexpr, BLOCK_D: tl.constexpr, C: tl.constexpr, CAUSAL: tl.constexpr,
               NORMALIZE: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    kvh = b * HKV + h // GROUPS
    offs_c = tl.arange(0, C)
    offs_d = tl.arange(0, BLOCK_D)
    S = tl.zeros([BLOCK_D, BLOCK_D], tl.float32)
    z = tl.zeros([BLOCK_D], tl.float32)
    if not CAUSAL:
        for c0 in range(0, SEQ, C):
            fk, _, _ = _feat(K + kvh * SEQ * D, c0 + offs_c, offs_d, SEQ, D)
            v = _rows(V + kvh * SEQ * D, c0 + offs_c, offs_d, SEQ, D)
            S += tl.dot(tl.trans(fk), v)
            z += tl.sum(fk, 0)
    for c0 in range(0, SEQ, C):
        rows = c0 + offs_c
        fq, raw, m = _feat(Q + bh * SEQ * D, rows, offs_d, SEQ, D)
        dnum, dden = _grads_out(DO, O, DEN, bh, rows, offs_d, SEQ, D, NORMALIZE)
        dfq = tl.dot(dnum, tl.trans(S)) + dden[:, None] * z[None, :]
        if CAUSAL:
            fk, _, _ = _feat(K + kvh * SEQ * D, rows, offs_d, SEQ, D)
            vm = (rows[:, None] < SEQ) & (offs_d[None, :] < D)
            v = tl.load(V + kvh * SEQ * D + rows[:, None] * D + offs_d[None, :], mask=vm, other=0.0).to(tl.float32)
            w = tl.where(rows[:, None] >= rows[None, :], tl.dot(dnum, tl.trans(v)) + dden[:, None], 0.0)
            dfq += tl.dot(w, fk)
            S += tl.dot(tl.trans(fk), v)
            z += tl.sum(fk, 0)
        dq = tl.where(m, dfq * _dphi(raw), 0.0)
        tl.store(DQ + bh * SEQ * D + rows[:, None] * D + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=m)


@triton.jit
def lin_bwd_dkdv(Q, K, V, O, DO, DEN, DK, DV, SEQ, H, HKV, GROUPS,
                 D: tl.constexpr, BLOCK_D: tl.constexpr, C: tl.constexpr, CAUSAL: tl.constexpr,
                 NORMALIZE: tl.constexpr):
    bkh = tl.program_id(0)
    b = bkh // HKV
    hk = bkh % HKV
    offs_c = tl.arange(0, C)
    offs_d = tl.arange(0, BLOCK_D)
    n_chunks = tl.cdiv(SEQ, C)
    for g in range(0, GROUPS):
        bh = b * H + hk * GROUPS + g
        R = tl.zeros([BLOCK_D, BLOCK_D], tl.float32)
        r = tl.zeros([BLOCK_D], tl.float32)
        if not CAUSAL:
            for c0 in range(0, SEQ, C):
                fq, _, _ = _feat(Q + bh * SEQ * D, c0 + offs_c, offs_d, SEQ, D)
                dnum, dden = _grads_out(DO, O, DEN, bh, c0 + offs_c, offs_d, SEQ, D, NORMALIZE)
                R += tl.dot(tl.trans(fq), dnum)
                r += tl.sum(dden[:, None] * fq, 0)
        for ci in range(0, n_chunks):
            rows = (n_chunks - 1 - ci) * C + offs_c
            fk, raw, m = _feat(K + bkh * SEQ * D, rows, offs_d, SEQ, D)
            v = tl.load(V + bkh * SEQ * D + rows[:, None] * D + offs_d[None, :], mask=m, other=0.0).to(tl.float32)
            dfk = tl.dot(v, tl.trans(R)) + r[None, :]
            dv = tl.dot(fk, R)
            if CAUSAL:
                fq, _, _ = _feat(Q + bh * SEQ * D, rows, offs_d, SEQ, D)
                dnum, dden = _grads_out(DO, O, DEN, bh, rows, offs_d, SEQ, D, NORMALIZE)
                tri = rows[:, None] >= rows[None, :]
                w = tl.where(tri, tl.dot(dnum, tl.trans(v)) + dden[:, None], 0.0)
                dfk += tl.dot(tl.trans(w), fq)
                a = tl.where(tri, tl.dot(fq, tl.trans(fk)), 0.0)
                dv += tl.dot(tl.trans(a), dnum)
                R += tl.dot(tl.trans(fq), dnum)
                r += tl.sum(dden[:, None] * fq, 0)
            ptr = bkh * SEQ * D + rows[:, None] * D + offs_d[None, :]
            dk_old = tl.load(DK + ptr, mask=m, other=0.0)
            dv_old = tl.load(DV + ptr, mask=m, other=0.0)
            tl.store(DK + ptr, dk_old + tl.where(m, dfk * _dphi(raw), 0.0), mask=m)
            tl.store(DV + ptr, dv_old + dv, mask=m)
'''


def render(spec: LinearPlan) -> str:
    dphi = sympy.diff(spec.phi, X)
    return TEMPLATE.format(
        name=spec.name,
        phi_text=expr_str(spec.phi),
        phi_code=emit(spec.phi),
        dphi_text=expr_str(dphi),
        dphi_code=emit(dphi),
        chunk=spec.chunk,
        causal=spec.causal,
        normalize=spec.normalize,
    )


class LinearTritonKernel:
    """The generated linear-attention kernels of a :class:`attncc.plan.LinearPlan`."""

    def __init__(self, spec: LinearPlan) -> None:
        self.spec = spec
        self.source = render(spec)
        self.module, self.path, self.generated_now = load(self.source, spec.name)

    def meta(self, D: int) -> dict[str, Any]:
        meta: dict[str, Any] = dict(
            D=D,
            BLOCK_D=max(16, 1 << (D - 1).bit_length()),
            C=self.spec.chunk,
            CAUSAL=self.spec.causal,
            NORMALIZE=self.spec.normalize,
        )
        if not interpreting():
            meta["num_warps"] = 4
        return meta


class LinearAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kern: LinearTritonKernel) -> torch.Tensor:
        q, k, v = (t.detach().contiguous() for t in (q, k, v))
        B, H, S, D = q.shape
        o = torch.empty_like(q)
        den = torch.empty(B, H, S, dtype=torch.float32, device=q.device)
        spec = kern.spec
        kern.module.lin_fwd[(B * H,)](q, k, v, o, den, S, H, k.shape[1], spec.groups, spec.eps, **kern.meta(D))
        ctx.save_for_backward(q, k, v, o, den)
        ctx.kern = kern
        return o

    @staticmethod
    def backward(ctx: Any, do: torch.Tensor) -> tuple[Any, ...]:
        q, k, v, o, den = ctx.saved_tensors
        kern = ctx.kern
        B, H, S, D = q.shape
        do = do.contiguous()
        dq = torch.empty_like(q)
        dk, dv = (
            torch.zeros(k.shape, dtype=torch.float32, device=k.device),
            torch.zeros(v.shape, dtype=torch.float32, device=v.device),
        )
        hkv, groups = k.shape[1], kern.spec.groups
        kern.module.lin_bwd_dq[(B * H,)](q, k, v, o, do, den, dq, S, H, hkv, groups, **kern.meta(D))
        kern.module.lin_bwd_dkdv[(B * hkv,)](q, k, v, o, do, den, dk, dv, S, H, hkv, groups, **kern.meta(D))
        return dq, dk.to(k.dtype), dv.to(v.dtype), None
