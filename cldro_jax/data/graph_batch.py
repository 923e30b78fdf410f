"""Padded, jit-friendly graph batches: many small graphs packed into fixed-size arrays.

A `GraphBatch` holds up to ``max_graphs`` graphs in arrays of static shape, so one compiled step
serves every batch:

    node_features (N, F) float32   node_graph (N,) int32   node_mask  (N,) bool
    senders       (E,)   int32     receivers  (E,) int32   edge_mask  (E,) bool
    graph_mask    (G,)   bool      labels     (G,) int32 (-1 on padding slots)

Conventions (the model relies on them; masks are what make padding harmless):
- graph k's nodes are a contiguous block of rows, in the order the graphs were given; graph slot k
  holds the k-th graph; slots past the last graph are padding (graph_mask False);
- padding node rows have zero features, node_mask False and graph id ``G - 1`` (the last slot;
  it is a padding slot whenever the batch is not full; pooling multiplies by node_mask anyway);
- padding edges point from and to the last node row ``N - 1`` (a padding node whenever the node
  budget is not exactly full) and have edge_mask False; the model multiplies messages by the mask;
- an edge (s, r) sends node s's state to node r (PyG's source-to-target flow).

Budgets: `budget_for_graphs` takes the sum of the ``batch_size`` largest node (and edge) counts,
which guarantees that ANY batch of the dataset fits; with ``quantile=q`` it takes
``batch_size x quantile_q(size)`` instead (smaller arrays for heavy-tailed datasets such as
REDDIT), and `pack_graphs` raises a ValueError naming the fix when a batch does not fit.
jraph would do this but is unmaintained (it calls JAX APIs removed since), hence this module.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np

from cldro_jax.data.tu_dataset import Graph


class GraphBudget(NamedTuple):
    """Static array sizes of a padded batch: node rows, edge rows, graph slots."""

    max_nodes: int
    max_edges: int
    max_graphs: int


class GraphBatch(NamedTuple):
    """A padded batch of graphs (see the module docstring). A NamedTuple, hence a JAX pytree."""

    node_features: np.ndarray
    senders: np.ndarray
    receivers: np.ndarray
    node_graph: np.ndarray
    node_mask: np.ndarray
    edge_mask: np.ndarray
    graph_mask: np.ndarray
    labels: np.ndarray

    @property
    def num_graphs(self) -> int:
        """Real graphs in the batch (host-side NumPy batches only)."""
        return int(np.sum(self.graph_mask))


def _round_up(value: int, multiple: int) -> int:
    return int(math.ceil(max(value, 1) / multiple) * multiple)


def budget_for_graphs(graphs: Sequence[Graph], batch_size: int, *, quantile: float | None = None,
                      round_to: int = 8) -> GraphBudget:
    """A budget that fits batches of ``batch_size`` graphs drawn from ``graphs``.

    Args:
      graphs: the graphs the batches will be made of (after any size-changing preprocessing, e.g.
        the faithful pipeline's self-loops; augmentations here never grow a graph).
      batch_size: graphs per batch (= max_graphs).
      quantile: None for the guaranteed bound (sum of the largest ``batch_size`` sizes); a value in
        (0, 1] for ``ceil(batch_size * quantile(sizes))``, which may not fit an unlucky batch.
      round_to: round node and edge budgets up to a multiple of this (friendlier shapes).
    """
    if batch_size < 1 or not graphs:
        raise ValueError("budget_for_graphs needs batch_size >= 1 and at least one graph")
    node_counts = np.sort([g.num_nodes for g in graphs])[::-1]
    edge_counts = np.sort([g.num_edges for g in graphs])[::-1]
    if quantile is None:
        max_nodes, max_edges = node_counts[:batch_size].sum(), edge_counts[:batch_size].sum()
    else:
        if not 0 < quantile <= 1:
            raise ValueError(f"quantile must be in (0, 1], got {quantile}")
        max_nodes = math.ceil(batch_size * np.quantile(node_counts, quantile))
        max_edges = math.ceil(batch_size * np.quantile(edge_counts, quantile))
    return GraphBudget(_round_up(int(max_nodes), round_to), _round_up(int(max_edges), round_to),
                       batch_size)


def pack_graphs(graphs: Sequence[Graph], budget: GraphBudget) -> GraphBatch:
    """Packs ``graphs`` (at most ``budget.max_graphs``) into one padded `GraphBatch`."""
    num_nodes = sum(g.num_nodes for g in graphs)
    num_edges = sum(g.num_edges for g in graphs)
    if len(graphs) > budget.max_graphs or num_nodes > budget.max_nodes or num_edges > budget.max_edges:
        raise ValueError(
            f"{len(graphs)} graphs with {num_nodes} nodes and {num_edges} edges do not fit the "
            f"budget {budget}. Use budget_for_graphs(graphs, batch_size) without `quantile` (it "
            f"fits every batch) or a higher quantile; in a run, --config.data.budget_quantile=0 "
            f"(the guaranteed budget) or a value closer to 1.")
    if not graphs:
        raise ValueError("pack_graphs needs at least one graph")
    feature_dim = graphs[0].node_features.shape[1]
    for slot, graph in enumerate(graphs):
        if graph.node_features.shape[1] != feature_dim:
            raise ValueError(f"graph {slot} has {graph.node_features.shape[1]} features, "
                             f"graph 0 has {feature_dim}")
    n_pad, e_pad, g_pad = budget.max_nodes, budget.max_edges, budget.max_graphs
    node_counts = np.array([g.num_nodes for g in graphs], np.int64)
    edge_counts = np.array([g.num_edges for g in graphs], np.int64)
    node_offsets = np.cumsum(node_counts) - node_counts
    # One vectorised pass for the whole batch (a Python loop per graph was a third of the host
    # time of a MUTAG batch), written straight into the output arrays: fresh temporaries the size
    # of a batch of large graphs (10^5-10^6 edges) cost more in page faults than the loop did.
    senders = np.full((e_pad,), n_pad - 1, np.int32)
    receivers = np.full((e_pad,), n_pad - 1, np.int32)
    if num_edges:
        np.concatenate([g.edge_index[0] for g in graphs], out=senders[:num_edges],
                       casting="same_kind")
        np.concatenate([g.edge_index[1] for g in graphs], out=receivers[:num_edges],
                       casting="same_kind")
        # Valid local ids lie in [0, n) of their graph; checked before the offsets are added.
        limit = np.repeat(node_counts.astype(np.int32), edge_counts)
        bad = ((senders[:num_edges] < 0) | (receivers[:num_edges] < 0)
               | (senders[:num_edges] >= limit) | (receivers[:num_edges] >= limit))
        if bad.any():
            slot = int(np.searchsorted(np.cumsum(edge_counts), np.argmax(bad), side="right"))
            raise ValueError(f"graph {slot} has an edge to node {graphs[slot].edge_index.max()} "
                             f"but only {graphs[slot].num_nodes} nodes (edge ids must be 0-based "
                             "local ids)")
        offset = np.repeat(node_offsets.astype(np.int32), edge_counts)
        senders[:num_edges] += offset
        receivers[:num_edges] += offset

    node_features = np.zeros((n_pad, feature_dim), np.float32)
    np.concatenate([g.node_features for g in graphs], out=node_features[:num_nodes],
                   casting="same_kind")
    node_graph = np.full((n_pad,), g_pad - 1, np.int32)
    node_graph[:num_nodes] = np.repeat(np.arange(len(graphs), dtype=np.int32), node_counts)
    labels = np.full((g_pad,), -1, np.int32)
    labels[:len(graphs)] = [g.label for g in graphs]
    return GraphBatch(
        node_features=node_features, senders=senders, receivers=receivers, node_graph=node_graph,
        node_mask=np.arange(n_pad) < num_nodes, edge_mask=np.arange(e_pad) < num_edges,
        graph_mask=np.arange(g_pad) < len(graphs), labels=labels)
