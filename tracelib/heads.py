"""Heads: who writes the answer, and from which source position.

A head's direct contribution to the answer at the destination (final) position is

    DLA(head) = sum over src of  A[dst, src] * (v[src] @ W_O[head] @ u)

where `A` is the head's attention pattern, `v` its values and `u` the answer direction divided by
the final norm's cached scale. Each term is what the head copied from one source position, measured
on the answer direction, so the terms add up to the head's DLA exactly.

RoPE does not enter this path: rotary embeddings rotate queries and keys only, so they shape `A`
but never the values `v` or `W_O` (the OV circuit). With grouped-query attention (Qwen2.5-1.5B:
12 query heads share 2 KV heads), query head `h` reads KV head `h // (n_heads / n_kv_heads)`.
Compatibility mode folds the value biases `b_V` into the output bias `b_O` (the softmax weights sum
to 1), so per head there is no bias term left: it sits in each layer's bias remainder, kept apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from tracelib.margin import check_k

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
    """

    layer: int
    head: int
    row_label: str
    str_tokens: list[str]
    values: Float[Tensor, " src"]
    attention: Float[Tensor, " src"]
    operand_positions: list[int]

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
        from tracelib.plotting import token_labels

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
        from tracelib import plotting

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
        patterns: full attention patterns of every head, one `[layer, head, dst, src]` per row, for
            the attention views.
    """

    row_labels: list[str]
    str_tokens: list[list[str]]
    operand_positions: list[list[int]]
    values: Float[Tensor, "layer head row"]
    sources: Float[Tensor, "layer head src row"]
    attention: Float[Tensor, "layer head src row"]
    patterns: list[Float[Tensor, "layer head dst src"]]

    def __post_init__(self) -> None:
        n_layers, n_heads, n_rows = self.values.shape
        if n_rows != len(self.row_labels) or len(self.str_tokens) != n_rows or len(self.patterns) != n_rows:
            raise ValueError(f"Heads needs {n_rows} rows of labels, tokens and patterns")
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
        from tracelib import plotting

        return plotting.head_heatmap(
            self.values[:, :, row], **{"title": f"DLA by head: {self.row_labels[row]}", **layout}
        )

    def attention_view(self, heads: list[tuple[int, int]] | None = None, row: int = 0):
        """circuitsvis attention patterns for the chosen (layer, head) pairs (default: the top 4)."""
        import circuitsvis as cv

        if heads is None:
            heads = [tuple(int(x) for x in h[1:].split("H")) for h in self.top(4, row)["head"]]
        pattern = torch.stack([self.patterns[row][layer, head] for layer, head in heads])
        return cv.attention.attention_heads(
            attention=pattern,
            tokens=self.str_tokens[row],
            attention_head_names=[f"L{layer}H{head}" for layer, head in heads],
        )

    def __repr__(self) -> str:
        top = self.top(3)
        parts = ", ".join(f"{h} {v:+.3f} ({s})" for h, v, s in zip(top["head"], top["value"], top["reads_from"]))
        return f"Heads({self.values.shape[0]}x{self.values.shape[1]}, {len(self.row_labels)} row(s); top: {parts})"


def operand_positions(str_tokens: list[str]) -> list[int]:
    """Positions of the question's operands: tokens that hold a digit, before the final position."""
    return [i for i, tok in enumerate(str_tokens[:-1]) if any(ch.isdigit() for ch in tok)]


def compute_heads(model, fwd, u: Float[Tensor, "row d_model"], rows) -> Heads:
    """Source decomposition of every head at each row's final position, from the trace's cache.

    Projects first: `W_O[h] @ u` is `[head, d_head, row]`, then each source's value is dotted with
    it, so the cost is that of one more small matmul per layer, and no `[head, src, d_model]` exists.
    """
    from tracelib.attribution import layer_weight

    cfg = model.cfg
    dtype = u.dtype
    n_heads = cfg.n_heads
    n_kv = getattr(cfg, "n_key_value_heads", None) or n_heads
    kv_of_head = torch.arange(n_heads, device=u.device) // (n_heads // n_kv)
    batch = torch.arange(len(rows), device=u.device)
    final = (fwd.lengths - 1).to(u.device)
    sources, attention = [], []
    for layer in range(cfg.n_layers):
        W_O_u = torch.einsum("hem,rm->rhe", layer_weight(model, "attn.W_O", layer).to(dtype), u)  # [row, head, d_head]
        v = fwd.full[f"blocks.{layer}.attn.hook_v"].to(dtype)  # [row, src, kv_head, d_head]
        v = v[:, :, kv_of_head]  # GQA: each query head reads its KV head
        pattern = fwd.full[f"blocks.{layer}.attn.hook_pattern"][batch, :, final].to(dtype)  # [row, head, src]
        per_src = torch.einsum("rshe,rhe->rhs", v, W_O_u)  # [row, head, src]
        sources.append((pattern * per_src).permute(1, 2, 0))
        attention.append(pattern.permute(1, 2, 0))
    sources_t = torch.stack(sources).cpu()
    str_tokens = [row.str_tokens for row in rows]
    return Heads(
        row_labels=[row.label for row in rows],
        str_tokens=str_tokens,
        operand_positions=[operand_positions(t) for t in str_tokens],
        values=sources_t.sum(2),
        sources=sources_t,
        attention=torch.stack(attention).cpu(),
        patterns=[
            torch.stack(
                [fwd.full[f"blocks.{layer}.attn.hook_pattern"][r, :, :n, :n] for layer in range(cfg.n_layers)]
            ).cpu()
            for r, n in enumerate(fwd.lengths.tolist())
        ],
    )
