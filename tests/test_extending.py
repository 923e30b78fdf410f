"""docs/extending.md: the example module as the doc prints it, its loss against the float64
reference, the registries' checks, and a run with `--config.imports` whose workdir a new process
(the probe) reads with the same registrations."""

import functools
import importlib
import json
import os
import pathlib
import re
import subprocess
import sys

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from cldro_jax import checkpointing
from cldro_jax import config_defaults
from cldro_jax import losses
from cldro_jax import train
from cldro_jax.data import images
from cldro_jax.models import resnet
from helpers import tiny_image_config
import reference_losses as ref

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = REPO_ROOT / "docs" / "extending.md"


def _example_module_source() -> str:
  text = DOC.read_text(encoding="utf-8")
  section = text.split("## A complete example", 1)[1]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def example(tmp_path_factory):
  """The doc's my_extensions.py, written to a folder and imported (registering its pieces)."""
  folder = tmp_path_factory.mktemp("plugin")
  (folder / "my_extensions.py").write_text(_example_module_source(), encoding="utf-8")
  sys.path.insert(0, str(folder))
  try:
    yield folder, importlib.import_module("my_extensions")
  finally:
    sys.path.remove(str(folder))


def test_the_example_loss_is_the_cauchy_weighted_nce_of_its_formula(example):
  _, module = example
  rng = np.random.default_rng(0)
  z1 = rng.normal(size=(6, 4))
  z2 = z1 + 0.4 * rng.normal(size=(6, 4))
  cauchy = lambda s: 1.0 / (1.0 + ((s - 0.6) / 0.3) ** 2)   # noqa: E731
  for variant in losses.VARIANTS:
    expected = ref.weighted_nce(z1, z2, t=0.3, variant=variant, weight_fn=cauchy)
    for block_size in (None, 4):
      got = module.cauchy_nce(jnp.asarray(z1, jnp.float32), jnp.asarray(z2, jnp.float32),
                              temperature=0.3, mu=0.6, sigma=0.3, variant=variant,
                              block_size=block_size)
      np.testing.assert_allclose(float(got), expected, rtol=2e-6, err_msg=variant)
  # and it differs from ADNCE with the same mu and sigma: the weighting is the example's own
  adnce = ref.weighted_nce(z1, z2, t=0.3, variant="image", mu=0.6, sigma=0.3)
  assert abs(ref.weighted_nce(z1, z2, t=0.3, variant="image", weight_fn=cauchy) - adnce) > 1e-3


def test_a_registered_loss_is_a_training_objective(example):
  objective = losses.get_objective("cauchy_nce")
  assert objective.hyperparameters == ("temperature", "mu", "sigma")
  assert objective.blockwise and objective.takes_variant
  config = config_defaults.base_config("sentence")
  config.loss.name = "cauchy_nce"
  config.loss.block_size = 8
  config_defaults.validate_config(config)
  assert config_defaults.unused_settings(config) == []
  config.loss.tau_plus = 0.3   # not one of its hyperparameters
  assert config_defaults.unused_settings(config) == [
      "loss.tau_plus=0.3 (not read by --config.loss.name=cauchy_nce)"]
  rng = np.random.default_rng(1)
  z1, z2 = rng.normal(size=(2, 8, 4)).astype(np.float32)
  value = train.make_loss_fn(config.loss, "sentence")(z1, z2, None, None, None)
  expected = ref.weighted_nce(z1, z2, t=config.loss.temperature, variant="sentence",
                              weight_fn=lambda s: 1.0 / (1.0 + ((s - config.loss.mu)
                                                                / config.loss.sigma) ** 2))
  np.testing.assert_allclose(float(value), expected, rtol=2e-6)


