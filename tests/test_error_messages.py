"""User-facing error messages that no other test triggers: each bad input goes in through the
public function a user calls, and the message must name what is wrong (and the fix, where it
gives one).

Covered: the losses' hyperparameter and input checks, SimCLRAugment's arguments, the image
sources (IDX, npz, class folders), the tokenizer folders and in-memory sentences, the TU reader
and download, a Hugging Face folder without config.json, the STS readers, and the argument
checks of the kNN and linear-probe evaluators. No training and no compilation beyond tiny ops:
every check raises before any real work starts.
"""
import json
import pathlib
import re
import shutil
import struct
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cldro_jax import losses
from cldro_jax.data import augment
from cldro_jax.data import images
from cldro_jax.data import text
from cldro_jax.data import tu_dataset
from cldro_jax.evaluators import knn
from cldro_jax.evaluators import linear_probe as lp
from cldro_jax.evaluators import sts
from cldro_jax.models import hf_checkpoint
import reference_losses as ref

ROBERTA_DIR = pathlib.Path(__file__).parent / "fixtures" / "sentence" / "roberta_tiny"


# ------------------------------------------------------------------------------------- losses
Z = jnp.ones((6, 4), jnp.float32)


@pytest.mark.parametrize("call, match", [
    # A bool is an int to numpy: temperature=True would silently mean t = 1.
    (lambda: losses.infonce(Z, Z, temperature=True),
     r"temperature must be a real number, got the bool True"),
    (lambda: losses.adnce(Z, Z, temperature=0.5, mu=False, sigma=1.0),
     r"mu must be a real number, got the bool False"),
    # A string read from a config file without conversion.
    (lambda: losses.infonce(Z, Z, temperature="0.5"),
     r"temperature must be a real number, got '0.5' of dtype <U3"),
    (lambda: losses.dcl(Z, Z, temperature=0.5, tau_plus="0.1"),
     r"tau_plus must be a real number, got '0.1'"),
    (lambda: losses.infonce(Z, Z, temperature=0.5, block_size=2.0),
     r"block_size must be None \(dense\) or a positive int, got 2.0"),
    (lambda: losses.hcl(Z, Z, temperature=0.5, tau_plus=0.1, beta=1.0, block_size=True),
     r"block_size must be None \(dense\) or a positive int, got True"),
    (lambda: losses.kl_dro(Z, Z, temperature=0.5, block_size="4"),
     r"block_size must be None \(dense\) or a positive int, got '4'"),
    (lambda: losses.infonce(np.ones((6, 4)).tolist(), Z, temperature=0.5),
     r"z1 must be an array of shape \(B, d\), got list"),
    (lambda: losses.infonce(Z, np.ones((6, 4)).tolist(), temperature=0.5),
     r"z2 must be an array of shape \(B, d\), got list"),
    (lambda: losses.infonce(Z, Z, temperature=0.5, valid=[True] * 6),
     r"valid must be an array of shape \(6,\), got list"),
    (lambda: losses.infonce(Z, Z, temperature=0.5, labels=(0, 1, 2, 0, 1, 2)),
     r"labels must be an array of shape \(6,\), got tuple"),
])
def test_loss_arguments_of_the_wrong_type(call, match):
  with pytest.raises(ValueError, match=match):
    call()


