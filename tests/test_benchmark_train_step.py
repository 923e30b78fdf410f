"""benchmarks/train_step.py and sentence_step.py keep a measured row before they profile: the GPU
script (benchmarks/h200.sh) stops each benchmark at a time limit, and a limit hit while tracing
must cost the profile only, not the figure the run was for."""
import json
import math
import pathlib
import sys

import pytest

BENCHMARKS = str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks")
sys.path.insert(0, BENCHMARKS)   # train_step imports its sibling `record`
import train_step  # noqa: E402  pylint: disable=wrong-import-position
sys.path.remove(BENCHMARKS)      # the scripts' names (losses, plot) must not shadow other modules


class _Stopped(Exception):
  """Stands in for the time limit's SIGTERM arriving while the profile runs."""


def test_train_step_row_is_in_the_json_file_before_the_profile(tmp_path, monkeypatch, capsys):
  path = tmp_path / "rows.json"
  seen = {}

  def stopped_while_profiling(name, *_):
    seen["rows"] = json.loads(path.read_text())["rows"]
    raise _Stopped(name)
  monkeypatch.setattr(train_step, "profile_step", stopped_while_profiling)
  try:
    train_step.main(["--models", "resnet18", "--batch", "8", "--width", "4", "--warmup", "0",
                     "--iters", "1", "--skip-plain", "--json", str(path),
                     "--profile", str(tmp_path / "trace")])
  except _Stopped:
    pass
  rows = json.loads(path.read_text())["rows"]
  assert seen["rows"] == rows and [r["model"] for r in rows] == ["resnet18"]
  row = rows[0]
  assert math.isfinite(row["images_per_s"]) and row["step_ms"] > 0
  assert row["images_per_s"] == pytest.approx(8e3 / row["step_ms"], rel=1e-12)
  assert 0 < row["augment_share"]   # measured before the profile too
  printed = capsys.readouterr().out
  assert f"# resnet18: {row['step_ms']:.1f} ms/step, {row['images_per_s']:,.0f} images/s" in printed
