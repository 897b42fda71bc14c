"""`PatchingResult`, what exact and attribution patching both return, and the weak-effect rule."""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, field

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from tracelib.formats import TracelibWarning, check_k, described
from tracelib.identity import MadeByModelFields, model_identity
from tracelib.patching.runs import METHODS, WHATS
from tracelib.plotting import patching_figure

# Recovery divides by clean - corrupted. A corruption that moves the clean logit difference by less
# than this fraction of itself makes that divisor small enough for recovery to be noise: `patch()`
# and `attribution_patch()` then warn and flag the result (`weak_effect`). Override per call with
# `min_effect=`; 0 turns the check off.
MIN_EFFECT = 0.1


class SameMetricError(ValueError):
    """The clean and corrupted runs have the same logit difference, so recovery cannot be normalised."""


class WeakCorruptionWarning(TracelibWarning):
    """The corruption barely moves the logit difference, so normalised recovery is noise (see `MIN_EFFECT`)."""


@dataclass(frozen=True)
class PatchingResult(MadeByModelFields):
    """How much of the clean logit difference each patched cell recovers (1 = clean, 0 = corrupted).

    Recovery is `raw_change / delta`: the change each patch makes, over the change the corruption
    made. Where the corruption barely changes the answer (`weak_effect`), that divisor is small and
    recovery is noise amplified, so `values` keeps recovery (its one meaning, whatever the flag) but
    `repr`, `plot()`, `compare_patching`, `readable_vs_causal` and the explorer show `raw_change`
    instead, and say why.

    Attributes:
        values: the recovery per cell, shaped by `dims`: `[layer, position]`, `[layer]`,
            `[layer, head]` or `[layer, head, position]`. NaN where the cell's position has no
            counterpart in the run patched from.
        dims: the axis names of `values` ("layer", "head", "position").
        labels: per axis, its tick labels (`L0`, `H3`, `'1'@5`).
        what: what was patched (a key of `tracelib.patching.WHATS`).
        direction: "denoise" (corrupted run, clean patched in) or "noise" (the reverse).
        clean_metric: the clean run's logit difference (answer - mean distractor).
        corrupted_metric: the corrupted run's.
        answer_str: the answer token; distractor_strs: its rivals.
        str_tokens: the tokens of the run that was patched (positions refer to them).
        alignment: for each of those positions, the position in the other run patched from, or None.
        source_str_tokens: the tokens of that other run, the one patched from (the clean prompt's
            when denoising); None in results built without it.
        method: "exact" (`patch()`: every cell a real patched run) or "attribution" (`attribution_patch()`:
            the first-order estimate of every cell from one backward pass).
        raw_change: per cell, the patched run's logit difference minus the corrupted run's (in both
            directions, so `values * delta == raw_change`; noising's unpatched run scores `delta`).
            Kept whether or not the effect is weak; derived from `values` when not given.
        min_effect: the fraction of |clean_metric| that |delta| had to reach for recovery to count
            (`MIN_EFFECT` by default, 0 = no check).
        model_name, weights_fingerprint: the model that made the result (`identity`); empty where
            unknown, and then never checked.
    """

    values: Float[Tensor, "*shape"]
    dims: tuple[str, ...]
    labels: tuple[list[str], ...]
    what: str
    direction: str
    clean_metric: float
    corrupted_metric: float
    answer_str: str
    distractor_strs: list[str]
    str_tokens: list[str]
    alignment: list = field(default_factory=list)
    method: str = "exact"
    raw_change: Float[Tensor, "*shape"] | None = None
    min_effect: float = MIN_EFFECT
    source_str_tokens: list[str] | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if tuple(self.values.shape) != tuple(len(lab) for lab in self.labels) or len(self.dims) != self.values.ndim:
            raise ValueError(
                f"values have shape {tuple(self.values.shape)}, but dims {self.dims} have "
                f"{[len(lab) for lab in self.labels]} labels"
            )
        object.__setattr__(self, "min_effect", check_min_effect(self.min_effect))
        if self.raw_change is None:
            object.__setattr__(self, "raw_change", (self.values.double() * self.delta).float())
        elif tuple(self.raw_change.shape) != tuple(self.values.shape):
            raise ValueError(
                f"raw_change has shape {tuple(self.raw_change.shape)} but values {tuple(self.values.shape)}; "
                "pass both (or raw_change=None to derive it from values)"
            )

    @property
    def delta(self) -> float:
        """clean_metric - corrupted_metric: the change the corruption made, which recovery divides by."""
        return self.clean_metric - self.corrupted_metric

    @property
    def weak_effect(self) -> bool:
        """Whether |delta| is below `min_effect` of |clean_metric|: recovery is then noise, read `raw_change`."""
        return is_weak(self.clean_metric, self.corrupted_metric, self.min_effect)

    @property
    def effect_note(self) -> str:
        """Where the effect is weak, the line that says so (how small delta is, against what); else ''."""
        return weak_note(self.clean_metric, self.corrupted_metric, self.min_effect) if self.weak_effect else ""

    @property
    def no_counterpart(self) -> list[int]:
        """Positions of the patched run with no counterpart in the other run (NaN by position)."""
        return [i for i, j in enumerate(self.alignment) if j is None]

    def to_frame(self) -> pd.DataFrame:
        """Long form: one row per cell, a column per axis plus `value` (recovery) and `raw_change`."""
        grids = torch.meshgrid(*[torch.arange(len(lab)) for lab in self.labels], indexing="ij")
        data = {dim: [self.labels[d][i] for i in grids[d].flatten().tolist()] for d, dim in enumerate(self.dims)}
        data["value"] = self.values.flatten().tolist()
        data["raw_change"] = self.raw_change.flatten().tolist()
        return pd.DataFrame(data)

    def top(self, k: int = 5) -> pd.DataFrame:
        """The k cells with the largest |value| (equally, |raw_change|), signs kept (NaN cells left out)."""
        k = check_k(k)
        frame = self.to_frame().dropna(subset=["value"])
        return frame.reindex(frame["value"].abs().sort_values(ascending=False).index).head(k).reset_index(drop=True)

    def plot(self, **layout):
        """A heatmap (bars for one axis) on RdBu centred at 0: blue recovers the clean answer."""

        return patching_figure(self, **layout)

    def __repr__(self) -> str:
        vals = self.values[~self.values.isnan()]
        best = self.top(1).iloc[0] if len(vals) else None
        where = "" if best is None else " at " + " ".join(str(best[d]) for d in self.dims)
        estimate = "" if self.method == "exact" else ", attribution estimate"
        lines = [
            f"PatchingResult({self.what}, {self.direction}{estimate}, {tuple(self.values.shape)}; "
            f"{self.answer_str!r} vs {self.distractor_strs}: clean {self.clean_metric:+.3f}, "
            f"corrupted {self.corrupted_metric:+.3f})"
        ]
        if best is None:
            lines.append("  no cell could be patched")
        elif self.weak_effect:
            lines += [
                f"  weak effect: {self.effect_note}; recovery is noise here",
                "  raw change (patched - corrupted logit difference): "
                f"max |raw_change| {best['raw_change']:+.3f}{where}",
            ]
        else:
            lines.append(f"  recovery 1 = clean, 0 = corrupted; max |value| {best['value']:+.3f}{where}")
        if self.no_counterpart:
            gap = ", ".join(f"{self.str_tokens[i]!r}@{i}" for i in self.no_counterpart)
            lines.append(f"  no counterpart (NaN by position, not patched): {gap}")
        return "\n".join(lines)


