"""InfoNCE / ADNCE / DCL / HCL against the float64 NumPy transcription of LOSSES.md.

Values and gradients (central finite differences of the reference; ADNCE's weights are held at
the unperturbed point since they are stop-gradient), on random and structured inputs, with
`valid`/`labels` masks; the paper's identities; numerics at extreme temperatures, in low
precision, with identical and zero rows; jit/vmap and the no-recompile contract; validation.

Speed: every loss family is one jitted value-and-gradient function whose hyperparameters and
masks are array arguments, so all configurations of a family share a handful of compilations.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import scipy.special
import pytest
from jax import test_util as jtu

from cldro_jax import losses
import reference_losses as ref

VARIANTS = ("image", "sentence", "graph")
BATCH, DIM = 7, 5


def make_views(kind, batch=BATCH, dim=DIM, seed=0):
  rng = np.random.default_rng(seed)
  if kind == "random":
    return rng.normal(size=(batch, dim)), rng.normal(size=(batch, dim))
  if kind == "lowdim":  # points of R^2, zero-padded: the cosines are those of 2-D vectors
    pad = np.zeros((batch, dim - 2))
    return (np.concatenate([rng.normal(size=(batch, 2)), pad], 1),
            np.concatenate([rng.normal(size=(batch, 2)), pad], 1))
  if kind == "close":  # the two views nearly identical: large positive cosines
    z1 = rng.normal(size=(batch, dim))
    return z1, z1 + 0.05 * rng.normal(size=(batch, dim))
  raise ValueError(kind)


def masks(kind, batch=BATCH):
  """(valid, labels): "none" all rows valid and labels=None, "valid" padding rows and no labels
  (the default path, which counts candidates without a label mask), "labels" and "both" labels
  with unlabelled rows (and padding)."""
  valid = np.ones(batch, bool)
  labels = None
  if kind in ("valid", "both"):
    valid[[1, batch - 1]] = False
  if kind in ("labels", "both"):
    labels = np.arange(batch) % 3
    labels[2::3] = -1   # unlabelled rows: the same class as nothing, each other's negatives
  return valid, labels


# family -> hyperparameter settings (each a dict of scalars)
FAMILIES = {
    "infonce-image": [{}],
    "infonce-sentence": [{}],
    "infonce-graph": [{}],
    # mu > 1 makes the weight monotone in similarity; a negative mu favours easy negatives
    "adnce-image": [dict(mu=0.7, sigma=0.5), dict(mu=1.5, sigma=1.0), dict(mu=-0.2, sigma=0.3)],
    "adnce-sentence": [dict(mu=0.4, sigma=1.0), dict(mu=2.0, sigma=1.0), dict(mu=0.7, sigma=0.5)],
    "adnce-graph": [dict(mu=0.7, sigma=1.0), dict(mu=1.5, sigma=1.0), dict(mu=0.2, sigma=0.4)],
    # DCL is HCL with beta = 0
    "hcl-image": [dict(tau_plus=0.1, beta=0.0), dict(tau_plus=0.1, beta=1.0),
                  dict(tau_plus=0.05, beta=0.5)],
    # weighted_nce with a user weighting: Cauchy weights 1 / (1 + ((s - mu) / sigma)^2)
    "cauchy-image": [dict(mu=0.7, sigma=0.5)],
    "cauchy-sentence": [dict(mu=0.4, sigma=1.0)],
    "cauchy-graph": [dict(mu=-0.2, sigma=0.3)],
}


def cauchy_log_weight(sim, params):
  return -jnp.log1p(jnp.square((sim - params["mu"]) / params["sigma"]))


def cauchy_weight(mu, sigma):
  return lambda s: 1.0 / (1.0 + ((s - mu) / sigma) ** 2)


def library_loss(family, z1, z2, t, hp, valid=None, labels=None, block_size=None):
  name, variant = family.split("-")
  kw = dict(valid=valid, labels=labels, block_size=block_size)
  if name == "infonce":
    return losses.infonce(z1, z2, temperature=t, variant=variant, **kw)
  if name == "adnce":
    return losses.adnce(z1, z2, temperature=t, variant=variant, mu=hp["mu"], sigma=hp["sigma"],
                        **kw)
  if name == "cauchy":
    return losses.weighted_nce(z1, z2, temperature=t, variant=variant,
                               log_weight=cauchy_log_weight, weight_params=hp, **kw)
  return losses.hcl(z1, z2, temperature=t, tau_plus=hp["tau_plus"], beta=hp["beta"], **kw)


def reference_loss(family, t, hp, valid=None, labels=None, weights_at=None):
  name, variant = family.split("-")
  if name == "infonce":
    return lambda a, b: ref.weighted_nce(a, b, t=t, variant=variant, valid=valid, labels=labels)
  if name == "adnce":
    return lambda a, b: ref.weighted_nce(a, b, t=t, variant=variant, valid=valid, labels=labels,
                                         weights_from=weights_at, **hp)
  if name == "cauchy":
    return lambda a, b: ref.weighted_nce(a, b, t=t, variant=variant, valid=valid, labels=labels,
                                         weights_from=weights_at, weight_fn=cauchy_weight(**hp))
  return lambda a, b: ref.hcl(a, b, t=t, valid=valid, labels=labels, **hp)


@functools.lru_cache(maxsize=None)
def value_and_grads(family):
  """Jitted (z1, z2, t, hp, valid, labels) -> (loss, (dz1, dz2, dt)); one per family."""
  fn = functools.partial(library_loss, family)
  return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)))


def _maybe_array(x):
  return None if x is None else jnp.asarray(x)


def run(family, z1, z2, t, hp, mask="none", dtype=None):
  valid, labels = masks(mask, z1.shape[0])
  dtype = dtype or jnp.float32
  args = (jnp.asarray(z1, dtype), jnp.asarray(z2, dtype), jnp.asarray(t, jnp.float32),
          {k: jnp.asarray(v, jnp.float32) for k, v in hp.items()}, jnp.asarray(valid),
          _maybe_array(labels))
  return value_and_grads(family)(*args)


def run_x64(family, z1, z2, t, hp, mask="none"):
  valid, labels = masks(mask, z1.shape[0])
  with jax.enable_x64(True):
    value, grads = value_and_grads(family)(
        jnp.asarray(z1), jnp.asarray(z2), jnp.asarray(t, jnp.float64),
        {k: jnp.asarray(v, jnp.float64) for k, v in hp.items()}, jnp.asarray(valid),
        _maybe_array(labels))
    assert value.dtype == jnp.float64
    return float(value), [np.asarray(g) for g in grads]


def check_against_reference(family, inputs, t, hp, mask, *, grads, seed=0, batch=BATCH):
  z1, z2 = make_views(inputs, batch=batch, seed=seed)
  valid, labels = masks(mask, batch)
  value, (g1, g2, gt) = run_x64(family, z1, z2, t, hp, mask)
  np.testing.assert_allclose(value, reference_loss(family, t, hp, valid, labels)(z1, z2),
                             rtol=1e-10, atol=1e-12, err_msg=f"{family} {inputs} {t} {hp} {mask}")
  if not grads:
    return
  expected = ref.numeric_grad(reference_loss(family, t, hp, valid, labels, (z1, z2)), z1, z2)
  np.testing.assert_allclose(g1, expected[0], atol=2e-7)
  np.testing.assert_allclose(g2, expected[1], atol=2e-7)
  # d/dt, for a learnable temperature (ADNCE's included: its weights are functions of the
  # cosines alone, so their stop-gradient does not touch this derivative).
  eps = 1e-6
  fd_t = (reference_loss(family, t + eps, hp, valid, labels)(z1, z2)
          - reference_loss(family, t - eps, hp, valid, labels)(z1, z2)) / (2 * eps)
  np.testing.assert_allclose(float(gt), fd_t, rtol=1e-6, atol=1e-8)
  if mask in ("valid", "both"):  # invalid rows are neither anchors nor negatives
    assert np.all(g1[~valid] == 0) and np.all(g2[~valid] == 0)


@pytest.mark.parametrize("family", FAMILIES)
def test_values_and_grads_match_reference_x64(family):
  configs = [(inputs, t, mask) for inputs in ("random", "lowdim", "close")
             for t, mask in ((0.07, "none"), (0.5, "both"), (0.2, "valid"), (0.1, "labels"))]
  for h, hp in enumerate(FAMILIES[family]):
    for c, (inputs, t, mask) in enumerate(configs):
      # values everywhere; finite-difference gradients for one mask per kind of input, rotating
      # with the hyperparameters ("both" holds labels and padding at once)
      with_grads = c % 4 == (h + c // 4) % 4
      check_against_reference(family, inputs, t, hp, mask, grads=with_grads, seed=c)


@pytest.mark.parametrize("family", FAMILIES)
def test_float32_matches_reference(family):
  for inputs, t in (("random", 0.3), ("close", 0.07)):
    z1, z2 = make_views(inputs, seed=3)
    hp = FAMILIES[family][-1]
    value, (g1, g2, _) = run(family, z1, z2, t, hp)
    assert value.dtype == jnp.float32
    np.testing.assert_allclose(float(value), reference_loss(family, t, hp)(z1, z2), rtol=3e-6,
                               atol=1e-6)
    expected = ref.numeric_grad(reference_loss(family, t, hp, weights_at=(z1, z2)), z1, z2)
    # float32 rounding of the cosines (~6e-8) is amplified by 1/t in the logits
    atol = 3e-5 * max(np.abs(expected[0]).max(), np.abs(expected[1]).max()) + 3e-8
    np.testing.assert_allclose(np.asarray(g1), expected[0], atol=atol)
    np.testing.assert_allclose(np.asarray(g2), expected[1], atol=atol)


def test_dcl_hcl_clamp_active_matches_reference():
  # Half the pairs nearly identical, a large class prior: the debiased estimate of those anchors
  # is negative and the reference clamps it to N e^{-1/t}. Make sure the clamp is exercised.
  rng = np.random.default_rng(5)
  z1 = rng.normal(size=(8, 4))
  z2 = np.concatenate([z1[:4] + 0.05 * rng.normal(size=(4, 4)), rng.normal(size=(4, 4))])
  t, tau_plus = 0.5, 0.3
  for beta in (0.0, 1.0):
    assert 0.0 < ref.hcl_clamp_active(z1, z2, t=t, tau_plus=tau_plus, beta=beta) < 1.0
    hp = dict(tau_plus=tau_plus, beta=beta)
    value, (g1, g2, _) = run_x64("hcl-image", z1, z2, t, hp)
    np.testing.assert_allclose(value, ref.hcl(z1, z2, t=t, **hp), rtol=1e-10)
    expected = ref.numeric_grad(functools.partial(ref.hcl, t=t, **hp), z1, z2)
    np.testing.assert_allclose(g1, expected[0], atol=2e-7)
    np.testing.assert_allclose(g2, expected[1], atol=2e-7)


# ---------------------------------------------------------------------------------- identities
@jax.jit
def _dcl_value_and_grad(z1, z2, t, tau_plus):
  return jax.value_and_grad(functools.partial(losses.dcl, temperature=t, tau_plus=tau_plus),
                            (0, 1))(z1, z2)


def test_dcl_with_zero_tau_plus_is_image_infonce():
  z1, z2 = make_views("random", seed=1)
  for t in (0.1, 0.5):
    with jax.enable_x64(True):
      a, ga = _dcl_value_and_grad(jnp.asarray(z1), jnp.asarray(z2), t, 0.0)
    b, gb = run_x64("infonce-image", z1, z2, t, {})
    np.testing.assert_allclose(float(a), b, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(ga[0]), gb[0], atol=1e-12)
  # a Python tau_plus=0 skips the debiasing term altogether
  with jax.enable_x64(True):
    c = jax.jit(lambda a, b: losses.dcl(a, b, temperature=0.5, tau_plus=0))(z1, z2)
  np.testing.assert_allclose(float(c), b, rtol=1e-12)


def test_hcl_with_zero_beta_is_dcl():
  z1, z2 = make_views("close", seed=2)
  # the family function takes beta as an array: the general HCL path, not DCL's shortcut
  v1, g1 = run_x64("hcl-image", z1, z2, 0.5, dict(tau_plus=0.1, beta=0.0))
  with jax.enable_x64(True):
    v2, g2 = _dcl_value_and_grad(jnp.asarray(z1), jnp.asarray(z2), 0.5, 0.1)
  np.testing.assert_allclose(v1, float(v2), rtol=1e-12)
  for a, b in zip(g1[:2], g2, strict=True):   # d/dz1, d/dz2 (g1 also holds d/dt)
    np.testing.assert_allclose(a, np.asarray(b), atol=1e-12)


@pytest.mark.parametrize("variant", VARIANTS)
def test_adnce_with_huge_sigma_is_infonce(variant):
  z1, z2 = make_views("random", seed=4)
  a, ga = run_x64(f"adnce-{variant}", z1, z2, 0.2, dict(mu=0.5, sigma=1e5))
  b, gb = run_x64(f"infonce-{variant}", z1, z2, 0.2, {})
  np.testing.assert_allclose(a, b, rtol=1e-9)
  np.testing.assert_allclose(ga[0], gb[0], atol=1e-9)


def test_graph_infonce_is_graphcl_form_minus_log_b_minus_1():
  z1, z2 = make_views("random", seed=6)
  value, _ = run_x64("infonce-graph", z1, z2, 0.2, {})
  np.testing.assert_allclose(value, ref.graphcl_infonce(z1, z2, t=0.2) - np.log(BATCH - 1),
                             rtol=1e-10)


def test_sentence_infonce_is_cross_entropy_over_logits():
  # SimCSE: nn.CrossEntropyLoss(cos_sim / t, arange(B)); optax is an independent implementation.
  import optax
  z1, z2 = make_views("random", seed=7)
  logits = ref.normalize(z1) @ ref.normalize(z2).T / 0.05
  with jax.enable_x64(True):
    expected = optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(logits),
                                                               jnp.arange(BATCH)).mean()
  value, _ = run_x64("infonce-sentence", z1, z2, 0.05, {})
  np.testing.assert_allclose(value, float(expected), rtol=1e-12)


def test_image_loss_is_invariant_to_pair_order_view_swap_and_scale():
  z1, z2 = make_views("random", seed=8)
  perm = np.random.default_rng(0).permutation(BATCH)
  hp = dict(mu=0.7, sigma=0.5)
  base, _ = run_x64("adnce-image", z1, z2, 0.3, hp)
  for a, b in ((z1[perm], z2[perm]), (z2, z1), (3.0 * z1, 0.01 * z2)):
    np.testing.assert_allclose(run_x64("adnce-image", a, b, 0.3, hp)[0], base, rtol=1e-12)


# ----------------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("family", FAMILIES)
def test_numerics_float32(family):
  hp = FAMILIES[family][-1]

  def check(z1, z2, t, mask="none", rtol=1e-5):
    valid, labels = masks(mask)
    value, grads = run(family, z1, z2, t, hp, mask)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
    expected = reference_loss(family, t, hp, valid, labels)(z1, z2)
    np.testing.assert_allclose(float(value), expected, rtol=rtol, atol=rtol)
    return value, grads

  # t = 0.01: exp(1/t) = e^100 overflows float32, so a log(exp(.)) implementation returns inf.
  with np.errstate(over="ignore"):
    assert not np.isfinite(np.exp(np.float32(1.0 / 0.01)))
  # float32 cosines are exact to ~1e-7, i.e. ~1e-5 in logits at t = 0.01.
  check(*make_views("close", seed=9), 0.01, rtol=1e-4)
  check(*make_views("random", seed=9), 0.01, rtol=1e-4)
  # all rows identical: every cosine is 1, every similarity ties, DCL/HCL hit the clamp
  z = np.tile(np.array([[0.3, -1.2, 0.5, 2.0, 0.0]]), (BATCH, 1))
  check(z, z, 0.05)
  # an all-zero row stays zero: its cosines are 0 and its gradient is 0
  z1, z2 = make_views("random", seed=12)
  z1[2] = 0.0
  _, (g1, _, _) = check(z1, z2, 0.3)
  assert np.all(np.asarray(g1)[2] == 0.0)
  # every valid row shares one label: no anchor keeps a negative -> the mean over no anchor is
  # 0, with a zero (not NaN) gradient
  valid = np.array([True] * 5 + [False] * 2)
  labels = np.array([2] * 5 + [7, 3])
  args = [jnp.asarray(x, jnp.float32) for x in make_views("random", seed=13)]
  value, grads = value_and_grads(family)(*args, jnp.float32(0.2),
                                         {k: jnp.float32(v) for k, v in hp.items()},
                                         jnp.asarray(valid), jnp.asarray(labels))
  assert float(value) == reference_loss(family, 0.2, hp, valid, labels)(*args) == 0.0
  assert all(np.all(np.asarray(g) == 0.0) for g in grads)


def test_float32_keeps_relative_precision_of_small_losses_and_far_gaussians():
  # A nearly solved batch: the image loss is 5e-5 at t = 0.05 and 1e-7 at t = 0.03; rounding at
  # ulp(1/t) ~ 2e-6 after the logsumexp would cost it percents, or all of it (softplus keeps
  # float32's relative precision).
  rng = np.random.default_rng(21)
  z1 = np.eye(8, 16) + 0.2 * rng.normal(size=(8, 16))
  z2 = z1 + 0.05 * rng.normal(size=(8, 16))
  for t in (0.05, 0.03):
    expected = ref.weighted_nce(z1, z2, t=t, variant="image")
    assert 1e-8 < expected < 1e-4
    value, _ = run("infonce-image", z1, z2, t, {})
    np.testing.assert_allclose(float(value), expected, rtol=1e-4)
  # ADNCE with mu outside [-1, 1] and a narrow Gaussian: every raw log g is a large negative
  # number (about -400 here) next to which s / t rounds in float32; log g is taken relative to
  # the nearest point of [-1, 1] (docs/losses.md, "Conventions and numerics"), which removes
  # most of it. The reference works in logs: its exp(log g) would underflow at these settings.
  # Graph form: w = g / mean(g), loss_i = -s+/t + log mean w e^(s/t).
  def log_domain_graph_adnce(z1, z2, t, mu, sigma, shift=0.0):
    """(loss, size of the terms its two log-sum-exps add up), with log g shifted by `shift`."""
    per_anchor, size = [], []
    for s_pos, cands in ref.anchors(z1, z2, "graph"):
      log_g = -((cands - mu) ** 2 - shift ** 2) / (2 * sigma ** 2)
      log_w = log_g - (scipy.special.logsumexp(log_g) - np.log(len(cands)))
      per_anchor.append(-s_pos / t + scipy.special.logsumexp(log_w + cands / t)
                        - np.log(len(cands)))
      size.append(sum(np.sum(scipy.special.softmax(x) * np.abs(x))
                      for x in (log_g, log_g + cands / t)))
    return np.mean(per_anchor), np.mean(size)

  # Float32 rounds each term of the two log-sum-exps at its own size: the error is a fraction of
  # an ulp of the terms' weighted size (measured: at most 0.65 of it over 24 batches and settings
  # on this CPU). Low-dimensional views put candidates near cosine 1, where the shift shrinks that
  # size 10-60 fold; an unshifted log g fails this tolerance (3.8 ulps at seed 23, mu = 2,
  # sigma = 0.05: checked by hand).
  eps32 = float(np.finfo(np.float32).eps)
  for seed in (22, 23):
    z1, z2 = make_views("lowdim", batch=32, seed=seed)
    for mu, sigma in ((2.0, 0.05), (-1.5, 0.05), (2.0, 0.1), (0.7, 0.5)):
      hp = dict(mu=mu, sigma=sigma)
      value, grads = run("adnce-graph", z1, z2, 0.2, hp)
      expected, size = log_domain_graph_adnce(z1, z2, 0.2, mu, sigma,
                                              shift=mu - np.clip(mu, -1, 1))
      unshifted_size = log_domain_graph_adnce(z1, z2, 0.2, mu, sigma)[1]
      assert (unshifted_size > 10 * size) if abs(mu) > 1 else unshifted_size == size
      np.testing.assert_allclose(float(value), expected, rtol=0, atol=2 * eps32 * size,
                                 err_msg=f"seed={seed} mu={mu} sigma={sigma}")
      assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)


# The upcast is shared by every loss: each variant and loss appears once per dtype.
@pytest.mark.parametrize("family,dtype", [
    ("adnce-image", jnp.float16), ("hcl-image", jnp.float16), ("adnce-graph", jnp.bfloat16),
    ("infonce-sentence", jnp.bfloat16)])
def test_half_precision_inputs_are_upcast(family, dtype):
  hp = FAMILIES[family][-1]
  z1, z2 = make_views("random", batch=10, seed=10)  # another batch size, too
  value, grads = run(family, z1, z2, 0.05, hp, dtype=dtype)
  assert value.dtype == jnp.float32 and grads[0].dtype == dtype
  assert all(np.all(np.isfinite(np.asarray(g, np.float32))) for g in grads)
  rounded = [np.asarray(jnp.asarray(z, dtype), np.float64) for z in (z1, z2)]
  np.testing.assert_allclose(float(value), reference_loss(family, 0.05, hp)(*rounded), rtol=1e-5)


def test_l2_normalize_rows():
  z = make_views("random", seed=12)[0]
  z[2] = 0.0
  np.testing.assert_allclose(np.asarray(losses.l2_normalize_rows(jnp.asarray(z, jnp.float32))),
                             ref.normalize(z), atol=1e-7)
  # extreme magnitudes neither overflow nor underflow the squared norm
  big = jnp.asarray([[3e30, -4e30], [1e-30, 1e-30], [0.0, 0.0]], jnp.float32)
  np.testing.assert_allclose(np.asarray(losses.l2_normalize_rows(big)),
                             [[0.6, -0.8], [2 ** -0.5, 2 ** -0.5], [0, 0]], rtol=1e-6)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("name", ["infonce", "adnce", "dcl", "hcl"])
def test_nan_or_inf_projection_gives_nan_loss_not_a_silent_number(name, bad):
  # A diverged model's NaN/inf projections must surface as a NaN loss (the trainer stops on it),
  # never be normalised away as if the rows were zero.
  z1, z2 = (jnp.asarray(v, jnp.float32) for v in make_views("random", seed=3))
  z1 = z1.at[1, 0].set(bad)
  extra = {"infonce": {}, "adnce": dict(mu=0.7, sigma=1.0), "dcl": dict(tau_plus=0.1),
           "hcl": dict(tau_plus=0.1, beta=1.0)}[name]
  loss = getattr(losses, name)(z1, z2, temperature=0.5, **extra)
  assert np.isnan(float(loss))


# ------------------------------------------------------------------------- transformations
@pytest.mark.parametrize("family", ["infonce-graph", "hcl-image"])
def test_check_grads_x64(family):
  # ADNCE is left out by design: its stop-gradient weights make autodiff differ from numerical
  # derivatives; its gradients are checked against frozen-weight finite differences above.
  z1, z2 = make_views("random", batch=4, dim=3, seed=14)
  hp = FAMILIES[family][-1]
  with jax.enable_x64(True):
    fn = jax.jit(lambda a, b: library_loss(family, a, b, 0.4, hp))
    jtu.check_grads(fn, (jnp.asarray(z1), jnp.asarray(z2)), order=1, modes=["fwd", "rev"],
                    atol=1e-6, rtol=1e-6)


def test_jit_and_vmap_match_reference():
  rng = np.random.default_rng(15)
  z1 = rng.normal(size=(3, 5, DIM))
  z2 = rng.normal(size=(3, 5, DIM))
  family = "hcl-image"
  hp = FAMILIES[family][-1]
  expected = [reference_loss(family, 0.3, hp)(z1[i], z2[i]) for i in range(3)]
  batched = jax.jit(jax.vmap(lambda a, b: library_loss(family, a, b, 0.3, hp)))
  np.testing.assert_allclose(np.asarray(batched(jnp.asarray(z1, jnp.float32),
                                                jnp.asarray(z2, jnp.float32))), expected, rtol=1e-5)


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_traced_tau_plus_has_its_gradient_at_zero(beta):
  """d/dtau_plus at a traced tau_plus = 0 (the edge of [0, 1) where the debiasing switches on)
  against the float64 reference's one-sided difference; it was NaN (0 * inf through
  log(tau_plus)). The other gradients there equal the undebiased loss's."""
  z1, z2 = make_views("random", seed=23)
  h = 1e-7
  expected = (ref.hcl(z1, z2, t=0.5, tau_plus=h, beta=beta)
              - ref.hcl(z1, z2, t=0.5, tau_plus=0.0, beta=beta)) / h
  with jax.enable_x64(True):
    def loss(z1, z2, tau):
      return losses.hcl(z1, z2, temperature=0.5, tau_plus=tau, beta=beta)
    grads = jax.grad(loss, argnums=(0, 1, 2))(jnp.asarray(z1), jnp.asarray(z2),
                                               jnp.asarray(0.0))
    undebiased = jax.grad(functools.partial(loss, tau=0.0), argnums=(0, 1))(
        jnp.asarray(z1), jnp.asarray(z2))
  np.testing.assert_allclose(float(grads[2]), expected, rtol=1e-5)
  for got, want in zip(grads[:2], undebiased, strict=True):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-12, atol=1e-14)


