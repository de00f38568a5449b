"""Rotary position embedding (RoPE) applied to q and k inside the attention kernel.

A spec with ``rope=True`` rotates q and k before the scores, in the rotate-half convention of
Llama / GPT-NeoX (Hugging Face's ``apply_rotary_pos_emb``)::

    x' = x * cos + rotate_half(x) * sin,    rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])

The tables are call arguments ``rope_cos`` and ``rope_sin``, float, of shape [Skv, D],
[B, Skv, D] or [B, 1, Skv, D] (Hugging Face's unsqueezed form): one row per key position.
Key row j uses table row j; query row i uses table row ``i + Skv - Sq`` (queries are the last
Sq positions, as when decoding against a cache of unrotated keys). The tables are constants:
no gradient flows into them, and tables that require grad are refused rather than silently
detached.

>>> import torch, attncc as ac
>>> spec = ac.AttentionSpec(num_heads=2, head_dim=8, mask=ac.causal(), rope=True)
>>> kern = ac.compile(spec, target="reference")
>>> q = k = v = torch.randn(1, 2, 5, 8)
>>> angle = torch.arange(5.0)[:, None] * torch.ones(8)
>>> kern(q, k, v, rope_cos=angle.cos(), rope_sin=angle.sin()).shape
torch.Size([1, 2, 5, 8])
"""

from __future__ import annotations

import torch

from attncc.errors import SpecError

NAMES = ("rope_cos", "rope_sin")


def take(
    rope: bool,
    tensors: dict[str, torch.Tensor],
    batch: int,
    q_len: int,
    kv_len: int,
    head_dim: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Remove and validate the rope tables from a call's keyword tensors; [Bt, Skv, D] each."""
    given = [n for n in NAMES if n in tensors]
    if not rope:
        if given:
            raise SpecError(f"{given} passed, but the spec has no rope; build it with AttentionSpec(..., rope=True)")
        return None
    if len(given) != 2:
        missing = [n for n in NAMES if n not in tensors]
        raise SpecError(
            f"the spec applies RoPE: pass {missing} as keywords, e.g. kern(q, k, v, rope_cos=cos, rope_sin=sin)"
        )
    if q_len > kv_len:
        raise SpecError(
            f"RoPE aligns queries with the last keys, so q length ({q_len}) must not exceed kv length ({kv_len})"
        )
    out = []
    for name in NAMES:
        t = tensors.pop(name)
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise SpecError(f"{name} must be a float tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        if t.device != device:
            raise SpecError(f"{name} is on {t.device}, q is on {device}")
        if t.requires_grad and torch.is_grad_enabled():
            raise SpecError(
                f"{name} requires grad, but attncc treats RoPE tables as constants and returns no gradient for "
                f"them; pass {name}=table.detach(), or rotate q and k outside attncc if the tables are learned"
            )
        table = t.unsqueeze(0) if t.dim() == 2 else (t.squeeze(1) if t.dim() == 4 and t.shape[1] == 1 else t)
        if table.dim() != 3 or table.shape[0] not in (1, batch) or tuple(table.shape[1:]) != (kv_len, head_dim):
            raise SpecError(
                f"{name} has shape {tuple(t.shape)}; expected [{kv_len}, {head_dim}] or "
                f"[{batch}, {kv_len}, {head_dim}] (one row per key position)"
            )
        out.append(table.detach())
    return out[0], out[1]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, S, D] by tables [Bt, Skv, D] (x's rows are the last S table rows); differentiable."""
    n = x.shape[2]
    c = cos[:, -n:].unsqueeze(1).to(x.dtype)
    s = sin[:, -n:].unsqueeze(1).to(x.dtype)
    return x * c + rotate_half(x) * s
