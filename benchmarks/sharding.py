"""Attention over several processes: head placement predicted vs measured, multi-process runs, bytes sent.

    python benchmarks/sharding.py                 # all three parts (about 3 minutes on 2 cores)
    python benchmarks/sharding.py --part predict --n 16384

1. **predict**: 32 MoA-style heads (per-head causal windows spread geometrically from 64 to N, plus 4
   sink tokens; B=1, D=64, fp32) placed on 4 ranks by ``ac.shard_heads``. Each rank's heads are run here,
   one rank after another on the whole machine (the cpu target, forward), and the measured time of each
   rank is set beside the time the plan predicts (its share of the predicted cost times the measured total),
   for the balanced plan and for the contiguous split.
2. **run**: the same spec at ``--run-n`` tokens, forward + backward, in 1, 2 and 4 real processes (gloo),
   head-sharded (``ShardedAttention`` + ``gather_heads``) and sequence-parallel on a causal mask
   (``SequenceParallelAttention`` + ``gather_sequence``). The processes share this machine's cores (each
   gets cores / N threads), so wall time cannot drop with N here; the table reports each rank's compute time,
   the step's wall time and the bytes each rank receives, and the prediction for N devices
   (max rank compute of the plan).
3. **bytes**: sequence parallelism at N tokens on 4 ranks: the key/value bytes each rank sends (fp32, 8 kv
   heads, D=64) for a sliding window, a causal mask and documents, against a full ring (every chunk to every
   rank).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import attncc as ac
from attncc.spec import for_heads

HEADS, D = 32, 64


def moa(n: int) -> ac.AttentionSpec:
    spans = np.geomspace(64, n, HEADS).round().astype(int).tolist()
    window = ac.sliding_window(ac.per_head(spans, name="span"))
    return ac.AttentionSpec(num_heads=HEADS, head_dim=D, mask=window | ac.sinks(4))


def _best(fn, reps: int) -> float:  # type: ignore[no-untyped-def]
    fn()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def predict(n: int, reps: int) -> None:
    spec = moa(n)
    plan = ac.shard_heads(spec, 4, n)
    per = HEADS // 4
    splits = {"balanced": [plan.heads_of(r) for r in range(4)],
              "contiguous": [list(range(r * per, (r + 1) * per)) for r in range(4)]}  # fmt: skip
    print(f"## predict: MoA {HEADS} heads, N={n}, 4 ranks, cpu forward, fp32, B=1, D={D}\n")
    print("| split | rank | heads | predicted cost | predicted s | measured s | error |")
    print("|---|---|---|---|---|---|---|")
    for label, split in splits.items():
        costs = [sum(plan.head_costs[h] for h in heads) for heads in split]
        measured = []
        for heads in split:
            kern = ac.compile(for_heads(spec, heads), target="cpu")
            q, k, v = (torch.randn(1, len(heads), n, D) for _ in range(3))
            measured.append(_best(lambda kern=kern, q=q, k=k, v=v: kern(q, k, v), reps))
        scale = sum(measured) / sum(costs)
        for r, heads in enumerate(split):
            pred = costs[r] * scale
            print(f"| {label} | {r} | {heads} | {costs[r]:.0f} | {pred:.3f} | {measured[r]:.3f} | "
                  f"{(measured[r] - pred) / pred:+.1%} |")  # fmt: skip
        imb = max(measured) / (sum(measured) / 4)
        print(f"| {label} | max/mean | | {max(costs) / (sum(costs) / 4):.3f} | | {imb:.3f} | |")
    print()


def worker(rank: int, world: int, init: str, n: int, reps: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    result: dict[str, float] = {}
    spec = moa(n)
    plan = ac.shard_heads(spec, world, n)
    att = ac.distributed.ShardedAttention(spec, plan, target="cpu")
    heads = plan.heads_of(rank)
    q, k, v = (torch.randn(1, len(heads), n, D, requires_grad=True) for _ in range(3))

    def local() -> None:
        att(q, k, v).sum().backward()

    def step() -> None:
        dist.barrier()
        ac.distributed.gather_heads(att(q, k, v), plan).sum().backward()
        dist.barrier()

    result["heads_compute"] = _best(local, reps)
    result["heads_wall"] = _best(step, reps)
    result["heads_recv_bytes"] = (world - 1) * q.numel() * 4  # all_gather of the outputs
    result["heads_cost"] = plan.cost_of(rank)
    causal = ac.AttentionSpec(num_heads=8, head_dim=D, mask=ac.causal())
    lay = ac.distributed.sequence_layout(causal, world, n)
    sp = ac.distributed.SequenceParallelAttention(causal, lay, target="cpu")
    rows, kv_rows = len(lay.q_positions(rank)), len(lay.kv_positions(rank))
    qs = torch.randn(1, 8, rows, D, requires_grad=True)
    ks, vs = (torch.randn(1, 8, kv_rows, D, requires_grad=True) for _ in range(2))

    def seq_step() -> None:
        dist.barrier()
        sp(qs, ks, vs).sum().backward()
        dist.barrier()

    result["seq_wall"] = _best(seq_step, reps)
    result["seq_recv_bytes"] = lay.rows_received(rank) * 2 * 8 * D * 4  # k and v (the backward returns as many)
    result["seq_cost"] = lay.cost_of(rank)
    Path(f"{out}.{rank}").write_text(json.dumps(result))
    dist.destroy_process_group()


def run(n: int, reps: int) -> None:
    print(f"## run: MoA {HEADS} heads and causal 8 heads, N={n}, fwd+bwd, gloo processes on this machine\n")
    print("| ranks | head split: rank compute s (max) | step wall s | MB received / rank | predicted N-device "
          "speedup | sequence split: step wall s | MB received / rank | predicted speedup |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    base = None
    for world in (1, 2, 4):
        with tempfile.TemporaryDirectory() as tmp:
            init, out = f"file://{tmp}/pg", f"{tmp}/out"
            args = [sys.executable, __file__, "--worker", str(world), init, str(n), str(reps), out]
            procs = [subprocess.Popen([*args[:4], str(r), *args[4:]]) for r in range(world)]
            if any(p.wait() for p in procs):
                raise SystemExit(f"a rank of the {world}-process run failed")
            res = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(world)]
        compute = max(r["heads_compute"] for r in res)
        if base is None:
            base = res[0]
        head_speed = base["heads_cost"] / max(r["heads_cost"] for r in res)
        seq_speed = base["seq_cost"] / max(r["seq_cost"] for r in res)
        per_rank = " / ".join(f"{r['heads_compute']:.3f}" for r in res)
        print(f"| {world} | {per_rank} ({compute:.3f}) | "
              f"{max(r['heads_wall'] for r in res):.3f} | {max(r['heads_recv_bytes'] for r in res) / 1e6:.1f} | "
              f"{head_speed:.2f}x | {max(r['seq_wall'] for r in res):.3f} | "
              f"{max(r['seq_recv_bytes'] for r in res) / 1e6:.1f} | {seq_speed:.2f}x |")  # fmt: skip
    print()


def sent_bytes(n: int) -> None:
    print(f"## bytes: sequence parallelism, N={n}, 4 ranks, k and v fp32, 8 kv heads, D={D}\n")
    print("| mask | chunks per rank | MB sent per rank (max) | full ring MB | ratio | imbalance |")
    print("|---|---|---|---|---|---|")
    row = 2 * 8 * D * 4
    docs = torch.arange(n) * 10 // n  # 10 documents: boundaries fall inside chunks
    masks = {
        "sliding window 1024": (ac.sliding_window(1024), {}),
        "causal": (ac.causal(), {}),
        "10 documents, causal": (ac.document(ac.tensor("doc")) & ac.causal(), {"doc": docs}),
    }
    for label, (mask, runtime) in masks.items():
        spec = ac.AttentionSpec(num_heads=8, head_dim=D, mask=mask)
        lay = ac.distributed.sequence_layout(spec, 4, n, **runtime)
        sent = max(lay.rows_sent(r) for r in range(4)) * row / 1e6
        ring = max(lay.ring_rows_sent(r) for r in range(4)) * row / 1e6
        print(f"| {label} | 2 | {sent:.1f} | {ring:.1f} | {sent / ring:.2f} | {lay.imbalance:.3f} |")
    print()


def tiles(n: int, reps: int) -> None:
    """Per-tile time of full and partial tiles on the cpu target: what costmodel.PARTIAL_COST["cpu"] is set from."""
    print(f"## tiles: cpu forward, N={n}, 4 heads, D={D}, fp32: time per computed tile\n")
    print("| mask | full tiles | partial tiles | ms | us per tile | partial / full |")
    print("|---|---|---|---|---|---|")
    docs = torch.arange(n) // 7  # 7-token documents: every computed tile is partial
    masks = {
        "all visible (kv >= 0)": (ac.kv >= 0, {}),
        "(q + kv) even": ((ac.q + ac.kv) % 2 == 0, {}),
        "7-token documents (runtime ids)": (ac.document(ac.tensor("doc")), {"doc": docs}),
        "q % 3 != kv % 5": ((ac.q % 3) != (ac.kv % 5), {}),
    }
    per_full = None
    for label, (mask, runtime) in masks.items():
        kern = ac.compile(ac.AttentionSpec(num_heads=4, head_dim=D, mask=mask), target="cpu", tiles=(64, 64))
        st = kern.block_map(n, n, **runtime).states()
        mult = 4 if st.shape[1] == 1 else 1
        full, part = int((st == 2).sum()) * mult, int((st == 1).sum()) * mult
        q, k, v = (torch.randn(1, 4, n, D) for _ in range(3))
        sec = _best(lambda kern=kern, q=q, k=k, v=v, rt=runtime: kern(q, k, v, **rt), reps)
        per = sec / (full + part)
        per_full = per if per_full is None else per_full
        print(f"| {label} | {full} | {part} | {sec * 1e3:.1f} | {per * 1e6:.1f} | {per / per_full:.2f} |")
    print()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        world, rank, init, n, reps, out = sys.argv[2:8]
        worker(int(rank), int(world), init, int(n), int(reps), out)
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--part", choices=["tiles", "predict", "run", "bytes", "all"], default="all")
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--run-n", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}\n")
    if args.part in ("tiles", "all"):
        tiles(args.run_n, args.reps + 2)
    if args.part in ("predict", "all"):
        predict(args.n, args.reps)
    if args.part in ("run", "all"):
        run(args.run_n, args.reps)
    if args.part in ("bytes", "all"):
        sent_bytes(args.n)


if __name__ == "__main__":
    main()
