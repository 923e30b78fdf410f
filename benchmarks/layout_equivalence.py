r"""How closely 8 CPU devices reproduce 1 device, step by step (the check docs/scaling.md cites).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/layout_equivalence.py

Runs the tiny quick-start training of tests/test_train_image.py with plain SGD (lr 0.1, no
momentum, no weight decay: the update is lr times the gradient), checkpointing every step, in
four layouts: 1 or 8 devices, a pass per view or both views in one pass. Against the 1-device
pass-per-view run it prints:

1. Runs of 2 steps each from the initial parameters: the largest per-array difference after
   step 1 (relative to lr times the gradient's size) and the largest per-array relative
   difference of step 2's gradient, which also carries step 1's round-off in the parameters.
2. Step 2 from ONE step-1 checkpoint (the workdir copied), as tests/test_train_image.py checks:
   the relative difference of the whole update and of the worst parameter array.
3. Where the 1- and 8-device forward passes of that step take different sides of zero: every
   module output of the encoder and head whose sign pattern differs. A ReLU input that round-off
   moves across zero changes the gradient of every layer before it by a discrete amount.
"""

import os
import sys
import tempfile

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

sys.path[:0] = [os.path.join(os.path.dirname(__file__), "..", "tests"),
                os.path.join(os.path.dirname(__file__), "..")]
from cldro_jax import tasks as tasks_lib  # noqa: E402
from cldro_jax import train  # noqa: E402
from cldro_jax.data import augment as augment_lib  # noqa: E402
from helpers import (LINEAR_OPTIMIZER, saved_arrays,  # noqa: E402
                     step_two_from_one_checkpoint)
from test_train_image import tiny_config  # noqa: E402

LAYOUTS = {"1 device, pass per view": {"mesh.num_devices": 1},
           "8 devices, pass per view": {"mesh.num_devices": 8},
           "1 device, one pass": {"mesh.num_devices": 1, "model.views_in_one_pass": True},
           "8 devices, one pass": {"mesh.num_devices": 8, "model.views_in_one_pass": True}}
EVERY_STEP = dict(LINEAR_OPTIMIZER, checkpoint_every_steps=1)


def model_arrays(workdir, step):
  """The model's parameter arrays at `step`, as float64 leaves."""
  params = saved_arrays(workdir, step)[0]["params"]["model"]
  return [np.asarray(a, np.float64) for a in jax.tree.leaves(params)]


def relative(a, b):
  return np.linalg.norm(a - b) / np.linalg.norm(a)


def independent_runs(root):
  """Each layout trains 2 steps from the initial parameters: {layout: [arrays at 1, at 2]}."""
  params = {}
  for i, (name, layout) in enumerate(LAYOUTS.items()):
    workdir = os.path.join(root, f"independent_{i}")
    train.train_and_evaluate(tiny_config(total_steps=2, **EVERY_STEP, **layout), workdir)
    params[name] = [model_arrays(workdir, s) for s in (1, 2)]
  return params


def from_one_checkpoint(root):
  """Step 1 on 1 device, then step 2 from that checkpoint in each layout: (a workdir holding the
  step-1 checkpoint, {layout: update})."""
  workdirs = step_two_from_one_checkpoint(
      lambda **overrides: tiny_config(**EVERY_STEP, **overrides), root, list(LAYOUTS.values()))
  start = model_arrays(workdirs[0], 1)
  updates = {name: [after - before
                     for before, after in zip(start, model_arrays(workdir, 2), strict=True)]
             for name, workdir in zip(LAYOUTS, workdirs, strict=True)}
  return workdirs[0], updates


def module_outputs_of_step_two(checkpoint_dir, num_devices):
  """Every module output of step 2's forward pass (pass per view) from the step-1 checkpoint."""
  config = tiny_config(total_steps=2, **EVERY_STEP, **{"mesh.num_devices": num_devices})
  mesh = train.make_mesh(num_devices)
  task = tasks_lib.build_task(config, mesh, tempfile.mkdtemp())
  saved = saved_arrays(checkpoint_dir, 1)[0]
  batch = next(iter(task.train_batches(start_step=1, num_steps=1)))

  def forward(params, model_state, images, rng):
    views = augment_lib.two_views(rng, images, task.augment)
    return [task.model.apply({"params": params, **model_state}, view, train=True,
                             mutable=list(model_state) + ["intermediates"],
                             capture_intermediates=True)[1]["intermediates"] for view in views]

  with jax.set_mesh(mesh):
    replicated = NamedSharding(mesh, P())
    params, model_state, rng = jax.device_put(
        (saved["params"]["model"], saved["model_state"], saved["rng"]), replicated)
    images = task.to_global(batch)["image"]
    outputs = jax.jit(forward)(params, model_state, images, jax.random.fold_in(rng, 1))
  return [jax.tree_util.tree_flatten_with_path(jax.device_get(o))[0] for o in outputs]


def main():
  lr = LINEAR_OPTIMIZER["optim.lr"]
  reference = next(iter(LAYOUTS))
  with tempfile.TemporaryDirectory() as root:
    independent = independent_runs(root)
    first, updates = from_one_checkpoint(root)
    one_device, eight_devices = (module_outputs_of_step_two(first, n) for n in (1, 8))

  ref_step1, ref_step2 = independent[reference]
  ref_grad2 = [(a - b) / lr for a, b in zip(ref_step1, ref_step2, strict=True)]
  print(f"# jax {jax.__version__}; reference: {reference}\n")
  print("1. Two steps each, from the initial parameters")
  print("| layout | step 1 params: max diff / (lr \\|g\\|) | step 2 gradient: max relative diff |")
  print("|---|---:|---:|")
  for name in list(LAYOUTS)[1:]:
    step1, step2 = independent[name]
    params_diff = max(np.linalg.norm(a - b) / (lr * np.linalg.norm(g))
                      for a, b, g in zip(ref_step1, step1, ref_grad2, strict=True))
    grad2 = [(a - b) / lr for a, b in zip(step1, step2, strict=True)]
    print(f"| {name} | {params_diff:.1e} | "
          f"{max(relative(g, h) for g, h in zip(ref_grad2, grad2, strict=True)):.1e} |")

  print("\n2. Step 2 from one step-1 checkpoint")
  print("| layout | whole update: relative diff | worst array: relative diff |")
  print("|---|---:|---:|")
  ref_update = updates[reference]
  for name in list(LAYOUTS)[1:]:
    whole = relative(np.concatenate([u.ravel() for u in ref_update]),
                     np.concatenate([u.ravel() for u in updates[name]]))
    worst = max(relative(u, v) for u, v in zip(ref_update, updates[name], strict=True))
    print(f"| {name} | {whole:.1e} | {worst:.1e} |")

  print("\n3. Module outputs of step 2 whose sign differs between 1 and 8 devices "
        "(pass per view)")
  flips = 0
  for view, (ones, eights) in enumerate(zip(one_device, eight_devices, strict=True), start=1):
    for (path, x), (_, y) in zip(ones, eights, strict=True):
      changed = (np.asarray(x) > 0) != (np.asarray(y) > 0)
      if changed.any():
        k = int(np.argmax(changed))
        flips += int(changed.sum())
        print(f"  view {view} {jax.tree_util.keystr(path)}: {int(changed.sum())} of {x.size} "
              f"values, e.g. {np.asarray(x).flat[k]:.2e} (1 device) vs "
              f"{np.asarray(y).flat[k]:.2e} (8 devices)")
  if not flips:
    print("  none")


if __name__ == "__main__":
  main()
