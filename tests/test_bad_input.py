"""Bad input at the public entry points: results that name their model, pairings refused across
models, wrong types refused with a TypeError that says what to pass, no silent coercion, and the
CLI's --html destination checked before the model loads."""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import pytest
import torch

import tracelib as tl
import tracelib.ood
from tracelib.__main__ import main

CLEAN, CORRUPTED, ANSWER = "what is 1 + 1", "what is 3 + 1", " 2"
ONE_PLUS_ONE = ["--prompt", CLEAN, "--answer", ANSWER]


@pytest.fixture(scope="module")
def traces(tiny, other):
    return tl.trace(tiny, CLEAN, ANSWER), tl.trace(other, CLEAN, ANSWER)


@pytest.fixture(scope="module")
def sweeps(tiny, other):
    """Head sweeps, exact and estimated, of both models."""
    return {
        (name, method): fn(model, CLEAN, CORRUPTED, ANSWER, what="head", min_effect=0)
        for name, model in (("tiny", tiny), ("other", other))
        for method, fn in (("exact", tl.patch), ("estimate", tl.attribution_patch))
    }


def short(model) -> str:
    """How an error names a model's weights: the first 8 hex digits of its fingerprint."""
    return tl.model_identity(model).fingerprint[:8]


# --- results know which model made them ------------------------------------------------------------


def test_patching_results_carry_their_model(tiny, other, sweeps):
    for name, model in (("tiny", tiny), ("other", other)):
        for method in ("exact", "estimate"):
            result = sweeps[name, method]
            assert result.identity == tl.model_identity(model)
            assert result.model_name == "tiny-arith" and len(result.weights_fingerprint) == 64
    assert sweeps["tiny", "exact"].identity != sweeps["other", "exact"].identity
    agreement = tl.compare_patching(sweeps["tiny", "exact"], sweeps["tiny", "estimate"])
    assert agreement.identity == tl.model_identity(tiny)


def test_readable_vs_causal_and_damage_report_carry_their_model(other, traces, sweeps):
    _, other_trace = traces
    assert tl.readable_vs_causal(other_trace, sweeps["other", "exact"]).identity == tl.model_identity(other)
    assert tl.damage_report(other_trace, other_trace).identity == tl.model_identity(other)


def test_compare_patching_refuses_two_models(tiny, other, sweeps):
    with pytest.raises(tl.ModelMismatchError) as err:
        tl.compare_patching(sweeps["other", "exact"], sweeps["tiny", "estimate"])
    message = str(err.value)
    assert "exact patching result" in message and "attribution estimate" in message
    assert short(other) in message and short(tiny) in message


def test_readable_vs_causal_refuses_a_sweep_of_another_model(tiny, other, traces, sweeps):
    trace, _ = traces
    with pytest.raises(tl.ModelMismatchError) as err:
        tl.readable_vs_causal(trace, sweeps["other", "exact"])
    message = str(err.value)
    assert "The trace" in message and "head sweep" in message
    assert short(tiny) in message and short(other) in message


def test_readable_vs_causal_refuses_sweeps_of_two_models(tiny, other, traces):
    trace, _ = traces
    mlp_other = tl.patch(other, CLEAN, CORRUPTED, ANSWER, what="mlp_out_all_pos", min_effect=0)
    heads = tl.patch(tiny, CLEAN, CORRUPTED, ANSWER, what="head", min_effect=0)
    # An old trace (no fingerprint) is not checked, but its sweeps still are, against each other.
    old = dataclasses.replace(trace, weights_fingerprint="")
    with pytest.raises(tl.ModelMismatchError) as err:
        tl.readable_vs_causal(old, heads, mlp_other)
    message = str(err.value)
    assert "head sweep" in message and "mlp_out_all_pos sweep" in message and short(other) in message


def test_damage_report_refuses_traces_of_two_models(tiny, other, traces):
    # Measured before: two models of one shape passed, and the report counted "7 damaged".
    reference, other_trace = traces
    with pytest.raises(tl.ModelMismatchError) as err:
        tl.damage_report(reference, other_trace)
    message = str(err.value)
    assert "The reference" in message and "the corrupted trace" in message
    assert short(tiny) in message and short(other) in message and "same name, other weights" in message


