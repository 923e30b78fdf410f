"""GraphCL graph augmentations (host-side NumPy, one graph at a time, reproducible from a Generator).

Four augmentations, and the GraphCL mixtures that pick ONE of them per graph, uniformly:
``random2`` = {drop_nodes, subgraph}, ``random3`` = {drop_nodes, perturb_edges, subgraph},
``random4`` = {drop_nodes, perturb_edges, subgraph, mask_attributes} (the reference's draw order).

Two modes:

``mode="proper"`` (default): what the names promise.
  - drop_nodes: removes ``int(ratio * n)`` random nodes (ratio 0.1) and their edges; survivors are
    renumbered in their original order.
  - subgraph: grows a connected set from a random start node by repeatedly adding a random node
    of the current frontier (the neighbours of EVERY node taken so far) until
    ``max(1, int(ratio * n))`` nodes are taken (ratio 0.2); if the start node's component is
    exhausted first, it jumps to a random node not yet taken. Keeps the induced subgraph only.
  - perturb_edges: removes ``m = int(ratio * #edges)`` random edges and adds ``m`` random
    non-edges of the original graph (ratio 0.1; no self-loops). Symmetric (undirected) edge lists
    are perturbed as undirected pairs, both directions together, and stay symmetric.
  - mask_attributes: ``int(ratio * n)`` random nodes (ratio 0.1) get all their features replaced
    by samples of N(0.5, 0.5^2), as the reference.

``mode="faithful"``: the reference code's `aug.py` behaviour (GraphCL's unsupervised TU code):
  - drop_nodes: ``int(ratio * n)`` nodes lose all their edges but STAY (node count unchanged);
  - subgraph: from a random start node, up to ``int(ratio * n)`` further nodes are drawn from the
    START node's out-neighbours only (the reference computes the union with the new node's
    neighbours and discards it, so the set never grows; at most n draws); edges leaving the kept
    set are removed, nodes stay;
  - perturb_edges: ``int(#edge entries / 10)`` directed edge entries removed, none added (the
    adding code is commented out in the reference); the reverse entry of an undirected edge
    usually survives;
  - mask_attributes: as in proper mode.
  The faithful pipeline around these (self-loops on view 1, removal of edgeless nodes from view 2)
  lives in `cldro_jax.data.graphs`.

Every function returns a new `Graph` and never an edge pointing at a missing node.
"""
from __future__ import annotations

import numpy as np

from cldro_jax.data.tu_dataset import Graph

MODES = ("proper", "faithful")
SINGLE_AUGMENTATIONS = ("drop_nodes", "subgraph", "perturb_edges", "mask_attributes")
# The reference draws n = randint(k) and maps 0, 1, 2, 3 to these, in this order.
MIXTURES = {
    "random2": ("drop_nodes", "subgraph"),
    "random3": ("drop_nodes", "perturb_edges", "subgraph"),
    "random4": ("drop_nodes", "perturb_edges", "subgraph", "mask_attributes"),
}
DEFAULT_RATIOS = {"drop_nodes": 0.1, "subgraph": 0.2, "perturb_edges": 0.1, "mask_attributes": 0.1}
# Enumerate all candidate pairs for edge addition below this many; rejection-sample above.
_ENUMERATE_PAIRS_LIMIT = 200_000


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"augmentation mode must be one of {MODES}, got {mode!r}")


def _keep_edges(graph: Graph, edge_keep: np.ndarray) -> Graph:
    return Graph(graph.node_features, graph.edge_index[:, edge_keep], graph.label)


def _dedupe_sorted(edge_index: np.ndarray) -> np.ndarray:
    """Unique edges sorted by (row, col): what the reference's ``adj.nonzero()`` round trip yields."""
    if edge_index.shape[1] == 0:
        return edge_index
    return np.unique(edge_index.T, axis=0).T


def induced_subgraph(graph: Graph, keep: np.ndarray) -> Graph:
    """The subgraph on the nodes where ``keep`` (bool, (n,)) is True, renumbered in order."""
    new_id = np.cumsum(keep) - 1
    src, dst = graph.edge_index
    edge_keep = keep[src] & keep[dst]
    edges = np.stack([new_id[src[edge_keep]], new_id[dst[edge_keep]]]).astype(np.int64)
    return Graph(graph.node_features[keep], edges.reshape(2, -1), graph.label)


