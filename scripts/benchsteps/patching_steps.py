"""The patching step: tracelib's resid_pre sweep against TransformerLens's, and attribution patching."""

from __future__ import annotations

import torch
from transformer_lens import patching as tl_patching

import tracelib as tl
from benchsteps.memory import Kept, measure, model_held, timed
from benchsteps.models import load
from benchsteps.prompts import patch_prompts
from tracelib.batching import auto_batch_size
from tracelib.patching import logit_diff, prepare


def measure_patch(source: str, repeat: int, loader: str, tool: str) -> dict:
    """The resid_pre patching sweep by tracelib (`tool="tracelib"`) or TransformerLens (`"tl"`).

    Each runs in its own process, so each peak RSS is its own. Both return the normalised values
    (1 = clean, 0 = corrupted) so that the caller can check they agree. The warm-up is one plain
    forward pass, not a whole sweep: on the Qwen shape a TransformerLens sweep takes minutes.
    """
    model = load(source, loader)
    held = model_held()
    clean, corrupted = patch_prompts(model, source)
    device = model.cfg.device
    clean_tokens = clean.prompt_tokens[None].to(device)
    _, _, clean_metric, corr_metric, setup = prepare(
        model, clean.prompt, corrupted.prompt, clean.answer, "denoise", None, None, []
    )
    n_cells = model.cfg.n_layers * len(corrupted.prompt_tokens)
    extra = {
        "clean": clean.prompt,
        "corrupted": corrupted.prompt,
        "str_tokens": corrupted.prompt_str_tokens,
        "clean_metric": clean_metric,
        "corrupted_metric": corr_metric,
        "cells": n_cells,
    }
    if tool == "tracelib":
        extra["batch_size"] = auto_batch_size(model, len(corrupted.prompt_tokens), n_cells)

        def sweep():
            return tl.patch(model, clean.prompt, corrupted.prompt, clean.answer, what="resid_pre").values
    else:

        def metric(logits):
            diff = logit_diff(logits[:, -1], setup.target, setup.distractors)[0]
            return (diff - corr_metric) / (clean_metric - corr_metric)

        @torch.no_grad()
        def sweep():
            # TransformerLens needs the clean run's cache too; tracelib's time includes both runs.
            _, cache = model.run_with_cache(clean_tokens)
            return tl_patching.get_act_patch_resid_pre(model, setup.base_tokens.to(device), cache, metric)

    with torch.no_grad():
        model(clean_tokens)  # warm-up
    fn = Kept(sweep)
    result = measure(fn, repeat, held, warmup=False)
    if tool == "tracelib":
        extra.update(measure_attribution(model, clean, corrupted, fn.out, max(repeat, 5)))
    return {**result, "values": fn.out.float().cpu().tolist(), **extra}


def measure_attribution(model, clean, corrupted, exact, repeat: int) -> dict:
    """tl.attribution_patch's resid_pre map: its time in forward passes, and its agreement with exact patching.

    Runs after the exact sweep's peak is read, so it does not change the sweep's memory figures.
    """
    tokens = corrupted.prompt_tokens[None].to(model.cfg.device)
    forward = torch.no_grad()(lambda: model(tokens))
    estimate = Kept(lambda: tl.attribution_patch(model, clean.prompt, corrupted.prompt, clean.answer, what="resid_pre"))
    forward_s, _ = timed(forward, repeat)
    attribution_s, _ = timed(estimate, repeat)
    x, y = exact.flatten().double(), estimate.out.values.flatten().double()
    keep = ~(x.isnan() | y.isnan())
    pearson = torch.corrcoef(torch.stack([x[keep], y[keep]]))[0, 1].item()
    return {"forward_s": forward_s, "attribution_s": attribution_s, "attribution_pearson": pearson}
