"""Hugging Face BERT/RoBERTa checkpoints <-> cldro_jax parameter trees.

A local Hugging Face model folder (`config.json`, `model.safetensors`, tokenizer files) is read
into an `EncoderConfig` and a nested dict of float32 numpy arrays whose paths ARE the Hugging Face
parameter names (`encoder/layer/0/attention/self/query/kernel` <-> `encoder.layer.0.attention.
self.query.weight`), which is exactly the tree `cldro_jax.models.bert.SentenceEncoder` creates.
Export writes the same tree back in PyTorch layout, so `transformers` and `sentence-transformers`
load our trained encoders.

This module needs only numpy and safetensors (no jax), so the PyTorch fixture script
(`scripts/make_sentence_fixtures.py`) can use it for the export round trip in a torch-only venv.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
from typing import Any, Mapping

import numpy as np

SUPPORTED_MODEL_TYPES = ("bert", "roberta")
# hidden_act values of HF configs we implement ("gelu" is the exact erf GELU in HF).
SUPPORTED_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu")

# Checkpoint entries that are not weights of the encoder and are dropped silently (buffers) or
# with a log line (pre-training / task heads a user may reasonably point us at).
_IGNORED_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")
_IGNORED_HEAD_PREFIXES = ("cls.", "lm_head.", "classifier.", "qa_outputs.")

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt",
)
# sentence-transformers' own description of the pipeline (pooling, normalisation).
SENTENCE_TRANSFORMERS_FILES = (
    "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
)

Params = dict[str, Any]


# transformers' RobertaConfig defaults where they differ from BertConfig's (= the dataclass's).
_MODEL_TYPE_DEFAULTS = {"roberta": {"pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2}}


_SIZE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size", "max_position_embeddings", "type_vocab_size")
_ID_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id")
_RATE_FIELDS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "layer_norm_eps",
                "initializer_range")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """Architecture of a BERT/RoBERTa encoder, with Hugging Face's field names and defaults."""
  model_type: str
  vocab_size: int
  hidden_size: int
  num_hidden_layers: int
  num_attention_heads: int
  intermediate_size: int
  hidden_act: str = "gelu"
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  initializer_range: float = 0.02
  pad_token_id: int = 0
  bos_token_id: int | None = None
  eos_token_id: int | None = None

  def __post_init__(self):
    # A hand-edited config.json ("six" layers, a float size) failed later with a TypeError deep
    # in the model code; each field's type and range is checked here, by name.
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if field.name in _SIZE_FIELDS:
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
          raise ValueError(f"{field.name} must be a positive integer, got {value!r}.")
      elif field.name in _ID_FIELDS:
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool)):
          raise ValueError(f"{field.name} must be an integer token id, got {value!r}.")
      elif field.name in _RATE_FIELDS:
        if not (isinstance(value, (int, float)) and not isinstance(value, bool)
                and math.isfinite(value) and value >= 0):
          raise ValueError(f"{field.name} must be a number >= 0, got {value!r}.")
    if self.model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(
          f"Unknown model_type {self.model_type!r}: cldro_jax implements {SUPPORTED_MODEL_TYPES}. "
          "Use a BERT or RoBERTa checkpoint (config.json 'model_type').")
    if self.hidden_act not in SUPPORTED_ACTIVATIONS:
      raise ValueError(
          f"hidden_act {self.hidden_act!r} is not implemented; supported: {SUPPORTED_ACTIVATIONS}.")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(
          f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
          f"{self.num_attention_heads}.")

  @property
  def position_offset(self) -> int:
    """First position id: RoBERTa counts positions from padding_idx + 1 (HF convention)."""
    return self.pad_token_id + 1 if self.model_type == "roberta" else 0

  @property
  def max_tokens(self) -> int:
    """Longest sequence (special tokens included) the position table can encode."""
    return self.max_position_embeddings - self.position_offset

  @classmethod
  def from_hf_dict(cls, hf: Mapping[str, Any]) -> "EncoderConfig":
    """Builds the config from a parsed `config.json`; unknown architectures raise ValueError."""
    if not isinstance(hf, Mapping):
      raise ValueError(f"config.json must hold a JSON object of the model's settings, got a "
                       f"{type(hf).__name__}; download the model folder again.")
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(
          f"Unknown model_type {model_type!r} in config.json: cldro_jax implements "
          f"{SUPPORTED_MODEL_TYPES}. Use a BERT or RoBERTa checkpoint.")
    position_type = hf.get("position_embedding_type", "absolute")
    if position_type != "absolute":
      raise ValueError(
          f"position_embedding_type {position_type!r} is not implemented (only 'absolute').")
    names = {f.name for f in dataclasses.fields(cls)}
    # Fields a config.json may omit take transformers' defaults for ITS model type: RoBERTa's
    # pad id is 1 (its position ids start after it), not BERT's 0.
    fields = {**_MODEL_TYPE_DEFAULTS.get(model_type, {}), **hf}
    required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
    missing = [name for name in required if name not in fields]
    if missing:  # else a TypeError about __init__'s positional arguments
      raise ValueError(f"config.json lacks {missing}: add the model's values.")
    return cls(**{k: v for k, v in fields.items() if k in names})

  def to_hf_dict(self) -> dict[str, Any]:
    """The `config.json` content transformers needs to rebuild this architecture."""
    out = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
    out["architectures"] = ["BertModel" if self.model_type == "bert" else "RobertaModel"]
    out["position_embedding_type"] = "absolute"
    out["torch_dtype"] = "float32"
    return out


