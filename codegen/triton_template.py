"""The Triton kernel template of the triton target. Holes: ``{name}`` fields filled by
:mod:`attncc.codegen.triton` from the kernel plan; everything else is fixed text.

Forward (FlashAttention-2 online softmax): one program per (q-block, batch * head). Banded
layouts compute their kv-block ranges in the kernel from the closed form in the plan (no
index tensors); other layouts read the CSR tile lists. Full tiles run no mask code; ragged edges
use bounds masks. Backward: a dK/dV kernel per (kv-block, batch * kv-head) walking the
transposed lists for every query head of its group, and a dQ kernel per (q-block, batch * head).
"""

TEMPLATE = '''\
# attncc triton kernels for @{name}
# generated from the tiled IR: tiles {bq}x{bkv}, layout {layout}
import triton
import triton.language as tl


@triton.jit
def _fdiv(a, b):
    # floor division with Python semantics
    q = a // b
    return tl.where((a % b != 0) & ((a < 0) != (b < 0)), q - 1, q)


@triton.jit
def _fmod(a, b):
    # modulo with the sign of the divisor, as Python / sympy
    r = a % b
    return tl.where((r != 0) & ((r < 0) != (b < 0)), r + b, r)


@triton.jit
def _tanh(x):
    # tanh is +-1 in fp32 beyond |x| = 9; no exp overflow; NaN stays NaN (max/min drop it by default)
    x = tl.minimum(tl.maximum(x, -15.0, propagate_nan=tl.PropagateNan.ALL), 15.0, propagate_nan=tl.PropagateNan.ALL)
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)

@triton.jit
def _rope(x, row_ptrs, mask, COS, SIN, trow, offs_d, D: tl.constexpr):
    """attn.rope: x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1], in fp32.
    row_ptrs [rows, 1]: where each row of x starts (the partner columns are loaded from there);
    trow [rows]: the table row of each row of x."""
    half = D // 2
    partner = tl.where(offs_d < half, offs_d + half, offs_d - half)
    xp = tl.load(row_ptrs + partner[None, :], mask=mask, other=0.0).to(tl.float32)
    sign = tl.where(offs_d < half, -1.0, 1.0)
    t_off = trow[:, None] * D + offs_d[None, :]
    c = tl.load(COS + t_off, mask=mask, other=0.0)
    s = tl.load(SIN + t_off, mask=mask, other=0.0)
    return x.to(tl.float32) * c + sign[None, :] * xp * s


@triton.jit
def _rope_back(g, COS, SIN, trow, mask, offs_d, D: tl.constexpr):
    """gradient through attn.rope: g * cos + rotate_half^T(g * sin), rotate_half^T(y) = [y2, -y1]
    (the column swap as a product with a signed permutation, exact in fp32)"""
    half = D // 2
    t_off = trow[:, None] * D + offs_d[None, :]
    c = tl.load(COS + t_off, mask=mask, other=0.0)
    s = tl.load(SIN + t_off, mask=mask, other=0.0)
    i = offs_d[:, None]
    j = offs_d[None, :]
    swap = tl.where((j < half) & (i == j + half), 1.0, 0.0)
    swap -= tl.where((j >= half) & (j < D) & (i == j - half), 1.0, 0.0)
    return g * c + tl.dot(g * s, swap, input_precision="ieee")

{loaders}

@triton.jit
def _mask(offs_m, offs_n, b, h, B, H, SQ, SKV, ERR{tensor_params}):
    # mask: {mask_text}
    return {mask_code}


@triton.jit
def _mod(s, offs_m, offs_n, b, h, B, H, SQ, SKV, ERR{tensor_params}):
    # score_mod: {mod_text}
    return {mod_code}


@triton.jit
def _dmod(s, offs_m, offs_n, b, h, B, H, SQ, SKV, ERR{tensor_params}):
    # d score_mod / d score: {dmod_text}
    return {dmod_code} + 0.0 * s


@triton.jit
def _tile(s, offs_m, offs_n, full, b, h, B, H, SQ, SKV, ERR{tensor_params}, HAS_MOD: tl.constexpr):
    """scaled scores -> score mod -> mask (partial tiles) and bounds (edge tiles)"""
    keep = (offs_m[:, None] < SQ) & (offs_n[None, :] < SKV)
    qm = tl.minimum(offs_m, SQ - 1)  # padding rows/columns of edge tiles see valid positions;
    kn = tl.minimum(offs_n, SKV - 1)  # their scores are discarded by the bounds mask above
    if HAS_MOD:
        s = _mod(s, qm, kn, b, h, B, H, SQ, SKV, ERR{tensor_params})
    if full == 0:
        keep = keep & _mask(qm, kn, b, h, B, H, SQ, SKV, ERR{tensor_params})
    return tl.where(keep, s, float("-inf"))


@triton.jit
def _kv_range(qb, band: tl.constexpr, h, SQ, SKV, NKV{table_params}):
    """closed-form kv-block range of q-block qb for one band: computed [lo, hi], full [flo, fhi]"""
{band_code}
    lo = tl.maximum((lo + qb * 0).to(tl.int32), 0)  # bounds may come out of floor/ceil as floats
    hi = tl.minimum((hi + qb * 0).to(tl.int32), NKV - 1)
    flo = tl.maximum((flo + qb * 0).to(tl.int32), 0)
    fhi = tl.minimum((fhi + qb * 0).to(tl.int32), NKV - 1)
    return lo, hi, flo, fhi


{autotune}@triton.jit
def attncc_fwd(Q, K, V, O, LSE, ERR, COS, SIN, ROPE_B, MAP_OF, KV_PTR, KV_IDX, KV_FULL{tensor_params},
               sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
               B, H, SQ, SKV, NQ, NKV, MAPS_B, MAPS_H, HEADS, SCALE,
               D: tl.constexpr, BLOCK_D: tl.constexpr, DV: tl.constexpr, BLOCK_DV: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               HAS_MOD: tl.constexpr, ROPE: tl.constexpr, BANDED: tl.constexpr, BANDS: tl.constexpr):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = tl.load(HEADS + h)  # HEADS: kv head of each query head, then per kv head its query heads
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    offs_e = tl.arange(0, BLOCK_DV)  # value columns (DV: the value head size, D unless the spec says otherwise)
    emask = offs_e < DV
    q_rows = Q + b * sqb + h * sqh + offs_m[:, None] * sqm
    qmask = (offs_m[:, None] < SQ) & dmask[None, :]
    q = tl.load(q_rows + offs_d[None, :], mask=qmask, other=0.0)
    tb = tl.where(ROPE_B > 1, b, 0) * SKV  # first table row of this batch entry
    if ROPE:  # prologue: queries are the last SQ positions of the tables
        q = _rope(q, q_rows, qmask, COS, SIN, tb + offs_m + SKV - SQ, offs_d, D).to(q.dtype)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    if BANDED:
        for band in tl.static_range(BANDS):
            lo, hi, flo, fhi = _kv_range(qb, band, h, SQ, SKV, NKV{table_params})
            for kb in range(lo, hi + 1):
                seen = 0
                for other in tl.static_range(band):  # blocks an earlier band already covered
                    olo, ohi, oflo, ofhi = _kv_range(qb, other, h, SQ, SKV, NKV{table_params})
                    seen = seen | ((kb >= olo) & (kb <= ohi))
                if seen == 0:
                    full = ((kb >= flo) & (kb <= fhi)).to(tl.int32)
                    m_i, l_i, acc = _fwd_tile(q, acc, m_i, l_i, kb, full, K, V, ERR{tensor_params},
                                              b, h, hk, offs_m, offs_d, dmask, offs_e, emask,
                                              skb, skh, skn, svb, svh, svn,
                                              B, H, SQ, SKV, SCALE, COS, SIN, tb, D, BLOCK_N, HAS_MOD, ROPE)
    else:
        pair = tl.where(MAPS_B > 1, b, 0) * MAPS_H + tl.where(MAPS_H > 1, h, 0)
        row = tl.load(MAP_OF + pair) * NQ + qb
        start = tl.load(KV_PTR + row)
        end = tl.load(KV_PTR + row + 1)
        for t in range(start, end):
            kb = tl.load(KV_IDX + t)
            full = tl.load(KV_FULL + t).to(tl.int32)
            m_i, l_i, acc = _fwd_tile(q, acc, m_i, l_i, kb, full, K, V, ERR{tensor_params},
                                      b, h, hk, offs_m, offs_d, dmask, offs_e, emask, skb, skh, skn, svb, svh, svn,
                                      B, H, SQ, SKV, SCALE, COS, SIN, tb, D, BLOCK_N, HAS_MOD, ROPE)
    visible = l_i != 0  # NaN scores make l_i NaN: the row and its lse stay NaN, as in torch
    out = acc / tl.where(visible, l_i, 1.0)[:, None]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * som + offs_e[None, :], out.to(O.dtype.element_ty),
             mask=(offs_m[:, None] < SQ) & emask[None, :])
    lse = tl.where(visible, m_i + tl.log(tl.where(visible, l_i, 1.0)), float("-inf"))
    tl.store(LSE + bh * SQ + offs_m, lse, mask=offs_m < SQ)


@triton.jit
def _fwd_tile(q, acc, m_i, l_i, kb, full, K, V, ERR{tensor_params},
              b, h, hk, offs_m, offs_d, dmask, offs_e, emask, skb, skh, skn, svb, svh, svn,
              B, H, SQ, SKV, SCALE, COS, SIN, tb, D: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MOD: tl.constexpr,
              ROPE: tl.constexpr):
    offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < SKV
    if ROPE:  # the K tile rotated as it is loaded
        k_rows = K + b * skb + hk * skh + offs_n[:, None] * skn
        kmask = nmask[:, None] & dmask[None, :]
        k = tl.load(k_rows + offs_d[None, :], mask=kmask, other=0.0)
        k = tl.trans(_rope(k, k_rows, kmask, COS, SIN, tb + offs_n, offs_d, D).to(k.dtype))
    else:
        k = tl.load(K + b * skb + hk * skh + offs_n[None, :] * skn + offs_d[:, None],
                    mask=nmask[None, :] & dmask[:, None], other=0.0)
    s = tl.dot(q, k) * SCALE
    s = _tile(s, offs_m, offs_n, full, b, h, B, H, SQ, SKV, ERR{tensor_params}, HAS_MOD)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svn + offs_e[None, :],
                mask=nmask[:, None] & emask[None, :], other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    l_i = l_i * alpha + tl.sum(p, 1)
    return m_new, l_i, acc


@triton.jit
def _bwd_tile(q, do, k, v, lse, delta, offs_m, offs_n, full, b, h, B, H, SQ, SKV, SCALE, ERR{tensor_params},
              HAS_MOD: tl.constexpr):
    """p and dS (gradient w.r.t. the raw q.k) of one tile"""
    raw = tl.dot(q, tl.trans(k)) * SCALE
    s = _tile(raw, offs_m, offs_n, full, b, h, B, H, SQ, SKV, ERR{tensor_params}, HAS_MOD)
    lse_safe = tl.where(lse == float("-inf"), float("inf"), lse)
    p = tl.exp(s - lse_safe[:, None])
    dp = tl.dot(do, tl.trans(v))
    ds = tl.where(p == 0.0, 0.0, p * (dp - delta[:, None]))  # dL / d(score after the mod)
    d_mod = ds
    if HAS_MOD:
        ds = ds * _dmod(raw, tl.minimum(offs_m, SQ - 1), tl.minimum(offs_n, SKV - 1), b, h, B, H, SQ, SKV,
                        ERR{tensor_params})
    ds = tl.where(p == 0.0, 0.0, ds) * SCALE
    return p, ds, d_mod, raw


@triton.jit
def _table_grads(d_mod, s, offs_m, offs_n, b, h, B, H, SQ, SKV, ERR{tensor_params}{grad_params}):
    """scatter dL/d(score_mod) * d(score_mod)/d(table entry) into the gradients of float tables"""
    live = (d_mod != 0.0) & (offs_m[:, None] < SQ) & (offs_n[None, :] < SKV)
    offs_m = tl.minimum(offs_m, SQ - 1)
    offs_n = tl.minimum(offs_n, SKV - 1)
{table_grad_code}


@triton.jit
def attncc_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DVS, ERR, COS, SIN, ROPE_B,
                    MAP_OF, Q_PTR, Q_IDX, Q_FULL{tensor_params}{grad_params},
                    B, H, HKV, SQ, SKV, NKV, MAPS_B, MAPS_H, HEADS, SCALE,
                    D: tl.constexpr, BLOCK_D: tl.constexpr, DV: tl.constexpr, BLOCK_DV: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    HAS_MOD: tl.constexpr, ROPE: tl.constexpr, TABLE_GRADS: tl.constexpr):
    kb = tl.program_id(0)
    bhk = tl.program_id(1)
    b = bhk // HKV
    hk = bhk % HKV
    offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    nm = (offs_n[:, None] < SKV) & dmask[None, :]
    kv_off = (bhk * SKV + offs_n[:, None]) * D + offs_d[None, :]
    offs_e = tl.arange(0, BLOCK_DV)
    emask = offs_e < DV
    ne = (offs_n[:, None] < SKV) & emask[None, :]
    v_off = (bhk * SKV + offs_n[:, None]) * DV + offs_e[None, :]
    k = tl.load(K + kv_off, mask=nm, other=0.0)
    v = tl.load(V + v_off, mask=ne, other=0.0)
    tb = tl.where(ROPE_B > 1, b, 0) * SKV
    if ROPE:  # prologue: K rotated; dK is rotated back in the epilogue
        k = _rope(k, K + (bhk * SKV + offs_n[:, None]) * D, nm, COS, SIN, tb + offs_n, offs_d, D).to(k.dtype)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for g in range(tl.load(HEADS + H + hk), tl.load(HEADS + H + hk + 1)):  # the query heads reading kv head hk
        h = tl.load(HEADS + H + HKV + 1 + g)
        pair = tl.where(MAPS_B > 1, b, 0) * MAPS_H + tl.where(MAPS_H > 1, h, 0)
        row = tl.load(MAP_OF + pair) * NKV + kb
        for t in range(tl.load(Q_PTR + row), tl.load(Q_PTR + row + 1)):
            qb = tl.load(Q_IDX + t)
            full = tl.load(Q_FULL + t).to(tl.int32)
            offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
            mm = (offs_m[:, None] < SQ) & dmask[None, :]
            q_off = ((b * H + h) * SQ + offs_m[:, None]) * D + offs_d[None, :]
            q = tl.load(Q + q_off, mask=mm, other=0.0)
            if ROPE:
                q_rows = Q + ((b * H + h) * SQ + offs_m[:, None]) * D
                q = _rope(q, q_rows, mm, COS, SIN, tb + offs_m + SKV - SQ, offs_d, D).to(q.dtype)
            o_off = ((b * H + h) * SQ + offs_m[:, None]) * DV + offs_e[None, :]
            do = tl.load(DO + o_off, mask=(offs_m[:, None] < SQ) & emask[None, :], other=0.0)
            lse = tl.load(LSE + (b * H + h) * SQ + offs_m, mask=offs_m < SQ, other=float("-inf"))
            delta = tl.load(DELTA + (b * H + h) * SQ + offs_m, mask=offs_m < SQ, other=0.0)
            p, ds, d_mod, raw = _bwd_tile(q, do, k, v, lse, delta, offs_m, offs_n, full, b, h, B, H, SQ, SKV, SCALE,
                                     ERR{tensor_params}, HAS_MOD)
            if TABLE_GRADS:
                _table_grads(d_mod, raw, offs_m, offs_n, b, h, B, H, SQ, SKV, ERR{tensor_params}{grad_params})
            dv += tl.dot(tl.trans(p.to(do.dtype)), do)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
    if ROPE:
        dk = _rope_back(dk, COS, SIN, tb + offs_n, nm, offs_d, D)
    tl.store(DK + kv_off, dk.to(DK.dtype.element_ty), mask=nm)
    tl.store(DVS + v_off, dv.to(DVS.dtype.element_ty), mask=ne)


@triton.jit
def attncc_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, ERR, COS, SIN, ROPE_B,
                  MAP_OF, KV_PTR, KV_IDX, KV_FULL{tensor_params},
                  B, H, HKV, SQ, SKV, NQ, MAPS_B, MAPS_H, HEADS, SCALE,
                  D: tl.constexpr, BLOCK_D: tl.constexpr, DV: tl.constexpr, BLOCK_DV: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MOD: tl.constexpr, ROPE: tl.constexpr):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = tl.load(HEADS + h)  # HEADS: kv head of each query head, then per kv head its query heads
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    mm = (offs_m[:, None] < SQ) & dmask[None, :]
    q_off = (bh * SQ + offs_m[:, None]) * D + offs_d[None, :]
    q = tl.load(Q + q_off, mask=mm, other=0.0)
    tb = tl.where(ROPE_B > 1, b, 0) * SKV
    if ROPE:  # prologue: Q rotated; dQ is rotated back in the epilogue
        q = _rope(q, Q + (bh * SQ + offs_m[:, None]) * D, mm, COS, SIN, tb + offs_m + SKV - SQ, offs_d, D).to(q.dtype)
    offs_e = tl.arange(0, BLOCK_DV)
    emask = offs_e < DV
    do = tl.load(DO + (bh * SQ + offs_m[:, None]) * DV + offs_e[None, :], mask=(offs_m[:, None] < SQ) & emask[None, :],
                 other=0.0)
    lse = tl.load(LSE + bh * SQ + offs_m, mask=offs_m < SQ, other=float("-inf"))
    delta = tl.load(DELTA + bh * SQ + offs_m, mask=offs_m < SQ, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    pair = tl.where(MAPS_B > 1, b, 0) * MAPS_H + tl.where(MAPS_H > 1, h, 0)
    row = tl.load(MAP_OF + pair) * NQ + qb
    for t in range(tl.load(KV_PTR + row), tl.load(KV_PTR + row + 1)):
        kb = tl.load(KV_IDX + t)
        full = tl.load(KV_FULL + t).to(tl.int32)
        offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
        nm = (offs_n[:, None] < SKV) & dmask[None, :]
        kv_off = ((b * HKV + hk) * SKV + offs_n[:, None]) * D + offs_d[None, :]
        k = tl.load(K + kv_off, mask=nm, other=0.0)
        if ROPE:
            k_rows = K + ((b * HKV + hk) * SKV + offs_n[:, None]) * D
            k = _rope(k, k_rows, nm, COS, SIN, tb + offs_n, offs_d, D).to(k.dtype)
        v = tl.load(V + ((b * HKV + hk) * SKV + offs_n[:, None]) * DV + offs_e[None, :],
                    mask=(offs_n[:, None] < SKV) & emask[None, :], other=0.0)
        p, ds, _, _ = _bwd_tile(q, do, k, v, lse, delta, offs_m, offs_n, full, b, h, B, H, SQ, SKV, SCALE,
                             ERR{tensor_params}, HAS_MOD)
        dq += tl.dot(ds.to(k.dtype), k)
    if ROPE:
        dq = _rope_back(dq, COS, SIN, tb + offs_m + SKV - SQ, mm, offs_d, D)
    tl.store(DQ + q_off, dq.to(DQ.dtype.element_ty), mask=mm)
'''
