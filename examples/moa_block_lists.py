"""MoA / S2-Attention style: a per-head sparse layout searched offline, shipped as block lists, loaded and run.

    python examples/moa_block_lists.py

An offline search (here: a stand-in that gives each head its own local span in blocks, a few global
"sink" blocks and a per-head dilation, as MoA's heterogeneous elastic rules do) writes the layout as
block-index lists, ``[1, H, query blocks, K]`` int with -1 padding, to a file. Serving loads the file and
passes the lists to a kernel declared once with ``ac.block_indices(...) & ac.causal()``: no recompile
when the layout changes, the block map read from the lists in O(their size). The output and the q, k, v
gradients are checked against a dense float64 computation of the same layout.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch

import attncc as ac

HEADS, DIM, N, BLOCK = 8, 64, 1024, 64


def search_layout(heads: int, nq: int) -> torch.Tensor:
    """Stand-in for the offline search: per head a local span (1 to 8 blocks), 1 sink block, a dilation."""
    spans = [1, 1, 2, 2, 4, 4, 8, 8][:heads]
    dilations = [1, 2, 1, 3, 1, 2, 1, 1][:heads]
    rows = []
    for h in range(heads):
        per_head = []
        for qb in range(nq):
            local = [qb - i * dilations[h] for i in range(spans[h]) if qb - i * dilations[h] >= 0]
            per_head.append(sorted({0, *local}))
        rows.append(per_head)
    width = max(len(r) for per_head in rows for r in per_head)
    out = torch.full((1, heads, nq, width), -1, dtype=torch.int32)
    for h, per_head in enumerate(rows):
        for qb, r in enumerate(per_head):
            out[0, h, qb, : len(r)] = torch.tensor(r, dtype=torch.int32)
    return out


def main() -> None:
    torch.manual_seed(0)
    nq = N // BLOCK
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "layout.pt"
        torch.save(search_layout(HEADS, nq), path)  # offline: the searched layout, shipped with the model
        lists = torch.load(path)  # serving: load the lists

    spec = ac.AttentionSpec(num_heads=HEADS, num_kv_heads=2, head_dim=DIM,
                            mask=ac.block_indices(ac.tensor("layout"), BLOCK) & ac.causal())  # fmt: skip
    kern = ac.compile(spec, target="cpu")
    q = torch.randn(1, HEADS, N, DIM, requires_grad=True)
    k, v = (torch.randn(1, 2, N, DIM, requires_grad=True) for _ in range(2))
    out = kern(q, k, v, layout=lists)
    out.sum().backward()

    # dense float64 check: tile (qb, kb) visible where listed, then causal inside it
    dense = torch.zeros(1, HEADS, nq, nq, dtype=torch.bool)
    for h in range(HEADS):
        for qb in range(nq):
            row = lists[0, h, qb]
            dense[0, h, qb, row[row >= 0].long()] = True
    keep = dense.repeat_interleave(BLOCK, 2).repeat_interleave(BLOCK, 3) & torch.ones(N, N, dtype=torch.bool).tril()
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    s = q64 @ k64.repeat_interleave(4, 1).transpose(-1, -2) / math.sqrt(DIM)
    want = s.masked_fill(~keep, -math.inf).softmax(-1) @ v64.repeat_interleave(4, 1)
    want.sum().backward()
    errs = [(out.detach().double() - want.detach()).abs().max().item()]
    errs += [(a.grad.double() - c.grad).abs().max().item() for a, c in ((q, q64), (k, k64), (v, v64))]
    bm = kern.block_map(N, N, layout=lists)
    print(
        f"MoA-style per-head layout, {HEADS} heads (GQA 4:1), {N} tokens, blocks of {BLOCK}, lists {tuple(lists.shape)}"
    )
    print(f"  max |attncc - dense float64|: out {errs[0]:.1e}, dq {errs[1]:.1e}, dk {errs[2]:.1e}, dv {errs[3]:.1e}")
    print(f"  {bm.summary()}")
    assert max(errs) < 1e-3


if __name__ == "__main__":
    main()
