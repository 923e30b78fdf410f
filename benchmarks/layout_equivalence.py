r"""How closely 8 CPU devices reproduce 1 device, step by step (the check docs/scaling.md cites).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/layout_equivalence.py

Runs the tiny quick-start training of tests/test_train_image.py for 2 steps with plain SGD (lr
0.1, no momentum, no weight decay: the update is lr times the gradient), checkpointing every step,
in four layouts: 1 or 8 devices, a pass per view or both views in one pass. Prints, against the
1-device pass-per-view run, the largest per-parameter difference after step 1 (relative to lr
times the gradient's size) and the largest per-parameter relative difference of step 2's gradient.
"""

import os
import sys
import tempfile

import jax
import numpy as np

sys.path[:0] = [os.path.join(os.path.dirname(__file__), "..", "tests"),
                os.path.join(os.path.dirname(__file__), "..")]
from cldro_jax import train  # noqa: E402
from helpers import LINEAR_OPTIMIZER, saved_arrays  # noqa: E402
from test_train_image import tiny_config  # noqa: E402

LAYOUTS = {"1 device, pass per view": {"mesh.num_devices": 1},
           "8 devices, pass per view": {"mesh.num_devices": 8},
           "1 device, one pass": {"mesh.num_devices": 1, "model.views_in_one_pass": True},
           "8 devices, one pass": {"mesh.num_devices": 8, "model.views_in_one_pass": True}}


def main():
  lr = LINEAR_OPTIMIZER["optim.lr"]
  params = {}
  with tempfile.TemporaryDirectory() as root:
    for i, (name, layout) in enumerate(LAYOUTS.items()):
      workdir = os.path.join(root, str(i))
      train.train_and_evaluate(
          tiny_config(total_steps=2, checkpoint_every_steps=1, **LINEAR_OPTIMIZER, **layout),
          workdir)
      params[name] = [jax.tree.leaves(jax.tree.map(lambda a: np.asarray(a, np.float64),
                                                   saved_arrays(workdir, s)[0]["params"]["model"]))
                      for s in (1, 2)]
  ref_name = next(iter(LAYOUTS))
  ref = params[ref_name]
  ref_grad2 = [(a - b) / lr for a, b in zip(*ref)]
  print(f"# {jax.__version__}, reference: {ref_name}")
  print("| layout | step 1 params: max diff / (lr |g|) | step 2 gradient: max relative diff |")
  print("|---|---:|---:|")
  for name in list(LAYOUTS)[1:]:
    step1 = max(np.linalg.norm(a - b) / (lr * np.linalg.norm(g))
                for a, b, g in zip(ref[0], params[name][0], ref_grad2))
    grad2 = [(a - b) / lr for a, b in zip(*params[name])]
    step2 = max(np.linalg.norm(g - h) / np.linalg.norm(g) for g, h in zip(ref_grad2, grad2))
    print(f"| {name} | {step1:.1e} | {step2:.1e} |")


if __name__ == "__main__":
  main()
