"""benchmarks/sentence_step.py (the BERT-base step of the GPU script) runs its real programs: a
one-layer BERT-base at batch 8 on the CPU (8 test devices), both programs, one JSON row each."""
import json
import math
import sys

import pytest

BENCHMARKS = str(__import__("pathlib").Path(__file__).resolve().parents[1] / "benchmarks")
sys.path.insert(0, BENCHMARKS)   # sentence_step imports its sibling `record`
import sentence_step  # noqa: E402  pylint: disable=wrong-import-position
sys.path.remove(BENCHMARKS)      # the scripts' names (losses, plot) must not shadow other modules


def test_both_programs_run_and_count_their_flops(tmp_path, capsys, monkeypatch):
  path = tmp_path / "rows.json"
  kept_before_profile = []

  def profile_text(*_):
    # The row is printed and in the JSON file before the profile runs (a time limit hit while
    # tracing costs the profile only; benchmarks/h200.sh).
    kept_before_profile.extend(json.loads(path.read_text())["rows"])
    return "(profile stand-in)"
  monkeypatch.setattr(sentence_step, "profile_text", profile_text)
  sentence_step.main(["--batches", "8", "--dtypes", "float32", "--programs", "project,plain",
                      "--layers", "1", "--warmup", "0", "--repeats", "1",
                      "--peak_tflops", "1.0", "--json", str(path),
                      "--profile", str(tmp_path / "trace")])
  rows = json.loads(path.read_text())["rows"]
  assert [r["program"] for r in kept_before_profile] == ["project"]   # the plain one unprofiled
  assert [r["program"] for r in rows] == ["project", "plain"]
  for row in rows:
    assert row["batch"] == 8 and math.isfinite(row["sentences_per_s"]) and row["ms"] > 0
  # XLA's count of the compiled step against the analytic estimate (sentence.flops_per_sentence):
  # the one-device plain step matches it; the project's step, split over the 8 test devices, is
  # counted on all of them (XLA reports one device's share), plus the optimizer update each
  # device repeats (large next to one sentence per device).
  assert rows[1]["xla_over_analytic"] == pytest.approx(1.0, abs=0.1)
  assert 0.95 < rows[0]["xla_over_analytic"] < 1.5
  assert capsys.readouterr().out.count("| float32 | 8 |") == 2
