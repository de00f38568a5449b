"""The cpu target as a product: source, caching, compile errors, fallbacks, auto."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch

import attncc as ac
from attncc import config
from attncc.codegen import cpu, toolchain
from attncc.errors import LoweringError
from tests.codegen.test_triton import GOLDEN_SPECS as TRITON_GOLDEN_SPECS

SPEC = ac.AttentionSpec(
    name="cpu_doc",
    num_heads=2,
    head_dim=16,
    mask=ac.causal() & ac.document(ac.tensor("doc")),
    score_mod=ac.softcap(20.0),
)


def test_source_is_readable_cpp() -> None:
    src = ac.compile(SPEC, target="cpu").source
    assert "// mask: (kv <= q) & Eq(doc[q], doc[kv])" in src
    assert "return ((kv <= q) && (T_doc(cx, q) == T_doc(cx, kv)));" in src
    assert "// d score_mod / d score: -tanh(score/20)**2 + 1" in src
    assert 'extern "C" int attncc_masks(' in src and 'extern "C" const Hooks* attncc_hooks()' in src
    runtime = ac.compile(SPEC, target="cpu").cpu_kernel().runtime_source  # the fixed part, shared by specs
    assert 'extern "C" int attncc_forward(' in runtime and 'extern "C" int attncc_backward(' in runtime
    assert "mask_fn" not in runtime and "tanh" not in runtime


GOLDEN = Path(__file__).parent / "golden"
GOLDEN_SPECS = {
    "causal_softcap": TRITON_GOLDEN_SPECS["causal_softcap"],  # the same spec's triton source is golden too
    "packed_docs_learned_bias": ac.AttentionSpec(
        name="packed_docs_learned_bias",
        num_heads=2,
        head_dim=64,
        mask=ac.causal() & ac.document(ac.tensor("doc")),
        score_mod=ac.score + ac.tensor("bias", "float")[ac.h, (ac.q - ac.kv).clamp(0, 31)],
    ),
}


@pytest.mark.parametrize("name", sorted(GOLDEN_SPECS))
def test_generated_spec_source_golden(name: str, golden) -> None:  # type: ignore[no-untyped-def]
    """The per-spec C++ (what a new spec compiles): only mask, score mod, derivatives and tensor reads."""
    golden(GOLDEN / f"cpu_{name}.cpp.txt", ac.compile(GOLDEN_SPECS[name], target="cpu", tiles=(64, 64)).source)


def test_specs_with_the_same_tiles_share_one_runtime_build(tmp_path: Path) -> None:
    with config.override(cache_dir=tmp_path, always_compile=False):
        first = cpu.CpuKernel(ac.compile(GOLDEN_SPECS["causal_softcap"], target="cpu", tiles=(64, 64)).plan)
        other = ac.AttentionSpec(name="shares_runtime", num_heads=2, head_dim=16, mask=ac.sliding_window(9))
        second = cpu.CpuKernel(ac.compile(other, target="cpu", tiles=(64, 64)).plan)
    assert first.runtime_path == second.runtime_path and first.path != second.path
    assert first.runtime_compiled_now and second.spec_compiled_now and not second.runtime_compiled_now


def test_second_compile_hits_the_disk_cache(tmp_path: Path) -> None:
    with config.override(cache_dir=tmp_path, always_compile=False):
        first = cpu.CpuKernel(ac.compile(SPEC, target="cpu").plan)
        second = cpu.CpuKernel(ac.compile(SPEC, target="cpu").plan)
    assert first.compiled_now and not second.compiled_now and first.path == second.path
    assert sorted(p.name.split("-")[0] for p in tmp_path.glob("cpu/*.so")) == ["cpu_doc", "runtime_128x64"]


def test_compile_errors_name_the_file_and_show_the_compiler(tmp_path: Path) -> None:
    with config.override(cache_dir=tmp_path), pytest.raises(LoweringError) as info:
        toolchain.build("this is not C++;", "broken")
    msg = str(info.value)
    assert "the C++ compiler failed on the generated kernel" in msg and "broken-" in msg and "error" in msg


def test_out_of_bounds_runtime_index_is_reported() -> None:
    idx = ac.tensor("doc")
    spec = ac.AttentionSpec(num_heads=1, head_dim=8, mask=idx[ac.q % 7 + ac.q % 5] == 0)
    q = torch.randn(1, 1, 12, 8)
    with pytest.raises(ValueError, match=r"the cpu kernel read runtime tensor 'doc' out of its bounds"):
        ac.compile(spec, target="cpu")(q, q, q, doc=torch.zeros(8, dtype=torch.long))


def test_fallbacks_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    kern = ac.compile(ac.AttentionSpec(num_heads=2, head_dim=8, mask=ac.causal()), target="cpu")
    q = torch.randn(1, 2, 10, 8, dtype=torch.float64)
    with caplog.at_level(logging.INFO, logger="attncc.api"):
        out = kern(q, q, q)
    assert out.dtype == torch.float64
    assert "running the reference target for this call: float64 inputs" in caplog.text
    table = torch.randn(2, 7, requires_grad=True)
    rb = ac.compile(
        ac.AttentionSpec(num_heads=2, head_dim=8, score_mod=ac.relative_bias(ac.tensor("t"), 3)), target="cpu"
    )
    x = torch.randn(1, 2, 10, 8)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="attncc.api"):
        rb(x, x, x, t=table).sum().backward()
    assert table.grad is not None and "running the reference" not in caplog.text, "learned tables run in C++"


def test_auto_picks_cpu_for_cpu_tensors() -> None:
    kern = ac.compile(ac.AttentionSpec(num_heads=2, head_dim=8), target="auto")
    assert kern.target == "cpu" and "attncc_masks" in kern.source


def test_block_products_use_register_blocked_micro_kernels_where_shapes_allow(caplog: pytest.LogCaptureFixture) -> None:
    kern = ac.compile(ac.AttentionSpec(num_heads=2, head_dim=16, mask=ac.causal()), target="cpu").cpu_kernel()
    if kern.lanes == 0:
        pytest.skip("this CPU has no FMA vector unit: every product runs through sgemm")
    width = 2 * kern.lanes
    assert kern.products(width).startswith("micro-kernels")
    assert kern.products(width + 8).startswith(f"blas: head_dim {width + 8}")
    odd = ac.compile(ac.AttentionSpec(num_heads=2, head_dim=width + 8, mask=ac.causal()), target="cpu")
    x = torch.randn(1, 2, 9, width + 8)
    with caplog.at_level(logging.INFO, logger="attncc.codegen.cpu"):
        odd(x, x, x)
    assert "block products fall back to sgemm" in caplog.text


def test_concurrent_calls_from_python_threads_do_not_share_scratch_memory() -> None:
    """ctypes releases the GIL during the call: each Python thread packs K into its own workspace."""
    from concurrent.futures import ThreadPoolExecutor

    kern = ac.compile(ac.AttentionSpec(num_heads=2, head_dim=32, mask=ac.causal()), target="cpu")
    g = torch.Generator().manual_seed(3)
    inputs = [tuple(torch.randn(1, 2, 300 + 37 * i, 32, generator=g) for _ in range(3)) for i in range(4)]
    alone = [kern(*x) for x in inputs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        together = list(pool.map(lambda x: kern(*x), inputs * 3))
    for i, out in enumerate(together):
        assert torch.equal(out, alone[i % 4])


@pytest.mark.parametrize("tiles", [(0, 64), (64, 8192), (64,)])
def test_tile_sizes_out_of_range_are_refused(tiles: tuple[int, ...]) -> None:
    with pytest.raises(ac.SpecError, match=r"tiles must be a pair of ints \(bq, bkv\) in 1\.\.4096"):
        ac.compile(SPEC, target="cpu", tiles=tiles)  # type: ignore[arg-type]


def test_deterministic_algorithms_make_the_backward_bitwise_reproducible() -> None:
    """dq sums per-thread partials; under torch.use_deterministic_algorithms the kv-block tasks go to threads
    round-robin, so every call sums the same tasks in the same order."""
    kern = ac.compile(ac.AttentionSpec(num_heads=4, head_dim=32, mask=ac.causal()), target="cpu", tiles=(32, 32))
    g = torch.Generator().manual_seed(5)
    q, k, v, do = (torch.randn(1, 4, 384, 32, generator=g) for _ in range(4))

    def grads() -> tuple[torch.Tensor, ...]:
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        return torch.autograd.grad(kern(qg, kg, vg), (qg, kg, vg), do)

    free = grads()
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [grads() for _ in range(4)]
    finally:
        torch.use_deterministic_algorithms(before)
    for run in runs[1:]:
        for a, b in zip(run, runs[0]):
            assert torch.equal(a, b)
    for a, b in zip(runs[0], free):  # the same gradients, summed in another order at most
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_release_workspace_frees_the_scratch_and_later_calls_allocate_afresh() -> None:
    kern = ac.compile(ac.AttentionSpec(num_heads=2, head_dim=32, mask=ac.causal()), target="cpu")
    x = torch.randn(1, 2, 256, 32, generator=torch.Generator().manual_seed(6))
    first = kern(x, x, x)
    held = ac.workspace_bytes()
    assert held >= 2 * 256 * 32 * 4  # K packed for the micro-kernels
    assert ac.release_workspace() == held
    assert ac.workspace_bytes() == 0
    assert torch.equal(kern(x, x, x), first)
    assert ac.workspace_bytes() > 0


def _isas() -> list[str]:
    """The instruction sets this machine can build for: portable and avx2 on every x86 machine of the
    pool, avx512 where the CPU has it (so the AVX-512 micro-kernels run wherever they can), and native where
    it adds AMX tiles to that (avx512 leaves them out)."""
    flags = toolchain.cpu_flags()
    found = ["portable"]
    if {"avx2", "fma"} <= flags:
        found.append("avx2")
    if "avx512f" in flags:
        found.append("avx512")
    if {"amx_tile", "amx_bf16", "avx512_bf16"} <= flags:
        found.append("native")
    return found


def _bf16_isas() -> list[str]:
    """The builds of this machine with native bf16 products: AVX512_BF16 dot products (avx512), AMX (native)."""
    return [isa for isa in _isas() if isa in ("avx512", "native") and "avx512_bf16" in toolchain.cpu_flags()]


@pytest.mark.parametrize("isa", _isas())
def test_every_buildable_instruction_set_matches_the_oracle_and_keeps_a_workspace(isa: str) -> None:
    """Issue 13 item 6: nothing may assume one machine's register block (16 columns on AVX2, 32 on
    AVX-512); each build is checked against the float64 oracle, forward and backward."""
    from tests.numerics import oracle

    spec = ac.AttentionSpec(num_heads=2, head_dim=64, mask=ac.causal() & ac.sliding_window(40))
    with config.override(cpu_isa=isa):
        kern = ac.compile(spec, target="cpu", tiles=(32, 64))
        products = kern.cpu_kernel().products(64)
        assert products.startswith("blas" if isa == "portable" else "micro-kernels"), products
        lanes = {"portable": 0, "avx2": 8, "avx512": 16, "native": 16}[isa]
        assert kern.cpu_kernel().lanes == lanes
        g = torch.Generator().manual_seed(3)
        q, k, v = (torch.randn(1, 2, 100, 64, generator=g, requires_grad=True) for _ in range(3))
        out = kern(q, k, v)
        out.square().sum().backward()
        assert ac.release_workspace() > 0 and ac.workspace_bytes() == 0
    keep = torch.tensor([[0 <= i - j <= 40 for j in range(100)] for i in range(100)]).expand(1, 2, 100, 100)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want, _ = oracle.attention(*leaves, keep, 64**-0.5)
    want.square().sum().backward()
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5)
    for t, w in zip((q, k, v), leaves):
        torch.testing.assert_close(t.grad.double(), w.grad, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("isa", _isas())
def test_bf16_inputs_on_every_instruction_set(isa: str) -> None:
    """Issue 17 item 1: bf16 q, k, v run the native bf16 forward (AVX512_BF16 dot products on the bf16 values,
    P rounded to bf16 for P V, fp32 softmax and accumulation) where the build has the instructions, else the
    fp32 kernel on upcast copies; either way the output is as close to the float64 oracle as SDPA's own bf16
    result, forward and backward, with a partial-tile mask, a score mod, GQA and a ragged last block."""
    from tests.numerics import oracle

    spec = ac.AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=64, mask=ac.causal() & ac.sliding_window(90),
                            score_mod=ac.softcap(8.0))  # fmt: skip
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, 150, 64, generator=g).bfloat16()
    k, v = (torch.randn(2, 2, 150, 64, generator=g).bfloat16() for _ in range(2))
    with config.override(cpu_isa=isa):
        kern = ac.compile(spec, target="cpu")
        native = kern.cpu_kernel().native_bf16(64)
        assert native == (isa in ("native", "avx512") and "avx512_bf16" in toolchain.cpu_flags())
        assert ("AMX tiles" in kern.cpu_kernel().products(64)) == (isa == "native" and native), isa
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = kern(*leaves)
        out.float().square().sum().backward()
    assert out.dtype == torch.bfloat16
    keep = torch.tensor([[0 <= i - j <= 90 for j in range(150)] for i in range(150)]).expand(2, 4, 150, 150)
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    want, _ = oracle.attention(*ref_in, keep, 64**-0.5, lambda s: 8.0 * torch.tanh(s / 8.0))
    want.square().sum().backward()
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=keep[0, 0]
    )  # bf16's own rounding, without the softcap: a scale for the error, not an answer
    bound = 2 * float((sdpa.double() - oracle.attention(q, k, v, keep, 64**-0.5)[0]).abs().mean())
    assert float((out.detach().double() - want.detach()).abs().mean()) <= bound
    torch.testing.assert_close(out.double(), want, atol=2e-2, rtol=2e-2)
    for t, w in zip(leaves, ref_in, strict=True):
        torch.testing.assert_close(t.grad.double(), w.grad, atol=6e-2, rtol=3e-2)


@pytest.mark.parametrize("isa", _bf16_isas() or [pytest.param("avx512", marks=pytest.mark.skip("no AVX512_BF16"))])
@pytest.mark.parametrize("head_dim", [32, 96, 128])
def test_native_bf16_head_dims_ragged_rows_and_empty_rows(isa: str, head_dim: int) -> None:
    """The native bf16 forward (AMX tiles on ``native`` where the CPU has them, AVX512_BF16 dot products on
    ``avx512``) at every head dim its products take, 32-row q tiles (two AMX row tiles), a ragged last q block
    (13 rows: padded to 16 for the tiles), a ragged last kv tile, and query rows that see no key at all (zeros,
    lse -inf), against the float64 oracle on the same bf16 values."""
    from tests.numerics import oracle

    S, Skv = 77, 93
    spec = ac.AttentionSpec(num_heads=2, head_dim=head_dim, mask=ac.causal(align="bottom_right") & (ac.q >= 5))
    g = torch.Generator().manual_seed(head_dim)
    q = torch.randn(1, 2, S, head_dim, generator=g).bfloat16()
    k, v = (torch.randn(1, 2, Skv, head_dim, generator=g).bfloat16() for _ in range(2))
    with config.override(cpu_isa=isa):
        kern = ac.compile(spec, target="cpu", tiles=(32, 64))
        assert kern.cpu_kernel().native_bf16(head_dim), kern.cpu_kernel().products(head_dim)
        out, lse = kern(q, k, v, return_lse=True)
    keep = torch.tensor([[j <= i + Skv - S and i >= 5 for j in range(Skv)] for i in range(S)]).expand(1, 2, S, Skv)
    want, want_lse = oracle.attention(q, k, v, keep, head_dim**-0.5)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out[:, :, :5].float(), torch.zeros(1, 2, 5, head_dim))
    assert bool((lse[:, :, :5] == -torch.inf).all())
    # P is rounded to bf16 for P V, and the output to bf16: errors of a few bf16 ulps of |o| <= 1
    torch.testing.assert_close(out.double(), want, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse[:, :, 5:].double(), want_lse[:, :, 5:], atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize(
    ("isa", "dtype"),
    [*((isa, torch.bfloat16) for isa in _bf16_isas()), *((isa, torch.float32) for isa in _isas() if isa != "portable")],
)
def test_partial_tiles_scores_of_half_panels(isa: str, dtype: torch.dtype) -> None:
    """Bands kv in [q - behind, q + ahead]: the kept keys of a register block of rows start and end at every offset
    within a panel of NR keys, so that the partial tiles' scores, which take only the half of a panel where all its
    kept keys lie (``scores_kept``, ``scores_kept_bf``), meet both halves' edges; the forward and backward (bf16:
    native where the build has AVX512_BF16; fp32 on every vector build) against the float64 oracle on the same
    values."""
    from tests.numerics import oracle

    S, D = 200, 64
    tol = {"atol": 2e-2, "rtol": 2e-2} if dtype == torch.bfloat16 else {"atol": 1e-4, "rtol": 1e-4}
    for ahead, behind in [(1, 100), (5, 113), (2, 99), (7, 98), (3, 105), (12, 109)]:
        spec = ac.AttentionSpec(num_heads=2, head_dim=D, mask=(ac.kv <= ac.q + ahead) & (ac.kv >= ac.q - behind))
        g = torch.Generator().manual_seed(ahead)
        q, k, v = (torch.randn(1, 2, S, D, generator=g).to(dtype) for _ in range(3))
        w = torch.randn(1, 2, S, D, generator=g)
        with config.override(cpu_isa=isa):
            kern = ac.compile(spec, target="cpu")
            if dtype == torch.bfloat16:
                assert kern.cpu_kernel().native_bf16(D), kern.cpu_kernel().products(D)
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            out = kern(*leaves)
            (out.float() * w).sum().backward()
        keep = torch.tensor([[-behind <= j - i <= ahead for j in range(S)] for i in range(S)]).expand(1, 2, S, S)
        ref_in = [t.double().requires_grad_() for t in (q, k, v)]
        want, _ = oracle.attention(*ref_in, keep, D**-0.5)
        (want * w.double()).sum().backward()
        torch.testing.assert_close(out.double(), want.detach(), **tol)
        grad_tol = {"atol": 6e-2, "rtol": 3e-2} if dtype == torch.bfloat16 else tol
        for got, ref in zip(leaves, ref_in, strict=True):
            torch.testing.assert_close(got.grad.double(), ref.grad, **grad_tol)


@pytest.mark.parametrize("isa", _bf16_isas() or [pytest.param("avx512", marks=pytest.mark.skip("no AVX512_BF16"))])
def test_native_bf16_backward_over_gapped_reaches(isa: str) -> None:
    """A 2-D neighborhood on an 8 x 64 grid at 64 x 64 tiles: the queries that keep a 32-key column block of a key
    tile are one run per grid row, 26 rows apart, so that dV^T and dK^T, which multiply only the pending rows that
    reach a column block (``gemm_bf_cols``'s runs per 32-row group), take several runs per block; against the
    float64 oracle on the same bf16 values."""
    from tests.numerics import oracle

    rows, cols, D = 8, 64, 64
    S = rows * cols
    spec = ac.AttentionSpec(num_heads=2, head_dim=D, mask=ac.neighborhood((rows, cols), (3, 7)))
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, S, D, generator=g).bfloat16() for _ in range(3))
    w = torch.randn(1, 2, S, D, generator=g)
    with config.override(cpu_isa=isa):
        kern = ac.compile(spec, target="cpu", tiles=(64, 64))
        assert kern.plan.backward_tiles == (64, 64)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        (kern(*leaves).float() * w).sum().backward()
    keep = oracle.dense(oracle.neighborhood((rows, cols), (3, 7), (1, 1), (False, False)), 1, 2, S, S)
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    want, _ = oracle.attention(*ref_in, keep, D**-0.5)
    (want * w.double()).sum().backward()
    for got, ref in zip(leaves, ref_in, strict=True):
        torch.testing.assert_close(got.grad.double(), ref.grad, atol=6e-2, rtol=3e-2)


@pytest.mark.parametrize("isa", _bf16_isas() or [pytest.param("avx512", marks=pytest.mark.skip("no AVX512_BF16"))])
def test_native_bf16_running_max_that_moves_and_stays(isa: str) -> None:
    """The bf16 forward's softmax keeps a row's running max until a score exceeds it by more than 2^8 (one pass per
    row, no rescale); a row whose scores climb across the kv tiles redoes the tile with the new max. Rows climbing
    by 2 (base 2) per key would overflow fp32 within a tile if the max never moved; falling rows, rows rising by
    less than the margin per tile, and random rows keep it. Against the float64 oracle on the same bf16 values."""
    from tests.numerics import oracle

    S, D = 200, 64
    g = torch.Generator().manual_seed(11)
    q = torch.randn(1, 4, S, D, generator=g)
    k = torch.randn(1, 4, S, D, generator=g)
    q[:, :3] = 0.0
    q[:, :3, :, 0] = 8.0  # head h's scores: (k[j, 0] * 8) / 8 = k[j, 0]
    slopes = (2.0 / 1.4427, -2.0 / 1.4427, 0.05)  # per key, in base 2: climbing, falling, rising by 3.2 per tile
    for h, slope in enumerate(slopes):
        k[:, h, :, 0] = torch.arange(S) * slope
    q, k = q.bfloat16(), k.bfloat16()
    v = torch.randn(1, 4, S, D, generator=g).bfloat16()
    spec = ac.AttentionSpec(num_heads=4, head_dim=D, mask=ac.causal())
    with config.override(cpu_isa=isa):
        kern = ac.compile(spec, target="cpu", tiles=(32, 64))
        assert kern.cpu_kernel().native_bf16(D), kern.cpu_kernel().products(D)
        out, lse = kern(q, k, v, return_lse=True)
    keep = torch.ones(S, S).tril().bool().expand(1, 4, S, S)
    want, want_lse = oracle.attention(q, k, v, keep, D**-0.5)
    assert bool(out.isfinite().all())
    torch.testing.assert_close(out.double(), want, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-3, rtol=1e-3)


def native_runs(monkeypatch: pytest.MonkeyPatch, method: str) -> list[bool]:
    """Spies on ``CpuKernel.<method>``, a native half-precision path that returns None where it declines (the caller
    then upcasts): the list gets, per call, whether it ran natively."""
    ran: list[bool] = []
    real = getattr(cpu.CpuKernel, method)

    def spy(self: cpu.CpuKernel, *args: Any, **kwargs: Any) -> Any:
        found = real(self, *args, **kwargs)
        ran.append(found is not None)
        return found

    monkeypatch.setattr(cpu.CpuKernel, method, spy)
    return ran


@pytest.mark.parametrize("isa", _bf16_isas() or [pytest.param("avx512", marks=pytest.mark.skip("no AVX512_BF16"))])
@pytest.mark.parametrize("head_dim", [32, 96, 128])
def test_native_bf16_backward(isa: str, head_dim: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 17: the bf16 backward's five products run natively, on AMX tiles (``native`` where the CPU has AMX)
    or AVX512_BF16 register blocks (``avx512``): ``backward_bf16`` returns gradients (checked with a spy on the
    real method) instead of the caller upcasting for the fp32 backward. GQA, a ragged
    last q block and kv tile, rows that see no key (zero gradients), a partial-tile band, the lse's own gradient,
    against the float64 oracle on the same bf16 values; under ``use_deterministic_algorithms`` two runs agree
    bit for bit."""
    from tests.numerics import oracle

    ran = native_runs(monkeypatch, "backward_bf16")
    S, Skv = 77, 93
    band = ac.causal(align="bottom_right") & (ac.kv >= ac.q + (Skv - S) - 40) & (ac.q >= 5)
    spec = ac.AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=head_dim, mask=band)
    g = torch.Generator().manual_seed(head_dim + 1)
    q = torch.randn(2, 4, S, head_dim, generator=g).bfloat16()
    k, v = (torch.randn(2, 2, Skv, head_dim, generator=g).bfloat16() for _ in range(2))
    w = torch.randn(2, 4, S, head_dim, generator=g)
    with config.override(cpu_isa=isa):
        kern = ac.compile(spec, target="cpu", tiles=(32, 64))
        assert ("AMX tiles" in kern.cpu_kernel().products(head_dim)) == (isa == "native")
        assert "backward too" in kern.cpu_kernel().products(head_dim)
        runs = []
        before = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            for _ in range(2):
                leaves = [t.clone().requires_grad_() for t in (q, k, v)]
                out, lse = kern(*leaves, return_lse=True)
                ((out.float() * w).sum() + lse[:, :, 5:].sum()).backward()
                runs.append([t.grad for t in leaves])
        finally:
            torch.use_deterministic_algorithms(before)
    assert ran == [True, True]
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)
    keep = torch.tensor([[Skv - S + i - 40 <= j <= Skv - S + i and i >= 5 for j in range(Skv)] for i in range(S)])
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    want, want_lse = oracle.attention(*ref_in, keep.expand(2, 4, S, Skv), head_dim**-0.5)
    ((want * w.double()).sum() + want_lse[:, :, 5:].sum()).backward()
    dq = runs[0][0]
    assert torch.equal(dq[:, :, :5].float(), torch.zeros(2, 4, 5, head_dim))  # rows with no key
    for got, ref in zip(runs[0], (t.grad for t in ref_in), strict=True):
        scale = float(ref.abs().max())
        assert float((got.double() - ref).abs().max()) <= 2e-2 * scale, (float((got.double() - ref).abs().max()), scale)


