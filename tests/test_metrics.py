"""MetricWriter on resume: the killed run's records past the checkpoint are dropped from
metrics.jsonl and hidden in TensorBoard, since the resumed run logs those steps again."""
import glob
import os
import struct

import pytest
from tensorboardX.proto import event_pb2

from cldro_jax import metrics


def tensorboard_events(workdir):
  """(file, step, kind, session status) of every event, read from the TFRecord files."""
  events = []
  for path in sorted(glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))):
    with open(path, "rb") as f:
      data = f.read()
    offset = 0
    while offset < len(data):   # TFRecord: length (8 bytes), its crc (4), payload, crc (4)
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      event = event_pb2.Event()
      event.ParseFromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      kind = event.WhichOneof("what")
      events.append((path, event.step, kind,
                     event.session_log.status if kind == "session_log" else None))
  return events


def test_resume_drops_and_hides_the_killed_runs_records_past_the_checkpoint(tmp_path):
  workdir = str(tmp_path)
  writer = metrics.MetricWriter(workdir, enabled=True)
  for step in (1, 2, 3, 4, 5):
    writer.write(step, {"loss": 1.0 / step})
  writer.close()
  # Resumed within the same second (the file name's timestamp): still a file of its own.
  resumed = metrics.MetricWriter(workdir, enabled=True, resume_step=3)
  resumed.write(4, {"loss": 0.3})
  resumed.close()

  assert [r["step"] for r in metrics.read_metrics(workdir, "train")] == [1, 2, 3, 4]
  assert metrics.read_metrics(workdir, "train")[-1]["loss"] == 0.3
  events = tensorboard_events(workdir)
  files = sorted({path for path, *_ in events})
  assert len(files) == 2
  first = [(step, kind) for path, step, kind, _ in events if path == files[0]]
  assert [step for step, kind in first if kind == "summary"] == [1, 2, 3, 4, 5]
  # TensorBoard's purge marker: a SessionLog START at step 4 hides every earlier event of this
  # run directory at steps >= 4 (the killed run's 4 and 5).
  second = [(step, kind, status) for path, step, kind, status in events if path == files[1]]
  assert (4, "session_log", event_pb2.SessionLog.START) in second
  assert [step for step, kind, _ in second if kind == "summary"] == [4]



