"""The explorer app: its inputs, what it has on show, and the actions that change it (`tl.explore`)."""

from __future__ import annotations

import html
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import ipywidgets as w
from IPython.display import display

from tracelib.answers import MultiTokenAnswerError, chat_prompt, resolve_answer
from tracelib.compare import compare
from tracelib.identity import check_same_model
from tracelib.ood import inject
from tracelib.patching import WeakCorruptionWarning, patch
from tracelib.trace import Trace
from tracelib.widgets.cache import CACHE_SIZE, TraceCache
from tracelib.widgets.captions import _multi_token_note, _resolution_html, _routes_note, _step_label
from tracelib.widgets.drawing import _close, _dropdown, _pattern_frame, _reference_dropdown, _replace, _text_box
from tracelib.widgets.inputs import _INPUT_ERRORS, SelectionError, _index, _models, _references
from tracelib.widgets.tabs import PATCH_NOTE, TAB_TITLES, ResultTabs

# The Routes tab's index: its route is computed when the tab is opened, not on every submit.
ROUTES_TAB = TAB_TITLES.index("Routes")


class Explorer(ResultTabs):
    """An ipywidgets app over `tl.trace`: one trace per new input, cached, shown in tabs.

    A multi-token answer (`" 12"`) is traced one teacher-forced step per token, as `tl.trace` does;
    the Step dropdown then picks the step every tab shows. Patching and Routes need a single-token answer.

    Every action is a method (`submit`, `select_step`, `select_head`, `open_reference`,
    `compare_reference`, `save`, `run_patching`, `show_routes`), called by its widget or from code alike. None
    raises on bad input: each shows the message in `error` (a head, step or reference the app does
    not have is a `SelectionError` that lists what it has), leaves what is on show as it was, and
    returns None. The last `CACHE_SIZE` traces are cached, the least recently used dropped first.

    The Routes tab computes `tl.routes` only when it is opened (or its threshold changes while it is
    open), and caches the routes as it caches traces: opening it again for an input seen before runs
    nothing. It says in the tab, not in `error`, why it has no route (a multi-token answer, a saved
    reference, a failure of `tl.routes`).

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
        tabs: the `Tab` of results, titled as `TAB_TITLES`. Its widgets (`margin_box`, `head_layer`,
            `patch_button`, `compare_select`, ...) are attributes of the app too; `ResultTabs` lists them.
        comparison: the `tl.Comparison` on show in the Compare tab (reference = a, trace on show = b), or None.
        current: the `Trace` on show (None before the first submit, and after a failed one).
        current_model: the model of `current`, None for a saved reference.
        row: the row of `current` on show (the step selector's value).
        n_traces: how many times `tl.trace` ran (cached inputs do not run it again).
        selected_head: the (layer, head) on show in the Heads tab.
        head_sources: the selected head's `tl.HeadSources`.
        patch_result: the last `tl.PatchingResult` of the Patching tab (reset on every submit).
        routes: the `tl.Routes` on show in the Routes tab (None until the tab is opened, and where it has none).
        n_routes: how many times `tl.routes` ran (cached inputs do not run it again).
    """

    def __init__(self, models=None, reference=None):
        self.references = _references(reference)
        self.models = _models(models, has_references=bool(self.references))
        self._cache = TraceCache(CACHE_SIZE)
        self.current = None
        self.current_model = None
        self.selected_head = None
        self.head_sources = None
        self.patch_result = None
        self.routes = None
        self.comparison = None
        self._compare_label = ""  # the reference of `comparison`: what compare_select shows
        self._quiet = False  # True while the app sets its own inputs: their callbacks stay silent
        self._remember_inputs()

        self.prompt = _text_box("Prompt", "what is 1 + 1", "720px")
        self.answer = _text_box("Answer", '" 2" (leading space kept)', "360px")
        self.distractors = _text_box("Distractors", "comma-separated, optional", "480px")
        self.model_select = _dropdown("Model", self.models, width="360px")
        self.chat = w.Checkbox(value=False, description="chat template", indent=False, layout=w.Layout(width="140px"))
        self.reference_select = _reference_dropdown("Reference", self.references, width="360px")
        self.submit_button = w.Button(
            description="Submit", button_style="primary", icon="play", layout=w.Layout(width="auto", min_width="110px")
        )
        self.status = w.Label(value="")
        self.prediction = w.Label(value="")
        self.resolution = w.HTML(value="")
        self.error = w.HTML(value="")
        self.step_select = _dropdown("Step", [("step 1", 0)], width="100%", max_width="720px", display="none")
        self.save_path = _text_box("Save to", "folder for trace.save()", "480px")
        self.save_button = w.Button(description="Save reference", icon="save", layout=w.Layout(width="auto"))
        self.save_status = w.Label(value="")
        super().__init__(self.references)

        self.submit_button.on_click(lambda _: self.submit())
        self.save_button.on_click(lambda _: self.save())
        self.model_select.observe(lambda _: self._update_chat(), names="value")
        self.reference_select.observe(self._on_reference, names="value")
        self.step_select.observe(self._on_step, names="value")
        self.dla_unit.observe(lambda _: self._render_dla(), names="value")
        for dropdown in (self.head_layer, self.head_head):
            dropdown.observe(self._on_head_dropdown, names="value")
        self.patch_button.on_click(lambda _: self.run_patching())
        self.tabs.observe(self._on_tab, names="selected_index")
        self.routes_threshold.observe(self._on_routes_threshold, names="value")
        self.compare_select.observe(self._on_compare, names="value")
        self._update_chat()
        if not self.models:
            self.submit_button.disabled = True

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

    @property
    def n_traces(self) -> int:
        """How many times `tl.trace` ran (cached inputs do not run it again)."""
        return self._cache.n_traces

    @property
    def n_routes(self) -> int:
        """How many times `tl.routes` ran (cached inputs do not run it again)."""
        return self._cache.n_routes

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

    def _remember_inputs(self, resolved=None, prompt=None, distractors=None, name=None, chat=False) -> None:
        """Keep what the trace on show was made from, since the boxes may be edited; None for a saved reference."""
        self._resolved, self._prompt_used, self._distractors_used = resolved, prompt, distractors
        self._name_used, self._chat_used = name, chat

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
            traced, cached = self._cache.trace(name, model, prompt, self.answer.value, distractors, self.chat.value)
            self._remember_inputs(resolved, prompt, distractors, name, self.chat.value)
            self._show(traced, model)
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
        self._remember_inputs()
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
        self._draw_head_sources(self.head_sources)
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
        self.head_pattern.value = _pattern_frame(view)
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
            self._fail(MultiTokenAnswerError(_multi_token_note(self._resolved)))
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
        self._draw_patching(result, injected.prompt)
        return result

    def show_routes(self):
        """Draw the route of the trace on show in the Routes tab: what opening the tab (or changing its
        threshold) does. Returns the `tl.Routes`, or None where the tab says why there is none.

        The routes come from the cache for inputs (and a threshold) seen before; otherwise `tl.routes`
        runs once, on what was traced (the boxes may have been edited since).
        """
        self.routes = None
        if self.current is None:
            self._draw_routes_message("<i>Submit a prompt and a one-token answer to see how the answer travels.</i>")
            return None
        if self.current_model is None:
            self._draw_routes_message(
                "<i>A route is computed with the model; a saved reference has none. Submit with a model to see it.</i>"
            )
            return None
        if len(self._resolved.answer_tokens) > 1:
            self._draw_routes_message(f"<b>{html.escape(_routes_note(self._resolved))}</b>")
            return None
        try:
            routes, _ = self._cache.routes(
                self._name_used,
                self.current_model,
                self._prompt_used,
                self._resolved.typed_answer,
                self._distractors_used,
                self._chat_used,
                float(self.routes_threshold.value),
            )
        except (*_INPUT_ERRORS, RuntimeError, KeyError) as exc:  # a model whose blocks routes cannot read too
            self._draw_routes_message(
                '<span style="color:#b00020"><b>No route</b>: '
                f"{html.escape(type(exc).__name__)}: {html.escape(str(exc))}</span>"
            )
            return None
        self.routes = routes
        self._draw_routes(routes)
        return routes

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
        # Routes are computed on demand too: now only if their tab is open.
        self._reset_routes()
        if model is None:
            self.patch_note.value = (
                "<i>Patching runs the model; a saved reference has none. Submit with a model to patch.</i>"
            )
        elif multi:
            self.patch_note.value = f"<b>{html.escape(_multi_token_note(self._resolved))}</b>"
        else:
            self.patch_note.value = PATCH_NOTE

    def _render_row(self) -> None:
        """Draw every tab for the row on show (the step selector's value)."""
        trace, row = self.current, self.row
        r = trace.rows[row]
        step = f" (step {r.step + 1} of {r.n_steps})" if r.n_steps > 1 else ""
        self.prediction.value = f"{trace.margin.top_strs[row][0]!r}{step}"
        self.resolution.value = _resolution_html(trace, row, self._resolved)
        self._draw_row(trace, row)
        self.select_head(*trace.heads.strongest(row)[0])
        if self._compare_label:  # the comparison follows the trace and the step on show
            try:
                self._set_comparison(self._compare(self._compare_label), self._compare_label)
            except _INPUT_ERRORS as exc:
                self._set_comparison(None, "")
                self._fail(exc)

    def _render_dla(self) -> None:
        if self.current is not None:
            self._draw_dla(self.current, self.row)

    def _reset_patching(self) -> None:
        self.patch_result, self.patch_progress.value = None, 0
        _replace(self.patch_box)

    def _reset_routes(self) -> None:
        """Forget the route on show; draw the new one at once if the Routes tab is open."""
        self.routes = None
        _replace(self.routes_box)
        if self.tabs.selected_index == ROUTES_TAB:
            self.show_routes()

    def _compare(self, label: str):
        """The reference `label` (a) against the trace on show (b), at the step on show; both from one model."""
        reference, current = self._reference(label), self._on_show("compare")
        check_same_model(reference.identity, current.identity, f"the reference {label!r}", "the trace on show")
        return compare(reference, current, row=self.row)

    def _set_comparison(self, comparison, label: str) -> None:
        self.comparison, self._compare_label = comparison, label
        with self._quietly():
            self.compare_select.value = label
        self._draw_comparison(comparison)

    def _clear(self) -> None:
        """Empty every result, so a failed submit leaves nothing of the one before under its message."""
        self.current = self.current_model = None
        self._remember_inputs()
        self.selected_head = self.head_sources = None
        self.prediction.value = self.resolution.value = ""
        self._clear_tabs()
        self.step_select.layout.display = "none"
        self._reset_patching()
        self.routes = None
        self._set_comparison(None, "")
        self.patch_button.disabled = True
        self.patch_note.value = PATCH_NOTE

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

    def _on_tab(self, change) -> None:
        if change["new"] == ROUTES_TAB and not self._quiet:
            self.show_routes()

    def _on_routes_threshold(self, _change) -> None:
        if self.tabs.selected_index == ROUTES_TAB and not self._quiet:
            self.show_routes()


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
