"""The reference folder format: saving a trace, and reading and checking the files (loading: `tracelib.reference`).

A reference is a folder:

```
REF/
  reference.json        format marker and version, metadata, every non-tensor field, checksums
  tensors.safetensors   every tensor of the trace, under keys named by where it sits
```

Nothing is pickled: `reference.json` describes the trace as a tree of tracelib dataclasses (walked
field by field), plain JSON values, and pointers into the safetensors file, and loading rebuilds
each dataclass with its own constructor, so its `__post_init__` shape checks run again. Only
dataclasses defined in tracelib are ever constructed.

The metadata says what the trace came from, so a reference is never compared with the wrong model:
- `weights_fingerprint`: see `tracelib.identity`; any retraining, fine-tuning, dtype change or
  LayerNorm folding changes it.
- `tokenizer_hash`: sha256 over the tokenizer's full serialisation (vocabulary, merges, added
  and special tokens, normaliser; runtime padding and truncation settings left out), its special
  tokens, and its chat template.
- the model's name, dtype and compatibility-mode flags, and the tracelib and TransformerLens
  versions.

The format is closed: `load_reference` opens only `reference.json` (at most `MAX_META_BYTES`) and
`tensors.safetensors`, directly inside the folder, as regular files (no symlinks, FIFOs or
devices), with sizes checked before reading; it reads every field against the result classes'
annotations (so a wrong type, a wrong nested class, an int32 tensor where floats belong, or a NaN is
refused with the field named); it cross-checks targets, answers, token ids and labels between the
parts and against the metadata; and since format 4 a sha256 over the whole of `reference.json`
(`content_sha256`, canonical JSON) catches an edited field. The checksums catch accidents and
edits, not a forger, who can recompute them; nothing in a reference can run code.

Saving is atomic and never deletes what it did not write (`tracelib.folders`): everything is
written to a hidden sibling folder and fsynced, and the folder is swapped into place under a lock.
A folder at the path that holds anything besides a reference's own files is refused, as is a
symlink. An interrupted save leaves the old reference, the new one, or the old one recoverable beside
the path, which `load_reference` reports with the command that restores it. Of two saves racing to
one path, one lands and the other raises `ReferenceConflictError`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.metadata
import json
import os
import warnings
from pathlib import Path

from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from tracelib import folders
from tracelib._version import __version__
from tracelib.folders import MemberError, read_member
from tracelib.formats import TracelibWarning
from tracelib.identity import (
    ModelMismatchError,
    check_model_arg,
    check_same_model,
    model_identity,
    weights_fingerprint,
)
from tracelib.models import model_name, value_bias_convention

FORMAT = "tracelib-reference"
# Version 2: `Heads` keeps each row's token ids (`tokens`) instead of every head's full attention
# pattern (`patterns`); version-1 references are upgraded on load (`_upgrade_v1`).
# Version 3: the DLA records its value-bias convention, the lens its answer and distractors, the
# positions the answer's probability at every position (what "readable" reads), and the results
# their metric in words. Older references load with defaults: folded value biases (all they had),
# and no per-position readability.
# Version 4: `content_sha256` covers all of reference.json, and the trace records its model's
# weights fingerprint (older ones take it from the metadata, where it always was).
FORMAT_VERSION = 4
META_FILE = "reference.json"
TENSOR_FILE = "tensors.safetensors"
_OWN = (META_FILE, TENSOR_FILE)
CHECKSUM_FIELD = "content_sha256"
# reference.json holds labels and token strings, never tensors: 64 MiB is thousands of rows.
MAX_META_BYTES = 64 * 2**20
# No trace's tree nests deeper than about 8 levels; a deeper one is refused, not recursed into.
_MAX_DEPTH = 32


class TraceReferenceError(ValueError):
    """A reference cannot be saved or loaded; the subclasses say why."""


class ReferenceFormatError(TraceReferenceError):
    """The path is not a tracelib reference, or its reference.json cannot be read."""


class ReferenceOverwriteError(TraceReferenceError):
    """Saving would overwrite something that is not a tracelib reference."""


class ReferenceVersionError(TraceReferenceError):
    """The reference was written by a newer format version than this tracelib reads."""


class ReferenceMissingFileError(TraceReferenceError):
    """The reference, or a file it lists, does not exist."""


class ReferenceTruncatedError(TraceReferenceError):
    """A tensor file is shorter (or longer) than when it was saved."""


class ReferenceChecksumError(TraceReferenceError):
    """A file's bytes changed since it was saved (its sha256 differs)."""


