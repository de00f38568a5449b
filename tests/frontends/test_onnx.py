"""The ONNX front end: Attention nodes (opsets 23-25) run on attncc kernels, checked against onnxruntime."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

import attncc as ac

B, H, HKV, S, D = 2, 4, 2, 37, 16
F32 = TensorProto.FLOAT
_TYPES = {np.dtype(np.float32): F32, np.dtype(np.float16): TensorProto.FLOAT16, np.dtype(np.bool_): TensorProto.BOOL,
          np.dtype(np.int64): TensorProto.INT64}  # fmt: skip


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _qkv(dtype: type = np.float32, sq: int = S, skv: int = S, seed: int = 0) -> dict[str, np.ndarray]:
    g = _rng(seed)
    return {
        "Q": g.standard_normal((B, H, sq, D)).astype(dtype),
        "K": g.standard_normal((B, HKV, skv, D)).astype(dtype),
        "V": g.standard_normal((B, HKV, skv, D)).astype(dtype),
    }


def attention_model(
    feeds: dict[str, np.ndarray | None], attrs: dict[str, object], outputs: tuple[str, ...] = ("Y",), opset: int = 23
) -> onnx.ModelProto:
    """One Attention node whose inputs are the graph inputs named in ``feeds`` (None: an omitted optional input)."""
    names = [n if x is not None else "" for n, x in feeds.items()]
    while names and not names[-1]:
        names.pop()
    node = helper.make_node("Attention", names, list(outputs), name="attn0", **attrs)
    inputs = [
        helper.make_tensor_value_info(n, _TYPES[x.dtype], list(x.shape)) for n, x in feeds.items() if x is not None
    ]
    elem = _TYPES[next(x for x in feeds.values() if x is not None).dtype]
    outs = [helper.make_tensor_value_info(o, elem, None) for o in outputs if o]
    graph = helper.make_graph([node], "attention", inputs, outs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def both(
    model: onnx.ModelProto, feeds: dict[str, np.ndarray | None], peer: str = "onnxruntime"
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """ac.onnx.run's outputs and the peer's: onnxruntime, or the onnx package's reference evaluator (the
    specification's own implementation) where onnxruntime refuses what the specification allows."""
    given = {n: x for n, x in feeds.items() if x is not None}
    ours = ac.onnx.run(model, given)
    if peer == "reference":
        from onnx.reference import ReferenceEvaluator

        return ours, list(ReferenceEvaluator(model).run(None, given))
    theirs = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, given)
    return ours, list(theirs)


def _close(ours: list[np.ndarray], theirs: list[np.ndarray], tol: float = 2e-5) -> None:
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(a.astype(np.float64), b.astype(np.float64), rtol=tol, atol=tol)


def _mask(shape: tuple[int, ...], seed: int = 1) -> np.ndarray:
    keep = _rng(seed).random(shape) > 0.3
    keep[..., 0] = True  # every row sees a key (fully masked rows are tested on their own)
    return keep


