"""Compile generated C++ into a shared library, cached on disk under a content hash.

The key covers the source, the flags, the compiler's version, the CPU's instruction-set flags
(``-march=native`` binaries are not portable) and attncc's own codegen sources, so editing attncc
or moving the cache to another machine never reuses a stale binary. Writes are atomic.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from attncc import config
from attncc.errors import LoweringError, UnsupportedError

log = logging.getLogger("attncc.codegen.toolchain")

FLAGS = [
    "-O3",
    "-march=native",
    "-std=c++17",
    "-ffp-contract=fast",
    "-fopenmp",
    "-fPIC",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-Wall",
    "-Wno-unused-function",
    "-Wno-unknown-pragmas",
]
LINK_FLAGS = ["-shared", "-fopenmp"]
UNIT_BREAK = "// ---- attncc: next translation unit ----\n"  # see split_units


def isa_flags(isa: str) -> list[str]:
    """Compiler flags that build for ``isa`` (see ``config.Config.cpu_isa``) instead of the whole CPU.

    >>> isa_flags("native"), isa_flags("portable")
    ([], ['-march=x86-64'])
    """
    if isa == "native":
        return []
    if os.uname().machine not in ("x86_64", "AMD64"):
        if isa == "portable":
            return []
        raise UnsupportedError(f"ATTNCC_CPU_ISA={isa} is an x86 instruction set; this CPU is {os.uname().machine}")
    if isa == "portable":
        return ["-march=x86-64"]  # SSE2 only: the kernels take their scalar/BLAS paths
    wanted = {"avx2": ("avx2", "fma"), "avx512": ("avx512f",)}[isa]
    if missing := [f for f in wanted if f not in cpu_flags()]:
        raise UnsupportedError(f"ATTNCC_CPU_ISA={isa}: this CPU lacks {missing}; choose native, avx2 or portable")
    return ["-mno-avx512f"] if isa == "avx2" else []


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's instruction-set flags (/proc/cpuinfo), empty where unknown."""
    try:
        line = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        return frozenset()
    return frozenset(line.partition(":")[2].split())


def flags() -> list[str]:
    """FLAGS for the instruction set in force (ATTNCC_CPU_ISA): later -march/-mno flags win."""
    return FLAGS + isa_flags(config.get().cpu_isa)


def split_units(source: str) -> list[str]:
    """The translation units of ``source``: the text before the first UNIT_BREAK line is shared
    (includes, helpers) and prefixed to each later part; without a break, the source is one unit."""
    shared, *parts = source.split(UNIT_BREAK)
    return [shared + part for part in parts] if parts else [shared]


@functools.lru_cache(maxsize=1)
def compiler() -> str:
    """The C++ compiler to use, or UnsupportedError saying how to get one."""
    wanted = config.get().cxx
    for name in [wanted] if wanted else ["g++", "c++", "clang++"]:
        path = shutil.which(name)
        if path:
            return path
    raise UnsupportedError(
        f"no C++ compiler found ({wanted or 'g++, c++, clang++'}); install one or set ATTNCC_CXX; "
        "target='auto' falls back to the reference target"
    )


@functools.lru_cache(maxsize=1)
def _fingerprint() -> str:
    version = subprocess.run([compiler(), "--version"], capture_output=True, text=True, check=False).stdout
    try:
        cpu = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        cpu = os.uname().machine
    here = Path(__file__).parent
    own = "".join(p.read_text() for p in sorted(here.glob("*.py")))
    return hashlib.sha256("\n".join([version, cpu, own, " ".join(FLAGS + LINK_FLAGS)]).encode()).hexdigest()


def cache_key(source: str) -> str:
    return hashlib.sha256((_fingerprint() + " ".join(flags()) + source).encode()).hexdigest()[:24]


def build(source: str, name: str) -> tuple[Path, bool]:
    """(path of the shared library, whether it was compiled now rather than found cached)."""
    cfg = config.get()
    folder = cfg.cache_dir / "cpu"
    folder.mkdir(parents=True, exist_ok=True)
    key = cache_key(source)
    lib = folder / f"{name}-{key}.so"
    if lib.exists() and not cfg.always_compile:
        return lib, False
    src = folder / f"{name}-{key}.cpp"
    src.write_text(source)
    units = split_units(source)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        out = Path(tmp) / lib.name
        start = time.perf_counter()
        files = [src] if len(units) == 1 else [folder / f"{name}-{key}.{i}.cpp" for i in range(len(units))]
        if len(units) > 1:
            for path, text in zip(files, units):
                path.write_text(text)
        objects = [Path(tmp) / f"unit{i}.o" for i in range(len(files))]
        jobs = [
            subprocess.Popen([compiler(), *flags(), "-c", str(path), "-o", str(obj)], stderr=subprocess.PIPE, text=True)
            for path, obj in zip(files, objects)
        ]  # the units compile in parallel
        for path, job in zip(files, jobs):
            _, err = job.communicate()
            if job.returncode != 0:
                for other in jobs:
                    other.kill()
                    other.wait()
                raise LoweringError(
                    f"the C++ compiler failed on the generated kernel {path} (exit {job.returncode}):\n"
                    f"{err.strip()[-4000:]}"
                )
        done = subprocess.run(
            [compiler(), *LINK_FLAGS, *map(str, objects), "-o", str(out)], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise LoweringError(f"linking the generated kernel {src} failed:\n{done.stderr.strip()[-4000:]}")
        os.replace(out, lib)
    log.info("compiled %s in %.2f s", lib.name, time.perf_counter() - start)
    return lib, True
