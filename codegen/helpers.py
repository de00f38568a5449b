"""Runtime helpers that generated PyTorch code calls; each accepts Python numbers or tensors.

Index expressions evaluate on broadcastable int64 grids (b: [B,1,1,1], h: [1,H,1,1],
q: [1,1,Sq,1], kv: [1,1,1,Skv]), so a mask costs one pass over the broadcast result.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from attncc.errors import SpecError

Val = Any  # int | float | bool | torch.Tensor


def _t(x: Val) -> bool:
    return isinstance(x, torch.Tensor)


def floordiv(a: Val, b: Val) -> Val:
    if _t(a) or _t(b):
        return torch.div(torch.as_tensor(a), b, rounding_mode="floor")
    return a // b


def mod(a: Val, b: Val) -> Val:
    """Floor modulo (the sign of the divisor), as sympy's Mod."""
    if _t(a) or _t(b):
        return torch.remainder(torch.as_tensor(a), b)
    return a % b


def floor(a: Val) -> Val:
    return torch.floor(a) if _t(a) else math.floor(a)


def ceil(a: Val) -> Val:
    return torch.ceil(a) if _t(a) else math.ceil(a)


def minimum(*xs: Val) -> Val:
    out = xs[0]
    for x in xs[1:]:
        out = torch.minimum(torch.as_tensor(out), torch.as_tensor(x)) if (_t(out) or _t(x)) else min(out, x)
    return out


def maximum(*xs: Val) -> Val:
    out = xs[0]
    for x in xs[1:]:
        out = torch.maximum(torch.as_tensor(out), torch.as_tensor(x)) if (_t(out) or _t(x)) else max(out, x)
    return out


def where(cond: Val, a: Val, b: Val) -> Val:
    if _t(cond) or _t(a) or _t(b):
        return torch.where(torch.as_tensor(cond), a, b)
    return a if cond else b


def logical_and(*xs: Val) -> Val:
    out = xs[0]
    for x in xs[1:]:
        out = torch.logical_and(torch.as_tensor(out), torch.as_tensor(x)) if (_t(out) or _t(x)) else (out and x)
    return out


def logical_or(*xs: Val) -> Val:
    out = xs[0]
    for x in xs[1:]:
        out = torch.logical_or(torch.as_tensor(out), torch.as_tensor(x)) if (_t(out) or _t(x)) else (out or x)
    return out


def logical_not(a: Val) -> Val:
    return torch.logical_not(a) if _t(a) else not a


def logical_xor(*xs: Val) -> Val:
    out = xs[0]
    for x in xs[1:]:
        out = torch.logical_xor(torch.as_tensor(out), torch.as_tensor(x)) if (_t(out) or _t(x)) else (out != x)
    return out


def power(a: Val, b: Val) -> Val:
    if _t(a) or _t(b):
        base = a.double() if _t(a) and not a.is_floating_point() else a
        return torch.pow(base, b.double() if _t(b) and not b.is_floating_point() else b)
    return a**b


def unary(name: str, a: Val) -> Val:
    if _t(a):
        return getattr(torch, name)(a if a.is_floating_point() else a.double())
    return getattr(math, name)(a) if name != "sign" else (a > 0) - (a < 0)


def in_blocks(lists: torch.Tensor, b: Val, h: Val, qb: Val, kb: Val) -> torch.Tensor:
    """Whether block ``kb`` is listed in ``lists[b, h, qb, :]`` (a size-1 batch or head dim is shared; the
    lists were validated at call time): a membership grid scattered from the list, then one gather."""
    lists = lists.long()
    kb = torch.as_tensor(kb, device=lists.device).long()
    width = int(kb.max()) + 2  # one column past the last block read: the padding (-1) lands there
    grid = torch.zeros((*lists.shape[:3], width), dtype=torch.bool, device=lists.device)
    grid.scatter_(3, torch.where(lists >= 0, lists.clamp(max=width - 1), width - 1), True)
    grid[..., width - 1] = False
    parts = [torch.as_tensor(i, device=lists.device).long() for i in (b, h, qb)]
    parts = [p * 0 if lists.shape[d] == 1 else p for d, p in enumerate(parts)]
    return grid[tuple(torch.broadcast_tensors(*parts, kb.clamp(max=width - 1)))]


def index(table: torch.Tensor, name: str, idx: tuple[Val, ...], text: str) -> torch.Tensor:
    """``table[idx]`` with a bounds check that names the expression (no silent wraparound)."""
    if len(idx) != table.dim():
        raise SpecError(f"tensor {name!r} has {table.dim()} dims but `{text}` indexes {len(idx)}")
    parts = []
    for dim, i in enumerate(idx):
        t = torch.as_tensor(i, device=table.device)
        t = t.long() if not t.is_floating_point() else t.floor().long()
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= table.shape[dim]:
            raise SpecError(
                f"`{text}` reads {name}[...] at index {lo if lo < 0 else hi} along dim {dim}, "
                f"outside its size {table.shape[dim]}; pass a larger {name!r} or bound the index"
            )
        parts.append(t)
    return table[tuple(parts)]
