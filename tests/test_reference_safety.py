"""References under attack and accident: hostile files, edits, crashes, races, and the wrong model.

Every case goes through the public API (`Trace.save`, `tl.load_reference`) and asserts both the
specific error and that nothing outside the reference was read, and nothing the user made was lost.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import signal

import pytest
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_bytes

import tracelib as tl
from tracelib import folders
from tracelib import reference_format as reference

# Fixtures from tests/conftest.py: `clean` (a two-row trace of tiny-arith) and `saved` (it, saved afresh).


def read_meta(folder) -> dict:
    return json.loads((folder / "reference.json").read_text())


def write_meta(folder, meta: dict, resign: bool = True) -> None:
    """Write reference.json; `resign` recomputes the content checksum, as a deliberate forger would."""
    if resign:
        meta["content_sha256"] = reference.canonical_sha256({k: v for k, v in meta.items() if k != "content_sha256"})
    (folder / "reference.json").write_text(json.dumps(meta))


def edit(folder, change, resign: bool = True) -> None:
    meta = read_meta(folder)
    change(meta)
    write_meta(folder, meta, resign)


def rewrite_tensors(folder, change) -> None:
    """Change the tensors and update every checksum and listed dtype to match, as a forger would."""
    blob = (folder / "tensors.safetensors").read_bytes()
    tensors = {k: v.clone() for k, v in safetensors_load(blob).items()}
    change(tensors)
    blob = safetensors_bytes(tensors)
    (folder / "tensors.safetensors").write_bytes(blob)
    meta = read_meta(folder)
    meta["files"]["tensors.safetensors"] = {
        "bytes": len(blob),
        "sha256": __import__("hashlib").sha256(blob).hexdigest(),
    }
    meta["tensors"] = {
        k: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for k, t in tensors.items()
    }
    write_meta(folder, meta)


@pytest.fixture
def no_hang():
    """Fail a test that blocks (a FIFO read) instead of hanging the suite."""

    def alarm(signum, frame):
        raise TimeoutError("blocked for 20 s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture
def bytes_read(monkeypatch):
    """Counts every byte tracelib's safe reader reads."""
    counter = {"n": 0}
    real = os.read

    def counting(fd, n):
        data = real(fd, n)
        counter["n"] += len(data)
        return data

    monkeypatch.setattr(folders.os, "read", counting)
    return counter


# ---------------------------------------------------------------------------------------------
# Reading only what the format defines, inside the folder


def test_a_listed_file_outside_the_folder_is_refused_unread(saved, tmp_path, bytes_read):
    secret = tmp_path / "secret"
    secret.write_bytes(b"x")
    edit(saved, lambda m: m["files"].update({"../secret": {"bytes": 1, "sha256": "0" * 64}}))
    with pytest.raises(tl.ReferenceFormatError, match=r"'files'.*'\.\./secret'.*not part of the format") as err:
        tl.load_reference(saved)
    assert bytes_read["n"] == (saved / "reference.json").stat().st_size  # reference.json, and nothing else
    assert str(secret) not in str(err.value)  # nothing about the outside file: not its size, not its hash


def test_a_tensor_file_that_is_a_symlink_is_not_followed(saved, tmp_path):
    outside = tmp_path / "outside.bin"
    os.replace(saved / "tensors.safetensors", outside)  # the very bytes the reference expects
    (saved / "tensors.safetensors").symlink_to(outside)
    with pytest.raises(tl.ReferenceFormatError, match="tensors.safetensors is a symbolic link"):
        tl.load_reference(saved)


def test_a_huge_tensor_file_is_refused_before_it_is_read(saved, bytes_read):
    with open(saved / "tensors.safetensors", "r+b") as f:
        f.truncate(800 * 2**20)  # sparse: 800 MB long, nothing on disk
    with pytest.raises(tl.ReferenceTruncatedError, match="longer than saved"):
        tl.load_reference(saved)
    assert bytes_read["n"] < 64 * 2**20  # only reference.json was read, never the 800 MB


@pytest.mark.parametrize("kind", ["dev-zero", "huge"])
def test_an_endless_or_huge_reference_json_is_refused_before_it_is_read(saved, tiny, clean, kind, bytes_read):
    meta = saved / "reference.json"
    meta.unlink()
    if kind == "dev-zero":
        meta.symlink_to("/dev/zero")
        message = "reference.json is a symbolic link"
    else:
        with open(meta, "wb") as f:
            f.truncate(reference.MAX_META_BYTES + 1)
        message = "more than the .* allowed"
    with pytest.raises(tl.ReferenceFormatError, match=message):
        tl.load_reference(saved)
    with pytest.raises(tl.ReferenceOverwriteError, match="not a tracelib reference"):
        clean.save(saved, tiny)  # saving checks what is there the same safe way
    assert bytes_read["n"] == 0


