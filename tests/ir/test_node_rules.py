"""Every sympy node kind a traced callable can produce is handled everywhere it must be (issue 21).

``torchfuncs.sympy_nodes()`` names the node kinds the tracer emits. Each must have an emitter on
every target (C++, PyTorch, Triton) and interval rules in both analyses (``boxeval`` for block
maps, ``intervals`` for band ranges). The rules are checked *sound* against the values torch itself
computes for the same function on every point of a box: a rule may be loose (the tile becomes
partial) but must never exclude a value that occurs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import sympy
import torch

from attncc import torchfuncs
from attncc.codegen import emit_cpp, emit_torch, emit_triton
from attncc.ir import boxeval, intervals
from attncc.ir.exprs import h, kv, q
from attncc.trace import trace_mask, trace_score_mod

TABLE = torch.tensor([3.0, -1.0, 0.5, 7.0, -2.0, 4.0, 0.0, 1.5])

# name -> a function of (h, q, kv) written with torch operations; h in [0, 3], q and kv in [0, 15]
NUMERIC: dict[str, Callable[..., Any]] = {
    "add_mul": lambda h, q, kv: 3 * q - 2 * kv + h,
    "pow_int": lambda h, q, kv: (q - kv) ** 2 + (q + 1.0) ** -1,
    "pow_root": lambda h, q, kv: torch.sqrt(q - kv + 3.0),  # NaN where q - kv < -3
    "rsqrt": lambda h, q, kv: torch.rsqrt(q + 1.0),
    "exp2_slope": lambda h, q, kv: torch.exp2(-((h + 1) * 8.0 / 4)) * kv,
    "floor_ceil": lambda h, q, kv: torch.floor(q / 3.0) - torch.ceil(kv / 5.0),
    "mod": lambda h, q, kv: (q * 3 + kv) % 7,
    "min_max_clamp": lambda h, q, kv: torch.minimum(q, kv + 2) + (q - kv).clamp(-3, 4) + torch.maximum(q, h),
    "abs_sign": lambda h, q, kv: (q - kv).abs() * torch.sign(q - 7 - kv),
    "piecewise": lambda h, q, kv: torch.where(q >= kv, q - kv, torch.zeros_like(q)),
    "exp_log": lambda h, q, kv: torch.exp(-(q - kv).abs() / 4.0) + torch.log(q - kv + 1.0),  # NaN below the band
    "log2_log10": lambda h, q, kv: torch.log2(q + 1.0) - torch.log10(kv + 1.0),
    "tanh_sigmoid": lambda h, q, kv: torch.tanh((q - kv) / 3.0) + torch.sigmoid(kv - 8.0),
    "sin_cos": lambda h, q, kv: torch.sin(q * 0.3) * torch.cos(kv * 0.7),
    "indexed": lambda h, q, kv: TABLE[(q + kv) % 8],
    "round_trunc": lambda h, q, kv: torch.round(q / 4.0) + torch.trunc((kv - 7) / 3.0),
}

CONDITIONS: dict[str, Callable[..., Any]] = {
    "relations": lambda h, q, kv: (q < kv + 3) & (q <= 9) | (q > 12) & (kv >= 2),
    "eq_ne": lambda h, q, kv: (q // 4 == kv // 4) & (q != kv),
    "not_xor": lambda h, q, kv: ~(q < 5) ^ (kv < 9),
    "logical_not": lambda h, q, kv: torch.logical_not((q < kv) | (kv * kv > q + 3)),
    "conditions_compared": lambda h, q, kv: (q < 8) == (kv < 8),
    "ite": lambda h, q, kv: torch.where(q < 6, kv < 3, kv >= q),
    "log_below_zero": lambda h, q, kv: torch.log(q - kv + 0.5) < 1.0,  # NaN (hidden) wherever q < kv
    "sqrt_band": lambda h, q, kv: torch.sqrt(q - kv) <= 2.0,
}


def _symbolic(fn: Callable[..., Any], condition: bool) -> sympy.Basic:
    if condition:
        return trace_mask(lambda b, hh, qq, kk: fn(hh, qq, kk)).expr.sym
    return trace_score_mod(lambda s, b, hh, qq, kk: fn(hh, qq, kk)).expr.sym


def _truth(fn: Callable[..., Any]) -> np.ndarray:
    """fn on every (h, q, kv) of [0, 3] x [0, 15] x [0, 15], computed by torch in float64."""
    hh, qq, kk = torch.arange(4).view(4, 1, 1), torch.arange(16).view(1, 16, 1), torch.arange(16).view(1, 1, 16)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # `q + 1.0` and `q / 3` in float64, as the analysis computes
    try:
        out = fn(hh, qq, kk)
    finally:
        torch.set_default_dtype(default)
    return torch.as_tensor(out, dtype=torch.float64).expand(4, 16, 16).numpy()


def _tile_env() -> dict[sympy.Basic, boxeval.Box]:
    """4 x 4 tiles of 4 x 4 points, per head."""
    starts = np.arange(0, 16, 4, dtype=np.float64)
    return {
        h: boxeval.Box(np.arange(4.0).reshape(4, 1, 1), np.arange(4.0).reshape(4, 1, 1)),
        q: boxeval.Box(starts.reshape(1, 4, 1), starts.reshape(1, 4, 1) + 3),
        kv: boxeval.Box(starts.reshape(1, 1, 4), starts.reshape(1, 1, 4) + 3),
    }


def _tiles(values: np.ndarray) -> np.ndarray:
    """[4, 16, 16] -> [4, 4, 4, 16]: the 16 points of each tile on the last axis."""
    return values.reshape(4, 4, 4, 4, 4).transpose(0, 1, 3, 2, 4).reshape(4, 4, 4, 16)


def test_every_node_kind_is_exercised_here() -> None:
    seen: set[type] = set()
    for table, condition in ((NUMERIC, False), (CONDITIONS, True)):
        for fn in table.values():
            seen |= {type(n) for n in sympy.preorder_traversal(_symbolic(fn, condition))}
    missing = [k.__name__ for k in torchfuncs.sympy_nodes() if not any(issubclass(s, k) for s in seen)]
    assert not missing, f"node kinds the tracer produces but no sample here uses: {missing}"


@pytest.mark.parametrize("name", list(NUMERIC) + list(CONDITIONS))
def test_every_target_emits_the_node(name: str) -> None:
    condition = name in CONDITIONS
    expr = _symbolic((CONDITIONS if condition else NUMERIC)[name], condition)
    for emitter in (emit_cpp.emit, emit_torch.emit, emit_triton.emit):
        assert emitter(expr).strip(), f"{emitter.__module__} emitted nothing for {expr}"


@pytest.mark.parametrize("name", list(NUMERIC))
def test_interval_rules_contain_every_value_torch_computes(name: str) -> None:
    fn = NUMERIC[name]
    expr = _symbolic(fn, False)
    truth = _truth(fn)
    tables = {"TABLE": boxeval.TensorRanges(TABLE.numpy())}
    box = boxeval.interval(expr, _tile_env(), tables)
    per_tile = _tiles(truth)
    lo, hi = (np.broadcast_to(x, (4, 4, 4)) for x in (box.lo, box.hi))
    finite = ~np.isnan(per_tile)
    nan_tiles = (~finite).any(-1)
    # a tile where NaN occurs must claim nothing; elsewhere every value lies inside the box
    assert np.all(~nan_tiles | (np.isneginf(lo) & np.isposinf(hi))), f"{expr}: a NaN tile got a finite bound"
    inside = (per_tile >= lo[..., None] - 1e-9) & (per_tile <= hi[..., None] + 1e-9)
    assert np.all(inside | ~finite), f"{expr}: a value escapes its tile's interval"

    whole = intervals.bounds(
        expr, {h: intervals.Interval(0, 3), q: intervals.Interval(0, 15), kv: intervals.Interval(0, 15)},
        {"TABLE": intervals.Interval(float(TABLE.min()), float(TABLE.max()))},
    )  # fmt: skip
    if np.isnan(truth).any():
        assert whole == intervals.TOP, f"{expr}: NaN occurs but intervals claims {whole}"
    else:
        assert whole.lo - 1e-9 <= truth.min() and truth.max() <= whole.hi + 1e-9, f"{expr}: {whole}"


@pytest.mark.parametrize("name", list(CONDITIONS))
def test_three_valued_rules_never_prove_a_wrong_tile(name: str) -> None:
    fn = CONDITIONS[name]
    expr = _symbolic(fn, True)
    truth = _tiles(_truth(lambda hh, qq, kk: fn(hh, qq, kk).double()) > 0)
    may_true, may_false = (np.broadcast_to(x, (4, 4, 4)) for x in boxeval.evaluate(expr, _tile_env()))
    assert np.all(may_true | ~truth.any(-1)), f"{expr}: a tile with a visible point was proven empty"
    assert np.all(may_false | truth.all(-1)), f"{expr}: a tile with a hidden point was proven full"


def test_a_float_beyond_2_53_stays_a_float_in_every_printer() -> None:
    """torch.finfo(float32).min is an integral float; read as an exact sympy Integer it once became
    ``INT64_C(-340282346638528860000000000000000000000)`` in C++ (an overflowing literal: masked keys got
    a wrong bias) and a Python int the reference's torch.where refused."""
    from attncc.ir.exprs import to_sympy_number

    big = to_sympy_number(torch.finfo(torch.float32).min)
    assert isinstance(big, sympy.Float) and float(big) == torch.finfo(torch.float32).min
    expr = sympy.Piecewise((big, sympy.Lt(q, kv)), (sympy.Integer(-(2**70)) + q, True))
    for emitter in (emit_cpp.emit, emit_torch.emit, emit_triton.emit):
        text = emitter(expr)
        assert "340282346638528860000000000000000000000" not in text and "1180591620717411303424" not in text, text
    assert "e+21" in emit_cpp.emit(sympy.Integer(-(2**70)) + q), "an integer no int64_t holds is a double"
