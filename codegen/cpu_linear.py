"""Feature-map linear attention on the cpu target: generated C++/OpenMP, forward and backward.

The algorithm is the triton target's (chunked, as in Lightning Attention-2): per (batch, query head) the
sequence is walked in chunks of C rows with a running D x D state S = sum phi(k) v^T and z = sum phi(k)
(causal: masked phi(Q) phi(K)^T inside the chunk, the state for everything before it; non-causal: the state
over the whole sequence first). Backward: dQ walks forward with the same state; dK and dV walk backward per
kv head with R = sum phi(q) dnum^T, r = sum dden phi(q) over the query heads that read it (a head index, as
the softmax kernels read: ``attncc.plan.head_index``). O(S * D^2) time per head, O(D^2 + C^2) memory per
thread. phi and its derivative are printed from the spec's expression by the C++ printer.

>>> import torch, attncc as ac
>>> kern = ac.compile(ac.linear_attention(num_heads=2, head_dim=16, causal=True), target="cpu")
>>> q, k, v = (torch.rand(1, 2, 40, 16) for _ in range(3))
>>> ref = ac.compile(ac.linear_attention(num_heads=2, head_dim=16, causal=True), target="reference")(q, k, v)
>>> bool(torch.allclose(kern(q, k, v), ref, atol=1e-5))
True
"""

from __future__ import annotations

import ctypes
from typing import Any

import sympy
import torch

from attncc.codegen import cpu_template
from attncc.codegen.emit_cpp import emit
from attncc.ir.exprs import expr_str
from attncc.linear import X
from attncc.plan import LinearPlan, head_index

_P = ctypes.c_void_p
_I = ctypes.c_int64

