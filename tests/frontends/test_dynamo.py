"""torch.compile(model, backend="attncc") on real Hugging Face models (tiny random-weight configs).

Every attention site must be lifted (no fallback), the recovered masks are pinned, and the
logits match eager within float tolerance. Nothing is downloaded.
"""

from __future__ import annotations

import math

import pytest
import torch
import transformers

import attncc as ac

torch.manual_seed(0)


def _compile(model: torch.nn.Module, **options: object) -> torch.nn.Module:
    torch._dynamo.reset()
    ac.dynamo.clear_reports()
    return torch.compile(model, backend="attncc", options={"backend": "eager", **options})


def _sites() -> list[dict]:
    return ac.dynamo.reports()


def _llama(**extra: object) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        attn_implementation="sdpa",
        **extra,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def test_llama_causal_gqa() -> None:
    model = _llama()
    ids = torch.randint(0, 96, (2, 29))
    with torch.no_grad():
        want = model(ids).logits
        got = _compile(model)(ids).logits
    sites = _sites()
    assert len(sites) == 2 and all(s["status"] == "lifted" for s in sites), sites
    assert all(s["mask"] == "kv <= q" for s in sites)
    assert all(s["num_heads"] == 4 and s["num_kv_heads"] == 2 for s in sites), "GQA recovered, k/v not repeated"
    assert all(s["rope"] for s in sites), "q/k rotation moved into the kernel prologue"
    assert not sites[1]["new_kernel"], "the second layer's site shares the first's kernel (Kernel.renamed)"
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_new_lengths_recompile_the_graph_but_reuse_the_kernels() -> None:
    model = _llama()
    compiled = _compile(model)
    with torch.no_grad():
        for n in (17, 23, 31):
            ids = torch.randint(0, 96, (1, n))
            torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
    sites = _sites()
    assert all(s["status"] == "lifted" for s in sites), sites
    later = [s for s in sites if s["compiles"] > 1]
    assert later, "a new length recompiled the graph (counted in the report)"
    assert all(not s["new_kernel"] for s in later), "the length-independent spec reuses its kernel"


def test_dynamic_shapes_lift_a_scale_traced_as_a_tensor_and_check_it_each_call() -> None:
    """``torch.compile(model, dynamic=True)`` passes HF's float ``self.scaling`` to SDPA as ``t.item()`` of a graph
    input: the site is lifted with the traced value (it was kept as is before), every length runs the one graph
    (decoding's steps), and a scale other than the traced one is refused by the lifted op, never run with the old
    one."""
    model = _llama()
    torch._dynamo.reset()
    ac.dynamo.clear_reports()
    compiled = torch.compile(model, backend="attncc", dynamic=True, options={"backend": "eager"})
    with torch.no_grad():
        for n in (17, 23, 31):
            ids = torch.randint(0, 96, (1, n))
            torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
    sites = _sites()
    assert len(sites) == 2 and all(s["status"] == "lifted" for s in sites), sites
    assert all(s["scale"] == pytest.approx(16**-0.5) for s in sites)
    site = max(i for i, (_, _, traced) in ac.dynamo._SITES.items() if traced)
    q, k = torch.randn(1, 4, 5, 16), torch.randn(1, 2, 5, 16)
    named = [torch.zeros(5, 16) for _ in ac.dynamo._SITES[site][1]]  # (the rope tables, unread: refused first)
    with pytest.raises(ac.SpecError, match=r"scale was traced as 0\.25"):
        torch.ops.attncc.attention(q, k, k, site, [*named, torch.tensor(0.5, dtype=torch.float64)])
    model.model.layers[0].self_attn.scaling = 0.5  # (dynamo guards the attribute: a new graph, or the check above)
    ids = torch.randint(0, 96, (1, 19))
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


def test_mistral_sliding_window() -> None:
    cfg = transformers.MistralConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=8,
        max_position_embeddings=256,
        attn_implementation="sdpa",
    )
    model = transformers.MistralForCausalLM(cfg).eval()
    ids = torch.randint(0, 96, (1, 160))
    with torch.no_grad():
        want = model(ids).logits
        got = _compile(model)(ids).logits
    sites = _sites()
    assert sites and all(s["status"] == "lifted" for s in sites), sites
    assert all(s["form"] == "sliding_window(7, 0)" for s in sites), [s["mask"] for s in sites]
    assert all(0 < s["computed_tiles"] < 1 for s in sites), "a 9-key window over 160 tokens skips tiles"
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_llama_padded_batch() -> None:
    model = _llama()
    ids = torch.randint(0, 96, (2, 21))
    attn = torch.ones(2, 21, dtype=torch.long)
    attn[1, 15:] = 0  # right padding on the second sequence
    with torch.no_grad():
        want = model(ids, attention_mask=attn).logits
        got = _compile(model)(ids, attention_mask=attn).logits
    sites = _sites()
    assert sites and all(s["status"] == "lifted" for s in sites), sites
    assert all("kv <= q" in s["mask"] and "t_" in s["mask"] for s in sites), [s["mask"] for s in sites]
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[1, :15], want[1, :15], rtol=1e-4, atol=1e-4)


