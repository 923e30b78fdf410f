"""SimCLR augmentation on the accelerator against torchvision / PIL / cv2 definitions.

References: PIL itself for the crop + antialiased bilinear resize (what torchvision runs on the
reference's PIL images), `colorsys` for the HSV round trip, `scipy.ndimage` (mode "mirror" ==
cv2's BORDER_REFLECT_101) for the blur, float64 NumPy transcriptions of torchvision's
functional colour ops and of RandomResizedCrop.get_params, and binomial / chi-square / KS
statistics for the random choices.
"""

import colorsys
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
import scipy.stats
from PIL import Image

from cldro_jax.data import augment as A

GRAY = np.array([0.299, 0.587, 0.114])
MEAN = np.array(A.CIFAR_MEAN)
STD = np.array(A.CIFAR_STD)


# ---------------------------------------------------------------------------------------------
# NumPy float64 references
# ---------------------------------------------------------------------------------------------


def pil_crop_resize(image, box, out_size):
    """torchvision resized_crop on a PIL image: img.crop(box).resize(size, BILINEAR), float mode."""
    top, left, height, width = (int(v) for v in box)
    channels = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(image[..., c], np.float32))
            .crop((left, top, left + width, top + height))
            .resize((out_size, out_size), Image.BILINEAR),
            np.float64,
        )
        for c in range(image.shape[-1])
    ]
    return np.stack(channels, axis=-1)


def np_gray(image):
    return image @ GRAY


def np_brightness(image, f):
    return np.clip(f * image, 0, 1)


def np_contrast(image, f):
    return np.clip(f * image + (1 - f) * np_gray(image).mean(), 0, 1)


def np_saturation(image, f):
    return np.clip(f * image + (1 - f) * np_gray(image)[..., None], 0, 1)


def np_hue(image, f):
    out = np.empty_like(image)
    for idx in np.ndindex(image.shape[:-1]):
        h, s, v = colorsys.rgb_to_hsv(*image[idx])
        out[idx] = colorsys.hsv_to_rgb((h + f) % 1.0, s, v)
    return out


NP_JITTER = (np_brightness, np_contrast, np_saturation, np_hue)


def np_blur(image, sigma, kernel_size):
    x = np.arange(kernel_size) - kernel_size // 2
    kernel = np.exp(-(x**2) / (2 * sigma**2))
    kernel /= kernel.sum()
    out = scipy.ndimage.correlate1d(image, kernel, axis=0, mode="mirror")
    return scipy.ndimage.correlate1d(out, kernel, axis=1, mode="mirror")


def np_view(image, params, aug):
    """The reference pipeline's order with given random choices, float64, normalised."""
    view = pil_crop_resize(image, params.crop_box, aug.out_size)
    if params.flip:
        view = view[:, ::-1]
    if params.jitter:
        for op in np.asarray(params.jitter_order):
            view = NP_JITTER[op](view, float(params.jitter_factors[op]))
    if params.grayscale:
        view = np.repeat(np_gray(view)[..., None], 3, axis=-1)
    if params.blur:
        view = np_blur(view, float(params.blur_sigma), aug.blur_kernel)
    return (view - np.asarray(aug.mean)) / np.asarray(aug.std)


def torchvision_crop_box(rng, height, width, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision RandomResizedCrop.get_params, transcribed with NumPy's generator."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.integers(0, height - h + 1), rng.integers(0, width - w + 1), h, w
    raise AssertionError("not reached for the default scale/ratio on 32x32")


def random_image(seed, shape=(32, 32, 3)):
    """Random colours with saturated and gray pixels (the colour ops' special cases)."""
    rng = np.random.default_rng(seed)
    image = rng.uniform(size=shape)
    image[0, :4] = [0.0, 0.0, 0.0]
    image[1, :4] = [1.0, 1.0, 1.0]
    image[2, :4] = [0.4, 0.4, 0.4]
    image[3, :4] = [1.0, 0.0, 0.5]
    return image


# ---------------------------------------------------------------------------------------------
# Deterministic building blocks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape,box,out_size",
    [
        ((32, 32, 3), (3, 5, 20, 17), 32),  # upsampling, non-square crop
        ((32, 32, 3), (0, 0, 32, 32), 16),  # antialiased downsampling
        ((24, 40, 3), (2, 1, 22, 9), 32),  # non-square source, thin crop
        ((96, 96, 3), (10, 4, 80, 71), 32),  # STL-10 sized source
        ((32, 32, 3), (5, 7, 1, 1), 8),  # one pixel
    ],
)
def test_crop_resize_matches_pil(shape, box, out_size):
    image = random_image(0, shape)
    crop = jax.jit(A.crop_resize, static_argnums=2)
    got = crop(jnp.asarray(image, jnp.float32), jnp.asarray(box), out_size)
    want = pil_crop_resize(image, box, out_size)
    np.testing.assert_allclose(got, want, atol=2e-6)
    flipped = crop(jnp.asarray(image, jnp.float32), jnp.asarray(box), out_size, True)
    np.testing.assert_allclose(flipped, want[:, ::-1], atol=2e-6)


