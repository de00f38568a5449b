"""When a compiled target hands a call to the reference target, and why (the reason is logged)."""

from __future__ import annotations

import torch

from attncc import config


def reason(target: str, q: torch.Tensor, tensors: dict[str, torch.Tensor]) -> str | None:
    """Why ``target`` ("cpu" or "triton") cannot run this call, or None when it can."""
    if target == "cpu" and q.device.type != "cpu":
        return f"tensors are on {q.device}"
    if target == "triton" and q.device.type != "cuda" and not config.get().triton_interpret:
        return f"tensors are on {q.device} and TRITON_INTERPRET is not set"
    if q.dtype == torch.float64:
        return f"float64 inputs (the {target} target computes in float32 or lower)"
    if (
        target == "cpu"
        and torch.is_grad_enabled()
        and any(t.requires_grad and t.is_floating_point() for t in tensors.values())
    ):
        return "a float runtime tensor requires grad (its gradient is computed by the reference target)"
    return None
