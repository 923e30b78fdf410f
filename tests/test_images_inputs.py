"""A researcher's own images (folder and npz sources) in the shapes and encodings they come in:
each either loads right or is refused with an error naming the file and the fix."""

import os
import shutil

import numpy as np
import pytest
from PIL import Image

from cldro_jax.data import images


def cfg(**fields):
    config = images.default_data_config()
    config.update(fields)
    return config


def _png(path, value, size=(4, 4)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full(size, value, np.uint8), "L").save(path)


# ------------------------------------------------------------------------------------------
# Image folders


def test_folder_test_dir_sharing_files_with_train_is_refused(tmp_path):
    # The same folder (or a link to it) as train and test measured test accuracy on training
    # images without a word.
    for cls, value in (("a", 10), ("b", 200)):
        for k in range(2):
            _png(str(tmp_path / "tr" / cls / f"{k}.png"), value + k)
    with pytest.raises(ValueError, match=r"4 test images are also train images.*test_fraction"):
        images.load_image_dataset(cfg(source="folder", data_dir=str(tmp_path / "tr"),
                                      test_dir=str(tmp_path / "tr")))
    os.symlink(tmp_path / "tr" / "b", tmp_path / "te_b")
    (tmp_path / "te").mkdir()
    os.symlink(tmp_path / "te_b", tmp_path / "te" / "b")
    with pytest.raises(ValueError, match=r"te: 2 test images are also train images"):
        images.load_image_dataset(cfg(source="folder", data_dir=str(tmp_path / "tr"),
                                      test_dir=str(tmp_path / "te")))


def test_folder_images_in_nested_sub_folders_are_not_silently_dropped(tmp_path):
    root = tmp_path / "imgs"
    for cls in ("a", "b"):
        for k in range(2):
            _png(str(root / cls / f"{k}.png"), k)
            _png(str(root / cls / "2019" / f"{k}.png"), 100 + k)   # these were skipped
    with pytest.raises(ValueError, match=r"imgs/a/2019 holds images.*directly inside"):
        images.load_image_dataset(cfg(source="folder", data_dir=str(root), test_fraction=0.5))
    # A dataset root holding train/ and test/ given as the train folder: named as such.
    shutil.rmtree(root / "a" / "2019")
    shutil.rmtree(root / "b" / "2019")
    split_root = tmp_path / "dataset"
    shutil.copytree(root, split_root / "train")
    shutil.copytree(root, split_root / "test")
    with pytest.raises(ValueError, match=r"dataset/test/a holds images.*test_dir"):
        images.load_image_dataset(cfg(source="folder", data_dir=str(split_root)))
    # Hidden sub-folders (a notebook's checkpoints) and folders of non-images are no concern.
    _png(str(root / "a" / ".ipynb_checkpoints" / "x.png"), 7)
    (root / "b" / "notes").mkdir()
    (root / "b" / "notes" / "readme.txt").write_text("collected 2019")
    ds = images.load_image_dataset(cfg(source="folder", data_dir=str(root), test_fraction=0.5))
    assert len(ds.probe_train) + len(ds.test) == 4


