"""Token-by-token generation on the CPU: attncc's cpu target vs SDPA on a growing KV cache, side by side.

    python benchmarks/generate.py                          # B=1, H=32, 8 kv heads, D=64, fp32, from 256 and 4096 keys
    python benchmarks/generate.py --layers 1 --dtypes float32 bfloat16   # one attention call per token
    python benchmarks/generate.py --masks causal sinks_window            # StreamingLLM's mask too
    python benchmarks/generate.py --masks ragged --batch 8 --layers 1    # a batch of sequences of their own lengths
    python benchmarks/generate.py --masks none padded --batch 8 --layers 1   # what torch.compile lifts from HF models
    python benchmarks/generate.py --masks none --cache cat --layers 1    # K and V grown by torch.cat (HF DynamicCache)
    python benchmarks/generate.py --masks padded --batch 8 --layers 8 --sites   # a kernel per layer, named apart

Each step appends one key: the call reads the first n positions of a preallocated cache (``k_cache[:, :, :n]``,
as a generation loop does), so every step is a new key length, and a new block map, for attncc; ``--cache cat``
grows K and V by ``torch.cat`` instead (as Hugging Face's DynamicCache does: new contiguous tensors each step, made
before the step's timed calls). ``--sites``: each layer calls its own kernel, compiled from the same spec under
its own name, as ``torch.compile(backend="attncc")`` makes one per attention site. ``--layers``
calls per step share that step's length, as a model's layers share one compiled kernel: the map is built at the
first and reused by the rest. ``--masks``: ``causal`` is ``causal(align="bottom_right")`` (the new token sees every
key), against SDPA's ``scaled_dot_product_attention(..., enable_gqa=True)``; ``sinks_window`` is StreamingLLM's
``sinks(4) | sliding_window(1023, align="bottom_right")``, against SDPA given that mask as a boolean ``attn_mask``
(built for every step before the timing starts: SDPA's figure leaves out the mask's cost); ``ragged`` is a batch
whose sequences each have their own key length (``SHORTER`` keys fewer than the longest, which has the cache's n),
``kv < lens[b]`` with the step's ``lens`` a runtime tensor (a new one each step, as a server makes it), against SDPA
given the [B, 1, 1, n] boolean mask. ``none`` and ``padded`` are the masks ``torch.compile(backend="attncc")`` lifts
from a Hugging Face model's decoding step: no mask (SDPA called without one), and for a left-padded batch
``(kv <= pos[0]) & (attention_mask[b, kv] != 0)`` (the step's position and the [B, n] padding mask, both runtime
tensors new each step; ``SHORTER`` keys of padding, cycled), against SDPA given the [B, 1, 1, n] boolean mask. Every
call runs under
``no_grad``. Steps alternate between the contenders (attncc's layers, then SDPA's), and each contender's total time
over ``--steps`` steps is reported per call. Each row starts a little later than ``--starts`` says (``--steps`` + 2
keys a row before it), so that no row meets a length an earlier one built a map for. "same length" is attncc's
per-call time when every step repeats one length, the growing calls' mean (the map reused throughout); "new-length
cost" is what a step's new length adds, in microseconds per step (with many layers a difference of two close figures
times the layers: noisy).
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import attncc as ac

SINKS, WINDOW = 4, 1023
SHORTER = (0, 37, 300, 1000)  # ragged batches: keys each sequence has fewer than the longest (cycled over the batch)


def lens(n: int, batch: int) -> torch.Tensor:
    """Each sequence's key length in a ragged batch whose longest has ``n`` (at least 1)."""
    return (n - torch.tensor([SHORTER[b % len(SHORTER)] for b in range(batch)])).clamp_min(1)


def padding(n: int, batch: int) -> torch.Tensor:
    """A left-padded batch's attention_mask [B, n] (1: a token, 0: padding; at least one token each)."""
    return (torch.arange(n)[None, :] >= (n - lens(n, batch))[:, None]).long()


Tensors = Callable[[int, int], dict[str, torch.Tensor]]
MASKS: dict[str, tuple[Callable[[], ac.Expr | None], Callable[[int, int], torch.Tensor] | None, Tensors | None]] = {
    # name: (attncc's mask; SDPA's boolean attn_mask [B or 1, 1, 1, n] for one query at key length n, or None; the
    # runtime tensors of attncc's call at key length n and batch B, or None)
    "causal": (lambda: ac.causal(align="bottom_right"), None, None),
    "none": (lambda: None, None, None),
    "padded": (
        lambda: (ac.kv <= ac.tensor("pos")[0]) & (ac.tensor("attention_mask")[ac.b, ac.kv] != 0),
        lambda n, B: (padding(n, B) != 0).view(B, 1, 1, n),
        lambda n, B: {"pos": torch.tensor([n - 1]), "attention_mask": padding(n, B)},
    ),
    "sinks_window": (
        lambda: ac.sinks(SINKS) | ac.sliding_window(WINDOW, align="bottom_right"),
        lambda n, B: ((torch.arange(n) < SINKS) | (torch.arange(n) >= n - 1 - WINDOW)).view(1, 1, 1, n),
        None,
    ),
    "ragged": (
        lambda: ac.kv < ac.tensor("lens")[ac.b],
        lambda n, B: (torch.arange(n)[None, :] < lens(n, B)[:, None]).view(B, 1, 1, n),
        lambda n, B: {"lens": lens(n, B)},
    ),
}


