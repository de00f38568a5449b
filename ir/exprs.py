"""Index and score expressions: the sympy vocabulary every IR op and pass shares.

Symbols
    b, h, q, kv     batch, query head, query position, key position (integers >= 0)
    score           the scaled score q.k * scale (real)
    B, H, Sq, Skv   batch size, query heads, query length, key length (integers >= 1)

Runtime tensors appear as ``name[i, j]`` (sympy ``Indexed`` on an ``IndexedBase``); constant
per-head tables are runtime tensors too, whose values the spec carries.

Expressions print canonically with :func:`expr_str` and parse back with :func:`parse_expr`:
``parse_expr(expr_str(e)) == e`` for every expression attncc builds.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import sympy
from sympy.parsing.sympy_parser import parse_expr as _sympy_parse

from attncc.errors import ParseError

b = sympy.Symbol("b", integer=True, nonnegative=True)
h = sympy.Symbol("h", integer=True, nonnegative=True)
q = sympy.Symbol("q", integer=True, nonnegative=True)
kv = sympy.Symbol("kv", integer=True, nonnegative=True)
score = sympy.Symbol("score", real=True)
B = sympy.Symbol("B", integer=True, positive=True)
H = sympy.Symbol("H", integer=True, positive=True)
Sq = sympy.Symbol("Sq", integer=True, positive=True)
Skv = sympy.Symbol("Skv", integer=True, positive=True)
qb = sympy.Symbol("qb", integer=True, nonnegative=True)  # q-block index, in tiled ops
x = sympy.Symbol("x", real=True)  # a feature map's argument (linear attention)

INDEX_SYMBOLS: frozenset[sympy.Symbol] = frozenset({b, h, q, kv})
SIZE_SYMBOLS: frozenset[sympy.Symbol] = frozenset({B, H, Sq, Skv})
MASK_SYMBOLS: frozenset[sympy.Symbol] = INDEX_SYMBOLS | SIZE_SYMBOLS
SCORE_SYMBOLS: frozenset[sympy.Symbol] = MASK_SYMBOLS | {score}
_BY_NAME = {str(s): s for s in SCORE_SYMBOLS | {qb, x}}


def tensor_base(name: str) -> sympy.IndexedBase:
    """The sympy object for a runtime tensor named ``name`` (same object for the same name)."""
    return sympy.IndexedBase(name)


class InBlocks(sympy.logic.boolalg.BooleanFunction):
    """``InBlocks(t[0, 0, 0, 0], b, h, qb, kb)``: kv block ``kb`` is listed in the row ``t[b, h, qb, :]`` of the
    int block-index tensor ``t`` ([B or 1, H or 1, query blocks, K]; -1 pads a row; a batch or head
    dim of size 1 is shared by every batch or head). ``qb`` and ``kb`` are the blocks' index expressions
    (``floor(q/64)``, or a region number on a grid). The first argument names the tensor by its origin
    element, so every pass that finds runtime tensors by their reads finds this one, with its rank.

    >>> t = tensor_base("kv_blocks")
    >>> expr_str(InBlocks(t[0, 0, 0, 0], b, h, sympy.floor(q / 64), sympy.floor(kv / 64)))
    'InBlocks(kv_blocks[0, 0, 0, 0], b, h, floor(q/64), floor(kv/64))'
    """

    nargs = 5

    @classmethod
    def eval(cls, *args: sympy.Basic) -> None:
        return None

    @property
    def tensor(self) -> str:
        return str(self.args[0].base)

    @property
    def blocks(self) -> tuple[int, int] | None:
        """(bq, bkv) when the blocks are contiguous runs ``floor(q/bq)``, ``floor(kv/bkv)`` (else None)."""
        out = []
        for arg, sym in ((self.args[3], q), (self.args[4], kv)):
            if arg == sym:
                out.append(1)
                continue
            div = exact_division(arg.args[0]) if isinstance(arg, sympy.floor) else None
            if div is None or div[0] != sym:
                return None
            out.append(div[1])
        return out[0], out[1]


def in_blocks(expr: sympy.Basic) -> list[InBlocks]:
    """The block-list reads of ``expr``, in a stable order."""
    return sorted(expr.atoms(InBlocks), key=sympy.default_sort_key)


def tensor_refs(expr: sympy.Basic) -> dict[str, list[tuple[sympy.Expr, ...]]]:
    """Every runtime-tensor access in ``expr``: name -> list of index tuples."""
    refs: dict[str, list[tuple[sympy.Expr, ...]]] = {}
    for acc in sorted(expr.atoms(sympy.Indexed), key=sympy.default_sort_key):
        refs.setdefault(str(acc.base), []).append(tuple(acc.indices))
    return refs


def free_names(expr: sympy.Basic) -> set[str]:
    """Names of the free plain symbols of ``expr`` (tensor accesses and tensor names excluded)."""
    bases = {str(i.base) for i in expr.atoms(sympy.Indexed)}
    return {str(s) for s in expr.free_symbols if isinstance(s, sympy.Symbol) and str(s) not in bases}


def unknown_symbols(expr: sympy.Basic, allowed: Iterable[sympy.Symbol]) -> list[str]:
    """Free symbols of ``expr`` outside ``allowed`` and outside tensor names, sorted."""
    allowed_names = {str(s) for s in allowed}
    return sorted(n for n in free_names(expr) if n not in allowed_names)


def to_sympy_number(x: int | float | bool) -> sympy.Expr | sympy.Basic:
    """Python scalars become exact sympy numbers; floats keep their shortest repr.

    >>> to_sympy_number(0.1)
    1/10
    """
    if isinstance(x, bool):
        return sympy.true if x else sympy.false
    if isinstance(x, int):
        return sympy.Integer(x)
    if x != x or x in (float("inf"), float("-inf")) or abs(x) >= 2.0**53:
        return sympy.Float(x)  # beyond 2**53 a float is not an exact integer (finfo.min must not become one)
    return sympy.Rational(repr(float(x)))


def expr_str(expr: sympy.Basic) -> str:
    """Canonical one-line text of an expression (stable across runs; parses back)."""
    return sympy.sstr(expr, order="lex")


_FUNCS = {
    name: getattr(sympy, name)
    for name in [
        "Mod",
        "floor",
        "ceiling",
        "Min",
        "Max",
        "Abs",
        "Piecewise",
        "ITE",
        "tanh",
        "exp",
        "log",
        "sqrt",
        "sign",
        "sin",
        "cos",
        "Eq",
        "Ne",
        "Lt",
        "Le",
        "Gt",
        "Ge",
        "And",
        "Or",
        "Not",
        "Xor",
        "true",
        "false",
        "Integer",
        "Rational",
        "Float",
        "oo",
        "pi",
        "E",
    ]
}


_FUNCS["InBlocks"] = InBlocks


def parse_expr(text: str, tensors: Iterable[str] = ()) -> sympy.Basic:
    """Parse the text :func:`expr_str` prints, with attncc's symbols and the given tensor names."""
    local: dict[str, object] = dict(_FUNCS)
    local.update(_BY_NAME)
    for name in tensors:
        local[name] = tensor_base(name)
    try:
        return _parse_cached(text, tuple(sorted(local.items(), key=lambda kv_: kv_[0])))
    except (SyntaxError, TypeError, ValueError, AttributeError) as exc:
        raise ParseError(f"cannot parse expression {text!r}: {exc}") from exc


