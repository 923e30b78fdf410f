"""The CL-DRO family (Section 3 of Wu et al. 2023) and cheap training diagnostics.

Contrastive learning as distributionally robust optimisation: for an anchor with positive
cosine ``f+`` and negatives ``f_j`` (empirical distribution Q0 over its N negatives),

  kl_dro         -f+ + t (log mean_j exp(f_j / t))            KL ball, dual multiplier alpha = t
  chi2_dro       -f+ + mean_j f_j + sqrt(eta Var_j f_j)         chi-square ball of radius eta
  mean_variance  -f+ + mean_j f_j + Var_j f_j / (2 t)           Theorem 3.5's approximation

each averaged over anchors. ``Var`` is the population variance under Q0 (divisor N). The
negatives are those of the variant (image: 2B-2 per anchor over concat(z1, z2); sentence and
graph: the B-1 columns j != i of the z1 x z2 matrix). Calling convention as the contrastive
losses (valid, labels, axis_name).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from cldro_jax.losses import _common, _layout
from cldro_jax.losses._reduce import candidate_mask, row_reduce


def _logits(sim, params):
  return (sim * params["inv_t"],)


@_common.nan_when_traced_out_of_range
def kl_dro(z1, z2, *, temperature, variant="image", valid=None, labels=None, axis_name=None,
           block_size=None):
  """KL-ball CL-DRO at its optimal multiplier: mean of ``-f+ + t (LSE(f_neg / t) - log N)``.

  Equals ``t * InfoNCE-without-positive - t log N`` (and ``t *`` graph InfoNCE exactly). The
  worst-case distribution is ``softmax(f_neg / t)``: InfoNCE's implicit negative weights.
  """
  dtype = _layout.validate(z1, z2, variant, valid, labels, axis_name)
  _common.check_temperature(temperature, dtype)
  _common.check_block_size(block_size)
  layout = _layout.build(z1, z2, variant=variant, valid=valid, labels=labels,
                         axis_name=axis_name, mode="negatives")
  temperature = _layout.as_param(temperature, layout.q.dtype)
  (lse,), count = row_reduce(_logits, ("lse",), layout.q, layout.k, layout.rows, layout.cols,
                             {"inv_t": 1.0 / temperature}, block_size)
  per_anchor = -layout.pos_cos + temperature * (lse - jnp.log(jnp.maximum(count, 1.0)))
  return _layout.global_mean(per_anchor, _layout.anchor_weight(layout, count), axis_name)


def _negative_moments(layout):
  """Per-anchor mean and population variance of the negatives' cosines (two-pass, exact)."""
  sim = layout.q @ layout.k.T
  mask = candidate_mask(layout.rows, layout.cols)
  count = jnp.sum(mask, axis=-1, dtype=sim.dtype)
  n = jnp.maximum(count, 1.0)
  mean = jnp.sum(jnp.where(mask, sim, 0.0), axis=-1) / n
  var = jnp.sum(jnp.where(mask, jnp.square(sim - mean[:, None]), 0.0), axis=-1) / n
  return mean, var, count


def _safe_sqrt(x):
  """sqrt with gradient 0 (not inf/NaN) at 0: all-identical negatives have zero variance."""
  positive = x > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


@_common.nan_when_traced_out_of_range
def chi2_dro(z1, z2, *, eta, variant="image", valid=None, labels=None, axis_name=None):
  """Chi-square-ball CL-DRO: mean of ``-f+ + mean(f_neg) + sqrt(eta Var(f_neg))``.

  The closed form of ``sup {E_Q f : E_Q0 (dQ/dQ0 - 1)^2 <= eta}``, valid while the worst-case
  weights ``1 + sqrt(eta / Var) (f - mean)`` stay non-negative (small eta). Dense only.
  """
  dtype = _layout.validate(z1, z2, variant, valid, labels, axis_name)
  _common.check_nonnegative(eta, "eta", dtype)
  layout = _layout.build(z1, z2, variant=variant, valid=valid, labels=labels,
                         axis_name=axis_name, mode="negatives")
  mean, var, count = _negative_moments(layout)
  eta = _layout.as_param(eta, layout.q.dtype)
  per_anchor = -layout.pos_cos + mean + _safe_sqrt(eta * var)
  return _layout.global_mean(per_anchor, _layout.anchor_weight(layout, count), axis_name)