TEMPLATE = r"""// attncc cpu linear-attention kernels for @{name}
// feature map phi(x) = {phi_text}; d phi / dx = {dphi_text}
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#include <omp.h>

namespace {{

{helpers}
inline float phi(float xf) {{ const double x = xf; (void)x; return (float)({phi_code}); }}
inline float dphi(float xf) {{ const double x = xf; (void)x; return (float)({dphi_code}); }}

inline float dot(const float* a, const float* b, int64_t n) {{
  float s = 0.0f;
  #pragma omp simd reduction(+:s)
  for (int64_t e = 0; e < n; ++e) s += a[e] * b[e];
  return s;
}}

// f[i][e] = phi(x[i][e]) for n rows
inline void features(const float* x, float* f, int64_t n, int64_t D) {{
  for (int64_t i = 0; i < n * D; ++i) f[i] = phi(x[i]);
}}

// S += F^T V and z += w^T F (w: a weight per row, or 1 when null), n rows of D
inline void add_state(float* S, float* z, const float* f, const float* v, int64_t n, int64_t D,
                      const float* w = nullptr) {{
  for (int64_t j = 0; j < n; ++j)
    for (int64_t d = 0; d < D; ++d) {{
      const float a = f[j * D + d];
      z[d] += w ? w[j] * a : a;
      float* row = S + d * D;
      #pragma omp simd
      for (int64_t e = 0; e < D; ++e) row[e] += a * v[j * D + e];
    }}
}}

// The state a head starts from: zero when causal (it grows chunk by chunk), else S = phi(K)^T V and
// z = sum phi(K) over the whole sequence; f is scratch for a chunk of features
inline void initial_state(const float* k, const float* v, float* S, float* z, float* f, int64_t seq, int64_t C,
                          int64_t D, int causal) {{
  std::fill(S, S + D * D, 0.0f);
  std::fill(z, z + D, 0.0f);
  if (causal) return;
  for (int64_t c0 = 0; c0 < seq; c0 += C) {{
    const int64_t n = std::min(C, seq - c0);
    features(k + c0 * D, f, n, D);
    add_state(S, z, f, v + c0 * D, n, D);
  }}
}}

// dnum and dden of n rows (o = num / den when normalized)
inline void out_grads(const float* dout, const float* o, const float* den, float* dnum, float* dden, int64_t n,
                      int64_t D, int normalize) {{
  for (int64_t i = 0; i < n; ++i) {{
    const float inv = normalize ? 1.0f / den[i] : 1.0f;
    for (int64_t e = 0; e < D; ++e) dnum[i * D + e] = dout[i * D + e] * inv;
    dden[i] = normalize ? -dot(dout + i * D, o + i * D, D) * inv : 0.0f;
  }}
}}

}}  // namespace

extern "C" void lin_forward(const float* q, const float* k, const float* v, float* o, float* den, int64_t B,
                            int64_t H, int64_t Hkv, int64_t S, int64_t D, const int64_t* heads, int64_t C,
                            int causal, int normalize, float eps, int threads) {{
  #pragma omp parallel num_threads(threads)
  {{
    std::vector<float> St(D * D), z(D), fq(C * D), fk(C * D), num(D);
    #pragma omp for schedule(dynamic, 1)
    for (int64_t bh = 0; bh < B * H; ++bh) {{
      const int64_t b = bh / H, kvh = b * Hkv + heads[bh % H];
      const float* qp = q + bh * S * D;
      const float* kp = k + kvh * S * D;
      const float* vp = v + kvh * S * D;
      initial_state(kp, vp, St.data(), z.data(), fk.data(), S, C, D, causal);
      for (int64_t c0 = 0; c0 < S; c0 += C) {{
        const int64_t n = std::min(C, S - c0);
        features(qp + c0 * D, fq.data(), n, D);
        if (causal) features(kp + c0 * D, fk.data(), n, D);
        for (int64_t i = 0; i < n; ++i) {{
          const float* f = fq.data() + i * D;
          std::fill(num.begin(), num.end(), 0.0f);
          for (int64_t d = 0; d < D; ++d) {{
            const float a = f[d];
            const float* row = St.data() + d * D;
            #pragma omp simd
            for (int64_t e = 0; e < D; ++e) num[e] += a * row[e];
          }}
          float dn = dot(f, z.data(), D);
          if (causal)
            for (int64_t j = 0; j <= i; ++j) {{
              const float w = dot(f, fk.data() + j * D, D);
              const float* vr = vp + (c0 + j) * D;
              #pragma omp simd
              for (int64_t e = 0; e < D; ++e) num[e] += w * vr[e];
              dn += w;
            }}
          dn += eps;
          float* out = o + (bh * S + c0 + i) * D;
          const float inv = normalize ? 1.0f / dn : 1.0f;
          for (int64_t e = 0; e < D; ++e) out[e] = num[e] * inv;
          den[bh * S + c0 + i] = dn;
        }}
        if (causal) add_state(St.data(), z.data(), fk.data(), vp + c0 * D, n, D);
      }}
    }}
  }}
}}

extern "C" void lin_backward(const float* q, const float* k, const float* v, const float* o, const float* dout,
                             const float* den, float* dq, float* dk, float* dv, int64_t B, int64_t H, int64_t Hkv,
                             int64_t S, int64_t D, const int64_t* heads, int64_t C, int causal, int normalize,
                             int threads) {{
  #pragma omp parallel num_threads(threads)
  {{
    std::vector<float> St(D * D), z(D), fq(C * D), fk(C * D), dnum(C * D), dden(C), dfq(D), R(D * D), r(D), dfk(D),
        dvr(D);
    // dq: per (batch, query head), forward through the chunks
    #pragma omp for schedule(dynamic, 1)
    for (int64_t bh = 0; bh < B * H; ++bh) {{
      const int64_t b = bh / H, kvh = b * Hkv + heads[bh % H];
      const float* qp = q + bh * S * D;
      const float* kp = k + kvh * S * D;
      const float* vp = v + kvh * S * D;
      initial_state(kp, vp, St.data(), z.data(), fk.data(), S, C, D, causal);
      for (int64_t c0 = 0; c0 < S; c0 += C) {{
        const int64_t n = std::min(C, S - c0);
        out_grads(dout + (bh * S + c0) * D, o + (bh * S + c0) * D, den + bh * S + c0, dnum.data(), dden.data(), n, D,
                  normalize);
        if (causal) features(kp + c0 * D, fk.data(), n, D);
        for (int64_t i = 0; i < n; ++i) {{
          const float* g = dnum.data() + i * D;
          for (int64_t d = 0; d < D; ++d) dfq[d] = dot(g, St.data() + d * D, D) + dden[i] * z[d];
          if (causal)
            for (int64_t j = 0; j <= i; ++j) {{
              const float w = dot(g, vp + (c0 + j) * D, D) + dden[i];
              const float* fr = fk.data() + j * D;
              #pragma omp simd
              for (int64_t d = 0; d < D; ++d) dfq[d] += w * fr[d];
            }}
          const float* raw = qp + (c0 + i) * D;
          float* out = dq + (bh * S + c0 + i) * D;
          for (int64_t d = 0; d < D; ++d) out[d] = dfq[d] * dphi(raw[d]);
        }}
        if (causal) add_state(St.data(), z.data(), fk.data(), vp + c0 * D, n, D);
      }}
    }}
    // dk, dv: per (batch, kv head), backward through the chunks, summed over the query heads reading it
    #pragma omp for schedule(dynamic, 1)
    for (int64_t bk = 0; bk < B * Hkv; ++bk) {{
      const int64_t b = bk / Hkv, hk = bk % Hkv;
      const float* kp = k + bk * S * D;
      const float* vp = v + bk * S * D;
      std::memset(dk + bk * S * D, 0, sizeof(float) * S * D);
      std::memset(dv + bk * S * D, 0, sizeof(float) * S * D);
      for (int64_t gi = heads[H + hk]; gi < heads[H + hk + 1]; ++gi) {{
        const int64_t bh = b * H + heads[H + Hkv + 1 + gi];
        const float* qp = q + bh * S * D;
        std::fill(R.begin(), R.end(), 0.0f);
        std::fill(r.begin(), r.end(), 0.0f);
        if (!causal)
          for (int64_t c0 = 0; c0 < S; c0 += C) {{
            const int64_t n = std::min(C, S - c0);
            features(qp + c0 * D, fq.data(), n, D);
            out_grads(dout + (bh * S + c0) * D, o + (bh * S + c0) * D, den + bh * S + c0, dnum.data(), dden.data(), n,
                      D, normalize);
            add_state(R.data(), r.data(), fq.data(), dnum.data(), n, D, dden.data());  // R, r over every row
          }}
        const int64_t chunks = (S + C - 1) / C;
        for (int64_t ci = chunks - 1; ci >= 0; --ci) {{
          const int64_t c0 = ci * C, n = std::min(C, S - c0);
          features(kp + c0 * D, fk.data(), n, D);
          if (causal) {{
            features(qp + c0 * D, fq.data(), n, D);
            out_grads(dout + (bh * S + c0) * D, o + (bh * S + c0) * D, den + bh * S + c0, dnum.data(), dden.data(), n,
                      D, normalize);
          }}
          for (int64_t j = 0; j < n; ++j) {{
            const float* vr = vp + (c0 + j) * D;
            const float* fr = fk.data() + j * D;
            for (int64_t d = 0; d < D; ++d) dfk[d] = dot(vr, R.data() + d * D, D) + r[d];
            std::fill(dvr.begin(), dvr.end(), 0.0f);
            for (int64_t d = 0; d < D; ++d) {{
              const float a = fr[d];
              const float* row = R.data() + d * D;
              #pragma omp simd
              for (int64_t e = 0; e < D; ++e) dvr[e] += a * row[e];
            }}
            if (causal)
              for (int64_t i = j; i < n; ++i) {{
                const float* g = dnum.data() + i * D;
                const float* fi = fq.data() + i * D;
                const float w = dot(g, vr, D) + dden[i];
                const float a = dot(fi, fr, D);
                #pragma omp simd
                for (int64_t d = 0; d < D; ++d) {{ dfk[d] += w * fi[d]; dvr[d] += a * g[d]; }}
              }}
            const float* raw = kp + (c0 + j) * D;
            float* dkr = dk + (bk * S + c0 + j) * D;
            float* dvo = dv + (bk * S + c0 + j) * D;
            for (int64_t d = 0; d < D; ++d) {{ dkr[d] += dfk[d] * dphi(raw[d]); dvo[d] += dvr[d]; }}
          }}
          if (causal) add_state(R.data(), r.data(), fq.data(), dnum.data(), n, D, dden.data());
        }}
      }}
    }}
  }}
}}
"""


