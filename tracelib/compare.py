"""Two traces side by side: differences (b - a), top-k overlap and rank correlation, per unit.

`compare(a, b)` reads row `row` of each trace's DLA and puts them on one footing: per component,
head and neuron it gives the difference b - a, the Jaccard overlap of the top-k contributors
(positive and negative apart) and the Spearman rank correlation of the attributions. The traces
may come from different models (`tiny-arith` vs `tiny-arith-chat`) as long as the models have the
same shape, so that unit `L2H3` means the same slot in both: unlike every other pairing in
tracelib, this one is cross-model by design, and the result says which it was (`Comparison.models`).

The argument checks that every "use of traces" shares (`check_trace_arg`, `check_row`) live here,
the lowest of those modules.

`align_tokens` matches the positions of two prompts that differ in length (a question alone and
the same question inside a chat template; a prompt with injected tokens), so that nothing is
silently shifted: a position with no counterpart maps to None.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
from jaxtyping import Float
from torch import Tensor

from tracelib import plotting
from tracelib.alignment import align_tokens
from tracelib.formats import check_k, check_row, unit_label
from tracelib.identity import ModelIdentity
from tracelib.stats import jaccard, spearman, top_set
from tracelib.trace import check_trace_arg

COMPARE_UNITS = ("component", "head", "neuron")


def models_sentence(a: ModelIdentity | None, b: ModelIdentity | None) -> str:
    """Whether two results come from one model, in words: "same model: ..." or "two models: ... vs ..."."""
    if a is None or b is None or not a.fingerprint or not b.fingerprint:
        return (
            f"compares traces from {a or 'an unknown model'} and {b or 'an unknown model'} (one model or two: unknown)"
        )
    if a.fingerprint == b.fingerprint:
        return f"same model: {a}"
    other = " (same name, other weights)" if a.name == b.name else ""
    return f"compares traces from two models: {a} vs {b}{other}"


@dataclass(frozen=True)
class Comparison:
    """Row `row` of two traces' DLA side by side, and how they differ.

    Attributes:
        a_label: what the first trace explained (`model: 'prompt' -> 'answer'`).
        b_label: the same for the second.
        metric: the DLA metric both traces used (`"logit"` or `"logit_diff"`).
        k: how many top contributors of each sign the overlaps compare.
        component_labels: `"embed"`, then `"L_attn_out"`, `"L_mlp_out"` per layer.
        a_components: `[component]`, the first trace's DLA by component.
        b_components: `[component]`, the second's.
        a_heads: `[layer, head]`.
        b_heads: `[layer, head]`.
        a_neurons: `[layer, neuron]`.
        b_neurons: `[layer, neuron]`.
        a_str_tokens: the first prompt's tokens.
        b_str_tokens: the second prompt's tokens.
        alignment: for each position of b, the matching position of a or None (`align_tokens`).
        a_model: the model that made trace a (`tl.ModelIdentity`); None where unknown.
        b_model: the same for trace b. They may differ: `compare` is cross-model by design.
    """

    a_label: str
    b_label: str
    metric: str
    k: int
    component_labels: list[str]
    a_components: Float[Tensor, " component"]
    b_components: Float[Tensor, " component"]
    a_heads: Float[Tensor, "layer head"]
    b_heads: Float[Tensor, "layer head"]
    a_neurons: Float[Tensor, "layer neuron"]
    b_neurons: Float[Tensor, "layer neuron"]
    a_str_tokens: list[str]
    b_str_tokens: list[str]
    alignment: list[int | None]
    a_model: ModelIdentity | None = None
    b_model: ModelIdentity | None = None

    @property
    def same_model(self) -> bool | None:
        """Whether both traces come from one model (same weights fingerprint); None where either is unknown."""
        a, b = self.a_model, self.b_model
        if a is None or b is None or not a.fingerprint or not b.fingerprint:
            return None
        return a.fingerprint == b.fingerprint

    @property
    def models(self) -> str:
        """One line on which models made the traces: "same model: ..." or "compares traces from two models: ..."."""
        return models_sentence(self.a_model, self.b_model)

    def __post_init__(self) -> None:
        n = len(self.component_labels)
        pairs = {
            "components": (self.a_components, self.b_components, (n,)),
            "heads": (self.a_heads, self.b_heads, tuple(self.a_heads.shape)),
            "neurons": (self.a_neurons, self.b_neurons, tuple(self.a_neurons.shape)),
        }
        for name, (a, b, shape) in pairs.items():
            if tuple(a.shape) != shape or tuple(b.shape) != shape:
                raise ValueError(
                    f"Comparison.a_{name} and b_{name} must both be {shape}, got {tuple(a.shape)} and {tuple(b.shape)}"
                )
        if self.a_heads.ndim != 2 or self.a_neurons.ndim != 2 or self.a_heads.shape[0] != self.a_neurons.shape[0]:
            raise ValueError("heads must be [layer, head] and neurons [layer, neuron], with the same layers")
        if len(self.alignment) != len(self.b_str_tokens):
            raise ValueError(
                f"alignment needs one entry per position of b ({len(self.b_str_tokens)}), got {len(self.alignment)}"
            )
        check_k(self.k)

    def _flat(self, unit: str) -> tuple[list[str], Tensor, Tensor]:
        """Labels and both traces' values for one unit, flattened in layer-major order."""
        if unit == "component":
            return self.component_labels, self.a_components, self.b_components
        if unit == "head":
            n_layers, n_heads = self.a_heads.shape
            labels = [f"L{layer}H{h}" for layer in range(n_layers) for h in range(n_heads)]
            return labels, self.a_heads.flatten(), self.b_heads.flatten()
        if unit == "neuron":
            n_layers, d_mlp = self.a_neurons.shape
            labels = [f"L{layer}N{n}" for layer in range(n_layers) for n in range(d_mlp)]
            return labels, self.a_neurons.flatten(), self.b_neurons.flatten()
        raise ValueError(f"unit must be one of {COMPARE_UNITS}, got {unit!r}")

    def difference(self, unit: str = "head") -> Tensor:
        """b - a in the unit's own shape: `[component]`, `[layer, head]` or `[layer, neuron]`."""
        if unit == "component":
            return self.b_components - self.a_components
        if unit == "head":
            return self.b_heads - self.a_heads
        if unit == "neuron":
            return self.b_neurons - self.a_neurons
        raise ValueError(f"unit must be one of {COMPARE_UNITS}, got {unit!r}")

    def top_sets(self, unit: str = "head", sign: int = 1) -> tuple[set[str], set[str]]:
        """The top-k contributors of one sign (+1 toward the answer, -1 against) in a and in b."""
        labels, a, b = self._flat(unit)
        return {labels[i] for i in top_set(a, self.k, sign)}, {labels[i] for i in top_set(b, self.k, sign)}

    def jaccard(self, unit: str = "head", sign: int = 1) -> float:
        """Overlap of a's and b's top-k contributors of one sign: 1 = the same units, 0 = none shared."""
        return jaccard(*self.top_sets(unit, sign))

    def spearman(self, unit: str = "head") -> float:
        """Spearman rank correlation of a's and b's attributions over every unit of that kind."""
        _, a, b = self._flat(unit)
        return spearman(a, b)

    def stats(self) -> pd.DataFrame:
        """One line per unit kind: top-k overlap of each sign, rank correlation, largest |b - a|."""
        records = []
        for unit in COMPARE_UNITS:
            records.append(
                {
                    "unit": unit,
                    "k": self.k,
                    "jaccard_positive": self.jaccard(unit, +1),
                    "jaccard_negative": self.jaccard(unit, -1),
                    "spearman": self.spearman(unit),
                    "max_abs_difference": self.difference(unit).abs().max().item(),
                }
            )
        return pd.DataFrame.from_records(records)

    def to_frame(self, unit: str = "head") -> pd.DataFrame:
        """Long form: one line per (trace, unit), with `trace` "a", "b" or "b - a" and the value."""
        labels, a, b = self._flat(unit)
        frames = [
            pd.DataFrame(
                {"trace": name, "label": label, unit: [unit_label(x) for x in labels], "value": values.tolist()}
            )
            for name, label, values in (("a", self.a_label, a), ("b", self.b_label, b), ("b - a", "", b - a))
        ]
        return pd.concat(frames, ignore_index=True)

    def top(self, k: int = 5, unit: str = "head") -> pd.DataFrame:
        """The k units whose attribution changed most (largest |b - a|), signs kept, with a and b."""
        k = check_k(k)
        labels, a, b = self._flat(unit)
        diff = b - a
        order = diff.abs().argsort(descending=True, stable=True)[:k].tolist()
        return pd.DataFrame(
            {
                unit: [unit_label(labels[i]) for i in order],
                "a": a[order].tolist(),
                "b": b[order].tolist(),
                "difference": diff[order].tolist(),
            }
        )

    def aligned_positions(self) -> pd.DataFrame:
        """Each position of b, its token (repr) and its counterpart in a; None where there is none."""
        return pd.DataFrame(
            {
                "b_position": range(len(self.b_str_tokens)),
                "b_token": [repr(t) for t in self.b_str_tokens],
                "a_position": pd.array(self.alignment, dtype="Int64"),
                "a_token": pd.Series(
                    [None if i is None else repr(self.a_str_tokens[i]) for i in self.alignment], dtype=object
                ),
            }
        )

    def plot(self, unit: str = "head", k: int = 10, **layout):
        """a and b side by side on one symmetric RdBu scale (blue toward the answer), plus b - a.

        Heads are three layer x head heatmaps; components are paired bars; neurons are paired bars
        for the `k` neurons that changed most.
        """

        title = f"DLA compared by {unit}: a = {self.a_label}; b = {self.b_label}"
        layout = {"title": title, **layout}
        if unit == "head":
            return plotting.comparison_heatmaps(self.a_heads, self.b_heads, **layout)
        labels, a, b = self._flat(unit)
        if unit == "component":
            labels = [plotting.component_label(label) for label in labels]
        else:
            order = (b - a).abs().argsort(descending=True, stable=True)[: check_k(k)]
            labels, a, b = [labels[i] for i in order.tolist()], a[order], b[order]
        return plotting.comparison_bars(labels, a, b, unit=unit, **layout)

    def __repr__(self) -> str:
        parts = [
            f"{unit} J+ {self.jaccard(unit, 1):.2f} J- {self.jaccard(unit, -1):.2f} "
            f"rho {self.spearman(unit):+.3f} max|b-a| {self.difference(unit).abs().max().item():.3f}"
            for unit in COMPARE_UNITS
        ]
        return (
            f"Comparison({self.metric}, k={self.k}; {self.models}; a = {self.a_label}; b = {self.b_label}; "
            + "; ".join(parts)
            + ")"
        )


