"""What every experiment script shares: configs and overrides, the runs loop, replaying a training
step, mean +- std over seeds, markdown tables and plots.

A script builds a list of `RunSpec`s (a label, a seed, config overrides), hands them to
`run_all`, which trains each through `cldro_jax.train.train_and_evaluate` in its own workdir
(skipping runs whose `results.json` was written with the same config, resuming interrupted ones),
and then turns the `RunRecord`s into a table, figures and a JSON of the raw numbers.

Workdirs are named by the loss, the seed and a hash of the full config, so two scripts that
share `--runs DIR` reuse each other's identical runs (e.g. the fixed-ADNCE runs of
compare_losses.py serve adaptive_adnce.py).
"""

from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import datetime
import difflib
import functools
import hashlib
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
# `python experiments/x.py` puts experiments/ on the path, not the root that holds configs/.
if str(REPO_ROOT) not in sys.path:
  sys.path.insert(0, str(REPO_ROOT))

import matplotlib

matplotlib.use("Agg")  # files only, no display (CI, servers)
import matplotlib.pyplot as plt
import ml_collections
import numpy as np

# ------------------------------------------------------------------------------------ configs

# Tiny sizes for `--quick`: the scripts' own code path in seconds, on a reduced model path (one
# BatchNorm pass over both views, no colour ops, the cached-features probe; the per-view
# BatchNorm, the colour ops and the augmented probe are the trainer's tests'). Identical across the
# scripts on purpose, so that their quick runs compile the same programs (XLA's persistent cache
# then serves the repeats). Image: 80 shipped Fashion-MNIST images, batch 16 -> 5 steps per
# epoch, 10 steps = 2 epochs (two monitor points), checkpoints at steps 5 and 10 (replayable).
QUICK_OVERRIDES = {
    "image": {
        "data.source": "fashion_mnist_subset", "data.train_per_class": 8,
        "data.test_per_class": 4, "batch_size": 16, "total_steps": 10, "log_every_steps": 1,
        "checkpoint_every_steps": 5, "keep_checkpoints": 5, "model.name": "resnet18",
        "model.width": 4, "model.head_hidden": 16, "model.head_out": 8,
        # One forward pass for both views and no colour ops: half the compile time of the step.
        "model.bn_over_views": True, "augment.jitter_prob": 0.0, "augment.blur_prob": 0.0,
        "augment.grayscale_prob": 0.0, "eval.every_epochs": 1, "eval.knn_k": 5,
        "eval.batch_size": 40, "eval.linear_probe": "features", "eval.linear_probe_epochs": 2,
        "eval.linear_probe_batch_size": 32, "eval.untrained_baseline": False,
        "mesh.num_devices": 1, "progress_bar": False,
    },
    "graph": {
        "batch_size": 32, "total_steps": 12, "log_every_steps": 1, "checkpoint_every_steps": 6,
        "keep_checkpoints": 5, "eval.every_epochs": 1, "eval.svm_seeds": 1,
        "eval.untrained_baseline": False, "mesh.num_devices": 1, "progress_bar": False,
    },
    "sentence": {
        "total_steps": 4, "log_every_steps": 1, "checkpoint_every_steps": 2,
        "mesh.num_devices": 1, "progress_bar": False,
    },
}

# The score each domain's results.json reports, and its name in tables.
SCORE_KEYS = {"image": ("linear_probe_top1", "linear probe top-1 (%)"),
              "graph": ("svm_accuracy", "SVM 10-fold accuracy (%)"),
              "sentence": ("sts_avg", "STS avg Spearman x100")}


def load_config(spec: str) -> ml_collections.ConfigDict:
  """`path/to/config.py[:arg]` -> the file's `get_config(arg)` (big_vision / config_flags style)."""
  path, _, arg = spec.partition(":")
  file = Path(path)
  if not file.is_file() and not file.is_absolute() and (REPO_ROOT / file).is_file():
    file = REPO_ROOT / file
  if not file.is_file():
    raise FileNotFoundError(f"config file {path!r} not found; pass e.g. "
                            "--config configs/quickstart.py (paths relative to the repository "
                            "root also work).")
  module_spec = importlib.util.spec_from_file_location(f"_experiment_config_{file.stem}", file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"{file} has no get_config(arg) function: not a cldro_jax config file.")
  return module.get_config(arg or None)


