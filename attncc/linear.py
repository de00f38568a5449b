"""Feature-map (kernelized) linear attention: a spec and its dense reference implementation.

With an elementwise feature map phi and, for the causal form, j <= i:

    o_i = sum_j (phi(q_i) . phi(k_j)) v_j / (sum_j phi(q_i) . phi(k_j) + eps)      (normalize=True)
    o_i = sum_j (phi(q_i) . phi(k_j)) v_j                                           (normalize=False)

Builtin feature maps: "elu1" (elu(x) + 1, Katharopoulos et al.), "relu", "identity"; or any
expression in ``ac.x`` (e.g. ``ac.x * ac.x``) or a callable ``phi(x)`` traced symbolically.

>>> import torch, attncc as ac
>>> spec = ac.linear_attention(num_heads=2, head_dim=16, feature_map="elu1")
>>> out = ac.compile(spec, target="reference")(*(torch.randn(1, 2, 10, 16) for _ in range(3)))
>>> out.shape
torch.Size([1, 2, 10, 16])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sympy

from attncc.dsl import Expr, lift
from attncc.errors import SpecError
from attncc.ir import exprs
from attncc.ir.exprs import expr_str

X = exprs.x
x = Expr(X)
FEATURE_MAPS: dict[str, sympy.Expr] = {
    "elu1": sympy.Piecewise((X + 1, X > 0), (sympy.exp(X), True)),
    "relu": sympy.Max(X, 0),
    "identity": X,
}


@dataclass(frozen=True, kw_only=True)
class LinearAttentionSpec:
    """A linear attention; ``phi`` holds the feature map as a sympy expression in ``x``."""

    num_heads: int
    head_dim: int
    num_kv_heads: int | None = None
    feature_map: Any = "elu1"
    causal: bool = True
    normalize: bool = True
    eps: float = 1e-6
    chunk: int = 32
    name: str = "linear_attention"
    phi: sympy.Expr = field(default=X, init=False)

    def __post_init__(self) -> None:
        for label in ("num_heads", "head_dim", "chunk"):
            value = getattr(self, label)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SpecError(f"{label} must be a positive int, got {value!r}")
        kv = self.num_heads if self.num_kv_heads is None else self.num_kv_heads
        if not isinstance(kv, int) or kv < 1 or self.num_heads % kv:
            raise SpecError(f"num_heads={self.num_heads} is not divisible by num_kv_heads={kv}")
        if self.chunk & (self.chunk - 1) or self.chunk < 16:
            raise SpecError(f"chunk must be a power of two >= 16, got {self.chunk}")
        object.__setattr__(self, "num_kv_heads", kv)
        object.__setattr__(self, "phi", _feature_map(self.feature_map))

    @property
    def groups(self) -> int:
        return self.num_heads // int(self.num_kv_heads or self.num_heads)


def _feature_map(fm: Any) -> sympy.Expr:
    if isinstance(fm, str):
        if fm not in FEATURE_MAPS:
            raise SpecError(f"unknown feature map {fm!r}; builtins: {sorted(FEATURE_MAPS)}, or an expression in ac.x")
        return FEATURE_MAPS[fm]
    if callable(fm) and not isinstance(fm, Expr):
        try:
            fm = fm(x)
        except SpecError:
            raise
        except Exception as exc:
            raise SpecError(f"feature map {fm!r} cannot be traced: {type(exc).__name__}: {exc}") from exc
    expr = lift(fm)
    if expr.is_boolean or expr.sym.free_symbols - {X}:
        raise SpecError(f"feature map `{expr_str(expr.sym)}` must be a number-valued expression of ac.x alone")
    return expr.sym


def linear_attention(**kwargs: Any) -> LinearAttentionSpec:
    """Declare a feature-map linear attention (see the module docstring)."""
    return LinearAttentionSpec(**kwargs)
