"""Patched forward passes: cells, the base run's cache, batching one cell per row, and starting at the layer."""

from __future__ import annotations

import contextlib
import inspect
import math
import warnings
import weakref
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from tracelib.batching import auto_batch_size, progress_bar
from tracelib.formats import TracelibWarning, check_batch_size
from tracelib.forward import real_hook_points

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


class LayerStartWarning(TracelibWarning, RuntimeWarning):
    """Patching cannot start its runs at a layer on this model, so every run starts from the tokens (slower)."""


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
