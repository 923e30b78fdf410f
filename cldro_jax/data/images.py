"""Image data sources: uint8 images and int32 labels with random access by index.

The trainer calls one entry point, ``load_image_dataset(config.data)``, and gets an
``ImageDataset`` with three ``ArraySource`` views: what contrastive pre-training iterates, the
labelled train split for the kNN bank / linear probe, and the labelled test split. An
``ArraySource`` answers ``source[index_array]`` with ``dict(image=uint8 (n, H, W, C),
label=int32 (n,))`` and ``len(source)``; unlabelled examples carry label -1. Images keep their
stored channel count (grayscale stays ``(H, W, 1)``; the on-device augmentation makes 3 channels).
Host work stays uint8: no float conversion here.

``config.data`` fields (``default_data_config()`` returns all of them with their defaults):

=================  ===========================================================================
field              meaning
=================  ===========================================================================
source             ``tfds`` | ``folder`` | ``npz`` | ``fashion_mnist`` | ``fashion_mnist_subset``
                   | ``digits``. Default ``fashion_mnist_subset`` (ships in the package; no
                   download).
name               tfds dataset name (``cifar10``, ``cifar100``, ``stl10``; any tfds image
                   classification set with ``image``/``label`` features works). Ignored by the
                   other sources, which name themselves (source, npz file or folder name).
data_dir           ``tfds``: the tfds data_dir (None: tfds's default, ``$TFDS_DATA_DIR`` or
                   ``~/tensorflow_datasets``). ``fashion_mnist``: folder of the four IDX files
                   (None: ``/usr/share/datasets/fashion-mnist``). ``folder``: the train root, one
                   sub-folder per class with the images directly inside (images in deeper
                   folders are refused, not skipped).
test_dir           ``folder``: optional test root with the same class sub-folders (a subset is
                   fine; it may not share image files with the train root).
path               ``npz``: the ``.npz`` file. ``folder``/``fashion_mnist``: used when
                   ``data_dir`` is unset.
pretrain_split,    ``tfds`` split names; ``+`` joins splits. None: per-dataset defaults, CIFAR
probe_split,       ``train``/``train``/``test``, STL10 ``train+unlabelled``/``train``/``test``
test_split         (tfds spells it ``unlabelled``; ``unlabeled`` is accepted for STL10).
unlabeled_splits   tfds split names whose examples get label -1.
download           ``tfds``: allow tfds to download and prepare a missing dataset (needs
                   TensorFlow and internet). Default False: a missing dataset fails at once.
in_memory          ``tfds``: None (auto: load a split into RAM when it is at most
                   ``in_memory_max_mb``), True, or False (lazy random access, decoded on demand
                   with ``read_threads`` threads; what STL10's 100k unlabelled images get).
image_size         ``folder``: (H, W), or one int for square, to resize every train and test
                   image to (bilinear, stretched: no crop keeps the aspect ratio); None requires
                   equal sizes. Pixels are read as stored: an EXIF orientation tag is not
                   applied (as torchvision's ImageFolder).
channels           ``folder``: 1 or 3; None picks 1 when every image is stored as grayscale
                   (modes 1, L, LA, 16-bit), else 3 (palette images count as colour).
test_fraction      ``folder`` without ``test_dir`` and ``digits``: stratified test fraction.
split_seed         seed of that deterministic stratified split.
train_per_class    keep only the first n train images of each class (in stored order; the
                   shipped subset is stored shuffled, so the first n are a random n). In-memory
                   sources only. None: all.
test_per_class     the same for the test split.
num_classes        ``npz``: number of classes (None: max label + 1, and every class 0..C-1 must
                   occur in y_train; set it to keep classes without images on purpose).
classes_per_batch  0 (default): batches in uniformly shuffled epoch order. k > 0: each training
                   batch holds batch_size / k examples of each of k random classes
                   (``pipeline.class_batch_indices``; the sampling-bias experiment).
=================  ===========================================================================

Unset optional fields may also be written as ``""`` or ``0``; ``image_size`` may be one int (a
square); unknown fields are refused.

Formats: ``npz`` holds ``x_train, y_train, x_test, y_test`` (``train_images, train_labels,
test_images, test_labels`` also accepted), images uint8 0..255 ``(N, H, W)`` or ``(N, H, W, C)``
with C in {1, 3}, labels integer ``(N,)`` class indices 0..C-1 (every test class also a train
class); an optional ``x_unlabeled`` (uint8, same image shape) is added to pre-training with label
-1. Fashion-MNIST is read from IDX files (gzip or raw), see
``read_idx``.
"""

from __future__ import annotations

import abc
import concurrent.futures
import dataclasses
import gzip
import importlib.resources
import importlib.util
import json
import os
import socket
import urllib.parse
import zipfile
import zlib
from typing import Any, Callable, Sequence

import ml_collections
import numpy as np
from ml_collections import config_dict

from cldro_jax import _registering
from cldro_jax import logs

SOURCES = ("tfds", "folder", "npz", "fashion_mnist", "fashion_mnist_subset", "digits")

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
FASHION_MNIST_SUBSET_ASSET = "fashion_mnist_subset.npz"

# Per-dataset tfds split defaults (pretrain, probe_train, test). STL10 pre-trains on its 5k
# labelled train images plus the 100k unlabelled ones, as in the reference code.
_TFDS_SPLIT_DEFAULTS = {
    "stl10": ("train+unlabelled", "train", "test"),
}
_TFDS_GENERIC_SPLITS = ("train", "train", "test")
# Split spellings people use that tfds spells differently.
_TFDS_SPLIT_ALIASES = {
    "stl10": {"unlabeled": "unlabelled"},
}

# Files with other suffixes (notes, CSVs) are skipped, as torchvision's ImageFolder does. Photos
# saved as .jfif/.jpe (Windows, browsers) or .heic/.heif/.avif (phones) are listed so that they
# are read, or refused by name when PIL cannot decode them, rather than skipped without a word.
_IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm",
     ".pgm", ".pbm", ".pnm", ".heic", ".heif", ".avif"}
)

# IDX element type codes (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT"); multi-byte
# types are big-endian.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def default_data_config() -> ml_collections.ConfigDict:
    """All ``config.data`` fields with their defaults (see the module docstring)."""
    cfg = ml_collections.ConfigDict()
    cfg.source = "fashion_mnist_subset"
    cfg.name = config_dict.placeholder(str)
    cfg.data_dir = config_dict.placeholder(str)
    cfg.test_dir = config_dict.placeholder(str)
    cfg.path = config_dict.placeholder(str)
    cfg.pretrain_split = config_dict.placeholder(str)
    cfg.probe_split = config_dict.placeholder(str)
    cfg.test_split = config_dict.placeholder(str)
    cfg.unlabeled_splits = ("unlabelled", "unlabeled")
    cfg.download = False
    cfg.in_memory = config_dict.placeholder(bool)  # None: decide by size
    cfg.in_memory_max_mb = 1024
    cfg.read_threads = 16
    cfg.image_size = config_dict.placeholder(tuple)
    cfg.channels = config_dict.placeholder(int)
    cfg.test_fraction = 0.2
    cfg.split_seed = 0
    cfg.train_per_class = config_dict.placeholder(int)
    cfg.test_per_class = config_dict.placeholder(int)
    cfg.num_classes = config_dict.placeholder(int)
    cfg.classes_per_batch = 0
    return cfg


