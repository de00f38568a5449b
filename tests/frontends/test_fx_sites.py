"""The FX front end emits each attention site as decomposed IR, one op per step the model wrote, and
the ``fuse`` pass decides what it fuses to (issue 14 item 6). Numerics against the model itself run in
float64 (the independent dense oracle); a chain the fuse pass refuses is reported with its reason."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
import torch.fx as fx

import attncc as ac
from attncc.frontends import fx as fx_frontend
from attncc.ir.text import print_ir


class Chain(torch.nn.Module):
    """softmax(steps(q @ k^T)) @ v with the steps of one model family, in that family's order."""

    def __init__(self, kind: str, n: int = 11, heads: int = 2) -> None:
        super().__init__()
        self.kind = kind
        self.bias = torch.nn.Parameter(torch.randn(heads, n, n) * 0.3)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        s = q @ k.transpose(-2, -1)
        n = q.shape[2]
        keep = torch.ones(n, n, dtype=torch.bool).tril()
        if self.kind == "gemma_softcap":  # scale, softcap, then the mask
            s = torch.tanh(s * 0.25 / 5.0) * 5.0
            s = s.masked_fill(~keep, float("-inf"))
        elif self.kind == "where_finfo_min":  # mask with finfo.min, scale after it
            s = torch.where(keep, s, torch.finfo(s.dtype).min) * 0.25
        elif self.kind == "learned_bias":  # a whole learned [H, S, S] bias added after the scale
            s = s / 4.0 + self.bias
        elif self.kind == "two_masks":  # causal by masked_fill, padding by -inf addition
            pad = torch.arange(n) < n - 3
            s = (s * 0.25).masked_fill(~keep, float("-inf")) + torch.where(pad, 0.0, float("-inf"))
        elif self.kind == "mask_then_softcap":  # the mask does not survive tanh: not one attention
            s = s.masked_fill(~keep, float("-inf"))
            s = torch.tanh(s / 5.0) * 5.0
        p = torch.nn.functional.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.nn.functional.dropout(p, 0.1, self.training) @ v


def _capture(model: torch.nn.Module, *args: torch.Tensor) -> fx.GraphModule:
    graphs: list[fx.GraphModule] = []

    def keep(gm: fx.GraphModule, example_inputs: Any) -> Any:
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=keep)(*args)
    (gm,) = graphs
    return gm


def test_front_end_emits_the_steps_in_the_models_order() -> None:
    q, k, v = (torch.randn(1, 2, 11, 8) for _ in range(3))
    gm = _capture(Chain("gemma_softcap").eval(), q, k, v)
    pv = next(n for n in gm.graph.nodes if fx_frontend.softmax_of(n) is not None)
    site = fx_frontend.decomposed_site(pv)
    assert site is not None
    ops = re.findall(r"= (attn\.\w+)", print_ir(site.graph))
    steps = ops[ops.index("attn.qk") + 1 : ops.index("attn.softmax")]
    assert steps == ["attn.scale", "attn.scale", "attn.score_mod", "attn.scale", "attn.mask"], print_ir(site.graph)


KINDS = {  # kind -> the mask the lifted site reports
    "gemma_softcap": "kv <= q",
    "where_finfo_min": "kv <= q",
    "learned_bias": "True",
    "two_masks": "(kv <= 7) & (kv <= q)",
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_lifted_chains_match_the_model_in_float64(kind: str) -> None:
    model = Chain(kind).eval()
    q, k, v = (torch.randn(2, 2, 11, 8, requires_grad=True) for _ in range(3))
    oracle = Chain(kind).double().eval()
    oracle.load_state_dict(model.state_dict())
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = oracle(*leaves)
    want_grads = torch.autograd.grad(want.square().sum(), [*leaves, oracle.bias], allow_unused=True)

    torch._dynamo.reset()
    ac.dynamo.clear_reports()
    got = torch.compile(model, backend="attncc", options={"backend": "eager"})(q, k, v)
    (site,) = ac.dynamo.reports()
    assert site["status"] == "lifted", site
    assert site["mask"] == KINDS[kind]
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    got_grads = torch.autograd.grad(got.square().sum(), [q, k, v, model.bias], allow_unused=True)
    for g, w in zip(got_grads[:3], want_grads[:3], strict=True):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-5)
    if kind == "learned_bias":
        assert got_grads[3] is not None, "the learned bias read by the kernel gets its gradient"
        torch.testing.assert_close(got_grads[3].double(), want_grads[3], rtol=1e-4, atol=1e-5)


