"""Checkpoints that a killed run resumes from, and the checks that keep them from being misused.

Layout of a workdir:
  config.json            the run's config, compared on every resume (only RESUMABLE_FIELDS may
                         change; config.json then records their new values)
  checkpoints/<step>/    orbax checkpoints: `state` (every array needed to continue: parameters,
                         optimizer and BatchNorm state, step, RNG) and `meta` (JSON: step, epoch,
                         the model's parameter signature, a copy of the config, checksums, a
                         digest of the pre-training data, the metrics not yet logged)
  results.json           the final scores (a finished run rerun with the same evaluation
                         settings returns them as they are)
The data position is a function of the step (see `cldro_jax.data.pipeline`), so the step is all
the input pipeline needs to resume.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a
process killed while writing leaves the previous checkpoints intact; unfinished temporary
directories are ignored and cleaned up on the trainer's next start (readers open checkpoints
read-only and leave them alone: one may be the save a live run is writing).

Damage after the fact (a truncated or deleted file, flipped bits on disk) is caught on restore:
`meta` also holds an exact integer checksum of every saved array (`state_checksums`), because
orbax/TensorStore read some corrupted chunks back without complaint. A damaged checkpoint raises
CheckpointCorruptError naming the step and the earlier checkpoints; nothing is deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from cldro_jax import logs

# Fields that may legitimately change when a run is resumed: how long it runs, how often it logs,
# evaluates, saves or profiles, where data lives, and how the same computation is laid out
# (devices, both views in one pass or two). Anything else (model, loss, optimiser, batch, seed,
# augmentation) must match the saved config, or the resumed run would silently be another
# experiment.
RESUMABLE_FIELDS = (
    "total_epochs", "total_steps", "log_every_steps", "checkpoint_every_steps",
    "keep_checkpoints", "eval", "data.data_dir", "data.path", "data.test_dir", "data.sts_root",
    "data.read_threads", "data.in_memory", "data.in_memory_max_mb", "data.download",
    "data.prefetch", "progress_bar", "mesh", "model.views_in_one_pass", "loss.matmul_precision",
    "profile_steps", "imports",
)
# Exceptions inside a resumable group: the online probe's parameters are part of the train state
# and its learning rate shapes them.
FIXED_FIELDS = ("eval.online_probe", "eval.online_probe_lr")


class CheckpointMismatchError(ValueError):
  """A checkpoint or saved config that does not belong to the current run."""


class CheckpointCorruptError(ValueError):
  """A checkpoint whose files are unreadable or whose arrays fail their saved checksums."""


class CheckpointSaveError(RuntimeError):
  """A checkpoint that could not be written (a full disk, a lost file system)."""


# How a storage failure reads when tensorstore or orbax re-raise it as another type (tensorstore
# reports a full disk as a ValueError carrying the status "RESOURCE_EXHAUSTED").
_STORAGE_FAILURE = re.compile(
    r"RESOURCE_EXHAUSTED|No space left|Disk quota|Read-only file system|Input/output error|"
    r"Permission denied|Stale file handle|Transport endpoint", re.IGNORECASE)


def _is_storage_failure(err: BaseException) -> bool:
  """Whether `err`, or an exception it was raised from, is the file system failing."""
  seen = set()
  while err is not None and id(err) not in seen:
    seen.add(id(err))
    if isinstance(err, OSError) or _STORAGE_FAILURE.search(str(err)):
      return True
    err = err.__cause__ or err.__context__
  return False


def flatten_fields(config: dict, prefix: str = "") -> dict[str, Any]:
  """A nested config dict as {"dotted.field": value}."""
  flat = {}
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      flat.update(flatten_fields(value, name + "."))
    else:
      flat[name] = value
  return flat


def _may_change(name: str) -> bool:
  if name in FIXED_FIELDS:
    return False
  return any(name == f or name.startswith(f + ".") for f in RESUMABLE_FIELDS)


def config_to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """A JSON-serialisable copy of a config (tuples become lists)."""
  return json.loads(config.to_json_best_effort())


def _with_defaults(saved: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
  """`saved`, plus every field of `defaults` it lacks (recursively; saved values win)."""
  merged = dict(defaults)
  for key, value in saved.items():
    if isinstance(value, dict) and isinstance(defaults.get(key), dict):
      merged[key] = _with_defaults(value, defaults[key])
    else:
      merged[key] = value
  return merged


def _completed(saved: dict[str, Any]) -> dict[str, Any]:
  """A saved config completed with today's schema defaults.

  A workdir written by an older cldro_jax lacks the fields added since. Every field added to the
  schema defaults to the behaviour from before it existed (a project rule; e.g.
  `model.views_in_one_pass=False` is the pass per view all earlier runs made), so filling in the
  defaults describes the run that was made.
  """
  from cldro_jax import config_defaults  # pylint: disable=import-outside-toplevel
  schema = config_to_dict(config_defaults.base_config(saved.get("domain", "image")))
  return _with_defaults(saved, schema)


def _saved_config_dict(path: str) -> dict[str, Any]:
  """config.json completed with today's schema defaults (see `_completed`); an unreadable one
  (a crash mid-write on a file system that reorders writes) is replaced by the copy of the
  config in the latest checkpoint."""
  try:
    with open(path, encoding="utf-8") as f:
      saved = json.load(f)
    if not isinstance(saved, dict):
      raise ValueError("it does not hold a JSON object")
  except ValueError as err:   # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
    workdir = os.path.dirname(path)
    saved = _config_from_checkpoints(workdir, quiet=True)
    if saved is None:
      raise CheckpointCorruptError(
          f"{path} is unreadable ({err}) and {workdir} holds no checkpoint with a copy of the "
          "config. Nothing was changed. Delete that file to start the run afresh.") from err
    logging.warning("%s is unreadable (%s); using the copy of the config in the latest "
                    "checkpoint", path, err)
  return _completed(saved)


def write_json_atomically(path: str, content: Any) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(content, f, indent=2, sort_keys=True)
    # On disk before the rename: a power loss must not leave an empty file under the real name.
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def has_checkpoints(workdir: str) -> bool:
  """Whether `workdir` holds a checkpoint (a run to resume), complete or not."""
  folder = os.path.join(workdir, "checkpoints")
  return os.path.isdir(folder) and any(n.isdigit() for n in os.listdir(folder))


def _config_from_checkpoints(workdir: str, *, quiet: bool = False) -> dict[str, Any] | None:
  """The config stored in the latest checkpoint, when config.json is gone; None when the
  workdir holds no checkpoint (a first start). `quiet`: the caller says why it is used."""
  if not has_checkpoints(workdir):
    return None
  checkpointer = Checkpointer(workdir, read_only=True)
  try:
    step = checkpointer.latest_step()
    meta = checkpointer.read_meta(step)
  finally:
    checkpointer.close()
  if not isinstance(meta.get("config"), dict):
    raise CheckpointMismatchError(
        f"{workdir} holds checkpoints but no config.json, and its checkpoints predate the copy "
        "of the config they now carry, so nothing tells which experiment they belong to. "
        "Nothing was changed. Put back the run's config.json, or use a new --workdir.")
  if not quiet:
    logging.warning("%s/config.json is missing; using the copy in the checkpoint of step %d",
                    workdir, step)
  return meta["config"]


def read_saved_config(workdir: str, *, example_config: str = "configs/quickstart.py"
                      ) -> ml_collections.ConfigDict:
  """The config the run in `workdir` was started with (workdir/config.json, or the copy every
  checkpoint carries when that file is lost), every field that later versions added filled with
  its default (which is the behaviour the run had).

  example_config: the config the error for a missing run suggests training (one of the caller's
  domain)."""
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    config = ml_collections.ConfigDict(_saved_config_dict(path))
  else:
    recovered = _config_from_checkpoints(workdir)
    if recovered is None:
      raise FileNotFoundError(
          f"{path} not found: {workdir} is not a cldro_jax workdir. Train one with "
          f"`python -m cldro_jax.main --config={example_config} --workdir=DIR`.")
    config = ml_collections.ConfigDict(_completed(recovered))
  # The run's own losses, encoders and data sources register themselves on import: what reads
  # the run's model or data (probe, load_encoder) needs them as the run did. (A resume imports
  # the modules of the command's own config instead: `imports` may change then.)
  from cldro_jax import config_defaults  # pylint: disable=import-outside-toplevel
  try:
    config_defaults.import_extensions(config)
  except ValueError as err:
    raise ValueError(f"{path}: {err}") from err
  return config


def saved_config_or_none(workdir: str) -> ml_collections.ConfigDict | None:
  """The config of the run in `workdir`: config.json, or the copy in its latest checkpoint when
  config.json is gone; None for a workdir with neither (nothing started there)."""
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    return ml_collections.ConfigDict(_saved_config_dict(path))
  recovered = _config_from_checkpoints(workdir)
  return None if recovered is None else ml_collections.ConfigDict(_completed(recovered))


def check_or_save_config(workdir: str, config: ml_collections.ConfigDict, *,
                         save: bool = True) -> None:
  """Saves `config.json` on the first start; on a resume, refuses a config that differs.

  Raises CheckpointMismatchError naming each differing field, unless it is one that may change
  on resume (RESUMABLE_FIELDS). With `save=False` it only checks (the trainer checks before it
  loads any data, and saves once the data and model are known to build, so that a run failing on
  missing data leaves no workdir behind).
  """
  path = os.path.join(workdir, "config.json")
  current = config_to_dict(config)
  if os.path.exists(path) and not has_checkpoints(workdir):
    # A start that stopped before its first checkpoint (out of memory at step 1, a wrong
    # setting): nothing to resume, so the corrected command starts afresh.
    if save and jax.process_index() == 0 and current != _read_json_or_none(path):
      logging.warning("%s holds no checkpoint: its config.json is replaced by this run's", workdir)
      write_json_atomically(path, current)
    return
  if os.path.exists(path):
    saved = _saved_config_dict(path)
  else:
    recovered = _config_from_checkpoints(workdir)
    if recovered is None:   # a first start
      if save and jax.process_index() == 0:
        write_json_atomically(path, current)
      return
    saved = _completed(recovered)
  if saved.get("domain") != current.get("domain"):   # say so, rather than list every field
    raise CheckpointMismatchError(
        f"The workdir {workdir} holds a run of the {saved.get('domain')!r} domain; this config "
        f"is for the {current.get('domain')!r} domain. Nothing was changed. Use a new --workdir.")
  saved_flat, current_flat = flatten_fields(saved), flatten_fields(current)
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
        f"in a new --workdir (from this run's trained encoder: add --config.init_from={workdir}"
        "). (Fields that may change on resume: " + ", ".join(RESUMABLE_FIELDS)
        + ", except " + ", ".join(FIXED_FIELDS) + ". Of these, mesh, model.views_in_one_pass "
        "and loss.matmul_precision change the floating-point rounding: the resumed run then "
        "matches an uninterrupted one to round-off, not bit for bit.)")
  # The run goes on with these settings: config.json follows them (where the data live now,
  # the evaluation asked for), so the probe and load_encoder find what the run used.
  if save and jax.process_index() == 0 and current != _read_json_or_none(path):
    write_json_atomically(path, current)


def _read_json_or_none(path: str) -> Any:
  """The file's JSON content; None when it is missing or unreadable."""
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except ValueError:
    return None


