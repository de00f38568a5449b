"""fp16 inputs on the cpu target: the native path (AMX tiles on exact bf16 splits, ``CpuKernel.forward_fp16``, where
the CPU has AMX; else the fp32 kernels reading and writing fp16 through F16C, ``CpuKernel.narrow_forward``) against
the same kernel's fp32 path on upcast copies, attncc bf16, SDPA fp16 and FlexAttention fp16, side by side in one
process; and the accuracy of both attncc fp16 paths against float64. ``--dtype bfloat16``: the same table for bf16
inputs (native: AVX512_BF16 or AMX where the build has them, else the fp32 kernels widening bf16 as they read it).

    python benchmarks/cpu_fp16.py                                    # 4K, H=8, D=64/128, causal and sliding window
    python benchmarks/cpu_fp16.py --masks causal document --head-dims 32 64 128
    python benchmarks/cpu_fp16.py --backward                         # the backward's table instead
    ATTNCC_CPU_ISA=avx2 python benchmarks/cpu_fp16.py --dtype bfloat16  # bf16 on a build without AVX512_BF16

"fp32 path" is the same compiled kernel with its native fp16 paths switched off (fp32 on upcast copies, forward and
backward), so the two differ only in how the products run. Times are the best of ``--reps`` rounds that call every
contender once (``cpu.interleaved``); a backward is timed alone, on a retained graph. Errors: max and mean
|x - x64| of the fp16 outputs (``--backward``: of dq, dk and dv together) over the float64 reference on the same fp16
inputs (the first head, a one-head spec of its own). Without AMX the native column is the F16C path: the same fp32
products, so the speedup is what the upcast copies cost (and the errors agree up to o's rounding).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F
from cpu import B, H, attncc_mask, doc_ids, flex_mask, interleaved  # benchmarks/cpu.py
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import attncc as ac

DTYPE = torch.float16  # the inputs' (--dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--masks", nargs="+", default=["causal", "sliding_window"])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--backward", action="store_true", help="time the backward instead (no FlexAttention column)")
    parser.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    args = parser.parse_args()
    global DTYPE
    DTYPE = getattr(torch, args.dtype)
    n = args.n
    what = "backward" if args.backward else "forward"
    print(f"# B={B} H={H} N={n}; torch {torch.__version__}, {torch.get_num_threads()} threads; {what} only")
    print(
        f"| mask | D | {args.dtype} native ms | {args.dtype} fp32-path ms | native speedup | bf16 ms | "
        + f"SDPA {args.dtype} ms | SDPA/native | "
        + ("" if args.backward else f"flex {args.dtype} ms | flex/native | ")
        + "max err native | max err fp32 path | mean err native | mean err fp32 path |"
    )
    print("|" + "---|" * (12 if args.backward else 14))
    for name in args.masks:
        for d in args.head_dims:
            (backward_row if args.backward else row)(name, d, n, args.reps)


def row(name: str, d: int, n: int, reps: int) -> None:
    """Time the contenders on one mask and head dim and print the table row."""
    g = torch.Generator().manual_seed(d)
    q, k, v = (torch.randn(B, H, n, d, generator=g).to(DTYPE) for _ in range(3))
    extra = {"doc": doc_ids(n)} if name == "document" else {}
    native, upcast = kernels(name, n, H, d)
    q16, k16, v16 = (t.bfloat16() for t in (q, k, v))
    fmask = flex_mask(name, n)
    block = create_block_mask(fmask, 1, 1, n, n, device="cpu")
    torch._dynamo.reset()
    flex = torch.compile(flex_attention)
    qi, ki = torch.arange(n)[:, None], torch.arange(n)[None, :]
    bool_mask = None if name == "causal" else fmask(0, 0, qi, ki)
    fns = {
        "native": lambda: native(q, k, v, **extra),
        "upcast": lambda: upcast(q, k, v, **extra),
        "bf16": lambda: native(q16, k16, v16, **extra),
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask, is_causal=bool_mask is None),
        "flex": lambda: flex(q, k, v, block_mask=block),
    }
    ms = {key: t * 1e3 for key, t in interleaved(fns, reps, slow={"sdpa"}).items()}
    errs = accuracy(name, n, q[:, :1], k[:, :1], v[:, :1], extra=extra)
    print(
        f"| {name} | {d} | {ms['native']:.1f} | {ms['upcast']:.1f} | {ms['upcast'] / ms['native']:.2f}x | "
        f"{ms['bf16']:.1f} | {ms['sdpa']:.1f} | {ms['sdpa'] / ms['native']:.2f}x | {ms['flex']:.1f} | "
        f"{ms['flex'] / ms['native']:.2f}x | {errs[0].max():.2e} | {errs[1].max():.2e} | "
        f"{errs[0].mean():.2e} | {errs[1].mean():.2e} |",
        flush=True,
    )


def backward_row(name: str, d: int, n: int, reps: int) -> None:
    """Time the contenders' backwards on one mask and head dim and print the table row."""
    g = torch.Generator().manual_seed(d)
    q, k, v = (torch.randn(B, H, n, d, generator=g).to(DTYPE) for _ in range(3))
    do = torch.randn(B, H, n, d, generator=g).to(DTYPE)
    extra = {"doc": doc_ids(n)} if name == "document" else {}
    native, upcast = kernels(name, n, H, d)
    qi, ki = torch.arange(n)[:, None], torch.arange(n)[None, :]
    bool_mask = None if name == "causal" else flex_mask(name, n)(0, 0, qi, ki)

    def graph(attend: Callable[..., torch.Tensor], dtype: torch.dtype) -> Callable[[], object]:
        leaves = [t.to(dtype).clone().requires_grad_() for t in (q, k, v)]
        o = attend(*leaves)
        return lambda: torch.autograd.grad(o, leaves, do.to(dtype), retain_graph=True)

    def sdpa(*qkv: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(*qkv, attn_mask=bool_mask, is_causal=bool_mask is None)

    fns = {
        "native": graph(lambda *t: native(*t, **extra), DTYPE),
        "upcast": graph(lambda *t: upcast(*t, **extra), DTYPE),
        "bf16": graph(lambda *t: native(*t, **extra), torch.bfloat16),
        "sdpa": graph(sdpa, DTYPE),
    }
    ms = {key: t * 1e3 for key, t in interleaved(fns, reps, slow={"sdpa"}).items()}
    errs = grad_accuracy(name, n, q[:, :1], k[:, :1], v[:, :1], do=do[:, :1], extra=extra)
    print(
        f"| {name} | {d} | {ms['native']:.1f} | {ms['upcast']:.1f} | {ms['upcast'] / ms['native']:.2f}x | "
        f"{ms['bf16']:.1f} | {ms['sdpa']:.1f} | {ms['sdpa'] / ms['native']:.2f}x | {errs[0].max():.2e} | "
        f"{errs[1].max():.2e} | {errs[0].mean():.2e} | {errs[1].mean():.2e} |",
        flush=True,
    )


def kernels(name: str, n: int, heads: int, d: int) -> tuple[ac.Kernel, ac.Kernel]:
    """The spec compiled twice (two names: two CpuKernel objects), the second with its native fp16 paths off."""
    specs = (
        ac.AttentionSpec(name=f"{tag}_{heads}", num_heads=heads, head_dim=d, mask=attncc_mask(name, n))
        for tag in ("fp16_native", "fp16_upcast")
    )
    native, upcast = (ac.compile(spec, target="cpu") for spec in specs)
    executable = upcast.executable("cpu")
    for kern in {executable.kernel, executable.backward_kernel}:  # (the backward's tiles may be a kernel of their own)
        kern.native_fp16 = kern.native_bf16 = lambda *_: False  # (so the backward is fp32 too)
        kern._widens = lambda *_: False  # no fp16 or bf16 read by the fp32 kernels either: fp32 on upcast copies
    return native, upcast


def accuracy(name: str, n: int, *qkv: torch.Tensor, extra: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """|o - o64| of one head's fp16 output, native and through the fp32 path, over the float64 reference."""
    native, upcast = kernels(name, n, 1, qkv[0].shape[3])
    want = ac.compile(native.spec, target="reference")(*(t.double() for t in qkv), **extra)
    return [(f(*qkv, **extra).double() - want).abs() for f in (native, upcast)]


def grad_accuracy(
    name: str, n: int, *qkv: torch.Tensor, do: torch.Tensor, extra: dict[str, torch.Tensor]
) -> list[torch.Tensor]:
    """|g - g64| of one head's fp16 dq, dk and dv (flattened together), native and through the fp32 path, over the
    float64 reference's on the same fp16 inputs and output gradient."""
    native, upcast = kernels(name, n, 1, qkv[0].shape[3])
    reference = ac.compile(native.spec, target="reference")
    wanted = [t.double().requires_grad_() for t in qkv]
    want = torch.cat([g.flatten() for g in torch.autograd.grad(reference(*wanted, **extra), wanted, do.double())])
    errs = []
    for kern in (native, upcast):
        leaves = [t.clone().requires_grad_() for t in qkv]
        got = torch.autograd.grad(kern(*leaves, **extra), leaves, do)
        errs.append((torch.cat([g.flatten() for g in got]).double() - want).abs())
    return errs


if __name__ == "__main__":
    main()
