"""What the bench can run: its steps, in table order, and the sizes they run at."""

from __future__ import annotations

PROMPT_TOKENS = 12
ANSWER = " 2"
BATCH_PROMPTS = 100
LENGTHS = (128, 512, 2048)

# Each step runs in its own process: (name, what it times).
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
    (
        "forward_paired",
        "run_with_cache, trace and trace_summary timed in turn in one process, each ratio the median of the "
        "rounds' ratios: the time targets' verdict, which a busy machine slows alike",
    ),
    (
        "neuron_dla",
        "tracelib's neuron DLA (post * (W_out @ u), every layer) timed inside tl.trace, and as a trace's time "
        "minus the same trace's with it stubbed out; checked against run_with_cache by hand",
    ),
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
    (
        "routes",
        "tl.routes(model, clean, answer), tl.trace(model, clean, answer) and tl.patch(model, clean, corrupted, answer, "
        "what='resid_pre'), timed interleaved in one process on the patching step's prompts (issue 21)",
    ),
    (
        "study",
        "tl.study(model, items, injections=..., shard_size=..., batch_size=...) in one process after the load, a "
        "fresh folder each run (tiny: 40 arithmetic items x junk:after:3, repeat:between:3; others: 4 x junk:after:3)",
    ),
    (
        "study_loop",
        "the same traces by hand, writing nothing: per shard a batched clean trace, tl.inject each, a batched "
        "corrupted trace with per-row distractors, damage_report per row; timed interleaved with study, one process",
    ),
    (
        "study_2proc",
        "python -m tracelib study over all 155 arithmetic items x 2 injections x 3 seeds, one process against "
        "two (accelerate launch --multi_gpu --num_processes 2; gloo on the CPU), --threads each (default 1); tiny only",
    ),
)
# Old step names that still select a step: the neuron DLA step timed a helper written in the bench,
# at every position, until it timed tracelib's own (issue 19).
ALIASES = {"neuron_dla_all_pos": "neuron_dla"}
# The load steps and the dtype each loads in; they measure the load itself, not a step after it.
LOAD_DTYPE = {"load": "float32", "load_fp16": "float16", "load_bf16": "bfloat16", "load_tl": "float32"}
# Issue 10: batching (BATCH_PROMPTS prompts, one trace call against one call each, and against a
# batched run_with_cache of the same padded tokens) and scale with prompt length.
BATCH_STEPS = ("trace_batch", "trace_single", "run_with_cache_batch")
LONG_STEPS = ("forward_long", "trace_long")
# Issue 20: study and study_loop run in one worker, interleaved; study_2proc runs the CLI in subprocesses.
STUDY_STEPS = ("study", "study_loop", "study_2proc")
STUDY_2PROC_MODELS = ("tiny",)
# The steps that measure something after a load, in the steps table's order (the studies have a table of their own).
MEASURED_STEPS = tuple(
    name
    for name, _ in STEPS
    if name not in LOAD_DTYPE and name not in ("colab", "forward_paired") and name not in STUDY_STEPS
)


def step_loader(step: str, default: str) -> str:
    """How `step` loads its model: the load steps their own way, the others `default` (`--loader`)."""
    if step == "load_tl":
        return "transformerlens"
    return "lean" if step in LOAD_DTYPE else default
