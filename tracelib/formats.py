"""How tracelib names what it measures: metrics, the meaning of "readable", and their wording.

One place for the words every figure, table, summary, report and the explorer use, so a learner
reads the same thing everywhere.
"""

from __future__ import annotations

METRICS = ("logit_diff", "logit")
DEFAULT_METRIC = "logit_diff"

# "Readable": the answer is readable at a lens entry when the lens gives it more than half of the
# probability there (so it is the top prediction, more likely than all other tokens together) and
# keeps that to the last entry. A guess among ten digits (p about 0.1 to 0.3 each) never counts.
READABLE_PROB = 0.5
READABLE_RULE = (
    "readable: the lens gives the answer more than half of the probability (p > 0.5), from there to the last layer"
)


def check_metric(metric) -> str:
    """`metric` if it is one tracelib attributes, else a ValueError naming the choices."""
    if metric not in METRICS:
        raise ValueError(
            f"metric must be 'logit_diff' (the answer against its distractors, the default) or 'logit' (the raw "
            f"answer logit), got {metric!r}"
        )
    return metric


def metric_phrase(metric: str, answer: str | None = None, distractors: list[str] | None = None) -> str:
    """What a metric measures, in words: `"logit difference '2' - mean('1', '3')"`, or the raw logit's caveat."""
    check_metric(metric)
    answer_text = "" if answer is None else f" of {answer!r}"
    if metric == "logit":
        return f"raw logit{answer_text} (includes what lifts every candidate alike)"
    if answer is None:
        return "logit difference against the distractors"
    rivals = ", ".join(repr(d) for d in distractors or [])
    return f"logit difference {answer!r} - mean({rivals})"
