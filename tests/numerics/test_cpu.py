"""The cpu target (generated C++/OpenMP) against the float64 oracle, forward and backward.

Tolerance follows Inductor's rule: the error of attncc's float32 kernel against the float64
oracle must stay within a small multiple of the error of the same math done eagerly in float32
(the reference target run on float32 inputs), plus a floor for values that are exactly zero.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import attncc as ac
from tests.numerics import oracle
from tests.numerics.test_builtins import CASES, MODS, Case

K = 4.0
FLOOR = 1e-5


def check_target(
    spec: ac.AttentionSpec,
    keep: torch.Tensor,
    sq: int,
    skv: int,
    tensors: dict[str, torch.Tensor],
    score_fn: Callable[[torch.Tensor], torch.Tensor] | None,
    dtype: torch.dtype = torch.float32,
    target: str = "cpu",
    tiles: tuple[int, int] | None = None,
    lse_weight: float = 0.0,
) -> None:
    """Forward, lse and gradients of ``target`` vs the oracle, within K x the eager float error; the
    gradients are those of (out * w).sum() + lse_weight * (lse * u).sum() over rows with a visible key."""
    hkv = int(spec.num_kv_heads or 0)
    g = torch.Generator().manual_seed(sq * 1000 + skv)
    q64 = torch.randn(2, spec.num_heads, sq, spec.head_dim, dtype=torch.float64, generator=g)
    k64 = torch.randn(2, hkv, skv, spec.head_dim, dtype=torch.float64, generator=g)
    v64 = torch.randn(2, hkv, skv, spec.head_dim, dtype=torch.float64, generator=g)
    w = torch.randn(2, spec.num_heads, sq, spec.head_dim, dtype=torch.float64, generator=g)
    u = torch.randn(2, spec.num_heads, sq, dtype=torch.float64, generator=g)
    q64, k64, v64 = (t.to(dtype).double() for t in (q64, k64, v64))  # the oracle sees the rounded inputs
    leaves = [t.clone().requires_grad_() for t in (q64, k64, v64)]
    gold, gold_lse = oracle.attention(*leaves, keep, float(spec.scale or 0), score_fn)
    finite = torch.isfinite(gold_lse)

    def loss(out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
        return (out.double() * w).sum() + lse_weight * (torch.where(finite, lse.double(), 0.0) * u).sum()

    gold_grads = torch.autograd.grad(loss(gold, gold_lse), leaves)
    results = {}
    for name in (target, "reference"):
        ins = [t.to(dtype).requires_grad_() for t in (q64, k64, v64)]
        kern = ac.compile(spec, target=name, tiles=tiles if name == target else None)
        out, lse = kern(*ins, return_lse=True, **tensors)
        grads = torch.autograd.grad(loss(out, lse), ins)
        results[name] = (out.double(), lse.double(), [x.double() for x in grads])
    (out, lse, grads), (eout, else_, egrads) = results[target], results["reference"]
    assert torch.equal(torch.isfinite(lse), finite), "rows with no visible key must have lse = -inf"
    named = [("out", out, eout, gold), ("lse", lse[finite], else_[finite], gold_lse[finite])]
    named += [(n, a, e, b) for n, a, e, b in zip(["dq", "dk", "dv"], grads, egrads, gold_grads)]
    for name, got, eager, want in named:
        err, eager_err = (got - want).abs().max().item(), (eager - want).abs().max().item()
        assert err <= K * eager_err + FLOOR, f"{name}: {target} error {err:.2e} vs eager error {eager_err:.2e}"


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_every_mask_matches_the_oracle(case: Case, kv_heads: int) -> None:
    for sq, skv in case.shapes:
        spec = ac.AttentionSpec(num_heads=4, num_kv_heads=kv_heads, head_dim=16, mask=case.mask())
        keep = oracle.dense(case.oracle(sq, skv), 2, 4, sq, skv)
        check_target(spec, keep, sq, skv, case.tensors(sq, skv), None)


@pytest.mark.parametrize("name,mod,fn,tensors", [m for m in MODS if m[0] != "relative_bias"], ids=lambda x: x)
def test_every_score_mod_matches_the_oracle(name: str, mod, fn, tensors) -> None:  # type: ignore[no-untyped-def]
    for sq, skv in [(24, 24), (16, 37), (37, 16)]:
        spec = ac.AttentionSpec(
            num_heads=4, num_kv_heads=1, head_dim=8, mask=ac.causal("bottom_right"), score_mod=mod()
        )
        keep = oracle.dense(oracle.causal_bottom_right(sq, skv), 2, 4, sq, skv)
        check_target(spec, keep, sq, skv, tensors, fn(tensors))


def test_relative_bias_table_without_grad_runs_in_cpp() -> None:
    table = torch.randn(4, 11, dtype=torch.float64)
    spec = ac.AttentionSpec(num_heads=4, head_dim=8, score_mod=ac.relative_bias(ac.tensor("table"), 5))
    keep = torch.ones(2, 4, 33, 29, dtype=torch.bool)
    check_target(spec, keep, 33, 29, {"table": table}, oracle.relative_bias_fn(table, 5))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype: torch.dtype) -> None:
    spec = ac.AttentionSpec(
        num_heads=4, num_kv_heads=2, head_dim=16, mask=ac.sliding_window(9) | ac.sinks(2), score_mod=ac.softcap(4.0)
    )
    keep = oracle.dense(oracle.sinks_or_window(2, 9), 2, 4, 45, 45)
    check_target(spec, keep, 45, 45, {}, oracle.softcap_fn(4.0), dtype)


def test_large_tiles_with_merged_runs_match() -> None:
    """Odd lengths and many consecutive full tiles: exercises the merged-GEMM runs."""
    spec = ac.AttentionSpec(num_heads=2, head_dim=32, mask=ac.causal() | ac.sinks(3))
    keep = oracle.dense(lambda b, h, i, j: j <= i or j < 3, 2, 2, 301, 301)
    ac.compile(spec, target="cpu", tiles=(16, 16))
    check_target(spec, keep, 301, 301, {}, None)


def test_gradients_through_lse_match() -> None:
    """A loss on lse as well as on the output (as ring attention or a merge of partial results
    has): the kernel folds dlse into delta."""
    spec = ac.AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=16, mask=ac.causal() & ac.sliding_window(20))
    keep = oracle.dense(lambda b, h, i, j: j <= i and i - j <= 20, 2, 4, 70, 70)
    check_target(spec, keep, 70, 70, {}, None, lse_weight=1.0)


@pytest.mark.parametrize("tiles", [(7, 16), (5, 3)], ids=["odd-bq-micro", "odd-both-blas"])
def test_odd_tile_sizes_match(tiles: tuple[int, int]) -> None:
    """Tiles whose rows are not a multiple of the 6-row register block, and a kv tile too narrow for it."""
    spec = ac.AttentionSpec(num_heads=2, head_dim=16, mask=ac.sliding_window(11) | ac.sinks(2))
    keep = oracle.dense(lambda b, h, i, j: (j <= i and i - j <= 11) or j < 2, 2, 2, 53, 53)
    ac.compile(spec, target="cpu", tiles=tiles)
    check_target(spec, keep, 53, 53, {}, None, tiles=tiles)
