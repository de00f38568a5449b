"""Block maps: sound for every DSL mask (property test), tight for every builtin at 4K tokens."""

from __future__ import annotations

import dataclasses
import itertools
import logging
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attncc as ac
from attncc import api, memo
from attncc.analysis import tiling
from attncc.analysis.blockmap import EMPTY, FULL, BlockMap
from attncc.ir import exprs as X
from attncc.ir import pointeval
from attncc.ir.boxeval import Box
from attncc.passes.normalize import boolean
from attncc.validate import CallShape
from tests.numerics.brute import constant_tables, dense_mask, tile_states


class _Undecided(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.hits = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "left partial after refinement" in record.getMessage():
            self.hits += 1


@st.composite
def leaves(draw: st.DrawFn) -> tuple[ac.Expr, dict[str, torch.Tensor]]:
    kind = draw(
        st.sampled_from(
            [
                "causal",
                "br",
                "window",
                "sinks",
                "prefix",
                "dilated",
                "mod",
                "div",
                "abs",
                "doc",
                "layout",
                "linear",
                "where",
                "per_head",
            ]
        )
    )
    i = lambda lo, hi: draw(st.integers(lo, hi))
    if kind == "causal":
        return ac.causal(), {}
    if kind == "br":
        return ac.causal("bottom_right"), {}
    if kind == "window":
        return ac.sliding_window(i(0, 40), i(0, 20)), {}
    if kind == "sinks":
        return ac.sinks(i(0, 30)), {}
    if kind == "prefix":
        return ac.prefix_lm(i(0, 60)), {}
    if kind == "dilated":
        return ac.dilated_window(i(1, 6), i(1, 5), causal=draw(st.booleans())), {}
    if kind == "mod":
        a = i(1, 9)
        return ac.q % a == ac.kv % a, {}
    if kind == "div":
        a = i(1, 20)
        return ac.q // a == ac.kv // a, {}
    if kind == "abs":
        return abs(ac.q - ac.kv) <= i(0, 30), {}
    if kind == "linear":
        return 2 * ac.kv <= ac.q + i(-10, 40), {}
    if kind == "where":
        c = i(0, 60)
        return ac.where(ac.q > c, ac.kv <= ac.q, ac.kv >= c), {}
    if kind == "per_head":
        return ac.sliding_window(ac.per_head([i(0, 30), i(0, 30)], name="w")), {}
    if kind == "doc":
        lengths = draw(st.lists(st.integers(1, 40), min_size=1, max_size=8))
        ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        ids = torch.cat([ids, ids.new_full((200,), len(lengths))])[:200]
        return ac.document(ac.tensor("doc")), {"doc": ids}
    bl = i(4, 16)
    layout = torch.tensor(draw(st.lists(st.lists(st.booleans(), min_size=30, max_size=30), min_size=30, max_size=30)))
    return ac.block_layout(ac.tensor("layout"), block=(bl, bl)), {"layout": layout}


@st.composite
def masks(draw: st.DrawFn, depth: int = 2) -> tuple[ac.Expr, dict[str, torch.Tensor]]:
    if depth == 0 or draw(st.booleans()):
        return draw(leaves())
    op = draw(st.sampled_from(["and", "or", "not"]))
    a, ta = draw(masks(depth - 1))
    if op == "not":
        return ~a, ta
    b, tb = draw(masks(depth - 1))
    if set(ta) & set(tb):
        return a, ta  # two draws of the same tensor name with different values: keep one side
    try:
        return (a & b if op == "and" else a | b), {**ta, **tb}
    except ac.SpecError:  # two different per-head tables drawn under one name: the DSL refuses
        return a, ta


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    masks(),
    st.one_of(st.integers(1, 4), st.integers(1, 120)),  # (often one q-block: a decoding step's map)
    st.integers(1, 120),
    st.integers(1, 24),
    st.integers(1, 24),
    st.sampled_from(["every_point", "at_points", "split"]),
)
def test_classification_is_sound_and_exact_where_decided(mask_and_tensors, sq, skv, bq, bkv, way) -> None:  # type: ignore[no-untyped-def]
    """Tile states against the dense mask: a one-q-block map read at every point (``tiling._from_points``), or
    classified, its undecided tiles settled at their points (few of them, as decoding's maps have:
    ``tiling._at_points``) or by splitting boxes (``tiling._refine``)."""
    read = 0 if way != "every_point" else tiling.POINT_MAP
    with (
        mock.patch.object(tiling, "POINTS", 0 if way == "split" else tiling.POINTS),
        mock.patch.object(tiling, "POINT_MAP", read),
        mock.patch.object(tiling, "POINT_MAP_READING", read and tiling.POINT_MAP_READING),
    ):
        _classification_is_sound_and_exact_where_decided(mask_and_tensors, sq, skv, bq, bkv)


