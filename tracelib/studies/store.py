"""A study's folder: `manifest.json` and Parquet shards, each written atomically and checked on load.

The folder holds only names this format defines: `manifest.json`, `rows-NNNNN.parquet` and
`patching-NNNNN.parquet` (shard NNNNN), and while a shard is being written, a hidden
`.rows-NNNNN.parquet.tmp-*` beside it. A shard's rows file is renamed into place last, so a shard
is complete exactly when its rows file exists; a half-written shard is never read (its name does
not match), and a rerun writes it again.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import json
import os
import re
import secrets
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tracelib import folders
from tracelib._version import __version__
from tracelib.folders import MemberError, read_member
from tracelib.formats import TracelibWarning

MANIFEST = "manifest.json"
FORMAT = 1
KIND = "tracelib-study"
MAX_MANIFEST_BYTES = 2**20
MAX_SHARD_BYTES = 2**31
SHARD_NAME = re.compile(r"^(rows|patching)-(\d{5})\.parquet$")
TEMP_NAME = re.compile(r"^\.(rows|patching)-\d{5}\.parquet\.tmp-[0-9a-f]+$")
FEATURE = "feature:"  # the prefix of a feature's label column

ROW_SCHEMA = pa.schema(
    [
        ("shard", pa.int64()),
        ("item", pa.int64()),
        ("prompt", pa.string()),
        ("answer", pa.string()),
        ("answer_token", pa.string()),
        ("injection", pa.string()),
        ("seed", pa.int64()),
        ("corrupted_prompt", pa.string()),
        ("error", pa.string()),
        ("clean_metric", pa.float64()),
        ("corrupted_metric", pa.float64()),
        ("clean_rank", pa.int64()),
        ("corrupted_rank", pa.int64()),
        ("clean_prob", pa.float64()),
        ("corrupted_prob", pa.float64()),
        ("readable_clean", pa.bool_()),
        ("readable_corrupted", pa.bool_()),
        ("readable_from_clean", pa.string()),
        ("readable_from_corrupted", pa.string()),
        ("survives", pa.int64()),
        ("damaged", pa.int64()),
        ("unreadable", pa.int64()),
    ]
)
PATCH_SCHEMA = pa.schema(
    [
        ("shard", pa.int64()),
        ("item", pa.int64()),
        ("injection", pa.string()),
        ("seed", pa.int64()),
        ("what", pa.string()),
        ("layer", pa.int64()),
        ("max_recovery", pa.float64()),
        ("max_position", pa.int64()),
        ("max_token", pa.string()),
        ("max_at", pa.string()),
        ("final_recovery", pa.float64()),
        ("weak_effect", pa.bool_()),
        ("error", pa.string()),
    ]
)
GRID = pa.field("grid", pa.list_(pa.float64()))


class StudyFolderError(ValueError):
    """The study folder cannot be used or read: not a study, a damaged file, or a foreign file."""


class StudyMismatchError(ValueError):
    """The folder holds a study of another spec or another model; the message names the difference."""


class StudyVersionWarning(TracelibWarning):
    """The folder's shards were written by another tracelib or TransformerLens version."""


