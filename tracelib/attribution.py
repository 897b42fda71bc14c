"""Direct logit attribution (DLA) by component, layer, head and neuron, with its reconstruction.

The final residual stream is a sum of what each component wrote: the embedding, every attention
layer (a sum of heads plus the output bias) and every MLP (a sum of neurons plus its bias). The
answer's logit reads it through the final norm and the unembedding, so with the norm's scale frozen
at its cached value the logit is a sum too:

    logit - b_U[answer] = sum over components of (component / scale) . W_U[:, answer]

Heads and neurons are attributed by **projecting onto the answer direction first** and expanding
second: `z . (W_O @ u)` and `post * (W_out @ u)`, where `u` is the direction divided by the scale.
No `[components, d_model]` stack of heads or neurons is ever built.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from tracelib import plotting
from tracelib.formats import TracelibWarning, check_k, check_metric, fmt_value, unit_label
from tracelib.models import value_bias_convention
from tracelib.projections import _bias, compute_dtype, layer_weight, scaled_directions

UNITS = ("component", "layer", "head", "neuron")
# How far the reconstruction may be off, relative to max(1, |actual|), before a warning; keyed by
# the precision the model's logits are really computed in (`logit_precision`). Measured on the
# bundled, GPT-2- and Qwen2-shaped test models the residual is ~1e-16 relative in fp64, ~4e-7 in fp32,
# ~5e-4 in fp16 and ~3e-3 in bf16: each tolerance leaves a wide margin for deeper models.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


class ReconstructionWarning(TracelibWarning):
    """The attributions do not add up to the model's own logit within the dtype's tolerance."""


@dataclass(frozen=True)
class Reconstruction:
    """Components summed, the `b_U` term, the model's actual value, and what is left over, `[row]`."""

    attributed: Float[Tensor, " row"]
    bias: Float[Tensor, " row"]
    actual: Float[Tensor, " row"]
    tolerance: float

    @property
    def residual(self) -> Float[Tensor, " row"]:
        return self.actual - self.attributed - self.bias

    @property
    def finite(self) -> bool:
        """Whether every term is a number: an overflowed logit (inf) would otherwise pass the check."""
        return all(bool(t.isfinite().all()) for t in (self.attributed, self.bias, self.actual))

    @property
    def ok(self) -> bool:
        """Everything is finite and the residual is within the tolerance, relative to max(1, |actual|)."""
        if not self.finite:
            return False
        limit = self.tolerance * self.actual.abs().clamp(min=1.0)
        return bool((self.residual.abs() <= limit).all())

    def to_dict(self, row: int = 0) -> dict[str, float]:
        return {
            "attributed": self.attributed[row].item(),
            "bias": self.bias[row].item(),
            "actual": self.actual[row].item(),
            "residual": self.residual[row].item(),
        }

    def __repr__(self) -> str:
        d = self.to_dict(0)
        return (
            f"Reconstruction(attributed {d['attributed']:+.3f} + b_U {d['bias']:+.3f} = "
            f"{d['attributed'] + d['bias']:+.3f}; actual {d['actual']:+.3f}; residual {d['residual']:+.2e})"
        )


