"""Load a model as a TransformerLens `TransformerBridge`: the bundled ones, a local folder, or the Hub.

Every source goes through the same path, `TransformerBridge.boot_transformers(folder or name)`
followed by `enable_compatibility_mode()` and `eval()`, so what the tutorials show on the bundled
`tiny-arith` is what a reader gets on gpt2 or Qwen2.5 online.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import re
import socket
import warnings
from pathlib import Path
from urllib.parse import urlparse

import torch

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


def default_dtype(device: torch.device | str, n_params: int | None = None) -> torch.dtype:
    """fp32 on the CPU; on a GPU fp32 while the weights take at most a third of its memory.

    Past that, bf16 where the GPU supports it (Ampere and later), else fp16 (Colab's T4). fp32 is
    preferred because attributions are only as exact as the dtype: fp16 sums drift by ~1e-3.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return torch.float32
    if n_params is not None:
        total = torch.cuda.get_device_properties(device).total_memory
        if n_params * 4 <= total / 3:
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


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub's host answers; a quick probe instead of huggingface_hub's 20 s of retries."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


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
    if _hub_reachable():
        return name, "hub"
    cached = _cached_snapshot(name)
    if cached is not None:
        return str(cached), "hub cache (offline)"
    hint = f" Did you mean the bundled {close[0]!r}?" if close else ""
    raise ModelUnavailableError(
        f"Cannot load {name!r}: the Hugging Face Hub cannot be reached (no network, or "
        f"HF_HUB_OFFLINE is set) and the model is not in the local Hugging Face cache.{hint} " + _help_text()
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


def load_model(
    name: str = "tiny-arith",
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
):
    """Load a model as a `TransformerBridge` in compatibility mode and eval mode.

    Args:
        name: a bundled model (`"tiny-arith"`, `"tiny-arith-chat"`), a folder holding a saved model
            and tokenizer, or a Hugging Face Hub name (`"gpt2"`, `"Qwen/Qwen2.5-1.5B"`, ...).
            Offline, a Hub name loads from the Hugging Face cache if it is there.
        device: defaults to CUDA when there is a GPU, else the CPU.
        dtype: defaults to fp32 on the CPU; see `default_dtype` for GPUs.

    Returns:
        A `TransformerBridge` with `enable_compatibility_mode()` applied (LayerNorm folded, writing
        weights and unembedding centred), in `eval()` mode, as TransformerLens's analysis tools need.

    Raises:
        UnknownModelError: the name is neither bundled, a folder, nor a valid Hub name.
        ModelUnavailableError: a Hub model with no network and no cached copy.
    """
    from transformer_lens.model_bridge import TransformerBridge

    if not isinstance(name, (str, Path)) or not str(name).strip():
        raise UnknownModelError(f"load_model needs a model name or folder, got {name!r}. {_help_text()}")
    name = str(name).strip()
    source, origin = _resolve_source(name)
    device = torch.device(device) if device is not None else default_device()
    n_params = estimate_parameters(source)
    if dtype is None:
        dtype = default_dtype(device, n_params)
    _announce(name, n_params, dtype, device)

    # TransformerLens and transformers report routine conversion steps as warnings; they say
    # nothing the reader can act on, and nbval would compare them as output. A Hub download keeps
    # its progress bars.
    err = io.StringIO()
    quiet = contextlib.redirect_stderr(err) if origin != "hub" else contextlib.nullcontext()
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    if origin != "hub":
        hf_logging.disable_progress_bar()  # Jupyter's stderr is not sys.stderr; silence at the source
    with warnings.catch_warnings(), quiet:
        warnings.simplefilter("ignore")
        try:
            model = TransformerBridge.boot_transformers(source, device=device, dtype=dtype)
            model.enable_compatibility_mode(disable_warnings=True)
        except Exception as exc:
            raise RuntimeError(
                f"TransformerLens could not load {name!r} from {source} ({origin}): {exc}\n"
                f"What it printed:\n{err.getvalue()[-2000:]}"
            ) from exc
        finally:
            if bars_were_on:
                hf_logging.enable_progress_bar()
    model.eval()
    model.tracelib_name = name
    return model


def model_name(model) -> str:
    """The name a model was loaded under (`tl.load_model`), else TransformerLens's own name."""
    return getattr(model, "tracelib_name", None) or str(getattr(model.cfg, "model_name", "model"))
