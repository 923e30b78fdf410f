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


@pytest.mark.parametrize("domain", ["image", "sentence", "graph"])
def test_the_loop_reads_nothing_back_between_log_lines(tmp_path, monkeypatch, domain):
  """A value read back from the device every step (a `float(loss)`, an `np.asarray` of a
  metric) makes the host wait for each step, and the accelerator for the host. The transfer
  guard cannot see those on a CPU (device and host memory are the same), so this counts them:
  every first read of a device array's value goes through `ArrayImpl._value`."""
  from jax._src import array as array_lib  # pylint: disable=import-outside-toplevel
  steps_run, reads_at = [0], []
  value = array_lib.ArrayImpl._value  # pylint: disable=protected-access

  def counted(self):
    reads_at.append(steps_run[0])
    return value.fget(self)

  loop = train._loop  # pylint: disable=protected-access

  def counting_loop(config, task, state, train_step, *args, **kwargs):
    def step(state, batch):
      steps_run[0] += 1
      return train_step(state, batch)
    with monkeypatch.context() as patch:
      patch.setattr(array_lib.ArrayImpl, "_value", property(counted))
      return loop(config, task, state, step, *args, **kwargs)

  monkeypatch.setattr(train, "_loop", counting_loop)
  overrides = {"total_steps": 6, "log_every_steps": 3, "checkpoint_every_steps": 100}
  if domain == "image":
    config = image_config(**overrides)
  elif domain == "sentence":
    config = sentence_config(tmp_path, **overrides)
  else:
    config = mutag_config(**overrides)
  train.train_and_evaluate(config, str(tmp_path / "run"))
  assert steps_run[0] == 6
  # Reads only at the log steps (the metrics line; at the last one also the final checkpoint
  # and the evaluation), none after steps 1, 2, 4, 5.
  assert reads_at and set(reads_at) <= {3, 6}, sorted(set(reads_at))
