"""The textual IR: :func:`print_ir` and :func:`parse_ir`, with ``parse_ir(print_ir(g)) == g``.

Grammar (one op per line; ``#`` starts a comment line)::

    graph   := "attn.graph" "@" NAME "{" NEWLINE (op NEWLINE)* "}"
    op      := [VALUE "="] OPNAME [VALUE ("," VALUE)*] [attrs] [":" shape]
    VALUE   := "%" NAME
    attrs   := "{" NAME "=" json ("," NAME "=" json)* "}"
    shape   := "[" dim ("," dim)* "]"          dim := sympy expression over B, H, Sq, Skv

Attribute values are JSON: ints, floats, strings and lists. Band lists (``bands``, ``kv_blocks``,
``full_blocks`` of ``attn.tiled``) are strings ``"lo .. hi"``: an inclusive range of keys per
query q, or of kv blocks per q-block ``qb``. Expression attributes (``expr``,
``pred``, ``mask``, ``score_mod``) are strings holding the canonical sympy text of
:func:`ir.exprs.expr_str`, e.g. ``pred = "kv <= q"`` or ``mask = "Eq(doc[q], doc[kv])"``.
Operands are printed in the order of the op's ``operands``; result shapes after ``:``.

Example::

    attn.graph @causal {
      %q = attn.input {arg = "q"} : [B, 8, Sq, 64]
      %k = attn.input {arg = "k"} : [B, 2, Skv, 64]
      %v = attn.input {arg = "v"} : [B, 2, Skv, 64]
      %o = attn.fused %q, %k, %v {groups = 4, scale = 0.125, score_mod = "score", mask = "kv <= q",
                                  form = "causal"} : [B, 8, Sq, 64]      (one line in real text)
      attn.return %o
    }
"""

from __future__ import annotations

import dataclasses
import json
import re

from attncc.errors import ParseError
from attncc.ir.attrs import Attr
from attncc.ir.core import Graph, Op, Value
from attncc.ir.exprs import expr_str, parse_expr
from attncc.ir.ops import OPS, TensorOp

_OP_LINE = re.compile(
    r"^(?:%(?P<res>\w+)\s*=\s*)?(?P<op>attn\.\w+)"
    r"(?P<args>(?:\s+%\w+(?:\s*,\s*%\w+)*)?)"
    r"(?:\s*\{(?P<attrs>.*)\})?"
    r"(?:\s*:\s*\[(?P<shape>[^\]]*)\])?\s*$"
)
_HEADER = re.compile(r"^attn\.graph\s+@(?P<name>[\w.-]+)\s*\{\s*$")


def print_op(op: Op) -> str:
    """One op as a line of text (without indentation)."""
    parts = []
    if op.result is not None:
        parts.append(f"%{op.result.name} =")
    parts.append(op.name)
    if op.operands:
        parts.append(", ".join(str(v) for _, v in op.operand_values()))
    if op.attrs:
        defaults = {f.name: f.default for f in dataclasses.fields(op)}  # type: ignore[arg-type]
        shown = [(k, v) for k, v in op.attr_values() if k not in op.optional or v != defaults[k]]
        body = ", ".join(f"{k} = {op.attrs[k].print(v)}" for k, v in shown)
        parts.append("{" + body + "}")
    text = " ".join(parts)
    if op.result is not None and op.result.shape:
        text += " : [" + ", ".join(expr_str(d) for d in op.result.shape) + "]"
    return text


def print_ir(graph: Graph) -> str:
    """The whole graph as text; stable, diffable and parseable by :func:`parse_ir`."""
    lines = [f"attn.graph @{graph.name} {{"]
    lines += ["  " + print_op(op) for op in graph.ops]
    lines.append("}")
    return "\n".join(lines) + "\n"


