"""Second-order gradients, non-finite constants and empty batches on every target (issue 22)."""

from __future__ import annotations

import math

import pytest
import torch

import attncc as ac
from tests.numerics import oracle

TARGETS = ["reference", "cpu", "triton"]  # triton runs under TRITON_INTERPRET=1 without a GPU (conftest)
TILES = {"reference": None, "cpu": (16, 16), "triton": (16, 16)}


@pytest.mark.parametrize("target", TARGETS)
def test_gradient_penalty_matches_the_float64_oracle(target: str) -> None:
    """d/dq of |d loss / dq|^2 (create_graph=True): correct, never a silent zero."""
    table = torch.randn(2, 9) * 0.3
    spec = ac.AttentionSpec(
        num_heads=2, head_dim=16, mask=ac.causal(), score_mod=ac.relative_bias(ac.tensor("table"), 4)
    )
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 37, 16, generator=g) for _ in range(3))
    keep = oracle.dense(oracle.causal(), 1, 2, 37, 37)

    def penalty(fn, q, k, v, t):  # type: ignore[no-untyped-def]
        (dq,) = torch.autograd.grad(fn(q, k, v, t).square().sum(), q, create_graph=True)
        return dq.square().sum()

    kern = ac.compile(spec, target=target, tiles=TILES[target])
    leaves = [q.clone().requires_grad_(), k.clone().requires_grad_(), v.clone(), table.clone().requires_grad_()]
    got = torch.autograd.grad(penalty(lambda *a: kern(*a[:3], table=a[3]), *leaves), [leaves[0], leaves[1], leaves[3]])
    want_leaves = [q.double().requires_grad_(), k.double().requires_grad_(), v.double()]
    want_leaves.append(table.double().requires_grad_())

    def gold(q, k, v, t):  # type: ignore[no-untyped-def]
        return oracle.attention(q, k, v, keep, 0.25, oracle.relative_bias_fn(t, 4))[0]

    want = torch.autograd.grad(penalty(gold, *want_leaves), [want_leaves[0], want_leaves[1], want_leaves[3]])
    for name, a, b in zip(["d2q", "d2k", "d2table"], got, want):
        assert b.abs().max() > 0
        torch.testing.assert_close(a.double(), b, rtol=2e-3, atol=2e-4, msg=name)


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
def test_non_finite_constants_are_refused_when_the_spec_is_built(value: float) -> None:
    with pytest.raises(ac.SpecError, match=r"holds the constant .*no softmax"):
        ac.AttentionSpec(num_heads=1, head_dim=8, score_mod=lambda s, b, h, q, kv: s + value)
    with pytest.raises(ac.SpecError, match="holds the constant"):
        ac.AttentionSpec(num_heads=1, head_dim=8, score_mod=lambda s, b, h, q, kv: s * value)


def test_minus_infinity_in_a_score_mod_branch_agrees_on_every_target() -> None:
    spec = ac.AttentionSpec(
        num_heads=1, head_dim=16, score_mod=lambda s, b, h, q, kv: torch.where(q >= kv + 5, s, -math.inf)
    )
    x = torch.randn(1, 1, 30, 16, generator=torch.Generator().manual_seed(1))
    keep = torch.tensor([[i >= j + 5 for j in range(30)] for i in range(30)]).expand(1, 1, 30, 30)
    want, want_lse = oracle.attention(x, x, x, keep, 0.25)
    for target in TARGETS:
        out, lse = ac.compile(spec, target=target, tiles=TILES[target])(x, x, x, return_lse=True)
        torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5, msg=target)
        assert torch.equal(torch.isinf(lse), torch.isinf(want_lse)), target


@pytest.mark.parametrize("target", TARGETS)
def test_an_empty_batch_gives_an_empty_result(target: str) -> None:
    spec = ac.AttentionSpec(num_heads=2, head_dim=16, mask=ac.causal() & ac.document(ac.tensor("doc")))
    q = torch.randn(0, 2, 8, 16, requires_grad=True)
    out, lse = ac.compile(spec, target=target, tiles=TILES[target])(q, q, q, return_lse=True, doc=torch.zeros(8).long())
    assert out.shape == (0, 2, 8, 16) and lse.shape == (0, 2, 8)
    out.sum().backward()
    assert q.grad is not None and q.grad.shape == q.shape


def test_second_order_through_the_torch_compile_backend_is_refused_clearly() -> None:
    class Sdpa(torch.nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    torch._dynamo.reset()
    model = torch.compile(Sdpa(), backend="attncc", options={"backend": "eager"})
    q = torch.randn(1, 2, 16, 16, requires_grad=True)
    k = v = torch.randn(1, 2, 16, 16)
    (dq,) = torch.autograd.grad(model(q, k, v).square().sum(), q, create_graph=True)
    with pytest.raises(ac.UnsupportedError, match="second-order gradients"):
        dq.square().sum().backward()
