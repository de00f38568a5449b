"""The head-shard pass: place query heads on ``world`` ranks, balanced by their proven work.

before:
    %o = attn.tiled %q, %k, %v {groups = 2, ...} : [B, 8, Sq, 64]
    attn.return %o
after (world = 2):
    %o = attn.tiled %q, %k, %v {groups = 2, ...} : [B, 8, Sq, 64]
    %o1 = attn.head_shard %o {world = 2, owner = [0, 0, 1, 1, 1, 1, 0, 0]}
    attn.return %o1

Each head's cost comes from the block map at ``q_len`` x ``kv_len`` (full tiles, and partial tiles
weighted by the target's :data:`attncc.analysis.costmodel.PARTIAL_COST`), so heads with different
windows or per-head masks are balanced by the work they really do, not by their number. A GQA group (a kv
head and its query heads) stays on one rank. Every rank gets the same number of groups (PyTorch's tensor
parallelism splits heads evenly). A mask that reads runtime tensors is costed as dense here; ``ac.shard_heads(...,
**runtime)`` balances with the tensors' values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import sympy

from attncc.analysis import costmodel, tiling
from attncc.analysis.blockmap import BlockMap
from attncc.errors import SpecError, UnsupportedError
from attncc.ir.core import Graph, Op, Value
from attncc.ir.ops import AttentionOp, HeadShardOp, ReturnOp, TensorOp, TiledOp
from attncc.passes.base import Pass


def group_owner(head_costs: np.ndarray, num_kv_heads: int, world: int) -> tuple[int, ...]:
    """The rank of every query head: groups of ``len(head_costs) // num_kv_heads`` consecutive heads (one kv
    head's) balanced over ``world`` ranks, the same number of groups on each; a clear error when impossible."""
    if world < 1:
        raise SpecError(f"head sharding needs world >= 1, got {world}")
    if num_kv_heads % world:
        raise SpecError(
            f"{num_kv_heads} kv-head groups cannot be split evenly over {world} ranks (a group's query heads "
            "share its kv head and stay on one rank); use a world size that divides the number of kv heads, or "
            "split the sequence instead"
        )
    groups = len(head_costs) // num_kv_heads
    group_costs = head_costs.reshape(num_kv_heads, groups).sum(1)
    per_group = costmodel.balance(list(map(float, group_costs)), world)
    return tuple(per_group[h // groups] for h in range(len(head_costs)))


def dense_map(q_len: int, kv_len: int, tiles: tuple[int, int]) -> BlockMap:
    nq, nkv = -(-q_len // tiles[0]), -(-kv_len // tiles[1])
    return BlockMap.listed(tiles, q_len, kv_len, np.ones((1, nq, nkv), np.int8), np.zeros((1, 1), np.int64))


@dataclass(frozen=True)
class HeadShard(Pass):
    """Write ``attn.head_shard`` after the attention: which rank computes each query head."""

    name: ClassVar[str] = "head-shard"
    world: int = 2
    q_len: int = 4096
    kv_len: int = 0  # 0: q_len
    target: str = "cpu"  # whose partial-tile cost weighs the map

    def run(self, graph: Graph) -> Graph:
        (op,) = (o for o in graph.ops if isinstance(o, AttentionOp))
        assert isinstance(op, AttentionOp) and op.result is not None
        if op.heads:
            raise UnsupportedError(
                f"head-shard: {op.result} reads kv heads through the runtime table {op.heads!r}, so which query "
                "heads share a kv head is known only at call time; shard a spec without kv_head_of"
            )
        heads, kv_heads = (int(op.q.shape[1]), int(op.k.shape[1]))
        kv_len = self.kv_len or self.q_len
        tiles = (op.bq, op.bkv) if isinstance(op, TiledOp) else (64, 64)
        tensors = [t for t in graph.ops_of(TensorOp) if isinstance(t, TensorOp)]
        if any(not t.values for t in tensors if str(t.tensor) in {str(a.base) for a in op.mask.atoms(sympy.Indexed)}):
            bm = dense_map(self.q_len, kv_len, tiles)  # runtime tensors: no values to cost with here
        else:
            rec = tiling.recipe(op.mask, {t.tensor: np.asarray(t.values) for t in tensors if t.values})
            bm = tiling.build(rec, self.q_len, kv_len, tiles, heads, 1)
        owner = group_owner(costmodel.head_costs(bm, heads, self.target), kv_heads, self.world)
        ret = graph.ops[-1]
        assert isinstance(ret, ReturnOp)
        shard = HeadShardOp(Value(f"{ret.out.name}_sharded", ret.out.shape), ret.out, self.world, owner)
        ops: list[Op] = [*graph.ops[:-1], shard, ReturnOp(None, shard.result)]  # type: ignore[arg-type]
        return Graph(graph.name, tuple(ops))
