"""Golden and round-trip tests of the textual IR, one graph per op family."""

from __future__ import annotations

from pathlib import Path

import pytest
import sympy

import attncc as ac
from attncc.errors import ParseError, VerifyError
from attncc.ir import exprs as X
from attncc.ir.core import Graph, Value
from attncc.ir.ops import FusedOp, HeadShardOp, InputOp, ReturnOp
from attncc.ir.text import parse_ir, print_ir
from attncc.lower import spec_to_ir

GOLDEN = Path(__file__).parent / "golden"


def _decomposed() -> Graph:
    spec = ac.AttentionSpec(
        name="every_op",
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        mask=ac.document(ac.tensor("doc")) & ac.sliding_window(ac.per_head([1, 2, 3, 4], name="win")),
        score_mod=ac.relative_bias(ac.tensor("table"), 8),
    )
    return spec_to_ir(spec)


def _sharded() -> Graph:
    q = Value("q", (X.B, sympy.Integer(4), X.Sq, sympy.Integer(16)))
    k = Value("k", (X.B, sympy.Integer(2), X.Skv, sympy.Integer(16)))
    v = Value("v", k.shape)
    o = Value("o", q.shape)
    o2 = Value("o2", q.shape)
    mask = sympy.Or(sympy.Le(X.kv, 3), sympy.Le(X.kv, X.q + X.Skv - X.Sq))
    return Graph(
        "sharded",
        (
            InputOp(q, "q"),
            InputOp(k, "k"),
            InputOp(v, "v"),
            FusedOp(o, q, k, v, 2, 0.25, 30 * sympy.tanh(X.score / 30), mask, "custom"),
            HeadShardOp(o2, o, 2, (0, 0, 1, 1)),
            ReturnOp(None, o2),
        ),
    )


def _data_dependent() -> Graph:
    """attn.select feeding InBlocks, a user block list, and a runtime head table (heads = ...)."""
    spec = ac.AttentionSpec(
        name="data_dependent",
        num_heads=4,
        num_kv_heads=3,
        head_dim=16,
        mask=(ac.route_blocks(2, 32, causal=True) & ac.block_indices(ac.tensor("kv_blocks"), 32)) | ac.sinks(4),
        kv_head_of=ac.tensor("kv_head_of"),
    )
    return spec_to_ir(spec)


GRAPHS = {"decomposed": _decomposed, "sharded": _sharded, "data_dependent": _data_dependent}


@pytest.mark.parametrize("name", sorted(GRAPHS))
def test_golden_print(name: str, golden) -> None:  # type: ignore[no-untyped-def]
    graph = GRAPHS[name]()
    graph.verify()
    golden(GOLDEN / f"{name}.ir", print_ir(graph))


@pytest.mark.parametrize("path", sorted(GOLDEN.glob("*.ir")), ids=lambda p: p.stem)
def test_every_golden_round_trips(path: Path) -> None:
    text = path.read_text()
    graph = parse_ir(text)
    graph.verify()
    assert print_ir(graph) == text
    assert parse_ir(print_ir(graph)) == graph


def test_parse_reports_line_and_reason() -> None:
    with pytest.raises(ParseError, match=r"line 2: unknown op 'attn.nope'"):
        parse_ir("attn.graph @g {\n  %x = attn.nope %q\n}\n")
    with pytest.raises(ParseError, match=r"operands \['%zz'\] are not defined above"):
        parse_ir(
            'attn.graph @g {\n  %q = attn.input {arg = "q"} : [B, 1, Sq, 4]\n  %s = attn.qk %q, %zz {groups = 1}\n}\n'
        )
    with pytest.raises(ParseError, match=r"unknown attributes \['bogus'\]"):
        parse_ir('attn.graph @g {\n  %q = attn.input {arg = "q", bogus = 1} : [B, 1, Sq, 4]\n}\n')
    with pytest.raises(ParseError, match=r"expected 'attn\.graph @name"):
        parse_ir("graph g {}")


def test_verifier_rejects_bad_graphs() -> None:
    g = _sharded()
    bad_shard = Graph("g", (*g.ops[:4], HeadShardOp(g.ops[4].result, g.ops[3].result, 2, (0, 1, 2, 0)), g.ops[5]))
    with pytest.raises(VerifyError, match=r"attn.head_shard: owner ranks \[2\] outside \[0, 2\)"):
        bad_shard.verify()
    with pytest.raises(VerifyError, match=r"must end with attn\.return"):
        Graph("g", g.ops[:-1]).verify()
    swapped = Graph("g", (g.ops[3], *g.ops[:3], *g.ops[4:]))
    with pytest.raises(VerifyError, match=r"attn.fused: operand q=%q is not defined before use"):
        swapped.verify()
    fused = g.ops[3]
    assert isinstance(fused, FusedOp)
    wrong = fused.replace(groups=3)
    with pytest.raises(VerifyError, match=r"attn.fused: groups=3 but query heads 4 != 3 x kv heads 2"):
        Graph("g", (*g.ops[:3], wrong, *g.ops[4:])).verify()
    with pytest.raises(VerifyError, match=r"attn.fused: mask .* uses unknown symbols \['zz'\]"):
        Graph("g", (*g.ops[:3], fused.replace(mask=sympy.Le(X.q, sympy.Symbol("zz"))), *g.ops[4:])).verify()
    with pytest.raises(VerifyError, match="has shape"):
        Graph("g", (*g.ops[:3], fused.replace(result=Value("o", (X.B,))), *g.ops[4:])).verify()


def test_the_ops_docstring_lists_every_op_with_its_attributes() -> None:
    """ir/ops.py's one-page grammar names every registered op and each of its attributes with its kind."""
    from attncc.ir import ops

    grammar = (ops.__doc__ or "").split("Decomposed form")[0]
    for name, cls in ops.OPS.items():
        line = next((ln for ln in grammar.splitlines() if f"{name} " in ln or ln.rstrip().endswith(name)), None)
        assert line is not None, f"{name} is missing from the grammar in ir/ops.py's docstring"
        own = {k: a for k, a in cls.attrs.items() if name != "attn.tiled" or k not in ops.AttentionOp.attrs}
        block = grammar[grammar.index(line) :].split("\n    %")[0]
        for attr, kind in own.items():
            assert f"{attr}: {kind.kind}" in block, f"{name}: attribute {attr}: {kind.kind} is not in the grammar"
