"""Attention over several processes on ``torch.distributed``: split by heads, or by the sequence.

**Heads** (tensor parallelism). :func:`attncc.shard_heads` places query heads on ranks, balanced by each
head's proven work; :class:`ShardedAttention` runs one rank's heads, each with its *global* index (per-head
windows, ALiBi slopes and head-indexed tensors stay right), differentiably. Outputs stay sharded (for a
row-parallel output projection) or are gathered with :func:`gather_heads`. :func:`permute_heads` reorders
a model's projection weights by head blocks so that PyTorch's contiguous column/row-parallel split hands
every rank exactly the plan's heads.

**Sequence** (context parallelism). :func:`sequence_layout` cuts the queries and keys into chunks, gives
every rank the same number of chunks (contiguous when that is balanced, else balanced by the block map's
cost: the causal case gets the zig-zag-like split) and reads off the block map which key/value chunks each
rank's queries ever see. :class:`SequenceParallelAttention` fetches exactly those chunks from their owners
(point-to-point), computes its queries at their global positions, and in the backward returns the key/value
gradients to their owners. A sliding window talks to its neighbours only; a full ring would send every
chunk to every rank.

The same code runs on gloo (CPU) and NCCL (GPU). Single process, a world of one, for a quick look:

>>> import os, tempfile, torch, torch.distributed as dist
>>> import attncc as ac
>>> init = "file://" + os.path.join(tempfile.mkdtemp(), "pg")
>>> dist.init_process_group("gloo", init_method=init, rank=0, world_size=1)
>>> spec = ac.AttentionSpec(num_heads=4, head_dim=16, mask=ac.causal(), score_mod=ac.alibi())
>>> plan = ac.shard_heads(spec, 1, 128)
>>> att = ac.distributed.ShardedAttention(spec, plan, target="reference")
>>> q, k, v = (torch.randn(1, 4, 128, 16) for _ in range(3))
>>> out = ac.distributed.gather_heads(att(q, k, v), plan)
>>> torch.allclose(out, ac.compile(spec, target="reference")(q, k, v), atol=1e-6)
True
>>> dist.destroy_process_group()
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import sympy
import torch
import torch.distributed as dist

from attncc.analysis import costmodel
from attncc.analysis.blockmap import EMPTY, FULL, PARTIAL
from attncc.api import compile as compile_spec
from attncc.errors import SpecError
from attncc.ir import exprs as X
from attncc.sharding import ShardPlan
from attncc.spec import KV_POS, Q_POS, AttentionSpec, at_positions, for_heads

log = logging.getLogger("attncc.distributed")

ProcessGroup = Any  # torch.distributed.ProcessGroup, or None for the default group


def _rank_world(group: ProcessGroup) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise SpecError(
            "attncc.distributed needs an initialized process group: call torch.distributed.init_process_group "
            "(torchrun sets the environment for it) before building sharded attention"
        )
    return dist.get_rank(group), dist.get_world_size(group)


class _ReduceGrad(torch.autograd.Function):
    """Identity forward; the backward sums the gradient over the ranks (each rank saw only its share of a
    replicated tensor's uses, e.g. a learned bias read by its own heads or its own rows)."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return t.view_as(t)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _reduced(runtime: dict[str, torch.Tensor], group: ProcessGroup) -> dict[str, torch.Tensor]:
    return {n: _ReduceGrad.apply(t, group) if t.requires_grad else t for n, t in runtime.items()}


# ---- heads ------------------------------------------------------------------------------------------------


class ShardedAttention(torch.nn.Module):
    """This rank's query heads of ``spec`` under ``plan``: ``att(q_local, k_local, v_local, **runtime)`` with
    ``q_local = q[:, plan.heads_of(rank)]`` and ``k_local = k[:, plan.kv_heads_of(rank)]`` (likewise v)
    returns ``out[:, plan.heads_of(rank)]``, differentiable. Runtime tensors are passed whole (global head
    and position indexing); the gradients of learned ones are summed over the ranks, so every rank holds the
    single-process gradient. A DTensor sharded on dim 1 (heads in ``plan.permutation`` order, as
    :func:`permute_heads` arranges) is accepted and the output is returned sharded the same way.
    """

    def __init__(self, spec: AttentionSpec, plan: ShardPlan, target: str = "auto", group: ProcessGroup = None,
                 **compile_options: Any) -> None:  # fmt: skip
        super().__init__()
        rank, world = _rank_world(group)
        if world != plan.world_size or spec.num_heads != plan.num_heads:
            raise SpecError(
                f"the plan is for {plan.num_heads} heads on {plan.world_size} ranks but the spec has "
                f"{spec.num_heads} heads and the process group {world} ranks; make the plan with "
                "ac.shard_heads(spec, dist.get_world_size(), ...)"
            )
        self.spec, self.plan, self.group, self.rank = spec, plan, group, rank
        self.heads, self.kv_heads = plan.heads_of(rank), plan.kv_heads_of(rank)
        self.kernel = compile_spec(for_heads(spec, self.heads), target=target, **compile_options)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, return_lse: bool = False,
                **runtime: torch.Tensor) -> Any:  # fmt: skip
        dtensor = _dtensor_parts(q)
        if dtensor is not None:
            q, k, v = (_local(t) for t in (q, k, v))
        for name, t, want in (("q", q, self.heads), ("k", k, self.kv_heads), ("v", v, self.kv_heads)):
            if t.dim() != 4 or t.shape[1] != len(want):
                raise SpecError(
                    f"rank {self.rank}: {name} has shape {tuple(t.shape)} but this rank computes heads {want} "
                    f"(dim 1 must be {len(want)}); pass {name}[:, {want}] (see ac.distributed.local_heads)"
                )
        out = self.kernel(q, k, v, return_lse=return_lse, **_reduced(runtime, self.group))
        if dtensor is not None:
            mesh, placements = dtensor
            from torch.distributed.tensor import DTensor

            return DTensor.from_local(out, mesh, placements, run_check=False)
        return out


