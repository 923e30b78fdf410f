"""Linear evaluation of a frozen encoder: a softmax classifier Linear(F, C) on its features.

Two ways to train the probe, same optimiser and same minibatch order for a given seed:

- `fit_linear_probe`: on cached features (one forward pass of the encoder over the train split,
  no augmentation). The whole training loop is one jitted `lax.scan` (one compile); 100 epochs
  over 50k x 2048 features took about a minute on 2 CPU cores (0.3-0.5 s per epoch).
- `train_linear_probe_on_images`: the reference protocol (image/linear.py of the authors' code):
  every step augments a batch of train images, embeds it with the frozen encoder and updates the
  linear layer. Slower, and the number the paper reports.

Both follow the reference: Linear(F, C) with bias and PyTorch's default init, cross-entropy,
Adam(lr=1e-3) with weight_decay=1e-6 applied the PyTorch way (COUPLED L2: `wd * param` is added
to the gradient before Adam's moments, unlike AdamW), batch 512, shuffled every epoch, the last
partial batch kept (`drop_last=False`), 100 epochs, accuracy of the final epoch. Features are used
as they come (the reference probes the unnormalised 2048-d ResNet output); `normalize=True`
L2-normalises them first.

`extract_features` runs an encoder over a padded eval iterator and drops the padding rows; its
output feeds `evaluate_linear_probe` and `cldro_jax.evaluators.knn.knn_accuracy`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from tqdm.auto import tqdm

from cldro_jax.evaluators import device_outputs
from cldro_jax.evaluators import knn
from cldro_jax.evaluators.knn import l2_normalize

__all__ = [
    "LinearProbe", "ProbeHead", "ProbeRngs", "probe_rngs", "init_probe_params", "probe_optimizer",
    "epoch_batches", "fit_linear_probe", "evaluate_linear_probe", "train_linear_probe_on_images",
    "extract_features",
]


# ----------------------------------------------------------------------------------------------
# Model, optimiser, randomness
# ----------------------------------------------------------------------------------------------

def _torch_linear_bias_init(fan_in: int):
    """torch.nn.Linear's bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class ProbeHead(nn.Module):
    """Linear(F, num_classes) with bias, initialised like torch.nn.Linear (as the reference is)."""

    num_classes: int

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        fan_in = features.shape[-1]
        # variance_scaling(1/3, fan_in, uniform) is U(-1/sqrt(fan_in), 1/sqrt(fan_in)), which is
        # what torch's kaiming_uniform_(a=sqrt(5)) default for nn.Linear works out to.
        return nn.Dense(
            self.num_classes,
            kernel_init=nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"),
            bias_init=_torch_linear_bias_init(fan_in),
            name="fc",
        )(features)


class LinearProbe(struct.PyTreeNode):
    """A trained linear probe.

    Attributes:
      params: the ProbeHead variables, `{"params": {"fc": {"kernel": (F, C), "bias": (C,)}}}`.
      train_loss: (epochs,) mean training cross-entropy of each epoch (over all examples).
      num_classes: C.
      normalize: whether features are L2-normalised before the linear layer (fit and eval).
      encoder_variables: the encoder variables after training, only when
        `train_linear_probe_on_images(update_encoder_state=True)` let BatchNorm statistics move
        (the reference's behaviour); None otherwise. Extract the test features with these.
    """

    params: Any
    train_loss: jax.Array
    num_classes: int = struct.field(pytree_node=False)
    normalize: bool = struct.field(pytree_node=False, default=False)
    encoder_variables: Any = None

    def logits(self, features: jax.Array) -> jax.Array:
        """(B, C) class logits of (B, F) features."""
        features = _prepare_features(features, self.normalize)
        return ProbeHead(self.num_classes).apply(self.params, features)


class ProbeRngs(NamedTuple):
    init: jax.Array      # the linear layer's initial weights
    shuffle: jax.Array   # epoch e's order: permutation(fold_in(shuffle, e), N)
    augment: jax.Array   # step s's augmentation: fold_in(augment, s), s counted over all epochs


def probe_rngs(seed: int) -> ProbeRngs:
    """The three independent keys both trainers derive from `seed` (same seed, same run)."""
    return ProbeRngs(*jax.random.split(jax.random.key(seed), 3))


