"""Specs to inspect with the CLI, e.g. ``attncc show examples/specs.py:natten --q-len 4096``."""

import torch

import attncc as ac

causal = ac.AttentionSpec(name="causal", num_heads=8, head_dim=64, mask=ac.causal())
gemma = ac.AttentionSpec(
    name="gemma", num_heads=8, head_dim=64, mask=ac.sliding_window(511) | ac.sinks(4), score_mod=ac.softcap(30.0)
)
natten = ac.AttentionSpec(name="natten", num_heads=4, head_dim=64, mask=ac.neighborhood((64, 64), (15, 15)))
moa = ac.AttentionSpec(
    name="moa",
    num_heads=4,
    head_dim=64,
    mask=ac.sliding_window(ac.per_head([128, 512, 1024, 2048], name="span")) | ac.sinks(64),
)
packed = ac.AttentionSpec(name="packed", num_heads=8, head_dim=64, mask=ac.causal() & ac.document(ac.tensor("doc")))
packed_tensors = {
    "doc": torch.repeat_interleave(torch.arange(8), torch.tensor([700, 300, 500, 900, 200, 600, 400, 496]))
}
