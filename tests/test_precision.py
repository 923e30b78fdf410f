"""bf16 compute keeps what must stay exact: every dropout divides by keep_prob in float32 (bf16
rounds 0.9 to 0.898, a 0.18% training-only scale on kept values), GIN's BatchNorm hands float32 to
the next layer, and the evaluation of image and graph runs is float32 whatever the training dtype
(the scores of the same weights must not depend on how they were trained)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cldro_jax import train
from cldro_jax.models import bert, gin
from cldro_jax.models.hf_checkpoint import read_config
from cldro_jax.tasks import graph as graph_task
from cldro_jax.tasks import image as image_task
from helpers import tiny_image_config, with_overrides
from test_train_graph import mutag_config
from test_train_sentence import ROBERTA_DIR


def _inputs_of(module_type, apply):
  """The dtypes of the first argument of every `module_type` call during `apply()`."""
  seen = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, module_type) and context.method_name == "__call__":
      seen.append(args[0].dtype)
    return next_fun(*args, **kwargs)
  with nn.intercept_methods(record):
    apply()
  return seen


def _outputs_of(module_type, apply):
  seen = []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, module_type) and context.method_name == "__call__":
      seen.append(out.dtype)
    return out
  with nn.intercept_methods(record):
    apply()
  return seen


def test_every_bert_dropout_runs_in_float32_under_bf16():
  config = read_config(str(ROBERTA_DIR))
  model = bert.SentenceEncoder(config, dtype=jnp.bfloat16)
  params = bert.init_params(model, jax.random.key(0))
  ids = jnp.full((2, 6), 5, jnp.int32)
  mask = jnp.ones((2, 6), jnp.int32)
  dtypes = _inputs_of(nn.Dropout, lambda: model.apply(
      {"params": params}, ids, mask, train=True, use_mlp=True,
      rngs={"dropout": jax.random.key(1)}))
  # Embeddings, then attention probabilities and two dense outputs per layer.
  assert len(dtypes) == 1 + 3 * config.num_hidden_layers
  assert set(dtypes) == {jnp.dtype(jnp.float32)}


def test_gin_batchnorm_hands_float32_to_the_next_layer_under_bf16():
  config = mutag_config(**{"model.dtype": "bfloat16"})
  task = graph_task.GraphTask(config, train.make_mesh(1))
  model = gin.GIN(num_layers=config.model.num_layers, hidden=config.model.hidden,
                  dtype=jnp.bfloat16)
  batch = task._dummy_batch()  # pylint: disable=protected-access
  variables = model.init(jax.random.key(0), batch, train=False)
  dtypes = _outputs_of(gin.MaskedBatchNorm, lambda: model.apply(variables, batch, train=False))
  assert dtypes == [jnp.dtype(jnp.float32)] * config.model.num_layers


def test_graph_embeddings_are_float32_computations_whatever_the_training_dtype():
  f32 = graph_task.GraphTask(mutag_config(), train.make_mesh(1))
  bf16 = graph_task.GraphTask(mutag_config(**{"model.dtype": "bfloat16"}), train.make_mesh(1))
  params, model_state = f32.init(jax.random.key(0))
  emb_f32, labels = f32.embeddings(params, model_state)
  emb_bf16, labels_bf16 = bf16.embeddings(params, model_state)
  np.testing.assert_array_equal(labels_bf16, labels)
  np.testing.assert_array_equal(emb_bf16, emb_f32)


def test_image_features_are_float32_computations_whatever_the_training_dtype():
  f32 = image_task.ImageTask(tiny_image_config(), train.make_mesh(1))
  bf16 = image_task.ImageTask(with_overrides(tiny_image_config(), **{"model.dtype": "bfloat16"}),
                              train.make_mesh(1))
  params, model_state = f32.init(jax.random.key(0))
  feats_f32, labels = f32.extract_features(params, model_state, f32.dataset.test)
  feats_bf16, labels_bf16 = bf16.extract_features(params, model_state, bf16.dataset.test)
  np.testing.assert_array_equal(labels_bf16, labels)
  np.testing.assert_array_equal(feats_bf16, feats_f32)
