"""ResNet encoders and the projection head against torchvision's numbers and a NumPy forward.

References: torchvision's parameter totals, ANCHORS.md's FLOP figures, XLA's own FLOP count, and
a float64 NumPy transcription of torchvision's ResNet forward (torch padding, v1.5 strides).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cldro_jax.models import heads, resnet


def _param_count(module, input_shape):
    variables = jax.eval_shape(
        lambda x: module.init(jax.random.key(0), x, train=False),
        jax.ShapeDtypeStruct(input_shape, jnp.float32),
    )
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(variables["params"]))


# torchvision totals without the fc layer; the CIFAR stem swaps the 7x7x3x64 conv (9,408
# weights) for a 3x3x3x64 one (1,728).
TORCHVISION_COUNTS = {"resnet18": 11_176_512, "resnet34": 21_284_672, "resnet50": 23_508_032}


@pytest.mark.parametrize("name", sorted(TORCHVISION_COUNTS))
def test_parameter_counts_match_torchvision(name):
    imagenet = _param_count(resnet.get_encoder(name, stem="imagenet"), (1, 224, 224, 3))
    cifar = _param_count(resnet.get_encoder(name, stem="cifar"), (1, 32, 32, 3))
    assert imagenet == TORCHVISION_COUNTS[name]
    assert cifar == TORCHVISION_COUNTS[name] - 9_408 + 1_728


def test_projection_head_parameter_count_matches_reference_head():
    # Linear(2048, 512, bias=False) + BatchNorm1d(512) + Linear(512, 128): 1,115,264 in torch.
    head = heads.ProjectionHead()
    variables = jax.eval_shape(
        lambda x: head.init(jax.random.key(0), x, train=False),
        jax.ShapeDtypeStruct((2, 2048), jnp.float32),
    )
    count = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(variables["params"]))
    assert count == 2048 * 512 + 2 * 512 + 512 * 128 + 128


@pytest.mark.parametrize(
    "name,stem,size,features",
    [
        ("resnet18", "cifar", 32, 512),
        ("resnet18", "imagenet", 64, 512),
        ("resnet50", "cifar", 32, 2048),
        ("resnet50", "imagenet", 64, 2048),
    ],
)
def test_output_shapes_both_stems(name, stem, size, features):
    encoder = resnet.get_encoder(name, stem=stem)
    x = jax.ShapeDtypeStruct((3, size, size, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: encoder.init(jax.random.key(0), x, train=False), x)
    out = jax.eval_shape(lambda v, x: encoder.apply(v, x, train=False), variables, x)
    assert out.shape == (3, features) and out.dtype == jnp.float32
    assert encoder.num_features == features
    last = variables["batch_stats"]["layer4_1"]["bn2" if name == "resnet18" else "bn3"]
    assert last["mean"].shape == (features,)


def test_flops_match_anchors():
    # ANCHORS.md: FLOPs per image per step (2 views, forward + backward = 3 x forward).
    r18 = resnet.contrastive_step_flops_per_image("resnet18", 32, "cifar")
    r50 = resnet.contrastive_step_flops_per_image("resnet50", 32, "cifar")
    assert r18 == pytest.approx(6.7e9, rel=0.02)
    assert r50 == pytest.approx(15.6e9, rel=0.02)
    # The well-known ImageNet figures: ResNet-18 1.82 G and ResNet-50 4.09 G multiply-adds.
    assert resnet.resnet_flops_per_image("resnet18", 224, "imagenet") / 2 == pytest.approx(
        1.82e9, rel=0.01
    )
    assert resnet.resnet_flops_per_image("resnet50", 224, "imagenet") / 2 == pytest.approx(
        4.09e9, rel=0.01
    )


def test_flop_counter_agrees_with_xla_cost_analysis():
    # XLA counts only in-bounds taps of padded convs, so compare on VALID convs (strided,
    # grouped, non-square) and a Dense: there both must count exactly 2 x multiply-adds.
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(8, (3, 3), strides=(2, 2), padding="VALID", use_bias=False)(x)
            x = nn.Conv(12, (1, 1), feature_group_count=2, use_bias=False)(x)
            x = nn.Conv(6, (5, 3), padding="VALID", use_bias=False)(x)
            return nn.Dense(10, use_bias=False)(x.reshape(x.shape[0], -1))

    shape = (2, 17, 15, 4)
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    variables = jax.eval_shape(lambda x: Net().init(jax.random.key(0), x), x)
    xla_flops = jax.jit(Net().apply).lower(variables, x).cost_analysis()["flops"]
    assert resnet.forward_flops(Net(), shape) == xla_flops


def test_unknown_encoder_and_bad_inputs_raise():
    with pytest.raises(ValueError, match="resnet18"):
        resnet.get_encoder("resnet19")
    encoder = resnet.get_encoder("resnet18", width=4, stem="cifaar")
    with pytest.raises(ValueError, match="stem"):
        encoder.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)
    encoder = resnet.get_encoder("resnet18", width=4)
    with pytest.raises(ValueError, match="NHWC"):
        encoder.init(jax.random.key(0), jnp.zeros((1, 3, 8, 8)), train=False)
    with pytest.raises(ValueError, match="float"):
        encoder.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3), jnp.uint8), train=False)


# ---------------------------------------------------------------------------------------------
# NumPy float64 transcription of torchvision's ResNet forward (eval mode)
# ---------------------------------------------------------------------------------------------


def np_conv(x, kernel, stride):
    """torch Conv2d(padding=k // 2, bias=False) on NHWC; kernel (kh, kw, in, out)."""
    kh, kw = kernel.shape[:2]
    x = np.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    out_h = (x.shape[1] - kh) // stride + 1
    out_w = (x.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], out_h, out_w, kernel.shape[-1]))
    for i in range(kh):
        for j in range(kw):
            patch = x[:, i : i + stride * out_h : stride, j : j + stride * out_w : stride]
            out += patch @ kernel[i, j]
    return out


