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
    v64 = torch.randn(2, hkv, skv, int(spec.value_dim or 0), dtype=torch.float64, generator=g)
    w = torch.randn(2, spec.num_heads, sq, int(spec.value_dim or 0), dtype=torch.float64, generator=g)
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim,value_dim", [(192, 128), (32, 64)], ids=["mla-192-128", "values-wider"])
def test_values_of_another_width(dtype: torch.dtype, head_dim: int, value_dim: int) -> None:
    """v [B, Hkv, Skv, value_dim] and o [B, H, Sq, value_dim] (DeepSeek's MLA: 192 / 128): forward, lse and
    gradients against the oracle (the kernels run on zero-padded rows). bf16, whose native products are not
    within this test's multiple of the eager error, is drawn by the random calls (test_random_calls.py)."""
    spec = ac.AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=head_dim, value_dim=value_dim,
                            mask=ac.causal() & ac.sliding_window(40))  # fmt: skip
    keep = oracle.dense(lambda b, h, i, j: j <= i and i - j <= 40, 2, 4, 70, 70)
    check_target(spec, keep, 70, 70, {}, None, dtype, lse_weight=0.5)


def test_values_of_another_width_when_decoding() -> None:
    """One-row calls through the prepared path and the next key lengths' (a generation loop), no gradient; K a view
    of a longer cache, and K expanded from one head (its elements overlap)."""
    spec = ac.AttentionSpec(num_heads=8, num_kv_heads=2, head_dim=48, value_dim=32, mask=ac.causal("bottom_right"))
    kern, ref = ac.compile(spec, target="cpu"), ac.compile(spec, target="reference")
    g = torch.Generator().manual_seed(5)
    k, v = torch.randn(1, 2, 300, 48, generator=g), torch.randn(1, 2, 300, 32, generator=g)
    with torch.no_grad():
        for n in (200, 200, 201, 202, 300):
            q = torch.randn(1, 8, 1, 48, generator=g)
            got, want = kern(q, k[:, :, :n], v[:, :, :n]), ref(q.double(), k[:, :, :n].double(), v[:, :, :n].double())
            assert got.shape == (1, 8, 1, 32) and got.is_contiguous()
            torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
        # v padded into the layout of k where k's elements are apart (a view of a longer cache), else contiguous
        q = torch.randn(1, 8, 1, 48, generator=g)
        for kk in (k[:, :, :250], k[:, :1, :250].expand(1, 2, 250, 48)):
            want = ref(q.double(), kk.double(), v[:, :, :250].double())
            torch.testing.assert_close(kern(q, kk, v[:, :, :250]).double(), want, atol=1e-5, rtol=1e-5)


def test_padding_buffers_are_never_what_a_backward_reads() -> None:
    """Calls that need no gradient pad into this thread's kept buffers; a call whose autograd graph keeps its padded
    inputs (q, k, v requiring grad, or only a learned bias table) must not: no-grad calls made between its forward
    and its backward overwrite those buffers."""
    table = torch.randn(2, 17, requires_grad=True)
    spec = ac.AttentionSpec(num_heads=2, head_dim=32, value_dim=16, mask=ac.causal(),
                            score_mod=ac.relative_bias(ac.tensor("table"), 8))  # fmt: skip
    kern, ref = ac.compile(spec, target="cpu"), ac.compile(spec, target="reference")
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(1, 2, 50, 32, generator=g), torch.randn(1, 2, 50, 32, generator=g), torch.randn(1, 2, 50, 16)
    for leaves in ((q, k, v), tuple(t.clone().requires_grad_() for t in (q, k, v))):
        out = kern(*leaves, table=table)
        with torch.no_grad():  # overwrites the thread's padding buffers with other values of the same shapes
            kern(q + 1, k - 1, v * 3, table=table)
        got = torch.autograd.grad(out.square().sum(), (table, *[t for t in leaves if t.requires_grad]))
        wanted_leaves = [t.detach().double().requires_grad_(t.requires_grad) for t in leaves]
        t64 = table.detach().double().requires_grad_()
        want_out = ref(*wanted_leaves, table=t64)
        want = torch.autograd.grad(want_out.square().sum(), (t64, *[t for t in wanted_leaves if t.requires_grad]))
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4)


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


