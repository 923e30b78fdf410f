"""cldro_jax.profiling: a profiled step's device time split by the trainer's named scopes.

Checked on real profiler traces of this machine's CPU backend (the GPU's kernels carry the same
`hlo_op`/`hlo_module` tags): the phase of an op_name, every instruction of the real image train
step attributed to a phase, and a traced function whose phases' work differs ~30-fold, where the
split must follow the work."""
import pathlib

import jax
import jax.numpy as jnp
import pytest

from cldro_jax import profiling as op_profile


@pytest.mark.parametrize("op_name, phase", [
    ("jit(train_step)/jvp(model)/augment/vmap(jit(_uniform))/add", "augmentation"),
    ("jit(train_step)/jvp(model)/ContrastiveModel/encoder/layer1_0/conv1/conv_general_dilated",
     "encoder forward"),
    ("jit(train_step)/transpose(jvp(model))/ContrastiveModel/encoder/bn1/mul", "encoder backward"),
    ("jit(train_step)/jvp()/loss/reduce_max", "loss forward"),
    ("jit(train_step)/transpose(jvp())/loss/add_any", "loss backward"),
    ("jit(train_step)/jvp()/diagnostics/reduce_sum", "diagnostics"),
    ("jit(train_step)/transpose(jvp(online_probe))/dot_general", "online probe backward"),
    ("jit(train_step)/optimizer/mul", "optimizer"),
    ("jit(train_step)/add", op_profile.OTHER),
    ("jit(train_step)/jvp(ContrastiveModel)/encoder/lossy_layer/add", op_profile.OTHER),
    ("state.params['model']['encoder']['bn1']['scale']", None),
])
def test_phase_of_an_op_name(op_name, phase):
  assert op_profile.phase_of(op_name) == phase


def _compiled(fn, *args):
  compiled = jax.jit(fn).lower(*args).compile()
  return compiled, compiled.as_text()


def _two_phase_step(x, w):
  """Forward and backward of a heavy "model" (8 matmuls of 256x256 on 256 rows) feeding a light
  "loss" (one pass over 256x256 numbers): the model does ~30x the loss's work, and the
  "optimizer" a single tiny update."""
  def objective(w):
    with jax.named_scope("model"):
      h = x
      for _ in range(8):
        h = jnp.tanh(h @ w)
    with jax.named_scope("loss"):
      return jnp.mean(h * h)
  g = jax.grad(objective)(w)
  with jax.named_scope("optimizer"):
    return w - 0.1 * g


def test_the_split_follows_the_work(tmp_path):
  x = jax.random.normal(jax.random.PRNGKey(0), (256, 256))
  w = jax.random.normal(jax.random.PRNGKey(1), (256, 256)) / 16
  compiled, text = _compiled(_two_phase_step, x, w)
  profile = op_profile.profile_compiled(lambda: compiled(x, w), text, str(tmp_path), steps=4)
  assert pathlib.Path(profile.trace_file).is_file() and profile.events >= 4
  assert op_profile.UNATTRIBUTED not in profile.phase_ns   # every timed operation is known
  total = sum(profile.phase_ns.values())
  model = profile.phase_ns["encoder forward"] + profile.phase_ns["encoder backward"]
  assert model / total > 0.8, profile.phase_ns
  assert profile.phase_ns["encoder backward"] > profile.phase_ns["encoder forward"]  # 2x matmuls
  assert profile.phase_ns.get("optimizer", 0.0) < 0.1 * total
  table = op_profile.format_tables(profile, step_wall_ms=1.0)
  assert "| encoder backward |" in table and "heaviest" in table
  # Per-instruction and per-phase sums are the same time.
  assert sum(profile.op_ns.values()) == pytest.approx(total)


def test_a_module_traced_beside_others_counts_only_its_own_kernels(tmp_path):
  x = jnp.ones((128, 128))
  w = jnp.ones((128, 128)) / 128
  compiled, text = _compiled(_two_phase_step, x, w)
  other = jax.jit(lambda a: jnp.sin(a @ a @ a))

  def run_both():
    jax.block_until_ready(other(x))   # another program's kernels in the same trace
    return compiled(x, w)

  alone = op_profile.profile_compiled(lambda: compiled(x, w), text, str(tmp_path / "a"), steps=2)
  both = op_profile.profile_compiled(run_both, text, str(tmp_path / "b"), steps=2)
  assert both.events == alone.events   # same kernels, none of the other module's
  assert op_profile.UNATTRIBUTED not in both.phase_ns


