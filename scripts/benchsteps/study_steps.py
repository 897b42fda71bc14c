"""Issue 20's steps: `tl.study` in one process against the same traces run by hand (`study`,
`study_loop`, timed interleaved in one worker), and the study CLI in one process against two
(`study_2proc`, accelerate launch, gloo on the CPU)."""

from __future__ import annotations

import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tracelib as tl
from benchsteps.memory import measure_interleaved, model_held
from benchsteps.models import load

# What each study runs: the bundled model over 40 arithmetic items x 2 injections; the larger
# shapes (seconds per trace on the CPU) over a handful. The same explicit batch size goes to
# tl.study and to the loop by hand, so both batch (and round) identically.
STUDY_SHAPES = {
    "tiny-arith": {"items": 40, "injections": ["junk:after:3", "repeat:between:3"], "shard_size": 8, "batch_size": 16},
}
OTHER_SHAPE = {"items": 4, "injections": ["junk:after:3"], "shard_size": 2, "batch_size": 4}
SEEDS = (0,)
# study_2proc: every arithmetic item (155) x both injections x 3 seeds through the CLI, one process and
# two: enough work (930 rows) that the study, not the start and the load, takes most of the time.
CLI_SHAPE = {"injections": ["junk:after:3", "repeat:between:3"], "seeds": (0, 1, 2), "shard_size": 8, "batch_size": 16}


def study_shape(source: str) -> dict:
    return STUDY_SHAPES.get(source, OTHER_SHAPE)


