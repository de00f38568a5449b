"""Random calls on the cpu target against the float64 oracle: the combinations no hand-written test lists.

Each case draws a batch, a GQA grouping (with a runtime head table sometimes), a head dim (and in a fifth of the
cases a value head dim of its own), query and key lengths (decoding's few rows up to a ragged prefill), a mask, a
score mod, a dtype, a build (every instruction set this machine runs) and an input layout: contiguous
[B, H, S, D], the [B, S, H, D] layout transposed (HF's), or K and V as the first positions of longer caches. Output,
lse and, in a third of the cases, the gradients of q, k and v (with an lse term) are checked against
``oracle.attention`` on masks written here from their definitions. The default run takes a few dozen cases;
``-m slow`` runs a thousand. A failure prints the case, so it can be replayed by seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

import attncc as ac
from attncc import config
from tests.codegen.test_cpu_target import _isas
from tests.numerics import oracle

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@dataclass
class Case:
    B: int
    H: int
    Hkv: int
    D: int
    Sq: int
    Skv: int
    mask: str
    left: int
    sinks: int
    mod: str
    dtype: torch.dtype
    isa: str
    layout: str
    grad: bool
    table: list[int] | None
    seed: int
    ids: list[int] = field(default_factory=list)
    Dv: int = 0  # v's head size (0: D)


def draw(rng: random.Random, isas: list[str]) -> Case:
    Hkv = rng.choice([1, 2, 3])
    H = Hkv * rng.choice([1, 2, 3, 4, 8])
    Sq = rng.choice([1, 1, 2, 3, 4, 5, 8, 12, 16, 17, 31, 33, 64, 100, 129])
    Skv = rng.choice([1, 5, 16, 63, 64, 65, 129, 200, 300, 513, 1000])
    masks = ["none", "causal_br", "causal_br", "window", "prefix", "sinks"] + ["causal", "document"] * (Sq == Skv)
    table = [rng.randrange(Hkv) for _ in range(H)] if Hkv > 1 and rng.random() < 0.3 else None
    case = Case(rng.choice([1, 1, 2, 3]), H, Hkv, rng.choice([16, 32, 40, 64, 64, 80, 96, 128]), Sq, Skv,
                rng.choice(masks), rng.choice([0, 3, 17, 100]), rng.choice([1, 4, 37]),
                rng.choice(["none", "none", "alibi", "softcap"]),
                rng.choice([torch.float32, torch.float32, torch.float16, torch.bfloat16]), rng.choice(isas),
                rng.choice(["bhsd", "bhsd", "bshd", "cache"]), rng.random() < 0.35, table,
                rng.randrange(1 << 30))  # fmt: skip
    if rng.random() < 0.2:  # values of another width (MLA's 192 / 128, or wider than q and k)
        case.Dv = rng.choice([8, 16, 24, 64, 128])
    if case.mask == "document":
        cuts = rng.sample(range(Sq), min(rng.choice([1, 2, 5]), Sq))
        case.ids = [sum(c <= i for c in cuts) for i in range(Sq)]
    return case


def keep_of(c: Case) -> torch.Tensor:
    """bool [B, H, Sq, Skv] from the masks' definitions (DESIGN.md); bottom-right rows sit at the end of the keys."""
    i, j = torch.arange(c.Sq)[:, None], torch.arange(c.Skv)[None, :]
    end = i + (c.Skv - c.Sq)
    keep = {
        "none": torch.ones(c.Sq, c.Skv, dtype=torch.bool),
        "causal": j <= i,
        "causal_br": j <= end,
        "window": (i - c.left <= j) & (j <= i),
        "prefix": (j < c.sinks) | (j <= i),
        "sinks": (j < c.sinks) | ((i - c.left <= j) & (j <= i)),
    }.get(c.mask)
    if keep is None:  # documents
        ids = torch.tensor(c.ids)
        keep = ids[:, None] == ids[None, :]
    return keep.expand(c.B, c.H, c.Sq, c.Skv)


def spec_of(c: Case) -> ac.AttentionSpec:
    masks: dict[str, Any] = {
        "causal": ac.causal(),
        "causal_br": ac.causal(align="bottom_right"),
        "window": ac.sliding_window(c.left),
        "prefix": ac.prefix_lm(c.sinks),
        "sinks": ac.sinks(c.sinks) | ac.sliding_window(c.left),
        "document": ac.document(ac.tensor("doc")),
    }
    kw: dict[str, Any] = {"mask": masks[c.mask]} if c.mask in masks else {}
    if c.mod != "none":
        kw["score_mod"] = ac.alibi() if c.mod == "alibi" else ac.softcap(20.0)
    if c.table is not None:
        kw["kv_head_of"] = ac.tensor("kv_head_of")
    return ac.AttentionSpec(num_heads=c.H, num_kv_heads=c.Hkv, head_dim=c.D, value_dim=c.Dv or c.D, **kw)


