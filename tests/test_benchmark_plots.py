"""The benchmarks' --json files hold the numbers of their printed tables, and benchmarks/plot.py
draws exactly those numbers (and the ANCHORS.md figures only beside comparable H200 results)."""
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# benchmarks/plot.py by its path: putting benchmarks/ on sys.path would let its script names
# (losses, plot, record) shadow other modules for the rest of the session.
_spec = importlib.util.spec_from_file_location("benchmark_plot", ROOT / "benchmarks" / "plot.py")
plot = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plot)


@pytest.fixture(scope="module")
def losses_run(tmp_path_factory):
  path = tmp_path_factory.mktemp("bench") / "losses.json"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  done = subprocess.run(
      [sys.executable, "benchmarks/losses.py", "--sizes", "64,128", "--block-size", "64",
       "--repeats", "1", "--warmup", "0", "--json", str(path)],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=True)
  return done.stdout, json.loads(path.read_text()), path


def test_losses_json_holds_the_printed_table(losses_run):
  stdout, result, _ = losses_run
  assert result["benchmark"] == "losses" and result["settings"]["block_size"] == 64
  assert result["command"].startswith("python benchmarks/losses.py --sizes 64,128")
  printed = re.findall(r"^\| (\d+) \| (\w+)[^|]* \| ([\d.]+) \| [^|]* \| ([\d.]+) \|",
                       stdout, flags=re.M)
  assert len(printed) == len(result["rows"]) == 6
  for (batch, impl, ms, mib), row in zip(printed, result["rows"], strict=True):
    assert (int(batch), impl) == (row["batch"], row["implementation"])
    assert float(ms) == pytest.approx(row["ms"], abs=0.006)
    assert float(mib) == pytest.approx(row["temp_mib"], abs=0.06)


def test_losses_figure_draws_the_json_numbers(losses_run, tmp_path):
  _, result, path = losses_run
  fig = plot.plot_losses([result])
  ax_time, ax_mem = fig.axes
  for ax, key in ((ax_time, "ms"), (ax_mem, "temp_mib")):
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"plain", "dense", "blockwise (64)"}
    for line in lines.values():
      impl = line.get_label().split(" ")[0]
      rows = [r for r in result["rows"] if r["implementation"] == impl]
      np.testing.assert_array_equal(line.get_xdata(), [r["batch"] for r in rows])
      np.testing.assert_array_equal(line.get_ydata(), [r[key] for r in rows])
  out = tmp_path / "losses.png"
  subprocess.run([sys.executable, "benchmarks/plot.py", str(path), "--out", str(out)],
                 cwd=ROOT, check=True, capture_output=True)
  height, width, _ = matplotlib.image.imread(out).shape
  assert width > 800 and height > 300


def _train_step_result(device_kind, batch, one_pass, rows):
  return {"benchmark": "train_step", "date": "2026-11-29", "backend": "gpu",
          "device_kind": device_kind, "device_count": 1, "jax": "0.11.2", "host": "x86_64",
          "command": "python benchmarks/train_step.py",
          "settings": {"batch": batch, "width": 64, "dtype": "bfloat16",
                       "views_in_one_pass": one_pass, "iters": 30, "warmup": 5},
          "rows": rows}


def _bars(ax):
  """{y tick label: bar length} of one horizontal-bar panel (top to bottom)."""
  labels = [t.get_text() for t in ax.get_yticklabels()]
  return {label: patch.get_width() for label, patch in zip(labels, ax.patches, strict=True)}


