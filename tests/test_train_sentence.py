"""The sentence track through the trainer: SimCSE-style training, STS model selection, export.

Runs on the tiny RoBERTa fixture (tests/fixtures/sentence/roberta_tiny, random weights, written by
transformers) with corpora and SentEval-format STS files written here, and once on the shipped
MiniLM (the offline quick start, configs/sts_minilm.py:runlocal).
"""

import io
import json
import os
import pathlib
import types
from contextlib import redirect_stderr, redirect_stdout

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import cldro_jax
from cldro_jax import config_defaults
from cldro_jax import losses
from cldro_jax import metrics as metrics_lib
from cldro_jax import train
from cldro_jax.data import text
from cldro_jax.evaluators import sts
from cldro_jax.models import bert
from cldro_jax.tasks import sentence
from configs import sts_bert as sts_bert_config
from configs import sts_minilm as sts_minilm_config
from configs import sts_roberta as sts_roberta_config
from helpers import saved_arrays, with_overrides

ROBERTA_DIR = pathlib.Path(__file__).parent / "fixtures" / "sentence" / "roberta_tiny"
WORDS = ("a man woman child plays guitar piano dog cat runs sleeps eats food the on in park "
         "house red blue small big quickly slowly sings reads book").split()


def _sentence(rng):
  return " ".join(rng.choice(WORDS, size=int(rng.integers(3, 10)))).capitalize() + "."


def write_corpus(path, n=64, seed=0):
  rng = np.random.default_rng(seed)
  lines = [_sentence(rng) for _ in range(n)]
  # Blank lines are not sentences (wiki1m has none; the reader skips them anyway).
  path.write_text("\n".join(lines[:5] + [""] + lines[5:]) + "\n", encoding="utf-8")
  return lines


def write_sts(root, seed=1):
  """A SentEval data/downstream tree in the real formats (every file the 7 tasks read)."""
  rng = np.random.default_rng(seed)
  def pairs(n):
    return [(_sentence(rng), _sentence(rng), float(np.round(rng.uniform(0, 5), 2)))
            for _ in range(n)]
  for year, subsets in sts.STS_YEAR_SUBSETS.items():
    folder = root / "STS" / f"{year}-en-test"
    folder.mkdir(parents=True)
    for subset in subsets:
      rows = pairs(6)
      (folder / f"STS.input.{subset}.txt").write_text(
          "".join(f"{a}\t{b}\n" for a, b, _ in rows), encoding="utf-8")
      (folder / f"STS.gs.{subset}.txt").write_text(
          "".join(f"{s}\n" for _, _, s in rows), encoding="utf-8")
  stsb = root / "STS" / "STSBenchmark"
  stsb.mkdir(parents=True)
  (root / "SICK").mkdir()
  for split, stsb_file, sick_file in (("train", "sts-train.csv", "SICK_train.txt"),
                                      ("dev", "sts-dev.csv", "SICK_trial.txt"),
                                      ("test", "sts-test.csv", "SICK_test_annotated.txt")):
    (stsb / stsb_file).write_text("".join(
        f"main-captions\tMSRvid\t2012test\t{i:04d}\t{s}\t{a}\t{b}\n"
        for i, (a, b, s) in enumerate(pairs(24))), encoding="utf-8")
    (root / "SICK" / sick_file).write_text(
        "pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment\n" + "".join(
            f"{i}\t{a}\t{b}\t{1 + 0.8 * s:.1f}\tNEUTRAL\n"
            for i, (a, b, s) in enumerate(pairs(24))),
        encoding="utf-8")
  return root


def tiny_config(tmp_path, **overrides):
  """The BERT recipe (ADNCE sentence form, cls+MLP, AdamW linear decay) on the tiny RoBERTa."""
  config = sts_bert_config.get_config()
  config.model.path = str(ROBERTA_DIR)
  config.model.dtype = "float32"
  corpus = tmp_path / "corpus.txt"
  if not corpus.exists():
    write_corpus(corpus)
  config.data.path = str(corpus)
  config.data.sts_root = ""
  config.batch_size = 16
  config.total_steps = 4
  config.log_every_steps = 1
  config.checkpoint_every_steps = 2
  config.progress_bar = False
  config.eval.every_steps = 0
  config.eval.final_tasks = ()
  config.mesh.num_devices = 1
  return with_overrides(config, **overrides)


