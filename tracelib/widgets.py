"""The ipywidgets explorer: type a prompt and an answer, see every step of the trace in tabs.

`tl.explore(model)` returns an `Explorer`; end a notebook cell with it (or with `app.widget`) to
show it. Every widget is a plain ipywidgets widget (figures go into `Output`s), so it runs in JupyterLab,
Notebook 7 and Colab (after `tl.setup_notebook()` enabled Colab's widget manager), and can be
driven from code: set `app.prompt.value`, call `app.submit()`, read `app.current`.

ipywidgets keeps every widget it ever made alive (in `ipywidgets.widgets.widget._instances`) until
`.close()` is called on it, and a widget's layout and style are widgets of their own. So the app
closes every widget it replaces, with all it holds (`_close`): before, 100 identical submits left
1,500 widgets, and their figures, behind.
"""

from __future__ import annotations

import html
import operator
import time
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

import ipywidgets as w
from IPython import get_ipython
from IPython.display import display

from tracelib.answers import MultiTokenAnswerError, chat_prompt, resolve_answer
from tracelib.compare import compare
from tracelib.formats import fmt_prob, fmt_value
from tracelib.identity import check_model_arg, check_same_model, weights_fingerprint
from tracelib.models import model_name
from tracelib.ood import KINDS, WHERES, inject
from tracelib.patching import WeakCorruptionWarning, patch
from tracelib.plotting import SIGN_CAPTION, _without_caption
from tracelib.reference import load_reference
from tracelib.trace import Trace, trace

TAB_TITLES = ("Margin", "Lens", "DLA", "Heads", "Neurons", "Positions", "Patching", "Compare")
# Traces kept for inputs seen before, least recently used dropped first: a real model's trace holds
# its lens over the whole vocabulary, so an unbounded cache grows with every new input.
CACHE_SIZE = 32
DLA_UNITS = ("component", "layer", "head", "neuron")
# How many tokens (junk strings, typo edits) the Patching tab injects by default. With one, nearly
# every injection barely moves the bundled model's answer, so the tab would only say "nothing to recover".
PATCH_N = 3
# Errors the library raises on bad input; anything else is a bug and should surface as one.
_INPUT_ERRORS = (ValueError, TypeError, FloatingPointError, OSError)
# One description width for the labelled inputs, so their boxes line up under each other.
_LABELLED = {"description_width": "90px"}
PATCH_NOTE = (
    "Injects OOD tokens into the prompt, then patches the clean residual stream (<code>resid_pre</code>) "
    "into the injected run, layer by position. 1 = clean margin recovered."
)
COMPARE_NOTE = (
    "Compares the trace on show (b) with a reference saved from the same model (a): b &minus; a unit by unit, "
    "how much the top contributors overlap, how alike the units rank. To compare two models, use "
    "<code>tl.compare</code>."
)


class SelectionError(ValueError):
    """The explorer was asked to show a head, step or reference it does not have; the message lists what it has."""


def _index(value) -> int | None:
    """`value` as an index (an int, a numpy or torch integer), or None for anything else (1.5, "1", None)."""
    try:
        return operator.index(value)
    except TypeError:
        return None


def _models(models, has_references: bool) -> dict:
    """A name -> model dict from one model, a list of models, or a dict; each must be a loaded model.

    None is allowed only when there are references to open without a model.
    """
    if models is None and has_references:
        return {}
    if isinstance(models, dict):
        named = dict(models)
        for model in named.values():
            check_model_arg(model, "explore")
    else:
        listed = list(models) if isinstance(models, (list, tuple)) else [models]
        for model in listed:
            check_model_arg(model, "explore")
        named = {model_name(m): m for m in listed}
    if not named and not has_references:
        check_model_arg(models, "explore")  # an empty list or dict: say what to pass
    return named


def _references(reference) -> dict:
    """A label -> loaded Trace dict from a path, a Trace, or a list of either."""
    if reference is None:
        return {}
    if isinstance(reference, (str, Path, Trace)):
        reference = [reference]
    out = {}
    for ref in reference:
        if isinstance(ref, Trace):
            out[f"{ref.model_name}: {ref.rows[0].label}"] = ref
        else:
            out[str(ref)] = load_reference(ref)
    return out


