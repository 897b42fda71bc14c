"""Activation patching: the recovery metric's anchors, batching, alignment and agreement with TransformerLens."""

from __future__ import annotations

import math

import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

import tracelib as tl
from tracelib.patching import Cell, SameMetricError, logit_diff, patch, prepare, run_patched

CLEAN, CORRUPTED, ANSWER = "what is 1 + 1", "what is 3 + 1", " 2"
# The random-init GPT-2 and Qwen models barely tell the two prompts apart (the operand swap moves
# their logit difference by about 1% of itself: a weak effect by `patch`'s rule). The exact
# invariants below hold all the same, so sweeps on them turn the weak-effect check off; the bundled
# model's swap is strong and needs nothing. Any other weak-corruption warning fails the test.
QUIET = {"min_effect": 0.0}
pytestmark = pytest.mark.filterwarnings("error::tracelib.WeakCorruptionWarning")


def _close(actual, expected, atol=1e-5):
    torch.testing.assert_close(
        actual, torch.full_like(actual, expected) if isinstance(expected, float) else expected, atol=atol, rtol=0
    )


@pytest.fixture(params=["tiny", "gpt2", "qwen"], scope="module")
def any_model(request, tmp_path_factory):
    """The three model families; the random-init ones in float64.

    Their clean - corrupted logit-difference gap is about 1e-3, so float32's batch rounding (about
    1e-7 in a logit) would read as 1e-4 on the normalised scale; in float64 the 1e-5 checks test the
    patching, not the rounding. The bundled model (gap about 11) runs in its own float32.
    """
    if request.param == "tiny":
        return request.getfixturevalue("tiny")
    return tl.load_model(request.getfixturevalue(f"{request.param}_dir"), dtype=torch.float64)


@pytest.fixture(scope="module")
def resid_pre(any_model):
    return any_model, patch(any_model, CLEAN, CORRUPTED, ANSWER, what="resid_pre", **QUIET)


def test_every_position_of_resid_pre_recovers_one(any_model):
    # Patching the whole residual stream entering a layer replaces everything the corrupted run knew.
    result = patch(any_model, CLEAN, CORRUPTED, ANSWER, what="resid_pre_all_pos", **QUIET)
    assert result.dims == ("layer",)
    _close(result.values, 1.0)


def test_patching_nothing_gives_zero(any_model):
    hooks = ["blocks.0.hook_resid_pre"]
    _, _, clean_metric, corr_metric, setup = prepare(any_model, CLEAN, CORRUPTED, ANSWER, "denoise", None, None, hooks)
    # A cell with no positions registers no hook: the batch row is the plain corrupted run.
    patched = run_patched(any_model, setup, [Cell("blocks.0.hook_resid_pre", (), ())] * 3)
    _close((patched - corr_metric) / (clean_metric - corr_metric), 0.0)


def test_unchanged_tokens_at_layer_0_give_zero(resid_pre):
    # resid_pre at layer 0 is the embedding: where both prompts hold the same token it is identical.
    model, result = resid_pre
    clean = tl.resolve_answer(model, CLEAN, ANSWER).prompt_str_tokens
    same = torch.tensor([a == b for a, b in zip(clean, result.str_tokens)])
    assert same.any() and not same.all()
    _close(result.values[0, same], 0.0)


def test_clean_into_clean_is_refused_and_changes_nothing(any_model):
    with pytest.raises(SameMetricError, match="same logit difference"):
        patch(any_model, CLEAN, CLEAN, ANSWER)
    hooks = [f"blocks.{layer}.hook_resid_pre" for layer in range(any_model.cfg.n_layers)]
    _, _, clean_metric, _, setup = prepare(any_model, CLEAN, CLEAN, ANSWER, "denoise", None, None, hooks)
    n = setup.base_tokens.shape[1]
    cells = [Cell(h, (i,), (i,)) for h in hooks for i in range(n)] + [
        Cell(h, tuple(range(n)), tuple(range(n))) for h in hooks
    ]
    _close(run_patched(any_model, setup, cells), clean_metric)


def test_last_resid_post_at_final_position_recovers_one(any_model):
    result = patch(any_model, CLEAN, CORRUPTED, ANSWER, what="resid_post", **QUIET)
    assert abs(result.values[-1, -1].item() - 1.0) < 1e-5
    # Earlier positions of the last layer's output cannot reach the final logits any more.
    _close(result.values[-1, :-1], 0.0)


