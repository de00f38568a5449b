"""ONNX front end: the ``Attention`` operator (opsets 23-25) lifted to attncc specs and run on attncc kernels.

    outs = ac.onnx.run(model, feeds)      # every graph output, in order; Attention nodes on attncc kernels
    ac.onnx.reports()                     # one dict per Attention node run: node, status, spec or reason
    ac.onnx.sites(model)                  # what each Attention node lifts to, from the graph alone

Every other node runs in the ``onnx`` package's reference evaluator. An ``Attention`` node becomes one
``AttentionSpec`` from its attributes and the inputs it is given: ``is_causal`` (aligned as the specification
says: the query block's causal frontier sits ``past_key``'s length, or ``nonpad_kv_seqlen[b] - q_len``, keys in),
``scale``, ``softcap``, ``q_num_heads`` / ``kv_num_heads`` with 3-D inputs, GQA, boolean and additive
``attn_mask`` of any rank the specification allows (right-aligned broadcasting; a mask shorter than the keys is
padded with False / -inf, as the specification does), ``past_key`` / ``past_value`` with the ``present_*``
outputs, ``nonpad_kv_seqlen``, opset 25's ``left_window_size`` / ``right_window_size``. A boolean mask is a
runtime tensor of the kernel's mask (its block map is classified at call time); an additive mask is a runtime
tensor added to the score after the softcap, as in the specification. Query rows with no visible key return 0.

Not lifted, with the reason logged and reported, the node then running in the reference evaluator: a requested
``qk_matmul_output`` (attncc never materializes the score matrix), ``softmax_precision`` wider than float32
(attncc's softmax is float32 for every input dtype), value heads of another size than query heads, query heads
that are not a multiple of the kv heads, input dtypes other than float32 and float16.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import onnx
import torch
from onnx.reference import ReferenceEvaluator
from onnx.reference.ops.op_attention import Attention as _ReferenceAttention

import attncc as ac
from attncc.dsl import Expr
from attncc.errors import SpecError
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
) -> Lifted | str:
    """The attncc form of one ``Attention`` call (inputs and attributes as the operator has them), or the reason
    it is left to the reference evaluator.

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
    elif past and past == Skv - Sq:
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
        wanted = len(node.output) > 3 and node.output[3] != ""
        lifted = lift(
            Q, K, V, attn_mask, past_key, past_value, nonpad_kv_seqlen, scale=scale, is_causal=is_causal,
            q_num_heads=q_num_heads, kv_num_heads=kv_num_heads, softmax_precision=softmax_precision,
            softcap=softcap, qk_output_wanted=wanted, left_window_size=left_window_size,
            right_window_size=right_window_size,
        )  # fmt: skip
        if isinstance(lifted, str):
            log.info("onnx node %s runs in the reference evaluator: %s", name, lifted)
            _REPORTS.append({"node": name, "status": "fallback", "reason": lifted})
            return cast(tuple[np.ndarray, ...], super()._run(
                Q, K, V, attn_mask, past_key, past_value, nonpad_kv_seqlen, scale=scale, is_causal=is_causal,
                q_num_heads=q_num_heads, kv_num_heads=kv_num_heads, softmax_precision=softmax_precision,
                softcap=softcap, qk_matmul_output_mode=qk_matmul_output_mode, left_window_size=left_window_size,
                right_window_size=right_window_size,
            ))  # fmt: skip
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
    """Run a whole ONNX model: each ``Attention`` node on an attncc kernel where it lifts (see :func:`lift`),
    every other node, and any node that does not lift (reported with the reason), in the ``onnx`` reference
    evaluator. Returns every graph output, in the graph's order.

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
    evaluator = ReferenceEvaluator(model, new_ops=[Attention])
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
