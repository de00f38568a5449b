"""Symbolic tensors: what an FX value holds, as a sympy expression of its own indices.

A :class:`SymTensor` of shape (n0, n1, ...) stands for the tensor whose element (i0, i1, ...) is
``expr`` with dim symbols d0, d1, ... replaced by the indices. ``arange(n)`` is ``d0``; broadcasting,
``unsqueeze``, ``None``-indexing, ``expand`` and elementwise ops rename and combine dims. Indexing a
real tensor (an FX placeholder, e.g. a padding mask) with symbolic indices becomes a runtime-tensor
access ``name[...]``. A size-1 dim never appears in ``expr``.

>>> a = arange(4)
>>> exprs, shape = broadcast(a.unsqueeze(1), a.unsqueeze(0))
>>> sympy.Ge(*exprs), shape
(d0 >= d1, (4, 4))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import sympy

from attncc.errors import UnsupportedError

DIMS = [sympy.Symbol(f"d{i}", integer=True, nonnegative=True) for i in range(8)]
Shape = tuple[int, ...]


@dataclass(frozen=True)
class SymTensor:
    expr: sympy.Basic
    shape: Shape

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def _renamed(self, mapping: dict[int, int]) -> sympy.Basic:
        """expr with dim i renamed to dim mapping[i] (simultaneously)."""
        return self.expr.xreplace({DIMS[i]: DIMS[j] for i, j in mapping.items()})

    def unsqueeze(self, dim: int) -> SymTensor:
        dim = dim if dim >= 0 else dim + self.ndim + 1
        mapping = {i: (i if i < dim else i + 1) for i in range(self.ndim)}
        return SymTensor(self._renamed(mapping), (*self.shape[:dim], 1, *self.shape[dim:]))

    def aligned(self, ndim: int) -> SymTensor:
        """Prepend size-1 dims (numpy broadcasting) up to ``ndim`` dims."""
        pad = ndim - self.ndim
        if pad <= 0:
            return self
        return SymTensor(self._renamed({i: i + pad for i in range(self.ndim)}), (1,) * pad + self.shape)

    def expand(self, shape: Sequence[int]) -> SymTensor:
        out = self.aligned(len(shape))
        new = tuple(o if s == -1 else s for s, o in zip(shape, out.shape, strict=True))
        for old, size in zip(out.shape, new, strict=True):
            if old != 1 and old != size:
                raise UnsupportedError(f"cannot expand shape {out.shape} to {tuple(shape)}")
        return SymTensor(out.expr, new)


def arange(n: int, start: int = 0, step: int = 1) -> SymTensor:
    """``arange`` of n elements (n = -1: a symbolic length, known to be used as an index dim)."""
    return SymTensor(start + step * DIMS[0] if n != 1 else sympy.Integer(start), (n,))


def constant(value: sympy.Basic) -> SymTensor:
    return SymTensor(value, ())


def broadcast(*items: SymTensor) -> tuple[list[sympy.Basic], Shape]:
    """The operands' expressions over a common broadcast shape."""
    ndim = max(t.ndim for t in items)
    aligned = [t.aligned(ndim) for t in items]
    shape = []
    for sizes in zip(*(t.shape for t in aligned), strict=True):
        big = {s for s in sizes if s != 1}
        if len(big) > 1 and -1 in big:
            big.discard(-1)  # a symbolic size broadcast against its concrete twin
        if len(big) > 1:
            raise UnsupportedError(f"shapes {[t.shape for t in items]} do not broadcast")
        shape.append(big.pop() if big else 1)
    return [t.expr for t in aligned], tuple(shape)
