"""Semantic textual similarity (STS) evaluation, as in SimCSE / SentEval.

Score = Spearman correlation x 100 between the cosine similarity of the two sentences'
embeddings and the gold score. Tasks and settings follow SimCSE's evaluation:
  - STS12-16 in the "all" setting: ONE Spearman over the concatenation of all the year's subsets
    (not the mean of the per-subset correlations);
  - STS-B ("STSBenchmark") and SICK-R ("SICKRelatedness") on their test splits (dev: model
    selection, STS-B dev in SimCSE);
  - "avg": the mean over the evaluated tasks (the 7 tasks for the usual table).
Sentences are whitespace-normalised (`" ".join(s.split())`) as SentEval's loaders do.

Expected layout under `sts_root` (SentEval's `data/downstream` folder, filled by SentEval's
`data/downstream/get_transfer_data.bash` or SimCSE's `SentEval/data/downstream/download_dataset.sh`):

    <sts_root>/STS/STS12-en-test/STS.input.MSRpar.txt, STS.gs.MSRpar.txt, ...
    <sts_root>/STS/STS13-en-test/ ... STS16-en-test/
    <sts_root>/STS/STSBenchmark/sts-train.csv, sts-dev.csv, sts-test.csv
    <sts_root>/SICK/SICK_train.txt, SICK_trial.txt, SICK_test_annotated.txt

The evaluator only needs `embed_fn(list[str]) -> np.ndarray (n, d)`; `encoder_embed_fn` builds
one from a `SentenceEncoder` and its params (evaluation pooler: CLS WITHOUT the training MLP by
default, SimCSE's `cls_before_pooler`; evaluating with the MLP is a classic reproduction bug).

Run on a Hugging Face folder, or on a cldro_jax sentence run (its best STS dev model when it kept
one, else its last checkpoint; the run's config gives the pooler and the data folder):
    python -m cldro_jax.evaluators.sts --model_dir=HF_FOLDER --sts_root=DIR [--pooler=cls|mean|cls_mlp]
    python -m cldro_jax.evaluators.sts --workdir=RUN_DIR [--checkpoint=auto|best|latest|STEP]
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import json
import os
import re
import sys
import weakref
from typing import Callable, Iterable, Sequence

import numpy as np
import scipy.stats

STS_YEARS = ("STS12", "STS13", "STS14", "STS15", "STS16")
TASKS = STS_YEARS + ("STSBenchmark", "SICKRelatedness")
# SentEval's subsets per year (STS13 without the licensed "SMT" subset, as SentEval/SimCSE).
STS_YEAR_SUBSETS = {
    "STS12": ("MSRpar", "MSRvid", "SMTeuroparl", "surprise.OnWN", "surprise.SMTnews"),
    "STS13": ("FNWN", "headlines", "OnWN"),
    "STS14": ("deft-forum", "deft-news", "headlines", "images", "OnWN", "tweet-news"),
    "STS15": ("answers-forums", "answers-students", "belief", "headlines", "images"),
    "STS16": ("answer-answer", "headlines", "plagiarism", "postediting", "question-question"),
}
STSB_FILES = {"train": "sts-train.csv", "dev": "sts-dev.csv", "test": "sts-test.csv"}
SICK_FILES = {"train": "SICK_train.txt", "dev": "SICK_trial.txt", "test": "SICK_test_annotated.txt"}
SHORT_NAMES = {"STSBenchmark": "STS-B", "SICKRelatedness": "SICK-R"}

GET_DATA_HELP = (
    "The STS data are SentEval's: clone https://github.com/facebookresearch/SentEval and run "
    "`cd data/downstream && bash get_transfer_data.bash` (or SimCSE's "
    "`cd SentEval/data/downstream && bash download_dataset.sh`), then pass "
    "<...>/data/downstream as --sts_root (python -m cldro_jax.evaluators.sts) or "
    "--config.data.sts_root (python -m cldro_jax.main).")

EmbedFn = Callable[[list[str]], np.ndarray]


@dataclasses.dataclass(frozen=True)
class SentencePairs:
  """Scored sentence pairs: sentences1[i] vs sentences2[i] with gold scores[i]."""
  sentences1: list[str]
  sentences2: list[str]
  scores: np.ndarray  # float64

  def __len__(self) -> int:
    return len(self.scores)


def _normalise(sentence: str) -> str:
  # SentEval splits every sentence on whitespace and the SimCSE batcher joins with " ".
  return " ".join(sentence.split())


def _require(path: str, what: str) -> None:
  if not os.path.exists(path):
    raise FileNotFoundError(f"Missing {what}: {path}. {GET_DATA_HELP}")


def _read_lines(path: str, *, all_line_breaks: bool = False, encoding: str = "utf-8"
                ) -> list[str]:
  """The file's lines. No csv module anywhere: sentences contain stray quotes.

  SentEval reads STS12-16 with str.splitlines (which also breaks at \x0b, \x1c, \u2028, ...)
  and STS-B/SICK line by line (\n, \r\n, \r only); `all_line_breaks` picks the former.
  """
  try:
    with open(path, encoding=encoding) as fh:
      if all_line_breaks:
        return fh.read().splitlines()
      return [line.rstrip("\r\n") for line in fh]
  except UnicodeDecodeError as err:   # names neither the file nor the line
    line_no = _first_undecodable_line(path)
    raise ValueError(f"{path}:{line_no}: not UTF-8 ({err.reason}). SentEval's files are UTF-8; "
                     f"this one is damaged or converted: download it again. "
                     f"{GET_DATA_HELP}") from err


def _first_undecodable_line(path: str) -> int:
  with open(path, "rb") as fh:
    for line_no, line in enumerate(fh, start=1):
      try:
        line.decode("utf-8")
      except UnicodeDecodeError:
        return line_no
  return 0


# A gold score as SentEval's files write it ("4.750", "3", "0.8"). float() alone also takes
# "nan" (every Spearman of the task becomes nan), "inf" and "4_5" (45.0).
_SCORE = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _gold_score(text: str, path: str, line_no: int) -> float:
  """The gold similarity on a line: a number in 0..5 (STS12-16 and STS-B: 0..5, SICK: 1..5)."""
  text = text.strip()
  if _SCORE.fullmatch(text) and 0.0 <= float(text) <= 5.0:
    return float(text)
  raise ValueError(f"{path}:{line_no}: the gold score {text!r} is not a number in 0..5; the file "
                   "is damaged or not SentEval's (shifted columns?): download it again. "
                   f"{GET_DATA_HELP}")


def _scored_pairs(s1: list[str], s2: list[str], scores: list[float], path: str) -> SentencePairs:
  # No pair (an empty file, every gold line blank) would be scored as a nan Spearman.
  if not scores:
    raise ValueError(f"{path} holds no scored sentence pair: the file is empty or damaged; "
                     f"download it again. {GET_DATA_HELP}")
  return SentencePairs(s1, s2, np.asarray(scores, np.float64))


def read_sts_subset(task_dir: str, subset: str) -> SentencePairs:
  """One STS12-16 subset: `STS.input.<subset>.txt` + `STS.gs.<subset>.txt`.

  A blank gold line means the pair has no score; it is skipped (as SentEval does).
  """
  input_path = os.path.join(task_dir, f"STS.input.{subset}.txt")
  gold_path = os.path.join(task_dir, f"STS.gs.{subset}.txt")
  _require(input_path, f"STS input file of subset {subset}")
  _require(gold_path, f"STS gold-score file of subset {subset}")
  pairs = _read_lines(input_path, all_line_breaks=True)
  # utf-8-sig: a BOM before the first score (float() refuses it; SentEval crashes on it).
  gold = _read_lines(gold_path, all_line_breaks=True, encoding="utf-8-sig")
  if len(pairs) != len(gold):
    raise ValueError(f"{input_path} has {len(pairs)} lines but {gold_path} has {len(gold)}: "
                     "the files must have one gold line (possibly blank) per pair.")
  s1, s2, scores = [], [], []
  for line_no, (pair, score) in enumerate(zip(pairs, gold), start=1):
    if not score.strip():
      continue
    fields = pair.split("\t")
    if len(fields) < 2:
      raise ValueError(f"{input_path}:{line_no}: expected two tab-separated sentences.")
    scores.append(_gold_score(score, gold_path, line_no))
    s1.append(_normalise(fields[0]))
    s2.append(_normalise(fields[1]))
  return _scored_pairs(s1, s2, scores, gold_path)


def read_sts_year(sts_root: str, task: str) -> dict[str, SentencePairs]:
  """All subsets of one of STS12..STS16, by subset name (test data only)."""
  if task not in STS_YEAR_SUBSETS:
    raise ValueError(f"{task!r} is not one of {STS_YEARS}")
  task_dir = os.path.join(sts_root, "STS", f"{task}-en-test")
  _require(task_dir, f"{task} directory")
  return {subset: read_sts_subset(task_dir, subset) for subset in STS_YEAR_SUBSETS[task]}


def read_stsb(sts_root: str, split: str = "test") -> SentencePairs:
  """STS-B (SentEval's copy): tab-separated genre, file, year, id, score, sentence1, sentence2.

  Read without quote handling; lines with more than 7 fields keep the first 7.
  """
  if split not in STSB_FILES:
    raise ValueError(f"STS-B split must be one of {sorted(STSB_FILES)}, got {split!r}")
  path = os.path.join(sts_root, "STS", "STSBenchmark", STSB_FILES[split])
  _require(path, f"STS-B {split} file")
  s1, s2, scores = [], [], []
  for line_no, line in enumerate(_read_lines(path), start=1):
    if not line.strip():
      continue
    fields = line.split("\t")
    if len(fields) < 7:
      raise ValueError(f"{path}:{line_no}: expected 7 tab-separated fields, got {len(fields)}.")
    scores.append(_gold_score(fields[4], path, line_no))
    s1.append(_normalise(fields[5]))
    s2.append(_normalise(fields[6]))
  return _scored_pairs(s1, s2, scores, path)


def read_sick_r(sts_root: str, split: str = "test") -> SentencePairs:
  """SICK relatedness: header line, then pair_ID, sentence_A, sentence_B, relatedness_score, ..."""
  if split not in SICK_FILES:
    raise ValueError(f"SICK-R split must be one of {sorted(SICK_FILES)}, got {split!r}")
  path = os.path.join(sts_root, "SICK", SICK_FILES[split])
  _require(path, f"SICK-R {split} file")
  lines = _read_lines(path)
  header = lines[0].split("\t") if lines else []
  if len(header) >= 4 and _SCORE.fullmatch(header[3].strip()):
    # The header is skipped unread (as SentEval does): without it, the first pair would be.
    raise ValueError(f"{path}:1 is a scored pair, not SICK's header line (pair_ID, sentence_A, "
                     "sentence_B, relatedness_score, ...): put the header back or download the "
                     f"file again. {GET_DATA_HELP}")
  s1, s2, scores = [], [], []
  for line_no, line in enumerate(lines[1:], start=2):
    if not line.strip():
      continue
    fields = line.split("\t")
    if len(fields) < 4:
      raise ValueError(f"{path}:{line_no}: expected at least 4 tab-separated fields.")
    s1.append(_normalise(fields[1]))
    s2.append(_normalise(fields[2]))
    scores.append(_gold_score(fields[3], path, line_no))
  return _scored_pairs(s1, s2, scores, path)


def load_task(sts_root: str, task: str, split: str = "test") -> dict[str, SentencePairs]:
  """A task's data as {subset name: pairs}; STS-B and SICK-R have one subset named after them."""
  if task in STS_YEAR_SUBSETS:
    if split != "test":
      raise ValueError(f"{task} has only a test split (asked for {split!r}); use STSBenchmark "
                       "or SICKRelatedness for dev/train.")
    return read_sts_year(sts_root, task)
  if task == "STSBenchmark":
    return {task: read_stsb(sts_root, split)}
  if task == "SICKRelatedness":
    return {task: read_sick_r(sts_root, split)}
  raise ValueError(f"Unknown STS task {task!r}: choose from {TASKS}.")


def cosine_similarities(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Row-wise cosine similarity in float64; a zero vector has similarity 0 (SentEval: nan -> 0)."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
  dots = np.einsum("nd,nd->n", a, b)
  return np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)


def spearman_x100(predicted: np.ndarray, gold: np.ndarray) -> float:
  """Spearman rank correlation x 100 (scipy)."""
  return float(scipy.stats.spearmanr(predicted, gold).statistic) * 100.0


def predict_similarities(embed_fn: EmbedFn, subsets: dict[str, SentencePairs]
                         ) -> dict[str, np.ndarray]:
  """Cosine similarities per subset; each distinct sentence is embedded once."""
  unique = sorted({s for pairs in subsets.values() for s in pairs.sentences1 + pairs.sentences2})
  embeddings = np.asarray(embed_fn(unique))
  if embeddings.ndim != 2 or embeddings.shape[0] != len(unique):
    raise ValueError(f"embed_fn returned shape {embeddings.shape} for {len(unique)} sentences; "
                     "expected (n_sentences, dim).")
  row = {s: i for i, s in enumerate(unique)}
  return {
      name: cosine_similarities(embeddings[[row[s] for s in pairs.sentences1]],
                                embeddings[[row[s] for s in pairs.sentences2]])
      for name, pairs in subsets.items()
  }


def score_subsets(similarities: dict[str, np.ndarray], subsets: dict[str, SentencePairs]
                  ) -> dict[str, float]:
  """Spearman x100 per subset, "all" (one Spearman over the concatenation: SimCSE's setting),
  "mean" and "wmean" (plain and size-weighted means of the per-subset values, SentEval's)."""
  out = {name: spearman_x100(similarities[name], pairs.scores) for name, pairs in subsets.items()}
  sizes = np.asarray([len(pairs) for pairs in subsets.values()], np.float64)
  per_subset = np.asarray([out[name] for name in subsets])
  out["all"] = spearman_x100(np.concatenate([similarities[n] for n in subsets]),
                             np.concatenate([p.scores for p in subsets.values()]))
  out["mean"] = float(per_subset.mean())
  out["wmean"] = float((per_subset * sizes).sum() / sizes.sum())
  return out


def load_tasks(sts_root: str, tasks: Sequence[str] | None = None, split: str = "test"
               ) -> dict[str, dict[str, SentencePairs]]:
  """Reads the tasks' files ({task: {subset: pairs}}); tasks=None: all tasks that have `split`."""
  if tasks is None:
    tasks = TASKS if split == "test" else ("STSBenchmark", "SICKRelatedness")
  if isinstance(tasks, str):
    tasks = (tasks,)
  unknown = [t for t in tasks if t not in TASKS]
  if unknown or not tasks:
    raise ValueError(f"Unknown STS tasks {unknown}: choose from {TASKS}.")
  return {task: load_task(sts_root, task, split) for task in tasks}


def score_tasks(embed_fn: EmbedFn, data: dict[str, dict[str, SentencePairs]], *,
                progress: bool = False) -> dict[str, dict[str, float]]:
  """`score_subsets` of each task of loaded STS data (`load_tasks`); `progress` shows a bar over
  the sentence pairs (minutes for a BERT-base on a CPU)."""
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  total = sum(len(pairs) for subsets in data.values() for pairs in subsets.values())
  scores = {}
  with tqdm(total=total, unit="pair", desc="STS", disable=not progress, file=sys.stderr,
            dynamic_ncols=True) as bar:
    for task, subsets in data.items():
      bar.set_postfix_str(task)
      scores[task] = score_subsets(predict_similarities(embed_fn, subsets), subsets)
      bar.update(sum(len(pairs) for pairs in subsets.values()))
  return scores


def evaluate_sts(embed_fn: EmbedFn, sts_root: str, tasks: Sequence[str] | None = None,
                 split: str = "test", *, details: bool = False, progress: bool = False) -> dict:
  """Spearman x100 per task and their average.

  Args:
    embed_fn: list of sentences -> (n, d) array of embeddings.
    sts_root: SentEval's `data/downstream` folder (layout in the module docstring).
    tasks: subset of TASKS; None = every task that has `split` (test: all 7; dev/train:
      STSBenchmark and SICKRelatedness).
    split: "test" for the paper's table, "dev" for model selection (STS-B dev in SimCSE).
    details: also return the per-subset scores under "details".
    progress: show a progress bar over the sentence pairs.
  Returns:
    {"STS12": ..., ..., "SICKRelatedness": ..., "avg": mean over the tasks} (+ "details").
  """
  # Read everything first: a missing file fails before any (slow) embedding.
  data = load_tasks(sts_root, tasks, split)
  tasks = tuple(data)
  per_task = score_tasks(embed_fn, data, progress=progress)
  results = {task: per_task[task]["all"] for task in tasks}
  results["avg"] = float(np.mean([results[t] for t in tasks]))
  if details:
    results["details"] = per_task
  return results


def format_results(results: dict, pooler_description: str | None = None) -> str:
  """A SimCSE-style table: one header row of task names, one row of scores."""
  tasks = [t for t in TASKS if t in results]
  names = [SHORT_NAMES.get(t, t) for t in tasks] + ["Avg."]
  values = [f"{results[t]:.2f}" for t in tasks] + [f"{results['avg']:.2f}"]
  widths = [max(len(n), len(v)) for n, v in zip(names, values)]
  lines = []
  if pooler_description:
    lines.append(f"pooler: {pooler_description}")
  lines.append(" | ".join(n.rjust(w) for n, w in zip(names, widths)))
  lines.append(" | ".join(v.rjust(w) for v, w in zip(values, widths)))
  return "\n".join(lines)


def describe_pooler(pooler: str) -> str:
  """The line printed with every result, so the pooler of a number is never ambiguous."""
  return {
      "cls": "cls (without the training MLP)",
      "cls_mlp": "cls_mlp (CLS WITH the training MLP)",
      "mean": "mean (mask-aware mean of the last layer, without the training MLP)",
  }[pooler]


EXPORT_INFO = "cldro_jax_export.json"   # written next to a cldro_jax Hugging Face export
_MODULES_WE_RUN = ("models.Transformer", "models.Pooling", "models.Normalize")


def folder_pooler(model_dir: str) -> tuple[str, str]:
  """(pooler, where it comes from) that a model folder declares, "cls" when it declares none.

  A cldro_jax export names its evaluation pooler in `cldro_jax_export.json`; a
  sentence-transformers folder (all-MiniLM-L6-v2: mean) in its Pooling module's config.json.
  Scoring with another pooler than the model's is the classic reproduction bug.
  """
  info_path = os.path.join(model_dir, EXPORT_INFO)
  if os.path.isfile(info_path):
    with open(info_path, encoding="utf-8") as f:
      pooler = json.load(f).get("pooler")
    if pooler in ("cls", "mean", "cls_mlp"):
      return pooler, EXPORT_INFO
  pooling_dir = "1_Pooling"
  modules_path = os.path.join(model_dir, "modules.json")
  if os.path.isfile(modules_path):
    with open(modules_path, encoding="utf-8") as f:
      modules = json.load(f)
    # Normalize leaves cosines unchanged; any other module (LaBSE's Dense, for one) changes the
    # embeddings, and scoring without it would report another model's numbers.
    others = [m.get("type", "?") for m in modules
              if not m.get("type", "").endswith(_MODULES_WE_RUN)]
    if others:
      raise ValueError(
          f"{modules_path} lists {others}, which this evaluator does not run (it runs the "
          "transformer and its pooling only), so its scores would not be this model's. Pass "
          "--pooler=cls, mean or cls_mlp to score the transformer's pooled output anyway.")
    pooling_dir = next((m["path"] for m in modules
                        if m.get("type", "").endswith("models.Pooling")), pooling_dir)
  config_path = os.path.join(model_dir, pooling_dir, "config.json")
  if not os.path.isfile(config_path):
    return "cls", "SimCSE's evaluation; the folder declares no pooling"
  with open(config_path, encoding="utf-8") as f:
    modes = {k for k, v in json.load(f).items() if k.startswith("pooling_mode_") and v is True}
  if modes == {"pooling_mode_mean_tokens"}:
    return "mean", f"{pooling_dir}/config.json"
  if modes == {"pooling_mode_cls_token"}:
    return "cls", f"{pooling_dir}/config.json"
  raise ValueError(f"{config_path} declares the pooling {sorted(modes)}, which this evaluator "
                   "does not implement; pass --pooler=cls, mean or cls_mlp to choose one.")


# --------------------------------------------------------------------------------------------
# Embedding functions from our encoders.

def _batches(n: int, size: int) -> Iterable[slice]:
  return (slice(i, min(i + size, n)) for i in range(0, n, size))


# The tokenised, length-sorted, padded batches of recent sentence lists, per tokenizer: a
# training run scores the same dev sentences at every evaluation, and tokenising them again
# (twice: lengths, then ids) at each one is host time the training waits for.
_TOKENIZED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_TOKENIZED_KEPT = 16


def _tokenized_batches(tokenizer, sentences: tuple[str, ...], max_length: int, batch_size: int,
                       pad_to_multiple_of: int) -> tuple[np.ndarray, list[tuple]]:
  """(order, [(input_ids, attention_mask, rows), ...]): `sentences` sorted by token length, in
  batches of `batch_size` rows (the last filled with copies of its last row)."""
  try:
    cache = _TOKENIZED.setdefault(tokenizer, collections.OrderedDict())
  except TypeError:   # a tokenizer that cannot be weakly referenced: no cache
    cache = collections.OrderedDict()
  key = (sentences, max_length, batch_size, pad_to_multiple_of)
  if key in cache:
    cache.move_to_end(key)
    return cache[key]
  order = np.argsort(tokenizer.lengths(sentences), kind="stable")
  batches = []
  for rows in _batches(len(order), batch_size):
    texts = [sentences[i] for i in order[rows]]
    batch = tokenizer.encode_batch(texts, max_length, pad_to_multiple_of=pad_to_multiple_of)
    pad = ((0, batch_size - len(texts)), (0, 0))
    batches.append((np.pad(batch["input_ids"], pad, mode="edge"),
                    np.pad(batch["attention_mask"], pad, mode="edge"), len(texts)))
  cache[key] = (order, batches)
  while len(cache) > _TOKENIZED_KEPT:
    cache.popitem(last=False)
  return order, batches


def make_embed_fn(encode_fn: Callable, tokenizer, *, max_length: int, batch_size: int = 64,
                  pad_to_multiple_of: int = 16) -> EmbedFn:
  """embed_fn from a batched encoder `encode_fn(input_ids, attention_mask) -> (b, d)`.

  Sentences are sorted by token length so each batch pads little; batches are padded to
  `batch_size` rows and lengths to multiples of `pad_to_multiple_of`, so `encode_fn` (jitted)
  compiles for a handful of shapes only. Texts longer than `max_length` tokens are truncated.
  """
  def embed_fn(sentences: list[str]) -> np.ndarray:
    sentences = tuple(sentences)
    if not sentences:
      raise ValueError("embed_fn got no sentences.")
    order, batches = _tokenized_batches(tokenizer, sentences, max_length, batch_size,
                                        pad_to_multiple_of)
    # Every batch dispatched before any is fetched: the device never waits on the host.
    outputs = [(encode_fn(ids, mask), n) for ids, mask, n in batches]
    chunks = [np.asarray(out, np.float32)[:n] for out, n in outputs]
    embeddings = np.empty((len(sentences), chunks[0].shape[1]), np.float32)
    embeddings[order] = np.concatenate(chunks)
    return embeddings
  return embed_fn


def _encode(model, use_mlp: bool, params, input_ids, attention_mask):
  return model.apply({"params": params}, input_ids, attention_mask, train=False, use_mlp=use_mlp)


@functools.lru_cache(maxsize=None)
def _jitted_encode():
  import jax
  # model and use_mlp are static: equal modules share compiled code, so building a new
  # embed_fn at every evaluation step does not recompile.
  return jax.jit(_encode, static_argnums=(0, 1))


def jit_encode_fn(model, *, use_mlp: bool = False) -> Callable:
  """jit(params, input_ids, attention_mask) -> embeddings; params are an argument, not constants."""
  return functools.partial(_jitted_encode(), model, use_mlp)


def encoder_embed_fn(model, params, tokenizer, *, use_mlp: bool = False,
                     max_length: int | None = None, batch_size: int = 64) -> EmbedFn:
  """embed_fn for a `SentenceEncoder` with `params` (evaluation: dropout off, no MLP by default)."""
  import jax

  encode = jit_encode_fn(model, use_mlp=use_mlp)
  # On the device once, not per batch; on this process's first device, committed, as the dev
  # evaluation's params (sentence._local_shard): inside the trainer's mesh, an uncommitted copy
  # would be placed over the whole mesh, and the encoder compiled again for that placement.
  params = jax.device_put(params, jax.local_devices()[0])
  return make_embed_fn(functools.partial(encode, params), tokenizer,
                       max_length=max_length or model.config.max_tokens, batch_size=batch_size)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m cldro_jax.evaluators.sts",
      description="STS12-16 / STS-B / SICK-R Spearman x100 of a BERT/RoBERTa sentence encoder.")
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--model_dir", help="local Hugging Face model folder (config.json, "
                                           "model.safetensors, tokenizer files)")
  source.add_argument("--workdir",
                      help="a `python -m cldro_jax.main` sentence run: evaluates its encoder "
                           "(see --checkpoint) with the run's config.json")
  parser.add_argument("--checkpoint", default="auto",
                      help="with --workdir: best (the best STS dev model), latest (the last "
                           "training checkpoint), a step number, or auto (best if kept, else "
                           "latest)")
  parser.add_argument("--sts_root", default=None,
                      help="SentEval's data/downstream folder (with --workdir, default: the "
                           "run's config.data.sts_root)")
  parser.add_argument("--pooler", default=None, choices=("cls", "mean", "cls_mlp"),
                      help="cls = CLS without the training MLP (SimCSE's evaluation). Default "
                           "with --model_dir: the pooler the folder declares (a cldro_jax "
                           "export's, or a sentence-transformers Pooling module's), else cls; "
                           "with --workdir: the run's evaluation pooler")
  parser.add_argument("--max_length", type=int, default=None,
                      help="truncate to this many tokens (default: with --workdir the run's "
                           "config.eval.max_length, else, or when that is 0, the model's "
                           "maximum)")
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--split", default="test", choices=("test", "dev"))
  parser.add_argument("--tasks", default=None,
                      help=f"comma-separated subset of {','.join(TASKS)} "
                           "(default: all of the split)")
  args = parser.parse_args(argv)
  if args.model_dir and args.sts_root is None:
    parser.error("--sts_root is required with --model_dir")
  if args.batch_size < 1:
    parser.error(f"--batch_size must be >= 1, got {args.batch_size}")
  if args.max_length is not None and args.max_length < 2:
    parser.error(f"--max_length must be >= 2 (special tokens included), got {args.max_length}")
  return args


