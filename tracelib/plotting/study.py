"""A study's figure: how often each reference feature survives each injection."""

from __future__ import annotations

import math

import plotly.graph_objects as go

from tracelib.plotting.ood import STATUS_STYLE
from tracelib.plotting.style import _layout, component_label

# Survival is a share, not a sign: a sequential scale from white (never survives) to the
# damage report's own "survives" green, so the colour means what it means in the damage figures.
SURVIVAL_SCALE = [[0.0, "rgb(255,255,255)"], [1.0, STATUS_STYLE["survives"]["color"]]]
SURVIVAL_CAPTION = (
    "Share of rows in which the feature survives (DLA within 25% of its reference); "
    "in brackets the 95% Wilson interval, n the rows where it is a feature."
)


def survival_heatmap(table, features: list[str], injections: list[str], **layout) -> go.Figure:
    """Features down, injections across; each cell the survival rate, its interval and its n."""
    cell = {(r.feature, r.injection): r for r in table.itertuples()}
    z, text = [], []
    for feature in features:
        z.append([cell[(feature, i)].rate if (feature, i) in cell else math.nan for i in injections])
        text.append(
            [
                f"{c.rate:.0%} [{c.low:.0%}, {c.high:.0%}]<br>n={c.n}" if (c := cell.get((feature, i))) else ""
                for i in injections
            ]
        )
    labels = [component_label(f) for f in features]
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=injections,
            y=labels,
            text=text,
            texttemplate="%{text}",
            zmin=0,
            zmax=1,
            colorscale=SURVIVAL_SCALE,
            colorbar=dict(title="survives", tickformat=".0%"),
            hovertemplate="%{y} under %{x}: %{text}<extra></extra>",
            xgap=1,
            ygap=1,
        )
    )
    fig.update_yaxes(autorange="reversed")
    defaults = dict(
        title=f"Which reference features survive which injections<br><sup>{SURVIVAL_CAPTION}</sup>",
        xaxis_title="injection (kind:where:n)",
        yaxis_title="reference feature",
        height=max(320, 90 + 34 * len(features)),
    )
    return _layout(fig, defaults, layout)
