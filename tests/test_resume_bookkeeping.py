"""What a stopped and resumed run must still get right beyond its parameters: the logged means,
the final monitor, results.json, the collapse step, the run-length guard and the first start.

Stops are simulated in process: a SIGTERM (what a scheduler sends) is the trainer's preemption
watch saying "stop" after a chosen step, exactly as the signal handler would.
"""
import json
import os
import shutil
import signal
import time

import numpy as np
import pytest

from cldro_jax import checkpointing
from cldro_jax import metrics as metrics_lib
from cldro_jax import train
from helpers import assert_trees_equal, saved_arrays, tiny_image_config, with_overrides


def tiny_config(**overrides):
  """The toy quick start, 8 steps: logs at 3, 6, 8, checkpoints at 4 and 8."""
  return tiny_image_config(**{"total_steps": 8, "log_every_steps": 3,
                              "checkpoint_every_steps": 4, "keep_checkpoints": 10,
                              "progress_bar": False, **overrides})


def stop_after(monkeypatch, step):
  """The next run stops as on SIGTERM once `step` is done."""
  real = train._PreemptionWatch  # pylint: disable=protected-access

  class Watch(real):
    def should_stop(self, done):
      self.requested = self.requested or done >= step
      return self.requested

  monkeypatch.setattr(train, "_PreemptionWatch", Watch)


def sigterm_during_step(monkeypatch, step):
  """The next run gets SIGTERM while it computes `step` (after step - 1's stop check)."""
  real = train._PreemptionWatch  # pylint: disable=protected-access

  class Watch(real):
    def should_stop(self, done):
      stop = self.requested
      if done == step - 1:
        self._on_signal(None, None)   # what the SIGTERM handler does, one step late
      return stop

  monkeypatch.setattr(train, "_PreemptionWatch", Watch)


def train_lines(workdir):
  return [(r["step"], r["loss"], r["grad_norm"]) for r in metrics_lib.read_metrics(workdir,
                                                                                   "train")]


def test_a_stop_between_log_steps_resumes_with_the_same_logged_means(tmp_path, monkeypatch):
  # Logs at 3, 6, 8; a stop after step 4 checkpoints step 4, whose meta keeps step 4's metrics
  # so that the line of step 6 still averages steps 4-6, not 5-6.
  straight = str(tmp_path / "straight")
  train.train_and_evaluate(tiny_config(), straight)
  stopped = str(tmp_path / "stopped")
  stop_after(monkeypatch, 4)
  with pytest.raises(train.PreemptedError, match="after step 4"):
    train.train_and_evaluate(tiny_config(), stopped)
  meta = checkpointing.Checkpointer(stopped, read_only=True).read_meta(4)
  assert len(meta["log_pending"]) == 1 and set(meta["log_pending"][0]) >= {"loss", "grad_norm"}
  monkeypatch.undo()
  train.train_and_evaluate(tiny_config(), stopped)
  assert [s for s, *_ in train_lines(stopped)] == [3, 6, 8]
  assert train_lines(stopped) == train_lines(straight)
  assert_trees_equal(saved_arrays(stopped)[0], saved_arrays(straight)[0])


def test_ctrl_c_saves_that_steps_checkpoint_and_a_second_one_stops_at_once(tmp_path,
                                                                         monkeypatch, capsys):
  """A real SIGINT during step 3: the run finishes the step, saves it and stops (exit code 130
  on the command line); the rerun resumes there. A second Ctrl-C interrupts at once."""
  real = train._PreemptionWatch  # pylint: disable=protected-access
  handler_before = signal.getsignal(signal.SIGINT)

  class Watch(real):
    def should_stop(self, done):
      if done == 3:
        signal.raise_signal(signal.SIGINT)
      return super().should_stop(done)

  monkeypatch.setattr(train, "_PreemptionWatch", Watch)
  workdir = str(tmp_path / "run")
  with pytest.raises(train.PreemptedError, match=r"Stopped on request \(Ctrl-C\) after step "
                                                 r"3 of 8") as stop:
    train.train_and_evaluate(tiny_config(), workdir)
  assert stop.value.exit_code == 130
  assert "Ctrl-C: saving a checkpoint after this step" in capsys.readouterr().err
  assert max(checkpointing.Checkpointer(workdir, read_only=True).all_steps()) == 3
  assert signal.getsignal(signal.SIGINT) == handler_before   # given back after the loop
  monkeypatch.undo()
  assert train.train_and_evaluate(tiny_config(), workdir)["step"] == 8

  watch = real()
  try:
    watch._on_interrupt(signal.SIGINT, None)  # pylint: disable=protected-access
    assert watch.requested and watch.exit_code == 130
    with pytest.raises(KeyboardInterrupt):
      watch._on_interrupt(signal.SIGINT, None)  # pylint: disable=protected-access
  finally:
    watch.close()
  assert signal.getsignal(signal.SIGINT) == handler_before


