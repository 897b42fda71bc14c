"""Benchmark tracelib against plain TransformerLens on realistic model shapes (`make bench`).

Models are built from configs (random init) with the real GPT-2 / Qwen2.5 tokenizers, using the
helpers in tests/conftest.py, so nothing is downloaded:

    tiny   the bundled tiny-arith (4 layers, d_model 128)
    gpt2   GPT-2-small-shaped: 12 layers, d_model 768, 12 heads, vocab 50257
    qwen   Qwen2.5-1.5B-shaped: hidden 1536, 28 layers, 12 heads, 2 KV heads, MLP 8960, vocab 151936
    smollm2  the real, trained SmolLM2-135M-Instruct (Llama: 30 layers, d_model 576, 9 heads, 3 KV
           heads, vocab 49152), dequantized from the test fixture's GGUF file (`make fixture`;
           fetched here if missing). Its steps trace the running example, "what is 1 + 1 = " -> "2",
           and patch it against "what is 1 + 2 = "; `--layers` does not apply to it.

Every measurement runs in a fresh subprocess, so its peak RSS (VmHWM) is its own. Wall times are
the median of `--repeat` runs after one warm-up. Forward passes run under torch.no_grad(), as
trace() does. Usage:

    .venv/bin/python scripts/bench.py                         # all three, full shapes
    .venv/bin/python scripts/bench.py --models tiny,gpt2 --repeat 3
    .venv/bin/python scripts/bench.py --models qwen --layers 4 --out /tmp/qwen4.json
    .venv/bin/python scripts/bench.py --workdir /tmp/bench_models   # keep/reuse built models
    .venv/bin/python scripts/bench.py --models qwen --steps load,load_fp16,load_bf16,colab
    .venv/bin/python scripts/bench.py --models tiny,qwen --steps patch_resid_pre --threads 1

Each step loads the model with `tl.load_model`, whose lean weight processing peaks at about one
copy of the weights. `load_tl` measures TransformerLens's own processing (`lean=False`, about
3.5x the fp32 weights: 22 GiB for the full Qwen shape) for comparison; a step whose load is
predicted not to fit in the memory available is skipped and listed under the table.

`patch_resid_pre` times `tl.patch(..., what="resid_pre")` (tiny: "what is 1 + 1" vs "what is 3 + 1";
the others: the PROMPT_TOKENS-token prompt vs a copy with one digit token changed) and, in a process
of its own, TransformerLens's `run_with_cache(clean)` + `get_act_patch_resid_pre` with the same
normalised metric. It reports the time ratio (target <= 0.5), tracelib's batch size and both peak
RSS, and fails if the two sweeps disagree beyond float32 rounding. A TransformerLens sweep on the
Qwen shape takes minutes, so it is timed `--patch-repeat` times (default 1) after a one-forward
warm-up. On a shared 2-core machine `--threads 1` gives steadier times: two torch threads wait on
each other whenever another process holds a core.

`colab` simulates Colab's free tier: the Qwen2.5-1.5B shape loaded as `load_model` would on a T4
(the dtype it picks there), on the CPU, in a process whose memory is capped at 12 GiB by a cgroup
(the host-side worst case: the whole model in host memory), then one trace.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPT_TOKENS = 12
ANSWER = " 2"
MODELS = ("tiny", "gpt2", "qwen", "qwen05", "smollm2")
# Each step runs in its own process: (name, what it times).
BATCH_PROMPTS = 100
STEPS = (
    ("load", "tl.load_model(folder), fp32: boot_transformers + lean enable_compatibility_mode"),
    ("load_fp16", "the same in fp16"),
    ("load_bf16", "the same in bf16"),
    ("load_tl", "tl.load_model(folder, lean=False), fp32: TransformerLens's own weight processing"),
    ("colab", "Colab free tier: load as on a T4, under a 12 GiB cgroup cap, then one trace"),
    ("forward", "model(tokens)"),
    ("run_with_cache", "model.run_with_cache(tokens)"),
    ("trace", "tl.trace(model, prompt, answer)"),
    ("trace_summary", "tl.trace(...).summary(): what users pay, the lenses' lazy prob and rank included"),
    ("neuron_dla_all_pos", "post * (W_out @ dir) / scale, every layer and position, given a cache"),
    ("naive_decomp", "cache.get_full_resid_decomposition(expand_neurons=True, pos_slice=-1)"),
    ("naive_decomp_proj", "the same with project_output_onto=dir"),
    ("save_load", "trace.save(folder, model) then tl.load_reference(folder, model=model): a reference round trip"),
    ("trace_batch", f"tl.trace(model, {BATCH_PROMPTS} prompts, their answers): one call"),
    ("trace_single", f"the same {BATCH_PROMPTS} prompts, one tl.trace call each"),
    ("run_with_cache_batch", f"model.run_with_cache on the same {BATCH_PROMPTS} prompts, right-padded as trace pads"),
    ("forward_long", "model(tokens) under no_grad at each --lengths prompt length (fresh process each)"),
    ("trace_long", "tl.trace at each --lengths prompt length (fresh process each)"),
    (
        "patch_resid_pre",
        "tl.patch(model, clean, corrupted, answer, what='resid_pre'), and in a process of its own TransformerLens's "
        "run_with_cache(clean) + get_act_patch_resid_pre on the same tokens with the same normalised metric",
    ),
)
# Issue 10: batching (BATCH_PROMPTS prompts, one trace call against one call each, and against a
# batched run_with_cache of the same padded tokens) and scale with prompt length.
BATCH_STEPS = ("trace_batch", "trace_single", "run_with_cache_batch")
LONG_STEPS = ("forward_long", "trace_long")
LENGTHS = (128, 512, 2048)
SCALE_TARGETS = {
    "trace / run_with_cache, one prompt": 1.2,
    # What users pay: summary() reads both lenses' full-vocabulary prob and rank (issue 19).
    "trace + summary() / run_with_cache, one prompt": 1.5,
    "one call per prompt / one batched call (>=)": 10.0,
    "batched trace / batched run_with_cache": 1.3,
    "trace peak / forward peak": 1.1,
}
# The shapes each target is set for (issue 10); on other models, and at lengths short of the
# longest, the ratio is shown for information, with no verdict.
SCALE_MODELS = {
    "trace / run_with_cache, one prompt": ("qwen05", "qwen"),
    "trace + summary() / run_with_cache, one prompt": ("qwen05",),
    "one call per prompt / one batched call (>=)": ("tiny",),
    "batched trace / batched run_with_cache": ("qwen05",),
    "trace peak / forward peak": ("qwen05",),
}
# The patching step's prompts on the bundled model; the other models use a PROMPT_TOKENS-token
# prompt and a copy of it with one digit changed (`corrupt_prompt`).
TINY_PATCH = ("what is 1 + 1", "what is 3 + 1")
# The real fixture's running example: (clean prompt, corrupted prompt, answer). The corruption
# really changes the answer ("3" beats "2").
SMOLLM2_TASK = ("what is 1 + 1 = ", "what is 1 + 2 = ", "2")
PATCH_TARGET = 0.5  # tracelib's resid_pre sweep time / TransformerLens's (issue 9)
ATTRIBUTION_TARGET = 4.0  # attribution_patch time / one forward pass (issue 9)
# Words to pad prompts to exactly PROMPT_TOKENS tokens; every tokenizer here knows them.
_FILLER = ("Q:", "what", "is", "1", "+", "1", "and", "what", "is", "3", "+", "4", "so")


# ---------------------------------------------------------------------------------------------
# Memory and timing helpers (used inside the worker processes).


def proc_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def release_free_memory() -> None:
    """Collect garbage and hand free heap pages back to the OS, so RSS counts live data only."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