def _classification_is_sound_and_exact_where_decided(mask_and_tensors, sq, skv, bq, bkv) -> None:  # type: ignore[no-untyped-def]
    mask, tensors = mask_and_tensors
    try:
        spec = ac.AttentionSpec(num_heads=2, head_dim=8, mask=mask)
    except ac.SpecError:
        return  # e.g. a tensor indexed two ways; the DSL refuses it with a message
    kern = ac.compile(spec, target="reference", tiles=(bq, bkv))
    if any(n == "layout" for n in tensors) and (sq > 30 * 4 or skv > 30 * 4):
        return
    watcher = _Undecided()
    logger = logging.getLogger("attncc.tiling")
    logger.addHandler(watcher)
    level, logger.level = logger.level, logging.INFO
    try:
        bm = kern.block_map(sq, skv, **tensors)
    finally:
        logger.removeHandler(watcher)
        logger.setLevel(level)
    got = bm.states()[0]
    want = tile_states(dense_mask(boolean(spec.mask), sq, skv, 2, {**tensors, **constant_tables(spec)}), (bq, bkv))
    got = np.broadcast_to(got, want.shape)
    assert not ((got == EMPTY) & (want != EMPTY)).any(), "a tile with visible pairs was called empty"
    assert not ((got == FULL) & (want != FULL)).any(), "a tile with masked pairs was called full"
    if watcher.hits == 0:
        np.testing.assert_array_equal(got, want)


BUILTINS = {
    "causal": lambda: ac.causal(),
    "causal_bottom_right": lambda: ac.causal("bottom_right"),
    "sliding_window": lambda: ac.sliding_window(256),
    "sliding_window_2sided": lambda: ac.sliding_window(100, 300),
    "prefix_lm": lambda: ac.prefix_lm(1000),
    "sinks_or_window": lambda: ac.sinks(4) | ac.sliding_window(500),
    "per_head_window": lambda: ac.sliding_window(ac.per_head([64, 300, 64, 1000], name="w")),
    "dilated_window": lambda: ac.dilated_window(64, 4),
    "document_causal": lambda: ac.document(ac.tensor("doc")) & ac.causal(),
    "block_layout": lambda: ac.block_layout(ac.tensor("layout"), block=(128, 128)),
    "neighborhood_2d": lambda: ac.neighborhood((64, 64), (15, 15)),
    "neighborhood_2d_dilated_causal": lambda: ac.neighborhood((64, 64), (7, 7), dilation=(2, 3), causal=(True, False)),
    "neighborhood_3d": lambda: ac.neighborhood((16, 16, 16), (3, 5, 7)),
    "block_local": lambda: ac.block_local((64, 64), (8, 8)),
    "halo": lambda: ac.block_local((64, 64), 8, halo=3),
    "grid": lambda: ac.grid_attention((64, 64), 8),
}


