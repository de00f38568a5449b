"""KDGQA / DGQA: query heads assigned to kv heads at run time from the keys' norms, no k/v copies.

    python examples/kdgqa.py

Key-driven grouped-query attention sizes each kv head's group by the norm of its keys: kv heads with
larger keys serve more query heads (allocation proportional to the norms, largest remainder, at least
one query head each). The assignment changes with the data, so it cannot be baked into a kernel: the
spec declares ``kv_head_of=ac.tensor("kv_head_of")`` and each call passes the table. The kernels read kv
head ``kv_head_of[h]`` for query head h directly (groups may be uneven; no repeated k or v), and the
backward sums each kv head's gradient over whichever query heads read it. Checked against a dense
float64 computation that gathers k and v per query head.
"""

from __future__ import annotations

import math

import torch

import attncc as ac

HEADS, KV_HEADS, DIM, N = 8, 3, 64, 512


def key_driven_groups(k: torch.Tensor, num_heads: int) -> torch.Tensor:
    """int64 [num_heads]: kv head of each query head, groups proportional to the mean key norm per kv head."""
    norms = k.detach().float().norm(dim=-1).mean(dim=(0, 2))  # [Hkv]
    share = norms / norms.sum() * (num_heads - len(norms))
    sizes = 1 + share.floor().long()  # every kv head keeps at least one query head
    left = num_heads - int(sizes.sum())
    sizes[torch.argsort(share - share.floor(), descending=True)[:left]] += 1
    return torch.repeat_interleave(torch.arange(len(norms)), sizes)


def main() -> None:
    torch.manual_seed(0)
    spec = ac.AttentionSpec(num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=DIM, mask=ac.causal(),
                            kv_head_of=ac.tensor("kv_head_of"))  # fmt: skip
    kern = ac.compile(spec, target="cpu")
    q = torch.randn(2, HEADS, N, DIM, requires_grad=True)
    k = (torch.randn(2, KV_HEADS, N, DIM) * torch.tensor([0.5, 1.0, 2.0])[None, :, None, None]).requires_grad_()
    v = torch.randn(2, KV_HEADS, N, DIM, requires_grad=True)
    table = key_driven_groups(k, HEADS)
    out = kern(q, k, v, kv_head_of=table)
    out.sum().backward()

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    s = q64 @ k64.index_select(1, table).transpose(-1, -2) / math.sqrt(DIM)
    s = s.masked_fill(~torch.ones(N, N, dtype=torch.bool).tril(), -math.inf)
    want = s.softmax(-1) @ v64.index_select(1, table)
    want.sum().backward()
    errs = [(out.detach().double() - want.detach()).abs().max().item()]
    errs += [(a.grad.double() - c.grad).abs().max().item() for a, c in ((q, q64), (k, k64), (v, v64))]
    print(f"key-driven groups: {HEADS} query heads on {KV_HEADS} kv heads, kv_head_of = {table.tolist()}")
    print(f"  group sizes {torch.bincount(table, minlength=KV_HEADS).tolist()} (larger keys, larger group)")
    print(f"  max |attncc - dense float64|: out {errs[0]:.1e}, dq {errs[1]:.1e}, dk {errs[2]:.1e}, dv {errs[3]:.1e}")
    assert max(errs) < 1e-3


if __name__ == "__main__":
    main()
