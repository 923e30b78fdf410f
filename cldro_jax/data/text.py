"""Tokenisation and the sentence corpus of the sentence track (unsupervised SimCSE setting).

`SentenceTokenizer` wraps a `tokenizers.Tokenizer` read from a local Hugging Face model folder
and produces fixed-shape int32 batches (static shapes for jit). Any padding/truncation preset
stored in `tokenizer.json` (all-MiniLM-L6-v2 ships padding and truncation to 128) is replaced by
the `max_length` of each call.

`SentenceCorpus` is a one-sentence-per-line text file (SimCSE's wiki1m) with random access by
index; `SentenceList` the same for sentences in memory, e.g. `sklearn_descr_sentences()` (real
English shipped with scikit-learn, for the offline quick start). `TokenizedSource` turns either
into a source for the generic host input pipeline (`cldro_jax.data.pipeline`): index array ->
fixed-shape int32 `input_ids` / `attention_mask`.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
  import tokenizers


def _tokenizers():
  # Imported on first use: the image and graph paths (and the benchmarks, which tokenise
  # nothing, on a bare GPU image) never need the tokenizers package.
  return importlib.import_module("tokenizers")

WIKI1M_URL = ("https://huggingface.co/datasets/princeton-nlp/datasets-for-simcse/resolve/main/"
              "wiki1m_for_simcse.txt")


def _read_json(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  # UTF-8 whatever the locale; utf-8-sig also reads a file a Windows editor saved with a BOM.
  with open(path, encoding="utf-8-sig") as fh:
    try:
      return json.load(fh)
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError: neither names the file
      raise ValueError(f"{path} is not valid UTF-8 JSON ({err}): the file is truncated or "
                       "corrupt; download the model folder again.") from err


@contextlib.contextmanager
def _reading_tokenizer_file(path: str):
  """The tokenizers library fails with a bare Exception that names no file, e.g. "EOF while
  parsing a string at line 1 column 1000" for a truncated download of tokenizer.json."""
  try:
    yield
  except Exception as err:  # pylint: disable=broad-except
    raise ValueError(f"{path} could not be read as a tokenizer file ({type(err).__name__}: "
                     f"{err}): it is truncated or corrupt; download the model folder "
                     "again.") from err


def _token_content(token) -> str | None:
  """special_tokens_map.json stores a token as a string or as {"content": ...}."""
  if isinstance(token, dict):
    return token.get("content")
  return token


def _wordpiece_from_vocab(folder: str) -> tokenizers.Tokenizer:
  """BERT WordPiece tokenizer from vocab.txt, lower-casing as tokenizer_config.json says."""
  config = _read_json(os.path.join(folder, "tokenizer_config.json"))
  # HF's BertTokenizer defaults to do_lower_case=True; strip_accents None follows lowercase.
  vocab = os.path.join(folder, "vocab.txt")
  with _reading_tokenizer_file(vocab):
    impl = _tokenizers().BertWordPieceTokenizer(
        vocab, lowercase=config.get("do_lower_case", True),
        strip_accents=config.get("strip_accents"),
        handle_chinese_chars=config.get("tokenize_chinese_chars", True))
  return impl._tokenizer  # the plain Tokenizer: the wrapper class adds nothing we use


def _byte_level_bpe_from_vocab(folder: str) -> tokenizers.Tokenizer:
  """RoBERTa byte-level BPE from vocab.json + merges.txt, with <s> ... </s> around each text."""
  config = _read_json(os.path.join(folder, "tokenizer_config.json"))
  specials = _read_json(os.path.join(folder, "special_tokens_map.json"))
  add_prefix_space = config.get("add_prefix_space", False)
  with _reading_tokenizer_file(f"{folder}/vocab.json + merges.txt"):
    impl = _tokenizers().ByteLevelBPETokenizer(
        os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
        add_prefix_space=add_prefix_space, trim_offsets=True)
  tok = impl._tokenizer
  names = {key: _token_content(specials.get(key)) or default for key, default in
           (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>"),
            ("pad_token", "<pad>"), ("mask_token", "<mask>"))}
  # Registering them keeps a literal "<s>" or "<pad>" in the text a single special token.
  tok.add_special_tokens([n for n in names.values() if tok.token_to_id(n) is not None])
  bos, eos = names["bos_token"], names["eos_token"]
  for name in (bos, eos):
    if tok.token_to_id(name) is None:
      raise ValueError(f"{folder}/vocab.json has no special token {name!r}.")
  tok.post_processor = _tokenizers().processors.RobertaProcessing(  # positional: (sep, cls, trim, prefix)
      (eos, tok.token_to_id(eos)), (bos, tok.token_to_id(bos)), True, add_prefix_space)
  return tok


