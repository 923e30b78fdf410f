"""TU reader: real MUTAG/Cuneiform (bundled with grakel), fixtures in the TU format, corrupt files,
download/extraction and the offline failure."""
import concurrent.futures
import pathlib
import time
import unittest.mock
import zipfile

import numpy as np
import pytest

from cldro_jax.data import tu_dataset
from cldro_jax.data.tu_dataset import (download_tu_dataset, grakel_tu_directory, load_tu_dataset,
                                       read_tu_directory)


# ---------------------------------------------------------------------------------------------
# Real data: MUTAG and Cuneiform as shipped in grakel
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mutag():
    return load_tu_dataset("MUTAG", source="grakel")


def test_mutag_known_statistics(mutag):
    assert len(mutag) == 188
    assert mutag.num_nodes == 3371 == sum(g.num_nodes for g in mutag.graphs)
    assert mutag.num_edge_lines == 7442
    # MUTAG has neither self-loops nor duplicate lines, so every line survives as an edge.
    assert sum(g.num_edges for g in mutag.graphs) == 7442
    assert list(mutag.label_values) == [-1, 1]
    assert np.bincount(mutag.labels).tolist() == [63, 125]  # label -1 -> class 0, 1 -> class 1
    assert mutag.num_classes == 2
    assert mutag.feature_kind == "node_labels" and mutag.num_features == 7


def test_mutag_matches_independent_loadtxt_transcription(mutag):
    """Graph sizes, edges and one-hot features against a plain np.loadtxt reading of the files."""
    directory = grakel_tu_directory("MUTAG")
    edges = np.loadtxt(directory / "MUTAG_A.txt", delimiter=",", dtype=np.int64) - 1
    indicator = np.loadtxt(directory / "MUTAG_graph_indicator.txt", dtype=np.int64) - 1
    node_labels = np.loadtxt(directory / "MUTAG_node_labels.txt", dtype=np.int64)
    sizes = np.bincount(indicator)
    assert [g.num_nodes for g in mutag.graphs] == sizes.tolist()
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    for g in (0, 57, 187):
        in_graph = indicator[edges[:, 0]] == g
        expected = {tuple(e) for e in (edges[in_graph] - offsets[g]).tolist()}
        assert {tuple(e) for e in mutag.graphs[g].edge_index.T.tolist()} == expected
        feats = mutag.graphs[g].node_features
        np.testing.assert_array_equal(feats.sum(1), 1.0)
        np.testing.assert_array_equal(feats.argmax(1), node_labels[offsets[g]:offsets[g + 1]])


def test_auto_source_falls_back_to_grakel_for_mutag(tmp_path):
    data = load_tu_dataset("MUTAG", root=tmp_path, download=False)
    assert len(data) == 188 and "grakel" in str(data.source_dir)


def test_cuneiform_multi_column_node_labels_and_attributes():
    """Cuneiform (real, in grakel) has 2 node-label columns and 3 attribute columns."""
    directory = grakel_tu_directory("Cuneiform")
    labels = np.loadtxt(directory / "Cuneiform_node_labels.txt", delimiter=",", dtype=np.int64)
    attributes = np.loadtxt(directory / "Cuneiform_node_attributes.txt", delimiter=",")
    widths = (labels.max(0) - labels.min(0) + 1).tolist()
    data = load_tu_dataset("Cuneiform", source="grakel")
    assert (len(data), data.num_nodes, data.num_edge_lines, data.num_classes) == (267, 5680, 23922, 30)
    assert data.num_features == sum(widths) and data.feature_kind == "node_labels"
    with_attributes = load_tu_dataset("Cuneiform", source="grakel", use_node_attributes=True)
    assert with_attributes.feature_kind == "node_attributes+node_labels"
    x = np.concatenate([g.node_features for g in with_attributes.graphs])
    np.testing.assert_allclose(x[:, :3], attributes, rtol=1e-6)
    first_block = x[:, 3:3 + widths[0]]
    np.testing.assert_array_equal(first_block.argmax(1), labels[:, 0] - labels[:, 0].min())
    np.testing.assert_array_equal(x[:, 3:].sum(1), 2.0)  # one hot per label column


