# The README's two commands: `make quickstart` and `make test`. Both install first.
VENV ?= .venv
WORKDIR ?= workdirs/quickstart
PY := $(VENV)/bin/python

.PHONY: install quickstart test test-lower-bounds
install:
	bash scripts/install.sh $(VENV)

quickstart: install
	$(PY) -m cldro_jax.main --config=configs/quickstart.py --workdir=$(WORKDIR)

test: install
	$(PY) -m pytest -n 2 --durations=15 tests

# The test suite at the lowest jax, flax, optax and chex pyproject admits and the H200 image's
# orbax-checkpoint (0.12.4, pyproject's lower bound), in its own environment.
LOWER_VENV ?= .venv-lower
test-lower-bounds:
	bash scripts/install.sh $(LOWER_VENV)
	$(LOWER_VENV)/bin/python -m pip install -q "jax==0.10.0" "jaxlib==0.10.0" "flax==0.12.8" "optax==0.2.8" \
	  "orbax-checkpoint==0.12.4" "chex==0.1.92"
	$(LOWER_VENV)/bin/python -m pytest -n 2 tests
