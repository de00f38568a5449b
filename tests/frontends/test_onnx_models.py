"""ONNX models as exporters write them: tiny transformers models through torch.onnx, and hand-built mask
subgraphs. ``ac.onnx.run`` must equal onnxruntime, with each mask-building subgraph lifted to an attncc
expression (its index part proven per tile) and GQA repeats folded back to kv heads."""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

import attncc as ac
from attncc.errors import SpecError
from attncc.frontends.onnx_masks import NotLifted, lift_mask

transformers = pytest.importorskip("transformers")

F32, I64 = TensorProto.FLOAT, TensorProto.INT64


def _ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return list(session.run(None, feeds))


class _Logits(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def _export_causal_lm(config: object, path: Path, batch: int = 2, seq: int = 12) -> onnx.ModelProto:
    """A random-weight causal LM (nothing downloaded) exported by torch.onnx's TorchScript exporter."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    ids = torch.zeros(batch, seq, dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Logits(model), (ids, torch.ones_like(ids)), str(path), opset_version=17, dynamo=False,
                          input_names=["input_ids", "attention_mask"], output_names=["logits"])  # fmt: skip
    return onnx.load(str(path))


def _feeds(batch: int = 2, seq: int = 12, pad: int = 3) -> dict[str, np.ndarray]:
    """Token ids, and a left-padded second sequence (its first rows see no key but padding)."""
    g = np.random.default_rng(5)
    mask = np.ones((batch, seq), np.int64)
    mask[1, :pad] = 0
    return {"input_ids": g.integers(0, 64, (batch, seq)).astype(np.int64), "attention_mask": mask}


def _small(kind: str, impl: str, **extra: object) -> object:
    common = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}  # fmt: skip
    config = transformers.AutoConfig.for_model(kind, **common, **extra)
    config._attn_implementation = impl
    return config


CAUSAL_PADDED = "(kv <= q) & Ne(attention_mask[b, kv], 0)"
WINDOW_PADDED = "(kv <= q) & (kv >= q - 4) & Ne(attention_mask[b, kv], 0)"
HF_CASES = {
    "llama_sdpa": ("llama", "sdpa", {}, [CAUSAL_PADDED] * 2, None),
    "llama_eager": ("llama", "eager", {}, [CAUSAL_PADDED] * 2, None),
    "mistral_sliding_window": ("mistral", "sdpa", {"sliding_window": 5}, [WINDOW_PADDED] * 2, None),
    "gemma2_softcap_alternating_window": (
        "gemma2", "eager", {"head_dim": 8, "sliding_window": 5, "attn_logit_softcapping": 20.0,
                            "final_logit_softcapping": None},
        [WINDOW_PADDED, CAUSAL_PADDED], "20*tanh(score/20)",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(HF_CASES))
def test_tiny_transformers_models_exported_by_torch_onnx(case: str, tmp_path: Path) -> None:
    """Llama (GQA: 4 query heads over 2 kv heads; SDPA and eager attention), Mistral (sliding window) and Gemma 2
    (softcap; sliding-window and global layers alternate), left padded: every attention site runs on attncc with
    its mask lifted from the mask-building subgraph (causal / window proven, the padding a runtime tensor read per
    key), GQA folded to 2 kv heads; the mask, repeat and cast nodes are gone from the graph; logits equal
    onnxruntime's with the other nodes in the reference evaluator and in onnxruntime."""
    kind, impl, extra, specs, score_mod = HF_CASES[case]
    model = _export_causal_lm(_small(kind, impl, **extra), tmp_path / "m.onnx")
    feeds = _feeds()
    (theirs,) = _ort(model, feeds)
    for runtime in ("reference", "onnxruntime"):  # the other nodes in the onnx reference evaluator / onnxruntime
        ac.onnx.clear_reports()
        (ours,) = ac.onnx.run(model, feeds, runtime=runtime)
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5, err_msg=runtime)
    found = ac.onnx.reports()
    assert [r["spec"] for r in found] == specs
    for report in found:
        assert (report["status"], report["kv_heads"], report["mask"]) == ("attncc", 2, "lifted from the graph")
        assert report.get("score_mod") == score_mod
    left = Counter(n.op_type for n in ac.onnx.rewrite_decomposed(model).graph.node)
    assert left["DecomposedAttention"] == 2
    assert not {"Softmax", "Expand", "LessOrEqual", "And", "Cast", "Flatten"} & set(left), left


