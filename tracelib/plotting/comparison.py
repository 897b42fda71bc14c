"""Two traces side by side (`tl.compare`)."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots
from torch import Tensor

from tracelib.plotting.style import DIVERGING, _layout, _rdbu_heatmap


def comparison_heatmaps(a: Tensor, b: Tensor, title: str = "", **layout) -> go.Figure:
    """Two layer x head grids side by side on one symmetric RdBu scale, and their difference b - a.

    a and b share `zmin`/`zmax`, so one colour means one value in both; b - a has its own symmetric
    scale (blue: b pushes more toward the answer than a).
    """

    n_layers, n_heads = a.shape
    x, y = [f"H{h}" for h in range(n_heads)], [f"L{layer}" for layer in range(n_layers)]
    # Wide gaps: the shared colour bar sits between b and b - a, clear of b - a's axis title.
    fig = make_subplots(rows=1, cols=3, subplot_titles=("a", "b", "b - a"), horizontal_spacing=0.16)
    bar_x = {2: fig.layout.xaxis2.domain[1] + 0.01, 3: 1.01}
    shared = max(a.abs().max().item(), b.abs().max().item()) or 1.0
    diff = b - a
    for col, (values, limit) in enumerate(((a, shared), (b, shared), (diff, diff.abs().max().item() or 1.0)), 1):
        fig.add_trace(
            _rdbu_heatmap(
                values,
                x,
                y,
                limit,
                showscale=col in (2, 3),
                colorbar=dict(
                    x=bar_x.get(col, 1.0),
                    xanchor="left",
                    len=0.9,
                    thickness=14,
                    title=dict(text="DLA" if col == 2 else "b - a", side="top"),
                ),
                hovertemplate="%{y}%{x}: %{z:+.3f}<extra>" + ("a", "b", "b - a")[col - 1] + "</extra>",
            ),
            row=1,
            col=col,
        )
        fig.update_xaxes(type="category", title_text="Head", row=1, col=col)
        fig.update_yaxes(type="category", autorange="reversed", title_text="Layer", row=1, col=col)
    return _layout(fig, {"title": title}, layout, signed=True)


def comparison_bars(labels: list[str], a: Tensor, b: Tensor, unit: str = "component", title: str = "", **layout):
    """Paired bars, a (solid) and b (hatched), coloured by sign on one symmetric RdBu scale, and b - a below."""

    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.12, row_heights=[0.6, 0.4])
    shared = max(a.abs().max().item(), b.abs().max().item()) or 1.0
    diff = b - a
    limit = diff.abs().max().item() or 1.0
    bars = (("a", a, "", shared, 1), ("b", b, "/", shared, 1), ("b - a", diff, "", limit, 2))
    for name, values, pattern, lim, row in bars:
        vals = values.tolist()
        fig.add_trace(
            go.Bar(
                x=list(labels),
                y=vals,
                name=name,
                marker=dict(
                    color=vals,
                    colorscale=DIVERGING,
                    cmin=-lim,
                    cmax=lim,
                    cmid=0,
                    pattern=dict(shape=pattern),
                    line=dict(color="rgb(60,60,60)", width=1),
                ),
                hovertemplate="%{x}: %{y:+.3f}<extra>" + name + "</extra>",
            ),
            row=row,
            col=1,
        )
    axis = {"component": "Component", "neuron": "Neuron (layer, index)", "head": "Head"}.get(unit, unit)
    fig.update_xaxes(type="category")
    fig.update_xaxes(title_text=axis, row=2, col=1)
    fig.update_yaxes(title_text="DLA (a solid, b hatched)", row=1, col=1)
    fig.update_yaxes(title_text="b - a", row=2, col=1)
    return _layout(fig, {"title": title, "barmode": "group"}, layout, signed=True)
