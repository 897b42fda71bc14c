"""setup_notebook(): the plotly renderer it picks, and the size of a notebook saved after running."""

from __future__ import annotations

import os
import shutil
import sys
import types
from pathlib import Path

import pandas as pd
import plotly.io as pio
import pytest
import torch

import tracelib as tl

ROOT = Path(__file__).resolve().parents[1]
# Draws the most figures (five) of the notebooks and runs in about 15 s on the bundled model.
REPRESENTATIVE = ROOT / "notebooks" / "04_direct_logit_attribution.ipynb"
# The licence header every plotly.js bundle starts with; a notebook holding it embeds the library.
PLOTLY_JS_HEADER = "plotly.js v"


@pytest.fixture
def restored(monkeypatch):
    """Undo what setup_notebook() sets globally, so later tests see the defaults."""
    monkeypatch.setattr(pio.renderers, "default", pio.renderers.default)
    grad = torch.is_grad_enabled()
    precision = pd.get_option("display.precision")
    yield
    torch.set_grad_enabled(grad)
    pd.set_option("display.precision", precision)


@pytest.fixture
def fake_colab(monkeypatch):
    """A stand-in `google.colab` module that records calls to enable the custom widget manager."""
    calls = []
    colab = types.ModuleType("google.colab")
    colab.output = types.SimpleNamespace(enable_custom_widget_manager=lambda: calls.append("enabled"))
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    return calls


def test_jupyter_gets_the_mimetype_renderer_only(restored, monkeypatch):
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    tl.setup_notebook(seed=0)
    # No "+notebook": that part would embed plotly.js in every saved notebook.
    assert pio.renderers.default == "plotly_mimetype"
    assert not torch.is_grad_enabled()


def test_colab_gets_its_renderer_and_the_custom_widget_manager(restored, fake_colab):
    tl.setup_notebook(seed=0)
    assert pio.renderers.default == "colab"
    assert fake_colab == ["enabled"]


def test_renderer_can_be_overridden_for_self_contained_html(restored, monkeypatch, fake_colab):
    tl.setup_notebook(seed=0, renderer="plotly_mimetype+notebook")
    assert pio.renderers.default == "plotly_mimetype+notebook"
    assert fake_colab == ["enabled"]  # widgets still work on Colab whatever draws the figures
    monkeypatch.delitem(sys.modules, "google.colab")
    tl.setup_notebook(seed=0, renderer="notebook_connected")
    assert pio.renderers.default == "notebook_connected"


def test_a_notebook_saved_after_running_stays_small(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    from jupyter_client.kernelspec import KernelSpecManager

    if "python3" not in KernelSpecManager().find_kernel_specs():
        pytest.skip("no python3 Jupyter kernel; `make install` installs one into the venv")
    # The kernel must import this checkout's tracelib, as nbval's --nbval-current-env does.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    copy = tmp_path / REPRESENTATIVE.name
    shutil.copy(REPRESENTATIVE, copy)
    nb = nbformat.read(copy, as_version=4)
    nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(REPRESENTATIVE.parent)}}
    ).execute()
    nbformat.write(nb, copy)

    figures = [
        output
        for cell in nb.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if "application/vnd.plotly.v1+json" in output.get("data", {})
    ]
    assert len(figures) >= 3, "the representative notebook should draw its figures"
    text = copy.read_text(encoding="utf-8")
    assert PLOTLY_JS_HEADER not in text, "a saved notebook embeds plotly.js"
    size = copy.stat().st_size
    assert size < 1_000_000, f"{copy.name} saved after running is {size / 1e6:.1f} MB"
