"""load_model: every source goes through boot_transformers and ends in compat + eval mode."""

from __future__ import annotations

import pytest
import torch

import tracelib as tl
from tracelib import models


@pytest.mark.parametrize("name", tl.BUNDLED_MODELS)
def test_bundled_models_load_in_eval_and_compat_mode(name):
    model = tl.load_model(name)
    assert model.compatibility_mode
    assert not any(m.training for m in model.modules())
    assert type(model.tokenizer).__name__ == "Qwen2Tokenizer"
    assert model.cfg.n_layers >= 4
    assert model.cfg.n_key_value_heads < model.cfg.n_heads  # GQA, as in Qwen2.5
    assert model.cfg.device == torch.device("cpu") or str(model.cfg.device) == "cpu"
    assert next(model.parameters()).dtype == torch.float32


def test_bundled_model_matches_hf_forward(tiny):
    """The bridge in compat mode computes the same distribution as the saved HF model."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(models.WEIGHTS_DIR / "tiny-arith").eval()
    tokens = tiny.to_tokens("what is 1 + 1 ")
    with torch.no_grad():
        ours = tiny(tokens).log_softmax(-1)
        theirs = hf(tokens).logits.log_softmax(-1)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_local_folder_loads(gpt2_dir, gpt2):
    assert gpt2.cfg.d_vocab == 50257
    assert not any(m.training for m in gpt2.modules())
    assert gpt2.compatibility_mode


def test_bundled_weights_are_small():
    for name in tl.BUNDLED_MODELS:
        weights = models.WEIGHTS_DIR / name / "model.safetensors"
        assert weights.stat().st_size <= 5 * 2**20, f"{name} is {weights.stat().st_size} bytes"


@pytest.mark.parametrize("name", ["", "   ", None, 3])
def test_empty_or_non_string_name(name):
    with pytest.raises(tl.UnknownModelError, match="tiny-arith"):
        tl.load_model(name)


@pytest.mark.parametrize("name", ["not a model", "a/b/c", "../x"])
def test_impossible_names_list_the_bundled_models(name):
    with pytest.raises((tl.UnknownModelError, FileNotFoundError), match="tiny-arith"):
        tl.load_model(name)


def test_missing_local_folder():
    with pytest.raises(FileNotFoundError, match="No model folder"):
        tl.load_model("./no/such/model")


def test_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        tl.load_model(tmp_path)


def test_hub_name_without_network_says_what_to_do(monkeypatch):
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(tl.ModelUnavailableError) as info:
        tl.load_model("gpt2")
    message = str(info.value)
    assert "cannot be reached" in message
    assert "tiny-arith" in message  # the bundled alternative
    assert "huggingface-cli download" in message and "tl.load_model('/path/to/DIR')" in message


def test_typo_of_a_bundled_name_is_suggested(monkeypatch):
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(tl.ModelUnavailableError, match="Did you mean the bundled 'tiny-arith'"):
        tl.load_model("tiny-arth")


def test_offline_hub_name_loads_from_the_cache(monkeypatch, gpt2_dir):
    """Offline, a Hub name whose complete copy is in the HF cache boots from that copy."""
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(models, "_cached_snapshot", lambda name: gpt2_dir if name == "gpt2" else None)
    model = tl.load_model("gpt2")
    assert model.cfg.d_vocab == 50257


def test_large_loads_print_an_estimate(capsys, monkeypatch):
    monkeypatch.setattr(models, "_ANNOUNCE_BYTES", 1)
    models._announce("some-model", 1_500_000_000, torch.float32, torch.device("cpu"))
    out = capsys.readouterr().out
    assert "1.50B parameters" in out and "5.6 GiB" in out


def test_estimate_parameters_counts_without_loading(gpt2_dir):
    from transformers import AutoModelForCausalLM

    n = models.estimate_parameters(str(gpt2_dir))
    assert n == AutoModelForCausalLM.from_pretrained(gpt2_dir).num_parameters()


def test_default_dtype_on_cpu_is_fp32():
    assert models.default_dtype("cpu", 10**12) == torch.float32