@functools.lru_cache(maxsize=4096)
def _parse_cached(text: str, local_items: tuple[tuple[str, object], ...]) -> sympy.Basic:
    local = dict(local_items)
    result = _sympy_parse(text, local_dict=local, global_dict={"__builtins__": {}, **local})
    if not isinstance(result, sympy.Basic):
        raise ParseError(f"expression {text!r} parsed to a {type(result).__name__}")
    return result


def exact_division(expr: sympy.Basic) -> tuple[sympy.Expr, int] | None:
    """(num, den) when ``expr`` is num/den with an integer num and an integer den > 1, so that
    floor(expr) and ceiling(expr) are integer divisions; None otherwise.

    >>> exact_division(q / 64)
    (q, 64)
    """
    num, den = expr.as_numer_denom()
    if den.is_Integer and den != 1 and num.is_integer:
        return num, int(den)
    return None


def is_boolean(expr: sympy.Basic) -> bool:
    """True for sympy booleans (relations, And/Or/Not/ITE, true/false); plain symbols are not."""
    return isinstance(expr, _BOOLEAN_TYPES)


_BOOLEAN_TYPES = (
    sympy.core.relational.Relational,
    sympy.logic.boolalg.BooleanFunction,
    sympy.logic.boolalg.BooleanAtom,
)
