"""trace(): the whole workflow (margin, both lenses, DLA down to neurons) from one forward pass.

The forward pass caches only the hooks the analyses read, and only at each row's final position
(the position that predicts the answer). Those slices form a small `ActivationCache` with a
position axis of length 1, so TransformerLens's own primitives (`accumulated_resid`,
`decompose_resid`, `apply_ln_to_stack`) work on it unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass

import torch
from torch import Tensor

from tracelib.answers import decoding_once, token_str
from tracelib.attribution import Attribution, compute_attribution, warn_if_off
from tracelib.batching import auto_batch_size, progress_bar
from tracelib.formats import (
    READABLE_RULE,
    check_batch_size,
    check_metric,
    described,
    fmt_prob,
    fmt_value,
    metric_phrase,
    rows_repr,
    shown_entry,
)
from tracelib.forward import (  # noqa: F401 - FINAL, FULL, first_nonfinite, hook_names, real_hook_points re-exported
    FINAL,
    FULL,
    NonFiniteError,
    _nonfinite_error,
    first_nonfinite,
    hook_names,
    real_hook_points,
    run_forward,
)
from tracelib.heads import Heads, compute_heads
from tracelib.identity import MadeByModel, check_model_arg, weights_fingerprint, weights_pinned
from tracelib.lens import LogitLens, compute_lens
from tracelib.margin import Margin, check_k, compute_margin
from tracelib.models import model_name
from tracelib.plotting import readable_positions_sentence
from tracelib.positions import Positions, compute_positions
from tracelib.projections import compute_dtype, scaled_directions
from tracelib.reference_format import save_reference
from tracelib.rows import Row, _fill_distractors, build_rows, default_distractors  # noqa: F401 - re-exported


@dataclass(frozen=True)
class Trace(MadeByModel):
    """Everything `trace()` found, from one forward pass.

    Attributes:
        rows: what was traced, one row per prompt (and per answer token, teacher-forced).
        margin: the answer's logit, probability, rank, rivals (`tl.Margin`).
        lens: the standard and the cached-scale DLA lens along depth (`tl.LogitLens`).
        dla: direct logit attribution by component, layer, head and neuron (`tl.Attribution`).
        heads: every head's DLA split by source position, and attention patterns (`tl.Heads`).
        positions: DLA toward the answer at every position, lens per position (`tl.Positions`).
        model_name: the name the model was loaded under.
        weights_fingerprint: the model's weights fingerprint (`tl.ModelIdentity`); results made
            from this trace, and the models it is used with, are checked against it.
    """

    rows: list[Row]
    distractors: list[list[int]]
    margin: Margin
    lens: LogitLens
    dla: Attribution
    heads: Heads
    positions: Positions
    model_name: str
    weights_fingerprint: str = ""

    def to_dict(self, k: int = 5) -> dict:
        """A JSON-able summary, one entry per row, with the top `k` heads and neurons."""
        check_k(k)
        out = []
        for r, row in enumerate(self.rows):
            out.append(
                {
                    "prompt": row.prompt,
                    "str_tokens": row.str_tokens,
                    "answer": row.target_str,
                    "step": row.step,
                    "n_steps": row.n_steps,
                    "distractors": self.margin.distractor_strs[r],
                    "margin": {
                        "logit": self.margin.logit[r].item(),
                        "prob": self.margin.prob[r].item(),
                        "rank": int(self.margin.rank[r]),
                        "logit_diff": self.margin.logit_diff[r].item(),
                        "top": [
                            {"token": t, "logit": lg, "prob": p}
                            for t, lg, p in zip(
                                self.margin.top_strs[r],
                                self.margin.top_logits[r].tolist(),
                                self.margin.top_probs[r].tolist(),
                            )
                        ],
                    },
                    "lens": {
                        "entries": self.lens.labels,
                        "readable_from": {
                            "standard": self.lens.standard.readable_from(r),
                            "dla": self.lens.dla.readable_from(r),
                        },
                        "standard_logit_diff": self.lens.standard.logit_diff[:, r].tolist(),
                        "dla_logit_diff": self.lens.dla.logit_diff[:, r].tolist(),
                    },
                    "dla": {
                        "metric": self.dla.metric,
                        "components": dict(zip(self.dla.component_labels, self.dla.components[:, r].tolist())),
                        "top_heads": self.dla.top(k, "head", r).to_dict("records"),
                        "top_neurons": self.dla.top(k, "neuron", r).to_dict("records"),
                    },
                    "heads": self.heads.top(k, r).to_dict("records"),
                    "positions": dict(zip(("verdict", "evidence"), self.positions.verdict(r))),
                    "reconstruction": self.dla.reconstruction.to_dict(r),
                }
            )
        return {"model": self.model_name, "rows": out}

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    def save(self, path, model):
        """Save this trace as a clean reference folder (safetensors + JSON), atomically.

        `tl.load_reference(path)` gives the trace back, with no model needed. The model is needed
        here, not at trace time, so that `trace()` stays as fast as before: saving records its
        weights fingerprint and tokenizer hash, which `load_reference(path, model)` checks.

        Args:
            path: the folder to write. An existing reference there is replaced; anything else
                there is refused (`tl.ReferenceOverwriteError`).
            model: the model this trace was made with.

        Returns:
            The folder's `Path`.
        """
        return save_reference(self, path, model)

    def summary(self, k: int = 5) -> str:
        """A readable report: tokens, prediction and margin, where the answer becomes readable,
        top components, heads and neurons, and the reconstruction residual."""
        check_k(k)
        m, dla = self.margin, self.dla
        out = [f"model: {self.model_name}"]
        for r, row in enumerate(self.rows):
            readable = self.lens.standard.readable_from(r)
            out += [
                "",
                f"== {row.label}",
                f"tokens      {row.str_tokens}",
                f"prediction  {m.top_strs[r][0]!r} (p={fmt_prob(m.top_probs[r, 0])}); answer {row.target_str!r} "
                f"rank {int(m.rank[r])}, p={fmt_prob(m.prob[r])}, logit {fmt_value(m.logit[r])}",
                f"margin      logit diff {fmt_value(m.logit_diff[r])} against {m.distractor_strs[r]}",
                f"readable    from {shown_entry(readable)} by the standard lens; from "
                f"{shown_entry(self.lens.dla.readable_from(r))} by the cached-scale DLA lens ({READABLE_RULE})",
                f"DLA of the {dla.metric_label(r)}:",
            ]
            for unit in ("component", "head", "neuron"):
                top = dla.top(k, unit, r)
                shown = ", ".join(f"{u} {fmt_value(v)}" for u, v in zip(top[unit], top["value"]))
                out.append(f"  top {unit}s  {shown}")
            heads = self.heads.top(k, r)
            out.append(
                "  heads read from  "
                + ", ".join(
                    f"{h} {fmt_value(v)} ({w})" for h, v, w in zip(heads["head"], heads["value"], heads["reads_from"])
                )
            )
            verdict, evidence = self.positions.verdict(r)
            out.append(
                f"positions   {verdict} (computed in place {evidence['computed-in-place share']:.0%}, carried from "
                f"operands {evidence['attention-from-operands share']:.0%} of the final position's DLA); "
                + readable_positions_sentence(self.positions, r)
            )
            rec = dla.reconstruction.to_dict(r)
            out.append(
                f"reconstruction  sum of components {rec['attributed']:+.4f} + b_U {rec['bias']:+.4f} = "
                f"{rec['attributed'] + rec['bias']:+.4f}; model {rec['actual']:+.4f}; residual {rec['residual']:+.2e}"
            )
        return "\n".join(out)

    def __repr__(self) -> str:
        m = self.margin
        return rows_repr(
            f"Trace({self.model_name}, {len(self.rows)} row(s))",
            [row.label for row in self.rows],
            lambda r: (
                f"rank {int(m.rank[r])}, p {fmt_prob(m.prob[r])}, logit diff {fmt_value(m.logit_diff[r])} "
                f"vs {m.distractor_strs[r]}; readable from {shown_entry(self.lens.standard.readable_from(r))}; "
                f"DLA residual {self.dla.reconstruction.residual[r].item():+.1e}"
            ),
        )


def trace(
    model,
    prompts,
    answer,
    distractors=None,
    *,
    metric: str = "logit_diff",
    k: int = 5,
    allow_byte_fragments: bool = False,
    batch_size: int | None = None,
    progress: bool | None = None,
    prepend_bos: bool | None = None,
) -> Trace:
    """Trace why the model predicts `answer` after each prompt, from exactly one forward pass.

    Args:
        model: a loaded model (`tl.load_model`).
        prompts: one prompt, or several (a list, tuple or any iterable) run as right-padded
            batches (padding never changes a prompt's numbers).
        answer: the answer (`" 2"`), or one per prompt. Multi-token answers are traced per token,
            teacher-forced, each step a row.
        distractors: tokens the answer should beat. Default: a digit's neighbouring digits,
            otherwise the model's strongest competitor. One list for every prompt, or a list of
            lists, one per prompt (None in it for that prompt's default).
        metric: what every attribution explains. `"logit_diff"` (the default): the answer's logit
            minus the mean of its distractors' logits, "why this answer rather than its rivals".
            `"logit"`: the raw answer logit, which also counts whatever lifts every candidate
            alike (e.g. "a digit comes next"). Either sums to the metric minus its `b_U` term.
        k: how many top tokens the margin keeps (a positive integer).
        allow_byte_fragments: trace answers whose tokens are pieces of a UTF-8 character (see
            `resolve_answer`). Off by default.
        batch_size: rows per forward pass; default from free memory (`auto_batch_size`). The
            batches' results are joined into one `Trace`, as if all rows ran at once.
        progress: show a tqdm bar over the batches; default only with more than 4 batches and
            never under pytest or nbval.
        prepend_bos: None (the default) starts each prompt with a BOS token only where the model's
            tokenizer adds one (`tokenizer(prompt)`), so the traced prediction is the one the model
            makes in `transformers`; True or False overrides it.

    Returns:
        A `Trace` with `.margin`, `.lens`, `.dla`, and `.to_dict()`. The lenses' `prob` and `rank`
        are computed on first read, with the model (see `tl.LensCurve`).

    Raises:
        NonFiniteError: the logits, the final residual stream or the attributions hold inf or NaN
            (fp16 overflow, usually); the message names the hook where it first appears.
    """

    check_model_arg(model, "trace")
    check_metric(metric)
    k = check_k(k)
    check_batch_size(batch_size)
    with weights_pinned(model):
        with decoding_once():
            rows = build_rows(
                model, prompts, answer, distractors, allow_byte_fragments=allow_byte_fragments, prepend_bos=prepend_bos
            )
            size = batch_size or auto_batch_size(model, max(len(row.tokens) for row in rows), len(rows))
            starts = range(0, len(rows), size)
            parts = [
                _trace_rows(model, rows[start : start + size], metric, k, start)
                for start in progress_bar(starts, progress, "trace")
            ]
        rivals, margin, lens, dla, heads, positions = parts[0] if len(parts) == 1 else _join_parts(parts)
        heads.remember_model(model)  # joined batches make a new Heads
        warn_if_off(dla.reconstruction, metric, next(model.parameters()).dtype, stacklevel=3)
        return Trace(rows, rivals, margin, lens, dla, heads, positions, model_name(model), weights_fingerprint(model))


def _trace_rows(model, rows: list[Row], metric: str, k: int, first_row: int) -> tuple:
    """Every analysis of one batch of rows, from one forward pass: (rivals, margin, lens, dla, heads, positions)."""

    with torch.no_grad():
        fwd = run_forward(model, rows)
        cache, logits = fwd.final, fwd.final_logits
        # An overflowed logit ranks as 0 and sums "exactly" (inf - inf is never checked): stop here
        # rather than explain noise. The final residual is checked at every real position, since
        # the position analyses read them all.
        last = fwd.full[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
        real = (torch.arange(fwd.tokens.shape[1])[None] < fwd.lengths[:, None]).to(last.device)
        if not logits.isfinite().all():
            raise _nonfinite_error(model, fwd, rows, "the logits", first_row)
        if not last.isfinite().all(-1)[real].all():
            raise _nonfinite_error(model, fwd, rows, "the final residual stream's activations", first_row)
        targets = [row.target for row in rows]
        rivals = _fill_distractors(rows, logits)
        labels = [row.label for row in rows]
        margin = compute_margin(
            logits, targets, rivals, labels, lambda ids: "".join(token_str(model, t) for t in ids), k
        )
        rival_strs = [[token_str(model, t) for t in rival] for rival in rivals]
        lens = compute_lens(
            model, cache, torch.tensor(targets), rivals, labels, [row.target_str for row in rows], rival_strs
        )
        scale = cache["ln_final.hook_scale"][:, 0]
        u = scaled_directions(model, scale.to(compute_dtype(logits)), targets, rivals, metric)  # [row, d_model]
        metric_labels = [metric_phrase(metric, row.target_str, strs) for row, strs in zip(rows, rival_strs)]
        dla = compute_attribution(
            model, cache, logits, targets, rivals, labels, metric, u=u, warn=False, metric_labels=metric_labels
        )
        parts = (dla.components, dla.heads, dla.head_bias, dla.neurons, dla.neuron_bias)
        if not (dla.reconstruction.finite and all(bool(t.isfinite().all()) for t in parts)):
            raise _nonfinite_error(model, fwd, rows, "the attributions", first_row)
        heads = compute_heads(model, fwd, u, rows, metric_labels)
        positions = compute_positions(model, fwd, rows, rivals, heads, metric, metric_labels)
    return rivals, margin, lens, dla, heads, positions


# List fields shared by every row (labels of entries, components): kept once when batches join.
_SHARED_LISTS = {"labels", "component_labels", "lens_labels"}


def _join_parts(parts: list[tuple]) -> tuple:
    """Join the per-batch results of `_trace_rows` into the results of all rows at once."""
    return tuple(join_rows(list(values)) for values in zip(*parts))


def join_rows(parts: list):
    """Join results over rows, batch after batch: the result one batch of all their rows would give.

    Walks dataclass fields generically: a tensor field is concatenated along its `row` axis (read
    from its jaxtyping annotation; the last axis when it names none), and zero-padded on any other
    axis whose length differs (a source or position axis is as long as the batch's longest row,
    and is zero past a row's end). A list is a list of rows, extended, unless its field name is in
    `_SHARED_LISTS`. Nested dataclasses are joined the same way; a class may bring its own
    `join_rows` classmethod (`LensCurve`, whose prob and rank are computed later). Anything else
    must be equal across batches.
    """
    first = parts[0]
    if isinstance(first, Tensor):
        return _cat_padded(parts, -1)
    if isinstance(first, list):
        return [item for part in parts for item in part]
    if not dataclasses.is_dataclass(first):
        if any(part != first for part in parts[1:]):
            raise ValueError(f"cannot join batches that differ in {first!r}")
        return first
    own = getattr(type(first), "join_rows", None)
    if own is not None:
        return own(parts)
    values = {}
    for f in dataclasses.fields(first):
        items = [getattr(part, f.name) for part in parts]
        if isinstance(items[0], Tensor):
            values[f.name] = _cat_padded(items, _row_axis(f.type, items[0].ndim))
        elif isinstance(items[0], list) and f.name in _SHARED_LISTS:
            if any(item != items[0] for item in items[1:]):
                raise ValueError(f"cannot join batches whose {f.name} differ")
            values[f.name] = items[0]
        else:
            values[f.name] = join_rows(items)
    return type(first)(**values)


def _row_axis(annotation, ndim: int) -> int:
    """The `row` axis of a jaxtyping annotation such as `Float[Tensor, "layer head src row"]`."""
    match = re.search(r"""["']([^"']*)["']""", annotation if isinstance(annotation, str) else str(annotation))
    dims = match.group(1).split() if match else []
    return dims.index("row") - len(dims) if "row" in dims and len(dims) == ndim else -1


def _cat_padded(tensors: list[Tensor], axis: int) -> Tensor:
    """Concatenate along `axis`, zero-padding every other axis to its longest."""
    ndim = tensors[0].ndim
    axis %= ndim
    size = [max(t.shape[d] for t in tensors) for d in range(ndim)]
    padded = []
    for t in tensors:
        if any(t.shape[d] != size[d] for d in range(ndim) if d != axis):
            shape = [t.shape[d] if d == axis else size[d] for d in range(ndim)]
            out = t.new_zeros(shape)
            out[tuple(slice(0, n) for n in t.shape)] = t
            t = out
        padded.append(t)
    return torch.cat(padded, dim=axis)


def check_trace_arg(value, where: str, name: str) -> None:
    """Refuse anything but a `Trace` with a TypeError that says what to pass (not an AttributeError later).

    Args:
        value: the argument; where: the function that took it (`"compare"`); name: the parameter (`"a"`).
    """
    if isinstance(value, Trace):
        return
    hint = ""
    if isinstance(value, str):
        hint = f"; a saved reference is loaded first: tl.load_reference({value!r})"
    raise TypeError(
        f"{where}: pass a Trace from tl.trace or tl.load_reference as {name}, got {described(value)}{hint}."
    )
