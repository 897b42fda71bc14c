"""compare() and align_tokens(): differences, top-k overlaps, rank correlation, aligned positions."""

from __future__ import annotations

import math

import pandas as pd
import plotly.colors
import pytest
import torch

import tracelib as tl
from tracelib.compare import COMPARE_UNITS, spearman, top_set

PLAIN = "what is 1 + 1"


def is_blue(colour: str) -> bool:
    r, _, b = (float(x) for x in colour[colour.index("(") + 1 : -1].split(",")[:3])
    return b > r


def colour(scale, low: float, high: float, value: float) -> str:
    return plotly.colors.sample_colorscale([list(c) for c in scale], [(value - low) / (high - low)])[0]


def pandas_spearman(x, y) -> float:
    # Pearson on pandas' average ranks: Spearman with ties, without scipy (which pandas' "spearman" needs).
    return pd.Series(x.tolist()).rank().corr(pd.Series(y.tolist()).rank())


@pytest.fixture(scope="module")
def one_plus_one(tiny):
    return tl.trace(tiny, PLAIN, " 2")


@pytest.fixture(scope="module")
def one_plus_two(tiny):
    return tl.trace(tiny, "what is 1 + 2", " 3")


@pytest.fixture(scope="module")
def chat_trace(tiny_chat):
    return tl.trace(tiny_chat, tl.chat_prompt(tiny_chat, "what is 1 + 1?"), " 2")


# --- align_tokens ------------------------------------------------------------------------------------


def test_aligning_a_prompt_with_itself_is_the_identity():
    tokens = [5, 9, 5, 2, 7]
    assert tl.align_tokens(tokens, tokens) == list(range(5))
    assert tl.align_tokens(torch.tensor(tokens), torch.tensor(tokens)) == list(range(5))


def test_inserted_tokens_map_to_none_and_the_rest_back_to_their_positions():
    a = ["what", " is", " ", "1", " +", " ", "1"]
    b = ["what", " is", "<junk>", "<junk>", " ", "1", " +", " ", "1", "<junk>"]
    assert tl.align_tokens(a, b) == [0, 1, None, None, 2, 3, 4, 5, 6, None]
    # and back: b's positions seen from a, the junk simply has no counterpart in a
    assert tl.align_tokens(b, a) == [0, 1, 4, 5, 6, 7, 8]


def test_a_key_matches_tokens_written_differently():
    a, b = ["what", " is"], ["Q", ":", " what", " is"]
    assert tl.align_tokens(a, b) == [None, None, None, 1]
    assert tl.align_tokens(a, b, key=str.strip) == [None, None, 0, 1]


def test_chat_template_tokens_map_to_none_and_the_question_to_the_plain_prompt(tiny, tiny_chat, one_plus_one):
    plain = one_plus_one.rows[0]
    chat = tl.resolve_answer(tiny_chat, tl.chat_prompt(tiny_chat, "what is 1 + 1?"), " 2")
    chat_str = tiny_chat.to_str_tokens(chat.prompt_tokens)
    alignment = tl.align_tokens(plain.tokens, chat.prompt_tokens)
    assert len(alignment) == len(chat_str)
    for j, i in enumerate(alignment):
        if i is not None:
            assert plain.str_tokens[i] == chat_str[j]
    # The operands: both '1's of the question map onto the plain prompt's '1's, in order.
    chat_ones = [j for j, t in enumerate(chat_str) if t == "1"]
    plain_ones = [i for i, t in enumerate(plain.str_tokens) if t == "1"]
    assert [alignment[j] for j in chat_ones] == plain_ones
    # Every template token (and the '?' the plain prompt lacks) has no counterpart.
    for j, t in enumerate(chat_str):
        if t in ("<|im_start|>", "<|im_end|>", "user", "assistant", "\n", "?"):
            assert alignment[j] is None, (j, t)
    assert alignment[chat_str.index("what")] == plain.str_tokens.index("what")


# --- compare: the statistics ---------------------------------------------------------------------------


