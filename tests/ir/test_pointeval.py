"""Compiled point evaluation of bounds: interval arithmetic's floats on points, or no answer."""

from __future__ import annotations

import numpy as np
import sympy
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from attncc.ir import exprs as X
from attncc.ir import pointeval
from attncc.ir.boxeval import Box, interval

SYMBOLS = [X.q, X.h, X.Sq, X.Skv]


@st.composite
def bounds(draw: st.DrawFn, depth: int = 3) -> sympy.Expr:
    """Random bound expressions over the node kinds point functions compile (what bands are made of)."""
    if depth == 0 or draw(st.integers(0, 3)) == 0:
        if draw(st.booleans()):
            return draw(st.sampled_from(SYMBOLS))
        return sympy.Rational(draw(st.integers(-300, 300)), draw(st.sampled_from([1, 1, 2, 3, 7])))
    kind = draw(st.sampled_from(["add", "mul", "div", "floor", "ceiling", "mod", "min", "max", "abs"]))
    a, b = draw(bounds(depth - 1)), draw(bounds(depth - 1))
    if kind == "add":
        return a + b
    if kind == "mul":
        return a * draw(st.integers(-5, 5))  # (a product of two symbols' terms is a power: no point rule)
    if kind == "div":
        return a / draw(st.sampled_from([2, 3, 7, 64]))
    if kind in ("floor", "ceiling"):
        return getattr(sympy, kind)(a / draw(st.sampled_from([1, 3, 64])))
    if kind == "mod":
        return sympy.Mod(a, draw(st.integers(1, 9)))
    if kind in ("min", "max"):
        return getattr(sympy, kind.capitalize())(a, b)
    return sympy.Abs(a)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(bounds(), min_size=1, max_size=3),
    st.sampled_from(["max", "min"]),
    st.integers(1, 5000),
    st.integers(1, 5000),
    st.integers(1, 8),
)
def test_point_functions_give_the_floats_of_interval_arithmetic_on_points(
    exprs: list[sympy.Expr], pick: str, sq: int, skv: int, heads: int
) -> None:
    assume(not any(e.has(sympy.Pow) for e in exprs))  # sympy may fold a product into a power: no point rule
    rows = np.sort(np.random.default_rng(sq * skv).integers(0, sq, 9)).astype(np.float64)[None, :]
    hs = np.arange(heads, dtype=np.float64)[:, None]
    values = {X.q: rows, X.h: hs, X.Sq: float(sq), X.Skv: float(skv)}
    env = {s: Box.point(v) for s, v in values.items()}
    want = (np.maximum if pick == "max" else np.minimum).reduce(
        np.broadcast_arrays(*(interval(e, env, {}).lo for e in exprs))
    )
    got = pointeval.at(tuple(exprs), values, pick)
    assert got is not None, f"{exprs} was not compiled"  # every node drawn has a point rule, every value is finite
    np.testing.assert_array_equal(np.broadcast_to(got, np.broadcast_shapes(got.shape, want.shape)), want)


def test_what_has_no_point_rule_or_no_finite_value_is_left_to_interval_arithmetic() -> None:
    rows = {X.q: np.arange(4.0), X.h: np.zeros((1, 1))}
    table = sympy.Indexed(sympy.IndexedBase("w"), X.h)
    assert pointeval.at((X.q - table,), rows) is None  # a tensor read: its values are in the tables, not here
    assert pointeval.at((sympy.Piecewise((X.q, X.q < 2), (0, True)),), rows) is None
    assert pointeval.at((X.q**2,), rows) is None
    assert pointeval.at((X.kv,), rows) is None  # not a symbol bounds are written in
    assert pointeval.at((X.q - sympy.oo,), rows) is None  # an unbounded side
    assert pointeval.at((X.Skv - X.q,), rows) is None  # a size not given: NaN, not a guess
    np.testing.assert_array_equal(pointeval.at((X.q, 2 - X.q), rows, "min"), [0.0, 1.0, 0.0, -1.0])


@settings(max_examples=200, deadline=None)
@given(
    st.integers(-7, 7).filter(bool),
    st.sampled_from([1, 2, 3, 64]),
    st.one_of(st.just(-np.inf), st.floats(-1e6, 1e6)),
    st.one_of(st.just(np.inf), st.floats(0, 1e6)),
)
def test_a_constant_times_a_box_takes_the_general_products_floats(num: int, den: int, lo: float, width: float) -> None:
    """``c * x`` (and ``-x``) takes two products instead of the general rule's four, on every box, unbounded ends
    included: the same floats as the general rule, which a third factor of 1 sends it through."""
    x, one = sympy.Symbol("x"), sympy.Symbol("one")
    c = sympy.Rational(num, den)
    assume(c != 1)  # (1 * x is x)
    hi = lo + width if np.isfinite(lo) else width
    env = {x: Box(np.array([lo]), np.array([hi])), one: Box.point(1.0)}
    fast, general = interval(c * x, env, {}), interval(c * one * x, env, {})
    assert len((c * x).args) == 2 and len((c * one * x).args) == 3
    np.testing.assert_array_equal(fast.lo, general.lo)
    np.testing.assert_array_equal(fast.hi, general.hi)
