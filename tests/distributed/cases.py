"""The multi-process cases: a spec, its independent float64 oracle (tests/numerics/oracle.py) and inputs
that every process rebuilds identically from a seed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

import attncc as ac
from tests.numerics import oracle


@dataclass(frozen=True)
class Case:
    mode: str  # "heads" | "sequence"
    spec: Callable[[], ac.AttentionSpec]
    keep: Callable[[int, int], oracle.MaskFn]  # (Sq, Skv) -> mask fn
    score: Callable[[dict[str, torch.Tensor]], Any] | None = None  # runtime tensors -> oracle score fn
    runtime: Callable[[int, int], dict[str, torch.Tensor]] = lambda sq, skv: {}
    learned: tuple[str, ...] = ()  # runtime tensors that get gradients
    shape: tuple[int, int, int, int, int] = (2, 4, 4, 96, 96)  # B, H, Hkv, Sq, Skv
    head_dim: int = 16
    value_dim: int = 16  # (v and the output: another width than q and k where a case says so)
    extra: dict[str, Any] = field(default_factory=dict)


WINDOWS = [2, 40, 5, 90, 12, 7, 60, 3]
DOC = [0] * 37 + [1] * 50 + [2] * 13 + [3] * 60 + [4] * 40  # 200 tokens, ragged documents


def _doc_ids(sq: int, skv: int) -> dict[str, torch.Tensor]:
    return {"doc": torch.tensor(DOC[:sq])}


CASES: dict[str, Case] = {
    "heads_mha_causal": Case(
        "heads",
        lambda: ac.AttentionSpec(num_heads=4, head_dim=16, mask=ac.causal()),
        lambda sq, skv: oracle.causal(),
    ),
    "heads_gqa_window_softcap": Case(
        "heads",
        lambda: ac.AttentionSpec(
            num_heads=8, num_kv_heads=4, head_dim=16, mask=ac.sliding_window(20), score_mod=ac.softcap(2.0)
        ),
        lambda sq, skv: oracle.sliding_window(20),
        lambda t: oracle.softcap_fn(2.0),
        shape=(2, 8, 4, 96, 96),
    ),
    "heads_per_head_windows_alibi": Case(
        "heads",
        lambda: ac.AttentionSpec(
            num_heads=8, head_dim=16, mask=ac.sliding_window(ac.per_head(WINDOWS, "w")), score_mod=ac.alibi()
        ),
        lambda sq, skv: oracle.per_head_window(WINDOWS),
        lambda t: oracle.alibi_fn(8),
        shape=(1, 8, 8, 100, 100),
    ),
    "heads_gqa_causal_value_dim": Case(
        "heads",
        lambda: ac.AttentionSpec(num_heads=8, num_kv_heads=4, head_dim=24, value_dim=16, mask=ac.causal()),
        lambda sq, skv: oracle.causal(),
        shape=(1, 8, 4, 80, 80),
        head_dim=24,
    ),
    "heads_document_learned_bias": Case(
        "heads",
        lambda: ac.AttentionSpec(
            num_heads=8,
            num_kv_heads=4,
            head_dim=16,
            mask=ac.document(ac.tensor("doc")),
            score_mod=ac.relative_bias(ac.tensor("table"), 5),
        ),
        lambda sq, skv: oracle.document(DOC[:sq]),
        lambda t: oracle.relative_bias_fn(t["table"], 5),
        lambda sq, skv: {**_doc_ids(sq, skv), "table": torch.randn(8, 11)},
        learned=("table",),
        shape=(1, 8, 4, 120, 120),
    ),
    "seq_causal": Case(
        "sequence",
        lambda: ac.AttentionSpec(num_heads=2, head_dim=16, mask=ac.causal()),
        lambda sq, skv: oracle.causal(),
        shape=(1, 2, 2, 200, 200),
    ),
    "seq_gqa_window_alibi": Case(
        "sequence",
        lambda: ac.AttentionSpec(
            num_heads=4, num_kv_heads=2, head_dim=16, mask=ac.sliding_window(16), score_mod=ac.alibi()
        ),
        lambda sq, skv: oracle.sliding_window(16),
        lambda t: oracle.alibi_fn(4),
        shape=(2, 4, 2, 200, 200),
    ),
    "seq_window_value_dim": Case(
        "sequence",
        lambda: ac.AttentionSpec(num_heads=2, head_dim=8, value_dim=24, mask=ac.sliding_window(30)),
        lambda sq, skv: oracle.sliding_window(30),
        shape=(1, 2, 2, 200, 200),
        head_dim=8,
        value_dim=24,
    ),
    "seq_cross_bottom_right_gqa": Case(
        "sequence",
        lambda: ac.AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=16, mask=ac.causal("bottom_right")),
        lambda sq, skv: oracle.causal_bottom_right(sq, skv),
        shape=(1, 4, 2, 120, 200),
    ),
    "seq_document_learned_bias": Case(
        "sequence",
        lambda: ac.AttentionSpec(
            num_heads=2,
            head_dim=16,
            mask=ac.document(ac.tensor("doc")) & ac.causal(),
            score_mod=ac.relative_bias(ac.tensor("table"), 5),
        ),
        lambda sq, skv: lambda b, h, i, j: DOC[i] == DOC[j] and j <= i,
        lambda t: oracle.relative_bias_fn(t["table"], 5),
        lambda sq, skv: {**_doc_ids(sq, skv), "table": torch.randn(2, 11)},
        learned=("table",),
        shape=(1, 2, 2, 200, 200),
    ),
}


def inputs(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """q, k, v, runtime tensors and the loss weights of a case (float32; the same in every process)."""
    case = CASES[name]
    b, h, hkv, sq, skv = case.shape
    torch.manual_seed(sum(map(ord, name)))
    d, dv = case.head_dim, case.value_dim
    q, k, v = torch.randn(b, h, sq, d), torch.randn(b, hkv, skv, d), torch.randn(b, hkv, skv, dv)
    runtime = case.runtime(sq, skv)
    return q, k, v, runtime, torch.randn(b, h, sq, dv)


def expected(name: str) -> dict[str, torch.Tensor]:
    """The float64 oracle: output, and the gradients of sum(out * w) for q, k, v and the learned tensors."""
    case = CASES[name]
    q, k, v, runtime, w = inputs(name)
    b, h, _, sq, skv = case.shape
    leaves = {n: t.double().requires_grad_() for n, t in (("q", q), ("k", k), ("v", v))}
    rt = {n: t.double().requires_grad_() if n in case.learned else t for n, t in runtime.items()}
    keep = oracle.dense(case.keep(sq, skv), b, h, sq, skv)
    score = case.score(rt) if case.score else None
    out, _ = oracle.attention(leaves["q"], leaves["k"], leaves["v"], keep, case.spec().scale or 0.0, score)
    (out * w.double()).sum().backward()
    grads = {f"grad_{n}": t.grad for n, t in leaves.items()}
    grads |= {f"grad_{n}": rt[n].grad for n in case.learned}
    return {"out": out.detach(), **grads}


# ---- a model block under PyTorch's own tensor parallelism --------------------------------------------------
TP_WINDOWS = [4, 250, 8, 200, 16, 130, 2, 250]  # per-head windows: a contiguous split of heads is unbalanced
TP_HIDDEN, TP_HEADS, TP_KV_HEADS, TP_DIM, TP_LEN = 32, 8, 4, 8, 256


class Block(torch.nn.Module):
    """q/k/v projections, attention, output projection: the shape PyTorch's ColwiseParallel / RowwiseParallel
    split. ``attend(q, k, v)`` takes [B, heads, S, D] and is given the heads the projections produce."""

    def __init__(self, attend: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.q = torch.nn.Linear(TP_HIDDEN, TP_HEADS * TP_DIM)
        self.k = torch.nn.Linear(TP_HIDDEN, TP_KV_HEADS * TP_DIM)
        self.v = torch.nn.Linear(TP_HIDDEN, TP_KV_HEADS * TP_DIM)
        self.o = torch.nn.Linear(TP_HEADS * TP_DIM, TP_HIDDEN)
        self.attend = attend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        heads = lambda t: t.view(b, s, -1, TP_DIM).transpose(1, 2)  # local heads under TP
        out = self.attend(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)))
        return self.o(out.transpose(1, 2).reshape(b, s, -1))


def tp_spec() -> ac.AttentionSpec:
    window = ac.per_head(TP_WINDOWS, "w")
    return ac.AttentionSpec(num_heads=TP_HEADS, num_kv_heads=TP_KV_HEADS, head_dim=TP_DIM,
                            mask=ac.sliding_window(window), score_mod=ac.alibi())  # fmt: skip


def tp_inputs() -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """The block's weights, its input and the loss weights (the same in every process)."""
    torch.manual_seed(7)
    weights = Block(lambda q, k, v: q).state_dict()
    return weights, torch.randn(2, TP_LEN, TP_HIDDEN), torch.randn(2, TP_LEN, TP_HIDDEN)


def tp_expected() -> dict[str, torch.Tensor]:
    """float64 oracle of the unsharded block: output and the gradient of sum(out * w) for x."""
    weights, x, w = tp_inputs()
    keep = oracle.dense(oracle.per_head_window(TP_WINDOWS), 2, TP_HEADS, TP_LEN, TP_LEN)
    scale = 1.0 / TP_DIM**0.5
    block = Block(lambda q, k, v: oracle.attention(q, k, v, keep, scale, oracle.alibi_fn(TP_HEADS))[0]).double()
    block.load_state_dict({n: t.double() for n, t in weights.items()})
    xd = x.double().requires_grad_()
    out = block(xd)
    (out * w.double()).sum().backward()
    return {"out": out.detach(), "grad_x": xd.grad}
