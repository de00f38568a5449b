"""What bounds the cpu target's forward: the generated kernel timed next to two ablated copies of itself and
FlexAttention, all in one process (each round calls every contender once; best round kept).

    python benchmarks/cpu_bound.py                                 # N = 4096, causal and prefix-LM, fp32
    python benchmarks/cpu_bound.py --sizes 16384 --reps 3 --masks causal
    python benchmarks/cpu_bound.py --masks causal --head-dim 128

The ablations compute wrong outputs on purpose (they are not attention; nothing checks them):

- "no exp": the online softmax's exp2 is replaced by its argument;
- "GEMMs only": the row max is a constant too, which leaves the two block products S = Q K^T and O += P V
  (the register-blocked micro-kernels), the masking of partial tiles and the bookkeeping.

Their times bound what any cheaper softmax could gain: the flex/attncc ratio of "GEMMs only" is the most a
kernel doing these FLOPs with these micro-kernels can reach against FlexAttention. The GEMM-only rate is
printed as a share of the machine's FMA peak (measured first, as in benchmarks/fma_peak.py).
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from cpu import attncc_mask, flex_mask, interleaved
from fma_peak import measure
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import attncc as ac
from attncc import config
from attncc.codegen import cpu_template

B, H = 1, 8
# each fp32 forward softmax has a scalar loop (AVX2 and portable builds) and 16-lane intrinsics (AVX-512 builds):
# both are ablated, so the numbers hold whichever the machine compiles
NO_EXP = [
    ("const float p = exp2_f(sr[j] * sc - mx);", "const float p = sr[j] * sc - mx;"),
    ("const __m512 e = exp2_v(_mm512_fmsub_ps(", "const __m512 e = (_mm512_fmsub_ps("),
]
NO_MAX = [("row_max(sr, cols) * sc", "0.0f"), ("row_max_v(sr, cols) * sc", "0.0f")]
ABLATIONS: dict[str, list[tuple[str, str]]] = {
    "attncc": [],
    "no exp": NO_EXP,
    "GEMMs only": [*NO_EXP, *NO_MAX],
}


@contextmanager
def ablated(edits: list[tuple[str, str]]) -> Iterator[None]:
    """The cpu target generating its runtime (the fixed forward and backward) with ``edits`` (old, new) applied;
    each old text must occur exactly once, so a template change that moves it stops the benchmark instead of
    timing the wrong thing."""
    source = cpu_template.RUNTIME
    for old, new in edits:
        if source.count(old) != 1:
            raise SystemExit(f"cpu_bound.py: the cpu template no longer has exactly one {old!r}; update ABLATIONS")
        source = source.replace(old, new)
    saved = cpu_template.RUNTIME
    cpu_template.RUNTIME = source
    try:
        yield
    finally:
        cpu_template.RUNTIME = saved


def run(name: str, n: int, D: int, reps: int, peak: float) -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, n, D, generator=g) for _ in range(3))
    fns: dict[str, Callable[[], object]] = {}
    with tempfile.TemporaryDirectory() as tmp, config.override(cache_dir=Path(tmp), always_compile=True):
        for label, edits in ABLATIONS.items():
            tag = label.replace(" ", "_")
            spec = ac.AttentionSpec(name=f"bound_{tag}_{name}", num_heads=H, head_dim=D, mask=attncc_mask(name, n))
            with ablated(edits):
                kern = ac.compile(spec, target="cpu")
                kern.cpu_kernel()
            fns[label] = lambda kern=kern: kern(q, k, v)
    flops = kern.block_map(n, n).predicted_flops(D, H, B)  # the same tiles for every copy
    block = create_block_mask(flex_mask(name, n), 1, 1, n, n, device="cpu")
    compiled = torch.compile(flex_attention)
    fns["flex"] = lambda: compiled(q, k, v, block_mask=block)
    best = interleaved(fns, reps)
    flex = best.pop("flex")
    for label, t in best.items():
        rate = flops / t / 1e9
        print(
            f"| {name} | {n} | {label} | {t * 1e3:.1f} | {rate:.1f} | {rate / peak:.0%} | {flex / t:.2f}x |",
            flush=True,
        )
    print(
        f"| {name} | {n} | FlexAttention | {flex * 1e3:.1f} | {flops / flex / 1e9:.1f} | "
        f"{flops / flex / 1e9 / peak:.0%} | 1.00x |",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096])
    parser.add_argument("--masks", nargs="+", default=["causal", "prefix_lm"])
    parser.add_argument("--reps", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    args = parser.parse_args()
    per_core = measure()
    peak = sum(per_core)
    print(
        f"# fp32, B={B} H={H} D={args.head_dim}; torch {torch.__version__}; "
        f"FMA peak {peak:.1f} GFLOP/s on {len(per_core)} cores"
    )
    print("| mask | N | kernel | fwd ms | GFLOP/s (tile FLOPs) | of FMA peak | flex/this |")
    print("|" + "---|" * 7)
    for n in args.sizes:
        for name in args.masks:
            run(name, n, args.head_dim, args.reps, peak)


if __name__ == "__main__":
    main()
