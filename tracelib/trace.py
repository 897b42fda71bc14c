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
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tracelib.answers import ResolvedAnswer, _single_token, decoding_once, resolve_answer, token_str
from tracelib.attribution import Attribution, compute_attribution, warn_if_off
from tracelib.batching import auto_batch_size, forward_until, progress_bar
from tracelib.formats import (
    READABLE_RULE,
    check_batch_size,
    check_metric,
    described,
    fmt_prob,
    fmt_value,
    metric_phrase,
    unit_label,
)
from tracelib.heads import Heads, compute_heads
from tracelib.identity import ModelIdentity, check_model_arg, weights_fingerprint
from tracelib.lens import LogitLens, compute_lens
from tracelib.margin import Margin, check_k, compute_margin
from tracelib.models import model_name
from tracelib.plotting import readable_positions_sentence
from tracelib.positions import Positions, compute_positions
from tracelib.projections import compute_dtype, scaled_directions
from tracelib.reference_format import save_reference

_DIGITS = "0123456789"


class NonFiniteError(FloatingPointError):
    """The forward pass produced inf or NaN (usually fp16 overflow), so there is nothing to explain."""


@dataclass(frozen=True)
class Row:
    """One prediction to explain: `target` after `tokens` (one teacher-forced step of an answer)."""

    prompt: str
    tokens: Int[Tensor, " pos"]
    str_tokens: list[str]
    target: int
    target_str: str
    distractors: list[int]
    distractor_strs: list[str]
    step: int
    n_steps: int

    @property
    def label(self) -> str:
        step = f" [step {self.step + 1}/{self.n_steps}]" if self.n_steps > 1 else ""
        return f"{self.prompt!r} -> {self.target_str!r}{step}"


def _is_one(value) -> bool:
    """Whether a prompt or answer argument is a single item rather than an iterable of them."""
    return isinstance(value, (str, bytes, bytearray, ResolvedAnswer)) or not isinstance(value, Iterable)


def default_distractors(model, target: int) -> list[int]:
    """Sensible rivals for a target: for a digit, its neighbouring digits written the same way.

    `" 2"` gets `" 1"` and `" 3"`, `"2"` gets `"1"` and `"3"`, `"0"` gets `"1"` only. For other
    answers there is no natural rival, so an empty list is returned and the trace uses the model's
    own strongest competitor.
    """
    text = token_str(model, target)
    digit = text.strip()
    if len(digit) != 1 or digit not in _DIGITS:
        return []
    out = []
    for neighbour in (int(digit) - 1, int(digit) + 1):
        if 0 <= neighbour <= 9:
            ids = model.to_tokens(text.replace(digit, str(neighbour)), prepend_bos=False)[0].tolist()
            if len(ids) == 1:
                out.append(ids[0])
    return out


def _distractor_ids(model, distractors, resolved: ResolvedAnswer) -> list[int] | None:
    """Distractor tokens, written the way the user wrote the answer.

    Whitespace that `resolve_answer` moved out of the answer (Qwen's `" "` before a digit) or
    dropped (a prompt ending in whitespace) is taken off the distractors too, so `" 3"` is a rival
    of `" 2"` on every tokenizer.
    """

    if distractors is None:
        return None
    if isinstance(distractors, (str, int, bytes, bytearray)):
        distractors = [distractors]
    out = []
    for d in distractors:
        if (
            isinstance(d, str)
            and d[:1].isspace()
            and (resolved.moved_whitespace or resolved.answer != resolved.typed_answer)
        ):
            d = d[len(resolved.moved_whitespace) :] if resolved.moved_whitespace else d.lstrip()
        out.append(_single_token(model, d))
    return out