@dataclass(frozen=True)
class Attribution:
    """DLA of one metric (the answer's logit difference to its distractors, or its raw logit) for each row.

    Attributes:
        metric: `"logit_diff"` (the answer against its distractors) or `"logit"` (the raw logit,
            which also counts what lifts every candidate alike).
        row_labels: one label per row.
        component_labels: `"embed"` (and `"pos_embed"`), then `"L_attn_out"`, `"L_mlp_out"` per layer.
        components: `[component, row]`; sums to the metric minus its `b_U` term.
        heads: `[layer, head, row]`; each layer's heads plus `head_bias` sum to its `attn_out`. With
            `value_biases="heads"` a head's value includes its own value-bias write
            (`b_V[h] @ W_O[h]`), as the model computes the head's output.
        head_bias: `[layer, row]`, the attention output bias: the true `b_O` with
            `value_biases="heads"`; with `"folded"` (TransformerLens's convention) every head's
            value-bias write is added in.
        neurons: `[layer, neuron, row]`; each layer's neurons plus `neuron_bias` sum to `mlp_out`.
        neuron_bias: `[layer, row]`, the MLP output bias (zero where the MLP has none).
        reconstruction: the check that everything adds up to the model's own value.
        value_biases: `"heads"` (each head owns its value bias, `tl.load_model`'s default) or
            `"folded"` (folded into the layer's bias row, `load_model(..., fold_value_biases=True)`).
        metric_labels: per row, what the metric measures in words, distractors named
            (`formats.metric_phrase`); figure titles use it.
    """

    metric: str
    row_labels: list[str]
    component_labels: list[str]
    components: Float[Tensor, "component row"]
    heads: Float[Tensor, "layer head row"]
    head_bias: Float[Tensor, "layer row"]
    neurons: Float[Tensor, "layer neuron row"]
    neuron_bias: Float[Tensor, "layer row"]
    reconstruction: Reconstruction
    value_biases: str = "folded"
    metric_labels: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        n_rows, n_layers = len(self.row_labels), self.heads.shape[0]
        checks = {
            "components": (len(self.component_labels), n_rows),
            "head_bias": (n_layers, n_rows),
            "neuron_bias": (n_layers, n_rows),
        }
        for name, shape in checks.items():
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(f"Attribution.{name} must be {shape}, got {tuple(getattr(self, name).shape)}")
        if self.heads.shape[2] != n_rows or self.neurons.shape[::2] != (n_layers, n_rows):
            raise ValueError("heads and neurons must be [layer, unit, row] with the same layers and rows")
        check_metric(self.metric)
        if self.value_biases not in ("heads", "folded"):
            raise ValueError(f"value_biases must be 'heads' or 'folded', got {self.value_biases!r}")
        if self.metric_labels and len(self.metric_labels) != n_rows:
            raise ValueError(f"metric_labels must have one entry per row ({n_rows})")

    def metric_label(self, row: int = 0) -> str:
        """What this row's metric measures, in words (names the distractors)."""
        if self.metric_labels:
            return self.metric_labels[row]
        return "logit difference against the distractors" if self.metric == "logit_diff" else "raw logit"

    @property
    def n_layers(self) -> int:
        return self.heads.shape[0]

    def by_layer(self) -> tuple[list[str], Float[Tensor, "layer row"]]:
        """Embedding terms, then each layer's attention + MLP together."""
        n_embed = len(self.component_labels) - 2 * self.n_layers
        embed = self.components[:n_embed].sum(0, keepdim=True)
        layers = self.components[n_embed:].reshape(self.n_layers, 2, -1).sum(1)
        return ["embed"] + [str(layer) for layer in range(self.n_layers)], torch.cat([embed, layers])

    def _unit(self, unit: str, row: int) -> tuple[Sequence[str], Tensor]:
        if unit == "component":
            return [unit_label(label) for label in self.component_labels], self.components[:, row]
        if unit == "layer":
            labels, values = self.by_layer()
            return [unit_label(label) for label in labels], values[:, row]
        if unit == "head":
            labels = _GridLabels(self.n_layers, self.heads.shape[1], "H", "bias")
            return labels, torch.cat([self.heads[:, :, row].flatten(), self.head_bias[:, row]])
        if unit == "neuron":
            labels = _GridLabels(self.n_layers, self.neurons.shape[1], "N", "b_out")
            return labels, torch.cat([self.neurons[:, :, row].flatten(), self.neuron_bias[:, row]])
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")

    def to_frame(self, unit: str = "component") -> pd.DataFrame:
        """Long form: one line per (row, unit), with the value and its share of the total."""
        frames = []
        for r, row_label in enumerate(self.row_labels):
            labels, values = self._unit(unit, r)
            frames.append(pd.DataFrame({"row": r, "label": row_label, unit: list(labels), "value": values.tolist()}))
        return pd.concat(frames, ignore_index=True)

    def top(self, k: int = 5, unit: str = "component", row: int = 0) -> pd.DataFrame:
        """The k largest attributions by absolute value, signs kept."""
        k = check_k(k)
        labels, values = self._unit(unit, row)
        order = values.abs().topk(min(k, len(values))).indices.tolist()
        return pd.DataFrame({unit: [labels[i] for i in order], "value": values[order].tolist()})

    def top_neurons(self, k: int = 3, row: int = 0) -> pd.DataFrame:
        """Per layer, the k most positive and the k most negative neurons."""
        k = min(check_k(k), self.neurons.shape[1])
        records = []
        for layer in range(self.n_layers):
            values = self.neurons[layer, :, row]
            for sign, idx in (("+", values.topk(k).indices), ("-", (-values).topk(k).indices)):
                for n in idx.tolist():
                    records.append(dict(layer=layer, sign=sign, neuron=n, value=values[n].item()))
        return pd.DataFrame.from_records(records)

    def plot(self, unit: str = "component", row: int = 0, **layout):
        """Bars for components or layers, a layer x head heatmap for heads (RdBu, centred at 0),
        and for neurons the strongest ten of each sign across all layers."""

        title = f"DLA by {unit}: {self.row_labels[row]}<br><sub>{self.metric_label(row)}</sub>"
        layout = {"title": title, **layout}
        if unit == "head":
            return plotting.head_heatmap(self.heads[:, :, row], **layout)
        if unit == "neuron":
            return plotting.neuron_strip(self.neurons[:, :, row], **layout)
        labels, values = self._unit(unit, row)
        return plotting.component_bars(labels, values, **layout)

    def __repr__(self) -> str:
        top = self.top(3)
        parts = ", ".join(f"{u} {fmt_value(v)}" for u, v in zip(top["component"], top["value"]))
        return f"Attribution({self.metric}, {len(self.row_labels)} row(s); top: {parts}; {self.reconstruction!r})"


