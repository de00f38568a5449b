"""The lowering boundary: ``lower(graph) -> KernelPlan``, the frozen description every target builds from.

After the passes, everything a code generator or the runtime needs to know about one attention
is worked out here, once: tiles and layout, the band ranges (in keys and in blocks), head
grouping and placement, scale, mask, score mod and its derivative, the runtime-tensor interface
in argument order with dtypes, the rope flag, which tables get gradients (and the derivative of
each read), and the block-map recipe that turns lengths and runtime tensors into tile lists.
Targets read the plan; none of them looks into the graph or into another target.

>>> import attncc as ac
>>> kern = ac.compile(ac.AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=16, mask=ac.causal()),
...                   target="reference", tiles=(32, 32))
>>> print(kern.plan)
plan @attention
  heads       4 query, 2 kv (groups of 2), head_dim 16, all on one device
  scale       0.25
  tiles       32 x 32, layout banded
  band 0      0 <= kv <= q; kv blocks 0 .. qb, full 0 .. qb - 1
  mask        kv <= q
  score_mod   score
  d/d score   1
  tensors     (none)
  rope        no
>>> kern.plan.block_map(64, 64).num_computed_blocks
3
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields

import numpy as np
import sympy
import torch

from attncc.analysis import tiling
from attncc.analysis.bands import Band, block_ranges
from attncc.analysis.blockmap import FULL, BlockMap
from attncc.errors import LoweringError
from attncc.ir.core import Graph
from attncc.ir.exprs import InBlocks, expr_str, score
from attncc.ir.ops import AttentionOp, HeadShardOp, InputOp, LinearOp, RopeOp, SelectOp, TensorOp, TiledOp

log = logging.getLogger("attncc.plan")

Range = tuple[sympy.Expr, sympy.Expr]  # first .. last kv block of q-block qb (inclusive, unclipped)


@dataclass(frozen=True)
class BandPlan:
    """One band ``lo(q) <= kv <= hi(q)`` and, per q-block ``qb``, the kv blocks it computes and the
    ones it proves full (closed form, before clipping to the lengths)."""

    band: Band
    computed: Range
    full: Range


def band_from_range(lo: sympy.Expr, hi: sympy.Expr) -> Band:
    """The Band whose bounds print as ``lo .. hi`` (as the IR stores them)."""
    lows = tuple(lo.args) if isinstance(lo, sympy.Max) else (lo,)
    highs = tuple(hi.args) if isinstance(hi, sympy.Min) else (hi,)
    return Band(lows, highs)


@dataclass(frozen=True)
class KernelPlan:
    """Everything the targets build from (see the module docstring); frozen and printable."""

    name: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    value_dim: int
    scale: float
    tiles: tuple[int, int]
    backward_tiles: tuple[int, int]  # the tiles of the backwards that gain from others (the cpu's bf16 one)
    layout: str  # banded | static | runtime | dense
    bands: tuple[BandPlan, ...]
    mask: sympy.Basic
    score_mod: sympy.Expr
    dscore: sympy.Expr  # d score_mod / d score
    tensors: tuple[TensorOp, ...]  # the runtime-tensor interface, in argument order
    grad_tables: tuple[str, ...]  # float tables read by the score mod: the backwards return their gradients
    table_derivatives: tuple[tuple[str, tuple[tuple[sympy.Indexed, sympy.Expr], ...]], ...]
    rope: bool
    owner: tuple[int, ...] | None  # rank of each query head (attn.head_shard), None: all on one device
    head_table: str  # runtime int tensor naming each query head's kv head, "" for h // groups
    recipe: tiling.Recipe = field(compare=False, repr=False)

    @property
    def groups(self) -> int:
        """Query heads per kv head (0: a head table assigns uneven groups)."""
        return 0 if self.num_heads % self.num_kv_heads else self.num_heads // self.num_kv_heads

    @property
    def static(self) -> bool:
        """True when the tile lists depend on the lengths only (no runtime tensors)."""
        return not any(not t.values for t in self.tensors)

    @property
    def selects(self) -> tuple[SelectOp, ...]:
        """The kv-block lists the call selects from q and k before the kernel runs (``attn.select``)."""
        return tuple(t for t in self.tensors if isinstance(t, SelectOp))

    @property
    def block_lists(self) -> frozenset[str]:
        """Runtime tensors the mask reads as block-index lists (``InBlocks``)."""
        return frozenset(a.tensor for a in self.mask.atoms(InBlocks))

    def expression_holes(self, emit: Callable[[sympy.Basic], str]) -> dict[str, str]:
        """The template holes every target fills alike: mask, score mod and d/d score, as text and code."""
        holes = {}
        for key, expr in (("mask", self.mask), ("mod", self.score_mod), ("dmod", self.dscore)):
            holes[f"{key}_text"], holes[f"{key}_code"] = expr_str(expr), emit(expr)
        return holes

    def block_map(
        self,
        q_len: int,
        kv_len: int,
        batch: int = 1,
        tensors: Mapping[str, np.ndarray] | None = None,
        block: tuple[int, int] | None = None,
    ) -> BlockMap:
        """The block map at these lengths; ``tensors`` holds the runtime tensors' values."""
        return tiling.build(self.recipe, q_len, kv_len, block or self.tiles, self.num_heads, batch, tensors)

    def tile_lists(
        self, q_len: int, kv_len: int, batch: int = 1, tensors: Mapping[str, np.ndarray] | None = None
    ) -> TileLists:
        """The tile lists a call walks (every target's kernels read these)."""
        return TileLists.of(self.block_map(q_len, kv_len, batch, tensors))

    def __str__(self) -> str:
        heads = (
            "all on one device"
            if self.owner is None
            else "; ".join(
                f"rank {r}: {[h for h, o in enumerate(self.owner) if o == r]}" for r in sorted(set(self.owner))
            )
        )
        lines = [
            f"plan @{self.name}",
            f"  heads       {self.num_heads} query, {self.num_kv_heads} kv (groups of {self.groups}), "
            f"head_dim {self.head_dim}" + (f", value_dim {self.value_dim}" if self.value_dim != self.head_dim else "")
            + f", {heads}",
            f"  scale       {self.scale:g}",
            f"  tiles       {self.tiles[0]} x {self.tiles[1]}"
            + (f" (backward {self.backward_tiles[0]} x {self.backward_tiles[1]})" if self.backward_tiles != self.tiles
               else "") + f", layout {self.layout}",
        ]  # fmt: skip
        for i, b in enumerate(self.bands):
            lines.append(
                f"  band {i:<6} {expr_str(b.band.lo)} <= kv <= {expr_str(b.band.hi)}; kv blocks "
                f"{expr_str(b.computed[0])} .. {expr_str(b.computed[1])}, full {expr_str(b.full[0])} .. "
                f"{expr_str(b.full[1])}"
            )
        described = []
        for t in self.tensors:
            role = (
                "constant" if t.values else "learned: gradient returned" if t.tensor in self.grad_tables else "runtime"
            )
            if isinstance(t, SelectOp):
                how = (
                    f"regions {list(t.block)} of grid {list(t.grid)}" if t.grid else f"{t.block[0]}x{t.block[1]} blocks"
                )
                extra = (", causal" if t.causal else "") + (", own block kept" if t.include_self else "")
                role = f"selected from q, k: top {t.top_k} {how} by {t.pool}-pooled affinity{extra}"
            described.append(f"{t.tensor}: {t.dtype} {t.ndim}-d ({role})")
        lines += [
            f"  mask        {expr_str(self.mask)}",
            f"  score_mod   {expr_str(self.score_mod)}",
            f"  d/d score   {expr_str(self.dscore)}",
            f"  tensors     {'; '.join(described) or '(none)'}",
        ]
        for name, reads in self.table_derivatives:
            for occ, deriv in reads:
                lines.append(f"  d/d {expr_str(occ):<7} {expr_str(deriv)}  (gradient of {name})")
        lines.append(f"  rope        {'q and k rotated in the prologue' if self.rope else 'no'}")
        return "\n".join(lines)


