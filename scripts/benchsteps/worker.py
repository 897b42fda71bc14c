"""One step inside a fresh worker process (`scripts/bench.py --worker SPEC`): dispatch to the step's module."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from benchsteps import memory
from benchsteps.forward_steps import measure_paired, measure_step
from benchsteps.load_steps import measure_colab, measure_load
from benchsteps.models import build, measure_estimate
from benchsteps.neuron_dla import measure_neuron_dla
from benchsteps.patching_steps import measure_patch
from benchsteps.routes_steps import measure_routes
from benchsteps.scale_steps import measure_scale
from benchsteps.steps import BATCH_STEPS, LOAD_DTYPE, LONG_STEPS, step_loader
from benchsteps.study_steps import measure_study, measure_study_2proc


def run(spec: dict) -> dict:
    """Run the step `spec` names (built by the runner's main loop) and return its measurements."""
    torch.manual_seed(0)
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    memory.set_device(spec.get("device") or "cpu")
    step = spec["step"]
    if step == "build":
        build(spec["spec"], Path(spec["folder"]))
        return {}
    warnings.simplefilter("ignore")
    if step == "estimate":
        return measure_estimate(spec["source"])
    if step in LOAD_DTYPE:
        return measure_load(spec["source"], step_loader(step, "lean"), LOAD_DTYPE[step])
    if step == "colab":
        return measure_colab(spec["source"])
    if step in BATCH_STEPS or step in LONG_STEPS:
        return measure_scale(step, spec["source"], spec["repeat"], spec["loader"], spec.get("length"))
    if step in ("patch_resid_pre", "patch_resid_pre_tl"):
        tool = "tl" if step.endswith("_tl") else "tracelib"
        return measure_patch(spec["source"], spec.get("patch_repeat", 3), spec["loader"], tool)
    if step == "routes":  # trace and the resid_pre sweep with it, interleaved
        return measure_routes(spec["source"], spec["repeat"], spec["loader"])
    if step == "study":  # study_loop with it, interleaved
        return measure_study(spec["source"], spec["repeat"], spec["loader"])
    if step == "study_2proc":
        return measure_study_2proc(spec["source"], spec["repeat"], spec.get("threads"), spec.get("device") or "cpu")
    if step == "forward_paired":  # run_with_cache, trace and trace_summary, interleaved
        return measure_paired(spec["source"], spec["repeat"], spec["loader"])
    if step == "neuron_dla":
        return measure_neuron_dla(spec["source"], spec["repeat"], spec["loader"])
    return measure_step(step, spec["source"], spec["repeat"], spec["loader"])
