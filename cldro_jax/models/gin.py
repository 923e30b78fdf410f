"""GIN encoder + projection head of GraphCL's unsupervised TU setting (Flax Linen), on padded batches.

As the reference (GraphCL ``unsupervised_TU/gin.py`` + ``gsimclr*.py``):
- ``num_layers`` (3) GINConv layers of width ``hidden`` (32), eps = 0: ``h_i' = MLP(h_i +
  sum_{(j -> i) in E} h_j)`` with MLP = Linear-ReLU-Linear; then ReLU, then BatchNorm1d
  (eps 1e-5, momentum 0.1), in that order (``bn(relu(conv(x)))``);
- graph embedding = concat over layers of the per-layer sum pooling (3 x 32 = 96-d);
- projection head Linear(96, 96)-ReLU-Linear(96, 96);
- every Linear: Xavier-uniform weights and zero biases (the reference's ``init_emb``).

Padding (see `cldro_jax.data.graph_batch`): messages along padded edges are multiplied by
``edge_mask``, BatchNorm statistics are taken over real nodes only, and pooling multiplies by
``node_mask``; the embeddings of real graphs are therefore exactly those of the unpadded batch.
Padded graph slots get the embedding of an empty graph (zeros) and must be masked in the loss
(``valid=batch.graph_mask``).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cldro_jax.data.graph_batch import GraphBatch

_xavier = nn.initializers.xavier_uniform()


class MaskedBatchNorm(nn.Module):
    """BatchNorm over the rows where ``mask`` is True, with PyTorch BatchNorm1d semantics.

    Written here instead of using ``flax.linen.BatchNorm(mask=...)`` for two reasons: PyTorch
    (the reference) updates the running variance with the UNBIASED batch variance (Flax: biased),
    and under ``axis_name`` Flax averages per-device masked means, which is wrong when devices hold
    different numbers of real nodes; here sums and counts are reduced across devices instead.

    Attributes:
      momentum: PyTorch convention: ``running = (1 - momentum) * running + momentum * batch``.
      epsilon: added to the variance.
      axis_name: mapped axis (shard_map/pmap) to reduce statistics over; None under plain jit.
    """

    momentum: float = 0.1
    epsilon: float = 1e-5
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, *, train: bool) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
        x32 = x.astype(jnp.float32)
        if train:
            weight = mask.astype(jnp.float32)[:, None]
            count, total = jnp.sum(weight), jnp.sum(x32 * weight, axis=0)
            if self.axis_name is not None:
                count, total = jax.lax.psum((count, total), self.axis_name)
            count = jnp.maximum(count, 1.0)
            mean = total / count
            squares = jnp.sum(jnp.square(x32 - mean) * weight, axis=0)
            if self.axis_name is not None:
                squares = jax.lax.psum(squares, self.axis_name)
            var = squares / count
            if not self.is_initializing():
                unbiased = squares / jnp.maximum(count - 1.0, 1.0)
                running_mean.value = (1 - self.momentum) * running_mean.value + self.momentum * mean
                running_var.value = (1 - self.momentum) * running_var.value + self.momentum * unbiased
        else:
            mean, var = running_mean.value, running_var.value
        # float32 out whatever the compute dtype: the next layer and the sum pooling take
        # float32 anyway, so a bf16 round trip here only added rounding to the gradients.
        return (x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias


class GINConv(nn.Module):
    """One GIN convolution, eps = 0: MLP(h_i + sum of h_j over real edges j -> i)."""

    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array, batch: GraphBatch) -> jax.Array:
        # Summed in float32 whatever the compute dtype: a bfloat16 running sum stops growing
        # near 256 (its spacing there exceeds a message of size 1), so a hub with thousands
        # of neighbours (REDDIT graphs) would get a sum off by up to 90%.
        h32 = h.astype(jnp.float32)
        messages = h32[batch.senders] * batch.edge_mask[:, None].astype(jnp.float32)
        aggregated = jax.ops.segment_sum(messages, batch.receivers, num_segments=h.shape[0])
        out = nn.Dense(self.hidden, kernel_init=_xavier, dtype=self.dtype)(h32 + aggregated)
        out = nn.relu(out)
        return nn.Dense(self.hidden, kernel_init=_xavier, dtype=self.dtype)(out)


class GINEncoder(nn.Module):
    """GIN layers -> per-layer sum pooling, concatenated: (G, num_layers * hidden)."""

    num_layers: int = 3
    hidden: int = 32
    bn_axis_name: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, batch: GraphBatch, *, train: bool) -> jax.Array:
        num_graphs = batch.graph_mask.shape[0]
        node_weight = batch.node_mask[:, None].astype(jnp.float32)
        # float32: GINConv sums in float32, and bf16 would round continuous attributes (above
        # 256 to steps of 2 or more) before they are ever used.
        h = batch.node_features.astype(jnp.float32)
        pooled = []
        for _ in range(self.num_layers):
            h = nn.relu(GINConv(self.hidden, dtype=self.dtype)(h, batch))
            h = MaskedBatchNorm(axis_name=self.bn_axis_name)(h, batch.node_mask, train=train)
            pooled.append(jax.ops.segment_sum(h.astype(jnp.float32) * node_weight,
                                              batch.node_graph, num_segments=num_graphs))
        return jnp.concatenate(pooled, axis=-1)


class GIN(nn.Module):
    """GraphCL's model: `GINEncoder` + projection head.

    ``__call__(batch, *, train) -> (graph_embeddings (G, L*hidden), projections (G, L*hidden))``;
    embeddings feed the SVM evaluation, projections the contrastive loss. With ``train=True``
    pass ``mutable=["batch_stats"]`` to ``apply``.
    """

    num_layers: int = 3
    hidden: int = 32
    bn_axis_name: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, batch: GraphBatch, *, train: bool) -> tuple[jax.Array, jax.Array]:
        embeddings = GINEncoder(self.num_layers, self.hidden, self.bn_axis_name, self.dtype,
                                name="encoder")(batch, train=train)
        width = self.num_layers * self.hidden
        z = nn.Dense(width, kernel_init=_xavier, dtype=self.dtype, name="head_0")(embeddings)
        z = nn.Dense(width, kernel_init=_xavier, dtype=self.dtype, name="head_1")(nn.relu(z))
        return embeddings, z.astype(jnp.float32)
