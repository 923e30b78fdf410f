"""Real-world Hugging Face folders that used to load silently wrong or fail without naming the fix:
inputs past the position table, tokenizer ids past the embeddings, weights in other formats,
config.json problems; and sharded half-precision checkpoints (read and upcast exactly)."""
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from cldro_jax.data import text
from cldro_jax.models import bert

ROBERTA_DIR = pathlib.Path(__file__).parent / "fixtures" / "sentence" / "roberta_tiny"


def _copy(tmp_path, name="model"):
  folder = tmp_path / name
  shutil.copytree(ROBERTA_DIR, folder)
  return folder


@pytest.fixture(scope="module")
def roberta():
  config, params = bert.load_pretrained(str(ROBERTA_DIR))
  return config, jax.tree.map(jnp.asarray, params)


def test_inputs_longer_than_the_position_table_are_refused(roberta):
  # Before: positions past max_position_embeddings gathered NaN (PyTorch raises IndexError),
  # and through attention every row of the batch became NaN, e.g. from the STS evaluator's
  # --max_length above the model's 512 tokens.
  config, params = roberta
  assert config.max_tokens == 64  # max_position_embeddings 66, RoBERTa positions start at 2
  model = bert.SentenceEncoder(config, pooling="mean")
  encode = lambda ids: model.apply(  # noqa: E731
      {"params": params}, ids, jnp.ones_like(ids), train=False, use_mlp=False)
  assert np.isfinite(np.asarray(encode(jnp.full((2, 64), 5, jnp.int32)))).all()
  with pytest.raises(ValueError, match=r"65 tokens .* 64 positions .*max_position_embeddings=66"
                                       r".*max_length <= 64"):
    encode(jnp.full((2, 65), 5, jnp.int32))


def test_tokenizer_ids_beyond_the_word_embeddings_are_refused(tmp_path):
  # A token added to the tokenizer without resize_token_embeddings: its id (400) has no row in
  # the 400 word embeddings, and JAX's gather returned NaN for the whole batch.
  folder = _copy(tmp_path)
  tok = text.load_tokenizer(str(folder))
  tok.add_tokens(["<new_token>"])
  tok.save(str(folder / "tokenizer.json"))
  assert tok.encode("a <new_token>").ids[-2] == 400
  with pytest.raises(ValueError, match=r"1 token ids beyond the 400 word embeddings of .*"
                                       r"config.json .*'<new_token>' = 400.*"
                                       r"resize_token_embeddings"):
    text.SentenceTokenizer(str(folder))


@pytest.mark.parametrize("name, flag", [
    ("pytorch_model.bin", ""), ("pytorch_model.bin.index.json", ""),
    ("tf_model.h5", ", from_tf=True"), ("flax_model.msgpack", ", from_flax=True"),
])
def test_weights_in_other_formats_name_the_conversion(tmp_path, name, flag):
  folder = _copy(tmp_path)
  (folder / "model.safetensors").unlink()
  (folder / name).write_bytes(b"")
  with pytest.raises(FileNotFoundError,
                     match=rf"No model.safetensors.* It has {name}: .*from_pretrained\(folder"
                           rf"{flag}\).save_pretrained\(folder, safe_serialization=True\)"):
    bert.load_pretrained(str(folder))


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.pop("num_attention_heads"), r"lacks \['num_attention_heads'\]"),  # TypeError
    (lambda c: c.update(hidden_act="swish"), r"hidden_act 'swish' is not implemented"),
    (lambda c: c.update(position_embedding_type="relative_key"), r"'relative_key' is not impl"),
    # hand edits that were a TypeError / AttributeError deep inside before
    (lambda c: c.update(num_hidden_layers="six"), r"num_hidden_layers must be a positive "
                                                  r"integer, got 'six'"),
    (lambda c: c.update(hidden_size=0), r"hidden_size must be a positive integer, got 0"),
    (lambda c: c.update(pad_token_id=1.5), r"pad_token_id must be an integer token id"),
    (lambda c: c.update(layer_norm_eps="1e-12"), r"layer_norm_eps must be a number >= 0"),
])
def test_config_json_problems_name_the_file(tmp_path, edit, message):
  folder = _copy(tmp_path)
  config = json.loads((folder / "config.json").read_text())
  edit(config)
  (folder / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match=rf"model/config.json: .*{message}"):
    bert.load_pretrained(str(folder))


