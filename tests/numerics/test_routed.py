"""Data-dependent sparsity against an independent float64 oracle: block-index lists, routed blocks and
runtime head tables, on the cpu and triton targets (triton under the interpreter), forward and backward.

The oracle builds its masks here from the definitions in DESIGN.md with Python loops and its own top-k;
nothing below uses attncc's expressions or selection code.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

import attncc as ac
from tests.numerics import oracle

TARGETS = ["cpu", "triton"]
Keep = torch.Tensor | Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def random_lists(B: int, H: int, nq: int, nkv: int, K: int, gen: torch.Generator) -> torch.Tensor:
    """Distinct kv blocks per row, a random number of them, padded with -1 (some rows empty)."""
    out = torch.full((B, H, nq, K), -1, dtype=torch.int64)
    for idx in range(B * H * nq):
        b, rem = divmod(idx, H * nq)
        h, r = divmod(rem, nq)
        n = int(torch.randint(0, K + 1, (1,), generator=gen))
        out[b, h, r, :n] = torch.randperm(nkv, generator=gen)[: min(n, nkv)]
    return out


def listed(lists: torch.Tensor, bq: int, bkv: int) -> oracle.MaskFn:
    def fn(b: int, h: int, i: int, j: int) -> bool:
        row = lists[b if lists.shape[0] > 1 else 0, h if lists.shape[1] > 1 else 0, i // bq]
        return (j // bkv) in row.tolist()

    return fn


def check(kern: ac.Kernel, keep: Keep, shapes: tuple[int, ...], groups: int = 1, **tensors: torch.Tensor):
    """Forward o and lse and the q, k, v gradients against the oracle, float32 inputs; ``keep`` is the
    oracle's mask, or a function of q and k that selects it."""
    B, H, Sq, Skv, D = shapes
    q = torch.randn(B, H, Sq, D, dtype=torch.float64).float().double()  # values float32 holds exactly
    k, v = (torch.randn(B, H // groups, Skv, D, dtype=torch.float64).float().double() for _ in range(2))
    keep = keep(q, k) if callable(keep) else keep
    leaves = [t.float().requires_grad_() for t in (q, k, v)]
    o, lse = kern(*leaves, return_lse=True, **tensors)
    oracle_in = [t.clone().requires_grad_() for t in (q, k, v)]
    want, want_lse = oracle.attention(*oracle_in, keep, 1 / math.sqrt(D))
    torch.testing.assert_close(o.double(), want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse.double(), want_lse, atol=2e-5, rtol=1e-4)
    assert not o.isnan().any()
    gradients_match(o, leaves, want, oracle_in)
    return o


def gradients_match(
    out: torch.Tensor, leaves: list[torch.Tensor], want: torch.Tensor, ref_in: list[torch.Tensor]
) -> None:
    """The q, k, v gradients of one random cotangent through ``out`` equal the oracle's through ``want``."""
    grad = torch.randn_like(want)
    (out.double() * grad).sum().backward()
    (want * grad).sum().backward()
    for got, ref in zip(leaves, ref_in, strict=True):
        torch.testing.assert_close(got.grad.double(), ref.grad, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("causal", [False, True])
def test_block_indices_fwd_bwd(target: str, causal: bool) -> None:
    B, H, Hkv, Sq, Skv, D, blk = 2, 4, 2, 45, 77, 16, 16
    gen = torch.Generator().manual_seed(1)
    lists = random_lists(B, H, -(-Sq // blk), -(-Skv // blk), 3, gen)
    mask = ac.block_indices(ac.tensor("kv_blocks"), blk)
    fn = listed(lists, blk, blk)
    if causal:
        mask = mask & ac.causal()
        fn = (lambda f: lambda b, h, i, j: f(b, h, i, j) and j <= i)(fn)
    kern = ac.compile(ac.AttentionSpec(num_heads=H, num_kv_heads=Hkv, head_dim=D, mask=mask), target=target)
    assert kern.plan.tiles == (blk, blk)
    keep = oracle.dense(fn, B, H, Sq, Skv)
    o = check(kern, keep, (B, H, Sq, Skv, D), groups=H // Hkv, kv_blocks=lists)
    empty = ~keep.any(-1)
    assert empty.any() and (o[empty] == 0).all()  # query rows with no listed block: zeros, never NaN


@pytest.mark.parametrize("target", TARGETS)
def test_block_indices_shared_rows_and_union(target: str) -> None:
    """A list shared by every batch and head ([1, 1, nq, K]) OR'ed with a window: the map is classified
    tile by tile (not the list's fast path) and still exact."""
    B, H, Sq, Skv, D, blk = 2, 2, 48, 48, 16, 16
    lists = torch.tensor([[[[0, -1], [2, -1], [-1, -1]]]])
    mask = ac.block_indices(ac.tensor("kv_blocks"), blk) | ac.sliding_window(2)
    kern = ac.compile(ac.AttentionSpec(num_heads=H, head_dim=D, mask=mask), target=target)
    fn = listed(lists, blk, blk)
    keep = oracle.dense(lambda b, h, i, j: fn(b, h, i, j) or i - 2 <= j <= i, B, H, Sq, Skv)
    check(kern, keep, (B, H, Sq, Skv, D), kv_blocks=lists)


def test_block_map_read_from_the_list() -> None:
    """The map of a list has exactly the listed tiles (causal: diagonal ones partial), stored sparse."""
    blk, n = 64, 4096
    nq = n // blk
    gen = torch.Generator().manual_seed(2)
    lists = torch.stack([torch.randperm(qb + 1, generator=gen)[:8].sort().values for qb in range(8, nq)])
    lists = torch.cat([torch.full((8, 8), -1), lists]).view(1, 1, nq, 8)
    lists[0, 0, :8, 0] = torch.arange(8)
    spec = ac.AttentionSpec(num_heads=4, head_dim=64, mask=ac.block_indices(ac.tensor("kv_blocks"), blk) & ac.causal())
    bm = ac.compile(spec, target="cpu").block_map(n, n, kv_blocks=lists)
    assert bm.kind == "sparse" and bm.num_maps == 1
    listed_tiles = int((lists >= 0).sum())
    diagonal = int((lists[0, 0] == torch.arange(nq)[:, None]).sum())
    assert (bm.num_computed_blocks, bm.num_partial_blocks) == (listed_tiles, diagonal)
    dense = torch.zeros(nq, nq, dtype=torch.bool)
    for qb in range(nq):
        dense[qb, lists[0, 0, qb][lists[0, 0, qb] >= 0]] = True
    assert torch.equal(bm.to_dense()[0], dense)


@pytest.mark.parametrize(
    ("lists", "message"),
    [
        (torch.tensor([[[[0, 0], [1, -1]]]]), "repeats a kv block in row"),
        (torch.tensor([[[[0, 2], [1, -1]]]]), "entries must lie in \\[-1, 2\\)"),
        (torch.tensor([[[[0, -2], [1, -1]]]]), "holds -2"),
        (torch.tensor([[[[0, -1]]]]), "must be \\[1 or 1, 2 or 1, 2, K\\]"),
        (torch.ones(1, 1, 2, 2, dtype=torch.bool), "is bool"),
        (torch.ones(1, 1, 2, 2), "dtype torch.float32"),
    ],
)
def test_bad_block_lists_are_named(lists: torch.Tensor, message: str) -> None:
    kern = ac.compile(
        ac.AttentionSpec(num_heads=2, head_dim=16, mask=ac.block_indices(ac.tensor("kv_blocks"), 16)), target="cpu"
    )
    x = torch.randn(1, 2, 32, 16)
    with pytest.raises(ac.SpecError, match=message):
        kern(x, x, x, kv_blocks=lists)


# ---- routed blocks: the oracle selects by itself -------------------------------------------------
def grid_region(grid: tuple[int, int], block: tuple[int, int]) -> Callable[[int], int]:
    per_row = -(-grid[1] // block[1])
    return lambda t: (t // grid[1] // block[0]) * per_row + (t % grid[1]) // block[1]


def routed(
    q: torch.Tensor,
    k: torch.Tensor,
    top_k: int,
    region_q: Callable[[int], int],
    region_k: Callable[[int], int],
    causal: bool,
    include_self: bool,
) -> torch.Tensor:
    """The oracle's routed mask: its own pooling (Python sums per region) and its own ranking."""
    B, H, Sq, _ = q.shape
    Skv, groups = k.shape[2], H // k.shape[1]
    rq, rk = [region_q(i) for i in range(Sq)], [region_k(j) for j in range(Skv)]

    def pooled(x: torch.Tensor, regions: list[int]) -> list[torch.Tensor]:
        return [x[[t for t, r in enumerate(regions) if r == n]].mean(0) for n in range(max(regions) + 1)]

    keep = torch.zeros(B, H, Sq, Skv, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            pq, pk = pooled(q[b, h], rq), pooled(k[b, h // groups], rk)
            for qb, a in enumerate(pq):
                ranked = [(math.inf if include_self and kb == qb else float(a @ c), kb) for kb, c in enumerate(pk)]
                ranked = sorted(x for x in ranked if not (causal and x[1] > qb))[::-1][:top_k]
                chosen = {kb for _, kb in ranked}
                for i in (i for i in range(Sq) if rq[i] == qb):
                    for j in range(Skv):
                        keep[b, h, i, j] = rk[j] in chosen and (not causal or j <= i)
    return keep


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("causal", [False, True])
def test_route_blocks_1d(target: str, causal: bool) -> None:
    """GQA, odd lengths, Sq != Skv, the last blocks short."""
    B, H, Hkv, Sq, Skv, D, blk, top_k = 2, 4, 2, 61, 83, 16, 16, 2
    spec = ac.AttentionSpec(num_heads=H, num_kv_heads=Hkv, head_dim=D,
                            mask=ac.route_blocks(top_k, blk, causal=causal))  # fmt: skip
    kern = ac.compile(spec, target=target)
    region = lambda t: t // blk
    check(kern, lambda q, k: routed(q, k, top_k, region, region, causal, True), (B, H, Sq, Skv, D), groups=H // Hkv)


@pytest.mark.parametrize("target", TARGETS)
def test_calls_of_one_shape_select_their_own_blocks(target: str) -> None:
    """The selected lists depend on each call's q and k, not on its shape alone: calls of one shape with other q
    and k (with and without gradients) must each walk their own blocks, never an earlier call's lists or records."""
    B, H, Sq, Skv, D, blk, top_k = 1, 2, 40, 70, 16, 16, 2
    kern = ac.compile(ac.AttentionSpec(num_heads=H, head_dim=D, mask=ac.route_blocks(top_k, blk)), target=target)
    region = lambda t: t // blk
    keep = lambda q, k: routed(q, k, top_k, region, region, False, True)
    for _ in range(2):
        check(kern, keep, (B, H, Sq, Skv, D))
    for _ in range(2):
        q, k, v = (torch.randn(B, H, n, D, dtype=torch.float64).float() for n in (Sq, Skv, Skv))
        with torch.no_grad():
            o = kern(q, k, v)
        want, _ = oracle.attention(q.double(), k.double(), v.double(), keep(q.double(), k.double()), 1 / math.sqrt(D))
        torch.testing.assert_close(o.double(), want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("target", TARGETS)
def test_route_blocks_on_a_grid(target: str) -> None:
    """BiFormer: 2-d regions of a 6 x 8 row-major token grid (reordered region-major for the kernel), no own
    block forced."""
    grid, block, top_k, D = (6, 8), (3, 4), 2, 16
    spec = ac.AttentionSpec(num_heads=2, head_dim=D,
                            mask=ac.route_blocks(top_k, block, grid=grid, include_self=False))  # fmt: skip
    kern = ac.compile(spec, target=target)
    region = grid_region(grid, block)
    n = grid[0] * grid[1]
    check(kern, lambda q, k: routed(q, k, top_k, region, region, False, False), (1, 2, n, n, D))


def test_routed_map_and_ir() -> None:
    """The selection is an attn.select op in the IR; the map it selects has top_k tiles per query block."""
    spec = ac.AttentionSpec(num_heads=2, head_dim=16, mask=ac.route_blocks(3, 32))
    kern = ac.compile(spec, target="cpu")
    assert "attn.select %q, %k" in kern.ir and "top_k = 3" in kern.ir
    q, k = torch.randn(1, 2, 256, 16), torch.randn(1, 2, 256, 16)
    bm = kern.block_map(256, 256, q=q, k=k)
    assert bm.kind == "sparse" and (bm.num_computed_blocks, bm.num_full_blocks) == (2 * 8 * 3, 2 * 8 * 3)
    assert (bm.to_dense().sum(-1) == 3).all() and bm.to_dense().diagonal(dim1=1, dim2=2).all()
    with pytest.raises(ac.SpecError, match="depends on q and k"):
        kern.block_map(256, 256)


# ---- runtime head tables (KDGQA / DGQA) -----------------------------------------------------------
@pytest.mark.parametrize("target", TARGETS)
def test_kv_head_table(target: str) -> None:
    """Uneven dynamic groups (8 query heads on 3 kv heads, one kv head unused), causal, Sq != Skv."""
    B, H, Hkv, Sq, Skv, D = 2, 8, 3, 37, 53, 16
    table = torch.tensor([2, 0, 2, 2, 0, 2, 0, 2])  # kv head 1 serves no query head
    spec = ac.AttentionSpec(num_heads=H, num_kv_heads=Hkv, head_dim=D, mask=ac.causal(align="bottom_right"),
                            kv_head_of=ac.tensor("kv_head_of"))  # fmt: skip
    kern = ac.compile(spec, target=target)
    assert 'heads = "kv_head_of"' in kern.ir
    q = torch.randn(B, H, Sq, D, dtype=torch.float64).float().double()
    k, v = (torch.randn(B, Hkv, Skv, D, dtype=torch.float64).float().double() for _ in range(2))
    leaves = [t.float().requires_grad_() for t in (q, k, v)]
    o, lse = kern(*leaves, return_lse=True, kv_head_of=table)
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    kk, vv = (t.index_select(1, table) for t in ref_in[1:])  # the oracle gathers: head h reads table[h]
    keep = oracle.dense(oracle.causal_bottom_right(Sq, Skv), B, H, Sq, Skv)
    want, want_lse = oracle.attention(ref_in[0], kk, vv, keep, 1 / math.sqrt(D))
    torch.testing.assert_close(o.double(), want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse.double(), want_lse, atol=2e-5, rtol=1e-4)
    gradients_match(o, leaves, want, ref_in)
    assert (leaves[1].grad[:, 1] == 0).all() and (leaves[2].grad[:, 1] == 0).all()


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (torch.tensor([0, 1, 2, 0]), "names kv head 2; the spec has 2"),
        (torch.tensor([0, -1, 1, 0]), "names kv head -1"),
        (torch.tensor([0, 1, 1]), "must be int \\[4\\]"),
        (torch.tensor([0.0, 1.0, 1.0, 0.0]), "dtype torch.float32"),
    ],
)
def test_bad_head_tables_are_named(table: torch.Tensor, message: str) -> None:
    spec = ac.AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=8, kv_head_of=ac.tensor("kv_head_of"))
    kern = ac.compile(spec, target="cpu")
    q, kv = torch.randn(1, 4, 16, 8), torch.randn(1, 2, 16, 8)
    with pytest.raises(ac.SpecError, match=message):
        kern(q, kv, kv, kv_head_of=table)


def test_head_tables_refuse_head_sharding() -> None:
    spec = ac.AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=8, kv_head_of=ac.tensor("kv_head_of"))
    with pytest.raises(ac.SpecError, match="known only at call time"):
        ac.shard_heads(spec, 2, 64)


def test_dump_draws_the_selected_map(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    kern = ac.compile(ac.AttentionSpec(num_heads=2, head_dim=16, mask=ac.route_blocks(2, 16, causal=True)), "cpu")
    x = torch.randn(1, 2, 64, 16)
    kern(x, x, x)
    out = kern.dump(tmp_path)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["block_map"].startswith("sparse block map 4x4 tiles of 16x16") and (out / "blockmap.png").exists()
    assert "attn.select" in (out / "00-input.ir").read_text()


@pytest.mark.parametrize("target", TARGETS)
def test_everything_composed(target: str) -> None:
    """A routed selection AND a user list, OR sinks, under a softcap, with a runtime head table (uneven groups):
    the map is classified tile by tile; the oracle builds each part itself."""
    B, H, Hkv, S, D, blk = 1, 4, 3, 70, 16, 16
    table = torch.tensor([2, 0, 0, 1])
    gen = torch.Generator().manual_seed(3)
    lists = random_lists(1, H, -(-S // blk), -(-S // blk), 4, gen)
    mask = (ac.route_blocks(2, blk, causal=True) & ac.block_indices(ac.tensor("kv_blocks"), blk)) | ac.sinks(4)
    spec = ac.AttentionSpec(num_heads=H, num_kv_heads=Hkv, head_dim=D, mask=mask, score_mod=ac.softcap(5.0),
                            kv_head_of=ac.tensor("kv_head_of"))  # fmt: skip
    kern = ac.compile(spec, target=target)
    q = torch.randn(B, H, S, D, dtype=torch.float64).float().double()
    k, v = (torch.randn(B, Hkv, S, D, dtype=torch.float64).float().double() for _ in range(2))
    leaves = [t.float().requires_grad_() for t in (q, k, v)]
    o = kern(*leaves, kv_blocks=lists, kv_head_of=table)
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    kk, vv = (t.index_select(1, table) for t in ref_in[1:])
    region = lambda t: t // blk
    chosen = routed(q, kk.detach(), 2, region, region, True, True)
    fn = listed(lists, blk, blk)
    keep = (chosen & oracle.dense(fn, B, H, S, S)) | oracle.dense(lambda b, h, i, j: j < 4, B, H, S, S)
    want, _ = oracle.attention(ref_in[0], kk, vv, keep, 1 / math.sqrt(D), lambda s: 5.0 * torch.tanh(s / 5.0))
    torch.testing.assert_close(o.double(), want, atol=2e-5, rtol=1e-4)
    gradients_match(o, leaves, want, ref_in)


def test_restricted_specs_refuse_what_they_cannot_keep() -> None:
    """Head and sequence sharding rebuild the spec: a routed selection needs the whole q and k, and a head
    table's groups are known only at call time; both are refused with the reason, never dropped."""
    from attncc.spec import at_positions, for_heads

    routed_spec = ac.AttentionSpec(num_heads=2, head_dim=8, mask=ac.route_blocks(2, 16))
    with pytest.raises(ac.SpecError, match="select first and pass the lists"):
        at_positions(routed_spec, 64, 64)
    table_spec = ac.AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=8, kv_head_of=ac.tensor("kv_head_of"))
    with pytest.raises(ac.SpecError, match="cannot be split"):
        for_heads(table_spec, [0, 1])
    assert at_positions(table_spec, 64, 64).head_table == "kv_head_of"  # a sequence shard keeps the table