def fused_op(graph: Graph) -> AttentionOp:
    """The graph's one fused (or tiled) attention op; a clear error when the fuse pass did not run."""
    fused = graph.ops_of(AttentionOp)
    if len(fused) != 1:
        raise LoweringError(
            f"lowering needs exactly one attn.fused op, @{graph.name} has {len(fused)}; "
            "run the 'fuse' pass (it logs why it refused)"
        )
    op = fused[0]
    assert isinstance(op, AttentionOp)
    return op


def _has_rope(graph: Graph, op: AttentionOp) -> bool:
    """True when q and k reach the fused op through attn.rope ops on the inputs (the kernels then
    rotate in their prologue); a rope on only one of them, or not on an input, is refused."""
    found = []
    for operand, arg in ((op.q, "q"), (op.k, "k")):
        producer = graph.producer(operand)
        if isinstance(producer, RopeOp):
            source = graph.producer(producer.x)
            if not (isinstance(source, InputOp) and source.arg == arg):
                raise LoweringError(f"attn.rope must read the input %{arg} directly; it reads {producer.x}")
            found.append(arg)
        elif not isinstance(producer, InputOp):
            raise LoweringError(f"the fused op's {arg} operand comes from {producer.name}, which no target can absorb")
    if len(found) == 1:
        raise LoweringError(f"attn.rope on {found[0]} only; RoPE rotates q and k with the same tables")
    return bool(found)


