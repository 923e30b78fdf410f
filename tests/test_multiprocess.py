"""Multi-process runs: JAX's own runtime, two real processes on this machine == one process.

The two-process test starts `python -m cldro_jax.main` twice with `--coordinator_address
--num_processes --process_id` (2 CPU devices each, cross-process collectives over gloo), exactly as
one would on two hosts, and checks it against the same command in one process with 4 devices:
the same update from the same checkpoint, the same exact kNN evaluation (whose last eval
batch is partial and padded), and a checkpoint written by 2 processes restored and evaluated by 1.

The `plan_initialization` tests pin when `jax.distributed.initialize` is (and is not) called.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from cldro_jax import distributed
from cldro_jax import metrics as metrics_lib
from helpers import assert_trees_close, assert_updates_close, saved_arrays

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config=configs/quickstart.py:runlocal", "--config.data.train_per_class=4",
        "--config.data.test_per_class=4", "--config.batch_size=8",
        "--config.eval.linear_probe=none", "--config.eval.untrained_baseline=False"]
# Cluster variables a CI job may carry, which would turn a child into one process of that job.
_CLUSTER_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES",
                     "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE_IDS", "TPU_")


# ----------------------------------------------------------------------------------------------
# When to start the distributed runtime


def test_single_process_without_flags_or_cluster_environment():
  plan = distributed.plan_initialization(environ={"HOME": "/root", "PATH": "/bin"})
  assert not plan.multiprocess and plan.kwargs == {}


def test_explicit_flags_are_passed_through():
  plan = distributed.plan_initialization(coordinator_address="10.0.0.1:1234", num_processes=4,
                                         process_id=3, local_device_ids="0,1", environ={})
  assert plan.multiprocess
  assert plan.kwargs == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4,
                         "process_id": 3, "local_device_ids": [0, 1]}


def test_incomplete_flags_name_what_is_missing():
  with pytest.raises(ValueError, match=r"missing: --num_processes, --process_id"):
    distributed.plan_initialization(coordinator_address="10.0.0.1:1234", environ={})
  with pytest.raises(ValueError, match=r"--process_id=2 must be in \[0, 2\)"):
    distributed.plan_initialization(coordinator_address="h:1", num_processes=2, process_id=2,
                                    environ={})
  with pytest.raises(ValueError, match="--local_device_ids only applies"):
    distributed.plan_initialization(local_device_ids="0", environ={})
  with pytest.raises(ValueError, match="comma-separated list of integers"):
    distributed.plan_initialization(multiprocess=True, local_device_ids="a,b", environ={})


def test_multiprocess_flag_leaves_the_rest_to_jax_detection():
  plan = distributed.plan_initialization(multiprocess=True, environ={})
  assert plan.multiprocess and plan.kwargs == {}
  plan = distributed.plan_initialization(multiprocess=True, process_id=1, environ={})
  assert plan.kwargs == {"process_id": 1}


def test_environment_detection():
  env = {"JAX_COORDINATOR_ADDRESS": "head:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
  plan = distributed.plan_initialization(environ=env)
  assert plan.multiprocess and plan.kwargs == {"coordinator_address": "head:1234",
                                               "num_processes": 2, "process_id": 1}
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES and JAX_PROCESS_ID"):
    distributed.plan_initialization(environ={"JAX_COORDINATOR_ADDRESS": "head:1234"})
  slurm_step = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_PROCID": "2",
                "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_LOCALID": "0"}
  assert distributed.plan_initialization(environ=slurm_step).multiprocess
  # One task, or a batch script before `srun` starts the tasks: a single process.
  assert not distributed.plan_initialization(environ=dict(slurm_step, SLURM_NTASKS="1")).multiprocess
  batch_script = {k: v for k, v in slurm_step.items() if k != "SLURM_STEP_NODELIST"}
  assert not distributed.plan_initialization(environ=batch_script).multiprocess
  open_mpi_4 = {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0",
                "OMPI_MCA_orte_hnp_uri": "1234.0;tcp://10.0.0.1:5678"}
  assert distributed.plan_initialization(environ=open_mpi_4).multiprocess
  assert not distributed.plan_initialization(environ={"OMPI_COMM_WORLD_SIZE": "1"}).multiprocess
  # Open MPI 5 (PRRTE) gives JAX nothing to find the coordinator with: said, with the flags.
  with pytest.raises(ValueError, match=r"Open MPI 4 and older only.*--num_processes="
                     r"\$OMPI_COMM_WORLD_SIZE --process_id=\$OMPI_COMM_WORLD_RANK"):
    distributed.plan_initialization(environ={"OMPI_COMM_WORLD_SIZE": "2", "PRTE_LAUNCHED": "1"})


def test_multiprocess_flag_without_a_cluster_fails_fast_and_writes_nothing(tmp_path):
  workdir = tmp_path / "work"
  done = subprocess.run(
      [sys.executable, "-m", "cldro_jax.main", *TINY, f"--workdir={workdir}", "--multiprocess"],
      cwd=REPO, env=child_env(1, str(tmp_path / "cache")), capture_output=True, text=True,
      timeout=120, check=False)
  assert done.returncode != 0
  assert "Could not start a multi-process run" in done.stderr
  assert "--coordinator_address=HOST:PORT --num_processes=N --process_id=I" in done.stderr
  assert not workdir.exists()


# ----------------------------------------------------------------------------------------------
# Two processes on this machine


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def child_env(num_devices: int, cache_dir: str) -> dict[str, str]:
  """A child's environment: its own CPU device count, a shared compilation cache, no cluster."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(_CLUSTER_PREFIXES)}
  env.update(
      XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}", JAX_PLATFORMS="cpu",
      TF_CPP_MIN_LOG_LEVEL="3",
      # The same programs compile once for all children of the test (a cache hit is the same
      # executable, so results are unchanged).
      JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  return env


