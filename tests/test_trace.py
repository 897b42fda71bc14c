"""trace(): one forward pass, batching that never changes a prompt's numbers, a JSON summary."""

from __future__ import annotations

import json

import pytest
import torch

import tracelib as tl

PROMPTS = ["what is 1 + 1", "Q: what is 3 + 4? A:", "7 minus 2 equals"]
ANSWERS = [" 2", " 7", " 5"]


def _count_forward_passes(model):
    calls = []
    handle = model.hook_dict["hook_embed"].add_hook(lambda act, hook: calls.append(act.shape[0]))
    return calls, handle


def test_one_forward_pass_per_trace(any_model):
    calls, _ = _count_forward_passes(any_model)
    try:
        tl.trace(any_model, PROMPTS, ANSWERS)
    finally:
        any_model.reset_hooks()
    assert calls == [len(PROMPTS)]


def test_one_forward_pass_for_a_multi_token_answer(tiny):
    calls, _ = _count_forward_passes(tiny)
    try:
        tr = tl.trace(tiny, "what is 9 + 3", " 12")
    finally:
        tiny.reset_hooks()
    assert calls == [2]  # both teacher-forced steps in one batch
    assert [row.target_str for row in tr.rows] == ["1", "2"]
    assert len(tr.rows[1].tokens) == len(tr.rows[0].tokens) + 1


def test_batched_results_equal_single_prompt_results(any_model, floats):
    batch = tl.trace(any_model, PROMPTS, ANSWERS)
    for i, (prompt, answer) in enumerate(zip(PROMPTS, ANSWERS)):
        single = tl.trace(any_model, prompt, answer)
        pairs = [
            (batch.margin.logit[i], single.margin.logit[0]),
            (batch.margin.logit_diff[i], single.margin.logit_diff[0]),
            (batch.lens.standard.logit[:, i], single.lens.standard.logit[:, 0]),
            (batch.lens.dla.logit_diff[:, i], single.lens.dla.logit_diff[:, 0]),
            (batch.dla.components[:, i], single.dla.components[:, 0]),
            (batch.dla.heads[:, :, i], single.dla.heads[:, :, 0]),
            (batch.dla.neurons[:, :, i], single.dla.neurons[:, :, 0]),
        ]
        for got, want in pairs:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # Ranks are decided by comparing floats that batching rounds differently: both are the rank in
        # TransformerLens's own lens, up to rivals that tie the answer to rounding.
        full = floats.lens_logits(any_model, single.rows[0].tokens, "standard")
        for rank in (batch.lens.standard.rank[:, i], single.lens.standard.rank[:, 0]):
            floats.assert_rank_allowed(rank, full, single.rows[0].target)


def test_multi_token_steps_are_teacher_forced(tiny):
    tr = tl.trace(tiny, "what is 9 + 3", " 12")
    step2 = tl.trace(tiny, "what is 9 + 3 1", "2")
    torch.testing.assert_close(tr.dla.components[:, 1], step2.dla.components[:, 0], rtol=1e-5, atol=1e-5)


def test_default_distractors_are_neighbouring_digits(any_model):
    tr = tl.trace(any_model, "what is 1 + 1", " 2")
    strs = [s.strip() for s in tr.margin.distractor_strs[0]]
    assert strs == ["1", "3"]
    # Written the same way as the answer: with or without its leading space.
    assert all(s.startswith(" ") == tr.rows[0].target_str.startswith(" ") for s in tr.margin.distractor_strs[0])


def test_non_digit_answers_are_compared_with_the_strongest_rival(gpt2):
    tr = tl.trace(gpt2, "The capital of France is", " Paris")
    (rival,) = tr.distractors[0]
    logits = gpt2(tl.resolve_answer(gpt2, "The capital of France is", " Paris").prompt_tokens[None])[0, -1]
    logits[tr.rows[0].target] = -torch.inf
    # The strongest rival in a plain forward pass, up to one that ties it to rounding (the trace's
    # logits come from another, batched computation).
    assert logits[rival] >= logits.max() - 1e-5 * logits.abs().max()


def test_explicit_distractors(tiny):
    tr = tl.trace(tiny, "what is 1 + 1", " 2", distractors=["7", "9"], metric="logit_diff")
    assert tr.margin.distractor_strs[0] == ["7", "9"]
    torch.testing.assert_close(tr.margin.logit_diff[0], tr.margin.logit[0] - tr.margin.distractor_logits[0].mean())
    rec = tr.dla.reconstruction
    torch.testing.assert_close(rec.actual[0], tr.margin.logit_diff[0], rtol=1e-5, atol=1e-5)


def test_to_dict_is_json_and_carries_the_reconstruction(tiny):
    tr = tl.trace(tiny, PROMPTS, ANSWERS)
    data = json.loads(json.dumps(tr.to_dict()))
    assert data["model"] == "tiny-arith" and len(data["rows"]) == 3
    rec = data["rows"][0]["reconstruction"]
    assert set(rec) == {"attributed", "bias", "actual", "residual"}
    assert rec["actual"] == pytest.approx(rec["attributed"] + rec["bias"] + rec["residual"])
    assert abs(rec["residual"]) < 1e-4
    assert data["rows"][0]["margin"]["rank"] == 0


def test_bad_inputs(tiny):
    with pytest.raises(ValueError, match="at least one prompt"):
        tl.trace(tiny, [], " 2")
    with pytest.raises(ValueError, match="one per prompt"):
        tl.trace(tiny, PROMPTS, [" 2", " 3"])
    with pytest.raises(ValueError, match="is the answer itself"):
        tl.trace(tiny, "what is 1 + 1", " 2", distractors=["2"])
    with pytest.raises(tl.MultiTokenAnswerError, match="resolve_answer"):
        tl.trace(tiny, "what is 1 + 1", " 2", distractors=[" 12"])
    with pytest.raises(ValueError, match="metric"):
        tl.trace(tiny, "what is 1 + 1", " 2", metric="prob")
    with pytest.raises(tl.EmptyInputError):
        tl.trace(tiny, "", " 2")