@pytest.mark.parametrize("what", ["resid_pre", "head"])
def test_batched_equals_one_at_a_time(any_model, what):
    one = patch(any_model, CLEAN, CORRUPTED, ANSWER, what=what, batch_size=1, **QUIET)
    many = patch(any_model, CLEAN, CORRUPTED, ANSWER, what=what, batch_size=64, **QUIET)
    torch.testing.assert_close(one.values, many.values, atol=1e-5, rtol=0)


def test_noising_keeps_one_for_clean(any_model):
    # Noising runs the clean prompt: the whole corrupted residual stream brings it to 0 (corrupted).
    result = patch(any_model, CLEAN, CORRUPTED, ANSWER, what="resid_pre_all_pos", direction="noise", **QUIET)
    _close(result.values, 0.0)
    by_pos = patch(any_model, CLEAN, CORRUPTED, ANSWER, what="resid_pre", direction="noise", **QUIET)
    assert by_pos.str_tokens == tl.resolve_answer(any_model, CLEAN, ANSWER).prompt_str_tokens
    corrupted = tl.resolve_answer(any_model, CORRUPTED, ANSWER).prompt_str_tokens
    same = torch.tensor([a == b for a, b in zip(corrupted, by_pos.str_tokens)])
    _close(by_pos.values[0, same], 1.0)
    _close(by_pos.values[0, ~same], 0.0)


def _insertion(model):
    """A corrupted prompt with exactly 2 tokens inserted after "what", and where they land.

    The insertion sits away from the substituted operand: a swapped token right next to inserted
    ones cannot be told apart from them, so `fill_substitutions` leaves it unmatched too.
    """
    base = tl.resolve_answer(model, CORRUPTED, ANSWER).prompt_str_tokens
    for extra in (" so", " is"):
        prompt = CORRUPTED.replace("what", "what" + extra * 2, 1)
        tokens = tl.resolve_answer(model, prompt, ANSWER).prompt_str_tokens
        for k in range(1, len(base)):
            if len(tokens) == len(base) + 2 and tokens[:k] + tokens[k + 2 :] == base and tokens[k] != base[k]:
                return prompt, [k, k + 1]
    raise AssertionError("no insertion of exactly two tokens found for this tokenizer")


def test_inserted_tokens_are_nan(any_model):
    prompt, inserted = _insertion(any_model)
    result = patch(any_model, CLEAN, prompt, ANSWER, what="resid_pre", **QUIET)
    nan_positions = sorted(set(result.values.isnan().nonzero()[:, 1].tolist()))
    assert nan_positions == inserted
    assert result.values.isnan().sum() == len(inserted) * any_model.cfg.n_layers
    assert result.no_counterpart == inserted
    assert "no counterpart" in repr(result)
    assert "no counterpart" in result.plot().layout.title.text
    # Every other position is patched, the substituted operand included (and it matters).
    operand = result.str_tokens.index("3") if "3" in result.str_tokens else result.str_tokens.index(" 3")
    assert result.values[0, operand].abs() > 1e-3


def test_passed_alignment_is_used(tiny):
    n = len(tl.resolve_answer(tiny, CORRUPTED, ANSWER).prompt_str_tokens)
    alignment = [None] + list(range(1, n))
    result = patch(tiny, CLEAN, CORRUPTED, ANSWER, alignment=alignment)
    assert result.values[:, 0].isnan().all() and not result.values[:, 1:].isnan().any()
    with pytest.raises(ValueError, match="entries"):
        patch(tiny, CLEAN, CORRUPTED, ANSWER, alignment=[0, 1])


def test_resid_pre_equals_transformer_lens(tiny):
    from transformer_lens import patching as tl_patching

    result = patch(tiny, CLEAN, CORRUPTED, ANSWER, what="resid_pre")
    _, _, clean_metric, corr_metric, setup = prepare(tiny, CLEAN, CORRUPTED, ANSWER, "denoise", None, None, [])
    clean_tokens = tl.resolve_answer(tiny, CLEAN, ANSWER).prompt_tokens[None]
    _, cache = tiny.run_with_cache(clean_tokens)

    def metric(logits):
        return (logit_diff(logits[:, -1], setup.target, setup.distractors)[0] - corr_metric) / (
            clean_metric - corr_metric
        )

    theirs = tl_patching.get_act_patch_resid_pre(tiny, setup.base_tokens, cache, metric)
    torch.testing.assert_close(result.values, theirs.float().cpu(), atol=1e-5, rtol=0)


