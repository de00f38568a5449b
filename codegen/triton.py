"""The triton target: render the Triton template from the tiled IR, cache it, launch it.

The generated module is written to the cache folder under a content hash (the source, Triton's
version and attncc's codegen sources) and imported from there (``@triton.jit`` needs a file);
Triton then caches the compiled binaries itself. On a GPU the tile config is the cost model's
(bq, bkv) with num_warps 4 or 8 by tile size; under ``TRITON_INTERPRET=1`` the kernels run on the
CPU, which is how this target is tested on machines without a GPU.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import types
from pathlib import Path
from typing import Any

import torch

from attncc import config, diskcache
from attncc.codegen import fallback
from attncc.codegen.emit_triton import emit
from attncc.codegen.target import Call, Lazy, with_rope
from attncc.codegen.triton_template import TEMPLATE
from attncc.errors import SpecError, UnsupportedError
from attncc.ir.exprs import expr_str, score
from attncc.ir.ops import TensorOp
from attncc.plan import KernelPlan, TileLists, head_index, kernel_value, rope_tables
from attncc.rope import NAMES as ROPE_NAMES

log = logging.getLogger("attncc.codegen.triton")


def interpreting() -> bool:
    return config.get().triton_interpret


def _loader(t: TensorOp) -> str:
    idx = [f"i{d}" for d in range(t.ndim)]
    lines = [
        f"@triton.jit\ndef _ld_{t.tensor}(T, TD, ERR, {', '.join(idx)}):",
        f"    # runtime tensor {t.tensor!r} ({t.dtype}, {t.ndim}-d): bounds-checked read",
    ]
    if t.ndim > 1:  # broadcast scalar and tile indices to one shape before comparing them
        lines.append(f"    zero = 0 * ({' + '.join(idx)})")
        lines += [f"    {i} = {i} + zero" for i in idx]
    ok, flat = [], ""
    for d, i in enumerate(idx):
        lines.append(f"    n{d} = tl.load(TD + {d})")
        ok.append(f"({i} >= 0) & ({i} < n{d})")
        flat = i if d == 0 else f"({flat}) * n{d} + {i}"
    lines += [
        f"    ok = {' & '.join(ok)}",
        f"    flat = tl.where(ok, {flat}, 0)",
        "    tl.store(ERR + flat * 0, 1, mask=~ok)",
        "    return tl.load(T + flat, mask=ok, other=0)",
    ]
    return "\n".join(lines) + "\n"


def _list_reader(name: str) -> str:
    return (
        f"@triton.jit\ndef _in_{name}(T, TD, b, h, qb, kb):\n"
        f"    # block list {name!r}: is kv block kb listed in row [b, h, qb, :] (size-1 batch or head dims shared)\n"
        "    n0 = tl.load(TD + 0)\n    n1 = tl.load(TD + 1)\n    n2 = tl.load(TD + 2)\n    n3 = tl.load(TD + 3)\n"
        "    zero = 0 * (qb + kb)\n"
        "    base = ((tl.where(n0 == 1, 0, b) * n1 + tl.where(n1 == 1, 0, h)) * n2 + qb) * n3 + zero\n"
        "    hit = zero != 0\n"
        "    for j in range(0, n3):\n"
        "        hit = hit | (tl.load(T + base + j) == kb)\n"
        "    return hit\n"
    )


def _band_code(plan: KernelPlan) -> str:
    if plan.layout != "banded":
        return "    lo = 0\n    hi = -1\n    flo = 0\n    fhi = -1"
    lines = []
    for i, b in enumerate(plan.bands):
        kw = "if" if i == 0 else "elif"
        lines.append(f"    {kw} band == {i}:  # keys {expr_str(b.band.lo)} .. {expr_str(b.band.hi)}")
        for name, e in (("lo", b.computed[0]), ("hi", b.computed[1]), ("flo", b.full[0]), ("fhi", b.full[1])):
            lines.append(f"        {name} = {emit(e)}")
    lines.append("    else:\n        lo = 0\n        hi = -1\n        flo = 0\n        fhi = -1")
    return "\n".join(lines)


def _table_grad_code(plan: KernelPlan) -> str:
    """Triton statements adding d_mod * d(score_mod)/d(entry) at every float-table entry the mod reads."""
    lines: list[str] = []
    for name, reads in plan.table_derivatives:
        for occ, deriv in reads:
            tile = " + 0 * offs_m[:, None] + 0 * offs_n[None, :]"
            lines.append(f"    # d score_mod / d {expr_str(occ)} = {expr_str(deriv)}")
            flat, ok = "", "live"
            for d, index in enumerate(occ.indices):
                lines.append(f"    i{d} = {emit(index)}{tile}")
                lines.append(f"    n{d} = tl.load(TD_{name} + {d})")
                ok += f" & (i{d} >= 0) & (i{d} < n{d})"
                flat = f"i{d}" if d == 0 else f"({flat}) * n{d} + i{d}"
            lines.append(f"    ok = {ok}")
            lines.append(
                f"    tl.atomic_add(TG_{name} + tl.where(ok, {flat}, 0), "
                f"tl.where(ok, d_mod * ({emit(deriv)}), 0.0))  # masked lanes add 0.0 to entry 0"
            )
    return "\n".join(lines) or "    pass"


_AUTOTUNE = (
    "@triton.autotune(configs=[triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (2, 3)],\n"
    '                 key=["SQ", "SKV", "D"])\n'
)


def render(plan: KernelPlan) -> str:
    params = "".join(f", T_{t.tensor}, TD_{t.tensor}" for t in plan.tensors)
    grads = "".join(f", TG_{n}" for n in plan.grad_tables)
    return TEMPLATE.format(
        grad_params=grads,
        table_grad_code=_table_grad_code(plan),
        autotune="" if interpreting() else _AUTOTUNE,
        name=plan.name,
        bq=plan.tiles[0],
        bkv=plan.tiles[1],
        layout=plan.layout,
        loaders="\n".join([_loader(t) for t in plan.tensors] + [_list_reader(n) for n in sorted(plan.block_lists)]),
        tensor_params=params,
        table_params=", ERR" + params,
        **plan.expression_holes(emit),
        band_code=_band_code(plan),
    )


def _key(source: str) -> str:
    import triton

    here = Path(__file__).parent
    own = "".join(p.read_text() for p in sorted(here.glob("*.py")))
    return hashlib.sha256((triton.__version__ + own + source).encode()).hexdigest()[:24]


def load(source: str, name: str) -> tuple[types.ModuleType, Path, bool]:
    """Import the generated module from the disk cache, writing it first if needed.

    The cached file must hold exactly ``source`` (its name carries the source's hash); one that does
    not (truncated, garbage, another module's) is discarded and rewritten. Writes are atomic with a
    unique temporary name, so concurrent writers never see each other's half-written files.
    """
    folder = diskcache.folder("triton")
    path = folder / f"{name.replace('-', '_').replace('.', '_')}_{_key(source)}.py"
    fresh = config.get().always_compile or not path.exists()
    if not fresh:
        try:
            found = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            found = f"<unreadable: {exc}>"
        if found != source:
            diskcache.discard(path, "its text is not the generated source of this key")
            fresh = True
    if fresh:
        diskcache.write_atomic(path, source)
    spec = importlib.util.spec_from_file_location(f"attncc_triton_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, path, fresh


class TritonKernel:
    """Generated Triton kernels of one graph, with forward and backward launchers."""

    def __init__(self, plan: KernelPlan) -> None:
        if any(t < 16 or t & (t - 1) for t in plan.tiles):
            raise UnsupportedError(
                f"the triton target needs power-of-2 tiles of at least 16 (tl.arange and tl.dot), got "
                f"{plan.tiles[0]}x{plan.tiles[1]}; compile with target='triton' to be told the nearest valid tiles"
            )
        self.plan = plan
        self.source = render(plan)
        self.module, self.path, self.generated_now = load(self.source, plan.name)
        self.tensors = list(plan.tensors)
        self.grad_tables = list(plan.grad_tables)
        self.rope = plan.rope
        self.bq, self.bkv = plan.tiles

    def _tensor_args(self, tensors: dict[str, torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        out = []
        for t in self.tensors:
            value = kernel_value(t, tensors, device)
            dims = torch.tensor(list(value.shape) + [1] * (4 - value.dim()), dtype=torch.int64, device=device)
            out += [value, dims]
        return out

    def _meta(self, D: int, DV: int) -> dict[str, Any]:
        meta: dict[str, Any] = dict(
            D=D,
            BLOCK_D=max(16, 1 << (D - 1).bit_length()),
            DV=DV,
            BLOCK_DV=max(16, 1 << (DV - 1).bit_length()),
            BLOCK_M=self.bq,
            BLOCK_N=self.bkv,
            HAS_MOD=self.plan.score_mod != score,
            ROPE=self.rope,
        )
        return meta  # the forward kernel is autotuned over num_warps / num_stages on a GPU

    def _bwd_meta(self, D: int, DV: int) -> dict[str, Any]:
        meta = self._meta(D, DV)
        if not interpreting():  # the backward kernels accumulate (atomics), so they are not autotuned
            meta["num_warps"] = 8 if self.bq * self.bkv > 64 * 64 else 4
        return meta

    def _rope_args(self, q: torch.Tensor, tensors: dict[str, torch.Tensor]) -> list[Any]:
        """COS, SIN, ROPE_B: the rope tables (under their call names in ``tensors``) as fp32 [Bt, Skv, D]."""
        tables = rope_tables((tensors[ROPE_NAMES[0]], tensors[ROPE_NAMES[1]]) if self.rope else None)
        return [q, q, 1] if tables is None else [tables[0], tables[1], int(tables[0].shape[0])]

    def _error(self, err: torch.Tensor) -> None:
        if int(err.item()):
            raise SpecError(
                "the triton kernel read a runtime tensor out of its bounds; pass a larger tensor "
                "or bound the index expression"
            )

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lists: TileLists, tensors: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        B, H, Sq, D = q.shape
        Skv = k.shape[2]
        o = q.new_empty(B, H, Sq, v.shape[3])
        lse = torch.empty(B, H, Sq, dtype=torch.float32, device=q.device)
        err = torch.zeros(1, dtype=torch.int32, device=q.device)
        L = lists.on(q.device)
        nq, nkv = -(-Sq // self.bq), -(-Skv // self.bkv)
        bands = len(self.plan.bands)
        self.module.attncc_fwd[(nq, B * H)](
            q,
            k,
            v,
            o,
            lse,
            err,
            *self._rope_args(q, tensors),
            L["map_of"],
            L["kv_ptr"],
            L["kv_idx"],
            L["kv_full"],
            *self._tensor_args(tensors, q.device),
            *q.stride()[:3],
            *k.stride()[:3],
            *v.stride()[:3],
            *o.stride()[:3],
            B,
            H,
            Sq,
            Skv,
            nq,
            nkv,
            lists.map_of.shape[0],
            lists.map_of.shape[1],
            self._heads(H, k.shape[1], tensors, q.device),
            self.plan.scale,
            BANDED=bands > 0,
            BANDS=max(bands, 1),
            **self._meta(D, v.shape[3]),
        )
        self._error(err)
        return o, lse

    def _heads(self, num_heads: int, num_kv_heads: int, tensors: dict[str, torch.Tensor], device: torch.device) -> Any:
        """The head index (:func:`attncc.plan.head_index`) on the kernels' device."""
        table = tensors.get(self.plan.head_table) if self.plan.head_table else None
        if table is None:
            return _grouped_heads(num_heads, num_kv_heads, device)
        return torch.from_numpy(head_index(num_heads, num_kv_heads, table)).to(device)

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
        tensors: dict[str, torch.Tensor],
    ) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
        B, H, Sq, D = q.shape
        Hkv, Skv = k.shape[1], k.shape[2]
        delta = (do.float() * o.float()).sum(-1)
        if dlse is not None:
            delta = delta - dlse.float()
        delta = delta.contiguous()
        rope = self._rope_args(q, tensors)  # both kernels read the same tables
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        err = torch.zeros(1, dtype=torch.int32, device=q.device)
        L = lists.on(q.device)
        nq, nkv = -(-Sq // self.bq), -(-Skv // self.bkv)
        args = self._tensor_args(tensors, q.device)
        shape = (B, H, Hkv, Sq, Skv)
        heads = self._heads(H, Hkv, tensors, q.device)
        maps = (lists.map_of.shape[0], lists.map_of.shape[1], heads, self.plan.scale)
        want = {n: t for n, t in tensors.items() if t.requires_grad and n in self.grad_tables}
        table_grads = {
            n: torch.zeros(tuple(tensors[n].shape), dtype=torch.float32, device=q.device) for n in self.grad_tables
        }
        self.module.attncc_bwd_dkdv[(nkv, B * Hkv)](
            q,
            k,
            v,
            do,
            lse,
            delta,
            dk,
            dv,
            err,
            *rope,
            L["map_of"],
            L["q_ptr"],
            L["q_idx"],
            L["q_full"],
            *args,
            *table_grads.values(),
            *shape,
            nkv,
            *maps,
            TABLE_GRADS=bool(want),
            **self._bwd_meta(D, v.shape[3]),
        )
        self.module.attncc_bwd_dq[(nq, B * H)](
            q,
            k,
            v,
            do,
            lse,
            delta,
            dq,
            err,
            *rope,
            L["map_of"],
            L["kv_ptr"],
            L["kv_idx"],
            L["kv_full"],
            *args,
            *shape,
            nq,
            *maps,
            **self._bwd_meta(D, v.shape[3]),
        )
        self._error(err)
        return (dq, dk, dv), {n: g.to(want[n].dtype) for n, g in table_grads.items() if n in want}


class TritonExecutable(Lazy):
    """The triton target's executable: the generated kernels, rendered and loaded on first use."""

    def make(self) -> TritonKernel:
        return TritonKernel(self.plan)

    def unsupported(self, call: Call) -> str | None:
        return fallback.reason("triton", call.q, call.tensors)

    def run(self, call: Call) -> tuple[torch.Tensor, torch.Tensor]:
        given = with_rope(call.tensors, call.rope)  # the rope tables ride along under their call names
        names = list(given)
        o, lse = TritonAttention.apply(call.q, call.k, call.v, self.kernel, call.lists(), call.recompute, names,
                                       *(given[n] for n in names))  # fmt: skip
        return o, lse

    def prepare(self, call: Call) -> None:
        return None


@functools.lru_cache(maxsize=64)
def _grouped_heads(num_heads: int, num_kv_heads: int, device: torch.device) -> torch.Tensor:
    """``head_index`` without a table on ``device``, copied there once per head counts (the kernels only read it)."""
    return torch.from_numpy(head_index(num_heads, num_kv_heads).copy()).to(device)


def build(plan: KernelPlan) -> TritonExecutable:
    """The triton executable of ``plan`` (rendered and loaded on its first call or ``.kernel``)."""
    return TritonExecutable(plan)


class TritonAttention(torch.autograd.Function):
    """Autograd wrapper: forward and backward both run the generated Triton kernels; runtime
    tensors are inputs too, so a learnable float table read by the score mod gets its gradient."""

    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kern: TritonKernel,
        lists: TileLists,
        recompute: fallback.Recompute,
        names: list[str],
        *values: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``recompute``: the call on the reference target, for differentiable gradients."""
        tensors = dict(zip(names, values, strict=True))
        qc, kc, vc = (t.detach().contiguous() for t in (q, k, v))
        o, lse = kern.forward(qc, kc, vc, lists, tensors)
        ctx.save_for_backward(qc, kc, vc, o, lse)
        ctx.kern, ctx.lists, ctx.names, ctx.tensors = kern, lists, names, tensors
        ctx.recompute, ctx.inputs = recompute, (q, k, v, *values)
        return o, lse

    @staticmethod
    def backward(ctx: Any, do: torch.Tensor, dlse: torch.Tensor | None) -> tuple[Any, ...]:
        if torch.is_grad_enabled():  # create_graph=True: the generated backward is not differentiable
            q, k, v, *rest = fallback.second_order(ctx.recompute, ctx.inputs, ctx.names, ctx.tensors, (do, dlse))
            return q, k, v, None, None, None, None, *rest
        q, k, v, o, lse = ctx.saved_tensors
        (dq, dk, dv), grads = ctx.kern.backward(q, k, v, o, do.contiguous(), lse, dlse, ctx.lists, ctx.tensors)
        return (dq, dk, dv, None, None, None, None, *(grads.get(n) for n in ctx.names))
