"""Activation patching, clean <-> corrupted, scored by normalised logit-difference recovery.

`patch(model, clean, corrupted, answer)` runs one prompt, copies activations in from the other
prompt's run one cell at a time (a layer and position, a layer, a head), and reports how much of
the clean logit difference each cell brings back:

    value = (patched - corrupted) / (clean - corrupted)

where each term is the answer's logit minus the mean distractor logit at the final position. So
0 means "as the corrupted run" and 1 means "as the clean run", in both directions:

- `direction="denoise"` runs the corrupted prompt and patches in clean activations. A cell near 1
  is sufficient to restore the answer.
- `direction="noise"` runs the clean prompt and patches in corrupted activations. The same
  normalisation is kept, so an unpatched run scores 1 and a cell near 0 is necessary for it.

TransformerLens's `transformer_lens.patching.get_act_patch_resid_pre` and friends run on the
bridge in compatibility mode, and for equal-length prompts they agree with this module (the tests
check it on the bundled model). tracelib keeps its own path for three reasons:

1. Alignment. TransformerLens's functions assume both prompts have the same length and patch
   position i into position i; prompts with injected tokens need an alignment (`align_tokens`) and
   an honest gap where a position has no counterpart.
2. Batching. TransformerLens runs one forward pass per cell; here the cells of one layer share a
   batched pass, and one hook per hook point writes each batch row's own cell.
3. Starting at the layer. A cell at layer l changes nothing below l, so its run starts from the
   base run's cached `blocks.{l}.hook_resid_pre` and runs only blocks l and up, keeping the logits
   of the final position only (see `run_patched`). On average that is half the blocks, and the
   unembedding of one position instead of all of them.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import numbers
import operator
import warnings
import weakref
from dataclasses import dataclass, field

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from tracelib.alignment import align_tokens
from tracelib.answers import token_str
from tracelib.batching import auto_batch_size, progress_bar
from tracelib.formats import TracelibWarning, check_batch_size, check_k, check_row, described
from tracelib.identity import ModelIdentity, check_model_arg, check_same_model, model_identity
from tracelib.ood import Injection
from tracelib.plotting import agreement_figure, patching_figure, readable_causal_figure, token_labels
from tracelib.stats import spearman
from tracelib.trace import build_rows, check_trace_arg, real_hook_points

# Which TransformerLens hook each `what` patches, and whether it is split by position and by head.
# "_all_pos" patches every (aligned) position of the layer at once.
WHATS = {
    "resid_pre": ("hook_resid_pre", True, False),
    "resid_post": ("hook_resid_post", True, False),
    "attn_out": ("hook_attn_out", True, False),
    "mlp_out": ("hook_mlp_out", True, False),
    "resid_pre_all_pos": ("hook_resid_pre", False, False),
    "attn_out_all_pos": ("hook_attn_out", False, False),
    "mlp_out_all_pos": ("hook_mlp_out", False, False),
    "head": ("attn.hook_z", False, True),
    "head_by_pos": ("attn.hook_z", True, True),
}
DIRECTIONS = ("denoise", "noise")
METHODS = ("exact", "attribution")
# Recovery divides by clean - corrupted. A corruption that moves the clean logit difference by less
# than this fraction of itself makes that divisor small enough for recovery to be noise: `patch()`
# and `attribution_patch()` then warn and flag the result (`weak_effect`). Override per call with
# `min_effect=`; 0 turns the check off.
MIN_EFFECT = 0.1


class SameMetricError(ValueError):
    """The clean and corrupted runs have the same logit difference, so recovery cannot be normalised."""


class LayerStartWarning(TracelibWarning, RuntimeWarning):
    """Patching cannot start its runs at a layer on this model, so every run starts from the tokens (slower)."""


class WeakCorruptionWarning(TracelibWarning):
    """The corruption barely moves the logit difference, so normalised recovery is noise (see `MIN_EFFECT`)."""


@dataclass(frozen=True)
class Cell:
    """One patch: copy `hook` (a TL alias) at `positions` of the base run from `sources` of the other run."""

    hook: str
    positions: tuple[int, ...]
    sources: tuple[int, ...]
    head: int | None = None


@dataclass(frozen=True)
class PatchSetup:
    """Both runs, resolved: base tokens (the run that is patched) and the other run's activations.

    Attributes:
        base_tokens: `[1, pos]`, the prompt that is run and patched.
        source_cache: TL alias -> `[pos, ...]` activation of the run patched in from.
        mapping: for each base position, the source position that stands for it, or None.
        target: the answer token; distractors: the tokens it should beat.
        base_resid: `[layer, pos, d_model]`, the base run's `hook_resid_pre` at every layer: where
            a patched run at layer l starts. None makes `run_patched` run every forward from the tokens.
        base_metric: the unpatched base run's logit difference, against which starting at a layer is
            checked once per model (`_starts_at_layer_exactly`).
    """

    base_tokens: Tensor
    source_cache: dict
    mapping: list
    target: int
    distractors: list
    base_resid: Tensor | None = None
    base_metric: float | None = None


def logit_diff(logits: Float[Tensor, "batch vocab"], target: int, distractors: list[int]) -> Float[Tensor, " batch"]:
    """The answer's logit minus the mean distractor logit (at the position the caller picked)."""
    return logits[:, target] - logits[:, distractors].mean(-1)


def _real_points(model, aliases) -> dict[str, list[str]]:
    return real_hook_points(model, aliases, "patch")


def run_cached(model, tokens: Tensor, aliases) -> tuple[Tensor, dict[str, Tensor]]:
    """One forward pass of `tokens` (`[1, pos]`): logits `[1, pos, vocab]` and each alias's activation `[pos, ...]`."""
    points = _real_points(model, aliases)
    store: dict[str, Tensor] = {}

    def keep(act: Tensor, hook) -> None:
        for alias in points[hook.name]:
            store[alias] = act[0].detach().clone()
        # None leaves the activation untouched (a returned tensor would replace it).

    with torch.no_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=[(name, keep) for name in points], return_type="logits")
    return logits, store


