r"""Graphs per second of the GIN contrastive training step (GraphCL's TU setting), and of the host
pipeline that feeds it.

What is timed:
  device step  the trainer's jitted, donated step (`cldro_jax.train.make_train_step`): both views
               through the 3 x 32 GIN + head (BatchNorm over the batch's real nodes), the graph-form
               loss with its CL-DRO diagnostics, backward, Adam. Batches are prepared and put on the
               device beforehand; each step is waited for (block_until_ready), median after warm-up.
  host batch   making one batch on the host: augmenting every graph (NumPy) and packing both views
               into padded per-device blocks (`GraphTask.host_batch`), median. The trainer overlaps
               it with the device step in a background thread.

Command (MUTAG ships in grakel, so this runs offline):
  python benchmarks/graph_step.py                        # batch 128, proper and faithful modes
  python benchmarks/graph_step.py --dataset=NCI1 --loss=infonce --steps=50
Results: docs/benchmarks.md, "Graphs".
"""

from __future__ import annotations

import argparse
import datetime
import functools
import platform
import statistics
import sys
import time
from typing import Sequence

import jax

from cldro_jax import train
from cldro_jax.tasks import graph as graph_task


def _median_seconds(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def bench(dataset: str, mode: str, loss: str, batch_size: int, steps: int,
          warmup: int) -> dict:
  config = graph_task.tu_config(dataset, f"loss={loss},aug_mode={mode}")
  config.batch_size = batch_size
  config.mesh.num_devices = -1
  mesh = train.make_mesh(-1)
  if batch_size % mesh.size:
    raise ValueError(f"--batch={batch_size} must divide over the {mesh.size} devices.")
  task = graph_task.GraphTask(config, mesh)
  # Full batches only (the last batch of an epoch may be partial): graphs/s counts real graphs.
  total = 1 + warmup + steps   # the first call (compilation), warm-up, timed
  full_steps = [s for s in range(task.steps_per_epoch * total)
                if task.step_graph_indices(s).size == batch_size][:total]
  if not full_steps:
    raise ValueError(f"{dataset} has fewer than --batch={batch_size} graphs.")
  pending = iter(full_steps)
  host_time = _median_seconds(lambda: task.host_batch(next(pending)), min(len(full_steps), 10))
  batches = [task.to_global(task.host_batch(s)) for s in full_steps]

  schedule = train.make_schedule(config.optim, total, task.steps_per_epoch)
  tx = train.make_optimizer(config.optim, schedule)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  with jax.set_mesh(mesh):
    state = jax.jit(functools.partial(train.create_train_state, task, config, tx),
                    out_shardings=replicated)(jax.random.PRNGKey(0))
    step_fn = jax.jit(train.make_train_step(task, config, tx, schedule, mesh),
                      donate_argnums=(0,), out_shardings=(replicated, replicated))
    compile_start = time.perf_counter()
    state, _ = step_fn(state, batches[0])
    jax.block_until_ready(state)
    compile_s = time.perf_counter() - compile_start
    times = []
    for i in range(1, len(batches)):
      start = time.perf_counter()
      state, metrics = step_fn(state, batches[i])
      jax.block_until_ready((state, metrics))
      if i > warmup:
        times.append(time.perf_counter() - start)
  step_time = statistics.median(times)
  return {"dataset": dataset, "mode": mode, "loss": loss, "batch": batch_size,
          "devices": mesh.size, "nodes_budget": task.budget.max_nodes * mesh.size,
          "step_ms": 1e3 * step_time, "graphs_per_s": batch_size / step_time,
          "host_ms": 1e3 * host_time, "host_graphs_per_s": batch_size / host_time,
          "compile_s": compile_s, "timed_steps": len(times)}


def table(rows: Sequence[dict]) -> str:
  lines = ["| dataset | aug mode | loss | batch | devices | step (median) | graphs/s (step) | "
           "host batch | graphs/s (host) | first call (compile) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['dataset']} | {r['mode']} | {r['loss']} | {r['batch']} | {r['devices']} | "
                 f"{r['step_ms']:.1f} ms | {r['graphs_per_s']:,.0f} | {r['host_ms']:.1f} ms | "
                 f"{r['host_graphs_per_s']:,.0f} | {r['compile_s']:.1f} s |")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--dataset", default="MUTAG", choices=sorted(graph_task.PAPER_SETTINGS))
  parser.add_argument("--modes", default="proper,faithful")
  parser.add_argument("--loss", default="adnce", choices=("adnce", "infonce"))
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--steps", type=int, default=30, help="timed steps")
  parser.add_argument("--warmup", type=int, default=5, help="untimed steps after the first")
  args = parser.parse_args(argv)
  device = jax.devices()[0]
  print(f"# {datetime.date.today()}  jax {jax.__version__}, backend {jax.default_backend()}, "
        f"{jax.device_count()} x {device.device_kind}, host "
        f"{platform.processor() or platform.machine()}")
  print(f"# command: python benchmarks/{' '.join(['graph_step.py'] + sys.argv[1:])}")
  header = table([]).splitlines()
  print("\n".join(header), flush=True)
  rows = []
  for mode in (m for m in args.modes.split(",") if m):   # each row as soon as it is measured
    rows.append(bench(args.dataset, mode, args.loss, args.batch, args.steps, args.warmup))
    print(table(rows[-1:]).splitlines()[-1], flush=True)
  return rows


if __name__ == "__main__":
  main()