def test_folder_jfif_and_heic_files_are_not_silently_dropped(tmp_path):
    root = tmp_path / "imgs"
    for cls in ("a", "b"):
        for k in range(2):
            _png(str(root / cls / f"{k}.png"), k)
    # Windows and browsers save JPEGs as .jfif; they were skipped as "not an image".
    Image.fromarray(np.full((4, 4), 50, np.uint8), "L").save(root / "a" / "x.jfif", "JPEG")
    ds = images.load_image_dataset(cfg(source="folder", data_dir=str(root), test_fraction=0.4))
    assert len(ds.probe_train) + len(ds.test) == 5
    # iPhone photos (.heic) PIL cannot decode: refused by name instead of skipped.
    (root / "b" / "IMG_0001.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(16))
    with pytest.raises(ValueError, match=r"cannot decode image .*IMG_0001.HEIC"):
        images.load_image_dataset(cfg(source="folder", data_dir=str(root), test_fraction=0.4))


def test_folder_macos_zip_metadata_folder_is_not_a_class(tmp_path):
    root = tmp_path / "imgs"
    for cls in ("a", "b"):
        for k in range(2):
            _png(str(root / cls / f"{k}.png"), k)
    # What unzipping a macOS zip leaves next to the class folders.
    (root / "__MACOSX" / "a").mkdir(parents=True)
    (root / "__MACOSX" / "a" / "._0.png").write_bytes(b"\x00\x05\x16\x07 resource fork")
    ds = images.load_image_dataset(cfg(source="folder", data_dir=str(root), test_fraction=0.5))
    assert ds.class_names == ("a", "b")


def test_folder_data_dir_and_path_naming_different_folders_is_refused(tmp_path):
    for name in ("one", "two"):
        for cls in ("a", "b"):
            for k in range(2):
                _png(str(tmp_path / name / cls / f"{k}.png"), k)
    with pytest.raises(ValueError, match=r"data_dir=.*one and --config.data.path=.*two"):
        images.load_image_dataset(cfg(source="folder", data_dir=str(tmp_path / "one"),
                                      path=str(tmp_path / "two"), test_fraction=0.5))
    ds = images.load_image_dataset(cfg(source="folder", data_dir=str(tmp_path / "one"),
                                       path=str(tmp_path / "one"), test_fraction=0.5))
    assert ds.name == "one"


# ------------------------------------------------------------------------------------------
# npz


def _npz(tmp_path, **changes):
    rng = np.random.default_rng(0)
    arrays = dict(x_train=rng.integers(0, 256, (6, 4, 4), dtype=np.uint8),
                  y_train=np.array([0, 1, 2, 0, 1, 2]),
                  x_test=rng.integers(0, 256, (3, 4, 4), dtype=np.uint8),
                  y_test=np.array([0, 1, 2]))
    arrays.update(changes)
    path = tmp_path / "d.npz"
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return str(path)


def _load_npz(path, **fields):
    return images.load_image_dataset(cfg(source="npz", path=path, **fields))


def test_npz_uint8_images_holding_0_1_values_are_refused(tmp_path):
    # floats in [0, 1] cast with .astype(np.uint8): every pixel 0 or 1, read as nearly black.
    unit = np.random.default_rng(1).random((6, 4, 4))
    with pytest.raises(ValueError, match=r"d.npz: x_train is uint8 but every pixel is 0 or 1.*"
                                         r"np.round\(x \* 255\)"):
        _load_npz(_npz(tmp_path, x_train=unit.astype(np.uint8)))
    with pytest.raises(ValueError, match="x_test is uint8 but every pixel is 0 or 1"):
        _load_npz(_npz(tmp_path, x_test=np.zeros((3, 4, 4), np.uint8)))


@pytest.mark.parametrize("x,fix", [
    (np.full((6, 4, 4), 200, np.int64), r"x.astype\(np.uint8\)"),
    (np.full((6, 4, 4), 200.0, np.float32), r"np.round\(x\).astype\(np.uint8\)"),
    (np.full((6, 4, 4), 0.5, np.float32), r"np.round\(x \* 255\).astype\(np.uint8\)"),
    (np.full((6, 4, 4), -0.4, np.float32), r"normalised"),
    (np.ones((6, 4, 4), bool), r"x.astype\(np.uint8\) \* 255"),
])
def test_npz_non_uint8_images_get_the_fix_for_their_range(tmp_path, x, fix):
    # The one fix offered before (x * 255) overflowed 0..255 integers and floats.
    with pytest.raises(ValueError, match=r"x_train must be uint8 0..255, got .*" + fix):
        _load_npz(_npz(tmp_path, x_train=x))


def test_npz_channels_first_and_rgba_get_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"channels first.*np.transpose\(x, \(0, 2, 3, 1\)\)"):
        _load_npz(_npz(tmp_path, x_train=np.ones((6, 3, 8, 8), np.uint8) * 9))
    with pytest.raises(ValueError, match=r"alpha.*x\[\.\.\., :3\]"):
        _load_npz(_npz(tmp_path, x_train=np.ones((6, 8, 8, 4), np.uint8) * 9))


def test_npz_labels_not_0_to_c_minus_1_are_refused(tmp_path):
    # 1-based labels made an 11th class that no example has.
    with pytest.raises(ValueError, match=r"classes \[0\] never occur.*y - 1.*num_classes=4"):
        _load_npz(_npz(tmp_path, y_train=np.array([1, 2, 3, 1, 2, 3]), y_test=np.array([1, 2, 3])))
    # Test classes the train split never has cannot be learned (another label encoding).
    with pytest.raises(ValueError, match=r"y_test holds classes \[5\] that y_train never has"):
        _load_npz(_npz(tmp_path, y_test=np.array([0, 1, 5])))
    with pytest.raises(ValueError, match=r"y_test holds classes \[5\]"):
        _load_npz(_npz(tmp_path, y_test=np.array([0, 1, 5])), num_classes=6)
    # int64 labels beyond int32 in either direction would wrap to a valid class (-2**40 -> 0).
    for huge in (-2**40, 2**40):
        with pytest.raises(ValueError, match=rf"y_train must hold class indices 0..C-1, got a "
                                             rf"label {huge}"):
            _load_npz(_npz(tmp_path, y_train=np.array([0, 1, 2, 0, 1, huge])))
    # Empty classes on purpose: say how many classes there are.
    ds = _load_npz(_npz(tmp_path, y_train=np.array([1, 2, 3, 1, 2, 3]),
                        y_test=np.array([1, 2, 3])), num_classes=4)
    assert ds.num_classes == 4


@pytest.mark.parametrize("y,fix", [
    (np.array([[0], [1], [2], [0], [1], [2]]), r"y.reshape\(-1\)"),
    (np.eye(3)[[0, 1, 2, 0, 1, 2]].astype(np.int64), r"one-hot.*y.argmax\(1\)"),
    (np.array([0.0, 1.0, 2.0, 0.0, 1.0, 2.0]), r"y.astype\(np.int64\)"),
    (np.array(["cat", "dog", "eel", "cat", "dog", "eel"]), r"one mapping for both splits"),
])
def test_npz_label_shapes_and_types_get_the_fix(tmp_path, y, fix):
    with pytest.raises(ValueError, match=r"d.npz: y_train must be a 1-D integer array.*" + fix):
        _load_npz(_npz(tmp_path, y_train=y))


def test_npz_object_arrays_are_refused_by_key_with_the_fix(tmp_path):
    ragged = np.empty(6, object)
    ragged[:] = [np.zeros((4, 4), np.uint8)] * 5 + [np.zeros((5, 5), np.uint8)]
    with pytest.raises(ValueError, match=r"d.npz: \['x_train'\] .*object arrays.*np.stack"):
        _load_npz(_npz(tmp_path, x_train=ragged))


def test_npz_two_spellings_of_one_array_are_refused(tmp_path):
    path = _npz(tmp_path, train_images=np.full((6, 4, 4), 9, np.uint8))
    with pytest.raises(ValueError, match=r"holds both x_train and train_images"):
        _load_npz(path)
