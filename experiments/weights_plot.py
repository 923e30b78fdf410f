r"""Claim 4: what ADNCE does to the negatives, on real trained embeddings.

InfoNCE weighs anchor i's negatives by the worst case of its KL ball, q_ij = softmax_j(s_ij / t):
the most similar negatives (hard ones, and false negatives: same-class images) dominate.
ADNCE multiplies by Gaussian weights w_ij = g(s_ij) / mean_k g(s_ik), g(s) = exp(-(s - mu)^2 /
(2 sigma^2)), so its effective distribution is q_ij ∝ w_ij exp(s_ij / t): mass moves from the
most similar negatives (above mu) towards those near mu. This script takes a trained run (its
own, or `--from-run WORKDIR`), replays a training step (same batch, same augmentation) to get the
projections the loss saw, and plots each negative's relative weight N_i q_ij (1 = uniform)
against its cosine similarity, for InfoNCE and for ADNCE at the paper's (mu, sigma) settings.

  python experiments/weights_plot.py --out results/weights \
      --from-run results/runs/infonce-seed0-XXXXXXXX          # a compare_losses run
  python experiments/weights_plot.py --out /tmp/weights --quick

Quick check: the plotted InfoNCE weights equal softmax(s/t) over each anchor's negatives,
recomputed in NumPy from the dumped projections (OUT/weights.npz; tests/test_experiments.py).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from experiments import common

# (mu, sigma) of the paper's image settings (the authors' scripts): CIFAR10, CIFAR100, STL10.
PAPER_SETTINGS = [(0.7, 0.5), (0.5, 1.0), (0.8, 1.0)]


def parse_args(argv):
  parser = common.base_parser(__doc__, default_seeds=(0,))
  parser.add_argument("--from-run", default=None,
                      help="workdir of a finished run to take the embeddings from")
  parser.add_argument("--loss", default="infonce", help="loss spec to train when no --from-run")
  parser.add_argument("--step", type=int, default=None,
                      help="checkpoint step to replay (default: the latest)")
  parser.add_argument("--adnce", nargs="+", default=None, metavar="MU,SIGMA",
                      help="ADNCE settings to show (default: the paper's image settings)")
  return parser.parse_args(argv)


def relative_weights(sims, mask, t: float, mu: float | None = None,
                     sigma: float | None = None) -> np.ndarray:
  """N_i q_ij over each anchor's negatives (0 elsewhere), in JAX float32 as the loss computes:
  q = softmax(s/t) for InfoNCE; with mu, sigma, q ∝ w exp(s/t), w = g / mean(g) (ADNCE)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  s, m = jnp.asarray(sims, jnp.float32), jnp.asarray(mask)
  logits = s / t
  if mu is not None:
    log_g = -jnp.square(s - mu) / (2.0 * sigma ** 2)
    # log w = log g - log mean g; the normaliser is constant per row, so it cancels in q, but it
    # is kept so that the Gaussian weights themselves can be reported.
    log_g_mean = jax.nn.logsumexp(jnp.where(m, log_g, -jnp.inf), axis=1,
                                  keepdims=True) - jnp.log(m.sum(1, keepdims=True))
    logits = logits + log_g - log_g_mean
  q = jax.nn.softmax(jnp.where(m, logits, -jnp.inf), axis=1)
  return np.asarray(jnp.where(m, q * m.sum(1, keepdims=True), 0.0))


def gaussian_weights(sims, mask, mu: float, sigma: float) -> np.ndarray:
  """w_ij = g(s_ij) / mean_k g(s_ik) over each anchor's negatives (0 elsewhere)."""
  g = np.where(mask, np.exp(-np.square(sims - mu) / (2 * sigma ** 2)), 0.0)
  return np.where(mask, g / (g.sum(1, keepdims=True) / mask.sum(1, keepdims=True)), 0.0)


