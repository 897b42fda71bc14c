"""The information-flow route: positions across, layers up, edges as wide as they are important."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from tracelib.formats import token_labels
from tracelib.plotting.style import DIVERGING, _layout

# Edges carry no sign, so they stay off the blue/red pair (that is the nodes' DLA).
EDGE_COLORS = {"head": "rgb(90,90,90)", "mlp": "rgb(150,120,60)", "residual": "rgb(190,190,190)"}
# Where each kind of node sits inside its layer's band.
LEVEL = {"pre": 0.0, "mid": 0.5, "final": 0.0}


def node_height(layer: int, kind: str) -> float:
    """A node's height: `pre` at its layer, `mid` half a layer up, `final` at `n_layers`."""
    return layer + LEVEL[kind]


def routes_figure(
    nodes: pd.DataFrame, route: pd.DataFrame, str_tokens: list[str], n_layers: int, **layout
) -> go.Figure:
    """The route's edges (width by importance) and nodes (RdBu by DLA, midpoint 0; blue toward the answer).

    Args:
        nodes: every node (`layer, pos, kind, dla, on_route`); only the route's are coloured.
        route: the edges on the route (`src_*`, `dst_*`, `via`, `head`, `importance`).
        str_tokens: the prompt's tokens, for the position axis.
        n_layers: the model's depth (the final nodes sit at that height).
    """
    labels = token_labels(str_tokens)
    fig = go.Figure()
    for row in route.itertuples(index=False):
        name = f"L{row.dst_layer}H{row.head}" if row.via == "head" else f"{row.via}"
        fig.add_trace(
            go.Scatter(
                x=[row.src_pos, row.dst_pos],
                y=[node_height(row.src_layer, row.src_kind), node_height(row.dst_layer, row.dst_kind)],
                mode="lines",
                line=dict(width=1 + 9 * float(row.importance), color=EDGE_COLORS[row.via]),
                hovertemplate=f"{name}: {labels[row.src_pos]} -> {labels[row.dst_pos]}, "
                f"importance {float(row.importance):.3f}<extra></extra>",
                showlegend=False,
            )
        )
    on = nodes[nodes["on_route"]]
    off = nodes[~nodes["on_route"]]
    fig.add_trace(
        go.Scatter(
            x=off["pos"].tolist(),
            y=[node_height(layer, kind) for layer, kind in zip(off["layer"], off["kind"])],
            mode="markers",
            marker=dict(size=4, color="rgb(225,225,225)"),
            hoverinfo="skip",
            showlegend=False,
        )
    )
    limit = float(on["dla"].abs().max()) if len(on) else 1.0
    fig.add_trace(
        go.Scatter(
            x=on["pos"].tolist(),
            y=[node_height(layer, kind) for layer, kind in zip(on["layer"], on["kind"])],
            mode="markers",
            marker=dict(
                size=11,
                color=on["dla"].tolist(),
                colorscale=DIVERGING,
                cmid=0,
                cmin=-(limit or 1.0),
                cmax=limit or 1.0,
                line=dict(width=1, color="rgb(80,80,80)"),
                colorbar=dict(title=dict(text="DLA<br>blue: toward<br>red: against", side="top")),
            ),
            text=[
                f"{kind} L{layer} {labels[pos]}: DLA {dla:+.3f}"
                for layer, pos, kind, dla in zip(on["layer"], on["pos"], on["kind"], on["dla"])
            ],
            hovertemplate="%{text}<extra></extra>",
            showlegend=False,
        )
    )
    fig.update_xaxes(title="Position", tickmode="array", tickvals=list(range(len(labels))), ticktext=labels)
    ticks = list(range(n_layers)) + [n_layers]
    fig.update_yaxes(
        title="Layer", tickmode="array", tickvals=ticks, ticktext=[f"L{t}" for t in range(n_layers)] + ["final"]
    )
    return _layout(fig, dict(title="Information-flow route", height=120 + 70 * (n_layers + 1)), layout, signed=True)
