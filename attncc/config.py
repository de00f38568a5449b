"""Every environment knob attncc reads, typed, in one place.

Only this module reads ``os.environ``. Tests change knobs with :func:`override`::

    >>> from attncc import config
    >>> with config.override(debug=2):
    ...     config.get().debug
    2
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from attncc.errors import ConfigError


@dataclass(frozen=True)
class Config:
    """A snapshot of attncc's settings.

    dump_dir: ATTNCC_DUMP_DIR; every compiled kernel writes its IR after each pass, its source
        and its block-map picture under this folder.
    cache_dir: ATTNCC_CACHE_DIR; on-disk kernel cache (default ~/.cache/attncc).
    always_compile: ATTNCC_ALWAYS_COMPILE=1 bypasses every cache.
    print_after: ATTNCC_PRINT_AFTER=all|name,...; log the IR after these passes.
    verify: ATTNCC_VERIFY=1 verifies the IR after every pass.
    debug: ATTNCC_DEBUG=0..4 (1 summary, 2 IR in/out, 3 IR after each pass, 4 generated source).
    cxx: ATTNCC_CXX (else CXX, else g++ / c++ on PATH); the C++ compiler of the cpu target.
    triton_interpret: TRITON_INTERPRET=1 (Triton's own switch): Triton kernels run on the CPU.
    cpu_isa: ATTNCC_CPU_ISA=native|avx2|avx512|portable; the instruction set the cpu target builds
        for (default native: what ``-march=native`` finds, AMX tiles included). A lower one tests the
        other code paths on one machine (avx512 leaves AMX out: bf16 then runs AVX512_BF16 dot products);
        asking for one the CPU lacks is an error when the kernel is built.
    """

    dump_dir: Path | None = None
    cache_dir: Path = Path.home() / ".cache" / "attncc"
    always_compile: bool = False
    print_after: tuple[str, ...] = ()
    verify: bool = False
    debug: int = 0
    cxx: str = ""
    triton_interpret: bool = False
    cpu_isa: str = "native"


def _flag(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def from_env(env: dict[str, str] | None = None) -> Config:
    """Read the ATTNCC_* variables (from ``env`` or ``os.environ``)."""
    env = dict(os.environ) if env is None else env
    dump = env.get("ATTNCC_DUMP_DIR")
    cache = env.get("ATTNCC_CACHE_DIR")
    after = env.get("ATTNCC_PRINT_AFTER", "")
    debug = env.get("ATTNCC_DEBUG", "0").strip() or "0"
    if not debug.isdigit():
        raise ConfigError(f"ATTNCC_DEBUG must be an integer 0..4, got {debug!r}")
    return Config(
        dump_dir=Path(dump) if dump else None,
        cache_dir=Path(cache) if cache else Config.cache_dir,
        always_compile=_flag(env.get("ATTNCC_ALWAYS_COMPILE")),
        print_after=tuple(p.strip() for p in after.split(",") if p.strip()),
        verify=_flag(env.get("ATTNCC_VERIFY")),
        debug=int(debug),
        cxx=env.get("ATTNCC_CXX") or env.get("CXX") or "",
        triton_interpret=_flag(env.get("TRITON_INTERPRET")),
        cpu_isa=_isa(env.get("ATTNCC_CPU_ISA", "")),
    )


def knob_logger(name: str) -> logging.Logger:
    """The logger ``name`` made to show INFO records: what ATTNCC_PRINT_AFTER and ATTNCC_DEBUG ask
    for must appear even when the program configured no logging (then a stderr handler is added to
    the ``attncc`` logger, once); a program's own handlers are used where it has them."""
    logger = logging.getLogger(name)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    if not logger.hasHandlers():
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
        logging.getLogger("attncc").addHandler(handler)
    return logger


CPU_ISAS = ("native", "avx2", "avx512", "portable")


def _isa(value: str) -> str:
    isa = value.strip().lower() or "native"
    if isa not in CPU_ISAS:
        raise ConfigError(f"ATTNCC_CPU_ISA must be one of {list(CPU_ISAS)}, got {value!r}")
    return isa


_current: Config | None = None


def get() -> Config:
    """The settings in force (read from the environment once, then cached)."""
    global _current
    if _current is None:
        _current = from_env()
    return _current


@contextlib.contextmanager
def override(**changes: object) -> Iterator[Config]:
    """Temporarily replace some settings, e.g. ``override(verify=True, dump_dir=tmp)``."""
    global _current
    saved = get()
    _current = dataclasses.replace(saved, **changes)  # type: ignore[arg-type]
    try:
        yield _current
    finally:
        _current = saved