def test_margin_result(tiny):
    m = tl.logit_margin(tiny, "what is 1 + 1", " 2")
    assert int(m.rank[0]) == 0 and m.top(3)["token"].iloc[0] == "'2'"
    frame = m.to_frame()
    assert set(frame["role"]) == {"answer", "top1", "top2", "top3", "top4", "top5", "distractor"}
    assert m.plot().data[0].type == "bar"
    assert "rank 0" in repr(m)


@pytest.mark.parametrize("k", [0, -3])
def test_k_below_one_is_refused_everywhere(tiny, k):
    message = f"k must be a positive integer, got {k}"
    with pytest.raises(ValueError, match=message):
        tl.trace(tiny, "what is 1 + 1", " 2", k=k)
    tr = tl.trace(tiny, "what is 1 + 1", " 2")
    for call in (
        lambda: tr.to_dict(k=k),
        lambda: tr.summary(k=k),
        lambda: tr.dla.top(k, "head"),
        lambda: tr.dla.top_neurons(k),
        lambda: tr.margin.top(k),
        lambda: tr.lens.top(k),
        lambda: tr.heads.top(k),
        lambda: tr.heads.source(0, 0).top(k),
        lambda: tr.positions.top(k),
    ):
        with pytest.raises(ValueError, match=message):
            call()


@pytest.mark.parametrize("k", [2.5, "3", True, None])
def test_k_that_is_not_an_integer_is_refused(tiny, k):
    with pytest.raises(TypeError, match="k must be a positive integer"):
        tl.trace(tiny, "what is 1 + 1", " 2", k=k)


def test_k_accepts_any_integer_type(tiny):
    import numpy as np

    tr = tl.trace(tiny, "what is 1 + 1", " 2", k=np.int64(3))
    assert len(tr.margin.top_strs[0]) == 3 and len(tr.dla.top(np.int64(2))) == 2


@pytest.mark.parametrize(
    "make",
    [tuple, lambda p: (x for x in p), lambda p: map(str, p), lambda p: iter(p)],
    ids=["tuple", "generator", "map", "iterator"],
)
def test_any_iterable_of_prompts_traces_like_the_list(tiny, make):
    want = tl.trace(tiny, PROMPTS, ANSWERS)
    got = tl.trace(tiny, make(PROMPTS), make(ANSWERS))
    assert [row.label for row in got.rows] == [row.label for row in want.rows]
    torch.testing.assert_close(got.margin.logit, want.margin.logit)
    torch.testing.assert_close(got.dla.components, want.dla.components)
    one_answer = tl.trace(tiny, make(["what is 1 + 1", "what is 2 + 0"]), " 2")
    assert [row.target_str for row in one_answer.rows] == ["2", "2"]


def test_bytes_are_refused_with_a_hint_to_decode(tiny):
    with pytest.raises(TypeError, match=r"prompt\.decode\('utf-8'\)"):
        tl.trace(tiny, b"what is 1 + 1", " 2")
    with pytest.raises(TypeError, match=r"prompt\.decode\('utf-8'\)"):
        tl.trace(tiny, ["what is 1 + 1", b"what is 2 + 2"], " 2")
    with pytest.raises(TypeError, match=r"answer\.decode\('utf-8'\)"):
        tl.trace(tiny, "what is 1 + 1", b" 2")
    with pytest.raises(TypeError, match=r"decode\('utf-8'\)"):
        tl.trace(tiny, "what is 1 + 1", " 2", distractors=b"3")


def test_byte_fragment_answers_need_opting_in(tiny):
    with pytest.raises(tl.ByteFragmentError, match="byte fragments"):
        tl.trace(tiny, "what is 1 + 1", " é")
    tr = tl.trace(tiny, "what is 1 + 1", " é", allow_byte_fragments=True)
    assert [row.target_str for row in tr.rows] == ["<0xC3>", "<0xA9>"]  # distinct, not two '\ufffd'
    assert tr.rows[1].str_tokens[-1] == "<0xC3>"
    assert "'<0xA9>'" in tr.summary() and "\ufffd" not in tr.summary()
    assert tr.dla.reconstruction.ok


def test_distractors_can_be_one_list_per_prompt(tiny):
    # Each prompt's own rivals (None: that prompt's default), the numbers each prompt gives alone.
    both = tl.trace(tiny, PROMPTS[:2], ANSWERS[:2], distractors=[[" 3", " 4"], None])
    alone = [tl.trace(tiny, PROMPTS[0], ANSWERS[0], distractors=[" 3", " 4"]), tl.trace(tiny, PROMPTS[1], ANSWERS[1])]
    assert both.margin.distractor_strs == [alone[0].margin.distractor_strs[0], alone[1].margin.distractor_strs[0]]
    for r, one in enumerate(alone):
        scale = 1e-5 * max(1.0, one.margin.logit_diff.abs().max().item())
        assert abs(both.margin.logit_diff[r].item() - one.margin.logit_diff[0].item()) <= scale
    with pytest.raises(ValueError, match=r"one list per prompt \(2 lists, None for the default\); got 1 entries"):
        tl.trace(tiny, PROMPTS[:2], ANSWERS[:2], distractors=[[" 3"]])
    with pytest.raises(ValueError, match="got 2 entries, 1 of them lists"):
        tl.trace(tiny, PROMPTS[:2], ANSWERS[:2], distractors=[[" 3"], " 4"])