def _layer_of(hook: str) -> int:
    return int(hook.split(".")[1])


def _block_list(model) -> tuple[torch.nn.Module, str] | None:
    """The Hugging Face module and attribute that hold the bridge's blocks, if they can be cut short.

    The bridge's own `start_at_layer` feeds the residual in as `inputs_embeds` but still runs
    blocks 0..l-1 and discards their output. To skip them, `_blocks_from` hands the HF model a
    shorter block list for the duration of one call. That is exact only where the HF forward treats
    every block alike: models with per-layer attention types (sliding-window layers mixed with full
    ones) index them by loop position, so they get None here and run every forward from the tokens.
    """
    hf = getattr(getattr(model, "_driver", None), "underlying_model", None)
    blocks = getattr(model, "blocks", None)
    if hf is None or blocks is None or len(blocks) != model.cfg.n_layers:
        return None
    layer_types = getattr(getattr(hf, "config", None), "layer_types", None)
    if layer_types is not None and len(set(layer_types)) > 1:
        return None
    for module in hf.modules():
        for name, child in module.named_children():
            if isinstance(child, torch.nn.ModuleList) and len(child) == len(blocks) and child[0] is blocks[0]:
                return module, name
    return None


# Models on which starting at a layer was checked against the unpatched run, and the verdict.
_START_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _starts_at_layer_exactly(model, setup: PatchSetup, where: tuple) -> bool:
    """Whether an unpatched run started at layer 1 reproduces the base run's metric (checked once per model).

    Starting at a layer leans on how TransformerLens's `start_at_layer` and the HF forward treat the
    block list. If a later release changes that, this check sees a different metric, warns, and
    patching falls back to full forward passes rather than report wrong numbers.
    """
    if model in _START_CHECKED:
        return _START_CHECKED[model]
    if setup.base_metric is None or setup.base_resid is None:
        return True
    layer = min(1, model.cfg.n_layers - 1)
    resid = setup.base_resid[layer].to(model.cfg.device)[None]
    try:
        with torch.no_grad(), _blocks_from(where, layer):
            logits = model.run_with_hooks(resid.contiguous(), start_at_layer=layer, return_type="logits")
        got = logit_diff(logits[:, -1].double(), setup.target, setup.distractors).item()
        error = None
    except Exception as err:  # noqa: BLE001 - any failure means: do not start at a layer
        got, error = math.nan, err
    dtype = next(model.parameters()).dtype
    tol = (5e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-3) * max(1.0, abs(setup.base_metric))
    ok = math.isfinite(got) and abs(got - setup.base_metric) <= tol
    if not ok:
        warnings.warn(
            f"Patching cannot start at a layer on this model (an unpatched run from layer {layer} gave "
            f"{got:+.6f}, the full run {setup.base_metric:+.6f}{'' if error is None else f'; {error!r}'}); every "
            "patched run will start from the tokens. The results are right, only slower.",
            LayerStartWarning,
            stacklevel=3,
        )
    _START_CHECKED[model] = ok
    return ok


@contextlib.contextmanager
def _blocks_from(where: tuple[torch.nn.Module, str], layer: int):
    """Within the block, the HF model holds only the blocks from `layer` on (the bridge's own stay)."""
    module, name = where
    full = getattr(module, name)
    setattr(module, name, torch.nn.ModuleList(list(full)[layer:]))
    try:
        yield
    finally:
        setattr(module, name, full)


def _final_logits_only(model) -> dict:
    """`logits_to_keep=1` where the HF model takes it: only the final position is scored."""
    hf = getattr(getattr(model, "_driver", None), "underlying_model", None)
    try:
        takes = hf is not None and "logits_to_keep" in inspect.signature(hf.forward).parameters
    except (TypeError, ValueError):
        takes = False
    return {"logits_to_keep": 1} if takes else {}


def _index(batch: list[Cell], alias_of: dict[str, str], device) -> dict:
    """Flat index tensors per hook point: batch row, base position, source position, head."""
    index: dict[str, tuple[Tensor, Tensor, Tensor, Tensor | None]] = {}
    for name, alias in alias_of.items():
        rows, pos, src, heads = [], [], [], []
        for b, cell in enumerate(batch):
            if cell.hook != alias:
                continue
            rows += [b] * len(cell.positions)
            pos += cell.positions
            src += cell.sources
            heads += [cell.head] * len(cell.positions)
        if rows:
            has_head = heads[0] is not None
            index[name] = (
                torch.tensor(rows, device=device),
                torch.tensor(pos, device=device),
                torch.tensor(src, device=device),
                torch.tensor(heads, device=device) if has_head else None,
            )
    return index


def _write_cells(act: Tensor, where: tuple, source: Tensor) -> Tensor:
    """A copy of `act` with the source activation written into each indexed cell."""
    rows, pos, src, heads = where
    source = source.to(act.device, act.dtype)
    # The clone keeps the bridge's own tensor (or the cached residual) intact.
    act = act.clone()
    if heads is None:
        act[rows, pos] = source[src]
    else:
        act[rows, pos, heads] = source[src, heads]
    return act


