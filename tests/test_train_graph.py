"""The graph track through the trainer: GraphCL-style GIN pre-training on MUTAG (real data shipped
in grakel), per-device packed batches, the SVM evaluation, and the TU configs."""

import functools
import importlib
import json

import jax
import numpy as np
import pytest
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.svm import SVC

import reference_losses as ref
import cldro_jax
from cldro_jax import config_defaults
from cldro_jax import metrics as metrics_lib
from cldro_jax import train
from cldro_jax.data import graphs as graphs_lib
from cldro_jax.models import gin
from cldro_jax.tasks import graph as graph_task
from helpers import (assert_trees_close, assert_updates_close, read_json, saved_arrays,
                     step_two_from_one_checkpoint, with_overrides)

# LOSSES.md, "Graphs": (aug, mu, sigma, t) per dataset, typed here independently of the code.
PAPER_TABLE = {
    "nci1": ("NCI1", "random3", 0.7, 1.0, 0.05),
    "proteins": ("PROTEINS", "random4", 1.5, 1.0, 0.05),
    "dd": ("DD", "random2", 0.2, 1.0, 0.2),
    "mutag": ("MUTAG", "random2", 0.7, 1.0, 0.15),
    "collab": ("COLLAB", "random4", 0.3, 1.0, 0.1),
    "reddit_binary": ("REDDIT-BINARY", "random2", 0.3, 1.0, 0.15),
    "reddit_multi_5k": ("REDDIT-MULTI-5K", "random2", 0.8, 1.0, 0.15),
    "imdb_binary": ("IMDB-BINARY", "random2", 0.7, 1.0, 0.55),
}
MUTAG_GRAPHS, MUTAG_POSITIVE = 188, 125   # LOSSES.md: 188 graphs, labels 1 (125) and -1 (63)


def mutag_config(arg="runlocal", **overrides):
  config = importlib.import_module("configs.tu_mutag").get_config(arg)
  config.mesh.num_devices = 1
  return with_overrides(config, **overrides)


def unsharded_gin(config):
  """The same network without the "data" axis name: applies outside shard_map."""
  return gin.GIN(num_layers=config.model.num_layers, hidden=config.model.hidden)


def tight_pack(graph_list):
  """All graphs in one batch whose budget they fill exactly (no per-device layout)."""
  budget = graphs_lib.GraphBudget(sum(g.num_nodes for g in graph_list) + 1,
                                  sum(g.num_edges for g in graph_list) + 1, len(graph_list) + 1)
  return graphs_lib.pack_graphs(graph_list, budget)


def direct_svm_accuracy(x, y, seed, folds, inner_folds):
  """GraphCL's svc_classify(search=True), written out with scikit-learn (percent)."""
  accuracies = []
  outer = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
  for train_idx, test_idx in outer.split(x, y):
    search = GridSearchCV(SVC(), {"C": [0.001, 0.01, 0.1, 1, 10, 100, 1000]}, cv=inner_folds,
                          scoring="accuracy")
    search.fit(x[train_idx], y[train_idx])
    accuracies.append(np.mean(search.predict(x[test_idx]) == y[test_idx]))
  return 100.0 * float(np.mean(accuracies))


# ----------------------------------------------------------------------------------------------
# End to end