def parameter_signature(params: Any) -> str:
  """A short hash of the parameter tree's paths, shapes and dtypes (identifies the model)."""
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  text = ";".join(f"{jax.tree_util.keystr(path)}:{tuple(leaf.shape)}:{np.dtype(leaf.dtype).name}"
                  for path, leaf in leaves)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _leaf_bits(x: jax.Array) -> jax.Array:
  """The raw bits of an array as a flat uint32 vector (any dtype; 8-byte types give 2 words)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32).reshape(-1)
  word = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(x, word).astype(jnp.uint32).reshape(-1)


def _leaf_checksum(x: jax.Array) -> jax.Array:
  # A position-weighted sum of the bit patterns, modulo 2**32. Integer arithmetic is exact and
  # associative, so the value does not depend on how the array is sharded or on the reduction
  # order (the same on 1 device, 8 devices or several processes); odd weights make every
  # single-bit flip change it, and position weights catch swapped elements. (A hash of the bytes,
  # e.g. hashlib, would need every array on one host: not possible for arrays sharded over hosts.)
  bits = _leaf_bits(jnp.asarray(x))
  weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(0x9E3779B1) | jnp.uint32(1)
  return jnp.sum(bits * weights, dtype=jnp.uint32)


_checksums_jit = jax.jit(lambda tree: jax.tree.map(_leaf_checksum, tree))


def state_checksums(state_dict: Any) -> dict[str, int]:
  """`{path: uint32 checksum}` of every array of a (nested-dict) state; equal bits, equal sums."""
  sums = jax.device_get(_checksums_jit(state_dict))
  return {jax.tree_util.keystr(path): int(value)
          for path, value in jax.tree_util.tree_flatten_with_path(sums)[0]}


def _shape_table(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  """`{path: (shape, dtype name)}` of a tree of arrays or array metadata."""
  return {jax.tree_util.keystr(path): (tuple(leaf.shape), np.dtype(leaf.dtype).name)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


# Orbax warns whenever a manager is opened read-only, which is what every reader asks for.
_ORBAX_READ_ONLY_NOTICE = "Given directory is read only"


class _ManagerWithoutPreemptionReports(ocp.CheckpointManager):
  """An orbax CheckpointManager that leaves JAX's preemption sync service to the trainer.

  Orbax reports every saved step to that service (in `save`, even forced, and again when an
  asynchronous save finishes), while the trainer's preemption watch reports ids of its own
  (train._PreemptionWatch). The service answers a notice with the largest id reported plus one,
  so a mix of both can name a step the watch reaches thousands of steps late: the job would be
  killed before its preemption checkpoint. The trainer saves when the watch says so.
  """

  def reached_preemption(self, step: int) -> bool:
    del step
    return False


_META_DIGEST = "meta_sha256"


def _meta_digest(meta: dict[str, Any]) -> str:
  """sha256 of the metadata's JSON text (its own digest left out), as it reads back from disk.

  The arrays carry checksums; this covers the rest (the step a resume starts from, the logged
  means in flight, the config): a flipped bit there would silently skip or replay steps.
  """
  content = {k: v for k, v in meta.items() if k != _META_DIGEST}
  text = json.dumps(json.loads(json.dumps(content)), sort_keys=True)   # as stored, then read
  return hashlib.sha256(text.encode()).hexdigest()


class _StepRemovedError(FileNotFoundError):
  """A checkpoint that a running trainer's keep policy deleted while a reader was reading it."""