def test_a_stop_during_the_last_step_is_honoured_before_the_final_evaluation(tmp_path,
                                                                           monkeypatch):
  workdir = str(tmp_path / "run")
  sigterm_during_step(monkeypatch, 8)
  with pytest.raises(train.PreemptedError, match="after the last step, 8"):
    train.train_and_evaluate(tiny_config(), workdir)
  assert max(checkpointing.Checkpointer(workdir, read_only=True).all_steps()) == 8
  assert not os.path.exists(os.path.join(workdir, "results.json"))
  monkeypatch.undo()
  results = train.train_and_evaluate(tiny_config(), workdir)
  assert results["step"] == 8 and os.path.exists(os.path.join(workdir, "results.json"))


def test_a_preemption_notice_agreed_on_the_last_step_of_several_processes(tmp_path, monkeypatch):
  # Several processes agree on a stop step through JAX's preemption sync point (ids 1, 2, ...;
  # a notice names the largest id reported plus one). A notice during the last step names it:
  # every process must still ask, and stop before the final evaluation as on one process.
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  agreed = {}

  def sync_point(step_id):
    if step_id == 7:
      agreed["id"] = 8    # the notice arrives while step 8 runs
    return agreed.get("id") == step_id

  real = train._PreemptionWatch  # pylint: disable=protected-access

  class SeveralProcessesWatch(real):
    def __init__(self):
      super().__init__()
      self.multiprocess = True

  monkeypatch.setattr(train, "_PreemptionWatch", SeveralProcessesWatch)
  monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", sync_point)
  workdir = str(tmp_path / "run")
  with pytest.raises(train.PreemptedError, match="after the last step, 8"):
    train.train_and_evaluate(tiny_config(), workdir)
  assert max(checkpointing.Checkpointer(workdir, read_only=True).all_steps()) == 8
  assert not os.path.exists(os.path.join(workdir, "results.json"))


def test_a_kill_during_the_final_evaluation_does_not_log_the_final_monitor_twice(tmp_path):
  # The kNN monitor at the end (every 5 steps = 1 epoch, and at the last step, 8).
  config = tiny_config(**{"eval.every_epochs": 1})
  workdir = str(tmp_path / "run")
  first = train.train_and_evaluate(config, workdir)
  # As if killed after the final monitor line was written and before results.json was.
  os.remove(os.path.join(workdir, "results.json"))
  again = train.train_and_evaluate(config, workdir)
  monitor_steps = [r["step"] for r in metrics_lib.read_metrics(workdir, "monitor")]
  assert monitor_steps == [5, 8]
  assert again["final_knn_top1"] == first["final_knn_top1"]
  # Evaluated again with other settings: a new evaluation, logged as one.
  changed = with_overrides(config, **{"eval.knn_k": 3})
  train.train_and_evaluate(changed, workdir)
  assert [r["step"] for r in metrics_lib.read_metrics(workdir, "monitor")] == [5, 8, 8]
  assert os.path.exists(os.path.join(workdir, "results.previous-1.json"))


def test_an_extended_run_killed_in_its_final_evaluation_logs_its_final_monitor_once(tmp_path):
  """Extended from 8 to 10 steps and killed after the step-10 monitor but before results.json:
  the step-8 results left there are set aside, and the logged step-10 monitor is not logged
  again (it is not a new evaluation with other settings)."""
  config = tiny_config(**{"eval.every_epochs": 1})
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  path = os.path.join(workdir, "results.json")
  with open(path, encoding="utf-8") as f:
    at_step_8 = f.read()
  longer = with_overrides(config, total_steps=10)
  extended = train.train_and_evaluate(longer, workdir)
  with open(path, "w", encoding="utf-8") as f:
    f.write(at_step_8)
  again = train.train_and_evaluate(longer, workdir)
  assert [r["step"] for r in metrics_lib.read_metrics(workdir, "monitor")] == [5, 8, 10]
  assert again["final_knn_top1"] == extended["final_knn_top1"] and again["step"] == 10
  with open(os.path.join(workdir, "results.previous-1.json"), encoding="utf-8") as f:
    assert json.load(f)["step"] == 8