def check_what(what) -> str:
    """`what` if it is a key of `WHATS`, else a ValueError naming the choices."""
    if not isinstance(what, str) or what not in WHATS:
        raise ValueError(f"what must be one of {sorted(WHATS)}, got {what!r}")
    return what


def _made_by(model) -> dict[str, str]:
    """The `model_name` and `weights_fingerprint` fields of a result `model` made."""
    identity = model_identity(model)
    return {"model_name": identity.name, "weights_fingerprint": identity.fingerprint}


def check_patching_result(value, where: str, name: str, made_by: str = "tl.patch or tl.attribution_patch") -> None:
    """Refuse anything but a `PatchingResult` with a TypeError that says what to pass."""
    if not isinstance(value, PatchingResult):
        raise TypeError(f"{where}: pass a PatchingResult from {made_by} as {name}, got {described(value)}.")


def _check_span(clean_metric: float, corr_metric: float) -> float:
    span = clean_metric - corr_metric
    if not math.isfinite(span) or abs(span) <= 1e-6 * max(1.0, abs(clean_metric), abs(corr_metric)):
        raise SameMetricError(
            f"The clean and corrupted prompts give the same logit difference ({clean_metric:+.6f} vs "
            f"{corr_metric:+.6f}), so recovery (patched - corrupted) / (clean - corrupted) is undefined. "
            "Pick a corrupted prompt that changes the answer's margin."
        )
    return span


def check_min_effect(min_effect) -> float:
    """`min_effect` as a float, checked: a finite fraction >= 0 (None reads the module's `MIN_EFFECT`)."""
    if min_effect is None:
        min_effect = MIN_EFFECT
    if isinstance(min_effect, bool) or not isinstance(min_effect, numbers.Real):
        raise TypeError(
            f"min_effect must be a number (a fraction of the clean logit difference, e.g. 0.1), got "
            f"{described(min_effect)}"
        )
    value = float(min_effect)
    if not math.isfinite(value) or value < 0:
        raise ValueError(
            f"min_effect must be a finite fraction >= 0 of the clean logit difference (0 turns the check off), "
            f"got {min_effect!r}"
        )
    return value


def is_weak(clean_metric: float, corr_metric: float, min_effect: float) -> bool:
    """Whether the corruption moves the clean logit difference by less than `min_effect` of itself."""
    return abs(clean_metric - corr_metric) < min_effect * abs(clean_metric)


def weak_note(clean_metric: float, corr_metric: float, min_effect: float) -> str:
    """The one line every consumer shows for a weak effect: how small the change is, against what."""
    delta = clean_metric - corr_metric
    share = abs(delta) / abs(clean_metric) if clean_metric else math.inf
    return (
        f"this corruption barely changes the answer (Δ = {delta:+.3f}, {share:.1%} of the clean logit difference "
        f"{clean_metric:+.3f}, below min_effect {min_effect:.1%})"
    )


def _warn_if_weak(clean_metric: float, corr_metric: float, min_effect: float, answer_str: str) -> None:
    if not is_weak(clean_metric, corr_metric, min_effect):
        return
    warnings.warn(
        f"For {answer_str!r}, {weak_note(clean_metric, corr_metric, min_effect)}: the corrupted run scores "
        f"{corr_metric:+.3f}. Recovery divides by Δ, so here it is noise; the result is flagged "
        "(weak_effect) and keeps raw_change (patched - corrupted logit difference), which its plot shows instead. "
        'Use a stronger corruption: change an operand ("what is 1 + 1" -> "what is 3 + 1") or inject more '
        "tokens (tl.inject(..., n=3)). min_effect=0 turns this check off.",
        WeakCorruptionWarning,
        stacklevel=3,
    )