@pytest.mark.parametrize("block", [(64, 64), (128, 64)], ids=["64x64", "128x64"])
@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_builtins_at_4k_compute_exactly_the_minimum_tiles(name: str, block: tuple[int, int]) -> None:
    n = 4096
    g = torch.Generator().manual_seed(1)
    tensors = {
        "doc": torch.repeat_interleave(torch.arange(40), torch.randint(20, 200, (40,), generator=g))[:n],
        "layout": torch.rand(32, 32, generator=g) > 0.7,
    }
    spec = ac.AttentionSpec(num_heads=4, head_dim=64, mask=BUILTINS[name]())
    used = {t.name: tensors[t.name] for t in spec.runtime_tensors()}
    bm = ac.compile(spec, target="reference", tiles=block).block_map(n, n, **used)
    want = tile_states(dense_mask(boolean(spec.mask), n, n, 4, {**used, **constant_tables(spec)}), block)
    np.testing.assert_array_equal(np.broadcast_to(bm.states()[0], want.shape), want)
    if bm.maps_shape[1] == 1:
        assert bm.num_computed_blocks == int((want[0] != EMPTY).sum())
        assert bm.num_full_blocks == int((want[0] == FULL).sum())


def test_banded_maps_scale_to_a_million_tokens() -> None:
    kern = ac.compile(
        ac.AttentionSpec(num_heads=8, head_dim=64, mask=ac.sliding_window(4095)), target="reference", tiles=(128, 128)
    )
    bm = kern.block_map(2**20, 2**20)
    assert bm.kind == "banded" and bm.num_maps == 1
    # q-block qb sees kv blocks [max(0, qb - 32), qb]; of those, [max(0, qb - 31), qb - 1] are full
    assert bm.num_computed_blocks == sum(min(qb, 32) + 1 for qb in range(8192))
    assert bm.num_full_blocks == sum(min(qb, 31) for qb in range(8192))


def test_maps_of_equal_heads_are_shared() -> None:
    spec = ac.AttentionSpec(num_heads=4, head_dim=8, mask=ac.sliding_window(ac.per_head([8, 40, 8, 40], name="w")))
    bm = ac.compile(spec, target="reference", tiles=(16, 16)).block_map(128, 128)
    assert bm.num_maps == 2 and bm.map_of.tolist() == [[0, 1, 0, 1]]
    dense = bm.to_dense()
    assert dense.shape == (4, 8, 8) and torch.equal(dense[0], dense[2]) and not torch.equal(dense[0], dense[1])


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_interop() -> None:
    from torch.nn.attention.flex_attention import flex_attention

    doc = torch.arange(200) // 45
    spec = ac.AttentionSpec(num_heads=2, head_dim=16, mask=ac.causal() & ac.document(ac.tensor("doc")))
    kern = ac.compile(spec, target="reference", tiles=(32, 32))
    bm = kern.block_map(200, 200, doc=doc)
    flex_bm = bm.to_flex(lambda b, h, q_idx, kv_idx: (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx))
    assert torch.equal(flex_bm.to_dense()[0, 0].bool()[:7, :7], bm.to_dense()[0])
    q, k, v = (torch.randn(1, 2, 200, 16) for _ in range(3))
    torch.testing.assert_close(
        flex_attention(q, k, v, block_mask=flex_bm), kern(q, k, v, doc=doc), atol=2e-5, rtol=1e-4
    )


def _arrays(bm: BlockMap) -> dict[str, np.ndarray]:
    return {f.name: getattr(bm, f.name) for f in dataclasses.fields(bm) if isinstance(getattr(bm, f.name), np.ndarray)}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(masks(), st.integers(1, 150), st.integers(1, 3000), st.sampled_from([(16, 16), (64, 64), (128, 64), (7, 13)]))