# ---------------------------------------------------------------------------------------------
# Fixtures written in the TU format
# ---------------------------------------------------------------------------------------------
def write_tu(directory: pathlib.Path, name: str, parts: dict[str, list[str]]) -> pathlib.Path:
    directory.mkdir(parents=True, exist_ok=True)
    for part, lines in parts.items():
        (directory / f"{name}_{part}.txt").write_text("\n".join(lines) + "\n")
    return directory


# Three graphs: graph 1 = nodes 1-3 (triangle, plus a self-loop and a duplicate line),
# graph 2 = nodes 4-5 (one edge), graph 3 = nodes 6-7 (no edges).
BASE = {
    "A": ["1, 2", "2, 1", "2, 3", "3, 2", "1, 3", "3, 1", "2, 2", "1, 2", "4, 5", "5, 4"],
    "graph_indicator": ["1", "1", "1", "2", "2", "3", "3"],
    "graph_labels": ["7", "3", "7"],
}


def test_fixture_with_node_attributes_and_labels(tmp_path):
    parts = dict(BASE)
    parts["node_labels"] = ["2", "4", "2", "3", "2", "2", "5"]  # min 2 -> one-hot over 0..3
    parts["node_attributes"] = ["0.5, 1.5", "1, 2", "-1, 0", "3, 3", "4, 4", "5, 5", "6, 6.25"]
    parts["edge_labels"] = ["0"] * len(BASE["A"])
    write_tu(tmp_path / "TOY", "TOY", parts)
    data = load_tu_dataset("TOY", root=tmp_path, source="local", use_node_attributes=True)
    assert (len(data), data.num_nodes, data.num_edge_lines) == (3, 7, 10)
    assert (data.num_self_loops_removed, data.num_duplicate_edges_removed) == (1, 1)
    assert data.labels.tolist() == [1, 0, 1] and data.label_values.tolist() == [3, 7]
    g0, g1, g2 = data.graphs
    assert g0.edge_index.T.tolist() == [[0, 1], [0, 2], [1, 0], [1, 2], [2, 0], [2, 1]]
    assert g1.edge_index.T.tolist() == [[0, 1], [1, 0]]
    assert g2.num_nodes == 2 and g2.num_edges == 0
    np.testing.assert_allclose(g0.node_features, [[0.5, 1.5, 1, 0, 0, 0],
                                                  [1.0, 2.0, 0, 0, 1, 0],
                                                  [-1.0, 0.0, 1, 0, 0, 0]])
    np.testing.assert_allclose(g2.node_features[1], [6, 6.25, 0, 0, 0, 1])
    without = load_tu_dataset("TOY", root=tmp_path, source="local")  # the reference's default
    assert without.num_features == 4 and without.feature_kind == "node_labels"


def test_fixture_without_node_features_gets_constant_features(tmp_path):
    write_tu(tmp_path / "PLAIN" / "PLAIN", "PLAIN", BASE)  # the official zip's nested layout
    data = load_tu_dataset("PLAIN", root=tmp_path, source="local")
    assert data.feature_kind == "constant" and data.num_features == 1
    for graph in data.graphs:
        np.testing.assert_array_equal(graph.node_features, np.ones((graph.num_nodes, 1)))
    forced = load_tu_dataset("MUTAG", source="grakel", node_features="constant")
    assert forced.num_features == 1 and forced.feature_kind == "constant"


