"""Compile time on the cpu target: the runtime (fixed forward and backward) is built once per machine and tile
size; a new spec compiles only its own small library. Side by side with FlexAttention's first call.

    .venv/bin/python benchmarks/compile_time.py [--specs 6]

Rows: "runtime + spec" is an empty cache (the first spec ever, per tile size); "new spec" is a spec never seen
before with the runtime cached; "warm load" is a spec compiled before, loaded from the disk cache by a fresh
kernel object. FlexAttention's first call is torch.compile of flex_attention with that spec's block mask
(Inductor's caches on, as a user would have them after the first spec).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import attncc as ac
from attncc import config
from attncc.codegen import cpu


def specs(n: int) -> list[tuple[ac.AttentionSpec, object]]:
    """``n`` different specs (new masks and score mods) and the same mask as a FlexAttention mask_mod."""
    out = []
    for i in range(n):
        window = 64 + 37 * i

        def mask_mod(b, h, q, kv, window=window):  # type: ignore[no-untyped-def]
            return (q >= kv) & (q - kv <= window)

        spec = ac.AttentionSpec(
            name=f"compile_time_{i}",
            num_heads=8,
            head_dim=64,
            mask=ac.causal() & ac.sliding_window(window),
            score_mod=ac.softcap(10.0 + i),
        )
        out.append((spec, mask_mod))
    return out


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--specs", type=int, default=6)
    args = parser.parse_args()
    rows: dict[str, list[float]] = {"runtime + spec": [], "new spec": [], "warm load": [], "flex first call": []}
    q = torch.randn(1, 8, 512, 64)
    with tempfile.TemporaryDirectory() as tmp:
        with config.override(cache_dir=Path(tmp) / "first", always_compile=False):
            spec0 = specs(1)[0][0]
            rows["runtime + spec"].append(timed(lambda: ac.compile(spec0, target="cpu", tiles=(64, 64)).cpu_kernel()))
        with config.override(cache_dir=Path(tmp) / "shared", always_compile=False):
            cpu.CpuKernel(ac.compile(spec0, target="cpu", tiles=(64, 64)).plan)  # the 64x64 runtime, built once here
            for spec, mask_mod in specs(args.specs)[1:]:
                kern = ac.compile(spec, target="cpu", tiles=(64, 64))
                rows["new spec"].append(timed(kern.cpu_kernel))
                rows["warm load"].append(timed(lambda kern=kern: cpu.CpuKernel(kern.plan)))
                block = create_block_mask(mask_mod, 1, 1, 512, 512, device="cpu")
                soft = 10.0 + len(rows["new spec"])

                def score_mod(s, b, h, qi, kv, soft=soft):  # type: ignore[no-untyped-def]
                    return soft * torch.tanh(s / soft)

                torch._dynamo.reset()
                compiled = torch.compile(flex_attention)
                rows["flex first call"].append(
                    timed(lambda compiled=compiled, block=block, score_mod=score_mod: compiled(
                        q, q, q, block_mask=block, score_mod=score_mod))
                )  # fmt: skip
    print("| what | median s | min s | max s | n |")
    print("|---|---|---|---|---|")
    for name, times in rows.items():
        print(f"| {name} | {statistics.median(times):.3f} | {min(times):.3f} | {max(times):.3f} | {len(times)} |")


if __name__ == "__main__":
    main()
