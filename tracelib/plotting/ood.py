"""OOD figures: the damage report's survival curves and the under-trained token detector."""

from __future__ import annotations

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from tracelib.formats import (
    LENS_NAMES,
    LENSES,
    SURVIVES_WITHIN,
    UNREADABLE_BELOW,
    fmt_value,
)
from tracelib.plotting.style import _layout, component_label

# Damage statuses stay off the blue/red pair, which means toward/against the answer everywhere else;
# Okabe-Ito's bluish green and orange plus grey, with a marker shape each, so they read without colour too.
STATUS_STYLE = {
    "survives": dict(color="rgb(0,158,115)", symbol="circle"),
    "damaged": dict(color="rgb(230,159,0)", symbol="diamond"),
    "unreadable": dict(color="rgb(90,90,90)", symbol="x"),
}


REFERENCE_COLOR, CORRUPTED_COLOR = "rgb(40,40,40)", "rgb(118,42,131)"


# Ratios far outside the bands would squash them: markers are drawn at the edge, the value written.
RATIO_RANGE = (-1.0, 2.0)


def damage_figure(report, **layout) -> go.Figure:
    """A `DamageReport` in two panels: the readability curves, and every feature's ratio by status.

    Left: the logit difference along depth, reference (dark) and corrupted (purple), standard lens
    solid and cached-scale DLA lens dotted. Right: each feature's DLA ratio corrupted / reference,
    one row per feature (labelled on the y axis with its reference DLA), a marker coloured by
    status over the bands the thresholds draw.
    """

    low, high = 1 - SURVIVES_WITHIN, 1 + SURVIVES_WITHIN
    fig = make_subplots(
        rows=1,
        cols=2,
        column_widths=[0.5, 0.5],
        # Room between the panels for the features' labels, which read across, left of their rows.
        horizontal_spacing=0.17,
        subplot_titles=(
            "Readability: logit difference along depth",
            "Features: DLA corrupted / reference",
        ),
    )
    x = [component_label(label) for label in report.entry_labels]
    for i, lens in enumerate(LENSES):
        for name, curves, color, readable in (
            ("reference", report.reference_curves, REFERENCE_COLOR, report.reference_readable[i]),
            ("corrupted", report.corrupted_curves, CORRUPTED_COLOR, report.corrupted_readable[i]),
        ):
            when = f"readable from {component_label(readable)}" if readable else "never readable"
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=curves[i].tolist(),
                    name=f"{name}, {LENS_NAMES[lens]} ({when})",
                    legendgroup="curves",
                    mode="lines+markers",
                    line=dict(color=color, dash="solid" if lens == "standard" else "dot"),
                    hovertemplate="%{x}: %{y:+.3f}<extra>" + f"{name}, {lens} lens" + "</extra>",
                ),
                row=1,
                col=1,
            )
    fig.add_hline(y=0, line=dict(color="rgb(150,150,150)", width=1), row=1, col=1)
    fig.update_xaxes(
        type="category", title_text="Layer (L3 pre = entering block 3, L3 mid = after its attention)", row=1, col=1
    )
    fig.update_yaxes(title_text="Logit difference (above 0: the answer leads)", row=1, col=1)

    # One row per feature, labelled with the reference's value: a status says whether the reading
    # holds, the sign which way the feature pushed (an "against" feature gone unreadable helps the answer).
    ticks = [
        f"{component_label(f) if kind == 'component' else f} ({fmt_value(v)})"
        for f, kind, v in zip(report.features, report.kinds, report.reference.tolist())
    ]
    ratios, statuses = report.ratio.tolist(), report.statuses
    bottom, top = RATIO_RANGE
    for status, style in STATUS_STYLE.items():
        at = [i for i, s in enumerate(statuses) if s == status]
        shown = [min(max(ratios[i], bottom), top) for i in at]
        clipped = [ratios[i] != s for i, s in zip(at, shown)]
        fig.add_trace(
            go.Scatter(
                x=shown,
                y=[ticks[i] for i in at],
                name=f"{status} ({len(at)})",
                legendgroup="status",
                mode="markers+text",
                marker=dict(color=style["color"], symbol=style["symbol"], size=12, line=dict(width=1, color="white")),
                # A marker drawn at the edge carries its true value, written inward.
                text=[f"{ratios[i]:+.2f}" if c else "" for i, c in zip(at, clipped)],
                textposition=["middle right" if ratios[i] < bottom else "middle left" for i in at],
                customdata=[[report.reference[i].item(), report.corrupted[i].item(), ratios[i]] for i in at],
                hovertemplate="%{y}: reference %{customdata[0]:+.3f}, corrupted %{customdata[1]:+.3f}, "
                "ratio %{customdata[2]:+.3f}<extra>" + status + "</extra>",
                showlegend=True,
            ),
            row=1,
            col=2,
        )
    # The bands first, under the markers: each status's region in its own colour, faint, named at its top.
    bands = (
        (bottom - 0.1, UNREADABLE_BELOW, "unreadable", f"unreadable below {UNREADABLE_BELOW:g}"),
        (UNREADABLE_BELOW, low, "damaged", "damaged"),
        (low, high, "survives", "survives"),
        (high, top + 0.1, "damaged", "damaged"),
    )
    for x0, x1, status, text in bands:
        fig.add_vrect(
            x0=x0,
            x1=x1,
            fillcolor=STATUS_STYLE[status]["color"],
            opacity=0.12,
            line_width=0,
            layer="below",
            annotation_text=text,
            annotation_position="top",
            annotation_font=dict(size=10, color="rgb(90,90,90)"),
            row=1,
            col=2,
        )
    for at in (UNREADABLE_BELOW, low, high):
        fig.add_vline(x=at, line=dict(color="rgb(110,110,110)", width=1, dash="dash"), row=1, col=2)
    fig.add_vline(x=1, line=dict(color="rgb(40,40,40)", width=1), row=1, col=2)
    fig.add_vline(x=0, line=dict(color="rgb(150,150,150)", width=1), row=1, col=2)
    # Traces go by status, so the axis must be told the features' own order (components, then heads),
    # top to bottom as read.
    fig.update_yaxes(type="category", categoryorder="array", categoryarray=ticks, autorange="reversed", row=1, col=2)
    fig.update_xaxes(
        range=[bottom - 0.1, top + 0.1],
        tickvals=[-1, 0, UNREADABLE_BELOW, low, 1, high, 2],
        title_text="Ratio corrupted / reference<br>(1 = as in the reference; below 0: the sign flipped)",
        row=1,
        col=2,
    )

    counts = ", ".join(f"{n} {s}" for s, n in report.counts().items())
    title = (
        f"Damage: {report.corrupted_label}<br><sup>against {report.reference_label}: logit difference "
        f"{report.reference_logit_diff:+.3f} -> {report.corrupted_logit_diff:+.3f} (drop {report.margin_drop:+.3f}); "
        f"{counts}</sup><br><sup>Green survives ({low:g} to {high:g} of the reference), orange is damaged "
        f"({UNREADABLE_BELOW:g} to {low:g}, or above {high:g}),</sup><br><sup>grey is unreadable (below "
        f"{UNREADABLE_BELOW:g}, sign flips included). Each feature's reference DLA is in brackets.</sup>"
    )
    return _layout(
        fig,
        {
            # From the top down, not centred in the margin, where its last line met the panels' titles.
            "title": dict(text=title, y=0.96, yanchor="top"),
            "legend": dict(orientation="h", y=-0.25),
            "height": 580,
            "margin": dict(t=135, b=160),
        },
        layout,
    )