def np_bn(x, params, stats, eps=1e-5):
    return (x - stats["mean"]) / np.sqrt(stats["var"] + eps) * params["scale"] + params["bias"]


def np_maxpool_3x3_s2(x):
    x = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    out_h = (x.shape[1] - 3) // 2 + 1
    out_w = (x.shape[2] - 3) // 2 + 1
    windows = [
        x[:, i : i + 2 * out_h : 2, j : j + 2 * out_w : 2] for i in range(3) for j in range(3)
    ]
    return np.max(windows, axis=0)


def np_block(x, p, s, stride, bottleneck):
    relu = lambda v: np.maximum(v, 0.0)  # noqa: E731
    if bottleneck:
        y = relu(np_bn(np_conv(x, p["conv1"]["kernel"], 1), p["bn1"], s["bn1"]))
        y = relu(np_bn(np_conv(y, p["conv2"]["kernel"], stride), p["bn2"], s["bn2"]))
        y = np_bn(np_conv(y, p["conv3"]["kernel"], 1), p["bn3"], s["bn3"])
    else:
        y = relu(np_bn(np_conv(x, p["conv1"]["kernel"], stride), p["bn1"], s["bn1"]))
        y = np_bn(np_conv(y, p["conv2"]["kernel"], 1), p["bn2"], s["bn2"])
    if "downsample_conv" in p:
        x = np_bn(
            np_conv(x, p["downsample_conv"]["kernel"], stride),
            p["downsample_bn"],
            s["downsample_bn"],
        )
    return relu(y + x)


def np_resnet(x, params, stats, stage_sizes, bottleneck, stem):
    if stem == "imagenet":
        x = np.maximum(
            np_bn(np_conv(x, params["conv1"]["kernel"], 2), params["bn1"], stats["bn1"]), 0
        )
        x = np_maxpool_3x3_s2(x)
    else:
        x = np.maximum(
            np_bn(np_conv(x, params["conv1"]["kernel"], 1), params["bn1"], stats["bn1"]), 0
        )
    for stage, blocks in enumerate(stage_sizes):
        for block in range(blocks):
            name = f"layer{stage + 1}_{block}"
            stride = 2 if stage > 0 and block == 0 else 1
            x = np_block(x, params[name], stats[name], stride, bottleneck)
    return x.mean(axis=(1, 2))


def _random_variables(module, input_shape, seed):
    """Variables of `module` filled with random values by NumPy, without running Flax's init.

    (A threefry-keyed init of a ResNet compiles one random kernel per layer: tens of seconds
    on 2 CPU cores. Initialisation itself is tested separately.) Kernels get torchvision's
    N(0, 2 / fan_out); BN scales/biases/statistics random values so that eval-mode BN is not
    the identity.
    """
    shapes = jax.eval_shape(
        lambda x: module.init(jax.random.key(0), x, train=False),
        jax.ShapeDtypeStruct(input_shape, jnp.float32),
    )
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            fan_out = math.prod(leaf.shape[:-2]) * leaf.shape[-1]
            return rng.normal(0.0, math.sqrt(2.0 / fan_out), leaf.shape).astype(np.float32)
        if name in ("scale", "var"):
            return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
        return rng.normal(0.0, 0.2, leaf.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.mark.parametrize(
    "name,stem,size",
    [("resnet18", "cifar", 16), ("resnet18", "imagenet", 16), ("resnet50", "cifar", 8)],
)
def test_forward_matches_numpy_torchvision_transcription(name, stem, size):
    encoder = resnet.get_encoder(name, stem=stem, width=4)
    x = np.random.default_rng(1).normal(size=(2, size, size, 3)).astype(np.float32)
    variables = _random_variables(encoder, x.shape, seed=2)
    got = jax.jit(lambda v, x: encoder.apply(v, x, train=False))(variables, x)
    to64 = lambda tree: jax.tree.map(lambda a: np.asarray(a, np.float64), tree)  # noqa: E731
    want = np_resnet(
        np.asarray(x, np.float64),
        to64(variables["params"]),
        to64(variables["batch_stats"]),
        encoder.stage_sizes,
        bottleneck=name == "resnet50",
        stem=stem,
    )
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-5)


