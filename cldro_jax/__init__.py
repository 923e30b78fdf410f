"""cldro_jax: contrastive learning as distributionally robust optimisation, in JAX/Flax.

Implements the losses and train-then-probe experiments of "Understanding Contrastive Learning via
Distributionally Robust Optimization" (Wu et al., NeurIPS 2023, arXiv 2310.11048).
"""

__version__ = "0.1.0"


def load_encoder(workdir, *, step=None):
  """The trained encoder of a workdir, image, sentence or graph run; `.embed(...)` embeds inputs
  as the run's own evaluation does (see `cldro_jax.encoder`)."""
  from cldro_jax import encoder  # pylint: disable=import-outside-toplevel
  return encoder.load_encoder(workdir, step=step)