def parse_value(text: str) -> Any:
  """A command-line value: Python literal when it parses (1e6, True, (0.1, 2.0)), else a string."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _cast_like(value: Any, current: Any, key: str) -> Any:
  if current is None or isinstance(value, type(current)):
    return value
  if isinstance(current, bool):
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
      return value.lower() in ("true", "1", "yes")
    raise ValueError(f"{key} expects a bool, got {value!r}")
  if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if isinstance(current, tuple) and isinstance(value, list):
    return tuple(value)
  if isinstance(current, str):
    return str(value)
  raise ValueError(f"{key} expects a {type(current).__name__} (now {current!r}), got {value!r}")


def set_path(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
  """`config.<key> = value` for a dotted key that must already exist (typos fail loudly)."""
  node = config
  *parents, leaf = key.split(".")
  for i, part in enumerate(parents):
    if part not in node:
      raise ValueError(_unknown(".".join(parents[:i + 1]), node, part))
    node = node[part]
  if leaf not in node:
    raise ValueError(_unknown(key, node, leaf))
  node[leaf] = _cast_like(value, node[leaf], key)


def _unknown(key: str, node: Any, part: str) -> str:
  close = difflib.get_close_matches(part, list(node.keys()), n=1)
  hint = f" (did you mean {close[0]!r}?)" if close else ""
  return f"unknown config key {key!r}{hint}"


def with_overrides(config: ml_collections.ConfigDict,
                   overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A copy of `config` with dotted-key overrides applied (the original is untouched)."""
  config = copy.deepcopy(config)
  for key, value in overrides.items():
    set_path(config, key, value)
  return config


def parse_assignments(items: Iterable[str]) -> dict[str, Any]:
  """`["loss.mu=0.5", "batch_size=120"]` -> {"loss.mu": 0.5, "batch_size": 120}."""
  out = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise ValueError(f"expected KEY=VALUE, got {item!r} (e.g. --set loss.temperature=0.2)")
    out[key.strip()] = parse_value(value.strip())
  return out


@dataclasses.dataclass(frozen=True)
class Method:
  """A named set of overrides: `name[:key=value,...]`; bare keys mean config.loss.<key>.

  `adnce:sigma=1e6` -> loss.name=adnce, loss.sigma=1e6; `infonce:use_labels=True,label=oracle`;
  dotted keys address the whole config (`adnce:data.classes_per_batch=2`).
  """
  label: str
  overrides: tuple[tuple[str, Any], ...]

  @property
  def loss_name(self) -> str:
    return dict(self.overrides)["loss.name"]


def parse_method(spec: str) -> Method:
  name, _, rest = spec.partition(":")
  name = name.strip()
  overrides = {"loss.name": name}
  label = None
  for key, value in parse_assignments(filter(None, rest.split(","))).items():
    if key == "label":
      label = str(value)
    else:
      overrides[key if "." in key else f"loss.{key}"] = value
  if label is None:
    extra = [f"{k.removeprefix('loss.')}={v:g}" if isinstance(v, float) else
             f"{k.removeprefix('loss.')}={v}" for k, v in overrides.items() if k != "loss.name"]
    label = name + (f" ({', '.join(extra)})" if extra else "")
  return Method(label=label, overrides=tuple(overrides.items()))


# --------------------------------------------------------------------------------- arguments


