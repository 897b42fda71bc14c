"""Both lenses: their endpoints, their agreement with TransformerLens, their difference."""

from __future__ import annotations

import torch
from transformer_lens.tools.analysis import logit_lens as tl_logit_lens

import tracelib as tl

PROMPT, ANSWER = "what is 1 + 1", " 2"


def test_last_entry_of_both_lenses_is_the_models_logit(traced, floats):
    model, tr, r = traced
    logits = floats.final_logits(model, tr.rows[0].tokens)[-1]
    for curve in (tr.lens.standard, tr.lens.dla):
        assert curve.labels[-1] == "final_post"
        torch.testing.assert_close(curve.logit[-1, 0], logits[r.token], rtol=1e-5, atol=1e-4)
        # The lens and the margin rank in different computations: both the model's rank, up to ties.
        floats.assert_rank_allowed(curve.rank[-1, 0], logits, r.token)
        floats.assert_rank_allowed(tr.margin.rank[0], logits, r.token)
        torch.testing.assert_close(curve.prob[-1, 0], tr.margin.prob[0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(curve.logit_diff[-1, 0], tr.margin.logit_diff[0], rtol=1e-5, atol=1e-4)


def test_standard_lens_matches_transformer_lens(traced, floats):
    model, tr, r = traced
    ref = tl_logit_lens(model, r.prompt_tokens[None], incl_mid=True, targets=r.token, return_type="log_probs")
    assert ref.labels == tr.lens.labels
    ours = (tr.lens.standard.prob[:, 0]).log()
    torch.testing.assert_close(ours, ref.values[:, 0, 0].cpu().float(), rtol=1e-4, atol=1e-4)
    # Ours and TransformerLens's ranks are both the rank in the lens's logits, up to ties to rounding.
    full = floats.lens_logits(model, tr.rows[0].tokens, "standard")
    for rank in (tr.lens.standard.rank[:, 0], ref.readout.target_ranks[:, 0, 0]):
        floats.assert_rank_allowed(rank, full, r.token)


def test_dla_lens_is_the_running_sum_of_component_dla(traced):
    """The cached-scale lens is linear: each whole-layer entry is b_U plus the DLA written so far."""
    _, tr, _ = traced
    dla = tr.dla
    bias = dla.reconstruction.bias[0]
    n_embed = len(dla.component_labels) - 2 * dla.n_layers
    running = torch.cumsum(dla.components[:, 0], 0)[n_embed - 1 :] + bias  # after embed, each sublayer
    torch.testing.assert_close(tr.lens.dla.logit[:, 0], running, rtol=1e-5, atol=1e-4)


def test_the_lenses_differ_before_the_end(tiny):
    tr = tl.trace(tiny, PROMPT, ANSWER)
    assert not torch.allclose(tr.lens.standard.logit[:-1, 0], tr.lens.dla.logit[:-1, 0])


def test_readable_from_is_the_first_entry_of_a_run_above_half_the_probability(any_model):
    """Readable = the lens gives the answer p > 0.5 (so top-1), from that entry to the end; None if not at the end."""
    tr = tl.trace(any_model, PROMPT, ANSWER)
    for curve in (tr.lens.standard, tr.lens.dla):
        label, prob = curve.readable_from(), curve.prob[:, 0]
        if label is None:
            assert prob[-1] <= 0.5
            continue
        i = curve.labels.index(label)
        assert (prob[i:] > 0.5).all() and (i == 0 or prob[i - 1] <= 0.5)
        assert (curve.rank[i:, 0] == 0).all()


def test_a_top1_guess_below_half_is_not_readable(tiny):
    """On the bundled model the standard lens ranks the answer first before it is readable: a lean, not a prediction."""
    tr = tl.trace(tiny, PROMPT, ANSWER)
    first = tr.lens.labels.index(tr.lens.readable_from())
    top1_early = (tr.lens.standard.rank[:first, 0] == 0) & (tr.lens.standard.prob[:first, 0] <= 0.5)
    assert top1_early.any()


def test_lens_figure_marks_where_the_answer_becomes_readable(tiny):
    tr = tl.trace(tiny, PROMPT, ANSWER)
    fig = tr.lens.plot(metric="prob")
    at = tl.plotting.component_label(tr.lens.readable_from())
    assert any(shape.x0 == at for shape in fig.layout.shapes)  # the vertical marker
    assert any(shape.y0 == 0.5 == shape.y1 for shape in fig.layout.shapes)  # the p = 0.5 line
    assert f"readable from {at}" in [a.text for a in fig.layout.annotations]
    assert f"from {at}" in fig.layout.title.text and "'2' - mean('1', '3')" in tr.lens.plot().layout.title.text


def test_per_layer_view_drops_sublayers(tiny):
    tr = tl.trace(tiny, PROMPT, ANSWER)
    idx = tr.lens.per_layer()
    assert len(idx) == tiny.cfg.n_layers + 1
    assert all(not tr.lens.labels[i].endswith("_mid") for i in idx)
    assert len(tr.lens.to_frame()) == 2 * len(tr.lens.labels)
    fig = tr.lens.plot()
    assert len(fig.data) == 2 and {d.name for d in fig.data} == {
        "standard logit lens (re-normalised)",
        "cached-scale DLA lens",
    }
