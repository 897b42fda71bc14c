"""Load a reference back as a full `Trace`: every field read against the result classes' types.

The folder format, saving, and the checks on the files themselves live in
`tracelib.reference_format` (below the trace layer, so `Trace.save` can use it); this module reads
the trace tree back, top down, against the annotations of `Trace` and the classes it holds, and
cross-checks the parts (see `reference_format`'s docstring for the whole format).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import types
import typing
from pathlib import Path

from jaxtyping import AbstractArray
from torch import Tensor

from tracelib.identity import check_model_arg
from tracelib.reference_format import (
    _MAX_DEPTH,
    META_FILE,
    TENSOR_FILE,
    ReferenceContentError,
    ReferenceFormatError,
    ReferenceShapeError,
    TraceReferenceError,
    _check_leftovers,
    _read_tensors,
    check_model,
    read_metadata,
)
from tracelib.trace import Trace

# ---------------------------------------------------------------------------------------------
# Decoding: the tree is read against the schema the result classes' annotations give, top down


def _class(name, where: str) -> type:
    """A tracelib dataclass by `module:qualname`; anything else is refused, so loading runs no foreign code."""
    if not isinstance(name, str):
        raise ReferenceFormatError(f"{where}: the class name is {type(name).__name__}, not a string.")
    module, _, qualname = name.partition(":")
    if not module.startswith("tracelib."):
        raise ReferenceFormatError(f"{where}: the reference names the class {name!r}, which is not tracelib's.")
    try:
        cls = getattr(importlib.import_module(module), qualname)
    except (ImportError, AttributeError, ValueError) as err:
        raise ReferenceFormatError(
            f"{where}: the reference names the class {name!r}, which this tracelib lacks."
        ) from err
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise ReferenceFormatError(f"{where}: the reference names {name!r}, which is not a tracelib result class.")
    return cls


@functools.cache
def _hints(cls: type) -> dict:
    return typing.get_type_hints(cls)


def _describe(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _wrong(where: str, hint, value) -> ReferenceFormatError:
    shown = type(value).__name__ if not isinstance(value, dict) else f"an object with keys {sorted(value)[:4]}"
    return ReferenceFormatError(f"{where}: expected {_describe(hint)}, found {shown}.")


class _Decoder:
    """Rebuilds a trace tree against the result classes' annotations, naming the field of any fault."""

    def __init__(self, tensors: dict[str, Tensor]) -> None:
        self.tensors = tensors
        self.used: set[str] = set()

    def decode(self, value, hint, where: str, depth: int = 0):
        if depth > _MAX_DEPTH:
            raise ReferenceFormatError(f"{where}: nested deeper than {_MAX_DEPTH} levels, which no trace is.")
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if hint is typing.Any or hint is object:
            raise ReferenceFormatError(f"{where}: this field's type is not part of the reference format.")
        if origin in (typing.Union, types.UnionType):
            if value is None and type(None) in args:
                return None
            errors = []
            for alt in (a for a in args if a is not type(None)):
                try:
                    return self.decode(value, alt, where, depth)
                except TraceReferenceError as err:
                    errors.append(str(err))
            raise ReferenceFormatError(
                errors[0] if len(errors) == 1 else f"{where}: matches none of {_describe(hint)}."
            )
        if isinstance(hint, type) and issubclass(hint, (Tensor, AbstractArray)):
            return self._tensor(value, hint, where)
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            return self._dataclass(value, hint, where, depth)
        if origin is list:
            if not isinstance(value, list):
                raise _wrong(where, hint, value)
            (item,) = args or (object,)
            return [self.decode(v, item, f"{where}.{i}", depth + 1) for i, v in enumerate(value)]
        if origin is tuple:
            if not (isinstance(value, dict) and set(value) == {"__tuple__"} and isinstance(value["__tuple__"], list)):
                raise _wrong(where, hint, value)
            items = value["__tuple__"]
            kinds = [args[0]] * len(items) if len(args) == 2 and args[1] is Ellipsis else list(args)
            if len(kinds) != len(items):
                raise ReferenceFormatError(f"{where}: expected {len(kinds)} items, found {len(items)}.")
            return tuple(self.decode(v, k, f"{where}.{i}", depth + 1) for i, (v, k) in enumerate(zip(items, kinds)))
        if origin is dict:
            pairs = value.get("__dict__") if isinstance(value, dict) and set(value) == {"__dict__"} else None
            if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
                raise _wrong(where, hint, value)
            key_hint, value_hint = args or (object, object)
            out = {}
            for k, v in pairs:
                self._scalar(k, key_hint, f"{where} key")
                out[k] = self.decode(v, value_hint, f"{where}.{k}", depth + 1)
            return out
        if hint in (int, float, str, bool):
            return self._scalar(value, hint, where)
        raise ReferenceFormatError(
            f"{where}: this field's type ({_describe(hint)}) is not part of the reference format."
        )

    def _scalar(self, value, hint, where: str):
        if hint is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            value = float(value) if ok else value
        elif hint is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, hint)
        if not ok:
            raise _wrong(where, hint, value)
        return value

    def _tensor(self, value, hint, where: str) -> Tensor:
        key = value.get("__tensor__") if isinstance(value, dict) and set(value) == {"__tensor__"} else None
        if not isinstance(key, str):
            raise _wrong(where, "a tensor", value)
        if key not in self.tensors:
            raise ReferenceShapeError(f"{where}: points at tensor {key!r}, which {TENSOR_FILE} does not hold.")
        tensor = self.tensors[key]
        self.used.add(key)
        if not isinstance(tensor, hint):
            raise ReferenceShapeError(
                f"{where}: tensor {key!r} is {str(tensor.dtype).removeprefix('torch.')} {list(tensor.shape)}, "
                f"which is not {_describe(hint)}."
            )
        if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
            raise ReferenceShapeError(
                f"{where}: tensor {key!r} holds inf or NaN; trace() refuses non-finite results, so a reference "
                "never holds them."
            )
        return tensor

    def _dataclass(self, value, hint: type, where: str, depth: int):
        if not (isinstance(value, dict) and set(value) == {"__dataclass__", "fields"}):
            raise _wrong(where, hint, value)
        cls = _class(value["__dataclass__"], where)
        if not issubclass(cls, hint):
            raise ReferenceFormatError(f"{where}: expected {hint.__name__}, found {cls.__name__}.")
        fields = value["fields"]
        if not isinstance(fields, dict):
            raise _wrong(f"{where}.fields", "an object", fields)
        known = {f.name: f for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(fields) - set(known))
        if unknown:
            raise ReferenceFormatError(f"{where}: {cls.__name__} has no field {unknown[0]!r}.")
        missing = [
            n
            for n, f in known.items()
            if n not in fields and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise ReferenceFormatError(f"{where}: {cls.__name__} is missing its field {missing[0]!r}.")
        hints = _hints(cls)
        values = {k: self.decode(v, hints[k], f"{where}.{k}", depth + 1) for k, v in fields.items()}
        try:
            return cls(**values)
        except (ValueError, TypeError, AssertionError, IndexError) as err:
            raise ReferenceShapeError(f"{where}: the saved {cls.__name__} does not rebuild: {err}") from err


def _cross_check(trace, meta: dict, where: str) -> None:
    """The parts of a loaded trace agree with each other and with the metadata, or the field is named."""
    rows, m = trace.rows, trace.margin
    n = len(rows)
    labels = [row.label for row in rows]
    problems = []

    def expect(ok: bool, field: str, what: str) -> None:
        if not ok and not problems:
            problems.append(f"{where}.{field}: {what}")

    for name in ("margin", "lens", "dla", "heads", "positions"):
        expect(getattr(trace, name).row_labels == labels, f"{name}.row_labels", "differs from the rows' labels")
    expect(trace.distractors == [row.distractors for row in rows], "distractors", "differs from the rows'")
    expect(m.distractor_ids == trace.distractors, "margin.distractor_ids", "differs from the rows' distractors")
    expect(m.answers == [row.target_str for row in rows], "margin.answers", "differs from the rows' target_str")
    expect(m.distractor_strs == [row.distractor_strs for row in rows], "margin.distractor_strs", "differs")
    for r, row in enumerate(rows):
        expect(len(row.str_tokens) == len(row.tokens), f"rows.{r}.str_tokens", "not one per token id")
        expect(0 <= row.step < row.n_steps, f"rows.{r}.step", f"{row.step} is not a step of {row.n_steps}")
        expect(len(row.distractors) == len(row.distractor_strs), f"rows.{r}.distractor_strs", "not one per id")
        expect(row.target not in row.distractors, f"rows.{r}.target", "is also one of its distractors")
        expect(
            tuple(trace.heads.tokens[r].shape) == tuple(row.tokens.shape)
            and bool((trace.heads.tokens[r] == row.tokens).all()),
            f"heads.tokens.{r}",
            "differs from the row's token ids",
        )
        expect(trace.heads.str_tokens[r] == row.str_tokens, f"heads.str_tokens.{r}", "differs from the row's")
        expect(trace.positions.str_tokens[r] == row.str_tokens, f"positions.str_tokens.{r}", "differs from the row's")
        rank = int(m.rank[r])
        if 0 <= rank < m.top_ids.shape[1]:
            expect(int(m.top_ids[r, rank]) == row.target, f"rows.{r}.target", "is not the token the margin ranks")
        expect(m.top_ids.shape[0] == n, "margin.top_ids", f"has {m.top_ids.shape[0]} rows, not {n}")
    if trace.lens.answer_strs:
        expect(trace.lens.answer_strs == m.answers, "lens.answer_strs", "differs from the margin's answers")
    saved = meta["metadata"]
    expect(trace.model_name == saved.get("model_name"), "model_name", "differs from the metadata's model_name")
    if trace.weights_fingerprint:
        expect(
            trace.weights_fingerprint == saved.get("weights_fingerprint"),
            "weights_fingerprint",
            "differs from the metadata's weights_fingerprint",
        )
    if "value_biases" in saved:
        expect(trace.dla.value_biases == saved["value_biases"], "dla.value_biases", "differs from the metadata's")
    if problems:
        raise ReferenceContentError(f"The reference's parts disagree: {problems[0]}.")


def load_reference(path, model=None):
    """Load a reference saved by `Trace.save` as a full `Trace`, with no model needed.

    Only the two files the format defines are opened, directly inside the folder, as regular
    files (never through a symlink), with their sizes checked before reading. Every field is read
    against the result classes' types, the parts are cross-checked, and a format-4 reference's
    `reference.json` is covered by a content checksum, so an edited field is refused rather than
    explained.

    Args:
        path: the reference folder.
        model: optional; when given, the reference must have been saved from these weights and this
            tokenizer (checked by fingerprint, see the module docstring).

    Returns:
        The saved `Trace`: its `.summary()`, `.to_dict()`, `.top()`s, `.to_frame()`s and `.plot()`s
        work without a model.

    Raises:
        ReferenceMissingFileError: there is no reference at `path` (the message names any copy an
            interrupted save left, and how to restore it), or it lacks a file it lists.
        ReferenceFormatError: `path` is not a tracelib reference, or a field is malformed (named).
        ReferenceVersionError: it was saved by a newer format version.
        ReferenceTruncatedError, ReferenceChecksumError: a file's bytes changed since saving.
        ReferenceShapeError: a tensor's shape, dtype or finiteness disagrees with the format.
        ReferenceContentError: the parts disagree with each other or with the metadata.
        ReferenceModelMismatchError, ReferenceTokenizerMismatchError: `model` is not the one saved from.

    Warns:
        ReferenceLeftoverWarning: an interrupted save left a copy beside the reference.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"load_reference: pass a folder path (str or Path), got {type(path).__name__}.")
    if model is not None:
        check_model_arg(model, "load_reference")
    path = Path(path)
    meta = read_metadata(path)
    tensors = _read_tensors(path, meta)
    if model is not None:
        check_model(meta, model)
    tree = meta["trace"]
    if meta["format_version"] == 1:
        tree = _upgrade_v1(tree, path)
    decoder = _Decoder(tensors)
    trace = decoder.decode(tree, Trace, "trace")
    if not trace.weights_fingerprint:  # saved before traces carried it: the metadata's is the same
        fingerprint = meta["metadata"].get("weights_fingerprint") or ""
        trace = dataclasses.replace(trace, weights_fingerprint=fingerprint)
    _cross_check(trace, meta, "trace")
    trace.heads.remember_identity(trace.identity)
    if model is not None:
        trace.heads.remember_model(model)  # so attention_view() needs no model= either
    _check_leftovers(path, exists=True)
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
    if not isinstance(heads.get("fields"), dict):
        raise ReferenceFormatError(f"{path / META_FILE} field 'trace.heads.fields' must be an object.")
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
