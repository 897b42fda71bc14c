"""Load a model as a TransformerLens `TransformerBridge`: the bundled ones, a local folder, a GGUF file, or the Hub.

Every source goes through the same path, `TransformerBridge.boot_transformers(folder or name)`
followed by `enable_compatibility_mode()` and `eval()`, so what the tutorials show on the bundled
`tiny-arith` is what a reader gets on gpt2 or Qwen2.5 online.
"""

from __future__ import annotations

import contextlib
import difflib
import gc
import hashlib
import importlib.metadata
import io
import json
import os
import re
import shutil
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import torch

from tracelib import lean_processing

# The bundled models ship inside the package; tracelib/tiny_arith.py trains them (`make model`).
WEIGHTS_DIR = Path(__file__).parent / "weights"
BUNDLED_MODELS: tuple[str, ...] = ("tiny-arith", "tiny-arith-chat")
# Hub models the tutorials are written for; any other Hub name is tried as well.
TUTORIAL_HUB_MODELS: tuple[str, ...] = ("gpt2", "Qwen/Qwen2.5-1.5B", "Qwen/Qwen2.5-1.5B-Instruct")
# Loads above this many bytes of weights print an estimate first.
_ANNOUNCE_BYTES = 200 * 2**20
_REPO_ID = re.compile(r"^(?:[\w.-]+/)?[\w.-]+$")


class UnknownModelError(ValueError):
    """The name is neither a bundled model, a local folder, nor a Hugging Face Hub model."""


class ModelUnavailableError(OSError):
    """A Hub model was asked for, but the Hub cannot be reached and no complete local copy exists."""


def _help_text() -> str:
    return (
        f"Bundled models (work offline): {', '.join(map(repr, BUNDLED_MODELS))}. "
        f"Hub models the tutorials use: {', '.join(map(repr, TUTORIAL_HUB_MODELS))}. "
        "To use a Hub model without a network, either download it once where there is one "
        "(`huggingface-cli download NAME`, which fills the Hugging Face cache that load_model "
        "reads when offline) or save it to a folder (`model.save_pretrained(DIR)` and "
        "`tokenizer.save_pretrained(DIR)`) and pass that folder: tl.load_model('/path/to/DIR')."
    )


def default_device() -> torch.device:
    """CUDA when there is a GPU, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# On a GPU, fp32 while the weights take at most this share of its memory (Qwen2.5-1.5B: 6.2 GB
# of fp32 weights on a 15 GB T4 is 41%, leaving room for the untied unembedding and activations).
FP32_GPU_SHARE = 0.45

_DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32, "f32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16, "f16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64, "f64": torch.float64,
}  # fmt: skip


def parse_dtype(dtype) -> torch.dtype | None:
    """A torch dtype from a dtype or its name (`"float16"`, `"bf16"`, `"torch.float32"`, ...)."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in _DTYPE_NAMES.values():
        return dtype
    if isinstance(dtype, str) and dtype.strip().lower().removeprefix("torch.") in _DTYPE_NAMES:
        return _DTYPE_NAMES[dtype.strip().lower().removeprefix("torch.")]
    raise ValueError(
        f"dtype {dtype!r} is not a floating-point dtype tracelib can load. Use torch.float32, torch.bfloat16, "
        "torch.float16 or torch.float64, or their names: 'float32', 'bf16', 'fp16', 'float64'."
    )


def parse_device(device) -> torch.device:
    """A device that exists here, or a clear error that says which one to use instead."""
    if device is None:
        return default_device()
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {device!r} is not a device torch knows ({exc}); use 'cpu' or 'cuda'.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' was asked for, but there is no CUDA device here; use device='cpu'.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {str(device)!r} does not exist: there are {torch.cuda.device_count()} CUDA device(s)."
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device='mps' was asked for, but Apple's MPS is not available here; use device='cpu'.")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {str(device)!r} is not supported; use 'cpu' or 'cuda'.")
    return device


