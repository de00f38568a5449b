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

Decomposed attention (what torch.onnx's TorchScript exporter writes for transformers models: MatMul of q and k^T,
a scale (Div or Mul by a scalar), a softcap (Div, Tanh, Mul), a mask (Add of a bias, or Where selecting -inf or a
huge negative fill), Softmax over the last axis, an optional NaN guard, MatMul with v) is found with networkx's
subgraph matcher (:func:`find_decomposed`) and replaced by one node computed on attncc (:func:`rewrite_decomposed`),
which folds the scalar Muls of q and k, K's transpose and transformers' GQA repeat (Unsqueeze -> Expand ->
Reshape). Its mask-building subgraph is lifted to an attncc expression at rewrite time (``onnx_masks.lift_mask``:
causal, windows, documents, Gathers of a padding mask; its index part proven per tile); one that does not lift
is read by value at run time, where a band (lo <= kv - q <= hi) still becomes the matching causal / window
expression, anything else a runtime mask or bias.

Not lifted, with the reason logged and reported, the node then running in the reference evaluator: a requested
``qk_matmul_output`` (attncc never materializes the score matrix), ``softmax_precision`` wider than float32
(attncc's softmax is float32 for every input dtype), query heads that are not a multiple of the kv heads, input
dtypes other than float32 and float16. Value heads may be of another size than query and key heads (``v_head_size``).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import networkx as nx
import numpy as np
import onnx
import sympy
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
from attncc.frontends.onnx_masks import MaskLift, NotLifted, lift_mask, plane_band
from attncc.ir import exprs as X

log = logging.getLogger("attncc.onnx")

_REPORTS: list[dict[str, Any]] = []
_RUNNERS: dict[str, _Reference | _Staged] = {}  # per model (its serialized bytes' hash) and runtime: rewritten once
_MASK_OWNERS: dict[str, set[str]] = {}
_RUNNERS_KEPT = 8
_KERNELS: dict[tuple[Any, ...], ac.Kernel] = {}
_HUGE = -1e30  # a mask value at or below this is "masked" (transformers fills with finfo(dtype).min)
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
    mask_expr: Expr | None = None,
    mask_tensors: Mapping[str, np.ndarray] | None = None,
) -> Lifted | str:
    """The attncc form of one ``Attention`` call (inputs and attributes as the operator has them), or the reason
    it is left to the reference evaluator. ``bottom_right``: without a cache, align the causal / window frontier
    at ``Skv - Sq`` (a recognized bottom-right causal mask of a decomposed graph) instead of 0. ``mask_expr``: a
    further mask expression (a lifted mask-building subgraph) with its runtime tensors ``mask_tensors``.

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
    if k.shape[3] != D:
        return f"head sizes q {D} and k {k.shape[3]} differ (the operator needs one)"
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
        int(v.shape[3]),
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
    if mask_expr is not None:
        parts.append(mask_expr)
        tensors.update(mask_tensors or {})
        key.append(("expr", str(mask_expr), tuple(sorted((n, t.ndim) for n, t in (mask_tensors or {}).items()))))
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
    combined: Expr | None = None
    for part in parts:
        combined = part if combined is None else combined & part
    spec = ac.AttentionSpec(
        name="onnx_attention", num_heads=H, num_kv_heads=Hkv, head_dim=D, value_dim=int(v.shape[3]), mask=combined,
        score_mod=score_mod, scale=None if scale is None else float(scale),
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

    def _run(self, *inputs: np.ndarray | None, **attrs: Any) -> tuple[np.ndarray, ...]:  # type: ignore[override]
        """``inputs``: Q, K, V and the optional attn_mask, past_key, past_value, nonpad_kv_seqlen (None where
        omitted); ``attrs``: the node's attributes, by the operator's names (``lift``'s keywords, and
        ``qk_matmul_output_mode``, which only the reference evaluator reads)."""
        node = self.onnx_node
        name = node.name or f"Attention({', '.join(node.input)})"
        wanted = len(node.output) > 3 and node.output[3] != ""
        keywords = {k: v for k, v in attrs.items() if k != "qk_matmul_output_mode"}
        lifted = lift(*inputs, **keywords, qk_output_wanted=wanted)  # type: ignore[arg-type]
        if isinstance(lifted, str):
            log.info("onnx node %s runs in the reference evaluator: %s", name, lifted)
            _REPORTS.append({"node": name, "status": "fallback", "reason": lifted})
            return cast(tuple[np.ndarray, ...], super()._run(*inputs, **attrs))  # type: ignore[arg-type]
        Q = cast(np.ndarray, inputs[0])
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


def run(model: onnx.ModelProto | str, feeds: Mapping[str, np.ndarray], runtime: str = "reference") -> list[np.ndarray]:
    """Run a whole ONNX model: each ``Attention`` node on an attncc kernel where it lifts (see :func:`lift`), each
    decomposed attention subgraph too (see :func:`rewrite_decomposed`), every other node, and any node that does
    not lift (reported with the reason), in the ``onnx`` reference evaluator, or with ``runtime="onnxruntime"`` in
    onnxruntime sessions (the graph cut at the attention sites; a site that does not lift then runs in the
    reference evaluator). Returns every graph output, in the graph's order. The rewritten model (and its
    onnxruntime sessions) is kept for the next call with the same model.

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
    >>> (z,) = run(model, {"Q": x, "K": x, "V": x}, runtime="onnxruntime")
    >>> bool(np.allclose(y, z))
    True
    """
    if runtime not in ("reference", "onnxruntime"):
        raise ValueError(f"runtime={runtime!r}: attncc runs the other nodes in 'reference' or 'onnxruntime'")
    proto = onnx.load(model) if isinstance(model, str) else model
    _check_feeds(proto, feeds)
    overridden = sorted({i.name for i in proto.graph.initializer} & set(feeds))
    if overridden and runtime == "onnxruntime":  # the stage sessions hold the initializers they read
        raise SpecError(f"feeds override initializers {', '.join(overridden)}: use runtime='reference' for that")
    key = hashlib.sha256(proto.SerializeToString()).hexdigest() + runtime
    runner = _RUNNERS.pop(key, None)
    if runner is None:
        rewritten = rewrite_decomposed(proto)
        runner = _Staged(rewritten) if runtime == "onnxruntime" else _Reference(rewritten)
        _MASK_OWNERS[key] = {
            a.s.decode()
            for n in rewritten.graph.node
            if n.domain == DOMAIN
            for a in n.attribute
            if a.name == "mask_lift"
        }
        while len(_RUNNERS) >= _RUNNERS_KEPT:  # forget the least recently run model and its lifted masks
            old = next(iter(_RUNNERS))
            del _RUNNERS[old]
            owned = set().union(*(v for k, v in _MASK_OWNERS.items() if k != old))
            for name in _MASK_OWNERS.pop(old, set()) - owned:
                _MASKS.pop(name, None)
    _RUNNERS[key] = runner  # most recently run last
    return runner.run(feeds)


def _check_feeds(proto: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> None:
    """Feeds against the graph's inputs: every input given (initializers may be overridden), no unknown name,
    each the declared element type and static dims."""
    inits = {i.name for i in proto.graph.initializer}
    declared = {i.name: i for i in proto.graph.input}
    missing = [n for n in declared if n not in feeds and n not in inits]
    unknown = [n for n in feeds if n not in declared]
    if missing or unknown:
        raise SpecError(
            f"onnx model inputs: {'missing ' + ', '.join(missing) if missing else ''}"
            f"{'; ' if missing and unknown else ''}{'unknown ' + ', '.join(unknown) if unknown else ''} "
            f"(the graph takes {', '.join(n for n in declared if n not in inits)})"
        )
    for name, value in feeds.items():
        t = declared[name].type.tensor_type
        x = np.asarray(value)
        if t.elem_type and helper.tensor_dtype_to_np_dtype(t.elem_type) != x.dtype:
            want = helper.tensor_dtype_to_np_dtype(t.elem_type)
            raise SpecError(f"onnx model input {name!r}: dtype {x.dtype}, the graph declares {want}; cast it")
        dims = t.shape.dim if t.HasField("shape") else None
        if dims is None:
            continue
        if len(dims) != x.ndim or any(d.HasField("dim_value") and d.dim_value != n for d, n in zip(dims, x.shape)):
            dims_ = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param or "?" for d in dims)
            raise SpecError(f"onnx model input {name!r}: shape {x.shape}, the graph declares {dims_}")


class _Reference:
    """A rewritten model in the onnx reference evaluator."""

    def __init__(self, rewritten: onnx.ModelProto) -> None:
        self.evaluator = ReferenceEvaluator(rewritten, new_ops=[Attention, DecomposedAttention])

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return list(self.evaluator.run(None, dict(feeds)))


def _is_site(node: onnx.NodeProto) -> bool:
    return (node.op_type == "Attention" and node.domain in ("", "ai.onnx")) or (
        node.op_type == "DecomposedAttention" and node.domain == DOMAIN
    )


class _Staged:
    """A rewritten model in stages: onnxruntime runs every node it can reach before the next attention site (one
    session per stage, built at the first run when the types of what it reads are known), then attncc runs the
    sites whose inputs are ready."""

    def __init__(self, rewritten: onnx.ModelProto) -> None:
        self.model = rewritten
        self.nodes = list(rewritten.graph.node)
        self.inits = {i.name: i for i in rewritten.graph.initializer}
        self.outputs = [o.name for o in rewritten.graph.output]
        self.sessions: dict[int, tuple[Any, list[str], list[str]]] = {}
        self.sites: dict[int, ReferenceEvaluator] = {}

    def _site(self, i: int) -> ReferenceEvaluator:
        if i not in self.sites:
            node = self.nodes[i]
            inputs = [helper.make_tensor_value_info(n, onnx.TensorProto.UNDEFINED, None) for n in node.input if n]
            outputs = [helper.make_tensor_value_info(n, onnx.TensorProto.UNDEFINED, None) for n in node.output if n]
            graph = helper.make_graph([node], "site", inputs, outputs)
            one = helper.make_model(graph, opset_imports=list(self.model.opset_import))
            self.sites[i] = ReferenceEvaluator(one, new_ops=[Attention, DecomposedAttention])
        return self.sites[i]

    def _stage(self, index: int, todo: list[int], values: Mapping[str, np.ndarray]) -> tuple[Any, list[str], list[str]]:
        """An onnxruntime session for the nodes ``todo`` (inputs: the known values they read; outputs: what
        anything after them reads)."""
        if index in self.sessions:
            return self.sessions[index]
        import onnxruntime as ort

        mine = set(todo)
        produced = {o for i in todo for o in self.nodes[i].output if o}
        read = [n for i in todo for n in self.nodes[i].input if n and n not in produced]
        needed_after = {n for j, node in enumerate(self.nodes) if j not in mine for n in node.input} | set(self.outputs)
        ins = list(dict.fromkeys(n for n in read if n in values and n not in self.inits))
        outs = [o for i in todo for o in self.nodes[i].output if o and o in needed_after]
        inputs = [
            helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(values[n].dtype), [None] * values[n].ndim)
            for n in ins
        ]
        inits = [self.inits[n] for n in dict.fromkeys(read) if n in self.inits]
        probe = helper.make_graph([self.nodes[i] for i in todo], "stage", inputs, [], inits)
        typed = onnx.shape_inference.infer_shapes(helper.make_model(probe, opset_imports=list(self.model.opset_import)))
        known = {v.name: v for v in typed.graph.value_info}
        outputs = [known.get(o) or helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in outs]
        graph = helper.make_graph([self.nodes[i] for i in todo], f"stage{index}", inputs, outputs, inits)
        stage_model = helper.make_model(graph, opset_imports=[o for o in self.model.opset_import if o.domain != DOMAIN])
        stage_model.ir_version = self.model.ir_version
        session = ort.InferenceSession(stage_model.SerializeToString(), providers=["CPUExecutionProvider"])
        self.sessions[index] = (session, ins, outs)
        return self.sessions[index]

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        values: dict[str, np.ndarray] = dict(feeds)
        done: set[int] = set()
        stage = 0
        while len(done) < len(self.nodes):
            ready = set(values) | set(self.inits)
            todo: list[int] = []
            for i, node in enumerate(self.nodes):  # topological order: a node's producers come first
                if i in done or _is_site(node):
                    continue
                if all(not n or n in ready for n in node.input):
                    todo.append(i)
                    ready.update(o for o in node.output if o)
            if todo:
                session, ins, outs = self._stage(stage, todo, values)
                values.update(zip(outs, session.run(outs, {n: values[n] for n in ins}), strict=True))
                done.update(todo)
                stage += 1
            sites = [i for i, node in enumerate(self.nodes) if i not in done and _is_site(node)
                     and all(not n or n in values or n in self.inits for n in node.input)]  # fmt: skip
            for i in sites:
                node = self.nodes[i]
                given = {n: values[n] if n in values else numpy_helper.to_array(self.inits[n]) for n in node.input if n}
                outs = [o for o in node.output if o]
                values.update(zip(outs, cast(list[np.ndarray], self._site(i).run(outs, given)), strict=True))
                done.add(i)
            if not todo and not sites:
                missing = sorted({n for i, node in enumerate(self.nodes) if i not in done for n in node.input
                                  if n and n not in values and n not in self.inits})  # fmt: skip
                raise SpecError(f"onnx model: no value for {missing[:5]} (missing feeds?)")
        return [values[o] for o in self.outputs]


def sites(model: onnx.ModelProto | str) -> list[dict[str, Any]]:
    """The ``Attention`` nodes of ``model`` with their attributes and declared input shapes (from shape
    inference), without running it: ``node``, ``index`` (in the graph's node list), ``opset``, ``attributes``,
    ``inputs`` (name -> shape or None), ``outputs``. Decomposed subgraphs: :func:`find_decomposed`.

    >>> from onnx import TensorProto, helper
    >>> node = helper.make_node("Attention", ["Q", "K", "V"], ["Y"], name="attn", is_causal=1, scale=0.125)
    >>> io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2, 16, 64]) for n in "QKVY"]
    >>> model = helper.make_model(helper.make_graph([node], "g", io[:3], io[3:]),
    ...                           opset_imports=[helper.make_opsetid("", 23)])
    >>> (site,) = sites(model)
    >>> site["node"], site["attributes"], site["inputs"]["K"]
    ('attn', {'is_causal': 1, 'scale': 0.125}, (1, 2, 16, 64))
    """
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
    and a mask (Add of a bias, or Where selecting -inf) in either order, a softcap (Div by c, Tanh, Mul by c: Gemma
    2's) after the scale and before the mask, and SDPA's NaN guard (Where(IsNaN(p), 0, p)) between the softmax and
    the values' MatMul. Roles are the pattern's node names."""
    found = []
    for scale, cap, mask, guard in itertools.product((None, "Div", "Mul"), (False, True), (None, "Add", "Where"),
                                                      (False, True)):  # fmt: skip
        scaled = [("scale", scale)] if scale else []
        capped = [("cap_div", "Div"), ("tanh", "Tanh"), ("cap_mul", "Mul")] if cap else []
        masked = [("mask", mask)] if mask else []
        found.append(_chain(scaled + capped + masked, guard))
        if scale and mask and not cap:
            found.append(_chain(masked + scaled, guard))
    return sorted(found, key=lambda item: -item[1].number_of_nodes())  # the longest form first