def _dtensor_parts(t: torch.Tensor) -> tuple[Any, Any] | None:
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # pragma: no cover - torch without DTensor
        return None
    if not isinstance(t, DTensor):
        return None
    if t.device_mesh.ndim != 1 or t.placements != (Shard(1),):
        raise SpecError(
            f"a DTensor input must be sharded on the head dimension over a 1-D mesh (placements (Shard(1),)), "
            f"got {t.placements} on a {t.device_mesh.ndim}-D mesh; redistribute it first"
        )
    return t.device_mesh, t.placements


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def local_heads(x: torch.Tensor, plan: ShardPlan, rank: int | None = None, kv: bool = False) -> torch.Tensor:
    """``x[:, heads]`` for ``rank``'s query heads (``kv=True``: its kv heads); rank defaults to this process."""
    rank = dist.get_rank() if rank is None else rank
    return x[:, plan.kv_heads_of(rank) if kv else plan.heads_of(rank)]


class _GatherHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, plan: ShardPlan, group: ProcessGroup) -> torch.Tensor:
        rank, world = _rank_world(group)
        ctx.heads = plan.heads_of(rank)
        parts = [torch.empty_like(out) for _ in range(world)]
        dist.all_gather(parts, out.contiguous(), group=group)
        full = out.new_empty(out.shape[0], plan.num_heads, *out.shape[2:])
        for r, part in enumerate(parts):
            full[:, plan.heads_of(r)] = part
        return full

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return grad[:, ctx.heads].contiguous(), None, None


def gather_heads(out_local: torch.Tensor, plan: ShardPlan, group: ProcessGroup = None) -> torch.Tensor:
    """Every rank's heads put back in global order: ``[B, H, Sq, D]`` on every rank. Differentiable as in
    tensor parallelism: every rank computes the same thing downstream, and the backward keeps this rank's heads
    of the incoming gradient."""
    return _GatherHeads.apply(out_local, plan, group)


