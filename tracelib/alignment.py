"""Token alignment between two prompts: which position of one holds the same token as a position of the other."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence

from torch import Tensor

from tracelib.formats import described


def align_tokens(
    a_tokens: Sequence | Tensor, b_tokens: Sequence | Tensor, *, key: Callable | None = None
) -> list[int | None]:
    """For each position of b, the position of a that holds the same token in the shared text, or None.

    The match is `difflib.SequenceMatcher` on the tokens (ids or strings, compared as given, or
    through `key`), without its "junk" heuristic: the longest common runs are matched first,
    in order, so a question wrapped in a chat template maps back onto the bare question, and
    tokens inserted into a prompt map to None. Positions are never shifted to fill a gap.

    Args:
        a_tokens: the first prompt's tokens (a list of ids or strings, or a 1-d tensor of ids).
        b_tokens: the second prompt's tokens, the same kind.
        key: applied to every token before matching, e.g. `str.strip` so that `" what"` matches
            `"what"` across two phrasings. Default: tokens compared as they are.

    Returns:
        A list as long as `b_tokens`: entry j is the index in `a_tokens` matched to b's position j,
        or None where b's token has no counterpart in a (template tokens, inserted junk).

    Raises:
        TypeError: a prompt's text instead of its tokens, anything not iterable, or a `key` that is not callable.
    """
    for name, tokens in (("a_tokens", a_tokens), ("b_tokens", b_tokens)):
        # A string is a sequence too, but of characters: aligning two prompts' text is not what was meant.
        if isinstance(tokens, (str, bytes)) or not hasattr(tokens, "__iter__"):
            raise TypeError(
                f"align_tokens: {name} must be a list of tokens (ids or strings, e.g. trace.rows[0].str_tokens) or a "
                f"1-d tensor of ids, got {described(tokens)}."
            )
    if key is not None and not callable(key):
        raise TypeError(
            f"align_tokens: key must be a function applied to every token (e.g. str.strip), got {described(key)}."
        )
    a = a_tokens.tolist() if isinstance(a_tokens, Tensor) else list(a_tokens)
    b = b_tokens.tolist() if isinstance(b_tokens, Tensor) else list(b_tokens)
    if key is not None:
        a, b = [key(t) for t in a], [key(t) for t in b]
    out: list[int | None] = [None] * len(b)
    matcher = difflib.SequenceMatcher(None, a, b, autojunk=False)
    for block in matcher.get_matching_blocks():
        for t in range(block.size):
            out[block.b + t] = block.a + t
    return out
