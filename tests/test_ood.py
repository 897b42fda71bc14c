"""OOD token injection and under-trained token detection."""

from __future__ import annotations

import pytest
import torch

import tracelib as tl
from tracelib.ood import KINDS, WHERES, find_undertrained_tokens, inject
from tracelib.tiny_arith import all_examples

# "typo" needs a word at every place; the other kinds work on the tutorial's own question.
PROMPTS = {kind: "what is 1 + 1" for kind in KINDS} | {"typo": "what is 1 plus 1 equals"}
ANSWER = " 2"


def check_injection(model, inj, prompt, answer) -> None:
    """Everything an injection promises, checked against the clean prompt's resolution."""
    clean = tl.resolve_answer(model, prompt, answer)
    torch.testing.assert_close(inj.clean_tokens, clean.prompt_tokens)
    # The final position, which predicts the answer, is the clean final token, still last.
    assert inj.answer_position == len(inj.tokens) - 1
    assert inj.tokens[-1].item() == clean.prompt_tokens[-1].item()
    assert inj.alignment[-1] == len(clean.prompt_tokens) - 1
    # The corrupted text reads back as exactly these tokens, and the answer is unchanged.
    corrupted = tl.resolve_answer(model, inj.prompt, answer)
    assert corrupted.prompt_tokens.tolist() == inj.tokens.tolist()
    assert corrupted.answer_tokens == clean.answer_tokens
    # Every kept position holds its clean token; injected ones map to None; nothing is dropped
    # except what a typo replaced, and the order is kept.
    assert inj.injected and all(inj.alignment[i] is None for i in inj.injected)
    kept = [(j, a) for j, a in enumerate(inj.alignment) if a is not None]
    assert [a for _, a in kept] == sorted(a for _, a in kept)
    for j, a in kept:
        assert inj.tokens[j].item() == inj.clean_tokens[a].item()
    dropped = len(inj.clean_tokens) - len(kept)
    assert dropped == (1 if inj.kind == "typo" else 0)
    # The exact alignment agrees with the generic one from compare. Where an injected token equals a
    # clean one (a repeat, a space), which copy counts as injected is a free choice: then the generic
    # alignment must be an equally good matching (as many kept, each onto an equal token).
    generic = tl.align_tokens(inj.clean_tokens, inj.tokens)
    if not {inj.tokens[i].item() for i in inj.injected} & set(inj.clean_tokens.tolist()):
        assert list(inj.alignment) == generic
    assert sum(a is None for a in generic) == len(inj.injected)
    assert all(inj.tokens[j].item() == inj.clean_tokens[a].item() for j, a in enumerate(generic) if a is not None)


@pytest.mark.parametrize("where", WHERES)
@pytest.mark.parametrize("kind", KINDS)
def test_inject_every_kind_and_place_on_tiny(tiny, kind, where):
    inj = inject(tiny, PROMPTS[kind], kind, where, n=2, seed=3, answer=ANSWER)
    check_injection(tiny, inj, PROMPTS[kind], ANSWER)
    if kind != "typo":
        assert len(inj.tokens) > len(inj.clean_tokens)
    if kind == "repeat":
        assert len({inj.tokens[i].item() for i in inj.injected}) == 1


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("where", ["between", "before_final"])
def test_inject_on_gpt2_and_qwen(gpt2, qwen, kind, where):
    for model in (gpt2, qwen):
        if model is gpt2 and kind == "typo" and where == "before_final":
            # GPT-2's " 2" is one token, so " equals" is the final position itself and " 1" precedes it.
            with pytest.raises(ValueError, match="No word to make a typo in 'before_final'"):
                inject(model, PROMPTS[kind], kind, where, answer=ANSWER)
            continue
        inj = inject(model, PROMPTS[kind], kind, where, n=1, seed=0, answer=ANSWER)
        check_injection(model, inj, PROMPTS[kind], ANSWER)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("where", ["before", "after"])