class AnonPeak:
    """Samples RssAnon every 5 ms in a thread: the peak of memory that no file backs.

    VmHWM also counts the checkpoint's pages that a load maps from disk (RssFile); the kernel
    can drop those under pressure, so anonymous memory is what decides whether a load fits.
    """

    def __enter__(self):
        import threading

        self.peak, self._stop = proc_status()["RssAnon"], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, proc_status()["RssAnon"])

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, proc_status()["RssAnon"])


# The device the measurement steps run on (`--device`); set in each worker from its spec.
DEVICE = "cpu"


def _sync() -> None:
    """Wait for queued GPU work, so a wall time covers it (nothing on the CPU)."""
    if DEVICE.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def gpu_reset() -> int:
    """On a GPU: reset its peak counter and return the memory allocated now (0 on the CPU)."""
    if not DEVICE.startswith("cuda"):
        return 0
    import torch

    _sync()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def gpu_peak() -> int:
    """The GPU's peak allocated memory since `gpu_reset` (0 on the CPU)."""
    if not DEVICE.startswith("cuda"):
        return 0
    import torch

    _sync()
    return torch.cuda.max_memory_allocated()


def timed(fn, repeat: int) -> tuple[float, list[float]]:
    """Median wall time of `repeat` calls after one warm-up (the warm-up is not counted)."""
    fn()
    times = []
    for _ in range(repeat):
        gc.collect()
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


# ---------------------------------------------------------------------------------------------
# Building the models (in a subprocess: the 28-layer Qwen shape is 6 GB of fp32 weights).


def _conftest():
    sys.path.insert(0, str(REPO / "tests"))
    import conftest  # noqa: PLC0415  (sets HF_HUB_OFFLINE before huggingface_hub loads)

    return conftest


def _fetch_fixture():
    """scripts/fetch_fixture.py, which fetches the real-model fixture (idempotent)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tracelib_fetch_fixture", REPO / "scripts" / "fetch_fixture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def model_spec(name: str, layers: int | None) -> dict:
    if name == "tiny":
        return {"name": "tiny", "source": "tiny-arith", "layers": 4}
    if name == "smollm2":
        return {"name": "smollm2", "source": str(_fetch_fixture().fetch(quiet=True)), "layers": 30}
    if name == "gpt2":
        return {
            "name": "gpt2",
            "arch": "gpt2",
            "config": dict(n_layer=layers or 12, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257),
            "layers": layers or 12,
        }
    if name == "qwen":
        return {
            "name": "qwen",
            "arch": "qwen2",
            "config": dict(
                vocab_size=151936,
                hidden_size=1536,
                intermediate_size=8960,
                num_hidden_layers=layers or 28,
                num_attention_heads=12,
                num_key_value_heads=2,
                max_position_embeddings=32768,
                tie_word_embeddings=True,
                rope_theta=1000000.0,
                rms_norm_eps=1e-6,
            ),
            "save_dtype": "bfloat16",  # as the real checkpoint is stored
            "layers": layers or 28,
        }
    if name == "qwen05":
        return {
            "name": "qwen05",
            "arch": "qwen2",
            "config": dict(
                vocab_size=151936,
                hidden_size=896,
                intermediate_size=4864,
                num_hidden_layers=layers or 24,
                num_attention_heads=14,
                num_key_value_heads=2,
                max_position_embeddings=32768,
                tie_word_embeddings=True,
                rope_theta=1000000.0,
                rms_norm_eps=1e-6,
            ),
            "save_dtype": "bfloat16",
            "layers": layers or 24,
        }
    raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def build(spec: dict, folder: Path) -> None:
    """Random-init model from `spec`, saved with its real tokenizer (tests/conftest.py helpers)."""
    import torch

    conftest = _conftest()
    torch.manual_seed(0)
    if spec["arch"] == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        tokenizer = conftest.gpt2_tokenizer(folder)
        model = GPT2LMHeadModel(GPT2Config(**spec["config"])).eval()
    else:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        tokenizer = conftest.qwen_tokenizer()
        model = Qwen2ForCausalLM(Qwen2Config(**spec["config"])).eval()
    conftest._randomise_norms_and_biases(model)
    if spec.get("save_dtype"):
        model = model.to(getattr(torch, spec["save_dtype"]))
    # Small shards: serialising a shard holds a second copy of it in memory.
    model.save_pretrained(folder, max_shard_size="1GB")
    tokenizer.save_pretrained(folder)
    (folder / "bench_spec.json").write_text(json.dumps(spec, sort_keys=True))


def ensure_built(spec: dict, workdir: Path) -> str:
    """The folder (or bundled name) to load `spec` from, building it if needed."""
    if "source" in spec:
        return spec["source"]
    folder = workdir / f"{spec['name']}-{spec['layers']}L"
    marker = folder / "bench_spec.json"
    if marker.is_file() and json.loads(marker.read_text()) == json.loads(json.dumps(spec, sort_keys=True)):
        return str(folder)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    t0 = time.perf_counter()
    print(f"building {spec['name']} ({spec['layers']} layers) in {folder} ...", file=sys.stderr, flush=True)
    run_worker({"step": "build", "spec": spec, "folder": str(folder)})
    print(f"  built in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return str(folder)


# ---------------------------------------------------------------------------------------------
# The measurements (one step per worker process).


def pick_prompt(model, answer: str = ANSWER):
    """A prompt whose resolved tokens (BOS and any moved whitespace included) number PROMPT_TOKENS."""
    import tracelib as tl

    for start in range(len(_FILLER)):
        for end in range(start + 1, len(_FILLER) + 1):
            prompt = " ".join(_FILLER[start:end])
            resolved = tl.resolve_answer(model, prompt, answer)
            if len(resolved.prompt_tokens) == PROMPT_TOKENS and resolved.is_single_token:
                return resolved
    raise RuntimeError(f"no {PROMPT_TOKENS}-token prompt found for this tokenizer")


def corrupt_prompt(model, resolved):
    """`resolved`'s prompt with one digit changed, so that exactly one of its tokens differs."""
    import tracelib as tl

    prompt = resolved.prompt
    for i, ch in enumerate(prompt):
        if not ch.isdigit():
            continue
        for digit in "3456789012":
            if digit == ch:
                continue
            other = tl.resolve_answer(model, prompt[:i] + digit + prompt[i + 1 :], resolved.answer)
            a, b = resolved.prompt_tokens, other.prompt_tokens
            if other.is_single_token and len(a) == len(b) and int((a != b).sum()) == 1:
                return other
    raise RuntimeError(f"no one-token corruption of {prompt!r} found")