def base_parser(description: str, *, default_config: str = "configs/quickstart.py",
                default_seeds: Sequence[int] = (0, 1, 2)) -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=description,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True, help="output folder (table, figures, JSON)")
  parser.add_argument("--quick", action="store_true",
                      help="tiny runs (about a minute on 2 CPU cores) that check a known "
                           "answer; used by the tests")
  parser.add_argument("--seeds", type=int, nargs="+", default=list(default_seeds))
  parser.add_argument("--config", default=default_config,
                      help="config file[:arg], e.g. configs/tu_mutag.py or configs/cifar10.py")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override for every run, e.g. --set total_epochs=20 (repeat)")
  parser.add_argument("--runs", default=None,
                      help="folder of the per-run workdirs (default OUT/runs); share it between "
                           "scripts to reuse identical runs")
  parser.add_argument("--jit-cache", default=None,
                      help="XLA persistent compilation cache folder (faster reruns)")
  parser.add_argument("--verbose", action="store_true", help="per-run progress bars and logs")
  return parser


def setup(args: argparse.Namespace) -> None:
  """The output folder, the logging level and the optional persistent compilation cache."""
  from absl import logging  # pylint: disable=import-outside-toplevel
  os.makedirs(args.out, exist_ok=True)
  logging.set_verbosity(logging.INFO if args.verbose else logging.WARNING)
  if args.jit_cache:
    import jax  # pylint: disable=import-outside-toplevel
    from jax.experimental.compilation_cache import compilation_cache
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(args.jit_cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    compilation_cache.reset_cache()  # pick the folder up even if something compiled already


def base_config(args: argparse.Namespace) -> ml_collections.ConfigDict:
  """--config, then the quick sizes (--quick), then --set."""
  config = load_config(args.config)
  if args.quick:
    config = with_overrides(config, QUICK_OVERRIDES.get(config.domain, {}))
  config = with_overrides(config, parse_assignments(args.set))
  if args.verbose:
    config.progress_bar = True
  return config


def command_line(argv: Sequence[str] | None, script: str) -> str:
  argv = sys.argv[1:] if argv is None else list(argv)
  return " ".join(["python", f"experiments/{script}", *argv])


# -------------------------------------------------------------------------------------- runs


@dataclasses.dataclass(frozen=True)
class RunSpec:
  label: str                          # the method's name in tables and legends
  seed: int
  overrides: tuple[tuple[str, Any], ...]
  group: tuple[tuple[str, Any], ...] = ()   # extra coordinates, e.g. (("classes_per_batch", 2),)


@dataclasses.dataclass
class RunRecord:
  spec: RunSpec
  workdir: str
  results: dict
  wall_s: float
  config: ml_collections.ConfigDict

  def monitor(self, key: str) -> tuple[np.ndarray, np.ndarray]:
    return curve(self.workdir, "monitor", key)

  def train(self, key: str) -> tuple[np.ndarray, np.ndarray]:
    return curve(self.workdir, "train", key)


# Bookkeeping that does not change what a run computes: how often it logs and saves, how many
# checkpoints it keeps, the progress bar, the device count, how the data are read. Runs that
# differ only here share a workdir (e.g. a script that needs every checkpoint kept reuses a run
# of another script and keeps the ones it writes from then on). Where the data live IS hashed:
# for folder and .npz sources the path is what names the dataset, and a reused run's results
# are returned without the trainer (and its data check) ever seeing the new path.
NOT_HASHED = ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints", "progress_bar",
              "mesh", "trace", "profile_steps", "data.read_threads", "data.in_memory", "data.in_memory_max_mb")
CODE_VERSION_FILE = "experiment_code_version.json"


@functools.cache
def _schema_defaults(domain: str) -> str:
  from cldro_jax import checkpointing, config_defaults
  return json.dumps(checkpointing.flatten_fields(
      checkpointing.config_to_dict(config_defaults.base_config(domain))))


