"""Brute-force tile classification from the dense mask (the reference the analysis must match)."""

from __future__ import annotations

import math

import numpy as np
import sympy
import torch

from attncc.codegen import helpers
from attncc.codegen.emit_torch import emit


def dense_mask(mask: sympy.Basic, sq: int, skv: int, heads: int, tables: dict[str, torch.Tensor]) -> torch.Tensor:
    """bool [heads, sq, skv]: the mask evaluated at every (h, q, kv)."""
    fn = eval(f"lambda b, h, q, kv, B, H, Sq, Skv, T: {emit(mask)}", {"H_": helpers, "math": math})
    out = fn(
        torch.zeros(1, 1, 1, 1, dtype=torch.long),
        torch.arange(heads).view(1, heads, 1, 1),
        torch.arange(sq).view(1, 1, sq, 1),
        torch.arange(skv).view(1, 1, 1, skv),
        1,
        heads,
        sq,
        skv,
        tables,
    )
    return torch.as_tensor(out).expand(1, heads, sq, skv)[0]


def tile_states(dense: torch.Tensor, block: tuple[int, int]) -> np.ndarray:
    """int8 [heads, nq, nkv]: 0 empty, 1 partial, 2 full (full = every in-range pair visible)."""
    heads, sq, skv = dense.shape
    bq, bkv = block
    nq, nkv = -(-sq // bq), -(-skv // bkv)
    pad = torch.zeros(heads, nq * bq, nkv * bkv, dtype=torch.bool)
    valid = torch.zeros_like(pad)
    pad[:, :sq, :skv] = dense
    valid[:, :sq, :skv] = True
    t, v = pad.view(heads, nq, bq, nkv, bkv), valid.view(heads, nq, bq, nkv, bkv)
    some = t.any(-1).any(-2)
    full = (t | ~v).all(-1).all(-2)
    return (some.to(torch.int8) + (full & some).to(torch.int8)).numpy()


def constant_tables(spec) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    return {t.name: torch.tensor(t.values).long() for t in spec.tensors if t.values}