def test_a_fifo_never_hangs_load_or_save(saved, tiny, clean, no_hang):
    (saved / "reference.json").unlink()
    os.mkfifo(saved / "reference.json")
    with pytest.raises(tl.ReferenceFormatError, match=r"reference.json is a FIFO \(named pipe\), not a regular file"):
        tl.load_reference(saved)
    with pytest.raises(tl.ReferenceOverwriteError, match="not a tracelib reference"):
        clean.save(saved, tiny)


# ---------------------------------------------------------------------------------------------
# Edits and malformed content


def test_an_edited_target_is_caught_by_the_checksum(saved, tiny):
    def retarget(m):
        row = m["trace"]["fields"]["rows"][0]["fields"]
        row["target"], row["target_str"] = 21, "7"

    edit(saved, retarget, resign=False)
    with pytest.raises(tl.ReferenceChecksumError, match="reference.json changed since it was saved"):
        tl.load_reference(saved, model=tiny)


def test_an_edited_target_with_a_recomputed_checksum_is_caught_by_the_cross_checks(saved):
    def retarget(m):
        row = m["trace"]["fields"]["rows"][0]["fields"]
        row["target"], row["target_str"] = 21, "7"

    edit(saved, retarget)
    with pytest.raises(tl.ReferenceContentError, match=r"trace\.(margin\.row_labels|margin\.answers)"):
        tl.load_reference(saved)


def _fields(m, *path):
    node = m["trace"]
    for key in path:
        node = node["fields"][key] if isinstance(key, str) else node[key]
    return node


