"""Command line: `python -m tracelib trace --prompt "what is 1 + 1" --answer " 2"` (also `tracelib`), and
`python -m tracelib study --prompts FILE --inject junk:after:2 --out DIR` (also under `accelerate launch`)."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import secrets
import stat
import sys
import traceback
from pathlib import Path

import tracelib as tl
from tracelib import plotting
from tracelib.studies import process_state

# report_html puts this in every report's head: it is how --html knows a file is ours to overwrite.
_GENERATOR_MARKER = b'<meta name="generator" content="tracelib">'
# Exceptions whose message is written for the reader (tracelib's own too); any other kind is named: likely a bug.
_READABLE_ERRORS = (ValueError, OSError, RuntimeError)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr like every other error (usage is in --help)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _temp_name(target: Path) -> Path:
    """The temporary file `write_atomically` writes beside `target` before renaming it."""
    return target.parent / f".{target.name}.{secrets.token_hex(8)}.tmp"


def _probe_folder(path: Path, target: Path) -> None:
    """Create and remove the kind of temporary file the write will need, or fail now, saying why.

    Permission bits alone do not tell (root ignores them; a read-only mount or a too-long name does
    not show in them), so the probe does what `write_atomically` will do, and leaves nothing behind.
    """
    probe = _temp_name(target)
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise type(exc)(f"cannot write {path}: cannot create a file in the folder {target.parent} ({reason})") from None
    os.close(fd)
    probe.unlink(missing_ok=True)


def _check_html_target(path: Path, force: bool) -> Path:
    """The file to write for `path` (a symlink's target), or a clear error before any work is done."""
    path = Path(path)
    if not path.parent.is_dir():
        if path.parent.exists():
            raise NotADirectoryError(f"cannot write {path}: {path.parent} is a file, not a folder")
        # Creating folders is left to the user: a typo in a path should not grow a tree of folders.
        raise FileNotFoundError(f"cannot write {path}: the folder {path.parent} does not exist; create it first")
    target = Path(os.path.realpath(path))
    if not target.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: it links to {target}, whose folder does not exist")
    if target.exists():
        if not target.is_file():
            raise IsADirectoryError(f"cannot write {path}: it is not a regular file")
        if not force:
            with open(target, "rb") as f:
                head = f.read(4096)
            if _GENERATOR_MARKER not in head:
                raise FileExistsError(
                    f"{path} exists and is not a tracelib report; pass --force to overwrite it, or choose another path"
                )
    _probe_folder(path, target)
    return target


def write_atomically(path: Path, text: str, force: bool = False) -> None:
    """Write to a temporary file beside the target, fsync, then rename: a crash never leaves half a file.

    A symlink is written through (it stays a link), an existing file keeps its permission mode, and a
    file tracelib did not write is only replaced with `force`.
    """
    target = _check_html_target(path, force)
    mode = stat.S_IMODE(target.stat().st_mode) if target.exists() else None
    tmp = _temp_name(target)
    # Not mkstemp: its 0o600 would hide a new report from other users. 0o666 goes through the umask.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it the file
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # persist the rename too; Windows cannot open a folder
        with contextlib.suppress(OSError):
            dir_fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)


def _replace_non_finite(value, where: str, notes: list[str]):
    """`value` with every NaN or infinity replaced by None, each noted in `notes` with its path.

    JSON has no NaN or Infinity; Python's json writes them anyway and strict readers then fail.
    """
    if isinstance(value, float) and not math.isfinite(value):
        name = "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
        notes.append(f"{where} was {name}; written as null")
        return None
    if isinstance(value, dict):
        return {k: _replace_non_finite(v, f"{where}.{k}" if where else str(k), notes) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_replace_non_finite(v, f"{where}[{i}]", notes) for i, v in enumerate(value)]
    return value


def _strict_json(data: dict) -> str:
    notes: list[str] = []
    data = _replace_non_finite(data, "", notes)
    data["notes"] = [*data.get("notes", []), *notes]
    return json.dumps(data, indent=2, allow_nan=False)