def test_a_trace_compared_with_itself_is_identical_everywhere(one_plus_one):
    cmp = tl.compare(one_plus_one, one_plus_one, k=5)
    for unit in COMPARE_UNITS:
        assert cmp.difference(unit).abs().max().item() == 0.0
        assert cmp.jaccard(unit, +1) == 1.0 and cmp.jaccard(unit, -1) == 1.0
        assert cmp.spearman(unit) == pytest.approx(1.0)
    assert cmp.alignment == list(range(len(one_plus_one.rows[0].str_tokens)))
    stats = cmp.stats()
    assert list(stats["unit"]) == list(COMPARE_UNITS)
    assert stats[["jaccard_positive", "jaccard_negative", "spearman"]].to_numpy().ravel() == pytest.approx(1.0)


def test_different_sums_differ_and_overlap_as_computed_by_hand(one_plus_one, one_plus_two):
    k = 5
    cmp = tl.compare(one_plus_one, one_plus_two, k=k)
    for unit in COMPARE_UNITS:
        assert cmp.difference(unit).abs().max().item() > 1e-3, unit
    torch.testing.assert_close(
        cmp.difference("head"), one_plus_two.dla.heads[:, :, 0] - one_plus_one.dla.heads[:, :, 0]
    )
    a, b = one_plus_one.dla.heads[:, :, 0].flatten(), one_plus_two.dla.heads[:, :, 0].flatten()
    for sign in (+1, -1):
        top_a = {int(i) for i in (sign * a).topk(k).indices if sign * a[i] > 0}
        top_b = {int(i) for i in (sign * b).topk(k).indices if sign * b[i] > 0}
        by_hand = len(top_a & top_b) / len(top_a | top_b)
        assert 0.0 <= cmp.jaccard("head", sign) <= 1.0
        assert cmp.jaccard("head", sign) == pytest.approx(by_hand)
    rho = pandas_spearman(a, b)
    assert cmp.spearman("head") == pytest.approx(rho)
    assert -1.0 <= cmp.spearman("neuron") <= 1.0


def test_spearman_averages_ties_like_pandas():
    x = torch.tensor([1.0, 2.0, 2.0, 3.0, 0.0, 2.0])
    y = torch.tensor([0.5, 0.1, 0.9, 0.9, -1.0, 0.2])
    assert spearman(x, y) == pytest.approx(pandas_spearman(x, y))
    assert math.isnan(spearman(torch.ones(4), torch.arange(4.0)))


def test_top_sets_keep_only_units_of_their_sign():
    values = torch.tensor([3.0, -1.0, 2.0, -4.0, 0.0])
    assert top_set(values, 3, +1) == {0, 2}
    assert top_set(values, 1, -1) == {3}


def _longest_common_subsequence(a: list, b: list) -> int:
    """Its length, by the textbook dynamic programme (independent of align_tokens)."""
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def test_a_paraphrase_is_answered_and_reuses_heads(tiny, one_plus_one):
    para = tl.trace(tiny, "Q: what is 1 + 1? A:", " 2")  # phrasing 3 of tiny_arith.PHRASINGS
    assert int(para.margin.rank[0]) == 0
    k = 5
    cmp = tl.compare(one_plus_one, para, k=k)
    # "Reuses heads" means more agreement than heads picked at random. The baseline: the paraphrase's
    # own head DLA with the heads' labels shuffled (1,000 seeded permutations); the paraphrase must beat
    # 95% of the shuffles (a one-sided permutation test at 5%) in rank correlation, and in the overlap
    # of the top k heads pushing toward the answer plus those pushing against it.
    a, b = cmp.a_heads.flatten(), cmp.b_heads.flatten()

    def overlap(x, y) -> float:
        return sum(len(top_set(x, k, s) & top_set(y, k, s)) / len(top_set(x, k, s) | top_set(y, k, s)) for s in (1, -1))

    gen = torch.Generator().manual_seed(0)
    shuffles = [b[torch.randperm(len(b), generator=gen)] for _ in range(1000)]
    null_rho = torch.tensor([spearman(a, s) for s in shuffles])
    null_overlap = torch.tensor([overlap(a, s) for s in shuffles])
    assert cmp.spearman("head") > null_rho.quantile(0.95)
    assert cmp.jaccard("head", +1) + cmp.jaccard("head", -1) == pytest.approx(overlap(a, b))
    assert overlap(a, b) > null_overlap.quantile(0.95)
    # The question's tokens line up, each onto an equal token, in order, as many as the two token lists
    # have in common; the paraphrase's extra 'Q', ':', '?', ' A' have no counterpart.
    plain, para_tokens = one_plus_one.rows[0].str_tokens, para.rows[0].str_tokens
    pairs = [(j, i) for j, i in enumerate(cmp.alignment) if i is not None]
    assert all(para_tokens[j] == plain[i] for j, i in pairs)
    assert [i for _, i in pairs] == sorted({i for _, i in pairs})
    assert len(pairs) == _longest_common_subsequence(plain, para_tokens)
    extra = [j for j, t in enumerate(para_tokens) if t.strip() in ("Q", ":", "?", "A")]
    assert len(extra) >= 4 and all(cmp.alignment[j] is None for j in extra)