class ReferenceShapeError(TraceReferenceError):
    """A tensor's shape or dtype disagrees with the metadata, or a result's own shape check fails."""


class ReferenceModelMismatchError(TraceReferenceError, ModelMismatchError):
    """The reference was saved from other weights than the model given."""


class ReferenceTokenizerMismatchError(TraceReferenceError):
    """The reference was saved with another tokenizer than the model given."""


class ReferenceContentError(TraceReferenceError):
    """The reference's parts disagree with each other or with its metadata (the field is named)."""


class ReferenceWriteError(TraceReferenceError):
    """The file system refused the save (read-only, full, a name too long); the message names the path."""


class ReferenceConflictError(TraceReferenceError):
    """Another save replaced the reference while this one was writing; the other one stays."""


class ReferenceLeftoverWarning(TracelibWarning):
    """An interrupted save left a copy of a reference beside it (`.NAME.old-*` or `.NAME.tmp-*`)."""


# ---------------------------------------------------------------------------------------------
# Fingerprints


def tokenizer_hash(tokenizer) -> str:
    """sha256 over the tokenizer's vocabulary, merges, special tokens and chat template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        # Padding and truncation are switched on and off by calls (padding=True), not part of what
        # the tokenizer is; leaving them in would make the hash depend on what ran before.
        spec.pop("padding", None)
        spec.pop("truncation", None)
        h.update(json.dumps(spec, sort_keys=True).encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode())
    specials = {k: str(v) for k, v in getattr(tokenizer, "special_tokens_map", {}).items()}
    h.update(json.dumps(specials, sort_keys=True).encode())
    h.update(json.dumps(getattr(tokenizer, "chat_template", None), sort_keys=True).encode())
    return h.hexdigest()


def model_metadata(model) -> dict:
    """What a reference records about the model and the software that traced it."""
    try:
        tl_version = importlib.metadata.version("transformer-lens")
    except importlib.metadata.PackageNotFoundError:
        tl_version = None
    return {
        "model_name": model_name(model),
        "weights_fingerprint": weights_fingerprint(model),
        "value_biases": value_bias_convention(model),
        "tokenizer_hash": tokenizer_hash(model.tokenizer),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "compatibility_mode": getattr(model, "compatibility_mode", None),
        "layer_norm_folding": getattr(model.cfg, "layer_norm_folding", None),
        "tracelib_version": __version__,
        "transformer_lens_version": tl_version,
    }


# ---------------------------------------------------------------------------------------------
# Encoding: a tree of dataclasses, lists, dicts and scalars, with tensors split out


def _encode(value, key: str, tensors: dict[str, Tensor]):
    """`value` as JSON, with every tensor stored in `tensors` under its dotted path `key`."""
    if isinstance(value, Tensor):
        # clone(): safetensors refuses tensors that share storage (views of one result tensor).
        tensors[key] = value.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        cls = type(value)
        if not cls.__module__.startswith("tracelib."):
            raise TypeError(f"Only tracelib's own result classes can be saved, not {cls.__module__}.{cls.__name__}.")
        fields = {
            f.name: _encode(getattr(value, f.name), f"{key}.{f.name}", tensors) for f in dataclasses.fields(value)
        }
        return {"__dataclass__": f"{cls.__module__}:{cls.__qualname__}", "fields": fields}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        # Pairs rather than an object: keys may be ints, and no key can collide with a marker.
        return {"__dict__": [[k, _encode(v, f"{key}.{k}", tensors)] for k, v in value.items()]}
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise TypeError(f"Cannot save {key} of type {type(value).__name__}: not a tensor, dataclass or JSON value.")


def canonical_sha256(value) -> str:
    """sha256 of `value` as canonical JSON (sorted keys, no spaces): what the content checksum covers."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Saving