def test_registries_refuse_what_cannot_work(example):
  def no_axis_name(z1, z2, *, temperature, valid=None, labels=None):
    return 0.0

  with pytest.raises(ValueError, match=r"takes no keyword\(s\) \['axis_name'\]"):
    losses.register_objective("broken", no_axis_name, hyperparameters=("temperature",))
  with pytest.raises(ValueError, match=r"takes no keyword\(s\) \['gamma'"):
    losses.register_objective("broken", losses.infonce, hyperparameters=("gamma",))
  with pytest.raises(ValueError, match="takes no `variant`.*variants=\\('image',\\)"):
    losses.register_objective("broken", losses.dcl, hyperparameters=("temperature", "tau_plus"))
  with pytest.raises(ValueError, match="a loss named 'cauchy_nce' is already registered"):
    losses.register_objective("cauchy_nce", losses.infonce, hyperparameters=("temperature",))
  with pytest.raises(ValueError, match="'adnce' is a built-in loss"):
    losses.register_objective("adnce", losses.infonce, hyperparameters=("temperature",))
  with pytest.raises(ValueError, match="'resnet18' is a built-in encoder"):
    resnet.register_encoder("resnet18", lambda **_: None)
  with pytest.raises(ValueError, match="'npz' is a built-in data source"):
    images.register_source("npz", lambda data: None)
  with pytest.raises(ValueError, match="unknown config.data fields \\['pathh'\\]"):
    images.register_source("broken", lambda data: None, fields=("pathh",))
  with pytest.raises(ValueError, match=r"\['block_size'\] are passed by the trainer"):
    losses.register_objective("broken", losses.infonce,
                              hyperparameters=("temperature", "block_size"))

  def needs_gamma(z1, z2, *, temperature, gamma, variant="image", valid=None, labels=None,
                  axis_name=None):
    return 0.0

  with pytest.raises(ValueError, match=r"needs_gamma requires \['gamma'\], which the trainer "
                     "would not pass"):
    losses.register_objective("broken", needs_gamma, hyperparameters=("temperature",))
  with pytest.raises(ValueError, match=r"functools.partial.*takes no `variant`"):
    losses.register_objective("broken", functools.partial(losses.dcl, tau_plus=0.1),
                              hyperparameters=("temperature",))
  with pytest.raises(ValueError, match="'adnce' is a built-in loss"):
    losses.register_objective("adnce", losses.infonce, hyperparameters=("temperature",),
                              replace=True)
  assert "broken" not in losses.objective_names() + images.source_names()
  with pytest.raises(ValueError, match="no loss named 'nope'.*--config.imports=MODULE"):
    losses.get_objective("nope")
  with pytest.raises(ValueError, match="log_weight must be a function"):
    losses.weighted_nce(np.ones((3, 2)), np.ones((3, 2)), temperature=0.5, log_weight=0.5)


def test_the_builtin_objectives_come_first_in_their_order():
  assert losses.objective_names()[:7] == config_defaults.LOSS_NAMES == (
      "infonce", "adnce", "dcl", "hcl", "kl_dro", "chi2_dro", "mean_variance")


def test_a_reloaded_module_registers_again(example):
  # importlib.reload makes new function objects with the same definitions (notebooks do this)
  _, module = example
  old_loss = losses.get_objective("cauchy_nce").fn
  importlib.reload(module)
  assert losses.get_objective("cauchy_nce").fn is module.cauchy_nce is not old_loss


def test_a_weighting_is_one_static_argument_per_function_not_per_call():
  from cldro_jax.losses import contrastive  # pylint: disable=import-outside-toplevel
  first, again = (contrastive._WeightedStats(ref_log_weight) for _ in range(2))
  assert first == again and hash(first) == hash(again)
  assert first != contrastive._WeightedStats(lambda s, p: s)


def ref_log_weight(sim, params):
  return -sim


def test_validation_names_missing_hyperparameters_unknown_names_and_imports():
  def gamma_loss(z1, z2, *, gamma, variant="image", valid=None, labels=None, axis_name=None):
    return losses.infonce(z1, z2, temperature=gamma, variant=variant, valid=valid,
                          labels=labels, axis_name=axis_name)

  losses.register_objective("gamma_test_loss", gamma_loss, hyperparameters=("gamma",),
                            variants=("image", "graph"))
  config = config_defaults.base_config("image")
  config.loss.name = "gamma_test_loss"
  with pytest.raises(ValueError, match="reads config.loss.gamma, which this config does not "
                     "have: add `config.loss.gamma = VALUE`"):
    config_defaults.validate_config(config)
  config.loss.gamma = 0.2   # as a config file adds it
  config_defaults.validate_config(config)
  assert float(train.make_loss_fn(config.loss, "image")(
      np.eye(4, dtype=np.float32), np.eye(4, dtype=np.float32), None, None, None)) > 0
  sentence = config_defaults.base_config("sentence")
  sentence.loss.name = "gamma_test_loss"
  sentence.loss.gamma = 0.2
  with pytest.raises(ValueError, match="is defined for images and graphs only"):
    config_defaults.validate_config(sentence)
  # a config file that adds gamma may still train another loss: gamma is named as unread
  config.loss.name = "infonce"
  config_defaults.validate_config(config)
  assert config_defaults.unused_settings(config) == [
      "loss.gamma=0.2 (not read by --config.loss.name=infonce)"]
  # a loss that no imported module registered is named first, before its unknown fields
  config.loss.name = "cauchy_nce_not_imported"
  with pytest.raises(ValueError, match=r"Invalid config:\n  config.loss.name="
                     "'cauchy_nce_not_imported' is not one of"):
    config_defaults.validate_config(config)
  config.loss.name = "gamma_test_loss"
  config.model.name = "vit_tiny"
  config.imports = "no_such_module_xyz"
  with pytest.raises(ValueError, match="config.imports names the module 'no_such_module_xyz', "
                     "which cannot be imported.*PYTHONPATH"):
    config_defaults.validate_config(config)
  config.imports = ""
  with pytest.raises(ValueError, match="config.model.name='vit_tiny' is not one of"):
    config_defaults.validate_config(config)


