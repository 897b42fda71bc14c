"""The one call every notebook starts with."""

from __future__ import annotations

import functools
import random
import sys

import numpy as np
import pandas as pd
import plotly.io as pio
import torch

from tracelib.formats import fmt_float

# In Jupyter, figures go out as plotly's JSON MIME type only: JupyterLab, Notebook 7 and VS Code draw
# it with the plotly.js they ship, so a saved notebook holds each figure's data and not another
# ~3.5 MB copy of plotly.js per notebook.
JUPYTER_RENDERER = "plotly_mimetype"
COLAB_RENDERER = "colab"


def in_colab() -> bool:
    """Whether this is running inside Google Colab."""
    return "google.colab" in sys.modules


def setup_notebook(seed: int = 0, precision: int = 3, renderer: str | None = None) -> None:
    """Prepare a notebook: seed, turn off gradients, pick the plot renderer, enable widgets.

    Args:
        seed: seeds Python's, NumPy's and torch's generators, so sampled examples repeat.
        precision: digits pandas shows after the decimal point.
        renderer: plotly renderer to use instead of the default ("colab" on Colab, else
            "plotly_mimetype", which keeps saved notebooks small). For a notebook that must draw its
            figures on its own once exported with `jupyter nbconvert --to html`, pass
            "plotly_mimetype+notebook" (embeds plotly.js, about 3.5 MB) or
            "plotly_mimetype+notebook_connected" (loads plotly.js from a CDN when opened).
    """

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # Everything here is inference; gradients would only cost memory.
    torch.set_grad_enabled(False)
    pd.set_option("display.precision", precision)
    # Three decimals, never `9.992e-01`: scientific only below 1e-3, where it is needed (formats.fmt_float).
    pd.set_option("display.float_format", functools.partial(fmt_float, decimals=precision))
    if in_colab():
        from google.colab import output  # type: ignore[import-not-found]

        # The explorer's ipywidgets need Colab's custom widget manager, whatever draws the figures.
        output.enable_custom_widget_manager()
    if renderer is None:
        renderer = COLAB_RENDERER if in_colab() else JUPYTER_RENDERER
    pio.renderers.default = renderer
