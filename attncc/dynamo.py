"""The ``torch.compile(model, backend="attncc")`` backend and its per-site reports.

    model = torch.compile(model, backend="attncc", options={"target": "auto", "backend": "inductor"})
    model(x)
    ac.dynamo.reports()   # [{"site", "status": "lifted" | "fallback", "mask", "reason", ...}, ...]

Each attention site found by :mod:`attncc.frontends.fx` becomes a call of the ``attncc::attention``
custom op (so Inductor or eager still runs the rest of the graph); unliftable sites keep their
original op and the reason is logged and reported. Options: ``target`` (auto | cpu | triton |
reference), ``backend`` (inductor | eager, for the rest of the graph), ``dump_dir`` (FX graph
before and after).
"""

from __future__ import annotations

import itertools
import logging
import operator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import sympy
import torch
import torch.fx as fx

import attncc as ac
from attncc.dsl import Expr, Meta
from attncc.errors import AttnccError, SpecError, UnsupportedError
from attncc.frontends.fx import example_value, lift_mask, shape_of
from attncc.ir import exprs as X
from attncc.passes.normalize import boolean
from attncc.rope import NAMES as ROPE_NAMES

log = logging.getLogger("attncc.dynamo")

_SITES: dict[int, tuple[Any, list[str]]] = {}
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
    kern, names = _SITES[site]
    return kern(q, k, v, **dict(zip(names, tensors, strict=True)))  # type: ignore[no-any-return]


@_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, site: int, tensors: list[torch.Tensor]) -> torch.Tensor:
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    q, k, v, site, tensors = inputs
    ctx.save_for_backward(q, k, v, *tensors)
    ctx.site = site
    ctx.learnable = [t.requires_grad and t.is_floating_point() for t in tensors]


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
    kern, names = _SITES[site]

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


def _kv_source(node: Any) -> tuple[Any, int]:
    """(node, repeat factor): see through HF's repeat_kv (expand + reshape) and repeat_interleave."""
    if not isinstance(node, fx.Node):
        return node, 1
    name = getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method" and name == "reshape":
        inner = node.args[0]
        if isinstance(inner, fx.Node) and inner.op == "call_method" and inner.target == "expand":
            src = inner.args[0]
            if isinstance(src, fx.Node) and src.target is operator.getitem:
                base, index = src.args
                if isinstance(index, tuple) and len(index) == 5 and index[2] is None:
                    rep = shape_of(inner)[2]
                    return base, rep
    if node.target in (torch.repeat_interleave,) or (node.op == "call_method" and name == "repeat_interleave"):
        reps, dim = node.args[1], node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else None)
        if isinstance(reps, int) and dim == 1:
            return node.args[0], reps
    return node, 1


def _called(node: Any, *targets: Any) -> bool:
    """``node`` calls one of ``targets`` (functions, or method names as strings)."""
    if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method"):
        return False
    return any(node.target is t or node.target == t for t in targets)


def _without_empty_cache(node: Any) -> Any:
    """See through ``torch.cat([empty, x], dim=-2)``: a KV cache's first step (Hugging Face's
    DynamicCache concatenates the new keys to an empty tensor)."""
    if not _called(node, torch.cat) or node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0) not in (-2, 2):
        return node
    parts = list(node.args[0])
    live = [p for p in parts if not (isinstance(p, fx.Node) and shape_of(p) == (0,))]
    return live[0] if len(live) == 1 else node


def _rope_of(node: Any) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """(x, cos, sin) when ``node`` is ``x * cos + rotate_half(x) * sin`` (rotate-half convention,
    ``rotate_half(x) = cat((-x[..., D/2:], x[..., :D/2]), -1)``), else None."""
    if not _called(node, operator.add, torch.add) or len(node.args) != 2:
        return None
    for a, b in (node.args, node.args[::-1]):
        if not (_called(a, operator.mul, torch.mul) and _called(b, operator.mul, torch.mul)):
            continue
        for x, cos in (a.args, a.args[::-1]):
            for rot, sin in (b.args, b.args[::-1]):
                if _is_rotate_half(rot, x) and _rope_table(cos, x) and _rope_table(sin, x):
                    return x, cos, sin
    return None


