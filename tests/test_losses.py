"""InfoNCE / ADNCE / DCL / HCL against the float64 NumPy transcription of LOSSES.md.

Values and gradients (central finite differences of the reference, ADNCE's weights held at the
unperturbed point since they are stop-gradient), on random and structured inputs, with masks;
the paper's identities; numerics at extreme temperatures and low precision; jit/vmap and the
no-recompile contract; input validation.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import test_util as jtu

from cldro_jax import losses
import reference_losses as ref

VARIANTS = ("image", "sentence", "graph")


def make_views(kind, batch, dim, seed=0):
  rng = np.random.default_rng(seed)
  if kind == "random":
    return rng.normal(size=(batch, dim)), rng.normal(size=(batch, dim))
  if kind == "lowdim":
    return rng.normal(size=(batch, 2)), rng.normal(size=(batch, 2))
  if kind == "close":  # views nearly identical: large positive cosines
    z1 = rng.normal(size=(batch, dim))
    return z1, z1 + 0.05 * rng.normal(size=(batch, dim))
  raise ValueError(kind)


# name -> (library call, reference call, hyperparameters)
def _jax_loss(name, variant, t, hp, **kw):
  if name == "infonce":
    return lambda a, b: losses.infonce(a, b, temperature=t, variant=variant, **kw)
  if name == "adnce":
    return lambda a, b: losses.adnce(a, b, temperature=t, variant=variant, **hp, **kw)
  if name == "dcl":
    return lambda a, b: losses.dcl(a, b, temperature=t, **hp, **kw)
  if name == "hcl":
    return lambda a, b: losses.hcl(a, b, temperature=t, **hp, **kw)
  raise ValueError(name)


def _ref_loss(name, variant, t, hp, *, weights_at=None, **kw):
  if name == "infonce":
    return lambda a, b: ref.weighted_nce(a, b, t=t, variant=variant, **kw)
  if name == "adnce":
    return lambda a, b: ref.weighted_nce(a, b, t=t, variant=variant, weights_from=weights_at,
                                         **hp, **kw)
  if name in ("dcl", "hcl"):
    beta = hp.get("beta", 0.0)
    return lambda a, b: ref.hcl(a, b, t=t, tau_plus=hp["tau_plus"], beta=beta, **kw)
  raise ValueError(name)


LOSS_CASES = (
    [("infonce", v, {}) for v in VARIANTS]
    + [("adnce", v, dict(mu=0.7, sigma=0.5)) for v in VARIANTS]
    + [("adnce", v, dict(mu=1.5, sigma=1.0)) for v in VARIANTS]  # mu > 1: monotone weights
    + [("adnce", "image", dict(mu=-0.2, sigma=0.3))]
    + [("dcl", "image", dict(tau_plus=0.1)), ("hcl", "image", dict(tau_plus=0.1, beta=1.0)),
       ("hcl", "image", dict(tau_plus=0.05, beta=0.5))]
)


def _case_id(case):
  name, variant, hp = case
  return "-".join([name, variant] + [f"{k}{v}" for k, v in hp.items()])


def _masks(batch, kind):
  valid = labels = None
  if kind in ("valid", "both"):
    valid = np.ones(batch, bool)
    valid[[1, batch - 1]] = False
  if kind in ("labels", "both"):
    labels = np.arange(batch) % 3
  return valid, labels


@pytest.mark.parametrize("case", LOSS_CASES, ids=_case_id)
@pytest.mark.parametrize("inputs", ["random", "lowdim", "close"])
@pytest.mark.parametrize("t,batch", [(0.1, 7), (0.5, 4), (0.07, 9)])
def test_values_match_reference_x64(case, inputs, t, batch):
  name, variant, hp = case
  z1, z2 = make_views(inputs, batch, 5, seed=batch)
  expected = _ref_loss(name, variant, t, hp)(z1, z2)
  with jax.enable_x64(True):
    got = _jax_loss(name, variant, t, hp)(jnp.asarray(z1), jnp.asarray(z2))
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(float(got), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", LOSS_CASES, ids=_case_id)
@pytest.mark.parametrize("mask", ["valid", "labels", "both"])
def test_masked_values_and_grads_match_reference_x64(case, mask):
  name, variant, hp = case
  batch, t = 6, 0.2
  z1, z2 = make_views("random", batch, 3, seed=11)
  valid, labels = _masks(batch, mask)
  kw = dict(valid=valid, labels=labels)
  expected = _ref_loss(name, variant, t, hp, **kw)(z1, z2)
  expected_grads = ref.numeric_grad(
      _ref_loss(name, variant, t, hp, weights_at=(z1, z2), **kw), z1, z2)
  with jax.enable_x64(True):
    jkw = {k: None if v is None else jnp.asarray(v) for k, v in kw.items()}
    fn = _jax_loss(name, variant, t, hp, **jkw)
    got = fn(jnp.asarray(z1), jnp.asarray(z2))
    grads = jax.grad(fn, (0, 1))(jnp.asarray(z1), jnp.asarray(z2))
  np.testing.assert_allclose(float(got), expected, rtol=1e-10)
  for g, e in zip(grads, expected_grads):
    np.testing.assert_allclose(np.asarray(g), e, atol=2e-7)
  if valid is not None:  # invalid rows are not anchors nor negatives: no gradient reaches them
    assert np.all(np.asarray(grads[0])[~valid] == 0) and np.all(np.asarray(grads[1])[~valid] == 0)


@pytest.mark.parametrize("case", LOSS_CASES, ids=_case_id)
@pytest.mark.parametrize("inputs", ["random", "close"])
def test_grads_match_finite_differences_float32(case, inputs):
  name, variant, hp = case
  z1, z2 = make_views(inputs, 5, 4, seed=3)
  t = 0.3
  expected = ref.numeric_grad(_ref_loss(name, variant, t, hp, weights_at=(z1, z2)), z1, z2)
  fn = _jax_loss(name, variant, t, hp)
  value, grads = jax.value_and_grad(fn, (0, 1))(jnp.asarray(z1, jnp.float32),
                                                 jnp.asarray(z2, jnp.float32))
  assert value.dtype == jnp.float32
  np.testing.assert_allclose(float(value), _ref_loss(name, variant, t, hp)(z1, z2), rtol=2e-6)
  for g, e in zip(grads, expected):
    np.testing.assert_allclose(np.asarray(g), e, atol=2e-5, rtol=1e-4)


def test_dcl_hcl_clamp_active_matches_reference():
  # Close views, a large class prior: the debiased estimate goes negative and the reference
  # clamps it to N e^{-1/t}. Make sure the case really exercises the clamp.
  rng = np.random.default_rng(5)
  z1 = rng.normal(size=(8, 4))
  z2 = np.concatenate([z1[:4] + 0.05 * rng.normal(size=(4, 4)), rng.normal(size=(4, 4))])
  t, tau_plus = 0.5, 0.3
  for beta in (0.0, 1.0):
    assert 0.0 < ref.hcl_clamp_active(z1, z2, t=t, tau_plus=tau_plus, beta=beta) < 1.0
    expected = ref.hcl(z1, z2, t=t, tau_plus=tau_plus, beta=beta)
    expected_grads = ref.numeric_grad(
        lambda a, b: ref.hcl(a, b, t=t, tau_plus=tau_plus, beta=beta), z1, z2)
    with jax.enable_x64(True):
      fn = lambda a, b: losses.hcl(a, b, temperature=t, tau_plus=tau_plus, beta=beta)
      got, grads = jax.value_and_grad(fn, (0, 1))(jnp.asarray(z1), jnp.asarray(z2))
    np.testing.assert_allclose(float(got), expected, rtol=1e-10)
    for g, e in zip(grads, expected_grads):
      np.testing.assert_allclose(np.asarray(g), e, atol=2e-7)


# ---------------------------------------------------------------------------------- identities
def test_dcl_with_zero_tau_plus_is_image_infonce():
  z1, z2 = make_views("random", 8, 6, seed=1)
  with jax.enable_x64(True):
    for t in (0.1, 0.5):
      a = losses.dcl(z1, z2, temperature=t, tau_plus=0.0)
      b = losses.infonce(z1, z2, temperature=t, variant="image")
      np.testing.assert_allclose(float(a), float(b), rtol=1e-12)


def test_hcl_with_zero_beta_is_dcl():
  z1, z2 = make_views("close", 8, 6, seed=2)
  with jax.enable_x64(True):
    fn_hcl = lambda a, b: losses.hcl(a, b, temperature=0.5, tau_plus=0.1, beta=jnp.asarray(0.0))
    fn_dcl = lambda a, b: losses.dcl(a, b, temperature=0.5, tau_plus=0.1)
    # an array beta=0 goes through the general HCL path, not DCL's shortcut
    v1, g1 = jax.value_and_grad(fn_hcl, (0, 1))(z1, z2)
    v2, g2 = jax.value_and_grad(fn_dcl, (0, 1))(z1, z2)
  np.testing.assert_allclose(float(v1), float(v2), rtol=1e-12)
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-12)


@pytest.mark.parametrize("variant", VARIANTS)
def test_adnce_with_huge_sigma_is_infonce(variant):
  z1, z2 = make_views("random", 7, 5, seed=4)
  with jax.enable_x64(True):
    a = losses.adnce(z1, z2, temperature=0.2, mu=0.5, sigma=1e5, variant=variant)
    b = losses.infonce(z1, z2, temperature=0.2, variant=variant)
  np.testing.assert_allclose(float(a), float(b), rtol=1e-9)


def test_graph_infonce_is_graphcl_form_minus_log_b_minus_1():
  batch = 9
  z1, z2 = make_views("random", batch, 5, seed=6)
  with jax.enable_x64(True):
    got = float(losses.infonce(z1, z2, temperature=0.2, variant="graph"))
  np.testing.assert_allclose(got, ref.graphcl_infonce(z1, z2, t=0.2) - np.log(batch - 1),
                             rtol=1e-10)


def test_sentence_infonce_is_cross_entropy_over_logits():
  # SimCSE: nn.CrossEntropyLoss(cos_sim / t, arange(B)); optax is an independent implementation.
  import optax
  z1, z2 = make_views("random", 8, 5, seed=7)
  n1, n2 = ref.normalize(z1), ref.normalize(z2)
  logits = n1 @ n2.T / 0.05
  with jax.enable_x64(True):
    expected = optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(logits),
                                                               jnp.arange(8)).mean()
    got = losses.infonce(z1, z2, temperature=0.05, variant="sentence")
  np.testing.assert_allclose(float(got), float(expected), rtol=1e-12)


def test_symmetric_image_loss_is_invariant_to_permuting_pairs_and_swapping_views():
  z1, z2 = make_views("random", 8, 5, seed=8)
  perm = np.random.default_rng(0).permutation(8)
  with jax.enable_x64(True):
    base = losses.adnce(z1, z2, temperature=0.3, mu=0.7, sigma=0.5)
    permuted = losses.adnce(z1[perm], z2[perm], temperature=0.3, mu=0.7, sigma=0.5)
    swapped = losses.adnce(z2, z1, temperature=0.3, mu=0.7, sigma=0.5)
    scaled = losses.adnce(3.0 * z1, 0.01 * z2, temperature=0.3, mu=0.7, sigma=0.5)
  for other in (permuted, swapped, scaled):
    np.testing.assert_allclose(float(other), float(base), rtol=1e-12)


# ----------------------------------------------------------------------------------- numerics
ALL_LOSSES = [
    ("infonce", v, {}) for v in VARIANTS] + [("adnce", v, dict(mu=0.7, sigma=0.5))
                                             for v in VARIANTS] + [
    ("dcl", "image", dict(tau_plus=0.1)), ("hcl", "image", dict(tau_plus=0.1, beta=1.0))]


@pytest.mark.parametrize("case", ALL_LOSSES, ids=_case_id)
def test_low_temperature_float32_is_finite_and_accurate(case):
  # t = 0.01: exp(1/t) = e^100 overflows float32, so a log(exp(.)) implementation returns inf.
  name, variant, hp = case
  z1, z2 = make_views("close", 8, 6, seed=9)
  t = 0.01
  assert not np.isfinite(np.exp(np.float32(1.0 / t)))
  fn = _jax_loss(name, variant, t, hp)
  value, grads = jax.value_and_grad(fn, (0, 1))(jnp.asarray(z1, jnp.float32),
                                                 jnp.asarray(z2, jnp.float32))
  assert np.isfinite(float(value)) and all(np.all(np.isfinite(g)) for g in grads)
  # float32 cosines are exact to ~1e-7, i.e. ~1e-5 in logits at t = 0.01.
  np.testing.assert_allclose(float(value), _ref_loss(name, variant, t, hp)(z1, z2), rtol=1e-4,
                             atol=1e-4)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("case", ALL_LOSSES, ids=_case_id)
def test_half_precision_inputs_are_upcast(case, dtype):
  name, variant, hp = case
  z1, z2 = make_views("random", 8, 6, seed=10)
  z1h, z2h = jnp.asarray(z1, dtype), jnp.asarray(z2, dtype)
  t = 0.05
  fn = _jax_loss(name, variant, t, hp)
  value, grads = jax.value_and_grad(fn, (0, 1))(z1h, z2h)
  assert value.dtype == jnp.float32
  assert grads[0].dtype == dtype and all(np.all(np.isfinite(np.asarray(g, np.float32)))
                                         for g in grads)
  rounded = [np.asarray(z, np.float64) for z in (z1h, z2h)]
  np.testing.assert_allclose(float(value), _ref_loss(name, variant, t, hp)(*rounded), rtol=1e-5)


@pytest.mark.parametrize("case", ALL_LOSSES, ids=_case_id)
def test_identical_rows_are_finite(case):
  # Every cosine is 1: every similarity ties, the debiased DCL/HCL estimate hits the clamp.
  name, variant, hp = case
  z = np.tile(np.array([[0.3, -1.2, 0.5, 2.0]]), (6, 1))
  fn = _jax_loss(name, variant, 0.05, hp)
  value, grads = jax.value_and_grad(fn, (0, 1))(jnp.asarray(z, jnp.float32),
                                                 jnp.asarray(z, jnp.float32))
  assert all(np.all(np.isfinite(g)) for g in grads)
  np.testing.assert_allclose(float(value), _ref_loss(name, variant, 0.05, hp)(z, z), rtol=1e-5,
                             atol=1e-5)


def test_zero_row_has_zero_cosines_and_zero_gradient():
  z1, z2 = make_views("random", 6, 4, seed=12)
  z1[2] = 0.0
  for name, variant, hp in ALL_LOSSES:
    fn = _jax_loss(name, variant, 0.3, hp)
    value, grads = jax.value_and_grad(fn, (0, 1))(jnp.asarray(z1, jnp.float32),
                                                   jnp.asarray(z2, jnp.float32))
    np.testing.assert_allclose(float(value), _ref_loss(name, variant, 0.3, hp)(z1, z2),
                               rtol=1e-5)
    assert np.all(np.asarray(grads[0])[2] == 0.0) and np.all(np.isfinite(grads[1]))
  n = np.asarray(losses.l2_normalize_rows(jnp.asarray(z1, jnp.float32)))
  np.testing.assert_allclose(n, ref.normalize(z1), atol=1e-7)
  # extreme magnitudes neither overflow nor underflow the norm
  big = jnp.asarray([[3e30, -4e30], [1e-30, 1e-30]], jnp.float32)
  np.testing.assert_allclose(np.asarray(losses.l2_normalize_rows(big)),
                             [[0.6, -0.8], [2 ** -0.5, 2 ** -0.5]], rtol=1e-6)


@pytest.mark.parametrize("case", ALL_LOSSES, ids=_case_id)
def test_anchor_without_negatives_is_dropped(case):
  # Every valid row shares one label: no anchor keeps a negative -> mean over no anchor = 0,
  # with a zero (not NaN) gradient. The padded row is invalid.
  name, variant, hp = case
  z1, z2 = make_views("random", 5, 4, seed=13)
  labels = np.array([2, 2, 2, 2, 7])
  valid = np.array([True, True, True, True, False])
  fn = _jax_loss(name, variant, 0.2, hp, valid=jnp.asarray(valid), labels=jnp.asarray(labels))
  value, grads = jax.value_and_grad(fn, (0, 1))(jnp.asarray(z1, jnp.float32),
                                                 jnp.asarray(z2, jnp.float32))
  ref_value = _ref_loss(name, variant, 0.2, hp, valid=valid, labels=labels)(z1, z2)
  assert float(value) == ref_value == 0.0
  assert all(np.all(np.asarray(g) == 0.0) for g in grads)
  # one row of another label restores negatives for everybody and matches the reference
  labels[0] = 5
  fn = _jax_loss(name, variant, 0.2, hp, valid=jnp.asarray(valid), labels=jnp.asarray(labels))
  np.testing.assert_allclose(
      float(fn(jnp.asarray(z1, jnp.float32), jnp.asarray(z2, jnp.float32))),
      _ref_loss(name, variant, 0.2, hp, valid=valid, labels=labels)(z1, z2), rtol=1e-5)


# ------------------------------------------------------------------------- transformations
@pytest.mark.parametrize("case", [c for c in ALL_LOSSES if c[0] != "adnce"], ids=_case_id)
def test_check_grads_x64(case):
  # ADNCE is excluded by design: its stop-gradient weights make autodiff differ from numerical
  # derivatives; its gradients are checked against frozen-weight finite differences above.
  name, variant, hp = case
  z1, z2 = make_views("random", 5, 3, seed=14)
  with jax.enable_x64(True):
    jtu.check_grads(_jax_loss(name, variant, 0.4, hp), (jnp.asarray(z1), jnp.asarray(z2)),
                    order=2, modes=["fwd", "rev"], atol=1e-6, rtol=1e-6)


def test_jit_and_vmap_match_eager():
  rng = np.random.default_rng(15)
  z1 = jnp.asarray(rng.normal(size=(3, 6, 4)), jnp.float32)
  z2 = jnp.asarray(rng.normal(size=(3, 6, 4)), jnp.float32)
  for name, variant, hp in ALL_LOSSES:
    fn = _jax_loss(name, variant, 0.3, hp)
    eager = np.array([float(fn(z1[i], z2[i])) for i in range(3)])
    np.testing.assert_allclose(np.asarray(jax.jit(jax.vmap(fn))(z1, z2)), eager, rtol=1e-6)
    np.testing.assert_allclose(float(jax.jit(fn)(z1[0], z2[0])), eager[0], rtol=1e-6)


def test_array_hyperparameters_do_not_recompile():
  z1, z2 = (jnp.asarray(z, jnp.float32) for z in make_views("random", 6, 4, seed=16))

  @jax.jit
  def step(z1, z2, t, mu, sigma, tau_plus, beta):
    return (losses.adnce(z1, z2, temperature=t, mu=mu, sigma=sigma)
            + losses.hcl(z1, z2, temperature=t, tau_plus=tau_plus, beta=beta))

  values = []
  for t, mu, sigma, tau, beta in [(0.5, 0.7, 0.5, 0.1, 1.0), (0.2, 0.3, 1.0, 0.0, 0.0),
                                  (0.07, 1.5, 2.0, 0.3, 0.5)]:
    args = [jnp.asarray(x, jnp.float32) for x in (t, mu, sigma, tau, beta)]
    values.append(float(step(z1, z2, *args)))
    expected = (ref.weighted_nce(z1, z2, t=t, variant="image", mu=mu, sigma=sigma)
                + ref.hcl(z1, z2, t=t, tau_plus=tau, beta=beta))
    np.testing.assert_allclose(values[-1], expected, rtol=1e-5)
  assert step._cache_size() == 1


def test_temperature_gradient_matches_finite_difference():
  # A learnable temperature: d loss / d t through the dense path.
  z1, z2 = make_views("random", 6, 4, seed=17)
  eps = 1e-6
  for name, variant, hp in [("infonce", "image", {}), ("adnce", "sentence",
                                                       dict(mu=0.7, sigma=0.5)),
                            ("hcl", "image", dict(tau_plus=0.1, beta=1.0))]:
    fd = (_ref_loss(name, variant, 0.3 + eps, hp)(z1, z2)
          - _ref_loss(name, variant, 0.3 - eps, hp)(z1, z2)) / (2 * eps)
    with jax.enable_x64(True):
      g = jax.grad(lambda t: _jax_loss(name, variant, t, hp)(jnp.asarray(z1), jnp.asarray(z2)))(
          jnp.asarray(0.3))
    np.testing.assert_allclose(float(g), fd, rtol=1e-6)


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
])
def test_bad_input_raises_clear_error(call, match):
  z = jnp.ones((6, 4), jnp.float32)
  with pytest.raises(ValueError, match=match):
    call(z)
