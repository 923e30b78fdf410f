"""Image sources on real files in their real formats: IDX, the shipped subset, tfds array_record,
image folders, npz, scikit-learn digits."""

import gzip
import hashlib
import importlib.util
import io
import json
import os
import socket
import struct
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from cldro_jax.data import images

FMNIST_DIR = images.DEFAULT_FASHION_MNIST_DIR
needs_debian_fmnist = pytest.mark.skipif(
    not os.path.isfile(os.path.join(FMNIST_DIR, "train-images-idx3-ubyte.gz")),
    reason="needs `sudo apt-get install dataset-fashion-mnist`",
)


def cfg(**fields):
    config = images.default_data_config()
    config.update(fields)
    return config


def write_idx(path, array, *, type_code=0x08, compress=False):
    """An IDX file written from the format description (independent of the reader)."""
    big_endian = {0x08: ">u1", 0x0C: ">i4", 0x0D: ">f4"}[type_code]
    header = bytes([0, 0, type_code, array.ndim]) + b"".join(struct.pack(">I", d)
                                                             for d in array.shape)
    raw = header + np.ascontiguousarray(array, dtype=big_endian).tobytes()
    with (gzip.open if compress else open)(path, "wb") as f:
        f.write(raw)
    return raw


# ------------------------------------------------------------------------------------------
# IDX reader and the full Fashion-MNIST


@pytest.fixture(scope="module")
def fmnist():
    return images.load_fashion_mnist_arrays()


@needs_debian_fmnist
def test_full_fashion_mnist_matches_known_facts(fmnist):
    assert fmnist["x_train"].shape == (60000, 28, 28) and fmnist["x_train"].dtype == np.uint8
    assert fmnist["x_test"].shape == (10000, 28, 28)
    np.testing.assert_array_equal(np.bincount(fmnist["y_train"]), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(fmnist["y_test"]), [1000] * 10)
    assert fmnist["y_train"][0] == 9 and images.FASHION_MNIST_CLASSES[9] == "Ankle boot"
    # The widely used Fashion-MNIST normalisation constants: train mean 0.2860, std 0.3530.
    histogram = np.bincount(fmnist["x_train"].ravel(), minlength=256) / fmnist["x_train"].size
    levels = np.arange(256) / 255.0
    mean = histogram @ levels
    std = np.sqrt(histogram @ (levels - mean) ** 2)
    assert abs(mean - 0.2860) < 5e-4 and abs(std - 0.3530) < 5e-4
    # First test image, straight from the gzip bytes after the 16-byte header.
    with gzip.open(os.path.join(FMNIST_DIR, "t10k-images-idx3-ubyte.gz")) as f:
        first = np.frombuffer(f.read(16 + 784)[16:], np.uint8).reshape(28, 28)
    np.testing.assert_array_equal(fmnist["x_test"][0], first)


@needs_debian_fmnist
def test_fashion_mnist_source():
    ds = images.load_image_dataset(cfg(source="fashion_mnist"))
    assert (len(ds.pretrain), len(ds.probe_train), len(ds.test)) == (60000, 60000, 10000)
    assert ds.image_shape == (28, 28, 1) and ds.num_classes == 10
    batch = ds.test[np.array([0, 9999])]
    assert batch["image"].shape == (2, 28, 28, 1) and batch["label"].dtype == np.int32


@pytest.mark.parametrize("compress", [False, True])
def test_idx_roundtrip_on_fixtures(tmp_path, compress):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (7, 5, 4), dtype=np.uint8)
    ints = rng.integers(-(2**31), 2**31 - 1, (6,), dtype=np.int64).astype(np.int32)
    floats = rng.standard_normal((2, 3)).astype(np.float32)
    write_idx(tmp_path / "a.idx", imgs, compress=compress)
    write_idx(tmp_path / "b.idx", ints, type_code=0x0C, compress=compress)
    write_idx(tmp_path / "c.idx", floats, type_code=0x0D, compress=compress)
    np.testing.assert_array_equal(images.read_idx(tmp_path / "a.idx"), imgs)
    np.testing.assert_array_equal(images.read_idx(tmp_path / "b.idx"), ints)
    np.testing.assert_array_equal(images.read_idx(tmp_path / "c.idx"), floats)