# tokenizer_config.json keys of BERT's tokenizer -> fields of the BertNormalizer they set.
_BERT_NORMALISER_KEYS = {"do_lower_case": "lowercase", "strip_accents": "strip_accents",
                         "tokenize_chinese_chars": "handle_chinese_chars"}


def _apply_bert_normaliser_settings(tok: tokenizers.Tokenizer, folder: str) -> None:
  """Lets tokenizer_config.json override tokenizer.json's BertNormalizer, as transformers'
  BertTokenizerFast does when the two disagree (a folder saved with ``do_lower_case=False``
  around an uncased tokenizer.json lower-cases nothing there). Keys the config does not set
  keep tokenizer.json's value. Other normalisers (RoBERTa has none) are left alone."""
  state = json.loads(tok.to_str()).get("normalizer") or {}
  if state.get("type") != "BertNormalizer":
    return
  config = _read_json(os.path.join(folder, "tokenizer_config.json"))
  wanted = {field: config[key] for key, field in _BERT_NORMALISER_KEYS.items() if key in config}
  if all(state.get(field) == value for field, value in wanted.items()):
    return
  fields = {k: v for k, v in state.items() if k != "type"} | wanted
  tok.normalizer = _tokenizers().normalizers.BertNormalizer(**fields)


def _apply_sentence_transformers_lowercasing(tok: tokenizers.Tokenizer, folder: str) -> None:
  """sentence-transformers lower-cases the text itself (`str.lower`) before its tokenizer runs
  when sentence_bert_config.json says `do_lower_case: true`, whatever the tokenizer's own
  settings; without this a cased tokenizer (RoBERTa's BPE) would see other ids than it does."""
  if not _read_json(os.path.join(folder, "sentence_bert_config.json")).get("do_lower_case"):
    return
  normalizers = _tokenizers().normalizers
  tok.normalizer = normalizers.Sequence(
      [normalizers.Lowercase()] + ([tok.normalizer] if tok.normalizer is not None else []))


def load_tokenizer(folder: str) -> tokenizers.Tokenizer:
  """A `tokenizers.Tokenizer` from a HF model folder, with padding and truncation switched off.

  Uses `tokenizer.json` when present (with tokenizer_config.json's lower-casing, accent and
  Chinese-character settings, as transformers applies them); otherwise builds WordPiece from
  `vocab.txt` (BERT) or byte-level BPE from `vocab.json` + `merges.txt` (RoBERTa). Lower-cases
  the text first where sentence_bert_config.json says so, as sentence-transformers does.
  """
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"Tokenizer folder {folder} does not exist.")
  if os.path.exists(os.path.join(folder, "tokenizer.json")):
    with _reading_tokenizer_file(os.path.join(folder, "tokenizer.json")):
      tok = _tokenizers().Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    _apply_bert_normaliser_settings(tok, folder)
  elif os.path.exists(os.path.join(folder, "vocab.txt")):
    tok = _wordpiece_from_vocab(folder)
  elif all(os.path.exists(os.path.join(folder, f)) for f in ("vocab.json", "merges.txt")):
    tok = _byte_level_bpe_from_vocab(folder)
  else:
    raise FileNotFoundError(
        f"No tokenizer files in {folder}: expected tokenizer.json, vocab.txt (BERT WordPiece) "
        "or vocab.json + merges.txt (RoBERTa byte-level BPE).")
  _apply_sentence_transformers_lowercasing(tok, folder)
  # Presets in tokenizer.json (e.g. MiniLM's pad/truncate to 128) must not leak into our shapes.
  tok.no_padding()
  tok.no_truncation()
  return tok