def run_patched(
    model,
    setup: PatchSetup,
    cells: list[Cell],
    batch_size: int | None = None,
    progress: bool | None = None,
    *,
    _full_forward: bool = False,
) -> Float[Tensor, " cell"]:
    """The logit difference of the base run with each cell patched in, batched B cells per forward pass.

    Cells are grouped by layer. A batch of cells at layer l starts from the base run's cached
    `blocks.{l}.hook_resid_pre` (`setup.base_resid`), stacked B times, and runs only blocks l and
    up (`model.run_with_hooks(resid, start_at_layer=l)` with the HF block list cut short, see
    `_block_list`), scoring only the final position. A `resid_pre` cell at layer l is written
    straight into that starting residual; any other cell (attn_out, mlp_out, hook_z at layer l) by
    one hook per hook point that writes only its rows' cells, so batch row b is exactly the base
    run with cell b patched.

    The full-forward path (the base tokens stacked B times, every block run) is used where the
    block list cannot be cut short (per-layer attention types, no HF model behind the bridge),
    where `setup.base_resid` is None, or with `_full_forward=True`; the tests check that both
    paths agree. An empty `cells` gives an empty tensor.
    """
    if not cells:
        return torch.zeros(0)
    device = model.cfg.device
    tokens = setup.base_tokens.to(device)
    size = check_batch_size(batch_size) or auto_batch_size(model, tokens.shape[1], len(cells))
    points = _real_points(model, {cell.hook for cell in cells})
    alias_of = {name: aliases[0] for name, aliases in points.items()}
    where = None if _full_forward or setup.base_resid is None else _block_list(model)
    if where is not None and not _starts_at_layer_exactly(model, setup, where):
        where = None

    # Batches of cell indices: per layer when starting at the layer, else in the given order.
    if where is None:
        groups = [list(range(len(cells)))]
    else:
        by_layer: dict[int, list[int]] = {}
        for k, cell in enumerate(cells):
            by_layer.setdefault(_layer_of(cell.hook), []).append(k)
        groups = [by_layer[layer] for layer in sorted(by_layer)]
    batches = [group[i : i + size] for group in groups for i in range(0, len(group), size)]
    extra = _final_logits_only(model) if where is not None else {}
    out = torch.zeros(len(cells), dtype=torch.float64)
    for ids in progress_bar(batches, progress, "patching"):
        batch = [cells[k] for k in ids]
        index = _index(batch, alias_of, device)

        def write(act: Tensor, hook, index=index) -> Tensor:
            # A returned tensor replaces the activation.
            return _write_cells(act, index[hook.name], setup.source_cache[alias_of[hook.name]])

        with torch.no_grad():
            if where is None:
                logits = model.run_with_hooks(
                    tokens.expand(len(batch), -1),
                    fwd_hooks=[(name, write) for name in index],
                    return_type="logits",
                )
            else:
                layer = _layer_of(batch[0].hook)
                resid = setup.base_resid[layer].to(device)[None].expand(len(batch), -1, -1)
                start = f"blocks.{layer}.hook_resid_pre"
                hooks = []
                for name in index:
                    if alias_of[name] == start:
                        resid = _write_cells(resid, index[name], setup.source_cache[start])
                    else:
                        hooks.append((name, write))
                with _blocks_from(where, layer):
                    logits = model.run_with_hooks(
                        resid.contiguous(), start_at_layer=layer, fwd_hooks=hooks, return_type="logits", **extra
                    )
        out[torch.tensor(ids)] = logit_diff(logits[:, -1].double(), setup.target, setup.distractors).cpu()
    return out