def encode(config, params, tokenizer_dir, sentences, pooling, max_length=64):
  model = bert.SentenceEncoder(config, pooling=pooling)
  batch = text.SentenceTokenizer(str(tokenizer_dir)).encode_batch(sentences, max_length)
  return np.asarray(model.apply({"params": jax.tree.map(jnp.asarray, params)},
                                batch["input_ids"], batch["attention_mask"], train=False,
                                use_mlp=False), np.float64)


def spearman_all_setting(emb_fn, subsets):
  """Independent STS score: numpy cosine, scipy Spearman over all subsets' pairs concatenated."""
  sims, gold = [], []
  for pairs in subsets.values():
    a, b = emb_fn(pairs.sentences1), emb_fn(pairs.sentences2)
    sims.append((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1))
    gold.append(pairs.scores)
  return 100 * scipy.stats.spearmanr(np.concatenate(sims), np.concatenate(gold)).statistic


# ----------------------------------------------------------------------------------------------


def test_training_lowers_the_loss(tmp_path):
  config = tiny_config(tmp_path, total_steps=30, checkpoint_every_steps=1000,
                       **{"optim.lr": 3e-3})
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  logged = [r["loss"] for r in metrics_lib.read_metrics(workdir, "train")]
  assert len(logged) == 30 and np.all(np.isfinite(logged))
  assert np.mean(logged[-5:]) < np.mean(logged[:5])

  # The ADNCE loss of the whole 64-sentence corpus as one batch, same dropout keys, before and
  # after training (the per-step losses above are of different batches, hence noisy).
  task = sentence.SentenceTask(config, train.make_mesh(1))
  batch = task.source[np.arange(64)]
  initial, _ = jax.jit(task.init)(train.model_init_key(config.seed))
  trained = saved_arrays(workdir)[0]["params"]["model"]

  @jax.jit
  def corpus_loss(params, key):
    out = task.forward(params, {}, batch, key, train=True)
    return losses.adnce(out.z1, out.z2, temperature=0.07, mu=0.4, sigma=1.0, variant="sentence")

  keys = [jax.random.key(i) for i in range(2)]
  before = np.mean([corpus_loss(initial, k) for k in keys])
  after = np.mean([corpus_loss(trained, k) for k in keys])
  # Random weights start worse than chance (log 64 = 4.16): dropout noise dominates.
  assert before > np.log(64) and after < np.log(64) - 0.2 and after < before - 0.5, (before, after)


def test_eight_devices_equal_one_device(tmp_path):
  # SGD, not AdamW: Adam divides by sqrt(v), which turns float reduction-order noise in
  # near-zero gradient coordinates into visible parameter differences; with SGD a parameter
  # difference is the learning rate times a gradient difference, so a tight tolerance means
  # something. The loss and the gradient norm of each step are compared as well.
  settings = {"optim.name": "sgd", "optim.lr": 0.5, "optim.momentum": 0.9, "total_steps": 2,
              "checkpoint_every_steps": 1000}
  one, eight = str(tmp_path / "one"), str(tmp_path / "eight")
  train.train_and_evaluate(tiny_config(tmp_path, **settings), one)
  train.train_and_evaluate(tiny_config(tmp_path, **settings, **{"mesh.num_devices": 8}), eight)
  a, _ = saved_arrays(one)
  b, _ = saved_arrays(eight)
  _, initial = bert.load_pretrained(str(ROBERTA_DIR))
  moved = max(np.abs(np.asarray(x) - y).max() for x, y in zip(
      jax.tree.leaves(a["params"]["model"]["encoder"]), jax.tree.leaves(initial["encoder"]),
      strict=True))
  assert moved > 1e-3   # the steps did change the encoder
  # Same batches, same dropout masks (partitionable threefry), negatives gathered across the 8
  # devices: the same function; only floating-point reduction orders differ.
  for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"]), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)
  lines_one = metrics_lib.read_metrics(one, "train")
  lines_eight = metrics_lib.read_metrics(eight, "train")
  for key in ("loss", "grad_norm"):
    np.testing.assert_allclose([r[key] for r in lines_one], [r[key] for r in lines_eight],
                               rtol=1e-5)