def test_idx_errors(tmp_path):
    imgs = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    raw = write_idx(tmp_path / "ok.idx", imgs)
    (tmp_path / "short.idx").write_bytes(raw[:-5])
    with pytest.raises(ValueError, match=r"short.idx: IDX payload truncated"):
        images.read_idx(tmp_path / "short.idx")
    (tmp_path / "long.idx").write_bytes(raw + b"\x00")
    with pytest.raises(ValueError, match="trailing bytes"):
        images.read_idx(tmp_path / "long.idx")
    (tmp_path / "magic.idx").write_bytes(b"\x01\x02\x08\x03" + raw[4:])
    with pytest.raises(ValueError, match=r"magic.idx: not an IDX file, magic number 0x01020803"):
        images.read_idx(tmp_path / "magic.idx")
    (tmp_path / "hdr.idx").write_bytes(raw[:9])
    with pytest.raises(ValueError, match="truncated IDX header"):
        images.read_idx(tmp_path / "hdr.idx")
    gz = gzip.compress(raw)
    (tmp_path / "cut.idx.gz").write_bytes(gz[: len(gz) // 2])
    with pytest.raises(ValueError, match=r"cut.idx.gz: corrupt or truncated gzip"):
        images.read_idx(tmp_path / "cut.idx.gz")
    with pytest.raises(FileNotFoundError, match="IDX file not found"):
        images.read_idx(tmp_path / "absent.idx")


def _write_fake_fmnist(folder, n_train=20, n_test=10):
    rng = np.random.default_rng(1)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": (np.arange(n_train) % 10).astype(np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": (np.arange(n_test) % 10).astype(np.uint8),
    }
    for key, stem in images.FASHION_MNIST_FILES.items():
        write_idx(folder / (stem + ".gz"), arrays[key], compress=True)
    return arrays


def test_fashion_mnist_data_dir_option_and_errors(tmp_path):
    arrays = _write_fake_fmnist(tmp_path)
    ds = images.load_image_dataset(cfg(source="fashion_mnist", data_dir=str(tmp_path)))
    np.testing.assert_array_equal(ds.test.images[..., 0], arrays["test_images"])
    np.testing.assert_array_equal(ds.probe_train.labels, arrays["train_labels"])
    # A truncated file names the file and the reinstall fix.
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte.gz.*apt-get install --reinstall"):
        images.load_image_dataset(cfg(source="fashion_mnist", data_dir=str(tmp_path)))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError) as err:
        images.load_image_dataset(cfg(source="fashion_mnist", data_dir=str(empty)))
    assert "sudo apt-get install dataset-fashion-mnist" in str(err.value)
    assert "--config.data.data_dir" in str(err.value)


# ------------------------------------------------------------------------------------------
# The shipped subset


def test_shipped_subset_is_balanced_and_documented():
    arrays = images.load_fashion_mnist_subset_arrays()
    np.testing.assert_array_equal(np.bincount(arrays["y_train"]), [500] * 10)
    np.testing.assert_array_equal(np.bincount(arrays["y_test"]), [100] * 10)
    assert arrays["x_train"].dtype == np.uint8 and arrays["x_train"].shape == (5000, 28, 28)
    assert np.unique(arrays["train_index"]).size == 5000
    assert np.unique(arrays["test_index"]).size == 1000
    provenance = json.loads(str(arrays["provenance"]))
    assert provenance["seed"] == int(arrays["seed"])
    stems = images.FASHION_MNIST_FILES.values()
    assert set(provenance["source_files"]) == {stem + ".gz" for stem in stems}
    licence = images.fashion_mnist_subset_path().parent / "FASHION_MNIST_LICENSE.txt"
    assert "Zalando SE" in licence.read_text() and "MIT License" in licence.read_text()
    # Stored shuffled, not grouped by class, so "first n per class" is a random n.
    assert np.mean(arrays["y_train"][1:] != arrays["y_train"][:-1]) > 0.8

    ds = images.load_image_dataset(cfg())
    assert ds.name == "fashion_mnist_subset" and ds.image_shape == (28, 28, 1)
    assert (len(ds.pretrain), len(ds.probe_train), len(ds.test)) == (5000, 5000, 1000)


