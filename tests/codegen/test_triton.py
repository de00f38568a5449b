"""The triton target under TRITON_INTERPRET=1 (set by conftest when no GPU): numerics, source, cache.

Small shapes and 16x16 tiles keep the interpreter fast while still crossing tile borders,
ragged edges and several tiles per row.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import attncc as ac
from attncc import config
from attncc.codegen import triton as triton_target
from tests.numerics import oracle
from tests.numerics.test_builtins import CASES, MODS, Case
from tests.numerics.test_cpu import check_target

GOLDEN = Path(__file__).parent / "golden"
TILES = (16, 16)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_every_mask_matches_the_oracle(case: Case) -> None:
    for sq, skv in sorted({case.shapes[0], case.shapes[-1]}):  # Sq = Skv, and Sq != Skv where allowed
        spec = ac.AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=16, mask=case.mask())
        keep = oracle.dense(case.oracle(sq, skv), 2, 4, sq, skv)
        check_target(spec, keep, sq, skv, case.tensors(sq, skv), None, target="triton", tiles=TILES)


@pytest.mark.parametrize("name,mod,fn,tensors", MODS, ids=lambda x: x)
def test_every_score_mod_matches_the_oracle(name: str, mod, fn, tensors) -> None:  # type: ignore[no-untyped-def]
    spec = ac.AttentionSpec(num_heads=4, num_kv_heads=1, head_dim=16, mask=ac.causal("bottom_right"), score_mod=mod())
    keep = oracle.dense(oracle.causal_bottom_right(21, 37), 2, 4, 21, 37)
    check_target(spec, keep, 21, 37, tensors, fn(tensors), target="triton", tiles=TILES)


def test_mha_odd_lengths_and_head_dim_not_a_power_of_two() -> None:
    spec = ac.AttentionSpec(num_heads=2, head_dim=24, mask=ac.sliding_window(7) | ac.sinks(3))
    keep = oracle.dense(oracle.sinks_or_window(3, 7), 2, 2, 45, 45)
    check_target(spec, keep, 45, 45, {}, None, target="triton", tiles=TILES)


@pytest.mark.parametrize("head_dim,value_dim", [(32, 16), (16, 24)])
def test_values_of_another_width(head_dim: int, value_dim: int) -> None:
    spec = ac.AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=head_dim, value_dim=value_dim, mask=ac.causal())
    keep = oracle.dense(oracle.causal(), 2, 4, 37, 37)
    check_target(spec, keep, 37, 37, {}, None, target="triton", tiles=TILES, lse_weight=0.5)


BF16_INTERPRETER = pytest.mark.xfail(
    strict=True,
    reason="Triton 3.9's interpreter computes tl.dot on bf16 wrongly (a 16x16 bf16 dot is off by 1e10; "
    "bf16 loads and casts are exact), so bf16 kernels can only be checked on a GPU",
)


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=BF16_INTERPRETER)])
def test_half_precision(dtype: torch.dtype) -> None:
    spec = ac.AttentionSpec(num_heads=2, num_kv_heads=1, head_dim=16, mask=ac.causal(), score_mod=ac.softcap(4.0))
    keep = oracle.dense(oracle.causal(), 2, 2, 33, 33)
    check_target(spec, keep, 33, 33, {}, oracle.softcap_fn(4.0), dtype=dtype, target="triton", tiles=TILES)


GOLDEN_SPECS = {
    "causal_softcap": ac.AttentionSpec(
        name="causal_softcap", num_heads=4, num_kv_heads=2, head_dim=64, mask=ac.causal(), score_mod=ac.softcap(30.0)
    ),
    "moa_sinks": ac.AttentionSpec(
        name="moa_sinks",
        num_heads=2,
        head_dim=64,
        mask=ac.sliding_window(ac.per_head([128, 512], name="span")) | ac.sinks(4),
    ),
    "packed_docs": ac.AttentionSpec(
        name="packed_docs", num_heads=2, head_dim=64, mask=ac.causal() & ac.document(ac.tensor("doc"))
    ),
}


@pytest.mark.parametrize("name", sorted(GOLDEN_SPECS))
def test_generated_source_golden(name: str, golden) -> None:  # type: ignore[no-untyped-def]
    kern = ac.compile(GOLDEN_SPECS[name], target="triton", tiles=(64, 64))
    golden(GOLDEN / f"triton_{name}.py.txt", kern.source)


def test_second_compile_hits_the_cache_without_regenerating(tmp_path: Path) -> None:
    spec = GOLDEN_SPECS["causal_softcap"]
    with config.override(cache_dir=tmp_path, always_compile=False):
        first = triton_target.TritonKernel(ac.compile(spec, target="triton").plan)
        second = triton_target.TritonKernel(ac.compile(spec, target="triton").plan)
    assert first.generated_now and not second.generated_now and first.path == second.path
    assert len(list(tmp_path.glob("triton/*.py"))) == 1


def test_learnable_table_gets_its_gradient_from_the_kernels() -> None:
    """relative_bias with a learnable table: d table comes from the Triton backward's scatter-add."""
    g = torch.Generator().manual_seed(3)
    table = torch.randn(2, 11, generator=g, requires_grad=True)
    spec = ac.AttentionSpec(
        num_heads=2, num_kv_heads=1, head_dim=16, mask=ac.causal(), score_mod=ac.relative_bias(ac.tensor("table"), 5)
    )
    q, k, v = (torch.randn(1, h, 37, 16, generator=g, requires_grad=True) for h in (2, 1, 1))
    w = torch.randn(1, 2, 37, 16, generator=g)
    grads = {}
    for target in ("triton", "reference"):
        out = ac.compile(spec, target=target, tiles=TILES if target == "triton" else None)(q, k, v, table=table)
        grads[target] = torch.autograd.grad((out * w).sum(), (q, k, v, table))
    for name, a, b in zip(["dq", "dk", "dv", "dtable"], grads["triton"], grads["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"{name} differs")
    assert grads["triton"][3].abs().sum() > 0


@pytest.mark.parametrize("tiles", [(48, 32), (32, 24), (8, 64)])
def test_tiles_the_triton_compiler_cannot_run_are_refused_with_the_nearest_valid_ones(tiles: tuple[int, int]) -> None:
    spec = ac.AttentionSpec(num_heads=2, head_dim=16, mask=ac.causal())
    with pytest.raises(ac.SpecError, match=r"power-of-2 tiles of at least 16.*use tiles=\(\d+, \d+\)") as info:
        ac.compile(spec, target="triton", tiles=tiles)
    suggested = [int(n) for n in str(info.value).split("use tiles=(")[1].split(")")[0].split(", ")]
    x = torch.randn(1, 2, 40, 16)
    out = ac.compile(spec, target="triton", tiles=tuple(suggested))(x, x, x)  # the suggestion runs
    keep = oracle.dense(oracle.causal(), 1, 2, 40, 40)
    torch.testing.assert_close(out.double(), oracle.attention(x, x, x, keep, 0.25)[0], rtol=1e-4, atol=1e-5)
