"""Figures a learner reads correctly: one colour convention, integer-labelled ticks, titled axes.

Checked on the figure objects, as invariants: the bundled model is retrained from time to time, so
no test here depends on its numbers.
"""

from __future__ import annotations

import math
import re

import plotly.colors
import pytest
import torch

import tracelib as tl
from tracelib import plotting

PROMPT, ANSWER = "what is 1 + 1", " 2"


def rgb(colour: str) -> tuple[float, float, float]:
    r, g, b = (float(x) for x in re.findall(r"[\d.]+", colour)[:3])
    return r, g, b


def colour_of(fig, value: float) -> tuple[float, float, float]:
    """The colour plotly paints `value` with in the figure's first trace, resolved from its colourscale."""
    data = fig.data[0]
    if data.type == "heatmap":
        scale, low, high = data.colorscale, data.zmin, data.zmax
    else:
        scale, low, high = data.marker.colorscale, data.marker.cmin, data.marker.cmax
    assert low == -high, "a signed scale must be symmetric about 0"
    # The figure uses RdBu itself, not a reversed or custom scale.
    rdbu = plotly.colors.get_colorscale("RdBu")
    assert [c for _, c in scale] == [c for _, c in rdbu]
    assert [p for p, _ in scale] == pytest.approx([p for p, _ in rdbu])
    return rgb(plotly.colors.sample_colorscale([list(c) for c in scale], [(value - low) / (high - low)])[0])


def is_blue(colour) -> bool:
    r, _, b = colour
    return b > r


def is_red(colour) -> bool:
    r, _, b = colour
    return r > b


@pytest.fixture(scope="module")
def tr(tiny):
    return tl.trace(tiny, PROMPT, ANSWER)


@pytest.fixture(scope="module")
def figures(tr):
    """Every figure a trace produces, by name."""
    (layer, head), _ = tr.heads.strongest()
    return {
        "margin": tr.margin.plot(),
        "lens logit_diff": tr.lens.plot(0, "logit_diff"),
        "lens rank": tr.lens.plot(0, "rank"),
        "dla component": tr.dla.plot("component"),
        "dla layer": tr.dla.plot("layer"),
        "dla head": tr.dla.plot("head"),
        "heads": tr.heads.plot(),
        "neuron strip": tr.dla.plot("neuron"),
        "head source bars": tr.heads.source(layer, head).plot(),
        "positions": tr.positions.plot(),
    }


# --- one colour convention: blue toward the answer, red against it ---------------------------------


def test_signed_bars_paint_positive_blue_and_negative_red():
    fig = plotting.signed_bars(["a", "b", "c"], torch.tensor([2.0, -1.0, 0.5]), title="t")
    assert fig.data[0].marker.cmid == 0
    assert is_blue(colour_of(fig, 2.0)) and is_blue(colour_of(fig, 0.5))
    assert is_red(colour_of(fig, -1.0))
    assert plotting.SIGN_CAPTION in fig.layout.title.text


def test_head_heatmap_paints_positive_blue_and_negative_red():
    fig = plotting.head_heatmap(torch.tensor([[1.5, -0.5], [0.0, 0.2]]), title="heads")
    assert fig.data[0].zmid == 0
    assert is_blue(colour_of(fig, 1.5)) and is_red(colour_of(fig, -0.5))
    assert plotting.SIGN_CAPTION in fig.layout.title.text


def test_every_signed_trace_figure_uses_the_same_orientation(figures):
    for name in ("dla component", "dla layer", "dla head", "heads", "neuron strip", "head source bars", "positions"):
        fig = figures[name]
        values = fig.data[0].z if fig.data[0].type == "heatmap" else fig.data[0].y
        flat = sum((list(r) for r in values), []) if fig.data[0].type == "heatmap" else list(values)
        top, bottom = max(flat), min(flat)
        # Values near zero are near-white by design; check the ones strong enough to carry a hue.
        strong = 0.25 * max(abs(top), abs(bottom))
        if top > strong:
            assert is_blue(colour_of(fig, top)), name
        if bottom < -strong:
            assert is_red(colour_of(fig, bottom)), name
        assert plotting.SIGN_CAPTION in fig.layout.title.text, name


def test_margin_bars_paint_the_answer_blue_and_rivals_red(tr, figures):
    bar = figures["margin"].data[0]
    answer = repr(tr.margin.answers[0])
    colours = dict(zip(bar.x, bar.marker.color))
    assert is_blue(rgb(colours[answer]))
    assert all(is_red(rgb(c)) for tok, c in colours.items() if tok != answer)


