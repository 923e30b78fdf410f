"""Padded graph batches and the view-batch pipeline the trainer calls."""
import numpy as np
import pytest

from cldro_jax.data.graph_augment import augment_graph
from cldro_jax.data.graph_batch import GraphBudget, budget_for_graphs, pack_graphs
from cldro_jax.data.graphs import (epoch_view_batches, eval_batches, make_view_batches,
                                   make_views, view_budget)
from cldro_jax.data.tu_dataset import Graph, load_tu_dataset


@pytest.fixture(scope="module")
def mutag():
    return load_tu_dataset("MUTAG", source="grakel")


def small_graphs():
    a = Graph(np.array([[1, 0], [0, 1], [1, 1]], np.float32), np.array([[0, 1, 2], [1, 2, 0]]), 4)
    b = Graph(np.array([[2, 2]], np.float32), np.zeros((2, 0), np.int64), 1)
    c = Graph(np.array([[3, 0], [0, 3]], np.float32), np.array([[0, 1], [1, 0]]), 0)
    return [a, b, c]


def test_pack_layout_and_padding_conventions():
    batch = pack_graphs(small_graphs(), GraphBudget(max_nodes=8, max_edges=7, max_graphs=5))
    np.testing.assert_array_equal(batch.node_features[:6], [[1, 0], [0, 1], [1, 1], [2, 2],
                                                            [3, 0], [0, 3]])
    np.testing.assert_array_equal(batch.node_features[6:], 0)
    np.testing.assert_array_equal(batch.node_graph, [0, 0, 0, 1, 2, 2, 4, 4])
    np.testing.assert_array_equal(batch.senders, [0, 1, 2, 4, 5, 7, 7])
    np.testing.assert_array_equal(batch.receivers, [1, 2, 0, 5, 4, 7, 7])
    np.testing.assert_array_equal(batch.node_mask, [1] * 6 + [0] * 2)
    np.testing.assert_array_equal(batch.edge_mask, [1] * 5 + [0] * 2)
    np.testing.assert_array_equal(batch.graph_mask, [1, 1, 1, 0, 0])
    np.testing.assert_array_equal(batch.labels, [4, 1, 0, -1, -1])
    assert batch.num_graphs == 3
    assert batch.senders.dtype == np.int32 and batch.node_features.dtype == np.float32
    # Exactly full budgets are allowed.
    full = pack_graphs(small_graphs(), GraphBudget(6, 5, 3))
    assert full.node_mask.all() and full.edge_mask.all() and full.graph_mask.all()


def test_pack_rejects_what_does_not_fit_or_is_malformed():
    graphs = small_graphs()
    for budget in (GraphBudget(5, 5, 3), GraphBudget(6, 4, 3), GraphBudget(6, 5, 2)):
        with pytest.raises(ValueError, match="do not fit the budget"):
            pack_graphs(graphs, budget)
    bad = Graph(np.ones((2, 2), np.float32), np.array([[0], [2]]), 0)
    with pytest.raises(ValueError, match="only 2 nodes"):
        pack_graphs([bad], GraphBudget(8, 8, 2))
    with pytest.raises(ValueError, match="features"):
        pack_graphs([graphs[0], Graph(np.ones((1, 3), np.float32), np.zeros((2, 0), int), 0)],
                    GraphBudget(8, 8, 2))


def test_budget_guarantees_every_batch_fits(mutag):
    nodes = np.sort([g.num_nodes for g in mutag.graphs])
    edges = np.sort([g.num_edges for g in mutag.graphs])
    budget = budget_for_graphs(mutag.graphs, 16, round_to=1)
    assert budget == GraphBudget(int(nodes[-16:].sum()), int(edges[-16:].sum()), 16)
    largest = sorted(mutag.graphs, key=lambda g: g.num_nodes)[-16:]
    pack_graphs(largest, budget)  # the worst batch fits
    rounded = budget_for_graphs(mutag.graphs, 16, round_to=128)
    assert rounded.max_nodes % 128 == 0 and rounded.max_nodes >= budget.max_nodes
    small = budget_for_graphs(mutag.graphs, 16, quantile=0.5, round_to=1)
    assert small.max_nodes == int(np.ceil(16 * np.quantile(nodes, 0.5)))
    with pytest.raises(ValueError, match="higher quantile"):
        pack_graphs(largest, small)


@pytest.mark.parametrize("mode", ["proper", "faithful"])
def test_eval_batches_cover_every_graph_once(mutag, mode):
    budget = view_budget(mutag.graphs, 50, mode)
    batches = list(eval_batches(mutag.graphs, batch_size=50, budget=budget, mode=mode))
    assert len(batches) == 4 and [b.num_graphs for b in batches] == [50, 50, 50, 38]
    labels = np.concatenate([b.labels[b.graph_mask] for b in batches])
    np.testing.assert_array_equal(labels, mutag.labels)
    assert sum(int(b.node_mask.sum()) for b in batches) == mutag.num_nodes
    loops = 0 if mode == "proper" else sum(int(g.edge_index.max()) for g in mutag.graphs)
    assert sum(int(b.edge_mask.sum()) for b in batches) == 7442 + loops
    assert len({(b.node_features.shape, b.senders.shape) for b in batches}) == 1  # static shapes