def fixed_task(source: str) -> tuple[str, str, str] | None:
    """(clean, corrupted, answer) for a model with a task of its own (the bundled and the real fixture)."""
    if source == "tiny-arith":
        return (*TINY_PATCH, ANSWER)
    if source.endswith(".gguf"):
        return SMOLLM2_TASK
    return None


def step_prompt(model, source: str):
    """The prompt the one-prompt steps run: the real fixture's running example, else a PROMPT_TOKENS-token one."""
    import tracelib as tl

    if source.endswith(".gguf"):
        clean, _, answer = SMOLLM2_TASK
        return tl.resolve_answer(model, clean, answer)
    return pick_prompt(model)


def patch_prompts(model, source: str):
    """(clean, corrupted) resolved prompts for the patching step."""
    import tracelib as tl

    task = fixed_task(source)
    if task is not None:
        clean, corrupted, answer = task
        return tl.resolve_answer(model, clean, answer), tl.resolve_answer(model, corrupted, answer)
    clean = pick_prompt(model)
    return clean, corrupt_prompt(model, clean)


def measure_patch(source: str, repeat: int, loader: str, tool: str) -> dict:
    """The resid_pre patching sweep by tracelib (`tool="tracelib"`) or TransformerLens (`"tl"`).

    Each runs in its own process, so each peak RSS is its own. Both return the normalised values
    (1 = clean, 0 = corrupted) so that the caller can check they agree. The warm-up is one plain
    forward pass, not a whole sweep: on the Qwen shape a TransformerLens sweep takes minutes.
    """
    import torch

    import tracelib as tl
    from tracelib.batching import auto_batch_size
    from tracelib.patching import logit_diff, prepare

    model = _loader(loader)(source)
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
    state = {}
    if tool == "tracelib":
        extra["batch_size"] = auto_batch_size(model, len(corrupted.prompt_tokens), n_cells)

        def fn():
            state.pop("out", None)
            state["out"] = tl.patch(model, clean.prompt, corrupted.prompt, clean.answer, what="resid_pre").values
    else:
        from transformer_lens import patching as tl_patching

        def metric(logits):
            diff = logit_diff(logits[:, -1], setup.target, setup.distractors)[0]
            return (diff - corr_metric) / (clean_metric - corr_metric)

        def fn():
            # TransformerLens needs the clean run's cache too; tracelib's time includes both runs.
            state.pop("out", None)
            with torch.no_grad():
                _, cache = model.run_with_cache(clean_tokens)
                state["out"] = tl_patching.get_act_patch_resid_pre(model, setup.base_tokens.to(device), cache, metric)
            del cache

    with torch.no_grad():
        model(clean_tokens)  # warm-up
    release_free_memory()
    before = proc_status()
    reset_peak()
    extra["gpu_before"] = gpu_reset()
    times = []
    for _ in range(repeat):
        gc.collect()
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    peak = proc_status()["VmHWM"]
    extra["gpu_peak"] = gpu_peak()
    if tool == "tracelib":
        extra.update(measure_attribution(model, clean, corrupted, state["out"], max(repeat, 5)))
    return {
        "time_s": statistics.median(times),
        "times_s": times,
        "rss_before": before["VmRSS"],
        "peak_rss": peak,
        "peak_over_before": peak - before["VmRSS"],
        "values": state["out"].float().cpu().tolist(),
        **extra,
    }


def measure_attribution(model, clean, corrupted, exact, repeat: int) -> dict:
    """tl.attribution_patch's resid_pre map: its time in forward passes, and its agreement with exact patching.

    Runs after the exact sweep's peak is read, so it does not change the sweep's memory figures.
    """
    import torch

    import tracelib as tl

    tokens = corrupted.prompt_tokens[None].to(model.cfg.device)

    def forward():
        with torch.no_grad():
            model(tokens)

    def estimate():
        state["out"] = tl.attribution_patch(model, clean.prompt, corrupted.prompt, clean.answer, what="resid_pre")

    state: dict = {}
    forward_s, _ = timed(forward, repeat)
    attribution_s, _ = timed(estimate, repeat)
    x, y = exact.flatten().double(), state["out"].values.flatten().double()
    keep = ~(x.isnan() | y.isnan())
    pearson = torch.corrcoef(torch.stack([x[keep], y[keep]]))[0, 1].item()
    return {"forward_s": forward_s, "attribution_s": attribution_s, "attribution_pearson": pearson}


def batch_prompts() -> tuple[list[str], list[str]]:
    """BATCH_PROMPTS sums with one-digit answers, in four phrasings."""
    prompts, answers = [], []
    for form in ("what is {a} + {b}", "{a} + {b} =", "compute {a} + {b}", "what's {a} plus {b}"):
        for a in range(10):
            for b in range(10 - a):
                prompts.append(form.format(a=a, b=b))
                answers.append(f" {a + b}")
    return prompts[:BATCH_PROMPTS], answers[:BATCH_PROMPTS]


