"""References: `Trace.save` and `tl.load_reference` round-trip exactly, and refuse every kind of damage."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import pandas as pd
import pytest
import torch

import tracelib as tl
from tracelib import reference_format as reference

# Fixtures from tests/conftest.py: `clean` (a two-row trace of tiny-arith) and `saved` (it, saved afresh).


def assert_same(a, b, where: str = "trace") -> None:
    """Every field equal, walking dataclasses and lists; tensors equal in dtype, shape and value."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif dataclasses.is_dataclass(a):
        for f in dataclasses.fields(a):
            assert_same(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}.{i}")
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, where


def frames(t) -> dict[str, pd.DataFrame]:
    out = {
        "margin": t.margin.to_frame(),
        "lens": t.lens.to_frame(),
        "heads": t.heads.to_frame(),
        "positions": t.positions.to_frame(),
        "source": t.heads.source(*t.heads.strongest(1)[0], row=1).to_frame(),
    }
    for unit in ("component", "layer", "head", "neuron"):
        out[f"dla {unit}"] = t.dla.to_frame(unit)
    for r in range(len(t.rows)):
        out[f"margin top {r}"] = t.margin.top(3, r)
        out[f"lens top {r}"] = t.lens.top(3, r, lens="dla")
        out[f"heads top {r}"] = t.heads.top(3, r)
        out[f"positions top {r}"] = t.positions.top(3, r)
        for unit in ("component", "head", "neuron"):
            out[f"dla top {unit} {r}"] = t.dla.top(3, unit, r)
    return out


def test_round_trip_is_exact(clean, saved):
    loaded = tl.load_reference(saved)
    assert_same(clean, loaded)
    assert loaded.to_json() == clean.to_json()
    assert loaded.summary() == clean.summary()
    assert repr(loaded) == repr(clean)
    expected = frames(clean)
    for name, frame in frames(loaded).items():
        pd.testing.assert_frame_equal(frame, expected[name], obj=name)
    for r in range(len(clean.rows)):
        assert loaded.positions.verdict(r) == clean.positions.verdict(r)
        assert loaded.lens.readable_from(r) == clean.lens.readable_from(r)


def test_loaded_reference_plots_build(tiny, clean, saved):
    loaded = tl.load_reference(saved)
    for r in range(len(clean.rows)):
        pairs = [
            (loaded.margin.plot(r), clean.margin.plot(r)),
            (loaded.lens.plot(r), clean.lens.plot(r)),
            (loaded.heads.plot(r), clean.heads.plot(r)),
            (loaded.positions.plot(r), clean.positions.plot(r)),
        ]
        pairs += [(loaded.dla.plot(u, r), clean.dla.plot(u, r)) for u in ("component", "layer", "head", "neuron")]
        for new, old in pairs:
            assert new.to_json() == old.to_json()
    assert loaded.heads.source(0, 0).plot().to_json() == clean.heads.source(0, 0).plot().to_json()
    # circuitsvis HTML has random ids: only check it builds. Patterns are recomputed, so the model is needed.
    assert loaded.heads.attention_view(model=tiny) is not None


