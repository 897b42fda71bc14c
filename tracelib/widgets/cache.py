"""The explorer's traces and routes of inputs seen before, so a repeated submit does not run the model again."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from tracelib.identity import weights_fingerprint
from tracelib.routes import Routes, routes
from tracelib.trace import Trace, trace

# Traces kept for inputs seen before, least recently used dropped first: a real model's trace holds
# its lens over the whole vocabulary, so an unbounded cache grows with every new input.
CACHE_SIZE = 32


def _cached(store: OrderedDict, key: tuple, size: int, make: Callable[[], object]) -> tuple[object, bool]:
    """`store[key]`, made by `make()` where missing (the `size` most recently used kept); and whether it was there."""
    if key in store:
        store.move_to_end(key)
        return store[key], True
    made = store[key] = make()
    while len(store) > size:
        store.popitem(last=False)
    return made, False


class TraceCache:
    """The last `size` traces by input, and as many routes, the least recently used dropped first.

    Attributes:
        size: how many traces (and how many routes) are kept.
        n_traces: how many times `tl.trace` ran (a cached input does not run it again).
        n_routes: how many times `tl.routes` ran (likewise).
    """

    def __init__(self, size: int = CACHE_SIZE):
        self.size = size
        self.n_traces = 0
        self.n_routes = 0
        self._traces: OrderedDict[tuple, Trace] = OrderedDict()
        self._routes: OrderedDict[tuple, Routes] = OrderedDict()

    def __len__(self) -> int:
        return len(self._traces)

    @staticmethod
    def _key(name: str, model, prompt: str, answer: str, distractors, chat: bool) -> tuple:
        # The fingerprint, so a model whose weights changed in place since is run afresh.
        return (name, weights_fingerprint(model), prompt, answer, tuple(distractors or ()), chat)

    def trace(self, name: str, model, prompt: str, answer: str, distractors, chat: bool) -> tuple[Trace, bool]:
        """The trace of these inputs, from the cache or traced now; and whether it came from the cache.

        `name` is the model's entry in the explorer and `chat` whether the prompt went through the
        chat template: both are part of the input.
        """
        key = self._key(name, model, prompt, answer, distractors, chat)
        traced, cached = _cached(self._traces, key, self.size, lambda: trace(model, prompt, answer, distractors))
        if not cached:
            self.n_traces += 1
        return traced, cached

    def routes(
        self, name: str, model, prompt: str, answer: str, distractors, chat: bool, threshold: float
    ) -> tuple[Routes, bool]:
        """The routes of these inputs at `threshold`, from the cache or computed now (`tl.routes`); and
        whether they came from the cache. The inputs are those of `trace`."""
        key = (*self._key(name, model, prompt, answer, distractors, chat), float(threshold))
        found, cached = _cached(
            self._routes,
            key,
            self.size,
            lambda: routes(model, prompt, answer, threshold=threshold, distractors=distractors),
        )
        if not cached:
            self.n_routes += 1
        return found, cached
