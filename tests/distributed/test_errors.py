"""What cannot be sharded is refused with a message that says what to do; the rewritten specs are exact."""

from __future__ import annotations

import pytest
import torch

import attncc as ac
from attncc.spec import at_positions, for_heads
from tests.numerics import oracle


def test_without_a_process_group_the_error_says_how_to_start_one() -> None:
    spec = ac.AttentionSpec(num_heads=4, head_dim=8, mask=ac.causal())
    with pytest.raises(ac.SpecError, match="init_process_group"):
        ac.distributed.ShardedAttention(spec, ac.shard_heads(spec, 2, 64))


def test_head_subsets_must_be_whole_groups() -> None:
    spec = ac.AttentionSpec(num_heads=8, num_kv_heads=4, head_dim=8, mask=ac.causal())
    with pytest.raises(ac.SpecError, match="split a kv-head group"):
        for_heads(spec, [0, 2])
    with pytest.raises(ac.SpecError, match="distinct ascending"):
        for_heads(spec, [3, 2])
    with pytest.raises(ac.SpecError, match="cannot be split evenly over 8 ranks"):
        ac.shard_heads(spec, 8, 64)


def test_rope_in_the_kernel_is_refused_for_sequence_splits() -> None:
    spec = ac.AttentionSpec(num_heads=2, head_dim=8, mask=ac.causal(), rope=True)
    layout = ac.distributed.sequence_layout(spec, 2, 64)
    with pytest.raises(ac.SpecError, match="rotate q and k before splitting"):
        ac.distributed.SequenceParallelAttention(spec, layout)


def test_a_mask_that_depends_on_the_batch_needs_the_batch_size() -> None:
    """Per-batch documents: the chunks a rank needs differ per batch entry; without batch= that is refused,
    with it the needs cover every entry."""
    doc_of = ac.tensor("doc")
    spec = ac.AttentionSpec(num_heads=2, head_dim=8, mask=doc_of[ac.b, ac.q] == doc_of[ac.b, ac.kv])
    doc = torch.stack([torch.arange(256) // 128, torch.zeros(256, dtype=torch.long)])  # entry 1: one document
    with pytest.raises(ac.SpecError, match="pass batch=B"):
        ac.distributed.sequence_layout(spec, 2, 256, doc=doc)
    lay = ac.distributed.sequence_layout(spec, 2, 256, batch=2, doc=doc)
    assert lay.batch == 2 and lay.kv_chunks_needed(1) == [0, 1, 2, 3]  # entry 1 sees everything (entry 0: 2, 3)
    # the layout holds for the tensors it was made with: others are told apart
    assert lay.fingerprint == ac.distributed.mask_fingerprint(spec, {"doc": doc.clone()})
    assert lay.fingerprint != ac.distributed.mask_fingerprint(spec, {"doc": doc.flip(0)})


def test_sequences_too_short_for_the_chunks_are_refused() -> None:
    spec = ac.AttentionSpec(num_heads=2, head_dim=8, mask=ac.causal())
    with pytest.raises(ac.SpecError, match="too short for 16 chunks"):
        ac.distributed.sequence_layout(spec, 8, 10)


def test_head_subset_keeps_global_head_indices() -> None:
    """Heads 2 and 5 of an ALiBi + per-head-window spec, run alone, equal those heads of the float64 oracle."""
    windows = [1, 2, 3, 40, 5, 60]
    spec = ac.AttentionSpec(num_heads=6, head_dim=8, mask=ac.sliding_window(ac.per_head(windows, "w")),
                            score_mod=ac.alibi())  # fmt: skip
    q, k, v = torch.randn(1, 6, 70, 8), torch.randn(1, 6, 70, 8), torch.randn(1, 6, 70, 8)
    keep = oracle.dense(oracle.per_head_window(windows), 1, 6, 70, 70)
    want, _ = oracle.attention(q, k, v, keep, spec.scale or 0.0, oracle.alibi_fn(6))
    local = for_heads(spec, [2, 5])
    for target in ("cpu", "reference"):
        got = ac.compile(local, target=target)(q[:, [2, 5]], k[:, [2, 5]], v[:, [2, 5]])
        torch.testing.assert_close(got.double(), want[:, [2, 5]], atol=2e-5, rtol=1e-4)


def test_rows_at_global_positions_equal_the_whole_attention() -> None:
    """Query rows 30..59 against the keys they see, given out of order, with positions tables."""
    spec = ac.AttentionSpec(num_heads=2, head_dim=8, mask=ac.causal() & ac.sliding_window(20))
    q, k, v = torch.randn(1, 2, 80, 8), torch.randn(1, 2, 80, 8), torch.randn(1, 2, 80, 8)
    keep = oracle.dense(lambda b, h, i, j: i - 20 <= j <= i, 1, 2, 80, 80)
    want, _ = oracle.attention(q, k, v, keep, spec.scale or 0.0)
    rows, cols = torch.arange(30, 60), torch.cat([torch.arange(30, 60), torch.arange(10, 30)])
    kern = ac.compile(at_positions(spec, 80, 80), target="cpu")
    got = kern(q[:, :, rows], k[:, :, cols], v[:, :, cols], attncc_q_pos=rows, attncc_kv_pos=cols)
    torch.testing.assert_close(got.double(), want[:, :, rows], atol=2e-5, rtol=1e-4)
