"""Attribution patching: TransformerLens's scores, the true first-order term, linearity, and the comparisons."""

from __future__ import annotations

import math

import pandas as pd
import plotly.graph_objects as go
import pytest
import torch
from transformer_lens.tools.analysis.attribution_patching import attribution_patch as tl_attribution_patch

import tracelib as tl
from tracelib.patching import WHATS, logit_diff, prepare, run_cached

CLEAN, CORRUPTED, ANSWER = "what is 1 + 1", "what is 3 + 1", " 2"
# As in test_patching.py: the random-init models' swap is a weak effect by design; their invariants
# hold regardless, so their sweeps turn the check off. Any other weak-corruption warning is an error.
QUIET = {"min_effect": 0.0}
pytestmark = pytest.mark.filterwarnings("error::tracelib.WeakCorruptionWarning")


@pytest.fixture(params=["tiny", "gpt2", "qwen"], scope="module")
def any_model(request):
    """The three model families; the random-init ones in float64 (their logit-difference gap is about 1e-3)."""
    if request.param == "tiny":
        return request.getfixturevalue("tiny")
    return tl.load_model(request.getfixturevalue(f"{request.param}_dir"), dtype=torch.float64)


@pytest.fixture(scope="module")
def estimates(any_model):
    return any_model, {
        (what, d): tl.attribution_patch(any_model, CLEAN, CORRUPTED, ANSWER, what=what, direction=d, **QUIET)
        for what in WHATS
        for d in ("denoise", "noise")
    }


def _tl_scores(model, first_prompt, second_prompt):
    """TransformerLens's own node scores (gradient on `second_prompt`, toward `first_prompt`), same metric."""
    from tracelib.patching import _resolve

    _, _, _, _, setup = prepare(model, CLEAN, CORRUPTED, ANSWER, "denoise", None, None, [])

    def metric(logits):
        return logit_diff(logits[:, -1].double(), setup.target, setup.distractors)[0]

    first, second = (_resolve(model, p, ANSWER, None).tokens[None] for p in (first_prompt, second_prompt))
    with torch.enable_grad():
        return tl_attribution_patch(model, first, second, metric).node_scores


def test_heads_and_mlps_equal_transformer_lens_node_scores(estimates):
    # For equal-length prompts, denoising estimates are TransformerLens's attribution_patch scores / span.
    model, est = estimates
    heads, mlps = est[("head_by_pos", "denoise")], est[("mlp_out", "denoise")]
    span = heads.clean_metric - heads.corrupted_metric
    scores = _tl_scores(model, CLEAN, CORRUPTED)
    checked = 0
    for node, score in scores.items():
        if node.kind == "attn_head_out":
            ours = heads.values[node.layer, node.head, node.position].double() * span
        elif node.kind == "mlp_out":
            ours = mlps.values[node.layer, node.position].double() * span
        else:
            continue
        assert abs(ours.item() - score) <= 1e-6 * max(1.0, abs(score)) + 1e-9 * abs(span), node
        checked += 1
    assert checked == model.cfg.n_layers * len(heads.str_tokens) * (model.cfg.n_heads + 1)


def test_noising_equals_transformer_lens_with_the_prompts_swapped(estimates):
    # Noising takes the gradient on the clean run and moves toward the corrupted one: TL's
    # denoising convention with the two prompts swapped, read as 1 + score / span.
    model, est = estimates
    heads = est[("head_by_pos", "noise")]
    span = heads.clean_metric - heads.corrupted_metric
    scores = _tl_scores(model, CORRUPTED, CLEAN)
    for node, score in scores.items():
        if node.kind == "attn_head_out":
            ours = (heads.values[node.layer, node.head, node.position].double() - 1.0) * span
            assert abs(ours.item() - score) <= 1e-6 * max(1.0, abs(score)) + 1e-9 * abs(span), node