def check(c: Case) -> None:
    g = torch.Generator().manual_seed(c.seed)
    q = torch.randn(c.B, c.H, c.Sq, c.D, generator=g).to(c.dtype)
    k, v = (torch.randn(c.B, c.Hkv, c.Skv, d, generator=g).to(c.dtype) for d in (c.D, c.Dv or c.D))
    tensors = {"doc": torch.tensor(c.ids)} if c.mask == "document" else {}
    if c.table is not None:
        tensors["kv_head_of"] = torch.tensor(c.table)
    if c.layout == "bshd":  # leaves in [B, S, H, D], the call on their transposes
        leaves = [t.transpose(1, 2).contiguous().requires_grad_(c.grad) for t in (q, k, v)]
        args = [t.transpose(1, 2) for t in leaves]
    elif c.layout == "cache":  # K and V: the first Skv positions of caches 37 positions longer
        longer = [torch.cat([t, torch.randn(c.B, c.Hkv, 37, t.shape[3], generator=g).to(c.dtype)], 2) for t in (k, v)]
        leaves = [q.clone().requires_grad_(c.grad), *(t.requires_grad_(c.grad) for t in longer)]
        args = [leaves[0], *(t[:, :, : c.Skv] for t in leaves[1:])]
    else:
        leaves = [t.clone().requires_grad_(c.grad) for t in (q, k, v)]
        args = leaves
    with config.override(cpu_isa=c.isa):
        out, lse = ac.compile(spec_of(c), target="cpu")(*args, return_lse=True, **tensors)
    heads = torch.tensor(c.table) if c.table is not None else torch.arange(c.H) // (c.H // c.Hkv)
    ref = [t.double().requires_grad_(c.grad) for t in (q, k, v)]
    score_fn = {"alibi": oracle.alibi_fn(c.H), "softcap": oracle.softcap_fn(20.0)}.get(c.mod)
    want, want_lse = oracle.attention(ref[0], ref[1][:, heads], ref[2][:, heads], keep_of(c), c.D**-0.5, score_fn)
    tol = TOL[c.dtype]
    assert relative(out, want) < tol, f"out relative error {relative(out, want):.2e} {c}"
    assert torch.equal(lse.isneginf(), want_lse.isneginf()), f"rows without keys {c}"
    seen = want_lse.isfinite()
    torch.testing.assert_close(lse.double()[seen], want_lse[seen], rtol=tol, atol=tol, msg=lambda m: f"lse {c}: {m}")
    if not c.grad:
        return
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad((out.double() * w).sum() + lse[seen].double().sum() / 2, leaves)
    if c.layout == "bshd":
        got = tuple(t.transpose(1, 2) for t in got)
    if c.layout == "cache":
        assert all(bool((t[:, :, c.Skv :] == 0).all()) for t in got[1:]), f"gradient past the view {c}"
        got = (got[0], *(t[:, :, : c.Skv] for t in got[1:]))
    wanted = torch.autograd.grad((want * w).sum() + want_lse[seen].sum() / 2, ref)
    for name, a, b in zip("qkv", got, wanted, strict=True):
        assert relative(a, b) < 2 * tol, f"d{name} relative error {relative(a, b):.2e} {c}"


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    """|got - want| / |want| in the Frobenius norm (0 where both are 0)."""
    got, want = got.detach().double(), want.detach()
    return float((got - want).norm() / want.norm().clamp_min(1e-30)) if want.numel() else 0.0


def _cases(seed: int, n: int) -> list[Case]:
    rng = random.Random(seed)
    return [draw(rng, _isas()) for _ in range(n)]


@pytest.mark.parametrize("case", _cases(2026, 24), ids=lambda c: f"{c.seed}")
def test_random_call_matches_the_oracle(case: Case) -> None:
    check(case)


@pytest.mark.slow
@pytest.mark.parametrize("case", _cases(12, 1000), ids=lambda c: f"{c.seed}")
def test_many_random_calls_match_the_oracle(case: Case) -> None:
    check(case)
