"""RoPE applied in the kernel prologue (``AttentionSpec(rope=True)``) vs the float64 oracle.

The oracle rotates q and k by complex multiplication (RoFormer's definition) or, for arbitrary
tables, element by element, then runs :func:`oracle.attention`. Tolerance as in test_cpu:
within K x the error of the same math done eagerly in the input dtype (the reference target).
"""

from __future__ import annotations

import math

import pytest
import sympy
import torch

import attncc as ac
from attncc.errors import SpecError, VerifyError
from attncc.ir import exprs as X
from attncc.ir import parse_ir, print_ir
from attncc.ir.core import Value
from attncc.ir.ops import RopeOp
from tests.numerics import oracle

K, FLOOR = 4.0, 1e-5


def _check(
    target: str,
    sq: int,
    skv: int,
    kv_heads: int = 2,
    batched: bool = False,
    paired: bool = True,
    dtype: torch.dtype = torch.float32,
    mod: bool = False,
    D: int = 16,
    Dv: int | None = None,
) -> None:
    B, H, Dv = 2, 4, Dv or D
    g = torch.Generator().manual_seed(sq * 100 + skv + kv_heads)
    q, k, v = (
        torch.randn(B, h, n, d, dtype=torch.float64, generator=g)
        for h, n, d in ((H, sq, D), (kv_heads, skv, D), (kv_heads, skv, Dv))
    )
    q, k, v = (t.to(dtype).double() for t in (q, k, v))
    w = torch.randn(B, H, sq, Dv, dtype=torch.float64, generator=g)
    if paired:
        theta = oracle.rope_angles(skv, D)
        emb = torch.cat((theta, theta), -1)
        cos, sin = emb.cos().float(), emb.sin().float()
        tables = (cos.expand(B, skv, D).contiguous(), sin.expand(B, skv, D).contiguous()) if batched else (cos, sin)
        rotate = lambda x: oracle.rope_complex(x, theta)
    else:
        cos = torch.randn(B if batched else 1, skv, D, generator=g, dtype=torch.float64).float()
        sin = torch.randn(B if batched else 1, skv, D, generator=g, dtype=torch.float64).float()
        tables = (cos, sin) if batched else (cos[0], sin[0])
        rotate = lambda x: oracle.rope_tables(cos, sin, x)
    keep = oracle.dense(lambda b, h, i, j: j <= i + skv - sq, B, H, sq, skv)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    score_fn = (lambda s: 20 * torch.tanh(s / 20)) if mod else None
    gold, gold_lse = oracle.attention(rotate(leaves[0]), rotate(leaves[1]), leaves[2], keep, 1 / math.sqrt(D), score_fn)
    gold_grads = torch.autograd.grad((gold * w).sum(), leaves)
    spec = ac.AttentionSpec(
        num_heads=H,
        num_kv_heads=kv_heads,
        head_dim=D,
        value_dim=Dv,
        mask=ac.causal("bottom_right"),
        score_mod=ac.softcap(20.0) if mod else None,
        rope=True,
    )
    results = {}
    for name in (target, "reference"):
        ins = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out, lse = ac.compile(spec, target=name)(*ins, return_lse=True, rope_cos=tables[0], rope_sin=tables[1])
        grads = torch.autograd.grad((out.double() * w).sum(), ins)
        results[name] = [out.double(), lse.double(), *(x.double() for x in grads)]
    for label, got, eager, want in zip(
        ["out", "lse", "dq", "dk", "dv"], results[target], results["reference"], [gold, gold_lse, *gold_grads]
    ):
        err, eager_err = (got - want).abs().max().item(), (eager - want).abs().max().item()
        assert err <= K * eager_err + FLOOR, f"{label}: {target} error {err:.2e} vs eager error {eager_err:.2e}"


@pytest.mark.parametrize("target", ["reference", "cpu"])
@pytest.mark.parametrize("sq,skv", [(29, 29), (13, 40)], ids=["square", "decode-like"])
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_rope_matches_the_complex_rotation(target: str, sq: int, skv: int, kv_heads: int) -> None:
    _check(target, sq, skv, kv_heads)


