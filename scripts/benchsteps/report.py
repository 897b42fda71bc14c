"""The bench's markdown tables: the steps, the loads, Colab, patching, and the targets."""

from __future__ import annotations

import math

from benchsteps.memory import activation_bytes, gib, peak_bytes
from benchsteps.steps import LOAD_DTYPE, MEASURED_STEPS
from benchsteps.targets import (
    ATTRIBUTION_TARGET,
    LOAD_TARGET,
    PATCH_TARGET,
    STUDY_TARGET,
    TARGETS,
    memory_judged,
    ratio,
    ratios,
    reference,
    routes_rows,
    scale_rows,
    study_judged,
)

HEADLINES = {
    "trace_time_vs_run_with_cache": "trace() time / run_with_cache time",
    "neuron_dla_time_vs_forward": "tracelib's neuron DLA (its time inside trace()) / forward time",
    "neuron_dla_difference_vs_forward": "the same by subtraction (trace - trace without it) / forward time",
    "trace_activation_vs_run_with_cache_activation": "trace() activations / run_with_cache activations (peak - model)",
    "trace_peak_vs_run_with_cache_peak": "trace() peak / run_with_cache peak, totals",
}


# The headline targets on memory: judged only where `memory_judged` says so.
MEMORY_KEYS = ("trace_activation_vs_run_with_cache_activation",)


def _ms(s: float) -> str:
    return f"{s * 1e3:.2f}" if abs(s) < 0.01 else f"{s * 1e3:.1f}" if abs(s) < 10 else f"{s * 1e3:.0f}"


def _mark(ok: bool) -> str:
    return "✓" if ok else "✗"


def _over(n: int) -> str:
    """Memory over the model, signed (a step can end below what the load left, after freeing)."""
    return ("+" if n >= 0 else "-") + gib(abs(n))


def _times(x: float) -> str:
    return f"{x:.2f}x" if math.isfinite(x) else "n/a"


def _capped_cell(m: dict) -> str:
    """Whether a load fit under its hard cgroup cap."""
    if "capped" not in m:
        return "-"
    if not m["capped"]["enforced"]:
        return "no cgroup"
    return f"{_mark(m['capped']['fit'])} (cap {gib(m['capped']['cap_bytes'])})"


def _fits_cell(m: dict) -> str:
    """Whether the Colab run fit under 12 GiB. Without a memory cgroup nothing capped the run, so
    "it ran" says nothing about 12 GiB."""
    if not m.get("cap_enforced"):
        return "not checked: no memory cgroup could be made here"
    return "✓" if m["fit"] else "✗ " + m.get("error", "")[-80:]


def _patch_activations_cell(m: dict) -> str:
    """Both sweeps' activation memory, and tracelib's over TransformerLens's."""
    ours, theirs = activation_bytes(m), activation_bytes(m["tl"])
    if ours is None or theirs is None:
        return "-"
    return f"{_over(ours)} / {_over(theirs)} ({_times(ratio(ours, theirs))})"


