"""Every plotly figure tracelib draws. Functions return figures and never call `.show()`."""

from __future__ import annotations

import plotly.graph_objects as go
import torch
from torch import Tensor

from tracelib.formats import (
    LENS_NAMES,
    LENSES,
    READABLE_PROB,
    SURVIVES_WITHIN,
    UNREADABLE_BELOW,
    fmt_value,
    metric_phrase,
    token_labels,
    unit_label,
)

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


def _prediction_line(trace, row: int) -> str:
    m = trace.margin
    rank = int(m.rank[row])
    verdict = "the model predicts it" if rank == 0 else f"the model does not predict it (rank {rank})"
    return (
        f"top prediction {m.top_strs[row][0]!r} (p={m.top_probs[row, 0].item():.3f}); answer "
        f"{m.answers[row]!r}: {verdict}, p={m.prob[row].item():.3f}, logit difference "
        f"{m.logit_diff[row].item():+.3f} against {', '.join(repr(d) for d in m.distractor_strs[row])}"
    )


def report_figures(trace, row: int = 0) -> list[dict]:
    """The report's workflow steps, in order: id, heading, what it shows, figures, caption."""

    dla = trace.dla
    what = dla.metric_label(row)
    (top_layer, top_head), _ = trace.heads.strongest(row)
    verdict, _ = trace.positions.verdict(row)
    readable = trace.lens.standard.readable_from(row)
    rec = dla.reconstruction.to_dict(row)
    prediction = _prediction_line(trace, row)
    steps = [
        dict(
            id="margin",
            heading="1. The margin: what the model predicts",
            text="The model's most likely next tokens at the final position, with their logits, and how far "
            "the answer is ahead of (or behind) its rivals.",
            figures=[trace.margin.plot(row)],
            caption=f"{MARGIN_CAPTION} {prediction[:1].upper()}{prediction[1:]}.",
        ),
        dict(
            id="lens",
            heading="2. Logit lens: when the answer becomes readable",
            text="The residual stream read as if the model stopped after each sublayer. The solid line, the "
            f"{LENS_NAMES['standard']}, asks what would be predicted there; the dotted line, the "
            f"{LENS_NAMES['dla']}, shows how much has been written so far. They meet at the end.",
            figures=[trace.lens.plot(row, "logit_diff"), trace.lens.plot(row, "rank")],
            caption="Above the zero line the answer beats its rivals. Rank 1 is the top prediction (log scale). "
            + (
                f"By the standard lens the answer is readable (p > {READABLE_PROB:g}) from "
                f"{component_label(readable)} on."
                if readable
                else f"By the standard lens the answer is never readable (p > {READABLE_PROB:g} at the last layer)."
            ),
        ),
        dict(
            id="dla",
            heading="3. Direct logit attribution: which components write the answer",
            text=f"Each component's direct contribution to the {what} at the final position, by "
            "component and summed by layer.",
            figures=[dla.plot("component", row), dla.plot("layer", row)],
            caption=SIGN_CAPTION,
            extra=f"Reconstruction: the components sum to {rec['attributed']:+.4f}, plus b_U {rec['bias']:+.4f} "
            f"= {rec['attributed'] + rec['bias']:+.4f}; the model's own value is {rec['actual']:+.4f} "
            f"(residual {rec['residual']:+.2e}).",
        ),
        dict(
            id="heads",
            heading="4. Attention heads: who writes, and where they read from",
            text=f"Every head's direct contribution (layer by head), then the strongest positive head, "
            f"L{top_layer}H{top_head}, split by the source position it reads from (hover for its attention).",
            figures=[dla.plot("head", row), trace.heads.source(top_layer, top_head, row).plot()],
            caption=SIGN_CAPTION,
        ),
        dict(
            id="neurons",
            heading="5. MLP neurons: the strongest writers",
            text="The ten strongest neurons of each sign across all layers (L1N12 is layer 1, neuron 12).",
            figures=[neuron_strip(dla.neurons[:, :, row], title=f"Strongest neurons: {dla.row_labels[row]}")],
            caption=SIGN_CAPTION,
        ),
        dict(
            id="positions",
            heading="6. Positions: where along the prompt the answer is written",
            text="Every component's contribution toward the answer when read at every position (each with its "
            "own final-norm scale); the last column is the DLA above.",
            figures=[trace.positions.plot(row)],
            caption=f"{SIGN_CAPTION} Verdict: {verdict}; " + readable_positions_sentence(trace.positions, row),
        ),
    ]
    # Each section says how to read its colours once, in its caption; the titles above would repeat it.
    for step in steps:
        for fig in step["figures"]:
            _without_caption(_without_caption(fig, SIGN_CAPTION), MARGIN_CAPTION)
    return steps