def _hashed_fields(config_dict: Mapping[str, Any]) -> dict[str, Any]:
  """The fields that define a run: not bookkeeping, and not at the schema's default value.

  Leaving defaults out keeps a run's identity when the schema grows: a run saved before a field
  existed ran with that field's (then implicit) default, so it matches a new config at default.
  """
  defaults = json.loads(_schema_defaults(config_dict.get("domain", "image")))
  missing = object()
  from cldro_jax import checkpointing  # pylint: disable=import-outside-toplevel
  return {k: v for k, v in checkpointing.flatten_fields(config_dict).items()
          if not any(k == f or k.startswith(f + ".") for f in NOT_HASHED)
          and defaults.get(k, missing) != v}


def config_hash(config: ml_collections.ConfigDict) -> str:
  """Hash of everything that defines the run's numbers (all but the NOT_HASHED bookkeeping)."""
  from cldro_jax import checkpointing  # pylint: disable=import-outside-toplevel
  flat = _hashed_fields(checkpointing.config_to_dict(config))
  return hashlib.sha1(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:8]


def run_config(base: ml_collections.ConfigDict, spec: RunSpec) -> ml_collections.ConfigDict:
  config = with_overrides(base, dict(spec.overrides))
  config.seed = spec.seed
  from cldro_jax import config_defaults  # pylint: disable=import-outside-toplevel
  config_defaults.validate_config(config)
  return config


def _finished(workdir: str, config: ml_collections.ConfigDict) -> dict | None:
  """The saved results when this run (same config up to bookkeeping) finished in `workdir`."""
  from cldro_jax import checkpointing  # pylint: disable=import-outside-toplevel
  results_path, config_path = (os.path.join(workdir, n) for n in ("results.json", "config.json"))
  if not (os.path.exists(results_path) and os.path.exists(config_path)):
    return None
  with open(config_path, encoding="utf-8") as f:
    saved = json.load(f)
  if _hashed_fields(saved) != _hashed_fields(checkpointing.config_to_dict(config)):
    return None   # not this run: the trainer resumes it or refuses the mismatch
  with open(results_path, encoding="utf-8") as f:
    return json.load(f)


WALL_TIME_FILE = "experiment_wall_time.json"


