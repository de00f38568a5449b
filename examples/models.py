"""Models for ``attncc explain`` (tiny, random weights, nothing downloaded).

attncc explain examples/models.py:llama --inputs llama_inputs
attncc explain examples/models.py:softcapped --inputs qkv
"""

from __future__ import annotations

import torch
import transformers

torch.manual_seed(0)

llama = transformers.LlamaForCausalLM(
    transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        attn_implementation="sdpa",
    )
).eval()
llama_inputs = {"input_ids": torch.randint(0, 96, (1, 256)), "use_cache": False}


class Softcapped(torch.nn.Module):
    """Gemma-2-style attention written out: scale, tanh softcap, causal mask, softmax in float32."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
        s = torch.tanh(s / 50.0) * 50.0
        n = q.shape[2]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        return torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype) @ v


softcapped = Softcapped()
qkv = tuple(torch.randn(1, 4, 512, 32) for _ in range(3))
