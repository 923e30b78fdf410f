"""The image task: ResNet + projection head, SimCLR views made on the accelerator, kNN monitor,
online and offline linear probes.

Host side: uint8 batches only (`cldro_jax.data.pipeline`); the two augmented views are made inside
the jitted train step (`cldro_jax.data.augment`), so the accelerator is never starved by Python
image processing.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from cldro_jax import logs
from cldro_jax.data import augment as augment_lib
from cldro_jax.data import images as images_lib
from cldro_jax.data import pipeline
from cldro_jax.evaluators import device_outputs
from cldro_jax.evaluators import knn
from cldro_jax.evaluators import linear_probe
from cldro_jax.models import heads
from cldro_jax.models import resnet
from cldro_jax.models import view_norm
from cldro_jax import tasks as tasks_lib
from cldro_jax.tasks import ForwardOutput

AXIS = "data"


def build_model(model_cfg: ml_collections.ConfigDict,
                dtype: str | None = None) -> heads.ContrastiveModel:
  """The config's model; `dtype` replaces its compute dtype (evaluation runs in float32)."""
  dtype = jnp.bfloat16 if (dtype or model_cfg.dtype) == "bfloat16" else jnp.float32
  encoder = resnet.get_encoder(model_cfg.name, stem=model_cfg.stem, width=model_cfg.width,
                               dtype=dtype, stem_init=model_cfg.stem_init)
  head = heads.ProjectionHead(hidden=model_cfg.head_hidden, out=model_cfg.head_out, dtype=dtype)
  return heads.ContrastiveModel(encoder=encoder, head=head)


def make_augment(aug_cfg: ml_collections.ConfigDict, out_size: int) -> augment_lib.SimCLRAugment:
  """The SimCLR augmentation of `config.augment`; its errors name the config fields."""
  try:
    return augment_lib.SimCLRAugment(
        out_size=out_size, crop_scale=tuple(aug_cfg.crop_scale),
        crop_ratio=tuple(aug_cfg.crop_ratio), flip_prob=aug_cfg.flip_prob,
        jitter_prob=aug_cfg.jitter_prob, brightness=aug_cfg.brightness,
        contrast=aug_cfg.contrast, saturation=aug_cfg.saturation, hue=aug_cfg.hue,
        grayscale_prob=aug_cfg.grayscale_prob, blur_prob=aug_cfg.blur_prob,
        blur_kernel=aug_cfg.blur_kernel, blur_sigma=tuple(aug_cfg.blur_sigma),
        mean=tuple(aug_cfg.mean), std=tuple(aug_cfg.std))
  except ValueError as err:
    # SimCLRAugment calls the crop size out_size; every other field has the config's name.
    raise ValueError("config.augment." + str(err).replace("out_size", "crop_size")) from err