@needs_debian_fmnist
def test_shipped_subset_rows_are_real_fashion_mnist_rows(fmnist):
    arrays = images.load_fashion_mnist_subset_arrays()
    np.testing.assert_array_equal(arrays["x_train"], fmnist["x_train"][arrays["train_index"]])
    np.testing.assert_array_equal(arrays["y_train"], fmnist["y_train"][arrays["train_index"]])
    np.testing.assert_array_equal(arrays["x_test"], fmnist["x_test"][arrays["test_index"]])
    np.testing.assert_array_equal(arrays["y_test"], fmnist["y_test"][arrays["test_index"]])
    provenance = json.loads(str(arrays["provenance"]))
    for name, digest in provenance["source_files"].items():
        with open(os.path.join(FMNIST_DIR, name), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == digest


def test_first_n_per_class():
    full = images.load_fashion_mnist_subset_arrays()
    ds = images.load_image_dataset(cfg(train_per_class=20, test_per_class=3))
    np.testing.assert_array_equal(np.bincount(ds.probe_train.labels), [20] * 10)
    np.testing.assert_array_equal(np.bincount(ds.test.labels), [3] * 10)
    # They are the first 20 of each class in stored order.
    expected = np.concatenate([np.nonzero(full["y_train"] == c)[0][:20] for c in range(10)])
    np.testing.assert_array_equal(ds.probe_train.images[..., 0], full["x_train"][np.sort(expected)])
    with pytest.raises(ValueError, match=r"config.data.train_per_class must be >= 1 \(or 0"):
        images.load_image_dataset(cfg(train_per_class=-2))
    assert len(images.load_image_dataset(cfg(train_per_class=0)).probe_train) == 5000  # 0: all


def test_config_unset_spellings_and_unknown_fields(tmp_path):
    import ml_collections

    _write_folder(tmp_path / "tr", {"a": 2, "b": 2}, size=(6, 6), mode="L")
    _write_folder(tmp_path / "te", {"a": 1, "b": 1}, size=(4, 4), mode="L", seed=5)
    # Command-line spellings: "" / 0 for unset, an int image_size, and an irrelevant tfds name
    # that must not rename the dataset.
    lead_style = ml_collections.ConfigDict(dict(
        source="folder", name="cifar10", data_dir="", path=str(tmp_path / "tr"),
        test_dir=str(tmp_path / "te"), image_size=5, train_per_class=1,
        test_per_class=0, pretrain_split="train",
    ))
    ds = images.load_image_dataset(lead_style)
    assert ds.name == "tr" and ds.image_shape == (5, 5, 1)
    np.testing.assert_array_equal(ds.probe_train.labels, [0, 1])
    np.testing.assert_array_equal(ds.test.labels, [0, 1])
    resolved = images.resolve_data_config(lead_style)
    assert resolved["test_dir"] == str(tmp_path / "te") and resolved["test_per_class"] is None
    assert resolved["data_dir"] is None and resolved["image_size"] == (5, 5)
    with pytest.raises(ValueError, match=r"unknown config.data fields \['test_path'\]"):
        images.resolve_data_config(dict(test_path="x"))
    with pytest.raises(ValueError, match=r"image_size must be \(H, W\) or one int"):
        images.resolve_data_config(dict(image_size=(1, 2, 3)))
    assert images.resolve_data_config(dict(in_memory=False))["in_memory"] is False


# ------------------------------------------------------------------------------------------
# tfds (mocked official builders, and a real array_record dataset on disk)


def _direct(name, split, i):
    example = tfds.data_source(name, split=split)[i]
    return np.asarray(example["image"]), int(example["label"])


@pytest.mark.parametrize("in_memory", [None, False])
@pytest.mark.parametrize(
    "name,shape,classes", [("cifar10", (32, 32, 3), 10), ("cifar100", (32, 32, 3), 100),
                           ("stl10", (96, 96, 3), 10)]
)
def test_tfds_official_datasets_through_mock_data(tmp_path, name, shape, classes, in_memory):
    n = 5
    with tfds.testing.mock_data(num_examples=n):
        ds = images.load_image_dataset(
            cfg(source="tfds", name=name, data_dir=str(tmp_path), in_memory=in_memory)
        )
        assert ds.image_shape == shape and ds.num_classes == classes and ds.name == name
        lazy = (images.ConcatSource, images.TfdsSource) if in_memory is False else (
            images.ConcatSource, images.InMemorySource)
        assert isinstance(ds.pretrain, lazy)
        for source, split in ((ds.probe_train, "train"), (ds.test, "test")):
            batch = source[np.arange(n)]
            assert batch["image"].dtype == np.uint8 and batch["image"].shape == (n, *shape)
            assert batch["label"].dtype == np.int32
            for i in range(n):  # exactly what tfds serves
                image, label = _direct(name, split, i)
                np.testing.assert_array_equal(batch["image"][i], image)
                assert batch["label"][i] == label
        pretrain = ds.pretrain[np.arange(len(ds.pretrain))]
        if name == "stl10":  # train + unlabelled, the unlabelled part with label -1
            assert len(ds.pretrain) == 2 * n
            np.testing.assert_array_equal(pretrain["label"][n:], [-1] * n)
            np.testing.assert_array_equal(pretrain["label"][:n],
                                          ds.probe_train[np.arange(n)]["label"])
            image, _ = _direct(name, "unlabelled", 2)
            np.testing.assert_array_equal(pretrain["image"][n + 2], image)
        else:
            assert len(ds.pretrain) == n and (pretrain["label"] >= 0).all()


def test_stl10_split_spelling_and_unlabelled_labels(tmp_path):
    requested = []

    def as_data_source(builder, split, **kwargs):
        requested.append(split)
        offset = {"train": 0, "test": 100, "unlabelled": 200}[split]
        return [{"image": np.full((96, 96, 3), offset + k, np.uint8), "label": k % 10}
                for k in range(4)]

    with tfds.testing.mock_data(as_data_source_fn=as_data_source):
        ds = images.load_image_dataset(cfg(source="tfds", name="stl10", data_dir=str(tmp_path),
                                           pretrain_split="train+unlabeled", in_memory=False))
    assert sorted(requested) == ["test", "train", "unlabelled"]  # each split opened once
    # A versioned name gets stl10's defaults too (train+unlabelled), not train only.
    requested.clear()
    with tfds.testing.mock_data(as_data_source_fn=as_data_source):
        versioned = images.load_image_dataset(cfg(source="tfds", name="stl10:1.0.0",
                                                  data_dir=str(tmp_path), in_memory=False))
    assert len(versioned.pretrain) == 8 and "unlabelled" in requested
    # unlabeled_splits given as one name (a str), not a tuple: still that name, not its letters.
    with tfds.testing.mock_data(as_data_source_fn=as_data_source):
        one_name = images.load_image_dataset({    # a plain dict, as the Python API allows
            "source": "tfds", "name": "stl10", "data_dir": str(tmp_path), "in_memory": False,
            "unlabeled_splits": "unlabelled"})
    np.testing.assert_array_equal(one_name.pretrain[np.arange(8)]["label"][4:], [-1] * 4)
    batch = ds.pretrain[np.arange(8)]
    np.testing.assert_array_equal(batch["image"][:, 0, 0, 0], [0, 1, 2, 3, 200, 201, 202, 203])
    np.testing.assert_array_equal(batch["label"], [0, 1, 2, 3, -1, -1, -1, -1])
    assert ds.probe_train is ds.pretrain.sources[0]  # train is read once, shared


def test_tfds_not_prepared_fails_at_once_with_the_fix(tmp_path, caplog):
    start = time.time()
    for name in ("cifar10", "stl10"):
        with pytest.raises(FileNotFoundError) as err, caplog.at_level("WARNING"):
            images.load_image_dataset(cfg(source="tfds", name=name, data_dir=str(tmp_path)))
        # only our error: tfds's warnings about the missing folder (twice, before it) are hidden
        assert not caplog.records, caplog.text
        message = str(err.value)
        assert f"tfds dataset {name!r} is not prepared" in message
        assert "--config.data.data_dir=" in message
        assert "pip install -e '.[tfds-prepare]'" in message
        assert (f"python -m tensorflow_datasets.scripts.download_and_prepare --datasets={name} "
                f"--data_dir={tmp_path} --file_format=array_record") in message
        assert "make quickstart" in message and "TensorFlow" in message
    assert time.time() - start < 10  # no download attempts
    assert not any(tmp_path.iterdir())  # and nothing written


def test_tfds_download_option_fails_fast_without_tensorflow_or_network(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: None if n == "tensorflow" else real_find_spec(n, *a))
    with pytest.raises(FileNotFoundError, match="TensorFlow is not installed"):
        images.load_image_dataset(cfg(source="tfds", name="cifar10", data_dir=str(tmp_path),
                                      download=True))
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: object() if n == "tensorflow" else real_find_spec(n, *a))

    def offline(address, timeout=None):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", offline)
    with pytest.raises(FileNotFoundError, match=r"www.cs.toronto.edu:443 is unreachable"):
        images.load_image_dataset(cfg(source="tfds", name="cifar10", data_dir=str(tmp_path),
                                      download=True))


