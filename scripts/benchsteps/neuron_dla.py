"""tracelib's neuron DLA: what it adds to a trace, checked against a computation by hand.

tracelib computes neuron DLA inside `tl.trace` (`tracelib.attribution.compute_attribution`: per
layer, `post * (W_out @ u)` at each row's final position); no public call computes it alone. So
the step times it inside `tl.trace`, where tracelib runs it, and also as a whole trace's time
minus the same trace's with the projection stubbed out. Both traces cache `mlp.hook_post` at the
final position (a `[row, d_mlp]` slice per layer); neither figure counts that.

The check reads `run_with_cache` (TransformerLens, not tracelib): each neuron's DLA is
`post * (W_out @ d) / scale` at the final position, `d` the logit-difference direction (centred
for LayerNorm models) and `scale` the final norm's cached scale.
"""

from __future__ import annotations

import statistics
import time

import torch

import tracelib as tl
from benchsteps.memory import measure, model_held, sync
from benchsteps.models import load
from benchsteps.prompts import step_prompt
from tracelib import attribution

# fp32 rounding over a sum of d_mlp products, relative to the largest value.
TOLERANCE = 1e-4


class _ZeroProjection:
    """Stands in for a layer's `W_out` in `compute_attribution`: `.to(dtype) @ u.T` is zeros, no weight read."""

    def __init__(self, weight, times: list[float]):
        self.d_mlp = weight.shape[0]

    def to(self, *args, **kwargs):
        return self

    def __matmul__(self, other):
        return other.new_zeros(self.d_mlp, other.shape[-1])


class _TimedProjection:
    """Wraps a layer's `W_out` in `compute_attribution`: `.to(dtype) @ u.T` is the real product, timed."""

    def __init__(self, weight, times: list[float]):
        self.weight, self.times = weight, times

    def to(self, *args, **kwargs):
        sync()
        t0 = time.perf_counter()
        weight = self.weight.to(*args, **kwargs)
        sync()
        self.times.append(time.perf_counter() - t0)
        return _TimedProjection(weight, self.times)

    def __matmul__(self, other):
        sync()
        t0 = time.perf_counter()
        out = self.weight @ other
        sync()
        self.times.append(time.perf_counter() - t0)
        return out


def trace_with(projection, model, prompt, answer) -> tuple:
    """`tl.trace` with each layer's `W_out` read through `projection`: (the trace, the times it recorded).

    With `projection` None, the plain trace (it still checks that tracelib reads `W_out` where the
    other two runs expect it).
    """
    real = attribution.layer_weight
    calls, times = [], []

    def patched(model_, path, layer):
        weight = real(model_, path, layer)
        if path != "mlp.W_out":
            return weight
        calls.append(layer)
        return weight if projection is None else projection(weight, times)

    attribution.layer_weight = patched
    try:
        traced = tl.trace(model, prompt, answer)
    finally:
        attribution.layer_weight = real
    if not calls:
        raise RuntimeError(
            "compute_attribution no longer reads W_out through tracelib.attribution.layer_weight: "
            "update scripts/benchsteps/neuron_dla.py to time tracelib's neuron DLA where it is now"
        )
    return traced, times


def neurons_by_hand(model, tokens, target: int, distractors: list[int]):
    """Each layer's neuron DLA at the final position from run_with_cache, `[layer, neuron]`, and each
    layer's `mlp_out` read the same way, `[layer]` (what its neurons plus `b_out` sum to)."""
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
        direction = model.W_U[:, target] - model.W_U[:, distractors].mean(-1)
        if model.cfg.normalization_type in ("LN", "LNPre"):
            direction = direction - direction.mean()
        scale = cache["ln_final.hook_scale"][0, -1]  # [1]
        neurons, mlp_out = [], []
        for layer, block in enumerate(model.blocks):
            neurons.append(cache[f"blocks.{layer}.mlp.hook_post"][0, -1] * (block.mlp.W_out @ direction) / scale)
            mlp_out.append(cache[f"blocks.{layer}.hook_mlp_out"][0, -1] @ direction / scale[0])
    return torch.stack(neurons).float().cpu(), torch.stack(mlp_out).float().cpu()


def check_neurons(model, traced) -> dict:
    """The largest gaps, relative to the largest value, between tracelib's neurons and `neurons_by_hand`."""
    row = traced.rows[0]
    want, mlp_out = neurons_by_hand(model, row.tokens[None].to(model.cfg.device), row.target, traced.distractors[0])
    got = traced.dla.neurons[:, :, 0].float()
    summed = got.sum(1) + traced.dla.neuron_bias[:, 0].float()
    errors = {
        "max_rel_err_vs_by_hand": ((got - want).abs().max() / max(1.0, want.abs().max().item())).item(),
        "max_rel_err_vs_mlp_out": ((summed - mlp_out).abs().max() / max(1.0, mlp_out.abs().max().item())).item(),
    }
    if max(errors.values()) > TOLERANCE:
        raise AssertionError(f"tracelib's neuron DLA disagrees with run_with_cache by hand: {errors}")
    return errors


def measure_neuron_dla(source: str, repeat: int, loader: str) -> dict:
    """tracelib's neuron DLA in a trace, timed two ways, and the check against `neurons_by_hand`.

    `time_s` is the neuron projection's time inside `tl.trace` (each layer's `W_out @ u`, timed
    where tracelib runs it, in a trace of its own; the `[d_mlp, row]` product after it is not
    counted). `difference_s` is a plain trace's time minus the same trace's without the
    projection: the same extra cost by subtraction, which a loaded machine's noise in two whole
    traces can swamp. At least 5 pairs, each running its two traces in alternating order.
    """
    model = load(source, loader)
    held = model_held()
    resolved = step_prompt(model, source)
    runs = {"plain": [], "stubbed": [], "inside": []}
    projections = {"plain": None, "stubbed": _ZeroProjection}

    def pair():
        for name in ("stubbed", "plain") if len(runs["plain"]) % 2 else ("plain", "stubbed"):
            sync()
            t0 = time.perf_counter()
            trace_with(projections[name], model, resolved.prompt, resolved.answer)
            sync()
            runs[name].append(time.perf_counter() - t0)
        runs["inside"].append(sum(trace_with(_TimedProjection, model, resolved.prompt, resolved.answer)[1]))

    result = measure(pair, max(repeat, 5), held)  # the peak is a trace's: the neurons add [layer, d_mlp]
    plain, stubbed, inside = (runs[k][1:] for k in ("plain", "stubbed", "inside"))  # the first is the warm-up
    differences = [a - b for a, b in zip(plain, stubbed)]
    return {
        **result,
        "time_s": statistics.median(inside),
        "times_s": inside,
        "difference_s": statistics.median(differences),
        "differences_s": differences,
        "trace_s": statistics.median(plain),
        "trace_without_neurons_s": statistics.median(stubbed),
        "prompt": resolved.prompt,
        **check_neurons(model, tl.trace(model, resolved.prompt, resolved.answer)),
    }
