"""The ipywidgets explorer, driven from code: inputs, cache, head selection, errors, references, patching."""

from __future__ import annotations

import copy
import html
import inspect
import re
import sys

import pytest
import torch
from ipywidgets.widgets.widget import _instances as live_widgets  # every widget not yet closed

import tracelib as tl
import tracelib.widgets.cache
from tracelib.plotting import SIGN_CAPTION
from tracelib.widgets import CACHE_SIZE, DLA_UNITS, PATCH_N, ROUTES_K, ROUTES_THRESHOLD, TAB_TITLES

PROMPT, ANSWER = "what is 1 + 1", " 2"


@pytest.fixture
def app(tiny):
    return tl.explore(tiny)


def submit(app, prompt=PROMPT, answer=ANSWER, distractors=""):
    app.prompt.value, app.answer.value, app.distractors.value = prompt, answer, distractors
    app.submit()


def test_builds_with_tabs(app):
    assert [app.tabs.get_title(i) for i in range(len(app.tabs.children))] == list(TAB_TITLES)
    assert app.current is None and app.n_traces == 0 and app.error.value == ""


def test_chat_toggle_only_for_chat_models(gpt2, tiny_chat):
    app = tl.explore({"plain": gpt2, "chat": tiny_chat})
    assert app.chat.disabled  # GPT-2's tokenizer has no chat template
    app.model_select.value = "chat"
    assert not app.chat.disabled
    app.chat.value = True
    submit(app, "what is 1 + 1", "2")
    assert app.error.value == "", app.error.value
    assert app.current.rows[0].prompt.startswith(tl.chat_prompt(tiny_chat, "what is 1 + 1").rstrip())


def test_submit_shows_the_traced_prediction(app, tiny):
    submit(app)
    expected = tl.trace(tiny, PROMPT, ANSWER)
    assert app.error.value == ""
    assert app.n_traces == 1
    assert app.prediction.value == repr(expected.margin.top_strs[0][0])
    torch.testing.assert_close(app.current.margin.logit, expected.margin.logit)
    resolved = tl.resolve_answer(tiny, PROMPT, ANSWER)
    assert html.escape(repr(resolved.answer_str_tokens[0])) in app.resolution.value
    assert all(box.children for box in (app.margin_box, app.lens_box, app.dla_box, app.positions_box))
    assert "neuron" in app.neurons_box.value


def test_cache(app):
    submit(app)
    first = app.current
    submit(app)
    assert app.n_traces == 1 and app.current is first
    submit(app, "what is 2 + 3", " 5")
    assert app.n_traces == 2 and app.current is not first
    submit(app)
    assert app.n_traces == 2 and app.current is first  # switching back comes from the cache
    submit(app, distractors="3, 4")
    assert app.n_traces == 3 and app.current.margin.distractor_strs[0] == ["3", "4"]


def test_select_head(app):
    submit(app)
    n_layers, n_heads = app.current.heads.values.shape[:2]
    layer, head = n_layers - 1, n_heads - 1
    app.select_head(layer, head)
    assert app.selected_head == (layer, head)
    assert (app.head_layer.value, app.head_head.value) == (layer, head)
    torch.testing.assert_close(app.head_sources.values, app.current.heads.source(layer, head).values)
    assert app.head_sources.layer == layer and app.head_sources.head == head
    assert app.head_source.children and "iframe" in app.head_pattern.value
    app.head_layer.value = 0  # the dropdowns select too
    assert app.selected_head == (0, head) and app.head_sources.layer == 0


@pytest.mark.parametrize(
    ("prompt", "answer", "distractors", "error"),
    [
        ("", ANSWER, "", "EmptyInputError"),
        (PROMPT, "", "", "EmptyInputError"),
        (PROMPT, ANSWER, "1, 2", "ValueError"),  # a distractor that is the answer itself
        ("1 + " * 400 + "1", ANSWER, "", "PromptTooLongError"),
    ],
)
def test_bad_input_shows_the_message(app, prompt, answer, distractors, error):
    submit(app, prompt, answer, distractors)  # no exception escapes
    assert error in app.error.value and "color" in app.error.value
    assert app.n_traces == 0 and app.current is None
    submit(app)
    assert app.error.value == ""  # a good submit clears it


