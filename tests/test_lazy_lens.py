"""The speed work of issue 10: lazy lens statistics, batched traces, one hook_dict read, quiet bars.

Every check here is about results, never timings: a faster trace must give the same numbers.
"""

from __future__ import annotations

import dataclasses
import gc
import types

import pytest
import torch

import tracelib as tl
from tracelib import lens as lens_module
from tracelib.formats import READABLE_PROB

PROMPTS = ["what is 1 + 1", "what is 12 + 3", "what is 2 + 2", "what is 100 + 1", "what is 3 + 4", "1 + 1 =", "9 + 9"]
ANSWERS = [" 2", " 15", " 4", " 101", " 7", " 2", " 18"]


def _eager_readout(model, curve_kind: str, tr) -> tuple[torch.Tensor, ...]:
    """Logit, logit diff, prob, rank and the whole `[entry, row, vocab]` logits, the way trace()
    computed them before issue 10: the whole vocabulary's logits, one row at a time, straight from W_U."""
    from tracelib.trace import build_rows, run_forward

    rows = build_rows(model, PROMPTS, ANSWERS)
    cache = run_forward(model, rows).final
    stack = cache.accumulated_resid(layer=None, incl_mid=True, apply_ln=False, pos_slice=None)
    normalised = cache.apply_ln_to_stack(stack, layer=None, recompute_ln=curve_kind == "standard")[:, :, 0]
    out = [], [], [], [], []
    for r, row in enumerate(rows):
        logits = normalised[:, r] @ model.W_U + model.b_U  # [entry, vocab]
        answer = logits[:, row.target]
        out[0].append(answer)
        out[1].append(answer - logits[:, tr.distractors[r]].mean(-1))
        out[2].append((answer - logits.logsumexp(-1)).exp())
        out[3].append((logits > answer[:, None]).sum(-1))
        out[4].append(logits)
    return tuple(torch.stack(x, dim=1) for x in out)


def test_lens_equals_the_full_vocabulary_readout(tiny, floats):
    """The lens reads logit and logit diff from a few W_U columns, and prob and rank lazily from the
    whole vocabulary, several rows per matmul. A narrow or batched matmul sums in another order than
    the row-by-row full one (how, depends on the CPU's BLAS kernels and threads): equal to float
    rounding, and ranks equal up to rivals that tie the answer to rounding."""
    tr = tl.trace(tiny, PROMPTS, ANSWERS)
    for kind in ("standard", "dla"):
        curve = getattr(tr.lens, kind)
        assert not curve.is_materialised  # prob and rank wait for their first read
        logit, diff, prob, _, full = _eager_readout(tiny, kind, tr)
        floats.assert_close(curve.logit, logit, msg=kind)
        floats.assert_close(curve.logit_diff, diff, scale_of=logit, msg=kind)
        floats.assert_close(curve.prob, prob, msg=kind)
        targets = torch.tensor([row.target for row in tr.rows]).expand(len(curve.labels), -1)
        floats.assert_rank_allowed(curve.rank, full, targets, msg=kind)
        assert curve.is_materialised


def test_narrow_unembedding_matches_the_wide_one(floats):
    """`_readout` reads only a few W_U columns (at least `_MIN_COLUMNS`), on realistic widths
    (Qwen2.5-0.5B and -1.5B): the same columns of the full `[entry, vocab]` logits to float rounding
    (not bit for bit: which kernel a narrow and a wide matmul take, and so the order of their sums,
    depends on the CPU)."""
    gen = torch.Generator().manual_seed(0)
    for d_model, vocab, entries, rows in ((896, 151_936, 49, 3), (1536, 151_936, 57, 2)):
        normalised = torch.randn(entries, rows, d_model, generator=gen)
        W_U = torch.randn(d_model, vocab, generator=gen) * 0.05
        b_U = torch.randn(vocab, generator=gen)
        targets = torch.randint(0, vocab, (rows,), generator=gen)
        rivals = [torch.randint(0, vocab, (2,), generator=gen).tolist() for _ in range(rows)]
        logit, diff = lens_module._readout(normalised, W_U, b_U, targets, rivals)
        model = types.SimpleNamespace(W_U=W_U, b_U=b_U)
        # The standard lens's residuals are the DLA lens's times a positive factor per entry and row.
        scale = torch.rand(entries, rows, generator=gen) + 0.5
        both = lens_module._full_readout(model, normalised, scale, targets, torch.device("cpu"))
        for r in range(rows):
            full = normalised[:, r] @ W_U + b_U
            answer = full[:, targets[r]]
            floats.assert_close(logit[:, r], answer)
            floats.assert_close(diff[:, r], answer - full[:, rivals[r]].mean(-1), scale_of=answer)
            # ...and the lazy readout, several rows and both lenses per matmul, equals the row-by-row one.
            for kind, residual in (("dla", normalised[:, r]), ("standard", normalised[:, r] * scale[:, r, None])):
                prob, rank = both[kind]
                logits = residual @ W_U + b_U  # computed on its own, as the standard lens would
                at = logits[:, targets[r]]
                floats.assert_close(prob[:, r], (at - logits.logsumexp(-1)).exp())
                floats.assert_rank_allowed(rank[:, r], logits, targets[r].expand(entries))


