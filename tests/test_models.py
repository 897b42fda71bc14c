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
    monkeypatch.setattr(models, "_hub_model_info", lambda name, timeout=5.0: None)
    with pytest.raises(tl.ModelUnavailableError) as info:
        tl.load_model("gpt2")
    message = str(info.value)
    assert "cannot be reached" in message
    assert "tiny-arith" in message  # the bundled alternative
    assert "huggingface-cli download" in message and "tl.load_model('/path/to/DIR')" in message


def test_typo_of_a_bundled_name_is_suggested(monkeypatch):
    monkeypatch.setattr(models, "_hub_model_info", lambda name, timeout=5.0: None)
    with pytest.raises(tl.ModelUnavailableError, match="Did you mean the bundled 'tiny-arith'"):
        tl.load_model("tiny-arth")


def test_offline_hub_name_loads_from_the_cache(monkeypatch, gpt2_dir):
    """Offline, a Hub name whose complete copy is in the HF cache boots from that copy."""
    monkeypatch.setattr(models, "_hub_model_info", lambda name, timeout=5.0: None)
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


@pytest.mark.parametrize(
    "text, dtype",
    [
        ("float16", torch.float16),
        ("fp16", torch.float16),
        ("half", torch.float16),
        ("bf16", torch.bfloat16),
        ("torch.bfloat16", torch.bfloat16),
        ("float32", torch.float32),
        ("FP32", torch.float32),
        ("float64", torch.float64),
    ],
)
def test_string_dtypes_are_accepted(text, dtype):
    assert models.parse_dtype(text) is dtype


def test_string_dtype_loads():
    model = tl.load_model("tiny-arith", dtype="bf16")
    assert next(model.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", ["float8", "int8", torch.int64, 3])
def test_bad_dtype_is_refused(dtype):
    with pytest.raises(ValueError, match="not a floating-point dtype"):
        tl.load_model("tiny-arith", dtype=dtype)


def test_cuda_without_a_gpu_says_use_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA device here; use device='cpu'"):
        tl.load_model("tiny-arith", device="cuda")


@pytest.mark.parametrize("device", ["gpu", "tpu", "cuda:x"])
def test_unknown_device_is_refused(device):
    with pytest.raises(ValueError, match="device"):
        tl.load_model("tiny-arith", device=device)


class _FakeProps:
    total_memory = 15_835_660_288  # a T4


@pytest.mark.parametrize(
    "n_params, bf16, expected",
    [
        (1_543_714_304, False, torch.float32),  # Qwen2.5-1.5B on a T4: 6.2 GB fp32 is 39% of 15.8 GB
        (124_439_808, False, torch.float32),  # gpt2
        (3_085_938_688, False, torch.float16),  # Qwen2.5-3B: 12.3 GB does not fit in 45%
        (3_085_938_688, True, torch.bfloat16),  # the same on a GPU with bf16
    ],
)
def test_gpu_default_dtype(monkeypatch, n_params, bf16, expected):
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: _FakeProps())
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16)
    assert models.default_dtype("cuda", n_params) is expected


def _copy_bundled(tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(models.WEIGHTS_DIR / "tiny-arith", folder)
    return folder


def test_folder_without_tokenizer_is_refused_naming_the_files(tmp_path):
    folder = _copy_bundled(tmp_path)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no tokenizer: none of tokenizer\.json or vocab\.json \+ merges\.txt"):
        tl.load_model(folder)


def test_corrupt_config_is_a_load_error(tmp_path):
    folder = _copy_bundled(tmp_path)
    (folder / "config.json").write_text("{ this is not json")
    with pytest.raises(tl.ModelLoadError, match="Could not load"):
        tl.load_model(folder)


def test_truncated_weights_are_a_load_error(tmp_path):
    folder = _copy_bundled(tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(tl.ModelLoadError, match="complete checkpoint"):
        tl.load_model(folder)


def test_a_hub_that_never_answers_fails_within_seconds(monkeypatch):
    """An endpoint that accepts connections and never replies: ModelUnavailableError, no hang."""
    import socket
    import threading
    import time

    from huggingface_hub import constants

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    accepted: list = []
    stop = threading.Event()

    def accept_and_stay_silent():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept_and_stay_silent, daemon=True)
    thread.start()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.setattr(models, "PROBE_TIMEOUT_S", 2.0)
    start = time.monotonic()
    try:
        with pytest.raises(tl.ModelUnavailableError, match="cannot be reached"):
            tl.load_model("gpt2")
    finally:
        stop.set()
        thread.join(timeout=5)
        for conn in accepted:
            conn.close()
        server.close()
    assert accepted, "the probe never connected to the silent server"
    assert time.monotonic() - start < 10


def test_a_name_the_hub_does_not_have(monkeypatch):
    monkeypatch.setattr(models, "_hub_model_info", lambda name, timeout=5.0: {})
    with pytest.raises(tl.UnknownModelError, match="has no model 'someone/nothing-here'"):
        tl.load_model("someone/nothing-here")


def test_a_failed_download_is_model_unavailable(monkeypatch):
    import huggingface_hub

    def broken(*args, **kwargs):
        raise TimeoutError("read timed out")

    monkeypatch.setattr(models, "_hub_model_info", lambda name, timeout=5.0: {"siblings": []})
    monkeypatch.setattr(huggingface_hub, "snapshot_download", broken)
    with pytest.raises(tl.ModelUnavailableError, match="Downloading 'gpt2' .* failed .*read timed out"):
        tl.load_model("gpt2")
