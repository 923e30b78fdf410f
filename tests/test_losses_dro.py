"""The CL-DRO family and the diagnostics against the NumPy reference and against DRO duality.

The closed forms are checked against the optimisation problems they solve: the KL-ball and
chi-square-ball worst-case expectations are computed by scipy's SLSQP on tiny cases.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

from cldro_jax import losses
import reference_losses as ref

VARIANTS = ("image", "sentence", "graph")
BATCH, DIM = 6, 4


def views(seed, batch=BATCH, dim=DIM, close=False):
  rng = np.random.default_rng(seed)
  z1 = rng.normal(size=(batch, dim))
  z2 = z1 + 0.1 * rng.normal(size=(batch, dim)) if close else rng.normal(size=(batch, dim))
  return z1, z2


def masks(kind, batch=BATCH):
  # "none" and "valid" pass labels=None: the default path, which counts candidates without a
  # label mask (distinct labels would take the masked path and leave it untested)
  valid, labels = np.ones(batch, bool), None
  if kind in ("valid", "both"):
    valid[[0, 3]] = False
  if kind in ("labels", "both"):
    labels = np.arange(batch) % 2
  return valid, labels


def _maybe_array(x):
  return None if x is None else jnp.asarray(x)


def _library(name, variant, z1, z2, hp, valid, labels):
  if name == "kl_dro":
    return losses.kl_dro(z1, z2, temperature=hp, variant=variant, valid=valid, labels=labels)
  if name == "chi2_dro":
    return losses.chi2_dro(z1, z2, eta=hp, variant=variant, valid=valid, labels=labels)
  return losses.mean_variance(z1, z2, temperature=hp, variant=variant, valid=valid,
                              labels=labels)


def _reference(name, variant, hp, valid, labels):
  if name == "kl_dro":
    return lambda a, b: ref.kl_dro(a, b, t=hp, variant=variant, valid=valid, labels=labels)
  if name == "chi2_dro":
    return lambda a, b: ref.chi2_dro(a, b, eta=hp, variant=variant, valid=valid, labels=labels)
  return lambda a, b: ref.mean_variance(a, b, t=hp, variant=variant, valid=valid, labels=labels)


@functools.lru_cache(maxsize=None)
def _value_and_grads(name, variant):
  return jax.jit(jax.value_and_grad(functools.partial(_library, name, variant), (0, 1, 2)))


def _x64_value(name, variant, z1, z2, hp):
  valid, labels = masks("none")
  with jax.enable_x64(True):
    value, _ = _value_and_grads(name, variant)(jnp.asarray(z1), jnp.asarray(z2), jnp.asarray(hp),
                                               jnp.asarray(valid), _maybe_array(labels))
  return float(value)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", ["kl_dro", "chi2_dro", "mean_variance"])
def test_dro_losses_match_reference_x64(name, variant):
  for i, (mask, hp, close) in enumerate([("none", 0.3, False), ("both", 0.1, True),
                                         ("valid", 0.5, False), ("labels", 0.2, True)]):
    z1, z2 = views(i, close=close)
    valid, labels = masks(mask)
    with jax.enable_x64(True):
      value, (g1, g2, g_hp) = _value_and_grads(name, variant)(
          jnp.asarray(z1), jnp.asarray(z2), jnp.asarray(hp), jnp.asarray(valid),
          _maybe_array(labels))
    reference = _reference(name, variant, hp, valid, labels)
    np.testing.assert_allclose(float(value), reference(z1, z2), rtol=1e-10, atol=1e-12)
    expected = ref.numeric_grad(reference, z1, z2)
    np.testing.assert_allclose(np.asarray(g1), expected[0], atol=2e-7)
    np.testing.assert_allclose(np.asarray(g2), expected[1], atol=2e-7)
    eps = 1e-6
    fd_hp = (_reference(name, variant, hp + eps, valid, labels)(z1, z2)
             - _reference(name, variant, hp - eps, valid, labels)(z1, z2)) / (2 * eps)
    np.testing.assert_allclose(float(g_hp), fd_hp, rtol=1e-6, atol=1e-8)


def test_identical_negatives_give_finite_chi2_gradient():
  # zero variance: sqrt(eta Var) has an infinite derivative at 0; the library defines it as 0
  z = np.tile([[1.0, 2.0, -0.5, 0.3]], (BATCH, 1))
  valid, labels = masks("none")
  for name, hp in (("chi2_dro", 0.5), ("mean_variance", 0.3), ("kl_dro", 0.05)):
    with jax.enable_x64(True):
      value, grads = _value_and_grads(name, "image")(
          jnp.asarray(z), jnp.asarray(z), jnp.asarray(hp), jnp.asarray(valid),
          _maybe_array(labels))
    np.testing.assert_allclose(float(value), _reference(name, "image", hp, None, None)(z, z),
                               atol=1e-6)
    assert all(np.all(np.isfinite(g)) for g in grads)


@pytest.mark.parametrize("variant", VARIANTS)
def test_kl_dro_is_scaled_infonce_without_positive(variant):
  z1, z2 = views(7)
  t = 0.2
  valid, labels = masks("none")
  with jax.enable_x64(True):
    got, _ = _value_and_grads("kl_dro", variant)(jnp.asarray(z1), jnp.asarray(z2),
                                                 jnp.asarray(t), jnp.asarray(valid),
                                                 _maybe_array(labels))
    got = float(got)
  if variant == "graph":  # the mean form: exactly t times graph InfoNCE
    np.testing.assert_allclose(got, t * ref.weighted_nce(z1, z2, t=t, variant="graph"),
                               rtol=1e-10)
  # t * mean_i(-s_ip/t + log sum_{j in N(i)} exp(s_ij/t)) - t log N, from the cosine matrix
  n1, n2 = ref.normalize(z1), ref.normalize(z2)
  if variant == "image":
    z = np.concatenate([n1, n2])
    cos = z @ z.T
    pair = (np.arange(2 * BATCH) + BATCH) % (2 * BATCH)
    pos = cos[np.arange(2 * BATCH), pair]
    neg_mask = ~np.eye(2 * BATCH, dtype=bool)
    neg_mask[np.arange(2 * BATCH), pair] = False
    n = 2 * BATCH - 2
  else:
    cos = n1 @ n2.T
    pos = np.diag(cos)
    neg_mask = ~np.eye(BATCH, dtype=bool)
    n = BATCH - 1
  nce_without_positive = np.mean(
      -pos / t + np.log(np.where(neg_mask, np.exp(cos / t), 0.0).sum(1)))
  np.testing.assert_allclose(got, t * nce_without_positive - t * np.log(n), rtol=1e-10)


def _kl_worst_case(f, eta):
  """sup {E_Q f : KL(Q || uniform) <= eta} by SLSQP, Q = softmax(theta) so that Q > 0."""
  n = len(f)

  def q_of(theta):
    e = np.exp(theta - theta.max())
    return e / e.sum()

  cons = [{"type": "ineq", "fun": lambda th: eta - np.sum(q_of(th) * np.log(n * q_of(th)))}]
  res = optimize.minimize(lambda th: -q_of(th) @ f, np.zeros(n), constraints=cons,
                          method="SLSQP", options={"ftol": 1e-15, "maxiter": 1000})
  assert res.success, res.message
  return -res.fun


def _chi2_worst_case(f, eta):
  """sup {E_Q f : E_Q0 (dQ/dQ0 - 1)^2 <= eta} by SLSQP (Q0 uniform: N sum q^2 - 1 <= eta)."""
  n = len(f)
  cons = [{"type": "eq", "fun": lambda q: q.sum() - 1.0},
          {"type": "ineq", "fun": lambda q: eta - (n * np.sum(q * q) - 1.0)}]
  res = optimize.minimize(lambda q: -q @ f, np.full(n, 1.0 / n), constraints=cons,
                          bounds=[(0.0, 1.0)] * n, method="SLSQP",
                          options={"ftol": 1e-12, "maxiter": 500})
  assert res.success, res.message
  return -res.fun


def test_kl_dro_is_the_kl_ball_worst_case_at_alpha_t():
  # For each anchor, the radius at which alpha* = t is eta_i = KL(Q*_i || Q0) with
  # Q* = softmax(f / t). Then sup_Q E_Q f - t eta_i must equal the kl_dro term, and the dual
  # min_alpha alpha log E exp(f/alpha) + alpha eta_i must be attained at alpha = t.
  z1, z2 = views(8)
  t = 0.3
  rows = ref.anchors(z1, z2, "image")
  per_anchor = []
  for s_pos, f in rows:
    q_star = np.exp(f / t) / np.exp(f / t).sum()
    eta = np.sum(q_star * np.log(len(f) * q_star))
    sup = _kl_worst_case(f, eta)
    def dual_objective(alpha, f=f, eta=eta):
      return alpha * np.log(np.mean(np.exp(f / alpha))) + alpha * eta
    dual = optimize.minimize_scalar(dual_objective, bounds=(0.01, 10.0), method="bounded",
                                    options={"xatol": 1e-10})
    np.testing.assert_allclose(dual.x, t, rtol=1e-4)
    np.testing.assert_allclose(dual.fun, sup, rtol=1e-6)
    per_anchor.append(-s_pos + sup - t * eta)
  np.testing.assert_allclose(_x64_value("kl_dro", "image", z1, z2, t), np.mean(per_anchor),
                             rtol=1e-6)


def test_chi2_dro_is_the_chi2_ball_worst_case():
  z1, z2 = views(9)
  eta = 0.05  # small: the worst-case weights 1 + sqrt(eta/Var)(f - mean) stay >= 0
  rows = ref.anchors(z1, z2, "sentence")
  per_anchor = []
  for s_pos, f in rows:
    assert np.all(1 + np.sqrt(eta / f.var()) * (f - f.mean()) >= 0)
    per_anchor.append(-s_pos + _chi2_worst_case(f, eta))
  np.testing.assert_allclose(_x64_value("chi2_dro", "sentence", z1, z2, eta),
                             np.mean(per_anchor), rtol=1e-6)


def test_mean_variance_is_second_order_kl_dro():
  # t log E exp(f/t) = E f + Var f / (2t) + O(third cumulant). With views base + spread * noise
  # the cosines deviate from 1 by O(spread^2), so the gap shrinks like spread^6: by ~64 when
  # the spread halves.
  rng = np.random.default_rng(10)
  base = rng.normal(size=(1, DIM))
  noise1, noise2 = rng.normal(size=(BATCH, DIM)), rng.normal(size=(BATCH, DIM))
  valid, labels = masks("none")
  gaps = []
  for spread in (0.1, 0.05, 0.025):
    args = (base + spread * noise1, base + spread * noise2, 0.5, valid, labels)
    with jax.enable_x64(True):
      args = [_maybe_array(a) for a in args]
      kl, _ = _value_and_grads("kl_dro", "image")(*args)
      mv, _ = _value_and_grads("mean_variance", "image")(*args)
    gaps.append(abs(float(kl) - float(mv)))
  assert gaps[0] > 0
  assert 40 < gaps[0] / gaps[1] < 70 and 40 < gaps[1] / gaps[2] < 70


# ------------------------------------------------------------------------------ diagnostics
@functools.lru_cache(maxsize=None)
def _diagnostics(variant, with_adnce):
  """One program: the diagnostics dense and (image) in column blocks of 4."""
  block_sizes = (None, 4) if variant == "image" else (None,)

  def fn(z1, z2, t, mu, sigma, valid, labels):
    kw = dict(temperature=t, mu=mu if with_adnce else None, sigma=sigma if with_adnce else None,
              variant=variant, valid=valid, labels=labels)
    return [losses.diagnostics(z1, z2, block_size=block_size, **kw) for block_size in block_sizes]
  return jax.jit(fn)


@pytest.mark.parametrize("variant", VARIANTS)
def test_diagnostics_match_reference(variant):
  for i, (mask, t, close) in enumerate([("none", 0.2, False), ("both", 0.5, True),
                                        ("labels", 0.1, False)]):
    z1, z2 = views(20 + i, close=close)
    valid, labels = masks(mask)
    expected = ref.diagnostics(z1, z2, t=t, mu=0.6, sigma=0.5, variant=variant, valid=valid,
                               labels=labels)
    args = [jnp.asarray(x, jnp.float32) for x in (z1, z2, t, 0.6, 0.5)]
    for got in _diagnostics(variant, True)(*args, jnp.asarray(valid), _maybe_array(labels)):
      assert set(got) == set(expected)
      for key, value in expected.items():
        np.testing.assert_allclose(float(got[key]), value, rtol=2e-5, atol=2e-6, err_msg=key)
    # InfoNCE's bound log K - L <= log K, K = the positive plus the negatives (graph too).
    k = 2 * BATCH - 1 if variant == "image" else BATCH
    assert expected["mi_lower_bound"] <= np.log(k)
  if variant == "image":  # without mu/sigma: only the InfoNCE statistics
    got = _diagnostics(variant, False)(*args, jnp.asarray(valid), _maybe_array(labels))[0]
    assert "ess_adnce" not in got
    np.testing.assert_allclose(float(got["eta_hat"]), expected["eta_hat"], rtol=2e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_diagnostics_radius_stays_accurate_near_collapse(variant):
  # A nearly collapsed encoder: every cosine above 0.99, their variance about 1e-8. A one-pass
  # E[s^2] - E[s]^2 in float32 is all round-off there (eta_hat off by orders of magnitude).
  z1, z2 = views(40)
  z1, z2 = 0.05 * z1 + 3.0, 0.05 * z2 + 3.0
  expected = ref.diagnostics(z1, z2, t=0.05, variant=variant)
  assert expected["s_neg_mean"] > 0.99 and expected["eta_hat"] < 1e-5
  args = [jnp.asarray(x, jnp.float32) for x in (z1, z2, 0.05, 0.6, 0.5)]
  no_masks = [_maybe_array(m) for m in masks("none")]
  for got in _diagnostics(variant, False)(*args, *no_masks):
    np.testing.assert_allclose(float(got["eta_hat"]), expected["eta_hat"], rtol=1e-2)
    np.testing.assert_allclose(float(got["s_neg_mean"]), expected["s_neg_mean"], rtol=1e-6)
  same = np.repeat(z1[:1], BATCH, axis=0)   # all-identical rows: no spread at all
  args = [jnp.asarray(x, jnp.float32) for x in (same, same, 0.01, 0.6, 0.5)]
  for got in _diagnostics(variant, False)(*args, *no_masks):
    assert float(got["eta_hat"]) < 1e-6


@pytest.mark.parametrize("variant", VARIANTS)
def test_diagnostics_without_a_counting_anchor_are_all_zero(variant):
  # Every row shares one label: no anchor keeps a negative. The losses are 0 then; so is every
  # statistic (not a mix of 0, -inf and +inf).
  args = [jnp.asarray(x, jnp.float32) for x in (*views(50), 0.2, 0.6, 0.5)]
  same_label = jnp.zeros(BATCH, jnp.int32)
  for got in _diagnostics(variant, True)(*args, jnp.ones(BATCH, bool), same_label):
    assert {k: float(v) for k, v in got.items()} == {k: 0.0 for k in got}


def test_diagnostics_are_stop_gradient_and_fit_in_a_train_step():
  z1, z2 = (jnp.asarray(z, jnp.float32) for z in views(30))

  @jax.jit
  def step(z1, z2):
    def loss_fn(z1, z2):
      loss = losses.adnce(z1, z2, temperature=0.4, mu=0.7, sigma=0.5)
      stats = losses.diagnostics(z1, z2, temperature=0.4, mu=0.7, sigma=0.5)
      return loss, stats
    (loss, stats), grads = jax.value_and_grad(loss_fn, (0, 1), has_aux=True)(z1, z2)
    stat_grads = jax.grad(lambda a, b: sum(jax.tree.leaves(losses.diagnostics(
        a, b, temperature=0.4, mu=0.7, sigma=0.5))), (0, 1))(z1, z2)
    return loss, stats, grads, stat_grads

  loss, stats, grads, stat_grads = step(z1, z2)
  assert all(np.all(np.asarray(g) == 0) for g in stat_grads)
  np.testing.assert_allclose(
      float(stats["eta_hat"]),
      ref.diagnostics(np.asarray(z1), np.asarray(z2), t=0.4, mu=0.7, sigma=0.5)["eta_hat"],
      rtol=1e-5)
  np.testing.assert_allclose(float(stats["adnce_w_mean"]), 1.0, rtol=1e-6)


def test_diagnostics_validation():
  z = jnp.ones((4, 3))
  with pytest.raises(ValueError, match="both mu and sigma"):
    losses.diagnostics(z, z, temperature=0.5, mu=0.5)
  with pytest.raises(ValueError, match="eta must be >= 0"):
    losses.chi2_dro(z, z, eta=-1.0)
