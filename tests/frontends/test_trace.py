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
    with pytest.raises(SpecError, match=r"torch.sigmoid has no symbolic equivalent"):
        trace_score_mod(lambda s, b, h, q_idx, kv_idx: torch.sigmoid(s))
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