def test_crop_resize_of_full_box_is_identity():
    image = random_image(1)
    got = A.crop_resize(jnp.asarray(image, jnp.float32), jnp.array([0, 0, 32, 32]), 32)
    np.testing.assert_allclose(got, image, atol=1e-7)


@pytest.mark.parametrize("factor", [0.6, 0.87, 1.4])
def test_brightness_contrast_saturation_match_torchvision(factor):
    image = random_image(2, (8, 8, 3))
    x = jnp.asarray(image, jnp.float32)
    np.testing.assert_allclose(
        A.adjust_brightness(x, factor), np_brightness(image, factor), atol=1e-6
    )
    np.testing.assert_allclose(A.adjust_contrast(x, factor), np_contrast(image, factor), atol=1e-6)
    np.testing.assert_allclose(
        A.adjust_saturation(x, factor), np_saturation(image, factor), atol=1e-6
    )


@pytest.mark.parametrize("factor", [-0.5, -0.1, -0.03, 0.07, 0.1, 0.5])
def test_hue_matches_colorsys(factor):
    image = random_image(3, (8, 8, 3))
    got = A.adjust_hue(jnp.asarray(image, jnp.float32), factor)
    np.testing.assert_allclose(got, np_hue(image, factor), atol=2e-6)


def test_grayscale_and_identity_factors():
    image = random_image(4, (8, 8, 3))
    x = jnp.asarray(image, jnp.float32)
    gray3 = np.asarray(A.rgb_to_grayscale(x, 3))
    np.testing.assert_allclose(gray3, np.repeat(np_gray(image)[..., None], 3, -1), atol=1e-6)
    assert A.rgb_to_grayscale(x).shape == (8, 8, 1)
    # Factor 1 (hue 0) adjustments and a vanishing blur are identities.
    for op in (A.adjust_brightness, A.adjust_contrast, A.adjust_saturation):
        np.testing.assert_allclose(op(x, 1.0), image, atol=1e-6)
    np.testing.assert_allclose(A.adjust_hue(x, 0.0), image, atol=1e-6)
    np.testing.assert_allclose(A.gaussian_blur(x, 0.01, 3), image, atol=1e-7)
    # Contrast 0 is the grayscale mean everywhere, saturation 0 the grayscale image.
    np.testing.assert_allclose(
        A.adjust_contrast(x, 0.0), np.full_like(image, np_gray(image).mean()), atol=1e-6
    )
    np.testing.assert_allclose(A.adjust_saturation(x, 0.0), gray3, atol=1e-6)


def test_hsv_to_rgb_matches_colorsys_in_every_sector_and_on_its_boundaries():
    hues = np.concatenate([(np.arange(6) + 0.5) / 6, np.arange(6) / 6, [1 - 1e-7]])
    hsv = np.stack(np.meshgrid(hues, [0.0, 0.3, 1.0], [0.0, 0.6, 1.0], indexing="ij"), -1)
    hsv = hsv.reshape(-1, 1, 3)
    want = np.array([colorsys.hsv_to_rgb(*px) for px in hsv[:, 0]])[:, None]
    got = A.hsv_to_rgb(jnp.asarray(hsv, jnp.float32))
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_colour_ops_compile_to_elementwise_code_without_dots_or_gathers():
    """Grayscale, the four jitter ops and the HSV round trip are elementwise and fuse with each
    other on an accelerator, in exact float32 whatever the backend's matmul precision (a 3-term
    tensordot became a TF32 matrix kernel on GPUs, and the 6-sector table of hsv_to_rgb a
    gather)."""
    def colour(images, factors, orders):
        jittered = jax.vmap(A.color_jitter)(images, factors, orders)
        return jax.vmap(lambda x: A.rgb_to_grayscale(x, 3))(jittered)
    args = (jnp.zeros((4, 8, 8, 3)), jnp.ones((4, 4)), jnp.zeros((4, 4), jnp.int32))
    hlo = jax.jit(colour).lower(*args).as_text()
    assert "dot_general" not in hlo and "gather" not in hlo