def test_readout_by_blocks_of_rows_and_groups_of_columns_equals_each_lens_alone(floats, monkeypatch):
    """The lazy readout unembeds a few rows at a time against a group of W_U's columns at a time,
    the groups that hold answers first: prob and rank are those of each lens's whole logits computed
    on their own, with b_U and without (where one count ranks the answer in both lenses)."""
    gen = torch.Generator().manual_seed(1)
    entries, d_model, vocab = 5, 32, 1000
    monkeypatch.setattr(lens_module, "_READOUT_RESIDUALS", 2 * entries)  # blocks of 2 rows
    monkeypatch.setattr(lens_module, "_MATMUL_COLUMNS", 64)
    monkeypatch.setattr(lens_module, "_GROUP_BYTES", 2 * entries * 4 * 64 * 3)  # 192 columns, 6 groups
    # Answers in the last, shorter group, at a group's first and last column, two in one group.
    targets = torch.tensor([999, 192, 0, 5, 191, 500, 999])
    normalised = torch.randn(entries, len(targets), d_model, generator=gen)
    scale = torch.rand(entries, len(targets), generator=gen) + 0.5
    W_U = torch.randn(d_model, vocab, generator=gen)
    for b_U in (torch.randn(vocab, generator=gen), torch.zeros(vocab)):
        model = types.SimpleNamespace(W_U=W_U, b_U=b_U)
        both = lens_module._full_readout(model, normalised, scale, targets, torch.device("cpu"))
        for kind, (prob, rank) in both.items():
            assert prob.shape == rank.shape == (entries, len(targets)) and rank.dtype == torch.int64
            for r, target in enumerate(targets.tolist()):
                residual = normalised[:, r] * (scale[:, r, None] if kind == "standard" else 1)
                logits = residual @ W_U + b_U
                floats.assert_close(prob[:, r], (logits[:, target] - logits.logsumexp(-1)).exp(), msg=kind)
                floats.assert_rank_allowed(rank[:, r], logits, target, msg=kind)
        if not b_U.any():
            assert torch.equal(both["standard"][1], both["dla"][1])


def test_prob_and_rank_are_computed_once(tiny, monkeypatch):
    tr = tl.trace(tiny, PROMPTS, ANSWERS)
    calls = []
    full_readout = lens_module._full_readout

    def counting(*args):
        calls.append(1)
        return full_readout(*args)

    monkeypatch.setattr(lens_module, "_full_readout", counting)
    curve = tr.lens.standard
    prob, rank = curve.prob, curve.rank
    assert len(calls) == 1  # one batched readout gives both prob and rank
    assert curve.prob is prob and curve.rank is rank and len(calls) == 1
    tr.lens.readable_from(3), tr.lens.to_frame(), tr.summary()
    assert tr.lens.dla.is_materialised
    assert len(calls) == 1  # the same readout gave the DLA lens too: one full-vocabulary matmul per entry


