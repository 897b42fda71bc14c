"""Heads: who writes the answer, and from which source position.

A head's direct contribution to the answer at the destination (final) position is

    DLA(head) = sum over src of  A[dst, src] * (v[src] @ W_O[head] @ u)

where `A` is the head's attention pattern, `v` its values and `u` the answer direction divided by
the final norm's cached scale. Each term is what the head copied from one source position, measured
on the answer direction, so the terms add up to the head's DLA exactly.

RoPE does not enter this path: rotary embeddings rotate queries and keys only, so they shape `A`
but never the values `v` or `W_O` (the OV circuit). With grouped-query attention (Qwen2.5-1.5B:
12 query heads share 2 KV heads), query head `h` reads KV head `h // (n_heads / n_kv_heads)`.

Value biases: `tl.load_model` keeps each head's value bias `b_V` in its values (the default), so a
head's DLA includes its own bias write `b_V[h] @ W_O[h] @ u`, as the model computes it; the
softmax weights sum to 1, so that write is split over the sources by attention weight and the
sources still add up to the head. With `load_model(..., fold_value_biases=True)`
(TransformerLens's convention) the biases sit in each layer's bias row instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from tracelib import plotting
from tracelib.batching import forward_until
from tracelib.formats import check_k, token_labels
from tracelib.identity import ModelIdentity, ModelRef, check_model_arg, check_same_model, model_from, model_identity
from tracelib.projections import layer_weight

VERDICTS = ("final position", "operand", "elsewhere")


@dataclass(frozen=True)
class HeadSources:
    """One head's DLA at the final position, split by source position.

    Attributes:
        layer, head: which head.
        row_label: the traced row.
        str_tokens: the row's tokens (sources).
        values: contribution of each source position to the answer metric, `[src]`.
        attention: the head's attention from the final position to each source, `[src]`.
        operand_positions: indices of the question's operand tokens.
        metric_label: what the values measure, in words (names the distractors); may be empty.
    """

    layer: int
    head: int
    row_label: str
    str_tokens: list[str]
    values: Float[Tensor, " src"]
    attention: Float[Tensor, " src"]
    operand_positions: list[int]
    metric_label: str = ""

    def __post_init__(self) -> None:
        n = len(self.str_tokens)
        if self.values.shape != (n,) or self.attention.shape != (n,):
            raise ValueError(f"values and attention must be [{n}] (one per source token)")

    @property
    def total(self) -> float:
        return self.values.sum().item()

    def shares(self) -> dict[str, float]:
        """Share of the head's absolute contribution read from the final position, the operands,
        and everywhere else (they sum to 1)."""
        mag = self.values.abs()
        total = mag.sum().item() or 1.0
        final = len(self.str_tokens) - 1
        operands = [p for p in self.operand_positions if p != final]
        rest = [p for p in range(len(self.str_tokens)) if p != final and p not in operands]
        return {
            "final position": mag[final].item() / total,
            "operand": mag[operands].sum().item() / total,
            "elsewhere": mag[rest].sum().item() / total,
        }

    @property
    def verdict(self) -> str:
        """Where the head mainly reads from, judged by its contribution, not its attention."""
        shares = self.shares()
        return max(VERDICTS, key=shares.get)

    def to_frame(self) -> pd.DataFrame:

        return pd.DataFrame(
            {
                "position": range(len(self.str_tokens)),
                "token": token_labels(self.str_tokens),
                "attention": self.attention.tolist(),
                "contribution": self.values.tolist(),
            }
        )

    def top(self, k: int = 5) -> pd.DataFrame:
        k = check_k(k)
        frame = self.to_frame()
        return frame.reindex(frame["contribution"].abs().sort_values(ascending=False).index[:k])

    def plot(self, **layout):

        return plotting.source_bars(self, **layout)

    def __repr__(self) -> str:
        shares = ", ".join(f"{k} {v:.0%}" for k, v in self.shares().items())
        return f"HeadSources(L{self.layer}H{self.head}: DLA {self.total:+.3f}; reads from {self.verdict} ({shares}))"


@dataclass(frozen=True)
class Heads:
    """Every head's DLA and its source decomposition at each row's final position.

    Attributes:
        row_labels: one per row.
        str_tokens: each row's tokens.
        operand_positions: each row's operand token positions.
        values: per-head DLA, `[layer, head, row]` (the same numbers as `trace.dla.heads`).
        sources: per-head, per-source contributions, `[layer, head, src, row]`; zero past a row's end.
        attention: attention from the final position, `[layer, head, src, row]`.
        tokens: each row's token ids, `[pos]`, so that the attention views can recompute the full
            patterns of the heads they show (a full pattern of every head would grow with the
            square of the prompt).
        metric_labels: per row, what the DLA measures in words (names the distractors).
    """

    row_labels: list[str]
    str_tokens: list[list[str]]
    operand_positions: list[list[int]]
    values: Float[Tensor, "layer head row"]
    sources: Float[Tensor, "layer head src row"]
    attention: Float[Tensor, "layer head src row"]
    tokens: list[Int[Tensor, " pos"]]
    metric_labels: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        n_layers, n_heads, n_rows = self.values.shape
        if n_rows != len(self.row_labels) or len(self.str_tokens) != n_rows or len(self.tokens) != n_rows:
            raise ValueError(f"Heads needs {n_rows} rows of labels, str_tokens and tokens")
        for r, (ids, strs) in enumerate(zip(self.tokens, self.str_tokens)):
            if tuple(ids.shape) != (len(strs),):
                raise ValueError(
                    f"row {r}: tokens must be [{len(strs)}] (one id per str_token), got {tuple(ids.shape)}"
                )
        if self.sources.shape[:2] != (n_layers, n_heads) or self.sources.shape != self.attention.shape:
            raise ValueError("sources and attention must be [layer, head, src, row] like values")

    def top(self, k: int = 5, row: int = 0) -> pd.DataFrame:
        """The k heads with the largest DLA by absolute value, signs kept, with where they read from."""
        flat = self.values[:, :, row].flatten()
        order = flat.abs().argsort(descending=True)[: check_k(k)].tolist()
        n_heads = self.values.shape[1]
        records = []
        for i in order:
            src = self.source(i // n_heads, i % n_heads, row)
            records.append(dict(head=f"L{i // n_heads}H{i % n_heads}", value=flat[i].item(), reads_from=src.verdict))
        return pd.DataFrame.from_records(records)

    def strongest(self, row: int = 0) -> tuple[tuple[int, int], tuple[int, int]]:
        """The (layer, head) of the most positive and of the most negative contributor."""
        grid = self.values[:, :, row]
        n_heads = grid.shape[1]
        pos, neg = int(grid.argmax()), int(grid.argmin())
        return (pos // n_heads, pos % n_heads), (neg // n_heads, neg % n_heads)

    def source(self, layer: int, head: int, row: int = 0) -> HeadSources:
        """One head's contribution split by source position."""
        n = len(self.str_tokens[row])
        return HeadSources(
            layer=layer,
            head=head,
            row_label=self.row_labels[row],
            str_tokens=self.str_tokens[row],
            values=self.sources[layer, head, :n, row],
            attention=self.attention[layer, head, :n, row],
            operand_positions=self.operand_positions[row],
            metric_label=self.metric_labels[row] if self.metric_labels else "",
        )

    def to_frame(self) -> pd.DataFrame:
        """Long form: one line per (row, layer, head) with its DLA and where it reads from."""
        records = []
        for r, label in enumerate(self.row_labels):
            for layer in range(self.values.shape[0]):
                for head in range(self.values.shape[1]):
                    src = self.source(layer, head, r)
                    records.append(
                        dict(
                            row=r,
                            label=label,
                            layer=layer,
                            head=head,
                            value=self.values[layer, head, r].item(),
                            reads_from=src.verdict,
                        )
                    )
        return pd.DataFrame.from_records(records)

    def plot(self, row: int = 0, **layout):
        """The layer x head DLA grid (RdBu, centred at 0)."""

        metric = f"<br><sub>{self.metric_labels[row]}</sub>" if self.metric_labels else ""
        return plotting.head_heatmap(
            self.values[:, :, row], **{"title": f"DLA by head: {self.row_labels[row]}{metric}", **layout}
        )

    def attention_view(self, heads: list[tuple[int, int]] | None = None, row: int = 0, model=None):
        """circuitsvis attention patterns for the chosen (layer, head) pairs (default: the top 4).

        The patterns are recomputed (`attention_patterns`, one forward pass of the row), for the
        shown heads only.

        Args:
            heads: (layer, head) pairs; default the 4 with the largest DLA.
            row: which traced row.
            model: the model to recompute with. Default: the model the trace was made with (or
                that `tl.load_reference(path, model)` was given), if it still exists.
        """
        import circuitsvis as cv

        if model is None:
            model = model_from(
                getattr(self, "_model_ref", None),
                "attention_view() recomputes the patterns it shows, so it needs the model",
                "Pass it: attention_view(model=model).",
            )
        else:
            check_model_arg(model, "attention_view")
            check_same_model(
                getattr(self, "_made_by", None),
                model_identity(model),
                "These heads",
                "the model passed to attention_view()",
            )
        if heads is None:
            heads = [tuple(int(x) for x in h[1:].split("H")) for h in self.top(4, row)["head"]]
        pattern = attention_patterns(model, self.tokens[row], heads)
        return cv.attention.attention_heads(
            attention=pattern,
            tokens=self.str_tokens[row],
            attention_head_names=[f"L{layer}H{head}" for layer, head in heads],
        )

    def remember_model(self, model) -> None:
        """Keep a weak reference to `model`, for `attention_view` to recompute patterns with.

        Weak, so a result never keeps a model alive; it is not a field, so it is never saved.
        """
        ref = ModelRef(model)
        object.__setattr__(self, "_model_ref", ref)
        self.remember_identity(ref.identity)

    def remember_identity(self, identity: ModelIdentity) -> None:
        """Record which model made these heads, so `attention_view(model=)` refuses another one."""
        object.__setattr__(self, "_made_by", identity)

    def __getstate__(self) -> dict:
        # A weak reference cannot be pickled or deep-copied; a copy simply has no model.
        state = dict(self.__dict__)
        state.pop("_model_ref", None)
        return state

    def __repr__(self) -> str:
        top = self.top(3)
        parts = ", ".join(f"{h} {v:+.3f} ({s})" for h, v, s in zip(top["head"], top["value"], top["reads_from"]))
        return f"Heads({self.values.shape[0]}x{self.values.shape[1]}, {len(self.row_labels)} row(s); top: {parts})"


