"""Answer resolution: turn what the user typed into the tokens the model really predicts.

The same answer string tokenises differently across models. On GPT-2 `" 2"` is one token; on
Qwen2.5 (and the bundled `tiny-arith`) a space before a digit is its own token, so `" 2"` is
`[" ", "2"]`. A BOS token starts the prompt only where the model's own tokenizer adds one
(`tokenizer(prompt)`), as `transformers` would feed it: GPT-2's, Qwen2.5's and SmolLM2's add none,
Llama-2's does. TransformerLens prepends one by default; tracelib follows the tokenizer instead, so
the prediction it explains is the one the model really makes. `prepend_bos=` overrides the rule.

Tracing `" "` would explain the wrong prediction, so `resolve_answer` moves such whitespace into
the prompt and traces the rest.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import re
import weakref
from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from torch import Tensor


class MultiTokenAnswerError(ValueError):
    """An analysis needs a single-token answer and the answer is several tokens."""


class PromptTooLongError(ValueError):
    """Prompt plus answer do not fit the model's context window."""


class EmptyInputError(ValueError):
    """The prompt or the answer is empty."""


class ByteFragmentError(ValueError):
    """The answer splits into tokens that are pieces of a UTF-8 character, not characters."""


@dataclass(frozen=True)
class AnswerStep:
    """One teacher-forced step of an answer: predict `target` after `tokens`."""

    tokens: Int[Tensor, " pos"]
    target: int
    target_str: str
    index: int

    def __repr__(self) -> str:
        return f"AnswerStep({self.index}: {len(self.tokens)} tokens -> {self.target_str!r})"


@dataclass(frozen=True)
class ResolvedAnswer:
    """What the model is asked to predict, token by token.

    Attributes:
        prompt: the prompt actually traced (with any whitespace moved in from the answer).
        answer: the answer actually traced (without that whitespace).
        prompt_tokens: token ids of `prompt`, as `tokenizer(prompt)` gives them (BOS included where it adds one).
        prompt_str_tokens: the same as strings.
        answer_tokens: token ids of `answer`, in the context of the prompt.
        answer_str_tokens: the same as strings.
        prepended_bos: whether a BOS token starts `prompt_tokens` (where the tokenizer adds one,
            or `prepend_bos=True` asked for it).
        moved_whitespace: whitespace taken from the front of the typed answer ('' if none).
        notes: plain-language remarks on every adjustment made.
        typed_prompt, typed_answer: what the user passed in.
    """

    prompt: str
    answer: str
    prompt_tokens: Int[Tensor, " pos"]
    prompt_str_tokens: list[str]
    answer_tokens: list[int]
    answer_str_tokens: list[str]
    prepended_bos: bool
    moved_whitespace: str
    typed_prompt: str
    typed_answer: str
    notes: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.prompt_tokens.ndim != 1 or len(self.prompt_tokens) != len(self.prompt_str_tokens):
            raise ValueError(
                f"prompt_tokens {tuple(self.prompt_tokens.shape)} and prompt_str_tokens "
                f"({len(self.prompt_str_tokens)}) must be one aligned 1-d sequence"
            )
        if len(self.answer_tokens) != len(self.answer_str_tokens) or not self.answer_tokens:
            raise ValueError("answer_tokens and answer_str_tokens must be aligned and non-empty")

    @property
    def is_single_token(self) -> bool:
        """Whether the traced answer is one token."""
        return len(self.answer_tokens) == 1

    @property
    def token(self) -> int:
        """The single answer token; raises `MultiTokenAnswerError` if there are several."""
        self.require_single_token()
        return self.answer_tokens[0]

    @property
    def steps(self) -> list[AnswerStep]:
        """The answer as teacher-forced steps: step i sees the prompt plus answer tokens before i."""
        out = []
        for i, (target, target_str) in enumerate(zip(self.answer_tokens, self.answer_str_tokens)):
            prefix = torch.tensor(self.answer_tokens[:i], dtype=self.prompt_tokens.dtype)
            out.append(AnswerStep(torch.cat([self.prompt_tokens, prefix]), target, target_str, i))
        return out

    def require_single_token(self) -> ResolvedAnswer:
        """Return self if the answer is one token, else raise an error that shows the split."""
        if self.is_single_token:
            return self
        moved = (
            f" (after moving the leading {self.moved_whitespace!r} into the prompt)" if self.moved_whitespace else ""
        )
        raise MultiTokenAnswerError(
            f"The answer {self.typed_answer!r} is {len(self.answer_tokens)} tokens for this "
            f"model{moved}: {self.answer_str_tokens}. This analysis needs one token. Either trace "
            f"the first token, answer={self.answer_str_tokens[0]!r}, or trace every token in turn "
            "with `resolve_answer(...).steps` (teacher-forced)."
        )

    def __repr__(self) -> str:
        bos = ", BOS" if self.prepended_bos else ""
        return (
            f"ResolvedAnswer({self.prompt!r} -> {self.answer_str_tokens}; {len(self.prompt_tokens)} prompt tokens{bos})"
        )