def test_model_gone_error_then_materialise():
    model = tl.load_model("tiny-arith")
    tr = tl.trace(model, PROMPTS[:2], ANSWERS[:2])
    logit = tr.lens.standard.logit.clone()  # eager: needs no model
    del model
    gc.collect()
    with pytest.raises(tl.ModelGoneError, match="materialise"):
        _ = tr.lens.standard.rank
    assert torch.equal(tr.lens.standard.logit, logit)
    again = tl.load_model("tiny-arith")
    fresh = tl.trace(again, PROMPTS[:2], ANSWERS[:2]).lens
    want = {kind: (getattr(fresh, kind).prob, getattr(fresh, kind).rank) for kind in ("standard", "dla")}
    assert tr.lens.materialise(again) is tr.lens
    del again
    gc.collect()
    for kind, (prob, rank) in want.items():
        assert torch.equal(getattr(tr.lens, kind).prob, prob) and torch.equal(getattr(tr.lens, kind).rank, rank)
    assert "standard" in repr(tr.lens.standard)


def test_a_trace_keeps_no_model_alive():
    model = tl.load_model("tiny-arith")
    tr = tl.trace(model, PROMPTS[0], ANSWERS[0])
    import weakref

    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None and tr.lens.standard.logit.shape[1] == 1


def test_eager_constructor_and_shape_checks_still_hold(tiny):
    curve = tl.trace(tiny, PROMPTS[:2], ANSWERS[:2]).lens.standard
    eager = tl.LensCurve(curve.kind, curve.labels, curve.logit, curve.logit_diff, curve.prob, curve.rank)
    assert eager.is_materialised and torch.equal(eager.rank, curve.rank)
    with pytest.raises(ValueError, match="rank must be"):
        tl.LensCurve(curve.kind, curve.labels, curve.logit, curve.logit_diff, curve.prob, curve.rank[:, :1])
    with pytest.raises(ValueError, match="missing"):
        tl.LensCurve(curve.kind, curve.labels, curve.logit, curve.logit_diff)
    bumped = dataclasses.replace(curve, rank=curve.rank + 1)
    assert torch.equal(bumped.rank, curve.rank + 1) and torch.equal(bumped.prob, curve.prob)


# Integers decided by comparing floats: checked against independently computed logits instead.
_DECIDED_BY_FLOATS = ("rank", "ranks", "top_ids", "top_strs")
# Fields in units of probability; every other float field is in logit units (logits, differences of
# logits, attributions), computed from logits as large as the trace's largest.
_PROBABILITIES = ("prob", "probs", "top_probs", "distractor_probs", "final_prob", "attention")


def _assert_same(floats, a, b, path="trace", logit_scale=None):
    """Equal field by field: float values to float rounding (another batch shape may take other
    matmul kernels, whose sums round in another order), everything else exactly, except the ranks
    and top-k ids, which `_assert_ranks_allowed` checks against independent logits."""
    if logit_scale is None:
        logit_scale = a.margin.logit.abs().max()
    name = path.rsplit(".", 1)[-1]
    if name in _DECIDED_BY_FLOATS:
        return
    if isinstance(a, torch.Tensor):
        assert a.shape == b.shape and a.dtype == b.dtype, path
        if a.is_floating_point():
            scale = None if name in _PROBABILITIES else logit_scale
            floats.assert_close(b, a, scale_of=scale, msg=path, equal_nan=True)
        else:
            assert torch.equal(a, b), path
    elif dataclasses.is_dataclass(a):
        assert type(a) is type(b), path
        for f in dataclasses.fields(a):
            _assert_same(floats, getattr(a, f.name), getattr(b, f.name), f"{path}.{f.name}", logit_scale)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for x, y in zip(a, b):
            _assert_same(floats, x, y, path, logit_scale)
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6), path
    else:
        assert a == b, path


def _assert_ranks_allowed(floats, model, tr):
    """Every rank and top-k in `tr` is the one a plain unbatched forward pass (and TransformerLens's
    own logit lens) gives, up to rivals that tie to float rounding."""
    for r, row in enumerate(tr.rows):
        logits = floats.final_logits(model, row.tokens)  # [pos, vocab]
        floats.assert_rank_allowed(tr.margin.rank[r], logits[-1], row.target, msg=f"margin row {r}")
        floats.assert_topk_allowed(tr.margin.top_ids[r], tr.margin.top_logits[r], logits[-1], msg=f"top-k row {r}")
        rivals = torch.tensor(tr.distractors[r])
        floats.assert_rank_allowed(tr.margin.distractor_ranks[r], logits[-1].expand(len(rivals), -1), rivals)
        target = torch.tensor(row.target).expand(len(row.tokens))
        floats.assert_rank_allowed(tr.positions.final_rank[r], logits, target, msg=f"positions row {r}")
        for kind in ("standard", "dla"):
            curve = getattr(tr.lens, kind)
            full = floats.lens_logits(model, row.tokens, kind)
            floats.assert_rank_allowed(curve.rank[:, r], full, row.target, msg=f"{kind} lens row {r}")


