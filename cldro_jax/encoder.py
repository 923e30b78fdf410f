"""Load a trained encoder from a workdir and embed inputs with it, for any of the three domains.

    import cldro_jax
    encoder = cldro_jax.load_encoder("workdirs/cifar10_adnce")
    features = encoder.embed(images_uint8)          # (N, H, W, C) uint8 -> (N, F) float32
    encoder = cldro_jax.load_encoder("workdirs/sts_bert")
    vectors = encoder.embed(["A man plays a guitar.", "Someone plays music."])   # (2, hidden)
    from cldro_jax.data.graphs import load_tu_dataset
    encoder = cldro_jax.load_encoder("workdirs/tu_mutag")
    vectors = encoder.embed(load_tu_dataset("MUTAG").graphs)     # (N, num_layers * hidden)

Each embeds exactly as the run's own evaluation does (images: the probe's preprocessing, frozen
BatchNorm; sentences: the evaluation pooler, without the training MLP, and the best STS dev model
when the run kept one; graphs: the SVM evaluation's GIN embeddings of the unaugmented graphs).
For users who only want the representations: no dataset, no trainer, no optimizer state.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cldro_jax import checkpointing
from cldro_jax.evaluators import device_outputs


def _check_sizes(*, batch_size, image_size=None) -> None:
  """embed's sizes: a batch_size below 1 embedded nothing, an image_size below 1 gave NaN."""
  if not (isinstance(batch_size, int) and batch_size >= 1):
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
  if image_size is not None and not (isinstance(image_size, int) and image_size >= 1):
    raise ValueError(f"image_size must be a positive int (or None: the run's own), got "
                     f"{image_size!r}.")


def _embed_images(model, mean, std, params, model_state, images, *, out_size):
  from cldro_jax.data import augment  # pylint: disable=import-outside-toplevel
  views = augment.eval_preprocess(images, out_size=out_size, mean=mean, std=std)
  features, _ = model.apply({"params": params, **model_state}, views, train=False)
  return features


@functools.lru_cache(maxsize=None)
def _jitted_embed_images():
  return jax.jit(_embed_images, static_argnums=(0, 1, 2), static_argnames="out_size")


@dataclasses.dataclass
class ImageEncoder:
  """A frozen encoder (BatchNorm in eval mode) and the preprocessing it was trained with."""

  # repr shows the step only: the config and every weight would fill a terminal
  config: ml_collections.ConfigDict = dataclasses.field(repr=False)
  params: Any = dataclasses.field(repr=False)
  model_state: Any = dataclasses.field(repr=False)
  step: int

  def __post_init__(self):
    from cldro_jax.tasks import image  # pylint: disable=import-outside-toplevel
    model = image.build_model(self.config.model, dtype="float32")   # as the run's evaluation
    mean, std = tuple(self.config.augment.mean), tuple(self.config.augment.std)
    # One jitted function for every instance, the model and preprocessing static: loading the
    # same run (or another run of the same model) again reuses the compiled code.
    self._embed = functools.partial(_jitted_embed_images(), model, mean, std)

  def embed(self, images: np.ndarray, *, batch_size: int = 512,
            image_size: int | None = None) -> np.ndarray:
    """Features (N, F) of uint8 images (N, H, W, C).

    `image_size` resizes to (image_size, image_size) first; None does what the run's evaluation
    did (its `eval.probe_image_size`, e.g. 96 for STL10; 0 there keeps the images as given).
    """
    if image_size is None:
      image_size = self.config.eval.get("probe_image_size", 0) or None
    _check_sizes(batch_size=batch_size, image_size=image_size)
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
      raise ValueError(f"Expected uint8 images (N, H, W[, C]), got {images.dtype} {images.shape}.")
    if images.ndim == 3:
      if images.shape[-1] in (3, 4):
        # (H, W, C) of one colour image would be read as H grayscale images C pixels wide.
        raise ValueError(
            f"A 3-D array {images.shape} is read as {images.shape[0]} grayscale images of "
            f"{images.shape[1]}x{images.shape[2]} pixels. For one colour image pass "
            "images[None]; for grayscale images that narrow, add the channel axis: "
            "images[..., None].")
      images = images[..., None]
    if images.shape[-1] not in (1, 3):
      raise ValueError(f"Expected 1 (grayscale) or 3 (RGB) channels, got images {images.shape}"
                       + ("; drop the alpha channel with images[..., :3]."
                          if images.shape[-1] in (2, 4) else "."))
    if not len(images):   # (0, F): F from the model's output shape, nothing run
      shape = jax.eval_shape(functools.partial(self._embed, out_size=image_size), self.params,
                             self.model_state,
                             jax.ShapeDtypeStruct((1, *images.shape[1:]), np.uint8))
      return np.zeros((0, shape.shape[-1]), np.float32)
    # One compiled shape per image size: every batch is padded (edge copies, dropped after) to
    # batch_size, or for fewer images to the next power of two below it, so calls with other
    # counts do not compile again. Two batches in flight: the device never waits for the host,
    # and device memory holds two batches whatever the number of images.
    size = min(batch_size, 1 << max(len(images) - 1, 0).bit_length())

    def dispatched():
      for i in range(0, len(images), size):
        chunk = images[i:i + size]
        padded = np.pad(chunk, ((0, size - len(chunk)),) + ((0, 0),) * (chunk.ndim - 1),
                        mode="edge")
        yield self._embed(self.params, self.model_state, padded, out_size=image_size), len(chunk)

    return np.concatenate([np.asarray(features)[:n] for features, n in
                           device_outputs.fetched_in_order(dispatched(), lambda item: item)])