@pytest.mark.parametrize("sigma,kernel_size", [(0.1, 3), (0.8, 3), (2.0, 3), (1.3, 5)])
def test_blur_matches_reflect101_gaussian(sigma, kernel_size):
    image = random_image(5, (9, 7, 3))
    got = A.gaussian_blur(jnp.asarray(image, jnp.float32), sigma, kernel_size)
    np.testing.assert_allclose(got, np_blur(image, sigma, kernel_size), atol=1e-6)
    # cv2.getGaussianKernel(3, 2.0) = [0.31916777, 0.36166446, 0.31916777].
    if (sigma, kernel_size) == (2.0, 3):
        np.testing.assert_allclose(
            A.gaussian_kernel1d(2.0, 3), [0.31916777, 0.36166446, 0.31916777], atol=1e-7
        )


def test_color_jitter_applies_ops_in_the_given_order():
    image = random_image(6, (6, 6, 3))
    factors = (1.3, 0.7, 1.35, 0.08)
    jitter = jax.jit(A.color_jitter)
    outputs = []
    for order in [(0, 1, 2, 3), (3, 2, 1, 0), (1, 3, 0, 2), (2, 0, 3, 1)]:
        want = image
        for op in order:
            want = NP_JITTER[op](want, factors[op])
        got = jitter(jnp.asarray(image, jnp.float32), jnp.asarray(factors), jnp.asarray(order))
        np.testing.assert_allclose(got, want, atol=3e-6)
        outputs.append(want)
    # The order matters (clamping makes the ops non-commuting), so a fixed order would be wrong.
    assert np.abs(outputs[0] - outputs[1]).max() > 1e-2


# ---------------------------------------------------------------------------------------------
# Random choices
# ---------------------------------------------------------------------------------------------

N_SAMPLES = 4000


@pytest.fixture(scope="module")
def sampled_params():
    aug = A.SimCLRAugment(out_size=32)
    keys = jax.random.split(jax.random.key(0), N_SAMPLES)
    params = jax.jit(jax.vmap(lambda k: A.sample_view_params(k, 32, 32, aug)))(keys)
    return aug, jax.tree.map(np.asarray, params)


def _binomial_ok(count, n, p, sds=4.5):
    return abs(count / n - p) <= sds * math.sqrt(p * (1 - p) / n)


def test_view_param_rates_and_ranges(sampled_params):
    aug, p = sampled_params
    for flag, prob in [("flip", 0.5), ("jitter", 0.8), ("grayscale", 0.2), ("blur", 0.5)]:
        assert _binomial_ok(getattr(p, flag).sum(), N_SAMPLES, prob), (
            flag,
            getattr(p, flag).mean(),
        )
    lows, highs = np.array([0.6, 0.6, 0.6, -0.1]), np.array([1.4, 1.4, 1.4, 0.1])
    assert np.all(p.jitter_factors >= lows) and np.all(p.jitter_factors <= highs)
    # Uniform on [lo, hi]: mean (lo + hi) / 2, std (hi - lo) / sqrt(12).
    np.testing.assert_allclose(p.jitter_factors.mean(0), (lows + highs) / 2, atol=0.02)
    np.testing.assert_allclose(p.jitter_factors.std(0), (highs - lows) / math.sqrt(12), rtol=0.05)
    assert p.blur_sigma.min() >= 0.1 and p.blur_sigma.max() <= 2.0
    assert abs(p.blur_sigma.mean() - 1.05) < 0.03
    # Per-example independence: flip and grayscale are uncorrelated.
    assert abs(np.corrcoef(p.flip, p.grayscale)[0, 1]) < 4.5 / math.sqrt(N_SAMPLES)