def _one_line(exc: BaseException) -> str:
    """The exception's message on one line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    message = " ".join(lines)
    readable = isinstance(exc, _READABLE_ERRORS) or type(exc).__module__.startswith("tracelib")
    if not message or not readable:
        message = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return message


def _trace(args: argparse.Namespace) -> int:
    if args.html:  # refuse a bad destination before spending time on the model
        _check_html_target(Path(args.html), args.force)

    model = tl.load_model(args.model)
    prompt = tl.chat_prompt(model, args.prompt) if args.chat else args.prompt
    result = tl.trace(model, prompt, args.answer, distractors=args.distractors or None, metric=args.metric)
    if args.json:
        print(_strict_json(result.to_dict()))
    else:
        print(result.summary())
    if args.html:
        routes, note = _report_routes(model, prompt, args, result)
        write_atomically(Path(args.html), plotting.report_html(result, routes=routes), force=args.force)
        print(f"\nwrote {args.html}{note}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _report_routes(model, prompt: str, args: argparse.Namespace, result) -> tuple[tl.Routes | None, str]:
    """The routes for the report's Routes section, or None and a note on why the report has none.

    Routes explain one token, so a multi-token answer's report goes without; so does a model whose
    blocks the routes cannot read (the rest of the report is still worth writing).
    """
    if len(result.rows) > 1:
        return None, f" (no Routes section: routes explain one token, and {args.answer!r} is {len(result.rows)})"
    try:
        return tl.routes(model, prompt, args.answer, distractors=args.distractors or None), ""
    except (ValueError, RuntimeError, KeyError) as exc:
        return None, f" (no Routes section: {_one_line(exc)})"


def _study(args: argparse.Namespace) -> int:
    seeds = []
    for text in args.seeds.split(","):
        if not text.strip().lstrip("-").isdigit():
            raise tl.StudySpecError(f"--seeds: write integers separated by commas, such as 0,1; got {args.seeds!r}")
        seeds.append(int(text))
    injections = [str(tl.parse_injection(spec)) for spec in args.inject]  # a bad spec fails before the model loads
    items = tl.arithmetic_items() if args.prompts == "arithmetic" else tl.read_items(args.prompts)
    state = process_state()
    if args.device_map and state is not None:
        raise tl.StudySpecError("--device-map spreads one model over several GPUs; use it without accelerate launch")
    where = {"device_map": args.device_map} if args.device_map else {"device": state.device if state else None}
    model = tl.load_model(args.model, **where)
    result = tl.study(
        model,
        items,
        injections=injections,
        seeds=seeds,
        patch=args.patch,
        out=args.out,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        progress=True,
        overwrite=args.overwrite,
    )
    if state is None or state.is_main_process:
        if state is not None:
            print(f"ran on {state.num_processes} processes ({state.distributed_type.value})")
        print(result.summary())
        print(f"\nwrote {args.out} (read it with tl.load_study)")
    return 0


def _study_parser(sub) -> None:
    p = sub.add_parser("study", help="a robustness study over a prompt set, streamed to Parquet (resumable)")
    p.add_argument("--model", default="tiny-arith", help="bundled name, local folder, .gguf file or Hub name")
    p.add_argument("--prompts", required=True, help="a .jsonl or .csv file with prompt and answer, or 'arithmetic'")
    p.add_argument("--inject", action="append", required=True, help="kind:where:n, e.g. junk:after:2 (repeatable)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1")
    p.add_argument("--patch", default=None, help="also run the exact patching sweep: resid_pre, attn_out, ...")
    p.add_argument("--out", required=True, help="the study's folder (resumes a study already there)")
    p.add_argument("--batch-size", type=int, default=None, help="rows per forward pass (default: from free memory)")
    p.add_argument("--shard-size", type=int, default=16, help="items per shard (the unit of resumption)")
    p.add_argument("--overwrite", action="store_true", help="start over where the folder holds another study")
    p.add_argument("--device-map", default=None, help="'auto': spread a model too large for one GPU over all of them")
    p.add_argument("--debug", action="store_true", help="print the full traceback of an error")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="tracelib", description="Explain why a model predicts an answer.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("trace", "trace one prompt: margin, lens, DLA by component, head and neuron"),
        ("demo", "trace 'what is 1 + 1' on the bundled model and write report.html"),
    ):
        demo = name == "demo"
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--model", default="tiny-arith", help="bundled name, local folder, .gguf file or Hub name")
        # trace has no defaults here: a forgotten --answer must not silently explain the demo's answer.
        p.add_argument("--prompt", required=not demo, default="what is 1 + 1" if demo else None)
        p.add_argument("--answer", required=not demo, default=" 2" if demo else None, help='e.g. " 2"')
        p.add_argument("--distractors", nargs="*", default=None, help="tokens the answer should beat")
        p.add_argument("--metric", choices=["logit_diff", "logit"], default="logit_diff")
        p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
        p.add_argument("--json", action="store_true", help="print the JSON summary (strict: NaN becomes null)")
        p.add_argument("--html", default="report.html" if demo else None, help="write an offline HTML report")
        p.add_argument("--force", action="store_true", help="let --html overwrite a file tracelib did not write")
        p.add_argument("--debug", action="store_true", help="print the full traceback of an error")
    _study_parser(sub)
    args = parser.parse_args(argv)
    try:
        return _study(args) if args.command == "study" else _trace(args)
    except Exception as exc:  # every failure, load errors included, ends as one readable line
        if args.debug:
            traceback.print_exc()
        print(f"tracelib: error: {_one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
