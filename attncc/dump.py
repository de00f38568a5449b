"""Write a kernel's stages to a folder: IR after every pass, source, metadata."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from attncc import costmodel, picture
from attncc.errors import AttnccError

log = logging.getLogger("attncc.dump")

if TYPE_CHECKING:
    from attncc.api import Kernel


def _picture(kern: Kernel, path: Path) -> str:
    """Draw the block map at a representative length, when it needs no runtime tensors.

    Never raises: a dump must not break a compile; a failure becomes a note in meta.json.
    """
    if kern.spec.runtime_tensors():
        return "not drawn: the map depends on runtime tensors; use kern.block_map(...) or `attncc show`"
    n = costmodel.representative_length(kern.spec)
    lengths = [int(t.shape[0]) for t in kern.spec.captured.values() if t.dim() == 1]
    n = min([n, *lengths])
    try:
        bm = kern.block_map(n, n)
        picture.save(bm, path / "blockmap.png", kern.spec.name, kern.spec.head_dim, kern.spec.num_heads)
    except (AttnccError, ValueError) as exc:
        log.info("dump of %r: block map not drawn: %s", kern, exc)
        return f"not drawn: {exc}"
    return bm.summary()


def write(kern: Kernel, path: Path) -> Path:
    """Files: NN-<pass>.ir for each stage, kernel.cpp / kernel.py (the source), blockmap.png, meta.json."""
    path.mkdir(parents=True, exist_ok=True)
    for i, rec in enumerate(kern.records):
        stem = rec.spelling.split("{")[0]
        (path / f"{i:02d}-{stem}.ir").write_text(rec.ir)
    (path / ("kernel.cpp" if kern.target == "cpu" else "kernel.py")).write_text(kern.source)
    picture_note = _picture(kern, path)
    meta = {
        "spec": repr(kern.spec),
        "target": kern.target,
        "pipeline": kern.pipeline,
        "key": kern.key,
        "passes": [{"pass": r.spelling, "ms": round(r.seconds * 1e3, 3)} for r in kern.records[1:]],
        "runtime_tensors": [t.name for t in kern.spec.runtime_tensors()],
        "block_map": picture_note,
    }
    (path / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return path