def test_missing_sts_data_fail_at_start_with_the_download(tmp_path):
  config = tiny_config(tmp_path, **{"eval.every_steps": 2,
                                    "data.sts_root": str(tmp_path / "no_senteval")})
  with pytest.raises(FileNotFoundError) as err:
    train.train_and_evaluate(config, str(tmp_path / "run"))
  message = str(err.value)
  assert "sts-dev.csv" in message and "get_transfer_data.bash" in message
  assert "--config.data.sts_root" in message and "--config.eval.missing_sts=skip" in message
  assert not os.path.exists(tmp_path / "run" / "checkpoints")   # before any training step


def test_best_dev_model_skips_nan_scores_and_survives_a_stale_old_folder(tmp_path, monkeypatch):
  """A NaN dev score (a collapsed model's constant similarities) is never kept as the best: kept,
  no later score could beat it. A `best_dev.old` left by a kill after the second rename of the
  kept model's replacement does not stop the next best from being saved."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  task = sentence.SentenceTask(tiny_config(tmp_path), train.make_mesh(1), workdir=str(workdir))
  task.dev_data = {}
  params, _ = task.init(jax.random.key(0))
  scores = iter([float("nan"), 70.0, 80.0, 75.0])
  monkeypatch.setattr(sentence, "_sts_results",
                      lambda *_args, **_kw: {"STSBenchmark": (score := next(scores)),
                                             "avg": score})
  def monitor(step):
    with redirect_stdout(io.StringIO()):
      return task.monitor(types.SimpleNamespace(step=np.int32(step), params={"model": params}))

  first = monitor(2)
  assert np.isnan(first["sts_dev_avg"]) and "sts_dev_best" not in first
  assert not (workdir / "best_dev").exists()
  assert monitor(4)["sts_dev_best_step"] == 4
  stale = workdir / "best_dev.old"
  stale.mkdir()
  (stale / "config.json").write_text("{}")
  assert (monitor(6)["sts_dev_best"], monitor(8)["sts_dev_best"]) == (80.0, 80.0)
  assert json.loads((workdir / "best_dev" / "best.json").read_text())["step"] == 6
  assert not stale.exists()


def test_a_resume_with_other_dev_sets_rescores_the_kept_model(tmp_path, monkeypatch):
  """eval.* may change on resume: a kept model chosen on SICK-R dev is scored again on STS-B dev
  before new STS-B scores are compared with it (a SICK-R score beside STS-B ones would keep it
  however the new model does), and the record says what it was scored on."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  sick = tiny_config(tmp_path, **{"eval.dev_tasks": ("SICKRelatedness",)})
  task = sentence.SentenceTask(sick, train.make_mesh(1), workdir=str(workdir))
  params, _ = task.init(jax.random.key(0))
  scored = []

  def dev_results(_embed, data, **_kw):
    name = next(iter(data))
    # STS-B: the step-6 model is scored first (60), then the kept step-4 model again (50).
    score = {"SICKRelatedness": 70.0, "STSBenchmark": 50.0 if name in scored else 60.0}[name]
    scored.append(name)
    return {next(iter(data)): score, "avg": score}
  monkeypatch.setattr(sentence, "_sts_results", dev_results)

  def monitor(task, step):
    with redirect_stdout(io.StringIO()):
      return task.monitor(types.SimpleNamespace(step=np.int32(step), params={"model": params}))
  task.dev_data = {"SICKRelatedness": None}
  assert monitor(task, 4)["sts_dev_best"] == 70.0
  stsb = tiny_config(tmp_path, **{"eval.dev_tasks": ("STSBenchmark",)})
  resumed = sentence.SentenceTask(stsb, train.make_mesh(1), workdir=str(workdir))
  resumed.dev_data = {"STSBenchmark": None}
  err = io.StringIO()
  with redirect_stderr(err):
    after = monitor(resumed, 6)
  # The kept step-4 model rescored on STS-B dev (50), then beaten by the step-6 model (60).
  assert scored == ["SICKRelatedness", "STSBenchmark", "STSBenchmark"]
  assert ("dev_tasks ['SICKRelatedness'] -> ['STSBenchmark']): rescored, dev 50.00"
          in err.getvalue())
  assert (after["sts_dev_best"], after["sts_dev_best_step"]) == (60.0, 6.0)
  record = json.loads((workdir / "best_dev" / "best.json").read_text())
  assert (record["step"], record["dev_tasks"], record["eval_pooler"]) == (6, ["STSBenchmark"], "cls")