def test_read_metrics_of_a_killed_run_skips_its_torn_last_line_only(tmp_path):
  # experiments/ read the metrics of runs that may have been killed mid-write.
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "split": "train", "loss": 2.0}\n{"step": 2, "split": "tr')
  assert metrics.read_metrics(str(tmp_path), "train") == [
      {"step": 1, "split": "train", "loss": 2.0}]
  # A damaged line anywhere else is not a kill's trace: refused, with its line number.
  path.write_text('{"step": 1, "spl\n{"step": 2, "split": "train", "loss": 1.0}\n')
  with pytest.raises(ValueError, match=r"metrics.jsonl, line 1, is not a JSON record"):
    metrics.read_metrics(str(tmp_path))

def test_final_results_logged_again_after_a_kill_replace_the_same_line(tmp_path):
  # Killed after the "results" line, before results.json: the rerun evaluates again (the same
  # numbers, NaN included) and logs the line once more; the file keeps one. An evaluation with
  # other settings (other numbers) keeps both lines, as it keeps results.previous-<k>.json.
  workdir = str(tmp_path)
  writer = metrics.MetricWriter(workdir, enabled=True)
  writer.write(10, {"loss": 0.5})
  writer.write(10, {"top1": 71.25, "knn": float("nan")}, split="results", once=True)
  writer.close()
  rerun = metrics.MetricWriter(workdir, enabled=True, resume_step=10)
  rerun.write(10, {"top1": 71.25, "knn": float("nan")}, split="results", once=True)
  assert [r["split"] for r in metrics.read_metrics(workdir)] == ["train", "results"]
  rerun.write(10, {"top1": 70.0, "knn": float("nan")}, split="results", once=True)
  rerun.write(11, {"loss": 0.4})   # the file is still open for appending after the rewrite
  rerun.close()
  assert [(r["split"], r.get("top1")) for r in metrics.read_metrics(workdir)] == [
      ("train", None), ("results", 71.25), ("results", 70.0), ("train", None)]


def test_every_logged_point_is_on_disk_without_close(tmp_path):
  # A kill -9 gives no chance to close: what write() returned from must already be in the files
  # (tensorboardX's SummaryWriter would still hold it in its queue or buffer for up to 120 s).
  workdir = str(tmp_path)
  writer = metrics.MetricWriter(workdir, enabled=True)
  for step in (1, 2, 3):
    writer.write(step, {"loss": 1.0 / step, "knn_top1": 50.0 + step})
  summaries = [(step, kind) for _, step, kind, _ in tensorboard_events(workdir)
               if kind == "summary"]
  assert summaries == [(1, "summary")] * 2 + [(2, "summary")] * 2 + [(3, "summary")] * 2
  assert [r["step"] for r in metrics.read_metrics(workdir, "train")] == [1, 2, 3]
  writer.close()


def test_command_lines_hide_orbax_info_and_the_no_tpu_notice_but_not_warnings():
  import logging as py_logging  # pylint: disable=import-outside-toplevel
  from absl import logging  # pylint: disable=import-outside-toplevel
  from cldro_jax import logs  # pylint: disable=import-outside-toplevel

  def record(level, path, message="message"):
    return py_logging.LogRecord("absl", level, path, 1, message, None, None)

  handler = logging.get_absl_handler()
  before = list(handler.filters)
  # An earlier test in this process (main, probe, the STS command) may have installed it.
  handler.filters[:] = [f for f in before if f is not logs._shown]  # pylint: disable=protected-access
  try:
    logs.quiet_library_info()
    logs.quiet_library_info()   # idempotent: main and probe may both call it
    assert handler.filters.count(logs._shown) == 1  # pylint: disable=protected-access
    orbax_file = "/site-packages/orbax/checkpoint/checkpoint_manager.py"
    assert not handler.filter(record(py_logging.INFO, orbax_file))
    assert handler.filter(record(py_logging.WARNING, orbax_file))
    assert handler.filter(record(py_logging.INFO, "/work/cldro_jax/train.py"))
    bridge = "/site-packages/jax/_src/xla_bridge.py"
    assert not handler.filter(record(py_logging.INFO, bridge,
                                     "Unable to initialize backend 'tpu': INTERNAL: no libtpu"))
    assert handler.filter(record(py_logging.INFO, bridge,
                                 "Unable to initialize backend 'cuda': no CUDA devices"))
  finally:
    handler.filters[:] = before


def test_the_end_of_run_summary_of_graph_and_sentence_runs():
  graph = {"step": 200, "epochs": 20.0, "loss": "adnce", "dataset": "MUTAG",
           "svm_cv_seeds": [0, 1, 2], "svm_accuracy": 88.5, "svm_accuracy_std": 1.25,
           "untrained_svm_accuracy": 85.0, "untrained_svm_accuracy_std": 0.5,
           "evaluated_with": {"eval": {"folds": 10}}}
  assert metrics.format_summary(graph, "wd").splitlines() == [
      "Results after 200 steps (20 epochs) with the adnce loss on MUTAG:",
      "  SVM accuracy (10-fold CV, mean +- std of 3 CV shuffle seeds)   trained 88.50 +- 1.25   "
      "untrained 85.00 +- 0.50   (gain +3.50)",
      "All results: wd/results.json"]
  # Started from another run's encoder: the gain over a random one includes that run's training.
  assert metrics.format_summary({**graph, "init_from": "runs/a"}, "wd").splitlines()[-2] == (
      "  (This run started from the encoder of runs/a: \"untrained\" is a random "
      "initialisation, so the gain includes that run's training.)")
  sentence = {"step": 125, "epochs": 0.5, "loss": "infonce", "collapsed_at_step": 100,
              "sts_avg": 76.254, "sts_model": "final model: step 125",
              "sts_pooler": "cls (without the training MLP)", "hf_export": "wd/hf_export"}
  assert metrics.format_summary(sentence, "wd").splitlines() == [
      "Results after 125 steps (0.5 epochs) with the infonce loss:",
      "  WARNING: the representation collapsed at step 100 (see the message during training); "
      "these are a collapsed encoder's scores.",
      "  STS avg. Spearman x100   76.25   (final model: step 125; pooler cls (without the "
      "training MLP))",
      "  Hugging Face export      wd/hf_export",
      "All results: wd/results.json"]


def test_a_read_only_checkpointer_opens_without_orbax_warnings(tmp_path, caplog):
  """Readers (probe, load_encoder, the STS evaluator; from Python too) printed three orbax
  warnings per open: two about settings a read-only manager resets, one that it is read-only.
  Other orbax warnings still show afterwards."""
  from absl import logging  # pylint: disable=import-outside-toplevel
  from cldro_jax import checkpointing  # pylint: disable=import-outside-toplevel
  (tmp_path / "checkpoints").mkdir()
  with caplog.at_level("WARNING"):
    checkpointing.Checkpointer(str(tmp_path), read_only=True).close()
    assert not caplog.records, caplog.text
    logging.warning("Given directory is read only=%s (a later, unrelated warning)", tmp_path)
  assert len(caplog.records) == 1


def test_a_log_line_holds_the_mean_of_its_steps_reduced_on_the_device():
  # A resumed run's first steps come back from the checkpoint as host floats, the rest are
  # device scalars: one reduction takes both; the finiteness flag (bool) averages to 1.0 exactly.
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from cldro_jax import train  # pylint: disable=import-outside-toplevel
  losses = np.random.default_rng(0).normal(4.0, 0.5, size=50).astype(np.float32)
  pending = [{"loss": np.float32(v), "finite": np.float32(1.0)} for v in losses[:7]]
  pending += [{"loss": jnp.float32(v), "finite": jnp.bool_(True)} for v in losses[7:]]
  means = train._step_means(pending)  # pylint: disable=protected-access
  assert float(means["loss"]) == pytest.approx(np.mean(losses.astype(np.float64)), rel=1e-6)
  assert float(means["finite"]) == 1.0
  pending[-1]["finite"] = jnp.bool_(False)   # one non-finite step shows in the mean
  assert float(train._step_means(pending)["finite"]) < 1.0  # pylint: disable=protected-access
