"""The project's own files agree with each other."""

from __future__ import annotations

import json
import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_distribution_name_is_not_the_pypi_squatter():
    assert PYPROJECT["project"]["name"] != "tracelib"


def test_environment_yml_installs_this_project_with_known_extras():
    env = (ROOT / "environment.yml").read_text()
    python = re.search(r"^\s*-\s*python=(\d+)\.(\d+)", env, re.M)
    assert python, "environment.yml must pin a python version"
    minimum = re.match(r">=(\d+)\.(\d+)", PYPROJECT["project"]["requires-python"])
    assert tuple(map(int, python.groups())) >= tuple(map(int, minimum.groups()))
    install = re.search(r"^\s*-\s*-e\s+\.\[([\w,]+)\]", env, re.M)
    assert install, "environment.yml's pip section must install this project (-e .[extras])"
    for extra in install.group(1).split(","):
        assert extra in PYPROJECT["project"]["optional-dependencies"]


def test_transformer_lens_is_pinned_within_major_4():
    deps = PYPROJECT["project"]["dependencies"]
    assert "transformer-lens>=4.3,<5" in deps


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme and "make lab" in readme


def test_notebooks_are_stored_without_outputs():
    assert NOTEBOOKS
    for path in NOTEBOOKS:
        for cell in json.loads(path.read_text())["cells"]:
            if cell["cell_type"] == "code":
                assert not cell["outputs"] and cell["execution_count"] is None, path.name


REPOSITORY = PYPROJECT["project"]["urls"]["Repository"]


def colab_url(notebook: str) -> str:
    """The Colab address that opens `notebooks/<notebook>` from the repository's main branch."""
    owner_repo = re.fullmatch(r"https://github\.com/([\w.-]+/[\w.-]+?)(?:\.git)?/?", REPOSITORY)
    assert owner_repo, f"[project.urls] Repository is not a GitHub repository URL: {REPOSITORY}"
    return f"https://colab.research.google.com/github/{owner_repo.group(1)}/blob/main/notebooks/{notebook}"


def test_notebooks_open_with_a_colab_badge_for_themselves():
    # Every notebook, present and future, opens with the badge; its address is derived from the one
    # repository URL in pyproject.toml and from the notebook's own file name.
    for path in NOTEBOOKS:
        first = json.loads(path.read_text())["cells"][0]
        assert first["cell_type"] == "markdown", path.name
        badge = "".join(first["source"]).splitlines()[0]
        expected = (
            f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({colab_url(path.name)})"
        )
        assert badge == expected, path.name


def test_notebooks_start_with_the_same_setup_cell():
    first_cells = set()
    for path in NOTEBOOKS:
        code = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
        source = "".join(code[0]["source"])
        assert source.startswith("# NBVAL_IGNORE_OUTPUT"), path.name
        assert "tl.setup_notebook(seed=0)" in source and "MODEL = " in source, path.name
        first_cells.add(source)
    assert len(first_cells) == 1, "the setup cell must be identical in every notebook"
    (source,) = first_cells
    pip_lines = [line.strip() for line in source.splitlines() if "%pip" in line]
    # One install, from the repository itself (the name "tracelib" on PyPI is a stranger's package).
    assert pip_lines == [f'%pip install -q "git+{REPOSITORY}"'], pip_lines
    assert 'if "google.colab" in sys.modules:' in source


def test_colab_install_pins_nothing_colab_already_ships():
    # Reinstalling torch or numpy on Colab breaks its CUDA build and forces a runtime restart.
    (source,) = {
        "".join(next(c for c in json.loads(p.read_text())["cells"] if c["cell_type"] == "code")["source"])
        for p in NOTEBOOKS
    }
    pip_line = next(line for line in source.splitlines() if "%pip" in line)
    for shipped in ("torch", "numpy", "--force-reinstall", "--upgrade", "-U "):
        assert shipped not in pip_line.replace(REPOSITORY, ""), pip_line


def test_package_data_ships_the_bundled_weights():
    assert "weights/*/*" in PYPROJECT["tool"]["setuptools"]["package-data"]["tracelib"]


def test_the_package_version_is_pyprojects():
    import tracelib

    assert tracelib.__version__ == PYPROJECT["project"]["version"]
