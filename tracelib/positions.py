"""Positions: where along the sequence the answer is written.

Every component writes at every position. Reading each component's output at position `p` through
the answer direction (divided by position `p`'s own final-norm scale) gives a position x component
grid of DLA: at the final position it is exactly `trace().dla` by component. Earlier positions show
whether the answer direction is already present there (copied later by attention) or only appears
at the final position (computed there).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from tracelib import plotting
from tracelib.formats import READABLE_PROB, check_k, token_labels, unit_label
from tracelib.projections import _bias, compute_dtype, layer_weight, scaled_directions

VERDICTS = ("written at the final position", "copied from an operand", "assembled gradually")
# Where the answer is not the model's own top prediction, the verdicts above would explain a
# prediction the model does not make.
NOT_PREDICTED = "not predicted (rank {rank})"
# Elements of the largest intermediate made at once by the per-position analyses.
BLOCK_ELEMENTS = 2**24


@dataclass(frozen=True)
class Positions:
    """DLA toward the answer at every position, and the standard lens per position.

    Attributes:
        row_labels, str_tokens, operand_positions: per row.
        component_labels: `"embed"`, then `"L_attn_out"`, `"L_mlp_out"` (as `trace().dla`).
        values: one `[pos, component]` grid per row (the row's own length).
        lens_labels: accumulated-residual entries, as in `trace().lens`.
        lens_logit_diff: one `[entry, pos]` grid per row: the standard (re-normalised) lens's
            logit difference of the answer against its distractors at every position.
        heads: one `[pos, layer, head]` grid per row: each head's DLA toward the answer when read at
            every position (with that position's own norm scale); with `head_bias` (`[pos, layer]`)
            it sums to the `attn_out` columns of `values`.
        final_rank: one `[pos]` vector per row: the answer's rank in the model's own prediction
            at each position (the standard lens's last entry).
        operand_share, self_share: per row, the share of the final position's head DLA (absolute)
            that heads read from operand positions, and from the final position itself.
        final_prob: one `[pos]` vector per row: the answer's probability in the model's own
            prediction at each position; the answer is *readable* at a position where it is above
            `formats.READABLE_PROB` (0.5), the same rule as the lens's.
        metric_labels: per row, what the DLA measures in words (names the distractors).
    """

    row_labels: list[str]
    str_tokens: list[list[str]]
    operand_positions: list[list[int]]
    component_labels: list[str]
    values: list[Float[Tensor, "pos component"]]
    lens_labels: list[str]
    lens_logit_diff: list[Float[Tensor, "entry pos"]]
    heads: list[Float[Tensor, "pos layer head"]]
    head_bias: list[Float[Tensor, "pos layer"]]
    final_rank: list[Tensor]
    operand_share: list[float]
    self_share: list[float]
    final_prob: list[Tensor] = field(default_factory=list)
    metric_labels: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for r, grid in enumerate(self.values):
            shape = (len(self.str_tokens[r]), len(self.component_labels))
            if tuple(grid.shape) != shape:
                raise ValueError(f"row {r}: values must be [pos, component] = {shape}, got {tuple(grid.shape)}")
            if tuple(self.lens_logit_diff[r].shape) != (len(self.lens_labels), shape[0]):
                raise ValueError(f"row {r}: lens_logit_diff must be [entry, pos]")

    def readable_at(self, row: int = 0) -> list[bool]:
        """Per position: whether the answer is readable there, by the one rule tracelib uses
        (`formats.READABLE_PROB`): the model's own prediction at that position gives it more than
        half of the probability. A guess of "some digit comes next" before an operand does not count.
        """
        if not self.final_prob:
            raise ValueError(
                "This Positions has no final_prob (a reference saved by tracelib before format 3), so "
                "readability per position is unknown; trace the prompt again."
            )
        return (self.final_prob[row] > READABLE_PROB).tolist()

    def first_readable_position(self, row: int = 0) -> int | None:
        """The earliest position at which the answer is readable (p > 0.5); None if none is, or if
        this is a reference saved before readability per position was recorded."""
        if not self.final_prob:
            return None
        return next((p for p, ok in enumerate(self.readable_at(row)) if ok), None)

    def verdict(self, row: int = 0) -> tuple[str, dict[str, float | int | None]]:
        """Written at the final position, copied from an operand, or assembled gradually, with
        the evidence: how much of the final position's DLA heads read from operands, how much the
        final position's own MLPs wrote, and where the answer first becomes readable.

        Where the model does not predict the answer (it is not the top-1 at the final position),
        there is nothing to explain: the verdict is `"not predicted (rank N)"` (`NOT_PREDICTED`),
        with the same evidence keys. `"first readable position"` is an int, or None if never.
        """
        grid = self.values[row]
        final = grid[-1]
        mlp = [i for i, label in enumerate(self.component_labels) if label.endswith("mlp_out")]
        attn = [i for i, label in enumerate(self.component_labels) if label.endswith("attn_out")]
        total = final.abs().sum().item() or 1.0
        mlp_share = final[mlp].abs().sum().item() / total
        attn_share = final[attn].abs().sum().item() / total
        copied_share = attn_share * self.operand_share[row]
        local_share = mlp_share + attn_share * self.self_share[row]
        first = self.first_readable_position(row)
        early = first is not None and first < grid.shape[0] - 1
        evidence = {
            "final MLP share": mlp_share,
            "attention share": attn_share,
            "attention-from-operands share": copied_share,
            "computed-in-place share": local_share,
            "first readable position": first,
        }
        rank = int(self.final_rank[row][-1])
        if rank != 0:
            return NOT_PREDICTED.format(rank=rank), evidence
        # Copied: the answer already exists at an operand and heads carry most of it over.
        if copied_share >= 0.5 and early and first in self.operand_positions[row]:
            return VERDICTS[1], evidence
        # Written in place: most of it is computed at the final position (MLPs, self-attention).
        if local_share >= 0.5:
            return VERDICTS[0], evidence
        return VERDICTS[2], evidence

    def to_frame(self) -> pd.DataFrame:
        """Long form: one line per (row, position, component)."""
        frames = []
        for r, grid in enumerate(self.values):
            labels = token_labels(self.str_tokens[r])
            for p in range(grid.shape[0]):
                frames.append(
                    pd.DataFrame(
                        {
                            "row": r,
                            "position": p,
                            "token": labels[p],
                            "component": [unit_label(label) for label in self.component_labels],
                            "value": grid[p].tolist(),
                        }
                    )
                )
        return pd.concat(frames, ignore_index=True)

    def top(self, k: int = 5, row: int = 0) -> pd.DataFrame:
        """The k largest (position, component) writes by absolute value, signs kept."""
        k = check_k(k)
        frame = self.to_frame()
        frame = frame[frame["row"] == row]
        return frame.reindex(frame["value"].abs().sort_values(ascending=False).index[:k]).reset_index(drop=True)

    def plot(self, row: int = 0, **layout):
        """Position x component heatmap (RdBu, centred at 0), positions ticked with their tokens."""

        return plotting.position_heatmap(self, row, **layout)

    def __repr__(self) -> str:
        verdict, evidence = self.verdict(0)
        return (
            f"Positions({len(self.row_labels)} row(s); {self.row_labels[0]}: {verdict}; "
            f"computed in place {evidence['computed-in-place share']:.2f}, attention-from-operands "
            f"{evidence['attention-from-operands share']:.2f})"
        )


def compute_positions(
    model, fwd, rows, distractors: list[list[int]], heads, metric: str, metric_labels: list[str] | None = None
) -> Positions:
    """The per-position grid and lens from the trace's full-position cache, a block of positions at a time.

    Each block is a small `ActivationCache` (`position_block`), so TransformerLens's own
    `decompose_resid`, `accumulated_resid` and `apply_ln_to_stack` compute every number, and no
    `[entry, row, pos, d_model]` stack of the whole prompt ever exists.
    """

    targets = [row.target for row in rows]
    scale = fwd.full["ln_final.hook_scale"]
    dtype = compute_dtype(scale)
    u = scaled_directions(model, scale.to(dtype), targets, distractors, metric)  # [row, pos, d_model]
    W_U, b_U = model.W_U.to(dtype), model.b_U.to(dtype)
    n_rows, width = fwd.tokens.shape
    entries = 2 * model.cfg.n_layers + 3  # the larger stack: accumulated_resid with the mids, or the decomposition
    block = max(1, BLOCK_ELEMENTS // (entries * n_rows * model.cfg.d_model))
    grids, lens_blocks = [], []
    for start in range(0, width, block):
        stop = min(start + block, width)
        cache = position_block(model, fwd, start, stop)
        stack, labels = cache.decompose_resid(apply_ln=False, pos_slice=None, return_labels=True)
        grids.append(torch.einsum("crpd,rpd->rpc", stack.to(dtype), u[:, start:stop]).cpu())
        del stack
        resid, lens_labels = cache.accumulated_resid(
            layer=None, incl_mid=True, apply_ln=False, pos_slice=None, return_labels=True
        )
        normalised = cache.apply_ln_to_stack(resid, layer=None, recompute_ln=True).to(dtype)  # [entry, row, pos, d]
        del resid
        diffs = []
        for r, (target, rivals) in enumerate(zip(targets, distractors)):
            cols = W_U[:, [target] + rivals]
            logits = normalised[:, r] @ cols + b_U[[target] + rivals]  # [entry, pos, 1 + n]
            diffs.append((logits[..., 0] - logits[..., 1:].mean(-1)).cpu())
        lens_blocks.append(diffs)
        del normalised, cache
    grid = torch.cat(grids, 1)
    lens = [torch.cat([diffs[r] for diffs in lens_blocks], 1) for r in range(n_rows)]

    heads_by_pos, head_bias = _heads_at_every_position(model, fwd, u)

    operand_share, self_share = [], []
    lengths = fwd.lengths.tolist()
    for r, n in enumerate(lengths):
        mag = heads.sources[:, :, :, r].abs()
        total = mag.sum().item() or 1.0
        operand_share.append(mag[:, :, heads.operand_positions[r]].sum().item() / total)
        self_share.append(mag[:, :, n - 1].sum().item() / total)
    final_rank = fwd.answer_rank  # [row, pos], scored in blocks by the trace's forward pass
    return Positions(
        row_labels=[row.label for row in rows],
        str_tokens=[row.str_tokens for row in rows],
        operand_positions=[heads.operand_positions[r] for r in range(len(rows))],
        component_labels=list(labels),
        values=[grid[r, :n] for r, n in enumerate(lengths)],
        lens_labels=list(lens_labels),
        lens_logit_diff=[lens[r][:, :n] for r, n in enumerate(lengths)],
        heads=[heads_by_pos[r, :n] for r, n in enumerate(lengths)],
        head_bias=[head_bias[r, :n] for r, n in enumerate(lengths)],
        final_rank=[final_rank[r, :n] for r, n in enumerate(lengths)],
        operand_share=operand_share,
        self_share=self_share,
        final_prob=[fwd.answer_prob[r, :n] for r, n in enumerate(lengths)],
        metric_labels=list(metric_labels or []),
    )


def position_block(model, fwd, start: int, stop: int):
    """The trace's cache at positions `[start, stop)`, with the residual stream rebuilt from its sums.

    The trace keeps the residual stream at every position only entering layer 0 (and leaving the
    last layer); every other `resid_pre` and `resid_mid` is rebuilt here by the same additions the
    model makes (`resid_mid = resid_pre + attn_out`, `resid_post = resid_mid + mlp_out`), so the
    values are the model's own, bit for bit, and the cache keeps 3 fewer `[pos, d_model]` per layer.
    """
    from transformer_lens import ActivationCache

    full = fwd.full.cache_dict
    store = {
        name: full[name][:, start:stop]
        for name in ("hook_embed", "hook_pos_embed", "ln_final.hook_scale")
        if name in full
    }
    pre = full["blocks.0.hook_resid_pre"][:, start:stop]
    for layer in range(model.cfg.n_layers):
        attn = full[f"blocks.{layer}.hook_attn_out"][:, start:stop]
        mlp = full[f"blocks.{layer}.hook_mlp_out"][:, start:stop]
        mid = pre + attn
        post = mid + mlp
        store.update(
            {
                f"blocks.{layer}.hook_resid_pre": pre,
                f"blocks.{layer}.hook_attn_out": attn,
                f"blocks.{layer}.hook_resid_mid": mid,
                f"blocks.{layer}.hook_mlp_out": mlp,
                f"blocks.{layer}.hook_resid_post": post,
            }
        )
        pre = post
    return ActivationCache(store, model)


def _heads_at_every_position(model, fwd, u: Float[Tensor, "row pos d_model"]):
    """Every head's DLA at every destination position, projected first: `z . (W_O @ u_pos)`.

    `z` is the trace's cached head output at every position. `W_O[h] @ u_pos` is `[head, d_head]`
    per position, so no `[head, pos, d_model]` ever exists, and positions go in blocks of about
    `BLOCK_ELEMENTS` elements, so the intermediates stay bounded however long the prompt.
    """

    cfg = model.cfg
    n_rows, n_pos, _ = u.shape
    block = max(1, BLOCK_ELEMENTS // max(1, n_rows * cfg.n_heads * cfg.d_head))
    heads = torch.empty(n_rows, n_pos, cfg.n_layers, cfg.n_heads, dtype=u.dtype)
    biases = []
    for layer in range(cfg.n_layers):
        W_O = layer_weight(model, "attn.W_O", layer).to(u.dtype)  # [head, d_head, d_model]
        z = fwd.full[f"blocks.{layer}.attn.hook_z"]  # [row, pos, head, d_head]
        for start in range(0, n_pos, block):
            stop = min(start + block, n_pos)
            W_O_u = torch.einsum("hem,rpm->rphe", W_O, u[:, start:stop])
            heads[:, start:stop, layer] = (z[:, start:stop].to(u.dtype) * W_O_u).sum(-1).cpu()  # [row, pos, head]
        biases.append(_bias(model, "b_O", layer, u.reshape(-1, u.shape[-1]), u.dtype).reshape(u.shape[:2]))
    return heads, torch.stack(biases, 2).cpu()
