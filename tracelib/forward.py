"""The one forward pass a trace runs: which hooks it keeps, where, and scoring positions in blocks.

The pass caches only the hooks the analyses read, and only at each row's final position (the position
that predicts the answer), except the few kept at every position for the position analyses; it
stops at the unembedding's input, and the unembedding scores positions a block at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tracelib.batching import forward_until
from tracelib.rows import Row


class NonFiniteError(FloatingPointError):
    """The forward pass produced inf or NaN (usually fp16 overflow), so there is nothing to explain."""


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
MIN_SCORED = 16


def _score_in_blocks(score, width: int, n_rows: int, vocab: int, final: Tensor, targets: Tensor):
    """Final-position logits, and the target's rank and probability at every position, a block of positions at a time.

    `score(start, stop)` gives the logits `[row, stop - start, vocab]`; `vocab` only sizes the
    blocks. Blocks are of near-equal size and never tiny: a matmul over a handful of rows may take
    another kernel (a matrix-vector product) whose rounding differs from the full forward pass's.
    """
    n_blocks = -(-width * n_rows * vocab // LOGIT_BLOCK_ELEMENTS)
    size = max(-(-width // max(1, n_blocks)), -(-MIN_SCORED // n_rows))
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


def run_to_unembedding(model, tokens: Tensor, hooks: list) -> Callable[[int, int], Tensor]:
    """Run `model(tokens)` with forward `hooks`, stopping at the unembedding's input where the model
    has one; returns `score(start, stop)`, the logits of positions `start:stop` (`[row, pos, vocab]`).

    The full logits would be the largest tensor of a trace; `score` unembeds only the positions
    asked for, with the model's own unembedding module.
    """
    unembed = getattr(getattr(model, "unembed", None), "original_component", None)
    point = getattr(getattr(model, "unembed", None), "hook_in", None)  # not hook_dict: the bridge rebuilds it per read
    hidden: dict[str, Tensor] = {}

    def unembedding_input(act: Tensor, hook) -> None:
        hidden["in"] = act.detach()

    hooks, stop_after = list(hooks), None
    if unembed is not None and getattr(point, "name", None):
        hooks.append((point.name, unembedding_input))
        stop_after = point.name
    logits = forward_until(model, tokens, hooks, stop_after, return_type="logits")
    if logits is not None:  # no unembedding hook: slice the model's logits

        def score(start: int, stop: int) -> Tensor:
            return logits[:, start:stop]
    else:

        def score(start: int, stop: int) -> Tensor:
            with torch.no_grad():
                return unembed(hidden["in"][:, start:stop])

    return score


def cached_run(model, tokens: Tensor, names, purpose: str) -> tuple[object, Callable[[int, int], Tensor]]:
    """`model.run_with_cache(tokens)` for the TransformerLens hook `names` only, stopped at the
    unembedding's input: an ActivationCache of them at every position, and `score` (see
    `run_to_unembedding`) for the logits of the positions wanted."""
    from transformer_lens import ActivationCache

    aliases = real_hook_points(model, names, purpose)
    store: dict[str, Tensor] = {}

    def keep(act: Tensor, hook) -> None:
        for alias in aliases[hook.name]:
            store[alias] = act.detach()

    score = run_to_unembedding(model, tokens, [(name, keep) for name in aliases])
    _check_fired(names, store)
    return ActivationCache(store, model), score


def _check_fired(wanted, store) -> None:
    missing = set(wanted) - set(store)
    if missing:
        raise RuntimeError(f"These hooks did not fire, so this architecture is not supported: {sorted(missing)[:5]}")


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

    hooks = [(name, keep) for name in aliases]
    score = run_to_unembedding(model, tokens.to(device), hooks)
    _check_fired(wanted, final_store)
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