def test_conv_init_is_torchvision_kaiming_normal_fan_out():
    # A two-stage ResNet keeps the number of random kernels (compile time) small; the rbg key
    # compiles faster than threefry on CPU and draws from the same distributions.
    encoder = resnet.ResNet(stage_sizes=(1, 1), block_cls=resnet.BasicBlock, width=64)
    variables = jax.jit(lambda key: encoder.init(key, jnp.zeros((1, 8, 8, 3)), train=False))(
        jax.random.key(0, impl="rbg")
    )
    kernel = np.asarray(variables["params"]["layer2_0"]["conv2"]["kernel"])  # (3, 3, 128, 128)
    want_std = math.sqrt(2.0 / (3 * 3 * 128))
    assert kernel.std() == pytest.approx(want_std, rel=0.01)
    assert abs(kernel.mean()) < 0.01 * want_std
    # Untruncated normal: about 0.27% of draws lie beyond 3 std (a truncated normal has none).
    assert np.mean(np.abs(kernel) > 3 * want_std) == pytest.approx(0.0027, abs=0.001)
    stem = np.asarray(variables["params"]["conv1"]["kernel"])  # (3, 3, 3, 64): fan_out 576
    assert stem.std() == pytest.approx(math.sqrt(2.0 / 576), rel=0.05)
    # The reference builds its CIFAR stem conv after torchvision's init loop: torch's plain
    # nn.Conv2d default, kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)), fan_in = 3*3*3.
    reference_stem = resnet.ResNet(stage_sizes=(1, 1), block_cls=resnet.BasicBlock, width=64,
                                   stem_init="conv_default")
    stem_default = np.asarray(jax.jit(lambda key: reference_stem.init(
        key, jnp.zeros((1, 8, 8, 3)), train=False))(jax.random.key(0, impl="rbg"))[
            "params"]["conv1"]["kernel"])
    bound = 1.0 / math.sqrt(27)
    assert np.abs(stem_default).max() <= bound and np.abs(stem_default).max() > 0.98 * bound
    assert stem_default.std() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    with pytest.raises(ValueError, match="stem_init must be one of"):
        resnet.ResNet(stage_sizes=(1,), block_cls=resnet.BasicBlock, width=4,
                      stem_init="xavier").init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)),
                                               train=False)
    bn = variables["params"]["layer2_0"]["bn2"]
    np.testing.assert_array_equal(bn["scale"], 1.0)
    np.testing.assert_array_equal(bn["bias"], 0.0)
    assert "bias" not in variables["params"]["layer2_0"]["conv2"]


def test_batchnorm_updates_in_train_mode_only():
    encoder = resnet.get_encoder("resnet18", width=4)
    rng = np.random.default_rng(1)
    x = rng.uniform(size=(4, 8, 8, 3)).astype(np.float32)
    variables = _random_variables(encoder, x.shape, seed=0)
    train_fn = jax.jit(lambda v, x: encoder.apply(v, x, train=True, mutable=["batch_stats"]))
    eval_fn = jax.jit(lambda v, x: encoder.apply(v, x, train=False))

    train_out, updates = train_fn(variables, x)
    # Flax momentum 0.9 == torch momentum 0.1: new = 0.9 * old + 0.1 * batch statistic. Check it
    # on the stem BN, whose input is conv1(x), computed here in NumPy.
    conv1 = np_conv(
        np.asarray(x, np.float64), np.asarray(variables["params"]["conv1"]["kernel"], np.float64), 1
    )
    old = variables["batch_stats"]["bn1"]
    np.testing.assert_allclose(
        updates["batch_stats"]["bn1"]["mean"],
        0.9 * old["mean"] + 0.1 * conv1.mean(axis=(0, 1, 2)),
        rtol=1e-5,
        atol=1e-6,
    )
    np.testing.assert_allclose(  # Flax uses the biased batch variance
        updates["batch_stats"]["bn1"]["var"],
        0.9 * old["var"] + 0.1 * conv1.var(axis=(0, 1, 2)),
        rtol=1e-5,
    )
    assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(
        variables["batch_stats"]
    )

    # Eval mode needs no mutable collection and example 0's output does not depend on the
    # other examples of the batch (running statistics); in train mode it does.
    other = x.copy()
    other[1:] = rng.uniform(size=(3, 8, 8, 3))
    np.testing.assert_allclose(
        eval_fn(variables, x)[0], eval_fn(variables, other)[0], rtol=1e-5, atol=1e-6
    )
    assert not np.allclose(train_out[0], train_fn(variables, other)[0][0], atol=1e-4)


