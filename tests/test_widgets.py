"""The ipywidgets explorer, driven from code: inputs, cache, head selection, errors, references, patching."""

from __future__ import annotations

import html

import pytest
import torch

import tracelib as tl
from tracelib.widgets import PATCH_N, TAB_TITLES

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
    monkeypatch.setattr(tl.patching, "MIN_EFFECT", 0.0)
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
