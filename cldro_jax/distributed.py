"""Multi-process start-up: whether, and how, to call `jax.distributed.initialize`.

JAX's own multi-process runtime is the distributed engine: the same program runs once per host
(or once per GPU), every process sees all devices of the job through one mesh, and collectives
cross processes. A run spans processes when one of these says so (checked in this order):

  1. `--multiprocess`: let JAX detect everything (Cloud TPU pod slices, SLURM `srun`, Open MPI
     `mpirun`, Kubernetes); any of the explicit flags below given alongside override what it
     would detect;
  2. explicit flags: `--coordinator_address=HOST:PORT --num_processes=N --process_id=I`
     (optionally `--local_device_ids=0,1`), e.g. several processes on one machine or a cluster
     without a scheduler JAX knows; all three are needed without `--multiprocess`;
  3. the environment, without any flag: `JAX_COORDINATOR_ADDRESS` together with
     `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`; a SLURM job step with more than one task
     (`srun`, `SLURM_NTASKS` > 1); an Open MPI launch with more than one rank
     (`OMPI_COMM_WORLD_SIZE` > 1).

Otherwise the run is single-process and `jax.distributed.initialize` is NOT called: without a
cluster it would fail, or wait for peers that never come. Cloud TPU pod slices are not detected
from the environment (that needs a metadata-server query); launch them with `--multiprocess`
(see docs/scaling.md).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import secrets
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils


@dataclasses.dataclass(frozen=True)
class InitPlan:
  """What `initialize` will do: call `jax.distributed.initialize(**kwargs)` or nothing."""

  multiprocess: bool
  kwargs: dict[str, Any]   # arguments for jax.distributed.initialize (unset ones auto-detected)
  reason: str              # which flag or environment variable decided it (logged)


def _positive_int(environ: Mapping[str, str], name: str) -> int | None:
  value = environ.get(name, "").strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"Environment variable {name}={value!r} is not an integer.") from None


def parse_device_ids(text: str | Sequence[int] | None) -> list[int] | None:
  """`"0,1"` -> [0, 1]; None or "" -> None (all local devices)."""
  if text is None or text == "" or text == []:
    return None
  if not isinstance(text, str):
    return [int(i) for i in text]
  try:
    return [int(part) for part in text.split(",") if part.strip()]
  except ValueError:
    raise ValueError(f"--local_device_ids={text!r} must be a comma-separated list of integers, "
                     "e.g. --local_device_ids=0,1") from None


def plan_initialization(*, multiprocess: bool = False, coordinator_address: str | None = None,
                        num_processes: int | None = None, process_id: int | None = None,
                        local_device_ids: str | Sequence[int] | None = None,
                        environ: Mapping[str, str] | None = None) -> InitPlan:
  """Decides from flags and environment whether this run spans processes (see module doc).

  A pure function of its arguments (`environ` defaults to `os.environ`), so it is testable.
  Raises ValueError for an incomplete or inconsistent set of flags, naming the fix.
  """
  environ = os.environ if environ is None else environ
  device_ids = parse_device_ids(local_device_ids)
  explicit = {"coordinator_address": coordinator_address or None,
              "num_processes": num_processes, "process_id": process_id}
  given = {k: v for k, v in explicit.items() if v is not None}
  if device_ids is not None:
    given["local_device_ids"] = device_ids

  if num_processes is not None and num_processes < 1:
    raise ValueError(f"--num_processes={num_processes} must be >= 1.")
  if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id={process_id} must be in [0, {num_processes}) for "
                     f"--num_processes={num_processes}.")

  if multiprocess:
    return InitPlan(True, given, "--multiprocess (JAX detects what the flags do not set)")

  named = [k for k in explicit if explicit[k] is not None]
  if named:
    missing = [k for k in explicit if explicit[k] is None]
    if missing:
      raise ValueError(
          "A multi-process run needs all of --coordinator_address, --num_processes and "
          f"--process_id; missing: {', '.join('--' + m for m in missing)}. Give them all (e.g. "
          "--coordinator_address=10.0.0.1:1234 --num_processes=2 --process_id=0 on the first "
          "host), or use --multiprocess to let JAX detect them on Cloud TPU / SLURM / Open MPI.")
    return InitPlan(True, given, "--coordinator_address/--num_processes/--process_id flags")

  if environ.get("JAX_COORDINATOR_ADDRESS"):
    env_count = _positive_int(environ, "JAX_NUM_PROCESSES")
    env_id = _positive_int(environ, "JAX_PROCESS_ID")
    if env_count is None or env_id is None:
      raise ValueError(
          "JAX_COORDINATOR_ADDRESS is set, but JAX_NUM_PROCESSES and JAX_PROCESS_ID are not "
          "both set. Export all three on every process (or unset JAX_COORDINATOR_ADDRESS for a "
          "single-process run).")
    if not 0 <= env_id < env_count:
      raise ValueError(f"JAX_PROCESS_ID={env_id} must be in [0, JAX_NUM_PROCESSES={env_count}).")
    kwargs = dict(coordinator_address=environ["JAX_COORDINATOR_ADDRESS"],
                  num_processes=env_count, process_id=env_id, **given)
    return InitPlan(True, kwargs, "JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID")

  slurm_tasks = _positive_int(environ, "SLURM_NTASKS")
  # SLURM_STEP_NODELIST exists only inside a job step (srun), which is what starts one process
  # per task; a batch script with several tasks allocated but not yet srun-launched has none.
  if (slurm_tasks is not None and slurm_tasks > 1 and "SLURM_STEP_NODELIST" in environ
      and "SLURM_PROCID" in environ):
    return InitPlan(True, given, f"SLURM job step with SLURM_NTASKS={slurm_tasks}")

  mpi_size = _positive_int(environ, "OMPI_COMM_WORLD_SIZE")
  if mpi_size is not None and mpi_size > 1:
    if "OMPI_MCA_orte_hnp_uri" not in environ:
      # JAX finds the coordinator through Open MPI 4's ORTE; Open MPI 5 (PRRTE) has none.
      raise ValueError(
          f"An Open MPI launch (OMPI_COMM_WORLD_SIZE={mpi_size}) without Open MPI 4's ORTE "
          "(no OMPI_MCA_orte_hnp_uri): JAX detects Open MPI 4 and older only. Under Open MPI 5 "
          "give the job on every process: --coordinator_address=FIRST_HOST:PORT "
          "--num_processes=$OMPI_COMM_WORLD_SIZE --process_id=$OMPI_COMM_WORLD_RANK")
    return InitPlan(True, given, f"Open MPI launch with OMPI_COMM_WORLD_SIZE={mpi_size}")

  if device_ids is not None:
    raise ValueError("--local_device_ids only applies to a multi-process run; add "
                     "--multiprocess or the --coordinator_address/--num_processes/--process_id "
                     "flags, or drop it (use --config.mesh.num_devices to use fewer devices).")
  return InitPlan(False, {}, "no multi-process flag or cluster environment: single process")


def initialize(plan: InitPlan) -> None:
  """Carries out `plan`; must run before anything touches a JAX device."""
  if not plan.multiprocess:   # the usual case says nothing (--verbosity=1 shows why)
    logging.debug("Distributed start-up: %s.", plan.reason)
    return
  logging.info("Distributed start-up: %s.", plan.reason)
  # Cross-process collectives on CPU devices need an implementation (gloo is the default in
  # recent jax, "none" in older ones); accelerators use their own (NCCL, ICI) and ignore this.
  if not jax.config.jax_cpu_collectives_implementation:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(**plan.kwargs)
  except ValueError as e:   # e.g. "coordinator_address should be defined": nothing detected
    raise ValueError(
        f"Could not start a multi-process run ({plan.reason}): {e} JAX detects the cluster only "
        "on Cloud TPU, under SLURM (srun), Open MPI (mpirun) and Kubernetes; elsewhere give "
        "--coordinator_address=HOST:PORT --num_processes=N --process_id=I on every process "
        "(for a single-process run: no --multiprocess, outside the cluster launcher).") from e
  logging.info("Process %d of %d: %d local devices, %d in all.", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def check_workdir_shared(workdir: str, *, wait_s: float = 10.0) -> None:
  """Refuses a multi-process run whose processes do not share `workdir`.

  Orbax writes one checkpoint from all processes into one folder (each process its own arrays,
  process 0 the metadata), and process 0 alone writes config.json and the metrics: on a folder
  local to each host, checkpoints would be incomplete everywhere and a preempted job would lose
  its work. Process 0 writes a file named by a token all processes agree on; every process must
  see it (polled for `wait_s` seconds: a network file system may show a new file late).
  """
  if jax.process_count() == 1:
    return
  token = int(multihost_utils.broadcast_one_to_all(np.int32(secrets.randbits(31))))
  marker = os.path.join(workdir, f".cldro_jax_shared_check_{token:x}")
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(marker, "w", encoding="utf-8") as f:
      f.write(str(token))
  multihost_utils.sync_global_devices("cldro_jax: shared-workdir marker written")
  deadline = time.monotonic() + wait_s
  while not (seen := os.path.exists(marker)) and time.monotonic() < deadline:
    time.sleep(0.5)
  seen_by = np.asarray(multihost_utils.process_allgather(np.asarray(seen))).reshape(-1)
  multihost_utils.sync_global_devices("cldro_jax: shared-workdir marker checked")
  if jax.process_index() == 0:
    os.remove(marker)
  blind = [i for i, ok in enumerate(seen_by) if not ok]
  if blind:
    raise ValueError(
        f"--workdir={workdir} is not one folder that every process sees: process(es) {blind} "
        f"of {len(seen_by)} do not see a file process 0 wrote there. A multi-process run writes "
        "its checkpoints from every process into one folder: use a shared file system on every "
        "host (NFS/Filestore, or a bucket mounted with gcsfuse) and pass its path, the same on "
        "every host (docs/scaling.md).")


# Settings a host may legitimately set its own way: where its copy of the data lives and how it
# reads it, and whether it draws a progress bar.
PER_HOST_FIELDS = ("data.data_dir", "data.path", "data.test_dir", "data.sts_root",
                   "data.read_threads", "data.in_memory", "data.in_memory_max_mb",
                   "data.download", "data.prefetch", "progress_bar")


def _digest(text: str | bytes) -> int:
  """31 bits of SHA-256: an int32 that JAX's collectives carry without x64."""
  data = text.encode() if isinstance(text, str) else text
  return int.from_bytes(hashlib.sha256(data).digest()[:4], "little") >> 1