def test_bfloat16_compute_keeps_float32_params_and_features():
    x = np.random.default_rng(1).uniform(size=(4, 16, 16, 3)).astype(np.float32)
    fp32 = resnet.get_encoder("resnet18", width=8)
    bf16 = resnet.get_encoder("resnet18", width=8, dtype=jnp.bfloat16)
    params_shape = jax.eval_shape(
        lambda x: bf16.init(jax.random.key(0), x, train=False),
        jax.ShapeDtypeStruct(x.shape, jnp.float32),
    )
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params_shape))
    variables = _random_variables(fp32, x.shape, seed=0)
    out32 = jax.jit(lambda v, x: fp32.apply(v, x, train=False))(variables, x)
    out16 = jax.jit(lambda v, x: bf16.apply(v, x, train=False))(variables, x)
    assert out16.dtype == jnp.float32
    rel = np.linalg.norm(out16 - out32) / np.linalg.norm(out32)
    assert 0 < rel < 3e-2, rel


def test_forward_is_deterministic():
    encoder = resnet.get_encoder("resnet18", width=4)
    x = np.random.default_rng(1).uniform(size=(2, 8, 8, 3)).astype(np.float32)
    variables = _random_variables(encoder, x.shape, seed=0)
    apply = jax.jit(lambda v, x: encoder.apply(v, x, train=True, mutable=["batch_stats"]))
    (a, stats_a), (b, stats_b) = apply(variables, x), apply(variables, x)
    np.testing.assert_array_equal(a, b)
    jax.tree.map(np.testing.assert_array_equal, stats_a, stats_b)
    assert np.all(np.isfinite(a)) and np.std(a) > 0


# ---------------------------------------------------------------------------------------------
# Projection head and ContrastiveModel
# ---------------------------------------------------------------------------------------------


def test_projection_head_matches_numpy_and_torch_linear_init():
    head = heads.ProjectionHead(hidden=32, out=8)
    feats = jax.random.normal(jax.random.key(1), (16, 64))
    variables = head.init(jax.random.key(0), feats, train=False)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    # torch nn.Linear init: kernel and bias U(+-1/sqrt(fan_in)).
    assert np.abs(p["fc1"]["kernel"]).max() <= 1 / math.sqrt(64)
    assert np.abs(p["fc1"]["kernel"]).max() > 0.9 / math.sqrt(64)
    assert np.abs(p["fc2"]["bias"]).max() <= 1 / math.sqrt(32)
    assert "bias" not in p["fc1"]

    out, _ = head.apply(variables, feats, train=True, mutable=["batch_stats"])
    h = np.asarray(feats, np.float64) @ p["fc1"]["kernel"]
    h = (h - h.mean(0)) / np.sqrt(h.var(0) + 1e-5) * p["bn1"]["scale"] + p["bn1"]["bias"]
    want = np.maximum(h, 0) @ p["fc2"]["kernel"] + p["fc2"]["bias"]
    assert out.dtype == jnp.float32 and out.shape == (16, 8)
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)


def test_contrastive_model_returns_encoder_features_and_head_projections():
    encoder = resnet.get_encoder("resnet18", width=4)
    model = heads.ContrastiveModel(encoder=encoder, head=heads.ProjectionHead(hidden=16, out=8))
    x = np.random.default_rng(1).uniform(size=(3, 8, 8, 3)).astype(np.float32)
    variables = _random_variables(model, x.shape, seed=0)
    assert set(variables["params"]) == {"encoder", "head"}
    features, projections = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    assert features.shape == (3, 32) and projections.shape == (3, 8)
    assert features.dtype == projections.dtype == jnp.float32
    # Features are the encoder's output (`encode` runs the encoder alone); projections the head
    # (eval-mode BN) applied to them, here transcribed in NumPy.
    hp = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"]["head"])
    hs = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["batch_stats"]["head"])
    h = np_bn(np.asarray(features, np.float64) @ hp["fc1"]["kernel"], hp["bn1"], hs["bn1"])
    want = np.maximum(h, 0) @ hp["fc2"]["kernel"] + hp["fc2"]["bias"]
    np.testing.assert_allclose(projections, want, rtol=1e-4, atol=1e-5)
    encoded = jax.jit(lambda v, x: model.apply(v, x, method="encode"))(variables, x)
    np.testing.assert_allclose(encoded, features, rtol=1e-6)
