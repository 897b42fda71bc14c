"""Memory linear in prompt length: no full attention pattern is kept, and nothing changes because of it."""

from __future__ import annotations

import copy
import gc
import importlib
import json
import shutil
from pathlib import Path

import pytest
import torch

import tracelib as tl
from tracelib import reference_format as reference
from tracelib.trace import FINAL, FULL, build_rows, first_nonfinite, hook_names, run_forward

PROMPTS, ANSWERS = ["what is 1 + 1", "what is 12 + 13"], [" 2", " 25"]
# Written by tracelib's format-1 code (Heads kept every full pattern, and no token ids).
V1_REFERENCE = Path(__file__).parent / "data" / "reference_v1"
V1_PROMPTS, V1_ANSWERS = ["what is 1 + 1", "what is 12 + 3"], [" 2", " 15"]


def test_hooks_keep_z_everywhere_and_only_the_final_pattern_row(any_model):
    names = hook_names(any_model)
    for layer in range(any_model.cfg.n_layers):
        assert names[f"blocks.{layer}.attn.hook_z"] == FULL
        assert names[f"blocks.{layer}.attn.hook_pattern"] == FINAL
    rows = build_rows(any_model, PROMPTS, ANSWERS)
    fwd = run_forward(any_model, rows)
    n_rows, width = fwd.tokens.shape
    assert not any(name.endswith("hook_pattern") for name in fwd.full.cache_dict)
    for layer in range(any_model.cfg.n_layers):
        pattern = fwd.final[f"blocks.{layer}.attn.hook_pattern"]
        assert pattern.shape == (n_rows, any_model.cfg.n_heads, 1, width)
        # A copy, not a view of the full pattern: its storage holds only the final rows.
        assert pattern.untyped_storage().nbytes() == pattern.numel() * pattern.element_size()
        z = fwd.full[f"blocks.{layer}.attn.hook_z"]
        assert z.shape == (n_rows, width, any_model.cfg.n_heads, any_model.cfg.d_head)
    # No cached tensor grows with the square of the prompt.
    for cache in (fwd.full, fwd.final):
        for name, act in cache.cache_dict.items():
            assert sum(d == width for d in act.shape) <= 1 or width == 1, name


def test_final_pattern_row_is_the_full_patterns(traced):
    model, tr, r = traced
    _, cache = model.run_with_cache(r.prompt_tokens[None])
    for layer in range(model.cfg.n_layers):
        full = cache[f"blocks.{layer}.attn.hook_pattern"][0, :, -1].cpu()  # [head, src]
        torch.testing.assert_close(tr.heads.attention[layer, :, :, 0], full, rtol=1e-5, atol=1e-6)


def test_attention_patterns_match_run_with_cache(any_model):
    tokens = tl.resolve_answer(any_model, PROMPTS[1], ANSWERS[1]).prompt_tokens
    _, cache = any_model.run_with_cache(tokens[None])
    last = any_model.cfg.n_layers - 1
    heads = [(last, 0), (0, any_model.cfg.n_heads - 1), (0, 0), (last, 0)]  # any order, repeats allowed
    got = tl.attention_patterns(any_model, tokens, heads)
    assert got.shape == (len(heads), len(tokens), len(tokens))
    for i, (layer, head) in enumerate(heads):
        torch.testing.assert_close(got[i], cache[f"blocks.{layer}.attn.hook_pattern"][0, head].cpu())
    with pytest.raises(ValueError, match="No head L0H99"):
        tl.attention_patterns(any_model, tokens, [(0, 99)])


def test_attention_patterns_leave_no_hooks_behind(tiny):
    tokens = tl.resolve_answer(tiny, PROMPTS[0], ANSWERS[0]).prompt_tokens
    before = tiny(tokens[None])
    tl.attention_patterns(tiny, tokens, [(0, 0)])  # stops the pass early, after layer 0
    torch.testing.assert_close(tiny(tokens[None]), before, rtol=0, atol=0)
    assert tl.trace(tiny, PROMPTS[0], ANSWERS[0]).heads.values.isfinite().all()


def test_attention_view_with_model_weakref_and_neither(tiny):
    tr = tl.trace(tiny, PROMPTS, ANSWERS)
    assert tr.heads.tokens[1].tolist() == tr.rows[1].tokens.tolist()
    # circuitsvis HTML has random ids: only check that it builds.
    assert tr.heads.attention_view(row=1) is not None  # the model the trace was made with
    assert tr.heads.attention_view([(0, 1)], row=0, model=tiny) is not None
    copied = copy.deepcopy(tr.heads)  # the weak reference is not copied
    torch.testing.assert_close(copied.sources, tr.heads.sources)
    with pytest.raises(ValueError, match="model="):
        copied.attention_view()


