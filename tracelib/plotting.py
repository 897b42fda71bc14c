"""Every plotly figure tracelib draws. Functions return figures and never call `.show()`."""

from __future__ import annotations

import plotly.graph_objects as go
import torch
from torch import Tensor

DIVERGING = "RdBu"


def token_labels(str_tokens: list[str]) -> list[str]:
    """Tick labels that keep repeated tokens apart: `'1'@3`."""
    return [f"{tok!r}@{i}" for i, tok in enumerate(str_tokens)]


def _layout(fig: go.Figure, defaults: dict, layout: dict) -> go.Figure:
    """Apply tracelib's defaults, then whatever the caller passed (which wins, title included)."""
    fig.update_layout(template="plotly_white", margin=dict(l=60, r=20, t=50, b=60))
    fig.update_layout(**{**defaults, **layout})
    return fig


def signed_bars(labels: list[str], values: Tensor, title: str = "", **layout) -> go.Figure:
    """Bars coloured by sign on the diverging scale, centred at zero."""
    vals = values.tolist()
    limit = max((abs(v) for v in vals), default=1.0) or 1.0
    fig = go.Figure(
        go.Bar(
            x=labels,
            y=vals,
            marker=dict(color=vals, colorscale=DIVERGING, cmin=-limit, cmax=limit, cmid=0),
            hovertemplate="%{x}: %{y:+.3f}<extra></extra>",
        )
    )
    return _layout(fig, {"title": title, "yaxis_title": "Direct logit attribution"}, layout)


def head_heatmap(values: Tensor, title: str = "", **layout) -> go.Figure:
    """A layer x head grid on RdBu with its midpoint at 0."""
    fig = _diverging_heatmap(
        values, list(range(values.shape[1])), list(range(values.shape[0])), "L%{y}H%{x}: %{z:+.3f}<extra></extra>"
    )
    return _layout(fig, {"title": title, "xaxis_title": "Head", "yaxis_title": "Layer"}, layout)


def _diverging_heatmap(values: Tensor, x: list, y: list, hovertemplate: str) -> go.Figure:
    """A heatmap on RdBu, symmetric about 0, first row at the top."""
    limit = values.abs().max().item() or 1.0
    fig = go.Figure(
        go.Heatmap(
            z=values.tolist(),
            x=x,
            y=y,
            colorscale=DIVERGING,
            zmid=0,
            zmin=-limit,
            zmax=limit,
            hovertemplate=hovertemplate,
        )
    )
    fig.update_yaxes(autorange="reversed")
    return fig


def margin_bars(margin, row: int = 0, **layout) -> go.Figure:
    """The top-k logits of one row; the answer's bar is drawn darker."""
    tokens = [repr(t) for t in margin.top_strs[row]]
    answer = repr(margin.answers[row])
    colors = ["#b2182b" if t == answer else "#92c5de" for t in tokens]
    fig = go.Figure(go.Bar(x=tokens, y=margin.top_logits[row].tolist(), marker_color=colors))
    title = f"Top predictions: {margin.row_labels[row]} (rank {int(margin.rank[row])}, p={margin.prob[row].item():.3f})"
    return _layout(fig, {"title": title, "xaxis_title": "Token", "yaxis_title": "Logit"}, layout)


METRIC_TITLES = {
    "logit": "Answer logit",
    "logit_diff": "Logit difference",
    "prob": "Probability",
    "rank": "Rank + 1 (1 = top prediction)",
}


