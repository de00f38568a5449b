"""attncc demo: compile real specs on the CPU, check them, and show where the dumps went.

Run with ``make demo``. Each spec is compiled through the pass pipeline; its kernel runs in
float32 and is checked against the float64 op-by-op interpreter of the *unoptimized* IR
(so the passes and the code generator are both under test), forward and backward.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

import attncc as ac
from attncc import config
from attncc.codegen.interpret import interpret
from attncc.lower import spec_to_ir

DUMP_DIR = Path("attncc_dumps").resolve()


def specs() -> list[tuple[ac.AttentionSpec, dict[str, torch.Tensor], int]]:
    doc_ids = torch.repeat_interleave(torch.arange(4), torch.tensor([20, 9, 25, 10]))
    bias = torch.randn(4, 2 * 16 + 1, requires_grad=True)
    captured = torch.tensor([0] * 30 + [1] * 34)

    def flex_mask(b, h, q_idx, kv_idx):  # a FlexAttention mask_mod, unchanged
        return (captured[q_idx] == captured[kv_idx]) & (q_idx >= kv_idx)

    return [
        (ac.AttentionSpec(name="llama_gqa", num_heads=8, num_kv_heads=2, head_dim=32, mask=ac.causal()), {}, 64),
        (
            ac.AttentionSpec(
                name="gemma_window",
                num_heads=4,
                head_dim=32,
                mask=ac.sliding_window(15) | ac.sinks(4),
                score_mod=ac.softcap(30.0),
            ),
            {},
            64,
        ),
        (
            ac.AttentionSpec(
                name="packed_docs", num_heads=4, head_dim=32, mask=ac.causal() & ac.document(ac.tensor("doc_ids"))
            ),
            {"doc_ids": doc_ids},
            64,
        ),
        (
            ac.AttentionSpec(
                name="natten_2d",
                num_heads=2,
                head_dim=32,
                mask=ac.neighborhood(grid=(8, 8), kernel=(3, 5), dilation=(2, 1)),
            ),
            {},
            64,
        ),
        (
            ac.AttentionSpec(
                name="alibi_moa",
                num_heads=4,
                head_dim=32,
                score_mod=ac.alibi(),
                mask=ac.sliding_window(ac.per_head([4, 8, 16, 32], name="span")),
            ),
            {},
            64,
        ),
        (
            ac.AttentionSpec(
                name="t5_bias", num_heads=4, head_dim=32, score_mod=ac.relative_bias(ac.tensor("table"), 16)
            ),
            {"table": bias},
            64,
        ),
        (
            ac.AttentionSpec(
                name="flex_callable",
                num_heads=2,
                head_dim=32,
                mask=flex_mask,
                score_mod=lambda s, b, h, q_idx, kv_idx: s * 0.5,
            ),
            {},
            64,
        ),
    ]


def check(spec: ac.AttentionSpec, tensors: dict[str, torch.Tensor], n: int) -> str:
    start = time.perf_counter()
    kern = ac.compile(spec, target="reference")
    compile_ms = (time.perf_counter() - start) * 1e3
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, spec.num_heads, n, spec.head_dim, generator=g, requires_grad=True)
    k = torch.randn(2, int(spec.num_kv_heads or 0), n, spec.head_dim, generator=g, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    out = kern(q, k, v, **tensors)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    all_tensors = {**spec.captured, **tensors}
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    oracle = interpret(spec_to_ir(spec), qd, kd, vd, all_tensors)
    ograds = torch.autograd.grad(oracle.square().sum(), (qd, kd, vd))
    err = (out.double() - oracle).abs().max().item()
    gerr = max((a.double() - b).abs().max().item() for a, b in zip(grads, ograds))
    form = kern.graph.ops[-2].form if hasattr(kern.graph.ops[-2], "form") else ""
    return (
        f"{spec.name:14s} compile {compile_ms:6.1f} ms   max|out-oracle| {err:.1e}   "
        f"max|grad-oracle| {gerr:.1e}   form: {form or 'custom'}"
    )


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    print(f"attncc {ac.__version__}: compiling specs with the reference target (float32 vs float64 oracle)\n")
    with config.override(dump_dir=DUMP_DIR, verify=True):
        for spec, tensors, n in specs():
            print(check(spec, tensors, n))
    kern = ac.compile(specs()[1][0], target="reference")
    print("\nIR of gemma_window after the pipeline:\n" + kern.ir)
    print(f"dumps (IR after each pass, kernel source, metadata) are in {DUMP_DIR}/<spec>-<key>/")
    for path in sorted(DUMP_DIR.iterdir()):
        print("  ", path.name, "->", ", ".join(sorted(p.name for p in path.iterdir())))


if __name__ == "__main__":
    main()