def test_float32_random_model_within_rounding(gpt2):
    # In float32 the random model's tiny gap leaves batch rounding visible, but only at rounding's size.
    result = patch(gpt2, CLEAN, CORRUPTED, ANSWER, what="resid_pre_all_pos", **QUIET)
    gap = abs(result.clean_metric - result.corrupted_metric)
    _close(result.values, 1.0, atol=max(1e-5, 1e-6 / gap))


def test_result_object(tiny):
    result = patch(tiny, CLEAN, CORRUPTED, ANSWER, what="head")
    assert result.values.shape == (tiny.cfg.n_layers, tiny.cfg.n_heads)
    frame = result.to_frame()
    assert isinstance(frame, pd.DataFrame) and list(frame.columns) == ["layer", "head", "value", "raw_change"]
    assert len(frame) == tiny.cfg.n_layers * tiny.cfg.n_heads
    top = result.top(3)
    assert len(top) == 3 and top["value"].abs().is_monotonic_decreasing
    text = repr(result)
    assert text.startswith("PatchingResult(head, denoise") and "0x" not in text
    fig = result.plot()
    assert isinstance(fig, go.Figure) and fig.data[0].zmid == 0 and fig.data[0].colorscale[0][1] != ""
    assert list(fig.data[0].y)[0] == "L0" and list(fig.data[0].x)[0] == "H0"
    by_pos = patch(tiny, CLEAN, CORRUPTED, ANSWER, what="attn_out")
    assert list(by_pos.plot().data[0].x)[3] == "'1'@3" or "@3" in list(by_pos.plot().data[0].x)[3]
    with pytest.raises(ValueError, match="what must be"):
        patch(tiny, CLEAN, CORRUPTED, ANSWER, what="nope")
    assert math.isfinite(result.clean_metric) and result.clean_metric != result.corrupted_metric


def test_heads_by_position(any_model):
    result = patch(any_model, CLEAN, CORRUPTED, ANSWER, what="head_by_pos", **QUIET)
    cfg = any_model.cfg
    assert result.dims == ("layer", "head", "position")
    assert result.values.shape == (cfg.n_layers, cfg.n_heads, len(result.str_tokens))
    # Before the first swapped token both prompts agree, and attention is causal: nothing to recover.
    clean = tl.resolve_answer(any_model, CLEAN, ANSWER).prompt_str_tokens
    first = next(i for i, (a, b) in enumerate(zip(clean, result.str_tokens)) if a != b)
    _close(result.values[:, :, :first], torch.zeros(cfg.n_layers, cfg.n_heads, first))
    assert result.plot().data[0].y[0] == "L0H0"
    # In the last layer no earlier position reaches the final logits any more, so a head patched at
    # every position (the "head" sweep) acts exactly as that head patched at the final position.
    heads = patch(any_model, CLEAN, CORRUPTED, ANSWER, what="head", **QUIET)
    last = cfg.n_layers - 1
    torch.testing.assert_close(heads.values[last], result.values[last, :, -1], atol=1e-5, rtol=0)


def test_progress_is_quiet_under_pytest():
    from tracelib.batching import _is_quiet

    assert _is_quiet()
    assert tl.patch is patch and tl.PatchingResult.__name__ == "PatchingResult"


def test_noising_with_insertion_patches_every_clean_position(any_model):
    # Noising runs the clean prompt; every clean token has a counterpart, the inserted ones are just unused.
    prompt, _ = _insertion(any_model)
    result = patch(any_model, CLEAN, prompt, ANSWER, what="resid_pre_all_pos", direction="noise", **QUIET)
    assert result.no_counterpart == [] and not result.values.isnan().any()
    assert len(result.str_tokens) == len(tl.resolve_answer(any_model, CLEAN, ANSWER).prompt_str_tokens)
    assert len(result.plot().data) == 1