def test_bands_evaluated_by_point_functions_give_the_maps_of_interval_arithmetic(
    mask_and_tensors, sq, skv, block
) -> None:  # type: ignore[no-untyped-def]
    """The banded maps' bounds run as compiled point functions (a decoding step builds a map per token); with them
    switched off every bound goes through interval arithmetic: the maps must be the same arrays, at decoding's
    shapes (few rows, many keys) and prefill's."""
    mask, tensors = mask_and_tensors
    try:
        spec = ac.AttentionSpec(num_heads=2, head_dim=8, mask=mask)
    except ac.SpecError:
        return
    if tensors and (sq > 120 or skv > 120):  # (the drawn runtime tensors cover 120 tokens)
        return
    kern = ac.compile(spec, target="reference", tiles=block)
    fast = kern.block_map(sq, skv, **tensors)
    with mock.patch.object(pointeval, "at", lambda *args: None):
        slow = kern.block_map(sq, skv, **tensors)
    assert fast.kind == slow.kind
    got, want = _arrays(fast), _arrays(slow)
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_decoding_builds_maps_through_point_functions_and_keeps_a_bounded_number() -> None:
    """A generation loop calls with a new key length each token: each map's bands take the compiled path, and the
    kernel keeps the lists of the last ``memo.SHAPES`` lengths only."""
    kern = ac.compile(ac.AttentionSpec(num_heads=4, head_dim=16, mask=ac.causal("bottom_right")), target="cpu")
    q = torch.randn(1, 4, 1, 16)
    cache = torch.randn(1, 4, 300, 16)
    calls = []
    real = pointeval.at
    with mock.patch.object(pointeval, "at", lambda *a: calls.append(real(*a)) or calls[-1]):
        for n in range(1, 200):
            o = kern(q, cache[:, :, :n], cache[:, :, :n])
    assert calls and all(c is not None for c in calls)  # never the interval fallback
    want = ac.compile(kern.spec, target="reference")(q.double(), cache[:, :, :199].double(), cache[:, :, :199].double())
    torch.testing.assert_close(o.double(), want, atol=1e-5, rtol=1e-5)
    assert len(kern._lists) == memo.SHAPES
    assert len(kern.executable("cpu")._keeps) == 0  # no partial tile in these maps: no records made or kept
    bkv = kern.plan.tiles[1]  # steps whose new key falls in one kv block have the same tiles: one lists object
    lists = {n: kern._lists_for(CallShape(1, 1, n), {}) for n in range(bkv + 1, 2 * bkv + 2)}
    assert len({id(x) for n, x in lists.items() if n <= 2 * bkv}) == 1 and lists[2 * bkv + 1] is not lists[2 * bkv]
    assert lists[2 * bkv + 1].kv_idx.tolist() == [0, 1, 2] and lists[bkv + 1].kv_idx.tolist() == [0, 1]