def test_base_and_chat_models_of_one_shape_compare(one_plus_one, chat_trace):
    cmp = tl.compare(one_plus_one, chat_trace)
    assert cmp.a_label.startswith("tiny-arith:") and cmp.b_label.startswith("tiny-arith-chat:")
    stats = cmp.stats()
    assert stats[["jaccard_positive", "jaccard_negative"]].apply(lambda c: c.between(0, 1)).all().all()
    frame = cmp.aligned_positions()
    assert len(frame) == len(chat_trace.rows[0].str_tokens)
    assert frame.loc[0, "b_token"] == repr("<|im_start|>") and pd.isna(frame.loc[0, "a_position"])
    assert frame["a_position"].notna().sum() == len([i for i in cmp.alignment if i is not None]) > 0


def test_differently_shaped_models_are_refused(one_plus_one, gpt2):
    other = tl.trace(gpt2, PLAIN, " 2")
    with pytest.raises(ValueError, match="differently shaped models.*4 layers x 4 heads.*2 layers"):
        tl.compare(one_plus_one, other)


def test_different_metrics_and_missing_rows_are_refused(tiny, one_plus_one):
    diff = tl.trace(tiny, PLAIN, " 2", metric="logit_diff" if one_plus_one.dla.metric == "logit" else "logit")
    with pytest.raises(ValueError, match="different metrics"):
        tl.compare(one_plus_one, diff)
    with pytest.raises(ValueError, match="row 1 is out of range"):
        tl.compare(one_plus_one, one_plus_one, row=1)


def test_rows_are_compared_row_by_row(tiny, one_plus_one, one_plus_two):
    both = tl.trace(tiny, [PLAIN, "what is 1 + 2"], [" 2", " 3"])
    cmp = tl.compare(both, one_plus_two, row=0)
    assert cmp.a_label.endswith("'2'")
    torch.testing.assert_close(cmp.a_heads, one_plus_one.dla.heads[:, :, 0], atol=1e-5, rtol=1e-5)


# --- the result object ---------------------------------------------------------------------------------


def test_result_object_shapes_frames_top_and_repr(one_plus_one, one_plus_two):
    cmp = tl.compare(one_plus_one, one_plus_two, k=5)
    n_layers, n_heads = one_plus_one.dla.heads.shape[:2]
    assert cmp.a_heads.shape == (n_layers, n_heads) and cmp.a_heads.device.type == "cpu"
    frame = cmp.to_frame("head")
    assert list(frame.columns) == ["trace", "label", "head", "value"]
    assert len(frame) == 3 * n_layers * n_heads and set(frame["trace"]) == {"a", "b", "b - a"}
    top = cmp.top(3, "head")
    assert list(top.columns) == ["head", "a", "b", "difference"] and len(top) == 3
    assert top["difference"].abs().is_monotonic_decreasing
    assert top["difference"].abs().iloc[0] == pytest.approx(cmp.difference("head").abs().max().item())
    assert (top["b"] - top["a"]).to_numpy() == pytest.approx(top["difference"].to_numpy())
    text = repr(cmp)
    assert text == repr(tl.compare(one_plus_one, one_plus_two, k=5)) and "0x" not in text
    assert text.startswith(f"Comparison({one_plus_one.dla.metric}, k=5;") and f"rho {cmp.spearman('head'):+.3f}" in text
    with pytest.raises(ValueError, match="must both be"):
        tl.Comparison(**{**cmp.__dict__, "b_heads": cmp.b_heads[:1]})
    with pytest.raises(ValueError, match="unit must be one of"):
        cmp.top(3, "layer")


