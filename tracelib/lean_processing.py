"""Compatibility-mode weight processing at about the memory of one copy of the weights.

`TransformerBridge.enable_compatibility_mode()` folds the norms into the weights and centres them
(TransformerLens 4.3, `ProcessWeights.process_weights`). It upcasts the *whole* state dict to fp32
first, and `fold_layer_norm`, `center_unembed` and `fold_value_biases` each start with a clone of
the whole dict, while the live model still holds the original weights. A bf16 Qwen2.5-1.5B then
peaks above 20 GB of host memory: more than Colab's free tier has.

This module runs TransformerLens's own pipeline unchanged, one piece of the model at a time:

- each block alone (its keys renamed to block 0, with `n_layers=1`), then the embedding (in
  slices of its rows), then the final norm with the unembedding (for RMSNorm models in slices of
  its columns), each upcast, processed and cast back before the next starts;
- inside a piece, the whole-dict clones are aliases (no step writes into its input; each builds
  new tensors and stores them in the dict);
- the live parameters let go of the original weights while processing runs (zero-stride
  placeholders), so each original is freed as soon as its processed tensor replaces it.

Every step of the pipeline acts within one block, or on the embedding, or on the final norm and
unembedding, so processing the pieces apart gives the same numbers, bit for bit; the test suite
checks that on GPT-2-style (LayerNorm with biases), Qwen2-style (RMSNorm, GQA) and the bundled
models, in fp32, fp16 and bf16.

This is the one module that reaches into TransformerLens internals. It is pinned to the sources
it was checked against: if any of the functions it relies on changes, it warns and leaves the
load to TransformerLens's own path, which needs about three times the weights in memory.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.metadata
import inspect
import json
import re
import warnings
from pathlib import Path

import torch

from tracelib.formats import TracelibWarning

# TransformerLens versions whose weight-processing sources were read and checked for this module,
# and the sha256 of those sources (see `_fingerprint`). Any difference means "not checked".
CHECKED_VERSIONS = ("4.3.0",)
CHECKED_FINGERPRINT = "9f655b20d299f8e51a48df064c82dad289de3169f709d291b3cb8af9d2a8690d"

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")
# The global (non-block) weights and the piece of the pipeline each belongs to.
_EMBED_KEYS = ("embed.", "pos_embed.")
_FINAL_KEYS = ("ln_final.", "unembed.")
# The unembedding of an RMSNorm model is processed in column slices of about this many fp32 bytes.
SLICE_BYTES = 64 * 2**20
_COLUMN_GROUP = 64


class LeanLoadWarning(TracelibWarning):
    """The lean processing path is not used: this load needs TransformerLens's full memory."""


def _relied_on():
    """The TransformerLens functions whose behaviour this module depends on."""
    from transformer_lens.model_bridge.generalized_components.unembedding import UnembeddingBridge
    from transformer_lens.model_bridge.sources.transformers import source
    from transformer_lens.model_bridge.transformer_bridge import TransformerBridge
    from transformer_lens.utilities import multi_gpu
    from transformer_lens.weight_processing import ProcessWeights

    return [
        source.boot,
        UnembeddingBridge,
        multi_gpu.maybe_cast_floating_params,
        multi_gpu.cast_floating_params_to_dtype,
        TransformerBridge.enable_compatibility_mode,
        TransformerBridge.process_weights,
        TransformerBridge.state_dict,
        ProcessWeights.process_weights,
        ProcessWeights.fold_layer_norm,
        ProcessWeights._fold_layer,
        ProcessWeights._fold_final_rms_bias,
        ProcessWeights._fold_unembed_layer_norm,
        ProcessWeights.center_writing_weights,
        ProcessWeights.center_unembed,
        ProcessWeights.fold_value_biases,
        ProcessWeights.distribute_weights_to_components,
    ]


def _fingerprint() -> str | None:
    """sha256 over the sources of every function relied on; None if a source cannot be read."""
    digest = hashlib.sha256()
    try:
        for fn in _relied_on():
            digest.update(inspect.getsource(fn).encode())
    except (OSError, TypeError, AttributeError):
        return None
    return digest.hexdigest()