MALFORMED = {
    # name: (change to reference.json, error class, what the message must name)
    "missing key": (
        lambda m: m["trace"]["fields"].pop("margin"),
        tl.ReferenceFormatError,
        "missing its field 'margin'",
    ),
    "unknown field": (lambda m: m["trace"]["fields"].update(extra=1), tl.ReferenceFormatError, "no field 'extra'"),
    "int as string": (
        lambda m: _fields(m, "rows", 0)["fields"].update(target="20"),
        tl.ReferenceFormatError,
        r"trace\.rows\.0\.target: expected int, found str",
    ),
    "bool as int": (
        lambda m: _fields(m, "rows", 0)["fields"].update(step=True),
        tl.ReferenceFormatError,
        r"trace\.rows\.0\.step: expected int, found bool",
    ),
    "list as dict": (
        lambda m: m["trace"]["fields"].update(rows={"a": 1}),
        tl.ReferenceFormatError,
        r"trace\.rows: expected list",
    ),
    "wrong nested class": (
        lambda m: m["trace"]["fields"].update(margin=m["trace"]["fields"]["dla"]),
        tl.ReferenceFormatError,
        r"trace\.margin: expected Margin, found Attribution",
    ),
    "foreign class": (
        lambda m: m["trace"]["fields"]["margin"].update(__dataclass__="os:system"),
        tl.ReferenceFormatError,
        r"trace\.margin: .*'os:system', which is not tracelib's",
    ),
    "list of the wrong length": (
        lambda m: _fields(m, "margin")["fields"]["answers"].append("9"),
        tl.ReferenceContentError,
        r"trace\.margin\.answers",
    ),
    "dangling tensor pointer": (
        lambda m: _fields(m, "margin")["fields"].update(logit={"__tensor__": "nowhere"}),
        tl.ReferenceShapeError,
        r"trace\.margin\.logit: points at tensor 'nowhere'",
    ),
    "nesting where a string belongs": (
        lambda m: _fields(m, "margin")["fields"].update(answers=[[[["2"]]]]),
        tl.ReferenceFormatError,
        r"trace\.margin\.answers\.0: expected str, found list",
    ),
    "metadata not an object": (lambda m: m.update(metadata=[1]), tl.ReferenceFormatError, "'metadata'"),
    "tensor spec wrong": (
        lambda m: m["tensors"]["trace.margin.logit"].update(shape="2"),
        tl.ReferenceFormatError,
        r"'tensors\.trace\.margin\.logit'",
    ),
    "size not a number": (
        lambda m: m["files"]["tensors.safetensors"].update(bytes="12"),
        tl.ReferenceFormatError,
        r"'files\.tensors\.safetensors\.bytes'",
    ),
    "version not a number": (lambda m: m.update(format_version="4"), tl.ReferenceVersionError, "not a version number"),
    "model name edited": (
        lambda m: m["trace"]["fields"].update(model_name="gpt2"),
        tl.ReferenceContentError,
        r"trace\.model_name",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_reference_json_names_the_field(saved, case):
    change, error, message = MALFORMED[case]
    edit(saved, change)
    with pytest.raises(error, match=message):
        tl.load_reference(saved)


def test_json_nested_past_pythons_recursion_limit_is_a_format_error(saved):
    (saved / "reference.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(tl.ReferenceFormatError, match="nested too deeply"):
        tl.load_reference(saved)


def test_retyped_tensors_are_refused_even_with_every_checksum_updated(saved):
    rewrite_tensors(saved, lambda t: t.update({"trace.margin.logit": t["trace.margin.logit"].view(torch.int32)}))
    with pytest.raises(tl.ReferenceShapeError, match=r"trace\.margin\.logit: .*int32 \[2\], which is not Float"):
        tl.load_reference(saved)


def test_a_nan_is_refused_where_trace_would_have_refused_it(saved):
    def poison(t):
        t["trace.margin.logit"][0] = float("nan")

    rewrite_tensors(saved, poison)
    with pytest.raises(tl.ReferenceShapeError, match=r"trace\.margin\.logit: .*inf or NaN"):
        tl.load_reference(saved)


def test_every_float_a_real_trace_saves_is_finite(saved):
    """The NaN rule above refuses nothing a real trace writes (padding is zeros, not NaN)."""
    tensors = safetensors_load((saved / "tensors.safetensors").read_bytes())
    assert all(bool(t.isfinite().all()) for t in tensors.values() if t.is_floating_point())


def test_a_format_3_reference_without_a_checksum_still_loads(saved, tiny, clean):
    meta = read_meta(saved)
    meta.pop("content_sha256")
    meta["format_version"] = 3
    meta["trace"]["fields"].pop("weights_fingerprint")
    write_meta(saved, meta, resign=False)
    loaded = tl.load_reference(saved, model=tiny)
    assert loaded.identity == clean.identity  # taken from the metadata


# ---------------------------------------------------------------------------------------------
# Saving never destroys what it did not write


def test_saving_over_a_reference_with_the_users_files_is_refused(saved, tiny, clean):
    (saved / "notes.md").write_text("my notes")
    before = read_meta(saved)
    with pytest.raises(tl.ReferenceOverwriteError, match=r"also holds notes\.md, which tracelib did not write"):
        tl.trace(tiny, "what is 3 + 4", " 7").save(saved, tiny)
    assert (saved / "notes.md").read_text() == "my notes"
    assert read_meta(saved) == before


def test_a_symlink_at_the_path_is_refused_and_its_target_kept(saved, tiny, clean, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(saved)
    with pytest.raises(tl.ReferenceOverwriteError, match="is a symbolic link"):
        clean.save(link, tiny)
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(tl.ReferenceOverwriteError, match="is a symbolic link"):
        clean.save(dangling, tiny)
    assert link.is_symlink() and dangling.is_symlink() and not (tmp_path / "nowhere").exists()
    tl.load_reference(link)  # the target is untouched


def _kill_during_save(monkeypatch, after_renames: int) -> None:
    """Simulate kill -9 after `after_renames` successful renames: no handler, no cleanup runs."""
    real = os.replace
    calls = {"n": 0}

    class Killed(BaseException):
        pass

    def replace(src, dst):
        calls["n"] += 1
        if calls["n"] > after_renames:
            raise Killed
        return real(src, dst)

    monkeypatch.setattr(folders.os, "replace", replace)
    monkeypatch.setattr(folders, "remove_own", lambda *a, **k: False)
    return Killed


def test_a_save_killed_between_its_renames_leaves_the_old_reference_recoverable(saved, tiny, clean, monkeypatch):
    killed = _kill_during_save(monkeypatch, after_renames=1)
    with pytest.raises(killed):
        tl.trace(tiny, "what is 3 + 4", " 7").save(saved, tiny)
    monkeypatch.undo()
    assert not saved.exists()
    with pytest.raises(
        tl.ReferenceMissingFileError, match=r"\.ref\.old-\w+ \(the reference an interrupted save"
    ) as err:
        tl.load_reference(saved)
    message = str(err.value)
    assert "complete new reference" in message  # the new one, fully written, is there too
    # Follow the message's own instruction, and the old reference is back, exactly.
    old = message.split("os.replace(")[1].split(",")[0].strip("'")
    os.replace(old, saved)
    with pytest.warns(tl.ReferenceLeftoverWarning, match=r"\.ref\.tmp-"):
        assert tl.load_reference(saved).summary() == clean.summary()


def test_a_save_killed_before_deleting_the_old_copy_warns_on_load(saved, tiny, monkeypatch):
    newer = tl.trace(tiny, "what is 3 + 4", " 7")
    monkeypatch.setattr(folders, "remove_own", lambda *a, **k: False)
    newer.save(saved, tiny)
    monkeypatch.undo()
    with pytest.warns(tl.ReferenceLeftoverWarning, match=r"\.ref\.old-\w+ \(the reference an interrupted save"):
        assert tl.load_reference(saved).summary() == newer.summary()


def test_a_save_that_loses_a_race_raises_and_the_winner_stays(saved, tiny, monkeypatch):
    first, second = tl.trace(tiny, "what is 3 + 4", " 7"), tl.trace(tiny, "what is 4 + 4", " 8")
    real = folders.write_file
    raced = {"done": False}

    def write_file(path, data):
        real(path, data)
        if path.name == "reference.json" and not raced["done"]:
            raced["done"] = True
            second.save(saved, tiny)  # another save lands while the first is still writing

    monkeypatch.setattr(folders, "write_file", write_file)
    with pytest.raises(tl.ReferenceConflictError, match=f"Another save replaced {saved} while this one was writing"):
        first.save(saved, tiny)
    monkeypatch.undo()
    assert tl.load_reference(saved).summary() == second.summary()
    assert sorted(p.name for p in saved.parent.iterdir()) == ["ref"]  # the loser cleaned up after itself


_RACERS: list = []  # (trace, model, path): set before forking, inherited by the children


def _save_many(which: int, n: int, results) -> None:
    trace, model, path = _RACERS[which]
    for _ in range(n):
        try:
            trace.save(path, model)
            results.put("saved")
        except tl.ReferenceConflictError:
            results.put("conflict")
        except Exception as err:  # noqa: BLE001 - reported to the test, which fails on it
            results.put(f"{type(err).__name__}: {err}")


def test_two_processes_saving_to_one_path_end_with_one_valid_reference(saved, tiny):
    traces = [tl.trace(tiny, "what is 3 + 4", " 7"), tl.trace(tiny, "what is 4 + 4", " 8")]
    for t in traces:
        t.lens.materialise(tiny)
    _RACERS[:] = [(t, tiny, saved) for t in traces]
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    racers = [ctx.Process(target=_save_many, args=(i, 6, results)) for i in range(2)]
    for p in racers:
        p.start()
    outcomes = [results.get(timeout=120) for _ in range(12)]
    for p in racers:
        p.join(timeout=60)
    assert set(outcomes) <= {"saved", "conflict"} and "saved" in outcomes, outcomes
    loaded = tl.load_reference(saved, model=tiny)
    assert loaded.summary() in {t.summary() for t in traces}
    assert sorted(p.name for p in saved.parent.iterdir()) == ["ref"]


def test_file_system_errors_name_the_users_path(tiny, clean, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("mine")
    with pytest.raises(tl.ReferenceWriteError, match=f"Cannot save the reference to {blocker / 'ref'}"):
        clean.save(blocker / "ref", tiny)
    assert blocker.read_text() == "mine"

    def full(path, data):
        raise OSError(errno.EFBIG, "File too large")

    monkeypatch.setattr(folders, "write_file", full)
    with pytest.raises(tl.ReferenceWriteError) as err:
        clean.save(tmp_path / "ref", tiny)
    assert str(err.value) == f"Cannot save the reference to {tmp_path / 'ref'}: File too large."
    assert ".tmp-" not in str(err.value) and list(tmp_path.iterdir()) == [blocker]


def test_a_name_near_the_file_system_limit_saves(tiny, clean, tmp_path):
    path = tmp_path / ("r" * 245)
    clean.save(path, tiny)
    clean.save(path, tiny)  # and replaces: the hidden siblings' names stay under 255 bytes
    assert tl.load_reference(path).summary() == clean.summary()


# ---------------------------------------------------------------------------------------------
# The right model, and the right objects


def test_a_loaded_reference_refuses_another_models_attention_view(saved, tiny, other):
    loaded = tl.load_reference(saved)
    with pytest.raises(tl.ModelMismatchError, match=r"These heads comes? from tiny-arith \(weights \w{8}\).*same name"):
        loaded.heads.attention_view(model=other)
    loaded.heads.attention_view(model=tiny)  # the right one draws


def test_saving_with_same_named_other_weights_is_refused(clean, other, tmp_path):
    with pytest.raises(tl.ReferenceModelMismatchError, match="same name, other weights"):
        clean.save(tmp_path / "ref", other)
    assert not (tmp_path / "ref").exists()


@pytest.mark.parametrize("bad", ["tiny-arith", None, 3])
def test_wrong_objects_get_a_type_error_saying_what_to_pass(saved, clean, bad, tmp_path):
    with pytest.raises(TypeError, match=r"Trace.save: pass a model from tl.load_model"):
        clean.save(tmp_path / "x", bad)
    if bad is not None:
        with pytest.raises(TypeError, match=r"load_reference: pass a model from tl.load_model"):
            tl.load_reference(saved, model=bad)
    with pytest.raises(TypeError, match="load_reference: pass a folder path"):
        tl.load_reference(3)
