"""Small helpers shared by the trainer tests (configs with overrides, saved arrays, tree checks)."""

import collections
import contextlib
import json
import logging
import os
import re
import shutil

import jax
import ml_collections
import numpy as np

from cldro_jax import checkpointing
from cldro_jax import train


# For tests that compare parameters across device layouts: SGD's update is linear in the gradient,
# so reduction-order round-off stays round-off. Adam's first steps move each weight by about lr
# whatever the gradient's size, which turns round-off in a near-zero gradient entry into a
# parameter difference of up to 2 lr (seen with jax 0.10.0).
LINEAR_OPTIMIZER = {"optim.name": "sgd", "optim.lr": 0.1, "optim.momentum": 0.0,
                    "optim.weight_decay": 0.0}


def with_overrides(config: ml_collections.ConfigDict, **overrides) -> ml_collections.ConfigDict:
  """Sets dotted fields: `with_overrides(c, **{"optim.lr": 0.1, "batch_size": 8})`."""
  for key, value in overrides.items():
    node = config
    *path, leaf = key.split(".")
    for part in path:
      node = node[part]
    node[leaf] = value
  return config


def tiny_image_config(**overrides) -> ml_collections.ConfigDict:
  """The quick start at toy size: 40 shipped Fashion-MNIST images (batch 8: 5 steps an epoch),
  4 steps, one device, no monitor, no final probe."""
  from configs import quickstart  # pylint: disable=import-outside-toplevel
  config = quickstart.get_config("runlocal")
  config.data.train_per_class = 4
  config.data.test_per_class = 4
  config.batch_size = 8
  config.total_steps = 4
  config.eval.every_epochs = 0
  config.eval.linear_probe = "none"
  config.eval.untrained_baseline = False
  config.mesh.num_devices = 1
  return with_overrides(config, **overrides)


def saved_arrays(workdir, step=None):
  """(arrays, meta) of a workdir's latest (or given) checkpoint, read without a target."""
  checkpointer = checkpointing.Checkpointer(workdir)
  try:
    return checkpointer.restore_raw(step=step)
  finally:
    checkpointer.close()


def assert_trees_close(a, b, rtol, atol):
  """Leaf-by-leaf allclose, naming the first leaf that differs (rtol=atol=0: bitwise)."""
  flat_a, flat_b = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)
  assert len(flat_a) == len(flat_b)
  for (path, x), y in zip(flat_a, flat_b, strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol,
                               err_msg=jax.tree_util.keystr(path))


def assert_trees_equal(a, b):
  assert_trees_close(a, b, rtol=0, atol=0)


def read_json(*path_parts) -> object:
  """The JSON file at os.path.join(*path_parts), closed after reading."""
  with open(os.path.join(*path_parts), encoding="utf-8") as f:
    return json.load(f)


def step_two_from_one_checkpoint(make_config, root, layouts):
  """Step 1 with `make_config(total_steps=1)`, then step 2 from that same checkpoint with
  `make_config(total_steps=2, **layout)` for each layout; returns their workdirs, in order.

  Use with `assert_updates_close(first_layout_dir, other_dir, 1, 2, ...)`.
  """
  first = os.path.join(root, "step_1")
  train.train_and_evaluate(make_config(total_steps=1), first)
  workdirs = []
  for i, layout in enumerate(layouts):
    workdir = os.path.join(root, f"layout_{i}")
    shutil.copytree(first, workdir)
    train.train_and_evaluate(make_config(total_steps=2, **layout), workdir)
    workdirs.append(workdir)
  return workdirs


def assert_updates_close(workdir_a, workdir_b, step_from, step_to, *, rel, rel_per_array):
  """The parameter change from `step_from` to `step_to` agrees between two runs that started
  that step from the same checkpoint (asserted): to `rel` of its norm as one vector, and to
  `rel_per_array` of each parameter array's own.

  Continue both runs from one checkpoint (copy the workdir after `step_from`): runs that each made
  their own earlier steps differ by round-off in the parameters, which the next steps amplify.
  Even from the same checkpoint, two layouts of a step differ by float32 reduction order, and a
  ReLU input within that round-off of zero can take the other branch in one of them: the gradient
  of every layer before that ReLU then jumps, by up to a few percent of an array's gradient in
  these tiny networks (docs/scaling.md, "How equal is equal to one device?"). Hence the looser
  per-array bound; without such a flip the arrays agree to about 1e-5.
  """
  start_a = saved_arrays(workdir_a, step_from)[0]["params"]
  assert_trees_equal(start_a, saved_arrays(workdir_b, step_from)[0]["params"])
  after_a = saved_arrays(workdir_a, step_to)[0]["params"]
  after_b = saved_arrays(workdir_b, step_to)[0]["params"]
  squared_difference = squared_norm = 0.0
  worst, worst_path = 0.0, None
  for (path, x), y, z in zip(jax.tree_util.tree_flatten_with_path(start_a)[0],
                             jax.tree.leaves(after_a), jax.tree.leaves(after_b), strict=True):
    x64 = np.asarray(x, np.float64)
    update_a, update_b = np.asarray(y, np.float64) - x64, np.asarray(z, np.float64) - x64
    squared_difference += np.sum((update_a - update_b) ** 2)
    squared_norm += np.sum(update_a ** 2)
    difference = np.linalg.norm(update_a - update_b) / max(np.linalg.norm(update_a), 1e-30)
    if difference > worst:
      worst, worst_path = difference, jax.tree_util.keystr(path)
  overall = np.sqrt(squared_difference / squared_norm)
  assert overall <= rel, f"the updates differ by {overall:.2e} of their norm"
  assert worst <= rel_per_array, f"the updates of {worst_path} differ by {worst:.2e} of its norm"


class _CompileCounter(logging.Handler):
  def __init__(self):
    super().__init__()
    self.counts = collections.Counter()

  def emit(self, record):
    match = re.match(r"Compiling (\S+)", record.getMessage())
    if match:
      self.counts[match.group(1)] += 1


@contextlib.contextmanager
def counted_compiles():
  """A Counter of the XLA compilations inside the block by jitted function name, e.g.
  `counts["jit(_embed_images)"]` (JAX's own compile log, whatever jit object compiled)."""
  counter = _CompileCounter()
  logger = logging.getLogger("jax")
  logger.addHandler(counter)
  try:
    with jax.log_compiles():
      yield counter.counts
  finally:
    logger.removeHandler(counter)