def test_a_module_whose_own_import_fails_is_named_as_such(tmp_path, monkeypatch):
  (tmp_path / "plugin_with_missing_dep.py").write_text("import no_such_dependency_xyz\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  config = config_defaults.base_config("image")
  config.imports = "plugin_with_missing_dep"
  with pytest.raises(ValueError, match="importing 'plugin_with_missing_dep' \\(config.imports\\) "
                     "failed: No module named 'no_such_dependency_xyz'; install what it needs"):
    config_defaults.validate_config(config)


def test_imports_may_change_on_resume_and_readers_name_the_workdir(tmp_path):
  # A renamed plugin module: the resume imports the command's modules, not the stored ones.
  config = config_defaults.base_config("image")
  config.imports = "plugin_renamed_away_xyz"
  workdir = tmp_path / "run"
  (workdir / "checkpoints" / "5").mkdir(parents=True)
  checkpointing.write_json_atomically(str(workdir / "config.json"),
                                      checkpointing.config_to_dict(config))
  config.imports = ""
  checkpointing.check_or_save_config(str(workdir), config, save=False)
  with pytest.raises(ValueError, match=re.escape(str(workdir / "config.json")) +
                     ": config.imports names the module 'plugin_renamed_away_xyz'"):
    checkpointing.read_saved_config(str(workdir))


class _FixedSizeEncoder(nn.Module):
  """Flattens the image: works only at the size it was built for."""

  @nn.compact
  def __call__(self, x, *, train, num_views=1):
    return nn.Dense(8)(x.reshape(x.shape[0], -1))


def test_an_encoder_that_needs_one_image_size_is_named_before_training(example):
  from cldro_jax.tasks import image  # pylint: disable=import-outside-toplevel
  resnet.register_encoder("fixed_size_test", lambda **_: _FixedSizeEncoder())
  config = tiny_image_config(**{"model.name": "fixed_size_test"})
  image.ImageTask(config, train.make_mesh(1))   # evaluated at the crop size: fine
  config = tiny_image_config(**{"model.name": "fixed_size_test",
                                "eval.probe_image_size": config.augment.crop_size + 4})
  with pytest.raises(ValueError, match="config.model.name='fixed_size_test' cannot embed the "
                     "evaluation's 32x32 images \\(it trains on 28x28 crops\\).*any image size"):
    image.ImageTask(config, train.make_mesh(1))
  # the doc's example encoder pools: fine at any size
  config = tiny_image_config(**{"model.name": "small_convnet", "eval.probe_image_size": 40})
  image.ImageTask(config, train.make_mesh(1))


def _write_npy_folder(folder: pathlib.Path) -> None:
  # The doc's data source reads four .npy files: the shipped Fashion-MNIST subset, written so.
  folder.mkdir()
  with np.load(images.fashion_mnist_subset_path()) as shipped:
    for split in ("train", "test"):
      np.save(folder / f"{split}_images.npy", shipped[f"x_{split}"])
      np.save(folder / f"{split}_labels.npy", shipped[f"y_{split}"])


def test_the_documented_commands_run_and_a_new_process_finds_the_registrations(example,
                                                                            tmp_path):
  plugin_dir, _ = example
  data = tmp_path / "my_data"
  _write_npy_folder(data)
  workdir = tmp_path / "cauchy"
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(plugin_dir), os.environ.get("PYTHONPATH", "")]))
  common = dict(cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=False)
  run = subprocess.run(
      [sys.executable, "-m", "cldro_jax.main", "--config=configs/quickstart.py:runlocal",
       "--config.imports=my_extensions", "--config.loss.name=cauchy_nce",
       "--config.model.name=small_convnet", "--config.data.source=npy_folder",
       f"--config.data.path={data}", f"--workdir={workdir}", "--config.mesh.num_devices=1"],
      timeout=300, **common)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "not used by this run" not in run.stderr, run.stderr[-3000:]
  results = json.loads((workdir / "results.json").read_text())
  assert results["loss"] == "cauchy_nce" and results["dataset"] == "npy_folder", results
  metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  train_losses = [m["loss"] for m in metrics if m.get("split") == "train"]
  assert train_losses and np.all(np.isfinite(train_losses)), metrics[:3]
  assert 10.0 <= results["linear_probe_top1"] <= 100.0, results   # 10 classes
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["imports"] == "my_extensions" and saved["model"]["name"] == "small_convnet"
  # A new process knows the loss, encoder and source only through config.json's imports.
  probe = subprocess.run([sys.executable, "-m", "cldro_jax.probe", f"--workdir={workdir}",
                          "--protocol=features"], timeout=300, **common)
  assert probe.returncode == 0, probe.stderr[-3000:]
  again = json.loads(probe.stdout)
  assert again["dataset"] == "npy_folder" and again["step"] == results["step"], again
  # the same features probe of the same encoder: the run's own score
  assert again["top1"] == pytest.approx(results["linear_probe_top1"], abs=1e-6), (again, results)