def unsupported_reason() -> str | None:
    """Why the lean path cannot be used with the installed TransformerLens, or None if it can."""

    installed = importlib.metadata.version("transformer-lens")
    if installed not in CHECKED_VERSIONS:
        return f"TransformerLens {installed} is not one of the versions it was checked against {CHECKED_VERSIONS}"
    fingerprint = _fingerprint()
    if fingerprint is None:
        return "TransformerLens's weight-processing sources cannot be read to check them"
    if fingerprint != CHECKED_FINGERPRINT:
        return f"TransformerLens {installed}'s weight-processing code differs from the code it was checked against"
    return None


class _Alias(torch.Tensor):
    """A tensor whose clone() is the same memory: the pipeline's defensive whole-dict copies."""

    def clone(self, *args, **kwargs):
        # A view that stays an _Alias, so the next step's copy is an alias too.
        return self.view_as(self)


def _plain(value):
    return value.as_subclass(torch.Tensor) if isinstance(value, torch.Tensor) else value


def _split(state_dict: dict) -> tuple[dict[int, list[str]], list[str], list[str], list[str]]:
    """Keys by block index, embedding keys, final-norm/unembedding keys, and keys of no known piece."""
    blocks: dict[int, list[str]] = {}
    embed, final, unknown = [], [], []
    for key in state_dict:
        match = _BLOCK_KEY.match(key)
        if match:
            blocks.setdefault(int(match.group(1)), []).append(key)
        elif key.startswith(_EMBED_KEYS):
            embed.append(key)
        elif key.startswith(_FINAL_KEYS):
            final.append(key)
        else:
            unknown.append(key)
    return blocks, embed, final, unknown


def _stand_ins(cfg, present: dict, adapter) -> dict:
    """One-row embedding/unembedding stand-ins for the steps that insist the keys exist.

    `center_writing_weights` needs the embedding (and learned positions) and `center_unembed` the
    unembedding, even when processing one block; their results on a stand-in are thrown away.
    """
    from transformer_lens.weight_processing import ProcessWeights

    row = torch.zeros(1, cfg.d_model, dtype=torch.float32, device=next(iter(present.values())).device)
    keys = [ProcessWeights._get_param_key("embed.W_E", adapter), ProcessWeights._get_param_key("unembed.W_U", adapter)]
    if getattr(cfg, "positional_embedding_type", "standard") not in ("rotary", "alibi", "none"):
        keys.append(ProcessWeights._get_param_key("pos_embed.W_pos", adapter))
    return {k: row.clone() for k in keys if k not in present}


def _process_piece(pipeline, piece: dict, cfg, n_layers: int, kwargs: dict) -> dict:
    """Run TransformerLens's whole pipeline on one piece, with `n_layers` blocks in its config."""
    piece_cfg = copy.copy(cfg)
    piece_cfg.n_layers = n_layers
    stand_ins = _stand_ins(cfg, piece, kwargs.get("adapter"))
    aliased = {k: v.as_subclass(_Alias) if isinstance(v, torch.Tensor) else v for k, v in piece.items()}
    piece.clear()  # the aliases are now the only holders of the originals
    aliased.update(stand_ins)
    result = pipeline(aliased, piece_cfg, **kwargs)
    return {k: _plain(v) for k, v in result.items() if k not in stand_ins}


