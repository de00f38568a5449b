"""Training step (forward + backward) with a learned relative-position bias on the CPU, side by side.

    python benchmarks/learned_bias.py                  # N = 1024, 2048, 4096
    python benchmarks/learned_bias.py --sizes 2048 --reps 3

B=1, H=8, D=64, causal mask, a T5-style table [H, 2 * 128 + 1] read by the score mod, which
requires grad. Contenders, in one process, timed in interleaved rounds (best of ``--reps``):

- attncc cpu: the generated C++ forward and backward; the table's gradient is accumulated in the
  backward from per-thread partial sums.
- attncc reference: the dense O(S^2) PyTorch program attncc generates; before the cpu backward
  learned to differentiate tables, every call with a learnable table ran this.
- SDPA: ``scaled_dot_product_attention`` with the bias gathered into a dense [H, S, S] float mask
  (causal folded in as -inf), what a PyTorch user writes; autograd differentiates the gather.

FlexAttention is not a contender: it has no CPU backward.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import attncc as ac

B, H, D, MAX_DISTANCE = 1, 8, 64, 128


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    n = q.shape[2]
    rel = (torch.arange(n)[None, :] - torch.arange(n)[:, None]).clamp(-MAX_DISTANCE, MAX_DISTANCE) + MAX_DISTANCE
    bias = table[:, rel].masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0))


def _step(fn: Callable[..., torch.Tensor], leaves: list[torch.Tensor]) -> None:
    out = fn(*leaves)
    torch.autograd.grad(out.sum(), leaves)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    spec = ac.AttentionSpec(
        num_heads=H,
        head_dim=D,
        mask=ac.causal(),
        score_mod=ac.relative_bias(ac.tensor("table"), MAX_DISTANCE),
    )
    cpu, ref = ac.compile(spec, target="cpu"), ac.compile(spec, target="reference")
    contenders: dict[str, Callable[..., torch.Tensor]] = {
        "attncc cpu": lambda q, k, v, t: cpu(q, k, v, table=t),
        "attncc reference": lambda q, k, v, t: ref(q, k, v, table=t),
        "SDPA (dense bias)": _sdpa,
    }
    print(
        f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print("| N | " + " | ".join(f"{name} ms" for name in contenders) + " | reference / cpu | SDPA / cpu |")
    print("|---|" + "---|" * (len(contenders) + 2))
    for n in args.sizes:
        g = torch.Generator().manual_seed(n)
        leaves = [torch.randn(B, H, n, D, generator=g).requires_grad_() for _ in range(3)]
        leaves.append((torch.randn(H, 2 * MAX_DISTANCE + 1, generator=g) * 0.1).requires_grad_())
        best = dict.fromkeys(contenders, float("inf"))
        for fn in contenders.values():  # warm-up (builds, allocations)
            _step(fn, leaves)
        for _ in range(args.reps):
            for name, fn in contenders.items():
                start = time.perf_counter()
                _step(fn, leaves)
                best[name] = min(best[name], time.perf_counter() - start)
        ms = [best[name] * 1e3 for name in contenders]
        print(
            f"| {n} | " + " | ".join(f"{m:.1f}" for m in ms) + f" | {ms[1] / ms[0]:.2f}x | {ms[2] / ms[0]:.2f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
