"""OOD token injection: corrupt a prompt away from its answer, and find the tokens a model never trained on.

`inject(model, prompt, kind, where)` inserts out-of-distribution tokens (random, under-trained, junk,
repeated) or makes a typo near the operands, working on token ids so that the final position, the
one that predicts the answer, stays the final position. It returns the corrupted tokens together
with the alignment back to the clean ones, ready for `compare` or for patching.

`find_undertrained_tokens(model)` flags under-trained tokens from the weights alone, in the manner
of "Fishing for Magikarp" (Land & Bartolo, 2024).

`damage_report(reference, corrupted)` measures the corrupted prompt's trace against the clean
reference: the margin drop, the shift in when the answer becomes readable, and whether each
reference feature (strong components, top heads) survives, is damaged or becomes unreadable.
"""

from __future__ import annotations

import math
import numbers
import operator
import random
import weakref
from dataclasses import dataclass, field

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from tracelib import plotting
from tracelib.answers import _check_text, prepends_bos, resolve_answer, token_str
from tracelib.formats import LENSES, SURVIVES_WITHIN, UNREADABLE_BELOW, check_k, check_row, described, unit_label
from tracelib.identity import MadeByModelFields, check_model_arg, check_same_model
from tracelib.models import model_name
from tracelib.plotting import undertrained_figure
from tracelib.trace import check_trace_arg

KINDS = ("random", "undertrained", "junk", "typo", "repeat")
WHERES = ("before", "between", "after", "before_final")
# Strings no arithmetic question contains; tokenised with the model's own tokenizer.
JUNK_STRINGS = ("@@#~", "%$^&", "~~|", "#!@", "^^*", "&&%", "|~#", "$#@!")
# Rejection sampling gives up after this many draws: a tokenizer that merges every candidate
# with its neighbours cannot be corrupted at that place without changing the clean tokens.
MAX_TRIES = 500


@dataclass(frozen=True)
class Injection:
    """A prompt with out-of-distribution tokens injected, aligned with the clean prompt.

    Attributes:
        prompt: the corrupted prompt as text; tokenising it gives back `tokens` exactly.
        tokens: the corrupted prompt's token ids (BOS included when the model prepends one).
        str_tokens: the same as strings.
        clean_prompt: the clean prompt as text (with whitespace moved in from the answer, if any).
        clean_tokens: the clean prompt's token ids.
        clean_str_tokens: the same as strings.
        alignment: for each corrupted position, the clean position it holds, or None if injected.
        injected: the corrupted positions that hold injected (or typo) tokens.
        answer_position: the corrupted position that predicts the answer: the final one.
        kind, where, n, seed: the arguments that made it.
    """

    prompt: str
    tokens: Int[Tensor, " pos"]
    str_tokens: list[str]
    clean_prompt: str
    clean_tokens: Int[Tensor, " clean_pos"]
    clean_str_tokens: list[str]
    alignment: tuple[int | None, ...]
    injected: tuple[int, ...]
    answer_position: int
    kind: str
    where: str
    n: int
    seed: int
    notes: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.tokens.ndim != 1 or len(self.tokens) != len(self.str_tokens) or len(self.tokens) != len(self.alignment):
            raise ValueError(
                f"tokens {tuple(self.tokens.shape)}, str_tokens ({len(self.str_tokens)}) and alignment "
                f"({len(self.alignment)}) must be one aligned 1-d sequence"
            )
        if self.clean_tokens.ndim != 1 or len(self.clean_tokens) != len(self.clean_str_tokens):
            raise ValueError("clean_tokens and clean_str_tokens must be one aligned 1-d sequence")
        if self.answer_position != len(self.tokens) - 1 or self.alignment[-1] != len(self.clean_tokens) - 1:
            raise ValueError("the answer position must be the final position of both prompts")
        if sorted(self.injected) != [i for i, a in enumerate(self.alignment) if a is None]:
            raise ValueError("injected must list exactly the positions the alignment maps to None")

    @property
    def clean_answer_position(self) -> int:
        """The clean position that predicts the answer: the final one."""
        return len(self.clean_tokens) - 1

    def to_frame(self) -> pd.DataFrame:
        """One row per corrupted position: its token (`repr`, so `" 1"` and `"1"` differ), the clean
        position it maps to, whether injected."""
        return pd.DataFrame(
            {
                "position": range(len(self.tokens)),
                "token": [repr(t) for t in self.str_tokens],
                "clean_position": [pd.NA if a is None else a for a in self.alignment],
                "injected": [a is None for a in self.alignment],
            }
        )

    def __repr__(self) -> str:
        shown = [self.str_tokens[i] for i in self.injected]
        return f"Injection({self.kind!r} {self.where!r}: {self.clean_prompt!r} -> {self.prompt!r}; injected {shown})"


