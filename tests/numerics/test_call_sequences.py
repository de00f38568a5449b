"""One kernel, many calls: whatever a kernel keeps between calls must leave every call its own answer.

A compiled kernel keeps a lot from call to call: tile lists per shape, maps built ahead for a growing cache, lists
shared by maps of the same tiles, maps of runtime tensors kept by their values, the cpu target's partial-tile
records and runtime arguments, and prepared calls that skip validation. Each is exact for the calls it was made
for; a key that leaves something out gives a later call an earlier call's answer, silently. Here one kernel per mask
walks a seeded random sequence of calls, as a generation loop and a serving process make them: a growing cache (one
key a step, a model's layers calling at each step with their own caches), jumps ahead and back, a few speculative
tokens, a new batch, a prefill, document ids rewritten in place, calls that want gradients, a dtype and a thread
count per call. Every call is checked against the float64 oracle on the mask written from its definition.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from unittest import mock

import pytest
import torch

import attncc as ac
from attncc import config
from attncc.analysis import tiling
from tests.codegen.test_cpu_target import _isas
from tests.numerics import oracle

H, HKV, D, LAYERS = 4, 2, 16, 2
SINKS, LEFT = 3, 21
DTYPES = [torch.float32, torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}  # max abs error of o (unit-variance inputs)
Keep = Callable[[torch.Tensor, torch.Tensor, int, int, dict[str, torch.Tensor]], torch.Tensor]  # (i, j, Sq, Skv, T)

MASKS: dict[str, tuple[Callable[[], ac.Expr | None], Keep]] = {  # name: (the attncc mask, its definition)
    "every_key": (lambda: None, lambda i, j, sq, skv, t: (i >= 0) & (j >= 0)),  # a model's decoding step's SDPA
    "causal_br": (lambda: ac.causal(align="bottom_right"), lambda i, j, sq, skv, t: j <= i + skv - sq),
    "sinks_window_br": (
        lambda: ac.sinks(SINKS) | ac.sliding_window(LEFT, align="bottom_right"),
        lambda i, j, sq, skv, t: (j < SINKS) | ((i + skv - sq - LEFT <= j) & (j <= i + skv - sq)),
    ),
    "document": (
        lambda: ac.document(ac.tensor("doc")) & ac.causal(),
        lambda i, j, sq, skv, t: (t["doc"][i] == t["doc"][j]) & (j <= i),
    ),
    "padded": (  # a left-padded batch (HF's attention_mask[b, kv]): a decoding step's map read at every point
        lambda: ac.causal(align="bottom_right") & (ac.tensor("am")[ac.b, ac.kv] != 0),
        lambda i, j, sq, skv, t: (j <= i + skv - sq) & (t["am"][:, None, None, :] != 0),
    ),
    "ragged": (  # a batch of sequences of their own lengths, causal within each (the new rows at its end)
        lambda: ac.causal(align="bottom_right") & (ac.kv < ac.tensor("lens")[ac.b]),
        lambda i, j, sq, skv, t: (j <= i + skv - sq) & (j < t["lens"].view(-1, 1, 1, 1)),
    ),
}


def walk(rng: random.Random, prefill_only: bool, steps: int) -> list[tuple[int, int, int, bool]]:
    """(batch, q_len, kv_len, wants gradient) of each call; a document mask's calls are prefills (q_len = kv_len)."""
    calls: list[tuple[int, int, int, bool]] = []
    n, batch = rng.randrange(5, 40), 1
    for _ in range(steps):
        r = rng.random()
        if r < 0.55:
            n += 1  # a generation step
        elif r < 0.65:
            n += rng.randrange(2, 70)  # a longer prompt appended
        elif r < 0.75 and calls:
            n = rng.choice(calls)[2]  # back to a length met before (a cache reset, another sequence)
        elif r < 0.8:
            batch = rng.choice([1, 2, 3])
        sq = n if prefill_only else (rng.choice([2, 3, 5]) if r > 0.93 else 1)  # speculative tokens
        calls.append((batch, min(sq, n), n, rng.random() < 0.1))
    return calls


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("name", sorted(MASKS))
def test_every_call_of_a_random_walk_gets_its_own_answer(name: str, isa: str) -> None:
    with config.override(cpu_isa=isa):
        walk_and_check(name, "cpu", random.Random(f"{name}-{isa}"), 45 if name == "document" else 90, LAYERS)