@st.composite
def banded_masks(draw: st.DrawFn, depth: int = 2) -> ac.Expr:
    """Masks made of bands, as decoding uses them (bottom-right causal and windows, sinks, prefixes, per-head
    windows), combined with &, | and ~."""
    i = lambda lo, hi: draw(st.integers(lo, hi))
    if depth == 0 or (depth == 1 and draw(st.booleans())):
        return draw(st.sampled_from([
            ac.causal(), ac.causal("bottom_right"), ac.sliding_window(i(0, 40), i(0, 20)), ac.sinks(i(0, 30)),
            ac.prefix_lm(i(0, 60)), ac.sliding_window(i(0, 150), i(0, 20), align="bottom_right"),
            ac.prefix_lm(i(0, 60), align="bottom_right"), abs(ac.q - ac.kv) <= i(0, 30),
            ac.sliding_window(ac.per_head([i(0, 30), i(0, 30)], name="w")),
        ]))  # fmt: skip
    a, b = draw(banded_masks(depth - 1)), draw(banded_masks(depth - 1))
    op = draw(st.sampled_from(["and", "or", "or", "or", "not"]))  # (| makes several bands)
    try:
        return ~a if op == "not" else a & b if op == "and" else a | b
    except ac.SpecError:  # two different per-head tables drawn under one name
        return a


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(banded_masks(), st.data(), st.sampled_from([(16, 16), (64, 64), (128, 64), (7, 13)]))
def test_maps_of_a_run_of_key_lengths_are_each_lengths_map(mask, data, block) -> None:  # type: ignore[no-untyped-def]
    """A one-q-block map of a banded mask is built for a run of key lengths at once (a generation loop's next
    steps): each must be the map of the general banded path at its length, tile for tile, and (banded maps being
    exact) the dense mask's tiles. A length shares the arrays of the length before exactly where their tiles are
    equal (``BlockMap.shares_tiles``, which lets the kernel share their tile lists)."""
    kern = ac.compile(ac.AttentionSpec(num_heads=2, head_dim=8, mask=mask), target="reference", tiles=block)
    spec, rec = kern.spec, kern.recipe
    if rec.bands is None:
        return
    sq = data.draw(st.integers(1, block[0]), label="sq")
    first = data.draw(st.integers(1, 400), label="first kv length")
    lengths = list(range(first, first + data.draw(st.integers(1, 40), label="lengths"), data.draw(st.integers(1, 5))))
    maps = tiling.build_lengths(rec, sq, lengths, block, 2, 1)
    hm = 2 if rec.per_head else 1
    for before, bm in itertools.pairwise(maps):
        assert bm.shares_tiles(before) == (bm.tiles_key() == before.tiles_key()), f"{before.kv_len}, {bm.kv_len}"
    for n, bm in zip(lengths, maps, strict=True):
        sizes = {X.Sq: Box.point(sq), X.Skv: Box.point(n), X.H: Box.point(2), X.B: Box.point(1)}
        comp, full = tiling._banded(list(rec.bands), sq, n, block, hm, rec.constants, sizes)
        general = BlockMap.banded(block, sq, n, comp, full, np.arange(hm).reshape(1, hm))
        assert (bm.q_len, bm.kv_len) == (sq, n)
        np.testing.assert_array_equal(bm.states()[0], general.states()[0], err_msg=f"{sq}x{n}")
        want = tile_states(dense_mask(boolean(spec.mask), sq, n, 2, constant_tables(spec)), block)
        np.testing.assert_array_equal(np.broadcast_to(bm.states()[0], want.shape), want, err_msg=f"{sq}x{n}")


@pytest.mark.parametrize("mask_name", ["sinks_or_window", "every_key"])
@pytest.mark.parametrize("growth", [1, 3])
def test_a_growing_cache_finds_its_next_maps_built_ahead(growth: int, mask_name: str) -> None:
    """A generation loop (one new key a step, or several: speculative decoding) builds the maps of the next
    ``api.AHEAD`` lengths at once when a step follows a slightly shorter one; calls at lengths in no order build only
    their own. Every step stays exact against the float64 reference. ``every_key``: no mask, as a model's decoding
    steps call SDPA (dense to the kernels; its maps are one band's all the same)."""
    mask = ac.sinks(4) | ac.sliding_window(40, align="bottom_right") if mask_name == "sinks_or_window" else None
    kern = ac.compile(ac.AttentionSpec(num_heads=2, head_dim=16, mask=mask), target="cpu", tiles=(16, 16))
    ref = ac.compile(kern.spec, target="reference")
    q, cache = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 400, 16)
    built: list[int] = []  # lengths per build
    real = tiling.build_lengths
    lengths = list(range(20, 20 + 100 * growth, growth))
    counted = lambda rec, sq, ns, *a: built.append(len(ns)) or real(rec, sq, ns, *a)
    with mock.patch.object(tiling, "build_lengths", counted):
        for n in lengths:
            k = cache[:, :, :n]
            want = ref(q.double(), k.double(), k.double())
            torch.testing.assert_close(kern(q, k, k).double(), want, atol=1e-5, rtol=1e-5, msg=f"kv length {n}")
        assert built[0] == 1 and set(built[1:]) == {api.AHEAD}  # the first step alone, then runs of the next ones
        assert len(built) <= 2 + len(lengths) * growth // api.AHEAD
        assert len(kern._ahead) <= 16 * api.AHEAD
        built.clear()
        for n in np.random.default_rng(0).permutation(np.arange(500, 900, 40)):  # no step follows a shorter one
            kern(q, torch.randn(1, 2, int(n), 16), torch.randn(1, 2, int(n), 16))
        assert built == [1] * 10