def _mask_model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto], inits: list[onnx.TensorProto],
                mask_kind: str = "where_keep", sq: int = 24, skv: int = 24) -> onnx.ModelProto:  # fmt: skip
    """Attention over q, k, v [1, 2, S, 16] whose mask ``mask`` the given nodes compute: Where(mask, s, -inf)
    (``where_keep``) or s + mask (``add``)."""
    scale = helper.make_tensor("scale", F32, [], [0.25])
    ninf = helper.make_tensor("ninf", F32, [], [-np.inf])
    attention = [
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["s0"]),
        helper.make_node("Mul", ["s0", "scale"], ["s1"]),
        helper.make_node("Where", ["mask", "s1", "ninf"], ["s2"])
        if mask_kind == "where_keep"
        else helper.make_node("Add", ["s1", "mask"], ["s2"]),
        helper.make_node("Softmax", ["s2"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["y"]),
    ]
    io = [helper.make_tensor_value_info(n, F32, [1, 2, s, 16]) for n, s in (("q", sq), ("k", skv), ("v", skv))]
    out = helper.make_tensor_value_info("y", F32, [1, 2, sq, 16])
    graph = helper.make_graph([*nodes, *attention], "masked", [*io, *inputs], [out], [*inits, scale, ninf])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _qkv(sq: int = 24, skv: int = 24) -> dict[str, np.ndarray]:
    g = np.random.default_rng(3)
    return {n: g.standard_normal((1, 2, s, 16)).astype(np.float32) for n, s in (("q", sq), ("k", skv), ("v", skv))}


def _ints(name: str, values: list[int], dims: list[int] | None = None) -> onnx.TensorProto:
    return helper.make_tensor(name, I64, [len(values)] if dims is None else dims, values)


def _indices(n: int) -> list[onnx.NodeProto]:
    """rows = Range(0, n)[:, None], cols = Range(0, n)[None, :] (what exporters write for arange)."""
    return [
        helper.make_node("Range", ["zero", f"n{n}", "one"], ["idx"]),
        helper.make_node("Unsqueeze", ["idx", "ax1"], ["rows"]),
        helper.make_node("Unsqueeze", ["idx", "ax0"], ["cols"]),
    ]


INDEX_INITS = [_ints("zero", [0], []), _ints("one", [1], []), _ints("n24", [24], []), _ints("ax0", [0]),
               _ints("ax1", [1])]  # fmt: skip


def test_a_document_mask_built_from_runtime_ids_is_lifted() -> None:
    """mask = doc[q] == doc[kv] with doc a graph input (Unsqueeze, Equal): the expression reads doc per index."""
    nodes = [
        helper.make_node("Unsqueeze", ["doc", "ax1"], ["doc_rows"]),
        helper.make_node("Unsqueeze", ["doc", "ax0"], ["doc_cols"]),
        helper.make_node("Equal", ["doc_rows", "doc_cols"], ["mask"]),
    ]
    doc = helper.make_tensor_value_info("doc", I64, [24])
    model = _mask_model(nodes, [doc], INDEX_INITS)
    feeds = {**_qkv(), "doc": np.repeat(np.arange(4), [5, 7, 3, 9]).astype(np.int64)}
    ac.onnx.clear_reports()
    (ours,) = ac.onnx.run(model, feeds)
    np.testing.assert_allclose(ours, _ort(model, feeds)[0], rtol=1e-5, atol=1e-5)
    report = ac.onnx.reports()[-1]
    assert (report["spec"], report["mask"]) == ("Eq(doc[q], doc[kv])", "lifted from the graph")


def test_a_two_sided_window_from_abs_of_index_differences() -> None:
    """|q - kv| <= 3 from Range, Sub, Abs, LessOrEqual: a band, proven."""
    nodes = [
        *_indices(24),
        helper.make_node("Sub", ["rows", "cols"], ["d"]),
        helper.make_node("Abs", ["d"], ["ad"]),
        helper.make_node("LessOrEqual", ["ad", "w"], ["mask"]),
    ]
    model = _mask_model(nodes, [], [*INDEX_INITS, _ints("w", [3], [])])
    lifted = lift_mask(model, "mask")
    assert str(lifted.expr.sym) in ("(kv <= q + 3) & (kv >= q - 3)", "(kv >= q - 3) & (kv <= q + 3)")
    feeds = _qkv()
    np.testing.assert_allclose(ac.onnx.run(model, feeds)[0], _ort(model, feeds)[0], rtol=1e-5, atol=1e-5)


