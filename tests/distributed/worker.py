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
from tests.distributed.cases import CASES, Block, inputs, tp_inputs, tp_spec


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


def run_tp(rank: int, world: int) -> dict[str, torch.Tensor]:
    """The block under torch's ColwiseParallel / RowwiseParallel, its weights permuted by the balanced plan;
    plus the DTensor path: q/k/v as DTensors sharded on heads."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    spec = tp_spec()
    weights, x, w = tp_inputs()
    plan = ac.shard_heads(spec, world, x.shape[1])
    att = ac.distributed.ShardedAttention(spec, plan, target="cpu")
    block = Block(att)
    d = spec.head_dim
    permuted = {}
    for name, t in weights.items():
        proj = name.split(".")[0]
        kv = proj in ("k", "v")
        permuted[name] = (
            t
            if proj == "o" and name.endswith("bias")
            else (ac.distributed.permute_heads(t, plan, d, dim=1 if proj == "o" else 0, kv=kv))
        )
    block.load_state_dict(permuted)
    mesh = init_device_mesh("cpu", (world,))
    parallelize_module(block, mesh, {"q": ColwiseParallel(), "k": ColwiseParallel(), "v": ColwiseParallel(),
                                     "o": RowwiseParallel()})  # fmt: skip
    xl = x.clone().requires_grad_()
    out = block(xl)
    out = out.full_tensor() if isinstance(out, DTensor) else out
    (out * w).sum().backward()
    grad_x = xl.grad
    # DTensor inputs sharded on heads (global head order = plan.permutation)
    q = torch.randn(1, spec.num_heads, 32, d)
    k, v = torch.randn(1, spec.num_kv_heads, 32, d), torch.randn(1, spec.num_kv_heads, 32, d)
    perm = torch.tensor(plan.permutation)
    kv_perm = torch.tensor([h for r in range(world) for h in plan.kv_heads_of(r)])
    dq = DTensor.from_local(q[:, perm].chunk(world, 1)[rank], mesh, [Shard(1)], run_check=False)
    dk = DTensor.from_local(k[:, kv_perm].chunk(world, 1)[rank], mesh, [Shard(1)], run_check=False)
    dv = DTensor.from_local(v[:, kv_perm].chunk(world, 1)[rank], mesh, [Shard(1)], run_check=False)
    dout = att(dq, dk, dv)
    full = ac.compile(spec, target="reference")(q, k, v)[:, perm]
    plain = lambda t: t.detach().clone()  # an op on torch's AsyncCollectiveTensor waits and returns a Tensor
    return {"out": plain(out), "grad_x": plain(grad_x), "dtensor_err": (dout.full_tensor() - full).abs().max()}


def main() -> None:
    rank, world, init, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        names = sys.argv[5:]
        results = {name: run(name, rank, world) for name in names if name != "tp"}
        if "tp" in names:
            results["tp"] = run_tp(rank, world)
        torch.save(results, f"{out}.{rank}")
        dist.barrier()  # every rank done sending before any tears gloo down ("terminate called" at exit, seen once)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
