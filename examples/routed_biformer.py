"""BiFormer-style bi-level routing attention on an image grid, trained end to end on the cpu target.

    python examples/routed_biformer.py

A 32 x 32 token grid (a 512 x 512 image at patch 16) is cut into 8 x 8 regions; every region's queries attend
to the tokens of the 4 regions whose mean key is closest to their mean query (their own region always among
them). ``ac.route_blocks(grid=...)`` declares it; on every call attncc gathers the tokens region-major (each
region one 64-token tile), selects the regions from q and k (an ``attn.select`` op in the IR), reads the block
map from the selected list and runs the tiled kernel on the kept tiles only (25% of them here), then puts the
output back in the image's token order. The routing itself is not differentiable; the attention is, so the
layer trains. The output is checked against a dense float64 computation of the same routed mask.
"""

from __future__ import annotations

import math

import torch

import attncc as ac

GRID, REGION, TOP_K, HEADS, DIM = (32, 32), (8, 8), 4, 4, 32


def dense_routed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The same attention in float64 with the routing written out (regions pooled by reshaping the grid)."""
    B, H, N, D = q.shape
    ry, rx = GRID[0] // REGION[0], GRID[1] // REGION[1]

    def pooled(x: torch.Tensor) -> torch.Tensor:  # [B, H, N, D] -> [B, H, regions, D]
        x = x.view(B, H, ry, REGION[0], rx, REGION[1], D)
        return x.mean((3, 5)).reshape(B, H, ry * rx, D)

    affinity = pooled(q) @ pooled(k).transpose(-1, -2)
    affinity = affinity.masked_fill(torch.eye(ry * rx, dtype=torch.bool), math.inf)  # own region kept
    chosen = affinity.topk(TOP_K, -1).indices
    region = torch.arange(N).view(GRID[0], GRID[1])
    region = ((region // GRID[1]) // REGION[0] * rx + (region % GRID[1]) // REGION[1]).view(-1)
    keep = torch.zeros(B, H, N, N, dtype=torch.bool)
    for r in range(ry * rx):
        rows = region == r
        for b in range(B):
            for h in range(H):
                kept = torch.isin(region, chosen[b, h, r])
                keep[b, h][rows] = kept
    s = (q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(~keep, -math.inf)
    return s.softmax(-1) @ v


def main() -> None:
    torch.manual_seed(0)
    spec = ac.AttentionSpec(num_heads=HEADS, head_dim=DIM, mask=ac.route_blocks(TOP_K, REGION, grid=GRID))
    kern = ac.compile(spec, target="cpu")
    n = GRID[0] * GRID[1]
    q, k, v = (torch.randn(1, HEADS, n, DIM, requires_grad=True) for _ in range(3))
    out = kern(q, k, v)
    out.sum().backward()
    want = dense_routed(q.detach().double(), k.detach().double(), v.detach().double())
    err = (out.detach().double() - want).abs().max().item()
    bm = kern.block_map(n, n, q=q.detach(), k=k.detach())
    print(f"routed attention over a {GRID[0]}x{GRID[1]} grid, {REGION[0]}x{REGION[1]} regions, top {TOP_K}:")
    print(f"  max |attncc - dense float64| = {err:.2e}; q.grad norm {q.grad.norm():.3f} (the attention trains)")
    print(f"  {bm.summary()}")
    assert err < 1e-4


if __name__ == "__main__":
    main()
