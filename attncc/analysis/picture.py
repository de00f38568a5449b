"""A PNG picture of a block map: empty tiles light grey, partial orange, full blue.

Large maps are max-pooled so the picture stays under ~1024 pixels a side; the caption gives
the lengths, tile size, computed-tile fraction and predicted FLOPs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from attncc.analysis.blockmap import BlockMap

COLORS = np.array([[240, 240, 240], [255, 160, 20], [30, 100, 200]], dtype=np.uint8)
MAX_SIDE = 1024
MAX_MAPS = 4


def _pool(states: np.ndarray) -> np.ndarray:
    factor = max(1, -(-max(states.shape) // MAX_SIDE))
    if factor == 1:
        return states
    nq, nkv = -(-states.shape[0] // factor), -(-states.shape[1] // factor)
    padded = np.zeros((nq * factor, nkv * factor), states.dtype)
    padded[: states.shape[0], : states.shape[1]] = states
    return padded.reshape(nq, factor, nkv, factor).max(axis=(1, 3))


def render(bm: BlockMap, caption: str) -> Image.Image:
    maps = [_pool(m) for m in bm.unique_states()[:MAX_MAPS]]
    scale = max(1, min(64, 512 // max(maps[0].shape)))  # small maps scaled up to about 512 px
    tiles = [
        Image.fromarray(COLORS[m]).resize((m.shape[1] * scale, m.shape[0] * scale), Image.Resampling.NEAREST)
        for m in maps
    ]
    gap, text_h = 8, 44
    width = sum(t.width for t in tiles) + gap * (len(tiles) + 1)
    height = max(t.height for t in tiles) + text_h + 2 * gap
    image = Image.new("RGB", (max(width, 480), height), (255, 255, 255))
    x = gap
    for t in tiles:
        image.paste(t, (x, gap))
        x += t.width + gap
    draw = ImageDraw.Draw(image)
    draw.text((gap, height - text_h), caption, fill=(0, 0, 0))
    legend = "grey: empty   orange: partial (mask code)   blue: full (no mask code)"
    draw.text((gap, height - text_h + 18), legend, fill=(60, 60, 60))
    return image


def caption(name: str, bm: BlockMap, head_dim: int, num_heads: int, value_dim: int | None = None) -> str:
    flops = bm.predicted_flops(head_dim, num_heads, value_dim=value_dim)
    shown = min(bm.num_maps, MAX_MAPS)
    return (
        f"{name}: {bm.q_len}x{bm.kv_len}, tiles {bm.block_size[0]}x{bm.block_size[1]}, "
        f"{bm.computed_fraction:.1%} computed, {bm.num_full_blocks} full / {bm.num_partial_blocks} partial, "
        f"{flops / 1e9:.2f} GFLOP predicted ({shown} of {bm.num_maps} maps)"
    )


def save(bm: BlockMap, path: Path, name: str, head_dim: int, num_heads: int, value_dim: int | None = None) -> Path:
    render(bm, caption(name, bm, head_dim, num_heads, value_dim)).save(path)
    return path
