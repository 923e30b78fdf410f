"""Command line: pre-train with a contrastive loss, then evaluate.

  python -m cldro_jax.main --config=configs/stl10.py --workdir=DIR \
      [--config.loss.name=adnce --config.optim.lr=3e-4 ...]

Rerunning the same command resumes from the last checkpoint in DIR (after a crash, a kill -9 or
a preemption). Scores go to DIR/results.json.

The same command runs on one CPU, one GPU, several GPUs and a Cloud TPU pod slice; a run spans
several processes (one per host or per GPU) with `--multiprocess` (Cloud TPU, SLURM, Open MPI:
JAX detects the rest), with explicit `--coordinator_address --num_processes --process_id`, or
when the environment says so (see `cldro_jax/distributed.py` and docs/scaling.md).
"""

import difflib
import glob
import importlib.util
import json
import os
import re
import sys
import tempfile
import traceback

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from cldro_jax import checkpointing, config_defaults, distributed, logs, metrics, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
_MULTIPROCESS = flags.DEFINE_bool(
    "multiprocess", False,
    "Run as one process of a multi-process job; JAX detects the cluster (Cloud TPU pod slice, "
    "SLURM srun, Open MPI mpirun) for whatever the flags below leave unset.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0's coordinator (multi-process runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Number of processes in the job (multi-process runs).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "This process's index in [0, num_processes).")
_LOCAL_DEVICE_IDS = flags.DEFINE_string(
    "local_device_ids", None, "Comma-separated local devices this process uses, e.g. 0,1 "
    "(default: all; JAX picks one GPU per process under SLURM / Open MPI).")
flags.mark_flags_as_required(["config", "workdir"])

# Errors whose message is the whole story (it names the fix): shown as one message, not a
# traceback. Anything else is a bug and keeps its traceback.
_USER_ERRORS = (checkpointing.CheckpointMismatchError, checkpointing.CheckpointCorruptError,
                checkpointing.CheckpointSaveError, train.NonFiniteLossError, train.ConfigError,
                train.WorkdirInUseError, FileNotFoundError)


def _usage_error(message: str) -> None:
  sys.stderr.write(f"cldro_jax: {message}\n")
  sys.exit(2)


def _check_inputs(config, workdir: str) -> None:
  """Rejects a bad config or workdir before any data or model work, in a few lines.

  train_and_evaluate validates too, but its ValueError would come under a traceback.
  """
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    _usage_error(f"--workdir={workdir} is a file, not a directory: pass a new directory (it is "
                 "created) or the workdir of the run to resume.")
  _check_writable(workdir)
  try:
    config_defaults.validate_config(config)
  except ValueError as err:
    _usage_error(f"{err}\nFix the --config.FIELD=VALUE override (or the config file).")


def _check_writable(workdir: str) -> None:
  """Refuses a workdir that cannot be created or written (under a file, on a read-only file
  system, in another user's folder): found otherwise at the first write, after the data and the
  model were built, under an orbax traceback. Probes with a temporary folder, removed at once,
  so a refused command leaves nothing behind."""
  if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", workdir):
    return   # a URL: the trainer refuses it with its own message
  existing = os.path.abspath(workdir)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    _usage_error(f"--workdir={workdir} lies under {existing}, which is a file: pass a directory "
                 "path.")
  try:
    os.rmdir(tempfile.mkdtemp(prefix=".cldro_jax_write_test", dir=existing))
  except OSError as err:
    _usage_error(f"--workdir={workdir} cannot be written ({existing}: {err.strerror}); pass a "
                 "directory you can write, e.g. --workdir=$HOME/runs/NAME.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logs.quiet_library_info()
  plan = distributed.plan_initialization(
      multiprocess=_MULTIPROCESS.value, coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
      local_device_ids=_LOCAL_DEVICE_IDS.value)
  # First: nothing may touch a device before jax.distributed has started. cldro_jax's imports
  # do not, but the config's own modules (config.imports, imported by its validation) may.
  distributed.initialize(plan)
  _check_inputs(_CONFIG.value, _WORKDIR.value)
  _warn_unread_run_length(_CONFIG.value)
  try:
    results = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except train.PreemptedError as stop:
    # Not a crash: say what happened and exit as a terminated process does (128 + SIGTERM, or
    # SIGINT for Ctrl-C); the same command (or a requeued job) resumes from the checkpoint.
    print(f"cldro_jax: {stop}", file=sys.stderr)
    sys.exit(stop.exit_code)
  except BaseException as err:  # pylint: disable=broad-except
    if jax.process_count() == 1:
      if isinstance(err, KeyboardInterrupt):
        # Ctrl-C outside the training loop (data loading, compilation, the final evaluation),
        # or a second one inside it (the first saves and stops with PreemptedError).
        print("cldro_jax: interrupted (Ctrl-C); the checkpoints already saved are kept. Rerun "
              "the same command to resume from the last one.", file=sys.stderr)
        sys.exit(130)
      if isinstance(err, _USER_ERRORS):   # the name too: docs and scripts refer to it
        print(f"cldro_jax: {type(err).__name__}: {err}", file=sys.stderr)
        sys.exit(1)
      raise
    # An error on one process of several (bad data in its slice, a full disk): the others wait
    # in a collective for it. A normal exit would first wait at jax.distributed's shutdown
    # barrier (5 minutes) for processes that never come; leaving at once lets the coordinator
    # see this process gone (heartbeat timeout) and stop the others.
    print(f"cldro_jax: process {jax.process_index()} of {jax.process_count()} failed; the other "
          "processes stop when they lose it (at most JAX's heartbeat timeout, about 100 s). "
          "The cause:",
          file=sys.stderr)
    traceback.print_exc()
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(1)  # pylint: disable=protected-access
  if jax.process_index() == 0:
    # stdout: the results as JSON for scripts; the person at the terminal reads the summary
    # (stderr, with the progress bar), the last thing the run prints.
    print(json.dumps(results, indent=2, sort_keys=True), flush=True)
    print("\n" + metrics.format_summary(results, _WORKDIR.value), file=sys.stderr)


def _warn_unread_run_length(config) -> None:
  """A `--config.total_epochs` override on a config that runs a fixed `total_steps` (sts_minilm,
  every `:runlocal`) is not read; say so. Only the command line knows it was the user's: the
  config files themselves may set both."""
  overrides = config_flags.get_override_values(flags.FLAGS["config"])
  if "total_epochs" in overrides and config.total_steps > 0:
    logs.warn(f"--config.total_epochs={config.total_epochs} is not used: this config runs a fixed "
              f"{config.total_steps} steps (config.total_steps > 0 takes precedence). Add "
              "--config.total_steps=0 to train for total_epochs.")


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing; an override naming no config field gets one line, not a traceback.

  ml_collections raises a bare KeyError/AttributeError for `--config.loss.nmae=...` (a TypeError
  for `--config.loss.name.x=...`), which absl would show as three chained tracebacks; the config
  file's own code raising the same errors keeps its traceback, not blamed on an override.
  """
  try:
    remaining = flags.FLAGS(argv)
    # ml_collections defers a missing config file's error to the config's first use (deep in
    # train, under two chained tracebacks); ask for it now.
    _CONFIG.value.get("domain")
    return remaining
  except OSError as err:
    _missing_config_file(argv, err)
  except flags.Error as err:
    if "Error whilst parsing config file" in str(err):
      # get_config's own error (a bad `:arg`): ml_collections puts the traceback in the message.
      lines = [line for line in str(err).splitlines() if line.strip()]
      _usage_error(f"--config={_config_arg(argv)}: {lines[-1].split(': ', 1)[-1]}")
    # absl's own parsing errors, reported as absl does.
    sys.stderr.write(f"FATAL Flags parsing error: {err}\n"
                     "Pass --helpshort or --helpfull to see help on flags.\n")
    sys.exit(1)
  except (KeyError, AttributeError, TypeError):
    unknown = _overrides_naming_no_field(argv)
    if not unknown:
      # The config file's own code failed (or no override is to blame): its traceback, with the
      # user's line, says more than any summary.
      sys.stderr.write(f"cldro_jax: --config={_config_arg(argv)} failed to load (the error is "
                       "in the config file, not in a --config. override):\n")
      raise
    for override, reason in unknown:
      sys.stderr.write(f"cldro_jax: {override} names no field of the config: {reason}\n")
    sys.stderr.write("The fields are those of the config file and cldro_jax/config_defaults.py; "
                     "`--config.FIELD=VALUE` can only change existing ones.\n")
    sys.exit(2)


def _overrides_naming_no_field(argv: list[str]) -> list[tuple[str, str]]:
  """The `--config.a.b` overrides whose path is no field of the file's config, with the reason
  (the config is loaded here on its own: ml_collections' error names the key only, and the
  file's own code can raise the same errors); empty when the file fails without the overrides."""
  path, _, arg = _config_arg(argv).partition(":")
  try:
    spec = importlib.util.spec_from_file_location("cldro_jax_config_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
  except Exception:  # pylint: disable=broad-except
    return []
  unknown = []
  for override in (a.split("=")[0] for a in argv[1:] if a.startswith("--config.")):
    node, parts = config, override[len("--config."):].split(".")
    for depth, part in enumerate(parts):
      if not isinstance(node, ml_collections.ConfigDict):
        unknown.append((override, f"config.{'.'.join(parts[:depth])} is a value, not a group "
                                  "of fields"))
        break
      if part not in node:
        close = difflib.get_close_matches(part, list(node.keys()), n=1)
        hint = f' Did you mean "{close[0]}" instead of "{part}"?' if close else ""
        unknown.append((override, f"no field '{part}'{hint}"))
        break
      node = node[part]
  return unknown


def _config_arg(argv: list[str]) -> str:
  """The value given to --config (the last one, as absl takes it)."""
  value = ""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      value = arg[len("--config="):]
    elif arg == "--config" and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def _missing_config_file(argv: list[str], err: OSError) -> None:
  path = _config_arg(argv).split(":", 1)[0]
  if path and os.path.exists(path):   # it exists but cannot be read: say why
    cause = " ".join(str(err).split()).split("earlier failure to load: ")[-1]
    _usage_error(f"--config={path} cannot be loaded ({cause}); pass a config file with a "
                 "get_config(), e.g. --config=configs/quickstart.py")
  # Run from another folder: the repository this package was installed from (pip install -e)
  # has the file, so name its absolute path.
  repository = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if not os.path.isabs(path) and os.path.isfile(os.path.join(repository, path)):
    _usage_error(f"config file {path!r} not found (paths are relative to {os.getcwd()}); "
                 f"run from {repository}, or pass --config={os.path.join(repository, path)}")
  folder = os.path.dirname(path) or "configs"
  shipped = sorted(glob.glob(os.path.join(folder, "*.py"))) or sorted(glob.glob("configs/*.py"))
  close = difflib.get_close_matches(path, shipped, n=1, cutoff=0.6)
  hint = f"did you mean --config={close[0]}? " if close else ""
  _usage_error(f"config file {path!r} not found (paths are relative to {os.getcwd()}); {hint}"
               f"the configs: {', '.join(shipped) or 'configs/*.py in the repository'}.")


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