def _tail(text: str, lines: int = 40) -> str:
  return "\n".join(text.splitlines()[-lines:])


def run_processes(runs, log_dir, timeout=300):
  """Starts `cldro_jax.main` once per (arguments, environment) pair, all at once, and waits.

  Returns each process's (stdout, stderr); fails with their logs if any fails. Output goes to
  files: a full pipe would block a process, and its peers with it, inside a collective.
  """
  os.makedirs(log_dir, exist_ok=True)
  procs, paths = [], []
  for i, (args, env) in enumerate(runs):
    out_path, err_path = (os.path.join(log_dir, f"{len(os.listdir(log_dir))}_{i}.{kind}")
                          for kind in ("out", "err"))
    with open(out_path, "w", encoding="utf-8") as out, open(err_path, "w",
                                                            encoding="utf-8") as err:
      procs.append(subprocess.Popen([sys.executable, "-m", "cldro_jax.main", *args], cwd=REPO,
                                    env=env, stdout=out, stderr=err, text=True))
    paths.append((out_path, err_path))
  try:
    for proc in procs:
      proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    for proc in procs:
      proc.kill()
      proc.wait()
    pytest.fail(f"processes did not finish within {timeout} s")
  outputs = []
  for out_path, err_path in paths:
    with open(out_path, encoding="utf-8") as out, open(err_path, encoding="utf-8") as err:
      outputs.append((out.read(), err.read()))
  for i, (proc, (_, err)) in enumerate(zip(procs, outputs, strict=True)):
    assert proc.returncode == 0, f"process {i} exited with {proc.returncode}:\n{_tail(err)}"
  return outputs


def printed_results(stdout: str):
  """The results object a run prints, or None (gloo's C++ code also prints notes to stdout)."""
  text = "\n" + stdout
  start = text.find("\n{\n")
  return None if start < 0 else json.JSONDecoder().raw_decode(text[start + 1:])[0]


def read_json(path):
  with open(path, encoding="utf-8") as f:
    return json.load(f)