def _chain(steps: list[tuple[str, str]], guard: bool) -> tuple[str, nx.DiGraph]:
    """One decomposed form: MatMul -> steps (role, op type) -> Softmax -> [NaN guard] -> MatMul, and its label."""
    roles = ["qk", *[r for r, _ in steps], "softmax"]
    g = nx.DiGraph()
    g.add_node("qk", op="MatMul")
    g.add_nodes_from((role, {"op": op}) for role, op in steps)
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
    label = ["softcap" if r == "cap_div" else r for r in roles if r not in ("tanh", "cap_mul")]
    return "-".join([*label, *(["guard"] if guard else []), "pv"]), g


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
    names: tuple[str, ...] = ()
    reason: str | None = None


def find_decomposed(proto: onnx.ModelProto) -> list[Decomposed]:
    """Every Softmax that is the middle of an attention: matched with networkx's subgraph matcher against the
    decomposed forms (:func:`_chain_patterns`) on the graph of nodes, then checked: scores are a MatMul of q and
    k^T, the softmax runs over the last axis, the mask Where selects -inf, the guard puts 0 where the softmax is
    NaN, and no intermediate result is read outside the subgraph. Node indices are those of
    :func:`bypass_transparent` (``proto``'s graph without no-op Casts, Identities and inference Dropouts).

    >>> from onnx import TensorProto, helper
    >>> nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
    ...          helper.make_node("MatMul", ["q", "kt"], ["s"]), helper.make_node("Mul", ["s", "c"], ["ss"]),
    ...          helper.make_node("Softmax", ["ss"], ["p"], axis=-1), helper.make_node("Identity", ["p"], ["pi"]),
    ...          helper.make_node("MatMul", ["pi", "v"], ["y"])]
    >>> io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2, 8, 16]) for n in "qkvy"]
    >>> c = helper.make_tensor("c", TensorProto.FLOAT, [], [0.25])
    >>> model = helper.make_model(helper.make_graph(nodes, "g", io[:3], io[3:], initializer=[c]),
    ...                           opset_imports=[helper.make_opsetid("", 18)])
    >>> (found,) = find_decomposed(model)
    >>> found.attributes  # K's Transpose folded: the node reads k itself
    {'form': 'qk-scale-softmax-pv', 'scale_op': 'mul', 'k_input': 'k'}
    >>> found.nodes, found.inputs[:4]  # (the Identity is gone: indices of the bypassed graph)
    ((1, 2, 3, 4), ('q', 'k', 'v', 'c'))
    >>> [n.op_type for n in rewrite_decomposed(model).graph.node]
    ['DecomposedAttention']
    """
    return _find(bypass_transparent(proto))


