"""Positions: the grid, where the answer becomes readable, and the written/copied/assembled verdict."""

from __future__ import annotations

import json

import pytest

import tracelib as tl
from tracelib.positions import NOT_PREDICTED, VERDICTS


@pytest.fixture(scope="module")
def positions(any_model):
    return tl.trace(any_model, ["what is 1 + 1", "Q: what is 3 + 4? A:"], [" 2", " 7"]).positions


def test_grid_shapes_follow_each_rows_own_length(positions):
    for r, tokens in enumerate(positions.str_tokens):
        assert positions.values[r].shape == (len(tokens), len(positions.component_labels))
        assert positions.lens_logit_diff[r].shape == (len(positions.lens_labels), len(tokens))


def test_readable_means_more_than_half_the_probability(positions, any_model):
    """Readable at a position = p(answer) > 0.5 in the model's own output there (so also its top-1)."""
    for r in range(len(positions.row_labels)):
        readable = positions.readable_at(r)
        assert readable == (positions.final_prob[r] > 0.5).tolist()
        for p, ok in enumerate(readable):
            if ok:
                assert int(positions.final_rank[r][p]) == 0


def test_final_prob_is_the_models_own_probability(any_model):
    """The per-position probability equals a plain forward pass's softmax, position by position."""
    import torch

    resolved = tl.resolve_answer(any_model, "what is 1 + 1", " 2")
    pos = tl.trace(any_model, "what is 1 + 1", " 2").positions
    with torch.no_grad():
        prob = any_model(resolved.prompt_tokens[None])[0].float().softmax(-1)[:, resolved.token].cpu()
    torch.testing.assert_close(pos.final_prob[0].float(), prob, rtol=1e-4, atol=1e-6)


def test_tiny_is_readable_only_at_the_final_position(tiny):
    """The bundled model guesses a digit before each operand (p well under 0.5): not readable there."""
    pos = tl.trace(tiny, "what is 1 + 1", " 2").positions
    readable = pos.readable_at()
    assert readable == [False] * (len(readable) - 1) + [True]
    assert pos.first_readable_position() == len(readable) - 1


def test_verdict_evidence_is_consistent(positions):
    for r in range(len(positions.row_labels)):
        verdict, ev = positions.verdict(r)
        rank = int(positions.final_rank[r][-1])
        assert verdict in VERDICTS if rank == 0 else verdict == NOT_PREDICTED.format(rank=rank)
        assert ev["first readable position"] is None or type(ev["first readable position"]) is int
        assert ev["final MLP share"] + ev["attention share"] <= 1 + 1e-6
        assert 0 <= ev["attention-from-operands share"] <= ev["attention share"] + 1e-9
        if verdict == VERDICTS[0]:
            assert ev["computed-in-place share"] >= 0.5


def test_tiny_computes_one_plus_one_in_place(tiny):
    """The bundled model's MLPs at the final position write most of the answer."""
    verdict, evidence = tl.trace(tiny, "what is 1 + 1", " 2").positions.verdict()
    assert verdict == "written at the final position"
    assert evidence["final MLP share"] > 0.5


def test_plot_ticks_positions_with_tokens(tiny):
    pos = tl.trace(tiny, "what is 1 + 1", " 2").positions
    fig = pos.plot()
    assert fig.data[0].zmid == 0 and list(fig.data[0].x)[3] == "'1'@3"
    top = pos.top(3)
    assert list(top["value"].abs()) == sorted(top["value"].abs(), reverse=True)


def test_summary_and_dict_gain_heads_and_positions(tiny):
    tr = tl.trace(tiny, "what is 1 + 1", " 2")
    assert "heads read from" in tr.summary() and "positions" in tr.summary()
    row = tr.to_dict()["rows"][0]
    assert row["positions"]["verdict"] in VERDICTS and row["heads"][0]["reads_from"]


def test_changing_an_operand_moves_the_heads_reading(tiny):
    """Sanity check from the seed: 1 + 1 -> 1 + 2 changes the top operand-reading head's
    contribution most at the changed operand."""
    a = tl.trace(tiny, "what is 1 + 1", " 2")
    b = tl.trace(tiny, "what is 1 + 2", " 3")
    operand = a.heads.operand_positions[0][-1]
    changed = (a.heads.sources[..., 0] - b.heads.sources[..., 0]).abs()  # [layer, head, src]
    top_layer, top_head = next(
        (int(h[1:].split("H")[0]), int(h.split("H")[1]))
        for h, w in zip(a.heads.top(8)["head"], a.heads.top(8)["reads_from"])
        if w == "operand"
    )
    assert int(changed[top_layer, top_head].argmax()) == operand


@pytest.mark.parametrize("name", ["gpt2", "qwen"])
def test_verdict_refuses_to_explain_what_the_model_does_not_predict(request, name):
    """A random-init model ranks the answer far down: no written/copied/assembled story is told."""
    tr = tl.trace(request.getfixturevalue(name), "what is 1 + 1", " 2")
    rank = int(tr.margin.rank[0])
    assert rank > 0 and int(tr.positions.final_rank[0][-1]) == rank
    verdict, evidence = tr.positions.verdict()
    assert verdict == f"not predicted (rank {rank})"
    assert set(evidence) == {
        "final MLP share",
        "attention share",
        "attention-from-operands share",
        "computed-in-place share",
        "first readable position",
    }
    assert evidence["first readable position"] is None or type(evidence["first readable position"]) is int
    # The summary, the JSON and the report say the same thing.
    assert f"positions   {verdict}" in tr.summary()
    data = json.loads(json.dumps(tr.to_dict(), allow_nan=False))
    assert data["rows"][0]["positions"]["verdict"] == verdict
    assert data["rows"][0]["positions"]["evidence"]["first readable position"] == evidence["first readable position"]


def test_tiny_gets_a_real_verdict_with_an_integer_first_position(tiny):
    tr = tl.trace(tiny, "what is 1 + 1", " 2")
    assert int(tr.margin.rank[0]) == 0
    verdict, evidence = tr.positions.verdict()
    assert verdict in VERDICTS
    first = evidence["first readable position"]
    assert type(first) is int and 0 <= first < len(tr.rows[0].str_tokens)
    assert (
        json.loads(tr.to_json(allow_nan=False))["rows"][0]["positions"]["evidence"]["first readable position"] == first
    )


def test_positions_table_quotes_tokens(tiny):
    frame = tl.trace(tiny, "what is 1 + 1", " 2").positions.to_frame()
    assert "' +'@4" in set(frame["token"])