def expected_hf_shapes(config: EncoderConfig, *, with_pooler: bool = True) -> dict[str, tuple]:
  """Hugging Face name -> PyTorch shape of every encoder weight (BertModel/RobertaModel)."""
  h, f = config.hidden_size, config.intermediate_size
  shapes = {
      "embeddings.word_embeddings.weight": (config.vocab_size, h),
      "embeddings.position_embeddings.weight": (config.max_position_embeddings, h),
      "embeddings.token_type_embeddings.weight": (config.type_vocab_size, h),
      "embeddings.LayerNorm.weight": (h,),
      "embeddings.LayerNorm.bias": (h,),
  }
  for i in range(config.num_hidden_layers):
    p = f"encoder.layer.{i}."
    for dense, (d_out, d_in) in {
        "attention.self.query": (h, h), "attention.self.key": (h, h),
        "attention.self.value": (h, h), "attention.output.dense": (h, h),
        "intermediate.dense": (f, h), "output.dense": (h, f)}.items():
      shapes[p + dense + ".weight"] = (d_out, d_in)
      shapes[p + dense + ".bias"] = (d_out,)
    for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
      shapes[p + norm + ".weight"] = (h,)
      shapes[p + norm + ".bias"] = (h,)
  if with_pooler:
    shapes["pooler.dense.weight"] = (h, h)
    shapes["pooler.dense.bias"] = (h,)
  return shapes


def _leaf_kind(hf_name: str) -> str:
  """Which Flax leaf a HF weight becomes: embedding table, LayerNorm scale, Dense kernel, bias."""
  if hf_name.endswith(".bias"):
    return "bias"
  if "_embeddings." in hf_name:
    return "embedding"
  if ".LayerNorm." in hf_name:
    return "scale"
  return "kernel"


def hf_to_flax_path(hf_name: str) -> tuple[str, ...]:
  """`encoder.layer.0.output.dense.weight` -> ('encoder','layer','0','output','dense','kernel')."""
  *modules, _ = hf_name.split(".")
  return (*modules, _leaf_kind(hf_name))


def flax_path_to_hf(path: tuple[str, ...]) -> str:
  """Inverse of `hf_to_flax_path`."""
  *modules, leaf = path
  return ".".join(modules) + (".bias" if leaf == "bias" else ".weight")