def _png(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


class CldroTinyImages(tfds.core.GeneratorBasedBuilder):
    """A real tfds builder whose images are PNG bytes (prepares without TensorFlow).

    Example k of a split has every pixel equal to offset + k and label k % 3.
    """

    VERSION = tfds.core.Version("1.0.0")
    SIZES = {"train": (10, 0), "test": (4, 100), "unlabelled": (5, 200)}

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(6, 6, 3)),
                "label": tfds.features.ClassLabel(num_classes=3),
            }),
        )

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(*size) for split, size in self.SIZES.items()}

    def _generate_examples(self, n, offset):
        for k in range(n):
            yield k, {"image": _png(np.full((6, 6, 3), offset + k, np.uint8)), "label": k % 3}


@pytest.fixture(scope="module")
def tiny_tfds_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    CldroTinyImages(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return data_dir


def _check_tiny_split(batch, offset, labelled=True):
    keys = batch["image"][:, 0, 0, 0].astype(int) - offset
    assert (batch["image"] == batch["image"][:, :1, :1, :1]).all()  # constant images
    np.testing.assert_array_equal(batch["label"], keys % 3 if labelled else -1)
    return keys


@pytest.mark.parametrize("in_memory", [None, False])
def test_tfds_real_array_record_dataset(tiny_tfds_dir, in_memory):
    ds = images.load_image_dataset(cfg(
        source="tfds", name="cldro_tiny_images", data_dir=str(tiny_tfds_dir),
        pretrain_split="train+unlabelled", in_memory=in_memory, read_threads=3,
    ))
    assert ds.num_classes == 3 and ds.image_shape == (6, 6, 3)
    assert (len(ds.pretrain), len(ds.probe_train), len(ds.test)) == (15, 10, 4)
    keys = _check_tiny_split(ds.probe_train[np.arange(10)], 0)
    np.testing.assert_array_equal(np.sort(keys), np.arange(10))
    _check_tiny_split(ds.test[np.arange(4)], 100)
    pretrain = ds.pretrain[np.arange(15)]
    _check_tiny_split({k: v[:10] for k, v in pretrain.items()}, 0)
    unlabelled = _check_tiny_split({k: v[10:] for k, v in pretrain.items()}, 200, labelled=False)
    np.testing.assert_array_equal(np.sort(unlabelled), np.arange(5))
    with pytest.raises(IndexError, match="out of range"):
        ds.test[np.array([4])]


def test_tfds_dataset_prepared_without_random_access(tiny_tfds_dir, tmp_path):
    # The same dataset, recorded as tfrecord: what a default `download_and_prepare` produces.
    import shutil

    shutil.copytree(tiny_tfds_dir / "cldro_tiny_images", tmp_path / "cldro_tiny_images")
    info_path = tmp_path / "cldro_tiny_images" / "1.0.0" / "dataset_info.json"
    info = json.loads(info_path.read_text())
    info["fileFormat"] = "tfrecord"
    info_path.write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"prepared as tfrecord.*--file_format=array_record"):
        images.load_image_dataset(cfg(source="tfds", name="cldro_tiny_images",
                                      data_dir=str(tmp_path)))


