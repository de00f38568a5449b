"""End to end: small models of three attention families on CPU, eager vs Inductor vs attncc, in one run.

    python benchmarks/e2e.py                         # 4096 tokens; llama, mistral, falcon (about 15 min)
    python benchmarks/e2e.py --seq 2048 --families llama --reps 2

Families (random weights, transformers configs, nothing downloaded; SDPA attention, batch 1, fp32):
Llama (causal, GQA 8/2 heads, RoPE), Mistral (sliding window ``--window``, GQA 8/2), Falcon with ALiBi
(8 heads; multi-query keys). Hidden 256, ``--layers`` layers.

Per family and variant (eager, ``torch.compile`` with Inductor, ``torch.compile(backend="attncc")`` with
Inductor for the rest of the graph):

- **forward**: first call (compile) time, then the best of ``--reps`` calls under ``no_grad``; the max
  abs logit difference against eager.
- **forward + backward**: a training step's loss.backward() (``labels=ids``): first call, then best of reps.
- **generate() recompile**: ``model.forward`` compiled, ``generate`` of ``--new-tokens`` tokens from a prompt
  of ``--prompt`` tokens (warm-up), then a prompt of a new length: its first call minus a warm repeat of it
  is what adapting to the new length cost (Inductor's, attncc's, 0 for eager).

Inductor's on-disk FX-graph and autograd caches are switched off (``--warm`` keeps them): with them, a
variant whose graphs an earlier run compiled reloads them and looks seconds cheaper.

Prints markdown tables and attncc's per-site reports (``ac.dynamo.explain``-style).
"""

from __future__ import annotations

import os
import sys

# Inductor's on-disk caches would let a variant reuse graphs an earlier run compiled (the dynamic graphs of
# generate() do not depend on the prompt length): every variant pays its full compile here, unless --warm.
if "--warm" not in sys.argv:
    os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "0"
    os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "0"

import argparse
import platform
import time
from collections.abc import Callable
from typing import Any

import torch
import transformers as T

import attncc as ac

VOCAB = 1024


def model_of(family: str, seq: int, layers: int, window: int) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=256, num_hidden_layers=layers, attn_implementation="sdpa")
    if family == "llama":
        cfg = T.LlamaConfig(intermediate_size=512, num_attention_heads=8, num_key_value_heads=2,
                            max_position_embeddings=seq + 64, **common)  # fmt: skip
        return T.LlamaForCausalLM(cfg)
    if family == "mistral":
        cfg = T.MistralConfig(intermediate_size=512, num_attention_heads=8, num_key_value_heads=2,
                              sliding_window=window, max_position_embeddings=seq + 64, **common)  # fmt: skip
        return T.MistralForCausalLM(cfg)
    if family == "falcon":
        return T.FalconForCausalLM(T.FalconConfig(num_attention_heads=8, alibi=True, **common))
    raise SystemExit(f"unknown family {family!r}: llama, mistral or falcon")


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def best(fn: Callable[[], Any], reps: int) -> float:
    return min(timed(fn)[1] for _ in range(reps))


def compiled(model: torch.nn.Module, variant: str) -> Any:
    torch._dynamo.reset()
    if variant == "eager":
        return model
    if variant == "inductor":
        return torch.compile(model, backend="inductor")
    return torch.compile(model, backend="attncc", options={"backend": "inductor"})


def forward_rows(family: str, args: argparse.Namespace) -> list[tuple[str, float, float, float]]:
    model = model_of(family, args.seq, args.layers, args.window).eval()
    ids = torch.randint(0, VOCAB, (1, args.seq), generator=torch.Generator().manual_seed(1))
    rows: list[tuple[str, float, float, float]] = []
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        for variant in ("eager", "inductor", "attncc"):
            ac.dynamo.clear_reports()
            fn = compiled(model, variant)
            out, first = timed(lambda fn=fn: fn(ids, use_cache=False).logits)
            t = best(lambda fn=fn: fn(ids, use_cache=False), args.reps)
            rows.append((variant, first, t, (out - ref).abs().max().item()))
            if variant == "attncc":
                sites = ac.dynamo.reports()
    print_sites(family, "forward", sites)
    return rows


