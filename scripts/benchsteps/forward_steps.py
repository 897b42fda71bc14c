"""The one-prompt steps: a forward pass, run_with_cache, trace (with and without summary()), a reference
round trip, and TransformerLens's full residual decomposition given a cache.

Forward passes run under torch.no_grad(), as trace() does.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import torch

import tracelib as tl
from benchsteps.memory import Kept, measure, measure_interleaved, model_held
from benchsteps.models import load
from benchsteps.prompts import step_prompt
from benchsteps.steps import PROMPT_TOKENS


def step_call(step: str, model, resolved, tokens):
    """What `step` times, as a call without arguments."""
    if step == "forward":
        return torch.no_grad()(lambda: model(tokens))
    if step == "run_with_cache":
        return torch.no_grad()(lambda: model.run_with_cache(tokens))
    if step == "trace":
        return lambda: tl.trace(model, resolved.prompt, resolved.answer)
    if step == "trace_summary":
        return lambda: tl.trace(model, resolved.prompt, resolved.answer).summary()
    if step == "save_load":
        traced = tl.trace(model, resolved.prompt, resolved.answer)
        folder = Path(tempfile.mkdtemp(prefix="tracelib-ref-")) / "ref"

        def round_trip():
            traced.save(folder, model)
            return tl.load_reference(folder, model=model)

        return round_trip
    if step in ("naive_decomp", "naive_decomp_proj"):
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens)
        onto = model.W_U[:, resolved.token].detach().clone() if step == "naive_decomp_proj" else None
        return torch.no_grad()(
            lambda: cache.get_full_resid_decomposition(expand_neurons=True, pos_slice=-1, project_output_onto=onto)
        )
    raise SystemExit(f"unknown step {step!r}")


def measure_step(step: str, source: str, repeat: int, loader: str) -> dict:
    """Time and peak memory of one step on the step's prompt, in this (fresh) process."""
    model = load(source, loader)
    held = model_held()
    resolved = step_prompt(model, source)
    tokens = resolved.prompt_tokens[None].to(model.cfg.device)
    assert source.endswith(".gguf") or tokens.shape == (1, PROMPT_TOKENS), tokens.shape
    fn = Kept(step_call(step, model, resolved, tokens))
    result = measure(fn, repeat, held)  # for the decompositions, the cache is held before and counted
    if step.startswith("naive"):
        result["shape"] = list(fn.out.shape)
    return {
        **result,
        "prompt": resolved.prompt,
        "str_tokens": resolved.prompt_str_tokens,
        "answer": resolved.answer,
    }


# forward_paired: these steps, timed in turn in one process.
PAIRED = ("run_with_cache", "trace", "trace_summary")


def measure_paired(source: str, repeat: int, loader: str) -> dict:
    """`PAIRED` timed interleaved in one process (`measure_interleaved`): the trace's ratios to
    run_with_cache as the median of the per-round ratios, which a busy machine slows alike."""
    model = load(source, loader)
    held = model_held()
    resolved = step_prompt(model, source)
    tokens = resolved.prompt_tokens[None].to(model.cfg.device)
    fns = {step: Kept(step_call(step, model, resolved, tokens)) for step in PAIRED}
    out = measure_interleaved(fns, max(repeat, 3), held)
    base = out["run_with_cache"]["times_s"]
    return {
        **out,
        "ratios": {step: statistics.median(t / b for t, b in zip(out[step]["times_s"], base)) for step in PAIRED[1:]},
        "prompt": resolved.prompt,
        "str_tokens": resolved.prompt_str_tokens,
        "answer": resolved.answer,
    }
