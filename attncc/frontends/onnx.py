"""ONNX front end: ``Attention`` operators (opsets 23-25) and decomposed attention subgraphs lifted to attncc specs
and run on attncc kernels; ``export`` writes a spec as ONNX.

    outs = ac.onnx.run(model, feeds)      # every graph output, in order; attention on attncc kernels
    ac.onnx.reports()                     # one dict per attention site run: node, status, spec or reason
    ac.onnx.sites(model)                  # the Attention nodes, from the graph alone
    ac.onnx.find_decomposed(model)        # the decomposed MatMul -> Softmax -> MatMul subgraphs
    ac.onnx.export(spec, path, q_len, kv_len)   # a spec as an ONNX model (see attncc.frontends.onnx_export)

Every other node runs in the ``onnx`` package's reference evaluator. An ``Attention`` node becomes one
``AttentionSpec`` from its attributes and the inputs it is given: ``is_causal`` (aligned as the specification
says: the query block's causal frontier sits ``past_key``'s length, or ``nonpad_kv_seqlen[b] - q_len``, keys in),
``scale``, ``softcap``, ``q_num_heads`` / ``kv_num_heads`` with 3-D inputs, GQA, boolean and additive
``attn_mask`` of any rank the specification allows (right-aligned broadcasting; a mask shorter than the keys is
padded with False / -inf, as the specification does), ``past_key`` / ``past_value`` with the ``present_*``
outputs, ``nonpad_kv_seqlen``, opset 25's ``left_window_size`` / ``right_window_size``. A boolean mask is a
runtime tensor of the kernel's mask (its block map is classified at call time); an additive mask is a runtime
tensor added to the score after the softcap, as in the specification. Query rows with no visible key return 0.

Decomposed attention (what torch.onnx's TorchScript exporter and hand-written models give: MatMul of q and k^T, a
scale (Div or Mul by a scalar), a mask (Add of a bias, or Where selecting -inf), Softmax over the last axis, an
optional NaN guard, MatMul with v) is found with networkx's subgraph matcher (:func:`find_decomposed`) and
replaced by one node computed on attncc; its mask is read at run time: a band (lo <= kv - q <= hi: causal of
either alignment, sliding windows) becomes the matching causal / window expression, so its block map is proven,
anything else a runtime mask or bias. Not yet: lifting the mask-building subgraph itself (Range, Less, Where ...)
to an expression, folding GQA expands back to kv heads.

Not lifted, with the reason logged and reported, the node then running in the reference evaluator: a requested
``qk_matmul_output`` (attncc never materializes the score matrix), ``softmax_precision`` wider than float32
(attncc's softmax is float32 for every input dtype), value heads of another size than query heads, query heads
that are not a multiple of the kv heads, input dtypes other than float32 and float16.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import networkx as nx
import numpy as np
import onnx
import torch
from networkx.algorithms import isomorphism
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun
from onnx.reference.ops.op_attention import Attention as _ReferenceAttention

import attncc as ac
from attncc.dsl import Expr
from attncc.errors import SpecError
from attncc.frontends.onnx_export import export as export
from attncc.ir import exprs as X

log = logging.getLogger("attncc.onnx")

_REPORTS: list[dict[str, Any]] = []
_KERNELS: dict[tuple[Any, ...], ac.Kernel] = {}
_FLOAT_PRECISIONS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


def reports() -> list[dict[str, Any]]:
    """One dict per ``Attention`` node run by :func:`run`: ``node``, ``status`` ("attncc" | "fallback"), and
    ``spec`` (the lifted spec's text) or ``reason``."""
    return list(_REPORTS)


def clear_reports() -> None:
    _REPORTS.clear()


@dataclass(frozen=True)
class Lifted:
    """An Attention node's call as attncc runs it: the spec, the runtime tensors, and the 4-D q, k, v."""

    spec: ac.AttentionSpec
    key: tuple[Any, ...]
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    tensors: dict[str, np.ndarray]


def _heads_first(x: np.ndarray, heads: int | None, what: str) -> np.ndarray:
    """[B, S, heads * D] -> [B, heads, S, D] (3-D inputs); 4-D inputs as they are."""
    if x.ndim == 4:
        return x
    if heads is None or heads <= 0 or x.shape[2] % heads:
        raise SpecError(f"3-D {what} of hidden size {x.shape[2]} needs a positive head count that divides it")
    return x.reshape(x.shape[0], x.shape[1], heads, x.shape[2] // heads).transpose(0, 2, 1, 3)


def _mask_index(mask: np.ndarray) -> tuple[Expr | int, ...]:
    """Index expressions into a mask broadcast to [B, H, Sq, Skv]: the symbol where the mask has the axis, 0
    where it broadcasts (size 1)."""
    syms: tuple[Expr, ...] = (ac.b, ac.h, ac.q, ac.kv)
    return tuple(sym if n > 1 else 0 for sym, n in zip(syms, mask.shape, strict=True))


def lift(
    Q: np.ndarray,
    K: np.ndarray,
    V: np.ndarray,
    attn_mask: np.ndarray | None = None,
    past_key: np.ndarray | None = None,
    past_value: np.ndarray | None = None,
    nonpad_kv_seqlen: np.ndarray | None = None,
    *,
    scale: float | None = None,
    is_causal: int = 0,
    q_num_heads: int | None = None,
    kv_num_heads: int | None = None,
    softmax_precision: int | None = None,
    softcap: float | None = None,
    qk_output_wanted: bool = False,
    left_window_size: int | None = None,
    right_window_size: int | None = None,
    bottom_right: bool = False,
) -> Lifted | str:
    """The attncc form of one ``Attention`` call (inputs and attributes as the operator has them), or the reason
    it is left to the reference evaluator. ``bottom_right``: without a cache, align the causal / window frontier
    at ``Skv - Sq`` (a recognized bottom-right causal mask of a decomposed graph) instead of 0.

    >>> import numpy as np
    >>> q = np.zeros((1, 4, 3, 8), np.float32); kv = np.zeros((1, 2, 3, 8), np.float32)
    >>> lifted = lift(q, kv, kv, is_causal=1, softcap=20.0)
    >>> lifted.spec.mask, lifted.spec.num_kv_heads, lifted.key[-1]
    (kv <= q, 2, 'offset=0')
    >>> lift(q, kv, kv, qk_output_wanted=True)
    'qk_matmul_output is requested: attncc never materializes the score matrix'
    """
    if qk_output_wanted:
        return "qk_matmul_output is requested: attncc never materializes the score matrix"
    if softmax_precision is not None and softmax_precision not in _FLOAT_PRECISIONS:
        name = onnx.TensorProto.DataType.Name(softmax_precision)
        return f"softmax_precision {name} is wider than attncc's float32 softmax"
    if Q.dtype not in (np.float32, np.float16):
        return f"input dtype {Q.dtype} (attncc lifts float32 and float16)"
    if not (Q.ndim == K.ndim == V.ndim and Q.ndim in (3, 4)):
        return f"Q, K, V of ranks {Q.ndim}, {K.ndim}, {V.ndim} (the operator takes all 3-D or all 4-D)"
    try:
        q = _heads_first(Q, q_num_heads, "Q")
        k = _heads_first(K, kv_num_heads, "K")
        v = _heads_first(V, kv_num_heads, "V")
    except SpecError as exc:
        return str(exc)
    B, H, Sq, D = q.shape
    Hkv = k.shape[1]
    if v.shape[3] != D or k.shape[3] != D:
        return f"head sizes q {D}, k {k.shape[3]}, v {v.shape[3]} differ (attncc kernels take one head size)"
    if H % Hkv or v.shape[1] != Hkv:
        return f"{H} query heads over {Hkv} key heads and {v.shape[1]} value heads (GQA needs a multiple)"
    if (past_key is None) != (past_value is None):
        return "past_key and past_value must come together"
    if past_key is not None and nonpad_kv_seqlen is not None:
        return "nonpad_kv_seqlen with past_key / past_value (the specification forbids the combination)"
    past = 0
    if past_key is not None and past_value is not None:
        past = past_key.shape[2]
        k = np.concatenate([past_key, k], axis=2)
        v = np.concatenate([past_value, v], axis=2)
    Skv = k.shape[2]

    parts: list[Expr] = []
    tensors: dict[str, np.ndarray] = {}
    key: list[Any] = [
        H,
        Hkv,
        D,
        None if scale is None else float(scale),
        float(softcap or 0),
        bool(is_causal),
        left_window_size,
        right_window_size,
    ]
    # the causal / window frontier: query row i stands ``offset`` keys in
    if nonpad_kv_seqlen is not None:
        offset: Expr | int = ac.tensor("nonpad_kv_seqlen", "int")[ac.b] - Expr(X.Sq)
        key.append("offset=nonpad")
    elif (past and past == Skv - Sq) or bottom_right:
        offset = Expr(X.Skv - X.Sq)  # one kernel for every decoding step
        key.append("offset=Skv-Sq")
    else:
        offset = past
        key.append(f"offset={past}")
    if is_causal:
        parts.append(ac.kv <= ac.q + offset)
    if left_window_size is not None and left_window_size >= 0:
        parts.append(ac.kv >= ac.q + offset - left_window_size)
    if right_window_size is not None and right_window_size >= 0:
        parts.append(ac.kv <= ac.q + offset + right_window_size)
    if nonpad_kv_seqlen is not None:
        tensors["nonpad_kv_seqlen"] = np.asarray(nonpad_kv_seqlen, np.int64).reshape(-1)
        parts.append(ac.kv < ac.tensor("nonpad_kv_seqlen", "int")[ac.b])
    score_mod: Expr | None = ac.softcap(float(softcap)) if softcap else None
    if attn_mask is not None:
        mask = np.asarray(attn_mask)
        boolean = mask.dtype == np.bool_
        if mask.shape[-1] < Skv:  # the specification pads a short mask: False / -inf
            pad = [(0, 0)] * (mask.ndim - 1) + [(0, Skv - mask.shape[-1])]
            mask = np.pad(mask, pad, constant_values=False if boolean else -np.inf)
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
        try:
            np.broadcast_shapes(mask.shape, (B, H, Sq, Skv))
        except ValueError:
            return f"attn_mask of shape {attn_mask.shape} does not broadcast to {(B, H, Sq, Skv)}"
        index = _mask_index(mask)
        key.append(("bool" if boolean else "float", tuple(isinstance(i, Expr) for i in index)))
        if boolean:
            tensors["attn_mask"] = mask.astype(np.int64)
            parts.append(ac.tensor("attn_mask", "int")[index] != 0)
        else:
            tensors["attn_bias"] = mask.astype(np.float32)
            bias = ac.tensor("attn_bias", "float")[index]
            score_mod = (score_mod if score_mod is not None else ac.score) + bias
    mask_expr: Expr | None = None
    for part in parts:
        mask_expr = part if mask_expr is None else mask_expr & part
    spec = ac.AttentionSpec(
        name="onnx_attention", num_heads=H, num_kv_heads=Hkv, head_dim=D, mask=mask_expr, score_mod=score_mod,
        scale=None if scale is None else float(scale),
    )  # fmt: skip
    return Lifted(spec, tuple(key), q, k, v, tensors)


def _kernel(lifted: Lifted) -> ac.Kernel:
    kern = _KERNELS.get(lifted.key)
    if kern is None:
        kern = _KERNELS[lifted.key] = ac.compile(lifted.spec, target="auto")
    return kern


def _present(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x)


class Attention(_ReferenceAttention):
    """The reference evaluator's ``Attention`` with its work done by attncc where the node lifts."""

    _validate_attention25 = False

    def _run(  # type: ignore[override]
        self,
        Q: np.ndarray,
        K: np.ndarray,
        V: np.ndarray,
        attn_mask: np.ndarray | None = None,
        past_key: np.ndarray | None = None,
        past_value: np.ndarray | None = None,
        nonpad_kv_seqlen: np.ndarray | None = None,
        scale: float | None = None,
        is_causal: int = 0,
        q_num_heads: int | None = None,
        kv_num_heads: int | None = None,
        softmax_precision: int | None = None,
        softcap: float | None = None,
        qk_matmul_output_mode: int | None = None,
        left_window_size: int | None = None,
        right_window_size: int | None = None,
    ) -> tuple[np.ndarray, ...]:
        node = self.onnx_node
        name = node.name or f"Attention({', '.join(node.input)})"
        inputs = (Q, K, V, attn_mask, past_key, past_value, nonpad_kv_seqlen)
        attrs: dict[str, Any] = {
            "scale": scale, "is_causal": is_causal, "q_num_heads": q_num_heads, "kv_num_heads": kv_num_heads,
            "softmax_precision": softmax_precision, "softcap": softcap, "left_window_size": left_window_size,
            "right_window_size": right_window_size,
        }  # fmt: skip
        lifted = lift(*inputs, **attrs, qk_output_wanted=len(node.output) > 3 and node.output[3] != "")
        if isinstance(lifted, str):
            log.info("onnx node %s runs in the reference evaluator: %s", name, lifted)
            _REPORTS.append({"node": name, "status": "fallback", "reason": lifted})
            return cast(
                tuple[np.ndarray, ...], super()._run(*inputs, **attrs, qk_matmul_output_mode=qk_matmul_output_mode)
            )
        kern = _kernel(lifted)
        q, k, v = (torch.from_numpy(np.ascontiguousarray(x)) for x in (lifted.q, lifted.k, lifted.v))
        runtime = {name_: torch.from_numpy(t) for name_, t in lifted.tensors.items()}
        with torch.no_grad():
            out = kern(q, k, v, **runtime).numpy().astype(Q.dtype)
        _REPORTS.append({"node": name, "status": "attncc", "spec": str(lifted.spec.mask), "target": kern.target})
        if Q.ndim == 3:
            out = out.transpose(0, 2, 1, 3).reshape(out.shape[0], out.shape[2], -1)
        zero = np.zeros((0,), Q.dtype)  # qk_matmul_output is never requested here (see lift)
        return out, _present(lifted.k), _present(lifted.v), zero


def run(model: onnx.ModelProto | str, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Run a whole ONNX model: each ``Attention`` node on an attncc kernel where it lifts (see :func:`lift`), each
    decomposed attention subgraph too (see :func:`rewrite_decomposed`), every other node, and any node that does
    not lift (reported with the reason), in the ``onnx`` reference evaluator. Returns every graph output, in the
    graph's order.

    >>> import numpy as np, onnx
    >>> from onnx import TensorProto, helper
    >>> node = helper.make_node("Attention", ["Q", "K", "V"], ["Y"], is_causal=1)
    >>> io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2, 4, 8]) for n in "QKVY"]
    >>> model = helper.make_model(helper.make_graph([node], "g", io[:3], io[3:]),
    ...                           opset_imports=[helper.make_opsetid("", 23)])
    >>> x = np.random.default_rng(0).standard_normal((1, 2, 4, 8)).astype(np.float32)
    >>> (y,) = run(model, {"Q": x, "K": x, "V": x})
    >>> y.shape, reports()[-1]["status"]
    ((1, 2, 4, 8), 'attncc')
    """
    proto = onnx.load(model) if isinstance(model, str) else model
    evaluator = ReferenceEvaluator(rewrite_decomposed(proto), new_ops=[Attention, DecomposedAttention])
    return list(evaluator.run(None, dict(feeds)))


def sites(model: onnx.ModelProto | str) -> list[dict[str, Any]]:
    """The ``Attention`` nodes of ``model`` with their attributes and declared input shapes (from shape
    inference), without running it: ``node``, ``index`` (in the graph's node list), ``opset``, ``attributes``,
    ``inputs`` (name -> shape or None), ``outputs``."""
    proto = onnx.load(model) if isinstance(model, str) else model
    try:
        proto = onnx.shape_inference.infer_shapes(proto)
    except onnx.shape_inference.InferenceError as exc:  # shapes are then reported as unknown
        log.info("onnx shape inference failed: %s", exc)
    shapes: dict[str, tuple[int | str, ...] | None] = {}
    for info in [*proto.graph.input, *proto.graph.value_info, *proto.graph.output]:
        dims = info.type.tensor_type.shape.dim
        shapes[info.name] = tuple(d.dim_value or d.dim_param or "?" for d in dims) if dims else None
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    found = []
    for i, node in enumerate(proto.graph.node):
        if node.op_type != "Attention" or node.domain not in ("", "ai.onnx"):
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        found.append(
            {
                "node": node.name or f"#{i}",
                "index": i,
                "opset": opset,
                "attributes": attrs,
                "inputs": {n: shapes.get(n) for n in node.input if n},
                "outputs": [n for n in node.output if n],
            }
        )
    return found


# ---- decomposed attention: MatMul(q, k^T) -> [scale] -> [mask] -> Softmax -> [NaN guard] -> MatMul(., v) ----
DOMAIN = "ai.attncc"


def _chain_patterns() -> list[tuple[str, nx.DiGraph]]:
    """The decomposed forms as small graphs of op types, optional steps expanded: a scale (Div or Mul by a scalar)
    and a mask (Add of a bias, or Where selecting -inf) in either order, and SDPA's NaN guard
    (Where(IsNaN(p), 0, p)) between the softmax and the values' MatMul. Roles are the pattern's node names."""
    found = []
    for scale in (None, "Div", "Mul"):
        for mask in (None, "Add", "Where"):
            orders = [("scale", "mask"), ("mask", "scale")] if scale and mask else [("scale", "mask")]
            for order in orders:
                for guard in (False, True):
                    kinds = {"scale": scale, "mask": mask}
                    roles = ["qk", *[r for r in order if kinds[r]], "softmax"]
                    g = nx.DiGraph()
                    g.add_node("qk", op="MatMul")
                    for role in roles[1:-1]:
                        g.add_node(role, op=kinds[role])
                    g.add_node("softmax", op="Softmax")
                    g.add_edges_from(itertools.pairwise(roles))
                    last = "softmax"
                    if guard:
                        g.add_node("isnan", op="IsNaN")
                        g.add_node("guard", op="Where")
                        g.add_edges_from([("softmax", "isnan"), ("isnan", "guard"), ("softmax", "guard")])
                        last = "guard"
                    g.add_node("pv", op="MatMul")
                    g.add_edge(last, "pv")
                    found.append(("-".join([*roles, *(["guard"] if guard else []), "pv"]), g))
    return sorted(found, key=lambda item: -item[1].number_of_nodes())  # the longest form first


def _constant(proto: onnx.ModelProto, name: str) -> np.ndarray | None:
    """The value of a tensor that is an initializer or a Constant node's output, else None."""
    for init in proto.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            for a in node.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
                if a.name in ("value_float", "value_int"):
                    return np.asarray(helper.get_attribute_value(a))
    return None


@dataclass(frozen=True)
class Decomposed:
    """A decomposed attention subgraph found in a model: its nodes (graph indices), the new node's inputs and
    attributes, or why it is left as it is."""

    nodes: tuple[int, ...]
    inputs: tuple[str, ...]
    output: str
    attributes: dict[str, Any]
    reason: str | None = None


def find_decomposed(proto: onnx.ModelProto) -> list[Decomposed]:
    """Every Softmax that is the middle of an attention: matched with networkx's subgraph matcher against the
    decomposed forms (:func:`_chain_patterns`) on the graph of nodes, then checked: scores are a MatMul of q and
    k^T, the softmax runs over the last axis, the mask Where selects -inf, the guard puts 0 where the softmax is
    NaN, and no intermediate result is read outside the subgraph."""
    nodes = list(proto.graph.node)
    producer = {out: i for i, n in enumerate(nodes) for out in n.output if out}
    consumers: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        for name in n.input:
            consumers.setdefault(name, []).append(i)
    graph = nx.DiGraph()
    for i, n in enumerate(nodes):
        graph.add_node(i, op=n.op_type)
        for name in n.input:
            if name in producer:
                graph.add_edge(producer[name], i)
    outputs = {o.name for o in proto.graph.output}
    taken: set[int] = set()
    found: list[Decomposed] = []
    for form, pattern in _chain_patterns():
        matcher = isomorphism.DiGraphMatcher(graph, pattern, node_match=lambda a, b: a["op"] == b["op"])
        for mapping in matcher.subgraph_monomorphisms_iter():
            role = {r: i for i, r in mapping.items()}
            if set(role.values()) & taken:
                continue
            match = _check(proto, nodes, role, consumers, outputs, form)
            if match is not None:
                taken.update(match.nodes)
                found.append(match)
    return found


def _check(
    proto: onnx.ModelProto,
    nodes: list[onnx.NodeProto],
    role: dict[str, int],
    consumers: dict[str, list[int]],
    outputs: set[str],
    form: str,
) -> Decomposed | None:
    """The Decomposed for one pattern match, or None when the match is not the data path of an attention."""
    n = {r: nodes[i] for r, i in role.items()}
    order = [r for r in ("qk", "scale", "mask", "softmax", "guard", "pv") if r in n]
    order = sorted(order, key=lambda r: role[r])  # the chain's own order (the graph is topologically sorted)
    flow = n["qk"].output[0]  # the scores as they go down the chain
    attrs: dict[str, Any] = {"form": form}
    inputs = {"q": n["qk"].input[0], "kt": n["qk"].input[1], "scale": "", "mask": ""}
    for r in order[1:]:
        node = n[r]
        if r == "scale":
            if node.input[0] == flow:
                inputs["scale"] = node.input[1]
            elif node.op_type == "Mul" and node.input[1] == flow:
                inputs["scale"] = node.input[0]
            else:
                return None
            attrs["scale_op"] = node.op_type.lower()
        elif r == "mask" and node.op_type == "Add":
            if flow not in node.input:
                return None
            inputs["mask"] = node.input[1] if node.input[0] == flow else node.input[0]
            attrs["mask_kind"] = "add"
        elif r == "mask":  # Where(cond, a, b): one of a, b is the scores, the other -inf
            cond, a, b = node.input
            other = b if a == flow else a if b == flow else None
            value = _constant(proto, other) if other else None
            if value is None or value.size != 1 or not np.isneginf(value).all():
                return None
            inputs["mask"] = cond
            attrs["mask_kind"] = "where_keep" if a == flow else "where_drop"
        elif r == "softmax":
            opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
            default = -1 if opset >= 13 else 1  # before opset 13 Softmax defaults to axis 1 over a flattened tail
            axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), default)
            if node.input[0] != flow or axis != -1:
                return None
        elif r == "guard":  # Where(IsNaN(p), 0, p)
            zero = _constant(proto, node.input[1])
            if node.input[0] != n["isnan"].output[0] or node.input[2] != flow or zero is None or zero.any():
                return None
            attrs["nan_guard"] = 1
        elif r == "pv":
            if node.input[0] != flow:
                return None
            inputs["v"] = node.input[1]
        flow = node.output[0]
    inner = [i for r, i in role.items() if r != "pv"]
    for i in inner:  # nothing but the chain reads what the chain computes
        for out in nodes[i].output:
            if out in outputs or any(c not in role.values() for c in consumers.get(out, [])):
                return None
    names = (inputs["q"], inputs["kt"], inputs["v"], inputs["scale"], inputs["mask"])
    return Decomposed(tuple(sorted(role.values())), names, n["pv"].output[0], attrs)