def _pad_token(tok: tokenizers.Tokenizer, folder: str) -> tuple[str, int]:
  """The padding token and its id: special_tokens_map.json, tokenizer_config.json (where newer
  transformers versions keep it), else [PAD] / <pad>.

  RoBERTa's position ids count the tokens that are not `config.json`'s `pad_token_id`: a
  tokenizer padding with another id would shift every position, so that is refused.
  """
  specials = _read_json(os.path.join(folder, "special_tokens_map.json"))
  tokenizer_config = _read_json(os.path.join(folder, "tokenizer_config.json"))
  candidates = [_token_content(specials.get("pad_token")),
                _token_content(tokenizer_config.get("pad_token")), "[PAD]", "<pad>"]
  found = next(((name, tok.token_to_id(name)) for name in candidates
                if name is not None and tok.token_to_id(name) is not None), None)
  if found is None:
    tried = [name for name in candidates if name is not None]
    raise ValueError(f"The tokenizer in {folder} has no padding token (tried {tried}): name the "
                     "vocabulary's padding token as \"pad_token\" in special_tokens_map.json or "
                     "tokenizer_config.json.")
  model_config = _read_json(os.path.join(folder, "config.json"))
  model_pad_id = model_config.get("pad_token_id")
  if model_config.get("model_type") == "roberta" and model_pad_id not in (None, found[1]):
    raise ValueError(
        f"The tokenizer in {folder} pads with {found[0]!r} (id {found[1]}) but its config.json "
        f"says pad_token_id={model_pad_id}; RoBERTa's position ids count the non-padding "
        "tokens, so every position would shift. Make the two agree (pad_token in "
        "special_tokens_map.json / tokenizer_config.json, or pad_token_id in config.json).")
  return found


def _check_ids_fit_the_model(tok: tokenizers.Tokenizer, folder: str) -> None:
  """Refuses a tokenizer with ids past the word-embedding rows of the folder's config.json.

  Such an id (a token added to the tokenizer without `resize_token_embeddings`) makes an
  out-of-range gather: NaN in JAX for every row of the batch (PyTorch raises IndexError).
  Tokenizer folders without config.json (a tokenizer saved on its own) are not checked.
  """
  config_path = os.path.join(folder, "config.json")
  vocab_size = _read_json(config_path).get("vocab_size")
  if not isinstance(vocab_size, int):
    return
  beyond = sorted((i, t) for t, i in tok.get_vocab(with_added_tokens=True).items()
                  if i >= vocab_size)
  if beyond:
    raise ValueError(
        f"The tokenizer in {folder} has {len(beyond)} token ids beyond the {vocab_size} word "
        f"embeddings of {config_path} (vocab_size), e.g. {beyond[0][1]!r} = {beyond[0][0]}: "
        "resize the model to its tokenizer (transformers: `model.resize_token_embeddings("
        "len(tokenizer))`, then `save_pretrained`), or use the tokenizer files it was "
        "trained with.")


class SentenceTokenizer:
  """Text -> fixed-shape int32 `input_ids` / `attention_mask` for the encoders.

  Example:
    tok = SentenceTokenizer(model_folder)
    batch = tok.encode_batch(["A man is playing a guitar."], max_length=32)
    batch["input_ids"].shape  # (1, 32)
  """

  def __init__(self, folder: str):
    self.folder = folder
    self.tokenizer = load_tokenizer(folder)
    _check_ids_fit_the_model(self.tokenizer, folder)
    self.pad_token, self.pad_id = _pad_token(self.tokenizer, folder)
    self._by_setting: dict[tuple, tokenizers.Tokenizer] = {}

  def _configured(self, max_length: int, pad_to_multiple_of: int | None) -> tokenizers.Tokenizer:
    """A copy of the tokenizer set to truncate/pad this way, made once per setting.

    Copies, not one object re-configured per call: the tokenizer can then be shared by
    concurrent input-pipeline threads.
    """
    key = (max_length, pad_to_multiple_of)
    if key not in self._by_setting:
      tok = _tokenizers().Tokenizer.from_str(self.tokenizer.to_str())
      tok.enable_truncation(max_length)
      if pad_to_multiple_of is None:
        tok.enable_padding(length=max_length, pad_id=self.pad_id, pad_token=self.pad_token)
      else:
        tok.enable_padding(length=None, pad_to_multiple_of=pad_to_multiple_of,
                           pad_id=self.pad_id, pad_token=self.pad_token)
      self._by_setting[key] = tok
    return self._by_setting[key]

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  def encode_batch(self, texts: Sequence[str], max_length: int, *,
                   pad_to_multiple_of: int | None = None) -> dict[str, np.ndarray]:
    """Tokenises `texts` (special tokens added), truncated to `max_length` tokens.

    Padding: to exactly `max_length` (static shapes, training) by default; with
    `pad_to_multiple_of=m`, to the longest text of the batch rounded up to a multiple of m
    (evaluation: few distinct shapes, little padding). Returns int32 arrays (n, length).
    """
    if isinstance(texts, str):
      raise TypeError("encode_batch takes a list of texts, not one string.")
    if max_length < 2:
      raise ValueError(f"max_length must leave room for the special tokens, got {max_length}.")
    encodings = self._configured(max_length, pad_to_multiple_of).encode_batch(list(texts))
    if not encodings:
      return {"input_ids": np.zeros((0, max_length), np.int32),
              "attention_mask": np.zeros((0, max_length), np.int32)}
    # Rounding up to a multiple may pass max_length; only padding lies beyond it (truncated).
    return {
        "input_ids": np.asarray([e.ids for e in encodings], dtype=np.int32)[:, :max_length],
        "attention_mask": np.asarray([e.attention_mask for e in encodings],
                                     dtype=np.int32)[:, :max_length],
    }

  def lengths(self, texts: Sequence[str]) -> np.ndarray:
    """Token counts with special tokens, untruncated (for length-sorted evaluation batches)."""
    return np.asarray([len(e.ids) for e in self.tokenizer.encode_batch(list(texts))], np.int64)


