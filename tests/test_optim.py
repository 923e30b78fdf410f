"""Optimisers and learning-rate schedules of the trainer against their definitions."""

import math

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cldro_jax import config_defaults, train


def optim_config(**kw):
  config = config_defaults.base_config("image").optim
  config.update(kw)
  return config


def test_warmup_cosine_schedule_follows_its_formula():
  config = optim_config(schedule="warmup_cosine", lr=0.4, warmup_epochs=2.0, min_lr_ratio=0.1)
  steps_per_epoch, total = 10, 100
  schedule = train.make_schedule(config, total, steps_per_epoch)
  warmup = 20
  for step in (0, 5, 19):
    assert float(schedule(step)) == pytest.approx(0.4 * step / warmup, abs=1e-7)
  for step in (20, 50, 99):
    progress = (step - warmup) / (total - warmup)
    expected = 0.04 + (0.4 - 0.04) * 0.5 * (1 + math.cos(math.pi * progress))
    assert float(schedule(step)) == pytest.approx(expected, rel=1e-5)


def test_schedules_without_warmup_follow_their_formulas_and_do_not_warn(caplog):
  # optax logs a notice for a zero-step warm-up segment (every run without warm-up printed it)
  total = 40
  with caplog.at_level("INFO"):
    cosine = train.make_schedule(
        optim_config(schedule="warmup_cosine", lr=0.4, min_lr_ratio=0.1), total, 10)
    decay = train.make_schedule(optim_config(schedule="linear_decay", lr=3e-5), total, 10)
    values = [(float(cosine(s)), float(decay(s))) for s in (0, 13, 39)]
  assert not [r for r in caplog.records if "transition_steps" in r.getMessage()]
  for (cos_value, decay_value), step in zip(values, (0, 13, 39), strict=True):
    expected = 0.04 + (0.4 - 0.04) * 0.5 * (1 + math.cos(math.pi * step / total))
    assert cos_value == pytest.approx(expected, rel=1e-5)
    assert decay_value == pytest.approx(3e-5 * (1 - step / total), rel=1e-5)


def test_linear_decay_after_warmup():
  # 1 epoch of 4 steps up from 0, then down to 0 over the remaining 16 steps
  schedule = train.make_schedule(
      optim_config(schedule="linear_decay", lr=1e-3, warmup_epochs=1.0), 20, 4)
  np.testing.assert_allclose([float(schedule(s)) for s in (0, 2, 4, 12, 19)],
                             [0.0, 5e-4, 1e-3, 5e-4, 1e-3 / 16], rtol=1e-6)


def test_constant_and_linear_decay_schedules():
  assert float(train.make_schedule(optim_config(lr=1e-3), 50, 5)(37)) == pytest.approx(1e-3)
  decay = train.make_schedule(optim_config(schedule="linear_decay", lr=3e-5), 4, 4)
  np.testing.assert_allclose([float(decay(s)) for s in range(4)],
                             [3e-5, 2.25e-5, 1.5e-5, 7.5e-6], rtol=1e-6)
  # constant after a linear warm-up from 0 (1.5 epochs of 4 steps = 6 steps)
  warm = train.make_schedule(optim_config(lr=0.3, warmup_epochs=1.5), 40, 4)
  np.testing.assert_allclose([float(warm(s)) for s in (0, 3, 5, 6, 7, 39)],
                             [0.0, 0.15, 0.25, 0.3, 0.3, 0.3], rtol=1e-6)
  with pytest.raises(ValueError, match="Unknown schedule 'step'"):
    train.make_schedule(optim_config(schedule="step"), 10, 5)


def _one_update(config, params, grads, name="w"):
  tx = train.make_optimizer(config, train.make_schedule(config, 10, 10))
  updates, _ = tx.update(grads, tx.init(params), params)
  return np.asarray(updates[name], np.float64)


def test_adam_has_pytorch_coupled_weight_decay():
  # torch.optim.Adam(weight_decay=wd): g <- g + wd * w, then Adam; the first step is
  # -lr * g / (|g| + eps) per coordinate.
  params, grads = {"w": jnp.asarray([1.0, -2.0, 0.5])}, {"w": jnp.asarray([0.1, 0.3, -0.2])}
  config = optim_config(name="adam", lr=0.01, weight_decay=0.5)
  g = np.asarray(grads["w"], np.float64) + 0.5 * np.asarray(params["w"], np.float64)
  np.testing.assert_allclose(_one_update(config, params, grads), -0.01 * g / (np.abs(g) + 1e-8),
                             rtol=1e-5)


