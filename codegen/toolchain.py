"""Compile generated C++ into a shared library, cached on disk under a content hash.

The key covers the source, the flags, the compiler's version, the CPU's instruction-set flags
(``-march=native`` binaries are not portable) and attncc's own codegen sources, so editing attncc
or moving the cache to another machine never reuses a stale binary. Writes are atomic.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import hashlib
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from attncc import config, diskcache
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
# x86 only: gcc tunes recent CPUs (Sapphire Rapids, Zen 4) to 256-bit vectors, so the loops it vectorizes would
# not use AVX-512's full width
X86_FLAGS = ["-mprefer-vector-width=512"]
NO_AMX = ["-mno-amx-tile", "-mno-amx-bf16", "-mno-amx-int8"]
UNIT_BREAK = "// ---- attncc: next translation unit ----\n"  # see split_units


def isa_flags(isa: str) -> list[str]:
    """Compiler flags that build for ``isa`` (see ``config.Config.cpu_isa``) instead of the whole CPU.

    >>> isa_flags("native"), isa_flags("portable")
    ([], ['-march=x86-64'])

    ``native`` builds for everything the CPU has (AMX tiles included); ``avx512`` for AVX-512 with its
    BF16 dot products but without AMX, so the AVX512_BF16 path can be tested on an AMX machine.
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
    return ["-mno-avx512f"] if isa == "avx2" else NO_AMX  # avx512: AVX-512 (and AVX512_BF16), AMX left out


def bf16_register_blocks(isa: str) -> bool:
    """Whether the cpu target's native bf16 backward, built for ``isa``, runs AVX512_BF16 register blocks (which skip
    inside partial tiles) rather than AMX tiles: the CPU has AVX512_BF16, and AMX is absent or left out (``avx512``).
    The cost model's backward tiles depend on it (``costmodel.backward_tiles``)."""
    flags = cpu_flags()
    return "avx512_bf16" in flags and (isa == "avx512" or (isa == "native" and "amx_bf16" not in flags))


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
    x86 = X86_FLAGS if os.uname().machine in ("x86_64", "AMD64") else []
    return FLAGS + x86 + isa_flags(config.get().cpu_isa)


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


KEY_SYMBOL = "attncc_cache_key"  # every library exports its cache key: a foreign one is refused after dlopen


def build(source: str, name: str, force: bool = False) -> tuple[Path, bool]:
    """(path of the shared library, whether it was compiled now rather than found cached).

    An entry is a record ``<name>-<key>.json`` (key, library file, size, sha256) published by an
    atomic rename after the library itself: a reader sees a complete entry or none. A record or
    library that fails validation (missing, truncated, corrupt, another key's) is discarded and
    rebuilt, never loaded. Each build gets a library file of its own name, so a process never
    reuses a stale ``dlopen`` handle of an earlier build at the same path.
    """
    folder = diskcache.folder("cpu")
    key = cache_key(source)
    record = folder / f"{name}-{key}.json"
    always = config.get().always_compile
    if not (force or always):
        lib = valid_entry(record, key)
        if lib is not None:
            return lib, False
    with _locked(folder / f".{name}-{key}.lock"):  # ranks of one job compiling one kernel: one builds, all use it
        if not always:
            lib = valid_entry(record, key)  # (a bad entry was discarded before a forced build: this one is new)
            if lib is not None:
                return lib, False
        return _compile(source, folder, name, key, record), True