def default_dtype(device: torch.device | str, n_params: int | None = None) -> torch.dtype:
    """fp32 on the CPU; on a GPU, fp32 while the weights take at most 45% of its memory.

    Past that, bf16 where the GPU supports it (Ampere and later), else fp16 (Colab's T4), which
    `trace()` checks for overflow. fp32 is preferred because attributions are only as exact as
    the dtype: fp16 and bf16 sums drift by ~1e-3 of the logit.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return torch.float32
    if n_params is not None:
        total = torch.cuda.get_device_properties(device).total_memory
        if n_params * 4 <= FP32_GPU_SHARE * total:
            return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _bundled_dir(name: str) -> Path:
    path = WEIGHTS_DIR / name
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"The bundled model {name!r} is missing its weights at {path}. "
            "Reinstall tracelib, or retrain the bundled models with `make model`."
        )
    return path


def _is_complete_checkpoint(path: Path) -> bool:
    has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
    return (path / "config.json").is_file() and has_weights


# Every network step has a time limit: the probe's connect and each read, and the download's.
PROBE_TIMEOUT_S = 5.0
DOWNLOAD_TIMEOUT_S = 10.0
# The files a load needs; everything else in a Hub repository (TF, Flax, ONNX weights) is skipped.
_HUB_PATTERNS = ["*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja", "*.safetensors"]
# Any one of these sets is a tokenizer transformers can load.
_TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("tokenizer.model",), ("vocab.txt",))


def _hub_model_info(name: str, timeout: float = PROBE_TIMEOUT_S) -> dict | None:
    """The Hub's record of a model (its files), `{}` if the Hub says it has none, None if unreachable.

    A real HTTP request with a limit on the connect and on every read: an endpoint that accepts
    the connection and then never answers is unreachable after `timeout` seconds, not a hang.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return None
    request = urllib.request.Request(f"{constants.ENDPOINT.rstrip('/')}/api/models/{name}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read(4 * 2**20))
    except urllib.error.HTTPError as exc:
        return {} if exc.code in (401, 404) else None
    except (OSError, ValueError):  # refused, timed out, DNS, TLS, a body that is not JSON
        return None


def _download(name: str, info: dict) -> Path:
    """Download what a load needs into the Hugging Face cache, every step under a time limit."""
    from huggingface_hub import constants, snapshot_download

    files = [s.get("rfilename", "") for s in info.get("siblings", [])]
    patterns = list(_HUB_PATTERNS)
    if files and not any(f.endswith(".safetensors") for f in files):
        patterns.append("*.bin")  # an old checkpoint without safetensors
    saved = constants.HF_HUB_DOWNLOAD_TIMEOUT
    constants.HF_HUB_DOWNLOAD_TIMEOUT = int(DOWNLOAD_TIMEOUT_S)  # each read of the download
    try:
        return Path(snapshot_download(name, allow_patterns=patterns, etag_timeout=DOWNLOAD_TIMEOUT_S))
    except Exception as exc:  # huggingface_hub raises many kinds; all mean "not loaded"
        raise ModelUnavailableError(
            f"Downloading {name!r} from the Hugging Face Hub failed ({type(exc).__name__}: {exc}). "
            "Check the network, then try again. " + _help_text()
        ) from exc
    finally:
        constants.HF_HUB_DOWNLOAD_TIMEOUT = saved


def _check_tokenizer(path: Path, name: str) -> None:
    """Refuse a folder that has weights but no tokenizer, naming the files that would do."""
    if any(all((path / f).is_file() for f in files) for files in _TOKENIZER_FILES):
        return
    if any(path.glob("*.tiktoken")):
        return
    wanted = " or ".join(" + ".join(files) for files in _TOKENIZER_FILES)
    raise FileNotFoundError(
        f"{name!r} ({path}) has a model but no tokenizer: none of {wanted} is there. Save the tokenizer "
        "beside the model with `tokenizer.save_pretrained(DIR)`."
    )


def _cached_snapshot(name: str) -> Path | None:
    """The Hugging Face cache's copy of a Hub model, if a complete one is there."""
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(name, local_files_only=True))
    except Exception:  # not cached: huggingface_hub raises several kinds here
        return None
    return path if _is_complete_checkpoint(path) else None


def _check_hub_name(name: str) -> None:
    """Fail fast on a name the Hub cannot hold, suggesting the bundled name it may have meant."""
    if _REPO_ID.match(name) and name.count("/") <= 1 and ".." not in name:
        return
    raise UnknownModelError(f"{name!r} is not a model name or an existing folder. {_help_text()}")


