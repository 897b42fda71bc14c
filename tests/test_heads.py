"""Heads: the source decomposition adds up, handles GQA, and matches TransformerLens."""

from __future__ import annotations

import pytest
import torch

import tracelib as tl

PROMPT, ANSWER = "what is 1 + 1", " 2"


def test_sources_sum_to_each_heads_dla(traced):
    _, tr, _ = traced
    torch.testing.assert_close(tr.heads.sources.sum(2), tr.dla.heads, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tr.heads.values, tr.dla.heads, rtol=1e-5, atol=1e-6)


def test_gqa_sources_match_an_explicit_kv_expansion(traced):
    """Reference: expand KV heads by hand from the HF config and recompute z = A @ v."""
    model, tr, r = traced
    _, cache = model.run_with_cache(r.prompt_tokens[None])
    n_heads = model.cfg.n_heads
    n_kv = getattr(model.cfg, "n_key_value_heads", None) or n_heads
    for layer in range(model.cfg.n_layers):
        v = cache[f"blocks.{layer}.attn.hook_v"][0]  # [src, kv_head, d_head]
        assert v.shape[1] == n_kv
        expanded = torch.cat([v[:, [h * n_kv // n_heads]] for h in range(n_heads)], dim=1)
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0, :, -1]  # [head, src]
        z = torch.einsum("hs,she->he", pattern, expanded)
        torch.testing.assert_close(z, cache[f"blocks.{layer}.attn.hook_z"][0, -1], rtol=1e-5, atol=1e-6)
        # tracelib's per-source terms against the same explicit expansion.
        direction = tl.answer_direction(model, r)
        if model.cfg.normalization_type in ("LN", "LNPre"):
            direction = direction - direction.mean()
        u = direction / cache["ln_final.hook_scale"][0, -1]
        per_src = torch.einsum("she,hem,m->hs", expanded, model.W_O[layer], u) * pattern
        torch.testing.assert_close(tr.heads.sources[layer, :, :, 0], per_src.cpu(), rtol=1e-4, atol=1e-6)


def test_qwen_fixture_really_is_gqa(qwen):
    assert qwen.cfg.n_key_value_heads < qwen.cfg.n_heads


def test_head_dla_matches_stack_head_results(traced):
    model, tr, r = traced
    _, cache = model.run_with_cache(r.prompt_tokens[None])
    stack, labels = cache.stack_head_results(layer=-1, pos_slice=-1, return_labels=True)
    ref = cache.logit_attrs(stack, tokens=r.token, pos_slice=-1)[:, 0]
    torch.testing.assert_close(tr.heads.values[:, :, 0].flatten(), ref.cpu().float(), rtol=1e-4, atol=1e-5)


def test_source_view_and_verdict(tiny):
    tr = tl.trace(tiny, PROMPT, ANSWER)
    (pl, ph), (nl, nh) = tr.heads.strongest()
    assert tr.dla.heads[pl, ph, 0] == tr.dla.heads[:, :, 0].max()
    assert tr.dla.heads[nl, nh, 0] == tr.dla.heads[:, :, 0].min()
    src = tr.heads.source(pl, ph)
    assert src.total == pytest.approx(tr.dla.heads[pl, ph, 0].item(), abs=1e-6)
    assert sum(src.shares().values()) == pytest.approx(1.0)
    assert src.verdict in ("final position", "operand", "elsewhere")
    assert tr.heads.operand_positions[0] == [3, 6]  # the two '1' tokens
    assert src.plot().layout.xaxis.title.text == "Position"


def test_per_position_grid_at_the_final_position_is_the_dla(traced):
    _, tr, _ = traced
    torch.testing.assert_close(tr.positions.values[0][-1], tr.dla.components[:, 0], rtol=1e-5, atol=1e-6)
    assert tr.positions.component_labels == tr.dla.component_labels


def test_heads_plus_bias_sum_to_attn_out_at_every_position(traced):
    _, tr, _ = traced
    pos = tr.positions
    attn = [pos.component_labels.index(f"{layer}_attn_out") for layer in range(tr.dla.n_layers)]
    summed = pos.heads[0].sum(-1) + pos.head_bias[0]  # [pos, layer]
    torch.testing.assert_close(summed, pos.values[0][:, attn], rtol=1e-5, atol=1e-5)
    # At the final position they are the trace's head DLA.
    torch.testing.assert_close(pos.heads[0][-1], tr.dla.heads[:, :, 0], rtol=1e-5, atol=1e-6)