def test_every_instruction_of_the_image_train_step_has_its_phase():
  """The real trainer step (tiny ResNet-18, augmentation, ADNCE in shard_map, online probe,
  Adam): its named scopes reach the compiled module, so the split needs no guessing."""
  # pylint: disable=import-outside-toplevel
  from cldro_jax import train
  from cldro_jax.tasks import image as image_task
  from helpers import tiny_image_config

  config = tiny_image_config(**{"eval.online_probe": True})
  mesh = train.make_mesh(1)
  task = image_task.ImageTask(config, mesh)
  schedule = train.make_schedule(config.optim, config.total_steps, task.steps_per_epoch)
  tx = train.make_full_optimizer(config, schedule)
  with jax.set_mesh(mesh):
    state = train.initial_state(task, config, tx, mesh)
    batch = task.to_global(next(task.train_batches(start_step=0, num_steps=1)))
    text = jax.jit(train.make_train_step(task, config, tx, schedule, mesh)).lower(
        state, batch).compile().as_text()
  instructions = op_profile.parse_hlo(text)
  phases = {ins.phase for ins in instructions.values()}
  assert {"augmentation", "encoder forward", "encoder backward", "loss forward",
          "loss backward", "diagnostics", "online probe forward", "online probe backward",
          "optimizer"} <= phases
  convolutions = [ins for ins in instructions.values() if ins.kind == "convolution"]
  assert convolutions and all(ins.phase.startswith("encoder ") for ins in convolutions)
  assert op_profile.module_name(text) == "jit_train_step"


class _Event:
  def __init__(self, name, duration_ns, **stats):
    self.name, self.duration_ns, self.stats = name, duration_ns, list(stats.items())


class _Line:
  def __init__(self, name, events):
    self.name, self.events = name, events


class _Plane:
  def __init__(self, name, lines):
    self.name, self.lines = name, lines


class _Trace:
  def __init__(self, planes):
    self.planes = planes


def test_a_gpu_shaped_trace_counts_each_stream_kernel_once():
  """The GPU layout of a trace, which this machine cannot record: CUPTI kernels on the stream
  lines of each /device:GPU plane ("Stream #N(Kernel,...)", or a stream the tracer renamed
  "CUPTI overhead"), tagged with hlo_op/hlo_module by XLA's annotations; lines xprof derives
  ("XLA Ops") repeat them. Each kernel is counted once, by its instruction's phase, per device
  (the mean of two GPUs); a kernel known only by name (fusion_3 for fusion.3) is matched too;
  other modules are left out; untagged device work (the next batch's host-to-device copy) is
  outside the step, not in its total; a tagged kernel naming no instruction is unattributed."""
  x = jnp.ones((64, 64))
  _, text = _compiled(_two_phase_step, x, x)
  instructions = op_profile.parse_hlo(text)
  module = op_profile.module_name(text)
  by_phase = {}
  for ins in instructions.values():
    if ins.name[-1].isdigit() and "." in ins.name:
      by_phase.setdefault(ins.phase, ins.name)
  forward, backward = by_phase["encoder forward"], by_phase["encoder backward"]
  optimizer = by_phase["optimizer"]

  def gpu(index, scale):
    kernels = [
        _Event("sm90_xmma_gemm", 3000 * scale, hlo_op=forward, hlo_module=module),
        _Event("sm90_xmma_gemm", 5000 * scale, hlo_op=backward, hlo_module=module),
        _Event(optimizer.replace(".", "_"), 700 * scale),      # no annotation: named after it
        _Event("other_kernel", 9000, hlo_op=forward, hlo_module="jit_something_else"),
        _Event("MemcpyH2D", 300 * scale),                      # the next batch, untagged
        _Event("loop_fusion", 50 * scale, hlo_op="fusion.999", hlo_module=module),
    ]
    return _Plane(f"/device:GPU:{index}", [
        _Line("Stream #13(Kernel,MemcpyH2D)", kernels[:1] + kernels[3:]),
        _Line("CUPTI overhead", kernels[1:3]),     # a stream renamed by the tracer
        _Line("XLA Ops", kernels), _Line("XLA Modules", [_Event(module, 10**5)])])

  trace = _Trace([
      _Plane("/host:CPU", [_Line("python", [_Event("step", 10**6, hlo_op=forward)])]),
      gpu(0, 1), gpu(1, 3)])
  profile = op_profile.split_trace(trace, text, steps=2)
  assert profile.phase_ns == {"encoder forward": 12000.0, "encoder backward": 20000.0,
                              "optimizer": 2800.0, op_profile.UNATTRIBUTED: 200.0,
                              op_profile.OUTSIDE: 1200.0}
  assert profile.devices == 2 and profile.events == 8
  assert profile.unmatched_examples == ["fusion.999"]
  # per step (2) and per device (2); the copies outside the step are not in it
  assert profile.device_ms_per_step == pytest.approx(35000 / 2 / 2 / 1e6)
  table = op_profile.format_tables(profile, 1.0)
  assert "mean of 2 devices" in table and f"| {op_profile.OUTSIDE} | 0.000 | not in" in table
  assert "WARNING" not in table


