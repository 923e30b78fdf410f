"""Graph track input pipeline: TU dataset -> (view 1, view 2) padded batches for a jit step.

The trainer's entry points:

    dataset = load_tu_dataset("MUTAG")                       # tu_dataset.py
    budget = view_budget(dataset.graphs, batch_size=128, mode="proper")
    for view1, view2 in epoch_view_batches(dataset.graphs, batch_size=128, seed=0, epoch=e,
                                           aug="random2", mode="proper", budget=budget):
        ...  # GIN on both (train=True); loss valid = view1.graph_mask
    for batch in eval_batches(dataset.graphs, batch_size=128, budget=budget, mode="proper"):
        ...  # GIN (train=False) embeddings of the ORIGINAL graphs for the SVM evaluation

View 1 is the original graph, view 2 an augmentation of it (GraphCL's unsupervised TU setting);
both views of a graph sit in the same graph slot, so the loss pairs slot i with slot i. Every batch
has the same static shapes (``budget``), so the train step compiles once.

``mode="proper"`` uses the graphs as read and the proper augmentations. ``mode="faithful"``
reproduces the reference training loop (GraphCL/ADNCE `gsimclr*.py` + `aug.py`) end to end:
  1. every graph gets self-loops on local nodes ``0 .. max_edge_id - 1`` (the reference's
     ``range(edge_index.max())``: the highest-numbered node of an edge gets none; in GIN a
     self-loop adds the node's own state once more), and this is view 1, for training AND for
     the evaluation embeddings;
  2. view 2 = the faithful augmentation of that graph (node count unchanged);
  3. then (for drop_nodes, subgraph and the random2/3/4 mixtures), every node of view 2 that touches no edge (self-loops included)
     is removed and all self-loops are stripped. So in the reference, nodes dropped by
     drop_nodes / left out by subgraph do NOT stay in view 2: they lose their self-loop with
     their other edges and step 3 removes them;
  4. the dataset is shuffled once and every epoch visits it in that order (the reference's
     non-shuffling DataLoader; `tasks/graph.py` asks `epoch_order` for epoch 0 every epoch).
Augmentations are drawn from ``np.random.default_rng((seed, graph_index))``: reproducible, and the
same for a graph whatever batch it lands in; pass a different seed per epoch.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from cldro_jax.data.graph_augment import MIXTURES, MODES, augment_graph
from cldro_jax.data.graph_batch import GraphBatch, GraphBudget, budget_for_graphs, pack_graphs
from cldro_jax.data.tu_dataset import Graph, TUDataset, load_tu_dataset, read_tu_directory

__all__ = [
    "Graph", "GraphBatch", "GraphBudget", "TUDataset", "load_tu_dataset", "read_tu_directory",
    "budget_for_graphs", "pack_graphs", "view_one",
    "add_reference_self_loops", "remove_edgeless_nodes_and_self_loops", "make_views",
    "view_budget", "make_view_batches", "epoch_order", "epoch_augment_seed", "epoch_view_batches",
    "eval_batches",
]

# The reference loop cleans view 2 only for these `--aug` values (dnodes, subgraph, random2-4).
_REFERENCE_CLEANED_AUGMENTATIONS = ("drop_nodes", "subgraph", *MIXTURES)


def add_reference_self_loops(graph: Graph) -> Graph:
    """Appends self-loops (i, i) for i in 0..max(edge_index)-1, exactly as the reference's
    ``TUDataset_aug.get`` does (no loops on a graph without edges)."""
    if graph.num_edges == 0:
        return graph
    loops = np.arange(int(graph.edge_index.max()), dtype=np.int64)
    edges = np.concatenate([graph.edge_index, np.stack([loops, loops])], axis=1)
    return Graph(graph.node_features, edges, graph.label)


def remove_edgeless_nodes_and_self_loops(graph: Graph) -> Graph:
    """The reference training loop's clean-up of view 2: nodes that touch no edge (self-loops
    count) are removed, remaining nodes renumbered in order, then self-loops stripped."""
    touched = np.zeros(graph.num_nodes, bool)
    touched[graph.edge_index.ravel()] = True
    new_id = np.cumsum(touched) - 1
    src, dst = graph.edge_index
    not_loop = src != dst
    edges = np.stack([new_id[src[not_loop]], new_id[dst[not_loop]]]).astype(np.int64)
    return Graph(graph.node_features[touched], edges.reshape(2, -1), graph.label)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def view_one(graph: Graph, mode: str) -> Graph:
    """The unaugmented view the encoder sees (training view 1 and evaluation input)."""
    _check_mode(mode)
    return add_reference_self_loops(graph) if mode == "faithful" else graph


def make_views(graph: Graph, aug: str, rng: np.random.Generator, mode: str = "proper",
               ratios: dict[str, float] | None = None) -> tuple[Graph, Graph]:
    """(view 1, view 2) of one graph; see the module docstring for the faithful pipeline."""
    first = view_one(graph, mode)
    second = augment_graph(first, aug, rng, mode=mode, ratios=ratios)
    if mode == "faithful" and aug in _REFERENCE_CLEANED_AUGMENTATIONS:
        second = remove_edgeless_nodes_and_self_loops(second)
    return first, second


def view_budget(graphs: Sequence[Graph], batch_size: int, mode: str = "proper", *,
                quantile: float | None = None, round_to: int = 8) -> GraphBudget:
    """A budget that fits view 1 and view 2 batches of ``graphs`` (and evaluation batches).

    Augmentations never add nodes and never add edges beyond the view-1 count (proper edge
    perturbation adds exactly as many as it removes), so the view-1 graphs bound both views.
    """
    return budget_for_graphs([view_one(g, mode) for g in graphs], batch_size, quantile=quantile,
                             round_to=round_to)


def make_view_batches(graphs: Sequence[Graph], indices: Sequence[int], *, seed: int, aug: str,
                      mode: str, budget: GraphBudget,
                      ratios: dict[str, float] | None = None) -> tuple[GraphBatch, GraphBatch]:
    """Two padded batches (view 1, view 2) of the graphs ``graphs[i] for i in indices``.

    Slot k of both batches holds the two views of ``graphs[indices[k]]``; slots past
    ``len(indices)`` are padding (graph_mask False, which is the loss's ``valid``).
    """
    firsts, seconds = [], []
    for index in indices:
        rng = np.random.default_rng((int(seed), int(index)))
        first, second = make_views(graphs[int(index)], aug, rng, mode, ratios)
        firsts.append(first)
        seconds.append(second)
    return pack_graphs(firsts, budget), pack_graphs(seconds, budget)


def epoch_order(num_graphs: int, *, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The order in which epoch ``epoch`` visits the graphs: a permutation drawn from
    ``(seed, epoch)``, or dataset order without ``shuffle``. A pure function of its arguments, so
    a resumed run (or a per-device packer) can find any step's graphs without replaying."""
    if not shuffle:
        return np.arange(num_graphs)
    return np.random.default_rng((int(seed), int(epoch), 0)).permutation(num_graphs)


def epoch_augment_seed(seed: int, epoch: int) -> int:
    """The augmentation seed of epoch ``epoch`` (pass it to `make_view_batches`): one per epoch,
    so a graph's views change from epoch to epoch but not with the batch it lands in."""
    return int(np.random.default_rng((int(seed), int(epoch), 1)).integers(2**31))


def epoch_view_batches(graphs: Sequence[Graph], *, batch_size: int, seed: int, epoch: int,
                       aug: str, mode: str, budget: GraphBudget, shuffle: bool = True,
                       drop_remainder: bool = False,
                       ratios: dict[str, float] | None = None
                       ) -> Iterator[tuple[GraphBatch, GraphBatch]]:
    """One epoch of (view 1, view 2) batches; order and augmentations derive from (seed, epoch).

    The last partial batch is padded (its missing slots are masked) unless ``drop_remainder``.
    """
    order = epoch_order(len(graphs), seed=seed, epoch=epoch, shuffle=shuffle)
    stop = len(order) - (len(order) % batch_size if drop_remainder else 0)
    augment_seed = epoch_augment_seed(seed, epoch)
    for start in range(0, stop, batch_size):
        yield make_view_batches(graphs, order[start:start + batch_size], seed=augment_seed,
                                aug=aug, mode=mode, budget=budget, ratios=ratios)


def eval_batches(graphs: Sequence[Graph], *, batch_size: int, budget: GraphBudget,
                 mode: str = "proper") -> Iterator[GraphBatch]:
    """The original graphs (view 1 of ``mode``) in dataset order, in padded batches; every graph
    appears exactly once (``graph_mask`` marks the real slots of the last batch)."""
    for start in range(0, len(graphs), batch_size):
        yield pack_graphs([view_one(g, mode) for g in graphs[start:start + batch_size]], budget)