def lens_lines(lens, row: int = 0, metric: str = "logit_diff", **layout) -> go.Figure:
    """Both lenses along depth, labelled apart (they differ on purpose before the last entry)."""
    from tracelib.lens import LENS_NAMES

    if metric not in METRIC_TITLES:
        raise ValueError(f"metric must be one of {list(METRIC_TITLES)}, got {metric!r}")
    fig = go.Figure()
    for curve, dash in ((lens.standard, "solid"), (lens.dla, "dot")):
        values = getattr(curve, metric)[:, row]
        if metric == "rank":
            values = values + 1  # a log axis cannot show rank 0; plot 1 = top prediction
        fig.add_trace(
            go.Scatter(
                x=curve.labels,
                y=values.tolist(),
                name=LENS_NAMES[curve.kind],
                mode="lines+markers",
                line=dict(dash=dash),
            )
        )
    if metric == "rank":
        fig.update_yaxes(type="log", autorange="reversed")
    return _layout(
        fig,
        {
            "title": f"{METRIC_TITLES[metric]} along depth: {lens.row_labels[row]}",
            "xaxis_title": "Layer (residual entering block L, mid = after its attention)",
            "yaxis_title": METRIC_TITLES[metric],
            "legend": dict(orientation="h", y=-0.3),
        },
        layout,
    )


def neuron_strip(values: Tensor, title: str = "", k: int = 10, **layout) -> go.Figure:
    """The k strongest neurons of each sign across all layers, as signed bars."""
    flat = values.flatten()
    d_mlp = values.shape[1]
    order = torch.cat([flat.topk(k).indices, (-flat).topk(k).indices])
    order = order[flat[order].argsort(descending=True)]
    labels = [f"L{int(i) // d_mlp}N{int(i) % d_mlp}" for i in order]
    return signed_bars(labels, flat[order], title=title, **{"xaxis_title": "Neuron", **layout})


def report_html(trace, row: int = 0) -> str:
    """A standalone HTML report of one trace: summary text and every figure, plotly.js inlined so
    it opens offline."""
    import html

    figures = [
        trace.margin.plot(row),
        trace.lens.plot(row, "logit_diff"),
        trace.lens.plot(row, "rank"),
        trace.dla.plot("component", row),
        trace.dla.plot("layer", row),
        trace.dla.plot("head", row),
        neuron_strip(trace.dla.neurons[:, :, row], title=f"Strongest neurons: {trace.dla.row_labels[row]}"),
    ]
    (top_layer, top_head), _ = trace.heads.strongest(row)
    figures += [trace.heads.source(top_layer, top_head, row).plot(), trace.positions.plot(row)]
    parts = [fig.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, fig in enumerate(figures)]
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>tracelib report</title>"
        '<meta name="generator" content="tracelib">'
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}pre{background:#f6f6f6;padding:1em;"
        "white-space:pre-wrap}</style></head><body>"
        f"<h1>Why does {html.escape(trace.model_name)} predict {html.escape(repr(trace.rows[row].target_str))}?</h1>"
        f"<pre>{html.escape(trace.summary())}</pre>" + "".join(parts) + "</body></html>"
    )


def source_bars(sources, **layout) -> go.Figure:
    """One head's contribution by source position, bars ticked with the tokens, attention on hover."""
    layout = {"title": f"L{sources.layer}H{sources.head} by source position: {sources.row_label}", **layout}
    fig = signed_bars(token_labels(sources.str_tokens), sources.values, **layout)
    fig.data[0].customdata = sources.attention.tolist()
    fig.data[0].hovertemplate = "%{x}: %{y:+.3f} (attention %{customdata:.2f})<extra></extra>"
    fig.update_xaxes(title="Position")
    return fig


def position_heatmap(positions, row: int = 0, **layout) -> go.Figure:
    """Position x component DLA grid on RdBu centred at 0, positions ticked with their tokens."""
    fig = _diverging_heatmap(
        positions.values[row].T,
        token_labels(positions.str_tokens[row]),
        positions.component_labels,
        "%{y} at %{x}: %{z:+.3f}<extra></extra>",
    )
    return _layout(
        fig,
        {
            "title": f"DLA toward the answer at every position: {positions.row_labels[row]}",
            "xaxis_title": "Position",
            "yaxis_title": "Component",
        },
        layout,
    )