def test_dev_selection_final_sts_and_workdir_evaluation(tmp_path):
  root = write_sts(tmp_path / "downstream")
  workdir = str(tmp_path / "run")
  config = tiny_config(tmp_path, total_steps=6, checkpoint_every_steps=1000, **{
      "eval.every_steps": 2, "data.sts_root": str(root), "eval.final_tasks": sts.TASKS,
      "eval.batch_size": 16, "optim.lr": 1e-3})
  out = io.StringIO()
  with redirect_stderr(out):   # stderr: stdout is the command line's results JSON
    results = train.train_and_evaluate(config, workdir)
  printed = out.getvalue()
  assert "pooler: cls (without the training MLP)" in printed    # SimCSE's evaluation, said so
  assert "STS-B" in printed and "SICK-R" in printed

  # Model selection: the dev score is logged at steps 2, 4 and 6; the best one is kept.
  monitor = metrics_lib.read_metrics(workdir, "monitor")
  assert [r["step"] for r in monitor] == [2, 4, 6]
  dev = [r["sts_dev_avg"] for r in monitor]
  best_step = [2, 4, 6][int(np.argmax(dev))]
  assert monitor[-1]["sts_dev_best"] == pytest.approx(max(dev))
  assert monitor[-1]["sts_dev_best_step"] == best_step
  record = json.loads(pathlib.Path(workdir, "best_dev", "best.json").read_text())
  assert record["step"] == best_step and results["sts_model_step"] == best_step

  # The dev score of the kept model, recomputed independently from its exported weights.
  enc_config, best_params = bert.load_pretrained(os.path.join(workdir, "best_dev"))
  emb = lambda s: encode(enc_config, best_params, ROBERTA_DIR, s, "cls")  # noqa: E731
  stsb_dev = sts.load_task(str(root), "STSBenchmark", "dev")
  assert record["score"] == pytest.approx(spearman_all_setting(emb, stsb_dev), abs=1e-3)
  # The 7 test tasks in the "all" setting, on the best model, against the same reference.
  for task in sts.TASKS:
    expected = spearman_all_setting(emb, sts.load_task(str(root), task, "test"))
    assert results[f"sts_{task}"] == pytest.approx(expected, abs=1e-3), task
  assert results["sts_avg"] == pytest.approx(np.mean([results[f"sts_{t}"] for t in sts.TASKS]))

  # The export is the evaluated (best) model.
  _, exported = bert.load_pretrained(results["hf_export"])
  for x, y in zip(jax.tree.leaves(exported), jax.tree.leaves(best_params), strict=True):
    np.testing.assert_array_equal(x, y)

  # A resumed run's task finds the kept model on disk (best score, step and weights).
  task = sentence.SentenceTask(config, train.make_mesh(1), workdir=workdir)
  state, _ = saved_arrays(workdir)
  final_state = types.SimpleNamespace(step=np.int32(6), params=state["params"])
  with redirect_stdout(io.StringIO()):
    resumed = task.final_evaluation(final_state)
  assert resumed["sts_model_step"] == best_step
  assert resumed["sts_avg"] == pytest.approx(results["sts_avg"], abs=1e-6)
  # Killed between the two renames that replace the kept model: only best_dev.old is there,
  # complete; a resumed run takes it back instead of treating the next dev score as the best.
  os.replace(os.path.join(workdir, "best_dev"), os.path.join(workdir, "best_dev.old"))
  task = sentence.SentenceTask(config, train.make_mesh(1), workdir=workdir)
  with redirect_stdout(io.StringIO()):
    recovered = task.final_evaluation(final_state)
  assert recovered["sts_model_step"] == best_step
  assert os.path.isdir(os.path.join(workdir, "best_dev"))

  # `python -m cldro_jax.evaluators.sts --workdir`: the best model by default...
  with redirect_stdout(io.StringIO()) as cli_out:
    again = sts.main([f"--workdir={workdir}", "--batch_size=16"])
  assert "best STS dev model" in cli_out.getvalue()
  for task in sts.TASKS + ("avg",):
    assert again[task] == pytest.approx(results[f"sts_{task}"], abs=1e-4)
  # ...or the last training checkpoint, restored from orbax.
  final_params = state["params"]["model"]
  with redirect_stdout(io.StringIO()):
    latest = sts.main([f"--workdir={workdir}", "--checkpoint=latest", "--tasks=STSBenchmark",
                       "--batch_size=16"])
  emb_final = lambda s: encode(enc_config, final_params, ROBERTA_DIR, s, "cls")  # noqa: E731
  assert latest["STSBenchmark"] == pytest.approx(
      spearman_all_setting(emb_final, sts.load_task(str(root), "STSBenchmark", "test")), abs=1e-3)

  # `cldro_jax.load_encoder`: the kept (best dev) model by default, a training checkpoint by
  # step; the evaluation pooler (CLS without the MLP); any batch size, order kept.
  sentences = list(next(iter(stsb_dev.values())).sentences1[:11])
  best = cldro_jax.load_encoder(workdir)
  assert best.step == best_step and best.pooler == "cls"
  np.testing.assert_allclose(best.embed(sentences, batch_size=4),
                             emb(sentences), rtol=1e-5, atol=1e-5)
  last = cldro_jax.load_encoder(workdir, step=6)
  np.testing.assert_allclose(last.embed(sentences), emb_final(sentences), rtol=1e-5, atol=1e-5)
  assert best.embed([]).shape == (0, enc_config.hidden_size)
  with pytest.raises(ValueError, match="list of sentences"):
    best.embed("one sentence")
  with pytest.raises(ValueError, match="batch_size must be a positive int"):
    best.embed(sentences, batch_size=0)
  with pytest.raises(ValueError, match="max_length must be an int >= 2"):
    best.embed(sentences, max_length=1)

  # A run that evaluates at config.eval.max_length=5 tokens: load_encoder and the STS command
  # truncate there too by default, as the run's own evaluation does (they used the model's max).
  config_path = pathlib.Path(workdir, "config.json")
  run_config = json.loads(config_path.read_text())
  run_config["eval"]["max_length"] = 5
  config_path.write_text(json.dumps(run_config))
  emb5 = lambda s: encode(enc_config, best_params, ROBERTA_DIR, s, "cls", 5)  # noqa: E731
  short = cldro_jax.load_encoder(workdir).embed(sentences)
  np.testing.assert_allclose(short, emb5(sentences), rtol=1e-5, atol=1e-5)
  assert np.abs(short - emb(sentences)).max() > 1e-2   # truncation changes these sentences
  with redirect_stdout(io.StringIO()):
    at5 = sts.main([f"--workdir={workdir}", "--tasks=STSBenchmark", "--batch_size=16"])
  stsb_test = sts.load_task(str(root), "STSBenchmark", "test")
  assert at5["STSBenchmark"] == pytest.approx(spearman_all_setting(emb5, stsb_test), abs=1e-3)
  assert at5["STSBenchmark"] != pytest.approx(results["sts_STSBenchmark"], abs=1e-3)