def versions() -> dict:
    out = {"tracelib": __version__}
    for name in ("transformer-lens", "torch"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def shard_name(table: str, shard: int) -> str:
    return f"{table}-{shard:05d}.parquet"


def read_manifest(folder: Path) -> dict | None:
    """The folder's manifest, checked for shape; None when it has none."""
    try:
        data = read_member(folder, MANIFEST, max_bytes=MAX_MANIFEST_BYTES)
    except MemberError as err:
        if err.kind == "missing":
            return None
        raise StudyFolderError(str(err)) from None
    try:
        manifest = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StudyFolderError(f"{folder / MANIFEST} is not JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
        raise StudyFolderError(f"{folder / MANIFEST} is not a tracelib study manifest")
    if manifest.get("format") != FORMAT:
        raise StudyFolderError(
            f"{folder / MANIFEST} is study format {manifest.get('format')!r}; this tracelib reads format {FORMAT}"
        )
    for key, kind in (("spec", dict), ("model", dict), ("versions", dict), ("n_shards", int)):
        if not isinstance(manifest.get(key), kind) or isinstance(manifest.get(key), bool):
            raise StudyFolderError(f"{folder / MANIFEST}: field {key!r} is missing or not a {kind.__name__}")
    return manifest


def differences(old: dict, new: dict, where: str = "") -> list[str]:
    """Where two manifests' spec and model differ, as `field: old -> new` lines."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{where}{key}.")
        elif a != b:
            out.append(f"{where}{key}: {a!r} in the folder, {b!r} now")
    return out


def own_entries(folder: Path) -> tuple[list[str], list[str]]:
    """The folder's entries split into (this format's names, anything else)."""
    own, foreign = [], []
    for name in sorted(os.listdir(folder)):
        (own if name == MANIFEST or SHARD_NAME.match(name) or TEMP_NAME.match(name) else foreign).append(name)
    return own, foreign


def prepare(folder: Path, manifest: dict, overwrite: bool) -> dict:
    """Make `folder` a study of `manifest`, or check it already is one; return the manifest in force.

    A rerun keeps the folder's batch size (so its shards come out exactly as before). Another spec
    or model is refused unless `overwrite`, which deletes this format's files and nothing else.
    """
    if folder.exists() and not folder.is_dir():
        raise StudyFolderError(f"{folder} is a file; pass a folder for the study (it is created if missing)")
    folder.mkdir(parents=True, exist_ok=True)
    own, foreign = own_entries(folder)
    old = read_manifest(folder)
    if old is None and (foreign or own):
        shown = ", ".join((foreign or own)[:5])
        raise StudyFolderError(
            f"{folder} holds {shown}, but no study manifest; a study goes into an empty or new folder"
        )
    if old is not None and foreign:
        shown = ", ".join(foreign[:5])
        raise StudyFolderError(f"{folder} is a study, but also holds {shown}, which tracelib did not write")
    if old is not None:
        keep = {"spec": {**manifest["spec"], "batch_size": old["spec"].get("batch_size")}, "model": manifest["model"]}
        diff = differences({"spec": old["spec"], "model": old["model"]}, keep)
        if not diff and not overwrite:
            if old["versions"] != manifest["versions"]:
                warnings.warn(
                    f"{folder}'s shards were written with {old['versions']}; this run has {manifest['versions']}. "
                    "Their numbers may differ slightly; pass overwrite=True to start over.",
                    StudyVersionWarning,
                    stacklevel=3,
                )
            return old
        if diff and not overwrite:
            raise StudyMismatchError(
                f"{folder} holds a study of another spec or model: "
                + "; ".join(diff)
                + ". Use another folder, or pass overwrite=True (--overwrite) to start over."
            )
        for name in own:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(folder / name)
    write_atomic(folder, MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
    return manifest


def write_atomic(folder: Path, name: str, data: bytes) -> None:
    """Write `folder/name` so that a reader sees the old file or the whole new one, never a part."""
    tmp = folder / f".{name}.tmp-{secrets.token_hex(6)}"
    try:
        folders.write_file(tmp, data)
        os.replace(tmp, folder / name)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    folders.fsync_dir(folder)


def write_shard(folder: Path, shard: int, rows: pa.Table, patching: pa.Table | None) -> None:
    """Write one shard's tables; the rows file goes last, and its presence marks the shard complete."""
    for table, data in (("patching", patching), ("rows", rows)):
        if data is not None:
            sink = io.BytesIO()
            pq.write_table(data, sink)
            write_atomic(folder, shard_name(table, shard), sink.getvalue())


def complete(folder: Path, shard: int) -> bool:
    return (folder / shard_name("rows", shard)).is_file()


def read_shard(folder: Path, table: str, shard: int, schema: pa.Schema, items: range) -> pa.Table:
    """One shard's table, checked: its fixed columns and types, its shard number and item range."""
    name = shard_name(table, shard)
    try:
        data = read_member(folder, name, max_bytes=MAX_SHARD_BYTES)
        got = pq.read_table(pa.BufferReader(data))
    except MemberError as err:
        raise StudyFolderError(str(err)) from None
    except (pa.ArrowException, OSError) as err:
        raise StudyFolderError(f"{folder / name} is not a readable Parquet file ({err})") from None
    for field in schema:
        if field.name not in got.schema.names or not got.schema.field(field.name).type.equals(field.type):
            found = got.schema.field(field.name).type if field.name in got.schema.names else "nothing"
            raise StudyFolderError(f"{folder / name}: column {field.name!r} should be {field.type}, found {found}")
    for field in got.schema:
        extra = field.name not in schema.names
        if extra and not (
            (field.name.startswith(FEATURE) and field.type.equals(pa.string())) or field.name == GRID.name
        ):
            raise StudyFolderError(f"{folder / name}: column {field.name!r} is not part of the study format")
    shards, index = got.column("shard").to_pylist(), got.column("item").to_pylist()
    if any(s != shard for s in shards) or any(i not in items for i in index):
        shown = f"{items.start}-{items.stop - 1}"
        raise StudyFolderError(f"{folder / name}: holds rows of another shard (items outside {shown})")
    return got


def feature_order(column: str) -> tuple:
    """Feature columns in reading order: components first (embed, then by layer), then heads by layer and head."""
    name = column[len(FEATURE) :]
    if name.startswith("L") and "H" in name and name[1:].replace("H", "", 1).isdigit():
        layer, head = name[1:].split("H")
        return (1, int(layer), int(head), name)
    digits = "".join(ch for ch in name.split("_")[0] if ch.isdigit())
    return (0, int(digits) if digits else -1, 0, name)