def test_inject_into_a_chat_prompt(tiny_chat, kind, where):
    prompt = tl.chat_prompt(tiny_chat, "what is 1 plus 1 equals")
    inj = inject(tiny_chat, prompt, kind, where, n=2, seed=1, answer=ANSWER)
    check_injection(tiny_chat, inj, prompt, ANSWER)
    # The template around the question is untouched.
    assert inj.prompt.startswith("<|im_start|>user\n") and inj.prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_inject_keeps_operands_and_places(tiny):
    inj = inject(tiny, "what is 3 + 4", "junk", "between", answer=ANSWER)
    assert "3" in inj.prompt and "4" in inj.prompt
    first = inj.injected[0]
    # Between: right after the first operand, before the operator.
    assert inj.str_tokens[first - 1] == "3"
    before = inject(tiny, "what is 3 + 4", "junk", "before", answer=ANSWER)
    # Before: ahead of the operand's own space token (Qwen-style " 3" is [" ", "3"]).
    assert before.str_tokens[before.injected[-1] + 1 : before.injected[-1] + 3] == [" ", "3"]
    final = inject(tiny, "what is 3 + 4", "random", "before_final", n=3, answer=ANSWER)
    assert final.injected == (len(final.tokens) - 4, len(final.tokens) - 3, len(final.tokens) - 2)


def test_inject_without_answer_keeps_final_token(tiny):
    inj = inject(tiny, "1 plus 1 equals", "random", "before_final", n=2)
    assert inj.tokens[-1].item() == inj.clean_tokens[-1].item()
    assert inj.str_tokens[-1] == " equals"
    assert list(inj.alignment) == tl.align_tokens(inj.clean_tokens, inj.tokens)


def test_inject_is_seeded(tiny):
    a = inject(tiny, "what is 1 + 1", "random", "between", n=3, seed=7, answer=ANSWER)
    b = inject(tiny, "what is 1 + 1", "random", "between", n=3, seed=7, answer=ANSWER)
    assert a.tokens.tolist() == b.tokens.tolist() and a.prompt == b.prompt and a.alignment == b.alignment
    others = {
        tuple(inject(tiny, "what is 1 + 1", "random", "between", n=3, seed=s, answer=ANSWER).tokens.tolist())
        for s in range(5)
    }
    assert len(others) > 1
    typo = [inject(tiny, "what is 1 plus 1 equals", "typo", "after", seed=s, answer=ANSWER).prompt for s in (1, 1)]
    assert typo[0] == typo[1]


def test_undertrained_injection_uses_flagged_tokens(tiny):
    flagged = set(find_undertrained_tokens(tiny).token_ids.tolist())
    inj = inject(tiny, "what is 1 + 1", "undertrained", "after", n=4, answer=ANSWER)
    assert all(inj.tokens[i].item() in flagged for i in inj.injected)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"kind": "noise", "where": "before"},
            ValueError,
            "Unknown kind 'noise'; choose one of random, undertrained, junk, typo",
        ),
        (
            {"kind": "junk", "where": "inside"},
            ValueError,
            "Unknown where 'inside'; choose one of before, between, after",
        ),
        ({"kind": "junk", "where": "before", "n": 0}, ValueError, "n must be a positive integer"),
        # The wrong type is a TypeError, as for k and batch_size.
        ({"kind": "junk", "where": "before", "n": 1.5}, TypeError, "n must be a positive integer"),
        ({"kind": "junk", "where": "before", "n": True}, TypeError, "n must be a positive integer"),
    ],
)
def test_inject_refuses_bad_arguments(tiny, kwargs, error, message):
    with pytest.raises(error, match=message.replace("?", r"\?")):
        inject(tiny, "what is 1 + 1", **kwargs)


def test_inject_refuses_places_the_prompt_lacks(tiny, gpt2):
    with pytest.raises(ValueError, match="has one operand, so nothing is 'between'"):
        inject(tiny, "what is 7 then", "junk", "between")
    with pytest.raises(ValueError, match="has no operands"):
        inject(tiny, "what is this", "junk", "before")
    # GPT-2 writes " 1" as one token, so this prompt's final position is its last operand.
    with pytest.raises(ValueError, match="ends in its last operand"):
        inject(gpt2, "what is 1 + 1", "junk", "after")
    with pytest.raises(ValueError, match="No word to make a typo"):
        inject(tiny, "what is 1 + 1", "typo", "between", answer=ANSWER)


def test_injection_repr_and_frame(tiny):
    inj = inject(tiny, "what is 1 + 1", "junk", "between", answer=ANSWER)
    assert repr(inj).startswith("Injection('junk' 'between': 'what is 1 + 1 ' -> ")
    frame = inj.to_frame()
    assert len(frame) == len(inj.tokens) and frame["injected"].sum() == len(inj.injected)


