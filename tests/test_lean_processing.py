"""The lean loader is TransformerLens's weight processing, bit for bit, at a fraction of the memory."""

from __future__ import annotations

import warnings

import pytest
import torch

import tracelib as tl
from tracelib import lean_processing

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _source(request, family: str):
    return {
        "tiny": "tiny-arith",
        "gpt2": request.getfixturevalue("gpt2_dir"),
        "qwen": request.getfixturevalue("qwen_dir"),
    }[family]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("family", ["tiny", "gpt2", "qwen"])
def test_lean_load_is_bit_identical_to_transformerlens(request, family, dtype):
    """Same state dict (every tensor, dtype and value) and the same logits, both ways."""
    source = _source(request, family)
    lean = tl.load_model(source, dtype=dtype)
    full = tl.load_model(source, dtype=dtype, lean=False)
    a, b = lean.state_dict(), full.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype == (dtype if a[key].is_floating_point() else a[key].dtype), key
        assert torch.equal(a[key], b[key]), f"{key} differs"
    tokens = lean.to_tokens("what is 1 + 1")
    with torch.no_grad():
        assert torch.equal(lean(tokens), full(tokens))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_unembedding_in_column_slices_is_bit_identical(monkeypatch, dtype):
    """The bundled model's unembedding (d_model 128) processed 64 columns at a time is TL's, bit for bit."""
    # 64 unembedding columns (2 slices) and 151 embedding rows (3 slices) at a time.
    monkeypatch.setattr(lean_processing, "SLICE_BYTES", 4 * 303 * 64)
    calls = []
    piece = lean_processing._process_piece
    monkeypatch.setattr(lean_processing, "_process_piece", lambda *a: calls.append(1) or piece(*a))
    lean = tl.load_model("tiny-arith", dtype=dtype)
    full = tl.load_model("tiny-arith", dtype=dtype, lean=False)
    assert len(calls) == lean.cfg.n_layers + 3 + 2  # the blocks, the embedding's and unembedding's slices
    for key, value in full.state_dict().items():
        assert torch.equal(lean.state_dict()[key], value), key
    tokens = lean.to_tokens("what is 1 + 1")
    with torch.no_grad():
        assert torch.equal(lean(tokens), full(tokens))


@pytest.mark.parametrize("family", ["gpt2", "qwen"])
def test_embedding_in_row_slices_is_bit_identical(request, monkeypatch, family):
    """The embedding processed 1000 tokens at a time (GPT-2's is centred per row) is TL's, bit for bit."""
    source = _source(request, family)
    lean_model = tl.load_model(source, dtype=torch.float16)
    monkeypatch.setattr(lean_processing, "SLICE_BYTES", 4 * 1000 * lean_model.cfg.d_model)
    calls = []
    piece = lean_processing._process_piece
    monkeypatch.setattr(lean_processing, "_process_piece", lambda *a: calls.append(set(a[1])) or piece(*a))
    lean = tl.load_model(source, dtype=torch.float16)
    full = tl.load_model(source, dtype=torch.float16, lean=False)
    assert sum("embed.weight" in p for p in calls) == -(-lean.cfg.d_vocab // 1000)
    for key, value in full.state_dict().items():
        assert torch.equal(lean.state_dict()[key], value), key
    tokens = lean.to_tokens("what is 1 + 1")
    with torch.no_grad():
        assert torch.equal(lean(tokens), full(tokens))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_bf16_checkpoint_booted_then_cast_is_bit_identical(tmp_path, dtype):
    """A bf16 checkpoint (as Qwen2.5 is stored) booted in bf16 and cast per tensor equals boot in `dtype`."""
    import shutil

    from transformers import AutoModelForCausalLM

    folder = tmp_path / "bf16"
    shutil.copytree(tl.models.WEIGHTS_DIR / "tiny-arith", folder)
    AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).save_pretrained(folder)
    assert lean_processing.checkpoint_dtype(folder) == torch.bfloat16
    lean = tl.load_model(folder, dtype=dtype)
    full = tl.load_model(folder, dtype=dtype, lean=False)
    assert lean.cfg.dtype == full.cfg.dtype == dtype
    for key, value in full.state_dict().items():
        assert lean.state_dict()[key].dtype == value.dtype and torch.equal(lean.state_dict()[key], value), key
    tokens = lean.to_tokens("what is 1 + 1")
    with torch.no_grad():
        assert torch.equal(lean(tokens), full(tokens))


def test_lean_weights_own_their_memory(gpt2_dir):
    """No processed weight shares memory with another (the tied unembedding is untied, as in TL)."""
    model = tl.load_model(gpt2_dir)
    pointers = [p.data_ptr() for p in model.original_model.parameters()]
    assert len(pointers) == len(set(pointers))
    assert all(type(p.data) is torch.Tensor for p in model.original_model.parameters())


def test_changed_transformerlens_falls_back_with_a_warning(monkeypatch):
    """If TransformerLens's weight-processing code changes, load through its own path and say so."""
    monkeypatch.setattr(lean_processing, "CHECKED_FINGERPRINT", "0" * 64)
    with pytest.warns(lean_processing.LeanLoadWarning, match="three times"):
        model = tl.load_model("tiny-arith")
    reference = tl.load_model("tiny-arith", lean=False)
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in model.state_dict().items())


def test_unchecked_version_is_reported(monkeypatch):
    import importlib.metadata

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda n: "9.9.9" if n == "transformer-lens" else real(n))
    assert "9.9.9" in lean_processing.unsupported_reason()


def test_installed_transformerlens_is_the_checked_one():
    """The pinned fingerprint matches what is installed, so users get the lean path."""
    assert lean_processing.unsupported_reason() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error", lean_processing.LeanLoadWarning)
        assert lean_processing.warn_if_unsupported()
