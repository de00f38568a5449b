"""End to end: a small Llama-style model at 4K tokens on CPU, eager vs inductor vs attncc.

    python benchmarks/e2e.py                 # seq 4096, 4 layers, hidden 256, 8 heads (2 kv heads)
    python benchmarks/e2e.py --seq 2048 --layers 2

Random weights (transformers LlamaConfig, nothing downloaded), SDPA attention, batch 1, fp32,
forward only under torch.no_grad(). Each variant: first call (compile) time, then the best of
``--reps`` calls. Also checks attncc's logits against eager and prints the lifted sites.
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers

import attncc as ac


def best(fn, reps: int) -> float:  # type: ignore[no-untyped-def]
    out = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--window", type=int, default=0, help="Mistral-style sliding window (0: Llama, causal)")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    common = dict(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=args.seq,
        attn_implementation="sdpa",
    )
    if args.window:
        model = transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=args.window, **common))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    model = model.eval()
    ids = torch.randint(0, 1024, (1, args.seq))
    rows = []
    with torch.no_grad():
        ref = model(ids).logits
        for name, compiled in [
            ("eager", model),
            ("inductor", torch.compile(model, backend="inductor")),
            ("attncc", torch.compile(model, backend="attncc")),
        ]:
            torch._dynamo.reset()
            start = time.perf_counter()
            out = compiled(ids).logits
            first = time.perf_counter() - start
            err = (out - ref).abs().max().item()
            rows.append((name, first, best(lambda c=compiled: c(ids), args.reps), err))
    eager = rows[0][2]
    print(
        f"# seq {args.seq}, {args.layers} layers, hidden 256, heads 8/2, "
        f"{'sliding window ' + str(args.window) if args.window else 'causal'}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print("| variant | first call s | forward ms | speedup vs eager | max abs logit diff vs eager |")
    print("|---|---|---|---|---|")
    for name, first, t, err in rows:
        print(f"| {name} | {first:.2f} | {t * 1e3:.1f} | {eager / t:.2f}x | {err:.1e} |")
    for site in ac.dynamo.reports():
        rope = ", RoPE in the kernel prologue" if site.get("rope") else ""
        print(f"site {site['site']}: {site['status']}, mask {site.get('mask')}{rope} {site.get('reason') or ''}")


if __name__ == "__main__":
    main()
