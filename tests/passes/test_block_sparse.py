"""The block-sparse pass: golden before/after, numerics preserved, refusal, tile choice."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

import attncc as ac
from attncc.analysis.costmodel import choose_tiles
from attncc.codegen.interpret import interpret
from attncc.errors import SpecError, VerifyError
from attncc.ir.ops import TiledOp
from attncc.ir.text import parse_ir, print_ir
from attncc.lower import spec_to_ir
from attncc.passes import BlockSparse, Canonicalize, Fuse
from attncc.passes.normalize import boolean

GOLDEN = Path(__file__).parent / "golden"


def _fused(spec: ac.AttentionSpec):  # type: ignore[no-untyped-def]
    return Fuse().run(Canonicalize().run(spec_to_ir(spec)))


def test_golden(golden) -> None:  # type: ignore[no-untyped-def]
    spec = ac.AttentionSpec(name="sinks_window", num_heads=4, head_dim=16, mask=ac.sinks(4) | ac.sliding_window(255))
    before = _fused(spec)
    after = BlockSparse(bq=64, bkv=64).run(before)
    after.verify()
    assert parse_ir(print_ir(after)) == after
    golden(GOLDEN / "block-sparse.ir", f"# before\n{print_ir(before)}# after\n{print_ir(after)}")


@pytest.mark.parametrize(
    "mask,layout",
    [
        (ac.causal(), "banded"),
        (ac.causal("bottom_right") & ac.sliding_window(ac.per_head([3, 9], name="w")), "banded"),
        (ac.document(ac.tensor("doc")), "runtime"),
        (ac.neighborhood(24, 5), "static"),
        (ac.q % (ac.kv + 1) == 0, "dense"),
    ],
)
def test_layouts_and_numerics(mask: ac.Expr, layout: str) -> None:
    spec = ac.AttentionSpec(num_heads=2, head_dim=8, mask=mask)
    before = _fused(spec)
    after = BlockSparse(bq=8, bkv=8).run(before)
    (op,) = after.ops_of(TiledOp)
    assert isinstance(op, TiledOp) and op.layout == layout
    q, k, v = (torch.randn(1, 2, 24, 8) for _ in range(3))
    tensors = {"doc": torch.arange(24) // 5} if layout == "runtime" else {}
    torch.testing.assert_close(interpret(after, q, k, v, tensors), interpret(before, q, k, v, tensors), rtol=0, atol=0)


def test_refusal_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    spec = ac.AttentionSpec(num_heads=2, head_dim=8, mask=ac.q % (ac.kv + 1) == 0)
    with caplog.at_level(logging.INFO, logger="attncc.passes.block_sparse"):
        BlockSparse().run(_fused(spec))
    assert "tiling %o densely, the mask cannot be analysed: Mod by a non-constant or non-positive value" in caplog.text


def test_closed_form_ranges_in_the_ir() -> None:
    kern = ac.compile(ac.AttentionSpec(num_heads=1, head_dim=64, mask=ac.causal()), target="reference", tiles=(64, 64))
    assert 'bands = ["0 .. q"], kv_blocks = ["0 .. qb"], full_blocks = ["0 .. qb - 1"]' in kern.ir


def test_cost_model_prefers_big_tiles_for_dense_work_and_smaller_ones_for_narrow_windows() -> None:
    """The block-sparse pass picks the tiles (its options name the target and length) and the IR shows them."""
    dense = ac.compile(ac.AttentionSpec(num_heads=8, head_dim=128), target="triton")
    assert "block-sparse{target=triton,n=4096}" in dense.pipeline and "bq = 128, bkv = 128" in dense.ir
    narrow = ac.AttentionSpec(num_heads=8, head_dim=64, mask=ac.sliding_window(31))
    # 128x128 tiles would compute 4x the FLOPs the 32-key window needs; the model picks 64x64
    assert ac.compile(narrow, target="triton").block_size == (64, 64)
    assert ac.compile(narrow, target="reference").block_size == (64, 64)
    assert choose_tiles(boolean(narrow.mask), "triton", 8, 64) == (64, 64)
    assert ac.compile(narrow, target="triton", tiles=(32, 32)).pipeline.endswith("block-sparse{bq=32,bkv=32}")
    assert ac.compile(narrow, target="reference", tiles=(16, 32)).block_size == (16, 32)


def test_backward_tiles_chosen_with_the_forward_ones_and_printed_only_when_they_differ() -> None:
    """The cpu cost model gives the backward its own tiles (``costmodel.BACKWARD_TILES``: the native bf16 backward's
    dQ product gains depth from 128-key tiles); they show in the IR (``bwd_bq``, ``bwd_bkv``, which parse back) and
    the plan. Given tiles, a block list's tiles and targets without backward tiles keep the forward's, and the
    pipeline names the backward tiles when asked."""
    spec = ac.AttentionSpec(num_heads=4, head_dim=64, mask=ac.causal())
    chosen = ac.compile(spec, target="cpu")
    assert chosen.plan.backward_tiles == (32, 256) != chosen.plan.tiles  # dQ's depth; the diagonal wastes little
    assert "bwd_bq = 32, bwd_bkv = 256" in chosen.ir and "(backward 32 x 256)" in str(chosen.plan)
    window = ac.AttentionSpec(num_heads=4, head_dim=64, mask=ac.sliding_window(255))
    assert ac.compile(window, target="cpu").plan.backward_tiles == (32, 128)  # 256-key tiles: 31% more keys
    runtime = ac.AttentionSpec(num_heads=4, head_dim=64, mask=ac.causal() & ac.document(ac.tensor("doc")))
    assert ac.compile(runtime, target="cpu").plan.backward_tiles == (32, 128)  # costed dense: the first candidate
    assert parse_ir(print_ir(chosen.graph)) == chosen.graph
    given = ac.compile(spec, target="cpu", tiles=(64, 64))
    assert given.plan.backward_tiles == (64, 64) and "bwd_bq" not in given.ir and "backward" not in str(given.plan)
    assert ac.compile(spec, target="reference").plan.backward_tiles == ac.compile(spec, target="reference").plan.tiles
    listed = ac.AttentionSpec(num_heads=4, head_dim=64, mask=ac.block_indices(ac.tensor("blocks"), 64))
    assert ac.compile(listed, target="cpu").plan.backward_tiles == (64, 64)
    options = "canonicalize,fuse,block-sparse{bq=64,bkv=64,bwd_bq=64,bwd_bkv=128}"
    named = ac.compile(spec, target="cpu", pipeline=options)
    assert (named.plan.tiles, named.plan.backward_tiles) == ((64, 64), (64, 128))
    tiled = next(op for op in given.graph.ops if isinstance(op, TiledOp))
    with pytest.raises(VerifyError, match="backward tiles must be >= 1"):
        tiled.replace(bwd_bq=32).verify()


def test_backward_tiles_for_register_blocks_keep_the_forward_ones_where_rows_keep_gapped_keys() -> None:
    """``register_blocks=1`` (the default pipeline's on a cpu whose bf16 backward runs AVX512_BF16 register blocks,
    which compute each row block's range of kept keys in a tile): a 2-D neighborhood, whose 128-key tiles span the gap
    between two grid rows' runs of keys, keeps the forward's 64 x 64 tiles; banded masks (one run per row) keep the
    model's. The api adds the option exactly where ``toolchain.bf16_register_blocks`` says so."""
    from attncc import config
    from attncc.codegen import toolchain

    blocks = "canonicalize,fuse,block-sparse{target=cpu,n=4096,register_blocks=1}"
    tiles_only = "canonicalize,fuse,block-sparse{target=cpu,n=4096}"
    nat = ac.AttentionSpec(num_heads=4, head_dim=64, mask=ac.neighborhood((64, 64), (15, 15)))
    assert ac.compile(nat, target="cpu", pipeline=tiles_only).plan.backward_tiles == (32, 128)
    kern = ac.compile(nat, target="cpu", pipeline=blocks)
    assert kern.plan.backward_tiles == kern.plan.tiles == (64, 64)
    for mask, want in ((ac.causal(), (32, 256)), (ac.sliding_window(255), (32, 128))):
        spec = ac.AttentionSpec(num_heads=4, head_dim=64, mask=mask)
        assert ac.compile(spec, target="cpu", pipeline=blocks).plan.backward_tiles == want
    for isa in ("avx2", "avx512"):
        if isa == "avx512" and "avx512f" not in toolchain.cpu_flags():
            continue
        with config.override(cpu_isa=isa):
            pipeline = ac.compile(nat, target="cpu").pipeline
        assert ("register_blocks=1" in pipeline) == toolchain.bf16_register_blocks(isa), (isa, pipeline)
    assert not toolchain.bf16_register_blocks("avx2")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("bwd_bq=32", "bwd_bq=32 without bwd_bkv"),
        ("bkv=128", "bkv=128 without bq"),
        ("bq=-64,bkv=64", "bq=-64, bkv=64: tile sizes must be positive"),
        ("bwd_bq=32,bwd_bkv=-1", "bwd_bq=32, bwd_bkv=-1: tile sizes must be positive"),
        ("n=0", "n=0"),
    ],
)
def test_lone_or_negative_tile_options_are_errors(options: str, message: str) -> None:
    """A tile option without its partner, or a negative one, is a SpecError naming it, not silently replaced by the
    cost model's choice."""
    spec = ac.AttentionSpec(num_heads=2, head_dim=64, mask=ac.causal())
    with pytest.raises(SpecError, match=message):
        ac.compile(spec, target="cpu", pipeline=f"canonicalize,fuse,block-sparse{{{options}}}")