def _check_text(value, what: str) -> str:
    if isinstance(value, (bytes, bytearray)):
        raise TypeError(
            f"The {what} is bytes ({value!r}), but tracelib reads text: decode it first, "
            f"{what}.decode('utf-8'), and pass the string."
        )
    if not isinstance(value, str):
        raise TypeError(f"The {what} must be a string, got {type(value).__name__}: {value!r}")
    if not value.strip():
        raise EmptyInputError(
            f"The {what} is empty ({value!r}). Pass some text, e.g. prompt='what is 1 + 1', answer=' 2'."
        )
    return value


# tokenizer -> whether it adds a BOS; weak, so a deleted model's tokenizer is not kept alive.
_ADDS_BOS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _tokenizer_adds_bos(tokenizer) -> bool:
    cached = _ADDS_BOS.get(tokenizer)
    if cached is not None:
        return cached
    bos = tokenizer.bos_token_id
    ids = tokenizer("1 + 1")["input_ids"] if bos is not None else []
    adds = bool(ids) and ids[0] == bos
    _ADDS_BOS[tokenizer] = adds
    return adds


def prepends_bos(model, prepend_bos: bool | None = None) -> bool:
    """Whether a prompt's tokens start with a BOS token: where the model's tokenizer adds one.

    Args:
        model: a loaded model.
        prepend_bos: None follows the tokenizer (`tokenizer(prompt)` starts with its BOS or not);
            True or False overrides it.

    Raises:
        ValueError: `prepend_bos=True` for a tokenizer that has no BOS token.
        TypeError: `prepend_bos` is neither None nor a bool.
    """
    if prepend_bos is None:
        # `tl.load_model` records what the checkpoint's own tokenizer does (TransformerLens's copy
        # of it is set to always add a BOS); for other models, ask the tokenizer we have.
        adds = getattr(model, "tracelib_adds_bos", None)
        return _tokenizer_adds_bos(model.tokenizer) if adds is None else adds
    if not isinstance(prepend_bos, bool):
        raise TypeError(f"prepend_bos must be True, False or None (follow the tokenizer), got {prepend_bos!r}")
    if prepend_bos and model.tokenizer.bos_token_id is None:
        raise ValueError(
            f"prepend_bos=True, but this model's tokenizer ({type(model.tokenizer).__name__}) has no BOS token. "
            "Leave prepend_bos=None to follow the tokenizer."
        )
    return prepend_bos


def _ids(model, text: str, prepend_bos: bool) -> list[int]:
    return model.to_tokens(text, prepend_bos=prepend_bos, truncate=False)[0].tolist()


def _str_tokens(model, ids: list[int]) -> list[str]:
    return [token_str(model, i) for i in ids]


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@functools.cache
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, character -> byte (GPT-2, Qwen2.5 and tiny-arith use it)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}


def token_bytes(model, token: int) -> bytes | None:
    """The raw bytes a token stands for, or None when the tokenizer's vocabulary does not say.

    Reads sentencepiece's byte-fallback tokens (`"<0xC3>"`) and byte-level BPE tokens (`"Ã"`).
    """
    piece = model.tokenizer.convert_ids_to_tokens(int(token))
    if not isinstance(piece, str):
        return None
    match = _BYTE_FALLBACK.fullmatch(piece)
    if match:
        return bytes([int(match.group(1), 16)])
    alphabet = _byte_level_alphabet()
    if piece and all(char in alphabet for char in piece):
        return bytes(alphabet[char] for char in piece)
    return None


def _byte_label(data: bytes) -> str:
    """Bytes as text where they form characters, and as `<0xC3>` where they do not."""
    out, i = [], 0
    while i < len(data):
        for n in range(1, 5):  # a UTF-8 character is 1 to 4 bytes
            try:
                out.append(data[i : i + n].decode("utf-8"))
            except UnicodeDecodeError:
                continue
            i += n
            break
        else:
            out.append(f"<0x{data[i]:02X}>")
            i += 1
    return "".join(out)


