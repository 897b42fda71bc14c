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
from tracelib.formats import check_k, fmt_value, metric_phrase, token_labels
from tracelib.identity import check_model_arg
from tracelib.plotting.routes import routes_figure
from tracelib.projections import compute_dtype, layer_weight, scaled_directions
from tracelib.rows import _fill_distractors, build_rows

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
    "on_route",
]
NODE_COLUMNS = ["layer", "pos", "kind", "token", "dla", "on_route"]
VERDICTS = ("copied", "computed in place", "assembled")

# "copied": one earlier position carries at least this share of the route's head importance
# into the final column (read from earlier positions); below it, several positions assemble it.
COPY_SHARE = 0.6

# Elements of the largest `[dst, head, src, d_model]` block of head terms held at once.
_BLOCK_ELEMENTS = 2**24


@dataclass(frozen=True, eq=False)
class Routes:
    """The information-flow graph of one prediction, and the route that carries it.

    Attributes:
        row_label: the prompt and answer explained.
        str_tokens: the prompt's tokens.
        position: the position whose final residual the route explains (non-negative).
        threshold: the least importance an edge needs to be on the route.
        n_layers, n_heads: the model's shape.
        edges: one line per edge (see `EDGE_COLUMNS`): its source and destination nodes, `via`
            ("head", "mlp" or "residual"), the head for head edges (None otherwise), its importance
            and whether it is on the route.
        nodes: one line per node (see `NODE_COLUMNS`): layer, position, kind ("pre", "mid",
            "final"; the final node's layer is `n_layers`), token, DLA and whether it is on the route.
        metric_label: what the DLA measures, in words (names the distractors).
        reconstruction_error: the largest `|pre + sum of head terms + b_O - mid|` over the nodes,
            relative to the largest `|mid|`: how exactly the head terms add up to the residual.
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

    def verdict(self) -> tuple[str, str]:
        """How the route brings information to the position: (verdict, one-line reason).

        From the route's head edges into the position's own column (its `mid` nodes), summed by
        source position (`head_sources`), leaving out heads that read the position itself:

        - "computed in place": none reads an earlier position; the route never leaves the column
          (residual and MLP edges, and heads attending to the position itself);
        - "copied": one earlier position carries at least `COPY_SHARE` (60%) of that importance;
        - "assembled": otherwise, several earlier positions share it.
        """
        sources = self.head_sources()
        earlier = sources.drop(self.position, errors="ignore")
        labels = token_labels(self.str_tokens)
        total = float(earlier.sum())
        if earlier.empty or total <= 0:
            return "computed in place", (
                f"the route into {labels[self.position]} never leaves its position "
                "(residual, MLP and self-reading heads)"
            )
        share = float(earlier.iloc[0]) / total
        top = labels[int(earlier.index[0])]
        if share >= COPY_SHARE:
            heads = self._heads_from(int(earlier.index[0]))
            return (
                "copied",
                f"{top} carries {share:.0%} of the route's head importance from earlier positions ({heads})",
            )
        shown = ", ".join(f"{labels[int(p)]} {float(v) / total:.0%}" for p, v in earlier.head(4).items())
        return "assembled", f"{len(earlier)} earlier positions share the route's head importance ({shown})"

    def _heads_from(self, src_pos: int) -> str:
        route = self.route
        into = route[(route["via"] == "head") & (route["dst_pos"] == self.position) & (route["src_pos"] == src_pos)]
        return ", ".join(f"L{int(layer)}H{int(h)}" for layer, h in zip(into["dst_layer"], into["head"]))

    def plot(self, **layout):
        """The route: positions across (token labels), layers up; edge width by importance, nodes
        coloured by DLA (blue pushes toward the answer, red against it)."""
        metric = f"<br><sub>{self.metric_label}</sub>" if self.metric_label else ""
        title = f"Information-flow route: {self.row_label} at {token_labels(self.str_tokens)[self.position]}{metric}"
        return routes_figure(self.nodes, self.route, self.str_tokens, self.n_layers, **{"title": title, **layout})

    def __repr__(self) -> str:
        verdict, _ = self.verdict()
        n_route = int(self.edges["on_route"].sum())
        return (
            f"Routes({self.row_label} at {token_labels(self.str_tokens)[self.position]}: "
            f"{n_route} edges on the route (threshold {self.threshold:.3f}), "
            f"final DLA {fmt_value(self.final_dla)}; {verdict})"
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
    return torch.einsum("she,hem->hsm", v, W_O)


def _check_threshold(threshold) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"threshold must be a number in (0, 1], got {threshold!r}")
    value = float(threshold)
    if not (math.isfinite(value) and 0 < value <= 1):
        raise ValueError(
            f"threshold must be in (0, 1] (an edge's importance is a share of its node), got {threshold!r}"
        )
    return value


def _check_position(position, n: int) -> int:
    if isinstance(position, bool) or not hasattr(type(position), "__index__"):
        raise TypeError(f"position must be an integer, got {position!r}")
    value = int(position)
    if not -n <= value < n:
        raise ValueError(f"position {value} is outside the prompt's {n} tokens (use -{n} .. {n - 1})")
    return value % n


def _normalise(prox: Tensor) -> Tensor:
    """Proximities into importances along the last axis (all zero where every proximity is)."""
    total = prox.sum(-1, keepdim=True)
    return torch.where(total > 0, prox / total.clamp_min(torch.finfo(prox.dtype).tiny), torch.zeros_like(prox))


def _block_edges(model, cache, layer: int, dtype, P: int) -> tuple[dict, float]:
    """The edges into one block's `mid` nodes and the next `pre` (or `final`) nodes, with importances."""
    n_heads = model.cfg.n_heads
    last = layer == model.cfg.n_layers - 1
    pre = cache[f"blocks.{layer}.hook_resid_pre"][0].to(dtype)
    mid = cache[f"blocks.{layer}.hook_resid_mid"][0].to(dtype)
    nxt = cache[f"blocks.{layer}.hook_resid_post" if last else f"blocks.{layer + 1}.hook_resid_pre"][0].to(dtype)
    mlp = cache[f"blocks.{layer}.hook_mlp_out"][0].to(dtype)
    pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0].to(dtype)  # [head, dst, src]
    writes = head_writes(model, cache, layer, dtype)  # [head, src, d_model]
    b_O = layer_weight(model, "attn.b_O", layer)
    b_O = torch.zeros_like(mid[0]) if b_O is None else b_O.to(dtype)

    head_prox = torch.zeros(P, n_heads, P, dtype=dtype, device=mid.device)  # [dst, head, src]
    step = max(1, _BLOCK_ELEMENTS // max(1, n_heads * P * mid.shape[-1]))
    for start in range(0, P, step):
        stop = min(P, start + step)
        terms = pattern[:, start:stop].transpose(0, 1)[..., None] * writes[None]  # [dst, head, src, d_model]
        head_prox[start:stop] = proximity(mid[start:stop, None, None], terms)
        del terms
    res_prox = proximity(mid, pre)  # [dst]
    attn_sum = torch.einsum("hds,hsm->dm", pattern, writes)
    error = ((pre + attn_sum + b_O - mid).abs().max() / mid.abs().max().clamp_min(1e-30)).item()

    causal = torch.ones(P, P, dtype=torch.bool, device=mid.device).tril()  # [dst, src]: src <= dst
    prox = torch.cat([head_prox.reshape(P, -1), res_prox[:, None]], dim=1)
    imp = _normalise(prox)
    head_imp = imp[:, :-1].reshape(P, n_heads, P).cpu()
    dst, h, src = torch.nonzero(causal.cpu()[:, None, :].expand(P, n_heads, P), as_tuple=True)
    mlp_imp = _normalise(torch.stack([proximity(nxt, mlp), proximity(nxt, mid)], dim=-1)).cpu()
    positions = torch.arange(P)
    kind_next = "final" if last else "pre"
    frames = [
        dict(src_layer=layer, src_pos=src, src_kind="pre", dst_layer=layer, dst_pos=dst, dst_kind="mid",
             via="head", head=h, importance=head_imp[dst, h, src]),
        dict(src_layer=layer, src_pos=positions, src_kind="pre", dst_layer=layer, dst_pos=positions,
             dst_kind="mid", via="residual", head=None, importance=imp[:, -1].cpu()),
        dict(src_layer=layer, src_pos=positions, src_kind="mid", dst_layer=layer + 1, dst_pos=positions,
             dst_kind=kind_next, via="mlp", head=None, importance=mlp_imp[:, 0]),
        dict(src_layer=layer, src_pos=positions, src_kind="mid", dst_layer=layer + 1, dst_pos=positions,
             dst_kind=kind_next, via="residual", head=None, importance=mlp_imp[:, 1]),
    ]  # fmt: skip
    return frames, error


def _edge_frame(parts: list[dict]) -> pd.DataFrame:
    frames = []
    for part in parts:
        n = len(part["importance"])
        data = {}
        for col in EDGE_COLUMNS[:-1]:
            value = part[col]
            if isinstance(value, Tensor):
                value = value.double().numpy() if col == "importance" else value.numpy().astype(np.int64)
            elif value is None:
                value = [None] * n
            else:
                value = [value] * n
            data[col] = value
        frames.append(pd.DataFrame(data))
    edges = pd.concat(frames, ignore_index=True)
    edges["head"] = pd.Series(
        [int(h) if v == "head" else None for h, v in zip(edges["head"], edges["via"])], dtype=object
    )
    edges["on_route"] = False
    return edges


def _mark_route(edges: pd.DataFrame, n_layers: int, position: int, threshold: float) -> set[tuple]:
    """Mark the edges reachable backwards from the final node at `position`; return the route's nodes."""
    strong = edges[edges["importance"] >= threshold]
    incoming: dict[tuple, list[int]] = {}
    for idx, key in zip(strong.index, zip(strong["dst_layer"], strong["dst_pos"], strong["dst_kind"])):
        incoming.setdefault(key, []).append(idx)
    start = (n_layers, position, "final")
    seen, stack, on = {start}, [start], []
    while stack:
        node = stack.pop()
        for idx in incoming.get(node, []):
            on.append(idx)
            src = (int(edges.at[idx, "src_layer"]), int(edges.at[idx, "src_pos"]), edges.at[idx, "src_kind"])
            if src not in seen:
                seen.add(src)
                stack.append(src)
    edges.loc[on, "on_route"] = True
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
    n_layers = model.cfg.n_layers
    names = {"ln_final.hook_scale", f"blocks.{n_layers - 1}.hook_resid_post"}
    for layer in range(n_layers):
        names |= {f"blocks.{layer}.{n}" for n in ("hook_resid_pre", "hook_resid_mid", "hook_mlp_out")}
        names |= {f"blocks.{layer}.attn.{n}" for n in ("hook_v", "hook_pattern")}
    with torch.no_grad():
        logits, cache = model.run_with_cache(row.tokens[None].to(model.cfg.device), names_filter=lambda n: n in names)
        dtype = compute_dtype(logits)
        rivals = _fill_distractors(rows, logits[:, -1].float())[0]
        parts, errors = [], []
        for layer in range(n_layers):
            frames, error = _block_edges(model, cache, layer, dtype, P)
            parts += frames
            errors.append(error)
        scale = cache["ln_final.hook_scale"][0].to(dtype)  # [pos, 1]
        u = scaled_directions(model, scale, [row.target] * P, [rivals] * P, "logit_diff")  # [pos, d_model]
        residuals = [
            cache[f"blocks.{layer}.hook_resid_{kind}"][0] for layer in range(n_layers) for kind in ("pre", "mid")
        ]
        residuals.append(cache[f"blocks.{n_layers - 1}.hook_resid_post"][0])
        dla = (torch.stack(residuals).to(dtype) * u[None]).sum(-1).cpu()  # [node level, pos]
    edges = _edge_frame(parts)
    seen = _mark_route(edges, n_layers, position, threshold)
    levels = [(layer, kind) for layer in range(n_layers) for kind in ("pre", "mid")] + [(n_layers, "final")]
    nodes = pd.DataFrame(
        [
            dict(layer=layer, pos=p, kind=kind, token=row.str_tokens[p], dla=dla[k, p].item(),
                 on_route=(layer, p, kind) in seen)
            for k, (layer, kind) in enumerate(levels)
            for p in range(P)
        ]
    )  # fmt: skip
    rival_strs = [token_str(model, t) for t in rivals]
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
    )