def test_tfds_config_errors():
    with pytest.raises(ValueError, match="needs --config.data.name"):
        images.load_image_dataset(cfg(source="tfds"))
    with pytest.raises(ValueError, match=r"probe_split='unlabelled' includes the unlabelled"):
        images.load_image_dataset(cfg(source="tfds", name="stl10", probe_split="unlabelled"))
    with pytest.raises(ValueError, match=r"test_split='test\+unlabelled\[:10\]' includes"):
        images.load_image_dataset(cfg(source="tfds", name="stl10",
                                      test_split="test+unlabelled[:10]"))
    with pytest.raises(ValueError, match="not supported for source=tfds; unset them with "
                       "--config.data.train_per_class=0, and"):
        images.load_image_dataset(cfg(source="tfds", name="cifar10", train_per_class=5))
    with pytest.raises(ValueError, match="choose one of"):
        images.load_image_dataset(cfg(source="imagenet"))


# ------------------------------------------------------------------------------------------
# Image folders


def _write_folder(root, per_class, size=(9, 7), mode="RGB", seed=0):
    """root/<class>/<k>.png; returns {class: [array, ...]} in file-name order."""
    rng = np.random.default_rng(seed)
    written = {}
    for cls, n in per_class.items():
        (root / cls).mkdir(parents=True)
        written[cls] = []
        for k in range(n):
            shape = (size[0], size[1], 3) if mode == "RGB" else size
            array = rng.integers(0, 256, shape, dtype=np.uint8)
            Image.fromarray(array, mode).save(root / cls / f"{k:03d}.png")
            written[cls].append(array)
    return written