def _is_rotate_half(rot: Any, x: Any) -> bool:
    if not (_called(rot, torch.cat) and isinstance(x, fx.Node)):
        return False
    dim = rot.kwargs.get("dim", rot.args[1] if len(rot.args) > 1 else 0)
    parts = rot.args[0]
    if dim not in (-1, 3) or len(parts) != 2 or not _called(parts[0], operator.neg, torch.neg):
        return False
    shape = shape_of(x)
    if len(shape) != 4 or shape[-1] < 2 or shape[-1] % 2:
        return False
    half = shape[-1] // 2
    return _is_slice(parts[0].args[0], x, half, None) and _is_slice(parts[1], x, None, half)


def _is_slice(node: Any, x: fx.Node, start: int | None, stop: int | None) -> bool:
    """``node`` is ``x[..., start:stop]``."""
    if not (_called(node, operator.getitem) and node.args[0] is x):
        return False
    index = node.args[1]
    if not (isinstance(index, tuple) and len(index) == 2 and index[0] is Ellipsis and isinstance(index[1], slice)):
        return False
    sl = index[1]
    return (sl.start in (start, 0 if start is None else start)) and sl.stop == stop and sl.step in (None, 1)


def _rope_table(node: Any, x: fx.Node) -> bool:
    """A cos/sin table that broadcasts over heads: [S, D] or [B|1, 1, S, D], float, no gradient."""
    value = example_value(node)
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.requires_grad:
        return False
    shape, xs = shape_of(node), shape_of(x)
    return (len(shape) == 2 and shape == xs[2:]) or (
        len(shape) == 4 and shape[0] in (1, xs[0]) and shape[1] == 1 and shape[2:] == xs[2:]
    )


def _fused_rope(q: Any, k: Any) -> tuple[fx.Node, fx.Node, list[fx.Node]] | None:
    """(q source, k source, [cos, sin]) when q and k are rotated by the same RoPE tables right
    before attention; the kernel then applies the rotation itself."""
    rq, rk = _rope_of(q), _rope_of(_without_empty_cache(k))
    if rq is None or rk is None:
        if rq is not None or rk is not None:
            log.info("attncc: RoPE found on %s only; left to the graph", "q" if rq else "k")
        return None
    if rq[1:] != rk[1:] or shape_of(rq[0])[2] != shape_of(rk[0])[2]:
        log.info("attncc: q and k are rotated with different tables or lengths; RoPE left to the graph")
        return None
    return rq[0], rk[0], [rq[1], rq[2]]


def _args(node: fx.Node) -> dict[str, Any]:
    names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale"]
    out = dict(zip(names, node.args, strict=False))
    out.update(node.kwargs)
    return out


def _build(
    node: fx.Node, q: Any, k: Any, v: Any, mask_node: Any, is_causal: bool, scale: Any, target: str
) -> tuple[Any, Any, list[Any], dict[str, fx.Node], str]:
    """The site's kernel, the q it reads, [k, v], its tensors by call name, and the mask text."""
    qs, ks, vs = shape_of(q), shape_of(k), shape_of(v)
    if len(qs) != 4 or len(ks) != 4 or len(vs) != 4:
        raise UnsupportedError(f"q/k/v are not 4-d ({qs}, {ks}, {vs})")
    if vs[-1] != qs[-1]:
        raise UnsupportedError(f"value head_dim {vs[-1]} differs from query head_dim {qs[-1]}")
    k0, rk = _kv_source(k)
    v0, rv = _kv_source(v)
    if rk != rv:
        k0, v0 = k, v
    rope = _fused_rope(q, k0)
    if rope is not None:
        q, k0, tables = rope
    kv_heads = shape_of(k0)[1]
    if qs[1] % kv_heads:
        raise UnsupportedError(f"{qs[1]} query heads do not divide into {kv_heads} kv heads")
    lifted = lift_mask(node.graph, mask_node, (qs[0], qs[1], qs[2], ks[2]))
    mask = boolean(sympy.And(lifted.mask, sympy.Le(X.kv, X.q)) if is_causal else lifted.mask)
    dtypes = tuple((n, _kind(t)) for n, t in lifted.tensors.items())
    mask_expr = Expr(mask, Meta(dtypes=dtypes))
    mod = None if lifted.bias is None else Expr(X.score + lifted.bias, Meta(dtypes=dtypes))
    spec = ac.AttentionSpec(
        name=f"site_{node.name}",
        num_heads=qs[1],
        num_kv_heads=kv_heads,
        head_dim=qs[-1],
        mask=None if mask is sympy.true else mask_expr,
        score_mod=mod,
        scale=None if scale is None else float(scale),
        rope=rope is not None,
    )
    _NEW_KERNEL[node.name] = not ac.api.is_cached(spec, target)
    kern = ac.compile(spec, target=target)
    named = {f"t_{n.name}": n for n in lifted.tensors.values()}
    if rope is not None:
        named.update(zip(ROPE_NAMES, tables, strict=True))
    return kern, q, [k0, v0], named, X.expr_str(mask)


