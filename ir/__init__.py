"""attncc's IR: frozen typed ops over sympy index expressions (installed as ``attncc.ir``).

See :mod:`ir.text` for the grammar on one page, :mod:`ir.ops` for the ops.
"""

from attncc.ir.core import Graph, Op, Shape, Value
from attncc.ir.text import parse_ir, print_ir, print_op

__all__ = ["Graph", "Op", "Shape", "Value", "parse_ir", "print_ir", "print_op"]