def never_seen_tokens(model, chat: bool) -> set[int]:
    """The ground truth: the tokens that occur nowhere in the bundled model's training data."""
    tok = model.tokenizer
    seen: set[int] = set()
    for e in all_examples():
        seen.update(tok(f"{e.prompt} {e.answer}<|endoftext|>", add_special_tokens=False).input_ids)
        if chat:
            messages = [{"role": "user", "content": e.prompt}]
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            seen.update(tok(text + e.answer + "<|im_end|>", add_special_tokens=False).input_ids)
    return set(range(model.cfg.d_vocab)) - seen


@pytest.mark.parametrize("name", ["tiny", "tiny_chat"])
def test_undertrained_detector_precision_recall(request, name):
    model = request.getfixturevalue(name)
    truth = never_seen_tokens(model, chat=name == "tiny_chat")
    found = find_undertrained_tokens(model)
    flagged = set(found.token_ids.tolist())
    precision = len(flagged & truth) / len(flagged)
    recall = len(flagged & truth) / len(truth)
    # Measured: precision 1.000 and recall 1.000 on both (275 and 270 never-seen tokens of 303);
    # the margin allows a retrained model to blur a token or two at the edge of the gap.
    assert precision >= 0.95 and recall >= 0.95, (precision, recall)
    assert found.scores.shape == (model.cfg.d_vocab,)
    assert (found.scores[found.token_ids] < found.threshold).all()
    assert found.scores[found.token_ids].diff().ge(0).all()  # lowest score first
    assert repr(found).startswith(f"UndertrainedTokens({len(flagged)} of {model.cfg.d_vocab} tokens below ")
    assert found.precision_recall(truth) == (precision, recall)
    fig = found.plot(truth)
    assert f"precision {precision:.3f}, recall {recall:.3f}" in fig.layout.title.text
    # One histogram per side of the truth, holding every token once.
    assert sorted(len(trace.x) for trace in fig.data) == sorted([len(truth), model.cfg.d_vocab - len(truth)])


def test_precision_recall_counts(tiny):
    found = find_undertrained_tokens(tiny)
    flagged = found.token_ids.tolist()
    assert found.precision_recall(flagged[:2]) == (2 / len(flagged), 1.0)
    assert found.precision_recall(flagged + [10**6]) == (1.0, len(flagged) / (len(flagged) + 1))
    precision, recall = found.precision_recall([])
    assert precision == 0.0 and recall != recall  # no truth: recall is undefined (NaN)
    assert len(found.plot().data) == 1


def test_undertrained_threshold_can_be_given(tiny):
    assert len(find_undertrained_tokens(tiny, threshold=0.0).token_ids) == 0
    assert len(find_undertrained_tokens(tiny, threshold=float("inf")).token_ids) == tiny.cfg.d_vocab


# --- damage_report: a corrupted trace measured against the clean reference ---------------------------

from dataclasses import replace  # noqa: E402

import plotly.graph_objects as go  # noqa: E402

from tracelib.ood import COMPONENT_SHARE, LENSES, STATUSES, DamageReport, damage_report, damage_status  # noqa: E402


@pytest.fixture(scope="module")
def junk_damage(tiny):
    """(reference, corrupted, report) for junk between the operands of the running example."""
    inj = tl.inject(tiny, "what is 1 + 1", "junk", "between", n=3, seed=0, answer=ANSWER)
    reference = tl.trace(tiny, "what is 1 + 1", ANSWER)
    corrupted = tl.trace(tiny, inj.prompt, ANSWER)
    return reference, corrupted, tl.damage_report(reference, corrupted)


def test_damage_of_a_trace_against_itself_is_none(traced):
    _, tr, _ = traced
    report = damage_report(tr, tr, k=3)
    assert report.margin_drop == 0.0 and report.reference_rank == report.corrupted_rank
    assert (report.ratio == 1).all() and report.statuses == ["survives"] * len(report.features)
    assert report.counts() == {"survives": len(report.features), "damaged": 0, "unreadable": 0}
    assert (report.curve_shift == 0).all()
    for lens in LENSES:
        readable = tr.lens.readable_from(0, lens)
        assert report.readable_shift(lens) == (0 if readable is not None else None)
    assert report.kinds.count("head") == 3
    # Every component at or above the share is a feature, and none below it.
    comps = tr.dla.components[:, 0].abs()
    expected = [lab for lab, v in zip(tr.dla.component_labels, comps) if v >= COMPONENT_SHARE * comps.max()]
    assert [f for f, kind in zip(report.features, report.kinds) if kind == "component"] == expected
    assert isinstance(report.plot(), go.Figure)