@dataclass(frozen=True)
class PatchingResult:
    """How much of the clean logit difference each patched cell recovers (1 = clean, 0 = corrupted).

    Recovery is `raw_change / delta`: the change each patch makes, over the change the corruption
    made. Where the corruption barely changes the answer (`weak_effect`), that divisor is small and
    recovery is noise amplified, so `values` keeps recovery (its one meaning, whatever the flag) but
    `repr`, `plot()`, `compare_patching`, `readable_vs_causal` and the explorer show `raw_change`
    instead, and say why.

    Attributes:
        values: the recovery per cell, shaped by `dims`: `[layer, position]`, `[layer]`,
            `[layer, head]` or `[layer, head, position]`. NaN where the cell's position has no
            counterpart in the run patched from.
        dims: the axis names of `values` ("layer", "head", "position").
        labels: per axis, its tick labels (`L0`, `H3`, `'1'@5`).
        what: what was patched (a key of `tracelib.patching.WHATS`).
        direction: "denoise" (corrupted run, clean patched in) or "noise" (the reverse).
        clean_metric: the clean run's logit difference (answer - mean distractor).
        corrupted_metric: the corrupted run's.
        answer_str: the answer token; distractor_strs: its rivals.
        str_tokens: the tokens of the run that was patched (positions refer to them).
        alignment: for each of those positions, the position in the other run patched from, or None.
        method: "exact" (`patch()`: every cell a real patched run) or "attribution" (`attribution_patch()`:
            the first-order estimate of every cell from one backward pass).
        raw_change: per cell, the patched run's logit difference minus the corrupted run's (in both
            directions, so `values * delta == raw_change`; noising's unpatched run scores `delta`).
            Kept whether or not the effect is weak; derived from `values` when not given.
        min_effect: the fraction of |clean_metric| that |delta| had to reach for recovery to count
            (`MIN_EFFECT` by default, 0 = no check).
        model_name, weights_fingerprint: the model that made the result (`identity`); empty where
            unknown, and then never checked.
    """

    values: Float[Tensor, "*shape"]
    dims: tuple[str, ...]
    labels: tuple[list[str], ...]
    what: str
    direction: str
    clean_metric: float
    corrupted_metric: float
    answer_str: str
    distractor_strs: list[str]
    str_tokens: list[str]
    alignment: list = field(default_factory=list)
    method: str = "exact"
    raw_change: Float[Tensor, "*shape"] | None = None
    min_effect: float = MIN_EFFECT
    model_name: str = ""
    weights_fingerprint: str = ""

    @property
    def identity(self) -> ModelIdentity:
        """The model that made this result: its name and weights fingerprint."""
        return ModelIdentity(self.model_name, self.weights_fingerprint)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if tuple(self.values.shape) != tuple(len(lab) for lab in self.labels) or len(self.dims) != self.values.ndim:
            raise ValueError(
                f"values have shape {tuple(self.values.shape)}, but dims {self.dims} have "
                f"{[len(lab) for lab in self.labels]} labels"
            )
        object.__setattr__(self, "min_effect", check_min_effect(self.min_effect))
        if self.raw_change is None:
            object.__setattr__(self, "raw_change", (self.values.double() * self.delta).float())
        elif tuple(self.raw_change.shape) != tuple(self.values.shape):
            raise ValueError(
                f"raw_change has shape {tuple(self.raw_change.shape)} but values {tuple(self.values.shape)}; "
                "pass both (or raw_change=None to derive it from values)"
            )

    @property
    def delta(self) -> float:
        """clean_metric - corrupted_metric: the change the corruption made, which recovery divides by."""
        return self.clean_metric - self.corrupted_metric

    @property
    def weak_effect(self) -> bool:
        """Whether |delta| is below `min_effect` of |clean_metric|: recovery is then noise, read `raw_change`."""
        return is_weak(self.clean_metric, self.corrupted_metric, self.min_effect)

    @property
    def effect_note(self) -> str:
        """Where the effect is weak, the line that says so (how small delta is, against what); else ''."""
        return weak_note(self.clean_metric, self.corrupted_metric, self.min_effect) if self.weak_effect else ""

    @property
    def no_counterpart(self) -> list[int]:
        """Positions of the patched run with no counterpart in the other run (NaN by position)."""
        return [i for i, j in enumerate(self.alignment) if j is None]

    def to_frame(self) -> pd.DataFrame:
        """Long form: one row per cell, a column per axis plus `value` (recovery) and `raw_change`."""
        grids = torch.meshgrid(*[torch.arange(len(lab)) for lab in self.labels], indexing="ij")
        data = {dim: [self.labels[d][i] for i in grids[d].flatten().tolist()] for d, dim in enumerate(self.dims)}
        data["value"] = self.values.flatten().tolist()
        data["raw_change"] = self.raw_change.flatten().tolist()
        return pd.DataFrame(data)

    def top(self, k: int = 5) -> pd.DataFrame:
        """The k cells with the largest |value| (equally, |raw_change|), signs kept (NaN cells left out)."""
        k = check_k(k)
        frame = self.to_frame().dropna(subset=["value"])
        return frame.reindex(frame["value"].abs().sort_values(ascending=False).index).head(k).reset_index(drop=True)

    def plot(self, **layout):
        """A heatmap (bars for one axis) on RdBu centred at 0: blue recovers the clean answer."""

        return patching_figure(self, **layout)

    def __repr__(self) -> str:
        vals = self.values[~self.values.isnan()]
        best = self.top(1).iloc[0] if len(vals) else None
        where = "" if best is None else " at " + " ".join(str(best[d]) for d in self.dims)
        estimate = "" if self.method == "exact" else ", attribution estimate"
        lines = [
            f"PatchingResult({self.what}, {self.direction}{estimate}, {tuple(self.values.shape)}; "
            f"{self.answer_str!r} vs {self.distractor_strs}: clean {self.clean_metric:+.3f}, "
            f"corrupted {self.corrupted_metric:+.3f})"
        ]
        if best is None:
            lines.append("  no cell could be patched")
        elif self.weak_effect:
            lines += [
                f"  weak effect: {self.effect_note}; recovery is noise here",
                "  raw change (patched - corrupted logit difference): "
                f"max |raw_change| {best['raw_change']:+.3f}{where}",
            ]
        else:
            lines.append(f"  recovery 1 = clean, 0 = corrupted; max |value| {best['value']:+.3f}{where}")
        if self.no_counterpart:
            gap = ", ".join(f"{self.str_tokens[i]!r}@{i}" for i in self.no_counterpart)
            lines.append(f"  no counterpart (NaN by position, not patched): {gap}")
        return "\n".join(lines)


def check_what(what) -> str:
    """`what` if it is a key of `WHATS`, else a ValueError naming the choices."""
    if not isinstance(what, str) or what not in WHATS:
        raise ValueError(f"what must be one of {sorted(WHATS)}, got {what!r}")
    return what


def _made_by(model) -> dict[str, str]:
    """The `model_name` and `weights_fingerprint` fields of a result `model` made."""
    identity = model_identity(model)
    return {"model_name": identity.name, "weights_fingerprint": identity.fingerprint}


def check_patching_result(value, where: str, name: str, made_by: str = "tl.patch or tl.attribution_patch") -> None:
    """Refuse anything but a `PatchingResult` with a TypeError that says what to pass."""
    if not isinstance(value, PatchingResult):
        raise TypeError(f"{where}: pass a PatchingResult from {made_by} as {name}, got {described(value)}.")


def _resolve(model, prompt: str, answer, distractors, prepend_bos: bool | None = None):
    rows = build_rows(model, prompt, answer, distractors, prepend_bos=prepend_bos)
    if len(rows) != 1:
        raise ValueError(f"patch() needs a single-token answer; {rows[0].label} has {len(rows)} tokens.")
    return rows[0]


def check_alignment(alignment, n_base: int, n_source: int) -> list[int | None]:
    """An alignment as a list, checked: one entry per base position, each a source position or None.

    Entries are ints (Python or NumPy) or None, nothing else: `int()` would turn 1.7 into 1 and
    accept "0" and True, patching a position nobody asked for.
    """
    if isinstance(alignment, (str, bytes)) or not hasattr(alignment, "__iter__"):
        raise TypeError(
            "alignment must be a list with, for each corrupted position, its clean position (an int) or None "
            f"(or a tl.inject Injection), got {described(alignment)}."
        )
    alignment = list(alignment)
    if len(alignment) != n_base:
        raise ValueError(f"The alignment has {len(alignment)} entries but the patched prompt has {n_base} tokens.")
    out: list[int | None] = []
    for i, j in enumerate(alignment):
        if j is None:
            out.append(None)
            continue
        if isinstance(j, bool) or not hasattr(type(j), "__index__"):
            raise TypeError(
                f"Alignment entry {i} is {described(j)}; each entry must be a position of the "
                "other prompt (an int) or None."
            )
        j = operator.index(j)
        if not 0 <= j < n_source:
            raise ValueError(f"Alignment entry {j} is not a position of the other prompt (0..{n_source - 1}).")
        out.append(j)
    return out


