"""A finished (or partly finished) study read back from its folder: the `Study` result."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

import pandas as pd
import pyarrow as pa

import tracelib.studies.store as store
from tracelib import plotting
from tracelib.formats import unit_label

STATUSES = ("survives", "damaged", "unreadable")
MAX_AT = ("final", "after_injection", "none")  # where a sweep's largest recovery lies ("none": nowhere)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a proportion (Wilson 1927): better than the normal
    approximation near 0 and 1 and for small n. NaN for n = 0."""
    if n == 0:
        return math.nan, math.nan
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Study:
    """A robustness study: one row per (item, injection, seed), read from its Parquet shards.

    Attributes:
        frame: one row per (item, injection, seed): the prompt and answer, the injection, the clean
            and corrupted logit differences (`clean_metric`, `corrupted_metric`: answer minus the
            mean distractor), ranks and probabilities, whether the answer is readable (p > 0.5),
            where the standard lens first reads it, the counts of each status, and one column per
            reference feature, `feature:<name>`, holding "survives", "damaged" or "unreadable"
            (empty where that component or head is not a feature of the item's reference).
            `error` says why a row has no numbers (an injection the prompt has no place for).
        patching: with `patch=...`, one row per (item, injection, seed, layer): the largest
            recovery over the positions from the injection on, where it is (`max_position`,
            `max_token`, and `max_at`: "final", "after_injection", or "none" when it is below 0.001),
            the recovery at the final position,
            and `weak_effect` (the corruption moved the logit difference too little for recovery
            to mean anything); else None.
        manifest: the spec, the model (name, weights fingerprint) and the versions that ran it.
        folder: where it was read from.
        missing_shards: shards not written yet (an interrupted or running study).
    """

    frame: pd.DataFrame
    patching: pd.DataFrame | None
    manifest: dict
    folder: Path
    missing_shards: tuple[int, ...]

    @property
    def features(self) -> list[str]:
        """The reference features with a label column, components first."""
        return [c[len(store.FEATURE) :] for c in self.frame.columns if c.startswith(store.FEATURE)]

    @property
    def complete(self) -> bool:
        return not self.missing_shards

    def survival(self, confidence: float = 0.95, min_n: int = 1) -> pd.DataFrame:
        """The share of rows in which each feature survives, per feature x injection, with the
        Wilson interval at `confidence`. Only rows where the feature is a feature of the item's
        reference count (`n`); `damaged` and `unreadable` count the rest. `feature` is the column's
        name, `label` the figures' (`L3 attn`). The interval treats rows as independent; the seeds
        of one item are not quite, so it is somewhat narrow when there are several seeds.
        """
        out = []
        ok = self.frame[self.frame["error"].isna()]
        for feature in self.features:
            column = store.FEATURE + feature
            for injection in self.manifest["spec"]["injections"]:
                labels = ok.loc[(ok["injection"] == injection) & ok[column].notna(), column]
                n = len(labels)
                if n < min_n:
                    continue
                counts = {s: int((labels == s).sum()) for s in STATUSES}
                low, high = wilson_interval(counts["survives"], n, confidence)
                rate = counts["survives"] / n if n else math.nan
                label = unit_label(feature)
                out.append(
                    dict(
                        feature=feature, label=label, injection=injection, n=n, **counts, rate=rate, low=low, high=high
                    )
                )
        columns = ["feature", "label", "injection", "n", *STATUSES, "rate", "low", "high"]
        return pd.DataFrame(out, columns=columns)

    def answer_kept(self) -> pd.DataFrame:
        """Per injection: rows, `answered` (rows whose clean run ranks the answer first), `kept_top`
        (the share of those where the corrupted run still does), the mean change of the logit
        difference, and rows that could not be injected."""
        ok = self.frame[self.frame["error"].isna()]
        top = ok[ok["clean_rank"] == 0]
        frame = pd.DataFrame(
            {
                "rows": ok.groupby("injection").size(),
                "answered": top.groupby("injection").size(),
                "kept_top": (top["corrupted_rank"] == 0).groupby(top["injection"]).mean(),
                "mean_metric_change": (ok["corrupted_metric"] - ok["clean_metric"]).groupby(ok["injection"]).mean(),
                "not_injectable": self.frame[self.frame["error"].notna()].groupby("injection").size(),
            }
        )
        order = [i for i in self.manifest["spec"]["injections"] if i in frame.index]
        counts = {"rows": int, "answered": int, "not_injectable": int}
        return frame.reindex(order).fillna({"rows": 0, "answered": 0, "not_injectable": 0}).astype(counts)

    def localisation(self) -> pd.DataFrame:
        """Where patching localises the damage, per injection x layer.

        Counts only sweeps whose corruption moved the logit difference enough to normalise by
        (`weak_effect` False; a weak one's recovery is noise amplified, and `weak_sweeps` counts
        them). Columns: `sweeps`, `mean_max_recovery` (the mean over sweeps of the layer's largest
        recovery, from the injection on), and for positional sweeps the share of sweeps whose
        largest recovery lies at the final position (`final`), at another position after the
        injected tokens (`after_injection`), or nowhere (`none`: below 0.001 everywhere). Injected
        positions have no counterpart in the clean run, so they are never patched themselves, and
        positions before them are the same in both runs (recovery 0). NaN where every sweep was weak.
        """
        if self.patching is None:
            raise ValueError("this study ran no patching; run tl.study(..., patch='resid_pre')")
        ran = self.patching[self.patching["error"].isna()]
        p = ran[~ran["weak_effect"].astype(bool)]
        keys = ["injection", "layer"]
        frame = pd.DataFrame(
            {
                "sweeps": p.groupby(keys, sort=False).size(),
                "weak_sweeps": ran[ran["weak_effect"].astype(bool)].groupby(keys, sort=False).size(),
                "mean_max_recovery": p.groupby(keys, sort=False)["max_recovery"].mean(),
            }
        )
        if ran["max_at"].notna().any():  # a positional sweep: where its largest recovery lies
            shares = pd.crosstab([p["injection"], p["layer"]], p["max_at"], normalize="index") if len(p) else None
            for at in MAX_AT:
                frame[at] = shares[at] if shares is not None and at in shares else 0.0
                frame.loc[frame["sweeps"].fillna(0) == 0, at] = math.nan  # every sweep of the cell was weak
        frame = frame.fillna({"sweeps": 0, "weak_sweeps": 0}).astype({"sweeps": int, "weak_sweeps": int})
        return frame.reset_index()

    def plot(self, **layout):
        """The survival rate per feature x injection, with its interval and count in each cell."""
        table = self.survival()
        return plotting.survival_heatmap(table, self.features, self.manifest["spec"]["injections"], **layout)

    def summary(self) -> str:
        spec = self.manifest["spec"]
        ok = self.frame[self.frame["error"].isna()]
        lines = [
            f"Study of {self.manifest['model']['name']}: {spec['n_items']} items x {len(spec['injections'])} "
            f"injections x {len(spec['seeds'])} seed(s) = {len(self.frame)} rows"
            + (f" ({len(self.missing_shards)} shard(s) not written yet)" if self.missing_shards else ""),
            f"  {len(self.frame) - len(ok)} rows could not be injected (see the error column).",
        ]
        kept = self.answer_kept()
        for injection, row in kept.iterrows():
            if row["rows"] == 0:
                lines.append(f"  {injection}: no item has a place for it ({row['not_injectable']} rows not injected)")
                continue
            lines.append(
                f"  {injection}: answer kept on top in {row['kept_top']:.0%} of rows, logit diff "
                f"{row['mean_metric_change']:+.2f} on average"
            )
        table = self.survival(min_n=5)
        if len(table):
            best, worst = table.loc[table["rate"].idxmax()], table.loc[table["rate"].idxmin()]
            lines.append(
                f"  most robust: {best['label']} under {best['injection']} (survives {best['rate']:.0%}, "
                f"n={best['n']}); most fragile: {worst['label']} under {worst['injection']} "
                f"({worst['rate']:.0%}, n={worst['n']})"
            )
        return "\n".join(lines)

    def __repr__(self) -> str:
        spec = self.manifest["spec"]
        return (
            f"Study({self.manifest['model']['name']}, {len(self.frame)} rows, {spec['n_items']} items, "
            f"injections {spec['injections']}, {len(self.features)} features"
            + (f", {len(self.missing_shards)} shards missing" if self.missing_shards else "")
            + ")"
        )