class Checkpointer:
  """Saves and restores the train state of one workdir (all processes call every method)."""

  def __init__(self, workdir: str, *, keep: int = 3, read_only: bool = False):
    """`read_only` for readers (probe, load_encoder, STS evaluation), which may run beside a
    training run: they neither create folders nor clean up unfinished temporary checkpoints,
    one of which may be the save the trainer is writing right now."""
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.read_only = read_only
    if read_only and not os.path.isdir(self.directory):
      raise FileNotFoundError(f"No checkpoint in {self.directory}.")
    # A read-only manager keeps and saves nothing; orbax warns about any other setting.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else keep, save_interval_steps=0 if read_only else 1,
        create=not read_only, cleanup_tmp_directories=not read_only,
        enable_async_checkpointing=True, read_only=read_only)
    # Handlers declared up front so that a checkpoint's array metadata can be read (to compare
    # shapes before restoring) without restoring it.
    with logs.absl_messages_hidden(_ORBAX_READ_ONLY_NOTICE if read_only else None):
      self._manager = _ManagerWithoutPreemptionReports(
          self.directory, options=options,
          item_handlers={"state": ocp.StandardCheckpointHandler(),
                         "meta": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, *, meta: dict[str, Any]) -> None:
    """Starts an asynchronous save; training continues while it is written.

    `meta` is stored with the arrays' checksums added (verified on restore).
    """
    if self.read_only:
      raise ValueError("this Checkpointer was opened read_only")
    state_dict = flax.serialization.to_state_dict(state)
    meta = dict(meta, checksums=state_checksums(state_dict))
    meta[_META_DIGEST] = _meta_digest(meta)
    # force: the trainer decides when to save (see _ManagerWithoutPreemptionReports).
    with self._save_errors_explained():
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state_dict), meta=ocp.args.JsonSave(meta)), force=True)

  def check_for_errors(self) -> None:
    """Raises CheckpointSaveError if an asynchronous save has failed since the last call.
    Without it a failed save (a full disk) shows only at the next save, a whole checkpoint
    interval of training later, with nothing newer behind it."""
    with self._save_errors_explained():
      self._manager.check_for_errors()   # the arrays' writes
      if not self._manager.is_saving_in_progress():
        # The commit (orbax's finalize thread) keeps its error until someone waits on it; a
        # finished one returns at once (a thread join: local to this process, no collective).
        self._manager.wait_until_finished()

  @contextlib.contextmanager
  def _save_errors_explained(self):
    """A failed write as one message: what failed, the checkpoint that is kept, the fix."""
    try:
      yield
    except Exception as err:   # pylint: disable=broad-except  (orbax/tensorstore raise many types)
      if not _is_storage_failure(err):
        raise   # a bug (a step saved twice, an API mismatch) keeps its own traceback
      try:
        complete = [int(n) for n in os.listdir(self.directory)
                    if n.isdigit() and self._looks_complete(int(n))]
      except OSError:
        complete = []
      kept = (f"The last complete checkpoint, step {max(complete)}, is kept"
              if complete else "No complete checkpoint is there yet")
      cause = (str(err).strip().splitlines() or [type(err).__name__])[-1][:300]
      raise CheckpointSaveError(
          f"Writing a checkpoint to {self.directory} failed ({type(err).__name__}: {cause}). "
          f"{kept}. Free space on that disk (df -h {self.directory}) or fix its file system, "
          "then rerun the same command to resume.") from err

  def _looks_complete(self, step: int) -> bool:
    """Whether a step folder still holds its metadata and its arrays' index (a folder half
    deleted by orbax's keep policy, killed midway, may lack them)."""
    folder = os.path.join(self.directory, str(step))
    return all(os.path.exists(os.path.join(folder, *parts))
               for parts in (("meta", "metadata"), ("state", "_METADATA")))

  def _corrupt(self, step: int, problem: str) -> CheckpointCorruptError | FileNotFoundError:
    """The error for a damaged checkpoint, naming the earlier ones and how to fall back.

    A step whose folder is gone was not damaged: a running trainer's keep policy deleted it
    while this (read-only) reader read it; that is a FileNotFoundError saying so."""
    path = os.path.join(self.directory, str(step))
    if not os.path.isdir(path):
      return _StepRemovedError(
          f"The checkpoint at step {step} in {self.directory} was removed while it was read (a "
          "running trainer keeps only its latest checkpoints); read again for the newest one.")
    earlier = [s for s in self.all_steps() if s < step and self._looks_complete(s)]
    if earlier:
      fix = (f"The earlier checkpoints (steps {earlier}) are untouched. To resume from step "
             f"{earlier[-1]}, move the damaged one out of the checkpoints folder, e.g. "
             f"`mv {path} {os.path.dirname(self.directory)}/damaged-checkpoint-{step}`, and "
             "rerun the same command.")
    else:
      fix = (f"There is no earlier checkpoint: move {path} away to restart from scratch, or "
             "use a new --workdir.")
    return CheckpointCorruptError(
        f"The checkpoint at step {step} in {self.directory} is damaged ({problem}). Nothing was "
        f"changed or deleted. {fix}")

  def _existing_step(self, step: int | None) -> int:
    """`step`, or the latest when None; FileNotFoundError naming the saved steps otherwise."""
    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(f"No checkpoint in {self.directory}.")
    if step is None:
      return self.latest_step()
    if step not in steps:
      raise FileNotFoundError(f"No checkpoint at step {step} in {self.directory}; saved steps: "
                              f"{sorted(steps)}.")
    return step

  def read_meta(self, step: int | None = None) -> dict[str, Any]:
    step = self._existing_step(step)
    try:
      restored = self._manager.restore(
          step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except FileNotFoundError as e:
      raise self._corrupt(step, f"its metadata file is missing: {e}") from e
    except ValueError as e:   # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
      raise self._corrupt(step, f"its metadata file is unreadable: {e}") from e
    except KeyError as e:     # orbax: the step folder has no "meta" item at all
      raise self._corrupt(step, f"it has no metadata: {e}") from e
    if not isinstance(restored["meta"], dict):
      raise self._corrupt(step, "its metadata file does not hold a JSON object")
    meta = dict(restored["meta"])
    saved_digest = meta.get(_META_DIGEST)
    # (None: written before the digest existed; nothing to compare with)
    if saved_digest is not None and saved_digest != _meta_digest(meta):
      raise self._corrupt(step, "its metadata differ from the digest saved with them")
    if "step" in meta and meta["step"] != step:
      raise self._corrupt(step, f"its metadata say step {meta['step']}")
    return meta

  def _verify_checksums(self, step: int, state_dict: Any, meta: dict[str, Any]) -> None:
    saved = meta.get("checksums")
    if saved is None:   # written before checksums existed: nothing to compare with
      return
    now = state_checksums(state_dict)
    bad = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if bad:
      shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
      raise self._corrupt(step, f"{len(bad)} arrays differ from the checksums saved with them: "
                                f"{shown}")

  def _check_state_step(self, step: int, state_dict: Any) -> None:
    """The train state's own step counter must be the checkpoint's step."""
    if isinstance(state_dict, dict) and "step" in state_dict:
      saved = int(np.asarray(jax.device_get(state_dict["step"])))
      if saved != step:
        raise self._corrupt(step, f"its train state is at step {saved}")

  def _saved_array_metadata(self, step: int) -> Any:
    """The saved `state` tree with each array's shape and dtype (read without the arrays)."""
    try:
      tree = self._manager.item_metadata(step)["state"]
    except Exception as e:  # orbax and TensorStore raise assorted types for bad files
      raise self._corrupt(step, f"its array metadata cannot be read: {e}") from e
    if tree is None:
      raise self._corrupt(step, "its array metadata is missing")
    return tree

  def _read_arrays(self, step: int, abstract: Any) -> Any:
    """The `state` item, into `abstract`'s structure, shapes and shardings.

    Called once the structure is known to match, so a failure here means damaged files.
    """
    try:
      return self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract)))["state"]
    except Exception as e:  # TensorStore raises a bare Exception for a missing or short chunk
      first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise self._corrupt(step, f"its array files cannot be read: {first_line}") from e

  def restore(self, target_state: Any, *, step: int | None = None,
              expected_signature: str | None = None) -> tuple[Any, dict[str, Any]]:
    """Restores into `target_state`'s structure, shapes and shardings.

    `target_state` may hold arrays or `jax.ShapeDtypeStruct`s (with shardings). Raises
    CheckpointMismatchError when the checkpoint was written by a different model or holds a
    differently shaped state, CheckpointCorruptError when its files are damaged.
    """
    step = self._existing_step(step)
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
    # Compare the saved arrays' paths, shapes and dtypes with the target's first, so that a state
    # of another structure (e.g. the online probe switched on or off) is reported as a mismatch,
    # and any later read error can only be damage.
    saved_table = _shape_table(self._saved_array_metadata(step))
    target_table = _shape_table(abstract)
    differences = [f"  {k}: saved {saved_table.get(k, '<absent>')}, now "
                   f"{target_table.get(k, '<absent>')}"
                   for k in sorted(set(saved_table) | set(target_table))
                   if saved_table.get(k) != target_table.get(k)]
    if differences:
      shown = differences[:10] + ([f"  ... and {len(differences) - 10} more"]
                                  if len(differences) > 10 else [])
      raise CheckpointMismatchError(
          f"The checkpoint at step {step} in {self.directory} holds a differently shaped train "
          "state (path: saved (shape, dtype), now (shape, dtype)):\n" + "\n".join(shown)
          + "\nNothing was changed. Use the config it was trained with, or a new --workdir.")
    restored = self._read_arrays(step, abstract)
    self._verify_checksums(step, restored, meta)
    self._check_state_step(step, restored)
    return flax.serialization.from_state_dict(target_state, restored), meta

  def restore_raw(self, *, step: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The saved arrays as a nested dict (no target structure needed), and the metadata.

    The arrays land on this process's first device, whatever topology wrote them; checksums are
    verified (CheckpointCorruptError on damage).
    """
    step = self._existing_step(step)
    meta = self.read_meta(step)
    # Every array onto this process's first device, whatever mesh or number of processes wrote
    # it: orbax refuses a target-less restore across topologies (e.g. a pod slice's checkpoint
    # read on a laptop).
    device = jax.local_devices()[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                            self._saved_array_metadata(step))
    # Under a one-device mesh of that device: called inside a training mesh of several devices
    # (--config.init_from), the checksum jit would refuse arrays living on one of them.
    with jax.set_mesh(jax.sharding.Mesh(np.array([device]), ("data",))):
      state = self._read_arrays(step, abstract)
      self._verify_checksums(step, state, meta)
      self._check_state_step(step, state)
    return state, meta

  def wait(self) -> None:
    with self._save_errors_explained():
      self._manager.wait_until_finished()

  def close(self) -> None:
    try:
      self.wait()
    finally:   # release orbax's threads even when the save in flight failed
      self._manager.close()


def read_checkpoint(workdir: str, *, step: int | None = None
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
  """`Checkpointer.restore_raw` of `workdir`'s checkpoint at `step` (the latest when None),
  opened read-only: safe beside a live run (its unfinished save is left alone)."""
  for attempt in range(2):
    checkpointer = Checkpointer(workdir, read_only=True)
    try:
      return checkpointer.restore_raw(step=step)
    except _StepRemovedError:
      # The latest step was replaced by a newer one while we read it: once more, for that one.
      if step is not None or attempt:
        raise
    finally:
      checkpointer.close()
  raise AssertionError("unreachable")
