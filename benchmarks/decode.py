"""Decode and small-query shapes on the CPU: attncc's cpu target vs SDPA, side by side.

    python benchmarks/decode.py                       # B=1, H=32, 8 kv heads (GQA), D=64, Sq 1 and 16, Skv 4K and 16K
    python benchmarks/decode.py --heads 1 --kv-heads 1 --dtypes float32 bfloat16   # one head: split-kv jobs

The new rows sit at the end of the keys (``causal(align="bottom_right")``; for Sq=1 every key is visible).
SDPA: ``scaled_dot_product_attention(..., enable_gqa=True)`` with ``is_causal=False`` for one row, else a
bottom-right boolean mask. Best of ``--reps`` rounds, each round calling every contender once. For fp16 and bf16
rows, "via fp32 copies" is the same kernel called on fp32 copies of q, k and v with its output cast back: what a
half-precision call costs where no native path takes it (``--dtypes float16``: the F16C path against it). "kv
splits": the forward's jobs, each kv range of one query head, or of a GQA group's heads together (few rows per key:
``CpuKernel.grouped_jobs``); "job per head" is the same kernel with grouping switched off (K packed for the
micro-kernels from 16 rows per key on). "runtime alone" is the kernel's forward (``attncc.codegen.cpu.forward``) on
this call's tile lists and partial-tile records made beforehand: what is left when validation, the block-map lookup
and dispatch are taken away; "Python share" is the rest's share of a call. Every call runs under ``no_grad``
(inference: no autograd node). ``--cache-views``: k and v are the first Skv positions of caches twice as long (every
contender gets the views); "view copied" is the call on contiguous copies of them made per call.

    python benchmarks/decode.py --batch 8 --kv-lens 4096 32768   # batched decoding, long caches
    python benchmarks/decode.py --cache-views --kv-lens 4096 16384 --dtypes float32 bfloat16   # a preallocated cache
    python benchmarks/decode.py --kv-lens 256 4096 --dtypes float32 bfloat16 float16   # per-call overhead
"""

from __future__ import annotations

import argparse
import platform
from collections.abc import Callable

import torch
import torch.nn.functional as F
from cpu import interleaved  # benchmarks/cpu.py: best of rounds that call every contender once

import attncc as ac
from attncc.codegen import cpu as cpu_target
from attncc.plan import TileLists


def contenders(
    kern: ac.Kernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> dict[str, Callable[[], object]]:
    cpu = kern.cpu_kernel()
    lists = TileLists.of(kern.block_map(q.shape[2], k.shape[2], q.shape[0]))
    keep = cpu.masks(lists, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]), {})
    found = {
        "attncc": lambda: kern(q, k, v),
        "runtime": lambda: cpu_target.forward(q, k, v, cpu, lists, keep, {}, None),
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
        "per_head": lambda: per_head(kern, q, k, v),
    }
    if q.dtype != torch.float32:
        found["upcast"] = lambda: kern(q.float(), k.float(), v.float()).to(q.dtype)
    if not k.is_contiguous():  # (--cache-views) the view copied first, as every call did before views were read
        found["copied"] = lambda: kern(q, k.contiguous(), v.contiguous())
    return found


def per_head(kern: ac.Kernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> object:
    """The call with one job per query head (GQA groups never one job: ``CpuKernel.grouped_jobs`` says no), as
    before grouping: K packed for the micro-kernels from ``PACK_ROWS`` rows per key on."""
    most, packed = cpu_target.GROUP_ROWS[q.dtype], cpu_target.GROUP_PACKED
    cpu_target.GROUP_ROWS[q.dtype], cpu_target.GROUP_PACKED = 0, False
    try:
        return kern(q, k, v)
    finally:
        cpu_target.GROUP_ROWS[q.dtype], cpu_target.GROUP_PACKED = most, packed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--q-lens", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--kv-lens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--dtypes", nargs="+", default=["float32"])
    parser.add_argument("--cache-views", action="store_true", help="k, v: the first Skv positions of a 2 Skv cache")
    args = parser.parse_args()
    H, Hkv, D = args.heads, args.kv_heads, args.head_dim
    spec = ac.AttentionSpec(num_heads=H, num_kv_heads=Hkv, head_dim=D, mask=ac.causal(align="bottom_right"))
    kern = ac.compile(spec, target="cpu")
    print(f"# B={args.batch} H={H} Hkv={Hkv} D={D}; torch {torch.__version__}; {platform.machine()}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print("| dtype | Sq | Skv | kv splits | attncc ms | SDPA ms | SDPA/attncc | runtime alone ms | Python share | "
          "job per head ms | per head/attncc | via fp32 copies ms | copies/attncc | view copied ms | "
          "copied/attncc |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for dt in args.dtypes:
        for skv in args.kv_lens:
            for sq in args.q_lens:
                g = torch.Generator().manual_seed(0)
                q = torch.randn(args.batch, H, sq, D, generator=g).to(getattr(torch, dt))
                most = 2 * skv if args.cache_views else skv
                k, v = (torch.randn(args.batch, Hkv, most, D, generator=g).to(q.dtype)[:, :, :skv] for _ in range(2))
                mask = None if sq == 1 else torch.ones(sq, skv, dtype=torch.bool).tril(skv - sq)
                with torch.no_grad():
                    t = interleaved(contenders(kern, q, k, v, mask), args.reps)
                cpu = kern.cpu_kernel()
                lists = TileLists.of(kern.block_map(sq, skv, args.batch))
                if q.dtype == torch.bfloat16 and cpu.has_bf16:  # (its own forward: groups only in place)
                    grouped = cpu.grouped_jobs(q, k, None, lists)
                else:
                    grouped, _ = cpu.fp32_jobs(q, k, None, lists)
                n = cpu.kv_splits(q, k, lists, torch.get_num_threads(), grouped)
                splits = f"{n} per group" if grouped else f"{n} per head"
                up, copied = (
                    f"{t[c] * 1e3:.3f} | {t[c] / t['attncc']:.2f}x" if c in t else "- | -" for c in ("upcast", "copied")
                )
                print(
                    f"| {dt} | {sq} | {skv} | {splits} | {t['attncc'] * 1e3:.3f} | {t['sdpa'] * 1e3:.3f} | "
                    f"{t['sdpa'] / t['attncc']:.2f}x | {t['runtime'] * 1e3:.3f} | "
                    f"{1 - t['runtime'] / t['attncc']:.0%} | {t['per_head'] * 1e3:.3f} | "
                    f"{t['per_head'] / t['attncc']:.2f}x | {up} | {copied} |"
                )


if __name__ == "__main__":
    main()
