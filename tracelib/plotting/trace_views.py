"""The figures of one trace's results: margin, lens, DLA bars and heatmaps, neurons, sources, positions."""

from __future__ import annotations

import plotly.graph_objects as go
import torch
from torch import Tensor

from tracelib.formats import (
    LENS_NAMES,
    READABLE_PROB,
    metric_phrase,
    token_labels,
    unit_label,
)
from tracelib.plotting.style import (
    BLUE,
    DIVERGING,
    LENS_COLORS,
    METRIC_TITLES,
    PALE_RED,
    RED,
    _diverging_heatmap,
    _layout,
    component_label,
    log_ticks,
)


def signed_bars(labels: list[str], values: Tensor, title: str = "", **layout) -> go.Figure:
    """Bars coloured by sign on RdBu centred at zero: blue toward the answer, red against it."""
    vals = values.tolist()
    limit = max((abs(v) for v in vals), default=1.0) or 1.0
    fig = go.Figure(
        go.Bar(
            x=list(labels),
            y=vals,
            marker=dict(color=vals, colorscale=DIVERGING, cmin=-limit, cmax=limit, cmid=0),
            hovertemplate="%{x}: %{y:+.3f}<extra></extra>",
        )
    )
    fig.update_xaxes(type="category")
    defaults = {"title": title, "xaxis_title": "Component", "yaxis_title": "Direct logit attribution"}
    return _layout(fig, defaults, layout, signed=True)


def component_bars(labels: list[str], values: Tensor, title: str = "", **layout) -> go.Figure:
    """DLA by component (`embed`, `L0 attn`, `L0 MLP`, ...) or by layer (`embed`, `L0`, ...)."""
    ticks = [unit_label(label) for label in labels]  # idempotent: TransformerLens names or display labels
    by_layer = all(tick == "embed" or (tick[:1] == "L" and tick[1:].isdigit()) for tick in ticks)
    return signed_bars(ticks, values, title, **{"xaxis_title": "Layer" if by_layer else "Component", **layout})


def head_heatmap(values: Tensor, title: str = "", **layout) -> go.Figure:
    """A layer x head grid on RdBu with its midpoint at 0, ticked `L0`... and `H0`..."""
    n_layers, n_heads = values.shape
    fig = _diverging_heatmap(
        values, [f"H{h}" for h in range(n_heads)], [f"L{layer}" for layer in range(n_layers)], "%{y}%{x}"
    )
    return _layout(fig, {"title": title, "xaxis_title": "Head", "yaxis_title": "Layer"}, layout, signed=True)


MARGIN_CAPTION = "The answer is blue; its rivals are red, dark where they outrank the answer."


def margin_bars(margin, row: int = 0, **layout) -> go.Figure:
    """The top-k logits of one row: the answer blue, rivals red (dark if they beat the answer).

    If the answer is not among the top k, its own bar is added at the end, labelled with its rank.
    """
    tokens = [repr(t) for t in margin.top_strs[row]]
    logits = margin.top_logits[row].tolist()
    answer, answer_logit = repr(margin.answers[row]), margin.logit[row].item()
    at = tokens.index(answer) if answer in tokens else len(tokens)
    if at == len(tokens):
        tokens.append(f"{answer} (rank {int(margin.rank[row])})")
        logits.append(answer_logit)
    colors = [BLUE if i == at else RED if lg > answer_logit else PALE_RED for i, lg in enumerate(logits)]
    fig = go.Figure(
        go.Bar(x=tokens, y=logits, marker_color=colors, hovertemplate="%{x}: logit %{y:+.3f}<extra></extra>")
    )
    fig.update_xaxes(type="category")
    rivals = ", ".join(repr(d) for d in margin.distractor_strs[row])
    title = (
        f"Top predictions: {margin.row_labels[row]} (rank {int(margin.rank[row])}, p={margin.prob[row].item():.3f}; "
        f"logit difference {margin.logit_diff[row].item():+.3f} against {rivals})"
        f"<br><sup>{MARGIN_CAPTION}</sup>"
    )
    return _layout(fig, {"title": title, "xaxis_title": "Token", "yaxis_title": "Logit"}, layout)