@dataclasses.dataclass
class SentenceEncoder:
  """A trained BERT/RoBERTa sentence encoder with the pooler its run evaluates with."""

  # cldro_jax.tasks.sentence.TrainedEncoder: config, weights, tokenizer (too long to show)
  trained: Any = dataclasses.field(repr=False)
  pooler: str = "cls"     # "cls" (SimCSE's evaluation: no MLP), "mean" or "cls_mlp"

  def __post_init__(self):
    from cldro_jax.data import text  # pylint: disable=import-outside-toplevel
    from cldro_jax.evaluators import sts  # pylint: disable=import-outside-toplevel
    model, use_mlp = self.trained.model(self.pooler)
    if use_mlp and "pooler" not in self.trained.params:
      raise ValueError(f"pooler {self.pooler!r} needs the training MLP's weights, which "
                       f"{self.trained.description} lacks.")
    self._tokenizer = text.SentenceTokenizer(self.trained.tokenizer_folder)
    self._encode = sts.jit_encode_fn(model, use_mlp=use_mlp)
    self._params = jax.tree.map(jnp.asarray, self.trained.params)   # on the device once
    # The run's evaluation truncation (config.eval.max_length; 0: the model's maximum).
    self._max_tokens = int(self.trained.config.eval.get("max_length", 0) or 0) or (
        model.config.max_tokens)

  @property
  def config(self) -> ml_collections.ConfigDict:
    return self.trained.config

  @property
  def step(self) -> int:
    return self.trained.step

  def embed(self, sentences, *, batch_size: int = 64, max_length: int | None = None
            ) -> np.ndarray:
    """(N, hidden) float32 embeddings of N sentences (dropout off; texts longer than
    `max_length` tokens are truncated, by default at the run's `config.eval.max_length`, as its
    STS evaluation, or the model's maximum when that is 0)."""
    from cldro_jax.evaluators import sts  # pylint: disable=import-outside-toplevel
    if isinstance(sentences, str):
      raise ValueError("embed takes a list of sentences; for one sentence pass [sentence].")
    _check_sizes(batch_size=batch_size)
    if max_length is not None and not (isinstance(max_length, int) and max_length >= 2):
      raise ValueError(f"max_length must be an int >= 2 (special tokens included), got "
                       f"{max_length!r}.")
    sentences = list(sentences)
    if not sentences:
      return np.zeros((0, self.trained.encoder_config.hidden_size), np.float32)
    embed_fn = sts.make_embed_fn(functools.partial(self._encode, self._params), self._tokenizer,
                                 max_length=max_length or self._max_tokens, batch_size=batch_size)
    return embed_fn(sentences)


