"""Which model made a result: its name and weights fingerprint, and the one check that pairs results.

Every result that is later paired with another result or with a model (a trace, a loaded
reference, a patching sweep) carries a `ModelIdentity`. `check_same_model` is the one place that
refuses a pair from two models, with one error, `ModelMismatchError`, naming both.

The weights fingerprint is a sha256 over the model's config (`CONFIG_FIELDS`), then, for every
`state_dict()` tensor in name order, its name, shape and dtype and a fixed sample of its bytes (the
first and last 64 elements, and 256 elements at evenly spaced indices). It reads about 400 elements
per tensor, so it costs milliseconds even for Qwen2.5-1.5B, and any retraining, fine-tuning, dtype
change or LayerNorm folding changes it. It is cached per model and recomputed whenever a parameter
changes in place (torch's per-tensor version counter) or is replaced.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import Tensor

from tracelib.models import model_name

# Config fields that change what a model computes; hashed into the weights fingerprint.
CONFIG_FIELDS = (
    "n_layers",
    "d_model",
    "n_heads",
    "d_head",
    "d_mlp",
    "d_vocab",
    "n_ctx",
    "n_key_value_heads",
    "act_fn",
    "normalization_type",
    "positional_embedding_type",
    "rotary_base",
    "dtype",
)
# Elements sampled from each weight tensor: the first and last _EDGE, and _STRIDED evenly spaced.
_EDGE, _STRIDED = 64, 256


class ModelMismatchError(ValueError):
    """Two things that must come from one model (a result and a model, or two results) come from two."""


@dataclass(frozen=True)
class ModelIdentity:
    """A model's name (as loaded) and weights fingerprint."""

    name: str
    fingerprint: str

    def __str__(self) -> str:
        return f"{self.name} (weights {self.fingerprint[:8] or 'unknown'})"


class MadeByModel:
    """For result dataclasses with `model_name` and `weights_fingerprint` fields: the model that made them."""

    @property
    def identity(self) -> ModelIdentity:
        """The model that made this result: its name and weights fingerprint."""
        return ModelIdentity(self.model_name, self.weights_fingerprint)


@dataclass(frozen=True, kw_only=True)
class MadeByModelFields(MadeByModel):
    """A result's last two fields, keyword-only: the name and weights fingerprint of the model that
    made it ("" where unknown, as in results built by hand)."""

    model_name: str = ""
    weights_fingerprint: str = ""


def is_model(obj) -> bool:
    """Whether `obj` looks like a model from `tl.load_model` (a TransformerLens bridge or module with a config)."""
    return isinstance(obj, torch.nn.Module) and hasattr(obj, "cfg")


def check_model_arg(model, where: str) -> None:
    """Refuse anything but a loaded model, with a TypeError that says what to pass."""
    if not is_model(model):
        shown = repr(model) if isinstance(model, (str, int, float, type(None))) else type(model).__name__
        raise TypeError(
            f"{where}: pass a model from tl.load_model(...), got {shown} ({type(model).__name__})"
            + (f"; load it first: model = tl.load_model({model!r})" if isinstance(model, str) else "")
            + "."
        )


def sample_indices(n: int) -> Tensor:
    """The elements of an n-element weight that the fingerprint reads: both ends and a fixed stride.

    Integer arithmetic on purpose: a float32 `linspace` rounds n - 1 up past the last index once n
    passes 2**24 (Qwen2.5's embedding has 233 million elements).
    """
    strided = torch.arange(_STRIDED, dtype=torch.int64) * (n - 1) // max(_STRIDED - 1, 1)
    return torch.cat([torch.arange(min(_EDGE, n)), torch.arange(max(n - _EDGE, 0), n), strided])


