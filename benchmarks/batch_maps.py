"""Block maps of masks that read runtime tensors per sequence: read at every point vs classified tile by tile.

    python benchmarks/batch_maps.py                          # padded and packed batches, decoding and prefill
    python benchmarks/batch_maps.py --shapes 8x1x1024 8x256x256

A server's batch brings new runtime tensors each call: a left-padded batch's ``attention_mask[b, kv]`` (what
``torch.compile(backend="attncc")`` lifts from a Hugging Face model), per-sequence document ids, each sequence's own
length. Their maps are built at every call (a model's layers then share them by content). Both ways run here in one
process on the same tensors: ``tiling._from_points`` (the mask read at every (batch, head, row, key) point, used up to
``tiling.POINT_MAP_READING`` points) and the classification (range tables of each tensor, then interval analysis per
tile; the bands that read tensors for ``lens``), forced by setting that limit to 0. The maps are checked to agree
wherever the classification decided a tile (it is sound, not always tight: the last column counts the tiles it
leaves partial that the points decide). Shapes are ``BxSqxSkv``; H=32, tiles 64 x 64 (decoding) and the kernel's
own tiles for prefill. The best of ``--reps``.
"""

from __future__ import annotations

import argparse
import functools
import platform
import time
from collections.abc import Callable

import numpy as np
import torch

import attncc as ac
from attncc.analysis import tiling
from attncc.analysis.blockmap import PARTIAL

Tensors = Callable[[int, int, np.random.Generator], dict[str, torch.Tensor]]
MASKS: dict[str, tuple[Callable[[], ac.Expr], Tensors]] = {
    "padded": (  # HF's decoding and prefill mask for a left-padded batch (bottom-right causal, padding per key)
        lambda: ac.causal("bottom_right") & (ac.tensor("attention_mask")[ac.b, ac.kv] != 0),
        lambda B, n, rng: {
            "attention_mask": torch.from_numpy(np.arange(n)[None, :] >= rng.integers(0, n // 2, (B, 1))).long()
        },
    ),
    "packed": (  # each sequence's own packed documents, causal within them
        lambda: ac.causal() & (ac.tensor("doc")[ac.b, ac.q] == ac.tensor("doc")[ac.b, ac.kv]),
        lambda B, n, rng: {"doc": torch.from_numpy(np.sort(rng.integers(0, 6, (B, n)), 1))},
    ),
    "lens": (  # each sequence's own length
        lambda: ac.causal("bottom_right") & (ac.kv < ac.tensor("lens")[ac.b]),
        lambda B, n, rng: {"lens": torch.from_numpy(rng.integers(1, n + 1, B))},
    ),
}


def best(fn: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--masks", nargs="+", choices=sorted(MASKS), default=sorted(MASKS))
    parser.add_argument("--shapes", nargs="+", default=["8x1x1024", "8x1x4096", "32x1x4096", "8x256x256", "8x512x512"])
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    print(f"# H=32; torch {torch.__version__}; {platform.machine()}; best of {args.reps}")
    print("| mask | B x Sq x Skv | points | every point ms | classified ms | classified / every point "
          "| tiles left partial by the classification only |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name in args.masks:
        make, tensors_of = MASKS[name]
        kern = ac.compile(ac.AttentionSpec(num_heads=32, head_dim=64, mask=make(), name=f"batch_maps_{name}"))
        for shape in args.shapes:
            B, sq, skv = (int(x) for x in shape.split("x"))
            tensors = tensors_of(B, skv, np.random.default_rng(0))
            block = (64, 64) if sq == 1 else None

            build = functools.partial(kern.block_map, sq, skv, batch=B, block=block, **tensors)
            points = best(build, args.reps)
            wanted = build()
            real = tiling.POINT_MAP_READING
            tiling.POINT_MAP_READING = 0
            try:
                classified = best(build, args.reps)
                loose, exact = build().states(), wanted.states()
            finally:
                tiling.POINT_MAP_READING = real
            differ = loose != exact  # the classification is sound, not always tight: it may only say partial more
            assert (loose[differ] == PARTIAL).all(), f"{name} {shape}: the two maps contradict each other"
            many = "" if B * sq * skv <= real else " (over the limit: classified both times)"
            print(f"| {name} | {shape} | {B * sq * skv / 1e6:.2f}M{many} | {points * 1e3:.2f} | {classified * 1e3:.2f} "
                  f"| {classified / points:.1f}x | {int(differ.sum())} of {differ.size} |")  # fmt: skip


if __name__ == "__main__":
    main()
