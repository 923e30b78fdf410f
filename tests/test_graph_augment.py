"""GraphCL augmentations in both modes, on real MUTAG molecules and small hand-made graphs.

Nodes are tagged with their original id in a feature column, so each test can tell which nodes
survived and check the edges against the original graph independently of the implementation.
"""
import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.csgraph

from cldro_jax.data import graph_augment as ga
from cldro_jax.data.graphs import (add_reference_self_loops, make_views,
                                   remove_edgeless_nodes_and_self_loops)
from cldro_jax.data.tu_dataset import Graph, load_tu_dataset


@pytest.fixture(scope="module")
def mutag():
    return load_tu_dataset("MUTAG", source="grakel")


def tagged(graph: Graph) -> Graph:
    """Feature column 0 = original node id (the rest are the original features)."""
    ids = np.arange(graph.num_nodes, dtype=np.float32)[:, None]
    return Graph(np.concatenate([ids, graph.node_features], 1), graph.edge_index, graph.label)


def original_ids(graph: Graph) -> np.ndarray:
    return graph.node_features[:, 0].astype(np.int64)


def edge_set(edge_index: np.ndarray, ids: np.ndarray | None = None) -> set:
    edges = edge_index if ids is None else ids[edge_index]
    return {tuple(e) for e in edges.T.tolist()}


def path_graph(n: int) -> Graph:
    src = np.arange(n - 1)
    edges = np.stack([np.concatenate([src, src + 1]), np.concatenate([src + 1, src])])
    return Graph(np.ones((n, 1), np.float32), edges.astype(np.int64), 0)


def is_connected(graph: Graph) -> bool:
    n = graph.num_nodes
    adjacency = scipy.sparse.coo_matrix(
        (np.ones(graph.num_edges), (graph.edge_index[0], graph.edge_index[1])), shape=(n, n))
    return scipy.sparse.csgraph.connected_components(adjacency, directed=False)[0] == 1


def big_molecule(mutag) -> Graph:
    return tagged(max(mutag.graphs, key=lambda g: g.num_nodes))  # 28 nodes


# ---------------------------------------------------------------------------------------------
# proper mode
# ---------------------------------------------------------------------------------------------
def test_default_ratios_are_graphcls():
    # LOSSES.md / GraphCL's aug.py, written out: augment_graph (what training calls) reads these
    assert ga.DEFAULT_RATIOS == {"drop_nodes": 0.1, "subgraph": 0.2, "perturb_edges": 0.1,
                                 "mask_attributes": 0.1}


def test_proper_drop_nodes_removes_nodes_and_their_edges(mutag):
    graph = big_molecule(mutag)
    out = ga.drop_nodes(graph, np.random.default_rng(0), ratio=0.1)
    ids = original_ids(out)
    assert out.num_nodes == graph.num_nodes - int(0.1 * graph.num_nodes) == 26
    assert np.all(np.diff(ids) > 0)  # survivors keep their order
    survivors = set(ids.tolist())
    expected = {e for e in edge_set(graph.edge_index) if e[0] in survivors and e[1] in survivors}
    assert edge_set(out.edge_index, ids) == expected
    np.testing.assert_array_equal(out.node_features, graph.node_features[ids])


def test_proper_subgraph_grows_a_connected_20_percent(mutag):
    for index in (0, 5, 100):
        graph = tagged(mutag.graphs[index])
        assert is_connected(graph)  # molecules are connected
        out = ga.subgraph(graph, np.random.default_rng(index), ratio=0.2)
        ids = original_ids(out)
        assert out.num_nodes == max(1, int(0.2 * graph.num_nodes))
        assert is_connected(out)
        kept = set(ids.tolist())
        assert edge_set(out.edge_index, ids) == {
            e for e in edge_set(graph.edge_index) if e[0] in kept and e[1] in kept}
    # On a path, a real walk reaches far beyond the start node's two neighbours.
    out = ga.subgraph(tagged(path_graph(50)), np.random.default_rng(1), ratio=0.2)
    assert out.num_nodes == 10 and is_connected(out)


def test_proper_subgraph_jumps_when_the_component_is_exhausted():
    two_components = Graph(np.ones((10, 1), np.float32),
                           np.array([[0, 1, 2, 3], [1, 0, 3, 2]]), 0)  # 2 edges + 6 isolated
    for seed in range(5):
        assert ga.subgraph(two_components, np.random.default_rng(seed), ratio=0.5).num_nodes == 5