def test_operations_of_a_gradient_are_backward_and_a_lost_backward_pass_is_flagged():
  """An instruction without op_name takes its operands' phase; one that reads a gradient is
  backward work even when most of its operands are forward activations. A split that finds no
  backward time (a changed op_name format) says so in the table."""
  text = "\n".join([
      "HloModule jit_train_step, entry_computation_layout={()->()}",
      "ENTRY %main (p0: f32[8,8], p1: f32[8,8]) -> f32[8,8] {",
      '  %a = f32[8,8]{1,0} add(f32[8,8]{1,0} %p0, f32[8,8]{1,0} %p0), '
      'metadata={op_name="jit(train_step)/jvp(model)/Conv_0/add"}',
      '  %b = f32[8,8]{1,0} multiply(f32[8,8]{1,0} %p0, f32[8,8]{1,0} %p1), '
      'metadata={op_name="jit(train_step)/jvp(model)/Conv_0/mul"}',
      '  %g = f32[8,8]{1,0} negate(f32[8,8]{1,0} %p1), '
      'metadata={op_name="jit(train_step)/transpose(jvp(model))/Conv_0/neg"}',
      "  ROOT %w = f32[8,8]{1,0} custom-call(f32[8,8]{1,0} %a, f32[8,8]{1,0} %b, "
      'f32[8,8]{1,0} %g), custom_call_target="__cudnn$convBackwardFilter"',
      "}"])
  instructions = op_profile.parse_hlo(text)
  assert instructions["w"].phase == "encoder backward"
  assert instructions["a"].phase == "encoder forward"
  assert instructions["w"].kind == "custom-call __cudnn$convBackwardFilter"
  forward_only = op_profile.Profile(
      steps=1, phase_ns={"encoder forward": 5e6}, op_ns={"a": 5e6}, instructions=instructions,
      events=1, unmatched_examples=[], trace_file="t")
  table = op_profile.format_tables(forward_only, 6.0)
  assert "WARNING: no encoder backward time" in table
  assert "jit(train_step)/jvp(model)/Conv_0/add" in table


def test_the_trainer_profiles_its_own_steps_without_changing_them(tmp_path):
  """`--config.profile_steps=2`: steps 4-5 of the tiny quick-start run are traced into
  WORKDIR/profile, their phases written beside the trace, and the run's parameters are bitwise
  those of the same run unprofiled."""
  # pylint: disable=import-outside-toplevel
  from cldro_jax import train
  from helpers import assert_trees_close, saved_arrays, tiny_image_config

  plain, profiled = tmp_path / "plain", tmp_path / "profiled"
  train.train_and_evaluate(tiny_image_config(total_steps=6), str(plain))
  train.train_and_evaluate(tiny_image_config(total_steps=6, profile_steps=2), str(profiled))
  assert_trees_close(saved_arrays(str(plain))[0], saved_arrays(str(profiled))[0], rtol=0, atol=0)
  (folder,) = (profiled / "profile").iterdir()
  assert folder.name == "steps4-5-process0" and list(folder.rglob("*.xplane.pb"))
  report = (folder / "phases.md").read_text()
  assert report.startswith("Steps 4-5: where the train step's device time goes")
  for phase in ("augmentation", "encoder forward", "encoder backward", "loss forward",
                "optimizer"):
    assert f"| {phase} |" in report
  assert op_profile.UNATTRIBUTED not in report and "profile failed" not in report


def test_a_profiler_that_cannot_start_costs_the_profile_not_the_run(tmp_path, monkeypatch):
  # pylint: disable=import-outside-toplevel
  from cldro_jax import train
  from helpers import tiny_image_config

  def no_tracer(*args, **kwargs):
    raise RuntimeError("no CUPTI on this machine (stand-in)")
  monkeypatch.setattr(jax.profiler, "start_trace", no_tracer)
  results = train.train_and_evaluate(tiny_image_config(total_steps=4, profile_steps=1),
                                     str(tmp_path))
  assert results["step"] == 4
  assert not list((tmp_path / "profile").rglob("phases.md"))


def test_a_window_longer_than_the_run_is_skipped_with_the_numbers_that_do_not_fit(tmp_path,
                                                                                  capsys):
  # pylint: disable=import-outside-toplevel,protected-access
  import ml_collections
  from cldro_jax import train
  window = train._ProfileWindow(ml_collections.ConfigDict({"profile_steps": 1000}), str(tmp_path),
                                start_step=2, total_steps=6)
  assert not window.enabled
  assert ("config.profile_steps=1000: this start has 4 steps, fewer than the 3 warm-up steps "
          "plus the 1000 traced ones; nothing is profiled") in capsys.readouterr().err
  assert train._ProfileWindow(ml_collections.ConfigDict({"profile_steps": 1}), str(tmp_path),
                              start_step=2, total_steps=6).enabled    # 3 + 1 <= 4 steps