def long_prompt(model, length: int):
    """A prompt whose resolved tokens number `length` (within a token or two), answer ANSWER."""
    import tracelib as tl

    ids = model.tokenizer("what is 1 + 1 and 2 + 3 and " * (length // 4 + 8), add_special_tokens=False).input_ids
    resolved = None
    for cut in range(length, 0, -1):
        prompt = model.tokenizer.decode(ids[:cut]).rstrip() + " so 1 + 1 ="
        try:
            resolved = tl.resolve_answer(model, prompt, ANSWER)
        except tl.PromptTooLongError:
            continue
        if len(resolved.prompt_tokens) <= length:
            return resolved
    raise RuntimeError(f"no prompt of at most {length} tokens found")


def measure_scale(step: str, source: str, repeat: int, loader: str, length: int | None = None) -> dict:
    """The batching and prompt-length steps: time, peak RSS (and GPU peak) of one step in a fresh process."""
    import torch

    import tracelib as tl
    from tracelib.trace import build_rows

    model = _loader(loader)(source)
    device = model.cfg.device
    extra: dict = {}
    state: dict = {}
    if step in BATCH_STEPS:
        prompts, answers = batch_prompts()
        extra["prompts"] = len(prompts)
        if step == "trace_batch":

            def fn():
                state.pop("out", None)
                state["out"] = tl.trace(model, prompts, answers)
        elif step == "trace_single":

            def fn():
                state.pop("out", None)
                state["out"] = [tl.trace(model, p, a) for p, a in zip(prompts, answers)]
        else:
            rows = build_rows(model, prompts, answers)
            width = max(len(r.tokens) for r in rows)
            pad = model.tokenizer.pad_token_id or 0
            tokens = torch.full((len(rows), width), pad, dtype=torch.long)
            for i, r in enumerate(rows):
                tokens[i, : len(r.tokens)] = r.tokens
            tokens = tokens.to(device)
            extra["rows"] = len(rows)

            def fn():
                state.pop("out", None)
                with torch.no_grad():
                    state["out"] = model.run_with_cache(tokens)
    else:
        resolved = long_prompt(model, length)
        tokens = resolved.prompt_tokens[None].to(device)
        extra.update(length=length, tokens=int(tokens.shape[1]))
        if step == "forward_long":

            def fn():
                state.pop("out", None)
                with torch.no_grad():
                    state["out"] = model(tokens)
        else:

            def fn():
                state.pop("out", None)
                state["out"] = tl.trace(model, resolved.prompt, resolved.answer)

    release_free_memory()
    before = proc_status()
    reset_peak()
    extra["gpu_before"] = gpu_reset()
    median, times = timed(fn, repeat)
    peak = proc_status()["VmHWM"]
    extra["gpu_peak"] = gpu_peak()
    return {
        "time_s": median,
        "times_s": times,
        "rss_before": before["VmRSS"],
        "peak_rss": peak,
        "peak_over_before": peak - before["VmRSS"],
        **extra,
    }


def scale_rows(results: dict) -> list[tuple[str, str, str, float, float, bool | None]]:
    """Issue 10's targets: (model, measure, detail, value, target, met) from the steps that ran.

    `met` is None where the target is not set (another model, or a length short of the longest).
    """
    out = []

    def verdict(name: str, key: str, ok: bool) -> bool | None:
        return ok if name in SCALE_MODELS[key] else None

    for name, r in results.items():
        st = r["steps"]
        if "trace" in st and "run_with_cache" in st:
            v = st["trace"]["time_s"] / st["run_with_cache"]["time_s"]
            key = "trace / run_with_cache, one prompt"
            out.append(
                (
                    name,
                    key,
                    f"{len(st['trace'].get('str_tokens', [None] * PROMPT_TOKENS))} tokens",
                    v,
                    SCALE_TARGETS[key],
                    verdict(name, key, v <= SCALE_TARGETS[key]),
                )
            )
        if "trace_summary" in st and "run_with_cache" in st:
            v = st["trace_summary"]["time_s"] / st["run_with_cache"]["time_s"]
            key = "trace + summary() / run_with_cache, one prompt"
            out.append(
                (
                    name,
                    key,
                    f"{PROMPT_TOKENS} tokens",
                    v,
                    SCALE_TARGETS[key],
                    verdict(name, key, v <= SCALE_TARGETS[key]),
                )
            )
        if "trace_single" in st and "trace_batch" in st:
            v = st["trace_single"]["time_s"] / st["trace_batch"]["time_s"]
            key = "one call per prompt / one batched call (>=)"
            out.append(
                (
                    name,
                    key,
                    f"{BATCH_PROMPTS} prompts",
                    v,
                    SCALE_TARGETS[key],
                    verdict(name, key, v >= SCALE_TARGETS[key]),
                )
            )
        if "trace_batch" in st and "run_with_cache_batch" in st:
            v = st["trace_batch"]["time_s"] / st["run_with_cache_batch"]["time_s"]
            key = "batched trace / batched run_with_cache"
            out.append(
                (
                    name,
                    key,
                    f"{BATCH_PROMPTS} prompts",
                    v,
                    SCALE_TARGETS[key],
                    verdict(name, key, v <= SCALE_TARGETS[key]),
                )
            )
        for length in sorted({m["length"] for k, m in st.items() if k.startswith("trace_long@")}):
            f, t = st.get(f"forward_long@{length}"), st.get(f"trace_long@{length}")
            if f is None or t is None:
                continue
            key = "trace peak / forward peak"
            gpu = DEVICE.startswith("cuda") or t.get("gpu_peak")
            peak_t, peak_f = (t["gpu_peak"], f["gpu_peak"]) if gpu else (t["peak_rss"], f["peak_rss"])
            v = peak_t / peak_f
            over = (
                (t["peak_over_before"], f["peak_over_before"])
                if not gpu
                else (
                    t["gpu_peak"] - t["gpu_before"],
                    f["gpu_peak"] - f["gpu_before"],
                )
            )
            detail = (
                f"{t['tokens']} tokens; {'GPU' if gpu else 'RSS'} {_gib(peak_t)} vs {_gib(peak_f)}; over the model "
                f"{_gib(over[0])} vs {_gib(over[1])}; time {t['time_s']:.2f} s vs {f['time_s']:.2f} s"
            )
            met = verdict(name, key, v <= SCALE_TARGETS[key]) if length == max(LENGTHS) else None
            out.append((name, key, detail, v, SCALE_TARGETS[key], met))
    return out


def patch_agreement(ours: dict, theirs: dict) -> dict:
    """tracelib's sweep against TransformerLens's: the time ratio and the largest value difference.

    The tolerance is float32 rounding seen through the normalisation: a logit difference carries
    about 1e-6 of the logits' scale in rounding, divided by the clean - corrupted gap.
    """
    import math

    a = [x for row in ours["values"] for x in row]
    b = [x for row in theirs["values"] for x in row]
    if len(a) != len(b):
        raise AssertionError(f"tracelib swept {len(a)} cells, TransformerLens {len(b)}")
    diff = max(abs(x - y) for x, y in zip(a, b))
    gap = abs(ours["clean_metric"] - ours["corrupted_metric"])
    scale = max(1.0, abs(ours["clean_metric"]), abs(ours["corrupted_metric"]))
    tol = max(1e-4, 1e-5 * scale / gap)
    if not math.isfinite(diff) or diff > tol:
        raise AssertionError(f"tracelib and TransformerLens disagree: max |difference| {diff:.2e} > {tol:.2e}")
    return {
        "ratio": ours["time_s"] / theirs["time_s"],
        "max_abs_diff": diff,
        "tolerance": tol,
        "gap": gap,
    }


def weight_bytes(source: str, dtype: str = "float32") -> int:
    """Bytes of the checkpoint's parameters in `dtype` (tied embeddings counted once)."""
    import torch

    from tracelib.models import _resolve_source, estimate_parameters

    return torch.empty((), dtype=getattr(torch, dtype)).element_size() * estimate_parameters(_resolve_source(source)[0])


def measure_estimate(source: str) -> dict:
    """fp32 bytes of the checkpoint, and of the processed model (processing unties embed/unembed)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tracelib.models import _resolve_source

    config = AutoConfig.from_pretrained(_resolve_source(source)[0])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    weights = 4 * sum(p.numel() for p in model.parameters())
    out = model.get_output_embeddings()
    tied = out is not None and out.weight is model.get_input_embeddings().weight
    return {"weights_bytes": weights, "processed_bytes": weights + (4 * out.weight.numel() if tied else 0)}


# Peak RSS of a load: 0.5 GiB of imports plus this many times the processed model in the load's
# dtype (processing unties embed and unembed). Measured: TransformerLens's own processing
# 3.4-3.5x the fp32 model whatever the dtype (it upcasts everything to fp32 first); the lean path
# about 1.2x. A step whose load is predicted not to fit in MemAvailable is skipped (--force runs it).
PEAK_FACTOR = {"lean": 1.5, "transformerlens": 3.6}
LOAD_DTYPE = {"load": "float32", "load_fp16": "float16", "load_bf16": "bfloat16", "load_tl": "float32"}
LOAD_TARGET = 1.5  # peak over imports / weights in the load's dtype (issue 7)
COLAB_CAP = 12 * 2**30  # Colab's free tier has about 12.7 GB of RAM
T4_MEMORY = 15_835_660_288  # bytes a T4 reports (torch.cuda.get_device_properties().total_memory)


def predicted_peak(estimate: dict, loader: str, dtype: str = "float32") -> float:
    size = {"float32": 1.0, "float16": 0.5, "bfloat16": 0.5}[dtype] if loader == "lean" else 1.0
    return 0.5 * 2**30 + PEAK_FACTOR[loader] * estimate["processed_bytes"] * size


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def resident_param_bytes(model) -> int:
    """Bytes of the distinct tensors the loaded model holds (processing unties embed/unembed)."""
    import torch

    seen, total = set(), 0
    tensors = list(model.original_model.parameters()) + list(model.original_model.buffers())
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type == "cpu":
            key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            if key not in seen:
                seen.add(key)
                total += key[1]
    return total


def _loader(name: str, dtype: str = "float32"):
    import torch

    import tracelib as tl

    lean = {"lean": True, "transformerlens": False}[name]
    return lambda source: tl.load_model(source, dtype=getattr(torch, dtype), lean=lean, device=DEVICE)


def measure_load(source: str, loader: str, dtype: str = "float32") -> dict:
    """One load, split at boot_transformers' return into boot and processing.

    `boot_*` covers everything up to the booted bridge (resolving the source, counting
    parameters, boot_transformers); `compat_*` everything from there to the model being returned.
    boot_transformers is wrapped rather than enable_compatibility_mode because the lean loader
    fingerprints the latter's source, and would (rightly) refuse a wrapped one.
    """
    import warnings

    from transformer_lens.model_bridge import TransformerBridge

    from tracelib.lean_processing import LeanLoadWarning

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
            model = _loader(loader, dtype)(source)
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
    from unittest import mock

    import torch

    from tracelib.models import default_dtype

    props = mock.Mock(total_memory=T4_MEMORY)
    with (
        mock.patch.object(torch.cuda, "get_device_properties", lambda device: props),
        mock.patch.object(torch.cuda, "is_bf16_supported", lambda: False),
    ):
        return str(default_dtype(torch.device("cuda"), n_params)).removeprefix("torch.")


def measure_colab(source: str) -> dict:
    """Load as on a T4 (its default dtype), on the CPU, then trace once; runs inside the 12 GiB cap."""
    import torch

    import tracelib as tl
    from tracelib.models import _resolve_source, estimate_parameters

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


def neuron_dla_all_positions(model, cache, direction):
    """DLA of every neuron at every position, projection first: post * (W_out @ u) / scale.

    `u` is the answer direction (centred for LayerNorm models, as trace() does) and `scale` the
    final norm's cached scale at each position. Returns [layer, batch, pos, d_mlp]; never builds a
    [..., d_mlp, d_model] tensor. Reads each block's W_out directly: `model.W_out` would stack
    every layer's weights on each access.
    """
    import torch

    if model.cfg.normalization_type in ("LN", "LNPre"):
        direction = direction - direction.mean()
    post0 = cache["blocks.0.mlp.hook_post"]
    out = torch.empty((model.cfg.n_layers, *post0.shape), dtype=post0.dtype)
    for layer, block in enumerate(model.blocks):
        w_dir = block.mlp.W_out @ direction  # [d_mlp]
        torch.mul(cache[f"blocks.{layer}.mlp.hook_post"], w_dir, out=out[layer])
    out /= cache["ln_final.hook_scale"]  # [batch, pos, 1] broadcasts over d_mlp
    return out


def check_neuron_dla(model, cache, direction, dla) -> float:
    """Largest gap between each layer's neurons summed (+ b_out) and its mlp_out read the same way."""
    if model.cfg.normalization_type in ("LN", "LNPre"):
        direction = direction - direction.mean()
    scale = cache["ln_final.hook_scale"]
    worst = 0.0
    for layer, block in enumerate(model.blocks):
        b_out = getattr(block.mlp, "b_out", None)
        bias = 0.0 if b_out is None else (b_out @ direction)
        want = (cache[f"blocks.{layer}.hook_mlp_out"] @ direction)[..., None] / scale
        got = dla[layer].sum(-1, keepdim=True) + bias / scale
        worst = max(worst, (want - got).abs().max().item() / max(1.0, want.abs().max().item()))
    return worst


def measure_step(step: str, source: str, repeat: int, loader: str) -> dict:
    import torch

    import tracelib as tl

    model = _loader(loader)(source)
    resolved = step_prompt(model, source)
    tokens = resolved.prompt_tokens[None].to(model.cfg.device)
    assert source.endswith(".gguf") or tokens.shape == (1, PROMPT_TOKENS), tokens.shape
    direction = model.W_U[:, resolved.token].detach().clone()
    extra = {"prompt": resolved.prompt, "str_tokens": resolved.prompt_str_tokens, "answer": resolved.answer}
    state = {}

    if step == "forward":

        def fn():
            state.pop("out", None)
            with torch.no_grad():
                state["out"] = model(tokens)
    elif step == "run_with_cache":

        def fn():
            state.pop("out", None)
            with torch.no_grad():
                state["out"] = model.run_with_cache(tokens)
    elif step == "trace":

        def fn():
            state.pop("out", None)
            state["out"] = tl.trace(model, resolved.prompt, resolved.answer)
    elif step == "trace_summary":

        def fn():
            state.pop("out", None)
            state["out"] = tl.trace(model, resolved.prompt, resolved.answer).summary()
    elif step == "save_load":
        traced = tl.trace(model, resolved.prompt, resolved.answer)
        folder = Path(tempfile.mkdtemp(prefix="tracelib-ref-")) / "ref"

        def fn():
            state.pop("out", None)
            traced.save(folder, model)
            state["out"] = tl.load_reference(folder, model=model)
    else:
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens)
        if step == "neuron_dla_all_pos":

            def fn():
                state.pop("out", None)
                with torch.no_grad():
                    state["out"] = neuron_dla_all_positions(model, cache, direction)
        elif step == "naive_decomp":

            def fn():
                state.pop("out", None)
                with torch.no_grad():
                    state["out"] = cache.get_full_resid_decomposition(expand_neurons=True, pos_slice=-1)
        elif step == "naive_decomp_proj":

            def fn():
                state.pop("out", None)
                with torch.no_grad():
                    state["out"] = cache.get_full_resid_decomposition(
                        expand_neurons=True, pos_slice=-1, project_output_onto=direction
                    )
        else:
            raise SystemExit(f"unknown step {step!r}")

    release_free_memory()
    before = proc_status()  # the model (and, for the DLA steps, its cache) resident
    reset_peak()
    extra["gpu_before"] = gpu_reset()
    median, times = timed(fn, repeat)
    peak = proc_status()["VmHWM"]
    extra["gpu_peak"] = gpu_peak()
    if step == "neuron_dla_all_pos":
        with torch.no_grad():
            extra["max_rel_err_vs_mlp_out"] = check_neuron_dla(model, cache, direction, state["out"])
        extra["shape"] = list(state["out"].shape)
    elif step.startswith("naive"):
        extra["shape"] = list(state["out"].shape)
    return {
        "time_s": median,
        "times_s": times,
        "rss_before": before["VmRSS"],
        "peak_rss": peak,
        "peak_over_before": peak - before["VmRSS"],
        **extra,
    }


def worker_main(spec: dict) -> dict:
    import torch

    torch.manual_seed(0)
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    global DEVICE
    DEVICE = spec.get("device") or "cpu"
    if spec["step"] == "build":
        build(spec["spec"], Path(spec["folder"]))
        return {}
    import warnings

    warnings.simplefilter("ignore")
    if spec["step"] == "estimate":
        return measure_estimate(spec["source"])
    if spec["step"] in LOAD_DTYPE:
        loader = "transformerlens" if spec["step"] == "load_tl" else "lean"
        return measure_load(spec["source"], loader, LOAD_DTYPE[spec["step"]])
    if spec["step"] == "colab":
        return measure_colab(spec["source"])
    if spec["step"] in BATCH_STEPS or spec["step"] in LONG_STEPS:
        return measure_scale(spec["step"], spec["source"], spec["repeat"], spec["loader"], spec.get("length"))
    if spec["step"] in ("patch_resid_pre", "patch_resid_pre_tl"):
        tool = "tl" if spec["step"].endswith("_tl") else "tracelib"
        return measure_patch(spec["source"], spec.get("patch_repeat", 3), spec["loader"], tool)
    return measure_step(spec["step"], spec["source"], spec["repeat"], spec["loader"])


def _memory_cgroup(limit: int) -> Path | None:
    """A fresh cgroup-v1 memory group capped at `limit` bytes (swap included), or None if none can be made."""
    root = Path("/sys/fs/cgroup/memory")
    group = root / f"tracelib-bench-{os.getpid()}"
    try:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(limit))
        with contextlib.suppress(OSError):  # only where swap accounting is on
            (group / "memory.memsw.limit_in_bytes").write_text(str(limit))
    except OSError:
        with contextlib.suppress(OSError):
            group.rmdir()
        return None
    return group


