"""Benchmark tracelib against plain TransformerLens on realistic model shapes (`make bench`).

Models are built from configs (random init) with the real GPT-2 / Qwen2.5 tokenizers, using the
helpers in tests/conftest.py, so nothing is downloaded:

    tiny   the bundled tiny-arith (4 layers, d_model 128)
    gpt2   GPT-2-small-shaped: 12 layers, d_model 768, 12 heads, vocab 50257
    qwen   Qwen2.5-1.5B-shaped: hidden 1536, 28 layers, 12 heads, 2 KV heads, MLP 8960, vocab 151936
    qwen05 Qwen2.5-0.5B-shaped: hidden 896, 24 layers, 14 heads, 2 KV heads, MLP 4864, vocab 151936
    smollm2  the real, trained SmolLM2-135M-Instruct (Llama: 30 layers, d_model 576, 9 heads, 3 KV
           heads, vocab 49152), dequantized from the test fixture's GGUF file (`make fixture`;
           fetched here if missing). Its steps trace the running example, "what is 1 + 1 = " -> "2",
           and patch it against "what is 1 + 2 = "; `--layers` does not apply to it.

Every measurement runs in a fresh subprocess, so its peak RSS (VmHWM) is its own. Wall times are
the median of `--repeat` runs after one warm-up. Forward passes run under torch.no_grad(), as
trace() does. Next to each total peak the tables give the activation memory, the peak over the
memory held right after the model was loaded, and its ratio to the reference step's (trace's to
run_with_cache's, trace_long's to forward_long's); the memory targets are judged on it, since the
weights in a total pull every ratio toward 1. Usage:

    .venv/bin/python scripts/bench.py                         # all models, full shapes
    .venv/bin/python scripts/bench.py --models tiny,gpt2 --repeat 3
    .venv/bin/python scripts/bench.py --models qwen --layers 4 --out /tmp/qwen4.json
    .venv/bin/python scripts/bench.py --workdir /tmp/bench_models   # keep/reuse built models
    .venv/bin/python scripts/bench.py --models qwen --steps load,load_fp16,load_bf16,colab
    .venv/bin/python scripts/bench.py --models tiny,qwen --steps patch_resid_pre --threads 1

Each step loads the model with `tl.load_model`, whose lean weight processing peaks at about one
copy of the weights. `load_tl` measures TransformerLens's own processing (`lean=False`, about
3.5x the fp32 weights: 22 GiB for the full Qwen shape) for comparison; a step whose load is
predicted not to fit in the memory available is skipped and listed under the table.

`neuron_dla` times tracelib's own neuron DLA, which `tl.trace` computes: each layer's `W_out @ u`
timed where the trace runs it (judged: <= 0.1 of a forward pass), and for comparison a trace's
time minus the same trace's with the projection stubbed out (median of at least 5 alternating
pairs). It fails if tracelib's neurons disagree with run_with_cache by hand. `neuron_dla_all_pos`,
its old name, selects it too.

`patch_resid_pre` times `tl.patch(..., what="resid_pre")` (tiny: "what is 1 + 1" vs "what is 3 + 1";
the others: the PROMPT_TOKENS-token prompt vs a copy with one digit token changed) and, in a process
of its own, TransformerLens's `run_with_cache(clean)` + `get_act_patch_resid_pre` with the same
normalised metric. It reports the time ratio (target <= 0.5), tracelib's batch size and both peaks,
and fails if the two sweeps disagree beyond float32 rounding. A TransformerLens sweep on the
Qwen shape takes minutes, so it is timed `--patch-repeat` times (default 3) after a one-forward
warm-up. On a shared 2-core machine `--threads 1` gives steadier times: two torch threads wait on
each other whenever another process holds a core.

`routes` times one `tl.routes` call, one `tl.trace` call and one `tl.patch(..., what="resid_pre")` sweep on
the patching step's prompts, interleaved in one worker (median of `--repeat` rounds), with each one's
activation memory and the route's agreement with the sweep (`Routes.agreement`: Spearman, recall,
precision). Judged on smollm2: routes / trace <= 3 and sweep / routes >= 20.

`study` times `tl.study` in one process (items per second; a fresh folder each run) and, in the same
process, interleaved with it, `study_loop`: the same traces by hand (per shard a batched clean trace,
`tl.inject` each, a batched corrupted trace with per-row distractors, `damage_report` per row),
writing nothing; both get the same explicit batch size, and the step fails if their rows disagree.
It reports study / loop (target <= 1.1: what the shards, manifest and reading back cost). tiny: 40
arithmetic items x 2 injections, shards of 8; the other shapes: 4 items x 1 injection.
`study_2proc` runs the study CLI over all 155 items x 2 injections x 3 seeds on tiny, in one
process and in two (`accelerate launch --multi_gpu --num_processes 2`, gloo on the CPU), each
process with `--threads` torch threads (default 1, as accelerate gives its processes), alternating:
the wall time (start and load included) and the study's own time (manifest to last shard, from the
files). On this 2-core machine use `--threads 1`: two threads wait on each other when busy.

`colab` simulates Colab's free tier: the Qwen2.5-1.5B shape loaded as `load_model` would on a T4
(the dtype it picks there), on the CPU, in a process whose memory is capped at 12 GiB by a cgroup
(the host-side worst case: the whole model in host memory), then one trace.

The steps live in scripts/benchsteps/, one module per kind; this script runs them and renders the tables.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# scripts/ holds benchsteps and fetch_fixture. `python scripts/bench.py` (and so every worker) puts
# it on sys.path first; a test that loads this file by its path does not.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from benchsteps.memory import cgroup_usage, gib, mem_available, memory_cgroup  # noqa: E402
from benchsteps.report import render  # noqa: E402, F401 - re-exported for tests
from benchsteps.specs import MODELS, is_built, model_folder, model_spec, predicted_peak  # noqa: E402
from benchsteps.steps import (  # noqa: E402
    ALIASES,
    LENGTHS,
    LOAD_DTYPE,
    LONG_STEPS,
    PROMPT_TOKENS,
    STEPS,
    STUDY_2PROC_MODELS,
    step_loader,
)
from benchsteps.targets import (  # noqa: E402, F401 - patch_agreement and scale_rows re-exported for tests
    COLAB_CAP,
    LOAD_TARGET,
    STUDY_TARGET,
    TARGETS,
    patch_agreement,
    ratios,
    scale_rows,
)

REPO = Path(__file__).resolve().parents[1]


def run_worker(spec: dict, cgroup: Path | None = None) -> dict:
    """Run one step in a fresh interpreter; it prints one JSON line tagged BENCH_RESULT last.

    With `cgroup`, the interpreter runs inside that memory group from its first instruction.
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

    def join_cgroup():
        (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
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
    group = memory_cgroup(int(cap))
    if group is None:
        return {"cap_bytes": cap, "enforced": False}
    try:
        run_worker(spec, cgroup=group)
        fit = True
    except RuntimeError:
        fit = False
    finally:
        failcnt = cgroup_usage(group)["failcnt"]
        with contextlib.suppress(OSError):
            group.rmdir()
    return {"cap_bytes": cap, "enforced": True, "fit": fit, "failcnt": failcnt}


def run_colab(spec: dict) -> dict:
    """The colab step inside a 12 GiB memory cgroup: whether it fit, and its peaks."""
    group = memory_cgroup(COLAB_CAP)
    out = {"cap_bytes": COLAB_CAP, "cap_enforced": group is not None}
    try:
        out.update(run_worker(spec, cgroup=group))
        out["fit"] = True
    except RuntimeError as exc:
        out.update(fit=False, error=str(exc)[-500:])
    finally:
        if group is not None:
            usage = cgroup_usage(group)
            out["cgroup_peak_bytes"], out["cgroup_failcnt"] = usage["peak_bytes"], usage["failcnt"]
            with contextlib.suppress(OSError):
                group.rmdir()
    return out


def ensure_built(spec: dict, workdir: Path) -> str:
    """The folder (or bundled name, or file) to load `spec` from, building it in a worker if needed."""
    if "source" in spec:
        return spec["source"]
    folder = model_folder(spec, workdir)
    if is_built(spec, folder):
        return str(folder)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    t0 = time.perf_counter()
    print(f"building {spec['name']} ({spec['layers']} layers) in {folder} ...", file=sys.stderr, flush=True)
    run_worker({"step": "build", "spec": spec, "folder": str(folder)})
    print(f"  built in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return str(folder)


def run_patching(name: str, worker: dict, patch_repeat: int) -> dict:
    """tracelib's sweep and TransformerLens's, each in a process of its own; raises if they disagree."""
    worker = {**worker, "patch_repeat": patch_repeat}
    ours = run_worker(worker)
    print(f"{name}: patch_resid_pre (TransformerLens) ...", file=sys.stderr, flush=True)
    theirs = run_worker({**worker, "step": "patch_resid_pre_tl"})
    agreement = patch_agreement(ours, theirs)
    print(
        f"{name}: tracelib {ours['time_s']:.2f} s, TransformerLens {theirs['time_s']:.2f} s, "
        f"ratio {agreement['ratio']:.3f}; max |difference| {agreement['max_abs_diff']:.2e}",
        file=sys.stderr,
        flush=True,
    )
    return {**ours, **agreement, "tl": theirs}


def run_model(name: str, args, steps: list[str], workdir: Path) -> dict:
    """Every step on one model, each in a fresh process; steps predicted not to fit are skipped."""
    spec = model_spec(name, args.layers)
    source = ensure_built(spec, workdir)
    estimate = run_worker({"step": "estimate", "source": source})
    entry = {"layers": spec["layers"], "spec": spec, "estimate": estimate, "steps": {}, "skipped": {}}
    for step in steps:
        if step in ("study", "study_loop") and step in entry["steps"]:
            continue  # measured with the other, in one worker
        if step == "study_2proc" and name not in STUDY_2PROC_MODELS:
            print(f"{name}: study_2proc runs on {', '.join(STUDY_2PROC_MODELS)} only", file=sys.stderr, flush=True)
            continue
        loader = step_loader(step, args.loader)
        need, free = predicted_peak(estimate, loader, LOAD_DTYPE.get(step, "float32")), mem_available()
        if step == "colab":
            need = 0  # capped by its own cgroup; running out of memory is what it measures
        if need > free and not args.force:
            reason = f"its load ({loader}) is predicted to peak at {gib(need)}, {gib(free)} available"
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
        elif step == "patch_resid_pre":
            entry["steps"][step] = run_patching(name, worker, args.patch_repeat)
        elif step == "colab":
            entry["steps"][step] = run_colab(worker)
        elif step in ("study", "study_loop"):
            # One worker times both, interleaved: study / loop is a paired ratio on one busy machine.
            entry["steps"].update(run_worker({**worker, "step": "study"}))
        else:
            entry["steps"][step] = m = run_worker(worker)
            if step in LOAD_DTYPE and step != "load_tl":
                # The proof that counts: the same load under a hard cap of 1.5x the weights
                # (plus what the imports took), where the kernel must drop mapped file pages.
                m["capped"] = run_capped(worker, m["base_rss"] + LOAD_TARGET * m["weights_bytes"])
    entry["ratios"] = ratios(entry["steps"])
    return entry


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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated: {','.join(MODELS)}")
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
        return args, [], []
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    for n in names:
        model_spec(n, args.layers)  # validates the name
    if args.layers is not None and args.layers < 1:
        parser.error("--layers must be >= 1")
    steps = [ALIASES.get(s.strip(), s.strip()) for s in args.steps.split(",") if s.strip()]
    unknown = set(steps) - {s for s, _ in STEPS}
    if unknown:
        parser.error(f"unknown steps {sorted(unknown)}")
    return args, names, list(dict.fromkeys(steps))


def main(argv=None) -> None:
    args, names, steps = parse_args(argv)
    if args.worker is not None:
        # Only workers import torch and tracelib: the runner stays small while the steps measure.
        from benchsteps import worker

        print("BENCH_RESULT " + json.dumps(worker.run(json.loads(args.worker))), flush=True)
        return

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tracelib-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results = {}
    load_before = os.getloadavg()
    try:
        for name in names:
            results[name] = run_model(name, args, steps, workdir)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    table = render(results)
    skipped = [f"- {n}: {step} skipped: {why}" for n, r in results.items() for step, why in r["skipped"].items()]
    if skipped:
        table += "\n\n" + "\n".join(skipped) + "\n(try --layers N, or --force)"
    print(table)
    import torch

    write_atomic(
        args.out,
        {
            "table": table,
            "targets": TARGETS,
            "study_target": STUDY_TARGET,
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
