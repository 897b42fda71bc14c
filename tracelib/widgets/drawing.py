"""The explorer's widgets, made and closed: figures, tables, attention patterns and labelled inputs.

ipywidgets keeps every widget it ever made alive (in `ipywidgets.widgets.widget._instances`) until
`.close()` is called on it, and a widget's layout and style are widgets of their own. So the app
closes every widget it replaces, with all it holds (`_close`, `_replace`): before, 100 identical
submits left 1,500 widgets, and their figures, behind.
"""

from __future__ import annotations

import html

import ipywidgets as w
from IPython import get_ipython

from tracelib.formats import fmt_prob, fmt_value

# One description width for the labelled inputs, so their boxes line up under each other.
_LABELLED = {"description_width": "90px"}


def _table(frame) -> str:
    """A DataFrame as a small HTML table, in the package's number format: probabilities `0.999`,
    logits and attributions `+1.234`. Token columns arrive already written with repr (`'7'`)."""
    floats = frame.select_dtypes("float").columns
    formatters = {c: fmt_prob if c == "prob" else fmt_value for c in floats}
    return frame.to_html(index=False, formatters=formatters, border=0)


def _figure(fig):
    """A widget showing a plotly figure: an `Output` that displays it through the notebook's renderer.

    Not a `FigureWidget`: on plotly 6 and later each one ships its own copy of plotly.js (5 MB) to
    the browser, so a submit that rebuilds six figures took 8-10 s in JupyterLab (measured by
    tests/test_browser.py) against well under 1 s of work in the kernel. Heads are picked with the
    layer and head dropdowns instead of a click on the grid. The figure is kept as `.figure`.
    """
    widget = w.Output()
    if get_ipython() is not None:  # outside a kernel, display() would print to stdout
        with widget:
            fig.show()
    widget.figure = fig
    return widget


def _close(widget) -> None:
    """Close a widget the app no longer shows, and everything it holds: its children, layout and style.

    ipywidgets keeps a widget (and whatever it refers to, a figure included) until it is closed;
    dropping it from a box's children only hides it.
    """
    for child in getattr(widget, "children", ()):
        _close(child)
    for part in (getattr(widget, "layout", None), getattr(widget, "style", None)):
        if isinstance(part, w.Widget):
            part.close()
    widget.close()


def _replace(box, children=()) -> None:
    """Show `children` in `box`, closing the children they replace."""
    old, box.children = box.children, tuple(children)
    for child in old:
        if not any(child is new for new in box.children):
            _close(child)


_ONLINE: list[bool] = []


def _pattern_source(view) -> str:
    """circuitsvis's HTML: loading its script from the CDN when online (1 kB), inlined when offline (1.3 MB).

    circuitsvis decides the same way for `_repr_html_`, but asks the network every time; the
    explorer asks once per session, since every head selection sends the HTML to the browser.
    """
    if not _ONLINE:
        from circuitsvis.utils.render import internet_on

        _ONLINE.append(internet_on())
    return view.cdn_src if _ONLINE[0] else view.local_src


def _pattern_frame(view) -> str:
    """A circuitsvis view as an iframe: its script must run, and a srcdoc runs it where innerHTML would not."""
    source = html.escape(_pattern_source(view))
    return f'<iframe srcdoc="{source}" style="width:100%;height:420px;border:0"></iframe>'


def _text_box(description: str, placeholder: str, max_width: str):
    """An input of the app: labelled like the others, as wide as the app allows up to `max_width`."""
    return w.Text(
        value="",
        description=description,
        placeholder=placeholder,
        style=_LABELLED,
        layout=w.Layout(width="100%", max_width=max_width),
    )


def _dropdown(description: str, options, **layout):
    """A labelled dropdown of the app, its first option chosen; `layout` sizes it (`width="360px"`)."""
    options = list(options)
    first = options[0] if options else None
    value = first[1] if isinstance(first, tuple) else first
    return w.Dropdown(options=options, value=value, description=description, style=_LABELLED, layout=w.Layout(**layout))


def _reference_dropdown(description: str, labels, **layout):
    """A dropdown of saved references by label, led by `(none)` (value `""`), which it starts on."""
    return _dropdown(description, [("(none)", "")] + [(label, label) for label in labels], **layout)