def test_batched_trace_equals_one_batch_at_equal_lengths(tiny, floats):
    """At equal lengths no row is padded, so batches differ only in their number of rows; a matmul
    of another row count may take another kernel (on another CPU, or with another thread count),
    so the numbers are equal to float rounding, not bit for bit."""
    prompts = [f"what is {a} + {b}" for a in range(3) for b in range(3)]
    answers = [f" {a + b}" for a in range(3) for b in range(3)]
    whole = tl.trace(tiny, prompts, answers)
    batched = tl.trace(tiny, prompts, answers, batch_size=4)
    _assert_same(floats, whole, batched)
    for tr in (whole, batched):
        _assert_ranks_allowed(floats, tiny, tr)


def test_batched_trace_equals_one_batch(tiny, floats):
    """Rows of different lengths: a batch pads to its own longest row, and attention over another
    padded length sums in another order, as with batching itself."""
    whole = tl.trace(tiny, PROMPTS, ANSWERS)
    batched = tl.trace(tiny, PROMPTS, ANSWERS, batch_size=3)
    assert len(whole.rows) > len(PROMPTS)  # multi-token answers: batches cut across a prompt's steps
    _assert_same(floats, whole, batched)
    assert whole.heads.sources.shape == batched.heads.sources.shape  # src padded to the longest row
    for tr in (whole, batched):
        _assert_ranks_allowed(floats, tiny, tr)
    assert whole.summary().count("\n") == batched.summary().count("\n")


def test_batch_size_is_checked(tiny):
    for bad in (0, -1):
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            tl.trace(tiny, PROMPTS, ANSWERS, batch_size=bad)
    for bad in (2.5, True, "4"):
        with pytest.raises(TypeError, match="batch_size must be a positive integer"):
            tl.trace(tiny, PROMPTS, ANSWERS, batch_size=bad)


def test_progress_is_quiet_under_pytest_even_though_pytest_is_always_imported(monkeypatch):
    from tracelib.batching import _is_quiet, progress_bar

    assert _is_quiet()
    assert list(progress_bar(range(10), None, "x")) == list(range(10))
    monkeypatch.delenv("PYTEST_CURRENT_TEST")
    monkeypatch.delenv("TRACELIB_PROGRESS", raising=False)
    monkeypatch.delitem(__import__("sys").modules, "nbval", raising=False)
    # TransformerLens imports pytest in every process, so that alone must not silence the bars.
    assert not _is_quiet()
    bar = progress_bar(range(10), None, "x")
    assert not bar.disable and list(bar) == list(range(10))
    bar.close()
    assert isinstance(progress_bar(range(3), None, "x"), list)  # 4 or fewer: no bar
    monkeypatch.setenv("TRACELIB_PROGRESS", "0")
    assert _is_quiet()


def test_hook_dict_is_read_once_per_trace(tiny, monkeypatch):
    """The bridge builds hook_dict afresh on every read (hundreds of hooks): a trace adds one read
    to the ones `run_with_hooks` itself makes."""
    from tracelib.trace import hook_names, real_hook_points

    cls = type(tiny)
    reads = []
    hook_dict = cls.hook_dict

    def counting(self):
        reads.append(1)
        return hook_dict.fget(self)

    monkeypatch.setattr(cls, "hook_dict", property(counting))
    real_hook_points(tiny, hook_names(tiny))
    assert len(reads) == 1
    reads.clear()
    with torch.no_grad():
        tiny.run_with_hooks(tiny.to_tokens("1 + 1"), fwd_hooks=[])
    by_run_with_hooks = len(reads)
    reads.clear()
    tl.trace(tiny, PROMPTS[:3], ANSWERS[:3])
    assert len(reads) == by_run_with_hooks + 1


