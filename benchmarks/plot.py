"""Figures from the `--json` files of the benchmarks (the tables' numbers, drawn).

    python benchmarks/losses.py --json losses.json
    python benchmarks/plot.py losses.json                      # -> losses.png beside it
    python benchmarks/plot.py train_step_resnet18.json one_pass_resnet18.json --out images.png

All files given must come from the same benchmark; several train_step or sentence_step files
(for example a pass per view and both views in one pass) become bars side by side.

  losses         time and compiled temporary memory of forward + backward against B, log-log,
                 one line per implementation (plain transcription, dense, blockwise).
  train_step     images/s per model; on an H200 beside the anchors measured on the same GPU
                 (docs/benchmarks.md) and the project's targets.
  sentence_step  sentences/s per batch and dtype, with the same anchors and targets on an H200.
  scaling        the trainer's images/s against the device count at a fixed global batch, with
                 the linear speed-up line (on virtual CPU devices, the 1-device rate instead).
  graph_host     host graphs/s of the graph pipeline per augmentation and mode, one panel per
                 dataset size, beside the baseline revision measured in the same process.

Runs anywhere matplotlib is installed (it is a project dependency); the GPU machine only writes
the JSON files.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402

# Measured on one H200, 2026-11-28 (docs/benchmarks.md, "Anchors"), batch 512 images = 1024 views,
# 32x32: drawn only beside results from an H200, where they are a like-for-like comparison.
IMAGE_ANCHORS = {
    "resnet18": {"PyTorch fp32 (reference code)": 10_190, "PyTorch bf16 + channels_last": 24_288,
                 "torch.compile bf16": 28_904, "plain JAX/Flax bf16": 44_777},
    "resnet50": {"PyTorch fp32 (reference code)": 3_481, "PyTorch bf16 + channels_last": 7_313,
                 "torch.compile bf16": 10_440, "plain JAX/Flax bf16": 12_526},
}
IMAGE_TARGETS = {"resnet18": 50_000, "resnet50": 15_000}
# Hugging Face transformers 5.17 on PyTorch 2.11, BERT-base, length 32 (docs/benchmarks.md).
SENTENCE_ANCHORS = {
    ("float32", 64): 1_086, ("float32", 512): 1_296,
    ("bfloat16", 64): 1_462, ("bfloat16", 512): 6_143,
}
SENTENCE_TARGETS = {("bfloat16", 64): 3_000, ("bfloat16", 512): 9_000}


def load(paths: Sequence[str]) -> list[dict[str, Any]]:
  results = []
  for path in paths:
    with open(path, encoding="utf-8") as f:
      results.append(json.load(f))
  kinds = {r["benchmark"] for r in results}
  if len(kinds) != 1:
    raise SystemExit(f"the files come from different benchmarks ({sorted(kinds)}): plot each "
                     "benchmark separately, e.g. `python benchmarks/plot.py losses.json`")
  # A benchmark stopped by a time limit before its first row leaves a file without rows
  # (benchmarks/h200.sh): it is left out, with a message, rather than breaking the figure.
  for path, result in zip(paths, results):
    if not result["rows"]:
      print(f"{path}: no rows (the benchmark stopped before its first measurement); left out",
            file=sys.stderr)
  results = [r for r in results if r["rows"]]
  if not results:
    raise SystemExit("no rows in any of the files: nothing to plot")
  return results


def on_h200(result: dict[str, Any]) -> bool:
  return "H200" in result["device_kind"]


def _caption(results: Sequence[dict[str, Any]]) -> str:
  first = results[0]
  return (f"{first['device_kind']} x{first['device_count']} ({first['backend']}), "
          f"jax {first['jax']}, {first['date']}")


def _minor_label(ax):
  """Plain-number labels for the 2s, 3s and 5s of a log axis that spans under ~1.5 decades."""
  def label(y: float, _) -> str:
    low, high = ax.get_ylim()
    return f"{y:g}" if high / low < 30 and f"{y:.0e}"[0] in "235" else ""
  return label


def plot_losses(results: Sequence[dict[str, Any]]):
  fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(10, 4))
  for result in results:
    block = result["settings"]["block_size"]
    suffix = f" ({result['device_kind']})" if len(results) > 1 else ""
    for impl in dict.fromkeys(row["implementation"] for row in result["rows"]):
      rows = [r for r in result["rows"] if r["implementation"] == impl and r["ms"] is not None]
      label = (f"{impl} ({block})" if impl == "blockwise" else impl) + suffix
      batches = [r["batch"] for r in rows]
      ax_time.plot(batches, [r["ms"] for r in rows], marker="o", label=label)
      ax_mem.plot(batches, [r["temp_mib"] for r in rows], marker="o", label=label)
  batches = sorted({row["batch"] for result in results for row in result["rows"]})
  for ax, ylabel in ((ax_time, "forward + backward, ms"), (ax_mem, "compiled temporary MiB")):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(batches, [str(b) for b in batches])   # the measured B, as plain numbers
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _: f"{y:g}"))
    ax.yaxis.set_minor_formatter(ticker.FuncFormatter(_minor_label(ax)))
    ax.set_xlabel("B (images per view)")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
  dim = results[0]["settings"]["dim"]
  fig.suptitle(f"ADNCE loss, d={dim}, float32: {_caption(results)}")
  fig.tight_layout()
  return fig


def _panels(groups: list[str], series: dict[str, list[float | None]],
            targets: list[float | None], xlabel: str):
  """One panel per group (own scale: ResNet-50 next to ResNet-18 would be unreadable), a
  horizontal bar per series with its value; the project's own bars in blue, measurements of
  the same run in orange, anchors in grey; the target as a dashed line."""
  ncols = min(len(groups), 2)
  nrows = -(-len(groups) // ncols)
  fig, axes = plt.subplots(nrows, ncols, squeeze=False,
                           figsize=(4.8 * ncols + 1.5, (0.45 * len(series) + 1.4) * nrows + 0.4))
  for ax in axes.flat[len(groups):]:
    ax.set_visible(False)
  for ax, group, i in zip(axes.flat, groups, range(len(groups))):
    kept = [(label, values[i]) for label, values in series.items() if values[i] is not None]
    labels = [label for label, _ in kept][::-1]   # first series on top
    values = [value for _, value in kept][::-1]
    colors = ["tab:blue" if label.startswith("this project") else
              "tab:orange" if label.endswith("same run") else "0.6" for label in labels]
    bars = ax.barh(range(len(kept)), values, color=colors)
    ax.bar_label(bars, labels=[_rate_label(v) for v in values], fontsize=8, padding=2)
    ax.set_yticks(range(len(kept)), labels if i % ncols == 0 else [""] * len(kept))
    if targets[i] is not None:
      ax.axvline(targets[i], color="k", linestyle="--", label=f"target {targets[i]:,.0f}")
      ax.legend(fontsize=8, loc="best")
    ax.set_title(group, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.margins(x=0.18)
  return fig


def _rate_label(value: float) -> str:
  """Thousands separators for large rates; three significant digits for small ones (a CPU's
  4.09 sentences/s must not read "4" next to 4.24)."""
  return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _merge(series: dict[str, list[float | None]], label: str, values: list[float | None]):
  """Adds `values` to series[label], keeping values already there (None = not measured)."""
  have = series.setdefault(label, [None] * len(values))
  series[label] = [old if new is None else new for old, new in zip(have, values)]


def _variant(result: dict[str, Any]) -> str:
  settings = result["settings"]
  if result["benchmark"] == "train_step":
    return ("this project, both views in one pass" if settings["views_in_one_pass"] else
            "this project, a pass per view")
  return "this project"


def plot_train_step(results: Sequence[dict[str, Any]]):
  models = list(dict.fromkeys(row["model"] for result in results for row in result["rows"]
                              if "step_ms" in row))
  series: dict[str, list[float | None]] = {}

  def value(result, model, key):
    rows = [r for r in result["rows"] if r.get("model") == model]
    return rows[0][key] if rows else None

  # Files of one variant (say ResNet-18 and ResNet-50 run separately) fill one series.
  for result in results:
    for label, key in ((_variant(result), "images_per_s"),
                       ("plain step, same run", "plain_images_per_s")):
      _merge(series, label, [value(result, m, key) for m in models])
  series = {label: values for label, values in series.items() if any(values)}
  # the anchors' setting: one H200, batch 512 images of 32x32, standard width
  h200 = all(on_h200(r) and r["settings"]["batch"] == 512 and r["settings"]["width"] == 64
             for r in results)
  if h200:
    for name in IMAGE_ANCHORS["resnet18"]:
      series[name] = [IMAGE_ANCHORS.get(m, {}).get(name) for m in models]
  fig = _panels(models, series, [IMAGE_TARGETS.get(m) if h200 else None for m in models],
                "images/s (2 views each)")
  settings = results[0]["settings"]
  fig.suptitle(f"Image training step, batch {settings['batch']}, width {settings['width']}, "
               f"{settings['dtype']}: {_caption(results)}", fontsize=10)
  fig.tight_layout()
  return fig


def plot_sentence_step(results: Sequence[dict[str, Any]]):
  keys = list(dict.fromkeys((row["dtype"], row["batch"]) for result in results
                            for row in result["rows"]))
  series: dict[str, list[float | None]] = {}
  for result in results:
    for program in dict.fromkeys(row["program"] for row in result["rows"]):
      label = _variant(result) if program == "project" else "plain step, same run"
      rate = {(r["dtype"], r["batch"]): r["sentences_per_s"] for r in result["rows"]
              if r["program"] == program}
      _merge(series, label, [rate.get(k) for k in keys])
  # the anchors' setting: one H200, the full BERT-base at length 32
  h200 = all(on_h200(r) and r["settings"]["architecture"] == "bert-base-uncased"
             and r["settings"]["layers"] == 12 and r["settings"]["seq_len"] == 32
             for r in results)
  if h200:
    series["Hugging Face transformers (PyTorch)"] = [SENTENCE_ANCHORS.get(k) for k in keys]
  fig = _panels([f"{dtype}, batch {batch}" for dtype, batch in keys], series,
                [SENTENCE_TARGETS.get(k) if h200 else None for k in keys], "sentences/s")
  settings = results[0]["settings"]
  fig.suptitle(f"SimCSE step, {settings['architecture']}, {settings['layers']} layer(s), length "
               f"{settings['seq_len']}: {_caption(results)}", fontsize=10)
  fig.tight_layout()
  return fig


def plot_scaling(results: Sequence[dict[str, Any]]):
  """Images/s against the device count. Real devices get the linear speed-up as reference;
  virtual CPU devices share the host's cores, where no speed-up is possible, so there the
  reference is the 1-device rate (what a multi-device code path without overhead would give)."""
  fig, ax = plt.subplots(figsize=(6, 4.2))
  batches = {r["settings"]["batch"] for r in results}
  kinds = {r["device_kind"] for r in results}
  for result in results:
    rows = sorted(result["rows"], key=lambda r: r["devices"])
    devices = [r["devices"] for r in rows]
    # Each line is named by what differs between the files: the device, else the batch.
    label = " ".join(([result["device_kind"]] if len(kinds) > 1 else []) +
                     ([f"global batch {result['settings']['batch']}"] if len(batches) > 1 else [])
                     ) or "measured"
    line, = ax.plot(devices, [r["images_per_s"] for r in rows], marker="o", label=label)
    first = rows[0]["images_per_s"] / devices[0]
    start = "1 device" if devices[0] == 1 else f"{devices[0]} devices"
    if result["backend"] == "cpu":
      ideal, name = [rows[0]["images_per_s"]] * len(devices), f"the rate on {start} (no overhead)"
    else:
      ideal, name = [first * d for d in devices], f"linear from {start}"
    ax.plot(devices, ideal, linestyle=":", color=line.get_color(), label=name)
  all_devices = sorted({r["devices"] for result in results for r in result["rows"]})
  ax.set_xscale("log", base=2)
  ax.set_xticks(all_devices, [str(d) for d in all_devices])
  ax.xaxis.set_minor_locator(ticker.NullLocator())
  ax.set_xlabel("devices (same global batch)")
  ax.set_ylabel("images/s (2 views each)")
  if all(r["backend"] == "cpu" for r in results):
    ax.set_xlabel("virtual CPU devices sharing the host's cores (same global batch)")
    ax.set_ylim(bottom=0)
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=8)
  settings = results[0]["settings"]
  batch = f", global batch {settings['batch']}" if len(batches) == 1 else ""
  ax.set_title(f"Trainer, {settings['model']} width {settings['width']} {settings['dtype']}"
               f"{batch}:\n{_caption(results)}", fontsize=9)
  fig.tight_layout()
  return fig


def plot_graph_host(results: Sequence[dict[str, Any]]):
  result = results[0]
  rows = result["rows"]
  datasets = list(dict.fromkeys(r["dataset"] for r in rows))
  against = result["settings"].get("against")
  fig, axes = plt.subplots(1, len(datasets), squeeze=False, sharey=True,
                           figsize=(3.6 * len(datasets) + 1.8, 0.5 * len(rows) / len(datasets) + 1.6))
  for ax, dataset in zip(axes.flat, datasets):
    mine = [r for r in rows if r["dataset"] == dataset][::-1]   # first row on top
    y = list(range(len(mine)))
    height = 0.4 if against else 0.7
    ax.barh([v + (height / 2 if against else 0) for v in y], [r["graphs_per_s"] for r in mine],
            height=height, color="tab:blue", label="this revision")
    if against:
      ax.barh([v - height / 2 for v in y], [r["batch"] / r["baseline_ms"] * 1e3 for r in mine],
              height=height, color="0.6", label=f"{against} (same process)")
      for v, r in zip(y, mine):
        ax.annotate(f"{r['speedup']:.1f}x", (r["graphs_per_s"], v + height / 2), fontsize=7,
                    xytext=(2, -3), textcoords="offset points")
    ax.set_yticks(y, [f"{r['aug']}, {r['mode']}" for r in mine])
    ax.set_title(dataset, fontsize=10)
    ax.set_xlabel("graphs/s (host, one core)")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.margins(x=0.25)
  handles, labels = axes.flat[0].get_legend_handles_labels()
  fig.legend(handles, labels, fontsize=8, loc="lower center", ncols=2)
  fig.suptitle(f"Graph host pipeline, batch {result['settings']['batch']}: {result['host']}, "
               f"{result['date']}", fontsize=10)
  fig.tight_layout(rect=(0, 0.07, 1, 1))
  return fig


PLOTS = {"losses": plot_losses, "train_step": plot_train_step,
         "sentence_step": plot_sentence_step, "scaling": plot_scaling,
         "graph_host": plot_graph_host}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("files", nargs="+", help="--json files of one benchmark")
  parser.add_argument("--out", default="", help="figure path (default: the first file's name "
                      "with .png)")
  args = parser.parse_args(argv)
  results = load(args.files)
  kind = results[0]["benchmark"]
  if kind not in PLOTS:
    raise SystemExit(f"no figure for benchmark {kind!r}; known: {', '.join(PLOTS)}")
  fig = PLOTS[kind](results)
  out = args.out or os.path.splitext(args.files[0])[0] + ".png"
  fig.savefig(out, dpi=110)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