def readable_positions_sentence(positions, row: int = 0) -> str:
    """Where along the prompt the answer is readable (p > 0.5 in the model's own prediction), in words."""
    labels = token_labels(positions.str_tokens[row])
    if not positions.final_prob:
        return "readability per position was not recorded (a reference saved before format 3)."
    where = [p for p, ok in enumerate(positions.readable_at(row)) if ok]
    rule = f"(the model's own prediction there gives it p > {READABLE_PROB:g})"
    if not where:
        return f"the answer is readable {rule} at no position."
    if where == [len(labels) - 1]:
        return f"the answer is readable {rule} only at the final position, {labels[-1]}."
    return f"the answer is readable {rule} at {', '.join(labels[p] for p in where)}."


def report_html(trace, row: int = 0) -> str:
    """A standalone HTML report of one trace, one section per workflow step, that opens offline.

    plotly.js is inlined once (with the first figure); the text summary sits in a collapsed block.
    """
    import html

    esc = html.escape
    steps = report_figures(trace, row)
    row_ = trace.rows[row]
    n_figures = 0
    sections = []
    for step in steps:
        figures = []
        for fig in step["figures"]:
            fig.update_layout(height=440)
            figures.append(
                fig.to_html(full_html=False, include_plotlyjs=(n_figures == 0), config={"displaylogo": False})
            )
            n_figures += 1
        extra = f'<p class="reconstruction">{esc(step["extra"])}</p>' if "extra" in step else ""
        sections.append(
            f'<section id="{step["id"]}" class="step"><h2>{esc(step["heading"])}</h2><p>{esc(step["text"])}</p>'
            f"<figure>{''.join(figures)}<figcaption>{esc(step['caption'])}</figcaption></figure>{extra}</section>"
        )
    header = (
        f"<header><h1>Why does {esc(trace.model_name)} predict {esc(repr(row_.target_str))}?</h1><dl>"
        f"<dt>Model</dt><dd>{esc(trace.model_name)}</dd>"
        f"<dt>Prompt</dt><dd><code>{esc(repr(row_.prompt))}</code></dd>"
        f"<dt>Answer</dt><dd><code>{esc(repr(row_.target_str))}</code>"
        f"{esc(f' (step {row_.step + 1} of {row_.n_steps})' if row_.n_steps > 1 else '')}</dd>"
        f"<dt>Prediction</dt><dd>{esc(_prediction_line(trace, row))}</dd></dl>"
        f'<p class="legend">How to read the colours: {esc(SIGN_CAPTION)}</p></header>'
    )
    return (
        '<!DOCTYPE html><html><head><meta charset="utf-8"><meta name="generator" content="tracelib">'
        f"<title>tracelib: {esc(row_.label)}</title>"
        "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:auto;padding:0 1em;color:#222}"
        "dl{display:grid;grid-template-columns:max-content auto;gap:.2em 1em}dt{font-weight:bold}dd{margin:0}"
        "section{border-top:1px solid #ddd;margin-top:2em}figure{margin:0}"
        "figcaption{color:#444;font-style:italic;margin:.3em 0 1em}.legend{font-weight:bold}"
        ".legend,.reconstruction{background:#f6f6f6;padding:.5em}"
        "pre{background:#f6f6f6;padding:1em;white-space:pre-wrap}</style></head><body>"
        + header
        + "".join(sections)
        + f"<details><summary>Text summary</summary><pre>{esc(trace.summary())}</pre></details></body></html>"
    )


def comparison_heatmaps(a: Tensor, b: Tensor, title: str = "", **layout) -> go.Figure:
    """Two layer x head grids side by side on one symmetric RdBu scale, and their difference b - a.

    a and b share `zmin`/`zmax`, so one colour means one value in both; b - a has its own symmetric
    scale (blue: b pushes more toward the answer than a).
    """
    from plotly.subplots import make_subplots

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
    from plotly.subplots import make_subplots

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
    from plotly.subplots import make_subplots

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
    from plotly.subplots import make_subplots

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
