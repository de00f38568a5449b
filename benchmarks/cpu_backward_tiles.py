"""The backward at its own tiles (``plan.backward_tiles``, chosen by the cost model) against the same backward at
the forward's tiles, side by side in one process.

    python benchmarks/cpu_backward_tiles.py                      # 4K, H=8, D=32/64/128, five masks, bf16
    python benchmarks/cpu_backward_tiles.py --masks causal --head-dims 128
    python benchmarks/cpu_backward_tiles.py --dtype float32      # the fp32 backward (cpu.FP32_BACKWARD_BKV)

Each contender is the same spec compiled twice: with the cost model's pipeline, and with
``block-sparse{bq=..,bkv=..}`` naming the forward's tiles (given tiles serve the backward too). The backward
is timed alone on a retained graph (``torch.autograd.grad``), best of ``--reps`` rounds that call both
(``cpu.interleaved``).
bf16 needs a CPU with AVX512_BF16 (the native bf16 backward); elsewhere bf16 upcasts and runs the fp32 backward,
which walks the backward tiles only where they are 256 keys wide (elsewhere both columns run the same tiles).
"""

from __future__ import annotations

import argparse
import functools

import torch
from cpu import MASKS, B, H, attncc_mask, doc_ids, interleaved  # benchmarks/cpu.py

import attncc as ac


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--masks", nargs="+", default=MASKS)
    parser.add_argument("--head-dims", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"# B={B} H={H} N={args.n} {args.dtype}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| mask | D | forward tiles | backward tiles | bwd ms at forward tiles | bwd ms as compiled | ratio |")
    print("|---|---|---|---|---|---|---|")
    for name in args.masks:
        for d in args.head_dims:
            spec = ac.AttentionSpec(num_heads=H, head_dim=d, mask=attncc_mask(name, args.n))
            chosen = ac.compile(spec, target="cpu")
            bq, bkv = chosen.plan.tiles
            same = ac.compile(spec, target="cpu", pipeline=f"canonicalize,fuse,block-sparse{{bq={bq},bkv={bkv}}}")
            extra = {"doc": doc_ids(args.n)} if name == "document" else {}
            q, k, v = (torch.randn(B, H, args.n, d).to(dtype).requires_grad_() for _ in range(3))
            fns = {}
            for tag, kern in (("forward tiles", same), ("backward tiles", chosen)):
                o = kern(q, k, v, **extra)
                fns[tag] = functools.partial(torch.autograd.grad, o, (q, k, v), torch.randn_like(o), retain_graph=True)
            best = interleaved(fns, args.reps)  # (its warm-up call builds each backward kernel)
            at_fwd, at_bwd = best["forward tiles"] * 1e3, best["backward tiles"] * 1e3
            tiles = chosen.plan.backward_tiles
            print(
                f"| {name} | {d} | {bq}x{bkv} | {tiles[0]}x{tiles[1]} | {at_fwd:.1f} | {at_bwd:.1f} | "
                f"{at_fwd / at_bwd:.2f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
