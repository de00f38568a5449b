"""The ``attncc`` command line.

    attncc show FILE.py:NAME [--q-len N] [--kv-len N] [--tiles 64x64] [--tensors VAR] [--out map.png]
    attncc explain FILE.py:MODEL --inputs VAR [--target auto|cpu|triton|reference]
    attncc onnx MODEL.onnx

``show``: ``NAME`` is an AttentionSpec (or a compiled Kernel) defined in FILE.py; ``VAR`` names a dict of
runtime tensors in the same file. Prints the IR after the pipeline and the block map's
statistics, and writes the block-map picture.

``explain``: ``MODEL`` is a torch.nn.Module in FILE.py and ``VAR`` its inputs there (a tuple of
positional arguments or a dict of keyword arguments); runs ``torch.compile(model, backend="attncc")``
once and prints :func:`attncc.dynamo.explain`'s table: every attention site, lifted or not and why.

``onnx``: lists the model's ``Attention`` nodes (no torch.compile, nothing run): attributes, input shapes, the
spec each lifts to (:func:`attncc.frontends.onnx.lift` on inputs of the declared shapes) and its block map's
statistics where the shapes are static and no runtime mask input decides it; or the reason a node is left as it is.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Any

import attncc as ac
from attncc.analysis import costmodel, picture


def _load(target: str, command: str = "show") -> tuple[Any, Any]:
    path, _, name = target.rpartition(":")
    if not path or not name:
        raise SystemExit(f"attncc {command}: expected FILE.py:NAME, got {target!r}")
    spec_ = importlib.util.spec_from_file_location(f"attncc_{command}_module", path)
    if spec_ is None or spec_.loader is None:
        raise SystemExit(f"attncc {command}: cannot import {path!r}")
    module = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(module)
    if not hasattr(module, name):
        raise SystemExit(f"attncc {command}: {path} defines no {name!r}")
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
    flops = bm.predicted_flops(spec.head_dim, spec.num_heads, value_dim=spec.value_dim)
    print(f"predicted: {flops / 1e9:.3f} GFLOP per batch element")
    out = Path(args.out or f"{spec.name}-blockmap.png")
    picture.save(bm, out, spec.name, spec.head_dim, spec.num_heads, spec.value_dim)
    print(f"block-map picture: {out}")
    return 0


def explain(args: argparse.Namespace) -> int:
    module, model = _load(args.target, "explain")
    if not hasattr(module, args.inputs):
        raise SystemExit(f"attncc explain: {args.target.rpartition(':')[0]} defines no {args.inputs!r}")
    inputs = getattr(module, args.inputs)
    positional, keywords = (inputs, {}) if isinstance(inputs, tuple | list) else ((), inputs)
    if not isinstance(keywords, dict):
        raise SystemExit(f"attncc explain: {args.inputs} must be a tuple of arguments or a dict of keyword arguments")
    print(ac.dynamo.explain(model, *positional, target=args.target_name, **keywords))
    return 0


def onnx_sites(args: argparse.Namespace) -> int:
    import numpy as np
    import onnx

    from attncc.frontends import onnx as front

    model = onnx.load(args.model)
    types = {i.name: i.type.tensor_type.elem_type for i in [*model.graph.input, *model.graph.value_info]}
    found = front.sites(model)
    print(f"{args.model}: {len(found)} Attention node(s), opset {found[0]['opset'] if found else '-'}")
    for site in found:
        print(f"\n{site['node']}: attributes {site['attributes']}")
        shapes = site["inputs"]
        print("  inputs: " + ", ".join(f"{n} {list(s) if s else '?'}" for n, s in shapes.items()))
        if not all(s and all(isinstance(d, int) for d in s) for s in shapes.values()):
            print("  spec: not recovered here (input shapes are not static); ac.onnx.run lifts it per call")
            continue
        names = ["Q", "K", "V", "attn_mask", "past_key", "past_value", "nonpad_kv_seqlen"]
        arrays: dict[str, Any] = {}
        node = model.graph.node[site["index"]]
        for slot, name in zip(names, node.input):
            if not name:
                continue
            shape = shapes[name]
            kind = types.get(name, onnx.TensorProto.FLOAT)
            dtype = {onnx.TensorProto.BOOL: np.bool_, onnx.TensorProto.INT64: np.int64}.get(kind, np.float32)
            arrays[slot] = np.ones(shape, dtype) if dtype is np.bool_ else np.zeros(shape, dtype)
        attrs = dict(site["attributes"])
        mode_wanted = len(node.output) > 3 and bool(node.output[3])
        attrs.pop("qk_matmul_output_mode", None)
        lifted = front.lift(**arrays, **attrs, qk_output_wanted=mode_wanted)
        if isinstance(lifted, str):
            print(f"  left to the reference evaluator: {lifted}")
            continue
        spec = lifted.spec
        values = f", value_dim {spec.value_dim}" if spec.value_dim != spec.head_dim else ""
        print(f"  spec: {spec.num_heads} heads over {spec.num_kv_heads} kv heads, head_dim {spec.head_dim}{values}")
        print(f"  mask: {spec.mask}" if spec.mask is not None else "  mask: none (dense)")
        if spec.score_mod is not None:
            print(f"  score_mod: {spec.score_mod}")
        runtime = sorted(lifted.tensors)
        if runtime:
            print(f"  runtime tensors: {', '.join(runtime)} (the block map is classified per call)")
            continue
        kern = ac.compile(spec, target="reference")
        bm = kern.block_map(lifted.q.shape[2], lifted.k.shape[2])
        print(f"  block map: {bm.summary()}")
    decomposed = front.find_decomposed(model)
    print(f"\n{len(decomposed)} decomposed attention subgraph(s) (MatMul -> ... -> Softmax -> MatMul)")
    for d in decomposed:
        print(f"  {' -> '.join(d.names)}: form {d.attributes['form']}; mask input: {d.inputs[4] or 'none'}")
        if d.inputs[4]:
            mask = front.describe_mask(model, d)
            print(f"    mask: {mask}")
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
    e = sub.add_parser("explain", help="run a model through torch.compile(backend='attncc'); report every site")
    e.add_argument("target", help="FILE.py:MODEL, a torch.nn.Module")
    e.add_argument("--inputs", required=True, help="name of the model's inputs in FILE.py (tuple or dict)")
    e.add_argument("--target", dest="target_name", default="auto", choices=["auto", "cpu", "triton", "reference"])
    o = sub.add_parser("onnx", help="list an ONNX model's Attention nodes and what each lifts to")
    o.add_argument("model", help="path of an .onnx file")
    args = parser.parse_args(argv)
    return {"show": show, "explain": explain, "onnx": onnx_sites}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
