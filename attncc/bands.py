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

from attncc.ir.exprs import Skv, Sq, h, kv, q

MAX_BANDS = 8


@dataclass(frozen=True)
class Band:
    """Visible keys of query q: ``lo <= kv <= hi`` (expressions in q, h, Sq, Skv, tables[h])."""

    lo: sympy.Expr
    hi: sympy.Expr

    def __and__(self, other: Band) -> Band:
        return Band(sympy.Max(self.lo, other.lo), sympy.Min(self.hi, other.hi))


FULL = Band(sympy.Integer(0), Skv - 1)


def _constant_ok(expr: sympy.Expr) -> bool:
    """Allowed in a band constant: numbers, Sq, Skv, constant tables indexed by h."""
    for acc in expr.atoms(sympy.Indexed):
        if acc.indices != (h,):
            return False
    plain = expr.subs({acc: 0 for acc in expr.atoms(sympy.Indexed)})
    return plain.free_symbols <= {Sq, Skv}


def _relation(rel: sympy.Basic, tables: frozenset[str]) -> Band | None:
    if not isinstance(rel, sympy.LessThan):
        return None
    e = sympy.expand(rel.lhs - rel.rhs)  # e <= 0
    a, c = e.coeff(q), e.coeff(kv)
    rest = e - a * q - c * kv
    if q in rest.free_symbols or kv in rest.free_symbols or not _constant_ok(rest):
        return None
    if any(str(acc.base) not in tables for acc in rest.atoms(sympy.Indexed)):
        return None
    if c == 1 and a in (0, -1):  # kv <= -a*q - rest
        return Band(sympy.Integer(0), -a * q - rest)
    if c == -1 and a in (0, 1):  # kv >= a*q + rest
        return Band(a * q + rest, Skv - 1)
    return None


def _dnf(expr: sympy.Basic, tables: frozenset[str]) -> list[Band] | None:
    if expr is sympy.true:
        return [FULL]
    if isinstance(expr, sympy.Or):
        out: list[Band] = []
        for arg in expr.args:
            part = _dnf(arg, tables)
            if part is None:
                return None
            out += part
        return out if len(out) <= MAX_BANDS else None
    if isinstance(expr, sympy.And):
        acc = [FULL]
        for arg in expr.args:
            part = _dnf(arg, tables)
            if part is None or len(acc) * len(part) > MAX_BANDS:
                return None
            acc = [x & y for x, y in itertools.product(acc, part)]
        return acc
    band = _relation(expr, tables)
    return None if band is None else [band]


def bands_of(mask: sympy.Basic, constant_tables: frozenset[str] = frozenset()) -> list[Band] | None:
    """The bands of a normalized mask, or None when it is not banded."""
    bands = _dnf(mask, constant_tables)
    if bands is None:
        return None
    return [Band(_tidy(b.lo, lower=True), _tidy(b.hi, lower=False)) for b in bands]


def _tidy(expr: sympy.Expr, lower: bool) -> sympy.Expr:
    """Drop the trivial bounds 0 (from below) and Skv - 1 (from above) that FULL introduced."""
    if lower and isinstance(expr, sympy.Max):
        args = [a for a in expr.args if a != 0]
        return sympy.Max(*args) if args else sympy.Integer(0)
    if not lower and isinstance(expr, sympy.Min):
        args = [a for a in expr.args if a != Skv - 1]
        return sympy.Min(*args) if args else Skv - 1
    return expr
