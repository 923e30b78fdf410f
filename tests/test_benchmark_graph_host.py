"""benchmarks/graph_host.py: its synthetic graphs have the TU datasets' average sizes, and its
table and --json rows agree (with an in-process baseline revision when git history exists)."""
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))   # graph_host imports its sibling `record`
_spec = importlib.util.spec_from_file_location("graph_host", ROOT / "benchmarks" / "graph_host.py")
graph_host = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(graph_host)
sys.path.remove(str(ROOT / "benchmarks"))


@pytest.mark.parametrize("name", ["REDDIT-BINARY", "COLLAB", "PROTEINS"])
def test_random_graphs_have_the_datasets_average_size(name):
  graphs = graph_host.random_graphs(name, 300)
  nodes, undirected_edges = graph_host.SIZES[name]   # TU Dortmund's published averages
  assert abs(np.mean([g.num_nodes for g in graphs]) / nodes - 1) < 0.05
  assert abs(np.mean([g.num_edges for g in graphs]) / (2 * undirected_edges) - 1) < 0.05
  for g in graphs[:20]:
    src, dst = g.edge_index
    keys = set((src * g.num_nodes + dst).tolist())
    assert len(keys) == g.num_edges and not np.any(src == dst)   # simple graph
    assert keys == set((dst * g.num_nodes + src).tolist())       # undirected


def _has_git_history() -> bool:
  done = subprocess.run(["git", "rev-parse", "--verify", "HEAD"], cwd=ROOT, capture_output=True)
  return done.returncode == 0


def test_table_and_json_rows_agree(tmp_path):
  path = tmp_path / "graph_host.json"
  against = ["--against", "HEAD"] if _has_git_history() else []
  done = subprocess.run(
      [sys.executable, "benchmarks/graph_host.py", "--datasets", "MUTAG,PROTEINS",
       "--augs", "random3", "--modes", "proper,faithful", "--batch", "32", "--repeats", "1",
       "--json", str(path), *against],
      cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
      timeout=300, check=True)
  result = json.loads(path.read_text())
  assert result["benchmark"] == "graph_host" and result["settings"]["batch"] == 32
  printed = re.findall(r"^\| (MUTAG|PROTEINS-sized) \| random3 \| (\w+) \| 32 \| ([\d.]+) \|",
                       done.stdout, flags=re.M)
  assert len(printed) == len(result["rows"]) == 4
  for (dataset, mode, ms), row in zip(printed, result["rows"], strict=True):
    assert (dataset, mode) == (row["dataset"], row["mode"])
    assert float(ms) == pytest.approx(row["ms"], abs=0.051)
    assert row["graphs_per_s"] == pytest.approx(32e3 / row["ms"])
    if against:
      assert row["speedup"] == pytest.approx(row["baseline_ms"] / row["ms"])


def test_unknown_dataset_is_refused():
  with pytest.raises(SystemExit):
    graph_host.main(["--datasets", "NOPE"])