@functools.cache
def code_version() -> str | None:
  """The git commit of this checkout (with "+changes" when the work tree differs), or None."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, check=True,
                            capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                           check=True, capture_output=True, text=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None
  return commit + ("+changes" if dirty else "")


def run_one(config: ml_collections.ConfigDict, workdir: str) -> tuple[dict, float]:
  """(results, wall seconds): trains unless this config already finished in `workdir`.

  A reused run made by other code (its commit is recorded when it trains) is reused all the
  same, since the config is what defines it, but with a warning: the numbers may have moved."""
  from cldro_jax import train  # pylint: disable=import-outside-toplevel
  wall_path = os.path.join(workdir, WALL_TIME_FILE)
  version_path = os.path.join(workdir, CODE_VERSION_FILE)
  results = _finished(workdir, config)
  spent = 0.0
  if os.path.exists(wall_path):
    with open(wall_path, encoding="utf-8") as f:
      spent = float(json.load(f)["wall_s"])
  if results is not None:
    made_by = None
    if os.path.exists(version_path):
      with open(version_path, encoding="utf-8") as f:
        made_by = json.load(f).get("code_version")
    if made_by != code_version():
      print(f"note: reusing {workdir}, trained by code version {made_by or 'unknown'} (now "
            f"{code_version() or 'unknown'}); delete that folder to train it again.",
            file=sys.stderr, flush=True)
    return results, spent
  start = time.time()
  results = train.train_and_evaluate(config, workdir)
  spent += time.time() - start
  with open(wall_path, "w", encoding="utf-8") as f:
    json.dump({"wall_s": spent}, f)
  with open(version_path, "w", encoding="utf-8") as f:
    json.dump({"code_version": code_version()}, f)
  return results, spent


def run_all(base: ml_collections.ConfigDict, specs: Sequence[RunSpec], runs_dir: str, *,
            desc: str) -> list[RunRecord]:
  """Trains (or reloads) every run in order, with a progress bar over the runs."""
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  configs = [run_config(base, spec) for spec in specs]   # every config checked before any run
  records = []
  bar = tqdm(list(zip(specs, configs)), desc=desc, unit="run", file=sys.stderr)
  for spec, config in bar:
    bar.set_postfix_str(f"{spec.label} seed {spec.seed}")
    # Named by what defines the run (loss, seed, config hash), not by the script's label, so
    # that scripts sharing --runs reuse each other's identical runs.
    workdir = os.path.join(runs_dir, f"{config.loss.name}-seed{spec.seed}-{config_hash(config)}")
    results, wall = run_one(config, workdir)
    records.append(RunRecord(spec, workdir, results, wall, config))
  bar.close()
  return records


def curve(workdir: str, split: str, key: str) -> tuple[np.ndarray, np.ndarray]:
  """(epochs, values) of `key` in one split of metrics.jsonl; a step logged twice (a resumed or
  re-evaluated run) keeps its last record."""
  from cldro_jax import metrics  # pylint: disable=import-outside-toplevel
  by_step = {}
  for record in metrics.read_metrics(workdir, split):
    if key in record and isinstance(record[key], (int, float)):
      by_step[record["step"]] = (record.get("epoch", float("nan")), float(record[key]))
  steps = sorted(by_step)
  return (np.array([by_step[s][0] for s in steps], float),
          np.array([by_step[s][1] for s in steps], float))


def stack_curves(records: Sequence[RunRecord], split: str,
                 key: str) -> tuple[np.ndarray, np.ndarray]:
  """(epochs, values (runs, points)) on the epochs every run logged."""
  curves = [curve(r.workdir, split, key) for r in records]
  if not curves or any(len(x) == 0 for x, _ in curves):
    return np.zeros(0), np.zeros((len(curves), 0))
  common = functools.reduce(np.intersect1d, [np.round(x, 6) for x, _ in curves])
  rows = [y[np.isin(np.round(x, 6), common)] for x, y in curves]
  return common, np.stack(rows)


def group_by(records: Sequence[RunRecord], *fields: str) -> dict[tuple, list[RunRecord]]:
  """Records grouped by label and the named `group` coordinates, in first-seen order."""
  out: dict[tuple, list[RunRecord]] = {}
  for r in records:
    coords = dict(r.spec.group)
    key = (r.spec.label, *(coords[f] for f in fields))
    out.setdefault(key, []).append(r)
  return out


# ------------------------------------------------------------------------------- statistics


def mean_std(values: Iterable[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (ddof=1; 0 for a single value) over seeds."""
  x = np.asarray([v for v in values if v is not None], float)
  if x.size == 0:
    return float("nan"), float("nan")
  return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else 0.0


def paired_difference(scores: Sequence[float | None], seeds: Sequence[int],
                      reference_scores: Sequence[float | None],
                      reference_seeds: Sequence[int]) -> dict[str, float] | None:
  """A method against a reference on the seeds both ran: the per-seed score differences.

  Runs with the same seed share the initial parameters, the data order and the augmentation
  keys, so pairing by seed removes that noise from the comparison: a difference within the
  seed-to-seed spread can still be consistent. Returns n, the mean difference, its 95%
  confidence interval (Student t), the paired t-test's two-sided p-value, and the seeds won,
  lost and tied (a NaN score, from a diverged run, makes the p-value and interval NaN).
  """
  from scipy import stats  # pylint: disable=import-outside-toplevel
  for name, given in (("seeds", seeds), ("reference_seeds", reference_seeds)):
    if len(set(given)) != len(given):   # a seed counted twice would inflate n
      raise ValueError(f"paired_difference: {name} {list(given)} repeat a seed; pass each "
                       "seed once (two methods with the same label merge their runs)")
  diffs = paired_diffs(scores, seeds, reference_scores, reference_seeds)
  n = diffs.size
  if n < 2:
    return None
  mean, se = float(diffs.mean()), float(diffs.std(ddof=1) / math.sqrt(n))
  half = float(stats.t.ppf(0.975, n - 1) * se)
  if not math.isfinite(se):   # a NaN score (a diverged run): no test, as scipy's nan
    p = float("nan")
  elif se > 0:
    p = float(2 * stats.t.sf(abs(mean) / se, n - 1))
  else:                       # every difference equal: t is 0/0 or infinite
    p = 1.0 if mean == 0 else 0.0
  return {"n": n, "mean": mean, "ci_low": mean - half, "ci_high": mean + half, "p": p,
          "wins": int((diffs > 0).sum()), "losses": int((diffs < 0).sum()),
          "ties": int((diffs == 0).sum())}