@pytest.mark.slow
def test_two_processes_equal_one_and_their_checkpoint_restores_in_one(tmp_path):
  cache = str(tmp_path / "xla_cache")
  two, one = str(tmp_path / "two_processes"), str(tmp_path / "one_process")
  # Step 1 in one process; then step 2 from that checkpoint, in 2 processes and in 1, then the kNN
  # monitor and the online probe's test accuracy (every_epochs=1 runs them at the end): 40 bank
  # and 40 test images in eval batches of 32, so the last eval batch of each is partial and
  # padded with a mask. SGD without momentum, so that the updates compare the gradients; from the
  # same checkpoint, because runs that each made their own first step differ by round-off that a
  # ReLU input near zero can amplify (docs/scaling.md).
  sgd = ["--config.optim.name=sgd", "--config.optim.lr=0.1", "--config.optim.momentum=0.0",
         "--config.optim.weight_decay=0.0", "--config.checkpoint_every_steps=1"]
  logs = str(tmp_path / "logs")
  run_processes([(TINY + sgd + ["--config.total_steps=1", "--config.eval.every_epochs=0",
                                f"--workdir={one}"], child_env(4, cache))], logs)
  shutil.copytree(one, two)
  args = TINY + sgd + ["--config.total_steps=2", "--config.eval.every_epochs=1"]
  port = _free_port()
  # The two processes of the job, and the single-process reference beside them (its compilation
  # overlaps theirs).
  outputs = run_processes(
      [(args + [f"--workdir={two}", f"--coordinator_address=localhost:{port}",
                "--num_processes=2", f"--process_id={i}"], child_env(2, cache)) for i in range(2)]
      + [(args + [f"--workdir={one}"], child_env(4, cache))], logs)
  # Both processes took part (4 devices over 2 processes), and only process 0 printed results.
  for i, (_, err) in enumerate(outputs[:2]):
    assert f"Process {i} of 2: 2 local devices, 4 in all" in err
  printed = [printed_results(out) for out, _ in outputs[:2]]
  assert printed[0]["step"] == 2 and printed[1] is None

  # Read back in this (single) process: the 2-process checkpoint restores here, its checksums
  # verified.
  a, meta_a = saved_arrays(two)
  b, meta_b = saved_arrays(one)
  assert meta_a["step"] == meta_b["step"] == 2
  # Same global batch, gathered negatives, BatchNorm over the global batch: from the same
  # checkpoint the same function; only the order of floating-point reductions differs (as in
  # tests/test_train_image.py's 8-device check). The 2 processes restored the 1-process one.
  for _, err in outputs[:2]:
    assert "Resumed from step 1" in err
  assert_updates_close(one, two, 1, 2, rel=1e-2, rel_per_array=0.1)
  assert_trees_close(a["model_state"], b["model_state"], rtol=2e-4, atol=2e-5)
  np.testing.assert_array_equal(a["rng"], b["rng"])
  loss_two = [r["loss"] for r in metrics_lib.read_metrics(two, "train")]
  loss_one = [r["loss"] for r in metrics_lib.read_metrics(one, "train")]
  assert len(loss_two) == 2   # process 0 alone wrote the metrics: one line per step
  np.testing.assert_allclose(loss_two, loss_one, rtol=1e-5)
  results_two, results_one = (read_json(os.path.join(w, "results.json")) for w in (two, one))
  scores = ("final_knn_top1", "final_knn_top5", "final_online_probe_top1")
  for key in scores:
    # Parameters equal up to reduction order: a near-tie among neighbours may flip at most an
    # image or so (2.5 points each of 40); exact counting is checked on the grid below and by the
    # bitwise restore at the end.
    assert abs(results_two[key] - results_one[key]) <= 2.5 + 1e-9, key
    # A score is a count over the 40 test images: a padding row counted, or a row counted
    # twice, would leave this grid.
    assert results_two[key] * 40 / 100 == pytest.approx(round(results_two[key] * 40 / 100))

  # The trainer itself restores the 2-process checkpoint in 1 process (4 devices): the same
  # command on the same workdir resumes at step 2, which is the end, and evaluates the restored
  # state. Same parameters, evaluated by 1 process instead of 2: the very same scores.
  restored = run_processes([(args + [f"--workdir={two}"], child_env(4, cache))], logs)
  assert "Resumed from step 2" in restored[0][1]
  rerun = read_json(os.path.join(two, "results.json"))
  assert {k: rerun[k] for k in scores} == {k: results_two[k] for k in scores}