def lens_lines(lens, row: int = 0, metric: str = "logit_diff", **layout) -> go.Figure:
    """Both lenses along depth, labelled apart (they differ on purpose before the last entry)."""

    if metric not in METRIC_TITLES:
        raise ValueError(f"metric must be one of {list(METRIC_TITLES)}, got {metric!r}")
    fig = go.Figure()
    highest = 1.0
    for curve, dash in ((lens.standard, "solid"), (lens.dla, "dot")):
        values = getattr(curve, metric)[:, row]
        if metric == "rank":
            values = values + 1  # a log axis cannot show rank 0; plot 1 = top prediction
            highest = max(highest, float(values.max()))
        fig.add_trace(
            go.Scatter(
                x=[component_label(label) for label in curve.labels],
                y=values.tolist(),
                name=LENS_NAMES[curve.kind],
                mode="lines+markers",
                line=dict(dash=dash, color=LENS_COLORS[curve.kind]),
            )
        )
    fig.update_xaxes(type="category")
    if metric == "rank":
        vals, text = log_ticks(highest)
        fig.update_yaxes(type="log", autorange="reversed", tickmode="array", tickvals=vals, ticktext=text)
    if metric == "logit_diff":
        # Above zero the answer beats its rivals: the same blue/red reading as every other figure.
        fig.add_hline(y=0, line=dict(color="rgb(150,150,150)", width=1))
    if metric == "prob":
        fig.add_hline(
            y=READABLE_PROB,
            line=dict(color="rgb(150,150,150)", width=1, dash="dash"),
            annotation_text=f"p = {READABLE_PROB:g}: readable above",
            annotation_position="bottom right",
        )
    readable = lens.standard.readable_from(row)
    if readable is not None:
        # Where the answer becomes readable by the standard lens: the one meaning tracelib gives the word.
        # (A shape and an annotation: plotly's add_vline cannot place its label on a category axis.)
        at = component_label(readable)
        fig.add_shape(
            type="line",
            x0=at,
            x1=at,
            yref="paper",
            y0=0,
            y1=1,
            line=dict(color="rgb(150,150,150)", width=1, dash="dash"),
        )
        fig.add_annotation(
            x=at, yref="paper", y=1, text=f"readable from {at}", showarrow=False, xanchor="left", yanchor="top"
        )
    subtitle = []
    if metric in ("logit", "logit_diff") and lens.answer_strs:
        subtitle.append(metric_phrase(metric, lens.answer_strs[row], lens.distractor_strs[row]))
    subtitle.append(
        f"readable (standard lens gives the answer p > {READABLE_PROB:g} from there on) from "
        f"{component_label(readable)}"
        if readable
        else f"never readable (p > {READABLE_PROB:g}) by the standard lens"
    )
    return _layout(
        fig,
        {
            "title": f"{METRIC_TITLES[metric]} along depth: {lens.row_labels[row]}<br><sub>{'; '.join(subtitle)}</sub>",
            "xaxis_title": "Layer (L3 pre = entering block 3, L3 mid = after its attention)",
            "yaxis_title": METRIC_TITLES[metric],
            "legend": dict(orientation="h", y=-0.3),
        },
        layout,
    )


def neuron_strip(values: Tensor, title: str = "", k: int = 10, **layout) -> go.Figure:
    """The k strongest neurons of each sign across all layers, as signed bars (`L0N12`: layer 0, neuron 12)."""
    flat = values.flatten()
    d_mlp = values.shape[1]
    k = min(k, flat.numel())
    order = torch.cat([flat.topk(k).indices, (-flat).topk(k).indices]).unique()
    order = order[flat[order].argsort(descending=True)]
    labels = [f"L{int(i) // d_mlp}N{int(i) % d_mlp}" for i in order]
    return signed_bars(labels, flat[order], title=title, **{"xaxis_title": "Neuron (layer, index)", **layout})


def source_bars(sources, **layout) -> go.Figure:
    """One head's contribution by source position, bars ticked with the tokens, attention on hover."""
    layout = {
        "title": f"L{sources.layer}H{sources.head} by source position: {sources.row_label}"
        + (f"<br><sub>{sources.metric_label}</sub>" if sources.metric_label else ""),
        "xaxis_title": "Position",
        **layout,
    }
    fig = signed_bars(token_labels(sources.str_tokens), sources.values, **layout)
    fig.data[0].customdata = sources.attention.tolist()
    fig.data[0].hovertemplate = "%{x}: %{y:+.3f} (attention %{customdata:.2f})<extra></extra>"
    return fig


def position_heatmap(positions, row: int = 0, **layout) -> go.Figure:
    """Position x component DLA grid on RdBu centred at 0, positions ticked with their tokens.

    The subtitle names the metric and the positions where the answer is readable (p > 0.5 in the
    model's own prediction there), by the one rule the lens uses too.
    """
    labels = token_labels(positions.str_tokens[row])
    fig = _diverging_heatmap(
        positions.values[row].T,
        labels,
        [component_label(label) for label in positions.component_labels],
        "%{y} at %{x}",
    )
    notes = [positions.metric_labels[row]] if positions.metric_labels else []
    if positions.final_prob:
        readable = [labels[p] for p, ok in enumerate(positions.readable_at(row)) if ok]
        notes.append(
            f"readable (answer p > {READABLE_PROB:g}) at: {', '.join(readable)}" if readable else "readable nowhere"
        )
    subtitle = f"<br><sub>{'; '.join(notes)}</sub>" if notes else ""
    return _layout(
        fig,
        {
            "title": f"DLA toward the answer at every position: {positions.row_labels[row]}{subtitle}",
            "xaxis_title": "Position",
            "yaxis_title": "Component",
        },
        layout,
        signed=True,
    )
