"""The on-disk kernel cache's folders and atomic writes, shared by the cpu and triton targets.

Each target keeps its entries in ``ATTNCC_CACHE_DIR/<kind>``. Every file is written under a
unique temporary name in the same folder and renamed into place, so a reader sees a whole file
or none, whatever other processes do at the same time. A cache directory that cannot be written
(read-only file system, a regular file at the path) is replaced, for this process, by a private
temporary one, with a warning naming the knob.

>>> import tempfile, pathlib
>>> base = pathlib.Path(tempfile.mkdtemp())
>>> write_atomic(base / "x.txt", "hello")
>>> (base / "x.txt").read_text(), sorted(p.name for p in base.iterdir())
('hello', ['x.txt'])
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

from attncc import config

log = logging.getLogger("attncc.diskcache")

_CHECKED: dict[Path, Path] = {}  # a requested folder -> the folder used for it in this process
_PRIVATE: list[Path] = []


def folder(kind: str) -> Path:
    """``ATTNCC_CACHE_DIR/<kind>``, created if needed, or a private temporary folder when that one
    cannot be written (warned once per folder)."""
    wanted = config.get().cache_dir / kind
    if wanted in _CHECKED:
        return _CHECKED[wanted]
    try:
        wanted.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=wanted):
            pass
        used = wanted
    except OSError as exc:
        if not _PRIVATE:
            _PRIVATE.append(Path(tempfile.mkdtemp(prefix="attncc-cache-")))
        used = _PRIVATE[0] / kind
        used.mkdir(parents=True, exist_ok=True)
        log.warning(
            "attncc: the kernel cache %s cannot be written (%s: %s); this process uses the private cache %s "
            "(set ATTNCC_CACHE_DIR to a writable folder to keep kernels between runs)",
            wanted,
            type(exc).__name__,
            exc,
            used,
        )
    _CHECKED[wanted] = used
    return used


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write ``path`` through a uniquely named temporary file in its folder and a rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256(path: Path) -> str:
    """Hex digest of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def discard(path: Path, why: str) -> None:
    """Remove a cache entry that failed validation, saying why (another process may have removed it)."""
    log.warning("attncc: discarding cache entry %s: %s; it is rebuilt", path, why)
    path.unlink(missing_ok=True)
