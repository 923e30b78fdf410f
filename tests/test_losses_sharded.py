"""8 CPU devices: losses with `axis_name` inside `jax.shard_map` equal the one-device losses.

The batch is split over a "data" mesh axis; negatives are all-gathered. Checked: the value on
every device equals the full-batch value (and the NumPy reference), the gradient of the
shard_mapped loss taken outside equals the full-batch gradient, and the gradient taken INSIDE
the shard_map body (what a train step does) gives each device exactly its rows of the
full-batch gradient, without rescaling. Every result is blocked on before the next dispatch
(collectives dispatched back to back deadlock XLA:CPU on 2 cores).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from cldro_jax import losses
import reference_losses as ref

N_DEVICES = 8
BATCH = 16  # global: 2 rows per device
DIM = 5

CASES = {
    "adnce-sentence": lambda z1, z2, **kw: losses.adnce(z1, z2, temperature=0.07, mu=0.4,
                                                        sigma=1.0, variant="sentence", **kw),
    "adnce-image": lambda z1, z2, **kw: losses.adnce(z1, z2, temperature=0.4, mu=0.7, sigma=0.5,
                                                     **kw),
    "hcl-image": lambda z1, z2, **kw: losses.hcl(z1, z2, temperature=0.5, tau_plus=0.1, beta=1.0,
                                                 **kw),
    "chi2_dro-graph": lambda z1, z2, **kw: losses.chi2_dro(z1, z2, eta=0.3, variant="graph",
                                                           **kw),
    "cauchy-graph": lambda z1, z2, **kw: losses.weighted_nce(
        z1, z2, temperature=0.2, log_weight=_cauchy_log_weight,
        weight_params=dict(mu=0.5, sigma=0.4), variant="graph", **kw),
}


def _cauchy_log_weight(sim, params):
  return -jnp.log1p(jnp.square((sim - params["mu"]) / params["sigma"]))


@functools.lru_cache(maxsize=None)
def mesh():
  return jax.make_mesh((N_DEVICES,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def inputs(seed=0):
  rng = np.random.default_rng(seed)
  z1 = rng.normal(size=(BATCH, DIM)).astype(np.float32)
  z2 = (z1 + 0.3 * rng.normal(size=(BATCH, DIM))).astype(np.float32)
  valid = np.ones(BATCH, bool)
  valid[[3, 10, 11]] = False  # device 5 holds only padding
  labels = rng.integers(0, 5, BATCH)
  labels[[0, 6, 13]] = -1   # unlabelled rows (the same class as nothing) on three devices
  return z1, z2, valid, labels


def _kw(block_size):
  return {} if block_size is None else {"block_size": block_size}


@functools.lru_cache(maxsize=None)
def compare_program(case, block_size):
  """One jitted program (one compilation) computing, for the same inputs:
  the one-device full-batch value and gradient (dense), the per-device value and the gradient
  taken inside the shard_map body, and the gradient of the shard_mapped loss taken outside."""
  loss_fn = CASES[case]

  def full(z1, z2, valid, labels):
    return loss_fn(z1, z2, valid=valid, labels=labels)

  def inner_body(z1, z2, valid, labels):
    local = functools.partial(loss_fn, valid=valid, labels=labels, axis_name="data",
                              **_kw(block_size))
    value, grads = jax.value_and_grad(local, (0, 1))(z1, z2)
    return value[None], grads

  inner = jax.shard_map(inner_body, mesh=mesh(), in_specs=(P("data"),) * 4,
                        out_specs=(P("data"), (P("data"), P("data"))))
  outer = jax.shard_map(
      lambda a, b, v, lab: loss_fn(a, b, valid=v, labels=lab, axis_name="data",
                                   **_kw(block_size)),
      mesh=mesh(), in_specs=(P("data"),) * 4, out_specs=P())

  def program(*args):
    return (jax.value_and_grad(full, (0, 1))(*args), inner(*args),
            jax.value_and_grad(outer, (0, 1))(*args))
  return jax.jit(program)


def check_case(case, block_size, seed):
  z1, z2, valid, labels = inputs(seed)
  args = (jnp.asarray(z1), jnp.asarray(z2), jnp.asarray(valid), jnp.asarray(labels))
  (value, grads), (per_device, inner_grads), (outer_value, outer_grads) = jax.block_until_ready(
      compare_program(case, block_size)(*args))
  # the same GLOBAL mean on every device
  np.testing.assert_allclose(np.asarray(per_device), np.full(N_DEVICES, float(value)),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(outer_value), float(value), rtol=1e-5, atol=1e-6)
  # inside the body each device gets its rows of the full-batch gradient, with no rescaling;
  # outside, the gradient of the shard_mapped loss is the full-batch gradient
  for got in (inner_grads, outer_grads):
    for g, e in zip(got, grads, strict=True):
      np.testing.assert_allclose(np.asarray(g), np.asarray(e), atol=1e-6, rtol=1e-5)
  assert np.abs(np.asarray(grads[0])).max() > 1e-3  # the comparison is not between zeros
  return z1, z2, valid, labels, float(value)


@pytest.mark.parametrize("case", ["adnce-image", "hcl-image", "chi2_dro-graph"])
def test_shard_map_matches_one_device(case):
  z1, z2, valid, labels, value = check_case(case, None, seed=0)
  if case == "adnce-image":  # and the one-device value is the reference's
    np.testing.assert_allclose(
        value, ref.weighted_nce(z1, z2, t=0.4, variant="image", mu=0.7, sigma=0.5, valid=valid,
                                labels=labels), rtol=1e-5)


def test_weighted_nce_with_a_user_weighting_blockwise_inside_shard_map():
  z1, z2, valid, labels, value = check_case("cauchy-graph", 3, seed=1)
  np.testing.assert_allclose(value, ref.weighted_nce(
      z1, z2, t=0.2, variant="graph", valid=valid, labels=labels,
      weight_fn=lambda s: 1.0 / (1.0 + ((s - 0.5) / 0.4) ** 2)), rtol=1e-5)


@pytest.mark.parametrize("case", ["adnce-image", "hcl-image", "adnce-sentence"])
def test_blockwise_inside_shard_map(case):
  check_case(case, 5, seed=2)


def test_diagnostics_inside_shard_map():
  z1, z2, valid, labels = inputs(3)
  args = (jnp.asarray(z1), jnp.asarray(z2), jnp.asarray(valid), jnp.asarray(labels))
  kw = dict(temperature=0.3, mu=0.6, sigma=0.5, variant="sentence")
  sharded = jax.jit(jax.shard_map(
      lambda a, b, v, lab: losses.diagnostics(a, b, valid=v, labels=lab, axis_name="data", **kw),
      mesh=mesh(), in_specs=(P("data"),) * 4, out_specs=P()))
  got = jax.block_until_ready(sharded(*args))
  expected = ref.diagnostics(z1, z2, t=0.3, mu=0.6, sigma=0.5, variant="sentence", valid=valid,
                             labels=labels)
  for key, value in expected.items():
    np.testing.assert_allclose(float(got[key]), value, rtol=2e-5, atol=2e-6, err_msg=key)


def test_replicated_parameter_gradient_in_train_step_needs_no_psum():
  # A train step: parameters replicated (in_specs P()), batch split over "data", gradient taken
  # inside the shard_map body. With check_vma the transpose of the implicit broadcast of the
  # parameters already sums over devices, so the gradient IS the full-batch one; an extra
  # jax.lax.psum(grads, "data") would multiply it by the number of devices.
  rng = np.random.default_rng(4)
  w = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
  x1 = jnp.asarray(rng.normal(size=(BATCH, 6)), jnp.float32)
  x2 = x1 + 0.1 * jnp.asarray(rng.normal(size=(BATCH, 6)), jnp.float32)

  def loss_fn(w, x1, x2, axis_name=None):
    return losses.adnce(jnp.tanh(x1 @ w), jnp.tanh(x2 @ w), temperature=0.4, mu=0.7, sigma=0.5,
                        axis_name=axis_name)

  step = jax.jit(jax.shard_map(
      lambda w, a, b: jax.value_and_grad(loss_fn)(w, a, b, "data"), mesh=mesh(),
      in_specs=(P(), P("data"), P("data")), out_specs=(P(), P())))
  value, grad = jax.block_until_ready(step(w, x1, x2))
  expected_value, expected_grad = jax.jit(jax.value_and_grad(loss_fn))(w, x1, x2)
  np.testing.assert_allclose(float(value), float(expected_value), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grad), np.asarray(expected_grad), atol=1e-6, rtol=1e-5)
  assert np.abs(np.asarray(expected_grad)).max() > 1e-2


def test_without_check_vma_the_inside_gradient_is_the_device_count_times_too_large():
  # What docs/losses.md warns about: check_vma=False hides that every device's loss is the same
  # global mean, so the all_gather's transpose sums N_DEVICES equal copies of each row's gradient.
  z1, z2, _, _ = inputs()

  def loss_fn(a, b, axis_name=None):
    return losses.infonce(a, b, temperature=0.5, axis_name=axis_name)

  inside = jax.jit(jax.shard_map(
      lambda a, b: jax.grad(loss_fn)(a, b, "data"), mesh=mesh(), in_specs=(P("data"), P("data")),
      out_specs=P("data"), check_vma=False))
  expected = jax.jit(jax.grad(loss_fn))(z1, z2)
  np.testing.assert_allclose(np.asarray(jax.block_until_ready(inside(z1, z2))),
                             N_DEVICES * np.asarray(expected), rtol=1e-4, atol=1e-6)


def test_batch_split_over_two_mesh_axes():
  """axis_name may be a tuple: the batch split over ("slice", "data") of a 2 x 4 mesh (a
  multi-slice TPU pod's layout) gives the one-device values and each device its rows of the
  full-batch gradient, dense and blockwise."""
  two_axes = jax.make_mesh((2, N_DEVICES // 2), ("slice", "data"),
                           axis_types=(jax.sharding.AxisType.Auto,) * 2)
  spec = P(("slice", "data"))
  z1, z2, valid, labels = (jnp.asarray(x) for x in inputs(seed=3))
  for case in ("adnce-image", "adnce-sentence"):
    loss_fn = CASES[case]
    value, grads = jax.value_and_grad(
        lambda a, b, f=loss_fn: f(a, b, valid=valid, labels=labels), (0, 1))(z1, z2)
    for block_size in (None, 4):
      def body(a, b, v, lab, f=loss_fn, kw=_kw(block_size)):
        local_value, local_grads = jax.value_and_grad(
            lambda x, y: f(x, y, valid=v, labels=lab, axis_name=("slice", "data"), **kw),
            (0, 1))(a, b)
        return local_value[None], local_grads
      program = jax.jit(jax.shard_map(body, mesh=two_axes, in_specs=(spec,) * 4,
                                      out_specs=(spec, (spec, spec))))
      per_device, got = jax.block_until_ready(program(z1, z2, valid, labels))
      np.testing.assert_allclose(np.asarray(per_device), np.full(N_DEVICES, float(value)),
                                 rtol=1e-5, atol=1e-6)
      for g, e in zip(got, grads, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), atol=1e-6, rtol=1e-5)


EXPLICIT_CASES = {
    **CASES,
    "infonce-graph": lambda z1, z2, **kw: losses.infonce(z1, z2, temperature=0.2,
                                                         variant="graph", **kw),
    "dcl-image": lambda z1, z2, **kw: losses.dcl(z1, z2, temperature=0.5, tau_plus=0.1, **kw),
    "kl_dro-image": lambda z1, z2, **kw: losses.kl_dro(z1, z2, temperature=0.5, **kw),
    "mean_variance-sentence": lambda z1, z2, **kw: losses.mean_variance(
        z1, z2, temperature=0.5, variant="sentence", **kw),
}


@pytest.mark.parametrize("block_size", [None, 4])
def test_plain_jit_over_arrays_split_on_explicit_mesh_axes(block_size):
  """Without shard_map: a jitted loss of global arrays split over "data" of a mesh with Explicit
  axes (jax.make_mesh's default since jax 0.9) equals the unsplit loss, values and gradients.
  A plain q @ k.T of two batch-split arrays has no legal sharding there (ShardingTypeError)."""
  explicit = jax.make_mesh((N_DEVICES,), ("data",),
                           axis_types=(jax.sharding.AxisType.Explicit,))
  z1, z2, valid, labels = (jnp.asarray(x) for x in inputs(seed=5))
  for case, loss_fn in EXPLICIT_CASES.items():
    kw = {} if block_size is None or case.startswith(("chi2", "mean_var")) else _kw(block_size)

    def value_and_grads(a, b, v, lab, f=loss_fn, kw=kw):
      return jax.value_and_grad(lambda x, y: f(x, y, valid=v, labels=lab, **kw), (0, 1))(a, b)
    expected_value, expected_grads = jax.jit(value_and_grads)(z1, z2, valid, labels)
    with jax.set_mesh(explicit):
      split = [jax.sharding.reshard(x, P("data")) for x in (z1, z2, valid, labels)]
      in_context = jax.block_until_ready(jax.jit(value_and_grads)(*split))
    # and without a mesh context, the arrays carrying their sharding
    split = [jax.device_put(x, jax.sharding.NamedSharding(explicit, P("data")))
             for x in (z1, z2, valid, labels)]
    no_context = jax.block_until_ready(jax.jit(value_and_grads)(*split))
    for value, grads in (in_context, no_context):
      assert jax.typeof(grads[0]).sharding.spec[0] == "data", case  # the rows stay split
      np.testing.assert_allclose(float(value), float(expected_value), rtol=1e-5, err_msg=case)
      for g, e in zip(grads, expected_grads, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), atol=1e-6, rtol=1e-5,
                                   err_msg=case)
  with jax.set_mesh(explicit):
    split = [jax.sharding.reshard(x, P("data")) for x in (z1, z2)]
    got = jax.jit(lambda a, b: losses.diagnostics(a, b, temperature=0.3, mu=0.6, sigma=0.5))(
        *split)
    mu_sigma = jax.jit(lambda a, b: losses.adaptive_mu_sigma(
        a, b, mu=0.5, sigma=0.5, mu_rule="quantile", sigma_rule="std"))(*split)
  expected = losses.diagnostics(z1, z2, temperature=0.3, mu=0.6, sigma=0.5)
  for key, value in expected.items():
    np.testing.assert_allclose(np.asarray(got[key]), np.asarray(value), rtol=2e-5, atol=2e-6,
                               err_msg=key)
  np.testing.assert_allclose(
      np.asarray(mu_sigma), np.asarray(losses.adaptive_mu_sigma(
          z1, z2, mu=0.5, sigma=0.5, mu_rule="quantile", sigma_rule="std")), rtol=1e-5)