def drop_nodes(graph: Graph, rng: np.random.Generator, *, ratio: float = 0.1,
               mode: str = "proper") -> Graph:
    """Drops ``int(ratio * n)`` random nodes: removed (proper) or only cut off (faithful)."""
    _check_mode(mode)
    n = graph.num_nodes
    dropped = np.zeros(n, bool)
    dropped[rng.choice(n, int(n * ratio), replace=False)] = True
    if mode == "proper":
        return induced_subgraph(graph, ~dropped)
    src, dst = graph.edge_index
    kept = _keep_edges(graph, ~dropped[src] & ~dropped[dst])
    return Graph(kept.node_features, _dedupe_sorted(kept.edge_index), graph.label)


def _undirected_neighbours(graph: Graph) -> list[np.ndarray]:
    n = graph.num_nodes
    src, dst = graph.edge_index
    both_src, both_dst = np.concatenate([src, dst]), np.concatenate([dst, src])
    order = np.argsort(both_src, kind="stable")
    bounds = np.searchsorted(both_src[order], np.arange(n + 1))
    targets = both_dst[order]
    return [targets[bounds[i]:bounds[i + 1]] for i in range(n)]


def subgraph(graph: Graph, rng: np.random.Generator, *, ratio: float = 0.2,
             mode: str = "proper") -> Graph:
    """Keeps a random connected ~``ratio`` share of the nodes (see the module docstring)."""
    _check_mode(mode)
    if mode == "faithful":
        return _subgraph_faithful(graph, rng, ratio)
    n = graph.num_nodes
    target = max(1, int(n * ratio))
    neighbours = _undirected_neighbours(graph)
    taken = np.zeros(n, bool)
    frontier = np.zeros(n, bool)

    def take(node: int) -> None:
        taken[node] = True
        frontier[neighbours[node]] = True
        frontier[taken] = False

    take(int(rng.integers(n)))
    for _ in range(target - 1):
        candidates = np.flatnonzero(frontier)
        if candidates.size == 0:  # component exhausted: continue from a fresh random node
            candidates = np.flatnonzero(~taken)
        take(int(rng.choice(candidates)))
    return induced_subgraph(graph, taken)


def _subgraph_faithful(graph: Graph, rng: np.random.Generator, ratio: float) -> Graph:
    n = graph.num_nodes
    limit = int(n * ratio)
    src, dst = graph.edge_index
    start = int(rng.integers(n))
    taken = [start]
    # Sorted so the draw does not depend on Python's set order; the set never grows (see module doc).
    start_neighbours = np.unique(dst[src == start])
    draws = 0
    while len(taken) <= limit:
        draws += 1
        if draws > n or start_neighbours.size == 0:
            break
        candidate = int(rng.choice(start_neighbours))
        if candidate not in taken:
            taken.append(candidate)
    keep = np.zeros(n, bool)
    keep[taken] = True
    kept = _keep_edges(graph, keep[src] & keep[dst])
    return Graph(kept.node_features, _dedupe_sorted(kept.edge_index), graph.label)


def _is_symmetric(edge_index: np.ndarray, n: int) -> bool:
    src, dst = edge_index
    forward = np.unique(src.astype(np.int64) * n + dst)
    backward = np.unique(dst.astype(np.int64) * n + src)
    return forward.shape == backward.shape and bool(np.all(forward == backward))