def operand_positions(str_tokens: list[str]) -> list[int]:
    """Positions of the question's operands: tokens that hold a digit, before the final position."""
    return [i for i, tok in enumerate(str_tokens[:-1]) if any(ch.isdigit() for ch in tok)]


def compute_heads(model, fwd, u: Float[Tensor, "row d_model"], rows, metric_labels: list[str] | None = None) -> Heads:
    """Source decomposition of every head at each row's final position, from the trace's cache.

    Projects first: `W_O[h] @ u` is `[head, d_head, row]`, then each source's value is dotted with
    it, so the cost is that of one more small matmul per layer, and no `[head, src, d_model]` exists.
    """

    cfg = model.cfg
    dtype = u.dtype
    n_heads = cfg.n_heads
    n_kv = getattr(cfg, "n_key_value_heads", None) or n_heads
    kv_of_head = torch.arange(n_heads, device=u.device) // (n_heads // n_kv)
    sources, attention = [], []
    for layer in range(cfg.n_layers):
        W_O_u = torch.einsum("hem,rm->rhe", layer_weight(model, "attn.W_O", layer).to(dtype), u)  # [row, head, d_head]
        v = fwd.full[f"blocks.{layer}.attn.hook_v"].to(dtype)  # [row, src, kv_head, d_head]
        v = v[:, :, kv_of_head]  # GQA: each query head reads its KV head
        # The trace keeps only each row's final pattern row: [row, head, 1, src].
        pattern = fwd.final[f"blocks.{layer}.attn.hook_pattern"][:, :, 0].to(dtype)  # [row, head, src]
        per_src = torch.einsum("rshe,rhe->rhs", v, W_O_u)  # [row, head, src]
        sources.append((pattern * per_src).permute(1, 2, 0))
        attention.append(pattern.permute(1, 2, 0))
    sources_t = torch.stack(sources).cpu()
    str_tokens = [row.str_tokens for row in rows]
    heads = Heads(
        row_labels=[row.label for row in rows],
        str_tokens=str_tokens,
        operand_positions=[operand_positions(t) for t in str_tokens],
        values=sources_t.sum(2),
        sources=sources_t,
        attention=torch.stack(attention).cpu(),
        tokens=[row.tokens.detach().cpu().clone() for row in rows],
        metric_labels=list(metric_labels or []),
    )
    heads.remember_model(model)
    return heads


