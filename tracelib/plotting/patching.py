"""Patching figures: recovery grids, the estimate against exact patching, readable against causal."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots
from torch import Tensor

from tracelib.plotting.style import DIVERGING, _layout
from tracelib.plotting.trace_views import signed_bars

PATCHING_CAPTION = (
    "Blue recovers the clean answer's logit difference (1 = clean), red pushes against it (0 = corrupted)."
)


RAW_CHANGE_CAPTION = "Blue raises the answer's logit difference above the corrupted run's, red lowers it."


# Recovery is a ratio, unbounded where clean - corrupted is small. Its colours span the largest
# |value| but never less than ±1 (so 1 = clean is full blue wherever it is the largest) and never
# more than ±RECOVERY_COLOR_LIMIT: a cell beyond it is drawn at the end of the scale, its hover still
# shows its value, and the title counts such cells.
RECOVERY_COLOR_LIMIT = 1.5


def recovery_color_limit(values: Tensor) -> float:
    """The colour range ±limit of a recovery figure: the largest finite |value|, kept within [1, 1.5]."""
    finite = values[values.isfinite()]
    top = finite.abs().max().item() if len(finite) else 1.0
    return min(max(top, 1.0), RECOVERY_COLOR_LIMIT)


# Cells patching left alone (no counterpart in the other prompt): grey and crossed, off the RdBu scale.
NOT_PATCHED_NAME = "no counterpart: not patched"


NOT_PATCHED_COLOR, NOT_PATCHED_MARK = "rgb(190,190,190)", "rgb(90,90,90)"


def _weak_title(note: str) -> str:
    return f"<br><sup>{note[:1].upper()}{note[1:]}: showing the raw change of the logit difference, not recovery.</sup>"


def patching_figure(result, **layout) -> go.Figure:
    """A patching result on RdBu centred at 0: a layer x position (or head) heatmap, or bars per layer.

    Cells with no counterpart in the other run are NaN: drawn grey and crossed (`NOT_PATCHED_NAME` in
    the legend), never the near-white of 0, and named in the title. Recovery's
    colours stop at ±`recovery_color_limit`. Where the effect is weak (`result.weak_effect`) the
    figure shows `result.raw_change` (patched - corrupted logit difference) instead, and says why.
    """
    weak = result.weak_effect
    values, dims, labels = (result.raw_change if weak else result.values), result.dims, result.labels
    if values.ndim == 3:  # [layer, head, position]: one row per head
        values = values.reshape(-1, values.shape[-1])
        y = [f"{layer}{head}" for layer in labels[0] for head in labels[1]]
        x, x_title, y_title = labels[2], "Position", "Head"
    elif values.ndim == 2:
        y, x = labels[0], labels[1]
        x_title, y_title = dims[1].capitalize(), "Layer"
    else:
        x_title, y_title = "Layer", None
    kind = "Activation patching" if result.method == "exact" else "Attribution patching, a linear estimate"
    shown = f"raw change of {result.answer_str!r}'s logit difference" if weak else f"recovery of {result.answer_str!r}"
    title = f"{kind} ({result.what}, {result.direction}): {shown}"
    if weak:
        title += _weak_title(result.effect_note)
    if result.no_counterpart:
        gap = [f"{result.str_tokens[i]!r}@{i}" for i in result.no_counterpart]
        gap = ", ".join(gap) if len(gap) <= 6 else f"{len(gap)} positions, {gap[0]} to {gap[-1]}"
        mark = "Grey ×" if values.ndim > 1 else "Not patched"
        title += f"<br><sup>{mark}: no counterpart in the other prompt ({gap}), so not patched.</sup>"
    finite = values[values.isfinite()]
    if weak:
        # A logit difference, not a ratio: it is bounded by the logits themselves.
        limit = (finite.abs().max().item() if len(finite) else 0.0) or 1.0
    else:
        limit = recovery_color_limit(values)
        beyond = int((finite.abs() > limit).sum())
        if beyond:
            title += f"<br><sup>Colours stop at ±{limit:.3f}: {beyond} cell(s) lie beyond; hover for each value.</sup>"
    title += f"<br><sup>{RAW_CHANGE_CAPTION if weak else PATCHING_CAPTION}</sup>"
    axis_title = "Raw change (patched - corrupted)" if weak else "Recovery"
    if values.ndim == 1:
        # signed_bars would add the DLA caption; this figure carries its own.
        fig = signed_bars(labels[0], values.nan_to_num(0.0), "", xaxis_title="Layer", yaxis_title=axis_title)
        fig.update_traces(marker=dict(cmin=-limit, cmax=limit))
        return _layout(fig, {"title": title}, layout)
    colorbar = "raw change<br>blue: raises<br>red: lowers" if weak else "recovery<br>blue: toward clean<br>red: against"
    fig = go.Figure(
        go.Heatmap(
            z=[[None if v != v else v for v in row] for row in values.tolist()],
            x=list(x),
            y=list(y),
            colorscale=DIVERGING,
            zmid=0,
            zmin=-limit,
            zmax=limit,
            colorbar=dict(title=dict(text=colorbar, side="top")),
            hovertemplate="%{y} at %{x}: %{z:+.3f}<extra></extra>",
        )
    )
    missing = values.isnan()
    if missing.any():
        # RdBu's 0 is near-white, as a blank cell is: grey cells, each crossed, read as "not patched".
        fig.add_trace(
            go.Heatmap(
                z=[[1.0 if m else None for m in row] for row in missing.tolist()],
                x=list(x),
                y=list(y),
                colorscale=[[0, NOT_PATCHED_COLOR], [1, NOT_PATCHED_COLOR]],
                showscale=False,
                hoverinfo="skip",
                name=NOT_PATCHED_NAME,
            )
        )
        rows, cols = missing.nonzero(as_tuple=True)
        fig.add_trace(
            go.Scatter(
                x=[x[c] for c in cols.tolist()],
                y=[y[r] for r in rows.tolist()],
                mode="markers",
                marker=dict(symbol="x-thin", size=12, line=dict(width=1.5, color=NOT_PATCHED_MARK)),
                name=NOT_PATCHED_NAME,
                hovertemplate="%{y} at %{x}: not patched (no counterpart in the other prompt)<extra></extra>",
            )
        )
    fig.update_xaxes(type="category")
    fig.update_yaxes(type="category", autorange="reversed")
    # Room for every subtitle line above the plot, so the last one does not sit on the top row.
    top = 50 + 20 * title.count("<br>")
    defaults = {"title": title, "xaxis_title": x_title, "yaxis_title": y_title, "margin": dict(t=top)}
    if missing.any():
        # The key sits at the figure's foot, right of the axis title, clear of the title's lines and the colour bar.
        legend = dict(orientation="h", x=1, xanchor="right", yref="container", y=0, yanchor="bottom")
        defaults.update(showlegend=True, legend=legend)
    return _layout(fig, defaults, layout)


def agreement_figure(agreement, **layout) -> go.Figure:
    """Attribution patching's estimate against exact recovery: on the grey line they agree.

    Where the effect is weak (`agreement.weak_effect`) both axes show the raw change of the logit
    difference instead, since recovery is noise there.
    """
    weak = agreement.weak_effect
    unit = "_raw" if weak else ""
    x, y = getattr(agreement, "exact" + unit).tolist(), getattr(agreement, "estimate" + unit).tolist()
    lo, hi = min(x + y + [0.0]), max(x + y + [0.0 if weak else 1.0])
    fig = go.Figure(
        [
            go.Scatter(
                x=[lo, hi],
                y=[lo, hi],
                mode="lines",
                line=dict(color="rgb(160,160,160)", dash="dash"),
                name="estimate = exact",
                hoverinfo="skip",
            ),
            go.Scatter(
                x=x,
                y=y,
                mode="markers",
                marker=dict(color="rgb(40,40,40)", size=7),
                name="cell",
                text=agreement.cells,
                hovertemplate="%{text}: exact %{x:+.3f}, estimate %{y:+.3f}<extra></extra>",
            ),
        ]
    )
    worst = agreement.top(min(3, len(agreement.cells))) if agreement.cells else None
    if worst is not None:
        for _, cell in worst.iterrows():
            fig.add_annotation(
                x=cell["exact" + unit],
                y=cell["estimate" + unit],
                text=cell["cell"],
                showarrow=True,
                arrowhead=0,
                ax=30,
                ay=-20,
                font=dict(size=11),
            )
    scale = "patched - corrupted logit difference" if weak else "1 = clean, 0 = corrupted"
    title = (
        f"Attribution patching against exact patching ({agreement.what}, {agreement.direction}): "
        f"Pearson {agreement.pearson:+.2f} (linear agreement), Spearman {agreement.spearman:+.2f} (same order)"
        f"<br><sup>One marker per cell; {scale}. "
        "Off the dashed line the linear estimate is wrong; the three furthest off are named.</sup>"
    )
    if weak:
        title += _weak_title(f"this corruption barely changes the answer (Δ = {agreement.delta:+.3f})")
    shown = "raw change" if weak else "recovery"
    return _layout(
        fig,
        {
            "title": title,
            "xaxis_title": f"Exact {shown} (patch)",
            "yaxis_title": f"Estimated {shown} (attribution_patch)",
            "showlegend": False,
        },
        layout,
    )


def readable_causal_figure(result, **layout) -> go.Figure:
    """DLA (readable, x) against patching recovery (causal, y): heads in one panel, whole layers in the other.

    The two kinds get their own panels because a whole layer's DLA is the sum of its heads' (or
    its MLP's neurons'), so they sit on different scales.
    """

    weak = result.weak_effect
    causal = result.raw_change if weak else result.recovery
    kinds = [k for k in ("head", "component") if k in result.kinds]
    titles = {"head": "Heads", "component": "Whole layers (attention, MLP)"}
    fig = make_subplots(rows=1, cols=len(kinds), subplot_titles=[titles[k] for k in kinds], horizontal_spacing=0.1)
    for col, kind in enumerate(kinds, start=1):
        idx = [i for i, k in enumerate(result.kinds) if k == kind]
        dla, rec = result.dla[idx].tolist(), causal[idx].tolist()
        names = [result.units[i] for i in idx]
        # Name the units that lead on either axis, so the disagreement reads without hovering;
        # alternate the side of the label so neighbours do not overprint each other.
        order = (
            sorted(range(len(idx)), key=lambda i: -abs(dla[i]))[:3]
            + sorted(range(len(idx)), key=lambda i: -abs(rec[i]))[:3]
        )
        named = list(dict.fromkeys(order))
        lo, hi = min(dla + [0.0]), max(dla + [0.0])

        middle = lo + (hi - lo) / 2
        position = {
            i: f"{'top' if n % 2 == 0 else 'bottom'} {'right' if dla[i] < middle else 'left'}"
            for n, i in enumerate(sorted(named, key=lambda i: (rec[i], dla[i])))
        }
        fig.add_trace(
            go.Scatter(
                x=dla,
                y=rec,
                mode="markers+text",
                marker=dict(symbol="circle" if kind == "head" else "square", color="rgb(40,40,40)", size=9),
                text=[names[i] if i in position else "" for i in range(len(idx))],
                textposition=[position.get(i, "top right") for i in range(len(idx))],
                textfont=dict(size=11),
                customdata=names,
                showlegend=False,
                hovertemplate="%{customdata}: DLA %{x:+.3f}, "
                + ("raw change" if weak else "recovery")
                + " %{y:+.3f}<extra></extra>",
            ),
            row=1,
            col=col,
        )
        fig.add_vline(x=0, line=dict(color="rgb(200,200,200)"), row=1, col=col)
        fig.add_hline(y=0, line=dict(color="rgb(200,200,200)"), row=1, col=col)
        fig.update_xaxes(title_text=f"DLA ({result.metric}): right = toward the answer", row=1, col=col)
    y_title = "Patching raw change (patched - corrupted)" if weak else "Patching recovery (1 = clean)"
    fig.update_yaxes(title_text=y_title, row=1, col=1)
    title = f"Readable (DLA) against causal (patching, {result.direction}) for {result.answer_str!r}"
    if weak:
        title += _weak_title(f"this corruption barely changes the answer (Δ = {result.delta:+.3f})")
    else:
        title += (
            "<br><sup>Far from 0 on x but near 0 on y: readable, not needed. Near 1 on y but small on x: needed, "
            "though it writes little directly.</sup>"
        )
    return _layout(fig, {"title": title, "height": 500, "margin": dict(l=70, r=20, t=110, b=70)}, layout)
