r"""Beyond the paper: adaptive ADNCE (its open question: choosing mu and sigma adaptively).

ADNCE's Gaussian weights are stop-gradient, so the loss gives mu and sigma no gradient: they
cannot be learned by backpropagation. Here they move by explicit rules computed inside the step
from the current negatives (`cldro_jax/losses/adaptive.py`, `config.loss.mu_rule` /
`sigma_rule`): mu = a quantile of the batch's negative cosines (the Gaussian's peak follows the
hard end of the negatives as the embedding spreads), sigma = a multiple of their standard
deviation. Each step logs the mu and sigma it used (`adnce_mu`, `adnce_sigma`). Fixed-(mu, sigma)
ADNCE and InfoNCE run in the same experiment, same seeds, same budget.

  python experiments/adaptive_adnce.py --out results/adaptive --seeds 0 1 2 3 4 5 6 7 8 9 \
      --set total_epochs=20 --set eval.every_epochs=2 --set log_every_steps=1 \
      --runs results/runs   # reuses compare_losses' runs (same --runs)
  python experiments/adaptive_adnce.py --out /tmp/adaptive --quick

Quick check: mu and sigma really move from step to step, and the logged values of a replayed
step equal the quantile / std recomputed in NumPy from the dumped projections
(OUT/adaptive_replay.npz; tests/test_experiments.py).
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

QUANTILE = "adnce:mu_rule=quantile,mu_quantile=0.9,label=ADNCE mu=q0.9(s_neg)"
BOTH = ("adnce:mu_rule=quantile,mu_quantile=0.9,sigma_rule=std,sigma_scale=1.0,"
        "label=ADNCE mu=q0.9(s_neg) sigma=std(s_neg)")
DEFAULT_METHODS = ["infonce:label=InfoNCE", "adnce:label=ADNCE fixed", QUANTILE, BOTH]
QUICK_METHODS = [BOTH]


def parse_args(argv):
  parser = common.base_parser(__doc__)
  parser.add_argument("--methods", nargs="+", default=None,
                      help="method specs name[:key=value,...,label=...]")
  return parser.parse_args(argv)


def trajectory(record, key: str, fixed: float) -> tuple[np.ndarray, np.ndarray]:
  """The logged per-step mu or sigma; a fixed run logs none: its constant value."""
  epochs, values = record.train(key)
  if values.size:
    return epochs, values
  epochs, _ = record.train("loss")
  return epochs, np.full(epochs.shape, fixed)


def is_adaptive(record) -> bool:
  loss = record.config.loss
  return loss.name == "adnce" and (loss.mu_rule, loss.sigma_rule) != ("fixed", "fixed")


def dump_check(records, out: str) -> dict | None:
  """Replays one step of the first adaptive run; saves projections and the logged mu/sigma."""
  adaptive = [r for r in records if is_adaptive(r)]
  if not adaptive:
    return None
  run = adaptive[0]
  step = common.replayable_step(run.workdir)
  if step is None:
    return None
  p = common.replay_step(run.workdir, step)
  logged = common.logged_train_record(run.workdir, step + 1)
  loss = run.config.loss
  np.savez(f"{out}/adaptive_replay.npz", z1=p["z1"], z2=p["z2"], valid=p["valid"],
           variant=p["variant"], step=step, mu_rule=loss.mu_rule, mu_quantile=loss.mu_quantile,
           sigma_rule=loss.sigma_rule, sigma_scale=loss.sigma_scale, mu=loss.mu,
           sigma=loss.sigma, logged_mu=logged["adnce_mu"], logged_sigma=logged["adnce_sigma"])
  return {"workdir": run.workdir, "step": step, "logged_mu": logged["adnce_mu"],
          "logged_sigma": logged["adnce_sigma"]}


def main(argv: Sequence[str] | None = None) -> dict:
  args = parse_args(argv)
  common.setup(args)
  base = common.base_config(args)
  domain = base.domain
  coarse_logs = None
  if base.log_every_steps != 1:
    # The trainer logs means over log_every_steps steps: mu / sigma "per step" would be those
    # means, and no single step could be replayed against its logged values.
    coarse_logs = (f"log_every_steps={base.log_every_steps}: the mu / sigma columns are means "
                   f"over {base.log_every_steps} steps and the replay check is skipped; pass "
                   "--set log_every_steps=1 for per-step values.")
    print(f"note: {coarse_logs}", file=sys.stderr, flush=True)
  methods = [common.parse_method(m) for m in
             (args.methods or (QUICK_METHODS if args.quick else DEFAULT_METHODS))]
  specs = [common.RunSpec(m.label, seed, m.overrides) for m in methods for seed in args.seeds]
  records = common.run_all(base, specs, args.runs or f"{args.out}/runs", desc="adaptive_adnce")
  rows, curves = compare_losses.summarise(records, domain)
  groups = common.group_by(records)

  moves = {}
  for (label,), group in groups.items():
    loss = group[0].config.loss
    if loss.name != "adnce":
      continue
    mu = [trajectory(r, "adnce_mu", loss.mu) for r in group]
    sigma = [trajectory(r, "adnce_sigma", loss.sigma) for r in group]
    moves[label] = {
        "mu_first": [m[1][0] for m in mu], "mu_last": [m[1][-1] for m in mu],
        "mu_range": [float(m[1].max() - m[1].min()) for m in mu],
        "sigma_first": [s[1][0] for s in sigma], "sigma_last": [s[1][-1] for s in sigma],
        "mu_curves": [m[1] for m in mu], "sigma_curves": [s[1] for s in sigma],
        "epochs": mu[0][0]}

  figures = compare_losses.plot(curves, domain, args.out, "Adaptive ADNCE",
                                prefix="adaptive_adnce")
  figures = [f for f in figures if not f.endswith("train_loss.png")]
  fig, axes = common.plt.subplots(1, 2, figsize=(11, 4))
  for label, m in moves.items():
    for ax, key in zip(axes, ("mu_curves", "sigma_curves")):
      common.plot_mean_std(ax, m["epochs"], np.stack(m[key]), label)
  for ax, name in zip(axes, ("mu (centre of the Gaussian, cosine)", "sigma (width, cosine)")):
    ax.set_xlabel("epoch")
    ax.set_ylabel(name)
    ax.set_title(f"ADNCE's {name.split(' ')[0]} per step (mean ± std over seeds)")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  path = f"{args.out}/adaptive_adnce_mu_sigma.png"
  common.save_figure(fig, path)
  figures.append(path)

  check = dump_check(records, args.out)
  command = common.command_line(argv, "adaptive_adnce.py")
  text = common.header("Adaptive ADNCE: mu and sigma from the current negatives", command,
                       args.seeds, sum(r.wall_s for r in records))
  text += "\n" + compare_losses.table(rows, domain) + "\n\n"
  if coarse_logs:
    text += f"Note: {coarse_logs}\n\n"
  score_name = common.SCORE_KEYS.get(domain, ("", "score"))[1]
  adaptive_labels = {label for (label,), group in groups.items() if is_adaptive(group[0])}
  for reference in [r["label"] for r in rows if r["label"] not in adaptive_labels]:
    paired = common.paired_table(
        [r for r in rows if r["label"] == reference or r["label"] in adaptive_labels],
        reference, score_name)
    if paired:
      text += f"Paired by seed, against {reference}:\n\n{paired}\n\n"
  text += common.markdown_table(
      ["method", "mu first → last step", "mu range over training", "sigma first → last step"],
      [[label, f"{np.mean(m['mu_first']):.3f} → {np.mean(m['mu_last']):.3f}",
        common.fmt(m["mu_range"], 3),
        f"{np.mean(m['sigma_first']):.3f} → {np.mean(m['sigma_last']):.3f}"]
       for label, m in moves.items()]) + "\n"
  if check:
    text += (f"\nCheck (replayed step {check['step'] + 1}): logged mu {check['logged_mu']:.5f}, "
             f"sigma {check['logged_sigma']:.5f}; tests/test_experiments.py recomputes them.\n")
  text += "\n" + "".join(f"![{Path(f).stem}]({Path(f).name})\n" for f in figures)
  common.write_text(f"{args.out}/adaptive_adnce.md", text)
  summary = {"methods": rows, "moves": moves, "curves": curves, "check": check,
             "runs": [common.record_summary(r) for r in records],
             "environment": common.environment(), "command": command}
  common.write_json(f"{args.out}/adaptive_adnce.json", summary)
  return summary


if __name__ == "__main__":
  main()