@dataclasses.dataclass
class GraphEncoder:
  """A trained GIN (BatchNorm in eval mode) that embeds graphs as the run's SVM evaluation."""

  config: ml_collections.ConfigDict = dataclasses.field(repr=False)
  params: Any = dataclasses.field(repr=False)
  model_state: Any = dataclasses.field(repr=False)
  step: int

  def __post_init__(self):
    from cldro_jax.tasks import graph  # pylint: disable=import-outside-toplevel
    self._model = graph.build_model(self.config.model, dtype="float32")   # as the run's evaluation
    # The evaluation's own sharded apply, on a 1-device mesh of this process.
    self._mesh = jax.sharding.Mesh(np.asarray(jax.local_devices()[:1]), (graph.AXIS,),
                                   axis_types=(jax.sharding.AxisType.Auto,))
    self._sharding = jax.sharding.NamedSharding(self._mesh, jax.sharding.PartitionSpec(graph.AXIS))
    self._params, self._model_state = jax.device_put(
        (self.params, self.model_state),
        jax.sharding.NamedSharding(self._mesh, jax.sharding.PartitionSpec()))
    # The first GIN layer's input width: node features must be encoded as in training.
    self.feature_dim = int(self.params["encoder"]["GINConv_0"]["Dense_0"]["kernel"].shape[0])

  def embed(self, graphs, *, batch_size: int = 128) -> np.ndarray:
    """(N, num_layers * hidden) float32 embeddings of `Graph`s (`cldro_jax.data.graphs.Graph`,
    node features encoded as in training), e.g. a `load_tu_dataset(...)` result or a list of its
    graphs."""
    from cldro_jax.data import graphs as graphs_lib  # pylint: disable=import-outside-toplevel
    from cldro_jax.tasks import graph  # pylint: disable=import-outside-toplevel
    _check_sizes(batch_size=batch_size)
    width = self.config.model.num_layers * self.config.model.hidden
    # faithful mode trained (and evaluated) on graphs with the reference's self-loops.
    views = [graphs_lib.view_one(g, self.config.data.aug_mode) for g in graphs]
    if not views:
      return np.zeros((0, width), np.float32)
    widths = sorted({int(g.node_features.shape[1]) for g in views})
    if widths != [self.feature_dim]:
      raise ValueError(
          f"The encoder was trained on {self.feature_dim} node features per node; these graphs "
          f"have {widths}. Encode them as the run did, e.g. with cldro_jax.data.graphs."
          f"load_tu_dataset({self.config.data.name!r}) and the run's data settings.")
    # The padded sizes (graphs, nodes, edges per batch) rounded up to powers of two: calls with
    # other graphs mostly reuse the compiled shapes instead of compiling for each new budget.
    per_batch = min(batch_size, len(views))
    budget = graphs_lib.budget_for_graphs(views, per_batch)   # fits any per_batch of them
    budget = type(budget)(*(_next_power_of_two(n) for n in budget))

    def dispatched():
      for start in range(0, len(views), per_batch):
        batch = graphs_lib.pack_graphs(views[start:start + per_batch], budget)
        emb, _, _ = graph.jitted_apply(self._model, self._mesh, self._params, self._model_state,
                                       jax.device_put(batch, self._sharding), train=False)
        yield emb, batch.graph_mask

    return np.concatenate([np.asarray(emb)[mask] for emb, mask in
                           device_outputs.fetched_in_order(dispatched(), lambda item: item)]
                          ).astype(np.float32)


def _next_power_of_two(n: int) -> int:
  return 1 << max(int(n) - 1, 0).bit_length()


def load_encoder(workdir: str, *, step: int | None = None
                 ) -> ImageEncoder | SentenceEncoder | GraphEncoder:
  """The encoder of a run in `workdir`: its latest checkpoint, or `step`.

  A sentence run without `step` gives its best STS dev model when it kept one (what its final
  evaluation and Hugging Face export use), else its latest checkpoint.
  """
  config = checkpointing.read_saved_config(workdir)
  if config.domain == "sentence":
    from cldro_jax.tasks import sentence  # pylint: disable=import-outside-toplevel
    trained = sentence.load_trained_encoder(workdir, "auto" if step is None else str(int(step)))
    return SentenceEncoder(trained=trained, pooler=sentence.eval_pooler(config))
  raw, meta = checkpointing.read_checkpoint(workdir, step=step)
  params = jax.tree.map(jnp.asarray, raw["params"]["model"])
  model_state = jax.tree.map(jnp.asarray, raw["model_state"])
  if config.domain == "graph":
    return GraphEncoder(config=config, params=params, model_state=model_state,
                        step=int(meta["step"]))
  return ImageEncoder(config=config, params=params, model_state=model_state,
                      step=int(meta["step"]))
