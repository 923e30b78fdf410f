"""The image train-then-probe path end to end, on tiny configs (the same code as the full runs)."""

import json
import os
import types

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

import cldro_jax
from cldro_jax import checkpointing
from cldro_jax import config_defaults
from cldro_jax import metrics as metrics_lib
from cldro_jax import tasks as tasks_lib
from cldro_jax import train
from configs import cifar10 as cifar10_config
from configs import stl10 as stl10_config
from helpers import (LINEAR_OPTIMIZER, assert_trees_close, assert_updates_close,
                     counted_compiles, read_json, saved_arrays, step_two_from_one_checkpoint, tiny_image_config,
                     with_overrides)


tiny_config = tiny_image_config   # the quick start at toy size (tests/helpers.py)


@pytest.mark.parametrize("config_module,num_examples", [(cifar10_config, 48),
                                                        (stl10_config, 48)])
def test_runlocal_configs_end_to_end_on_mock_tfds(tmp_path, config_module, num_examples):
  config = config_module.get_config("runlocal")
  config.mesh.num_devices = 1
  with tfds.testing.mock_data(num_examples=num_examples):
    results = train.train_and_evaluate(config, str(tmp_path))
  saved = read_json(tmp_path, "results.json")
  assert saved == json.loads(json.dumps(results))
  assert saved["step"] == config.total_steps and "collapsed_at_step" not in saved
  for key in ("linear_probe_top1", "final_knn_top1", "final_online_probe_top1"):
    assert 0.0 <= saved[key] <= 100.0
  train_lines = metrics_lib.read_metrics(str(tmp_path), "train")
  assert [r["step"] for r in train_lines] == list(range(1, config.total_steps + 1))
  for record in train_lines:
    assert np.isfinite(record["loss"]) and record["lr"] == pytest.approx(config.optim.lr)
    # ADNCE weight statistics and the robust-radius estimate are logged every step.
    assert record["eta_hat"] > 0 and record["adnce_w_max"] >= 1.0
  assert os.listdir(tmp_path / "tensorboard")
  assert checkpointing.Checkpointer(str(tmp_path)).all_steps()[-1] == config.total_steps


def test_resume_equals_uninterrupted(tmp_path):
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  train.train_and_evaluate(tiny_config(total_steps=4), straight)
  train.train_and_evaluate(tiny_config(total_steps=2), resumed)
  assert saved_arrays(resumed)[1]["step"] == 2
  train.train_and_evaluate(tiny_config(total_steps=4), resumed)   # the same command, longer

  a, meta_a = saved_arrays(straight)
  b, meta_b = saved_arrays(resumed)
  assert meta_a["step"] == meta_b["step"] == 4
  # Same data order, same augmentation keys, same optimizer state: bitwise on the CPU.
  assert_trees_close(a, b, rtol=0, atol=0)


def test_rerunning_a_finished_run_and_changing_its_length(tmp_path):
  run = tmp_path / "run"
  workdir = str(run)

  def config(**overrides):
    return tiny_config(**{"total_steps": 4, "checkpoint_every_steps": 2, **overrides})

  first = json.loads(json.dumps(train.train_and_evaluate(config(), workdir)))
  log = (run / "metrics.jsonl").read_text()
  # The same command again: the stored results; nothing evaluated or logged twice.
  assert train.train_and_evaluate(config(), workdir) == first == read_json(run, "results.json")
  assert (run / "metrics.jsonl").read_text() == log
  # Other evaluation settings evaluate it again; the earlier results are kept aside, and
  # config.json now says how the run was evaluated.
  probe = {"eval.linear_probe": "features", "eval.linear_probe_epochs": 2}
  scored = train.train_and_evaluate(config(**probe), workdir)
  assert 0.0 <= scored["linear_probe_top1"] <= 100.0 and scored["step"] == 4
  assert read_json(run, "results.previous-1.json") == first
  assert read_json(run, "config.json")["eval"]["linear_probe"] == "features"
  # Shorter than the latest checkpoint: refused, with the fix; nothing changed.
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match=r"at step 4, past this run's 2 steps.*total_steps"):
    train.train_and_evaluate(config(**probe, total_steps=2), workdir)
  # A lost config.json comes back from the checkpoint: a different experiment is still refused,
  # the same one carries on (here: complete, so its stored results).
  os.remove(run / "config.json")
  with pytest.raises(checkpointing.CheckpointMismatchError, match=r"loss.name: saved 'adnce'"):
    train.train_and_evaluate(config(**probe, **{"loss.name": "infonce"}), workdir)
  assert not (run / "config.json").exists()
  again = train.train_and_evaluate(config(**probe), workdir)
  assert again["linear_probe_top1"] == scored["linear_probe_top1"]
  assert read_json(run, "config.json")["eval"] == again["evaluated_with"]["eval"]