class _GridLabels(Sequence):
    """Labels of a [layer, unit] grid flattened layer by layer (`L3H1`, `L0N7`), then one bias per
    layer (`L3 bias`), made only for the indices read: a model has ~10^5 neurons."""

    def __init__(self, n_layers: int, width: int, letter: str, bias: str) -> None:
        self.n_layers, self.width, self.letter, self.bias = n_layers, width, letter, bias

    def __len__(self) -> int:
        return self.n_layers * (self.width + 1)

    def __getitem__(self, i: int) -> str:
        if not 0 <= i < len(self):
            raise IndexError(i)
        grid = self.n_layers * self.width
        if i >= grid:
            return f"L{i - grid} {self.bias}"
        return f"L{i // self.width}{self.letter}{i % self.width}"


def logit_precision(model) -> torch.dtype:
    """The dtype whose rounding the model's logits carry, which sets the reconstruction's tolerance.

    It is the weights' dtype, except for fp64 models whose final norm computes in fp32: Hugging
    Face's RMSNorm (Qwen2, Llama, ...) casts its input to fp32 and back, and the bridge runs it as
    it is, so their fp64 logits are only fp32-exact (~1e-7 relative). A probe of `d_model` numbers
    that fp32 cannot hold tells the two apart: a norm that rounds to fp32 maps it and its fp32
    rounding to the same output.
    """
    dtype = next(model.parameters()).dtype
    if dtype != torch.float64:
        return dtype
    norm = getattr(model.ln_final, "original_component", None)
    norm = model.ln_final if norm is None else norm  # a bridge wraps the Hugging Face module
    device = next(model.parameters()).device
    probe = 1 + torch.arange(1, model.cfg.d_model + 1, dtype=torch.float64, device=device) * 2**-40
    with torch.no_grad():
        rounds = torch.equal(norm(probe[None, None]), norm(probe.float().double()[None, None]))
    return torch.float32 if rounds else torch.float64


