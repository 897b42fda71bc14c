"""Information-flow routes: exact sums, GQA head terms, the DLA of nodes, and planted routes found exactly."""

from __future__ import annotations

import copy
import dataclasses
import math
import sys

import numpy as np
import pytest
import torch

import tracelib as tl
from tracelib.formats import token_labels
from tracelib.projections import answer_directions, layer_weight
from tracelib.routes import EDGE_COLUMNS, NODE_COLUMNS, Routes, head_writes

PROMPT, ANSWER = "what is 2 + 3", " 5"
# The planted heads: scores of 40 * 40 / sqrt(d_head) leave every other source at exp(-140) = 0.
ALPHA, SINK = 40.0, 20.0
# The query and key dimensions the planted heads use: RoPE's two slowest pairs (14/30, 15/31), which
# turn by under 3e-4 rad per position, so a planted score barely depends on the distance.
MATCH, SINK_DIM = 14, 15


def _hf(model, layer: int, name: str) -> torch.Tensor:
    """A parameter of the bridge's underlying HF layer (`q_proj.weight`, `mlp.down_proj.weight`, ...)."""
    part, param = name.rsplit(".", 1)
    prefix = f"model.layers.{layer}._original_component."
    if part.startswith("mlp."):
        path = prefix + "mlp._original_component." + part[4:] + "._original_component." + param
    else:
        path = prefix + "self_attn._original_component." + part + "._original_component." + param
    return dict(model.named_parameters())[path]


def _silence(model) -> None:
    """Every MLP and every head writes nothing (MLP out and o_proj zero): only what is planted moves."""
    with torch.no_grad():
        for layer in range(model.cfg.n_layers):
            _hf(model, layer, "mlp.down_proj.weight").zero_()
            _hf(model, layer, "o_proj.weight").zero_()


def _attn_inputs(model, tokens, layer: int) -> torch.Tensor:
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n == f"blocks.{layer}.ln1.hook_out")
    return cache[f"blocks.{layer}.ln1.hook_out"][0]


def _plant(model, tokens, layer: int, head: int, dst: int, src: int, write: torch.Tensor | None = None) -> None:
    """Make `head` at `dst` read exactly `src` and write a vector as large as `dst`'s residual: along
    `write` if given (the answer's direction, for a head that copies the answer), else a random one.

    With the dual basis `w_i` of this prompt's attention inputs (`w_i . x_k = delta_ik`): the query is
    `ALPHA * w_dst` plus a constant sink query, keys mark `src` and the sink (position 0), and the value
    is `w_src . x`, so the head reads `src` at `dst` and, everywhere else, the sink, whose value is 0.
    (A position whose input equals `dst`'s queries alike; the tests put `src` after every such one.)
    """
    cfg = model.cfg
    d_head, kv = cfg.d_head, head // (cfg.n_heads // cfg.n_key_value_heads)
    x = _attn_inputs(model, tokens, layer).double()
    dual = torch.linalg.pinv(x)  # [d_model, pos]
    # Equal inputs (a repeated token before any head writes) share a dual vector: scale each to 1 there.
    dual = (dual / torch.diagonal(x @ dual)).float()
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n == f"blocks.{layer}.hook_resid_pre")
        size = cache[f"blocks.{layer}.hook_resid_pre"][0, dst].norm()
        q, bq = _hf(model, layer, "q_proj.weight"), _hf(model, layer, "q_proj.bias")
        k, bk = _hf(model, layer, "k_proj.weight"), _hf(model, layer, "k_proj.bias")
        v, bv = _hf(model, layer, "v_proj.weight"), _hf(model, layer, "v_proj.bias")
        o = _hf(model, layer, "o_proj.weight")
        qs, ks = slice(head * d_head, (head + 1) * d_head), slice(kv * d_head, (kv + 1) * d_head)
        for weight, bias, s in ((q, bq, qs), (k, bk, ks), (v, bv, ks)):
            weight[s] = 0
            bias[s] = 0
        q[head * d_head + MATCH] = ALPHA * dual[:, dst]
        bq[head * d_head + SINK_DIM] = SINK
        k[kv * d_head + MATCH] = ALPHA * dual[:, src]
        k[kv * d_head + SINK_DIM] = ALPHA * dual[:, 0]
        v[kv * d_head] = dual[:, src]
        if write is None:
            write = torch.randn(cfg.d_model, generator=torch.Generator().manual_seed(layer * 10 + head))
        o[:, qs] = 0
        o[:, head * d_head] = write / write.norm() * size


