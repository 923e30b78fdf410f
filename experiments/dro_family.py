r"""The CL-DRO family as training objectives: is contrastive learning its mean-variance form?

Section 3 of the paper reads InfoNCE as KL-ball DRO over the negatives, and Theorem 3.5
approximates it by a mean-variance objective, ``-f+ + mean(f_neg) + Var(f_neg) / (2t)``: CL is
the "basic" objective ``-f+ + mean(f_neg)`` plus a variance penalty set by the temperature. The
paper argues from the formulas; this trains them, every objective with the same seeds, encoder,
data and temperature:

- InfoNCE (the reference) and KL-DRO (``t * InfoNCE`` without the positive in the normaliser),
- mean-variance (Theorem 3.5's approximation, same t),
- chi-square DRO ``-f+ + mean + sqrt(eta Var)`` (another divergence ball; `--etas`),
- basic: chi-square DRO at eta=0, no variance term at all.

`--temperatures` also trains InfoNCE and mean-variance at other t (does the approximation track
InfoNCE across the radius?); `--after-infonce` trains the given losses once more, each seed
starting from that seed's final InfoNCE encoder (`config.init_from`; fresh optimizer, as many
epochs again), to tell what a loss does to a trained representation from what it does to a
random one.

It reports the final score (image: linear probe top-1; graph: SVM accuracy; sentence: STS) and
the monitors paired by seed against InfoNCE, and, as figures against epochs, the statistics the
theory speaks of: the negatives' cosine variance (what the penalty acts on), their mean, and the
positives' cosine (alignment).

Choosing eta: the chi-square penalty's gradient in Var, sqrt(eta) / (2 sqrt(Var)), equals the
mean-variance one, 1 / (2t), where eta = Var / t^2 = 2 eta_hat (the KL radius InfoNCE implies,
logged as `eta_hat`; the chi-square divergence is twice KL to second order). InfoNCE's runs end
near eta_hat = 1.5 on the quick-start setting (t=0.2) and 1.9 on MUTAG (t=0.15), hence eta=3;
eta=0.75 is a 4x smaller ball.

  # docs/results.md, claim 7 (images: about 45 min on 2 CPU cores for the family, 35 more for
  # the temperatures, 30 for the continuations; reuses the InfoNCE runs of claim 6 via --runs)
  python experiments/dro_family.py --out results/dro_family --seeds 0 1 2 3 4 \
      --set total_epochs=20 --set eval.every_epochs=2 --set log_every_steps=1 \
      --runs results/runs --temperatures 0.1 0.2 0.5 \
      --after-infonce "infonce:label=InfoNCE" "chi2_dro:eta=3.0,label=chi2-DRO eta=3" \
      "chi2_dro:eta=0.0,label=basic (chi2-DRO eta=0)"
  # graphs (about 11 min)
  python experiments/dro_family.py --out results/dro_family_mutag --config configs/tu_mutag.py \
      --seeds 0 1 2 3 4 5 6 7 8 9 --set eval.every_epochs=2 --runs results/runs
  python experiments/dro_family.py --out /tmp/dro --quick

Quick check (tests/test_experiments.py): mean-variance at t = 1e9 has no variance term left, so
it must train seed for seed like basic (chi-square at eta=0), a different code path; every run
must carry its own loss and eta.
Writes OUT/dro_family.md, OUT/dro_family.json and OUT/dro_family_*.png.
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

REFERENCE = "InfoNCE"
BASIC = "basic (chi2-DRO eta=0)"
DEFAULT_ETAS = [0.75, 3.0]
# --temperatures trains these two at each t (loss name, label).
TEMPERATURE_PAIR = (("infonce", REFERENCE), ("mean_variance", "mean-variance"))
QUICK_HUGE_T = 1e9
# Training statistics logged every step (losses.diagnostics), as the theory names them.
DIAGNOSTICS = [("s_neg_var", "Var(f_neg): negatives' cosine variance"),
               ("s_neg_mean", "mean(f_neg): negatives' mean cosine"),
               ("s_pos_mean", "f+: positives' mean cosine")]


def parse_args(argv):
  parser = common.base_parser(__doc__)
  parser.add_argument("--etas", type=float, nargs="+", default=DEFAULT_ETAS,
                      help=f"chi-square ball radii besides 0 (default {DEFAULT_ETAS})")
  parser.add_argument("--temperatures", type=float, nargs="+", default=None,
                      help="also train InfoNCE and mean-variance at each of these t: does the "
                           "approximation track InfoNCE across the radius?")
  parser.add_argument("--after-infonce", nargs="+", default=None, metavar="SPEC",
                      help="loss specs (as compare_losses' --losses, e.g. 'chi2_dro:eta=3.0') "
                           "also trained from each seed's final InfoNCE encoder")
  return parser.parse_args(argv)


def family_methods(etas: Sequence[float], quick: bool, pin: str = "") -> list[common.Method]:
  if quick:   # the same objective by two code paths (`pin`: settings both runs must share)
    return [common.parse_method(f"chi2_dro:eta=0.0{pin},label={BASIC}"),
            common.parse_method(f"mean_variance:temperature={QUICK_HUGE_T!r}{pin},"
                                f"label=mean-variance t={QUICK_HUGE_T:g}")]
  methods = [common.parse_method(f"infonce:label={REFERENCE}"),
             common.parse_method("kl_dro:label=KL-DRO"),
             common.parse_method("mean_variance:label=mean-variance")]
  methods += [common.parse_method(f"chi2_dro:eta={eta!r},label=chi2-DRO eta={eta:g}")
              for eta in etas if eta > 0]
  methods.append(common.parse_method(f"chi2_dro:eta=0.0,label={BASIC}"))
  return methods


def diagnostic_curves(records, labels) -> dict:
  """Per method and statistic: (epochs, values (seeds, points)) of the logged training values."""
  by_label = common.group_by(records)
  return {label: {key: common.stack_curves(by_label[(label,)], "train", key)
                  for key, _ in DIAGNOSTICS} for label in labels}


def effective_rank(features: np.ndarray, eps: float = 1e-7) -> float:
  """RankMe (Garrido et al., 2023): exp of the entropy of the normalised singular values.

  Between 1 (every embedding on one line) and min(N, F) (a flat spectrum): how many directions
  the representation uses, the collapse that a missing variance term would allow.
  """
  singular = np.linalg.svd(np.asarray(features, np.float64), compute_uv=False)
  p = singular / singular.sum() + eps
  return float(np.exp(-np.sum(p * np.log(p))))


def representation_ranks(records) -> dict | None:
  """Effective rank of each image run's final encoder features on the test split, by label
  (and "feature_dim")."""
  if not records or records[0].config.domain != "image":
    return None   # load_encoder embeds images only
  import cldro_jax  # pylint: disable=import-outside-toplevel
  from cldro_jax.data import images  # pylint: disable=import-outside-toplevel
  test = images.materialize(images.load_image_dataset(records[0].config.data).test)
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  ranks: dict[str, list[float]] = {}
  for r in tqdm(records, desc="effective rank", unit="run", file=sys.stderr):
    encoder = cldro_jax.load_encoder(r.workdir)
    features = encoder.embed(test.images, image_size=r.config.eval.probe_image_size or None)
    ranks.setdefault(r.spec.label, []).append(effective_rank(features))
  ranks["feature_dim"] = int(features.shape[1])
  return ranks


def final_diagnostics_table(curves: dict, last_fraction: float = 0.1) -> str:
  """Each statistic averaged over the last 10% of training steps, mean +- std over seeds."""
  body = []
  for label, stats in curves.items():
    line = [label]
    for key, _ in DIAGNOSTICS:
      _, values = stats[key]
      if values.size == 0:
        line.append("n/a")
        continue
      tail = max(1, int(round(values.shape[1] * last_fraction)))
      line.append(common.fmt(values[:, -tail:].mean(axis=1), 3))
    body.append(line)
  return common.markdown_table(["objective"] + [name for _, name in DIAGNOSTICS], body)


def plot_diagnostics(curves: dict, path: str, title: str) -> str:
  fig, axes = common.plt.subplots(1, len(DIAGNOSTICS), figsize=(5.5 * len(DIAGNOSTICS), 4),
                                  squeeze=False)
  for ax, (key, name) in zip(axes[0], DIAGNOSTICS):
    for label, stats in curves.items():
      epochs, values = stats[key]
      if values.size:   # one point per logged step: no markers
        common.plot_mean_std(ax, epochs, values, label, marker=None, linewidth=1.2)
    ax.set_xlabel("epoch")
    ax.set_title(name, fontsize=10)
    ax.grid(alpha=0.3)
  axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))   # beside, not over
  fig.suptitle(f"{title}: training statistics, mean ± std over seeds", fontsize=11)
  common.save_figure(fig, path)
  return path


def main(argv: Sequence[str] | None = None) -> dict:
  args = parse_args(argv)
  common.setup(args)
  base = common.base_config(args)
  domain = base.domain
  pin = ""
  if "knn_temperature" in base.eval:   # image kNN monitor: 0 means the loss temperature
    pin = f",eval.knn_temperature={float(base.eval.knn_temperature or base.loss.temperature)!r}"
  methods = family_methods(args.etas, args.quick, pin)
  specs = [common.RunSpec(m.label, seed, m.overrides) for m in methods for seed in args.seeds]
  runs_dir = args.runs or f"{args.out}/runs"
  records = common.run_all(base, specs, runs_dir, desc="dro_family")
  dataset = records[0].results.get("dataset", domain)
  title = f"CL-DRO objectives on {dataset}"
  text, figures, summary = report(records, domain, args.out, title, "dro_family")

  by_t = []
  if args.temperatures:
    t_specs = [common.RunSpec(f"{label} t={t:g}", seed, (("loss.name", name),
                                                         ("loss.temperature", t)),
                              group=(("temperature", t),))
               for t in args.temperatures for name, label in TEMPERATURE_PAIR
               for seed in args.seeds]
    by_t = common.run_all(base, t_specs, runs_dir, desc="dro_family, temperatures")
    more_text, figure, summary["temperatures"] = temperature_report(by_t, domain, args.out,
                                                                    title)
    text += more_text
    figures.append(figure)

  after = []
  if args.after_infonce:
    # Each seed's run continues from the encoder InfoNCE trained with that seed.
    sources = {r.spec.seed: r.workdir for r in records if r.spec.label == REFERENCE}
    if not sources:
      raise ValueError("--after-infonce needs the InfoNCE runs; it has no quick mode.")
    warm = [common.parse_method(spec) for spec in args.after_infonce]
    warm_specs = [common.RunSpec(f"{m.label} after InfoNCE", seed,
                                 m.overrides + (("init_from", sources[seed]),))
                  for m in warm for seed in args.seeds]
    after = common.run_all(base, warm_specs, runs_dir, desc="dro_family, after InfoNCE")
    more_text, more_figures, more = report(after, domain, args.out,
                                           f"{title}, started from InfoNCE's encoder",
                                           "dro_family_after_infonce")
    text += ("\n# Started from InfoNCE's trained encoder\n\nEach run starts from the final "
             "encoder of the InfoNCE run with its seed (fresh optimizer), and trains as long "
             "again.\n" + more_text)
    figures += more_figures
    summary["after_infonce"] = more

  command = common.command_line(argv, "dro_family.py")
  header = common.header(title, command, args.seeds,
                         sum(r.wall_s for r in records + by_t + after))
  text = header + text + "\n" + "".join(f"![{Path(p).stem}]({Path(p).name})\n" for p in figures)
  common.write_text(f"{args.out}/dro_family.md", text)
  summary.update({"domain": domain, "dataset": dataset, "environment": common.environment(),
                  "command": command})
  common.write_json(f"{args.out}/dro_family.json", summary)
  return summary


def temperature_report(records, domain: str, out: str, title: str) -> tuple[str, str, dict]:
  """InfoNCE against mean-variance at each temperature: table, paired differences, figure."""
  score_name = common.SCORE_KEYS.get(domain, ("", "score"))[1]
  keys = [("score", score_name)] + [(f"final_{k}", f"final {n}")
                                    for k, n in compare_losses.CURVE_KEYS.get(domain, [])[:1]]
  temperatures = sorted({dict(r.spec.group)["temperature"] for r in records})
  rows_by_t = {}
  for t in temperatures:
    rows, _ = compare_losses.summarise(
        [r for r in records if dict(r.spec.group)["temperature"] == t], domain)
    rows_by_t[t] = rows
  body = []
  for t, rows in rows_by_t.items():
    for key, name in keys:
      if key != "score" and all(r.get(key) == r["score"] for r in rows):
        continue
      d = common.paired_difference(rows[1][key], rows[1]["seeds"], rows[0][key], rows[0]["seeds"])
      body.append([f"{t:g}", name, common.fmt(rows[0][key]), common.fmt(rows[1][key]),
                   "n/a" if d is None else f"{d['mean']:+.2f} [{d['ci_low']:+.2f}, "
                                           f"{d['ci_high']:+.2f}], p={d['p']:.3f}"])
  text = ("\n# InfoNCE and its mean-variance form across temperatures\n\n"
          + common.markdown_table(["t", "score", "InfoNCE", "mean-variance",
                                   "mean-variance minus InfoNCE, paired (95% CI)"], body) + "\n")
  shown = [(k, n) for k, n in keys if any(rows[0].get(k) for rows in rows_by_t.values())]
  fig, axes = common.plt.subplots(1, len(shown), figsize=(5.5 * len(shown), 4), squeeze=False)
  for ax, (key, name) in zip(axes[0], shown):
    for i, (_, label) in enumerate(TEMPERATURE_PAIR):
      common.errorbar_over_seeds(ax, np.asarray(temperatures) * (1 + 0.03 * (i - 0.5)),
                                 [rows_by_t[t][i].get(key, []) for t in temperatures],
                                 label)   # side by side: the bars do not hide each other
    ax.set_xscale("log")
    ax.set_xticks(temperatures, [f"{t:g}" for t in temperatures])
    ax.minorticks_off()   # only the trained temperatures are labelled
    ax.set_xlabel("temperature t")
    ax.set_ylabel(name)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(f"{title}: InfoNCE and mean-variance against t, mean ± std over seeds",
               fontsize=11)
  path = f"{out}/dro_family_temperatures.png"
  common.save_figure(fig, path)
  return text, path, {f"{t:g}": rows for t, rows in rows_by_t.items()}


def report(records, domain: str, out: str, title: str, prefix: str) -> tuple[str, list, dict]:
  """Markdown (scores, paired differences against the first method, training statistics,
  effective ranks, curves), the figures' paths and the numbers, for one set of runs."""
  rows, curves = compare_losses.summarise(records, domain)
  reference = rows[0]["label"]
  figures = compare_losses.plot(curves, domain, out, title, prefix=prefix)
  stats = diagnostic_curves(records, [r["label"] for r in rows])
  figures.append(plot_diagnostics(stats, f"{out}/{prefix}_diagnostics.png", title))
  text = "\n" + compare_losses.table(rows, domain) + "\n"
  score_name = common.SCORE_KEYS.get(domain, ("", "score"))[1]
  for key, name in [("score", score_name)] + [
      (f"final_{k}", f"final {n}") for k, n in compare_losses.CURVE_KEYS.get(domain, [])]:
    if key != "score" and all(r.get(key) == r["score"] for r in rows):
      continue   # the monitor's last value is the score (graphs: the SVM at the last epoch)
    paired = common.paired_table(rows, reference, name, key=key)
    if paired:
      text += f"\nPaired by seed, against {reference}:\n\n{paired}\n"
  text += ("\n## Training statistics (last 10% of the steps)\n\n"
           + final_diagnostics_table(stats) + "\n")
  ranks = representation_ranks(records)
  if ranks:
    text += ("\n## Effective rank of the final representation (RankMe, test split)\n\n"
             + common.markdown_table(
                 ["objective", f"effective rank (of {ranks['feature_dim']} dims)"],
                 [[label, common.fmt(v, 1)] for label, v in ranks.items()
                  if label != "feature_dim"]) + "\n")
  for key, name in compare_losses.CURVE_KEYS.get(domain, []):
    section = compare_losses.curve_table(curves, key)
    if section:
      text += f"\n## {name} against epochs\n\n{section}\n"
  summary = {"methods": rows,
             "diagnostics": {label: {key: {"epochs": e, "values": v}
                                     for key, (e, v) in by_key.items()}
                             for label, by_key in stats.items()},
             "effective_rank": ranks, "runs": [common.record_summary(r) for r in records]}
  return text, figures, summary


if __name__ == "__main__":
  main()