# --- the figure ----------------------------------------------------------------------------------------


def test_head_figure_paints_positive_blue_on_shared_scales_with_titled_axes(one_plus_one, one_plus_two):
    cmp = tl.compare(one_plus_one, one_plus_two)
    fig = cmp.plot("head")
    assert len(fig.data) == 3 and tl.plotting.SIGN_CAPTION in fig.layout.title.text
    rdbu = plotly.colors.get_colorscale("RdBu")
    a, b, diff = fig.data
    assert (a.zmin, a.zmax) == (b.zmin, b.zmax) and a.zmin == -a.zmax and diff.zmin == -diff.zmax
    assert a.zmax == pytest.approx(max(cmp.a_heads.abs().max().item(), cmp.b_heads.abs().max().item()))
    for trace in fig.data:
        assert [c for _, c in trace.colorscale] == [c for _, c in rdbu] and trace.zmid == 0
        assert is_blue(colour(trace.colorscale, trace.zmin, trace.zmax, trace.zmax * 0.8))
        assert not is_blue(colour(trace.colorscale, trace.zmin, trace.zmax, trace.zmin * 0.8))
        assert list(trace.x) == [f"H{h}" for h in range(4)] and list(trace.y) == [f"L{i}" for i in range(4)]
    torch.testing.assert_close(torch.tensor(diff.z), cmp.difference("head"), atol=1e-6, rtol=1e-6)
    for axis in ("xaxis", "xaxis2", "xaxis3"):
        assert fig.layout[axis].title.text == "Head"
    for axis in ("yaxis", "yaxis2", "yaxis3"):
        assert fig.layout[axis].title.text == "Layer"


@pytest.mark.parametrize("unit", ["component", "neuron"])
def test_bar_figures_pair_a_and_b_and_paint_positive_blue(one_plus_one, one_plus_two, unit):
    cmp = tl.compare(one_plus_one, one_plus_two)
    fig = cmp.plot(unit, k=6)
    assert [t.name for t in fig.data] == ["a", "b", "b - a"] and tl.plotting.SIGN_CAPTION in fig.layout.title.text
    for trace in fig.data:
        m = trace.marker
        assert m.cmin == -m.cmax and m.cmid == 0
        assert is_blue(colour(m.colorscale, m.cmin, m.cmax, m.cmax * 0.8))
        assert not is_blue(colour(m.colorscale, m.cmin, m.cmax, m.cmin * 0.8))
    assert fig.data[0].marker.cmax == fig.data[1].marker.cmax
    assert fig.layout.xaxis2.title.text and fig.layout.yaxis.title.text and fig.layout.yaxis2.title.text
    if unit == "component":
        assert list(fig.data[0].x)[:3] == ["embed", "L0 attn", "L0 MLP"]
    else:
        assert len(fig.data[0].x) == 6 and all(x.startswith("L") and "N" in x for x in fig.data[0].x)


def test_a_loaded_reference_compares_like_the_trace_it_came_from(tiny, one_plus_one, one_plus_two, tmp_path):
    one_plus_one.save(tmp_path / "ref", tiny)
    reference = tl.load_reference(tmp_path / "ref")
    assert tl.compare(reference, one_plus_one).difference("head").abs().max().item() == 0.0
    assert repr(tl.compare(reference, one_plus_two)) == repr(tl.compare(one_plus_one, one_plus_two))
