"""The information-flow route: positions across, layers up, edges as wide as they are important."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from tracelib.formats import token_labels
from tracelib.plotting.style import DIVERGING, _layout, _rdbu_heatmap

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


# Flow weight carries no sign: a sequential scale, white (no flow) to dark grey, off the blue/red pair.
WEIGHT_SCALE = [[0.0, "rgb(255,255,255)"], [1.0, "rgb(40,40,40)"]]


def route_agreement_figure(weight: np.ndarray, recovery: np.ndarray, str_tokens: list[str], **layout) -> go.Figure:
    """Route flow weight (sequential, 0 to 1) beside resid_pre recovery (RdBu centred at 0), layer x position.

    Args:
        weight, recovery: [layer, clean position] arrays, NaN where no cell was patched.
        str_tokens: the clean prompt's tokens, for the position axis.
    """
    labels = token_labels(str_tokens)
    layers = [f"L{layer}" for layer in range(weight.shape[0])]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("route flow weight", "resid_pre recovery"),
                        horizontal_spacing=0.18)  # fmt: skip
    fig.add_trace(
        go.Heatmap(
            z=weight.tolist(), x=labels, y=layers, colorscale=WEIGHT_SCALE, zmin=0, zmax=1,
            colorbar=dict(x=0.41, len=0.9, thickness=14, title=dict(text="weight", side="top")),
            hovertemplate="%{y} %{x}: weight %{z:.3f}<extra></extra>",
        ),
        row=1, col=1,
    )  # fmt: skip
    limit = max(1.0, float(np.nanmax(np.abs(recovery), initial=0.0)))
    fig.add_trace(
        _rdbu_heatmap(
            torch.from_numpy(recovery), labels, layers, limit,
            colorbar=dict(len=0.9, thickness=14, title=dict(text="recovery<br>blue: recovers", side="top")),
            hovertemplate="%{y} %{x}: recovery %{z:+.3f}<extra></extra>",
        ),
        row=1, col=2,
    )  # fmt: skip
    for col in (1, 2):
        fig.update_xaxes(type="category", title_text="Position (clean)", row=1, col=col)
        fig.update_yaxes(type="category", title_text="Layer", row=1, col=col)
    # Room on top for a two-line title over the panel titles, and for the colour bars' titles at 4 layers.
    height = 250 + 28 * weight.shape[0]
    margin = dict(l=70, r=20, t=110, b=70)
    return _layout(fig, dict(title="Route vs resid_pre patching", height=height, margin=margin), layout)
