"""Anchors, candidates and candidate sets of each variant, on one device or gathered over a mesh.

A :class:`Layout` holds the L2-normalised anchors ``q`` (R, d) and candidates ``k`` (C, d), the
positive cosine of every anchor, the metadata :func:`_reduce.candidate_mask` needs, and the
anchor mask. With ``axis_name`` the local rows are the anchors and the candidates are gathered
from every device (``all_gather(tiled=True)``, whose transpose is a reduce-scatter, so each
device's rows receive the gradient of every device's anchors). Column ids are global.

Candidate sets ("negatives" mode, the CL-DRO negatives):
  image     anchors concat(z1, z2) (2B), candidates concat(z1, z2); anchor i excludes itself and
            its pair p(i) = (i + B) mod 2B: 2B - 2 negatives.
  sentence  anchors z1, candidates z2, j != i: B - 1 negatives.
  graph     same as sentence.
"loss" mode differs only for sentence: SimCSE keeps the positive j = i inside the set (B terms).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from cldro_jax.losses import _common


class Layout(NamedTuple):
  q: jax.Array                 # (R, d) anchors, unit rows
  k: jax.Array                 # (C, d) candidates, unit rows (gathered over axis_name)
  pos_cos: jax.Array           # (R,) cosine of each anchor with its positive
  rows: dict                   # candidate_mask row metadata
  cols: dict                   # candidate_mask column metadata
  anchor_valid: jax.Array | None  # (R,) bool, None when every row is valid
  positive_in_set: bool        # the positive is one of the set's members (sentence, loss mode)


def _gather(x, axis_name):
  if axis_name is None:
    return replicated(x)
  return jax.lax.all_gather(x, axis_name, tiled=True)


def replicated(x):
  """``x`` whole on every device when it is split over Explicit mesh axes, else unchanged.

  Under ``jax.set_mesh`` with Explicit axes (``jax.make_mesh``'s default since jax 0.9) a
  batch-sharded ``q @ k.T`` with both sides split over "data" has no legal sharding and raises
  ``ShardingTypeError``; gathering the candidates gives the anchors-split layout that the
  shard_map path computes. Auto and unsharded arrays carry no axes in their type: a no-op.
  """
  sharding = jax.typeof(x).sharding
  spec = getattr(sharding, "spec", None)
  if spec is None or all(axis is None for axis in spec):
    return x
  # The array's own (abstract) mesh, so that no `jax.set_mesh` context is needed.
  return jax.sharding.reshard(
      x, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec()))


def axis_size(axis_name) -> int:
  if axis_name is None:
    return 1
  try:
    return jax.lax.axis_size(axis_name)
  except NameError as err:
    raise ValueError(
        f"axis_name={axis_name!r} is not a bound mesh axis: call the loss inside "
        f"jax.shard_map(..., mesh=mesh, in_specs=P({axis_name!r}), ...) over a mesh with that "
        "axis, or pass axis_name=None on one device.") from err


def validate(z1, z2, variant, valid, labels, axis_name) -> jnp.dtype:
  """Checks the inputs; returns the dtype the loss computes in (for the hyperparameter checks)."""
  _common.check_views(z1, z2)
  _common.check_variant(variant)
  batch = z1.shape[0]
  _common.check_row_array(valid, "valid", batch, "bool")
  _common.check_row_array(labels, "labels", batch, "int")
  _common.check_enough_rows(batch, axis_size(axis_name), valid)
  return _common.compute_dtype(jnp.promote_types(z1.dtype, z2.dtype))


def build(z1, z2, *, variant: str, valid=None, labels=None, axis_name=None,
          mode: str = "loss") -> Layout:
  """The layout of ``variant``; ``mode="negatives"`` leaves SimCSE's positive out of the set."""
  dtype = _common.compute_dtype(jnp.promote_types(z1.dtype, z2.dtype))
  z1n = _common.l2_normalize_rows(z1.astype(dtype))
  z2n = _common.l2_normalize_rows(z2.astype(dtype))
  # Both views of a pair always live on the same device, so the positive needs no gather.
  pos_cos = jnp.sum(z1n * z2n, axis=-1)

  local_batch = z1.shape[0]
  global_batch = local_batch * axis_size(axis_name)
  offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * local_batch
  local_ids = offset + jnp.arange(local_batch, dtype=jnp.int32)
  g_valid = None if valid is None else _gather(valid, axis_name)
  g_labels = None if labels is None else _gather(labels, axis_name)

  if variant == "image":
    q = jnp.concatenate([z1n, z2n])
    k = jnp.concatenate([_gather(z1n, axis_name), _gather(z2n, axis_name)])
    self_ids = jnp.concatenate([local_ids, local_ids + global_batch])
    pair_ids = jnp.concatenate([local_ids + global_batch, local_ids])
    rows = {"ex1": self_ids, "ex2": pair_ids, "pos": pair_ids}
    cols = {"idx": jnp.arange(2 * global_batch, dtype=jnp.int32)}
    pos_cos = jnp.concatenate([pos_cos, pos_cos])
    anchor_valid = None if valid is None else jnp.concatenate([valid, valid])
    if valid is not None:
      cols["valid"] = jnp.concatenate([g_valid, g_valid])
    if labels is not None:
      rows["label"] = jnp.concatenate([labels, labels])
      cols["label"] = jnp.concatenate([g_labels, g_labels])
    positive_in_set = False
  else:
    q, k = z1n, _gather(z2n, axis_name)
    positive_in_set = variant == "sentence" and mode == "loss"
    excluded = jnp.full_like(local_ids, -1) if positive_in_set else local_ids
    rows = {"ex1": excluded, "ex2": excluded, "pos": local_ids}
    cols = {"idx": jnp.arange(global_batch, dtype=jnp.int32)}
    anchor_valid = valid
    if valid is not None:
      cols["valid"] = g_valid
    if labels is not None:
      rows["label"] = labels
      cols["label"] = g_labels
  return Layout(q, k, pos_cos, rows, cols, anchor_valid, positive_in_set)


def anchor_weight(layout: Layout, n_negatives: jax.Array) -> jax.Array:
  """Anchors that count in the mean: valid ones with at least one negative.

  An anchor left without negatives (every candidate masked by `valid`/`labels`) carries no
  contrastive signal; it is dropped from the mean rather than contributing a constant.
  """
  has_negative = n_negatives > 0
  return has_negative if layout.anchor_valid is None else has_negative & layout.anchor_valid


def global_mean(per_anchor: jax.Array, weight: jax.Array, axis_name) -> jax.Array:
  """Mean over the weighted anchors of every device; 0 (zero gradient) when none is left.

  Sums and counts are psum-ed separately, so every device returns the same global mean and its
  gradient needs no rescaling (psum of a device-varying value transposes to the identity).
  """
  total = jnp.sum(jnp.where(weight, per_anchor, 0.0))
  count = jnp.sum(weight, dtype=per_anchor.dtype)
  if axis_name is not None:
    total, count = jax.lax.psum((total, count), axis_name)
  return total / jnp.maximum(count, 1.0)


def as_param(x, dtype) -> jax.Array:
  return jnp.asarray(x, dtype=dtype)