def exit_codes_of_two_processes(tmp_path, args_per_process, timeout=150):
  """Starts `cldro_jax.main` as processes 0 and 1 of one job (stderr to tmp_path/<i>.err) and
  returns their exit codes; kills what is still running after `timeout` seconds."""
  port = _free_port()
  env = child_env(2, str(tmp_path / "cache"))
  procs = []
  for i, args in enumerate(args_per_process):
    args = [*args, f"--coordinator_address=localhost:{port}", "--num_processes=2",
            f"--process_id={i}"]
    with open(tmp_path / f"{i}.err", "w", encoding="utf-8") as err:
      procs.append(subprocess.Popen([sys.executable, "-m", "cldro_jax.main", *args], cwd=REPO,
                                    env=env, stdout=subprocess.DEVNULL, stderr=err))
  try:
    return [proc.wait(timeout=timeout) for proc in procs]
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_an_error_on_one_process_stops_the_others_quickly(tmp_path):
  # Process 1 reads a damaged data file (its own --config.data.path), process 0 a good one and
  # goes on to its first collective, where it waits for process 1. The failing process prints
  # its cause and exits at once: without that it first sat at jax.distributed's shutdown barrier
  # for 5 minutes, and process 0 with it.
  from test_faults import tiny_arrays  # pylint: disable=import-outside-toplevel
  good, bad = tmp_path / "good.npz", tmp_path / "bad.npz"
  np.savez(good, **tiny_arrays())
  bad.write_bytes(b"PK\x03\x04 not an npz")
  codes = exit_codes_of_two_processes(tmp_path, [
      [*TINY, "--config.data.source=npz", f"--config.data.path={data}",
       f"--workdir={tmp_path / 'work'}"] for data in (good, bad)])
  assert codes[0] != 0 and codes[1] == 1
  failed = (tmp_path / "1.err").read_text()
  assert "process 1 of 2 failed" in failed and "bad.npz" in failed


def test_a_workdir_the_processes_do_not_share_is_refused_before_training(tmp_path):
  # Two hosts each with a local folder at the same path: simulated by giving the two processes
  # two folders. Orbax would write half a checkpoint into each; the run must refuse at the start.
  codes = exit_codes_of_two_processes(
      tmp_path, [[*TINY, f"--workdir={tmp_path / f'host{i}' / 'run'}"] for i in range(2)])
  assert codes == [1, 1], codes
  for i in range(2):
    err = (tmp_path / f"{i}.err").read_text()
    assert "is not one folder that every process sees: process(es) [1] of 2" in err, _tail(err)
  # Nothing was trained or saved; process 0's marker is gone again.
  assert sorted(os.listdir(tmp_path / "host0" / "run")) == []
  assert not (tmp_path / "host1" / "run").exists()


def test_processes_with_different_configs_are_refused_before_training(tmp_path):
  # Another learning rate on one host would update the "replicated" parameters differently on
  # each process, silently. A data location may differ per host; here it is the same.
  work = f"--workdir={tmp_path / 'run'}"
  codes = exit_codes_of_two_processes(
      tmp_path, [[*TINY, work], [*TINY, work, "--config.optim.lr=0.002"]])
  assert codes == [1, 1], codes
  for i in range(2):
    err = (tmp_path / f"{i}.err").read_text()
    assert "process(es) [1] got another config than process 0" in err, _tail(err)
    assert "other cldro_jax code" not in err


def test_processes_reading_different_copies_of_the_data_are_refused_before_training(tmp_path):
  # Data locations may differ per host, so each host may hold its own copy: one of another
  # version would silently feed other examples into that host's slice of every batch.
  from cldro_jax.data import images  # pylint: disable=import-outside-toplevel
  arrays = images.load_fashion_mnist_subset_arrays()
  paths = []
  for i, invert in enumerate((False, True)):
    copy = {k: arrays[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    if invert:
      copy["x_train"] = 255 - copy["x_train"]
    paths.append(tmp_path / f"host{i}.npz")
    np.savez(paths[-1], **copy)
  work = f"--workdir={tmp_path / 'run'}"
  codes = exit_codes_of_two_processes(
      tmp_path, [[*TINY, work, "--config.data.source=npz", f"--config.data.path={path}"]
                 for path in paths])
  assert codes == [1, 1], codes
  for i in range(2):
    err = (tmp_path / f"{i}.err").read_text()
    assert "process(es) [1] hold other pre-training data than process 0" in err, _tail(err)
  assert not (tmp_path / "run" / "checkpoints").exists() or not os.listdir(
      tmp_path / "run" / "checkpoints")


def test_a_process_with_other_code_is_named():
  # Process 1 of 3 has another copy of the package (its code digest differs), same config.
  # (The two-process test above covers the gathering; this one the verdict.)
  mine = [distributed._digest("config"), distributed.package_digest()]  # pylint: disable=protected-access
  other = [mine[0], mine[1] + 1]
  problem = distributed.disagreement(np.asarray([mine, other, mine]))
  assert "process(es) [1] run other cldro_jax code than process 0 (install the same" in problem
  assert "another config" not in problem
  assert distributed.disagreement(np.asarray([mine, mine])) is None
  assert distributed.package_digest() > 0