def init_probe_params(key: jax.Array, feature_dim: int, num_classes: int) -> Any:
    """Initial ProbeHead variables for F = feature_dim inputs."""
    return ProbeHead(num_classes).init(key, jnp.zeros((1, feature_dim), jnp.float32))


def probe_optimizer(learning_rate: float, weight_decay: float) -> optax.GradientTransformation:
    """PyTorch's `Adam(lr, weight_decay)`: coupled L2, then Adam (b1 .9, b2 .999, eps 1e-8).

    torch adds `weight_decay * param` to the gradient BEFORE the moment updates, so the decay is
    rescaled by Adam's preconditioner; `optax.adamw` decays AFTER it (decoupled) and is a
    different optimiser. `add_decayed_weights` followed by `adam` reproduces torch exactly.
    """
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(learning_rate))


def epoch_batches(key: jax.Array, num_examples: int, batch_size: int) -> tuple[jax.Array, jax.Array]:
    """One epoch of shuffled minibatches, the last one padded: `(indices, mask)`, (nb, B) each.

    Every example appears exactly once per epoch; the last batch holds the
    `num_examples % batch_size` leftovers (torch's `drop_last=False`) padded with index 0 and
    mask False so that the shapes stay static for `lax.scan`.
    """
    num_batches = -(-num_examples // batch_size)
    padding = num_batches * batch_size - num_examples
    order = jax.random.permutation(key, num_examples)
    indices = jnp.concatenate([order, jnp.zeros((padding,), order.dtype)])
    mask = jnp.arange(num_batches * batch_size) < num_examples
    return (indices.reshape(num_batches, batch_size).astype(jnp.int32),
            mask.reshape(num_batches, batch_size))


# ----------------------------------------------------------------------------------------------
# The shared update
# ----------------------------------------------------------------------------------------------

def _prepare_features(features: jax.Array, normalize: bool) -> jax.Array:
    features = jnp.asarray(features, jnp.float32)
    return l2_normalize(features) if normalize else features


def _masked_cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean cross-entropy over the rows where mask is True (padding rows may hold any label)."""
    safe_labels = jnp.where(mask, labels, 0)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, safe_labels)
    return jnp.sum(jnp.where(mask, losses, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def _probe_update(params, opt_state, features, labels, mask, *, head: ProbeHead,
                  optimizer: optax.GradientTransformation):
    """One optimiser step on a (padded) minibatch of features; returns the pre-step loss."""

    def loss_fn(p):
        return _masked_cross_entropy(head.apply(p, features), labels, mask)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


# ----------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------

def _check_labels(labels: Any, num_examples: int, num_classes: int, what: str) -> None:
    if np.shape(labels) != (num_examples,):
        raise ValueError(f"{what} labels must have shape ({num_examples},), got {np.shape(labels)}.")
    values = np.asarray(labels)
    if not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"{what} labels must be integer class ids, got dtype {values.dtype}; "
                         "cast with `.astype(np.int32)`.")
    if values.size and (values.min() < 0 or values.max() >= num_classes):
        raise ValueError(f"{what} labels must lie in [0, num_classes={num_classes}), found "
                         f"[{values.min()}, {values.max()}]; pass the dataset's number of classes.")


def _check_schedule(*, num_classes, epochs, batch_size, learning_rate, weight_decay) -> None:
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
    if int(epochs) < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs} (the reference trains 100).")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size} (the reference uses 512).")
    if not float(learning_rate) > 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate} (reference: 1e-3).")
    if not float(weight_decay) >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay} (reference: 1e-6).")


# ----------------------------------------------------------------------------------------------
# a) Fast probe on cached features
# ----------------------------------------------------------------------------------------------

def _fit_on_features(features, labels, init_key, shuffle_key, learning_rate, weight_decay, *,
                     num_classes, epochs, batch_size, normalize):
    head = ProbeHead(num_classes)
    optimizer = probe_optimizer(learning_rate, weight_decay)
    features = _prepare_features(features, normalize)
    labels = labels.astype(jnp.int32)
    num_examples = features.shape[0]
    params = init_probe_params(init_key, features.shape[1], num_classes)

    def run_epoch(carry, epoch):
        indices, mask = epoch_batches(jax.random.fold_in(shuffle_key, epoch), num_examples,
                                      batch_size)

        def run_step(carry, batch):
            params, opt_state = carry
            idx, valid = batch
            params, opt_state, loss = _probe_update(params, opt_state, features[idx], labels[idx],
                                                    valid, head=head, optimizer=optimizer)
            return (params, opt_state), loss * jnp.sum(valid)

        carry, loss_sums = jax.lax.scan(run_step, carry, (indices, mask))
        return carry, jnp.sum(loss_sums) / num_examples

    (params, _), epoch_losses = jax.lax.scan(run_epoch, (params, optimizer.init(params)),
                                             jnp.arange(epochs))
    return params, epoch_losses


# One compile per (shapes, num_classes, epochs, batch_size, normalize); lr and wd are traced so
# that a sweep over them does not recompile.
_fit_on_features_jit = jax.jit(
    _fit_on_features, static_argnames=("num_classes", "epochs", "batch_size", "normalize"))


def fit_linear_probe(train_features: jax.Array, train_labels: jax.Array, *, num_classes: int,
                     epochs: int = 100, batch_size: int = 512, learning_rate: float = 1e-3,
                     weight_decay: float = 1e-6, seed: int = 0,
                     normalize: bool = False) -> LinearProbe:
    """Trains Linear(F, C) on cached (frozen) features; the whole loop is one jitted scan.

    Args:
      train_features: (N, F) features (any float dtype; trained in float32).
      train_labels: (N,) integer class ids in [0, num_classes).
      num_classes: C.
      epochs, batch_size, learning_rate, weight_decay: the reference's recipe by default. A
        batch_size above N is clamped to N (one full batch per epoch, as torch would do).
      seed: drives the init, the per-epoch shuffles (see `probe_rngs`).
      normalize: L2-normalise features first (also applied by `evaluate_linear_probe`).

    Returns:
      The trained LinearProbe (its `train_loss` holds the mean loss of every epoch).
    """
    if np.ndim(train_features) != 2:
        raise ValueError(f"train_features must be 2-D (num_examples, feature_dim), got shape "
                         f"{np.shape(train_features)}; flatten the encoder output first.")
    num_examples = np.shape(train_features)[0]
    if num_examples == 0:
        raise ValueError("train_features is empty; extract features of the train split first.")
    _check_schedule(num_classes=num_classes, epochs=epochs, batch_size=batch_size,
                    learning_rate=learning_rate, weight_decay=weight_decay)
    train_features = jnp.asarray(train_features)   # to the device once, checked there
    knn.check_finite("train_features", train_features)
    _check_labels(train_labels, num_examples, int(num_classes), "train")
    rngs = probe_rngs(seed)
    params, epoch_losses = _fit_on_features_jit(
        train_features, jnp.asarray(train_labels), rngs.init, rngs.shuffle,
        jnp.float32(learning_rate), jnp.float32(weight_decay), num_classes=int(num_classes),
        epochs=int(epochs), batch_size=min(int(batch_size), num_examples),
        normalize=bool(normalize))
    return LinearProbe(params=params, train_loss=epoch_losses, num_classes=int(num_classes),
                       normalize=bool(normalize))


@jax.jit
def _evaluation_sums(probe: LinearProbe, features, labels, mask):
    logits = probe.logits(features)
    safe_labels = jnp.where(mask, labels, 0)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, safe_labels)
    # Ties between logits: lower class id first (lax.top_k); the top-5 of C < 5 classes is all.
    ranked = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    hits = ranked == safe_labels[:, None]
    return (jnp.sum(hits[:, 0] & mask), jnp.sum(hits.any(axis=1) & mask),
            jnp.sum(jnp.where(mask, losses, 0.0)), jnp.sum(mask))


def evaluate_linear_probe(probe: LinearProbe, features: jax.Array, labels: jax.Array,
                          mask: jax.Array | None = None) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy of `probe` on (N, F) features.

    Rows with mask False (padding of an eval set) are excluded and may carry any label.
    Returns Python floats `{"top1", "top5", "loss"}`.
    """
    if np.ndim(features) != 2:
        raise ValueError(f"features must be 2-D (num_examples, feature_dim), got shape "
                         f"{np.shape(features)}.")
    num_examples, feature_dim = np.shape(features)
    expected_dim = probe.params["params"]["fc"]["kernel"].shape[0]
    if feature_dim != expected_dim:
        raise ValueError(f"features have dim {feature_dim} but the probe was trained on "
                         f"{expected_dim}-d features; use the same encoder output.")
    mask = np.ones((num_examples,), bool) if mask is None else np.asarray(mask).astype(bool)
    if mask.shape != (num_examples,):
        raise ValueError(f"mask must have shape ({num_examples},), got {mask.shape}.")
    if not mask.any():
        raise ValueError("mask selects no example; the accuracy of an empty set is undefined.")
    if np.shape(labels) != (num_examples,):
        raise ValueError(f"labels must have shape ({num_examples},), got {np.shape(labels)}.")
    real_labels = np.asarray(labels)[mask]
    _check_labels(real_labels, real_labels.shape[0], probe.num_classes, "eval")
    features = jnp.asarray(features)   # to the device once, checked there
    knn.check_finite("features", features, mask)
    top1, top5, loss_sum, count = _evaluation_sums(probe, features,
                                                   jnp.asarray(labels, jnp.int32),
                                                   jnp.asarray(mask))
    count = float(count)
    return {"top1": float(top1) / count * 100.0, "top5": float(top5) / count * 100.0,
            "loss": float(loss_sum) / count}


# ----------------------------------------------------------------------------------------------
# b) The reference protocol: augmented images through the frozen encoder
# ----------------------------------------------------------------------------------------------

def _embedder(embed_fn: Callable, with_variables: bool, update_encoder_state: bool) -> Callable:
    """Uniform `(variables, images) -> (features, variables)` view of the caller's embed_fn."""
    if not with_variables:
        return lambda variables, images: (embed_fn(images), variables)
    if update_encoder_state:
        return embed_fn
    return lambda variables, images: (embed_fn(variables, images), variables)


def train_linear_probe_on_images(
        embed_fn: Callable, augment_fn: Callable, images_uint8: Any, labels: Any, *,
        num_classes: int, epochs: int = 100, batch_size: int = 512, learning_rate: float = 1e-3,
        weight_decay: float = 1e-6, seed: int = 0, progress: bool = True, normalize: bool = False,
        encoder_variables: Any = None, update_encoder_state: bool = False,
        batch_sharding: jax.sharding.Sharding | None = None) -> LinearProbe:
    """The reference linear evaluation: each step augments, embeds (frozen), updates Linear(F, C).

    Args:
      embed_fn: the frozen encoder, `embed_fn(images_float) -> (B, F) features`. It must run the
        encoder in inference mode (BatchNorm with running statistics, no dropout): that is the
        caller's responsibility, as is using the encoder trunk (not the projection head).
        Its output is wrapped in stop_gradient. When `encoder_variables` is given the call is
        `embed_fn(encoder_variables, images_float)`: pass the encoder weights this way, so that
        they enter the compiled step as arguments; weights captured in a closure are baked into
        the program as constants (slow compile, a second copy in device memory).
      augment_fn: `augment_fn(key, images_uint8_batch) -> images_float`, the train augmentation
        (random crop, flip, ...); the key differs at every step.
      images_uint8: (N, ...) train images, NumPy (gathered on the host per step) or a device array.
      labels: (N,) integer class ids.
      num_classes, epochs, batch_size, learning_rate, weight_decay, seed, normalize: as in
        `fit_linear_probe`. With identity augmentation and embedding both functions follow the
        same trajectory (same init, same batch order).
      progress: show a tqdm bar (images/s, epoch loss).
      encoder_variables: optional encoder variables for embed_fn (see above).
      update_encoder_state: the reference's behaviour (`net.train()` during the probe: BatchNorm
        normalises with batch statistics and updates its running statistics). Then
        `embed_fn(encoder_variables, images) -> (features, new_encoder_variables)`, the
        variables are threaded through the steps and returned in `probe.encoder_variables`; the
        last partial batch is then fed unpadded (padding rows would enter the batch statistics),
        which compiles the step for a second shape. Default False: a truly frozen encoder.
      batch_sharding: splits each batch's rows over devices (e.g. `NamedSharding(mesh,
        P("data"))`), so that every device augments and embeds its share of the batch; without
        it every device runs the whole batch. Same results (the step is one jitted program over
        global arrays; JAX's random bits do not depend on the sharding). A batch whose size does
        not divide over it runs replicated. Every process must pass the same images.

    Returns:
      The trained LinearProbe. The final-epoch test accuracy is the caller's:
      `evaluate_linear_probe(probe, *extract_features(embed_fn, test_batches))`.
    """
    num_examples = np.shape(images_uint8)[0] if np.ndim(images_uint8) >= 2 else 0
    if num_examples == 0:
        raise ValueError(f"images_uint8 must be a non-empty (N, ...) array of images, got shape "
                         f"{np.shape(images_uint8)}.")
    _check_schedule(num_classes=num_classes, epochs=epochs, batch_size=batch_size,
                    learning_rate=learning_rate, weight_decay=weight_decay)
    _check_labels(labels, num_examples, int(num_classes), "train")
    if update_encoder_state and encoder_variables is None:
        raise ValueError("update_encoder_state=True needs encoder_variables (the BatchNorm "
                         "statistics to update) and embed_fn(variables, images) -> "
                         "(features, new_variables).")
    num_classes, epochs = int(num_classes), int(epochs)
    batch_size = min(int(batch_size), num_examples)
    labels = np.asarray(labels, np.int32)
    embed = _embedder(embed_fn, encoder_variables is not None, update_encoder_state)
    head = ProbeHead(num_classes)
    optimizer = probe_optimizer(learning_rate, weight_decay)
    rngs = probe_rngs(seed)

    def features_of(variables, images, key):
        features, variables = embed(variables, augment_fn(key, images))
        return jax.lax.stop_gradient(_prepare_features(features, normalize)), variables

    batch_spec = jax.ShapeDtypeStruct((batch_size,) + tuple(np.shape(images_uint8)[1:]),
                                      images_uint8.dtype)
    feature_spec = jax.eval_shape(features_of, encoder_variables, batch_spec, rngs.augment)[0]
    if len(feature_spec.shape) != 2 or feature_spec.shape[0] != batch_size:
        raise ValueError(f"embed_fn must return (batch, feature_dim) features, got shape "
                         f"{feature_spec.shape} for a batch of {batch_size}; flatten the output.")
    params = init_probe_params(rngs.init, feature_spec.shape[1], num_classes)
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(params, opt_state, variables, images, batch_labels, valid, step):
        features, variables = features_of(variables, images,
                                          jax.random.fold_in(rngs.augment, step))
        params, opt_state, loss = _probe_update(params, opt_state, features, batch_labels, valid,
                                                head=head, optimizer=optimizer)
        return params, opt_state, variables, loss

    def host_batches():
        """Yields (epoch, step, images, labels, valid, num_valid) in the shared batch order."""
        step = 0
        for epoch in range(epochs):
            indices, mask = jax.device_get(
                epoch_batches(jax.random.fold_in(rngs.shuffle, epoch), num_examples, batch_size))
            for idx, valid in zip(indices, mask):
                num_valid = int(valid.sum())
                if update_encoder_state and num_valid < batch_size:
                    idx, valid = idx[:num_valid], valid[:num_valid]
                yield epoch, step, images_uint8[idx], labels[idx], valid, num_valid
                step += 1

    def placed(array):
        """`array` (one batch, the same on every process) split over `batch_sharding`."""
        if batch_sharding is None:
            return array
        try:
            batch_sharding.shard_shape(array.shape)
        except ValueError:     # indivisible (an unpadded last batch): replicated, as without it
            return array
        return jax.make_array_from_callback(array.shape, batch_sharding, lambda index: array[index])

    variables = encoder_variables
    epoch_losses, step_losses = [], []
    # Steps go back to back (the losses are fetched once per epoch), except on a multi-device
    # CPU host, where back-to-back steps with collectives can deadlock: one step in flight.
    one_in_flight = jax.default_backend() == "cpu" and jax.device_count() > 1
    batches = host_batches()
    show = progress and jax.process_index() == 0   # one bar per job, not per process
    with tqdm(total=epochs * num_examples, unit="img", unit_scale=True, disable=not show,
              desc="linear probe") as bar:
        batch = next(batches, None)
        while batch is not None:
            epoch, step, images, batch_labels, valid, num_valid = batch
            params, opt_state, variables, loss = train_step(
                params, opt_state, variables, placed(images), placed(batch_labels),
                placed(valid), np.int32(step))
            # Gather the next batch on the host while the device runs this step.
            batch = next(batches, None)
            if one_in_flight:
                jax.block_until_ready(loss)
            step_losses.append((loss, num_valid))
            bar.update(num_valid)
            if batch is None or batch[0] != epoch:
                values = jax.device_get([value for value, _ in step_losses])
                epoch_losses.append(sum(float(value) * n for value, (_, n)
                                        in zip(values, step_losses)) / num_examples)
                bar.set_postfix(epoch=epoch + 1, loss=f"{epoch_losses[-1]:.4f}")
                step_losses = []
    return LinearProbe(params=params, train_loss=jnp.asarray(epoch_losses, jnp.float32),
                       num_classes=num_classes, normalize=bool(normalize),
                       encoder_variables=variables if update_encoder_state else None)


# ----------------------------------------------------------------------------------------------
# c) Feature extraction over a padded eval iterator
# ----------------------------------------------------------------------------------------------

def _unpack_batch(batch: Any, image_key: str, label_key: str, mask_key: str):
    if isinstance(batch, Mapping):
        missing = [key for key in (image_key, label_key) if key not in batch]
        if missing:
            raise ValueError(f"batch has no {missing} entry (keys: {sorted(batch)}); pass "
                             "image_key=/label_key= naming the batch's fields.")
        return batch[image_key], batch[label_key], batch.get(mask_key)
    if isinstance(batch, (tuple, list)) and len(batch) in (2, 3):
        return batch[0], batch[1], batch[2] if len(batch) == 3 else None
    got = (f"a {type(batch).__name__} of {len(batch)} entries"
           if isinstance(batch, (tuple, list)) else type(batch).__name__)
    raise ValueError("each batch must be a mapping with image/label[/mask] entries or a tuple "
                     f"(images, labels[, mask]) of 2 or 3 entries; got {got}.")


def extract_features(embed_fn: Callable, batches: Iterable[Any], *, encoder_variables: Any = None,
                     image_key: str = "image", label_key: str = "label",
                     mask_key: str = "mask") -> tuple[np.ndarray, np.ndarray]:
    """Runs `embed_fn` over eval batches and keeps the real rows: `(features, labels)` in NumPy.

    Args:
      embed_fn: `embed_fn(images) -> (B, F)` (or `embed_fn(encoder_variables, images)`), in
        inference mode; jit it yourself (it is called once per batch as given).
      batches: iterable of `{"image", "label"[, "mask"]}` mappings or `(images, labels[, mask])`
        tuples. A mask (B,) marks real rows (True/1) against padding added to fill the last
        batch; padded rows are dropped, so every example counts once.
      encoder_variables: passed first to embed_fn when given.
      image_key, label_key, mask_key: field names of mapping batches (big_vision uses "_mask").

    Returns:
      features (M, F) float32 and labels (M,), M = the number of real rows, in iterator order.
    """
    def dispatched():
        for batch in batches:
            images, labels, mask = _unpack_batch(batch, image_key, label_key, mask_key)
            features = embed_fn(images) if encoder_variables is None else embed_fn(
                encoder_variables, images)
            yield features, labels, mask

    all_features, all_labels = [], []
    # The next batch is embedded while this one is copied to the host.
    for features, labels, mask in device_outputs.fetched_in_order(dispatched(),
                                                                  lambda item: item):
        features = np.asarray(features, np.float32)  # host copy; also waits for the device
        labels = np.asarray(labels)
        if features.ndim != 2 or features.shape[0] != labels.shape[0]:
            raise ValueError(f"embed_fn returned shape {features.shape} for a batch of "
                             f"{labels.shape[0]} labels; it must return (batch, feature_dim).")
        if mask is not None:
            keep = np.asarray(mask).astype(bool)
            if keep.shape != labels.shape:
                raise ValueError(f"mask shape {keep.shape} differs from labels {labels.shape}.")
            features, labels = features[keep], labels[keep]
        all_features.append(features)
        all_labels.append(labels)
    if not all_features:
        raise ValueError("batches yielded nothing; check the eval split and its iterator.")
    return np.concatenate(all_features), np.concatenate(all_labels)
