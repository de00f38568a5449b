"""Every builtin mask and score mod against the independent float64 oracle, forward and backward."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

import attncc as ac
from tests.numerics import oracle

SHAPES = [(24, 24), (16, 24), (24, 16)]
GRID_SHAPES = [(24, 24)]


@dataclass
class Case:
    name: str
    mask: Callable[[], Any]  # builds the attncc mask (or None)
    oracle: Callable[[int, int], oracle.MaskFn]  # (Sq, Skv) -> mask fn
    shapes: list[tuple[int, int]] = field(default_factory=lambda: SHAPES)
    tensors: Callable[[int, int], dict[str, torch.Tensor]] = lambda sq, skv: {}


DOC = [0] * 7 + [1] * 3 + [2] * 9 + [3] * 5  # 24 tokens, uneven documents
LAYOUT = [[1, 0, 1], [0, 1, 1], [1, 1, 0]]

CASES = [
    Case("none", lambda: None, lambda sq, skv: lambda b, h, i, j: True),
    Case("causal", ac.causal, lambda sq, skv: oracle.causal()),
    Case("causal_bottom_right", lambda: ac.causal("bottom_right"), oracle.causal_bottom_right),
    Case("sliding_window", lambda: ac.sliding_window(5), lambda sq, skv: oracle.sliding_window(5)),
    Case("sliding_window_2sided", lambda: ac.sliding_window(3, 4), lambda sq, skv: oracle.sliding_window(3, 4)),
    Case(
        "per_head_window",
        lambda: ac.sliding_window(ac.per_head([1, 3, 6, 20], name="w")),
        lambda sq, skv: oracle.per_head_window([1, 3, 6, 20]),
    ),
    Case("prefix_lm", lambda: ac.prefix_lm(6), lambda sq, skv: oracle.prefix_lm(6)),
    Case("sinks_window", lambda: ac.sinks(2) | ac.sliding_window(4), lambda sq, skv: oracle.sinks_or_window(2, 4)),
    Case("dilated_causal", lambda: ac.dilated_window(4, 3), lambda sq, skv: oracle.dilated(4, 3, True)),
    Case("dilated_sym", lambda: ac.dilated_window(5, 2, causal=False), lambda sq, skv: oracle.dilated(5, 2, False)),
    Case(
        "document",
        lambda: ac.document(ac.tensor("doc")),
        lambda sq, skv: oracle.document(DOC),
        tensors=lambda sq, skv: {"doc": torch.tensor(DOC)},
    ),
    Case(
        "causal_document",
        lambda: ac.causal() & ac.document(ac.tensor("doc")),
        lambda sq, skv: lambda b, h, i, j: j <= i and DOC[i] == DOC[j],
        tensors=lambda sq, skv: {"doc": torch.tensor(DOC)},
    ),
    Case(
        "block_layout",
        lambda: ac.block_layout(ac.tensor("layout"), block=(8, 8)),
        lambda sq, skv: oracle.block_layout(LAYOUT, 8, 8),
        tensors=lambda sq, skv: {"layout": torch.tensor(LAYOUT).bool()},
    ),
    Case(
        "na1d",
        lambda: ac.neighborhood(24, 5),
        lambda sq, skv: oracle.neighborhood((24,), (5,), (1,), (False,)),
        GRID_SHAPES,
    ),
    Case(
        "na1d_dilated_causal",
        lambda: ac.neighborhood(24, 3, dilation=4, causal=True),
        lambda sq, skv: oracle.neighborhood((24,), (3,), (4,), (True,)),
        GRID_SHAPES,
    ),
    Case(
        "na2d",
        lambda: ac.neighborhood((4, 6), (3, 4), dilation=(1, 1)),
        lambda sq, skv: oracle.neighborhood((4, 6), (3, 4), (1, 1), (False, False)),
        GRID_SHAPES,
    ),
    Case(
        "na2d_dilated_mixed",
        lambda: ac.neighborhood((4, 6), (2, 3), dilation=(2, 2), causal=(True, False)),
        lambda sq, skv: oracle.neighborhood((4, 6), (2, 3), (2, 2), (True, False)),
        GRID_SHAPES,
    ),
    Case(
        "na3d",
        lambda: ac.neighborhood((2, 3, 4), (2, 3, 3), dilation=(1, 1, 1)),
        lambda sq, skv: oracle.neighborhood((2, 3, 4), (2, 3, 3), (1, 1, 1), (False, False, False)),
        GRID_SHAPES,
    ),
    Case(
        "block_local",
        lambda: ac.block_local((4, 6), (2, 3)),
        lambda sq, skv: oracle.block_local((4, 6), (2, 3)),
        GRID_SHAPES,
    ),
    Case(
        "halo",
        lambda: ac.block_local((4, 6), 2, halo=1),
        lambda sq, skv: oracle.block_local((4, 6), (2, 2), 1),
        GRID_SHAPES,
    ),
    Case(
        "grid",
        lambda: ac.grid_attention((4, 6), (2, 3)),
        lambda sq, skv: oracle.grid_attention((4, 6), (2, 3)),
        GRID_SHAPES,
    ),
]


def _run_pair(
    spec: ac.AttentionSpec,
    keep: torch.Tensor,
    sq: int,
    skv: int,
    tensors: dict[str, torch.Tensor],
    score_fn: Callable[[torch.Tensor], torch.Tensor] | None,
    extra: list[torch.Tensor] = (),
) -> None:
    hkv = int(spec.num_kv_heads or 0)
    q = torch.randn(2, spec.num_heads, sq, spec.head_dim, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, hkv, skv, spec.head_dim, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, hkv, skv, spec.head_dim, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, spec.num_heads, sq, spec.head_dim, dtype=torch.float64)
    kern = ac.compile(spec, target="reference")
    out, lse = kern(q, k, v, return_lse=True, **tensors)
    ref, ref_lse = oracle.attention(q, k, v, keep, float(spec.scale or 0), score_fn)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)
    inputs = [q, k, v, *extra]
    got = torch.autograd.grad((out * w).sum(), inputs)
    want = torch.autograd.grad((ref * w).sum(), inputs)
    for name, a, e in zip(["dq", "dk", "dv", "dtable"], got, want):
        assert not a.isnan().any(), f"{name} has NaN"
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9, msg=f"{name} differs")


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_mask_matches_oracle(case: Case, kv_heads: int) -> None:
    for sq, skv in case.shapes:
        spec = ac.AttentionSpec(num_heads=4, num_kv_heads=kv_heads, head_dim=8, mask=case.mask())
        keep = oracle.dense(case.oracle(sq, skv), 2, 4, sq, skv)
        _run_pair(spec, keep, sq, skv, case.tensors(sq, skv), None)


MODS = [
    ("softcap", lambda: ac.softcap(2.0), lambda t: oracle.softcap_fn(2.0), {}),
    ("alibi", lambda: ac.alibi(), lambda t: oracle.alibi_fn(4), {}),
    (
        "alibi_slopes",
        lambda: ac.alibi([0.5, 0.25, 0.125, 1.0]),
        lambda t: oracle.alibi_fn(4, [0.5, 0.25, 0.125, 1.0]),
        {},
    ),
    (
        "alibi_tensor",
        lambda: ac.alibi(ac.tensor("slopes")),
        lambda t: oracle.alibi_fn(4, t["slopes"]),
        {"slopes": torch.tensor([0.3, 0.1, 0.2, 0.05], dtype=torch.float64)},
    ),
    (
        "relative_bias",
        lambda: ac.relative_bias(ac.tensor("table"), 5),
        lambda t: oracle.relative_bias_fn(t["table"], 5),
        {"table": torch.randn(4, 11, dtype=torch.float64)},
    ),
    (
        "chain",
        lambda: ac.chain(ac.alibi(), ac.softcap(3.0)),
        lambda t: lambda s: oracle.softcap_fn(3.0)(oracle.alibi_fn(4)(s)),
        {},
    ),
]


@pytest.mark.parametrize("kv_heads", [4, 1], ids=["mha", "mqa"])
@pytest.mark.parametrize("name,mod,fn,tensors", MODS, ids=[m[0] for m in MODS])
def test_score_mod_matches_oracle(
    name: str, mod: Any, fn: Any, tensors: dict[str, torch.Tensor], kv_heads: int
) -> None:
    for sq, skv in SHAPES:
        spec = ac.AttentionSpec(
            num_heads=4, num_kv_heads=kv_heads, head_dim=8, mask=ac.causal("bottom_right"), score_mod=mod()
        )
        leaf = {n: t.clone().requires_grad_(t.is_floating_point()) for n, t in tensors.items()}
        keep = oracle.dense(oracle.causal_bottom_right(sq, skv), 2, 4, sq, skv)
        extra = [t for t in leaf.values() if t.requires_grad]
        _run_pair(spec, keep, sq, skv, leaf, fn(leaf), extra)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_error_is_bounded_by_eager(dtype: torch.dtype) -> None:
    """Inductor's rule: |attncc - fp64| <= k * |eager low-precision - fp64| (+ a small floor)."""
    spec = ac.AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=16, mask=ac.causal(), score_mod=ac.softcap(5.0))
    q, k, v = torch.randn(1, 4, 33, 16), torch.randn(1, 2, 33, 16), torch.randn(1, 2, 33, 16)
    keep = oracle.dense(oracle.causal(), 1, 4, 33, 33)
    gold, _ = oracle.attention(q, k, v, keep, 0.25, oracle.softcap_fn(5.0))
    ql, kl, vl = q.to(dtype), k.to(dtype), v.to(dtype)
    out = ac.compile(spec, target="reference")(ql, kl, vl)
    assert out.dtype == dtype
    s = (ql @ kl.repeat_interleave(2, 1).transpose(-1, -2)) * 0.25
    s = (5.0 * torch.tanh(s / 5.0)).masked_fill(~keep, float("-inf"))
    eager = torch.softmax(s, -1) @ vl.repeat_interleave(2, 1)
    err = (out.double() - gold).abs().max().item()
    eager_err = (eager.double() - gold).abs().max().item()
    assert err <= 2.0 * eager_err + 1e-6, (err, eager_err)


def test_fully_masked_rows_give_zero_and_minus_inf_lse_without_nan_grads() -> None:
    spec = ac.AttentionSpec(num_heads=2, head_dim=8, mask=ac.causal("bottom_right"))
    q = torch.randn(1, 2, 10, 8, requires_grad=True)
    k = torch.randn(1, 2, 6, 8, requires_grad=True)
    v = torch.randn(1, 2, 6, 8, requires_grad=True)
    out, lse = ac.compile(spec, target="reference")(q, k, v, return_lse=True)
    assert torch.equal(out[:, :, :4], torch.zeros_like(out[:, :, :4]))
    assert torch.isneginf(lse[:, :, :4]).all() and torch.isfinite(lse[:, :, 4:]).all()
    grads = torch.autograd.grad(out.sum() + lse[:, :, 4:].sum(), (q, k, v))
    assert all(not g.isnan().any() for g in grads)
    assert torch.equal(grads[0][:, :, :4], torch.zeros_like(grads[0][:, :, :4]))