def test_estimate_is_the_true_first_order_term(any_model):
    # Independent of TransformerLens's backward hooks: put the activation on the straight line
    # a(t) = a_corrupted + t (a_clean - a_corrupted) with t a leaf tensor, and differentiate the metric
    # by t at 0 with plain autograd. (Finite differences cannot check this to many digits: transformers'
    # eager attention takes its softmax in float32 even in a float64 model.)
    model = any_model
    for what, hook in [("resid_pre", "hook_resid_pre"), ("mlp_out", "hook_mlp_out"), ("attn_out", "hook_attn_out")]:
        estimate = tl.attribution_patch(model, CLEAN, CORRUPTED, ANSWER, what=what, **QUIET)
        span = estimate.clean_metric - estimate.corrupted_metric
        for layer in (0, model.cfg.n_layers - 1):
            name = f"blocks.{layer}.{hook}"
            _, _, _, _, setup = prepare(model, CLEAN, CORRUPTED, ANSWER, "denoise", None, None, [name])
            _, base = run_cached(model, setup.base_tokens, [name])
            for pos in range(setup.base_tokens.shape[1]):
                t = torch.zeros((), dtype=base[name].dtype, requires_grad=True)
                delta = setup.source_cache[name][pos] - base[name][pos]

                def on_line(act, hook, pos=pos, delta=delta, t=t, start=base[name]):
                    act = act.clone()
                    act[0, pos] = start[pos] + t * delta
                    return act

                with torch.enable_grad():
                    logits = model.run_with_hooks(setup.base_tokens, fwd_hooks=[(name, on_line)])
                    metric = logit_diff(logits[:, -1].double(), setup.target, setup.distractors)[0]
                    (slope,) = torch.autograd.grad(metric, t)
                got = estimate.values[layer, pos].double().item() * span
                assert abs(got - slope.item()) <= 1e-5 * max(abs(slope.item()), 1e-3 * abs(span)), (what, layer, pos)


