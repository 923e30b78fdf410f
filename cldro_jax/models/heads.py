"""Projection head and the encoder + head model of the image experiments (Flax Linen).

The reference head is `Linear(F, 512, bias=False) - BatchNorm1d(512) - ReLU - Linear(512, 128)`
on the pooled encoder features. The loss sees the head's raw output (the losses L2-normalise);
the kNN monitor and the linear probe see the encoder's features (`ContrastiveModel.encode`).

The Dense layers are initialised as torch's nn.Linear (kernel and bias U(-1/sqrt(fan_in),
1/sqrt(fan_in))) so that the head starts from the same distribution as the reference's.
Note: Flax's BatchNorm updates its running variance with the biased batch variance, torch with
the unbiased one; the difference is a factor n / (n - 1) in the running statistics only, which the
contrastive loss never uses: 0.4% in this head at batch 256, and at most 1/4096 in the encoder
(its smallest n, layer 4 on 32x32 crops, is 256 x 4 x 4), whose running statistics the kNN
monitor and the linear probe use: a relative change of about 1e-4 in their features.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cldro_jax.models import view_norm

# torch nn.Linear.reset_parameters: kaiming_uniform_(a=sqrt(5)) == U(+-sqrt(1 / fan_in)).
torch_linear_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_linear_bias_init(fan_in: int):
    """torch nn.Linear bias init U(+-1/sqrt(fan_in)) (Flax's bias init is not told fan_in)."""
    bound = 1.0 / fan_in**0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)

    return init


class ProjectionHead(nn.Module):
    """Dense(hidden, no bias) - BatchNorm - ReLU - Dense(out); returns float32 (B, out)."""

    hidden: int = 512
    out: int = 128
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bn_momentum: float = 0.9  # Flax convention; == torch momentum 0.1
    bn_epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x, *, train: bool, num_views: int = 1):
        if x.ndim != 2:
            raise ValueError(f"ProjectionHead expects pooled features (B, F), got shape {x.shape}.")
        x = nn.Dense(
            self.hidden,
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=torch_linear_kernel_init,
            name="fc1",
        )(x)
        x = view_norm.batch_norm(
            use_running_average=not train,
            num_views=num_views,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="bn1",
        )(x)
        x = nn.relu(x)
        x = nn.Dense(
            self.out,
            use_bias=True,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=torch_linear_kernel_init,
            bias_init=torch_linear_bias_init(self.hidden),
            name="fc2",
        )(x)
        return x.astype(jnp.float32)


class ContrastiveModel(nn.Module):
    """Encoder followed by a projection head.

    `__call__(x, *, train, num_views=1) -> (features, projections)`, both float32: features are
    the encoder's pooled output (what evaluators use), projections the head's raw output (what the
    loss uses). `num_views`: rows interleaved by view, BatchNorm statistics per view.
    `encode(x, *, train=False) -> features` runs the encoder only (apply with `method="encode"`);
    its variables are the `encoder` sub-tree of the full model's.
    """

    encoder: nn.Module
    head: nn.Module

    def __call__(self, x, *, train: bool, num_views: int = 1):
        features = self.encoder(x, train=train, num_views=num_views).astype(jnp.float32)
        projections = self.head(features, train=train, num_views=num_views).astype(jnp.float32)
        return features, projections

    def encode(self, x, *, train: bool = False):
        return self.encoder(x, train=train).astype(jnp.float32)