def test_save_and_open_reference(app, tiny, tmp_path):
    submit(app)
    app.save_path.value = str(tmp_path / "ref")
    app.save_button.click()
    assert app.error.value == "" and (tmp_path / "ref").is_dir()
    viewer = tl.explore(reference=tmp_path / "ref")
    assert viewer.submit_button.disabled and viewer.current is None
    viewer.reference_select.value = str(tmp_path / "ref")
    assert viewer.current_model is None
    assert viewer.prediction.value == app.prediction.value
    torch.testing.assert_close(viewer.current.heads.values, app.current.heads.values)
    assert viewer.patch_button.disabled and "saved reference" in viewer.patch_note.value
    assert viewer.head_source.children and "model" in viewer.head_pattern.value
    viewer.run_patching()
    assert "Patching runs the model" in viewer.error.value


@pytest.mark.filterwarnings("error::tracelib.WeakCorruptionWarning")  # none may escape the app
def test_patching_tab_matches_patch(app, tiny):
    submit(app)
    app.patch_kind.value, app.patch_where.value = "junk", "after"
    result = app.run_patching()
    assert app.error.value == "" and app.patch_progress.value == app.patch_progress.max
    assert app.patch_n.value == PATCH_N == 3  # the default injects three
    injected = tl.inject(tiny, PROMPT, "junk", "after", n=PATCH_N, answer=ANSWER)
    direct = tl.patch(
        tiny, PROMPT, injected.prompt, ANSWER, what="resid_pre", alignment=injected.alignment, min_effect=0.0
    )
    torch.testing.assert_close(result.values, direct.values, equal_nan=True)
    torch.testing.assert_close(result.raw_change, direct.raw_change, equal_nan=True)
    weak = abs(direct.delta) < tl.patching.MIN_EFFECT * abs(direct.clean_metric)
    assert result.weak_effect == weak


@pytest.mark.filterwarnings("error::tracelib.WeakCorruptionWarning")
def test_patching_tab_says_when_there_is_nothing_to_recover(app, tiny, monkeypatch):
    submit(app)
    app.patch_kind.value, app.patch_where.value = "junk", "after"
    injected = tl.inject(tiny, PROMPT, "junk", "after", answer=ANSWER)
    layers = tl.patch(
        tiny, PROMPT, injected.prompt, ANSWER, "resid_pre_all_pos", alignment=injected.alignment, min_effect=0
    )
    share = abs(layers.delta) / abs(layers.clean_metric)
    assert share < tl.patching.MIN_EFFECT, "the premise: one junk token barely moves the bundled model's answer"
    app.patch_n.value = 1
    result = app.run_patching()
    assert result.weak_effect and app.error.value == ""
    note = app.patch_box.children[1].value
    assert "barely changes the answer" in note and f"Δ = {result.delta:+.3f}" in note and "nothing to recover" in note
    fig = app.patch_box.children[-1].figure
    assert "not recovery" in fig.layout.title.text and fig.data[0].colorbar.title.text.startswith("raw change")
    assert fig.data[0].zmax == pytest.approx(result.raw_change[~result.raw_change.isnan()].abs().max().item())
    # With the check off (the module's default threshold at 0), the tab draws recovery and no note.
    monkeypatch.setattr(tl.patching.result, "MIN_EFFECT", 0.0)
    result = app.run_patching()
    assert not result.weak_effect and len(app.patch_box.children) == 2
    assert "recovery of" in app.patch_box.children[-1].figure.layout.title.text