def test_damage_report_refuses_a_loaded_reference_of_another_model(tiny, other, traces, tmp_path):
    reference, other_trace = traces
    reference.save(tmp_path / "ref", tiny)
    loaded = tl.load_reference(tmp_path / "ref")
    with pytest.raises(tl.ModelMismatchError, match=short(other)):
        tl.damage_report(loaded, other_trace)
    assert tl.damage_report(loaded, reference).counts()["survives"] == len(tl.damage_report(loaded, reference).features)


def test_results_without_a_fingerprint_are_not_checked(sweeps):
    # Results from before tracelib recorded the model still pair (there is nothing to check).
    exact = dataclasses.replace(sweeps["other", "exact"], weights_fingerprint="")
    assert exact.identity.fingerprint == ""
    agreement = tl.compare_patching(exact, sweeps["tiny", "estimate"])
    assert len(agreement.cells) == sweeps["tiny", "exact"].values.numel()


def test_compare_says_whether_it_compares_one_model_or_two(tiny, other, traces):
    trace, other_trace = traces
    two = tl.compare(trace, other_trace)
    assert two.same_model is False
    assert two.models == (
        f"compares traces from two models: tiny-arith (weights {short(tiny)}) vs tiny-arith (weights {short(other)}) "
        "(same name, other weights)"
    )
    assert two.models in repr(two)
    one = tl.compare(trace, tl.trace(tiny, "what is 1 + 2", " 3"))
    assert one.same_model is True
    assert one.models == f"same model: tiny-arith (weights {short(tiny)})" and one.models in repr(one)
    old = tl.compare(dataclasses.replace(trace, weights_fingerprint=""), other_trace)
    assert old.same_model is None and "one model or two: unknown" in repr(old)


# --- wrong types get a TypeError that says what to pass -----------------------------------------------


def test_trace_arguments_must_be_traces(traces, sweeps):
    trace, _ = traces
    exact = sweeps["tiny", "exact"]
    cases = [
        (lambda: tl.compare(None, trace), "compare: pass a Trace from tl.trace or tl.load_reference as a, got None"),
        (lambda: tl.compare(trace, exact), "compare: pass a Trace from tl.trace or tl.load_reference as b, got a Patc"),
        (
            lambda: tl.damage_report(None, trace),
            "damage_report: pass a Trace from tl.trace or tl.load_reference as ref",
        ),
        (lambda: tl.damage_report(trace, 3), "damage_report: pass a Trace from tl.trace or tl.load_reference as corr"),
        (lambda: tl.readable_vs_causal(None, exact), "readable_vs_causal: pass a Trace from tl.trace or tl.load_refer"),
    ]
    for call, message in cases:
        with pytest.raises(TypeError, match=message):
            call()
    # A path to a saved reference is the likely mistake: the error shows how to load it.
    with pytest.raises(TypeError, match=r"got 'ref/' \(str\); a saved reference is loaded first: tl.load_reference"):
        tl.compare(trace, "ref/")


def test_patching_results_must_be_patching_results(traces, sweeps):
    trace, _ = traces
    exact, estimate = sweeps["tiny", "exact"], sweeps["tiny", "estimate"]
    with pytest.raises(TypeError, match=r"compare_patching: pass a PatchingResult from tl.patch as exact, got None"):
        tl.compare_patching(None, estimate)
    with pytest.raises(TypeError, match=r"from tl.attribution_patch as estimate, got a Trace"):
        tl.compare_patching(exact, trace)
    with pytest.raises(TypeError, match=r"readable_vs_causal: pass a PatchingResult from tl.patch as results\[1\]"):
        tl.readable_vs_causal(trace, exact, trace)


