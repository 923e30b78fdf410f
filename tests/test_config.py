"""Config schema, validation and the saved-config check on resume."""

import os
import pathlib
import subprocess
import sys

import ml_collections
import pytest

from cldro_jax import checkpointing
from cldro_jax import config_defaults
from cldro_jax import losses
from helpers import read_json

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_unknown_key_in_config_file_is_rejected_with_a_suggestion():
  config = config_defaults.base_config("image")
  config.loss.temprature = 0.2          # a typo that would otherwise be silently ignored
  with pytest.raises(ValueError, match=r"unknown config key 'loss.temprature'.*'loss.temperature'"):
    config_defaults.validate_config(config)


def test_locked_config_rejects_unknown_override():
  config = config_defaults.base_config("image")
  config.lock()
  with pytest.raises(AttributeError):
    config.loss.not_a_field = 1


def test_a_command_line_override_naming_no_field_gets_one_clear_line(tmp_path):
  # ml_collections raises a bare KeyError for it, which absl showed as three chained tracebacks.
  run = subprocess.run(
      [sys.executable, "-m", "cldro_jax.main", "--config=configs/quickstart.py:runlocal",
       "--config.loss.nmae=adnce", f"--workdir={tmp_path / 'run'}"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert run.returncode == 2
  assert ('cldro_jax: --config.loss.nmae names no field of the config: no field \'nmae\' Did you '
          'mean "name" instead of "nmae"?') in run.stderr
  assert "Traceback" not in run.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("domain", ["sentence", "graph"])
@pytest.mark.parametrize("loss", ["dcl", "hcl"])
def test_dcl_hcl_rejected_outside_images(domain, loss):
  config = config_defaults.base_config(domain)
  config.loss.name = loss
  with pytest.raises(ValueError, match=f"{loss}.*defined for images only") as err:
    config_defaults.validate_config(config)
  # Every loss the domain has is offered, the CL-DRO family included.
  for name in ("infonce", "adnce", "kl_dro", "chi2_dro", "mean_variance"):
    assert f"--config.loss.name={name}" in str(err.value)
  assert "--config.loss.name=dcl" not in str(err.value)


@pytest.mark.parametrize("field,value,message", [
    ("temperature", 0.0, "temperature must be > 0"),
    ("sigma", -1.0, "sigma must be > 0"),
    ("tau_plus", 1.0, r"tau_plus must be in \[0, 1\)"),
    ("name", "simclr", "is not one of"),
    ("eta", -0.1, "eta must be >= 0"),
])
def test_impossible_loss_values_are_rejected(field, value, message):
  config = config_defaults.base_config("image")
  config.loss[field] = value
  with pytest.raises(ValueError, match=message):
    config_defaults.validate_config(config)


@pytest.mark.parametrize("field,value,message", [
    ("keep_checkpoints", 0, "keep_checkpoints must be >= 1"),   # orbax would delete them all
    ("checkpoint_every_steps", 0, "checkpoint_every_steps must be >= 1"),
    ("log_every_steps", 0, "log_every_steps must be >= 1"),
    ("mesh.num_devices", 0, r"num_devices must be -1 \(all devices\) or >= 1"),
    ("mesh.num_devices", -7, r"num_devices must be -1 \(all devices\) or >= 1"),
    ("eval.every_epochs", -1, r"every_epochs must be >= 0 \(0: no per-epoch monitor\)"),
    ("total_steps", -5, "total_steps and config.total_epochs must be >= 0"),  # total_epochs > 0
    ("optim.warmup_epochs", -1.0, "warmup_epochs must be >= 0, got -1.0"),
])
def test_impossible_run_settings_are_rejected(field, value, message):
  config = config_defaults.base_config("image")
  if "." in field:
    group, name = field.split(".")
    config[group][name] = value
  else:
    config[field] = value
  with pytest.raises(ValueError, match=message):
    config_defaults.validate_config(config)


def test_parse_arg_casts_to_default_types_and_rejects_unknown_names():
  arg = config_defaults.parse_arg("runlocal,seed=3,loss=infonce", runlocal=False, seed=0,
                                  loss="adnce")
  assert arg.runlocal is True and arg.seed == 3 and arg.loss == "infonce"
  with pytest.raises(ValueError, match="Unknown config argument 'sed'"):
    config_defaults.parse_arg("sed=3", seed=0)


def test_saved_config_mismatch_names_the_fields(tmp_path):
  workdir = str(tmp_path)
  config = config_defaults.base_config("image")
  checkpointing.check_or_save_config(workdir, config)
  saved = read_json(workdir, "config.json")
  assert saved["loss"]["temperature"] == config.loss.temperature
  # The run reached a checkpoint (a step folder; a run without one may restart with any config).
  os.makedirs(os.path.join(workdir, "checkpoints", "1"))

  # Fields that may change on resume (duration, logging, data location) are accepted...
  longer = ml_collections.ConfigDict(config.to_dict())
  longer.total_epochs = 800.0
  longer.data.data_dir = "/elsewhere"
  longer.eval.knn_k = 20
  checkpointing.check_or_save_config(workdir, longer)
  # (graph runs: whether a missing dataset may be downloaded, the host's prefetch depth)
  graph = config_defaults.base_config("graph")
  graph_dir = os.path.join(workdir, "graph")
  checkpointing.check_or_save_config(graph_dir, graph)
  os.makedirs(os.path.join(graph_dir, "checkpoints", "1"))
  graph.data.download, graph.data.prefetch = not graph.data.download, 0
  checkpointing.check_or_save_config(graph_dir, graph)
  # ...and config.json follows them (where the data live now, how long the run goes).
  saved = read_json(workdir, "config.json")
  assert saved == checkpointing.config_to_dict(longer) and saved["total_epochs"] == 800.0

  # ...but another experiment in the same workdir is refused, naming every differing field.
  other = ml_collections.ConfigDict(longer.to_dict())
  other.loss.mu = 0.1
  other.batch_size = 512
  other.eval.online_probe_lr = 0.1   # trains the online probe, whose weights are in the state
  with pytest.raises(checkpointing.CheckpointMismatchError) as err:
    checkpointing.check_or_save_config(workdir, other)
  assert "loss.mu: saved 0.7, now 0.1" in str(err.value)
  assert "eval.online_probe_lr: saved 0.001, now 0.1" in str(err.value)
  assert "batch_size: saved 256, now 512" in str(err.value)
  # The way to a new experiment that starts from this run's encoder, and what may change.
  assert f"add --config.init_from={workdir}" in str(err.value)
  assert "except eval.online_probe, eval.online_probe_lr" in str(err.value)
  assert "new --workdir" in str(err.value)
  # Another domain is said in one line, not as every field of two schemas.
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match=r"holds a run of the 'image' domain; this config is for the 'graph' domain") as err:
    checkpointing.check_or_save_config(workdir, config_defaults.base_config("graph"))
  assert "\n" not in str(err.value)
  # Nothing was overwritten.
  assert read_json(workdir, "config.json") == saved


def test_mesh_of_part_of_the_devices_is_refused_in_a_multi_process_run(monkeypatch):
  import jax  # pylint: disable=import-outside-toplevel
  from cldro_jax import train  # pylint: disable=import-outside-toplevel
  assert train.make_mesh(4).size == 4        # one process: any first N devices
  # More devices than the machine has (a multi-GPU command on a smaller machine): a ConfigError,
  # which the command line reports in one line with the fix.
  with pytest.raises(train.ConfigError, match=r"num_devices=9, but only 8 devices are visible; "
                                              r"set --config.mesh.num_devices=-1"):
    train.make_mesh(9)
  # The mesh lists the devices in process order (then id), however the runtime lists them:
  # process p feeds global rows [p * local, (p + 1) * local) of every batch.
  devices = jax.devices()
  monkeypatch.setattr(jax, "devices", lambda: devices[::-1])
  assert list(train.make_mesh(-1).devices) == sorted(devices, key=lambda d: (d.process_index,
                                                                              d.id))
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(train.ConfigError, match=r"num_devices=4 with 2 processes.*num_devices=-1"):
    train.make_mesh(4)
  # (here every device belongs to process 0: as if process 1 had none)
  with pytest.raises(train.ConfigError, match=r"different numbers of devices \(\[8, 0\]\)"):
    train.make_mesh(-1)


@pytest.mark.parametrize("name", ["chi2_dro", "mean_variance"])
def test_dense_only_losses_refuse_a_block_size(name):
  config = config_defaults.base_config("image")
  config.loss.name, config.loss.block_size = name, 64
  with pytest.raises(ValueError, match=f"{name}.*has no memory-bounded blockwise path.*block_size=0"):
    config_defaults.validate_config(config)


@pytest.mark.parametrize("domain", ["sentence", "graph"])
@pytest.mark.parametrize("name", ["kl_dro", "chi2_dro", "mean_variance"])
def test_cl_dro_losses_are_accepted_in_every_domain(domain, name):
  config = config_defaults.base_config(domain)
  config.loss.name = name
  config_defaults.validate_config(config)


@pytest.mark.parametrize("name", ["infonce", "adnce", "dcl", "hcl", "kl_dro", "chi2_dro",
                                  "mean_variance"])
def test_config_loss_reaches_the_trainer_with_its_hyperparameters(name):
  # The trainer's loss for each `config.loss.name`, with non-default values everywhere (a
  # swapped tau_plus/beta, or mu/sigma left at their defaults, changes the number), against the
  # float64 transcription of LOSSES.md.
  import jax
  import numpy as np

  import reference_losses as ref
  from cldro_jax import train

  config = config_defaults.base_config("image")
  config.loss.name, config.loss.temperature = name, 0.3
  config.loss.mu, config.loss.sigma = 0.2, 0.6
  config.loss.tau_plus, config.loss.beta = 0.15, 0.8
  config.loss.eta = 0.35
  rng = np.random.default_rng(3)
  z1, z2 = rng.normal(size=(2, 12, 6))
  labels = np.arange(12) % 3
  config.loss.use_labels = True
  loss_fn = train.make_loss_fn(config.loss, "image")
  got = float(jax.jit(lambda a, b, lab: loss_fn(a, b, None, lab, None))(z1, z2, labels))
  expected = {
      "infonce": lambda: ref.weighted_nce(z1, z2, t=0.3, variant="image", labels=labels),
      "adnce": lambda: ref.weighted_nce(z1, z2, t=0.3, variant="image", mu=0.2, sigma=0.6,
                                        labels=labels),
      "dcl": lambda: ref.hcl(z1, z2, t=0.3, tau_plus=0.15, beta=0.0, labels=labels),
      "hcl": lambda: ref.hcl(z1, z2, t=0.3, tau_plus=0.15, beta=0.8, labels=labels),
      "kl_dro": lambda: ref.kl_dro(z1, z2, t=0.3, variant="image", labels=labels),
      "chi2_dro": lambda: ref.chi2_dro(z1, z2, eta=0.35, variant="image", labels=labels),
      "mean_variance": lambda: ref.mean_variance(z1, z2, t=0.3, variant="image", labels=labels),
  }[name]()
  np.testing.assert_allclose(got, expected, rtol=2e-5)


@pytest.mark.parametrize("variant", ["sentence", "graph"])
@pytest.mark.parametrize("name,block_size", [("kl_dro", 0), ("kl_dro", 4), ("chi2_dro", 0),
                                             ("mean_variance", 0)])
def test_cl_dro_trainer_loss_follows_the_domain_variant(variant, name, block_size):
  # Sentence and graph runs pair z1 row i with z2 row i and take the B-1 other z2 rows as
  # negatives; the image form would use 2B-2. The blockwise kl_dro gives the same number.
  import jax
  import numpy as np

  import reference_losses as ref
  from cldro_jax import train

  config = config_defaults.base_config(variant)
  config.loss.name, config.loss.temperature, config.loss.eta = name, 0.25, 0.6
  config.loss.block_size = block_size
  rng = np.random.default_rng(5)
  z1, z2 = rng.normal(size=(2, 10, 5))
  valid = np.arange(10) < 9
  loss_fn = train.make_loss_fn(config.loss, variant)
  got = float(jax.jit(lambda a, b, v: loss_fn(a, b, v, None, None))(z1, z2, valid))
  expected = {"kl_dro": lambda: ref.kl_dro(z1, z2, t=0.25, variant=variant, valid=valid),
              "chi2_dro": lambda: ref.chi2_dro(z1, z2, eta=0.6, variant=variant, valid=valid),
              "mean_variance": lambda: ref.mean_variance(z1, z2, t=0.25, variant=variant,
                                                         valid=valid)}[name]()
  np.testing.assert_allclose(got, expected, rtol=2e-5)


def test_parse_arg_rejects_values_it_would_otherwise_misread():
  # `runlocal=flase` used to mean False and `seed` alone seed=True (1), both silently.
  with pytest.raises(ValueError, match=r"runlocal='flase' is not a boolean; write `runlocal`"):
    config_defaults.parse_arg("runlocal=flase", runlocal=False)
  with pytest.raises(ValueError, match=r"'seed' needs a value, e.g. `seed=0`"):
    config_defaults.parse_arg("seed", seed=0)
  with pytest.raises(ValueError, match=r"seed='abc' is not an integer \(e.g. `seed=0`\)"):
    config_defaults.parse_arg("seed=abc", seed=0)
  with pytest.raises(ValueError, match=r"did you mean 'runlocal'\? this config takes "
                     r"`:runlocal,seed=0`"):
    config_defaults.parse_arg("run_local", runlocal=False, seed=0)


@pytest.mark.parametrize("field,value,message", [
    ("loss.mu", float("inf"), r"config.loss.mu must be finite, got inf"),
    ("loss.temperature", float("nan"), r"config.loss.temperature must be finite, got nan"),
    ("total_epochs", float("inf"), r"config.total_epochs must be finite"),
    ("augment.brightness", float("nan"), r"config.augment.brightness must be finite"),
    ("augment.crop_scale", (0.08, float("inf")), r"config.augment.crop_scale must be finite"),
    ("seed", -1, "config.seed must be >= 0, got -1"),
    ("optim.weight_decay", -1.0, r"config.optim.weight_decay must be >= 0 \(0: none\)"),
    ("optim.grad_clip_norm", -1.0, r"config.optim.grad_clip_norm must be >= 0"),
    ("optim.min_lr_ratio", -1.0, r"config.optim.min_lr_ratio must be in \[0, 1\]"),
    ("optim.momentum", 1.0, r"config.optim.momentum must be in \[0, 1\)"),
    ("model.width", 0, "config.model.width must be >= 1, got 0"),
    ("model.head_out", 0, "config.model.head_out must be >= 1"),
    ("eval.knn_k", 0, "config.eval.knn_k must be >= 1, got 0"),
    ("eval.batch_size", 0, "config.eval.batch_size must be >= 1"),
    ("eval.linear_probe_epochs", 0, "config.eval.linear_probe_epochs must be >= 1"),
    ("eval.knn_max_bank", -1, r"config.eval.knn_max_bank must be >= 0 \(0: every bank image\)"),
    ("eval.probe_image_size", -3, r"config.eval.probe_image_size must be >= 0 \(0: the stored"),
    ("eval.linear_probe_lr", 0.0, "config.eval.linear_probe_lr must be > 0"),
    ("augment.crop_size", 0, "config.augment.crop_size must be a positive int, got 0"),
    ("augment.hue", 0.7, r"config.augment.hue must be in \[0, 0.5\]"),
    ("data.train_per_class", -1, r"config.data.train_per_class must be >= 1 \(or 0: every"),
    ("data.split_seed", -1, "config.data.split_seed must be >= 0, got -1"),
    ("data.test_fraction", 1.0, r"config.data.test_fraction must be in \(0, 1\)"),
])
def test_settings_that_cannot_work_are_named_before_anything_runs(field, value, message):
  # Each of these trained (or failed after training) with a number no one asked for: a negative
  # min_lr_ratio turned the cosine's second half into gradient ascent, probe_image_size=-3 put
  # every score at chance, mu=inf failed deep inside the traced loss.
  config = config_defaults.base_config("image")
  group, _, name = field.rpartition(".")
  (config[group] if group else config)[name] = value
  with pytest.raises(ValueError, match=message):
    config_defaults.validate_config(config)


def test_probe_update_bn_with_the_features_probe_is_refused_and_runlocal_drops_it():
  config = config_defaults.base_config("image")
  config.eval.probe_update_bn = True
  config_defaults.validate_config(config)   # the reference probe updates BatchNorm: fine
  config.eval.linear_probe = "features"
  with pytest.raises(ValueError, match="probe_update_bn=True applies to the reference linear "
                                       "probe only.*--config.eval.linear_probe=reference"):
    config_defaults.validate_config(config)
  config_defaults.make_runlocal(config)   # runlocal probes features: the flag is dropped
  config_defaults.validate_config(config)


def _config_modules():
  import importlib.util
  for path in sorted((REPO_ROOT / "configs").glob("*.py")):
    if path.name == "__init__.py":
      continue
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield path.stem, module


def test_every_shipped_config_uses_every_setting_it_changes():
  # so that the "not used by this run" warning means something when it appears
  seen = 0
  for name, module in _config_modules():
    for arg in (None, "runlocal"):
      config = module.get_config(arg)
      config_defaults.validate_config(config)
      assert config_defaults.unused_settings(config) == [], (name, arg)
      seen += 1
  assert seen >= 30


@pytest.mark.parametrize("name", config_defaults.LOSS_NAMES)
def test_loss_hyperparameters_table_is_what_the_trainer_reads(name):
  # The table behind the "not used by this run" warning, against the trainer's loss itself:
  # changing a hyperparameter it lists changes the loss value, changing one it omits does not,
  # and exactly the omitted ones are reported.
  import jax
  import numpy as np

  from cldro_jax import train

  rng = np.random.default_rng(0)
  z1, z2 = rng.normal(size=(2, 10, 4)).astype(np.float32)
  base = config_defaults.base_config("image")
  base.loss.name = name

  def value(loss_cfg):
    return float(jax.jit(lambda a, b: train.make_loss_fn(loss_cfg, "image")(
        a, b, None, None, None))(z1, z2))

  reference = value(base.loss)
  changed = {"temperature": 0.2, "mu": 0.1, "sigma": 0.3, "tau_plus": 0.3, "beta": 2.0,
             "eta": 0.4}
  for key, new in changed.items():
    config = config_defaults.base_config("image")
    config.loss.name = name
    config.loss[key] = new
    moved = value(config.loss) != reference
    assert moved == (key in losses.get_objective(name).hyperparameters), (name, key)
    reported = any(note.startswith(f"loss.{key}=") for note in
                   config_defaults.unused_settings(config))
    assert reported == (not moved), (name, key)


def test_unused_optimizer_and_data_settings_are_reported():
  config = config_defaults.base_config("image")   # adam, constant lr, fashion_mnist_subset
  assert config_defaults.unused_settings(config) == []
  config.optim.momentum = 0.5
  config.optim.min_lr_ratio = 0.1
  config.data.name = "cifar10"
  config.data.image_size = (64, 64)
  config.data.train_per_class = 5   # read by this source: not reported
  config.loss.mu_quantile = 0.5     # read only by mu_rule=quantile
  assert config_defaults.unused_settings(config) == [
      "loss.mu_quantile=0.5 (read only by mu_rule=quantile)",
      "optim.momentum=0.5 (read by sgd and lars only, not --config.optim.name=adam)",
      "optim.min_lr_ratio=0.1 (read by the warmup_cosine schedule only, not "
      "--config.optim.schedule=constant)",
      "data.image_size=(64, 64) (not read by --config.data.source=fashion_mnist_subset)",
      "data.name='cifar10' (not read by --config.data.source=fashion_mnist_subset)"]
  config.eval.linear_probe = "none"
  config.eval.untrained_baseline = True
  config.eval.online_probe = False
  config.eval.online_probe_lr = 0.1
  notes = config_defaults.unused_settings(config)
  assert len(notes) == 7 and notes[3:5] == [
      "eval.untrained_baseline=True (no offline linear probe: --config.eval.linear_probe=none)",
      "eval.online_probe_lr=0.1 (no online probe: --config.eval.online_probe=False)"]
  config.eval.linear_probe, config.eval.online_probe = "features", True
  config.optim.name, config.optim.schedule = "sgd", "warmup_cosine"
  config.loss.mu_rule = "quantile"
  config.data.source = "tfds"
  assert config_defaults.unused_settings(config) == [
      "data.image_size=(64, 64) (not read by --config.data.source=tfds)"]


def test_the_data_fields_a_source_does_not_read_change_nothing():
  # images.SOURCE_FIELDS against the loaders: the digits, shipped-subset and npz sources load
  # the same arrays whatever the fields they are said not to read hold.
  import numpy as np

  from cldro_jax.data import images

  others = {"name": "cifar10", "image_size": (8, 8), "channels": 3, "test_dir": "/nonexistent",
            "data_dir": "/nonexistent", "pretrain_split": "test", "download": True,
            "in_memory": False, "read_threads": 1, "num_classes": 3, "test_fraction": 0.5,
            "split_seed": 3}
  for source in ("digits", "fashion_mnist_subset"):
    plain = images.load_image_dataset({"source": source})
    unread = {k: v for k, v in others.items() if k not in images.SOURCE_FIELDS[source]}
    assert len(unread) >= 7
    noted = images.unused_fields({"source": source, **unread})
    assert sorted(n.partition("=")[0] for n in noted) == sorted(unread)
    loaded = images.load_image_dataset({"source": source, **unread})
    for split in ("pretrain", "probe_train", "test"):
      np.testing.assert_array_equal(getattr(loaded, split).images,
                                    getattr(plain, split).images)
      np.testing.assert_array_equal(getattr(loaded, split).labels,
                                    getattr(plain, split).labels)
