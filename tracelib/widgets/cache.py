"""The explorer's traces of inputs seen before, so a repeated submit does not run the model again."""

from __future__ import annotations

from collections import OrderedDict

from tracelib.identity import weights_fingerprint
from tracelib.trace import Trace, trace

# Traces kept for inputs seen before, least recently used dropped first: a real model's trace holds
# its lens over the whole vocabulary, so an unbounded cache grows with every new input.
CACHE_SIZE = 32


class TraceCache:
    """The last `size` traces by input, the least recently used dropped first.

    Attributes:
        size: how many traces are kept.
        n_traces: how many times `tl.trace` ran (a cached input does not run it again).
    """

    def __init__(self, size: int = CACHE_SIZE):
        self.size = size
        self.n_traces = 0
        self._traces: OrderedDict[tuple, Trace] = OrderedDict()

    def __len__(self) -> int:
        return len(self._traces)

    def trace(self, name: str, model, prompt: str, answer: str, distractors, chat: bool) -> tuple[Trace, bool]:
        """The trace of these inputs, from the cache or traced now; and whether it came from the cache.

        `name` is the model's entry in the explorer and `chat` whether the prompt went through the
        chat template: both are part of the input.
        """
        # The fingerprint, so a model whose weights changed in place since is traced afresh.
        key = (name, weights_fingerprint(model), prompt, answer, tuple(distractors or ()), chat)
        if key in self._traces:
            self._traces.move_to_end(key)
            return self._traces[key], True
        traced = self._traces[key] = trace(model, prompt, answer, distractors)
        self.n_traces += 1
        while len(self._traces) > self.size:
            self._traces.popitem(last=False)
        return traced, False