def test_a_run_stopped_between_a_checkpoint_and_its_monitor_logs_that_epoch_on_resume(tmp_path):
  # 40 images, batch 8: 5 steps per epoch; the kNN monitor at the end of every epoch.
  import shutil  # pylint: disable=import-outside-toplevel
  config = tiny_config(total_steps=10, checkpoint_every_steps=5, **{"eval.every_epochs": 1})
  train.train_and_evaluate(config, str(tmp_path))
  monitor = metrics_lib.read_metrics(str(tmp_path), "monitor")
  assert [r["step"] for r in monitor] == [5, 10]
  # As if killed (or stopped by SIGTERM) after checkpoint 5 was saved, before its monitor ran.
  shutil.rmtree(tmp_path / "checkpoints" / "10")
  os.remove(tmp_path / "results.json")
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines(keepends=True)
  (tmp_path / "metrics.jsonl").write_text("".join(
      line for line in lines if not ('"split": "monitor"' in line and '"step": 5,' in line)))
  train.train_and_evaluate(config, str(tmp_path))
  again = metrics_lib.read_metrics(str(tmp_path), "monitor")
  assert [r["step"] for r in again] == [5, 10]
  assert again[0]["knn_top1"] == monitor[0]["knn_top1"]


def test_a_decaying_schedule_keeps_the_length_it_was_planned_for(tmp_path):
  # warmup_cosine is a function of the total: a longer resume would change every later rate.
  config = tiny_config(total_steps=2, **{"optim.schedule": "warmup_cosine"})
  train.train_and_evaluate(config, str(tmp_path))
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match=r"planned for 2 steps.*'warmup_cosine'.*new --workdir"):
    train.train_and_evaluate(with_overrides(config, total_steps=4), str(tmp_path))
  assert saved_arrays(str(tmp_path))[1]["step"] == 2


def run_step_two_from_one_checkpoint(tmp_path, layouts):
  """Step 1 on 1 device, a pass per view; then step 2 from that same checkpoint in each layout.
  SGD without momentum (`LINEAR_OPTIMIZER`): comparing updates compares gradients."""
  return step_two_from_one_checkpoint(
      lambda **overrides: tiny_config(**LINEAR_OPTIMIZER, **overrides), str(tmp_path), layouts)


def test_eight_devices_equal_one_device(tmp_path):
  one, eight = run_step_two_from_one_checkpoint(
      tmp_path, [{"mesh.num_devices": 1}, {"mesh.num_devices": 8}])
  # Negatives gathered from all devices and BatchNorm over the global batch: from the same
  # checkpoint the 8-device step computes the same function; only the order of floating-point
  # reductions differs. Measured: 3e-6 of the update's norm (jax 0.10.2); 2e-3, and 2e-2 in the
  # arrays before a ReLU input that round-off moved across zero (jax 0.10.0). A temperature 5%
  # off differs by 5e-2 (and its loss by far more than 1e-5).
  assert_updates_close(one, eight, 1, 2, rel=1e-2, rel_per_array=0.1)
  assert_trees_close(saved_arrays(one)[0]["model_state"], saved_arrays(eight)[0]["model_state"],
                     rtol=2e-4, atol=2e-5)
  losses_one, losses_eight = ([r["loss"] for r in metrics_lib.read_metrics(w, "train")]
                              for w in (one, eight))
  np.testing.assert_allclose(losses_eight, losses_one, rtol=1e-5)


def test_initial_state_is_the_same_on_one_and_eight_devices(tmp_path):
  """The step-by-step comparisons above start from one checkpoint; this pins their common start:
  the trainer's initial state (parameters, BatchNorm state, optimizer state, RNG) is bitwise the
  same on 8 devices as on 1 (an RBG init key computed sharded could give other numbers)."""
  states = []
  for num_devices in (1, 8):
    config = tiny_config(**{"mesh.num_devices": num_devices})
    mesh = train.make_mesh(num_devices)
    task = tasks_lib.build_task(config, mesh, str(tmp_path / str(num_devices)))
    total_steps = train.steps_for(config, task.steps_per_epoch)
    tx = train.make_full_optimizer(
        config, train.make_schedule(config.optim, total_steps, task.steps_per_epoch))
    with jax.set_mesh(mesh):
      states.append(jax.device_get(train.initial_state(task, config, tx, mesh)))
  assert_trees_close(states[0], states[1], rtol=0, atol=0)


def test_views_in_one_pass_equals_a_pass_per_view(tmp_path):
  """Per-view BatchNorm over both views in one pass (8 devices) is the reference's two passes
  (1 device); the flag may change on resume, since it only rearranges the same computation."""
  two, one = run_step_two_from_one_checkpoint(
      tmp_path, [{}, {"mesh.num_devices": 8, "model.views_in_one_pass": True}])
  # From the same checkpoint the step-2 updates agree as the 8-device test's (measured 2e-6 of
  # their norm); BatchNorm over both views instead of per view (the bug this guards against)
  # makes them differ by 1.3.
  assert_updates_close(two, one, 1, 2, rel=1e-2, rel_per_array=0.1)
  # Running statistics updated once per view, in view order, as two passes do.
  assert_trees_close(saved_arrays(two)[0]["model_state"], saved_arrays(one)[0]["model_state"],
                     rtol=2e-4, atol=2e-5)
  train.train_and_evaluate(tiny_config(**LINEAR_OPTIMIZER, total_steps=3), one)   # two passes
  assert saved_arrays(one)[1]["step"] == 3