def test_runlocal_minilm_offline_end_to_end_and_export_reload(tmp_path):
  config = sts_minilm_config.get_config("runlocal")
  config.total_steps = 2
  config.batch_size = 8
  config.mesh.num_devices = 1
  workdir = str(tmp_path / "run")
  out = io.StringIO()
  with redirect_stderr(out):
    results = train.train_and_evaluate(config, workdir)
  # No STS data offline: said clearly, with how to get them, and the model is still exported.
  assert "STS evaluation skipped" in results["sts_skipped"]
  assert "get_transfer_data.bash" in results["sts_skipped"]
  assert "STS evaluation skipped" in out.getvalue()
  assert "--config.data.sts_root (python -m cldro_jax.main)" in results["sts_skipped"]
  export = results["hf_export"]
  modules = json.loads(pathlib.Path(export, "modules.json").read_text())
  # MiniLM's pipeline ends in Normalize: kept, so the export gives unit vectors as its source.
  assert [m["type"].rsplit(".", 1)[-1] for m in modules] == ["Transformer", "Pooling",
                                                             "Normalize"]
  pooling = json.loads(pathlib.Path(export, "1_Pooling", "config.json").read_text())
  assert pooling["pooling_mode_mean_tokens"] and not pooling["pooling_mode_cls_token"]
  # MiniLM's Transformer settings travel along (sentence-transformers would otherwise cut
  # inputs at the tokenizer's 512 instead of the model's 256 tokens).
  assert json.loads(pathlib.Path(export, "sentence_bert_config.json").read_text()) == json.loads(
      pathlib.Path(sentence.shipped_minilm_dir(), "sentence_bert_config.json").read_text())

  # The export reloads with our loader and embeds like the trained checkpoint.
  state, meta = saved_arrays(workdir)
  assert meta["step"] == 2
  enc_config, exported = bert.load_pretrained(export)
  trained = state["params"]["model"]
  _, original = bert.load_pretrained(sentence.shipped_minilm_dir())
  # Mean pooling never used the MLP: the export carries MiniLM's own pooler, not the unused
  # random one of the run; everything else is the trained encoder.
  jax.tree.map(np.testing.assert_array_equal, exported["pooler"], original["pooler"])
  assert np.abs(np.asarray(trained["pooler"]["dense"]["kernel"])
                - original["pooler"]["dense"]["kernel"]).max() > 1e-3
  assert set(exported) == set(trained)
  for key in set(trained) - {"pooler"}:
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, np.asarray(y)),
                 exported[key], trained[key])
  sentences = text.sklearn_descr_sentences()[:6]
  tok = text.SentenceTokenizer(export)
  batch = tok.encode_batch(sentences, 32)
  model = bert.SentenceEncoder(enc_config, pooling="mean")
  run = lambda p: np.asarray(model.apply(  # noqa: E731
      {"params": jax.tree.map(jnp.asarray, p)}, batch["input_ids"], batch["attention_mask"],
      train=False, use_mlp=False))
  np.testing.assert_allclose(run(exported), run(trained), rtol=0, atol=0)
  # Training changed the shipped MiniLM, and the tokenizer travelled with the weights.
  assert np.abs(run(exported) - run(original)).max() > 1e-6
  assert tok.encode_batch(sentences, 32)["input_ids"].tolist() == text.SentenceTokenizer(
      sentence.shipped_minilm_dir()).encode_batch(sentences, 32)["input_ids"].tolist()