def test_array_hyperparameters_do_not_recompile():
  z1, z2 = (jnp.asarray(z, jnp.float32) for z in make_views("random", seed=16))

  @jax.jit
  def step(z1, z2, t, mu, sigma, tau_plus, beta):
    return (losses.adnce(z1, z2, temperature=t, mu=mu, sigma=sigma)
            + losses.hcl(z1, z2, temperature=t, tau_plus=tau_plus, beta=beta))

  for t, mu, sigma, tau, beta in [(0.5, 0.7, 0.5, 0.1, 1.0), (0.2, 0.3, 1.0, 0.0, 0.0),
                                  (0.07, 1.5, 2.0, 0.3, 0.5)]:
    args = [jnp.asarray(x, jnp.float32) for x in (t, mu, sigma, tau, beta)]
    expected = (ref.weighted_nce(z1, z2, t=t, variant="image", mu=mu, sigma=sigma)
                + ref.hcl(z1, z2, t=t, tau_plus=tau, beta=beta))
    np.testing.assert_allclose(float(step(z1, z2, *args)), expected, rtol=1e-5)
  assert step._cache_size() == 1


TRACED_OUT_OF_RANGE = {   # each loss with one traced hyperparameter outside its range
    "infonce t=0": lambda z1, z2, x: losses.infonce(z1, z2, temperature=x * 0.0),
    "adnce t<0": lambda z1, z2, x: losses.adnce(z1, z2, temperature=-x, mu=0.7, sigma=0.5),
    "adnce sigma<0": lambda z1, z2, x: losses.adnce(z1, z2, temperature=0.5, mu=0.7,
                                                    sigma=-x, variant="sentence"),
    "adnce mu=inf": lambda z1, z2, x: losses.adnce(z1, z2, temperature=0.5, mu=x * jnp.inf,
                                                   sigma=1.0, block_size=4),
    "dcl tau_plus=1": lambda z1, z2, x: losses.dcl(z1, z2, temperature=0.5, tau_plus=x),
    "hcl tau_plus<0": lambda z1, z2, x: losses.hcl(z1, z2, temperature=0.5, tau_plus=-x,
                                                   beta=1.0),
    "kl_dro t<0": lambda z1, z2, x: losses.kl_dro(z1, z2, temperature=-x, variant="graph"),
    "chi2_dro eta<0": lambda z1, z2, x: losses.chi2_dro(z1, z2, eta=-x),
    "mean_variance t<0": lambda z1, z2, x: losses.mean_variance(z1, z2, temperature=-x),
    "diagnostics sigma=0": lambda z1, z2, x: losses.diagnostics(
        z1, z2, temperature=0.5, mu=0.7, sigma=x * 0.0)["ess_adnce"],
    "adaptive_mu_sigma sigma<0": lambda z1, z2, x: losses.adaptive_mu_sigma(
        z1, z2, mu=0.7, sigma=-x)[1],
    "adaptive_mu_sigma mu_quantile<0": lambda z1, z2, x: losses.adaptive_mu_sigma(
        z1, z2, mu=0.7, sigma=0.5, mu_rule="quantile", mu_quantile=-0.5 * x)[0],
    "adaptive_mu_sigma sigma_scale<0": lambda z1, z2, x: losses.adaptive_mu_sigma(
        z1, z2, mu=0.7, sigma=0.5, sigma_rule="std", sigma_scale=-x)[1],
}