def test_config_json_that_is_not_an_object_is_named(tmp_path):
  folder = _copy(tmp_path)
  (folder / "config.json").write_text("[1, 2]")
  with pytest.raises(ValueError, match=r"model/config.json: config.json must hold a JSON object "
                                       r"of the model's settings, got a list"):
    bert.load_pretrained(str(folder))


def test_truncated_config_json_is_named(tmp_path):
  folder = _copy(tmp_path)
  (folder / "config.json").write_text((ROBERTA_DIR / "config.json").read_text()[:100])
  with pytest.raises(ValueError, match=r"model/config.json is not valid JSON.*download"):
    bert.load_pretrained(str(folder))



def test_a_damaged_or_missing_weights_file_is_named_with_the_fix(tmp_path):
  # safetensors' own SafetensorError ("invalid header length") came out as a bare traceback.
  folder = _copy(tmp_path)
  weights = folder / "model.safetensors"
  weights.write_bytes(weights.read_bytes()[:3000])
  with pytest.raises(ValueError, match=r"Could not read .*model.safetensors \(.*header.*\): the "
                                       r"file is damaged or incomplete.*Download it again"):
    bert.load_pretrained(str(folder))
  # A sharded checkpoint whose index lists a shard that is not there.
  weights.unlink()
  (folder / "model.safetensors.index.json").write_text(json.dumps(
      {"metadata": {}, "weight_map": {"embeddings.word_embeddings.weight": "model-1.safetensors"}}))
  with pytest.raises(FileNotFoundError, match=r"index.json lists model-1.safetensors, which is "
                                              r"not in .*download the missing shard"):
    bert.load_pretrained(str(folder))

def test_sharded_half_precision_checkpoint_is_upcast_exactly(tmp_path, roberta):
  """transformers' sharded layout (index.json + shards), bfloat16 and float16 tensors with the
  `roberta.` prefix: every weight read and upcast to float32 without loss."""
  _, reference = roberta
  folder = _copy(tmp_path)
  (folder / "model.safetensors").unlink()
  tensors = load_file(str(ROBERTA_DIR / "model.safetensors"))
  names = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": (names[::2], ml_dtypes.bfloat16),
            "model-00002-of-00002.safetensors": (names[1::2], np.float16)}
  weight_map = {}
  for shard, (shard_names, dtype) in shards.items():
    save_file({"roberta." + n: tensors[n].astype(dtype) for n in shard_names}, str(folder / shard))
    weight_map.update({"roberta." + n: shard for n in shard_names})
  (folder / "model.safetensors.index.json").write_text(
      json.dumps({"metadata": {}, "weight_map": weight_map}))
  _, loaded = bert.load_pretrained(str(folder))
  half = {n: tensors[n].astype(dtype).astype(np.float32)
          for shard_names, dtype in shards.values() for n in shard_names}
  flat = jax.tree_util.tree_leaves_with_path(loaded)
  assert len(flat) == len(jax.tree.leaves(reference)) == len(half)
  for path, leaf in flat:
    keys = tuple(k.key for k in path)
    expected = half[bert.flax_path_to_hf(keys)]
    assert leaf.dtype == np.float32
    np.testing.assert_array_equal(leaf, expected.T if keys[-1] == "kernel" else expected)


def test_sentence_transformers_do_lower_case_is_applied(tmp_path):
  # sentence-transformers' Transformer module lower-cases the texts before tokenising when
  # sentence_bert_config.json says do_lower_case (export_pretrained copies that file); the
  # case-sensitive RoBERTa BPE gave "Hello" other ids than sentence-transformers does.
  plain = text.SentenceTokenizer(str(ROBERTA_DIR))
  texts = ["Hello World, ÄÖ.", "hello world, äö."]
  upper, lower = plain.encode_batch(texts, 16)["input_ids"]
  assert (upper != lower).any()
  folder = _copy(tmp_path)
  (folder / "sentence_bert_config.json").write_text(
      json.dumps({"max_seq_length": 64, "do_lower_case": True}))
  lowered = text.SentenceTokenizer(str(folder))
  np.testing.assert_array_equal(lowered.encode_batch(texts, 16)["input_ids"],
                                np.stack([lower, lower]))
  np.testing.assert_array_equal(lowered.lengths(texts), plain.lengths(texts[1:]).repeat(2))
  (folder / "sentence_bert_config.json").write_text(json.dumps({"do_lower_case": False}))
  np.testing.assert_array_equal(text.SentenceTokenizer(str(folder)).encode_batch(texts, 16)[
      "input_ids"], np.stack([upper, lower]))
