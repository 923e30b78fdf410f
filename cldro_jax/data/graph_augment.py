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
# Edge addition picks among all non-edges by rank below this many candidate pairs (exactly
# uniform whatever the density) and rejection-samples above (large graphs are sparse).
_ENUMERATE_PAIRS_LIMIT = 200_000


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"augmentation mode must be one of {MODES}, got {mode!r}")


def _keep_edges(graph: Graph, edge_keep: np.ndarray) -> Graph:
    return Graph(graph.node_features, graph.edge_index[:, edge_keep], graph.label)


def _edge_keys(edge_index: np.ndarray, n: int) -> np.ndarray:
    """One int64 key per edge, ``src * n + dst``: sorting keys sorts edges by (row, col)."""
    return edge_index[0].astype(np.int64) * n + edge_index[1]


def _unique(keys: np.ndarray) -> np.ndarray:
    """``np.unique(keys)`` for a 1-D integer array. Sort-and-compare: NumPy 2's hash-based unique
    is about three times slower on the few thousand keys of one graph, and these run per graph
    per step on the host."""
    keys = np.sort(keys)
    first = np.empty(keys.size, bool)
    first[:1] = True
    np.not_equal(keys[1:], keys[:-1], out=first[1:])
    return keys[first]


def _dedupe_sorted(edge_index: np.ndarray, n: int) -> np.ndarray:
    """Unique edges sorted by (row, col): what the reference's ``adj.nonzero()`` round trip yields.
    (Scalar keys rather than ``np.unique(axis=1)``, which sorts structured records, far slower.)"""
    if edge_index.shape[1] == 0:
        return edge_index
    keys = _unique(_edge_keys(edge_index, n))
    return np.stack([keys // n, keys % n])


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
    return Graph(kept.node_features, _dedupe_sorted(kept.edge_index, n), graph.label)


def _undirected_adjacency(graph: Graph) -> tuple[np.ndarray, np.ndarray]:
    """CSR form of the undirected adjacency: node i's neighbours are
    ``targets[bounds[i]:bounds[i + 1]]`` (duplicates kept)."""
    n = graph.num_nodes
    src, dst = graph.edge_index
    both_src, both_dst = np.concatenate([src, dst]), np.concatenate([dst, src])
    order = np.argsort(both_src, kind="stable")
    bounds = np.searchsorted(both_src[order], np.arange(n + 1))
    return both_dst[order], bounds


def subgraph(graph: Graph, rng: np.random.Generator, *, ratio: float = 0.2,
             mode: str = "proper") -> Graph:
    """Keeps a random connected ~``ratio`` share of the nodes (see the module docstring)."""
    _check_mode(mode)
    if mode == "faithful":
        return _subgraph_faithful(graph, rng, ratio)
    n = graph.num_nodes
    target = max(1, int(n * ratio))
    targets, bounds = _undirected_adjacency(graph)
    taken = np.zeros(n, bool)
    frontier = np.zeros(n, bool)     # neighbours of taken nodes that are not taken themselves

    def take(node: int) -> None:
        taken[node] = True
        frontier[node] = False
        neighbours = targets[bounds[node]:bounds[node + 1]]
        frontier[neighbours[~taken[neighbours]]] = True

    # `candidates[rng.integers(size)]` draws exactly what `rng.choice(candidates)` draws, without
    # choice's overhead (this loop runs once per kept node).
    take(int(rng.integers(n)))
    for _ in range(target - 1):
        candidates = np.flatnonzero(frontier)
        if candidates.size == 0:  # component exhausted: continue from a fresh random node
            candidates = np.flatnonzero(~taken)
        take(int(candidates[rng.integers(candidates.size)]))
    return induced_subgraph(graph, taken)


def _subgraph_faithful(graph: Graph, rng: np.random.Generator, ratio: float) -> Graph:
    n = graph.num_nodes
    limit = int(n * ratio)
    src, dst = graph.edge_index
    start = int(rng.integers(n))
    # Sorted so the draw does not depend on Python's set order; the set never grows (see module doc).
    start_neighbours = _unique(dst[src == start])
    keep = np.zeros(n, bool)
    keep[start] = True
    if limit >= 1 and start_neighbours.size:
        # The reference's loop draws a start neighbour, adds it if new, and stops once the set
        # holds limit + 1 nodes or after n draws. All n draws at once (the same values as n single
        # draws from this Generator), then the first `limit` new nodes in draw order: the same set.
        draws = start_neighbours[rng.integers(start_neighbours.size, size=n)]
        values, first_draw = np.unique(draws, return_index=True)
        is_new = values != start
        added = values[is_new][np.argsort(first_draw[is_new])][:limit]
        keep[added] = True
    kept = _keep_edges(graph, keep[src] & keep[dst])
    return Graph(kept.node_features, _dedupe_sorted(kept.edge_index, n), graph.label)


def _is_symmetric(edge_index: np.ndarray, n: int) -> bool:
    src, dst = edge_index
    forward = _unique(src.astype(np.int64) * n + dst)
    backward = _unique(dst.astype(np.int64) * n + src)
    return forward.shape == backward.shape and bool(np.all(forward == backward))


def _pair_rank(u: np.ndarray, v: np.ndarray, n: int, undirected: bool) -> np.ndarray:
    """Position of pair (u, v) in the row-major list of all candidate pairs: u < v
    (``np.triu_indices(n, 1)``) when undirected, u != v otherwise."""
    u, v = u.astype(np.int64), v.astype(np.int64)
    if undirected:
        return u * n - u * (u + 1) // 2 + (v - u - 1)
    return u * (n - 1) + v - (v > u)


def _pair_at_rank(rank: np.ndarray, n: int, undirected: bool) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of `_pair_rank`."""
    if undirected:
        rows = np.arange(n, dtype=np.int64)
        row_start = rows * n - rows * (rows + 1) // 2
        u = np.searchsorted(row_start, rank, side="right") - 1
        return u, rank - row_start[u] + u + 1
    u, column = rank // (n - 1), rank % (n - 1)
    return u, column + (column >= u)


def _sample_non_edges(n: int, existing_keys: np.ndarray, count: int, undirected: bool,
                      rng: np.random.Generator) -> np.ndarray:
    """``count`` distinct pairs (u, v), u != v (u < v when undirected), whose key u*n+v is not in
    ``existing_keys`` (distinct keys of such pairs); fewer if the graph has fewer non-edges.
    Returns (2, count) int64."""
    if count <= 0:
        return np.zeros((2, 0), np.int64)
    total_pairs = n * (n - 1) // (2 if undirected else 1)
    # Rejection sampling only where almost every pair is free: on a dense graph with fewer free
    # pairs than `count` it would never finish.
    if total_pairs <= _ENUMERATE_PAIRS_LIMIT or 2 * existing_keys.size > total_pairs:
        # Uniform without replacement over the list of non-edges in row-major order. The list is
        # not built: the k-th non-edge's rank is k plus the number of edges ranked before it
        # (a search over `edge_rank - i`), so the cost follows the edges, not n^2 pairs.
        edge_rank = np.sort(_pair_rank(existing_keys // n, existing_keys % n, n, undirected))
        num_free = total_pairs - edge_rank.size
        pick = rng.choice(num_free, min(count, num_free), replace=False).astype(np.int64)
        if pick.size == 0:
            return np.zeros((2, 0), np.int64)
        rank = pick + np.searchsorted(edge_rank - np.arange(edge_rank.size), pick, side="right")
        return np.stack(_pair_at_rank(rank, n, undirected)).astype(np.int64)
    # Large sparse graph: rejection sampling converges fast (most pairs are non-edges).
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
    # Unique (u, v) pairs in (u, v) order; unordered pairs {u, v} as u < v when undirected.
    pair_keys = _unique(_edge_keys(edges[:, non_loop & (src < dst)] if undirected
                                     else edges[:, non_loop], n))
    pairs = np.stack([pair_keys // n, pair_keys % n])
    loops = edges[:, ~non_loop]
    num_changed = int(pairs.shape[1] * ratio)
    removed = np.zeros(pairs.shape[1], bool)
    removed[rng.choice(pairs.shape[1], num_changed, replace=False)] = True
    added = _sample_non_edges(n, pair_keys, num_changed, undirected, rng)
    new_pairs = np.concatenate([pairs[:, ~removed], added], axis=1)
    if undirected:
        new_pairs = np.concatenate([new_pairs, new_pairs[::-1]], axis=1)
    new_edges = np.concatenate([new_pairs, loops], axis=1).astype(np.int64)
    return Graph(graph.node_features, _dedupe_sorted(new_edges, n), graph.label)


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
