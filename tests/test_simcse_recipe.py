"""The sentence recipe against SimCSE's unsupervised training loop, transcribed independently.

SimCSE (and the ADNCE authors' `sentence/` fork of it) trains through the Hugging Face Trainer of
transformers 4.2.1: gradients clipped to global norm `max_grad_norm` = 1.0, then transformers'
AdamW (betas 0.9/0.999, eps `adam_epsilon` = 1e-8, weight decay 0, bias correction on), then the
linear schedule without warm-up, whose factor for the update at step s (0-based) is (T - s) / T.
Positive pairs: the (batch, 2, length) input viewed as 2 x batch rows, so rows 2i and 2i + 1 are
sentence i under two independent dropout masks (`cl_forward` in simcse/models.py).
"""

import dataclasses
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from cldro_jax import train
from cldro_jax.data import text
from cldro_jax.models import bert
from cldro_jax.tasks import sentence
from configs import sts_bert as sts_bert_config
from configs import sts_roberta as sts_roberta_config

ROBERTA_DIR = pathlib.Path(__file__).parent / "fixtures" / "sentence" / "roberta_tiny"


def _hf_trainer_updates(grads, lr, total_steps, *, max_grad_norm=1.0, betas=(0.9, 0.999),
                        eps=1e-8):
  """Per-step parameter updates of SimCSE's Trainer loop and its raw second moments, float64.

  clip_grad_norm_ (coefficient max_norm / (norm + 1e-6), applied when below 1), then
  transformers.AdamW.step: m, v moments; p -= lr_s * sqrt(1 - b2^t) / (1 - b1^t) * m /
  (sqrt(v) + eps); lr_s = lr * (T - s) / T (get_linear_schedule_with_warmup, 0 warm-up steps).
  """
  b1, b2 = betas
  m = np.zeros_like(grads[0])
  v = np.zeros_like(grads[0])
  updates = []
  for s, g in enumerate(grads):
    norm = np.sqrt(np.sum(g * g))
    coef = max_grad_norm / (norm + 1e-6)
    if coef < 1:
      g = g * coef
    t = s + 1
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    lr_s = lr * (total_steps - s) / total_steps
    step_size = lr_s * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
    updates.append((-step_size * m / (np.sqrt(v) + eps), v.copy()))
  return updates


def test_optimizer_steps_follow_the_hf_trainer_of_simcse():
  rng = np.random.default_rng(0)
  total = 8
  # Gradients of global norm above 1 (clipped) and below (left alone).
  scales = (5.0, 0.3, 2.0, 0.05, 1.5)
  grads = [rng.choice([-1, 1], size=64) * rng.uniform(1e-3, 1.0, size=64) for _ in scales]
  grads = [g / np.linalg.norm(g) * s for g, s in zip(grads, scales)]
  for module in (sts_bert_config, sts_roberta_config):
    config = module.get_config()
    schedule = train.make_schedule(config.optim, total, total)
    tx = train.make_optimizer(config.optim, schedule)
    params = {"w": jnp.ones(64, jnp.float32)}   # nonzero: a weight decay would show
    state = tx.init(params)
    expected = _hf_trainer_updates(grads, config.optim.lr, total)
    for s, g in enumerate(grads):
      updates, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state, params)
      want, v = expected[s]
      # transformers' AdamW adds eps to sqrt(v), optax (and torch.optim.AdamW) to the bias-
      # corrected sqrt(v_hat): the denominators differ by eps (1 / sqrt(1 - b2^t) - 1), a
      # relative change of at most eps / sqrt(v) (1e-4 at step 1 for a 3e-3 gradient; the gap is
      # 30 eps at step 1, under one eps from step 500 on). Allowed on top of float32 round-off
      # (of the update's scale, lr: the moments of sign-changing gradients cancel), nothing more.
      allowed = np.abs(want) * 1e-8 / np.sqrt(v) + 2e-5 * config.optim.lr
      got = np.asarray(updates["w"], np.float64)
      assert np.all(np.abs(got - want) <= allowed), (module.__name__, s, np.max(
          np.abs(got - want) / allowed))


def test_dropout_views_are_rows_2i_and_2i_plus_1_of_sentence_i():
  config, params = bert.load_pretrained(str(ROBERTA_DIR))
  params = jax.tree.map(jnp.asarray, params)
  batch = text.SentenceTokenizer(str(ROBERTA_DIR)).encode_batch(
      ["A man plays a guitar.", "The dog sleeps.", "Red small book reads quickly in the park."],
      32)
  ids, mask = batch["input_ids"], batch["attention_mask"]
  # Without dropout both views of sentence i are its deterministic (MLP) embedding: the task's
  # pairing is sentence i with itself, the positive of SimCSE's cross-entropy label i.
  no_drop = bert.SentenceEncoder(dataclasses.replace(
      config, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), pooling="cls")
  z1, z2 = sentence.dropout_views(no_drop, params, ids, mask, jax.random.key(0), use_mlp=True)
  deterministic = no_drop.apply({"params": params}, ids, mask, train=False, use_mlp=True)
  np.testing.assert_allclose(np.asarray(z1), np.asarray(deterministic), atol=1e-5)
  np.testing.assert_allclose(np.asarray(z2), np.asarray(deterministic), atol=1e-5)
  # With the checkpoint's dropout (0.1) the two views differ: independent masks per view.
  assert (config.hidden_dropout_prob, config.attention_probs_dropout_prob) == (0.1, 0.1)
  model = bert.SentenceEncoder(config, pooling="cls")
  z1, z2 = sentence.dropout_views(model, params, ids, mask, jax.random.key(0), use_mlp=True)
  assert np.all(np.abs(np.asarray(z1) - np.asarray(z2)).max(axis=1) > 1e-3)