class SentenceCorpus:
  """A text file, one sentence per line (wiki1m format), with random access by index.

  Lines end at \\n, \\r\\n or a lone \\r (Python's and Hugging Face datasets' text readers);
  blank (whitespace-only) lines are skipped and a leading UTF-8 BOM is ignored. The file must be
  UTF-8: it is checked when opened (a bad byte would otherwise stop training hours in, in the
  input pipeline's thread). It is kept as bytes plus line offsets (16 bytes per sentence),
  decoded on access.
  """

  def __init__(self, path: str):
    if not os.path.exists(path):
      raise FileNotFoundError(
          f"Sentence corpus {path} not found. The unsupervised SimCSE corpus (1M Wikipedia "
          f"sentences) is wiki1m_for_simcse.txt: download it with\n  wget {WIKI1M_URL}\n"
          "and pass its path.")
    with open(path, "rb") as fh:
      self._data = fh.read()
    # A BOM (Windows editors) is not text: it would begin the first sentence (3 tokens in RoBERTa).
    pos = len(_UTF8_BOM) if self._data.startswith(_UTF8_BOM) else 0
    starts, ends = [], []
    for line_no, line in enumerate(self._data[pos:].split(b"\n"), start=1):  # ~1 s for wiki1m
      piece_pos = pos
      for piece in line.split(b"\r") if b"\r" in line else (line,):
        if piece.strip() and _decode_line(piece, path, line_no).strip():
          starts.append(piece_pos)
          ends.append(piece_pos + len(piece))
        piece_pos += len(piece) + 1
      pos += len(line) + 1
    if not starts:
      raise ValueError(
          f"Sentence corpus {path} holds no sentences (empty, or only blank lines). It must be "
          f"UTF-8 text, one sentence per line, e.g. wiki1m_for_simcse.txt: {WIKI1M_URL}")
    self._starts = np.asarray(starts, np.int64)
    self._ends = np.asarray(ends, np.int64)
    self.path = path

  def __len__(self) -> int:
    return len(self._starts)

  def __getitem__(self, index: int) -> str:
    if not -len(self) <= index < len(self):
      raise IndexError(f"index {index} out of range for a corpus of {len(self)} sentences")
    start, end = self._starts[index], self._ends[index]
    return self._data[start:end].decode("utf-8")

  def batch(self, indices: Sequence[int]) -> list[str]:
    """The sentences at `indices`, in that order."""
    return [self[int(i)] for i in indices]


_UTF8_BOM = b"\xef\xbb\xbf"


def _decode_line(line: bytes, path: str, line_no: int) -> str:
  try:
    return line.decode("utf-8")
  except UnicodeDecodeError as err:
    context = line[max(0, err.start - 20):err.end + 20]
    raise ValueError(
        f"{path}:{line_no}: not UTF-8 ({err.reason}: {context!r}). The corpus must be UTF-8 "
        f"text, one sentence per line: convert it (e.g. `iconv -f "
        f"latin1 -t utf-8 IN > OUT`, `-f utf-16` for UTF-16) or download it again "
        f"({WIKI1M_URL}).") from err