def _edit_meta(workdir, step, edit):
  path = os.path.join(workdir, "checkpoints", str(step), "meta", "metadata")
  with open(path, encoding="utf-8") as f:
    meta = json.load(f)
  edit(meta)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(meta, f)


def test_damaged_metadata_are_caught_before_a_resume_skips_or_replays_steps(tmp_path):
  """The metadata (the step a resume starts from, the means in flight, the config) carry a
  digest: a changed value that is still valid JSON (one flipped bit turns step 4 into 5) was
  trusted, and the run skipped a step. Without a digest (older checkpoints) the step is still
  checked against the folder's and the train state's. A refused resume changes nothing, not even
  config.json."""
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(tiny_config(total_steps=4), workdir)
  config_before = checkpointing.read_saved_config(workdir)
  _edit_meta(workdir, 4, lambda meta: meta.update(step=5))
  longer = tiny_config(total_steps=8, keep_checkpoints=4)   # both may change on resume
  with pytest.raises(checkpointing.CheckpointCorruptError,
                     match="step 4 .* is damaged \\(its metadata differ from the digest"):
    train.train_and_evaluate(longer, workdir)
  assert checkpointing.read_saved_config(workdir) == config_before
  _edit_meta(workdir, 4, lambda meta: meta.pop("meta_sha256"))   # as written before the digest
  with pytest.raises(checkpointing.CheckpointCorruptError, match="its metadata say step 5"):
    train.train_and_evaluate(longer, workdir)
  _edit_meta(workdir, 4, lambda meta: meta.update(step=4))
  assert train.train_and_evaluate(longer, workdir)["step"] == 8
  assert checkpointing.read_saved_config(workdir).keep_checkpoints == 4


def test_a_reader_beside_a_run_is_not_told_that_a_removed_checkpoint_is_damaged(tmp_path,
                                                                                monkeypatch):
  """A reader (load_encoder, the probe) opened while the trainer's keep policy deletes the step
  it is about to read: the latest is read again, not reported as damage with a `mv` to do."""
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(tiny_config(total_steps=8), workdir)   # checkpoints 4 and 8
  reader = checkpointing.Checkpointer(workdir, read_only=True)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "8"))   # as the keep policy would
  with pytest.raises(FileNotFoundError, match="step 8 .* was removed while it was read"):
    reader.restore_raw()
  reader.close()
  real_init = checkpointing.Checkpointer.__init__
  removed = []

  def open_then_lose_the_latest(self, *args, **kwargs):
    real_init(self, *args, **kwargs)
    if not removed:   # the first reader sees step 4 as the latest; the trainer then drops it
      removed.append(self.latest_step())
      shutil.rmtree(os.path.join(workdir, "checkpoints", str(removed[0])))

  shutil.copytree(os.path.join(workdir, "checkpoints", "4"),
                  os.path.join(workdir, "checkpoints", "2"))   # an older complete one to find
  _edit_meta(workdir, 2, lambda meta: meta.update(step=2, meta_sha256=None))   # undigested
  monkeypatch.setattr(checkpointing.Checkpointer, "__init__", open_then_lose_the_latest)
  with pytest.raises(checkpointing.CheckpointCorruptError, match="its train state is at step 4"):
    checkpointing.read_checkpoint(workdir)   # the retry reached the copied folder: checked too
  assert removed == [4]