def _table_grad_case(spec: ac.AttentionSpec, table: torch.Tensor, name: str, fn, keep: torch.Tensor, tiles) -> None:  # type: ignore[no-untyped-def]
    """The cpu kernel's gradients of a learned table (and of q, k, v) against the float64 oracle,
    with the cpu kernel itself running (no fallback to the dense reference)."""
    B, (sq, skv) = keep.shape[0], keep.shape[-2:]
    g = torch.Generator().manual_seed(11)
    hkv = int(spec.num_kv_heads or 0)
    q = torch.randn(B, spec.num_heads, sq, spec.head_dim, generator=g)
    k, v = (torch.randn(B, hkv, skv, spec.head_dim, generator=g) for _ in range(2))
    w = torch.randn(B, spec.num_heads, sq, spec.head_dim, generator=g, dtype=torch.float64)
    leaves64 = [t.double().requires_grad_() for t in (q, k, v)] + [table.detach().double().requires_grad_()]
    gold, _ = oracle.attention(*leaves64[:3], keep, float(spec.scale or 0), fn(leaves64[3]))
    gold_grads = torch.autograd.grad((gold * w).sum(), leaves64)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)] + [table.detach().clone().requires_grad_()]
    kern = ac.compile(spec, target="cpu", tiles=tiles)
    out = kern(*leaves[:3], **{name: leaves[3]})
    assert out.grad_fn is not None and "CpuAttention" in type(out.grad_fn).__name__, "the C++ kernel ran"
    grads = torch.autograd.grad((out.double() * w).sum(), leaves)
    eager = ac.compile(spec, target="reference")
    leaves_e = [t.clone().requires_grad_() for t in (q, k, v)] + [table.detach().clone().requires_grad_()]
    eager_grads = torch.autograd.grad((eager(*leaves_e[:3], **{name: leaves_e[3]}).double() * w).sum(), leaves_e)
    for label, got, e, want in zip(["dq", "dk", "dv", "dtable"], grads, eager_grads, gold_grads):
        err, eager_err = (got.double() - want).abs().max().item(), (e.double() - want).abs().max().item()
        assert err <= K * eager_err + FLOOR, f"{label}: cpu error {err:.2e} vs eager error {eager_err:.2e}"


@pytest.mark.parametrize("tiles", [(16, 16), (32, 64)])
def test_learned_relative_bias_table_gets_its_gradient_from_the_cpu_kernel(tiles: tuple[int, int]) -> None:
    """Issue 13 item 5: a learnable table no longer sends the whole call to the O(S^2) reference."""
    table = torch.randn(4, 11)
    spec = ac.AttentionSpec(
        num_heads=4, num_kv_heads=2, head_dim=32, mask=ac.causal(), score_mod=ac.relative_bias(ac.tensor("table"), 5)
    )
    keep = oracle.dense(oracle.causal(), 2, 4, 70, 70)
    _table_grad_case(spec, table, "table", lambda t: oracle.relative_bias_fn(t, 5), keep, tiles)


def test_captured_parameter_bias_gets_its_gradient_from_the_cpu_kernel() -> None:
    bias = torch.nn.Parameter(torch.randn(2, 37, 37) * 0.5)
    spec = ac.AttentionSpec(
        num_heads=2,
        head_dim=16,
        mask=ac.sliding_window(9),
        score_mod=lambda s, b, h, q_idx, kv_idx: s * 0.5 + bias[h, q_idx, kv_idx],
    )
    keep = oracle.dense(oracle.sliding_window(9), 1, 2, 37, 37)
    captured = spec.captured["bias"]
    assert captured is bias

    def fn(t: torch.Tensor):  # type: ignore[no-untyped-def]
        return lambda s: s * 0.5 + t.unsqueeze(0)

    # the captured tensor is bound by the spec itself: compare through it
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 37, 16, generator=g, requires_grad=True) for _ in range(3))
    out = ac.compile(spec, target="cpu", tiles=(16, 16))(q, k, v)
    assert "CpuAttention" in type(out.grad_fn).__name__
    (got,) = torch.autograd.grad(out.square().sum(), [bias])
    leaves = [t.detach().double() for t in (q, k, v)] + [bias.detach().double().requires_grad_()]
    gold, _ = oracle.attention(*leaves[:3], keep, 0.25, fn(leaves[3]))
    (want,) = torch.autograd.grad(gold.square().sum(), [leaves[3]])
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_float_tensor_the_score_mod_does_not_read_still_falls_back_with_a_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    spec = ac.AttentionSpec(num_heads=1, head_dim=16, mask=ac.tensor("gate", "float")[ac.kv] > 0)
    x = torch.randn(1, 1, 20, 16)
    gate = torch.randn(20, requires_grad=True)
    import logging

    with caplog.at_level(logging.INFO, logger="attncc.api"):
        ac.compile(spec, target="cpu")(x, x, x, gate=gate)
    assert "require grad but the score mod does not read them" in caplog.text