def undertrained_figure(found, truth=None, **layout) -> go.Figure:
    """Histogram of every token's under-training score, the threshold marked; `truth` splits the tokens."""
    scores = found.scores.double()
    bins = dict(start=scores.min().item(), end=scores.max().item(), size=(scores.max() - scores.min()).item() / 60 or 1)
    fig = go.Figure()
    if truth is None:
        fig.add_trace(go.Histogram(x=scores.tolist(), xbins=bins, name="tokens", marker_color="rgb(120,120,120)"))
        title = f"Under-trained tokens: {len(found.token_ids)} of {len(scores)} score below the threshold"
    else:
        never = torch.zeros(len(scores), dtype=torch.bool)
        never[torch.tensor(sorted({int(t) for t in truth}), dtype=torch.long)] = True
        for mask, name, colour in [
            (~never, "in the training data", "rgb(120,120,120)"),
            (never, "never in the training data", "rgb(230,145,56)"),
        ]:
            fig.add_trace(
                go.Histogram(x=scores[mask].tolist(), xbins=bins, name=name, marker_color=colour, opacity=0.75)
            )
        precision, recall = found.precision_recall(truth)
        title = (
            f"Under-trained tokens found from the weights: precision {precision:.3f}, recall {recall:.3f}"
            f"<br><sup>{len(found.token_ids)} flagged (left of the line) of {len(scores)}; "
            f"{int(never.sum())} never occur in the training data.</sup>"
        )
    fig.add_vline(
        x=found.threshold,
        line=dict(color="rgb(40,40,40)", dash="dash"),
        annotation_text=f"threshold {found.threshold:.3f}",
        annotation_position="top right",
    )
    return _layout(
        fig,
        {
            "title": title,
            "barmode": "overlay",
            "xaxis_title": "Score (unembedding norm, mean and first principal component removed); low = under-trained",
            "yaxis_title": "Tokens (log scale)",
            "yaxis_type": "log",
            "yaxis_dtick": 1,
        },
        layout,
    )