def test_attention_view_without_a_model_says_to_pass_one(tmp_path):
    model = tl.load_model("tiny-arith")
    tr = tl.trace(model, PROMPTS[0], ANSWERS[0])
    loaded = tl.load_reference(tr.save(tmp_path / "ref", model))
    with pytest.raises(ValueError, match=r"attention_view\(model=model\)"):
        loaded.heads.attention_view()
    assert loaded.heads.attention_view(model=model) is not None
    assert tl.load_reference(tmp_path / "ref", model=model).heads.attention_view() is not None
    del model
    gc.collect()  # the trace holds the model weakly: once it is gone, the view asks for one
    with pytest.raises(ValueError, match="model="):
        tr.heads.attention_view()


def test_per_position_head_dla_is_pattern_times_values(traced):
    """The old computation: z rebuilt as A @ v from a full run_with_cache, then z . (W_O @ u_pos)."""
    model, tr, r = traced
    _, cache = model.run_with_cache(r.prompt_tokens[None])
    cfg = model.cfg
    n_kv = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
    kv_of_head = torch.arange(cfg.n_heads) // (cfg.n_heads // n_kv)
    direction = tl.answer_direction(model, r)
    if cfg.normalization_type in ("LN", "LNPre"):
        direction = direction - direction.mean()
    u = direction[None] / cache["ln_final.hook_scale"][0]  # [pos, d_model]
    for layer in range(cfg.n_layers):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0]  # [head, dst, src]
        v = cache[f"blocks.{layer}.attn.hook_v"][0][:, kv_of_head.to(pattern.device)]  # [src, head, d_head]
        z = torch.einsum("hps,she->phe", pattern, v)
        expected = torch.einsum("phe,hem,pm->ph", z, model.W_O[layer], u).cpu()
        torch.testing.assert_close(tr.positions.heads[0][:, layer], expected, rtol=1e-4, atol=1e-5)


def test_per_position_blocks_do_not_change_the_numbers(tiny, monkeypatch, floats):
    from tracelib import positions

    whole = tl.trace(tiny, PROMPTS, ANSWERS)
    monkeypatch.setattr(positions, "BLOCK_ELEMENTS", 1)  # one position per block
    blocked = tl.trace(tiny, PROMPTS, ANSWERS)
    # A one-position block is a matrix-vector product, which sums in another order than the whole
    # prompt's matmul: equal to float rounding, scaled to the logits the values are computed from.
    scale = whole.margin.logit.abs().max()
    for name in ("heads", "values", "lens_logit_diff"):
        for a, b in zip(getattr(whole.positions, name), getattr(blocked.positions, name)):
            floats.assert_close(b, a, scale_of=scale, msg=name)
    # Ranks are not computed in position blocks; they are still the model's own, up to ties.
    for tr in (whole, blocked):
        for r, row in enumerate(tr.rows):
            floats.assert_rank_allowed(tr.positions.final_rank[r], floats.final_logits(tiny, row.tokens), row.target)


def test_first_nonfinite_finds_z_everywhere_and_the_final_pattern_row(tiny):
    rows = build_rows(tiny, PROMPTS, ANSWERS)
    fwd = run_forward(tiny, rows)
    assert first_nonfinite(tiny, fwd) is None
    fwd.full["blocks.2.attn.hook_z"][1, 4, 0, 0] = torch.nan
    assert first_nonfinite(tiny, fwd) == ("blocks.2.attn.hook_z", 1, 4)
    final = int(fwd.lengths[0]) - 1
    fwd.final["blocks.2.attn.hook_pattern"][0, 1, 0, 2] = torch.inf  # before z in the forward pass
    assert first_nonfinite(tiny, fwd) == ("blocks.2.attn.hook_pattern", 0, final)


