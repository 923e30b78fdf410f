"""Checkpoints that a killed run resumes from, and the checks that keep them from being misused.

Layout of a workdir:
  config.json            the config the run was started with (compared on every resume)
  checkpoints/<step>/    orbax checkpoints: `state` (every array needed to continue: parameters,
                         optimizer and BatchNorm state, step, RNG) and `meta` (JSON: step, epoch,
                         the model's parameter signature)
The data position is a function of the step (see `cldro_jax.data.pipeline`), so the step is all
the input pipeline needs to resume.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a
process killed while writing leaves the previous checkpoints intact; unfinished temporary
directories are ignored and cleaned up on the next start.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import flax
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

# Fields that may legitimately change when a run is resumed: how long it runs, how often it logs,
# evaluates or saves, and where data lives. Anything else (model, loss, optimiser, batch, seed,
# augmentation) must match the saved config, or the resumed run would silently be another
# experiment.
RESUMABLE_FIELDS = (
    "total_epochs", "total_steps", "log_every_steps", "checkpoint_every_steps",
    "keep_checkpoints", "eval", "data.data_dir", "data.path", "data.test_dir", "data.sts_root",
    "data.read_threads", "data.in_memory", "data.in_memory_max_mb",
    "progress_bar", "mesh", "trace",
)


class CheckpointMismatchError(ValueError):
  """A checkpoint or saved config that does not belong to the current run."""


def _flatten(config: dict, prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      flat.update(_flatten(value, name + "."))
    else:
      flat[name] = value
  return flat


def _may_change(name: str) -> bool:
  return any(name == f or name.startswith(f + ".") for f in RESUMABLE_FIELDS)


def config_to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """A JSON-serialisable copy of a config (tuples become lists)."""
  return json.loads(config.to_json_best_effort())


def check_or_save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Saves `config.json` on the first start; on a resume, refuses a config that differs.

  Raises CheckpointMismatchError naming each differing field, unless it is one that may change
  on resume (RESUMABLE_FIELDS).
  """
  path = os.path.join(workdir, "config.json")
  current = config_to_dict(config)
  if not os.path.exists(path):
    if jax.process_index() == 0:
      os.makedirs(workdir, exist_ok=True)
      tmp = path + ".tmp"
      with open(tmp, "w", encoding="utf-8") as f:
        json.dump(current, f, indent=2, sort_keys=True)
      os.replace(tmp, path)
    return
  with open(path, encoding="utf-8") as f:
    saved = json.load(f)
  saved_flat, current_flat = _flatten(saved), _flatten(current)
  differences = []
  for name in sorted(set(saved_flat) | set(current_flat)):
    if _may_change(name):
      continue
    if saved_flat.get(name, "<absent>") != current_flat.get(name, "<absent>"):
      differences.append(f"  {name}: saved {saved_flat.get(name, '<absent>')!r}, "
                         f"now {current_flat.get(name, '<absent>')!r}")
  if differences:
    raise CheckpointMismatchError(
        f"The workdir {workdir} holds a run started with a different config:\n"
        + "\n".join(differences)
        + "\nNothing was changed. Resume with the original settings, or start the new experiment "
        "in a new --workdir. (Fields that may change on resume: " + ", ".join(RESUMABLE_FIELDS)
        + ".)")


def parameter_signature(params: Any) -> str:
  """A short hash of the parameter tree's paths, shapes and dtypes (identifies the model)."""
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  text = ";".join(f"{jax.tree_util.keystr(path)}:{tuple(leaf.shape)}:{np.dtype(leaf.dtype).name}"
                  for path, leaf in leaves)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


class Checkpointer:
  """Saves and restores the train state of one workdir (all processes call every method)."""

  def __init__(self, workdir: str, *, keep: int = 3):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, *, meta: dict[str, Any]) -> None:
    """Starts an asynchronous save; training continues while it is written."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(flax.serialization.to_state_dict(state)),
        meta=ocp.args.JsonSave(meta)))

  def read_meta(self, step: int | None = None) -> dict[str, Any]:
    step = self.latest_step() if step is None else step
    restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored["meta"])

  def restore(self, target_state: Any, *, step: int | None = None,
              expected_signature: str | None = None) -> tuple[Any, dict[str, Any]]:
    """Restores into `target_state`'s structure, shapes and shardings.

    `target_state` may hold arrays or `jax.ShapeDtypeStruct`s (with shardings). Raises
    CheckpointMismatchError when the checkpoint was written by a different model.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"No checkpoint in {self.directory}.")
    meta = self.read_meta(step)
    saved_signature = meta.get("parameter_signature")
    if expected_signature is not None and saved_signature != expected_signature:
      raise CheckpointMismatchError(
          f"The checkpoint at step {step} in {self.directory} was written by a different model "
          f"(saved model {meta.get('model', '?')}, parameter signature {saved_signature}; "
          f"the current config builds signature {expected_signature}). Nothing was changed. Use "
          "the config the checkpoint was trained with, or a new --workdir.")
    abstract = jax.tree.map(
        lambda x: x if isinstance(x, jax.ShapeDtypeStruct)
        else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        flax.serialization.to_state_dict(target_state))
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract)))
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointMismatchError(
          f"Could not restore the checkpoint at step {step} in {self.directory} into the current "
          f"model: {e}. Use the config it was trained with, or a new --workdir.") from e
    return flax.serialization.from_state_dict(target_state, restored["state"]), meta

  def restore_raw(self, *, step: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The saved arrays as a nested dict (no target structure needed), and the metadata."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"No checkpoint in {self.directory}.")
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["meta"])

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