def test_proper_perturb_edges_removes_and_adds_the_same_number(mutag):
    graph = big_molecule(mutag)
    original = edge_set(graph.edge_index)
    pairs = {(a, b) for a, b in original if a < b}
    out = ga.perturb_edges(graph, np.random.default_rng(3), ratio=0.1)
    assert out.num_nodes == graph.num_nodes and out.num_edges == graph.num_edges
    new = edge_set(out.edge_index)
    assert new == {(b, a) for a, b in new}  # still undirected
    new_pairs = {(a, b) for a, b in new if a < b}
    changed = int(0.1 * len(pairs))
    assert len(pairs - new_pairs) == changed == len(new_pairs - pairs) == 3
    assert all(a != b for a, b in new)
    # Directed graphs are perturbed entry by entry.
    directed = Graph(np.ones((30, 1), np.float32), np.stack([np.arange(29), np.arange(1, 30)]), 0)
    out = ga.perturb_edges(directed, np.random.default_rng(0), ratio=0.2)
    old, new = edge_set(directed.edge_index), edge_set(out.edge_index)
    assert len(new) == 29 and len(old - new) == len(new - old) == 5


def test_perturb_edges_rejection_sampling_path_on_a_large_sparse_graph():
    graph = path_graph(1000)  # 499,500 candidate pairs: above the enumeration limit
    out = ga.perturb_edges(graph, np.random.default_rng(0), ratio=0.1)
    old, new = edge_set(graph.edge_index), edge_set(out.edge_index)
    assert out.num_edges == graph.num_edges and new == {(b, a) for a, b in new}
    assert len(old - new) == len(new - old) == 2 * 99 and all(a != b for a, b in new)


def random_graph(rng: np.random.Generator, n: int, m: int, undirected: bool) -> Graph:
    u, v = rng.integers(n, size=(2, m))
    edges = np.stack([u[u != v], v[u != v]])
    if undirected:
        edges = np.concatenate([edges, edges[::-1]], axis=1)
    return Graph(np.ones((n, 1), np.float32), edges.astype(np.int64), 0)


@pytest.mark.parametrize("undirected", [True, False])
def test_edge_addition_draws_uniformly_from_the_listed_non_edges(undirected):
    # Reference: list every candidate pair row-major (u < v, or u != v), drop the edges, pick
    # `count` of the rest without replacement. The implementation never builds that list (it maps
    # ranks), so it must return exactly these pairs for the same Generator state.
    rng = np.random.default_rng(0)
    for n, m in [(2, 1), (3, 0), (5, 20), (9, 12), (17, 60), (40, 30), (120, 400)]:
        graph = random_graph(rng, n, m, undirected)
        src, dst = graph.edge_index
        upper = (src < dst) if undirected else (src != dst)
        keys = np.unique(src[upper] * n + dst[upper])
        if undirected:
            u, v = np.triu_indices(n, k=1)
        else:
            u, v = np.nonzero(~np.eye(n, dtype=bool))
        free = ~np.isin(u * n + v, keys)
        for count in (1, 3, 50):
            for seed in range(5):
                expected_pick = np.random.default_rng(seed).choice(
                    free.sum(), min(count, free.sum()), replace=False)
                expected = np.stack([u[free][expected_pick], v[free][expected_pick]])
                got = ga._sample_non_edges(n, keys, count, undirected,  # pylint: disable=protected-access
                                           np.random.default_rng(seed))
                np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("undirected", [True, False])
def test_edge_addition_on_a_large_dense_graph_returns_the_few_non_edges(undirected):
    """Past the enumeration limit a dense graph with fewer free pairs than asked for gets all of
    them (rejection sampling there never finished)."""
    n = 700
    assert n * (n - 1) // 2 > ga._ENUMERATE_PAIRS_LIMIT  # pylint: disable=protected-access
    u, v = np.triu_indices(n, k=1) if undirected else np.nonzero(~np.eye(n, dtype=bool))
    keys = u.astype(np.int64) * n + v
    missing = np.random.default_rng(0).choice(keys.size, 5, replace=False)
    got = ga._sample_non_edges(n, np.delete(keys, missing), 1000, undirected,  # pylint: disable=protected-access
                               np.random.default_rng(1))
    assert sorted((got[0] * n + got[1]).tolist()) == sorted(keys[missing].tolist())