@pytest.fixture(scope="module")
def planted(tiny):
    """(one-hop model, two-hop model, positions): tiny-arith silenced, with planted heads only.

    One hop: L1H3 at the final position reads the operand '3'. Two hops: L0H1 moves the operand
    '2' to the '3', and L1H3 at the final position reads it from there. (The final token ' ' also
    stands at 2 and 5, which query alike: every planted source lies after them.)
    """
    tokens = tl.resolve_answer(tiny, PROMPT, ANSWER).steps[0].tokens[None]
    str_tokens = tiny.to_str_tokens(tokens[0])
    final = tokens.shape[1] - 1
    first, second = str_tokens.index("2"), str_tokens.index("3")
    # The final head writes the answer's direction (its unembedding less its distractors' mean): it
    # copies the answer, ready-made. The first hop of the chain moves the operand, a random vector.
    traced = tl.trace(tiny, PROMPT, ANSWER)
    answer = answer_directions(tiny, [traced.rows[0].target], [traced.distractors[0]], "logit_diff")[0].detach()
    answer = answer - answer.mean()  # as the final LayerNorm reads it
    one = copy.deepcopy(tiny)
    _silence(one)
    _plant(one, tokens, 1, 3, final, second, write=answer)
    two = copy.deepcopy(tiny)
    _silence(two)
    _plant(two, tokens, 0, 1, second, first)
    _plant(two, tokens, 1, 3, final, second, write=answer)
    return one, two, dict(final=final, first=first, middle=second, second=second)


def _route_set(r: Routes) -> set[tuple]:
    return {
        (e.src_layer, e.src_pos, e.src_kind, e.dst_layer, e.dst_pos, e.dst_kind, e.via, e.head)
        for e in r.route.itertuples(index=False)
    }


def _column(pos: int, n_layers: int) -> set[tuple]:
    """The residual edges that carry position `pos` from the embedding to its final node."""
    out = set()
    for layer in range(n_layers):
        out.add((layer, pos, "pre", layer, pos, "mid", "residual", None))
        kind = "final" if layer == n_layers - 1 else "pre"
        out.add((layer, pos, "mid", layer + 1, pos, kind, "residual", None))
    return out


def _assert_only_planted(r: Routes, planted_heads: set[tuple]) -> None:
    """Every head and MLP edge other than the planted ones has no weight at all."""
    e = r.edges
    others = e[(e["via"] != "residual")]
    others = others[
        [(row.dst_layer, row.head, row.dst_pos, row.src_pos) not in planted_heads for row in others.itertuples()]
    ]
    assert others["importance"].max() < 1e-4, others.sort_values("importance").tail()


def test_one_hop_copy_head_is_the_route(planted):
    one, _, at = planted
    r = tl.routes(one, PROMPT, ANSWER)
    final, src = at["final"], at["second"]
    head = (1, src, "pre", 1, final, "mid", "head", 3)
    expected = _column(final, 4) | {head, (0, src, "pre", 0, src, "mid", "residual", None)}
    expected |= {(0, src, "mid", 1, src, "pre", "residual", None)}
    assert _route_set(r) == expected
    _assert_only_planted(r, {(1, 3, final, src)})
    imp = r.top(20).set_index(["dst_layer", "dst_pos", "dst_kind", "via"])["importance"]
    assert 0.3 < imp[(1, final, "mid", "head")] < 0.7  # the write is as large as the residual it joins
    assert r.verdict()[0] == "copied"
    assert "'3'@6" in r.verdict()[1] and "L1H3" in r.verdict()[1]
    assert [(h["src_pos"], h["dst_pos"], h["heads"]) for h in r.chain()] == [(src, final, "L1H3")]
    assert "hop" not in r.verdict()[1]  # one hop: nothing before it to name