def _resolve_source(name: str) -> tuple[str, str]:
    """Map `name` to (what to boot from, a description of where it came from)."""
    if name in BUNDLED_MODELS:
        return str(_bundled_dir(name)), "bundled"
    path = Path(name).expanduser()
    if path.is_file():
        folder = gguf_folder(path)
        return str(folder), f"GGUF file, dequantized to float32 and cached in {folder}"
    if name.lower().endswith(".gguf"):
        raise FileNotFoundError(f"No GGUF file at {path}.")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} is a folder but has no config.json: it is not a saved model. Save one with "
                "`model.save_pretrained(DIR)` and `tokenizer.save_pretrained(DIR)`."
            )
        return str(path), "local folder"
    looks_like_path = name.startswith((".", "/", "~")) or name.endswith(("/", "\\"))
    if looks_like_path or path.exists():
        raise FileNotFoundError(f"No model folder at {path}. {_help_text()}")
    _check_hub_name(name)
    close = difflib.get_close_matches(name, BUNDLED_MODELS, n=1, cutoff=0.75)
    hint = f" Did you mean the bundled {close[0]!r}?" if close else ""
    info = _hub_model_info(name)
    if info == {}:
        raise UnknownModelError(f"The Hugging Face Hub has no model {name!r} (or it is private).{hint} {_help_text()}")
    if info is not None:
        return str(_download(name, info)), "hub"
    cached = _cached_snapshot(name)
    if cached is not None:
        return str(cached), "hub cache (offline)"
    raise ModelUnavailableError(
        f"Cannot load {name!r}: the Hugging Face Hub cannot be reached within {PROBE_TIMEOUT_S:.0f} s (no network, "
        f"or HF_HUB_OFFLINE is set) and the model is not in the local Hugging Face cache.{hint} " + _help_text()
    )


def estimate_parameters(source: str) -> int | None:
    """Count a checkpoint's parameters from its config alone, on the meta device (no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(source)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:  # an estimate is a courtesy: never fail a load over it
        return None
    return sum(p.numel() for p in model.parameters())


def _announce(name: str, n_params: int | None, dtype: torch.dtype, device: torch.device) -> None:
    if n_params is None:
        return
    size = n_params * torch.empty((), dtype=dtype).element_size()
    if size < _ANNOUNCE_BYTES:
        return
    print(
        f"Loading {name}: {n_params / 1e9:.2f}B parameters, about {size / 2**30:.1f} GiB of "
        f"{str(dtype).removeprefix('torch.')} weights on {device}."
    )


class ModelLoadError(RuntimeError):
    """TransformerLens or transformers could not load a checkpoint that was found."""


# GGUF checkpoints (llama.cpp's format, usually quantized) load through transformers' own GGUF
# support, dequantized to fp32, and are saved once per machine as an ordinary checkpoint folder;
# every load boots that folder through the same path as any other. Reading a GGUF is slow
# (SmolLM2-135M: about 30 s on 2 CPU cores, most of it parsing the file's metadata three times, for
# the tokenizer, the config and the weights, not dequantizing), and the folder boots in seconds.
GGUF_MAGIC = b"GGUF"
GGUF_MIN_VERSION = (0, 10)  # transformers' own floor for its GGUF support
# Written last into a converted folder: a folder without it is not a finished conversion.
GGUF_MARKER = "tracelib-gguf.json"
# The saved folder must give the GGUF model's logits on this text, to this tolerance (relative to
# the largest logit): both run the same weights through the same code, so they agree to rounding.
_GGUF_PROBE = "The quick brown fox jumps over the lazy dog. 1 + 1 = 2"
_GGUF_PROBE_RTOL = 1e-5


def cache_dir() -> Path:
    """Where tracelib keeps what it builds once per machine: `$TRACELIB_CACHE`, else `~/.cache/tracelib`."""
    root = os.environ.get("TRACELIB_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "tracelib"


def is_gguf(path) -> bool:
    """Whether a file starts with GGUF's magic bytes."""
    with open(path, "rb") as f:
        return f.read(len(GGUF_MAGIC)) == GGUF_MAGIC