def weight_stats(rel: np.ndarray, mask: np.ndarray, sims: np.ndarray,
                 same: np.ndarray) -> dict[str, float]:
  """Per-anchor statistics of the distribution q = rel / N, averaged over the anchors that have
  negatives (a padded slot, valid=False, has none: the loss skips it, and so does the mean)."""
  has = mask.any(1)
  rel, mask, sims, same = rel[has], mask[has], sims[has], same[has]
  n = mask.sum(1)
  q = rel / n[:, None]
  ess = q.sum(1) ** 2 / (n * np.square(q).sum(1))
  top = np.zeros_like(mask)
  for i in range(mask.shape[0]):   # each anchor's 5% most similar negatives
    idx = np.flatnonzero(mask[i])
    k = max(1, round(0.05 * idx.size))
    top[i, idx[np.argsort(sims[i, idx])[-k:]]] = True
  return {"ess": float(ess.mean()),
          "mass_same_class": float((q * (same & mask)).sum(1).mean()),
          "share_same_class": float(((same & mask).sum(1) / n).mean()),
          "mass_top5pct": float((q * top).sum(1).mean()),
          "max_relative_weight": float(rel.max())}


def main(argv: Sequence[str] | None = None) -> dict:
  args = parse_args(argv)
  common.setup(args)
  records = []
  if args.from_run:
    workdir = args.from_run
  else:
    base = common.base_config(args)
    method = common.parse_method(args.loss)
    records = common.run_all(base, [common.RunSpec(method.label, args.seeds[0], method.overrides)],
                             args.runs or f"{args.out}/runs", desc="weights_plot")
    workdir = records[0].workdir
  config = common.load_run_config(workdir)
  t = config.loss.temperature
  settings = ([tuple(float(x) for x in s.split(",")) for s in args.adnce] if args.adnce
              else PAPER_SETTINGS)
  replayer = common.Replayer(workdir)
  try:
    step = args.step if args.step is not None else max(replayer.steps())
    p = replayer.projections(step)
  finally:
    replayer.close()
  sims, mask, rows, cols = common.negative_similarities(p["z1"], p["z2"], p["variant"], p["valid"])
  labels = np.asarray(p["labels"])
  same = (labels[rows][:, None] == labels[cols][None, :]) & (labels[rows][:, None] >= 0)

  weights = {"InfoNCE": relative_weights(sims, mask, t)}
  for mu, sigma in settings:
    weights[f"ADNCE mu={mu:g} sigma={sigma:g}"] = relative_weights(sims, mask, t, mu, sigma)
  stats = {name: weight_stats(w, mask, sims, same) for name, w in weights.items()}
  np.savez(f"{args.out}/weights.npz", z1=p["z1"], z2=p["z2"], labels=labels, valid=p["valid"],
           variant=p["variant"], temperature=t, sims=sims, negatives=mask,
           infonce_weights=weights["InfoNCE"],
           **{f"adnce_{i}_weights": weights[f"ADNCE mu={mu:g} sigma={sigma:g}"]
              for i, (mu, sigma) in enumerate(settings)},
           adnce_settings=np.asarray(settings))
  figures = plot(sims, mask, same, weights, settings, t, args.out,
                 f"{config.get('data', {}).get('source', config.domain)}, checkpoint {step}")

  rows_md = [[name, f"{s['ess']:.3f}", f"{100 * s['mass_same_class']:.1f}",
              f"{100 * s['mass_top5pct']:.1f}", f"{s['max_relative_weight']:.1f}"]
             for name, s in stats.items()]
  command = common.command_line(argv, "weights_plot.py")
  text = common.header("What ADNCE does to the negatives", command,
                       [config.seed], sum(r.wall_s for r in records))
  text += (f"\nEmbeddings: {workdir} ({config.loss.name}, t={t:g}), checkpoint {step} on the "
           f"batch and augmentation of step {step + 1}: {int(mask.any(1).sum())} anchors, "
           f"{int(mask.sum(1)[mask.any(1)].mean())} negatives each; "
           f"{100 * stats['InfoNCE']['share_same_class']:.1f}% of the negatives share the "
           "anchor's class. Weights are each anchor's distribution over its negatives (uniform: "
           "ESS 1, same-class mass = same-class share).\n\n")
  text += common.markdown_table(
      ["weighting", "ESS / N", "mass on same-class negatives (%)",
       "mass on the 5% most similar (%)", "max N·q"], rows_md) + "\n\n"
  text += "".join(f"![{Path(f).stem}]({Path(f).name})\n" for f in figures)
  common.write_text(f"{args.out}/weights_plot.md", text)
  summary = {"workdir": workdir, "step": step, "temperature": t, "settings": settings,
             "stats": stats, "environment": common.environment(), "command": command}
  common.write_json(f"{args.out}/weights_plot.json", summary)
  return summary


