"""How tracelib names what it measures: metrics, the meaning of "readable", and their wording.

One place for the words every figure, table, summary, report and the explorer use, so a learner
reads the same thing everywhere.
"""

from __future__ import annotations

import operator


class TracelibWarning(UserWarning):
    """Base of every warning tracelib raises, so they can be filtered (or made errors) together."""


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


# One label style and one number format, for figures, tables, summaries, the report and the explorer.
# TransformerLens's own names ("3_attn_out", "2_mid") stay the keys that results are indexed by;
# what a reader sees is written with `unit_label`.
_PARTS = {"attn_out": "attn", "mlp_out": "MLP", "pre": "pre", "mid": "mid"}


def unit_label(label: str) -> str:
    """A component, layer or lens entry as a reader sees it: `3_attn_out` -> `L3 attn`, `2_mid` -> `L2 mid`,
    `3` -> `L3`, `final_post` -> `final`; anything else (`embed`, `L0H2`, `L1N5`) unchanged."""
    layer, _, part = str(label).partition("_")
    if not layer.isdigit():
        return "final" if label == "final_post" else str(label)
    return f"L{layer} {_PARTS.get(part, part)}".rstrip()


def token_labels(str_tokens: list[str]) -> list[str]:
    """Tokens as tick labels and table entries, `repr` and position, so repeats stay apart: `'1'@3`."""
    return [f"{tok!r}@{i}" for i, tok in enumerate(str_tokens)]


def fmt_prob(p: float) -> str:
    """A probability with three decimals: `0.999`."""
    return f"{float(p):.3f}"


def fmt_value(x: float) -> str:
    """A logit, logit difference or attribution: signed, three decimals (`+1.234`); scientific only
    below 1e-3 (`+4.2e-05`), where three decimals would read as zero."""
    x = float(x)
    if x != 0 and abs(x) < 1e-3:
        return f"{x:+.1e}"
    return f"{x:+.3f}"


def fmt_float(x: float, decimals: int = 3) -> str:
    """pandas' display of table floats: `decimals` decimals, scientific only where they would read as
    zero (never `9.992e-01`)."""
    x = float(x)
    if x != x or x in (float("inf"), float("-inf")):
        return str(x)
    if x != 0 and abs(x) < 10**-decimals:
        return f"{x:.1e}"
    return f"{x:.{decimals}f}"


def check_batch_size(batch_size) -> int | None:
    """The one rule for `batch_size` everywhere: None (automatic, from free memory) or a positive int."""
    if batch_size is None:
        return None
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise TypeError(
            f"batch_size must be a positive integer, or None for automatic, got {batch_size!r} "
            f"({type(batch_size).__name__})."
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, or None for automatic, got {batch_size!r}.")
    return batch_size


def described(value) -> str:
    """How an argument check names a wrong value: `None (NoneType)`, `'0' (str)`, or `a Trace` for an object."""
    if isinstance(value, (str, bytes, int, float, type(None))):
        text = repr(value)
        return f"{text if len(text) <= 60 else text[:57] + '...'} ({type(value).__name__})"
    name = type(value).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def check_row(row, n_rows: int, where: str, whose: str) -> int:
    """`row` as an index into `n_rows` rows: an int (not a bool) in range, else TypeError or ValueError.

    Args:
        row: the argument; n_rows: how many rows there are; where: the function that took it;
        whose: what has the rows, for the message (`"trace a"`, `"the reference trace"`).
    """
    if isinstance(row, bool) or not hasattr(type(row), "__index__"):
        raise TypeError(f"{where}: row must be an int (which row of the trace), got {described(row)}.")
    row = operator.index(row)
    if not 0 <= row < n_rows:
        raise ValueError(f"row {row} is out of range: {whose} has {n_rows} row(s)")
    return row


def check_k(k) -> int:
    """`k` as an int, or a clear error: a `top(k)` with `k < 1` would quietly return nothing or everything.

    Raises:
        TypeError: `k` is not an integer (a bool or a float, say).
        ValueError: `k` is an integer below 1.
    """
    # operator.index takes Python and NumPy integers but refuses 2.5 and "3"; a bool is an int to it.
    if isinstance(k, bool) or not hasattr(type(k), "__index__"):
        raise TypeError(f"k must be a positive integer, got {k!r}")
    value = operator.index(k)
    if value < 1:
        raise ValueError(f"k must be a positive integer, got {value}")
    return value


LENS_NAMES = {"standard": "standard logit lens (re-normalised)", "dla": "cached-scale DLA lens"}


# A feature's ratio is corrupted / reference, signed, so a sign flip gives a negative ratio.
# Survives: within a quarter of its reference size (0.75 <= ratio <= 1.25). On the bundled model,
# junk between the operands moves the features that carry the answer (L1 MLP, L3 MLP, L0H0, L0H2) by
# under 5%, so a quarter leaves room for that ordinary wobble without calling a real change "survived".
# Unreadable: below a quarter (ratio < 0.25, sign flips included). Three quarters of the signed size
# are gone, so the feature is no longer a clear part of the explanation (for a component at the 5%
# share, what is left is near 1% of the largest one), and a flipped feature now argues the other way:
# either way the reference's reading of it no longer holds. Damaged: in between, and above 1.25.
SURVIVES_WITHIN = 0.25


UNREADABLE_BELOW = 0.25


LENSES = ("standard", "dla")


def rows_repr(head: str, labels: list[str], line, shown: int = 5) -> str:
    """A result's repr: `head`, then one line per row for the first `shown` rows (`line(r)`
    writes what follows the row's label), then how many rows were left out."""
    lines = [head] + [f"  {label}: {line(r)}" for r, label in enumerate(labels[:shown])]
    if len(labels) > shown:
        lines.append(f"  ... {len(labels) - shown} more")
    return "\n".join(lines)


def shown_entry(entry: str | None) -> str:
    """A lens entry as written in summaries ("L3 attn"), or "never" where there is none."""
    return "never" if entry is None else unit_label(entry)
