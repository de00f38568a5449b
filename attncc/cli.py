"""The ``attncc`` command line.

    attncc show FILE.py:NAME [--q-len N] [--kv-len N] [--tiles 64x64] [--tensors VAR] [--out map.png]

``NAME`` is an AttentionSpec (or a compiled Kernel) defined in FILE.py; ``VAR`` names a dict of
runtime tensors in the same file. Prints the IR after the pipeline and the block map's
statistics, and writes the block-map picture.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Any

import attncc as ac
from attncc.analysis import costmodel, picture


def _load(target: str) -> tuple[Any, Any]:
    path, _, name = target.rpartition(":")
    if not path or not name:
        raise SystemExit(f"attncc show: expected FILE.py:NAME, got {target!r}")
    spec_ = importlib.util.spec_from_file_location("attncc_show_module", path)
    if spec_ is None or spec_.loader is None:
        raise SystemExit(f"attncc show: cannot import {path!r}")
    module = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(module)
    if not hasattr(module, name):
        raise SystemExit(f"attncc show: {path} defines no {name!r}")
    return module, getattr(module, name)


def show(args: argparse.Namespace) -> int:
    module, obj = _load(args.target)
    tiles = tuple(int(x) for x in args.tiles.lower().split("x")) if args.tiles else None
    kern = obj if isinstance(obj, ac.Kernel) else ac.compile(obj, target="reference", tiles=tiles)  # type: ignore[arg-type]
    spec = kern.spec
    q_len = args.q_len or costmodel.representative_length(spec)
    kv_len = args.kv_len or q_len
    tensors = getattr(module, args.tensors) if args.tensors else {}
    bm = kern.block_map(q_len, kv_len, **tensors)
    print(kern.ir)
    print(kern.plan)
    print(bm.summary())
    print(f"predicted: {bm.predicted_flops(spec.head_dim, spec.num_heads) / 1e9:.3f} GFLOP per batch element")
    out = Path(args.out or f"{spec.name}-blockmap.png")
    picture.save(bm, out, spec.name, spec.head_dim, spec.num_heads)
    print(f"block-map picture: {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="attncc", description="attncc, a compiler for attention")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("show", help="print a spec's IR, kernel plan and block map, and draw the map")
    p.add_argument("target", help="FILE.py:NAME of an AttentionSpec or Kernel")
    p.add_argument("--q-len", type=int)
    p.add_argument("--kv-len", type=int)
    p.add_argument("--tiles", help="BQxBKV, e.g. 64x64")
    p.add_argument("--tensors", help="name of a dict of runtime tensors in FILE.py")
    p.add_argument("--out", help="PNG path (default NAME-blockmap.png)")
    args = parser.parse_args(argv)
    return show(args)


if __name__ == "__main__":
    sys.exit(main())
