"""Linear probes: PyTorch-Adam transcription, scikit-learn baselines on real digits features."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, log_loss, top_k_accuracy_score
from sklearn.model_selection import train_test_split

from cldro_jax.evaluators import linear_probe as lp

# A recipe that converges on the 1,257 digits train images in a few hundred steps.
DIGITS_RECIPE = dict(num_classes=10, epochs=50, batch_size=64, learning_rate=1e-2,
                     weight_decay=1e-6, seed=0)


@functools.lru_cache(maxsize=1)
def digits_split():
    """scikit-learn's 8x8 digits (real data): uint8 images and pixel features, 70/30 split."""
    digits = load_digits()
    images = digits.images.astype(np.uint8)[..., None]  # (1797, 8, 8, 1), values 0..16
    train_idx, test_idx = train_test_split(np.arange(len(images)), test_size=0.3,
                                           stratify=digits.target, random_state=0)
    features = pixels_to_features(images)
    return (images[train_idx], features[train_idx], digits.target[train_idx].astype(np.int32),
            images[test_idx], features[test_idx], digits.target[test_idx].astype(np.int32))


@functools.lru_cache(maxsize=1)
def digits_probe():
    """The fast probe trained on the digits split with DIGITS_RECIPE (shared by tests)."""
    _, x_train, y_train, _, _, _ = digits_split()
    return lp.fit_linear_probe(x_train, y_train, **DIGITS_RECIPE)


def pixels_to_features(images):
    return (np.asarray(images, np.float32) / 16.0).reshape(len(images), -1)


def identity_augment(key, images):
    del key
    return jnp.asarray(images, jnp.float32) / 16.0


def flatten(images):
    return images.reshape(images.shape[0], -1)


def torch_adam_coupled_l2(param, grad, state, step, *, lr, wd, b1=0.9, b2=0.999, eps=1e-8):
    """NumPy transcription of torch.optim.Adam(weight_decay=wd).step() for one tensor."""
    m, v = state
    grad = grad + wd * param
    m = b1 * m + (1 - b1) * grad
    v = b2 * v + (1 - b2) * grad * grad
    denom = np.sqrt(v) / np.sqrt(1 - b2**step) + eps
    return param - (lr / (1 - b1**step)) * m / denom, (m, v)


def cross_entropy_grads(kernel, bias, x, y):
    """Mean softmax cross-entropy of x @ kernel + bias and its gradients, float64."""
    logits = x @ kernel + bias
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    loss = -np.log(probs[np.arange(len(y)), y]).mean()
    delta = probs.copy()
    delta[np.arange(len(y)), y] -= 1.0
    delta /= len(y)
    return loss, x.T @ delta, delta.sum(axis=0)