def test_an_unreadable_config_json_is_replaced_by_the_checkpoints_copy(tmp_path):
  workdir = str(tmp_path / "run")
  first = train.train_and_evaluate(tiny_config(total_steps=4), workdir)
  config_path = os.path.join(workdir, "config.json")
  with open(config_path, "w", encoding="utf-8") as f:
    f.write("")                              # what a crash mid-write can leave
  assert checkpointing.read_saved_config(workdir).total_steps == 4
  assert train.train_and_evaluate(tiny_config(total_steps=4), workdir) == first
  assert checkpointing.read_saved_config(workdir).total_steps == 4
  fresh = str(tmp_path / "fresh")            # nothing to recover it from
  os.makedirs(fresh)
  with open(os.path.join(fresh, "config.json"), "w", encoding="utf-8") as f:
    f.write("{")
  with pytest.raises(checkpointing.CheckpointCorruptError, match="unreadable .* no checkpoint"):
    checkpointing.read_saved_config(fresh)


def test_an_unreadable_results_file_is_evaluated_again(tmp_path):
  workdir = str(tmp_path / "run")
  first = train.train_and_evaluate(tiny_config(), workdir)
  with open(os.path.join(workdir, "results.json"), "w", encoding="utf-8") as f:
    f.write('{"step": 8, "lo')       # half a file, as an interrupted write would leave
  again = train.train_and_evaluate(tiny_config(), workdir)
  with open(os.path.join(workdir, "results.json"), encoding="utf-8") as f:
    assert json.load(f) == json.loads(json.dumps(again))
  assert again["step"] == first["step"]


def test_the_collapse_step_survives_a_resume(tmp_path, monkeypatch):
  # chi2_dro at a large eta collapses this model within the first epoch (docs/results.md, claim
  # 7); the warning's step must still be in results.json after a stop and a resume.
  overrides = {"loss.name": "chi2_dro", "loss.eta": 100.0, "optim.lr": 0.01,
               "total_steps": 20, "log_every_steps": 1, "checkpoint_every_steps": 4}
  straight = str(tmp_path / "straight")
  expected = train.train_and_evaluate(tiny_config(**overrides), straight)
  assert "collapsed_at_step" in expected
  stopped = str(tmp_path / "stopped")
  stop_after(monkeypatch, expected["collapsed_at_step"] + 1)
  with pytest.raises(train.PreemptedError):
    train.train_and_evaluate(tiny_config(**overrides), stopped)
  monkeypatch.undo()
  resumed = train.train_and_evaluate(tiny_config(**overrides), stopped)
  assert resumed["collapsed_at_step"] == expected["collapsed_at_step"]


def test_run_length_guard_holds_without_config_json(tmp_path):
  workdir = str(tmp_path / "run")
  config = tiny_config(**{"optim.schedule": "warmup_cosine", "total_steps": 4})
  train.train_and_evaluate(config, workdir)
  os.remove(os.path.join(workdir, "config.json"))   # the checkpoint's copy still says 4 steps
  with pytest.raises(checkpointing.CheckpointMismatchError, match="planned for 4 steps"):
    train.train_and_evaluate(with_overrides(config, total_steps=8), workdir)


def test_a_start_that_never_reached_a_checkpoint_accepts_a_corrected_config(tmp_path):
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    json.dump(checkpointing.config_to_dict(tiny_config(batch_size=16)), f)  # died at step 1
  results = train.train_and_evaluate(tiny_config(), workdir)
  assert results["step"] == 8
  assert checkpointing.read_saved_config(workdir).batch_size == 8


def test_fractional_epochs_do_not_round_up_a_step(tmp_path):
  config = tiny_config(total_steps=0, total_epochs=2.2)
  assert train.steps_for(config, 25) == 55      # 2.2 * 25 = 55.00000000000001 in floats
  assert train.steps_for(config, 195) == 429
  assert train.steps_for(with_overrides(config, total_epochs=0.5), 5) == 3


def test_a_step_folder_without_metadata_is_reported_as_damaged(tmp_path):
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(tiny_config(), workdir)
  os.makedirs(os.path.join(workdir, "checkpoints", "99"))   # a stray step folder
  with pytest.raises(checkpointing.CheckpointCorruptError, match="step 99.*damaged"):
    train.train_and_evaluate(tiny_config(total_steps=100), workdir)