def test_full_configs_match_the_paper():
  """sts_bert / sts_roberta: LOSSES.md hyperparameters; bert-base / roberta-base by shapes."""
  expected = {
      sts_bert_config: ("bert-base-uncased", 0.07, 0.4, 1.0, 64, 3e-5, 109_482_240),
      sts_roberta_config: ("roberta-base", 0.06, 2.0, 1.0, 512, 1e-5, 124_645_632),
  }
  for module, (arch, t, mu, sigma, batch, lr, n_params) in expected.items():
    config = module.get_config()
    config_defaults.validate_config(config)
    sentence.validate(config)
    assert os.path.basename(config.model.path) == arch
    assert (config.loss.name, config.loss.temperature, config.loss.mu, config.loss.sigma) == (
        "adnce", t, mu, sigma)
    assert (config.batch_size, config.optim.lr, config.total_epochs) == (batch, lr, 1.0)
    assert (config.optim.name, config.optim.schedule, config.optim.warmup_epochs,
            config.optim.weight_decay, config.optim.grad_clip_norm) == (
                "adamw", "linear_decay", 0.0, 0.0, 1.0)
    assert (config.data.max_length, config.model.pooler, config.model.mlp_init) == (
        32, "cls_mlp", "fresh")
    assert sentence.eval_pooler(config) == "cls"          # evaluation without the MLP
    assert (config.eval.every_steps, tuple(config.eval.dev_tasks), config.eval.keep_best) == (
        125, ("STSBenchmark",), True)
    assert tuple(config.eval.final_tasks) == sts.TASKS and config.eval.missing_sts == "error"
    # SimCSE's baseline variant: InfoNCE at t = 0.05.
    baseline = module.get_config("loss=infonce")
    assert (baseline.loss.name, baseline.loss.temperature) == ("infonce", 0.05)
    shapes = sentence.model_params_shape(config, sentence.KNOWN_ARCHITECTURES[arch])
    # HF BertModel / RobertaModel incl. the pooler (our training MLP has the pooler's shapes).
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == n_params
    local = module.get_config("runlocal")
    assert local.loss.to_dict() == config.loss.to_dict()
    assert local.model.path == sentence.shipped_minilm_dir()
    assert local.data.source == "sklearn_descr"