def test_jitter_order_is_a_uniform_random_permutation(sampled_params):
    _, p = sampled_params
    assert np.all(np.sort(p.jitter_order, axis=1) == np.arange(4))
    perms = {perm: i for i, perm in enumerate(itertools.permutations(range(4)))}
    counts = np.bincount([perms[tuple(o)] for o in p.jitter_order], minlength=24)
    assert scipy.stats.chisquare(counts).pvalue > 1e-4


def test_crop_boxes_fit_and_follow_torchvision_distribution(sampled_params):
    _, p = sampled_params
    top, left, h, w = p.crop_box.T
    assert np.all((top >= 0) & (left >= 0) & (h >= 1) & (w >= 1))
    assert np.all((top + h <= 32) & (left + w <= 32))
    # Rounding moves w and h by at most 0.5 from a box with scale and ratio in range.
    assert np.all((w + 0.5) * (h + 0.5) >= 0.08 * 1024) and np.all((w - 0.5) * (h - 0.5) <= 1024)
    assert np.all((w + 0.5) / (h - 0.5) >= 3 / 4) and np.all((w - 0.5) / (h + 0.5) <= 4 / 3)
    rng = np.random.default_rng(0)
    ref = np.array([torchvision_crop_box(rng, 32, 32) for _ in range(N_SAMPLES)])
    for column, name in enumerate(["top", "left", "height", "width"]):
        result = scipy.stats.ks_2samp(p.crop_box[:, column], ref[:, column])
        assert result.pvalue > 1e-3, (name, result)
    # The retry matters: without it, crops wider or taller than the image would be clipped.
    assert abs(h.mean() - ref[:, 2].mean()) < 0.6 and abs(w.mean() - ref[:, 3].mean()) < 0.6


def test_normalisation_is_the_references():
    # the reference's transforms.Normalize (image/utils.py), written out
    assert A.CIFAR_MEAN == (0.4914, 0.4822, 0.4465) and A.CIFAR_STD == (0.2023, 0.1994, 0.2010)
    aug = A.SimCLRAugment(out_size=32)
    assert (aug.mean, aug.std) == (A.CIFAR_MEAN, A.CIFAR_STD)


def test_crop_offsets_are_uniform_on_every_position_including_the_far_edge():
    # torch.randint(0, H - h + 1): a 16x16 crop of 32x32 may start at 0..16, so the last row and
    # column are cropped too (a KS test on sampled boxes cannot see that one position).
    for u, want in ((0.0, 0), (0.5, 8), (1.0 - 1e-7, 16)):
        uniforms = jnp.array([[0.0], [0.0], [u], [u]])
        box = A._crop_box_from_uniforms(uniforms, 32, 32, scale=(0.25, 0.25), ratio=(1.0, 1.0))
        assert tuple(np.asarray(box)) == (want, want, 16, 16)


@pytest.mark.parametrize(
    "height,width,want",
    [
        (32, 32, (0, 0, 32, 32)),  # ratio 1 is inside [3/4, 4/3]: the whole image
        (20, 40, (0, 6, 20, 27)),  # too wide: h = 20, w = round(20 * 4/3) = 27, left (40 - 27) // 2
        (40, 20, (6, 0, 27, 20)),  # too tall: w = 20, h = round(20 / (3/4)) = 27
    ],
)
def test_crop_box_falls_back_to_torchvision_centre_crop(height, width, want):
    # An area fraction of 2-3 never fits, so all 10 tries fail.
    box = A.sample_crop_box(jax.random.key(3), height, width, scale=(2.0, 3.0))
    assert tuple(np.asarray(box)) == want


# ---------------------------------------------------------------------------------------------
# Whole views and batches
# ---------------------------------------------------------------------------------------------


def test_apply_view_matches_numpy_pipeline(sampled_params):
    aug, p = sampled_params
    image = random_image(7)
    apply = jax.jit(A.apply_view, static_argnums=2, static_argnames="normalized")
    # Pick examples covering every op, on and off.
    chosen = [
        int(np.flatnonzero(p.jitter & p.blur & ~p.grayscale & p.flip)[0]),
        int(np.flatnonzero(p.jitter & p.grayscale & ~p.blur)[0]),
        int(np.flatnonzero(~p.jitter & p.blur & ~p.flip)[0]),
        int(np.flatnonzero(p.jitter & ~p.blur & ~p.grayscale)[1]),
        int(np.flatnonzero(p.jitter & p.grayscale & p.blur)[0]),
    ]
    for i in chosen:
        params = jax.tree.map(lambda a, i=i: a[i], p)
        got = apply(jnp.asarray(image, jnp.float32), params, aug)
        np.testing.assert_allclose(got, np_view(image, params, aug), atol=3e-5, err_msg=str(i))
        unnormalised = apply(jnp.asarray(image, jnp.float32), params, aug, normalized=False)
        assert float(unnormalised.min()) >= 0.0 and float(unnormalised.max()) <= 1.0