@pytest.mark.parametrize("edit, message", [
    # indicator shorter than the node-label file
    ({"graph_indicator": ["1", "1", "1", "2", "2", "3"], "node_labels": ["0"] * 7},
     "has 7 lines but BAD_graph_indicator.txt has 6 nodes"),
    ({"A": BASE["A"] + ["7, 8"]}, "line 11"),                                     # edge past nodes
    ({"A": BASE["A"] + ["3, 4"]}, "different graphs"),
    ({"A": BASE["A"][:-1] + ["5"]}, "malformed.*ragged"),
    ({"graph_indicator": ["1", "1", "2", "1", "2", "3", "3"]}, "not sorted"),
    ({"graph_indicator": ["1", "1", "1", "2", "2", "4", "4"]}, "graph ids"),
    ({"graph_labels": ["7", "3", "7", "1"]}, "graph 4 has no nodes"),
    ({"node_labels": ["1"] * 6}, "6 lines"),
    ({"edge_labels": ["0"] * 9}, "must match"),
    ({"graph_labels": ["7", "x", "7"]}, "malformed"),
    # the line an editor shows (numpy's "row 2" skips the blank line and counts from 0)
    ({"graph_labels": ["7", "", "3", "7.5"]}, r"graph_labels.txt: malformed at line 4 \('7.5'\)"),
    ({"node_labels": ["0"] * 6 + ["0, 1"]}, r"line 7 \(2 values where the lines before have 1\)"),
])
def test_corrupt_files_raise_clear_errors(tmp_path, edit, message):
    write_tu(tmp_path / "BAD", "BAD", {**BASE, **edit})
    with pytest.raises(ValueError, match=message):
        read_tu_directory(tmp_path / "BAD", "BAD")


@pytest.mark.parametrize("bad", ["nan, 1", "1, inf", "1e40, 1"])  # 1e40 overflows float32
def test_node_attributes_that_are_not_finite_are_refused(tmp_path, bad):
    # They were read as NaN/inf features: every embedding and loss of that graph became NaN.
    write_tu(tmp_path / "NAN", "NAN", {**BASE, "node_attributes": ["1, 2"] * 6 + [bad]})
    with pytest.raises(ValueError, match=r"NAN_node_attributes.txt: node 7 .*use_node_attributes"):
        read_tu_directory(tmp_path / "NAN", "NAN", use_node_attributes=True)
    assert read_tu_directory(tmp_path / "NAN", "NAN").feature_kind == "constant"  # unused: fine


def test_wide_node_label_range_is_one_hot_encoded_without_a_square_matrix(tmp_path):
    # Rows of np.eye(100001) needed 37 GiB (MemoryError) for a 7 x 100001 result.
    write_tu(tmp_path / "WIDE", "WIDE", {**BASE, "node_labels": ["0"] * 6 + ["100000"]})
    wide = read_tu_directory(tmp_path / "WIDE", "WIDE")
    x = np.concatenate([g.node_features for g in wide.graphs])
    assert x.shape == (7, 100001)
    np.testing.assert_array_equal(x.argmax(1), [0] * 6 + [100000])
    np.testing.assert_array_equal(x.sum(1), 1.0)
    # Labels no category id can have (an id or measurement column) get a clear error instead.
    write_tu(tmp_path / "IDS", "IDS", {**BASE, "node_labels": ["0"] * 6 + ["1000000000000"]})
    with pytest.raises(ValueError, match=r"IDS_node_labels.txt: column 1 holds node labels "
                                         r"0..1000000000000.*node_features='constant'"):
        read_tu_directory(tmp_path / "IDS", "IDS")
    assert read_tu_directory(tmp_path / "IDS", "IDS", node_features="constant").num_features == 1


def test_missing_files_name_the_layout_and_the_command(tmp_path):
    write_tu(tmp_path / "HALF", "HALF", {"A": BASE["A"]})
    with pytest.raises(FileNotFoundError, match=r"HALF_graph_indicator.txt.*curl -LO"):
        read_tu_directory(tmp_path / "HALF", "HALF")
    with pytest.raises(FileNotFoundError, match=r"NOPE/NOPE_A.txt.*curl -LO .*NOPE.zip"):
        load_tu_dataset("NOPE", root=tmp_path, source="local")
    with pytest.raises(ValueError, match="source must be"):
        load_tu_dataset("MUTAG", source="hub")