DECODING = {
    "window_bottom_right": lambda: ac.sliding_window(40, align="bottom_right"),
    "sinks_or_window_bottom_right": lambda: ac.sinks(4) | ac.sliding_window(300, align="bottom_right"),
    "prefix_lm_bottom_right": lambda: ac.prefix_lm(100, align="bottom_right"),
    "every_key": lambda: None,  # no mask (a model's decoding step calls SDPA so): dense to the kernels, one band here
}


@pytest.mark.parametrize("name", ["causal", "causal_bottom_right", "sliding_window_2sided", "prefix_lm",
                                  "sinks_or_window", "per_head_window", *DECODING])  # fmt: skip
def test_maps_of_one_q_block_are_exact(name: str) -> None:
    """Few query rows against many keys (decoding, speculative decoding, a short prompt): the bands' bounds are
    read at every row of the one q-block. Against the dense mask, tile by tile, at lengths around tile edges."""
    spec = ac.AttentionSpec(num_heads=4, head_dim=64, mask={**BUILTINS, **DECODING}[name]())
    for block in ((128, 64), (16, 16)):
        kern = ac.compile(spec, target="reference", tiles=block)
        for sq, skv in ((1, 1), (1, 1000), (3, 1025), (16, 1088), (block[0], 1500), (7, 5)):
            bm = kern.block_map(sq, skv)
            want = tile_states(dense_mask(boolean(spec.mask), sq, skv, 4, constant_tables(spec)), block)
            np.testing.assert_array_equal(np.broadcast_to(bm.states()[0], want.shape), want, err_msg=f"{sq}x{skv}")