@pytest.fixture(params=["tiny", "gpt2", "qwen"], scope="module")
def model64(request):
    """The three model families, all in float64, so the two patching paths can be held to 1e-6."""
    source = "tiny-arith" if request.param == "tiny" else request.getfixturevalue(f"{request.param}_dir")
    return tl.load_model(source, dtype=torch.float64)


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_starting_at_the_layer_equals_the_full_forward(model64, direction):
    from tracelib.patching import WHATS, _block_list, make_cells

    # The fast path must really be taken on every family, or this would compare the full path with itself.
    assert _block_list(model64) is not None
    hooks = sorted({f"blocks.{layer}.{hook}" for hook, _, _ in WHATS.values() for layer in range(model64.cfg.n_layers)})
    _, _, _, _, setup = prepare(model64, CLEAN, CORRUPTED, ANSWER, direction, None, None, hooks)
    for what in WHATS:
        cells, _, _, _ = make_cells(model64, what, setup.mapping)
        fast = run_patched(model64, setup, cells, batch_size=16)
        full = run_patched(model64, setup, cells, batch_size=16, _full_forward=True)
        torch.testing.assert_close(fast, full, atol=1e-6, rtol=0, msg=lambda m, what=what: f"{what}: {m}")


def test_starting_at_the_layer_skips_the_blocks_below(model64):
    from tracelib.patching import _block_list

    _, _, _, _, setup = prepare(model64, CLEAN, CORRUPTED, ANSWER, "denoise", None, None, [])
    last = model64.cfg.n_layers - 1
    calls = []
    handle = model64.blocks[0].register_forward_hook(lambda *_: calls.append(1))
    try:
        run_patched(model64, setup, [Cell(f"blocks.{last}.hook_resid_pre", (0,), (0,))])
        assert calls == []
        run_patched(model64, setup, [Cell(f"blocks.{last}.hook_resid_pre", (0,), (0,))], _full_forward=True)
        assert calls == [1]
    finally:
        handle.remove()
    # The HF model holds its full block list again afterwards.
    module, name = _block_list(model64)
    assert list(getattr(module, name)) == list(model64.blocks)