def attention_patterns(
    model, tokens: Int[Tensor, " pos"], heads: list[tuple[int, int]]
) -> Float[Tensor, "head dst src"]:
    """The full attention patterns of only the given (layer, head) pairs, for one prompt.

    One forward pass with a hook on those layers' patterns that copies out the requested heads at
    once, so no layer's full `[head, dst, src]` outlives its hook, and the pass stops after the
    last layer needed.

    Args:
        model: a loaded model.
        tokens: the prompt's token ids, `[pos]` (`trace.heads.tokens[row]`, or `row.tokens`).
        heads: (layer, head) pairs, in the order wanted.

    Returns:
        `[len(heads), pos, pos]`: each head's pattern, destination by source, on the CPU.
    """
    heads = [(int(layer), int(head)) for layer, head in heads]
    if not heads:
        raise ValueError("attention_patterns() needs at least one (layer, head) pair.")
    for layer, head in heads:
        if not (0 <= layer < model.cfg.n_layers and 0 <= head < model.cfg.n_heads):
            raise ValueError(
                f"No head L{layer}H{head}: this model has {model.cfg.n_layers} layers of {model.cfg.n_heads} heads."
            )
    tokens = torch.as_tensor(tokens).reshape(1, -1)
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)
    points: dict[str, int] = {}
    hook_dict = model.hook_dict  # the bridge rebuilds it on every read
    for layer in by_layer:
        point = hook_dict.get(f"blocks.{layer}.attn.hook_pattern")
        if point is None:
            raise RuntimeError(f"This model has no hook blocks.{layer}.attn.hook_pattern, so patterns cannot be read.")
        points[point.name] = layer
    last = max(by_layer)
    got: dict[int, Tensor] = {}

    def keep(act: Tensor, hook) -> None:
        layer = points[hook.name]
        # Advanced indexing copies the wanted heads, so the full pattern is not kept alive.
        got[layer] = act[0, by_layer[layer]].detach().cpu().clone()

    last_point = next(name for name, layer in points.items() if layer == last)
    forward_until(model, tokens.to(model.cfg.device), [(name, keep) for name in points], last_point, return_type=None)
    missing = set(by_layer) - set(got)
    if missing:
        raise RuntimeError(f"The pattern hooks of layers {sorted(missing)} did not fire.")
    seen = {layer: 0 for layer in by_layer}
    out = []
    for layer, _ in heads:
        out.append(got[layer][seen[layer]])
        seen[layer] += 1
    return torch.stack(out)
