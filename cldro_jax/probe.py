"""Evaluation of a trained encoder on its own, from a workdir's checkpoint.

  python -m cldro_jax.probe --workdir=DIR [--protocol=reference|features|svm] [--epochs=100]
      [--step=N] [--untrained] [--update_bn] [--data_dir=...]

Image runs: uses the run's saved config (dataset, model, augmentation) with the given changes,
restores the encoder (BatchNorm statistics included; frozen, or updated as the reference does
when --update_bn or the run's config.eval.probe_update_bn says so), trains the linear layer and
prints the scores. They are also written to DIR/probe_<protocol>_step<N>.json
(probe_<protocol>_untrained.json with --untrained; `_epochs<E>` in the name when --epochs was
given, `_update_bn` when BatchNorm statistics were updated, so reruns with other settings
do not overwrite it). Pre-training is not touched, so this can follow a run that used
`--config.eval.linear_probe=none`, or compare protocols on one checkpoint.

Graph runs: the run's own evaluation (SVM, C by inner CV, outer 10-fold, one shuffle seed per
`config.eval.svm_seeds`) on the embeddings of the checkpoint at --step (or of the untrained GIN),
written to DIR/probe_svm_step<N>.json (probe_svm_untrained.json): e.g. how the score moved along
training.
"""

from __future__ import annotations

import json
import os
import sys

import jax
from absl import app, flags

from cldro_jax import checkpointing
from cldro_jax import logs
from cldro_jax import train
from cldro_jax.data import images

_WORKDIR = flags.DEFINE_string("workdir", None, "A cldro_jax image or graph workdir.")
_PROTOCOL = flags.DEFINE_enum("protocol", None, ["reference", "features", "svm"],
                              "Probe protocol (images, default: the run's "
                              "config.eval.linear_probe, or reference if that was none; graphs: "
                              "svm, their only one).")
_EPOCHS = flags.DEFINE_integer("epochs", None, "Probe epochs (default: the run's).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_UNTRAINED = flags.DEFINE_bool("untrained", False,
                               "Probe the encoder at its initialisation instead (the baseline).")
_UPDATE_BN = flags.DEFINE_bool("update_bn", None, "Reference protocol only: let BatchNorm "
                               "statistics drift during the probe, as the authors' linear.py "
                               "(default: the run's config.eval.probe_update_bn).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Override config.data.data_dir.")
flags.mark_flags_as_required(["workdir"])


def run_probe(workdir: str, *, protocol: str | None = None, epochs: int | None = None,
              step: int | None = None, untrained: bool = False, update_bn: bool | None = None,
              data_dir: str | None = None) -> dict:
  """Scores of the workdir's encoder: a linear probe (images) or the SVM (graphs); see the
  module docstring."""
  from cldro_jax.tasks import image  # pylint: disable=import-outside-toplevel
  config = checkpointing.read_saved_config(workdir)
  if config.domain == "graph":
    if protocol not in (None, "svm") or epochs is not None or update_bn is not None:
      raise ValueError("A graph run is evaluated by its SVM protocol only: drop --protocol "
                       "(or pass --protocol=svm), --epochs and --update_bn.")
    return _svm_probe(workdir, config, step=step, untrained=untrained, data_dir=data_dir)
  if config.domain != "image":
    raise ValueError(f"{workdir} is a {config.domain} run; the probe is for image and graph runs "
                     "(sentences: python -m cldro_jax.evaluators.sts --workdir=...).")
  if protocol == "svm":
    raise ValueError("--protocol=svm is the graph runs' evaluation; image runs take reference "
                     "or features.")
  ev = config.eval
  ev.linear_probe = protocol or (ev.linear_probe if ev.linear_probe != "none" else "reference")
  if epochs is not None:
    ev.linear_probe_epochs = epochs
  if update_bn is not None:
    ev.probe_update_bn = update_bn
  update_bn = bool(ev.probe_update_bn)
  if update_bn and ev.linear_probe != "reference":
    raise ValueError("--update_bn applies to the reference protocol only (the features protocol "
                     "probes cached features of the frozen encoder); add --protocol=reference or "
                     "--noupdate_bn.")
  config.progress_bar = True
  mesh, task, params, model_state, used_step = _task_and_encoder(
      workdir, config, image.ImageTask, step=step, untrained=untrained, data_dir=data_dir)
  params, model_state = jax.device_put((params, model_state), task.replicated)
  with jax.set_mesh(mesh):
    scores = task.linear_probe_scores(params, model_state, config.seed)
  result = {"protocol": ev.linear_probe, "epochs": ev.linear_probe_epochs, "step": used_step,
            "untrained": untrained, "update_bn": update_bn, "dataset": task.dataset.name,
            "top1": scores["top1"], "top5": scores["top5"]}
  # Settings that differ from the run's go into the name, so no rerun overwrites another.
  name = "_".join(["probe", ev.linear_probe]
                  + ([f"epochs{ev.linear_probe_epochs}"] if epochs is not None else [])
                  + (["update_bn"] if update_bn else [])
                  + ["untrained" if untrained else f"step{used_step}"]) + ".json"
  _write_result(workdir, name, result)
  return result


