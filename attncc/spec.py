"""AttentionSpec: the frozen, hashable declaration of one attention.

>>> import attncc as ac
>>> spec = ac.AttentionSpec(num_heads=8, num_kv_heads=2, head_dim=64,
...                         mask=ac.causal() & ac.sliding_window(256), score_mod=ac.softcap(30.0))
>>> spec.groups, spec.scale, str(spec.mask)
(4, 0.125, '(kv <= q) & (q - 256 <= kv)')
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch

from attncc import routing
from attncc.dsl import EMPTY, Expr, Meta
from attncc.errors import SpecError
from attncc.ir import exprs as X
from attncc.trace import Traced, trace_mask, trace_score_mod


@dataclass(frozen=True)
class TensorDecl:
    """A runtime tensor the spec indexes: name, dtype kind, rank and (for tables) constant values."""

    name: str
    dtype: str
    ndim: int
    values: tuple[float, ...] = ()


MaskLike = Expr | Callable[..., Any] | None


@dataclass(frozen=True, kw_only=True)
class AttentionSpec:
    """What one attention computes; see DESIGN.md for the shared semantics.

    num_heads / num_kv_heads: query and key/value heads (num_kv_heads < num_heads is GQA/MQA).
    head_dim: size of each query and key head. value_dim: size of each value head (and of the output's), default
    ``head_dim``; another size where values are narrower or wider than queries and keys (DeepSeek's multi-head latent
    attention: 192 and 128), as SDPA and FlexAttention take it.
    mask: boolean expression, FlexAttention mask_mod or None.
    score_mod: numeric expression over ``score``, FlexAttention score_mod or None.
    scale: score scale, default ``1/sqrt(head_dim)``.
    rope: rotate q and k by RoPE tables passed at call time (``rope_cos``, ``rope_sin``; see
    :mod:`attncc.rope`); the kernels apply the rotation in their prologue.
    kv_head_of: a runtime int tensor ``[num_heads]`` (``ac.tensor("kv_head_of")``): query head h reads kv
    head ``kv_head_of[h]`` (dynamic grouping, KDGQA / DGQA; groups may be uneven), passed at call time;
    without it query head h reads kv head ``h // (num_heads // num_kv_heads)``.

    After construction ``mask`` and ``score_mod`` hold sympy expressions (``true`` / ``score``
    when absent), ``tensors`` the runtime tensors they index and ``requires`` the length
    constraints checked at call time. Tensors captured by traced callables are bound by
    reference in ``captured``; ``bindings`` (name, object identity) makes them part of the spec's
    equality, so two specs that capture different tensors under one name never share a kernel:

    >>> import torch
    >>> def same_doc(doc):
    ...     return lambda b, h, q, kv: doc[q] == doc[kv]
    >>> a, c = torch.tensor([0, 0, 1]), torch.tensor([0, 1, 1])
    >>> spec = lambda doc: AttentionSpec(num_heads=1, head_dim=8, mask=same_doc(doc))
    >>> spec(a) == spec(a), spec(a) == spec(c)
    (True, False)

    Values of their own width (``value_dim``; a call's v and output are that wide):

    >>> import attncc as ac
    >>> mla = ac.AttentionSpec(num_heads=2, head_dim=24, value_dim=16)
    >>> mla.value_dim, ac.AttentionSpec(num_heads=2, head_dim=24).value_dim
    (16, 24)
    >>> q, k, v = torch.randn(1, 2, 5, 24), torch.randn(1, 2, 5, 24), torch.randn(1, 2, 5, 16)
    >>> ac.compile(mla, target="reference")(q, k, v).shape
    torch.Size([1, 2, 5, 16])
    """

    num_heads: int
    head_dim: int
    num_kv_heads: int | None = None
    value_dim: int | None = None
    mask: Any = None
    score_mod: Any = None
    scale: float | None = None
    name: str = "attention"
    rope: bool = False
    kv_head_of: Any = None
    tensors: tuple[TensorDecl, ...] = field(default=(), init=False)
    requires: tuple[tuple[sympy.Basic, str], ...] = field(default=(), init=False)
    captured: dict[str, torch.Tensor] = field(default_factory=dict, init=False, compare=False, hash=False, repr=False)
    bindings: tuple[tuple[str, int], ...] = field(default=(), init=False, repr=False)
    selectors: tuple[tuple[str, Any], ...] = field(default=(), init=False, repr=False)

    def __post_init__(self) -> None:
        _check_int(self.num_heads, "num_heads")
        _check_int(self.head_dim, "head_dim")
        value_dim = self.head_dim if self.value_dim is None else self.value_dim
        _check_int(value_dim, "value_dim")
        kv_heads = self.num_heads if self.num_kv_heads is None else self.num_kv_heads
        _check_int(kv_heads, "num_kv_heads")
        head_table = _head_table(self.kv_head_of, kv_heads, self.num_heads)
        if self.num_heads % kv_heads and head_table is None:
            raise SpecError(
                f"num_heads={self.num_heads} is not divisible by num_kv_heads={kv_heads}; "
                "each kv head must serve the same number of query heads"
            )
        if not isinstance(self.rope, bool):
            raise SpecError(f"rope must be True or False, got {self.rope!r}")
        if self.rope and self.head_dim % 2:
            raise SpecError(f"rope=True needs an even head_dim (it rotates pairs d, d + D/2), got {self.head_dim}")
        scale = 1.0 / math.sqrt(self.head_dim) if self.scale is None else self.scale
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not (math.isfinite(scale) and scale > 0):
            raise SpecError(f"scale must be a positive finite number, got {self.scale!r}")
        if not self.name.replace("_", "").replace("-", "").replace(".", "").isalnum():
            raise SpecError(f"name {self.name!r} may only hold letters, digits, '_', '-' and '.'")
        mask, mmeta, mcap = _normalize(self.mask, trace_mask, "mask", boolean=True)
        mod, smeta, scap = _normalize(self.score_mod, trace_score_mod, "score_mod", boolean=False)
        subs = {X.H: self.num_heads}
        mask, mod = mask.subs(subs), mod.subs(subs)
        meta = mmeta.merge(smeta)
        set_ = object.__setattr__
        set_(self, "num_kv_heads", kv_heads)
        set_(self, "value_dim", value_dim)
        set_(self, "scale", float(scale))
        set_(self, "mask", mask)
        set_(self, "score_mod", mod)
        decls = _declare(mask, mod, meta, self.num_heads)
        if head_table is not None:
            if any(t.name == head_table for t in decls):
                raise SpecError(f"kv_head_of tensor {head_table!r} is also read by the mask or score_mod; rename one")
            decls = tuple(sorted((*decls, TensorDecl(head_table, "int", 1)), key=lambda t: t.name))
        set_(self, "tensors", decls)
        set_(self, "requires", meta.requires)
        set_(self, "selectors", meta.selectors)
        routing.check_spec(mask, mod, self.rope, meta.selectors)
        captured = _merge_captured(mcap, scap)
        set_(self, "captured", captured)
        set_(self, "bindings", tuple(sorted((n, id(t)) for n, t in captured.items())))

    @property
    def groups(self) -> int:
        """Query heads per kv head (0 when a head table assigns uneven groups)."""
        kv = int(self.num_kv_heads or self.num_heads)
        return 0 if self.num_heads % kv else self.num_heads // kv

    @property
    def head_table(self) -> str:
        """Name of the runtime head table (``kv_head_of``), or "" when kv head = h // groups."""
        return "" if self.kv_head_of is None else str(self.kv_head_of.name)

    def runtime_tensors(self) -> list[TensorDecl]:
        """Tensors to pass at call time (constant tables and captured tensors excluded)."""
        selected = dict(self.selectors)
        return [t for t in self.tensors if not t.values and t.name not in self.captured and t.name not in selected]


def _merge_captured(mask: dict[str, torch.Tensor], mod: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The mask's and the score mod's captured tensors; one name may not mean two tensors."""
    for name in set(mask) & set(mod):
        if mask[name] is not mod[name]:
            raise SpecError(f"mask and score_mod capture two different tensors both named {name!r}; rename one of them")
    return {**mask, **mod}


def _head_table(table: object, kv_heads: int, num_heads: int) -> str | None:
    """The name of a ``kv_head_of`` table (validated), or None."""
    from attncc.dsl import TensorRef

    if table is None:
        return None
    if not isinstance(table, TensorRef):
        raise SpecError(f"kv_head_of must be a tensor declared with ac.tensor(name), got {table!r}")
    if table.dtype not in (None, "int"):
        raise SpecError(f"kv_head_of tensor {table.name!r} holds kv-head numbers; declare it int, not {table.dtype}")
    return table.name


def _check_int(value: object, label: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SpecError(f"{label} must be a positive int, got {value!r}")


def _normalize(
    value: Any, tracer: Callable[[Any], Traced], label: str, boolean: bool
) -> tuple[sympy.Basic, Meta, dict[str, torch.Tensor]]:
    if value is None:
        return (sympy.true if boolean else X.score), EMPTY, {}
    captured: dict[str, torch.Tensor] = {}
    if isinstance(value, Expr):
        expr = value
    elif isinstance(value, bool) and boolean:
        expr = Expr(sympy.true if value else sympy.false)
    elif callable(value):
        traced = tracer(value)
        expr, captured = traced.expr, traced.captured
    elif isinstance(value, sympy.Basic):  # another spec's, after construction (dataclasses.replace copies it)
        raise SpecError(
            f"{label} `{X.expr_str(value)}` is another spec's {label} after construction, which has lost its "
            f"tensors' declarations; build the spec from the original {label} (the attncc expression or callable), "
            "e.g. AttentionSpec(..., name=...) again rather than dataclasses.replace(spec, ...)"
        )
    else:
        raise SpecError(f"{label} must be an attncc expression, a callable or None, got {type(value).__name__}")
    if boolean and not expr.is_boolean:
        raise SpecError(f"mask `{X.expr_str(expr.sym)}` is a number, not a condition; compare it (e.g. `... >= 0`)")
    if not boolean and expr.is_boolean:
        raise SpecError(f"score_mod `{X.expr_str(expr.sym)}` is a condition; a score mod returns a score")
    if expr.sym.has(sympy.nan, sympy.zoo) or (not boolean and expr.sym.has(sympy.oo)):
        bad = "NaN" if expr.sym.has(sympy.nan, sympy.zoo) else "+inf"
        raise SpecError(
            f"{label} `{X.expr_str(expr.sym)}` holds the constant {bad}, which has no softmax; "
            "use a mask (or -inf in a score_mod branch) to hide keys"
        )
    allowed = X.MASK_SYMBOLS if boolean else X.SCORE_SYMBOLS
    if unknown := X.unknown_symbols(expr.sym, allowed):
        hint = "; masks see b, h, q, kv only (use a score_mod for score)" if "score" in unknown else ""
        raise SpecError(f"{label} `{X.expr_str(expr.sym)}` uses unknown symbols {unknown}{hint}")
    return expr.sym, expr.meta, captured


def _declare(mask: sympy.Basic, mod: sympy.Basic, meta: Meta, num_heads: int) -> tuple[TensorDecl, ...]:
    tables, dtypes = dict(meta.tables), dict(meta.dtypes)
    mask_refs, mod_refs = X.tensor_refs(mask), X.tensor_refs(mod)
    decls = []
    for name in sorted(set(mask_refs) | set(mod_refs)):
        uses = mask_refs.get(name, []) + mod_refs.get(name, [])
        ranks = {len(idx) for idx in uses}
        if len(ranks) != 1:
            raise SpecError(f"tensor {name!r} is indexed with {sorted(ranks)} indices in different places")
        for idx in uses:
            _check_index(name, idx)
        values = tables.get(name, ())
        if values and len(values) != num_heads:
            raise SpecError(
                f"per-head table {name!r} has {len(values)} entries but num_heads={num_heads}; "
                "give one value per query head"
            )
        dtype = dtypes.get(name) or ("float" if name in mod_refs else "int")
        decls.append(TensorDecl(name, dtype, ranks.pop(), values))
    return tuple(decls)


def _check_index(name: str, index: tuple[sympy.Expr, ...]) -> None:
    for i in index:
        if X.score in i.free_symbols:
            raise SpecError(f"tensor {name!r} is indexed by `{X.expr_str(i)}`, which depends on the score")
        if i.is_integer is False or (i.is_integer is None and not i.atoms(sympy.Indexed)):
            raise SpecError(
                f"index `{X.expr_str(i)}` of tensor {name!r} is not an integer expression; use // for integer division"
            )


HEAD_TABLE = "attncc_head"  # a sharded spec's local query head -> global head index
Q_POS, KV_POS = "attncc_q_pos", "attncc_kv_pos"  # a sequence shard's rows / columns -> global positions


def for_heads(spec: AttentionSpec, heads: Sequence[int]) -> AttentionSpec:
    """``spec`` restricted to the query heads ``heads`` (whole kv-head groups, ascending), each keeping its
    global index: per-head tables keep their heads' entries, every other use of ``h`` (ALiBi's default slopes,
    a runtime tensor indexed by the head) reads the global index from a constant table. Kv head ``j`` of the
    result is the ``j``-th kv head the heads use. What a rank of head-sharded attention compiles.

    >>> import attncc as ac
    >>> spec = ac.AttentionSpec(num_heads=4, head_dim=8, mask=ac.sliding_window(ac.per_head([1, 2, 3, 4], "w")),
    ...                         score_mod=ac.alibi())
    >>> local = for_heads(spec, [1, 3])
    >>> [(t.name, t.values) for t in local.tensors]
    [('attncc_head', (1.0, 3.0)), ('w', (2.0, 4.0))]
    """
    if spec.head_table:
        raise SpecError(
            f"the spec reads kv heads through the runtime table {spec.head_table!r}; its heads cannot be split "
            "before the call says which query heads share a kv head"
        )
    heads = [int(h) for h in heads]
    groups = spec.groups
    if not heads or heads != sorted(set(heads)) or not all(0 <= h < spec.num_heads for h in heads):
        raise SpecError(f"heads {heads} must be distinct ascending query heads in [0, {spec.num_heads})")
    kv_heads = sorted({h // groups for h in heads})
    if len(heads) != len(kv_heads) * groups:
        raise SpecError(
            f"heads {heads} split a kv-head group (each kv head serves {groups} consecutive query heads); "
            "take whole groups"
        )
    tables = {t.name: t.values for t in spec.tensors if t.values}
    local_tables = {name: tuple(values[h] for h in heads) for name, values in tables.items()}
    held: dict[sympy.Basic, sympy.Symbol] = {}  # table[h] accesses, kept while the other uses of h are replaced

    def hold(e: sympy.Basic) -> sympy.Basic:
        if str(e.base) in tables:
            if e.indices != (X.h,):
                raise SpecError(f"per-head table access `{X.expr_str(e)}` is not indexed by h; cannot shard its heads")
            return held.setdefault(e, sympy.Dummy(str(e.base)))
        return e

    glob = X.tensor_base(HEAD_TABLE)[X.h]
    exprs = []
    for expr in (spec.mask, spec.score_mod):
        expr = expr.replace(lambda e: isinstance(e, sympy.Indexed), hold)
        expr = expr.xreplace({X.h: glob})
        exprs.append(expr.xreplace({d: e for e, d in held.items()}))
    if any(e.has(glob) for e in exprs):
        local_tables[HEAD_TABLE] = tuple(float(h) for h in heads)
    requires = tuple((c.subs(X.H, spec.num_heads), m) for c, m in spec.requires)
    return _rebuilt(spec, exprs[0], exprs[1], len(heads), len(kv_heads), local_tables, {}, requires)


def at_positions(spec: AttentionSpec, q_len: int, kv_len: int) -> AttentionSpec:
    """``spec`` on query rows and key columns that sit at global positions ``attncc_q_pos[q]`` and
    ``attncc_kv_pos[kv]`` (int runtime tensors passed at call time) of a ``q_len`` x ``kv_len`` attention:
    what one rank of sequence-parallel attention compiles. Runtime tensors keep their global indexing.

    >>> import attncc as ac
    >>> str(at_positions(ac.AttentionSpec(num_heads=1, head_dim=8, mask=ac.causal()), 64, 64).mask)
    'attncc_kv_pos[kv] <= attncc_q_pos[q]'
    """
    subs = {
        X.q: X.tensor_base(Q_POS)[X.q],
        X.kv: X.tensor_base(KV_POS)[X.kv],
        X.Sq: sympy.Integer(q_len),
        X.Skv: sympy.Integer(kv_len),
    }
    mask, mod = spec.mask.xreplace(subs), spec.score_mod.xreplace(subs)
    requires = tuple((c.subs({X.Sq: q_len, X.Skv: kv_len}), m) for c, m in spec.requires)
    for cond, message in requires:
        if cond is sympy.false:
            raise SpecError(f"{message} (at q_len={q_len}, kv_len={kv_len})")
    tables = {t.name: t.values for t in spec.tensors if t.values}
    return _rebuilt(spec, mask, mod, spec.num_heads, int(spec.num_kv_heads or spec.num_heads), tables,
                    {Q_POS: "int", KV_POS: "int"}, requires)  # fmt: skip


def _rebuilt(
    spec: AttentionSpec,
    mask: sympy.Basic,
    mod: sympy.Basic,
    num_heads: int,
    num_kv_heads: int,
    tables: dict[str, tuple[float, ...]],
    extra_dtypes: dict[str, str],
    requires: tuple[tuple[sympy.Basic, str], ...],
) -> AttentionSpec:
    if spec.selectors:
        raise SpecError(
            f"route_blocks selects from the whole q and k ({sorted(dict(spec.selectors))}); a spec restricted to "
            "some heads or positions cannot select: select first and pass the lists with ac.block_indices"
        )
    dtypes = {t.name: t.dtype for t in spec.tensors} | extra_dtypes
    dtypes.update({n: "int" if all(float(v).is_integer() for v in vals) else "float" for n, vals in tables.items()})
    meta = Meta(
        requires=tuple(r for r in requires if r[0] is not sympy.true),
        tables=tuple(sorted(tables.items())),
        dtypes=tuple(sorted(dtypes.items())),
    )
    out = AttentionSpec(
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=spec.head_dim,
        value_dim=spec.value_dim,
        mask=Expr(mask, meta),
        score_mod=Expr(mod, EMPTY),
        scale=spec.scale,
        name=spec.name,
        rope=spec.rope,
        kv_head_of=spec.kv_head_of if num_heads == spec.num_heads else None,
    )
    object.__setattr__(out, "captured", dict(spec.captured))
    object.__setattr__(out, "bindings", spec.bindings)
    return out