CASES = {
    "causal_gqa": ({}, {"is_causal": 1}),
    "softcap_scale": ({}, {"softcap": 2.0, "scale": 0.3}),
    "bool_mask_2d": ({"attn_mask": _mask((S, S))}, {}),
    "bool_mask_3d_heads": ({"attn_mask": _mask((H, S, S))}, {}),
    "bool_mask_4d_batch": ({"attn_mask": _mask((B, 1, S, S))}, {"is_causal": 1}),
    # shorter than the keys: the specification pads it with False (onnxruntime 1.32 refuses it: the reference)
    "bool_mask_short": ({"attn_mask": _mask((S, S - 5))}, {}),
    "float_mask_4d_causal_softcap": (
        {"attn_mask": _rng(2).standard_normal((B, H, S, S)).astype(np.float32)},
        {"is_causal": 1, "softcap": 5.0},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_attention_node_matches_onnxruntime(case: str) -> None:
    """Masks of every rank the operator allows (bool and additive, broadcast and short), causal, GQA, scale and
    softcap: ``ac.onnx.run`` on an attncc kernel equals onnxruntime."""
    extra, attrs = CASES[case]
    feeds: dict[str, np.ndarray | None] = {**_qkv(), **extra}
    ours, theirs = both(
        attention_model(feeds, attrs), feeds, "reference" if case == "bool_mask_short" else "onnxruntime"
    )
    assert ac.onnx.reports()[-1] | {"spec": ""} == {"node": "attn0", "status": "attncc", "spec": "", "target": "cpu"}
    _close(ours, theirs)


def test_fully_masked_rows_are_zero_as_the_specification_says() -> None:
    feeds: dict[str, np.ndarray | None] = _qkv()
    keep = _mask((B, 1, S, S))
    keep[0, 0, 3] = False  # row 3 of batch 0 sees no key
    bias = np.where(keep, 0.0, -np.inf).astype(np.float32)
    for mask in (keep, bias):
        feeds["attn_mask"] = mask
        ours, theirs = both(attention_model(feeds, {}), feeds)
        assert ac.onnx.reports()[-1]["status"] == "attncc"
        assert not ours[0][0, :, 3].any()
        _close(ours, theirs)


def test_past_key_value_decoding_and_present_outputs() -> None:
    """One new token over a cache: causal frontier at the cache length (bottom-right), present_key / present_value
    the concatenation; the same kernel serves every cache length."""
    g = _rng(3)
    for past in (20, 21):
        feeds: dict[str, np.ndarray | None] = {
            **_qkv(sq=1, skv=1, seed=past),
            "attn_mask": None,
            "past_key": g.standard_normal((B, HKV, past, D)).astype(np.float32),
            "past_value": g.standard_normal((B, HKV, past, D)).astype(np.float32),
        }
        model = attention_model(feeds, {"is_causal": 1}, outputs=("Y", "present_key", "present_value"))
        ours, theirs = both(model, feeds)
        assert ac.onnx.reports()[-1]["status"] == "attncc"
        _close(ours, theirs)
    assert len({key for key in ac.onnx._KERNELS if "offset=Skv-Sq" in key}) == 1


def test_three_dimensional_inputs_with_head_counts() -> None:
    qkv = _qkv()
    feeds: dict[str, np.ndarray | None] = {n: x.transpose(0, 2, 1, 3).reshape(B, S, -1) for n, x in qkv.items()}
    model = attention_model(feeds, {"is_causal": 1, "q_num_heads": H, "kv_num_heads": HKV})
    ours, theirs = both(model, feeds)
    assert ac.onnx.reports()[-1]["status"] == "attncc" and ours[0].shape == (B, S, H * D)
    _close(ours, theirs)


@pytest.mark.parametrize("causal", [0, 1])
def test_nonpad_kv_seqlen_opset_24(causal: int) -> None:
    """Padded batches: keys past nonpad_kv_seqlen[b] are hidden; with is_causal the frontier is per batch."""
    feeds: dict[str, np.ndarray | None] = {
        **_qkv(),
        "attn_mask": None,
        "past_key": None,
        "past_value": None,
        "nonpad_kv_seqlen": np.array([30, 12], np.int64),
    }
    ours, theirs = both(attention_model(feeds, {"is_causal": causal}, opset=24), feeds)
    assert ac.onnx.reports()[-1]["status"] == "attncc"
    _close(ours, theirs)


@pytest.mark.parametrize(
    "attrs", [{"is_causal": 1, "left_window_size": 5}, {"left_window_size": 3, "right_window_size": 2}]
)
def test_sliding_windows_opset_25(attrs: dict[str, int]) -> None:
    feeds: dict[str, np.ndarray | None] = _qkv()
    ours, theirs = both(attention_model(feeds, attrs, opset=25), feeds)
    assert ac.onnx.reports()[-1]["status"] == "attncc"
    _close(ours, theirs)


def test_float16_inputs() -> None:
    feeds: dict[str, np.ndarray | None] = _qkv(np.float16)
    ours, theirs = both(attention_model(feeds, {"is_causal": 1}), feeds)
    assert ac.onnx.reports()[-1]["status"] == "attncc" and ours[0].dtype == np.float16
    _close(ours, theirs, tol=2e-3)


@pytest.mark.parametrize("dims", [3, 4])
def test_value_heads_of_another_size(dims: int) -> None:
    """V's head size (the operator's v_head_size) differs from Q's and K's: lifted, with a decoding cache too."""
    g = _rng(5)
    feeds: dict[str, np.ndarray | None] = {
        "Q": g.standard_normal((B, H, 1, D)).astype(np.float32),
        "K": g.standard_normal((B, HKV, 1, D)).astype(np.float32),
        "V": g.standard_normal((B, HKV, 1, D // 2)).astype(np.float32),
        "attn_mask": None,
        "past_key": g.standard_normal((B, HKV, 20, D)).astype(np.float32),
        "past_value": g.standard_normal((B, HKV, 20, D // 2)).astype(np.float32),
    }
    attrs: dict[str, object] = {"is_causal": 1}
    if dims == 3:
        for n in "QKV":
            feeds[n] = feeds[n].transpose(0, 2, 1, 3).reshape(B, 1, -1)  # type: ignore[union-attr]
        attrs |= {"q_num_heads": H, "kv_num_heads": HKV}
    model = attention_model(feeds, attrs, outputs=("Y", "present_key", "present_value"))
    ours, theirs = both(model, feeds)
    assert ac.onnx.reports()[-1]["status"] == "attncc", ac.onnx.reports()[-1]
    assert ours[0].shape == ((B, 1, H * D // 2) if dims == 3 else (B, H, 1, D // 2))
    _close(ours, theirs)


@pytest.mark.parametrize(
    ("attrs", "outputs", "reason"),
    [
        ({}, ("Y", "", "", "qk"), "qk_matmul_output is requested"),
        ({"softmax_precision": TensorProto.DOUBLE}, ("Y",), "softmax_precision DOUBLE"),
    ],
)
def test_what_does_not_lift_runs_in_the_reference_evaluator_and_says_why(
    attrs: dict[str, int], outputs: tuple[str, ...], reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    feeds: dict[str, np.ndarray | None] = _qkv()
    model = attention_model(feeds, attrs, outputs=outputs)
    with caplog.at_level(logging.INFO, logger="attncc.onnx"):
        ours = ac.onnx.run(model, {n: x for n, x in feeds.items() if x is not None})
    report = ac.onnx.reports()[-1]
    assert report["status"] == "fallback" and reason in report["reason"]
    assert any("attn0" in r.getMessage() and reason in r.getMessage() for r in caplog.records)
    from onnx.reference import ReferenceEvaluator

    want = ReferenceEvaluator(model).run(None, {n: x for n, x in feeds.items() if x is not None})
    _close(ours, list(want))


def transformer_block(dim: int = 32, heads: int = 4, kv_heads: int = 2, seq: int = 19) -> onnx.ModelProto:
    """A pre-norm-free attention block as exporters write it at opset 23: projections (MatMul), the Attention node
    on 3-D inputs with head counts, the output projection and a residual Add. Random weights, nothing downloaded."""
    g = _rng(7)
    hd = dim // heads

    def weight(name: str, cols: int) -> onnx.TensorProto:
        return helper.make_tensor(name, F32, [dim, cols], (g.standard_normal((dim, cols)) / dim**0.5).ravel().tolist())

    inits = [weight("wq", dim), weight("wk", kv_heads * hd), weight("wv", kv_heads * hd), weight("wo", dim)]
    attn = helper.make_node(
        "Attention", ["q", "k", "v"], ["a"], name="block.attn", is_causal=1, q_num_heads=heads, kv_num_heads=kv_heads
    )
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"]),
        helper.make_node("MatMul", ["x", "wk"], ["k"]),
        helper.make_node("MatMul", ["x", "wv"], ["v"]),
        attn,
        helper.make_node("MatMul", ["a", "wo"], ["proj"]),
        helper.make_node("Add", ["x", "proj"], ["y"]),
    ]
    outs = [helper.make_tensor_value_info(n, F32, [2, seq, dim]) for n in ("y", "a")]
    graph = helper.make_graph(
        nodes, "block", [helper.make_tensor_value_info("x", F32, [2, seq, dim])], outs, initializer=inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_a_whole_model_runs_with_its_attention_on_attncc() -> None:
    model = transformer_block()
    x = _rng(8).standard_normal((2, 19, 32)).astype(np.float32)
    ours, theirs = both(model, {"x": x})
    assert ac.onnx.reports()[-1] == {"node": "block.attn", "status": "attncc", "spec": "kv <= q", "target": "cpu"}
    _close(ours, theirs)
    staged = ac.onnx.run(model, {"x": x}, runtime="onnxruntime")  # projections in onnxruntime, attention attncc
    assert ac.onnx.reports()[-1]["status"] == "attncc"
    _close(staged, theirs)


def test_a_graph_without_attention_runs_unchanged() -> None:
    node = helper.make_node("Softmax", ["x"], ["y"], axis=-1)
    io = [helper.make_tensor_value_info(n, F32, [3, 5]) for n in "xy"]
    model = helper.make_model(
        helper.make_graph([node], "g", io[:1], io[1:]), opset_imports=[helper.make_opsetid("", 23)]
    )
    x = _rng(9).standard_normal((3, 5)).astype(np.float32)
    before = len(ac.onnx.reports())
    ours, theirs = both(model, {"x": x})
    assert len(ac.onnx.reports()) == before  # nothing was attention
    _close(ours, theirs)


def test_sites_and_the_cli_list_the_attention_nodes(tmp_path: Path) -> None:
    model = transformer_block()
    (site,) = ac.onnx.sites(model)
    assert site["node"] == "block.attn" and site["opset"] == 23 and site["index"] == 3
    assert site["attributes"] == {"is_causal": 1, "q_num_heads": 4, "kv_num_heads": 2}
    assert site["inputs"] == {"q": (2, 19, 32), "k": (2, 19, 16), "v": (2, 19, 16)}
    path = tmp_path / "block.onnx"
    onnx.save(model, path)
    done = subprocess.run([sys.executable, "-m", "attncc.cli", "onnx", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "block.attn" in done.stdout and "mask: kv <= q" in done.stdout and "computed (" in done.stdout


# ---- decomposed attention, as torch.onnx's TorchScript exporter writes it ----
class _Sdpa(torch.nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


class _SdpaMask(torch.nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m)


class _MaskedFill(torch.nn.Module):
    """Hand-written attention: Div by a constant, masked_fill with -inf (Where), softmax, matmul."""

    def __init__(self, keep: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("keep", keep)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        s = (q @ k.transpose(-1, -2) / 4.0).masked_fill(~self.keep, float("-inf"))
        return torch.softmax(s, dim=-1) @ v


class _Plain(torch.nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.softmax(q @ k.transpose(-1, -2) * 0.25, dim=-1) @ v


def exported(module: torch.nn.Module, args: tuple[torch.Tensor, ...], path: Path) -> onnx.ModelProto:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(module, args, str(path), opset_version=18, dynamo=False)
    return onnx.load(str(path))


def _tensors(sq: int = 40, seed: int = 11) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, 3, sq, 16, generator=g) for _ in range(3))


CAUSAL = torch.ones(40, 40, dtype=torch.bool).tril()
DECOMPOSED = {
    "sdpa_is_causal": (_Sdpa(), (), "qk-mask-softmax-pv", "kv <= q"),
    "sdpa_bool_mask": (_SdpaMask(), (torch.rand(40, 40, generator=torch.Generator().manual_seed(1)) > 0.3,),
                       "qk-mask-softmax-guard-pv", "Ne(attn_mask[0, 0, q, kv], 0)"),
    "sdpa_float_mask": (_SdpaMask(), (torch.randn(40, 40, generator=torch.Generator().manual_seed(2)),),
                        "qk-mask-softmax-pv", "True"),  # a runtime bias: score + attn_bias[0, 0, q, kv]
    "masked_fill_causal": (_MaskedFill(CAUSAL), (), "qk-scale-mask-softmax-pv", "kv <= q"),
    "no_mask": (_Plain(), (), "qk-scale-softmax-pv", "True"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(DECOMPOSED))
def test_decomposed_attention_from_torch_onnx_export(case: str, tmp_path: Path) -> None:
    """Models exported by torch.onnx (TorchScript exporter, opset 18: MatMul, scale, mask Add/Where, Softmax,
    MatMul): the subgraph is found with networkx's matcher, runs on attncc, and a mask whose values are exactly
    causal becomes ``ac.causal()`` (its sparsity proven); outputs equal onnxruntime's."""
    module, extra, form, spec = DECOMPOSED[case]
    args = (*_tensors(), *extra)
    model = exported(module, args, tmp_path / "m.onnx")
    (found,) = ac.onnx.find_decomposed(model)
    assert found.attributes["form"] == form and found.reason is None
    feeds = {i.name: a.numpy() for i, a in zip(model.graph.input, args, strict=True)}
    ours, theirs = both(model, feeds)
    report = ac.onnx.reports()[-1]
    assert (report["status"], report["form"], report["spec"]) == ("attncc", form, spec)
    _close(ours, theirs)


def test_decomposed_rows_with_no_key_keep_the_graph_semantics(tmp_path: Path) -> None:
    """A row that sees no key is NaN after a plain softmax (as onnxruntime computes it) and 0 under SDPA's NaN
    guard: attncc returns the same."""
    keep = CAUSAL.clone()
    keep[5] = False
    for module, extra in ((_MaskedFill(keep), ()), (_SdpaMask(), (keep,))):
        args = (*_tensors(), *extra)
        model = exported(module, args, tmp_path / "m.onnx")
        feeds = {i.name: a.numpy() for i, a in zip(model.graph.input, args, strict=True)}
        ours, theirs = both(model, feeds)
        assert ac.onnx.reports()[-1]["status"] == "attncc"
        assert np.array_equal(np.isnan(ours[0]), np.isnan(theirs[0]))
        np.testing.assert_allclose(np.nan_to_num(ours[0]), np.nan_to_num(theirs[0]), rtol=2e-5, atol=2e-5)


def test_a_softmax_read_elsewhere_is_not_rewritten(tmp_path: Path) -> None:
    """The probabilities are also a graph output: the subgraph stays as it is (nothing is matched) and the model
    still runs."""
    args = _tensors()
    model = exported(_Plain(), args, tmp_path / "m.onnx")
    softmax = next(n for n in model.graph.node if n.op_type == "Softmax")
    model.graph.output.append(helper.make_tensor_value_info(softmax.output[0], F32, None))
    assert ac.onnx.find_decomposed(model) == []
    feeds = {i.name: a.numpy() for i, a in zip(model.graph.input, args, strict=True)}
    ours, theirs = both(model, feeds)
    _close(ours, theirs)


def test_a_decomposed_subgraph_that_does_not_lift_is_computed_as_written() -> None:
    """Scores scaled per head (a [1, H, 1, 1] tensor, not one scale): matched, not lifted, reported with the
    reason, and computed as the graph says."""
    nodes = [
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["s"]),
        helper.make_node("Mul", ["s", "per_head"], ["ss"]),
        helper.make_node("Softmax", ["ss"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["y"]),
    ]
    per_head = helper.make_tensor("per_head", F32, [1, 3, 1, 1], [0.1, 0.2, 0.3])
    io = [helper.make_tensor_value_info(n, F32, [2, 3, 40, 16]) for n in ("q", "k", "v", "y")]
    graph = helper.make_graph(nodes, "per_head_scale", io[:3], io[3:], initializer=[per_head])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    (found,) = ac.onnx.find_decomposed(model)
    assert found.attributes == {"form": "qk-scale-softmax-pv", "scale_op": "mul", "k_input": "k"}  # transpose folded
    feeds = {n: t.numpy() for n, t in zip("qkv", _tensors(), strict=True)}
    ours, theirs = both(model, feeds)
    report = ac.onnx.reports()[-1]
    assert report["status"] == "fallback" and "not a scalar" in report["reason"]
    _close(ours, theirs)


def test_the_cli_lists_decomposed_subgraphs(tmp_path: Path) -> None:
    exported(_Sdpa(), _tensors(), tmp_path / "sdpa.onnx")
    done = subprocess.run(
        [sys.executable, "-m", "attncc.cli", "onnx", str(tmp_path / "sdpa.onnx")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "0 Attention node(s)" in done.stdout and "1 decomposed attention subgraph(s)" in done.stdout
    assert "form qk-mask-softmax-pv" in done.stdout


# ---- export: a spec as an ONNX model, round trip through onnxruntime ----
N = 48
EXPORT_MASKS = {
    "none": None,
    "causal": ac.causal(),
    "causal_window": ac.causal() & ac.sliding_window(7),
    "bottom_right": ac.causal(align="bottom_right"),
    "sliding_two_sided": ac.sliding_window(5, 3),
    "prefix_lm": ac.prefix_lm(10),
    "dilated": ac.dilated_window(8, 2),
    "neighborhood_1d": ac.neighborhood((48,), (5,)),
    "neighborhood_2d": ac.neighborhood((6, 8), (3, 3), dilation=(1, 2)),
    "neighborhood_3d_causal": ac.neighborhood((3, 4, 4), (3, 3, 3), causal=(True, False, False)),
    "block_local": ac.block_local((6, 8), (3, 4)),
    "grid": ac.grid_attention((6, 8), (2, 2)),
    "sinks": ac.sinks(4) | ac.sliding_window(5),
    "per_head_windows": ac.sliding_window(ac.per_head([3, 6, 12, 24], name="window")),
    "document": ac.document(ac.tensor("doc")),
}
EXPORT_MODS = {"none": None, "softcap": ac.softcap(3.0), "alibi": ac.alibi()}


@pytest.mark.parametrize("mod", list(EXPORT_MODS))
@pytest.mark.parametrize("mask", list(EXPORT_MASKS))
def test_export_round_trips_through_onnxruntime(mask: str, mod: str, tmp_path: Path) -> None:
    """Every builtin mask and score mod: ``ac.onnx.export`` writes the Attention operator where it can (no mask,
    causal, causal windows; softcap) and a decomposed graph computing the mask from indices otherwise; the file
    passes the checker with full shape inference, holds no N x N constant, and onnxruntime's output equals the
    attncc kernel's (GQA 4 over 2 heads)."""
    spec = ac.AttentionSpec(
        num_heads=4, num_kv_heads=2, head_dim=16, mask=EXPORT_MASKS[mask], score_mod=EXPORT_MODS[mod]
    )
    path = tmp_path / "spec.onnx"
    model = ac.onnx.export(spec, path, N, N)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    ops = [n.op_type for n in model.graph.node]
    operator = mask in ("none", "causal", "causal_window") and mod != "alibi"
    assert (ops == ["Attention"]) == operator, ops
    assert all(np.prod(t.dims) < N * N for t in model.graph.initializer)  # no materialized mask
    g = _rng(21)
    q = g.standard_normal((2, 4, N, 16)).astype(np.float32)
    k, v = (g.standard_normal((2, 2, N, 16)).astype(np.float32) for _ in range(2))
    feeds = {"q": q, "k": k, "v": v}
    runtime = {}
    if mask == "document":
        feeds["doc"] = (np.arange(N) // 13).astype(np.int64)
        runtime["doc"] = torch.from_numpy(feeds["doc"])
    (got,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)
    kern = ac.compile(spec, target="cpu")
    want = kern(*(torch.from_numpy(x) for x in (q, k, v)), **runtime).numpy()
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("mask", ["causal", "prefix_lm"])
def test_export_writes_values_of_another_width(mask: str, tmp_path: Path) -> None:
    """value_dim != head_dim: the Attention operator and the decomposed graph (GQA repeat included) both carry
    v's width; onnxruntime's output equals the kernel's and ``ac.onnx.run`` lifts the file back."""
    spec = ac.AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=16, value_dim=24, mask=EXPORT_MASKS[mask])
    model = ac.onnx.export(spec, tmp_path / "spec.onnx", N, N)
    g = _rng(22)
    q, k = g.standard_normal((2, 4, N, 16)).astype(np.float32), g.standard_normal((2, 2, N, 16)).astype(np.float32)
    feeds = {"q": q, "k": k, "v": g.standard_normal((2, 2, N, 24)).astype(np.float32)}
    (got,) = ort.InferenceSession(str(tmp_path / "spec.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)
    want = ac.compile(spec, target="cpu")(*(torch.from_numpy(x) for x in feeds.values())).numpy()
    assert got.shape == (2, 4, N, 24)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    (lifted,) = ac.onnx.run(model, feeds)
    assert ac.onnx.reports()[-1]["status"] == "attncc", ac.onnx.reports()[-1]
    np.testing.assert_allclose(lifted, want, rtol=2e-5, atol=2e-5)


def test_export_refuses_what_it_cannot_write_yet(tmp_path: Path) -> None:
    spec = ac.AttentionSpec(num_heads=2, head_dim=8, score_mod=ac.relative_bias(ac.tensor("table"), 8))
    with pytest.raises(ac.AttnccError, match="2-D tensor"):
        ac.onnx.export(spec, tmp_path / "x.onnx", 16, 16)


@pytest.mark.parametrize(
    ("name", "keep", "spec"),
    [
        ("sliding_window", CAUSAL & ~torch.ones(40, 40, dtype=torch.bool).tril(-8), "(kv <= q) & (kv >= q - 7)"),
        ("two_sided", torch.ones(40, 40, dtype=torch.bool).tril(3) & ~torch.ones(40, 40, dtype=torch.bool).tril(-5),
         "(kv >= q - 4) & (kv <= q + 3)"),
    ],
)  # fmt: skip
def test_a_band_mask_of_a_decomposed_graph_becomes_a_window(
    name: str, keep: torch.Tensor, spec: str, tmp_path: Path
) -> None:
    """A mask computed in the graph that keeps exactly lo <= kv - q <= hi is lifted to causal / window expressions
    (its tiles proven), not a runtime mask; outputs equal onnxruntime's."""
    args = (*_tensors(), keep)
    model = exported(_SdpaMask(), args, tmp_path / f"{name}.onnx")
    feeds = {i.name: a.numpy() for i, a in zip(model.graph.input, args, strict=True)}
    ours, theirs = both(model, feeds)
    report = ac.onnx.reports()[-1]
    assert (report["status"], report["spec"]) == ("attncc", spec)
    _close(ours, theirs)


def test_a_softmax_over_another_axis_is_not_attention() -> None:
    """Softmax before opset 13 without an axis runs over axis 1 (a flattened tail): not matched."""
    nodes = [
        helper.make_node("MatMul", ["q", "kt"], ["s"]),
        helper.make_node("Softmax", ["s"], ["p"]),
        helper.make_node("MatMul", ["p", "v"], ["y"]),
    ]
    io = [helper.make_tensor_value_info(n, F32, [2, 3, 8, 8]) for n in ("q", "kt", "v", "y")]
    for opset, matched in ((12, 0), (13, 1)):
        model = helper.make_model(
            helper.make_graph(nodes, "g", io[:3], io[3:]), opset_imports=[helper.make_opsetid("", opset)]
        )
        assert len(ac.onnx.find_decomposed(model)) == matched