def compute_attribution(
    model,
    cache,
    logits: Float[Tensor, "row vocab"],
    targets: list[int],
    distractors: list[list[int]],
    row_labels: list[str],
    metric: str = "logit_diff",
    u: Float[Tensor, "row d_model"] | None = None,
    *,
    warn: bool = True,
    metric_labels: list[str] | None = None,
) -> Attribution:
    """DLA of every unit from a final-position cache (position axis of length 1).

    `u` is the metric's scaled direction (`scaled_directions`), when the caller already has it.
    With `warn`, a reconstruction off by more than its tolerance raises a `ReconstructionWarning`
    (`trace` turns it off and calls `warn_if_off` itself, after its check for inf and NaN).
    """
    check_metric(metric)
    cfg = model.cfg
    dtype = compute_dtype(logits)
    if u is None:
        scale = cache["ln_final.hook_scale"][:, 0].to(dtype)  # [row, 1]
        u = scaled_directions(model, scale, targets, distractors, metric)  # [row, d_model]
    u = u.to(dtype)

    stack, labels = cache.decompose_resid(apply_ln=False, pos_slice=None, return_labels=True)
    components = torch.einsum("crd,rd->cr", stack[:, :, 0].to(dtype), u)

    heads, head_bias, neurons, neuron_bias = [], [], [], []
    for layer in range(cfg.n_layers):
        # Project W_O onto u first: [head, d_head, row], never [head, row, d_model].
        W_O_u = torch.einsum("hem,rm->her", layer_weight(model, "attn.W_O", layer).to(dtype), u)
        z = cache[f"blocks.{layer}.attn.hook_z"][:, 0].to(dtype)  # [row, head, d_head]
        heads.append(torch.einsum("rhe,her->hr", z, W_O_u))
        head_bias.append(_bias(model, "b_O", layer, u, dtype))
        W_out_u = layer_weight(model, "mlp.W_out", layer).to(dtype) @ u.T  # [neuron, row]
        post = cache[f"blocks.{layer}.mlp.hook_post"][:, 0].to(dtype)  # [row, neuron]
        neurons.append(post.T * W_out_u)
        neuron_bias.append(_bias(model, "b_out", layer, u, dtype))

    idx = torch.arange(len(targets))
    logits = logits.to(dtype)
    b_U = model.b_U.to(dtype)
    actual = logits[idx, targets]
    bias = b_U[targets]
    if metric == "logit_diff":
        actual = actual - torch.stack([logits[i, d].mean() for i, d in enumerate(distractors)])
        bias = bias - torch.stack([b_U[d].mean() for d in distractors])
    reconstruction = Reconstruction(
        attributed=components.sum(0).cpu(),
        bias=bias.cpu(),
        actual=actual.cpu(),
        tolerance=TOLERANCE.get(logit_precision(model), 1e-4),
    )
    if warn:
        warn_if_off(reconstruction, metric, next(model.parameters()).dtype, stacklevel=4)
    return Attribution(
        metric=metric,
        row_labels=list(row_labels),
        component_labels=list(labels),
        components=components.cpu(),
        heads=torch.stack(heads).cpu(),
        head_bias=torch.stack(head_bias).cpu(),
        neurons=torch.stack(neurons).cpu(),
        neuron_bias=torch.stack(neuron_bias).cpu(),
        reconstruction=reconstruction,
        value_biases=value_bias_convention(model),
        metric_labels=list(metric_labels or []),
    )


def warn_if_off(reconstruction: Reconstruction, metric: str, dtype: torch.dtype, stacklevel: int = 3) -> None:
    """Raise a `ReconstructionWarning` if the attributions do not add up to the model's value.

    `stacklevel` counts from this function: 3 points at the caller of the function that calls it.
    """
    if reconstruction.ok:
        return
    worst = reconstruction.residual.abs().max().item()
    warnings.warn(
        f"DLA reconstruction is off by {worst:.3g} (tolerance {reconstruction.tolerance:g} relative, "
        f"{dtype}): the attributions do not add up to the model's {metric}. Low-precision "
        "weights (fp16/bf16) are the usual cause; load the model with dtype=torch.float32 for exact sums.",
        ReconstructionWarning,
        stacklevel=stacklevel,
    )
