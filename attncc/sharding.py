"""Head placement across ranks, balanced by each head's proven work: ``ac.shard_heads``.

>>> import attncc as ac
>>> windows = ac.per_head([16, 16, 16, 16, 1024, 1024, 1024, 1024], name="window")
>>> spec = ac.AttentionSpec(num_heads=8, head_dim=64, mask=ac.sliding_window(windows))
>>> plan = ac.shard_heads(spec, 2, 2048, 2048)
>>> plan.heads_of(0), plan.heads_of(1)       # each rank gets two narrow and two wide heads
([0, 2, 4, 6], [1, 3, 5, 7])
>>> round(plan.imbalance, 3), round(plan.naive_imbalance, 3)   # vs heads 0-3 | 4-7
(1.0, 1.684)

The plan is what :class:`attncc.distributed.ShardedAttention` executes on torch.distributed (each rank its
heads, with their global indices), and what the ``head-shard`` pass writes into the IR for a fixed length.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from attncc.analysis import costmodel
from attncc.api import compile as compile_spec
from attncc.errors import SpecError
from attncc.passes.head_shard import group_owner
from attncc.spec import AttentionSpec


@dataclass(frozen=True)
class ShardPlan:
    """Which rank computes which query heads, and the predicted cost of each rank (in full-tile units)."""

    world_size: int
    num_heads: int
    num_kv_heads: int
    owner: tuple[int, ...]  # rank of each query head
    head_costs: tuple[float, ...]
    partial_cost: float = 1.0  # the weight of a partial tile in head_costs (the target's)

    def heads_of(self, rank: int) -> list[int]:
        """The global query-head indices ``rank`` computes (ascending)."""
        self._check(rank)
        return [h for h, r in enumerate(self.owner) if r == rank]

    def kv_heads_of(self, rank: int) -> list[int]:
        """The kv heads ``rank`` reads (its groups' kv heads)."""
        groups = self.num_heads // self.num_kv_heads
        return sorted({h // groups for h in self.heads_of(rank)})

    def cost_of(self, rank: int) -> float:
        return float(sum(self.head_costs[h] for h in self.heads_of(rank)))

    @property
    def imbalance(self) -> float:
        """The largest rank's cost over the mean (1.0 is perfect)."""
        return _imbalance([self.cost_of(r) for r in range(self.world_size)])

    @property
    def naive_imbalance(self) -> float:
        """The same figure for the contiguous split (heads 0..H/N-1 on rank 0, ...), for comparison."""
        per = self.num_heads // self.world_size
        return _imbalance([sum(self.head_costs[r * per : (r + 1) * per]) for r in range(self.world_size)])

    @property
    def permutation(self) -> list[int]:
        """Global query heads rank by rank: reorder a model's heads (q/k/v and output projections) by this and
        PyTorch's contiguous tensor-parallel split gives every rank this plan's heads."""
        return [h for r in range(self.world_size) for h in self.heads_of(r)]

    def _check(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise SpecError(f"rank {rank} outside [0, {self.world_size})")

    def __str__(self) -> str:
        lines = [f"head placement over {self.world_size} ranks (cost: full tiles + partial tiles x "
                 f"{self.partial_cost:g})"]  # fmt: skip
        for r in range(self.world_size):
            lines.append(
                f"  rank {r}: heads {self.heads_of(r)}, kv heads {self.kv_heads_of(r)}, cost {self.cost_of(r):g}"
            )
        lines.append(f"  imbalance {self.imbalance:.3f} (contiguous split: {self.naive_imbalance:.3f})")
        return "\n".join(lines)


def _imbalance(loads: list[float]) -> float:
    mean = float(np.mean(loads))
    return float(max(loads) / mean) if mean > 0 else 1.0


def shard_heads(
    spec: AttentionSpec,
    world_size: int,
    q_len: int,
    kv_len: int | None = None,
    target: str = "cpu",
    **runtime: torch.Tensor,
) -> ShardPlan:
    """Place ``spec``'s query heads on ``world_size`` ranks so that their proven work is balanced (see the
    module docstring), partial tiles weighted by ``target``'s measured cost. Runtime tensors the mask reads
    are passed by name, as for a call."""
    if spec.head_table:
        raise SpecError(
            f"shard_heads: the spec reads kv heads through the runtime table {spec.head_table!r}; which query heads "
            "share a kv head is known only at call time, so whole groups cannot be placed; shard without kv_head_of"
        )
    kern = compile_spec(spec, target="reference")
    bm = kern.block_map(q_len, kv_len or q_len, **runtime)
    costs = costmodel.head_costs(bm, spec.num_heads, target)
    owner = group_owner(costs, kern.plan.num_kv_heads, world_size)
    return ShardPlan(world_size, spec.num_heads, kern.plan.num_kv_heads, owner, tuple(map(float, costs)),
                     costmodel.partial_cost(target))  # fmt: skip
