"""nbval settings for the notebooks.

The notebooks run under `--nbval-lax`, so outputs are only compared in cells marked
`# NBVAL_CHECK_OUTPUT`. Should anyone add one, rich outputs that carry random ids or embedded
libraries (HTML, JavaScript, plotly, widgets) and stderr are never compared.
"""

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SKIP_COMPARE = (
    "text/html",
    "application/javascript",
    "application/vnd.plotly.v1+json",
    "application/vnd.jupyter.widget-view+json",
    "application/vnd.jupyter.widget-state+json",
    "stderr",
)


def pytest_collectstart(collector):
    if getattr(collector, "path", None) is not None and collector.path.suffix == ".ipynb":
        collector.skip_compare = tuple(collector.skip_compare) + SKIP_COMPARE