def _normalise_names(tensors: dict[str, np.ndarray], model_type: str) -> dict[str, np.ndarray]:
  """Strips the `bert.`/`roberta.` prefix and renames legacy LayerNorm gamma/beta."""
  prefix = model_type + "."
  out = {}
  for name, value in tensors.items():
    if name.startswith(prefix):
      name = name[len(prefix):]
    # TF-converted checkpoints (and HF before v2) name LayerNorm parameters gamma/beta.
    if ".LayerNorm." in name or name.startswith("LayerNorm."):
      name = name.replace(".gamma", ".weight").replace(".beta", ".bias")
    out[name] = value
  # SimCSE saves its training MLP as `mlp.dense`; it is architecturally HF's pooler
  # (Dense h->h + tanh on CLS), so it takes the pooler's place when the checkpoint has none.
  if "pooler.dense.weight" not in out and "mlp.dense.weight" in out:
    out["pooler.dense.weight"] = out.pop("mlp.dense.weight")
    out["pooler.dense.bias"] = out.pop("mlp.dense.bias")
  return out


# Weight files of other formats -> the from_pretrained argument that reads them.
_OTHER_WEIGHT_FILES = (
    ("pytorch_model.bin", ""), ("pytorch_model.bin.index.json", ""),
    ("tf_model.h5", ", from_tf=True"), ("flax_model.msgpack", ", from_flax=True"),
)


def _read_safetensors(folder: str) -> dict[str, np.ndarray]:
  """Reads `model.safetensors`, or every shard listed by `model.safetensors.index.json`."""
  # local: keeps import of this module cheap
  from safetensors import SafetensorError  # pylint: disable=import-outside-toplevel
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel

  single = os.path.join(folder, "model.safetensors")
  index = os.path.join(folder, "model.safetensors.index.json")
  if os.path.exists(single):
    files = [single]
  elif os.path.exists(index):
    with open(index) as fh:
      files = [os.path.join(folder, f) for f in sorted(set(json.load(fh)["weight_map"].values()))]
  else:
    hint = ""
    # Weights in another format (a sharded PyTorch checkpoint, TF or Flax exports): say which
    # and how transformers converts it, instead of "no model.safetensors" alone.
    for name, load_flag in _OTHER_WEIGHT_FILES:
      if os.path.exists(os.path.join(folder, name)):
        hint = (f" It has {name}: convert it once with transformers, e.g. `AutoModel."
                f"from_pretrained(folder{load_flag}).save_pretrained(folder, "
                "safe_serialization=True)`.")
        break
    raise FileNotFoundError(f"No model.safetensors in {folder}.{hint}")
  tensors = {}
  for path in files:
    if not os.path.exists(path):
      raise FileNotFoundError(f"{index} lists {os.path.basename(path)}, which is not in {folder}; "
                              "download the missing shard (or the whole folder) again.")
    try:
      tensors.update(load_file(path))   # bf16 included (as ml_dtypes.bfloat16)
    except (SafetensorError, TypeError, ValueError) as err:
      raise ValueError(
          f"Could not read {path} ({' '.join(str(err).split())}): the file is damaged or "
          "incomplete (an interrupted download or copy?). Download it again.") from err
  return tensors


def read_config(folder: str) -> EncoderConfig:
  """Reads `folder/config.json` into an EncoderConfig."""
  path = os.path.join(folder, "config.json")
  if not os.path.isdir(folder):
    raise FileNotFoundError(
        f"Model folder {folder} does not exist. Pass a local Hugging Face model folder "
        "(config.json, model.safetensors, tokenizer files).")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing: a Hugging Face model folder needs config.json.")
  with open(path, encoding="utf-8") as fh:
    try:
      hf = json.load(fh)
    except ValueError as err:  # JSONDecodeError names no file
      raise ValueError(f"{path} is not valid JSON ({err}): the file is truncated or corrupt; "
                       "download the model folder again.") from err
  try:
    return EncoderConfig.from_hf_dict(hf)
  except ValueError as err:  # the messages say what is wrong, not in which file
    raise ValueError(f"{path}: {err}") from err