def test_linearity_identities(estimates):
    # A first-order estimate is linear in the patch: heads add up to attn_out (b_O cancels in the
    # difference), and "all positions" is the sum over positions.
    _, est = estimates
    for d in ("denoise", "noise"):
        offset = 1.0 if d == "noise" else 0.0
        by_pos = est[("head_by_pos", d)].values.double() - offset
        torch.testing.assert_close(by_pos.sum(1), est[("attn_out", d)].values.double() - offset, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(by_pos.sum(-1), est[("head", d)].values.double() - offset, atol=1e-5, rtol=1e-4)
        for what in ("resid_pre", "attn_out", "mlp_out"):
            summed = (est[(what, d)].values.double() - offset).sum(-1)
            torch.testing.assert_close(
                summed, est[(f"{what}_all_pos", d)].values.double() - offset, atol=1e-5, rtol=1e-4
            )


def test_unchanged_tokens_at_layer_0_give_zero(estimates):
    # resid_pre at layer 0 is the embedding: where both prompts hold the same token nothing moves.
    model, est = estimates
    result = est[("resid_pre", "denoise")]
    clean = tl.resolve_answer(model, CLEAN, ANSWER).prompt_str_tokens
    same = torch.tensor([a == b for a, b in zip(clean, result.str_tokens)])
    assert (result.values[0, same] == 0).all() and (result.values[0, ~same] != 0).all()


def test_result_matches_exact_patching_layout(estimates):
    model, est = estimates
    for (what, d), result in est.items():
        exact = (
            tl.patch(model, CLEAN, CORRUPTED, ANSWER, what=what, direction=d, **QUIET) if what == "resid_pre" else None
        )
        assert result.method == "attribution" and result.what == what and result.direction == d
        assert torch.isfinite(result.values).all()
        if exact is not None:
            assert (result.dims, result.labels, result.str_tokens) == (exact.dims, exact.labels, exact.str_tokens)
            assert result.clean_metric == pytest.approx(exact.clean_metric, abs=1e-5)
            assert result.corrupted_metric == pytest.approx(exact.corrupted_metric, abs=1e-5)
    assert "attribution estimate" in repr(est[("head", "denoise")])
    assert "Attribution patching" in est[("resid_pre", "denoise")].plot().layout.title.text


def test_two_forwards_and_one_backward(tiny, monkeypatch):
    # The cost claim, counted rather than timed: one forward per prompt, one backward in all.
    import torch.autograd

    calls = {"forward": 0, "backward": 0}
    forward, grad = type(tiny).forward, torch.autograd.grad

    def counting_forward(self, *a, **kw):
        calls["forward"] += 1
        return forward(self, *a, **kw)

    def counting_grad(*a, **kw):
        calls["backward"] += 1
        return grad(*a, **kw)

    tl.attribution_patch(tiny, CLEAN, CORRUPTED, ANSWER, what="resid_pre")  # resolve and warm up first
    monkeypatch.setattr(type(tiny), "forward", counting_forward)
    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    tl.attribution_patch(tiny, CLEAN, CORRUPTED, ANSWER, what="head_by_pos")
    assert calls == {"forward": 2, "backward": 1}


def test_insertion_is_aligned_and_nan(any_model):
    injection = tl.inject(any_model, CLEAN, "junk", "between", n=1, seed=0, answer=ANSWER)
    # One junk token barely moves the answer (a weak effect, see the tests at the end); NaNs are the point here.
    aligned = dict(alignment=injection.alignment, min_effect=0.0)
    est = tl.attribution_patch(any_model, CLEAN, injection.prompt, ANSWER, **aligned)
    exact = tl.patch(any_model, CLEAN, injection.prompt, ANSWER, **aligned)
    assert est.values.isnan().equal(exact.values.isnan())
    assert est.no_counterpart == list(injection.injected)
    noise = tl.attribution_patch(any_model, CLEAN, injection.prompt, ANSWER, direction="noise", **aligned)
    assert not noise.values.isnan().any()  # every clean position has a counterpart


def test_errors(tiny):
    with pytest.raises(tl.SameMetricError, match="same logit difference"):
        tl.attribution_patch(tiny, CLEAN, CLEAN, ANSWER)
    with pytest.raises(ValueError, match="what must be one of"):
        tl.attribution_patch(tiny, CLEAN, CORRUPTED, ANSWER, what="neurons")
    with pytest.raises(ValueError, match="direction must be one of"):
        tl.attribution_patch(tiny, CLEAN, CORRUPTED, ANSWER, direction="sideways")
    tiny.train()
    try:
        with pytest.raises(ValueError, match="eval"):
            tl.attribution_patch(tiny, CLEAN, CORRUPTED, ANSWER)
    finally:
        tiny.eval()


def test_works_with_gradients_off(tiny):
    # setup_notebook() turns gradients off; attribution patching turns them on for its own backward.
    with torch.no_grad():
        result = tl.attribution_patch(tiny, CLEAN, CORRUPTED, ANSWER)
        assert not torch.is_grad_enabled()  # and it leaves them off
    torch.testing.assert_close(result.values, tl.attribution_patch(tiny, CLEAN, CORRUPTED, ANSWER).values)
    assert (result.values != 0).any()


def test_compare_patching(tiny):
    exact = tl.patch(tiny, CLEAN, CORRUPTED, ANSWER, what="head")
    est = tl.attribution_patch(tiny, CLEAN, CORRUPTED, ANSWER, what="head")
    agreement = tl.compare_patching(exact, est)
    frame = agreement.to_frame()
    assert len(frame) == tiny.cfg.n_layers * tiny.cfg.n_heads
    torch.testing.assert_close(torch.tensor(frame["exact"].values), exact.values.flatten().double(), atol=1e-6, rtol=0)
    expected = torch.corrcoef(torch.stack([exact.values.flatten(), est.values.flatten()]))[0, 1].item()
    assert agreement.pearson == pytest.approx(expected, abs=1e-5)
    worst = agreement.top(1).iloc[0]
    assert abs(worst["difference"]) == pytest.approx(frame["difference"].abs().max())
    assert isinstance(agreement.plot(), go.Figure)
    # Compared with itself (an estimate relabelled as exact), the agreement is perfect.
    import dataclasses

    same = tl.compare_patching(dataclasses.replace(est, method="exact"), est)
    assert same.pearson == pytest.approx(1.0) and same.spearman == pytest.approx(1.0)
    with pytest.raises(ValueError, match="patch\\(\\) result then an attribution_patch\\(\\)"):
        tl.compare_patching(est, exact)
    other = tl.attribution_patch(tiny, CLEAN, CORRUPTED, ANSWER, what="resid_pre")
    with pytest.raises(ValueError, match="differ in what"):
        tl.compare_patching(exact, other)


def test_readable_vs_causal(tiny):
    trace = tl.trace(tiny, CLEAN, ANSWER)
    heads = tl.patch(tiny, CLEAN, CORRUPTED, ANSWER, what="head")
    attn = tl.patch(tiny, CLEAN, CORRUPTED, ANSWER, what="attn_out_all_pos")
    mlp = tl.patch(tiny, CLEAN, CORRUPTED, ANSWER, what="mlp_out_all_pos")
    result = tl.readable_vs_causal(trace, heads, attn, mlp)
    frame = result.to_frame()
    n_layers, n_heads = tiny.cfg.n_layers, tiny.cfg.n_heads
    assert len(frame) == n_layers * n_heads + 2 * n_layers
    by_unit = frame.set_index("unit")
    for layer in range(n_layers):
        for head in range(n_heads):
            assert by_unit.loc[f"L{layer}H{head}", "dla"] == pytest.approx(trace.dla.heads[layer, head, 0].item())
            assert by_unit.loc[f"L{layer}H{head}", "recovery"] == pytest.approx(heads.values[layer, head].item())
        index = trace.dla.component_labels.index(f"{layer}_mlp_out")
        assert by_unit.loc[f"L{layer} MLP", "dla"] == pytest.approx(trace.dla.components[index, 0].item())
        assert by_unit.loc[f"L{layer} attn", "recovery"] == pytest.approx(attn.values[layer].item())
    pair = result.disagreements("head")
    assert pair.loc["largest |DLA|", "dla_rank"] == 1 and pair.loc["largest |recovery|", "recovery_rank"] == 1
    assert isinstance(result.plot(), go.Figure) and isinstance(frame, pd.DataFrame)
    assert "largest |DLA|" in repr(result)
    with pytest.raises(ValueError, match="what in"):
        tl.readable_vs_causal(trace, tl.patch(tiny, CLEAN, CORRUPTED, ANSWER, what="resid_pre"))
    with pytest.raises(ValueError, match="at least one"):
        tl.readable_vs_causal(trace)
    with pytest.raises(ValueError, match="different models"):
        import dataclasses

        short = dict(values=mlp.values[:2], raw_change=mlp.raw_change[:2], labels=(mlp.labels[0][:2],))
        tl.readable_vs_causal(trace, dataclasses.replace(mlp, **short))


WEAK_PROMPT, WEAK_ANSWER = "what is 2 + 3", " 5"


@pytest.fixture(scope="module")
def weak(weak_injection):
    """Junk after the operands of "what is 2 + 3": the seed whose effect is smallest (tests/conftest.py)."""
    return weak_injection[0]


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_weak_corruption_warns_and_keeps_the_raw_change(tiny, weak, direction):
    with pytest.warns(tl.WeakCorruptionWarning, match="barely changes the answer") as caught:
        est = tl.attribution_patch(
            tiny, WEAK_PROMPT, weak.prompt, WEAK_ANSWER, direction=direction, alignment=weak.alignment
        )
    assert f"Δ = {est.delta:+.3f}" in str(caught[0].message)
    assert est.weak_effect and est.method == "attribution"
    torch.testing.assert_close(
        est.values.double() * est.delta, est.raw_change.double(), atol=1e-6, rtol=1e-5, equal_nan=True
    )
    # The estimate of patched - corrupted: at layer 0, before the junk, nothing differs, so nothing
    # moves when denoising, and noising leaves the clean run's own delta.
    before = list(range(weak.injected[0]))
    expected = 0.0 if direction == "denoise" else est.delta
    torch.testing.assert_close(
        est.raw_change[0, before].double(), torch.full((len(before),), expected, dtype=torch.float64), atol=1e-5, rtol=0
    )
    assert "not recovery" in est.plot().layout.title.text


def test_min_effect_is_checked(tiny):
    for bad in (-1, math.nan):
        with pytest.raises(ValueError, match="min_effect"):
            tl.attribution_patch(tiny, CLEAN, CORRUPTED, ANSWER, min_effect=bad)
    for bad in ("10%", [0.1]):
        with pytest.raises(TypeError, match="min_effect"):
            tl.attribution_patch(tiny, CLEAN, CORRUPTED, ANSWER, min_effect=bad)
    assert not tl.attribution_patch(tiny, CLEAN, CORRUPTED, ANSWER).weak_effect  # strong: no warning (an error here)


def test_compare_patching_carries_a_weak_effect(tiny, weak):
    exact = tl.patch(tiny, CLEAN, CORRUPTED, ANSWER, what="head")
    strong = tl.compare_patching(exact, tl.attribution_patch(tiny, CLEAN, CORRUPTED, ANSWER, what="head"))
    assert not strong.weak_effect and "weak effect" not in repr(strong)
    assert strong.plot().layout.xaxis.title.text == "Exact recovery (patch)"
    args = (tiny, WEAK_PROMPT, weak.prompt, WEAK_ANSWER, "resid_pre")
    with pytest.warns(tl.WeakCorruptionWarning):
        exact = tl.patch(*args, alignment=weak.alignment)
    with pytest.warns(tl.WeakCorruptionWarning):
        est = tl.attribution_patch(*args, alignment=weak.alignment)
    agreement = tl.compare_patching(exact, est)
    assert agreement.weak_effect and agreement.delta == exact.delta
    text = repr(agreement)
    assert "weak effect" in text and f"Δ = {exact.delta:+.3f}" in text and "raw change" in text
    keep = ~exact.values.isnan().flatten()
    frame = agreement.to_frame()
    torch.testing.assert_close(torch.tensor(frame["exact_raw"].values), exact.raw_change.flatten()[keep].double())
    torch.testing.assert_close(torch.tensor(frame["estimate_raw"].values), est.raw_change.flatten()[keep].double())
    fig = agreement.plot()
    assert fig.layout.xaxis.title.text == "Exact raw change (patch)" and "not recovery" in fig.layout.title.text
    torch.testing.assert_close(
        torch.tensor(fig.data[1].x, dtype=torch.float64), exact.raw_change.flatten()[keep].double()
    )


def test_readable_vs_causal_carries_a_weak_effect(tiny, weak):
    trace = tl.trace(tiny, WEAK_PROMPT, WEAK_ANSWER)
    sweeps = []
    for what in ("head", "attn_out_all_pos", "mlp_out_all_pos"):
        with pytest.warns(tl.WeakCorruptionWarning):
            sweeps.append(tl.patch(tiny, WEAK_PROMPT, weak.prompt, WEAK_ANSWER, what, alignment=weak.alignment))
    result = tl.readable_vs_causal(trace, *sweeps)
    assert result.weak_effect and result.delta == sweeps[0].delta
    text = repr(result)
    assert "weak effect" in text and "raw change" in text and f"Δ = {result.delta:+.3f}" in text
    frame = result.to_frame().set_index("unit")
    last = tiny.cfg.n_heads - 1
    assert frame.loc[f"L0H{last}", "raw_change"] == pytest.approx(sweeps[0].raw_change[0, last].item())
    assert frame.loc["L1 MLP", "raw_change"] == pytest.approx(sweeps[2].raw_change[1].item())
    fig = result.plot()
    assert "not recovery" in fig.layout.title.text and fig.layout.yaxis.title.text.startswith("Patching raw change")
    heads = [i for i, k in enumerate(result.kinds) if k == "head"]
    torch.testing.assert_close(torch.tensor(fig.data[0].y, dtype=torch.float64), result.raw_change[heads].double())


def test_agreement_figure_names_both_correlations(tiny):
    exact = tl.patch(tiny, CLEAN, CORRUPTED, ANSWER, what="resid_pre")
    agreement = tl.compare_patching(exact, tl.attribution_patch(tiny, CLEAN, CORRUPTED, ANSWER, what="resid_pre"))
    title = agreement.plot().layout.title.text
    assert f"Pearson {agreement.pearson:+.2f}" in title and f"Spearman {agreement.spearman:+.2f}" in title
