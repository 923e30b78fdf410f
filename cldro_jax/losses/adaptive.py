"""Adaptive ADNCE: mu and sigma moved by explicit rules from the current negatives.

ADNCE's Gaussian weights are stop-gradient, so the loss gives mu and sigma no gradient; the
paper leaves choosing them adaptively open. Here they follow statistics of the batch's negative
cosines (the variant's negatives, as in :func:`cldro_jax.losses.diagnostics`), recomputed every
step and stop-gradient:

  mu_rule     "fixed"     mu as given
              "quantile"  the ``mu_quantile`` quantile of all (anchor, negative) cosines: the
                          Gaussian's peak follows the hard end of the current negatives as the
                          embedding spreads out (NumPy's default linear interpolation)
  sigma_rule  "fixed"     sigma as given
              "std"       ``sigma_scale`` x the standard deviation of those cosines, floored at
                          ``MIN_SIGMA``: the weights' width follows the spread of the negatives

Under ``axis_name`` (inside ``jax.shard_map``) the standard deviation is exact over the global
batch (sums are psum-ed); the quantile is each device's quantile over its own anchors' rows
(against every gathered candidate), averaged over devices weighted by their number of (anchor,
negative) pairs (a device holding only padding counts for nothing): exact on one device and a
consistent estimate otherwise (an exact global quantile would gather the whole (2B)^2 similarity
matrix). With no (anchor, negative) pair at all, "quantile" returns the given mu and "std"
returns MIN_SIGMA (the loss is 0 then, whatever the weights).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from cldro_jax.losses import _common, _layout
from cldro_jax.losses._reduce import candidate_mask

MU_RULES = ("fixed", "quantile")
SIGMA_RULES = ("fixed", "std")
# A zero spread (all negatives identical) would make the Gaussian's 1/sigma^2 infinite.
MIN_SIGMA = 1e-3


def check_rules(mu_rule: str, sigma_rule: str, mu_quantile, sigma_scale) -> None:
  """Raises ValueError naming the allowed values when a rule or its parameter is invalid."""
  if mu_rule not in MU_RULES:
    raise ValueError(f"mu_rule must be one of {MU_RULES}, got {mu_rule!r}.")
  if sigma_rule not in SIGMA_RULES:
    raise ValueError(f"sigma_rule must be one of {SIGMA_RULES}, got {sigma_rule!r}.")
  q = _common.concrete_scalar(mu_quantile, "mu_quantile")
  if q is not None and not 0.0 <= q <= 1.0:
    raise ValueError(f"mu_quantile must lie in [0, 1], got {q}; e.g. mu_quantile=0.9.")
  _common.check_positive(sigma_scale, "sigma_scale")


def _masked_quantile(values: jax.Array, mask: jax.Array, q) -> jax.Array:
  """The q-quantile of values[mask] with linear interpolation (numpy.quantile's default)."""
  # Whole on every device when split over Explicit mesh axes: a sort needs its axis unsplit.
  flat = _layout.replicated(jnp.where(mask, values, jnp.inf).reshape(-1))
  ordered = jnp.sort(flat)                     # masked entries sort last
  count = jnp.sum(mask)
  position = q * (jnp.maximum(count, 1) - 1).astype(values.dtype)
  lower = jnp.floor(position)
  frac = position - lower
  lo = jnp.take(ordered, lower.astype(jnp.int32))
  hi = jnp.take(ordered, jnp.minimum(lower.astype(jnp.int32) + 1, jnp.maximum(count, 1) - 1))
  return lo + frac * (hi - lo)


@_common.nan_when_traced_out_of_range
def adaptive_mu_sigma(z1, z2, *, mu, sigma, mu_rule="fixed", mu_quantile=0.9,
                      sigma_rule="fixed", sigma_scale=1.0, variant="image", valid=None,
                      labels=None, axis_name=None):
  """ADNCE's (mu, sigma) for this batch under the rules (see the module docstring).

  Args:
    z1, z2: (B, d) raw projections, as for :func:`cldro_jax.losses.adnce`.
    mu, sigma: the fixed values (used by the "fixed" rules).
    mu_rule, mu_quantile, sigma_rule, sigma_scale: the rules and their parameters.
    variant, valid, labels, axis_name: as the losses; negatives are the variant's.

  Returns:
    (mu, sigma) as stop-gradient scalar arrays, identical on every device under ``axis_name``.
  """
  dtype = _layout.validate(z1, z2, variant, valid, labels, axis_name)
  check_rules(mu_rule, sigma_rule, mu_quantile, sigma_scale)
  _common.check_real(mu, "mu", dtype)
  _common.check_positive(sigma, "sigma", dtype)
  z1, z2 = jax.lax.stop_gradient(z1), jax.lax.stop_gradient(z2)
  layout = _layout.build(z1, z2, variant=variant, valid=valid, labels=labels,
                         axis_name=axis_name, mode="negatives")
  dtype = layout.q.dtype
  sim = layout.q @ layout.k.T
  mask = candidate_mask(layout.rows, layout.cols)
  if layout.anchor_valid is not None:
    mask = mask & layout.anchor_valid[:, None]

  out_mu = jnp.asarray(mu, dtype)
  if mu_rule == "quantile":
    local = _masked_quantile(sim, mask, jnp.asarray(mu_quantile, dtype))
    count = jnp.sum(mask, dtype=dtype)
    # A device (or batch) without a single (anchor, negative) pair has no quantile: its padding
    # rows would otherwise give inf - inf = NaN. Devices weigh by their number of pairs; with no
    # pair anywhere the loss is 0 whatever mu is, and the given mu is returned.
    weighted = jnp.where(count > 0, local, 0.0) * count
    if axis_name is not None:
      weighted, count = jax.lax.psum((weighted, count), axis_name)
    out_mu = jnp.where(count > 0, weighted / jnp.maximum(count, 1.0), out_mu)

  out_sigma = jnp.asarray(sigma, dtype)
  if sigma_rule == "std":
    # Pooled moments of every (anchor, negative) cosine; two passes for accuracy.
    count = jnp.sum(mask, dtype=dtype)
    total = jnp.sum(jnp.where(mask, sim, 0.0))
    if axis_name is not None:
      count, total = jax.lax.psum((count, total), axis_name)
    mean = total / jnp.maximum(count, 1.0)
    sq = jnp.sum(jnp.where(mask, jnp.square(sim - mean), 0.0))
    if axis_name is not None:
      sq = jax.lax.psum(sq, axis_name)
    std = jnp.sqrt(sq / jnp.maximum(count, 1.0))
    out_sigma = jnp.maximum(jnp.asarray(sigma_scale, dtype) * std, MIN_SIGMA)
  return jax.lax.stop_gradient(out_mu), jax.lax.stop_gradient(out_sigma)