def test_other_data_behind_a_moved_path_is_refused_the_same_data_moved_is_not(tmp_path):
  from cldro_jax.data import images as images_lib  # pylint: disable=import-outside-toplevel
  shipped = images_lib.load_fashion_mnist_subset_arrays()
  keep_train = images_lib.first_per_class(shipped["y_train"], 4)
  keep_test = images_lib.first_per_class(shipped["y_test"], 4)
  arrays = {"x_train": shipped["x_train"][keep_train], "y_train": shipped["y_train"][keep_train],
            "x_test": shipped["x_test"][keep_test], "y_test": shipped["y_test"][keep_test]}
  original, moved, other = (str(tmp_path / name) for name in ("a.npz", "b.npz", "c.npz"))
  np.savez(original, **arrays)
  np.savez(moved, **arrays)
  np.savez(other, **dict(arrays, x_train=255 - arrays["x_train"]))   # same size, other images

  def config(path, steps):
    return tiny_config(total_steps=steps, **{"data.source": "npz", "data.path": path})

  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config(original, 4), workdir)
  with pytest.raises(checkpointing.CheckpointMismatchError, match="pre-training data .* differ"):
    train.train_and_evaluate(config(other, 8), workdir)
  assert checkpointing.read_saved_config(workdir).data.path == original   # nothing changed
  results = train.train_and_evaluate(config(moved, 8), workdir)
  assert results["step"] == 8


def test_examples_per_second_after_a_monitor_measures_training_only(tmp_path, monkeypatch):
  # A monitor that takes 3 s (a kNN pass over a real dataset takes minutes): the rate logged at
  # the next step must not be batch / 3 s. (Under 8 / 3 with it; one step on a loaded 2-core
  # CI machine stays far under the 2.5 s the bound allows without it.)
  real_monitor = train._monitor  # pylint: disable=protected-access

  def slow_monitor(*args, **kwargs):
    time.sleep(3.0)
    return real_monitor(*args, **kwargs)

  monkeypatch.setattr(train, "_monitor", slow_monitor)
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(tiny_config(**{"eval.every_epochs": 1, "log_every_steps": 1}), workdir)
  after_monitor = next(r for r in metrics_lib.read_metrics(workdir, "train") if r["step"] == 6)
  assert after_monitor["examples_per_sec"] > 8 / 2.5   # one step of 8 images, under 2.5 s


def test_the_first_rates_measure_training_not_the_compilation(tmp_path, monkeypatch, capsys):
  # A train step whose tracing takes 3 s stands for a slow compilation (a ResNet-50 on a GPU
  # compiles for a minute): the first logged examples/s (steps 2-3) must not include it (with it,
  # under 16 / 3; without, two steps take far less than the 2.5 s the bound allows).
  real_make = train.make_train_step

  def slow_to_compile(*args, **kwargs):
    step_fn = real_make(*args, **kwargs)

    def traced_slowly(state, batch):
      time.sleep(3.0)   # runs once, while jax.jit traces
      return step_fn(state, batch)
    return traced_slowly

  monkeypatch.setattr(train, "make_train_step", slow_to_compile)
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(tiny_config(progress_bar=True), workdir)
  first_line = metrics_lib.read_metrics(workdir, "train")[0]
  assert first_line["step"] == 3
  assert first_line["examples_per_sec"] > 2 * 8 / 2.5   # two steps of 8 images after compiling
  assert "Compiling the train step (step 1 of 8" in capsys.readouterr().err


def test_a_monitor_line_is_printed_once_per_job_also_before_the_bar_exists(monkeypatch, capsys):
  # tqdm's bar.write printed on a disabled bar too (every process of a job), and the catch-up
  # monitor of a resumed run, which runs before the bar exists, printed nothing.
  import types  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  task = types.SimpleNamespace(monitor=lambda state: {"knn_top1": 51.25}, steps_per_epoch=5)
  state = types.SimpleNamespace(finite=jnp.asarray(True))
  logged = []
  writer = types.SimpleNamespace(write=lambda step, values, split: logged.append((step, split)))
  train._monitor(task, state, writer, 10, None, show=True)  # pylint: disable=protected-access
  assert "epoch 2: knn_top1=51.25" in capsys.readouterr().err
  train._monitor(task, state, writer, 10, None, show=False)  # pylint: disable=protected-access
  monkeypatch.setattr(train.jax, "process_index", lambda: 1)
  train._monitor(task, state, writer, 10, None, show=True)  # pylint: disable=protected-access
  assert capsys.readouterr().err == "" and logged == [(10, "monitor")] * 3
