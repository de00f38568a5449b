"""attncc: a compiler for attention.

Declare what attention computes; attncc lowers it to IR, optimizes it and generates kernels.

>>> import torch, attncc as ac
>>> spec = ac.AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=16,
...                         mask=ac.causal() & ac.sliding_window(8), score_mod=ac.softcap(30.0))
>>> kern = ac.compile(spec, target="reference")
>>> q, k, v = torch.randn(1, 4, 32, 16), torch.randn(1, 2, 32, 16), torch.randn(1, 2, 32, 16)
>>> kern(q, k, v).shape
torch.Size([1, 4, 32, 16])
"""

from attncc import errors
from attncc.api import Kernel, compile
from attncc.codegen.cpu import release_workspace, workspace_bytes
from attncc.dsl import (
    Expr,
    TensorRef,
    b,
    clamp,
    exp,
    h,
    kv,
    log,
    maximum,
    minimum,
    per_head,
    q,
    score,
    sqrt,
    tanh,
    tensor,
    where,
)
from attncc.errors import AttnccError, LoweringError, SpecError, UnsupportedError, VerifyError
from attncc.linear import LinearAttentionSpec, linear_attention
from attncc.linear import x as x
from attncc.masks import (
    block_indices,
    block_layout,
    block_local,
    causal,
    dilated_window,
    document,
    grid_attention,
    prefix_lm,
    sinks,
    sliding_window,
)
from attncc.mods import alibi, chain, relative_bias, softcap
from attncc.neighborhood import neighborhood
from attncc.routing import route_blocks
from attncc.sharding import ShardPlan, shard_heads
from attncc.spec import AttentionSpec, TensorDecl

__version__ = "0.1.0"

__all__ = [
    "AttentionSpec",
    "AttnccError",
    "Expr",
    "Kernel",
    "LinearAttentionSpec",
    "LoweringError",
    "ShardPlan",
    "SpecError",
    "TensorDecl",
    "TensorRef",
    "UnsupportedError",
    "VerifyError",
    "alibi",
    "b",
    "block_indices",
    "block_layout",
    "block_local",
    "causal",
    "chain",
    "clamp",
    "compile",
    "dilated_window",
    "document",
    "errors",
    "exp",
    "grid_attention",
    "h",
    "kv",
    "linear_attention",
    "log",
    "maximum",
    "minimum",
    "neighborhood",
    "per_head",
    "prefix_lm",
    "q",
    "relative_bias",
    "release_workspace",
    "route_blocks",
    "score",
    "shard_heads",
    "sinks",
    "sliding_window",
    "softcap",
    "sqrt",
    "tanh",
    "tensor",
    "where",
    "workspace_bytes",
    "x",
]

from attncc import distributed as distributed
from attncc import dynamo as dynamo  # the torch.compile backend; imported last, it uses the names above


def __getattr__(name: str) -> object:
    """``ac.onnx``: the ONNX front end, imported on first use (it loads the onnx package)."""
    if name == "onnx":
        from attncc.frontends import onnx

        return onnx
    raise AttributeError(f"module 'attncc' has no attribute {name!r}")
