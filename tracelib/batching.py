"""Running the model: batch sizes, progress bars, and stopping a forward pass after a hook point."""

from __future__ import annotations

import os
import sys

import torch
from tqdm.auto import tqdm


def _is_quiet() -> bool:
    """Progress bars stay off under pytest and nbval, whose stderr comparisons they would break.

    The rule: off when `PYTEST_CURRENT_TEST` is set (pytest sets it during every test, and a
    notebook kernel that nbval starts inherits it), when nbval is imported in this process, or
    when `TRACELIB_PROGRESS=0`. Whether pytest is merely imported says nothing: TransformerLens
    imports it in every process. Notebook cells that show a bar should start with
    `# NBVAL_IGNORE_OUTPUT` as well.
    """
    return "PYTEST_CURRENT_TEST" in os.environ or "nbval" in sys.modules or os.environ.get("TRACELIB_PROGRESS") == "0"


def progress_bar(items, progress: bool | None, desc: str):
    """`items`, under a tqdm bar when `progress` is True, or by default when there are more than 4
    of them and `_is_quiet()` is False (the rule `patch` and `trace` share)."""
    items = list(items)
    show = progress if progress is not None else (len(items) > 4 and not _is_quiet())
    return tqdm(items, disable=not show, desc=desc, leave=False) if show else items


def auto_batch_size(model, seq_len: int, n_cells: int, cap: int = 256) -> int:
    """A batch size that fits in a quarter of free memory, by a rough per-row estimate.

    Per batch row the forward keeps about 16 d_model-wide activations per layer per position
    (residuals, attention, the MLP's wider hidden layer) plus the full logits.
    """
    cfg = model.cfg
    itemsize = next(model.parameters()).element_size()
    per_row = seq_len * (16 * cfg.d_model * cfg.n_layers + 2 * cfg.d_vocab) * itemsize
    device = torch.device(cfg.device) if cfg.device is not None else torch.device("cpu")
    return max(1, min(cap, n_cells, int(free_memory(device) // 4 // max(per_row, 1))))


def free_memory(device: torch.device | None = None) -> int:
    """Bytes free on `device` (a CUDA device's, else the machine's available RAM; 2 GiB if unknown)."""
    if device is not None and device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 2**31


class _Stop(Exception):
    """Raised by `forward_until`'s last hook: nothing after that hook point is needed."""


def forward_until(model, tokens: torch.Tensor, hooks: list, stop_after: str | None, **kwargs):
    """Run `model(tokens, **kwargs)` with forward `hooks`, stopping right after the hook point `stop_after`.

    The one way tracelib stops a forward pass early (the trace at the unembedding's input, the
    attention patterns after the last layer shown). The hooks on `stop_after` run first, then the
    pass ends: TransformerLens runs a point's hooks in the order they were added. TransformerLens's
    own `stop_at_layer` stops only at a block boundary, before the final norm, so it cannot stop
    at the unembedding's input.

    Returns:
        The model's output, or None when the pass stopped at `stop_after`.
    """

    def stop(act, hook) -> None:
        raise _Stop

    hooks = list(hooks) + ([(stop_after, stop)] if stop_after else [])
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        try:
            return model(tokens, **kwargs)
        except _Stop:
            return None