@pytest.mark.parametrize("name", sorted(MASKS))
def test_every_call_of_a_random_walk_on_triton_gets_its_own_answer(name: str) -> None:
    """The same on the triton target (its lists copied to the device once per lists; under the interpreter here,
    so a shorter walk, and no bf16: the interpreter's bf16 ``tl.dot`` is wrong, ``test_triton.BF16_INTERPRETER``)."""
    dtypes = DTYPES if torch.cuda.is_available() else [t for t in DTYPES if t != torch.bfloat16]
    walk_and_check(name, "triton", random.Random(f"{name}-triton"), 30, LAYERS, dtypes)


def walk_and_check(
    name: str, target: str, rng: random.Random, steps: int, layers: int, dtypes: list[torch.dtype] = DTYPES
) -> None:
    make, keep_fn = MASKS[name]
    kern = ac.compile(ac.AttentionSpec(num_heads=H, num_kv_heads=HKV, head_dim=D, mask=make()), target=target)
    doc = torch.zeros(0, dtype=torch.long)
    for batch, sq, skv, grad in walk(rng, name == "document", steps):
        if name == "document":  # new ids in the same tensor when the length allows (a batch of packed prompts)
            ids = torch.tensor(sorted(rng.choices(range(4), k=skv)))
            doc = ids if doc.shape[0] != skv or rng.random() < 0.5 else doc.copy_(ids)
        tensors = {"doc": doc} if name == "document" else {}
        if name == "ragged":  # each sequence's own length (some shorter than the new rows: those see nothing)
            tensors = {"lens": torch.tensor([rng.choice([skv, skv, skv - 40, 2, 0]) for _ in range(batch)])}
        if name == "padded":  # each sequence's padding on the left (some all padding)
            pads = torch.tensor([[rng.choice([0, 0, 7, skv // 2, skv])] for _ in range(batch)])
            tensors = {"am": (torch.arange(skv)[None, :] >= pads).long()}
        for layer in range(layers):  # each layer's K and V: whole tensors or views of longer caches
            dtype = rng.choice(dtypes)  # (a model's layers in one dtype; another model's, or a cast, in another)
            cache = torch.randn(2, batch, HKV, skv + rng.choice([0, 0, 9]), D).to(dtype)
            q = torch.randn(batch, H, sq, D).to(dtype).requires_grad_(grad)
            k, v = cache[0, :, :, :skv], cache[1, :, :, :skv]
            threads = torch.get_num_threads()
            torch.set_num_threads(rng.choice([1, 2, 2, 3]))  # (a server's other work takes threads now and then)
            try:
                with torch.set_grad_enabled(grad):
                    out = kern(q, k, v, **tensors)
            finally:
                torch.set_num_threads(threads)
            i, j = torch.arange(sq)[:, None], torch.arange(skv)[None, :]
            keep = keep_fn(i, j, sq, skv, tensors).expand(batch, H, sq, skv)
            want, _ = oracle.attention(q.detach(), k, v, keep, D**-0.5)
            err, tol = float((out.detach().double() - want).abs().max()), TOL[dtype]
            assert err < tol, f"{target} {dtype} call {(batch, sq, skv)} layer {layer}: max error {err:.2e}"
            if grad:
                w = torch.randn(out.shape, dtype=torch.float64)
                (got,) = torch.autograd.grad((out.double() * w).sum(), q)
                ref = q.detach().double().requires_grad_()
                (wanted,) = torch.autograd.grad((oracle.attention(ref, k, v, keep, D**-0.5)[0] * w).sum(), ref)
                err = float((got.double() - wanted).abs().max())
                assert err < 10 * tol, f"{target} {dtype} dq of call {(batch, sq, skv)}: max error {err:.2e}"


def test_a_call_at_a_new_key_length_is_still_checked() -> None:
    """A call like a prepared one but for its key length skips most validation (``Kernel._new_length``); what can
    differ is still checked: K and V of different lengths, empty ones, and the spec's length requirements."""
    kern = ac.compile(ac.AttentionSpec(num_heads=H, num_kv_heads=HKV, head_dim=D, mask=ac.causal("bottom_right")))
    q, cache = torch.randn(1, H, 1, D), torch.randn(1, HKV, 40, D)
    with torch.no_grad():
        kern(q, cache[:, :, :20], cache[:, :, :20])  # prepared at 20 keys
        with pytest.raises(ac.SpecError, match="same batch, heads and length"):
            kern(q, cache[:, :, :21], cache[:, :, :22])
        with pytest.raises(ac.SpecError, match="empty sequence"):
            kern(q, cache[:, :, :0], cache[:, :, :0])
        grid = ac.compile(ac.AttentionSpec(num_heads=H, num_kv_heads=HKV, head_dim=D, mask=ac.block_local(16, 4)))
        x = torch.randn(1, H, 16, D)
        grid(x, cache[:, :, :16], cache[:, :, :16])
        with pytest.raises(ac.SpecError, match="grid's 16 tokens"):
            grid(x, cache[:, :, :17], cache[:, :, :17])


def test_kernels_differing_only_in_name_share_what_they_keep() -> None:
    """A model's layers: torch.compile names each attention site, so their specs differ in name only. They share one
    kernel's memos: a decoding step's new key length builds one map for every layer (the later layers' calls are
    prepared), and each call still gets its own answer. Specs that capture different tensors never share."""
    mask = ac.sinks(SINKS) | ac.sliding_window(LEFT, align="bottom_right")
    layers = [
        ac.compile(ac.AttentionSpec(num_heads=H, head_dim=D, num_kv_heads=HKV, mask=mask, name=f"share_{i}"))
        for i in range(3)
    ]
    assert layers[1].spec.name == "share_1" and layers[1]._prepared is layers[0]._prepared
    q, caches = torch.randn(1, H, 1, D), torch.randn(3, 2, 1, HKV, 300, D)
    with torch.no_grad(), mock.patch.object(tiling, "build_lengths", wraps=tiling.build_lengths) as built:
        for n in (100, 101, 300):  # (101: a growing cache's step, whose maps are built ahead)
            for kern, (k, v) in zip(layers, caches, strict=True):
                i, j = torch.arange(1)[:, None], torch.arange(n)[None, :]
                keep = MASKS["sinks_window_br"][1](i, j, 1, n, {}).expand(1, H, 1, n)
                want, _ = oracle.attention(q, k[:, :, :n], v[:, :, :n], keep, D**-0.5)
                torch.testing.assert_close(kern(q, k[:, :, :n], v[:, :, :n]).double(), want, atol=1e-5, rtol=1e-5)
    assert built.call_count == 3  # one map (or run of maps) per length, not per layer
    doc = [torch.tensor([0] * 5 + [1] * 7), torch.tensor([0] * 9 + [1] * 3)]  # captured: the spec's own tensors
    specs = [ac.AttentionSpec(num_heads=H, head_dim=D, mask=_same_doc(d), name=f"docs_{i}") for i, d in enumerate(doc)]
    kerns = [ac.compile(spec) for spec in specs]
    assert kerns[0]._prepared is not kerns[1]._prepared
    q, k = torch.randn(1, H, 12, D), torch.randn(1, H, 12, D)
    for kern, d in zip(kerns, doc, strict=True):
        want, _ = oracle.attention(q, k, k, (d[:, None] == d[None, :]).expand(1, H, 12, 12), D**-0.5)
        torch.testing.assert_close(kern(q, k, k).double(), want, atol=1e-5, rtol=1e-5)


def _same_doc(ids: torch.Tensor) -> Callable[..., torch.Tensor]:
    """A FlexAttention-style mask_mod capturing ``ids``."""
    return lambda b, h, q, kv: ids[q] == ids[kv]
