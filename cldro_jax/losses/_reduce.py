"""Row reductions over a similarity matrix: the one kernel every loss is built on.

Every loss of the library is a function of a few per-anchor reductions of elementwise functions
of the cosine matrix ``S = Q K^T`` (anchors Q, candidates K), restricted to each anchor's
candidate set (a mask):

    lse_i  = log sum_{j in set(i)} exp(f(S_ij))      kind "lse"
    sum_i  = sum_{j in set(i)} f(S_ij)               kind "sum"
    max_i / min_i                                    kinds "max", "min" (forward only)

plus the set sizes ``count_i``. ``row_reduce`` computes them either densely (the full R x C
matrix, differentiated by ordinary autodiff) or in column blocks (``block_size``): a
``lax.scan`` streams over blocks of K keeping running (max, sum) pairs for each logsumexp, and a
``jax.custom_vjp`` recomputes each block in the backward pass (flash-attention style). The
backward scan differentiates the block's elementwise functions with ``jax.vjp``, so
stop-gradients inside ``stats_fn`` (ADNCE's weights) and differentiable hyperparameters (the
temperature, HCL's beta) are handled exactly as in the dense path. Only O(R * block_size + (R + C)
* d) memory is live in either pass; no R x C array and no per-block residual is stored.

Why a custom_vjp rather than ``jax.checkpoint`` around a scanned body: the scan's own VJP would
save the running accumulators of every block, R x (C / block_size) numbers, which is quadratic
in the batch; the custom rule saves only the final (R,) reductions.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from cldro_jax.losses._common import NEG_FILL

KINDS = ("lse", "sum", "max", "min")
StatsFn = Callable[[jax.Array, Mapping[str, jax.Array]], Sequence[jax.Array]]


def candidate_mask(rows: Mapping[str, jax.Array], cols: Mapping[str, jax.Array]) -> jax.Array:
  """(R, c) bool: column j is in anchor i's candidate set.

  rows: ``ex1``, ``ex2`` (R,) column ids never in the set (self, positive, or -1 for none),
  ``pos`` (R,) the positive's column (kept even when it shares the anchor's label), optional
  ``label`` (R,). cols: ``idx`` (c,) global column ids, optional ``valid`` (c,) and ``label``.
  """
  idx = cols["idx"][None, :]
  mask = (idx != rows["ex1"][:, None]) & (idx != rows["ex2"][:, None])
  if "valid" in cols:
    mask = mask & cols["valid"][None, :]
  if "label" in rows:
    # Same-label candidates are false negatives (the oracle / supervised setting): removed,
    # except the anchor's own positive where the variant keeps it inside the set (SimCSE).
    # A negative label marks an unlabelled row (-1, as the data sources write it): it shares a
    # class with nothing, so two unlabelled rows stay each other's negatives.
    other_label = ((rows["label"][:, None] != cols["label"][None, :])
                   | (rows["label"][:, None] < 0))
    mask = mask & (other_label | (idx == rows["pos"][:, None]))
  return mask


def _fill(kind: str) -> float:
  return {"lse": NEG_FILL, "sum": 0.0, "max": NEG_FILL, "min": -NEG_FILL}[kind]


def _reduce(kind: str, x: jax.Array) -> jax.Array:
  if kind == "lse":
    return jax.nn.logsumexp(x, axis=-1)
  return {"sum": jnp.sum, "max": jnp.max, "min": jnp.min}[kind](x, axis=-1)


def count_without_labels(rows, cols, n_cols, dtype):
  """Candidate counts in O(R) when no labels are given: valid columns minus the excluded ones.

  Saves a full R x C pass (the mask sum) in the dense path.
  """
  valid = cols.get("valid")

  def is_valid_column(ids):
    inside = (ids >= 0) & (ids < n_cols)
    if valid is None:
      return inside
    return inside & valid[jnp.clip(ids, 0, n_cols - 1)]

  total = n_cols if valid is None else jnp.sum(valid)
  excluded = (is_valid_column(rows["ex1"]).astype(dtype)
              + (is_valid_column(rows["ex2"]) & (rows["ex2"] != rows["ex1"])).astype(dtype))
  return jnp.asarray(total, dtype) - excluded


def _dense(stats_fn, kinds, q, k, rows, cols, params):
  sim = q @ k.T
  mask = candidate_mask(rows, cols)
  values = stats_fn(sim, params)
  outs = tuple(_reduce(kind, jnp.where(mask, v, _fill(kind))) for kind, v in zip(kinds, values))
  if "label" in rows:
    count = jnp.sum(mask, axis=-1, dtype=q.dtype)
  else:
    count = count_without_labels(rows, cols, k.shape[0], q.dtype)
  return outs, count


# ----------------------------------------------------------------------------- blockwise path
def _block_values(stats_fn, q, k_block, params):
  return tuple(stats_fn(q @ k_block.T, params))


def _init_acc(kind: str, like: jax.Array):
  # `like * 0` rather than zeros(): inside shard_map the accumulator must carry the same
  # device-variance type as the per-block updates that are added to it.
  base = like * 0
  if kind == "lse":
    return (base + NEG_FILL, base)
  return base + _fill(kind)


def _update_acc(kind: str, acc, block: jax.Array):
  if kind == "lse":
    run_max, run_sum = acc
    new_max = jnp.maximum(run_max, jnp.max(block, axis=-1))
    run_sum = run_sum * jnp.exp(run_max - new_max) + jnp.sum(jnp.exp(block - new_max[:, None]), -1)
    return (new_max, run_sum)
  return {"sum": jnp.add, "max": jnp.maximum, "min": jnp.minimum}[kind](acc, _reduce(kind, block))


def _finish_acc(kind: str, acc):
  if kind == "lse":
    run_max, run_sum = acc
    return run_max + jnp.log(run_sum)  # run_sum >= 1: the running max contributes exp(0)
  return acc


def _at_precision(precision: str | None):
  """The matmul precision the loss was called with, for code JAX traces later: a custom_vjp's
  backward pass is traced after the caller's `jax.default_matmul_precision` block has closed."""
  return (contextlib.nullcontext() if precision is None
          else jax.default_matmul_precision(precision))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _blockwise(stats_fn, kinds, precision, q, k_blocks, rows, col_blocks, params):
  del precision  # the primal is traced inside the caller's precision context
  outs, count = _blockwise_fwd_pass(stats_fn, kinds, q, k_blocks, rows, col_blocks, params)
  return outs, count