def test_faithful_subgraph_equals_the_reference_draw_loop(mutag):
    # The reference's loop, one draw at a time: add a random start neighbour if new, until the
    # set holds int(0.2 n) + 1 nodes or n draws were made. The implementation draws all at once.
    def loop(graph, rng):
        n = graph.num_nodes
        src, dst = graph.edge_index
        start = int(rng.integers(n))
        taken, neighbours = [start], np.unique(dst[src == start])
        for _ in range(n):
            if len(taken) > int(0.2 * n) or neighbours.size == 0:
                break
            node = int(neighbours[rng.integers(neighbours.size)])
            if node not in taken:
                taken.append(node)
        return {e for e in edge_set(graph.edge_index) if e[0] in taken and e[1] in taken}

    star = Graph(np.ones((40, 1), np.float32),
                 np.array([[0] * 39 + list(range(1, 40)), list(range(1, 40)) + [0] * 39]), 0)
    for graph in [*mutag.graphs[:40], star, path_graph(12)]:
        for seed in range(6):
            out = ga.subgraph(graph, np.random.default_rng(seed), ratio=0.2, mode="faithful")
            assert edge_set(out.edge_index) == loop(graph, np.random.default_rng(seed))


@pytest.mark.parametrize("mode", ga.MODES)
def test_mask_attributes_replaces_ten_percent_with_normal_samples(mode):
    rng = np.random.default_rng(0)
    graph = Graph(rng.random((2000, 7)).astype(np.float32), np.zeros((2, 0), np.int64), 1)
    out = ga.mask_attributes(graph, np.random.default_rng(1), ratio=0.1, mode=mode)
    changed = np.any(out.node_features != graph.node_features, axis=1)
    assert changed.sum() == 200
    samples = out.node_features[changed]
    assert abs(samples.mean() - 0.5) < 0.05 and abs(samples.std() - 0.5) < 0.04
    assert out.edge_index.shape == (2, 0) and out.label == 1


# ---------------------------------------------------------------------------------------------
# faithful mode (the reference code's behaviour)
# ---------------------------------------------------------------------------------------------
def test_faithful_drop_nodes_keeps_nodes_and_cuts_their_edges(mutag):
    graph = big_molecule(mutag)
    out = ga.drop_nodes(graph, np.random.default_rng(0), ratio=0.1, mode="faithful")
    assert out.num_nodes == graph.num_nodes
    np.testing.assert_array_equal(out.node_features, graph.node_features)
    cut = set(np.random.default_rng(0).choice(graph.num_nodes, 2, replace=False).tolist())
    assert not cut & set(out.edge_index.ravel().tolist())  # the dropped nodes lost every edge
    assert edge_set(out.edge_index) == {e for e in edge_set(graph.edge_index)
                                        if e[0] not in cut and e[1] not in cut}


def test_faithful_subgraph_never_leaves_the_start_node_neighbourhood(mutag):
    long_path = path_graph(50)
    out = ga.subgraph(long_path, np.random.default_rng(0), ratio=0.2, mode="faithful")
    assert out.num_nodes == 50
    assert len(set(out.edge_index.ravel().tolist())) <= 3  # start + its two path neighbours
    graph = big_molecule(mutag)
    neighbours = {a: {b for x, b in edge_set(graph.edge_index) if x == a}
                  for a in range(graph.num_nodes)}
    for seed in range(10):
        out = ga.subgraph(graph, np.random.default_rng(seed), ratio=0.2, mode="faithful")
        kept = set(out.edge_index.ravel().tolist())
        assert out.num_nodes == graph.num_nodes
        assert len(kept) <= int(0.2 * graph.num_nodes) + 1
        # Some kept node (the start) is adjacent to every other kept node.
        assert any(kept - {s} <= neighbours[s] for s in kept)
        assert edge_set(out.edge_index) == {e for e in edge_set(graph.edge_index)
                                            if e[0] in kept and e[1] in kept}


def test_faithful_perturb_edges_only_removes_a_tenth_of_entries(mutag):
    graph = add_reference_self_loops(big_molecule(mutag))
    out = ga.perturb_edges(graph, np.random.default_rng(0), mode="faithful", ratio=0.5)
    entries = graph.num_edges
    assert out.num_edges == entries - entries // 10  # 1/10 whatever the ratio, like the reference
    assert edge_set(out.edge_index) <= edge_set(graph.edge_index)
    assert out.num_nodes == graph.num_nodes