def test_a_format_1_reference_loads_upgraded(tiny, tmp_path, floats):
    """Written by format-1 tracelib, whose models folded value biases and traced the raw logit.

    On another machine: its numbers equal a fresh trace's to float rounding, not bit for bit."""
    meta = reference.read_metadata(V1_REFERENCE)
    assert meta["format_version"] == 1 and "patterns" in meta["trace"]["fields"]["heads"]["fields"]
    path = shutil.copytree(V1_REFERENCE, tmp_path / "v1")
    with pytest.raises(tl.ReferenceModelMismatchError, match=r"fold_value_biases=True\) to check this reference"):
        tl.load_reference(path, model=tiny)
    tiny = tl.load_model("tiny-arith", fold_value_biases=True)
    loaded = tl.load_reference(path, model=tiny)
    assert loaded.dla.value_biases == "folded"
    fresh = tl.trace(tiny, V1_PROMPTS, V1_ANSWERS, metric="logit")
    assert not hasattr(loaded.heads, "patterns")
    assert [t.tolist() for t in loaded.heads.tokens] == [row.tokens.tolist() for row in fresh.rows]
    scale = fresh.margin.logit.abs().max()
    floats.assert_close(loaded.heads.sources, fresh.heads.sources, scale_of=scale)
    floats.assert_close(loaded.dla.heads, fresh.dla.heads, scale_of=scale)
    for a, b in zip(loaded.positions.heads, fresh.positions.heads):
        floats.assert_close(a, b, scale_of=scale)
    # The summaries say the same, numbers to their printed rounding, except what format 1 did not
    # record (the metric's words, readability per position). The top-k lists' orders are compared
    # exactly: their neighbours differ by far more than rounding on this reference.
    upgraded = ("DLA of", "positions")
    old, new = ([line for line in t.summary().split("\n") if not line.startswith(upgraded)] for t in (loaded, fresh))
    floats.assert_text_close("\n".join(old), "\n".join(new))
    assert loaded.heads.attention_view() is not None  # load_reference(path, model) lends its model
    # Saved again, it is a reference of the current format.
    again = loaded.save(tmp_path / "v2", tiny)
    assert reference.read_metadata(again)["format_version"] == reference.FORMAT_VERSION > 1
    torch.testing.assert_close(tl.load_reference(again).heads.sources, loaded.heads.sources, rtol=0, atol=0)


def test_a_future_format_is_still_refused(tiny, tmp_path):
    path = tl.trace(tiny, PROMPTS[0], ANSWERS[0]).save(tmp_path / "ref", tiny)
    meta = reference.read_metadata(path)
    meta["format_version"] = reference.FORMAT_VERSION + 1
    (path / reference.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(tl.ReferenceVersionError, match=f"format version {reference.FORMAT_VERSION + 1}"):
        tl.load_reference(path)


@pytest.mark.parametrize("block", [None, 1])
def test_logits_scored_in_blocks_equal_the_models(any_model, block, monkeypatch):
    trace_module = importlib.import_module("tracelib.forward")  # where the trace scores positions in blocks
    if block is not None:
        monkeypatch.setattr(trace_module, "LOGIT_BLOCK_ELEMENTS", block)  # one position per block
    long = "what is 1 + 1 and 2 + 3 and 4 + 5 and 6 + 7 and 8 + 9 and 1 + 1"  # several blocks of 16 positions
    rows = build_rows(any_model, [long, *PROMPTS], [" 2", *ANSWERS])
    fwd = run_forward(any_model, rows)
    with torch.no_grad():
        logits = any_model(fwd.tokens.to(any_model.cfg.device))
    batch = torch.arange(len(rows))
    # A block of a few positions may take another matmul kernel than the whole batch (its sums round
    # in another order), so the logits agree to float rounding, not bit for bit.
    final = logits[batch, fwd.lengths - 1]
    torch.testing.assert_close(fwd.final_logits, final, rtol=1e-5, atol=1e-6 * final.abs().max().item())
    answer = logits[batch, :, torch.tensor([row.target for row in rows])]  # [row, pos]
    ranks = (logits > answer[..., None]).sum(-1).cpu()
    # A rank can move only where a rival's logit ties the answer's to float rounding.
    near = (logits - answer[..., None]).abs() <= 1e-5 * logits.abs().amax(-1, keepdim=True)
    assert ((fwd.answer_rank - ranks).abs() <= near.sum(-1).cpu()).all()


def test_rebuilt_residual_stream_is_the_models_own(any_model):
    """The trace keeps sublayer outputs, not the residual stream; rebuilt, it is bit for bit the model's."""
    from tracelib.positions import position_block

    rows = build_rows(any_model, PROMPTS, ANSWERS)
    fwd = run_forward(any_model, rows)
    _, cache = any_model.run_with_cache(fwd.tokens.to(any_model.cfg.device))
    width = fwd.tokens.shape[1]
    for start, stop in [(0, width), (1, 4)]:
        block = position_block(any_model, fwd, start, stop)
        for layer in range(any_model.cfg.n_layers):
            for hook in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post"):
                name = f"blocks.{layer}.{hook}"
                assert torch.equal(block[name], cache[name][:, start:stop]), name
