"""The ``torch.compile(model, backend="attncc")`` backend and its per-site reports.

    model = torch.compile(model, backend="attncc", options={"target": "auto", "backend": "inductor"})
    model(x)
    ac.dynamo.reports()   # [{"site", "status": "lifted" | "fallback", "mask", "reason", ...}, ...]

:mod:`attncc.frontends.fx` turns each attention site (an SDPA call, or a matmul of a last-dim softmax
of ``q @ k^T`` with v) into decomposed IR, one op per step the model wrote; the ``fuse`` pass decides
whether that chain is one attention and :func:`attncc.lower.spec_of` reads its spec; the site then
becomes a call of the ``attncc::attention`` custom op (so Inductor or eager still runs the rest of the
graph). A site that is not lifted keeps its original op and the reason (the front end's or the fuse
pass's) is logged and reported; every softmax of a product of two activations gets a report.
Options: ``target`` (auto | cpu | triton | reference), ``backend`` (inductor | eager, for the rest of
the graph), ``dump_dir`` (FX graph before and after).
"""

from __future__ import annotations

import itertools
import logging
import operator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

import attncc as ac
from attncc.errors import AttnccError, SpecError, UnsupportedError
from attncc.frontends import fx as fx_frontend
from attncc.ir import exprs as X
from attncc.ir.ops import FusedOp
from attncc.lower import spec_of
from attncc.passes import fuse
from attncc.passes.base import parse_pipeline, run_pipeline
from attncc.rope import NAMES as ROPE_NAMES

log = logging.getLogger("attncc.dynamo")

_SITES: dict[int, tuple[Any, list[str], list[float]]] = {}  # kernel, runtime tensors' names, traced scalar values
_REPORTS: list[dict[str, Any]] = []
_IDS = itertools.count()
_NEW_KERNEL: dict[str, bool] = {}  # per site name: did the last lift generate a new kernel?
_COMPILES: dict[str, int] = {}  # per site name: how many graphs (re)compiled it
_GRAD_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="attncc-grad")
SDPA = {torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention}


def reports() -> list[dict[str, Any]]:
    """One dict per attention site seen: site, status, mask, reason (and details when lifted)."""
    return list(_REPORTS)


def clear_reports() -> None:
    _REPORTS.clear()
    _COMPILES.clear()


@torch.library.custom_op("attncc::attention", mutates_args=())
def _attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, site: int, tensors: list[torch.Tensor]
) -> torch.Tensor:
    kern, names, traced = _SITES[site]
    _check_traced(site, tensors[len(names) :], traced)
    return kern(q, k, v, **dict(zip(names, tensors[: len(names)], strict=True)))  # type: ignore[no-any-return]


def _check_traced(site: int, given: list[torch.Tensor], traced: list[float]) -> None:
    """The graph's 0-d tensors that the site's kernel was compiled with the traced values of (a scale): the same."""
    for t, want in zip(given, traced, strict=True):
        if float(t) != want:
            raise SpecError(
                f"attncc site {site}: its scale was traced as {want} and compiled into the kernel, but this call "
                f"passes {float(t)}; a model whose scale changes between calls must be compiled with dynamic=False "
                "(the scale is then a constant and a new value recompiles)"
            )


@_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, site: int, tensors: list[torch.Tensor]) -> torch.Tensor:
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    q, k, v, site, tensors = inputs
    ctx.save_for_backward(q, k, v, *tensors)
    ctx.site = site
    named = len(_SITES[site][1])  # (the traced scalars after them get no gradient)
    ctx.learnable = [i < named and t.requires_grad and t.is_floating_point() for i, t in enumerate(tensors)]


def _backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
    """Grads of q, k, v and of the float tensors that require them (e.g. a learned bias read by the
    lifted mask), from the ``attncc::attention_backward`` op, so that AOTAutograd traces the backward
    as one opaque call (with fake tensors) instead of tracing into the kernel."""
    q, k, v, *tensors = ctx.saved_tensors
    dq, dk, dv, *dt = torch.ops.attncc.attention_backward(grad, q, k, v, ctx.site, tensors, ctx.learnable)
    it = iter(dt)
    return dq, dk, dv, None, [next(it) if learn else None for learn in ctx.learnable]