def _read_meta_bytes(path: Path) -> bytes:
    try:
        return read_member(path, META_FILE, max_bytes=MAX_META_BYTES)
    except MemberError as err:
        raise ReferenceFormatError(
            f"{path} is not a readable tracelib reference: {META_FILE} {err.reason}."
            if err.kind != "missing"
            else f"{path} is not a tracelib reference: it has no {META_FILE}."
        ) from err


def _is_reference(path: Path) -> bool:
    try:
        meta = json.loads(_read_meta_bytes(path))
    except (TraceReferenceError, ValueError, RecursionError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def _check_replaceable(path: Path) -> tuple | None:
    """What is at `path` (for `replace_folder`'s conflict check), after refusing anything but a reference."""
    started = folders.state(path)
    if started is None:
        return None
    if path.is_symlink():
        raise ReferenceOverwriteError(
            f"{path} is a symbolic link (to {os.readlink(path)}); tracelib does not save through links. "
            "Pass the folder itself, or a new path."
        )
    if not path.is_dir() or not _is_reference(path):
        raise ReferenceOverwriteError(
            f"{path} exists and is not a tracelib reference (no readable {META_FILE} with format {FORMAT!r}); "
            "refusing to overwrite it. Pass a new path, or remove it yourself."
        )
    foreign = sorted(set(os.listdir(path)) - set(_OWN))
    if foreign:
        raise ReferenceOverwriteError(
            f"{path} is a tracelib reference, but it also holds {', '.join(foreign[:5])}"
            f"{' and more' if len(foreign) > 5 else ''}, which tracelib did not write; refusing to replace it "
            "(that would delete them). Move them out, or save to a new path."
        )
    return started


def save_reference(trace, path, model) -> Path:
    """Save `trace` as a reference folder at `path`, atomically; see `Trace.save`."""
    check_model_arg(model, "Trace.save")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"Trace.save: pass a folder path (str or Path), got {type(path).__name__}.")
    path = Path(path)
    if path.name in ("", ".", ".."):
        raise ReferenceOverwriteError(f"{str(path)!r} names no folder to save into; pass a path ending in a name.")
    try:
        check_same_model(trace.identity, model_identity(model), "This trace", "the model passed to save()")
    except ModelMismatchError as err:
        raise ReferenceModelMismatchError(
            f"{err} Pass the model the trace was made with, so the reference records its fingerprint."
        ) from None
    if model_name(model) != trace.model_name:
        raise ReferenceModelMismatchError(
            f"This trace came from {trace.model_name}, but the model passed to save() is {model_name(model)}; "
            "pass the model the trace was made with, so the reference records its fingerprint."
        )
    started = _check_replaceable(path)
    # The lenses' prob and rank are computed on first read; compute them with this model.
    trace.lens.materialise(model)
    tensors: dict[str, Tensor] = {}
    tree = _encode(trace, "trace", tensors)
    blob = safetensors_bytes(tensors)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "metadata": model_metadata(model),
        "files": {TENSOR_FILE: {"sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)}},
        "tensors": {
            k: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for k, t in tensors.items()
        },
        "trace": tree,
    }
    meta[CHECKSUM_FIELD] = canonical_sha256(meta)
    text = json.dumps(meta, indent=1).encode()
    if len(text) > MAX_META_BYTES:
        raise ReferenceFormatError(
            f"This trace's {META_FILE} would be {len(text)} bytes, over the {MAX_META_BYTES} a reference may hold; "
            "save fewer rows per reference."
        )

    def write(folder: Path) -> None:
        folders.write_file(folder / TENSOR_FILE, blob)
        # The marker file goes last: a folder without it is never taken for a reference.
        folders.write_file(folder / META_FILE, text)

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        folders.replace_folder(path, write, _OWN, started=started)
    except folders.FolderChangedError as err:
        raise ReferenceConflictError(
            f"Another save replaced {path} while this one was writing, so this one was not saved (the other one "
            "stays there). Save again to replace it."
        ) from err
    except OSError as err:
        raise ReferenceWriteError(f"Cannot save the reference to {path}: {err.strerror or err}.") from err
    return path


# ---------------------------------------------------------------------------------------------
# Loading


def _short(digest) -> str:
    return f"{digest[:8]}…" if isinstance(digest, str) and digest else "none recorded"


def _leftover_note(path: Path, found: list[Path]) -> str:
    parts = []
    for leftover in found:
        complete = _is_reference(leftover)
        if ".old-" in leftover.name:
            parts.append(f"{leftover} (the reference an interrupted save replaced)")
        else:
            parts.append(f"{leftover} (an interrupted save's {'complete' if complete else 'incomplete'} new reference)")
    return "; ".join(parts)


def _check_leftovers(path: Path, exists: bool) -> None:
    found = folders.leftovers(path)
    if not found:
        return
    if not exists:
        restorable = [p for p in found if _is_reference(p)]
        hint = (
            f" Restore it with os.replace({str(restorable[0])!r}, {str(path)!r})."
            if restorable
            else " None of them is a complete reference."
        )
        raise ReferenceMissingFileError(
            f"There is no reference at {path}, but it left {_leftover_note(path, found)}.{hint}"
        )
    warnings.warn(
        f"{path} loaded, but an interrupted save left {_leftover_note(path, found)} beside it. If the reference at "
        f"{path} is the one you want, delete them; otherwise move one into its place with os.replace.",
        ReferenceLeftoverWarning,
        stacklevel=3,
    )


def _require(cond: bool, field: str, what: str, cls=None) -> None:
    if not cond:
        raise (cls or ReferenceFormatError)(f"{META_FILE} field {field!r}: {what}.")


def _parse_meta(path: Path, data: bytes) -> dict:
    try:
        meta = json.loads(data)
    except RecursionError as err:
        raise ReferenceFormatError(f"{path / META_FILE} is nested too deeply to be a reference.") from err
    except ValueError as err:
        raise ReferenceFormatError(f"{path / META_FILE} is not readable JSON: {err}") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ReferenceFormatError(
            f"{path / META_FILE} has no format marker {FORMAT!r}, so it is not a tracelib reference."
        )
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ReferenceVersionError(
            f"{path / META_FILE} has format version {version!r}, which is not a version number."
        )
    if version > FORMAT_VERSION:
        raise ReferenceVersionError(
            f"{path} was saved in reference format version {version}; this tracelib reads up to version "
            f"{FORMAT_VERSION}. Upgrade tracelib to load it."
        )
    _require(isinstance(meta.get("metadata"), dict), "metadata", "must be an object")
    for key, value in meta["metadata"].items():
        _require(value is None or isinstance(value, (str, bool)), f"metadata.{key}", "must be a string")
    files = meta.get("files")
    _require(isinstance(files, dict), "files", "must be an object")
    extra = sorted(set(files) - {TENSOR_FILE})
    _require(not extra, "files", f"lists {extra[:3]}, which are not part of the format (only {TENSOR_FILE})")
    _require(TENSOR_FILE in files, "files", f"does not list {TENSOR_FILE}")
    spec = files[TENSOR_FILE]
    _require(isinstance(spec, dict), f"files.{TENSOR_FILE}", "must be an object")
    size, digest = spec.get("bytes"), spec.get("sha256")
    _require(
        isinstance(size, int) and not isinstance(size, bool) and size >= 0,
        f"files.{TENSOR_FILE}.bytes",
        "must be a byte count",
    )
    _require(
        isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest),
        f"files.{TENSOR_FILE}.sha256",
        "must be 64 hex digits",
    )
    listed = meta.get("tensors")
    _require(isinstance(listed, dict), "tensors", "must be an object")
    for key, t in listed.items():
        _require(
            isinstance(t, dict)
            and isinstance(t.get("shape"), list)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in t["shape"])
            and isinstance(t.get("dtype"), str),
            f"tensors.{key}",
            "must be {shape: [ints], dtype: string}",
        )
    _require(isinstance(meta.get("trace"), dict), "trace", "must be an object")
    if version >= 4:
        _require(isinstance(meta.get(CHECKSUM_FIELD), str), CHECKSUM_FIELD, "is missing")
        body = {k: v for k, v in meta.items() if k != CHECKSUM_FIELD}
        digest = canonical_sha256(body)
        if digest != meta[CHECKSUM_FIELD]:
            raise ReferenceChecksumError(
                f"{path / META_FILE} changed since it was saved: its content sha256 is {_short(digest)}, the one "
                f"saved is {_short(meta[CHECKSUM_FIELD])} (an edited field, such as a row's target)."
            )
    return meta


