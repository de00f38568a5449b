"""The cpu target: render the C++ template from the tiled IR, build it, call it through ctypes.

Runtime tensors are passed as int64 (int and bool tensors) or float32 (float tensors);
q, k, v run in float32; bf16 inputs run the native bf16 forward (``CpuKernel.native_bf16``) and the native bf16
backward (``CpuKernel.backward_bf16``) where the build has AVX512_BF16; fp16 inputs run on AMX tiles as exact bf16
splits (``CpuKernel.native_fp16``) where the build has AMX. Otherwise the fp32 kernels read and write fp16 and bf16
as they are, widened as they are loaded (F16C for fp16, a shift for bf16: ``CpuKernel.narrow_forward``,
``CpuKernel.narrow_backward``); what fits none of these (no vector unit or no F16C, RoPE, a head dim off the
micro-kernels) is upcast once, O(S * D), and the output cast back.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from attncc.codegen import cpu_template, fallback
from attncc.codegen.emit_cpp import emit
from attncc.codegen.target import Call, Lazy, Prepared, release_padding
from attncc.errors import LoweringError, SpecError
from attncc.ir.exprs import expr_str, score
from attncc.ir.ops import TensorOp
from attncc.memo import Recent
from attncc.plan import KernelPlan, RopeTables, TileLists, head_index, kernel_value, rope_tables

log = logging.getLogger("attncc.codegen.cpu")

SPAN_COLUMNS = 512  # merge runs of equal tiles into GEMMs up to this wide (measured: fewer, larger sgemm calls)
SPAN_ROWS = 128  # the backward's runs of q-blocks, up to this many rows (measured: 128 beat 256-1024, causal 4K)
SPLIT_BYTES = 512 * 1024  # K and V bytes of one kv split of a GQA group's decoding jobs (fits L2 on the pool's CPUs)
PACK_ROWS = 16  # the forward packs K for the micro-kernels when at least this many query rows read each key
# (measured at Skv=16K, D=64: below it, e.g. one-token decoding, packing K costs more than the products gain)
# a GQA group's rows (G x Sq) up to which the forward runs the group as one job on K and V in place (vector loops)
# rather than a job per head on packed K (micro-kernels). Measured (Zen 4, H=32, 8 kv heads, Skv 4K and 16K, D=64
# and 128): at 16 rows grouping is 1.16-2.0x (bf16 at 4K, D=64: 0.80x), at 32 rows fp16 1.1-1.3x (its packed path
# widens V in an extra pass), fp32 0.87-1.13x and bf16 0.79-1.0x, at 64 rows 0.64-0.97x
GROUP_ROWS = {torch.float32: 16, torch.float16: 32, torch.bfloat16: 16}
GROUP_PACKED = True  # larger groups (up to a q tile) as one register-blocked task on packed K (fp32 forward)
_P = ctypes.c_void_p
_I = ctypes.c_int64
# what the fp32 kernels' ``narrow`` argument says of q, k, v (and dout, dq, dk, dv): fp32, or fp16 or bf16 to widen
_NARROW = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _accessor(index: int, t: TensorOp) -> str:
    ctype = "float" if t.dtype == "float" else "int64_t"
    args = ", ".join(f"int64_t i{d}" for d in range(t.ndim))
    checks = " || ".join(f"i{d} < 0 || i{d} >= n[{d}]" for d in range(t.ndim))
    flat = "i0"
    for d in range(1, t.ndim):
        flat = f"({flat}) * n[{d}] + i{d}"
    return (
        f"// runtime tensor {t.tensor!r} ({t.dtype}, {t.ndim}-d)\n"
        f"inline {ctype} T_{t.tensor}(const Ctx& cx, {args}) {{\n"
        f"  const int64_t* n = cx.dims + {4 * index};\n"
        f"  if ({checks}) {{ __atomic_store_n(cx.error, {index + 1}, __ATOMIC_RELAXED); return 0; }}\n"
        f"  return ((const {ctype}*)cx.tensors[{index}])[{flat}];\n}}"
    )


def _list_reader(index: int, name: str) -> str:
    return (
        f"// block list {name!r}: is kv block kb listed in row [b, h, qb, :] (a size-1 batch or head dim is shared)\n"
        f"inline bool L_{name}(const Ctx& cx, int64_t b, int64_t h, int64_t qb, int64_t kb) {{\n"
        f"  const int64_t* n = cx.dims + {4 * index};\n"
        f"  if (qb < 0 || qb >= n[2]) {{ __atomic_store_n(cx.error, {index + 1}, __ATOMIC_RELAXED); return false; }}\n"
        "  const int64_t* row = (const int64_t*)cx.tensors[" + str(index) + "]\n"
        "      + (((n[0] == 1 ? 0 : b) * n[1] + (n[1] == 1 ? 0 : h)) * n[2] + qb) * n[3];\n"
        "  for (int64_t j = 0; j < n[3]; ++j)\n    if (row[j] == kb) return true;\n  return false;\n}"
    )


def render(plan: KernelPlan) -> str:
    """The spec's own C++ (mask, score mod, derivatives, tensor reads), from the plan."""
    bq, bkv = plan.tiles
    return cpu_template.SPEC.format(
        name=plan.name,
        bq=bq,
        bkv=bkv,
        has_mod="true" if plan.score_mod != score else "false",
        accessors="\n\n".join(
            [_accessor(i, t) for i, t in enumerate(plan.tensors)]
            + [_list_reader(i, t.tensor) for i, t in enumerate(plan.tensors) if t.tensor in plan.block_lists]
        ),
        **plan.expression_holes(emit),
        table_grads_on="true" if plan.grad_tables else "false",
        table_grads_code=_table_grads_code(plan),
    )