def table_derivatives(op: AttentionOp, tensor: str) -> list[tuple[sympy.Indexed, sympy.Basic]]:
    """Each read of ``tensor`` in the score mod, with d score_mod / d (the entry it reads): a kernel adds
    dL/d(score_mod) times that derivative to the entry's gradient.

    >>> import attncc as ac
    >>> mod = ac.score * 2 + ac.tensor("bias")[ac.h, ac.q - ac.kv + 8]
    >>> plan = ac.compile(ac.AttentionSpec(num_heads=2, head_dim=8, score_mod=mod), target="reference").plan
    >>> [(str(occ), str(d)) for occ, d in plan.table_derivatives[0][1]]
    [('bias[h, -kv + q + 8]', '1')]
    """
    occurrences = sorted(
        (a for a in op.score_mod.atoms(sympy.Indexed) if str(a.base) == tensor), key=sympy.default_sort_key
    )
    entry = sympy.Symbol("entry", real=True)
    return [(occ, sympy.diff(op.score_mod.xreplace({occ: entry}), entry).xreplace({entry: occ})) for occ in occurrences]


def _int(dim: sympy.Expr, what: str, graph: Graph) -> int:
    if not dim.is_Integer:
        raise LoweringError(f"@{graph.name}: the {what} must be a number to lower, got {dim}")
    return int(dim)


def lower(graph: Graph) -> KernelPlan:
    """The plan of a graph after the passes (fused, usually tiled; see the module docstring)."""
    op = fused_op(graph)
    tensors = tuple(t for t in graph.ops_of(TensorOp) if isinstance(t, TensorOp))
    read = {str(a.base) for a in op.score_mod.atoms(sympy.Indexed)}
    grads = tuple(t.tensor for t in tensors if t.dtype == "float" and not t.values and t.tensor in read)
    constants = {t.tensor: np.asarray(t.values) for t in tensors if t.values}
    if isinstance(op, TiledOp):  # the block-sparse pass decided the layout and found the bands: not redone here
        tiles, layout = (op.bq, op.bkv), op.layout
        backward = (op.bwd_bq, op.bwd_bkv) if op.bwd_bq else tiles
        found = tuple(band_from_range(lo, hi) for lo, hi in op.bands) if layout == "banded" else None
        # a mask of every key is dense to the kernels, but its maps are the one band's (a decoding step's built ahead)
        rec = tiling.recipe(op.mask, constants, bands=found if op.mask is not sympy.true else tiling.FIND)
        bands = tuple(BandPlan(*x) for x in zip(found or (), op.kv_blocks, op.full_blocks, strict=True))
    else:  # a pipeline without block-sparse: the default tiles, bands found here
        rec = tiling.recipe(op.mask, constants)
        tiles, layout = (64, 64), "banded" if rec.bands else "static"
        backward = tiles
        bands = tuple(BandPlan(b, *block_ranges(b, *tiles)) for b in rec.bands or ())
    shards = graph.ops_of(HeadShardOp)
    return KernelPlan(
        name=graph.name,
        num_heads=_int(op.q.shape[1], "number of query heads", graph),
        num_kv_heads=_int(op.k.shape[1], "number of kv heads", graph),
        head_dim=_int(op.q.shape[3], "head dim", graph),
        value_dim=_int(op.v.shape[3], "value head dim", graph),
        scale=float(op.scale),
        tiles=tiles,
        backward_tiles=backward,
        layout=layout,
        bands=bands,
        mask=op.mask,
        score_mod=op.score_mod,
        dscore=sympy.diff(op.score_mod, score),
        tensors=tensors,
        grad_tables=grads,
        table_derivatives=tuple((n, tuple(table_derivatives(op, n))) for n in grads),
        rope=_has_rope(graph, op),
        owner=shards[0].owner if shards else None,  # type: ignore[attr-defined]
        head_table=op.heads,
        recipe=rec,
    )