@dataclass(frozen=True)
class UndertrainedTokens:
    """Tokens whose unembedding looks untrained, with the score of every token.

    Attributes:
        token_ids: the flagged tokens, lowest score first.
        str_tokens: the same as strings.
        scores: every token's score (the norm of its unembedding row with the mean and the first
            principal component removed); low means under-trained.
        threshold: tokens scoring below it are flagged.
    """

    token_ids: Int[Tensor, " flagged"]
    str_tokens: list[str]
    scores: Float[Tensor, " vocab"]
    threshold: float

    def __post_init__(self) -> None:
        if self.token_ids.ndim != 1 or len(self.token_ids) != len(self.str_tokens) or self.scores.ndim != 1:
            raise ValueError(
                f"token_ids {tuple(self.token_ids.shape)} and str_tokens ({len(self.str_tokens)}) must be "
                f"aligned, and scores {tuple(self.scores.shape)} 1-d"
            )

    def to_frame(self) -> pd.DataFrame:
        """One row per flagged token: id, string and score."""
        return pd.DataFrame(
            {
                "token_id": self.token_ids.tolist(),
                "token": self.str_tokens,
                "score": self.scores[self.token_ids].tolist(),
            }
        )

    def precision_recall(self, truth) -> tuple[float, float]:
        """Precision and recall of the flagged tokens against a known set of never-trained token ids.

        Precision is the share of flagged tokens that are in `truth`; recall the share of `truth`
        that is flagged. NaN where the denominator is empty.
        """
        if isinstance(truth, (str, bytes)) or not hasattr(truth, "__iter__"):
            raise TypeError(f"precision_recall: truth must be a collection of token ids, got {described(truth)}.")
        items = list(truth)
        for t in items:
            # int() would take 1.7 as token 1; "3" or True as a token id is a mistake too.
            if isinstance(t, bool) or not hasattr(type(t), "__index__"):
                raise TypeError(f"precision_recall: truth must hold token ids (ints), got {described(t)}.")
        truth = {operator.index(t) for t in items}
        flagged = set(self.token_ids.tolist())
        hits = len(flagged & truth)
        return (hits / len(flagged) if flagged else float("nan"), hits / len(truth) if truth else float("nan"))

    def plot(self, truth=None, **layout):
        """Every token's score as a histogram with the threshold; with `truth`, never-trained tokens apart."""

        return undertrained_figure(self, truth, **layout)

    def __repr__(self) -> str:
        return (
            f"UndertrainedTokens({len(self.token_ids)} of {len(self.scores)} tokens below {self.threshold:+.3f}; "
            f"first {self.str_tokens[:5]})"
        )


def check_threshold(threshold) -> float:
    """`threshold` as a float, checked: a real number, not NaN, not negative (`math.inf` flags every token)."""
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise TypeError(
            f"find_undertrained_tokens: threshold must be a number >= 0 (a score; tokens below it are flagged), "
            f"got {described(threshold)}."
        )
    value = float(threshold)
    if math.isnan(value) or value < 0:
        raise ValueError(
            f"find_undertrained_tokens: threshold must be a number >= 0 (scores are norms, so a negative or NaN "
            f"threshold flags nothing), got {threshold!r}."
        )
    return value


def find_undertrained_tokens(model, threshold: float | None = None) -> UndertrainedTokens:
    """Flag tokens the model (almost) never trained on, from its unembedding alone.

    Follows "Fishing for Magikarp" (Land & Bartolo, 2024): remove the direction every token shares,
    then look for rows that stayed where they started. A token that never occurs in the data only
    gets gradient through the softmax pushing its logit down, and that push is the same for every
    such token, so with the mean and the first principal component of the unembedding removed their
    rows keep only their small initial noise, while trained tokens have moved far. The paper scores
    tokens by cosine similarity to known-unused tokens; we have no such set, so the score is the
    norm of what is left.

    Args:
        model: a loaded model (`tl.load_model`).
        threshold: flag tokens scoring below this: a number >= 0 (scores are norms, so 0 flags
            nothing and `math.inf` every token). Default: the middle (geometric) of the widest gap
            between consecutive sorted log-scores among the lowest 95% of tokens, which splits the
            two clusters where they are clearly apart (small models, tied embeddings). On a large
            model with a few under-trained tokens, read the ranking in `scores` or pass a threshold.

    Returns:
        An `UndertrainedTokens`.

    Raises:
        TypeError: `model` is not a loaded model, or `threshold` is not a real number (a string, a bool).
        ValueError: `threshold` is NaN or negative (every score is >= 0, so it would flag nothing).
    """
    check_model_arg(model, "find_undertrained_tokens")
    if threshold is not None:
        threshold = check_threshold(threshold)
    with torch.no_grad():
        rows = model.W_U.detach().T.float().cpu()  # [vocab, d_model]
        rows = rows - rows.mean(0)
        first_pc = torch.linalg.svd(rows, full_matrices=False).Vh[0]
        rows = rows - (rows @ first_pc)[:, None] * first_pc
        scores = rows.norm(dim=1)
    if threshold is None:
        logs = scores.clamp_min(1e-12).log().sort().values
        # Ignore the top 5%: a handful of outlying high-norm tokens would otherwise set the gap.
        top = max(2, int(len(logs) * 0.95))
        gap = int(logs[:top].diff().argmax())
        threshold = float(((logs[gap] + logs[gap + 1]) / 2).exp())
    flagged = (scores < threshold).nonzero().flatten()
    flagged = flagged[scores[flagged].argsort()]
    return UndertrainedTokens(
        token_ids=flagged,
        str_tokens=[token_str(model, i) for i in flagged.tolist()],
        scores=scores,
        threshold=float(threshold),
    )