@pytest.mark.parametrize(
    "call",
    [
        lambda: tl.patch("tiny-arith", CLEAN, CORRUPTED, ANSWER),
        lambda: tl.attribution_patch("tiny-arith", CLEAN, CORRUPTED, ANSWER),
        lambda: tl.inject("tiny-arith", CLEAN, "junk", "between"),
        lambda: tl.find_undertrained_tokens("tiny-arith"),
    ],
    ids=["patch", "attribution_patch", "inject", "find_undertrained_tokens"],
)
def test_model_arguments_must_be_models(request, call):
    name = request.node.callspec.id
    with pytest.raises(TypeError, match=rf"^{name}: pass a model from tl.load_model\(...\), got 'tiny-arith' \(str\)"):
        call()


def test_rows_must_be_ints(traces, sweeps):
    trace, _ = traces
    for row in ("0", True, 0.0):
        with pytest.raises(TypeError, match=r"compare: row must be an int"):
            tl.compare(trace, trace, row=row)
        with pytest.raises(TypeError, match=r"damage_report: row must be an int"):
            tl.damage_report(trace, trace, row=row)
        with pytest.raises(TypeError, match=r"readable_vs_causal: row must be an int"):
            tl.readable_vs_causal(trace, sweeps["tiny", "exact"], row=row)
    assert tl.compare(trace, trace, row=np.int64(0)).same_model is True


def test_align_tokens_takes_tokens_not_text():
    # A prompt's text is a sequence too, of characters: aligned char by char, it looked like it worked.
    with pytest.raises(
        TypeError, match=r"align_tokens: a_tokens must be a list of tokens .* got 'what is 1 \+ 1' \(str\)"
    ):
        tl.align_tokens(CLEAN, ["what", " is"])
    with pytest.raises(TypeError, match=r"align_tokens: b_tokens must be a list of tokens .* got None \(NoneType\)"):
        tl.align_tokens(["what"], None)
    with pytest.raises(TypeError, match=r"align_tokens: key must be a function .* got 'strip' \(str\)"):
        tl.align_tokens(["what"], ["what"], key="strip")
    assert tl.align_tokens(torch.tensor([5, 6, 7]), [6, 7]) == [1, 2]


def test_precision_recall_takes_token_ids(tiny):
    found = tl.find_undertrained_tokens(tiny)
    first = found.token_ids[0].item()
    for bad in ([first + 0.5], ["3"], [True]):
        with pytest.raises(TypeError, match=rf"precision_recall: truth must hold token ids \(ints\), got {bad[0]!r}"):
            found.precision_recall(bad)
    with pytest.raises(TypeError, match=r"precision_recall: truth must be a collection of token ids, got 5 \(int\)"):
        found.precision_recall(5)
    # A generator is read once, and NumPy ids count as ids.
    assert found.precision_recall(t for t in [first]) == (1 / len(found.token_ids), 1.0)
    assert found.precision_recall(np.array([first])) == (1 / len(found.token_ids), 1.0)


# --- no silent coercion in patch() ------------------------------------------------------------------


@pytest.fixture(scope="module")
def injection(tiny):
    return tl.inject(tiny, CLEAN, "junk", "between", n=1, seed=0, answer=ANSWER)


@pytest.mark.parametrize("bad", [1.7, "0", True])
def test_alignment_entries_must_be_ints(tiny, injection, bad):
    alignment = list(injection.alignment)
    alignment[2] = bad  # int() took 1.7 as 1, and "0" and True as 0 and 1
    with pytest.raises(TypeError, match=rf"Alignment entry 2 is {bad!r} \({type(bad).__name__}\)"):
        tl.patch(tiny, CLEAN, injection.prompt, ANSWER, alignment=alignment)


def test_alignment_must_be_a_sequence(tiny, injection):
    with pytest.raises(TypeError, match=r"alignment must be a list .* got 5 \(int\)"):
        tl.patch(tiny, CLEAN, injection.prompt, ANSWER, alignment=5)