_DEFAULTS = default_data_config().to_dict()
_OPTIONAL_FIELDS = (
    "name", "data_dir", "test_dir", "path", "pretrain_split", "probe_split", "test_split",
    "image_size", "channels", "train_per_class", "test_per_class", "num_classes", "in_memory",
)
# The ``config.data`` fields each source reads, besides ``source`` and ``classes_per_batch``
# (the batching, for every source): a field set for another source is reported, not used.
_PER_CLASS_FIELDS = ("train_per_class", "test_per_class")
SOURCE_FIELDS = {
    "tfds": ("name", "data_dir", "pretrain_split", "probe_split", "test_split",
             "unlabeled_splits", "download", "in_memory", "in_memory_max_mb", "read_threads",
             *_PER_CLASS_FIELDS),   # (tfds refuses the per-class fields itself, by name)
    "folder": ("data_dir", "path", "test_dir", "image_size", "channels", "test_fraction",
               "split_seed", *_PER_CLASS_FIELDS),
    "npz": ("path", "num_classes", *_PER_CLASS_FIELDS),
    "fashion_mnist": ("data_dir", "path", *_PER_CLASS_FIELDS),
    "fashion_mnist_subset": _PER_CLASS_FIELDS,
    "digits": ("test_fraction", "split_seed", *_PER_CLASS_FIELDS),
}


def unused_fields(data_config: Any) -> list[str]:
    """``config.data`` fields set to something other than their default that the configured
    source does not read (e.g. ``name`` with ``source=npz``), as ``field=value``."""
    given = resolve_data_config(data_config)
    read = SOURCE_FIELDS.get(given["source"])
    if read is None:   # an unknown source is refused by load_image_dataset
        return []
    defaults = resolve_data_config({})
    return [f"{field}={given[field]!r}" for field in given
            if field not in read and field not in ("source", "classes_per_batch")
            and given[field] != defaults[field]]