def _find(proto: onnx.ModelProto) -> list[Decomposed]:
    """find_decomposed on a graph already without no-op nodes."""
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


def _opset(proto: onnx.ModelProto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def bypass_transparent(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` without the nodes that pass their input through unchanged: Identity, a Cast to the type its input
    already has (types from shape inference; a Cast of unknown input type stays), Dropout at inference (one
    output, no training_mode input). Their readers read the input instead; a graph output they write stays. The
    model as given when there is none. Exporters put such nodes inside attention (transformers' eager attention:
    Softmax -> Cast(float) -> Cast(float) -> MatMul).

    >>> from onnx import TensorProto, helper
    >>> nodes = [helper.make_node("Cast", ["x"], ["x32"], to=TensorProto.FLOAT),
    ...          helper.make_node("Identity", ["x32"], ["xi"]), helper.make_node("Relu", ["xi"], ["y"])]
    >>> io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [4]) for n in "xy"]
    >>> model = helper.make_model(helper.make_graph(nodes, "g", io[:1], io[1:]))
    >>> [(n.op_type, list(n.input)) for n in bypass_transparent(model).graph.node]
    [('Relu', ['x'])]
    """
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except onnx.shape_inference.InferenceError:
        inferred = proto
    elem = {i.name: i.type.tensor_type.elem_type for i in [*inferred.graph.input, *inferred.graph.value_info]}
    elem.update({i.name: i.data_type for i in proto.graph.initializer})
    outputs = {o.name for o in proto.graph.output}
    alias: dict[str, str] = {}
    drop: set[int] = set()
    for i, node in enumerate(proto.graph.node):
        if node.output[0] in outputs or not node.input:
            continue
        if node.op_type == "Cast" and node.domain in ("", "ai.onnx"):
            to = next(helper.get_attribute_value(a) for a in node.attribute if a.name == "to")
            passes = elem.get(node.input[0], 0) == to != 0
        else:
            passes = node.op_type == "Identity" or (
                node.op_type == "Dropout" and len(node.input) < 3 and len([o for o in node.output if o]) == 1
            )
        if passes and node.domain in ("", "ai.onnx"):
            alias[node.output[0]] = alias.get(node.input[0], node.input[0])
            drop.add(i)
    if not drop:
        return proto
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    del out.graph.node[:]
    for i, node in enumerate(proto.graph.node):
        if i not in drop:
            kept = onnx.NodeProto()
            kept.CopyFrom(node)
            kept.input[:] = [alias.get(n, n) for n in node.input]
            out.graph.node.append(kept)
    return out


@dataclass(frozen=True)
class _Operand:
    """Where a MatMul operand of a decomposed attention comes from: ``source`` multiplied by the scalar constant
    ``scale`` (a name, or ""), its last two axes swapped when ``transposed``, its heads repeated for GQA when
    ``expand`` / ``reshape`` name the shapes of transformers' repeat_kv (Unsqueeze at axis 2 -> Expand ->
    Reshape)."""

    source: str
    scale: str = ""
    transposed: bool = False
    expand: str = ""
    reshape: str = ""


def _operand(proto: onnx.ModelProto, producer: Mapping[str, onnx.NodeProto], name: str, steps: str) -> _Operand:
    """Walk back from a MatMul input through the steps allowed (``s``: a scalar constant Mul, ``t``: a Transpose of
    the last two axes, ``g``: a GQA repeat), each at most once, in the order the graph has them."""
    found: dict[str, Any] = {}
    while True:
        node = producer.get(name)
        if node is None or node.domain not in ("", "ai.onnx"):
            break
        if node.op_type == "Mul" and "s" in steps and "scale" not in found:
            consts = [(j, _constant(proto, x)) for j, x in enumerate(node.input)]
            scalar = [j for j, c in consts if c is not None and c.size == 1]
            if not scalar:
                break
            found["scale"] = node.input[scalar[0]]
            name = node.input[1 - scalar[0]]
        elif node.op_type == "Transpose" and "t" in steps and "transposed" not in found:
            perm = next((list(helper.get_attribute_value(a)) for a in node.attribute if a.name == "perm"), None)
            if perm != [0, 1, 3, 2]:
                break
            found["transposed"] = True
            name = node.input[0]
        elif node.op_type == "Reshape" and "g" in steps and "expand" not in found:
            if any(a.name == "allowzero" and a.i for a in node.attribute):
                break
            expand = producer.get(node.input[0])
            unsq = producer.get(expand.input[0]) if expand is not None and expand.op_type == "Expand" else None
            if expand is None or unsq is None or unsq.op_type != "Unsqueeze":
                break
            axes = (
                _constant(proto, unsq.input[1]) if len(unsq.input) > 1
                else next((np.asarray(helper.get_attribute_value(a)) for a in unsq.attribute if a.name == "axes"), None)
            )  # fmt: skip
            if axes is None or axes.reshape(-1).tolist() != [2]:
                break
            found["expand"], found["reshape"] = expand.input[1], node.input[1]
            name = unsq.input[0]
        else:
            break
    return _Operand(name, **found)


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
    order = [r for r in ("qk", "scale", "cap_div", "tanh", "cap_mul", "mask", "softmax", "guard", "pv") if r in n]
    order = sorted(order, key=lambda r: role[r])  # the chain's own order (the graph is topologically sorted)
    flow = n["qk"].output[0]  # the scores as they go down the chain
    attrs: dict[str, Any] = {"form": form}
    inputs = {"scale": "", "mask": ""}
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
        elif r in ("cap_div", "cap_mul"):  # softcap: (s / c) -> Tanh -> (* c), c one positive constant
            if node.input[0] != flow and not (r == "cap_mul" and node.input[1] == flow):
                return None
            other = node.input[1] if node.input[0] == flow else node.input[0]
            value = _constant(proto, other)
            if value is None or value.size != 1 or not float(value.reshape(())) > 0:
                return None
            cap = float(value.reshape(()))
            if r == "cap_mul" and cap != attrs.get("softcap"):
                return None
            attrs["softcap"] = cap
        elif r == "tanh":
            if node.input[0] != flow:
                return None
        elif r == "mask" and node.op_type == "Add":
            if flow not in node.input:
                return None
            inputs["mask"] = node.input[1] if node.input[0] == flow else node.input[0]
            attrs["mask_kind"] = "add"
        elif r == "mask":  # Where(cond, a, b): one of a, b is the scores, the other -inf
            cond, a, b = node.input
            other = b if a == flow else a if b == flow else None
            value = _constant(proto, other) if other else None
            if value is None or value.size != 1 or not (np.isneginf(value).all() or (value <= _HUGE).all()):
                return None
            if np.isfinite(value).all():  # masked_fill with finfo.min: a row with no key averages every value
                attrs["fill"] = "finite"
            inputs["mask"] = cond
            attrs["mask_kind"] = "where_keep" if a == flow else "where_drop"
        elif r == "softmax":
            default = -1 if _opset(proto) >= 13 else 1  # before opset 13 Softmax defaults to axis 1, flattened
            axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), default)
            if node.input[0] != flow or axis != -1:
                return None
        elif r == "guard":  # Where(IsNaN(p), 0, p)
            zero = _constant(proto, node.input[1])
            if node.input[0] != n["isnan"].output[0] or node.input[2] != flow or zero is None or zero.any():
                return None
            attrs["nan_guard"] = 1
        elif r == "pv" and node.input[0] != flow:
            return None
        flow = node.output[0]
    inner = [i for r, i in role.items() if r != "pv"]
    for i in inner:  # nothing but the chain reads what the chain computes
        for out in nodes[i].output:
            if out in outputs or any(c not in role.values() for c in consumers.get(out, [])):
                return None
    producer = {out: node for node in nodes for out in node.output if out}
    q = _operand(proto, producer, n["qk"].input[0], "s")
    k = _operand(proto, producer, n["qk"].input[1], "stg")
    v = _operand(proto, producer, n["pv"].input[1], "g")
    attrs["k_input"] = "k" if k.transposed else "k^T"  # k^T: as the MatMul reads it
    names = (
        q.source, k.source, v.source, inputs["scale"], inputs["mask"], q.scale, k.scale,
        k.expand, k.reshape, v.expand, v.reshape,
    )  # fmt: skip
    chain = tuple(sorted(role.values()))
    labels = tuple(nodes[i].name or nodes[i].op_type for i in chain)
    return Decomposed(chain, names, n["pv"].output[0], attrs, labels)


def _live(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The nodes of ``graph`` whose outputs something reads (a later node or a graph output), in order."""
    needed = {o.name for o in graph.output}
    kept: list[onnx.NodeProto] = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output if o):
            kept.append(node)
            needed.update(node.input)
            for a in node.attribute:  # subgraphs (If, Loop, Scan) read outer names
                for g in [a.g, *a.graphs]:
                    needed.update(x for sub in g.node for x in sub.input)
    return kept[::-1]


def describe_mask(proto: onnx.ModelProto, found: Decomposed) -> str:
    """What :func:`run` makes of a decomposed site's mask: the lifted keep condition, or why its values are read
    at run time (a band among them still becomes causal / window expressions there)."""
    lifted = _lift_mask(bypass_transparent(proto), found.inputs[4], found.attributes.get("mask_kind", ""))
    if isinstance(lifted, str):
        return f"read by value at run time ({lifted})"
    inputs = ", ".join(graph for graph, _ in lifted.lifted.inputs.values())
    return f"lifted: {lifted.keep}" + (f" (graph inputs read: {inputs})" if inputs else "")


def rewrite_decomposed(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``proto`` (without no-op nodes, :func:`bypass_transparent`) with each decomposed attention
    (:func:`find_decomposed`) replaced by one ``ai.attncc.DecomposedAttention`` node that :func:`run` computes on
    attncc. The node reads q, k, v from before the scalar Muls, K's transpose and the GQA repeat that fed the
    MatMuls (they become part of the node), so the nodes that computed only those go too; the mask-building nodes
    stay (they compute the mask the node reads). The model as given when there is none."""
    proto = bypass_transparent(proto)
    found = _find(proto)  # proto is bypassed above: no second shape inference
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
            inputs, attrs = list(d.inputs), dict(d.attributes)
            if d.inputs[4]:
                found_mask = _lift_mask(proto, d.inputs[4], d.attributes.get("mask_kind", ""))
                if isinstance(found_mask, str):
                    attrs["mask_note"] = found_mask
                else:
                    key = _mask_key(found_mask)  # by content: rewriting a model again adds nothing
                    _MASKS[key] = found_mask
                    inputs[4] = ""
                    inputs += [graph_name for graph_name, _ in found_mask.lifted.inputs.values()]
                    attrs["mask_lift"] = key
            kept.append(helper.make_node("DecomposedAttention", inputs, [d.output], name="+".join(d.names),
                                         domain=DOMAIN, **attrs))  # fmt: skip
        elif i not in drop:
            kept.append(node)
    del out.graph.node[:]
    out.graph.node.extend(kept)
    live = _live(out.graph)
    del out.graph.node[:]
    out.graph.node.extend(live)
    if not any(o.domain == DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return out


@dataclass(frozen=True)
class _LiftedMask:
    """A decomposed graph's mask-building subgraph as attncc's keep condition (see ``onnx_masks``)."""

    keep: Expr | None  # None: the subgraph masks nothing
    finite: bool  # the masked scores are a finite fill (transformers' finfo.min), not -inf
    lifted: MaskLift


_MASKS: dict[str, _LiftedMask] = {}


def _mask_key(mask: _LiftedMask) -> str:
    lifted = mask.lifted
    facts = repr((str(mask.keep), mask.finite, lifted.inputs, lifted.shape, sorted(lifted.input_shapes.items())))
    digest = hashlib.sha256(facts.encode())
    for name, value in sorted(lifted.constants.items()):
        digest.update(name.encode() + value.tobytes())
    return "mask" + digest.hexdigest()[:24]


def _lift_mask(proto: onnx.ModelProto, name: str, kind: str) -> _LiftedMask | str:
    """The mask tensor ``name`` (read by an Add of a bias, or a Where's condition, per ``kind``) lifted to a keep
    condition, or the reason it is read by value at run time instead."""
    try:
        lifted = lift_mask(proto, name)
    except NotLifted as exc:
        log.info("onnx mask %s is read by value: %s", name, exc)
        return str(exc)
    e = lifted.expr
    found: _LiftedMask | None = None
    if kind in ("where_keep", "where_drop"):
        cond = e if e.is_boolean else e != 0
        found = _LiftedMask(cond if kind == "where_keep" else ~cond, False, lifted)
    elif e.sym.is_number and float(e.sym) == 0:
        return _LiftedMask(None, False, lifted)
    elif isinstance(e.sym, sympy.Piecewise) and len(e.sym.args) == 2 and e.sym.args[1].cond == sympy.true:
        (a, cond), (c, _) = e.sym.args
        for zero, fill, keep_when in ((a, c, True), (c, a, False)):
            if zero == 0 and fill.is_number and (fill == -sympy.oo or (fill.is_finite and float(fill) <= _HUGE)):
                keep = Expr(cond, e.meta)
                found = _LiftedMask(keep if keep_when else ~keep, bool(fill.is_finite), lifted)
                break
    if found is None:
        return f"the additive mask {e} is not 0 where kept and one -inf or huge negative value elsewhere"
    assert found.keep is not None
    keep_sym = found.keep.sym
    if (
        isinstance(keep_sym, sympy.Ne | sympy.Eq)
        and isinstance(keep_sym.args[0], sympy.Indexed)
        and keep_sym.args[1] == 0
        and not lifted.constants
    ):
        return "the mask is a graph input as given: its values are read at run time"  # where a band is recognized
    return _LiftedMask(Expr(_integral(keep_sym), found.keep.meta), found.finite, lifted)


def _integral(e: sympy.Basic) -> sympy.Basic:
    """Strict integer comparisons as the non-strict ones attncc writes: ``kv < q + 1`` -> ``kv <= q``."""
    swap = {}
    for rel in e.atoms(sympy.StrictLessThan, sympy.StrictGreaterThan):
        lhs, rhs = rel.args
        if (lhs - rhs).is_integer:
            swap[rel] = sympy.Le(lhs, rhs - 1) if isinstance(rel, sympy.StrictLessThan) else sympy.Ge(lhs, rhs + 1)
    return e.xreplace(swap) if swap else e


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
    return plane_band(keep.reshape(sq, skv))


def _band_lift(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    factor: float,
    lo: int | None,
    hi: int | None,
    softcap: float | None = None,
) -> Lifted | str:
    """lift() for a recognized band, as causal / window attributes (an unbounded side stays unbounded)."""
    sq, skv = q.shape[2], k.shape[2]
    if hi is not None and hi == skv - sq and sq != skv:  # bottom-right: one kernel for every length
        left = None if lo is None else (skv - sq) - lo
        return lift(q, k, v, scale=factor, softcap=softcap, is_causal=1, bottom_right=True, left_window_size=left)
    if (hi is not None and hi < 0) or (lo is not None and lo > 0):
        return "band does not contain the diagonal"
    if hi == 0:
        return lift(q, k, v, scale=factor, softcap=softcap, is_causal=1, left_window_size=None if lo is None else -lo)
    return lift(
        q, k, v, scale=factor, softcap=softcap, left_window_size=None if lo is None else -lo, right_window_size=hi
    )


def _onnx_reshape(shape: tuple[int, ...], target: np.ndarray) -> tuple[int, ...] | None:
    """The shape ONNX's Reshape (allowzero 0) gives a tensor of ``shape`` for ``target``, or None if it has none."""
    dims = [shape[i] if d == 0 and i < len(shape) else int(d) for i, d in enumerate(np.asarray(target).reshape(-1))]
    if dims.count(-1) > 1:
        return None
    if -1 in dims:
        rest = int(np.prod([d for d in dims if d != -1]))
        if rest == 0 or int(np.prod(shape)) % rest:
            return None
        dims[dims.index(-1)] = int(np.prod(shape)) // rest
    return tuple(dims) if int(np.prod(dims)) == int(np.prod(shape)) else None


def _repeated(x: np.ndarray, expand: np.ndarray | None, reshape: np.ndarray | None) -> tuple[np.ndarray, int]:
    """A GQA repeat (Unsqueeze(x, 2) -> Expand(expand) -> Reshape(reshape)) as (x, n) when it repeats each of x's
    heads n times in a row, else (the repeated tensor the graph computes, 1). No repeat: (x, 1)."""
    if expand is None or reshape is None:
        return x, 1
    grown = x[:, :, None]
    try:
        shape = np.broadcast_shapes(grown.shape, tuple(int(d) for d in np.asarray(expand).reshape(-1)))
    except ValueError as exc:
        raise SpecError(f"Expand of {grown.shape} to {np.asarray(expand).tolist()}: {exc}") from exc
    target = _onnx_reshape(shape, reshape)
    if target is None:
        raise SpecError(f"Reshape of {shape} to {np.asarray(reshape).tolist()}")
    n = shape[2] if len(shape) == 5 else 0
    if (
        x.ndim == 4
        and shape[:2] == x.shape[:2]
        and shape[3:] == x.shape[2:]
        and target == (x.shape[0], x.shape[1] * n, *x.shape[2:])
    ):
        return x, n
    return np.broadcast_to(grown, shape).reshape(target), 1


def _flagged(lifted: Lifted | str, finite: bool) -> tuple[Lifted, bool] | str:
    return lifted if isinstance(lifted, str) else (lifted, finite)


class DecomposedAttention(OpRun):
    """A decomposed attention subgraph as one node (see :func:`rewrite_decomposed`), computed on attncc: q, k, v as
    they were before the scalar Muls (folded into the scale), K's transpose and transformers' GQA repeat (folded
    into kv heads: the kernel reads each kv head once), the scalar scale step, the mask as causal / window
    expressions where its values are exactly a band (:func:`band`, at run time: its sparsity is then proven), else
    as a runtime mask or bias; rows with no visible key are NaN as the softmax makes them, or 0 under SDPA's NaN
    guard."""

    op_domain = DOMAIN

    def _run(  # type: ignore[override]
        self,
        q: np.ndarray,
        k: np.ndarray,
        v: np.ndarray,
        scale: np.ndarray | None = None,
        mask: np.ndarray | None = None,
        q_scale: np.ndarray | None = None,
        k_scale: np.ndarray | None = None,
        k_expand: np.ndarray | None = None,
        k_reshape: np.ndarray | None = None,
        v_expand: np.ndarray | None = None,
        v_reshape: np.ndarray | None = None,
        *leaves: np.ndarray,
        form: str = "",
        scale_op: str = "",
        mask_kind: str = "",
        nan_guard: int = 0,
        k_input: str = "k^T",
        fill: str = "",
        mask_lift: str = "",
        mask_note: str = "",
        softcap: float = 0.0,
    ) -> tuple[np.ndarray]:
        name = self.onnx_node.name
        lifted_mask = _MASKS[mask_lift] if mask_lift else None
        shape = (*q.shape[:-1], v.shape[-1])
        if q.ndim == k.ndim == v.ndim == 3:  # [batch * heads, S, D] (3-D exports): one batch of heads
            q, k, v = q[None], k[None], v[None]
        k, nk = _repeated(k, k_expand, k_reshape)
        v, nv = _repeated(v, v_expand, v_reshape)
        if nk != nv:  # one side repeated, the other not: run on the repeated heads
            k, v = (np.repeat(x, n, axis=1) for x, n in ((k, nk), (v, nv)))
        k4 = np.swapaxes(k, -1, -2) if k_input == "k^T" else k
        factor = 1.0
        for c in (q_scale, k_scale):
            factor *= 1.0 if c is None else float(np.asarray(c).reshape(()))
        if lifted_mask is not None:
            lifted = self._lift_expr(q, k4, v, factor, scale, scale_op, lifted_mask, leaves, softcap or None)
        else:
            lifted = self._lift(q, k4, v, factor, scale, mask, scale_op, mask_kind, softcap or None)
        if isinstance(lifted, str) and lifted_mask is not None:  # the graph's mask nodes are gone: say so
            raise SpecError(f"onnx subgraph {name}: {lifted}")
        if isinstance(lifted, str):
            log.info("onnx subgraph %s runs in the reference evaluator: %s", name, lifted)
            _REPORTS.append({"node": name, "status": "fallback", "reason": lifted, "form": form})
            heads = nk if nk == nv else 1
            kt = np.swapaxes(np.repeat(k4, heads, axis=1), -1, -2) * (1.0 if k_scale is None else k_scale)
            qq = q * (1.0 if q_scale is None else q_scale)
            out = _decomposed_reference(qq.astype(q.dtype), kt.astype(q.dtype), np.repeat(v, heads, axis=1), scale,
                                        mask, scale_op, mask_kind, nan_guard, softcap)  # fmt: skip
            return (out.reshape(shape),)
        call, finite = lifted
        kern = _kernel(call)
        tq, tk, tv = (torch.from_numpy(np.ascontiguousarray(x)) for x in (call.q, call.k, call.v))
        runtime = {n: torch.from_numpy(t) for n, t in call.tensors.items()}
        with torch.no_grad():
            o, lse = kern(tq, tk, tv, return_lse=True, **runtime)
        out = o.numpy().astype(q.dtype)
        empty = np.isneginf(lse.numpy())
        if (finite or fill == "finite") and empty.any():
            # every score of the row is the same finite fill value: the softmax is uniform, the row v's mean
            mean = np.repeat(v.astype(np.float64).mean(axis=2), q.shape[1] // v.shape[1], axis=1)
            out = np.where(empty[..., None], mean[:, :, None, :].astype(q.dtype), out)
        elif not nan_guard:  # softmax over nothing but -inf is NaN
            out[empty] = np.nan
        how = "lifted from the graph" if lifted_mask else f"read by value ({mask_note})" if mask_note else ""
        _REPORTS.append({"node": name, "status": "attncc", "spec": str(call.spec.mask), "target": kern.target,
                         "form": form, "kv_heads": call.spec.num_kv_heads, "mask": how})  # fmt: skip
        if call.spec.score_mod is not None and str(call.spec.score_mod) != "score":
            _REPORTS[-1]["score_mod"] = str(call.spec.score_mod)
        return (out.reshape(shape),)

    @staticmethod
    def _scale(factor: float, scale: np.ndarray | None, scale_op: str) -> float | str:
        """The score scale: the folded q / k factors times the scale step's, or why it is not one positive number."""
        if scale_op:
            if scale is None or scale.size != 1:
                return (
                    f"the scores are scaled by a tensor of shape {None if scale is None else scale.shape}, not a scalar"
                )
            value = float(np.asarray(scale).reshape(()))
            if not np.isfinite(value) or value == 0:
                return f"scale factor {value}"
            factor *= 1.0 / value if scale_op == "div" else value
        if not factor > 0 or not np.isfinite(factor):
            return f"score scale {factor} (attncc's scale is positive)"
        return factor

    @classmethod
    def _lift_expr(
        cls, q: np.ndarray, k: np.ndarray, v: np.ndarray, factor: float, scale: np.ndarray | None, scale_op: str,
        mask: _LiftedMask, leaves: tuple[np.ndarray, ...], softcap: float | None,
    ) -> tuple[Lifted, bool] | str:  # fmt: skip
        """lift() with the mask lifted from the graph: its inputs as runtime tensors (shapes as declared)."""
        if not (q.ndim == k.ndim == v.ndim == 4):
            return f"q, k, v of ranks {q.ndim}, {k.ndim}, {v.ndim} (the lifted form takes [B, H, S, D])"
        got = cls._scale(factor, scale, scale_op)
        if isinstance(got, str):
            return got
        B, H, sq, _ = q.shape
        try:
            np.broadcast_shapes(mask.lifted.shape, (B, H, sq, k.shape[2]))
        except ValueError:
            return f"the lifted mask of shape {mask.lifted.shape} does not broadcast to {(B, H, sq, k.shape[2])}"
        tensors: dict[str, np.ndarray] = dict(mask.lifted.constants)
        for (tname, (graph_name, kind)), leaf in zip(mask.lifted.inputs.items(), leaves, strict=True):
            declared = mask.lifted.input_shapes[graph_name]
            if tuple(leaf.shape) != declared:
                return f"graph input {graph_name!r} has shape {tuple(leaf.shape)}; the model declares {declared}"
            tensors[tname] = np.ascontiguousarray(leaf, np.float32 if kind == "float" else np.int64)
        return _flagged(
            lift(q, k, v, scale=got, softcap=softcap, mask_expr=mask.keep, mask_tensors=tensors), mask.finite
        )

    @classmethod
    def _lift(
        cls, q: np.ndarray, k: np.ndarray, v: np.ndarray, factor: float, scale: np.ndarray | None,
        mask: np.ndarray | None, scale_op: str, mask_kind: str, softcap: float | None,
    ) -> tuple[Lifted, bool] | str:  # fmt: skip
        """The attncc call and whether the mask's masked value is finite (a row with no key then averages v), or
        the reason the subgraph is computed as written."""
        if not (q.ndim == k.ndim == v.ndim == 4):
            return f"q, k, v of ranks {q.ndim}, {k.ndim}, {v.ndim} (the lifted form takes [B, H, S, D])"
        if q.shape[0] != k.shape[0] or k.shape[:3] != v.shape[:3] or q.shape[1] % k.shape[1]:
            return f"batch and head axes of q {q.shape}, k {k.shape}, v {v.shape} do not line up"
        got = cls._scale(factor, scale, scale_op)
        if isinstance(got, str):
            return got
        factor = got
        sq, skv = q.shape[2], k.shape[2]
        keep: np.ndarray | None = None
        finite = False
        if mask_kind == "add" and mask is not None:
            masked = np.unique(mask[mask != 0])
            if masked.size == 0 or (masked.size == 1 and masked[0] <= _HUGE):
                keep, finite = mask == 0, bool(np.isfinite(masked).all() and masked.size)
            elif (mask <= _HUGE).any():
                return "an additive mask with several huge negative values (rows they fill are not plain softmaxes)"
            else:
                return _flagged(lift(q, k, v, attn_mask=mask.astype(np.float32), scale=factor, softcap=softcap), False)
        elif mask_kind and mask is not None:
            keep = mask.astype(bool) if mask_kind == "where_keep" else ~mask.astype(bool)
        if keep is None:
            return _flagged(lift(q, k, v, scale=factor, softcap=softcap), False)
        found = band(keep, sq, skv)
        if found is not None:
            lifted = _band_lift(q, k, v, factor, *found, softcap=softcap)
            if not isinstance(lifted, str):
                return lifted, finite
        return _flagged(lift(q, k, v, attn_mask=keep, scale=factor, softcap=softcap), finite)


def _decomposed_reference(
    q: np.ndarray, kt: np.ndarray, v: np.ndarray, scale: np.ndarray | None, mask: np.ndarray | None,
    scale_op: str, mask_kind: str, nan_guard: int, softcap: float = 0.0,
) -> np.ndarray:  # fmt: skip
    """What the replaced nodes compute, in numpy, for a subgraph attncc does not lift."""
    s = np.matmul(q, kt)
    if scale_op == "div":
        s = s / scale
    elif scale_op == "mul":
        s = s * scale
    if softcap:
        s = np.tanh(s / np.float32(softcap)) * np.float32(softcap)
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