@pytest.fixture(scope="module")
def default_batch():
    rng = np.random.default_rng(8)
    images = (rng.uniform(size=(64, 32, 32, 3)) * 255).round().astype(np.uint8)
    return jnp.asarray(images)


def test_simclr_augment_is_random_per_example_and_composed_correctly(default_batch):
    aug = A.SimCLRAugment(out_size=32)
    augment = jax.jit(A.simclr_augment, static_argnums=2)
    same_image = jnp.repeat(default_batch[:1], 64, axis=0)
    views = np.asarray(augment(jax.random.key(1), same_image, aug))
    assert views.shape == (64, 32, 32, 3) and views.dtype == np.float32
    # Every example of a batch of identical images gets its own view.
    flat = views.reshape(64, -1)
    distances = np.abs(flat[:, None] - flat[None]).max(-1)
    assert np.all(distances[~np.eye(64, dtype=bool)] > 1e-3)
    # Values before normalisation lie in [0, 1].
    unnormalised = views * STD + MEAN
    assert unnormalised.min() >= -1e-5 and unnormalised.max() <= 1 + 1e-5
    # The batch op is sample-per-example-key then apply, and matches the NumPy pipeline.
    keys = jax.random.split(jax.random.key(1), 64)
    params = jax.jit(jax.vmap(lambda k: A.sample_view_params(k, 32, 32, aug)))(keys)
    params = jax.tree.map(np.asarray, params)
    source = np.asarray(same_image[0], np.float64) / 255
    for i in (0, 1, 2):
        want = np_view(source, jax.tree.map(lambda a, i=i: a[i], params), aug)
        np.testing.assert_allclose(views[i], want, atol=3e-5)


def test_two_views_are_independent_and_jit_has_no_host_transfers(default_batch):
    aug = A.SimCLRAugment(out_size=32, dtype=jnp.bfloat16)
    fn = jax.jit(A.two_views, static_argnums=2)
    key = jax.device_put(jax.random.key(2))
    images = jax.device_put(default_batch)
    fn(key, images, aug)  # compile outside the guard (constants are transferred at compile)
    with jax.transfer_guard("disallow"):
        v1, v2 = fn(key, images, aug)
        jax.block_until_ready((v1, v2))
    assert v1.shape == v2.shape == (64, 32, 32, 3) and v1.dtype == jnp.bfloat16
    v1, v2 = np.asarray(v1, np.float32), np.asarray(v2, np.float32)
    assert np.all(np.abs(v1 - v2).reshape(64, -1).max(-1) > 1e-2)
    # bf16 views of an image in [0, 1]: within bf16 rounding of the normalised range.
    for v in (v1, v2):
        assert (v * STD + MEAN).min() >= -0.02 and (v * STD + MEAN).max() <= 1.02


def test_end_to_end_flip_and_grayscale_rates_on_structured_images():
    # Full-image crops, no jitter or blur: every view must be the image, its mirror, or the
    # grayscale of either; which one shows the flip and grayscale decisions.
    aug = A.SimCLRAugment(
        out_size=16, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), jitter_prob=0.0, blur_prob=0.0
    )
    yy, xx = np.mgrid[0:16, 0:16] / 15.0
    image = np.stack([xx, 1 - yy, 0.3 + 0.5 * xx * yy], -1)  # asymmetric left-right, colourful
    n = 1500
    images = jnp.asarray(np.repeat((image * 255).round().astype(np.uint8)[None], n, 0))
    views = np.asarray(jax.jit(A.simclr_augment, static_argnums=2)(jax.random.key(4), images, aug))
    source = (image * 255).round() / 255
    gray = np.repeat(np_gray(source)[..., None], 3, -1)
    candidates = np.stack([source, source[:, ::-1], gray, gray[:, ::-1]])
    candidates = (candidates - MEAN) / STD
    errors = np.abs(views[:, None] - candidates[None]).reshape(n, 4, -1).max(-1)
    assert errors.min(1).max() < 1e-5
    kind = errors.argmin(1)
    assert _binomial_ok(np.isin(kind, [1, 3]).sum(), n, 0.5)
    assert _binomial_ok(np.isin(kind, [2, 3]).sum(), n, 0.2)


