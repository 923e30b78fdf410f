"""GIN (Flax) against a float64 NumPy transcription, padding invariance, masked BatchNorm."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cldro_jax.data.graph_batch import GraphBudget, pack_graphs
from cldro_jax.data.tu_dataset import Graph
from cldro_jax.models.gin import GIN, MaskedBatchNorm

FEATURES = 3


def tiny_graphs():
    """Three graphs: a directed 3-cycle plus a tail, an undirected pair with an isolated node,
    and a single node without edges (empty aggregation)."""
    rng = np.random.default_rng(0)
    return [
        Graph(rng.normal(size=(4, FEATURES)).astype(np.float32),
              np.array([[0, 1, 2, 2], [1, 2, 0, 3]]), 0),
        Graph(rng.normal(size=(3, FEATURES)).astype(np.float32), np.array([[0, 1], [1, 0]]), 1),
        Graph(rng.normal(size=(1, FEATURES)).astype(np.float32), np.zeros((2, 0), np.int64), 0),
    ]


def numpy_gin(variables, graphs, *, train, num_layers=3):
    """float64 transcription of the reference forward: per-graph loops, no segment ops.

    Returns (embeddings, projections, new running (mean, var) per layer)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    stats = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["batch_stats"])
    h = [g.node_features.astype(np.float64) for g in graphs]
    pooled, new_stats = [], []
    for layer in range(num_layers):
        conv = p["encoder"][f"GINConv_{layer}"]
        bn, bn_stats = p["encoder"][f"MaskedBatchNorm_{layer}"], stats["encoder"][f"MaskedBatchNorm_{layer}"]
        outs = []
        for g, x in zip(graphs, h, strict=True):
            agg = np.zeros_like(x)
            for s, r in g.edge_index.T:  # message from sender s to receiver r
                agg[r] += x[s]
            z = np.maximum((x + agg) @ conv["Dense_0"]["kernel"] + conv["Dense_0"]["bias"], 0)
            z = z @ conv["Dense_1"]["kernel"] + conv["Dense_1"]["bias"]
            outs.append(np.maximum(z, 0))
        allnodes = np.concatenate(outs)
        if train:
            mean, var = allnodes.mean(0), allnodes.var(0)
            unbiased = allnodes.var(0, ddof=1)
            new_stats.append((0.9 * bn_stats["mean"] + 0.1 * mean, 0.9 * bn_stats["var"] + 0.1 * unbiased))
        else:
            mean, var = bn_stats["mean"], bn_stats["var"]
        h = [(o - mean) / np.sqrt(var + 1e-5) * bn["scale"] + bn["bias"] for o in outs]
        pooled.append(np.stack([x.sum(0) for x in h]))
    emb = np.concatenate(pooled, 1)
    z = np.maximum(emb @ p["head_0"]["kernel"] + p["head_0"]["bias"], 0)
    z = z @ p["head_1"]["kernel"] + p["head_1"]["bias"]
    return emb, z, new_stats


@pytest.fixture(scope="module")
def model_and_variables():
    model = GIN()
    budget = GraphBudget(16, 16, 4)
    init = jax.jit(functools.partial(model.init, train=False))
    variables = init(jax.random.key(0), pack_graphs(tiny_graphs(), budget))
    # Non-trivial BatchNorm parameters and running statistics, so both code paths are exercised.
    rng = np.random.default_rng(1)
    for layer in range(3):
        name = f"MaskedBatchNorm_{layer}"
        variables["params"]["encoder"][name]["scale"] = jnp.asarray(rng.uniform(0.5, 1.5, 32), jnp.float32)
        variables["params"]["encoder"][name]["bias"] = jnp.asarray(rng.normal(size=32), jnp.float32)
        variables["batch_stats"]["encoder"][name]["mean"] = jnp.asarray(rng.normal(size=32), jnp.float32)
        variables["batch_stats"]["encoder"][name]["var"] = jnp.asarray(rng.uniform(0.5, 2, 32), jnp.float32)
    return model, variables


@functools.lru_cache(maxsize=None)
def jitted_apply(train: bool):
    model = GIN()
    if train:
        return jax.jit(lambda v, b: model.apply(v, b, train=True, mutable=["batch_stats"]))
    return jax.jit(lambda v, b: (model.apply(v, b, train=False), {}))


def test_parameter_shapes_match_the_reference(model_and_variables):
    _, variables = model_and_variables
    shapes = jax.tree.map(lambda a: a.shape, variables["params"])
    assert shapes["encoder"]["GINConv_0"]["Dense_0"]["kernel"] == (FEATURES, 32)
    assert shapes["encoder"]["GINConv_2"]["Dense_1"]["kernel"] == (32, 32)
    assert shapes["head_0"]["kernel"] == (96, 96) and shapes["head_1"]["kernel"] == (96, 96)
    assert np.all(np.asarray(variables["params"]["head_1"]["bias"]) == 0)  # zero-bias init


