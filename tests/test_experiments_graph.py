"""experiments/graph_mutag.py in --quick mode: its table and plot report exactly the results.json
files of its runs, and a rerun reuses finished runs instead of training again."""

import importlib
import json
import os
import pathlib
import re

import matplotlib.image
import numpy as np
import pytest

from cldro_jax import train
from helpers import read_json

graph_mutag = importlib.import_module("experiments.graph_mutag")


def test_quick_run_table_equals_the_results_it_read(tmp_path, monkeypatch):
  out = str(tmp_path / "out")
  args = ["--quick", "--seeds=0,1", "--losses=adnce", "--modes=proper", f"--out={out}"]
  rows = graph_mutag.main(args)

  per_seed, untrained = [], []
  for seed in (0, 1):
    path = os.path.join(out, "runs_quick", f"adnce_proper_seed{seed}", "results.json")
    with open(path, encoding="utf-8") as f:
      results = json.load(f)
    assert results["dataset"] == "MUTAG" and results["step"] == 2 and results["loss"] == "adnce"
    per_seed.append(results["svm_accuracy"])
    untrained.append(results["untrained_svm_accuracy"])
  # Different seeds: different data order and initialisation, hence different embeddings.
  assert per_seed[0] != per_seed[1]

  (row,) = rows
  assert row["per_seed"] == per_seed
  assert row["mean"] == pytest.approx(np.mean(per_seed), abs=1e-12)
  assert row["std"] == pytest.approx(np.std(per_seed), abs=1e-12)       # population std
  assert row["untrained_mean"] == pytest.approx(np.mean(untrained), abs=1e-12)

  table = pathlib.Path(out, "results.md").read_text(encoding="utf-8")
  match = re.search(r"^\| ADNCE \| proper \| ([\d.]+) \+- ([\d.]+) \| ([\d.]+) \+- ([\d.]+) \|",
                    table, re.M)
  assert match, table
  assert match.group(1) == f"{np.mean(per_seed):.2f}"
  assert match.group(2) == f"{np.std(per_seed):.2f}"
  assert match.group(3) == f"{np.mean(untrained):.2f}"
  assert "| GraphCL (published) | GraphCL's code | 86.80 +- 1.34 |" in table

  image = matplotlib.image.imread(os.path.join(out, "results.png"))
  assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
  summary = read_json(out, "summary.json")
  assert summary["rows"][0]["per_seed"] == per_seed and summary["quick"] is True

  # A rerun with the same --out reads the finished runs and trains nothing.
  def no_training(*_, **__):
    raise AssertionError("a finished run was trained again")
  monkeypatch.setattr(train, "train_and_evaluate", no_training)
  assert graph_mutag.main(args) == rows
  # ...but never serves a smoke run as a full one: those live in other folders.
  full_dir = graph_mutag.run_dir(out, "adnce", "proper", 0)
  assert not os.path.exists(full_dir)
  with pytest.raises(AssertionError, match="trained again"):
    graph_mutag.main([a for a in args if a != "--quick"])


def test_graph_losses_without_a_graph_form_are_refused(tmp_path):
  with pytest.raises(SystemExit):
    graph_mutag.main(["--quick", "--losses=dcl", f"--out={tmp_path}"])