def test_batch_not_divisible_over_devices_is_refused(tmp_path):
  config = tiny_config(batch_size=12, **{"mesh.num_devices": 8})
  with pytest.raises(ValueError, match=r"batch_size=12 does not divide over the 8 devices.*"
                                       r"--config.batch_size=8"):
    train.train_and_evaluate(config, str(tmp_path))
  assert not os.path.exists(tmp_path / "checkpoints")


def test_missing_tfds_dataset_fails_fast_with_the_fix(tmp_path):
  config = cifar10_config.get_config("runlocal")
  config.data.data_dir = str(tmp_path / "empty")
  with pytest.raises(FileNotFoundError) as err:
    train.train_and_evaluate(config, str(tmp_path / "work"))
  message = str(err.value)
  assert "--config.data.data_dir" in message and "tfds-prepare" in message
  assert "make quickstart" in message


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  workdir = str(tmp_path)
  train.train_and_evaluate(tiny_config(total_steps=2), workdir)
  good, _ = saved_arrays(workdir)
  # A learning rate that blows the parameters up: from the second step on the loss is NaN.
  config = tiny_config(total_steps=6, **{"optim.lr": 1e30, "checkpoint_every_steps": 1})
  # The learning rate is not a resumable field, so a changed one is refused first...
  with pytest.raises(checkpointing.CheckpointMismatchError, match="optim.lr"):
    train.train_and_evaluate(config, workdir)
  # ...and in a fresh workdir the NaN guard stops the run before saving a bad state.
  fresh = str(tmp_path / "fresh")
  with pytest.raises(train.NonFiniteLossError, match="NaN or inf"):
    train.train_and_evaluate(config, fresh)
  steps = checkpointing.Checkpointer(fresh).all_steps()
  for step in steps:
    state, _ = saved_arrays(fresh, step)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))
  # The first workdir still holds its good checkpoint, untouched.
  assert_trees_close(saved_arrays(workdir)[0], good, rtol=0, atol=0)


def test_a_start_that_diverged_before_its_first_checkpoint_restarts_with_another_length(
    tmp_path):
  """Nothing to resume: the error says the corrected command starts afresh, and it does, also
  with another length under a decaying schedule (refused only when a checkpoint would resume)."""
  workdir = str(tmp_path)
  diverging = tiny_config(total_steps=4, **{"optim.schedule": "warmup_cosine",
                                            "optim.lr": 1e30,
                                            "checkpoint_every_steps": 100})
  with pytest.raises(train.NonFiniteLossError, match="No checkpoint was saved before it, so the "
                                                     "corrected command starts afresh"):
    train.train_and_evaluate(diverging, workdir)
  corrected = tiny_config(total_steps=6, **{"optim.schedule": "warmup_cosine"})
  assert train.train_and_evaluate(corrected, workdir)["step"] == 6
  with pytest.raises(checkpointing.CheckpointMismatchError, match="planned for 6 steps"):
    train.train_and_evaluate(tiny_config(total_steps=8, **{"optim.schedule": "warmup_cosine"}),
                             workdir)


def test_a_warm_up_as_long_as_the_run_is_refused_before_training(tmp_path):
  # 40 images, batch 8: 5 steps an epoch; one epoch of warm-up in a 4-step run never ends.
  config = tiny_config(total_steps=4, **{"optim.schedule": "warmup_cosine",
                                         "optim.warmup_epochs": 1.0})
  with pytest.raises(train.ConfigError, match="warmup_epochs=1.0 is 5 steps .* run's 4 steps"):
    train.train_and_evaluate(config, str(tmp_path))
  assert not os.path.exists(tmp_path / "checkpoints")


def test_nan_parameters_are_never_evaluated_between_two_log_lines(tmp_path):
  # The monitor at step 5 (one epoch) comes before any log line (every 100 steps) or
  # checkpoint: it must not evaluate NaN parameters and log the result.
  config = tiny_config(total_steps=8, **{"optim.lr": 1e30, "log_every_steps": 100,
                                         "checkpoint_every_steps": 100, "eval.every_epochs": 1})
  with pytest.raises(train.NonFiniteLossError, match="before step 5; .* without evaluating"):
    train.train_and_evaluate(config, str(tmp_path))
  assert metrics_lib.read_metrics(str(tmp_path), "monitor") == []


def test_a_collapsing_run_is_reported_at_the_step_its_logged_statistics_show(tmp_path, capsys):
  # chi2_dro with a huge radius pulls every cosine to one value (docs/results.md, claim 7).
  config = tiny_config(total_steps=15, **{"loss.name": "chi2_dro", "loss.eta": 100.0,
                                          "optim.lr": 1e-2})
  results = train.train_and_evaluate(config, str(tmp_path))
  steps_per_epoch = 5   # 40 images, batch 8
  expected = next(r["step"] for r in metrics_lib.read_metrics(str(tmp_path), "train")
                  if r["step"] >= steps_per_epoch and r["s_neg_mean"] > 0.95
                  and r["s_neg_var"] < 1e-4)
  assert results["collapsed_at_step"] == expected
  assert read_json(tmp_path, "results.json")["collapsed_at_step"] == expected
  err = capsys.readouterr().err
  assert f"Representation collapse by step {expected}" in err
  # said once at the start: chi2_dro's objective has no temperature (the quick start's 0.2)
  assert err.count("WARNING: these settings are not used by this run:\n  loss.temperature=") == 1


