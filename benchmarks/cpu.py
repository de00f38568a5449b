"""CPU attention: attncc's cpu target vs torch.compile(flex_attention) vs SDPA, side by side.

    python benchmarks/cpu.py                       # N = 4096 and 16384, fp32 and bf16
    python benchmarks/cpu.py --sizes 4096 --dtypes float32 --masks causal
    python benchmarks/cpu.py --sizes 4096 --masks causal --head-dims 32 64 128 --peaks   # issue 17's table

B=1, H=8, D=64 (``--head-dims`` to change; several make one table). Times are the best of ``--reps`` rounds after
a warm-up; each round calls every contender once, so all see the same machine state. attncc's forward and backward
run the generated C++ (the backward is timed alone, on a retained graph); FlexAttention is compiled with
torch.compile (its block mask built once, outside the timing); SDPA runs with the materialized boolean mask
("masked") and without any mask ("dense", or is_causal for causal). FLOP/s count the FLOPs of the tiles attncc
computes (4 * bq * bkv * D per tile per head); inside partial tiles the kernel skips register blocks that
keep nothing, so for sparse masks (window, neighborhood) this is an effective rate. Cold-compile times:
attncc with an empty cache; FlexAttention's first call (torch.compile). "SDPA/attncc" compares with SDPA
computing the same attention: is_causal for causal, the boolean mask otherwise. ``--peaks`` measures this
machine's fp32 FMA peak and torch's bf16 matmul rate first (benchmarks/fma_peak.py) and adds each row's
attncc rate as a share of the peak of its dtype.
"""

from __future__ import annotations

import argparse
import math
import platform
import random
import tempfile
import time
from collections.abc import Callable, Collection
from pathlib import Path

import fma_peak  # benchmarks/fma_peak.py
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import attncc as ac
from attncc import config
from attncc.codegen import toolchain

B, H, D = 1, 8, 64
MASKS = ["causal", "sliding_window", "prefix_lm", "document", "neighborhood_2d"]


def doc_ids(n: int) -> torch.Tensor:
    return torch.arange(n) // 1000


def grid(n: int) -> int:
    side = math.isqrt(n)
    assert side * side == n
    return side


