# Two entry points (see README): `make test` and `make demo`. Each creates the environment if missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# The first run builds llama-cpp-python from source (~7 min on 2 cores); pip caches the wheel.
	$(PY) -m pip install -e '.[dev,demo]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

clean-venv:
	rm -rf $(VENV)