class SentenceList:
  """Sentences held in memory (a list of str), with the interface of SentenceCorpus."""

  def __init__(self, sentences: Sequence[str], *, name: str = "in-memory sentences"):
    self._sentences = [s for s in sentences if s.strip()]
    if not self._sentences:
      raise ValueError(f"{name}: no sentences.")
    self.path = name

  def __len__(self) -> int:
    return len(self._sentences)

  def __getitem__(self, index: int) -> str:
    return self._sentences[index]

  def batch(self, indices: Sequence[int]) -> list[str]:
    return [self._sentences[int(i)] for i in indices]


# reStructuredText lines that are markup, not prose: section underlines and table borders.
_RST_RULE = re.compile(r"[=\-~^*#+]{3,}( +[=\-]+)*")
# `text <url>`_ -> text; then drop the remaining emphasis/literal markers.
_RST_LINK = re.compile(r"`([^`<]*?)\s*<[^>]*>`_+")
_RST_MARKERS = re.compile(r"[`*]+")
# A sentence ends at . ! or ? followed by whitespace and a capital letter or an opening bracket.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(])")


def sentences_from_rst(text: str, *, min_words: int = 4) -> list[str]:
  """Prose sentences of a reStructuredText document.

  Paragraphs that are directives, field lists, bullet lists, tables or headings are skipped; the
  rest is joined and split at sentence ends. Only sentences of at least `min_words` words that
  end with . ! or ? are kept. A heuristic (abbreviations like "M. Smith" may split a sentence),
  good enough for a small offline corpus of real English.
  """
  sentences = []
  for paragraph in re.split(r"\n\s*\n", text):
    lines = [line.strip() for line in paragraph.splitlines() if line.strip()]
    if not lines or lines[0].startswith(("..", ":", "=", "-", "*", "|", ">>>")):
      continue
    if any(_RST_RULE.fullmatch(line) for line in lines):
      continue
    prose = _RST_MARKERS.sub("", _RST_LINK.sub(r"\1", " ".join(lines)))
    for sentence in _SENTENCE_END.split(prose):
      sentence = sentence.strip()
      if len(sentence.split()) >= min_words and sentence[-1] in ".!?":
        sentences.append(sentence)
  return sentences


def sklearn_descr_sentences() -> list[str]:
  """English sentences from the dataset descriptions shipped with scikit-learn (offline text).

  `sklearn/datasets/descr/*.rst` (iris, digits, diabetes, ...; about 110 sentences), in file
  name order. Used by the offline sentence quick start (configs/sts_minilm.py); it is no
  substitute for wiki1m.
  """
  from importlib import resources  # pylint: disable=import-outside-toplevel
  try:
    folder = resources.files("sklearn.datasets") / "descr"
  except ModuleNotFoundError as err:
    raise FileNotFoundError("scikit-learn is not installed: pip install scikit-learn") from err
  files = sorted((f for f in folder.iterdir() if f.name.endswith(".rst")), key=lambda f: f.name)
  if not files:
    raise FileNotFoundError(f"No .rst dataset descriptions in {folder}.")
  sentences = []
  for f in files:
    sentences.extend(sentences_from_rst(f.read_text(encoding="utf-8")))
  return sentences


class TokenizedSource:
  """A random-access training source for `cldro_jax.data.pipeline`: indices -> int32 token ids.

  `source[indices]` returns {"input_ids", "attention_mask"} of shape (len(indices), max_length),
  tokenised on the host when the batch is read (in the pipeline's prefetch thread), so the
  device only ever sees fixed-shape integer arrays.
  """

  def __init__(self, corpus, tokenizer: SentenceTokenizer, max_length: int):
    if max_length < 2:
      raise ValueError(f"max_length must be >= 2 (room for the special tokens), got {max_length}.")
    self.corpus = corpus
    self.tokenizer = tokenizer
    self.max_length = int(max_length)

  def __len__(self) -> int:
    return len(self.corpus)

  def __getitem__(self, indices) -> dict[str, np.ndarray]:
    indices = np.asarray(indices)
    if indices.ndim != 1:
      raise ValueError(f"index a TokenizedSource with a 1-D integer array, got {indices.shape}")
    return self.tokenizer.encode_batch(self.corpus.batch(indices), self.max_length)
