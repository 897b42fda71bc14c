"""Command line: `python -m tracelib trace --prompt "what is 1 + 1" --answer " 2"` (also `tracelib`)."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path


def write_atomically(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _trace(args: argparse.Namespace) -> int:
    import tracelib as tl
    from tracelib import plotting

    model = tl.load_model(args.model)
    prompt = tl.chat_prompt(model, args.prompt) if args.chat else args.prompt
    result = tl.trace(model, prompt, args.answer, distractors=args.distractors or None, metric=args.metric)
    if args.json:
        print(result.to_json(indent=2))
    else:
        print(result.summary())
    if args.html:
        write_atomically(Path(args.html), plotting.report_html(result))
        print(f"\nwrote {args.html}", file=sys.stderr if args.json else sys.stdout)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tracelib", description="Explain why a model predicts an answer.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("trace", "trace one prompt: margin, lens, DLA by component, head and neuron"),
        ("demo", "trace 'what is 1 + 1' on the bundled model and write report.html"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--model", default="tiny-arith", help="bundled name, local folder or Hub name")
        p.add_argument("--prompt", default="what is 1 + 1")
        p.add_argument("--answer", default=" 2")
        p.add_argument("--distractors", nargs="*", default=None, help="tokens the answer should beat")
        p.add_argument("--metric", choices=["logit", "logit_diff"], default="logit")
        p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
        p.add_argument("--json", action="store_true", help="print the JSON summary instead of text")
        p.add_argument("--html", default="report.html" if name == "demo" else None, help="write an offline HTML report")
    args = parser.parse_args(argv)
    try:
        return _trace(args)
    except (ValueError, OSError) as exc:
        print(f"tracelib: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