def paired_diffs(scores: Sequence[float | None], seeds: Sequence[int],
                 reference_scores: Sequence[float | None],
                 reference_seeds: Sequence[int]) -> np.ndarray:
  """Per-seed differences score - reference on the seeds both scored (None = no score)."""
  if len(scores) != len(seeds) or len(reference_scores) != len(reference_seeds):
    raise ValueError("paired_diffs: one seed per score (zip would drop the extra ones)")
  reference = {s: v for s, v in zip(reference_seeds, reference_scores) if v is not None}
  return np.asarray([v - reference[s] for s, v in zip(seeds, scores)
                     if v is not None and s in reference], float)


def paired_table(rows: Sequence[Mapping[str, Any]], reference_label: str,
                 score_name: str, key: str = "score") -> str:
  """Markdown: every other method's paired difference to `reference_label` (rows of
  `compare_losses.summarise`: label, seeds and the per-seed scores under `key`)."""
  reference = next(r for r in rows if r["label"] == reference_label)
  body = []
  for r in rows:
    if r["label"] == reference_label or key not in r or key not in reference:
      continue
    d = paired_difference(r[key], r["seeds"], reference[key], reference["seeds"])
    if d is not None:
      body.append([r["label"], d["n"], f"{d['mean']:+.2f}",
                   f"[{d['ci_low']:+.2f}, {d['ci_high']:+.2f}]", f"{d['p']:.3f}",
                   f"{d['wins']} / {d['losses']} / {d['ties']}"])
  if not body:
    return ""
  return markdown_table(
      ["method", "seeds", f"{score_name} minus {reference_label}'s (points)", "95% CI",
       "paired t-test p", "seeds better / worse / tied"], body)


def fmt(values: Iterable[float], digits: int = 2) -> str:
  """"mean ± std" over the seeds; "(n=k of m)" when only k of the m seeds have a score."""
  values = list(values)
  mean, std = mean_std(values)
  if math.isnan(mean):
    return "n/a"
  scored = sum(v is not None for v in values)
  # A seed without a score (an STS run that skipped missing files, no final probe) would
  # otherwise vanish from the cell and the spread would look like the full set's.
  missing = f" (n={scored} of {len(values)})" if scored < len(values) else ""
  return f"{mean:.{digits}f} ± {std:.{digits}f}{missing}"


def score_of(results: Mapping[str, Any], domain: str) -> float | None:
  key = SCORE_KEYS.get(domain, ("",))[0]
  value = results.get(key)
  return float(value) if isinstance(value, (int, float)) else None


# ----------------------------------------------------------------------- replaying a step


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  from cldro_jax import checkpointing  # pylint: disable=import-outside-toplevel
  return checkpointing.read_saved_config(workdir)


