"""The attention ops: the whole IR on one page. Each op's docstring repeats its line.

Every op, operands, typed attributes (:mod:`attncc.ir.attrs`: int, float, str, ints, floats, expr, bands)
and result::

    %x  = attn.input {arg: str}                                          : [B, H, S, D]   q, k or v
    %t  = attn.tensor {tensor: str, ndim: int, dtype: str, values: floats}               runtime tensor / table
    %t  = attn.select %q, %k {tensor: str, ndim: int, dtype: str, values: floats, top_k: int, block: ints,
                              grid: ints, region: ints, pool: str, causal: int, include_self: int}
                                                                         kv-block lists from q, k
    %x1 = attn.rope %x                                                   : shape of %x
    %s  = attn.qk %q, %k {groups: int, heads: str}                       : [B, Hq, Sq, Skv]
    %s1 = attn.scale %s {factor: float}                                  : shape of %s
    %s2 = attn.score_mod %s {expr: expr}                                 : shape of %s
    %s3 = attn.mask %s {pred: expr, form: str}                           : shape of %s
    %p  = attn.softmax %s                                                : shape of %s
    %o  = attn.pv %p, %v {groups: int, heads: str}                       : [B, Hq, Sq, D]
    %o  = attn.fused %q, %k, %v {groups: int, scale: float, score_mod: expr, mask: expr, form: str,
                                 heads: str}
                                                                         : [B, Hq, Sq, D]
    %o  = attn.tiled %q, %k, %v {<attn.fused's>, bq: int, bkv: int, layout: str,
                                 bands: bands, kv_blocks: bands, full_blocks: bands,
                                 bwd_bq: int, bwd_bkv: int}                 : [B, Hq, Sq, D]
    %o  = attn.linear %q, %k, %v {groups: int, phi: expr, causal: int, normalize: int, eps: float,
                                  chunk: int}                            : [B, Hq, S, D]   phi in x
    %o1 = attn.head_shard %o {world: int, owner: ints}                   : shape of %o
          attn.return %o

``heads`` (printed only when set) names a runtime int table: query head h reads kv head ``heads[h]``.
``bwd_bq``, ``bwd_bkv`` (printed only when set) are the tiles of the backwards that walk other tiles than the
forward (the cpu target's native bf16 backward).

Decomposed form (what front ends produce)::

    %s  = attn.qk %q, %k {groups = 4}           : [B, 8, Sq, Skv]
    %s1 = attn.scale %s {factor = 0.125}
    %s2 = attn.score_mod %s1 {expr = "30*tanh(score/30)"}
    %s3 = attn.mask %s2 {pred = "kv <= q", form = "causal"}
    %p  = attn.softmax %s3
    %o  = attn.pv %p, %v {groups = 4}

Fused form (after the ``fuse`` pass): one ``attn.fused`` op carrying scale, score_mod and mask; the
``block-sparse`` pass turns it into ``attn.tiled`` (its own op; both share :class:`AttentionOp`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import sympy

from attncc.ir.attrs import BANDS, EXPR, FLOAT, FLOATS, INT, INTS, STR, Attr
from attncc.ir.core import Op, Shape, Value
from attncc.ir.exprs import MASK_SYMBOLS, SCORE_SYMBOLS, is_boolean, score, unknown_symbols, x


def _check_expr(op: Op, label: str, expr: sympy.Basic, allowed: frozenset[sympy.Symbol]) -> None:
    if unknown := unknown_symbols(expr, allowed):
        raise op.fail(f"{label} {expr} uses unknown symbols {unknown}")


def _check_groups(op: Op, groups: int, hq: sympy.Expr, hkv: sympy.Expr, heads: str = "") -> None:
    if heads:  # a runtime head table says which kv head each query head reads; groups is not used
        if groups < 0:
            raise op.fail(f"groups must be >= 0, got {groups}")
        return
    if groups < 1:
        raise op.fail(f"groups must be >= 1, got {groups}")
    if sympy.simplify(hkv * groups - hq) != 0:
        raise op.fail(f"groups={groups} but query heads {hq} != {groups} x kv heads {hkv}")


@dataclass(frozen=True, slots=True)
class InputOp(Op):
    """%q = attn.input {arg = "q"} : [B, 8, Sq, 64]   -- a q/k/v tensor argument"""

    name: ClassVar[str] = "attn.input"
    attrs: ClassVar[dict[str, Attr]] = {"arg": STR}
    arg: str

    def verify(self) -> None:
        if self.arg not in ("q", "k", "v"):
            raise self.fail(f"arg must be q, k or v, got {self.arg!r}")
        if self.result is None or len(self.result.shape) != 4:
            raise self.fail(f"%{self.arg} must have a 4-d shape [B, heads, length, head_dim]")


@dataclass(frozen=True, slots=True)
class TensorOp(Op):
    """%doc = attn.tensor {tensor = "doc", ndim = 1, dtype = "int", values = []}

    A runtime tensor that expressions index by name; ``values`` holds a constant table
    (e.g. a per-head window) and is empty for tensors passed at call time.
    """

    name: ClassVar[str] = "attn.tensor"
    attrs: ClassVar[dict[str, Attr]] = {"tensor": STR, "ndim": INT, "dtype": STR, "values": FLOATS}
    tensor: str
    ndim: int
    dtype: str
    values: tuple[float, ...] = ()

    def verify(self) -> None:
        if self.dtype not in ("int", "float", "bool"):
            raise self.fail(f"dtype of {self.tensor!r} must be int, float or bool, got {self.dtype!r}")
        if self.ndim < 1:
            raise self.fail(f"tensor {self.tensor!r} must have ndim >= 1")
        if self.values and self.ndim != 1:
            raise self.fail(f"constant table {self.tensor!r} must be 1-d")


@dataclass(frozen=True, slots=True, kw_only=True)
class SelectOp(TensorOp):
    """%sel = attn.select %q, %k {tensor = "sel", ndim = 4, dtype = "int", values = [], top_k = 8,
                                   block = [64, 64], grid = [], region = [], pool = "mean", causal = 0,
                                   include_self = 1}

    A runtime tensor the graph computes: per (batch, query head, query block), the ``top_k`` kv blocks of
    highest pooled affinity ``mean(q rows of the block) . mean(k rows of the kv block)`` as an int list
    ``[B, Hq, query blocks, top_k]`` (-1 pads), which the mask reads with ``InBlocks``. ``grid``, ``region``:
    the tokens are a row-major grid whose regions are the blocks; the call reorders them region-major
    before the kernel (so each region is a run of ``block`` tokens) and back after; ``causal``: only kv blocks
    up to the query block compete; ``include_self``: the query's own block is always kept (one of the
    top_k). Not differentiable: gradients flow through the attention on the kept blocks.
    """

    name: ClassVar[str] = "attn.select"
    operands: ClassVar[tuple[str, ...]] = ("q", "k")
    attrs: ClassVar[dict[str, Attr]] = {
        **TensorOp.attrs,
        "top_k": INT,
        "block": INTS,
        "grid": INTS,
        "region": INTS,
        "pool": STR,
        "causal": INT,
        "include_self": INT,
    }
    q: Value
    k: Value
    top_k: int
    block: tuple[int, ...]
    grid: tuple[int, ...] = ()
    region: tuple[int, ...] = ()
    pool: str = "mean"
    causal: int = 0
    include_self: int = 1

    def verify(self) -> None:
        if (self.ndim, self.dtype) != (4, "int"):
            raise self.fail(f"{self.tensor!r} is a kv-block list: ndim 4, dtype int, got {self.ndim}, {self.dtype}")
        if self.top_k < 1:
            raise self.fail(f"top_k must be >= 1, got {self.top_k}")
        if self.pool != "mean":
            raise self.fail(f"pool must be 'mean', got {self.pool!r}")
        if len(self.block) != 2 or min(self.block) < 1:
            raise self.fail(f"block {list(self.block)} must be two positive sizes (bq, bkv)")
        if len(self.region) != len(self.grid):
            raise self.fail(f"region {list(self.region)} must give one size per grid axis {list(self.grid)}")


@dataclass(frozen=True, slots=True)
class RopeOp(Op):
    """%q1 = attn.rope %q : [B, 8, Sq, 64]   -- rotary embedding by the call's rope tables

    x' = x * cos + rotate_half(x) * sin with rotate_half(x) = cat(-x[D/2:], x[:D/2]); tables
    ``rope_cos`` / ``rope_sin`` have one row per key position, query rows align with the last
    ones. Code generators apply it in the kernel prologue of the op that reads the result.
    """

    name: ClassVar[str] = "attn.rope"
    operands: ClassVar[tuple[str, ...]] = ("x",)
    x: Value

    def result_shape(self) -> Shape:
        return self.x.shape

    def verify(self) -> None:
        if len(self.x.shape) != 4:
            raise self.fail(f"{self.x} must be 4-d [B, heads, length, head_dim]")
        d = self.x.shape[3]
        if d.is_number and int(d) % 2:
            raise self.fail(f"head_dim {d} of {self.x} is odd; RoPE rotates pairs (d, d + D/2)")


@dataclass(frozen=True, slots=True)
class QKOp(Op):
    """%s = attn.qk %q, %k {groups = 1} : [B, Hq, Sq, Skv]   -- scores q.k (kv head = h // groups)

    ``heads = "t"`` (printed only when set): query head h reads kv head ``t[h]`` of the runtime int table
    ``t`` instead (dynamic grouping); ``groups`` is then unused.
    """

    name: ClassVar[str] = "attn.qk"
    operands: ClassVar[tuple[str, ...]] = ("q", "k")
    attrs: ClassVar[dict[str, Attr]] = {"groups": INT, "heads": STR}
    optional: ClassVar[frozenset[str]] = frozenset({"heads"})
    q: Value
    k: Value
    groups: int = 1
    heads: str = ""

    def result_shape(self) -> Shape:
        return (self.q.shape[0], self.q.shape[1], self.q.shape[2], self.k.shape[2])

    def verify(self) -> None:
        _check_groups(self, self.groups, self.q.shape[1], self.k.shape[1], self.heads)
        if self.q.shape[3] != self.k.shape[3]:
            raise self.fail(f"head_dim of q ({self.q.shape[3]}) != head_dim of k ({self.k.shape[3]})")


@dataclass(frozen=True, slots=True)
class ScaleOp(Op):
    """%s1 = attn.scale %s {factor = 0.125}"""

    name: ClassVar[str] = "attn.scale"
    operands: ClassVar[tuple[str, ...]] = ("scores",)
    attrs: ClassVar[dict[str, Attr]] = {"factor": FLOAT}
    scores: Value
    factor: float

    def result_shape(self) -> Shape:
        return self.scores.shape


@dataclass(frozen=True, slots=True)
class ScoreModOp(Op):
    """%s2 = attn.score_mod %s1 {expr = "30*tanh(score/30)"}   -- elementwise, sees the scaled score"""

    name: ClassVar[str] = "attn.score_mod"
    operands: ClassVar[tuple[str, ...]] = ("scores",)
    attrs: ClassVar[dict[str, Attr]] = {"expr": EXPR}
    scores: Value
    expr: sympy.Expr

    def result_shape(self) -> Shape:
        return self.scores.shape

    def verify(self) -> None:
        if is_boolean(self.expr):
            raise self.fail(f"expr {self.expr} is boolean; a score mod must be numeric")
        _check_expr(self, "expr", self.expr, SCORE_SYMBOLS)


@dataclass(frozen=True, slots=True)
class MaskOp(Op):
    """%s3 = attn.mask %s2 {pred = "kv <= q", form = "causal"}   -- scores where pred is false become -inf"""

    name: ClassVar[str] = "attn.mask"
    operands: ClassVar[tuple[str, ...]] = ("scores",)
    attrs: ClassVar[dict[str, Attr]] = {"pred": EXPR, "form": STR}
    scores: Value
    pred: sympy.Basic
    form: str = ""

    def result_shape(self) -> Shape:
        return self.scores.shape

    def verify(self) -> None:
        if not is_boolean(self.pred):
            raise self.fail(f"pred {self.pred} is not boolean")
        _check_expr(self, "pred", self.pred, MASK_SYMBOLS)
        if score in self.pred.free_symbols:
            raise self.fail(f"pred {self.pred} depends on score; masks see indices only")


@dataclass(frozen=True, slots=True)
class SoftmaxOp(Op):
    """%p = attn.softmax %s3   -- over the key axis; rows with no visible key give 0"""

    name: ClassVar[str] = "attn.softmax"
    operands: ClassVar[tuple[str, ...]] = ("scores",)
    scores: Value

    def result_shape(self) -> Shape:
        return self.scores.shape


@dataclass(frozen=True, slots=True)
class PVOp(Op):
    """%o = attn.pv %p, %v {groups = 1} : [B, Hq, Sq, D]   (``heads`` as for attn.qk)"""

    name: ClassVar[str] = "attn.pv"
    operands: ClassVar[tuple[str, ...]] = ("probs", "v")
    attrs: ClassVar[dict[str, Attr]] = {"groups": INT, "heads": STR}
    optional: ClassVar[frozenset[str]] = frozenset({"heads"})
    probs: Value
    v: Value
    groups: int = 1
    heads: str = ""

    def result_shape(self) -> Shape:
        return (*self.probs.shape[:3], self.v.shape[3])

    def verify(self) -> None:
        _check_groups(self, self.groups, self.probs.shape[1], self.v.shape[1], self.heads)


@dataclass(frozen=True, slots=True)
class AttentionOp(Op):
    """What ``attn.fused`` and ``attn.tiled`` share: one attention, softmax(mask(score_mod(q.k * scale))) . v.
    Not an op of the text form itself; passes and the lowering match on it to take either."""

    operands: ClassVar[tuple[str, ...]] = ("q", "k", "v")
    attrs: ClassVar[dict[str, Attr]] = {
        "groups": INT,
        "scale": FLOAT,
        "score_mod": EXPR,
        "mask": EXPR,
        "form": STR,
        "heads": STR,
    }
    optional: ClassVar[frozenset[str]] = frozenset({"heads"})
    q: Value
    k: Value
    v: Value
    groups: int
    scale: float
    score_mod: sympy.Expr = score
    mask: sympy.Basic = sympy.true
    form: str = ""
    heads: str = ""  # runtime table: kv head of each query head (as for attn.qk); "" for h // groups

    def result_shape(self) -> Shape:
        return (*self.q.shape[:3], self.v.shape[3])

    def verify(self) -> None:
        _check_groups(self, self.groups, self.q.shape[1], self.k.shape[1], self.heads)
        if not is_boolean(self.mask):
            raise self.fail(f"mask {self.mask} is not boolean")
        if is_boolean(self.score_mod):
            raise self.fail(f"score_mod {self.score_mod} is boolean; it must be numeric")
        _check_expr(self, "mask", self.mask, MASK_SYMBOLS)
        _check_expr(self, "score_mod", self.score_mod, SCORE_SYMBOLS)


@dataclass(frozen=True, slots=True)
class FusedOp(AttentionOp):
    """%o = attn.fused %q, %k, %v {groups, scale, score_mod, mask, form} : [B, Hq, Sq, D]

    One attention as a single op (the ``fuse`` pass makes it from the decomposed chain).
    """

    name: ClassVar[str] = "attn.fused"


Bands = tuple[tuple[sympy.Expr, sympy.Expr], ...]


@dataclass(frozen=True, slots=True)
class TiledOp(AttentionOp):
    """%o = attn.tiled %q, %k, %v {..., bq = 64, bkv = 64, layout = "banded", bands = ["0 .. q"],
    kv_blocks = ["0 .. qb"], full_blocks = ["0 .. qb - 1"]}

    A fused attention split into bq x bkv tiles. ``layout`` says how the kernel finds its tiles:
    "banded" (closed-form kv ranges per q-block, given by ``bands`` in keys and ``kv_blocks`` /
    ``full_blocks`` in blocks, before clipping to the lengths), "static" (a tile list built once
    per length), "runtime" (built per call from runtime tensors) or "dense" (every tile, all partial).
    ``bwd_bq`` x ``bwd_bkv``: other tiles for the backwards that gain from them (printed only when set;
    0 x 0: the forward's); the map at those tiles is built from the same recipe.
    """

    name: ClassVar[str] = "attn.tiled"
    attrs: ClassVar[dict[str, Attr]] = {
        **AttentionOp.attrs,
        "bq": INT,
        "bkv": INT,
        "layout": STR,
        "bands": BANDS,
        "kv_blocks": BANDS,
        "full_blocks": BANDS,
        "bwd_bq": INT,
        "bwd_bkv": INT,
    }
    optional: ClassVar[frozenset[str]] = frozenset({"heads", "bwd_bq", "bwd_bkv"})
    bq: int = 64
    bkv: int = 64
    layout: str = "dense"
    bands: Bands = ()
    kv_blocks: Bands = ()
    full_blocks: Bands = ()
    bwd_bq: int = 0
    bwd_bkv: int = 0

    def verify(self) -> None:
        AttentionOp.verify(self)
        if self.bq < 1 or self.bkv < 1:
            raise self.fail(f"tile sizes must be >= 1, got {self.bq}x{self.bkv}")
        if (self.bwd_bq, self.bwd_bkv) != (0, 0) and (self.bwd_bq < 1 or self.bwd_bkv < 1):
            raise self.fail(f"backward tiles must be >= 1 (or both 0: the forward's), got {self.bwd_bq}x{self.bwd_bkv}")
        if self.layout not in ("banded", "static", "runtime", "dense"):
            raise self.fail(f"layout must be banded, static, runtime or dense, got {self.layout!r}")
        if (self.layout == "banded") != bool(self.bands):
            raise self.fail("bands are given exactly when layout is 'banded'")
        if not (len(self.bands) == len(self.kv_blocks) == len(self.full_blocks)):
            raise self.fail("bands, kv_blocks and full_blocks must have one entry per band")


@dataclass(frozen=True, slots=True)
class LinearOp(Op):
    """%o = attn.linear %q, %k, %v {groups, phi, causal, normalize, eps, chunk} : [B, Hq, S, D]

    Feature-map linear attention: o_i = sum_j (phi(q_i) . phi(k_j)) v_j over j <= i when causal, divided by
    sum_j phi(q_i) . phi(k_j) + eps when normalize; phi is an elementwise expression in ``x``; kernels walk
    the sequence in chunks of ``chunk`` rows.
    """

    name: ClassVar[str] = "attn.linear"
    operands: ClassVar[tuple[str, ...]] = ("q", "k", "v")
    attrs: ClassVar[dict[str, Attr]] = {
        "groups": INT,
        "phi": EXPR,
        "causal": INT,
        "normalize": INT,
        "eps": FLOAT,
        "chunk": INT,
    }
    q: Value
    k: Value
    v: Value
    groups: int
    phi: sympy.Expr
    causal: int = 1
    normalize: int = 1
    eps: float = 1e-6
    chunk: int = 32

    def result_shape(self) -> Shape:
        return (*self.q.shape[:3], self.v.shape[3])

    def verify(self) -> None:
        _check_groups(self, self.groups, self.q.shape[1], self.k.shape[1])
        if is_boolean(self.phi) or self.phi.free_symbols - {x}:
            raise self.fail(f"feature map {self.phi} must be a number-valued expression of x alone")
        if self.causal not in (0, 1) or self.normalize not in (0, 1):
            raise self.fail(f"causal and normalize are 0 or 1, got {self.causal} and {self.normalize}")
        if self.chunk < 16 or self.chunk & (self.chunk - 1):
            raise self.fail(f"chunk must be a power of two >= 16, got {self.chunk}")


@dataclass(frozen=True, slots=True)
class HeadShardOp(Op):
    """%o2 = attn.head_shard %o {world = 2, owner = [0, 0, 1, 1]}   -- head h computed on rank owner[h]"""

    name: ClassVar[str] = "attn.head_shard"
    operands: ClassVar[tuple[str, ...]] = ("attn",)
    attrs: ClassVar[dict[str, Attr]] = {"world": INT, "owner": INTS}
    attn: Value
    world: int
    owner: tuple[int, ...]

    def result_shape(self) -> Shape:
        return self.attn.shape

    def verify(self) -> None:
        if self.world < 1:
            raise self.fail(f"world must be >= 1, got {self.world}")
        if bad := [r for r in self.owner if not 0 <= r < self.world]:
            raise self.fail(f"owner ranks {bad} outside [0, {self.world})")
        heads = self.attn.shape[1]
        if heads.is_number and len(self.owner) != int(heads):
            raise self.fail(f"owner lists {len(self.owner)} heads, the value has {heads}")


@dataclass(frozen=True, slots=True)
class ReturnOp(Op):
    """attn.return %o"""

    name: ClassVar[str] = "attn.return"
    operands: ClassVar[tuple[str, ...]] = ("out",)
    out: Value


OPS: dict[str, type[Op]] = {
    cls.name: cls
    for cls in (
        InputOp,
        TensorOp,
        SelectOp,
        RopeOp,
        QKOp,
        ScaleOp,
        ScoreModOp,
        MaskOp,
        SoftmaxOp,
        PVOp,
        FusedOp,
        TiledOp,
        LinearOp,
        HeadShardOp,
        ReturnOp,
    )
}