@functools.cache
def package_digest() -> int:
  """A digest of this process's cldro_jax source files (names and contents)."""
  root = os.path.dirname(os.path.abspath(__file__))
  h = hashlib.sha256()
  for folder, dirs, files in sorted(os.walk(root)):
    dirs.sort()
    for name in sorted(f for f in files if f.endswith(".py")):
      path = os.path.join(folder, name)
      h.update(os.path.relpath(path, root).encode() + b"\0")
      with open(path, "rb") as f:
        h.update(f.read() + b"\0")
  return _digest(h.digest())


def check_same_run(config_dict: Mapping[str, Any]) -> None:
  """Refuses a multi-process run whose processes got different configs or code.

  Every process traces the train step from its own config and code; replicated parameters are
  then updated differently on different hosts (another learning rate, a stale copy of the code on
  one host) and drift apart with no error. Per-host data locations may differ (PER_HOST_FIELDS).
  """
  if jax.process_count() == 1:
    return
  from cldro_jax import checkpointing  # pylint: disable=import-outside-toplevel
  shared = {k: v for k, v in checkpointing.flatten_fields(config_dict).items()
            if not any(k == f or k.startswith(f + ".") for f in PER_HOST_FIELDS)}
  mine = np.asarray([_digest(json.dumps(shared, sort_keys=True)), package_digest()], np.int32)
  problem = disagreement(np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, 2))
  if problem:
    raise ValueError(problem)


