"""The README's main job: configs/quickstart.py, exactly as shipped.

Over 3 seeds the trained encoder's linear probe must beat the identical probe on the untrained
encoder by at least 2 points on average (the issue's acceptance check).
"""

import json
import pathlib
import subprocess
import sys

import numpy as np

from cldro_jax import config_defaults
from cldro_jax import train
from configs import quickstart
from helpers import read_json


def test_quickstart_trained_beats_untrained_by_two_points_over_three_seeds(tmp_path):
  gains = []
  for seed in (0, 1, 2):
    config = quickstart.get_config(f"seed={seed}")
    config.progress_bar = False
    config.mesh.num_devices = 1   # as on a user's CPU (the tests fake 8 devices)
    results = train.train_and_evaluate(config, str(tmp_path / f"seed{seed}"))
    assert read_json(tmp_path, f"seed{seed}", "results.json") == json.loads(
        json.dumps(results))
    for key in ("linear_probe_top1", "untrained_linear_probe_top1"):
      assert 10.0 <= results[key] <= 100.0, results   # above chance (10 classes)
    gains.append(results["linear_probe_top1"] - results["untrained_linear_probe_top1"])
  assert np.mean(gains) >= 2.0, f"trained - untrained linear probe, per seed: {gains}"


def test_quickstart_config_is_the_documented_one():
  config = quickstart.get_config()
  config_defaults.validate_config(config)
  assert config.data.source == "fashion_mnist_subset"       # shipped: no download
  assert config.eval.untrained_baseline and config.eval.linear_probe == "features"
  assert config.loss.name == "adnce"


def test_the_command_prints_results_json_and_ends_with_the_summary(tmp_path):
  """stdout is the results as JSON (for scripts); the last lines on the terminal are the summary
  with the trained encoder's probe next to the untrained one's, as results.json has them."""
  workdir = tmp_path / "run"
  run = subprocess.run(
      [sys.executable, "-m", "cldro_jax.main", "--config=configs/quickstart.py:runlocal",
       f"--workdir={workdir}", "--config.progress_bar=False"],
      cwd=pathlib.Path(__file__).resolve().parents[1], capture_output=True, text=True,
      timeout=300, check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  results = read_json(workdir, "results.json")
  assert json.loads(run.stdout) == results
  tail = run.stderr.rstrip().splitlines()[-6:]
  trained, untrained = results["linear_probe_top1"], results["untrained_linear_probe_top1"]
  assert tail[0].startswith("Results after 4 steps"), tail
  assert tail[1].split() == [
      "linear", "probe", "top-1", "(features)", "trained", f"{trained:.2f}", "untrained",
      f"{untrained:.2f}", "(gain", f"{trained - untrained:+.2f})"], tail
  assert tail[3].split()[:3] == ["kNN", "top-1", "(k=5)"], tail
  assert float(tail[3].split()[3]) == round(results["final_knn_top1"], 2)
  assert tail[-1] == f"All results: {workdir / 'results.json'}"
