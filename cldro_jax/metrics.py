"""Where training metrics go: JSON lines, TensorBoard events and a progress bar.

Only process 0 writes (multi-host runs would otherwise write every line N times).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Mapping

import jax
import numpy as np


def _to_python(value: Any) -> Any:
  """Turns numpy/jax scalars into plain floats/ints so they serialise as JSON."""
  if isinstance(value, (np.generic, np.ndarray, jax.Array)):
    value = np.asarray(value)
    return value.item() if value.ndim == 0 else value.tolist()
  return value


class MetricWriter:
  """Writes scalar metrics to `<workdir>/metrics.jsonl` and TensorBoard event files.

  One JSON object per line: `{"step": int, "split": str, <name>: value, ...}`. The same scalars go
  to TensorBoard under `<split>/<name>`.
  """

  def __init__(self, workdir: str, *, enabled: bool | None = None, resume_step: int = 0):
    """`resume_step`: the step a resumed run restarts from. Lines logged after it by the killed
    run are dropped, since the resumed run logs those steps again (no duplicates in the file;
    TensorBoard is told to hide those events too)."""
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._jsonl = None
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(path):
      _drop_lines_after(path, resume_step)
    self._jsonl = open(path, "a", encoding="utf-8")
    try:
      # purge_step: TensorBoard hides a killed run's events past the checkpoint (or, before
      # the first one, all of them), which the resumed run logs again, as the JSON lines above.
      self._tb = _EventFile(os.path.join(workdir, "tensorboard"), purge_step=resume_step + 1)
    except ImportError:  # tensorboardX is a declared dependency; degrade to JSON lines only.
      self._tb = None

  def write(self, step: int, metrics: Mapping[str, Any], *, split: str = "train",
            once: bool = False) -> None:
    """`once`: a line of this step and split with the same values replaces an earlier one (the
    final results, logged again by a run killed before results.json was written: deterministic,
    the same numbers). Different values, an evaluation with other settings, are both kept."""
    if not self.enabled:
      return
    record = {"step": int(step), "split": split, "time": time.time()}
    record.update({k: _to_python(v) for k, v in metrics.items()})
    if once:
      self._jsonl.close()
      _drop_same_lines(self._jsonl.name, record)
      self._jsonl = open(self._jsonl.name, "a", encoding="utf-8")
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      self._tb.add_scalars(int(step), record["time"], {
          f"{split}/{name}": value for name, value in record.items()
          if name not in ("step", "split", "time")
          and isinstance(value, (int, float)) and math.isfinite(value)})
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None


class _EventFile:
  """TensorBoard scalars in an event file, written synchronously: after `flush()` every event so
  far is in the file, as every line is in metrics.jsonl. tensorboardX's SummaryWriter hands
  events to a background thread that flushes every `flush_secs` (120 s), so a run killed during
  a long epoch-end evaluation lost the points logged just before its checkpoint for good (the
  resumed run does not log those steps again)."""

  def __init__(self, logdir: str, *, purge_step: int):
    # pylint: disable=import-outside-toplevel
    from tensorboardX.event_file_writer import EventsWriter
    from tensorboardX.proto.event_pb2 import Event, SessionLog
    from tensorboardX.summary import scalar
    os.makedirs(logdir, exist_ok=True)
    self._event, self._scalar = Event, scalar
    # The file name holds the creation second; the nanosecond suffix keeps two writers of the
    # same second (a quick resume) apart AND in creation order, which TensorBoard, reading the
    # files in name order, needs for the purge marker to hide the older file's events.
    self._writer = EventsWriter(os.path.join(logdir, "events"),
                                filename_suffix=f".{time.time_ns():020d}")
    # TensorBoard's purge marker (what SummaryWriter(purge_step=...) writes): earlier events of
    # this directory at steps >= purge_step are hidden.
    self._writer.write_event(Event(step=purge_step, wall_time=time.time(),
                                   session_log=SessionLog(status=SessionLog.START)))

  def add_scalars(self, step: int, wall_time: float, values: Mapping[str, float]) -> None:
    for tag, value in values.items():
      self._writer.write_event(self._event(wall_time=wall_time, step=step,
                                           summary=self._scalar(tag, value)))

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


def _drop_lines_after(path: str, step: int) -> None:
  """Rewrites a metrics file without the records past `step` (and a torn last line)."""
  kept = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:   # a line cut short when the process was killed
        continue
      if record.get("step", 0) <= step:
        kept.append(line if line.endswith("\n") else line + "\n")
  _rewrite(path, kept)


def _rewrite(path: str, lines: list[str]) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.writelines(lines)
  os.replace(tmp, path)


def _drop_same_lines(path: str, record: Mapping[str, Any]) -> None:
  """Rewrites a metrics file without the lines equal to `record` but for their time."""
  def values(r):   # as text: NaN (a diverged run's score) equals NaN here
    return json.dumps({k: v for k, v in r.items() if k != "time"}, sort_keys=True)
  with open(path, encoding="utf-8") as f:
    lines = f.readlines()
  kept = [line for line in lines if values(json.loads(line)) != values(record)]
  if len(kept) < len(lines):
    _rewrite(path, kept)


def read_metrics(workdir: str, split: str | None = None) -> list[dict[str, Any]]:
  """Reads back `metrics.jsonl` (optionally one split), e.g. for plots and tests."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    lines = f.readlines()
  records = []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as err:
      if number == len(lines) and not line.endswith("\n"):
        continue   # cut short when the run was killed (its resume drops it too)
      raise ValueError(f"{path}, line {number}, is not a JSON record ({err}); the file is "
                       "damaged.") from err
  return [r for r in records if split is None or r.get("split") == split]


