"""Load a trained image encoder from a workdir and embed arrays with it.

    import cldro_jax
    encoder = cldro_jax.load_encoder("workdirs/cifar10_adnce")
    features = encoder.embed(images_uint8)          # (N, H, W, C) uint8 -> (N, F) float32

For users who only want the representations: no dataset, no trainer, no optimizer state.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cldro_jax import checkpointing


@dataclasses.dataclass
class ImageEncoder:
  """A frozen encoder (BatchNorm in eval mode) and the preprocessing it was trained with."""

  config: ml_collections.ConfigDict
  params: Any
  model_state: Any
  step: int

  def __post_init__(self):
    from cldro_jax.tasks import image  # pylint: disable=import-outside-toplevel
    from cldro_jax.data import augment  # pylint: disable=import-outside-toplevel
    model = image.build_model(self.config.model)
    mean, std = tuple(self.config.augment.mean), tuple(self.config.augment.std)

    def embed(params, model_state, images, out_size):
      views = augment.eval_preprocess(images, out_size=out_size, mean=mean, std=std)
      features, _ = model.apply({"params": params, **model_state}, views, train=False)
      return features

    self._embed = jax.jit(embed, static_argnums=3)

  def embed(self, images: np.ndarray, *, batch_size: int = 512,
            image_size: int | None = None) -> np.ndarray:
    """Features (N, F) of uint8 images (N, H, W, C); `image_size` resizes first if given."""
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
    out = [np.asarray(self._embed(self.params, self.model_state, images[i:i + batch_size],
                                  image_size))
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def load_encoder(workdir: str, *, step: int | None = None) -> ImageEncoder:
  """The encoder of the latest (or given) checkpoint of an image run in `workdir`."""
  config = checkpointing.read_saved_config(workdir)
  if config.domain != "image":
    raise ValueError(f"load_encoder handles image runs; {workdir} is a {config.domain} run.")
  checkpointer = checkpointing.Checkpointer(workdir, read_only=True)
  try:
    raw, meta = checkpointer.restore_raw(step=step)
  finally:
    checkpointer.close()
  params = jax.tree.map(jnp.asarray, raw["params"]["model"])
  model_state = jax.tree.map(jnp.asarray, raw["model_state"])
  return ImageEncoder(config=config, params=params, model_state=model_state,
                      step=int(meta["step"]))
