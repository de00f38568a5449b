"""The model-family matrix (issue 16): ``torch.compile(model, backend="attncc")`` on tiny random-weight
Hugging Face models of twelve families, with the "sdpa" and "eager" attention implementations.

Every softmax that reads a product of two activations, and every SDPA call, found by an independent walk
of the graph dynamo hands the backend, must appear in ``ac.dynamo.reports()``: lifted, or a fallback
with a reason. Logits are compared with the same model run in float64 (the independent dense oracle).
One configuration per family runs by default; the rest are marked slow. Nothing is downloaded.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.fx as fx
import transformers as T

import attncc as ac

V = 96  # vocabulary


def _ids(b: int = 2, s: int = 13) -> torch.Tensor:
    return torch.randint(0, V, (b, s), generator=torch.Generator().manual_seed(s))


def _decoder_inputs() -> dict[str, Any]:
    return {"input_ids": _ids(), "use_cache": False}


FAMILIES: dict[str, tuple[Callable[[str], torch.nn.Module], Callable[[], dict[str, Any]]]] = {
    "llama": (lambda impl: T.LlamaForCausalLM(T.LlamaConfig(
        vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, attn_implementation=impl)), _decoder_inputs),
    "mistral": (lambda impl: T.MistralForCausalLM(T.MistralConfig(
        vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=5, max_position_embeddings=128, attn_implementation=impl)),
        _decoder_inputs),
    "gpt2": (lambda impl: T.GPT2LMHeadModel(T.GPT2Config(
        vocab_size=V, n_embd=32, n_layer=2, n_head=2, n_positions=64, attn_implementation=impl)), _decoder_inputs),
    "gpt_neox": (lambda impl: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        rotary_pct=0.5, max_position_embeddings=64, attn_implementation=impl)), _decoder_inputs),
    "gptj": (lambda impl: T.GPTJForCausalLM(T.GPTJConfig(
        vocab_size=V, n_embd=32, n_layer=2, n_head=2, rotary_dim=8, n_positions=64, attn_implementation=impl)),
        _decoder_inputs),
    "bloom": (lambda impl: T.BloomForCausalLM(T.BloomConfig(
        vocab_size=V, hidden_size=32, n_layer=2, n_head=2, attn_implementation=impl)), _decoder_inputs),
    "falcon": (lambda impl: T.FalconForCausalLM(T.FalconConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, alibi=True,
        attn_implementation=impl)), _decoder_inputs),
    "t5": (lambda impl: T.T5ForConditionalGeneration(T.T5Config(
        vocab_size=V, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, relative_attention_num_buckets=8,
        decoder_start_token_id=0, attn_implementation=impl)),
        lambda: {"input_ids": _ids(), "decoder_input_ids": _ids(2, 7), "use_cache": False}),
    "bert": (lambda impl: T.BertModel(T.BertConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        attn_implementation=impl)),
        lambda: {"input_ids": _ids(), "attention_mask": torch.tensor([[1] * 13, [1] * 9 + [0] * 4])}),
    "vit": (lambda impl: T.ViTModel(T.ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, attn_implementation=impl)),
        lambda: {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))}),
    "whisper": (lambda impl: T.WhisperForConditionalGeneration(T.WhisperConfig(
        vocab_size=V, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16,
        max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        attn_implementation=impl)),
        lambda: {"input_features": torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(0)),
                 "decoder_input_ids": _ids(2, 7), "use_cache": False}),
    # multi-head latent attention: q and k of 16 + 8 (rotary) columns, values of 16; dense MLPs (first_k_dense_replace)
    "deepseek_v3": (lambda impl: T.DeepseekV3ForCausalLM(T.DeepseekV3Config(
        vocab_size=V, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, kv_lora_rank=16,
        q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16, first_k_dense_replace=2, n_group=1,
        topk_group=1, max_position_embeddings=128, attn_implementation=impl)), _decoder_inputs),
}  # fmt: skip

# what each family's sites must come to: masks the lifted sites prove, or the fallback reason's words
LIFTED_MASKS = {
    "llama": {"kv <= q"},
    "mistral": {"(kv <= q) & (q <= kv + 4)"},
    "gpt2": {"kv <= q"},
    "gpt_neox": {"kv <= q"},
    "gptj": {"kv <= q"},
    "falcon": None,  # ALiBi read as a runtime bias the graph computes
    "t5": None,  # relative-position bias (+ the decoder's causal mask) as a runtime bias
    "bert": {"Ne(t_l_kwargs_attention_mask_[b, kv], 0)"},
    "vit": {"True"},
    "whisper": {"True", "kv <= q"},  # encoder and cross-attention dense, decoder causal
    "deepseek_v3": {"kv <= q"},
}
FALLBACK = {("bloom", "eager"): "3-d [batch*heads, Sq, Skv] baddbmm"}  # BLOOM has no sdpa implementation
HAS_SDPA = set(FAMILIES) - {"bloom"}
DEFAULT = {(f, "sdpa" if f in HAS_SDPA else "eager") for f in FAMILIES}
CASES = [(f, impl) for f in FAMILIES for impl in ("sdpa", "eager") if impl == "eager" or f in HAS_SDPA]
SDPA = {torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention}
SOFTMAX = {torch.softmax, torch.nn.functional.softmax, torch.Tensor.softmax, "softmax"}
PRODUCTS = {torch.matmul, operator.matmul, torch.bmm, torch.baddbmm, "matmul", "bmm", "baddbmm"}


def _attention_sites(gm: fx.GraphModule) -> list[str]:
    """SDPA calls, and softmaxes within 12 steps of a product of two non-parameter tensors: written here
    independently of attncc's front end."""
    params = {n for n in gm.graph.nodes if n.op == "placeholder" and "parameters" in n.name}

    def reads_product(node: Any, depth: int) -> bool:
        if not isinstance(node, fx.Node) or depth == 0 or node.op == "placeholder":
            return False
        if node.target in PRODUCTS:
            live = [a for a in node.all_input_nodes if a not in params]
            if len(live) >= 2:
                return True
        return any(reads_product(a, depth - 1) for a in node.all_input_nodes)

    found = []
    for node in gm.graph.nodes:
        if (node.op in ("call_function", "call_method") and node.target in SDPA) or (
            node.op in ("call_function", "call_method") and node.target in SOFTMAX and reads_product(node.args[0], 12)
        ):
            found.append(node.name)
    return found