def _compute_fingerprint(model) -> str:
    h = hashlib.sha256()
    config = {name: str(getattr(model.cfg, name, None)) for name in CONFIG_FIELDS}
    h.update(json.dumps(config, sort_keys=True).encode())
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            flat = tensor.detach().reshape(-1)
            n = flat.numel()
            h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
            if n == 0:
                continue
            sample = flat[sample_indices(n).to(flat.device)].cpu().contiguous()
            # Raw bytes, so bfloat16 (which numpy cannot hold) is hashed the same way as the rest.
            h.update(sample.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# model -> (the parameters' identities and version counters, fingerprint)
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _state_key(model) -> tuple:
    # A parameter edited in place bumps its `_version`; a replaced one has a new id. One walk over the
    # modules for both parameters and buffers (`parameters()` and `buffers()` walk them once each, and
    # the bridge has thousands of modules).
    return tuple(
        (id(t), t._version)
        for module in model.modules()
        for tensors in (module._parameters, module._buffers)
        for t in tensors.values()
        if t is not None
    )


# (model, fingerprint) while `weights_pinned(model)` runs.
_PINNED: ContextVar[tuple | None] = ContextVar("tracelib_pinned_weights", default=None)


@contextmanager
def weights_pinned(model) -> Iterator[None]:
    """Within this block `model`'s weights are taken as unchanged: its fingerprint is checked once.

    Checking that a cached fingerprint is current walks every parameter (milliseconds on a large
    model); one trace or routes call asks for it several times, with the weights untouched between.
    """
    pinned = _PINNED.get()
    if pinned is not None and pinned[0] is model:
        yield
        return
    token = _PINNED.set((model, weights_fingerprint(model)))
    try:
        yield
    finally:
        _PINNED.reset(token)


def weights_fingerprint(model) -> str:
    """sha256 over the model's config and a fixed sample of every weight (see the module docstring)."""
    pinned = _PINNED.get()
    if pinned is not None and pinned[0] is model:
        return pinned[1]
    key = _state_key(model)
    try:
        cached = _CACHE.get(model)
    except TypeError:  # not weak-referenceable: compute every time
        return _compute_fingerprint(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    fingerprint = _compute_fingerprint(model)
    _CACHE[model] = (key, fingerprint)
    return fingerprint


def model_identity(model) -> ModelIdentity:
    """The name `model` was loaded under and its weights fingerprint."""
    return ModelIdentity(model_name(model), weights_fingerprint(model))


def check_same_model(made_by: ModelIdentity | None, other: ModelIdentity | None, what: str, other_what: str) -> None:
    """Refuse when `what` was made by one model and `other_what` by another, naming both.

    An identity that is unknown (None, or an empty fingerprint: a result from before tracelib
    recorded them) is not checked.
    """
    if made_by is None or other is None or not made_by.fingerprint or not other.fingerprint:
        return
    if made_by.fingerprint != other.fingerprint:
        same_name = " (same name, other weights)" if made_by.name == other.name else ""
        raise ModelMismatchError(
            f"{what} comes from {made_by}, but {other_what} comes from {other}{same_name}. "
            "They must come from one model: trace, patch and load references with the same model."
        )


class ModelGoneError(RuntimeError, ValueError):
    """A result needs the model that made it (to compute something on demand), and that model is gone.

    Either it was freed (results hold it weakly, never keeping a model alive) or none was ever
    recorded (a loaded reference). The message says what to pass instead.
    """


class ModelRef:
    """The one weak reference to the model that made a result, with that model's identity.

    Results that compute something on demand (the lenses' probabilities, `attention_view`) keep
    one; it never keeps the model alive, is never saved, and a copy of the result has none.
    """

    __slots__ = ("_ref", "identity")

    def __init__(self, model) -> None:
        self._ref = weakref.ref(model)
        self.identity = model_identity(model)

    def __call__(self):
        return self._ref()


def model_from(ref: ModelRef | None, needs: str, remedy: str):
    """The model `ref` points to, or `ModelGoneError` saying that `needs` it and what to do (`remedy`)."""
    model = ref() if ref is not None else None
    if model is None:
        gone = (
            f"the model that made this result ({ref.identity}) has been freed"
            if ref is not None
            else "no model is recorded with this result (a loaded reference, or a copy)"
        )
        raise ModelGoneError(f"{needs}, and {gone}. {remedy}")
    return model
