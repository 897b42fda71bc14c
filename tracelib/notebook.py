"""The one call every notebook starts with."""

from __future__ import annotations

import random
import sys


def in_colab() -> bool:
    """Whether this is running inside Google Colab."""
    return "google.colab" in sys.modules


def setup_notebook(seed: int = 0, precision: int = 3) -> None:
    """Prepare a notebook: seed, turn off gradients, pick the plot renderer, enable widgets.

    Args:
        seed: seeds Python's, NumPy's and torch's generators, so sampled examples repeat.
        precision: digits pandas shows after the decimal point.
    """
    import numpy as np
    import pandas as pd
    import plotly.io as pio
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # Everything here is inference; gradients would only cost memory.
    torch.set_grad_enabled(False)
    pd.set_option("display.precision", precision)
    if in_colab():
        pio.renderers.default = "colab"
        from google.colab import output  # type: ignore[import-not-found]

        output.enable_custom_widget_manager()
    else:
        # Self-contained figures that render offline in JupyterLab and in saved notebooks.
        pio.renderers.default = "plotly_mimetype+notebook"
