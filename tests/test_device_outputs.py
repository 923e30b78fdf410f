"""Evaluation loops dispatch the next batch before copying the last one to the host."""

import jax.numpy as jnp
import numpy as np
import pytest

from cldro_jax.evaluators import device_outputs


def _dispatching(events, n):
  for i in range(n):
    events.append(f"dispatch {i}")
    yield i, jnp.full((2,), i)


@pytest.mark.parametrize("ahead, expected", [
    (0, ["dispatch 0", "fetch 0", "dispatch 1", "fetch 1", "dispatch 2", "fetch 2"]),
    (1, ["dispatch 0", "dispatch 1", "fetch 0", "dispatch 2", "fetch 1", "fetch 2"]),
    (2, ["dispatch 0", "dispatch 1", "dispatch 2", "fetch 0", "fetch 1", "fetch 2"]),
])
def test_fetches_in_order_with_batches_dispatched_ahead(ahead, expected):
  events = []

  def fetch(item):
    i, array = item
    events.append(f"fetch {i}")
    return device_outputs.to_host(array)

  fetched = list(device_outputs.fetched_in_order(_dispatching(events, 3), fetch, ahead=ahead))
  assert events == expected
  for i, array in enumerate(fetched):
    assert isinstance(array, np.ndarray)
    np.testing.assert_array_equal(array, [i, i])


def test_to_host_fetches_a_whole_tree_and_nothing_is_lost():
  tree = {"features": jnp.arange(6.0).reshape(3, 2), "mask": jnp.array([True, False, True])}
  host = device_outputs.to_host(tree)
  assert all(isinstance(v, np.ndarray) for v in host.values())
  np.testing.assert_array_equal(host["features"][host["mask"]], [[0.0, 1.0], [4.0, 5.0]])
  assert list(device_outputs.fetched_in_order(iter([]), lambda item: item)) == []
  with pytest.raises(ValueError, match="ahead must be >= 0"):
    list(device_outputs.fetched_in_order(iter([1]), lambda item: item, ahead=-1))
