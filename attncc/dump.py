"""Write a kernel's stages to a folder: IR after every pass, source, metadata."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from attncc.api import Kernel


def write(kern: Kernel, path: Path) -> Path:
    """Files: NN-<pass>.ir for each stage, kernel.<ext> (the source), meta.json."""
    path.mkdir(parents=True, exist_ok=True)
    for i, rec in enumerate(kern.records):
        stem = rec.spelling.split("{")[0]
        (path / f"{i:02d}-{stem}.ir").write_text(rec.ir)
    (path / "kernel.py").write_text(kern.source)
    meta = {
        "spec": repr(kern.spec),
        "target": kern.target,
        "pipeline": kern.pipeline,
        "key": kern.key,
        "passes": [{"pass": r.spelling, "ms": round(r.seconds * 1e3, 3)} for r in kern.records[1:]],
        "runtime_tensors": [t.name for t in kern.spec.runtime_tensors()],
    }
    (path / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return path