@pytest.mark.parametrize("isa", _bf16_isas() or [pytest.param("avx512", marks=pytest.mark.skip("no AVX512_BF16"))])
@pytest.mark.parametrize("masked", ["causal", "band", "document"])
def test_native_bf16_backward_walks_its_own_tiles(isa: str, masked: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cost model gives the native bf16 backward 32 x 256 tiles (causal) or 32 x 128 ones (narrower masks, and
    runtime ones; ``plan.backward_tiles``) while the forward keeps its own: the backward runs a second kernel at
    those tiles, on tile lists and partial-tile records built at them (a static map's cached per shape and tiles,
    so a second call reuses both without mixing them up with the forward's; a runtime map's per call), against
    the float64 oracle on the same bf16 values."""
    from attncc.codegen.cpu import CpuKernel
    from tests.numerics import oracle

    tiles_run: list[tuple[int, int, float]] = []
    real = CpuKernel.backward_bf16

    def spy(self: CpuKernel, *args: Any, **kwargs: Any) -> Any:
        found = real(self, *args, **kwargs)
        lists = args[7]  # CSR rows per (map, q-block) and per (map, kv-block): their ratio is nq / nkv
        blocks = (len(lists.kv_ptr) - 1) / (len(lists.q_ptr) - 1)
        tiles_run.append((self.bq, self.bkv, blocks) if found is not None else (0, 0, 0))
        return found

    monkeypatch.setattr(CpuKernel, "backward_bf16", spy)
    S, D = 300, 64
    doc = torch.tensor([0] * 70 + [1] * 150 + [2] * 80)
    if masked == "causal":
        mask, extra, keep = ac.causal(), {}, [[j <= i for j in range(S)] for i in range(S)]
    elif masked == "band":
        mask, extra, keep = (
            ac.causal() & (ac.kv >= ac.q - 100),
            {},
            [[0 <= i - j <= 100 for j in range(S)] for i in range(S)],
        )
    else:
        mask, extra = ac.causal() & ac.document(ac.tensor("doc")), {"doc": doc}
        keep = [[j <= i and bool(doc[i] == doc[j]) for j in range(S)] for i in range(S)]
    spec = ac.AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=D, mask=mask)
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 4, S, D, generator=g).bfloat16()
    k, v = (torch.randn(1, 2, S, D, generator=g).bfloat16() for _ in range(2))
    w = torch.randn(1, 4, S, D, generator=g)
    with config.override(cpu_isa=isa):
        kern = ac.compile(spec, target="cpu")
        bwd_bkv = kern.plan.backward_tiles[1]
        assert kern.plan.backward_tiles == ((32, 256) if masked == "causal" else (32, 128)) != kern.plan.tiles
        assert f"backward too at 32 x {bwd_bkv} tiles" in kern.cpu_kernel().products(D)
        grads = []
        for _ in range(2):
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            (kern(*leaves, **extra).float() * w).sum().backward()
            grads.append([t.grad for t in leaves])
    assert tiles_run == [(32, bwd_bkv, 10 / -(-S // bwd_bkv))] * 2  # 300 rows: 10 q-blocks of 32, 3 or 2 kv-blocks
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    want, _ = oracle.attention(*ref_in, torch.tensor(keep).expand(1, 4, S, S), D**-0.5)
    (want * w.double()).sum().backward()
    for run in grads:
        for got, ref in zip(run, (t.grad for t in ref_in), strict=True):
            scale = float(ref.abs().max())
            assert float((got.double() - ref).abs().max()) <= 2e-2 * scale, (
                float((got.double() - ref).abs().max()),
                scale,
            )


@pytest.mark.parametrize("isa", _bf16_isas() or [pytest.param("avx512", marks=pytest.mark.skip("no AVX512_BF16"))])
def test_native_bf16_backward_flushes_long_runs_of_rows(isa: str) -> None:
    """The bf16 backward gathers P and dS over up to 512 query rows (256 on AMX tiles) before each dV^T, dK^T product
    and then starts again: at 700 rows a causal kv block's rows are flushed when full and at the end, each flush over
    only the rows that reach each 32-key column block; against the float64 oracle."""
    from tests.numerics import oracle

    S, D = 700, 32
    spec = ac.AttentionSpec(num_heads=2, head_dim=D, mask=ac.causal())
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, S, D, generator=g).bfloat16() for _ in range(3))
    w = torch.randn(1, 2, S, D, generator=g)
    with config.override(cpu_isa=isa):
        kern = ac.compile(spec, target="cpu")
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        (kern(*leaves).float() * w).sum().backward()
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    keep = torch.ones(S, S, dtype=torch.bool).tril()
    want, _ = oracle.attention(*ref_in, keep.expand(1, 2, S, S), D**-0.5)
    (want * w.double()).sum().backward()
    for got, ref in zip(leaves, ref_in, strict=True):
        assert got.grad is not None and ref.grad is not None
        scale = float(ref.grad.abs().max())
        assert float((got.grad.double() - ref.grad).abs().max()) <= 2e-2 * scale


@pytest.mark.parametrize("masked", ["causal", "band"])
def test_fp32_backward_walks_256_key_backward_tiles(masked: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fp32 backward walks the plan's backward tiles where they are 256 keys wide (causal: 32 x 256; its dQ rows
    then load and store once per 256 keys), and the forward's tiles where the cost model gave the backward 128-key
    ones (a band), which were slower in fp32 (``cpu.FP32_BACKWARD_BKV``); against the float64 oracle, with a ragged
    last block and GQA."""
    from attncc.codegen.cpu import CpuKernel
    from tests.numerics import oracle

    walked: list[tuple[int, int]] = []
    real = CpuKernel.backward

    def spy(self: CpuKernel, *args: Any, **kwargs: Any) -> Any:
        walked.append((self.bq, self.bkv))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(CpuKernel, "backward", spy)
    S, D = 300, 64
    if masked == "causal":
        mask, keep = ac.causal(), [[j <= i for j in range(S)] for i in range(S)]
    else:
        mask, keep = ac.causal() & (ac.kv >= ac.q - 100), [[0 <= i - j <= 100 for j in range(S)] for i in range(S)]
    spec = ac.AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=D, mask=mask)
    kern = ac.compile(spec, target="cpu")
    want_tiles = (32, 256) if masked == "causal" else kern.plan.tiles
    assert kern.plan.backward_tiles == ((32, 256) if masked == "causal" else (32, 128)) != kern.plan.tiles
    g = torch.Generator().manual_seed(11)
    q = torch.randn(1, 4, S, D, generator=g)
    k, v = (torch.randn(1, 2, S, D, generator=g) for _ in range(2))
    w = torch.randn(1, 4, S, D, generator=g)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    (kern(*leaves) * w).sum().backward()
    assert walked == [want_tiles]
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    want, _ = oracle.attention(*ref_in, torch.tensor(keep).expand(1, 4, S, S), D**-0.5)
    (want * w.double()).sum().backward()
    for got, ref in zip(leaves, ref_in, strict=True):
        assert got.grad is not None and ref.grad is not None
        torch.testing.assert_close(got.grad.double(), ref.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("isa", _bf16_isas() or [pytest.param("avx512", marks=pytest.mark.skip("no AVX512_BF16"))])
@pytest.mark.parametrize("windows", [(300, 300, 300, 300), (8, 8, 8, 300)], ids=["equal_heads", "unequal_heads"])
def test_native_bf16_backward_shares_dq_between_threads_that_own_whole_heads(
    isa: str, windows: tuple[int, ...]
) -> None:
    """With two threads and kv heads of equal work, the bf16 backward gives each thread whole heads, largest first
    (each dQ row then has one writer: one shared fp32 dQ, no per-thread partials to sum); with heads of unequal
    work (per-head windows 8 and 300) it deals kv blocks out instead. Both against the float64 oracle; two runs
    agree bit for bit: the owners' by construction, the dealt-out ones under ``use_deterministic_algorithms``."""
    from tests.numerics import oracle

    S, D = 260, 64
    spec = ac.AttentionSpec(num_heads=4, head_dim=D, mask=ac.sliding_window(ac.per_head(list(windows), "w")))
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 4, S, D, generator=g).bfloat16() for _ in range(3))
    w = torch.randn(1, 4, S, D, generator=g)
    threads, before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(len(set(windows)) > 1)
    try:
        with config.override(cpu_isa=isa):
            kern = ac.compile(spec, target="cpu")
            runs = []
            for _ in range(2):
                leaves = [t.clone().requires_grad_() for t in (q, k, v)]
                (kern(*leaves).float() * w).sum().backward()
                runs.append([t.grad for t in leaves])
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(before)
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)
    keep = torch.tensor([[[0 <= i - j <= windows[h] for j in range(S)] for i in range(S)] for h in range(4)])
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    want, _ = oracle.attention(*ref_in, keep.unsqueeze(0), D**-0.5)
    (want * w.double()).sum().backward()
    for got, ref in zip(runs[0], (t.grad for t in ref_in), strict=True):
        scale = float(ref.abs().max())
        assert float((got.double() - ref).abs().max()) <= 2e-2 * scale, (float((got.double() - ref).abs().max()), scale)


