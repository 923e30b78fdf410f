"""Command line: pre-train with a contrastive loss, then evaluate.

  python -m cldro_jax.main --config=configs/stl10.py --workdir=DIR \
      [--config.loss.name=adnce --config.optim.lr=3e-4 ...]

Rerunning the same command resumes from the last checkpoint in DIR. Scores go to DIR/results.json.
"""

import json

from absl import app
from absl import flags
from ml_collections import config_flags

from cldro_jax import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  results = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  print(json.dumps(results, indent=2, sort_keys=True))


if __name__ == "__main__":
  app.run(main)
