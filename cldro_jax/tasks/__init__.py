"""Tasks: what differs between the image, sentence and graph domains, behind one interface.

The trainer (`cldro_jax/train.py`) is domain-agnostic; a task supplies the data, the model, the
two views and the evaluators:

  init(rng)                       -> (model params, model state)
  forward(params, model_state, global batch, rng, train=True) -> ForwardOutput (inside jit)
  train_batches(start_step, num_steps) -> iterator of process-local numpy batches
  to_global(local batch)          -> global jax arrays sharded over the mesh axis "data"
  monitor(state)                  -> per-epoch metrics (kNN, online probe, STS-B dev...)
  final_evaluation(state)         -> final scores for results.json
  data_fingerprint()              -> `data_digest` of the pre-training data (checked on resume)
and the attributes model_name, loss_variant, example_unit, steps_per_epoch, probe_shape,
monitor_every_steps.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterator, Protocol

import flax
import jax
import ml_collections
import numpy as np


@flax.struct.dataclass
class ForwardOutput:
  z1: jax.Array               # (B, d) projections of view 1 (row i paired with z2[i])
  z2: jax.Array               # (B, d) projections of view 2
  valid: jax.Array            # (B,) bool: padding rows are False
  labels: jax.Array           # (B,) int: class labels (-1 unknown), for the label-aware loss
  probe_features: jax.Array   # (n, F) features the online probe trains on (stop-gradient)
  probe_labels: jax.Array     # (n,) their labels (-1 = unlabelled, ignored)
  model_state: Any            # updated non-trainable state (BatchNorm statistics)


class Task(Protocol):
  model_name: str
  loss_variant: str           # "image" | "sentence" | "graph": the loss form of the domain
  example_unit: str           # "img", "sent", "graph": the progress bar's rate unit
  steps_per_epoch: int
  probe_shape: tuple[int, int] | None   # (feature dim, classes) of the online probe, or None
  monitor_every_steps: int    # run monitor(state) every this many steps and at the end (0: never)

  def init(self, rng: jax.Array) -> tuple[Any, Any]: ...
  def forward(self, params, model_state, batch, rng, *, train: bool) -> ForwardOutput: ...
  def train_batches(self, *, start_step: int, num_steps: int) -> Iterator[dict]: ...
  def to_global(self, local_batch: dict) -> dict: ...
  def monitor(self, state) -> dict[str, float]: ...
  def final_evaluation(self, state) -> dict[str, Any]: ...
  def data_fingerprint(self) -> str: ...


def sample_positions(count: int, samples: int = 16) -> list[int]:
  """`samples` positions spread evenly over a dataset of `count` examples (first and last
  included): what `data_digest` reads, cheap even for a dataset read from disk."""
  return sorted({round(i * (count - 1) / max(samples - 1, 1)) for i in range(samples)})


def data_digest(count: int, *parts: Any) -> str:
  """A short hash of a dataset's size and of sampled contents (arrays, strings, numbers).

  Stored with every checkpoint: `data.path` may change on resume (the same data moved), but a
  different dataset behind it would silently change the data order and the examples; the
  trainer compares this digest instead of the path."""
  digest = hashlib.sha256(str(int(count)).encode())
  for part in parts:
    if isinstance(part, np.ndarray):
      digest.update(f"{part.dtype}{part.shape}".encode())
      digest.update(np.ascontiguousarray(part).tobytes())
    else:
      digest.update(repr(part).encode())
  return digest.hexdigest()[:16]


def build_task(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
               workdir: str | None = None) -> Task:
  """The task of `config.domain`; `workdir` is where tasks that write artefacts put them."""
  if config.domain == "image":
    from cldro_jax.tasks import image  # pylint: disable=import-outside-toplevel
    return image.ImageTask(config, mesh)
  if config.domain == "sentence":
    from cldro_jax.tasks import sentence  # pylint: disable=import-outside-toplevel
    return sentence.SentenceTask(config, mesh, workdir=workdir)
  if config.domain == "graph":
    from cldro_jax.tasks import graph  # pylint: disable=import-outside-toplevel
    return graph.GraphTask(config, mesh)
  raise ValueError(f"Unknown domain {config.domain!r}")


def domain_defaults(domain: str) -> ml_collections.ConfigDict:
  """The domain-specific part of the config schema (data, model, eval...)."""
  if domain == "sentence":
    from cldro_jax.tasks import sentence  # pylint: disable=import-outside-toplevel
    return sentence.defaults()
  if domain == "graph":
    from cldro_jax.tasks import graph  # pylint: disable=import-outside-toplevel
    return graph.defaults()
  raise ValueError(f"No task defaults for domain {domain!r}")
