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


# ---------------------------------------------------------------------------------------------
# GGUF files: dequantized once into the cache, atomically, then booted like any saved folder.
# A small GGUF is written here from the bundled tiny-arith (its matrices quantized to Q8_0), so
# these tests need no download; tests/test_real_model.py loads a real one.

_GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def _gguf_tensor_name(key: str) -> str:
    if key == "model.embed_tokens.weight":
        return "token_embd.weight"
    if key == "model.norm.weight":
        return "output_norm.weight"
    _, _, layer, *module, kind = key.split(".")
    return f"blk.{layer}.{_GGUF_NAMES['.'.join(module)]}.{kind}"


def write_tiny_gguf(path):
    """The bundled tiny-arith as a Qwen2 GGUF file, as llama.cpp's converter lays it out; matrices in Q8_0."""
    import json

    import gguf
    from safetensors.torch import load_file

    src = models.WEIGHTS_DIR / "tiny-arith"
    cfg = json.loads((src / "config.json").read_text())
    tok = json.loads((src / "tokenizer.json").read_text())
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_name("tiny-arith")
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    tokens = [t for t, _ in sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])]
    special = {added["id"] for added in tok["added_tokens"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))]
    )
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    writer.add_eos_token_id(0)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(False)
    for key, tensor in load_file(src / "model.safetensors").items():
        if key == "lm_head.weight":  # tied to the embedding
            continue
        name, array = _gguf_tensor_name(key), tensor.float().numpy()
        if array.ndim == 2 and name != "token_embd.weight":
            q8 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, gguf.quants.quantize(array, q8), raw_dtype=q8)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-arith.Q8_0.gguf")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh, empty tracelib cache for one test."""
    monkeypatch.setenv("TRACELIB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _fake_gguf(tmp_path, tag: str = "a"):
    """A file with GGUF's magic bytes (and a body of its own, so its own hash), for a faked converter."""
    path = tmp_path / f"fake-{tag}.gguf"
    path.write_bytes(b"GGUF" + tag.encode() * 64)
    return path


def _fake_dequantize(calls: list, delay: float = 0.0):
    """A stand-in for models.dequantize_gguf that copies the bundled model, counting its calls."""
    import shutil
    import time

    def fake(path, folder):
        calls.append(path)
        time.sleep(delay)
        for item in (models.WEIGHTS_DIR / "tiny-arith").iterdir():
            shutil.copy(item, folder / item.name)
        return {}

    return fake


def _leftovers(cache):
    return sorted(p.name for p in (cache / "gguf").iterdir() if ".tmp-" in p.name)


def test_gguf_loads_as_the_gguf_model_computes(tiny_gguf, cache):
    """The saved checkpoint gives transformers' GGUF model's logits, and the bridge its distribution."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = tl.load_model(tiny_gguf)
    folder = models.gguf_folder(tiny_gguf)
    assert folder == cache / "gguf" / models.file_sha256(tiny_gguf)[:16]
    marker = json.loads((folder / models.GGUF_MARKER).read_text())
    assert marker["sha256"] == models.file_sha256(tiny_gguf) and marker["dtype"] == "float32"
    gguf_model = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name).eval()
    gguf_tok = AutoTokenizer.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    saved = AutoModelForCausalLM.from_pretrained(folder).eval()
    prompt = "what is 1 + 1 "
    tokens = torch.tensor([gguf_tok(prompt).input_ids])
    assert model.to_tokens(prompt, prepend_bos=False).tolist() == tokens.tolist()
    with torch.no_grad():
        expected = gguf_model(tokens).logits
        torch.testing.assert_close(saved(tokens).logits, expected, rtol=0, atol=1e-6)
        ours = model(tokens).log_softmax(-1)
    torch.testing.assert_close(ours, expected.log_softmax(-1), atol=1e-4, rtol=1e-4)
    # Dequantized Q8_0 weights: close to the bundled model's, and not equal to them.
    bundled = AutoModelForCausalLM.from_pretrained(models.WEIGHTS_DIR / "tiny-arith").eval()
    w, w0 = saved.model.layers[0].mlp.up_proj.weight, bundled.model.layers[0].mlp.up_proj.weight
    assert not torch.equal(w, w0) and (w - w0).abs().max() < 0.01 * w0.abs().max()


def test_second_gguf_load_reads_the_cache(tiny_gguf, cache, monkeypatch):
    first = models.gguf_folder(tiny_gguf)

    def must_not_run(*args):
        raise AssertionError("dequantized again")

    monkeypatch.setattr(models, "dequantize_gguf", must_not_run)
    assert models.gguf_folder(tiny_gguf) == first
    model = tl.load_model(tiny_gguf)
    assert model.cfg.n_layers == 4


def _gguf_version(monkeypatch, installed: str | None) -> None:
    """Pretend the `gguf` package is missing (None) or at another version; other packages unchanged."""
    import importlib.metadata

    real = importlib.metadata.version

    def version(name):
        if name != "gguf":
            return real(name)
        if installed is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return installed

    monkeypatch.setattr(importlib.metadata, "version", version)


def test_cached_gguf_loads_without_the_gguf_package(tiny_gguf, cache, monkeypatch):
    models.gguf_folder(tiny_gguf)
    _gguf_version(monkeypatch, None)
    assert tl.load_model(tiny_gguf).cfg.n_layers == 4


def test_missing_gguf_package_says_how_to_install_it(tmp_path, cache, monkeypatch):
    _gguf_version(monkeypatch, None)
    with pytest.raises(ImportError, match=r"pip install 'gguf>=0\.10'.*tracelib-interp\[gguf\]"):
        tl.load_model(_fake_gguf(tmp_path))
    _gguf_version(monkeypatch, "0.9.1")
    with pytest.raises(ImportError, match="needs gguf >= 0.10; 0.9.1 is installed"):
        tl.load_model(_fake_gguf(tmp_path))


def test_a_file_that_is_not_gguf_is_a_load_error_naming_it(tmp_path, cache):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(tl.ModelLoadError, match=f"{path} is not a GGUF file"):
        tl.load_model(path)
    with pytest.raises(FileNotFoundError, match="No GGUF file at"):
        tl.load_model(tmp_path / "missing.gguf")


def test_a_gguf_transformers_cannot_read_is_a_load_error(tmp_path, cache):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(tl.ModelLoadError, match=f"could not read the GGUF file {path}"):
        tl.load_model(path)
    assert not (cache / "gguf" / models.file_sha256(path)[:16]).exists() and _leftovers(cache) == []


def test_interrupted_conversion_leaves_no_folder_that_is_taken(tmp_path, cache, monkeypatch):
    path = _fake_gguf(tmp_path)
    folder = cache / "gguf" / models.file_sha256(path)[:16]

    def dies_half_way(path, out):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "dequantize_gguf", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        models.gguf_folder(path)
    assert not folder.exists() and _leftovers(cache) == []
    # A crash that left its temporary folder behind (a killed process), and a folder without the
    # marker at the final place: neither is taken; the next conversion runs and clears both.
    stale = cache / "gguf" / f".{folder.name}.tmp-crashed"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    calls: list = []
    monkeypatch.setattr(models, "dequantize_gguf", _fake_dequantize(calls))
    assert models.gguf_folder(path) == folder
    assert len(calls) == 1 and _leftovers(cache) == [] and (folder / models.GGUF_MARKER).is_file()
    assert models.gguf_folder(path) == folder and len(calls) == 1


@pytest.mark.parametrize("locking", [True, False])
def test_concurrent_conversions_agree_on_one_folder(tmp_path, cache, monkeypatch, locking):
    """Two conversions at once: with the lock the second waits and reuses; without one (Windows) both
    convert and the second rename finds the first's finished folder."""
    import contextlib
    import threading

    path = _fake_gguf(tmp_path, "concurrent")
    calls: list = []
    monkeypatch.setattr(models, "dequantize_gguf", _fake_dequantize(calls, delay=0.5))
    if not locking:
        monkeypatch.setattr(models, "_locked", lambda path: contextlib.nullcontext(False))
    results, errors = [], []

    def convert():
        try:
            results.append(models.gguf_folder(path))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=convert) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(results) == 2 and results[0] == results[1] and (results[0] / models.GGUF_MARKER).is_file()
    assert len(calls) == (1 if locking else 2)
    assert _leftovers(cache) == []


def test_a_device_map_goes_through_the_bridge(tiny):
    # For models larger than one GPU; here the one map a CPU machine can check: everything on the CPU.
    mapped = tl.load_model("tiny-arith", device_map={"": "cpu"})
    assert tl.model_identity(mapped) == tl.model_identity(tiny)  # the same weights, through TransformerLens's path
    a, b = tl.trace(tiny, "what is 1 + 1", " 2"), tl.trace(mapped, "what is 1 + 1", " 2")
    scale = 1e-5 * max(1.0, a.margin.logit_diff.abs().max().item())
    assert (a.margin.logit_diff - b.margin.logit_diff).abs().max().item() <= scale
    with pytest.raises(TypeError, match="device_map: pass 'auto' or a dict"):
        tl.load_model("tiny-arith", device_map=["cpu"])
