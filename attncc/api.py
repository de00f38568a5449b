"""``ac.compile`` and the :class:`Kernel` it returns.

>>> import torch, attncc as ac
>>> spec = ac.AttentionSpec(num_heads=2, head_dim=16, mask=ac.causal())
>>> kern = ac.compile(spec, target="reference")
>>> q = k = v = torch.randn(1, 2, 8, 16)
>>> out, lse = kern(q, k, v, return_lse=True)
>>> tuple(out.shape), tuple(lse.shape)
((1, 2, 8, 16), (1, 2, 8))
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import itertools
import logging
from pathlib import Path
from typing import Any

import torch

from attncc import config, dump, rope, routing
from attncc.analysis import tiling
from attncc.analysis.blockmap import BlockMap
from attncc.analysis.costmodel import representative_length
from attncc.codegen import fallback, reference, toolchain
from attncc.codegen.target import Call, Executable, Prepared, with_rope
from attncc.codegen.target import build as build_target
from attncc.errors import SpecError, UnsupportedError
from attncc.ir import exprs as X
from attncc.ir.core import Graph
from attncc.linear import LinearAttentionSpec
from attncc.lower import linear_to_ir, spec_to_ir
from attncc.memo import Recent
from attncc.passes.base import PassRecord, parse_pipeline, run_pipeline
from attncc.plan import TileLists, lower, lower_linear
from attncc.spec import AttentionSpec
from attncc.validate import CallShape, check_qkv, check_requires, check_tensors

log = logging.getLogger("attncc.api")

DEFAULT_PIPELINE = "canonicalize,fuse,block-sparse{{{tiles}}}"  # tiles: bq=..,bkv=.. or target=..,n=.. (cost model)
TARGETS = ("auto", "cpu", "triton", "reference")
CONTENTS = 4  # maps of runtime tensors' values a kernel keeps (a training step's forward and backward tiles, twice)
AHEAD = 128  # key lengths whose maps (and lists) a growing cache's step builds at once (``Kernel._static_lists``)
GROWTH = 8  # keys a step may add and still count as a generation loop's next step (speculative decoding adds several)
_CACHE: dict[tuple[AttentionSpec, str, str, tuple[int, ...], str], Kernel] = {}
# the same kernels by structure (the spec without its captured bindings): a spec that differs from a
# compiled one only in which tensors it captured reuses that kernel's IR and code, bound to its own tensors
_BY_STRUCTURE: dict[tuple[Any, ...], Kernel] = {}
# the same kernels by everything but the spec's name: a model's layers (torch.compile names each site) share one
# kernel's code and its per-call memos, so a decoding step's new key length is worked out once, not once per layer
_BY_BODY: dict[tuple[Any, ...], Kernel] = {}


class Kernel:
    """A compiled attention: call it like a function; inspect ``ir``, ``source``; ``dump`` it."""

    def __init__(self, spec: AttentionSpec, target: str, pipeline: str, graph: Graph, records: list[PassRecord]):
        self.spec = spec
        self.auto = False  # set by compile(target="auto"): CUDA tensors then go to triton
        self.target = target
        self.pipeline = pipeline
        self.graph = graph
        self.records = records
        self.plan = lower(graph)  # what every target builds from
        self._built: dict[str, Executable] = {}  # target -> its executable; shared with rebound() twins
        self._last_call: dump.Call | None = None  # lengths and runtime tensors of the last call, for dump()
        self._dumped_to: Path | None = None  # ATTNCC_DUMP_DIR folder whose map waits for a call's tensors
        self._start_memos()
        self._mask_tensors = frozenset(X.tensor_refs(spec.mask))  # (the score mod's tensors never hide a tile)
        self.block_size = self.plan.tiles
        self.key = hashlib.sha256(f"{target}\n{pipeline}\n{records[-1].ir}".encode()).hexdigest()[:16]

    def _start_memos(self) -> None:
        """Empty per-shape memos (a new kernel's, or a rebound twin's, whose tensors differ)."""
        self._lists: Recent[TileLists] = Recent()  # per shape and tiles, where the map is static
        self._lists_by_tiles: Recent[TileLists] = Recent()  # one q-block's, per tiles (``_tile_lists``)
        self._ahead: Recent[TileLists] = Recent(AHEAD * 16)  # lengths growing caches reach next (``_static_lists``)
        self._prepared: Recent[Prepared] = Recent()  # per call signature (``_signature``): calls that skip validation
        self._lengths: Recent[Executable] = Recent()  # per signature less the key length (``_any_length``)
        self._lists_by_content: Recent[TileLists] = Recent(CONTENTS)  # per shape and mask tensors' values

    def __repr__(self) -> str:
        return f"Kernel(@{self.spec.name}, target={self.target!r}, key={self.key})"

    def renamed(self, spec: AttentionSpec) -> Kernel:
        """This kernel for ``spec``, which differs only in its name: the same IR and code (named as this kernel's),
        and the same per-call memos (maps, tile lists, prepared calls), shared from now on."""
        if _body(spec) != _body(self.spec):
            raise SpecError(f"renamed(): {spec!r} is not {self.spec!r} under another name")
        return self._twin(spec)

    def rebound(self, spec: AttentionSpec) -> Kernel:
        """This kernel (IR, generated code) for ``spec``, which differs only in its captured tensors."""
        if _structure(spec) != _structure(self.spec):
            raise SpecError(f"rebound(): {spec!r} is not {self.spec!r} with other captured tensors")
        twin = self._twin(spec)
        twin._start_memos()
        return twin

    def _twin(self, spec: AttentionSpec) -> Kernel:
        """A shallow copy for ``spec``: the same plan, executables and memos, no last call or pending dump."""
        twin = copy.copy(self)
        twin.spec = spec
        twin._last_call = twin._dumped_to = None
        return twin

    @property
    def ir(self) -> str:
        """Textual IR after the whole pass pipeline."""
        return self.records[-1].ir

    @property
    def source(self) -> str:
        """Generated source of the chosen target (C++ for cpu, Triton, PyTorch for reference)."""
        return self.executable(self.target).source

    def executable(self, target: str) -> Executable:
        """``target``'s executable of this kernel's plan (``codegen.target.build``), built on first use."""
        if target not in self._built:
            self._built[target] = build_target(target, self.plan)
        return self._built[target]

    def triton_kernel(self) -> Any:
        """The generated Triton kernels (rendered and cached on first use)."""
        return self.executable("triton").kernel  # type: ignore[attr-defined]

    def cpu_kernel(self) -> Any:
        """The compiled C++ kernel (built on first use, cached on disk)."""
        return self.executable("cpu").kernel  # type: ignore[attr-defined]

    def _static(self) -> bool:
        """True when the block map depends on the lengths only (no runtime or captured tensors, and no kv-block lists
        selected from each call's q and k): then its lists and records are kept per shape."""
        return not self.spec.runtime_tensors() and not self.spec.captured and not self.plan.selects

    def _lists_for(
        self, shape: CallShape, bound: dict[str, torch.Tensor], block: tuple[int, int] | None = None
    ) -> TileLists:
        """Tile lists of a call at ``block`` (default: the plan's tiles); cached per shape and block when the mask
        is static."""
        block = block or self.plan.tiles
        if not self._static():  # (kept by the values of the tensors the mask reads: a model's layers share them)
            key = (shape.batch, shape.q_len, shape.kv_len, *block, *_contents(bound, self._mask_tensors))
            return self._lists_by_content.get(key, lambda: TileLists.of(self._map(shape, bound, block)))
        key = (shape.batch, shape.q_len, shape.kv_len, *block)
        return self._lists.get(key, lambda: self._static_lists(shape, block))

    def _static_lists(self, shape: CallShape, block: tuple[int, int]) -> TileLists:
        """The lists of a static mask at ``shape``. A banded map of one q-block whose call follows one at a slightly
        shorter key length (a generation loop's steps, ``GROWTH`` keys apart at most) is built with the maps of the
        next ``AHEAD`` lengths (:func:`attncc.analysis.tiling.build_lengths`), and their lists with it (one lists for
        each run of lengths with the same tiles), which the next steps then find."""
        key = (shape.batch, shape.q_len, shape.kv_len, *block)
        found = self._ahead.peek(key)
        if found is not None:
            return found
        rec, n = self.plan.recipe, shape.kv_len
        growing = any((shape.batch, shape.q_len, n - d, *block) in self._lists for d in range(1, GROWTH + 1))
        if rec.bands is None or shape.q_len > block[0] or not growing:
            return self._tile_lists(self._map(shape, {}, block))
        maps = tiling.build_lengths(rec, shape.q_len, range(n, n + AHEAD), block, self.plan.num_heads, shape.batch)
        first = lists = self._tile_lists(maps[0])
        for before, bm in itertools.pairwise(maps):
            lists = lists if bm.shares_tiles(before) else self._tile_lists(bm)
            self._ahead.put((shape.batch, shape.q_len, bm.kv_len, *block), lists)
        return first

    def _tile_lists(self, bm: BlockMap) -> TileLists:
        """The lists of a static map; those of one q-block (decoding) shared with any recent map of the same tiles
        (``BlockMap.tiles_key``): the steps whose new key falls in one kv block. (Larger maps are not keyed by their
        contents: a key would hold a copy of them.)"""
        if bm.num_q_blocks > 1:
            return TileLists.of(bm)
        return self._lists_by_tiles.get(bm.tiles_key(), lambda: TileLists.of(bm))

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, return_lse: bool = False, **tensors: torch.Tensor
    ) -> Any:
        """o [B,Hq,Sq,D] (and lse [B,Hq,Sq] with ``return_lse``); differentiable."""
        signature = _signature(q, k, v) if not tensors else None
        prepared = self._prepared.peek(signature) if signature is not None else None
        if prepared is not None and not _wants_gradient(q, k, v):
            o, lse = prepared(q, k, v)  # a call like an earlier one, needing no gradient (decoding's layers, steps)
            return (o, lse) if return_lse else o
        if signature is not None and 0 < k.shape[2] == v.shape[2] and not _wants_gradient(q, k, v):
            exe = self._lengths.peek(_any_length(signature))
            if exe is not None:  # a call like a prepared one at another key length (a generation loop's next step)
                o, lse = self._new_length(exe, q, k, v, signature)
                return (o, lse) if return_lse else o
        shape = check_qkv(self.spec, q, k, v)
        check_requires(self.spec, shape)
        tensors = dict(tensors)
        tables = rope.take(
            self.spec.rope, tensors, shape.batch, shape.q_len, shape.kv_len, self.spec.head_dim, q.device
        )
        bound = check_tensors(self.spec, shape, tensors, q.device)
        order = routing.token_order(self.spec)  # a grid route: its kernel runs on region-major tokens
        if order is not None:
            q, k, v = (x.index_select(2, order[0].to(x.device)) for x in (q, k, v))
        if self.plan.selects and shape.batch:  # kv-block lists chosen from this call's q and k (attn.select)
            selected = self._select(q, k, bound.get(self.spec.head_table))
            bound, tensors = {**bound, **selected}, {**tensors, **selected}
        if shape.batch == 0:  # empty in, empty out (as torch), still connected to q, k, v for autograd
            link = (q.sum() + k.sum() + v.sum()) * 0
            o = q.new_zeros((*q.shape[:-1], v.shape[-1])) + link
            lse = torch.zeros(q.shape[:-1], dtype=torch.float32, device=q.device) + link.float()
            return (o, lse) if return_lse else o
        if self.spec.runtime_tensors() or self.plan.selects:
            self._remember(shape, tensors)
        name = "triton" if self.target == "triton" or (self.auto and q.device.type == "cuda") else self.target
        call = Call(q, k, v, shape, bound, tables, functools.partial(self._lists_for, shape, bound), self._static(),
                    self._recompute)  # fmt: skip
        exe = self.executable(name)
        reason = exe.unsupported(call)
        if reason is not None:
            log.info("%s target: running the reference target for this call: %s", name, reason)
            exe = self.executable("reference")
        o, lse = exe.run(call)
        if signature is not None and tables is None and order is None and not self.plan.selects:
            made = exe.prepare(call)
            if made is not None:
                self._prepared.put(signature, made)
                self._lengths.put(_any_length(signature), exe)
        if order is not None:
            o, lse = o.index_select(2, order[1].to(o.device)), lse.index_select(2, order[1].to(o.device))
        return (o, lse) if return_lse else o

    def _new_length(
        self, exe: Executable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, signature: tuple[Any, ...]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A call whose signature is a prepared call's but for the key length (K and V of one length, not empty),
        needing no gradient: of what validation checks, only the spec's length requirements can differ, and of what
        dispatch decides, only the tile lists; run on ``exe`` (the prepared call's executable) and prepared in turn."""
        shape = CallShape(int(q.shape[0]), int(q.shape[2]), int(k.shape[2]))
        check_requires(self.spec, shape)
        lists = functools.partial(self._lists_for, shape, {})
        call = Call(q, k, v, shape, {}, None, lists, True, self._recompute)
        o, lse = exe.run(call)
        made = exe.prepare(call)
        if made is not None:
            self._prepared.put(signature, made)
        return o, lse

    def _select(self, q: torch.Tensor, k: torch.Tensor, heads: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The kv-block lists of the plan's ``attn.select`` ops for this q and k (not differentiable); ``heads``:
        the call's head table, when the spec has one."""
        routes = dict(self.spec.selectors)
        return {t.tensor: routing.select(routes[t.tensor], q.detach(), k.detach(), heads) for t in self.plan.selects}

    def _remember(self, shape: CallShape, tensors: dict[str, torch.Tensor]) -> None:
        """Keep this call's lengths and runtime tensors for dump(); draw a pending ATTNCC_DUMP_DIR map."""
        given = {n: t.detach() for n, t in tensors.items() if n not in rope.NAMES}  # no autograd graph kept
        self._last_call = (shape.batch, shape.q_len, shape.kv_len, given)
        if self._dumped_to is not None:
            where, self._dumped_to = self._dumped_to, None
            dump.update_picture(self, where, self._last_call)

    def _recompute(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        tensors: dict[str, torch.Tensor],
        tables: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The call on the reference target (differentiable twice): second-order gradients."""
        ref = self.executable("reference")
        return ref(q, k, v, with_rope(tensors, tables), True)  # type: ignore[operator, no-any-return]

    def block_map(
        self,
        q_len: int,
        kv_len: int,
        batch: int = 1,
        block: tuple[int, int] | None = None,
        q: torch.Tensor | None = None,
        k: torch.Tensor | None = None,
        **tensors: torch.Tensor,
    ) -> BlockMap:
        """The tile map at these lengths (runtime tensors by keyword, as for a call; rope tables,
        which do not change the map, are accepted and ignored). A routed mask selects its blocks from
        ``q`` and ``k`` (give them, or its selected list by name)."""
        tensors = {n: t for n, t in tensors.items() if n not in rope.NAMES}
        missing = [t.tensor for t in self.plan.selects if t.tensor not in tensors]
        if missing and (q is None or k is None):
            raise SpecError(f"the map of this routed mask depends on q and k: pass block_map(..., q=q, k=k) "
                            f"or the selected list(s) {missing} by name")  # fmt: skip
        if missing:
            assert q is not None and k is not None
            if (order := routing.token_order(self.spec)) is not None:  # the map is in region-major order
                q, k = q.index_select(2, order[0]), k.index_select(2, order[0])
            heads = tensors.get(self.spec.head_table) if self.spec.head_table else None
            tensors.update({n: t for n, t in self._select(q, k, heads).items() if n in missing})
        if min(q_len, kv_len, batch) < 1:  # (a call refuses them too)
            raise SpecError(f"empty sequence: block_map(q_len={q_len}, kv_len={kv_len}, batch={batch}) needs at least "
                            "one query, one key and one batch entry")  # fmt: skip
        selected = {t.tensor: tensors.pop(t.tensor) for t in self.plan.selects}
        shape = CallShape(batch, q_len, kv_len)
        check_requires(self.spec, shape)
        mask_names = set(X.tensor_refs(self.spec.mask))  # the score mod's tensors do not change the map
        bound = check_tensors(self.spec, shape, tensors, torch.device("cpu"), mask_names) if self.spec.tensors else {}
        bound.update({n: t.cpu() for n, t in selected.items()})
        return self._map(shape, {n: t for n, t in bound.items() if n in mask_names}, block)

    @property
    def recipe(self) -> tiling.Recipe:
        """The symbolic part of the block map (bands, dependencies), worked out once (in the plan)."""
        return self.plan.recipe

    def _map(self, shape: CallShape, bound: dict[str, torch.Tensor], block: tuple[int, int] | None = None) -> BlockMap:
        """The block map of a validated call (runtime tensors already bound)."""
        read = self._mask_tensors if bound else frozenset()  # the mask's tensors only (a bias never hides a tile)
        half = (torch.float16, torch.bfloat16)  # numpy has no bfloat16; the values convert exactly
        values = {
            n: (t.float() if t.dtype in half else t).detach().cpu().numpy() for n, t in bound.items() if n in read
        }
        return self.plan.block_map(shape.q_len, shape.kv_len, shape.batch, values, block)

    def dump(
        self, path: str | Path, q_len: int | None = None, kv_len: int | None = None, **tensors: torch.Tensor
    ) -> Path:
        """Write the IR after every pass, the source, the block-map picture and metadata under ``path``.

        A map that depends on runtime tensors is drawn from those given here (with ``q_len`` and
        ``kv_len``), else from the kernel's last call, else it is noted as not drawn yet.
        """
        call = self._last_call
        if tensors or q_len is not None:
            if q_len is None and call is None:
                raise SpecError("dump(path, **tensors) needs q_len= (and kv_len=, default q_len) to draw the map")
            q = q_len if q_len is not None else call[1]  # type: ignore[index]
            call = (1, q, kv_len if kv_len is not None else q, tensors)
        return dump.write(self, Path(path), call)


def _contents(bound: dict[str, torch.Tensor], names: frozenset[str]) -> tuple[Any, ...]:
    """The values of the tensors ``names`` in ``bound``, as (name, dtype, shape, digest of the bytes) each: what a map
    of runtime tensors depends on besides the lengths. (A digest, not the bytes: a key holds no copy of a tensor.)"""
    out = []
    for name in sorted(names & bound.keys()):
        t = bound[name].detach()
        data = t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        out.append((name, t.dtype, tuple(t.shape), _digest(name, data)))
    return tuple(out)


# tensor name -> the last bytes digested under it (one copy per name) and their digest
_LAST_BYTES: dict[str, tuple[bytes, bytes]] = {}


def _digest(name: str, data: bytes) -> bytes:
    """blake2b of ``data``; a model's layers pass one tensor per step, so bytes equal to the last ones digested under
    this name (compared in full: a few microseconds against the hash's ~75 us for 64 KB) give their digest again."""
    last = _LAST_BYTES.get(name)
    if last is not None and last[0] == data:
        return last[1]
    digest = hashlib.blake2b(data, digest_size=16).digest()
    _LAST_BYTES[name] = (data, digest)
    return digest


def _signature(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[Any, ...] | None:
    """What validating q, k and v reads (shapes, dtypes, devices): a call with the signature of an earlier, validated
    one is valid too. None for anything but plain tensors (a subclass, such as tracing's fake tensors, or not a
    tensor at all): those are validated every call."""
    if not (type(q) is type(k) is type(v) is torch.Tensor):
        return None
    return q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device


def _any_length(signature: tuple[Any, ...]) -> tuple[Any, ...]:
    """``_signature``'s key less K's and V's lengths: calls a generation loop makes step after step."""
    q, k, v, *rest = signature
    return (q, k[:2] + k[3:], v[:2] + v[3:], *rest)


def _wants_gradient(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)


def _resolve_target(target: str) -> str:
    if target not in TARGETS:
        raise SpecError(f"unknown target {target!r}; choose one of {list(TARGETS)}")
    if target == "triton":
        try:
            import triton  # noqa: F401
        except ImportError as exc:
            raise UnsupportedError(f"target 'triton' needs the triton package: {exc}") from exc
        return "triton"
    if target in ("cpu", "auto"):
        try:
            toolchain.compiler()
        except UnsupportedError:
            if target == "cpu":
                raise
            log.warning("target auto: no C++ compiler, using the reference target")
            return "reference"
        return "cpu"
    return target


MAX_TILE = 4096  # the cpu kernel records kept ranges inside a tile as int16


def compile(
    spec: AttentionSpec, target: str = "auto", pipeline: str | None = None, tiles: tuple[int, int] | None = None
) -> Kernel:
    """Compile ``spec`` for ``target``; the same arguments give the cached kernel.

    ``tiles=(bq, bkv)`` overrides the cost model's tile choice; ``pipeline`` replaces the
    default pass pipeline (``canonicalize,fuse,block-sparse{target=..,n=..}``: the block-sparse pass picks
    the tiles with the target's cost model at the spec's representative length; ``bq=..,bkv=..`` with
    ``tiles``).
    """
    if isinstance(spec, LinearAttentionSpec):
        return LinearKernel(spec, target)  # type: ignore[return-value]
    if not isinstance(spec, AttentionSpec):
        raise SpecError(f"compile() takes an AttentionSpec or LinearAttentionSpec, got {type(spec).__name__}")
    resolved = _resolve_target(target)
    if tiles is not None and (len(tiles) != 2 or any(not isinstance(t, int) or not 1 <= t <= MAX_TILE for t in tiles)):
        raise SpecError(f"tiles must be a pair of ints (bq, bkv) in 1..{MAX_TILE}, got {tiles!r}")
    cfg = config.get()
    key = _cache_key(spec, resolved, pipeline, tiles)
    if not cfg.always_compile and key in _CACHE:
        return _CACHE[key]
    shared, body = (_structure(spec), *key[1:]), (_body(spec), *key[1:])
    if not cfg.always_compile and (body in _BY_BODY or shared in _BY_STRUCTURE):
        # the kernel under another name (its memos shared), else with other captured tensors (memos of its own)
        kern = _BY_BODY[body].renamed(spec) if body in _BY_BODY else _BY_STRUCTURE[shared].rebound(spec)
        kern.auto = target == "auto"
        _CACHE[key] = _BY_BODY.setdefault(body, kern)
        return kern
    if pipeline is None:
        chosen = f"bq={tiles[0]},bkv={tiles[1]}" if tiles else f"target={resolved},n={representative_length(spec)}"
        if not tiles and resolved == "cpu" and toolchain.bf16_register_blocks(cfg.cpu_isa):
            chosen += ",register_blocks=1"  # the backward's tiles for AVX512_BF16 register blocks (no AMX)
        pipeline = DEFAULT_PIPELINE.format(tiles=chosen)
    text = pipeline
    result = run_pipeline(spec_to_ir(spec), parse_pipeline(text))
    kern = Kernel(spec, resolved, text, result.graph, result.records)
    if resolved == "triton" and (problem := triton_tiles_problem(*kern.block_size)):
        raise SpecError(problem)
    kern.auto = target == "auto"
    if cfg.debug >= 1:
        config.knob_logger(log.name).info(
            "compiled %r: %s", kern, ", ".join(f"{r.spelling} {r.seconds * 1e3:.1f} ms" for r in result.records[1:])
        )
    if cfg.debug >= 4:
        config.knob_logger(log.name).info("source of %r:\n%s", kern, kern.source)
    if cfg.dump_dir is not None:
        where = kern.dump(cfg.dump_dir / f"{spec.name}-{kern.key}")
        config.knob_logger(log.name).info("dumped %r to %s", kern, where)
        if spec.runtime_tensors():
            kern._dumped_to = where
    _CACHE[key] = _BY_STRUCTURE[shared] = _BY_BODY[body] = kern
    return kern


def _cache_key(
    spec: AttentionSpec, resolved: str, pipeline: str | None, tiles: tuple[int, int] | None
) -> tuple[AttentionSpec, str, str, tuple[int, ...], str]:
    isa = config.get().cpu_isa if resolved == "cpu" else ""  # the cpu build differs per instruction set
    return (spec, resolved, pipeline or "", tuple(tiles or ()), isa)


def is_cached(
    spec: AttentionSpec, target: str = "auto", pipeline: str | None = None, tiles: tuple[int, int] | None = None
) -> bool:
    """True when ``compile`` with these arguments returns an already compiled kernel (or that kernel under this
    spec's name: ``Kernel.renamed``, which compiles nothing).

    >>> import attncc as ac
    >>> spec = ac.AttentionSpec(num_heads=1, head_dim=8, mask=ac.sliding_window(3), name="is_cached_doc")
    >>> before = ac.api.is_cached(spec, "reference")
    >>> kern = ac.compile(spec, "reference")
    >>> other = ac.AttentionSpec(num_heads=1, head_dim=8, mask=ac.sliding_window(3), name="is_cached_doc_2")
    >>> before, ac.api.is_cached(spec, "reference"), ac.api.is_cached(other, "reference")
    (False, True, True)
    """
    key = _cache_key(spec, _resolve_target(target), pipeline, tiles)
    return key in _CACHE or (_body(spec), *key[1:]) in _BY_BODY


def triton_tiles_problem(bq: int, bkv: int) -> str | None:
    """Why the triton target cannot run (bq, bkv) tiles (it needs powers of 2, at least 16, for
    ``tl.arange`` and ``tl.dot``), naming the nearest tiles it can run; None when it can.

    >>> triton_tiles_problem(48, 32).split(": ")[-1]
    'use tiles=(32, 32) or (64, 32)'
    >>> triton_tiles_problem(64, 16) is None
    True
    """
    ok = [t >= 16 and t & (t - 1) == 0 for t in (bq, bkv)]
    if all(ok):
        return None
    below = [t if good else max(16, 1 << (t.bit_length() - 1)) for t, good in zip((bq, bkv), ok)]
    above = [t if good else max(16, 1 << (t - 1).bit_length()) for t, good in zip((bq, bkv), ok)]
    options = " or ".join(dict.fromkeys(f"({a}, {c})" for a, c in (below, above)))
    return (
        f"the triton target needs power-of-2 tiles of at least 16 (tl.arange and tl.dot); got {bq}x{bkv}: "
        f"use tiles={options}"
    )


def _structure(spec: AttentionSpec) -> tuple[Any, ...]:
    """The spec's compared fields except its captured bindings: what the generated code depends on."""
    return tuple(getattr(spec, f.name) for f in dataclasses.fields(spec) if f.compare and f.name != "bindings")


def _body(spec: AttentionSpec) -> tuple[Any, ...]:
    """The spec's compared fields except its name: what its kernel computes, for the same captured tensors."""
    return tuple(getattr(spec, f.name) for f in dataclasses.fields(spec) if f.compare and f.name != "name")


class LinearKernel:
    """A compiled feature-map linear attention (targets: cpu, triton, reference)."""

    def __init__(self, spec: LinearAttentionSpec, target: str = "auto") -> None:
        if target not in TARGETS:
            raise SpecError(f"unknown target {target!r}; choose one of {list(TARGETS)}")
        self.spec = spec
        self.target = target
        result = run_pipeline(linear_to_ir(spec), parse_pipeline("canonicalize"))
        self.graph, self.records = result.graph, result.records
        self.plan = lower_linear(self.graph)  # what the targets build from
        self._triton: Any = None
        self._cpu: Any = None

    @property
    def ir(self) -> str:
        """Textual IR after the pass pipeline (one ``attn.linear`` op)."""
        return self.records[-1].ir

    def __repr__(self) -> str:
        return f"LinearKernel(@{self.spec.name}, target={self.target!r})"

    def triton_kernel(self) -> Any:
        if self._triton is None:
            from attncc.codegen.triton_linear import LinearTritonKernel

            self._triton = LinearTritonKernel(self.plan)
        return self._triton

    def cpu_kernel(self) -> Any:
        """The compiled C++ linear-attention kernels (built on first use, cached on disk)."""
        if self._cpu is None:
            from attncc.codegen.cpu_linear import LinearCpuKernel

            self._cpu = LinearCpuKernel(self.plan)
        return self._cpu

    @property
    def source(self) -> str:
        if self.target == "triton":
            return str(self.triton_kernel().source)
        if self.target in ("cpu", "auto"):
            return str(self.cpu_kernel().source)
        return f"# dense reference: phi(x) = {self.plan.phi}\n"

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        check_qkv(self.spec, q, k, v)  # type: ignore[arg-type]
        if q.shape[2] != k.shape[2]:
            raise SpecError(f"linear attention needs equal q and kv lengths, got {q.shape[2]} and {k.shape[2]}")
        use_triton = self.target == "triton" or (self.target == "auto" and q.device.type == "cuda")
        if use_triton:
            from attncc.codegen.triton_linear import LinearAttention

            reason = fallback.reason("triton", q, {})
            if reason is None:
                return LinearAttention.apply(q, k, v, self.triton_kernel())  # type: ignore[no-any-return]
            log.info("linear attention: running the reference for this call: %s", reason)
        elif self.target in ("cpu", "auto"):
            reason = fallback.reason("cpu", q, {})
            if reason is None:
                from attncc.codegen.cpu_linear import LinearCpuAttention

                return LinearCpuAttention.apply(q, k, v, self.cpu_kernel())  # type: ignore[no-any-return]
            if self.target == "cpu":
                log.info("linear attention: running the reference for this call: %s", reason)
        return reference.linear(self.plan, q, k, v)
