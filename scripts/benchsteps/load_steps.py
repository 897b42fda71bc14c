"""The load steps (`load`, `load_fp16`, `load_bf16`, `load_tl`) and the simulated Colab run (`colab`)."""

from __future__ import annotations

import time
import warnings
from unittest import mock

import torch
from transformer_lens.model_bridge import TransformerBridge

import tracelib as tl
from benchsteps.memory import AnonPeak, gpu_peak, gpu_reset, proc_status, release_free_memory, reset_peak
from benchsteps.models import load, resident_param_bytes, weight_bytes
from benchsteps.prompts import pick_prompt
from tracelib.lean_processing import LeanLoadWarning
from tracelib.models import _resolve_source, default_dtype, estimate_parameters

T4_MEMORY = 15_835_660_288  # bytes a T4 reports (torch.cuda.get_device_properties().total_memory)


def measure_load(source: str, loader: str, dtype: str = "float32") -> dict:
    """One load, split at boot_transformers' return into boot and processing.

    `boot_*` covers everything up to the booted bridge (resolving the source, counting
    parameters, boot_transformers); `compat_*` everything from there to the model being returned.
    boot_transformers is wrapped rather than enable_compatibility_mode because the lean loader
    fingerprints the latter's source, and would (rightly) refuse a wrapped one.
    """
    phases = {}
    original = TransformerBridge.__dict__["boot_transformers"]
    boot = TransformerBridge.boot_transformers

    def instrumented(*args, **kwargs):
        bridge = boot(*args, **kwargs)
        phases["boot_s"] = time.perf_counter() - phases["t0"]
        status = proc_status()
        phases["boot_hwm"], phases["boot_rss"] = status["VmHWM"], status["VmRSS"]
        reset_peak()
        return bridge

    release_free_memory()
    base = proc_status()
    TransformerBridge.boot_transformers = staticmethod(instrumented)
    reset_peak()
    phases["t0"] = time.perf_counter()
    try:
        with warnings.catch_warnings(), AnonPeak() as anon:
            # A lean step that silently fell back would report TransformerLens's peak as ours.
            warnings.simplefilter("error", LeanLoadWarning)
            model = load(source, loader, dtype)
    finally:
        TransformerBridge.boot_transformers = original
    total = time.perf_counter() - phases.pop("t0")
    after = proc_status()  # VmHWM: the peak since processing began
    release_free_memory()
    settled = proc_status()
    weights = weight_bytes(source, dtype)
    peak = max(phases["boot_hwm"], after["VmHWM"])
    return {
        "loader": loader,
        "dtype": dtype,
        "time_s": total,
        "boot_s": phases["boot_s"],
        "compat_s": total - phases["boot_s"],
        "base_rss": base["VmRSS"],
        "boot_peak": phases["boot_hwm"],
        "boot_rss": phases["boot_rss"],
        "compat_peak": after["VmHWM"],
        "peak_rss": peak,
        "peak_over_base": peak - base["VmRSS"],
        "rss_after": after["VmRSS"],
        "rss_after_trim": settled["VmRSS"],
        "rss_file_after_trim": settled["RssFile"],
        "weights_bytes": weights,
        "resident_param_bytes": resident_param_bytes(model),
        "peak_over_weights": (peak - base["VmRSS"]) / weights,
        "anon_peak": anon.peak,
        "anon_peak_over_weights": (anon.peak - base["RssAnon"]) / weights,
        # On a GPU: the load's peak device memory (from process start) and what stays allocated.
        "gpu_peak": gpu_peak(),
        "gpu_after": gpu_reset(),
    }


def t4_default_dtype(n_params: int) -> str:
    """The dtype `tl.load_model` picks for this many parameters on a T4 (no bf16, 15.8 GB)."""
    props = mock.Mock(total_memory=T4_MEMORY)
    with (
        mock.patch.object(torch.cuda, "get_device_properties", lambda device: props),
        mock.patch.object(torch.cuda, "is_bf16_supported", lambda: False),
    ):
        return str(default_dtype(torch.device("cuda"), n_params)).removeprefix("torch.")


def measure_colab(source: str) -> dict:
    """Load as on a T4 (its default dtype), on the CPU, then trace once; runs inside the 12 GiB cap."""
    dtype = t4_default_dtype(estimate_parameters(_resolve_source(source)[0]))
    base = proc_status()
    t0 = time.perf_counter()
    model = tl.load_model(source, device="cpu", dtype=getattr(torch, dtype))
    load_s = time.perf_counter() - t0
    load_peak = proc_status()["VmHWM"]
    resolved = pick_prompt(model)
    t0 = time.perf_counter()
    result = tl.trace(model, resolved.prompt, resolved.answer)
    trace_s = time.perf_counter() - t0
    return {
        "dtype": dtype,
        "load_s": load_s,
        "trace_s": trace_s,
        "base_rss": base["VmRSS"],
        "load_peak_rss": load_peak,
        "peak_rss": proc_status()["VmHWM"],
        "weights_bytes": weight_bytes(source, dtype),
        "reconstruction_ok": result.dla.reconstruction.ok,
    }