def run_worker(spec: dict, cgroup: Path | None = None) -> dict:
    """Run one step in a fresh interpreter; it prints one JSON line tagged BENCH_RESULT last.

    With `cgroup`, the interpreter runs inside that memory group from its first instruction.
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

    def join_cgroup():
        (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        preexec_fn=join_cgroup if cgroup else None,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("BENCH_RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker {spec.get('step')} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("BENCH_RESULT "))


def run_capped(spec: dict, cap: float) -> dict:
    """Run a step again inside a memory cgroup capped at `cap` bytes: did it fit?"""
    group = _memory_cgroup(int(cap))
    if group is None:
        return {"cap_bytes": cap, "enforced": False}
    try:
        run_worker(spec, cgroup=group)
        fit = True
    except RuntimeError:
        fit = False
    finally:
        failcnt = int((group / "memory.failcnt").read_text())
        with contextlib.suppress(OSError):
            group.rmdir()
    return {"cap_bytes": cap, "enforced": True, "fit": fit, "failcnt": failcnt}


def run_colab(spec: dict) -> dict:
    """The colab step inside a 12 GiB memory cgroup: whether it fit, and its peaks."""
    group = _memory_cgroup(COLAB_CAP)
    out = {"cap_bytes": COLAB_CAP, "cap_enforced": group is not None}
    try:
        out.update(run_worker(spec, cgroup=group))
        out["fit"] = True
    except RuntimeError as exc:
        out.update(fit=False, error=str(exc)[-500:])
    finally:
        if group is not None:
            out["cgroup_peak_bytes"] = int((group / "memory.max_usage_in_bytes").read_text())
            out["cgroup_failcnt"] = int((group / "memory.failcnt").read_text())
            with contextlib.suppress(OSError):
                group.rmdir()
    return out


# ---------------------------------------------------------------------------------------------
# Report.

TARGETS = {
    "trace_time_vs_run_with_cache": 1.2,
    "neuron_dla_time_vs_forward": 0.1,
    "trace_peak_vs_run_with_cache_peak": 1.1,
}


def ratios(r: dict) -> dict:
    return {
        "trace_time_vs_run_with_cache": r["trace"]["time_s"] / r["run_with_cache"]["time_s"],
        "neuron_dla_time_vs_forward": r["neuron_dla_all_pos"]["time_s"] / r["forward"]["time_s"],
        # run_with_cache's peak RSS already includes the resident model.
        "trace_peak_vs_run_with_cache_peak": r["trace"]["peak_rss"] / r["run_with_cache"]["peak_rss"],
    }


def _gib(n: float) -> str:
    """Bytes as GiB, or as MiB below 1 GiB."""
    return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.0f} MiB"


def _ms(s: float) -> str:
    return f"{s * 1e3:.2f}" if s < 0.01 else f"{s * 1e3:.1f}" if s < 10 else f"{s * 1e3:.0f}"


def render(results: dict) -> str:
    """Markdown: the steps (time, peak RSS), the loads, and the ratios against the targets."""
    sections = []
    names = list(results)
    step_rows = []
    keys = []
    for step, _ in STEPS[5:]:
        found = {k for n in names for k in results[n]["steps"] if k == step or k.startswith(step + "@")}
        keys += sorted(found, key=lambda k: (len(k), k))
    gpu = any(m.get("gpu_peak") for n in names for m in results[n]["steps"].values() if isinstance(m, dict))

    def peak_cell(m: dict) -> str:
        if m.get("gpu_peak"):
            return f"{_gib(m['gpu_peak'])} (+{_gib(m['gpu_peak'] - m['gpu_before'])})"
        return f"{_gib(m['peak_rss'])} (+{_gib(m['peak_over_before'])})"

    for step in keys:
        if step in LOAD_DTYPE or step == "colab":
            continue
        cells = []
        for n in names:
            m = results[n]["steps"].get(step)
            cells += ["-", "-"] if m is None or "time_s" not in m else [_ms(m["time_s"]), peak_cell(m)]
        step_rows.append(f"| {step} | " + " | ".join(cells) + " |")
    if step_rows:
        what = "GPU peak allocated" if gpu else "peak RSS"
        cols = " | ".join(f"{n} ({results[n]['layers']}L) ms | {n} {what} (+ over model)" for n in names)
        sections.append("\n".join([f"| step | {cols} |", "|---|" + "---:|---:|" * len(names), *step_rows]))

    loads = [(n, s) for n in names for s in LOAD_DTYPE if s in results[n]["steps"]]
    if loads:
        label = {"load": "fp32", "load_fp16": "fp16", "load_bf16": "bf16", "load_tl": "fp32, TL's path"}
        cols = " | ".join(f"{n} ({results[n]['layers']}L) {label[s]}" for n, s in loads)
        lines = [f"| load | {cols} |", "|---|" + "---:|" * len(loads)]
        rows = [
            ("weights in the load's dtype", lambda m: _gib(m["weights_bytes"])),
            (
                "wall s (boot + compat)",
                lambda m: f"{m['time_s']:.1f} ({m['boot_s']:.1f} + {m['compat_s']:.1f})",
            ),
            ("peak RSS (+ over imports)", lambda m: f"{_gib(m['peak_rss'])} (+{_gib(m['peak_over_base'])})"),
            ("boot peak / compat peak", lambda m: f"{_gib(m['boot_peak'])} / {_gib(m['compat_peak'])}"),
            ("RSS after load", lambda m: _gib(m["rss_after_trim"])),
            (
                f"anonymous peak over imports / weights (target <= {LOAD_TARGET})",
                lambda m: (
                    f"{m['anon_peak_over_weights']:.2f}x {'✓' if m['anon_peak_over_weights'] <= LOAD_TARGET else '✗'}"
                ),
            ),
            (
                f"loads under a hard cgroup cap of imports + {LOAD_TARGET} x weights",
                lambda m: (
                    "-"
                    if "capped" not in m
                    else "no cgroup"
                    if not m["capped"]["enforced"]
                    else f"{'✓' if m['capped']['fit'] else '✗'} (cap {_gib(m['capped']['cap_bytes'])})"
                ),
            ),
            (
                f"peak over imports / weights (target <= {LOAD_TARGET})",
                lambda m: f"{m['peak_over_weights']:.2f}x {'✓' if m['peak_over_weights'] <= LOAD_TARGET else '✗'}",
            ),
            ("peak / RSS after load", lambda m: f"{m['peak_rss'] / m['rss_after_trim']:.2f}x"),
        ]
        for title, fmt in rows:
            lines.append(f"| {title} | " + " | ".join(fmt(results[n]["steps"][s]) for n, s in loads) + " |")
        sections.append("\n".join(lines))

    colab = [n for n in names if "colab" in results[n]["steps"]]
    if colab:
        lines = [
            "| Colab free tier (simulated: CPU, 12 GiB cgroup cap) | " + " | ".join(colab) + " |",
            "|---|" + "---:|" * len(colab),
        ]
        for title, fmt in (
            ("dtype load_model picks on a T4", lambda m: m.get("dtype", "?")),
            ("weights", lambda m: _gib(m["weights_bytes"]) if "weights_bytes" in m else "?"),
            ("cap enforced by a cgroup", lambda m: "yes" if m["cap_enforced"] else "no (could not make one)"),
            (
                "fits under 12 GiB (load + trace)",
                # Without a memory cgroup nothing capped the run, so "it ran" says nothing about 12 GiB.
                lambda m: (
                    "not checked: no memory cgroup could be made here"
                    if not m.get("cap_enforced")
                    else "✓"
                    if m["fit"]
                    else "✗ " + m.get("error", "")[-80:]
                ),
            ),
            ("load peak RSS", lambda m: _gib(m["load_peak_rss"]) if m["fit"] else "-"),
            ("peak RSS after trace", lambda m: _gib(m["peak_rss"]) if m["fit"] else "-"),
            ("cgroup peak (page cache included)", lambda m: _gib(m.get("cgroup_peak_bytes", 0))),
            ("load s / trace s", lambda m: f"{m['load_s']:.1f} / {m['trace_s']:.2f}" if m["fit"] else "-"),
        ):
            lines.append(f"| {title} | " + " | ".join(fmt(results[n]["steps"]["colab"]) for n in colab) + " |")
        sections.append("\n".join(lines))

    patched = [n for n in names if "patch_resid_pre" in results[n]["steps"]]
    if patched:
        cols = " | ".join(f"{n} ({results[n]['layers']}L)" for n in patched)
        lines = [
            f"| resid_pre patching sweep (denoise) | {cols} |",
            "|---|" + "---:|" * len(patched),
        ]
        for title, fmt in (
            ("cells (layer x position)", lambda m: str(m["cells"])),
            ("tracelib s", lambda m: f"{m['time_s']:.2f}"),
            ("TransformerLens get_act_patch_resid_pre s", lambda m: f"{m['tl']['time_s']:.2f}"),
            (
                f"tracelib / TransformerLens time (target <= {PATCH_TARGET})",
                lambda m: f"{m['ratio']:.3f} {'✓' if m['ratio'] <= PATCH_TARGET else '✗'}",
            ),
            ("tracelib batch size", lambda m: str(m["batch_size"])),
            ("tracelib peak RSS (+ over model)", lambda m: f"{_gib(m['peak_rss'])} (+{_gib(m['peak_over_before'])})"),
            (
                "TransformerLens peak RSS (+ over model)",
                lambda m: f"{_gib(m['tl']['peak_rss'])} (+{_gib(m['tl']['peak_over_before'])})",
            ),
            ("max |tracelib - TL| (normalised)", lambda m: f"{m['max_abs_diff']:.1e} (tol {m['tolerance']:.0e})"),
            ("attribution_patch s (one forward s)", lambda m: f"{m['attribution_s']:.3f} ({m['forward_s']:.3f})"),
            (
                f"attribution_patch / one forward (target <= {ATTRIBUTION_TARGET})",
                lambda m: (
                    f"{m['attribution_s'] / m['forward_s']:.2f} "
                    f"{'✓' if m['attribution_s'] / m['forward_s'] <= ATTRIBUTION_TARGET else '✗'}"
                ),
            ),
            ("pearson(attribution estimate, exact)", lambda m: f"{m['attribution_pearson']:+.3f}"),
        ):
            cells = " | ".join(fmt(results[n]["steps"]["patch_resid_pre"]) for n in patched)
            lines.append(f"| {title} | {cells} |")
        sections.append("\n".join(lines))

    scale = scale_rows(results)
    if scale:
        lines = ["| issue 10 target | model | measured | target | |", "|---|---|---:|---:|---|"]
        for name, key, detail, value, target, met in scale:
            mark = "(for information)" if met is None else "✓" if met else "✗"
            lines.append(f"| {key} ({detail}) | {name} | {value:.2f} | {target if met is not None else '—'} | {mark} |")
        sections.append("\n".join(lines))

    names = [n for n in names if "ratios" in results[n]]
    if names:
        labels = {
            "trace_time_vs_run_with_cache": "trace() time / run_with_cache time <= 1.2",
            "neuron_dla_time_vs_forward": "neuron DLA (all positions) time / forward time <= 0.1",
            "trace_peak_vs_run_with_cache_peak": "trace() peak / (model + run_with_cache) peak <= 1.1",
        }
        lines = ["| target | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        for key, title in labels.items():
            cells = []
            for n in names:
                value = results[n]["ratios"][key]
                cells.append(f"{value:.3f} {'ok' if value <= TARGETS[key] else 'MISSED'}")
            lines.append(f"| {title} | " + " | ".join(cells) + " |")
        sections.append("\n".join(lines))
    return "\n\n".join(sections) if sections else "(nothing measured)"


def write_atomic(path: Path, data: dict) -> None:
    path = path.resolve()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; give it a normal file's mode
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: tiny,gpt2,qwen")
    parser.add_argument("--layers", type=int, default=None, help="override the GPT-2 and Qwen layer counts")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per step, after one warm-up")
    parser.add_argument(
        "--patch-repeat",
        type=int,
        default=3,
        help="timed sweeps in patch_resid_pre, median reported (TL's takes minutes on Qwen; at least 3 for a median)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench_results.json"), help="JSON results file")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: torch's)")
    parser.add_argument("--workdir", type=Path, default=None, help="build models here and keep them (reused)")
    parser.add_argument("--steps", default=",".join(s for s, _ in STEPS), help="comma-separated subset of: %(default)s")
    parser.add_argument(
        "--loader",
        choices=("lean", "transformerlens"),
        default="lean",
        help="how the measurement steps load the model (the load steps always use their own)",
    )
    parser.add_argument("--force", action="store_true", help="run steps even if predicted not to fit in memory")
    parser.add_argument("--device", default="cpu", help="device for the measurement steps: cpu or cuda")
    parser.add_argument(
        "--lengths",
        type=lambda text: [int(x) for x in text.split(",")],
        default=list(LENGTHS),
        help="prompt lengths for forward_long and trace_long (default: %(default)s)",
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker is not None:
        result = worker_main(json.loads(args.worker))
        print("BENCH_RESULT " + json.dumps(result), flush=True)
        return

    names = [n.strip() for n in args.models.split(",") if n.strip()]
    for n in names:
        model_spec(n, args.layers)  # validates the name
    if args.layers is not None and args.layers < 1:
        parser.error("--layers must be >= 1")
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = set(steps) - {s for s, _ in STEPS}
    if unknown:
        parser.error(f"unknown steps {sorted(unknown)}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tracelib-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    import platform

    results = {}
    load_before = os.getloadavg()
    try:
        for name in names:
            spec = model_spec(name, args.layers)
            source = ensure_built(spec, workdir)
            estimate = run_worker({"step": "estimate", "source": source})
            entry = {"layers": spec["layers"], "spec": spec, "estimate": estimate, "steps": {}, "skipped": {}}
            for step in steps:
                loader = "transformerlens" if step == "load_tl" else "lean" if step in LOAD_DTYPE else args.loader
                need, free = predicted_peak(estimate, loader, LOAD_DTYPE.get(step, "float32")), mem_available()
                if step == "colab":
                    need = 0  # capped by its own cgroup; running out of memory is what it measures
                if need > free and not args.force:
                    reason = f"its load ({loader}) is predicted to peak at {_gib(need)}, {_gib(free)} available"
                    print(f"{name}: {step} skipped: {reason}", file=sys.stderr, flush=True)
                    entry["skipped"][step] = reason
                    continue
                print(f"{name}: {step} ...", file=sys.stderr, flush=True)
                worker = {
                    "step": step,
                    "source": source,
                    "repeat": args.repeat,
                    "threads": args.threads,
                    "loader": args.loader,
                    "device": args.device,
                }
                if step in LONG_STEPS:
                    for length in args.lengths:
                        print(f"{name}: {step} at {length} tokens ...", file=sys.stderr, flush=True)
                        entry["steps"][f"{step}@{length}"] = run_worker({**worker, "length": length})
                    continue
                if step == "patch_resid_pre":
                    worker["patch_repeat"] = args.patch_repeat
                    ours = run_worker(worker)
                    print(f"{name}: patch_resid_pre (TransformerLens) ...", file=sys.stderr, flush=True)
                    theirs = run_worker({**worker, "step": "patch_resid_pre_tl"})
                    agreement = patch_agreement(ours, theirs)  # raises if they disagree
                    print(
                        f"{name}: tracelib {ours['time_s']:.2f} s, TransformerLens {theirs['time_s']:.2f} s, "
                        f"ratio {agreement['ratio']:.3f}; max |difference| {agreement['max_abs_diff']:.2e}",
                        file=sys.stderr,
                        flush=True,
                    )
                    entry["steps"][step] = {**ours, **agreement, "tl": theirs}
                    continue
                entry["steps"][step] = run_colab(worker) if step == "colab" else run_worker(worker)
                if step in LOAD_DTYPE and step != "load_tl":
                    # The proof that counts: the same load under a hard cap of 1.5x the weights
                    # (plus what the imports took), where the kernel must drop mapped file pages.
                    m = entry["steps"][step]
                    entry["steps"][step]["capped"] = run_capped(
                        worker, m["base_rss"] + LOAD_TARGET * m["weights_bytes"]
                    )
            if all(s in entry["steps"] for s in ("forward", "run_with_cache", "trace", "neuron_dla_all_pos")):
                entry["ratios"] = ratios(entry["steps"])
            results[name] = entry
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    table = render(results)
    skipped = [f"- {n}: {step} skipped: {why}" for n, r in results.items() for step, why in r["skipped"].items()]
    if skipped:
        hint = "(try --layers N, or --force)"
        table += "\n\n" + "\n".join(skipped) + "\n" + hint
    print(table)
    import torch

    write_atomic(
        args.out,
        {
            "table": table,
            "targets": TARGETS,
            "patch_repeat": args.patch_repeat,
            "steps": dict(STEPS),
            "repeat": args.repeat,
            "loader": args.loader,
            "prompt_tokens": PROMPT_TOKENS,
            "machine": {
                "cpus": os.cpu_count(),
                "torch_threads": args.threads or torch.get_num_threads(),
                "loadavg_before": load_before,
                "loadavg_after": os.getloadavg(),
                "python": platform.python_version(),
                "torch": torch.__version__,
            },
            "results": results,
        },
    )
    print(f"\nwrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