def hf_tensors_to_params(tensors: Mapping[str, np.ndarray], config: EncoderConfig) -> Params:
  """Checks and maps HF-named tensors (PyTorch layout) to our nested float32 tree.

  The pooler (`pooler.dense`) is optional: it is returned when present. Anything missing,
  unexpected or of the wrong shape raises one ValueError that lists every problem.
  """
  tensors = _normalise_names(dict(tensors), config.model_type)
  expected = expected_hf_shapes(config, with_pooler=True)
  pooler_names = {n for n in expected if n.startswith("pooler.")}
  has_pooler = any(n in tensors for n in pooler_names)
  if not has_pooler:
    expected = {n: s for n, s in expected.items() if n not in pooler_names}

  ignored = [n for n in tensors if n in _IGNORED_BUFFERS or n.startswith(_IGNORED_HEAD_PREFIXES)]
  missing = sorted(n for n in expected if n not in tensors)
  unexpected = sorted(n for n in tensors if n not in expected and n not in ignored)
  wrong_shape = sorted(
      f"{n}: checkpoint {tuple(tensors[n].shape)}, config.json implies {expected[n]}"
      for n in expected if n in tensors and tuple(tensors[n].shape) != expected[n])
  if has_pooler and {"mlp.dense.weight", "mlp.dense.bias"} & set(unexpected):
    # Which dense layer is "the" pooler is the user's call, not a guess of the loader's.
    raise ValueError(
        "The checkpoint holds both a pooler (pooler.dense) and SimCSE's training MLP "
        "(mlp.dense), which takes the pooler's place only in a checkpoint without one. Remove "
        "the one you do not want from model.safetensors.")
  if missing or unexpected or wrong_shape:
    lines = [f"The checkpoint does not match its {config.model_type} config.json:"]
    if missing:
      lines.append(f"  missing weights ({len(missing)}): {', '.join(missing)}")
    if unexpected:
      lines.append(f"  unexpected weights ({len(unexpected)}): {', '.join(unexpected)}")
    if wrong_shape:
      lines.append(f"  wrong shapes ({len(wrong_shape)}): {'; '.join(wrong_shape)}")
    lines.append("  Check that config.json belongs to this model.safetensors.")
    raise ValueError("\n".join(lines))
  heads = [n for n in ignored if n not in _IGNORED_BUFFERS]
  if heads:
    logging.info("Ignoring %d non-encoder weights (pre-training/task heads), e.g. %s",
                 len(heads), heads[0])

  params: Params = {}
  for name in expected:
    value = np.asarray(tensors[name], dtype=np.float32)
    path = hf_to_flax_path(name)
    if path[-1] == "kernel":
      value = value.T  # torch Linear stores (out, in); Flax Dense kernels are (in, out)
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = np.ascontiguousarray(value)
  return params


def load_pretrained(folder: str) -> tuple[EncoderConfig, Params]:
  """Loads a local HF BERT/RoBERTa folder: `(EncoderConfig, params)`.

  `params` is a nested dict of float32 numpy arrays in the layout of
  `cldro_jax.models.bert.SentenceEncoder` (`embeddings`, `encoder`, and `pooler` when the
  checkpoint has HF's pooler layer). Accepts names with or without the `bert.`/`roberta.` prefix.
  """
  config = read_config(folder)
  return config, hf_tensors_to_params(_read_safetensors(folder), config)


def params_to_hf_tensors(params: Params) -> dict[str, np.ndarray]:
  """Our tree (numpy or jax arrays) -> HF name -> float32 array in PyTorch layout."""
  tensors = {}

  def visit(node, path):
    if isinstance(node, Mapping):
      for key, child in node.items():
        visit(child, path + (str(key),))
      return
    value = np.asarray(node, dtype=np.float32)
    if path[-1] == "kernel":
      value = value.T
    tensors[flax_path_to_hf(path)] = np.ascontiguousarray(value)

  visit(params, ())
  return tensors


def _write_sentence_transformers_modules(out_folder: str, pooling: str, hidden: int, *,
                                         normalize: bool = False) -> None:
  """modules.json + 1_Pooling/config.json: a Transformer followed by cls or mean pooling, and
  an L2 normalisation when `normalize`."""
  if pooling not in ("cls", "mean"):
    raise ValueError(f"pooling must be 'cls' or 'mean' for sentence-transformers, got {pooling!r}")
  modules = [
      {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
      {"idx": 1, "name": "1", "path": "1_Pooling",
       "type": "sentence_transformers.models.Pooling"},
  ]
  if normalize:   # sentence-transformers' Normalize has no settings, hence no folder
    modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                    "type": "sentence_transformers.models.Normalize"})
  pooling_config = {
      "word_embedding_dimension": hidden,
      "pooling_mode_cls_token": pooling == "cls",
      "pooling_mode_mean_tokens": pooling == "mean",
      "pooling_mode_max_tokens": False,
      "pooling_mode_mean_sqrt_len_tokens": False,
  }
  os.makedirs(os.path.join(out_folder, "1_Pooling"), exist_ok=True)
  with open(os.path.join(out_folder, "modules.json"), "w") as fh:
    json.dump(modules, fh, indent=2)
  with open(os.path.join(out_folder, "1_Pooling", "config.json"), "w") as fh:
    json.dump(pooling_config, fh, indent=2)