@torch.library.custom_op("attncc::attention_backward", mutates_args=())
def _attention_backward(
    grad: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    site: int,
    tensors: list[torch.Tensor],
    learnable: list[bool],
) -> list[torch.Tensor]:
    """[dq, dk, dv, grads of the learnable tensors]: the site's kernel recomputed under autograd.

    The dispatcher runs custom-op bodies with autograd switched off for the calling thread, so the
    recompute runs in a worker thread of its own, where the kernel's own backward (cpu, triton or
    reference) is recorded as usual."""
    kern, names, _ = _SITES[site]
    tensors, learnable = tensors[: len(names)], learnable[: len(names)]  # (traced scalars: checked by the forward)

    def recompute() -> list[torch.Tensor]:
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            extra = [t.detach().requires_grad_() if on else t for t, on in zip(tensors, learnable, strict=True)]
            out = kern(*leaves, **dict(zip(names, extra, strict=True)))
            wanted = leaves + [t for t, on in zip(extra, learnable, strict=True) if on]
            grads = torch.autograd.grad(out, wanted, grad, allow_unused=True)
        # contiguous, as the fake below promises (Inductor checks the strides)
        return [w.new_zeros(w.shape) if g is None else g.contiguous() for g, w in zip(grads, wanted, strict=True)]

    return _GRAD_POOL.submit(recompute).result()


@_attention_backward.register_fake
def _(
    grad: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    site: int,
    tensors: list[torch.Tensor],
    learnable: list[bool],
) -> list[torch.Tensor]:
    wanted = [q, k, v] + [t for t, learn in zip(tensors, learnable, strict=True) if learn]
    return [w.new_empty(w.shape) for w in wanted]


_attention.register_autograd(_backward, setup_context=_setup)


def _no_second_order(ctx: Any, *grads: Any) -> tuple[Any, ...]:
    raise UnsupportedError(
        "second-order gradients (create_graph=True) through a site lifted by torch.compile(backend='attncc') "
        "are not supported (Inductor's AOTAutograd refuses double backward too); run that model uncompiled, "
        "or call an attncc kernel directly: kern(q, k, v) is differentiable twice"
    )


_attention_backward.register_autograd(_no_second_order)


def _lift(site: fx_frontend.Site, target: str) -> dict[str, Any]:
    """Fuse the site's decomposed IR, compile what the ``fuse`` pass recognized, and swap the site's
    FX node for a call of that kernel; raises UnsupportedError with the pass's reason when it does not fuse."""
    fused = run_pipeline(site.graph, parse_pipeline("canonicalize,fuse")).graph
    if not any(isinstance(op, FusedOp) for op in fused.ops):
        why = fuse.why_not(fused) or "no attn.fused op"
        raise UnsupportedError(f"the fuse pass did not make the chain one attention: {why}")
    spec = spec_of(fused, site.graph.name)
    node = site.node
    _NEW_KERNEL[node.name] = not ac.api.is_cached(spec, target)
    kern = ac.compile(spec, target=target)
    _replace(node, site.inputs["q"], kern, [site.inputs["k"], site.inputs["v"]], site.inputs, site.checks)
    q_len, kv_len = fx_frontend.shape_of(site.inputs["q"])[2], fx_frontend.shape_of(site.inputs["k"])[2]
    return {**_info(kern, X.expr_str(kern.spec.mask), q_len, kv_len), "note": site.note}


_IN_PLACE = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
             operator.ipow, operator.iand, operator.ior, operator.ixor, operator.setitem}  # fmt: skip


def mutates(node: fx.Node) -> bool:
    """``node`` writes into one of its inputs: ``cache.index_copy_(...)``, ``x[i] = y``, ``x *= c``,
    an op overload with a mutable schema. FX counts ``call_method`` nodes as pure, so dead-code
    elimination would drop a static KV cache's update (whose result nobody reads)."""
    target = node.target
    if node.op == "call_method":
        return isinstance(target, str) and target.endswith("_") and not target.endswith("__")
    if node.op != "call_function":
        return False
    if target in _IN_PLACE:
        return True
    schema = getattr(target, "_schema", None)
    if schema is not None and schema.is_mutable:
        return True
    name = getattr(target, "__name__", "")
    return name.endswith("_") and not name.endswith("__")


def _kept(node: fx.Node) -> bool:
    """What dead-code elimination after lifting must keep: side effects FX knows, and writes it does not."""
    return node.is_impure() or mutates(node)


def _replace(
    node: fx.Node, q: Any, kern: Any, kv: list[fx.Node], by_name: dict[str, fx.Node],
    checks: list[tuple[fx.Node, float]] | None = None,
) -> None:  # fmt: skip
    """Swap the site for an attncc::attention call reading q, k, v, the named tensors and the 0-d tensors whose traced
    values the kernel was compiled with (``checks``: each call compares them)."""
    k0, v0 = kv
    site = next(_IDS)
    names = [t.name for t in kern.spec.runtime_tensors()] + (list(ROPE_NAMES) if kern.spec.rope else [])
    checks = checks or []
    _SITES[site] = (kern, names, [value for _, value in checks])
    with node.graph.inserting_before(node):
        tensors = [by_name[n] for n in names] + [t for t, _ in checks]
        new = node.graph.call_function(torch.ops.attncc.attention.default, (q, k0, v0, site, tensors))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    node.graph.erase_node(node)


