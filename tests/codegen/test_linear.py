"""Feature-map linear attention: reference vs an independent float64 oracle, triton vs reference."""

from __future__ import annotations

import pytest
import torch

import attncc as ac
from attncc.errors import SpecError


def _oracle(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, phi, causal: bool, normalize: bool, eps: float):  # type: ignore[no-untyped-def]
    """Row by row in float64, straight from the definition."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1).double(), v.repeat_interleave(g, 1).double()
    fq, fk = phi(q.double()), phi(k)
    out = torch.zeros_like(q, dtype=torch.float64)
    for i in range(q.shape[2]):
        last = i + 1 if causal else k.shape[2]
        w = (fq[:, :, i : i + 1, :] * fk[:, :, :last, :]).sum(-1)  # [B, H, j]
        num = (w.unsqueeze(-1) * v[:, :, :last, :]).sum(2)
        out[:, :, i] = num / (w.sum(-1, keepdim=True) + eps) if normalize else num
    return out


MAPS = {
    "elu1": lambda t: torch.where(t > 0, t + 1, torch.exp(t)),
    "relu": lambda t: t.clamp(min=0),
    "identity": lambda t: t,
}


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("fm", sorted(MAPS))
def test_reference_matches_the_definition(fm: str, causal: bool, normalize: bool) -> None:
    spec = ac.linear_attention(
        num_heads=4, num_kv_heads=2, head_dim=8, feature_map=fm, causal=causal, normalize=normalize
    )
    q, k, v = (torch.rand(2, h, 13, 8, dtype=torch.float64) for h in (4, 2, 2))
    got = ac.compile(spec, target="reference")(q, k, v)
    torch.testing.assert_close(got, _oracle(q, k, v, MAPS[fm], causal, normalize, spec.eps))


@pytest.mark.parametrize("fm", ["elu1", "relu", "identity", "square"])
@pytest.mark.parametrize("causal", [True, False])
def test_triton_matches_reference_forward_and_backward(fm: str, causal: bool) -> None:
    feature = ac.x * ac.x if fm == "square" else fm
    spec = ac.linear_attention(num_heads=2, num_kv_heads=1, head_dim=24, feature_map=feature, causal=causal, chunk=16)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.rand(1, h, 37, 24, generator=g, requires_grad=True) for h in (2, 1, 1))
    w = torch.randn(1, 2, 37, 24, generator=g)
    outs = {t: ac.compile(spec, target=t)(q, k, v) for t in ("triton", "reference")}
    grads = {t: torch.autograd.grad((o * w).sum(), (q, k, v)) for t, o in outs.items()}
    torch.testing.assert_close(outs["triton"], outs["reference"], rtol=1e-4, atol=1e-5)
    for a, b in zip(grads["triton"], grads["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("fm", ["elu1", "relu", "square"])
@pytest.mark.parametrize("causal", [True, False])
def test_cpu_matches_the_definition_forward_and_backward(fm: str, causal: bool, normalize: bool) -> None:
    """Issue 17 item 4: the cpu target's generated C++ (chunked, state carried between chunks) against the
    float64 oracle, forward and the q, k, v gradients (GQA, a last chunk that is short)."""
    feature = ac.x * ac.x if fm == "square" else fm
    phi = (lambda t: t * t) if fm == "square" else MAPS[fm]
    spec = ac.linear_attention(num_heads=4, num_kv_heads=2, head_dim=24, feature_map=feature, causal=causal,
                               normalize=normalize, chunk=16)  # fmt: skip
    kern = ac.compile(spec, target="cpu")
    assert "lin_forward" in kern.source and "lin_backward" in kern.source
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.rand(2, h, 45, 24, generator=g, dtype=torch.float64).float() for h in (4, 2, 2))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = kern(*leaves)
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    want = _oracle(*ref_in, phi, causal, normalize, spec.eps)
    w = torch.randn(want.shape, generator=g, dtype=torch.float64)
    (out.double() * w).sum().backward()
    (want * w).sum().backward()
    scale = want.abs().max().item()
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5 * scale)
    for a, b in zip(leaves, ref_in, strict=True):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-4, atol=5e-5 * b.grad.abs().max().item())


def test_linear_attention_errors() -> None:
    with pytest.raises(SpecError, match=r"unknown feature map 'gelu'"):
        ac.linear_attention(num_heads=2, head_dim=8, feature_map="gelu")
    with pytest.raises(SpecError, match=r"must be a number-valued expression of ac.x alone"):
        ac.linear_attention(num_heads=2, head_dim=8, feature_map=ac.x > 0)
    with pytest.raises(SpecError, match=r"chunk must be a power of two >= 16"):
        ac.linear_attention(num_heads=2, head_dim=8, chunk=24)
    kern = ac.compile(ac.linear_attention(num_heads=2, head_dim=8), target="reference")
    with pytest.raises(SpecError, match=r"linear attention needs equal q and kv lengths"):
        kern(torch.randn(1, 2, 5, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8))


def test_linear_attention_goes_through_the_ir_and_a_plan() -> None:
    """spec -> IR (one attn.linear op, printable and parseable) -> canonicalize -> LinearPlan -> targets."""
    from attncc.ir.text import parse_ir, print_ir

    spec = ac.linear_attention(num_heads=4, num_kv_heads=2, head_dim=16, feature_map=ac.x * ac.x, causal=False)
    kern = ac.compile(spec, target="reference")
    assert 'phi = "x**2", causal = 0' in kern.ir and print_ir(parse_ir(kern.ir)) == kern.ir
    assert (kern.plan.groups, kern.plan.causal, str(kern.plan.phi)) == (2, False, "x**2")
    q, k, v = torch.randn(1, 4, 20, 16), torch.randn(1, 2, 20, 16), torch.randn(1, 2, 20, 16)
    fq, fk = q.double() ** 2, (k.double() ** 2).repeat_interleave(2, 1)
    a = fq @ fk.transpose(-1, -2)  # independent float64 oracle of the non-causal normalized form
    want = (a @ v.double().repeat_interleave(2, 1)) / (a.sum(-1, keepdim=True) + spec.eps)
    torch.testing.assert_close(kern(q, k, v).double(), want, atol=1e-5, rtol=1e-5)