@_common.nan_when_traced_out_of_range
def mean_variance(z1, z2, *, temperature, variant="image", valid=None, labels=None,
                  axis_name=None):
  """Mean-variance approximation of CL-DRO (Theorem 3.5): ``-f+ + mean + Var / (2 t)``. Dense."""
  dtype = _layout.validate(z1, z2, variant, valid, labels, axis_name)
  _common.check_temperature(temperature, dtype)
  layout = _layout.build(z1, z2, variant=variant, valid=valid, labels=labels,
                         axis_name=axis_name, mode="negatives")
  mean, var, count = _negative_moments(layout)
  temperature = _layout.as_param(temperature, layout.q.dtype)
  per_anchor = -layout.pos_cos + mean + var / (2.0 * temperature)
  return _layout.global_mean(per_anchor, _layout.anchor_weight(layout, count), axis_name)


# ------------------------------------------------------------------------------ diagnostics
def _diag_stats(sim, params):
  logits = sim * params["inv_t"]
  # Moments of s - c, c = the anchor's positive cosine (a per-row constant), not of s: near
  # collapse every cosine is close to c, where E[s^2] - E[s]^2 in float32 is all round-off.
  centred = sim - params["shift"]
  return (logits, 2.0 * logits, centred, jnp.square(centred))


_DIAG_KINDS = ("lse", "lse", "sum", "sum")


def _diag_stats_adnce(sim, params):
  log_g = _common.gaussian_log_weight(sim, params["mu"], params["half_inv_var"])
  return _diag_stats(sim, params) + (log_g, 2.0 * log_g, log_g, log_g)


_DIAG_KINDS_ADNCE = _DIAG_KINDS + ("lse", "lse", "max", "min")


def _global_max(x, weight, axis_name):
  out = jnp.max(jnp.where(weight, x, -jnp.inf))
  out = out if axis_name is None else jax.lax.pmax(out, axis_name)
  return jnp.where(jnp.isinf(out), 0.0, out)   # no anchor counts: 0, like the means


def _global_min(x, weight, axis_name):
  out = jnp.min(jnp.where(weight, x, jnp.inf))
  out = out if axis_name is None else jax.lax.pmin(out, axis_name)
  return jnp.where(jnp.isinf(out), 0.0, out)


