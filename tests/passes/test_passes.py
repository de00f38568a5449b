"""One golden test per pass, numerics preserved on the interpreter, refusals and pipeline errors."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import ClassVar

import pytest
import sympy
import torch

import attncc as ac
from attncc import config
from attncc.codegen.interpret import interpret
from attncc.errors import LoweringError, SpecError
from attncc.ir import exprs as X
from attncc.ir.core import Graph
from attncc.ir.ops import FusedOp, MaskOp, ScoreModOp
from attncc.ir.text import print_ir
from attncc.lower import spec_to_ir
from attncc.passes import Canonicalize, Fuse, Pass, parse_pipeline, run_pipeline
from attncc.passes.normalize import boolean

GOLDEN = Path(__file__).parent / "golden"


def _hand_written() -> ac.AttentionSpec:
    """Written by hand, the way a user might: should canonicalize to builtin forms."""
    return ac.AttentionSpec(
        name="hand_written",
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        mask=lambda b, h, q_idx, kv_idx: (q_idx - kv_idx >= 0) & (q_idx - kv_idx < 129),
        score_mod=lambda s, b, h, q_idx, kv_idx: s * 0.5,
    )


def _inputs(spec: ac.AttentionSpec, n: int = 20) -> tuple[torch.Tensor, ...]:
    hkv = int(spec.num_kv_heads or 0)
    return (
        torch.randn(1, spec.num_heads, n, spec.head_dim),
        torch.randn(1, hkv, n, spec.head_dim),
        torch.randn(1, hkv, n, spec.head_dim),
    )


@pytest.mark.parametrize("pass_", [Canonicalize(), Fuse()], ids=lambda p: p.name)
def test_golden_before_after(pass_: Pass, golden) -> None:  # type: ignore[no-untyped-def]
    before = spec_to_ir(_hand_written())
    if isinstance(pass_, Fuse):
        before = Canonicalize().run(before)
    after = pass_.run(before)
    after.verify()
    golden(GOLDEN / f"{pass_.name}.ir", f"# before\n{print_ir(before)}# after\n{print_ir(after)}")


SPECS = [
    _hand_written(),
    ac.AttentionSpec(num_heads=2, head_dim=8, mask=ac.prefix_lm(5) & ~ac.sinks(1), score_mod=ac.alibi()),
    ac.AttentionSpec(num_heads=2, head_dim=8, mask=ac.neighborhood((4, 5), (3, 3), dilation=(1, 1))),
    ac.AttentionSpec(num_heads=2, head_dim=8, score_mod=ac.chain(ac.softcap(4.0), ac.score * 3)),
]


@pytest.mark.parametrize("spec", SPECS, ids=[s.name + str(i) for i, s in enumerate(SPECS)])
@pytest.mark.parametrize("pipeline", ["canonicalize", "fuse", "canonicalize,fuse"])
def test_passes_preserve_numerics(spec: ac.AttentionSpec, pipeline: str) -> None:
    graph = spec_to_ir(spec)
    q, k, v = _inputs(spec)
    before = interpret(graph, q, k, v)
    after_graph = run_pipeline(graph, parse_pipeline(pipeline)).graph
    torch.testing.assert_close(interpret(after_graph, q, k, v), before, rtol=1e-12, atol=1e-12)


def test_canonicalize_recognizes_hand_written_builtins() -> None:
    graph = Canonicalize().run(spec_to_ir(_hand_written()))
    (mask,) = graph.ops_of(MaskOp)
    assert isinstance(mask, MaskOp)
    assert mask.pred == boolean(ac.sliding_window(128).sym)
    assert mask.form == "sliding_window(128, 0)"
    assert not graph.ops_of(ScoreModOp), "s * 0.5 folds into the scale"


@pytest.mark.parametrize(
    "written,expected",
    [
        (sympy.Gt(X.q, X.kv - 1), "kv <= q"),
        (sympy.Lt(X.kv - X.q, 1), "kv <= q"),
        (sympy.Ge(2 * X.q, 2 * X.kv + 3), "kv + 2 <= q"),
        (sympy.Not(sympy.Lt(X.kv, 4)), "4 <= kv"),
        (sympy.And(sympy.Le(X.kv, X.q), sympy.Le(X.kv, X.q + 5)), "kv <= q"),
        (sympy.Or(sympy.Le(X.kv, 3), sympy.Le(X.kv, 7)), "kv <= 7"),
        (sympy.Ge(X.q, X.q - 1), "True"),
    ],
)
def test_normal_form(written: sympy.Basic, expected: str) -> None:
    assert X.expr_str(boolean(written)) == expected
    assert boolean(boolean(written)) == boolean(written), "normalization is idempotent"


def test_fuse_refuses_shared_scores_with_a_logged_reason(caplog: pytest.LogCaptureFixture) -> None:
    graph = spec_to_ir(ac.AttentionSpec(num_heads=2, head_dim=8, mask=ac.causal()))
    # make the scaled scores feed a second softmax too: the chain is no longer private
    from attncc.ir.ops import ReturnOp, SoftmaxOp

    scaled = graph.ops[4].result
    extra = SoftmaxOp(dataclasses.replace(scaled, name="p2"), scaled)  # type: ignore[arg-type]
    shared = Graph(graph.name, (*graph.ops[:-1], extra, graph.ops[-1]))
    with caplog.at_level(logging.INFO, logger="attncc.passes.fuse"):
        after = Fuse().run(shared)
    assert after == shared
    assert "not fusing %o: %s1 (from attn.scale) has 2 users; fusing would recompute it" in caplog.text
    assert not after.ops_of(FusedOp)
    assert isinstance(after.ops[-1], ReturnOp)


def test_pipeline_strings_and_errors() -> None:
    assert [p.spelling() for p in parse_pipeline("canonicalize, fuse")] == ["canonicalize", "fuse"]
    with pytest.raises(SpecError, match=r"unknown pass 'fusion'; registered passes: \["):
        parse_pipeline("fusion")
    with pytest.raises(SpecError, match=r"pass 'fuse' has no option 'bq'"):
        parse_pipeline("fuse{bq=64}")


@dataclasses.dataclass(frozen=True)
class _Breaks(Pass):
    name: ClassVar[str] = "test-breaks"

    def run(self, graph: Graph) -> Graph:
        return Graph(graph.name, graph.ops[:-1])  # drops attn.return: the verifier must catch it


def test_failing_pass_names_the_passes_before_it_and_its_input() -> None:
    graph = spec_to_ir(_hand_written())
    with pytest.raises(LoweringError) as info:
        run_pipeline(graph, [Canonicalize(), _Breaks()], verify=True)
    msg = str(info.value)
    assert "pass 'test-breaks' failed after [canonicalize]" in msg
    assert "must end with attn.return" in msg and "--- IR it got ---" in msg


def test_print_after_logs_the_ir(caplog: pytest.LogCaptureFixture) -> None:
    with config.override(print_after=("fuse",)), caplog.at_level(logging.INFO, logger="attncc.passes"):
        run_pipeline(spec_to_ir(_hand_written()), parse_pipeline("canonicalize,fuse"))
    assert "IR after fuse:" in caplog.text and "IR after canonicalize" not in caplog.text


def _chain(*steps: tuple[str, object]) -> Graph:
    """A decomposed graph whose steps between qk and softmax come in the given order (as a front end
    emits them from a model): ("scale", c), ("mod", expr over score), ("mask", pred)."""
    from attncc.ir.core import Value
    from attncc.ir.ops import InputOp, PVOp, QKOp, ReturnOp, ScaleOp, SoftmaxOp

    q, k, v = (Value(n, (X.B, sympy.Integer(2), X.Sq if n == "q" else X.Skv, sympy.Integer(8))) for n in "qkv")
    cur = Value("s", (X.B, sympy.Integer(2), X.Sq, X.Skv))
    ops: list = [InputOp(q, "q"), InputOp(k, "k"), InputOp(v, "v"), QKOp(cur, q, k, 1)]
    for i, (kind, arg) in enumerate(steps):
        nxt = dataclasses.replace(cur, name=f"s{i + 1}")
        make = {"scale": ScaleOp, "mod": ScoreModOp, "mask": lambda r, s, p: MaskOp(r, s, p, "")}[kind]
        ops.append(make(nxt, cur, arg))
        cur = nxt
    p, o = dataclasses.replace(cur, name="p"), Value("o", (X.B, sympy.Integer(2), X.Sq, sympy.Integer(8)))
    ops += [SoftmaxOp(p, cur), PVOp(o, p, v, 1), ReturnOp(None, o)]
    return Graph("chain", tuple(ops))


CAUSAL = sympy.Le(X.kv, X.q)
ORDERS = {
    # scales around a softcap (Gemma 2 writes scores * scale, tanh(s / cap) * cap, then the mask)
    "softcap_then_mask": [
        ("scale", 0.25),
        ("scale", 0.1),
        ("mod", sympy.tanh(X.score)),
        ("scale", 10.0),
        ("mask", CAUSAL),
    ],
    # a mask, then a positive scale and an additive bias: both keep -inf at -inf
    "mask_then_scale_and_bias": [("mask", CAUSAL), ("scale", 0.5), ("mod", X.score + sympy.sin(X.q - X.kv))],
    "two_masks": [("mask", CAUSAL), ("scale", 0.3), ("mask", sympy.Le(X.q - X.kv, 4))],
}


@pytest.mark.parametrize("name", list(ORDERS))
def test_fuse_folds_steps_in_any_order_that_keeps_the_mask(name: str) -> None:
    graph = _chain(*ORDERS[name])
    graph.verify()
    fused = Fuse().run(graph)
    assert len(fused.ops_of(FusedOp)) == 1, print_ir(fused)
    q, k, v = (torch.randn(1, 2, 13, 8, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(interpret(fused, q, k, v), interpret(graph, q, k, v), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "steps,reason",
    [
        ([("mask", CAUSAL), ("mod", 3 * sympy.tanh(X.score / 3))], "maps a masked score (-inf) to -3"),
        ([("mask", CAUSAL), ("scale", -1.0)], "a scale of -1.0 after the mask"),
    ],
    ids=["softcap_after_mask", "negative_scale_after_mask"],
)
def test_fuse_refuses_a_step_after_the_mask_that_unmasks(steps: list, reason: str) -> None:
    from attncc.passes.fuse import why_not

    graph = _chain(*steps)
    assert Fuse().run(graph) == graph, "not fused: the fused op masks last, which would change the result"
    assert reason in (why_not(graph) or "")