def test_runlocal_end_to_end_and_svm_wiring(tmp_path):
  config = mutag_config()
  results = train.train_and_evaluate(config, str(tmp_path))
  saved = read_json(tmp_path, "results.json")
  assert saved == json.loads(json.dumps(results))
  assert saved["dataset"] == "MUTAG" and saved["num_graphs"] == MUTAG_GRAPHS
  assert saved["step"] == config.total_steps == 4
  assert 50.0 <= saved["svm_accuracy"] <= 100.0
  assert 50.0 <= saved["untrained_svm_accuracy"] <= 100.0
  train_lines = metrics_lib.read_metrics(str(tmp_path), "train")
  assert [r["step"] for r in train_lines] == [1, 2, 3, 4]
  assert all(np.isfinite(r["loss"]) and r["adnce_w_max"] >= 1.0 for r in train_lines)

  # The evaluation's embeddings: the saved encoder applied to every original graph, BatchNorm in
  # eval mode, equal to a direct unpadded forward pass, also through an 8-device mesh.
  state, _ = saved_arrays(str(tmp_path))
  params, model_state = state["params"]["model"], state["model_state"]
  one = graph_task.GraphTask(config, train.make_mesh(1))
  emb_one, labels = one.embeddings(params, model_state)
  assert emb_one.shape == (MUTAG_GRAPHS, 96) and int(labels.sum()) == MUTAG_POSITIVE
  dataset = graphs_lib.load_tu_dataset("MUTAG")
  direct, _ = jax.jit(functools.partial(unsharded_gin(config).apply, train=False))(
      {"params": params, **model_state}, tight_pack(dataset.graphs))
  np.testing.assert_allclose(emb_one, np.asarray(direct)[:MUTAG_GRAPHS], rtol=1e-5, atol=1e-5)
  # `cldro_jax.load_encoder` embeds any list of graphs the same way, in order, at any batch size.
  encoder = cldro_jax.load_encoder(str(tmp_path))
  assert encoder.step == config.total_steps
  np.testing.assert_allclose(encoder.embed(dataset.graphs, batch_size=50),
                             np.asarray(direct)[:MUTAG_GRAPHS], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(encoder.embed(dataset.graphs[7:10][::-1]),
                             np.asarray(direct)[7:10][::-1], rtol=1e-5, atol=1e-5)
  # the dataset itself is a sequence of its graphs (embed(load_tu_dataset(...)) as documented)
  assert len(dataset) == MUTAG_GRAPHS and dataset[7] is dataset.graphs[7]
  np.testing.assert_array_equal(encoder.embed(dataset), encoder.embed(dataset.graphs))
  assert repr(encoder) == f"GraphEncoder(step={config.total_steps})"   # not every weight
  assert encoder.embed([]).shape == (0, 96)
  # Calls with other graphs of similar sizes reuse the compiled shapes: four 16-graph slices of
  # MUTAG need 272 to 320 node rows and 592 to 704 edge rows (four budgets, four compilations,
  # when padded to exactly that); rounded up to powers of two they share one.
  compiled = graph_task.jitted_apply._cache_size()  # pylint: disable=protected-access
  for lo in range(0, 64, 16):
    np.testing.assert_allclose(encoder.embed(dataset.graphs[lo:lo + 16]),
                               np.asarray(direct)[lo:lo + 16], rtol=1e-5, atol=1e-5)
  assert graph_task.jitted_apply._cache_size() <= compiled + 1  # pylint: disable=protected-access
  other = dataset.graphs[0]._replace(node_features=np.zeros((17, 3), np.float32))
  with pytest.raises(ValueError, match=r"trained on 7 node features per node; these graphs have"):
    encoder.embed([other])
  # `python -m cldro_jax.probe` on a graph run: its SVM evaluation at any checkpoint, the last
  # one scoring what results.json reports; the untrained GIN scoring the baseline.
  from cldro_jax import probe  # pylint: disable=import-outside-toplevel
  again = probe.run_probe(str(tmp_path))
  assert again["step"] == config.total_steps and again["protocol"] == "svm"
  assert again["svm_accuracy"] == pytest.approx(saved["svm_accuracy"], abs=1e-9)
  assert read_json(tmp_path, "probe_svm_step4.json") == json.loads(json.dumps(again))
  baseline = probe.run_probe(str(tmp_path), untrained=True)
  assert baseline["svm_accuracy"] == pytest.approx(saved["untrained_svm_accuracy"], abs=1e-9)
  assert probe.summary_line(baseline, str(tmp_path)) == (
      f"SVM accuracy {baseline['svm_accuracy']:.2f} of the untrained encoder on MUTAG (saved "
      f"as {tmp_path}/probe_svm_*.json)")
  # Several CV shuffles: the +- says it is over shuffles of one encoder, not training seeds.
  shuffled = {**baseline, "svm_accuracy_per_seed": [80.0, 82.0], "svm_accuracy_std": 1.0}
  assert "+- 1.00 over 2 CV shuffle seeds of the untrained" in probe.summary_line(
      shuffled, str(tmp_path))
  with pytest.raises(ValueError, match="SVM protocol only: drop --protocol"):
    probe.run_probe(str(tmp_path), protocol="features")
  # 128 evaluation graphs over 8 devices: the last batch (60 graphs) leaves 4 devices empty.
  eight = graph_task.GraphTask(mutag_config(**{"eval.batch_size": 128, "mesh.num_devices": 8}),
                               train.make_mesh(8))
  emb_eight, labels_eight = eight.embeddings(params, model_state)
  np.testing.assert_array_equal(labels_eight, labels)
  np.testing.assert_allclose(emb_eight, emb_one, rtol=1e-5, atol=1e-5)

  # The reported score is scikit-learn's CV on exactly these embeddings (seed = config.seed).
  expected = direct_svm_accuracy(emb_one.astype(np.float64), labels, config.seed,
                                 config.eval.folds, config.eval.inner_folds)
  assert saved["svm_accuracy"] == pytest.approx(expected, abs=1e-9)
  assert saved["svm_cv_seeds"] == [config.seed]


def test_logged_loss_is_the_graph_adnce_of_original_vs_augmented_views_and_it_decreases():
  """Step 0's loss equals the float64 GraphCL-form ADNCE of an independent forward pass: view 1 =
  the original graphs of the step, view 2 = their augmentations, padding slots left out. Then a
  few steps on that fixed batch lower it."""
  config = mutag_config(**{"batch_size": 32})
  mesh = train.make_mesh(1)
  task = graph_task.GraphTask(config, mesh)
  schedule = train.make_schedule(config.optim, 10, task.steps_per_epoch)
  tx = train.make_optimizer(config.optim, schedule)
  state = jax.jit(lambda rng: train.create_train_state(task, config, tx, rng))(
      jax.random.PRNGKey(0))
  step_fn = jax.jit(train.make_train_step(task, config, tx, schedule, mesh))
  batch = task.to_global(task.host_batch(0))
  initial_variables = {"params": state.params["model"], **state.model_state}
  losses = []
  for _ in range(10):
    state, step_metrics = step_fn(state, batch)
    losses.append(float(step_metrics["loss"]))   # the loss before this step's update
  assert np.all(np.isfinite(losses))
  assert losses[-1] < losses[0] - 0.3, losses

  indices = task.step_graph_indices(0)
  dataset = graphs_lib.load_tu_dataset("MUTAG")
  augment_seed = graphs_lib.epoch_augment_seed(config.seed, 0)
  views = [graphs_lib.make_views(dataset.graphs[i], config.data.aug,
                                 np.random.default_rng((augment_seed, int(i))),
                                 config.data.aug_mode) for i in indices]
  apply = jax.jit(functools.partial(unsharded_gin(config).apply, train=True,
                                    mutable=["batch_stats"]))
  (_, z1), _ = apply(initial_variables, tight_pack([v[0] for v in views]))
  (_, z2), _ = apply(initial_variables, tight_pack([v[1] for v in views]))
  n = len(indices)
  expected = ref.weighted_nce(np.asarray(z1, np.float64)[:n], np.asarray(z2, np.float64)[:n],
                              t=config.loss.temperature, variant="graph", mu=config.loss.mu,
                              sigma=config.loss.sigma)
  assert losses[0] == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_eight_devices_equal_one_device(tmp_path):
  # Batch 128 over 8 devices = 16 graph slots each; step 2 is the epoch's last batch (60 of 188
  # graphs): 3 full devices, one with 12 graphs and 4 empty ones. Step 1 on 1 device, then step 2
  # from that checkpoint on 1 and on 8 devices (tests/helpers.py says why from one checkpoint).
  # SGD, not Adam: Adam's first updates are ~lr * sign(gradient), so a gradient element that is
  # zero up to float noise (e.g. a bias whose unit BatchNorm makes it irrelevant; 3e-7 vs -2e-7
  # here) moves by +-lr depending on the reduction order. SGD keeps the comparison proportional.
  overrides = {"batch_size": 128, "eval.folds": 2, "eval.inner_folds": 2,
               "eval.untrained_baseline": False, "optim.name": "sgd", "optim.lr": 0.1,
               "optim.momentum": 0.0, "optim.weight_decay": 0.0}
  one, eight = step_two_from_one_checkpoint(
      lambda **more: mutag_config(**overrides, **more), str(tmp_path),
      [{"mesh.num_devices": 1}, {"mesh.num_devices": 8}])
  # Same graphs in the same global slots, BatchNorm over the global batch's real nodes, negatives
  # gathered from every device: the same function up to the order of float reductions (measured:
  # 2e-6 of the update, 9e-6 of the worst array's, with jax 0.10.2 and 0.10.0).
  assert_updates_close(one, eight, 1, 2, rel=1e-2, rel_per_array=0.1)
  assert_trees_close(saved_arrays(one)[0]["model_state"], saved_arrays(eight)[0]["model_state"],
                     rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose([r["loss"] for r in metrics_lib.read_metrics(one, "train")],
                             [r["loss"] for r in metrics_lib.read_metrics(eight, "train")],
                             rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Host batches


def slot_sizes(batch, devices):
  """(real nodes, real edges) of every GLOBAL graph slot of a per-device-packed batch.

  Device d's block holds rows [d * n, (d + 1) * n) with local ids; global slot = d * G_d + local.
  """
  nodes_per = batch.node_mask.size // devices
  edges_per = batch.edge_mask.size // devices
  slots_per = batch.graph_mask.size // devices
  node_device = np.arange(batch.node_mask.size) // nodes_per
  node_slot = batch.node_graph + node_device * slots_per
  edge_device = np.arange(batch.edge_mask.size) // edges_per
  assert np.all(batch.senders < nodes_per) and np.all(batch.receivers < nodes_per)
  edge_slot = node_slot[edge_device * nodes_per + batch.receivers]
  slots = batch.graph_mask.size
  return (np.bincount(node_slot[batch.node_mask], minlength=slots).tolist(),
          np.bincount(edge_slot[batch.edge_mask], minlength=slots).tolist())


def test_per_device_packing_puts_each_step_graph_in_the_same_global_slot():
  config1 = mutag_config(**{"batch_size": 128})
  config8 = mutag_config(**{"batch_size": 128, "mesh.num_devices": 8})
  one = graph_task.GraphTask(config1, train.make_mesh(1))
  eight = graph_task.GraphTask(config8, train.make_mesh(8))
  assert one.steps_per_epoch == eight.steps_per_epoch == 2    # ceil(188 / 128), as the reference
  seen = []
  for step in range(2):                                        # epoch 0
    a, b = one.host_batch(step), eight.host_batch(step)
    for view in ("view1", "view2"):
      np.testing.assert_array_equal(a[view].graph_mask, b[view].graph_mask)
      np.testing.assert_array_equal(a[view].labels, b[view].labels)
      assert slot_sizes(a[view], 1) == slot_sizes(b[view], 8)
    seen.extend(one.step_graph_indices(step).tolist())
  assert sorted(seen) == list(range(MUTAG_GRAPHS))             # every graph once per epoch
  assert int(one.host_batch(1)["view1"].graph_mask.sum()) == MUTAG_GRAPHS - 128

  # The position is a function of the step: resuming at step 3 yields batches 3 and 4.
  resumed = list(one.train_batches(start_step=3, num_steps=2))
  for got, step in zip(resumed, (3, 4), strict=True):
    jax.tree.map(np.testing.assert_array_equal, got, one.host_batch(step))


def test_faithful_mode_keeps_the_batches_of_epoch_zero_proper_mode_reshuffles():
  # GraphCL/ADNCE shuffle MUTAG once, then a non-shuffling DataLoader: the same batches (and so
  # the same negatives) every epoch; only the augmentations are new.
  def batches_of_epochs(mode):
    task = graph_task.GraphTask(mutag_config(**{"batch_size": 64, "data.aug_mode": mode}),
                                train.make_mesh(1))
    per_epoch = task.steps_per_epoch
    return [[task.step_graph_indices(e * per_epoch + s).tolist() for s in range(per_epoch)]
            for e in range(3)]
  faithful = batches_of_epochs("faithful")
  assert faithful[0] == faithful[1] == faithful[2]
  assert sorted(sum(faithful[0], [])) == list(range(MUTAG_GRAPHS))
  assert faithful[0][0] != list(range(64))                     # shuffled once, by the seed
  proper = batches_of_epochs("proper")
  assert proper[0] == faithful[0] and proper[1] != proper[0] and proper[2] != proper[1]
  assert sorted(sum(proper[1], [])) == list(range(MUTAG_GRAPHS))


# ----------------------------------------------------------------------------------------------
# Configs and errors


@pytest.mark.parametrize("module", sorted(PAPER_TABLE))
def test_tu_configs_carry_the_papers_recipe(module):
  name, aug, mu, sigma, t = PAPER_TABLE[module]
  config = importlib.import_module(f"configs.tu_{module}").get_config()
  config_defaults.validate_config(config)
  assert (config.data.name, config.data.aug) == (name, aug)
  assert (config.loss.name, config.loss.mu, config.loss.sigma, config.loss.temperature) == (
      "adnce", mu, sigma, t)
  assert (config.batch_size, config.total_epochs, config.optim.name, config.optim.lr) == (
      128, 20, "adam", 0.01)
  assert (config.model.num_layers, config.model.hidden) == (3, 32)
  infonce = importlib.import_module(f"configs.tu_{module}").get_config(
      "runlocal,loss=infonce,aug_mode=faithful,seed=3")
  assert (infonce.loss.name, infonce.data.aug_mode, infonce.seed) == ("infonce", "faithful", 3)


def test_dataset_not_on_disk_fails_fast_with_the_download_command(tmp_path):
  config = importlib.import_module("configs.tu_nci1").get_config("runlocal")
  config.data.data_dir = str(tmp_path)
  config.data.source = "local"
  with pytest.raises(FileNotFoundError) as err:
    graph_task.GraphTask(config, train.make_mesh(1))
  assert "curl -LO https://www.chrsmrrs.com/graphkerneldatasets/NCI1.zip" in str(err.value)
  assert str(tmp_path) in str(err.value) and "--config.data.data_dir" in str(err.value)


def test_a_failed_download_is_a_missing_dataset_with_the_manual_command(monkeypatch):
  """Offline, the download's ConnectionError (which names the manual command) reaches the user
  as the missing-dataset error, shown by the command line as one message."""
  def offline(name, **_kwargs):
    raise ConnectionError(f"Could not download TU dataset {name!r}; run `curl -LO URL`.")

  monkeypatch.setattr(graphs_lib, "load_tu_dataset", offline)
  with pytest.raises(FileNotFoundError, match=r"Could not download TU dataset 'NCI1'; run `curl "
                                              r"-LO URL`. Or point --config.data.data_dir"):
    graph_task.GraphTask(importlib.import_module("configs.tu_nci1").get_config("runlocal"),
                         train.make_mesh(1))


@pytest.mark.parametrize("field,value,message", [
    ("data.aug", "random5", "config.data.aug='random5' is not one of"),
    ("data.aug_mode", "exact", "config.data.aug_mode='exact' is not one of"),
    ("data.budget_quantile", 1.5, "budget_quantile must be 0 .* got 1.5"),
    ("model.dtype", "float16", "model.dtype must be float32 or bfloat16"),
    ("model.num_layers", 0, "num_layers and config.model.hidden must be >= 1"),
    ("model.hidden", 0, "num_layers and config.model.hidden must be >= 1"),
    ("eval.svm_seeds", 0, "svm_seeds must be >= 1"),
    ("eval.folds", 1, "folds and inner_folds >= 2"),
    ("eval.inner_folds", 1, "folds and inner_folds >= 2"),
    ("eval.batch_size", 0, "eval.batch_size must be >= 1"),
    ("eval.every_epochs", -1, "every_epochs >= 0"),
])
def test_bad_graph_settings_are_rejected(field, value, message):
  with pytest.raises(ValueError, match=f"Invalid graph config:(.|\\n)*{message}"):
    graph_task.GraphTask(mutag_config(**{field: value}), train.make_mesh(1))


def test_a_quantile_budget_too_small_for_the_evaluation_batches_fails_before_training():
  """The evaluation's batches are fixed: a quantile budget they overflow is refused when the
  task is built, naming the setting, not after training in the first evaluation."""
  with pytest.raises(ValueError, match=r"budget_quantile=0.5 gives evaluation batches room for "
                                       r"\d+ nodes.*--config.data.budget_quantile=0"):
    graph_task.GraphTask(mutag_config(**{"data.budget_quantile": 0.5, "eval.batch_size": 32}),
                         train.make_mesh(1))
  task = graph_task.GraphTask(mutag_config(**{"data.budget_quantile": 1.0,
                                              "eval.batch_size": 32}), train.make_mesh(1))
  assert sum(1 for _ in task._eval_host_batches()) == 6   # pylint: disable=protected-access


def test_dcl_is_rejected_for_graphs():
  config = mutag_config("loss=dcl")
  with pytest.raises(ValueError, match="dcl.*defined for images only"):
    config_defaults.validate_config(config)


def test_the_last_monitor_and_the_final_evaluation_embed_the_trained_graphs_once(tmp_path,
                                                                               monkeypatch):
  config = mutag_config(**{"total_steps": 5, "eval.every_epochs": 1, "eval.folds": 2,
                           "eval.inner_folds": 2})
  calls = []
  embeddings = graph_task.GraphTask.embeddings
  monkeypatch.setattr(graph_task.GraphTask, "embeddings",
                      lambda self, *args: calls.append(1) or embeddings(self, *args))
  results = train.train_and_evaluate(config, str(tmp_path))
  # One epoch (188 graphs / 32): the monitor after it, then the final SVM: the trained encoder
  # is embedded once for both, the untrained baseline once.
  assert len(calls) == 2
  assert results["final_svm_accuracy"] == pytest.approx(results["svm_accuracy"])


def _mutag_task(**overrides):
  import importlib  # pylint: disable=import-outside-toplevel
  from helpers import with_overrides  # pylint: disable=import-outside-toplevel
  from cldro_jax.tasks import graph as graph_task  # pylint: disable=import-outside-toplevel
  config = importlib.import_module("configs.tu_mutag").get_config("runlocal")
  config.mesh.num_devices = 1
  return graph_task.GraphTask(with_overrides(config, **overrides), train.make_mesh(1))


# faithful mode keeps epoch 0's batches but "only the augmentations are new" each epoch
# (GraphCL draws a graph's augmentation afresh every time the loader yields it).
def test_graph_views_are_augmented_afresh_each_epoch():
  task = _mutag_task(**{"batch_size": 64, "data.aug_mode": "faithful"})
  first, later = task.host_batch(0), task.host_batch(task.steps_per_epoch)
  np.testing.assert_array_equal(first["view1"].labels, later["view1"].labels)   # same graphs
  assert any(not np.array_equal(a, b) for a, b in zip(first["view2"], later["view2"]))


# padded graph slots stay out of the loss: the last batch of an epoch of MUTAG's 188
# graphs (LOSSES.md) at batch 128 holds 188 - 128 = 60 real graphs, and only they are valid.
def test_padded_graph_slots_are_not_valid_in_the_loss():
  import functools  # pylint: disable=import-outside-toplevel
  task = _mutag_task(**{"batch_size": 128})
  params, state = task.init(train.model_init_key(0))
  batch = task.to_global(task.host_batch(1))
  out = jax.jit(functools.partial(task.forward, train=True))(params, state, batch,
                                                             jax.random.key(0))
  assert int(np.asarray(out.valid).sum()) == 60


# graph eval config: "svm_seeds: CV repetitions; repetition r shuffles the outer folds
# with seed+r".
def test_svm_repetitions_shuffle_with_seed_plus_r():
  import types  # pylint: disable=import-outside-toplevel
  from cldro_jax.tasks import graph as graph_task  # pylint: disable=import-outside-toplevel
  fake = types.SimpleNamespace(config=types.SimpleNamespace(
      seed=3, eval=types.SimpleNamespace(svm_seeds=3)))
  assert graph_task.GraphTask.cv_seeds(fake) == [3, 4, 5]