def test_flops_per_sentence_matches_anchor_and_xla():
  arch = sentence.KNOWN_ARCHITECTURES["bert-base-uncased"]
  assert sentence.flops_per_sentence(arch, 32) / 1e9 == pytest.approx(33, abs=0.5)  # ANCHORS.md
  # Against XLA's own count of a forward pass (a mid-size encoder, where matmuls dominate).
  small = bert.EncoderConfig(model_type="bert", vocab_size=100, hidden_size=256,
                             num_hidden_layers=2, num_attention_heads=4, intermediate_size=1024)
  model = bert.SentenceEncoder(small)
  ids = jnp.ones((4, 32), jnp.int32)
  params = jax.eval_shape(lambda k: bert.init_params(model, k), jax.random.key(0))
  cost = jax.jit(lambda p, i: model.apply({"params": p}, i, jnp.ones_like(i), train=False,
                                          use_mlp=True)).lower(params, ids).compile()
  cost = cost.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  # flops_per_sentence counts 2 views x (forward + backward) = 6 forward passes.
  analytic = sentence.flops_per_sentence(small, 32) / 6 * 4
  assert cost["flops"] == pytest.approx(analytic, rel=0.1)


def test_rst_sentences_and_the_offline_corpus():
  rst = ("Title\n=====\n\n:Field: value\n\n.. note:: skipped\n\n"
         "The first sentence is here. A second one follows `with a link <http://x.org>`_!\n"
         "It wraps over two lines.\n\n- a bullet item. Not taken.\n\n=== ===\n a   b\n=== ===\n")
  assert text.sentences_from_rst(rst) == [
      "The first sentence is here.", "A second one follows with a link!",
      "It wraps over two lines."]
  corpus = text.sklearn_descr_sentences()
  assert len(corpus) > 100 and all(s[-1] in ".!?" and len(s.split()) >= 4 for s in corpus)
  assert any("Fisher" in s for s in corpus)   # the iris description is in


