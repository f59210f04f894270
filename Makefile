# Plain entry points: `make test` and `make quickstart` create .venv when missing.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.rankopt-installed
PYTEST_ARGS ?=
# pytest-xdist workers: one per core of the 2-core CI machine (the suite's slow tests are
# processes that wait on Ray, signals and subprocesses); PYTEST_WORKERS=0 runs in one process
PYTEST_WORKERS ?= 2
PYTEST := -m pytest -n $(PYTEST_WORKERS) --dist worksteal
# `make test-latest`: its own venv, the newest releases pyproject.toml allows, no constraints
LATEST_VENV ?= .venv-latest
EXTRAS := .[test,postgres,deploy,dashboard]

.PHONY: test test-latest quickstart install bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch/torchvision first, pinned to the releases our machines install offline; then
# exactly the versions CI tested (constraints.txt)
$(STAMP): pyproject.toml constraints.txt $(wildcard plugins/*/pyproject.toml) | $(BIN)/python
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -c constraints.txt -e "$(EXTRAS)"
	@for p in plugins/*/; do \
		if [ -f "$$p/pyproject.toml" ]; then $(BIN)/python -m pip install -q -c constraints.txt -e "$$p" || exit 1; fi; \
	done
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python $(PYTEST) $(PYTEST_ARGS)

# the newest releases (within pyproject.toml's ranges; torch stays pinned): run it when a
# dependency releases, so a breakage shows here first; the versions go to versions.txt
test-latest:
	rm -rf $(LATEST_VENV)
	$(PY) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(LATEST_VENV)/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e "$(EXTRAS)"
	@for p in plugins/*/; do \
		if [ -f "$$p/pyproject.toml" ]; then $(LATEST_VENV)/bin/python -m pip install -q -e "$$p" || exit 1; fi; \
	done
	$(LATEST_VENV)/bin/python -m pip freeze --exclude-editable > $(LATEST_VENV)/versions.txt
	$(LATEST_VENV)/bin/python $(PYTEST) $(PYTEST_ARGS)

quickstart: $(STAMP)
	$(BIN)/rankopt run studies/quickstart.yaml
	$(BIN)/rankopt pareto runs/quickstart

clean:
	rm -rf $(VENV) $(LATEST_VENV) runs .pytest_cache