def _kill_group(job: subprocess.Popen[str]) -> None:
    """Stop a compiler job and the processes it started (the driver alone would leave cc1plus writing into the
    build folder while it is removed), then reap it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):  # already gone
        os.killpg(job.pid, signal.SIGKILL)
    job.wait()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (created), held for the block, so concurrent processes that miss
    the same entry wait for one build instead of each compiling (and unlinking each other's libraries)."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def valid_entry(record: Path, key: str) -> Path | None:
    """The library a cache record names, when record and file check out; else None (and the bad
    parts are discarded)."""
    if not record.exists():
        return None
    try:
        meta = json.loads(record.read_text())
        lib = record.parent / str(meta["file"])
        problem = (
            "it records another key"
            if meta.get("key") != key
            else "its library is missing"
            if not lib.exists()
            else f"its library has {lib.stat().st_size} bytes, the record says {meta['size']}"
            if lib.stat().st_size != meta["size"]
            else "its library's checksum differs from the record"
            if diskcache.sha256(lib) != meta["sha256"]
            else None
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        problem = f"unreadable record ({type(exc).__name__}: {exc})"
    if problem is None:
        return lib
    diskcache.discard(record, problem)
    return None


def _compile(source: str, folder: Path, name: str, key: str, record: Path) -> Path:
    src = folder / f"{name}-{key}.cpp"  # kept beside the library for people to read
    diskcache.write_atomic(src, source)
    units = [*split_units(source), f'extern "C" const char {KEY_SYMBOL}[] = "{key}";\n']
    # private: no writer shares it; a failed build's leftovers never mask the compiler's message
    with tempfile.TemporaryDirectory(dir=folder, prefix=".build-", ignore_cleanup_errors=True) as tmp:
        out = Path(tmp) / "lib.so"
        start = time.perf_counter()
        files = [Path(tmp) / f"unit{i}.cpp" for i in range(len(units))]
        for path, text in zip(files, units):
            path.write_text(text)
        objects = [Path(tmp) / f"unit{i}.o" for i in range(len(files))]
        jobs = [
            subprocess.Popen(
                [compiler(), *flags(), "-c", str(path), "-o", str(obj)],
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,  # its own process group: killing it stops cc1plus and as too
            )
            for path, obj in zip(files, objects)
        ]  # the units compile in parallel
        for job in jobs:
            _, err = job.communicate()
            if job.returncode != 0:
                for other in jobs:
                    _kill_group(other)
                raise LoweringError(
                    f"the C++ compiler failed on the generated kernel {src} (exit {job.returncode}):\n"
                    f"{err.strip()[-4000:]}"
                )
        done = subprocess.run(
            [compiler(), *LINK_FLAGS, *map(str, objects), "-o", str(out)], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise LoweringError(f"linking the generated kernel {src} failed:\n{done.stderr.strip()[-4000:]}")
        lib = folder / f"{name}-{key}-{secrets.token_hex(6)}.so"
        meta = {"key": key, "file": lib.name, "size": out.stat().st_size, "sha256": diskcache.sha256(out)}
        os.replace(out, lib)
        diskcache.write_atomic(record, json.dumps(meta))
    for old in folder.glob(f"{name}-{key}-*.so"):  # earlier builds: unlinking is safe for processes that map them
        if old != lib:
            old.unlink(missing_ok=True)
    log.info("compiled %s in %.2f s", lib.name, time.perf_counter() - start)
    return lib


def load(source: str, name: str) -> tuple[ctypes.CDLL, Path, bool]:
    """Build (or find) and ``dlopen`` the library of ``source``; its exported key must be this
    source's key, else the entry is discarded and rebuilt once."""
    key = cache_key(source)
    force = False
    for _ in range(3):
        path, fresh = build(source, name, force=force)
        try:
            lib = ctypes.CDLL(str(path))
            found = (ctypes.c_char * (len(key) + 1)).in_dll(lib, KEY_SYMBOL).value.decode()
        except (OSError, ValueError) as exc:  # removed by another process's rebuild, or no key symbol
            if not path.exists():  # replaced by another process's newer build: its record names the new file
                log.debug("attncc: %s was replaced by another process's build; loading that one", path.name)
                force = False
                continue
            found = f"<{type(exc).__name__}: {exc}>"
        if found == key:
            return lib, path, fresh
        diskcache.discard(path, f"its library reports key {found}, expected {key}")
        force = True
    raise LoweringError(f"could not load a valid build of {name}-{key} from {path.parent} after 3 attempts")
