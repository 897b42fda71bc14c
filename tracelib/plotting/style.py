"""The house style every figure shares: the blue/red sign convention, captions, layout and heatmaps."""

from __future__ import annotations

import plotly.graph_objects as go
from torch import Tensor

from tracelib.formats import unit_label

# What `tracelib.plotting` re-exports (the underscored helpers too: the other views and tests use them).
__all__ = [
    "BLUE",
    "DIVERGING",
    "LENS_COLORS",
    "METRIC_TITLES",
    "PALE_RED",
    "RED",
    "SIGN_CAPTION",
    "_diverging_heatmap",
    "_layout",
    "_rdbu_heatmap",
    "_signed_title",
    "_without_caption",
    "component_label",
    "log_ticks",
]

DIVERGING = "RdBu"


# RdBu runs red (low) to blue (high): with its midpoint at 0, a positive attribution (toward the
# answer) is blue and a negative one red. Every figure and every caption uses that one convention.
SIGN_CAPTION = "Blue pushes toward the answer, red against it."


BLUE, RED, PALE_RED = "rgb(33,102,172)", "rgb(178,24,43)", "rgb(244,165,130)"  # RdBu's own shades


# Lines that carry no sign stay off the blue/red pair, so they are not read as "toward" or "against".
LENS_COLORS = {"standard": "rgb(40,40,40)", "dla": "rgb(120,120,120)"}


# Labels come from formats: one style for figures, tables, summaries, the report and the explorer.
component_label = unit_label


def _signed_title(title):
    """The title with the colour sentence under it, so a figure read alone still says what colour means.

    A subtitle already there (`<sub>`) takes the sentence at its end: a line of its own, under a
    `<sub>` line, would overprint it (`<sup>`) or drop into the plot (`<sub>`).
    """
    if isinstance(title, str) and title and SIGN_CAPTION not in title:
        if title.endswith("</sub>"):
            return f"{title[: -len('</sub>')]}. {SIGN_CAPTION}</sub>"
        return f"{title}<br><sup>{SIGN_CAPTION}</sup>"
    return title


def _without_caption(fig: go.Figure, caption: str) -> go.Figure:
    """The figure with `caption` taken out of its title: the report says it once per section, under the figures."""
    title = fig.layout.title.text
    if title and caption in title:
        for written in (f"<br><sup>{caption}</sup>", f". {caption}", caption):
            title = title.replace(written, "")
        fig.update_layout(title_text=title)
    return fig


def _layout(fig: go.Figure, defaults: dict, layout: dict, signed: bool = False) -> go.Figure:
    """Apply tracelib's defaults, then whatever the caller passed (which wins, title included)."""
    fig.update_layout(template="plotly_white", margin=dict(l=70, r=20, t=70, b=70))
    merged = {**defaults, **layout}
    if signed and "title" in merged:
        merged["title"] = _signed_title(merged["title"])
    fig.update_layout(**merged)
    return fig


def _rdbu_heatmap(values: Tensor, x: list[str], y: list[str], limit: float | None = None, **kw) -> go.Heatmap:
    """One heatmap trace on RdBu, symmetric about 0 (blue positive): every signed heatmap uses it."""
    limit = limit if limit is not None else (values.abs().max().item() or 1.0)
    return go.Heatmap(z=values.tolist(), x=x, y=y, colorscale=DIVERGING, zmid=0, zmin=-limit, zmax=limit, **kw)


def _diverging_heatmap(values: Tensor, x: list[str], y: list[str], hover: str) -> go.Figure:
    """A heatmap on RdBu, symmetric about 0, first row at the top, categorical (string) ticks."""
    fig = go.Figure(
        _rdbu_heatmap(
            values,
            x,
            y,
            colorbar=dict(title=dict(text="DLA<br>blue: toward<br>red: against", side="top")),
            hovertemplate=hover + ": %{z:+.3f}<extra></extra>",
        )
    )
    fig.update_xaxes(type="category")
    fig.update_yaxes(type="category", autorange="reversed")
    return fig


METRIC_TITLES = {
    "logit": "Answer logit",
    "logit_diff": "Logit difference",
    "prob": "Probability",
    "rank": "Rank + 1 (1 = top prediction)",
}


def log_ticks(top: float) -> tuple[list[int], list[str]]:
    """Powers of ten from 1 up to (and just past) `top`, for a readable log axis: 1, 10, 100, 1,000..."""
    vals = [1]
    while vals[-1] < top:
        vals.append(vals[-1] * 10)
    return vals, [f"{v:,}" for v in vals]