def _kind(node: fx.Node) -> str:
    dtype = getattr(example_value(node), "dtype", None)
    return "bool" if dtype is torch.bool else ("float" if dtype is not None and dtype.is_floating_point else "int")


def _replace(node: fx.Node, q: Any, kern: Any, kv: list[fx.Node], by_name: dict[str, fx.Node]) -> None:
    """Swap the site for an attncc::attention call reading q, k, v and the named tensors."""
    k0, v0 = kv
    site = next(_IDS)
    names = [t.name for t in kern.spec.runtime_tensors()] + (list(ROPE_NAMES) if kern.spec.rope else [])
    _SITES[site] = (kern, names)
    with node.graph.inserting_before(node):
        new = node.graph.call_function(
            torch.ops.attncc.attention.default, (q, k0, v0, site, [by_name[n] for n in names])
        )
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    node.graph.erase_node(node)


def _sdpa_site(node: fx.Node, target: str) -> dict[str, Any]:
    a = _args(node)
    if float(a.get("dropout_p", 0.0) or 0.0) != 0.0:
        raise UnsupportedError(f"dropout_p={a['dropout_p']} (attncc computes attention without dropout)")
    kern, q, kv, named, mask = _build(
        node,
        a["query"],
        a["key"],
        a["value"],
        a.get("attn_mask"),
        bool(a.get("is_causal", False)),
        a.get("scale"),
        target,
    )
    _replace(node, q, kern, kv, named)
    return _info(kern, mask, shape_of(a["query"])[2], shape_of(a["key"])[2])


def _softmax_site(node: fx.Node, target: str) -> dict[str, Any] | None:
    """matmul(softmax(mask(scale(q @ k^T))), v) -> one attncc op; None when the chain does not match."""
    soft = node.args[0]
    if not (isinstance(soft, fx.Node) and _is_softmax(soft)):
        return None
    scores, mask_node, keep_where_false, scale = soft.args[0], None, False, 1.0
    if isinstance(scores, fx.Node) and (scores.target == "masked_fill" or scores.target is torch.masked_fill):
        fill = scores.args[2]
        if not (isinstance(fill, float) and fill <= -1e30):
            raise UnsupportedError(f"masked_fill with {fill} (only -inf masking is lifted)")
        scores, mask_node, keep_where_false = scores.args[0], scores.args[1], True
    elif isinstance(scores, fx.Node) and scores.target in (operator.add, torch.add):
        scores, mask_node = scores.args[0], scores.args[1]
    if (
        isinstance(scores, fx.Node)
        and scores.target in (operator.truediv, torch.div)
        and isinstance(scores.args[1], float | int)
    ):
        scale, scores = 1.0 / float(scores.args[1]), scores.args[0]
    elif (
        isinstance(scores, fx.Node)
        and scores.target in (operator.mul, torch.mul)
        and isinstance(scores.args[1], float | int)
    ):
        scale, scores = float(scores.args[1]), scores.args[0]
    if not (isinstance(scores, fx.Node) and scores.target in (torch.matmul, operator.matmul)):
        return None
    q, kt = scores.args
    if not (isinstance(kt, fx.Node) and (kt.target == "transpose" or kt.target is torch.transpose)):
        return None
    if sorted(int(d) % 4 for d in kt.args[1:3]) != [2, 3]:
        return None
    k, v = kt.args[0], node.args[1]
    keep_node = mask_node
    if keep_where_false and mask_node is not None:
        with node.graph.inserting_before(node):
            keep_node = node.graph.call_function(torch.logical_not, (mask_node,))
        keep_node.meta = dict(mask_node.meta)
    kern, q_in, kv, named, mask = _build(node, q, k, v, keep_node, False, scale, target)
    _replace(node, q_in, kern, kv, named)
    return _info(kern, mask, shape_of(q)[2], shape_of(k)[2])


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
        "rope": kern.spec.rope,
        "kernel": repr(kern),
    }


