"""Trainer details a researcher relies on, each pinned against a value worked out by hand or
stated in the docs: optimiser state, the online probe, the NaN guard, the logged learning rate,
the collapse check, checkpoint retention and refusals, the kNN bank, the untrained baseline."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cldro_jax import checkpointing, config_defaults, train
from cldro_jax import metrics as metrics_lib
from helpers import saved_arrays, tiny_image_config


# train.py: "the probe sees stop-gradient features: no encoder gradient" (solo-learn's
# online classifier detaches its input).
def test_online_probe_passes_no_gradient_to_the_encoder_features():
  rng = np.random.default_rng(0)
  probe = {"kernel": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),
           "bias": jnp.zeros((3,), jnp.float32)}
  features = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
  labels = jnp.asarray([0, 2, 1, -1])
  grad = jax.grad(lambda f: train._online_probe_loss(probe, f, labels)[0])(features)  # pylint: disable=protected-access
  assert not np.any(np.asarray(grad))


# unlabelled rows (label -1, e.g. STL10's unlabelled split) are ignored: the loss and the
# accuracy are means over the labelled rows. Zero weights: every logit 0, CE = log C, argmax 0.
def test_online_probe_loss_and_accuracy_are_means_over_labelled_rows():
  probe = {"kernel": jnp.zeros((5, 4)), "bias": jnp.zeros((4,))}
  features = jnp.ones((4, 5))
  loss, acc = train._online_probe_loss(probe, features, jnp.asarray([-1, 2, -1, 0]))  # pylint: disable=protected-access
  assert float(loss) == pytest.approx(math.log(4), rel=1e-6)
  assert float(acc) == pytest.approx(0.5)   # of the 2 labelled rows, label 0 is argmax 0


# an update that overflows the parameters (loss and gradient of that step still finite)
# must stop the run before any checkpoint holds them (train.py's NaN-guard comment).
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_an_overflowing_update_is_never_checkpointed(tmp_path):
  config = tiny_image_config(total_steps=3, **{"optim.lr": 1e39, "checkpoint_every_steps": 1,
                                               "log_every_steps": 1})
  with pytest.raises(train.NonFiniteLossError, match="by step 1"):
    train.train_and_evaluate(config, str(tmp_path))
  for step in checkpointing.Checkpointer(str(tmp_path)).all_steps():
    state, _ = saved_arrays(str(tmp_path), step)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))


# the logged "lr" is the rate step s applied: linear decay from 0.1 over 4 steps,
# by hand 0.1 * (1 - (s - 1) / 4) for the 1-based logged step s.
def test_the_logged_learning_rate_is_the_one_each_step_used(tmp_path):
  config = tiny_image_config(total_steps=4, **{"log_every_steps": 1, "optim.lr": 0.1,
                                               "optim.schedule": "linear_decay"})
  train.train_and_evaluate(config, str(tmp_path))
  lrs = [r["lr"] for r in metrics_lib.read_metrics(str(tmp_path), "train")]
  np.testing.assert_allclose(lrs, [0.1, 0.075, 0.05, 0.025], rtol=1e-6)


# train.py: collapse is judged "after the first epoch" (pre-trained text encoders start
# with high cosines): the same statistics say nothing before steps_per_epoch steps.
def test_collapse_is_not_judged_within_the_first_epoch():
  stats = {"s_neg_mean": 0.99, "s_neg_var": 1e-6}
  assert not train._collapsed(stats, 4, 5)   # pylint: disable=protected-access
  assert train._collapsed(stats, 5, 5)   # pylint: disable=protected-access


# docs/config.md: keep_checkpoints is the "number of most recent checkpoints kept".
def test_only_the_latest_keep_checkpoints_are_kept(tmp_path):
  config = tiny_image_config(total_steps=5, **{"checkpoint_every_steps": 1, "keep_checkpoints": 2})
  train.train_and_evaluate(config, str(tmp_path))
  checkpointer = checkpointing.Checkpointer(str(tmp_path), read_only=True)
  try:
    assert checkpointer.all_steps() == [4, 5]
  finally:
    checkpointer.close()


# checkpointing.RESUMABLE_FIELDS' own comment: "Anything else (model, loss, optimiser,
# batch, seed, augmentation) must match the saved config" (the seed fixes the data order and
# every augmentation key).
@pytest.mark.parametrize("field, value", [("seed", 1), ("augment.crop_size", 24),
                                          ("optim.weight_decay", 0.5), ("model.stem", "imagenet"),
                                          ("loss.temperature", 0.7)])
def test_fields_that_define_the_experiment_may_not_change_on_resume(tmp_path, field, value):
  import os  # pylint: disable=import-outside-toplevel
  from helpers import with_overrides  # pylint: disable=import-outside-toplevel
  workdir = str(tmp_path)
  checkpointing.check_or_save_config(workdir, config_defaults.base_config("image"))
  os.makedirs(os.path.join(workdir, "checkpoints", "1"))
  other = with_overrides(config_defaults.base_config("image"), **{field: value})
  with pytest.raises(checkpointing.CheckpointMismatchError, match=f"{field}: saved"):
    checkpointing.check_or_save_config(workdir, other)


# a checkpoint whose train state holds another step than its folder and metadata say is
# refused as damaged (checkpointing._check_state_step).
def test_a_train_state_at_another_step_than_its_checkpoint_is_refused(tmp_path):
  state = {"step": jnp.asarray(2, jnp.int32), "w": jnp.arange(3.0)}
  checkpointer = checkpointing.Checkpointer(str(tmp_path))
  try:
    checkpointer.save(3, state, meta={"step": 3})
    checkpointer.wait()
    with pytest.raises(checkpointing.CheckpointCorruptError, match="train state is at step 2"):
      checkpointer.restore(state)
  finally:
    checkpointer.close()


# tasks/image.py: a kNN bank limit takes examples "evenly spaced over the stored order,
# not its first rows" (folders store the images class by class). 40 images, 4 classes of 10 in
# order, limit 8: rows round(linspace(0, 39, 8)) = 0, 6, 11, 17, 22, 28, 33, 39 (by hand).
def test_the_knn_bank_limit_spreads_over_every_class():
  import types  # pylint: disable=import-outside-toplevel
  from cldro_jax.data import images  # pylint: disable=import-outside-toplevel
  from cldro_jax.tasks import image  # pylint: disable=import-outside-toplevel
  source = images.InMemorySource(np.zeros((40, 2, 2, 1), np.uint8), np.repeat(np.arange(4), 10))
  fake = types.SimpleNamespace(config=types.SimpleNamespace(eval=types.SimpleNamespace(knn_max_bank=8)),
                               dataset=types.SimpleNamespace(probe_train=source))
  bank = image.ImageTask._bank_source(fake)   # pylint: disable=protected-access
  np.testing.assert_array_equal(bank.indices, [0, 6, 11, 17, 22, 28, 33, 39])
  assert sorted(set(bank[np.arange(len(bank))]["label"].tolist())) == [0, 1, 2, 3]


# the untrained baseline is the run's own starting encoder (the same seed's
# initialisation, as the graph task and `probe --untrained` use): results.json's "gain" is
# trained minus that start.
def test_the_untrained_image_baseline_is_the_runs_starting_encoder(tmp_path, monkeypatch):
  from cldro_jax.tasks import image  # pylint: disable=import-outside-toplevel
  from helpers import assert_trees_close  # pylint: disable=import-outside-toplevel
  config = tiny_image_config(total_steps=1, **{"eval.linear_probe": "features",
                                               "eval.linear_probe_epochs": 1,
                                               "eval.untrained_baseline": True})
  seen = []
  real = image.ImageTask.linear_probe_scores

  def spy(self, params, model_state, seed):
    seen.append(jax.device_get(params))
    return real(self, params, model_state, seed)

  monkeypatch.setattr(image.ImageTask, "linear_probe_scores", spy)
  train.train_and_evaluate(config, str(tmp_path))
  mesh = train.make_mesh(1)
  task = image.ImageTask(config, mesh)
  tx = train.make_full_optimizer(config, train.make_schedule(config.optim, 1, task.steps_per_epoch))
  with jax.set_mesh(mesh):
    start = train.initial_state(task, config, tx, mesh)
  assert len(seen) == 2
  assert_trees_close(seen[1], jax.device_get(start.params["model"]), rtol=0, atol=0)


# the online probe trains on the encoder features of BOTH views (solo-learn's online
# classifier sees every crop): rows B.. are view 2's features, not view 1's again.
def test_the_online_probe_sees_both_views():
  from cldro_jax.data import augment as augment_lib  # pylint: disable=import-outside-toplevel
  from cldro_jax.tasks import image  # pylint: disable=import-outside-toplevel
  config = tiny_image_config()
  task = image.ImageTask(config, train.make_mesh(1))
  params, state = task.init(train.model_init_key(0))
  batch = task.dataset.pretrain[np.arange(8)]
  rng = jax.random.key(3)
  out = task.forward(params, state, batch, rng, train=True)
  view1, view2 = augment_lib.two_views(rng, jnp.asarray(batch["image"]), task.augment)
  f1, _, state1 = task._apply(params, state, view1, train=True)   # pylint: disable=protected-access
  f2, _, _ = task._apply(params, state1, view2, train=True)   # pylint: disable=protected-access
  np.testing.assert_allclose(np.asarray(out.probe_features), np.concatenate([f1, f2]),
                             rtol=1e-5, atol=1e-5)


# A resume past the end names the command that evaluates the checkpoint instead; the probe
# refuses sentence runs, so theirs is the STS evaluator's, and its arguments must parse.
@pytest.mark.parametrize("domain", ["image", "sentence", "graph"])
def test_past_the_end_names_the_evaluation_command_of_the_runs_domain(domain):
  from cldro_jax.evaluators import sts
  command = train.evaluate_command(config_defaults.base_config(domain), "/runs/x").split()
  assert command[:3] == ["python", "-m", {"sentence": "cldro_jax.evaluators.sts"}.get(
      domain, "cldro_jax.probe")]
  if domain == "sentence":
    args = sts._parse_args(command[3:])  # pylint: disable=protected-access
    assert (args.workdir, args.checkpoint) == ("/runs/x", "latest")
  else:
    assert command[3:] == ["--workdir=/runs/x"]
