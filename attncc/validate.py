"""Call-time checks: q/k/v shapes and dtypes, runtime tensors, length constraints, index bounds.

Index bounds are checked symbolically: each index expression of a runtime tensor is bounded
by interval analysis at the concrete lengths; a bound that is attained and exceeds the tensor's
size is an error before any kernel runs. Inexact bounds are left to the kernel's own check.
"""

from __future__ import annotations

import difflib
import functools
import logging
from collections.abc import Collection
from dataclasses import dataclass

import sympy
import torch

from attncc.errors import SpecError
from attncc.ir import exprs as X
from attncc.ir.intervals import Interval, bounds
from attncc.spec import AttentionSpec, TensorDecl

log = logging.getLogger("attncc.validate")

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class CallShape:
    batch: int
    q_len: int
    kv_len: int


def check_qkv(spec: AttentionSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> CallShape:
    """Validate q [B,Hq,Sq,D], k [B,Hkv,Skv,D] and v [B,Hkv,Skv,Dv] against the spec (D: ``head_dim``, Dv:
    ``value_dim``)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise SpecError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise SpecError(f"{name} must be 4-d [batch, heads, length, head_dim], got shape {tuple(t.shape)}")
        if t.dtype not in _FLOATS:
            raise SpecError(f"{name} has dtype {t.dtype}; use float16, bfloat16, float32 or float64")
    if not q.dtype == k.dtype == v.dtype:
        raise SpecError(f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); cast them to one dtype")
    if not q.device == k.device == v.device:
        raise SpecError(f"q, k, v are on different devices ({q.device}, {k.device}, {v.device})")
    if k.shape[:3] != v.shape[:3]:
        raise SpecError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same batch, heads and length")
    if not q.shape[0] == k.shape[0]:
        raise SpecError(f"batch of q ({q.shape[0]}) != batch of k/v ({k.shape[0]})")
    if q.shape[1] != spec.num_heads:
        raise SpecError(f"q has {q.shape[1]} heads, the spec declares num_heads={spec.num_heads}")
    if k.shape[1] != spec.num_kv_heads:
        raise SpecError(f"k/v have {k.shape[1]} heads, the spec declares num_kv_heads={spec.num_kv_heads}")
    for name, t in (("q", q), ("k", k)):
        if t.shape[3] != spec.head_dim:
            raise SpecError(f"{name} has head_dim {t.shape[3]}, the spec declares head_dim={spec.head_dim}")
    value_dim = getattr(spec, "value_dim", spec.head_dim)  # (a linear attention's spec: values as wide as keys)
    if v.shape[3] != value_dim:
        declared = f"value_dim={value_dim}" if value_dim != spec.head_dim else f"head_dim={spec.head_dim}"
        own = value_dim == spec.head_dim and hasattr(spec, "value_dim")  # (values may have a width of their own)
        hint = "; values of another size: AttentionSpec(..., value_dim=...)" if own else ""
        raise SpecError(f"v has head_dim {v.shape[3]}, the spec declares {declared}{hint}")
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise SpecError(f"empty sequence: q length {q.shape[2]}, kv length {k.shape[2]}")
    return CallShape(int(q.shape[0]), int(q.shape[2]), int(k.shape[2]))


def _dtype_ok(decl: TensorDecl, t: torch.Tensor) -> bool:
    if decl.dtype == "float":
        return t.is_floating_point()
    return not t.is_floating_point() and not t.is_complex()


def size_env(spec: AttentionSpec, shape: CallShape) -> dict[sympy.Basic, int]:
    return {X.B: shape.batch, X.H: spec.num_heads, X.Sq: shape.q_len, X.Skv: shape.kv_len}


def check_requires(spec: AttentionSpec, shape: CallShape) -> None:
    if not spec.requires:
        return
    env = size_env(spec, shape)
    for cond, message in spec.requires:
        if cond.subs(env) != sympy.true:
            raise SpecError(f"{message}; got q length {shape.q_len}, kv length {shape.kv_len}")


def check_tensors(
    spec: AttentionSpec,
    shape: CallShape,
    given: dict[str, torch.Tensor],
    device: torch.device,
    names: Collection[str] | None = None,
) -> dict[str, torch.Tensor]:
    """The runtime tensors to pass to a kernel (captured ones included), all validated; ``names``: only these
    are required (the mask's, for a block map), the spec's others are accepted and left out."""
    if not given and not spec.captured and not spec.runtime_tensors():
        return {}  # (most calls: nothing to check, and the checks below cost ~10 us)
    wanted = {t.name: t for t in spec.runtime_tensors() if names is None or t.name in names}
    given = {n: t for n, t in given.items() if n in wanted or n not in {d.name for d in spec.runtime_tensors()}}
    missing, unknown = sorted(set(wanted) - set(given)), sorted(set(given) - set(wanted))
    if missing and unknown:
        guesses = {u: difflib.get_close_matches(u, missing, n=1) for u in unknown}
        hints = [f"{u!r} -> {g[0]!r}" for u, g in guesses.items() if g]
        raise SpecError(
            f"missing runtime tensors {missing} and unexpected keyword tensors {unknown}"
            + (f"; did you mean {', '.join(hints)}?" if hints else f"; this spec takes {sorted(wanted)}")
        )
    if missing := sorted(set(wanted) - set(given)):
        raise SpecError(
            f"missing runtime tensors {missing}; pass them as keywords, e.g. kern(q, k, v, {missing[0]}=...)"
        )
    if unknown := sorted(set(given) - set(wanted)):
        raise SpecError(f"unexpected keyword tensors {unknown}; this spec takes {sorted(wanted) or 'none'}")
    out = dict(spec.captured)
    out.update(given)
    decls = {t.name: t for t in spec.tensors if not t.values}
    for name, t in out.items():
        decl = decls[name]
        if not isinstance(t, torch.Tensor):
            raise SpecError(f"runtime tensor {name!r} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != decl.ndim:
            raise SpecError(
                f"runtime tensor {name!r} must have {decl.ndim} dims as indexed in the spec, got shape {tuple(t.shape)}"
            )
        if not _dtype_ok(decl, t):
            raise SpecError(f"runtime tensor {name!r} has dtype {t.dtype}; the spec uses it as {decl.dtype}")
        if t.device != device:
            raise SpecError(f"runtime tensor {name!r} is on {t.device}, q is on {device}")
    _check_bounds(spec, shape, out)
    _check_block_lists(spec, shape, out)
    if spec.head_table in out:
        _check_head_table(spec, out[spec.head_table])
    return out


def _check_head_table(spec: AttentionSpec, t: torch.Tensor) -> None:
    """kv_head_of: int [num_heads], each entry a kv head in [0, num_kv_heads)."""
    name, hkv = spec.head_table, int(spec.num_kv_heads or spec.num_heads)
    if t.dtype == torch.bool or tuple(t.shape) != (spec.num_heads,):
        raise SpecError(
            f"kv_head_of tensor {name!r} must be int [{spec.num_heads}] (one kv head per query head), "
            f"got {t.dtype} {tuple(t.shape)}"
        )
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= hkv:
        bad = lo if lo < 0 else hi
        raise SpecError(f"kv_head_of tensor {name!r} names kv head {bad}; the spec has {hkv} (0 .. {hkv - 1})")


@functools.lru_cache(maxsize=1024)
def _block_lists(mask: sympy.Basic) -> tuple[X.InBlocks, ...]:
    """The mask's block-list reads, found once per mask (a call checks them without walking the expression)."""
    return tuple(X.in_blocks(mask))


@functools.lru_cache(maxsize=1024)
def _reads(expr: sympy.Basic) -> dict[str, list[tuple[sympy.Expr, ...]]]:
    """``tensor_refs`` of an expression, once per expression (read-only: callers iterate it)."""
    return X.tensor_refs(expr)


def _check_block_lists(spec: AttentionSpec, shape: CallShape, tensors: dict[str, torch.Tensor]) -> None:
    """Each block-index list: int, [B|1, H|1, query blocks, K], entries in [-1, kv blocks), none repeated
    in a row. O(list size); on a GPU it reads the list back to the host once per call."""
    lists = _block_lists(spec.mask)
    if shape.batch == 0 or not lists:  # an empty batch reads nothing
        return
    env = {X.b: Interval(0, shape.batch - 1), X.h: Interval(0, spec.num_heads - 1),
           X.q: Interval(0, shape.q_len - 1), X.kv: Interval(0, shape.kv_len - 1)}  # fmt: skip
    sizes = size_env(spec, shape)
    for atom in lists:
        name = atom.tensor
        if name not in tensors:
            continue
        t = tensors[name]
        if t.dtype == torch.bool:
            raise SpecError(f"block list {name!r} is bool; it holds kv-block numbers (int, -1 for padding)")
        nq = int(bounds(atom.args[3].subs(sizes), env).hi) + 1
        nkv = int(bounds(atom.args[4].subs(sizes), env).hi) + 1
        want = f"[{shape.batch} or 1, {spec.num_heads} or 1, {nq}, K]"
        if t.shape[0] not in (1, shape.batch) or t.shape[1] not in (1, spec.num_heads) or t.shape[2] != nq:
            raise SpecError(
                f"block list {name!r} has shape {tuple(t.shape)}; at q length {shape.q_len} it must be {want} "
                f"(one row of kv-block numbers per query block)"
            )
        if t.numel() == 0:
            continue
        rows = t.detach().reshape(-1, t.shape[3]).cpu().long()
        lo, hi = int(rows.min()), int(rows.max())
        if lo < -1 or hi >= nkv:
            raise SpecError(
                f"block list {name!r} holds {lo if lo < -1 else hi}; entries must lie in [-1, {nkv}) "
                f"({nkv} kv blocks at kv length {shape.kv_len}; -1 pads a row)"
            )
        ordered = rows.sort(-1).values
        repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
        if bool(repeated.any()):
            row = int(repeated.any(-1).nonzero()[0, 0])
            where = tuple(int(i) for i in torch.unravel_index(torch.tensor(row), tuple(t.shape[:3])))
            raise SpecError(
                f"block list {name!r} repeats a kv block in row {list(where)} ({rows[row].tolist()}); "
                "list each block once (pad with -1)"
            )


def _check_bounds(spec: AttentionSpec, shape: CallShape, tensors: dict[str, torch.Tensor]) -> None:
    """Each index of a runtime tensor within its size, where interval analysis bounds it exactly. That depends on the
    tensors' shapes and the lengths the indices read only (an index reading a tensor is never exact), so a call like
    one checked before is not checked again (sympy's work here is about half a millisecond: a decoding step's kernel
    may take less). A call that fails is checked again, and refused, every time."""
    if shape.batch == 0:  # nothing is read
        return
    shapes = tuple((n, tuple(t.shape)) for n, t in sorted(tensors.items()))
    reads = _index_symbols(spec)  # lengths no index reads take one value in the key (a generation loop's steps)
    key = CallShape(*(n if ({a, b} & reads) else 1 for n, a, b in zip(
        (shape.batch, shape.q_len, shape.kv_len), (X.b, X.q, X.kv), (X.B, X.Sq, X.Skv), strict=True
    )))  # fmt: skip
    if not _bounds_hold(spec, key, shapes):
        _bounds_checked(spec, shape, shapes)  # raises, naming the call's own lengths


@functools.lru_cache(maxsize=64)
def _bounds_hold(spec: AttentionSpec, shape: CallShape, shapes: tuple[tuple[str, tuple[int, ...]], ...]) -> bool:
    try:
        _bounds_checked(spec, shape, shapes)
    except SpecError:
        return False
    return True


@functools.lru_cache(maxsize=64)
def _index_symbols(spec: AttentionSpec) -> frozenset[sympy.Basic]:
    """The symbols in the index expressions of the spec's tensor reads."""
    return frozenset().union(*(
        i.free_symbols for expr in (spec.mask, spec.score_mod) for uses in _reads(expr).values() for idx in uses
        for i in idx
    ))  # fmt: skip


def _bounds_checked(spec: AttentionSpec, shape: CallShape, shapes: tuple[tuple[str, tuple[int, ...]], ...]) -> None:
    """``_check_bounds`` on the tensors' shapes (``shapes``: name and shape each)."""
    sizes_of = dict(shapes)
    env: dict[sympy.Basic, Interval] = {
        X.b: Interval(0, shape.batch - 1),
        X.h: Interval(0, spec.num_heads - 1),
        X.q: Interval(0, shape.q_len - 1),
        X.kv: Interval(0, shape.kv_len - 1),
    }
    sizes = size_env(spec, shape)
    for expr in (spec.mask, spec.score_mod):
        for name, uses in _reads(expr).items():
            if name not in sizes_of:
                continue
            for idx in uses:
                for dim, i in enumerate(idx):
                    r = env[i] if i in env else Interval(int(i), int(i)) if i.is_Integer else bounds(i.subs(sizes), env)
                    size = sizes_of[name][dim]
                    if r.exact and (r.lo < 0 or r.hi >= size):
                        bad = int(r.lo if r.lo < 0 else r.hi)
                        raise SpecError(
                            f"index `{X.expr_str(i)}` of tensor {name!r} reaches {bad} along dim {dim} "
                            f"(q length {shape.q_len}, kv length {shape.kv_len}), but {name!r} has size {size} there"
                        )
                    if not r.exact:
                        log.debug("bounds of %s[%s] not proven symbolically; checked by the kernel", name, i)