def progress_bar(total: int, *, initial: int = 0, unit: str = "img", desc: str = "train",
                 unit_scale: int = 1):
  """A tqdm bar counting examples (so its rate reads images/s or sentences/s).

  Disabled on processes other than 0; writes to stderr so stdout stays clean for results.
  """
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(total=total * unit_scale, initial=initial * unit_scale, unit=unit, desc=desc,
              unit_scale=True, dynamic_ncols=True, file=sys.stderr,
              disable=jax.process_index() != 0, smoothing=0.1)


def _paired(results: Mapping[str, Any], key: str, baseline_key: str,
            with_std: bool = False) -> str:
  """`trained X   untrained Y   (gain +Z)`; the untrained part only when it was measured;
  with_std: each score followed by `+- <key>_std` (the spread over seeds)."""
  def score(score_key: str) -> str:
    std = f" +- {results[score_key + '_std']:.2f}" if with_std else ""
    return f"{results[score_key]:.2f}{std}"
  text = f"trained {score(key)}"
  if baseline_key in results:
    gain = results[key] - results[baseline_key]
    text += f"   untrained {score(baseline_key)}   (gain {gain:+.2f})"
  return text


def format_summary(results: Mapping[str, Any], workdir: str) -> str:
  """The few lines a person reads at the end of a run: the scores, trained next to untrained.

  `results` is what `train.train_and_evaluate` returns (and writes to results.json); scores a
  domain does not produce are left out.
  """
  evaluated = results.get("evaluated_with", {}).get("eval", {})
  rows: list[tuple[str, str]] = []   # (what, score)
  if "linear_probe_top1" in results:
    protocol = results.get("linear_probe_protocol", "")
    for k in ("top1", "top5"):
      rows.append((f"linear probe {k[:3]}-{k[3:]} ({protocol})",
                   _paired(results, f"linear_probe_{k}", f"untrained_linear_probe_{k}")))
  if "final_knn_top1" in results:
    knn_k = evaluated.get("knn_k")
    rows.append((f"kNN top-1 (k={knn_k})" if knn_k else "kNN top-1",
                 f"{results['final_knn_top1']:.2f}"))
  if "final_online_probe_top1" in results:
    rows.append(("online probe top-1", f"{results['final_online_probe_top1']:.2f}"))
  if "svm_accuracy" in results:
    seeds = len(results.get("svm_cv_seeds", [])) or 1
    folds = evaluated.get("folds")
    label = f"{folds}-fold CV" if folds else "CV"
    label += f", mean +- std of {seeds} CV shuffle seeds" if seeds > 1 else ""
    rows.append((f"SVM accuracy ({label})", _paired(
        results, "svm_accuracy", "untrained_svm_accuracy", with_std=seeds > 1)))
  if "sts_avg" in results:
    rows.append(("STS avg. Spearman x100", f"{results['sts_avg']:.2f}   "
                 f"({results.get('sts_model', '')}; pooler {results.get('sts_pooler', '')})"))
  elif "sts_skipped" in results:
    rows.append(("STS", "skipped: no STS data (what to get and where to point "
                        "--config.data.sts_root: results.json, sts_skipped)"))
  if "hf_export" in results:
    rows.append(("Hugging Face export", results["hf_export"]))

  header = (f"Results after {results['step']} steps ({results['epochs']:.4g} epochs) with the "
            f"{results['loss']} loss")
  if "dataset" in results:
    header += f" on {results['dataset']}"
  lines = [header + ":"]
  if "collapsed_at_step" in results:
    lines.append(f"  WARNING: the representation collapsed at step {results['collapsed_at_step']}"
                 " (see the message during training); these are a collapsed encoder's scores.")
  width = max((len(what) for what, _ in rows), default=0)
  lines += [f"  {what:<{width}}   {score}" for what, score in rows]
  if results.get("init_from") and any("untrained" in k for k in results):
    lines.append(f"  (This run started from the encoder of {results['init_from']}: \"untrained\" "
                 "is a random initialisation, so the gain includes that run's training.)")
  lines.append(f"All results: {os.path.join(workdir, 'results.json')}")
  return "\n".join(lines)