def build_rows(
    model,
    prompts,
    answer,
    distractors=None,
    *,
    allow_byte_fragments: bool = False,
    prepend_bos: bool | None = None,
) -> list[Row]:
    """Resolve every prompt's answer and unroll multi-token answers into teacher-forced rows.

    `prompts` and `answer` may each be one string or any iterable of them (read once, so a
    generator works).
    """
    prompts = [prompts] if _is_one(prompts) else list(prompts)
    if not prompts:
        raise ValueError("trace() needs at least one prompt.")
    answers = [answer] * len(prompts) if _is_one(answer) else list(answer)
    if len(answers) != len(prompts):
        raise ValueError(f"Got {len(prompts)} prompts but {len(answers)} answers; pass one answer, or one per prompt.")
    rows = []
    defaults: dict[int, list[int]] = {}  # default_distractors tokenises: once per target
    for prompt, ans in zip(prompts, answers):
        resolved = (
            ans
            if isinstance(ans, ResolvedAnswer)
            else resolve_answer(model, prompt, ans, allow_byte_fragments=allow_byte_fragments, prepend_bos=prepend_bos)
        )
        chosen = _distractor_ids(model, distractors, resolved)
        for step in resolved.steps:
            if chosen is not None:
                rivals = chosen
            else:
                if step.target not in defaults:
                    defaults[step.target] = default_distractors(model, step.target)
                rivals = defaults[step.target]
            if step.target in rivals:
                raise ValueError(
                    f"The distractor {token_str(model, step.target)!r} is the answer itself; "
                    "pass tokens the answer should beat."
                )
            rows.append(
                Row(
                    prompt=resolved.prompt,
                    tokens=step.tokens,
                    str_tokens=[token_str(model, t) for t in step.tokens.tolist()],
                    target=step.target,
                    target_str=step.target_str,
                    distractors=list(rivals),
                    distractor_strs=[token_str(model, t) for t in rivals],
                    step=step.index,
                    n_steps=len(resolved.answer_tokens),
                )
            )
    return rows


FULL, FINAL = "full", "final"


def hook_names(model) -> dict[str, str]:
    """Every hook a trace reads, and whether it is kept at every position or only the final one.

    Kept at every position (for the position and source analyses): embeddings, the residual
    stream entering the first layer and leaving the last, sublayer outputs, the final norm's
    scale, values and head outputs `z`; all of them grow linearly with the prompt. Kept at the
    final position only: the rest of the residual stream (rebuilt from its sums where needed), MLP
    activations, and the attention patterns' final row (`[row, head, 1, src]`, what the source
    decomposition reads), since a full pattern grows with the square of the prompt. Attention
    views recompute the few patterns they show (`tl.attention_patterns`).
    """
    names = {"hook_embed": FULL, "ln_final.hook_scale": FULL}
    if model.cfg.positional_embedding_type == "standard":
        names["hook_pos_embed"] = FULL
    last = model.cfg.n_layers - 1
    for layer in range(model.cfg.n_layers):
        for hook in ("hook_attn_out", "hook_mlp_out"):
            names[f"blocks.{layer}.{hook}"] = FULL
        # The residual stream is the running sum of the sublayer outputs: kept whole only where it
        # starts and ends; `positions.position_block` rebuilds the rest, exactly, a block at a time.
        names[f"blocks.{layer}.hook_resid_pre"] = FULL if layer == 0 else FINAL
        names[f"blocks.{layer}.hook_resid_mid"] = FINAL
        names[f"blocks.{layer}.hook_resid_post"] = FULL if layer == last else FINAL
        names[f"blocks.{layer}.attn.hook_v"] = FULL
        names[f"blocks.{layer}.attn.hook_pattern"] = FINAL
        names[f"blocks.{layer}.attn.hook_z"] = FULL
        names[f"blocks.{layer}.mlp.hook_post"] = FINAL
    return names


def real_hook_points(model, names, purpose: str = "trace") -> dict[str, list[str]]:
    """Map TransformerLens hook names to the bridge's real hook points: real name -> aliases.

    The bridge exposes TL's names as aliases (blocks.0.hook_resid_pre is the point blocks.0.hook_in);
    hooks go on the real points, and each activation is filed under its alias.
    """
    # The bridge rebuilds hook_dict on every read (hundreds of hooks): read it once.
    hooks = model.hook_dict
    out: dict[str, list[str]] = {}
    for name in names:
        point = hooks.get(name)
        if point is None:
            raise RuntimeError(f"This model has no hook {name!r}, so tracelib cannot {purpose} it.")
        out.setdefault(point.name, []).append(name)
    return out


