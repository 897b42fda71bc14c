"""One-call conveniences: one step of `tl.trace`, for when that step is all you want.

Each runs the whole trace (one forward pass) and returns one of its results, so the numbers are
exactly those of `tl.trace(...)`.
"""

from __future__ import annotations

from tracelib.attribution import Attribution
from tracelib.lens import LogitLens
from tracelib.margin import Margin
from tracelib.trace import trace


def logit_margin(model, prompt, answer, distractors=None, k: int = 5) -> Margin:
    """The answer's logit, probability, rank, top-k rivals and logit difference to distractors.

    Args:
        model: a loaded model (`tl.load_model`).
        prompt: a prompt, or a list of prompts (run as one batch).
        answer: the answer, e.g. `" 2"`, or one per prompt.
        distractors: tokens the answer should beat; default: a digit's neighbours, else the
            model's strongest competitor.
        k: how many top tokens to keep.

    Returns:
        A `Margin` (the `.margin` of `tl.trace`).
    """

    return trace(model, prompt, answer, distractors=distractors, k=k).margin


def logit_lens(model, prompt, answer, distractors=None) -> LogitLens:
    """Both lenses along depth for a prompt (or a list of prompts): the `.lens` of `tl.trace`."""

    return trace(model, prompt, answer, distractors=distractors).lens


def direct_logit_attribution(model, prompt, answer, distractors=None, metric: str = "logit_diff") -> Attribution:
    """DLA of the answer's logit difference (or raw logit) by component, layer, head and neuron.

    The `.dla` of `tl.trace`; see `Attribution` for the units and the reconstruction check.
    """

    return trace(model, prompt, answer, distractors=distractors, metric=metric).dla
