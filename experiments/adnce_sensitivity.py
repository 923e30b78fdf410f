r"""ADNCE's sensitivity to mu and sigma (the paper tunes both per dataset; how much do they matter?).

Trains ADNCE on a grid of mu (the centre of the Gaussian weight, a cosine) and sigma (its width)
and InfoNCE, every cell with the same seeds, and reports the final score of each cell (image:
linear probe top-1; graph: SVM accuracy; sentence: STS), the final monitor score (kNN top-1 for
images), both paired by seed against InfoNCE, and a figure of score against mu, one line per
sigma, InfoNCE as a band.

  # docs/results.md, claim 6 (about 70 min on 2 CPU cores; reuses compare_losses' InfoNCE and
  # mu=0.7 runs through --runs)
  python experiments/adnce_sensitivity.py --out results/sensitivity --seeds 0 1 2 3 4 \
      --set total_epochs=20 --set eval.every_epochs=2 --set log_every_steps=1 \
      --runs results/runs
  python experiments/adnce_sensitivity.py --out /tmp/sens --quick

Quick check (tests/test_experiments.py): with sigma = 1e6 the weights are flat, so every mu must
reproduce InfoNCE seed for seed, and every cell's run must carry its own mu and sigma.
Writes OUT/adnce_sensitivity.md, OUT/adnce_sensitivity.json and OUT/adnce_sensitivity.png.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from experiments import (
  common,
  compare_losses,
)

DEFAULT_MUS = [0.1, 0.3, 0.5, 0.7, 0.9]
DEFAULT_SIGMAS = [0.5, 1.0]
QUICK_MUS, QUICK_SIGMAS = [0.1, 0.9], [1e6]
REFERENCE = "InfoNCE"


def parse_args(argv):
  parser = common.base_parser(__doc__)
  parser.add_argument("--mus", type=float, nargs="+", default=None,
                      help=f"ADNCE mu values (default {DEFAULT_MUS})")
  parser.add_argument("--sigmas", type=float, nargs="+", default=None,
                      help=f"ADNCE sigma values (default {DEFAULT_SIGMAS})")
  return parser.parse_args(argv)


def cell_label(mu: float, sigma: float) -> str:
  return f"ADNCE mu={mu:g} sigma={sigma:g}"


def grid_methods(mus: Sequence[float], sigmas: Sequence[float]) -> list[common.Method]:
  methods = [common.parse_method(f"infonce:label={REFERENCE}")]
  methods += [common.parse_method(f"adnce:mu={mu!r},sigma={sigma!r},label={cell_label(mu, sigma)}")
              for sigma in sigmas for mu in mus]
  return methods


def grid_table(rows_by_label: dict, mus, sigmas, key: str) -> str:
  """Mean +- std over seeds of `key`, one row per mu, one column per sigma."""
  body = [[f"{mu:g}"] + [common.fmt(rows_by_label[cell_label(mu, s)].get(key, [])) for s in sigmas]
          for mu in mus]
  body.append([REFERENCE] + [common.fmt(rows_by_label[REFERENCE].get(key, []))] * len(sigmas))
  return common.markdown_table(["mu"] + [f"sigma={s:g}" for s in sigmas], body)


def plot(rows_by_label: dict, mus, sigmas, panels, out: str, title: str) -> str:
  fig, axes = common.plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
  for ax, (key, name) in zip(axes[0], panels):
    reference = np.asarray([v for v in rows_by_label[REFERENCE].get(key, []) if v is not None])
    if reference.size:
      mean = reference.mean()
      std = reference.std(ddof=1) if reference.size > 1 else 0.0
      ax.axhline(mean, color="k", linestyle="--", label=f"{REFERENCE} (± std)")
      ax.axhspan(mean - std, mean + std, color="k", alpha=0.1)
    spread = 0.012 * (max(mus) - min(mus) or 1.0)   # side by side, so error bars do not hide
    for i, sigma in enumerate(sigmas):
      xs = np.asarray(mus) + (i - (len(sigmas) - 1) / 2) * spread
      common.errorbar_over_seeds(
          ax, xs, [rows_by_label[cell_label(mu, sigma)].get(key, []) for mu in mus],
          f"ADNCE sigma={sigma:g}")
    ax.set_xlabel("mu (centre of the Gaussian weight, cosine)")
    ax.set_ylabel(name)
    ax.set_title(f"{name}, mean ± std over seeds", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(title, fontsize=11)
  path = f"{out}/adnce_sensitivity.png"
  common.save_figure(fig, path)
  return path


def main(argv: Sequence[str] | None = None) -> dict:
  args = parse_args(argv)
  common.setup(args)
  base = common.base_config(args)
  domain = base.domain
  mus = args.mus or (QUICK_MUS if args.quick else DEFAULT_MUS)
  sigmas = args.sigmas or (QUICK_SIGMAS if args.quick else DEFAULT_SIGMAS)
  methods = grid_methods(mus, sigmas)
  specs = [common.RunSpec(m.label, seed, m.overrides) for m in methods for seed in args.seeds]
  records = common.run_all(base, specs, args.runs or f"{args.out}/runs",
                           desc="adnce_sensitivity")
  rows, _ = compare_losses.summarise(records, domain)
  rows_by_label = {r["label"]: r for r in rows}
  score_key, score_name = common.SCORE_KEYS.get(domain, ("", "score"))
  panels = [("score", score_name)] + [(f"final_{k}", f"final {name}")
                                      for k, name in compare_losses.CURVE_KEYS.get(domain, [])[:1]]
  panels = [(k, name) for k, name in panels if any(rows_by_label[REFERENCE].get(k, []))]
  dataset = records[0].results.get("dataset", domain)
  title = f"ADNCE sensitivity to mu and sigma on {dataset} (t={base.loss.temperature:g})"
  figure = plot(rows_by_label, mus, sigmas, panels, args.out, title)

  command = common.command_line(argv, "adnce_sensitivity.py")
  text = common.header(title, command, args.seeds, sum(r.wall_s for r in records))
  for key, name in panels:
    text += f"\n## {name}\n\n{grid_table(rows_by_label, mus, sigmas, key)}\n"
    paired = common.paired_table(rows, REFERENCE, name, key=key)
    if paired:
      text += f"\nPaired by seed, against {REFERENCE}:\n\n{paired}\n"
  text += (f"\n{len(methods) - 1} cells are compared with {REFERENCE}: at the 5% level about "
           f"{0.05 * (len(methods) - 1):.1f} of them would look significant by chance alone.\n")
  text += f"\n![{Path(figure).stem}]({Path(figure).name})\n"
  common.write_text(f"{args.out}/adnce_sensitivity.md", text)
  summary = {"domain": domain, "dataset": dataset, "mus": mus, "sigmas": sigmas,
             "methods": rows, "runs": [common.record_summary(r) for r in records],
             "environment": common.environment(), "command": command}
  common.write_json(f"{args.out}/adnce_sensitivity.json", summary)
  return summary


if __name__ == "__main__":
  main()