def test_optimizer_matches_torch_adam_with_coupled_weight_decay():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(12, 5)), rng.integers(0, 3, 12)
    kernel, bias = rng.normal(size=(5, 3)), rng.normal(size=3)
    lr, wd = 1e-2, 0.5  # a large decay, so coupled and decoupled decay are far apart
    with jax.enable_x64(True):
        head = lp.ProbeHead(3)
        params = {"params": {"fc": {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)}}}
        optimizer, adamw = lp.probe_optimizer(lr, wd), optax.adamw(lr, weight_decay=wd)

        def make_step(opt):
            def loss_fn(p):
                return optax.softmax_cross_entropy_with_integer_labels(
                    head.apply(p, jnp.asarray(x)), jnp.asarray(y)).mean()

            @jax.jit
            def step_fn(p, opt_state):
                updates, opt_state = opt.update(jax.grad(loss_fn)(p), opt_state, p)
                return optax.apply_updates(p, updates), opt_state
            return step_fn

        step_fn, adamw_step = make_step(optimizer), make_step(adamw)
        state, adamw_params, adamw_state = optimizer.init(params), params, adamw.init(params)
        ref_k, ref_b = kernel.copy(), bias.copy()
        ref_state_k, ref_state_b = (0.0, 0.0), (0.0, 0.0)
        for step in (1, 2):
            params, state = step_fn(params, state)
            adamw_params, adamw_state = adamw_step(adamw_params, adamw_state)

            _, grad_k, grad_b = cross_entropy_grads(ref_k, ref_b, x, y)
            ref_k, ref_state_k = torch_adam_coupled_l2(ref_k, grad_k, ref_state_k, step, lr=lr, wd=wd)
            ref_b, ref_state_b = torch_adam_coupled_l2(ref_b, grad_b, ref_state_b, step, lr=lr, wd=wd)
            fc = params["params"]["fc"]
            assert fc["kernel"].dtype == jnp.float64
            np.testing.assert_allclose(np.asarray(fc["kernel"]), ref_k, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(np.asarray(fc["bias"]), ref_b, rtol=1e-12, atol=1e-12)
        # Decoupled decay (AdamW) is a different optimiser: the comparison above can fail.
        assert np.abs(np.asarray(adamw_params["params"]["fc"]["kernel"]) - ref_k).max() > 1e-4


def test_epoch_batches_cover_each_example_once():
    indices, mask = jax.device_get(lp.epoch_batches(jax.random.key(3), 50, 16))
    assert indices.shape == mask.shape == (4, 16)
    assert mask.sum() == 50 and mask[:3].all() and mask[3].sum() == 2
    np.testing.assert_array_equal(np.sort(indices[mask]), np.arange(50))


def test_fit_matches_numpy_transcription_of_the_reference_loop():
    """The jitted scan equals a float64 loop of torch semantics: shuffle, partial last batch,
    mean cross-entropy over the real rows, Adam with coupled L2, per-epoch mean loss."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 6)).astype(np.float32)
    y = rng.integers(0, 4, 50).astype(np.int32)
    lr, wd, epochs, batch = 0.05, 0.01, 3, 16
    probe = lp.fit_linear_probe(x, y, num_classes=4, epochs=epochs, batch_size=batch,
                                learning_rate=lr, weight_decay=wd, seed=7)

    rngs = lp.probe_rngs(7)
    init = lp.init_probe_params(rngs.init, 6, 4)["params"]["fc"]
    kernel, bias = np.asarray(init["kernel"], np.float64), np.asarray(init["bias"], np.float64)
    state_k, state_b, step, epoch_losses = (0.0, 0.0), (0.0, 0.0), 0, []
    for epoch in range(epochs):
        indices, mask = jax.device_get(
            lp.epoch_batches(jax.random.fold_in(rngs.shuffle, epoch), 50, batch))
        loss_sum = 0.0
        for idx, valid in zip(indices, mask, strict=True):
            rows = idx[valid]  # the reference's last batch simply has fewer rows
            loss, grad_k, grad_b = cross_entropy_grads(kernel, bias, x[rows].astype(np.float64),
                                                       y[rows])
            step += 1
            kernel, state_k = torch_adam_coupled_l2(kernel, grad_k, state_k, step, lr=lr, wd=wd)
            bias, state_b = torch_adam_coupled_l2(bias, grad_b, state_b, step, lr=lr, wd=wd)
            loss_sum += loss * len(rows)
        epoch_losses.append(loss_sum / 50)

    fc = probe.params["params"]["fc"]
    np.testing.assert_allclose(np.asarray(fc["kernel"]), kernel, atol=2e-5)
    np.testing.assert_allclose(np.asarray(fc["bias"]), bias, atol=2e-5)
    np.testing.assert_allclose(np.asarray(probe.train_loss), epoch_losses, rtol=1e-5)


def test_fast_probe_on_digits_is_close_to_sklearn_logistic_regression():
    _, x_train, y_train, _, x_test, y_test = digits_split()
    sklearn_acc = LogisticRegression(max_iter=5000).fit(x_train, y_train).score(x_test, y_test)
    probe = digits_probe()
    result = lp.evaluate_linear_probe(probe, x_test, y_test)
    assert sklearn_acc * 100 > 95  # the known difficulty of digits for a linear model
    assert abs(result["top1"] - sklearn_acc * 100) < 2.0
    assert probe.train_loss.shape == (50,)
    assert probe.train_loss[-1] < 0.5 * probe.train_loss[0]


def test_evaluate_matches_sklearn_metrics_and_ignores_padding():
    _, _, _, _, x_test, y_test = digits_split()
    probe = digits_probe()
    logits = np.asarray(probe.logits(x_test), np.float64)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    # Pad the eval set as an eval iterator does: extra rows, mask False, label -1.
    padded_x = np.concatenate([x_test, np.zeros((11, 64), np.float32)])
    padded_y = np.concatenate([y_test, -np.ones(11, np.int32)])
    mask = np.arange(len(padded_y)) < len(y_test)
    result = lp.evaluate_linear_probe(probe, padded_x, padded_y, mask)
    assert result["top1"] == pytest.approx(accuracy_score(y_test, logits.argmax(1)) * 100, abs=1e-4)
    assert result["top5"] == pytest.approx(
        top_k_accuracy_score(y_test, logits, k=5, labels=np.arange(10)) * 100, abs=1e-4)
    assert result["loss"] == pytest.approx(log_loss(y_test, probs, labels=np.arange(10)), rel=1e-4)
    assert 90 < result["top1"] < 100 and result["top5"] > result["top1"]


def test_normalize_applies_unit_rows_before_the_linear_layer():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(20, 5)).astype(np.float32) * rng.uniform(0.1, 10, (20, 1))
    y = rng.integers(0, 3, 20).astype(np.int32)
    probe = lp.fit_linear_probe(x, y, num_classes=3, epochs=2, batch_size=8, normalize=True)
    fc = jax.tree.map(np.asarray, probe.params["params"]["fc"])
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(probe.logits(x)), unit @ fc["kernel"] + fc["bias"],
                               rtol=1e-5, atol=1e-6)
    # Rescaling the rows changes nothing for a normalising probe.
    np.testing.assert_allclose(np.asarray(probe.logits(3 * x)), np.asarray(probe.logits(x)),
                               rtol=1e-5, atol=1e-6)


def test_image_protocol_with_identity_encoder_follows_the_fast_probe():
    images, x_train, y_train, _, x_test, y_test = digits_split()
    fast = digits_probe()
    slow = lp.train_linear_probe_on_images(flatten, identity_augment, images, y_train,
                                           progress=False, **DIGITS_RECIPE)
    # Same init and batch order: the two trajectories agree up to float32 rounding.
    for a, b in zip(jax.tree.leaves(fast.params), jax.tree.leaves(slow.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-3)
    np.testing.assert_allclose(np.asarray(slow.train_loss), np.asarray(fast.train_loss),
                               rtol=1e-3, atol=1e-4)
    assert np.all(np.diff(np.asarray(slow.train_loss)[:10]) < 0)  # the loss decreases
    fast_acc = lp.evaluate_linear_probe(fast, x_test, y_test)["top1"]
    slow_acc = lp.evaluate_linear_probe(slow, x_test, y_test)["top1"]
    assert abs(fast_acc - slow_acc) <= 0.5
    # Variables passed as arguments instead of captured: the same run.
    scaled = lambda variables, imgs: flatten(imgs) * variables["scale"]
    with_vars = lp.train_linear_probe_on_images(
        scaled, identity_augment, images, y_train, progress=False,
        encoder_variables={"scale": jnp.float32(1.0)}, **DIGITS_RECIPE)
    np.testing.assert_allclose(np.asarray(with_vars.train_loss), np.asarray(slow.train_loss),
                               rtol=1e-6)
    assert with_vars.encoder_variables is None


def test_image_protocol_keys_and_encoder_state_updates():
    """Each step sees fold_in(augment_key, step); in update_encoder_state mode the variables
    are threaded through every step and the last partial batch arrives unpadded."""
    images, _, y_train, _, _, _ = digits_split()
    images, y_train = images[:100], y_train[:100]
    epochs, batch = 2, 32  # 4 steps per epoch, the last one with 4 images

    def augment(key, imgs):
        draw = jax.random.uniform(key, ())
        return jnp.asarray(imgs, jnp.float32) / 16.0, draw

    def embed(variables, inputs):
        imgs, draw = inputs
        step = variables["step"]
        new = {"step": step + 1, "seen": variables["seen"] + imgs.shape[0],
               "draws": variables["draws"].at[step].set(draw)}
        return flatten(imgs), new

    start = {"step": jnp.int32(0), "seen": jnp.int32(0), "draws": jnp.zeros(8, jnp.float32)}
    probe = lp.train_linear_probe_on_images(embed, augment, images, y_train, num_classes=10,
                                            epochs=epochs, batch_size=batch, seed=3,
                                            progress=False, encoder_variables=start,
                                            update_encoder_state=True)
    state = probe.encoder_variables
    assert int(state["step"]) == 8 and int(state["seen"]) == epochs * 100
    augment_key = lp.probe_rngs(3).augment
    expected = [float(jax.random.uniform(jax.random.fold_in(augment_key, s), ())) for s in range(8)]
    np.testing.assert_allclose(np.asarray(state["draws"]), expected, rtol=1e-6)
    assert len(set(expected)) == 8


@pytest.mark.parametrize("update_encoder_state", [False, True])
def test_image_protocol_split_over_devices_equals_one_device(update_encoder_state):
    """With `batch_sharding` each device augments and embeds its rows of the batch (checked
    inside the step), and the probe, its losses and the threaded encoder state equal the
    unsharded run's. The update mode's unpadded last batch (36 rows on 8 devices) runs
    replicated."""
    images, _, y_train, _, _, _ = digits_split()
    images, y_train = images[:100], y_train[:100]
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    seen_shardings = []

    def augment(key, imgs):   # per-example random brightness: the random bits must not move
        scale = jax.random.uniform(key, (imgs.shape[0], 1, 1, 1), minval=0.5, maxval=1.5)
        return jnp.asarray(imgs, jnp.float32) / 16.0 * scale

    def embed(variables, imgs):
        jax.debug.inspect_array_sharding(imgs, callback=seen_shardings.append)
        features = flatten(imgs) * variables["scale"]
        if not update_encoder_state:
            return features
        mean = 0.9 * variables["mean"] + 0.1 * features.mean(axis=0)
        return features, {"scale": variables["scale"], "mean": mean}

    start = {"scale": jnp.float32(1.0), "mean": jnp.zeros(64, jnp.float32)}
    runs = {}
    for name, sharding in (("one", None), ("split", data)):
        seen_shardings.clear()
        runs[name] = lp.train_linear_probe_on_images(
            embed, augment, images, y_train, num_classes=10, epochs=2, batch_size=64, seed=1,
            progress=False, encoder_variables=start, update_encoder_state=update_encoder_state,
            batch_sharding=sharding)
        runs[name + "_shardings"] = list(seen_shardings)
    split_specs = {s.shard_shape((64, 8, 8, 1))[0] for s in runs["split_shardings"]
                   if not s.is_fully_replicated}
    assert split_specs == {8}    # 64 rows, 8 per device
    assert all(s.is_fully_replicated for s in runs["one_shardings"])
    np.testing.assert_allclose(np.asarray(runs["split"].train_loss),
                               np.asarray(runs["one"].train_loss), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(runs["split"].params), jax.tree.leaves(runs["one"].params),
                    strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    if update_encoder_state:
        np.testing.assert_allclose(np.asarray(runs["split"].encoder_variables["mean"]),
                                   np.asarray(runs["one"].encoder_variables["mean"]), rtol=1e-5)


def test_extract_features_drops_padding_rows():
    images, _, labels, _, _, _ = digits_split()
    images, labels = images[:50], labels[:50]
    batches = []
    for start in range(0, 50, 16):  # pad the last batch to 16 as an eval iterator does
        chunk, chunk_labels = images[start:start + 16], labels[start:start + 16]
        pad = 16 - len(chunk)
        batches.append({
            "image": np.concatenate([chunk, np.zeros((pad, 8, 8, 1), np.uint8)]),
            "label": np.concatenate([chunk_labels, -np.ones(pad, np.int32)]),
            "mask": np.arange(16) < len(chunk)})
    embed = jax.jit(lambda imgs: flatten(jnp.asarray(imgs, jnp.float32)) / 16.0)
    features, got_labels = lp.extract_features(embed, batches)
    np.testing.assert_allclose(features, pixels_to_features(images), rtol=1e-6)
    np.testing.assert_array_equal(got_labels, labels)
    # Tuple batches and encoder variables passed first.
    tuples = [(b["image"], b["label"], b["mask"]) for b in batches]
    features2, _ = lp.extract_features(lambda v, imgs: flatten(jnp.asarray(imgs, jnp.float32)) / v,
                                       tuples, encoder_variables=16.0)
    np.testing.assert_allclose(features2, features, rtol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(x=np.zeros((5,), np.float32)), "must be 2-D"),
    (dict(y=np.array([0, 1, 2, 3, 9])), r"must lie in \[0, num_classes=4\)"),
    (dict(y=np.zeros(5, np.float32)), "integer class ids"),
    (dict(y=np.zeros(4, np.int32)), r"must have shape \(5,\)"),
    (dict(epochs=0), "epochs must be >= 1"),
    (dict(batch_size=0), "batch_size must be >= 1"),
    (dict(learning_rate=0.0), "learning_rate must be > 0"),
    (dict(x=np.full((5, 3), np.nan, np.float32)), "train_features contain NaN or inf"),
])
def test_fit_rejects_bad_input(kwargs, message):
    args = dict(x=np.zeros((5, 3), np.float32), y=np.array([0, 1, 2, 3, 0]), epochs=1,
                batch_size=2, learning_rate=1e-3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        lp.fit_linear_probe(args["x"], args["y"], num_classes=4, epochs=args["epochs"],
                            batch_size=args["batch_size"], learning_rate=args["learning_rate"])


def test_evaluate_and_extract_reject_bad_input():
    probe = lp.fit_linear_probe(np.eye(4, dtype=np.float32), np.arange(4), num_classes=4,
                                epochs=1, batch_size=4)
    with pytest.raises(ValueError, match="trained on 4-d features"):
        lp.evaluate_linear_probe(probe, np.zeros((2, 3), np.float32), np.zeros(2, np.int32))
    with pytest.raises(ValueError, match="selects no example"):
        lp.evaluate_linear_probe(probe, np.eye(4, dtype=np.float32), np.arange(4), np.zeros(4))
    nan_row = np.eye(4, dtype=np.float32)
    nan_row[2] = np.nan
    with pytest.raises(ValueError, match="features contain NaN or inf"):
        lp.evaluate_linear_probe(probe, nan_row, np.arange(4))
    assert lp.evaluate_linear_probe(probe, nan_row, np.arange(4), np.arange(4) != 2)["top1"] >= 0
    with pytest.raises(ValueError, match="yielded nothing"):
        lp.extract_features(lambda x: x, [])
    with pytest.raises(ValueError, match="no \\['label'\\] entry"):
        lp.extract_features(lambda x: x, [{"image": np.zeros((2, 3))}])
    with pytest.raises(ValueError, match="needs encoder_variables"):
        lp.train_linear_probe_on_images(flatten, identity_augment, np.zeros((4, 2, 2), np.uint8),
                                        np.arange(4), num_classes=4, update_encoder_state=True)


def test_the_reference_protocol_defaults_are_the_references():
    # LOSSES.md: Linear(F, C), Adam 1e-3, wd 1e-6, batch 512, 100 epochs
    import inspect  # pylint: disable=import-outside-toplevel
    defaults = {name: p.default for name, p in
                inspect.signature(lp.train_linear_probe_on_images).parameters.items()}
    assert (defaults["epochs"], defaults["batch_size"], defaults["learning_rate"],
            defaults["weight_decay"]) == (100, 512, 1e-3, 1e-6)
