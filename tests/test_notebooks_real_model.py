"""Every notebook, run top to bottom on a real trained model by changing its one `MODEL = ...` line.

The notebooks promise that a reader changes one line to run them on another model. nbval runs them
on the bundled model (`make nbtest`); this runs each one again with that line pointing at the
SmolLM2-135M-Instruct fixture (a GGUF file, dequantized by `tl.load_model`), exactly as a reader
would edit it, and fails on any error. Claims true of any model (reconstructions, the lens ending
at the logits, patching identities) are asserted in both runs; claims about the bundled model stay
behind `if MODEL.startswith("tiny-arith")` in the notebooks' check cells.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
MODEL_LINE = re.compile(r'^MODEL = "tiny-arith"(.*)$', re.MULTILINE)


def with_model(notebook, model: str):
    """The notebook with its setup cell's `MODEL = ...` line changed to `model`, and nothing else."""
    hits = [cell for cell in notebook.cells if cell.cell_type == "code" and MODEL_LINE.search(cell.source)]
    assert len(hits) == 1, "every notebook has exactly one MODEL line, in its setup cell"
    hits[0].source = MODEL_LINE.sub(lambda m: f"MODEL = {model!r}{m.group(1)}", hits[0].source)
    return notebook


def test_the_model_line_is_the_only_change():
    notebook = with_model(nbformat.read(NOTEBOOKS[0], as_version=4), "/x/model.gguf")
    original = nbformat.read(NOTEBOOKS[0], as_version=4)
    changed = [i for i, (a, b) in enumerate(zip(original.cells, notebook.cells)) if a.source != b.source]
    assert len(changed) == 1 and "MODEL = '/x/model.gguf'" in notebook.cells[changed[0]].source


# The suite's slowest tests: under xdist each goes out on its own, first (tests/conftest.py, RUN_ALONE),
# so that the two workers share them instead of one worker running them all.
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_on_a_real_trained_model(path, tmp_path, smollm2_file, smollm2_folder):
    """Runs in a copy of notebooks/, so whatever the notebook writes stays out of the repository.

    `smollm2_folder`: the file is dequantized before the first kernel loads it (this process need not
    load the model itself).
    """
    work = tmp_path / "notebooks"
    shutil.copytree(path.parent, work, ignore=shutil.ignore_patterns("*.ipynb", ".ipynb_checkpoints"))
    notebook = with_model(nbformat.read(path, as_version=4), str(smollm2_file))
    client = NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(work)}})
    try:
        client.execute()
    except CellExecutionError as exc:
        pytest.fail(f"{path.name} failed on the real model:\n{exc}", pytrace=False)
