"""What a captured value contributes to a kernel's identity (issue 13, item 1).

Two specs that differ only in the tensors their callables capture, in the names of their runtime
tensors or in constants must never share a kernel's data: each compiled kernel is checked against
an independent float64 oracle built from *its own* inputs.
"""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import HealthCheck, given, settings

import attncc as ac
from tests.numerics import oracle

S, D = 48, 16


def _qkv(seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, 2, S, D, generator=g) for _ in range(3))


def _check(kern: ac.Kernel, keep: torch.Tensor, score_fn=None, seed: int = 0, **tensors: torch.Tensor) -> None:  # type: ignore[no-untyped-def]
    q, k, v = _qkv(seed)
    want, _ = oracle.attention(q, k, v, keep, D**-0.5, score_fn)
    got = kern(q, k, v, **tensors)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def _doc_mask(doc: torch.Tensor):  # type: ignore[no-untyped-def]
    return lambda b, h, q, kv: doc[q] == doc[kv]


def _doc_keep(doc: torch.Tensor) -> torch.Tensor:
    ids = doc.tolist()
    return oracle.dense(oracle.document(ids), 1, 2, S, S)


@pytest.mark.parametrize("target", ["cpu", "reference"])
def test_specs_capturing_different_tensors_get_their_own_data(target: str) -> None:
    doc_a = torch.tensor([0] * 32 + [1] * 16)
    doc_b = torch.tensor([0] * 8 + [1] * 40)
    make = lambda doc: ac.AttentionSpec(num_heads=2, head_dim=D, mask=_doc_mask(doc))
    ka, kb = ac.compile(make(doc_a), target=target), ac.compile(make(doc_b), target=target)
    assert ka is not kb
    _check(ka, _doc_keep(doc_a))
    _check(kb, _doc_keep(doc_b))
    assert ac.compile(make(doc_a), target=target) is ka, "the same captured tensor reuses the kernel"
    if target == "cpu":
        assert ka.cpu_kernel() is kb.cpu_kernel(), "the generated code is shared: only the binding differs"


def test_captured_bias_in_a_score_mod_is_bound_per_spec() -> None:
    bias_a, bias_b = torch.randn(S, S), torch.randn(S, S) * 3
    make = lambda t: ac.AttentionSpec(num_heads=2, head_dim=D, score_mod=lambda s, b, h, q, kv: s + t[q, kv])
    keep = torch.ones(1, 2, S, S, dtype=torch.bool)
    for bias in (bias_a, bias_b):
        kern = ac.compile(make(bias), target="cpu")
        _check(kern, keep, lambda s, bias=bias: s + bias.double())


@pytest.mark.parametrize("declared_first", [True, False])
def test_declared_tensor_and_captured_tensor_of_one_name_do_not_collide(declared_first: bool) -> None:
    mod = torch.tensor([0, 1] * (S // 2))
    declared = ac.AttentionSpec(num_heads=2, head_dim=D, mask=ac.tensor("mod")[ac.q] == ac.tensor("mod")[ac.kv])
    captured = ac.AttentionSpec(num_heads=2, head_dim=D, mask=lambda b, h, q, kv: mod[q] == mod[kv])
    first, second = (declared, captured) if declared_first else (captured, declared)
    kerns = {id(s): ac.compile(s, target="cpu") for s in (first, second)}
    keep = _doc_keep(mod)
    _check(kerns[id(declared)], keep, mod=mod)  # takes `mod` at call time
    _check(kerns[id(captured)], keep)  # has it bound already
    with pytest.raises(ac.SpecError, match="unexpected keyword tensors"):
        _check(kerns[id(captured)], keep, mod=mod)


def test_captured_zero_d_tensors_are_constants_of_the_spec() -> None:
    make = lambda w: ac.AttentionSpec(num_heads=2, head_dim=D, mask=lambda b, h, q, kv: (q - kv < w) & (q >= kv))
    k8, k3 = ac.compile(make(torch.tensor(8)), target="cpu"), ac.compile(make(torch.tensor(3)), target="cpu")
    assert k8 is not k3 and "8" in str(k8.spec.mask) and "3" in str(k3.spec.mask)
    for kern, w in ((k8, 8), (k3, 3)):
        _check(kern, oracle.dense(oracle.sliding_window(w - 1), 1, 2, S, S))


# ---- property: random pairs of specs that differ only in captured values, names or constants ----

_KINDS = ["captured_doc", "captured_window", "declared_name", "constant"]


def _variant(kind: str, x: int):  # type: ignore[no-untyped-def]
    """(spec, call tensors, keep) of a variant numbered x of one kind."""
    g = torch.Generator().manual_seed(x)
    if kind == "captured_doc":
        doc = torch.sort(torch.randint(0, 1 + x % 4, (S,), generator=g)).values
        spec = ac.AttentionSpec(num_heads=2, head_dim=D, mask=_doc_mask(doc))
        return spec, {}, _doc_keep(doc)
    if kind == "captured_window":
        w = torch.tensor(1 + x % 17)
        spec = ac.AttentionSpec(num_heads=2, head_dim=D, mask=lambda b, h, q, kv: (q - kv < w) & (q >= kv))
        return spec, {}, oracle.dense(oracle.sliding_window(int(w) - 1), 1, 2, S, S)
    if kind == "declared_name":
        name = f"ids{x % 3}"
        doc = torch.sort(torch.randint(0, 3, (S,), generator=g)).values
        spec = ac.AttentionSpec(num_heads=2, head_dim=D, mask=ac.document(ac.tensor(name)))
        return spec, {name: doc}, _doc_keep(doc)
    spec = ac.AttentionSpec(num_heads=2, head_dim=D, mask=ac.causal() & ac.sliding_window(1 + x % 23))
    return spec, {}, oracle.dense(oracle.sliding_window(1 + x % 23), 1, 2, S, S)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(_KINDS), a=st.integers(0, 50), c=st.integers(0, 50))
def test_pairs_of_specs_each_match_their_own_oracle(kind: str, a: int, c: int) -> None:
    (spec_a, ta, keep_a), (spec_c, tc, keep_c) = _variant(kind, a), _variant(kind, c)
    kern_a, kern_c = ac.compile(spec_a, target="cpu"), ac.compile(spec_c, target="cpu")
    _check(kern_c, keep_c, seed=c, **tc)  # the later kernel first: a stale binding shows at once
    _check(kern_a, keep_a, seed=a, **ta)
