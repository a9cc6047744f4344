# The two commands of the README. Both do all set-up themselves (venv + pinned deps + editable install).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# test processes: one per core (pytest-xdist; whole files per worker, so module fixtures are built once);
# `make test TEST_WORKERS=0` runs the suite in this one process
TEST_WORKERS ?= auto

.PHONY: test demo setup lint clean

# --no-compile: pip would byte-compile every .py of every package (torch, its CUDA wheels' Python parts, ...) at
# install; Python compiles what is imported on first import instead (measured here: install 2m34s instead of ~5 min)
$(STAMP): requirements.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-compile -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

demo: $(STAMP)
	bash tools/demo.sh $(PY)

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) demo_out work_dirs
