"""The KernelPlan: frozen, printable, the one place band ranges come from, read by every target."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import sympy
import torch

import attncc as ac
from attncc.ir import exprs as X
from attncc.ir.core import Graph, Value
from attncc.ir.ops import HeadShardOp, ReturnOp
from attncc.plan import KernelPlan, lower
from tests.numerics.brute import dense_mask, tile_states

BANDED = {
    "causal": ac.causal(),
    "causal_bottom_right": ac.causal("bottom_right"),
    "sliding_window": ac.sliding_window(37),
    "window_both_sides": ac.sliding_window(9, 14),
    "prefix_lm": ac.prefix_lm(50),
    "sinks_or_window": ac.sinks(4) | ac.sliding_window(20),
    "causal_and_window": ac.causal() & ac.sliding_window(45),
    "per_head_windows": ac.sliding_window(ac.per_head([1, 30, 70, 200], name="w")),
}
TILES = (16, 32)


def _value(expr: sympy.Basic, plan: KernelPlan, head: int, sizes: dict[sympy.Symbol, int]) -> int:
    tables = {t.tensor: t.values for t in plan.tensors if t.values}
    fixed = expr.xreplace({a: sympy.Float(tables[str(a.base)][head]) for a in expr.atoms(sympy.Indexed)})
    return int(fixed.subs({**sizes, X.h: head}))


CASES = [(n, ls) for n in BANDED for ls in [(128, 128), (100, 150), (150, 90)] if n != "prefix_lm" or ls[0] == ls[1]]


@pytest.mark.parametrize("name,lengths", CASES)
def test_closed_form_band_ranges_agree_with_the_block_map_and_are_sound(name: str, lengths: tuple[int, int]) -> None:
    """The triton target walks plan.bands in closed form; cpu and block_map() walk the tiling's lists.
    Both come from the plan: both are sound by brute force, and they agree where the lengths are whole
    tiles (at a ragged end the closed form can add a tile past Skv that holds no visible pair)."""
    sq, skv = lengths  # (prefix_lm needs equal lengths)
    spec = ac.AttentionSpec(num_heads=4, head_dim=16, mask=BANDED[name])
    plan = ac.compile(spec, target="reference", tiles=TILES).plan
    assert plan.layout == "banded" and plan.bands
    bm = plan.block_map(sq, skv).states()[0]
    bm = bm if bm.shape[0] == 4 else np.repeat(bm, 4, 0)
    tables = {t.tensor: torch.tensor(t.values) for t in plan.tensors if t.values}
    truth = tile_states(dense_mask(plan.mask, sq, skv, 4, tables), TILES)
    nq, nkv = truth.shape[1:]
    for head in range(4):
        for qb in range(nq):
            sizes = {X.Sq: sq, X.Skv: skv, X.qb: qb}
            computed, full = np.zeros(nkv, bool), np.zeros(nkv, bool)
            for b in plan.bands:
                lo, hi = (max(0, min(nkv - 1, _value(e, plan, head, sizes))) for e in b.computed)
                flo, fhi = (_value(e, plan, head, sizes) for e in b.full)
                if _value(b.computed[1], plan, head, sizes) >= 0 and _value(b.computed[0], plan, head, sizes) < nkv:
                    computed[lo : hi + 1] = True
                full[max(0, flo) : max(0, min(nkv - 1, fhi) + 1)] = True
            row = truth[head, qb]
            where = f"{name} {lengths} head {head} q-block {qb}"
            assert not ((row > 0) & ~computed).any(), f"{where}: a tile with a visible pair is not computed"
            assert not (full & (row != 2)).any(), f"{where}: a tile claimed full hides a pair"
            assert not ((bm[head, qb] > 0) & ~computed).any(), f"{where}: the block map computes more"
            if sq % TILES[0] == 0 and skv % TILES[1] == 0:  # ragged ends: the closed form may add empty tiles
                assert (computed == (bm[head, qb] > 0)).all(), f"{where}: closed form and block map disagree"


def test_the_plan_is_frozen_hashable_and_shared_by_the_targets() -> None:
    spec = ac.AttentionSpec(num_heads=2, head_dim=16, mask=ac.causal(), score_mod=ac.softcap(5.0))
    kern = ac.compile(spec, target="cpu", tiles=(32, 32))
    plan = kern.plan
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.scale = 1.0  # type: ignore[misc]
    again = lower(kern.graph)
    assert again == plan and hash(again) == hash(plan)
    assert kern.cpu_kernel().source.count("5*tanh(score/5)") >= 1 and "d/d score" in str(plan)
    assert ac.compile(spec, target="reference", tiles=(32, 32)).plan == plan  # the plan does not depend on the target
    assert str(plan).splitlines()[0] == "plan @attention"


def test_plan_lists_the_runtime_interface_learned_tables_and_their_derivatives() -> None:
    mod = ac.score + ac.tensor("bias")[ac.h, ac.q - ac.kv + 8] * 2
    spec = ac.AttentionSpec(num_heads=2, head_dim=8, mask=ac.document(ac.tensor("doc")), score_mod=mod)
    plan = ac.compile(spec, target="reference").plan
    assert [(t.tensor, t.dtype, t.ndim) for t in plan.tensors] == [("bias", "float", 2), ("doc", "int", 1)]
    assert plan.grad_tables == ("bias",) and plan.layout == "runtime" and not plan.static
    ((name, reads),) = plan.table_derivatives
    assert name == "bias" and [str(d) for _, d in reads] == ["2"]
    text = str(plan)
    assert "doc: int 1-d (runtime)" in text and "bias: float 2-d (learned: gradient returned)" in text


def test_head_placement_comes_from_a_head_shard_op() -> None:
    kern = ac.compile(ac.AttentionSpec(num_heads=4, head_dim=8, mask=ac.causal()), target="reference")
    ops = list(kern.graph.ops)
    ret = ops[-1]
    assert isinstance(ret, ReturnOp)
    shard = HeadShardOp(Value("o2", ret.out.shape), ret.out, world=2, owner=(0, 1, 1, 0))
    graph = Graph(kern.graph.name, (*ops[:-1], shard, ReturnOp(None, shard.result)))  # type: ignore[arg-type]
    graph.verify()
    plan = lower(graph)
    assert plan.owner == (0, 1, 1, 0) and kern.plan.owner is None
    assert "rank 0: [0, 3]; rank 1: [1, 2]" in str(plan) and "all on one device" in str(kern.plan)


def test_lowering_an_unfused_graph_says_which_pass_is_missing() -> None:
    from attncc.lower import spec_to_ir

    graph = spec_to_ir(ac.AttentionSpec(num_heads=2, head_dim=8))
    with pytest.raises(ac.errors.LoweringError, match="run the 'fuse' pass"):
        lower(graph)
