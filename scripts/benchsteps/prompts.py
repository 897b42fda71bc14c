"""The prompts the steps run: a PROMPT_TOKENS-token one, its one-token corruption, batches and long prompts."""

from __future__ import annotations

import tracelib as tl
from benchsteps.steps import ANSWER, BATCH_PROMPTS, PROMPT_TOKENS

# The patching step's prompts on the bundled model; the other models use a PROMPT_TOKENS-token
# prompt and a copy of it with one digit changed (`corrupt_prompt`).
TINY_PATCH = ("what is 1 + 1", "what is 3 + 1")
# The real fixture's running example: (clean prompt, corrupted prompt, answer). The corruption
# really changes the answer ("3" beats "2").
SMOLLM2_TASK = ("what is 1 + 1 = ", "what is 1 + 2 = ", "2")
# Words to pad prompts to exactly PROMPT_TOKENS tokens; every tokenizer here knows them.
_FILLER = ("Q:", "what", "is", "1", "+", "1", "and", "what", "is", "3", "+", "4", "so")


def pick_prompt(model, answer: str = ANSWER):
    """A prompt whose resolved tokens (BOS and any moved whitespace included) number PROMPT_TOKENS."""
    for start in range(len(_FILLER)):
        for end in range(start + 1, len(_FILLER) + 1):
            prompt = " ".join(_FILLER[start:end])
            resolved = tl.resolve_answer(model, prompt, answer)
            if len(resolved.prompt_tokens) == PROMPT_TOKENS and resolved.is_single_token:
                return resolved
    raise RuntimeError(f"no {PROMPT_TOKENS}-token prompt found for this tokenizer")


def corrupt_prompt(model, resolved):
    """`resolved`'s prompt with one digit changed, so that exactly one of its tokens differs."""
    prompt = resolved.prompt
    for i, ch in enumerate(prompt):
        if not ch.isdigit():
            continue
        for digit in "3456789012":
            if digit == ch:
                continue
            other = tl.resolve_answer(model, prompt[:i] + digit + prompt[i + 1 :], resolved.answer)
            a, b = resolved.prompt_tokens, other.prompt_tokens
            if other.is_single_token and len(a) == len(b) and int((a != b).sum()) == 1:
                return other
    raise RuntimeError(f"no one-token corruption of {prompt!r} found")


def fixed_task(source: str) -> tuple[str, str, str] | None:
    """(clean, corrupted, answer) for a model with a task of its own (the bundled and the real fixture)."""
    if source == "tiny-arith":
        return (*TINY_PATCH, ANSWER)
    if source.endswith(".gguf"):
        return SMOLLM2_TASK
    return None


def step_prompt(model, source: str):
    """The prompt the one-prompt steps run: the real fixture's running example, else a PROMPT_TOKENS-token one."""
    if source.endswith(".gguf"):
        clean, _, answer = SMOLLM2_TASK
        return tl.resolve_answer(model, clean, answer)
    return pick_prompt(model)


def patch_prompts(model, source: str):
    """(clean, corrupted) resolved prompts for the patching step."""
    task = fixed_task(source)
    if task is not None:
        clean, corrupted, answer = task
        return tl.resolve_answer(model, clean, answer), tl.resolve_answer(model, corrupted, answer)
    clean = pick_prompt(model)
    return clean, corrupt_prompt(model, clean)


def batch_prompts() -> tuple[list[str], list[str]]:
    """BATCH_PROMPTS sums with one-digit answers, in four phrasings."""
    prompts, answers = [], []
    for form in ("what is {a} + {b}", "{a} + {b} =", "compute {a} + {b}", "what's {a} plus {b}"):
        for a in range(10):
            for b in range(10 - a):
                prompts.append(form.format(a=a, b=b))
                answers.append(f" {a + b}")
    return prompts[:BATCH_PROMPTS], answers[:BATCH_PROMPTS]


def long_prompt(model, length: int):
    """A prompt whose resolved tokens number `length` (within a token or two), answer ANSWER."""
    ids = model.tokenizer("what is 1 + 1 and 2 + 3 and " * (length // 4 + 8), add_special_tokens=False).input_ids
    resolved = None
    for cut in range(length, 0, -1):
        prompt = model.tokenizer.decode(ids[:cut]).rstrip() + " so 1 + 1 ="
        try:
            resolved = tl.resolve_answer(model, prompt, ANSWER)
        except tl.PromptTooLongError:
            continue
        if len(resolved.prompt_tokens) <= length:
            return resolved
    raise RuntimeError(f"no prompt of at most {length} tokens found")
