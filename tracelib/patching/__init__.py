"""Activation patching, clean <-> corrupted, scored by normalised logit-difference recovery.

`patch(model, clean, corrupted, answer)` runs one prompt, copies activations in from the other
prompt's run one cell at a time (a layer and position, a layer, a head), and reports how much of
the clean logit difference each cell brings back:

    value = (patched - corrupted) / (clean - corrupted)

where each term is the answer's logit minus the mean distractor logit at the final position. So
0 means "as the corrupted run" and 1 means "as the clean run", in both directions:

- `direction="denoise"` runs the corrupted prompt and patches in clean activations. A cell near 1
  is sufficient to restore the answer.
- `direction="noise"` runs the clean prompt and patches in corrupted activations. The same
  normalisation is kept, so an unpatched run scores 1 and a cell near 0 is necessary for it.

TransformerLens's `transformer_lens.patching.get_act_patch_resid_pre` and friends run on the
bridge in compatibility mode, and for equal-length prompts they agree with this module (the tests
check it on the bundled model). tracelib keeps its own path for three reasons:

1. Alignment. TransformerLens's functions assume both prompts have the same length and patch
   position i into position i; prompts with injected tokens need an alignment (`align_tokens`) and
   an honest gap where a position has no counterpart.
2. Batching. TransformerLens runs one forward pass per cell; here the cells of one layer share a
   batched pass, and one hook per hook point writes each batch row's own cell.
3. Starting at the layer. A cell at layer l changes nothing below l, so its run starts from the
   base run's cached `blocks.{l}.hook_resid_pre` and runs only blocks l and up, keeping the logits
   of the final position only (see `run_patched`). On average that is half the blocks, and the
   unembedding of one position instead of all of them.

The package, by job: `runs` (patched forward passes), `result` (`PatchingResult`), `exact`
(`patch`), `linear` (`attribution_patch`), `agreement` (`compare_patching`, `readable_vs_causal`).
"""

from tracelib.patching.agreement import (  # noqa: F401
    CAUSAL_UNITS,
    PatchingAgreement,
    ReadableVsCausal,
    _cell_names,
    compare_patching,
    readable_vs_causal,
)
from tracelib.patching.exact import (  # noqa: F401
    _is_injection,
    _resolve,
    check_alignment,
    fill_substitutions,
    invert_alignment,
    make_cells,
    patch,
    prepare,
    resolve_pair,
    shared_prefix,
)
from tracelib.patching.linear import (  # noqa: F401
    ATTRIBUTION_HOOKS,
    attribution_patch,
)
from tracelib.patching.result import (  # noqa: F401
    MIN_EFFECT,
    PatchingResult,
    SameMetricError,
    WeakCorruptionWarning,
    _check_span,
    _made_by,
    _warn_if_weak,
    check_min_effect,
    check_patching_result,
    check_what,
    is_weak,
    weak_note,
)
from tracelib.patching.runs import (  # noqa: F401
    _START_CHECKED,
    DIRECTIONS,
    METHODS,
    WHATS,
    Cell,
    LayerStartWarning,
    PatchSetup,
    _block_list,
    _blocks_from,
    _final_logits_only,
    _index,
    _layer_of,
    _real_points,
    _starts_at_layer_exactly,
    _write_cells,
    logit_diff,
    run_cached,
    run_patched,
)
