"""What a study runs over: its items (prompt, answer) and its injections ("junk:after:2")."""

from __future__ import annotations

import csv
import io
import json
import operator
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tracelib.folders import MemberError, read_member
from tracelib.formats import described
from tracelib.ood import KINDS, WHERES
from tracelib.tiny_arith import OPS, PHRASINGS

MAX_ITEMS_BYTES = 256 * 2**20  # a prompts file larger than this is refused before it is read


class StudySpecError(ValueError):
    """A study's items, injections, seeds or options cannot be used; the message says which and why."""


@dataclass(frozen=True)
class Item:
    """One question of a study: the prompt and the answer the model should give."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class InjectionSpec:
    """One kind of injection, as `tl.inject` takes it: `kind` tokens `where`, `n` of them."""

    kind: str
    where: str
    n: int = 1

    def __str__(self) -> str:
        return f"{self.kind}:{self.where}:{self.n}"


def parse_injection(spec) -> InjectionSpec:
    """`"junk:after:2"` (kind, where, n; n defaults to 1) as an `InjectionSpec`.

    Raises:
        StudySpecError: an unknown kind or place, or an n that is not a positive integer.
    """
    if isinstance(spec, InjectionSpec):
        return spec
    if not isinstance(spec, str):
        raise StudySpecError(f"an injection is a string such as 'junk:after:2' (kind:where:n), got {described(spec)}")
    parts = spec.split(":")
    if len(parts) not in (2, 3):
        raise StudySpecError(f"injection {spec!r}: write it as kind:where:n, for example 'junk:after:2'")
    kind, where = parts[0].strip(), parts[1].strip()
    if kind not in KINDS:
        raise StudySpecError(f"injection {spec!r}: unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    if where not in WHERES:
        raise StudySpecError(f"injection {spec!r}: unknown place {where!r}; choose one of {', '.join(WHERES)}")
    n_text = parts[2].strip() if len(parts) == 3 else "1"
    if not n_text.isdigit() or int(n_text) < 1:
        raise StudySpecError(f"injection {spec!r}: n must be a positive integer, got {n_text!r}")
    return InjectionSpec(kind, where, int(n_text))


def check_seeds(seeds) -> tuple[int, ...]:
    """Seeds as a tuple of distinct ints (at least one)."""
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Iterable):
        seeds = (seeds,)
    out = []
    for s in seeds:
        if isinstance(s, bool) or not hasattr(type(s), "__index__"):
            raise StudySpecError(f"seeds must be ints, got {described(s)}")
        out.append(operator.index(s))
    if not out:
        raise StudySpecError("seeds: give at least one seed")
    if len(set(out)) != len(out):
        raise StudySpecError(f"seeds must be distinct, got {out}")
    return tuple(out)


def arithmetic_items(phrasings=None, operands=range(10), ops: str = "+-", negative: bool = False) -> list[Item]:
    """The seed task's prompt set: every operand pair in every phrasing, answer with a leading space.

    Args:
        phrasings: templates with `{a}`, `{b}` and `{s}` (the symbol) or `{w}` (the word, "plus"),
            or indices into the bundled model's phrasings (`tracelib.tiny_arith.PHRASINGS`).
            Default: the first one, "what is {a} {s} {b}".
        operands: the values each operand takes.
        ops: which of "+" and "-" to ask.
        negative: keep subtractions with a negative result (the bundled model never saw one).

    Returns:
        A list of `Item(prompt, answer)`: `("what is 1 + 1", " 2")`, ...
    """
    templates = [PHRASINGS[0]] if phrasings is None else [PHRASINGS[p] if isinstance(p, int) else p for p in phrasings]
    for t in templates:
        if not isinstance(t, str) or "{a}" not in t or "{b}" not in t:
            raise StudySpecError(f"a phrasing is a string with {{a}} and {{b}} (and {{s}} or {{w}}), got {t!r}")
    unknown = [op for op in ops if op not in OPS]
    if unknown:
        raise StudySpecError(f"ops: only {' and '.join(OPS)} are known, got {unknown}")
    operands = list(operands)
    items = []
    for t in templates:
        for op in ops:
            for a in operands:
                for b in operands:
                    result = a + b if op == "+" else a - b
                    if result < 0 and not negative:
                        continue
                    items.append(Item(t.format(a=a, b=b, s=op, w=OPS[op]), f" {result}"))
    return items


def read_items(items) -> list[Item]:
    """A study's items from a list of (prompt, answer) pairs, a JSONL or CSV file with `prompt`
    and `answer` columns, or a `datasets.Dataset` with those columns.

    Raises:
        StudySpecError: a missing file or column, an empty set, or an entry that is not two strings
            (the message names the line or index).
    """
    if isinstance(items, (str, Path)):
        out = _read_file(Path(items))
    elif hasattr(items, "column_names") and hasattr(items, "__getitem__"):  # a datasets.Dataset
        missing = [c for c in ("prompt", "answer") if c not in items.column_names]
        if missing:
            raise StudySpecError(f"the dataset has no {' or '.join(missing)} column (it has {items.column_names})")
        out = [_item(p, a, f"row {i}") for i, (p, a) in enumerate(zip(items["prompt"], items["answer"]))]
    elif isinstance(items, Iterable):
        out = []
        for i, entry in enumerate(items):
            if isinstance(entry, Item):
                out.append(entry)
            elif isinstance(entry, dict):
                out.append(_item(entry.get("prompt"), entry.get("answer"), f"item {i}"))
            elif isinstance(entry, (list, tuple)) and len(entry) == 2:
                out.append(_item(entry[0], entry[1], f"item {i}"))
            else:
                raise StudySpecError(f"item {i}: expected a (prompt, answer) pair, got {described(entry)}")
    else:
        raise StudySpecError(
            f"items: pass (prompt, answer) pairs, a .jsonl or .csv file, or a datasets.Dataset; got {described(items)}"
        )
    if not out:
        raise StudySpecError("items: the study has no items")
    return out


def _item(prompt, answer, where: str) -> Item:
    for name, value in (("prompt", prompt), ("answer", answer)):
        if not isinstance(value, str) or not value.strip():
            raise StudySpecError(f"{where}: {name} must be a non-empty string, got {described(value)}")
    return Item(prompt, answer)


def _read_file(path: Path) -> list[Item]:
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".csv"):
        raise StudySpecError(f"{path}: items are read from a .jsonl or .csv file with prompt and answer columns")
    try:  # the user named this file, so a link to it is followed; a FIFO or a huge file is refused
        resolved = path.resolve()
        data = read_member(resolved.parent, resolved.name, max_bytes=MAX_ITEMS_BYTES)
    except MemberError as err:
        raise StudySpecError(str(err)) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise StudySpecError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if suffix == ".jsonl":
        out = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as err:
                raise StudySpecError(f"{path}, line {number}: not JSON ({err.msg})") from None
            if not isinstance(entry, dict):
                raise StudySpecError(f"{path}, line {number}: expected an object with prompt and answer")
            out.append(_item(entry.get("prompt"), entry.get("answer"), f"{path}, line {number}"))
        return out
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = [c for c in ("prompt", "answer") if c not in (reader.fieldnames or [])]
    if missing:
        raise StudySpecError(f"{path}: no {' or '.join(missing)} column (the header is {reader.fieldnames})")
    return [_item(row["prompt"], row["answer"], f"{path}, line {reader.line_num}") for row in reader]