def test_alignment_may_be_the_injection_itself(tiny, injection):
    by_injection = tl.patch(tiny, CLEAN, injection.prompt, ANSWER, alignment=injection, min_effect=0)
    by_list = tl.patch(tiny, CLEAN, injection.prompt, ANSWER, alignment=injection.alignment, min_effect=0)
    numpy_ints = [None if a is None else np.int64(a) for a in injection.alignment]
    by_numpy = tl.patch(tiny, CLEAN, injection.prompt, ANSWER, alignment=numpy_ints, min_effect=0)
    assert by_injection.alignment == by_list.alignment == by_numpy.alignment
    assert by_injection.no_counterpart == list(injection.injected)
    torch.testing.assert_close(by_injection.values, by_list.values, equal_nan=True, atol=1e-6, rtol=0)
    estimate = tl.attribution_patch(tiny, CLEAN, injection.prompt, ANSWER, alignment=injection, min_effect=0)
    assert estimate.alignment == by_list.alignment
    # An injection of other prompts is refused, not applied to these.
    with pytest.raises(ValueError, match=r"alignment is the Injection .* whose tokens are not this clean prompt's"):
        tl.patch(tiny, CLEAN, CORRUPTED, ANSWER, alignment=injection)


@pytest.mark.parametrize(("bad", "error"), [(0, ValueError), (-2, ValueError), (1.5, TypeError), (True, TypeError)])
def test_patch_batch_size_has_one_rule(tiny, bad, error):
    # batch_size=0 used to mean "automatic" here, and 1.5 raised a raw TypeError from range().
    with pytest.raises(error, match=rf"batch_size must be a positive integer, or None for automatic, got {bad!r}"):
        tl.patch(tiny, CLEAN, CORRUPTED, ANSWER, batch_size=bad)


def test_patch_what_must_be_a_name(tiny):
    with pytest.raises(ValueError, match=r"what must be one of .* got \['head'\]"):
        tl.patch(tiny, CLEAN, CORRUPTED, ANSWER, what=["head"])


# --- inject() refuses results past the model's context, before the work -----------------------------


def _no_draws(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("inject drew tokens before checking the length")

    monkeypatch.setattr(tracelib.ood, "_draw", refuse)


@pytest.mark.parametrize("kind", ["random", "undertrained", "junk", "repeat"])
@pytest.mark.parametrize("n", [10**6, 200])
def test_inject_refuses_more_than_the_context_before_drawing(tiny, monkeypatch, kind, n):
    _no_draws(monkeypatch)
    n_clean = len(tl.resolve_answer(tiny, CLEAN, ANSWER).prompt_tokens)
    n_ctx = tiny.cfg.n_ctx
    with pytest.raises(ValueError) as err:
        tl.inject(tiny, CLEAN, kind, "between", n=n, answer=ANSWER)
    message = str(err.value)
    assert f"{n_clean + n} tokens (the prompt's {n_clean} plus {n} injected)" in message
    assert f"tiny-arith reads at most n_ctx = {n_ctx}" in message and f"room for {n_ctx - n_clean}" in message


def test_inject_fills_the_context_exactly(tiny):
    n_clean = len(tl.resolve_answer(tiny, CLEAN, ANSWER).prompt_tokens)
    room = tiny.cfg.n_ctx - n_clean
    full = tl.inject(tiny, CLEAN, "repeat", "between", n=room, answer=ANSWER)
    assert len(full.tokens) == tiny.cfg.n_ctx
    assert len(tl.trace(tiny, full.prompt, ANSWER).rows[0].tokens) == tiny.cfg.n_ctx  # and it traces
    with pytest.raises(ValueError, match=rf"would be {tiny.cfg.n_ctx + 1} tokens"):
        tl.inject(tiny, CLEAN, "repeat", "between", n=room + 1, answer=ANSWER)


def test_inject_refuses_junk_that_tokenises_past_the_context(tiny):
    # 40 junk strings pass the count check (at least 40 tokens fit) but tokenise to far more.
    n_clean = len(tl.resolve_answer(tiny, CLEAN, ANSWER).prompt_tokens)
    assert n_clean + 40 <= tiny.cfg.n_ctx
    with pytest.raises(ValueError, match=rf"'junk' injection would be at least \d+ tokens .* n_ctx = {tiny.cfg.n_ctx}"):
        tl.inject(tiny, CLEAN, "junk", "between", n=40, answer=ANSWER)


@pytest.mark.parametrize(("bad", "error"), [(1.5, TypeError), ("3", TypeError), (True, TypeError), (0, ValueError)])
def test_inject_n_and_seed_are_ints(tiny, bad, error):
    with pytest.raises(error, match=r"n must be a positive integer"):
        tl.inject(tiny, CLEAN, "junk", "between", n=bad)
    if error is TypeError:
        with pytest.raises(TypeError, match=rf"seed must be an int, got {bad!r}"):
            tl.inject(tiny, CLEAN, "junk", "between", seed=bad)


# --- find_undertrained_tokens checks its threshold ----------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "error"),
    [(math.nan, ValueError), (-1.0, ValueError), (-math.inf, ValueError), ("0.5", TypeError), (True, TypeError)],
)
def test_undertrained_threshold_is_checked(tiny, bad, error):
    # NaN flagged nothing, silently; "0.5" raised a TypeError from inside torch.
    with pytest.raises(error, match=rf"find_undertrained_tokens: threshold must be a number >= 0 .*got {bad!r}"):
        tl.find_undertrained_tokens(tiny, threshold=bad)


