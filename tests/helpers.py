"""Small helpers shared by the trainer tests (configs with overrides, saved arrays, tree checks)."""

import json
import os

import jax
import ml_collections
import numpy as np

from cldro_jax import checkpointing


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