def _split_top(text: str) -> list[str]:
    parts, depth, start, quoted = [], 0, 0, False
    for i, ch in enumerate(text):
        if ch == '"' and (i == 0 or text[i - 1] != "\\"):
            quoted = not quoted
        elif not quoted and ch in "([":
            depth += 1
        elif not quoted and ch in ")]":
            depth -= 1
        elif not quoted and ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if text[start:].strip():
        parts.append(text[start:])
    return [p.strip() for p in parts]


def _parse_attrs(text: str, where: str) -> dict[str, object]:
    decoder = json.JSONDecoder()
    attrs: dict[str, object] = {}
    pos = 0
    while pos < len(text):
        m = re.compile(r"\s*(\w+)\s*=\s*").match(text, pos)
        if not m:
            raise ParseError(f"{where}: expected 'name = value' at column {pos + 1} of {{{text}}}")
        try:
            value, end = decoder.raw_decode(text, m.end())
        except json.JSONDecodeError as exc:
            raise ParseError(f"{where}: bad value for {m.group(1)!r}: {exc.msg}") from exc
        attrs[m.group(1)] = value
        pos = re.compile(r"\s*,?\s*").match(text, end).end()  # type: ignore[union-attr]
    return attrs


def _convert(kind: Attr, raw: object, tensors: list[str], where: str) -> object:
    try:
        return kind.parse(raw, tensors)
    except (TypeError, ValueError) as exc:
        raise ParseError(f"{where}: value {raw!r} is not a valid {kind.kind}") from exc


def _parse_op(line: str, lineno: int, values: dict[str, Value], tensors: list[str]) -> Op:
    m = _OP_LINE.match(line)
    if not m:
        raise ParseError(f"line {lineno}: cannot parse op {line!r}")
    where = f"line {lineno} ({m.group('op')})"
    cls = OPS.get(m.group("op"))
    if cls is None:
        raise ParseError(f"line {lineno}: unknown op {m.group('op')!r}; known: {sorted(OPS)}")
    names = [a.strip().lstrip("%") for a in m.group("args").split(",") if a.strip()]
    if len(names) != len(cls.operands):
        raise ParseError(f"{where}: expects {len(cls.operands)} operands, got {len(names)}")
    if missing := [n for n in names if n not in values]:
        raise ParseError(f"{where}: operands {['%' + n for n in missing]} are not defined above")
    raw = _parse_attrs(m.group("attrs") or "", where)
    if unknown := sorted(set(raw) - set(cls.attrs)):
        raise ParseError(f"{where}: unknown attributes {unknown}")
    kwargs: dict[str, object] = {f: values[n] for f, n in zip(cls.operands, names, strict=True)}
    kwargs.update({k: _convert(cls.attrs[k], v, tensors, where) for k, v in raw.items()})
    shape = tuple(parse_expr(d) for d in _split_top(m.group("shape") or ""))
    result = Value(m.group("res"), shape) if m.group("res") else None  # type: ignore[arg-type]
    try:
        return cls(result, **kwargs)  # type: ignore[arg-type]
    except TypeError as exc:
        raise ParseError(f"{where}: {exc}") from exc


def parse_ir(text: str) -> Graph:
    """Parse the text form back into a :class:`Graph` (not verified; call ``.verify()``)."""
    lines = [(i + 1, ln.strip()) for i, ln in enumerate(text.splitlines())]
    lines = [(i, ln) for i, ln in lines if ln and not ln.startswith("#")]
    if not lines or not (header := _HEADER.match(lines[0][1])):
        raise ParseError("line 1: expected 'attn.graph @name {'")
    if lines[-1][1] != "}":
        raise ParseError(f"line {lines[-1][0]}: expected closing '}}'")
    values: dict[str, Value] = {}
    tensors: list[str] = []
    ops: list[Op] = []
    for lineno, line in lines[1:-1]:
        op = _parse_op(line, lineno, values, tensors)
        if isinstance(op, TensorOp):
            tensors.append(op.tensor)
        if op.result is not None:
            values[op.result.name] = op.result
        ops.append(op)
    return Graph(header.group("name"), tuple(ops))
