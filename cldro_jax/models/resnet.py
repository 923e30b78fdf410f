"""ResNet encoders in Flax Linen, laid out as torchvision's ResNet v1.5 (NHWC).

The image experiments of the paper use torchvision's ResNet-50 with its classifier removed and,
for 32x32 inputs, the "CIFAR stem": the 7x7 stride-2 stem conv replaced by a 3x3 stride-1 conv
and the max-pool dropped. This module reproduces that network:

* blocks: `BasicBlock` (ResNet-18/34) and `Bottleneck` (ResNet-50) with the stride on the 3x3
  conv (torchvision's "v1.5"), a 1x1-conv + BN shortcut wherever the shape changes;
* torch-style symmetric padding (k // 2 on each side), so that stride-2 convs see the same
  pixels as torchvision's (Flax's "SAME" pads asymmetrically for even sizes) and torchvision
  weights could be loaded one to one;
* torchvision's initialisation: conv kernels N(0, 2 / fan_out) (kaiming normal, fan_out, relu),
  BatchNorm scale 1 and bias 0, no conv biases; `stem_init="conv_default"` gives the stem conv
  torch's plain nn.Conv2d default instead, as the reference's replaced CIFAR stem has;
* BatchNorm eps 1e-5 and momentum 0.9 in Flax's convention (torch's momentum 0.1 weights the
  new batch; Flax's momentum weights the old running value).

`__call__(x, *, train, num_views=1)` returns the globally average-pooled features in float32,
(B, F) with F = 8 * width * expansion (512 for ResNet-18/34 and 2048 for ResNet-50 at width 64).
`dtype` is the compute dtype (e.g. jnp.bfloat16); parameters stay float32 and BatchNorm reduces
its statistics in float32. `num_views=2` runs both views of a contrastive batch (rows interleaved
by view) in one pass with BatchNorm statistics per view, which equals one pass per view
(`view_norm.ViewBatchNorm`).

Parameter names follow torchvision's (`conv1`, `bn1`, `layer{stage}_{block}` with `conv1..3`,
`bn1..3`, `downsample_conv`, `downsample_bn`) so a checkpoint converter is a rename plus a
kernel transpose.

`forward_flops` / `resnet_flops_per_image` count multiply-adds of every Conv and Dense layer
analytically (x 2 = FLOPs), from the shapes Flax actually builds (traced with `jax.eval_shape`, so
nothing is computed), for throughput and MFU reporting.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cldro_jax import _registering
from cldro_jax.models import view_norm

ModuleDef = Any

# torchvision: nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu"), i.e. an
# UNtruncated normal with variance 2 / (k_h * k_w * out_channels). Flax's "normal" distribution is
# the untruncated one ("truncated_normal" would shrink the std by about 12%).
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torch's default for a freshly built nn.Conv2d: kaiming_uniform(a=sqrt(5)), i.e. U(+-1/sqrt(fan_in)).
# The reference builds its 3x3 CIFAR stem conv after torchvision's init loop has run, so that one
# layer keeps this default.
torch_conv_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

STEMS = ("cifar", "imagenet")
STEM_INITS = {"torchvision": conv_kernel_init, "conv_default": torch_conv_default_init}


def _torch_padding(kernel_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """torch's `padding=k // 2` on both sides (Flax's "SAME" pads (0, 1) for stride 2, even H)."""
    pad = kernel_size // 2
    return ((pad, pad), (pad, pad))


def _conv(conv: ModuleDef, features: int, kernel_size: int, strides: int, name: str,
          **kwargs):
    return conv(
        features,
        (kernel_size, kernel_size),
        strides=(strides, strides),
        padding=_torch_padding(kernel_size),
        name=name,
        **kwargs,
    )


class BasicBlock(nn.Module):
    """Two 3x3 convs (torchvision's BasicBlock); output channels = `features`."""

    features: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef
    zero_init_residual: bool = False
    expansion: ClassVar[int] = 1

    @nn.compact
    def __call__(self, x):
        residual = x
        y = _conv(self.conv, self.features, 3, self.strides, "conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = _conv(self.conv, self.features, 3, 1, "conv2")(y)
        last_bn_init = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
        y = self.norm(name="bn2", scale_init=last_bn_init)(y)
        if residual.shape != y.shape:  # torchvision: stride != 1 or channel change
            residual = _conv(self.conv, self.features, 1, self.strides, "downsample_conv")(residual)
            residual = self.norm(name="downsample_bn")(residual)
        return nn.relu(y + residual)


class Bottleneck(nn.Module):
    """1x1 - 3x3 (strided, v1.5) - 1x1 convs; output channels = 4 * `features`."""

    features: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef
    zero_init_residual: bool = False
    expansion: ClassVar[int] = 4

    @nn.compact
    def __call__(self, x):
        residual = x
        y = _conv(self.conv, self.features, 1, 1, "conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = _conv(self.conv, self.features, 3, self.strides, "conv2")(y)
        y = nn.relu(self.norm(name="bn2")(y))
        y = _conv(self.conv, self.features * self.expansion, 1, 1, "conv3")(y)
        last_bn_init = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
        y = self.norm(name="bn3", scale_init=last_bn_init)(y)
        if residual.shape != y.shape:
            residual = _conv(
                self.conv, self.features * self.expansion, 1, self.strides, "downsample_conv"
            )(residual)
            residual = self.norm(name="downsample_bn")(residual)
        return nn.relu(y + residual)


class ResNet(nn.Module):
    """torchvision-layout ResNet trunk; returns pooled float32 features (B, num_features).

    Attributes:
      stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
      block_cls: `BasicBlock` or `Bottleneck`.
      stem: "cifar" (3x3 stride-1 conv, no max-pool; the paper's 32x32 setting) or "imagenet"
        (7x7 stride-2 conv + 3x3 stride-2 max-pool).
      width: channels of the stem and first stage (64 in torchvision); stage i has width * 2**i.
      dtype: compute dtype (activations, conv inputs); parameters are `param_dtype`.
      bn_momentum: Flax convention (0.9 == torch momentum 0.1).
      zero_init_residual: torchvision's option of the same name (zero scale of each block's last
        BN); off by default, as in torchvision and the reference code.
      stem_init: initialisation of the stem conv: "torchvision" (kaiming normal, fan_out, as
        every other conv) or "conv_default" (torch's nn.Conv2d default, U(+-1/sqrt(fan_in)),
        which the reference's replaced CIFAR stem keeps). A BatchNorm follows the stem, so this
        changes only the scale of the stem's weights relative to their Adam updates.
    """

    stage_sizes: Sequence[int]
    block_cls: ModuleDef
    stem: str = "cifar"
    width: int = 64
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    zero_init_residual: bool = False
    stem_init: str = "torchvision"

    @property
    def num_features(self) -> int:
        """Size F of the pooled feature vector."""
        return self.width * 2 ** (len(self.stage_sizes) - 1) * self.block_cls.expansion

    @nn.compact
    def __call__(self, x, *, train: bool, num_views: int = 1):
        if self.stem not in STEMS:
            raise ValueError(f"ResNet stem must be one of {STEMS}, got {self.stem!r}.")
        if x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise ValueError(
                f"ResNet expects NHWC images (B, H, W, 1 or 3), got shape {x.shape}; "
                "transpose NCHW inputs with x.transpose(0, 2, 3, 1)."
            )
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(
                f"ResNet expects float images (normalised), got dtype {x.dtype}; preprocess uint8 "
                "batches with cldro_jax.data.augment.eval_preprocess or simclr_augment first."
            )
        conv = functools.partial(
            nn.Conv,
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=conv_kernel_init,
        )
        norm = functools.partial(
            view_norm.batch_norm,
            use_running_average=not train,
            num_views=num_views,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        if self.stem_init not in STEM_INITS:
            raise ValueError(f"stem_init must be one of {sorted(STEM_INITS)}, got "
                             f"{self.stem_init!r}")
        stem_init = STEM_INITS[self.stem_init]
        if self.stem == "imagenet":
            x = _conv(conv, self.width, 7, 2, "conv1", kernel_init=stem_init)(x)
            x = nn.relu(norm(name="bn1")(x))
            # torch pads the max-pool with -inf; so does Flax's max_pool.
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        else:
            x = _conv(conv, self.width, 3, 1, "conv1", kernel_init=stem_init)(x)
            x = nn.relu(norm(name="bn1")(x))
        for stage, num_blocks in enumerate(self.stage_sizes):
            for block in range(num_blocks):
                strides = 2 if stage > 0 and block == 0 else 1
                x = self.block_cls(
                    features=self.width * 2**stage,
                    strides=strides,
                    conv=conv,
                    norm=norm,
                    zero_init_residual=self.zero_init_residual,
                    name=f"layer{stage + 1}_{block}",
                )(x)
        # Pool in float32: the features feed the kNN monitor and the linear probe.
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock)
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck)

_ENCODERS: dict[str, Callable[..., ResNet]] = {
    "resnet18": ResNet18,
    "resnet34": ResNet34,
    "resnet50": ResNet50,
}


def register_encoder(name: str, constructor: Callable[..., nn.Module], *,
                     replace: bool = False) -> None:
    """Makes an image encoder of your own trainable as `--config.model.name=name`.

    `constructor(stem=, width=, dtype=, stem_init=)` (the `config.model` fields, which it may
    ignore) returns a Flax Linen module whose `__call__(x, *, train, num_views=1)` maps uint8-
    normalised images (N, H, W, C) to features (N, F): at any image size (evaluation may run at
    another size than training, e.g. STL10 trains at 32 and probes at 96), with BatchNorm (if
    any) in the `batch_stats` collection. `num_views` is the number of views stacked along N
    (BatchNorm per view needs it). Register it in a module named by `--config.imports` so that
    the probe, `load_encoder` and a resume find it too (docs/extending.md).
    """
    _registering.check_new_entry("encoder", _ENCODERS, name, constructor, replace,
                                 builtin=("resnet18", "resnet34", "resnet50"))
    _ENCODERS[name] = constructor


def encoder_names() -> tuple[str, ...]:
    return tuple(_ENCODERS)


def get_encoder(name: str, **kwargs) -> ResNet:
    """A registered encoder, e.g. `get_encoder("resnet50", stem="cifar", dtype=jnp.bfloat16)`."""
    try:
        constructor = _ENCODERS[name]
    except KeyError:
        raise ValueError(
            f"Unknown encoder {name!r}; available: {sorted(_ENCODERS)}. An encoder of your own "
            "is registered with cldro_jax.models.resnet.register_encoder in a module that "
            "--config.imports=MODULE names (docs/extending.md).") from None
    return constructor(**kwargs)


def forward_flops(module: nn.Module, input_shape: Sequence[int], **call_kwargs) -> int:
    """FLOPs (2 x multiply-adds) of every nn.Conv and nn.Dense in one forward of `module`.

    The count comes from the layer shapes Flax builds, traced with `jax.eval_shape` (no compute),
    so it follows the real architecture instead of a hand-kept table. Normalisation, activations,
    pooling and additions are not counted (they are < 1% for a ResNet), matching the usual
    "conv + fc multiply-adds x 2" convention of published FLOP figures.
    """
    multiply_adds = []

    def count(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        layer = context.module
        if context.method_name == "__call__" and isinstance(layer, (nn.Conv, nn.Dense)):
            in_features = args[0].shape[-1]
            if isinstance(layer, nn.Conv):
                window = math.prod(layer.kernel_size)
                in_features //= layer.feature_group_count
            else:
                window = 1
            out_positions = math.prod(out.shape[:-1])
            multiply_adds.append(out_positions * out.shape[-1] * window * in_features)
        return out

    def init_and_apply(x):
        with nn.intercept_methods(count):
            return module.init(jax.random.key(0), x, **call_kwargs)

    jax.eval_shape(init_and_apply, jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32))
    return 2 * sum(multiply_adds)


def resnet_flops_per_image(
    name: str, image_size: int = 32, stem: str = "cifar", width: int = 64
) -> int:
    """Forward FLOPs of one image through encoder `name` (no head); 1.11e9 for ResNet-18 CIFAR."""
    encoder = get_encoder(name, stem=stem, width=width)
    return forward_flops(encoder, (1, image_size, image_size, 3), train=False)


def contrastive_step_flops_per_image(
    name: str,
    image_size: int = 32,
    stem: str = "cifar",
    width: int = 64,
    head_dims: Sequence[int] = (512, 128),
) -> int:
    """FLOPs per source image of one contrastive training step: 2 views x (forward + backward).

    Backward is counted as 2 x forward (gradients w.r.t. activations and weights), the usual
    convention; `head_dims` are the projection head's (hidden, out) sizes, () for none. This is
    the figure docs/benchmarks.md quotes (ResNet-18 CIFAR 6.7 GFLOP, ResNet-50 CIFAR 15.6 GFLOP).
    """
    encoder = get_encoder(name, stem=stem, width=width)
    flops = resnet_flops_per_image(name, image_size, stem, width)
    dims = [encoder.num_features, *head_dims]
    flops += sum(2 * d_in * d_out for d_in, d_out in zip(dims[:-1], dims[1:], strict=True))
    return 2 * 3 * flops
