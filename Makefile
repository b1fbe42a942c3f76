# The two commands a new user runs (see README.md). Each makes its own virtual environment.
#   make demo    run examples/quickstart.py
#   make test    run the test suite (CPU; Triton kernels under TRITON_INTERPRET=1), in parallel
#
# TORCH picks the torch to install: the default is the CPU build, which needs no GPU and no
# CUDA downloads; on a GPU machine use e.g. `make test TORCH=torch`.

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY      = $(VENV)/bin/python

.PHONY: demo test install clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test,bench]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) examples/quickstart.py

# the tests in parallel, one process a core up to 4 (more CUDA contexts than that ran out of
# memory on one GPU)
test: install
	$(PY) -m pytest -q -n auto --maxprocesses 4

clean:
	rm -rf $(VENV)
