"""``ac.onnx.run`` vs onnxruntime on an ONNX model whose attention is a sliding window, side by side.

    python benchmarks/onnx_run.py                 # N = 4096, B=1, H=8 (2 kv heads), D=64, window 256, fp32

The model is one opset-25 ``Attention`` node (``is_causal=1``, ``left_window_size=255``) built with
``onnx.helper`` (no exporter emits opset 25 in this environment). ``ac.onnx.run`` lifts it to
``causal & sliding window`` and runs attncc's cpu kernel (whole tiles outside the window skipped); onnxruntime
runs its CPU Attention kernel. Best of ``--reps`` rounds, each round calling both once; the max difference is
printed too.
"""

from __future__ import annotations

import argparse
import platform

import numpy as np
import onnxruntime as ort
import torch
from cpu import interleaved  # benchmarks/cpu.py: best of rounds that call every contender once
from onnx import TensorProto, helper

import attncc as ac


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    B, H, Hkv, D, n = 1, 8, 2, 64, args.n
    node = helper.make_node("Attention", ["Q", "K", "V"], ["Y"], is_causal=1, left_window_size=args.window - 1)
    shapes = {"Q": [B, H, n, D], "K": [B, Hkv, n, D], "V": [B, Hkv, n, D]}
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in shapes.items()]
    output = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [B, H, n, D])
    model = helper.make_model(
        helper.make_graph([node], "sliding_window", inputs, [output]), opset_imports=[helper.make_opsetid("", 25)]
    )
    g = np.random.default_rng(0)
    feeds = {name: g.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ours = ac.onnx.run(model, feeds)[0]
    theirs = session.run(None, feeds)[0]
    assert ac.onnx.reports()[-1]["status"] == "attncc", ac.onnx.reports()[-1]
    t = interleaved(
        {"attncc": lambda: ac.onnx.run(model, feeds), "onnxruntime": lambda: session.run(None, feeds)}, args.reps
    )
    print(f"# B={B} H={H} Hkv={Hkv} D={D} fp32; torch {torch.__version__}, onnxruntime {ort.__version__}; "
          f"{platform.machine()}, {torch.get_num_threads()} threads")  # fmt: skip
    print("| N | window | ac.onnx.run ms | onnxruntime ms | onnxruntime/attncc | max abs diff |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {n} | {args.window} | {t['attncc'] * 1e3:.1f} | {t['onnxruntime'] * 1e3:.1f} | "
        f"{t['onnxruntime'] / t['attncc']:.2f}x | {float(np.abs(ours - theirs).max()):.1e} |"
    )


if __name__ == "__main__":
    main()
