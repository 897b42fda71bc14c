"""The one-page HTML report of a trace: its figures and sentences, in reading order."""

from __future__ import annotations

import html

from tracelib.formats import (
    LENS_NAMES,
    READABLE_PROB,
    token_labels,
)
from tracelib.identity import check_same_model
from tracelib.plotting.style import SIGN_CAPTION, _without_caption, component_label
from tracelib.plotting.trace_views import MARGIN_CAPTION, neuron_strip

# What each of `Routes.verdict()`'s verdicts means, for a reader who has not read the paper ({at}: the
# position the route explains, `'='@7`).
ROUTE_VERDICTS = {
    "copied": "attention heads bring the answer to {at} ready-made from one earlier token",
    "computed in place": "the route never reads another token: {at}'s own MLPs, and heads that attend to "
    "{at} itself, build the answer there",
    "assembled": "attention heads bring information from earlier tokens to {at}, and the answer is built there from it",
}
ROUTES_HOW_TO_READ = (
    "How to read it: positions run across, layers up. Each node is the residual stream at one position: "
    "entering a layer (pre), after its attention (mid), or at the end (final). Each line is an edge the "
    "prediction relies on, as wide as its importance (its share of the node it feeds): dark grey lines are "
    "attention heads (the only edges that move information between tokens), brown lines MLPs, light grey "
    "lines the residual stream carrying on. Edges under the threshold are left out; hover for the numbers."
)


def route_verdict_sentence(routes) -> str:
    """The route's verdict, what it means and why, as one sentence (`Verdict: copied. Attention heads ...`)."""
    verdict, reason = routes.verdict()
    at = token_labels(routes.str_tokens)[routes.position]
    meaning = ROUTE_VERDICTS.get(verdict, "").format(at=at)
    meaning = f" {meaning[:1].upper()}{meaning[1:]}:" if meaning else " Why:"
    return f"Verdict: {verdict}.{meaning} {reason}."


def _prediction_line(trace, row: int) -> str:
    m = trace.margin
    rank = int(m.rank[row])
    verdict = "the model predicts it" if rank == 0 else f"the model does not predict it (rank {rank})"
    return (
        f"top prediction {m.top_strs[row][0]!r} (p={m.top_probs[row, 0].item():.3f}); answer "
        f"{m.answers[row]!r}: {verdict}, p={m.prob[row].item():.3f}, logit difference "
        f"{m.logit_diff[row].item():+.3f} against {', '.join(repr(d) for d in m.distractor_strs[row])}"
    )


def report_figures(trace, row: int = 0, routes=None) -> list[dict]:
    """The report's workflow steps, in order: id, heading, what it shows, figures, caption.

    Args:
        trace: the `Trace` to report.
        row: its row (the answer token) to report.
        routes: the row's `Routes` (`tl.routes` of the same prompt, answer and model), already
            computed: plotting computes no step. With it the report gains a Routes section.

    Raises:
        ValueError: `routes` explain another prompt or answer than the row.
        ModelMismatchError: `routes` come from another model than the trace.
    """

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
    if routes is not None:
        steps.append(routes_step(trace, row, routes, number=len(steps) + 1))
    # Each section says how to read its colours once, in its caption; the titles above would repeat it.
    for step in steps:
        for fig in step["figures"]:
            _without_caption(_without_caption(fig, SIGN_CAPTION), MARGIN_CAPTION)
    return steps


def routes_step(trace, row: int, routes, number: int) -> dict:
    """The report's Routes section: the route's figure, its verdict as the caption, and how to read it."""
    label = trace.rows[row].label
    if routes.row_label != label:
        raise ValueError(
            f"the routes explain {routes.row_label}, but the report is about {label}: compute them with "
            "tl.routes on the same prompt and answer"
        )
    check_same_model(routes.identity, trace.identity, "the route", "the trace")
    at = token_labels(routes.str_tokens)[routes.position]
    return dict(
        id="routes",
        heading=f"{number}. Routes: how the answer travels to {at}",
        text="The information-flow route (Ferrando & Voita 2024) from one forward pass: the paths through "
        f"heads, MLPs and the residual stream that carry the prediction at {at}, keeping edges with at least "
        f"{routes.threshold:.2f} of the importance into their node. Nodes are coloured by their DLA.",
        figures=[routes.plot()],
        caption=f"{route_verdict_sentence(routes)} {SIGN_CAPTION}",
        extra=ROUTES_HOW_TO_READ,
        extra_class="how-to-read",
        height=None,  # one band per layer: a deep model's route needs its own height
    )


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


def report_html(trace, row: int = 0, routes=None) -> str:
    """A standalone HTML report of one trace, one section per workflow step, that opens offline.

    plotly.js is inlined once (with the first figure); the text summary sits in a collapsed block.

    Args:
        trace: the `Trace` to report.
        row: its row (the answer token) to report.
        routes: the row's `Routes` (`tl.routes`), already computed; given, the report gains a
            Routes section after Positions (the CLI computes them for a one-token answer).
    """

    esc = html.escape
    steps = report_figures(trace, row, routes)
    row_ = trace.rows[row]
    n_figures = 0
    sections = []
    for step in steps:
        figures = []
        for fig in step["figures"]:
            if step.get("height", 440):
                fig.update_layout(height=step.get("height", 440))
            figures.append(
                fig.to_html(full_html=False, include_plotlyjs=(n_figures == 0), config={"displaylogo": False})
            )
            n_figures += 1
        extra_class = step.get("extra_class", "reconstruction")
        extra = f'<p class="{extra_class}">{esc(step["extra"])}</p>' if "extra" in step else ""
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
        ".legend,.reconstruction,.how-to-read{background:#f6f6f6;padding:.5em}"
        "pre{background:#f6f6f6;padding:1em;white-space:pre-wrap}</style></head><body>"
        + header
        + "".join(sections)
        + f"<details><summary>Text summary</summary><pre>{esc(trace.summary())}</pre></details></body></html>"
    )