def test_two_hop_chain_is_the_route(planted):
    _, two, at = planted
    r = tl.routes(two, PROMPT, ANSWER)
    final, first, middle = at["final"], at["first"], at["middle"]
    expected = _column(final, 4) | {
        (1, middle, "pre", 1, final, "mid", "head", 3),
        (0, middle, "mid", 1, middle, "pre", "residual", None),
        (0, middle, "pre", 0, middle, "mid", "residual", None),
        (0, first, "pre", 0, middle, "mid", "head", 1),
    }
    assert _route_set(r) == expected
    _assert_only_planted(r, {(1, 3, final, middle), (0, 1, middle, first)})
    route = r.route
    hop_a = route[(route["via"] == "head") & (route["dst_layer"] == 0)]["importance"].item()
    hop_b = route[(route["via"] == "head") & (route["dst_layer"] == 1)]["importance"].item()
    assert 0.3 < hop_a < 0.7 and 0.3 < hop_b < 0.7
    assert r.verdict()[0] == "copied" and "'3'@6" in r.verdict()[1]
    # The verdict follows the chain back one hop: the '3' read the operand '2' from its position first.
    labels = token_labels(r.str_tokens)
    assert [(h["src_pos"], h["dst_pos"], h["heads"]) for h in r.chain()] == [
        (middle, final, "L1H3"),
        (first, middle, "L0H1"),
    ]
    assert f"before that, {labels[middle]} read most from {labels[first]} (L0H1)" in r.verdict()[1]
    assert "2-hop chain" in r.verdict()[1]
    # Above both edges into L1's mid (the head and the residual, near 0.5 each) the route stops there.
    high = tl.routes(two, PROMPT, ANSWER, threshold=0.8)
    assert _route_set(high) == {e for e in _column(final, 4) if e[0] + (e[2] == "mid") / 2 >= 1.5}
    assert high.verdict()[0] == "computed in place"


def test_importances_into_each_node_sum_to_one(tiny):
    r = tl.routes(tiny, PROMPT, ANSWER)
    sums = r.edges.groupby(["dst_layer", "dst_pos", "dst_kind"])["importance"].sum()
    assert len(sums) == 4 * 2 * 8
    torch.testing.assert_close(
        torch.tensor(sums.to_numpy()), torch.ones(len(sums), dtype=torch.float64), atol=1e-5, rtol=0
    )
    assert (r.edges["importance"] >= 0).all()
    assert r.reconstruction_error < 1e-5