def test_bert_bidirectional_with_padding() -> None:
    cfg = transformers.BertConfig(
        vocab_size=96,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=64,
        attn_implementation="sdpa",
    )
    model = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, 96, (2, 19))
    attn = torch.ones(2, 19, dtype=torch.long)
    attn[0, 12:] = 0
    with torch.no_grad():
        want = model(ids, attention_mask=attn).last_hidden_state
        got = _compile(model)(ids, attention_mask=attn).last_hidden_state
    sites = _sites()
    assert len(sites) == 2 and all(s["status"] == "lifted" for s in sites), sites
    assert all("kv <= q" not in s["mask"] and "t_" in s["mask"] for s in sites), [s["mask"] for s in sites]
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[0, :12], want[0, :12], rtol=1e-4, atol=1e-4)


class Decomposed(torch.nn.Module):
    """Attention written by hand: matmul, scale, triu mask, softmax, matmul."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads, self.qkv, self.out = heads, torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(d // self.heads)
        future = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)
        scores = scores.masked_fill(future, float("-inf"))
        p = torch.softmax(scores, dim=-1)
        return self.out(torch.matmul(p, v).transpose(1, 2).reshape(b, s, d))


def test_decomposed_pattern_with_triu_causal_mask() -> None:
    model = Decomposed().eval()
    x = torch.randn(2, 23, 32)
    with torch.no_grad():
        want = model(x)
        got = _compile(model)(x)
    sites = _sites()
    assert len(sites) == 1 and sites[0]["status"] == "lifted", sites
    assert sites[0]["mask"] == "kv <= q"
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_mask_code_using_any_traced_torch_op_is_lifted() -> None:
    """Mask-building ops beyond the FX front end's own few (abs, minimum, clamp, full_like, exp2 of a
    distance as an additive bias) go through the FlexAttention tracer's table: one table for both."""

    class Ops(torch.nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            i = torch.arange(q.shape[2])
            dist = (i[:, None] - i[None, :]).abs()
            keep = torch.minimum(dist, torch.full_like(dist, 100)).clamp(0, 50) <= 5
            hidden = torch.full_like(dist, float("-inf"), dtype=torch.float)
            bias = torch.where(keep, -torch.exp2(dist.float() / 4.0), hidden)
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)

    q, k, v = (torch.randn(1, 2, 24, 16) for _ in range(3))
    with torch.no_grad():
        want = Ops()(q, k, v)
        got = _compile(Ops())(q, k, v)
    (site,) = _sites()
    assert site["status"] == "lifted", site
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_unliftable_site_falls_back_with_a_reason() -> None:
    class Dropout(torch.nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.5)

    q = torch.randn(1, 2, 8, 16)
    _compile(Dropout())(q, q, q)
    (site,) = _sites()
    assert site["status"] == "fallback" and "dropout_p=0.5" in site["reason"]


@pytest.mark.slow
def test_llama_with_inductor_for_the_rest() -> None:
    model = _llama()
    ids = torch.randint(0, 96, (1, 17))
    with torch.no_grad():
        want = model(ids).logits
        got = _compile(model, backend="inductor")(ids).logits
    assert all(s["status"] == "lifted" for s in _sites())
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


