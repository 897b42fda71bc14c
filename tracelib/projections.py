"""Projections onto the answer direction that every step shares: directions, scales, weights and biases."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor


def answer_directions(
    model, targets: list[int], distractors: list[list[int]], metric: str
) -> Float[Tensor, "row d_model"]:
    """Per-row residual direction of the metric: `W_U[:, answer]`, minus the mean distractor column."""
    W_U = model.W_U
    dirs = W_U[:, targets].T
    if metric == "logit_diff":
        dirs = dirs - torch.stack([W_U[:, d].mean(-1) for d in distractors])
    return dirs


def compute_dtype(tensor: Tensor) -> torch.dtype:
    """Attribute in fp32 (fp64 kept): half-precision sums would drift more than the signal."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def scaled_directions(
    model, scale: Float[Tensor, "*row 1"], targets: list[int], distractors: list[list[int]], metric: str
) -> Float[Tensor, "*row d_model"]:
    """The metric's direction as the un-normalised residual sees it: centred if the final norm
    centres, divided by the final norm's cached scale. `residual . u` is then the DLA."""
    directions = answer_directions(model, targets, distractors, metric).to(scale.dtype)
    if model.cfg.normalization_type in ("LN", "LNPre"):
        # LayerNorm centres the residual first; (x - mean x) . d == x . (d - mean d).
        directions = directions - directions.mean(-1, keepdim=True)
    if scale.ndim == 3:  # [row, pos, 1]: one scale per position
        return directions[:, None] / scale
    return directions / scale


def layer_weight(model, path: str, layer: int) -> Tensor | None:
    """One block's parameter (`"attn.W_O"`, `"mlp.W_out"`, `"attn.b_O"`, ...), or None if absent.

    The bridge's `model.W_O` / `model.W_out` stack every layer on each access: indexing them in a
    loop over layers copies all layers' weights once per layer (96 s per trace on a
    Qwen2.5-1.5B-shaped model), so read the block's own parameter instead.
    """
    obj = model.blocks[layer]
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    if path == "attn.W_O" and obj.ndim == 2:  # [n_heads * d_head, d_model] -> [n_heads, d_head, d_model]
        obj = obj.reshape(model.cfg.n_heads, model.cfg.d_head, model.cfg.d_model)
    return obj


def _bias(model, name: str, layer: int, u: Tensor, dtype) -> Tensor:
    """A layer's output bias (`b_O` or `b_out`) projected on u, `[row]`; zero where there is none."""
    bias = layer_weight(model, "attn.b_O" if name == "b_O" else "mlp.b_out", layer)
    if bias is None:
        return torch.zeros(u.shape[0], dtype=dtype, device=u.device)
    return u @ bias.to(dtype)