def is_byte_fragment(model, token: int) -> bool:
    """Whether a token is part of a UTF-8 character rather than whole characters."""
    if "\ufffd" not in model.tokenizer.decode([int(token)]):
        return False
    data = token_bytes(model, token)
    if data is None:
        return True  # the tokenizer decodes it to the replacement character: no character of its own
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


# While `decoding_once()` is active: (tokenizer id, token) -> token_str's answer.
_DECODED: contextvars.ContextVar[dict | None] = contextvars.ContextVar("tracelib_decoded", default=None)


@contextlib.contextmanager
def decoding_once():
    """Within this block, `token_str` decodes each token once and reuses the text.

    A trace of many rows labels the same few tokens thousands of times; the tokenizer's `decode`
    dominates that work. The cache lives only as long as the block (a tokenizer never changes
    during one call).
    """
    if _DECODED.get() is not None:  # nested: the outer block's cache serves
        yield
        return
    reset = _DECODED.set({})
    try:
        yield
    finally:
        _DECODED.reset(reset)


def token_str(model, token: int) -> str:
    """A token as text, for labels: its decoded string, or `'<0xC3>'`-style bytes for a fragment.

    Byte-level tokenizers split a character such as `"é"` into byte tokens that each decode to
    `"\ufffd"`; labelling them by their bytes keeps them apart.
    """
    cache = _DECODED.get()
    if cache is None:
        return _token_str(model, token)
    key = (id(model.tokenizer), int(token))
    text = cache.get(key)
    if text is None:
        text = cache[key] = _token_str(model, token)
    return text


def _token_str(model, token: int) -> str:
    text = model.tokenizer.decode([int(token)])
    if "\ufffd" not in text:
        return text
    data = token_bytes(model, token)
    return text if data is None else _byte_label(data)


def resolve_answer(
    model,
    prompt: str,
    answer: str,
    *,
    single_token: bool = False,
    allow_byte_fragments: bool = False,
    prepend_bos: bool | None = None,
) -> ResolvedAnswer:
    """Resolve a prompt and an answer into the token(s) the model must predict.

    The answer's tokens are read off the tokenisation of `prompt + answer`, so they are the tokens
    the model would really produce after this prompt. Two adjustments are made, each recorded in
    `notes`:
    - if the prompt already ends in whitespace, leading whitespace is dropped from the answer (a
      chat template's `"assistant\\n"` then `" 2"` means `"2"`);
    - if the answer starts with a token that is only whitespace and more tokens follow (Qwen2.5's
      `" 2"` -> `[" ", "2"]`), that whitespace moves into the prompt and the rest is traced.

    Args:
        model: a loaded model (`tl.load_model`).
        prompt: the text the model reads.
        answer: the continuation to explain, usually with its leading space (`" 2"`).
        single_token: raise `MultiTokenAnswerError` unless the answer is one token.
        allow_byte_fragments: trace an answer whose tokens are pieces of a UTF-8 character (a
            byte-level tokenizer's `"é"` -> `[<0xC3>, <0xA9>]`), one byte per step. Off by default.
        prepend_bos: None (the default) starts the prompt with a BOS token only where the model's
            tokenizer adds one; True or False overrides it.

    Returns:
        A `ResolvedAnswer`; multi-token answers carry teacher-forced `steps`.

    Raises:
        ByteFragmentError: the answer's tokens are byte fragments and `allow_byte_fragments` is off.
    """
    typed_prompt, typed_answer = _check_text(prompt, "prompt"), _check_text(answer, "answer")
    notes = []
    if prompt[-1].isspace() and answer[0].isspace():
        answer = answer.lstrip()
        notes.append(
            f"The prompt ends in whitespace, so the answer's leading whitespace was dropped: "
            f"{typed_answer!r} -> {answer!r}."
        )
    bos = prepends_bos(model, prepend_bos)
    prompt_ids = _ids(model, prompt, bos)
    full_ids = _ids(model, prompt + answer, bos)
    if full_ids[: len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids):
        answer_ids = full_ids[len(prompt_ids) :]
    else:
        # The tokenizer merges across the boundary (e.g. GPT-2 with a prompt ending in a space):
        # tokenise the answer on its own, which is what teacher forcing will feed.
        answer_ids = _ids(model, answer, False)
        notes.append(
            "The prompt's last token merges with the answer's first when written together; the "
            f"answer was tokenised on its own. Written together they are {_str_tokens(model, full_ids[-4:])}."
        )
    moved = ""
    first = model.tokenizer.decode([answer_ids[0]])
    if len(answer_ids) > 1 and first.isspace():
        moved = first
        prompt, answer = prompt + first, answer[len(first) :]
        prompt_ids, answer_ids = prompt_ids + answer_ids[:1], answer_ids[1:]
        notes.append(
            f"This tokenizer makes the leading {first!r} its own token, so it was moved into the "
            f"prompt and the model is traced predicting {_str_tokens(model, answer_ids)}."
        )
    fragments = [i for i in answer_ids if is_byte_fragment(model, i)]
    if fragments and not allow_byte_fragments:
        shown = ", ".join(f"{i} = {token_bytes(model, i) or '?'!r}" for i in fragments)
        raise ByteFragmentError(
            f"The answer {typed_answer!r} splits into tokens {_str_tokens(model, answer_ids)}, and "
            f"{len(fragments)} of them are byte fragments, not characters (token id = bytes: {shown}). "
            "Each decodes to '\ufffd' on its own, so the model would be traced predicting part of a "
            "character. Pass allow_byte_fragments=True to trace them byte by byte anyway, or pick an "
            "answer this tokenizer writes in whole characters."
        )
    if fragments:
        notes.append(f"The answer's tokens include byte fragments: {_str_tokens(model, fragments)}.")
    n_ctx = model.cfg.n_ctx
    if len(prompt_ids) + len(answer_ids) - 1 > n_ctx:
        raise PromptTooLongError(
            f"The prompt and answer take {len(prompt_ids) + len(answer_ids) - 1} tokens, more than "
            f"this model's context of {n_ctx}. Shorten the prompt (keep its end: the answer is "
            "predicted from the last position)."
        )
    resolved = ResolvedAnswer(
        prompt=prompt,
        answer=answer,
        prompt_tokens=torch.tensor(prompt_ids, dtype=torch.long),
        prompt_str_tokens=_str_tokens(model, prompt_ids),
        answer_tokens=answer_ids,
        answer_str_tokens=_str_tokens(model, answer_ids),
        prepended_bos=bos,
        moved_whitespace=moved,
        typed_prompt=typed_prompt,
        typed_answer=typed_answer,
        notes=tuple(notes),
    )
    return resolved.require_single_token() if single_token else resolved


