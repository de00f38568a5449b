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

import dataclasses
import importlib
import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from attncc import rope
from attncc.plan import KernelPlan, TileLists
from attncc.validate import CallShape

log = logging.getLogger("attncc.target")

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
        target keeps nothing (the API then validates and runs every call in full). It reads ``call``'s shapes,
        dtypes, device and tile lists, never the values of q, k and v."""
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
    when asked for). Targets whose kernels take one head size (``ONE_WIDTH``) run a plan whose values are another
    width through :class:`OneWidth`."""
    module = importlib.import_module(MODULES[target])
    if target in ONE_WIDTH and plan.value_dim != plan.head_dim:
        width = max(plan.head_dim, plan.value_dim)
        rope_inside = plan.rope and plan.head_dim == width  # (else OneWidth rotates q and k before padding them)
        inner = module.build(dataclasses.replace(plan, head_dim=width, value_dim=width, rope=rope_inside))
        return OneWidth(inner, plan, target)
    return module.build(plan)  # type: ignore[no-any-return]


ONE_WIDTH = frozenset({"cpu"})  # targets whose kernels read q, k and v rows of one width


class OneWidth:
    """A target whose kernels take one head size, running a plan whose values are another size (``value_dim``):
    the narrower side is zero-padded to the wider (values to ``head_dim``, or q and k to ``value_dim``, RoPE applied
    before), which leaves every score and every output column as it is, and the output cut back to ``value_dim``
    columns. Padding and cutting are torch operations, so gradients flow through them (the padded columns' are
    dropped). It costs a copy of the padded tensors and the products over the wider size (MLA's 192 / 128: 1.2x
    the products); logged once per executable.

    >>> import attncc as ac, torch
    >>> spec = ac.AttentionSpec(num_heads=2, head_dim=16, value_dim=8, mask=ac.causal())
    >>> q, k, v = torch.randn(1, 2, 20, 16), torch.randn(1, 2, 20, 16), torch.randn(1, 2, 20, 8)
    >>> o = ac.compile(spec, target="cpu")(q, k, v)
    >>> want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    >>> o.shape, torch.allclose(o, want, atol=1e-5)
    (torch.Size([1, 2, 20, 8]), True)
    """

    def __init__(self, inner: Executable, plan: KernelPlan, target: str) -> None:
        self.inner, self.plan, self.target = inner, plan, target
        self.width = max(plan.head_dim, plan.value_dim)
        self._told = False

    def __getattr__(self, name: str) -> Any:  # the inner executable's kernel, ...
        if name == "inner":  # (not set yet: a copy being made)
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def source(self) -> str:
        return self.inner.source

    def unsupported(self, call: Call) -> str | None:
        return self.inner.unsupported(call)

    def widen(self, call: Call) -> Call:
        """``call`` with q, k and v zero-padded to one width (into this thread's kept buffers where no autograd
        graph will hold them)."""
        if not self._told:
            self._told = True
            side = "values" if self.plan.value_dim < self.width else "queries and keys"
            log.info("%s target: %s of @%s zero-padded to %d columns (head_dim %d, value_dim %d; its kernels take "
                     "one head size)", self.target, side, self.plan.name, self.width, self.plan.head_dim,
                     self.plan.value_dim)  # fmt: skip
        q, k, v, tables = call.q, call.k, call.v, call.rope
        kept = not torch.is_grad_enabled() or not any(t.requires_grad for t in (q, k, v, *call.tensors.values()))
        if tables is not None and self.plan.head_dim < self.width:  # rotated before padding: pairs are d, d + D/2
            q, k, tables = rope.apply(q, *tables), rope.apply(k, *tables), None
        if not kept:
            q, k, v = (t if t.shape[3] == self.width else F.pad(t, (0, self.width - t.shape[3])) for t in (q, k, v))
        else:  # padded k or v laid out as the other is (a view of a longer cache stays one, read in place)
            q, k, v = self._pad(q, "q", None), self._pad(k, "k", v), self._pad(v, "v", k)
        return dataclasses.replace(call, q=q, k=k, v=v, rope=tables)

    def _pad(self, t: torch.Tensor, role: str, like: torch.Tensor | None) -> torch.Tensor:
        """``t`` zero-padded to the width in this thread's buffer for ``role`` (q, k or v), which the next call of any
        OneWidth in this thread overwrites (so only for calls no autograd graph keeps); with the strides of ``like``
        where it has the padded shape and its elements do not overlap, else contiguous."""
        if t.shape[3] == self.width:
            return t
        out = self._place(role, t, like)
        out[..., : t.shape[3]].copy_(t)
        out[..., t.shape[3] :].zero_()
        return out

    def _place(self, role: str, t: torch.Tensor, like: torch.Tensor | None) -> torch.Tensor:
        """Where ``_pad`` puts ``t`` (its values left as they are)."""
        shape = (*t.shape[:3], self.width)
        strides = like.stride() if like is not None and like.shape == shape and _apart(like) else None
        return padding_buffer(role, shape, t.dtype, t.device, strides)

    def run(self, call: Call) -> tuple[torch.Tensor, torch.Tensor]:
        o, lse = self.inner.run(self.widen(call))
        return self._cut(o), lse

    def _cut(self, o: torch.Tensor) -> torch.Tensor:
        return o if self.plan.value_dim == self.width else o[..., : self.plan.value_dim].contiguous()

    def prepare(self, call: Call) -> Prepared | None:
        if call.rope is not None:  # (the API prepares no call with RoPE tables; a rotation outside would be lost)
            return None
        # a prepare reads the call's shapes, dtypes, device and tile lists, not q, k and v's values (the Executable
        # protocol): the widened call's tensors are this thread's buffers as they are, not a second copy of the call's
        likes = {"q": (call.q, None), "k": (call.k, call.v), "v": (call.v, call.k)}
        shaped = [t if t.shape[3] == self.width else self._place(r, t, like) for r, (t, like) in likes.items()]
        made = self.inner.prepare(dataclasses.replace(call, q=shaped[0], k=shaped[1], v=shaped[2]))
        if made is None:
            return None

        def prepared(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # (prepared calls need no gradient and have no RoPE)
            o, lse = made(self._pad(q, "q", None), self._pad(k, "k", v), self._pad(v, "v", k))
            return self._cut(o), lse

        return prepared


_PADDING = threading.local()  # per thread: (role, dtype, device) -> a flat buffer of the largest size asked for


def _apart(t: torch.Tensor) -> bool:
    """No two elements of ``t`` share memory (each dimension's stride at least the extent of those inside it)."""
    dims = sorted((st, n) for st, n in zip(t.stride(), t.shape, strict=True) if n > 1)
    extent = 1
    for stride, n in dims:
        if stride < extent:
            return False
        extent = stride * n
    return True


def padding_buffer(
    role: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    strides: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """A ``shape`` view of this thread's buffer for ``role`` (contiguous, or with ``strides`` that overlap no two
    elements), kept between calls: a fresh allocation of a padded cache per decoding step costs page faults (the OS
    zeroes each new page), 5x the copy itself at 16K keys. It grows by a quarter more than a call needs, so that a
    cache growing a row per step reallocates it rarely. ``ac.release_workspace()`` frees the buffers."""
    held: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = _PADDING.__dict__.setdefault("buffers", {})
    n = math.prod(shape) if strides is None else 1 + sum((d - 1) * st for d, st in zip(shape, strides, strict=True))
    key = (role, dtype, device)
    buf = held.get(key)
    if buf is None or buf.numel() < n:  # a quarter more than asked: a growing cache's next steps fit
        held.pop(key, None)  # the old buffer goes before the larger one is allocated
        buf = held[key] = torch.empty(n + n // 4, dtype=dtype, device=device)
    return buf[:n].view(shape) if strides is None else buf.as_strided(shape, strides)


def release_padding() -> int:
    """Free this thread's padding buffers (:func:`padding_buffer`); the bytes they held."""
    held = _PADDING.__dict__.pop("buffers", {})
    return sum(t.numel() * t.element_size() for t in held.values())