@pytest.mark.parametrize("overrides, message", [
    ({"data.source": "hub"}, "data.source='hub' is not one of file, sklearn_descr"),
    ({"data.path": ""}, "data.path is empty.*wiki1m"),
    ({"data.max_length": 1}, "max_length must be >= 2"),
    # a corpus given to a :runlocal variant would be silently replaced by the offline text
    ({"data.source": "sklearn_descr", "data.path": "wiki.txt"},
     "data.path='wiki.txt' is set but config.data.source='sklearn_descr'.*data.source=file"),
    ({"eval.pooler": "max"}, "eval.pooler='max' is not ''"),
    ({"model.mlp_init": "random"}, "mlp_init='random' is not fresh or checkpoint"),
    ({"model.dtype": "float16"}, "dtype='float16' is not float32 or bfloat16"),
    ({"model.hidden_dropout": 1.0}, "model.hidden_dropout must be < 1"),
    ({"model.attention_dropout": 1.5}, "model.attention_dropout must be < 1"),
    ({"eval.every_steps": -1}, "every_steps must be >= 0"),
    ({"eval.every_steps": 10, "eval.dev_tasks": ()}, "dev_tasks is empty but"),
    ({"eval.final_tasks": ("STS17",)}, r"final_tasks \['STS17'\] are not among"),
    ({"eval.missing_sts": "warn"}, "missing_sts='warn' is not error or skip"),
    ({"eval.batch_size": 0}, "eval.batch_size must be >= 1"),
    # scoring through an MLP that was never trained: random weights (the reference's defect)
    ({"model.pooler": "cls", "eval.pooler": "cls_mlp", "model.mlp_init": "fresh"},
     "eval.pooler='cls_mlp' scores through an MLP that training never used"),
])
def test_each_impossible_sentence_setting_is_named(tmp_path, overrides, message):
  with pytest.raises(ValueError, match=f"Invalid sentence config:(.|\n)*{message}"):
    sentence.validate(tiny_config(tmp_path, **overrides))


def test_bad_sentence_settings_are_refused(tmp_path):
  config = tiny_config(tmp_path, **{"model.pooler": "max", "eval.dev_tasks": ("STS12",)})
  with pytest.raises(ValueError) as err:
    sentence.validate(config)
  assert "config.model.pooler='max'" in str(err.value) and "dev split" in str(err.value)
  # Sentences have no labels: label masking would drop every negative (a loss of exactly 0).
  config = tiny_config(tmp_path, **{"loss.use_labels": True})
  with pytest.raises(ValueError, match="use_labels=True needs class labels.*use_labels=False"):
    sentence.validate(config)
  config = tiny_config(tmp_path, **{"data.max_length": 80})
  with pytest.raises(ValueError, match="exceeds the 64 positions"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  config = tiny_config(tmp_path, **{"model.path": ""})
  with pytest.raises(FileNotFoundError, match="huggingface-cli download bert-base-uncased"):
    train.train_and_evaluate(config, str(tmp_path / "run2"))
  config = tiny_config(tmp_path, **{"model.path": str(tmp_path / "models" / "roberta-base")})
  with pytest.raises(FileNotFoundError, match=r"does not exist\. Fetch the model once.*"
                     r"huggingface-cli download roberta-base --local-dir .*models/roberta-base"):
    train.train_and_evaluate(config, str(tmp_path / "run3"))


# SimCSE's unsupervised recipe (configs/sts_bert.py, pooler "cls_mlp"): the two training
# views go through the MLP (it is dropped only at evaluation). Without dropout both views must
# equal the deterministic CLS + MLP embedding.
def test_simcse_training_views_go_through_the_mlp():
  from configs import sts_bert  # pylint: disable=import-outside-toplevel
  from cldro_jax.models.hf_checkpoint import EncoderConfig  # pylint: disable=import-outside-toplevel
  from cldro_jax.tasks import sentence  # pylint: disable=import-outside-toplevel
  config = sts_bert.get_config()
  assert config.model.pooler == "cls_mlp"
  config.model.hidden_dropout = config.model.attention_dropout = 0.0
  arch = EncoderConfig(model_type="bert", vocab_size=50, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=32)
  task = sentence.SentenceTask(config, train.make_mesh(1), encoder_config=arch)
  params, state = task.init(jax.random.key(0))
  ids = jnp.asarray([[1, 5, 7, 2, 0, 0], [1, 9, 2, 0, 0, 0]], jnp.int32)
  mask = (ids > 0).astype(jnp.int32)
  out = task.forward(params, state, {"input_ids": ids, "attention_mask": mask},
                     jax.random.key(1), train=True)
  with_mlp = task.model.apply({"params": params}, ids, mask, train=False, use_mlp=True)
  np.testing.assert_allclose(np.asarray(out.z1), np.asarray(with_mlp), atol=1e-6)
  np.testing.assert_allclose(np.asarray(out.z2), np.asarray(with_mlp), atol=1e-6)
