r"""MUTAG: InfoNCE vs ADNCE, proper vs faithful augmentations, over 5 seeds (GraphCL's protocol).

Runs `configs/tu_mutag.py` for every (loss, augmentation mode, seed), one after the other, in this
process; each run's workdir keeps its checkpoints and results.json, so rerunning the command
skips finished runs of the same config (and resumes an interrupted one; --quick runs live in
their own folders). Then writes into --out:
  results.md      a markdown table: SVM 10-fold CV accuracy, mean +- std over seeds (population
                  std, as numpy), next to the untrained GIN (same protocol) and GraphCL's
                  86.80 +- 1.34
  results.png     the same as a bar chart with error bars
  summary.json    every number of the table, and each run's results.json path and wall time

Command (the 20 runs of docs/results.md, about 20-30 minutes on a 2-core CPU):
  nice -n 10 python experiments/graph_mutag.py --out=workdirs/graph_mutag
Smoke run (seconds; what tests/test_experiments_graph.py runs):
  python experiments/graph_mutag.py --quick --seeds=0,1 --losses=adnce --modes=proper --out=DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=wrong-import-position
from cldro_jax.evaluators import svm_cv
from cldro_jax.tasks import graph as graph_task
from experiments import common
# pylint: enable=wrong-import-position

GRAPHCL_MUTAG = graph_task.PAPER_SETTINGS["MUTAG"]["graphcl"]   # (86.80, 1.34), GraphCL paper
LOSS_LABELS = {"infonce": "InfoNCE", "adnce": "ADNCE"}


def run_config(loss: str, mode: str, seed: int, quick: bool):
  """The MUTAG config of one run; ``quick`` shrinks it to seconds (same code path)."""
  config = graph_task.tu_config("MUTAG", f"loss={loss},aug_mode={mode},seed={seed}")
  config.progress_bar = False
  if quick:
    config.batch_size = 32
    config.total_steps = 2
    config.eval.every_epochs = 0
    config.eval.folds = 3
    config.eval.inner_folds = 2
  return config


def run_dir(out: str, loss: str, mode: str, seed: int, quick: bool = False) -> str:
  # Smoke runs in their own folder: a full run must never find (and reuse) a 2-step one.
  return os.path.join(out, "runs_quick" if quick else "runs", f"{loss}_{mode}_seed{seed}")


def run_one(out: str, loss: str, mode: str, seed: int, quick: bool) -> dict[str, Any]:
  """Trains and evaluates one run unless this very config finished in its folder (a run made
  with another config, e.g. before a change of the recipe, is resumed or refused by the
  trainer, never reused); returns its record."""
  workdir = run_dir(out, loss, mode, seed, quick)
  results, wall = common.run_one(run_config(loss, mode, seed, quick), workdir)
  return {"loss": loss, "mode": mode, "seed": seed,
          "results_json": os.path.join(workdir, "results.json"),
          "svm_accuracy": results["svm_accuracy"],
          "untrained_svm_accuracy": results.get("untrained_svm_accuracy"),
          "wall_time_s": wall or None}


def summarize(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """One row per (loss, mode): mean +- std over seeds of the trained and untrained accuracy."""
  rows = []
  for loss in dict.fromkeys(r["loss"] for r in records):
    for mode in dict.fromkeys(r["mode"] for r in records):
      runs = [r for r in records if r["loss"] == loss and r["mode"] == mode]
      if not runs:
        continue
      mean, std = svm_cv.mean_std_over_seeds(r["svm_accuracy"] for r in runs)
      untrained = [r["untrained_svm_accuracy"] for r in runs
                   if r["untrained_svm_accuracy"] is not None]
      base_mean, base_std = svm_cv.mean_std_over_seeds(untrained) if untrained else (None, None)
      walls = [r["wall_time_s"] for r in runs if r["wall_time_s"] is not None]
      rows.append({"loss": loss, "mode": mode, "seeds": [r["seed"] for r in runs],
                   "mean": mean, "std": std,
                   "per_seed": [r["svm_accuracy"] for r in runs],
                   "untrained_mean": base_mean, "untrained_std": base_std,
                   "mean_wall_time_s": float(np.mean(walls)) if walls else None})
  return rows


def _pm(mean, std) -> str:
  return "n/a" if mean is None else f"{mean:.2f} +- {std:.2f}"


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
  lines = ["| loss | augmentations | SVM accuracy (%) | untrained GIN (%) | per seed | "
           "wall time / run |",
           "|---|---|---|---|---|---|"]
  for row in rows:
    per_seed = ", ".join(f"{v:.2f}" for v in row["per_seed"])
    wall = "n/a" if row["mean_wall_time_s"] is None else f"{row['mean_wall_time_s']:.0f} s"
    lines.append(f"| {LOSS_LABELS.get(row['loss'], row['loss'])} | {row['mode']} | "
                 f"{_pm(row['mean'], row['std'])} | "
                 f"{_pm(row['untrained_mean'], row['untrained_std'])} | {per_seed} | {wall} |")
  lines.append(f"| GraphCL (published) | GraphCL's code | {GRAPHCL_MUTAG[0]:.2f} +- "
               f"{GRAPHCL_MUTAG[1]:.2f} | | | |")
  return "\n".join(lines) + "\n"


def bar_chart(rows: Sequence[dict[str, Any]], path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  labels = [f"{LOSS_LABELS.get(r['loss'], r['loss'])}\n{r['mode']}" for r in rows]
  x = np.arange(len(rows))
  fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 3, 4))
  ax.bar(x - 0.2, [r["mean"] for r in rows], 0.4, yerr=[r["std"] for r in rows], capsize=4,
         label="trained (mean +- std over seeds)")
  if all(r["untrained_mean"] is not None for r in rows):
    ax.bar(x + 0.2, [r["untrained_mean"] for r in rows], 0.4,
           yerr=[r["untrained_std"] for r in rows], capsize=4, color="0.7",
           label="untrained GIN")
  ax.axhspan(GRAPHCL_MUTAG[0] - GRAPHCL_MUTAG[1], GRAPHCL_MUTAG[0] + GRAPHCL_MUTAG[1],
             color="tab:red", alpha=0.15)
  ax.axhline(GRAPHCL_MUTAG[0], color="tab:red", linestyle="--",
             label=f"GraphCL {GRAPHCL_MUTAG[0]:.2f} +- {GRAPHCL_MUTAG[1]:.2f}")
  lows = [r["mean"] - r["std"] for r in rows] + [GRAPHCL_MUTAG[0] - GRAPHCL_MUTAG[1]]
  ax.set_ylim(max(0.0, min(lows) - 8.0), 100.0)
  ax.set_xticks(x, labels)
  ax.set_ylabel("SVM 10-fold CV accuracy (%)")
  ax.set_title("MUTAG, GIN pre-training (20 epochs)")
  ax.legend(loc="lower right", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _csv(text: str, cast=str) -> list:
  return [cast(v) for v in text.split(",") if v]


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="workdirs/graph_mutag", help="output folder")
  parser.add_argument("--seeds", default="0,1,2,3,4", help="training seeds (comma-separated)")
  parser.add_argument("--losses", default="infonce,adnce")
  parser.add_argument("--modes", default="proper,faithful", help="augmentation modes")
  parser.add_argument("--quick", action="store_true", help="2 steps per run, 3-fold SVM: smoke")
  args = parser.parse_args(argv)
  seeds, losses, modes = _csv(args.seeds, int), _csv(args.losses), _csv(args.modes)
  for loss in losses:
    if loss not in LOSS_LABELS:
      parser.error(f"--losses: {loss!r} is not one of {sorted(LOSS_LABELS)} (graphs have no "
                   "DCL/HCL form)")
  os.makedirs(args.out, exist_ok=True)

  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  jobs = [(loss, mode, seed) for loss in losses for mode in modes for seed in seeds]
  records = []
  start = time.time()
  with tqdm(jobs, unit="run", file=sys.stderr) as bar:
    for loss, mode, seed in bar:
      bar.set_postfix_str(f"{loss} {mode} seed {seed}")
      records.append(run_one(args.out, loss, mode, seed, args.quick))
  rows = summarize(records)
  with open(os.path.join(args.out, "results.md"), "w", encoding="utf-8") as f:
    f.write(markdown_table(rows))
  bar_chart(rows, os.path.join(args.out, "results.png"))
  with open(os.path.join(args.out, "summary.json"), "w", encoding="utf-8") as f:
    json.dump({"rows": rows, "runs": records, "graphcl": list(GRAPHCL_MUTAG),
               "total_wall_time_s": time.time() - start, "quick": args.quick}, f, indent=2)
  print(markdown_table(rows))
  return rows


if __name__ == "__main__":
  main()
