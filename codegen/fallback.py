"""When a compiled target hands a call to the reference target, and why (the reason is logged)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from attncc import config

MAX_PARTIAL_FLOATS = 1 << 26  # 256 MB of per-thread table-gradient partials on the cpu target


def learned(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the float runtime tensors whose gradients this call must produce."""
    if not torch.is_grad_enabled():
        return []
    return [n for n, t in tensors.items() if t.requires_grad and t.is_floating_point()]


def reason(
    target: str, q: torch.Tensor, tensors: dict[str, torch.Tensor], grad_tables: Sequence[str] = ()
) -> str | None:
    """Why ``target`` ("cpu" or "triton") cannot run this call, or None when it can. ``grad_tables``:
    the float tables whose gradients the target's backward computes (read by the score mod)."""
    if target == "cpu" and q.device.type != "cpu":
        return f"tensors are on {q.device}"
    if target == "triton" and q.device.type != "cuda" and not config.get().triton_interpret:
        return f"tensors are on {q.device} and TRITON_INTERPRET is not set"
    if q.dtype == torch.float64:
        return f"float64 inputs (the {target} target computes in float32 or lower)"
    if target == "cpu" and (learn := learned(tensors)):
        if others := [n for n in learn if n not in grad_tables]:
            return (
                f"float runtime tensors {others} require grad but the score mod does not read them; "
                "only score-mod tables get gradients from the cpu kernel (the reference target computes these)"
            )
        floats = torch.get_num_threads() * sum(tensors[n].numel() for n in learn)
        if floats > MAX_PARTIAL_FLOATS:
            return (
                f"the gradients of {learn} need {floats * 4 >> 20} MB of per-thread partial sums on the cpu "
                f"target (limit {MAX_PARTIAL_FLOATS * 4 >> 20} MB)"
            )
    return None