@pytest.mark.parametrize("target", ["reference", "cpu"])
def test_rope_with_per_batch_arbitrary_tables_and_a_score_mod(target: str) -> None:
    _check(target, 21, 33, batched=True, paired=False, mod=True)


def test_rope_cpu_bf16() -> None:
    _check("cpu", 29, 29, dtype=torch.bfloat16)


@pytest.mark.parametrize("head_dim", [16, 24], ids=["d16", "d24-padded"])
def test_rope_triton_prologue(head_dim: int) -> None:
    """In-kernel rotation of the Triton target (forward, dK/dV and dQ kernels), under the interpreter
    on machines without a GPU."""
    _check("triton", 16, 24, batched=True, mod=True, D=head_dim)


@pytest.mark.parametrize("target", ["cpu", "triton"])
@pytest.mark.parametrize("D,Dv", [(16, 8), (8, 24)], ids=["values-narrower", "values-wider"])
def test_rope_with_values_of_another_width(target: str, D: int, Dv: int) -> None:
    """Values narrower than q and k are padded, q and k kept (rotated in the kernel); values wider: q and k
    rotated before they are padded (the rotation pairs columns d and d + D/2 of the declared head_dim)."""
    _check(target, 13, 29, D=D, Dv=Dv)


def test_rope_ir_shows_the_rotation_feeding_the_tiled_op() -> None:
    kern = ac.compile(ac.AttentionSpec(num_heads=2, head_dim=8, mask=ac.causal(), rope=True), target="cpu")
    assert "%q1 = attn.rope %q : [B, 2, Sq, 8]" in kern.ir and "attn.tiled %q1, %k1, %v" in kern.ir
    assert kern.plan.rope and kern.cpu_kernel().rope and "q and k rotated in the prologue" in str(kern.plan)
    assert "q = _rope(q, q_rows" in ac.compile(kern.spec, target="triton").source
    for record in kern.records:  # the IR after every pass prints and parses back to itself
        assert print_ir(parse_ir(record.ir)) == record.ir
    with pytest.raises(VerifyError, match="head_dim 7 of %q is odd"):
        RopeOp(
            Value("q1", (X.B, sympy.Integer(2), X.Sq, sympy.Integer(7))),
            Value("q", (X.B, sympy.Integer(2), X.Sq, sympy.Integer(7))),
        ).verify()
    plain = ac.compile(ac.AttentionSpec(num_heads=2, head_dim=8, mask=ac.causal()), target="cpu")
    assert not plain.plan.rope and not plain.cpu_kernel().rope and "attn.rope" not in plain.ir


def test_rope_errors_name_what_to_pass() -> None:
    kern = ac.compile(ac.AttentionSpec(num_heads=2, head_dim=8, rope=True), target="reference")
    x = torch.randn(1, 2, 6, 8)
    with pytest.raises(SpecError, match="pass \\['rope_cos', 'rope_sin'\\]"):
        kern(x, x, x)
    with pytest.raises(SpecError, match="rope_cos has shape \\(5, 8\\); expected \\[6, 8\\]"):
        kern(x, x, x, rope_cos=torch.ones(5, 8), rope_sin=torch.ones(5, 8))
    with pytest.raises(SpecError, match="must not exceed kv length"):
        kern(x, x[:, :, :3], x[:, :, :3], rope_cos=torch.ones(3, 8), rope_sin=torch.ones(3, 8))
    with pytest.raises(SpecError, match="even head_dim"):
        ac.AttentionSpec(num_heads=2, head_dim=7, rope=True)
    learned = torch.ones(6, 8, requires_grad=True)
    with pytest.raises(SpecError, match="rope_cos requires grad, but attncc treats RoPE tables as constants"):
        kern(x, x, x, rope_cos=learned, rope_sin=torch.ones(6, 8))
    with torch.no_grad():
        assert kern(x, x, x, rope_cos=learned, rope_sin=torch.ones(6, 8)).shape == x.shape
    plain = ac.compile(ac.AttentionSpec(num_heads=2, head_dim=8), target="reference")
    with pytest.raises(SpecError, match="the spec has no rope"):
        plain(x, x, x, rope_cos=torch.ones(6, 8), rope_sin=torch.ones(6, 8))
