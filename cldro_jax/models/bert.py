"""BERT and RoBERTa sentence encoders in Flax Linen, with Hugging Face parameter names.

The parameter tree mirrors Hugging Face's `BertModel`/`RobertaModel` names one to one
(`embeddings/word_embeddings/embedding` <-> `embeddings.word_embeddings.weight`,
`encoder/layer/3/attention/self/query/kernel` <-> `encoder.layer.3.attention.self.query.weight`,
`pooler/dense/...` <-> `pooler.dense...`), so `hf_checkpoint.load_pretrained` / `export_pretrained`
map by name. Numerics follow HF: post-LayerNorm blocks, exact erf GELU for `hidden_act="gelu"`,
LayerNorm eps from the config, RoBERTa position ids counted from padding_idx + 1 over non-padding
tokens, dropout on hidden states and on attention probabilities (active only with `train=True`:
SimCSE's two views of a sentence differ only by this dropout).

Training vs evaluation (SimCSE's `cls` / `cls_before_pooler`): the MLP (Dense h->h + tanh, stored
as HF's `pooler.dense`) is used in training and NOT at evaluation; `SentenceEncoder.__call__`
takes `use_mlp` explicitly so every call site says which one it is.

Typical use on its own (the trainer does the same through `tasks/sentence.py`: `SentenceTask.init`
and `dropout_views`, whose 2i / 2i+1 row layout keeps both views of a sentence on one device):

    config, pretrained = load_pretrained(folder)
    model = SentenceEncoder(config, pooling="cls", dtype=jnp.bfloat16)
    params = init_from_pretrained(model, pretrained, rng, mlp_init="fresh")   # SimCSE
    z1, z2 = two_views(model, params, input_ids, attention_mask, dropout_rng)  # one device
    emb = model.apply({"params": params}, ids, mask, train=False, use_mlp=False)  # evaluation
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cldro_jax.models.hf_checkpoint import (  # noqa: F401  (re-exported API)
    EncoderConfig, Params, expected_hf_shapes, export_pretrained, flax_path_to_hf,
    load_pretrained, read_config)

Array = jax.Array
Dtype = Any

# Evaluation/training poolers by name -> (pooling of the last layer, apply the MLP).
POOLERS = {"cls": ("cls", False), "cls_mlp": ("cls", True), "mean": ("mean", False)}


def pooler_settings(name: str) -> tuple[str, bool]:
  """'cls' | 'cls_mlp' | 'mean' -> (pooling, use_mlp) for SentenceEncoder."""
  if name not in POOLERS:
    raise ValueError(f"Unknown pooler {name!r}: choose one of {sorted(POOLERS)}.")
  return POOLERS[name]


def position_ids(input_ids: Array, config: EncoderConfig) -> Array:
  """Absolute position ids; RoBERTa's skip padding, as HF's create_position_ids_from_input_ids."""
  if config.model_type == "roberta":
    not_pad = (input_ids != config.pad_token_id).astype(jnp.int32)
    return jnp.cumsum(not_pad, axis=1) * not_pad + config.pad_token_id
  return jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)


def _activation(name: str):
  # HF's "gelu" is the exact erf form; "gelu_new"/"gelu_pytorch_tanh" are the tanh approximation.
  return {
      "gelu": functools.partial(jax.nn.gelu, approximate=False),
      "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
      "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
      "relu": jax.nn.relu,
  }[name]


def _dense(config: EncoderConfig, features: int, dtype: Dtype, name: str) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, name=name,
                  kernel_init=nn.initializers.normal(config.initializer_range))


def _layer_norm(config: EncoderConfig) -> nn.LayerNorm:
  # Float32 output whatever the compute dtype: the residual stream stays float32 and only the
  # Dense layers compute in bf16, as the reference's mixed precision (torch autocast runs
  # LayerNorm in float32, and a half-precision Dense output added to it promotes to float32).
  return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=jnp.float32, param_dtype=jnp.float32,
                      name="LayerNorm")


class Embeddings(nn.Module):
  """Word + position + token-type embeddings, LayerNorm, dropout (HF `embeddings`)."""
  config: EncoderConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: Array, token_type_ids: Array, *, train: bool) -> Array:
    cfg = self.config
    # An out-of-range gather is NaN in JAX (PyTorch raises IndexError): positions past the
    # table would turn every embedding of the batch to NaN. The length is static: checked once.
    if input_ids.shape[-1] > cfg.max_tokens:
      raise ValueError(
          f"Inputs of {input_ids.shape[-1]} tokens are longer than the {cfg.max_tokens} "
          f"positions of this {cfg.model_type} model (config.json max_position_embeddings="
          f"{cfg.max_position_embeddings}"
          + (f", RoBERTa positions start at {cfg.position_offset}" if cfg.position_offset else "")
          + f"): tokenise with max_length <= {cfg.max_tokens}.")
    # Looked up and summed in float32 (a gather, no arithmetic to save), as under autocast.
    embed = functools.partial(nn.Embed, features=cfg.hidden_size, dtype=jnp.float32,
                              param_dtype=jnp.float32,
                              embedding_init=nn.initializers.normal(cfg.initializer_range))
    x = (embed(cfg.vocab_size, name="word_embeddings")(input_ids)
         + embed(cfg.max_position_embeddings, name="position_embeddings")(
             position_ids(input_ids, cfg))
         + embed(cfg.type_vocab_size, name="token_type_embeddings")(token_type_ids))
    x = _layer_norm(cfg)(x)
    return nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=not train)


class SelfAttention(nn.Module):
  """Multi-head self-attention with HF's `query`/`key`/`value` Dense layers."""
  config: EncoderConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, attention_mask: Array, *, train: bool) -> Array:
    cfg = self.config
    heads = cfg.num_attention_heads
    head_dim = cfg.hidden_size // heads
    split = lambda t: t.reshape(*t.shape[:-1], heads, head_dim)  # noqa: E731
    q = split(_dense(cfg, cfg.hidden_size, self.dtype, "query")(x))
    k = split(_dense(cfg, cfg.hidden_size, self.dtype, "key")(x))
    v = split(_dense(cfg, cfg.hidden_size, self.dtype, "value")(x))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim).astype(self.dtype)
    # Softmax in float32 (bf16 logits lose the small differences that matter after exp);
    # padded keys get the most negative float instead of an additive bias, which cannot overflow.
    keep = attention_mask[:, None, None, :].astype(bool)
    scores = jnp.where(keep, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    # Dropout before the cast: Flax divides by keep_prob in the input's dtype, and bf16 rounds
    # 0.9 to 0.898, which would scale every kept probability up by 0.18% in training only.
    probs = nn.Dropout(cfg.attention_probs_dropout_prob)(jax.nn.softmax(scores, axis=-1),
                                                         deterministic=not train)
    probs = probs.astype(self.dtype)
    context = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    return context.reshape(*context.shape[:2], cfg.hidden_size)


class DenseResidualNorm(nn.Module):
  """Dense, dropout, residual add, LayerNorm: HF's `attention.output` and `output` blocks."""
  config: EncoderConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, residual: Array, *, train: bool) -> Array:
    cfg = self.config
    # In float32 (the residual's dtype, which the sum promotes to anyway): a bf16 dropout's
    # 1/keep_prob is 1/bf16(0.9), a 0.18% bias on every kept value in training.
    x = _dense(cfg, cfg.hidden_size, self.dtype, "dense")(x).astype(jnp.float32)
    x = nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=not train)
    return _layer_norm(cfg)(x + residual)


