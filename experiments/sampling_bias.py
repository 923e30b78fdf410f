r"""Claim 2 (the paper's central one): contrastive learning tolerates sampling bias.

Sampling bias = negatives that share the anchor's class (false negatives). We control their
share by building batches by class: with `config.data.classes_per_batch = k` every batch holds
batch/k images of each of k random classes, so a label-blind loss sees a share
(batch/k - 1)/(batch - 1) of same-class negatives (about 1/k); k = 0 is the usual uniform
order (about 1/10 with 10 balanced classes). Why batches by class rather than masking a random
fraction of the same-class negatives through `labels`: masking can only LOWER the share below
the natural 1/10, while the claim is about tolerating MORE bias; the batch sampler raises it up
to 1/2 (k = 2) and the oracle (next) brings it to 0 at every level.

Methods: InfoNCE at several temperatures (the paper: the temperature sets the robust radius,
hence the tolerance), DCL (debiased, tau_plus = the config's, i.e. the natural 1/10 prior, as a
user unaware of the bias would set it), ADNCE, and the ORACLE: InfoNCE with every same-class
candidate removed from the negatives (`config.loss.use_labels=True`), the unbiased target.

  python experiments/sampling_bias.py --out results/sampling_bias --seeds 0 1 \
      --set batch_size=120 --set total_epochs=10 --set eval.every_epochs=5
  python experiments/sampling_bias.py --out /tmp/bias --quick      # seconds; see below

Quick check: the oracle's logged loss at a replayed step equals InfoNCE on the label-masked
negatives (tests/test_experiments.py recomputes it in float64 NumPy from OUT/oracle_replay.npz).
Writes OUT/sampling_bias.md, .json and .png. Images only (the class sampler is an image-data
option), on labelled pre-training data (STL10 pre-trains on its `train` split here).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from experiments import common

ORACLE = "infonce:use_labels=True,label=oracle InfoNCE (no same-class negatives)"
DEFAULT_METHODS = [
    "infonce:temperature=0.1,label=InfoNCE t=0.1",
    "infonce:temperature=0.2,label=InfoNCE t=0.2",
    "infonce:temperature=0.5,label=InfoNCE t=0.5",
    "dcl:label=DCL",
    "adnce:label=ADNCE",
    ORACLE,
]
QUICK_METHODS = [ORACLE]
DEFAULT_LEVELS = [0, 5, 2]
QUICK_LEVELS = [2]


def parse_args(argv):
  parser = common.base_parser(__doc__, default_seeds=(0, 1))
  parser.add_argument("--methods", nargs="+", default=None,
                      help="method specs name[:key=value,...,label=...]")
  parser.add_argument("--classes-per-batch", type=int, nargs="+", default=None,
                      help="bias levels: classes per batch (0 = uniform batches)")
  return parser.parse_args(argv)


def same_class_share(labels: np.ndarray) -> float:
  """Mean over anchors of the share of same-class examples among the other B-1 of the batch
  (the image variant's 2B-2 negatives give the same share: each example has two views)."""
  labels = np.asarray(labels)
  same = (labels[:, None] == labels[None, :]).sum(1) - 1
  return float(np.mean(same / (labels.size - 1)))


def measured_share(config, steps: int = 50) -> float:
  """Same-class share of the negatives in the first `steps` training batches of `config`."""
  from cldro_jax.data import images, pipeline  # pylint: disable=import-outside-toplevel
  dataset = images.load_image_dataset(config.data)
  batches = pipeline.train_batches(
      dataset.pretrain, global_batch_size=config.batch_size, seed=config.seed, start_step=0,
      num_steps=steps, process_index=0, process_count=1, prefetch=0,
      classes_per_batch=config.data.classes_per_batch)
  return float(np.mean([same_class_share(b["label"]) for b in batches]))


def mean_paired(runs: dict, key, reference_key) -> float:
  """Mean over the seeds both scored of score(key) - score(reference_key); NaN when none.

  Paired by seed, like every comparison in experiments/: with all seeds present it is the
  difference of the two cells' means, and a missing score drops its seed from both sides."""
  diffs = common.paired_diffs(*runs[key], *runs[reference_key])
  return float(diffs.mean()) if diffs.size else float("nan")


def changes_and_gaps(runs: dict, labels: Sequence[str], levels: Sequence[int],
                     oracle: str | None) -> tuple[dict, dict]:
  """From `runs` {(label, level): (scores, seeds)}: each method's change from the first bias
  level to the last, and its gap to the oracle at every level (what the false negatives cost)."""
  change = ({lab: mean_paired(runs, (lab, levels[-1]), (lab, levels[0])) for lab in labels}
            if len(levels) > 1 else {})
  gaps = ({lab: {k: mean_paired(runs, (lab, k), (oracle, k)) for k in levels}
           for lab in labels if lab != oracle} if oracle else {})
  return change, gaps


def oracle_replay(records, out: str) -> dict | None:
  """Replays one step of the first oracle run and saves what the NumPy check needs."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from cldro_jax import losses  # pylint: disable=import-outside-toplevel
  oracle = [r for r in records if r.config.loss.use_labels]
  if not oracle:
    return None
  run = oracle[0]
  step = common.replayable_step(run.workdir)
  if step is None:   # needs log_every_steps=1 and a kept checkpoint before the last step
    return None
  replay = common.replay_step(run.workdir, step)
  logged = common.logged_train_record(run.workdir, step + 1)["loss"]
  t = run.config.loss.temperature
  library = float(losses.infonce(jnp.asarray(replay["z1"]), jnp.asarray(replay["z2"]),
                                 temperature=t, variant=replay["variant"],
                                 labels=jnp.asarray(replay["labels"], jnp.int32)))
  np.savez(f"{out}/oracle_replay.npz", z1=replay["z1"], z2=replay["z2"],
           labels=replay["labels"], temperature=t, step=step, logged_loss=logged)
  return {"workdir": run.workdir, "step": step, "logged_loss": logged,
          "library_loss_on_replay": library, "abs_diff": abs(library - logged)}


def labelled_pretraining(config):
  """`config` pre-training on its labelled tfds splits only (STL10: `train`, not `+unlabelled`).

  Batches by class need labels, and unlabelled images have none (the sampler refuses them);
  every level, k = 0 included, then trains on the same images, so the levels stay comparable.
  """
  data = config.data
  splits = (data.get("pretrain_split") or "").split("+")
  unlabelled = set(data.get("unlabeled_splits") or ())
  if data.get("source", "tfds") != "tfds" or not unlabelled.intersection(splits):
    return config
  labelled = "+".join(s for s in splits if s not in unlabelled)
  print(f"sampling_bias: pre-training on {labelled!r} instead of {data.pretrain_split!r} "
        "(batches by class need labels)")
  return common.with_overrides(config, {"data.pretrain_split": labelled})


def main(argv: Sequence[str] | None = None) -> dict:
  args = parse_args(argv)
  common.setup(args)
  base = common.base_config(args)
  if base.domain != "image":
    raise ValueError("sampling_bias.py needs an image config (classes_per_batch is an image-data "
                     f"option); got domain {base.domain!r}.")
  base = labelled_pretraining(base)
  methods = [common.parse_method(m) for m in
             (args.methods or (QUICK_METHODS if args.quick else DEFAULT_METHODS))]
  levels = args.classes_per_batch or (QUICK_LEVELS if args.quick else DEFAULT_LEVELS)
  bad = [k for k in levels if k and base.batch_size % k]
  if bad:
    raise ValueError(f"batch_size={base.batch_size} is not divisible by classes_per_batch {bad}; "
                     "pass e.g. --set batch_size=120 (divisible by 2, 3, 4, 5, 6, 10).")
  shares = {k: measured_share(common.with_overrides(base, {"data.classes_per_batch": k}))
            for k in levels}
  specs = [common.RunSpec(m.label, seed, m.overrides + (("data.classes_per_batch", k),),
                          group=(("classes_per_batch", k),))
           for k in levels for m in methods for seed in args.seeds]
  records = common.run_all(base, specs, args.runs or f"{args.out}/runs", desc="sampling_bias")

  groups = common.group_by(records, "classes_per_batch")
  labels = list(dict.fromkeys(m.label for m in methods))
  scores = {(lab, k): [common.score_of(r.results, "image") for r in groups[(lab, k)]]
            for lab in labels for k in levels}
  seeds = {(lab, k): [r.spec.seed for r in groups[(lab, k)]] for lab in labels for k in levels}
  # What the false negatives cost: each method's score minus the oracle's at the same level
  # (the oracle sees the same batches without them). Tolerance = this gap not growing with bias.
  oracle_labels = [m.label for m in methods if dict(m.overrides).get("loss.use_labels")]
  change, gaps = changes_and_gaps({key: (scores[key], seeds[key]) for key in scores}, labels,
                                  levels, oracle_labels[0] if oracle_labels else None)
  knn = {(lab, k): [r.results.get("final_knn_top1") for r in groups[(lab, k)]]
         for lab in labels for k in levels}

  def level_name(k):
    return f"{'uniform' if k == 0 else f'{k} classes/batch'} ({100 * shares[k]:.0f}% same-class)"

  headers = ["method"] + [level_name(k) for k in levels]
  if len(levels) > 1:
    headers.append(f"change, {level_name(levels[0]).split(' (')[0]} → "
                   f"{level_name(levels[-1]).split(' (')[0]}")
  rows = []
  for lab in labels:
    row = [lab] + [common.fmt(scores[(lab, k)]) for k in levels]
    if len(levels) > 1:
      row.append(f"{change[lab]:+.2f}")
    rows.append(row)
  knn_rows = [[lab] + [common.fmt(knn[(lab, k)]) for k in levels] for lab in labels]
  gap_rows = [[lab] + [f"{gaps[lab][k]:+.2f}" for k in levels] for lab in gaps]

  fig, ax = common.plt.subplots(figsize=(6.5, 4.2))
  xs = np.array([100 * shares[k] for k in levels])
  order = np.argsort(xs)
  for lab in labels:
    stats = [common.mean_std(scores[(lab, k)]) for k in levels]
    mean, std = (np.array([s[i] for s in stats])[order] for i in (0, 1))
    ax.errorbar(xs[order], mean, yerr=std, marker="o", capsize=3, label=lab,
                linestyle="--" if lab.startswith("oracle") else "-")
  ax.set_xlabel("same-class share of each anchor's negatives (%)")
  ax.set_ylabel("linear probe top-1 (%)")
  ax.set_title("Sampling bias: accuracy vs false-negative share (mean ± std)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  figure = f"{args.out}/sampling_bias.png"
  common.save_figure(fig, figure)

  check = oracle_replay(records, args.out)
  command = common.command_line(argv, "sampling_bias.py")
  text = common.header("Tolerance to sampling bias", command, args.seeds,
                       sum(r.wall_s for r in records))
  text += ("\nBias is set by building batches from k classes (`data.classes_per_batch`); the "
           "column headers give the measured share of same-class negatives. The oracle removes "
           "every same-class negative (`loss.use_labels=True`).\n\n")
  text += "## Linear probe top-1 (%)\n\n" + common.markdown_table(headers, rows) + "\n"
  if gap_rows:
    text += ("\n## Gap to the oracle (linear probe points, mean over seeds, paired by seed)\n\n"
             + common.markdown_table(["method"] + [level_name(k) for k in levels], gap_rows)
             + "\n")
  text += ("\n## Final kNN top-1 (%)\n\n"
           + common.markdown_table(["method"] + [level_name(k) for k in levels], knn_rows) + "\n")
  if check:
    text += (f"\nCheck: the oracle's logged loss at step {check['step'] + 1} is "
             f"{check['logged_loss']:.6f}; label-masked InfoNCE recomputed from the replayed "
             f"projections gives {check['library_loss_on_replay']:.6f}.\n")
  text += f"\n![sampling bias]({Path(figure).name})\n"
  common.write_text(f"{args.out}/sampling_bias.md", text)
  summary = {"levels": levels, "shares": {str(k): shares[k] for k in levels},
             "change": change, "gap_to_oracle": gap_rows,
             "scores": {f"{lab}|{k}": v for (lab, k), v in scores.items()},
             "knn": {f"{lab}|{k}": v for (lab, k), v in knn.items()},
             "oracle_check": check, "runs": [common.record_summary(r) for r in records],
             "environment": common.environment(), "command": command}
  common.write_json(f"{args.out}/sampling_bias.json", summary)
  return summary


if __name__ == "__main__":
  main()