def _sample_non_edges(n: int, existing_keys: np.ndarray, count: int, undirected: bool,
                      rng: np.random.Generator) -> np.ndarray:
    """``count`` distinct pairs (u, v), u != v (u < v when undirected), whose key u*n+v is not in
    ``existing_keys``; fewer if the graph has fewer non-edges. Returns (2, count) int64."""
    if count <= 0:
        return np.zeros((2, 0), np.int64)
    total_pairs = n * (n - 1) // (2 if undirected else 1)
    if total_pairs <= _ENUMERATE_PAIRS_LIMIT:
        if undirected:
            u, v = np.triu_indices(n, k=1)
        else:
            u, v = np.nonzero(~np.eye(n, dtype=bool))
        free = ~np.isin(u.astype(np.int64) * n + v, existing_keys)
        u, v = u[free], v[free]
        pick = rng.choice(u.size, min(count, u.size), replace=False)
        return np.stack([u[pick], v[pick]]).astype(np.int64)
    # Large sparse graph: rejection sampling converges fast (almost every pair is a non-edge).
    chosen = np.zeros(0, np.int64)
    while chosen.size < count:
        u, v = rng.integers(n, size=(2, 2 * count))
        if undirected:
            u, v = np.minimum(u, v), np.maximum(u, v)
        keys = u.astype(np.int64) * n + v
        keys = keys[(u != v) & ~np.isin(keys, existing_keys) & ~np.isin(keys, chosen)]
        _, first = np.unique(keys, return_index=True)
        chosen = np.concatenate([chosen, keys[np.sort(first)]])
    chosen = chosen[:count]
    return np.stack([chosen // n, chosen % n]).astype(np.int64)


def perturb_edges(graph: Graph, rng: np.random.Generator, *, ratio: float = 0.1,
                  mode: str = "proper") -> Graph:
    """Removes (and in proper mode adds as many) ``int(ratio * #edges)`` random edges."""
    _check_mode(mode)
    n, edges = graph.num_nodes, graph.edge_index
    num_entries = edges.shape[1]
    if mode == "faithful":
        # The reference: int(E / 10) entries removed regardless of any ratio argument.
        keep = np.sort(rng.choice(num_entries, num_entries - int(num_entries / 10), replace=False))
        return Graph(graph.node_features, edges[:, keep], graph.label)
    undirected = _is_symmetric(edges, n)
    src, dst = edges
    non_loop = src != dst
    if undirected:  # operate on unordered pairs {u, v}, u < v
        pairs = np.unique(np.stack([src[non_loop & (src < dst)], dst[non_loop & (src < dst)]]), axis=1)
    else:
        pairs = np.unique(edges[:, non_loop], axis=1)
    loops = edges[:, ~non_loop]
    num_changed = int(pairs.shape[1] * ratio)
    removed = np.zeros(pairs.shape[1], bool)
    removed[rng.choice(pairs.shape[1], num_changed, replace=False)] = True
    added = _sample_non_edges(n, pairs[0] * n + pairs[1], num_changed, undirected, rng)
    new_pairs = np.concatenate([pairs[:, ~removed], added], axis=1)
    if undirected:
        new_pairs = np.concatenate([new_pairs, new_pairs[::-1]], axis=1)
    new_edges = np.concatenate([new_pairs, loops], axis=1).astype(np.int64)
    return Graph(graph.node_features, _dedupe_sorted(new_edges), graph.label)


def mask_attributes(graph: Graph, rng: np.random.Generator, *, ratio: float = 0.1,
                    mode: str = "proper") -> Graph:
    """Replaces the features of ``int(ratio * n)`` random nodes by N(0.5, 0.5^2) samples."""
    _check_mode(mode)
    n, feature_dim = graph.node_features.shape
    masked = rng.choice(n, int(n * ratio), replace=False)
    features = graph.node_features.copy()
    features[masked] = rng.normal(0.5, 0.5, size=(masked.size, feature_dim)).astype(np.float32)
    return Graph(features, graph.edge_index, graph.label)


_FUNCTIONS = {"drop_nodes": drop_nodes, "subgraph": subgraph, "perturb_edges": perturb_edges,
              "mask_attributes": mask_attributes}


def augment_graph(graph: Graph, name: str, rng: np.random.Generator, *, mode: str = "proper",
                  ratios: dict[str, float] | None = None) -> Graph:
    """Applies augmentation ``name`` to one graph.

    Args:
      graph: the graph.
      name: one of SINGLE_AUGMENTATIONS, a mixture ("random2", "random3", "random4": one of its
        members drawn uniformly for this graph) or "none" (the graph itself).
      rng: NumPy Generator (the same state gives the same output).
      mode: "proper" or "faithful" (module docstring).
      ratios: overrides of DEFAULT_RATIOS (faithful perturb_edges always uses 1/10, as the reference).
    """
    _check_mode(mode)
    if name == "none":
        return graph
    if name in MIXTURES:
        members = MIXTURES[name]
        name = members[int(rng.integers(len(members)))]
    if name not in _FUNCTIONS:
        raise ValueError(f"unknown augmentation {name!r}; use one of {SINGLE_AUGMENTATIONS}, "
                         f"{tuple(MIXTURES)} or 'none'")
    ratio = {**DEFAULT_RATIOS, **(ratios or {})}[name]
    return _FUNCTIONS[name](graph, rng, ratio=ratio, mode=mode)
