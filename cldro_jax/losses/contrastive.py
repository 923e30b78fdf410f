"""InfoNCE, ADNCE, DCL and HCL, in the forms of the authors' reference code.

All functions take the raw projections ``z1, z2`` (B, d) of the two views (row i of each is the
same example), L2-normalise the rows inside, and return the scalar mean loss over anchors. With
``s_ij`` the cosine, ``t`` the temperature and ``set(i)`` the candidate set of the variant (see
``docs/losses.md``):

  image     L_i = -s_ip/t + log( exp(s_ip/t) + sum_{j in N(i)} w_ij exp(s_ij/t) )
  sentence  L_i = -s_ii/t + log( sum_{j} w_ij exp(s_ij/t) )          (positive inside the sum)
  graph     L_i = -s_ii/t + log( mean_{j != i} w_ij exp(s_ij/t) )

with w = 1 for InfoNCE and, for ADNCE, ``w_ij = sg(g_ij / mean_{k in set(i)} g_ik)``,
``g = exp(-(s - mu)^2 / (2 sigma^2))``. Everything is evaluated in the log domain:
``log sum_j w_ij exp(s_ij/t) = LSE_j(s_ij/t + log g_ij) - LSE_k(log g_ik) + log N_i``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from cldro_jax.losses import _common, _layout
from cldro_jax.losses._reduce import row_reduce


# Elementwise statistics, module-level so that the blockwise custom_vjp sees the same function
# object on every call (they are static arguments).
def _logits(sim, params):
  return (sim * params["inv_t"],)


def _gaussian_log_weight(sim, params):
  """log g(s) of ADNCE, stop-gradient: the weights are constants of the backward pass."""
  sim = jax.lax.stop_gradient(sim)
  return jax.lax.stop_gradient(
      _common.gaussian_log_weight(sim, params["mu"], params["half_inv_var"]))


def _adnce_stats(sim, params):
  log_g = _gaussian_log_weight(sim, params)
  return (sim * params["inv_t"] + log_g, log_g)


@dataclasses.dataclass(frozen=True)
class _WeightedStats:
  """The statistics of `weighted_nce` for one user log-weight function. Equal (and hashing
  equal) for the same function, so the blockwise path's static argument hits JAX's caches on
  every call without a cache of ours holding the functions."""
  log_weight: Callable[[jax.Array, Mapping], jax.Array]

  def __call__(self, sim, params):
    log_w = jax.lax.stop_gradient(self.log_weight(jax.lax.stop_gradient(sim), params))
    return (sim * params["inv_t"] + log_w, log_w)


def _hcl_stats(sim, params):
  # imp_ij = exp(beta s_ij / t) is differentiated, as in the reference (no detach).
  scaled = sim * params["inv_t"]
  return (scaled * (1.0 + params["beta"]), scaled * params["beta"])


def _log_weighted_sum(z1, z2, *, temperature, mu, sigma, variant, valid, labels, axis_name,
                      block_size, log_weight=None, weight_params=None):
  """Shared core of InfoNCE, ADNCE and `weighted_nce`: per-anchor log sum_j w_ij exp(s_ij/t)
  and the layout."""
  layout = _layout.build(z1, z2, variant=variant, valid=valid, labels=labels,
                         axis_name=axis_name, mode="loss")
  dtype = layout.q.dtype
  params = {"inv_t": 1.0 / _layout.as_param(temperature, dtype)}
  if log_weight is not None:
    params.update({key: _layout.as_param(value, dtype) for key, value in weight_params.items()})
    stats = _WeightedStats(log_weight)
  elif mu is not None:
    sigma = _layout.as_param(sigma, dtype)
    params["mu"] = _layout.as_param(mu, dtype)
    params["half_inv_var"] = 0.5 / jnp.square(sigma)
    stats = _adnce_stats
  else:
    (lse,), count = row_reduce(_logits, ("lse",), layout.q, layout.k, layout.rows, layout.cols,
                               params, block_size)
    return layout, params, lse, count
  (lse, lse_w), count = row_reduce(stats, ("lse", "lse"), layout.q, layout.k, layout.rows,
                                   layout.cols, params, block_size)
  # w = g / mean(g): log of the row-mean normaliser is LSE(log g) - log N.
  log_sum = lse - (lse_w - jnp.log(jnp.maximum(count, 1.0)))
  return layout, params, log_sum, count


def _nce_from_log_sum(layout, params, log_sum, count, variant, axis_name):
  pos_logit = layout.pos_cos * params["inv_t"]
  log_count = jnp.log(jnp.maximum(count, 1.0))
  if variant == "image":
    # log(1 + sum/exp(pos)) as softplus: `logaddexp(pos, sum) - pos` rounds at ulp(1/t) and
    # loses the relative precision of a small loss.
    per_anchor = jax.nn.softplus(log_sum - pos_logit)
    n_negatives = count
  elif variant == "sentence":
    per_anchor = log_sum - pos_logit
    n_negatives = count - 1.0  # the set holds the positive too
  else:  # graph: mean over the negatives, positive excluded
    per_anchor = log_sum - log_count - pos_logit
    n_negatives = count
  weight = _layout.anchor_weight(layout, n_negatives)
  return _layout.global_mean(per_anchor, weight, axis_name)


@_common.nan_when_traced_out_of_range
def infonce(z1, z2, *, temperature, variant="image", valid=None, labels=None, axis_name=None,
            block_size=None):
  """InfoNCE / NT-Xent of the variant (image: SimCLR's 2B anchors; sentence: SimCSE's
  cross-entropy over the B x B logits; graph: the authors' mean form, GraphCL - log(B-1)).

  Args:
    z1, z2: (B, d) raw projections of the two views (B = local rows under ``axis_name``).
    temperature: t > 0, a Python number (checked: raises) or a (traced) scalar array (out of
      range: the result and its gradient are NaN).
    variant: "image", "sentence" or "graph".
    valid: optional (B,) bool; invalid rows are neither anchors nor negatives.
    labels: optional (B,) int; same-label candidates are removed from the negatives (a
      negative label marks an unlabelled row, the same class as nothing).
    axis_name: mesh axis (or tuple of axes) the batch is split over inside ``jax.shard_map``;
      negatives are then gathered from every device and every device returns the same global
      mean.
    block_size: None (dense) or the number of candidate columns per block (memory-bounded path).

  Returns:
    Scalar mean loss over valid anchors that have at least one negative (0 if none).
  """
  dtype = _layout.validate(z1, z2, variant, valid, labels, axis_name)
  _common.check_temperature(temperature, dtype)
  _common.check_block_size(block_size)
  layout, params, log_sum, count = _log_weighted_sum(
      z1, z2, temperature=temperature, mu=None, sigma=None, variant=variant, valid=valid,
      labels=labels, axis_name=axis_name, block_size=block_size)
  return _nce_from_log_sum(layout, params, log_sum, count, variant, axis_name)


@_common.nan_when_traced_out_of_range
def adnce(z1, z2, *, temperature, mu, sigma, variant="image", valid=None, labels=None,
          axis_name=None, block_size=None):
  """ADNCE: InfoNCE with Gaussian stop-gradient weights on the candidates (Wu et al. 2023).

  ``w_ij = g(s_ij) / mean_{k in set(i)} g(s_ik)``, ``g(s) = exp(-(s - mu)^2 / (2 sigma^2))`` on the
  raw cosine (mu on the [-1, 1] scale), stop-gradient. The set is the variant's: image the 2B-2
  negatives (positive added with weight 1), sentence all B columns (positive included), graph
  the B-1 negatives (mean form). A huge sigma gives InfoNCE. Other arguments as :func:`infonce`.
  """
  dtype = _layout.validate(z1, z2, variant, valid, labels, axis_name)
  _common.check_temperature(temperature, dtype)
  _common.check_positive(sigma, "sigma", dtype)
  _common.check_real(mu, "mu", dtype)
  _common.check_block_size(block_size)
  layout, params, log_sum, count = _log_weighted_sum(
      z1, z2, temperature=temperature, mu=mu, sigma=sigma, variant=variant, valid=valid,
      labels=labels, axis_name=axis_name, block_size=block_size)
  return _nce_from_log_sum(layout, params, log_sum, count, variant, axis_name)


@_common.nan_when_traced_out_of_range
def weighted_nce(z1, z2, *, temperature, log_weight: Callable[[jax.Array, Mapping], jax.Array],
                 weight_params: Mapping[str, Any] | None = None, variant="image", valid=None,
                 labels=None, axis_name=None, block_size=None):
  """InfoNCE with stop-gradient candidate weights of your choosing: ADNCE's form, any weighting.

  ``w_ij = sg(g_ij / mean_{k in set(i)} g_ik)`` with ``log g_ij = log_weight(s_ij, params)``,
  ``s_ij`` the raw cosine and ``params`` holding ``weight_params`` (scalars, as arrays in the
  loss's dtype) and ``"inv_t"`` (1/t). The set, the positive's place and the reduction are the
  variant's, as :func:`adnce`; so are ``valid``, ``labels``, ``axis_name`` (negatives from every
  device) and ``block_size`` (the memory-bounded path). ADNCE is ``log_weight = lambda s, p:
  -(s - p["mu"]) ** 2 / (2 * p["sigma"] ** 2)`` with ``weight_params=dict(mu=mu, sigma=sigma)``.

  Args:
    log_weight: elementwise ``(cosines (R, c), params) -> log weights (R, c)``; it sees one block
      of columns at a time on the blockwise path. Define it once (at module level, not a lambda
      made per call): the blockwise path compiles per function, so it must also be hashable (a
      function, or a frozen dataclass). It need not be normalised (a constant cancels) and must
      be finite where the cosines are.
    weight_params: the scalars ``log_weight`` reads (Python numbers or arrays; arrays can be
      traced, e.g. a schedule, without recompiling).
    Others as :func:`infonce`.
  """
  dtype = _layout.validate(z1, z2, variant, valid, labels, axis_name)
  _common.check_temperature(temperature, dtype)
  _common.check_block_size(block_size)
  if not callable(log_weight):
    raise ValueError(f"log_weight must be a function (cosines, params) -> log weights, got "
                     f"{type(log_weight).__name__}")
  weight_params = dict(weight_params or {})
  if "inv_t" in weight_params:
    raise ValueError('weight_params may not be named "inv_t": the loss passes 1/t under it')
  layout, params, log_sum, count = _log_weighted_sum(
      z1, z2, temperature=temperature, mu=None, sigma=None, variant=variant, valid=valid,
      labels=labels, axis_name=axis_name, block_size=block_size, log_weight=log_weight,
      weight_params=weight_params)
  return _nce_from_log_sum(layout, params, log_sum, count, variant, axis_name)


def _log1m_scaled_exp(tau, c):
  """(log(1 - tau e^c), log(tau e^c)) for tau >= 0; the first is meaningful where tau e^c < 1.

  log1mexp of x = log tau + c, accurate on both sides of x = -log 2 (Maechler 2012), and
  differentiable at tau = 0: there the log-domain form's gradient is 0 * inf (exp(x) times
  d log(tau) / d tau) = NaN, while d/dtau log(1 - tau e^c) is simply -e^c. So for x <= -log 2
  the product tau e^c is formed directly (log1p), its exponent capped below float overflow
  (reached only where tau is subnormal); for -log 2 < x < 0, log(-expm1(x)).
  """
  positive = tau > 0
  x = jnp.where(positive, jnp.log(jnp.where(positive, tau, 1.0)) + c, -jnp.inf)
  near = (x > -jnp.log(2.0)) & (x < 0)
  far = x <= -jnp.log(2.0)
  near_value = jnp.log(-jnp.expm1(jnp.where(near, x, -1.0)))
  cap = math.log(float(jnp.finfo(c.dtype).max)) - 1.0
  far_value = jnp.log1p(-tau * jnp.exp(jnp.minimum(jnp.where(far, c, -jnp.inf), cap)))
  return jnp.where(near, near_value, far_value), x


@_common.nan_when_traced_out_of_range
def hcl(z1, z2, *, temperature, tau_plus, beta, valid=None, labels=None, axis_name=None,
        block_size=None):
  """HCL (Robinson et al. 2021), image form, as in the reference code.

  ``imp_ij = exp(beta s_ij / t)`` (differentiated),
  ``R_i = sum_j imp_ij exp(s_ij/t) / mean_j imp_ij`` over the 2B-2 negatives,
  ``Ng_i = max((R_i - tau_plus N_i pos_i) / (1 - tau_plus), N_i e^{-1/t})``,
  ``L_i = -log(pos_i / (pos_i + Ng_i))``, all in the log domain. N_i counts the anchor's negatives
  (2B-2 without masks). beta = 0 is DCL. Arguments as :func:`infonce`; tau_plus in [0, 1).
  """
  dtype = _layout.validate(z1, z2, "image", valid, labels, axis_name)
  _common.check_temperature(temperature, dtype)
  _common.check_tau_plus(tau_plus, dtype)
  _common.check_real(beta, "beta", dtype)
  _common.check_block_size(block_size)
  layout = _layout.build(z1, z2, variant="image", valid=valid, labels=labels,
                         axis_name=axis_name, mode="loss")
  dtype = layout.q.dtype
  params = {"inv_t": 1.0 / _layout.as_param(temperature, dtype)}
  if _common.concrete_scalar(beta, "beta") == 0.0:
    (log_r,), count = row_reduce(_logits, ("lse",), layout.q, layout.k, layout.rows,
                                 layout.cols, params, block_size)
    log_count = jnp.log(jnp.maximum(count, 1.0))
  else:
    params["beta"] = _layout.as_param(beta, dtype)
    (lse_a, lse_b), count = row_reduce(_hcl_stats, ("lse", "lse"), layout.q, layout.k,
                                       layout.rows, layout.cols, params, block_size)
    log_count = jnp.log(jnp.maximum(count, 1.0))
    log_r = lse_a - lse_b + log_count

  pos_logit = layout.pos_cos * params["inv_t"]
  if _common.concrete_scalar(tau_plus, "tau_plus") == 0.0:
    log_debiased = log_r  # no debiasing (and no log(0) = -inf on the way)
  else:
    tau_plus = _layout.as_param(tau_plus, dtype)
    # Debiased estimate (R - tau N pos) / (1 - tau), where positive: x = log(tau N pos / R) < 0.
    log1m, x = _log1m_scaled_exp(tau_plus, log_count + pos_logit - log_r)
    log_debiased = jnp.where(x < 0, log_r + log1m - jnp.log1p(-tau_plus), _common.NEG_FILL)
  log_ng = jnp.maximum(log_debiased, log_count - params["inv_t"])  # the clamp N e^{-1/t}
  per_anchor = jax.nn.softplus(log_ng - pos_logit)
  weight = _layout.anchor_weight(layout, count)
  return _layout.global_mean(per_anchor, weight, axis_name)


@_common.nan_when_traced_out_of_range
def dcl(z1, z2, *, temperature, tau_plus, valid=None, labels=None, axis_name=None,
        block_size=None):
  """DCL (Chuang et al. 2020), debiased contrastive loss, image form (M = 1): HCL with beta = 0.

  ``Ng_i = max((sum_j exp(s_ij/t) - tau_plus N_i pos_i) / (1 - tau_plus), N_i e^{-1/t})``;
  ``L_i = -log(pos_i / (pos_i + Ng_i))``. tau_plus = 0 gives image InfoNCE.
  """
  return hcl(z1, z2, temperature=temperature, tau_plus=tau_plus, beta=0.0, valid=valid,
             labels=labels, axis_name=axis_name, block_size=block_size)
