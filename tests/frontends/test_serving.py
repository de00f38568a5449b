"""``model.generate()`` through ``torch.compile(backend="attncc")`` with the dynamic and the static KV cache
(issue 16 item 4): prefill and decode sites lifted, recompiles counted per site, and the tokens equal
greedy decoding by the same model in float64. The static cache is updated in place
(``keys.index_copy_``) by nodes nobody reads: lifting must keep them (FX's dead-code elimination
counts method calls as pure and once dropped them, silently decoding from a stale cache)."""

from __future__ import annotations

import pytest
import torch
import transformers as T

import attncc as ac


def _llama() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = T.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, attn_implementation="sdpa", pad_token_id=0,
    )  # fmt: skip
    model = T.LlamaForCausalLM(cfg).eval()
    model.generation_config.pad_token_id = 0
    return model


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generate_matches_float64_greedy_decoding(cache: str) -> None:
    model, oracle = _llama(), _llama().double()
    oracle.load_state_dict(model.state_dict())
    torch._dynamo.reset()
    ac.dynamo.clear_reports()
    model.forward = torch.compile(model.forward, backend="attncc", options={"backend": "eager"})
    extra = {"cache_implementation": "static"} if cache == "static" else {}
    for n in (9, 14):  # a second prompt length
        ids = torch.randint(3, 96, (1, n), generator=torch.Generator().manual_seed(n))
        got = model.generate(ids, max_new_tokens=5, do_sample=False, **extra)
        want = oracle.generate(ids, max_new_tokens=5, do_sample=False, **extra)
        assert torch.equal(got, want), (cache, n, got, want)
    reports = ac.dynamo.reports()
    assert reports and all(r["status"] == "lifted" for r in reports), [r["reason"] for r in reports]
    masks = {r["mask"] for r in reports}
    assert "kv <= q" in masks, f"prefill is causal: {masks}"
    assert len(masks) > 1, f"decode sites (one query over the cache) are lifted too: {masks}"
    assert max(r["compiles"] for r in reports) >= 2, "recompiles are counted per site"