@pytest.mark.parametrize("case", list(TRACED_OUT_OF_RANGE))
def test_a_traced_hyperparameter_out_of_range_gives_nan_not_a_wrong_number(case):
  """Inside jit a traced value cannot raise: the loss and its gradient are NaN instead (what the
  trainer's non-finite check and jax_debug_nans catch), and in range nothing changes."""
  z1, z2 = (jnp.asarray(z, jnp.float32) for z in make_views("random", seed=5))
  loss = TRACED_OUT_OF_RANGE[case]
  value, grad_z1 = jax.jit(jax.value_and_grad(loss))(z1, z2, jnp.float32(1.0))
  assert np.isnan(float(value))
  if not case.startswith(("diagnostics", "adaptive")):   # those two are stop-gradient
    assert np.isnan(np.asarray(grad_z1)).all()


def test_traced_hyperparameters_in_range_give_the_untraced_values():
  """In range the check leaves the value bit for bit as the loss computes it (and within float32
  rounding of the same loss with Python-number hyperparameters, which XLA may fold otherwise:
  jax 0.12 differs there by 1 ulp)."""
  z1, z2 = (jnp.asarray(z, jnp.float32) for z in make_views("random", seed=6))
  checked = jax.jit(lambda t, mu, sigma: losses.adnce(z1, z2, temperature=t, mu=mu, sigma=sigma))
  unchecked = jax.jit(lambda t, mu, sigma: losses.adnce.__wrapped__(
      z1, z2, temperature=t, mu=mu, sigma=sigma))
  assert float(checked(0.4, 0.7, 0.5)) == float(unchecked(0.4, 0.7, 0.5))
  np.testing.assert_allclose(float(checked(0.4, 0.7, 0.5)), float(
      losses.adnce(z1, z2, temperature=0.4, mu=0.7, sigma=0.5)), rtol=1e-6)