def _info(kern: Any, mask: str, q_len: int, kv_len: int) -> dict[str, Any]:
    """Report details; ``computed_tiles`` is the fraction of tiles the kernel computes at the traced
    lengths (None when the map needs runtime tensors or the lengths are symbolic)."""
    op = kern.graph.ops[-2]
    computed = None
    if q_len > 0 and kv_len > 0 and not kern.spec.runtime_tensors():
        computed = round(kern.block_map(q_len, kv_len).computed_fraction, 4)
    return {
        "mask": mask,
        "form": getattr(op, "form", ""),
        "layout": getattr(op, "layout", ""),
        "computed_tiles": computed,
        "num_heads": kern.spec.num_heads,
        "num_kv_heads": kern.spec.num_kv_heads,
        "head_dim": kern.spec.head_dim,
        "value_dim": kern.spec.value_dim,
        "score_mod": X.expr_str(kern.spec.score_mod),
        "scale": kern.spec.scale,
        "lengths": (q_len, kv_len),
        "rope": kern.spec.rope,
        "target": kern.target,
        "kernel": repr(kern),
    }


class Explanation:
    """What :func:`explain` found: ``reports`` (one dict per site, as :func:`reports`) and, as its
    ``str``, a table a person reads: per site (its FX node) lifted or not and why, the recovered spec,
    the fraction of tiles the kernel computes ("per call" when runtime tensors decide) and the target."""

    def __init__(self, reports: list[dict[str, Any]]) -> None:
        self.reports = reports

    def __repr__(self) -> str:
        return str(self)

    def __str__(self) -> str:
        lifted = sum(r["status"] == "lifted" for r in self.reports)
        left = len(self.reports) - lifted
        lines = [f"{len(self.reports)} attention sites, {lifted} lifted, {left} left as they were"]
        header = ("site", "status", "heads q/kv x d", "lengths", "mask", "score mod", "tiles", "target")
        rows = []
        for r in self.reports:
            if r["status"] != "lifted":
                rows.append((r["site"].split(":")[-1], "fallback", "-", "-", "-", "-", "-", "-"))
                continue
            dims = f"{r['head_dim']}" + (f"/{r['value_dim']}" if r["value_dim"] != r["head_dim"] else "")
            heads = f"{r['num_heads']}/{r['num_kv_heads']} x {dims}" + (" +rope" if r["rope"] else "")
            lengths = " x ".join("dyn" if n < 0 else str(n) for n in r["lengths"])
            tiles = "per call" if r["computed_tiles"] is None else f"{100 * r['computed_tiles']:.1f}%"
            rows.append(
                (r["site"].split(":")[-1], "lifted", heads, lengths, r["mask"], r["score_mod"], tiles, r["target"])
            )
        widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]
        for row in (header, *rows):
            lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        for r in self.reports:
            if r["status"] != "lifted" or r.get("note"):
                lines.append(f"{r['site'].split(':')[-1]}: {r['reason'] or r['note']}")
        return "\n".join(lines)


def explain(model: Any, *args: Any, target: str = "auto", **kwargs: Any) -> Explanation:
    """Compile ``model`` with this backend, run it once on ``args`` / ``kwargs`` (without gradients) and
    say what became of every attention site.

    >>> import torch, attncc as ac
    >>> class Attn(torch.nn.Module):
    ...     def forward(self, q, k, v):
    ...         return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    >>> q = torch.randn(1, 2, 512, 16)
    >>> print(ac.dynamo.explain(Attn(), q, q, q, target="reference"))  # doctest: +NORMALIZE_WHITESPACE
    1 attention sites, 1 lifted, 0 left as they were
    site                          status  heads q/kv x d  lengths    mask     score mod  tiles  target
    scaled_dot_product_attention  lifted  2/2 x 16        512 x 512  kv <= q  score      56.2%  reference
    >>> torch._dynamo.reset()  # drop the compiled frame while its globals still exist
    """
    start = len(_REPORTS)
    compiled = torch.compile(model, backend="attncc", options={"backend": "eager", "target": target})
    with torch.no_grad():
        compiled(*args, **kwargs)
    return Explanation(_REPORTS[start:])


