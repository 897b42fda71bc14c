"""What the explorer writes about a trace: the step selector's entries, the answer's resolution, notes, and
the Routes tab's table of edges."""

from __future__ import annotations

import html

import pandas as pd

from tracelib.formats import fmt_prob, token_labels


def _step_label(trace, row: int) -> str:
    """A step selector entry: `step 2 of 2: '2', after the prompt + '1'` (or the row's label)."""
    r = trace.rows[row]
    if r.n_steps == 1 or len({x.prompt for x in trace.rows}) > 1:
        return r.label
    forced = trace.rows[row - r.step : row]
    after = " + ".join(["the prompt", *(repr(x.target_str) for x in forced)])
    return f"step {r.step + 1} of {r.n_steps}: {r.target_str!r}, after {after}"


def _multi_token_note(resolved, what: str = "Patching explains", to_do: str = "to patch") -> str:
    """Why the Patching tab (or the Routes tab) does not run for `resolved`, an answer of several tokens."""
    tokens = ", ".join(repr(t) for t in resolved.answer_str_tokens)
    return (
        f"{what} a single-token answer; {resolved.typed_answer!r} is "
        f"{len(resolved.answer_tokens)} tokens ({tokens}). The other tabs show each step; {to_do}, "
        "submit an answer of one token."
    )


def _routes_note(resolved) -> str:
    """Why the Routes tab draws no route for `resolved`, an answer of several tokens."""
    return _multi_token_note(resolved, "A route explains how the model reaches one token: it needs", "to see a route")


def _route_node(labels: list[str], layer: int, kind: str, pos: int) -> str:
    """A route's node in words, as the figure's hover writes it: `'1'@3 L2 pre`, `' '@7 final`."""
    return f"{labels[pos]} final" if kind == "final" else f"{labels[pos]} L{layer} {kind}"


def _route_edges(routes, k: int) -> pd.DataFrame:
    """The route's k most important head and MLP edges, for the Routes tab's table: through what,
    from, to, importance. The residual connections are left out: they carry each node up its own
    column, and would fill the table (they are most of most nodes' sum).

    Importance is a share of the node fed (0 to 1, never negative): written unsigned, three decimals.
    """
    labels = token_labels(routes.str_tokens)
    route = routes.route
    top = route[route["via"] != "residual"].head(k)
    via = [
        f"head L{int(layer)}H{int(head)}" if kind == "head" else ("MLP" if kind == "mlp" else "residual stream")
        for layer, head, kind in zip(top["dst_layer"], top["head"], top["via"])
    ]
    return pd.DataFrame(
        {
            "through": via,
            "from": [_route_node(labels, *node) for node in zip(top["src_layer"], top["src_kind"], top["src_pos"])],
            "to": [_route_node(labels, *node) for node in zip(top["dst_layer"], top["dst_kind"], top["dst_pos"])],
            "importance": [fmt_prob(v) for v in top["importance"]],
        }
    )


def _resolution_html(trace, row: int, resolved) -> str:
    """The tokens the model read at `row` and how the answer was split (`resolved`; None for a saved reference)."""
    r = trace.rows[row]
    tokens = f"<code>{html.escape(repr(r.str_tokens))}</code>"
    if r.step:  # a later step reads the prompt and the answer's tokens before it
        forced = ", ".join(html.escape(repr(t)) for t in r.str_tokens[-r.step :])
        head = f"<b>{len(r.str_tokens)} tokens</b>, the prompt then the answer's {forced} (teacher-forced)"
    else:
        head = f"<b>{len(r.str_tokens)} prompt tokens</b>"
    lines = [f"{head}: {tokens}"]
    if resolved is not None:
        several = len(resolved.answer_str_tokens) > 1
        split = ", ".join(  # the step on show in bold
            f"<b>{html.escape(repr(t))}</b>" if several and i == r.step else html.escape(repr(t))
            for i, t in enumerate(resolved.answer_str_tokens)
        )
        lines.append(f"<b>answer tokens</b>: [{split}]")
        if resolved.moved_whitespace:
            lines.append(
                f"moved whitespace into the prompt: <code>{html.escape(repr(resolved.moved_whitespace))}</code>"
            )
        lines += [html.escape(note) for note in resolved.notes]
    else:
        lines.append(f"<b>answer</b>: <code>{html.escape(repr(r.target_str))}</code> (saved reference)")
    distractors = ", ".join(html.escape(repr(d)) for d in trace.margin.distractor_strs[row])
    lines.append(f"<b>distractors</b>: {distractors or '(the strongest rival)'}")
    return "<br>".join(lines)