def test_train_step_figure_merges_files_and_adds_anchors_only_on_h200():
  def row(model, ips, plain=None):
    return {"model": model, "step_ms": 1.0, "images_per_s": ips, "plain_images_per_s": plain}
  host = {"model": "host input pipeline", "images_per_s": 1e6}
  per_view_18 = _train_step_result("NVIDIA H200", 512, False, [row("resnet18", 51_000), host])
  per_view_50 = _train_step_result("NVIDIA H200", 512, False, [row("resnet50", 16_000)])
  one_pass_18 = _train_step_result("NVIDIA H200", 512, True, [row("resnet18", 55_000, 45_000)])
  fig = plot.plot_train_step([per_view_18, per_view_50, one_pass_18])
  panels = [ax for ax in fig.axes if ax.get_visible()]
  assert [ax.get_title() for ax in panels] == ["resnet18", "resnet50"]
  # Tick labels are written on the first panel only; the second has the same order of series.
  resnet18 = _bars(panels[0])
  assert resnet18["this project, a pass per view"] == 51_000
  assert resnet18["this project, both views in one pass"] == 55_000
  assert resnet18["plain step, same run"] == 45_000
  assert resnet18["plain JAX/Flax bf16"] == 44_777        # ANCHORS.md
  assert resnet18["PyTorch fp32 (reference code)"] == 10_190
  resnet50 = [p.get_width() for p in panels[1].patches]
  assert 16_000 in resnet50 and 12_526 in resnet50 and 55_000 not in resnet50
  assert [line.get_xdata()[0] for line in panels[0].get_lines()] == [50_000]   # the target
  # Another batch size, or a GPU other than the anchors', is not put beside them.
  for result in (_train_step_result("NVIDIA H200", 256, False, [row("resnet18", 30_000)]),
                 _train_step_result("NVIDIA A100", 512, False, [row("resnet18", 30_000)])):
    bars = _bars(plot.plot_train_step([result]).axes[0])
    assert bars == {"this project, a pass per view": 30_000}


def test_sentence_figure_panels_per_dtype_and_batch():
  rows = [{"program": p, "dtype": "bfloat16", "batch": b, "sentences_per_s": v}
          for p, b, v in (("project", 512, 9_500.0), ("plain", 512, 8_000.0),
                          ("project", 64, 3_100.0))]
  result = {"benchmark": "sentence_step", "date": "2026-11-29", "backend": "gpu",
            "device_kind": "NVIDIA H200", "device_count": 1, "jax": "0.11.2", "host": "x86_64",
            "command": "python benchmarks/sentence_step.py",
            "settings": {"architecture": "bert-base-uncased", "layers": 12, "seq_len": 32},
            "rows": rows}
  panels = [ax for ax in plot.plot_sentence_step([result]).axes if ax.get_visible()]
  assert [ax.get_title() for ax in panels] == ["bfloat16, batch 512", "bfloat16, batch 64"]
  assert _bars(panels[0]) == {"this project": 9_500, "plain step, same run": 8_000,
                              "Hugging Face transformers (PyTorch)": 6_143}
  assert sorted(p.get_width() for p in panels[1].patches) == [1_462, 3_100]
  assert [line.get_xdata()[0] for line in panels[1].get_lines()] == [3_000]


def test_files_of_different_benchmarks_are_refused(losses_run, tmp_path):
  _, _, losses_path = losses_run
  other = tmp_path / "t.json"
  other.write_text(json.dumps(_train_step_result("cpu", 8, False, [])))
  with pytest.raises(SystemExit, match="different benchmarks"):
    plot.load([str(losses_path), str(other)])


def test_files_without_rows_are_left_out_with_a_message(losses_run, tmp_path, capsys):
  # What a benchmark stopped before its first row leaves (benchmarks/h200.sh's time limits).
  _, result, losses_path = losses_run
  empty = tmp_path / "empty.json"
  empty.write_text(json.dumps({**result, "rows": []}))
  assert plot.load([str(empty), str(losses_path)]) == [result]
  assert "empty.json: no rows" in capsys.readouterr().err
  with pytest.raises(SystemExit, match="no rows in any of the files"):
    plot.load([str(empty)])


