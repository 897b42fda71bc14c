"""The final logit margin: how strongly, and against what, the model prefers the answer."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from tracelib import plotting
from tracelib.formats import check_k, rows_repr


@dataclass(frozen=True)
class Margin:
    """The answer's standing in the model's final prediction, one row per traced prediction.

    Attributes:
        row_labels: one label per row (prompt, answer token, step).
        answers: the answer token of each row, as a string.
        logit, prob: the answer's logit and probability, `[row]`.
        rank: the answer's zero-based rank among all tokens (0 = top prediction), `[row]`.
        top_ids, top_strs, top_logits, top_probs: the model's k most likely tokens, `[row, k]`.
        distractor_ids, distractor_strs, distractor_logits, distractor_probs, distractor_ranks: the
            rivals of each row and where they stand.
        logit_diff: answer logit minus the mean distractor logit, `[row]`.
    """

    row_labels: list[str]
    answers: list[str]
    logit: Float[Tensor, " row"]
    prob: Float[Tensor, " row"]
    rank: Int[Tensor, " row"]
    top_ids: Int[Tensor, "row k"]
    top_strs: list[list[str]]
    top_logits: Float[Tensor, "row k"]
    top_probs: Float[Tensor, "row k"]
    distractor_ids: list[list[int]]
    distractor_strs: list[list[str]]
    distractor_logits: list[Float[Tensor, " n"]]
    distractor_probs: list[Float[Tensor, " n"]]
    distractor_ranks: list[Int[Tensor, " n"]]
    logit_diff: Float[Tensor, " row"]

    def __post_init__(self) -> None:
        n = len(self.row_labels)
        for name in ("logit", "prob", "rank", "logit_diff"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"Margin.{name} must have shape ({n},), got {tuple(getattr(self, name).shape)}")
        if self.top_logits.shape[0] != n or len(self.top_strs) != n or len(self.distractor_strs) != n:
            raise ValueError(f"Margin fields must all have {n} rows")

    def to_frame(self) -> pd.DataFrame:
        """Long form: one line per (row, token) for the answer, the top-k and the distractors.

        Tokens are written with `repr`, so `" 1"` (`' 1'`) and `"1"` (`'1'`) differ on screen.
        """
        records = []
        for i, label in enumerate(self.row_labels):
            records.append(
                dict(
                    row=i,
                    label=label,
                    role="answer",
                    token=repr(self.answers[i]),
                    logit=self.logit[i].item(),
                    prob=self.prob[i].item(),
                    rank=int(self.rank[i]),
                )
            )
            for j, tok in enumerate(self.top_strs[i]):
                records.append(
                    dict(
                        row=i,
                        label=label,
                        role=f"top{j + 1}",
                        token=repr(tok),
                        logit=self.top_logits[i, j].item(),
                        prob=self.top_probs[i, j].item(),
                        rank=j,
                    )
                )
            for j, tok in enumerate(self.distractor_strs[i]):
                records.append(
                    dict(
                        row=i,
                        label=label,
                        role="distractor",
                        token=repr(tok),
                        logit=self.distractor_logits[i][j].item(),
                        prob=self.distractor_probs[i][j].item(),
                        rank=int(self.distractor_ranks[i][j]),
                    )
                )
        return pd.DataFrame.from_records(records)

    def top(self, k: int = 5, row: int = 0) -> pd.DataFrame:
        """The k most likely tokens of one row (as `repr`), with their logit difference to the answer."""
        k = min(check_k(k), self.top_logits.shape[1])
        return pd.DataFrame(
            {
                "token": [repr(t) for t in self.top_strs[row][:k]],
                "logit": self.top_logits[row, :k].tolist(),
                "prob": self.top_probs[row, :k].tolist(),
                "answer - token": (self.logit[row] - self.top_logits[row, :k]).tolist(),
            }
        )

    def plot(self, row: int = 0, **layout):
        """Bar chart of the top-k logits of one row: the answer blue, its rivals red."""

        return plotting.margin_bars(self, row, **layout)

    def __repr__(self) -> str:
        n = len(self.row_labels)
        return rows_repr(
            f"Margin({n} row{'s' if n != 1 else ''})",
            self.row_labels,
            lambda i: (
                f"logit {self.logit[i].item():+.3f}, p {self.prob[i].item():.3f}, rank {int(self.rank[i])}, "
                f"diff vs {self.distractor_strs[i]} {self.logit_diff[i].item():+.3f}"
            ),
        )


def compute_margin(
    logits: Float[Tensor, "row vocab"],
    targets: list[int],
    distractors: list[list[int]],
    row_labels: list[str],
    decode,
    k: int = 5,
) -> Margin:
    """Build a `Margin` from each row's final logits."""
    k = check_k(k)
    logits = logits.float().cpu()
    probs = logits.softmax(-1)
    idx = torch.arange(len(targets))
    target = torch.tensor(targets)
    answer_logit = logits[idx, target]
    top = logits.topk(min(k, logits.shape[-1]), dim=-1)
    dist_logits = [logits[i, d] for i, d in enumerate(distractors)]
    if len({len(d) for d in distractors}) == 1:  # as many rivals in every row: one comparison for all
        stacked = logits.gather(-1, torch.tensor(distractors, dtype=torch.long).reshape(len(distractors), -1))
        dist_ranks = list((logits[:, None, :] > stacked[:, :, None]).sum(-1).unbind(0))
    else:
        dist_ranks = [(logits[i][None] > logits[i, d][:, None]).sum(-1) for i, d in enumerate(distractors)]
    return Margin(
        row_labels=list(row_labels),
        answers=[decode([t]) for t in targets],
        logit=answer_logit,
        prob=probs[idx, target],
        # Only strictly larger logits outrank the answer, as in TransformerLens's readouts.
        rank=(logits > answer_logit[:, None]).sum(-1),
        top_ids=top.indices,
        top_strs=[[decode([t]) for t in row] for row in top.indices.tolist()],
        top_logits=top.values,
        top_probs=probs.gather(-1, top.indices),
        distractor_ids=[list(d) for d in distractors],
        distractor_strs=[[decode([t]) for t in d] for d in distractors],
        distractor_logits=dist_logits,
        distractor_probs=[probs[i, d] for i, d in enumerate(distractors)],
        distractor_ranks=dist_ranks,
        logit_diff=answer_logit - torch.stack([d.mean() for d in dist_logits]),
    )
