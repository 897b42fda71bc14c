"""Attribution patching: the first-order estimate of every cell from one backward pass (`tl.attribution_patch`)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tracelib.answers import token_str
from tracelib.formats import token_labels
from tracelib.identity import check_model_arg
from tracelib.patching.exact import invert_alignment, resolve_pair
from tracelib.patching.result import PatchingResult, _check_span, _made_by, _warn_if_weak, check_min_effect, check_what
from tracelib.patching.runs import DIRECTIONS, WHATS, logit_diff

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
        source_str_tokens=list((corrupted if base_is_clean else clean).str_tokens),
        **_made_by(model),
    )