def read_metadata(path) -> dict:
    """A reference's reference.json (format, metadata, file checksums), checked for format, version and content."""
    path = Path(path)
    if not path.exists():
        _check_leftovers(path, exists=False)
        raise ReferenceMissingFileError(f"There is no reference at {path}.")
    if not path.is_dir():
        raise ReferenceFormatError(f"{path} is not a tracelib reference: it is not a folder.")
    return _parse_meta(path, _read_meta_bytes(path))


def _read_tensors(path: Path, meta: dict) -> dict[str, Tensor]:
    spec = meta["files"][TENSOR_FILE]
    try:
        blob = read_member(path, TENSOR_FILE, max_bytes=spec["bytes"], expected_bytes=spec["bytes"])
    except MemberError as err:
        if err.kind == "missing":
            raise ReferenceMissingFileError(
                f"The reference at {path} is missing {TENSOR_FILE}, which it lists."
            ) from err
        if err.kind in ("size", "too-large"):
            raise ReferenceTruncatedError(f"{err.path} {err.reason}.") from err
        raise ReferenceFormatError(f"{err.path} {err.reason}.") from err
    digest = hashlib.sha256(blob).hexdigest()
    if digest != spec["sha256"]:
        raise ReferenceChecksumError(
            f"{path / TENSOR_FILE} changed since it was saved: sha256 {_short(digest)}, expected "
            f"{_short(spec['sha256'])} (flipped or edited bytes)."
        )
    try:
        tensors = safetensors_load(blob)
    except Exception as err:  # safetensors raises its own SafetensorError for a malformed header
        raise ReferenceFormatError(f"{path / TENSOR_FILE} is not a readable safetensors file: {err}") from err
    listed = meta["tensors"]
    if set(listed) != set(tensors):
        missing, extra = sorted(set(listed) - set(tensors)), sorted(set(tensors) - set(listed))
        raise ReferenceShapeError(f"{TENSOR_FILE} and {META_FILE} disagree: missing {missing[:5]}, extra {extra[:5]}.")
    for key, spec in listed.items():
        t = tensors[key]
        dtype = str(t.dtype).removeprefix("torch.")
        if list(t.shape) != spec["shape"] or dtype != spec["dtype"]:
            raise ReferenceShapeError(
                f"Tensor {key} is {dtype} {list(t.shape)} in {TENSOR_FILE}, but {META_FILE} says "
                f"{spec['dtype']} {spec['shape']}."
            )
    return tensors


