"""Block-map build time: attncc's symbolic analysis vs FlexAttention's create_block_mask.

Both build the map of the same mask at the same tile size (128 x 128) for one head; the
ratio is flex / attncc. FlexAttention runs in a child process with a memory cap (it
materializes the Q x KV mask and would otherwise exhaust the machine at 64K); a failure there
is reported, not hidden. Where both finish, the two maps are checked to be identical.

    python benchmarks/block_map.py                 # 4K, 16K, 64K and the 1M-token maps
    python benchmarks/block_map.py --sizes 4096    # quick
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import re
import resource
import time
import tracemalloc

import torch

import attncc as ac

BLOCK = 128
FLEX_MEMORY_GB = 16
MASKS = ["causal", "sliding_window", "prefix_lm", "document", "neighborhood_2d"]


def doc_ids(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(200, 2000, (n // 200 + 1,), generator=g)
    return torch.repeat_interleave(torch.arange(len(lengths)), lengths)[:n]


def grid_of(n: int) -> tuple[int, int]:
    side = round(n**0.5)
    assert side * side == n, n
    return side, side


def attncc_spec(name: str, n: int) -> ac.AttentionSpec:
    masks = {
        "causal": lambda: ac.causal(),
        "sliding_window": lambda: ac.sliding_window(1023),
        "prefix_lm": lambda: ac.prefix_lm(n // 4),
        "document": lambda: ac.causal() & ac.document(ac.tensor("doc")),
        "neighborhood_2d": lambda: ac.neighborhood(grid_of(n), (15, 15)),
    }
    return ac.AttentionSpec(name=name, num_heads=1, head_dim=64, mask=masks[name]())


def flex_mask_mod(name: str, n: int):  # written the way FlexAttention users write them
    if name == "causal":
        return lambda b, h, q, kv: q >= kv
    if name == "sliding_window":
        return lambda b, h, q, kv: (q >= kv) & (q - kv <= 1023)
    if name == "prefix_lm":
        return lambda b, h, q, kv: (kv < n // 4) | (q >= kv)
    if name == "document":
        ids = doc_ids(n)
        return lambda b, h, q, kv: (ids[q] == ids[kv]) & (q >= kv)
    side, _ = grid_of(n)

    def na(b, h, q, kv):
        qx, qy, kx, ky = q // side, q % side, kv // side, kv % side
        cx = torch.clamp(qx, 7, side - 8)
        cy = torch.clamp(qy, 7, side - 8)
        return ((kx - cx).abs() <= 7) & ((ky - cy).abs() <= 7)

    return na


def run_attncc(name: str, n: int) -> tuple[float, ac.blockmap.BlockMap, int]:
    kern = ac.compile(attncc_spec(name, n), target="reference", tiles=(BLOCK, BLOCK))
    runtime = {"doc": doc_ids(n)} if name == "document" else {}
    kern.block_map(n, n, **runtime)  # warm: the per-kernel symbolic recipe is built once
    best, bm = float("inf"), None
    for _ in range(5):
        start = time.perf_counter()
        bm = kern.block_map(n, n, **runtime)
        best = min(best, time.perf_counter() - start)
    assert bm is not None
    tracemalloc.start()  # memory in a separate, untimed run: tracing slows Python down
    kern.block_map(n, n, **runtime)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return best, bm, peak


def _flex_child(name: str, n: int, out: mp.Queue) -> None:
    limit = FLEX_MEMORY_GB * 2**30
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        from torch.nn.attention.flex_attention import create_block_mask

        fn = flex_mask_mod(name, n)
        create_block_mask(fn, 1, 1, min(n, 1024), min(n, 1024), device="cpu", BLOCK_SIZE=BLOCK)  # warm
        start = time.perf_counter()
        bm = create_block_mask(fn, 1, 1, n, n, device="cpu", BLOCK_SIZE=BLOCK)
        seconds = time.perf_counter() - start
        dense = bm.to_dense()[0, 0].numpy().tolist() if n <= 16384 else None
        out.put({"seconds": seconds, "dense": dense})
    except BaseException as exc:  # reported to the parent, which prints it in the table
        asked = re.search(r"allocate (\d+) bytes", str(exc))
        why = f"out of memory (asked for {int(asked.group(1)) / 2**30:.0f} GiB)" if asked else str(exc)[:100]
        out.put({"error": why})


def run_flex(name: str, n: int, timeout: float = 600.0) -> dict:
    ctx = mp.get_context("spawn")
    q: mp.Queue = ctx.Queue()
    proc = ctx.Process(target=_flex_child, args=(name, n, q))
    proc.start()
    try:
        result = q.get(timeout=timeout)
    except Exception:
        result = {"error": f"no result in {timeout:.0f} s (exit code {proc.exitcode})"}
    proc.join(5)
    if proc.is_alive():
        proc.kill()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--masks", nargs="+", default=MASKS)
    parser.add_argument("--million", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    print(
        f"# block-map build, one head, {BLOCK}x{BLOCK} tiles; torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}"
    )
    print("| mask | tokens | attncc ms | flex ms | flex/attncc | attncc peak MiB | computed tiles | same map |")
    print("|---|---|---|---|---|---|---|---|")
    for n in args.sizes:
        for name in args.masks:
            secs, bm, peak = run_attncc(name, n)
            flex = run_flex(name, n)
            if "error" in flex:
                flex_ms, ratio, same = "failed: " + flex["error"], "-", "-"
            else:
                flex_ms, ratio = f"{flex['seconds'] * 1e3:.1f}", f"{flex['seconds'] / secs:.0f}x"
                same = "-" if flex["dense"] is None else str(bm.to_dense()[0].numpy().tolist() == flex["dense"])
            print(
                f"| {name} | {n} | {secs * 1e3:.2f} | {flex_ms} | {ratio} | {peak / 2**20:.1f} | "
                f"{bm.num_computed_blocks} ({bm.computed_fraction:.1%}) | {same} |",
                flush=True,
            )
    if args.million:
        for name in ("causal", "sliding_window"):
            secs, bm, peak = run_attncc(name, 2**20)
            print(
                f"| {name} | 1048576 | {secs * 1e3:.2f} | not run | - | {peak / 2**20:.1f} | "
                f"{bm.num_computed_blocks} ({bm.computed_fraction:.2%}) | - |",
                flush=True,
            )
    print(json.dumps({"note": "flex/attncc > 1 means attncc is faster"}))


if __name__ == "__main__":
    main()