def test_folder_with_test_dir(tmp_path):
    train = _write_folder(tmp_path / "train", {"cat": 3, "ant": 2, "bee": 4})
    test = _write_folder(tmp_path / "test", {"bee": 1, "ant": 2}, seed=1)
    ds = images.load_image_dataset(cfg(source="folder", data_dir=str(tmp_path / "train"),
                                       test_dir=str(tmp_path / "test")))
    assert ds.class_names == ("ant", "bee", "cat") and ds.num_classes == 3
    assert ds.image_shape == (9, 7, 3) and ds.name == "train"
    expected = np.stack(train["ant"] + train["bee"] + train["cat"])
    np.testing.assert_array_equal(ds.probe_train.images, expected)  # PNG is lossless
    np.testing.assert_array_equal(ds.probe_train.labels, [0, 0, 1, 1, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(ds.test.images, np.stack(test["ant"] + test["bee"]))
    np.testing.assert_array_equal(ds.test.labels, [0, 0, 1])


def test_folder_grayscale_and_stratified_split(tmp_path):
    _write_folder(tmp_path, {"a": 10, "b": 10}, size=(5, 5), mode="L")
    config = cfg(source="folder", data_dir=str(tmp_path), test_fraction=0.2, split_seed=3)
    ds = images.load_image_dataset(config)
    assert ds.image_shape == (5, 5, 1)
    np.testing.assert_array_equal(np.bincount(ds.test.labels), [2, 2])
    np.testing.assert_array_equal(np.bincount(ds.probe_train.labels), [8, 8])
    again = images.load_image_dataset(config)
    np.testing.assert_array_equal(again.test.images, ds.test.images)
    # Train and test together are exactly the written images.
    everything = np.concatenate([ds.probe_train.images, ds.test.images])
    assert len({im.tobytes() for im in everything}) == 20
    ds3 = images.load_image_dataset(cfg(source="folder", data_dir=str(tmp_path), channels=3))
    assert ds3.image_shape == (5, 5, 3)
    np.testing.assert_array_equal(ds3.test.images[..., 0], ds3.test.images[..., 2])


def test_folder_16_bit_grayscale_is_rescaled_and_32_bit_refused(tmp_path):
    # PIL's convert("L") would clip every pixel above 255 to white.
    (tmp_path / "tr" / "a").mkdir(parents=True)
    (tmp_path / "te" / "a").mkdir(parents=True)
    deep = (np.arange(20, dtype=np.uint16).reshape(4, 5) * 3449)   # 0 .. 65531
    Image.fromarray(deep).save(tmp_path / "tr" / "a" / "deep.png")
    Image.fromarray(deep).save(tmp_path / "te" / "a" / "deep.png")
    assert Image.open(tmp_path / "tr" / "a" / "deep.png").mode == "I;16"
    folders = dict(data_dir=str(tmp_path / "tr"), test_dir=str(tmp_path / "te"))
    ds = images.load_image_dataset(cfg(source="folder", **folders))
    assert ds.image_shape == (4, 5, 1)
    np.testing.assert_array_equal(ds.probe_train.images[0, ..., 0],
                                  np.round(deep / 65535.0 * 255.0).astype(np.uint8))
    Image.fromarray(deep.astype(np.float32)).save(tmp_path / "tr" / "a" / "float.tif")
    with pytest.raises(ValueError, match=r"float.tif has 32-bit float pixels.*8- or 16-bit"):
        images.load_image_dataset(cfg(source="folder", **folders))


def test_folder_16_bit_pgm_is_rescaled_as_16_bit_png(tmp_path):
    # Pillow opens 16-bit PGM (and, before 10.3, 16-bit grayscale PNG) as mode "I": refused as
    # "32-bit" although it holds 16 bits (PGM scaled from its maxval to 0..65535).
    deep = (np.arange(20, dtype=np.uint16).reshape(4, 5) * 3449)   # 0 .. 65531
    for split in ("tr", "te"):
        (tmp_path / split / "a").mkdir(parents=True)
        header = b"P5\n5 4\n65535\n"
        (tmp_path / split / "a" / "deep.pgm").write_bytes(header + deep.astype(">u2").tobytes())
    assert Image.open(tmp_path / "tr" / "a" / "deep.pgm").mode == "I"
    ds = images.load_image_dataset(cfg(source="folder", data_dir=str(tmp_path / "tr"),
                                       test_dir=str(tmp_path / "te")))
    assert ds.image_shape == (4, 5, 1)
    np.testing.assert_array_equal(ds.probe_train.images[0, ..., 0],
                                  np.round(deep / 65535.0 * 255.0).astype(np.uint8))


def test_folder_loose_images_in_the_root_and_linked_nested_folders_are_refused(tmp_path):
    root = tmp_path / "imgs"
    _write_folder(root, {"a": 2, "b": 2}, size=(8, 8))
    elsewhere = tmp_path / "more"
    _write_folder(elsewhere, {"x": 1}, size=(8, 8))
    os.symlink(elsewhere / "x", root / "a" / "linked")   # images behind a link: not skipped
    with pytest.raises(ValueError, match=r"imgs/a/linked holds images.*directly inside"):
        images.load_image_dataset(cfg(source="folder", data_dir=str(root), test_fraction=0.5))
    os.remove(root / "a" / "linked")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "stray.png")
    with pytest.raises(ValueError, match=r"holds 1 image\(s\) outside the class folders "
                                         r"\(e.g. stray.png\)"):
        images.load_image_dataset(cfg(source="folder", data_dir=str(root), test_fraction=0.5))


@pytest.mark.parametrize("size,expected", [(32, (32, 32)), ((32,), (32, 32)), ([8, 6], (8, 6))])
def test_image_size_accepts_one_int_as_the_command_line_gives_it(size, expected):
    # `--config.data.image_size=32` arrives as (32,).
    assert images.resolve_data_config({"image_size": size})["image_size"] == expected


@pytest.mark.parametrize("size", [-3, (8, 0), (8.5, 8), "32", (True, 8), (1, 2, 3)])
def test_impossible_image_sizes_are_refused_with_an_example(size):
    with pytest.raises(ValueError, match=r"image_size must be \(H, W\) or one int.*"
                                         r"--config.data.image_size=32"):
        images.resolve_data_config({"image_size": size})


def test_folder_skips_hidden_entries_and_decodes_one_image_at_a_time(tmp_path):
    root = tmp_path / "imgs"
    written = _write_folder(root, {"a": 2, "b": 2}, size=(8, 8))
    (root / ".ipynb_checkpoints").mkdir()                        # a notebook's, not a class
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / ".ipynb_checkpoints" / "x.png")
    (root / "a" / "._000.png").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    # 300 GIFs: PIL keeps a multi-frame file open after decoding it, so holding every decoded
    # image ran out of file handles on large folders (with `ulimit -n 256`, at about 250).
    for k in range(150):
        for cls in ("a", "b"):
            Image.fromarray(np.full((8, 8), k, np.uint8)).save(root / cls / f"g{k:03d}.gif")
    import resource  # pylint: disable=import-outside-toplevel
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
    try:
        ds = images.load_image_dataset(cfg(source="folder", data_dir=str(root),
                                           test_fraction=0.5))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert ds.class_names == ("a", "b") and len(ds.probe_train) + len(ds.test) == 304
    everything = np.concatenate([ds.probe_train.images, ds.test.images])
    assert any(np.array_equal(x, written["a"][0]) for x in everything)


