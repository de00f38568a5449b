"""attncc demo: compile real specs on the CPU, check them, and show where the dumps went.

Run with ``make demo``. Each spec is compiled through the pass pipeline for ``target="auto"``
(the generated C++/OpenMP kernel on this CPU); it runs in float32 and is checked against the
float64 op-by-op interpreter of the *unoptimized* IR (so the passes, the block map and the code
generator are all under test), forward and backward.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import torch

import attncc as ac
from attncc import config
from attncc.codegen.interpret import interpret
from attncc.lower import spec_to_ir

DUMP_DIR = Path("attncc_dumps").resolve()


def specs() -> list[tuple[ac.AttentionSpec, dict[str, torch.Tensor], int]]:
    doc_ids = torch.repeat_interleave(torch.arange(4), torch.tensor([70, 29, 95, 62]))
    bias = torch.randn(4, 2 * 16 + 1)
    captured = torch.tensor([0] * 100 + [1] * 156)
    freqs = torch.arange(256.0)[:, None] * 10000.0 ** (-torch.arange(0, 32, 2) / 32)
    angles = torch.cat((freqs, freqs), -1)  # Llama's rotary table layout, [positions, head_dim]

    nq = 256 // 32
    layout = torch.full((1, 4, nq, 3), -1)  # per-head block lists, as MoA ships a searched layout
    for h in range(4):
        for qb in range(nq):
            picked = sorted({0, qb, max(qb - 1 - h, 0)})
            layout[0, h, qb, : len(picked)] = torch.tensor(picked)

    def flex_mask(b, h, q_idx, kv_idx):  # a FlexAttention mask_mod, unchanged
        return (captured[q_idx] == captured[kv_idx]) & (q_idx >= kv_idx)

    return [
        (
            ac.AttentionSpec(name="llama_gqa", num_heads=8, num_kv_heads=2, head_dim=32, mask=ac.causal(), rope=True),
            {"rope_cos": angles.cos(), "rope_sin": angles.sin()},  # RoPE applied in the kernel prologue
            256,
        ),
        (
            ac.AttentionSpec(
                name="gemma_window",
                num_heads=4,
                head_dim=32,
                mask=ac.sliding_window(63) | ac.sinks(4),
                score_mod=ac.softcap(30.0),
            ),
            {},
            256,
        ),
        (
            ac.AttentionSpec(
                name="packed_docs", num_heads=4, head_dim=32, mask=ac.causal() & ac.document(ac.tensor("doc_ids"))
            ),
            {"doc_ids": doc_ids},
            256,
        ),
        (
            ac.AttentionSpec(
                name="natten_2d",
                num_heads=2,
                head_dim=32,
                mask=ac.neighborhood(grid=(16, 16), kernel=(5, 7), dilation=(2, 1)),
            ),
            {},
            256,
        ),
        (
            ac.AttentionSpec(
                name="alibi_moa",
                num_heads=4,
                head_dim=32,
                score_mod=ac.alibi(),
                mask=ac.sliding_window(ac.per_head([16, 32, 64, 128], name="span")),
            ),
            {},
            256,
        ),
        (
            ac.AttentionSpec(
                name="t5_bias", num_heads=4, head_dim=32, score_mod=ac.relative_bias(ac.tensor("table"), 16)
            ),
            {"table": bias},
            256,
        ),
        (
            ac.AttentionSpec(
                name="moa_block_lists",
                num_heads=4,
                head_dim=32,
                mask=ac.block_indices(ac.tensor("layout"), 32) & ac.causal(),
            ),
            {"layout": layout},  # the block map is read from the lists
            256,
        ),
        (
            ac.AttentionSpec(
                name="kdgqa_groups",
                num_heads=4,
                num_kv_heads=3,
                head_dim=32,
                mask=ac.causal(),
                kv_head_of=ac.tensor("kv_head_of"),
            ),
            {"kv_head_of": torch.tensor([0, 2, 2, 1])},  # query head -> kv head, uneven groups, per call
            256,
        ),
        (
            ac.AttentionSpec(name="mla_values", num_heads=4, head_dim=48, value_dim=32, mask=ac.causal()),
            {},  # DeepSeek-style: values narrower than queries and keys
            256,
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
            256,
        ),
    ]


def check(spec: ac.AttentionSpec, tensors: dict[str, torch.Tensor], n: int) -> str:
    start = time.perf_counter()
    kern = ac.compile(spec, target="auto")
    if kern.target == "cpu":
        kern.cpu_kernel()  # build the C++ kernel (or load it from the disk cache) inside the timing
    compile_ms = (time.perf_counter() - start) * 1e3
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, spec.num_heads, n, spec.head_dim, generator=g, requires_grad=True)
    k = torch.randn(2, int(spec.num_kv_heads or 0), n, spec.head_dim, generator=g, requires_grad=True)
    v = torch.randn(2, int(spec.num_kv_heads or 0), n, int(spec.value_dim or 0), generator=g, requires_grad=True)
    out = kern(q, k, v, **tensors)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    oracle = interpret(spec_to_ir(spec), qd, kd, vd, {**spec.captured, **tensors})
    ograds = torch.autograd.grad(oracle.square().sum(), (qd, kd, vd))
    err = (out.double() - oracle).abs().max().item()
    gerr = max((a.double() - b).abs().max().item() for a, b in zip(grads, ograds))
    op = kern.graph.ops[-2]
    bm = kern.block_map(n, n, batch=2, **tensors)
    return (
        f"{spec.name:14s} {kern.target:4s} compile {compile_ms:7.1f} ms  |out-oracle| {err:.1e}  "
        f"|grad-oracle| {gerr:.1e}  {getattr(op, 'layout', ''):7s} map, {bm.computed_fraction:6.1%} of tiles  "
        f"form: {getattr(op, 'form', '') or 'custom'}"
    )


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    shutil.rmtree(DUMP_DIR, ignore_errors=True)  # this demo's own output folder
    print(f"attncc {ac.__version__}: compiling specs for target='auto' (float32 kernels vs float64 oracle)\n")
    with config.override(dump_dir=DUMP_DIR, verify=True):
        for spec, tensors, n in specs():
            print(check(spec, tensors, n))
    kern = ac.compile(specs()[1][0], target="auto")
    print("\nIR of gemma_window after the pipeline:\n" + kern.ir)
    print("\nits kernel plan (what every target builds from):\n" + str(kern.plan))
    print(f"dumps (IR after each pass, plan, source, block-map picture, metadata) are in {DUMP_DIR}/<spec>-<key>/")
    for path in sorted(DUMP_DIR.iterdir()):
        print("  ", path.name, "->", ", ".join(sorted(p.name for p in path.iterdir())))


if __name__ == "__main__":
    main()