def test_nonfinite_shows_the_message():
    broken = tl.load_model("tiny-arith")  # its own copy: the session's `tiny` stays intact
    with torch.no_grad():
        next(broken.parameters()).fill_(float("inf"))
    app = tl.explore(broken)
    submit(app)
    assert "NonFiniteError" in app.error.value and "overflowed" in app.error.value
    assert app.current is None


def test_references_as_traces_and_a_list(tiny, tmp_path):
    first = tl.trace(tiny, PROMPT, ANSWER)
    first.save(tmp_path / "a", tiny)
    second = tl.trace(tiny, "what is 2 + 3", " 5")
    viewer = tl.explore(tiny, reference=[tmp_path / "a", second])
    labels = [value for _, value in viewer.reference_select.options if value]
    assert len(labels) == 2 and viewer.n_traces == 0
    viewer.reference_select.value = labels[1]
    assert viewer.current is second and viewer.current_model is None
    viewer.reference_select.value = labels[0]
    torch.testing.assert_close(viewer.current.margin.logit, first.margin.logit)
    submit(viewer)  # a model was given too: submitting still traces
    assert viewer.n_traces == 1 and viewer.current_model is tiny and not viewer.patch_button.disabled


# --- a learner's pass (issue 17): multi-token answers, errors, the Patching tab, layout -------------

MULTI_PROMPT, MULTI_ANSWER = "what is 5 + 7", " 12"


def test_multi_token_answer_shows_its_steps_and_every_tab_follows_the_step(app, tiny):
    submit(app, MULTI_PROMPT, MULTI_ANSWER)
    expected = tl.trace(tiny, MULTI_PROMPT, MULTI_ANSWER)
    assert app.error.value == "" and len(app.current.rows) == len(expected.rows) == 2
    # The step selector shows, one entry per answer token, and starts at the first.
    assert app.step_select.layout.display != "none" and app.row == 0
    labels = [label for label, _ in app.step_select.options]
    assert labels[0].startswith("step 1 of 2: '1'") and labels[1] == "step 2 of 2: '2', after the prompt + '1'"
    for row in (0, 1):
        app.select_step(row)
        assert app.row == row
        label = app.current.rows[row].label
        assert f"[step {row + 1}/2]" in label
        assert app.prediction.value == f"{expected.margin.top_strs[row][0]!r} (step {row + 1} of 2)"
        for box in (app.margin_box, app.lens_box, app.dla_box, app.heads_grid, app.positions_box):
            assert label in box.children[0].figure.layout.title.text, (row, box)
        assert app.neurons_box.value.endswith(
            tl.widgets._table(expected.dla.top(10, "neuron", row))
        )  # the same neurons as the trace's own row
        layer, head = expected.heads.strongest(row)[0]
        assert app.selected_head == (layer, head) and app.head_sources.row_label == label
        torch.testing.assert_close(app.head_sources.values, expected.heads.source(layer, head, row).values)
        assert "iframe" in app.head_pattern.value
        # The answer's tokens are listed with the step on show in bold; later steps see the forced tokens.
        assert f"<b>{html.escape(repr(expected.rows[row].target_str))}</b>" in app.resolution.value
        assert html.escape(repr(expected.rows[row].str_tokens)) in app.resolution.value
    app.dla_unit.value = "head"  # the DLA unit dropdown keeps the step
    assert app.current.rows[1].label in app.dla_box.children[0].figure.layout.title.text
    # Patching stays single-token, and its tab says so instead of offering a button that fails.
    assert app.patch_button.disabled and "single-token" in app.patch_note.value and "2 tokens" in app.patch_note.value
    assert app.run_patching() is None and "MultiTokenAnswerError" in app.error.value
    # A one-token answer hides the selector again and shows its only row.
    submit(app)
    assert app.step_select.layout.display == "none" and app.row == 0 and len(app.current.rows) == 1
    assert not app.patch_button.disabled and "single-token" not in app.patch_note.value