def test_bench_patching_row_checks_agreement():
    # scripts/bench.py's patch_resid_pre row (no timing here): the agreement check and the rendered row.
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"
    spec = importlib.util.spec_from_file_location("tracelib_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert "patch_resid_pre" in dict(bench.STEPS)
    ours = {"values": [[0.0, 0.5], [1.0, 1.0]], "time_s": 1.0, "clean_metric": 3.0, "corrupted_metric": 1.0}
    theirs = {"values": [[0.0, 0.5], [1.0, 1.0 + 1e-6]], "time_s": 4.0}
    agreement = bench.patch_agreement(ours, theirs)
    assert agreement["ratio"] == 0.25 and agreement["max_abs_diff"] < 1e-5
    with pytest.raises(AssertionError, match="disagree"):
        bench.patch_agreement(ours, {**theirs, "values": [[0.0, 0.6], [1.0, 1.0]]})
    m = {**ours, **agreement, "cells": 4, "batch_size": 4, "peak_rss": 2**30, "peak_over_before": 2**20}
    m.update(attribution_s=0.05, forward_s=0.01, attribution_pearson=0.5)
    m["tl"] = {**theirs, "peak_rss": 2**30, "peak_over_before": 2**20}
    table = bench.render({"tiny": {"layers": 2, "steps": {"patch_resid_pre": m}}})
    assert "| tracelib / TransformerLens time (target <= 0.5) | 0.250 ✓ |" in table
    assert "| attribution_patch / one forward (target <= 4.0) | 5.00 ✗ |" in table


def test_a_start_at_layer_that_goes_wrong_falls_back_to_full_runs(tiny, monkeypatch):
    # If a TransformerLens or transformers release changed how a run started at a layer treats the
    # block list (say, start_at_layer skipping the blocks itself, so cutting the list skips twice),
    # the once-per-model check sees it, warns, and the sweep runs from the tokens.
    from tracelib.patching import runs as patching

    expected = patch(tiny, CLEAN, CORRUPTED, ANSWER, what="resid_pre")
    cut = patching._blocks_from

    def skips_twice(where, layer):
        return cut(where, min(2 * layer, tiny.cfg.n_layers - 1))

    monkeypatch.setattr(patching, "_blocks_from", skips_twice)
    monkeypatch.setattr(patching, "_START_CHECKED", __import__("weakref").WeakKeyDictionary())
    with pytest.warns(RuntimeWarning, match="cannot start at a layer"):
        result = patch(tiny, CLEAN, CORRUPTED, ANSWER, what="resid_pre")
    torch.testing.assert_close(result.values, expected.values, atol=1e-5, rtol=0)
    assert patching._START_CHECKED[tiny] is False


# A weak corruption: on the bundled model, junk injected after the operands of "what is 2 + 3"
# barely moves the answer's logit difference, so recovery, which divides by that move, is noise.
WEAK_PROMPT, WEAK_ANSWER = "what is 2 + 3", " 5"


def _weak_patch(tiny, injection, **kw):
    return patch(tiny, WEAK_PROMPT, injection.prompt, WEAK_ANSWER, alignment=injection.alignment, **kw)


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_weak_corruption_warns_and_keeps_the_raw_change(tiny, weak_injection, direction):
    injection, share = weak_injection
    with pytest.warns(tl.WeakCorruptionWarning, match="barely changes the answer") as caught:
        result = _weak_patch(tiny, injection, direction=direction)
    message = str(caught[0].message)
    for number in (result.clean_metric, result.corrupted_metric, result.delta):
        assert f"{number:+.3f}" in message
    assert f"{share:.1%}" in message and "operand" in message and "inject more tokens" in message
    assert result.weak_effect and result.min_effect == tl.patching.MIN_EFFECT
    assert "weak effect" in repr(result) and "raw_change" in repr(result)
    # values stays recovery; raw_change is patched - corrupted, and recovery x delta gives it back.
    assert result.raw_change.isnan().equal(result.values.isnan())
    torch.testing.assert_close(
        result.values.double() * result.delta, result.raw_change.double(), atol=1e-6, rtol=1e-5, equal_nan=True
    )
    hooks = [f"blocks.{layer}.hook_resid_pre" for layer in range(tiny.cfg.n_layers)]
    _, _, _, corr_metric, setup = prepare(
        tiny, WEAK_PROMPT, injection.prompt, WEAK_ANSWER, direction, None, injection.alignment, hooks
    )
    aligned = [(i, j) for i, j in enumerate(setup.mapping) if j is not None]
    cells = [Cell(h, (i,), (j,)) for h in hooks for i, j in aligned]
    patched = run_patched(tiny, setup, cells).reshape(len(hooks), len(aligned))
    raw = result.raw_change[:, [i for i, _ in aligned]].double()
    # float32 logit differences near 10 carry about 1e-6 of rounding each; scale to that magnitude.
    scale = max(patched.abs().max().item(), abs(corr_metric))
    torch.testing.assert_close(raw, patched - corr_metric, atol=4e-6 * scale, rtol=1e-5)
    frame = result.to_frame().dropna()
    torch.testing.assert_close(
        torch.tensor(frame["raw_change"].values),
        torch.tensor(frame["value"].values) * result.delta,
        rtol=1e-5,
        atol=1e-6,
    )


def test_weak_corruption_figure_shows_the_raw_change(tiny, weak_injection):
    injection, _ = weak_injection
    with pytest.warns(tl.WeakCorruptionWarning):
        result = _weak_patch(tiny, injection)
    fig = result.plot()
    title = fig.layout.title.text
    assert "barely changes the answer" in title and f"Δ = {result.delta:+.3f}" in title
    assert "raw change of the logit difference, not recovery" in title and "no counterpart" in title
    heat = fig.data[0]
    shown = torch.tensor([[math.nan if v is None else v for v in row] for row in heat.z], dtype=torch.float64)
    torch.testing.assert_close(shown, result.raw_change.double(), equal_nan=True)
    # Colours span the raw change, a logit difference, never the (far larger) noisy recovery.
    largest = result.raw_change[~result.raw_change.isnan()].abs().max().item()
    assert heat.zmax == pytest.approx(largest) and heat.zmin == -heat.zmax and heat.zmid == 0
    assert result.values[~result.values.isnan()].abs().max().item() > heat.zmax
    with pytest.warns(tl.WeakCorruptionWarning):
        bars = _weak_patch(tiny, injection, what="resid_pre_all_pos").plot()
    assert bars.layout.yaxis.title.text.startswith("Raw change") and "not recovery" in bars.layout.title.text


def test_strong_corruption_does_not_warn(tiny):
    # The module's filter turns a WeakCorruptionWarning into an error: none may come.
    result = patch(tiny, CLEAN, CORRUPTED, ANSWER, what="resid_pre")
    assert not result.weak_effect and abs(result.delta) >= tl.patching.MIN_EFFECT * abs(result.clean_metric)
    torch.testing.assert_close(result.values.double() * result.delta, result.raw_change.double(), atol=1e-5, rtol=1e-5)
    assert "weak effect" not in repr(result) and "recovery of" in result.plot().layout.title.text


def test_min_effect_is_a_checked_per_call_threshold(tiny, weak_injection, monkeypatch):
    injection, share = weak_injection
    quiet = _weak_patch(tiny, injection, what="resid_pre_all_pos", min_effect=share / 2)  # below its share: no warning
    assert not quiet.weak_effect and quiet.min_effect == share / 2
    # Every operand swap is weak against a threshold above its own share of |clean|.
    strong = patch(tiny, CLEAN, CORRUPTED, ANSWER, what="resid_pre_all_pos")
    with pytest.warns(tl.WeakCorruptionWarning):
        assert patch(
            tiny, CLEAN, CORRUPTED, ANSWER, "resid_pre_all_pos", min_effect=2 * strong.delta / strong.clean_metric
        ).weak_effect
    # The default is read from the module constant when patch() runs.
    monkeypatch.setattr(tl.patching.result, "MIN_EFFECT", 0.0)
    assert not _weak_patch(tiny, injection, what="resid_pre_all_pos").weak_effect
    for bad in (-0.1, math.nan, math.inf):
        with pytest.raises(ValueError, match="min_effect"):
            patch(tiny, CLEAN, CORRUPTED, ANSWER, min_effect=bad)
    for bad in ("0.1", True, [0.1]):  # not a number at all: a TypeError, as for every argument of the wrong type
        with pytest.raises(TypeError, match="min_effect"):
            patch(tiny, CLEAN, CORRUPTED, ANSWER, min_effect=bad)
    # The exactly-equal case is still refused outright, weak check or not.
    with pytest.raises(SameMetricError):
        patch(tiny, CLEAN, CLEAN, ANSWER, min_effect=0.5)


def test_recovery_colours_are_bounded(tiny):
    import dataclasses

    from tracelib.plotting import RECOVERY_COLOR_LIMIT

    result = patch(tiny, CLEAN, CORRUPTED, ANSWER, what="resid_pre")
    heat = result.plot().data[0]
    # The largest |recovery| here is 1 (a whole position restored): the scale is exactly ±1.
    assert heat.zmax == pytest.approx(max(1.0, result.values.abs().max().item())) and heat.zmin == -heat.zmax
    # A ratio blown up by a near-zero divisor (3855 was seen) saturates the scale instead of stretching it.
    values = result.values.clone()
    values[2, 1] = 3855.0
    blown = dataclasses.replace(result, values=values, raw_change=None)
    fig = blown.plot()
    assert fig.data[0].zmax == RECOVERY_COLOR_LIMIT and fig.data[0].zmin == -RECOVERY_COLOR_LIMIT
    assert fig.data[0].z[2][1] == 3855.0  # the hover still shows the true value
    assert "Colours stop at ±1.500: 1 cell(s)" in fig.layout.title.text
    layers = patch(tiny, CLEAN, CORRUPTED, ANSWER, what="resid_pre_all_pos")
    big = dataclasses.replace(layers, values=layers.values * 100, raw_change=None)
    assert big.plot().data[0].marker.cmax == RECOVERY_COLOR_LIMIT


def test_cells_before_the_first_difference_are_not_run(tiny, monkeypatch):
    """Attention looks back only: before the prompts differ, a patch changes nothing, so those cells are
    the base run's own metric (recovery 0 denoising, 1 noising) and no forward pass is spent on them."""
    from tracelib.patching import exact as patching

    seen = []
    real = patching.run_patched
    monkeypatch.setattr(
        patching, "run_patched", lambda m, s, cells, *a: seen.append(len(cells)) or real(m, s, cells, *a)
    )
    clean, corrupted = "what is 1 + 1", "what is 1 + 3"  # only the second operand differs
    a, b = (tl.trace(tiny, p, " 2").rows[0].str_tokens for p in (clean, corrupted))
    first = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    for direction, expected in (("denoise", 0.0), ("noise", 1.0)):
        result = patch(tiny, clean, corrupted, " 2", what="resid_pre", direction=direction, min_effect=0)
        assert (result.values[:, :first] == expected).all() and (
            result.raw_change[:, :first] == expected * result.delta
        ).all()
        assert seen[-1] == tiny.cfg.n_layers * (len(result.str_tokens) - first)
