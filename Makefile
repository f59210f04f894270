# Plain entry points: `make test` and `make quickstart` create .venv when missing.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.rankopt-installed
PYTEST_ARGS ?=

.PHONY: test quickstart install bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch/torchvision first, pinned to the releases our machines install offline
$(STAMP): pyproject.toml $(wildcard plugins/*/pyproject.toml) | $(BIN)/python
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e ".[test,postgres,deploy,dashboard]"
	@for p in plugins/*/; do \
		if [ -f "$$p/pyproject.toml" ]; then $(BIN)/python -m pip install -q -e "$$p" || exit 1; fi; \
	done
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

quickstart: $(STAMP)
	$(BIN)/rankopt run studies/quickstart.yaml
	$(BIN)/rankopt pareto runs/quickstart

clean:
	rm -rf $(VENV) runs .pytest_cache
