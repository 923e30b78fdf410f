"""What the libraries underneath (JAX, orbax, tfds) print, kept to what a user can act on.

They log through absl (Python's "absl" logger). The command lines hide their routine INFO lines;
a few warnings that every normal use triggers are hidden only around the call that triggers
them, so the same warning elsewhere still shows.
"""

from __future__ import annotations

import contextlib
import logging as py_logging
import sys
from typing import Iterator

from absl import logging

# JAX says at INFO on every machine without a TPU that it found no TPU library (a GPU backend
# that fails to start stays visible: there the line is the clue).
_JAX_NO_TPU_NOTICE = "Unable to initialize backend 'tpu'"


def _shown(record: py_logging.LogRecord) -> bool:
  """False for the library lines that `quiet_library_info` hides."""
  if record.pathname.endswith("xla_bridge.py") and record.levelno < py_logging.WARNING:
    return not str(record.msg).startswith(_JAX_NO_TPU_NOTICE)
  return "/orbax/" not in record.pathname or record.levelno >= py_logging.WARNING


def quiet_library_info() -> None:
  """Hides orbax's INFO lines (a dozen per checkpoint save or restore), which would bury the
  progress bar, and JAX's INFO line that a machine has no TPU library; orbax's warnings and
  errors still show, and so do our own INFO lines (resume, multi-process start-up). For
  command-line entry points."""
  handler = logging.get_absl_handler()
  if _shown not in handler.filters:
    handler.addFilter(_shown)


@contextlib.contextmanager
def absl_messages_hidden(*prefixes: str | None) -> Iterator[None]:
  """Within the block, absl log messages starting with any of `prefixes` are dropped (None
  entries are ignored, so a caller can hide conditionally)."""
  wanted = tuple(p for p in prefixes if p)
  if not wanted:
    yield
    return

  def shown(record: py_logging.LogRecord) -> bool:
    return not str(record.msg).startswith(wanted)

  logger = py_logging.getLogger("absl")
  logger.addFilter(shown)
  try:
    yield
  finally:
    logger.removeFilter(shown)


def warn(message: str) -> None:
  """A warning to the log, and once (process 0 of a multi-process run) to the terminal."""
  import jax  # pylint: disable=import-outside-toplevel
  logging.warning(message)
  if jax.process_index() == 0:
    print(f"WARNING: {message}", file=sys.stderr, flush=True)