def attncc_mask(name: str, n: int) -> ac.Expr:
    return {
        "causal": lambda: ac.causal(),
        "sliding_window": lambda: ac.sliding_window(255),
        "prefix_lm": lambda: ac.prefix_lm(n // 4),
        "document": lambda: ac.document(ac.tensor("doc")),
        "neighborhood_2d": lambda: ac.neighborhood((grid(n), grid(n)), (15, 15)),
    }[name]()


def flex_mask(name: str, n: int) -> Callable:
    ids = doc_ids(n)
    side = grid(n)

    def na(b, h, q, kv):
        cx, cy = torch.clamp(q // side, 7, side - 8), torch.clamp(q % side, 7, side - 8)
        return ((kv // side - cx).abs() <= 7) & ((kv % side - cy).abs() <= 7)

    return {
        "causal": lambda b, h, q, kv: q >= kv,
        "sliding_window": lambda b, h, q, kv: (q >= kv) & (q - kv <= 255),
        "prefix_lm": lambda b, h, q, kv: (kv < n // 4) | (q >= kv),
        "document": lambda b, h, q, kv: ids[q] == ids[kv],
        "neighborhood_2d": na,
    }[name]


def interleaved(fns: dict[str, Callable[[], object]], reps: int, slow: Collection[str] = ()) -> dict[str, float]:
    """Best time of each callable, timed in rounds that visit every callable once, so that all of them
    see the same machine state (speed on a shared machine drifts by 10-30% over a minute); the
    callables named in ``slow`` (dense SDPA at large N) run in every other round only. Each round visits them in
    another order (seeded), so that none always follows the same one: a callable that runs after one which
    streams other data finds its own inputs out of cache."""
    for fn in fns.values():
        fn()
    out = dict.fromkeys(fns, math.inf)
    names, order = list(fns), random.Random(0)
    for rnd in range(reps):
        for name in order.sample(names, len(names)):
            fn = fns[name]
            if name in slow and rnd % 2:
                continue
            start = time.perf_counter()
            fn()
            out[name] = min(out[name], time.perf_counter() - start)
    return out


def run(name: str, n: int, dtype: torch.dtype, reps: int, backward: bool, head_dim: int = D) -> dict[str, float | str]:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, n, head_dim, generator=g).to(dtype) for _ in range(3))
    spec = ac.AttentionSpec(name=f"bench_{name}", num_heads=H, head_dim=head_dim, mask=attncc_mask(name, n))
    runtime = {"doc": doc_ids(n)} if name == "document" else {}
    with tempfile.TemporaryDirectory() as tmp, config.override(cache_dir=Path(tmp), always_compile=True):
        start = time.perf_counter()
        kern = ac.compile(spec, target="cpu")
        kern.cpu_kernel()
        cold = time.perf_counter() - start
    kern = ac.compile(spec, target="cpu")
    bm = kern.block_map(n, n, **runtime)
    out: dict[str, float | str] = {
        "cold": cold,
        "computed": bm.computed_fraction,
        "tiles": f"{bm.block_size[0]}x{bm.block_size[1]}",
    }
    fns: dict[str, Callable[[], object]] = {"attncc_fwd": lambda: kern(q, k, v, **runtime)}
    if backward:
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        o = kern(qg, kg, vg, **runtime)  # one forward; the backward alone is timed on its retained graph
        do = torch.randn_like(q)
        fns["attncc_bwd"] = lambda: torch.autograd.grad(o, (qg, kg, vg), do, retain_graph=True)
    fmask = flex_mask(name, n)
    block = create_block_mask(fmask, 1, 1, n, n, device="cpu")
    torch._dynamo.reset()  # each row compiles afresh: no row falls back to eager at dynamo's recompile limit
    compiled = torch.compile(flex_attention)
    start = time.perf_counter()
    try:
        compiled(q, k, v, block_mask=block)
        out["flex_first_call"] = time.perf_counter() - start
        fns["flex_fwd"] = lambda: compiled(q, k, v, block_mask=block)
    except Exception as exc:  # FlexAttention's own failures are results too
        out["flex_error"] = type(exc).__name__ + (": C++ compile error" if "CppCompileError" in str(exc) else "")
        torch._dynamo.reset()
    qi, ki = torch.arange(n)[:, None], torch.arange(n)[None, :]
    bool_mask = fmask(0, 0, qi, ki)
    causal = name == "causal"
    fns["sdpa_masked"] = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask)
    fns["sdpa_dense"] = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    out.update(interleaved(fns, reps, slow={"sdpa_masked", "sdpa_dense"}))
    out["gflops"] = bm.predicted_flops(head_dim, H, B) / float(out["attncc_fwd"]) / 1e9
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--masks", nargs="+", default=MASKS)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--no-backward", action="store_true")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[D])
    parser.add_argument("--peaks", action="store_true", help="measure the fp32 FMA and bf16 matmul peaks first")
    args = parser.parse_args()
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads"
    isa = sorted(f for f in toolchain.cpu_flags() if f.startswith(("avx512", "amx")) or f in ("avx2", "fma"))
    build = config.get().cpu_isa
    print(f"# B={B} H={H}; torch {torch.__version__}; {machine}; CPU flags: {' '.join(isa)}; attncc build: {build}")
    peaks: dict[str, float] = {}
    if args.peaks:
        peaks = {"float32": sum(fma_peak.measure()), "bfloat16": fma_peak.matmul_rate(torch.bfloat16)}
        print(f"# peaks: fp32 FMA {peaks['float32']:.1f} GFLOP/s; torch.mm bf16 {peaks['bfloat16']:.1f} GFLOP/s")
    print(
        "| mask | N | D | dtype | tiles | computed | attncc fwd ms | attncc bwd ms | bwd/fwd | flex fwd ms | "
        "flex/attncc | SDPA masked ms | SDPA dense ms | SDPA/attncc | attncc GFLOP/s | of peak | "
        "attncc cold compile s | flex first call s |"
    )
    print("|" + "---|" * 18)
    ratios = []
    for n in args.sizes:
        for head_dim in args.head_dims:
            for dt in args.dtypes:
                for name in args.masks:
                    ratios += row(name, n, head_dim, dt, args, peaks)
    geo = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
    print(f"\ngeometric mean flex/attncc forward: {geo:.2f}x over {len(ratios)} rows")


def row(name: str, n: int, head_dim: int, dt: str, args: argparse.Namespace, peaks: dict[str, float]) -> list[float]:
    """Print one table row; returns its flex/attncc ratio ([] where FlexAttention failed)."""
    r = run(name, n, getattr(torch, dt), args.reps, not args.no_backward, head_dim)
    fwd = float(r["attncc_fwd"])
    bwd = float(r.get("attncc_bwd", float("nan")))
    ratios: list[float] = []
    if "flex_error" in r:
        flex, ratio_text, first = f"failed ({r['flex_error']})", "-", "-"
    else:
        ratio = float(r["flex_fwd"]) / fwd
        ratios.append(ratio)
        flex, ratio_text = f"{float(r['flex_fwd']) * 1e3:.1f}", f"{ratio:.2f}x"
        first = f"{float(r['flex_first_call']):.2f}"
    sdpa = float(r["sdpa_dense" if name == "causal" else "sdpa_masked"])  # the same attention
    share = f"{float(r['gflops']) / peaks[dt]:.0%}" if dt in peaks else "-"
    print(
        f"| {name} | {n} | {head_dim} | {dt} | {r['tiles']} | {float(r['computed']):.1%} | "
        f"{fwd * 1e3:.1f} | {bwd * 1e3:.1f} | {bwd / fwd:.2f} | {flex} | {ratio_text} | "
        f"{float(r['sdpa_masked']) * 1e3:.1f} | {float(r['sdpa_dense']) * 1e3:.1f} | {sdpa / fwd:.2f}x | "
        f"{float(r['gflops']):.1f} | {share} | {float(r['cold']):.2f} | {first} |",
        flush=True,
    )
    return ratios


if __name__ == "__main__":
    main()