def test_a_failed_submit_clears_the_results_before_it(app):
    submit(app)
    app.run_patching()
    assert app.current is not None and app.patch_box.children
    submit(app, "", ANSWER)
    assert "EmptyInputError" in app.error.value
    assert app.current is None and app.prediction.value == "" and app.resolution.value == ""
    for box in (app.margin_box, app.lens_box, app.dla_box, app.heads_grid, app.head_source, app.positions_box):
        assert box.children == (), box
    assert app.neurons_box.value == "" and app.head_pattern.value == ""
    assert app.patch_box.children == () and app.patch_progress.value == 0 and app.patch_result is None
    assert app.patch_button.disabled
    assert "Nothing to save yet" in (app.save() or app.error.value)
    submit(app)  # and a good submit brings everything back
    assert app.error.value == "" and app.current is not None and app.margin_box.children


def test_the_patching_tab_starts_afresh_on_every_submit(app):
    submit(app)
    app.run_patching()
    assert app.patch_progress.value == app.patch_progress.max and app.patch_result is not None
    submit(app, "what is 2 + 3", " 5")  # a new trace
    assert app.patch_progress.value == 0 and app.patch_box.children == () and app.patch_result is None
    app.run_patching()
    submit(app)  # from the cache: the tab resets too
    assert app.status.value.startswith("from cache")
    assert app.patch_progress.value == 0 and app.patch_box.children == () and app.patch_result is None


def test_patching_injects_as_many_tokens_as_asked(app, tiny):
    submit(app)
    app.patch_n.value = 2
    result = app.run_patching()
    injected = tl.inject(tiny, PROMPT, app.patch_kind.value, app.patch_where.value, n=2, answer=ANSWER)
    assert repr(injected.prompt) in html.unescape(app.patch_box.children[0].value)
    assert result.str_tokens == tl.resolve_answer(tiny, injected.prompt, ANSWER).prompt_str_tokens


def test_margin_table_quotes_each_token_once_in_the_package_format(app):
    submit(app)
    table = html.unescape(app.margin_box.children[1].value)
    assert "<td>'2'</td>" in table and "\"'2'\"" not in table
    # One number format: probabilities unsigned, logits and their differences signed, three decimals.
    top = app.current.margin.top(5)
    assert f"<td>{top['prob'][0]:.3f}</td>" in table and f"<td>{top['logit'][0]:+.3f}</td>" in table


def test_inputs_and_buttons_are_sized(app):
    for text in (app.prompt, app.answer, app.distractors, app.save_path):
        assert text.layout.max_width, text.description  # never the whole width of a wide app
    px = {t: int(t.layout.max_width.removesuffix("px")) for t in (app.prompt, app.answer)}
    assert px[app.answer] < px[app.prompt]  # the answer box is shorter than the prompt's
    # The buttons size to their labels, so "Run patching" is never cut.
    assert app.patch_button.layout.width == "auto" and app.patch_button.layout.min_width
    assert app.submit_button.layout.width == "auto"


# --- issue 18: closed widgets, a bounded cache, bad selections, one model per comparison -----------


def test_repeated_submits_and_selections_leave_no_widgets_behind(app):
    submit(app)
    submit(app)
    before = len(live_widgets)
    for _ in range(30):  # any widget left per submit would show: the count must not move at all
        submit(app)  # from the cache: every tab is drawn again all the same
    assert len(live_widgets) == before
    for i in range(20):
        app.select_head(i % 4, (i + 1) % 4)
        app.dla_unit.value = DLA_UNITS[i % 4]
    submit(app, MULTI_PROMPT, MULTI_ANSWER)
    app.select_step(1)
    app.run_patching()  # refused for a multi-token answer: nothing drawn
    submit(app)
    app.run_patching()
    assert len(live_widgets) > before  # the Patching tab's note and figure
    submit(app)
    assert len(live_widgets) == before