def test_reference_self_loops_and_view_two_cleanup():
    graph = Graph(np.arange(6, dtype=np.float32)[:, None],
                  np.array([[0, 1, 1, 3], [1, 0, 3, 1]]), 0)  # nodes 2, 4, 5 isolated
    looped = add_reference_self_loops(graph)
    # range(max id = 3): loops on 0, 1, 2 but not on 3 (the reference's off-by-one).
    assert edge_set(looped.edge_index) == edge_set(graph.edge_index) | {(0, 0), (1, 1), (2, 2)}
    cleaned = remove_edgeless_nodes_and_self_loops(looped)
    np.testing.assert_array_equal(cleaned.node_features[:, 0], [0, 1, 2, 3])  # 4, 5 removed
    assert edge_set(cleaned.edge_index) == {(0, 1), (1, 0), (1, 3), (3, 1)}


def test_faithful_views_drop_the_cut_off_nodes_from_view_two(mutag):
    graph = big_molecule(mutag)
    rng, replay = np.random.default_rng(7), np.random.default_rng(7)
    first, second = make_views(graph, "drop_nodes", rng, mode="faithful")
    assert first.num_edges == graph.num_edges + graph.num_nodes - 1  # loops on all but the last
    augmented = ga.drop_nodes(add_reference_self_loops(graph), replay, mode="faithful")
    survivors = np.unique(augmented.edge_index)
    np.testing.assert_array_equal(original_ids(second), survivors)
    dropped = set(np.random.default_rng(7).choice(graph.num_nodes, 2, replace=False).tolist())
    kept = set(original_ids(second).tolist())
    assert not dropped & kept  # removed, not kept as isolated nodes
    # Every other node keeps its self-loop and so survives, except possibly the last one (no loop).
    assert set(range(graph.num_nodes - 1)) - dropped <= kept
    assert not np.any(second.edge_index[0] == second.edge_index[1])


# ---------------------------------------------------------------------------------------------
# both modes: seeds, validity, mixtures, errors
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ga.MODES)
@pytest.mark.parametrize("name", ga.SINGLE_AUGMENTATIONS)
def test_seeds_reproduce_and_edges_stay_valid(mutag, mode, name):
    outputs = []
    graphs = [tagged(g) for g in mutag.graphs]  # node ids make equal-looking outputs distinct
    for index, graph in enumerate(graphs):
        out = ga.augment_graph(graph, name, np.random.default_rng((5, index)), mode=mode)
        again = ga.augment_graph(graph, name, np.random.default_rng((5, index)), mode=mode)
        np.testing.assert_array_equal(out.edge_index, again.edge_index)
        np.testing.assert_array_equal(out.node_features, again.node_features)
        assert out.edge_index.dtype == np.int64 and out.edge_index.shape[0] == 2
        if out.num_edges:
            assert out.edge_index.min() >= 0 and out.edge_index.max() < out.num_nodes
        if mode == "faithful":
            assert out.num_nodes == graph.num_nodes
        outputs.append(out)
    # Another seed gives other outputs (small graphs can coincide by chance, so count them).
    differs = 0
    for index, graph in enumerate(graphs[:40]):
        other = ga.augment_graph(graph, name, np.random.default_rng((6, index)), mode=mode)
        differs += not (np.array_equal(other.edge_index, outputs[index].edge_index)
                        and np.array_equal(other.node_features, outputs[index].node_features))
    assert differs >= 30


@pytest.mark.parametrize("mixture", sorted(ga.MIXTURES))
def test_mixtures_pick_one_member_per_graph_uniformly(mutag, mixture):
    members = ga.MIXTURES[mixture]
    graph = big_molecule(mutag)
    counts = np.zeros(len(members), int)
    for seed in range(400):
        replay = np.random.default_rng(seed)
        chosen = int(replay.integers(len(members)))
        counts[chosen] += 1
        expected = ga.augment_graph(graph, members[chosen], replay)
        out = ga.augment_graph(graph, mixture, np.random.default_rng(seed))
        np.testing.assert_array_equal(out.edge_index, expected.edge_index)
        np.testing.assert_array_equal(out.node_features, expected.node_features)
    assert np.all(np.abs(counts / 400 - 1 / len(members)) < 0.08)


def test_bad_names_and_modes_raise(mutag):
    with pytest.raises(ValueError, match="unknown augmentation"):
        ga.augment_graph(mutag.graphs[0], "random5", np.random.default_rng(0))
    with pytest.raises(ValueError, match="mode"):
        ga.augment_graph(mutag.graphs[0], "random2", np.random.default_rng(0), mode="exact")
    assert ga.augment_graph(mutag.graphs[0], "none", np.random.default_rng(0)) is mutag.graphs[0]