# A Python number is checked as the loss computes it, rounded to the inputs' dtype (float32
# here): each of these passes a float64 check, and in float32 gave inf or a wrong finite loss.
@pytest.mark.parametrize("call, match", [
    (lambda: losses.dcl(Z, Z, temperature=0.5, tau_plus=1 - 1e-9),
     r"tau_plus .* must lie in \[0, 1\), got 0.999999999, which is 1.0 in float32"),
    (lambda: losses.infonce(Z, Z, temperature=1e-46),
     r"temperature must be > 0, got 1e-46, which is 0.0 in float32"),
    (lambda: losses.kl_dro(Z, Z, temperature=1e-39),
     r"temperature=1e-39 is too small: 1/t overflows float32"),
    (lambda: losses.adnce(Z, Z, temperature=0.5, mu=0.7, sigma=1e-50),
     r"sigma must be > 0, got 1e-50, which is 0.0 in float32"),
    (lambda: losses.chi2_dro(Z, Z, eta=1e39), r"eta=1e\+39 overflows float32"),
    (lambda: losses.hcl(Z, Z, temperature=0.5, tau_plus=0.1, beta=-1e39),
     r"beta=-1e\+39 overflows float32"),
    (lambda: losses.diagnostics(Z, Z, temperature=0.5, mu=1e39, sigma=1.0),
     r"mu=1e\+39 overflows float32"),
])
def test_hyperparameters_that_round_out_of_range_in_the_compute_dtype(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_the_same_hyperparameters_are_fine_in_float64():
  """Under x64, float64 inputs compute in float64, where these values are in range: the
  reference value (NumPy, float64) of DCL at tau_plus = 1 - 1e-9 (Ng clamps at N e^{-1/t})."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    z1 = rng.normal(size=(6, 4))
    z2 = -z1 + 0.3 * rng.normal(size=(6, 4))
    got = float(losses.dcl(jnp.asarray(z1), jnp.asarray(z2), temperature=0.5, tau_plus=1 - 1e-9))
    assert np.isfinite(float(losses.infonce(jnp.asarray(z1), jnp.asarray(z2), temperature=1e-39)))
  assert got == pytest.approx(ref.hcl(z1, z2, t=0.5, tau_plus=1 - 1e-9, beta=0.0), rel=1e-9)


# ------------------------------------------------------------------------------------ augment
@pytest.mark.parametrize("kwargs, match", [
    (dict(out_size=8, crop_attempts=0), r"crop_attempts must be >= 1, got 0"),
    (dict(out_size=2, blur_kernel=5),
     r"blur_kernel 5 is too large for out_size 2: the reflect-101 border needs "
     r"kernel // 2 < out_size"),
])
def test_simclr_augment_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    augment.SimCLRAugment(**kwargs)


def test_a_large_blur_kernel_is_fine_without_blur():
  # The size check only applies when the blur can run (the message must not block blur_prob=0).
  assert augment.SimCLRAugment(out_size=2, blur_kernel=5, blur_prob=0.0).blur_kernel == 5


# ----------------------------------------------------------------------------- image sources
def _write_idx(path, array):
  """A uint8 IDX file from the format description: 0, 0, type 0x08, ndim, big-endian dims."""
  header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
  path.write_bytes(header + np.ascontiguousarray(array, np.uint8).tobytes())


@pytest.mark.parametrize("raw", [b"", b"\x00\x00\x08"])
def test_idx_file_shorter_than_its_header(tmp_path, raw):
  (tmp_path / "tiny.idx").write_bytes(raw)
  with pytest.raises(ValueError, match=rf"tiny.idx: too short for an IDX header \({len(raw)} "
                                       r"bytes\)"):
    images.read_idx(tmp_path / "tiny.idx")


def test_fashion_mnist_files_that_disagree(tmp_path):
  # Each file is a valid IDX file; the train labels are one short of the train images.
  rng = np.random.default_rng(0)
  arrays = {"train_images": rng.integers(0, 256, (4, 3, 3)), "train_labels": np.arange(3),
            "test_images": rng.integers(0, 256, (2, 3, 3)), "test_labels": np.arange(2)}
  for key, stem in images.FASHION_MNIST_FILES.items():
    _write_idx(tmp_path / stem, arrays[key])
  with pytest.raises(ValueError, match=r"Fashion-MNIST train files in .* disagree: images uint8 "
                                       r"\(4, 3, 3\), labels \(3,\)"):
    images.load_image_dataset({"source": "fashion_mnist", "data_dir": str(tmp_path)})


def _npz(tmp_path, **arrays):
  path = tmp_path / "d.npz"
  np.savez(path, **arrays)
  return str(path)


def test_npz_with_train_and_test_images_of_different_sizes(tmp_path):
  path = _npz(tmp_path, x_train=np.full((2, 4, 4), 200, np.uint8), y_train=np.array([0, 1]),
              x_test=np.full((2, 5, 5), 200, np.uint8), y_test=np.array([0, 1]))
  with pytest.raises(ValueError, match=r"d: train images \(4, 4, 1\) and test images "
                                       r"\(5, 5, 1\) differ"):
    images.load_image_dataset({"source": "npz", "path": path})


@pytest.mark.parametrize("empty", ["train", "test"])
def test_npz_with_an_empty_split(tmp_path, empty):
  # Zero images pass every per-array check of the npz reader (dtype, shape, label range).
  sizes = {"train": 2, "test": 2, empty: 0}
  arrays = {f"x_{split}": np.full((n, 4, 4), 200, np.uint8) for split, n in sizes.items()}
  arrays.update({f"y_{split}": np.arange(n) for split, n in sizes.items()})
  path = _npz(tmp_path, **arrays)
  with pytest.raises(ValueError, match=rf"d: the {empty} split is empty"):
    images.load_image_dataset({"source": "npz", "path": path})


def _image_folder(root, classes, per_class=2):
  """root/<class>/<i>.png: `per_class` tiny grayscale PNGs written by PIL in each class."""
  for cls in classes:
    (root / cls).mkdir(parents=True)
    for i in range(per_class):
      Image.fromarray(np.full((3, 3), 40 * i + 20, np.uint8)).save(root / cls / f"{i}.png")
  return str(root)


def test_test_folder_with_a_class_the_train_folder_lacks(tmp_path):
  train = _image_folder(tmp_path / "train", ["a", "b"])
  test = _image_folder(tmp_path / "test", ["a", "c"])
  with pytest.raises(ValueError, match=r"test: classes \['c'\] are not among the train classes"):
    images.load_image_dataset({"source": "folder", "data_dir": train, "test_dir": test})


def test_train_class_folder_without_images(tmp_path):
  train = _image_folder(tmp_path / "train", ["a"])
  (tmp_path / "train" / "b").mkdir()
  (tmp_path / "train" / "b" / "notes.txt").write_text("not an image")
  with pytest.raises(ValueError, match=r"train/b: class folder holds no images \(\[.*'.png'"):
    images.load_image_dataset({"source": "folder", "data_dir": train})


def test_test_folder_without_any_image(tmp_path):
  # A test folder may lack classes, so an empty class folder there passes the per-class check.
  train = _image_folder(tmp_path / "train", ["a", "b"])
  test = _image_folder(tmp_path / "test", ["a"], per_class=0)
  with pytest.raises(ValueError, match=r"test: no images found"):
    images.load_image_dataset({"source": "folder", "data_dir": train, "test_dir": test})


@pytest.mark.parametrize("channels", [2, 4])
def test_folder_channels_other_than_1_or_3(tmp_path, channels):
  train = _image_folder(tmp_path / "train", ["a", "b"])
  with pytest.raises(ValueError, match=rf"config.data.channels must be 1 or 3, got {channels}"):
    images.load_image_dataset({"source": "folder", "data_dir": train, "channels": channels})


# ------------------------------------------------------------------------------------- text
def test_byte_level_bpe_vocab_without_its_bos_token(tmp_path):
  # vocab.json + merges.txt (no tokenizer.json): RoBERTa's <s> ... </s> need both tokens.
  (tmp_path / "vocab.json").write_text(json.dumps({"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3}))
  (tmp_path / "merges.txt").write_text("#version: 0.2\n")
  message = f"{tmp_path}/vocab.json has no special token '<s>'"
  with pytest.raises(ValueError, match=re.escape(message)):
    text.SentenceTokenizer(str(tmp_path))


def test_wordpiece_vocab_without_a_padding_token(tmp_path):
  (tmp_path / "vocab.txt").write_text("[UNK]\n[CLS]\n[SEP]\nhello\n")
  with pytest.raises(ValueError, match=r"The tokenizer in .* has no padding token \(tried "
                                       r"\['\[PAD\]', '<pad>'\]\): name the vocabulary's "
                                       r"padding token as \"pad_token\" in "
                                       r"special_tokens_map.json"):
    text.SentenceTokenizer(str(tmp_path))


@pytest.mark.parametrize("sentences", [[], ["", "  \t", "\n"]])
def test_sentence_list_without_sentences(sentences):
  with pytest.raises(ValueError, match=r"descriptions: no sentences"):
    text.SentenceList(sentences, name="descriptions")


# -------------------------------------------------------------------------------------- TU
def _write_tu(directory, name, parts):
  directory.mkdir(parents=True, exist_ok=True)
  for part, lines in parts.items():
    (directory / f"{name}_{part}.txt").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("edges", [["1", "2"], ["1, 2, 1", "2, 1, 1"]])
def test_tu_edge_file_without_two_columns(tmp_path, edges):
  # Consistent columns (so not "ragged"), but not the two the format has.
  _write_tu(tmp_path / "TOY", "TOY", {"A": edges, "graph_indicator": ["1", "1"],
                                     "graph_labels": ["0"]})
  with pytest.raises(ValueError, match=r"TOY_A.txt: each line must be 'row, col'"):
    tu_dataset.load_tu_dataset("TOY", root=tmp_path, source="local")


def test_grakel_source_for_a_dataset_grakel_does_not_bundle():
  with pytest.raises(ValueError, match=r"grakel bundles only \('MUTAG', 'Cuneiform'\), not 'NCI1'"):
    tu_dataset.load_tu_dataset("NCI1", source="grakel")


def test_downloaded_archive_with_a_path_outside_the_destination(tmp_path):
  server = tmp_path / "server"
  server.mkdir()
  with zipfile.ZipFile(server / "EVIL.zip", "w") as zf:
    zf.writestr("EVIL/EVIL_A.txt", "1, 2\n")
    zf.writestr("../escaped.txt", "outside")
  cache = tmp_path / "cache"
  with pytest.raises(ValueError, match=r"EVIL.zip: unsafe path '../escaped.txt' in archive"):
    tu_dataset.load_tu_dataset("EVIL", root=cache, source="download", base_url=server.as_uri())
  assert not list(tmp_path.rglob("escaped.txt"))   # refused before anything was extracted


# -------------------------------------------------------------------------- Hugging Face folder
def test_model_folder_without_config_json(tmp_path):
  folder = tmp_path / "model"
  shutil.copytree(ROBERTA_DIR, folder)
  (folder / "config.json").unlink()
  with pytest.raises(FileNotFoundError, match=r"model/config.json is missing: a Hugging Face "
                                              r"model folder needs config.json"):
    hf_checkpoint.load_pretrained(str(folder))


# ------------------------------------------------------------------------------------- STS
def _write(path, content):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(content, encoding="utf-8")


def test_sts_year_pair_line_without_a_tab(tmp_path):
  folder = tmp_path / "STS" / "STS13-en-test"
  _write(folder / "STS.input.FNWN.txt", "a b\tc d\ne f g h\n")   # line 2: the tab is lost
  _write(folder / "STS.gs.FNWN.txt", "1.0\n2.0\n")
  with pytest.raises(ValueError, match=r"STS.input.FNWN.txt:2: expected two tab-separated "
                                       r"sentences"):
    sts.read_sts_subset(str(folder), "FNWN")


def test_stsb_line_with_too_few_fields(tmp_path):
  _write(tmp_path / "STS" / "STSBenchmark" / "sts-test.csv",
         "main-news\tnews\t2015\t0001\t2.5\tA man plays.\tA woman plays.\n"
         "main-news\tnews\t2015\t0002\t2.5\tA man plays. A woman plays.\n")
  with pytest.raises(ValueError, match=r"sts-test.csv:2: expected 7 tab-separated fields, got 6"):
    sts.load_task(str(tmp_path), "STSBenchmark")


def test_sick_line_with_too_few_fields(tmp_path):
  _write(tmp_path / "SICK" / "SICK_test_annotated.txt",
         "pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment\n"
         "1\tA dog runs.\tA cat runs.\t4.5\tNEUTRAL\n"
         "2\tA man. A woman.\t3.2\n")
  with pytest.raises(ValueError, match=r"SICK_test_annotated.txt:3: expected at least 4 "
                                       r"tab-separated fields"):
    sts.load_task(str(tmp_path), "SICKRelatedness")


# ------------------------------------------------------------------------------------ kNN
@pytest.mark.parametrize("kwargs, match", [
    (dict(query_labels=np.zeros((4, 1), np.int32)), r"query_labels must have shape \(4,\), "
                                                    r"got \(4, 1\)"),
    (dict(query_mask=np.ones(3, bool)), r"query_mask must have shape \(4,\), got \(3,\)"),
])
def test_knn_accuracy_query_shapes(kwargs, match):
  args = dict(query_labels=np.arange(4) % 2, query_mask=None)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    knn.knn_accuracy(np.ones((6, 3), np.float32), np.arange(6) % 2, np.ones((4, 3), np.float32),
                     args["query_labels"], num_classes=2, temperature=0.5,
                     query_mask=args["query_mask"])


# --------------------------------------------------------------------------------- linear probe
@pytest.mark.parametrize("kwargs, match", [
    (dict(num_classes=0), r"num_classes must be >= 1, got 0"),
    (dict(weight_decay=-1e-6), r"weight_decay must be >= 0, got -1e-06 \(reference: 1e-6\)"),
    (dict(x=np.zeros((0, 3), np.float32), y=np.zeros(0, np.int32)),
     r"train_features is empty; extract features of the train split first"),
])
def test_fit_linear_probe_arguments(kwargs, match):
  args = dict(x=np.zeros((4, 3), np.float32), y=np.arange(4) % 2, num_classes=2, weight_decay=0.0)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    lp.fit_linear_probe(args["x"], args["y"], num_classes=args["num_classes"], epochs=1,
                        batch_size=2, weight_decay=args["weight_decay"])


def _probe(feature_dim=3, num_classes=2):
  # Built directly (a fitted probe has this structure): the checks run before the weights are
  # used, so no training or compilation is needed.
  params = {"params": {"fc": {"kernel": np.zeros((feature_dim, num_classes), np.float32),
                              "bias": np.zeros(num_classes, np.float32)}}}
  return lp.LinearProbe(params=params, train_loss=np.zeros(1, np.float32),
                        num_classes=num_classes)


@pytest.mark.parametrize("kwargs, match", [
    (dict(features=np.zeros((2, 2, 3), np.float32)),
     r"features must be 2-D \(num_examples, feature_dim\), got shape \(2, 2, 3\)"),
    (dict(mask=np.ones(5, bool)), r"mask must have shape \(4,\), got \(5,\)"),
    (dict(labels=np.zeros((4, 1), np.int32)), r"labels must have shape \(4,\), got \(4, 1\)"),
])
def test_evaluate_linear_probe_arguments(kwargs, match):
  args = dict(features=np.zeros((4, 3), np.float32), labels=np.arange(4) % 2, mask=None)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    lp.evaluate_linear_probe(_probe(), args["features"], args["labels"], args["mask"])


@pytest.mark.parametrize("images_uint8", [np.zeros((0, 4, 4, 1), np.uint8), np.zeros(4, np.uint8)])
def test_image_probe_without_images(images_uint8):
  with pytest.raises(ValueError, match=r"images_uint8 must be a non-empty \(N, \.\.\.\) array of "
                                       rf"images, got shape \({images_uint8.shape[0]},"):
    lp.train_linear_probe_on_images(lambda x: x.reshape(x.shape[0], -1), lambda key, x: x,
                                    images_uint8, np.zeros(len(images_uint8), np.int32),
                                    num_classes=2, epochs=1, progress=False)


def _flatten(images_batch):
  return np.asarray(images_batch, np.float32).reshape(len(images_batch), -1)


@pytest.mark.parametrize("embed_fn, batch, match", [
    # A bare image array (labels forgotten) is neither a mapping nor an (images, labels) tuple.
    (_flatten, np.zeros((2, 3), np.uint8),
     r"each batch must be a mapping with image/label\[/mask\] entries or a tuple "
     r"\(images, labels\[, mask\]\) of 2 or 3 entries; got ndarray"),
    # A tuple of the wrong length is named with its length, not just "tuple".
    (_flatten, (np.zeros((2, 3)), np.zeros(2), np.ones(2), np.ones(2)),
     r"of 2 or 3 entries; got a tuple of 4 entries"),
    # An encoder output left unflattened.
    (lambda x: np.zeros((2, 3, 3)), (np.zeros((2, 3)), np.zeros(2)),
     r"embed_fn returned shape \(2, 3, 3\) for a batch of 2 labels; it must return "
     r"\(batch, feature_dim\)"),
    (lambda x: np.zeros((3, 4)), (np.zeros((2, 3)), np.zeros(2)),
     r"embed_fn returned shape \(3, 4\) for a batch of 2 labels"),
    (_flatten, {"image": np.zeros((2, 3)), "label": np.zeros(2), "mask": np.ones(3)},
     r"mask shape \(3,\) differs from labels \(2,\)"),
])
def test_extract_features_batches(embed_fn, batch, match):
  with pytest.raises(ValueError, match=match):
    lp.extract_features(embed_fn, [batch])