def test_replaced_widgets_are_closed_with_their_layout_and_style(app):
    submit(app)
    replaced = [*app.margin_box.children, *app.head_source.children, *app.heads_grid.children]
    parts = [x for widget in replaced for x in (widget.layout, getattr(widget, "style", None)) if x is not None]
    submit(app)
    assert all(widget.comm is None for widget in replaced + parts)  # closed: the front-end drops them
    assert all(widget.comm is not None for widget in (*app.margin_box.children, *app.head_source.children))


def test_closing_the_app_closes_every_widget_it_made(tiny):
    before = len(live_widgets)
    app = tl.explore(tiny)
    submit(app)
    app.run_patching()
    assert len(live_widgets) > before
    app.close()
    assert len(live_widgets) == before


def test_the_cache_keeps_the_most_recently_used_traces(app):
    inputs = [f"what is {a} + {b}" for a in range(1, 9) for b in range(1, 6)][:40]
    for prompt in inputs[:CACHE_SIZE]:
        submit(app, prompt)
    submit(app, inputs[0])  # used again: now the most recent
    assert app.status.value.startswith("from cache") and app.n_traces == CACHE_SIZE == 32
    for prompt in inputs[CACHE_SIZE:]:
        submit(app, prompt)
    assert app.n_traces == 40 and len(app._cache) == CACHE_SIZE
    for prompt in (inputs[0], inputs[9], inputs[-1]):  # kept
        submit(app, prompt)
        assert app.status.value.startswith("from cache") and app.n_traces == 40, prompt
    submit(app, inputs[1])  # the least recently used went first
    assert app.status.value.startswith("traced") and app.n_traces == 41


def test_a_model_changed_in_place_is_traced_again(tiny):
    model = copy.deepcopy(tiny)
    app = tl.explore(model)
    submit(app)
    first = app.current
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    submit(app)
    assert app.n_traces == 2 and app.status.value.startswith("traced")
    assert app.current.identity == tl.model_identity(model) != first.identity


def test_a_head_it_does_not_have_changes_nothing_and_says_which_it_has(app):
    assert app.select_head(0, 0) is None and "Nothing on show" in app.error.value  # before any submit
    submit(app)
    n_layers, n_heads = app.current.heads.values.shape[:2]

    def shown():
        return (
            app.selected_head,
            app.head_sources,
            (app.head_layer.value, app.head_head.value),
            app.head_source.children,
            app.head_pattern.value,
        )

    before = shown()
    for layer, head in ((99, 99), (n_layers, 0), (0, -1), (1.5, 0), ("0", 0)):
        assert app.select_head(layer, head) is None  # no exception
        assert shown() == before, (layer, head)
        assert "SelectionError" in app.error.value and "color" in app.error.value
        assert f"layers 0 to {n_layers - 1} and heads 0 to {n_heads - 1}" in app.error.value
    assert app.select_head(0, 1) is app.head_sources and app.error.value == ""  # a good one clears it


def test_a_step_it_does_not_have_changes_nothing(app):
    submit(app, MULTI_PROMPT, MULTI_ANSWER)
    app.select_step(1)
    label = app.margin_box.children[0].figure.layout.title.text
    for row in (2, -1, "1"):
        app.select_step(row)
        assert app.row == 1 and app.margin_box.children[0].figure.layout.title.text == label
        assert "SelectionError" in app.error.value and "steps 0 to 1" in app.error.value


def test_an_unknown_reference_changes_nothing_and_lists_the_references(tiny):
    second = tl.trace(tiny, "what is 2 + 3", " 5")
    app = tl.explore(tiny, reference=second)
    submit(app)
    current, figure = app.current, app.margin_box.children[0]
    assert app.open_reference("nope") is None and app.compare_reference("nope") is None
    assert app.current is current and app.margin_box.children[0] is figure and app.comparison is None
    label = app.reference_select.options[1][1]
    message = html.unescape(app.error.value)
    assert (
        "SelectionError" in message
        and f"No reference 'nope': the references given to the explorer are {label!r}" in message
    )
    assert app.open_reference(label) is second and app.reference_select.value == label and app.error.value == ""