def file_sha256(path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def _error_text(exc: Exception) -> str:
    """An exception as one line for a load error: its type and the first 500 characters of its message."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}"


def _require_gguf() -> str:
    """The installed `gguf` package's version, or an ImportError that says how to install it."""

    hint = "pip install 'gguf>=0.10' (or tracelib's extra: pip install 'tracelib-interp[gguf]')"
    try:
        found = importlib.metadata.version("gguf")
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(f"Loading a GGUF file needs the `gguf` package, which is not installed: {hint}.") from None
    numbers = tuple(int(part) for part in re.findall(r"\d+", found)[:2])
    if numbers < GGUF_MIN_VERSION:
        raise ImportError(f"Loading a GGUF file needs gguf >= 0.10; {found} is installed: {hint}.")
    return found


def _is_converted(folder: Path, sha256: str) -> bool:
    """Whether `folder` is a finished conversion of the file with this hash (its marker says so)."""
    try:
        marker = json.loads((folder / GGUF_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("sha256") == sha256 and _is_complete_checkpoint(folder)


@contextlib.contextmanager
def _locked(path: Path):
    """Hold an exclusive advisory lock on `path` (POSIX); elsewhere only the atomic rename protects."""
    try:
        import fcntl
    except ImportError:  # Windows: two processes may both convert; the first rename wins
        yield False
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' progress bars, warnings and stderr chatter for the duration."""
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()


def dequantize_gguf(path, folder) -> dict:
    """Load a GGUF file with transformers, dequantized to fp32, and save it into `folder` with its tokenizer.

    transformers refuses to save a model it loaded from GGUF ("quantized with gguf and is not
    serializable"), although its weights are plain fp32 tensors by then. They are moved (not copied)
    into a model built from the same config without its quantization entry, which saves normally.
    The saved folder is then loaded back and must give the GGUF model's logits on a probe text.

    Args:
        path: the `.gguf` file.
        folder: an existing, empty folder to save into.

    Returns:
        What the conversion did: its time, the probe's largest logit difference, library versions.

    Raises:
        ModelLoadError: transformers cannot read the file, or the saved folder does not reproduce it.
    """
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, folder = Path(path), Path(folder)
    start = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    except Exception as exc:
        raise ModelLoadError(
            f"transformers could not read the GGUF file {path} ({_error_text(exc)}). Its architecture "
            "may be one transformers cannot load from GGUF; convert it to a Hugging Face checkpoint instead."
        ) from exc
    loaded_s = time.perf_counter() - start
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(type(model.config).from_dict(config), dtype=torch.float32)
    result = plain.load_state_dict(model.state_dict(), strict=False, assign=True)
    plain.tie_weights()
    left = [name for name, p in plain.named_parameters() if p.is_meta or p.dtype != torch.float32]
    if result.unexpected_keys or left:
        raise ModelLoadError(
            f"The GGUF file {path} did not dequantize into a plain float32 model: unexpected tensors "
            f"{result.unexpected_keys[:5]}, parameters left unloaded or not float32 {left[:5]}."
        )
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    probe = torch.tensor([tokenizer(_GGUF_PROBE).input_ids])
    with torch.no_grad():
        expected = model(probe).logits
    del model, plain
    gc.collect()
    saved = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        diff = (saved(probe).logits - expected).abs().max().item()
    del saved
    limit = _GGUF_PROBE_RTOL * max(1.0, expected.abs().max().item())
    if not diff <= limit:
        raise ModelLoadError(
            f"The checkpoint saved from the GGUF file {path} does not reproduce it: its logits differ by {diff:.3g} "
            f"(allowed {limit:.3g}). Nothing was cached."
        )
    return {
        "load_gguf_s": loaded_s,
        "total_s": time.perf_counter() - start,
        "probe_max_abs_diff": diff,
        "transformers": transformers.__version__,
        "gguf": _require_gguf(),
        "dtype": "float32",
    }


def gguf_folder(path) -> Path:
    """The dequantized checkpoint folder of a GGUF file, converted on the first call on this machine.

    The folder is `cache_dir() / "gguf" / <the file's SHA-256, first 16 hex digits>`. It is written
    into a temporary folder beside it and renamed into place when complete, so an interrupted or
    concurrent conversion never leaves a half folder that a later load would take; concurrent
    conversions of one file wait for each other (on POSIX) and the later ones reuse the result.

    Args:
        path: the `.gguf` file.

    Returns:
        The folder, holding the model and tokenizer as `save_pretrained` writes them.

    Raises:
        ModelLoadError: the file is not GGUF, or transformers cannot convert it.
        ImportError: the `gguf` package is missing (only needed for the first conversion).
    """
    path = Path(path).expanduser().resolve()
    if not is_gguf(path):
        raise ModelLoadError(
            f"{path} is not a GGUF file (it does not start with {GGUF_MAGIC!r}). tl.load_model takes a GGUF file, "
            "a folder saved with `save_pretrained`, a bundled model name or a Hugging Face Hub name."
        )
    sha256 = file_sha256(path)
    folder = cache_dir() / "gguf" / sha256[:16]
    if _is_converted(folder, sha256):
        return folder
    _require_gguf()
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _locked(folder.parent / f".{folder.name}.lock") as exclusive:
        if _is_converted(folder, sha256):  # another process converted it while this one waited
            return folder
        if exclusive:  # nobody else is writing this folder: temporaries left behind are from crashed runs
            for stale in folder.parent.glob(f".{folder.name}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
        print(f"Dequantizing {path.name} to float32, once: later loads read {folder}.", flush=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's folder is private; the cache's folders are ordinary ones
        try:
            with _quiet_transformers():
                info = dequantize_gguf(path, tmp)
            info.update(sha256=sha256, source=str(path), size=path.stat().st_size)
            (tmp / GGUF_MARKER).write_text(json.dumps(info, indent=2) + "\n")
            if _is_converted(folder, sha256):  # another process (without a lock) finished first
                return folder
            if folder.exists():  # unfinished (no valid marker): never taken, replaced
                shutil.rmtree(folder)
            try:
                os.rename(tmp, folder)
            except OSError:
                if not _is_converted(folder, sha256):  # not another process's finished copy: a real failure
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_model(
    name: str = "tiny-arith",
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    lean: bool = True,
    fold_value_biases: bool = False,
    device_map: str | dict | None = None,
):
    """Load a model as a `TransformerBridge` in compatibility mode and eval mode.

    Args:
        name: a bundled model (`"tiny-arith"`, `"tiny-arith-chat"`), a folder holding a saved model
            and tokenizer, a GGUF file (`"path/to/model.gguf"`: dequantized to fp32 once per machine
            and cached, see `gguf_folder`), or a Hugging Face Hub name (`"gpt2"`,
            `"Qwen/Qwen2.5-1.5B"`, ...). Offline, a Hub name loads from the Hugging Face cache if it is there.
        device: `"cpu"`, `"cuda"`, `"cuda:1"`...; defaults to CUDA when there is a GPU, else the CPU.
        dtype: a torch dtype or its name (`"float32"`, `"bf16"`, `"fp16"`); defaults to fp32 on the
            CPU, see `default_dtype` for GPUs.
        lean: process the weights one block at a time (`tracelib.lean_processing`), which peaks at
            about one copy of the weights instead of three. The weights are bit-identical either
            way; False uses TransformerLens's own path.
        fold_value_biases: fold each head's value bias into its layer's output bias, as
            TransformerLens's compatibility mode does by default. Off by default: every head keeps
            its own value bias (`b_V[h] @ W_O[h]`), so a head's attribution is the output the model
            really computes for it, and a layer's bias row is its true output bias. On models with
            large value biases (Qwen2.5) folding makes heads look as if they fought the answer
            while the layer's bias cancels them; both conventions add up to the same logit.
        device_map: for a model larger than one GPU: a `transformers` device map (`"auto"`, or a
            dict of module name to device), passed through the bridge (`boot_transformers`) to
            `from_pretrained`, with `max_memory` and offloading left to their defaults. It takes
            the place of `device`, and weights are processed by TransformerLens's own path
            (`lean=False`). Tested here only on the CPU (`{"": "cpu"}`); multi-GPU maps are untested.

    Returns:
        A `TransformerBridge` with `enable_compatibility_mode()` applied (LayerNorm folded, writing
        weights and unembedding centred), in `eval()` mode, as TransformerLens's analysis tools need.

    Raises:
        UnknownModelError: the name is neither bundled, a folder, nor a Hub model.
        ModelUnavailableError: a Hub model with no network (or a failed download) and no cached copy.
        FileNotFoundError: a folder that is not a saved model, or has no tokenizer.
        ModelLoadError: the checkpoint is there but could not be loaded (corrupt or truncated files),
            or a file that is not GGUF.
        ImportError: a GGUF file to convert, and the `gguf` package is not installed.
        ValueError: a device that is not available here, or a dtype that is not a float type.
    """
    from transformer_lens.model_bridge import TransformerBridge

    if not isinstance(name, (str, Path)) or not str(name).strip():
        raise UnknownModelError(f"load_model needs a model name or folder, got {name!r}. {_help_text()}")
    name = str(name).strip()
    device, dtype = parse_device(device), parse_dtype(dtype)
    source, origin = _resolve_source(name)
    _check_tokenizer(Path(source), name)
    n_params = estimate_parameters(source)
    if dtype is None:
        dtype = default_dtype(device, n_params)
    _announce(name, n_params, dtype, device)
    lean = lean and device_map is None and lean_processing.warn_if_unsupported(stacklevel=2)
    # On a GPU the weights load straight onto it (a device map), never as a full copy in host
    # memory first; processing then runs on the GPU, one block at a time.
    where = {"device_map": {"": str(device)}} if device.type == "cuda" else {"device": device}
    if device_map is not None:
        if not isinstance(device_map, (str, dict)):
            raise TypeError(f"device_map: pass 'auto' or a dict of module name to device, got {device_map!r}")
        where = {"device_map": device_map}

    # TransformerLens and transformers report routine conversion steps as warnings; they say
    # nothing the reader can act on, and nbval would compare them as output. (A Hub download has
    # already shown its progress bars.)
    err = io.StringIO()
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # Jupyter's stderr is not sys.stderr; silence at the source
    with warnings.catch_warnings(), contextlib.redirect_stderr(err):
        warnings.simplefilter("ignore")
        try:
            if lean:
                model = lean_processing.boot_and_cast(source, dtype, device)
            else:
                model = TransformerBridge.boot_transformers(source, dtype=dtype, **where)
            with lean_processing.lean_processing(model) if lean else contextlib.nullcontext():
                model.enable_compatibility_mode(disable_warnings=True, fold_value_biases=fold_value_biases)
        except Exception as exc:
            raise ModelLoadError(
                f"Could not load {name!r} from {source} ({origin}): {_error_text(exc)}. Check that "
                "the folder holds a complete checkpoint saved with `save_pretrained` (config.json and the weights)."
            ) from exc
        finally:
            if bars_were_on:
                hf_logging.enable_progress_bar()
    model.eval()
    model.tracelib_name = name
    model.tracelib_value_biases = "folded" if fold_value_biases else "heads"
    model.tracelib_adds_bos = tokenizer_adds_bos(source)
    return model


def tokenizer_adds_bos(source: str) -> bool | None:
    """Whether the checkpoint's own tokenizer starts `tokenizer(text)` with its BOS token.

    TransformerLens loads tokenizers with `add_bos_token=True`, so the bridge's `model.tokenizer`
    always adds one; the tokenizer as saved is what `transformers` users get. None if it cannot be
    loaded on its own.
    """
    from transformers import AutoTokenizer

    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception:  # a courtesy check: the bridge's tokenizer is the fallback
        return None
    bos = tokenizer.bos_token_id
    ids = tokenizer("1 + 1")["input_ids"]
    return bos is not None and bool(ids) and ids[0] == bos


def value_bias_convention(model) -> str:
    """Where a model's value biases are attributed: `"heads"` (each head's own) or `"folded"` (the layer's bias).

    A model not loaded by `tl.load_model` is taken to follow TransformerLens's default, folded.
    """
    return getattr(model, "tracelib_value_biases", "folded")


def model_name(model) -> str:
    """The name a model was loaded under (`tl.load_model`), else TransformerLens's own name."""
    return getattr(model, "tracelib_name", None) or str(getattr(model.cfg, "model_name", "model"))