@pytest.mark.parametrize("isa", _bf16_isas() or [pytest.param("avx512", marks=pytest.mark.skip("no AVX512_BF16"))])
def test_bf16_backward_at_tiles_it_cannot_take_says_so(isa: str, caplog: pytest.LogCaptureFixture) -> None:
    """Given 16-row q tiles (which the native bf16 forward takes on AMX, but not the bf16 backward, whose products
    walk 32-row pair blocks), the backward runs fp32 on upcast copies, logged once with the reason and said by
    ``products()``; its gradients still match the float64 oracle."""
    from tests.numerics import oracle

    S, D = 96, 64
    spec = ac.AttentionSpec(num_heads=2, head_dim=D, mask=ac.causal())
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, S, D, generator=g).bfloat16() for _ in range(3))
    with config.override(cpu_isa=isa), caplog.at_level(logging.INFO, logger="attncc.codegen.cpu"):
        kern = ac.compile(spec, target="cpu", tiles=(16, 64))
        assert "backward fp32 (q tile 16 is not a multiple of 32)" in kern.cpu_kernel().products(D)
        grads = []
        for _ in range(2):
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            kern(*leaves).float().sum().backward()
            grads.append([t.grad for t in leaves])
    said = [r.getMessage() for r in caplog.records if "bf16 backward runs fp32" in r.getMessage()]
    assert len(said) == 1 and "q tile 16 is not a multiple of 32" in said[0]
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    keep = torch.tensor([[j <= i for j in range(S)] for i in range(S)])
    want, _ = oracle.attention(*ref_in, keep.expand(1, 2, S, S), D**-0.5)
    want.sum().backward()
    for got, ref in zip(grads[1], (t.grad for t in ref_in), strict=True):
        scale = float(ref.abs().max())
        assert float((got.double() - ref).abs().max()) <= 2e-2 * scale, (float((got.double() - ref).abs().max()), scale)