def inject(
    model,
    prompt: str,
    kind: str,
    where: str,
    n: int = 1,
    seed: int = 0,
    *,
    answer: str | None = None,
    prepend_bos: bool | None = None,
) -> Injection:
    """Inject out-of-distribution tokens into a prompt, keeping its operands and final position.

    Operands are the runs of tokens holding digits (with a whitespace-only token just before them,
    as Qwen2.5 writes `" 2"` as `[" ", "2"]`). Nothing is inserted into an operand or after the final
    position, and no injected token holds a digit, so the question keeps its answer.

    Args:
        model: a loaded model (`tl.load_model`).
        prompt: the clean prompt.
        kind: "random" (random vocabulary tokens), "undertrained" (tokens `find_undertrained_tokens`
            flags), "junk" (junk strings such as "@@#~"), "typo" (n edits to the word nearest the
            place), "repeat" (a prompt token repeated n times).
        where: "before" the first operand, "between" the first and last operands, "after" the last
            operand (before the final position), or "before_final" (just before the final position).
        n: how many tokens, junk strings or typo edits to inject.
        seed: seeds every random choice; the same arguments give the same injection.
        answer: if given, the prompt is resolved with `resolve_answer` first, so whitespace moved in
            from the answer (Qwen's `" "` before a digit) stays the final position.
        prepend_bos: None starts the prompt with a BOS token only where the model's tokenizer adds
            one, as `trace()` and `patch()` do; True or False overrides it (pass the same to both).

    Returns:
        An `Injection`.

    Raises:
        TypeError: `model` is not a loaded model, or `n` or `seed` is not an int.
        ValueError: an unknown kind or where, n below 1, a result longer than the model's context
            (`model.cfg.n_ctx`, checked before any token is drawn), or a prompt with no place of that
            kind (no two operands for "between", a final token that is the last operand for "after").
    """
    check_model_arg(model, "inject")
    if kind not in KINDS:
        raise ValueError(f"Unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    if where not in WHERES:
        raise ValueError(f"Unknown where {where!r}; choose one of {', '.join(WHERES)}")
    if isinstance(n, bool) or not hasattr(type(n), "__index__"):
        raise TypeError(f"n must be a positive integer (how many to inject), got {described(n)}")
    n = operator.index(n)
    if n < 1:
        raise ValueError(f"n must be a positive integer (how many to inject), got {n!r}")
    if isinstance(seed, bool) or not hasattr(type(seed), "__index__"):
        raise TypeError(f"seed must be an int, got {described(seed)}")
    seed = operator.index(seed)
    bos = 1 if prepends_bos(model, prepend_bos) else 0
    if answer is not None:
        resolved = resolve_answer(model, prompt, answer, prepend_bos=prepend_bos)
        prompt, clean = resolved.prompt, resolved.prompt_tokens.tolist()
    else:
        _check_text(prompt, "prompt")
        clean = _encode(model, prompt, bos)
    if len(clean) - bos < 2:
        raise ValueError(f"The prompt {prompt!r} is too short to inject into: it needs two tokens besides any BOS")
    if kind != "typo":
        # Every kind but "typo" adds at least n tokens (a junk string has been two or more on every
        # tokenizer tried; one is counted), so a result past the context is refused before any draw.
        _check_fits(model, len(clean), n, kind, at_least=kind == "junk")
    rng = random.Random(seed)
    operands = _operands(model, clean, bos)
    index = _place(model, clean, bos, operands, where, prompt)
    if kind == "typo":
        return _typo(model, prompt, clean, bos, operands, where, n, seed, rng)
    too_long: list[int] = []  # how many tokens each draw added that made the prompt too long
    for _ in range(MAX_TRIES):
        new = _draw(model, clean, bos, index, kind, n, rng)
        tokens = clean[:index] + new + clean[index:]
        if not _fits(model, len(tokens)):
            too_long.append(len(new))
            continue
        if _round_trips(model, tokens, bos):
            alignment = list(range(index)) + [None] * len(new) + list(range(index, len(clean)))
            return _result(model, prompt, clean, tokens, alignment, kind, where, n, seed, bos)
    if len(too_long) == MAX_TRIES:
        _check_fits(model, len(clean), min(too_long), kind, at_least=True)
    raise ValueError(
        f"Could not inject {kind!r} tokens {where!r} in {prompt!r} without them merging with their neighbours "
        f"when the text is tokenised again ({MAX_TRIES} draws); try another seed or place"
    )


def _fits(model, n_tokens: int) -> bool:
    """Whether a prompt of `n_tokens` tokens fits the model's context (`model.cfg.n_ctx`, where it has one)."""
    n_ctx = getattr(model.cfg, "n_ctx", None)
    return n_ctx is None or n_tokens <= n_ctx


def _check_fits(model, n_clean: int, n_new: int, kind: str, at_least: bool = False) -> None:
    """Refuse an injection whose result is longer than the model reads (`model.cfg.n_ctx`)."""
    if _fits(model, n_clean + n_new):
        return
    n_ctx = model.cfg.n_ctx
    raise ValueError(
        f"inject: the {kind!r} injection would be {'at least ' if at_least else ''}{n_clean + n_new} tokens "
        f"(the prompt's {n_clean} plus {n_new} injected), but {model_name(model)} reads at most n_ctx = {n_ctx}; "
        f"there is room for {max(n_ctx - n_clean, 0)} injected tokens: pass a smaller n, or shorten the prompt."
    )


def _encode(model, text: str, bos: int) -> list[int]:
    return model.to_tokens(text, prepend_bos=bool(bos), truncate=False)[0].tolist()


def _decode(model, tokens: list[int], bos: int) -> str:
    return model.tokenizer.decode(tokens[bos:])


def _round_trips(model, tokens: list[int], bos: int) -> bool:
    # Injected ids are only useful if the text written from them reads back as the same ids:
    # otherwise `resolve_answer` or `trace` on the corrupted prompt would see other tokens.
    return _encode(model, _decode(model, tokens, bos), bos) == tokens


def _has_digit(model, token: int) -> bool:
    return any(c.isdigit() for c in model.tokenizer.decode([token]))


def _operands(model, tokens: list[int], bos: int) -> list[tuple[int, int]]:
    """(start, end) of each run of digit tokens, with a whitespace-only token before it included."""
    runs: list[tuple[int, int]] = []
    i = bos
    while i < len(tokens):
        if _has_digit(model, tokens[i]):
            j = i
            while j < len(tokens) and _has_digit(model, tokens[j]):
                j += 1
            start = i - 1 if i - 1 >= bos and model.tokenizer.decode([tokens[i - 1]]).isspace() else i
            if runs and runs[-1][1] == start:  # only whitespace between two digit runs: one number
                start = runs.pop()[0]
            runs.append((start, j))
            i = j
        else:
            i += 1
    return runs


def _place(model, tokens: list[int], bos: int, operands: list[tuple[int, int]], where: str, prompt: str) -> int:
    """The index to insert at; every index lies in [bos, final], so the final token stays final."""
    final = len(tokens) - 1
    if where == "before_final":
        return final
    if not operands:
        raise ValueError(f"The prompt {prompt!r} has no operands (digits) to inject {where!r}; use 'before_final'")
    if where == "before":
        return operands[0][0]
    if where == "between":
        if len(operands) < 2:
            raise ValueError(f"The prompt {prompt!r} has one operand, so nothing is 'between' its operands")
        return operands[0][1]
    if operands[-1][1] > final:
        raise ValueError(
            f"The prompt {prompt!r} ends in its last operand, which is the final position, so nothing fits "
            "'after' it; end the prompt with a word or '=', pass answer=..., or use 'before_final'"
        )
    return operands[-1][1]


def _draw(model, tokens: list[int], bos: int, index: int, kind: str, n: int, rng: random.Random) -> list[int]:
    special = set(model.tokenizer.all_special_ids)
    if kind == "random":
        out = []
        while len(out) < n:
            t = rng.randrange(model.cfg.d_vocab)
            if t < len(model.tokenizer) and t not in special and not _has_digit(model, t):
                out.append(t)
        return out
    if kind == "undertrained":
        pool = [t for t in _undertrained_pool(model) if t not in special and not _has_digit(model, t)]
        if not pool:
            raise ValueError("find_undertrained_tokens flags no token this model can inject; use kind='random'")
        return [rng.choice(pool) for _ in range(n)]
    if kind == "junk":
        text = "".join(rng.choice(JUNK_STRINGS) for _ in range(n))
        return model.tokenizer(rng.choice(["", " "]) + text, add_special_tokens=False).input_ids
    # "repeat": a token near the place, never a digit (that would change an operand), a special token
    # (that would change the prompt's structure) or bare whitespace (hardly a token to notice).
    order = sorted(range(bos, len(tokens)), key=lambda i: (abs(i - index + 0.5), i))
    pool = [tokens[i] for i in order if tokens[i] not in special and _repeatable(model, tokens[i])]
    if not pool:
        raise ValueError("The prompt has no token to repeat (every token is a digit or a special token)")
    # Mostly the nearest token; farther ones only once the nearer ones fail to round-trip.
    pick = pool[min(int(rng.expovariate(1.0)), len(pool) - 1)]
    return [pick] * n


# The detector costs an SVD of the unembedding: remember its answer per model for later draws.
_UNDERTRAINED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _repeatable(model, token: int) -> bool:
    text = model.tokenizer.decode([token])
    return bool(text.strip()) and not any(c.isdigit() for c in text)


def _undertrained_pool(model) -> list[int]:
    if model not in _UNDERTRAINED:
        _UNDERTRAINED[model] = find_undertrained_tokens(model).token_ids.tolist()
    return _UNDERTRAINED[model]


def _typo(model, prompt, clean, bos, operands, where, n, seed, rng) -> Injection:
    """Edit the word nearest the place, keeping every other token (and so the operands) as it was."""
    final = len(clean) - 1
    first, last = (operands[0], operands[-1]) if operands else (None, None)
    if where == "before_final":
        candidates = [final - 1] if final - 1 >= bos else []
    elif where == "before":
        candidates = list(range(first[0] - 1, bos - 1, -1))
    elif where == "between":
        candidates = list(range(last[0] - 1, first[1] - 1, -1))
    else:
        candidates = list(range(last[1], final))
    words = [i for i in candidates if any(c.isalpha() for c in model.tokenizer.decode([clean[i]]))]
    if not words:
        raise ValueError(f"No word to make a typo in {where!r} the operands of {prompt!r}: the place holds no letters")
    i = words[0]
    word = model.tokenizer.decode([clean[i]])
    too_long: list[int] = []  # as in inject()
    for _ in range(MAX_TRIES):
        typo = word
        for _ in range(n):
            typo = _edit(typo, rng)
        new = model.tokenizer(typo, add_special_tokens=False).input_ids
        tokens = clean[:i] + new + clean[i + 1 :]
        if not _fits(model, len(tokens)):
            too_long.append(len(new))
            continue
        if typo != word and _round_trips(model, tokens, bos):
            alignment = list(range(i)) + [None] * len(new) + list(range(i + 1, len(clean)))
            return _result(model, prompt, clean, tokens, alignment, "typo", where, n, seed, bos)
    if len(too_long) == MAX_TRIES:
        _check_fits(model, len(clean) - 1, min(too_long), "typo", at_least=True)
    raise ValueError(f"Could not make a typo in {word!r} that reads back as tokens ({MAX_TRIES} draws)")


def _edit(word: str, rng: random.Random) -> str:
    letters = [j for j, c in enumerate(word) if c.isalpha()]
    j = rng.choice(letters)
    op = rng.choice(("duplicate", "replace", "delete") if len(letters) > 1 else ("duplicate", "replace"))
    if op == "duplicate":
        return word[: j + 1] + word[j] + word[j + 1 :]
    if op == "delete":
        return word[:j] + word[j + 1 :]
    other = rng.choice([c for c in "abcdefghijklmnopqrstuvwxyz" if c != word[j].lower()])
    return word[:j] + other + word[j + 1 :]


def _result(model, prompt, clean, tokens, alignment, kind, where, n, seed, bos: int) -> Injection:
    return Injection(
        prompt=_decode(model, tokens, bos),
        tokens=torch.tensor(tokens, dtype=torch.long),
        str_tokens=[token_str(model, t) for t in tokens],
        clean_prompt=prompt,
        clean_tokens=torch.tensor(clean, dtype=torch.long),
        clean_str_tokens=[token_str(model, t) for t in clean],
        alignment=tuple(alignment),
        injected=tuple(j for j, a in enumerate(alignment) if a is None),
        answer_position=len(tokens) - 1,
        kind=kind,
        where=where,
        n=n,
        seed=seed,
    )


# --- Damage: the corrupted trace measured against the clean reference --------------------------------

STATUSES = ("survives", "damaged", "unreadable")
# A component is a reference feature when its |DLA| is at least this share of the largest
# component's: smaller ones are the rounding of the explanation, and their ratios are noise.
COMPONENT_SHARE = 0.05


def damage_status(ratio: float) -> str:
    """Classify a feature by its ratio corrupted / reference (signed; negative = the sign flipped).

    - **survives**: `0.75 <= ratio <= 1.25`, within a quarter of its reference size (`SURVIVES_WITHIN`).
    - **unreadable**: `ratio < 0.25` (`UNREADABLE_BELOW`): it lost more than three quarters of its signed
      size, or flipped sign, so the reference's reading of it no longer holds.
    - **damaged**: everything else: `0.25 <= ratio < 0.75`, or amplified, `ratio > 1.25`. Amplification
      is damage too: the feature no longer carries the reference's amount, so the clean explanation
      ("this head writes this much of the answer") is wrong for the corrupted prompt, whether the
      injected tokens feed it or another path has been switched off and it compensates.

    NaN (no reference to compare with) is unreadable.
    """
    if not ratio >= UNREADABLE_BELOW:  # NaN lands here too
        return "unreadable"
    if 1 - SURVIVES_WITHIN <= ratio <= 1 + SURVIVES_WITHIN:
        return "survives"
    return "damaged"


@dataclass(frozen=True)
class DamageReport(MadeByModelFields):
    """A corrupted trace measured against its clean reference, at the answer (final) position.

    Attributes:
        reference_label: what the reference explained (`model: 'prompt' -> 'answer'`).
        corrupted_label: the same for the corrupted trace.
        answer: the answer token both traces track.
        metric: the DLA metric both traces used (`"logit"` or `"logit_diff"`).
        reference_logit_diff: the reference's answer logit minus its mean distractor logit.
        corrupted_logit_diff: the same for the corrupted trace.
        reference_rank: the answer's zero-based rank in the reference (0 = top prediction).
        corrupted_rank: the same in the corrupted trace.
        entry_labels: the lens entries along depth (`"0_pre"`, `"0_mid"`, ..., `"final_post"`).
        reference_curves: `[lens, entry]`, the reference's logit difference along depth, lens in
            `LENSES` order (standard, then the cached-scale DLA lens).
        corrupted_curves: `[lens, entry]`, the same for the corrupted trace.
        reference_readable: per lens, the entry from which the answer is top-1 to the end, or None.
        corrupted_readable: the same for the corrupted trace.
        features: the reference features: components above `COMPONENT_SHARE` of the largest
            component's |DLA|, then the top-k heads by |DLA| (`"L2H3"`).
        kinds: `"component"` or `"head"`, one per feature.
        reference: `[feature]`, each feature's DLA in the reference.
        corrupted: `[feature]`, its DLA in the corrupted trace.
        model_name, weights_fingerprint: the model both traces came from (`identity`); empty where unknown.
    """

    reference_label: str
    corrupted_label: str
    answer: str
    metric: str
    reference_logit_diff: float
    corrupted_logit_diff: float
    reference_rank: int
    corrupted_rank: int
    entry_labels: list[str]
    reference_curves: Float[Tensor, "lens entry"]
    corrupted_curves: Float[Tensor, "lens entry"]
    reference_readable: tuple[str | None, str | None]
    corrupted_readable: tuple[str | None, str | None]
    features: list[str]
    kinds: list[str]
    reference: Float[Tensor, " feature"]
    corrupted: Float[Tensor, " feature"]

    def __post_init__(self) -> None:
        curves = (len(LENSES), len(self.entry_labels))
        for name in ("reference_curves", "corrupted_curves"):
            if tuple(getattr(self, name).shape) != curves:
                raise ValueError(
                    f"DamageReport.{name} must be [lens, entry] = {curves}, got {tuple(getattr(self, name).shape)}"
                )
        n = (len(self.features),)
        for name in ("reference", "corrupted"):
            if tuple(getattr(self, name).shape) != n:
                raise ValueError(f"DamageReport.{name} must be [feature] = {n}, got {tuple(getattr(self, name).shape)}")
        if len(self.kinds) != len(self.features) or not set(self.kinds) <= {"component", "head"}:
            raise ValueError("kinds must hold 'component' or 'head' for each feature")
        for name in ("reference_readable", "corrupted_readable"):
            readable = getattr(self, name)
            if len(readable) != len(LENSES) or any(r is not None and r not in self.entry_labels for r in readable):
                raise ValueError(f"DamageReport.{name} must hold one entry label (or None) per lens {LENSES}")

    @property
    def margin_drop(self) -> float:
        """Reference logit difference minus corrupted: positive when the corruption hurt the answer."""
        return self.reference_logit_diff - self.corrupted_logit_diff

    @property
    def ratio(self) -> Float[Tensor, " feature"]:
        """corrupted / reference per feature, signed (negative: the sign flipped)."""
        return self.corrupted / self.reference

    @property
    def statuses(self) -> list[str]:
        """The status per feature: "survives", "damaged" or "unreadable" (`damage_status`)."""
        return [damage_status(r) for r in self.ratio.tolist()]

    @property
    def curve_shift(self) -> Float[Tensor, "lens entry"]:
        """Corrupted minus reference logit difference along depth, per lens."""
        return self.corrupted_curves - self.reference_curves

    def readable_shift(self, lens: str = "standard") -> int | None:
        """How many entries later (positive) or earlier the answer becomes readable after corruption.

        None when either trace never makes the answer readable by that lens (see `readable_from`).
        """
        if lens not in LENSES:
            raise ValueError(f"lens must be one of {LENSES}, got {lens!r}")
        i = LENSES.index(lens)
        ref, cor = self.reference_readable[i], self.corrupted_readable[i]
        if ref is None or cor is None:
            return None
        return self.entry_labels.index(cor) - self.entry_labels.index(ref)

    def counts(self) -> dict[str, int]:
        """How many features survive, are damaged, are unreadable (every status, zeros included)."""
        statuses = self.statuses
        return {s: statuses.count(s) for s in STATUSES}

    def to_frame(self) -> pd.DataFrame:
        """One line per feature: feature, kind, reference, corrupted, ratio, status."""
        return pd.DataFrame(
            {
                "feature": [unit_label(f) for f in self.features],
                "kind": self.kinds,
                "reference": self.reference.tolist(),
                "corrupted": self.corrupted.tolist(),
                "ratio": self.ratio.tolist(),
                "status": self.statuses,
            }
        )

    def top(self, k: int = 5) -> pd.DataFrame:
        """The k features that changed most (largest |corrupted - reference|), signs kept."""
        k = check_k(k)
        frame = self.to_frame()
        order = (self.corrupted - self.reference).abs().argsort(descending=True, stable=True)[:k].tolist()
        return frame.iloc[order].reset_index(drop=True)

    def plot(self, **layout):
        """Readability curves (reference vs corrupted) and each feature's ratio against the thresholds."""

        return plotting.damage_figure(self, **layout)

    def _readable_text(self, lens: str) -> str:
        i = LENSES.index(lens)
        shift = self.readable_shift(lens)
        ref, cor = self.reference_readable[i], self.corrupted_readable[i]
        shown = [unit_label(x) if x else "never" for x in (ref, cor)]
        return f"{shown[0]} -> {shown[1]}" + (f" ({shift:+d} entries)" if shift is not None else "")

    def __repr__(self) -> str:
        counts = ", ".join(f"{n} {s}" for s, n in self.counts().items())
        return (
            f"DamageReport({self.answer!r}: logit diff {self.reference_logit_diff:+.3f} -> "
            f"{self.corrupted_logit_diff:+.3f} (drop {self.margin_drop:+.3f}), rank {self.reference_rank} -> "
            f"{self.corrupted_rank}; readable {self._readable_text('standard')} (standard), "
            f"{self._readable_text('dla')} (dla); {len(self.features)} features: {counts})"
        )


def _model_shape(trace) -> tuple[int, int, list[str]]:
    return trace.dla.heads.shape[0], trace.dla.heads.shape[1], list(trace.dla.component_labels)


def damage_report(reference, corrupted, row: int = 0, k: int = 5, *, corrupted_row: int | None = None) -> DamageReport:
    """Measure a corrupted trace against its clean reference: margin, readability, features.

    Everything is read at the final position, which predicts the answer (`inject` keeps it final),
    so `reference` may be a trace loaded with `tl.load_reference(path)` and no model.

    A feature is every component whose reference |DLA| is at least `COMPONENT_SHARE` (5%) of the
    largest component's, plus the `k` heads with the largest reference |DLA|. Each gets the ratio
    corrupted / reference (signed) and a status (`damage_status`): **survives** for
    `0.75 <= ratio <= 1.25`, **unreadable** for `ratio < 0.25` (sign flips included), **damaged**
    otherwise (`0.25 <= ratio < 0.75`, or amplified past 1.25: no longer the reference's amount).
    A status says whether the reference's reading of a feature still holds, not whether the answer
    suffered: a feature that pushed against the answer and goes unreadable helps it. The reference
    value's sign (`to_frame()["reference"]`) says which way the feature pushed.

    Args:
        reference: the clean `Trace` (`tl.trace(model, prompt, answer)`, or `tl.load_reference`).
        corrupted: the `Trace` of the corrupted prompt, same model, answer, distractors and metric:
            `tl.trace(model, injection.prompt, answer)`.
        row: which row of each trace to measure (row r of one with row r of the other).
        k: how many top heads to follow.
        corrupted_row: the corrupted trace's row to measure against the reference's `row`, where
            the two traces' rows are not in the same order (default: `row`).

    Returns:
        A `DamageReport`; `.to_frame()` lists the features, `.counts()` the statuses, `.plot()` draws both.

    Raises:
        TypeError: `reference` or `corrupted` is not a `Trace`, or `row` is not an int.
        ModelMismatchError: the traces come from two different models (names and fingerprints given).
        ValueError: the traces come from differently shaped models, use different DLA metrics,
            track different answer tokens or distractors, or have no row `row`.
    """
    check_trace_arg(reference, "damage_report", "reference")
    check_trace_arg(corrupted, "damage_report", "corrupted")
    k = check_k(k)
    row = check_row(row, len(reference.rows), "damage_report", "the reference trace")
    c_row = check_row(
        row if corrupted_row is None else corrupted_row, len(corrupted.rows), "damage_report", "the corrupted trace"
    )
    (ra_layers, ra_heads, ra_comp), (rb_layers, rb_heads, rb_comp) = _model_shape(reference), _model_shape(corrupted)
    if (ra_layers, ra_heads, ra_comp) != (rb_layers, rb_heads, rb_comp):
        raise ValueError(
            f"The traces come from differently shaped models: the reference ({reference.model_name!r}) has "
            f"{ra_layers} layers x {ra_heads} heads and components {ra_comp}, the corrupted trace "
            f"({corrupted.model_name!r}) {rb_layers} layers x {rb_heads} heads and {rb_comp}. Trace the corrupted "
            "prompt with the model the reference was traced with."
        )
    # Two models of one shape (a fine-tune, other weights) pass the shape check; their DLA does not compare.
    check_same_model(reference.identity, corrupted.identity, "The reference", "the corrupted trace")
    if reference.dla.metric != corrupted.dla.metric:
        raise ValueError(
            f"The traces explain different DLA metrics ({reference.dla.metric!r} in the reference, "
            f"{corrupted.dla.metric!r} in the corrupted trace); trace the corrupted prompt with "
            f"metric={reference.dla.metric!r}."
        )
    a, b = reference.rows[row], corrupted.rows[c_row]
    if a.target != b.target:
        raise ValueError(
            f"The traces track different answer tokens: {a.target_str!r} (id {a.target}) in the reference, "
            f"{b.target_str!r} (id {b.target}) in the corrupted trace. Trace the corrupted prompt with the "
            "reference's answer."
        )
    ra, rb = reference.distractors[row], corrupted.distractors[c_row]
    if list(ra) != list(rb):
        raise ValueError(
            f"The traces measure the margin against different distractors: {reference.margin.distractor_strs[row]} "
            f"in the reference, {corrupted.margin.distractor_strs[c_row]} in the corrupted trace, so their logit "
            f"differences do not compare. Trace the corrupted prompt with distractors={ra}."
        )
    ref_comp = reference.dla.components[:, row].detach().cpu().double()
    cor_comp = corrupted.dla.components[:, c_row].detach().cpu().double()
    largest = ref_comp.abs().max().item()
    picked = [i for i, v in enumerate(ref_comp.abs().tolist()) if v > 0 and v >= COMPONENT_SHARE * largest]
    ref_heads = reference.dla.heads[:, :, row].detach().cpu().double().flatten()
    cor_heads = corrupted.dla.heads[:, :, c_row].detach().cpu().double().flatten()
    n_heads = reference.dla.heads.shape[1]
    top = ref_heads.abs().argsort(descending=True, stable=True)[:k].tolist()
    top = [i for i in top if ref_heads[i] != 0]  # a zero has no ratio
    features = [ra_comp[i] for i in picked] + [f"L{i // n_heads}H{i % n_heads}" for i in top]

    def curves(t, r: int) -> Tensor:
        return torch.stack([getattr(t.lens, lens).logit_diff[:, r].detach().cpu().double() for lens in LENSES])

    return DamageReport(
        reference_label=f"{reference.model_name}: {a.label}",
        corrupted_label=f"{corrupted.model_name}: {b.label}",
        answer=a.target_str,
        metric=reference.dla.metric,
        reference_logit_diff=reference.margin.logit_diff[row].item(),
        corrupted_logit_diff=corrupted.margin.logit_diff[c_row].item(),
        reference_rank=int(reference.margin.rank[row]),
        corrupted_rank=int(corrupted.margin.rank[c_row]),
        entry_labels=list(reference.lens.labels),
        reference_curves=curves(reference, row),
        corrupted_curves=curves(corrupted, c_row),
        reference_readable=tuple(reference.lens.readable_from(row, lens) for lens in LENSES),
        corrupted_readable=tuple(corrupted.lens.readable_from(c_row, lens) for lens in LENSES),
        features=features,
        kinds=["component"] * len(picked) + ["head"] * len(top),
        reference=torch.cat([ref_comp[picked], ref_heads[top]]),
        corrupted=torch.cat([cor_comp[picked], cor_heads[top]]),
        model_name=reference.model_name if reference.weights_fingerprint else corrupted.model_name,
        weights_fingerprint=reference.weights_fingerprint or corrupted.weights_fingerprint,
    )
