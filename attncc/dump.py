"""Write a kernel's stages to a folder: IR after every pass, source, metadata."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from attncc.analysis import costmodel, picture
from attncc.errors import AttnccError

log = logging.getLogger("attncc.dump")

if TYPE_CHECKING:
    import torch

    from attncc.api import Kernel


Call = tuple[int, int, int, dict[str, "torch.Tensor"]]  # batch, q_len, kv_len, runtime tensors


def picture_of(kern: Kernel, path: Path, call: Call | None) -> str:
    """Draw the block map to ``path/blockmap.png``; return its summary, or why it was not drawn.

    Without runtime tensors the map is drawn at a representative length; with them, from a call's
    tensors and lengths (``call``). Never raises: a dump must not break a compile or a call; a
    failure becomes a note in meta.json.
    """
    if call is not None:
        batch, q_len, kv_len, tensors = call
    elif kern.spec.runtime_tensors():
        names = ", ".join(f"{t.name}=..." for t in kern.spec.runtime_tensors())
        return (
            "not drawn yet: the map depends on runtime tensors; it is drawn at the kernel's first call, "
            f"or pass them: kern.dump(path, q_len=..., kv_len=..., {names})"
        )
    else:
        n = costmodel.representative_length(kern.spec)
        lengths = [int(t.shape[0]) for t in kern.spec.captured.values() if t.dim() == 1]
        batch, q_len, kv_len, tensors = 1, min([n, *lengths]), min([n, *lengths]), {}
    try:
        bm = kern.block_map(q_len, kv_len, batch=batch, **tensors)
        spec = kern.spec
        picture.save(bm, path / "blockmap.png", spec.name, spec.head_dim, spec.num_heads, spec.value_dim)
    except (AttnccError, ValueError) as exc:
        log.info("dump of %r: block map not drawn: %s", kern, exc)
        return f"not drawn: {exc}"
    return bm.summary()


def update_picture(kern: Kernel, path: Path, call: Call) -> None:
    """Draw the map of a kernel dumped before its runtime tensors were known, and note it in meta.json."""
    note = picture_of(kern, path, call)
    meta_path = path / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    meta["block_map"] = f"{note} (drawn from the first call: q length {call[1]}, kv length {call[2]})"
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")


def write(kern: Kernel, path: Path, call: Call | None = None) -> Path:
    """Files: NN-<pass>.ir for each stage, plan.txt (the KernelPlan), kernel.cpp / kernel.py (the source;
    on the cpu target also runtime.cpp, the fixed part it plugs into), blockmap.png, meta.json."""
    path.mkdir(parents=True, exist_ok=True)
    for i, rec in enumerate(kern.records):
        stem = rec.spelling.split("{")[0]
        (path / f"{i:02d}-{stem}.ir").write_text(rec.ir)
    (path / "plan.txt").write_text(f"{kern.plan}\n")
    (path / ("kernel.cpp" if kern.target == "cpu" else "kernel.py")).write_text(kern.source)
    if kern.target == "cpu":  # the fixed forward and backward the spec's kernel.cpp plugs into
        (path / "runtime.cpp").write_text(kern.cpu_kernel().runtime_source)
    picture_note = picture_of(kern, path, call)
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