def test_a_constant_block_mask_becomes_a_block_layout() -> None:
    """A constant boolean mask made of whole 8 x 8 blocks (random) becomes a block layout: a 3 x 3 table read at
    (q // 8, kv // 8), never the 24 x 24 mask; outputs equal onnxruntime's."""
    g = np.random.default_rng(2)
    blocks = g.random((3, 3)) > 0.4
    np.fill_diagonal(blocks, True)
    keep = np.kron(blocks, np.ones((8, 8), bool))
    nodes = [helper.make_node("Identity", ["layout"], ["mask"])]
    layout = helper.make_tensor("layout", TensorProto.BOOL, [24, 24], keep.reshape(-1).tolist())
    model = _mask_model(nodes, [], [layout])
    lifted = lift_mask(model, "mask")
    assert str(lifted.expr.sym) == "Ne(onnx_const0[floor(q/8), floor(kv/8)], 0)"
    assert np.array_equal(lifted.constants["onnx_const0"], blocks)
    feeds = _qkv()
    ac.onnx.clear_reports()
    np.testing.assert_allclose(ac.onnx.run(model, feeds)[0], _ort(model, feeds)[0], rtol=1e-5, atol=1e-5)
    assert ac.onnx.reports()[-1]["mask"] == "lifted from the graph"


