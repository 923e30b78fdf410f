"""Machine-readable results of a benchmark run, for `benchmarks/plot.py`.

Each benchmark prints a markdown table for people and, with `--json PATH`, also writes its rows
to PATH. The file is rewritten after every row, so a run stopped by a time limit (as in
benchmarks/h200.sh) keeps the rows it finished, as its printed table does. Plotting happens
later on any machine (the GPU machine need not have matplotlib).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from typing import Any


def environment(**device_fields: Any) -> dict[str, Any]:
  """Date, device, versions and command; `device_fields` (backend, device_kind, device_count,
  jax) replace the ones JAX would report here."""
  if not device_fields:
    import jax  # pylint: disable=import-outside-toplevel
    device_fields = {"backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
                     "device_count": jax.device_count(), "jax": jax.__version__}
  return {
      "date": datetime.date.today().isoformat(),
      **device_fields,
      "host": platform.processor() or platform.machine(),
      # as run from the repository root, where every documented command starts
      "command": " ".join(["python", "benchmarks/" + os.path.basename(sys.argv[0])] + sys.argv[1:]),
  }


class JsonRecord:
  """Rows of one benchmark run; a no-op when `path` is empty (no --json given)."""

  def __init__(self, path: str | None, benchmark: str, *, env: dict[str, Any] | None = None,
               **settings: Any):
    """`env`: the environment fields when this process must not start JAX itself (a parent
    whose children hold the accelerators); by default they are read from JAX here."""
    self.path = path
    self.data = {"benchmark": benchmark, **(env or environment()), "settings": settings,
                 "rows": []}
    self._write()

  def add(self, **row: Any) -> None:
    self.data["rows"].append(row)
    self._write()

  def update_last(self, **fields: Any) -> None:
    """Completes the last row (a row is added as soon as its main figure is measured, so a
    time limit hit while its extras are measured still keeps it)."""
    self.data["rows"][-1].update(fields)
    self._write()

  def _write(self) -> None:
    if not self.path:
      return
    tmp = f"{self.path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(self.data, f, indent=1)
    os.replace(tmp, self.path)   # a reader never sees half a file
