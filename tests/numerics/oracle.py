"""Independent float64 oracles: masks from their definitions in plain Python, attention by torch.softmax.

Nothing here uses attncc's expressions; each mask is written from the definition in DESIGN.md,
VARIANTS.md or the NATTEN documentation, as a loop over (q, kv) or over grid coordinates.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

MaskFn = Callable[[int, int, int, int], bool]  # (b, h, q, kv) -> visible


def dense(fn: MaskFn, B: int, H: int, Sq: int, Skv: int) -> torch.Tensor:
    return torch.tensor(
        [[[[fn(b, h, i, j) for j in range(Skv)] for i in range(Sq)] for h in range(H)] for b in range(B)]
    )


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor,
    scale: float,
    score_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """o, lse in float64; k/v heads repeated for GQA (the oracle may copy)."""
    q, k, v = q.double(), k.double(), v.double()
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if score_fn is not None:
        s = score_fn(s)
    s = s.masked_fill(~keep, -math.inf)
    empty = ~keep.any(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    lse = torch.logsumexp(s, dim=-1)
    return p @ v, lse


# ---- masks, one function per builtin, from their definitions -------------------------------
def causal(align: str = "top_left") -> MaskFn:
    def fn(b: int, h: int, i: int, j: int, Sq: int = 0, Skv: int = 0) -> bool:
        return j <= i

    return fn


def causal_bottom_right(Sq: int, Skv: int) -> MaskFn:
    return lambda b, h, i, j: j <= i + (Skv - Sq)


def sliding_window(left: int, right: int = 0) -> MaskFn:
    return lambda b, h, i, j: i - left <= j <= i + right


def per_head_window(lefts: list[int]) -> MaskFn:
    return lambda b, h, i, j: i - lefts[h] <= j <= i


def prefix_lm(n: int) -> MaskFn:
    return lambda b, h, i, j: j < n or j <= i


def sinks_or_window(n: int, left: int) -> MaskFn:
    return lambda b, h, i, j: j < n or (i - left <= j <= i)


def dilated(window: int, dilation: int, causal: bool) -> MaskFn:
    if causal:
        return lambda b, h, i, j: any(j == i - t * dilation for t in range(window))
    return lambda b, h, i, j: any(j == i + t * dilation for t in range(-(window // 2), window // 2 + 1))


def document(ids: list[int]) -> MaskFn:
    return lambda b, h, i, j: ids[i] == ids[j]


def block_layout(layout: list[list[int]], bq: int, bkv: int) -> MaskFn:
    return lambda b, h, i, j: bool(layout[i // bq][j // bkv])


def _coords(t: int, grid: tuple[int, ...]) -> list[int]:
    out = []
    for n in reversed(grid):
        out.append(t % n)
        t //= n
    return out[::-1]


def _na_axis(x: int, y: int, n: int, k: int, d: int, causal: bool) -> bool:
    """NATTEN on one axis: dilation groups, then a k-wide window shifted inside the group."""
    if x % d != y % d:
        return False
    group = [t for t in range(n) if t % d == x % d]  # positions of this dilation group
    xi, yi = group.index(x), group.index(y)
    if causal:
        return 0 <= xi - yi < k
    start = min(max(xi - k // 2, 0), len(group) - k)
    return start <= yi < start + k


def neighborhood(
    grid: tuple[int, ...], kernel: tuple[int, ...], dilation: tuple[int, ...], causal: tuple[bool, ...]
) -> MaskFn:
    def fn(b: int, h: int, i: int, j: int) -> bool:
        xs, ys = _coords(i, grid), _coords(j, grid)
        return all(_na_axis(x, y, n, k, d, c) for x, y, n, k, d, c in zip(xs, ys, grid, kernel, dilation, causal))

    return fn


def block_local(grid: tuple[int, ...], block: tuple[int, ...], halo: int = 0) -> MaskFn:
    def fn(b: int, h: int, i: int, j: int) -> bool:
        xs, ys = _coords(i, grid), _coords(j, grid)
        return all((x // p) * p - halo <= y < (x // p + 1) * p + halo for x, y, p in zip(xs, ys, block))

    return fn


def grid_attention(grid: tuple[int, ...], groups: tuple[int, ...]) -> MaskFn:
    def fn(b: int, h: int, i: int, j: int) -> bool:
        xs, ys = _coords(i, grid), _coords(j, grid)
        return all(x % (n // g) == y % (n // g) for x, y, n, g in zip(xs, ys, grid, groups))

    return fn


# ---- score mods ---------------------------------------------------------------------------------
def alibi_fn(H: int, slopes: list[float] | torch.Tensor | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    if isinstance(slopes, torch.Tensor):
        sl = slopes.double()
    else:
        sl = torch.tensor(slopes if slopes else [2 ** (-8 * (h + 1) / H) for h in range(H)], dtype=torch.float64)

    def fn(s: torch.Tensor) -> torch.Tensor:
        Sq, Skv = s.shape[-2:]
        dist = (torch.arange(Sq)[:, None] - torch.arange(Skv)[None, :]).abs().double()
        return s - sl.view(1, -1, 1, 1) * dist

    return fn


def softcap_fn(cap: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda s: cap * torch.tanh(s / cap)


def relative_bias_fn(table: torch.Tensor, max_distance: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def fn(s: torch.Tensor) -> torch.Tensor:
        Sq, Skv = s.shape[-2:]
        rel = torch.arange(Skv)[None, :] - torch.arange(Sq)[:, None]
        idx = rel.clamp(-max_distance, max_distance) + max_distance
        return s + table.double()[:, idx].unsqueeze(0)

    return fn


# ---- rotary position embedding ---------------------------------------------------------------
def rope_angles(positions: int, dim: int, base: float = 10000.0) -> torch.Tensor:
    """theta[p, j] = p * base^(-2j/D) for j < D/2, float64 (RoFormer, eq. 34)."""
    inv = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    return torch.arange(positions, dtype=torch.float64)[:, None] * inv[None]


def rope_complex(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, S, D] by the last S rows of theta [S', D/2]: the pair (x[j], x[j + D/2])
    read as the complex number x[j] + i x[j + D/2] is multiplied by exp(i theta[p, j])."""
    half = x.shape[-1] // 2
    z = torch.complex(x[..., :half].double(), x[..., half:].double()) * torch.polar(
        torch.ones_like(theta[-x.shape[2] :]), theta[-x.shape[2] :]
    )
    return torch.cat((z.real, z.imag), dim=-1)


def rope_tables(cos: torch.Tensor, sin: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin written out per element for arbitrary tables [Bt, S', D]
    (no pairing between the halves assumed)."""
    half, n = x.shape[-1] // 2, x.shape[2]
    c, s = cos[:, None, -n:].double(), sin[:, None, -n:].double()
    lo, hi = x[..., :half].double(), x[..., half:].double()
    return torch.cat((lo * c[..., :half] - hi * s[..., :half], hi * c[..., half:] + lo * s[..., half:]), dim=-1)
