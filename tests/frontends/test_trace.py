"""FlexAttention-style callables traced symbolically, and located errors for untraceable code."""

from __future__ import annotations

import math

import pytest
import sympy
import torch

import attncc as ac
from attncc.errors import SpecError
from attncc.ir import exprs as X
from attncc.trace import trace_mask, trace_score_mod
from tests.numerics import oracle

DOC_IDS = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
GLOBAL_BIAS = torch.randn(3, 10, 10, dtype=torch.float64)


def doc_causal(b, h, q_idx, kv_idx):  # written exactly as in FlexAttention's docs
    return (DOC_IDS[q_idx] == DOC_IDS[kv_idx]) & (q_idx >= kv_idx)


def test_global_and_closure_tensors_are_captured() -> None:
    traced = trace_mask(doc_causal)
    assert set(traced.captured) == {"DOC_IDS"} and traced.captured["DOC_IDS"] is DOC_IDS
    local = torch.tensor([5, 5, 6])
    traced2 = trace_mask(lambda b, h, q_idx, kv_idx: local[q_idx] != local[kv_idx])
    assert traced2.expr.sym == sympy.Ne(X.tensor_base("local")[X.q], X.tensor_base("local")[X.kv])


def test_torch_functions_trace() -> None:
    def softcap_alibi(score, b, h, q_idx, kv_idx):
        capped = 20 * torch.tanh(score / 20)
        return torch.where(q_idx >= kv_idx, capped - torch.abs(q_idx - kv_idx) * 0.5, -float("inf"))

    expr = trace_score_mod(softcap_alibi).expr.sym
    assert expr.has(sympy.tanh) and expr.has(sympy.Piecewise)
    mask = trace_mask(lambda b, h, q_idx, kv_idx: torch.logical_and(q_idx >= kv_idx, torch.remainder(kv_idx, 2) == 0))
    assert mask.expr.sym == sympy.And(X.q >= X.kv, sympy.Eq(sympy.Mod(X.kv, 2), 0))


def test_traced_spec_runs_with_captured_tensors_and_matches_oracle() -> None:
    spec = ac.AttentionSpec(
        num_heads=3,
        head_dim=8,
        mask=doc_causal,
        score_mod=lambda s, b, h, q_idx, kv_idx: s + GLOBAL_BIAS[h, q_idx, kv_idx],
    )
    assert [t.name for t in spec.runtime_tensors()] == [], "captured tensors are bound automatically"
    q, k, v = (torch.randn(1, 3, 10, 8, dtype=torch.float64) for _ in range(3))
    out = ac.compile(spec, target="reference")(q, k, v)
    keep = oracle.dense(lambda b, h, i, j: DOC_IDS[i] == DOC_IDS[j] and j <= i, 1, 3, 10, 10)
    ref, _ = oracle.attention(q, k, v, keep, 8**-0.5, lambda s: s + GLOBAL_BIAS.unsqueeze(0))
    torch.testing.assert_close(out, ref)


def test_bool_tensor_mask_is_a_condition() -> None:
    allowed = torch.rand(6, 6) > 0.5
    traced = trace_mask(lambda b, h, q_idx, kv_idx: allowed[q_idx, kv_idx])
    assert traced.expr.sym == sympy.Ne(X.tensor_base("allowed")[X.q, X.kv], 0)


def test_python_control_flow_is_reported_with_its_line() -> None:
    def branchy(b, h, q_idx, kv_idx):
        if q_idx >= kv_idx:  # untraceable: Python branch on a symbolic value
            return kv_idx >= 0
        return kv_idx < 0

    with pytest.raises(SpecError, match=r"mask_mod cannot be traced at .*test_trace.py:\d+: `if q_idx >= kv_idx:"):
        trace_mask(branchy)


def test_untraceable_calls_are_reported() -> None:
    with pytest.raises(SpecError, match=r"torch.cumsum has no symbolic equivalent"):
        trace_score_mod(lambda s, b, h, q_idx, kv_idx: torch.cumsum(s, 0))
    with pytest.raises(SpecError, match=r"tensor method `.cumsum\(\)` has no symbolic equivalent"):
        trace_score_mod(lambda s, b, h, q_idx, kv_idx: s.cumsum(0))
    with pytest.raises(SpecError, match=r"used as a Python integer"):
        trace_mask(lambda b, h, q_idx, kv_idx: [True, False][q_idx])
    with pytest.raises(SpecError, match=r"math.exp|TypeError|converted to float"):
        trace_score_mod(lambda s, b, h, q_idx, kv_idx: s * math.exp(q_idx))
    with pytest.raises(SpecError, match=r"mask_mod must take 4 arguments"):
        trace_mask(lambda q_idx, kv_idx: q_idx >= kv_idx)
    with pytest.raises(SpecError, match=r"mask_mod returned `-kv \+ q`, a number"):
        trace_mask(lambda b, h, q_idx, kv_idx: q_idx - kv_idx)
    with pytest.raises(SpecError, match=r"score_mod returned the condition"):
        trace_score_mod(lambda s, b, h, q_idx, kv_idx: s > 0)