def test_margin_bars_add_the_answer_when_it_is_not_in_the_top_k(gpt2):
    m = tl.trace(gpt2, PROMPT, ANSWER).margin
    assert int(m.rank[0]) >= len(m.top_strs[0])  # random init: the answer is far down
    bar = m.plot().data[0]
    assert bar.x[-1] == f"{m.answers[0]!r} (rank {int(m.rank[0])})"
    assert is_blue(rgb(bar.marker.color[-1]))
    # Rivals that outrank the answer are the darker red.
    assert all(is_red(rgb(c)) for c in bar.marker.color[:-1])


def test_lens_lines_do_not_use_the_sign_colours(figures):
    for name in ("lens logit_diff", "lens rank"):
        for line in figures[name].data:
            r, g, b = rgb(line.line.color)
            assert r == g == b, f"{name}: a lens line is {line.line.color}, which reads as a sign"


# --- ticks and axis titles -------------------------------------------------------------------------

TOKEN_TICK = re.compile(r"^'.*'@\d+$|^\".*\"@\d+$")
TICKS = {
    "dla component": (re.compile(r"^(embed|pos_embed|L\d+ (attn|MLP))$"), None),
    "dla layer": (re.compile(r"^(embed|L\d+)$"), None),
    "dla head": (re.compile(r"^H\d+$"), re.compile(r"^L\d+$")),
    "heads": (re.compile(r"^H\d+$"), re.compile(r"^L\d+$")),
    "neuron strip": (re.compile(r"^L\d+N\d+$"), None),
    "head source bars": (TOKEN_TICK, None),
    "positions": (TOKEN_TICK, re.compile(r"^(embed|pos_embed|L\d+ (attn|MLP))$")),
    "lens logit_diff": (re.compile(r"^(L\d+ (pre|mid)|final)$"), None),
    "lens rank": (re.compile(r"^(L\d+ (pre|mid)|final)$"), None),
    "margin": (re.compile(r"^'.*'"), None),
}


def test_every_axis_has_a_title(figures):
    for name, fig in figures.items():
        assert fig.layout.xaxis.title.text, f"{name}: no x-axis title"
        assert fig.layout.yaxis.title.text, f"{name}: no y-axis title"
        assert fig.layout.title.text, f"{name}: no title"


def test_category_ticks_are_labelled_strings(figures):
    for name, (x_pattern, y_pattern) in TICKS.items():
        fig = figures[name]
        assert fig.layout.xaxis.type == "category", name
        for tick in fig.data[0].x:
            assert isinstance(tick, str) and x_pattern.match(tick), f"{name}: x tick {tick!r}"
        if y_pattern is not None:
            assert fig.layout.yaxis.type == "category", name
            for tick in fig.data[0].y:
                assert isinstance(tick, str) and y_pattern.match(tick), f"{name}: y tick {tick!r}"


def test_heatmaps_tick_every_layer_head_and_position(tr, figures):
    n_layers, n_heads = tr.dla.heads.shape[:2]
    heat = figures["dla head"].data[0]
    assert list(heat.x) == [f"H{h}" for h in range(n_heads)]
    assert list(heat.y) == [f"L{layer}" for layer in range(n_layers)]
    assert figures["dla head"].layout.yaxis.autorange == "reversed"  # L0 at the top
    assert list(figures["positions"].data[0].x) == plotting.token_labels(tr.rows[0].str_tokens)
    assert list(figures["dla layer"].data[0].x) == ["embed"] + [f"L{layer}" for layer in range(n_layers)]
    assert figures["dla layer"].layout.xaxis.title.text == "Layer"


def test_rank_axis_is_ticked_at_powers_of_ten(figures, gpt2):
    for fig in (figures["lens rank"], tl.trace(gpt2, PROMPT, ANSWER).lens.plot(0, "rank")):
        axis = fig.layout.yaxis
        assert axis.type == "log" and axis.tickmode == "array"
        vals = list(axis.tickvals)
        assert vals[0] == 1 and all(b == 10 * a for a, b in zip(vals, vals[1:]))
        assert list(axis.ticktext) == [f"{v:,}" for v in vals]
        highest = max(max(d.y) for d in fig.data)
        assert vals[-1] >= highest and (len(vals) == 1 or vals[-2] < highest)
        assert all(math.log10(v).is_integer() for v in vals)


# --- tables quote tokens with repr -----------------------------------------------------------------


def test_tables_quote_tokens_so_spaces_show(gpt2):
    tr = tl.trace(gpt2, PROMPT, ANSWER, distractors=[" 1", " 3"])
    frame = tr.margin.to_frame()
    assert {"' 1'", "' 3'"} <= set(frame.loc[frame["role"] == "distractor", "token"])
    assert frame.loc[frame["role"] == "answer", "token"].tolist() == [repr(tr.margin.answers[0])]
    assert all(t.startswith(("'", '"')) for t in tr.margin.top(5)["token"])
    assert plotting.token_labels([" 1", "1"]) == ["' 1'@0", "'1'@1"]
    (layer, head), _ = tr.heads.strongest()
    assert set(tr.heads.source(layer, head).to_frame()["token"]) == set(plotting.token_labels(tr.rows[0].str_tokens))
    assert set(tr.positions.to_frame()["token"]) == set(plotting.token_labels(tr.rows[0].str_tokens))