def _blockwise_fwd_pass(stats_fn, kinds, q, k_blocks, rows, col_blocks, params):
  row_like = q[:, 0]

  def body(carry, block):
    accs, count = carry
    k_block, cols = block
    mask = candidate_mask(rows, cols)
    values = _block_values(stats_fn, q, k_block, params)
    accs = tuple(_update_acc(kind, acc, jnp.where(mask, v, _fill(kind)))
                 for kind, acc, v in zip(kinds, accs, values))
    return (accs, count + jnp.sum(mask, axis=-1, dtype=q.dtype)), None

  init = (tuple(_init_acc(kind, row_like) for kind in kinds), row_like * 0)
  (accs, count), _ = jax.lax.scan(body, init, (k_blocks, col_blocks))
  return tuple(_finish_acc(kind, acc) for kind, acc in zip(kinds, accs)), count


def _blockwise_fwd(stats_fn, kinds, precision, q, k_blocks, rows, col_blocks, params):
  with _at_precision(precision):
    outs, count = _blockwise_fwd_pass(stats_fn, kinds, q, k_blocks, rows, col_blocks, params)
  return (outs, count), (q, k_blocks, rows, col_blocks, params, outs)


def _blockwise_bwd(stats_fn, kinds, precision, residuals, cotangents):
  with _at_precision(precision):
    return _blockwise_bwd_pass(stats_fn, kinds, residuals, cotangents)