def test_checkpoint_from_another_model_is_refused(tmp_path):
  workdir = str(tmp_path)
  train.train_and_evaluate(tiny_config(total_steps=2), workdir)
  # Same workdir, a different network: the saved config check names the field.
  with pytest.raises(checkpointing.CheckpointMismatchError, match="model.width"):
    train.train_and_evaluate(tiny_config(total_steps=2, **{"model.width": 8}), workdir)


def test_init_from_starts_with_the_source_encoder_and_fresh_optimizer(tmp_path):
  source = str(tmp_path / "source")
  train.train_and_evaluate(tiny_config(total_steps=2), source)
  config = tiny_config(init_from=source)
  mesh = train.make_mesh(2)   # the source's one-device checkpoint read inside a 2-device mesh
  task = tasks_lib.build_task(config, mesh, str(tmp_path / "new"))
  tx = train.make_full_optimizer(config, train.make_schedule(config.optim, 4, task.steps_per_epoch))
  with jax.set_mesh(mesh):
    fresh = train.initial_state(task, config, tx, mesh)
    signature = checkpointing.parameter_signature(fresh.params["model"])
    started = train._start_from_encoder(  # pylint: disable=protected-access
        fresh, source, signature, task.model_name)
  saved, _ = saved_arrays(source)
  # The encoder and its BatchNorm statistics are the source's, bit for bit ...
  assert_trees_close(started.params["model"], saved["params"]["model"], rtol=0, atol=0)
  assert_trees_close(started.model_state, saved["model_state"], rtol=0, atol=0)
  # ... everything else is this run's fresh start (the source's Adam moments are not carried).
  for field in ("opt_state", "step", "rng"):
    assert_trees_close(getattr(started, field), getattr(fresh, field), rtol=0, atol=0)
  assert_trees_close(started.params["probe"], fresh.params["probe"], rtol=0, atol=0)
  assert not np.allclose(jax.tree.leaves(saved["params"]["model"])[0],
                         jax.tree.leaves(fresh.params["model"])[0])


def test_init_from_applies_to_the_first_start_only(tmp_path):
  """A run started from another run's encoder resumes from its own checkpoint: stopped after 2
  steps and resumed to 4, it equals the same run made in one go (re-reading the source on resume
  would restart it from there)."""
  source = str(tmp_path / "source")
  train.train_and_evaluate(tiny_config(total_steps=2), source)
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  train.train_and_evaluate(tiny_config(total_steps=4, init_from=source), straight)
  train.train_and_evaluate(tiny_config(total_steps=2, init_from=source), resumed)
  train.train_and_evaluate(tiny_config(total_steps=4, init_from=source), resumed)
  assert_trees_close(saved_arrays(straight)[0], saved_arrays(resumed)[0], rtol=0, atol=0)
  assert read_json(straight, "config.json")["init_from"] == source
  assert read_json(straight, "results.json")["init_from"] == source   # for the summary's note
  assert "init_from" not in read_json(source, "results.json")
  # And it is another run than a fresh start of the same config.
  fresh = str(tmp_path / "fresh")
  train.train_and_evaluate(tiny_config(total_steps=4), fresh)
  assert not np.allclose(jax.tree.leaves(saved_arrays(fresh)[0]["params"]["model"])[0],
                         jax.tree.leaves(saved_arrays(straight)[0]["params"]["model"])[0])


def test_init_from_refuses_another_model_or_a_missing_run(tmp_path):
  source = str(tmp_path / "source")
  train.train_and_evaluate(tiny_config(total_steps=2), source)
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match=r"init_from=.*holds a resnet18.*encoder.*Nothing was changed"):
    train.train_and_evaluate(tiny_config(init_from=source, **{"model.width": 8}),
                             str(tmp_path / "wider"))
  new = str(tmp_path / "new")
  with pytest.raises(FileNotFoundError, match=r"init_from=.*no checkpoints folder.*--workdir"):
    train.train_and_evaluate(tiny_config(init_from=str(tmp_path / "nowhere")), new)
  # Nothing was saved for the failed start: the corrected command starts normally.
  assert not os.path.exists(os.path.join(new, "config.json"))
  train.train_and_evaluate(tiny_config(total_steps=2, init_from=source), new)
  assert read_json(new, "config.json")["init_from"] == source


def test_workdir_of_an_older_version_loads_resumes_and_keeps_its_meaning(tmp_path):
  """A workdir whose config.json predates fields added since (here `model.views_in_one_pass` and
  `loss.mu_rule`) is read with those fields at their defaults, the behaviour it was trained with:
  its encoder loads, the same command resumes it, and a non-default value is still refused."""
  workdir = str(tmp_path)
  train.train_and_evaluate(tiny_config(total_steps=2), workdir)
  saved = read_json(workdir, "config.json")
  del saved["model"]["views_in_one_pass"], saved["loss"]["mu_rule"]
  del saved["loss"]["matmul_precision"]
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    json.dump(saved, f)
  encoder = cldro_jax.load_encoder(workdir)
  assert encoder.config.model.views_in_one_pass is False and encoder.config.loss.mu_rule == "fixed"
  assert encoder.embed(np.zeros((3, 28, 28, 1), np.uint8)).shape[0] == 3
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match="loss.mu_rule: saved 'fixed', now 'quantile'"):
    train.train_and_evaluate(tiny_config(total_steps=3, **{"loss.mu_rule": "quantile"}), workdir)
  # A field that changes only the rounding (like the mesh) may change on a resume.
  train.train_and_evaluate(tiny_config(total_steps=3, **{"loss.matmul_precision": "default"}),
                           workdir)
  assert saved_arrays(workdir)[1]["step"] == 3
  assert read_json(workdir, "config.json")["loss"]["matmul_precision"] == "default"