def _process_embed_piece(pipeline, piece: dict, cfg, kwargs: dict) -> dict:
    """The embedding, in slices of its rows (tokens) when its fp32 copy would be large.

    Every step acts on each token's row alone (centring subtracts a row's own mean), so row slices
    give the same numbers; learned positions go with the first slice.
    """
    weight = piece.get("embed.weight")
    rows = max(1, SLICE_BYTES // (4 * cfg.d_model))
    if weight is None or weight.ndim != 2 or weight.shape[1] != cfg.d_model or rows >= weight.shape[0]:
        return _process_piece(pipeline, piece, cfg, 0, kwargs)
    weight = piece.pop("embed.weight")
    rest = dict(piece)
    piece.clear()
    out: dict = {}
    for start in range(0, weight.shape[0], rows):
        part = {"embed.weight": weight[start : start + rows], **(rest if start == 0 else {})}
        done = _process_piece(pipeline, part, cfg, 0, kwargs)
        if not out:
            out = {k: v for k, v in done.items() if k != "embed.weight"}
            out["embed.weight"] = done["embed.weight"].new_empty(weight.shape)
        out["embed.weight"][start : start + rows] = done["embed.weight"]
    return out


def _process_final_piece(pipeline, piece: dict, cfg, kwargs: dict) -> dict:
    """The final norm and unembedding; for RMSNorm, in slices of the unembedding's columns.

    With RMSNorm every step here acts on each d_model column of the unembedding alone (the norm's
    weight scales a column, centring subtracts each column's mean over the vocabulary), so slices
    of columns give the same numbers while the fp32 working copies stay small: the whole fp32
    unembedding of Qwen2.5-1.5B is 0.9 GB, and centring holds two of them.
    """
    weight = piece.get("unembed.weight")
    sliceable = (
        getattr(cfg, "normalization_type", None) in ("RMS", "RMSPre")
        and "ln_final.weight" in piece
        and "ln_final.bias" not in piece
        and set(piece) <= {"ln_final.weight", "unembed.weight", "unembed.bias"}
        and weight is not None
        and weight.ndim == 2
        and weight.shape[1] == cfg.d_model != weight.shape[0]
    )
    # Whole multiples of 64 columns: torch's CPU mean over the vocabulary works on groups of
    # columns at a time, and a slice that cuts across a group rounds its tail columns differently
    # from the whole matrix (seen here with AVX2 at widths 8 and 16, never at multiples of 32;
    # 64 leaves room for wider vectors).
    width = max(_COLUMN_GROUP, SLICE_BYTES // (4 * weight.shape[0]) // _COLUMN_GROUP * _COLUMN_GROUP)
    if not sliceable or width >= cfg.d_model or cfg.d_model % _COLUMN_GROUP:
        return _process_piece(pipeline, piece, cfg, 0, kwargs)
    norm, bias = piece.pop("ln_final.weight"), piece.pop("unembed.bias", None)
    piece.clear()
    out: dict = {}
    for start in range(0, cfg.d_model, width):
        cols = slice(start, start + width)
        part = {"ln_final.weight": norm[cols], "unembed.weight": weight[:, cols]}
        if bias is not None and start == 0:
            part["unembed.bias"] = bias  # the bias is centred once, with the first slice
        done = _process_piece(pipeline, part, cfg, 0, kwargs)
        if not out:
            out = {k: v for k, v in done.items() if k not in ("ln_final.weight", "unembed.weight")}
            out["ln_final.weight"] = done["ln_final.weight"].new_empty(norm.shape)
            out["unembed.weight"] = done["unembed.weight"].new_empty(weight.shape)
        out["ln_final.weight"][cols] = done["ln_final.weight"]
        out["unembed.weight"][:, cols] = done["unembed.weight"]
    return out


def _chunked_pipeline(original):
    """`ProcessWeights.process_weights`, run one block, then the embedding, then the unembedding."""

    def process_weights(state_dict, cfg, **kwargs):
        blocks, embed, final, unknown = _split(state_dict)
        if unknown or sorted(blocks) != list(range(cfg.n_layers)):
            # A piece this module does not know: the whole dict goes through in one piece.
            return original(state_dict, cfg, **kwargs)
        out: dict = {}
        for layer in range(cfg.n_layers):
            piece = {f"blocks.0.{_BLOCK_KEY.match(k).group(2)}": state_dict.pop(k) for k in blocks[layer]}
            for key, value in _process_piece(original, piece, cfg, 1, kwargs).items():
                out[re.sub(r"^blocks\.0\.", f"blocks.{layer}.", key)] = value
        piece = {k: state_dict.pop(k) for k in embed}
        out.update(_process_embed_piece(original, piece, cfg, kwargs))
        piece = {k: state_dict.pop(k) for k in final}
        out.update(_process_final_piece(original, piece, cfg, kwargs))
        state_dict.update(out)  # the caller's dict now holds the processed weights only
        return state_dict

    return staticmethod(process_weights)


def checkpoint_dtype(folder) -> torch.dtype | None:
    """The dtype a saved checkpoint's config declares (`dtype`, or the older `torch_dtype`)."""

    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    name = config.get("dtype") or config.get("torch_dtype")
    value = getattr(torch, name, None) if isinstance(name, str) else None
    return value if isinstance(value, torch.dtype) and value.is_floating_point else None


def boot_and_cast(source: str, dtype: torch.dtype, device: torch.device):
    """`TransformerBridge.boot_transformers` in the checkpoint's own dtype, then a cast one tensor at a time.

    Asked for another dtype, transformers converts the whole checkpoint while it loads, at about
    twice the weights (bf16 to fp16: 6.2 GB for Qwen2.5-1.5B). Booted in its own dtype the
    checkpoint is only mapped from disk; TransformerLens's own cast then replaces one parameter
    at a time, as boot would have done with its `dtype`.
    """
    from transformer_lens.model_bridge import TransformerBridge
    from transformer_lens.utilities.multi_gpu import cast_floating_params_to_dtype
    from transformer_lens.utilities.quantization import quantization_method

    stored = checkpoint_dtype(source)
    if device.type == "cuda":  # straight onto the GPU (a device map), never a full copy on the host
        return TransformerBridge.boot_transformers(source, dtype=dtype, device_map={"": str(device)})
    if stored is None or stored == dtype:
        return TransformerBridge.boot_transformers(source, dtype=dtype, device=device)
    bridge = TransformerBridge.boot_transformers(source, dtype=stored, device=device)
    if quantization_method(getattr(bridge.original_model, "config", None)) is not None:
        # A quantizer chose its own dtypes; leave the load exactly as TransformerLens does it.
        return TransformerBridge.boot_transformers(source, dtype=dtype, device=device)
    cast_floating_params_to_dtype(bridge.original_model, dtype)
    # Boot also gives an unembedding without a bias a zero `bias` buffer, made in boot's dtype.
    head = getattr(getattr(bridge, "unembed", None), "original_component", None)
    bias = getattr(head, "_buffers", {}).get("bias")
    if bias is not None and bias.is_floating_point():
        head._buffers["bias"] = bias.to(dtype)
    bridge.cfg.dtype = dtype
    return bridge


def _view_key(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device)


def warn_if_unsupported(stacklevel: int = 2) -> bool:
    """True if the lean path can be used; else warn (LeanLoadWarning) and return False."""
    reason = unsupported_reason()
    if reason is None:
        return True
    warnings.warn(
        f"{reason}, so tracelib loads through TransformerLens's own weight processing, which needs about "
        "three times the model's weights in memory.",
        LeanLoadWarning,
        stacklevel=stacklevel + 1,
    )
    return False


@contextlib.contextmanager
def lean_processing(bridge):
    """Inside this, `bridge.enable_compatibility_mode()` processes the weights piece by piece.

    Check `warn_if_unsupported()` first: this assumes the installed TransformerLens was checked.
    """
    from transformer_lens.weight_processing import ProcessWeights

    original = ProcessWeights.__dict__["process_weights"]
    placeholders: list[torch.Tensor] = []  # kept alive so their addresses stay distinct
    originals: set[tuple] = set()

    def detaching_state_dict(*args, **kwargs):
        state = type(bridge).state_dict(bridge, *args, **kwargs)
        if args or kwargs:
            return state
        embed, unembed = state.get("embed.weight"), state.get("unembed.weight")
        if embed is not None and unembed is not None and embed.data_ptr() == unembed.data_ptr():
            # The bridge clones a tied unembedding to untie it; an alias unties it as well,
            # since processing builds new tensors instead of writing into old ones.
            state["unembed.weight"] = unembed.as_subclass(_Alias)
        held = {_view_key(v) for v in state.values() if isinstance(v, torch.Tensor)}
        originals.update(held)
        for module in bridge.original_model.modules():
            for param in module._parameters.values():
                if param is not None and _view_key(param) in held:
                    placeholders.append(torch.zeros((), dtype=param.dtype, device=param.device))
                    param.data = placeholders[-1].expand(param.shape)
        return state

    bridge.state_dict = detaching_state_dict
    ProcessWeights.process_weights = _chunked_pipeline(original.__func__)
    try:
        yield
    finally:
        ProcessWeights.process_weights = original
        del bridge.state_dict
    params = list(bridge.original_model.named_parameters(remove_duplicate=False))
    unset = {t.data_ptr() for t in placeholders}
    left = [n for n, p in params if p.data_ptr() in unset or type(p.data) is not torch.Tensor]
    placeholders.clear()
    if left:
        raise RuntimeError(f"lean weight processing left {len(left)} weights unset, e.g. {left[:3]}")
    # Weights that processing left unchanged still share memory with what boot loaded (possibly a
    # read-only map of the checkpoint). TransformerLens's path gives every weight memory of its
    # own; do the same, one tensor at a time.
    for _, param in params:
        if _view_key(param.data) in originals:
            param.data = param.data.clone()
