"""When does the answer become readable? Two lenses over the residual stream, labelled apart.

- The **standard logit lens** reads each accumulated residual through the *real* final norm, with
  statistics recomputed from that residual (TransformerLens's `logit_lens`, the #1076 fix). It
  asks: "if the model stopped here, what would it predict?"
- The **cached-scale DLA lens** divides each accumulated residual by the *final* position's cached
  norm scale instead (`accumulated_resid` + `logit_attrs`). It is linear, so its steps add up to
  direct logit attribution, and its last entry equals the model's logit exactly.

They agree at the last entry and differ before it whenever the residual's norm grows with depth (it
nearly always does): early residuals are small, so the standard lens scales them up to the final
norm's size while the DLA lens keeps them at their true, small size. The standard lens is the
right tool for "what would be predicted"; the DLA lens for "how much has been written so far".
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from tracelib.margin import check_k

LENS_NAMES = {"standard": "standard logit lens (re-normalised)", "dla": "cached-scale DLA lens"}


@dataclass(frozen=True)
class LensCurve:
    """One lens along depth: `[entry, row]` metrics for every accumulated-residual entry.

    Entry labels follow TransformerLens: `"3_pre"` is the residual entering block 3, `"3_mid"` the
    one after block 3's attention, `"final_post"` the one after the last block.
    """

    kind: str
    labels: list[str]
    logit: Float[Tensor, "entry row"]
    logit_diff: Float[Tensor, "entry row"]
    prob: Float[Tensor, "entry row"]
    rank: Int[Tensor, "entry row"]

    def __post_init__(self) -> None:
        shape = (len(self.labels), self.logit.shape[-1])
        for name in ("logit", "logit_diff", "prob", "rank"):
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(
                    f"LensCurve.{name} must be [entry, row] = {shape}, got {tuple(getattr(self, name).shape)}"
                )
        if self.kind not in LENS_NAMES:
            raise ValueError(f"kind must be one of {list(LENS_NAMES)}, got {self.kind!r}")

    def readable_from(self, row: int = 0) -> str | None:
        """The first entry from which the answer is top-1 and stays top-1 to the end (None if never)."""
        top1 = (self.rank[:, row] == 0).tolist()
        if not top1[-1]:
            return None
        first = len(top1) - 1
        while first > 0 and top1[first - 1]:
            first -= 1
        return self.labels[first]


@dataclass(frozen=True)
class LogitLens:
    """Both lenses on the same rows. Per layer and per sublayer (`*_mid` entries)."""

    row_labels: list[str]
    standard: LensCurve
    dla: LensCurve

    def __post_init__(self) -> None:
        if self.standard.labels != self.dla.labels:
            raise ValueError("both lenses must share their entry labels")
        if self.standard.logit.shape[1] != len(self.row_labels):
            raise ValueError(f"lens curves need {len(self.row_labels)} rows")

    @property
    def labels(self) -> list[str]:
        return self.standard.labels

    def per_layer(self) -> list[int]:
        """Indices of the whole-layer entries (`*_pre` and `final_post`), dropping sublayers."""
        return [i for i, label in enumerate(self.labels) if not label.endswith("_mid")]

    def readable_from(self, row: int = 0, lens: str = "standard") -> str | None:
        """First entry from which the answer is top-1 and stays so, by the chosen lens."""
        return getattr(self, lens).readable_from(row)

    def to_frame(self) -> pd.DataFrame:
        """Long form: one line per (lens, row, entry)."""
        records = []
        for curve in (self.standard, self.dla):
            for r, row_label in enumerate(self.row_labels):
                for e, label in enumerate(curve.labels):
                    records.append(
                        dict(
                            lens=curve.kind,
                            row=r,
                            label=row_label,
                            entry=label,
                            index=e,
                            logit=curve.logit[e, r].item(),
                            logit_diff=curve.logit_diff[e, r].item(),
                            prob=curve.prob[e, r].item(),
                            rank=int(curve.rank[e, r]),
                        )
                    )
        return pd.DataFrame.from_records(records)

    def top(self, k: int = 5, row: int = 0, lens: str = "standard") -> pd.DataFrame:
        """The k sublayers that moved the answer's logit difference most, by absolute size, signs kept."""
        k = check_k(k)
        curve = getattr(self, lens)
        steps = curve.logit_diff[1:, row] - curve.logit_diff[:-1, row]
        order = steps.abs().argsort(descending=True)[:k]
        return pd.DataFrame(
            {
                "from": [curve.labels[i] for i in order.tolist()],
                "to": [curve.labels[i + 1] for i in order.tolist()],
                "change in logit diff": steps[order].tolist(),
            }
        )

    def plot(self, row: int = 0, metric: str = "logit_diff", **layout):
        """Both lenses along depth for one row; `metric` is logit, logit_diff, prob or rank."""
        from tracelib import plotting

        return plotting.lens_lines(self, row, metric, **layout)

    def __repr__(self) -> str:
        lines = [f"LogitLens({len(self.labels)} entries, {len(self.row_labels)} row(s))"]
        for r, label in enumerate(self.row_labels[:5]):
            lines.append(
                f"  {label}: readable from {self.standard.readable_from(r)} (standard), "
                f"{self.dla.readable_from(r)} (dla); final logit diff {self.standard.logit_diff[-1, r].item():+.3f}"
            )
        return "\n".join(lines)


def _readout(
    normalised: Float[Tensor, "entry row d_model"],
    W_U: Float[Tensor, "d_model vocab"],
    b_U: Float[Tensor, " vocab"],
    targets: Tensor,
    distractors: list[list[int]],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Answer logit, logit diff, probability and rank of normalised residuals, one row at a time.

    One row's `[entry, vocab]` logits exist at once: on Qwen2.5-1.5B (57 entries x 151,936 tokens)
    that is 35 MB, not times the batch.
    """
    logit, diff, prob, rank = [], [], [], []
    for r in range(normalised.shape[1]):
        logits = normalised[:, r] @ W_U + b_U
        t = int(targets[r])
        answer = logits[:, t]
        logit.append(answer)
        diff.append(answer - logits[:, distractors[r]].mean(-1))
        prob.append((answer - logits.logsumexp(-1)).exp())
        rank.append((logits > answer[:, None]).sum(-1))
    return tuple(torch.stack(x, dim=1).cpu() for x in (logit, diff, prob, rank))


def compute_lens(model, cache, targets: Tensor, distractors: list[list[int]], row_labels: list[str]) -> LogitLens:
    """Both lenses from a final-position cache (position axis of length 1)."""
    stack, labels = cache.accumulated_resid(
        layer=None, incl_mid=True, apply_ln=False, pos_slice=None, return_labels=True
    )  # [entry, row, 1, d_model]
    dtype = torch.float64 if stack.dtype == torch.float64 else torch.float32
    W_U, b_U = model.W_U.to(dtype), model.b_U.to(dtype)
    curves = {}
    for kind, recompute in (("standard", True), ("dla", False)):
        normalised = cache.apply_ln_to_stack(stack, layer=None, recompute_ln=recompute)[:, :, 0].to(dtype)
        logit, diff, prob, rank = _readout(normalised, W_U, b_U, targets, distractors)
        curves[kind] = LensCurve(kind, list(labels), logit, diff, prob, rank)
    return LogitLens(list(row_labels), curves["standard"], curves["dla"])


def logit_lens(model, prompt, answer, distractors=None) -> LogitLens:
    """Both lenses along depth for a prompt (or a list of prompts): the `.lens` of `tl.trace`."""
    from tracelib.trace import trace

    return trace(model, prompt, answer, distractors=distractors).lens