def test_a_gathered_padding_mask_with_a_finite_fill() -> None:
    """transformers' vmap form: Gather of the flattened padding mask at b * S + kv, Where(keep, 0, finfo.min)
    added to the scores; a row with no key averages v as the graph's softmax does."""
    fmin = float(np.finfo(np.float32).min)
    nodes = [
        helper.make_node("Cast", ["pad"], ["padb"], to=TensorProto.BOOL),
        helper.make_node("Flatten", ["padb"], ["flat"], axis=2),
        helper.make_node("Gather", ["flat", "at"], ["g"], axis=0),  # [1, 1, 1, 24, 1]
        helper.make_node("Reshape", ["g", "shape4"], ["padkv"]),
        *_indices(24),
        helper.make_node("LessOrEqual", ["cols", "rows"], ["causal"]),
        helper.make_node("And", ["causal", "padkv"], ["keep"]),
        helper.make_node("Where", ["keep", "zero_f", "min_f"], ["mask"]),
    ]
    inits = [*INDEX_INITS, _ints("at", list(range(24)), [1, 1, 1, 24]), _ints("shape4", [1, 1, 1, 24]),
             helper.make_tensor("zero_f", F32, [], [0.0]), helper.make_tensor("min_f", F32, [], [fmin])]  # fmt: skip
    pad = helper.make_tensor_value_info("pad", I64, [1, 24])
    model = _mask_model(nodes, [pad], inits, mask_kind="add")
    padding = np.ones((1, 24), np.int64)
    padding[0, :5] = 0  # rows 0..4 see no key
    feeds = {**_qkv(), "pad": padding}
    ac.onnx.clear_reports()
    (ours,) = ac.onnx.run(model, feeds)
    np.testing.assert_allclose(ours, _ort(model, feeds)[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours[0, :, 0], feeds["v"][0].mean(axis=1), rtol=1e-5)
    assert ac.onnx.reports()[-1]["spec"] == "(kv <= q) & Ne(pad[0, kv], 0)"


def test_a_mask_subgraph_that_does_not_lift_is_read_by_value_and_says_why() -> None:
    """A mask from a CumSum of a graph input: not lifted (reported), its values are read at run time; outputs
    still equal onnxruntime's."""
    nodes = [
        helper.make_node("CumSum", ["bits", "zero"], ["c"]),
        helper.make_node("Unsqueeze", ["c", "ax0"], ["crow"]),
        helper.make_node("Greater", ["crow", "zero"], ["mask"]),
    ]
    bits = helper.make_tensor_value_info("bits", I64, [24])
    model = _mask_model(nodes, [bits], INDEX_INITS)
    with pytest.raises(NotLifted, match="CumSum"):
        lift_mask(model, "mask")
    feeds = {**_qkv(), "bits": (np.arange(24) % 7 == 3).astype(np.int64)}
    ac.onnx.clear_reports()
    (ours,) = ac.onnx.run(model, feeds)
    np.testing.assert_allclose(ours, _ort(model, feeds)[0], rtol=1e-5, atol=1e-5)  # NaN rows agree too
    report = ac.onnx.reports()[-1]
    assert report["status"] == "attncc" and "CumSum" in report["mask"]


def test_bad_feeds_are_named_errors() -> None:
    """A feed of another shape or dtype than the graph declares, a missing or unknown input: a SpecError naming
    it, before anything runs."""
    nodes = [
        helper.make_node("Unsqueeze", ["doc", "ax1"], ["doc_rows"]),
        helper.make_node("Unsqueeze", ["doc", "ax0"], ["doc_cols"]),
        helper.make_node("Equal", ["doc_rows", "doc_cols"], ["mask"]),
    ]
    model = _mask_model(nodes, [helper.make_tensor_value_info("doc", I64, [24])], INDEX_INITS)
    with pytest.raises(SpecError, match=r"input 'doc': shape \(30,\), the graph declares \(24,\)"):
        ac.onnx.run(model, {**_qkv(), "doc": np.zeros(30, np.int64)})
    with pytest.raises(SpecError, match="input 'doc': dtype int32, the graph declares int64"):
        ac.onnx.run(model, {**_qkv(), "doc": np.zeros(24, np.int32)})
    with pytest.raises(SpecError, match="missing doc; unknown docs"):
        ac.onnx.run(model, {**_qkv(), "docs": np.zeros(24, np.int64)})
    model.graph.input.append(helper.make_tensor_value_info("zero", I64, []))  # an initializer feeds may override
    with pytest.raises(SpecError, match="feeds override initializers zero: use runtime='reference'"):
        ac.onnx.run(model, {**_qkv(), "doc": np.zeros(24, np.int64), "zero": np.zeros((), np.int64)},
                    runtime="onnxruntime")  # fmt: skip
    with pytest.raises(ValueError, match="runtime='tvm'"):
        ac.onnx.run(model, {**_qkv(), "doc": np.zeros(24, np.int64)}, runtime="tvm")


def test_three_dimensional_decomposed_attention() -> None:
    """q, k, v as [batch * heads, S, D] (exports that fold heads into the batch) with a [S, S] causal mask built
    from Range: lifted, each of the 4 rows a head."""
    nodes = [
        *_indices(24),
        helper.make_node("LessOrEqual", ["cols", "rows"], ["mask"]),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["s0"]),
        helper.make_node("Div", ["s0", "four"], ["s1"]),
        helper.make_node("Where", ["mask", "s1", "ninf"], ["s2"]),
        helper.make_node("Softmax", ["s2"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["y"]),
    ]
    inits = [*INDEX_INITS, helper.make_tensor("four", F32, [], [4.0]), helper.make_tensor("ninf", F32, [], [-np.inf])]
    io = [helper.make_tensor_value_info(n, F32, [4, 24, 16]) for n in "qkvy"]
    model = helper.make_model(helper.make_graph(nodes, "flat", io[:3], io[3:], inits),
                              opset_imports=[helper.make_opsetid("", 18)])  # fmt: skip
    g = np.random.default_rng(4)
    feeds = {n: g.standard_normal((4, 24, 16)).astype(np.float32) for n in "qkv"}
    ac.onnx.clear_reports()
    (ours,) = ac.onnx.run(model, feeds)
    np.testing.assert_allclose(ours, _ort(model, feeds)[0], rtol=1e-5, atol=1e-5)
    report = ac.onnx.reports()[-1]
    assert (report["status"], report["spec"], report["mask"]) == ("attncc", "kv <= q", "lifted from the graph")


def test_decomposed_attention_over_a_past_kv_cache() -> None:
    """Decoding 8 new tokens after 16 cached ones: K = Concat(past_k, k), the causal mask built from query
    positions Range(16, 24) against key positions Range(0, 24); lifted to kv <= q + 16."""
    nodes = [
        helper.make_node("Concat", ["past_k", "k_new"], ["k"], axis=2),
        helper.make_node("Concat", ["past_v", "v_new"], ["v"], axis=2),
        helper.make_node("Range", ["p16", "n24", "one"], ["qpos"]),
        helper.make_node("Range", ["zero", "n24", "one"], ["kpos"]),
        helper.make_node("Unsqueeze", ["qpos", "ax1"], ["rows"]),
        helper.make_node("Unsqueeze", ["kpos", "ax0"], ["cols"]),
        helper.make_node("LessOrEqual", ["cols", "rows"], ["mask"]),
    ]
    model = _mask_model(nodes, [], [*INDEX_INITS, _ints("p16", [16], [])], sq=8, skv=24)
    graph = model.graph
    kept = [i for i in graph.input if i.name not in ("k", "v")]
    del graph.input[:]
    graph.input.extend(kept)
    for name, s in (("past_k", 16), ("k_new", 8), ("past_v", 16), ("v_new", 8)):
        graph.input.append(helper.make_tensor_value_info(name, F32, [1, 2, s, 16]))
    g = np.random.default_rng(6)
    feeds = {i.name: g.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
             for i in graph.input}  # fmt: skip
    ac.onnx.clear_reports()
    (ours,) = ac.onnx.run(model, feeds)
    np.testing.assert_allclose(ours, _ort(model, feeds)[0], rtol=1e-5, atol=1e-5)
    assert ac.onnx.reports()[-1]["spec"] == "kv <= q + 16"


def test_index_arithmetic_on_runtime_positions() -> None:
    """Masks from a position-id graph input, written the way exporters do: cast to float, halved, cast back (a
    truncation), Mod 3, Equal across rows and columns, or'ed with an integer Div (truncating) block test;
    lifted to one expression reading ``pos`` and equal to onnxruntime."""
    nodes = [
        helper.make_node("Cast", ["pos"], ["pos_f"], to=F32),
        helper.make_node("Div", ["pos_f", "two"], ["half"]),
        helper.make_node("Cast", ["half"], ["half_i"], to=I64),
        helper.make_node("Mod", ["half_i", "three"], ["m"]),
        helper.make_node("Unsqueeze", ["m", "ax1"], ["m_rows"]),
        helper.make_node("Unsqueeze", ["m", "ax0"], ["m_cols"]),
        helper.make_node("Equal", ["m_rows", "m_cols"], ["dilated"]),
        helper.make_node("Div", ["pos", "four"], ["blk"]),
        helper.make_node("Unsqueeze", ["blk", "ax1"], ["b_rows"]),
        helper.make_node("Unsqueeze", ["blk", "ax0"], ["b_cols"]),
        helper.make_node("Equal", ["b_rows", "b_cols"], ["same_block"]),
        helper.make_node("Or", ["dilated", "same_block"], ["mask"]),
    ]
    inits = [*INDEX_INITS, helper.make_tensor("two", F32, [], [2.0]), _ints("three", [3], []), _ints("four", [4], [])]
    model = _mask_model(nodes, [helper.make_tensor_value_info("pos", I64, [24])], inits)
    feeds = {**_qkv(), "pos": np.arange(24, dtype=np.int64) + 5}
    lifted = lift_mask(model, "mask")
    assert set(lifted.inputs) == {"pos"} and not lifted.constants
    ac.onnx.clear_reports()
    np.testing.assert_allclose(ac.onnx.run(model, feeds)[0], _ort(model, feeds)[0], rtol=1e-5, atol=1e-5)
    assert ac.onnx.reports()[-1]["mask"] == "lifted from the graph"


def test_a_constant_mask_without_structure_is_a_runtime_tensor() -> None:
    """A constant boolean mask with no band, index or block structure is read as a tensor (its block map is
    classified per call); outputs equal onnxruntime's."""
    keep = np.random.default_rng(8).random((24, 24)) > 0.5
    np.fill_diagonal(keep, True)
    layout = helper.make_tensor("layout", TensorProto.BOOL, [24, 24], keep.reshape(-1).tolist())
    model = _mask_model([helper.make_node("Identity", ["layout"], ["mask"])], [], [layout])
    lifted = lift_mask(model, "mask")
    assert str(lifted.expr.sym) == "Ne(onnx_const0[q, kv], 0)"
    feeds = _qkv()
    np.testing.assert_allclose(ac.onnx.run(model, feeds)[0], _ort(model, feeds)[0], rtol=1e-5, atol=1e-5)


class _Block(torch.nn.Module):
    """A projection, causal SDPA over 2 heads, a projection: exported with a dynamic sequence axis."""

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        q = (x @ w).view(1, -1, 2, 16).transpose(1, 2)
        y = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        return y.transpose(1, 2).reshape(1, -1, 32) @ w


def test_a_dynamic_sequence_axis_runs_at_every_length(tmp_path: Path) -> None:
    """With a dynamic axis the mask subgraph cannot be lifted at rewrite time (said in the report); its values are
    read per call (a band: causal), and both runtimes (the onnxruntime sessions built at the first call) run other
    lengths on the cached rewrite."""
    w = torch.randn(32, 32, generator=torch.Generator().manual_seed(4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Block(), (torch.randn(1, 20, 32), w), str(tmp_path / "b.onnx"), opset_version=18,
                          dynamo=False, input_names=["x", "w"], dynamic_axes={"x": {1: "S"}})  # fmt: skip
    model = onnx.load(str(tmp_path / "b.onnx"))
    g = np.random.default_rng(9)
    for S in (20, 33):
        feeds = {"x": g.standard_normal((1, S, 32)).astype(np.float32), "w": w.numpy()}
        (theirs,) = _ort(model, feeds)
        for runtime in ("reference", "onnxruntime"):
            (ours,) = ac.onnx.run(model, feeds, runtime=runtime)
            np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4, err_msg=f"{S} {runtime}")
            report = ac.onnx.reports()[-1]
            assert report["spec"] == "kv <= q" and "no static shape" in report["mask"]


def test_lifted_masks_are_kept_per_cached_model_and_freed_with_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rewriting a model again registers no new lifted mask (keys by content); when a cached model is forgotten
    its masks go unless another cached model uses them, and running it again rewrites it."""
    from attncc.frontends import onnx as front

    def doc_model(n: int) -> onnx.ModelProto:
        nodes = [
            helper.make_node("Unsqueeze", ["doc", "ax1"], ["doc_rows"]),
            helper.make_node("Unsqueeze", ["doc", "ax0"], ["doc_cols"]),
            helper.make_node("Equal", ["doc_rows", "doc_cols"], ["same"]),
            *_indices(24),
            helper.make_node("LessOrEqual", ["cols", "rows"], ["causal"]),
            helper.make_node("And" if n else "Or", ["same", "causal"], ["mask"]),
        ]
        return _mask_model(nodes, [helper.make_tensor_value_info("doc", I64, [24])], INDEX_INITS)

    first, second = doc_model(1), doc_model(0)
    ac.onnx.rewrite_decomposed(first)
    before = len(front._MASKS)
    ac.onnx.rewrite_decomposed(first)
    assert len(front._MASKS) == before
    monkeypatch.setattr(front, "_RUNNERS", {})
    monkeypatch.setattr(front, "_MASK_OWNERS", {})
    monkeypatch.setattr(front, "_RUNNERS_KEPT", 1)
    feeds = {**_qkv(), "doc": np.repeat(np.arange(3), 8).astype(np.int64)}
    kept = []
    for model in (first, second, first):
        np.testing.assert_allclose(ac.onnx.run(model, feeds)[0], _ort(model, feeds)[0], rtol=1e-5, atol=1e-5)
        (owned,) = front._MASK_OWNERS.values()
        assert len(owned) == 1 and owned <= set(front._MASKS)
        kept.append(owned)
    assert kept[0] == kept[2] != kept[1]
    assert not kept[1] & set(front._MASKS)  # the second model's mask went with it
    assert ac.onnx.reports()[-1]["spec"] == "(kv <= q) & Eq(doc[q], doc[kv])"


def test_a_constant_reshaped_by_a_graph_input_is_not_lifted() -> None:
    """A constant whose Reshape target is a graph input's values: a named NotLifted (the mask is then read by
    value), not a crash of the lifter."""
    nodes = [helper.make_node("Reshape", ["flat", "shape"], ["mask"])]
    flat = helper.make_tensor("flat", TensorProto.BOOL, [6], [1, 0, 1, 0, 1, 1])
    shape = helper.make_tensor_value_info("shape", I64, [2])
    out = helper.make_tensor_value_info("mask", TensorProto.BOOL, None)
    model = helper.make_model(helper.make_graph(nodes, "g", [shape], [out], [flat]))
    with pytest.raises(NotLifted, match="shape or index operand that depends on a graph input"):
        lift_mask(model, "mask")
