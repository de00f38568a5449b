"""When a compiled target hands a call to the reference target, and why (the reason is logged)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from attncc import config

log = logging.getLogger("attncc.codegen.fallback")

Recompute = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]], tuple[torch.Tensor, ...]]


def second_order(
    recompute: Recompute,
    inputs: Sequence[torch.Tensor],
    names: Sequence[str],
    tensors: dict[str, torch.Tensor],
    grads: tuple[torch.Tensor | None, torch.Tensor | None],
) -> list[torch.Tensor | None]:
    """Differentiable gradients of a kernel call (``create_graph=True``: a gradient penalty, a
    Hessian-vector product). The generated backwards are not differentiable themselves, so the call
    is recomputed on the reference target under autograd (O(S^2) memory) and differentiated with a
    graph. ``inputs``: q, k, v and then the tensors ``names`` (learned tables) as the kernel got them;
    returns one gradient per input (None where it does not require grad)."""
    log.info("attncc: gradients with create_graph=True are recomputed on the reference target (differentiable)")
    live = [t for t in inputs if t.requires_grad]
    with torch.enable_grad():
        given = {**tensors, **dict(zip(names, inputs[3:], strict=True))}
        out, lse = recompute(inputs[0], inputs[1], inputs[2], given)
        pairs = [(o, g) for o, g in zip((out, lse), grads, strict=True) if g is not None]
        found = torch.autograd.grad(
            [o for o, _ in pairs], live, [g for _, g in pairs], create_graph=True, allow_unused=True
        )
    by_id = {id(t): g for t, g in zip(live, found, strict=True)}
    return [by_id.get(id(t)) if t.requires_grad else None for t in inputs]


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
