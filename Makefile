# The README's two commands: `make quickstart` and `make test`. Both install first.
VENV ?= .venv
WORKDIR ?= workdirs/quickstart
PY := $(VENV)/bin/python

.PHONY: install quickstart test
install:
	bash scripts/install.sh $(VENV)

quickstart: install
	$(PY) -m cldro_jax.main --config=configs/quickstart.py --workdir=$(WORKDIR)

test: install
	$(PY) -m pytest -n 2 --durations=15 tests
