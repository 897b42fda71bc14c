"""The explorer's tabs of results: their widgets, and how one row of a trace is drawn into them."""

from __future__ import annotations

import html

import ipywidgets as w

from tracelib.ood import KINDS, WHERES
from tracelib.plotting import SIGN_CAPTION, _without_caption
from tracelib.plotting.report import ROUTES_HOW_TO_READ, route_verdict_sentence
from tracelib.widgets.captions import _route_edges
from tracelib.widgets.drawing import _LABELLED, _figure, _reference_dropdown, _replace, _table

TAB_TITLES = ("Margin", "Lens", "DLA", "Heads", "Neurons", "Positions", "Routes", "Patching", "Compare")
DLA_UNITS = ("component", "layer", "head", "neuron")
# How many tokens (junk strings, typo edits) the Patching tab injects by default. With one, nearly
# every injection barely moves the bundled model's answer, so the tab would only say "nothing to recover".
PATCH_N = 3
PATCH_NOTE = (
    "Injects OOD tokens into the prompt, then patches the clean residual stream (<code>resid_pre</code>) "
    "into the injected run, layer by position. 1 = clean margin recovered."
)
# The Routes tab's starting threshold: `tl.routes`'s default, the paper's 0.04.
ROUTES_THRESHOLD = 0.04
# How many of the route's edges the Routes tab lists.
ROUTES_K = 8
ROUTES_NOTE = (
    "How the answer travels to the last position: the information-flow route (Ferrando &amp; Voita 2024) "
    "from one forward pass, computed when you open this tab. The <b>threshold</b> is the least importance "
    "an edge needs to stay on the route (its share of the node it feeds); raise it to see only the main paths."
)
COMPARE_NOTE = (
    "Compares the trace on show (b) with a reference saved from the same model (a): b &minus; a unit by unit, "
    "how much the top contributors overlap, how alike the units rank. To compare two models, use "
    "<code>tl.compare</code>."
)


def _spaced(table: str) -> str:
    """An HTML table with room between its columns: its cells ("' '@7 L0 mid") are words, not numbers."""
    return table.replace("<table ", '<table style="border-collapse:separate;border-spacing:16px 2px" ', 1)


