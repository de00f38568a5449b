"""Values of another width than queries and keys (DeepSeek's multi-head latent attention, 192 / 128) on the CPU:
attncc's cpu target vs SDPA and FlexAttention, side by side in one process.

    python benchmarks/value_dim.py                                  # prefill 2K and decoding 4K / 16K, fp32 and bf16
    python benchmarks/value_dim.py --sizes 4096 --kv-lens 16384 --dtypes bfloat16 --reps 5

Prefill: B=1, H=16, causal, q and k ``--head-dim`` (192) wide, v ``--value-dim`` (128); forward, and the backward
alone on a retained graph. "attncc all 192" is the same call with v as wide as q and k: the products the zero-padded
call computes, without its padding copy and cut (the floor of a kernel that takes one head size). Decoding: one
query row over Skv keys (every key visible), 16 heads each with its own kv head (Hugging Face's DeepSeek-V3 keeps
K and V per head), against SDPA; "growing": 20 steps of a generation loop, the key length one longer each step, K and
V views of preallocated caches (each step a new length: maps, padding into a kept buffer laid out as K). GFLOP/s
count the useful products, 2 * (D + Dv) per visible (query, key) pair.
Best of ``--reps`` rounds, each calling every contender once (``benchmarks/cpu.py``'s ``interleaved``).
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from cpu import interleaved  # benchmarks/cpu.py: best of rounds that call every contender once
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import attncc as ac

B, H = 1, 16


def prefill(n: int, dtype: torch.dtype, d: int, dv: int, reps: int) -> dict[str, float | str]:
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(B, H, n, d, generator=g).to(dtype) for _ in range(2))
    v = torch.randn(B, H, n, dv, generator=g).to(dtype)
    wide = torch.randn(B, H, n, d, generator=g).to(dtype)
    kern = ac.compile(ac.AttentionSpec(num_heads=H, head_dim=d, value_dim=dv, mask=ac.causal()), target="cpu")
    same = ac.compile(ac.AttentionSpec(num_heads=H, head_dim=d, mask=ac.causal()), target="cpu")
    out: dict[str, float | str] = {}
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    out["err"] = float((kern(q, k, v).double() - want).abs().max())
    fns: dict[str, Callable[[], object]] = {
        "attncc": lambda: kern(q, k, v),
        "attncc_wide": lambda: same(q, k, wide),
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
    }
    block = create_block_mask(lambda b, h, qi, ki: qi >= ki, 1, 1, n, n, device="cpu")
    torch._dynamo.reset()
    flex = torch.compile(flex_attention)
    try:
        flex(q, k, v, block_mask=block)
        fns["flex"] = lambda: flex(q, k, v, block_mask=block)
    except Exception as exc:  # FlexAttention's own failures are results too
        out["flex_error"] = type(exc).__name__
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o = kern(*leaves)
    do = torch.randn_like(o)
    fns["attncc_bwd"] = lambda: torch.autograd.grad(o, leaves, do, retain_graph=True)
    wide_leaves = [t.clone().requires_grad_() for t in (q, k, wide)]
    ow = same(*wide_leaves)
    dow = torch.randn_like(ow)
    fns["attncc_wide_bwd"] = lambda: torch.autograd.grad(ow, wide_leaves, dow, retain_graph=True)
    sdpa_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    os_ = F.scaled_dot_product_attention(*sdpa_leaves, is_causal=True)
    fns["sdpa_bwd"] = lambda: torch.autograd.grad(os_, sdpa_leaves, do, retain_graph=True)
    out.update(interleaved(fns, reps))
    out["gflops"] = 2.0 * (d + dv) * n * (n + 1) / 2 * H * B / float(out["attncc"]) / 1e9
    return out


def decode(skv: int, dtype: torch.dtype, d: int, dv: int, reps: int) -> dict[str, float | str]:
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, H, 1, d, generator=g).to(dtype)
    k = torch.randn(B, H, skv, d, generator=g).to(dtype)
    v = torch.randn(B, H, skv, dv, generator=g).to(dtype)
    spec = ac.AttentionSpec(num_heads=H, head_dim=d, value_dim=dv, mask=ac.causal("bottom_right"))
    kern = ac.compile(spec, target="cpu")
    with torch.no_grad():
        want = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
        out: dict[str, float | str] = {"err": float((kern(q, k, v).double() - want).abs().max())}
        fns: dict[str, Callable[[], object]] = {
            "attncc": lambda: kern(q, k, v),
            "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
        }
        out.update(interleaved(fns, reps))
    return out


def growing(n: int, dtype: torch.dtype, d: int, dv: int, steps: int) -> dict[str, float]:
    """Mean time per step of a generation loop: one query row, the key length growing by one each step, K and V the
    first positions of preallocated caches (a static cache's views); SDPA given the same views."""
    g = torch.Generator().manual_seed(2)
    k = torch.randn(B, H, n + steps, d, generator=g).to(dtype)
    v = torch.randn(B, H, n + steps, dv, generator=g).to(dtype)
    q = torch.randn(B, H, 1, d, generator=g).to(dtype)
    spec = ac.AttentionSpec(num_heads=H, head_dim=d, value_dim=dv, mask=ac.causal("bottom_right"))
    kern = ac.compile(spec, target="cpu")
    out = {}
    with torch.no_grad():
        for name, fn in (("attncc", kern), ("sdpa", F.scaled_dot_product_attention)):
            for m in range(n - 3, n):  # (the loop's earlier steps)
                fn(q, k[:, :, :m], v[:, :, :m])
            start = time.perf_counter()
            for m in range(n, n + steps):
                fn(q, k[:, :, :m], v[:, :, :m])
            out[name] = (time.perf_counter() - start) / steps
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="*", default=[2048])
    p.add_argument("--kv-lens", type=int, nargs="*", default=[4096, 16384])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--head-dim", type=int, default=192)
    p.add_argument("--value-dim", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    torch.manual_seed(0)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads; B={B}, H={H}, head_dim {args.head_dim}, value_dim {args.value_dim}")  # fmt: skip
    d, dv = args.head_dim, args.value_dim
    print("\n| prefill N | dtype | attncc fwd ms | attncc all-192 fwd ms | SDPA fwd ms | flex fwd ms | SDPA/attncc | "
          "flex/attncc | padding cost | attncc bwd ms | all-192 bwd ms | SDPA bwd ms | SDPA/attncc bwd | "
          "attncc GFLOP/s | max err |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n in args.sizes:
        for name in args.dtypes:
            r = prefill(n, getattr(torch, name), d, dv, args.reps)
            flex = r.get("flex")
            flex_ms = f"{1e3 * float(flex):.1f}" if flex is not None else str(r.get("flex_error", "-"))
            flex_ratio = f"{float(flex) / float(r['attncc']):.2f}x" if flex is not None else "-"
            print(f"| {n} | {name} | {1e3 * float(r['attncc']):.1f} | {1e3 * float(r['attncc_wide']):.1f} | "
                  f"{1e3 * float(r['sdpa']):.1f} | {flex_ms} | {float(r['sdpa']) / float(r['attncc']):.2f}x | "
                  f"{flex_ratio} | {float(r['attncc']) / float(r['attncc_wide']):.2f}x | "
                  f"{1e3 * float(r['attncc_bwd']):.1f} | {1e3 * float(r['attncc_wide_bwd']):.1f} | "
                  f"{1e3 * float(r['sdpa_bwd']):.1f} | {float(r['sdpa_bwd']) / float(r['attncc_bwd']):.2f}x | "
                  f"{float(r['gflops']):.1f} | {float(r['err']):.1e} |", flush=True)  # fmt: skip
    print("\n| decode Skv | dtype | attncc ms | SDPA ms | SDPA/attncc | max err |")
    print("|---|---|---|---|---|---|")
    for skv in args.kv_lens:
        for name in args.dtypes:
            r = decode(skv, getattr(torch, name), d, dv, max(args.reps, 20))
            print(f"| {skv} | {name} | {1e3 * float(r['attncc']):.3f} | {1e3 * float(r['sdpa']):.3f} | "
                  f"{float(r['sdpa']) / float(r['attncc']):.2f}x | {float(r['err']):.1e} |", flush=True)  # fmt: skip
    print("\n| growing from Skv | dtype | attncc ms/step | SDPA ms/step | SDPA/attncc |")
    print("|---|---|---|---|---|")
    for skv in args.kv_lens:
        for name in args.dtypes:
            r = growing(skv, getattr(torch, name), d, dv, 20)
            print(f"| {skv} | {name} | {1e3 * r['attncc']:.2f} | {1e3 * r['sdpa']:.2f} | "
                  f"{r['sdpa'] / r['attncc']:.2f}x |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