@dataclass(frozen=True)
class TileLists:
    """The tile lists a call walks, built from a block map (every target reads these).

    kv_*: CSR per (map, q-block) of kv blocks, with a full flag; q_*: the transpose, per
    (map, kv-block). kv_rank / q_rank number each partial tile within its map (-1 for full
    tiles); keep_base[pair] is where that (batch, head) pair's partial-tile masks start in the
    cpu target's keep buffer (a record per tile: BQ x BKV keep bytes, then each row's and each column's
    kept range), filled by its ``attncc_masks``.
    """

    map_of: np.ndarray
    kv_ptr: np.ndarray
    kv_idx: np.ndarray
    kv_full: np.ndarray
    kv_rank: np.ndarray
    q_ptr: np.ndarray
    q_idx: np.ndarray
    q_full: np.ndarray
    q_rank: np.ndarray
    keep_base: np.ndarray
    keep_tiles: int

    @staticmethod
    def of(bm: BlockMap) -> TileLists:
        """The lists of ``bm``, from its computed tiles (O(tiles) for a sparse map: no grid is built)."""
        u, r, c, cell = bm.tiles()
        maps, nq, nkv = bm.num_maps, bm.num_q_blocks, bm.num_kv_blocks
        full = (cell == FULL).astype(np.uint8)

        def ptr_of(rows: np.ndarray, n: int) -> np.ndarray:
            return np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))]).astype(np.int32)

        partial = full == 0
        per_map = np.bincount(u[partial], minlength=maps)
        starts = np.concatenate([[0], np.cumsum(per_map)[:-1]])
        rank = np.full(u.size, -1, np.int64)
        rank[partial] = np.arange(int(partial.sum())) - starts[u[partial]]  # tiles are ordered by map
        order = np.lexsort((r, c, u))  # the transpose: by map, kv-block, q-block
        map_of = bm.map_of.astype(np.int32)
        counts = per_map[map_of.reshape(-1)]
        keep_base = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        return TileLists(
            map_of,
            ptr_of(u * nq + r, maps * nq),
            c.astype(np.int32),
            full,
            rank.astype(np.int32),
            ptr_of(u * nkv + c, maps * nkv),
            r[order].astype(np.int32),
            full[order],
            rank[order].astype(np.int32),
            keep_base,
            int(counts.sum()),
        )

    @functools.cached_property
    def addresses(self) -> dict[str, int]:
        """Each list's data address, as the cpu runtime takes them: read once per lists (numpy's ``.ctypes.data``
        costs about a microsecond, and a call passes ten; static masks reuse their lists call after call)."""
        return {f.name: getattr(self, f.name).ctypes.data for f in fields(self) if f.name != "keep_tiles"}

    def on(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The lists the triton kernels read, as tensors on ``device``: copied there once per lists and device (a
        static mask's calls reuse their lists, a generation loop's steps within a kv block share them), not per call.

        >>> import attncc as ac, torch
        >>> kern = ac.compile(ac.AttentionSpec(num_heads=2, head_dim=16, mask=ac.causal()), target="reference")
        >>> lists = TileLists.of(kern.block_map(128, 128))
        >>> on = lists.on(torch.device("cpu"))
        >>> on["kv_idx"].tolist() == lists.kv_idx.tolist(), lists.on(torch.device("cpu")) is on
        (True, True)
        """
        found = self._copies.get(device)
        if found is None:
            names = ("map_of", "kv_ptr", "kv_idx", "kv_full", "q_ptr", "q_idx", "q_full")
            found = self._copies[device] = {n: torch.from_numpy(getattr(self, n)).to(device) for n in names}
        return found

    @functools.cached_property
    def _copies(self) -> dict[torch.device, dict[str, torch.Tensor]]:
        return {}

    @functools.cached_property
    def longest_kv_row(self) -> int:
        """The most kv blocks any (map, q-block) row computes."""
        return int(np.diff(self.kv_ptr).max()) if len(self.kv_ptr) > 1 else 1


def head_index(num_heads: int, num_kv_heads: int, table: torch.Tensor | None = None) -> np.ndarray:
    """int64 [H + Hkv + 1 + H] as the cpu and triton kernels read it: the kv head of each query head (from
    ``table``, else ``h // groups``), then per kv head the range (CSR) of its query heads, then those heads.

    >>> head_index(4, 2).tolist()
    [0, 0, 1, 1, 0, 2, 4, 0, 1, 2, 3]
    >>> head_index(3, 2, torch.tensor([1, 0, 1])).tolist()
    [1, 0, 1, 0, 1, 3, 1, 0, 2]
    """
    if table is None:
        return _grouped_index(num_heads, num_kv_heads)
    kv = table.detach().cpu().long().numpy().reshape(-1)
    ptr = np.concatenate([[0], np.cumsum(np.bincount(kv, minlength=num_kv_heads))])
    return np.concatenate([kv, ptr, np.argsort(kv, kind="stable")]).astype(np.int64)


@functools.lru_cache(maxsize=64)
def _grouped_index(num_heads: int, num_kv_heads: int) -> np.ndarray:
    """``head_index`` without a table (kv head h // groups), built once per head count; callers only read it."""
    kv = np.arange(num_heads) // (num_heads // num_kv_heads)
    ptr = np.concatenate([[0], np.cumsum(np.bincount(kv, minlength=num_kv_heads))])
    out = np.concatenate([kv, ptr, np.arange(num_heads)]).astype(np.int64)
    out.flags.writeable = False
    return out


def kernel_value(t: TensorOp, tensors: dict[str, torch.Tensor], device: torch.device | None = None) -> torch.Tensor:
    """A runtime tensor (or the constant table) as generated kernels read it: float32 for float
    tensors, int64 for int and bool ones, contiguous."""
    value = tensors[t.tensor] if t.tensor in tensors else torch.tensor(t.values)
    return value.detach().to(device or value.device, torch.float32 if t.dtype == "float" else torch.int64).contiguous()


RopeTables = tuple[torch.Tensor, torch.Tensor] | None  # rope_cos, rope_sin as [Bt, Skv, D] float32, or None


def rope_tables(tables: tuple[torch.Tensor, torch.Tensor] | None) -> RopeTables:
    """The rope tables as the kernels read them: float32, contiguous."""
    return None if tables is None else (tables[0].float().contiguous(), tables[1].float().contiguous())


@dataclass(frozen=True)
class LinearPlan:
    """What the targets build a feature-map linear attention from (``lower_linear`` of its graph)."""

    name: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    groups: int
    phi: sympy.Expr
    causal: bool
    normalize: bool
    eps: float
    chunk: int

    def __str__(self) -> str:
        return "\n".join([
            f"linear plan @{self.name}",
            f"  heads       {self.num_heads} query / {self.num_kv_heads} kv (groups {self.groups}), "
            f"head_dim {self.head_dim}",
            f"  phi(x)      {expr_str(self.phi)}",
            f"  form        {'causal (chunks of ' + str(self.chunk) + ')' if self.causal else 'non-causal'}, "
            f"{'normalized (eps ' + repr(self.eps) + ')' if self.normalize else 'not normalized'}",
        ])  # fmt: skip


def lower_linear(graph: Graph) -> LinearPlan:
    """The plan of a linear-attention graph (its one ``attn.linear`` op).

    >>> import attncc as ac
    >>> from attncc.lower import linear_to_ir
    >>> print(lower_linear(linear_to_ir(ac.linear_attention(num_heads=4, num_kv_heads=2, head_dim=16))))
    linear plan @linear_attention
      heads       4 query / 2 kv (groups 2), head_dim 16
      phi(x)      Piecewise((x + 1, x > 0), (exp(x), True))
      form        causal (chunks of 32), normalized (eps 1e-06)
    """
    ops = graph.ops_of(LinearOp)
    if len(ops) != 1:
        raise LoweringError(f"lowering a linear attention needs one attn.linear op, @{graph.name} has {len(ops)}")
    op = ops[0]
    assert isinstance(op, LinearOp)
    heads, kv_heads, head_dim = (int(d) for d in (op.q.shape[1], op.k.shape[1], op.q.shape[3]))
    return LinearPlan(graph.name, heads, kv_heads, head_dim, op.groups, op.phi, bool(op.causal), bool(op.normalize),
                      op.eps, op.chunk)  # fmt: skip
