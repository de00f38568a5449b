"""NaN in, NaN out, identically on every target (issue 13, item 3).

A NaN in a query row, or in a key that a row can see, makes that row's output and lse NaN, as
torch's softmax does; rows that cannot see the bad key stay finite and exact. Masked keys stay
masked: a NaN score where the mask is false does not leak.
"""

from __future__ import annotations

import math

import pytest
import torch

import attncc as ac
from tests.numerics import oracle

S, D, TILES = 40, 16, (16, 16)
TARGETS = ["reference", "cpu", "triton"]  # triton runs under TRITON_INTERPRET=1 without a GPU (conftest)


def _run(target: str, where: str, row: int, mask: object = None, score_mod: object = None) -> tuple[torch.Tensor, ...]:
    spec = ac.AttentionSpec(num_heads=2, head_dim=D, mask=mask, score_mod=score_mod)
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, S, D, generator=g) for _ in range(3))
    {"q": q, "k": k, "v": v}[where][0, 0, row, 3] = math.nan
    leaves = [t.requires_grad_() for t in (q, k, v)]
    kern = ac.compile(spec, target=target, tiles=TILES if target != "reference" else None)
    out, lse = kern(*leaves, return_lse=True)
    (dq,) = torch.autograd.grad(out.sum(), [leaves[0]])
    keep = torch.ones(1, 2, S, S, dtype=torch.bool) if mask is None else oracle.dense(oracle.causal(), 1, 2, S, S)
    want, want_lse = oracle.attention(q.detach(), k.detach(), v.detach(), keep, D**-0.5)
    return out.detach(), lse.detach(), dq, want, want_lse


@pytest.mark.parametrize("target", TARGETS)
def test_nan_in_a_query_row_makes_that_row_nan(target: str) -> None:
    out, lse, dq, want, _ = _run(target, "q", 5, mask=ac.causal())
    assert out[0, 0].isnan().any(-1).nonzero().flatten().tolist() == [5]
    assert lse[0, 0].isnan().nonzero().flatten().tolist() == [5], "lse of the bad row is NaN, not -inf or finite"
    assert dq[0, 0, 5].isnan().all()
    fine = torch.ones(S, dtype=torch.bool)
    fine[5] = False
    torch.testing.assert_close(out[0, 0, fine].double(), want[0, 0, fine], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[0, 1].double(), want[0, 1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("score_mod", [None, ac.softcap(5.0)], ids=["plain", "softcap"])
def test_nan_in_a_key_reaches_exactly_the_rows_that_see_it(target: str, score_mod: object) -> None:
    out, lse, _, want, _ = _run(target, "k", 21, mask=ac.causal(), score_mod=score_mod)
    bad_rows = out[0, 0].isnan().any(-1)
    assert bad_rows.nonzero().flatten().tolist() == list(range(21, S)), "causal: rows >= 21 see key 21"
    assert lse[0, 0].isnan().nonzero().flatten().tolist() == list(range(21, S))
    if score_mod is None:
        torch.testing.assert_close(out[0, 0, :21].double(), want[0, 0, :21], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("target", TARGETS)
def test_nan_in_a_value_row_reaches_the_rows_that_weigh_it(target: str) -> None:
    out, lse, _, _, _ = _run(target, "v", 30)
    assert out[0, 0].isnan().any(-1).all(), "every row of an unmasked head weighs value 30"
    assert torch.isfinite(lse).all(), "lse does not read v"
    assert torch.isfinite(out[0, 1]).all()