def test_damage_readable_shift_when_the_answer_is_never_readable(junk_damage):
    reference, corrupted, _ = junk_damage
    lost = replace(corrupted.lens.standard, prob=corrupted.lens.standard.prob * 0)  # never readable
    report = damage_report(reference, replace(corrupted, lens=replace(corrupted.lens, standard=lost)))
    assert report.corrupted_readable[0] is None and report.readable_shift("standard") is None
    assert report.readable_shift("dla") == damage_report(reference, corrupted).readable_shift("dla")
    assert "-> never (standard)" in repr(report)
    assert "never readable" in report.plot().data[1].name


def test_damage_status_follows_the_thresholds():
    assert [damage_status(r) for r in (1.0, 0.75, 1.25, 0.9, 1.1)] == ["survives"] * 5
    assert [damage_status(r) for r in (0.7499, 0.25, 0.5, 1.2501, 3.0)] == ["damaged"] * 5
    assert [damage_status(r) for r in (0.2499, 0.0, -0.5, -1.0, -3.0, float("nan"))] == ["unreadable"] * 6


def test_damage_statuses_of_scaled_features(junk_damage):
    reference, _, _ = junk_damage
    # A corrupted copy whose components and heads are the reference's scaled by known factors.
    n_comp = reference.dla.components.shape[0]
    scale = torch.tensor([1.0, 0.5, -1.0, 1.5, 0.1, 0.8, 2.0, 0.3, 1.2])[:n_comp]
    head_scale = torch.full_like(reference.dla.heads, 0.9)
    # The reference's two largest heads by |DLA|, found here (a retrained model has others): the
    # largest flipped and shrunk (unreadable), the next halved (damaged); so every status occurs.
    order = reference.dla.heads[:, :, 0].abs().flatten().argsort(descending=True)
    (l1, h1), (l2, h2) = (divmod(int(i), reference.dla.heads.shape[1]) for i in order[:2])
    head_scale[l1, h1], head_scale[l2, h2] = -0.2, 0.5
    largest = f"L{l1}H{h1}"
    dla = replace(
        reference.dla,
        components=reference.dla.components * scale[:, None],
        heads=reference.dla.heads * head_scale,
    )
    report = damage_report(reference, replace(reference, dla=dla), k=4)
    frame = report.to_frame()
    # The frame shows display labels ("L0 MLP"); report.features keeps TransformerLens's names, in the same order.
    for feature, kind, ratio, status in zip(report.features, frame["kind"], frame["ratio"], frame["status"]):
        factor = (
            scale[reference.dla.component_labels.index(feature)].item()
            if kind == "component"
            else head_scale[int(feature[1]), int(feature[3])].item()
        )
        assert ratio == pytest.approx(factor, rel=1e-6)
        assert status == damage_status(factor)
    assert largest in report.features and frame.set_index("feature").loc[largest, "status"] == "unreadable"
    assert set(frame["status"]) == set(STATUSES)


def test_damage_of_a_real_injection(junk_damage):
    reference, corrupted, report = junk_damage
    assert report.margin_drop == pytest.approx(
        reference.margin.logit_diff[0].item() - corrupted.margin.logit_diff[0].item()
    )
    # Each feature's values are the two traces' own DLA entries.
    for i, (feature, kind) in enumerate(zip(report.features, report.kinds)):
        for tr, values in ((reference, report.reference), (corrupted, report.corrupted)):
            if kind == "component":
                want = tr.dla.components[tr.dla.component_labels.index(feature), 0]
            else:
                want = tr.dla.heads[int(feature[1]), int(feature[3]), 0]
            assert values[i].item() == want.item()
    # The heads are the reference's top 5 by |DLA|, largest first.
    assert [f for f, k in zip(report.features, report.kinds) if k == "head"] == list(
        reference.dla.top(5, "head", 0)["head"]
    )
    torch.testing.assert_close(report.reference_curves[0], reference.lens.standard.logit_diff[:, 0].double())
    torch.testing.assert_close(report.corrupted_curves[1], corrupted.lens.dla.logit_diff[:, 0].double())
    frame = report.to_frame()
    assert len(frame) == len(report.features) and list(frame.columns) == [
        "feature",
        "kind",
        "reference",
        "corrupted",
        "ratio",
        "status",
    ]
    assert sum(report.counts().values()) == len(report.features)
    assert len(report.top(3)) == 3
    assert repr(report).startswith(f"DamageReport('2': logit diff {reference.margin.logit_diff[0].item():+.3f} -> ")
    fig = report.plot()
    assert isinstance(fig, go.Figure)
    thresholds = {s.x0 for s in fig.layout.shapes if s.type == "line" and s.line.dash == "dash"}
    assert thresholds == {0.25, 0.75, 1.25}
    texts = [a.text for a in fig.layout.annotations]
    assert any("unreadable below" in t for t in texts)
    assert "Green survives" in fig.layout.title.text and "grey is unreadable" in fig.layout.title.text
    # One marker per feature across the status traces, coloured by status.
    markers = [t for t in fig.data if t.legendgroup == "status"]
    assert sum(len(t.x) for t in markers) == len(report.features)


