"""One rank of the multi-process tests: ``python worker.py RANK WORLD INIT OUT CASE...`` (gloo, CPU).

Runs each case through attncc.distributed exactly as a user would, then saves the gathered output and this
rank's gradients (of its own q/k/v shards, and of learned runtime tensors) to ``OUT.RANK``."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
import torch.distributed as dist

import attncc as ac
from tests.distributed.cases import CASES, inputs


def run(name: str, rank: int, world: int) -> dict[str, torch.Tensor]:
    case = CASES[name]
    spec = case.spec()
    q, k, v, runtime, w = inputs(name)
    fixed = {n: t for n, t in runtime.items() if n not in case.learned}
    rt = {n: t.clone().requires_grad_() if n in case.learned else t for n, t in runtime.items()}
    _, _, _, sq, skv = case.shape
    if case.mode == "heads":
        plan = ac.shard_heads(spec, world, sq, skv, **fixed)
        att = ac.distributed.ShardedAttention(spec, plan, target="cpu")
        heads, kv_heads = plan.heads_of(rank), plan.kv_heads_of(rank)
        ql, kl, vl = (t.clone().requires_grad_() for t in (q[:, heads], k[:, kv_heads], v[:, kv_heads]))
        out = ac.distributed.gather_heads(att(ql, kl, vl, **rt), plan)
        index = {"q_index": torch.tensor(heads), "kv_index": torch.tensor(kv_heads)}
    else:
        lay = ac.distributed.sequence_layout(spec, world, sq, skv, **fixed)
        att = ac.distributed.SequenceParallelAttention(spec, lay, target="cpu")
        qp, kp = lay.q_positions(rank), lay.kv_positions(rank)
        ql, kl, vl = (t.clone().requires_grad_() for t in (q[:, :, qp], k[:, :, kp], v[:, :, kp]))
        out = ac.distributed.gather_sequence(att(ql, kl, vl, **rt), lay)
        index = {"q_index": qp, "kv_index": kp, "rows_sent": torch.tensor(lay.rows_sent(rank))}
    (out * w).sum().backward()
    result = {"out": out.detach(), "grad_q": ql.grad, "grad_k": kl.grad, "grad_v": vl.grad, **index}
    result |= {f"grad_{n}": rt[n].grad for n in case.learned}
    return result


def main() -> None:
    rank, world, init, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.save({name: run(name, rank, world) for name in sys.argv[5:]}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