def resolve_data_config(data_config: Any) -> dict[str, Any]:
    """``config.data`` as a plain dict of every field: defaults filled in, ``""``/``0`` in
    optional fields read as unset (command-line spellings), an int ``image_size`` made (n, n)."""
    given = dict(data_config.items()) if hasattr(data_config, "items") else dict(data_config)
    unknown = sorted(set(given) - set(_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown config.data fields {unknown}; known: {sorted(_DEFAULTS)}")
    resolved = dict(_DEFAULTS)
    resolved.update(given)
    for field in _OPTIONAL_FIELDS:
        # `False` is a real value of in_memory; only "" and 0 mean unset.
        value = resolved[field]
        if isinstance(value, str) and value == "" or (
            not isinstance(value, bool) and isinstance(value, int) and value == 0
        ):
            resolved[field] = None
    for field in ("train_per_class", "test_per_class"):
        if resolved[field] is not None and resolved[field] < 1:
            raise ValueError(f"config.data.{field} must be >= 1 (or 0: every image), got "
                             f"{resolved[field]}")
    for field, low in (("split_seed", 0), ("in_memory_max_mb", 0), ("read_threads", 1),
                       ("classes_per_batch", 0)):
        if resolved[field] < low:
            raise ValueError(f"config.data.{field} must be >= {low}, got {resolved[field]}")
    if not 0 < resolved["test_fraction"] < 1:
        raise ValueError(f"config.data.test_fraction must be in (0, 1), got "
                         f"{resolved['test_fraction']}")
    size = resolved["image_size"]
    if size is not None:
        # One int, (n,) (what `--config.data.image_size=32` gives) or (H, W); positive ints only.
        dims = (size,) if isinstance(size, int) else tuple(size) if isinstance(
            size, (tuple, list)) else None
        if dims is not None and len(dims) == 1:
            dims = dims * 2
        if dims is None or len(dims) != 2 or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in dims):
            raise ValueError(
                f"config.data.image_size must be (H, W) or one int, positive, got {size!r}; e.g. "
                "--config.data.image_size=32 or --config.data.image_size='(32, 48)'")
        resolved["image_size"] = dims
    return resolved

# --------------------------------------------------------------------------------------------
# Array sources


def _as_index_array(indices: Any, length: int) -> np.ndarray:
    """Validates a 1-D integer index array against a source of ``length`` examples."""
    index = np.asarray(indices)
    if index.ndim != 1 or not (index.size == 0 or np.issubdtype(index.dtype, np.integer)):
        raise ValueError(
            f"index a source with a 1-D integer array, got shape {index.shape} dtype {index.dtype}"
        )
    if index.size and (index.min() < 0 or index.max() >= length):
        raise IndexError(
            f"index out of range for a source of {length} examples: "
            f"min {index.min()}, max {index.max()}"
        )
    return index.astype(np.int64, copy=False)


class ArraySource(abc.ABC):
    """Random access to a split: ``source[index_array] -> dict(image=uint8, label=int32)``."""

    image_shape: tuple[int, int, int]

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def __getitem__(self, indices: Any) -> dict[str, np.ndarray]: ...


class InMemorySource(ArraySource):
    """A split held in RAM as ``images`` (N, H, W, C) uint8 and ``labels`` (N,) int32."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(
                f"images must be uint8 (N, H, W, C), got {images.dtype} {images.shape}"
            )
        labels = np.asarray(labels)
        if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"labels must be integers of shape ({images.shape[0]},), "
                f"got {labels.dtype} {labels.shape}"
            )
        self.images = images
        self.labels = labels.astype(np.int32, copy=False)
        self.image_shape = tuple(int(d) for d in images.shape[1:])

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, indices: Any) -> dict[str, np.ndarray]:
        index = _as_index_array(indices, len(self))
        return {"image": self.images[index], "label": self.labels[index]}


class TfdsSource(ArraySource):
    """Lazy random access to a tfds data source (array_record), decoded on demand.

    Each example is read and decoded by tfds (PIL decode of the stored PNG); a thread pool reads
    the examples of one request in parallel, since decoding and file reads release the GIL.
    """

    def __init__(
        self,
        data_source: Any,
        *,
        image_shape: tuple[int, int, int],
        unlabeled: bool,
        read_threads: int = 16,
        description: str = "tfds source",
    ):
        self._data_source = data_source
        self.image_shape = tuple(int(d) for d in image_shape)
        self.unlabeled = unlabeled
        self._read_threads = max(1, int(read_threads))
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._description = description

    def __len__(self) -> int:
        return len(self._data_source)

    def _read_one(self, index: int) -> tuple[np.ndarray, int]:
        example = self._data_source[index]
        if "image" not in example:
            raise ValueError(
                f"{self._description}: example {index} has no 'image' feature "
                f"(features: {sorted(example)})"
            )
        image = np.asarray(example["image"])
        if image.dtype != np.uint8 or image.shape != self.image_shape:
            raise ValueError(
                f"{self._description}: example {index} has image {image.dtype} {image.shape}, "
                f"expected uint8 {self.image_shape}"
            )
        if self.unlabeled:
            return image, -1
        if "label" not in example:
            raise ValueError(
                f"{self._description}: example {index} has no 'label' feature; list its split "
                "in config.data.unlabeled_splits if it is unlabelled"
            )
        return image, int(example["label"])

    def __getitem__(self, indices: Any) -> dict[str, np.ndarray]:
        index = _as_index_array(indices, len(self))
        images = np.empty((index.size, *self.image_shape), np.uint8)
        labels = np.empty((index.size,), np.int32)
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                self._read_threads, thread_name_prefix="tfds-read"
            )
        for row, (image, label) in enumerate(self._pool.map(self._read_one, index.tolist())):
            images[row] = image
            labels[row] = label
        return {"image": images, "label": labels}


class ConcatSource(ArraySource):
    """Several sources of one image shape, indexed as one (e.g. STL10 train + unlabelled)."""

    def __init__(self, sources: Sequence[ArraySource]):
        if not sources:
            raise ValueError("ConcatSource needs at least one source")
        shapes = {tuple(s.image_shape) for s in sources}
        if len(shapes) != 1:
            raise ValueError(f"cannot concatenate sources of different image shapes {shapes}")
        self.sources = list(sources)
        self.image_shape = shapes.pop()
        self._offsets = np.cumsum([0] + [len(s) for s in self.sources])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, indices: Any) -> dict[str, np.ndarray]:
        index = _as_index_array(indices, len(self))
        images = np.empty((index.size, *self.image_shape), np.uint8)
        labels = np.empty((index.size,), np.int32)
        part = np.searchsorted(self._offsets, index, side="right") - 1
        for k, source in enumerate(self.sources):
            rows = np.nonzero(part == k)[0]
            if rows.size:
                batch = source[index[rows] - self._offsets[k]]
                images[rows] = batch["image"]
                labels[rows] = batch["label"]
        return {"image": images, "label": labels}


def materialize(source: ArraySource, *, chunk_size: int = 2048) -> InMemorySource:
    """Reads every example of ``source`` once into an ``InMemorySource``."""
    n = len(source)
    images = np.empty((n, *source.image_shape), np.uint8)
    labels = np.empty((n,), np.int32)
    for start in range(0, n, chunk_size):
        batch = source[np.arange(start, min(start + chunk_size, n))]
        images[start : start + chunk_size] = batch["image"]
        labels[start : start + chunk_size] = batch["label"]
    return InMemorySource(images, labels)


@dataclasses.dataclass
class ImageDataset:
    """The three views the trainer and evaluators need, plus dataset facts."""

    name: str
    pretrain: ArraySource
    probe_train: ArraySource
    test: ArraySource
    num_classes: int
    image_shape: tuple[int, int, int]
    class_names: tuple[str, ...] | None = None


# --------------------------------------------------------------------------------------------
# Small helpers shared by the in-memory sources


def _with_channel_axis(images: np.ndarray, what: str) -> np.ndarray:
    """(N, H, W) -> (N, H, W, 1); (N, H, W, C) with C in {1, 3} passes; anything else errors."""
    if images.ndim == 3:
        return images[..., None]
    if images.ndim == 4 and images.shape[-1] in (1, 3):
        return images
    fix = ""
    if images.ndim == 4 and images.shape[1] in (1, 3):
        fix = " (channels first? np.transpose(x, (0, 2, 3, 1)) makes it (N, H, W, C))"
    elif images.ndim == 4 and images.shape[-1] == 4:
        fix = " (RGBA? drop the alpha channel: x[..., :3])"
    raise ValueError(
        f"{what} must be (N, H, W) or (N, H, W, C) with C in {{1, 3}}, got shape "
        f"{images.shape}{fix}"
    )


def first_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Indices (ascending) of the first ``per_class`` examples of every class, in stored order."""
    if per_class < 1:
        raise ValueError(f"per-class limit must be >= 1, got {per_class}")
    keep = np.zeros(labels.shape, bool)
    for cls in np.unique(labels):
        keep[np.nonzero(labels == cls)[0][:per_class]] = True
    return np.nonzero(keep)[0]


def _limit_per_class(source: InMemorySource, per_class: int | None) -> InMemorySource:
    if per_class is None:
        return source
    index = first_per_class(source.labels, per_class)
    return InMemorySource(source.images[index], source.labels[index])


def _stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified (train, test) index split via scikit-learn."""
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"{what}: test_fraction must be in (0, 1), got {test_fraction}")
    try:
        train_idx, test_idx = train_test_split(
            np.arange(labels.size), test_size=test_fraction, random_state=seed, stratify=labels
        )
    except ValueError as err:  # e.g. a class with a single example cannot be stratified
        raise ValueError(
            f"{what}: cannot make a stratified {test_fraction:.0%} test split ({err}); "
            "give a separate test set or more images per class"
        ) from err
    return np.sort(train_idx), np.sort(test_idx)


def _get(cfg: dict[str, Any], key: str) -> Any:
    """A field of a ``resolve_data_config`` dict."""
    return cfg[key]


# --------------------------------------------------------------------------------------------
# IDX (Fashion-MNIST) files


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file (raw or gzip) into a numpy array of its stored dtype and dims.

    Layout: two zero bytes, a type code, the number of dims, then one big-endian uint32 per dim,
    then the row-major data. A wrong magic number, a truncated or over-long payload, or a corrupt
    gzip stream raises ValueError naming the file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"IDX file not found: {path}")
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as err:
            raise ValueError(f"{path}: corrupt or truncated gzip stream ({err})") from err
    if len(raw) < 4:
        raise ValueError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    zero0, zero1, type_code, ndim = raw[0], raw[1], raw[2], raw[3]
    magic = int.from_bytes(raw[:4], "big")
    if zero0 != 0 or zero1 != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(
            f"{path}: not an IDX file, magic number 0x{magic:08x} (expected 0x00000801 for "
            "labels or 0x00000803 for images)"
        )
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} of {header_len} bytes)")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    got = len(raw) - header_len
    if got != expected:
        kind = "truncated" if got < expected else "has trailing bytes"
        raise ValueError(
            f"{path}: IDX payload {kind}: dims {dims} of {dtype} need {expected} bytes, "
            f"file has {got}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(dims)
    return data.astype(dtype.newbyteorder("="), copy=True)


def _fashion_mnist_file(data_dir: str, stem: str) -> str:
    for candidate in (stem + ".gz", stem):
        path = os.path.join(data_dir, candidate)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}(.gz) not found in {data_dir}. Install the Debian package "
        f"(`sudo apt-get install dataset-fashion-mnist`, files go to {DEFAULT_FASHION_MNIST_DIR})"
        " or point --config.data.data_dir at the folder holding the four IDX files. The quick "
        "start needs neither: --config.data.source=fashion_mnist_subset ships in the package."
    )


def load_fashion_mnist_arrays(
    data_dir: str | None = None,
) -> dict[str, np.ndarray]:
    """The full Fashion-MNIST as arrays ``x_train (60000, 28, 28), y_train, x_test, y_test``."""
    data_dir = data_dir or DEFAULT_FASHION_MNIST_DIR
    arrays = {}
    for key, stem in FASHION_MNIST_FILES.items():
        path = _fashion_mnist_file(data_dir, stem)
        try:
            arrays[key] = read_idx(path)
        except ValueError as err:
            raise ValueError(
                f"{err}. Fix: reinstall the data (`sudo apt-get install --reinstall "
                "dataset-fashion-mnist`) or point --config.data.data_dir at intact files"
            ) from err
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or images.dtype != np.uint8 or labels.shape != images.shape[:1]:
            raise ValueError(
                f"Fashion-MNIST {split} files in {data_dir} disagree: images "
                f"{images.dtype} {images.shape}, labels {labels.shape}"
            )
    return {
        "x_train": arrays["train_images"],
        "y_train": arrays["train_labels"].astype(np.int32),
        "x_test": arrays["test_images"],
        "y_test": arrays["test_labels"].astype(np.int32),
    }


# --------------------------------------------------------------------------------------------
# Sources


def labelled_dataset(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    cfg: Any,
    num_classes: int | None = None,
    class_names: tuple[str, ...] | None = None,
    x_unlabeled: np.ndarray | None = None,
) -> ImageDataset:
    """An in-memory ImageDataset from uint8 arrays (N, H, W[, C]) and int labels, with the
    shipped sources' checks and `cfg`'s per-class limits; pre-training uses the train split
    (+ the unlabelled images, labelled -1). For a data source of your own (`register_source`)."""
    train = _limit_per_class(
        InMemorySource(_with_channel_axis(x_train, "train images"), y_train),
        _get(cfg, "train_per_class"),
    )
    test = _limit_per_class(
        InMemorySource(_with_channel_axis(x_test, "test images"), y_test),
        _get(cfg, "test_per_class"),
    )
    if train.image_shape != test.image_shape:
        raise ValueError(
            f"{name}: train images {train.image_shape} and test images {test.image_shape} differ"
        )
    for split, src in (("train", train), ("test", test)):
        if len(src) == 0:
            raise ValueError(f"{name}: the {split} split is empty")
        if src.labels.min() < 0:
            raise ValueError(f"{name}: {split} labels must be >= 0, found {src.labels.min()}")
    inferred = int(max(train.labels.max(), test.labels.max())) + 1
    num_classes = num_classes or inferred
    if inferred > num_classes:
        raise ValueError(
            f"{name}: label {inferred - 1} >= num_classes={num_classes}; for source=npz set "
            f"--config.data.num_classes={inferred} or leave it unset (the largest label + 1)")
    pretrain: ArraySource = train
    if x_unlabeled is not None:
        unlabeled = _with_channel_axis(x_unlabeled, "unlabelled images")
        if unlabeled.shape[1:] != train.image_shape:
            raise ValueError(
                f"{name}: unlabelled images {unlabeled.shape[1:]} differ from train "
                f"{train.image_shape}"
            )
        pretrain = ConcatSource(
            [train, InMemorySource(unlabeled, np.full(unlabeled.shape[0], -1, np.int32))]
        )
    return ImageDataset(
        name=name,
        pretrain=pretrain,
        probe_train=train,
        test=test,
        num_classes=num_classes,
        image_shape=train.image_shape,
        class_names=class_names,
    )


def _load_fashion_mnist(cfg: Any) -> ImageDataset:
    arrays = load_fashion_mnist_arrays(_get(cfg, "data_dir") or _get(cfg, "path"))
    return labelled_dataset(
        "fashion_mnist", **arrays, cfg=cfg, num_classes=10,
        class_names=FASHION_MNIST_CLASSES,
    )


def fashion_mnist_subset_path() -> importlib.resources.abc.Traversable:
    """Where the shipped subset lives inside the installed package."""
    return importlib.resources.files("cldro_jax").joinpath("assets", FASHION_MNIST_SUBSET_ASSET)


def load_fashion_mnist_subset_arrays() -> dict[str, np.ndarray]:
    """The shipped subset's arrays (``x_train, y_train, x_test, y_test``, the source indices
    ``train_index, test_index`` into the full Fashion-MNIST splits, ``seed``, ``provenance``)."""
    resource = fashion_mnist_subset_path()
    if not resource.is_file():
        raise FileNotFoundError(
            f"the packaged Fashion-MNIST subset {resource} is missing: reinstall cldro_jax, or "
            "rebuild it with `python scripts/make_fashion_mnist_subset.py` (needs "
            "`sudo apt-get install dataset-fashion-mnist`)"
        )
    with resource.open("rb") as f, np.load(f, allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files}


def _load_fashion_mnist_subset(cfg: Any) -> ImageDataset:
    arrays = load_fashion_mnist_subset_arrays()
    return labelled_dataset(
        "fashion_mnist_subset",
        arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"],
        cfg=cfg, num_classes=10, class_names=FASHION_MNIST_CLASSES,
    )


def _load_digits(cfg: Any) -> ImageDataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Stored as 0..16 intensities; scale to the full uint8 range the augmentation expects.
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    labels = digits.target.astype(np.int32)
    train_idx, test_idx = _stratified_split(
        labels, float(_get(cfg, "test_fraction")), int(_get(cfg, "split_seed")), "digits"
    )
    return labelled_dataset(
        "digits",
        images[train_idx], labels[train_idx], images[test_idx], labels[test_idx],
        cfg=cfg, num_classes=10, class_names=tuple(str(d) for d in range(10)),
    )


_NPZ_KEYS = {
    "x_train": ("x_train", "train_images", "images_train"),
    "y_train": ("y_train", "train_labels", "labels_train"),
    "x_test": ("x_test", "test_images", "images_test"),
    "y_test": ("y_test", "test_labels", "labels_test"),
}


def _uint8_fix(x: np.ndarray) -> str:
    """How to turn ``x`` into uint8 0..255 images, judged from its values (one fix does not fit
    all: ``x * 255`` overflows images already in 0..255)."""
    if x.dtype.kind not in "biuf" or x.size == 0:
        return "save the pixels as one numeric array, 0..255"
    if x.dtype.kind == "b":
        return "x.astype(np.uint8) * 255 (binary images)"
    lo, hi = float(np.nanmin(x)), float(np.nanmax(x))
    if lo < 0:
        return (f"its values go down to {lo:g}: they look normalised (mean/std); save the "
                "original 0..255 pixels instead")
    if x.dtype.kind in "biu" and hi <= 255:
        return "x.astype(np.uint8) (its values already lie in 0..255)"
    if x.dtype.kind == "f" and hi <= 1:
        return "np.round(x * 255).astype(np.uint8) (its values lie in [0, 1])"
    if x.dtype.kind == "f" and hi <= 255:
        return "np.round(x).astype(np.uint8) (its values lie in [0, 255])"
    return (f"its values reach {hi:g}: rescale to 0..255, e.g. np.round(x * 255 / MAX)"
            ".astype(np.uint8) with MAX the largest value of the format (65535 for 16-bit)")


def _label_fix(y: np.ndarray) -> str:
    """How to turn ``y`` into a 1-D integer array of class indices, judged from what it is."""
    if y.ndim == 2 and y.shape[1] == 1:
        return "y.reshape(-1)"
    if y.ndim == 2:
        return "one-hot or score rows? y.argmax(1)"
    if y.ndim == 1 and y.dtype.kind in "bf":
        return "y.astype(np.int64) (whole-number labels)"
    if y.ndim == 1 and y.dtype.kind in "USO":
        return ("class names? map them to 0..C-1 with one mapping for both splits: names = "
                "np.unique(np.concatenate([y_train, y_test])); y = np.searchsorted(names, y)")
    return "one class index 0..C-1 per image"


def load_npz_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads and validates an image-classification ``.npz`` (keys in the module docstring)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"npz file not found: {path}. Set --config.data.path to a .npz with arrays "
            "x_train, y_train, x_test, y_test"
        )
    stored, object_keys = {}, []
    try:
        with np.load(path, allow_pickle=False) as npz:
            for key in npz.files:
                try:
                    stored[key] = npz[key]
                except ValueError as err:
                    # Object arrays (a list of differently sized images, say) need pickle,
                    # which reading a data file must not run; say which array and why.
                    if "allow_pickle" not in str(err):
                        raise
                    object_keys.append(key)
    except (ValueError, OSError, zlib.error, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: not a readable .npz file ({err})") from err
    if object_keys:
        raise ValueError(
            f"{path}: {object_keys} are object arrays (e.g. a list of images of different "
            "sizes, or of Python objects), which are not loaded (they would need pickle). Save "
            "images as one uint8 array, e.g. np.stack(images) after resizing them to one size, "
            "and labels as one integer array"
        )
    arrays = {}
    for key, aliases in _NPZ_KEYS.items():
        found = [a for a in aliases if a in stored]
        if not found:
            raise ValueError(
                f"{path}: missing array {key!r} (also accepted: {aliases[1:]}); it holds "
                f"{sorted(stored)}"
            )
        if len(found) > 1:   # which one was meant cannot be known
            raise ValueError(f"{path} holds both {' and '.join(found)}: keep one")
        arrays[key] = stored[found[0]]
    spellings = [key for key in ("x_unlabeled", "x_unlabelled") if key in stored]
    if len(spellings) > 1:
        raise ValueError(f"{path} holds both x_unlabeled and x_unlabelled: keep one (they would "
                         "not be merged)")
    if spellings:
        arrays["x_unlabeled"] = stored[spellings[0]]
    for key in ("x_train", "x_test", "x_unlabeled"):
        if key not in arrays:
            continue
        if arrays[key].dtype != np.uint8:
            raise ValueError(
                f"{path}: {key} must be uint8 0..255, got {arrays[key].dtype}. Convert first: "
                f"{_uint8_fix(arrays[key])}"
            )
        _with_channel_axis(arrays[key], f"{path}: {key}")
        # [0, 1] floats cast with .astype(np.uint8) keep only 0 and 1: the images would train
        # as nearly black without a word.
        if arrays[key].size and arrays[key].max() <= 1:
            raise ValueError(
                f"{path}: {key} is uint8 but every pixel is 0 or 1: images in [0, 1] cast to "
                "uint8 without scaling. Save np.round(x * 255).astype(np.uint8) from the [0, 1] "
                "values (binary images: x * 255)"
            )
    for x_key, y_key in (("x_train", "y_train"), ("x_test", "y_test")):
        labels = arrays[y_key]
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"{path}: {y_key} must be a 1-D integer array, got {labels.dtype} {labels.shape}"
                f". Fix: {_label_fix(labels)}"
            )
        if labels.shape[0] != arrays[x_key].shape[0]:
            raise ValueError(
                f"{path}: {x_key} has {arrays[x_key].shape[0]} images but {y_key} has "
                f"{labels.shape[0]} labels"
            )
        info = np.iinfo(np.int32)
        if labels.size and (labels.max() > info.max or labels.min() < info.min):   # would wrap
            bad = labels.max() if labels.max() > info.max else labels.min()
            raise ValueError(f"{path}: {y_key} must hold class indices 0..C-1, got a label {bad}")
        arrays[y_key] = labels.astype(np.int32)
    return arrays


def _load_npz(cfg: Any) -> ImageDataset:
    path = _get(cfg, "path")
    if not path:
        raise ValueError("source=npz needs --config.data.path=/path/to/data.npz")
    arrays = load_npz_arrays(path)
    name = os.path.splitext(os.path.basename(path))[0]
    dataset = labelled_dataset(name, **arrays, cfg=cfg, num_classes=_get(cfg, "num_classes"))
    # Labels not 0..C-1 trained without a word: 1-based labels made an extra class no image has,
    # and test labels in another encoding than train's counted as errors no probe could avoid.
    train_classes = np.unique(arrays["y_train"])
    unseen = np.setdiff1d(np.unique(arrays["y_test"]), train_classes)
    if unseen.size:
        raise ValueError(
            f"{path}: y_test holds classes {unseen[:10].tolist()} that y_train never has, so no "
            "classifier fitted on the train split can predict them. Check that both splits use "
            "one label encoding (each class the same index 0..C-1 in y_train and y_test)"
        )
    missing = np.setdiff1d(np.arange(dataset.num_classes), train_classes)
    if missing.size and _get(cfg, "num_classes") is None:
        raise ValueError(
            f"{path}: labels go up to {dataset.num_classes - 1} but classes "
            f"{missing[:10].tolist()} never occur in y_train: labels must be 0..C-1 (1-based "
            "labels? save y - 1). To keep empty classes on purpose, set "
            f"--config.data.num_classes={dataset.num_classes}"
        )
    return dataset


def _scan_class_folders(
    root: str, class_names: tuple[str, ...] | None = None
) -> tuple[list[str], np.ndarray, tuple[str, ...]]:
    """Image paths and labels of ``root/<class>/<image>`` (classes sorted by name).

    With ``class_names`` given (a test folder), labels follow those names and a class may be
    absent; without (the train folder), every class folder must hold images.
    """
    is_train = class_names is None

    def hidden(name: str) -> bool:
        # .ipynb_checkpoints, macOS ._ files, and the __MACOSX folder a macOS zip unpacks to.
        return name.startswith(".") or name == "__MACOSX"

    def is_image(name: str) -> bool:
        return not hidden(name) and os.path.splitext(name)[1].lower() in _IMAGE_SUFFIXES

    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"image folder not found: {root}. Point --config.data.data_dir (train) / "
            "--config.data.test_dir (test) at a folder with one sub-folder per class"
        )
    # Hidden entries are never classes or images.
    found = tuple(sorted(d for d in os.listdir(root)
                         if not hidden(d) and os.path.isdir(os.path.join(root, d))))
    if not found:
        raise ValueError(f"{root}: no class sub-folders (expected {root}/<class>/<image>.png)")
    loose = sorted(f for f in os.listdir(root) if is_image(f)
                   and os.path.isfile(os.path.join(root, f)))
    if loose:   # in no class: they would be left out without a word
        raise ValueError(
            f"{root} holds {len(loose)} image(s) outside the class folders (e.g. {loose[0]}), "
            f"which have no label; move them into {root}/<class>/ or out of {root}")
    if class_names is None:
        class_names = found
    unknown = sorted(set(found) - set(class_names))
    if unknown:
        raise ValueError(f"{root}: classes {unknown} are not among the train classes")
    paths, labels = [], []
    for label, cls in enumerate(class_names):
        cls_dir = os.path.join(root, cls)
        if not os.path.isdir(cls_dir):
            continue
        entries = sorted(os.listdir(cls_dir))
        files = [f for f in entries if is_image(f)]
        # Only images directly inside a class folder are read. Images further down (class/2019/
        # x.jpg, or a dataset root holding train/ and test/) were skipped without a word.
        for sub in entries:
            sub_dir = os.path.join(cls_dir, sub)
            if hidden(sub) or not os.path.isdir(sub_dir):
                continue
            seen = set()   # linked folders are followed, each real folder once (no loops)
            for walk_dir, dirs, names in os.walk(sub_dir, followlinks=True):
                real = os.path.realpath(walk_dir)
                if real in seen:
                    dirs[:] = []
                    continue
                seen.add(real)
                dirs[:] = [d for d in dirs if not hidden(d)]
                if any(is_image(n) for n in names):
                    raise ValueError(
                        f"{walk_dir} holds images, but only images directly inside a class "
                        f"folder are read ({root}/<class>/<image>). Move them into {cls_dir}; "
                        f"or, if {root} holds split folders (train/, test/), point "
                        "--config.data.data_dir at the train folder and --config.data.test_dir "
                        "at the test folder"
                    )
        if not files and is_train:
            raise ValueError(f"{cls_dir}: class folder holds no images ({sorted(_IMAGE_SUFFIXES)})")
        paths += [os.path.join(cls_dir, f) for f in files]
        labels += [label] * len(files)
    if not paths:
        raise ValueError(f"{root}: no images found")
    return paths, np.asarray(labels, np.int32), class_names


def _decode_images(
    paths: list[str], image_size: tuple[int, int] | None, channels: int | None
) -> np.ndarray:
    """Decodes image files with PIL into one uint8 (N, H, W, C) array."""
    from PIL import Image, UnidentifiedImageError

    def open_checked(path: str) -> Image.Image:
        try:
            image = Image.open(path)
            image.load()
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise ValueError(f"cannot decode image {path} ({err}); remove or replace it") from err
        return image

    def to_8bit(image: Image.Image, path: str) -> Image.Image:
        # PIL's convert("L"/"RGB") clips 16- and 32-bit pixels at 255 instead of rescaling them,
        # which would turn a 16-bit photo nearly white without a word.
        # PNG and PGM/PPM hold at most 16 bits; Pillow opens them as "I" too (PGM always, PNG
        # before 10.3), PGM already scaled from its maxval to 0..65535.
        if image.mode.startswith("I;16") or (image.mode == "I" and image.format in ("PNG", "PPM")):
            pixels = np.asarray(image).astype(np.uint32)
            return Image.fromarray(((pixels * 255 + 32767) // 65535).astype(np.uint8), "L")
        if image.mode in ("I", "F"):
            raise ValueError(
                f"{path} has 32-bit {'integer' if image.mode == 'I' else 'float'} pixels (PIL mode "
                f"{image.mode!r}), whose range cannot be known; save the images as 8- or 16-bit "
                "PNG/JPEG, or pass them as a uint8 .npz (--config.data.source=npz)")
        return image

    def header(path: str) -> tuple[str, tuple[int, int]]:
        try:
            with Image.open(path) as image:   # reads the header only
                return image.mode, image.size
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise ValueError(f"cannot decode image {path} ({err}); remove or replace it") from err

    # Two passes, one image open at a time: the headers decide the channels and the size, then
    # each image is decoded, converted and resized into the output before the next one opens.
    # (Holding every decoded image kept a whole photo folder in memory at full size, and PIL
    # keeps multi-frame files such as GIFs open: a large folder ran out of file handles.)
    headers = [header(p) for p in paths]
    if channels is None:
        # "LA" is grayscale with alpha (the alpha channel is dropped, as for RGBA).
        grayscale = all(mode in ("1", "L", "LA", "La", "I") or mode.startswith("I;16")
                        for mode, _ in headers)
        channels = 1 if grayscale else 3
    if channels not in (1, 3):
        raise ValueError(f"config.data.channels must be 1 or 3, got {channels}")
    if image_size is None:
        sizes = {size for _, size in headers}
        if len(sizes) > 1:
            first = headers[0][1]
            other, other_size = next((p, size) for p, (_, size) in zip(paths, headers, strict=True)
                                     if size != first)
            raise ValueError(
                f"images differ in size ({paths[0]} is {first[1]}x{first[0]} (HxW), {other} is "
                f"{other_size[1]}x{other_size[0]}; {len(sizes)} sizes in all). Set "
                "--config.data.image_size='(H, W)' to resize them all"
            )
        width, height = headers[0][1]
    else:
        height, width = (int(s) for s in image_size)
    out = np.empty((len(paths), height, width, channels), np.uint8)
    mode = "L" if channels == 1 else "RGB"
    for row, path in enumerate(paths):
        image = open_checked(path)
        try:
            converted = to_8bit(image, path).convert(mode)
            if converted.size != (width, height):
                converted = converted.resize((width, height), Image.Resampling.BILINEAR)
            out[row] = np.asarray(converted, np.uint8).reshape(height, width, channels)
        finally:
            image.close()
    return out


def _load_folder(cfg: Any) -> ImageDataset:
    data_dir, path = _get(cfg, "data_dir"), _get(cfg, "path")
    if data_dir and path and os.path.realpath(data_dir) != os.path.realpath(path):
        # Both name the train folder; silently preferring one trained on the other's images.
        raise ValueError(
            f"source=folder got two train folders, --config.data.data_dir={data_dir} and "
            f"--config.data.path={path}: give one"
        )
    root = data_dir or path
    if not root:
        raise ValueError(
            "source=folder needs --config.data.data_dir=/path/to/train (one sub-folder per class)"
        )
    image_size = _get(cfg, "image_size")
    channels = _get(cfg, "channels")
    paths, labels, class_names = _scan_class_folders(root)
    test_dir = _get(cfg, "test_dir")
    if test_dir:
        test_paths, test_labels, _ = _scan_class_folders(test_dir, class_names)
        # The train folder (or a link into it) as the test folder measured test accuracy on
        # training images.
        train_files = {os.path.realpath(p) for p in paths}
        shared = [p for p in test_paths if os.path.realpath(p) in train_files]
        if shared:
            raise ValueError(
                f"{test_dir}: {len(shared)} test images are also train images in {root} (e.g. "
                f"{shared[0]}), so the test accuracy would be measured on training data. Give a "
                "test folder disjoint from the train folder, or drop --config.data.test_dir to "
                "test on a stratified --config.data.test_fraction of the train folder"
            )
        # Decode both together so that one size / channel decision covers both splits.
        images = _decode_images(paths + test_paths, image_size, channels)
        x_train, x_test = images[: len(paths)], images[len(paths) :]
        y_train, y_test = labels, test_labels
    else:
        images = _decode_images(paths, image_size, channels)
        train_idx, test_idx = _stratified_split(
            labels, float(_get(cfg, "test_fraction")), int(_get(cfg, "split_seed")), root
        )
        x_train, y_train = images[train_idx], labels[train_idx]
        x_test, y_test = images[test_idx], labels[test_idx]
    return labelled_dataset(
        os.path.basename(os.path.normpath(root)),
        x_train, y_train, x_test, y_test,
        cfg=cfg, num_classes=len(class_names), class_names=class_names,
    )


# --------------------------------------------------------------------------------------------
# tfds


# The README's install of the optional extra (TensorFlow, for preparing the official datasets).
TFDS_PREPARE_INSTALL = ".venv/bin/pip install -e '.[tfds-prepare]' (from the repository root)"


def tfds_not_prepared_message(name: str, data_dir: str | None, looked_in: str) -> str:
    """The error text for a tfds dataset that is neither prepared nor downloadable now."""
    shown_dir = data_dir or "DIR"
    return (
        f"tfds dataset {name!r} is not prepared (looked in {looked_in}). cldro_jax reads tfds "
        "datasets with tfds.data_source (random access; needs file_format=array_record) and, "
        "by default, downloads nothing at run time.\n"
        "Fix, one of:\n"
        "  * point at a prepared copy: --config.data.data_dir=/path/to/tensorflow_datasets\n"
        "  * prepare it once (needs internet, and TensorFlow, which these official builders "
        "use to encode images):\n"
        f"      {TFDS_PREPARE_INSTALL}\n"
        f"      python -m tensorflow_datasets.scripts.download_and_prepare --datasets={name} "
        f"--data_dir={shown_dir} --file_format=array_record\n"
        f"    then run with --config.data.data_dir={shown_dir}\n"
        "  * or let tfds download and prepare it now: --config.data.download=True (also needs "
        "TensorFlow and internet).\n"
        "The quick start (`make quickstart`) needs no download: it uses the Fashion-MNIST "
        "subset shipped in the package (--config.data.source=fashion_mnist_subset)."
    )


def _check_download_possible(builder: Any, name: str, data_dir: str | None) -> None:
    """Fails at once when tfds could not download+prepare: no TensorFlow, or hosts unreachable.

    Without this, an offline tfds download retries for minutes before failing.
    """
    base = tfds_not_prepared_message(name, data_dir, builder.data_dir)
    if importlib.util.find_spec("tensorflow") is None:
        raise FileNotFoundError(
            f"{base}\n--config.data.download=True cannot help here: TensorFlow is not installed "
            f"({TFDS_PREPARE_INSTALL})."
        )
    hosts = {urllib.parse.urlsplit(url) for url in (builder.url_infos or {})}
    for url in hosts:
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            socket.create_connection((url.hostname, port), timeout=5).close()
        except OSError as err:
            raise FileNotFoundError(
                f"{base}\n--config.data.download=True cannot help here: {url.hostname}:{port} "
                f"is unreachable ({err})."
            ) from err


# tfds warns about a missing version folder twice (naming a folder that need not exist) before
# the error below says what is missing and how to fix it.
_TFDS_NO_INFO_NOTICE = "Variant folder"


def _open_tfds_split(name: str, split: str, cfg: Any) -> Any:
    """``tfds.data_source`` for one split, with clear errors for unprepared datasets."""
    with logs.absl_messages_hidden(_TFDS_NO_INFO_NOTICE):
        return _open_tfds_split_logged(name, split, cfg)


def _open_tfds_split_logged(name: str, split: str, cfg: Any) -> Any:
    import tensorflow_datasets as tfds

    data_dir = _get(cfg, "data_dir")
    download = bool(_get(cfg, "download"))
    if download:
        builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
        if not builder.is_prepared():
            _check_download_possible(builder, name, data_dir)
    try:
        return tfds.data_source(
            name,
            split=split,
            data_dir=data_dir,
            download=download,
            builder_kwargs={"file_format": "array_record"} if download else None,
        )
    except Exception as err:
        # tfds's own errors here are misleading ("splits is empty", "TFRECORD is not
        # supported"); translate them when the cause is a missing or non-random-access dataset.
        builder = tfds.builder(name, data_dir=data_dir)
        if not builder.is_prepared():
            raise FileNotFoundError(
                tfds_not_prepared_message(name, data_dir, builder.data_dir)
            ) from err
        file_format = getattr(builder.info.file_format, "value", builder.info.file_format)
        if file_format not in ("array_record", "parquet"):
            raise ValueError(
                f"tfds dataset {name!r} at {builder.data_dir} is prepared as {file_format}, which "
                "has no random access. Re-prepare it into another data_dir with "
                f"`python -m tensorflow_datasets.scripts.download_and_prepare --datasets={name} "
                "--data_dir=NEW_DIR --file_format=array_record` (needs "
                f"{TFDS_PREPARE_INSTALL}) and pass --config.data.data_dir=NEW_DIR"
            ) from err
        raise


def _unlabeled_split_names(cfg: Any) -> set[str]:
    names = _get(cfg, "unlabeled_splits") or ()
    return {names} if isinstance(names, str) else set(names)   # a str is one name, not letters


def _unversioned(name: str) -> str:
    """A tfds name without its config or version ("stl10:1.0.0" -> "stl10")."""
    return name.split(":")[0].split("/")[0]


def _tfds_split_source(
    name: str, split: str, cfg: Any, features: Any, cache: dict[str, ArraySource]
) -> ArraySource:
    """One (possibly ``+``-joined) split as a source; in RAM when small enough."""
    if split in cache:
        return cache[split]
    parts = [p.strip() for p in split.split("+") if p.strip()]
    if not parts:
        raise ValueError(f"empty tfds split name {split!r}")
    unlabeled_splits = _unlabeled_split_names(cfg)
    image_shape = tuple(features["image"].shape)
    if len(image_shape) != 3 or None in image_shape:
        raise ValueError(f"tfds {name}: image feature shape {image_shape} is not a fixed (H, W, C)")
    in_memory = _get(cfg, "in_memory")
    max_bytes = float(_get(cfg, "in_memory_max_mb")) * 2**20
    sources = []
    for part in parts:
        if part in cache:
            sources.append(cache[part])
            continue
        base, bracket, rest = part.partition("[")
        base = _TFDS_SPLIT_ALIASES.get(_unversioned(name), {}).get(base, base)
        part = base + bracket + rest
        if part in cache:
            sources.append(cache[part])
            continue
        source: ArraySource = TfdsSource(
            _open_tfds_split(name, part, cfg),
            image_shape=image_shape,
            unlabeled=base in unlabeled_splits,
            read_threads=int(_get(cfg, "read_threads")),
            description=f"tfds {name} split {part!r}",
        )
        nbytes = len(source) * int(np.prod(image_shape))
        if in_memory not in (None, True, False):
            raise ValueError(
                f"config.data.in_memory must be None, True or False, got {in_memory!r}"
            )
        if in_memory or (in_memory is None and nbytes <= max_bytes):
            source = materialize(source)
        cache[part] = source
        sources.append(source)
    cache[split] = sources[0] if len(sources) == 1 else ConcatSource(sources)
    return cache[split]


def _load_tfds(cfg: Any) -> ImageDataset:
    import tensorflow_datasets as tfds

    name = _get(cfg, "name")
    if not name:
        raise ValueError("source=tfds needs --config.data.name (cifar10, cifar100 or stl10)")
    # "stl10:1.0.0" is stl10 for the split defaults (else it would pre-train on `train` only).
    defaults = _TFDS_SPLIT_DEFAULTS.get(_unversioned(name), _TFDS_GENERIC_SPLITS)
    pretrain_split = _get(cfg, "pretrain_split") or defaults[0]
    probe_split = _get(cfg, "probe_split") or defaults[1]
    test_split = _get(cfg, "test_split") or defaults[2]
    unlabeled = _unlabeled_split_names(cfg)
    for key, split in (("probe_split", probe_split), ("test_split", test_split)):
        parts = {p.strip().partition("[")[0] for p in split.split("+")}
        if parts & unlabeled:
            raise ValueError(
                f"config.data.{key}={split!r} includes the unlabelled split "
                f"{sorted(parts & unlabeled)}: the kNN monitor and the probes need labels. Use a "
                "labelled split (e.g. 'train' / 'test'); unlabelled images belong in "
                "config.data.pretrain_split"
            )
    limited = [f"--config.data.{field}=0" for field in _PER_CLASS_FIELDS
               if _get(cfg, field) is not None]
    if limited:
        # A config made for another source (the quick start's train_per_class=200) switched to
        # tfds: say how to unset the field, not only what tfds offers instead.
        raise ValueError(
            "train_per_class/test_per_class are not supported for source=tfds; unset them with "
            f"{' '.join(limited)}, and subsample with tfds split slicing instead, e.g. "
            "--config.data.probe_split='train[:10%]'"
        )
    features = tfds.builder(name, data_dir=_get(cfg, "data_dir")).info.features
    for key in ("image", "label"):
        if key not in features:
            raise ValueError(f"tfds {name}: expected an {key!r} feature, it has {list(features)}")
    cache: dict[str, ArraySource] = {}
    pretrain = _tfds_split_source(name, pretrain_split, cfg, features, cache)
    probe_train = _tfds_split_source(name, probe_split, cfg, features, cache)
    test = _tfds_split_source(name, test_split, cfg, features, cache)
    label = features["label"]
    names = tuple(label.names) if getattr(label, "names", None) else None
    return ImageDataset(
        name=name,
        pretrain=pretrain,
        probe_train=probe_train,
        test=test,
        num_classes=int(label.num_classes),
        image_shape=pretrain.image_shape,
        class_names=names,
    )


_LOADERS: dict[str, Callable[[Any], ImageDataset]] = {
    "tfds": _load_tfds,
    "folder": _load_folder,
    "npz": _load_npz,
    "fashion_mnist": _load_fashion_mnist,
    "fashion_mnist_subset": _load_fashion_mnist_subset,
    "digits": _load_digits,
}


def register_source(name: str, loader: Callable[[dict[str, Any]], ImageDataset], *,
                    fields: tuple[str, ...] = (), replace: bool = False) -> None:
    """Makes a data source of your own usable as `--config.data.source=name`.

    `loader(data)` gets `config.data` as a plain dict of every field (defaults filled in,
    `resolve_data_config`) and returns an `ImageDataset`; `labelled_dataset(...)` builds one
    from uint8 arrays with the shipped sources' checks. `fields` are the `config.data` fields it
    reads (the others, when changed, are named as unused at start-up). Register it in a module
    named by `--config.imports` so that the probe and a resume find it too
    (docs/extending.md).
    """
    _registering.check_new_entry("data source", _LOADERS, name, loader, replace,
                                 builtin=SOURCES)
    unknown = sorted(set(fields) - set(_DEFAULTS))
    if unknown:
        raise ValueError(f"register_source({name!r}): unknown config.data fields {unknown}; "
                         f"known: {sorted(_DEFAULTS)}")
    _LOADERS[name] = loader
    SOURCE_FIELDS[name] = (*tuple(fields), *_PER_CLASS_FIELDS)


def source_names() -> tuple[str, ...]:
    return tuple(_LOADERS)


def load_image_dataset(data_config: Any) -> ImageDataset:
    """Loads the dataset that ``config.data`` describes (fields in the module docstring)."""
    cfg = resolve_data_config(data_config)
    source = cfg["source"]
    if source not in _LOADERS:
        raise ValueError(
            f"config.data.source={source!r}; choose one of {source_names()} (a source of your "
            "own: images.register_source in a module named by --config.imports, "
            "docs/extending.md)")
    return _LOADERS[source](cfg)


def describe(dataset: ImageDataset) -> str:
    """One line for logs: name, sizes, image shape, classes."""
    return json.dumps(
        {
            "name": dataset.name,
            "pretrain": len(dataset.pretrain),
            "probe_train": len(dataset.probe_train),
            "test": len(dataset.test),
            "image_shape": list(dataset.image_shape),
            "num_classes": dataset.num_classes,
        }
    )