def test_half_inputs_that_upcast_say_why(caplog: pytest.LogCaptureFixture) -> None:
    """fp16 and bf16 on a build without vector units (the portable one: no F16C, AVX512_BF16 or AMX either) run fp32
    on transient upcast copies, logged once with the reason; for the backward the autograd node keeps the fp16 inputs,
    not fp32 copies."""
    with config.override(cpu_isa="portable"):
        kern = ac.compile(ac.AttentionSpec(num_heads=2, head_dim=64, mask=ac.causal()), target="cpu")
        assert not kern.cpu_kernel().has_f16c
        x = torch.randn(1, 2, 40, 64).half().requires_grad_()
        with caplog.at_level(logging.INFO, logger="attncc.codegen.cpu"):
            kern(x, x, x)
            out = kern(x, x, x)
    said = [r.getMessage() for r in caplog.records if "upcast copies" in r.getMessage()]
    assert len(said) == 1 and "this build has no FMA vector unit" in said[0], said
    node = out.grad_fn
    while type(node).__name__ != "CpuAttentionBackward":
        node = node.next_functions[0][0]
    assert [t.dtype for t in node.saved_tensors[:3]] == [torch.float16] * 3
    out.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float16 and bool(x.grad.isfinite().all())


def narrow_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[bool]]:
    """Spies on ``CpuKernel.forward`` and ``CpuKernel.backward``: per call, whether it got fp16 or bf16 q."""
    calls: dict[str, list[bool]] = {"forward": [], "backward": []}
    for name in calls:
        real = getattr(cpu.CpuKernel, name)

        def spy(self: cpu.CpuKernel, *args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            calls[_name].append(args[0].dtype in (torch.float16, torch.bfloat16))
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(cpu.CpuKernel, name, spy)
    return calls


# the builds whose fp32 kernels read fp16 (F16C, no AMX) or bf16 (no AVX512_BF16) as it is
_NARROW = [
    *((isa, torch.float16) for isa in _isas() if isa in ("avx2", "avx512") and "f16c" in toolchain.cpu_flags()),
    *((isa, torch.bfloat16) for isa in _isas() if isa == "avx2" or (isa == "avx512" and isa not in _bf16_isas())),
]


@pytest.mark.parametrize(("isa", "dtype"), _NARROW or [pytest.param("avx2", None, marks=pytest.mark.skip("no AVX2"))])
@pytest.mark.parametrize("case", ["band", "document", "decode"])
def test_fp16_and_bf16_read_and_written_as_they_are_by_the_fp32_kernels(
    isa: str, dtype: torch.dtype, case: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 17: fp16 without AMX (F16C) and bf16 without AVX512_BF16 go to the fp32 kernels as they are (q rows, K's
    panels and V widened as they are read; the gradients rounded once to the inputs' dtype): no upcast copies, none
    kept for the backward.
    The forward is the fp32 kernel's arithmetic on the same values (bit for bit where the kv ranges split alike),
    within half an fp16 ulp plus fp32's error of the float64 oracle; the gradients as accurate as the fp32
    backward's rounded to fp16. GQA, a ragged last block, rows that see no key, a runtime document mask, and
    one-token decoding on a cache read in place (its kv range split across jobs). o is kept in fp32 for the
    backward's delta, as the upcast path keeps it (delta from o rounded to fp16 made the gradients' mean error
    1.5-2.3x the fp32 backward's)."""
    from tests.numerics import oracle

    calls = narrow_calls(monkeypatch)
    S, Skv, D = {"band": (150, 170, 64), "document": (170, 170, 32), "decode": (1, 700, 64)}[case]
    B, H, Hkv = (1, 4, 1) if case == "decode" else (2, 4, 2)
    doc = torch.tensor([0] * 40 + [1] * 90 + [2] * 40)
    if case == "document":
        mask, extra = ac.document(ac.tensor("doc")), {"doc": doc}
        mask = mask & ac.causal()
        keep = torch.tensor([[bool(doc[i] == doc[j]) and j <= i for j in range(Skv)] for i in range(S)])
    elif case == "band":
        mask, extra = ac.causal(align="bottom_right") & (ac.kv >= ac.q + (Skv - S) - 50) & (ac.q >= 5), {}
        keep = torch.tensor([[Skv - S + i - 50 <= j <= Skv - S + i and i >= 5 for j in range(Skv)] for i in range(S)])
    else:
        mask, extra = ac.causal(align="bottom_right"), {}
        keep = torch.ones(S, Skv, dtype=torch.bool)
    spec = ac.AttentionSpec(num_heads=H, num_kv_heads=Hkv, head_dim=D, mask=mask)
    g = torch.Generator().manual_seed(len(case))
    q = (torch.randn(B, H, S, D, generator=g) * 2).to(dtype)
    k, v = ((torch.randn(B, Hkv, Skv, D, generator=g) * 2).to(dtype) for _ in range(2))
    w = torch.randn(B, H, S, D, generator=g).to(dtype).float()  # (so that dO is the same in fp16 and fp32)
    with config.override(cpu_isa=isa):
        kern = ac.compile(spec, target="cpu")
        said = "fp16 inputs: read and written as fp16 (F16C)" if dtype == torch.float16 else "bf16 inputs: read and"
        assert said in kern.cpu_kernel().products(D)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        with caplog.at_level(logging.INFO, logger="attncc.codegen.cpu"):
            out, lse = kern(*leaves, return_lse=True, **extra)
        node = out.grad_fn
        while type(node).__name__ != "CpuAttentionBackward":
            node = node.next_functions[0][0]
        assert [t.dtype for t in node.saved_tensors[:3]] == [dtype] * 3  # q, k, v: no fp32 copies
        ((out.float() * w).sum() + lse.sum()).backward()
        fp32 = [t.float().requires_grad_() for t in (q, k, v)]
        via32, lse32 = kern(*fp32, return_lse=True, **extra)
        ((via32 * w).sum() + lse32.sum()).backward()
    assert not [r for r in caplog.records if "upcast copies" in r.getMessage()]
    assert calls == {"forward": [True, False], "backward": [True, False]}, calls
    assert out.dtype == dtype and all(t.grad.dtype == dtype for t in leaves)
    if case != "decode":  # (decoding splits a half-precision cache's keys by their bytes: other splits than fp32's)
        assert torch.equal(out, via32.to(dtype)) and torch.equal(lse, lse32)
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    want, want_lse = oracle.attention(*ref_in, keep.expand(B, H, S, Skv), D**-0.5)
    ((want * w.double()).sum() + want_lse.sum()).backward()
    want_d = want.detach()
    err, err32 = (out.detach().double() - want_d).abs(), (via32.detach().to(dtype).double() - want_d).abs()
    top = torch.maximum(want_d.abs(), out.detach().double().abs()).clamp_min(2**-14)
    bits = 10 if dtype == torch.float16 else 7
    ulp = 2.0 ** (torch.floor(torch.log2(top)) - bits)  # the dtype's spacing there (the larger binade at a boundary)
    assert bool((err <= ulp / 2 + 1e-5 * float(v.abs().max())).all()), float((err - ulp / 2).max())
    assert float(err.mean()) <= 1.05 * float(err32.mean()) + 1e-7, (float(err.mean()), float(err32.mean()))
    torch.testing.assert_close(lse.double(), want_lse.detach(), atol=1e-5, rtol=1e-5)
    for got, wide, ref in zip(leaves, fp32, ref_in, strict=True):
        e, e32 = (got.grad.double() - ref.grad).abs(), (wide.grad.to(dtype).double() - ref.grad).abs()
        assert float(e.mean()) <= 1.05 * float(e32.mean()) + 1e-7, (float(e.mean()), float(e32.mean()))
        assert float(e.max()) <= 1.5 * float(e32.max()) + 1e-6, (float(e.max()), float(e32.max()))


_AMX = "native" in _isas()


@pytest.mark.skipif(not _AMX, reason="no AMX tiles on this machine")
@pytest.mark.parametrize("masked", ["causal", "document", "decode"])
@pytest.mark.parametrize("head_dim", [32, 128])
def test_native_fp16_forward_on_amx_splits_is_as_accurate_as_fp32(
    masked: str, head_dim: int, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """fp16 q, k, v run on AMX tiles as exact bf16 splits (hi + lo: Q K^T exact, P V to 2^-17 of its terms) without
    upcast copies: against the float64 oracle each output is within half an fp16 ulp plus 2^-16 max|v|, and the mean
    error is the fp32 path's; GQA, a ragged last q block, a runtime document mask, and decoding (one query row, the
    kv range split across threads); gradients through the native fp16 backward."""
    from attncc.plan import TileLists
    from tests.numerics import oracle

    taken = native_runs(monkeypatch, "forward_fp16")
    S, Skv, D = (1, 700, head_dim) if masked == "decode" else (300, 300, head_dim)
    B, H, Hkv = (1, 1, 1) if masked == "decode" else (2, 4, 2)  # (decoding: one task, so its kv range splits)
    doc = torch.tensor([0] * 70 + [1] * 150 + [2] * 80)
    if masked == "document":
        mask, extra = ac.document(ac.tensor("doc")), {"doc": doc}
        keep = torch.tensor([[bool(doc[i] == doc[j]) for j in range(S)] for i in range(S)])
    else:
        mask, extra = ac.causal(align="bottom_right"), {}
        keep = torch.tensor([[j <= Skv - S + i for j in range(Skv)] for i in range(S)])
    spec = ac.AttentionSpec(num_heads=H, num_kv_heads=Hkv, head_dim=D, mask=mask)
    g = torch.Generator().manual_seed(head_dim)
    q = (torch.randn(B, H, S, D, generator=g) * 2).half()
    k, v = ((torch.randn(B, Hkv, Skv, D, generator=g) * 2).half() for _ in range(2))
    w = torch.randn(B, H, S, D, generator=g)
    kern = ac.compile(spec, target="cpu")
    if masked == "decode" and torch.get_num_threads() > 1:
        lists = TileLists.of(kern.block_map(S, Skv))
        assert kern.cpu_kernel().kv_splits(q, k, lists, torch.get_num_threads()) > 1
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with caplog.at_level(logging.INFO, logger="attncc.codegen.cpu"):
        out, lse = kern(*leaves, return_lse=True, **extra)
    assert out.dtype == torch.float16 and taken == [True]
    assert not [r for r in caplog.records if "upcast copies" in r.getMessage()]
    assert "fp16 inputs: AMX tiles on exact bf16 splits" in kern.cpu_kernel().products(D)
    via_fp32, lse32 = kern(q.float(), k.float(), v.float(), return_lse=True, **extra)
    via_fp32 = via_fp32.half()
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    want, want_lse = oracle.attention(*ref_in, keep.expand(B, H, S, Skv), D**-0.5)
    # the scores are exact products summed in fp32, as the fp32 path's (leaving out q_lo k_lo: 10x its error here)
    lse_err, lse_err32 = (float((x.detach().double() - want_lse.detach()).abs().max()) for x in (lse, lse32))
    assert lse_err <= max(2 * lse_err32, 1e-5), (lse_err, lse_err32)
    want_d = want.detach()
    err, err32 = (out.detach().double() - want_d).abs(), (via_fp32.double() - want_d).abs()
    top = torch.maximum(want_d.abs(), out.detach().double().abs()).clamp_min(2**-14)
    ulp = 2.0 ** (torch.floor(torch.log2(top)) - 10)  # fp16's spacing there (the larger binade at a boundary)
    # the rounding to fp16, plus the split P V's 2^-17 of its terms (twice over; bf16 products would be 2^-9)
    bound = ulp / 2 + 2**-16 * float(v.abs().max())
    assert bool((err <= bound).all()), float((err - bound).max())
    assert float(err.mean()) <= 1.05 * float(err32.mean()) + 1e-7, (float(err.mean()), float(err32.mean()))
    (out.float() * w).sum().backward()
    (want * w.double()).sum().backward()
    for got, ref in zip(leaves, ref_in, strict=True):
        scale = float(ref.grad.abs().max())
        assert float((got.grad.double() - ref.grad).abs().max()) <= 2e-3 * scale


@pytest.mark.skipif(not _AMX, reason="no AMX tiles on this machine")
@pytest.mark.parametrize(("head_dim", "softcap"), [(32, None), (128, None), (64, 8.0)])
def test_native_fp16_backward_is_as_accurate_as_fp32(
    head_dim: int, softcap: float | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fp16 backward's five products run on AMX tiles on the same exact bf16 splits as the fp16 forward (S and dP
    exact, P and dS split to 2^-17, dV, dK, dQ three products each): ``backward_bf16`` runs natively (spied), with no
    fp32 copies of q, k, v, and against the float64 oracle its fp16 gradients are as accurate as the fp32 backward's
    rounded to fp16 (the same upstream gradient, fp16 either way). GQA, ragged blocks, rows that see no key, a partial
    band and the lse's own gradient, a score mod (softcap: the rows go through the spec's backward hook);
    bit-reproducible under ``use_deterministic_algorithms``."""
    from tests.numerics import oracle

    ran = native_runs(monkeypatch, "backward_bf16")
    S, Skv = 77, 93
    band = ac.causal(align="bottom_right") & (ac.kv >= ac.q + (Skv - S) - 40) & (ac.q >= 5)
    mod = None if softcap is None else ac.softcap(softcap)
    spec = ac.AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=head_dim, mask=band, score_mod=mod)
    g = torch.Generator().manual_seed(head_dim + 2)
    q = (torch.randn(2, 4, S, head_dim, generator=g) * 2).half()
    k, v = ((torch.randn(2, 2, Skv, head_dim, generator=g) * 2).half() for _ in range(2))
    w = torch.randn(2, 4, S, head_dim, generator=g).half().float()  # (so that dO is the same in fp16 and fp32)
    kern = ac.compile(spec, target="cpu", tiles=(32, 64))
    assert "fp16 inputs: AMX tiles on exact bf16 splits (Q K^T exact, P V to 2^-17), backward too" in (
        kern.cpu_kernel().products(head_dim)
    )
    grads: dict[torch.dtype, list[list[torch.Tensor]]] = {}
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for dtype, runs in ((torch.float16, 2), (torch.float32, 1)):
            for _ in range(runs):
                leaves = [t.to(dtype).clone().requires_grad_() for t in (q, k, v)]
                out, lse = kern(*leaves, return_lse=True)
                ((out.float() * w).sum() + lse[:, :, 5:].sum()).backward()
                grads.setdefault(dtype, []).append([t.grad for t in leaves])
    finally:
        torch.use_deterministic_algorithms(before)
    assert ran == [True, True]
    for a, b in zip(*grads[torch.float16], strict=True):
        assert a.dtype == torch.float16 and torch.equal(a, b)
    keep = torch.tensor([[Skv - S + i - 40 <= j <= Skv - S + i and i >= 5 for j in range(Skv)] for i in range(S)])
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    capped = None if softcap is None else (lambda x: softcap * torch.tanh(x / softcap))
    want, want_lse = oracle.attention(*ref_in, keep.expand(2, 4, S, Skv), head_dim**-0.5, capped)
    ((want * w.double()).sum() + want_lse[:, :, 5:].sum()).backward()
    assert torch.equal(grads[torch.float16][0][0][:, :, :5].float(), torch.zeros(2, 4, 5, head_dim))
    for got, via32, ref in zip(grads[torch.float16][0], grads[torch.float32][0], (t.grad for t in ref_in), strict=True):
        err, err32 = (got.double() - ref).abs(), (via32.half().double() - ref).abs()
        assert float(err.mean()) <= 1.02 * float(err32.mean()), (float(err.mean()), float(err32.mean()))
        assert float(err.max()) <= 1.1 * float(err32.max()), (float(err.max()), float(err32.max()))


@pytest.mark.skipif(not _AMX, reason="no AMX tiles on this machine")
def test_native_fp16_forward_keeps_the_bits_bf16_cannot_hold() -> None:
    """The low parts matter: v = 1 + 2^-10 and scores that differ only through k's low bits. bf16 rounds both
    away (v to 1, the two keys' scores to equal); the split products keep them, as fp32 does."""
    D = 32
    spec = ac.AttentionSpec(num_heads=1, head_dim=D)
    q = torch.full((1, 1, 16, D), 8.0).half()
    k = torch.stack([torch.full((D,), 1 + 2**-10), torch.ones(D)]).half().view(1, 1, 2, D)
    v = torch.stack([torch.full((D,), 1 + 2**-10), -torch.ones(D)]).half().view(1, 1, 2, D)
    out = ac.compile(spec, target="cpu")(q, k, v)
    gap = 8.0 * D * 2**-10 * D**-0.5  # the scores' difference, all from k's low bits
    p = 1 / (1 + math.exp(-gap))
    want = p * (1 + 2**-10) - (1 - p)
    got = out.double()
    assert torch.allclose(got, torch.full_like(got, want), rtol=0, atol=2**-16), (got[0, 0, 0, 0], want)
    assert abs(want) > 0.02  # (bf16 inputs would give 0 here)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("sq", [1, 3])
def test_split_kv_decoding_merges_exactly(sq: int, dtype: torch.dtype) -> None:
    """Issue 17 item 3: with fewer q-block tasks than threads (one head, a few new tokens) the forward splits each
    task's kv tiles into ranges, one job per thread, and merges their (o, lse); a row that sees no key stays zeros
    with lse -inf, and a split whose range holds no visible key leaves the others' answer unchanged. Checked against
    the float64 oracle, with gradients (the backward reads the merged o and lse)."""
    from attncc.plan import TileLists
    from tests.numerics import oracle

    skv = 1000
    mask = ac.causal(align="bottom_right") & (ac.kv >= 600) & (ac.q != 1)
    spec = ac.AttentionSpec(num_heads=1, head_dim=64, mask=mask)
    kern = ac.compile(spec, target="cpu", tiles=(16, 64))
    g = torch.Generator().manual_seed(sq)
    q = torch.randn(1, 1, sq, 64, generator=g).to(dtype).requires_grad_()
    k, v = (torch.randn(1, 1, skv, 64, generator=g).to(dtype).requires_grad_() for _ in range(2))
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        assert kern.cpu_kernel().kv_splits(q, k, TileLists.of(kern.block_map(sq, skv)), 4) == 4
        out, lse = kern(q, k, v, return_lse=True)
        (out.square().sum() + lse[lse.isfinite()].sum()).backward()
    finally:
        torch.set_num_threads(threads)
    keep = torch.tensor([[j <= i + skv - sq and j >= 600 and i != 1 for j in range(skv)] for i in range(sq)])
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want, want_lse = oracle.attention(*leaves, keep.expand(1, 1, sq, skv), 64**-0.5)
    (want.square().sum() + want_lse[want_lse.isfinite()].sum()).backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: P rounded for P V, the output rounded
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol / 10)
    assert torch.equal(lse.isinf(), want_lse.isinf()) and bool((out[:, :, 1:2] == 0).all())  # row 1: no key
    torch.testing.assert_close(lse[lse.isfinite()].double(), want_lse[want_lse.isfinite()], rtol=tol, atol=tol)
    for t, w in zip((q, k, v), leaves, strict=True):
        torch.testing.assert_close(t.grad.double(), w.grad, rtol=10 * tol, atol=tol)


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("D", [16, 40, 48, 96])
def test_fp32_few_rows_read_keys_in_place(D: int, isa: str) -> None:
    """fp32 tasks of at most 8 query rows (decoding, and a prefill's ragged last block) take their scores and P V
    in place on K and V rows (scores_rows, values_rows: no packing, no sgemm call per tile), at head dims whose
    rows end in a part vector (D = 40 on AVX2, 16 and 48 on AVX-512) or a part of the 4-vector column block, with a
    score mod and partial tiles; a one-row task whose keys are all masked stays zeros with lse -inf. Against the
    float64 oracle, gradients included, on every build this machine runs (portable: sgemm throughout)."""
    from tests.numerics import oracle

    H, Hkv, skv = 4, 2, 300
    mask = (ac.kv >= ac.q + 95) & (ac.kv <= ac.q + 295) & (ac.q != 2)  # a window near the end of the keys
    spec = ac.AttentionSpec(num_heads=H, num_kv_heads=Hkv, head_dim=D, mask=mask, score_mod=ac.softcap(5.0))
    g = torch.Generator().manual_seed(D)
    for sq in (1, 5):
        q = torch.randn(1, H, sq, D, generator=g).requires_grad_()
        k, v = (torch.randn(1, Hkv, skv, D, generator=g).requires_grad_() for _ in range(2))
        with config.override(cpu_isa=isa):
            out, lse = ac.compile(spec, target="cpu")(q, k, v, return_lse=True)
            out.square().sum().backward()
        keep = torch.tensor([[i + 95 <= j <= i + 295 and i != 2 for j in range(skv)] for i in range(sq)])
        leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
        want, want_lse = oracle.attention(*leaves, keep.expand(1, H, sq, skv), D**-0.5, oracle.softcap_fn(5.0))
        want.square().sum().backward()
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lse.double(), want_lse, rtol=1e-5, atol=1e-5)
        if sq > 2:
            assert bool((out[:, :, 2] == 0).all()) and bool(lse[:, :, 2].isneginf().all())
        for t, w in zip((q, k, v), leaves, strict=True):
            torch.testing.assert_close(t.grad.double(), w.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("isa", [isa for isa in _isas() if isa != "portable"])  # (portable: sgemm, ungrouped)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_gqa_decoding_reads_each_key_once_per_group(dtype: torch.dtype, isa: str) -> None:
    """Few rows per key (decoding): each kv head's query heads run as one job whose rows are all of theirs (G x Sq,
    contiguous in q and o; up to 16 rows, fp16 32), so every key is read once for the group; the vector loops take
    VW keys at a time (scores summed across lanes by a tree of shuffles) and the values VR rows at a time (a block
    of 4 and a remainder at 6 rows). Larger groups (64 rows here) are one register-blocked task on packed K in the
    fp32 forward (fp32, fp16 widened), each partial tile's kept ranges laid out per group row. Checked with a
    per-head score mod (ALiBi: each head's rows get their own slope), partial tiles (a window's edge), a key count
    off the vector width, uneven groups with a kv head nobody reads, and a head table whose groups are not
    consecutive (which keeps a job per head). fp32, fp16 (F16C) and bf16 (AVX512_BF16 where the build has it,
    else widened) against the float64 oracle."""
    from attncc.plan import TileLists, head_index
    from tests.numerics import oracle

    skv, D = 300, 64
    mask = ac.causal(align="bottom_right") & (ac.kv >= ac.q + 137)
    fp16 = dtype == torch.float16  # (groups of up to 32 rows; 16 for the others)
    # (H, Hkv, Sq, head table, a group is one job on K and V in place, or (larger) one task on packed K)
    cases = [(8, 2, 1, None, True, True), (6, 2, 2, None, True, True), (4, 1, 2, None, True, True),
             (4, 3, 1, [0, 0, 0, 2], True, True), (4, 2, 1, [1, 0, 1, 0], False, False), (8, 2, 4, None, True, True),
             (8, 1, 4, None, fp16, True), (16, 2, 8, None, False, True)]  # fmt: skip
    g = torch.Generator().manual_seed(11)
    for H, Hkv, sq, table, grouped, packed in cases:
        extra = {"kv_head_of": ac.tensor("kv_head_of")} if table else {}
        spec = ac.AttentionSpec(num_heads=H, num_kv_heads=Hkv, head_dim=D, mask=mask, score_mod=ac.alibi(), **extra)
        heads = torch.tensor(table) if table else torch.arange(H) // (H // Hkv)
        q = torch.randn(1, H, sq, D, generator=g).to(dtype)
        k, v = (torch.randn(1, Hkv, skv, D, generator=g).to(dtype) for _ in range(2))
        with config.override(cpu_isa=isa):
            kern = ac.compile(spec, target="cpu")
            lists = TileLists.of(kern.block_map(sq, skv))
            index = head_index(H, Hkv, heads if table else None)
            assert kern.cpu_kernel().grouped_jobs(q, k, index, lists, False) == grouped, (H, Hkv, sq, table)
            assert kern.cpu_kernel().grouped_jobs(q, k, index, lists, False, packed=True) == packed
            out, lse = kern(q, k, v, return_lse=True, **({"kv_head_of": heads} if table else {}))
        keep = torch.tensor([[i + 137 <= j <= i + skv - sq for j in range(skv)] for i in range(sq)])
        want, want_lse = oracle.attention(q, k[:, heads], v[:, heads], keep.expand(1, H, sq, skv), D**-0.5,
                                          oracle.alibi_fn(H))  # fmt: skip
        tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
        # (fp32: ALiBi's scores span a wide range; the packed per-head path's error here is the same 3e-6)
        torch.testing.assert_close(out.double(), want, rtol=tol, atol=max(tol / 10, 1e-5))
        torch.testing.assert_close(lse.double(), want_lse, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("table", [None, [2, 0, 0, 2, 0, 0]], ids=["gqa", "uneven"])
def test_gqa_decoding_splits_the_keys_per_group(dtype: torch.dtype, table: list[int] | None) -> None:
    """GQA decoding whose groups cannot be one job each (here: a runtime head table whose groups are not consecutive
    heads, uneven, with a kv head nobody reads) splits each kv head's keys into ranges that one thread reads once for
    all the query heads of the group (jobs in kv head, split, query head order). Consecutive groups run as one job
    per group instead (``grouped_jobs``). Output and lse against the float64 oracle on k and v gathered per query
    head."""
    from attncc.plan import TileLists, head_index
    from tests.numerics import oracle

    heads = torch.tensor(table) if table else torch.arange(6) // 2
    extra = {"kv_head_of": ac.tensor("kv_head_of")} if table else {}
    spec = ac.AttentionSpec(num_heads=6, num_kv_heads=3, head_dim=64, mask=ac.causal(align="bottom_right"), **extra)
    kern = ac.compile(spec, target="cpu")
    g = torch.Generator().manual_seed(7)
    sq, skv = 2, 3000
    q = torch.randn(1, 6, sq, 64, generator=g).to(dtype)
    k, v = (torch.randn(1, 3, skv, 64, generator=g).to(dtype) for _ in range(2))
    cpu, lists = kern.cpu_kernel(), TileLists.of(kern.block_map(sq, skv))
    grouped = cpu.grouped_jobs(q, k, head_index(6, 3, heads if table else None), lists, False)
    assert grouped == (table is None)
    splits = cpu.kv_splits(q, k, lists, torch.get_num_threads(), grouped)
    assert grouped or splits > 1  # K and V of one kv head exceed a split's bytes
    out, lse = kern(q, k, v, return_lse=True, **({"kv_head_of": heads} if table else {}))
    keep = torch.ones(sq, skv, dtype=torch.bool).tril(skv - sq).expand(1, 6, sq, skv)
    want, want_lse = oracle.attention(q, k[:, heads], v[:, heads], keep, 64**-0.5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol / 10)
    torch.testing.assert_close(lse.double(), want_lse, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_calls_that_need_no_gradient_skip_autograd_and_reuse_their_arguments(dtype: torch.dtype) -> None:
    """A call whose inputs need no gradient (no_grad, inference, decoding) runs the forward without an autograd
    node; any one input that requires grad, a learned table among them, still gets its gradient. Per-call arguments
    are kept between calls (tile-list addresses per lists, the runtime-tensor arguments of a kernel that reads
    none, the head index): calls that alternate lengths and document layouts (new lists each) must each be right.
    Against the float64 oracle."""
    from tests.numerics import oracle

    H, Hkv, D = 4, 2, 32
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    plain = ac.compile(ac.AttentionSpec(num_heads=H, num_kv_heads=Hkv, head_dim=D, mask=ac.causal()), target="cpu")
    docs = ac.compile(ac.AttentionSpec(num_heads=H, num_kv_heads=Hkv, head_dim=D, mask=ac.document(ac.tensor("doc")),
                                       score_mod=ac.relative_bias(ac.tensor("table"), 4)), target="cpu")  # fmt: skip
    table = torch.randn(H, 9)
    g = torch.Generator().manual_seed(5)
    for n, cut in ((70, 20), (130, 90), (70, 50)):
        q = torch.randn(1, H, n, D, generator=g).to(dtype)
        k, v = (torch.randn(1, Hkv, n, D, generator=g).to(dtype) for _ in range(2))
        doc = (torch.arange(n) >= cut).long()
        causal = torch.ones(n, n, dtype=torch.bool).tril().expand(1, H, n, n)
        same = (doc[:, None] == doc[None, :]).expand(1, H, n, n)
        rel = (torch.arange(n)[None, :] - torch.arange(n)[:, None]).clamp(-4, 4) + 4
        bias = table.double()[:, rel][None]
        want, _ = oracle.attention(q, k, v, causal, D**-0.5)
        want_doc, _ = oracle.attention(q, k, v, same, D**-0.5, lambda s, b=bias: s + b)  # type: ignore[misc]
        with torch.no_grad():
            out = plain(*(t.clone().requires_grad_() for t in (q, k, v)))
            out_doc = docs(q, k, v, doc=doc, table=table)
        assert out.grad_fn is None and out_doc.grad_fn is None
        torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol / 10)
        torch.testing.assert_close(out_doc.double(), want_doc, rtol=tol, atol=tol / 10)
        for wants in range(4):  # q, k, v, or only the learned table requires grad
            leaves = [t.clone().requires_grad_(i == wants) for i, t in enumerate((q, k, v))]
            learned = table.clone().requires_grad_(wants == 3)
            got = docs(*leaves, doc=doc, table=learned)
            torch.testing.assert_close(got.double(), want_doc, rtol=tol, atol=tol / 10)
            grad = torch.autograd.grad(got.float().square().sum(), [*leaves, learned][wants])[0]
            ref = [t.double().requires_grad_(i == wants) for i, t in enumerate((q, k, v))]
            ref_table = table.double().requires_grad_(wants == 3)
            ref_bias = ref_table[:, rel][None]
            ref_out, _ = oracle.attention(*ref, same, D**-0.5, lambda s, b=ref_bias: s + b)  # type: ignore[misc]
            ref_grad = torch.autograd.grad(ref_out.square().sum(), [*ref, ref_table][wants])[0]
            torch.testing.assert_close(grad.double(), ref_grad, rtol=10 * tol, atol=10 * tol)


def test_kv_layouts_copied_per_call_are_logged_once(caplog: pytest.LogCaptureFixture, monkeypatch: Any) -> None:
    """Decoding reads K and V in place where each head is S contiguous rows; another layout (HF's [B, S, H, D] cache
    seen as [B, H, S, D]) is copied every call, which costs a copy of the whole cache per token: logged once per
    layout, not per call, and not at all for a view of a [B, H, S, D] cache."""
    monkeypatch.setattr(cpu, "_COPIES_TOLD", set())
    kern = ac.compile(ac.AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=32), target="cpu")
    q = torch.randn(1, 4, 1, 32)
    cache = torch.randn(1, 2, 80, 32)
    hf = torch.randn(1, 80, 2, 32).transpose(1, 2)
    with caplog.at_level(logging.INFO, logger="attncc.codegen.cpu"), torch.no_grad():
        for n in (40, 41, 60):
            kern(q, cache[:, :, :n], cache[:, :, :n])
        assert not [r for r in caplog.records if "copied to contiguous" in r.getMessage()]
        for n in (40, 41, 60):
            kern(q, hf[:, :, :n], hf[:, :, :n])
    copied = [r.getMessage() for r in caplog.records if "copied to contiguous" in r.getMessage()]
    assert len(copied) == 1 and "(1, 2, 40, 32)" in copied[0], copied


class _Marked(torch.Tensor):
    """A tensor subclass (as tracing's fake tensors are): validated on every call, never a prepared one."""


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_calls_like_an_earlier_one_skip_validation_and_stay_exact(dtype: torch.dtype) -> None:
    """A call with the shapes, dtypes and device of an earlier validated one, no runtime tensors and no gradient
    wanted (a model's layers at one decoding step, a serving loop) runs the forward the cpu executable prepared for it
    (``Executable.prepare``), without validation, tile-list lookup or dispatch. Each still decides its own layout
    (a transposed view, a view of a longer cache, contiguous inputs), threads and lse; one that needs a gradient
    gets it; a call that would fail validation has another signature and fails it. Against the float64 oracle."""
    H, Hkv, D, n = 4, 2, 32, 50
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    kern = ac.compile(ac.AttentionSpec(num_heads=H, num_kv_heads=Hkv, head_dim=D, mask=ac.causal("bottom_right")),
                      target="cpu")  # fmt: skip
    g = torch.Generator().manual_seed(11)
    made = []
    exe = kern.executable("cpu")
    real = exe.prepare
    with mock.patch.object(exe, "prepare", lambda call: made.append(call.shape) or real(call)):
        _prepared_calls(kern, dtype, tol, g, made)
    assert len(made) == 2  # the first call prepared; the gradient call, on the full path, prepared again
    q, k = torch.randn(1, H, 3, D).to(dtype), torch.randn(1, Hkv, n, D).to(dtype)
    docs = ac.compile(ac.AttentionSpec(num_heads=H, num_kv_heads=Hkv, head_dim=D, mask=ac.document(ac.tensor("d"))),
                      target="cpu")  # fmt: skip
    with torch.no_grad():
        docs(q, k, k, d=torch.zeros(n, dtype=torch.long))
    assert len(docs._prepared) == 0  # runtime tensors: validated and bound every call


def test_maps_of_runtime_tensors_are_kept_by_their_values() -> None:
    """A model's layers pass one document-id tensor: the map, lists and partial-tile records are built once for its
    values and found again by them (also for another tensor with equal values); other values, or the same tensor
    changed in place, get their own. Every call (forward, and backward at its own tiles) against the float64 oracle."""
    from tests.numerics import oracle

    H, D, n = 2, 16, 100
    kern = ac.compile(ac.AttentionSpec(num_heads=H, head_dim=D, mask=ac.document(ac.tensor("d")) & ac.causal()),
                      target="cpu", tiles=(16, 16))  # fmt: skip
    built = []
    real = kern._map
    g = torch.Generator().manual_seed(5)
    counted = lambda shape, bound, block=None: built.append(block) or real(shape, bound, block)
    with mock.patch.object(kern, "_map", counted):
        ids = torch.repeat_interleave(torch.arange(4), torch.tensor([30, 25, 40, 5]))
        for step, d in enumerate([ids, ids.clone(), ids.flip(0), ids, None]):
            if d is None:  # the first tensor, changed in place
                ids[:50] = 7
                d = ids
            q, k, v = (torch.randn(1, H, n, D, generator=g).requires_grad_() for _ in "qkv")
            visible = (d[:, None] == d[None, :]) & torch.ones(n, n, dtype=torch.bool).tril()
            want_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
            want, _ = oracle.attention(*want_in, visible.expand(1, H, n, n), D**-0.5)
            o = kern(q, k, v, d=d)
            torch.testing.assert_close(o.double(), want, rtol=1e-5, atol=1e-6, msg=f"step {step}")
            o.double().mul(want.detach()).sum().backward()
            want.mul(want.detach()).sum().backward()
            for got, ref in zip((q, k, v), want_in, strict=True):
                torch.testing.assert_close(got.grad.double(), ref.grad, rtol=1e-4, atol=1e-5, msg=f"step {step}")
            with torch.no_grad():
                torch.testing.assert_close(kern(q, k, v, d=d).double(), want, rtol=1e-5, atol=1e-6)
            if step == 0:
                per_values = len(built)  # the forward's tiles' map, and the backward's where its tiles differ
            if step in (1, 3):  # equal values (another tensor; the first again): nothing built again
                assert len(built) == per_values * (1 if step == 1 else 2)
    assert len(built) == 3 * per_values  # the first values, flipped, changed in place


def _prepared_calls(kern: ac.Kernel, dtype: torch.dtype, tol: float, g: torch.Generator, made: list[Any]) -> None:
    from tests.numerics import oracle

    H, Hkv, D, n = 4, 2, 32, 50
    threads = torch.get_num_threads()
    try:
        for step, layout in enumerate(["contiguous", "cache view", "transposed", "contiguous", "one thread"]):
            q = torch.randn(1, H, 3, D, generator=g).to(dtype)
            cache = torch.randn(1, Hkv, 2 * n, D, generator=g).to(dtype)
            k, v = cache[:, :, :n], cache.flip(2)[:, :, :n]  # views: heads 2n apart (v: negative strides, copied)
            if layout == "contiguous":
                k, v = k.contiguous(), v.contiguous()
            if layout == "transposed":  # HF's [B, S, H, D] layout seen as [B, H, S, D]
                k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (k, v))
            torch.set_num_threads(1 if layout == "one thread" else threads)
            visible = torch.ones(3, n, dtype=torch.bool).tril(n - 3).expand(1, H, 3, n)
            want, want_lse = oracle.attention(q, k, v, visible, D**-0.5)
            with torch.no_grad():
                o, lse = kern(q, k, v, return_lse=True)
            torch.testing.assert_close(o.double(), want, rtol=tol, atol=tol / 10)
            torch.testing.assert_close(lse.double(), want_lse, rtol=1e-4, atol=1e-4)
            assert len(made) == 1, (step, layout)  # the first call prepared, every later one ran prepared
    finally:
        torch.set_num_threads(threads)
    leaf = q.clone().requires_grad_()
    out = kern(leaf, k, v)  # a gradient wanted: the full path, with its autograd node
    assert out.grad_fn is not None
    torch.autograd.grad(out.float().sum(), leaf)
    with pytest.raises(ac.SpecError, match="dtypes differ"):
        kern(q.float() if dtype != torch.float32 else q.double(), k, v)  # another signature: validated, refused
    marked = kern(q.as_subclass(_Marked), k, v)  # a subclass: validated every call, not prepared
    torch.testing.assert_close(marked.as_subclass(torch.Tensor).double(), want, rtol=tol, atol=tol / 10)


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_decoding_reads_a_view_of_a_longer_cache_in_place(dtype: torch.dtype, isa: str) -> None:
    """Decoding on a preallocated cache passes its first n positions, ``k_cache[:, :, :n]``: a view whose heads are
    a cache length apart. Where few rows read each key (nothing packed) the forward reads it where it is (no copy of K
    or V per call: checked in the profiler's record of the call), per head, GQA group, kv split and batch; the
    backward (a view that requires grad) makes its own contiguous copies. Calls whose K is packed (many rows) and
    layouts that are not a head stride (a transposed cache) are made contiguous first. Against the float64 oracle."""
    from torch.profiler import profile

    from tests.numerics import oracle

    H, Hkv, D, most = 8, 2, 64, 700
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    spec = ac.AttentionSpec(num_heads=H, num_kv_heads=Hkv, head_dim=D, mask=ac.causal(align="bottom_right"),
                            score_mod=ac.alibi())  # fmt: skip
    g = torch.Generator().manual_seed(3)
    with config.override(cpu_isa=isa):
        kern = ac.compile(spec, target="cpu")
        micro = kern.cpu_kernel().products(D).startswith("micro")
        for B, sq, n, layout in ((1, 1, 300, "view"), (2, 2, 650, "view"), (3, 1, 1, "view"), (1, 64, 500, "view"),
                                 (2, 1, 200, "transposed")):  # fmt: skip
            if layout == "view":
                cache = [torch.randn(B, Hkv, most, D, generator=g).to(dtype) for _ in range(2)]
            else:  # [B, S, Hkv, D] seen as [B, Hkv, S, D]
                cache = [torch.randn(B, most, Hkv, D, generator=g).to(dtype).transpose(1, 2) for _ in range(2)]
            k, v = (c[:, :, :n] for c in cache)
            q = torch.randn(B, H, sq, D, generator=g).to(dtype)
            with profile(record_shapes=True) as prof:
                out = kern(q, k, v)
            copies = [e for e in prof.events() if e.name == "aten::copy_" and list(k.shape) in e.input_shapes]
            packed = micro and sq * H // Hkv >= cpu.PACK_ROWS  # (micro-kernels on packed K)
            upcast = dtype != torch.float32 and not kern.cpu_kernel().lanes  # (the portable build's fp32 copies)
            assert bool(copies) == (layout != "view" or packed or upcast), (B, sq, n, layout)
            keep = torch.ones(sq, n, dtype=torch.bool).tril(n - sq).expand(B, H, sq, n)
            want, _ = oracle.attention(q, k, v, keep, D**-0.5, oracle.alibi_fn(H))
            torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol / 10)
        leaf = torch.randn(1, Hkv, most, D, generator=g).to(dtype).requires_grad_()
        v = torch.randn(1, Hkv, 300, D, generator=g).to(dtype)
        q = torch.randn(1, H, 1, D, generator=g).to(dtype)
        grad = torch.autograd.grad(kern(q, leaf[:, :, :300], v).float().square().sum(), leaf)[0]
    ref = leaf.detach().double().requires_grad_()
    keep = torch.ones(1, H, 1, 300, dtype=torch.bool)
    want, _ = oracle.attention(q, ref[:, :, :300], v, keep, D**-0.5, oracle.alibi_fn(H))
    want_grad = torch.autograd.grad(want.square().sum(), ref)[0]
    assert float((grad.double() - want_grad).norm() / want_grad.norm()) < tol, "dK of the cache's first 300 positions"
    assert bool((grad[:, :, 300:] == 0).all())