def test_full_configs_match_the_paper(tmp_path):
  """The full configs build (shapes only, via jax.eval_shape) with LOSSES.md's settings."""
  from cldro_jax.tasks import image  # pylint: disable=import-outside-toplevel
  expected = {"cifar10": (0.4, 0.7, 0.5), "cifar100": (0.3, 0.5, 1.0), "stl10": (0.2, 0.8, 1.0)}
  import configs.cifar100 as cifar100_config  # pylint: disable=import-outside-toplevel
  for module in (cifar10_config, cifar100_config, stl10_config):
    config = module.get_config()
    config_defaults.validate_config(config)
    t, mu, sigma = expected[config.data.name]
    assert (config.loss.name, config.loss.temperature, config.loss.mu, config.loss.sigma) == (
        "adnce", t, mu, sigma)
    assert (config.optim.name, config.optim.lr, config.optim.weight_decay,
            config.optim.schedule) == ("adam", 1e-3, 1e-6, "constant")
    assert (config.batch_size, config.total_epochs, config.seed) == (256, 400, 2023)
    assert (config.model.name, config.model.stem, config.model.stem_init, config.model.head_hidden,
            config.model.head_out) == ("resnet50", "cifar", "conv_default", 512, 128)
    assert config.augment.crop_size == 32 and config.eval.knn_k == 200
    # LOSSES.md's SimCLR augmentation, written out here rather than read from the code
    aug = config.augment
    assert (tuple(aug.crop_scale), tuple(aug.crop_ratio), aug.flip_prob, aug.jitter_prob,
            aug.brightness, aug.contrast, aug.saturation, aug.hue, aug.grayscale_prob,
            aug.blur_prob, aug.blur_kernel, tuple(aug.blur_sigma)) == (
                (0.08, 1.0), (3 / 4, 4 / 3), 0.5, 0.8, 0.4, 0.4, 0.4, 0.1, 0.2, 0.5, 3, (0.1, 2.0))
    # the reference's transforms.Normalize (image/utils.py), for every dataset
    assert tuple(aug.mean) == (0.4914, 0.4822, 0.4465)
    assert tuple(aug.std) == (0.2023, 0.1994, 0.2010)
    # the kNN monitor votes at the training temperature, as the reference's test()
    assert config.eval.knn_temperature == 0
    shapes = image.model_variables_shape(config)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))
    # torchvision ResNet-50 without fc, CIFAR stem (23,500,352) + the reference head
    # Linear(2048,512,no bias) + BN(512) + Linear(512,128).
    assert n_params == 23_500_352 + 2048 * 512 + 2 * 512 + 512 * 128 + 128
  assert stl10_config.get_config().data.pretrain_split == "train+unlabelled"
  assert stl10_config.get_config().eval.probe_image_size == 96
  # The unlabelled split's 100k decoded 96x96 images (2.8 GB) fit the in-memory limit.
  assert stl10_config.get_config().data.in_memory_max_mb * 2**20 >= 105_000 * 96 * 96 * 3


def test_the_knn_monitor_votes_at_the_loss_temperature_unless_set(monkeypatch):
  from cldro_jax.tasks import image  # pylint: disable=import-outside-toplevel
  seen = []
  real = image.knn.knn_accuracy

  def spy(*args, temperature, **kwargs):
    seen.append(temperature)
    return real(*args, temperature=temperature, **kwargs)

  monkeypatch.setattr(image.knn, "knn_accuracy", spy)
  for knn_temperature, expected in ((0.0, 0.3), (0.07, 0.07)):
    config = tiny_config(**{"loss.temperature": 0.3, "eval.knn_temperature": knn_temperature})
    task = image.ImageTask(config, train.make_mesh(1))
    params, model_state = jax.jit(task.init)(train.model_init_key(0))
    task.monitor(types.SimpleNamespace(params={"model": params}, model_state=model_state))
    assert seen[-1] == pytest.approx(expected)


@pytest.mark.parametrize("update_bn", [False, True])
def test_reference_probe_freezes_batchnorm_unless_asked(update_bn):
  """The reference protocol (augmented crops through the encoder) keeps BatchNorm statistics
  frozen by default; `probe_update_bn` lets them drift as the authors' linear.py does, and the
  test set is then embedded with the drifted statistics."""
  from cldro_jax.tasks import image  # pylint: disable=import-outside-toplevel
  config = tiny_config(**{"eval.linear_probe": "reference", "eval.linear_probe_epochs": 1,
                          "eval.probe_update_bn": update_bn})
  task = image.ImageTask(config, train.make_mesh(1))
  params, model_state = jax.jit(task.init)(train.model_init_key(0))
  seen = {}
  original = task.extract_features

  def spy(p, state, source):
    seen["state"] = state
    return original(p, state, source)

  task.extract_features = spy
  scores = task.linear_probe_scores(params, model_state, seed=0)
  assert 0.0 <= scores["top1"] <= 100.0
  before = jax.tree.leaves(model_state)
  after = jax.tree.leaves(seen["state"])
  changed = any(not np.array_equal(np.asarray(a), np.asarray(b))
                for a, b in zip(before, after, strict=True))
  assert changed == update_bn


