r"""STL-10: ResNet-50 + ADNCE on 32x32 crops of train+unlabeled, linear probe at 96x96.

Command:
  python -m cldro_jax.main --config=configs/stl10.py --workdir=workdirs/stl10_adnce
  # InfoNCE baseline: add --config.loss.name=infonce ; tiny smoke run: configs/stl10.py:runlocal
  # DCL / HCL at their own default temperature (the anchors below use t=0.5):
  #   add --config.loss.name=dcl|hcl --config.loss.temperature=0.5
  # The kNN monitor and online probe report every epoch (about 20% of the training time here);
  # --config.eval.every_epochs=100 monitors as rarely as the reference does.

As the reference: pre-training takes RandomResizedCrop(32) views of the 96x96 images of
`train+unlabeled` (105k images); the kNN bank and the linear probe use the labelled `train` split;
the probe trains on 32x32 augmented crops and is tested on whole 96x96 test images (the encoder is
fully convolutional). Change --config.augment.crop_size / --config.eval.probe_image_size to
deviate.

Data: tfds `stl10` prepared as array_record in --config.data.data_dir (see README, "Data").

Expected: the paper reports ADNCE above InfoNCE on STL10 with t=0.2, mu=0.8, sigma=1.0
(docs/reproducing.md); peer anchors with the same code base: DCL 84.26, HCL 87.44 (linear probe
top-1).
"""

from cldro_jax import config_defaults


def get_config(arg=None):
  arg = config_defaults.parse_arg(arg, runlocal=False)
  config = config_defaults.base_config("image")
  config.seed = 2023
  config.data.source = "tfds"
  config.data.name = "stl10"
  config.data.pretrain_split = "train+unlabelled"
  config.data.probe_split = "train"
  config.data.test_split = "test"
  # The 100k unlabelled images (2.8 GB decoded) are held in RAM like the other splits: above the
  # default 1 GB they were decoded from PNG on every batch (about 95% of each batch's images),
  # host work the GPU would wait for. A host with little RAM: --config.data.in_memory_max_mb=1024.
  config.data.in_memory_max_mb = 4096
  config.batch_size = 256
  config.total_epochs = 400
  config.loss.name = "adnce"
  config.loss.temperature = 0.2
  config.loss.mu = 0.8
  config.loss.sigma = 1.0
  config.optim.name = "adam"
  config.optim.lr = 1e-3
  config.optim.weight_decay = 1e-6
  config.model.name = "resnet50"
  config.model.stem = "cifar"
  config.model.stem_init = "conv_default"   # the reference's replaced stem keeps torch's default
  config.augment.crop_size = 32
  config.eval.probe_image_size = 96
  config.eval.linear_probe = "reference"
  if arg.runlocal:
    config_defaults.make_runlocal(config)
  return config