def _encoder_from_args(args: argparse.Namespace):
  """(model config, params, tokenizer folder, pooler, description) for --model_dir/--workdir."""
  from cldro_jax.models import bert
  if args.model_dir:
    config, params = bert.load_pretrained(args.model_dir)
    if args.pooler:
      return config, params, args.model_dir, args.pooler, f"model {args.model_dir}"
    pooler, source = folder_pooler(args.model_dir)
    return (config, params, args.model_dir, pooler,
            f"model {args.model_dir} (pooler {pooler}: {source})")
  from cldro_jax.tasks import sentence
  trained = sentence.load_trained_encoder(args.workdir, args.checkpoint)
  pooler = args.pooler or sentence.eval_pooler(trained.config)
  return (trained.encoder_config, trained.params, trained.tokenizer_folder, pooler,
          trained.description)


def main(argv: Sequence[str] | None = None) -> dict:
  """Command line entry point; prints the pooler line, the model and the table; returns results."""
  args = _parse_args(argv)
  from cldro_jax import logs
  from cldro_jax.data.text import SentenceTokenizer
  from cldro_jax.models import bert

  tasks = tuple(args.tasks.split(",")) if args.tasks else None
  if args.workdir:   # a wrong workdir is named before any missing STS data
    from cldro_jax.tasks import sentence
    logs.quiet_library_info()
    run_config = sentence.load_run_config(args.workdir)
    if args.max_length is None:   # score as the run's own evaluation truncates
      args.max_length = int(run_config.eval.get("max_length", 0) or 0) or None
    if args.sts_root is None:
      args.sts_root = run_config.data.sts_root
      if not args.sts_root:
        raise FileNotFoundError(f"The run's config.data.sts_root is empty: pass --sts_root. "
                                f"{GET_DATA_HELP}")
  load_tasks(args.sts_root, tasks, args.split)  # missing data fails before the model loads
  config, params, tokenizer_folder, pooler, description = _encoder_from_args(args)
  pooling, use_mlp = bert.pooler_settings(pooler)
  if use_mlp and "pooler" not in params:
    raise ValueError(f"--pooler=cls_mlp needs pooler.dense weights, which {description} lacks.")
  model = bert.SentenceEncoder(config, pooling=pooling)
  tokenizer = SentenceTokenizer(tokenizer_folder)
  embed_fn = encoder_embed_fn(model, params, tokenizer, use_mlp=use_mlp,
                              max_length=args.max_length, batch_size=args.batch_size)
  print(f"pooler: {describe_pooler(pooler)}", flush=True)
  print(f"model: {description}", flush=True)
  results = evaluate_sts(embed_fn, args.sts_root, tasks, split=args.split, progress=True)
  print(format_results(results))
  return results


if __name__ == "__main__":
  try:
    main()
  except (FileNotFoundError, ValueError) as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)