# ---- FlexAttention compatibility (issue 13, item 4) ----------------------------------------------------

PACKED = torch.tensor([0] * 5 + [1] * 7 + [2] * 4)


def _same_packed_doc(q_idx, kv_idx):  # a helper reading a module-level tensor
    return PACKED[q_idx] == PACKED[kv_idx]


def _run_against(spec: ac.AttentionSpec, fn) -> None:  # type: ignore[no-untyped-def]
    """Run ``spec`` on the cpu target and compare with the oracle of the plain-Python mask ``fn``."""
    S = len(PACKED)
    q, k, v = (torch.randn(1, 2, S, 16) for _ in range(3))
    keep = oracle.dense(fn, 1, 2, S, S)
    want, _ = oracle.attention(q, k, v, keep, 16**-0.5)
    torch.testing.assert_close(ac.compile(spec, target="cpu")(q, k, v).double(), want, rtol=1e-4, atol=1e-5)


def test_torch_mask_combinators_trace() -> None:
    from torch.nn.attention.flex_attention import and_masks, noop_mask, or_masks

    causal = lambda b, h, q_idx, kv_idx: q_idx >= kv_idx
    doc = lambda b, h, q_idx, kv_idx: PACKED[q_idx] == PACKED[kv_idx]
    ids = PACKED.tolist()
    spec = ac.AttentionSpec(num_heads=2, head_dim=16, mask=and_masks(causal, doc))
    _run_against(spec, lambda b, h, i, j: i >= j and ids[i] == ids[j])
    spec = ac.AttentionSpec(num_heads=2, head_dim=16, mask=or_masks(causal, doc))
    _run_against(spec, lambda b, h, i, j: i >= j or ids[i] == ids[j])
    assert ac.AttentionSpec(num_heads=2, head_dim=16, mask=noop_mask).mask == sympy.true
    assert ac.AttentionSpec(num_heads=2, head_dim=16, mask=and_masks()).mask == sympy.true


def test_helpers_reading_global_tensors_are_captured() -> None:
    def mask(b, h, q_idx, kv_idx):
        return _same_packed_doc(q_idx, kv_idx) & (q_idx >= kv_idx)

    spec = ac.AttentionSpec(num_heads=2, head_dim=16, mask=mask)
    assert spec.captured == {"PACKED": PACKED}
    ids = PACKED.tolist()
    _run_against(spec, lambda b, h, i, j: i >= j and ids[i] == ids[j])


def test_lambdas_made_by_helpers_and_name_clashes() -> None:
    def make(doc):
        return lambda b, h, q_idx, kv_idx: doc[q_idx] == doc[kv_idx]

    from torch.nn.attention.flex_attention import and_masks

    other = torch.tensor([0] * 8 + [1] * 8)
    spec = ac.AttentionSpec(num_heads=2, head_dim=16, mask=and_masks(make(PACKED), make(other)))
    assert set(spec.captured) == {"doc", "doc_1"}, "two tensors under one name get distinct runtime names"
    a, c = PACKED.tolist(), other.tolist()
    _run_against(spec, lambda b, h, i, j: a[i] == a[j] and c[i] == c[j])


def test_captured_zero_d_tensor_is_a_constant() -> None:
    w = torch.tensor(4)
    spec = ac.AttentionSpec(
        num_heads=2, head_dim=16, mask=lambda b, h, q_idx, kv_idx: (q_idx - kv_idx < w) & (q_idx >= kv_idx)
    )
    assert not spec.captured and "4" in str(spec.mask)
    _run_against(spec, lambda b, h, i, j: 0 <= i - j < 4)
    learned = torch.tensor(2.0, requires_grad=True)
    with pytest.raises(SpecError, match=r"0-d tensor 'learned' requires grad.*learned\[0\]"):
        ac.AttentionSpec(num_heads=2, head_dim=16, score_mod=lambda s, b, h, q_idx, kv_idx: s * learned)