def _is_softmax(node: fx.Node) -> bool:
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    return _is_any_softmax(node) and dim in (-1, 3)


def _is_any_softmax(node: Any) -> bool:
    return isinstance(node, fx.Node) and (
        node.target in (torch.softmax, torch.nn.functional.softmax, torch.Tensor.softmax) or node.target == "softmax"
    )


_MATMULS = (torch.matmul, operator.matmul, torch.bmm, torch.einsum, "matmul", "bmm")
_LOOKBACK = 12  # nodes walked from a softmax back to the score matmul


def _score_matmul(soft: fx.Node) -> tuple[fx.Node, list[str]] | None:
    """(matmul of two activations feeding ``soft``, the ops between them), walking back through
    elementwise steps; None when the softmax does not read such a product (it is not attention)."""
    path: list[str] = []
    node: Any = soft.args[0] if soft.args else None
    for _ in range(_LOOKBACK):
        if not isinstance(node, fx.Node) or node.op in ("placeholder", "get_attr"):
            return None
        if node.target in _MATMULS:
            operands = [a for a in node.args if isinstance(a, fx.Node)]
            activations = [
                a for a in operands if a.op != "get_attr" and not isinstance(example_value(a), torch.nn.Parameter)
            ]
            return (node, path[::-1]) if len(activations) >= 2 else None
        path.append(getattr(node.target, "__name__", str(node.target)))
        node = next((a for a in node.args if isinstance(a, fx.Node)), None)
    return None


def _silent_sites(gm: fx.GraphModule) -> list[dict[str, Any]]:
    """A fallback report for every softmax still in the graph that reads a product of two
    activations: an attention site attncc saw but did not lift (never silent)."""
    out = []
    for node in gm.graph.nodes:
        if not _is_any_softmax(node) or (found := _score_matmul(node)) is None:
            continue
        mm, between = found
        after = [getattr(u.target, "__name__", str(u.target)) for u in node.users]
        reason = (
            f"softmax {node.name} reads the product {mm.name} of two activations but the chain was not lifted: "
            f"{mm.name} -> {' -> '.join(between) or '(nothing)'} -> softmax -> {', '.join(after) or '(unused)'}; "
            "attncc lifts q @ k^T, an optional constant scale and one mask (add / masked_fill), softmax over the "
            "last dim, then @ v"
        )
        out.append(
            {"site": f"{gm.__class__.__name__}:{node.name}", "status": "fallback", "mask": None, "reason": reason}
        )
        log.warning("attncc: %s kept as is: %s", out[-1]["site"], reason)
    return out


def lift_graph(gm: fx.GraphModule, target: str = "auto") -> list[dict[str, Any]]:
    """Rewrite every liftable attention site of ``gm`` in place; return one report per site."""
    out = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" and node.op != "call_method":
            continue
        name = node.name
        is_sdpa = node.target in SDPA
        is_pv = node.target in (torch.matmul, operator.matmul) and isinstance(node.args[0], fx.Node)
        if not (is_sdpa or is_pv):
            continue
        site = f"{gm.__class__.__name__}:{node.name}"
        try:
            info = _sdpa_site(node, target) if is_sdpa else _softmax_site(node, target)
        except (AttnccError, UnsupportedError, TypeError, ValueError, KeyError) as exc:
            report: dict[str, Any] = {"site": site, "status": "fallback", "mask": None, "reason": str(exc)}
            log.warning("attncc: %s kept as is: %s", site, exc)
        else:
            if info is None:
                continue
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
    gm.graph.eliminate_dead_code()
    out += _silent_sites(gm)
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