@pytest.mark.parametrize("train", [False, True])
def test_matches_float64_numpy_transcription(model_and_variables, train):
    _, variables = model_and_variables
    graphs = tiny_graphs()
    batch = pack_graphs(graphs, GraphBudget(16, 16, 4))
    (emb, proj), updates = jitted_apply(train)(variables, batch)
    ref_emb, ref_proj, ref_stats = numpy_gin(variables, graphs, train=train)
    assert emb.shape == (4, 96) and proj.shape == (4, 96)
    np.testing.assert_allclose(emb[:3], ref_emb, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(proj[:3], ref_proj, rtol=2e-5, atol=2e-5)
    np.testing.assert_array_equal(emb[3], 0)  # the padded slot pools nothing
    if train:
        for layer, (mean, var) in enumerate(ref_stats):
            got = updates["batch_stats"]["encoder"][f"MaskedBatchNorm_{layer}"]
            np.testing.assert_allclose(got["mean"], mean, rtol=2e-5, atol=2e-5)
            np.testing.assert_allclose(got["var"], var, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("train", [False, True])
def test_padding_never_changes_results(model_and_variables, train):
    _, variables = model_and_variables
    graphs = tiny_graphs()
    tight = pack_graphs(graphs, GraphBudget(8, 6, 3))  # exactly full
    loose = pack_graphs(graphs, GraphBudget(24, 40, 7))
    # Garbage in padding rows and padded edges aimed at real nodes must not matter either.
    rng = np.random.default_rng(2)
    loose = loose._replace(
        node_features=np.where(loose.node_mask[:, None], loose.node_features,
                               rng.normal(size=loose.node_features.shape)).astype(np.float32),
        senders=np.where(loose.edge_mask, loose.senders, rng.integers(0, 8, 40)).astype(np.int32),
        receivers=np.where(loose.edge_mask, loose.receivers, rng.integers(0, 8, 40)).astype(np.int32))
    (emb_t, proj_t), upd_t = jitted_apply(train)(variables, tight)
    (emb_l, proj_l), upd_l = jitted_apply(train)(variables, loose)
    np.testing.assert_allclose(emb_l[:3], emb_t, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(proj_l[:3], proj_t, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), upd_t, upd_l)


def test_masked_batchnorm_across_devices_with_uneven_padding():
    """Statistics psum'ed over a mapped axis equal those of the concatenated real rows, even when
    devices hold different numbers of real rows (Flax's pmean of per-device means would not)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 6, 4)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]], bool)
    bn = MaskedBatchNorm(axis_name="data")
    variables = bn.init(jax.random.key(0), x[0], mask[0], train=False)
    mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:2])
    P = jax.sharding.PartitionSpec

    def per_device(xs, ms):
        y, upd = bn.apply(variables, xs[0], ms[0], train=True, mutable=["batch_stats"])
        return y[None], upd["batch_stats"]["mean"][None], upd["batch_stats"]["var"][None]

    fn = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P("data"), P("data")),
                               out_specs=(P("data"), P("data"), P("data"))))
    y, mean, var = jax.block_until_ready(fn(x, mask))
    real = x[mask].astype(np.float64)
    expected = (x - real.mean(0)) / np.sqrt(real.var(0) + 1e-5)
    np.testing.assert_allclose(y[mask], expected[mask], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mean[0], 0.1 * real.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var[1], 0.9 + 0.1 * real.var(0, ddof=1), rtol=1e-5)


def test_bfloat16_aggregation_of_a_high_degree_node():
    # A hub with 5,000 neighbours (REDDIT graphs have such): in bfloat16 compute its neighbour
    # sum must still be right to bfloat16's rounding of the result, not stall near 256.
    from cldro_jax.models.gin import GINConv  # pylint: disable=import-outside-toplevel
    leaves = 5000
    rng = np.random.default_rng(0)
    x = (1.0 + 0.01 * rng.normal(size=(leaves + 1, FEATURES))).astype(np.float32)
    edges = np.stack([np.arange(1, leaves + 1), np.zeros(leaves, np.int64)])
    batch = pack_graphs([Graph(x, edges, 0)], GraphBudget(leaves + 8, leaves + 8, 2))
    h = jnp.asarray(batch.node_features)
    variables = GINConv(8).init(jax.random.key(0), h, batch)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    hub_input = x[0].astype(np.float64) + x[1:].astype(np.float64).sum(0)   # about 5,000
    hidden = np.maximum(hub_input @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"], 0)
    expected = hidden @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]
    got = GINConv(8, dtype=jnp.bfloat16).apply(variables, h.astype(jnp.bfloat16), batch)[0]
    error = np.abs(np.asarray(got, np.float64) - expected).max() / np.abs(expected).max()
    assert error < 0.02   # bfloat16 input rounding (2^-9) through two layers; was 0.9
