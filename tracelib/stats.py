"""Statistics that compare two rankings of units: Spearman correlation and top-k overlap."""

from __future__ import annotations

import math

import torch
from jaxtyping import Float
from torch import Tensor


def spearman(x: Float[Tensor, " unit"], y: Float[Tensor, " unit"]) -> float:
    """Spearman's rank correlation: Pearson's on the ranks, ties given their average rank.

    NaN when either side is constant (its ranks have no spread).
    """
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"spearman needs two 1-d tensors of one length, got {tuple(x.shape)} and {tuple(y.shape)}")
    rx, ry = _average_ranks(x), _average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = (rx.square().sum() * ry.square().sum()).sqrt().item()
    return (rx @ ry).item() / denom if denom > 0 else math.nan


def _average_ranks(x: Tensor) -> Tensor:
    # torch.unique sorts, so a value's group ends at the cumulative count: its average rank is the
    # middle of that group (1-based), which is what scipy's rankdata and pandas give for ties.
    _, inverse, counts = torch.unique(x.double(), return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    return (ends - (counts.double() - 1) / 2)[inverse]


def top_set(values: Float[Tensor, " unit"], k: int, sign: int) -> set[int]:
    """The indices of the (at most) k units that push hardest in `sign`'s direction (+1 or -1).

    Only units of that sign count: a unit that pushes against the answer is never among the top
    positive contributors, even when fewer than k push toward it.
    """
    signed = values * sign
    picked = signed.topk(min(k, signed.numel())).indices
    return {int(i) for i in picked if signed[i] > 0}


def jaccard(a: set, b: set) -> float:
    """|a & b| / |a | b|; two empty sets are identical, so 1.0."""
    union = a | b
    return len(a & b) / len(union) if union else 1.0