def test_damage_report_refuses_mismatched_traces(junk_damage, tiny, gpt2):
    reference, corrupted, _ = junk_damage
    with pytest.raises(ValueError, match=r"different answer tokens: '2' \(id \d+\) in the reference, '3'"):
        damage_report(reference, tl.trace(tiny, "what is 1 + 1", " 3"))
    with pytest.raises(ValueError, match="differently shaped models: the reference \\('tiny-arith'\\) has 4 layers"):
        damage_report(reference, tl.trace(gpt2, "what is 1 + 1", ANSWER))
    with pytest.raises(ValueError, match="row 1 is out of range: the reference trace has 1 row"):
        damage_report(reference, corrupted, row=1)
    with pytest.raises(ValueError, match="different DLA metrics \\('logit_diff' in the reference, 'logit'"):
        damage_report(reference, tl.trace(tiny, "what is 1 + 1", ANSWER, metric="logit"))
    with pytest.raises(ValueError, match="different distractors"):
        damage_report(reference, tl.trace(tiny, "what is 1 + 1", ANSWER, distractors=[" 4"]))


def test_damage_report_checks_shapes(junk_damage):
    _, _, report = junk_damage
    with pytest.raises(ValueError, match="DamageReport.corrupted must be \\[feature\\]"):
        replace(report, corrupted=report.corrupted[:-1])
    with pytest.raises(ValueError, match="DamageReport.reference_curves must be \\[lens, entry\\]"):
        replace(report, reference_curves=report.reference_curves[:1])


def test_damage_report_against_a_reference_loaded_from_disk(junk_damage, tiny, tmp_path):
    reference, corrupted, report = junk_damage
    reference.save(tmp_path / "ref", tiny)
    loaded = damage_report(tl.load_reference(tmp_path / "ref"), corrupted)
    assert repr(loaded) == repr(report)
    assert loaded.to_frame().equals(report.to_frame())
    torch.testing.assert_close(loaded.reference_curves, report.reference_curves)


def test_damage_report_is_exported():
    assert tl.damage_report is damage_report and tl.DamageReport is DamageReport


def test_injection_table_shows_tokens_with_repr(tiny):
    injection = tl.inject(tiny, "what is 1 + 1", "junk", "after", n=2, seed=0, answer=" 2")
    assert injection.to_frame()["token"].tolist() == [repr(t) for t in injection.str_tokens]


def test_damage_report_pairs_any_row_with_any_row(tiny):
    # corrupted_row: row 1 of a two-prompt reference against row 0 of a one-prompt corrupted trace
    # is the report the two one-prompt traces give.
    prompts, answers = ["what is 1 + 1", "what is 3 + 4"], [" 2", " 7"]
    reference = tl.trace(tiny, prompts, answers)
    inj = inject(tiny, prompts[1], "junk", "after", 3, answer=answers[1])
    corrupted = tl.trace(tiny, inj.prompt, answers[1])
    paired = damage_report(reference, corrupted, row=1, corrupted_row=0)
    alone = damage_report(tl.trace(tiny, prompts[1], answers[1]), corrupted)
    assert paired.features == alone.features and paired.statuses == alone.statuses
    torch.testing.assert_close(paired.corrupted, alone.corrupted)
    scale = 1e-5 * alone.reference.abs().max().item()  # batched with another prompt: rounding only
    torch.testing.assert_close(paired.reference, alone.reference, rtol=1e-5, atol=scale)
    with pytest.raises(ValueError, match="the corrupted trace"):
        damage_report(reference, corrupted, row=1, corrupted_row=1)
