r"""Host-side graph pipeline: milliseconds to make one training batch (augment every graph with
NumPy, pack both views into padded arrays), per augmentation, mode and graph size.

The GIN step on a GPU takes about a millisecond, so on the large TU datasets (REDDIT, COLLAB,
DD: hundreds of nodes per graph) this host work, not the device, sets the training rate.

Datasets: MUTAG (real, ships in grakel) and random graphs with the average node and edge counts
of the large TU datasets (TU Dortmund's dataset statistics; node counts within +-50% of the
average, see `random_graphs`), so the cost at their scale can be measured offline.

`--against REV` times the pipeline modules (graph_augment, graph_batch, graphs) of git revision
REV on the same batches in the same process, alternating runs, and adds the speed-up column:
the CPU figure to record is that ratio (absolute CPU times vary with the machine's load).

Command:
  python benchmarks/graph_host.py                          # MUTAG + REDDIT-BINARY-sized, 128/batch
  python benchmarks/graph_host.py --against c0a35c7 --json /tmp/graph_host.json  # vs the pipeline before its speed-up
Results: docs/benchmarks.md, "Graphs".
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
import types
from typing import Sequence

import numpy as np

import record  # benchmarks/record.py, beside this script
from cldro_jax.data import graphs as graphs_lib
from cldro_jax.data.tu_dataset import Graph

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Average nodes and undirected edges per graph (TU Dortmund's statistics of each dataset).
SIZES = {"REDDIT-BINARY": (429.6, 497.8), "REDDIT-MULTI-5K": (508.5, 594.9),
         "COLLAB": (74.5, 2457.8), "DD": (284.3, 715.7), "PROTEINS": (39.1, 72.8)}
PIPELINE_MODULES = ("graph_augment", "graph_batch", "graphs")


def random_graphs(name: str, count: int, seed: int = 0) -> list[Graph]:
  """`count` random simple undirected graphs with the dataset's average node and edge counts.

  Node counts are the average times s ~ U(0.5, 1.5); edge counts grow like s (sparse datasets)
  or s^2 (COLLAB, whose ego-networks are nearly complete), divided by the mean of that power
  (1 or 13/12) so that the average edge count is the dataset's."""
  nodes, edges = SIZES[name]
  dense = edges > 0.5 * nodes * (nodes - 1) / 2
  power, mean_power = (2, 13 / 12) if dense else (1, 1.0)
  rng = np.random.default_rng(seed)
  graphs = []
  for _ in range(count):
    scale = rng.uniform(0.5, 1.5)
    n = max(2, round(nodes * scale))
    pairs = n * (n - 1) // 2
    m = min(round(edges * scale**power / mean_power), pairs)
    keys = rng.choice(pairs, m, replace=False)
    u, v = np.triu_indices(n, k=1)
    chosen = np.stack([u[keys], v[keys]])
    edge_index = np.concatenate([chosen, chosen[::-1]], axis=1).astype(np.int64)
    graphs.append(Graph(np.ones((n, 1), np.float32), edge_index, 0))
  return graphs


def load_graphs(name: str, count: int) -> list[Graph]:
  if name == "MUTAG":
    return list(graphs_lib.load_tu_dataset("MUTAG", source="grakel").graphs)
  return random_graphs(name, count)