@pytest.mark.parametrize(
    "family,impl",
    [pytest.param(f, i, marks=() if (f, i) in DEFAULT else pytest.mark.slow, id=f"{f}-{i}") for f, i in CASES],
)
def test_family(family: str, impl: str) -> None:
    build, inputs = FAMILIES[family]
    torch.manual_seed(0)
    model = build(impl).eval()
    oracle = build(impl).double().eval()
    oracle.load_state_dict(model.state_dict())
    x = inputs()
    x64 = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in x.items()}

    seen: list[list[str]] = []

    def backend(gm: fx.GraphModule, example_inputs: Any) -> Any:
        seen.append(_attention_sites(gm))
        return ac.dynamo.backend(gm, example_inputs, options={"backend": "eager"})

    torch._dynamo.reset()
    ac.dynamo.clear_reports()
    with torch.no_grad():
        got = torch.compile(model, backend=backend)(**x)
        want = oracle(**x64)
    got_t = got.logits if hasattr(got, "logits") else got.last_hidden_state
    want_t = want.logits if hasattr(want, "logits") else want.last_hidden_state
    torch.testing.assert_close(got_t.double(), want_t, rtol=1e-4, atol=1e-4)

    reports = ac.dynamo.reports()
    expected = [name for names in seen for name in names]
    assert expected, "the walk found no attention: the model or the walk is wrong"
    reported = {r["site"].split(":")[-1] for r in reports}
    assert len(reports) == len(expected), (expected, reports)
    missing = [n for n in expected if n not in reported]
    assert not missing, f"attention sites with no report: {missing}; reports: {reports}"
    if (family, impl) in FALLBACK:
        assert all(r["status"] == "fallback" and FALLBACK[family, impl] in r["reason"] for r in reports), reports
        return
    assert all(r["status"] == "lifted" for r in reports), [r["reason"] for r in reports if r["status"] != "lifted"]
    if family == "gpt_neox":  # rotary_pct 0.5: the rotation stays in the graph, and the reports say so
        assert all("partial rotary embedding (rotary_dim 8 < head_dim 16)" in r["note"] for r in reports), reports
    if family == "gptj":  # partial and interleaved (pairs 2i, 2i+1)
        assert all("interleaved (GPT-J) rotary layout" in r["note"] for r in reports), reports
    if family == "deepseek_v3":  # values narrower than queries and keys, lifted as they are
        assert all((r["head_dim"], r["value_dim"]) == (24, 16) for r in reports), reports
    if LIFTED_MASKS[family] is not None:
        assert {r["mask"] for r in reports} == LIFTED_MASKS[family], reports