def test_explore_needs_a_loaded_model():
    for bad in ("tiny-arith", None, ["tiny-arith"], {"tiny": "tiny-arith"}, []):
        with pytest.raises(TypeError, match=r"explore: pass a model from tl\.load_model"):
            tl.explore(bad)
    with pytest.raises(TypeError, match=r"got 'tiny-arith' \(str\); load it first: model = tl.load_model"):
        tl.explore("tiny-arith")
    with pytest.raises(TypeError, match="got None"):
        tl.explore()


def test_compare_with_a_reference_of_the_same_model(tiny, tmp_path):
    tl.trace(tiny, PROMPT, ANSWER).save(tmp_path / "ref", tiny)
    app = tl.explore(tiny, reference=tmp_path / "ref")
    label = str(tmp_path / "ref")
    submit(app, "what is 1 + 2", " 3")
    app.compare_select.value = label  # the Compare tab's dropdown
    expected = tl.compare(tl.load_reference(tmp_path / "ref"), tl.trace(tiny, "what is 1 + 2", " 3"))
    assert app.error.value == "" and app.comparison is not None
    torch.testing.assert_close(app.comparison.difference("head"), expected.difference("head"))
    assert app.compare_box.children[0].value == tl.widgets._table(expected.stats())
    submit(app, "what is 2 + 3", " 5")  # the comparison follows the trace on show
    assert "what is 2 + 3" in app.comparison.b_label and app.compare_select.value == label
    app.compare_select.value = ""
    assert app.comparison is None and app.compare_box.children == ()


def test_compare_refuses_a_reference_from_another_model(tiny, other, tmp_path):
    ours, theirs = tl.model_identity(tiny), tl.model_identity(other)
    assert ours.name == theirs.name and ours != theirs  # the premise: same name, other weights
    tl.trace(tiny, PROMPT, ANSWER).save(tmp_path / "ours", tiny)
    tl.trace(other, PROMPT, ANSWER).save(tmp_path / "theirs", other)
    made_by_other = tl.trace(other, "what is 2 + 3", " 5")
    app = tl.explore(tiny, reference=[tmp_path / "ours", tmp_path / "theirs", made_by_other])
    ours_label, *theirs_labels = [value for _, value in app.compare_select.options if value]
    submit(app)
    comparison = app.compare_reference(ours_label)
    assert comparison is not None and app.error.value == ""
    shown = app.compare_box.children
    for label in theirs_labels:
        app.compare_select.value = label  # the dropdown: no exception escapes the callback
        message = html.unescape(app.error.value)
        assert "ModelMismatchError" in message and f"the reference {label!r} comes from {theirs}" in message
        assert f"the trace on show comes from {ours}" in message
        # Nothing changed: the comparison before stays, and the dropdown shows it again.
        assert app.comparison is comparison and app.compare_box.children == shown
        assert app.compare_select.value == ours_label
        assert app.compare_reference(label) is None and app.comparison is comparison  # from code too
    # A reference of the other model opens for viewing; the comparison, which follows the trace on show, goes.
    app.reference_select.value = theirs_labels[0]
    assert app.current_model is None and app.current.identity == theirs
    assert f"the trace on show comes from {theirs}" in html.unescape(app.error.value)
    assert app.comparison is None and app.compare_box.children == () and app.compare_select.value == ""


def test_a_submit_with_another_model_drops_the_comparison_and_says_why(tiny, other, tmp_path):
    tl.trace(tiny, PROMPT, ANSWER).save(tmp_path / "ref", tiny)
    app = tl.explore({"tiny": tiny, "other": other}, reference=tmp_path / "ref")
    submit(app)
    assert app.compare_reference(str(tmp_path / "ref")) is not None
    app.model_select.value = "other"
    submit(app)
    assert app.current.identity == tl.model_identity(other) and app.status.value.startswith("traced")
    assert "ModelMismatchError" in app.error.value and str(tl.model_identity(other)) in app.error.value
    assert app.comparison is None and app.compare_box.children == () and app.compare_select.value == ""


