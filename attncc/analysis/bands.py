"""Recognize banded masks: unions of bands ``lo(q) <= kv <= hi(q)``.

A band's bounds are maxima / minima of affine functions of q with slope 0 or 1, whose
constants may use Sq, Skv and constant per-head tables. Causal (both alignments), sliding
windows, prefix-LM, sinks and their ``&`` / ``|`` combinations are banded. For a banded mask the
block map is a few kv-block ranges per q-block, computed in closed form in O(Sq) without
evaluating any (q, kv) pair.

>>> import attncc as ac
>>> from attncc.passes.normalize import boolean
>>> bands_of(boolean((ac.sliding_window(128) | ac.sinks(4)).sym))
[Band(lo=0, hi=3), Band(lo=q - 128, hi=q)]
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import sympy

from attncc.ir.exprs import Skv, Sq, b, h, kv, q, qb

MAX_BANDS = 8


@dataclass(frozen=True)
class Band:
    """Visible keys of query q: ``max(lows) <= kv <= min(highs)``; each bound is affine in q
    (slope 0 or 1) with constants in Sq, Skv and constant tables indexed by h."""

    lows: tuple[sympy.Expr, ...]
    highs: tuple[sympy.Expr, ...]

    def __and__(self, other: Band) -> Band:
        return Band(_union(self.lows, other.lows), _union(self.highs, other.highs))

    @property
    def lo(self) -> sympy.Expr:
        return sympy.Max(*self.lows) if len(self.lows) > 1 else self.lows[0]

    @property
    def hi(self) -> sympy.Expr:
        return sympy.Min(*self.highs) if len(self.highs) > 1 else self.highs[0]

    def __repr__(self) -> str:
        return f"Band(lo={self.lo}, hi={self.hi})"


def _union(a: tuple[sympy.Expr, ...], b: tuple[sympy.Expr, ...]) -> tuple[sympy.Expr, ...]:
    return a + tuple(x for x in b if x not in a)


FULL = Band((sympy.Integer(0),), (Skv - 1,))


def _constant_ok(expr: sympy.Expr, tables: frozenset[str], read: frozenset[str]) -> bool:
    """Allowed in a band constant: numbers, Sq, Skv, constant tables (``tables``) indexed by h, and, for maps
    of one q-block only (``Recipe.read_bands``), runtime tensors (``read``) indexed by h or b."""
    for acc in expr.atoms(sympy.Indexed):
        name = str(acc.base)
        if not ((name in tables and acc.indices == (h,)) or (name in read and acc.indices in ((h,), (b,)))):
            return False
    plain = expr.subs({acc: 0 for acc in expr.atoms(sympy.Indexed)})
    return plain.free_symbols <= {Sq, Skv}


def relation_band(
    rel: sympy.Basic, tables: frozenset[str] = frozenset(), read: frozenset[str] = frozenset()
) -> Band | None:
    """The band of one normalized relation ``e <= 0`` (kv bounded by an affine function of q), or None. A relation
    that reads a runtime tensor of ``read`` may also be strict or ``>=`` (normalization keeps those where it cannot
    tell that the tensor's values are integers): ``kv < x`` is ``kv <= ceil(x) - 1``, q and kv being integers."""
    strict = False
    if isinstance(rel, sympy.StrictLessThan | sympy.StrictGreaterThan | sympy.GreaterThan) and any(
        str(acc.base) in read for acc in rel.atoms(sympy.Indexed)
    ):
        sign = 1 if isinstance(rel, sympy.StrictLessThan) else -1
        e, strict = sympy.expand(sign * (rel.lhs - rel.rhs)), not isinstance(rel, sympy.GreaterThan)  # e (<)<= 0
    elif isinstance(rel, sympy.LessThan):
        e = sympy.expand(rel.lhs - rel.rhs)  # e <= 0
    else:
        return None
    a, c = e.coeff(q), e.coeff(kv)
    rest = e - a * q - c * kv
    if q in rest.free_symbols or kv in rest.free_symbols or not _constant_ok(rest, tables, read):
        return None
    if c == 1 and a in (0, -1):  # kv <= -a*q - rest (kv < -a*q - rest: kv <= -a*q + ceil(-rest) - 1)
        return Band((sympy.Integer(0),), (-a * q + sympy.ceiling(-rest) - 1 if strict else -a * q - rest,))
    if c == -1 and a in (0, 1):  # kv >= a*q + rest (kv > a*q + rest: kv >= a*q + floor(rest) + 1)
        return Band((a * q + sympy.floor(rest) + 1 if strict else a * q + rest,), (Skv - 1,))
    return None


def _dnf(expr: sympy.Basic, tables: frozenset[str], read: frozenset[str] = frozenset()) -> list[Band] | None:
    if expr is sympy.true:
        return [FULL]
    if isinstance(expr, sympy.Or):
        out: list[Band] = []
        for arg in expr.args:
            part = _dnf(arg, tables, read)
            if part is None:
                return None
            out += part
        return out if len(out) <= MAX_BANDS else None
    if isinstance(expr, sympy.And):
        acc = [FULL]
        for arg in expr.args:
            part = _dnf(arg, tables, read)
            if part is None or len(acc) * len(part) > MAX_BANDS:
                return None
            acc = [x & y for x, y in itertools.product(acc, part)]
        return acc
    band = relation_band(expr, tables, read)
    return None if band is None else [band]


def bands_of(
    mask: sympy.Basic, constant_tables: frozenset[str] = frozenset(), read: frozenset[str] = frozenset()
) -> list[Band] | None:
    """The bands of a normalized mask, or None when it is not banded. ``read``: runtime tensors a bound may read
    (indexed by h or b), for the maps of one q-block (``tiling.Recipe.read_bands``); kernels never iterate such
    bands in closed form.

    >>> from attncc.passes.normalize import boolean
    >>> import attncc as ac
    >>> lens = (ac.kv < ac.tensor("lens")[ac.b]).sym
    >>> bands_of(boolean(lens)), bands_of(boolean(lens), read=frozenset({"lens"}))
    (None, [Band(lo=0, hi=ceiling(lens[b]) - 1)])
    """
    bands = _dnf(mask, constant_tables, read)
    if bands is None:
        return None
    return [Band(_drop(b.lows, sympy.Integer(0)), _drop(b.highs, Skv - 1)) for b in bands]


def _drop(bounds: tuple[sympy.Expr, ...], trivial: sympy.Expr) -> tuple[sympy.Expr, ...]:
    """Drop the trivial bound (0 below, Skv - 1 above) that FULL introduced, unless it is alone."""
    kept = tuple(x for x in bounds if x != trivial)
    return kept or (trivial,)


def block_ranges(band: Band, bq: int, bkv: int) -> tuple[tuple[sympy.Expr, sympy.Expr], tuple[sympy.Expr, sympy.Expr]]:
    """Closed-form (computed, full) kv-block ranges of q-block ``qb`` for one band, unclipped.

    >>> block_ranges(Band((q - 128,), (q,)), 64, 64)
    ((qb - 2, qb), (qb - 1, qb - 1))
    """
    first, last = qb * bq, qb * bq + bq - 1
    computed = (sympy.floor(band.lo.subs(q, first) / bkv), sympy.floor(band.hi.subs(q, last) / bkv))
    full = (sympy.ceiling(band.lo.subs(q, last) / bkv), sympy.floor((band.hi.subs(q, first) + 1) / bkv) - 1)
    return computed, full