def test_folder_sizes_resizing_and_errors(tmp_path):
    root = tmp_path / "imgs"
    _write_folder(root, {"a": 2}, size=(8, 8))
    Image.fromarray(np.zeros((6, 4, 3), np.uint8)).save(root / "a" / "small.png")
    _write_folder(root / "sub", {"b": 2}, size=(8, 8))  # placeholder, moved below
    (root / "sub" / "b").rename(root / "b")
    (root / "sub").rmdir()
    with pytest.raises(ValueError, match=r"images differ in size.*is 6x4.*--config.data.image_size"):
        images.load_image_dataset(cfg(source="folder", data_dir=str(root), test_fraction=0.5))
    ds = images.load_image_dataset(cfg(source="folder", data_dir=str(root), test_fraction=0.5,
                                       image_size=(8, 8)))
    assert ds.image_shape == (8, 8, 3) and len(ds.probe_train) + len(ds.test) == 5
    (root / "b" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match=r"cannot decode image .*broken.png"):
        images.load_image_dataset(cfg(source="folder", data_dir=str(root), image_size=(8, 8)))
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        images.load_image_dataset(cfg(source="folder", data_dir=str(tmp_path / "nope")))
    (tmp_path / "flat").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        images.load_image_dataset(cfg(source="folder", data_dir=str(tmp_path / "flat")))


# ------------------------------------------------------------------------------------------
# npz


def test_npz_source(tmp_path):
    rng = np.random.default_rng(2)
    x_train = rng.integers(0, 256, (12, 4, 4), dtype=np.uint8)
    x_test = rng.integers(0, 256, (6, 4, 4), dtype=np.uint8)
    y_train, y_test = np.arange(12) % 4, np.arange(6) % 4
    np.savez(tmp_path / "gray.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    ds = images.load_image_dataset(cfg(source="npz", path=str(tmp_path / "gray.npz")))
    assert ds.name == "gray" and ds.image_shape == (4, 4, 1) and ds.num_classes == 4
    np.testing.assert_array_equal(ds.probe_train.images[..., 0], x_train)
    np.testing.assert_array_equal(ds.test[np.array([5, 0])]["label"], [1, 0])

    rgb = rng.integers(0, 256, (12, 4, 4, 3), dtype=np.uint8)
    unlabeled = rng.integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "rgb.npz", train_images=rgb, train_labels=y_train,
             test_images=rgb[:6], test_labels=y_test, x_unlabeled=unlabeled)
    ds = images.load_image_dataset(cfg(source="npz", path=str(tmp_path / "rgb.npz"),
                                       num_classes=7))
    assert ds.num_classes == 7 and len(ds.pretrain) == 15 and len(ds.probe_train) == 12
    with pytest.raises(ValueError, match=r"rgb: label 3 >= num_classes=2; for source=npz set "
                                         r"--config.data.num_classes=4 or leave it unset"):
        images.load_image_dataset(cfg(source="npz", path=str(tmp_path / "rgb.npz"),
                                      num_classes=2))
    pretrain = ds.pretrain[np.arange(15)]
    np.testing.assert_array_equal(pretrain["image"][12:], unlabeled)
    np.testing.assert_array_equal(pretrain["label"], np.r_[y_train, [-1, -1, -1]])


