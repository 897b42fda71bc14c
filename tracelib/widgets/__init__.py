"""The ipywidgets explorer: type a prompt and an answer, see every step of the trace in tabs.

`tl.explore(model)` returns an `Explorer`; end a notebook cell with it (or with `app.widget`) to
show it. Every widget is a plain ipywidgets widget (figures go into `Output`s), so it runs in JupyterLab,
Notebook 7 and Colab (after `tl.setup_notebook()` enabled Colab's widget manager), and can be
driven from code: set `app.prompt.value`, call `app.submit()`, read `app.current`.

The package, by job: `app` (`Explorer`, `explore`: the inputs, what is on show, the actions), `tabs`
(`ResultTabs`: the tabs' widgets and how a trace's row is drawn into them), `cache` (`TraceCache`: the
traces and routes of inputs seen before), `inputs` (the models and references given, selections,
errors), `captions` (the text written about a trace, and the Routes tab's table of edges), `drawing`
(figures, tables and patterns as widgets, and closing the widgets the app replaces).
"""

from tracelib.widgets.app import Explorer, explore
from tracelib.widgets.cache import CACHE_SIZE, TraceCache
from tracelib.widgets.captions import (  # noqa: F401
    _multi_token_note,
    _resolution_html,
    _route_edges,
    _routes_note,
    _step_label,
)
from tracelib.widgets.drawing import (  # noqa: F401
    _LABELLED,
    _ONLINE,
    _close,
    _figure,
    _pattern_source,
    _replace,
    _table,
    _text_box,
)
from tracelib.widgets.inputs import _INPUT_ERRORS, SelectionError, _index, _models, _references  # noqa: F401
from tracelib.widgets.tabs import (
    COMPARE_NOTE,
    DLA_UNITS,
    PATCH_N,
    PATCH_NOTE,
    ROUTES_K,
    ROUTES_NOTE,
    ROUTES_THRESHOLD,
    TAB_TITLES,
    ResultTabs,
)

__all__ = [
    "CACHE_SIZE",
    "COMPARE_NOTE",
    "DLA_UNITS",
    "Explorer",
    "PATCH_N",
    "PATCH_NOTE",
    "ROUTES_K",
    "ROUTES_NOTE",
    "ROUTES_THRESHOLD",
    "ResultTabs",
    "SelectionError",
    "TAB_TITLES",
    "TraceCache",
    "explore",
]
