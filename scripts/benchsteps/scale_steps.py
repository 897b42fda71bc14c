"""Issue 10's steps: batching (`trace_batch`, `trace_single`, `run_with_cache_batch`) and prompt length
(`forward_long`, `trace_long`, one process per length)."""

from __future__ import annotations

import torch

import tracelib as tl
from benchsteps.memory import Kept, measure, model_held
from benchsteps.models import load
from benchsteps.prompts import batch_prompts, long_prompt
from benchsteps.steps import BATCH_STEPS
from tracelib.trace import build_rows


def padded_tokens(model, prompts: list[str], answers: list[str]):
    """The prompts' rows as trace builds them, right-padded into one batch as trace pads: (tokens, rows)."""
    rows = build_rows(model, prompts, answers)
    width = max(len(r.tokens) for r in rows)
    pad = model.tokenizer.pad_token_id or 0
    tokens = torch.full((len(rows), width), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r.tokens)] = r.tokens
    return tokens.to(model.cfg.device), len(rows)


def batch_call(step: str, model) -> tuple:
    """What a batching step times, and what it ran on."""
    prompts, answers = batch_prompts()
    extra = {"prompts": len(prompts)}
    if step == "trace_batch":
        return lambda: tl.trace(model, prompts, answers), extra
    if step == "trace_single":
        return lambda: [tl.trace(model, p, a) for p, a in zip(prompts, answers)], extra
    tokens, extra["rows"] = padded_tokens(model, prompts, answers)
    return torch.no_grad()(lambda: model.run_with_cache(tokens)), extra


def long_call(step: str, model, length: int) -> tuple:
    """What a prompt-length step times at `length` tokens, and the prompt's real length."""
    resolved = long_prompt(model, length)
    tokens = resolved.prompt_tokens[None].to(model.cfg.device)
    extra = {"length": length, "tokens": int(tokens.shape[1])}
    if step == "forward_long":
        return torch.no_grad()(lambda: model(tokens)), extra
    return lambda: tl.trace(model, resolved.prompt, resolved.answer), extra


def measure_scale(step: str, source: str, repeat: int, loader: str, length: int | None = None) -> dict:
    """The batching and prompt-length steps: time, peak RSS (and GPU peak) of one step in a fresh process."""
    model = load(source, loader)
    held = model_held()
    call, extra = batch_call(step, model) if step in BATCH_STEPS else long_call(step, model, length)
    return {**measure(Kept(call), repeat, held), **extra}