def check_same_data(fingerprint: str, plan: Mapping[str, Any]) -> None:
  """Refuses a multi-process run whose processes read different data.

  Data locations may differ per host (PER_HOST_FIELDS), so each host may hold its own copy; a
  copy of another version, or one partly downloaded, would silently feed other examples into its
  slice of every batch. `fingerprint` is the task's digest of its pre-training data; `plan`, what
  the task derived from its files that every process must share (e.g. whether it evaluates).
  """
  if jax.process_count() == 1:
    return
  mine = np.asarray([_digest(fingerprint), _digest(json.dumps(dict(plan), sort_keys=True))],
                    np.int32)
  digests = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, 2)
  other_data = [i for i, d in enumerate(digests[:, 0]) if d != digests[0, 0]]
  other_plan = [i for i, d in enumerate(digests[:, 1]) if d != digests[0, 1]]
  if other_data or other_plan:
    raise ValueError(
        "The processes of this run read different data: "
        + "; ".join(([f"process(es) {other_data} hold other pre-training data than process 0 "
                      "(another size, or other examples at the same positions)"]
                     if other_data else [])
                    + ([f"process(es) {other_plan} found other evaluation files than process 0 "
                        f"(this process: {dict(plan)})"] if other_plan else []))
        + ". Give every host the same copy of the data (or one shared folder).")


def disagreement(digests: np.ndarray) -> str | None:
  """What differs between processes, from their (config, code) digests, one row per process;
  None when they all agree with process 0."""
  other_config = [i for i, d in enumerate(digests[:, 0]) if d != digests[0, 0]]
  other_code = [i for i, d in enumerate(digests[:, 1]) if d != digests[0, 1]]
  if not (other_config or other_code):
    return None
  what = "; ".join(
      ([f"process(es) {other_config} got another config than process 0 (the same command and "
        "config file on every host; only data locations may differ)"] if other_config else [])
      + ([f"process(es) {other_code} run other cldro_jax code than process 0 (install the "
          "same revision on every host)"] if other_code else []))
  return (f"The processes of this run disagree: {what}. Their parameters would drift apart "
          "silently.")
