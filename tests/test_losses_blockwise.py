"""The memory-bounded path (`block_size=`) equals the dense path, and its memory is linear in B.

Values and gradients (with respect to both views, the temperature and HCL's beta) agree for
block sizes that divide the candidate count, that do not (padding columns), and that exceed
it; with masks; under vmap. XLA's compiled memory analysis of the gradient shows the blockwise
temporaries are a small fraction of the dense ones and grow about linearly with the batch.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cldro_jax import losses
import reference_losses as ref

BATCH, DIM = 7, 6


def family_loss(family, z1, z2, t, beta, valid, labels, block_size):
  name, variant = family.split("-")
  kw = dict(valid=valid, labels=labels, block_size=block_size)
  if name == "infonce":
    return losses.infonce(z1, z2, temperature=t, variant=variant, **kw)
  if name == "adnce":
    return losses.adnce(z1, z2, temperature=t, mu=0.6, sigma=0.5, variant=variant, **kw)
  if name == "hcl":
    return losses.hcl(z1, z2, temperature=t, tau_plus=0.1, beta=beta, **kw)
  if name == "dcl":
    return losses.dcl(z1, z2, temperature=t, tau_plus=0.1, **kw)
  if name == "cauchy":   # weighted_nce with a user weighting; `beta` is its (traced) mu
    return losses.weighted_nce(z1, z2, temperature=t, log_weight=_cauchy_log_weight,
                               weight_params=dict(mu=beta, sigma=0.5), variant=variant, **kw)
  return losses.kl_dro(z1, z2, temperature=t, variant=variant, **kw)


def _cauchy_log_weight(sim, params):
  return -jnp.log1p(jnp.square((sim - params["mu"]) / params["sigma"]))


def block_sizes(family):
  # 5 leaves a partial last block; 64 exceeds every candidate count (a single block)
  return (5, 64) if family == "adnce-image" else (5,)


@functools.lru_cache(maxsize=None)
def dense_and_blockwise(family):
  """One program: value and gradients (z1, z2, t, beta) for dense and each block size."""
  def program(z1, z2, t, beta, valid, labels):
    out = []
    for block_size in (None,) + block_sizes(family):
      fn = functools.partial(family_loss, family, valid=valid, labels=labels,
                             block_size=block_size)
      out.append(jax.value_and_grad(fn, (0, 1, 2, 3))(z1, z2, t, beta))
    return out
  return jax.jit(program)


# one-statistic (infonce, kl_dro) and two-statistic (adnce, hcl) kernels, every variant
FAMILIES = ["infonce-sentence", "adnce-image", "adnce-graph", "hcl-image", "kl_dro-sentence",
            "cauchy-sentence"]


@pytest.mark.parametrize("family", FAMILIES)
def test_blockwise_equals_dense(family):
  rng = np.random.default_rng(0)
  for mask in ("none", "both"):
    z1 = rng.normal(size=(BATCH, DIM)).astype(np.float32)
    z2 = (z1 + 0.5 * rng.normal(size=(BATCH, DIM))).astype(np.float32)
    valid = np.ones(BATCH, bool)
    labels = np.arange(BATCH)
    if mask == "both":
      valid[[2, 5]] = False
      labels = labels % 3
    results = dense_and_blockwise(family)(z1, z2, jnp.float32(0.2), jnp.float32(0.7),
                                          jnp.asarray(valid), jnp.asarray(labels))
    (dense_value, dense_grads), blockwise = results[0], results[1:]
    for (value, grads), block_size in zip(blockwise, block_sizes(family), strict=True):
      np.testing.assert_allclose(float(value), float(dense_value), rtol=2e-6,
                                 err_msg=f"block_size={block_size}")
      for g, e in zip(grads, dense_grads, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=2e-5, atol=2e-6,
                                   err_msg=f"block_size={block_size}")
    if family == "adnce-image":  # dense itself is checked against the reference elsewhere
      np.testing.assert_allclose(
          float(dense_value), ref.weighted_nce(z1, z2, t=0.2, variant="image", mu=0.6, sigma=0.5,
                                               valid=valid, labels=labels), rtol=1e-5)


def test_blockwise_under_vmap_and_low_temperature():
  rng = np.random.default_rng(1)
  z1 = jnp.asarray(rng.normal(size=(3, 8, 4)), jnp.float32)
  z2 = z1 + 0.05 * jnp.asarray(rng.normal(size=(3, 8, 4)), jnp.float32)

  def both(a, b):
    def fn(block_size):
      return functools.partial(losses.adnce, temperature=0.01, mu=0.7, sigma=0.5,
                               block_size=block_size)
    return (jax.value_and_grad(fn(None), (0, 1))(a, b), jax.value_and_grad(fn(3), (0, 1))(a, b))

  (dense, dense_grads), (block, block_grads) = jax.jit(jax.vmap(both))(z1, z2)
  assert np.all(np.isfinite(np.asarray(block)))
  np.testing.assert_allclose(np.asarray(block), np.asarray(dense), rtol=1e-5)
  for g, e in zip(block_grads, dense_grads, strict=True):
    np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-4, atol=1e-4)


def _grad_temp_bytes(batch, block_size, dim=128):
  z = jax.ShapeDtypeStruct((batch, dim), jnp.float32)
  fn = jax.grad(lambda a, b: losses.adnce(a, b, temperature=0.4, mu=0.7, sigma=0.5,
                                          block_size=block_size), (0, 1))
  analysis = jax.jit(fn).lower(z, z).compile().memory_analysis()
  return analysis.temp_size_in_bytes


def test_blockwise_gradient_memory_is_linear_in_batch():
  # Image variant: 2B x 2B similarities. Dense at B=4096 holds several 8192 x 8192 float32
  # arrays (256 MiB each); blockwise with 512 columns holds 8192 x 512 blocks.
  dense_4096 = _grad_temp_bytes(4096, None)
  block_2048 = _grad_temp_bytes(2048, 512)
  block_4096 = _grad_temp_bytes(4096, 512)
  assert dense_4096 >= 2 * (2 * 4096) ** 2 * 4  # at least two full similarity matrices
  assert block_4096 < 0.1 * dense_4096, (block_4096, dense_4096)
  assert 1.6 < block_4096 / block_2048 < 2.4, (block_2048, block_4096)


@pytest.mark.parametrize("name", ["infonce", "adnce", "hcl", "kl_dro"])
@pytest.mark.parametrize("precision", ["highest", None])
def test_backward_pass_keeps_the_precision_the_loss_was_called_with(name, precision):
  """`with jax.default_matmul_precision(p): loss(...)` under `jax.grad` gives every matmul of
  the blockwise path precision p, the backward pass's too (its custom_vjp rule is traced after
  the caller's block has closed)."""
  kw = {"infonce": dict(temperature=0.5), "adnce": dict(temperature=0.5, mu=0.7, sigma=1.0),
        "hcl": dict(temperature=0.5, tau_plus=0.1, beta=1.0), "kl_dro": dict(temperature=0.5)}
  loss = getattr(losses, name)

  def fn(a, b):
    if precision is None:
      return loss(a, b, block_size=4, **kw[name])
    with jax.default_matmul_precision(precision):
      return loss(a, b, block_size=4, **kw[name])
  z = jnp.ones((BATCH, DIM))
  hlo = jax.jit(jax.grad(fn, argnums=(0, 1))).lower(z, z).as_text()
  dots = [line for line in hlo.splitlines() if "stablehlo.dot_general" in line]
  want = "HIGHEST" if precision else "DEFAULT"
  assert len(dots) >= 3 and all(f"precision = [{want}, {want}]" in d for d in dots), dots