def test_npz_errors(tmp_path):
    # Pixels of 128: all-0/1 uint8 images are refused (test_images_inputs.py).
    ok = dict(x_train=np.full((4, 3, 3), 128, np.uint8), y_train=np.zeros(4, int),
              x_test=np.full((2, 3, 3), 128, np.uint8), y_test=np.zeros(2, int))

    def load(**changes):
        arrays = {**ok, **changes}
        arrays = {k: v for k, v in arrays.items() if v is not None}
        np.savez(tmp_path / "d.npz", **arrays)
        return images.load_image_dataset(cfg(source="npz", path=str(tmp_path / "d.npz")))

    with pytest.raises(ValueError, match="x_train must be uint8 0..255, got float32"):
        load(x_train=np.zeros((4, 3, 3), np.float32))
    with pytest.raises(ValueError, match="x_test has 2 images but y_test has 3 labels"):
        load(y_test=np.zeros(3, int))
    with pytest.raises(ValueError, match="missing array 'y_train'"):
        load(y_train=None)
    with pytest.raises(ValueError, match=r"must be \(N, H, W\) or \(N, H, W, C\)"):
        load(x_train=np.zeros((4, 3, 3, 2), np.uint8))
    with pytest.raises(ValueError, match="labels must be >= 0"):
        load(y_train=np.array([0, 1, -1, 0]))
    with pytest.raises(ValueError, match="must hold class indices 0..C-1, got a label 4294967296"):
        load(y_train=np.array([0, 1, 2**32, 0]))         # int32 would wrap it to 0
    with pytest.raises(ValueError, match="both x_unlabeled and x_unlabelled"):
        load(x_unlabeled=np.zeros((2, 3, 3), np.uint8), x_unlabelled=np.zeros((3, 3, 3), np.uint8))
    with pytest.raises(FileNotFoundError, match="npz file not found"):
        images.load_image_dataset(cfg(source="npz", path=str(tmp_path / "absent.npz")))
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(ValueError, match="not a readable .npz"):
        images.load_image_dataset(cfg(source="npz", path=str(tmp_path / "bad.npz")))
    with pytest.raises(ValueError, match="needs --config.data.path"):
        images.load_image_dataset(cfg(source="npz"))


# ------------------------------------------------------------------------------------------
# scikit-learn digits


def test_digits_source():
    ds = images.load_image_dataset(cfg(source="digits"))
    assert len(ds.probe_train) + len(ds.test) == 1797
    assert ds.image_shape == (8, 8, 1) and ds.num_classes == 10
    counts = np.bincount(ds.probe_train.labels, minlength=10) + np.bincount(ds.test.labels,
                                                                            minlength=10)
    np.testing.assert_array_equal(counts, [178, 182, 177, 183, 181, 182, 181, 179, 174, 180])
    assert len(ds.test) == 360  # sklearn rounds the 20% test share up
    # Stratified: every class has its 20% (+-1) in the test split.
    test_counts = np.bincount(ds.test.labels, minlength=10)
    assert (np.abs(test_counts - 0.2 * counts) <= 1).all()
    assert ds.test.images.dtype == np.uint8 and ds.test.images.max() == 255
    # Values are the 0..16 intensities scaled to 0..255; every test image is a real digit.
    from sklearn.datasets import load_digits

    raw = {np.round(im * 255 / 16).astype(np.uint8).tobytes() for im in load_digits().images}
    assert all(im[..., 0].tobytes() in raw for im in ds.test.images)
    again = images.load_image_dataset(cfg(source="digits"))
    np.testing.assert_array_equal(again.test.labels, ds.test.labels)
    other = images.load_image_dataset(cfg(source="digits", split_seed=1))
    assert not np.array_equal(other.test.images, ds.test.images)


def test_folder_grayscale_with_alpha_stays_one_channel(tmp_path):
    root = tmp_path / "la"
    rng = np.random.default_rng(5)
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for k in range(2):
            gray = rng.integers(0, 256, (5, 6), dtype=np.uint8)
            Image.fromarray(np.stack([gray, np.full_like(gray, 255)], -1), "LA").save(
                root / cls / f"{k}.png")
    ds = images.load_image_dataset(cfg(source="folder", data_dir=str(root), test_fraction=0.5))
    assert ds.image_shape == (5, 6, 1)
