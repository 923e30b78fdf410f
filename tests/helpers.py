"""Small helpers shared by the trainer tests (configs with overrides, saved arrays, tree checks)."""

import json
import os

import jax
import ml_collections
import numpy as np

from cldro_jax import checkpointing


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
  for (path, x), y in zip(flat_a, flat_b):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol,
                               err_msg=jax.tree_util.keystr(path))


def assert_trees_equal(a, b):
  assert_trees_close(a, b, rtol=0, atol=0)


def read_json(*path_parts) -> object:
  """The JSON file at os.path.join(*path_parts), closed after reading."""
  with open(os.path.join(*path_parts), encoding="utf-8") as f:
    return json.load(f)


def assert_updates_close(workdir_a, workdir_b, step_from, step_to, rel):
  """The parameter change from `step_from` to `step_to` (all parameters as one vector) agrees to
  `rel` of its norm between two runs (both checkpointed at both steps). One vector, not leaf by
  leaf: a single BatchNorm scale whose gradient is a near-cancelling sum can differ by percents
  from round-off alone in these tiny networks."""
  def update(workdir):
    before = saved_arrays(workdir, step_from)[0]["params"]
    after = saved_arrays(workdir, step_to)[0]["params"]
    return np.concatenate([np.ravel(np.asarray(y, np.float64) - np.asarray(x, np.float64))
                           for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after))])
  a, b = update(workdir_a), update(workdir_b)
  difference = np.linalg.norm(a - b) / np.linalg.norm(a)
  assert difference <= rel, f"the updates differ by {difference:.2e} of their norm"
