"""Feature-map linear attention on the CPU: attncc's cpu target (generated C++, chunked) vs the dense reference,
with softmax attention (SDPA) of the same shape for scale, side by side.

    python benchmarks/linear.py                 # B=1, H=8, D=64, N 4096 and 16384, causal and not, fp32

Forward, and forward + backward (one call and ``.sum().backward()``); best of ``--reps`` rounds, each round
calling every contender once. The dense reference materializes phi(Q) phi(K)^T (N x N per head), so it is
skipped above ``--dense-max``.
"""

from __future__ import annotations

import argparse
import platform
from collections.abc import Callable

import torch
import torch.nn.functional as F
from cpu import interleaved  # benchmarks/cpu.py: best of rounds that call every contender once

import attncc as ac


def contenders(n: int, causal: bool, dense_max: int) -> dict[str, Callable[[], object]]:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.rand(1, 8, n, 64, generator=g) for _ in range(3))
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    spec = ac.linear_attention(num_heads=8, head_dim=64, causal=causal)
    cpu, ref = ac.compile(spec, target="cpu"), ac.compile(spec, target="reference")
    fns: dict[str, Callable[[], object]] = {
        "cpu_fwd": lambda: cpu(q, k, v),
        "cpu_fwd_bwd": lambda: cpu(qg, kg, vg).sum().backward(),
        "sdpa_fwd": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
    }
    if n <= dense_max:
        fns["reference_fwd"] = lambda: ref(q, k, v)
    return fns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dense-max", type=int, default=4096)
    args = parser.parse_args()
    print(f"# B=1 H=8 D=64 fp32, phi = elu + 1, normalized; torch {torch.__version__}; {platform.machine()}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print(
        "| N | causal | attncc cpu fwd ms | fwd+bwd ms | dense reference fwd ms | reference/cpu | softmax SDPA fwd ms |"
    )
    print("|---|---|---|---|---|---|---|")
    for n in args.sizes:
        for causal in (True, False):
            t = interleaved(contenders(n, causal, args.dense_max), args.reps)
            ref = f"{t['reference_fwd'] * 1e3:.1f}" if "reference_fwd" in t else "skipped"
            ratio = f"{t['reference_fwd'] / t['cpu_fwd']:.1f}x" if "reference_fwd" in t else "-"
            print(f"| {n} | {causal} | {t['cpu_fwd'] * 1e3:.1f} | {t['cpu_fwd_bwd'] * 1e3:.1f} | {ref} | {ratio} | "
                  f"{t['sdpa_fwd'] * 1e3:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
