"""Pass pipeline (installed as ``attncc.passes``): base classes, registry and the passes."""

from attncc.passes.base import REGISTRY, Pass, PassRecord, parse_pipeline, run_pipeline
from attncc.passes.block_sparse import BlockSparse
from attncc.passes.canonicalize import Canonicalize
from attncc.passes.fuse import Fuse
from attncc.passes.head_shard import HeadShard

__all__ = [
    "REGISTRY",
    "BlockSparse",
    "Canonicalize",
    "Fuse",
    "HeadShard",
    "Pass",
    "PassRecord",
    "parse_pipeline",
    "run_pipeline",
]