def test_identity_config_and_eval_preprocess_give_the_normalised_input(default_batch):
    identity = A.SimCLRAugment(
        out_size=32,
        crop_scale=(1.0, 1.0),
        crop_ratio=(1.0, 1.0),
        flip_prob=0.0,
        jitter_prob=0.0,
        grayscale_prob=0.0,
        blur_prob=0.0,
    )
    want = (np.asarray(default_batch, np.float64) / 255 - MEAN) / STD
    got = jax.jit(A.simclr_augment, static_argnums=2)(jax.random.key(5), default_batch, identity)
    np.testing.assert_allclose(got, want, atol=2e-6)
    np.testing.assert_allclose(A.eval_preprocess(default_batch[:4]), want[:4], atol=2e-6)
    # Resizing (torchvision Resize((s, s)) on PIL images) matches PIL's antialiased bilinear.
    resized = A.eval_preprocess(default_batch[:2], out_size=20)
    for i in range(2):
        source = np.asarray(default_batch[i], np.float64) / 255
        np.testing.assert_allclose(
            resized[i], (pil_crop_resize(source, (0, 0, 32, 32), 20) - MEAN) / STD, atol=2e-5
        )


def test_grayscale_sources():
    rng = np.random.default_rng(9)
    images = jnp.asarray((rng.uniform(size=(8, 28, 28, 1)) * 255).astype(np.uint8))
    aug = A.SimCLRAugment(out_size=24, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    views = np.asarray(jax.jit(A.simclr_augment, static_argnums=2)(jax.random.key(6), images, aug))
    assert views.shape == (8, 24, 24, 3)
    # A gray image stays gray through every op (hue and saturation are identities on it).
    np.testing.assert_allclose(views[..., 0], views[..., 1], atol=2e-5)
    np.testing.assert_allclose(views[..., 0], views[..., 2], atol=2e-5)
    single = A.SimCLRAugment(out_size=24, gray_to_rgb=False, mean=(0.5,), std=(0.25,))
    one_channel = np.asarray(
        jax.jit(A.simclr_augment, static_argnums=2)(jax.random.key(6), images, single)
    )
    assert one_channel.shape == (8, 24, 24, 1)
    np.testing.assert_allclose(one_channel[..., 0], views[..., 0], atol=2e-5)
    with pytest.raises(ValueError, match="channel"):
        A.simclr_augment(jax.random.key(6), images, A.SimCLRAugment(out_size=24, gray_to_rgb=False))


def test_bad_inputs_and_configs_raise():
    aug = A.SimCLRAugment(out_size=8)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="uint8"):
        A.simclr_augment(key, jnp.zeros((2, 8, 8, 3), jnp.float32), aug)
    with pytest.raises(ValueError, match="NHWC"):
        A.simclr_augment(key, jnp.zeros((2, 3, 8, 8), jnp.uint8), aug)
    with pytest.raises(ValueError, match="NHWC"):
        A.eval_preprocess(jnp.zeros((8, 8, 3), jnp.uint8))
    for bad in [
        dict(crop_scale=(0.5, 0.1)),
        dict(crop_ratio=(0.0, 1.0)),
        dict(flip_prob=1.5),
        dict(hue=0.7),
        dict(brightness=-0.1),
        dict(blur_kernel=4),
        dict(blur_sigma=(0.0, 1.0)),
        dict(mean=(0.5, 0.5)),
        dict(std=(0.0, 1.0, 1.0)),
        dict(out_size=0),
    ]:
        with pytest.raises(ValueError):
            A.SimCLRAugment(**{"out_size": 8, **bad})
    # Lists are accepted and stored as tuples (the config must stay hashable for jit).
    assert hash(A.SimCLRAugment(out_size=8, mean=[0.1, 0.2, 0.3])) is not None