def generate(
    kerns: list[ac.Kernel],
    sdpa_mask: Callable[[int, int], torch.Tensor] | None,
    tensors: Tensors | None,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    start: int,
    steps: int,
    layers: int,
    cat: bool = False,
) -> tuple[float, float, float]:
    """Seconds per call of attncc on growing lengths, of SDPA on the same, and of attncc at one repeated length
    (``kerns``: each layer's kernel, or one for all)."""
    spent = {"attncc": 0.0, "sdpa": 0.0, "same": 0.0}
    middle = start + steps // 2  # the growing calls' mean length
    B = q.shape[0]
    made = {n: sdpa_mask(n, B) for n in range(start - 1, start + steps)} if sdpa_mask else {}
    given = {n: tensors(n, B) if tensors else {} for n in range(start - 1, start + steps)}  # (each step's own)
    grown = {"k": k_cache[:, :, : start - 2].clone(), "v": v_cache[:, :, : start - 2].clone()}  # (--cache cat)

    def kv(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's K and V: views of the caches, or (``cat``) the tensors grown to n keys by this step."""
        if not cat:
            return k_cache[:, :, :n], v_cache[:, :, :n]
        return grown["k"], grown["v"]

    calls: dict[str, object] = {
        "attncc": lambda n, i: kerns[i % len(kerns)](q, *kv(n), **given[n]),
        "sdpa": lambda n, i: F.scaled_dot_product_attention(q, *kv(n), attn_mask=made.get(n), enable_gqa=True),
        "same": lambda n, i: kerns[i % len(kerns)](q, k_cache[:, :, :middle], v_cache[:, :, :middle], **given[middle]),
    }
    with torch.no_grad():
        for n in range(start - 1, start + steps):
            if cat:  # (untimed: the model's own work)
                grown = {x: torch.cat([grown[x], c[:, :, n - 1 : n]], 2) for x, c in (("k", k_cache), ("v", v_cache))}
            if n == start - 1:
                for call in calls.values():  # warm: compiled, first maps built
                    for i in range(len(kerns)):
                        call(n, i)  # type: ignore[operator]
                continue
            for name, call in calls.items():
                began = time.perf_counter()
                for i in range(layers):
                    call(n, i)  # type: ignore[operator]
                spent[name] += time.perf_counter() - began
    return spent["attncc"] / (steps * layers), spent["sdpa"] / (steps * layers), spent["same"] / (steps * layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--starts", type=int, nargs="+", default=[256, 4096])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--dtypes", nargs="+", default=["float32"])
    parser.add_argument("--masks", nargs="+", choices=sorted(MASKS), default=["causal"])
    parser.add_argument("--cache", choices=["views", "cat"], default="views")
    parser.add_argument("--sites", action="store_true", help="a kernel per layer, each under its own name")
    args = parser.parse_args()
    H, Hkv, D = args.heads, args.kv_heads, args.head_dim
    B = args.batch
    print(f"# B={B} H={H} Hkv={Hkv} D={D}; {args.steps} steps; torch {torch.__version__}; {platform.machine()}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print("| mask | dtype | keys | layers | attncc us/call | SDPA us/call | SDPA/attncc | same length us/call "
          "| new-length cost us/step |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    torch.manual_seed(0)
    row = 0
    for mask in args.masks:
        make, sdpa_mask, tensors = MASKS[mask]
        spec = ac.AttentionSpec(num_heads=H, num_kv_heads=Hkv, head_dim=D, mask=make(), name=f"generate_{mask}")
        kerns = [ac.compile(spec, target="cpu")]
        for name in args.dtypes:
            dtype = getattr(torch, name)
            for first in args.starts:
                for layers in args.layers:
                    if args.sites:
                        named = [dict(num_heads=H, num_kv_heads=Hkv, head_dim=D, name=f"{spec.name}_{i}")
                                 for i in range(layers)]  # fmt: skip
                        kerns = [ac.compile(ac.AttentionSpec(mask=make(), **kw), target="cpu") for kw in named]
                    start = first + row * (args.steps + 2)  # lengths no earlier row met (its maps would be cached)
                    row += 1
                    k_cache = torch.randn(B, Hkv, start + args.steps + 1, D, dtype=dtype)
                    v_cache, q = torch.randn_like(k_cache), torch.randn(B, H, 1, D, dtype=dtype)
                    cache = (k_cache, v_cache)
                    timed = (start, args.steps, layers, args.cache == "cat")
                    ours, sdpa, same = generate(kerns, sdpa_mask, tensors, q, *cache, *timed)
                    print(f"| {mask} | {name} | {start}-{start + args.steps} | {layers} | {ours * 1e6:.1f} "
                          f"| {sdpa * 1e6:.1f} | {sdpa / ours:.2f}x | {same * 1e6:.1f} "
                          f"| {(ours - same) * layers * 1e6:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