class Attention(nn.Module):
  """HF `attention`: `self` (attention) then `output` (projection, residual, LayerNorm)."""
  config: EncoderConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, attention_mask: Array, *, train: bool) -> Array:
    context = SelfAttention(self.config, self.dtype, name="self")(x, attention_mask, train=train)
    return DenseResidualNorm(self.config, self.dtype, name="output")(context, x, train=train)


class Intermediate(nn.Module):
  """HF `intermediate`: Dense h -> intermediate_size and the activation."""
  config: EncoderConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = _dense(self.config, self.config.intermediate_size, self.dtype, "dense")(x)
    return _activation(self.config.hidden_act)(x)


class TransformerLayer(nn.Module):
  """One post-LayerNorm transformer block (HF `encoder.layer.<i>`)."""
  config: EncoderConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, attention_mask: Array, *, train: bool) -> Array:
    x = Attention(self.config, self.dtype, name="attention")(x, attention_mask, train=train)
    hidden = Intermediate(self.config, self.dtype, name="intermediate")(x)
    return DenseResidualNorm(self.config, self.dtype, name="output")(hidden, x, train=train)


class LayerStack(nn.Module):
  """The `layer` list of HF's encoder; children are named "0", "1", ... like HF's ModuleList."""
  config: EncoderConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, attention_mask: Array, *, train: bool) -> Array:
    for i in range(self.config.num_hidden_layers):
      x = TransformerLayer(self.config, self.dtype, name=str(i))(x, attention_mask, train=train)
    return x


class Encoder(nn.Module):
  """HF `encoder`: holds `layer`."""
  config: EncoderConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, attention_mask: Array, *, train: bool) -> Array:
    return LayerStack(self.config, self.dtype, name="layer")(x, attention_mask, train=train)


class MLPHead(nn.Module):
  """Dense(h, h) + tanh: HF's `pooler` layer and SimCSE's training MLP (same architecture)."""
  config: EncoderConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return jnp.tanh(_dense(self.config, self.config.hidden_size, self.dtype, "dense")(x))