@pytest.mark.parametrize("mode", ["proper", "faithful"])
def test_view_batches_are_aligned_reproducible_and_batch_independent(mutag, mode):
    budget = view_budget(mutag.graphs, 8, mode)
    indices = [3, 150, 7, 42, 99]
    view1, view2 = make_view_batches(mutag.graphs, indices, seed=11, aug="random4", mode=mode,
                                     budget=budget)
    np.testing.assert_array_equal(view1.labels[:5], mutag.labels[indices])
    np.testing.assert_array_equal(view1.labels, view2.labels)
    np.testing.assert_array_equal(view1.graph_mask, [1] * 5 + [0] * 3)
    np.testing.assert_array_equal(view2.graph_mask, view1.graph_mask)
    # Slot k of view 2 is the augmentation of graph indices[k], drawn from rng (seed, index).
    for slot, index in enumerate(indices):
        _, expected = make_views(mutag.graphs[index], "random4",
                                 np.random.default_rng((11, index)), mode)
        rows = view2.node_graph[:int(view2.node_mask.sum())] == slot
        np.testing.assert_array_equal(view2.node_features[:len(rows)][rows], expected.node_features)
    again = make_view_batches(mutag.graphs, indices, seed=11, aug="random4", mode=mode,
                              budget=budget)
    for a, b in zip((view1, view2), again, strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)
    # The same graph gets the same views in another batch composition.
    alone = make_view_batches(mutag.graphs, [150], seed=11, aug="random4", mode=mode,
                              budget=budget)[1]
    n = int(alone.node_mask.sum())
    np.testing.assert_array_equal(alone.node_features[:n], view2.node_features[view2.node_graph == 1])


def test_view_one_is_the_original_graph_in_proper_mode(mutag):
    budget = view_budget(mutag.graphs, 4, "proper")
    view1, _ = make_view_batches(mutag.graphs, [0, 1], seed=0, aug="random2", mode="proper",
                                 budget=budget)
    g0, g1 = mutag.graphs[0], mutag.graphs[1]
    n = g0.num_nodes + g1.num_nodes
    np.testing.assert_array_equal(view1.node_features[:n],
                                  np.concatenate([g0.node_features, g1.node_features]))
    e = g0.num_edges
    np.testing.assert_array_equal(view1.senders[:e], g0.edge_index[0])
    np.testing.assert_array_equal(view1.receivers[e:e + g1.num_edges], g1.edge_index[1] + g0.num_nodes)


def test_epoch_batches_static_shapes_and_epoch_dependence(mutag):
    budget = view_budget(mutag.graphs, 64, "proper")
    epoch0 = list(epoch_view_batches(mutag.graphs, batch_size=64, seed=3, epoch=0,
                                     aug="random2", mode="proper", budget=budget))
    assert len(epoch0) == 3 and [v1.num_graphs for v1, _ in epoch0] == [64, 64, 60]
    shapes = {tuple(x.shape for x in v) for pair in epoch0 for v in pair}
    assert len(shapes) == 1
    seen = np.concatenate([v1.labels[v1.graph_mask] for v1, _ in epoch0])
    assert np.bincount(seen).tolist() == [63, 125]  # a permutation of the whole dataset
    epoch1 = list(epoch_view_batches(mutag.graphs, batch_size=64, seed=3, epoch=1,
                                     aug="random2", mode="proper", budget=budget))
    assert not np.array_equal(epoch0[0][0].labels, epoch1[0][0].labels)
    dropped = list(epoch_view_batches(mutag.graphs, batch_size=64, seed=3, epoch=0, aug="none",
                                      mode="proper", budget=budget, drop_remainder=True,
                                      shuffle=False))
    assert len(dropped) == 2
    np.testing.assert_array_equal(dropped[0][0].node_features, dropped[0][1].node_features)
    # "none" in proper mode is the identity, consistent with augment_graph.
    assert augment_graph(mutag.graphs[0], "none", np.random.default_rng(0)) is mutag.graphs[0]


# graph_batch docstring: a quantile budget is ceil(batch_size * quantile(sizes)).
def test_a_quantile_budget_is_the_ceiling_of_batch_size_times_the_quantile():
  from cldro_jax.data.graph_batch import budget_for_graphs  # pylint: disable=import-outside-toplevel
  from cldro_jax.data.tu_dataset import Graph  # pylint: disable=import-outside-toplevel
  def graph(n):
    return Graph(np.ones((n, 1), np.float32), np.zeros((2, 0), np.int64), 0)
  budget = budget_for_graphs([graph(1), graph(2)], 3, quantile=0.5, round_to=1)
  assert budget.max_nodes == 5   # ceil(3 * 1.5), by hand
