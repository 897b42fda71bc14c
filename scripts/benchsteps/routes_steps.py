"""The routes step (issue 21): one tl.routes call against one tl.trace call and one full resid_pre sweep.

All three run in one worker, timed interleaved (`measure_interleaved`), on the patching step's prompts:
the route and the trace read the clean prompt, the sweep patches it into the corrupted one. The
route's agreement with the sweep (`Routes.agreement`) is read from the last round's results.
"""

from __future__ import annotations

import math

import tracelib as tl
from benchsteps.memory import Kept, measure_interleaved, model_held
from benchsteps.models import load
from benchsteps.prompts import patch_prompts


def measure_routes(source: str, repeat: int, loader: str) -> dict:
    """routes, trace and the resid_pre sweep: medians of interleaved rounds, peaks, and the route's agreement."""
    model = load(source, loader)
    held = model_held()
    clean, corrupted = patch_prompts(model, source)
    calls = {
        "routes": Kept(lambda: tl.routes(model, clean.prompt, clean.answer)),
        "trace": Kept(lambda: tl.trace(model, clean.prompt, clean.answer)),
        "sweep": Kept(lambda: tl.patch(model, clean.prompt, corrupted.prompt, clean.answer, what="resid_pre")),
    }
    m = measure_interleaved(calls, repeat, held)
    route, sweep = calls["routes"].out, calls["sweep"].out
    agreement = route.agreement(sweep, allow_weak=True)
    paired = [s / r for s, r in zip(m["sweep"]["times_s"], m["routes"]["times_s"])]
    return {
        **m["routes"],
        "trace": m["trace"],
        "sweep": m["sweep"],
        "clean": clean.prompt,
        "corrupted": corrupted.prompt,
        "answer": clean.answer,
        "str_tokens": route.str_tokens,
        "cells": sweep.values.numel(),
        "route_edges": int(route.edges["on_route"].sum()),
        "edges": len(route.edges),
        "weak_effect": bool(sweep.weak_effect),
        "spearman": agreement.spearman if math.isfinite(agreement.spearman) else None,
        "recall": agreement.recall if math.isfinite(agreement.recall) else None,
        "precision": agreement.precision if math.isfinite(agreement.precision) else None,
        "min_recovery": agreement.min_recovery,
        "routes_vs_trace_rounds": [r / t for r, t in zip(m["routes"]["times_s"], m["trace"]["times_s"])],
        "sweep_vs_routes_rounds": paired,
    }