@_common.nan_when_traced_out_of_range
def diagnostics(z1, z2, *, temperature, mu=None, sigma=None, variant="image", valid=None,
                labels=None, axis_name=None, block_size=None):
  """Per-batch CL-DRO statistics, stop-gradient, cheap enough for every logging step.

  One pass over the negatives of each anchor (dense, or in column blocks with ``block_size``).
  Every entry is a scalar averaged over the anchors that count in the loss (valid, >= 1
  negative), identical on every device under ``axis_name``; when no anchor counts, every entry
  is 0 (as the losses):

    eta_hat          Var(s_neg) / (2 t^2): the KL radius the temperature implies.
    mi_lower_bound   log K - InfoNCE with the positive in the denominator, K = the positive
                     plus the negatives (image 2B-1, sentence B, graph B; for graph this is
                     not the training loss, whose GraphCL form gives no bound).
    ess_infonce      (sum w)^2 / (N sum w^2) of InfoNCE's implicit weights softmax(s_neg / t).
    s_neg_mean, s_neg_var, s_pos_mean
    with mu and sigma (ADNCE's weight set of the variant; sentence includes the positive):
    ess_adnce, adnce_w_max, adnce_w_min (over all anchors and candidates), adnce_w_mean.
  The variance comes from sums of s - c and (s - c)^2 in the same pass, c = the anchor's
  positive cosine: about 1e-7 absolute in float32, and still accurate relative to
  the variance itself near collapse, where every cosine is close to c.
  """
  dtype = _layout.validate(z1, z2, variant, valid, labels, axis_name)
  _common.check_temperature(temperature, dtype)
  _common.check_block_size(block_size)
  with_adnce = mu is not None or sigma is not None
  if with_adnce:
    if mu is None or sigma is None:
      raise ValueError("diagnostics needs both mu and sigma for the ADNCE statistics "
                       "(or neither).")
    _common.check_positive(sigma, "sigma", dtype)
    _common.check_real(mu, "mu", dtype)
  z1, z2 = jax.lax.stop_gradient(z1), jax.lax.stop_gradient(z2)
  layout = _layout.build(z1, z2, variant=variant, valid=valid, labels=labels,
                         axis_name=axis_name, mode="negatives")
  dtype = layout.q.dtype
  temperature = jax.lax.stop_gradient(_layout.as_param(temperature, dtype))
  params = {"inv_t": 1.0 / temperature, "shift": layout.pos_cos[:, None]}
  if with_adnce:
    params["mu"] = jax.lax.stop_gradient(_layout.as_param(mu, dtype))
    params["half_inv_var"] = jax.lax.stop_gradient(0.5 / jnp.square(_layout.as_param(sigma, dtype)))
    stats_fn, kinds = _diag_stats_adnce, _DIAG_KINDS_ADNCE
  else:
    stats_fn, kinds = _diag_stats, _DIAG_KINDS
  outs, count = row_reduce(stats_fn, kinds, layout.q, layout.k, layout.rows, layout.cols, params,
                           block_size)
  lse1, lse2, sum_centred, sum_centred2 = outs[:4]
  n = jnp.maximum(count, 1.0)
  log_n = jnp.log(n)
  weight = _layout.anchor_weight(layout, count)

  def mean(x):
    return _layout.global_mean(x, weight, axis_name)

  centred_mean = sum_centred / n
  neg_mean = centred_mean + layout.pos_cos
  neg_var = jnp.maximum(sum_centred2 / n - jnp.square(centred_mean), 0.0)
  pos_logit = layout.pos_cos * params["inv_t"]
  # InfoNCE's bound I >= log K - L needs the positive in L's denominator (K = N + 1 terms). The
  # graph loss (GraphCL's form) leaves it out, and log(N) minus that loss is no bound (it exceeds
  # log K), so every variant uses the bound's own form here.
  log_k, log_denominator = jnp.log(n + 1.0), jnp.logaddexp(pos_logit, lse1)
  result = {
      "eta_hat": mean(neg_var * jnp.square(params["inv_t"]) / 2.0),
      "mi_lower_bound": mean(log_k + pos_logit - log_denominator),
      "ess_infonce": mean(jnp.exp(2.0 * lse1 - log_n - lse2)),
      "s_neg_mean": mean(neg_mean),
      "s_neg_var": mean(neg_var),
      "s_pos_mean": mean(layout.pos_cos),
  }
  if with_adnce:
    lse_g, lse_g2, max_g, min_g = outs[4:]
    n_w = n
    if variant == "sentence":  # SimCSE's weight set also holds the positive (diagonal)
      log_g_pos = _common.gaussian_log_weight(layout.pos_cos, params["mu"],
                                              params["half_inv_var"])
      lse_g = jnp.logaddexp(lse_g, log_g_pos)
      lse_g2 = jnp.logaddexp(lse_g2, 2.0 * log_g_pos)
      max_g, min_g = jnp.maximum(max_g, log_g_pos), jnp.minimum(min_g, log_g_pos)
      n_w = n + 1.0
    log_norm = lse_g - jnp.log(n_w)  # log of the row mean of g
    result.update({
        "ess_adnce": mean(jnp.exp(2.0 * lse_g - jnp.log(n_w) - lse_g2)),
        "adnce_w_max": _global_max(jnp.exp(max_g - log_norm), weight, axis_name),
        "adnce_w_min": _global_min(jnp.exp(min_g - log_norm), weight, axis_name),
        "adnce_w_mean": mean(jnp.exp(lse_g - log_norm) / n_w),
    })
  return result