class Replayer:
  """Recomputes the projections the train step saw, from a workdir's checkpoints.

  The trainer's step s+1 starts from the state saved as checkpoint s, draws global batch s (a
  function of the seed and the step) and the augmentation key fold_in(rng, s); the same forward
  pass on those gives exactly the z1, z2 of the loss logged at step s+1. The task and the jitted
  forward pass are built once per workdir.
  """

  def __init__(self, workdir: str):
    import jax  # pylint: disable=import-outside-toplevel

    from cldro_jax import checkpointing, train  # pylint: disable=import-outside-toplevel
    from cldro_jax import tasks as tasks_lib  # pylint: disable=import-outside-toplevel
    self.workdir = workdir
    self.config = load_run_config(workdir)
    self._checkpointer = checkpointing.Checkpointer(workdir, keep=self.config.keep_checkpoints)
    self.mesh = train.make_mesh(self.config.mesh.num_devices)
    self.task = tasks_lib.build_task(self.config, self.mesh)
    self.variant = self.task.loss_variant
    self._forward = jax.jit(functools.partial(self.task.forward, train=True))

  def steps(self) -> list[int]:
    return self._checkpointer.all_steps()

  def projections(self, step: int) -> dict[str, Any]:
    """numpy z1, z2 (B, d), labels and valid (B,) of training step `step` (checkpoint `step`)."""
    import jax  # pylint: disable=import-outside-toplevel
    if step not in self.steps():
      raise ValueError(f"no checkpoint at step {step} in {self.workdir} (saved: {self.steps()}); "
                       "set checkpoint_every_steps / keep_checkpoints so that it is kept.")
    raw, _ = self._checkpointer.restore_raw(step=step)
    with jax.set_mesh(self.mesh):
      replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
      params, model_state = jax.device_put((raw["params"]["model"], raw["model_state"]),
                                           replicated)
      batches = self.task.train_batches(start_step=step, num_steps=1)
      try:
        batch = self.task.to_global(next(batches))
      finally:
        getattr(batches, "close", lambda: None)()
      step_rng = jax.random.fold_in(jax.numpy.asarray(raw["rng"]), step)
      out = jax.device_get(self._forward(params, model_state, batch, step_rng))
    return {"z1": np.asarray(out.z1, np.float32), "z2": np.asarray(out.z2, np.float32),
            "labels": np.asarray(out.labels), "valid": np.asarray(out.valid, bool),
            "variant": self.variant, "step": step}

  def close(self) -> None:
    self._checkpointer.close()


def replay_step(workdir: str, step: int) -> dict[str, Any]:
  """`Replayer(workdir).projections(step)` for a single step."""
  replayer = Replayer(workdir)
  try:
    return replayer.projections(step)
  finally:
    replayer.close()


def replayable_step(workdir: str) -> int | None:
  """A kept checkpoint step s whose next step's metrics are one step's own (log_every_steps=1),
  so that replay_step(s) can be compared with the logged values of step s+1; None if none."""
  from cldro_jax import checkpointing  # pylint: disable=import-outside-toplevel
  config = load_run_config(workdir)
  if config.log_every_steps != 1:
    return None
  checkpointer = checkpointing.Checkpointer(workdir, keep=config.keep_checkpoints)
  try:
    steps = checkpointer.all_steps()
  finally:
    checkpointer.close()
  from cldro_jax import metrics  # pylint: disable=import-outside-toplevel
  logged = {r["step"] for r in metrics.read_metrics(workdir, "train")}
  usable = [s for s in steps if s + 1 in logged]
  return max(usable) if usable else None


def logged_train_record(workdir: str, step: int) -> dict[str, Any]:
  """The train-split metrics line of `step` (needs log_every_steps=1 for a single step's values)."""
  from cldro_jax import metrics  # pylint: disable=import-outside-toplevel
  found = [r for r in metrics.read_metrics(workdir, "train") if r["step"] == step]
  if not found:
    raise ValueError(f"no train metrics logged at step {step} in {workdir}")
  return found[-1]


