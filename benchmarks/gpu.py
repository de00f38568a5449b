"""GPU attention: attncc's triton target vs torch.compile(flex_attention) vs SDPA, side by side.

    python benchmarks/gpu.py                       # 4K, 8K, 16K, 32K tokens, bf16, forward and backward
    python benchmarks/gpu.py --sizes 4096 --masks causal

Needs a CUDA device; exits with a message otherwise. B=1, H=16, D=128 (bf16). TFLOP/s count the
FLOPs of the tiles each method computes (attncc: its block map; FlexAttention: its BlockMask;
SDPA: the dense or causal FLOPs it performs). Times are CUDA-event medians of 20 calls.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
import torch.nn.functional as F

import attncc as ac

B, H, D = 1, 16, 128
MASKS = ["causal", "sliding_window", "document", "neighborhood_2d", "prefix_lm", "alibi"]


def _spec(name: str, n: int) -> ac.AttentionSpec:
    side = math.isqrt(n)
    masks = {
        "causal": (ac.causal(), None),
        "sliding_window": (ac.sliding_window(1023), None),
        "document": (ac.causal() & ac.document(ac.tensor("doc")), None),
        "neighborhood_2d": (ac.neighborhood((side, n // side), (15, 15)), None),
        "prefix_lm": (ac.prefix_lm(n // 4), None),
        "alibi": (ac.causal(), ac.alibi()),
    }
    mask, mod = masks[name]
    return ac.AttentionSpec(num_heads=H, head_dim=D, mask=mask, score_mod=mod)


def _time(fn) -> float:  # type: ignore[no-untyped-def]
    for _ in range(3):
        fn()
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def _flex_mods(name: str, n: int, doc: torch.Tensor):  # type: ignore[no-untyped-def]
    side = math.isqrt(n)

    def na(b, h, i, j):  # type: ignore[no-untyped-def]
        cx, cy = torch.clamp(i // side, 7, side - 8), torch.clamp(i % side, 7, side - 8)
        return ((j // side - cx).abs() <= 7) & ((j % side - cy).abs() <= 7)

    masks = {
        "causal": lambda b, h, i, j: i >= j,
        "alibi": lambda b, h, i, j: i >= j,
        "sliding_window": lambda b, h, i, j: (i >= j) & (i - j <= 1023),
        "prefix_lm": lambda b, h, i, j: (j < n // 4) | (i >= j),
        "document": lambda b, h, i, j: (doc[i] == doc[j]) & (i >= j),
        "neighborhood_2d": na,
    }
    slopes = torch.tensor([2 ** (-8 * (h + 1) / H) for h in range(H)], device="cuda")

    def alibi(s, b, h, i, j):  # type: ignore[no-untyped-def]
        return s - slopes[h] * (i - j).abs()

    return masks[name], (alibi if name == "alibi" else None)


def _row(name: str, n: int, flex, create_block_mask) -> str:  # type: ignore[no-untyped-def]
    q, k, v = (torch.randn(B, H, n, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    doc = torch.arange(n, device="cuda") // 2048
    kern = ac.compile(_spec(name, n), target="triton")
    rt = {"doc": doc} if name == "document" else {}
    flops = kern.block_map(n, n, **{key: t.cpu() for key, t in rt.items()}).predicted_flops(D, H, B)
    mask_mod, score_mod = _flex_mods(name, n, doc)
    block = create_block_mask(mask_mod, None, None, n, n, device="cuda")
    do = torch.randn_like(q)
    t_ac = _time(lambda: kern(q, k, v, **rt))
    t_fx = _time(lambda: flex(q, k, v, score_mod=score_mod, block_mask=block))
    t_sd = _time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    t_ac_b = _time(lambda: torch.autograd.grad(kern(q, k, v, **rt), (q, k, v), do))
    t_fx_b = _time(lambda: torch.autograd.grad(flex(q, k, v, score_mod=score_mod, block_mask=block), (q, k, v), do))
    causal_flops = 2 * B * H * n * n * D
    return (
        f"| {name} | {n} | {flops / t_ac / 1e12:.1f} | {flops / t_fx / 1e12:.1f} | "
        f"{causal_flops / t_sd / 1e12:.1f} | {t_ac_b * 1e3:.2f} | {t_fx_b * 1e3:.2f} |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--masks", nargs="+", default=MASKS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/gpu.py needs a CUDA device; none is available here", file=sys.stderr)
        return 2
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention)
    print(f"# {torch.cuda.get_device_name()} B={B} H={H} D={D} bf16; torch {torch.__version__}")
    print(
        "| mask | N | attncc fwd TFLOP/s | flex fwd TFLOP/s | SDPA fwd TFLOP/s | attncc fwd+bwd ms | flex fwd+bwd ms |"
    )
    print("|---|---|---|---|---|---|---|")
    for n in args.sizes:
        for name in args.masks:
            print(_row(name, n, flex, create_block_mask), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