# --- a learner's pass (issue 17): damage labels, unpatched cells, one caption per title -------------


@pytest.fixture(scope="module")
def injected(tiny):
    """Junk injected after the last operand: several tokens with no counterpart in the clean prompt."""
    return tl.inject(tiny, PROMPT, "junk", "after", n=3, answer=ANSWER)


def test_damage_figure_labels_its_features_across_the_y_axis(tiny, tr, injected):
    report = tl.damage_report(tr, tl.trace(tiny, injected.prompt, ANSWER))
    fig = report.plot()
    markers = [t for t in fig.data if t.legendgroup == "status"]
    assert markers and all(t.xaxis == "x2" and t.yaxis == "y2" for t in markers)
    # One row per feature, top to bottom in the report's order, each label one line: name and reference DLA.
    rows = list(fig.layout.yaxis2.categoryarray)
    assert fig.layout.yaxis2.type == "category" and fig.layout.yaxis2.autorange == "reversed"
    assert [label.split(" (")[0] for label in rows] == [
        plotting.component_label(f) if kind == "component" else f for f, kind in zip(report.features, report.kinds)
    ]
    assert all("<br>" not in label and re.search(r"\([+-](\d+\.\d{3}|\d\.\de-\d+)\)$", label) for label in rows)
    assert sorted(label for t in markers for label in t.y) == sorted(rows)
    # The ratio runs along x, with a tick at every threshold and a vertical line through it.
    assert all(isinstance(v, float) for t in markers for v in t.x)
    assert {0.25, 0.75, 1.0, 1.25} <= set(fig.layout.xaxis2.tickvals)
    dashed = {s.x0 for s in fig.layout.shapes if s.type == "line" and s.line.dash == "dash"}
    assert dashed == {0.25, 0.75, 1.25}
    assert fig.layout.xaxis2.tickangle is None and fig.layout.yaxis2.tickangle is None


def test_patching_figure_tells_unpatched_cells_from_zero(tiny, injected):
    import warnings

    with warnings.catch_warnings():  # weak or not, the cells with no counterpart are the same
        warnings.simplefilter("ignore", tl.WeakCorruptionWarning)
        result = tl.patch(tiny, PROMPT, injected.prompt, ANSWER, what="resid_pre", alignment=injected.alignment)
    assert result.no_counterpart
    fig = result.plot()
    heat, grey, crosses = fig.data
    assert heat.type == "heatmap" and grey.type == "heatmap" and crosses.type == "scatter"
    nan = [[v is None for v in row] for row in heat.z]
    assert [[v is not None for v in row] for row in grey.z] == nan  # the grey layer covers exactly them
    cells = {(y, x) for y, row in zip(heat.y, nan) for x, missing in zip(heat.x, row) if missing}
    assert set(zip(crosses.y, crosses.x)) == cells  # and each is crossed
    assert len(cells) == len(result.no_counterpart) * tiny.cfg.n_layers
    # The grey is far from RdBu's near-white 0, so "not patched" never reads as "no recovery".
    zero = colour_of(fig, 0.0)
    assert all(abs(a - b) > 40 for a, b in zip(rgb(grey.colorscale[0][1]), zero))
    assert grey.showscale is False and grey.hoverinfo == "skip"
    # Named once, in the legend and in the subtitle.
    assert crosses.name == plotting.NOT_PATCHED_NAME and fig.layout.showlegend
    assert "Grey ×: no counterpart" in fig.layout.title.text and "not patched" in fig.layout.title.text
    # Noising runs the clean prompt: every cell patched, no grey layer, no legend.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tl.WeakCorruptionWarning)
        noised = tl.patch(
            tiny, PROMPT, injected.prompt, ANSWER, what="resid_pre", direction="noise", alignment=injected.alignment
        )
    assert len(noised.plot().data) == 1 and not noised.plot().layout.showlegend


def test_the_colour_sentence_joins_a_subtitle_instead_of_overprinting_it(figures):
    assert plotting._signed_title("T<br><sub>s</sub>") == f"T<br><sub>s. {plotting.SIGN_CAPTION}</sub>"
    assert plotting._signed_title("T") == f"T<br><sup>{plotting.SIGN_CAPTION}</sup>"
    for name in ("dla component", "dla head", "positions"):  # each has a metric subtitle
        title = figures[name].layout.title.text
        assert title.count("<br>") == 1 and title.count(plotting.SIGN_CAPTION) == 1, name