def test_undertrained_threshold_accepts_numbers(tiny):
    default = tl.find_undertrained_tokens(tiny)
    given = tl.find_undertrained_tokens(tiny, threshold=np.float32(default.threshold))
    assert given.threshold == pytest.approx(default.threshold, rel=1e-6)
    assert len(tl.find_undertrained_tokens(tiny, threshold=math.inf).token_ids) == tiny.cfg.d_vocab


# --- the CLI checks --html before loading the model --------------------------------------------------


@pytest.fixture
def loads(monkeypatch):
    """Records every model load; loading fails, so a test that gets that far fails loudly."""
    calls = []

    def load(name, *args, **kwargs):
        calls.append(name)
        raise RuntimeError("the model was loaded")

    monkeypatch.setattr("tracelib.load_model", load)
    return calls


def one_error_line(capfd) -> str:
    lines = capfd.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tracelib: error: "), lines
    return lines[0]


def test_html_under_a_file_fails_before_loading(tmp_path, capfd, loads):
    # A regular file as the folder: refused for every user, root included.
    (tmp_path / "notes.txt").write_text("keep")
    path = tmp_path / "notes.txt" / "report.html"
    assert main(["trace", *ONE_PLUS_ONE, "--html", str(path)]) == 2
    line = one_error_line(capfd)
    assert f"cannot write {path}: {path.parent} is a file, not a folder" in line
    assert loads == [] and sorted(os.listdir(tmp_path)) == ["notes.txt"]


def test_html_whose_folder_cannot_take_the_file_fails_before_loading(tmp_path, capfd, loads):
    # The folder exists, but the temporary file the write goes through cannot be made there (its name
    # is longer than the file system allows, for root too); found by the probe, not after the trace.
    path = tmp_path / ("r" * 240 + ".html")
    assert main(["trace", *ONE_PLUS_ONE, "--html", str(path)]) == 2
    line = one_error_line(capfd)
    assert f"cannot create a file in the folder {tmp_path}" in line
    assert loads == [] and os.listdir(tmp_path) == []


def test_html_into_a_read_only_folder_fails_before_loading(tmp_path, capfd, loads, monkeypatch):
    # Root writes into a chmod-ed folder anyway, so the refusal is simulated where the system gives it.
    folder = tmp_path / "read-only"
    folder.mkdir()
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if os.path.dirname(os.fspath(path)) == str(folder) and flags & os.O_CREAT:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    assert main(["trace", *ONE_PLUS_ONE, "--html", str(folder / "report.html")]) == 2
    line = one_error_line(capfd)
    assert f"cannot create a file in the folder {folder} (Permission denied)" in line
    assert loads == []


def test_html_check_leaves_nothing_behind(tmp_path, capfd, loads):
    assert main(["trace", *ONE_PLUS_ONE, "--html", str(tmp_path / "report.html")]) == 2
    assert "the model was loaded" in one_error_line(capfd)
    assert loads == ["tiny-arith"]  # the destination passed, so the model load was reached ...
    assert os.listdir(tmp_path) == []  # ... and the probe's file is gone
