"""Exact activation patching: `tl.patch`, one patched forward pass per cell, batched."""

from __future__ import annotations

import math
import operator

import torch

from tracelib.alignment import align_tokens
from tracelib.answers import token_str
from tracelib.formats import check_batch_size, described, token_labels
from tracelib.identity import check_model_arg
from tracelib.patching.result import PatchingResult, _check_span, _made_by, _warn_if_weak, check_min_effect, check_what
from tracelib.patching.runs import DIRECTIONS, WHATS, Cell, PatchSetup, logit_diff, run_cached, run_patched
from tracelib.rows import build_rows


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
        source_str_tokens=list((clean if direction == "denoise" else corrupted).str_tokens),
        **_made_by(model),
    )


def _is_injection(value) -> bool:
    """Whether `value` is what `tl.inject` returns (read by its fields: patching sits beside `ood`, not above it)."""
    return all(hasattr(value, name) for name in ("alignment", "clean_prompt", "prompt")) and not isinstance(
        value, (list, tuple)
    )


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
    if _is_injection(alignment):
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
