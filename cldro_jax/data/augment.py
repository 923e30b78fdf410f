"""SimCLR augmentation on the accelerator, inside jit, with torchvision's semantics.

The reference code augments on the CPU with torchvision + PIL (+ cv2 for the blur):

    RandomResizedCrop(32) -> RandomHorizontalFlip(0.5)
    -> RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8) -> RandomGrayscale(0.2)
    -> GaussianBlur(kernel 3, sigma ~ U[0.1, 2], p=0.5) -> ToTensor -> Normalize(CIFAR mean/std)

and that CPU pipeline, not the GPU, bounds its speed (docs/benchmarks.md, "Anchors"). Here the same
pipeline is a pure JAX function of (key, uint8 batch), random per example (`vmap` over per-example
keys), with static shapes only, so it runs fused inside the jitted train step.

Every parameter means what it means in torchvision; each op's docstring states the torchvision
definition it implements. The pipeline computes in float32 on [0, 1] throughout, like
torchvision's tensor path; the reference's PIL path re-quantises to uint8 after every op. That
changes brightness, contrast, saturation, grayscale and the resized crop by about 1/255, but the
hue shift by more: PIL's uint8 HSV stores hue on 0-255, wraps at 256 and truncates the shift
(`int(hue_factor * 255)`), so some pixels move by several 1/255 steps more or less than in the
exact definition. Quantisation noise of the reference, not a different augmentation; this
follows the tensor path's exact definition.

dm-pix offers similar ops but with TensorFlow's semantics (brightness is an additive delta,
contrast blends each channel with that channel's own mean, no random order of the jitter ops),
which are not torchvision's, hence the hand-written ops here.

Building blocks (deterministic, exposed for tests and reuse): `sample_crop_box`, `crop_resize`,
`adjust_brightness`, `adjust_contrast`, `adjust_saturation`, `adjust_hue`, `color_jitter`,
`rgb_to_grayscale`, `gaussian_blur`, `normalize`; `sample_view_params` draws every random choice
of one view and `apply_view` applies them. Public entry points: `SimCLRAugment` (the config),
`simclr_augment`, `two_views`, `eval_preprocess`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
# ITU-R 601-2 luma, as PIL's convert("L") (the reference works on PIL images); torchvision's
# tensor path uses 0.2989 for red, a 1e-4 difference.
GRAYSCALE_WEIGHTS = (0.299, 0.587, 0.114)

_HIGHEST = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SimCLRAugment:
    """SimCLR augmentation parameters, torchvision's meanings (defaults: the reference recipe).

    Attributes:
      out_size: side of the square output view (RandomResizedCrop's `size`).
      crop_scale: range of the crop's area as a fraction of the image area.
      crop_ratio: range of the crop's aspect ratio width / height (sampled log-uniformly).
      crop_attempts: tries before the centre-crop fallback (torchvision: 10).
      flip_prob: probability of a horizontal flip.
      jitter_prob: probability that ColorJitter is applied at all (RandomApply's p).
      brightness, contrast, saturation: factors are drawn from U[max(0, 1 - v), 1 + v].
      hue: the hue shift is drawn from U[-hue, hue], hue in [0, 0.5].
      grayscale_prob: probability of converting to grayscale (3 identical channels).
      blur_prob: probability of the Gaussian blur.
      blur_kernel: odd kernel side; the reference uses int(0.1 * 32) = 3 for 32x32 views.
      blur_sigma: range of the blur's sigma (uniform).
      mean, std: per-channel normalisation of the [0, 1] view (one entry per output channel).
      gray_to_rgb: repeat 1-channel sources to 3 channels before augmenting (so the 3-channel
        network and the CIFAR mean/std apply); if False they stay 1-channel, saturation and hue
        are identities on them, and mean/std need one entry.
      dtype: dtype of the returned views (the computation is float32).

    The config is hashable, so it can be a static argument of jit. An op whose probability is 0
    is left out of the traced graph entirely (see `crop_flip_only`).
    """

    out_size: int
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    crop_attempts: int = 10
    flip_prob: float = 0.5
    jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_prob: float = 0.2
    blur_prob: float = 0.5
    blur_kernel: int = 3
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    mean: tuple[float, ...] = CIFAR_MEAN
    std: tuple[float, ...] = CIFAR_STD
    gray_to_rgb: bool = True
    dtype: Any = jnp.float32

    def __post_init__(self):
        # Lists become tuples so the config stays hashable (a jit static argument).
        for name in ("crop_scale", "crop_ratio", "blur_sigma", "mean", "std"):
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        if not (isinstance(self.out_size, int) and self.out_size > 0):
            raise ValueError(f"out_size must be a positive int, got {self.out_size!r}.")
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max, got {self.crop_scale}.")
        lo, hi = self.crop_ratio
        if not 0.0 < lo <= hi:
            raise ValueError(f"crop_ratio must satisfy 0 < min <= max, got {self.crop_ratio}.")
        if self.crop_attempts < 1:
            raise ValueError(f"crop_attempts must be >= 1, got {self.crop_attempts}.")
        for name in ("flip_prob", "jitter_prob", "grayscale_prob", "blur_prob"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {p}.")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ValueError(
                    f"{name} must be >= 0 (torchvision's jitter amount), got {getattr(self, name)}."
                )
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5] (as in torchvision), got {self.hue}.")
        if self.blur_kernel < 1 or self.blur_kernel % 2 == 0:
            raise ValueError(f"blur_kernel must be a positive odd int, got {self.blur_kernel}.")
        if self.blur_prob > 0 and self.blur_kernel // 2 >= self.out_size:
            raise ValueError(
                f"blur_kernel {self.blur_kernel} is too large for out_size {self.out_size}: the "
                "reflect-101 border needs kernel // 2 < out_size."
            )
        lo, hi = self.blur_sigma
        if not 0.0 < lo <= hi:
            raise ValueError(f"blur_sigma must satisfy 0 < min <= max, got {self.blur_sigma}.")
        if len(self.mean) != len(self.std) or len(self.mean) not in (1, 3):
            raise ValueError(
                "mean and std need the same number of entries, 1 (grayscale) or 3 (RGB), got "
                f"mean={self.mean}, std={self.std}."
            )
        if min(self.std) <= 0:
            raise ValueError(f"std entries must be > 0, got {self.std}.")

    @classmethod
    def crop_flip_only(cls, out_size: int, **kwargs) -> "SimCLRAugment":
        """RandomResizedCrop + flip only: a cheap augmentation for e.g. a linear probe.

        (The reference probe trains on the full SimCLR augmentation; this is an option.)
        """
        kwargs = {"jitter_prob": 0.0, "grayscale_prob": 0.0, "blur_prob": 0.0, **kwargs}
        return cls(out_size=out_size, **kwargs)


def _uniform_range(amount: float) -> tuple[float, float]:
    """torchvision ColorJitter: a jitter amount v means factors in [max(0, 1 - v), 1 + v]."""
    return (max(0.0, 1.0 - amount), 1.0 + amount)


# --------------------------------------------------------------------------------------------
# RandomResizedCrop + flip
# --------------------------------------------------------------------------------------------


def _crop_box_from_uniforms(
    uniforms, height: int, width: int, scale: Sequence[float], ratio: Sequence[float]
):
    """torchvision's RandomResizedCrop.get_params driven by U[0, 1) draws, (4, attempts)."""
    u_area, u_ratio, u_top, u_left = uniforms
    area = float(height * width)
    target_area = area * (scale[0] + (scale[1] - scale[0]) * u_area)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = jnp.exp(log_lo + (log_hi - log_lo) * u_ratio)
    crop_w = jnp.round(jnp.sqrt(target_area * aspect)).astype(jnp.int32)
    crop_h = jnp.round(jnp.sqrt(target_area / aspect)).astype(jnp.int32)
    fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
    # torch.randint(0, n + 1) is uniform on {0..n}: floor(u * (n + 1)), clipped against float
    # rounding at u -> 1. Candidates that do not fit are discarded below.
    top = jnp.clip(jnp.floor(u_top * (height - crop_h + 1)), 0, height - crop_h).astype(jnp.int32)
    left = jnp.clip(jnp.floor(u_left * (width - crop_w + 1)), 0, width - crop_w).astype(jnp.int32)
    first = jnp.argmax(fits)  # index of the first candidate that fits (0 if none)
    sampled = jnp.stack([top[first], left[first], crop_h[first], crop_w[first]])

    # Fallback, static since the image size is: torchvision's central crop.
    in_ratio = width / height
    if in_ratio < min(ratio):
        fb_w = width
        fb_h = int(round(fb_w / min(ratio)))
    elif in_ratio > max(ratio):
        fb_h = height
        fb_w = int(round(fb_h * max(ratio)))
    else:
        fb_w, fb_h = width, height
    fallback = jnp.array([(height - fb_h) // 2, (width - fb_w) // 2, fb_h, fb_w], jnp.int32)
    return jnp.where(jnp.any(fits), sampled, fallback).astype(jnp.int32)


def sample_crop_box(
    key,
    height: int,
    width: int,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
    attempts: int = 10,
):
    """One crop box (top, left, crop_height, crop_width) as int32 (4,), torchvision's get_params.

    torchvision RandomResizedCrop.get_params: up to 10 times, draw the area fraction
    s ~ U[scale] and the aspect ratio r = exp(U[log ratio]); w = round(sqrt(s * H * W * r)),
    h = round(sqrt(s * H * W / r)) (Python round: half to even, as jnp.round); if
    0 < w <= W and 0 < h <= H, return it with top ~ U{0..H-h}, left ~ U{0..W-w}. If no try fits,
    fall back to a centred crop of the whole image clamped to the ratio range. Here all tries
    are drawn at once and the first that fits is taken (same distribution, no loop).
    """
    uniforms = jax.random.uniform(key, (4, attempts))
    return _crop_box_from_uniforms(uniforms, height, width, scale, ratio)


def _resize_weights(start, length, in_size: int, out_size: int):
    """(out_size, in_size) resampling matrix of PIL's antialiased bilinear resize of a crop.

    PIL (what torchvision's resized_crop runs on PIL images: `img.crop(box).resize(size,
    BILINEAR)`) computes output pixel o from the crop [start, start + length) with the triangle
    filter stretched by max(length / out_size, 1) (that stretch is the antialiasing), centred at
    start + (o + 0.5) * length / out_size, over the input pixel centres x + 0.5, and normalises
    the weights over the pixels INSIDE the crop (the crop is a separate image). Taps outside the
    crop are therefore dropped; jax.image.scale_and_translate would sample them from the full
    image, hence this hand-written matrix. Building it per example keeps all shapes static.
    """
    start = jnp.asarray(start, jnp.float32)
    length = jnp.asarray(length, jnp.float32)
    scale = length / out_size
    filter_scale = jnp.maximum(scale, 1.0)
    centres = start + (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * scale
    pixels = jnp.arange(in_size, dtype=jnp.float32)
    weights = jnp.maximum(
        0.0, 1.0 - jnp.abs(pixels[None, :] + 0.5 - centres[:, None]) / filter_scale
    )
    inside = (pixels >= start) & (pixels < start + length)
    weights = jnp.where(inside[None, :], weights, 0.0)
    # Every centre lies inside the crop, so the nearest inside pixel has weight >= 0.5: no 0/0.
    return weights / jnp.sum(weights, axis=1, keepdims=True)


def crop_resize(image, box, out_size: int, flip=False):
    """Crops `box` = (top, left, height, width) from a (H, W, C) float image and resizes it to
    (out_size, out_size) with PIL's antialiased bilinear filter; `flip` mirrors the result
    left-right (torchvision's hflip, folded into the resampling matrix for free).

    With the full box and out_size == H == W this is the identity.
    """
    box = jnp.asarray(box)
    rows = _resize_weights(box[0], box[2], image.shape[0], out_size)
    cols = _resize_weights(box[1], box[3], image.shape[1], out_size)
    cols = jnp.where(flip, cols[::-1], cols)
    # HIGHEST: the default float32 matmul precision on GPUs may be TF32 (10-bit mantissa).
    out = jnp.einsum("oh,hwc->owc", rows, image, precision=_HIGHEST)
    return jnp.einsum("pw,owc->opc", cols, out, precision=_HIGHEST)


# --------------------------------------------------------------------------------------------
# Colour: torchvision.transforms.functional on float images in [0, 1], (H, W, C)
# --------------------------------------------------------------------------------------------


def rgb_to_grayscale(image, num_output_channels: int = 1):
    """Luma 0.299 R + 0.587 G + 0.114 B (PIL's "L"), repeated to `num_output_channels`.

    torchvision's RandomGrayscale keeps the channel count (3 identical channels). A 1-channel
    image is already grayscale.
    """
    if image.shape[-1] == 1:
        gray = image
    else:
        # A weighted sum, not a tensordot: a dot with 3 terms becomes a matrix kernel of its own
        # on a GPU (in TF32 there by default) and breaks the fusion of the colour ops around it.
        r, g, b = GRAYSCALE_WEIGHTS
        gray = (r * image[..., 0] + g * image[..., 1] + b * image[..., 2])[..., None]
    return jnp.broadcast_to(gray, gray.shape[:-1] + (num_output_channels,))


def _blend(image, other, ratio):
    """torchvision _blend for float images: clamp(ratio * image + (1 - ratio) * other, 0, 1)."""
    return jnp.clip(ratio * image + (1.0 - ratio) * other, 0.0, 1.0)


def adjust_brightness(image, factor):
    """torchvision adjust_brightness: image * factor, clamped to [0, 1] (multiplicative)."""
    return _blend(image, jnp.zeros_like(image), factor)


def adjust_contrast(image, factor):
    """torchvision adjust_contrast: blend with the MEAN of the grayscale image (one scalar per
    image, not per channel), clamped to [0, 1]."""
    mean = jnp.mean(rgb_to_grayscale(image))
    return _blend(image, mean, factor)


def adjust_saturation(image, factor):
    """torchvision adjust_saturation: blend with the grayscale image, clamped to [0, 1].

    A 1-channel image is returned unchanged, as torchvision does.
    """
    if image.shape[-1] == 1:
        return image
    return _blend(image, rgb_to_grayscale(image), factor)


def rgb_to_hsv(image):
    """(H, W, 3) RGB in [0, 1] -> HSV in [0, 1], torchvision's _rgb2hsv (gray pixels: hue 0)."""
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    maxc = jnp.max(image, axis=-1)
    minc = jnp.min(image, axis=-1)
    chroma = maxc - minc
    is_gray = chroma == 0
    # Division guards only: for gray pixels (incl. black) s = 0 and h = 0 either way.
    saturation = chroma / jnp.where(is_gray, 1.0, maxc)
    safe_chroma = jnp.where(is_gray, 1.0, chroma)
    rc = (maxc - r) / safe_chroma
    gc = (maxc - g) / safe_chroma
    bc = (maxc - b) / safe_chroma
    hue = jnp.where(maxc == r, bc - gc, jnp.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = jnp.where(is_gray, 0.0, hue)
    hue = jnp.mod(hue / 6.0 + 1.0, 1.0)
    return jnp.stack([hue, saturation, maxc], axis=-1)


def hsv_to_rgb(image):
    """(H, W, 3) HSV in [0, 1] -> RGB, torchvision's _hsv2rgb (the standard sextant formula)."""
    h, s, v = image[..., 0], image[..., 1], image[..., 2]
    sector = jnp.floor(h * 6.0)
    frac = h * 6.0 - sector
    sector = jnp.mod(sector.astype(jnp.int32), 6)
    p = jnp.clip(v * (1.0 - s), 0.0, 1.0)
    q = jnp.clip(v * (1.0 - s * frac), 0.0, 1.0)
    t = jnp.clip(v * (1.0 - s * (1.0 - frac)), 0.0, 1.0)
    # (R, G, B) per sector 0..5, picked by selects: elementwise code that fuses with the rest of
    # the colour jitter (a gather from a stacked 6-sector table would not).
    in_sector = [sector == k for k in range(5)]
    red = jnp.select(in_sector, [v, q, p, p, t], v)
    green = jnp.select(in_sector, [t, v, v, q, p], p)
    blue = jnp.select(in_sector, [p, p, t, v, v], q)
    return jnp.stack([red, green, blue], axis=-1)


def adjust_hue(image, factor):
    """torchvision adjust_hue: shift the H channel in HSV by `factor` in [-0.5, 0.5], wrapping
    modulo 1. A 1-channel image is returned unchanged, as torchvision does."""
    if image.shape[-1] == 1:
        return image
    hsv = rgb_to_hsv(image)
    hue = jnp.mod(hsv[..., 0] + factor, 1.0)
    return hsv_to_rgb(jnp.concatenate([hue[..., None], hsv[..., 1:]], axis=-1))


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def color_jitter(image, factors, order):
    """torchvision ColorJitter with drawn parameters: applies op order[k] for k = 0..3.

    factors = (brightness, contrast, saturation, hue) as drawn; order is a permutation of
    (0, 1, 2, 3) indexing those four ops (torchvision draws it with torch.randperm(4) per call).
    """
    factors = jnp.asarray(factors, jnp.float32)
    order = jnp.asarray(order, jnp.int32)
    # Branch i applies op i with its own factor. Under vmap lax.switch evaluates all four
    # branches and selects per example: 16 cheap elementwise ops per view, all fused.
    branches = [functools.partial(op, factor=factors[i]) for i, op in enumerate(_JITTER_OPS)]
    for step in range(len(_JITTER_OPS)):
        image = jax.lax.switch(order[step], branches, image)
    return image


# --------------------------------------------------------------------------------------------
# Blur and normalisation
# --------------------------------------------------------------------------------------------


def gaussian_kernel1d(sigma, kernel_size: int):
    """cv2.getGaussianKernel(k, sigma): exp(-x^2 / (2 sigma^2)), x = -k//2..k//2, summing to 1."""
    x = jnp.arange(kernel_size, dtype=jnp.float32) - (kernel_size - 1) / 2.0
    kernel = jnp.exp(-(x**2) / (2.0 * jnp.asarray(sigma, jnp.float32) ** 2))
    return kernel / jnp.sum(kernel)


def gaussian_blur(image, sigma, kernel_size: int = 3):
    """cv2.GaussianBlur(image, (k, k), sigma) on a (H, W, C) image: separable Gaussian, border
    BORDER_REFLECT_101 (`gfedcb|abcdefgh|gfedcba`, which is numpy/jnp.pad's "reflect")."""
    kernel = gaussian_kernel1d(sigma, kernel_size)
    pad = kernel_size // 2
    height, width = image.shape[:2]
    padded = jnp.pad(image, ((pad, pad), (0, 0), (0, 0)), mode="reflect")
    image = sum(kernel[t] * padded[t : t + height] for t in range(kernel_size))
    padded = jnp.pad(image, ((0, 0), (pad, pad), (0, 0)), mode="reflect")
    return sum(kernel[t] * padded[:, t : t + width] for t in range(kernel_size))


def normalize(image, mean, std):
    """torchvision Normalize: (image - mean) / std per channel."""
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    return (image - mean) / std


# --------------------------------------------------------------------------------------------
# One view: sample every random choice, then apply them
# --------------------------------------------------------------------------------------------


class ViewParams(NamedTuple):
    """Every random choice of one SimCLR view (leading batch axis when vmapped)."""

    crop_box: jax.Array  # int32 (4,): top, left, height, width in source pixels
    flip: jax.Array  # bool
    jitter: jax.Array  # bool: ColorJitter applied (RandomApply)
    jitter_factors: jax.Array  # float32 (4,): brightness, contrast, saturation, hue
    jitter_order: jax.Array  # int32 (4,): permutation of the four jitter ops
    grayscale: jax.Array  # bool
    blur: jax.Array  # bool
    blur_sigma: jax.Array  # float32


def sample_view_params(key, height: int, width: int, aug: SimCLRAugment) -> ViewParams:
    """Draws one view's random choices for a (height, width) source image.

    All choices come from ONE vector of uniforms (one threefry call per view instead of a dozen:
    XLA's compile time grows with every random op, about 0.3 s each on CPU).
    """
    attempts = aug.crop_attempts
    u = jax.random.uniform(key, (4 * attempts + 13,))
    u_crop, u = u[: 4 * attempts].reshape(4, attempts), u[4 * attempts :]
    jitter_ranges = (
        _uniform_range(aug.brightness),
        _uniform_range(aug.contrast),
        _uniform_range(aug.saturation),
        (-aug.hue, aug.hue),
    )
    lows = jnp.asarray([lo for lo, _ in jitter_ranges], jnp.float32)
    highs = jnp.asarray([hi for _, hi in jitter_ranges], jnp.float32)
    sigma_lo, sigma_hi = aug.blur_sigma
    return ViewParams(
        crop_box=_crop_box_from_uniforms(u_crop, height, width, aug.crop_scale, aug.crop_ratio),
        # u < p is True with probability p (and never for p = 0, always for p = 1).
        flip=u[0] < aug.flip_prob,
        jitter=u[1] < aug.jitter_prob,
        jitter_factors=lows + (highs - lows) * u[2:6],
        # The ranks of 4 iid uniforms form a uniformly random permutation (torch.randperm(4)).
        jitter_order=jnp.argsort(u[6:10]).astype(jnp.int32),
        grayscale=u[10] < aug.grayscale_prob,
        blur=u[11] < aug.blur_prob,
        blur_sigma=sigma_lo + (sigma_hi - sigma_lo) * u[12],
    )


def apply_view(image, params: ViewParams, aug: SimCLRAugment, *, normalized: bool = True):
    """Applies one view's choices to a float (H, W, C) image in [0, 1], in torchvision's order.

    Returns (out_size, out_size, C) float32, normalised with aug.mean/std unless
    `normalized=False` (then in [0, 1]). Ops with probability 0 are not traced at all.
    """
    view = crop_resize(image, params.crop_box, aug.out_size, flip=params.flip)
    if aug.jitter_prob > 0:
        jittered = color_jitter(view, params.jitter_factors, params.jitter_order)
        view = jnp.where(params.jitter, jittered, view)
    if aug.grayscale_prob > 0:
        view = jnp.where(params.grayscale, rgb_to_grayscale(view, view.shape[-1]), view)
    if aug.blur_prob > 0:
        view = jnp.where(params.blur, gaussian_blur(view, params.blur_sigma, aug.blur_kernel), view)
    if normalized:
        view = normalize(view, aug.mean, aug.std)
    return view


# --------------------------------------------------------------------------------------------
# Batch entry points
# --------------------------------------------------------------------------------------------


def to_unit_float(images_uint8, *, gray_to_rgb: bool = True):
    """Checks a uint8 (B, H, W, C) batch, C in {1, 3}, and returns float32 in [0, 1]
    (torchvision's ToTensor scaling), 1-channel batches repeated to 3 channels if asked."""
    if images_uint8.dtype != jnp.uint8:
        raise ValueError(
            f"Expected a uint8 image batch (raw pixels 0..255), got dtype {images_uint8.dtype}; "
            "pass the images as stored (e.g. np.asarray(images, np.uint8)), the augmentation "
            "scales them to [0, 1] itself."
        )
    if images_uint8.ndim != 4 or images_uint8.shape[-1] not in (1, 3):
        fix = ("drop the alpha channel with images[..., :3]" if images_uint8.ndim == 4
               and images_uint8.shape[-1] in (2, 4) else
               "add a channel axis to grayscale arrays with images[..., None]")
        raise ValueError(
            f"Expected images shaped (B, H, W, C) with C = 1 or 3 (NHWC), got "
            f"{images_uint8.shape}; {fix}."
        )
    images = images_uint8.astype(jnp.float32) / 255.0
    if gray_to_rgb and images.shape[-1] == 1:
        images = jnp.repeat(images, 3, axis=-1)
    return images


def _check_channels(channels: int, mean: Sequence[float], std: Sequence[float]):
    if len(mean) != channels or len(std) != channels:
        raise ValueError(
            f"The views have {channels} channel(s) but mean/std have {len(mean)}/{len(std)} "
            f"entries; pass {channels}-entry mean and std (or gray_to_rgb=True for 1-channel "
            "sources)."
        )


def simclr_augment(key, images_uint8, aug: SimCLRAugment):
    """One random SimCLR view of each image: uint8 (B, H, W, C) -> aug.dtype (B, S, S, C').

    Every example gets its own key (random per example). C' = 3 unless the source is 1-channel
    and aug.gray_to_rgb is False. jit-compatible (aug is hashable, pass it as a static argument
    or close over it), no host synchronisation.
    """
    images = to_unit_float(images_uint8, gray_to_rgb=aug.gray_to_rgb)
    batch, height, width, channels = images.shape
    _check_channels(channels, aug.mean, aug.std)
    keys = jax.random.split(key, batch)
    params = jax.vmap(lambda k: sample_view_params(k, height, width, aug))(keys)
    views = jax.vmap(lambda image, p: apply_view(image, p, aug))(images, params)
    return views.astype(aug.dtype)


def two_views(key, images_uint8, aug: SimCLRAugment):
    """Two independently augmented views (v1, v2) of the same batch (the contrastive pair).

    Both views come from one `simclr_augment` over the batch stacked twice: every row has its
    own key either way, and one traced pipeline compiles in half the time of two.
    """
    batch = images_uint8.shape[0]
    views = simclr_augment(key, jnp.concatenate([images_uint8, images_uint8], axis=0), aug)
    return views[:batch], views[batch:]


def eval_preprocess(
    images_uint8,
    *,
    out_size: int | None = None,
    mean: Sequence[float] = CIFAR_MEAN,
    std: Sequence[float] = CIFAR_STD,
    dtype: Any = jnp.float32,
    gray_to_rgb: bool = True,
):
    """Test-time preprocessing: [0, 1] scaling, optional resize, Normalize.

    `out_size=None` (or equal to the image size) keeps the images as they are, like the
    reference's test transform (ToTensor + Normalize). Otherwise the whole image is resized to
    (out_size, out_size) with PIL's antialiased bilinear filter (torchvision Resize((s, s))).
    """
    if out_size is not None and not (isinstance(out_size, int) and out_size >= 1):
        raise ValueError(f"out_size must be a positive int (or None: keep the size), got "
                         f"{out_size!r}.")
    images = to_unit_float(images_uint8, gray_to_rgb=gray_to_rgb)
    _, height, width, channels = images.shape
    _check_channels(channels, mean, std)
    if out_size is not None and (out_size != height or out_size != width):
        rows = _resize_weights(0, height, height, out_size)
        cols = _resize_weights(0, width, width, out_size)
        images = jnp.einsum("oh,bhwc->bowc", rows, images, precision=_HIGHEST)
        images = jnp.einsum("pw,bowc->bopc", cols, images, precision=_HIGHEST)
    return normalize(images, mean, std).astype(dtype)