def check_model(meta: dict, model) -> None:
    """Refuse a model whose weights or tokenizer differ from the ones the reference was saved from."""
    check_model_arg(model, "load_reference")
    saved = meta["metadata"]
    name = model_name(model)
    fingerprint = weights_fingerprint(model)
    if fingerprint != saved.get("weights_fingerprint"):
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        also = []
        if dtype != saved.get("dtype"):
            also.append(f"dtype {saved.get('dtype')} vs {dtype}")
        if getattr(model, "compatibility_mode", None) != saved.get("compatibility_mode"):
            also.append(
                f"compatibility mode {saved.get('compatibility_mode')} vs {getattr(model, 'compatibility_mode', None)}"
            )
        convention = saved.get("value_biases", "folded")  # references before format 3 were all folded
        if convention != value_bias_convention(model):
            also.append(
                f"value biases {convention} vs {value_bias_convention(model)}; load the model with "
                f"tl.load_model(NAME, fold_value_biases={convention == 'folded'}) to check this reference"
            )
        raise ReferenceModelMismatchError(
            f"The reference was saved from {saved.get('model_name')} "
            f"(fingerprint {_short(saved.get('weights_fingerprint'))}), this model is {name} ({_short(fingerprint)})"
            + (f"; {', '.join(also)}" if also else "")
            + "."
        )
    digest = tokenizer_hash(model.tokenizer)
    if digest != saved.get("tokenizer_hash"):
        raise ReferenceTokenizerMismatchError(
            f"The reference was saved with {saved.get('model_name')}'s tokenizer "
            f"(hash {_short(saved.get('tokenizer_hash'))}), this model's tokenizer differs ({_short(digest)}): "
            "its vocabulary, special tokens or chat template changed."
        )
