r"""CIFAR-10: ResNet-50 (CIFAR stem) + ADNCE, the paper's recipe, then the reference linear probe.

Command:
  python -m cldro_jax.main --config=configs/cifar10.py --workdir=workdirs/cifar10_adnce
  # InfoNCE baseline: add --config.loss.name=infonce
  # DCL / HCL at their own default temperature (their papers' anchors use t=0.5):
  #   add --config.loss.name=dcl|hcl --config.loss.temperature=0.5
  # The kNN monitor and online probe report every epoch (about 20% of the training time here);
  # --config.eval.every_epochs=100 monitors as rarely as the reference does.
  # tiny smoke run (tests): --config=configs/cifar10.py:runlocal

Data: tfds `cifar10` prepared as array_record in --config.data.data_dir (needs the internet and
TensorFlow once: see README, "Data").

Expected (paper, Table 1; 400 epochs, batch 256, linear probe top-1 on the test set):
  InfoNCE 91.19, ADNCE 91.88. Hyperparameters (the authors' scripts; docs/reproducing.md):
  t=0.4, mu=0.7, sigma=0.5.
"""

from cldro_jax import config_defaults


def get_config(arg=None):
  arg = config_defaults.parse_arg(arg, runlocal=False)
  config = config_defaults.base_config("image")
  config.seed = 2023
  config.data.source = "tfds"
  config.data.name = "cifar10"
  config.batch_size = 256
  config.total_epochs = 400
  config.loss.name = "adnce"
  config.loss.temperature = 0.4
  config.loss.mu = 0.7
  config.loss.sigma = 0.5
  config.optim.name = "adam"
  config.optim.lr = 1e-3
  config.optim.weight_decay = 1e-6
  config.optim.schedule = "constant"
  config.model.name = "resnet50"
  config.model.stem = "cifar"
  config.model.stem_init = "conv_default"   # the reference's replaced stem keeps torch's default
  config.augment.crop_size = 32
  config.eval.linear_probe = "reference"
  config.eval.linear_probe_epochs = 100
  if arg.runlocal:
    config_defaults.make_runlocal(config)
  return config