# ---------------------------------------------------------------------------------------------
# Download (real code path against a local file:// URL) and the offline failure
# ---------------------------------------------------------------------------------------------
def test_download_extracts_official_archive_layout(tmp_path):
    files = write_tu(tmp_path / "src" / "ZIPPED", "ZIPPED", BASE)
    server = tmp_path / "server"
    server.mkdir()
    with zipfile.ZipFile(server / "ZIPPED.zip", "w") as zf:  # the official zips hold NAME/NAME_*.txt
        for path in files.iterdir():
            zf.write(path, f"ZIPPED/{path.name}")
    cache = tmp_path / "cache"
    target = download_tu_dataset("ZIPPED", cache, base_url=server.as_uri())
    assert target == cache / "ZIPPED" and (target / "ZIPPED_A.txt").is_file()
    data = load_tu_dataset("ZIPPED", root=cache, source="local")
    assert len(data) == 3 and data.num_edge_lines == 10

    (server / "BROKEN.zip").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="not a valid zip"):
        download_tu_dataset("BROKEN", cache, base_url=server.as_uri())


def _load(args):
    name, cache, base_url = args
    data = load_tu_dataset(name, root=cache, source="auto", base_url=base_url)
    return len(data), data.num_edge_lines


def test_processes_starting_together_download_once_and_all_read_it(tmp_path):
    # The processes of one job share the cache: without the lock each deleted and replaced the
    # folder another was reading (FileNotFoundError on some of them). Threads here: flock
    # excludes separate opens of the lock file as it excludes separate processes.
    files = write_tu(tmp_path / "src" / "TOGETHER", "TOGETHER", BASE)
    server = tmp_path / "server"
    server.mkdir()
    with zipfile.ZipFile(server / "TOGETHER.zip", "w") as zf:
        for path in files.iterdir():
            zf.write(path, f"TOGETHER/{path.name}")
    cache = tmp_path / "cache"
    fetched = []
    original = tu_dataset.download_tu_dataset

    def counting_download(*args, **kwargs):
        fetched.append(args[0])
        return original(*args, **kwargs)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        with unittest.mock.patch.object(tu_dataset, "download_tu_dataset", counting_download):
            results = list(pool.map(_load,
                                    [("TOGETHER", cache, server.as_uri())] * 8))
    assert results == [(3, 10)] * 8
    assert fetched == ["TOGETHER"]          # one download; the others read its copy


def test_download_fails_fast_and_clearly_offline(tmp_path):
    # Port 9 (discard) on localhost is closed: the same failure path as no internet, but instant.
    start = time.monotonic()
    with pytest.raises(ConnectionError, match=r"NCI1/NCI1_A.txt.*curl -LO http://127.0.0.1:9/NCI1.zip"):
        download_tu_dataset("NCI1", tmp_path, base_url="http://127.0.0.1:9", timeout_s=3)
    assert time.monotonic() - start < 10
    assert not (tmp_path / "NCI1").exists()


def test_a_name_the_server_does_not_have_is_reported_as_a_name_problem(tmp_path):
    # A real HTTP server (the download code path of TU Dortmund's) answering 404 for a misspelled
    # name: the error says to check the name, not to go offline.
    import functools  # pylint: disable=import-outside-toplevel
    import http.server  # pylint: disable=import-outside-toplevel
    import threading  # pylint: disable=import-outside-toplevel
    (tmp_path / "www").mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler,
                                directory=str(tmp_path / "www"))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(ValueError,
                           match=r"does not exist \(404\): is 'nci1' a TU dataset name"):
            download_tu_dataset("nci1", tmp_path / "cache", timeout_s=5,
                                base_url=f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()