def test_scaling_figure_draws_images_per_second_and_the_linear_line():
  rows = [{"devices": d, "images_per_s": v, "median_step_s": 512 / v}
          for d, v in ((4, 150_000.0), (1, 45_000.0), (2, 85_000.0))]
  result = {"benchmark": "scaling", "date": "2026-11-29", "backend": "gpu",
            "device_kind": "NVIDIA H200", "device_count": 4, "jax": "0.11.2", "host": "x86_64",
            "command": "python benchmarks/scaling.py --devices 1,2,4",
            "settings": {"batch": 512, "model": "resnet18", "width": 64, "dtype": "bfloat16",
                         "steps": 20, "warmup": 3},
            "rows": rows}
  ax = plot.plot_scaling([result]).axes[0]
  measured, ideal = ax.get_lines()
  np.testing.assert_array_equal(measured.get_xdata(), [1, 2, 4])
  np.testing.assert_array_equal(measured.get_ydata(), [45_000, 85_000, 150_000])
  np.testing.assert_array_equal(ideal.get_ydata(), [45_000, 90_000, 180_000])
  assert ideal.get_label() == "linear from 1 device"


def test_scaling_figure_on_virtual_cpu_devices_names_each_batch_and_draws_the_flat_reference():
  def result(batch, rates):
    return {"benchmark": "scaling", "date": "2026-11-29", "backend": "cpu",
            "device_kind": "cpu", "device_count": 8, "jax": "0.10.2", "host": "x86_64",
            "command": "python benchmarks/scaling.py",
            "settings": {"batch": batch, "model": "resnet18", "width": 8, "dtype": "float32",
                         "steps": 20, "warmup": 3},
            "rows": [{"devices": d, "images_per_s": v} for d, v in rates]}
  ax = plot.plot_scaling([result(64, ((1, 509.0), (2, 478.0), (8, 338.0))),
                          result(128, ((1, 454.0), (8, 355.0)))]).axes[0]
  lines = {line.get_label(): line for line in ax.get_lines()}
  np.testing.assert_array_equal(lines["global batch 64"].get_ydata(), [509, 478, 338])
  np.testing.assert_array_equal(lines["global batch 128"].get_ydata(), [454, 355])
  # Virtual devices share the cores: the reference is the 1-device rate, not a linear speed-up.
  flat = [line for line in ax.get_lines() if line.get_label().startswith("the rate on 1 device")]
  assert sorted(list(line.get_ydata()) for line in flat) == [[454, 454], [509, 509, 509]]
  assert "global batch" not in ax.get_title()   # the batches differ: named per line instead


def test_bar_labels_keep_three_digits_for_small_rates():
  assert plot._rate_label(4.09) == "4.09"
  assert plot._rate_label(4.24) == "4.24"
  assert plot._rate_label(57.25) == "57.2"
  assert plot._rate_label(51_000.4) == "51,000"


def test_graph_host_figure_draws_both_revisions_per_dataset():
  def row(dataset, aug, ms, baseline_ms):
    return {"dataset": dataset, "aug": aug, "mode": "proper", "batch": 128, "ms": ms,
            "graphs_per_s": 128e3 / ms, "baseline_ms": baseline_ms, "speedup": baseline_ms / ms}
  result = {"benchmark": "graph_host", "date": "2026-11-29", "backend": "cpu",
            "device_kind": "host", "device_count": 1, "jax": "n/a", "host": "x86_64",
            "command": "python benchmarks/graph_host.py --against c0a35c7",
            "settings": {"batch": 128, "against": "c0a35c7"},
            "rows": [row("MUTAG", "random3", 10.0, 20.0), row("MUTAG", "subgraph", 8.0, 8.0),
                     row("DD-sized", "random3", 40.0, 120.0),
                     row("DD-sized", "subgraph", 50.0, 100.0)]}
  panels = plot.plot_graph_host([result]).axes
  assert [ax.get_title() for ax in panels] == ["MUTAG", "DD-sized"]
  # Per panel: this revision's bars, then the baseline's, each listed bottom row first.
  np.testing.assert_allclose([p.get_width() for p in panels[1].patches],
                             [128e3 / 50, 128e3 / 40, 128e3 / 100, 128e3 / 120])
  assert [t.get_text() for t in panels[1].texts] == ["2.0x", "3.0x"]
  assert [t.get_text() for t in panels[0].get_yticklabels()] == ["subgraph, proper",
                                                                 "random3, proper"]
