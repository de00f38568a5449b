"""attncc over several processes: heads balanced by their proven work, and the sequence split by the block map.

    torchrun --nproc-per-node 2 examples/distributed.py          # gloo on CPU (NCCL when CUDA is present)

Each rank computes its own query heads (with their global indices: per-head windows and ALiBi slopes stay
right) and then its own query rows of a causal sequence split, forward and backward, and rank 0 checks both
against the unsharded kernel.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

import attncc as ac


def main() -> None:
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same full tensors on every rank, to check against
    n, heads = 2048, 8
    spans = np.geomspace(32, n, heads).round().astype(int).tolist()  # MoA-style: one window per head
    spec = ac.AttentionSpec(num_heads=heads, num_kv_heads=4, head_dim=64,
                            mask=ac.sliding_window(ac.per_head(spans, "span")), score_mod=ac.alibi())  # fmt: skip
    q, k, v = torch.randn(1, heads, n, 64), torch.randn(1, 4, n, 64), torch.randn(1, 4, n, 64)

    plan = ac.shard_heads(spec, world, n)  # balanced by each head's block map
    att = ac.distributed.ShardedAttention(spec, plan, target="cpu")
    mine = [t.clone().requires_grad_() for t in (q[:, plan.heads_of(rank)], k[:, plan.kv_heads_of(rank)],
                                                 v[:, plan.kv_heads_of(rank)])]  # fmt: skip
    out = ac.distributed.gather_heads(att(*mine), plan)  # [1, 8, n, 64] on every rank
    out.sum().backward()

    causal = ac.AttentionSpec(num_heads=heads, num_kv_heads=4, head_dim=64, mask=ac.causal())
    layout = ac.distributed.sequence_layout(causal, world, n)  # zig-zag-like chunks, from the block map's cost
    seq = ac.distributed.SequenceParallelAttention(causal, layout, target="cpu")
    rows, kv_rows = layout.q_positions(rank), layout.kv_positions(rank)
    out_seq = ac.distributed.gather_sequence(seq(q[:, :, rows], k[:, :, kv_rows], v[:, :, kv_rows]), layout)

    if rank == 0:
        print(plan)
        print(layout)
        full = ac.compile(spec, target="cpu")(q, k, v)
        full_seq = ac.compile(causal, target="cpu")(q, k, v)
        print(f"heads split: max |sharded - unsharded| = {(out - full).abs().max():.2e}")
        print(f"sequence split: max |sharded - unsharded| = {(out_seq - full_seq).abs().max():.2e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