def test_chain_the_fuse_pass_refuses_is_reported_once_with_its_reason() -> None:
    model = Chain("mask_then_softcap").eval()
    q, k, v = (torch.randn(1, 2, 11, 8) for _ in range(3))
    torch._dynamo.reset()
    ac.dynamo.clear_reports()
    got = torch.compile(model, backend="attncc", options={"backend": "eager"})(q, k, v)
    torch.testing.assert_close(got, model(q, k, v))
    (site,) = ac.dynamo.reports()
    assert site["status"] == "fallback" and site["site"].endswith("softmax"), site
    assert "comes after the mask and maps a masked score (-inf) to -1" in site["reason"], site["reason"]


def test_dropout_in_training_is_not_lifted() -> None:
    model = Chain("gemma_softcap").train()
    q, k, v = (torch.randn(1, 2, 11, 8) for _ in range(3))
    torch._dynamo.reset()
    ac.dynamo.clear_reports()
    torch.compile(model, backend="attncc", options={"backend": "eager"})(q, k, v)
    (site,) = ac.dynamo.reports()
    assert site["status"] == "fallback" and "dropout (p=0.1) in training" in site["reason"], site


class DtypeTraps(torch.nn.Module):
    """Mask and bias code whose dtypes change values: ALiBi built in bfloat16 (as Falcon does: slope x
    position rounds above 256), and a relative bucket truncated toward zero by ``.long()`` (not floored)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n = q.shape[2]
        pos = torch.arange(n)
        if self.kind == "bf16_alibi":
            slopes = torch.tensor([0.5, 0.25]).bfloat16()[:, None, None]
            bias = (slopes * pos[None, None, :]).to(q.dtype)  # [H, 1, Skv], rounded to bfloat16
            bias = bias + torch.where(pos[None, :] <= pos[:, None], 0.0, float("-inf"))
        else:  # trunc_bucket: (kv - q) / 3 truncated toward zero, then a per-bucket penalty
            bucket = ((pos[None, :] - pos[:, None]) / 3.0).long()
            bias = -0.25 * bucket.abs().to(q.dtype)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)


@pytest.mark.parametrize("kind", ["bf16_alibi", "trunc_bucket"])
def test_values_a_dtype_changes_are_read_as_the_graph_computes_them(kind: str) -> None:
    q, k, v = (torch.randn(1, 2, 300, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    with torch.no_grad():
        want = DtypeTraps(kind)(q.double(), k.double(), v.double())
        torch._dynamo.reset()
        ac.dynamo.clear_reports()
        got = torch.compile(DtypeTraps(kind), backend="attncc", options={"backend": "eager"})(q, k, v)
    (site,) = ac.dynamo.reports()
    assert site["status"] == "lifted", site
    if kind == "bf16_alibi":
        assert site["mask"] == "kv <= q", "the causal part is still proven"
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


class CachedPrefill(torch.nn.Module):
    """A second prefill chunk: ``n`` new queries at positions past .. past + n - 1 over ``past + n`` cached
    keys; the causal mask built from cache positions (bottom-right aligned), softmax in float32."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n, total = q.shape[2], k.shape[2]
        cache_position = torch.arange(total - n, total)
        keep = torch.arange(total)[None, :] <= cache_position[:, None]
        s = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        s = torch.where(keep, s, torch.finfo(s.dtype).min)
        return torch.nn.functional.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype) @ v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cached_prefill_is_bottom_right_causal_and_half_inputs_lift(dtype: torch.dtype) -> None:
    q = torch.randn(2, 2, 5, 16, generator=torch.Generator().manual_seed(0))
    k, v = (torch.randn(2, 2, 12, 16, generator=torch.Generator().manual_seed(i)) for i in (1, 2))
    with torch.no_grad():
        want = CachedPrefill()(q.double(), k.double(), v.double())
        torch._dynamo.reset()
        ac.dynamo.clear_reports()
        compiled = torch.compile(CachedPrefill(), backend="attncc", options={"backend": "eager"})
        got = compiled(q.to(dtype), k.to(dtype), v.to(dtype))
    (site,) = ac.dynamo.reports()
    assert site["status"] == "lifted" and site["mask"] == "kv <= q + 7", site
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16 inputs and output
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