def load_study(path, *, _written: dict | None = None) -> Study:
    """Read a study folder written by `tl.study`: its manifest and every complete shard, checked.

    Raises:
        StudyFolderError: no manifest, a damaged file, or a shard that does not match it.
    """
    # `_written`: shard -> (rows, patching) tables this process has just written (by `tl.study`),
    # used as they are instead of read back.
    folder = Path(path)
    if not folder.is_dir():
        raise store.StudyFolderError(f"{folder} is not a folder; pass the folder tl.study wrote")
    manifest = store.read_manifest(folder)
    if manifest is None:
        raise store.StudyFolderError(f"{folder} has no {store.MANIFEST}: it is not a study folder")
    spec = manifest["spec"]
    size = spec["shard_size"]
    rows, patching, missing = [], [], []
    for shard in range(manifest["n_shards"]):
        if not store.complete(folder, shard):
            missing.append(shard)
            continue
        if _written and shard in _written:
            rows.append(_written[shard][0])
            if spec["patch"] is not None:
                patching.append(_written[shard][1])
            continue
        items = range(shard * size, min((shard + 1) * size, spec["n_items"]))
        rows.append(store.read_shard(folder, "rows", shard, store.ROW_SCHEMA, items))
        if spec["patch"] is not None:
            patching.append(store.read_shard(folder, "patching", shard, store.PATCH_SCHEMA, items))
    frame = _concat(rows, store.ROW_SCHEMA)
    patch_frame = _concat(patching, store.PATCH_SCHEMA) if spec["patch"] is not None else None
    return Study(frame, patch_frame, manifest, folder, tuple(missing))


def _concat(tables: list[pa.Table], schema: pa.Schema) -> pd.DataFrame:
    if not tables:
        return schema.empty_table().to_pandas()
    frames = [t.to_pandas() for t in tables]
    frame = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    fixed = [c for c in schema.names if c in frame.columns]
    features = sorted((c for c in frame.columns if c not in fixed), key=_column_order)
    frame = frame[fixed + features].copy()
    if features:  # a feature missing from a shard is None (not a feature of those items), as in the others
        frame[features] = frame[features].astype(object).where(frame[features].notna(), None)
    return frame


def _column_order(column: str) -> tuple:
    return store.feature_order(column) if column.startswith(store.FEATURE) else (2, 0, 0, column)
