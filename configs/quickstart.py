r"""Quick start: a small ResNet pre-trained with ADNCE on Fashion-MNIST images shipped in the package.

Command (the README's main job; no download, a few minutes on 2 CPU cores):
  python -m cldro_jax.main --config=configs/quickstart.py --workdir=workdirs/quickstart

It prints the linear-probe accuracy of the trained encoder next to the identical probe on the
untrained encoder (same seed, same protocol: a linear layer on frozen features).
Expected: the trained encoder wins by several points (tests/test_quickstart.py checks >= 2 points
on average over 3 seeds on this exact config).
"""

from cldro_jax import config_defaults


def get_config(arg=None):
  arg = config_defaults.parse_arg(arg, seed=0, runlocal=False)
  config = config_defaults.base_config("image")
  config.seed = arg.seed
  config.data.source = "fashion_mnist_subset"
  config.data.train_per_class = 200
  config.batch_size = 128
  config.total_epochs = 10
  config.log_every_steps = 5
  config.checkpoint_every_steps = 50
  config.loss.name = "adnce"
  config.loss.temperature = 0.2
  config.loss.mu = 0.7
  config.loss.sigma = 1.0
  config.optim.lr = 1e-3
  config.model.name = "resnet18"
  config.model.width = 8
  config.model.head_hidden = 64
  config.model.head_out = 32
  config.augment.crop_size = 28
  config.augment.mean = (0.2860,) * 3   # Fashion-MNIST statistics; gray is repeated to RGB
  config.augment.std = (0.3530,) * 3
  config.eval.every_epochs = 5
  config.eval.batch_size = 500
  config.eval.linear_probe = "features"
  config.eval.linear_probe_epochs = 100
  config.eval.linear_probe_lr = 1e-2
  config.eval.untrained_baseline = True
  if arg.runlocal:
    config_defaults.make_runlocal(config)
  return config