def table(title: str, columns: list[str], measurements: list[dict], rows) -> str:
    """A markdown table with one column per measurement and one row per (label, format) in `rows`."""
    lines = [f"| {title} | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for label, fmt in rows:
        lines.append(f"| {label} | " + " | ".join(fmt(m) for m in measurements) + " |")
    return "\n".join(lines)


def activation_cell(steps: dict, step: str) -> str:
    """`+activation (ratio x the reference step's)`, or `-` where it was not measured."""
    m, ref = steps[step], reference(step)
    act = activation_bytes(m)
    if act is None:
        return "-"
    against = ratio(act, activation_bytes(steps[ref])) if ref in steps else math.nan
    return _over(act) + (f" ({_times(against)} {ref})" if math.isfinite(against) else "")


def steps_table(results: dict) -> str | None:
    """Per step and model: time, total peak, and activation memory against its reference step's."""
    names = list(results)
    keys = []
    for step in MEASURED_STEPS:
        found = {k for n in names for k in results[n]["steps"] if k == step or k.startswith(step + "@")}
        keys += sorted(found, key=lambda k: (len(k), k))
    if not keys:
        return None
    gpu = any(m.get("gpu_peak") for n in names for m in results[n]["steps"].values() if isinstance(m, dict))
    what = "GPU peak allocated" if gpu else "peak RSS"
    cols = " | ".join(
        f"{n} ({results[n]['layers']}L) ms | {n} {what} | {n} activations: peak - model (x reference's)" for n in names
    )
    lines = [f"| step | {cols} |", "|---|" + "---:|---:|---:|" * len(names)]
    for step in keys:
        cells = []
        for n in names:
            steps = results[n]["steps"]
            m = steps.get(step)
            if m is None or "time_s" not in m:
                cells += ["-", "-", "-"]
            else:
                cells += [_ms(m["time_s"]), gib(peak_bytes(m)), activation_cell(steps, step)]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def loads_table(results: dict) -> str | None:
    loads = [(n, s) for n in results for s in LOAD_DTYPE if s in results[n]["steps"]]
    if not loads:
        return None
    label = {"load": "fp32", "load_fp16": "fp16", "load_bf16": "bf16", "load_tl": "fp32, TL's path"}

    rows = [
        ("weights in the load's dtype", lambda m: gib(m["weights_bytes"])),
        ("wall s (boot + compat)", lambda m: f"{m['time_s']:.1f} ({m['boot_s']:.1f} + {m['compat_s']:.1f})"),
        ("peak RSS (+ over imports)", lambda m: f"{gib(m['peak_rss'])} (+{gib(m['peak_over_base'])})"),
        ("boot peak / compat peak", lambda m: f"{gib(m['boot_peak'])} / {gib(m['compat_peak'])}"),
        ("RSS after load", lambda m: gib(m["rss_after_trim"])),
        (
            f"anonymous peak over imports / weights (target <= {LOAD_TARGET})",
            lambda m: f"{m['anon_peak_over_weights']:.2f}x {_mark(m['anon_peak_over_weights'] <= LOAD_TARGET)}",
        ),
        (f"loads under a hard cgroup cap of imports + {LOAD_TARGET} x weights", _capped_cell),
        (
            f"peak over imports / weights (target <= {LOAD_TARGET})",
            lambda m: f"{m['peak_over_weights']:.2f}x {_mark(m['peak_over_weights'] <= LOAD_TARGET)}",
        ),
        ("peak / RSS after load", lambda m: f"{m['peak_rss'] / m['rss_after_trim']:.2f}x"),
    ]
    columns = [f"{n} ({results[n]['layers']}L) {label[s]}" for n, s in loads]
    return table("load", columns, [results[n]["steps"][s] for n, s in loads], rows)


def colab_table(results: dict) -> str | None:
    colab = [n for n in results if "colab" in results[n]["steps"]]
    if not colab:
        return None

    rows = [
        ("dtype load_model picks on a T4", lambda m: m.get("dtype", "?")),
        ("weights", lambda m: gib(m["weights_bytes"]) if "weights_bytes" in m else "?"),
        ("cap enforced by a cgroup", lambda m: "yes" if m["cap_enforced"] else "no (could not make one)"),
        ("fits under 12 GiB (load + trace)", _fits_cell),
        ("load peak RSS", lambda m: gib(m["load_peak_rss"]) if m["fit"] else "-"),
        ("peak RSS after trace", lambda m: gib(m["peak_rss"]) if m["fit"] else "-"),
        ("cgroup peak (page cache included)", lambda m: gib(m.get("cgroup_peak_bytes", 0))),
        ("load s / trace s", lambda m: f"{m['load_s']:.1f} / {m['trace_s']:.2f}" if m["fit"] else "-"),
    ]
    title = "Colab free tier (simulated: CPU, 12 GiB cgroup cap)"
    return table(title, colab, [results[n]["steps"]["colab"] for n in colab], rows)


def patch_table(results: dict) -> str | None:
    patched = [n for n in results if "patch_resid_pre" in results[n]["steps"]]
    if not patched:
        return None

    rows = [
        ("cells (layer x position)", lambda m: str(m["cells"])),
        ("tracelib s", lambda m: f"{m['time_s']:.2f}"),
        ("TransformerLens get_act_patch_resid_pre s", lambda m: f"{m['tl']['time_s']:.2f}"),
        (
            f"tracelib / TransformerLens time (target <= {PATCH_TARGET})",
            lambda m: f"{m['ratio']:.3f} {_mark(m['ratio'] <= PATCH_TARGET)}",
        ),
        ("tracelib batch size", lambda m: str(m["batch_size"])),
        ("peak: tracelib / TransformerLens (totals)", lambda m: f"{gib(peak_bytes(m))} / {gib(peak_bytes(m['tl']))}"),
        ("activations (peak - model): tracelib / TransformerLens", _patch_activations_cell),
        ("max |tracelib - TL| (normalised)", lambda m: f"{m['max_abs_diff']:.1e} (tol {m['tolerance']:.0e})"),
        ("attribution_patch s (one forward s)", lambda m: f"{m['attribution_s']:.3f} ({m['forward_s']:.3f})"),
        (
            f"attribution_patch / one forward (target <= {ATTRIBUTION_TARGET})",
            lambda m: (
                f"{m['attribution_s'] / m['forward_s']:.2f} "
                f"{_mark(m['attribution_s'] / m['forward_s'] <= ATTRIBUTION_TARGET)}"
            ),
        ),
        ("pearson(attribution estimate, exact)", lambda m: f"{m['attribution_pearson']:+.3f}"),
    ]
    columns = [f"{n} ({results[n]['layers']}L)" for n in patched]
    measured = [results[n]["steps"]["patch_resid_pre"] for n in patched]
    return table("resid_pre patching sweep (denoise)", columns, measured, rows)


def scale_table(results: dict) -> str | None:
    scale = scale_rows(results)
    return "\n".join(target_lines("issue 10", scale)) if scale else None


def target_lines(issue: str, rows: list) -> list[str]:
    """A target table's lines: (model, measure, detail, value, target, met) rows; met None is for information."""
    lines = [f"| {issue} target | model | measured | target | |", "|---|---|---:|---:|---|"]
    for name, key, detail, value, target, met in rows:
        mark = "(for information)" if met is None else _mark(met)
        lines.append(f"| {key} ({detail}) | {name} | {value:.2f} | {target if met is not None else '—'} | {mark} |")
    return lines


def _fraction(value) -> str:
    return "-" if value is None else f"{value:+.3f}"


def routes_table(results: dict) -> str | None:
    """Issue 21: one route against one trace and one resid_pre sweep, with peaks and the route's agreement."""
    rows = routes_rows(results)
    if not rows:
        return None
    lines = target_lines("issue 21", rows)
    lines += ["", "| model | routes / trace / sweep s | activations (peak - model): routes / trace / sweep | "
              "route vs sweep: Spearman, recall, precision |", "|---|---:|---:|---:|"]  # fmt: skip
    for name in dict.fromkeys(n for n, *_ in rows):
        m = results[name]["steps"]["routes"]
        runs = (m, m["trace"], m["sweep"])
        times = " / ".join(f"{x['time_s']:.3f}" for x in runs)
        acts = " / ".join(_over(activation_bytes(x)) for x in runs)
        weak = " (weak sweep)" if m.get("weak_effect") else ""
        agree = f"{_fraction(m['spearman'])}, {_fraction(m['recall'])}, {_fraction(m['precision'])}{weak}"
        lines.append(f"| {name} | {times} | {acts} | {agree} |")
    return "\n".join(lines)


def _study_ratio_cell(name: str, m: dict) -> str:
    r = m["ratio_vs_loop"]
    spread = f" (rounds {min(m['paired_ratios']):.2f}-{max(m['paired_ratios']):.2f})"
    return f"{r:.2f}x{spread} " + (_mark(r <= STUDY_TARGET) if study_judged(name) else "(for information)")


def _two_proc_cells(m: dict) -> tuple[str, str]:
    one, two = m["p1"], m["p2"]
    wall = f"{one['wall_s']:.1f} / {two['wall_s']:.1f} (speedup {m['wall_speedup']:.2f}x)"
    study = (
        f"{one['study_s']:.1f} / {two['study_s']:.1f} ({m['study_speedup']:.2f}x speedup; "
        f"{one['items_per_s_study']:.1f} / {two['items_per_s_study']:.1f} items/s)"
    )
    return wall, study


def study_table(results: dict) -> str | None:
    """Issue 20: tl.study against the same traces by hand, and the CLI in one process against two."""
    names = [n for n in results if "study" in results[n]["steps"] or "study_2proc" in results[n]["steps"]]
    if not names:
        return None
    lines = ["| tl.study | " + " | ".join(f"{n} ({results[n]['layers']}L)" for n in names) + " |"]
    lines.append("|---|" + "---:|" * len(names))

    def row(label, fmt, step="study"):
        cells = []
        for n in names:
            m = results[n]["steps"].get(step)
            cells.append("-" if m is None else fmt(n, m))
        if any(c != "-" for c in cells):  # a row only for a step that ran somewhere
            lines.append(f"| {label} | " + " | ".join(cells) + " |")

    def loop(n):
        return results[n]["steps"]["study_loop"]

    row(
        "items x injections x seeds (shard size, batch size)",
        lambda n, m: (
            f"{m['items']} x {len(m['injections'])} x {len(m['seeds'])} ({m['shard_size']}, {m['batch_size']})"
        ),
    )
    row("study s (items/s), one process", lambda n, m: f"{m['time_s']:.2f} ({m['items_per_s']:.1f})")
    row(
        "the same traces by hand s (items/s), nothing written",
        lambda n, m: f"{loop(n)['time_s']:.2f} ({loop(n)['items_per_s']:.1f})",
    )
    row(
        f"study overhead vs the same traces by hand, writes included (target <= {STUDY_TARGET}x; median of rounds)",
        _study_ratio_cell,
    )
    row(
        "rows agree with the loop's (largest corrupted metric difference)",
        lambda n, m: f"✓ ({m['max_abs_metric_diff']:.0e})",
    )
    row(
        "peak: study / loop (activations)",
        lambda n, m: (
            f"{gib(peak_bytes(m))} / {gib(peak_bytes(loop(n)))} "
            f"({_over(activation_bytes(m))} / {_over(activation_bytes(loop(n)))})"
        ),
    )
    row(
        "CLI: items x injections x seeds (shard size, batch size; torch threads per process)",
        lambda n, m: (
            f"{m['items']} x {len(m['injections'])} x {len(m['seeds'])} "
            f"({m['shard_size']}, {m['batch_size']}; {m['threads']})"
        ),
        "study_2proc",
    )
    row(
        "CLI wall s, 1 process / 2 processes (start and load included)",
        lambda n, m: _two_proc_cells(m)[0],
        "study_2proc",
    )
    row("CLI study s (manifest to last shard), 1 / 2 processes", lambda n, m: _two_proc_cells(m)[1], "study_2proc")
    return "\n".join(lines)


def headline_table(results: dict) -> str | None:
    names = [n for n in results if ratios(results[n]["steps"])]
    if not names:
        return None

    def cell(n: str, key: str) -> str:
        value = ratios(results[n]["steps"]).get(key)
        if value is None or not math.isfinite(value):
            return "-"
        if key in MEMORY_KEYS:
            judged, why = memory_judged(n, results[n]["steps"])
            if not judged:
                return f"{value:.3f} (for information: {why})"
        return f"{value:.3f}" + (f" {'ok' if value <= TARGETS[key] else 'MISSED'}" if key in TARGETS else "")

    lines = ["| target | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for key, title in HEADLINES.items():
        limit = f"<= {TARGETS[key]}" if key in TARGETS else "(for information)"
        lines.append(f"| {title} {limit} | " + " | ".join(cell(n, key) for n in names) + " |")
    checked = [results[n]["steps"].get("neuron_dla", {}).get("max_rel_err_vs_by_hand") for n in names]
    if any(err is not None for err in checked):
        cells = ["-" if err is None else f"{err:.1e}" for err in checked]
        lines.append("| tracelib's neurons vs run_with_cache by hand, max relative error | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render(results: dict) -> str:
    """Markdown: the steps (time, peak, activations), the loads, Colab, patching, studies, and the targets."""
    tables = (
        steps_table,
        loads_table,
        colab_table,
        patch_table,
        study_table,
        scale_table,
        routes_table,
        headline_table,
    )
    sections = [s for s in (make(results) for make in tables) if s]
    return "\n\n".join(sections) if sections else "(nothing measured)"