class RopeAttention(torch.nn.Module):
    """q and k rotated (Hugging Face's apply_rotary_pos_emb) right before causal SDPA; k's tables
    may differ from q's."""

    def __init__(self, heads: int = 2, dim: int = 32) -> None:
        super().__init__()
        self.heads, self.qkv = heads, torch.nn.Linear(dim, 3 * dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_sin: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q = q * cos + _rotate_half(q) * sin
        k = (k * cos) + (_rotate_half(k) * k_sin)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


@pytest.mark.parametrize("same_tables", [True, False], ids=["fused", "different-tables"])
def test_rope_is_fused_only_when_q_and_k_share_tables_and_gradients_match(same_tables: bool) -> None:
    model = RopeAttention()
    x = torch.randn(2, 19, 32)
    angle = torch.arange(19.0)[:, None] * 0.3 ** torch.arange(8.0)
    cos, sin = torch.cat((angle, angle), -1).cos(), torch.cat((angle, angle), -1).sin()
    k_sin = sin if same_tables else -sin
    want = model(x, cos, sin, k_sin)
    (want * torch.arange(16.0)).sum().backward()
    want_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    got = _compile(model)(x, cos, sin, k_sin)
    (got * torch.arange(16.0)).sum().backward()
    (site,) = _sites()
    assert site["status"] == "lifted" and site["rope"] is same_tables, site
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for p, w in zip(model.parameters(), want_grads, strict=True):
        torch.testing.assert_close(p.grad, w, rtol=1e-4, atol=1e-4)


class LearnedRelativeBias(torch.nn.Module):
    """An additive relative-position bias read from a learned table (T5 / Swin style)."""

    def __init__(self, length: int) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(2 * length - 1))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n = q.shape[2]
        i = torch.arange(n)
        bias = self.table[i[:, None] - i[None, :] + n - 1]
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def test_learned_bias_read_by_a_lifted_site_gets_its_gradient() -> None:
    model = LearnedRelativeBias(11)
    q, k, v = (torch.randn(2, 2, 11, 8, requires_grad=True) for _ in range(3))
    want = model(q, k, v)
    want_grads = torch.autograd.grad(want.square().sum(), [q, k, v, model.table])
    got = _compile(model)(q, k, v)
    got_grads = torch.autograd.grad(got.square().sum(), [q, k, v, model.table])
    (site,) = _sites()
    assert site["status"] == "lifted", site
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


class TrainableBlock(torch.nn.Module):
    """Projections around two attention sites: causal SDPA, and SDPA with a learned relative bias."""

    def __init__(self, length: int, dim: int = 32, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)
        self.bias = LearnedRelativeBias(length)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = self.bias(y, k, v)
        return self.out(y.transpose(1, 2).reshape(b, s, d))


@pytest.mark.parametrize("rest", ["inductor", "eager"])
def test_training_steps_through_every_rest_backend_match_eager(rest: str) -> None:
    """Issue 13 item 2: a model in training mode (inputs of lifted sites require grad) compiles with
    Inductor for the rest of the graph, and two optimizer steps give eager's parameters."""
    torch.manual_seed(1)
    model = TrainableBlock(13)
    twin = TrainableBlock(13)
    twin.load_state_dict(model.state_dict())
    compiled = _compile(model, backend=rest)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, twin)]
    for step in range(2):
        x = torch.randn(2, 13, 32, generator=torch.Generator().manual_seed(step))
        for fn, opt in ((compiled, opts[0]), (twin, opts[1])):
            opt.zero_grad()
            fn(x).square().mean().backward()
            opt.step()
    sites = _sites()
    assert len(sites) == 2 and all(s["status"] == "lifted" for s in sites), sites
    for (name, got), want in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert got.grad is not None and got.grad.abs().sum() > 0, name
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)


class DecomposedVariant(torch.nn.Module):
    """Hand-written attention in the shapes issue 13 item 8 found unreported."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind, self.drop = kind, torch.nn.Dropout(0.1)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        scores = q @ k.transpose(-1, -2)
        if self.kind == "tanh_softcap":
            scores = 5.0 * torch.tanh(scores / 4.0 / 5.0)
        elif self.kind == "scale_after_mask":
            keep = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
            scores = scores.masked_fill(~keep, float("-inf")) / 4.0
        else:
            scores = scores / 4.0
        if self.kind == "hf_float32_softmax":
            p = torch.nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        else:
            p = scores.softmax(-1)
        if self.kind == "dropout":
            p = self.drop(p)
        return p @ v


@pytest.mark.parametrize("kind", ["tanh_softcap", "dropout", "scale_after_mask", "hf_float32_softmax"])
def test_attention_sites_are_lifted_or_reported_never_silent(kind: str) -> None:
    model = DecomposedVariant(kind).eval()
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    got = _compile(model)(q, k, v)
    torch.testing.assert_close(got, model(q, k, v))
    (site,) = _sites()
    if site["status"] == "fallback":
        assert "softmax" in site["reason"] and "not lifted" in site["reason"], site
        assert site["site"].endswith(("p", "softmax")), "the report names the softmax's FX node"


def test_softmax_that_is_not_attention_is_not_reported() -> None:
    class Gate(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Linear(16, 4)
            self.experts = torch.nn.Parameter(torch.randn(16, 4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.w(x).softmax(-1) + (x @ self.experts).softmax(-1)

    _compile(Gate())(torch.randn(3, 16))
    assert _sites() == []
