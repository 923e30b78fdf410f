"""Faults: kill -9 mid-run, death during a checkpoint write, damaged checkpoints, damaged data.

Every run here is the real command, `python -m cldro_jax.main`, in a child process (1 CPU device),
on a small `.npz` written by the test in the real format from the Fashion-MNIST images shipped
with the package. All children share one compilation cache, so the train step compiles once.
The reference is one uninterrupted run; a run that was killed and rerun must end with the same
arrays, bit for bit (same data order, same augmentation keys, same optimizer state).

Set CLDRO_FAULT_SEED to replay the random kill step of a failed run.
"""

import contextlib
import gzip
import hashlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from cldro_jax import checkpointing, train
from cldro_jax.data import images as images_lib
from configs import quickstart as quickstart_config
from helpers import assert_trees_equal, saved_arrays, tiny_image_config, with_overrides

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_STEPS = 20
EVERY = 3          # checkpoints at 3, 6, ..., 18 and 20; all kept
_CLUSTER_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES",
                     "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE_IDS", "TPU_")


# ----------------------------------------------------------------------------------------------
# Helpers


def _tail(text: str, lines: int = 40) -> str:
  return "\n".join(text.splitlines()[-lines:])


def tiny_arrays() -> dict[str, np.ndarray]:
  """4 train and 4 test images per class of the shipped Fashion-MNIST subset."""
  shipped = images_lib.load_fashion_mnist_subset_arrays()
  train_idx = images_lib.first_per_class(shipped["y_train"], 4)
  test_idx = images_lib.first_per_class(shipped["y_test"], 4)
  return {"x_train": shipped["x_train"][train_idx], "y_train": shipped["y_train"][train_idx],
          "x_test": shipped["x_test"][test_idx], "y_test": shipped["y_test"][test_idx]}


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
  """The data file, the compilation cache and the uninterrupted reference run."""
  root = tmp_path_factory.mktemp("faults")
  npz = str(root / "fashion_tiny.npz")
  np.savez(npz, **tiny_arrays())
  env = {k: v for k, v in os.environ.items() if not k.startswith(_CLUSTER_PREFIXES)}
  env.update(XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
             TF_CPP_MIN_LOG_LEVEL="3", JAX_COMPILATION_CACHE_DIR=str(root / "xla_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  shared = {"npz": npz, "env": env, "root": root}
  reference = str(root / "uninterrupted")
  result = run_command(shared, reference)
  assert result.returncode == 0, _tail(result.stderr)
  shared["reference"] = reference
  return shared


def flags(shared, workdir, *extra):
  """The training command's flags: tiny, but every part of the real path."""
  return [
      "--config=configs/quickstart.py:runlocal", "--config.data.source=npz",
      f"--config.data.path={shared['npz']}", "--config.data.train_per_class=4",
      "--config.data.test_per_class=4", "--config.batch_size=8",
      f"--config.total_steps={TOTAL_STEPS}", f"--config.checkpoint_every_steps={EVERY}",
      "--config.keep_checkpoints=10", "--config.log_every_steps=1",
      "--config.eval.every_epochs=0", "--config.eval.linear_probe=none",
      "--config.eval.untrained_baseline=False", f"--workdir={workdir}", *extra]


MAIN = [sys.executable, "-m", "cldro_jax.main"]


def run_command(shared, workdir, *extra, timeout=240):
  return subprocess.run(MAIN + flags(shared, workdir, *extra), cwd=REPO, env=shared["env"],
                        capture_output=True, text=True, timeout=timeout, check=False)


def start_command(shared, argv, log_path):
  """Starts a run in the background; its log goes to a file (a pipe could fill and block it)."""
  with open(log_path, "w", encoding="utf-8") as log:
    proc = subprocess.Popen(argv, cwd=REPO, env=shared["env"], stdout=subprocess.DEVNULL,
                            stderr=log, text=True)
  proc.log_path = log_path
  return proc


def kill_9(proc):
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, f"exit code {proc.returncode}, not killed"


def wait_for(condition, proc, timeout, what):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if condition():
      return
    if proc.poll() is not None:
      with open(proc.log_path, encoding="utf-8") as f:
        pytest.fail(f"the run ended (code {proc.returncode}) before {what}:\n{_tail(f.read())}")
    time.sleep(0.02)
  proc.kill()
  pytest.fail(f"timed out waiting for {what}")


def logged_steps(workdir) -> list[int]:
  """Train steps in metrics.jsonl so far (a line being written may be incomplete: skipped)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  steps = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      match = re.match(r'\{"step": (\d+), "split": "train"', line)
      if match and line.endswith("\n"):
        steps.append(int(match.group(1)))
  return steps


def committed_steps(workdir) -> list[int]:
  # Listed by hand: opening a Checkpointer would clean up the temporary directories under test.
  folder = os.path.join(workdir, "checkpoints")
  names = os.listdir(folder) if os.path.isdir(folder) else []
  return sorted(int(n) for n in names if n.isdigit())


def file_digests(folder) -> dict[str, str]:
  """sha256 of every file under `folder` but the workdir lock (who holds it: rewritten by each
  run that takes it)."""
  digests = {}
  for root, _, files in os.walk(folder):
    for name in files:
      if name == train.LOCK_FILE:
        continue
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        digests[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
  return digests


def resumed_from(stderr: str) -> int:
  match = re.search(r"Resumed from step (\d+)", stderr)
  assert match, f"the rerun did not resume:\n{_tail(stderr)}"
  return int(match.group(1))


# ----------------------------------------------------------------------------------------------
# kill -9


def test_kill_9_at_a_random_step_then_the_same_command_resumes_exactly(shared, tmp_path):
  seed = int(os.environ.get("CLDRO_FAULT_SEED", random.SystemRandom().randrange(2**31)))
  kill_at = random.Random(seed).randint(EVERY + 1, TOTAL_STEPS - 8)
  about = f"(CLDRO_FAULT_SEED={seed}: kill once step {kill_at} is logged)"
  workdir = str(tmp_path / "killed")
  proc = start_command(shared, MAIN + flags(shared, workdir), str(tmp_path / "log"))
  # Saves are asynchronous: also wait for the first one to be complete, so that there is
  # something to resume from (killed earlier, a rerun simply starts afresh).
  wait_for(lambda: max(logged_steps(workdir), default=0) >= kill_at and committed_steps(workdir),
           proc, 180, f"step {kill_at} {about}")
  kill_9(proc)
  assert not os.path.exists(os.path.join(workdir, "results.json")), about
  last_logged = max(logged_steps(workdir))
  assert last_logged < TOTAL_STEPS, about
  before = committed_steps(workdir)

  rerun = run_command(shared, workdir)   # the very same command
  assert rerun.returncode == 0, f"{about}\n{_tail(rerun.stderr)}"
  # It resumed from the last complete checkpoint (not from scratch, not from a partial one).
  assert resumed_from(rerun.stderr) == max(before), about
  assert 0 < max(before) <= last_logged, about
  state, meta = saved_arrays(workdir)
  reference, reference_meta = saved_arrays(shared["reference"])
  assert meta["step"] == reference_meta["step"] == TOTAL_STEPS
  assert_trees_equal(state, reference)
  # Every step was trained; the steps after the checkpoint were trained again and are logged
  # once (the killed run's lines past the checkpoint were dropped on resume).
  assert logged_steps(workdir) == list(range(1, TOTAL_STEPS + 1))


def test_sigterm_saves_a_checkpoint_at_that_step_then_the_same_command_resumes(shared, tmp_path):
  # What a scheduler sends before a preemption: the run finishes its step, checkpoints it (even
  # between the periodic checkpoints) and exits with a message; the rerun loses no step.
  workdir = str(tmp_path / "terminated")
  proc = start_command(shared, MAIN + flags(shared, workdir), str(tmp_path / "log"))
  wait_for(lambda: max(logged_steps(workdir), default=0) >= EVERY + 1, proc, 180, "step 4")
  proc.send_signal(signal.SIGTERM)
  proc.wait(timeout=120)
  with open(proc.log_path, encoding="utf-8") as f:
    log = f.read()
  assert proc.returncode != 0 and "Rerun the same command to resume" in log, _tail(log)
  stopped_at = int(re.search(r"a checkpoint of step (\d+) is saved", log).group(1))
  assert max(committed_steps(workdir)) == stopped_at == max(logged_steps(workdir))
  assert stopped_at < TOTAL_STEPS

  rerun = run_command(shared, workdir)
  assert rerun.returncode == 0, _tail(rerun.stderr)
  assert resumed_from(rerun.stderr) == stopped_at
  # The command keeps orbax's per-save INFO chatter out of the terminal (the rerun saved)
  # while our own INFO line about the resume stays.
  assert not re.search(r"^I\d{4} .* (checkpoint_manager|atomicity)\.py:\d+\]", rerun.stderr,
                       re.MULTILINE), _tail(rerun.stderr)
  assert_trees_equal(saved_arrays(workdir)[0], saved_arrays(shared["reference"])[0])
  assert logged_steps(workdir) == list(range(1, TOTAL_STEPS + 1))


# The same command, except that orbax's final rename of the step-6 checkpoint (the moment a
# checkpoint becomes complete) never returns: the process is killed with that checkpoint written
# but not committed, while the step-3 checkpoint is on disk.
_HANG_IN_COMMIT = r"""
import asyncio, os, sys
from orbax.checkpoint._src.path import async_path
hang_step, marker = sys.argv.pop(1), sys.argv.pop(1)
_rename = async_path.rename

async def rename(src, dst):
  if os.path.basename(str(src)) == hang_step + ".orbax-checkpoint-tmp":
    open(marker, "w").close()
    await asyncio.sleep(3600)
  return await _rename(src, dst)

async_path.rename = rename
from absl import app
from cldro_jax import main
app.run(main.main)
"""


def test_death_while_a_checkpoint_is_written_keeps_the_previous_one(shared, tmp_path):
  workdir = str(tmp_path / "died_in_save")
  marker = str(tmp_path / "in_commit")
  hang = 2 * EVERY
  proc = start_command(
      shared, [sys.executable, "-c", _HANG_IN_COMMIT, str(hang), marker]
      + flags(shared, workdir), str(tmp_path / "log"))
  wait_for(lambda: os.path.exists(marker), proc, 180, f"the step-{hang} checkpoint commit")
  kill_9(proc)
  partial = os.path.join(workdir, "checkpoints", f"{hang}.orbax-checkpoint-tmp")
  assert committed_steps(workdir) == [EVERY]
  assert os.path.isdir(partial)
  # Make the unfinished checkpoint visibly half-written too: truncate its largest file.
  files = [os.path.join(r, n) for r, _, names in os.walk(partial) for n in names]
  largest = max(files, key=os.path.getsize)
  os.truncate(largest, os.path.getsize(largest) // 2)

  # A reader beside the run (probe, load_encoder, STS evaluation) must leave an unfinished
  # checkpoint alone: it may be the save a live trainer is writing right now.
  import cldro_jax  # pylint: disable=import-outside-toplevel
  assert cldro_jax.load_encoder(workdir).step == EVERY
  assert os.path.isdir(partial)
  with pytest.raises(FileNotFoundError, match=rf"No checkpoint at step {hang} in .*saved steps: "
                     rf"\[{EVERY}\]"):
    cldro_jax.load_encoder(workdir, step=hang)
  assert os.path.isdir(partial)

  rerun = run_command(shared, workdir)
  assert rerun.returncode == 0, _tail(rerun.stderr)
  assert resumed_from(rerun.stderr) == EVERY   # the previous checkpoint, intact
  assert not os.path.exists(partial)   # the half-written one was cleaned up and written anew
  assert committed_steps(workdir) == committed_steps(shared["reference"])
  assert_trees_equal(saved_arrays(workdir, EVERY)[0], saved_arrays(shared["reference"], EVERY)[0])
  assert_trees_equal(saved_arrays(workdir)[0], saved_arrays(shared["reference"])[0])


class _PreemptionSyncService:
  """JAX's protocol behind multihost_utils.reached_preemption_sync_point: on a notice, the safe
  step is the largest id reported so far plus one; the call that reports it returns True."""

  def __init__(self):
    self.reported, self.safe = 0, None

  def notice(self):
    self.safe = self.reported + 1

  def reached(self, step_id):
    self.reported = step_id
    return step_id == self.safe


@pytest.mark.parametrize("notice_after_steps", [0, 3])
def test_a_preemption_notice_reaches_every_process_of_a_resumed_run(monkeypatch,
                                                                    notice_after_steps):
  # A notice while a resumed run (checkpoint 11) still restores and compiles: with the global
  # step as the id (12, 13, ...) the safe step 1 never came and the notice was swallowed.
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  service = _PreemptionSyncService()
  monkeypatch.setattr(train.jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", service.reached)
  watch = train._PreemptionWatch()  # pylint: disable=protected-access
  done = 11
  for _ in range(notice_after_steps):
    done += 1
    assert not watch.should_stop(done)
  service.notice()
  done += 1
  assert watch.should_stop(done)   # the very next step's end: checkpoint it and stop


def test_checkpoint_saves_leave_the_preemption_ids_to_the_watch(monkeypatch, tmp_path):
  # Orbax reports each saved (global) step to the same sync service; mixed with the watch's
  # ids, a notice after the save of step 13 named step 14, which the watch's ids (1, 2, 3, ...)
  # reached 11 steps late: on a real preemption the job is killed first.
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  service = _PreemptionSyncService()
  monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", service.reached)
  with monkeypatch.context() as several_processes:   # for the watch only: orbax would need them
    several_processes.setattr(train.jax, "process_count", lambda: 2)
    watch = train._PreemptionWatch()  # pylint: disable=protected-access
  checkpointer = checkpointing.Checkpointer(str(tmp_path))
  state = {"w": np.arange(4.0, dtype=np.float32)}
  try:
    for done in (12, 13):   # a run resumed at step 11, checkpointing every step
      checkpointer.save(done, state, meta={"step": done})
      assert not watch.should_stop(done)
    checkpointer.wait()     # an asynchronous save finishing reports its step too
    service.notice()
    assert watch.should_stop(14)
  finally:
    checkpointer.close()


def test_a_failed_asynchronous_save_is_one_message_naming_the_kept_checkpoint(monkeypatch,
                                                                             tmp_path):
  # The disk fills while step 2 is written in the background: the trainer asks at its next log
  # line (check_for_errors), not a whole checkpoint interval later at the next save, and hears
  # one message with the checkpoint that is kept and the fix, not orbax's tracebacks.
  import errno  # pylint: disable=import-outside-toplevel
  from orbax.checkpoint._src.path import async_path  # pylint: disable=import-outside-toplevel
  rename = async_path.rename

  async def rename_on_a_full_disk(src, dst):
    if os.path.basename(str(src)).startswith("2.orbax-checkpoint-tmp"):
      raise OSError(errno.ENOSPC, "No space left on device", str(dst))
    return await rename(src, dst)
  monkeypatch.setattr(async_path, "rename", rename_on_a_full_disk)
  checkpointer = checkpointing.Checkpointer(str(tmp_path))
  state = {"w": np.arange(4.0, dtype=np.float32)}
  try:
    checkpointer.save(1, state, meta={"step": 1})
    checkpointer.wait()
    checkpointer.save(2, state, meta={"step": 2})
    with pytest.raises(checkpointing.CheckpointSaveError) as err:
      deadline = time.time() + 60
      while time.time() < deadline:   # the background save fails a moment later
        checkpointer.check_for_errors()
        time.sleep(0.05)
    message = str(err.value)
    assert "No space left on device" in message
    assert "The last complete checkpoint, step 1, is kept" in message
    assert "rerun the same command to resume" in message
  finally:
    with contextlib.suppress(checkpointing.CheckpointSaveError):
      checkpointer.close()
  assert checkpointing.Checkpointer(str(tmp_path), read_only=True).latest_step() == 1
  # A bug is not a full disk: saving a step twice keeps orbax's own error and traceback.
  again = checkpointing.Checkpointer(str(tmp_path))
  try:
    with pytest.raises(Exception) as bug:
      again.save(1, state, meta={"step": 1})
      again.wait()
    assert not isinstance(bug.value, checkpointing.CheckpointSaveError)
    assert "already exists" in str(bug.value)
  finally:
    again.close()


def test_the_trainer_asks_for_failed_saves_at_every_log_line(monkeypatch, tmp_path):
  # A save that failed in the background stops the run at the next log line, not one checkpoint
  # interval later (Checkpointer.check_for_errors, tested above with a real failed save).
  from cldro_jax import metrics  # pylint: disable=import-outside-toplevel
  asked = []
  real = checkpointing.Checkpointer.check_for_errors
  monkeypatch.setattr(checkpointing.Checkpointer, "check_for_errors",
                      lambda self: asked.append(1) or real(self))
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(tiny_image_config(log_every_steps=2), workdir)
  assert len(asked) == len(metrics.read_metrics(workdir, "train")) == 2


# ----------------------------------------------------------------------------------------------
# Damaged checkpoints# ----------------------------------------------------------------------------------------------
# Damaged checkpoints


def _flip_bytes(path, count=16, seed=0):
  rng = np.random.default_rng(seed)
  with open(path, "r+b") as f:
    size = os.path.getsize(path)
    for offset in rng.integers(0, size, count):
      f.seek(int(offset))
      byte = f.read(1)
      f.seek(int(offset))
      f.write(bytes([byte[0] ^ 0xFF]))


def _array_data_files(step_dir):
  folder = os.path.join(step_dir, "state")
  return [os.path.join(r, n) for r, _, names in os.walk(folder) for n in names
          if os.path.basename(r) == "d"]


def test_damaged_checkpoint_stops_the_command_and_the_earlier_ones_resume(shared, tmp_path):
  workdir = str(tmp_path / "damaged")
  shutil.copytree(shared["reference"], workdir)
  latest = os.path.join(workdir, "checkpoints", str(TOTAL_STEPS))
  for path in _array_data_files(latest):   # bit rot in every array data file
    _flip_bytes(path)
  before = file_digests(workdir)

  failed = run_command(shared, workdir)
  assert failed.returncode != 0
  assert "CheckpointCorruptError" in failed.stderr
  assert f"The checkpoint at step {TOTAL_STEPS} in {workdir}/checkpoints is damaged" in (
      failed.stderr)
  assert "Nothing was changed or deleted" in failed.stderr
  assert file_digests(workdir) == before   # nothing written, nothing deleted

  # The message's own fix: move the damaged checkpoint away and rerun the same command.
  fix = re.search(r"`mv (\S+) (\S+)`", failed.stderr)
  assert fix and fix.group(1) == latest, _tail(failed.stderr)
  shutil.move(fix.group(1), fix.group(2))
  rerun = run_command(shared, workdir)
  assert rerun.returncode == 0, _tail(rerun.stderr)
  assert resumed_from(rerun.stderr) == TOTAL_STEPS - TOTAL_STEPS % EVERY
  assert_trees_equal(saved_arrays(workdir)[0], saved_arrays(shared["reference"])[0])


def _truncate_largest(step_dir):
  largest = max(_array_data_files(step_dir), key=os.path.getsize)
  os.truncate(largest, os.path.getsize(largest) // 2)


def _delete_largest(step_dir):
  os.remove(max(_array_data_files(step_dir), key=os.path.getsize))


def _garble_meta(step_dir):
  with open(os.path.join(step_dir, "meta", "metadata"), "w", encoding="utf-8") as f:
    f.write('{"step": 2')


def _drop_array_metadata(step_dir):
  os.remove(os.path.join(step_dir, "state", "_METADATA"))


@pytest.mark.parametrize("damage,problem", [
    (_truncate_largest, r"array files cannot be read|differ from the checksums"),
    (_delete_largest, r"array files cannot be read"),
    (_garble_meta, r"metadata file is unreadable"),
    # With its _METADATA gone, orbax abandons its per-array read coroutines unawaited, which
    # pytest reports as dozens of "unraisable exception" warnings (orbax's, not ours).
    pytest.param(_drop_array_metadata, r"array (files|metadata) (cannot be read|is missing)",
                 marks=pytest.mark.filterwarnings(
                     "ignore::pytest.PytestUnraisableExceptionWarning")),
])
def test_each_kind_of_damage_is_named_and_spares_the_other_checkpoints(shared, tmp_path, damage,
                                                                       problem):
  workdir = str(tmp_path / "ckpt")
  shutil.copytree(shared["reference"], workdir)
  damage(os.path.join(workdir, "checkpoints", str(TOTAL_STEPS)))
  with pytest.raises(checkpointing.CheckpointCorruptError) as err:
    saved_arrays(workdir)
  message = str(err.value)
  assert re.search(problem, message), message
  earlier = list(range(EVERY, TOTAL_STEPS, EVERY))
  assert f"The earlier checkpoints (steps {earlier}) are untouched" in message
  # The newest intact checkpoint reads back, checksums verified, equal to the reference's.
  assert_trees_equal(saved_arrays(workdir, earlier[-1])[0],
                     saved_arrays(shared["reference"], earlier[-1])[0])


def test_checksums_catch_a_single_flipped_bit_anywhere():
  """state_checksums against a NumPy transcription of the same position-weighted sum."""
  rng = np.random.default_rng(0)
  tree = {"w": rng.normal(size=(3, 5)).astype(np.float32),
          "b": rng.integers(0, 9, size=7).astype(np.int32), "ok": np.array(True),
          "h": rng.normal(size=(4,)).astype(np.float16)}

  def numpy_checksum(x):
    word = {1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize]
    bits = x.astype(np.uint32) if x.dtype == bool else x.view(word).astype(np.uint32)
    bits = bits.reshape(-1).astype(np.uint64)
    weights = (np.arange(bits.size, dtype=np.uint64) * 0x9E3779B1 % 2**32) | 1
    return int((bits * weights % 2**32).sum() % 2**32)

  sums = checkpointing.state_checksums(tree)
  assert sums == {f"['{k}']": numpy_checksum(v) for k, v in tree.items()}
  for key in ("w", "b", "h"):
    flipped = {k: v.copy() for k, v in tree.items()}
    flipped[key].view(np.uint8).reshape(-1)[int(rng.integers(flipped[key].nbytes))] ^= 1 << int(
        rng.integers(8))
    changed = checkpointing.state_checksums(flipped)
    assert [k for k in sums if sums[k] != changed[k]] == [f"['{key}']"]


# ----------------------------------------------------------------------------------------------
# Damaged data


def test_truncated_npz_through_the_command_is_refused_and_nothing_saved_is_lost(shared, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(shared["reference"], workdir)
  truncated = str(tmp_path / "truncated.npz")
  with open(shared["npz"], "rb") as f:
    data = f.read()
  with open(truncated, "wb") as f:
    f.write(data[: len(data) // 2])
  before = file_digests(workdir)
  # data.path may change on resume (data moved), so the run gets as far as reading it.
  failed = run_command(shared, workdir, f"--config.data.path={truncated}")
  assert failed.returncode != 0
  assert f"{truncated}: not a readable .npz file" in failed.stderr, _tail(failed.stderr)
  assert file_digests(workdir) == before


def tiny_config(**overrides):
  config = quickstart_config.get_config("runlocal")
  config.batch_size = 8
  config.total_steps = 2
  config.mesh.num_devices = 1
  config.eval.every_epochs = 0
  config.eval.linear_probe = "none"
  config.eval.untrained_baseline = False
  return with_overrides(config, **overrides)


def _write_idx(path, array):
  header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
      int(d).to_bytes(4, "big") for d in array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + np.ascontiguousarray(array, np.uint8).tobytes())


def test_truncated_fashion_mnist_idx_is_refused_with_the_fix(tmp_path):
  arrays = tiny_arrays()
  folder = tmp_path / "fashion-mnist"
  folder.mkdir()
  files = images_lib.FASHION_MNIST_FILES
  for key, array in (("train_images", arrays["x_train"]), ("train_labels", arrays["y_train"]),
                     ("test_images", arrays["x_test"]), ("test_labels", arrays["y_test"])):
    _write_idx(folder / (files[key] + ".gz"), array)
  broken = folder / (files["train_images"] + ".gz")
  raw = gzip.decompress(broken.read_bytes())
  broken.write_bytes(gzip.compress(raw[: len(raw) - 100]))   # a valid gzip of a short IDX
  workdir = tmp_path / "work"
  config = tiny_config(**{"data.source": "fashion_mnist", "data.data_dir": str(folder)})
  with pytest.raises(ValueError) as err:
    train.train_and_evaluate(config, str(workdir))
  message = str(err.value)
  assert str(broken) in message and "IDX payload truncated" in message
  assert "dims (40, 28, 28)" in message and "--config.data.data_dir" in message
  assert not (workdir / "checkpoints").exists()


def test_truncated_image_in_a_class_folder_is_refused_by_name(tmp_path):
  arrays = tiny_arrays()
  root = tmp_path / "images"
  pairs = zip(arrays["x_train"][:12], arrays["y_train"][:12], strict=True)
  for i, (image, label) in enumerate(pairs):
    (root / f"class_{label}").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / f"class_{label}" / f"{i}.png")
  victim = min((root / f"class_{arrays['y_train'][0]}").iterdir())
  data = victim.read_bytes()
  victim.write_bytes(data[: len(data) // 2])
  workdir = tmp_path / "work"
  config = tiny_config(**{"data.source": "folder", "data.data_dir": str(root),
                          "data.test_fraction": 0.5})
  with pytest.raises(ValueError, match=re.escape(f"cannot decode image {victim}")):
    train.train_and_evaluate(config, str(workdir))
  assert not (workdir / "checkpoints").exists()


def test_a_checkpoint_of_another_model_or_shape_is_refused_before_any_array_is_read(tmp_path):
  # The trainer's config check refuses such resumes first; this is the checkpoint's own guard,
  # for what the config cannot see (a package upgrade changing the parameter layout).
  checkpointer = checkpointing.Checkpointer(str(tmp_path))
  state = {"w": np.arange(4.0, dtype=np.float32), "b": np.zeros(2, np.float32)}
  try:
    checkpointer.save(1, state, meta={"step": 1, "parameter_signature": "resnet18:abc",
                                      "model": "resnet18"})
    checkpointer.wait()
    with pytest.raises(checkpointing.CheckpointMismatchError,
                       match=r"written by a different model \(saved model resnet18, parameter "
                             r"signature resnet18:abc; the current config builds signature "
                             r"resnet50:xyz\)"):
      checkpointer.restore(state, expected_signature="resnet50:xyz")
    other = {"w": np.zeros(5, np.float32), "c": np.zeros(2, np.float32)}
    with pytest.raises(checkpointing.CheckpointMismatchError,
                       match=r"differently shaped train state") as err:
      checkpointer.restore(other, expected_signature="resnet18:abc")
    message = str(err.value)
    assert "['b']: saved ((2,), 'float32'), now <absent>" in message
    assert "['c']: saved <absent>, now ((2,), 'float32')" in message
    assert "['w']: saved ((4,), 'float32'), now ((5,), 'float32')" in message
    restored, meta = checkpointer.restore(state, expected_signature="resnet18:abc")
    np.testing.assert_array_equal(restored["w"], state["w"])
    assert meta["step"] == 1
  finally:
    checkpointer.close()