def permute_heads(weight: torch.Tensor, plan: ShardPlan, head_dim: int, dim: int = 0, kv: bool = False) -> torch.Tensor:
    """Reorder ``weight``'s head blocks (``head_dim`` wide along ``dim``) rank by rank, so that a contiguous split
    in ``world_size`` parts gives rank r the heads ``plan.heads_of(r)`` (``kv=True``: ``kv_heads_of``).

    For q/k/v projections ``nn.Linear(hidden, heads * head_dim)`` permute ``weight`` (and ``bias``) along
    dim 0; for the output projection ``nn.Linear(heads * head_dim, hidden)`` along dim 1. PyTorch's
    ``ColwiseParallel`` / ``RowwiseParallel`` then need no change.

    >>> import attncc as ac
    >>> spec = ac.AttentionSpec(num_heads=4, head_dim=1, mask=ac.sliding_window(ac.per_head([1, 1, 9, 9], "w")))
    >>> plan = ac.shard_heads(spec, 2, 64)
    >>> plan.permutation, permute_heads(torch.arange(4.0), plan, head_dim=1).tolist()
    ([0, 2, 1, 3], [0.0, 2.0, 1.0, 3.0])
    """
    order = [h for r in range(plan.world_size) for h in plan.kv_heads_of(r)] if kv else plan.permutation
    heads = plan.num_kv_heads if kv else plan.num_heads
    dim = dim % weight.dim()
    if weight.shape[dim] != heads * head_dim:
        raise SpecError(
            f"weight of shape {tuple(weight.shape)} has {weight.shape[dim]} entries along dim {dim}, not "
            f"{heads} heads x head_dim {head_dim}"
        )
    blocks = weight.unflatten(dim, (heads, head_dim))
    return blocks.index_select(dim, torch.tensor(order, device=weight.device)).flatten(dim, dim + 1)


# ---- sequence ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SequenceLayout:
    """Which rank owns which query/key chunks, which key chunks each query chunk needs, and the cost of each
    query chunk (full + partial tiles x the target's partial-tile cost) — all read off the block map."""

    world_size: int
    q_len: int
    kv_len: int
    chunk_q: int
    chunk_kv: int
    owner: tuple[int, ...]  # rank of chunk c (query chunk c and key/value chunk c)
    needs: tuple[tuple[int, ...], ...]  # kv chunks query chunk c sees
    costs: tuple[float, ...]
    batch: int | None = None  # the batch size the layout is valid for, when the mask depends on b
    fingerprint: str = ""  # of the runtime tensors the mask read when the layout was made

    @property
    def num_chunks(self) -> int:
        return len(self.owner)

    def chunks_of(self, rank: int) -> list[int]:
        return [c for c, r in enumerate(self.owner) if r == rank]

    def _span(self, c: int, size: int, length: int) -> range:
        return range(c * size, min((c + 1) * size, length))

    def q_positions(self, rank: int) -> torch.Tensor:
        """Global query rows of ``rank``, in the order its ``q_local`` holds them (its chunks ascending)."""
        return torch.tensor([p for c in self.chunks_of(rank) for p in self._span(c, self.chunk_q, self.q_len)])

    def kv_positions(self, rank: int) -> torch.Tensor:
        """Global key/value rows ``rank`` holds (``k_local``, ``v_local``)."""
        return torch.tensor([p for c in self.chunks_of(rank) for p in self._span(c, self.chunk_kv, self.kv_len)])

    def kv_chunks_needed(self, rank: int) -> list[int]:
        """Key/value chunks (own and fetched) ``rank``'s queries see; never empty."""
        need = sorted({c for q in self.chunks_of(rank) for c in self.needs[q]})
        return need or self.chunks_of(rank)[:1]

    def transfers(self) -> list[tuple[int, int, int]]:
        """(chunk, from rank, to rank) for every key/value chunk that travels, in one global order."""
        return [(c, self.owner[c], r) for r in range(self.world_size) for c in self.kv_chunks_needed(r)
                if self.owner[c] != r]  # fmt: skip

    def rows_sent(self, rank: int) -> int:
        """Key/value rows ``rank`` sends in the forward (the backward returns as many gradient rows)."""
        return sum(_rows(self, c) for c, src, _ in self.transfers() if src == rank)

    def rows_received(self, rank: int) -> int:
        """Key/value rows ``rank`` fetches in the forward."""
        return sum(_rows(self, c) for c, _, dst in self.transfers() if dst == rank)

    def ring_rows_sent(self, rank: int) -> int:
        """What a full ring would send: every rank's rows pass to every other rank."""
        return (self.world_size - 1) * len(self.kv_positions(rank))

    def cost_of(self, rank: int) -> float:
        return float(sum(self.costs[c] for c in self.chunks_of(rank)))

    @property
    def imbalance(self) -> float:
        loads = [self.cost_of(r) for r in range(self.world_size)]
        return max(loads) / (sum(loads) / len(loads)) if sum(loads) > 0 else 1.0

    def __str__(self) -> str:
        lines = [f"sequence layout over {self.world_size} ranks: {self.num_chunks} chunks of {self.chunk_q} "
                 f"queries / {self.chunk_kv} keys"]  # fmt: skip
        for r in range(self.world_size):
            lines.append(
                f"  rank {r}: chunks {self.chunks_of(r)}, sees kv chunks {self.kv_chunks_needed(r)}, "
                f"cost {self.cost_of(r):g}, sends {self.rows_sent(r)} kv rows (ring: {self.ring_rows_sent(r)})"
            )
        lines.append(f"  imbalance {self.imbalance:.3f}")
        return "\n".join(lines)


