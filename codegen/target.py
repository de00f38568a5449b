"""The one interface between :mod:`attncc.api` and a code generator: ``build(target, plan) -> Executable``.

Every target module (``codegen/cpu.py``, ``codegen/triton.py``, ``codegen/reference.py``) has a
``build(plan)`` that returns an :class:`Executable` built from the frozen plan alone. The API validates a
call once, packs it into a :class:`Call` and asks the executable whether it can run it
(:meth:`Executable.unsupported`: None, or the reason it cannot, which the API logs before running the
reference instead); the executable then returns ``(o, lse)``, differentiable. Whatever a target keeps
between calls (a compiled library, partial-tile masks of a static map) lives in its executable, never in
the :class:`attncc.api.Kernel`.

>>> import attncc as ac
>>> kern = ac.compile(ac.AttentionSpec(num_heads=1, head_dim=8, mask=ac.causal()), target="reference")
>>> exe = build("reference", kern.plan)
>>> type(exe).__name__, exe.plan is kern.plan
('ReferenceKernel', True)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from attncc import rope
from attncc.plan import KernelPlan, TileLists
from attncc.validate import CallShape

MODULES = {"cpu": "attncc.codegen.cpu", "triton": "attncc.codegen.triton", "reference": "attncc.codegen.reference"}


@dataclass(frozen=True)
class Call:
    """One validated call as every target receives it.

    tensors: the bound runtime tensors (captured ones included); rope: the (cos, sin) tables or None;
    lists: this call's tile lists from the plan's block-map recipe, at the plan's tiles or at the ``block`` it
    is given (``lists((32, 128))``; computed on first use, cached by the kernel when the map is static);
    static: the map depends on the lengths only (a target may cache what it derives from it per shape);
    recompute: the call on the reference target, for second-order gradients.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    shape: CallShape
    tensors: dict[str, torch.Tensor]
    rope: tuple[torch.Tensor, torch.Tensor] | None
    lists: Callable[..., TileLists]
    static: bool
    recompute: Callable[..., Any]


Prepared = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class Executable(Protocol):
    """What ``build(plan)`` returns."""

    plan: KernelPlan

    @property
    def source(self) -> str: ...

    def unsupported(self, call: Call) -> str | None:
        """None when this target runs ``call``; else why not (the API runs the reference instead)."""
        ...

    def run(self, call: Call) -> tuple[torch.Tensor, torch.Tensor]:
        """(o, lse) of ``call``, differentiable."""
        ...

    def prepare(self, call: Call) -> Prepared | None:
        """A function of (q, k, v) that runs calls like ``call`` (same shapes, dtypes and device, no runtime tensors,
        RoPE tables or routing) that need no gradient, with what ``run`` worked out for it kept; None where the
        target keeps nothing (the API then validates and runs every call in full)."""
        ...


class Lazy:
    """Base of executables whose generated kernel is rendered, compiled or loaded on first use
    (``make()`` builds it from ``plan``)."""

    def __init__(self, plan: KernelPlan) -> None:
        self.plan = plan
        self._kernel: Any = None

    def make(self) -> Any:
        raise NotImplementedError

    @property
    def kernel(self) -> Any:
        if self._kernel is None:
            self._kernel = self.make()
        return self._kernel

    @property
    def source(self) -> str:
        return str(self.kernel.source)


def with_rope(tensors: dict[str, Any], tables: tuple[torch.Tensor, torch.Tensor] | None) -> dict[str, Any]:
    """Runtime tensors plus the rope tables under their call names (as the generated code reads them)."""
    return tensors if tables is None else {**tensors, **dict(zip(rope.NAMES, tables, strict=True))}


def build(target: str, plan: KernelPlan) -> Executable:
    """The executable of ``target`` for ``plan`` (the target's module is imported on first use: triton's only
    when asked for)."""
    module = importlib.import_module(MODULES[target])
    return module.build(plan)  # type: ignore[no-any-return]