def test_head_terms_reconstruct_the_residual_and_match_per_query_head(tiny):
    """GQA (4 query heads on 2 KV heads): each term A^h[i, j] v^{kv(h)}[j] W_O^h, computed independently."""
    cfg = tiny.cfg
    assert cfg.n_key_value_heads < cfg.n_heads
    tokens = tl.resolve_answer(tiny, PROMPT, ANSWER).steps[0].tokens[None]
    with torch.no_grad():
        _, cache = tiny.run_with_cache(tokens)
        for layer in range(cfg.n_layers):
            attn = tiny.blocks[layer].attn
            x = cache[f"blocks.{layer}.ln1.hook_out"][0]
            pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0]
            ours = head_writes(tiny, cache, layer, torch.float32)  # [head, src, d_model]
            terms = []
            for h in range(cfg.n_heads):
                kv = h // (cfg.n_heads // cfg.n_key_value_heads)
                value = x @ attn.W_V[kv] + attn.b_V[kv]
                expected = value @ attn.W_O[h]
                torch.testing.assert_close(ours[h], expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
                terms.append(pattern[h][..., None] * expected[None])  # [dst, src, d_model]
                z = cache[f"blocks.{layer}.attn.hook_z"][0, :, h]
                per_head = z @ attn.W_O[h]
                torch.testing.assert_close(
                    terms[-1].sum(1), per_head, rtol=1e-5, atol=1e-5 * per_head.abs().max().item()
                )
            mid = cache[f"blocks.{layer}.hook_resid_mid"][0]
            rebuilt = cache[f"blocks.{layer}.hook_resid_pre"][0] + torch.stack(terms).sum((0, 2))
            if attn.b_O is not None:
                rebuilt = rebuilt + attn.b_O
            torch.testing.assert_close(rebuilt, mid, rtol=0, atol=1e-5 * mid.abs().max().item())


def test_node_dla_is_the_dla_lens(tiny):
    """The nodes of the last position are the cached-scale DLA lens's entries (b_U is zero here)."""
    assert tiny.b_U.abs().max() == 0
    r = tl.routes(tiny, PROMPT, ANSWER)
    lens = tl.trace(tiny, PROMPT, ANSWER).lens.dla.logit_diff[:, 0]
    nodes = r.nodes[r.nodes["pos"] == len(r.str_tokens) - 1]
    torch.testing.assert_close(torch.tensor(nodes["dla"].to_numpy(), dtype=torch.float32), lens, rtol=1e-5, atol=1e-5)
    assert r.final_dla == pytest.approx(lens[-1].item(), rel=1e-5)


def test_result_object(tiny):
    r = tl.routes(tiny, PROMPT, ANSWER, position=-1)
    assert list(r.edges.columns) == EDGE_COLUMNS and list(r.nodes.columns) == NODE_COLUMNS
    assert set(r.to_frame().columns) >= {"src_token", "dst_token", "importance", "on_route"}
    top = r.top(3)
    assert len(top) == 3 and top["on_route"].all() and top["importance"].is_monotonic_decreasing
    assert repr(r) == repr(tl.routes(tiny, PROMPT, ANSWER)) and repr(r).startswith("Routes(")
    assert r.verdict()[0] in ("copied", "computed in place", "assembled")
    fig = r.plot()
    assert fig.layout.xaxis.ticktext[-1] == "' '@7" and "Blue pushes toward" in fig.layout.title.text
    earlier = tl.routes(tiny, PROMPT, ANSWER, position=3)
    assert earlier.position == 3 and earlier.nodes.query("kind == 'final' and on_route")["pos"].tolist() == [3]
    assert (earlier.route["dst_pos"] <= 3).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(position=8), "outside the prompt's 8 tokens"),
        (dict(position=-9), "outside the prompt's 8 tokens"),
        (dict(threshold=0), r"threshold must be in \(0, 1\]"),
        (dict(threshold=1.5), r"threshold must be in \(0, 1\]"),
        (dict(threshold=float("nan")), r"threshold must be in \(0, 1\]"),
    ],
)
def test_bad_arguments(tiny, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tl.routes(tiny, PROMPT, ANSWER, **kwargs)


def test_bad_prompt_and_answer(tiny):
    with pytest.raises(ValueError, match="one prompt"):
        tl.routes(tiny, [PROMPT, PROMPT], ANSWER)
    with pytest.raises(ValueError, match="explains one token"):
        tl.routes(tiny, PROMPT, " 55")


# Routes against exact resid_pre patching on the same clean prompt (issue 21).
CORRUPTED = "what is 4 + 3"


@pytest.fixture(scope="module")
def sweep(tiny):
    result = tl.patch(tiny, PROMPT, CORRUPTED, ANSWER, what="resid_pre")
    assert not result.weak_effect, "the corruption must change the answer for recovery to mean anything"
    return result


def _flow_by_hand(r: Routes) -> dict[tuple, float]:
    """Node weights by a plain walk: each on-route edge, highest destination first, passes weight x importance down."""
    height = {"pre": 0, "mid": 1, "final": 0}
    weight = {(r.n_layers, r.position, "final"): 1.0}
    route = r.route.assign(level=[2 * ly + height[k] for ly, k in zip(r.route["dst_layer"], r.route["dst_kind"])])
    for e in route.sort_values("level", ascending=False, kind="stable").itertuples():
        dst, src = (e.dst_layer, e.dst_pos, e.dst_kind), (e.src_layer, e.src_pos, e.src_kind)
        weight[src] = weight.get(src, 0.0) + weight.get(dst, 0.0) * e.importance
    return weight


def test_node_flow_is_the_final_weight_traced_back(tiny):
    r = tl.routes(tiny, PROMPT, ANSWER)
    flow = r.node_flow()
    by_hand = _flow_by_hand(r)
    for node in flow.itertuples():
        expected = by_hand.get((node.layer, node.pos, node.kind), 0.0)
        assert node.weight == pytest.approx(expected, abs=1e-9)
        assert (node.weight > 0) <= node.on_route  # weight only on the route
    for (layer, kind), level in flow.groupby(["layer", "kind"]):
        assert level["weight"].sum() <= 1 + 1e-5, (layer, kind)


def test_agreement_numbers_recomputed_from_the_frames(tiny, sweep):
    r = tl.routes(tiny, PROMPT, ANSWER)
    a = r.agreement(sweep, min_recovery=0.2)
    cells = a.to_frame()
    # Every resid_pre cell with a clean counterpart, mapped to the route's pre node at the clean position.
    assert len(cells) == a.n_cells == tiny.cfg.n_layers * sum(j is not None for j in sweep.alignment)
    flow = r.node_flow().query("kind == 'pre'").set_index(["layer", "pos"])
    for c in cells.itertuples():
        assert sweep.alignment[c.corrupted_pos] == c.pos
        assert c.recovery == pytest.approx(sweep.values[c.layer, c.corrupted_pos].item())
        assert c.weight == flow.loc[(c.layer, c.pos), "weight"] and c.on_route == flow.loc[(c.layer, c.pos), "on_route"]
    matters = cells["recovery"].abs() >= 0.2
    both = matters & cells["on_route"]
    assert a.recall == pytest.approx(both.sum() / matters.sum())
    assert a.precision == pytest.approx(both.sum() / cells["on_route"].sum())
    # Spearman by hand: Pearson's on average ranks (what pandas' method="spearman" computes).
    rho = cells["weight"].rank().corr(cells["recovery"].abs().rank())
    assert a.spearman == pytest.approx(rho, abs=1e-9)
    assert (cells["disagrees"] == (cells["on_route"] != matters)).all()
    assert (a.n_recovering, a.n_on_route, a.n_both) == (matters.sum(), cells["on_route"].sum(), both.sum())
    assert 0 < a.n_recovering and 0 < a.n_on_route and math.isfinite(a.spearman)
    assert repr(a) == repr(r.agreement(sweep)) and repr(a).startswith("RouteAgreement(")
    assert "Spearman" in repr(a) and "recall" in repr(a) and "precision" in repr(a)
    fig = a.plot()
    assert len(fig.data) == 2 and fig.data[1].zmid == 0 and fig.data[1].colorscale[0][1] != fig.data[0].colorscale[0][1]
    weight, recovery = a.grids()
    assert weight.shape == (tiny.cfg.n_layers, len(r.str_tokens)) and np.nanmax(weight) <= 1
    assert a.identity == r.identity == sweep.identity
    assert a.top(3)["disagrees"].all()
    stricter = r.agreement(sweep, min_recovery=0.9)
    assert stricter.n_recovering <= a.n_recovering


def test_agreement_refusals(tiny, other, sweep):
    r = tl.routes(tiny, PROMPT, ANSWER)
    with pytest.raises(ValueError, match="this sweep patched 'attn_out'"):
        r.agreement(tl.patch(tiny, PROMPT, CORRUPTED, ANSWER, what="attn_out"))
    with pytest.raises(tl.ModelMismatchError, match="The routes comes from"):
        tl.routes(other, PROMPT, ANSWER).agreement(sweep)
    with pytest.raises(ValueError, match="clean prompt is not the route's"):
        tl.routes(tiny, "2 + 3 =", ANSWER).agreement(sweep)
    with pytest.raises(ValueError, match="answer is '5', the route's '6'"):
        tl.routes(tiny, PROMPT, " 6").agreement(sweep)
    with pytest.raises(ValueError, match="position=-1"):
        tl.routes(tiny, PROMPT, ANSWER, position=3).agreement(sweep)
    # tl.patch records the clean run's tokens, and they must be the route's exactly.
    assert sweep.source_str_tokens == r.str_tokens
    changed = dataclasses.replace(sweep, source_str_tokens=list(r.str_tokens[:-1]) + ["x"])
    with pytest.raises(ValueError, match="clean prompt is not the route's"):
        r.agreement(changed)
    # A result built without them (as before they were recorded): the alignment check decides.
    unrecorded = dataclasses.replace(sweep, source_str_tokens=None)
    assert repr(r.agreement(unrecorded)) == repr(r.agreement(sweep))
    weak = dataclasses.replace(sweep, corrupted_metric=sweep.clean_metric * 0.999)
    assert weak.weak_effect
    with pytest.raises(ValueError, match="stronger corruption"):
        r.agreement(weak)
    assert r.agreement(weak, allow_weak=True).n_cells == r.agreement(sweep).n_cells
    for bad in (0, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"min_recovery must be in \(0, 1\]"):
            r.agreement(sweep, min_recovery=bad)
    with pytest.raises(TypeError, match="pass a PatchingResult"):
        r.agreement(r)


def test_bench_routes_rows_judge_on_smollm2_only(monkeypatch):
    # The bench's routes step (no timing here): the target rows and the table, from made-up figures.
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "scripts"))
    from benchsteps.report import render
    from benchsteps.steps import STEPS

    assert "routes" in dict(STEPS)
    mem = {"peak_rss": 2**30, "rss_model": 2**29, "activation_bytes": 2**20}
    m = {"time_s": 0.2, **mem, "trace": {"time_s": 0.1, **mem}, "sweep": {"time_s": 5.0, **mem}}
    m.update(str_tokens=["a"] * 8, cells=240, spearman=0.5, recall=1.0, precision=None, weak_effect=False)
    results = {n: {"layers": 30, "steps": {"routes": m}} for n in ("tiny", "smollm2")}
    table = render(results)
    assert "| routes / trace (8 tokens, 240 cells) | smollm2 | 2.00 | 3.0 | ✓ |" in table
    assert "| resid_pre sweep / routes (>=) (8 tokens, 240 cells) | smollm2 | 25.00 | 20.0 | ✓ |" in table
    assert "| routes / trace (8 tokens, 240 cells) | tiny | 2.00 | — | (for information) |" in table
    assert "| smollm2 | 0.200 / 0.100 / 5.000 |" in table and "+0.500, +1.000, - |" in table