def _table(frame) -> str:
    """A DataFrame as a small HTML table, in the package's number format: probabilities `0.999`,
    logits and attributions `+1.234`. Token columns arrive already written with repr (`'7'`)."""
    floats = frame.select_dtypes("float").columns
    formatters = {c: fmt_prob if c == "prob" else fmt_value for c in floats}
    return frame.to_html(index=False, formatters=formatters, border=0)


def _figure(fig):
    """A widget showing a plotly figure: an `Output` that displays it through the notebook's renderer.

    Not a `FigureWidget`: on plotly 6 and later each one ships its own copy of plotly.js (5 MB) to
    the browser, so a submit that rebuilds six figures took 8-10 s in JupyterLab (measured by
    tests/test_browser.py) against well under 1 s of work in the kernel. Heads are picked with the
    layer and head dropdowns instead of a click on the grid. The figure is kept as `.figure`.
    """
    widget = w.Output()
    if get_ipython() is not None:  # outside a kernel, display() would print to stdout
        with widget:
            fig.show()
    widget.figure = fig
    return widget


def _close(widget) -> None:
    """Close a widget the app no longer shows, and everything it holds: its children, layout and style.

    ipywidgets keeps a widget (and whatever it refers to, a figure included) until it is closed;
    dropping it from a box's children only hides it.
    """
    for child in getattr(widget, "children", ()):
        _close(child)
    for part in (getattr(widget, "layout", None), getattr(widget, "style", None)):
        if isinstance(part, w.Widget):
            part.close()
    widget.close()


def _replace(box, children=()) -> None:
    """Show `children` in `box`, closing the children they replace."""
    old, box.children = box.children, tuple(children)
    for child in old:
        if not any(child is new for new in box.children):
            _close(child)


_ONLINE: list[bool] = []


def _pattern_source(view) -> str:
    """circuitsvis's HTML: loading its script from the CDN when online (1 kB), inlined when offline (1.3 MB).

    circuitsvis decides the same way for `_repr_html_`, but asks the network every time; the
    explorer asks once per session, since every head selection sends the HTML to the browser.
    """
    if not _ONLINE:
        from circuitsvis.utils.render import internet_on

        _ONLINE.append(internet_on())
    return view.cdn_src if _ONLINE[0] else view.local_src


def _step_label(trace, row: int) -> str:
    """A step selector entry: `step 2 of 2: '2', after the prompt + '1'` (or the row's label)."""
    r = trace.rows[row]
    if r.n_steps == 1 or len({x.prompt for x in trace.rows}) > 1:
        return r.label
    forced = trace.rows[row - r.step : row]
    after = " + ".join(["the prompt", *(repr(x.target_str) for x in forced)])
    return f"step {r.step + 1} of {r.n_steps}: {r.target_str!r}, after {after}"


def _text_box(description: str, placeholder: str, max_width: str):
    """An input of the app: labelled like the others, as wide as the app allows up to `max_width`."""
    return w.Text(
        value="",
        description=description,
        placeholder=placeholder,
        style=_LABELLED,
        layout=w.Layout(width="100%", max_width=max_width),
    )


