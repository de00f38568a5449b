"""The cpu forward at the cost model's tiles (``plan.tiles``) against the same spec at other tiles, side by side in one
process: the check behind the cost model's cpu constants (attncc/analysis/costmodel.py).

    python benchmarks/cpu_tiles.py                                   # causal, D=64/128/256, fp32 and bf16
    python benchmarks/cpu_tiles.py --masks causal prefix_lm --head-dims 128 --tiles 64x64 128x64 --backward

Each contender is the spec compiled with ``tiles=(bq, bkv)`` (or the model's choice, "model"), twice, in ABBA order
(the scale differs in the last bits, so each is a library of its own); a row gives each contender's best time (the
geometric mean of its two compilations' bests over ``--reps`` rounds that call every contender once).
``--backward`` times the fp32 backward too (alone, on a retained graph), which walks the forward's tiles; the native
bf16 backward walks tiles of its own (``benchmarks/cpu_backward_tiles.py``).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import torch
from cpu import B, H, attncc_mask, doc_ids, interleaved  # benchmarks/cpu.py

import attncc as ac


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--masks", nargs="+", default=["causal"])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--tiles", nargs="+", default=["64x64", "128x64"], help="bq x bkv, each timed with the model's")
    parser.add_argument("--backward", action="store_true", help="time the fp32 backward too")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    print(f"# B={B} H={H} N={args.n}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    header = "| mask | D | dtype | model's tiles | " + "".join(f"{t} fwd ms | " for t in [*args.tiles, "model"])
    if args.backward:
        header += "".join(f"{t} bwd ms | " for t in [*args.tiles, "model"])
    print(header)
    columns = len(args.tiles) + 1
    print("|" + "---|" * (4 + columns * (2 if args.backward else 1)))
    for name in args.masks:
        for d in args.head_dims:
            for dtype in args.dtypes:
                row(name, d, getattr(torch, dtype), args.n, args.tiles, args.reps, args.backward)


def row(name: str, d: int, dtype: torch.dtype, n: int, tiles: list[str], reps: int, backward: bool) -> None:
    """Time the forward (and the fp32 backward: "-" for other dtypes) at each of ``tiles`` and at the model's, and
    print the row."""
    columns = backward
    backward = backward and dtype == torch.float32
    g = torch.Generator().manual_seed(d)
    q, k, v = (torch.randn(B, H, n, d, generator=g).to(dtype).requires_grad_(backward) for _ in range(3))
    extra = {"doc": doc_ids(n)} if name == "document" else {}
    names = [*tiles, "model"]
    fns: dict[str, Callable[[], object]] = {}  # "tag what i": i tells the two compilations of a tag apart
    model = None
    for i, tag in enumerate(names + names[::-1]):  # ABBA
        spec = ac.AttentionSpec(num_heads=H, head_dim=d, mask=attncc_mask(name, n), scale=d**-0.5 * (1 - 1e-3 * i))
        given = {} if tag == "model" else {"tiles": tuple(int(x) for x in tag.split("x"))}
        kern = ac.compile(spec, target="cpu", **given)
        model = kern.plan.tiles if tag == "model" else model
        fns[f"{tag} fwd {i}"] = lambda kern=kern: kern(q, k, v, **extra)
        if backward:
            o = kern(q, k, v, **extra)
            do = torch.randn_like(o)
            fns[f"{tag} bwd {i}"] = lambda o=o, do=do: torch.autograd.grad(o, (q, k, v), do, retain_graph=True)
    best = interleaved(fns, reps)  # (after a warm-up call of each: every library built and loaded)

    def ms(tag: str, what: str) -> str:
        times = [t for key, t in best.items() if key.split()[:2] == [tag, what]]
        return f"{math.exp(sum(map(math.log, times)) / len(times)) * 1e3:.1f}"

    chosen = "x".join(map(str, model or ()))
    cells = [ms(t, "fwd") for t in names] + ([ms(t, "bwd") if backward else "-" for t in names] if columns else [])
    print(f"| {name} | {d} | {str(dtype).removeprefix('torch.')} | {chosen} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