def training_rows(family: str, args: argparse.Namespace) -> list[tuple[str, float, float, float]]:
    rows = []
    ids = torch.randint(0, VOCAB, (1, args.seq), generator=torch.Generator().manual_seed(2))
    for variant in ("eager", "inductor", "attncc"):
        model = model_of(family, args.seq, args.layers, args.window).train()
        fn = compiled(model, variant)

        def step(fn: Any = fn, model: torch.nn.Module = model) -> float:
            model.zero_grad(set_to_none=True)
            loss = fn(ids, labels=ids, use_cache=False).loss
            loss.backward()
            return float(loss.detach())

        loss, first = timed(step)
        rows.append((variant, first, best(step, args.reps), loss))
    return rows


def generate_rows(family: str, args: argparse.Namespace) -> list[tuple[str, float, float, float, float, int]]:
    rows = []
    prompts = [torch.randint(3, VOCAB, (1, n), generator=torch.Generator().manual_seed(n)) for n in args.prompt]
    for variant in ("eager", "inductor", "attncc"):
        model = model_of(family, args.seq, args.layers, args.window).eval()
        model.generation_config.pad_token_id = 0
        torch._dynamo.reset()
        ac.dynamo.clear_reports()
        if variant != "eager":
            options = {"options": {"backend": "inductor"}} if variant == "attncc" else {}
            model.forward = torch.compile(model.forward, backend=variant, **options)  # type: ignore[method-assign]

        def gen(ids: torch.Tensor, model: torch.nn.Module = model) -> Any:
            return model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False)

        _, warm_first = timed(lambda: gen(prompts[0]))
        _, new_first = timed(lambda: gen(prompts[1]))
        _, new_again = timed(lambda: gen(prompts[1]))
        recompiles = max((r.get("compiles", 0) for r in ac.dynamo.reports()), default=0)
        rows.append((variant, warm_first, new_first, new_again, new_first - new_again, recompiles))
    return rows


def speed_table(rows: list[tuple[str, float, float, float]], first: str, time_: str, last: str, fmt: str) -> None:
    """Rows (variant, first call s, best s, last column) as markdown, with the speedup over eager (row 0)."""
    eager = rows[0][2]
    print(f"\n| variant | {first} | {time_} | vs eager | {last} |\n|---|---|---|---|---|")
    for variant, first_s, t, value in rows:
        print(f"| {variant} | {first_s:.2f} | {t * 1e3:.1f} | {eager / t:.2f}x | {fmt.format(value)} |")


def print_sites(family: str, what: str, sites: list[dict[str, Any]]) -> None:
    for s in sites:
        how = (
            f"lifted, mask {s['mask']}, score mod {s.get('score_mod')}, rope {s.get('rope')}, "
            f"tiles {s.get('computed_tiles')}"
            if s["status"] == "lifted"
            else f"fallback: {s['reason']}"
        )
        print(f"  {family} {what} site {s['site']}: {how}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--window", type=int, default=512, help="Mistral's sliding window")
    parser.add_argument("--families", default="llama,mistral,falcon")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--prompt", type=int, nargs=2, default=[256, 384], help="the two prompt lengths")
    parser.add_argument("--new-tokens", type=int, default=4)
    parser.add_argument("--parts", default="forward,training,generate")
    parser.add_argument("--warm", action="store_true", help="keep Inductor's on-disk graph caches")
    args = parser.parse_args()
    parts = args.parts.split(",")
    print(
        f"# e2e: seq {args.seq}, {args.layers} layers, hidden 256, fp32, batch 1; torch {torch.__version__}, "
        f"transformers {T.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    )
    for family in args.families.split(","):
        print(f"\n## {family}")
        if "forward" in parts:
            speed_table(forward_rows(family, args), "first call s", "forward ms", "max abs logit diff", "{:.1e}")
        if "training" in parts:
            speed_table(training_rows(family, args), "first step s", "fwd+bwd ms", "loss", "{:.4f}")
        if "generate" in parts:
            rows = generate_rows(family, args)
            p0, p1 = args.prompt
            print(
                f"\n| variant | generate({p0}) first s | generate({p1}) first s | generate({p1}) again s | "
                "new-length cost s | compiles per site |\n|---|---|---|---|---|---|"
            )
            for v, w, nf, na, cost, rec in rows:
                print(f"| {v} | {w:.2f} | {nf:.2f} | {na:.2f} | {cost:.2f} | {rec} |")


if __name__ == "__main__":
    main()
