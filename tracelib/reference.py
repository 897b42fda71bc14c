"""Save a trace as a clean reference, and load it back later, with no model, as a full `Trace`.

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

Saving is atomic: everything is written to a hidden sibling folder and fsynced, the folder is
renamed into place, and only then is an older reference at that path deleted. An interrupted save
leaves the old reference or none, never half of one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.metadata
import json
import os
import shutil
import uuid
from pathlib import Path

from torch import Tensor

from tracelib.identity import ModelMismatchError, weights_fingerprint
from tracelib.models import value_bias_convention

FORMAT = "tracelib-reference"
# Version 2: `Heads` keeps each row's token ids (`tokens`) instead of every head's full attention
# pattern (`patterns`); version-1 references are upgraded on load (`_upgrade_v1`).
# Version 3: the DLA records its value-bias convention, the lens its answer and distractors, the
# positions the answer's probability at every position (what "readable" reads), and the results
# their metric in words. Older references load with defaults: folded value biases (all they had),
# and no per-position readability.
FORMAT_VERSION = 3
META_FILE = "reference.json"
TENSOR_FILE = "tensors.safetensors"


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
    import tracelib
    from tracelib.models import model_name

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
        "tracelib_version": tracelib.__version__,
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


def _class(name: str) -> type:
    """A tracelib dataclass by `module:qualname`; anything else is refused, so loading runs no foreign code."""
    module, _, qualname = name.partition(":")
    if not module.startswith("tracelib."):
        raise ReferenceFormatError(f"The reference names the class {name!r}, which is not tracelib's.")
    try:
        cls = getattr(importlib.import_module(module), qualname)
    except (ImportError, AttributeError) as err:
        raise ReferenceFormatError(f"The reference names the class {name!r}, which this tracelib lacks.") from err
    if not dataclasses.is_dataclass(cls):
        raise ReferenceFormatError(f"The reference names {name!r}, which is not a tracelib result class.")
    return cls


def _decode(value, tensors: dict[str, Tensor]):
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__tuple__" in value:
        return tuple(_decode(v, tensors) for v in value["__tuple__"])
    if "__dict__" in value:
        return {k: _decode(v, tensors) for k, v in value["__dict__"]}
    if "__dataclass__" in value:
        cls = _class(value["__dataclass__"])
        fields = {k: _decode(v, tensors) for k, v in value["fields"].items()}
        try:
            return cls(**fields)
        except (ValueError, TypeError, AssertionError) as err:
            raise ReferenceShapeError(f"The saved {cls.__name__} does not rebuild: {err}") from err
    raise ReferenceFormatError(f"reference.json holds an object tracelib does not know: keys {sorted(value)[:5]}")


# ---------------------------------------------------------------------------------------------
# Saving


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_reference(path: Path) -> bool:
    try:
        return json.loads((path / META_FILE).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def save_reference(trace, path, model) -> Path:
    """Save `trace` as a reference folder at `path`, atomically; see `Trace.save`."""
    from safetensors.torch import save as safetensors_bytes

    from tracelib.models import model_name

    path = Path(path)
    if path.exists() and not (path.is_dir() and _is_reference(path)):
        raise ReferenceOverwriteError(
            f"{path} exists and is not a tracelib reference (no {META_FILE} with format {FORMAT!r}); "
            "refusing to overwrite it. Pass a new path, or remove it yourself."
        )
    if model_name(model) != trace.model_name:
        raise ReferenceModelMismatchError(
            f"This trace came from {trace.model_name}, but the model passed to save() is {model_name(model)}; "
            "pass the model the trace was made with, so the reference records its fingerprint."
        )
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
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = path.parent / f".{path.name}.tmp-{tag}"
    old = path.parent / f".{path.name}.old-{tag}"
    tmp.mkdir()
    try:
        _write(tmp / TENSOR_FILE, blob)
        # The marker file goes last: a folder without it is never taken for a reference.
        _write(tmp / META_FILE, json.dumps(meta, indent=1).encode())
        _fsync_dir(tmp)
        if path.exists():
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)  # put the previous reference back where it was
                raise
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return path


# ---------------------------------------------------------------------------------------------
# Loading


def _short(digest: str | None) -> str:
    return f"{digest[:8]}…" if digest else "none recorded"


def read_metadata(path) -> dict:
    """A reference's reference.json (format, metadata, file checksums), checked for format and version."""
    path = Path(path)
    if not path.exists():
        raise ReferenceMissingFileError(f"There is no reference at {path}.")
    meta_path = path / META_FILE
    if not path.is_dir() or not meta_path.exists():
        raise ReferenceFormatError(f"{path} is not a tracelib reference: it has no {META_FILE}.")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as err:
        raise ReferenceFormatError(f"{meta_path} is not readable JSON: {err}") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ReferenceFormatError(f"{meta_path} has no format marker {FORMAT!r}, so it is not a tracelib reference.")
    version = meta.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise ReferenceVersionError(f"{meta_path} has format version {version!r}, which is not a version number.")
    if version > FORMAT_VERSION:
        raise ReferenceVersionError(
            f"{path} was saved in reference format version {version}; this tracelib reads up to version "
            f"{FORMAT_VERSION}. Upgrade tracelib to load it."
        )
    return meta


