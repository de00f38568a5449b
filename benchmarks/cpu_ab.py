"""A/B of the cpu target's runtime (codegen/cpu_template.py) at a git revision against the working tree's, in one
process, in ABBA order: the honest way to measure a kernel change on a shared machine, where the same command moves
by 10-30% between runs and even two identical kernels timed side by side differ by a few percent with their order.

    python benchmarks/cpu_ab.py --base f9e6ad0                       # causal and sliding window, D=64/128, bf16
    python benchmarks/cpu_ab.py --base HEAD~1 --masks causal --head-dims 128 --dtypes float32
    python benchmarks/cpu_ab.py --base HEAD~1 --decode --dtypes float32 float16 bfloat16   # decoding, forward only

Four kernels are compiled, A B B A (A: the runtime at ``--base``, B: the working tree's; the spec's scale differs in
the last bits so that each gets a library of its own), and every round times the forward and the backward (alone, on
a retained graph) of all four; the table gives each side's best time (the geometric mean of its two kernels' bests)
and B's speedup. Only the runtime differs: the Python side is the working tree's, so the base's runtime must take
today's arguments (the ones added since, at the end of the list, go unread by an older runtime).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from cpu import B, H, attncc_mask, doc_ids  # benchmarks/cpu.py

import attncc as ac
from attncc.codegen import cpu_template

ROOT = Path(__file__).resolve().parent.parent


def runtime_at(rev: str) -> str:
    """The RUNTIME text of codegen/cpu_template.py at git revision ``rev``."""
    text = subprocess.run(
        ["git", "show", f"{rev}:codegen/cpu_template.py"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cpu_template_base.py"
        path.write_text(text)
        spec = importlib.util.spec_from_file_location("cpu_template_base", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return str(module.RUNTIME)


def ab(name: str, d: int, dtype: torch.dtype, n: int, reps: int, runtimes: dict[str, str]) -> tuple[float, ...]:
    """(A fwd, B fwd, A bwd, B bwd) seconds, each the geometric mean of its two kernels' best."""
    extra = {"doc": doc_ids(n)} if name == "document" else {}
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, n, d, generator=g).to(dtype).requires_grad_() for _ in range(3))
    runs = []
    mine = cpu_template.RUNTIME
    try:
        for i, side in enumerate("ABBA"):
            cpu_template.RUNTIME = runtimes[side]
            scale = d**-0.5 * (1 - 1e-6 * (i + 1))
            spec = ac.AttentionSpec(num_heads=H, head_dim=d, mask=attncc_mask(name, n), scale=scale)
            kern = ac.compile(spec, target="cpu")
            o = kern(q, k, v, **extra)
            do = torch.randn(o.shape, generator=g).to(dtype)
            torch.autograd.grad(o, (q, k, v), do, retain_graph=True)  # (builds the backward's kernel)
            runs.append((side, kern, o, do, [], []))
    finally:
        cpu_template.RUNTIME = mine
    for _ in range(reps):
        for _side, kern, o, do, fwd, bwd in runs:
            start = time.perf_counter()
            kern(q, k, v, **extra)
            fwd.append(time.perf_counter() - start)
            start = time.perf_counter()
            torch.autograd.grad(o, (q, k, v), do, retain_graph=True)
            bwd.append(time.perf_counter() - start)

    def best(side: str, at: int) -> float:
        found = [min(r[at]) for r in runs if r[0] == side]
        return math.exp(sum(map(math.log, found)) / len(found))

    return best("A", 4), best("B", 4), best("A", 5), best("B", 5)


def ab_decode(
    sq: int, skv: int, heads: tuple[int, int], dtype: torch.dtype, reps: int, runtimes: dict[str, str]
) -> tuple[float, float]:
    """(A, B) forward seconds of decoding shapes (B=1, ``heads``: query and kv heads, D=64, the new rows at the end
    of the keys), each the geometric mean of its two kernels' best."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads[0], sq, 64, generator=g).to(dtype)
    k, v = (torch.randn(1, heads[1], skv, 64, generator=g).to(dtype) for _ in range(2))
    kerns = []
    mine = cpu_template.RUNTIME
    try:
        for i, side in enumerate("ABBA"):
            cpu_template.RUNTIME = runtimes[side]
            mask = ac.causal(align="bottom_right")
            scale = 0.125 * (1 - 1e-6 * i)
            spec = ac.AttentionSpec(num_heads=heads[0], num_kv_heads=heads[1], head_dim=64, mask=mask, scale=scale)
            kerns.append((side, ac.compile(spec, target="cpu"), []))
            kerns[-1][1](q, k, v)
    finally:
        cpu_template.RUNTIME = mine
    for _ in range(reps):
        for _side, kern, times in kerns:
            start = time.perf_counter()
            kern(q, k, v)
            times.append(time.perf_counter() - start)
    best = {side: math.exp(sum(math.log(min(t)) for s, _, t in kerns if s == side) / 2) for side in "AB"}
    return best["A"], best["B"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", required=True, help="git revision of side A's runtime")
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--masks", nargs="+", default=["causal", "sliding_window"])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16"])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--decode", action="store_true", help="decoding shapes (forward): Sq 1 and 16, Skv 4K and 16K")
    parser.add_argument("--heads", type=int, nargs=2, default=[32, 8], help="--decode's query and kv heads")
    parser.add_argument("--q-lens", type=int, nargs="+", default=[1, 16], help="--decode's query lengths")
    args = parser.parse_args()
    runtimes = {"A": runtime_at(args.base), "B": cpu_template.RUNTIME}
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    if args.decode:
        print(f"# A: runtime at {args.base}; B: working tree (HEAD {head.strip()}); B=1 H, Hkv={args.heads} D=64; "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
        print("| dtype | Sq | Skv | A ms | B ms | B speedup |")
        print("|---|---|---|---|---|---|")
        for dt in args.dtypes:
            for skv in (4096, 16384):
                for sq in args.q_lens:
                    a, b = ab_decode(sq, skv, tuple(args.heads), getattr(torch, dt), args.reps, runtimes)
                    print(f"| {dt} | {sq} | {skv} | {a * 1e3:.2f} | {b * 1e3:.2f} | {a / b:.2f}x |", flush=True)
        return
    print(f"# A: runtime at {args.base}; B: working tree (HEAD {head.strip()}); B={B} H={H} N={args.n}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    print("| mask | D | dtype | A fwd ms | B fwd ms | fwd B speedup | A bwd ms | B bwd ms | bwd B speedup |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dt in args.dtypes:
        for name in args.masks:
            for d in args.head_dims:
                af, bf, ab_, bb = ab(name, d, getattr(torch, dt), args.n, args.reps, runtimes)
                print(
                    f"| {name} | {d} | {dt} | {af * 1e3:.1f} | {bf * 1e3:.1f} | {af / bf:.2f}x | {ab_ * 1e3:.1f} | "
                    f"{bb * 1e3:.1f} | {ab_ / bb:.2f}x |",
                    flush=True,
                )


if __name__ == "__main__":
    sys.exit(main())