OWN_LENGTHS = {  # name: (mask, its definition at (b, h, i, j) from the tensors, the tensors at batch 3, 2 heads)
    "lens": (
        lambda: ac.kv < ac.tensor("lens")[ac.b],
        lambda b, h, i, j, sq, skv, t: j < t["lens"][b],
        lambda skv: {"lens": torch.tensor([0, skv // 2 + 1, skv + 5])},
    ),
    "lens_float": (
        lambda: ac.kv < ac.tensor("x", dtype="float")[ac.b],
        lambda b, h, i, j, sq, skv, t: j < t["x"][b],
        lambda skv: {"x": torch.tensor([3.5, 64.0, skv * 0.37])},
    ),
    "start_and_causal_br": (
        lambda: ac.causal(align="bottom_right") & (ac.kv >= ac.tensor("start")[ac.b]),
        lambda b, h, i, j, sq, skv, t: (j <= i + skv - sq) & (j >= t["start"][b]),
        lambda skv: {"start": torch.tensor([0, skv // 3, skv - 1])},
    ),
    "head_window_br": (
        lambda: ac.sliding_window(ac.tensor("w")[ac.h], align="bottom_right"),
        lambda b, h, i, j, sq, skv, t: (j <= i + skv - sq) & (j >= i + skv - sq - t["w"][h]),
        lambda skv: {"w": torch.tensor([5, 130])},
    ),
    "lens_and_head_window": (
        lambda: (ac.kv < ac.tensor("lens")[ac.b]) & ac.sliding_window(ac.tensor("w")[ac.h], align="bottom_right"),
        lambda b, h, i, j, sq, skv, t: (j < t["lens"][b]) & (j <= i + skv - sq) & (j >= i + skv - sq - t["w"][h]),
        lambda skv: {"lens": torch.tensor([skv, skv // 2 + 1, 3]), "w": torch.tensor([70, 10])},
    ),
    "lens_or_sinks": (
        lambda: (ac.kv < ac.tensor("lens")[ac.b]) | ac.sinks(2),
        lambda b, h, i, j, sq, skv, t: (j < t["lens"][b]) | (j < 2),
        lambda skv: {"lens": torch.tensor([1, skv // 2, 0])},
    ),
}


@pytest.mark.parametrize("way", ["points", "read_bands"])
@pytest.mark.parametrize("name", sorted(OWN_LENGTHS))
def test_maps_of_sequences_of_their_own_lengths_are_exact(name: str, way: str) -> None:
    """Bounds that read runtime tensors per batch entry or head (a batch of sequences of their own lengths, a
    per-head window given at run time): maps of one q-block read at every point (``tiling._from_points``), or, with
    more points than ``POINT_MAP_READING``, bands (``tiling._read_banded``). Each (batch, head)'s map against the
    mask's definition, tile by tile, at decoding's shapes and around tile edges, both ways."""
    make, keep, tensors_at = OWN_LENGTHS[name]
    spec = ac.AttentionSpec(num_heads=2, head_dim=16, mask=make())
    assert spec and ac.compile(spec, target="reference").recipe.read_bands is not None
    for block in ((128, 64), (16, 16)):
        kern = ac.compile(spec, target="reference", tiles=block)
        for sq, skv in ((1, 1), (1, 70), (3, 200), (16, 1000), (block[0], 129)):
            tensors = tensors_at(skv)
            with mock.patch.object(tiling, "POINT_MAP_READING", 0 if way == "read_bands" else tiling.POINT_MAP_READING):
                bm = kern.block_map(sq, skv, batch=3, **tensors)
            assert bm.kind == ("banded" if way == "read_bands" else "listed"), (sq, skv)
            b, h = torch.arange(3).view(3, 1, 1, 1), torch.arange(2).view(1, 2, 1, 1)
            i, j = torch.arange(sq).view(1, 1, sq, 1), torch.arange(skv).view(1, 1, 1, skv)
            dense = keep(b, h, i, j, sq, skv, tensors).expand(3, 2, sq, skv)
            want = tile_states(dense.reshape(6, sq, skv), block).reshape(3, 2, -1)
            got = bm.unique_states()[np.broadcast_to(bm.map_of, (3, 2))].reshape(3, 2, -1)
            np.testing.assert_array_equal(got, want, err_msg=f"{name} {sq}x{skv} tiles {block}")


AT = ac.Expr(X.q + X.Skv - X.Sq)  # a query's position among the keys, bottom-right aligned
AT_POINTS = {  # name: (mask, definition at (b, h, i, j), tensors at batch 3 and 2 heads): not banded, even per batch
    "padded_causal_br": (  # a left-padded batch decoding (HF's attention_mask[b, kv], bottom-right causal)
        lambda: ac.causal("bottom_right") & (ac.tensor("am")[ac.b, ac.kv] != 0),
        lambda b, h, i, j, sq, skv, t: (j <= i + skv - sq) & (t["am"][b, j] != 0),
        lambda skv: {"am": (torch.arange(skv)[None, :] >= torch.tensor([[0], [skv // 3], [skv - 1]])).long()},
    ),
    "position_and_padding": (  # what torch.compile lifts from HF's decoding step: a position tensor, the padding
        lambda: (ac.kv <= ac.tensor("pos")[0]) & (ac.tensor("am")[ac.b, ac.kv] != 0),
        lambda b, h, i, j, sq, skv, t: (j <= t["pos"][0]) & (t["am"][b, j] != 0),
        lambda skv: {"pos": torch.tensor([skv - 2]), "am": (torch.rand(3, skv) > 0.4).long()},
    ),
    "document_per_batch": (  # packed documents, one id row per sequence, bottom-right causal
        lambda: ac.causal("bottom_right") & (ac.tensor("doc")[ac.b, AT] == ac.tensor("doc")[ac.b, ac.kv]),
        lambda b, h, i, j, sq, skv, t: (j <= i + skv - sq) & (t["doc"][b, i + skv - sq] == t["doc"][b, j]),
        lambda skv: {"doc": torch.sort(torch.randint(0, 5, (3, skv)), 1).values},
    ),
    "dilated_window": (
        BUILTINS["dilated_window"],
        lambda b, h, i, j, sq, skv, t: torch.as_tensor(
            dense_mask(boolean(ac.dilated_window(64, 4).sym), sq, skv, 1, {})
        ).view(1, 1, sq, skv),
        lambda skv: {},
    ),
}


@pytest.mark.parametrize("name", sorted(AT_POINTS))
def test_maps_read_at_every_point_are_exact(name: str) -> None:
    """A map of few points (a decoding step's, a batch of short prompts') of a mask that is not banded is read at
    every (batch, head, row, key) point (``tiling._from_points``), not classified: each (batch, head)'s map against
    the mask's definition, tile by tile, at decoding's and prefill's shapes and around tile edges; the classification
    is never called."""
    make, keep, tensors_at = AT_POINTS[name]
    torch.manual_seed(0)
    spec = ac.AttentionSpec(num_heads=2, head_dim=16, mask=make())
    for block in ((128, 64), (16, 16)):
        kern = ac.compile(spec, target="reference", tiles=block)
        assert kern.recipe.bands is None and kern.recipe.read_bands is None
        for sq, skv in ((1, 1), (1, 70), (3, 200), (16, 1000), (block[0], 129), (40, 40), (33, 100), (150, 150)):
            tensors = tensors_at(skv)
            with mock.patch.object(tiling, "classify", side_effect=AssertionError("classified")):
                bm = kern.block_map(sq, skv, batch=3, **tensors)
            b, h = torch.arange(3).view(3, 1, 1, 1), torch.arange(2).view(1, 2, 1, 1)
            i, j = torch.arange(sq).view(1, 1, sq, 1), torch.arange(skv).view(1, 1, 1, skv)
            dense = torch.as_tensor(keep(b, h, i, j, sq, skv, tensors)).expand(3, 2, sq, skv)
            want = tile_states(dense.reshape(6, sq, skv), block).reshape(3, 2, -1)
            got = bm.unique_states()[np.broadcast_to(bm.map_of, (3, 2))].reshape(3, 2, -1)
            np.testing.assert_array_equal(got, want, err_msg=f"{name} {sq}x{skv} tiles {block}")


def test_maps_read_at_points_fall_back_to_classifying_tiles() -> None:
    """Where a point cannot be read (a float tensor holding NaN) or there are more points than ``POINT_MAP_READING``,
    the map is classified instead: sound, and the same tiles where classification is tight."""
    x = ac.tensor("x", dtype="float")
    cases = [  # (mask, tensors, batch, largest map read at points)
        (ac.kv < x[ac.b] * 0.5 + x[ac.b], {"x": torch.tensor([float("nan"), 30.0])}, 2, tiling.POINT_MAP_READING),
        (ac.kv < ac.tensor("am")[ac.b, ac.kv] + 600, {"am": torch.zeros(1, 1000, dtype=torch.long)}, 1, 999),
    ]
    for mask, tensors, batch, most in cases:
        kern = ac.compile(ac.AttentionSpec(num_heads=2, head_dim=16, mask=mask), target="reference", tiles=(16, 64))
        with (
            mock.patch.object(tiling, "POINT_MAP_READING", most),
            mock.patch.object(tiling, "classify", wraps=tiling.classify) as classify,
        ):
            bm = kern.block_map(1, 1000, batch=batch, **tensors)
        assert classify.call_count == 1, mask
        if batch == 1:  # kv < 600: nine full tiles of 64 keys, one partial
            assert bm.states().reshape(-1).tolist() == [2] * 9 + [1] + [0] * 6


@pytest.mark.parametrize("lengths", [(1, 0), (0, 4), (0, 0)])
def test_a_map_of_an_empty_sequence_is_refused_as_a_call_is(lengths: tuple[int, int]) -> None:
    for mask in (ac.causal(), (ac.kv <= ac.q) & (ac.tensor("am")[ac.b, ac.kv] != 0)):
        kern = ac.compile(ac.AttentionSpec(num_heads=2, head_dim=8, mask=mask), target="reference")
        tensors = {"am": torch.ones(1, 4, dtype=torch.long)} if kern.spec.runtime_tensors() else {}
        with pytest.raises(ac.SpecError, match=r"empty sequence: block_map\(q_len=\d, kv_len=\d, batch=1\)"):
            kern.block_map(*lengths, **tensors)