def _blockwise_bwd_pass(stats_fn, kinds, residuals, cotangents):
  q, k_blocks, rows, col_blocks, params, outs = residuals
  d_outs, _ = cotangents  # the counts are integers in disguise: no gradient
  if any(kind not in ("lse", "sum") for kind in kinds):
    raise NotImplementedError("max/min row reductions are forward-only (diagnostics); wrap "
                              "their inputs in jax.lax.stop_gradient.")

  def body(carry, block):
    d_q, d_params = carry
    k_block, cols = block
    mask = candidate_mask(rows, cols)
    values, vjp = jax.vjp(functools.partial(_block_values, stats_fn), q, k_block, params)
    d_values = []
    for kind, v, out, d_out in zip(kinds, values, outs, d_outs):
      if kind == "lse":  # d lse / d v_ij = softmax_j(v_ij) = exp(v_ij - lse_i)
        weight = jnp.exp(jnp.where(mask, v, NEG_FILL) - out[:, None])
      else:
        weight = mask.astype(v.dtype)
      d_values.append(jnp.where(mask, weight * d_out[:, None], 0.0))
    dq_block, dk_block, dparams_block = vjp(tuple(d_values))
    d_params = jax.tree.map(jnp.add, d_params, dparams_block)
    return (d_q + dq_block, d_params), dk_block

  init = (q * 0, jax.tree.map(lambda p: p * 0, params))
  (d_q, d_params), d_k_blocks = jax.lax.scan(body, init, (k_blocks, col_blocks))
  return d_q, d_k_blocks, None, None, d_params


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def _split_columns(k, cols, block_size):
  """Pads the candidates to whole blocks (padding columns are invalid) and splits them."""
  n_cols = k.shape[0]
  n_blocks = -(-n_cols // block_size)
  pad = n_blocks * block_size - n_cols
  cols = dict(cols)
  if pad or "valid" in cols:
    valid = cols.get("valid", jnp.ones((n_cols,), bool))
    cols["valid"] = jnp.pad(valid, (0, pad), constant_values=False)
  cols["idx"] = jnp.pad(cols["idx"], (0, pad), constant_values=-2)  # -2 matches no ex1/ex2/pos
  if "label" in cols:
    cols["label"] = jnp.pad(cols["label"], (0, pad))
  k = jnp.pad(k, ((0, pad), (0, 0)))
  k_blocks = k.reshape(n_blocks, block_size, k.shape[1])
  col_blocks = {name: c.reshape(n_blocks, block_size) for name, c in cols.items()}
  return k_blocks, col_blocks


def row_reduce(stats_fn: StatsFn, kinds: Sequence[str], q: jax.Array, k: jax.Array,
               rows: Mapping[str, jax.Array], cols: Mapping[str, jax.Array],
               params: Mapping[str, jax.Array], block_size: int | None = None):
  """Per-anchor reductions of ``stats_fn(Q K^T, params)`` over each anchor's candidate set.

  Args:
    stats_fn: maps the (R, c) cosine block and ``params`` to a sequence of (R, c) arrays, one per
      entry of ``kinds``; must be elementwise along columns (it sees one block at a time).
    kinds: one of "lse", "sum", "max", "min" per statistic.
    q, k: (R, d) anchors and (C, d) candidates (already L2-normalised).
    rows, cols: metadata for :func:`candidate_mask`; ``cols["idx"]`` are the column ids.
    params: dict of scalar arrays the statistics depend on (differentiable).
    block_size: None for the dense path, else the number of columns per block.

  Returns:
    (tuple of (R,) reductions, (R,) candidate counts in q's dtype).
  """
  kinds = tuple(kinds)
  if any(kind not in KINDS for kind in kinds):
    raise ValueError(f"unknown reduction kind in {kinds}; use {KINDS}.")
  if block_size is None:
    return _dense(stats_fn, kinds, q, k, rows, cols, params)
  block_size = min(int(block_size), k.shape[0])
  k_blocks, col_blocks = _split_columns(k, cols, block_size)
  # The ambient matmul precision, read now: the backward pass is traced outside the caller's
  # `with jax.default_matmul_precision(...)` and must use the same one as the forward.
  precision = jax.config.jax_default_matmul_precision
  outs, count = _blockwise(stats_fn, kinds, precision, q, k_blocks, dict(rows), col_blocks,
                           dict(params))
  if "label" not in rows:  # same numbers; lets XLA drop the per-block mask sums
    count = count_without_labels(rows, cols, k.shape[0], q.dtype)
  return outs, count