def invert_alignment(alignment: list[int | None], n_clean: int) -> list[int | None]:
    """The corrupted -> clean alignment turned round: for each clean position, its corrupted one or None."""
    inverse: list[int | None] = [None] * n_clean
    for j, i in enumerate(alignment):
        if i is not None:
            inverse[i] = j
    return inverse


def fill_substitutions(alignment: list[int | None], n_source: int) -> list[int | None]:
    """Map substituted tokens one-to-one: a gap of unmatched positions as long as the other side's gap.

    `align_tokens` leaves every differing token unmatched, but a corrupted prompt's swapped operand
    (`1` -> `3`) is exactly what patching needs to patch. Between two matched anchors, a run of
    unmatched positions as long as the other prompt's unmatched run is a substitution and maps
    position by position; a run of any other length (inserted tokens) stays None.
    """
    out = list(alignment)
    anchors = [(-1, -1)] + [(j, i) for j, i in enumerate(out) if i is not None] + [(len(out), n_source)]
    for (j0, i0), (j1, i1) in zip(anchors, anchors[1:]):
        if j1 - j0 > 1 and j1 - j0 == i1 - i0:
            for t in range(1, j1 - j0):
                out[j0 + t] = i0 + t
    return out


def shared_prefix(base: list[int], other: list[int], mapping: list) -> int:
    """How many leading positions the base run shares with the other run: same tokens, aligned one to one."""
    n = 0
    while n < min(len(base), len(other)) and mapping[n] == n and base[n] == other[n]:
        n += 1
    return n


def make_cells(model, what: str, mapping: list[int | None]) -> tuple[list[Cell], list[int], tuple, tuple]:
    """Every cell `what` sweeps, the flat index of each in the result grid, and the grid's dims and size."""
    hook, by_pos, by_head = WHATS[what]
    cfg = model.cfg
    aligned = [(i, j) for i, j in enumerate(mapping) if j is not None]
    dims: tuple[str, ...] = ("layer",) + (("head",) if by_head else ()) + (("position",) if by_pos else ())
    shape = (cfg.n_layers,) + ((cfg.n_heads,) if by_head else ()) + ((len(mapping),) if by_pos else ())
    cells, flat = [], []
    heads = range(cfg.n_heads) if by_head else [None]
    for layer in range(cfg.n_layers):
        alias = f"blocks.{layer}.{hook}"
        for h_i, head in enumerate(heads):
            base = (layer * len(heads) + h_i) * (len(mapping) if by_pos else 1)
            if by_pos:
                for i, j in aligned:
                    cells.append(Cell(alias, (i,), (j,), head))
                    flat.append(base + i)
            elif aligned:
                cells.append(Cell(alias, tuple(i for i, _ in aligned), tuple(j for _, j in aligned), head))
                flat.append(base)
    return cells, flat, dims, shape