class SentenceEncoder(nn.Module):
  """BERT/RoBERTa backbone + pooling (+ MLP in training) -> one float32 vector per sentence.

  Attributes:
    config: the architecture (from `load_pretrained` or built by hand).
    pooling: "cls" (CLS token of the last layer) or "mean" (mask-aware mean of the last layer).
    dtype: compute dtype (jnp.bfloat16 on GPU/TPU); parameters are always float32.
  """
  config: EncoderConfig
  pooling: str = "cls"
  dtype: Dtype = jnp.float32

  def setup(self):
    if self.pooling not in ("cls", "mean"):
      raise ValueError(f"pooling must be 'cls' or 'mean', got {self.pooling!r}")
    self.embeddings = Embeddings(self.config, self.dtype)
    self.encoder = Encoder(self.config, self.dtype)
    self.pooler = MLPHead(self.config, self.dtype)

  def hidden_states(self, input_ids: Array, attention_mask: Array,
                    token_type_ids: Array | None = None, *, train: bool) -> Array:
    """Last layer's hidden states (B, L, h): float32, the residual stream's dtype."""
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = self.embeddings(input_ids, token_type_ids, train=train)
    return self.encoder(x, attention_mask, train=train)

  def __call__(self, input_ids: Array, attention_mask: Array,
               token_type_ids: Array | None = None, *, train: bool, use_mlp: bool) -> Array:
    """Sentence embeddings (B, h) float32.

    Args:
      input_ids, attention_mask: (B, L) integer arrays from `SentenceTokenizer.encode_batch`.
      train: enables dropout (needs a "dropout" rng).
      use_mlp: apply the MLP after pooling: True in SimCSE training, False at evaluation.
    """
    hidden = self.hidden_states(input_ids, attention_mask, token_type_ids, train=train)
    if self.pooling == "cls":
      pooled = hidden[:, 0]
    else:
      mask = attention_mask.astype(jnp.float32)[..., None]
      pooled = (hidden.astype(jnp.float32) * mask).sum(1) / jnp.maximum(mask.sum(1), 1.0)
    if use_mlp:
      pooled = self.pooler(pooled.astype(self.dtype))
    return pooled.astype(jnp.float32)


def init_params(model: SentenceEncoder, rng: Array, seq_len: int = 8) -> Params:
  """Random parameters for every weight, the MLP included (jitted: eager init is slow)."""
  ids = jnp.ones((1, seq_len), jnp.int32)

  @jax.jit
  def init(key):
    return model.init({"params": key}, ids, jnp.ones_like(ids), train=False, use_mlp=True)
  return init(rng)["params"]


def fresh_mlp_params(config: EncoderConfig, rng: Array) -> Params:
  """A newly initialised MLP (normal(initializer_range) kernel, zero bias), as SimCSE's."""
  return MLPHead(config).init(rng, jnp.zeros((1, config.hidden_size)))["params"]


def init_from_pretrained(model: SentenceEncoder, pretrained: Params, rng: Array, *,
                         mlp_init: str = "fresh") -> Params:
  """Full SentenceEncoder params from a checkpoint's tree (`load_pretrained`).

  mlp_init: "fresh" initialises the MLP anew (SimCSE's choice: its MLPLayer is not in BERT's
  checkpoint); "checkpoint" takes HF's pre-trained `pooler.dense` (error if it has none).
  """
  if mlp_init not in ("fresh", "checkpoint"):
    raise ValueError(f"mlp_init must be 'fresh' or 'checkpoint', got {mlp_init!r}")
  params = {k: v for k, v in pretrained.items() if k != "pooler"}
  if mlp_init == "checkpoint":
    if "pooler" not in pretrained:
      raise ValueError("The checkpoint has no pooler.dense weights; use mlp_init='fresh'.")
    params["pooler"] = pretrained["pooler"]
  else:
    params["pooler"] = fresh_mlp_params(model.config, rng)
  expected = jax.eval_shape(lambda key: init_params(model, key), jax.random.key(0))
  shapes = lambda tree: jax.tree.map(lambda a: (tuple(a.shape), jnp.dtype(a.dtype)), tree)  # noqa: E731
  if shapes(expected) != shapes(params):
    raise ValueError("Pretrained params do not fit the model's config (different tree or shapes).")
  return jax.tree.map(jnp.asarray, params)


def two_views(model: SentenceEncoder, params: Params, input_ids: Array, attention_mask: Array,
              dropout_rng: Array, *, use_mlp: bool = True) -> tuple[Array, Array]:
  """SimCSE's positive pairs: every sentence encoded twice with independent dropout.

  One forward pass over the batch stacked twice (2B rows; SimCSE also runs 2B rows in one pass,
  interleaved as 2i, 2i + 1 rather than i, B + i: the same on one device, but with the batch
  sharded, rows i and B + i sit on different devices, so the trainer interleaves, see
  `tasks.sentence.dropout_views`): Flax dropout draws
  an independent mask per element, so rows i and B + i are two dropout views of sentence i; one
  pass of 2B keeps the matmuls large. Returns z1, z2 of shape (B, h), float32.
  """
  batch = input_ids.shape[0]
  z = model.apply({"params": params},
                  jnp.concatenate([input_ids, input_ids]),
                  jnp.concatenate([attention_mask, attention_mask]),
                  train=True, use_mlp=use_mlp, rngs={"dropout": dropout_rng})
  return z[:batch], z[batch:]