def test_probe_from_a_checkpoint_and_load_encoder_reproduce_the_run(tmp_path):
  """The standalone probe (`python -m cldro_jax.probe`) on the final checkpoint gives the run's
  own scores, and `cldro_jax.load_encoder` embeds images as the run's evaluation did."""
  import cldro_jax  # pylint: disable=import-outside-toplevel
  from cldro_jax import probe  # pylint: disable=import-outside-toplevel
  from cldro_jax.tasks import image  # pylint: disable=import-outside-toplevel
  workdir = str(tmp_path)
  config = tiny_config(total_steps=3, **{"eval.linear_probe": "features",
                                         "eval.linear_probe_epochs": 3})
  results = train.train_and_evaluate(config, workdir)
  again = probe.run_probe(workdir)
  assert (again["top1"], again["top5"]) == (results["linear_probe_top1"],
                                            results["linear_probe_top5"])
  assert again["step"] == 3 and os.path.exists(tmp_path / "probe_features_step3.json")
  assert probe.summary_line(again, workdir) == (
      f"linear probe (features, 3 epochs) top-1 {again['top1']:.2f}, top-5 "
      f"{again['top5']:.2f} of the step-3 encoder on {again['dataset']} (saved as "
      f"{workdir}/probe_features_*.json)")
  # Other settings are named in the file, so they do not overwrite the first result.
  longer = probe.run_probe(workdir, epochs=4)
  assert longer["epochs"] == 4
  assert json.loads((tmp_path / "probe_features_epochs4_step3.json").read_text()) == longer
  assert json.loads((tmp_path / "probe_features_step3.json").read_text())["epochs"] == 3
  with pytest.raises(ValueError, match="--update_bn applies to the reference protocol only"):
    probe.run_probe(workdir, update_bn=True)
  # The shipped subset has no data_dir: the flag would be ignored, so it is refused.
  with pytest.raises(ValueError, match=r"--data_dir=/elsewhere: the run reads its images from "
                                       r"config.data.source='fashion_mnist_subset'"):
    probe.run_probe(workdir, data_dir="/elsewhere")
  # A run trained on more devices than this machine has is probed on the devices here.
  saved = read_json(tmp_path, "config.json")
  saved["mesh"]["num_devices"] = 64
  (tmp_path / "config.json").write_text(json.dumps(saved))
  assert probe.run_probe(workdir)["top1"] == again["top1"]

  encoder = cldro_jax.load_encoder(workdir)
  task = image.ImageTask(config, train.make_mesh(1))
  arrays, _ = saved_arrays(workdir)
  expected, labels = task.extract_features(arrays["params"]["model"], arrays["model_state"],
                                           task.dataset.test)
  test = task.dataset.test[np.arange(len(task.dataset.test))]
  np.testing.assert_allclose(encoder.embed(test["image"], batch_size=7), expected, rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_array_equal(test["label"], labels)
  # Other image counts reuse the compiled shapes (padded batches): 5 and 6 images pad to the
  # batch of 7 already compiled (the power of two above them, 8, capped at batch_size).
  with counted_compiles() as compiles:
    np.testing.assert_allclose(encoder.embed(test["image"][:5], batch_size=7), expected[:5],
                               rtol=1e-5, atol=1e-5)
    assert encoder.embed(test["image"][:6], batch_size=7).shape == expected[:6].shape
  assert not compiles, compiles
  with counted_compiles() as compiles:
    assert encoder.embed(test["image"][:3], batch_size=7).shape[0] == 3   # 4 rows: a new shape
  # (no compilation at all when an earlier test in this process embedded 4 rows of this model)
  assert sum(compiles.values()) <= 1, compiles
  # Loading the run again (a notebook cell rerun) reuses the compiled code.
  with counted_compiles() as compiles:
    again = cldro_jax.load_encoder(workdir).embed(test["image"], batch_size=7)
  np.testing.assert_allclose(again, expected, rtol=1e-5, atol=1e-5)
  assert not compiles, compiles
  with pytest.raises(FileNotFoundError, match="not a cldro_jax workdir"):
    cldro_jax.load_encoder(str(tmp_path / "nothing"))
  # One colour image without its batch axis is refused, not embedded as 28 narrow images.
  with pytest.raises(ValueError, match=r"For one colour image pass images\[None\]"):
    encoder.embed(np.zeros((28, 28, 3), np.uint8))
  assert encoder.embed(np.zeros((28, 28, 3), np.uint8)[None]).shape[0] == 1
  # Sizes that embedded nothing (batch_size=-1: a (0, 0) array) or gave NaN features
  # (image_size=0) are refused; no images give (0, F); RGBA is named as such.
  for kwargs, message in (({"batch_size": -1}, "batch_size must be a positive int"),
                          ({"batch_size": 0}, "batch_size must be a positive int"),
                          ({"image_size": 0}, "image_size must be a positive int")):
    with pytest.raises(ValueError, match=message):
      encoder.embed(test["image"][:2], **kwargs)
  assert encoder.embed(test["image"][:0]).shape == (0, expected.shape[1])
  with pytest.raises(ValueError, match=r"drop the alpha channel with images\[\.\.\., :3\]"):
    encoder.embed(np.zeros((2, 28, 28, 4), np.uint8))
  # config.json lost: the copy every checkpoint carries describes the run.
  os.remove(tmp_path / "config.json")
  np.testing.assert_allclose(cldro_jax.load_encoder(workdir).embed(test["image"]), expected,
                             rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_tracks_float32(tmp_path):
  """bf16 compute (float32 parameters, the GPU setting) gives the float32 run's first losses to
  bf16 precision, and finite training."""
  runs = {}
  for dtype in ("float32", "bfloat16"):
    workdir = str(tmp_path / dtype)
    train.train_and_evaluate(tiny_config(total_steps=2, **{"model.dtype": dtype}), workdir)
    runs[dtype] = [r["loss"] for r in metrics_lib.read_metrics(workdir, "train")]
    params = saved_arrays(workdir)[0]["params"]["model"]
    assert all(np.asarray(x).dtype == np.float32 for x in jax.tree.leaves(params))
  np.testing.assert_allclose(runs["bfloat16"], runs["float32"], rtol=0.03)


def test_block_size_bounds_the_memory_of_the_trainers_loss_and_diagnostics_together():
  """`config.loss.block_size` must bound the whole per-step loss computation: the gradient of
  the loss with the logged diagnostics (which are computed at every step) as its aux. The
  diagnostics used to stay dense and held nearly all of the dense memory."""
  config = config_defaults.base_config("image")
  mesh = train.make_mesh(1)
  views = jax.ShapeDtypeStruct((2048, 128), jax.numpy.float32)
  valid = jax.ShapeDtypeStruct((2048,), jax.numpy.bool_)
  labels = jax.ShapeDtypeStruct((2048,), jax.numpy.int32)
  temp_mib = {}
  for block_size in (0, 256):
    loss_cfg = with_overrides(config, **{"loss.block_size": block_size}).loss

    def loss_and_diag(z1, z2, valid, labels, loss_cfg=loss_cfg):
      return train._global_loss_and_diagnostics(  # pylint: disable=protected-access
          loss_cfg, "image", mesh, z1, z2, valid, labels)

    step = jax.jit(jax.grad(loss_and_diag, argnums=(0, 1), has_aux=True))
    compiled = step.lower(views, views, valid, labels).compile()
    temp_mib[block_size] = compiled.memory_analysis().temp_size_in_bytes / 2**20
  # 4096 x 4096 float32 cosines are 64 MiB each; blockwise keeps 4096 x 256 blocks.
  assert temp_mib[0] > 200 and temp_mib[256] < temp_mib[0] / 8, temp_mib


@pytest.mark.parametrize("precision,want,block_size", [(None, "HIGHEST", 0),
                                                      ("default", "DEFAULT", 0),
                                                      (None, "HIGHEST", 8)])
def test_the_loss_matmuls_run_at_the_configured_precision_and_the_encoder_at_its_own(
    precision, want, block_size):
  """`config.loss.matmul_precision` ("highest" unless set) reaches every matmul of the loss,
  its gradient and the diagnostics (the 2B x 2B cosine matrix and its transposes: true float32
  on GPUs and TPUs too), and none of the encoder's convolutions."""
  from cldro_jax.tasks import image as image_task  # pylint: disable=import-outside-toplevel
  config = tiny_config(**({"loss.matmul_precision": precision} if precision else {}),
                       **{"loss.block_size": block_size})
  mesh = train.make_mesh(1)
  task = image_task.ImageTask(config, mesh)
  schedule = train.make_schedule(config.optim, config.total_steps, task.steps_per_epoch)
  tx = train.make_full_optimizer(config, schedule)
  with jax.set_mesh(mesh):
    state = jax.eval_shape(lambda k: train.create_train_state(task, config, tx, k),
                           jax.random.PRNGKey(0))
    step = jax.jit(train.make_train_step(task, config, tx, schedule, mesh))
    batch = task.to_global(task.dataset.pretrain[np.arange(config.batch_size)])
    hlo = step.lower(state, batch).as_text()
  views = 2 * config.batch_size
  # The cosine matrix (2B x 2B, or 2B x block) and its gradient's products with the
  # (2B, d) projections.
  cols = block_size or views
  loss_dots = [line for line in hlo.splitlines() if "stablehlo.dot_general" in line and (
      f"-> tensor<{views}x{cols}xf32>" in line or f"(tensor<{views}x{cols}xf32>" in line)]
  assert len(loss_dots) >= 3
  assert all(f"precision = [{want}, {want}]" in line for line in loss_dots), loss_dots
  convs = [line for line in hlo.splitlines() if "stablehlo.convolution" in line]
  assert convs and not any("HIGHEST" in line for line in convs)
  with pytest.raises(ValueError, match="config.loss.matmul_precision='fp64' is not one of"):
    config_defaults.validate_config(tiny_config(**{"loss.matmul_precision": "fp64"}))


def test_a_second_run_in_a_workdir_in_use_is_refused_and_the_first_keeps_its_files(tmp_path):
  """Two runs in one workdir (a second terminal, a requeued job whose predecessor still runs)
  rewrote each other's metrics and deleted each other's saves in flight: the second is refused
  while the first holds the workdir, and the lock goes with the first run's process."""
  import fcntl  # pylint: disable=import-outside-toplevel
  workdir = str(tmp_path / "run")
  first = train.train_and_evaluate(tiny_config(total_steps=2), workdir)
  lock_path = os.path.join(workdir, train.LOCK_FILE)
  with open(lock_path, encoding="utf-8") as f:
    assert f.read().startswith(f"pid {os.getpid()} on ")   # who held it, for the message
  metrics_before = (tmp_path / "run" / "metrics.jsonl").read_bytes()
  with open(lock_path, "a+", encoding="utf-8") as holder:   # as a run in progress holds it
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with pytest.raises(train.WorkdirInUseError, match=r"in use by another run \(pid \d+ on .*"
                                                      r"pass another --workdir"):
      train.train_and_evaluate(tiny_config(total_steps=4), workdir)
  assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == metrics_before
  # Released (the holder closed, as a process that ends): the longer run resumes.
  assert train.train_and_evaluate(tiny_config(total_steps=4), workdir)["step"] == 4
  assert first["step"] == 2


def test_a_url_workdir_is_refused_before_anything_is_written(tmp_path, monkeypatch):
  """`--workdir=gs://...` would make a local folder "gs:" on each host and fail at the first
  checkpoint; it is refused up front with the mount to use instead."""
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ValueError, match=r"gs://bucket/run is a gs:// URL.*gcsfuse"):
    train.train_and_evaluate(tiny_config(), "gs://bucket/run")
  assert os.listdir(tmp_path) == []


def test_evaluation_keeps_non_square_images_and_load_encoder_follows_the_probe_size():
  """With `eval.probe_image_size=0` the evaluation embeds images at their stored size, also
  when they are not square (the reference's test transform does not resize; a square resize
  would squash them); `load_encoder(...).embed` resizes as the run's evaluation did."""
  from cldro_jax import encoder as encoder_lib  # pylint: disable=import-outside-toplevel
  from cldro_jax.data import images as images_lib  # pylint: disable=import-outside-toplevel
  from cldro_jax.tasks import image  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (12, 16, 40, 3), dtype=np.uint8)
  source = images_lib.InMemorySource(pixels, np.arange(12) % 3)
  dataset = images_lib.ImageDataset(name="wide", pretrain=source, probe_train=source, test=source,
                                    num_classes=3, image_shape=(16, 40, 3))
  config = tiny_config(**{"augment.crop_size": 16})
  task = image.ImageTask(config, train.make_mesh(1), dataset=dataset)
  params, model_state = jax.jit(task.init)(train.model_init_key(0))
  features, _ = task.extract_features(params, model_state, source)
  # Independent of the task's preprocessing: Normalize of the unresized pixels, then the model.
  mean, std = np.asarray(config.augment.mean), np.asarray(config.augment.std)
  views = ((pixels / 255.0 - mean) / std).astype(np.float32)
  expected, _ = task.model.apply({"params": params, **model_state}, views, train=False)
  np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-5)

  encoder = encoder_lib.ImageEncoder(config=config, params=params, model_state=model_state,
                                     step=0)
  np.testing.assert_allclose(encoder.embed(pixels), expected, rtol=1e-5, atol=1e-5)
  resized = with_overrides(config, **{"eval.probe_image_size": 24})
  encoder = encoder_lib.ImageEncoder(config=resized, params=params, model_state=model_state,
                                     step=0)
  np.testing.assert_array_equal(encoder.embed(pixels), encoder.embed(pixels, image_size=24))
  assert not np.allclose(encoder.embed(pixels), expected, atol=1e-3)


def test_use_labels_with_unlabelled_pretraining_examples_is_said(tmp_path, capsys):
  # Unlabelled examples (label -1) share a class with nothing: they stay everyone's negatives, so
  # the "oracle" is partial; the run says so and how to get the full one.
  rng = np.random.default_rng(0)
  path = tmp_path / "partly_labelled.npz"
  np.savez(path, x_train=rng.integers(0, 256, (16, 8, 8, 3), np.uint8),
           y_train=np.arange(16) % 4, x_test=rng.integers(0, 256, (8, 8, 8, 3), np.uint8),
           y_test=np.arange(8) % 4, x_unlabeled=rng.integers(0, 256, (24, 8, 8, 3), np.uint8))
  config = tiny_config(**{"data.source": "npz", "data.path": str(path),
                          "data.train_per_class": 0, "data.test_per_class": 0,
                          "augment.crop_size": 8})
  tasks_lib.build_task(config, train.make_mesh(1))
  assert "WARNING" not in capsys.readouterr().err
  config.loss.use_labels = True
  tasks_lib.build_task(config, train.make_mesh(1))
  assert ("config.loss.use_labels=True removes same-class negatives, but 24 of the 40 "
          "pre-training examples are unlabelled (label -1)") in capsys.readouterr().err