def prepare(
    model,
    clean_prompt: str,
    corrupted_prompt: str,
    answer,
    direction: str,
    distractors,
    alignment,
    hooks,
    prepend_bos: bool | None = None,
):
    """Both runs, the metric's two anchors and the patching setup for `direction`."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    clean, corrupted, alignment = resolve_pair(
        model, clean_prompt, corrupted_prompt, answer, distractors, alignment, prepend_bos
    )
    device = model.cfg.device
    # Both runs also keep resid_pre at every layer: whichever is patched starts its runs from there.
    starts = [f"blocks.{layer}.hook_resid_pre" for layer in range(model.cfg.n_layers)]
    kept = list(dict.fromkeys([*hooks, *starts]))
    clean_logits, clean_cache = run_cached(model, clean.tokens[None].to(device), kept)
    corr_logits, corr_cache = run_cached(model, corrupted.tokens[None].to(device), kept)
    rivals = clean.distractors
    if not rivals:  # as trace() does: the clean run's strongest non-answer token
        ranked = clean_logits[0, -1].topk(2).indices.tolist()
        rivals = [ranked[1] if ranked[0] == clean.target else ranked[0]]
    clean_metric = logit_diff(clean_logits[:, -1].double(), clean.target, rivals).item()
    corr_metric = logit_diff(corr_logits[:, -1].double(), clean.target, rivals).item()
    # alignment: for each corrupted position, its clean position or None.
    if direction == "denoise":
        base, cache, mapping = corrupted, clean_cache, alignment
    else:
        base, cache, mapping = clean, corr_cache, invert_alignment(alignment, len(clean.tokens))
    base_cache = corr_cache if direction == "denoise" else clean_cache
    base_resid = torch.stack([base_cache[name] for name in starts])
    source = {alias: cache[alias] for alias in kept}
    base_metric = corr_metric if direction == "denoise" else clean_metric
    setup = PatchSetup(base.tokens[None], source, mapping, clean.target, rivals, base_resid, base_metric)
    return clean, corrupted, clean_metric, corr_metric, setup


def patch(
    model,
    clean_prompt: str,
    corrupted_prompt: str,
    answer,
    what: str = "resid_pre",
    direction: str = "denoise",
    distractors=None,
    alignment=None,
    batch_size: int | None = None,
    *,
    progress: bool | None = None,
    min_effect: float | None = None,
    prepend_bos: bool | None = None,
) -> PatchingResult:
    """Patch activations between a clean and a corrupted prompt and score each cell's recovery.

    Args:
        model: a loaded model (`tl.load_model`).
        clean_prompt: the prompt the model answers correctly.
        corrupted_prompt: a minimally changed prompt (another operand, injected tokens).
        answer: the single-token answer (`" 2"`), resolved as `trace()` resolves it.
        what: one of `WHATS`: `"resid_pre"`, `"resid_post"`, `"attn_out"`, `"mlp_out"` per layer x
            position; `"resid_pre_all_pos"`, `"attn_out_all_pos"`, `"mlp_out_all_pos"` per layer;
            `"head"` per layer x head (`hook_z`, every position); `"head_by_pos"` per layer x head x position.
        direction: `"denoise"` (run corrupted, patch clean in) or `"noise"` (run clean, patch
            corrupted in). Both report (patched - corrupted) / (clean - corrupted): 1 = clean.
        distractors: tokens the answer should beat; default as in `trace()` (neighbouring digits,
            else the clean run's strongest competitor).
        alignment: for each corrupted position, the clean position it corresponds to (an int), or
            None; or the `tl.inject` `Injection` that made the corrupted prompt, whose alignment is
            then used. Default: `align_tokens(clean tokens, corrupted tokens)`, with substituted
            tokens mapped one-to-one (`fill_substitutions`), so equal-length prompts align position
            by position. Positions without a counterpart are never patched: by position they are
            NaN; "all positions" cells skip them.
        batch_size: patched runs per forward pass, a positive int; None (the default) picks it
            from free memory (`auto_batch_size`).
        progress: show a tqdm bar; default only with more than 4 batches and never under pytest or
            nbval (see `_is_quiet`).
        min_effect: the smallest |clean - corrupted| worth normalising by, as a fraction of
            |clean| (default `MIN_EFFECT`, 10%; 0 turns the check off). Below it recovery is noise:
            a `WeakCorruptionWarning` says so, the result's `weak_effect` is True, and its plot
            shows `raw_change` instead of recovery.
        prepend_bos: None (the default) starts both prompts with a BOS token only where the model's
            tokenizer adds one, as `trace()` does; True or False overrides it (pass `tl.inject` the same).

    Returns:
        A `PatchingResult`; `values` is recovery and `raw_change` the patched - corrupted logit
        difference, whether or not the effect is weak.

    Raises:
        SameMetricError: the clean and corrupted logit differences are equal, so no recovery can be normalised.
        TypeError: `model` is not a loaded model; an alignment entry, `batch_size` or `min_effect` of
            the wrong type (a float or bool position, `batch_size=1.5`, `min_effect="0.1"`).
        ValueError: an unknown `what` or `direction`, a bad alignment, `batch_size` below 1, or a
            `min_effect` that is not a finite number >= 0.

    Warns:
        WeakCorruptionWarning: the corruption changes the logit difference by less than `min_effect` of it.
    """
    check_model_arg(model, "patch")
    check_what(what)
    check_batch_size(batch_size)
    min_effect = check_min_effect(min_effect)
    hook = WHATS[what][0]
    hooks = [f"blocks.{layer}.{hook}" for layer in range(model.cfg.n_layers)]
    clean, corrupted, clean_metric, corr_metric, setup = prepare(
        model, clean_prompt, corrupted_prompt, answer, direction, distractors, alignment, hooks, prepend_bos
    )
    span = _check_span(clean_metric, corr_metric)
    _warn_if_weak(clean_metric, corr_metric, min_effect, clean.target_str)
    cells, flat, dims, shape = make_cells(model, what, setup.mapping)
    # Attention only looks back, so before the first position where the two prompts differ both runs
    # compute the same activations: a patch there changes nothing, and the base run's metric is its
    # value. Those cells are not run (two thirds of a resid_pre sweep when an operand near the end changes).
    other = (clean if direction == "denoise" else corrupted).tokens.tolist()
    same = shared_prefix(setup.base_tokens[0].tolist(), other, setup.mapping)
    run = [k for k, cell in enumerate(cells) if not (len(cell.positions) == 1 and cell.positions[0] < same)]
    patched = torch.full((len(cells),), float(setup.base_metric), dtype=torch.float64)
    if run:
        patched[run] = run_patched(model, setup, [cells[k] for k in run], batch_size, progress).to(patched.dtype)
    values, raw = torch.full((math.prod(shape),), math.nan), torch.full((math.prod(shape),), math.nan)
    index = torch.tensor(flat, dtype=torch.long)
    values[index] = ((patched - corr_metric) / span).float()
    raw[index] = (patched - corr_metric).float()
    base = corrupted if direction == "denoise" else clean
    axis = {
        "layer": [f"L{i}" for i in range(model.cfg.n_layers)],
        "head": [f"H{i}" for i in range(model.cfg.n_heads)],
        "position": token_labels(base.str_tokens),
    }
    return PatchingResult(
        values=values.reshape(shape),
        dims=dims,
        labels=tuple(axis[d] for d in dims),
        what=what,
        direction=direction,
        clean_metric=clean_metric,
        corrupted_metric=corr_metric,
        answer_str=clean.target_str,
        distractor_strs=[token_str(model, t) for t in setup.distractors],
        str_tokens=list(base.str_tokens),
        alignment=list(setup.mapping),
        raw_change=raw.reshape(shape),
        min_effect=min_effect,
        **_made_by(model),
    )


# Attribution patching: the first-order estimate of every cell from one backward pass.
# Which hook each `what` reads its activation and gradient at (TL aliases, `{layer}` filled in).
ATTRIBUTION_HOOKS = {
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "resid_post": "blocks.{layer}.hook_resid_post",
    "attn_out": "blocks.{layer}.hook_attn_out",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "resid_pre_all_pos": "blocks.{layer}.hook_resid_pre",
    "attn_out_all_pos": "blocks.{layer}.hook_attn_out",
    "mlp_out_all_pos": "blocks.{layer}.hook_mlp_out",
    "head": "blocks.{layer}.attn.hook_z",
    "head_by_pos": "blocks.{layer}.attn.hook_z",
}


def resolve_pair(
    model, clean_prompt: str, corrupted_prompt: str, answer, distractors, alignment, prepend_bos: bool | None = None
):
    """Both prompts resolved to rows with one answer token, and the checked corrupted -> clean alignment.

    `alignment` may be the `Injection` that made the corrupted prompt: its alignment is used, once
    its tokens are checked to be the two prompts' tokens.
    """
    clean = _resolve(model, clean_prompt, answer, distractors, prepend_bos)
    corrupted = _resolve(model, corrupted_prompt, answer, distractors, prepend_bos)
    if clean.target != corrupted.target:
        raise ValueError(
            f"The answer resolves to {clean.target_str!r} after the clean prompt but {corrupted.target_str!r} after "
            "the corrupted one; patching compares one answer token."
        )
    if isinstance(alignment, Injection):
        if alignment.tokens.tolist() != corrupted.tokens.tolist() or (
            alignment.clean_tokens.tolist() != clean.tokens.tolist()
        ):
            raise ValueError(
                f"alignment is the Injection {alignment.clean_prompt!r} -> {alignment.prompt!r}, whose tokens are not "
                f"this clean prompt's ({clean_prompt!r}) and corrupted prompt's ({corrupted_prompt!r}); pass the "
                "injection's own prompts (corrupted_prompt=injection.prompt), with the same answer and prepend_bos."
            )
        alignment = alignment.alignment
    if alignment is None:
        alignment = fill_substitutions(align_tokens(clean.str_tokens, corrupted.str_tokens), len(clean.tokens))
    return clean, corrupted, check_alignment(alignment, len(corrupted.tokens), len(clean.tokens))


def _check_span(clean_metric: float, corr_metric: float) -> float:
    span = clean_metric - corr_metric
    if not math.isfinite(span) or abs(span) <= 1e-6 * max(1.0, abs(clean_metric), abs(corr_metric)):
        raise SameMetricError(
            f"The clean and corrupted prompts give the same logit difference ({clean_metric:+.6f} vs "
            f"{corr_metric:+.6f}), so recovery (patched - corrupted) / (clean - corrupted) is undefined. "
            "Pick a corrupted prompt that changes the answer's margin."
        )
    return span


def check_min_effect(min_effect) -> float:
    """`min_effect` as a float, checked: a finite fraction >= 0 (None reads the module's `MIN_EFFECT`)."""
    if min_effect is None:
        min_effect = MIN_EFFECT
    if isinstance(min_effect, bool) or not isinstance(min_effect, numbers.Real):
        raise TypeError(
            f"min_effect must be a number (a fraction of the clean logit difference, e.g. 0.1), got "
            f"{described(min_effect)}"
        )
    value = float(min_effect)
    if not math.isfinite(value) or value < 0:
        raise ValueError(
            f"min_effect must be a finite fraction >= 0 of the clean logit difference (0 turns the check off), "
            f"got {min_effect!r}"
        )
    return value


def is_weak(clean_metric: float, corr_metric: float, min_effect: float) -> bool:
    """Whether the corruption moves the clean logit difference by less than `min_effect` of itself."""
    return abs(clean_metric - corr_metric) < min_effect * abs(clean_metric)


def weak_note(clean_metric: float, corr_metric: float, min_effect: float) -> str:
    """The one line every consumer shows for a weak effect: how small the change is, against what."""
    delta = clean_metric - corr_metric
    share = abs(delta) / abs(clean_metric) if clean_metric else math.inf
    return (
        f"this corruption barely changes the answer (Δ = {delta:+.3f}, {share:.1%} of the clean logit difference "
        f"{clean_metric:+.3f}, below min_effect {min_effect:.1%})"
    )


def _warn_if_weak(clean_metric: float, corr_metric: float, min_effect: float, answer_str: str) -> None:
    if not is_weak(clean_metric, corr_metric, min_effect):
        return
    warnings.warn(
        f"For {answer_str!r}, {weak_note(clean_metric, corr_metric, min_effect)}: the corrupted run scores "
        f"{corr_metric:+.3f}. Recovery divides by Δ, so here it is noise; the result is flagged "
        "(weak_effect) and keeps raw_change (patched - corrupted logit difference), which its plot shows instead. "
        'Use a stronger corruption: change an operand ("what is 1 + 1" -> "what is 3 + 1") or inject more '
        "tokens (tl.inject(..., n=3)). min_effect=0 turns this check off.",
        WeakCorruptionWarning,
        stacklevel=3,
    )


def attribution_patch(
    model,
    clean_prompt: str,
    corrupted_prompt: str,
    answer,
    what: str = "resid_pre",
    direction: str = "denoise",
    distractors=None,
    alignment=None,
    *,
    min_effect: float | None = None,
    prepend_bos: bool | None = None,
) -> PatchingResult:
    """Estimate every cell of `patch()` at once from one backward pass (attribution patching).

    Attribution patching (Nanda 2023; Syed et al. 2023) replaces each patched run by its first-order
    Taylor estimate around the run being patched: the metric changes by about
    `(a_other - a_base) . d metric / d a_base`. So one forward of the other prompt and one forward
    plus one backward of the base prompt give the whole layer x position map, the head map, or any
    other `what` that `patch()` sweeps, on the same normalised scale (1 = clean, 0 = corrupted).

    The passes are TransformerLens's own: `transformer_lens.tools.analysis.attribution_patching.
    cache_activation_and_gradient` caches the activations and, through backward hooks, their
    gradients. TransformerLens's `attribution_patch` scores heads (per position, from `hook_z`)
    and MLP outputs, and for equal-length prompts these scores equal its `node_scores` (a test
    checks it). tracelib adds what it lacks: the residual stream (`resid_pre`, `resid_post`),
    `attn_out`, the per-layer "all positions" cells, the noising direction, the alignment of prompts
    of different lengths (TransformerLens refuses them), and the normalisation.

    GQA (Qwen2.5): head cells are read at `hook_z`, one vector per query head, so grouped K/V heads
    need no special case. TransformerLens refuses GQA only for its edge granularity (edges into
    the shared K/V inputs), which tracelib does not use.

    The estimate is linear: it is good where a patch moves the run a little, and can be far off
    where a patch flips an attention pattern or a saturated nonlinearity (often at layer 0's
    operand positions). Compare it with `patch()` before trusting it (`compare_patching`).

    Args:
        model, clean_prompt, corrupted_prompt, answer, what, direction, distractors, alignment,
            min_effect, prepend_bos: as in `patch()`.

    Returns:
        A `PatchingResult` with `method="attribution"`. Cells with no counterpart are NaN;
        `raw_change` is the estimated patched - corrupted logit difference.

    Raises:
        SameMetricError: the clean and corrupted logit differences are equal.
        TypeError, ValueError: bad arguments, as in `patch()`.

    Warns:
        WeakCorruptionWarning: as in `patch()`: recovery is noise, read `raw_change`.
    """
    from transformer_lens.tools.analysis.attribution_patching import cache_activation_and_gradient

    check_model_arg(model, "attribution_patch")
    check_what(what)
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if model.training:
        raise ValueError("attribution_patch() needs the model in eval() mode (tl.load_model leaves it so).")
    min_effect = check_min_effect(min_effect)
    clean, corrupted, alignment = resolve_pair(
        model, clean_prompt, corrupted_prompt, answer, distractors, alignment, prepend_bos
    )
    n_layers = model.cfg.n_layers
    names = [ATTRIBUTION_HOOKS[what].format(layer=layer) for layer in range(n_layers)]
    # TransformerLens's backward hook never fires at the most upstream cached point, and its
    # fallback cannot reach a reshaped view such as `hook_z`; caching `hook_embed` as well keeps
    # every point of interest downstream of one.
    cached = ["hook_embed", *names]
    rivals: list[int] = list(clean.distractors)

    def metric(logits: Tensor) -> Tensor:
        if not rivals:  # as patch() does: the clean run's strongest non-answer token (the clean run goes first)
            ranked = logits[0, -1].detach().topk(2).indices.tolist()
            rivals.append(ranked[1] if ranked[0] == clean.target else ranked[0])
        return logit_diff(logits[:, -1].double(), clean.target, rivals)[0]

    device = model.cfg.device
    base_is_clean = direction == "noise"
    with torch.enable_grad():
        clean_run = cache_activation_and_gradient(
            model, clean.tokens[None].to(device), metric, names_filter=cached, compute_gradient=base_is_clean
        )
        corr_run = cache_activation_and_gradient(
            model, corrupted.tokens[None].to(device), metric, names_filter=cached, compute_gradient=not base_is_clean
        )
    clean_metric, corr_metric = clean_run.metric.item(), corr_run.metric.item()
    span = _check_span(clean_metric, corr_metric)
    _warn_if_weak(clean_metric, corr_metric, min_effect, clean.target_str)
    if base_is_clean:
        base, base_run, source_run = clean, clean_run, corr_run
        mapping = invert_alignment(alignment, len(clean.tokens))
    else:
        base, base_run, source_run, mapping = corrupted, corr_run, clean_run, alignment

    _, by_pos, by_head = WHATS[what]
    aligned = torch.tensor([i for i, j in enumerate(mapping) if j is not None], dtype=torch.long)
    sources = torch.tensor([j for j in mapping if j is not None], dtype=torch.long)
    per_layer = []
    for name in names:
        act = base_run.activations[name][0].double().cpu()
        grad = base_run.gradients[name]
        if grad is None:
            raise RuntimeError(f"TransformerLens returned no gradient at {name}; the metric does not depend on it.")
        grad = grad[0].double().cpu()
        other = source_run.activations[name][0].double().cpu()
        # score[pos (, head)]: (a_other - a_base) . g, summed over the last (feature) axis.
        score = torch.full(act.shape[:-1], math.nan, dtype=torch.float64)
        score[aligned] = ((other[sources] - act[aligned]) * grad[aligned]).sum(-1)
        per_layer.append(score)
    scores = torch.stack(per_layer)  # [layer, pos] or [layer, pos, head]
    if by_head:
        scores = scores.transpose(1, 2)  # [layer, head, pos]
    if not by_pos:
        # A patch of every aligned position at once: to first order, the sum of the single ones.
        scores = scores.nansum(-1) if len(aligned) else torch.full(scores.shape[:-1], math.nan, dtype=torch.float64)
    # The estimate of patched - base, measured from the corrupted run as patch() measures it.
    raw = scores + (span if base_is_clean else 0.0)
    values = scores / span + (1.0 if base_is_clean else 0.0)
    dims: tuple[str, ...] = ("layer",) + (("head",) if by_head else ()) + (("position",) if by_pos else ())
    axis = {
        "layer": [f"L{i}" for i in range(n_layers)],
        "head": [f"H{i}" for i in range(model.cfg.n_heads)],
        "position": token_labels(base.str_tokens),
    }
    return PatchingResult(
        values=values.float(),
        dims=dims,
        labels=tuple(axis[d] for d in dims),
        what=what,
        direction=direction,
        clean_metric=clean_metric,
        corrupted_metric=corr_metric,
        answer_str=clean.target_str,
        distractor_strs=[token_str(model, t) for t in rivals],
        str_tokens=list(base.str_tokens),
        alignment=list(mapping),
        method="attribution",
        raw_change=raw.float(),
        min_effect=min_effect,
        **_made_by(model),
    )


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
class PatchingAgreement:
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
    model_name: str = ""
    weights_fingerprint: str = ""

    @property
    def identity(self) -> ModelIdentity:
        """The model both results came from: its name and weights fingerprint."""
        return ModelIdentity(self.model_name, self.weights_fingerprint)

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
class ReadableVsCausal:
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
    model_name: str = ""
    weights_fingerprint: str = ""

    @property
    def identity(self) -> ModelIdentity:
        """The model the trace and the sweeps came from: its name and weights fingerprint."""
        return ModelIdentity(self.model_name, self.weights_fingerprint)

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