def _binned(x, y, bins):
  idx = np.digitize(x, bins) - 1
  centers, means = [], []
  for b in range(len(bins) - 1):
    sel = idx == b
    if sel.sum() >= 5:
      centers.append(0.5 * (bins[b] + bins[b + 1]))
      means.append(y[sel].mean())
  return np.array(centers), np.array(means)


def plot(sims, mask, same, weights, settings, t, out, where) -> list[str]:
  plt = common.plt
  s = sims[mask]
  is_same = same[mask]
  rng = np.random.default_rng(0)
  shown = rng.permutation(s.size)[:6000]   # a readable scatter
  bins = np.linspace(s.min(), s.max(), 25)
  names = list(weights)
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
  for ax, name in zip(axes, [names[0], names[1]]):
    w = weights[name][mask]
    for sel, colour, lab in ((~is_same, "tab:blue", "other-class negative"),
                             (is_same, "tab:orange", "same-class negative")):
      pick = shown[sel[shown]]
      ax.scatter(s[pick], w[pick], s=3, alpha=0.3, color=colour, label=lab)
    centers, means = _binned(s, w, bins)
    ax.plot(centers, means, color="black", lw=1.5, label="binned mean")
    ax.axhline(1.0, color="gray", lw=0.8, ls=":")
    ax.set_yscale("log")
    ax.set_xlabel("cosine similarity to the anchor")
    ax.set_title(f"{name} (t={t:g})")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("relative weight N·q (1 = uniform)")
  axes[0].legend(fontsize=8, markerscale=3)
  fig.suptitle(f"Weight of each negative vs its similarity ({where})")
  path1 = f"{out}/weights_plot_vs_similarity.png"
  common.save_figure(fig, path1)

  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  for name in names:
    centers, means = _binned(s, weights[name][mask], bins)
    ax.plot(centers, means, marker="o", markersize=3, label=name)
  ax.axhline(1.0, color="gray", lw=0.8, ls=":")
  ax.set_yscale("log")
  ax.set_xlabel("cosine similarity to the anchor")
  ax.set_ylabel("mean relative weight N·q (1 = uniform)")
  ax.set_title("Effective weight of the negatives: InfoNCE vs ADNCE")
  twin = ax.twinx()
  twin.hist(s, bins=bins, color="gray", alpha=0.2)
  twin.set_ylabel("number of negatives (histogram)")
  ax.set_zorder(twin.get_zorder() + 1)
  ax.patch.set_visible(False)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  path2 = f"{out}/weights_plot_binned.png"
  common.save_figure(fig, path2)

  fig, ax = plt.subplots(figsize=(6, 4))
  grid = np.linspace(-1, 1, 201)
  for mu, sigma in settings:
    g = gaussian_weights(sims, mask, mu, sigma)
    ax.plot(grid, np.exp(-np.square(grid - mu) / (2 * sigma ** 2)) / np.mean(
        np.exp(-np.square(s - mu) / (2 * sigma ** 2))), label=f"mu={mu:g}, sigma={sigma:g} "
        f"(per-anchor w here: {g[mask].min():.2f}–{g[mask].max():.2f})")
  ax.axvspan(s.min(), s.max(), color="gray", alpha=0.1, label="range of the negatives")
  ax.set_xlabel("cosine similarity")
  ax.set_ylabel("Gaussian weight g(s) / mean g over all negatives")
  ax.set_title("ADNCE's Gaussian weights (before exp(s/t))")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  path3 = f"{out}/weights_plot_gaussian.png"
  common.save_figure(fig, path3)
  return [path1, path2, path3]


if __name__ == "__main__":
  main()
