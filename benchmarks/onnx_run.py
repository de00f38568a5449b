"""``ac.onnx.run`` vs onnxruntime on ONNX models whose attention is a sliding window, side by side.

    python benchmarks/onnx_run.py                 # N = 4096, B=1, H=8 (2 kv heads), D=64, window 256, fp32

Two models:

- ``Attention`` node: one opset-25 ``Attention`` node (``is_causal=1``, ``left_window_size=255``) built with
  ``onnx.helper`` (no exporter emits opset 25 in this environment). ``ac.onnx.run`` lifts it to ``causal &
  sliding window``; onnxruntime runs its CPU Attention kernel.
- exported Mistral: a one-layer random-weight ``MistralForCausalLM`` (hidden 512, 8 heads over 2 kv heads,
  ``sliding_window`` = window, SDPA attention; nothing downloaded) exported by torch.onnx's TorchScript exporter
  (opset 17: the attention is a decomposed MatMul/Softmax subgraph, the mask a Range/Gather/Where subgraph over
  ``attention_mask``). ``ac.onnx.run`` lifts the mask to ``causal & window & attention_mask[0, kv] != 0``, folds
  the GQA repeat and runs the other nodes in the onnx reference evaluator (``reference``) or onnxruntime
  (``onnxruntime``); onnxruntime runs the whole graph.

Best of ``--reps`` rounds, each round calling every contender once (the first, untimed call builds attncc's
kernels and rewritten graph); the max difference from onnxruntime's output is printed too.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from cpu import interleaved  # benchmarks/cpu.py: best of rounds that call every contender once
from onnx import TensorProto, helper

import attncc as ac

B, H, HKV, D = 1, 8, 2, 64


def attention_node(n: int, window: int) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    node = helper.make_node("Attention", ["Q", "K", "V"], ["Y"], is_causal=1, left_window_size=window - 1)
    shapes = {"Q": [B, H, n, D], "K": [B, HKV, n, D], "V": [B, HKV, n, D]}
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in shapes.items()]
    output = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [B, H, n, D])
    model = helper.make_model(
        helper.make_graph([node], "sliding_window", inputs, [output]), opset_imports=[helper.make_opsetid("", 25)]
    )
    g = np.random.default_rng(0)
    return model, {name: g.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def exported_mistral(n: int, window: int) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=256, hidden_size=H * D, intermediate_size=2 * H * D, num_hidden_layers=1,
                           num_attention_heads=H, num_key_value_heads=HKV, max_position_embeddings=n,
                           sliding_window=window, attn_implementation="sdpa")  # fmt: skip
    torch.manual_seed(0)
    lm = MistralForCausalLM(config).eval()

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm = lm

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    ids = torch.randint(0, 256, (B, n), generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(tmp) / "mistral.onnx"
        torch.onnx.export(Logits(), (ids, torch.ones_like(ids)), str(path), opset_version=17, dynamo=False,
                          input_names=["input_ids", "attention_mask"], output_names=["logits"])  # fmt: skip
        model = onnx.load(str(path))
    return model, {"input_ids": ids.numpy(), "attention_mask": np.ones((B, n), np.int64)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    print(f"# N={args.n} B={B} H={H} Hkv={HKV} D={D} window {args.window} fp32; torch {torch.__version__}, "
          f"onnxruntime {ort.__version__}; {platform.machine()}, {torch.get_num_threads()} threads")  # fmt: skip
    print("| model | ac.onnx.run ms (other nodes: reference) | ac.onnx.run ms (other nodes: onnxruntime) | "
          "onnxruntime ms | onnxruntime / best attncc | lifted spec | max abs diff |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for label, build in (
        ("Attention node (opset 25)", attention_node),
        ("exported Mistral (opset 17)", exported_mistral),
    ):
        model, feeds = build(args.n, args.window)
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        theirs = session.run(None, feeds)[0]
        calls: dict[str, Callable[[], object]] = {
            "reference": lambda m=model, f=feeds: ac.onnx.run(m, f),
            "onnxruntime-staged": lambda m=model, f=feeds: ac.onnx.run(m, f, runtime="onnxruntime"),
            "onnxruntime": lambda s=session, f=feeds: s.run(None, f),
        }
        ac.onnx.clear_reports()
        diffs = [
            float(np.abs(ac.onnx.run(model, feeds, runtime=r)[0] - theirs).max()) for r in ("reference", "onnxruntime")
        ]
        report = ac.onnx.reports()[-1]
        assert report["status"] == "attncc", report
        t = interleaved(calls, args.reps)
        best = min(t["reference"], t["onnxruntime-staged"])
        print(
            f"| {label} | {t['reference'] * 1e3:.1f} | {t['onnxruntime-staged'] * 1e3:.1f} | "
            f"{t['onnxruntime'] * 1e3:.1f} | {t['onnxruntime'] / best:.2f}x | `{report['spec']}` | {max(diffs):.1e} |"
        )


if __name__ == "__main__":
    main()