def rewrite_decomposed(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``proto`` with each decomposed attention (:func:`find_decomposed`) replaced by one
    ``ai.attncc.DecomposedAttention`` node that :func:`run` computes on attncc; the mask-building nodes stay (they
    compute the mask the node reads). The model as given when there is none."""
    found = find_decomposed(proto)
    if not found:
        return proto
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    drop = {i for d in found for i in d.nodes}
    at = {max(d.nodes): d for d in found}  # the new node takes the place of the values' MatMul
    kept: list[onnx.NodeProto] = []
    for i, node in enumerate(proto.graph.node):
        if i in at:
            d = at[i]
            name = "+".join(proto.graph.node[j].name or proto.graph.node[j].op_type for j in d.nodes)
            kept.append(helper.make_node("DecomposedAttention", list(d.inputs), [d.output], name=name, domain=DOMAIN,
                                         **{k: v for k, v in d.attributes.items()}))  # fmt: skip
        elif i not in drop:
            kept.append(node)
    del out.graph.node[:]
    out.graph.node.extend(kept)
    if not any(o.domain == DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return out


def band(keep: np.ndarray, sq: int, skv: int) -> tuple[int | None, int | None] | None:
    """(lo, hi) when a boolean mask (broadcast over batch and heads) keeps exactly the keys with
    lo <= kv - q <= hi (None: that side does not bind): causal masks of either alignment, sliding windows. Else None.

    >>> band(np.tri(4, 6, 2, dtype=bool), 4, 6)  # bottom-right causal: kv <= q + 2
    (None, 2)
    >>> band(np.tri(5, 5, 0, dtype=bool) & ~np.tri(5, 5, -3, dtype=bool), 5, 5)  # causal, 3 keys
    (-2, 0)
    """
    if keep.ndim < 2 or keep.shape[-2:] != (sq, skv) or any(d != 1 for d in keep.shape[:-2]):
        return None
    plane = keep.reshape(sq, skv)
    rows, cols = np.nonzero(plane)
    if rows.size == 0:
        return None
    d = cols - rows
    lo, hi = int(d.min()), int(d.max())
    offsets = np.arange(skv)[None, :] - np.arange(sq)[:, None]
    if not np.array_equal(plane, (offsets >= lo) & (offsets <= hi)):
        return None
    return (None if lo <= -(sq - 1) else lo), (None if hi >= skv - 1 else hi)


def _band_lift(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, factor: float, lo: int | None, hi: int | None
) -> Lifted | str:
    """lift() for a recognized band, as causal / window attributes (an unbounded side stays unbounded)."""
    sq, skv = q.shape[2], k.shape[2]
    if hi is not None and hi == skv - sq and sq != skv:  # bottom-right: one kernel for every length
        left = None if lo is None else (skv - sq) - lo
        return lift(q, k, v, scale=factor, is_causal=1, bottom_right=True, left_window_size=left)
    if (hi is not None and hi < 0) or (lo is not None and lo > 0):
        return "band does not contain the diagonal"
    if hi == 0:
        return lift(q, k, v, scale=factor, is_causal=1, left_window_size=None if lo is None else -lo)
    return lift(q, k, v, scale=factor, left_window_size=None if lo is None else -lo, right_window_size=hi)


class DecomposedAttention(OpRun):
    """A decomposed attention subgraph as one node (see :func:`rewrite_decomposed`), computed on attncc: the scores'
    MatMul inputs as given (their scale Muls stay in the graph), the scalar scale step, the mask as causal / window
    expressions where its values are exactly a band (:func:`band`, at run time: its sparsity is then proven), else
    as a runtime mask or bias; rows with no visible key are NaN as the softmax makes them, or 0 under SDPA's NaN
    guard."""

    op_domain = DOMAIN

    def _run(  # type: ignore[override]
        self,
        q: np.ndarray,
        kt: np.ndarray,
        v: np.ndarray,
        scale: np.ndarray | None = None,
        mask: np.ndarray | None = None,
        form: str = "",
        scale_op: str = "",
        mask_kind: str = "",
        nan_guard: int = 0,
    ) -> tuple[np.ndarray]:
        name = self.onnx_node.name
        lifted = self._lift(q, kt, v, scale, mask, scale_op, mask_kind)
        if isinstance(lifted, str):
            log.info("onnx subgraph %s runs in the reference evaluator: %s", name, lifted)
            _REPORTS.append({"node": name, "status": "fallback", "reason": lifted, "form": form})
            return (_decomposed_reference(q, kt, v, scale, mask, scale_op, mask_kind, nan_guard),)
        kern = _kernel(lifted)
        tq, tk, tv = (torch.from_numpy(np.ascontiguousarray(x)) for x in (lifted.q, lifted.k, lifted.v))
        runtime = {n: torch.from_numpy(t) for n, t in lifted.tensors.items()}
        with torch.no_grad():
            o, lse = kern(tq, tk, tv, return_lse=True, **runtime)
        out = o.numpy().astype(q.dtype)
        if not nan_guard:  # softmax over nothing but -inf is NaN
            out[np.isneginf(lse.numpy())] = np.nan
        _REPORTS.append({"node": name, "status": "attncc", "spec": str(lifted.spec.mask), "target": kern.target,
                         "form": form})  # fmt: skip
        return (out.reshape(*q.shape[:-1], v.shape[-1]),)

    @staticmethod
    def _lift(
        q: np.ndarray, kt: np.ndarray, v: np.ndarray, scale: np.ndarray | None, mask: np.ndarray | None,
        scale_op: str, mask_kind: str,
    ) -> Lifted | str:  # fmt: skip
        if not (q.ndim == kt.ndim == v.ndim == 4):
            return f"q, k^T, v of ranks {q.ndim}, {kt.ndim}, {v.ndim} (the lifted form takes [B, H, S, D])"
        if q.shape[0] != kt.shape[0] or kt.shape[:2] != v.shape[:2]:
            return f"batch and head axes of q {q.shape}, k^T {kt.shape}, v {v.shape} do not line up"
        factor = 1.0
        if scale_op:
            if scale is None or scale.size != 1:
                return (
                    f"the scores are scaled by a tensor of shape {None if scale is None else scale.shape}, not a scalar"
                )
            value = float(np.asarray(scale).reshape(()))
            if not np.isfinite(value) or value == 0:
                return f"scale factor {value}"
            factor = 1.0 / value if scale_op == "div" else value
        if factor <= 0:
            return f"negative score scale {factor} (attncc's scale is positive)"
        k = np.swapaxes(kt, -1, -2)
        sq, skv = q.shape[2], k.shape[2]
        keep: np.ndarray | None = None
        if mask_kind == "add" and mask is not None:
            if np.isin(mask, (0.0, -np.inf)).all():
                keep = mask == 0
            else:
                return lift(q, k, v, attn_mask=mask.astype(np.float32), scale=factor)
        elif mask_kind and mask is not None:
            keep = mask.astype(bool) if mask_kind == "where_keep" else ~mask.astype(bool)
        if keep is None:
            return lift(q, k, v, scale=factor)
        found = band(keep, sq, skv)
        if found is not None:
            lifted = _band_lift(q, k, v, factor, *found)
            if not isinstance(lifted, str):
                return lifted
        return lift(q, k, v, attn_mask=keep, scale=factor)


def _decomposed_reference(
    q: np.ndarray, kt: np.ndarray, v: np.ndarray, scale: np.ndarray | None, mask: np.ndarray | None,
    scale_op: str, mask_kind: str, nan_guard: int,
) -> np.ndarray:  # fmt: skip
    """What the replaced nodes compute, in numpy, for a subgraph attncc does not lift."""
    s = np.matmul(q, kt)
    if scale_op == "div":
        s = s / scale
    elif scale_op == "mul":
        s = s * scale
    if mask_kind == "add":
        s = s + mask
    elif mask_kind:
        keep = np.asarray(mask, bool) if mask_kind == "where_keep" else ~np.asarray(mask, bool)
        s = np.where(keep, s, -np.inf)
    with np.errstate(invalid="ignore"):
        e = np.exp(s - s.max(axis=-1, keepdims=True))
        p = e / e.sum(axis=-1, keepdims=True)
    if nan_guard:
        p = np.where(np.isnan(p), 0, p)
    return np.matmul(p.astype(q.dtype), v).astype(q.dtype)