@dataclass
class Forward:
    """What the one forward pass leaves behind.

    Attributes:
        tokens: the right-padded batch, `[row, pos]`; `lengths` gives each row's real length.
        final: an ActivationCache of every hook at each row's final position (`[row, 1, ...]`).
        full: an ActivationCache of the FULL hooks at every position (`[row, pos, ...]`); attention
            patterns are never here (see `hook_names`).
        final_logits: the model's logits at each row's final position, `[row, vocab]`.
        answer_rank: the rank of each row's target in the model's own prediction at every
            position, `[row, pos]` (0: the top prediction).
        answer_prob: the target's probability in the model's own prediction at every position,
            `[row, pos]`.

    The logits at every position (`[row, pos, vocab]`, 1.2 GB for 2,048 tokens of Qwen2.5's
    vocabulary) are never kept: the unembedding runs on a block of positions at a time, and only
    these two are read from each block.
    """

    tokens: Int[Tensor, "row pos"]
    lengths: Int[Tensor, " row"]
    final: object
    full: object
    final_logits: Float[Tensor, "row vocab"]
    answer_rank: Int[Tensor, "row pos"]
    answer_prob: Float[Tensor, "row pos"]


# Elements of the largest logits block scored at once ([row, positions, vocab]).
LOGIT_BLOCK_ELEMENTS = 2**24
# Fewest (row, position) pairs scored at once, so the matmul takes the full pass's kernel.
_MIN_SCORED = 16


