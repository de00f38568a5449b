"""AttentionSpec: the frozen, hashable declaration of one attention.

>>> import attncc as ac
>>> spec = ac.AttentionSpec(num_heads=8, num_kv_heads=2, head_dim=64,
...                         mask=ac.causal() & ac.sliding_window(256), score_mod=ac.softcap(30.0))
>>> spec.groups, spec.scale, str(spec.mask)
(4, 0.125, '(kv <= q) & (q - 256 <= kv)')
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch

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
    head_dim: size of each head. mask: boolean expression, FlexAttention mask_mod or None.
    score_mod: numeric expression over ``score``, FlexAttention score_mod or None.
    scale: score scale, default ``1/sqrt(head_dim)``.
    rope: rotate q and k by RoPE tables passed at call time (``rope_cos``, ``rope_sin``; see
    :mod:`attncc.rope`); the kernels apply the rotation in their prologue.

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
    """

    num_heads: int
    head_dim: int
    num_kv_heads: int | None = None
    mask: Any = None
    score_mod: Any = None
    scale: float | None = None
    name: str = "attention"
    rope: bool = False
    tensors: tuple[TensorDecl, ...] = field(default=(), init=False)
    requires: tuple[tuple[sympy.Basic, str], ...] = field(default=(), init=False)
    captured: dict[str, torch.Tensor] = field(default_factory=dict, init=False, compare=False, hash=False, repr=False)
    bindings: tuple[tuple[str, int], ...] = field(default=(), init=False, repr=False)

    def __post_init__(self) -> None:
        _check_int(self.num_heads, "num_heads")
        _check_int(self.head_dim, "head_dim")
        kv_heads = self.num_heads if self.num_kv_heads is None else self.num_kv_heads
        _check_int(kv_heads, "num_kv_heads")
        if self.num_heads % kv_heads:
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
        set_(self, "scale", float(scale))
        set_(self, "mask", mask)
        set_(self, "score_mod", mod)
        set_(self, "tensors", _declare(mask, mod, meta, self.num_heads))
        set_(self, "requires", meta.requires)
        captured = _merge_captured(mcap, scap)
        set_(self, "captured", captured)
        set_(self, "bindings", tuple(sorted((n, id(t)) for n, t in captured.items())))

    @property
    def groups(self) -> int:
        """Query heads per kv head."""
        return self.num_heads // int(self.num_kv_heads or self.num_heads)

    def runtime_tensors(self) -> list[TensorDecl]:
        """Tensors to pass at call time (constant tables and captured tensors excluded)."""
        return [t for t in self.tensors if not t.values and t.name not in self.captured]


def _merge_captured(mask: dict[str, torch.Tensor], mod: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The mask's and the score mod's captured tensors; one name may not mean two tensors."""
    for name in set(mask) & set(mod):
        if mask[name] is not mod[name]:
            raise SpecError(f"mask and score_mod capture two different tensors both named {name!r}; rename one of them")
    return {**mask, **mod}


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