def render(plan: LinearPlan) -> str:
    dphi = sympy.diff(plan.phi, X)
    return TEMPLATE.format(
        name=plan.name, phi_text=expr_str(plan.phi), dphi_text=expr_str(dphi), phi_code=emit(plan.phi),
        dphi_code=emit(dphi), helpers=(cpu_template.BASICS + cpu_template.EXPR_HELPERS).format(),
    )  # fmt: skip


class LinearCpuKernel:
    """The compiled C++ of a :class:`attncc.plan.LinearPlan` (built on first use, cached on disk)."""

    def __init__(self, plan: LinearPlan) -> None:
        from attncc.codegen import toolchain

        self.plan = plan
        self.source = render(plan)
        self.lib, self.path, self.compiled_now = toolchain.load(self.source, f"linear_{plan.name}")
        self.lib.lin_forward.argtypes = [_P] * 5 + [_I] * 5 + [_P, _I, ctypes.c_int, ctypes.c_int, ctypes.c_float,
                                                              ctypes.c_int]  # fmt: skip
        self.lib.lin_backward.argtypes = [_P] * 9 + [_I] * 5 + [_P, _I, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        for fn in (self.lib.lin_forward, self.lib.lin_backward):
            fn.restype = None


class LinearCpuAttention(torch.autograd.Function):
    """Autograd wrapper: forward and backward both run the generated C++ (float32; other dtypes upcast once)."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kern: LinearCpuKernel) -> torch.Tensor:
        dtype = q.dtype
        qf, kf, vf = (t.detach().to(torch.float32).contiguous() for t in (q, k, v))
        B, H, S, D = qf.shape
        Hkv = kf.shape[1]
        heads = head_index(H, Hkv)
        o = torch.empty_like(qf)
        den = torch.empty(B, H, S, dtype=torch.float32)
        p = kern.plan
        kern.lib.lin_forward(qf.data_ptr(), kf.data_ptr(), vf.data_ptr(), o.data_ptr(), den.data_ptr(), B, H, Hkv, S,
                             D, heads.ctypes.data, p.chunk, int(p.causal), int(p.normalize), p.eps,
                             torch.get_num_threads())  # fmt: skip
        ctx.save_for_backward(qf, kf, vf, o, den)
        ctx.kern, ctx.dtype = kern, dtype
        return o.to(dtype)

    @staticmethod
    def backward(ctx: Any, do: torch.Tensor) -> tuple[Any, ...]:
        qf, kf, vf, o, den = ctx.saved_tensors
        B, H, S, D = qf.shape
        Hkv = kf.shape[1]
        heads = head_index(H, Hkv)
        dof = do.to(torch.float32).contiguous()
        dq, dk, dv = torch.empty_like(qf), torch.empty_like(kf), torch.empty_like(vf)
        p = ctx.kern.plan
        ctx.kern.lib.lin_backward(qf.data_ptr(), kf.data_ptr(), vf.data_ptr(), o.data_ptr(), dof.data_ptr(),
                                  den.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), B, H, Hkv, S, D,
                                  heads.ctypes.data, p.chunk, int(p.causal), int(p.normalize),
                                  torch.get_num_threads())  # fmt: skip
        return dq.to(ctx.dtype), dk.to(ctx.dtype), dv.to(ctx.dtype), None
