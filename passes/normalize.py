"""Pure rewrites that put mask and score expressions in attncc's normal form.

Integer relations become ``lhs <= rhs`` / ``Eq`` / ``Ne`` with positive coefficients on both
sides and the constant on the right-hand side, so hand-written and builtin masks print the same:

    q >= kv          ->  kv <= q
    q - kv < 256     ->  q <= kv + 255
    kv - q > -1      ->  q <= kv

Conjunctions keep the tightest of several bounds on the same linear form (disjunctions the
loosest), and constant subexpressions fold to ``true`` / ``false``.
"""

from __future__ import annotations

import math

import sympy
from sympy.core.relational import Relational

Bool = sympy.logic.boolalg.Boolean


def _split(e: sympy.Expr) -> tuple[sympy.Expr, sympy.Expr, sympy.Expr]:
    """e == pos - neg + const with positive coefficients in pos and neg."""
    pos, neg, const = sympy.Integer(0), sympy.Integer(0), sympy.Integer(0)
    for term in sympy.Add.make_args(sympy.expand(e)):
        coeff, rest = term.as_coeff_Mul()
        if rest == 1:
            const += coeff
        elif coeff > 0:
            pos += term
        else:
            neg -= term
    return pos, neg, const


def _gcd_scale(e: sympy.Expr) -> sympy.Expr:
    coeffs = [t.as_coeff_Mul()[0] for t in sympy.Add.make_args(e) if t.as_coeff_Mul()[1] != 1]
    if coeffs and all(c.is_Integer for c in coeffs):
        g = math.gcd(*(abs(int(c)) for c in coeffs))
        if g > 1:
            pos, neg, const = _split(e)  # g*L + c <= 0  <=>  L + ceil(c/g) <= 0
            return (pos - neg) / g + sympy.ceiling(const / g)
    return e


def relation(rel: Relational) -> sympy.Basic:
    """The normal form of one relation (unchanged if it is not over integers)."""
    e = sympy.expand(rel.lhs - rel.rhs)
    if e.is_number:
        return sympy.true if bool(type(rel)(e, 0)) else sympy.false
    if e.is_integer is not True:
        return rel
    if isinstance(rel, sympy.Eq | sympy.Ne):
        pos, neg, const = _split(e)
        lhs, rhs = (pos + const, neg) if const > 0 else (pos, neg - const)
        if sympy.default_sort_key(lhs) > sympy.default_sort_key(rhs) and const == 0:
            lhs, rhs = rhs, lhs
        return type(rel)(lhs, rhs, evaluate=False)
    # everything as e' <= 0
    if isinstance(rel, sympy.StrictLessThan):
        e = e + 1
    elif isinstance(rel, sympy.StrictGreaterThan):
        e = -e + 1
    elif isinstance(rel, sympy.GreaterThan):
        e = -e
    e = _gcd_scale(e)
    pos, neg, const = _split(e)
    if const > 0:
        return sympy.Le(pos + const, neg, evaluate=False)
    return sympy.Le(pos, neg - const, evaluate=False)


def _linear_key(rel: sympy.Basic) -> tuple[sympy.Expr, sympy.Expr] | None:
    """For ``lhs <= rhs``: (non-constant part of lhs - rhs, constant c) with lhs - rhs - c <= -c."""
    if not isinstance(rel, sympy.LessThan):
        return None
    e = rel.lhs - rel.rhs
    const = sum((t for t in sympy.Add.make_args(e) if t.is_number), sympy.Integer(0))
    return e - const, const


def _tighten(args: list[sympy.Basic], keep_tightest: bool) -> list[sympy.Basic]:
    best: dict[sympy.Expr, tuple[sympy.Expr, sympy.Basic]] = {}
    out: list[sympy.Basic] = []
    for a in args:
        key = _linear_key(a)
        if key is None:
            out.append(a)
            continue
        form, const = key  # form + const <= 0, tighter when const is larger
        if form not in best or (const > best[form][0]) == keep_tightest:
            best[form] = (const, a)
    return out + [a for _, a in best.values()]


def boolean(expr: sympy.Basic) -> sympy.Basic:
    """Normal form of a boolean mask expression."""
    if isinstance(expr, Relational):
        return relation(expr)
    if isinstance(expr, sympy.And | sympy.Or):
        args = [boolean(a) for a in expr.args]
        args = _tighten(args, keep_tightest=isinstance(expr, sympy.And))
        return type(expr)(*args)
    if isinstance(expr, sympy.Not):
        inner = boolean(expr.args[0])
        if isinstance(inner, Relational):
            return relation(inner.negated)
        return sympy.Not(inner)
    if isinstance(expr, sympy.ITE | sympy.Xor):
        return type(expr)(*(boolean(a) if isinstance(a, Bool) else a for a in expr.args))
    return expr
