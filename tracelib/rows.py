"""What a trace explains: one row per prompt and answer step, with its tokens, target and distractors."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from jaxtyping import Int
from torch import Tensor

from tracelib.answers import ResolvedAnswer, _single_token, resolve_answer, token_str

_DIGITS = "0123456789"


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


def _per_prompt(distractors, n_prompts: int) -> list | None:
    """`distractors` as one entry per prompt, where it is a list of lists (or None entries) that long;
    else None (one set for every prompt)."""
    if not isinstance(distractors, (list, tuple)) or not distractors:
        return None
    nested = [d is None or isinstance(d, (list, tuple)) for d in distractors]
    if not any(nested):
        return None
    if not all(nested) or len(distractors) != n_prompts:
        raise ValueError(
            f"distractors: pass one set of tokens for every prompt, or one list per prompt ({n_prompts} lists, "
            f"None for the default); got {len(distractors)} entries, {sum(nested)} of them lists."
        )
    return list(distractors)


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
    generator works). `distractors` is one set for every prompt, or a list of one set (or None) per prompt.
    """
    prompts = [prompts] if _is_one(prompts) else list(prompts)
    if not prompts:
        raise ValueError("trace() needs at least one prompt.")
    answers = [answer] * len(prompts) if _is_one(answer) else list(answer)
    if len(answers) != len(prompts):
        raise ValueError(f"Got {len(prompts)} prompts but {len(answers)} answers; pass one answer, or one per prompt.")
    per_prompt = _per_prompt(distractors, len(prompts))
    rows = []
    defaults: dict[int, list[int]] = {}  # default_distractors tokenises: once per target
    for i, (prompt, ans) in enumerate(zip(prompts, answers)):
        resolved = (
            ans
            if isinstance(ans, ResolvedAnswer)
            else resolve_answer(model, prompt, ans, allow_byte_fragments=allow_byte_fragments, prepend_bos=prepend_bos)
        )
        chosen = _distractor_ids(model, per_prompt[i] if per_prompt else distractors, resolved)
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


def _fill_distractors(rows: list[Row], logits: Tensor) -> list[list[int]]:
    """Each row's rivals; rows without any get the model's strongest non-answer token."""
    out = [list(row.distractors) for row in rows]
    need = [i for i, row in enumerate(rows) if not row.distractors]
    if need:
        ranked = logits[need].topk(2).indices.tolist()  # one topk for every row that needs it
        for i, (first, second) in zip(need, ranked):
            out[i] = [second if first == rows[i].target else first]
    return out
