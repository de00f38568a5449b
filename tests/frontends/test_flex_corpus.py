"""A corpus of mask_mod / score_mod functions written the way FlexAttention users write them (issue 21).

Each is traced unchanged, run on the cpu and reference targets, and compared with an oracle that
never touches attncc: masks evaluated by torch's own ``create_mask`` (FlexAttention's vmap over
the grid), score mods evaluated on broadcast index tensors, attention by a float64 softmax. Block
maps are checked sound (every tile with a visible pair is computed; a tile called full is full)
against the same dense evaluation, and tight (no empty tile computed) where the analysis is exact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch.nn.attention.flex_attention import and_masks, create_mask, noop_mask, or_masks

import attncc as ac
from tests.numerics import oracle
from tests.numerics.brute import tile_states

H, D, TILES = 4, 16, (16, 16)


@dataclass
class Case:
    name: str
    seq: int
    mask: Callable[..., Any] | None = None
    score: Callable[..., Any] | None = None
    tight: bool = True  # the block map is exact (no empty tile computed)
    heads: int = H
    extra: dict[str, Any] = field(default_factory=dict)


def causal(b, h, q_idx, kv_idx):  # type: ignore[no-untyped-def]
    return q_idx >= kv_idx


def sliding_window(window: int):  # type: ignore[no-untyped-def]
    def mask(b, h, q_idx, kv_idx):  # type: ignore[no-untyped-def]
        return (q_idx - kv_idx).abs() <= window

    return mask


def prefix_lm(prefix: int):  # type: ignore[no-untyped-def]
    def mask(b, h, q_idx, kv_idx):  # type: ignore[no-untyped-def]
        return kv_idx < prefix

    return mask


LENGTHS = torch.tensor([10, 23, 7, 24])
DOC = torch.repeat_interleave(torch.arange(len(LENGTHS)), LENGTHS)  # 64 tokens in 4 documents
OFFSETS = torch.cat([torch.zeros(1, dtype=torch.long), LENGTHS.cumsum(0)[:-1]])


def document_causal(b, h, q_idx, kv_idx):  # type: ignore[no-untyped-def]
    same = DOC[q_idx] == DOC[kv_idx]
    q_logical = q_idx - OFFSETS[DOC[q_idx]]  # positions within the document, from offsets
    kv_logical = kv_idx - OFFSETS[DOC[kv_idx]]
    return same & (q_logical >= kv_logical)


def natten_2d(width: int, kernel: int):  # type: ignore[no-untyped-def]
    def mask(b, h, q_idx, kv_idx):  # type: ignore[no-untyped-def]
        qx, qy = q_idx % width, q_idx // width
        kx, ky = kv_idx % width, kv_idx // width
        cx = qx.clamp(kernel // 2, (width - 1) - kernel // 2)  # the window shifts inward at the borders
        cy = qy.clamp(kernel // 2, (width - 1) - kernel // 2)
        return ((cx - kx).abs() <= kernel // 2) & ((cy - ky).abs() <= kernel // 2)

    return mask


def natten_3d(t: int, hh: int, w: int, kernel: int):  # type: ignore[no-untyped-def]
    def mask(b, h, q_idx, kv_idx):  # type: ignore[no-untyped-def]
        def coords(i):  # type: ignore[no-untyped-def]
            return i // (hh * w), (i // w) % hh, i % w

        ok = q_idx >= 0
        for qa, ka, n in zip(coords(q_idx), coords(kv_idx), (t, hh, w)):
            center = torch.clamp(qa, kernel // 2, n - 1 - kernel // 2)
            ok = ok & (torch.abs(center - ka) <= kernel // 2)
        return ok

    return mask


def morton_neighbors(b, h, q_idx, kv_idx):  # type: ignore[no-untyped-def]
    def decode(i):  # type: ignore[no-untyped-def]  # Morton (Z-order) index -> (x, y) on an 8 x 8 grid
        x = (i % 2) + ((i // 4) % 2) * 2 + ((i // 16) % 2) * 4
        y = ((i // 2) % 2) + ((i // 8) % 2) * 2 + ((i // 32) % 2) * 4
        return x, y

    (qx, qy), (kx, ky) = decode(q_idx), decode(kv_idx)
    return ((qx - kx).abs() <= 1) & ((qy - ky).abs() <= 1)


def block_diffusion(n: int, block: int):  # type: ignore[no-untyped-def]
    """BD3-LM style: a noised half and a clean half, each in blocks (comparisons of conditions)."""

    def mask(b, h, q_idx, kv_idx):  # type: ignore[no-untyped-def]
        q_clean, kv_clean = q_idx >= n, kv_idx >= n
        q_block = torch.where(q_clean, (q_idx - n) // block, q_idx // block)
        kv_block = torch.where(kv_clean, (kv_idx - n) // block, kv_idx // block)
        diagonal = (q_block == kv_block) & (q_clean == kv_clean)
        offset = (q_block > kv_block) & kv_clean & (q_clean != kv_clean)
        block_causal = (q_block >= kv_block) & kv_clean & q_clean
        return diagonal | offset | block_causal

    return mask


WINDOWS = torch.tensor([2, 5, 11, 40])  # per-head windows (MoA style)


def per_head_window(b, h, q_idx, kv_idx):  # type: ignore[no-untyped-def]
    return (q_idx >= kv_idx) & (q_idx - kv_idx <= WINDOWS[h])


def alibi_exp2(score, b, h, q_idx, kv_idx):  # type: ignore[no-untyped-def]
    slope = torch.exp2(-((h + 1) * 8.0 / H))
    return score - slope * (q_idx - kv_idx).abs()


def softcap(cap: float):  # type: ignore[no-untyped-def]
    def mod(score, b, h, q_idx, kv_idx):  # type: ignore[no-untyped-def]
        return cap * torch.tanh(score / cap)

    return mod


REL = torch.randn(H, 2 * 6 + 1)


def t5_bias(score, b, h, q_idx, kv_idx):  # type: ignore[no-untyped-def]
    return score + REL[h, (kv_idx - q_idx).clamp(-6, 6) + 6]


def sandwich(score, b, h, q_idx, kv_idx):  # type: ignore[no-untyped-def]
    return score + 0.3 * torch.cos((q_idx - kv_idx) * 0.7) - 0.1 * torch.sin(kv_idx * 0.05)


def log_distance(score, b, h, q_idx, kv_idx):  # type: ignore[no-untyped-def]
    return score - 0.4 * torch.log2(1.0 + (q_idx - kv_idx).abs().float())


def signed_gate(score, b, h, q_idx, kv_idx):  # type: ignore[no-untyped-def]
    return score * torch.sigmoid(torch.sign(q_idx - kv_idx).float() + 0.5) + (q_idx > kv_idx).long() * 0.25


PAIR_BIAS = torch.randn(48, 48) * 0.5


def captured_pair_bias(score, b, h, q_idx, kv_idx):  # type: ignore[no-untyped-def]
    return torch.where(q_idx >= kv_idx, score + PAIR_BIAS[q_idx, kv_idx], -float("inf"))


def where_full_like(score, b, h, q_idx, kv_idx):  # type: ignore[no-untyped-def]
    hidden = torch.full_like(score, -float("inf"))
    bonus = torch.where(kv_idx[None] % 4 == 0, torch.ones_like(score), torch.zeros_like(score))
    return torch.where(q_idx >= kv_idx, score + 0.5 * bonus, hidden)


CASES = [
    Case("causal", 64, causal),
    Case("sliding_window_generator", 64, sliding_window(5)),
    Case("and_masks_causal_window", 64, and_masks(causal, sliding_window(9))),
    Case("or_masks_prefix_lm", 64, or_masks(prefix_lm(20), causal)),
    Case("noop_mask", 40, noop_mask),
    Case("document_from_offsets", 64, document_causal),
    Case("dilated_causal", 64, lambda b, h, q, kv: (q >= kv) & ((q - kv) % 2 == 0)),
    Case("natten_2d_clamped", 64, natten_2d(8, 3)),
    Case("natten_3d_clamped", 64, natten_3d(4, 4, 4, 3)),
    Case("block_causal_tiles", 64, lambda b, h, q_idx, kv_idx: q_idx // 16 >= kv_idx // 16),
    Case("morton_ordered_neighbors", 64, morton_neighbors),
    Case("block_diffusion", 64, block_diffusion(32, 8), tight=False),  # 36 tiles computed, 32 needed: sound, loose
    Case("sinks_or_window", 64, lambda b, h, q, kv: (q >= kv) & ((kv < 4) | (q - kv <= 6))),
    Case("per_head_windows", 64, per_head_window),
    Case("longformer_global", 64, lambda b, h, q, kv: (kv < 2) | (q < 2) | (torch.abs(q - kv) <= 3)),
    Case("strided_sparse", 64, lambda b, h, q, kv: (q >= kv) & (((q - kv) % 8 == 0) | (q - kv < 8))),
    Case(
        "floor_div_long",
        64,
        lambda b, h, q, kv: torch.div(q, 8, rounding_mode="floor").long() == torch.div(kv, 8, rounding_mode="floor"),
    ),
    Case("cross_halves_bool_ne", 64, lambda b, h, q, kv: (q < 32) != (kv < 32)),
    Case("where_bool_branches", 64, lambda b, h, q, kv: torch.where(q < 16, kv < 16, q >= kv)),
    Case("round_and_trunc", 64, lambda b, h, q, kv: torch.round(q / 8.0) == torch.trunc(kv / 8.0)),
    Case("alibi_exp2_slopes", 48, causal, alibi_exp2),
    Case("softcap_tanh", 48, None, softcap(20.0)),
    Case("t5_relative_bias", 48, None, t5_bias),
    Case("sandwich_cos_sin", 48, causal, sandwich),
    Case("log2_distance_float", 48, sliding_window(7), log_distance),
    Case("sigmoid_sign_gate", 48, None, signed_gate),
    Case("captured_pair_bias_where", 48, None, captured_pair_bias),
    Case("where_full_like_constants", 48, None, where_full_like),
    # log is NaN above the diagonal: those tiles are hidden, but the analysis claims nothing for NaN (loose)
    Case("log_band_nan_hidden", 64, lambda b, h, q, kv: torch.log((q - kv).float() + 0.5) < 2.0, tight=False),
    Case("ones_like_bool_mask", 48, lambda b, h, q, kv: torch.ones_like(q, dtype=torch.bool) & (q >= kv)),
]


def _dense_keep(case: Case) -> torch.Tensor:
    if case.mask is None:
        keep = torch.ones(1, case.heads, case.seq, case.seq, dtype=torch.bool)
    else:
        keep = create_mask(case.mask, 1, case.heads, case.seq, case.seq, device="cpu").expand(
            1, case.heads, case.seq, case.seq
        )
    if case.score is not None:  # a score mod's -inf hides keys too
        keep = keep & ~torch.isneginf(_scores(case, torch.zeros(1, case.heads, case.seq, case.seq)))
    return keep


def _scores(case: Case, s: torch.Tensor) -> torch.Tensor:
    """The score mod evaluated as FlexAttention does: vmapped over b, h, q, kv with 0-d indices."""
    assert case.score is not None
    fn = case.score
    for axis in range(4):  # innermost first: kv, then q, h, b
        fn = torch.vmap(fn, in_dims=(0, *(0 if i == 3 - axis else None for i in range(4))))
    n = case.seq
    b, h, q, kv = torch.zeros(1, dtype=torch.long), torch.arange(case.heads), torch.arange(n), torch.arange(n)
    return fn(s, b, h, q, kv).reshape(s.shape).to(s.dtype)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_flex_style_function_matches_torch_and_a_float64_softmax(case: Case) -> None:
    spec = ac.AttentionSpec(num_heads=case.heads, head_dim=D, mask=case.mask, score_mod=case.score)
    keep = _dense_keep(case)
    g = torch.Generator().manual_seed(len(case.name))
    q, k, v = (torch.randn(1, case.heads, case.seq, D, generator=g) for _ in range(3))
    score_fn = None if case.score is None else (lambda s: _scores(case, s))
    want, _ = oracle.attention(q, k, v, keep, D**-0.5, score_fn)
    for target in ("cpu", "reference"):
        got = ac.compile(spec, target=target, tiles=TILES if target == "cpu" else None)(q, k, v)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=2e-5, msg=f"{case.name} on {target}")


ON_TRITON = ["sigmoid_sign_gate", "sandwich_cos_sin", "log2_distance_float", "alibi_exp2_slopes", "round_and_trunc"]


@pytest.mark.parametrize("case", [c for c in CASES if c.name in ON_TRITON], ids=lambda c: c.name)
def test_the_new_math_on_triton(case: Case) -> None:
    spec = ac.AttentionSpec(num_heads=case.heads, head_dim=D, mask=case.mask, score_mod=case.score)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, case.heads, case.seq, D, generator=g) for _ in range(3))
    score_fn = None if case.score is None else (lambda s: _scores(case, s))
    want, _ = oracle.attention(q, k, v, _dense_keep(case), D**-0.5, score_fn)
    got = ac.compile(spec, target="triton", tiles=TILES)(q, k, v)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("case", [c for c in CASES if c.mask is not None], ids=lambda c: c.name)
def test_block_maps_of_the_corpus_are_sound_and_tight(case: Case) -> None:
    spec = ac.AttentionSpec(num_heads=case.heads, head_dim=D, mask=case.mask)
    bm = ac.compile(spec, target="cpu", tiles=TILES).block_map(case.seq, case.seq)
    got = bm.states()[0]
    got = got if got.shape[0] == case.heads else got.repeat(case.heads, 0)
    truth = tile_states(_dense_keep(case)[0], TILES)
    assert not ((truth > 0) & (got == 0)).any(), "a tile with a visible pair was called empty"
    assert not ((got == 2) & (truth != 2)).any(), "a tile called full hides a masked pair"
    if case.tight:
        assert ((got > 0) == (truth > 0)).all(), "an empty tile is computed"


def test_the_corpus_is_large_enough() -> None:
    assert len(CASES) >= 25


def test_untraceable_constructs_still_say_what_to_write() -> None:
    def item_mask(b, h, q_idx, kv_idx):  # type: ignore[no-untyped-def]
        return q_idx.item() > 3

    def inplace(b, h, q_idx, kv_idx):  # type: ignore[no-untyped-def]
        return q_idx.add_(1) > kv_idx

    def branching(b, h, q_idx, kv_idx):  # type: ignore[no-untyped-def]
        if q_idx > kv_idx:
            return kv_idx < 4
        return q_idx < 4

    for fn, message in (
        (item_mask, r"\.item\(\)` of a symbolic index is data-dependent"),
        (inplace, r"in-place `\.add_\(\)` cannot be traced; use the out-of-place `\.add\(\)`"),
        (branching, r"test_flex_corpus.py:\d+: `if q_idx > kv_idx:`.*cannot be traced"),
    ):
        with pytest.raises(ac.SpecError, match=message):
            ac.AttentionSpec(num_heads=1, head_dim=8, mask=fn)
