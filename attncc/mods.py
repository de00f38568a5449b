"""Builtin score mods: numeric expressions over ``score`` (the scaled q.k) and the indices.

Compose them with :func:`chain`: ``chain(alibi(), softcap(30))`` applies alibi, then softcap.

>>> import attncc as ac
>>> ac.softcap(30.0).sym
30*tanh(score/30)
"""

from __future__ import annotations

from collections.abc import Sequence

import sympy

from attncc.dsl import Expr, TensorRef, lift, per_head
from attncc.errors import SpecError
from attncc.ir import exprs as X


def alibi(slopes: Sequence[float] | TensorRef | None = None) -> Expr:
    """ALiBi: ``score - slope[h] * |q - kv|``; default slopes ``2**(-8 (h+1) / H)``.

    ``slopes`` may be a list (one per head) or a runtime tensor of shape [H].
    """
    if slopes is None:
        slope = Expr(sympy.Integer(2) ** (-8 * (X.h + 1) / X.H))
    elif isinstance(slopes, TensorRef):
        slope = TensorRef(slopes.name, slopes.dtype or "float")[X.h]
    elif isinstance(slopes, Sequence) and not isinstance(slopes, str):
        slope = per_head(list(slopes), name="alibi_slopes")
    else:
        raise SpecError(
            f"alibi(slopes) takes one slope per query head (a list), a runtime tensor (ac.tensor) or None "
            f"for the default 2**(-8(h+1)/H); got {type(slopes).__name__} {slopes!r} "
            "(the number of heads comes from the spec's num_heads)"
        )
    return Expr(X.score) - slope * abs(Expr(X.q) - Expr(X.kv))


def softcap(cap: float) -> Expr:
    """Gemma-2/Grok style logit soft-capping: ``cap * tanh(score / cap)``."""
    if not isinstance(cap, int | float) or isinstance(cap, bool) or not cap > 0:
        raise SpecError(f"softcap(cap) needs a positive number, got {cap!r}")
    c = lift(cap)
    return c * Expr(sympy.tanh(X.score / c.sym))


def relative_bias(table: TensorRef, max_distance: int) -> Expr:
    """A learned bias per head and clipped relative position (T5/Music-Transformer style):
    ``score + table[h, clamp(kv - q, -max_distance, max_distance) + max_distance]``.

    ``table`` has shape [H, 2 * max_distance + 1]; it may require grad.
    """
    if not isinstance(table, TensorRef):
        raise SpecError(f"relative_bias() takes a tensor declared with ac.tensor(name), got {table!r}")
    if not isinstance(max_distance, int) or max_distance < 0:
        raise SpecError(f"relative_bias(max_distance) must be an int >= 0, got {max_distance!r}")
    rel = sympy.Min(sympy.Max(X.kv - X.q, -max_distance), max_distance) + max_distance
    return Expr(X.score) + TensorRef(table.name, table.dtype or "float")[X.h, rel]


def chain(*mods: Expr) -> Expr:
    """Apply score mods in order: each sees the score the previous one produced."""
    if not mods:
        raise SpecError("chain() needs at least one score mod")
    out = lift(mods[0])
    for mod in mods[1:]:
        m = lift(mod)
        out = Expr(m.sym.subs(X.score, out.sym), out.meta.merge(m.meta))
    return out