class ResultTabs:
    """The `Tab` of results and the widgets in it; `Explorer` builds on it with the inputs and the actions.

    Each tab holds a Box whose children are replaced (and the old ones closed) on every update. The
    `_draw_*` methods draw what they are given and keep no state of their own; the explorer wires the
    dropdowns and buttons to its actions.

    Attributes:
        tabs: the `Tab`, titled as `TAB_TITLES`.
        margin_box, lens_box, dla_box, heads_grid, positions_box: each tab's figures (and tables).
        dla_unit: the DLA tab's unit dropdown (`DLA_UNITS`).
        neurons_box: an `HTML` with the top neurons' table.
        head_layer, head_head: the Heads tab's dropdowns.
        head_source, head_pattern: the selected head's source decomposition (an `Output` in a `Box`)
            and its circuitsvis attention pattern (an `HTML`).
        patch_kind, patch_n, patch_where, patch_button, patch_progress: the Patching tab's inputs:
            what to inject, how many (default `PATCH_N`), where, and the button that runs it.
        patch_note, patch_box: what the Patching tab says, and its result.
        routes_note, routes_threshold, routes_box: the Routes tab's note, its threshold (default
            `ROUTES_THRESHOLD`), and the route on show: its verdict, figure and top edges, or why there is none.
        compare_select, compare_box: the Compare tab's reference dropdown, and the comparison's table and figure.
    """

    def __init__(self, reference_labels=()):
        self.margin_box = w.VBox()
        self.lens_box = w.VBox()
        self.dla_unit = w.Dropdown(options=DLA_UNITS, value="component", description="DLA by")
        self.dla_box = w.VBox()
        self.head_layer = w.Dropdown(options=[0], value=0, description="Layer", layout=w.Layout(width="180px"))
        self.head_head = w.Dropdown(options=[0], value=0, description="Head", layout=w.Layout(width="180px"))
        self.heads_grid = w.Box()
        self.head_source = w.Box()
        self.head_pattern = w.HTML(value="")
        self.neurons_box = w.HTML(value="")
        self.positions_box = w.VBox()

        self.patch_kind = w.Dropdown(options=KINDS, value="junk", description="Inject", layout=w.Layout(width="220px"))
        self.patch_n = w.BoundedIntText(
            value=PATCH_N,
            min=1,
            max=20,
            description="How many",
            tooltip="how many tokens, junk strings or typo edits to inject",
            layout=w.Layout(width="150px"),
        )
        self.patch_where = w.Dropdown(
            options=WHERES, value="after", description="Where", layout=w.Layout(width="220px")
        )
        # Sized to its label: in a row of fixed-width inputs a default-width button is squeezed.
        self.patch_button = w.Button(
            description="Run patching", icon="play", layout=w.Layout(width="auto", min_width="140px", flex="0 0 auto")
        )
        self.patch_progress = w.IntProgress(value=0, min=0, max=2, description="", layout=w.Layout(width="140px"))
        self.patch_note = w.HTML(value=PATCH_NOTE)
        self.patch_box = w.VBox()

        self.routes_note = w.HTML(value=ROUTES_NOTE)
        self.routes_threshold = w.BoundedFloatText(
            value=ROUTES_THRESHOLD,
            min=0.01,
            max=1.0,
            step=0.01,
            description="Threshold",
            tooltip="the least importance an edge needs to stay on the route, 0.01 to 1",
            style=_LABELLED,
            layout=w.Layout(width="200px"),
        )
        self.routes_box = w.VBox()

        self.compare_select = _reference_dropdown("Compare with", reference_labels, width="100%", max_width="480px")
        self.compare_box = w.VBox()
        self.tabs = w.Tab(
            children=[
                self.margin_box,
                self.lens_box,
                w.VBox([self.dla_unit, self.dla_box]),
                w.VBox(
                    [
                        w.HTML("Pick a layer and a head to see where it reads from."),
                        self.heads_grid,
                        w.HBox([self.head_layer, self.head_head]),
                        self.head_source,
                        self.head_pattern,
                    ]
                ),
                self.neurons_box,
                self.positions_box,
                w.VBox([self.routes_note, self.routes_threshold, self.routes_box]),
                w.VBox(
                    [
                        self.patch_note,
                        w.HBox(
                            [self.patch_kind, self.patch_n, self.patch_where, self.patch_button, self.patch_progress],
                            layout=w.Layout(flex_flow="row wrap", align_items="center"),
                        ),
                        self.patch_box,
                    ]
                ),
                w.VBox([w.HTML(COMPARE_NOTE), self.compare_select, self.compare_box]),
            ]
        )
        for i, title in enumerate(TAB_TITLES):
            self.tabs.set_title(i, title)

    def _draw_row(self, trace, row: int) -> None:
        """Draw every tab that needs only the trace for `row`: all but the selected head, Patching and Compare."""
        m = trace.margin
        _replace(self.margin_box, [_figure(m.plot(row)), w.HTML(_table(m.top(5, row)))])
        _replace(self.lens_box, [_figure(trace.lens.plot(row))])
        self._draw_dla(trace, row)
        _replace(self.heads_grid, [_figure(trace.heads.plot(row))])
        self.neurons_box.value = "<b>Top neurons by |DLA|</b>" + _table(trace.dla.top(10, "neuron", row))
        _replace(self.positions_box, [_figure(trace.positions.plot(row))])

    def _draw_dla(self, trace, row: int) -> None:
        _replace(self.dla_box, [_figure(trace.dla.plot(self.dla_unit.value, row))])

    def _draw_head_sources(self, sources) -> None:
        # The grid above says what the colours mean; the tab says it once.
        _replace(self.head_source, [_figure(_without_caption(sources.plot(), SIGN_CAPTION))])

    def _draw_patching(self, result, injected_prompt: str) -> None:
        shown = [w.HTML(f"<b>injected prompt</b>: <code>{html.escape(repr(injected_prompt))}</code>")]
        if result.weak_effect:
            # Recovery divides by Δ; here that is noise, so the tab leads with what happened instead.
            shown.append(
                w.HTML(
                    f"<b>This corruption barely changes the answer (Δ = {result.delta:+.3f}): nothing to recover.</b> "
                    f"The logit difference moves from {result.clean_metric:+.3f} to {result.corrupted_metric:+.3f}. "
                    "Try more tokens, or another kind or place of injection; below, the raw change of the logit "
                    "difference each patch makes (not recovery)."
                )
            )
        _replace(self.patch_box, [*shown, _figure(result.plot())])

    def _draw_routes(self, routes) -> None:
        """The route's verdict (what it means, and why), its figure, how to read it, and its strongest edges."""
        sentence = html.escape(route_verdict_sentence(routes))
        head, _, rest = sentence.partition(". ")  # "Verdict: copied" in bold, the rest as written
        shown = [
            w.HTML(f'<p style="font-size:1.1em"><b>{head}.</b> {rest}</p>'),
            _figure(routes.plot()),
            w.HTML(f'<p style="color:#444">{html.escape(ROUTES_HOW_TO_READ)}</p>'),
            w.HTML(
                "<b>The route's strongest head and MLP edges</b> (the residual stream's, which carry each "
                "node up its own column, are left out)" + _spaced(_table(_route_edges(routes, ROUTES_K)))
            ),
        ]
        _replace(self.routes_box, shown)

    def _draw_routes_message(self, message: str) -> None:
        """Say in the Routes tab why it shows no route (`message` is HTML)."""
        _replace(self.routes_box, [w.HTML(message)])

    def _draw_comparison(self, comparison) -> None:
        shown = [] if comparison is None else [w.HTML(_table(comparison.stats())), _figure(comparison.plot("head"))]
        _replace(self.compare_box, shown)

    def _clear_tabs(self) -> None:
        """Empty the tabs `_draw_row`, `_draw_head_sources` and `_draw_routes` draw, and the head's pattern."""
        boxes = (
            self.margin_box,
            self.lens_box,
            self.dla_box,
            self.heads_grid,
            self.head_source,
            self.positions_box,
            self.routes_box,
        )
        for box in boxes:
            _replace(box)
        self.head_pattern.value = self.neurons_box.value = ""
