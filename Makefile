# The two commands of the README. Both do all set-up themselves (venv + pinned deps + editable install).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# test processes: one per core (pytest-xdist; whole files per worker, so module fixtures are built once);
# `make test TEST_WORKERS=0` runs the suite in this one process
TEST_WORKERS ?= auto

.PHONY: test demo setup lint clean

# --no-compile, then compileall on every core: pip byte-compiles one file at a time (~5 min of install here); the
# .pyc files must exist before the suite runs, because with PYTHONDONTWRITEBYTECODE=1 (set on CI machines) Python
# never writes them and every process would compile torch again on import (import torch 6.6 s instead of 3.4 s,
# torchvision 15 s instead of 7 s; the suite took 16.5 min instead of ~12). Files of other Python versions that
# some wheels ship do not compile; pip's own byte-compilation skips those too.
$(STAMP): requirements.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-compile -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m compileall -qq -j 0 "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" || true
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
