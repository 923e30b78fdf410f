"""ViewBatchNorm: both views in one pass equal one pass per view (the reference's two passes).

Two independent references: Flax's own `nn.BatchNorm` (for one view), and the model run once per
view with one view each (what the trainer did before, and what the reference code does), compared
on outputs, updated running statistics and parameter gradients in float64.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cldro_jax.models import heads
from cldro_jax.models import resnet
from cldro_jax.models import view_norm


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_one_view_equals_flax_batchnorm(dtype):
  x = jax.random.normal(jax.random.PRNGKey(0), (16, 5, 5, 8)) * 3.0 + 1.5
  x = x.astype(dtype)
  ours = view_norm.ViewBatchNorm(momentum=0.9, epsilon=1e-5, dtype=dtype)
  flax_bn = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5, dtype=dtype)
  variables = flax_bn.init(jax.random.PRNGKey(1), x)
  # Non-trivial scale, bias and running statistics, shared by both modules.
  keys = jax.random.split(jax.random.PRNGKey(2), 4)
  variables = {
      "params": {"scale": 1 + 0.3 * jax.random.normal(keys[0], (8,)),
                 "bias": 0.2 * jax.random.normal(keys[1], (8,))},
      "batch_stats": {"mean": jax.random.normal(keys[2], (8,)),
                      "var": jnp.exp(jax.random.normal(keys[3], (8,)))}}
  assert jax.tree.structure(ours.init(jax.random.PRNGKey(1), x)) == jax.tree.structure(variables)
  y_ours, upd_ours = ours.apply(variables, x, mutable=["batch_stats"])
  y_flax, upd_flax = flax_bn.apply(variables, x, mutable=["batch_stats"])
  assert y_ours.dtype == y_flax.dtype == dtype
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(np.asarray(y_ours, np.float32), np.asarray(y_flax, np.float32),
                             atol=tol, rtol=tol)
  for name in ("mean", "var"):
    np.testing.assert_allclose(upd_ours["batch_stats"][name], upd_flax["batch_stats"][name],
                               rtol=1e-5, atol=1e-6)
  # Evaluation mode: the running averages, for any number of views.
  y_eval = view_norm.ViewBatchNorm(use_running_average=True, num_views=2, dtype=dtype).apply(
      variables, x)
  y_flax_eval = nn.BatchNorm(use_running_average=True, dtype=dtype).apply(variables, x)
  np.testing.assert_allclose(np.asarray(y_eval, np.float32), np.asarray(y_flax_eval, np.float32),
                             atol=tol, rtol=tol)


def test_per_view_statistics_and_sequential_running_updates_against_numpy():
  rng = np.random.default_rng(0)
  v1 = rng.normal(2.0, 3.0, (6, 4, 4, 3))
  v2 = rng.normal(-1.0, 0.5, (6, 4, 4, 3))
  bn = view_norm.ViewBatchNorm(num_views=2, momentum=0.8, epsilon=1e-3)
  variables = bn.init(jax.random.PRNGKey(0), view_norm.interleave_views(v1, v2))
  y, upd = bn.apply(variables, view_norm.interleave_views(jnp.asarray(v1, jnp.float32),
                                           jnp.asarray(v2, jnp.float32)),
                    mutable=["batch_stats"])
  y = np.asarray(y).reshape(6, 2, 4, 4, 3)
  ra_mean, ra_var = np.zeros(3), np.ones(3)
  for v, view in enumerate((v1, v2)):
    mean, var = view.mean(axis=(0, 1, 2)), view.var(axis=(0, 1, 2))   # biased, as Flax
    np.testing.assert_allclose(y[:, v], (view - mean) / np.sqrt(var + 1e-3), atol=2e-5)
    ra_mean, ra_var = 0.8 * ra_mean + 0.2 * mean, 0.8 * ra_var + 0.2 * var
  np.testing.assert_allclose(upd["batch_stats"]["mean"], ra_mean, rtol=1e-5)
  np.testing.assert_allclose(upd["batch_stats"]["var"], ra_var, rtol=1e-5)


def test_rows_that_do_not_split_into_views_are_refused():
  bn = view_norm.ViewBatchNorm(num_views=2)
  with pytest.raises(ValueError, match="do not split into 2"):
    bn.init(jax.random.PRNGKey(0), jnp.ones((5, 3)))


@pytest.mark.parametrize("name", ["resnet18"])
def test_one_pass_over_both_views_equals_one_pass_per_view(name):
  """Outputs, running statistics after the step and parameter gradients, in float64."""
  with jax.enable_x64(True):
    model = heads.ContrastiveModel(
        encoder=resnet.get_encoder(name, stem="cifar", width=4, dtype=jnp.float64,
                                   param_dtype=jnp.float64),
        head=heads.ProjectionHead(hidden=16, out=8, dtype=jnp.float64, param_dtype=jnp.float64))
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    view1 = jax.random.normal(k1, (6, 8, 8, 3), jnp.float64)
    view2 = 0.5 * jax.random.normal(k2, (6, 8, 8, 3), jnp.float64) + 0.3
    variables = model.init(k3, view1, train=False)
    params, state = variables["params"], {"batch_stats": variables["batch_stats"]}

    def two_passes(params):
      (f1, z1), upd = model.apply({"params": params, **state}, view1, train=True,
                                  mutable=["batch_stats"])
      (f2, z2), upd = model.apply({"params": params, **upd}, view2, train=True,
                                  mutable=["batch_stats"])
      return jnp.sum(z1 * z2) + jnp.sum(f1 ** 2) - jnp.sum(f2), (f1, f2, z1, z2, upd)

    def one_pass(params):
      (f, z), upd = model.apply({"params": params, **state}, view_norm.interleave_views(view1, view2),
                                train=True, num_views=2, mutable=["batch_stats"])
      f1, f2, z1, z2 = f[0::2], f[1::2], z[0::2], z[1::2]
      return jnp.sum(z1 * z2) + jnp.sum(f1 ** 2) - jnp.sum(f2), (f1, f2, z1, z2, upd)

    (loss_ref, aux_ref), grad_ref = jax.jit(jax.value_and_grad(two_passes, has_aux=True))(params)
    (loss, aux), grad = jax.jit(jax.value_and_grad(one_pass, has_aux=True))(params)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-10)
    for got, want in zip(jax.tree.leaves((aux, grad)), jax.tree.leaves((aux_ref, grad_ref)),
                         strict=True):
      # Equal up to round-off (reductions run in another order): running statistics are stored
      # in float32 (as Flax's), everything else is float64.
      rtol = 1e-6 if got.dtype == jnp.float32 else 1e-7
      np.testing.assert_allclose(got, want, rtol=rtol, atol=1e-7)
    # The two views really are normalised separately (per-view statistics differ).
    (f_merged, _), _ = model.apply({"params": params, **state}, view_norm.interleave_views(view1, view2),
                                   train=True, num_views=1, mutable=["batch_stats"])
    assert not np.allclose(f_merged[0::2], aux_ref[0])