def negative_similarities(z1: np.ndarray, z2: np.ndarray, variant: str, valid=None):
  """(sims (R, C), negatives mask (R, C), anchor row -> example index (R,), column -> example
  (C,)) of the variant's negatives (image: 2B anchors over concat(z1, z2), the pair and self
  excluded; sentence/graph: z1 x z2, diagonal excluded), cosines computed by the library's
  normalisation in float32, as in training."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from cldro_jax import losses  # pylint: disable=import-outside-toplevel
  a = np.asarray(losses.l2_normalize_rows(jnp.asarray(z1, jnp.float32)))
  b = np.asarray(losses.l2_normalize_rows(jnp.asarray(z2, jnp.float32)))
  n = a.shape[0]
  valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
  if variant == "image":
    z = np.concatenate([a, b])
    sims = z @ z.T
    rows = np.concatenate([np.arange(n), np.arange(n)])
    mask = rows[:, None] != rows[None, :]   # self and the pair are the same example
    vmask = np.concatenate([valid, valid])
    cols = rows
  else:
    sims = a @ b.T
    rows = cols = np.arange(n)
    mask = ~np.eye(n, dtype=bool)
    vmask = valid
  mask &= vmask[:, None] & vmask[None, :]
  return sims, mask, rows, cols


# ----------------------------------------------------------------------------- writing out


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  def cell(x):
    return f"{x:.4g}" if isinstance(x, float) else str(x)
  lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
  lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
  return "\n".join(lines)


def environment() -> dict[str, Any]:
  import jax  # pylint: disable=import-outside-toplevel
  device = jax.devices()[0]
  return {
      "date": datetime.date.today().isoformat(),
      "jax": jax.__version__,
      "backend": jax.default_backend(),
      "device": getattr(device, "device_kind", str(device)),
      "devices": jax.device_count(),
      "cpu_cores": os.cpu_count(),
      "python": platform.python_version(),
      "machine": platform.machine(),
      "code_version": code_version(),
  }


def header(title: str, command: str, seeds: Sequence[int], total_wall_s: float) -> str:
  env = environment()
  return (f"# {title}\n\n"
          f"- command: `{command}`\n"
          f"- date {env['date']}; {env['devices']} x {env['device']} ({env['backend']}), "
          f"{env['cpu_cores']} CPU cores, jax {env['jax']}, cldro_jax "
          f"{env['code_version'] or 'unknown version'} (runs reused from --runs may be older: "
          "each run folder records its own)\n"
          f"- seeds: {', '.join(map(str, seeds))}; mean ± std (sample std) over seeds\n"
          f"- wall time of the runs: {total_wall_s / 60:.1f} min\n")


def write_text(path: str, text: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)
  print(f"wrote {path}", file=sys.stderr)


def _jsonable(x: Any) -> Any:
  if isinstance(x, Mapping):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return _jsonable(x.tolist())
  if isinstance(x, (np.floating, float)):
    return None if not math.isfinite(float(x)) else float(x)
  if isinstance(x, np.integer):
    return int(x)
  return x


def write_json(path: str, obj: Any) -> None:
  write_text(path, json.dumps(_jsonable(obj), indent=1, sort_keys=True) + "\n")


def record_summary(r: RunRecord) -> dict[str, Any]:
  """What the JSON keeps of one run: its coordinates, results, wall time and workdir."""
  return {"label": r.spec.label, "seed": r.spec.seed, "group": dict(r.spec.group),
          "overrides": dict(r.spec.overrides), "results": r.results, "wall_s": r.wall_s,
          "workdir": r.workdir}


def plot_mean_std(ax, x: np.ndarray, ys: np.ndarray, label: str, *, marker: str | None = "o",
                  **kwargs) -> None:
  """A mean line with a +- std band over the runs (rows of ys); marker=None for dense curves."""
  ys = np.atleast_2d(ys)
  mean = ys.mean(0)
  line, = ax.plot(x, mean, label=label, marker=marker, markersize=3, **kwargs)
  if ys.shape[0] > 1:
    std = ys.std(0, ddof=1)
    ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)


def errorbar_over_seeds(ax, xs: Sequence[float], per_point: Sequence[Iterable[float]],
                        label: str, **kwargs) -> None:
  """Mean +- std over seeds (`mean_std`) of each point's scores, as error bars."""
  stats = [mean_std(values) for values in per_point]
  ax.errorbar(np.asarray(xs, float), [m for m, _ in stats], yerr=[s for _, s in stats],
              marker="o", capsize=3, label=label, **kwargs)


def save_figure(fig, path: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