def _shape(trace) -> tuple[int, int, int, int]:
    dla = trace.dla
    return dla.heads.shape[0], dla.heads.shape[1], dla.neurons.shape[1], len(dla.component_labels)


def compare(a, b, k: int = 10, row: int = 0) -> Comparison:
    """Compare two traces' DLA unit by unit: b - a, top-k overlap of each sign, rank correlation.

    Unlike `damage_report` and `readable_vs_causal`, `compare` accepts traces of two different
    models on purpose (a base model and its fine-tune); `Comparison.models` and its repr say whether
    the traces came from one model or two.

    Args:
        a: a `Trace` (or a loaded reference, which is one).
        b: another `Trace`, from a model of the same shape (the same model, or e.g. its chat
            fine-tune): the same layers, heads per layer, neurons per layer and components.
        k: how many top contributors of each sign the Jaccard overlaps compare.
        row: which row of each trace to compare (row r of a with row r of b).

    Returns:
        A `Comparison`; `.stats()` holds the overlaps and correlations, `.top(k, unit)` the units
        that changed most, `.plot(unit)` the side-by-side figure.

    Raises:
        TypeError: `a` or `b` is not a `Trace`, or `row` is not an int.
        ValueError: the traces come from differently shaped models, use different DLA metrics, or
            have no row `row`.
    """
    check_trace_arg(a, "compare", "a")
    check_trace_arg(b, "compare", "b")
    k = check_k(k)
    name_a, name_b = a.model_name, b.model_name
    shape_a, shape_b = _shape(a), _shape(b)
    if shape_a != shape_b:

        def describe(name, s):
            return f"{name!r} has {s[0]} layers x {s[1]} heads, {s[2]} neurons per layer, {s[3]} components"

        raise ValueError(
            "Cannot compare traces of differently shaped models, since unit L0H0 would not mean the same slot: "
            f"{describe(name_a, shape_a)}; {describe(name_b, shape_b)}. Compare traces of one model, or of models "
            "of one shape (e.g. 'tiny-arith' and 'tiny-arith-chat')."
        )
    if a.dla.component_labels != b.dla.component_labels:
        raise ValueError(f"The traces' components differ: {a.dla.component_labels} vs {b.dla.component_labels}")
    if a.dla.metric != b.dla.metric:
        raise ValueError(
            f"The traces explain different metrics ({a.dla.metric!r} vs {b.dla.metric!r}); trace both with one metric."
        )
    for name, t in (("a", a), ("b", b)):
        row = check_row(row, len(t.rows), "compare", f"trace {name}")
    ra, rb = a.rows[row], b.rows[row]
    return Comparison(
        a_label=f"{name_a}: {ra.label}",
        b_label=f"{name_b}: {rb.label}",
        metric=a.dla.metric,
        k=k,
        component_labels=list(a.dla.component_labels),
        a_components=a.dla.components[:, row].cpu(),
        b_components=b.dla.components[:, row].cpu(),
        a_heads=a.dla.heads[:, :, row].cpu(),
        b_heads=b.dla.heads[:, :, row].cpu(),
        a_neurons=a.dla.neurons[:, :, row].cpu(),
        b_neurons=b.dla.neurons[:, :, row].cpu(),
        a_str_tokens=list(ra.str_tokens),
        b_str_tokens=list(rb.str_tokens),
        # Token strings, not ids, so models with different tokenizers of one shape still align.
        alignment=align_tokens(ra.str_tokens, rb.str_tokens),
        a_model=a.identity,
        b_model=b.identity,
    )
