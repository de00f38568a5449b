"""Routed (data-dependent) block-sparse attention on the CPU: attncc vs FlexAttention vs dense SDPA, side by side.

    python benchmarks/routed.py                    # 16K tokens, top 8 of 256 blocks of 64, H=8, D=64
    python benchmarks/routed.py --n 4096 --reps 3

Each call of attncc's ``route_blocks`` kernel selects the kv blocks from q and k (mean-pool each 64-row block,
affinity of pooled q and k, top-k; ``attn.select``), reads the block map from the selected list and runs the
tiled cpu kernel; its time is the whole call. FlexAttention gets the same selection (attncc's own, identical
work), then ``BlockMask.from_kv_blocks`` on the selected lists (all listed tiles full, so no mask_mod runs) and
``torch.compile(flex_attention)``; its time is selection + BlockMask + attention. Dense SDPA attends to every
key (what routing avoids). The backward is timed alone on a retained graph. Times are the best of ``--reps``
rounds, each round calling every contender once.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from cpu import interleaved  # benchmarks/cpu.py: best of rounds that call every contender once
from torch.nn.attention.flex_attention import BlockMask, flex_attention

import attncc as ac
from attncc import routing


def flex_block_mask(lists: torch.Tensor, n: int, block: int) -> BlockMask:
    """A BlockMask whose full tiles are the selected ones (no partial tiles: no mask_mod is evaluated)."""
    valid = lists >= 0
    count = valid.sum(-1, dtype=torch.int32)
    order = torch.argsort((~valid).to(torch.int8), dim=-1, stable=True)  # listed blocks first
    full = torch.gather(lists, -1, order).clamp(min=0).to(torch.int32)
    nkv = n // block
    full = torch.cat([full, torch.zeros(*full.shape[:-1], nkv - full.shape[-1], dtype=torch.int32)], -1)
    empty_num = torch.zeros_like(count)
    empty_idx = torch.zeros_like(full)
    return BlockMask.from_kv_blocks(empty_num, empty_idx, count, full, BLOCK_SIZE=block, seq_lengths=(n, n))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    n, H, D, blk = args.n, args.heads, args.head_dim, args.block
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, n, D, generator=g) for _ in range(3))
    spec = ac.AttentionSpec(num_heads=H, head_dim=D, mask=ac.route_blocks(args.top_k, blk, causal=args.causal))
    kern = ac.compile(spec, target="cpu")
    route = dict(spec.selectors)["routed_blocks"]
    lists = routing.select(route, q, k)
    bm = kern.block_map(n, n, routed_blocks=lists)

    compiled = torch.compile(flex_attention)
    if args.causal:  # listed tiles on the diagonal need the causal rule: they go in as partial tiles

        def flex_call() -> object:
            sel = routing.select(route, q, k)
            mask = BlockMask.from_kv_blocks(*_causal_lists(sel, n, blk), BLOCK_SIZE=blk, seq_lengths=(n, n),
                                            mask_mod=lambda b, h, qi, ki: qi >= ki)  # fmt: skip
            return compiled(q, k, v, block_mask=mask)
    else:

        def flex_call() -> object:
            return compiled(q, k, v, block_mask=flex_block_mask(routing.select(route, q, k), n, blk))

    start = time.perf_counter()
    flex_call()
    flex_first = time.perf_counter() - start
    want = kern(q, k, v)
    agree = (flex_call() - want).abs().max().item()  # type: ignore[operator]

    fns: dict[str, Callable[[], object]] = {
        "attncc_fwd": lambda: kern(q, k, v),
        "select": lambda: routing.select(route, q, k),
        "map": lambda: kern.plan.tile_lists(n, n, 1, {"routed_blocks": lists.numpy()}),
        "flex_mask": lambda: flex_block_mask(lists, n, blk),
        "flex_fwd": flex_call,
        "sdpa_dense_fwd": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=args.causal),
    }
    t = interleaved(fns, args.reps)
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    o = kern(qg, kg, vg)
    do = torch.randn_like(q)
    os_ = F.scaled_dot_product_attention(qg, kg, vg, is_causal=args.causal)
    t.update(interleaved({  # the backwards alone, each on its retained graph
        "attncc_bwd": lambda: torch.autograd.grad(o, (qg, kg, vg), do, retain_graph=True),
        "sdpa_dense_bwd": lambda: torch.autograd.grad(os_, (qg, kg, vg), do, retain_graph=True),
    }, args.reps))  # fmt: skip
    flex_bwd = flex_backward(blk)

    machine = f"{platform.machine()}, {torch.get_num_threads()} threads"
    print(f"# routed attention: N={n}, H={H}, D={D}, blocks of {blk} ({n // blk}), top {args.top_k}"
          f"{', causal' if args.causal else ''}; torch {torch.__version__}; {machine}")  # fmt: skip
    print(f"# map: {bm.summary()}; attncc vs FlexAttention output max |diff| {agree:.1e}; "
          f"flex first call (compile) {flex_first:.1f} s")  # fmt: skip
    fwd, flex = t["attncc_fwd"], t["flex_fwd"]
    print("| pass | attncc ms | selection ms (share) | map ms | FlexAttention ms (its BlockMask ms) | flex/attncc | "
          "dense SDPA ms | SDPA/attncc |")  # fmt: skip
    print("|" + "---|" * 8)
    print(f"| forward | {fwd * 1e3:.1f} | {t['select'] * 1e3:.2f} ({t['select'] / fwd:.1%}) | {t['map'] * 1e3:.2f} | "
          f"{flex * 1e3:.1f} ({t['flex_mask'] * 1e3:.2f}) | {flex / fwd:.2f}x | {t['sdpa_dense_fwd'] * 1e3:.1f} | "
          f"{t['sdpa_dense_fwd'] / fwd:.1f}x |")  # fmt: skip
    bwd = t["attncc_bwd"]
    print(f"| backward | {bwd * 1e3:.1f} | - | - | {flex_bwd} | - | {t['sdpa_dense_bwd'] * 1e3:.1f} | "
          f"{t['sdpa_dense_bwd'] / bwd:.1f}x |")  # fmt: skip


def flex_backward(blk: int) -> str:
    """Whether FlexAttention runs a backward on the CPU, tried at a small size after every timing (a failed
    compile can leave torch.compile falling back to eager flex_attention, which materializes the scores)."""
    torch._dynamo.reset()
    n = 4 * blk
    q, k, v = (torch.randn(1, 1, n, 64, requires_grad=True) for _ in range(3))
    lists = torch.arange(4).view(1, 1, 4, 1)
    try:
        torch.compile(flex_attention)(q, k, v, block_mask=flex_block_mask(lists, n, blk)).sum().backward()
    except Exception as exc:  # FlexAttention's own failures are results too
        return f"fails ({type(exc).__name__})"
    finally:
        torch._dynamo.reset()
    return "runs (not timed)"


def _causal_lists(sel: torch.Tensor, n: int, blk: int) -> tuple[torch.Tensor, ...]:
    """(kv_num, kv_idx, full_num, full_idx) for causal routing: diagonal tiles partial, the rest full."""
    nkv = n // blk
    qb = torch.arange(sel.shape[2])[:, None]
    out = []
    for want in (sel == qb, (sel >= 0) & (sel != qb)):
        count = want.sum(-1, dtype=torch.int32)
        order = torch.argsort((~want).to(torch.int8), dim=-1, stable=True)
        idx = torch.gather(sel, -1, order).clamp(min=0).to(torch.int32)
        idx = torch.cat([idx, torch.zeros(*idx.shape[:-1], nkv - idx.shape[-1], dtype=torch.int32)], -1)
        out += [count, idx]
    return tuple(out)


if __name__ == "__main__":
    main()