def test_sgd_momentum_and_lars_first_steps():
  params, grads = {"w": jnp.asarray([1.0, -2.0, 0.5])}, {"w": jnp.asarray([0.1, 0.3, -0.2])}
  w, g = np.asarray(params["w"], np.float64), np.asarray(grads["w"], np.float64)
  sgd = optim_config(name="sgd", lr=0.1, weight_decay=1e-2, momentum=0.9)
  np.testing.assert_allclose(_one_update(sgd, params, grads), -0.1 * (g + 1e-2 * w), rtol=1e-6)
  # LARS (You et al. 2017; SimCLR's exclusions): a kernel's decayed gradient is rescaled by the
  # trust ratio eta * ||w|| / ||g + wd w|| with eta = 0.001 before momentum; biases and
  # BatchNorm parameters (1-D) get neither decay nor the ratio.
  lars = optim_config(name="lars", lr=0.1, weight_decay=1e-2, momentum=0.9)
  kernel = np.array([[1.0, -2.0], [0.5, 3.0]])
  kernel_grad = np.array([[0.1, 0.3], [-0.2, 0.05]])
  params = {"w": jnp.asarray(kernel), "b": jnp.asarray([1.0, -2.0, 0.5])}
  grads = {"w": jnp.asarray(kernel_grad), "b": jnp.asarray([0.1, 0.3, -0.2])}
  decayed = kernel_grad + 1e-2 * kernel
  trust = 0.001 * np.linalg.norm(kernel) / np.linalg.norm(decayed)
  np.testing.assert_allclose(_one_update(lars, params, grads), -0.1 * trust * decayed, rtol=1e-5)
  np.testing.assert_allclose(_one_update(lars, params, grads, "b"), -0.1 * g, rtol=1e-6)


def test_adamw_decays_kernels_and_exempts_biases_and_norms_as_the_hf_trainer():
  """Decoupled decay (first step: -lr * (g / (|g| + eps) + wd * w)) on the parameters with more
  than one axis; the Hugging Face Trainer exempts biases and LayerNorm weights, which in
  BERT/RoBERTa are exactly the 1-D ones (first step: -lr * g / (|g| + eps))."""
  config = optim_config(name="adamw", lr=0.01, weight_decay=0.1)
  kernel = np.array([[1.0, -2.0], [0.5, 3.0]])
  kernel_grad = np.array([[0.1, 0.3], [-0.2, 0.05]])
  bias, bias_grad = np.array([1.0, -2.0, 0.5]), np.array([0.1, 0.3, -0.2])
  params = {"kernel": jnp.asarray(kernel), "LayerNorm": {"scale": jnp.asarray(bias)},
            "bias": jnp.asarray(bias)}
  grads = {"kernel": jnp.asarray(kernel_grad), "LayerNorm": {"scale": jnp.asarray(bias_grad)},
           "bias": jnp.asarray(bias_grad)}
  adam_step = lambda g: g / (np.abs(g) + 1e-8)  # noqa: E731
  np.testing.assert_allclose(_one_update(config, params, grads, "kernel"),
                             -0.01 * (adam_step(kernel_grad) + 0.1 * kernel), rtol=1e-5)
  np.testing.assert_allclose(_one_update(config, params, grads, "bias"),
                             -0.01 * adam_step(bias_grad), rtol=1e-5)
  tx = train.make_optimizer(config, train.make_schedule(config, 10, 10))
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(np.asarray(updates["LayerNorm"]["scale"]),
                             -0.01 * adam_step(bias_grad), rtol=1e-5)


def test_unknown_optimizer_is_refused():
  config = config_defaults.base_config("image")
  config.optim.name = "adagrad"
  with pytest.raises(ValueError, match="optim.name='adagrad' is not one of"):
    config_defaults.validate_config(config)


# docs/config.md: optim.warmup_epochs is "rounded to steps".
def test_warmup_epochs_round_to_the_nearest_step():
  # 0.1 epoch of 12 steps = 1.2 -> 1 warm-up step: the full rate from step 1 on.
  schedule = train.make_schedule(optim_config(lr=0.3, warmup_epochs=0.1), 20, 12)
  assert float(schedule(0)) == 0.0
  assert float(schedule(1)) == pytest.approx(0.3)


# torch.optim.SGD / SimCLR's LARS (dampening 0): buf_t = m * buf_{t-1} + g_t,
# update_t = -lr * buf_t. The first step (all test_optim checks) cannot see the momentum.
@pytest.mark.parametrize("name", ["sgd", "lars"])
def test_momentum_carries_the_previous_gradient_into_the_second_step(name):
  config = optim_config(name=name, lr=0.1, weight_decay=0.0, momentum=0.9)
  tx = train.make_optimizer(config, train.make_schedule(config, 10, 10))
  params = {"b": jnp.asarray([1.0, -2.0, 0.5])}   # 1-D: no trust ratio, no decay under LARS
  g1, g2 = np.array([0.1, 0.3, -0.2]), np.array([-0.4, 0.2, 0.05])
  state = tx.init(params)
  u1, state = tx.update({"b": jnp.asarray(g1, jnp.float32)}, state, params)
  params = optax.apply_updates(params, u1)
  u2, _ = tx.update({"b": jnp.asarray(g2, jnp.float32)}, state, params)
  np.testing.assert_allclose(np.asarray(u2["b"]), -0.1 * (g2 + 0.9 * g1), rtol=1e-6)