def sequence_layout(
    spec: AttentionSpec,
    world_size: int,
    q_len: int,
    kv_len: int | None = None,
    chunks_per_rank: int = 2,
    target: str = "cpu",
    batch: int | None = None,
    **runtime: torch.Tensor,
) -> SequenceLayout:
    """Cut ``q_len`` queries and ``kv_len`` keys into ``world_size * chunks_per_rank`` chunks and place them
    (see the module docstring). Runtime tensors the mask reads are passed by name, as for a call; a mask that
    depends on the batch index needs ``batch`` (the layout then covers every batch entry, and a call with
    another batch size is refused).

    >>> import attncc as ac
    >>> spec = ac.AttentionSpec(num_heads=2, head_dim=16, mask=ac.causal())
    >>> lay = sequence_layout(spec, 2, 1024)
    >>> lay.chunks_of(0), lay.chunks_of(1), round(lay.imbalance, 3)   # zig-zag: first and last chunk together
    ([0, 3], [1, 2], 1.0)
    >>> lay = sequence_layout(ac.AttentionSpec(num_heads=2, head_dim=16, mask=ac.sliding_window(64, 64)), 4, 4096)
    >>> lay.chunks_of(1), lay.kv_chunks_needed(1), lay.rows_sent(1), lay.ring_rows_sent(1)
    ([2, 3], [1, 2, 3, 4], 1024, 3072)
    """
    kv_len = q_len if kv_len is None else kv_len
    n = world_size * chunks_per_rank
    if world_size < 1 or chunks_per_rank < 1:
        raise SpecError(f"world_size and chunks_per_rank must be >= 1, got {world_size} and {chunks_per_rank}")
    cq, ckv = math.ceil(q_len / n), math.ceil(kv_len / n)
    if (n - 1) * cq >= q_len or (n - 1) * ckv >= kv_len:
        raise SpecError(
            f"{q_len} queries / {kv_len} keys are too short for {n} chunks ({world_size} ranks x "
            f"{chunks_per_rank}); use fewer ranks or chunks_per_rank, or split by heads (ac.shard_heads)"
        )
    per_batch = any(X.b in i.free_symbols for a in spec.mask.atoms(sympy.Indexed) for i in a.indices)
    per_batch = per_batch or X.b in spec.mask.free_symbols
    if per_batch and batch is None:
        raise SpecError(
            f"the mask `{X.expr_str(spec.mask)}` depends on the batch index, so the key/value chunks a rank needs "
            "differ per batch entry; pass batch=B to sequence_layout"
        )
    bm = compile_spec(spec, target="reference").block_map(q_len, kv_len, batch or 1, **runtime)
    bq, bkv = bm.block_size
    states = bm.states()
    work = ((states == FULL) + costmodel.partial_cost(target) * (states == PARTIAL)).sum((0, 1))  # [nq, nkv]
    if states.shape[1] == 1:
        work = work * spec.num_heads  # one map shared by every head
    computed = (states != EMPTY).any((0, 1))
    needs, costs = [], []
    for c in range(n):
        lo, hi = c * cq, min((c + 1) * cq, q_len)
        tiles = range(lo // bq, (hi - 1) // bq + 1)
        seen: set[int] = set()
        for j in np.flatnonzero(computed[list(tiles)].any(0)):
            first, last = int(j) * bkv, min((int(j) + 1) * bkv, kv_len) - 1
            seen.update(range(first // ckv, last // ckv + 1))
        needs.append(tuple(sorted(seen)))
        costs.append(sum(float(work[i].sum()) * (min(hi, (i + 1) * bq) - max(lo, i * bq)) / bq for i in tiles))
    contiguous = tuple(c // chunks_per_rank for c in range(n))
    balanced = costmodel.balance(costs, world_size)
    fixed, seen_with = (batch if per_batch else None), mask_fingerprint(spec, runtime)
    lay = SequenceLayout(world_size, q_len, kv_len, cq, ckv, contiguous, tuple(needs), tuple(costs), fixed, seen_with)
    other = SequenceLayout(world_size, q_len, kv_len, cq, ckv, balanced, tuple(needs), tuple(costs), fixed, seen_with)
    if other.imbalance < lay.imbalance / 1.02:  # contiguous keeps neighbours together; leave it only when it pays
        lay = other
    log.info("attncc: %s", lay)
    return lay


def mask_fingerprint(spec: AttentionSpec, runtime: dict[str, torch.Tensor]) -> str:
    """A digest of the runtime tensors ``spec``'s mask reads (shapes and values): a sequence layout holds
    for the tensors it was made with only."""
    digest = hashlib.sha256()
    for name in sorted(X.tensor_refs(spec.mask)):
        t = runtime.get(name)
        if t is not None:
            digest.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
            digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class _FetchKV(torch.autograd.Function):
    """Forward: this rank's key/value chunks plus the ones its queries need from other ranks, concatenated in
    chunk order. Backward: the fetched chunks' gradients go back to their owners and are summed there."""

    @staticmethod
    def forward(ctx: Any, k: torch.Tensor, v: torch.Tensor, lay: SequenceLayout, rank: int,
                group: ProcessGroup) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        kv = torch.cat([k, v], dim=3)  # one message per chunk: its key and value rows side by side
        own = dict(zip(lay.chunks_of(rank), _split(kv, lay, lay.chunks_of(rank)), strict=True))
        got = _exchange(own, [(c, s, d) for c, s, d in lay.transfers()], rank, group, lay, like=kv)
        need = lay.kv_chunks_needed(rank)
        both = torch.cat([own[c] if c in own else got[c] for c in need], dim=2)
        ctx.lay, ctx.rank, ctx.group, ctx.width = lay, rank, group, k.shape[3]
        return both[..., : k.shape[3]], both[..., k.shape[3] :]

    @staticmethod
    def backward(ctx: Any, gk: torch.Tensor, gv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None, None]:
        lay, rank = ctx.lay, ctx.rank
        need = lay.kv_chunks_needed(rank)
        gkv = torch.cat([gk, gv], dim=3)
        grads = dict(zip(need, _split(gkv, lay, need), strict=True))
        back = [(c, d, s) for c, s, d in lay.transfers()]  # gradients travel the other way
        sent = {c: g for c, g in grads.items() if lay.owner[c] != rank}
        got = _exchange(sent, back, rank, group=ctx.group, lay=lay, like=gkv, accumulate=True)
        mine = lay.chunks_of(rank)
        parts = []
        for c in mine:
            terms = [g for g in (grads.get(c), got.get(c)) if g is not None]
            zero = gkv.new_zeros(*gkv.shape[:2], _rows(lay, c), gkv.shape[3])  # a chunk no query sees
            parts.append(sum(terms[1:], terms[0]) if terms else zero)
        total = torch.cat(parts, dim=2)
        return total[..., : ctx.width], total[..., ctx.width :], None, None, None


def _rows(lay: SequenceLayout, c: int) -> int:
    return len(lay._span(c, lay.chunk_kv, lay.kv_len))


def _split(both: torch.Tensor, lay: SequenceLayout, chunks: Sequence[int]) -> list[torch.Tensor]:
    return list(torch.split(both, [_rows(lay, c) for c in chunks], dim=2))


def _exchange(
    have: dict[int, torch.Tensor],
    transfers: list[tuple[int, int, int]],
    rank: int,
    group: ProcessGroup,
    lay: SequenceLayout,
    like: torch.Tensor,
    accumulate: bool = False,
) -> dict[int, torch.Tensor]:
    """Send ``have[c]`` for every (c, rank, dst) and receive every (c, src, rank); tag = chunk index.
    ``accumulate``: several sources may send the same chunk (gradients); they are summed."""
    ops, recvs = [], []
    for c, src, dst in transfers:
        if src == rank:
            ops.append(dist.P2POp(dist.isend, have[c].contiguous(), _global(dst, group), group=group, tag=c))
        elif dst == rank:
            buf = like.new_empty(*like.shape[:2], _rows(lay, c), like.shape[3])
            ops.append(dist.P2POp(dist.irecv, buf, _global(src, group), group=group, tag=c))
            recvs.append((c, buf))
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    got: dict[int, torch.Tensor] = {}
    for c, buf in recvs:
        got[c] = got[c] + buf if accumulate and c in got else buf
    return got


def _global(rank: int, group: ProcessGroup) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


class SequenceParallelAttention(torch.nn.Module):
    """This rank's queries of ``spec`` under ``layout``: ``att(q_local, k_local, v_local, **runtime)`` with
    ``q_local = q[:, :, layout.q_positions(rank)]`` and ``k_local``, ``v_local`` the rows
    ``layout.kv_positions(rank)`` returns ``out[:, :, layout.q_positions(rank)]``, differentiable (the key/value
    gradients of fetched chunks are returned to, and summed on, their owners; learned runtime tensors' gradients
    are summed over the ranks). Runtime tensors are passed whole, indexed by global positions."""

    def __init__(self, spec: AttentionSpec, layout: SequenceLayout, target: str = "auto", group: ProcessGroup = None,
                 **compile_options: Any) -> None:  # fmt: skip
        super().__init__()
        if spec.rope:
            raise SpecError(
                "sequence-parallel attention cannot apply RoPE in the kernel: the kernel rotates rows by their "
                "local index, and a rank's rows sit at global positions; rotate q and k before splitting them "
                "(with the global positions' tables), or split by heads (ac.distributed.ShardedAttention)"
            )
        rank, world = _rank_world(group)
        if world != layout.world_size:
            raise SpecError(f"the layout is for {layout.world_size} ranks but the process group has {world}")
        self.spec, self.layout, self.group, self.rank = spec, layout, group, rank
        self.kernel = compile_spec(at_positions(spec, layout.q_len, layout.kv_len), target=target, **compile_options)
        need = layout.kv_chunks_needed(rank)
        self.q_pos = layout.q_positions(rank)
        self.kv_pos = torch.tensor([p for c in need for p in layout._span(c, layout.chunk_kv, layout.kv_len)])
        self.kv_rows = len(layout.kv_positions(rank))  # rows of k_local / v_local (fixed by the layout)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, return_lse: bool = False,
                **runtime: torch.Tensor) -> Any:  # fmt: skip
        rows = self.kv_rows
        if mask_fingerprint(self.spec, runtime) != self.layout.fingerprint:
            raise SpecError(
                "the runtime tensors the mask reads differ from those the layout was made with, so the key/value "
                "chunks each rank needs may differ; make the layout with these tensors "
                "(ac.distributed.sequence_layout(..., **runtime))"
            )
        if self.layout.batch is not None and q.shape[0] != self.layout.batch:
            raise SpecError(
                f"the layout was made for batch {self.layout.batch} (the mask depends on the batch index) but q has "
                f"batch {q.shape[0]}; make the layout with batch={q.shape[0]}"
            )
        if q.dim() != 4 or q.shape[2] != len(self.q_pos) or k.shape[2] != rows or v.shape[2] != rows:
            raise SpecError(
                f"rank {self.rank}: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not hold this "
                f"rank's {len(self.q_pos)} query rows and {rows} key rows; slice them with "
                "layout.q_positions(rank) / layout.kv_positions(rank) on dim 2"
            )
        k_all, v_all = _FetchKV.apply(k, v, self.layout, self.rank, self.group)
        pos = {Q_POS: self.q_pos.to(q.device), KV_POS: self.kv_pos.to(q.device)}
        return self.kernel(q, k_all, v_all, return_lse=return_lse, **pos, **_reduced(runtime, self.group))


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, lay: SequenceLayout, group: ProcessGroup) -> torch.Tensor:
        rank, world = _rank_world(group)
        ctx.pos = lay.q_positions(rank)
        most = max(len(lay.q_positions(r)) for r in range(world))
        padded = out.new_zeros(*out.shape[:2], most, out.shape[3])
        padded[:, :, : out.shape[2]] = out
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded, group=group)
        full = out.new_empty(*out.shape[:2], lay.q_len, out.shape[3])
        for r, part in enumerate(parts):
            pos = lay.q_positions(r)
            full[:, :, pos] = part[:, :, : len(pos)]
        return full

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return grad[:, :, ctx.pos].contiguous(), None, None


def gather_sequence(out_local: torch.Tensor, layout: SequenceLayout, group: ProcessGroup = None) -> torch.Tensor:
    """Every rank's query rows put back in order: ``[B, H, Sq, D]`` on every rank; the backward keeps this
    rank's rows of the incoming gradient (as :func:`gather_heads`)."""
    return _GatherRows.apply(out_local, layout, group)