def _score_in_blocks(score, width: int, n_rows: int, vocab: int, final: Tensor, targets: Tensor):
    """Final-position logits, and the target's rank and probability at every position, a block of positions at a time.

    `score(start, stop)` gives the logits `[row, stop - start, vocab]`; `vocab` only sizes the
    blocks. Blocks are of near-equal size and never tiny: a matmul over a handful of rows may take
    another kernel (a matrix-vector product) whose rounding differs from the full forward pass's.
    """
    n_blocks = -(-width * n_rows * vocab // LOGIT_BLOCK_ELEMENTS)
    size = max(-(-width // max(1, n_blocks)), -(-_MIN_SCORED // n_rows))
    final_logits, ranks, probs = None, [], []
    for start in range(0, width, size):
        stop = min(start + size, width)
        logits = score(start, stop)  # [row, block, vocab]
        answer = logits.gather(-1, targets.to(logits.device)[:, None, None].expand(-1, stop - start, 1))
        ranks.append((logits > answer).sum(-1).cpu())
        probs.append((answer[..., 0].float() - logits.float().logsumexp(-1)).exp().cpu())
        if final_logits is None:
            final_logits = logits.new_empty(n_rows, logits.shape[-1])
        here = ((final >= start) & (final < stop)).nonzero()[:, 0]
        final_logits[here] = logits[here, final[here] - start]
        del logits
    return final_logits, torch.cat(ranks, 1), torch.cat(probs, 1)


def run_forward(model, rows: list[Row]) -> Forward:
    """Run all rows as one right-padded batch, caching only the hooks the analyses read.

    Right padding cannot change a row's numbers: attention is causal, so no real position attends
    to the padding after it, and positions still count from 0.
    """
    from transformer_lens import ActivationCache

    lengths = torch.tensor([len(r.tokens) for r in rows])
    pad = model.tokenizer.pad_token_id
    pad = 0 if pad is None else pad
    tokens = torch.full((len(rows), int(lengths.max())), pad, dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, : len(row.tokens)] = row.tokens
    device = model.cfg.device
    final = (lengths - 1).to(device)
    batch = torch.arange(len(rows), device=device)
    full_store: dict[str, Tensor] = {}
    final_store: dict[str, Tensor] = {}
    # The bridge exposes TransformerLens's names as aliases (blocks.0.hook_resid_pre is the hook
    # point blocks.0.hook_in); hook the real points and file each activation under its alias.
    wanted = hook_names(model)
    aliases = real_hook_points(model, wanted, "trace")

    # Hooks kept at every position in every layer are copied into one buffer per hook, all layers
    # together: a buffer that large is its own memory mapping, so the model's per-layer
    # activations are freed and reused as in a plain forward pass, rather than pinning scattered
    # pieces of the heap that the process cannot give back.
    stacked = {
        name.split(".", 2)[2]
        for name in wanted
        if name.startswith("blocks.")
        and all(wanted.get(f"blocks.{layer}.{name.split('.', 2)[2]}") == FULL for layer in range(model.cfg.n_layers))
    }
    buffers: dict[str, Tensor] = {}

    def keep(act: Tensor, hook) -> None:
        # Returning None leaves the activation untouched; returning any other tensor object makes
        # the bridge rebuild its output from the hooked values (at float-rounding cost).
        kept = act.detach()
        for alias in aliases[hook.name]:
            if wanted[alias] == FULL:
                _, layer, suffix = alias.split(".", 2) if alias.startswith("blocks.") else (None, None, None)
                if suffix in stacked:
                    if suffix not in buffers:
                        buffers[suffix] = kept.new_empty((model.cfg.n_layers, *kept.shape))
                    full_store[alias] = buffers[suffix][int(layer)].copy_(kept)
                else:
                    full_store[alias] = kept
            # Patterns are [row, head, dst, src]: the final position is a destination. Indexing
            # copies the final rows out, so the full pattern is freed as soon as the layer is done.
            at_final = kept[batch, :, final] if alias.endswith("hook_pattern") else kept[batch, final]
            final_store[alias] = at_final.unsqueeze(2 if alias.endswith("hook_pattern") else 1)

    # The pass stops at the unembedding's input, and the trace scores positions in blocks with the
    # model's own unembedding module: the full logits would be the largest tensor of the trace.
    unembed = getattr(getattr(model, "unembed", None), "original_component", None)
    point = getattr(getattr(model, "unembed", None), "hook_in", None)  # not hook_dict: the bridge rebuilds it per read
    hidden: dict[str, Tensor] = {}

    def unembedding_input(act: Tensor, hook) -> None:
        hidden["in"] = act.detach()

    hooks = [(name, keep) for name in aliases]
    stop_after = None
    if unembed is not None and getattr(point, "name", None):
        hooks.append((point.name, unembedding_input))
        stop_after = point.name
    logits = forward_until(model, tokens.to(device), hooks, stop_after, return_type="logits")
    missing = set(wanted) - set(final_store)
    if missing:
        raise RuntimeError(f"These hooks did not fire, so this architecture is not supported: {sorted(missing)[:5]}")
    if logits is not None:  # no unembedding hook: slice the blocks from the model's logits

        def score(start: int, stop: int) -> Tensor:
            return logits[:, start:stop]
    else:

        def score(start: int, stop: int) -> Tensor:
            with torch.no_grad():
                return unembed(hidden["in"][:, start:stop])

    final_logits, answer_rank, answer_prob = _score_in_blocks(
        score,
        tokens.shape[1],
        len(rows),
        model.cfg.d_vocab,
        final,
        torch.tensor([row.target for row in rows]),
    )
    return Forward(
        tokens=tokens,
        lengths=lengths,
        final=ActivationCache(final_store, model),
        full=ActivationCache(full_store, model),
        final_logits=final_logits,
        answer_rank=answer_rank,
        answer_prob=answer_prob,
    )


# Where each cached hook sits, for saying where a non-finite value first appears.
_HOOK_PLACES = {
    "hook_embed": "the token embedding",
    "hook_pos_embed": "the position embedding",
    "hook_resid_pre": "the residual stream entering layer {layer}",
    "attn.hook_v": "layer {layer}'s attention values",
    "attn.hook_pattern": "layer {layer}'s attention pattern",
    "attn.hook_z": "layer {layer}'s head outputs",
    "hook_attn_out": "layer {layer}'s attention output",
    "hook_resid_mid": "the residual stream after layer {layer}'s attention",
    "mlp.hook_post": "layer {layer}'s MLP neurons",
    "hook_mlp_out": "layer {layer}'s MLP output",
    "hook_resid_post": "the residual stream after layer {layer}",
    "ln_final.hook_scale": "the final norm's scale",
}
_LAYER_HOOKS = tuple(key for key in _HOOK_PLACES if "{layer}" in _HOOK_PLACES[key])


def forward_order(model) -> list[str]:
    """The hooks a trace caches, in the order the forward pass computes them."""
    names = ["hook_embed"] + (["hook_pos_embed"] if model.cfg.positional_embedding_type == "standard" else [])
    for layer in range(model.cfg.n_layers):
        names += [f"blocks.{layer}.{hook}" for hook in _LAYER_HOOKS]
    return names + ["ln_final.hook_scale"]


def _describe_hook(name: str) -> str:
    if name.startswith("blocks."):
        _, layer, hook = name.split(".", 2)
        return _HOOK_PLACES[hook].format(layer=layer)
    return _HOOK_PLACES[name]


def first_nonfinite(model, fwd: Forward) -> tuple[str, int, int] | None:
    """Where inf or NaN first appears in the forward pass: (hook, row, position), or None.

    Hooks are scanned in forward order, and only at each row's real positions: padding positions
    are computed too, but nothing traced reads them.
    """
    real = torch.arange(fwd.tokens.shape[1])[None] < fwd.lengths[:, None]  # [row, pos]
    for name in forward_order(model):
        if name in fwd.full.cache_dict:
            act = fwd.full[name]
            bad = ~act.isfinite().reshape(*act.shape[:2], -1).all(-1).cpu() & real  # [row, pos]
        else:  # kept at the final position only: [row, 1, ...]
            act = fwd.final[name]  # a pattern's final row too: [row, head, 1, src]
            bad = ~act.isfinite().reshape(act.shape[0], -1).all(-1).cpu()  # [row]
            bad = torch.zeros_like(real).scatter(1, (fwd.lengths - 1)[:, None], bad[:, None])
        if bad.any():
            row = int(bad.any(1).nonzero()[0])
            return name, row, int(bad[row].nonzero()[0])
    return None


def _nonfinite_error(model, fwd: Forward, rows: list[Row], what: str, first_row: int = 0) -> NonFiniteError:
    """The error for inf or NaN in `what`, naming the hook where it first appears and the way out.

    `rows` are one chunk of the trace's rows, the first of which is row `first_row` of the trace.
    """
    dtype = next(model.parameters()).dtype
    name = str(dtype).removeprefix("torch.")
    where = first_nonfinite(model, fwd)
    overflowed = f"The model's activations overflowed in {name}"
    if where is not None:
        hook, r, pos = where
        place = (
            f"the first inf or NaN appears at {hook} ({_describe_hook(hook)}) of row {first_row + r}, {rows[r].label}, "
            f"at position {pos} ({rows[r].str_tokens[pos]!r})"
        )
    elif not fwd.final_logits.isfinite().all():
        place = "every cached activation is finite, but the unembedding's output (the logits) is not"
    else:
        overflowed = f"The attributions overflowed (the model runs in {name})"
        place = "every activation and the logits are finite, but the attributions computed from them are not"
    if dtype == torch.float16:
        advice = (
            "load the model with dtype=torch.float32 (on the CPU), or torch.bfloat16 on a GPU that supports "
            "it, whose range is float32's: tl.load_model(NAME, dtype=torch.float32)"
        )
    elif dtype == torch.bfloat16:
        advice = (
            "load the model with dtype=torch.float32 (bfloat16 already has float32's range, so check the "
            "weights for inf and NaN too)"
        )
    else:
        advice = (
            "check the weights for inf and NaN (any(not p.isfinite().all() for p in model.parameters())); if "
            "they are finite, load the model with dtype=torch.float64"
        )
    return NonFiniteError(
        f"{overflowed}: {what} hold inf or NaN, so there is nothing to explain. Where: {place}. What to do: {advice}."
    )


def _fill_distractors(rows: list[Row], logits: Tensor) -> list[list[int]]:
    """Each row's rivals; rows without any get the model's strongest non-answer token."""
    out = [list(row.distractors) for row in rows]
    need = [i for i, row in enumerate(rows) if not row.distractors]
    if need:
        ranked = logits[need].topk(2).indices.tolist()  # one topk for every row that needs it
        for i, (first, second) in zip(need, ranked):
            out[i] = [second if first == rows[i].target else first]
    return out


@dataclass(frozen=True)
class Trace:
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

    @property
    def identity(self) -> ModelIdentity:
        """The model that made this trace: its name and weights fingerprint."""
        return ModelIdentity(self.model_name, self.weights_fingerprint)

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
                f"readable    from {_shown(readable)} by the standard lens; from "
                f"{_shown(self.lens.dla.readable_from(r))} by the cached-scale DLA lens ({READABLE_RULE})",
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
        lines = [f"Trace({self.model_name}, {len(self.rows)} row(s))"]
        for r, row in enumerate(self.rows[:5]):
            lines.append(
                f"  {row.label}: rank {int(m.rank[r])}, p {fmt_prob(m.prob[r])}, logit diff "
                f"{fmt_value(m.logit_diff[r])} vs {m.distractor_strs[r]}; readable from "
                f"{_shown(self.lens.standard.readable_from(r))}; "
                f"DLA residual {self.dla.reconstruction.residual[r].item():+.1e}"
            )
        return "\n".join(lines)


def _shown(entry: str | None) -> str:
    return "never" if entry is None else unit_label(entry)


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
            otherwise the model's strongest competitor.
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