def study_items(n: int) -> list:
    """`n` arithmetic items spread over the set (every third: sums and differences, many operands)."""
    items = tl.arithmetic_items()
    return items[:: max(1, len(items) // n)][:n] if n < len(items) else items


def by_hand(model, items, injections, seeds, shard_size: int, batch_size: int) -> list:
    """What tl.study runs, as a user would write it, writing nothing: per shard, one batched trace of the
    clean prompts, tl.inject per (item, injection, seed), one batched trace of the corrupted prompts with
    each clean row's distractors, and damage_report per row. Returns one (counts, corrupted logit diff)
    per row, None where the injection has no place."""
    out = []
    for first in range(0, len(items), shard_size):
        resolved = [tl.resolve_answer(model, it.prompt, it.answer) for it in items[first : first + shard_size]]
        prompts, tokens = [r.prompt for r in resolved], [r.steps[0].target_str for r in resolved]
        clean = tl.trace(model, prompts, tokens, batch_size=batch_size, progress=False)
        jobs, rows = [], []
        for i, (prompt, token) in enumerate(zip(prompts, tokens)):
            for spec in injections:
                s = tl.parse_injection(spec)
                for seed in seeds:
                    try:
                        inj = tl.inject(model, prompt, s.kind, s.where, s.n, seed, answer=token)
                    except ValueError:
                        rows.append(None)
                        continue
                    jobs.append((i, inj, len(rows)))
                    rows.append(None)
        if jobs:
            corrupted = tl.trace(
                model,
                [inj.prompt for _, inj, _ in jobs],
                [tokens[i] for i, _, _ in jobs],
                [list(clean.rows[i].distractors) for i, _, _ in jobs],
                batch_size=batch_size,
                progress=False,
            )
            for j, (i, _, at) in enumerate(jobs):
                report = tl.damage_report(clean, corrupted, row=i, corrupted_row=j)
                rows[at] = (report.counts(), float(corrupted.margin.logit_diff[j]))
        out += rows
    return out


def agreement(study, loop: list) -> dict:
    """The study's rows against the loop's: the same counts, and the largest corrupted-metric difference."""
    frame = study.frame
    if len(frame) != len(loop):
        raise AssertionError(f"the study wrote {len(frame)} rows, the loop made {len(loop)}")
    diff, same = 0.0, True
    for (_, row), mine in zip(frame.iterrows(), loop):
        if mine is None:
            same &= isinstance(row["error"], str)
            continue
        counts, metric = mine
        same &= all(int(row[s]) == n for s, n in counts.items())
        diff = max(diff, abs(float(row["corrupted_metric"]) - metric))
    if not same or not diff <= 1e-4:
        raise AssertionError(f"tl.study and the loop by hand disagree (counts same: {same}, max |diff| {diff:.2e})")
    return {"rows_agree": True, "max_abs_metric_diff": diff}


def measure_study(source: str, repeat: int, loader: str) -> dict:
    """`study` and `study_loop`, interleaved in this process (alternating order), after one warm-up of each.

    Each study writes to a fresh folder (made, and the last one removed, outside the timing). The
    ratio is the median of the per-round ratios study / loop, each pair run back to back.
    """
    model = load(source, loader)
    held = model_held()
    shape = study_shape(source)
    items = study_items(shape["items"])
    injections, shard_size, batch_size = shape["injections"], shape["shard_size"], shape["batch_size"]
    base = Path(tempfile.mkdtemp(prefix="tracelib-bench-study-"))
    folders = iter(base / f"run{i}" for i in range(10**6))
    state = {"out": None}

    def fresh_folder():
        if state["out"] is not None:
            shutil.rmtree(state["out"], ignore_errors=True)
        state["out"] = next(folders)

    def run_study():
        kw = dict(injections=injections, seeds=SEEDS, out=state["out"], shard_size=shard_size, batch_size=batch_size)
        return tl.study(model, items, progress=False, **kw)

    def run_loop():
        return by_hand(model, items, injections, SEEDS, shard_size, batch_size)

    try:
        fresh_folder()
        checked = agreement(run_study(), run_loop())  # the warm-up round, checked
        m = measure_interleaved(
            {"study": run_study, "study_loop": run_loop}, repeat, held, setup={"study": fresh_folder}, warmup=False
        )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    paired = [a / b for a, b in zip(m["study"]["times_s"], m["study_loop"]["times_s"])]
    common = {
        "items": len(items),
        "injections": injections,
        "seeds": list(SEEDS),
        "rows": len(items) * len(injections) * len(SEEDS),
        "shard_size": shard_size,
        "batch_size": batch_size,
    }
    for name in m:
        m[name].update(common, items_per_s=len(items) / m[name]["time_s"])
    m["study"].update(checked, ratio_vs_loop=statistics.median(paired), paired_ratios=paired)
    return m


def _cli(source: str, out: Path, processes: int) -> list[str]:
    """The study CLI over every arithmetic item, in one process or under accelerate launch with `processes`."""
    seeds = ",".join(map(str, CLI_SHAPE["seeds"]))
    study = ["-m", "tracelib", "study", "--model", source, "--prompts", "arithmetic", "--seeds", seeds]
    for spec in CLI_SHAPE["injections"]:
        study += ["--inject", spec]
    study += [
        "--out",
        str(out),
        "--shard-size",
        str(CLI_SHAPE["shard_size"]),
        "--batch-size",
        str(CLI_SHAPE["batch_size"]),
    ]
    if processes == 1:
        return [sys.executable, *study]
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    launch = ["launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1"]
    return [accelerate, *launch, "--mixed_precision", "no", "--dynamo_backend", "no", *study]


def _shard_span(out: Path) -> float:
    """The study's own time from its files: the last shard's mtime minus the manifest's (written before any shard)."""
    shards = [p.stat().st_mtime for p in out.glob("rows-*.parquet")]
    return max(shards) - (out / "manifest.json").stat().st_mtime


def measure_study_2proc(source: str, repeat: int, threads: int | None, device: str) -> dict:
    """The study CLI over the same items in one process and in two (accelerate, gloo on the CPU), alternating.

    Wall: the whole command (interpreters, model load, study, summary). Study: from the manifest
    to the last shard written, read from the files' mtimes (each shard is renamed into place
    when done). Every process runs `threads` torch threads (OMP_NUM_THREADS; `--threads`, default
    1, what accelerate gives each of its processes): the one-process run must not get both cores'
    threads, which on a busy machine wait on each other and slow it several times over.
    """
    threads = threads or 1
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(threads)}
    if not device.startswith("cuda"):
        env["CUDA_VISIBLE_DEVICES"] = ""  # processes on the CPU, over gloo
    base = Path(tempfile.mkdtemp(prefix="tracelib-bench-study2-"))
    walls, spans = {1: [], 2: []}, {1: [], 2: []}
    try:
        for r in range(max(repeat, 1)):
            for processes in (1, 2) if r % 2 == 0 else (2, 1):
                out = base / f"p{processes}-{r}"
                t0 = time.perf_counter()
                proc = subprocess.run(_cli(source, out, processes), capture_output=True, text=True, env=env)
                wall = time.perf_counter() - t0
                if proc.returncode != 0:
                    raise RuntimeError(f"study CLI, {processes} process(es), failed:\n{proc.stderr[-3000:]}")
                if processes == 2 and "ran on 2 processes" not in proc.stdout:
                    raise RuntimeError(f"accelerate did not start 2 processes:\n{proc.stdout[-2000:]}")
                walls[processes].append(wall)
                spans[processes].append(_shard_span(out))
                shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    n_items = len(tl.arithmetic_items())
    out = {
        "items": n_items,
        "injections": CLI_SHAPE["injections"],
        "seeds": list(CLI_SHAPE["seeds"]),
        "rows": n_items * len(CLI_SHAPE["injections"]) * len(CLI_SHAPE["seeds"]),
        "shard_size": CLI_SHAPE["shard_size"],
        "batch_size": CLI_SHAPE["batch_size"],
        "threads": threads,
    }
    for p in (1, 2):
        wall, span = statistics.median(walls[p]), statistics.median(spans[p])
        out[f"p{p}"] = {
            "wall_s": wall,
            "walls_s": walls[p],
            "study_s": span,
            "study_spans_s": spans[p],
            "items_per_s_wall": n_items / wall,
            "items_per_s_study": n_items / span if span > 0 else math.nan,
        }
    out["wall_speedup"] = statistics.median(a / b for a, b in zip(walls[1], walls[2]))
    out["study_speedup"] = statistics.median(a / b for a, b in zip(spans[1], spans[2]))
    out["time_s"] = out["p2"]["wall_s"]
    return out