def test_a_prompt_too_long_for_memory_is_refused_before_the_forward_pass(tiny, monkeypatch):
    """The edges grow with the square of the prompt; past half the free memory, a clear error."""
    routes_module = sys.modules["tracelib.routes"]  # `tracelib.routes` is the function
    r = tl.routes(tiny, PROMPT, ANSWER)
    assert len(r.edges) == routes_module.edge_count(tiny.cfg.n_layers, tiny.cfg.n_heads, len(r.str_tokens))
    need = len(r.edges) * routes_module._EDGE_BYTES
    monkeypatch.setattr(routes_module, "free_memory", lambda: 2 * need - 2)
    calls = []
    monkeypatch.setattr(routes_module, "cached_run", lambda *a, **k: calls.append(a))
    with pytest.raises(MemoryError, match="shorter prompt"):
        tl.routes(tiny, PROMPT, ANSWER)
    assert not calls  # refused before any forward pass
    monkeypatch.undo()
    monkeypatch.setattr(routes_module, "free_memory", lambda: 2 * need)
    assert len(tl.routes(tiny, PROMPT, ANSWER).edges) == len(r.edges)


def test_edge_dla_adds_up_to_each_node_and_decides_copied(tiny):
    """Each edge's term DLA, summed into its node, is the node's DLA (the bundled model's attention
    has no output bias, so the terms are the whole sum); the verdict's "copied" needs the moved
    writes to carry the answer, which the bundled model's operand reads do not: a sum is assembled
    at the final position."""
    assert all(layer_weight(tiny, "attn.b_O", layer) is None for layer in range(tiny.cfg.n_layers))
    r = tl.routes(tiny, "what is 2 + 3", " 5")
    nodes = r.nodes.set_index(["layer", "pos", "kind"])["dla"]
    into = r.edges.groupby(["dst_layer", "dst_pos", "dst_kind"])["dla"].sum()
    assert len(into) == len(nodes) - len(r.str_tokens)  # every node but the embeddings has terms
    for node, total in into.items():
        assert abs(total - nodes[node]) <= 1e-5 * max(1.0, abs(nodes[node])), node
    moved = r.moved_dla()
    assert set(moved.index) == set(r.head_sources().drop(r.position, errors="ignore").index)
    assert r.final_dla > 0 and moved.max() < 0.6 * r.final_dla
    verdict, reason = r.verdict()
    assert verdict == "assembled" and "written at" in reason