def render_runtime(tiles: tuple[int, int]) -> str:
    """The fixed forward and backward for these tiles: one build per machine, shared by every spec."""
    bq, bkv = tiles
    return cpu_template.RUNTIME.format(bq=bq, bkv=bkv, span=max(1, SPAN_COLUMNS // bkv), span_q=max(1, SPAN_ROWS // bq))


def _table_grads_code(plan: KernelPlan) -> str:
    """C++ statements of ``table_grads_fn``: per read of a float table in the score mod, its entry's
    index and d score_mod / d entry (reads out of bounds were reported by the forward: skipped here)."""
    names = [t.tensor for t in plan.tensors]
    lines = []
    for slot, (name, reads) in enumerate(plan.table_derivatives):
        index = names.index(name)
        for occ, deriv in reads:
            idx = [f"i{d}" for d in range(len(occ.indices))]
            flat = idx[0]
            for d in range(1, len(idx)):
                flat = f"({flat}) * n[{d}] + i{d}"
            inside = " && ".join(f"i{d} >= 0 && i{d} < n[{d}]" for d in range(len(idx)))
            lines += [
                f"  {{  // d score_mod / d {expr_str(occ)} = {expr_str(deriv)}",
                f"    const int64_t* n = cx.dims + {4 * index};",
                *(f"    const int64_t i{d} = (int64_t)({emit(e)});" for d, e in enumerate(occ.indices)),
                f"    if ({inside}) tg[tg_off[{slot}] + {flat}] += g * (float)({emit(deriv)});",
                "  }",
            ]
    return "\n".join(lines)


def _sgemm_address() -> int | None:
    """The Fortran sgemm_ of the BLAS torch ships (MKL on x86), or None for the portable loops."""
    lib_dir = Path(torch.__file__).parent / "lib"
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib"):
        path = lib_dir / name
        if path.exists():
            try:
                return ctypes.cast(ctypes.CDLL(str(path)).sgemm_, ctypes.c_void_p).value
            except (OSError, AttributeError):
                break
    log.info("cpu target: torch's BLAS sgemm_ not found; using the portable GEMM loops")
    return None


_SGEMM: list[int | None] = []


def sgemm() -> int | None:
    if not _SGEMM:
        _SGEMM.append(_sgemm_address())
    return _SGEMM[0]


_WORKSPACE = threading.local()


def workspace(floats: int) -> int:
    """Address of a float32 scratch buffer of at least ``floats`` elements, one per calling thread,
    shared by every cpu kernel and kept between calls: a fresh large allocation per call costs page
    faults (the OS zeroes each new page): about 11% of a 16K sliding-window forward, measured."""
    buf = getattr(_WORKSPACE, "buf", None)
    if buf is None or buf.numel() < floats:
        _WORKSPACE.buf = None  # the old buffer goes before the larger one is allocated
        buf = _WORKSPACE.buf = torch.empty(floats, dtype=torch.float32)
    return buf.data_ptr()


def whole_lines(floats: int) -> int:
    """``floats`` rounded up to whole 64-byte cache lines, so that what a workspace holds after them starts on a
    line (AMX tile rows that straddle two lines load and store at about half speed).

    >>> whole_lines(1), whole_lines(16), whole_lines(17)
    (16, 16, 32)
    """
    return -(-floats // 16) * 16


def workspace_bytes() -> int:
    """Bytes of the calling thread's cpu-kernel workspace (0 when it has none)."""
    buf = getattr(_WORKSPACE, "buf", None)
    return 0 if buf is None else buf.numel() * buf.element_size()


def release_workspace() -> int:
    """Free the calling thread's cpu-kernel workspace and return how many bytes it held. The workspace
    (K and V packed for the micro-kernels, the backward's per-thread dQ partials) is kept between calls and
    grows to the largest call's need: after a 16K-token, 8-head backward it holds about 128 MB. The next
    cpu-kernel call in this thread allocates afresh. The thread's buffers of zero-padded q, k or v (specs whose
    ``value_dim`` differs from ``head_dim``: ``codegen.target.padding_buffer``) are freed with it.

    >>> import torch, attncc as ac
    >>> kern = ac.compile(ac.AttentionSpec(num_heads=2, head_dim=16, mask=ac.causal()), target="cpu")
    >>> x = torch.randn(1, 2, 64, 16, requires_grad=True)
    >>> kern(x, x, x).sum().backward()  # the backward keeps its dQ partials there on every ISA
    >>> ac.release_workspace() > 0, ac.workspace_bytes()
    (True, 0)
    """
    held = workspace_bytes() + release_padding()  # (and the thread's zero-padded q, k or v: target.OneWidth)
    _WORKSPACE.buf = None
    return held


def _rope_args(tables: RopeTables, rope: bool) -> tuple[int, int, int]:
    """The rope arguments of the runtime, which rotates q and k exactly when it is given tables."""
    if (tables is not None) != rope:
        raise LoweringError(f"the plan says rope={rope} but the call {'lacks' if rope else 'passes'} rope tables")
    if tables is None:
        return 0, 0, 0
    return tables[0].data_ptr(), tables[1].data_ptr(), int(tables[0].shape[0])


def _ptr(a: np.ndarray | torch.Tensor) -> int:
    return a.ctypes.data if isinstance(a, np.ndarray) else a.data_ptr()


def _heads(num_heads: int, num_kv_heads: int, table: torch.Tensor | None) -> tuple[np.ndarray, int]:
    """``head_index`` and its address (both kept from call to call where no table reorders the heads)."""
    if table is None:
        return _grouped_heads(num_heads, num_kv_heads)
    heads = head_index(num_heads, num_kv_heads, table)
    return heads, heads.ctypes.data


def _head_stride(t: torch.Tensor) -> int | None:
    """The stride between consecutive (batch, head)s of ``t`` [B, heads, S, D] whose heads are each S contiguous rows
    (as in a contiguous tensor) one stride apart, batches included; None for any other layout."""
    B, heads, S, D = t.shape
    sb, sh, ss, sd = t.stride()
    if (sd != 1 and D > 1) or (ss != D and S > 1):
        return None
    stride = sh if heads > 1 else sb if B > 1 else S * D
    return stride if stride >= S * D and (B == 1 or sb == heads * stride) else None


def _kv_in_place(k: torch.Tensor, v: torch.Tensor, contiguous: bool = False) -> tuple[torch.Tensor, torch.Tensor, int]:
    """K and V as a forward reads them, and the stride between their (batch, kv head)s: where it reads them in place
    (few rows per key: nothing packed), a view of a longer cache (``k_cache[:, :, :n]``) is read where it is, with no
    copy of it per call; other layouts, and any where the forward packs or rotates them (``contiguous``), are made
    contiguous."""
    stride = None if contiguous else _head_stride(k)
    if stride is None or _head_stride(v) != stride:
        if not contiguous:
            _tell_copies(k, v)
        k, v = k.contiguous(), v.contiguous()
        return k, v, k.shape[2] * k.shape[3]
    return k, v, stride


_COPIES_TOLD: set[tuple[tuple[int, ...], ...]] = set()  # the stride orders whose copies were logged


def _tell_copies(k: torch.Tensor, v: torch.Tensor) -> None:
    """Log once per layout (the order of the strides) that K and V, which the forward would read in place, are copied
    per call because their heads are not each contiguous rows (a [B, S, H, D] cache seen as [B, H, S, D], a flip)."""
    order = tuple(tuple(np.argsort([-abs(x) for x in t.stride()], kind="stable").tolist()) for t in (k, v))
    if order in _COPIES_TOLD:
        return
    _COPIES_TOLD.add(order)
    log.info("cpu target: k %s and v %s (strides %s, %s) are copied to contiguous ones every call; K and V whose "
             "heads are each S contiguous rows of D, as in a [B, H, S, D] cache or a view of its first positions, are "
             "read where they are", tuple(k.shape), tuple(v.shape), k.stride(), v.stride())  # fmt: skip


@functools.lru_cache(maxsize=64)
def _grouped_heads(num_heads: int, num_kv_heads: int) -> tuple[np.ndarray, int]:
    heads = head_index(num_heads, num_kv_heads)
    return heads, heads.ctypes.data


class Packed(NamedTuple):
    """A call's runtime-tensor arguments (``CpuKernel.pack``)."""

    keep: Any  # the tensors and arrays that the addresses point into
    ptrs: int  # void*[n]: each runtime tensor's data
    dims: int  # int64[4 n]: each runtime tensor's shape


class Args(NamedTuple):
    """A runtime call's arguments after its five tensors (``CpuKernel._forward_args``), kept for later calls like it
    (``CpuKernel._args``) with what their addresses point into."""

    args: tuple[Any, ...]
    holds: tuple[Any, ...]  # the tile lists, records, head index and runtime-tensor arrays
    tail: tuple[Any, ...] = ()  # attncc_forward_bf16's arguments after its fp16 output


class CpuKernel:
    """A compiled cpu kernel: ``forward`` and ``backward`` on float32 CPU tensors."""

    def __init__(self, plan: KernelPlan) -> None:
        from attncc.codegen import toolchain

        self.source = render(plan)
        self.scale = plan.scale
        self.bq, self.bkv = plan.tiles
        self.backward_tiles = plan.backward_tiles  # the native bf16 backward walks these (CpuExecutable)
        self.tensors = list(plan.tensors)
        self.grad_tables = list(plan.grad_tables)  # float tables whose gradients it returns
        self.rope = plan.rope  # the runtime rotates q and k when it is given the tables
        self.head_table = plan.head_table  # "" or the runtime tensor naming each query head's kv head
        self.runtime_source = render_runtime(plan.tiles)
        self.lib, self.path, self.spec_compiled_now = toolchain.load(self.source, plan.name)
        self.runtime, self.runtime_path, self.runtime_compiled_now = toolchain.load(
            self.runtime_source, f"runtime_{plan.tiles[0]}x{plan.tiles[1]}"
        )
        self.compiled_now = self.spec_compiled_now or self.runtime_compiled_now
        self.lib.attncc_hooks.restype = ctypes.c_void_p
        self.hooks = self.lib.attncc_hooks()  # the spec's score-mod code, called by the runtime
        common: list[Any] = [_I] * 6 + [_P, _I, _I]
        tail: list[Any] = [_P] * 9 + [ctypes.c_int, _P, ctypes.c_float, _P, _P, _I, _P]
        self.runtime.attncc_forward.argtypes = [_P] * 5 + common + tail + [_P] + [ctypes.c_int] * 3 + [_I]
        self.runtime.attncc_backward.argtypes = [_P] * 10 + common + tail + [_P, ctypes.c_int, _P, _P, _I, _P,
                                                                             ctypes.c_int]  # fmt: skip
        self.lib.attncc_masks.argtypes = [_P, _I, _I, _I, _I, _P, _I, _I, _P, _P, _P, _P, _P, _P, ctypes.c_int]
        for fn in (self.runtime.attncc_forward, self.runtime.attncc_backward, self.lib.attncc_masks):
            fn.restype = ctypes.c_int
        self.runtime.attncc_vector_lanes.restype = ctypes.c_int
        self.lanes = int(self.runtime.attncc_vector_lanes())
        self.runtime.attncc_f16c.restype = ctypes.c_int
        self.has_f16c = bool(self.lanes and self.runtime.attncc_f16c())  # fp16 read and written by the fp32 kernels
        self.runtime.attncc_bf16.restype = ctypes.c_int
        self.has_bf16 = bool(self.runtime.attncc_bf16())  # AVX512_BF16 products in this build
        self.runtime.attncc_amx.restype = ctypes.c_int
        self.has_amx = self.has_bf16 and bool(self.runtime.attncc_amx())  # its products on AMX tiles
        fwd_bf16 = self.runtime.attncc_forward_bf16
        fwd_bf16.argtypes = [_P] * 5 + common + [_P] * 8 + [ctypes.c_int, _P, ctypes.c_float, _P, _P, ctypes.c_int,
                                                            ctypes.c_int, _P, ctypes.c_int, _I]  # fmt: skip
        fwd_bf16.restype = ctypes.c_int
        bwd_bf16 = self.runtime.attncc_backward_bf16
        bwd_bf16.argtypes = [_P] * 10 + common + [_P] * 8 + [ctypes.c_int, _P, ctypes.c_float, _P, _P, ctypes.c_int,
                                                             _P, _P, _I, _P, ctypes.c_int, _P, _P, _P, _P]  # fmt: skip
        bwd_bf16.restype = ctypes.c_int
        self.runtime.attncc_tile_bytes.restype = self.lib.attncc_tile_bytes.restype = ctypes.c_int64
        self.tile_bytes = int(self.runtime.attncc_tile_bytes())  # one partial tile's record in the keep buffer
        if self.tile_bytes != int(self.lib.attncc_tile_bytes()):
            raise LoweringError(f"{self.path.name} and {self.runtime_path.name} disagree on the keep-record layout")
        self.no_records = torch.empty(self.tile_bytes, dtype=torch.uint8)  # the records of lists with no partial tile
        self._told: set[int] = set()
        self._upcast_told: set[tuple[str, int, bool]] = set()
        self._fp32_backward_told: set[tuple[bool, int]] = set()  # (fp16, head dim)s whose fallback was logged
        self._products: dict[int, str] = {}  # products() per head dim (asked several times a call)
        self._args: Recent[Args] = Recent()  # the forwards' arguments of calls that read K and V in place (decoding)
        self._no_tensors: Packed | None = None  # pack() of a kernel that reads no runtime tensors, made once

    def products(self, head_dim: int) -> str:
        """How this kernel computes its block products at ``head_dim``: register-blocked micro-kernels
        where the head dim and the kv tile are multiples of the register block's width, else sgemm
        (with the reason; the fallback is also logged once per kernel on ``attncc.codegen.cpu``).

        >>> import attncc as ac
        >>> kern = ac.compile(ac.AttentionSpec(num_heads=2, head_dim=64, mask=ac.causal()), target="cpu")
        >>> kern.cpu_kernel().products(64).split(":")[0] in ("micro-kernels", "blas")
        True
        >>> kern.cpu_kernel().products(8).startswith("blas")  # 8 columns: narrower than any register block
        True
        """
        if head_dim not in self._products:
            self._products[head_dim] = self._describe_products(head_dim)
        return self._products[head_dim]

    def _describe_products(self, head_dim: int) -> str:
        width = 2 * self.lanes
        if not self.lanes:
            return "blas: this build has no FMA vector unit (no AVX2+FMA or AVX-512)"
        if head_dim % width or self.bkv % width:
            return f"blas: head_dim {head_dim} or kv tile {self.bkv} is not a multiple of {width}"
        bwd_bq, bwd_bkv = self.backward_tiles
        at = f" at {bwd_bq} x {bwd_bkv} tiles" if self.backward_tiles != (self.bq, self.bkv) else ""
        misfit = bf16_backward_misfit(head_dim, bwd_bq, bwd_bkv)
        backward = f"backward too{at}" if misfit is None else f"backward fp32 ({misfit})"
        if self.has_amx:
            forward = "" if self.bq % 16 == 0 else f" (not at {self.bq}-row q tiles: dot products)"
            bf16 = f"; bf16 inputs: AMX tiles{forward}, {backward}, fp32 accumulation"
            if self.bq % 16 == 0:
                bf16 += f"; fp16 inputs: AMX tiles on exact bf16 splits (Q K^T exact, P V to 2^-17), {backward}"
        elif self.has_bf16:
            bf16 = f"; bf16 inputs: AVX512_BF16 dot products, {backward}, fp32 accumulation"
        else:
            bf16 = "; bf16 inputs: read and written as bf16 (widened), fp32 products"
        if self.has_f16c and not (self.has_amx and self.bq % 16 == 0):
            bf16 += "; fp16 inputs: read and written as fp16 (F16C), fp32 products"
        return f"micro-kernels: register blocks {width} columns wide ({self.lanes}-lane FMA vectors){bf16}"

    def native_bf16(self, head_dim: int, rope: bool = False) -> bool:
        """Whether bf16 inputs run the native bf16 forward (AMX tiles or AVX512_BF16 dot products on bf16 q, k, v;
        fp32 softmax and accumulation) rather than fp32 on upcast copies: the build has the instructions, the
        micro-kernel shapes fit and no RoPE is applied (rotated specs upcast)."""
        return self.has_bf16 and not rope and self.products(head_dim).startswith("micro")

    def tell_upcast(self, dtype: torch.dtype, head_dim: int, rope: bool) -> None:
        """Log once per kernel, dtype and head dim why half-precision inputs run fp32 on upcast copies."""
        key = (str(dtype), head_dim, rope)
        if key in self._upcast_told:
            return
        self._upcast_told.add(key)
        if not self.lanes:
            why = "this build has no FMA vector unit (nor F16C, AVX512_BF16 or AMX)"
        elif dtype == torch.float16 and not self.has_f16c:
            why = "this build has no F16C conversions (and no AMX tiles)"
        elif rope:
            why = "RoPE specs rotate q and k in fp32"
        else:
            why = f"head_dim {head_dim} does not fit the micro-kernels ({self.products(head_dim)})"
        log.info("cpu kernel %s: %s inputs run fp32 on upcast copies: %s", self.path.name, dtype, why)

    def forward_bf16(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lists: TileLists, keep: torch.Tensor,
        tensors: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """o (bf16, rounded once from its fp32 sums) and lse (fp32) of bf16 q (contiguous), k and v (any layout, as in
        ``forward``) through the native bf16 forward (see ``native_bf16``)."""
        B, H, Sq, D = q.shape
        o = torch.empty(B, H, Sq, D, dtype=torch.bfloat16)
        pack = Sq * H // k.shape[1] >= PACK_ROWS  # else few rows read each key: K and V are read in place, unpacked
        lse = self._forward_bf16(q, k, v, o, lists, keep, tensors, pack)
        if lse is None:
            raise LoweringError(f"{self.runtime_path.name} has no bf16 products for head_dim {D}")
        return o, lse

    def _widens(self, dtype: torch.dtype) -> bool:
        """Whether the fp32 kernels read and write ``dtype`` as it is: fp16 with F16C, bf16 on any vector build."""
        return (dtype == torch.float16 and self.has_f16c) or (dtype == torch.bfloat16 and self.lanes > 0)

    def narrow_forward(self, dtype: torch.dtype, head_dim: int, rows: int, rope: bool = False) -> bool:
        """Whether the fp32 forward takes fp16 or bf16 q, k, v as they are (``forward`` on them: each task's q rows,
        K's panels and V widened to fp32, fp16 by F16C and bf16 by a shift; o comes out fp32, kept for the
        backward's delta, and the caller rounds it once) rather than upcast copies: the build widens ``dtype``, no
        RoPE, and the head dim fits the micro-kernels, or ``rows`` (query rows per key, Sq x query heads per kv head)
        are few enough that K and V are read in place (decoding). bf16 comes here only where the native bf16 paths
        do not take it (no AVX512_BF16), fp16 where no AMX tiles do.

        >>> import attncc as ac, torch
        >>> kern = ac.compile(ac.AttentionSpec(num_heads=4, num_kv_heads=1, head_dim=64), target="cpu")
        >>> q, k, v = torch.randn(1, 4, 1, 64).half(), torch.randn(1, 1, 4096, 64).half(), torch.randn(1, 1, 4096, 64)
        >>> o = kern(q, k, v.half())  # one-token decoding on an fp16 cache: read in place where F16C exists
        >>> want = ac.compile(kern.spec, target="reference")(q.double(), k.double(), v.half().double())
        >>> o.dtype, torch.allclose(o.double(), want, atol=2e-3)
        (torch.float16, True)
        """
        if not self._widens(dtype) or rope or head_dim % self.lanes:
            return False
        return self.products(head_dim).startswith("micro") or rows < PACK_ROWS

    def narrow_backward(self, dtype: torch.dtype, head_dim: int, rope: bool = False) -> bool:
        """Whether the fp32 backward takes fp16 or bf16 q, k, v and dO as they are (``backward`` on them; o: the
        forward's fp32 one): K and V widened as they are packed, each kv block's K rows and each run's q and dO rows
        into local fp32 tiles, dq, dk and dv rounded once; the build widens ``dtype``, no RoPE, and the head dim
        fits the micro-kernels."""
        return self._widens(dtype) and not rope and self.products(head_dim).startswith("micro")

    def native_fp16(self, head_dim: int, rope: bool = False) -> bool:
        """Whether fp16 inputs run on AMX tiles as exact bf16 splits (``forward_fp16``) rather than fp32 on upcast
        copies: the build has AMX, the micro-kernel shapes fit, q tiles are whole AMX row tiles and no RoPE."""
        return self.has_amx and self.bq % 16 == 0 and self.native_bf16(head_dim, rope)

    def forward_fp16(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lists: TileLists, keep: torch.Tensor,
        tensors: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor] | None:  # fmt: skip
        """o (fp32 sums, for the caller's one rounding to fp16) and lse of contiguous fp16 q, k, v on AMX tiles, or
        None where the tiles are not granted (the caller then upcasts).

        Every fp16 value x is exactly x_hi + x_lo with x_hi = bf16(x) and x_lo = bf16(x - x_hi) (fp16's 11
        significant bits fit two bf16s, its exponents fit bf16's). The runtime splits q, k and v as it packs them
        (F16C conversion, no copies here). Q K^T is one bf16 product of rows four times as deep,
        [q_hi | q_hi | q_lo | q_lo] . [k_hi | k_lo | k_hi | k_lo]: every product of fp16 values exact, summed in
        fp32, as the fp32 path sums them (score errors are amplified by exp, so none are left out there). P V takes
        three products, p_hi v_hi + p_hi v_lo + p_lo v_hi, with P split as it is rounded: relative error about
        2^-17 of the terms, 16x below fp16's rounding of the output (FlashAttention's fp16 P, rounded to fp16, is
        2^-11). The softmax is fp32, as in the fp32 forward. Measured against float64: the same mean error as the
        fp32 path after the rounding to fp16, and 1.1-1.6x its speed (BENCHMARKS.md).
        """
        B, H, Sq, D = q.shape
        o = torch.empty(B, H, Sq, D, dtype=torch.float32)
        lse = self._forward_bf16(q, k, v, o, lists, keep, tensors, True, fp16=True)
        return None if lse is None else (o, lse)

    def _forward_bf16(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lists: TileLists,
        keep: torch.Tensor, tensors: dict[str, torch.Tensor], pack: bool, fp16: bool = False,
    ) -> torch.Tensor | None:  # fmt: skip
        """Run attncc_forward_bf16 into o (bf16; fp32 for fp16 inputs, split as ``forward_fp16`` says); lse, or None
        where the runtime declines (no bf16 products, or fp16 inputs without AMX tiles)."""
        lse = torch.empty(q.shape[:3], dtype=torch.float32)
        key = self._memo_key("bf16", q, k, v, lists, keep, tensors) if not fp16 else None
        rest, k, v = self._arguments(
            key, k, v, lambda: self._forward_bf16_args(q, k, v, lists, keep, tensors, pack, fp16)
        )
        head = (_ptr(q), _ptr(k), _ptr(v), None if fp16 else _ptr(o), _ptr(lse))
        code = self.runtime.attncc_forward_bf16(*head, *rest.args, _ptr(o) if fp16 else None, *rest.tail)
        if code < 0:
            return None
        self._check(code)
        return lse

    def _forward_bf16_args(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lists: TileLists, keep: torch.Tensor,
        tensors: dict[str, torch.Tensor], pack: bool, fp16: bool,
    ) -> tuple[Args, torch.Tensor, torch.Tensor, bool]:  # fmt: skip
        """``attncc_forward_bf16``'s arguments after q, k, v, o and lse (up to its fp16 output, then the rest); K and V
        as it reads them; and whether the arguments may be kept (K and V read in place, nothing packed)."""
        B, H, Sq, D = q.shape
        Hkv, Skv = k.shape[1], k.shape[2]
        heads, heads_at = _heads(H, Hkv, tensors.get(self.head_table))
        width = 2 * self.lanes
        halves = (6 if fp16 else 2) * D * B * Hkv * (-(-Skv // width) * width)  # packed K (4 D wide split) and V
        threads = torch.get_num_threads()
        grouped = not fp16 and self.grouped_jobs(q, k, heads if self._table(tensors) else None, lists, False)
        pack = pack and not grouped
        given = k, v
        k, v, kv_stride = _kv_in_place(k, v, contiguous=pack)
        rt = self.pack(tensors)
        at = lists.addresses
        args = (
            B, H, Hkv, Sq, Skv, D, at["map_of"], lists.map_of.shape[0], lists.map_of.shape[1], at["kv_ptr"],
            at["kv_idx"], at["kv_full"], at["kv_rank"], at["keep_base"], keep.data_ptr(), rt.ptrs, rt.dims, threads,
            heads_at, self.scale, workspace(-(-halves // 2)) if pack else None, self.hooks,
            self.kv_splits(q, k, lists, threads, grouped), int(fp16),
        )  # fmt: skip
        return (
            Args(args, (lists, keep, heads, rt), (int(grouped), kv_stride)),
            k,
            v,
            not pack and k is given[0] and v is given[1],
        )

    def _packed(self, k: torch.Tensor, rows: int = PACK_ROWS) -> int:
        """Floats of one copy of k packed into register-block panels (0 where the BLAS path packs nothing).
        ``rows``: query rows that read each key (Sq x query heads per kv head); below ``PACK_ROWS`` packing K
        costs more than the micro-kernels save (decode): the forward then reads K and V in place, tasks of at most
        8 rows in vector loops (scores_rows, values_rows), larger ones through sgemm."""
        B, Hkv, Skv, D = k.shape
        if not self.products(D).startswith("micro") or rows < PACK_ROWS:
            return 0
        width = 2 * self.lanes
        return B * Hkv * -(-Skv // width) * width * D

    def _tell(self, head_dim: int) -> None:
        if head_dim not in self._told:
            self._told.add(head_dim)
            how = self.products(head_dim)
            if how.startswith("blas"):
                log.info("cpu kernel %s: block products fall back to sgemm (%s)", self.path.name, how[6:])

    def masks(
        self, lists: TileLists, shape: tuple[int, int, int, int], tensors: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """The record of every partial tile (its BQ x BKV keep bytes, padded to 4, then each row's kept
        column range [lo, hi) and each column's kept row range as two int16), from one pass of mask code."""
        B, H, Sq, Skv = shape
        if not lists.keep_tiles:  # no partial tile (decoding's maps, most often): nothing to write, nothing read
            return self.no_records  # (one for every such call: the runtimes only read the records)
        keep = torch.empty(lists.keep_tiles * self.tile_bytes, dtype=torch.uint8)
        rt = self.pack(tensors)
        at = lists.addresses
        code = self.lib.attncc_masks(
            keep.data_ptr(),
            B,
            H,
            Sq,
            Skv,
            at["map_of"],
            lists.map_of.shape[0],
            lists.map_of.shape[1],
            at["kv_ptr"],
            at["kv_idx"],
            at["kv_rank"],
            at["keep_base"],
            rt.ptrs,
            rt.dims,
            torch.get_num_threads(),
        )
        self._check(code)
        return keep

    def pack(self, tensors: dict[str, torch.Tensor]) -> Packed:
        """The runtime tensors as the kernels read them (``kernel_value``): the addresses of their pointer array and
        of their shapes (4 int64 each); ``keep`` holds everything alive while the call runs. Made once for a kernel
        that reads none."""
        if not self.tensors and self._no_tensors is not None:
            return self._no_tensors
        values, dims = [], np.zeros(4 * max(1, len(self.tensors)), np.int64)
        for i, t in enumerate(self.tensors):
            value = kernel_value(t, tensors)
            values.append(value)
            dims[4 * i : 4 * i + value.dim()] = value.shape
        ptrs = (ctypes.c_void_p * max(1, len(values)))(*[v.data_ptr() for v in values])
        packed = Packed((values, ptrs, dims), ctypes.addressof(ptrs), dims.ctypes.data)
        if not self.tensors:
            self._no_tensors = packed
        return packed

    def _check(self, code: int) -> None:
        if code < 0:  # the runtime refused a layout this side asked for (narrow inputs, grouped jobs): a bug here
            raise LoweringError(f"{self.runtime_path.name} refused the call's layout (dtype, head dim or job grouping)")
        if code:
            t = self.tensors[code - 1]
            raise SpecError(
                f"the cpu kernel read runtime tensor {t.tensor!r} out of its bounds; "
                "pass a larger tensor or bound the index expression"
            )

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        lists: TileLists,
        keep: torch.Tensor,
        tensors: dict[str, torch.Tensor],
        tables: RopeTables = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """o (float32) and lse of float32 q, k, v, or of fp16 or bf16 ones (see ``narrow_forward``); q contiguous, k and
        v any layout (made contiguous where they are packed or rotated, else read in place: ``_kv_in_place``)."""
        o = torch.empty(q.shape, dtype=torch.float32)
        lse = torch.empty(q.shape[:3], dtype=torch.float32)
        key = self._memo_key("fp32", q, k, v, lists, keep, tensors, tables)
        rest, k, v = self._arguments(key, k, v, lambda: self._forward_args(q, k, v, lists, keep, tensors, tables))
        code = self.runtime.attncc_forward(_ptr(q), _ptr(k), _ptr(v), _ptr(o), _ptr(lse), *rest.args)
        self._check(code)
        return o, lse

    def _forward_args(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lists: TileLists, keep: torch.Tensor,
        tensors: dict[str, torch.Tensor], tables: RopeTables,
    ) -> tuple[Args, torch.Tensor, torch.Tensor, bool]:  # fmt: skip
        """``attncc_forward``'s arguments after q, k, v, o and lse; K and V as it reads them; and whether the arguments
        may be kept for later calls like this one (K and V read in place, so nothing packed into the workspace)."""
        B, H, Sq, D = q.shape
        heads, heads_at = _heads(H, k.shape[1], tensors.get(self.head_table))
        Hkv, Skv = k.shape[1], k.shape[2]
        self._tell(D)
        narrow = _NARROW[q.dtype]
        grouped, in_place = self.fp32_jobs(q, k, heads if self._table(tensors) else None, lists, tables is not None)
        packed = 0 if in_place else self._packed(k, Sq * H // Hkv) * (2 if narrow else 1)  # (fp16, bf16: V widened)
        given = k, v
        k, v, kv_stride = _kv_in_place(k, v, contiguous=bool(packed) or tables is not None)
        rt = self.pack(tensors)
        at = lists.addresses
        threads = torch.get_num_threads()
        args = (
            B, H, Hkv, Sq, Skv, D, at["map_of"], lists.map_of.shape[0], lists.map_of.shape[1], at["kv_ptr"],
            at["kv_idx"], at["kv_full"], at["kv_rank"], at["keep_base"], keep.data_ptr(), rt.ptrs, rt.dims, sgemm(),
            threads, heads_at, self.scale, *_rope_args(tables, self.rope), workspace(packed) if packed else None,
            self.hooks, self.kv_splits(q, k, lists, threads, grouped), narrow, int(grouped), kv_stride,
        )  # fmt: skip
        return Args(args, (lists, keep, heads, rt)), k, v, not packed and k is given[0] and v is given[1]

    def _arguments(
        self, key: tuple[Any, ...] | None, k: torch.Tensor, v: torch.Tensor,
        build: Callable[[], tuple[Args, torch.Tensor, torch.Tensor, bool]],
    ) -> tuple[Args, torch.Tensor, torch.Tensor]:  # fmt: skip
        """The runtime arguments kept under ``key`` (K and V then read as given), else ``build()``'s, kept where it
        says they may be; with K and V as the call reads them."""
        rest = self._args.peek(key) if key is not None else None
        if rest is not None:
            return rest, k, v
        rest, k, v, kept = build()
        if key is not None and kept:
            self._args.put(key, rest)
        return rest, k, v

    def _memo_key(
        self, kind: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lists: TileLists, keep: torch.Tensor,
        tensors: dict[str, torch.Tensor], tables: RopeTables = None,
    ) -> tuple[Any, ...] | None:  # fmt: skip
        """What a call's runtime arguments after its five tensors depend on (``_args``): shapes, dtype, K and V's
        layout, threads, the tile lists and records (kept alive by the entry, so their ids stay theirs) and this
        module's job tunables (a benchmark may set them); None where a call passes runtime tensors or RoPE tables
        (their arguments are made every call)."""
        if tensors or tables is not None:
            return None
        tunables = GROUP_ROWS[q.dtype], GROUP_PACKED, PACK_ROWS, SPLIT_BYTES
        return (
            kind,
            q.shape,
            q.dtype,
            k.shape,
            k.stride(),
            v.stride(),
            torch.get_num_threads(),
            id(lists),
            id(keep),
            tunables,
        )

    def _table(self, tensors: dict[str, torch.Tensor]) -> bool:
        """Whether a runtime head table (GQA groups of any shape) comes with this call."""
        return tensors.get(self.head_table) is not None

    def grouped_jobs(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        heads: np.ndarray | None,
        lists: TileLists,
        rope: bool = False,
        packed: bool = False,
    ) -> bool:
        """Whether the forward runs each kv head's query heads as one job on K and V in place, so that each key is
        read once for all of them in its vector loops (GQA and MQA decoding, speculative decoding's few tokens): the
        group's rows (G x Sq) are at most ``GROUP_ROWS`` for the dtype (and the q tile), the heads of each group are
        consecutive (their rows contiguous in q and o; ``heads``: ``head_index``, None where no head table reorders
        them: query head h reads kv head h // (H // Hkv)), the block map is the same for every head, one q-block, no
        RoPE. Such calls pack nothing (``_packed`` is not asked). ``packed``: whether the group may instead be one
        register-blocked task on packed K (the fp32 forward's micro-kernels), its rows then up to a q tile
        (``GROUP_PACKED``).

        >>> import attncc as ac, torch
        >>> from attncc.plan import TileLists, head_index
        >>> kern = ac.compile(ac.AttentionSpec(num_heads=8, num_kv_heads=2, head_dim=64), target="cpu")
        >>> cpu, lists = kern.cpu_kernel(), TileLists.of(kern.block_map(1, 4096))
        >>> q, k = torch.randn(1, 8, 1, 64), torch.randn(1, 2, 4096, 64)
        >>> cpu.grouped_jobs(q, k, head_index(8, 2), lists) == (cpu.lanes > 0)  # 4 heads x 1 row per job
        True
        >>> cpu.grouped_jobs(q, k, head_index(8, 2, torch.tensor([0, 1] * 4)), lists)  # groups not consecutive
        False
        """
        rows = self._group_rows(q, k, heads, lists, rope)
        return 0 < rows <= (self.bq if packed and GROUP_PACKED else min(GROUP_ROWS[q.dtype], self.bq))

    def fp32_jobs(
        self, q: torch.Tensor, k: torch.Tensor, heads: np.ndarray | None, lists: TileLists, rope: bool = False
    ) -> tuple[bool, bool]:
        """(grouped, in place) of the fp32 forward (``forward``: fp32, and fp16 or bf16 it widens): whether its jobs
        are whole GQA groups (``grouped_jobs``), and whether on K and V in place (else on packed K, where the
        micro-kernels fit the head dim)."""
        rows = self._group_rows(q, k, heads, lists, rope)
        in_place = 0 < rows <= min(GROUP_ROWS[q.dtype], self.bq)
        micro = self.products(q.shape[3]).startswith("micro")
        return in_place or (micro and GROUP_PACKED and 0 < rows <= self.bq), in_place

    def _group_rows(
        self, q: torch.Tensor, k: torch.Tensor, heads: np.ndarray | None, lists: TileLists, rope: bool
    ) -> int:
        """The largest GQA group's rows (G x Sq) where the forward's jobs may be whole groups (``grouped_jobs``), else
        0; at most a q tile."""
        _, H, Sq, D = q.shape
        Hkv = k.shape[1]
        if Hkv == H or rope or not self.lanes or D % self.lanes or Sq > self.bq or lists.map_of.shape[1] > 1:
            return 0
        if heads is None:  # (decoding's common case, per call: no numpy)
            rows = H // Hkv * Sq
        elif bool((heads[H + Hkv + 1 :] == np.arange(H)).all()):
            rows = int(np.diff(heads[H : H + Hkv + 1]).max()) * Sq
        else:
            return 0
        return rows if rows <= self.bq else 0

    def kv_splits(self, q: torch.Tensor, k: torch.Tensor, lists: TileLists, threads: int, grouped: bool = False) -> int:
        """Into how many kv ranges the forward splits each (batch, head, q-block) task, merging their (o, lse)
        exactly; each split is a job of its own. Two reasons to split: fewer tasks than threads (one head decoding
        would use one core), and GQA groups whose query heads would each stream the same K and V from memory (a
        kv head's split of at most ``SPLIT_BYTES`` of K and V is then read once for the group, by one thread).
        ``grouped`` (``grouped_jobs``): a group's heads are one task already, so only the first reason holds.
        At most one split per kv tile of the longest row, and 64.

        >>> import attncc as ac, torch
        >>> from attncc.plan import TileLists
        >>> kern = ac.compile(ac.AttentionSpec(num_heads=8, num_kv_heads=2, head_dim=64), target="cpu")
        >>> cpu, lists = kern.cpu_kernel(), TileLists.of(kern.block_map(1, 16384))
        >>> q, k = torch.randn(1, 8, 1, 64), torch.randn(1, 2, 16384, 64)
        >>> cpu.kv_splits(q, k, lists, threads=2)  # GQA decoding: 16K keys x 64 x fp32, K and V (8 MiB) in 512 KiB
        16
        >>> cpu.kv_splits(q[:, :1], k[:, :1], lists, threads=4)  # one head (no group) on 4 threads
        4
        >>> cpu.kv_splits(q, k, lists, threads=2, grouped=True)  # a job per group: 2 jobs for 2 threads
        1
        """
        B, H, Sq, D = q.shape
        Hkv, Skv = k.shape[1], k.shape[2]
        tasks = B * (Hkv if grouped else H) * -(-Sq // self.bq)
        want = -(-threads // tasks) if tasks < threads else 1
        if Hkv < H and Sq <= self.bq and not grouped:  # one q-block per head: the group's heads read the same keys
            want = max(want, -(-2 * Skv * D * k.element_size() // SPLIT_BYTES))
        if want == 1:
            return 1
        return max(1, min(want, lists.longest_kv_row, 64))

    def backward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        o: torch.Tensor,
        do: torch.Tensor,
        lse: torch.Tensor,
        dlse: torch.Tensor | None,
        lists: TileLists,
        keep: torch.Tensor,
        tensors: dict[str, torch.Tensor],
        tables: RopeTables = None,
        want: Sequence[str] = (),
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """dq, dk, dv of float32 contiguous inputs (o and lse from ``forward``; dlse, the gradient of
        lse, may be None), and the float32 gradients of the tables named in ``want`` (a subset of
        ``grad_tables``). One call: the kernel computes delta = rowsum(do * o) - dlse, sums its
        threads' dq partials and rotates RoPE gradients back itself; its scratch (per-thread dq
        partials, packed K and V) lives in the calling thread's workspace; table gradients are summed
        from per-thread partials (``table_grad_floats`` of them). Under
        ``torch.use_deterministic_algorithms(True)`` dq is bitwise reproducible for a given thread count
        (tasks go to threads round-robin instead of dynamically; dk, dv and the forward always are).
        q, k, v and do may be fp16 or bf16 (o float32), and dq, dk and dv then are too (see ``narrow_backward``)."""
        B, H, Sq, D = q.shape
        Hkv, Skv = k.shape[1], k.shape[2]
        _held, heads_at = _heads(H, Hkv, tensors.get(self.head_table))  # (alive until the call returns)
        threads = torch.get_num_threads()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)  # (q's dtype)
        packed = 2 * self._packed(k)
        scratch = whole_lines(threads * q.numel() + B * H * Sq)  # (the packed panels after it start on a line)
        work = workspace(scratch + packed)
        rt = self.pack(tensors)
        at = lists.addresses
        sizes, offsets, partials = self._table_partials(tensors, want, threads)
        code = self.runtime.attncc_backward(
            _ptr(q),
            _ptr(k),
            _ptr(v),
            _ptr(o),
            _ptr(do),
            _ptr(lse),
            None if dlse is None else _ptr(dlse),
            _ptr(dq),
            _ptr(dk),
            _ptr(dv),
            B,
            H,
            Hkv,
            Sq,
            Skv,
            D,
            at["map_of"],
            lists.map_of.shape[0],
            lists.map_of.shape[1],
            at["q_ptr"],
            at["q_idx"],
            at["q_full"],
            at["q_rank"],
            at["keep_base"],
            keep.data_ptr(),
            rt.ptrs,
            rt.dims,
            sgemm(),
            threads,
            heads_at,
            self.scale,
            *_rope_args(tables, self.rope),
            work,
            work + 4 * scratch if packed else None,
            torch.are_deterministic_algorithms_enabled(),
            None if partials is None else partials.data_ptr(),
            _ptr(offsets),
            sum(sizes),
            self.hooks,
            _NARROW[q.dtype],
        )
        self._check(code)
        return dq, dk, dv, self._table_grads(partials, sizes, offsets, tensors)

    def backward_bf16(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, do: torch.Tensor,
        lse: torch.Tensor, dlse: torch.Tensor | None, lists: TileLists, keep: torch.Tensor,
        tensors: dict[str, torch.Tensor], want: Sequence[str] = (), fp16: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]] | None:  # fmt: skip
        """``backward`` for contiguous bf16 q, k, v, o and do (lse fp32; o and lse from ``forward_bf16``) with its five
        products on AMX tiles (where the OS grants them) or AVX512_BF16 register blocks; bf16 gradients of q, k, v
        (each rounded once from its fp32 sums, as the caller's cast would: no fp32 copies), table gradients fp32.
        None where this build has no bf16 products or the shapes do not fit them (the caller then upcasts and runs
        ``backward``).

        ``fp16``: q, k, v and do are fp16 and o is ``forward_fp16``'s fp32 output; the products run on AMX tiles on
        exact bf16 splits, as that forward's do: S = Q K^T and dP = dO V^T exact (every product of fp16 values, summed
        in fp32), P and dS split to 2^-17 as they are rounded, and dV, dK, dQ each three products (hi.hi + hi.lo +
        lo.hi), so the gradients are as accurate as the fp32 backward's (fp32 gradients, for the caller's one rounding
        to fp16). None also where the tiles are not granted."""
        B, H, Sq, D = q.shape
        Hkv, Skv = k.shape[1], k.shape[2]
        misfit = "this build has no AVX512_BF16 products" if not self.has_bf16 or self.lanes != 16 else None
        if (misfit := misfit or bf16_backward_misfit(D, self.bq, self.bkv)) is not None:
            if (fp16, D) not in self._fp32_backward_told:
                self._fp32_backward_told.add((fp16, D))
                log.info("cpu kernel %s: the %s backward runs fp32 on upcast copies: %s", self.path.name,
                         "fp16" if fp16 else "bf16", misfit)  # fmt: skip
            return None
        _held, heads_at = _heads(H, Hkv, tensors.get(self.head_table))  # (alive until the call returns)
        threads = torch.get_num_threads()
        grad = torch.float32 if fp16 else torch.bfloat16
        dq = torch.empty(B, H, Sq, D, dtype=grad)
        dk = torch.empty(B, Hkv, Skv, D, dtype=grad)
        dv = torch.empty(B, Hkv, Skv, D, dtype=grad)
        up = 2 * self.lanes  # pair rows and panels pad the sequence to NR keys
        # bf16 values packed: K and V panels (fp16: of rows split 4D deep), K pair rows, Q^T and dO^T (fp16: hi and lo)
        kv_rows, q_rows = B * Hkv * -(-Skv // up) * up * D, B * H * (-(-Sq // up) + 1) * up * D
        halves = (10 * kv_rows + 4 * q_rows) if fp16 else (3 * kv_rows + 2 * q_rows)
        scratch = whole_lines(threads * q.numel() + B * H * Sq)  # (the packed panels after it start on a line)
        work = workspace(scratch + -(-halves // 2))
        rt = self.pack(tensors)
        at = lists.addresses
        sizes, offsets, partials = self._table_partials(tensors, want, threads)
        code = self.runtime.attncc_backward_bf16(
            _ptr(q), _ptr(k), _ptr(v), _ptr(o), _ptr(do), _ptr(lse), None if dlse is None else _ptr(dlse), _ptr(dq),
            _ptr(dk), _ptr(dv), B, H, Hkv, Sq, Skv, D, at["map_of"], lists.map_of.shape[0],
            lists.map_of.shape[1], at["q_ptr"], at["q_idx"], at["q_full"], at["q_rank"],
            at["keep_base"], keep.data_ptr(), rt.ptrs, rt.dims, threads, heads_at,
            self.scale, work, work + 4 * scratch, torch.are_deterministic_algorithms_enabled(),
            None if partials is None else partials.data_ptr(), _ptr(offsets), sum(sizes), self.hooks,
            int(fp16), *((_ptr(o), _ptr(dq), _ptr(dk), _ptr(dv)) if fp16 else (None,) * 4),
        )  # fmt: skip
        if code < 0:
            return None
        self._check(code)
        return dq, dk, dv, self._table_grads(partials, sizes, offsets, tensors)

    def _table_partials(
        self, tensors: dict[str, torch.Tensor], want: Sequence[str], threads: int
    ) -> tuple[list[int], np.ndarray, torch.Tensor | None]:
        """Per table of ``grad_tables``: its size when its gradient is wanted (else 0), its offset in a thread's
        partials, and the zeroed per-thread partials (None when no table gradient is wanted)."""
        sizes = [tensors[n].numel() if n in want else 0 for n in self.grad_tables]
        offsets = np.cumsum([0, *sizes[:-1]]).astype(np.int64)
        return sizes, offsets, torch.zeros(threads, sum(sizes)) if any(sizes) else None

    def _table_grads(
        self, partials: torch.Tensor | None, sizes: list[int], offsets: np.ndarray, tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The table gradients: the threads' partials summed, each table's slice in its shape."""
        if partials is None:
            return {}
        total = partials.sum(0)
        return {
            n: total[int(at) : int(at) + size].view(tensors[n].shape)
            for n, size, at in zip(self.grad_tables, sizes, offsets, strict=True)
            if size
        }

    def table_grad_floats(self, tensors: dict[str, torch.Tensor]) -> int:
        """Floats of per-thread partial sums the backward needs for the tables in ``tensors`` that
        require grad (the api runs the reference instead when this is too large)."""
        learn = [n for n in self.grad_tables if n in tensors and tensors[n].requires_grad]
        return torch.get_num_threads() * sum(tensors[n].numel() for n in learn)


def bf16_backward_misfit(head_dim: int, bq: int, bkv: int) -> str | None:
    """Why the native bf16 backward cannot run at ``bq`` x ``bkv`` tiles and ``head_dim`` (it takes whole 32-row
    pair blocks and 32-key chunks), or None when it can.

    >>> bf16_backward_misfit(64, 32, 256) is None
    True
    >>> bf16_backward_misfit(64, 48, 64)
    'q tile 48 is not a multiple of 32'
    """
    for what, n in (("head_dim", head_dim), ("q tile", bq), ("kv tile", bkv)):
        if n % 32:
            return f"{what} {n} is not a multiple of 32"
    return None


# The fp32 backward (and bf16's, upcast, where the CPU has no AVX512_BF16) walks the plan's backward tiles where they
# are at least this many keys wide, else the forward's. Its fp32 dQ rows are loaded and stored once per kv block, so
# deep kv blocks save that traffic where the cost model found that they add few computed keys (causal, prefix-LM).
# Against the forward's 128 x 64 tiles (Zen 4, 4K, H = 8; `benchmarks/cpu_backward_tiles.py --dtype float32`,
# BENCHMARKS.md): 32 x 256 was 1.05x on causal and 1.02-1.04x on prefix-LM at D = 128, 1.00-1.02x at D = 32 and 64
# (1.12x at D = 128 in an earlier run, AVX-512 and AVX2 builds alike); the 32 x 128 tiles chosen for sliding windows,
# documents and 2-D neighborhoods were 0.86-1.02x, so those keep the forward's.
FP32_BACKWARD_BKV = 256

Parts = tuple[CpuKernel, TileLists, torch.Tensor]  # a backward's kernel, tile lists and partial-tile records


class CpuExecutable(Lazy):
    """The cpu target's executable: the compiled library (built or loaded on first use), the native bf16
    backward's kernel at the plan's backward tiles (``backward_kernel``, built when it first runs), and the
    partial-tile records of static maps, per call shape and tiles."""

    def __init__(self, plan: KernelPlan) -> None:
        super().__init__(plan)
        self._keeps: Recent[torch.Tensor] = Recent()  # partial-tile records per shape, where the map is static
        self._keeps_by_lists: Recent[tuple[TileLists, torch.Tensor]] = Recent(8)  # else per lists (and their records)
        self._backward: CpuKernel | None = None
        self._lock = threading.Lock()

    def make(self) -> CpuKernel:
        return CpuKernel(self.plan)

    @property
    def backward_kernel(self) -> CpuKernel:
        """The kernel the native bf16 and fp16 backward runs (and the fp32 one at 256-key backward tiles): built at the
        plan's backward tiles (on first use) when they differ from the forward's, else the forward's kernel."""
        if self.plan.backward_tiles == self.plan.tiles:
            return self.kernel  # type: ignore[no-any-return]
        with self._lock:
            if self._backward is None:
                self._backward = CpuKernel(dataclasses.replace(self.plan, tiles=self.plan.backward_tiles))
                log.info("cpu kernel %s: the backward walks %d x %d tiles (the forward %d x %d)",
                         self._backward.path.name, *self.plan.backward_tiles, *self.plan.tiles)  # fmt: skip
        return self._backward

    def _keep(self, kern: CpuKernel, lists: TileLists, call: Call) -> torch.Tensor:
        """The partial tiles' records of ``lists`` (``kern``'s tiles), kept per shape and tiles when static, else with
        the lists they belong to (lists of runtime tensors are kept by those tensors' values)."""
        sizes = (call.shape.batch, self.plan.num_heads, call.shape.q_len, call.shape.kv_len)
        if not lists.keep_tiles:  # no partial tile: no records to make or keep
            return kern.no_records
        if not call.static:  # lists of runtime tensors' values are kept by those values (``Kernel._lists_for``)
            held = (id(lists), *sizes, kern.bq, kern.bkv)
            found = self._keeps_by_lists.peek(held)
            if found is not None and found[0] is lists:  # (the entry holds its lists: an id is theirs while it lives)
                return found[1]
            keep = kern.masks(lists, sizes, call.tensors)
            self._keeps_by_lists.put(held, (lists, keep))
            return keep
        key = (call.shape.batch, call.shape.q_len, call.shape.kv_len, kern.bq, kern.bkv)
        return self._keeps.get(key, lambda: kern.masks(lists, sizes, call.tensors))

    def _backward_parts(self, call: Call) -> Parts:
        """(kernel, tile lists, partial-tile records) at the backward tiles, for the native bf16 backward (and the
        fp32 one where :data:`FP32_BACKWARD_BKV` says so)."""
        kern = self.backward_kernel
        lists = call.lists(self.plan.backward_tiles)
        return kern, lists, self._keep(kern, lists, call)

    def _fp32_backward_parts(self, call: Call, lists: TileLists, keep: torch.Tensor) -> Callable[[], Parts]:
        """What the fp32 backward walks: the backward tiles' parts where :data:`FP32_BACKWARD_BKV` says so, else the
        forward's kernel, tile lists and records."""
        bwd = self.plan.backward_tiles
        if bwd != self.plan.tiles and bwd[1] >= FP32_BACKWARD_BKV:
            return functools.partial(self._backward_parts, call)
        return lambda: (self.kernel, lists, keep)

    def prepare(self, call: Call) -> Prepared | None:
        """The forward of calls like ``call`` that need no gradient, on its tile lists and partial-tile records, for a
        static map with no runtime tensors and no RoPE (else None). ``forward`` still decides each call's path (K and
        V in place or packed, the threads' jobs) from the tensors it is given. ``Kernel.__call__`` makes one per call
        signature and runs later calls of that signature through it (a model's layers at one decoding step).

        >>> import attncc as ac, torch
        >>> kern = ac.compile(ac.AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=16, mask=ac.causal()), "cpu")
        >>> q, k, v = torch.randn(1, 4, 40, 16), torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
        >>> with torch.no_grad():
        ...     first = kern(q, k, v)  # validated, run, and prepared for its signature
        ...     again = kern(q, k * 2, v)  # same signature: the prepared forward, no validation or lookup
        >>> want = ac.compile(kern.spec, target="reference")(q.double(), 2 * k.double(), v.double())
        >>> from attncc.api import _signature
        >>> torch.allclose(again.double(), want, atol=1e-5), _signature(q, k, v) in kern._prepared
        (True, True)
        """
        if not call.static or call.tensors or call.rope is not None:
            return None
        kern, lists = self.kernel, call.lists()
        keep = self._keep(kern, lists, call)

        def prepared(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            o, lse, _, _ = forward(q, k, v, kern, lists, keep, {}, None)
            return o, lse

        return prepared

    def unsupported(self, call: Call) -> str | None:
        reason = fallback.reason("cpu", call.q, call.tensors, self.plan.grad_tables)
        if reason is not None and call.q.device.type != "cpu":
            raise SpecError(f"target 'cpu' got tensors on {call.q.device}; compile with target='auto' or 'triton'")
        return reason

    def run(self, call: Call) -> tuple[torch.Tensor, torch.Tensor]:
        lists = call.lists()
        keep = self._keep(self.kernel, lists, call)
        learn = tuple(fallback.learned(call.tensors))
        wanted = torch.is_grad_enabled() and (call.q.requires_grad or call.k.requires_grad or call.v.requires_grad)
        if not learn and not wanted:
            o, lse, _, _ = forward(call.q, call.k, call.v, self.kernel, lists, keep, call.tensors, call.rope)
            return o, lse  # no gradient wanted (inference, decoding): no autograd node, nothing kept
        recompute = functools.partial(call.recompute, tables=call.rope)
        parts = functools.partial(self._backward_parts, call)
        fp32_parts = self._fp32_backward_parts(call, lists, keep)
        o, lse = CpuAttention.apply(call.q, call.k, call.v, self.kernel, lists, keep, call.tensors, call.rope,
                                    recompute, parts, fp32_parts, learn, *(call.tensors[n] for n in learn))  # fmt: skip
        return o, lse


def build(plan: KernelPlan) -> CpuExecutable:
    """The cpu executable of ``plan`` (nothing is compiled until its first call or ``.kernel``)."""
    return CpuExecutable(plan)


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kern: CpuKernel,
    lists: TileLists,
    keep: torch.Tensor,
    tensors: dict[str, torch.Tensor],
    tables: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...], torch.dtype | None]:
    """o (q's dtype) and lse of one call, with what its backward keeps (q, k, v as the chosen path read them, o and
    lse as it wrote them) and the dtype of its native half-precision backward (None: the fp32 backward, on q, k, v as
    given or as they are for fp16 and bf16 it widens). ``CpuAttention`` runs this under autograd; a call that needs
    no gradient runs it alone (``CpuExecutable.run``)."""
    dtype = q.dtype
    rope = rope_tables(tables)
    # K and V as given: the kernels make them contiguous where they pack them, and read a view of a longer cache where
    # it is when few rows read each key (``_kv_in_place``); the native backwards make them contiguous
    q16, k16, v16 = q.detach().contiguous(), k.detach(), v.detach()
    if dtype == torch.bfloat16 and kern.native_bf16(q.shape[3], rope is not None):
        o, lse = kern.forward_bf16(q16, k16, v16, lists, keep, tensors)
        return o, lse, (q16, k16, v16, o, lse), torch.bfloat16  # bf16 inputs kept for the bf16 backward
    _, H, Sq, D = q.shape
    rows = Sq * H // k.shape[1]  # query rows per key: decoding reads an fp16 cache in place (F16C), unsplit
    if dtype == torch.float16 and kern.native_fp16(D, rope is not None) and rows >= PACK_ROWS:
        found = kern.forward_fp16(q16, k16, v16, lists, keep, tensors)
        if found is not None:  # fp16 inputs and the fp32 o kept for the fp16 backward, on the same splits
            o, lse = found
            return o.to(dtype), lse, (q16, k16, v16, o, lse), torch.float16
    if dtype in _NARROW and kern.narrow_forward(dtype, D, rows, rope is not None):
        o, lse = kern.forward(q16, k16, v16, lists, keep, tensors)
        return o.to(dtype), lse, (q16, k16, v16, o, lse), None  # q, k, v as given (no fp32 copies); o fp32
    if dtype == torch.float32:  # (no casts: a few microseconds of a decoding call)
        o, lse = kern.forward(q16, k16, v16, lists, keep, tensors, rope)
        return o, lse, (q.detach(), k16, v16, o, lse), None
    if dtype in (torch.bfloat16, torch.float16):
        kern.tell_upcast(dtype, q.shape[3], rope is not None)
    qf, kf, vf = (t.to(torch.float32) for t in (q16, k16, v16))
    o, lse = kern.forward(qf, kf, vf, lists, keep, tensors, rope)
    # the inputs as given (for half precision: half the memory of the fp32 copies, upcast again then)
    return o.to(dtype), lse, (q.detach(), k.detach(), v.detach(), o, lse), None


class CpuAttention(torch.autograd.Function):
    """Autograd wrapper: forward and backward both run the generated C++."""

    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kern: CpuKernel,
        lists: TileLists,
        keep: torch.Tensor,
        tensors: dict[str, torch.Tensor],
        tables: tuple[torch.Tensor, torch.Tensor] | None,
        recompute: fallback.Recompute,
        backward_parts: Callable[[], Parts],
        fp32_parts: Callable[[], Parts],
        learn: tuple[str, ...],
        *learned: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``learned``: the tensors of ``tensors`` named in ``learn`` (float tables the score mod reads
        that require grad), passed again so that autograd routes their gradients. ``recompute``: the
        call on the reference target, for differentiable gradients (``create_graph=True``).
        ``backward_parts``: the kernel, tile lists and partial-tile records at the plan's backward tiles,
        which the native bf16 backward walks (made when it first runs); ``fp32_parts``: those the fp32 backward
        walks (``CpuExecutable._fp32_backward_parts``)."""
        o, lse, saved, ctx.native = forward(q, k, v, kern, lists, keep, tensors, tables)
        ctx.save_for_backward(*saved)
        dtype, rope = q.dtype, rope_tables(tables)
        ctx.kern, ctx.lists, ctx.keep, ctx.tensors, ctx.dtype, ctx.rope = kern, lists, keep, tensors, dtype, rope
        ctx.learn, ctx.recompute, ctx.inputs = learn, recompute, (q, k, v, *learned)
        ctx.backward_parts, ctx.fp32_parts = backward_parts, fp32_parts
        return o, lse

    @staticmethod
    def backward(ctx: Any, do: torch.Tensor, dlse: torch.Tensor | None) -> tuple[Any, ...]:
        if torch.is_grad_enabled():  # create_graph=True: the C++ backward is not differentiable
            q, k, v, *rest = fallback.second_order(ctx.recompute, ctx.inputs, ctx.learn, ctx.tensors, (do, dlse))
            return q, k, v, None, None, None, None, None, None, None, None, None, *rest
        dlsef = None if dlse is None else dlse.to(torch.float32).contiguous()
        found = None
        if ctx.native is not None:  # bf16 or fp16 saved as given: the products on AMX tiles where the machine has them
            q16, k16, v16, o, lse = ctx.saved_tensors
            k16, v16 = k16.contiguous(), v16.contiguous()  # (views of a longer cache, read in place by the forward)
            do16 = do.to(ctx.native).contiguous()
            kern, lists, keep = ctx.backward_parts()
            fp16 = ctx.native == torch.float16
            found = kern.backward_bf16(
                q16, k16, v16, o, do16, lse.contiguous(), dlsef, lists, keep, ctx.tensors, ctx.learn, fp16
            )
        if found is None:
            kern, lists, keep = ctx.fp32_parts()
            narrow = ctx.dtype in _NARROW and kern.narrow_backward(ctx.dtype, do.shape[3], ctx.rope is not None)
            wide = ctx.dtype if narrow else torch.float32  # (fp16, bf16: read and written as they are, fp32 products)
            qf, kf, vf = (t.to(wide).contiguous() for t in ctx.saved_tensors[:3])
            o, lse = (t.to(torch.float32).contiguous() for t in ctx.saved_tensors[3:])
            dof = do.to(wide).contiguous()
            found = kern.backward(
                qf, kf, vf, o, dof, lse.contiguous(), dlsef, lists, keep, ctx.tensors, ctx.rope, ctx.learn
            )
        dq, dk, dv, grads = found
        learned = [grads[n].to(ctx.tensors[n].dtype) for n in ctx.learn]
        grads_qkv = dq.to(ctx.dtype), dk.to(ctx.dtype), dv.to(ctx.dtype)
        return *grads_qkv, None, None, None, None, None, None, None, None, None, *learned