def _normalizes(folder: str) -> bool:
  """Whether the sentence-transformers pipeline in `folder` ends in an L2 normalisation."""
  modules_path = os.path.join(folder, "modules.json")
  if not os.path.exists(modules_path):
    return False
  with open(modules_path) as fh:
    return any(m.get("type", "").endswith("models.Normalize") for m in json.load(fh))


def _copy_sentence_transformers_files(src: str, dst: str) -> None:
  """Copies modules.json and the module sub-folders it names (e.g. 1_Pooling/)."""
  for name in SENTENCE_TRANSFORMERS_FILES:
    if os.path.exists(os.path.join(src, name)):
      shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
  modules_path = os.path.join(src, "modules.json")
  if os.path.exists(modules_path):
    with open(modules_path) as fh:
      for module in json.load(fh):
        sub = module.get("path", "")
        if sub and os.path.isdir(os.path.join(src, sub)):
          shutil.copytree(os.path.join(src, sub), os.path.join(dst, sub), dirs_exist_ok=True)


def export_pretrained(config: EncoderConfig, params: Params, out_folder: str,
                      tokenizer_folder: str, *, pooling: str | None = None) -> None:
  """Writes a HF model folder that transformers and sentence-transformers load.

  Writes `config.json`, `model.safetensors` (HF names, PyTorch layout, float32) and copies the
  tokenizer files from `tokenizer_folder`. The sentence-transformers pipeline description
  (modules.json, 1_Pooling/, ...) is copied from `tokenizer_folder` when it has one, unless
  `pooling` ("cls" or "mean") is given: then a Transformer + that pooling pipeline is written
  (SimCSE-style models are evaluated with "cls", without the training MLP), followed by the L2
  normalisation when `tokenizer_folder`'s pipeline had one (all-MiniLM-L6-v2 does), so that a
  fine-tuned model gives unit vectors as its source did.
  """
  from safetensors.numpy import save_file

  tensors = params_to_hf_tensors(params)
  expected = expected_hf_shapes(config, with_pooler="pooler.dense.weight" in tensors)
  problems = sorted(set(expected) ^ set(tensors))
  problems += [n for n in expected if n in tensors and tensors[n].shape != expected[n]]
  if problems:
    raise ValueError(f"params do not match the config's architecture: {problems}")
  copied = [f for f in TOKENIZER_FILES if os.path.exists(os.path.join(tokenizer_folder, f))]
  if not any(f in copied for f in ("tokenizer.json", "vocab.txt", "vocab.json")):
    raise FileNotFoundError(
        f"No tokenizer files in {tokenizer_folder} (expected tokenizer.json, vocab.txt or "
        "vocab.json + merges.txt): pass the folder the model was loaded from.")
  os.makedirs(out_folder, exist_ok=True)
  save_file(tensors, os.path.join(out_folder, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(out_folder, "config.json"), "w") as fh:
    json.dump(config.to_hf_dict(), fh, indent=2, sort_keys=True)
  for name in copied:
    shutil.copy2(os.path.join(tokenizer_folder, name), os.path.join(out_folder, name))
  if pooling is not None:
    _write_sentence_transformers_modules(out_folder, pooling, config.hidden_size,
                                         normalize=_normalizes(tokenizer_folder))
    # The Transformer module's own settings (max_seq_length, lower-casing) still hold.
    transformer_settings = os.path.join(tokenizer_folder, "sentence_bert_config.json")
    if os.path.exists(transformer_settings):
      shutil.copy2(transformer_settings, os.path.join(out_folder, "sentence_bert_config.json"))
  else:
    _copy_sentence_transformers_files(tokenizer_folder, out_folder)