def test_bench_scale_table_judges_each_target_on_its_own_shape():
    # scripts/bench.py's issue-10 table (no timing here): a verdict only where the target is set.
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"
    spec = importlib.util.spec_from_file_location("tracelib_bench_scale", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    m = {"peak_rss": 2**30, "peak_over_before": 0}
    one = {"forward": {**m, "time_s": 1.0}, "run_with_cache": {**m, "time_s": 1.0}, "trace": {**m, "time_s": 1.5}}
    batch = {
        "trace_batch": {**m, "time_s": 1.0},
        "trace_single": {**m, "time_s": 12.0},
        "run_with_cache_batch": {**m, "time_s": 1.0},
    }
    long = {}
    for length, (t, f) in {128: (3.0, 2.0), 2048: (4.0, 3.9)}.items():
        common = {"length": length, "tokens": length, "time_s": 1.0, "gpu_peak": 0}
        long[f"trace_long@{length}"] = {**common, "peak_rss": t * 2**30, "peak_over_before": 0}
        long[f"forward_long@{length}"] = {**common, "peak_rss": f * 2**30, "peak_over_before": 0}
    rows = bench.scale_rows(
        {"tiny": {"steps": {**one, **batch}}, "qwen05": {"steps": {**one, **batch, **long}}, "qwen": {"steps": one}}
    )
    verdicts = {(name, key.split(",")[0], detail.split(";")[0]): met for name, key, detail, _, _, met in rows}
    assert verdicts[("tiny", "trace / run_with_cache", "12 tokens")] is None  # no target on the bundled model
    assert verdicts[("qwen05", "trace / run_with_cache", "12 tokens")] is False  # 1.5 > 1.2
    assert verdicts[("qwen", "trace / run_with_cache", "12 tokens")] is False
    assert verdicts[("tiny", "one call per prompt / one batched call (>=)", "100 prompts")] is True  # 12 >= 10
    assert verdicts[("qwen05", "one call per prompt / one batched call (>=)", "100 prompts")] is None
    assert verdicts[("qwen05", "batched trace / batched run_with_cache", "100 prompts")] is True
    assert verdicts[("qwen05", "trace peak / forward peak", "128 tokens")] is None  # 1.5, but the target is at 2,048
    assert verdicts[("qwen05", "trace peak / forward peak", "2048 tokens")] is True  # 4.0 / 3.9
    table = bench.render({"qwen05": {"layers": 24, "steps": {**one, **long}}})
    assert "| 1.50 | 1.2 | ✗ |" in table and "| 1.50 | — | (for information) |" in table


def test_readable_from_unembeds_only_the_tail_it_needs(tiny, monkeypatch):
    """`readable_from` walks back from the last entry (1 entry, then 2, 4, ... at a time here) and
    stops at the first entry where the answer is not readable: the entries before that chunk are
    never unembedded until `prob` is read, and every answer is the one the whole curve gives."""
    monkeypatch.setattr(lens_module, "_TAIL_ENTRIES", 1)
    tr = tl.trace(tiny, PROMPTS, ANSWERS)
    curve = tr.lens.standard
    joint = curve.__dict__["_pending"].joint
    tail = [curve.readable_from(r) for r in range(len(PROMPTS))]
    assert not curve.is_materialised
    known = joint.known.clone()
    prob = curve.prob  # the whole curve: only the entries not yet known are unembedded now
    n_entry = len(curve.labels)

    def chunk_start(entry: int) -> int:  # the first entry of the chunk that holds `entry`
        stop, size = n_entry, 1
        while True:
            start = max(0, stop - size)
            if start <= entry:
                return start
            stop, size = start, 2 * size

    needed = n_entry - 1
    for r, got in enumerate(tail):
        ok = (prob[:, r] > READABLE_PROB).tolist()
        first = n_entry - 1
        while first > 0 and ok[first - 1]:
            first -= 1
        assert got == (curve.labels[first] if ok[-1] else None), r
        assert curve.readable_from(r) == got
        touched = n_entry - 1 if not ok[-1] else max(first - 1, 0)  # where this row's walk stopped
        needed = min(needed, touched)
    assert known.tolist() == [e >= chunk_start(needed) for e in range(n_entry)]
    assert not known.all() or chunk_start(needed) == 0


def test_readable_from_needs_the_model_until_prob_is_read():
    """The tail is unembedded with the model that traced; once it is freed, `readable_from` on a
    curve not yet computed says so, as `prob` does."""
    model = tl.load_model("tiny-arith")
    tr = tl.trace(model, PROMPTS[:2], ANSWERS[:2])
    del model
    gc.collect()
    with pytest.raises(tl.ModelGoneError, match="materialise"):
        tr.lens.dla.readable_from(0)