class Explorer:
    """An ipywidgets app over `tl.trace`: one trace per new input, cached, shown in tabs.

    A multi-token answer (`" 12"`) is traced one teacher-forced step per token, as `tl.trace` does;
    the Step dropdown then picks the step every tab shows. Patching needs a single-token answer.

    Every action is a method (`submit`, `select_step`, `select_head`, `open_reference`,
    `compare_reference`, `save`, `run_patching`), called by its widget or from code alike. None
    raises on bad input: each shows the message in `error` (a head, step or reference the app does
    not have is a `SelectionError` that lists what it has), leaves what is on show as it was, and
    returns None. The last `CACHE_SIZE` traces are cached, the least recently used dropped first.

    Attributes:
        widget: the top container; display it (or the `Explorer`) to show the app.
        prompt, answer, distractors: the input `Text` widgets.
        model_select, chat, reference_select, submit_button: the other inputs.
        step_select: a `Dropdown` of the trace's rows (one per answer token), shown when there are several.
        prediction: a `Label` with the model's top prediction at the chosen step (repr of the token).
        resolution: an `HTML` with the answer's resolution (prompt tokens, answer split).
        status: a `Label` that says "tracing..." while busy, then what was done.
        error: an `HTML` with the library's message in red; its value is '' when all is well. A failed
            submit also clears the results of the one before, so none are left under the message.
        tabs: the `Tab` of results, titled as `TAB_TITLES`.
        compare_select, compare_box: the Compare tab's reference dropdown, and the comparison's table and figure.
        comparison: the `tl.Comparison` on show in the Compare tab (reference = a, trace on show = b), or None.
        current: the `Trace` on show (None before the first submit, and after a failed one).
        current_model: the model of `current`, None for a saved reference.
        row: the row of `current` on show (the step selector's value).
        n_traces: how many times `tl.trace` ran (cached inputs do not run it again).
        selected_head: the (layer, head) on show in the Heads tab.
        head_source, head_pattern: the selected head's source decomposition (an `Output` in a
            `Box`) and its circuitsvis attention pattern (an `HTML`).
        head_sources: the selected head's `tl.HeadSources`.
        patch_kind, patch_n, patch_where, patch_button, patch_progress: the Patching tab's inputs:
            what to inject, how many (default `PATCH_N`), where, and the button that runs it.
        patch_result: the last `tl.PatchingResult` of the Patching tab (reset on every submit).
    """

    def __init__(self, models=None, reference=None):
        self.references = _references(reference)
        self.models = _models(models, has_references=bool(self.references))
        self._cache: OrderedDict[tuple, Trace] = OrderedDict()
        self.n_traces = 0
        self.current = None
        self.current_model = None
        self.selected_head = None
        self.head_sources = None
        self.patch_result = None
        self.comparison = None
        self._compare_label = ""  # the reference of `comparison`: what compare_select shows
        self._quiet = False  # True while the app sets its own inputs: their callbacks stay silent
        self._resolved = None
        self._prompt_used = None
        self._distractors_used = None

        self.prompt = _text_box("Prompt", "what is 1 + 1", "720px")
        self.answer = _text_box("Answer", '" 2" (leading space kept)', "360px")
        self.distractors = _text_box("Distractors", "comma-separated, optional", "480px")
        names = list(self.models)
        self.model_select = w.Dropdown(
            options=names,
            value=names[0] if names else None,
            description="Model",
            style=_LABELLED,
            layout=w.Layout(width="360px"),
        )
        self.chat = w.Checkbox(value=False, description="chat template", indent=False, layout=w.Layout(width="140px"))
        self.reference_select = w.Dropdown(
            options=[("(none)", "")] + [(k, k) for k in self.references],
            value="",
            description="Reference",
            style=_LABELLED,
            layout=w.Layout(width="360px"),
        )
        self.submit_button = w.Button(
            description="Submit", button_style="primary", icon="play", layout=w.Layout(width="auto", min_width="110px")
        )
        self.status = w.Label(value="")
        self.prediction = w.Label(value="")
        self.resolution = w.HTML(value="")
        self.error = w.HTML(value="")
        self.step_select = w.Dropdown(
            options=[("step 1", 0)],
            value=0,
            description="Step",
            style=_LABELLED,
            layout=w.Layout(width="100%", max_width="720px", display="none"),
        )
        self.save_path = w.Text(
            value="",
            description="Save to",
            placeholder="folder for trace.save()",
            style=_LABELLED,
            layout=w.Layout(width="100%", max_width="480px"),
        )
        self.save_button = w.Button(description="Save reference", icon="save", layout=w.Layout(width="auto"))
        self.save_status = w.Label(value="")

        self.submit_button.on_click(lambda _: self.submit())
        self.save_button.on_click(lambda _: self.save())
        self.model_select.observe(lambda _: self._update_chat(), names="value")
        self.reference_select.observe(self._on_reference, names="value")
        self.step_select.observe(self._on_step, names="value")
        self._update_chat()
        if not self.models:
            self.submit_button.disabled = True

        # Tabs: each holds a Box whose children are replaced on every update.
        self.margin_box = w.VBox()
        self.lens_box = w.VBox()
        self.dla_unit = w.Dropdown(options=DLA_UNITS, value="component", description="DLA by")
        self.dla_unit.observe(lambda _: self._render_dla(), names="value")
        self.dla_box = w.VBox()
        self.head_layer = w.Dropdown(options=[0], value=0, description="Layer", layout=w.Layout(width="180px"))
        self.head_head = w.Dropdown(options=[0], value=0, description="Head", layout=w.Layout(width="180px"))
        for dropdown in (self.head_layer, self.head_head):
            dropdown.observe(self._on_head_dropdown, names="value")
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
        self.patch_button.on_click(lambda _: self.run_patching())
        self.patch_progress = w.IntProgress(value=0, min=0, max=2, description="", layout=w.Layout(width="140px"))
        self.patch_note = w.HTML(value=PATCH_NOTE)
        self.patch_box = w.VBox()

        self.compare_select = w.Dropdown(
            options=[("(none)", "")] + [(k, k) for k in self.references],
            value="",
            description="Compare with",
            style=_LABELLED,
            layout=w.Layout(width="100%", max_width="480px"),
        )
        self.compare_select.observe(self._on_compare, names="value")
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

        self.widget = w.VBox(
            [
                self.prompt,
                self.answer,
                self.distractors,
                w.HBox([self.model_select, self.chat, self.reference_select], layout=w.Layout(flex_flow="row wrap")),
                w.HBox([self.submit_button, self.status], layout=w.Layout(align_items="center")),
                self.error,
                w.HBox([w.Label("Prediction:"), self.prediction]),
                self.resolution,
                self.step_select,
                self.tabs,
                w.HBox([self.save_path, self.save_button, self.save_status], layout=w.Layout(align_items="center")),
            ]
        )

    # Display ------------------------------------------------------------------------------------

    def _ipython_display_(self) -> None:
        display(self.widget)

    def close(self) -> None:
        """Close every widget of the app, so ipywidgets lets them (and their figures) go; it cannot be shown again."""
        _close(self.widget)

    def __repr__(self) -> str:
        shown = (
            f"{self.current.model_name}: {self.current.rows[self.row].label}"
            if self.current is not None
            else "nothing yet"
        )
        return f"Explorer({len(self.models)} model(s), {len(self.references)} reference(s); showing {shown})"

    # Inputs -------------------------------------------------------------------------------------

    @property
    def model(self):
        """The model chosen in the dropdown (None when only references were given)."""
        return self.models.get(self.model_select.value)

    @property
    def row(self) -> int:
        """The row of the trace on show: the step chosen in the step selector (0 for a one-token answer)."""
        return int(self.step_select.value or 0)

    def _update_chat(self) -> None:
        model = self.model
        has_template = model is not None and bool(getattr(model.tokenizer, "chat_template", None))
        self.chat.disabled = not has_template
        if not has_template:
            self.chat.value = False

    def _distractor_list(self) -> list[str] | None:
        """Comma-separated distractors, each written the way the answer is (a leading space if it has one)."""
        pieces = [p.strip() for p in self.distractors.value.split(",") if p.strip()]
        if not pieces:
            return None
        lead = self.answer.value[: len(self.answer.value) - len(self.answer.value.lstrip())]
        return [lead + p for p in pieces]

    def _fail(self, exc: BaseException) -> None:
        self.error.value = f'<span style="color:#b00020"><b>{type(exc).__name__}</b>: {html.escape(str(exc))}</span>'
        self.status.value = "failed"

    @contextmanager
    def _quietly(self):
        """Set inputs from code without running their callbacks: the app moves them, not the user."""
        before, self._quiet = self._quiet, True
        try:
            yield
        finally:
            self._quiet = before

    def _reference(self, label: str) -> Trace:
        if label not in self.references:
            have = ", ".join(repr(k) for k in self.references) or "none (pass reference= to tl.explore)"
            raise SelectionError(f"No reference {label!r}: the references given to the explorer are {have}.")
        return self.references[label]

    def _on_show(self, what: str) -> Trace:
        if self.current is None:
            raise SelectionError(f"Nothing on show to {what}: submit a prompt (or open a reference) first.")
        return self.current

    # Actions ------------------------------------------------------------------------------------

    def submit(self) -> None:
        """Trace the inputs (or take them from the cache) and update every tab: the Submit button.

        A failed submit shows the library's message and clears what the one before showed.
        """
        self.error.value = ""
        model, name = self.model, self.model_select.value
        if model is None:
            self._clear()
            self._fail(ValueError("No model to trace with: explore() was given saved references only."))
            return
        start = time.perf_counter()
        self.status.value = "tracing..."
        self.submit_button.disabled = True
        try:
            prompt = self.prompt.value
            if self.chat.value:
                prompt = chat_prompt(model, prompt)
            distractors = self._distractor_list()
            resolved = resolve_answer(model, prompt, self.answer.value)
            # The fingerprint, so a model whose weights changed in place since is traced afresh.
            answer, chat, fingerprint = self.answer.value, self.chat.value, weights_fingerprint(model)
            key = (name, fingerprint, prompt, answer, tuple(distractors or ()), chat)
            cached = key in self._cache
            if cached:
                self._cache.move_to_end(key)
            else:
                self._cache[key] = trace(model, prompt, self.answer.value, distractors)
                self.n_traces += 1
                while len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
            self._resolved, self._prompt_used, self._distractors_used = resolved, prompt, distractors
            self._show(self._cache[key], model)
            self.status.value = f"{'from cache' if cached else 'traced'} in {time.perf_counter() - start:.2f} s"
        except _INPUT_ERRORS as exc:
            self._clear()
            self._fail(exc)
        finally:
            self.submit_button.disabled = not self.models

    def open_reference(self, label: str) -> Trace | None:
        """Show a saved reference's tabs, with no model (the Reference dropdown); returns it.

        An unknown label shows a `SelectionError` listing the references and changes nothing.
        """
        if not label:
            return None
        self.error.value = ""
        try:
            reference = self._reference(label)
        except _INPUT_ERRORS as exc:
            self._fail(exc)
            return None
        with self._quietly():  # called from code, the dropdown follows
            self.reference_select.value = label
        self._resolved, self._prompt_used, self._distractors_used = None, None, None
        self._show(reference, None)
        self.status.value = f"opened reference {label}"
        return reference

    def select_step(self, row: int) -> None:
        """Show one step of a multi-token answer (one row of the trace) in every tab: the Step dropdown.

        A step the trace does not have shows a `SelectionError` and changes nothing.
        """
        self.error.value = ""
        try:
            n_rows = len(self._on_show("pick a step of").rows)
            if _index(row) is None or not 0 <= _index(row) < n_rows:
                raise SelectionError(f"No step {row!r}: the trace on show has steps 0 to {n_rows - 1}.")
        except _INPUT_ERRORS as exc:
            self._fail(exc)
            return
        self.step_select.value = _index(row)

    def select_head(self, layer: int, head: int):
        """Show one head's source decomposition and attention pattern (the layer and head dropdowns).

        Returns the head's `tl.HeadSources`. A head the trace does not have shows a `SelectionError`
        and changes nothing.
        """
        self.error.value = ""
        try:
            n_layers, n_heads = self._on_show("pick a head of").heads.values.shape[:2]
            index = (_index(layer), _index(head))
            if None in index or not (0 <= index[0] < n_layers and 0 <= index[1] < n_heads):
                raise SelectionError(
                    f"No head (layer {layer!r}, head {head!r}): the trace on show has layers 0 to {n_layers - 1} "
                    f"and heads 0 to {n_heads - 1}."
                )
        except _INPUT_ERRORS as exc:
            self._fail(exc)
            return None
        layer, head = index
        self.selected_head = (layer, head)
        with self._quietly():
            self.head_layer.value, self.head_head.value = layer, head
        row = self.row
        self.head_sources = self.current.heads.source(layer, head, row)
        # The grid above says what the colours mean; the tab says it once.
        _replace(self.head_source, [_figure(_without_caption(self.head_sources.plot(), SIGN_CAPTION))])
        if self.current_model is None:
            self.head_pattern.value = (
                "<i>The attention pattern is recomputed with the model; a saved reference has none.</i>"
            )
            return self.head_sources
        try:
            view = self.current.heads.attention_view(heads=[(layer, head)], row=row, model=self.current_model)
        except _INPUT_ERRORS as exc:
            self.head_pattern.value = ""
            self._fail(exc)
            return self.head_sources
        # circuitsvis needs its script to run: an iframe's srcdoc runs it where innerHTML would not.
        self.head_pattern.value = (
            f'<iframe srcdoc="{html.escape(_pattern_source(view))}" style="width:100%;height:420px;border:0"></iframe>'
        )
        return self.head_sources

    def compare_reference(self, label: str):
        """Compare the trace on show (b) with a reference (a) in the Compare tab: its dropdown.

        Returns the `tl.Comparison`; `""` takes the comparison away. A reference saved from another
        model is refused (`tl.ModelMismatchError`, naming both), as is an unknown label
        (`SelectionError`): the message shows in the app and the comparison before stays.
        """
        self.error.value = ""
        if not label:
            self._set_comparison(None, "")
            return None
        try:
            comparison = self._compare(label)
        except _INPUT_ERRORS as exc:
            with self._quietly():  # picked in the dropdown: back to the comparison on show
                self.compare_select.value = self._compare_label
            self._fail(exc)
            return None
        self._set_comparison(comparison, label)
        return comparison

    def save(self, path=None) -> Path | None:
        """Save the trace on show as a reference folder: the Save reference button."""
        self.error.value = ""
        path = path if path is not None else self.save_path.value.strip()
        try:
            if self.current is None:
                raise ValueError("Nothing to save yet: submit a prompt first.")
            if self.current_model is None:
                raise ValueError("This trace is a loaded reference; saving needs the model it was traced with.")
            if not path:
                raise ValueError("Type a folder to save the reference to.")
            out = self.current.save(path, self.current_model)
        except _INPUT_ERRORS as exc:
            self._fail(exc)
            return None
        self.save_status.value = f"saved to {out}"
        return out

    def run_patching(self):
        """Inject `patch_n` OOD tokens of the chosen kind, then patch clean -> injected: the Run patching button."""
        self.error.value = ""
        self._reset_patching()
        if self.current is None or self.current_model is None:
            self._fail(ValueError("Patching runs the model: submit a prompt with a model first."))
            return None
        if len(self._resolved.answer_tokens) > 1:
            self._fail(MultiTokenAnswerError(self._multi_token_note()))
            return None
        # What was traced, not what the boxes hold now: they may have been edited since.
        model, prompt, answer = self.current_model, self._prompt_used, self._resolved.typed_answer
        self.patch_button.disabled = True
        try:
            injected = inject(
                model, prompt, self.patch_kind.value, self.patch_where.value, n=int(self.patch_n.value), answer=answer
            )
            self.patch_progress.value = 1
            # A weak corruption is said in the tab itself; the warning would only print above the app.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", WeakCorruptionWarning)
                result = patch(
                    model,
                    prompt,
                    injected.prompt,
                    answer,
                    what="resid_pre",
                    distractors=self._distractors_used,
                    alignment=injected.alignment,
                )
            self.patch_progress.value = 2
        except _INPUT_ERRORS as exc:
            self._reset_patching()
            self._fail(exc)
            return None
        finally:
            self.patch_button.disabled = False
        self.patch_result = result
        shown = [w.HTML(f"<b>injected prompt</b>: <code>{html.escape(repr(injected.prompt))}</code>")]
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
        return result

    # Rendering ----------------------------------------------------------------------------------

    def _show(self, trace, model) -> None:
        """Put a new trace on show: the step selector's options, then every tab at its first row."""
        self.current, self.current_model = trace, model
        options = [(_step_label(trace, r), r) for r in range(len(trace.rows))]
        n_layers, n_heads = trace.heads.values.shape[:2]
        with self._quietly():
            if model is not None:
                self.reference_select.value = ""  # a submit replaces the reference on show
            self.step_select.options = options
            self.step_select.value = 0
            self.head_layer.options, self.head_head.options = list(range(n_layers)), list(range(n_heads))
        self.step_select.layout.display = None if len(options) > 1 else "none"
        self._render_row()
        # Patching is run per prompt, on demand: a new submit starts the tab afresh.
        self._reset_patching()
        multi = self._resolved is not None and len(self._resolved.answer_tokens) > 1
        self.patch_button.disabled = model is None or multi
        if model is None:
            self.patch_note.value = (
                "<i>Patching runs the model; a saved reference has none. Submit with a model to patch.</i>"
            )
        elif multi:
            self.patch_note.value = f"<b>{html.escape(self._multi_token_note())}</b>"
        else:
            self.patch_note.value = PATCH_NOTE

    def _render_row(self) -> None:
        """Draw every tab for the row on show (the step selector's value)."""
        trace, row = self.current, self.row
        m = trace.margin
        r = trace.rows[row]
        step = f" (step {r.step + 1} of {r.n_steps})" if r.n_steps > 1 else ""
        self.prediction.value = f"{m.top_strs[row][0]!r}{step}"
        self.resolution.value = self._resolution_html(trace, row)
        _replace(self.margin_box, [_figure(m.plot(row)), w.HTML(_table(m.top(5, row)))])
        _replace(self.lens_box, [_figure(trace.lens.plot(row))])
        self._render_dla()
        _replace(self.heads_grid, [_figure(trace.heads.plot(row))])
        self.neurons_box.value = "<b>Top neurons by |DLA|</b>" + _table(trace.dla.top(10, "neuron", row))
        _replace(self.positions_box, [_figure(trace.positions.plot(row))])
        self.select_head(*trace.heads.strongest(row)[0])
        if self._compare_label:  # the comparison follows the trace and the step on show
            try:
                self._set_comparison(self._compare(self._compare_label), self._compare_label)
            except _INPUT_ERRORS as exc:
                self._set_comparison(None, "")
                self._fail(exc)

    def _render_dla(self) -> None:
        if self.current is not None:
            _replace(self.dla_box, [_figure(self.current.dla.plot(self.dla_unit.value, self.row))])

    def _reset_patching(self) -> None:
        self.patch_result, self.patch_progress.value = None, 0
        _replace(self.patch_box)

    def _compare(self, label: str):
        """The reference `label` (a) against the trace on show (b), at the step on show; both from one model."""
        reference, current = self._reference(label), self._on_show("compare")
        check_same_model(reference.identity, current.identity, f"the reference {label!r}", "the trace on show")
        return compare(reference, current, row=self.row)

    def _set_comparison(self, comparison, label: str) -> None:
        self.comparison, self._compare_label = comparison, label
        with self._quietly():
            self.compare_select.value = label
        shown = [] if comparison is None else [w.HTML(_table(comparison.stats())), _figure(comparison.plot("head"))]
        _replace(self.compare_box, shown)

    def _clear(self) -> None:
        """Empty every result, so a failed submit leaves nothing of the one before under its message."""
        self.current = self.current_model = None
        self._resolved, self._prompt_used, self._distractors_used = None, None, None
        self.selected_head = self.head_sources = None
        self.prediction.value = self.resolution.value = ""
        boxes = (self.margin_box, self.lens_box, self.dla_box, self.heads_grid, self.head_source, self.positions_box)
        for box in boxes:
            _replace(box)
        self.head_pattern.value = self.neurons_box.value = ""
        self.step_select.layout.display = "none"
        self._reset_patching()
        self._set_comparison(None, "")
        self.patch_button.disabled = True
        self.patch_note.value = PATCH_NOTE

    def _multi_token_note(self) -> str:
        resolved = self._resolved
        tokens = ", ".join(repr(t) for t in resolved.answer_str_tokens)
        return (
            f"Patching explains a single-token answer; {resolved.typed_answer!r} is "
            f"{len(resolved.answer_tokens)} tokens ({tokens}). The other tabs show each step; to patch, "
            "submit an answer of one token."
        )

    def _resolution_html(self, trace, row: int = 0) -> str:
        r = trace.rows[row]
        tokens = f"<code>{html.escape(repr(r.str_tokens))}</code>"
        if r.step:  # a later step reads the prompt and the answer's tokens before it
            forced = ", ".join(html.escape(repr(t)) for t in r.str_tokens[-r.step :])
            head = f"<b>{len(r.str_tokens)} tokens</b>, the prompt then the answer's {forced} (teacher-forced)"
        else:
            head = f"<b>{len(r.str_tokens)} prompt tokens</b>"
        lines = [f"{head}: {tokens}"]
        resolved = self._resolved
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

    # Callbacks: each calls the action, which shows its own errors; none runs while the app sets its inputs.

    def _on_step(self, _change) -> None:
        if self.current is not None and not self._quiet:
            self._render_row()

    def _on_head_dropdown(self, _change) -> None:
        if not self._quiet:
            self.select_head(self.head_layer.value, self.head_head.value)

    def _on_reference(self, change) -> None:
        if not self._quiet:
            self.open_reference(change["new"])

    def _on_compare(self, change) -> None:
        if not self._quiet:
            self.compare_reference(change["new"])


def explore(model_or_models=None, reference=None) -> Explorer:
    """Open the explorer: type a prompt and an answer, and see the trace in tabs.

    Args:
        model_or_models: a loaded model, a list of them, or a dict name -> model (one Dropdown entry each).
        reference: a saved reference to open without a model: a folder path, a loaded `Trace`,
            or a list of them.

    Returns:
        An `Explorer`; end a cell with it to show it. Drive it from code with `app.prompt.value`,
        `app.answer.value` and `app.submit()`; pick a multi-token answer's step with `app.select_step(i)`.

    Raises:
        TypeError: `model_or_models` is not a loaded model (a name such as `"tiny-arith"`, or None
            with no `reference`): load it first with `tl.load_model`.
    """
    return Explorer(model_or_models, reference)