def answer_direction(
    model, answer: ResolvedAnswer | int | str, distractor: ResolvedAnswer | int | str | None = None
) -> Float[Tensor, " d_model"]:
    """The residual-stream direction whose dot product with the final residual gives the logit.

    With a distractor, the difference of the two directions: the logit difference's direction.
    Uses TransformerLens's `tokens_to_residual_directions` (the unembedding's columns).
    """
    direction = model.tokens_to_residual_directions(_single_token(model, answer))
    if distractor is not None:
        direction = direction - model.tokens_to_residual_directions(_single_token(model, distractor))
    return direction


def _single_token(model, token: ResolvedAnswer | int | str) -> int:
    if isinstance(token, ResolvedAnswer):
        return token.token
    if isinstance(token, str):
        if not token:
            raise EmptyInputError("The token string is empty; pass e.g. ' 2'.")
        ids = _ids(model, token, False)
        if len(ids) != 1:
            raise MultiTokenAnswerError(
                f"{token!r} is {len(ids)} tokens for this model: {_str_tokens(model, ids)}. Pass one "
                "token, or resolve the answer with tl.resolve_answer(model, prompt, answer) first."
            )
        return ids[0]
    if isinstance(token, (bytes, bytearray)):
        raise TypeError(f"The token {token!r} is bytes; decode it first, token.decode('utf-8'), and pass the string.")
    if isinstance(token, int) and not isinstance(token, bool):
        if not 0 <= token < model.cfg.d_vocab:
            raise ValueError(f"Token id {token} is outside the vocabulary (0..{model.cfg.d_vocab - 1}).")
        return token
    raise TypeError(f"Expected a ResolvedAnswer, a token string or a token id, got {token!r}")


def chat_prompt(model, question: str, *, system: str | None = None) -> str:
    """Wrap a question in the model's chat template, ready for the assistant's reply.

    Instruct models (Qwen2.5-Instruct, `tiny-arith-chat`) are trained on this format; a bare
    question is out of distribution for them.
    """
    _check_text(question, "question")
    tokenizer = model.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"{type(tokenizer).__name__} for this model has no chat template, so it is not a chat "
            "model. Use a plain prompt, or load an instruct model (e.g. 'tiny-arith-chat', "
            "'Qwen/Qwen2.5-1.5B-Instruct')."
        )
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
