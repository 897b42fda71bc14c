"""Routes: the information-flow graph that carries the answer to a position, from one forward pass.

Ferrando & Voita 2024, "Information Flow Routes: Automatically Interpreting Language Models at
Scale" (arXiv 2403.00824). The nodes are the residual stream at (layer, position): entering each
block (`pre`, `hook_resid_pre`), after its attention (`mid`, `hook_resid_mid`), and leaving the last
block (`final`, the last block's `hook_resid_post`). Every node is a sum of the nodes and writes
below it:

- `mid(l, i) = pre(l, i) + sum over heads h and sources j <= i of c[h, i, j] + b_O`, where
  `c[h, i, j] = A^h[i, j] * v^{kv(h)}[j] @ W_O^h` is what head h moved from position j to i
  (`v` is the value, `hook_v`, of the head's KV head `kv(h) = h // (n_heads // n_kv_heads)` under
  grouped-query attention; it holds the value bias, so the terms add up to the attention output);
  the output bias `b_O` counts in the sum but is no edge;
- `pre(l + 1, i)` (or `final(i)`) `= mid(l, i) + mlp_out(l, i)`: a residual edge and an MLP edge,
  both from `mid(l, i)`.

Each edge's importance is the paper's proximity of its term `c_k` to the node's sum `y = sum_k c_k`:

    prox(c_k, y) = max(0, ||y||_1 - ||y - c_k||_1),    importance_k = prox_k / sum_k' prox_k'

so the importances of the edges into a node sum to 1 (where any proximity is positive). The route
is the subgraph reachable backwards from `final(position)` through edges whose importance is at
least `threshold`.

Each node also carries its DLA: its residual projected on the answer direction (the answer's
unembedding minus the mean of its distractors'), divided by the final norm's cached scale at the
node's own position, as the cached-scale DLA lens does (`tracelib.projections.scaled_directions`).
At the final node of the last position this is the trace's DLA lens at `final` (before `b_U`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from tracelib.answers import token_str
from tracelib.batching import free_memory
from tracelib.formats import check_k, fmt_value, metric_phrase, token_labels
from tracelib.forward import MIN_SCORED, cached_run
from tracelib.identity import MadeByModelFields, ModelIdentity, check_model_arg, check_same_model, model_identity
from tracelib.plotting.routes import route_agreement_figure, routes_figure
from tracelib.projections import compute_dtype, layer_weight, scaled_directions
from tracelib.rows import _fill_distractors, build_rows
from tracelib.stats import spearman

EDGE_COLUMNS = [
    "src_layer",
    "src_pos",
    "src_kind",
    "dst_layer",
    "dst_pos",
    "dst_kind",
    "via",
    "head",
    "importance",
    "dla",
    "on_route",
]
NODE_COLUMNS = ["layer", "pos", "kind", "token", "dla", "on_route"]
VERDICTS = ("copied", "computed in place", "assembled")
# One line per resid_pre cell in `RouteAgreement.cells`.
AGREEMENT_COLUMNS = [
    "layer", "pos", "token", "corrupted_pos", "corrupted_token", "weight", "on_route", "recovery", "disagrees",
]  # fmt: skip

# "copied": one earlier position carries at least this share of the route's head importance
# into the final column (read from earlier positions); below it, several positions assemble it.
COPY_SHARE = 0.6

# Elements of the head writes `[block, head, src, d_model]` held at once (blocks computed together).
_BLOCK_ELEMENTS = 2**24
# Elements of the head terms `[dst, head, src, d_model]` made at once (about a core's cache).
_TERM_ELEMENTS = 2**18
# Bytes per edge while the edges frame is built: the frame holds about 110 a line, and the arrays it
# is built from as many again. A route has `n_layers * (n_heads * P * (P + 1) / 2 + 3 * P)` edges.
_EDGE_BYTES = 256


@dataclass(frozen=True, eq=False)
class Routes(MadeByModelFields):
    """The information-flow graph of one prediction, and the route that carries it.

    Attributes:
        row_label: the prompt and answer explained.
        str_tokens: the prompt's tokens.
        position: the position whose final residual the route explains (non-negative).
        threshold: the least importance an edge needs to be on the route.
        n_layers, n_heads: the model's shape.
        edges: one line per edge (see `EDGE_COLUMNS`): its source and destination nodes, `via`
            ("head", "mlp" or "residual"), the head for head edges (None otherwise), its importance,
            its term's DLA (read at the destination's position: a head's `A[dst, src] * write[src] . u`,
            the MLP's output, or the residual's source node; the terms into a node, with `b_O`'s, sum
            to its DLA) and whether it is on the route.
        nodes: one line per node (see `NODE_COLUMNS`): layer, position, kind ("pre", "mid",
            "final"; the final node's layer is `n_layers`), token, DLA and whether it is on the route.
        metric_label: what the DLA measures, in words (names the distractors).
        reconstruction_error: the largest `|pre + sum of head terms + b_O - mid|` over the nodes,
            relative to the largest `|mid|`: how exactly the head terms add up to the residual.
        answer_str: the answer token the route explains ("" where unknown).
        model_name, weights_fingerprint: the model that made the routes (`identity`); empty where unknown.
    """

    row_label: str
    str_tokens: list[str]
    position: int
    threshold: float
    n_layers: int
    n_heads: int
    edges: pd.DataFrame
    nodes: pd.DataFrame
    metric_label: str = ""
    reconstruction_error: float = 0.0
    answer_str: str = ""

    def __post_init__(self) -> None:
        n = len(self.str_tokens)
        if not 0 <= self.position < n:
            raise ValueError(f"position must be in [0, {n}) (one of the prompt's {n} tokens), got {self.position}")
        missing = [c for c in EDGE_COLUMNS if c not in self.edges.columns]
        missing += [c for c in NODE_COLUMNS if c not in self.nodes.columns]
        if missing:
            raise ValueError(f"Routes needs edge and node columns {missing}")
        if len(self.nodes) != n * (2 * self.n_layers + 1):
            raise ValueError(f"nodes must hold {n * (2 * self.n_layers + 1)} lines (pre, mid per layer, final)")

    @property
    def route(self) -> pd.DataFrame:
        """The edges on the route, by importance (largest first)."""
        on = self.edges[self.edges["on_route"]]
        return on.sort_values("importance", ascending=False, kind="stable")

    def top(self, k: int = 5) -> pd.DataFrame:
        """The k most important edges on the route (importances are never negative)."""
        return self.route.head(check_k(k))

    def to_frame(self) -> pd.DataFrame:
        """Long form: every edge, with its source and destination tokens (`'1'@3`)."""
        labels = token_labels(self.str_tokens)
        frame = self.edges.copy()
        frame.insert(2, "src_token", [labels[p] for p in frame["src_pos"]])
        frame.insert(6, "dst_token", [labels[p] for p in frame["dst_pos"]])
        return frame

    @property
    def final_dla(self) -> float:
        """The DLA of the route's final node (the residual the model unembeds at `position`)."""
        nodes = self.nodes
        final = nodes[(nodes["kind"] == "final") & (nodes["pos"] == self.position)]
        return float(final["dla"].iloc[0])

    def head_sources(self) -> pd.Series:
        """Importance of the route's head edges into the position's column, summed by source position."""
        route = self.route
        into = route[(route["via"] == "head") & (route["dst_pos"] == self.position)]
        return into.groupby("src_pos")["importance"].sum().sort_values(ascending=False, kind="stable")

    def moved_dla(self) -> pd.Series:
        """The DLA that the route's head edges from each earlier position write into the position's
        column (the terms `A[dst, src] * write[src] . u`), summed by source, largest first."""
        route = self.route
        into = route[(route["via"] == "head") & (route["dst_pos"] == self.position)]
        into = into[into["src_pos"] != self.position]
        return into.groupby("src_pos")["dla"].sum().sort_values(ascending=False, kind="stable")

    def verdict(self) -> tuple[str, str]:
        """How the answer reaches the position, by the route: (verdict, one-line reason).

        From the route's head edges into the position's own column (its `mid` nodes) from earlier
        positions: their importance (`head_sources`) says where information comes from, their DLA
        (`moved_dla`) whether it is the answer itself.

        - "computed in place": no head on the route reads an earlier position; the route never leaves
          the column (residual and MLP edges, and heads attending to the position itself);
        - "copied": heads bring the answer's direction ready-made from one earlier position: their
          writes from it carry at least `COPY_SHARE` (60%) of the final node's DLA;
        - "assembled": heads bring information from earlier positions, but not the answer: what they
          write carries less of the final DLA (the operands of a sum, say), and the answer's
          direction is written at the position itself, from what they bring (or the final DLA is
          not positive: nothing here favours the answer).
        """
        sources = self.head_sources()
        earlier = sources.drop(self.position, errors="ignore")
        labels = token_labels(self.str_tokens)
        total = float(earlier.sum())
        here = labels[self.position]
        if earlier.empty or total <= 0:
            return (
                "computed in place",
                f"the route into {here} never leaves its position (residual, MLP and self-reading heads)",
            )
        chain = self.chain()
        # One hop further back at most: each hop is the largest head input into a column, and a long
        # chain of them (previous-token heads, say) is no evidence of where the answer came from.
        before = "".join(
            f"; before that, {labels[int(hop['dst_pos'])]} read most from {labels[int(hop['src_pos'])]} "
            f"({hop['heads']})"
            for hop in chain[1:2]
        )
        hops = f" (a {len(chain)}-hop chain: see .chain())" if len(chain) > 1 else ""
        moved, final = self.moved_dla(), self.final_dla
        top = int(moved.index[0])
        if final > 0 and float(moved.iloc[0]) >= COPY_SHARE * final:
            route = self.route
            heads = _head_names(
                route[(route["via"] == "head") & (route["dst_pos"] == self.position) & (route["src_pos"] == top)]
            )
            return (
                "copied",
                f"heads bring the answer ready-made from {labels[top]}: their writes from it make up "
                f"{_share(float(moved.iloc[0]) / final)} of the final DLA ({heads})"
                + (before + hops if chain[0]["src_pos"] == top else ""),
            )
        shown = ", ".join(f"{labels[int(p)]} {float(v) / total:.0%}" for p, v in earlier.head(4).items())
        carried = (
            f"their writes carry {_share(float(moved.sum()) / final)} of the final DLA, so the answer is written at "
            f"{here} from what they bring"
            if final > 0
            else f"the final DLA is {final:+.2f}: nothing on the route favours the answer"
        )
        return (
            "assembled",
            f"heads bring information from {len(earlier)} earlier position{'s' if len(earlier) > 1 else ''} "
            f"({shown} of the route's head importance), and {carried}{before}{hops}",
        )

    def chain(self) -> list[dict]:
        """The route's main path across positions, hop by hop back from `position`.

        The first hop is the earlier position whose head edges into the position's column carry the
        most route importance (`head_sources`). Each next hop does the same for that position's
        column, among head edges into it at layers below the last one that read from it: where the
        information was before it was moved. Each hop is a dict: `src_pos`, `dst_pos`, `heads`
        (`"L3H1, L5H0"`), `importance` (summed over those heads) and `layer` (the highest
        destination layer among them). Empty when no head on the route reads an earlier position.

        Each hop says where a column's largest head input on the route comes from, not that the
        answer's information took that path: check a hop with exact patching (`tl.patch`) before
        telling that story.
        """
        route = self.route
        heads = route[(route["via"] == "head") & (route["src_pos"] != route["dst_pos"])]
        out, pos, below = [], self.position, self.n_layers
        while True:
            into = heads[(heads["dst_pos"] == pos) & (heads["dst_layer"] < below)]
            if into.empty:
                return out
            by_src = into.groupby("src_pos")["importance"].sum().sort_values(ascending=False, kind="stable")
            src = int(by_src.index[0])  # always before `pos` (heads read earlier positions): the path ends
            moved = into[into["src_pos"] == src]
            out.append(
                dict(
                    src_pos=src,
                    dst_pos=pos,
                    heads=_head_names(moved),
                    importance=float(by_src.iloc[0]),
                    layer=int(moved["dst_layer"].max()),
                )
            )
            pos, below = src, int(moved["dst_layer"].max())

    def plot(self, **layout):
        """The route: positions across (token labels), layers up; edge width by importance, nodes
        coloured by DLA (blue pushes toward the answer, red against it)."""
        metric = f"<br><sub>{self.metric_label}</sub>" if self.metric_label else ""
        title = f"Information-flow route: {self.row_label} at {token_labels(self.str_tokens)[self.position]}{metric}"
        return routes_figure(self.nodes, self.route, self.str_tokens, self.n_layers, **{"title": title, **layout})

    def node_flow(self) -> pd.DataFrame:
        """`nodes` with a `weight` column: the final node's flow traced back through the route.

        The final node at `position` weighs 1; each on-route edge passes its destination's weight
        times its importance to its source, and a node's weight is the sum of what it receives (0
        off the route). The importances into a node sum to at most 1 (to float rounding: they are
        float32 shares), so the weights at each level (`pre` of a layer, `mid` of a layer) sum to at
        most 1 too: the share of the prediction's flow that passes through each node.
        """
        level = {kind: i for i, kind in enumerate(("pre", "mid"))}
        n_levels, n = 2 * self.n_layers + 1, len(self.str_tokens)

        def levels(layers, kinds) -> np.ndarray:
            return np.array([2 * int(ly) + level.get(k, 0) for ly, k in zip(layers, kinds)], dtype=np.int64)

        route = self.edges[self.edges["on_route"]]
        src_level = levels(route["src_layer"], route["src_kind"])
        dst_level = levels(route["dst_layer"], route["dst_kind"])
        src_pos, dst_pos = route["src_pos"].to_numpy(np.int64), route["dst_pos"].to_numpy(np.int64)
        importance = route["importance"].to_numpy(np.float64)
        weight = np.zeros((n_levels, n))
        weight[n_levels - 1, self.position] = 1.0
        for lv in range(n_levels - 1, 0, -1):  # every edge climbs one or two levels: top down is in order
            into = dst_level == lv
            np.add.at(weight, (src_level[into], src_pos[into]), weight[lv, dst_pos[into]] * importance[into])
        frame = self.nodes.copy()
        frame["weight"] = weight[levels(frame["layer"], frame["kind"]), frame["pos"].to_numpy(np.int64)]
        return frame

    def agreement(self, sweep, min_recovery: float = 0.2, *, allow_weak: bool = False) -> RouteAgreement:
        """How well the route matches exact `resid_pre` patching (`tl.patch(..., what="resid_pre")`).

        Each cell of the sweep (layer l, corrupted position p) is mapped through `sweep.alignment[p]`
        to the clean position j and to the route's `pre` node (l, j), whose weight is `node_flow`'s.
        A cell "matters" where |recovery| >= `min_recovery`.

        Args:
            sweep: a denoising `resid_pre` PatchingResult whose clean prompt and answer are this
                route's, from the same model, read at the route's position (the last).
            min_recovery: the |recovery| a cell needs to count as mattering, in (0, 1].
            allow_weak: compare even where the corruption barely changed the answer (then recovery
                is noise amplified; refused by default).

        Returns:
            A `RouteAgreement`: Spearman of node weight against |recovery|, recall, precision,
            `.to_frame()` and `.plot()`.

        Raises:
            ValueError: not a denoising resid_pre sweep, another prompt or answer, a route not at the
                last position, a weak sweep (unless `allow_weak`), or a bad `min_recovery`.
            ModelMismatchError: the sweep comes from another model.
        """
        min_recovery = _check_threshold(min_recovery, "min_recovery", "a share of the clean effect")
        self._check_sweep(sweep, allow_weak)
        flow = self.node_flow()
        pre = flow[flow["kind"] == "pre"].set_index(["layer", "pos"])
        values = sweep.values.double()
        labels = token_labels(self.str_tokens)
        rows = []
        for p, j in enumerate(sweep.alignment):
            if j is None:
                continue
            for layer in range(self.n_layers):
                node = pre.loc[(layer, int(j))]
                rows.append(
                    dict(layer=layer, pos=int(j), token=labels[int(j)], corrupted_pos=p,
                         corrupted_token=sweep.labels[1][p], weight=float(node["weight"]),
                         on_route=bool(node["on_route"]), recovery=float(values[layer, p]))
                )  # fmt: skip
        cells = pd.DataFrame(rows, columns=AGREEMENT_COLUMNS[:-1])
        cells = cells[cells["recovery"].notna()].reset_index(drop=True)
        matters = cells["recovery"].abs() >= min_recovery
        cells["disagrees"] = cells["on_route"] != matters
        n_matter, n_route = int(matters.sum()), int(cells["on_route"].sum())
        n_both = int((matters & cells["on_route"]).sum())
        rho = (
            spearman(torch.tensor(cells["weight"].to_numpy()), torch.tensor(cells["recovery"].abs().to_numpy()))
            if len(cells) > 1
            else math.nan
        )
        return RouteAgreement(
            cells=cells,
            spearman=rho,
            recall=n_both / n_matter if n_matter else math.nan,
            precision=n_both / n_route if n_route else math.nan,
            n_cells=len(cells),
            n_recovering=n_matter,
            n_on_route=n_route,
            n_both=n_both,
            min_recovery=min_recovery,
            n_layers=self.n_layers,
            str_tokens=list(self.str_tokens),
            row_label=self.row_label,
            model_name=self.model_name,
            weights_fingerprint=self.weights_fingerprint,
        )

    def _check_sweep(self, sweep, allow_weak: bool) -> None:
        """Refuse a sweep that cannot be compared with this route (see `agreement`)."""
        what = getattr(sweep, "what", None)
        if what is None or not hasattr(sweep, "values") or not hasattr(sweep, "alignment"):
            raise TypeError(
                "Routes.agreement: pass a PatchingResult from tl.patch(model, clean, corrupted, answer, "
                f'what="resid_pre"), got {type(sweep).__name__}.'
            )
        if what != "resid_pre" or tuple(sweep.dims) != ("layer", "position"):
            raise ValueError(
                f"Routes.agreement compares the route's pre nodes with a resid_pre sweep; this sweep patched "
                f'{what!r} (dims {tuple(sweep.dims)}). Run tl.patch(..., what="resid_pre").'
            )
        if getattr(sweep, "method", "exact") != "exact" or getattr(sweep, "direction", "denoise") != "denoise":
            raise ValueError(
                f"Routes.agreement needs an exact denoising sweep (tl.patch, direction='denoise'); this one is "
                f"{getattr(sweep, 'method', '?')}, {getattr(sweep, 'direction', '?')}."
            )
        check_same_model(self.identity, sweep_identity(sweep), "The routes", "the resid_pre sweep")
        n = len(self.str_tokens)
        if self.position != n - 1:
            raise ValueError(
                f"The route explains position {self.position}, but patching reads the answer at the last "
                f"position ({n - 1}); build the routes with position=-1."
            )
        if self.answer_str and sweep.answer_str != self.answer_str:
            raise ValueError(
                f"The sweep's answer is {sweep.answer_str!r}, the route's {self.answer_str!r}; patch the same answer."
            )
        clean = getattr(sweep, "source_str_tokens", None)  # denoising: the clean run's tokens
        aligned = [(p, j) for p, j in enumerate(sweep.alignment) if j is not None]
        if clean is not None:
            same = list(clean) == list(self.str_tokens)
        else:  # a result built without them: the alignment must fit, and most aligned tokens match
            fits = all(0 <= int(j) < n for _, j in aligned)
            matching = sum(fits and sweep.str_tokens[p] == self.str_tokens[int(j)] for p, j in aligned)
            same = fits and bool(aligned) and 2 * matching > len(aligned)
        if not same:
            raise ValueError(
                f"The sweep's clean prompt is not the route's: the route reads {self.str_tokens}, the sweep's "
                f"corrupted run {list(sweep.str_tokens)} (aligned {list(sweep.alignment)}). Patch with the "
                "route's prompt as the clean prompt."
            )
        if getattr(sweep, "weak_effect", False) and not allow_weak:
            note = getattr(sweep, "effect_note", "")
            raise ValueError(
                f"The sweep's corruption barely changes the answer ({note}), so its recovery is noise amplified "
                "and any agreement with it is too. Use a stronger corruption (one that changes the answer), "
                "or pass allow_weak=True."
            )

    def __repr__(self) -> str:
        verdict, _ = self.verdict()
        n_route = int(self.edges["on_route"].sum())
        return (
            f"Routes({self.row_label} at {token_labels(self.str_tokens)[self.position]}: "
            f"{n_route} edges on the route (threshold {self.threshold:.3f}), "
            f"final DLA {fmt_value(self.final_dla)}; {verdict})"
        )


def sweep_identity(sweep) -> ModelIdentity | None:
    """The identity of the model that made a patching result (None where it records none)."""
    identity = getattr(sweep, "identity", None)
    return identity if isinstance(identity, ModelIdentity) else None


@dataclass(frozen=True, eq=False)
class RouteAgreement(MadeByModelFields):
    """How well an information-flow route matches exact resid_pre patching on the same clean prompt.

    Attributes:
        cells: one line per patched cell (see `AGREEMENT_COLUMNS`): the route's `pre` node (layer,
            clean position `pos`, its token), the corrupted position patched, the node's flow weight
            (`Routes.node_flow`), whether it is on the route, the cell's recovery, and `disagrees`:
            on the route but |recovery| < `min_recovery`, or off it but |recovery| >= `min_recovery`.
        spearman: Spearman's rank correlation of node weight against |recovery| over the cells (NaN
            where either is constant).
        recall: the share of cells with |recovery| >= `min_recovery` whose node is on the route.
        precision: the share of on-route cells with |recovery| >= `min_recovery` (NaN where none).
        n_cells, n_recovering, n_on_route, n_both: the counts behind them.
        min_recovery: the |recovery| a cell needs to count.
        n_layers, str_tokens, row_label: the route's shape, clean tokens and prompt.
    """

    cells: pd.DataFrame
    spearman: float
    recall: float
    precision: float
    n_cells: int
    n_recovering: int
    n_on_route: int
    n_both: int
    min_recovery: float
    n_layers: int
    str_tokens: list[str]
    row_label: str = ""

    def __post_init__(self) -> None:
        missing = [c for c in AGREEMENT_COLUMNS if c not in self.cells.columns]
        if missing:
            raise ValueError(f"RouteAgreement needs cell columns {missing}")
        if len(self.cells) != self.n_cells:
            raise ValueError(f"cells holds {len(self.cells)} lines but n_cells is {self.n_cells}")

    def to_frame(self) -> pd.DataFrame:
        """Every cell: its node, weight, on_route, recovery and whether route and patching disagree."""
        return self.cells.copy()

    def top(self, k: int = 5) -> pd.DataFrame:
        """The k disagreeing cells with the largest |recovery| or weight (whichever is larger), signs kept."""
        frame = self.cells[self.cells["disagrees"]]
        size = np.maximum(frame["recovery"].abs(), frame["weight"])
        return frame.loc[size.sort_values(ascending=False, kind="stable").index].head(check_k(k))

    def grids(self) -> tuple[np.ndarray, np.ndarray]:
        """(weight, recovery) as [layer, clean position] arrays, NaN where no cell was patched."""
        shape = (self.n_layers, len(self.str_tokens))
        weight, recovery = np.full(shape, np.nan), np.full(shape, np.nan)
        layer, pos = self.cells["layer"].to_numpy(np.int64), self.cells["pos"].to_numpy(np.int64)
        weight[layer, pos] = self.cells["weight"].to_numpy(np.float64)
        recovery[layer, pos] = self.cells["recovery"].to_numpy(np.float64)
        return weight, recovery

    def plot(self, **layout):
        """Two heatmaps, layer x clean position: the route's flow weight (sequential) and recovery (RdBu at 0)."""
        weight, recovery = self.grids()
        title = f"Route vs resid_pre patching: {self.row_label}<br><sub>{self._summary()}</sub>"
        return route_agreement_figure(weight, recovery, self.str_tokens, **{"title": title, **layout})

    def _summary(self) -> str:
        return (
            f"Spearman {self.spearman:+.3f}, recall {self.recall:.3f} ({self.n_both}/{self.n_recovering}), "
            f"precision {self.precision:.3f} ({self.n_both}/{self.n_on_route}) at |recovery| >= {self.min_recovery:.2f}"
        )

    def __repr__(self) -> str:
        return (
            f"RouteAgreement({self.row_label}, {self.n_cells} resid_pre cells: {self._summary()}; "
            f"{int(self.cells['disagrees'].sum())} disagree)"
        )


def proximity(y: Float[Tensor, "*batch d_model"], c: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch"]:
    """Ferrando & Voita's proximity of a term to its sum: `max(0, ||y||_1 - ||y - c||_1)`."""
    return (y.abs().sum(-1) - (y - c).abs().sum(-1)).clamp_min(0)


def head_writes(model, cache, layer: int, dtype: torch.dtype) -> Float[Tensor, "head src d_model"]:
    """What each query head writes from each source per unit of attention: `v^{kv(h)}[src] @ W_O^h`.

    `hook_v` holds one value per KV head under grouped-query attention (or one per head); query head
    `h` reads KV head `h // (n_heads // n_kv_heads)`. Times the pattern `A^h[dst, src]` this is the
    head's term `c[h, dst, src]`.
    """
    n_heads = model.cfg.n_heads
    v = cache[f"blocks.{layer}.attn.hook_v"][0].to(dtype)  # [src, kv_head, d_head]
    if v.shape[1] != n_heads:
        v = v[:, torch.arange(n_heads, device=v.device) // (n_heads // v.shape[1])]
    W_O = layer_weight(model, "attn.W_O", layer).to(dtype)  # [head, d_head, d_model]
    return torch.bmm(v.transpose(0, 1), W_O)  # [head, src, d_head] @ [head, d_head, d_model]


def _check_threshold(
    threshold, name: str = "threshold", meaning: str = "an edge's importance is a share of its node"
) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"{name} must be a number in (0, 1], got {threshold!r}")
    value = float(threshold)
    if not (math.isfinite(value) and 0 < value <= 1):
        raise ValueError(f"{name} must be in (0, 1] ({meaning}), got {threshold!r}")
    return value


def _check_position(position, n: int) -> int:
    if isinstance(position, bool) or not hasattr(type(position), "__index__"):
        raise TypeError(f"position must be an integer, got {position!r}")
    value = int(position)
    if not -n <= value < n:
        raise ValueError(f"position {value} is outside the prompt's {n} tokens (use -{n} .. {n - 1})")
    return value % n


def _head_names(edges: pd.DataFrame) -> str:
    """The heads of head edges, as `"L3H1, L5H0"` (a head's layer is its destination's)."""
    return ", ".join(f"L{int(layer)}H{int(h)}" for layer, h in zip(edges["dst_layer"], edges["head"]))


def _share(x: float) -> str:
    """A share as a whole percentage, never "-0%"."""
    return f"{round(x, 2) + 0.0:.0%}"


def edge_count(n_layers: int, n_heads: int, P: int) -> int:
    """How many edges a route of a `P`-token prompt has: a head edge per head and (destination,
    source at or before it), and three per layer and position (residual, MLP, residual)."""
    return n_layers * (n_heads * P * (P + 1) // 2 + 3 * P)


def _check_size(model, P: int) -> None:
    """Refuse, before the forward pass, a prompt whose edges would not fit in half the free memory."""
    edges = edge_count(model.cfg.n_layers, model.cfg.n_heads, P)
    need, free = edges * _EDGE_BYTES, free_memory()
    if need > free // 2:
        raise MemoryError(
            f"routes() keeps every edge of the graph: {edges:,} for this {P}-token prompt on "
            f"{model.cfg.n_layers} layers x {model.cfg.n_heads} heads (they grow with the square of the "
            f"prompt's length), about {need / 2**30:.1f} GiB, and {free / 2**30:.1f} GiB is free. "
            "Use a shorter prompt (the route of its last few hundred tokens at most)."
        )


def _normalise(prox: Tensor) -> Tensor:
    """Proximities into importances along the last axis (all zero where every proximity is)."""
    total = prox.sum(-1, keepdim=True)
    return torch.where(total > 0, prox / total.clamp_min(torch.finfo(prox.dtype).tiny), torch.zeros_like(prox))


def _edge_importances(model, cache, layers: range, dtype, P: int, u: Tensor) -> tuple[Tensor, Tensor, list[float]]:
    """The importances of the edges into the `mid` nodes of blocks `layers` and the next `pre` (or
    `final`) nodes, `[block, edge]` in `_edge_template`'s order; the DLA of each edge's term toward
    the answer (`u`, `[pos, d_model]`, read at the destination's position), in the same order; and
    each block's reconstruction error. The blocks are computed together: a block's tensors are
    small, and Python's per-operation cost would otherwise be most of the time."""
    n_heads, last = model.cfg.n_heads, model.cfg.n_layers - 1

    def stacked(name: str, shift: int = 0) -> Tensor:
        """`name` of every block in `layers` (of the block `shift` above; past the last, its output)."""
        names = [
            f"blocks.{last}.hook_resid_post" if layer + shift > last else name.format(layer=layer + shift)
            for layer in layers
        ]
        return torch.stack([cache[n][0] for n in names]).to(dtype)

    pre, mid = stacked("blocks.{layer}.hook_resid_pre"), stacked("blocks.{layer}.hook_resid_mid")
    nxt, mlp = stacked("blocks.{layer}.hook_resid_pre", shift=1), stacked("blocks.{layer}.hook_mlp_out")
    pattern = stacked("blocks.{layer}.attn.hook_pattern")  # [block, head, dst, src]
    writes = torch.stack([head_writes(model, cache, layer, dtype) for layer in layers])  # [block, head, src, d_model]
    b_O = [layer_weight(model, "attn.b_O", layer) for layer in layers]
    b_O = torch.stack([torch.zeros_like(mid[0, 0]) if b is None else b.to(dtype) for b in b_O])  # [block, d_model]
    n, d_model = len(layers), mid.shape[-1]

    # Head terms c[h, dst, src], a few destinations at a time: small enough to stay in a core's cache,
    # where the several passes of `proximity` over them cost least.
    head_prox = torch.zeros(n, P, n_heads, P, dtype=dtype, device=mid.device)  # [block, dst, head, src]
    step = max(1, _TERM_ELEMENTS // max(1, n_heads * P * d_model))
    for b in range(n):
        for start in range(0, P, step):
            stop = min(P, start + step)  # causal: destinations below `stop` read sources below it
            terms = pattern[b, :, start:stop, :stop].transpose(0, 1)[..., None] * writes[b, None, :, :stop]
            y = mid[b, start:stop, None, None]  # `proximity(y, terms)`, in place: the terms are the largest tensor
            rest = torch.sub(y, terms, out=terms).abs_().sum(-1)  # [dst, head, src]
            head_prox[b, start:stop, :, :stop] = (y.abs().sum(-1) - rest).clamp_min(0)
            del terms
    res_prox = proximity(mid, pre)  # [block, dst]
    attn_sum = torch.einsum("bhds,bhsm->bdm", pattern, writes)
    error = (pre + attn_sum + b_O[:, None] - mid).abs().amax((1, 2)) / mid.abs().amax((1, 2)).clamp_min(1e-30)

    imp = _normalise(torch.cat([head_prox.reshape(n, P, -1), res_prox[..., None]], dim=-1))
    causal = torch.ones(P, P, dtype=torch.bool, device=mid.device).tril()[:, None, :].expand(P, n_heads, P)
    head_imp = imp[..., :-1].reshape(n, P, n_heads, P)[:, causal]  # [block, head edge]
    mlp_imp = _normalise(torch.stack([proximity(nxt, mlp), proximity(nxt, mid)], dim=-1))  # [block, pos, 2]
    importance = torch.cat([head_imp, imp[..., -1], mlp_imp[..., 0], mlp_imp[..., 1]], dim=1)
    # Each term's DLA at its destination: a head's A[dst, src] * (write[src] . u[dst]); the MLP's
    # output and the residual's source node read through u[dst].
    read = torch.einsum("bhsm,dm->bdhs", writes, u)  # [block, dst, head, src]
    head_dla = (pattern.transpose(1, 2) * read)[:, causal]
    dla = torch.cat([head_dla, (pre * u).sum(-1), (mlp * u).sum(-1), (mid * u).sum(-1)], dim=1)
    return importance, dla, error.tolist()


def _edge_template(P: int, n_heads: int) -> dict[str, np.ndarray]:
    """One block's edges without their layers, in `_edge_importances`'s order: the head edges (destination,
    head, source; sources up to the destination), the residual edges `pre -> mid`, then the MLP and
    residual edges `mid -> next`. `dst_layer` holds the destination's layer less the block's."""
    dst, h, src = np.nonzero(np.broadcast_to(np.tril(np.ones((P, P), dtype=bool))[:, None, :], (P, n_heads, P)))
    n_head, positions = len(dst), np.arange(P)
    head = np.empty(n_head + 3 * P, dtype=object)
    head[:n_head] = h.tolist()  # Python ints; None on the other edges
    return {
        "src_pos": np.concatenate([src, positions, positions, positions]),
        "src_kind": np.array(["pre"] * (n_head + P) + ["mid"] * (2 * P), dtype=object),
        "dst_layer": np.concatenate([np.zeros(n_head + P, dtype=np.int64), np.ones(2 * P, dtype=np.int64)]),
        "dst_pos": np.concatenate([dst, positions, positions, positions]),
        "via": np.array(["head"] * n_head + ["residual"] * P + ["mlp"] * P + ["residual"] * P, dtype=object),
        "head": head,
    }


def _edge_frame(importances: list[Tensor], P: int, n_heads: int) -> pd.DataFrame:
    """Every block's edges (`_edge_template`, block after block) with their importances."""
    template, n_layers = _edge_template(P, n_heads), len(importances)
    per_block = len(template["src_pos"])
    layer = np.repeat(np.arange(n_layers, dtype=np.int64), per_block)
    last = np.zeros(per_block * n_layers, dtype=bool)
    last[-per_block:] = template["dst_layer"] == 1  # the last block's `mid -> next` edges end at `final`
    dst_kind = np.where(np.tile(template["dst_layer"] == 1, n_layers), "pre", "mid").astype(object)
    dst_kind[last] = "final"
    return pd.DataFrame(
        {
            "src_layer": layer,
            "src_pos": np.tile(template["src_pos"], n_layers).astype(np.int64),
            "src_kind": np.tile(template["src_kind"], n_layers),
            "dst_layer": layer + np.tile(template["dst_layer"], n_layers),
            "dst_pos": np.tile(template["dst_pos"], n_layers).astype(np.int64),
            "dst_kind": dst_kind,
            "via": np.tile(template["via"], n_layers),
            "head": pd.Series(np.tile(template["head"], n_layers), dtype=object),
            "importance": torch.cat(importances).double().cpu().numpy(),
            "on_route": np.zeros(per_block * n_layers, dtype=bool),
        }
    )


def _mark_route(edges: pd.DataFrame, n_layers: int, position: int, threshold: float) -> set[tuple]:
    """Mark the edges reachable backwards from the final node at `position`; return the route's nodes."""
    strong = np.flatnonzero(edges["importance"].to_numpy() >= threshold)
    cols = {c: edges[c].to_numpy()[strong].tolist() for c in EDGE_COLUMNS[:6]}
    incoming: dict[tuple, list[int]] = {}
    for i, key in enumerate(zip(cols["dst_layer"], cols["dst_pos"], cols["dst_kind"])):
        incoming.setdefault(key, []).append(i)
    start = (n_layers, position, "final")
    seen, stack, on = {start}, [start], []
    while stack:
        node = stack.pop()
        for i in incoming.get(node, []):
            on.append(strong[i])
            src = (cols["src_layer"][i], cols["src_pos"][i], cols["src_kind"][i])
            if src not in seen:
                seen.add(src)
                stack.append(src)
    flags = np.zeros(len(edges), dtype=bool)
    flags[on] = True
    edges["on_route"] = flags
    return seen


def routes(model, prompt: str, answer, *, threshold: float = 0.04, position: int = -1, distractors=None) -> Routes:
    """The information-flow route to `position`'s prediction (Ferrando & Voita 2024), from one forward pass.

    Edge importance is the proximity of each term to the node it adds up to,
    `prox(c_k, y) = max(0, ||y||_1 - ||y - c_k||_1)`, normalised over the node's incoming edges
    (see the module docstring for the graph). The route keeps the edges reachable backwards from
    the final residual at `position` whose importance is at least `threshold`.

    Args:
        model: a loaded model (`tl.load_model`).
        prompt: one prompt.
        answer: the (single-token) answer the DLA of every node is measured toward.
        threshold: least importance of an edge on the route, in (0, 1]; the paper uses 0.04.
        position: the position whose final residual the route explains (default: the last).
        distractors: tokens the answer should beat (default as in `tl.trace`).

    Returns:
        A `Routes` with `.edges`, `.nodes`, `.top(k)`, `.verdict()` and `.plot()`.

    Raises:
        ValueError: a bad threshold or position, several prompts, or a multi-token answer.
    """
    check_model_arg(model, "routes")
    threshold = _check_threshold(threshold)
    if not isinstance(prompt, str):
        raise ValueError("routes() explains one prompt at a time; pass a string.")
    rows = build_rows(model, prompt, answer, distractors)
    if len(rows) != 1:
        raise ValueError(
            f"routes() explains one token; {answer!r} is {len(rows)} tokens. Pass its first token, "
            "or the prompt plus the earlier tokens and the next one."
        )
    row = rows[0]
    P = len(row.tokens)
    position = _check_position(position, P)
    _check_size(model, P)
    n_layers = model.cfg.n_layers
    names = {"ln_final.hook_scale", f"blocks.{n_layers - 1}.hook_resid_post"}
    for layer in range(n_layers):
        names |= {f"blocks.{layer}.{n}" for n in ("hook_resid_pre", "hook_resid_mid", "hook_mlp_out")}
        names |= {f"blocks.{layer}.attn.{n}" for n in ("hook_v", "hook_pattern")}
    with torch.no_grad():
        cache, score = cached_run(model, row.tokens[None].to(model.cfg.device), sorted(names), "route")
        dtype = compute_dtype(cache["ln_final.hook_scale"])
        rivals = list(row.distractors)
        if not rivals:  # the model's strongest competitor: the final position's logits, unembedded
            # in a block as wide as the trace's (`forward.MIN_SCORED`), so that it is the trace's
            rivals = _fill_distractors(rows, score(max(0, P - MIN_SCORED), P)[:, -1].float())[0]
        scale = cache["ln_final.hook_scale"][0].to(dtype)  # [pos, 1]
        u = scaled_directions(model, scale, [row.target] * P, [rivals] * P, "logit_diff")  # [pos, d_model]
        importances, edge_dla, errors = [], [], []
        # Blocks at a time whose head writes `[head, src, d_model]` fit `_BLOCK_ELEMENTS` together.
        per_block = max(1, _BLOCK_ELEMENTS // max(1, model.cfg.n_heads * P * model.cfg.d_model))
        for first in range(0, n_layers, per_block):
            blocks = range(first, min(n_layers, first + per_block))
            importance, term_dla, error = _edge_importances(model, cache, blocks, dtype, P, u)
            importances += list(importance)
            edge_dla += list(term_dla)
            errors += error
        residuals = [
            cache[f"blocks.{layer}.hook_resid_{kind}"][0] for layer in range(n_layers) for kind in ("pre", "mid")
        ]
        residuals.append(cache[f"blocks.{n_layers - 1}.hook_resid_post"][0])
        dla = (torch.stack(residuals).to(dtype) * u[None]).sum(-1).cpu()  # [node level, pos]
    edges = _edge_frame(importances, P, model.cfg.n_heads)
    edges.insert(len(edges.columns) - 1, "dla", torch.cat(edge_dla).double().cpu().numpy())
    seen = _mark_route(edges, n_layers, position, threshold)
    levels = [(layer, kind) for layer in range(n_layers) for kind in ("pre", "mid")] + [(n_layers, "final")]
    node_layer = np.repeat([layer for layer, _ in levels], P)
    node_kind = np.repeat(np.array([kind for _, kind in levels], dtype=object), P)
    node_pos = np.tile(np.arange(P), len(levels))
    nodes = pd.DataFrame(
        {
            "layer": node_layer,
            "pos": node_pos,
            "kind": node_kind,
            "token": np.tile(np.array(list(row.str_tokens), dtype=object), len(levels)),
            "dla": dla.double().numpy().reshape(-1),
            "on_route": [key in seen for key in zip(node_layer.tolist(), node_pos.tolist(), node_kind.tolist())],
        }
    )
    rival_strs = [token_str(model, t) for t in rivals]
    identity = model_identity(model)
    return Routes(
        row_label=row.label,
        str_tokens=list(row.str_tokens),
        position=position,
        threshold=threshold,
        n_layers=n_layers,
        n_heads=model.cfg.n_heads,
        edges=edges,
        nodes=nodes,
        metric_label=metric_phrase("logit_diff", row.target_str, rival_strs),
        reconstruction_error=max(errors),
        answer_str=row.target_str,
        model_name=identity.name,
        weights_fingerprint=identity.fingerprint,
    )