def _silent_sites(gm: fx.GraphModule, reported: set[str]) -> list[dict[str, Any]]:
    """A fallback report for every softmax still in the graph that reads a product of two
    activations: an attention site attncc saw but did not lift (never silent)."""
    out = []
    for node in gm.graph.nodes:
        if node.name in reported or not fx_frontend.is_softmax(node, last_dim=False):
            continue
        try:
            found = fx_frontend.score_chain(node)
        except UnsupportedError as exc:
            found, why = None, str(exc)
            reason = f"softmax {node.name} reads a product of two activations but the chain was not lifted: {why}"
        else:
            if found is None:
                continue
            mm, between = found
            after = [getattr(u.target, "__name__", str(u.target)) for u in node.users]
            path = " -> ".join(n.name for n in between) or "(nothing)"
            reason = (
                f"softmax {node.name} reads the product {mm.name} of two activations but the chain was not lifted: "
                f"{mm.name} -> {path} -> softmax -> {', '.join(after) or '(unused)'}; attncc lifts a last-dim "
                "softmax of q @ k^T (through elementwise steps on the scores) multiplied by v"
            )
            if len(fx_frontend.shape_of(mm)) == 3:
                reason += (
                    f"; here the scores are a 3-d [batch*heads, Sq, Skv] {getattr(mm.target, '__name__', mm.target)} "
                    "and attncc lifts 4-d [batch, heads, S, D] attention: use the model's "
                    "attn_implementation='sdpa' where it has one"
                )
        out.append(
            {"site": f"{gm.__class__.__name__}:{node.name}", "status": "fallback", "mask": None, "reason": reason}
        )
        log.warning("attncc: %s kept as is: %s", out[-1]["site"], reason)
    return out


def lift_graph(gm: fx.GraphModule, target: str = "auto") -> list[dict[str, Any]]:
    """Rewrite every liftable attention site of ``gm`` in place; return one report per site."""
    out = []
    reported: set[str] = set()  # softmax nodes of the decomposed sites seen (lifted or not)
    for node in list(gm.graph.nodes):
        if node.op != "call_function" and node.op != "call_method":
            continue
        is_sdpa = node.target in SDPA
        soft = None if is_sdpa else fx_frontend.softmax_of(node)
        if not is_sdpa and soft is None:
            continue
        name = node.name if soft is None else soft.name  # a decomposed site is named by its softmax
        site = f"{gm.__class__.__name__}:{name}"
        try:
            found = fx_frontend.sdpa_site(node) if is_sdpa else fx_frontend.decomposed_site(node)
            info = None if found is None else _lift(found, target)
        except (AttnccError, UnsupportedError, TypeError, ValueError, KeyError) as exc:
            why = str(exc) if soft is None else f"softmax {soft.name} @ v ({node.name}) not lifted: {exc}"
            report: dict[str, Any] = {"site": site, "status": "fallback", "mask": None, "reason": why}
            if soft is not None:
                reported.add(soft.name)
            log.warning("attncc: %s kept as is: %s", site, why)
        else:
            if info is None:
                continue
            if soft is not None:
                reported.add(soft.name)
            _COMPILES[name] = _COMPILES.get(name, 0) + 1
            report = {
                "site": site,
                "status": "lifted",
                "reason": "",
                "compiles": _COMPILES[name],
                "new_kernel": _NEW_KERNEL.get(name, True),
                **info,
            }
            log.info("attncc: %s lifted: mask %s", site, info["mask"])
        out.append(report)
    gm.graph.eliminate_dead_code(is_impure_node=_kept)
    out += _silent_sites(gm, reported)
    gm.recompile()
    return out


def backend(gm: fx.GraphModule, example_inputs: list[Any], **kwargs: Any) -> Any:
    """The torch.compile backend registered as "attncc" (see the module docstring)."""
    options = dict(kwargs.get("options") or {})
    unknown = set(options) - {"target", "backend", "dump_dir"}
    if unknown:
        raise SpecError(f"unknown attncc backend options {sorted(unknown)}; known: target, backend, dump_dir")
    dump = Path(options["dump_dir"]) if options.get("dump_dir") else None
    if dump:
        dump.mkdir(parents=True, exist_ok=True)
        (dump / f"fx_before_{len(_REPORTS)}.txt").write_text(gm.print_readable(print_output=False))
    found = lift_graph(gm, options.get("target", "auto"))
    _REPORTS.extend(found)
    if dump:
        (dump / f"fx_after_{len(_REPORTS)}.txt").write_text(gm.print_readable(print_output=False))
    rest = options.get("backend", "inductor")
    if rest == "eager":
        return gm.forward
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)