class ImageTask:
  """Contrastive pre-training on images (see module docstring)."""

  loss_variant = "image"
  example_unit = "img"

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
               dataset: images_lib.ImageDataset | None = None):
    """`dataset` replaces `config.data` (benchmarks and tests with synthetic images)."""
    self.config = config
    self.mesh = mesh
    self.data_sharding = NamedSharding(mesh, P(AXIS))
    self.replicated = NamedSharding(mesh, P())
    self.dataset = dataset if dataset is not None else images_lib.load_image_dataset(config.data)
    if config.loss.use_labels:
      unlabelled = int(np.sum(pipeline.source_labels(self.dataset.pretrain) < 0))
      if unlabelled:
        logs.warn(
            f"config.loss.use_labels=True removes same-class negatives, but {unlabelled} of the "
            f"{len(self.dataset.pretrain)} pre-training examples are unlabelled (label -1): they "
            "stay negatives of every anchor. For the full oracle pre-train on labelled examples "
            "only (e.g. --config.data.pretrain_split=train).")
    if len(self.dataset.pretrain) < config.batch_size:
      raise ValueError(
          f"config.batch_size={config.batch_size} is larger than the {len(self.dataset.pretrain)} "
          f"pre-training images of {self.dataset.name}; lower --config.batch_size.")
    self.steps_per_epoch = len(self.dataset.pretrain) // config.batch_size
    self.monitor_every_steps = config.eval.every_epochs * self.steps_per_epoch
    self.model = build_model(config.model)
    # Evaluation (kNN, probes, features) in float32 whatever the training dtype, as the
    # sentence task's: the scores of the same weights must not depend on how they were trained
    # (tests/test_precision.py: identical features from a bf16 and a float32 config). Same
    # parameters, another compute dtype.
    self.eval_model = build_model(config.model, dtype="float32")
    self.model_name = f"{config.model.name}-{config.model.stem}-w{config.model.width}"
    self.augment = make_augment(config.augment, config.augment.crop_size)
    # 0 keeps the stored size (the reference's test transform does not resize); a square size
    # from the image height would squash non-square images.
    self.probe_size = config.eval.probe_image_size or None
    self.knn_temperature = config.eval.knn_temperature or config.loss.temperature
    self._feature_dim = None
    self.probe_shape = (self.feature_dim, self.dataset.num_classes)
    self._embed = jax.jit(self._embed_impl, out_shardings=self.data_sharding)

  def data_fingerprint(self) -> str:
    source = self.dataset.pretrain
    sample = source[np.asarray(tasks_lib.sample_positions(len(source)))]
    return tasks_lib.data_digest(len(source), sample["image"], sample["label"])

  # -- model ------------------------------------------------------------------------------------

  def _dummy(self, size: int, width: int | None = None) -> jax.Array:
    return jnp.zeros((2, size, width or size, 3), jnp.float32)

  @property
  def feature_dim(self) -> int:
    if self._feature_dim is None:
      shapes = jax.eval_shape(
          lambda: self.model.init(jax.random.PRNGKey(0), self._dummy(self.augment.out_size),
                                  train=False))
      out = jax.eval_shape(
          lambda v: self.model.apply(v, self._dummy(self.augment.out_size), train=False), shapes)
      self._feature_dim = int(out[0].shape[-1])
      self._check_evaluation_size(shapes)
    return self._feature_dim

  def _check_evaluation_size(self, variable_shapes) -> None:
    """The encoder must also embed the evaluation's image size (STL10 trains on 32x32 crops and
    probes at 96x96); an encoder of one's own that cannot is named now, not after training."""
    crop = self.augment.out_size
    height, width = ((self.probe_size,) * 2 if self.probe_size
                     else tuple(self.dataset.image_shape[:2]))
    if (height, width) == (crop, crop):
      return
    images = self._dummy(height, width)
    try:
      out = jax.eval_shape(lambda v: self.eval_model.apply(v, images, train=False),
                           variable_shapes)
    except Exception as err:   # whatever the module raises (Flax: ScopeParamShapeError, ...)
      raise ValueError(
          f"config.model.name={self.config.model.name!r} cannot embed the evaluation's "
          f"{height}x{width} images (it trains on {crop}x{crop} crops): {err}. An encoder must "
          "accept any image size (docs/extending.md); or evaluate at the crop size, "
          f"--config.eval.probe_image_size={crop}") from err
    if out[0].shape[-1] != self._feature_dim:
      raise ValueError(
          f"config.model.name={self.config.model.name!r} gives {out[0].shape[-1]} features at "
          f"the evaluation's {height}x{width} images but {self._feature_dim} at the {crop}x{crop} "
          "training crops; its features must not depend on the image size (pool them)")

  def init(self, rng):
    variables = self.model.init(rng, self._dummy(self.augment.out_size), train=False)
    params = variables["params"]
    model_state = {k: v for k, v in variables.items() if k != "params"}
    return params, model_state

  def _apply(self, params, model_state, views, *, train, num_views=1, model=None):
    """`model`: another compute dtype of the same model (default: the training model in train
    mode, the float32 evaluation model in eval mode)."""
    variables = {"params": params, **model_state}
    if train:
      (features, projections), updates = (model or self.model).apply(
          variables, views, train=True, num_views=num_views, mutable=list(model_state.keys()))
      return features, projections, {**model_state, **updates}
    features, projections = (model or self.eval_model).apply(variables, views, train=False)
    return features, projections, model_state

  def forward(self, params, model_state, batch, rng, *, train: bool) -> ForwardOutput:
    images = batch["image"]
    with jax.named_scope("augment"):
      view1, view2 = augment_lib.two_views(rng, images, self.augment)
    model_cfg = self.config.model
    if model_cfg.bn_over_views or model_cfg.views_in_one_pass:
      # Both views in ONE forward pass, rows interleaved (2i = view 1, 2i+1 = view 2 of example
      # i): with the batch sharded over devices both views of an example stay on its device.
      # BatchNorm statistics over both views (`bn_over_views`) or per view, which
      # `ViewBatchNorm` computes exactly as the reference's two passes do.
      both = view_norm.interleave_views(view1, view2)
      features, projections, model_state = self._apply(
          params, model_state, both, train=train, num_views=1 if model_cfg.bn_over_views else 2)
      features = features.reshape(-1, 2, features.shape[-1])
      projections = projections.reshape(-1, 2, projections.shape[-1])
      f1, f2 = features[:, 0], features[:, 1]
      z1, z2 = projections[:, 0], projections[:, 1]
    else:
      # One forward pass per view, as the reference: BatchNorm statistics per view, and the
      # running averages updated twice per step.
      f1, z1, model_state = self._apply(params, model_state, view1, train=train)
      f2, z2, model_state = self._apply(params, model_state, view2, train=train)
    labels = batch["label"]
    valid = jnp.ones(labels.shape, bool)
    return ForwardOutput(
        z1=z1, z2=z2, valid=valid, labels=labels,
        probe_features=jnp.concatenate([f1, f2], axis=0),
        probe_labels=jnp.concatenate([labels, labels], axis=0),
        model_state=model_state)

  # -- data -------------------------------------------------------------------------------------

  def train_batches(self, *, start_step: int, num_steps: int):
    return pipeline.train_batches(
        self.dataset.pretrain, global_batch_size=self.config.batch_size, seed=self.config.seed,
        start_step=start_step, num_steps=num_steps,
        classes_per_batch=self.config.data.get("classes_per_batch", 0))

  def to_global(self, local_batch: dict) -> dict:
    return {k: jax.make_array_from_process_local_data(self.data_sharding, v)
            for k, v in local_batch.items()}

  # -- evaluation -------------------------------------------------------------------------------

  def _embed_impl(self, params, model_state, images):
    views = augment_lib.eval_preprocess(images, out_size=self.probe_size,
                                        mean=self.config.augment.mean,
                                        std=self.config.augment.std)
    features, _, _ = self._apply(params, model_state, views, train=False)
    return features

  def extract_features(self, params, model_state, source) -> tuple[np.ndarray, np.ndarray]:
    """Frozen-encoder features (BatchNorm in eval mode) of every example of `source`."""
    # Rounded up to a multiple of the device count; padding rows are masked out.
    size = -(-self.config.eval.batch_size // self.mesh.size) * self.mesh.size

    def dispatched():
      for batch in pipeline.eval_batches(source, global_batch_size=size):
        global_batch = self.to_global(batch)
        out = self._embed(params, model_state, global_batch["image"])
        yield out, global_batch["label"], global_batch["mask"]

    feats, labels = [], []
    for out, lab, mask in device_outputs.fetched_in_order(dispatched(), device_outputs.to_host):
      feats.append(out[mask])
      labels.append(lab[mask])
    return np.concatenate(feats), np.concatenate(labels)

  def _bank_source(self):
    limit = self.config.eval.knn_max_bank
    source = self.dataset.probe_train
    if limit and len(source) > limit:
      # Evenly spaced over the stored order, not its first rows: folders (and many .npz files)
      # store the examples class by class, and a prefix would hold the first classes only.
      return pipeline.Subset(source, np.linspace(0, len(source) - 1, limit).round().astype(int))
    return source

  def monitor(self, state) -> dict[str, float]:
    """Weighted kNN (k = eval.knn_k: 200, as the reference) and the online probe's test accuracy."""
    params, model_state = state.params["model"], state.model_state
    bank, bank_labels = self.extract_features(params, model_state, self._bank_source())
    test, test_labels = self.extract_features(params, model_state, self.dataset.test)
    result = knn.knn_accuracy(bank, bank_labels, test, test_labels,
                              num_classes=self.dataset.num_classes, k=self.config.eval.knn_k,
                              temperature=self.knn_temperature)
    metrics = {"knn_top1": float(result["top1"]), "knn_top5": float(result["top5"])}
    if "probe" in state.params:
      probe = jax.device_get(state.params["probe"])
      logits = test @ probe["kernel"] + probe["bias"]
      metrics["online_probe_top1"] = float(np.mean(np.argmax(logits, -1) == test_labels) * 100)
    return metrics

  def linear_probe_scores(self, params, model_state, seed: int) -> dict[str, float]:
    """Offline linear probe (config.eval.linear_probe protocol) of a frozen encoder: top-1/5."""
    ev = self.config.eval
    if ev.linear_probe == "features":
      train, train_labels = self.extract_features(params, model_state, self.dataset.probe_train)
      probe = linear_probe.fit_linear_probe(
          train, train_labels, num_classes=self.dataset.num_classes,
          epochs=ev.linear_probe_epochs, batch_size=ev.linear_probe_batch_size,
          learning_rate=ev.linear_probe_lr, weight_decay=ev.linear_probe_weight_decay, seed=seed)
    else:
      # The authors' linear.py: the linear layer trains on SimCLR-augmented crops of the train
      # split through the frozen encoder and is tested on whole images. Their encoder stays in
      # train mode, so BatchNorm's running statistics drift during the probe; ours are frozen
      # unless `eval.probe_update_bn` asks for the reference behaviour.
      whole = self.dataset.probe_train[np.arange(len(self.dataset.probe_train))]
      augment = self.augment
      update_bn = ev.probe_update_bn

      def embed_fn(variables, images):
        features, _, state = self._apply(variables["params"], variables["state"], images,
                                         train=update_bn, model=self.eval_model)
        if update_bn:
          return features, {"params": variables["params"], "state": state}
        return features

      # The encoder's variables go in as an argument: closed over, they would be baked into the
      # compiled program as constants.
      probe = linear_probe.train_linear_probe_on_images(
          embed_fn, lambda key, x: augment_lib.simclr_augment(key, x, augment),
          whole["image"], whole["label"], num_classes=self.dataset.num_classes,
          epochs=ev.linear_probe_epochs, batch_size=ev.linear_probe_batch_size,
          learning_rate=ev.linear_probe_lr, weight_decay=ev.linear_probe_weight_decay, seed=seed,
          progress=self.config.progress_bar,
          encoder_variables={"params": params, "state": model_state},
          update_encoder_state=update_bn, batch_sharding=self.data_sharding)
      if update_bn:   # the test set sees the statistics the probe left behind, as the reference
        model_state = probe.encoder_variables["state"]
    test, test_labels = self.extract_features(params, model_state, self.dataset.test)
    scores = linear_probe.evaluate_linear_probe(probe, test, test_labels)
    return {"top1": float(scores["top1"]), "top5": float(scores["top5"])}

  def final_evaluation(self, state) -> dict[str, Any]:
    ev = self.config.eval
    results: dict[str, Any] = {"dataset": self.dataset.name}
    if ev.linear_probe == "none":
      return results
    probe = self.linear_probe_scores(state.params["model"], state.model_state, self.config.seed)
    results.update({f"linear_probe_{k}": v for k, v in probe.items()})
    results["linear_probe_protocol"] = ev.linear_probe
    if ev.untrained_baseline:
      from cldro_jax import train  # pylint: disable=import-outside-toplevel
      params, model_state = jax.jit(self.init)(train.model_init_key(self.config.seed))
      params, model_state = jax.device_put((params, model_state), self.replicated)
      base = self.linear_probe_scores(params, model_state, self.config.seed)
      results.update({f"untrained_linear_probe_{k}": v for k, v in base.items()})
    return results


def model_variables_shape(config: ml_collections.ConfigDict) -> Any:
  """Parameter/state shapes of the config's model, without allocating (for config tests)."""
  model = build_model(config.model)
  size = config.augment.crop_size
  return jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0),
                        jnp.zeros((2, size, size, 3), jnp.float32))