# --------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("call,match", [
    (lambda z: losses.infonce(z, z, temperature=0.0), "temperature must be > 0"),
    (lambda z: losses.infonce(z, z, temperature=-1), "temperature must be > 0"),
    (lambda z: losses.adnce(z, z, temperature=0.5, mu=0.5, sigma=0.0), "sigma must be > 0"),
    (lambda z: losses.dcl(z, z, temperature=0.5, tau_plus=1.0), r"tau_plus .* \[0, 1\)"),
    (lambda z: losses.hcl(z, z, temperature=0.5, tau_plus=-0.1, beta=1.0), r"\[0, 1\)"),
    (lambda z: losses.infonce(z, z, temperature=0.5, variant="text"), "unknown variant"),
    (lambda z: losses.infonce(z, z[:3], temperature=0.5), "same shape"),
    (lambda z: losses.infonce(z[0], z[0], temperature=0.5), "2-D"),
    (lambda z: losses.infonce(z[:, :, None], z[:, :, None], temperature=0.5), "2-D"),
    (lambda z: losses.infonce(z.astype(jnp.int32), z.astype(jnp.int32), temperature=0.5),
     "floating point"),
    (lambda z: losses.infonce(z[:, :0], z[:, :0], temperature=0.5), "d >= 1"),
    (lambda z: losses.infonce(z[:1], z[:1], temperature=0.5), "at least 2 rows"),
    (lambda z: losses.infonce(z, z, temperature=0.5, valid=jnp.array([True] + [False] * 5)),
     "at least 2 are needed"),
    (lambda z: losses.infonce(z, z, temperature=0.5, valid=jnp.ones(6, jnp.int32)), "bool"),
    (lambda z: losses.infonce(z, z, temperature=0.5, labels=jnp.zeros(5, jnp.int32)),
     r"shape \(6,\)"),
    (lambda z: losses.infonce(z, z, temperature=0.5, labels=jnp.zeros(6)), "integer"),
    (lambda z: losses.infonce(z, z, temperature=0.5, block_size=0), "block_size"),
    (lambda z: losses.infonce(z, z, temperature=jnp.ones(2)), "scalar"),
    (lambda z: losses.infonce(z, z, temperature=float("nan")), "finite"),
    (lambda z: losses.adnce(z, z, temperature=0.5, mu=0.5, sigma=1.0, variant="x"), "variant"),
    (lambda z: losses.infonce(z, z, temperature=0.5, axis_name="data"), "inside jax.shard_map"),
])
def test_bad_input_raises_clear_error(call, match):
  z = jnp.ones((6, 4), jnp.float32)
  with pytest.raises(ValueError, match=match):
    call(z)