def pipeline_at_revision(revision: str) -> types.ModuleType:
  """The `graphs` module of git revision `revision`, importing that revision's graph_augment and
  graph_batch (tu_dataset, the file reader, is today's)."""
  package = f"_graph_pipeline_{revision.replace('-', '_').replace('.', '_')}"
  folder = pathlib.Path(tempfile.mkdtemp(prefix="graph_host_")) / package
  folder.mkdir()
  (folder / "__init__.py").write_text("")
  for module in PIPELINE_MODULES:
    try:
      text = subprocess.run(["git", "show", f"{revision}:cldro_jax/data/{module}.py"], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout
    except subprocess.CalledProcessError as err:
      raise SystemExit(f"--against {revision}: git cannot show cldro_jax/data/{module}.py at "
                       f"that revision ({err.stderr.strip()}). Use a commit of this repository, "
                       "e.g. `git log --oneline -- cldro_jax/data/graph_augment.py`.") from err
    for other in PIPELINE_MODULES:
      text = text.replace(f"cldro_jax.data.{other} ", f"{package}.{other} ")
    (folder / f"{module}.py").write_text(text)
  sys.path.insert(0, str(folder.parent))
  spec = importlib.util.find_spec(f"{package}.graphs")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def batch_ms(pipeline: types.ModuleType, graphs: Sequence[Graph], budget, aug: str, mode: str,
             batch: int, seed: int) -> float:
  indices = np.random.default_rng(seed).choice(len(graphs), batch, replace=len(graphs) < batch)
  start = time.perf_counter()
  pipeline.make_view_batches(graphs, indices, seed=seed, aug=aug, mode=mode, budget=budget)
  return 1e3 * (time.perf_counter() - start)


def bench(name: str, aug: str, mode: str, batch: int, repeats: int,
          baseline: types.ModuleType | None) -> dict:
  graphs = load_graphs(name, max(4 * batch, 256))
  budget = graphs_lib.view_budget(graphs, batch, mode)
  times = {"now": [], "baseline": []}
  for repeat in range(repeats + 1):     # the first round warms caches and is not counted
    # Alternate the two implementations on the same batch, so load changes hit both alike.
    for label, pipeline in (("now", graphs_lib), ("baseline", baseline)):
      if pipeline is not None:
        ms = batch_ms(pipeline, graphs, budget, aug, mode, batch, seed=repeat)
        if repeat:
          times[label].append(ms)
  row = {"dataset": name if name == "MUTAG" else f"{name}-sized", "aug": aug, "mode": mode,
         "batch": batch, "ms": statistics.median(times["now"])}
  row["graphs_per_s"] = batch / row["ms"] * 1e3
  if baseline is not None:
    row["baseline_ms"] = statistics.median(times["baseline"])
    row["speedup"] = row["baseline_ms"] / row["ms"]
  return row


def table(rows: Sequence[dict], against: str | None) -> str:
  extra = f" | {against} (ms) | speed-up" if against else ""
  lines = [f"| graphs | aug | mode | batch | ms/batch | graphs/s{extra} |",
           "|---|---|---|---|---|---|" + ("---|---|" if against else "")]
  for r in rows:
    line = (f"| {r['dataset']} | {r['aug']} | {r['mode']} | {r['batch']} | {r['ms']:.1f} | "
            f"{r['graphs_per_s']:,.0f} |")
    if against:
      line += f" {r['baseline_ms']:.1f} | {r['speedup']:.1f}x |"
    lines.append(line)
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--datasets", default="MUTAG,REDDIT-BINARY",
                      help=f"comma-separated: MUTAG and/or {', '.join(SIZES)}")
  parser.add_argument("--augs", default="random3,drop_nodes,subgraph,perturb_edges")
  parser.add_argument("--modes", default="proper,faithful")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--against", default=None, metavar="REV",
                      help="also time this git revision's pipeline, in the same process")
  parser.add_argument("--json", default=None, help="also write the rows to this file")
  args = parser.parse_args(argv)
  names = [n for n in args.datasets.split(",") if n]
  unknown = [n for n in names if n != "MUTAG" and n not in SIZES]
  if unknown:
    parser.error(f"unknown --datasets {unknown}; use MUTAG or {', '.join(SIZES)}")
  baseline, against = None, None
  if args.against:
    baseline = pipeline_at_revision(args.against)
    against = subprocess.run(["git", "rev-parse", "--short", args.against], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout.strip()  # HEAD -> a hash
  env = record.environment(backend="cpu (NumPy host pipeline)", device_kind="host",
                           device_count=1, jax="n/a")
  rec = record.JsonRecord(args.json, "graph_host", env=env, batch=args.batch, against=against)
  print(f"# {env['date']}  host {env['host']}, numpy {np.__version__}")
  print(f"# command: {env['command']}")
  print("\n".join(table([], against).splitlines()), flush=True)
  rows = []
  for name in names:
    for mode in (m for m in args.modes.split(",") if m):
      for aug in (a for a in args.augs.split(",") if a):
        rows.append(bench(name, aug, mode, args.batch, args.repeats, baseline))
        rec.add(**rows[-1])
        print(table(rows[-1:], against).splitlines()[-1], flush=True)
  return rows


if __name__ == "__main__":
  main()
