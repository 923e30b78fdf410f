r"""Fashion-MNIST (full, 60k/10k, from the Debian package): ResNet-18 + ADNCE, honest small-scale runs.

Command:
  sudo apt-get install dataset-fashion-mnist        # once; `make install` tries it too
  python -m cldro_jax.main --config=configs/fashion_mnist.py --workdir=workdirs/fmnist_adnce
  # InfoNCE baseline: add --config.loss.name=infonce ; tiny smoke run: configs/fashion_mnist.py:runlocal

Images are 28x28 grayscale (repeated to 3 channels); views are RandomResizedCrop(28) with the
SimCLR colour pipeline (only brightness and contrast act on gray images); normalisation with the
Fashion-MNIST mean/std. Sized for a GPU: 100 epochs of 234 steps (a few minutes on an H200);
on a 2-core CPU use the quick start or `--config.data.train_per_class=500`.

Expected: not yet measured at this size (no GPU run recorded); docs/results.md holds the runs we
made on CPU and how far they got. A linear probe on the untrained encoder is the floor to beat
(`--config.eval.untrained_baseline=True` reports it next to the trained score).
"""

from cldro_jax import config_defaults


def get_config(arg=None):
  arg = config_defaults.parse_arg(arg, runlocal=False)
  config = config_defaults.base_config("image")
  config.seed = 2023
  config.data.source = "fashion_mnist"
  config.batch_size = 256
  config.total_epochs = 100
  config.loss.name = "adnce"
  config.loss.temperature = 0.2
  config.loss.mu = 0.7
  config.loss.sigma = 1.0
  config.optim.name = "adam"
  config.optim.lr = 1e-3
  config.optim.weight_decay = 1e-6
  config.model.name = "resnet18"
  config.model.stem = "cifar"
  config.augment.crop_size = 28
  config.augment.mean = (0.2860,) * 3
  config.augment.std = (0.3530,) * 3
  config.eval.every_epochs = 5
  config.eval.linear_probe = "features"
  config.eval.untrained_baseline = True
  if arg.runlocal:
    config_defaults.make_runlocal(config)
    config.data.train_per_class = 8
    config.data.test_per_class = 8
  return config