def _task_and_encoder(workdir: str, config, task_class, *, step: int | None, untrained: bool,
                      data_dir: str | None):
  """(mesh, task, params, model_state, step) of the run's encoder at `step` (the latest when
  None), or at its initialisation (step 0) with `untrained`."""
  if data_dir is not None:
    if config.domain == "image" and "data_dir" not in images.SOURCE_FIELDS.get(
        config.data.source, ("data_dir",)):
      # It would be ignored, the probe scoring the run's own data as if it were the given one.
      raise ValueError(f"--data_dir={data_dir}: the run reads its images from "
                       f"config.data.source={config.data.source!r}, which has no data_dir; "
                       "leave the flag out.")
    config.data.data_dir = data_dir
  if config.mesh.num_devices > jax.device_count():
    # Trained on more devices than this machine has: the probe runs on what is here.
    config.mesh.num_devices = -1
  mesh = train.make_mesh(config.mesh.num_devices)
  task = task_class(config, mesh)
  if untrained:
    params, model_state = jax.jit(task.init)(train.model_init_key(config.seed))
    return mesh, task, params, model_state, 0
  try:
    raw, meta = checkpointing.read_checkpoint(workdir, step=step)
  except FileNotFoundError as err:
    fix = ("pass one of them with --step, or leave --step out for the latest" if step is not None
           else "the run has not saved one yet (it does every config.checkpoint_every_steps "
           "steps): wait for it, or probe the untrained encoder with --untrained")
    raise FileNotFoundError(f"{err} {fix[0].upper()}{fix[1:]}.") from err
  return mesh, task, raw["params"]["model"], raw["model_state"], int(meta["step"])


def _write_result(workdir: str, name: str, result: dict) -> None:
  if jax.process_index() == 0:
    with open(os.path.join(workdir, name), "w", encoding="utf-8") as f:
      json.dump(result, f, indent=2, sort_keys=True)


def _svm_probe(workdir: str, config, *, step: int | None, untrained: bool,
               data_dir: str | None) -> dict:
  """The graph run's SVM evaluation on one checkpoint (see the module docstring)."""
  from cldro_jax.tasks import graph  # pylint: disable=import-outside-toplevel
  _, task, params, model_state, used_step = _task_and_encoder(
      workdir, config, graph.GraphTask, step=step, untrained=untrained, data_dir=data_dir)
  scores = task.svm_scores(*task.embeddings(params, model_state), task.cv_seeds(), progress=True)
  result = {"protocol": "svm", "step": used_step, "untrained": untrained,
            "dataset": task.dataset.name, **scores}
  _write_result(workdir, f"probe_svm_{'untrained' if untrained else f'step{used_step}'}.json",
                result)
  return result


def summary_line(result: dict, workdir: str) -> str:
  """One line for the person at the terminal (stdout holds the JSON)."""
  encoder = "the untrained encoder" if result["untrained"] else f"the step-{result['step']} encoder"
  if result["protocol"] == "svm":
    seeds = len(result.get("svm_accuracy_per_seed", [])) or 1
    # The spread is over CV shuffles of this one encoder, not over training seeds (the paper's
    # +-: experiments/ aggregates those).
    spread = (f" +- {result['svm_accuracy_std']:.2f} over {seeds} CV shuffle seeds"
              if seeds > 1 else "")
    score = f"SVM accuracy {result['svm_accuracy']:.2f}{spread}"
  else:
    score = (f"linear probe ({result['protocol']}, {result['epochs']} epochs) top-1 "
             f"{result['top1']:.2f}, top-5 {result['top5']:.2f}")
  return (f"{score} of {encoder} on {result['dataset']} (saved as "
          f"{os.path.join(workdir, 'probe_' + result['protocol'] + '_*.json')})")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logs.quiet_library_info()
  try:
    result = run_probe(_WORKDIR.value, protocol=_PROTOCOL.value, epochs=_EPOCHS.value,
                       step=_STEP.value, untrained=_UNTRAINED.value, update_bn=_UPDATE_BN.value,
                       data_dir=_DATA_DIR.value)
  except (FileNotFoundError, ValueError) as err:
    # A wrong workdir, step or flag: the message names the fix; a traceback would bury it.
    print(f"cldro_jax.probe: {err}", file=sys.stderr)
    sys.exit(2)
  if jax.process_index() == 0:
    print(json.dumps(result, indent=2, sort_keys=True), flush=True)
    print(summary_line(result, _WORKDIR.value), file=sys.stderr)


if __name__ == "__main__":
  app.run(main)