def _texts(widget) -> list[str]:
    """Every text a widget shows: its value (HTML, labels) and its figures' titles and annotations, children too."""
    texts = [widget.value] if isinstance(getattr(widget, "value", None), str) else []
    figure = getattr(widget, "figure", None)
    if figure is not None:
        texts += [figure.layout.title.text or "", *(a.text or "" for a in figure.layout.annotations)]
    for child in getattr(widget, "children", ()):
        texts += _texts(child)
    return texts


def test_the_heads_tab_says_what_the_colours_mean_once(app):
    submit(app)
    heads_tab = app.tabs.children[TAB_TITLES.index("Heads")]
    for layer, head in ((0, 0), (3, 1)):
        app.select_head(layer, head)
        assert " ".join(_texts(heads_tab)).count(SIGN_CAPTION) == 1, (layer, head)
    assert SIGN_CAPTION not in app.head_source.children[0].figure.layout.title.text
    assert app.head_sources.plot().layout.title.text.count(SIGN_CAPTION) == 1  # the figure alone still says it


# --- issue 21: the Routes tab ----------------------------------------------------------------------

ROUTES_INDEX = TAB_TITLES.index("Routes")


@pytest.fixture
def routes_calls(monkeypatch):
    """Every call to `tracelib.routes.routes` the explorer makes (its cache looks it up by that name)."""
    calls = []
    real = tracelib.widgets.cache.routes
    # `tracelib.routes` is the function (tl.routes); its module is in sys.modules.
    assert real is sys.modules["tracelib.routes"].routes  # the premise: the cache calls the library's own routes

    def counting(*args, **kwargs):
        calls.append((args[1:3], kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(tracelib.widgets.cache, "routes", counting)
    return calls


def open_routes(app):
    app.tabs.selected_index = ROUTES_INDEX


def routes_parts(app):
    """The Routes tab's verdict line, figure and table of edges."""
    verdict, figure, _how_to_read, table = app.routes_box.children
    return html.unescape(re.sub(r"<[^>]+>", "", verdict.value)), figure.figure, table.value


def test_routes_tab_is_computed_when_opened_and_shows_the_routes_verdict(app, tiny, routes_calls):
    assert app.tabs.get_title(ROUTES_INDEX) == "Routes"
    assert ROUTES_THRESHOLD == inspect.signature(tl.routes).parameters["threshold"].default == 0.04
    submit(app)
    assert routes_calls == [] and app.routes is None and app.routes_box.children == ()  # not on a submit
    open_routes(app)
    assert len(routes_calls) == 1 and app.n_routes == 1 and app.error.value == ""
    expected = tl.routes(tiny, PROMPT, ANSWER)
    verdict, reason = expected.verdict()
    assert app.routes.verdict() == (verdict, reason) and verdict == "assembled"
    line, figure, table = routes_parts(app)
    assert line.startswith(f"Verdict: {verdict}.") and reason in line
    assert "the answer is built there" in line  # what "assembled" means, in words
    # The figure is the route's: one line per edge on it, where the route's own figure draws them.
    lines = [(tuple(t.x), tuple(t.y)) for t in figure.data if t.mode == "lines"]
    assert len(lines) == len(expected.route) > 0
    assert sorted(lines) == sorted((tuple(t.x), tuple(t.y)) for t in expected.plot().data if t.mode == "lines")
    assert figure.layout.title.text.count(SIGN_CAPTION) == 1  # said once in the tab, by the figure
    # The table lists the route's strongest head and MLP edges, in order, importance unsigned.
    rows = tl.widgets._table(tl.widgets._route_edges(expected, ROUTES_K)).split("<tbody>")[1]
    moves = expected.route[expected.route["via"] != "residual"]
    assert 0 < len(moves) < len(expected.route)
    assert table.endswith(rows) and table.count("</tr>") == min(ROUTES_K, len(moves)) + 1  # a header and the edges
    top = moves.iloc[0]
    assert f"<td>{top['importance']:.3f}</td>" in table and "<td>+" not in table
    assert "residual stream</td>" not in table and "<td>MLP</td>" in table and "<td>head L" in table


def test_routes_tab_follows_the_prompt_and_uses_the_cache(app, tiny, routes_calls):
    open_routes(app)  # open before any submit: it says what to do
    assert "Submit a prompt" in app.routes_box.children[0].value and routes_calls == []
    submit(app)  # the tab is open: the route comes with the submit
    assert len(routes_calls) == 1 and app.routes.verdict()[0] == "assembled"
    before = app.routes.verdict()
    submit(app, "what is 2 + 3", " 5")
    second = tl.routes(tiny, "what is 2 + 3", " 5").verdict()
    assert len(routes_calls) == 2 and app.routes.verdict() == second != before  # other sources, other shares
    assert routes_parts(app)[0].startswith(f"Verdict: {second[0]}.") and second[1] in routes_parts(app)[0]
    first = app.routes
    app.tabs.selected_index = 0
    open_routes(app)  # seen again: from the cache, the same routes
    submit(app)
    submit(app, "what is 2 + 3", " 5")
    assert len(routes_calls) == 2 and app.n_routes == 2 and app.routes is first
    # A threshold is part of the input: a new one computes, an old one comes back from the cache.
    app.routes_threshold.value = 0.3
    assert len(routes_calls) == 3 and routes_calls[-1][1]["threshold"] == 0.3
    assert app.routes.threshold == 0.3 and (app.routes.route["importance"] >= 0.3).all()
    assert len(routes_parts(app)[1].data) < len(first.plot().data)
    app.routes_threshold.value = ROUTES_THRESHOLD
    assert len(routes_calls) == 3 and app.routes is first


def test_routes_tab_says_why_a_multi_token_answer_has_no_route(app, routes_calls):
    submit(app, MULTI_PROMPT, MULTI_ANSWER)
    open_routes(app)
    (message,) = app.routes_box.children
    text = html.unescape(message.value)
    assert (
        "single-token answer" in text and "' 12' is 2 tokens ('1', '2')" in text and "submit an answer of one" in text
    )
    assert "Traceback" not in text and app.error.value == "" and app.routes is None and routes_calls == []
    submit(app)  # a one-token answer with the tab open: the route replaces the message
    assert app.routes is not None and len(app.routes_box.children) == 4


def test_routes_tab_shows_a_failure_as_a_message(app, monkeypatch):
    def failing(*args, **kwargs):
        raise ValueError("routes() explains one token; this is a test")

    monkeypatch.setattr(tracelib.widgets.cache, "routes", failing)
    submit(app)
    open_routes(app)  # no exception escapes the callback
    (message,) = app.routes_box.children
    assert "ValueError" in message.value and "this is a test" in message.value and "color" in message.value
    assert app.routes is None and app.error.value == "" and app.current is not None


def test_routes_tab_of_a_saved_reference_says_it_needs_the_model(tiny, routes_calls):
    app = tl.explore(reference=tl.trace(tiny, PROMPT, ANSWER))
    app.open_reference(app.reference_select.options[1][1])
    open_routes(app)
    assert "saved reference" in app.routes_box.children[0].value and routes_calls == [] and app.routes is None


def test_routes_tab_leaves_no_widgets_behind(app):
    submit(app)
    open_routes(app)
    submit(app)
    before = len(live_widgets)
    for i in range(10):  # each redraw closes the figure, verdict and table it replaces
        submit(app)
        app.routes_threshold.value = (0.04, 0.1)[i % 2]
    app.routes_threshold.value = 0.04
    assert len(live_widgets) == before
