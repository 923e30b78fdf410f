"""The trainer's jitted step moves no data implicitly (big_vision's habit: a hidden host sync or
host-to-device copy per step stalls an accelerator and no CPU test would notice otherwise).

The real loop of `train.train_and_evaluate` runs with its step wrapped in
`jax.transfer_guard("disallow")`: any implicit transfer of the step's inputs or outputs (a
NumPy batch, a Python scalar argument, a value read back inside it) raises. Batches reach the
step through the task's explicit `to_global`, metrics leave it through `jax.device_get` on log
steps only, both outside the guard, as in the loop.
"""
import jax
import pytest

from cldro_jax import train
from test_train_graph import mutag_config
from test_train_image import tiny_config as image_config
from test_train_sentence import tiny_config as sentence_config


@pytest.fixture
def guarded_steps(monkeypatch):
  calls = []
  loop = train._loop  # pylint: disable=protected-access

  def guarded_loop(config, task, state, train_step, *args, **kwargs):
    def step(state, batch):
      with jax.transfer_guard("disallow"):
        out = train_step(state, batch)
        jax.block_until_ready(out)
      calls.append(1)
      return out
    return loop(config, task, state, step, *args, **kwargs)

  monkeypatch.setattr(train, "_loop", guarded_loop)
  return calls


@pytest.mark.parametrize("domain", ["image", "sentence", "graph"])
def test_train_steps_make_no_implicit_transfers(tmp_path, guarded_steps, domain):
  if domain == "image":
    config = image_config(**{"eval.online_probe": True, "mesh.num_devices": 2})
  elif domain == "sentence":
    config = sentence_config(tmp_path, **{"mesh.num_devices": 2})
  else:
    config = mutag_config(**{"mesh.num_devices": 2})
  config.total_steps = 3
  train.train_and_evaluate(config, str(tmp_path / "run"))
  assert len(guarded_steps) == 3
