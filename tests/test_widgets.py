"""The ipywidgets explorer, driven from code: inputs, cache, head selection, errors, references, patching."""

from __future__ import annotations

import html

import pytest
import torch

import tracelib as tl
from tracelib.widgets import TAB_TITLES

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
    ("prompt", "answer", "error"),
    [
        ("", ANSWER, "EmptyInputError"),
        (PROMPT, "", "EmptyInputError"),
        (PROMPT, " 22 33", "MultiTokenAnswerError"),
        ("1 + " * 400 + "1", ANSWER, "PromptTooLongError"),
    ],
)
def test_bad_input_shows_the_message(app, prompt, answer, error):
    submit(app, prompt, answer)  # no exception escapes
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
    injected = tl.inject(tiny, PROMPT, "junk", "after", answer=ANSWER)
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
