"""Pairing patching with other evidence: the estimate against exact patching, and readable against causal."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from tracelib.formats import check_k, check_row
from tracelib.identity import MadeByModelFields, check_same_model
from tracelib.patching.result import PatchingResult, check_patching_result
from tracelib.plotting import agreement_figure, readable_causal_figure
from tracelib.stats import spearman
from tracelib.trace import check_trace_arg


def _cell_names(result: PatchingResult) -> list[str]:
    """One label per cell of `result.values`, in flat order: `L2H3 'x'@5` (a head is `L2H3`, as everywhere)."""
    grids = torch.meshgrid(*[torch.arange(len(lab)) for lab in result.labels], indexing="ij")
    flat = [g.flatten().tolist() for g in grids]
    names = []
    for c in range(result.values.numel()):
        parts = [result.labels[d][flat[d][c]] for d in range(len(result.dims))]
        if "head" in result.dims:  # "L2" + "H3" -> "L2H3"
            h = result.dims.index("head")
            parts[h - 1 : h + 1] = [parts[h - 1] + parts[h]]
        names.append(" ".join(parts))
    return names


@dataclass(frozen=True)
class PatchingAgreement(MadeByModelFields):
    """How well attribution patching's estimate matches exact patching, cell by cell.

    Attributes:
        cells: the label of every cell both results patched (NaN cells left out).
        exact: exact recovery per cell (`patch()`); estimate: the linear estimate (`attribution_patch()`).
        pearson: Pearson correlation of the two over the cells; spearman: Spearman's rank correlation.
            Both are the same over raw changes as over recovery (one positive scale per result).
        what, direction: what both results patched, and which way.
        exact_raw, estimate_raw: the same cells' raw change (patched - corrupted logit difference);
            derived from recovery and `delta` when not given.
        weak_effect: either result's corruption barely changed the answer, so recovery is noise and
            `repr` and `plot()` show the raw changes instead.
        delta: the exact result's clean - corrupted logit difference.
        model_name, weights_fingerprint: the model both results came from (`identity`); empty where unknown.
    """

    cells: list[str]
    exact: Float[Tensor, " cell"]
    estimate: Float[Tensor, " cell"]
    pearson: float
    spearman: float
    what: str
    direction: str
    exact_raw: Float[Tensor, " cell"] | None = None
    estimate_raw: Float[Tensor, " cell"] | None = None
    weak_effect: bool = False
    delta: float = math.nan

    def __post_init__(self) -> None:
        if not (len(self.cells) == len(self.exact) == len(self.estimate)):
            raise ValueError(
                f"cells ({len(self.cells)}), exact ({len(self.exact)}) and estimate ({len(self.estimate)}) must align"
            )
        for name, recovery in (("exact_raw", self.exact), ("estimate_raw", self.estimate)):
            raw = getattr(self, name)
            if raw is None:
                object.__setattr__(self, name, (recovery.double() * self.delta).float())
            elif len(raw) != len(recovery):
                raise ValueError(f"{name} has {len(raw)} cells but there are {len(recovery)}")

    def to_frame(self) -> pd.DataFrame:
        """One row per cell: exact recovery, the estimate, estimate - exact, and both raw changes."""
        return pd.DataFrame(
            {
                "cell": self.cells,
                "exact": self.exact.tolist(),
                "estimate": self.estimate.tolist(),
                "difference": (self.estimate - self.exact).tolist(),
                "exact_raw": self.exact_raw.tolist(),
                "estimate_raw": self.estimate_raw.tolist(),
            }
        )

    def top(self, k: int = 5) -> pd.DataFrame:
        """The k cells where the estimate is furthest from exact patching, signs kept."""
        k = check_k(k)
        frame = self.to_frame()
        return (
            frame.reindex(frame["difference"].abs().sort_values(ascending=False).index).head(k).reset_index(drop=True)
        )

    def plot(self, **layout):
        """The estimate against exact recovery, one marker per cell, with the line where they agree."""

        return agreement_figure(self, **layout)

    def __repr__(self) -> str:
        worst = self.top(1).iloc[0] if self.cells else None
        unit = "_raw" if self.weak_effect else ""
        tail = (
            ""
            if worst is None
            else f"; furthest apart: {worst['cell']} (exact {worst['exact' + unit]:+.3f}, "
            f"estimate {worst['estimate' + unit]:+.3f}{' raw change' if self.weak_effect else ''})"
        )
        text = (
            f"PatchingAgreement({self.what}, {self.direction}, {len(self.cells)} cells: pearson {self.pearson:+.3f}, "
            f"spearman {self.spearman:+.3f}{tail})"
        )
        if self.weak_effect:
            text += (
                f"\n  weak effect: this corruption barely changes the answer (Δ = {self.delta:+.3f}); recovery is "
                "noise, so the cells are compared by raw change (patched - corrupted logit difference)"
            )
        return text


def compare_patching(exact: PatchingResult, estimate: PatchingResult) -> PatchingAgreement:
    """Line up exact patching and attribution patching of the same sweep, and correlate them.

    Args:
        exact: a `patch()` result; estimate: an `attribution_patch()` result of the same model,
            prompts, answer, `what` and direction.

    Returns:
        A `PatchingAgreement` over every cell patched in both (cells with no counterpart are left out).
        Where either result's effect is weak, its `weak_effect` is True and it shows raw changes.

    Raises:
        TypeError: either argument is not a `PatchingResult`.
        ModelMismatchError: the two results come from different models (names and fingerprints given).
        ValueError: the methods are the wrong way round, or the results differ in what they patched.
    """
    check_patching_result(exact, "compare_patching", "exact", "tl.patch")
    check_patching_result(estimate, "compare_patching", "estimate", "tl.attribution_patch")
    if exact.method != "exact" or estimate.method != "attribution":
        raise ValueError(
            f"compare_patching(exact, estimate) takes a patch() result then an attribution_patch() result; got "
            f"methods {exact.method!r} and {estimate.method!r}."
        )
    check_same_model(exact.identity, estimate.identity, "The exact patching result", "the attribution estimate")
    for name in ("what", "direction", "dims", "labels", "str_tokens", "answer_str"):
        if getattr(exact, name) != getattr(estimate, name):
            raise ValueError(
                f"The two results differ in {name}: {getattr(exact, name)!r} vs {getattr(estimate, name)!r}; "
                "run both on the same prompts, answer, what and direction."
            )
    x, y = exact.values.flatten().double(), estimate.values.flatten().double()
    keep = ~(x.isnan() | y.isnan())
    x, y = x[keep], y[keep]
    names = [n for n, k in zip(_cell_names(exact), keep.tolist()) if k]
    pearson = math.nan
    if len(x) > 1 and x.std() > 0 and y.std() > 0:
        pearson = torch.corrcoef(torch.stack([x, y]))[0, 1].item()
    rho = spearman(x, y) if len(x) > 1 else math.nan
    return PatchingAgreement(
        names,
        x.float(),
        y.float(),
        pearson,
        rho,
        exact.what,
        exact.direction,
        exact_raw=exact.raw_change.flatten()[keep],
        estimate_raw=estimate.raw_change.flatten()[keep],
        weak_effect=exact.weak_effect or estimate.weak_effect,
        delta=exact.delta,
        model_name=exact.model_name,
        weights_fingerprint=exact.weights_fingerprint,
    )


# Which patching sweep measures each DLA unit's causal effect, and the DLA label it is read against.
CAUSAL_UNITS = {"head": "head", "attn_out_all_pos": "attn", "mlp_out_all_pos": "mlp"}


@dataclass(frozen=True)
class ReadableVsCausal(MadeByModelFields):
    """Each component's and head's DLA (readable) beside its patching effect (causal).

    Attributes:
        units: `L2H3` for heads, `L2 attn` / `L2 MLP` for whole layers.
        kinds: "head" or "component" per unit.
        dla: each unit's direct logit attribution in the reference trace (`trace.dla.metric`).
        recovery: each unit's patching recovery (1 = clean, 0 = corrupted), from the sweeps passed in.
        metric: what the DLA attributes (e.g. "logit"); direction: the patching direction.
        answer_str: the answer both measure.
        raw_change: each unit's patched - corrupted logit difference (derived from recovery and
            `delta` when not given).
        weak_effect: a sweep's corruption barely changed the answer, so recovery is noise and
            `repr` and `plot()` show `raw_change` instead.
        delta: the first sweep's clean - corrupted logit difference.
        model_name, weights_fingerprint: the model the trace and the sweeps came from (`identity`);
            empty where unknown.
    """

    units: list[str]
    kinds: list[str]
    dla: Float[Tensor, " unit"]
    recovery: Float[Tensor, " unit"]
    metric: str
    direction: str
    answer_str: str
    raw_change: Float[Tensor, " unit"] | None = None
    weak_effect: bool = False
    delta: float = math.nan

    def __post_init__(self) -> None:
        if not (len(self.units) == len(self.kinds) == len(self.dla) == len(self.recovery)):
            raise ValueError("units, kinds, dla and recovery must have one entry per unit")
        if self.raw_change is None:
            object.__setattr__(self, "raw_change", (self.recovery.double() * self.delta).float())
        elif len(self.raw_change) != len(self.recovery):
            raise ValueError("raw_change must have one entry per unit")

    def to_frame(self) -> pd.DataFrame:
        """One row per unit: DLA, recovery and raw change, with DLA's and recovery's ranks by size (1 = largest)."""
        frame = pd.DataFrame(
            {
                "unit": self.units,
                "kind": self.kinds,
                "dla": self.dla.tolist(),
                "recovery": self.recovery.tolist(),
                "raw_change": self.raw_change.tolist(),
            }
        )
        frame["dla_rank"] = frame.groupby("kind")["dla"].transform(
            lambda s: s.abs().rank(ascending=False, method="min")
        )
        frame["recovery_rank"] = frame.groupby("kind")["recovery"].transform(
            lambda s: s.abs().rank(ascending=False, method="min")
        )
        return frame.astype({"dla_rank": int, "recovery_rank": int})

    def top(self, k: int = 5, by: str = "dla") -> pd.DataFrame:
        """The k units largest by |DLA| (`by="dla"`), |recovery| or |raw change| (`"raw_change"`), signs kept."""
        k = check_k(k)
        if by not in ("dla", "recovery", "raw_change"):
            raise ValueError(f"by must be 'dla', 'recovery' or 'raw_change', got {by!r}")
        frame = self.to_frame()
        return frame.reindex(frame[by].abs().sort_values(ascending=False).index).head(k).reset_index(drop=True)

    def disagreements(self, kind: str = "head") -> pd.DataFrame:
        """The unit of `kind` largest by |DLA| and the one largest by |recovery|, side by side."""
        frame = self.to_frame()
        frame = frame[frame["kind"] == kind]
        if frame.empty:
            raise ValueError(f"no units of kind {kind!r}; kinds here: {sorted(set(self.kinds))}")
        rows = [frame.loc[frame["dla"].abs().idxmax()], frame.loc[frame["recovery"].abs().idxmax()]]
        return pd.DataFrame(rows, index=["largest |DLA|", "largest |recovery|"])

    def plot(self, **layout):
        """DLA against patching recovery, one marker per unit, labelled."""

        return readable_causal_figure(self, **layout)

    def __repr__(self) -> str:
        causal = "raw change" if self.weak_effect else "recovery"
        column = "raw_change" if self.weak_effect else "recovery"
        lines = [
            f"ReadableVsCausal({len(self.units)} units, {self.metric} DLA vs {self.direction} {causal} "
            f"of {self.answer_str!r})"
        ]
        if self.weak_effect:
            lines.append(
                f"  weak effect: this corruption barely changes the answer (Δ = {self.delta:+.3f}); recovery is "
                "noise, so the causal side is the raw change (patched - corrupted logit difference)"
            )
        for kind in sorted(set(self.kinds)):
            d = self.disagreements(kind)
            a, b = d.iloc[0], d.iloc[1]
            lines.append(
                f"  {kind}: largest |DLA| {a['unit']} ({a['dla']:+.3f}, {causal} {a[column]:+.3f}); "
                f"largest |{causal}| {b['unit']} ({b[column]:+.3f}, DLA {b['dla']:+.3f})"
            )
        return "\n".join(lines)


def readable_vs_causal(trace, *results: PatchingResult, row: int = 0) -> ReadableVsCausal:
    """Put each unit's DLA in `trace` beside its patching recovery in `results`.

    Args:
        trace: the clean `Trace` (or a loaded reference) whose DLA is "readable".
        *results: exact patching sweeps of the same answer: `what="head"` for heads,
            `"attn_out_all_pos"` and `"mlp_out_all_pos"` for whole layers. At least one.
        row: which row of `trace`.

    Returns:
        A `ReadableVsCausal`. Where a sweep's effect is weak (`PatchingResult.weak_effect`), its
        `weak_effect` is True and its repr and plot show the raw change instead of recovery.

    Raises:
        TypeError: `trace` is not a `Trace`, a result is not a `PatchingResult`, or `row` is not an int.
        ModelMismatchError: the trace and a sweep (or two sweeps) come from different models.
        ValueError: no results, mixed directions, an unsupported `what`, another answer, or no row `row`.
    """
    check_trace_arg(trace, "readable_vs_causal", "trace")
    for i, result in enumerate(results):
        check_patching_result(result, "readable_vs_causal", f"results[{i}]", "tl.patch")
    if not results:
        raise ValueError('Pass at least one patching result: what="head", "attn_out_all_pos" or "mlp_out_all_pos".')
    row = check_row(row, len(trace.rows), "readable_vs_causal", "the trace")
    made_by = trace.identity
    for result in results:
        check_same_model(made_by, result.identity, "The trace", f"the {result.what} sweep")
    for result in results[1:]:
        check_same_model(
            results[0].identity, result.identity, f"The {results[0].what} sweep", f"the {result.what} sweep"
        )
    dla = trace.dla
    n_layers, n_heads = dla.heads.shape[:2]
    answer = trace.rows[row].target_str
    units, kinds, readable, causal, raw = [], [], [], [], []
    directions = {r.direction for r in results}
    if len(directions) > 1:
        raise ValueError(f"The results mix patching directions {sorted(directions)}; pass one direction.")
    for result in results:
        if result.what not in CAUSAL_UNITS:
            raise ValueError(f"readable_vs_causal takes what in {sorted(CAUSAL_UNITS)}, got {result.what!r}")
        if result.answer_str != answer:
            raise ValueError(
                f"The trace's answer is {answer!r} but the {result.what} sweep patched {result.answer_str!r}."
            )
        if result.values.shape[0] != n_layers or (result.what == "head" and result.values.shape[1] != n_heads):
            raise ValueError(
                f"The {result.what} sweep has shape {tuple(result.values.shape)}, but the trace has {n_layers} layers "
                f"x {n_heads} heads: they come from different models."
            )
        for layer in range(n_layers):
            if result.what == "head":
                for head in range(n_heads):
                    units.append(f"L{layer}H{head}")
                    kinds.append("head")
                    readable.append(dla.heads[layer, head, row].item())
                    causal.append(result.values[layer, head].item())
                    raw.append(result.raw_change[layer, head].item())
            else:
                part = CAUSAL_UNITS[result.what]
                index = dla.component_labels.index(f"{layer}_{part}_out")
                units.append(f"L{layer} {'attn' if part == 'attn' else 'MLP'}")
                kinds.append("component")
                readable.append(dla.components[index, row].item())
                causal.append(result.values[layer].item())
                raw.append(result.raw_change[layer].item())
    return ReadableVsCausal(
        units,
        kinds,
        torch.tensor(readable),
        torch.tensor(causal),
        dla.metric,
        directions.pop(),
        answer,
        raw_change=torch.tensor(raw),
        weak_effect=any(r.weak_effect for r in results),
        delta=results[0].delta,
        model_name=made_by.name if made_by.fingerprint else results[0].model_name,
        weights_fingerprint=made_by.fingerprint or results[0].weights_fingerprint,
    )
