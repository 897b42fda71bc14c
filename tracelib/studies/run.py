"""Running a study: shards of items, traced in batches, compared with their references, and written."""

from __future__ import annotations

import hashlib
import json
import math
import operator
import os
import warnings
from pathlib import Path

import pyarrow as pa
import torch

import tracelib.studies.store as store
from tracelib.answers import resolve_answer
from tracelib.batching import auto_batch_size, progress_bar
from tracelib.formats import READABLE_PROB, check_batch_size, check_k, check_metric, described
from tracelib.identity import check_model_arg, weights_fingerprint
from tracelib.models import model_name
from tracelib.ood import damage_report, inject
from tracelib.patching import SameMetricError, WeakCorruptionWarning, check_what, patch
from tracelib.studies.items import Item, StudySpecError, check_seeds, parse_injection, read_items
from tracelib.studies.result import Study, load_study
from tracelib.trace import trace

DEFAULT_SHARD_SIZE = 16
# Below this largest recovery a sweep localises nothing (`max_at` "none"): rounding decides the argmax.
NOTHING_RECOVERS = 1e-3


def study(
    model,
    items,
    *,
    injections,
    seeds=(0,),
    patch=None,
    out,
    batch_size: int | None = None,
    progress: bool | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    patch_grid: bool = False,
    metric: str = "logit_diff",
    k: int = 5,
    overwrite: bool = False,
) -> Study:
    """Measure how the answer mechanism of many prompts survives injected tokens; stream it to Parquet.

    For every item it traces the clean prompt (the reference); for every injection and seed it
    injects tokens (`tl.inject`), traces the corrupted prompt, and compares the two with
    `damage_report` (its labels and thresholds: each reference feature survives, is damaged, or
    is unreadable). Clean and corrupted traces are batched across items. The study follows each
    answer's first token (for a multi-token answer such as Qwen's `"1", "8"` of `" 18"`, the "1").

    The items are cut into shards of `shard_size`. Each shard's rows are written to `out` as
    Parquet, atomically, as soon as it is done, so a study survives interruption: the same call
    again skips completed shards and gives exactly the rows an uninterrupted run gives. Under
    `accelerate launch --num_processes N`, the shards are split between the processes
    (`PartialState().split_between_processes`), each on its own device writing its own shards;
    with no launcher, one process runs them all.

    Args:
        model: a loaded model (`tl.load_model`).
        items: (prompt, answer) pairs, a `.jsonl` or `.csv` file with `prompt` and `answer`
            columns, or a `datasets.Dataset` with those columns (`tl.arithmetic_items()` builds the
            seed task's).
        injections: specs as `tl.inject` takes them, `"kind:where:n"` (`"junk:after:2"`).
        seeds: the seeds each injection is drawn with.
        patch: None, or what `tl.patch` sweeps (`"resid_pre"`, ...): the exact sweep of every
            (item, injection, seed), kept as a per-layer summary (`Study.patching`).
        out: the study's folder (created if missing; must be empty or hold this study).
        batch_size: rows per forward pass. Default: picked from free memory on the first run and
            recorded in the manifest, so that a rerun batches (and rounds) exactly as the first.
        progress: a tqdm bar over the shards; default only with more than 4 shards, never under pytest.
        shard_size: items per shard (the unit of resumption and of the split between processes).
        patch_grid: also keep each sweep's full grid (flattened, `grid` column).
        metric: the DLA metric the features are read in (as `tl.trace`'s).
        k: how many top heads each reference follows (as `damage_report`'s).
        overwrite: start over in a folder that holds another study (deletes only its files).

    Returns:
        The `Study`, loaded from `out` (`tl.load_study(out)` reads it again later).

    Raises:
        StudySpecError: bad items, injections, seeds or options (the message names which).
        StudyMismatchError: `out` holds a study of another spec or model and `overwrite` is False.
        StudyFolderError: `out` is a file, or holds files that are not a study's.
    """
    check_model_arg(model, "study")
    spec, items = _spec(model, items, injections, seeds, patch, shard_size, patch_grid, metric, k, batch_size)
    resolved = [_resolve(model, i, item) for i, item in enumerate(items)]
    out = Path(out)
    state = process_state()
    manifest = {
        "kind": store.KIND,
        "format": store.FORMAT,
        "spec": spec,
        "model": {"name": model_name(model), "weights_fingerprint": weights_fingerprint(model)},
        "versions": store.versions(),
        "n_shards": math.ceil(len(items) / shard_size),
    }
    if state is None or state.is_main_process:
        manifest = store.prepare(out, manifest, overwrite)
    if state is not None:
        state.wait_for_everyone()
        manifest = store.read_manifest(out)
    if manifest["spec"]["batch_size"] is None:  # a new study: pick once, then record it
        longest = max(len(r[0]) for r in resolved) // 2 + 16
        manifest["spec"]["batch_size"] = auto_batch_size(model, longest, 1 << 16)
        if state is None or state.is_main_process:
            store.write_atomic(out, store.MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
    run_spec = manifest["spec"]
    shards = list(range(manifest["n_shards"]))
    show = progress if state is None or state.is_main_process else False
    if state is None:
        mine = shards
    else:
        with state.split_between_processes(shards) as part:
            mine = list(part)
    pending = [shard for shard in mine if not store.complete(out, shard)]
    written: dict = {}  # what this process wrote, kept for the result instead of read back
    for shard in progress_bar(pending, show, "study shards"):
        first = shard * shard_size
        chunk = resolved[first : first + shard_size]
        rows, patching = run_shard(model, chunk, items, first, shard, run_spec)
        store.write_shard(out, shard, rows, patching)
        written[shard] = (rows, patching)
    if state is not None:
        state.wait_for_everyone()
    return load_study(out, _written=written)


def _spec(model, items, injections, seeds, patch, shard_size, patch_grid, metric, k, batch_size):
    items = read_items(items)
    if isinstance(injections, str) or not hasattr(injections, "__iter__"):
        injections = [injections]
    specs = [str(parse_injection(s)) for s in injections]
    if not specs:
        raise StudySpecError("injections: give at least one, such as 'junk:after:2'")
    if len(set(specs)) != len(specs):
        raise StudySpecError(f"injections must be distinct, got {specs}")
    seeds = check_seeds(seeds)
    if patch is not None:
        try:
            check_what(patch)
        except ValueError as err:
            raise StudySpecError(f"patch: {err}") from None
    if isinstance(shard_size, bool) or not hasattr(type(shard_size), "__index__") or operator.index(shard_size) < 1:
        raise StudySpecError(f"shard_size must be a positive int, got {described(shard_size)}")
    check_batch_size(batch_size)
    check_metric(metric)
    k = check_k(k)
    digest = hashlib.sha256(json.dumps([[i.prompt, i.answer] for i in items], ensure_ascii=False).encode())
    spec = {
        "items_sha256": digest.hexdigest(),
        "n_items": len(items),
        "injections": specs,
        "seeds": list(seeds),
        "patch": patch,
        "patch_grid": bool(patch_grid),
        "shard_size": operator.index(shard_size),
        "metric": metric,
        "k": k,
        "batch_size": batch_size,
    }
    return spec, items


def _resolve(model, index: int, item: Item) -> tuple[str, str]:
    """The item's prompt (whitespace moved in from the answer) and its first answer token, checked up front."""
    try:
        r = resolve_answer(model, item.prompt, item.answer)
    except ValueError as err:
        raise StudySpecError(f"item {index} ({item.prompt!r} -> {item.answer!r}): {err}") from None
    return r.prompt, r.steps[0].target_str


def process_state():
    """accelerate's `PartialState` when launched as several processes (torchrun's `WORLD_SIZE`, or
    MPI's); None for one process, the default, which needs no launcher."""
    sizes = [os.environ.get(k) for k in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")]
    if max((int(v) for v in sizes if v and v.isdigit()), default=1) <= 1:
        return None
    from accelerate import PartialState

    # Without CUDA, processes talk over gloo on the CPU (accelerate's MULTI_CPU).
    cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") or not torch.cuda.is_available()
    return PartialState(cpu=cpu)


def run_shard(model, chunk, items, first: int, shard: int, spec: dict) -> tuple[pa.Table, pa.Table | None]:
    """One shard: the clean traces, every injection, the corrupted traces, labels and patching."""
    bs, metric, k = spec["batch_size"], spec["metric"], spec["k"]
    prompts, tokens = [p for p, _ in chunk], [a for _, a in chunk]
    clean = trace(model, prompts, tokens, metric=metric, k=k, batch_size=bs, progress=False)
    jobs, rows = [], []
    for i, (prompt, token) in enumerate(chunk):
        for text in spec["injections"]:
            s = parse_injection(text)
            for seed in spec["seeds"]:
                base = _base_row(shard, first + i, items[first + i], token, text, seed)
                try:
                    inj = inject(model, prompt, s.kind, s.where, s.n, seed, answer=token)
                except ValueError as err:
                    rows.append({**base, "error": f"inject: {err}"})
                    continue
                jobs.append((i, inj, len(rows)))
                rows.append({**base, "corrupted_prompt": inj.prompt})
    patching = []
    if jobs:
        corrupted = trace(
            model,
            [inj.prompt for _, inj, _ in jobs],
            [chunk[i][1] for i, _, _ in jobs],
            [list(clean.rows[i].distractors) for i, _, _ in jobs],
            metric=metric,
            k=k,
            batch_size=bs,
            progress=False,
        )
        for j, (i, inj, at) in enumerate(jobs):
            rows[at].update(_compare(clean, corrupted, i, j, k))
            if spec["patch"] is not None:
                patching += _patch_rows(model, rows[at], inj, chunk[i][1], clean.rows[i].distractors, spec)
    return _rows_table(rows), (_patch_table(patching, spec) if spec["patch"] is not None else None)


def _base_row(shard, item_index, item, token, injection, seed) -> dict:
    return {
        "shard": shard,
        "item": item_index,
        "prompt": item.prompt,
        "answer": item.answer,
        "answer_token": token,
        "injection": injection,
        "seed": seed,
    }


def _compare(clean, corrupted, i: int, j: int, k: int) -> dict:
    report = damage_report(clean, corrupted, row=i, k=k, corrupted_row=j)
    out = {
        "clean_metric": float(clean.margin.logit_diff[i]),
        "corrupted_metric": float(corrupted.margin.logit_diff[j]),
        "clean_rank": int(clean.margin.rank[i]),
        "corrupted_rank": int(corrupted.margin.rank[j]),
        "clean_prob": float(clean.margin.prob[i]),
        "corrupted_prob": float(corrupted.margin.prob[j]),
        "readable_clean": bool(clean.margin.prob[i] > READABLE_PROB),
        "readable_corrupted": bool(corrupted.margin.prob[j] > READABLE_PROB),
        "readable_from_clean": report.reference_readable[0],
        "readable_from_corrupted": report.corrupted_readable[0],
        **report.counts(),
    }
    for feature, status in zip(report.features, report.statuses):
        out[store.FEATURE + feature] = status
    return out


def _patch_rows(model, row: dict, inj, token: str, distractors, spec: dict) -> list[dict]:
    what = spec["patch"]
    base = {key: row[key] for key in ("shard", "item", "injection", "seed")} | {"what": what}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", WeakCorruptionWarning)  # recorded per row as weak_effect
        try:
            result = patch(
                model,
                inj.clean_prompt,
                inj.prompt,
                token,
                what=what,
                distractors=list(distractors),
                alignment=inj,
                batch_size=spec["batch_size"],
                progress=False,
            )
        except SameMetricError as err:
            return [{**base, "layer": layer, "error": str(err)} for layer in range(model.cfg.n_layers)]
    values = result.values.double()
    out = []
    for layer in range(values.shape[0]):
        v = values[layer]
        summary = {**base, "layer": layer, "weak_effect": result.weak_effect}
        if "position" in result.dims:
            by_pos = v if v.ndim == 1 else v.nan_to_num(-math.inf).amax(dim=0)  # head x position: best head
            # Positions before the injection are the same in both runs, so patching them recovers
            # exactly 0: the largest recovery is looked for from the first injected position on.
            first = min(inj.injected) if inj.injected else 0
            after = by_pos[first:].nan_to_num(-math.inf)
            at = first + int(after.argmax())
            best = float(after.max())
            summary.update(
                max_recovery=_finite(best),
                max_position=at,
                max_token=result.str_tokens[at],
                max_at="none"
                if not best >= NOTHING_RECOVERS
                else "final"
                if at == len(by_pos) - 1
                else "after_injection",
                final_recovery=_finite(by_pos[-1]),
            )
        else:
            summary["max_recovery"] = _finite(v.nan_to_num(-math.inf).max())
        if spec["patch_grid"]:
            summary["grid"] = [float(x) for x in v.flatten().tolist()]
        out.append(summary)
    return out


def _finite(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _rows_table(rows: list[dict]) -> pa.Table:
    features = sorted({key for row in rows for key in row if key.startswith(store.FEATURE)}, key=store.feature_order)
    schema = pa.schema(list(store.ROW_SCHEMA) + [pa.field(f, pa.string()) for f in features])
    return pa.Table.from_pylist(rows, schema=schema)


def _patch_table(rows: list[dict], spec: dict) -> pa.Table:
    schema = pa.schema(list(store.PATCH_SCHEMA) + ([store.GRID] if spec["patch_grid"] else []))
    return pa.Table.from_pylist(rows, schema=schema)