def _read_tensors(path: Path, meta: dict) -> dict[str, Tensor]:
    from safetensors.torch import load as safetensors_load

    files = meta.get("files", {})
    if TENSOR_FILE not in files:
        raise ReferenceFormatError(f"{path / META_FILE} lists no {TENSOR_FILE}.")
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise ReferenceMissingFileError(f"The reference at {path} is missing {name}, which it lists.")
        data = file.read_bytes()
        if len(data) != expected["bytes"]:
            raise ReferenceTruncatedError(
                f"{file} is {len(data)} bytes, but was {expected['bytes']} when saved: it is "
                f"{'truncated' if len(data) < expected['bytes'] else 'longer than saved'}."
            )
        digest = hashlib.sha256(data).hexdigest()
        if digest != expected["sha256"]:
            raise ReferenceChecksumError(
                f"{file} changed since it was saved: sha256 {_short(digest)}, expected {_short(expected['sha256'])} "
                "(flipped or edited bytes)."
            )
        if name == TENSOR_FILE:
            blob = data
    try:
        tensors = safetensors_load(blob)
    except Exception as err:  # safetensors raises its own SafetensorError for a malformed header
        raise ReferenceFormatError(f"{path / TENSOR_FILE} is not a readable safetensors file: {err}") from err
    listed = meta.get("tensors", {})
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
    from tracelib.models import model_name

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


def load_reference(path, model=None):
    """Load a reference saved by `Trace.save` as a full `Trace`, with no model needed.

    Args:
        path: the reference folder.
        model: optional; when given, the reference must have been saved from these weights and this
            tokenizer (checked by fingerprint, see the module docstring).

    Returns:
        The saved `Trace`: its `.summary()`, `.to_dict()`, `.top()`s, `.to_frame()`s and `.plot()`s
        work without a model.

    Raises:
        ReferenceMissingFileError: there is no reference at `path`, or it lacks a file it lists.
        ReferenceFormatError: `path` is not a tracelib reference.
        ReferenceVersionError: it was saved by a newer format version.
        ReferenceTruncatedError, ReferenceChecksumError: a file's bytes changed since saving.
        ReferenceShapeError: a tensor's shape disagrees with the metadata.
        ReferenceModelMismatchError, ReferenceTokenizerMismatchError: `model` is not the one saved from.
    """
    path = Path(path)
    meta = read_metadata(path)
    tensors = _read_tensors(path, meta)
    if model is not None:
        check_model(meta, model)
    tree = meta["trace"]
    if meta["format_version"] == 1:
        tree = _upgrade_v1(tree, path)
    trace = _decode(tree, tensors)
    from tracelib.trace import Trace

    if not isinstance(trace, Trace):
        raise ReferenceFormatError(f"{path / META_FILE} holds a {type(trace).__name__}, not a Trace.")
    if model is not None:
        trace.heads.remember_model(model)  # so attention_view() needs no model= either
    return trace


_HEADS = "tracelib.heads:Heads"


def _upgrade_v1(tree, path: Path):
    """A version-1 trace tree as version 2: `Heads.patterns` dropped, `Heads.tokens` filled in.

    The token ids are recovered exactly: every saved `Row` holds its `tokens` (the ids the trace
    ran), and `Heads` has one row per `Row`, in order, so `tokens` points at the same saved tensors.
    Re-tokenising `str_tokens` would not be exact (a byte fragment's string is not its token).
    The dropped patterns stay in the tensor file, unread.
    """
    if not (isinstance(tree, dict) and isinstance(tree.get("fields"), dict)):
        raise ReferenceFormatError(f"{path / META_FILE} holds no trace to upgrade from format version 1.")
    fields = dict(tree["fields"])
    heads = fields.get("heads")
    rows = fields.get("rows")
    if not (isinstance(heads, dict) and heads.get("__dataclass__") == _HEADS and isinstance(rows, list)):
        return tree
    try:
        tokens = [row["fields"]["tokens"] for row in rows]
    except (KeyError, TypeError) as err:
        raise ReferenceFormatError(
            f"{path / META_FILE} (format version 1) has rows without token ids, so its heads cannot be upgraded."
        ) from err
    head_fields = {k: v for k, v in heads["fields"].items() if k != "patterns"}
    head_fields["tokens"] = tokens
    fields["heads"] = {**heads, "fields": head_fields}
    return {**tree, "fields": fields}
