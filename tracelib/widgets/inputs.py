"""What the explorer is given: models and saved references to open, heads and steps to pick, and its errors."""

from __future__ import annotations

import operator
from pathlib import Path

from tracelib.identity import check_model_arg
from tracelib.models import model_name
from tracelib.reference import load_reference
from tracelib.trace import Trace

# Errors the library raises on bad input; anything else is a bug and should surface as one.
_INPUT_ERRORS = (ValueError, TypeError, FloatingPointError, OSError)


class SelectionError(ValueError):
    """The explorer was asked to show a head, step or reference it does not have; the message lists what it has."""


def _index(value) -> int | None:
    """`value` as an index (an int, a numpy or torch integer), or None for anything else (1.5, "1", None)."""
    try:
        return operator.index(value)
    except TypeError:
        return None


def _models(models, has_references: bool) -> dict:
    """A name -> model dict from one model, a list of models, or a dict; each must be a loaded model.

    None is allowed only when there are references to open without a model.
    """
    if models is None and has_references:
        return {}
    if isinstance(models, dict):
        named = dict(models)
        for model in named.values():
            check_model_arg(model, "explore")
    else:
        listed = list(models) if isinstance(models, (list, tuple)) else [models]
        for model in listed:
            check_model_arg(model, "explore")
        named = {model_name(m): m for m in listed}
    if not named and not has_references:
        check_model_arg(models, "explore")  # an empty list or dict: say what to pass
    return named


def _references(reference) -> dict:
    """A label -> loaded Trace dict from a path, a Trace, or a list of either."""
    if reference is None:
        return {}
    if isinstance(reference, (str, Path, Trace)):
        reference = [reference]
    out = {}
    for ref in reference:
        if isinstance(ref, Trace):
            out[f"{ref.model_name}: {ref.rows[0].label}"] = ref
        else:
            out[str(ref)] = load_reference(ref)
    return out
