"""The machine's fp32 FMA peak, the denominator of the "% of peak" figures in BENCHMARKS.md.

    python benchmarks/fma_peak.py

Then times torch.mm in fp32 and bf16 (oneDNN uses AVX512_BF16 / AMX where the CPU has them): the
denominators of the bf16 figures.

Compiles a loop of 12 independent 8-lane (AVX2; 16 with AVX-512 via -march=native) FMA chains with
the system compiler and runs one copy per core at once; prints GFLOP/s per core and their sum. Under
``ATTNCC_CPU_ISA=avx2`` it is built as the cpu target's kernels then are (no AVX-512): the AVX2 peak, the
denominator of an AVX2 build's figures.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from attncc import config
from attncc.codegen import toolchain

SOURCE = r"""
#include <chrono>
#include <cstdio>
#if defined(__AVX512F__)
constexpr int VW = 16;
#else
constexpr int VW = 8;
#endif
typedef float vf __attribute__((vector_size(VW * 4)));
int main() {
  vf c[12];
  for (int i = 0; i < 12; ++i) c[i] = vf{} + i * 0.001f;
  vf a = vf{} + 0.9999f, b = vf{} + 0.0001f;
  const long iters = 200000000;
  auto t0 = std::chrono::steady_clock::now();
  for (long it = 0; it < iters; ++it) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) c[i] = c[i] * a + b;
    asm volatile("" : "+x"(a));
  }
  double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  float s = 0;
  for (int i = 0; i < 12; ++i) s += c[i][0];
  std::printf("%.1f %g\n", iters * 12.0 * VW * 2 / dt / 1e9, s);
}
"""


def measure() -> list[float]:
    """GFLOP/s of each core, all cores running the FMA loop at once (about 2 s)."""
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "peak.cpp", Path(tmp) / "peak"
        src.write_text(SOURCE)
        subprocess.run(
            [
                toolchain.compiler(),
                "-O2",
                "-march=native",
                *toolchain.isa_flags(config.get().cpu_isa),
                "-ffp-contract=fast",
                str(src),
                "-o",
                str(exe),
            ],
            check=True,
        )
        runs = [subprocess.Popen([str(exe)], stdout=subprocess.PIPE, text=True) for _ in range(cores)]
        return [float(r.communicate()[0].split()[0]) for r in runs]


def matmul_rate(dtype: torch.dtype, n: int = 4096, reps: int = 5) -> float:
    """GFLOP/s of torch.mm on n x n matrices of ``dtype`` (best of ``reps``): what oneDNN/MKL reach here."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(reps))
    return 2 * n**3 / best / 1e9


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    per_core = measure()
    print(
        f"fp32 FMA peak: {sum(per_core):.1f} GFLOP/s on {len(per_core)} cores "
        f"({', '.join(f'{x:.1f}' for x in per_core)})"
    )
    for dtype in (torch.float32, torch.bfloat16):
        print(f"torch.mm {str(dtype).removeprefix('torch.')} at 4096^2: {matmul_rate(dtype):.1f} GFLOP/s")


if __name__ == "__main__":
    main()
