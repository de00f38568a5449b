"""The declaration language: operators, helpers, per-head tables, builtin parameter errors."""

from __future__ import annotations

import dataclasses

import pytest
import sympy
import torch

import attncc as ac
from attncc.errors import SpecError
from attncc.ir import exprs as X


def test_operators_build_sympy() -> None:
    e = (ac.q // 64 == ac.kv // 64) & ~(ac.kv % 3 == 1) | (abs(ac.q - ac.kv) <= 2)
    assert e.is_boolean
    assert e.sym == sympy.Or(
        sympy.And(sympy.Eq(sympy.floor(X.q / 64), sympy.floor(X.kv / 64)), sympy.Not(sympy.Eq(sympy.Mod(X.kv, 3), 1))),
        sympy.Le(sympy.Abs(X.q - X.kv), 2),
    )
    assert ac.where(ac.q > ac.kv, ac.score, -1.5).sym == sympy.Piecewise(
        (X.score, X.q > X.kv), (sympy.Rational(-3, 2), True)
    )
    assert ac.minimum(ac.q, 3, ac.kv).sym == sympy.Min(X.q, 3, X.kv)
    assert ac.clamp(ac.kv - ac.q, -4, 4).sym == sympy.Min(sympy.Max(X.kv - X.q, -4), 4)
    assert (0.1 * ac.score).sym == X.score / 10, "floats become their shortest exact rational"


@pytest.mark.parametrize(
    "bad,message",
    [
        (lambda: ac.q & ac.kv, r"operator & combines conditions but `q` is a number"),
        (lambda: (ac.q < 3) + 1, r"operator \+ needs numbers but `q < 3` is boolean"),
        (lambda: ac.where(ac.q, 1, 2), r"where\(\): condition `q` is not boolean"),
        (lambda: ac.tensor("doc")[ac.q < 2], r"tensor 'doc' indexed by a condition `q < 2`"),
        (lambda: ac.tensor("q"), r"tensor name 'q' must be an identifier other than"),
        (lambda: ac.tensor("t", dtype="half"), r"dtype must be 'int', 'float' or 'bool'"),
        (lambda: ac.q + "x", r"cannot use a str \('x'\) in an attncc expression"),
        (lambda: bool(ac.q < ac.kv), r"truth value of symbolic expression `q < kv` is not known"),
        (lambda: ac.sliding_window(-1), r"sliding_window\(left\) must be >= 0, got -1"),
        (lambda: ac.causal("middle"), r"align must be 'top_left' or 'bottom_right'"),
        (lambda: ac.neighborhood((8, 8), (3, 9)), r"kernel 9 x dilation 1 = 9 exceeds the axis length 8"),
        (lambda: ac.neighborhood((8, 8), (3, 3), stride=(4, 1)), r"stride 4 must not exceed the kernel 3"),
        (lambda: ac.neighborhood((8, 8), (3, 3, 3)), r"neighborhood\(kernel\) has 3 entries but the grid has 2 axes"),
        (lambda: ac.grid_attention((8, 6), 4), r"axis of length 6 is not divisible by groups=4"),
        (lambda: ac.softcap(0), r"softcap\(cap\) needs a positive number"),
        (lambda: ac.block_layout(ac.tensor("l"), block=(0, 64)), r"block_layout\(block\) must be a positive int"),
        (
            lambda: ac.per_head([1, 2], name="w") + ac.per_head([3, 4], name="w"),
            r"two different per-head tables are both named 'w'",
        ),
    ],
)
def test_dsl_errors(bad, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SpecError, match=message):
        bad()


def test_spec_is_frozen_hashable_and_normalized() -> None:
    a = ac.AttentionSpec(num_heads=8, num_kv_heads=2, head_dim=64, mask=ac.causal(), score_mod=ac.alibi())
    b = ac.AttentionSpec(num_heads=8, num_kv_heads=2, head_dim=64, mask=ac.causal(), score_mod=ac.alibi())
    assert a == b and hash(a) == hash(b) and a.groups == 4 and a.scale == 0.125
    assert X.H not in a.score_mod.free_symbols, "H is replaced by num_heads"
    with pytest.raises(AttributeError):
        a.num_heads = 4  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"num_heads": 8, "num_kv_heads": 3, "head_dim": 64}, r"num_heads=8 is not divisible by num_kv_heads=3"),
        ({"num_heads": 0, "head_dim": 64}, r"num_heads must be a positive int, got 0"),
        ({"num_heads": 2, "head_dim": 64, "value_dim": 0}, r"value_dim must be a positive int, got 0"),
        ({"num_heads": 2, "head_dim": 64, "value_dim": 32.0}, r"value_dim must be a positive int, got 32.0"),
        ({"num_heads": 2, "head_dim": 64, "scale": -1.0}, r"scale must be a positive finite number"),
        ({"num_heads": 2, "head_dim": 8, "mask": ac.q - ac.kv}, r"mask `-kv \+ q` is a number, not a condition"),
        (
            {"num_heads": 2, "head_dim": 8, "mask": ac.score > 0},
            r"uses unknown symbols \['score'\]; masks see b, h, q, kv only",
        ),
        ({"num_heads": 2, "head_dim": 8, "score_mod": ac.q > 1}, r"score_mod `q > 1` is a condition"),
        (
            {"num_heads": 2, "head_dim": 8, "mask": ac.Expr(sympy.Le(X.q, sympy.Symbol("n")))},
            r"unknown symbols \['n'\]",
        ),
        (
            {"num_heads": 3, "head_dim": 8, "mask": ac.sliding_window(ac.per_head([1, 2], name="w"))},
            r"per-head table 'w' has 2 entries but num_heads=3",
        ),
        (
            {"num_heads": 2, "head_dim": 8, "mask": ac.tensor("doc")[ac.q / 2] == 0},
            r"index `q/2` of tensor 'doc' is not an integer expression; use // for integer division",
        ),
        (
            {"num_heads": 2, "head_dim": 8, "mask": (ac.tensor("d")[ac.q] == 0) & (ac.tensor("d")[ac.q, ac.kv] == 1)},
            r"tensor 'd' is indexed with \[1, 2\] indices in different places",
        ),
        ({"num_heads": 2, "head_dim": 8, "mask": 3}, r"mask must be an attncc expression, a callable or None, got int"),
    ],
)
def test_spec_errors(kwargs: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(SpecError, match=message):
        ac.AttentionSpec(**kwargs)


# ---- errors a user meets first (issue 13, item 10) ------------------------------------------------------


def test_alibi_with_a_head_count_says_what_it_takes() -> None:
    with pytest.raises(ac.SpecError, match=r"alibi\(slopes\) takes one slope per query head.*got int 4"):
        ac.alibi(4)
    assert ac.AttentionSpec(num_heads=2, head_dim=8, score_mod=ac.alibi([0.5, 0.25])).tensors[0].values == (0.5, 0.25)


def test_a_spec_copied_by_dataclasses_replace_says_how_to_make_one() -> None:
    """After construction a spec holds its mask as sympy, without the tensors' declarations: a copy made from it
    (``dataclasses.replace``) is refused, naming the mask and what to do, instead of a bare type error."""
    spec = ac.AttentionSpec(num_heads=2, head_dim=8, mask=ac.tensor("x", dtype="float")[ac.h] > ac.kv)
    with pytest.raises(
        ac.SpecError, match=r"mask `x\[h\] > kv` is another spec's mask after construction.*name=\.\.\."
    ):
        dataclasses.replace(spec, name="other")


def test_tensor_names_of_the_wrong_type_are_refused() -> None:
    with pytest.raises(ac.SpecError, match="tensor name must be a str, got int 3"):
        ac.tensor(3)  # type: ignore[arg-type]


def test_a_misspelled_runtime_keyword_names_both_sides() -> None:
    spec = ac.AttentionSpec(num_heads=1, head_dim=8, mask=ac.document(ac.tensor("doc_ids")))
    x = torch.randn(1, 1, 4, 8)
    with pytest.raises(
        ac.SpecError,
        match=r"missing runtime tensors \['doc_ids'\] and unexpected .*\['doc_id'\]; "
        r"did you mean 'doc_id' -> 'doc_ids'\?",
    ):
        ac.compile(spec, target="reference")(x, x, x, doc_id=torch.zeros(4, dtype=torch.long))


def test_bad_knobs_and_backend_options_raise_attncc_errors() -> None:
    from attncc import config

    with pytest.raises(ac.AttnccError, match="ATTNCC_DEBUG must be an integer"):
        config.from_env({"ATTNCC_DEBUG": "lots"})
    with pytest.raises(ac.AttnccError, match="ATTNCC_CPU_ISA must be one of"):
        config.from_env({"ATTNCC_CPU_ISA": "sse9"})
    with pytest.raises(ac.AttnccError, match="unknown attncc backend options"):
        ac.dynamo.backend(torch.fx.symbolic_trace(torch.nn.Identity()), [], options={"tagret": "cpu"})


def test_out_of_bounds_runtime_reads_raise_spec_errors() -> None:
    # an index read through another tensor has no symbolic bound: the kernel's own check catches it
    spec = ac.AttentionSpec(num_heads=1, head_dim=8, mask=ac.tensor("ids")[ac.tensor("pos")[ac.q]] == 0)
    x = torch.randn(1, 1, 4, 8)
    ids, pos = torch.zeros(4, dtype=torch.long), torch.tensor([0, 1, 2, 9])
    for target in ("reference", "cpu"):
        with pytest.raises(ac.SpecError, match=r"out of its bounds|outside its size"):
            ac.compile(spec, target=target)(x, x, x, ids=ids, pos=pos)