def test_load_needs_no_model(saved, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("load_reference loaded a model")

    monkeypatch.setattr(tl.models, "load_model", no_model)
    monkeypatch.setattr(tl, "load_model", no_model)
    assert tl.load_reference(saved).summary().startswith("model: tiny-arith")


def test_load_with_the_same_model_passes(tiny, clean, saved):
    assert_same(clean, tl.load_reference(saved, model=tiny))


def test_metadata_records_model_tokenizer_and_versions(tiny, tiny_chat, saved):
    meta = reference.read_metadata(saved)
    assert meta["format"] == "tracelib-reference" and meta["format_version"] == reference.FORMAT_VERSION
    info = meta["metadata"]
    assert info["model_name"] == "tiny-arith"
    assert info["weights_fingerprint"] == reference.weights_fingerprint(tiny)  # deterministic
    assert info["weights_fingerprint"] != reference.weights_fingerprint(tiny_chat)
    assert info["tokenizer_hash"] == reference.tokenizer_hash(tiny.tokenizer)
    assert len(info["weights_fingerprint"]) == len(info["tokenizer_hash"]) == 64
    assert info["dtype"] == "float32" and info["compatibility_mode"] is True
    assert info["tracelib_version"] == tl.__version__ and info["transformer_lens_version"]
    files = meta["files"]["tensors.safetensors"]
    assert files["bytes"] == (saved / "tensors.safetensors").stat().st_size and len(files["sha256"]) == 64
    # Nothing is pickled: the folder holds exactly the JSON and the safetensors file.
    assert sorted(p.name for p in saved.iterdir()) == ["reference.json", "tensors.safetensors"]


def test_flipped_bytes_are_refused(saved):
    path = saved / "tensors.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(tl.ReferenceChecksumError, match="changed since it was saved"):
        tl.load_reference(saved)


def test_truncated_tensor_file_is_refused(saved):
    path = saved / "tensors.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(tl.ReferenceTruncatedError, match="truncated"):
        tl.load_reference(saved)


def test_missing_file_is_refused(saved, tmp_path):
    (saved / "tensors.safetensors").unlink()
    with pytest.raises(tl.ReferenceMissingFileError, match="missing tensors.safetensors"):
        tl.load_reference(saved)
    with pytest.raises(tl.ReferenceMissingFileError, match="no reference at"):
        tl.load_reference(tmp_path / "nowhere")


def edit_json(folder, edit, resign: bool = True) -> None:
    """Edit reference.json; `resign` recomputes its content checksum, as a deliberate forger would,
    so the test reaches the check behind it."""
    path = folder / "reference.json"
    meta = json.loads(path.read_text())
    edit(meta)
    if resign and "content_sha256" in meta:
        meta["content_sha256"] = reference.canonical_sha256({k: v for k, v in meta.items() if k != "content_sha256"})
    path.write_text(json.dumps(meta))


def test_shape_disagreeing_with_metadata_is_refused(saved):
    edit_json(saved, lambda meta: meta["tensors"]["trace.margin.logit"].update(shape=[3]))
    with pytest.raises(tl.ReferenceShapeError, match=r"trace.margin.logit is float32 \[2\].*says float32 \[3\]"):
        tl.load_reference(saved)


def test_future_format_version_is_refused(saved):
    newer = reference.FORMAT_VERSION + 1
    edit_json(saved, lambda meta: meta.update(format_version=newer))
    with pytest.raises(
        tl.ReferenceVersionError,
        match=f"format version {newer}; this tracelib reads up to version {reference.FORMAT_VERSION}",
    ):
        tl.load_reference(saved)


def test_other_folders_are_not_references(tiny, clean, tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    with pytest.raises(tl.ReferenceFormatError, match="not a tracelib reference"):
        tl.load_reference(folder)
    (folder / "reference.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(tl.ReferenceFormatError, match="no format marker"):
        tl.load_reference(folder)
    with pytest.raises(tl.ReferenceOverwriteError, match="not a tracelib reference.*refusing to overwrite"):
        clean.save(folder, tiny)
    assert (folder / "keep.txt").read_text() == "mine"
    file = tmp_path / "file.txt"
    file.write_text("mine")
    with pytest.raises(tl.ReferenceOverwriteError):
        clean.save(file, tiny)
    assert file.read_text() == "mine"


def test_reference_from_another_model_is_refused(tiny_chat, saved):
    with pytest.raises(
        tl.ReferenceModelMismatchError,
        match=r"saved from tiny-arith \(fingerprint \w{8}…\), this model is tiny-arith-chat",
    ):
        tl.load_reference(saved, model=tiny_chat)


def test_saving_with_another_model_is_refused(tiny_chat, clean, tmp_path):
    with pytest.raises(
        tl.ReferenceModelMismatchError,
        match=r"comes from tiny-arith \(weights \w{8}\), but the model passed to save\(\) comes from tiny-arith-chat",
    ):
        clean.save(tmp_path / "ref", tiny_chat)
    assert not (tmp_path / "ref").exists()


def test_another_tokenizer_is_refused(tiny, saved, monkeypatch):
    monkeypatch.setattr(tiny.tokenizer, "chat_template", "{{ messages[0]['content'] }}")
    with pytest.raises(tl.ReferenceTokenizerMismatchError, match="tokenizer differs"):
        tl.load_reference(saved, model=tiny)


def test_saving_again_replaces_the_reference(tiny, saved):
    other = tl.trace(tiny, "what is 3 + 4", " 7")
    other.save(saved, tiny)
    assert_same(other, tl.load_reference(saved))
    assert [p.name for p in saved.parent.iterdir()] == ["ref"]  # no temporary or old folder left


def interrupt(monkeypatch, when) -> None:
    """Make os.replace fail (as a crash would) for the renames that `when(src)` picks."""
    real = os.replace

    def replace(src, dst):
        if when(str(src)):
            raise OSError("interrupted")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize(
    "when",
    [lambda src: True, lambda src: ".tmp-" in src],
    ids=["before-moving-the-old-aside", "before-moving-the-new-in"],
)
def test_interrupted_save_keeps_the_previous_reference(tiny, clean, saved, monkeypatch, when):
    interrupt(monkeypatch, when)
    with pytest.raises(tl.ReferenceWriteError, match=f"Cannot save the reference to {saved}: interrupted"):
        tl.trace(tiny, "what is 3 + 4", " 7").save(saved, tiny)
    monkeypatch.undo()
    assert_same(clean, tl.load_reference(saved))
    assert [p.name for p in saved.parent.iterdir()] == ["ref"]  # no half-written reference beside it


def test_interrupted_first_save_leaves_nothing(tiny, clean, tmp_path, monkeypatch):
    interrupt(monkeypatch, lambda src: True)
    with pytest.raises(tl.ReferenceWriteError, match="interrupted"):
        clean.save(tmp_path / "ref", tiny)
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(tl.ReferenceMissingFileError):
        tl.load_reference(tmp_path / "ref")


def test_half_written_folder_is_not_loadable(tiny, clean, tmp_path, monkeypatch):
    # A crash after the tensors but before reference.json: the marker file is written last.
    real = reference.folders.write_file

    def crash(path, data):
        if path.name == "reference.json":
            raise KeyboardInterrupt
        real(path, data)

    monkeypatch.setattr(reference.folders, "write_file", crash)
    monkeypatch.setattr(reference.folders, "remove_own", lambda *a, **k: False)  # as if the process died
    with pytest.raises(KeyboardInterrupt):
        clean.save(tmp_path / "ref", tiny)
    monkeypatch.undo()
    (half,) = tmp_path.iterdir()
    assert (half / "tensors.safetensors").exists()
    with pytest.raises(tl.ReferenceFormatError, match="not a tracelib reference"):
        tl.load_reference(half)


def test_round_trip_on_every_model_family(traced, tmp_path):
    model, trace, _ = traced
    loaded = tl.load_reference(trace.save(tmp_path / "ref", model), model=model)
    assert_same(trace, loaded)
    assert loaded.summary() == trace.summary()


@pytest.mark.parametrize("n", [1, 2, 300, 2**24 + 4, 233_373_696])
def test_fingerprint_samples_stay_inside_large_weights(n):
    """A float32 linspace would index past the end once n passes 2**24 (Qwen2.5's embedding)."""
    from tracelib.identity import sample_indices

    idx = sample_indices(n)
    assert int(idx.min()) == 0 and int(idx.max()) == n - 1


def test_pinned_weights_fingerprint_once_and_edits_show_after():
    """Inside `weights_pinned` a model's fingerprint is read once (a trace asks several times); an
    edit made after the block changes the fingerprint, and so does one made before it."""
    from tracelib.identity import weights_fingerprint, weights_pinned

    model = tl.load_model("tiny-arith")
    before = weights_fingerprint(model)
    with weights_pinned(model):
        assert weights_fingerprint(model) == before
        with weights_pinned(model):  # nested: the same pin
            assert weights_fingerprint(model) == before
        trace = tl.trace(model, "1 + 1 =", " 2")
        assert trace.weights_fingerprint == before
    with torch.no_grad():
        model.W_U[0, 0] += 1.0
    edited = weights_fingerprint(model)
    assert edited != before
    assert tl.trace(model, "1 + 1 =", " 2").weights_fingerprint == edited


def test_fingerprint_cache_sees_edits_and_replaced_parameters(monkeypatch):
    """The cached fingerprint is recomputed after an in-place edit or a replaced parameter, and only then."""
    from tracelib import identity

    model = tl.load_model("tiny-arith")
    calls = []
    real = identity._compute_fingerprint
    monkeypatch.setattr(identity, "_compute_fingerprint", lambda m: calls.append(1) or real(m))
    first = identity.weights_fingerprint(model)
    assert identity.weights_fingerprint(model) == first and len(calls) == 1  # unchanged: from the cache
    name, param = next((n, p) for n, p in model.named_parameters() if p.ndim == 1)
    owner = model.get_submodule(name.rsplit(".", 1)[0])
    setattr(owner, name.rsplit(".", 1)[1], torch.nn.Parameter(param.detach().clone()))  # same values, new tensor
    assert identity.weights_fingerprint(model) == first and len(calls) == 2  # replaced: recomputed
    with torch.no_grad():
        getattr(owner, name.rsplit(".", 1)[1])[0] += 1.0  # the sampled first element, in place
    assert identity.weights_fingerprint(model) != first and len(calls) == 3
