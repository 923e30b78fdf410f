"""The one trainer: contrastive pre-training on a device mesh, then the domain's evaluation.

`train_and_evaluate(config, workdir)` is the importable entry point (`cldro_jax.main` is a thin
command-line wrapper). What differs between images, sentences and graphs (data, model, views,
evaluators) lives in a `Task` (`cldro_jax/tasks/`); everything else is here:

  mesh over all devices (axis "data")  ->  global batch sharded over "data", parameters replicated
  one jitted, donated train step: task.forward -> two views' projections -> the loss inside
  `jax.shard_map` with negatives gathered from every device -> optimizer update (+ online probe)
  progress bar, JSON-lines + TensorBoard metrics, orbax checkpoints, resume, NaN guard
  per-epoch monitor (kNN / online probe) and the final evaluation -> `results.json`
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import signal
import socket
import sys
import threading
import time
from typing import Any, Callable

try:
  import fcntl   # the workdir lock; POSIX only
except ImportError:  # pragma: no cover
  fcntl = None

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from cldro_jax import checkpointing
from cldro_jax import config_defaults
from cldro_jax import distributed
from cldro_jax import logs
from cldro_jax import losses
from cldro_jax import metrics as metrics_lib
from cldro_jax import profiling
from cldro_jax import tasks as tasks_lib

AXIS = "data"


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or inf; the run stops and keeps its last good checkpoint."""


class ConfigError(ValueError):
  """A setting, or the data it points at, that cannot be used (a batch that does not divide
  over the devices, a URL workdir, a corrupt or mis-shaped dataset); found before any training,
  the message names the problem and the fix."""


class WorkdirInUseError(RuntimeError):
  """Another run (a second terminal, a requeued job whose predecessor still runs) trains in the
  same workdir."""


class PreemptedError(RuntimeError):
  """The run was asked to stop (SIGTERM, a preemption notice, Ctrl-C) and saved a checkpoint
  first. `exit_code`: what the command line exits with (128 + the signal: 143, or 130 for
  Ctrl-C)."""

  def __init__(self, message: str, exit_code: int = 143):
    super().__init__(message)
    self.exit_code = exit_code


class _ProfileWindow:
  """`config.profile_steps`: traces that many steps of this start with jax.profiler (after a few
  warm-up steps, so that the compilation stays out) into WORKDIR/profile/, then prints where the
  step's device time went by phase (cldro_jax/profiling.py) and writes it beside the trace. A
  profiler that fails costs the table, never the run."""

  WARMUP_STEPS = 3   # the compiling first step and two more

  def __init__(self, config, workdir: str, start_step: int, total_steps: int):
    requested = int(config.get("profile_steps", 0))
    self.first = start_step + self.WARMUP_STEPS
    self.last = self.first + requested
    self.enabled = requested > 0
    if self.enabled and self.last > total_steps:
      message = (f"config.profile_steps={requested}: this start has "
                 f"{total_steps - start_step} steps, fewer than the {self.WARMUP_STEPS} warm-up "
                 f"steps plus the {requested} traced ones; nothing is profiled")
      logs.warn(message)
      self.enabled = False
    self.dir = os.path.join(workdir, "profile",
                            f"steps{self.first + 1}-{self.last}-process{jax.process_index()}")
    self.active = False
    self._before: set = set()
    self._start = 0.0

  def before_step(self, step: int, state) -> None:
    if self.enabled and step == self.first:
      jax.block_until_ready(state)   # the steps before stay out of the trace
      os.makedirs(self.dir, exist_ok=True)
      self._before = profiling.traces_in(self.dir)
      try:
        jax.profiler.start_trace(self.dir)
      except Exception as error:   # pylint: disable=broad-except
        # No tracer on this machine (a GPU without CUPTI, say): the run goes on unprofiled.
        logging.warning("config.profile_steps: the profiler did not start (%s: %s); "
                        "training goes on without a profile", type(error).__name__, error)
        self.enabled = False
        return
      self.active, self._start = True, time.perf_counter()

  def after_step(self, done: int, state, train_step, batch, bar) -> None:
    if not (self.active and done == self.last):
      return
    jax.block_until_ready(state)
    steps = self.last - self.first
    wall_ms = (time.perf_counter() - self._start) / steps * 1e3
    self.stop()
    try:
      # The executable that ran (lowering again finds it in the compilation cache): its text
      # names the instructions the trace timed.
      text = train_step.lower(state, batch).compile().as_text()
      table = profiling.format_tables(
          profiling.read_trace(self.dir, self._before, text, steps), wall_ms,
          wall_label="the profiled steps' own wall time (longer than unprofiled on a GPU)")
    except Exception as error:   # pylint: disable=broad-except
      table = f"(profile failed: {type(error).__name__}: {error})"
    report = (f"Steps {self.first + 1}-{self.last}: where the train step's device time goes\n\n"
              f"{table}\n")
    with open(os.path.join(self.dir, "phases.md"), "w", encoding="utf-8") as f:
      f.write(report)
    if jax.process_index() == 0:
      (bar.write if bar is not None else functools.partial(print, file=sys.stderr))(report)

  def stop(self) -> None:
    if self.active:
      self.active = False
      try:
        jax.profiler.stop_trace()
      except Exception as error:   # pylint: disable=broad-except
        logging.warning("config.profile_steps: stopping the profiler failed (%s: %s)",
                        type(error).__name__, error)


class _PreemptionWatch:
  """Notices a request to stop, so the loop can checkpoint at a step boundary and exit.

  One process: a SIGTERM handler (what schedulers and `kill` send before killing). Several
  processes: JAX's preemption sync point, which agrees on one step for every process (each must
  save the same step), as Cloud TPU and SLURM preemption notices arrive at different times.

  The ids reported to the sync point count this invocation's steps (1, 2, ...), not the global
  step. JAX answers a notice with the largest id reported so far plus one, so a notice that
  arrives before the first step (while a resumed run restores and compiles) names id 1, which
  global steps past the checkpoint would never meet: the notice would be swallowed and the job
  killed without a checkpoint. (Hence the Checkpointer's orbax manager reports nothing to that
  service: checkpointing._ManagerWithoutPreemptionReports.)

  `requested` says whether a stop was asked for (after the last step too: the run then stops
  after its final checkpoint, before the final evaluation, the same on every process).
  """

  def __init__(self):
    self.multiprocess = jax.process_count() > 1
    self.requested = False
    self.interrupted = False   # the stop came from Ctrl-C (SIGINT)
    self._calls = 0
    self._previous = {}
    if not self.multiprocess and threading.current_thread() is threading.main_thread():
      self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_signal)
      # Ctrl-C, once: the same orderly stop (the step's checkpoint, then exit); twice: at once.
      self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_interrupt)

  def _on_signal(self, signum, frame):  # pylint: disable=unused-argument
    self.requested = True

  def _on_interrupt(self, signum, frame):  # pylint: disable=unused-argument
    if self.interrupted:
      signal.signal(signal.SIGINT, signal.default_int_handler)
      raise KeyboardInterrupt
    self.requested = self.interrupted = True
    print("\ncldro_jax: Ctrl-C: saving a checkpoint after this step, then stopping (Ctrl-C again "
          "stops at once, losing the steps since the last checkpoint).", file=sys.stderr,
          flush=True)

  @property
  def reason(self) -> str:
    return "Ctrl-C" if self.interrupted else "SIGTERM or a preemption notice"

  @property
  def exit_code(self) -> int:
    return 130 if self.interrupted else 143

  def should_stop(self, step: int) -> bool:
    if not self.multiprocess:
      return self.requested
    del step   # see the class docstring: the ids count this invocation's steps
    self._calls += 1
    try:
      reached = multihost_utils.reached_preemption_sync_point(self._calls)
    except RuntimeError:   # no preemption service in this runtime: nothing to watch
      self.multiprocess = False
      return False
    self.requested = self.requested or reached
    return reached

  def close(self) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # int32 scalar: optimizer steps taken
  params: Any              # {"model": ..., "probe": ...}
  model_state: Any         # non-trainable collections, e.g. {"batch_stats": ...}
  opt_state: Any
  rng: jax.Array           # base key; step s uses fold_in(rng, s), so resume is exact
  finite: jax.Array        # bool scalar: every loss so far was finite


# ----------------------------------------------------------------------------------------------
# Mesh, optimizer, loss


def make_mesh(num_devices: int = -1) -> jax.sharding.Mesh:
  """A 1-D mesh over the first `num_devices` devices (all when -1), axis "data".

  Devices in process order (each process's together, as the data pipeline assumes: process p
  feeds global rows [p * local, (p + 1) * local)), whatever order the runtime lists them in.
  """
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  if num_devices > 0:
    if num_devices > len(devices):
      raise ConfigError(f"config.mesh.num_devices={num_devices}, but only {len(devices)} "
                        f"devices are visible; set --config.mesh.num_devices=-1 (all of them) or "
                        f"at most {len(devices)}.")
    if jax.process_count() > 1 and num_devices != len(devices):
      # The first N devices could leave some processes without a device, and each process
      # feeds its slice of the batch to its own devices.
      raise ConfigError(
          f"config.mesh.num_devices={num_devices} with {jax.process_count()} processes: a "
          f"multi-process run uses all {len(devices)} devices; set --config.mesh.num_devices=-1 "
          "(or start fewer processes / make fewer devices visible).")
    devices = devices[:num_devices]
  if jax.process_count() > 1:
    counts = np.bincount([d.process_index for d in devices], minlength=jax.process_count())
    if len(set(counts.tolist())) > 1:
      raise ConfigError(
          f"The processes of this run have different numbers of devices ({counts.tolist()}); "
          "each feeds an equal slice of the batch to its own devices. Give every process as "
          "many (--local_device_ids, CUDA_VISIBLE_DEVICES).")
  # Auto axes: the jitted step lets XLA propagate the batch sharding through the model.
  return jax.sharding.Mesh(np.asarray(devices), (AXIS,),
                           axis_types=(jax.sharding.AxisType.Auto,))


def make_schedule(optim: ml_collections.ConfigDict, total_steps: int,
                  steps_per_epoch: int) -> optax.Schedule:
  warmup = max(int(round(optim.warmup_epochs * steps_per_epoch)), 0)
  decay_steps = max(total_steps - warmup, 1)
  if optim.schedule == "constant":
    after_warmup = optax.constant_schedule(optim.lr)
  elif optim.schedule == "warmup_cosine":
    if warmup:
      return optax.warmup_cosine_decay_schedule(
          0.0, optim.lr, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1),
          end_value=optim.lr * optim.min_lr_ratio)
    # optax's alpha, computed as warmup_cosine_decay_schedule computes it
    alpha = optim.lr * optim.min_lr_ratio / optim.lr if optim.lr else 0.0
    after_warmup = optax.cosine_decay_schedule(optim.lr, decay_steps, alpha=alpha)
  elif optim.schedule == "linear_decay":   # SimCSE / transformers' default: lr -> 0 linearly
    after_warmup = optax.linear_schedule(optim.lr, 0.0, decay_steps)
  else:
    raise ValueError(f"Unknown schedule {optim.schedule!r}")
  if warmup == 0:   # no zero-step warm-up segment: optax warns about one (same values)
    return after_warmup
  return optax.join_schedules([optax.linear_schedule(0.0, optim.lr, warmup), after_warmup],
                              [warmup])


def _kernels_only(params: Any) -> Any:
  """True for the parameters with more than one axis (not biases, norm scales or offsets)."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(optim: ml_collections.ConfigDict,
                   schedule: optax.Schedule) -> optax.GradientTransformation:
  """adam (PyTorch-style coupled L2, the reference), adamw, lars, sgd."""
  chain = []
  if optim.grad_clip_norm > 0:
    chain.append(optax.clip_by_global_norm(optim.grad_clip_norm))
  if optim.name == "adam":
    # torch.optim.Adam(weight_decay=wd) adds wd * param to the gradient before the Adam moments.
    if optim.weight_decay:
      chain.append(optax.add_decayed_weights(optim.weight_decay))
    chain.append(optax.adam(schedule))
  elif optim.name == "adamw":
    # The Hugging Face Trainer (SimCSE's) exempts biases and LayerNorm weights from weight
    # decay: in BERT/RoBERTa exactly the 1-D parameters (embeddings and kernels are decayed).
    chain.append(optax.adamw(schedule, weight_decay=optim.weight_decay, mask=_kernels_only))
  elif optim.name == "lars":
    # As SimCLR's LARS: biases and BatchNorm parameters (the 1-D arrays) get neither weight
    # decay nor the trust ratio, only momentum SGD.
    kernels_only = _kernels_only
    chain.append(optax.lars(schedule, weight_decay=optim.weight_decay, momentum=optim.momentum,
                            weight_decay_mask=kernels_only, trust_ratio_mask=kernels_only))
  elif optim.name == "sgd":
    if optim.weight_decay:
      chain.append(optax.add_decayed_weights(optim.weight_decay))
    chain.append(optax.sgd(schedule, momentum=optim.momentum))
  else:
    raise ValueError(f"Unknown optimizer {optim.name!r}")
  return optax.chain(*chain)


def make_loss_fn(loss_cfg: ml_collections.ConfigDict, variant: str) -> Callable[..., jax.Array]:
  """`fn(z1, z2, valid, labels, axis_name) -> scalar` for `config.loss`: the registered
  objective `loss_cfg.name` (cldro_jax/losses/registry.py) with its hyperparameters bound."""
  objective = losses.get_objective(loss_cfg.name)
  bound = {key: loss_cfg[key] for key in objective.hyperparameters}
  if objective.takes_variant:
    bound["variant"] = variant
  if loss_cfg.block_size:
    bound["block_size"] = loss_cfg.block_size
  fn = functools.partial(objective.fn, **bound)

  def loss_fn(z1, z2, valid, labels, axis_name, **hyper):
    # `hyper` overrides bound hyperparameters per step (adaptive ADNCE's traced mu and sigma).
    return fn(z1, z2, valid=valid, labels=labels, axis_name=axis_name, **hyper)
  return loss_fn


def _global_loss_and_diagnostics(loss_cfg, variant, mesh, z1, z2, valid, labels):
  """The loss and its CL-DRO diagnostics with negatives gathered from every device.

  Inside `jax.shard_map` each device holds its rows of z1/z2; the loss gathers the others'
  (`axis_name`) and returns the global mean, so the result equals one big device.
  """
  loss_fn = make_loss_fn(loss_cfg, variant)
  adnce = loss_cfg.name == "adnce"
  adaptive = adnce and (loss_cfg.get("mu_rule", "fixed"), loss_cfg.get("sigma_rule", "fixed")) != (
      "fixed", "fixed")

  def local(z1, z2, valid, labels):
    # The precision is read when the dots are traced: every matmul of the loss, its gradient
    # and the diagnostics gets it, and none of the encoder's.
    with jax.default_matmul_precision(loss_cfg.matmul_precision):
      return local_at_precision(z1, z2, valid, labels)

  def local_at_precision(z1, z2, valid, labels):
    lab = labels if loss_cfg.use_labels else None
    mu, sigma = loss_cfg.mu, loss_cfg.sigma
    with jax.named_scope("loss"):
      if adaptive:   # adaptive ADNCE: this step's mu/sigma from its negatives (stop-gradient)
        mu, sigma = losses.adaptive_mu_sigma(
            z1, z2, mu=mu, sigma=sigma, mu_rule=loss_cfg.mu_rule,
            mu_quantile=loss_cfg.mu_quantile, sigma_rule=loss_cfg.sigma_rule,
            sigma_scale=loss_cfg.sigma_scale, variant=variant, valid=valid, labels=lab,
            axis_name=AXIS)
      loss = loss_fn(z1, z2, valid, lab, AXIS, **({"mu": mu, "sigma": sigma} if adaptive else {}))
    with jax.named_scope("diagnostics"):
      diag = losses.diagnostics(
          jax.lax.stop_gradient(z1), jax.lax.stop_gradient(z2),
          temperature=loss_cfg.temperature, mu=mu if adnce else None,
          sigma=sigma if adnce else None, variant=variant, valid=valid, labels=lab,
          axis_name=AXIS, block_size=loss_cfg.block_size or None)   # memory-bounded like the loss
    if adaptive:
      diag = dict(diag, adnce_mu=mu, adnce_sigma=sigma)
    return loss, diag

  spec = P(AXIS)
  return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, spec),
                       out_specs=(P(), P()))(z1, z2, valid, labels)


# ----------------------------------------------------------------------------------------------
# Train step


def _online_probe_loss(probe_params, features, labels):
  """Cross-entropy of a linear classifier on stop-gradient features (label < 0 = unlabelled)."""
  features = jax.lax.stop_gradient(features.astype(jnp.float32))
  logits = features @ probe_params["kernel"] + probe_params["bias"]
  mask = labels >= 0
  safe = jnp.where(mask, labels, 0)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
  count = jnp.maximum(mask.sum(), 1)
  loss = jnp.sum(jnp.where(mask, ce, 0.0)) / count
  acc = jnp.sum(jnp.where(mask, jnp.argmax(logits, -1) == safe, False)) / count
  return loss, acc


def evaluate_command(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The command that evaluates a run's latest checkpoint again (sentence runs have their own)."""
  if config.domain == "sentence":
    return f"python -m cldro_jax.evaluators.sts --workdir={workdir} --checkpoint=latest"
  return f"python -m cldro_jax.probe --workdir={workdir}"


def make_train_step(task: "tasks_lib.Task", config: ml_collections.ConfigDict, tx, schedule,
                    mesh) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  loss_cfg = config.loss
  variant = task.loss_variant

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    step_rng = jax.random.fold_in(state.rng, state.step)

    # The named scopes label the compiled step's operations by phase (model, its "augment"
    # part, loss, diagnostics, online_probe, optimizer): cldro_jax/profiling.py reads them to
    # split a profiled step's device time. They change no computation.
    def objective(params):
      with jax.named_scope("model"):
        out = task.forward(params["model"], state.model_state, batch, step_rng, train=True)
      loss, diag = _global_loss_and_diagnostics(
          loss_cfg, variant, mesh, out.z1, out.z2, out.valid, out.labels)
      total = loss
      aux = {"diag": diag}
      if "probe" in params:
        with jax.named_scope("online_probe"):
          probe_loss, probe_acc = _online_probe_loss(params["probe"], out.probe_features,
                                                     out.probe_labels)
        total = total + probe_loss   # the probe sees stop-gradient features: no encoder gradient
        aux.update(probe_loss=probe_loss, probe_acc=probe_acc)
      return total, (loss, out.model_state, aux)

    grads, (loss, model_state, aux) = jax.grad(objective, has_aux=True)(state.params)
    with jax.named_scope("optimizer"):
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads["model"])
    # A NaN can reach the parameters through the gradient while the loss still looks finite, or
    # through the update itself while the gradient is finite (an overflowing learning rate or
    # optimizer state): check the new parameters too, so that no checkpoint ever holds them.
    finite = (state.finite & jnp.isfinite(loss) & jnp.isfinite(grad_norm)
              & jnp.isfinite(optax.tree.norm(params)))
    new_state = state.replace(step=state.step + 1, params=params, model_state=model_state,
                              opt_state=opt_state, finite=finite)
    step_metrics = {"loss": loss, "lr": schedule(state.step), "grad_norm": grad_norm,
                    "finite": finite.astype(jnp.float32)}
    step_metrics.update({k: v for k, v in aux["diag"].items()})
    for key in ("probe_loss", "probe_acc"):
      if key in aux:
        step_metrics["online_" + key] = aux[key]
    return new_state, step_metrics

  return train_step


# ----------------------------------------------------------------------------------------------
# State creation and restoration


def model_init_key(seed: int) -> jax.Array:
  """The key that initialises the model's parameters.

  An RBG key, not threefry: initialising a ResNet draws one random tensor per layer, and XLA
  compiles threefry's unrolled rounds for each, several times slower on the CPU (7 s vs 2 s for a
  ResNet-18). Training randomness (augmentation, dropout) keeps the default threefry keys.
  """
  return jax.random.key(seed, impl="rbg")


def create_train_state(task, config, tx, rng) -> TrainState:
  probe_rng, state_rng = jax.random.split(rng)
  model_params, model_state = task.init(model_init_key(config.seed))
  params = {"model": model_params}
  if task.probe_shape is not None and config.get("eval", {}).get("online_probe", False):
    feature_dim, num_classes = task.probe_shape
    params["probe"] = {
        "kernel": jax.random.normal(probe_rng, (feature_dim, num_classes)) * 0.01,
        "bias": jnp.zeros((num_classes,))}
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                    opt_state=tx.init(params), rng=state_rng, finite=jnp.ones((), bool))


def initial_state(task, config, tx, mesh) -> TrainState:
  """The state before step 1, replicated over `mesh`: the same values on any mesh (a test checks
  1 vs 8 devices), so a run's starting point does not depend on where it runs."""
  init = jax.jit(functools.partial(create_train_state, task, config, tx),
                 out_shardings=NamedSharding(mesh, P()))
  return init(jax.random.PRNGKey(config.seed))


def make_full_optimizer(config, schedule):
  """The model's optimizer, and Adam for the online probe (as solo-learn's online classifier)."""
  model_tx = make_optimizer(config.optim, schedule)
  probe_lr = config.get("eval", {}).get("online_probe_lr", 1e-3)
  return optax.multi_transform(
      {"model": model_tx, "probe": optax.adam(probe_lr)},
      lambda params: {k: jax.tree.map(lambda _: k, v) for k, v in params.items()})


def steps_for(config, steps_per_epoch: int) -> int:
  if config.total_steps > 0:
    return int(config.total_steps)
  # Rounded first: 2.2 epochs of 25 steps is 55.00000000000001 in floating point, not 56 steps.
  return max(1, int(math.ceil(round(config.total_epochs * steps_per_epoch, 6))))


# ----------------------------------------------------------------------------------------------
# The loop


def _check_local_path(workdir: str) -> None:
  """Refuses a URL workdir before any work: config.json, metrics and TensorBoard are written
  through the local file system API, which would make a folder named "gs:" on each host's own
  disk and then fail at the first checkpoint (orbax sees a local path that is not one)."""
  scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", workdir)
  if scheme:
    raise ConfigError(
        f"--workdir={workdir} is a {scheme.group(1)}:// URL; the trainer writes through the local "
        "file system. Mount the bucket on every host (e.g. Cloud Storage FUSE: gcsfuse "
        "BUCKET /mnt/gcs) and pass the mounted path, e.g. --workdir=/mnt/gcs/runs/NAME "
        "(docs/scaling.md, \"Cloud TPU pod slice\").")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Pre-trains with the configured loss, evaluates, writes `results.json`; returns the results.

  Rerunning with the same workdir resumes from its last checkpoint.
  """
  config_defaults.validate_config(config)
  unused = config_defaults.unused_settings(config)
  if unused:
    logs.warn("these settings are not used by this run:\n  " + "\n  ".join(unused))
  _check_local_path(workdir)
  workdir = os.path.abspath(workdir)
  mesh = make_mesh(config.mesh.num_devices)
  # A multi-process mesh holds every process's devices, as many per process (make_mesh), so a
  # batch that divides over the mesh divides over the processes too.
  if config.batch_size % mesh.size:
    raise ConfigError(
        f"config.batch_size={config.batch_size} does not divide over the {mesh.size} devices of "
        f"the mesh. Use a multiple of {mesh.size} (e.g. --config.batch_size="
        f"{max(mesh.size, config.batch_size // mesh.size * mesh.size)}) or set "
        "--config.mesh.num_devices.")
  distributed.check_same_run(checkpointing.config_to_dict(config))
  distributed.check_workdir_shared(workdir)
  checkpointing.check_or_save_config(workdir, config, save=False)
  try:
    task = tasks_lib.build_task(config, mesh, workdir)
  except ConfigError:
    raise
  except ValueError as err:   # the data or a task setting: the message says what and the fix
    raise ConfigError(str(err)) from err
  steps_per_epoch = task.steps_per_epoch
  total_steps = steps_for(config, steps_per_epoch)
  _check_warmup(config.optim, total_steps, steps_per_epoch)
  _check_run_length(workdir, config, total_steps, steps_per_epoch)
  schedule = make_schedule(config.optim, total_steps, steps_per_epoch)
  tx = make_full_optimizer(config, schedule)

  replicated = NamedSharding(mesh, P())
  with jax.set_mesh(mesh), _workdir_lock(workdir):
    state = initial_state(task, config, tx, mesh)
    signature = checkpointing.parameter_signature(state.params["model"])

    checkpointer = checkpointing.Checkpointer(workdir, keep=config.keep_checkpoints)
    writer = None
    try:
      start_step = 0
      resuming = checkpointer.latest_step() is not None
      fingerprint = task.data_fingerprint()
      distributed.check_same_data(fingerprint, {"steps_per_epoch": steps_per_epoch,
                                                "monitor_every_steps": task.monitor_every_steps})
      if resuming:   # before config.json takes the new data path: a refusal changes nothing
        _check_same_data(checkpointer, fingerprint, workdir)
      if not resuming and config.init_from:   # checked before config.json is written, so that
        # a wrong source leaves no workdir that would refuse the corrected command
        state = _start_from_encoder(state, config.init_from, signature, task.model_name)
      if not resuming:
        checkpointing.check_or_save_config(workdir, config)
        resumed_log = {"pending": [], "collapsed_at": None, "reevaluate": False}
      else:
        # config.json takes the resumed run's new settings only once its checkpoint restored:
        # a refusal below (damaged, another model, past the end) changes nothing.
        state, meta = checkpointer.restore(state, expected_signature=signature)
        start_step = int(meta["step"])
        logging.info("Resumed from step %d in %s", start_step, workdir)
        if not bool(jax.device_get(state.finite)):
          raise NonFiniteLossError("The last checkpoint holds a non-finite state; start a new "
                                   "--workdir.")
        if start_step > total_steps:
          raise checkpointing.CheckpointMismatchError(
              f"The latest checkpoint in {workdir} is at step {start_step}, past this run's "
              f"{total_steps} steps. Nothing was changed. Raise --config.total_steps (or "
              f"total_epochs) to at least {start_step}, or evaluate that checkpoint: "
              f"{evaluate_command(config, workdir)}")
        checkpointing.check_or_save_config(workdir, config)
        finished, reevaluate = _finished_results(workdir, config, start_step, total_steps)
        if finished is not None:
          return finished
        resumed_log = {"pending": meta.get("log_pending", []),
                       "collapsed_at": meta.get("collapsed_at_step"), "reevaluate": reevaluate}

      train_step = jax.jit(make_train_step(task, config, tx, schedule, mesh),
                           donate_argnums=(0,), out_shardings=(replicated, replicated))
      writer = metrics_lib.MetricWriter(workdir, resume_step=start_step)
      # The config travels in every checkpoint too: a workdir whose config.json was lost gets
      # it back from there instead of accepting any config that builds the same shapes.
      meta_base = {"model": task.model_name, "parameter_signature": signature,
                   "config": checkpointing.config_to_dict(config),
                   "data_fingerprint": fingerprint}
      results = _loop(config, task, state, train_step, checkpointer, writer, mesh, start_step,
                      total_steps, meta_base, workdir, resumed_log)
    finally:
      # Also when the run stops on an error (NaN guard, bad data, Ctrl-C): finish the save in
      # flight, whose state was checked finite before it started, so that the last good
      # checkpoint is complete on disk rather than abandoned half-written at exit.
      try:
        if writer is not None:
          writer.close()
      finally:   # a metrics file that cannot be flushed (full disk) must not abandon the save
        checkpointer.close()
  return results


LOCK_FILE = ".cldro_jax.lock"


@contextlib.contextmanager
def _workdir_lock(workdir: str):
  """Holds an exclusive lock on the workdir for the run (process 0 of the job).

  Two runs in one workdir would rewrite each other's metrics files and delete each other's
  checkpoint saves in flight. The operating system releases the lock when the process ends,
  however it ends (kill -9 included), so a stale lock never blocks a resume. flock works on one
  machine and on file systems that carry it between hosts (most cluster file systems do).
  """
  if jax.process_index() != 0 or fcntl is None:   # (fcntl: POSIX only)
    yield
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE)
  handle = open(path, "a+", encoding="utf-8")  # pylint: disable=consider-using-with
  try:
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
      handle.seek(0)
      holder = handle.read().strip() or "another process"
      raise WorkdirInUseError(
          f"{workdir} is in use by another run ({holder}); two runs in one workdir would "
          "overwrite each other's checkpoints and metrics. Wait for it to end (rerunning the "
          "command then resumes where it stopped), stop it, or pass another --workdir.") from err
    handle.truncate(0)
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    yield
  finally:
    handle.close()   # releases the lock


def _check_same_data(checkpointer, fingerprint: str, workdir: str) -> None:
  """Refuses to resume on other pre-training data than the checkpoints were trained on.

  The data paths may change on resume (the same data, moved), but the data order and every
  batch are functions of the step and of the dataset: a different dataset behind the path
  would silently continue another experiment."""
  saved = checkpointer.read_meta().get("data_fingerprint")
  if saved is not None and saved != fingerprint:   # None: a checkpoint from before the digest
    raise checkpointing.CheckpointMismatchError(
        f"The pre-training data of this command differ from those the run in {workdir} was "
        f"trained on (data digest {fingerprint}, saved {saved}: another size or other examples "
        "at the same positions). Nothing was changed. The data paths may change on resume only "
        "to point at the same data in a new place; train on other data in a new --workdir.")


def _start_from_encoder(state: TrainState, source: str, signature: str,
                        model_name: str) -> TrainState:
  """`state` with the encoder (parameters and model state) of `source`'s latest checkpoint.

  The source must hold the same model (parameter signature); its values are cast to this run's
  dtypes and placed with this run's shardings. Optimizer, online probe, step and RNG stay fresh.
  """
  if not os.path.isdir(os.path.join(source, "checkpoints")):
    raise FileNotFoundError(
        f"config.init_from={source!r} has no checkpoints folder: it must be the --workdir of an "
        "earlier run (python -m cldro_jax.main --config=... --workdir=DIR), or '' for a fresh "
        "initialisation.")
  checkpointer = checkpointing.Checkpointer(source, read_only=True)
  try:
    if checkpointer.latest_step() is None:
      raise FileNotFoundError(f"config.init_from={source!r} holds no checkpoint yet.")
    raw, meta = checkpointer.restore_raw()
  finally:
    checkpointer.close()
  if meta.get("parameter_signature") != signature:
    raise checkpointing.CheckpointMismatchError(
        f"config.init_from={source!r} holds a {meta.get('model', '?')} encoder (parameter "
        f"signature {meta.get('parameter_signature')}); this config builds {model_name} "
        f"(signature {signature}). Nothing was changed. Point --config.init_from at a run of "
        "the same model, or give this run the source run's --config.model settings.")
  if not bool(np.asarray(raw["finite"])):
    raise NonFiniteLossError(f"config.init_from={source!r}: its last checkpoint holds a "
                             "non-finite state; use an earlier run.")

  def like(new, old):   # via NumPy: every process puts its own copy of the replicated value
    return jax.device_put(np.asarray(new).astype(old.dtype), old.sharding)

  params = dict(state.params, model=jax.tree.map(like, raw["params"]["model"],
                                                 state.params["model"]))
  model_state = jax.tree.map(like, raw["model_state"], state.model_state)
  logging.info("Encoder initialised from %s (step %s)", source, meta.get("step"))
  return state.replace(params=params, model_state=model_state)


def _check_warmup(optim, total_steps: int, steps_per_epoch: int) -> None:
  """A warm-up as long as the run never reaches its learning rate (nor decays from it)."""
  warmup = int(round(optim.warmup_epochs * steps_per_epoch))
  if warmup and warmup >= total_steps:
    raise ConfigError(
        f"config.optim.warmup_epochs={optim.warmup_epochs} is {warmup} steps ({steps_per_epoch} "
        f"per epoch), not shorter than the run's {total_steps} steps: the learning rate would "
        "still be rising when it ends. Lower --config.optim.warmup_epochs or lengthen the run.")


def _check_run_length(workdir, config, total_steps, steps_per_epoch):
  """A resumed run may change its length only under a constant learning rate: the decaying
  schedules are functions of the total, so a new total would give the remaining steps (and,
  from the resumed step on, the whole curve) other learning rates than the run planned."""
  if config.optim.schedule == "constant" or not checkpointing.has_checkpoints(workdir):
    return   # (no checkpoint: nothing to resume, the command starts afresh)
  saved = checkpointing.saved_config_or_none(workdir)   # config.json, or the checkpoint's copy
  if saved is None:
    return
  planned = steps_for(saved, steps_per_epoch)
  if planned != total_steps:
    raise checkpointing.CheckpointMismatchError(
        f"The run in {workdir} was planned for {planned} steps and its learning-rate schedule "
        f"({config.optim.schedule!r}) depends on that length; resuming it for {total_steps} steps "
        "would silently make it another experiment. Nothing was changed. Resume with the "
        "original --config.total_steps / total_epochs, or start the longer run in a new "
        "--workdir (runs with --config.optim.schedule=constant can be extended).")


def _evaluated_with(config) -> dict[str, Any]:
  """The settings the final scores depend on beyond the trained state: evaluation and data."""
  return {"eval": checkpointing.config_to_dict(config.eval),
          "data": checkpointing.config_to_dict(config.data)}


def _finished_results(workdir, config, start_step,
                      total_steps) -> tuple[dict[str, Any] | None, bool]:
  """(stored results, False) for a run that is already complete, when rerunning its command
  would only evaluate it again the same way; (None, reevaluate) when there is work to do, where
  `reevaluate` says that a complete run is evaluated again with other settings.

  An evaluation with other settings replaces results.json, after keeping the old file as
  results.previous-<k>.json."""
  path = os.path.join(workdir, "results.json")
  if start_step != total_steps or not os.path.exists(path):
    return None, False
  try:
    with open(path, encoding="utf-8") as f:
      stored = json.load(f)
  except ValueError:   # unreadable (written by a version that did not write it atomically)
    logging.warning("%s is unreadable; evaluating the run again", path)
    stored = {}
  if not isinstance(stored, dict):
    stored = {}
  if stored.get("step") == total_steps and stored.get("evaluated_with") == _evaluated_with(config):
    logging.info("%s is complete (step %d); its results are in %s", workdir, total_steps, path)
    if jax.process_index() == 0:
      print(f"The run in {workdir} is already complete (step {total_steps}); results from {path}. "
            "(Evaluation or data settings that differ from the stored ones evaluate it again.)",
            flush=True)
    return stored, False
  multihost_utils.sync_global_devices("read finished results")
  if jax.process_index() == 0:
    k = 1
    while os.path.exists(os.path.join(workdir, f"results.previous-{k}.json")):
      k += 1
    os.replace(path, os.path.join(workdir, f"results.previous-{k}.json"))
  # Results of an earlier length (the run was extended, then killed in its final evaluation)
  # are set aside too, but this length's final monitor, if logged, is not logged again.
  return None, stored.get("step") == total_steps


def _kept_checkpoint(checkpointer) -> str:
  """What a stopped run leaves to resume from, for its error message."""
  step = checkpointer.latest_step()
  if step is None:
    return ("No checkpoint was saved before it, so the corrected command starts afresh in the "
            "same workdir.")
  return f"The last good checkpoint (step {step}) is kept in {checkpointer.directory}."


def _check_finite(state, step, action: str, checkpointer) -> None:
  """Stops the run before `action` (saving, evaluating) on a state that is no longer finite."""
  if not bool(jax.device_get(state.finite)):
    raise NonFiniteLossError(
        f"The loss, its gradient or the parameters became NaN or inf before step {step}; the run "
        f"stopped without {action}. {_kept_checkpoint(checkpointer)} Lower "
        "--config.optim.lr, raise --config.loss.temperature, or use --config.model.dtype=float32.")


def _save(checkpointer, state, step, steps_per_epoch, meta_base, log_state=None):
  """Checkpoint of `step`. `log_state`: what the metrics need to go on exactly as if the run
  had not stopped (the steps logged since the last log line, the collapse step), in the meta."""
  _check_finite(state, step, "saving", checkpointer)
  checkpointer.save(step, state, meta=dict(meta_base, step=step, epoch=step / steps_per_epoch,
                                           **(log_state or {})))


def _monitor(task, state, writer, step, checkpointer, *, show: bool) -> dict[str, float]:
  """The kNN monitor / online probe of `step`, logged (and, with `show`, printed by process 0
  above the progress bar)."""
  # Between two log lines the NaN guard has not looked yet: a monitor of non-finite parameters
  # would log garbage (and a sentence run would keep them as its best dev model).
  _check_finite(state, step, "evaluating", checkpointer)
  monitor = task.monitor(state)
  epoch = step / task.steps_per_epoch
  writer.write(step, dict(monitor, epoch=epoch), split="monitor")
  if show and jax.process_index() == 0:
    # tqdm's class-level write: above a running bar, and also before the bar exists (the
    # catch-up monitor of a resumed run).
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
    tqdm.write(f"epoch {epoch:.0f}: " + ", ".join(f"{k}={v:.2f}" for k, v in monitor.items()),
               file=sys.stderr)
  return monitor


def _monitor_missing(task, workdir, step, total_steps) -> bool:
  """Whether a resumed run lacks the monitor line of the step it resumes at."""
  every = task.monitor_every_steps
  if not (every and 0 < step < total_steps and step % every == 0):
    return False
  return _logged_monitor(workdir, step) is None


def _logged_monitor(workdir, step) -> dict[str, float] | None:
  """The monitor line already logged at `step` (its values on process 0, {} elsewhere), or None
  when there is none: a run killed during its final evaluation must not log that monitor twice."""
  # Process 0 writes the metrics; it decides for all, which must run a monitor together.
  found = None
  if jax.process_index() == 0:
    lines = [r for r in metrics_lib.read_metrics(workdir, "monitor") if r["step"] == step]
    if lines:
      found = {k: v for k, v in lines[-1].items() if k not in ("step", "split", "time", "epoch")}
  present = found is not None
  if jax.process_count() > 1:
    present = bool(multihost_utils.broadcast_one_to_all(np.asarray(present)))
  return (found or {}) if present else None


@jax.jit
def _step_means(pending: list[dict]) -> dict:
  """Each metric's mean over the steps since the last log line, reduced on the device: one
  small transfer per log line, not one per metric and step. Compiled once per number of steps
  (the log interval, and a shorter first or last one)."""
  return {k: jnp.mean(jnp.stack([jnp.asarray(m[k], jnp.float32) for m in pending]))
          for k in pending[-1]}


def _log_state(pending, collapsed_at) -> dict[str, Any]:
  """The per-step metrics not yet averaged into a log line, as exact floats (float32 values are
  exact in JSON's float64), and the collapse step: what a resumed run needs to log the same."""
  fetched = jax.device_get(pending)
  return {"log_pending": [{k: float(v) for k, v in m.items()} for m in fetched],
          "collapsed_at_step": collapsed_at}


# Collapse: after the first epoch, every negative's cosine within about 0.01 of a value above
# 0.95. Pre-trained text encoders can start with high but spread cosines (anisotropy); a
# collapsed projection has them all at the same value.
COLLAPSE_MEAN_COSINE, COLLAPSE_VARIANCE = 0.95, 1e-4


def _collapsed(summary: dict, done: int, steps_per_epoch: int) -> bool:
  return (done >= steps_per_epoch and summary.get("s_neg_mean", 0.0) > COLLAPSE_MEAN_COSINE
          and summary.get("s_neg_var", 1.0) < COLLAPSE_VARIANCE)


def _loop(config, task, state, train_step, checkpointer, writer, mesh, start_step, total_steps,
          meta_base, workdir, resumed_log):
  steps_per_epoch = task.steps_per_epoch
  # On the CPU, several fake devices with collectives must not run steps back to back unwaited:
  # XLA's CPU rendezvous can deadlock. On accelerators the loop stays asynchronous.
  block_each_step = jax.default_backend() == "cpu" and mesh.size > 1
  batches = task.train_batches(start_step=start_step, num_steps=total_steps - start_step)
  # The bar starts once the first step (which compiles the train step: seconds on a CPU, a minute
  # or more for a ResNet-50 on a GPU) has finished, so its images/s is the training rate from
  # the start rather than a smoothed average slowly forgetting the compilation.
  bar = None
  if config.progress_bar and start_step < total_steps and jax.process_index() == 0:
    print(f"Compiling the train step (step {start_step + 1} of {total_steps} takes longer)...",
          file=sys.stderr, flush=True)
  # Restored from the checkpoint's meta: a checkpoint between two log steps carries the steps
  # since the last line, so the next line averages the same steps as in an uninterrupted run.
  pending: list[dict] = [{k: np.float32(v) for k, v in m.items()}
                         for m in resumed_log["pending"]]
  collapsed_at = resumed_log["collapsed_at"]
  last_log_time, last_log_step = time.time(), start_step
  step = start_step
  if _monitor_missing(task, workdir, start_step, total_steps):
    # Stopped (SIGTERM at an epoch's end, or killed) between a checkpoint and its monitor: the
    # curves would lack that epoch.
    _monitor(task, state, writer, start_step, checkpointer, show=config.progress_bar)
  preemption = _PreemptionWatch()
  profile = _ProfileWindow(config, workdir, start_step, total_steps)
  try:
    for step in range(start_step, total_steps):
      profile.before_step(step, state)
      batch = task.to_global(next(batches))
      state, step_metrics = train_step(state, batch)
      pending.append(step_metrics)
      done = step + 1
      first_step = step == start_step
      if block_each_step or first_step:
        jax.block_until_ready(state.step)
      if first_step:
        if config.progress_bar:
          bar = metrics_lib.progress_bar(total_steps, initial=done, unit=task.example_unit,
                                         unit_scale=config.batch_size)
        if done % config.log_every_steps and done != total_steps:
          # The first examples/s line measures training, not the compilation.
          last_log_time, last_log_step = time.time(), done
      elif bar is not None:
        bar.update(config.batch_size)
      profile.after_step(done, state, train_step, batch, bar)
      if done % config.log_every_steps == 0 or done == total_steps:
        summary = {k: float(v) for k, v in jax.device_get(_step_means(pending)).items()}
        pending.clear()
        now = time.time()
        summary["examples_per_sec"] = (done - last_log_step) * config.batch_size / max(
            now - last_log_time, 1e-9)
        last_log_time, last_log_step = now, done
        summary["epoch"] = done / steps_per_epoch
        writer.write(done, summary, split="train")
        # A failed asynchronous save (a full disk) stops the run now, not one checkpoint
        # interval later at the next save.
        checkpointer.check_for_errors()
        if not (math.isfinite(summary["loss"]) and summary["finite"] == 1.0):
          raise NonFiniteLossError(
              f"The loss, its gradient or the parameters became NaN or inf by step {done} (epoch "
              f"{summary['epoch']:.2f}; mean loss {summary['loss']}, gradient norm "
              f"{summary['grad_norm']}); "
              f"stopping. {_kept_checkpoint(checkpointer)} Lower --config.optim.lr, raise "
              "--config.loss.temperature, or use --config.model.dtype=float32.")
        if collapsed_at is None and _collapsed(summary, done, steps_per_epoch):
          collapsed_at = done
          message = (
              f"Representation collapse by step {done} (epoch {summary['epoch']:.2f}): the "
              f"negatives' mean cosine is {summary['s_neg_mean']:.4f} with variance "
              f"{summary['s_neg_var']:.1e}, so every embedding points the same way and nothing "
              f"is being learned. Check the loss settings (e.g. chi2_dro with a large "
              f"--config.loss.eta collapses from a random start, docs/results.md claim 7; "
              f"--config.init_from=WORKDIR starts from a trained encoder) or lower "
              f"--config.optim.lr. Training goes on; results.json records the step.")
          logs.warn(message)
        if bar is not None:
          bar.set_postfix(loss=f"{summary['loss']:.4f}", epoch=f"{summary['epoch']:.2f}")
      if done % config.checkpoint_every_steps == 0 and done < total_steps:
        _save(checkpointer, state, done, steps_per_epoch, meta_base,
              _log_state(pending, collapsed_at))
      # Asked after the last step too (every process must report the same ids to the sync
      # point); there a stop skips only the final evaluation (below).
      if preemption.should_stop(done) and done < total_steps:
        if done % config.checkpoint_every_steps:
          _save(checkpointer, state, done, steps_per_epoch, meta_base,
                _log_state(pending, collapsed_at))
        checkpointer.wait()
        raise PreemptedError(
            f"Stopped on request ({preemption.reason}) after step {done} of "
            f"{total_steps}; a checkpoint of step {done} is saved in {checkpointer.directory}. "
            "Rerun the same command to resume.", exit_code=preemption.exit_code)
      every = task.monitor_every_steps
      if every and done % every == 0 and done < total_steps:
        _monitor(task, state, writer, done, checkpointer, show=config.progress_bar)
        # The next line's examples/s measures training, not the monitor's minutes.
        last_log_time, last_log_step = time.time(), done
  finally:
    # A stop requested during the last step: honoured after its checkpoint, before the final
    # evaluation (the rerun evaluates).
    stop_requested = preemption.requested and start_step < total_steps
    stop_reason, stop_exit_code = preemption.reason, preemption.exit_code
    preemption.close()
    profile.stop()
    if bar is not None:
      bar.close()
    close = getattr(batches, "close", None)
    if close is not None:
      close()

  if start_step < total_steps:
    _save(checkpointer, state, total_steps, steps_per_epoch, meta_base,
          _log_state(pending, collapsed_at))
  checkpointer.wait()
  if stop_requested:
    raise PreemptedError(
        f"Stopped on request ({stop_reason}) after the last step, {total_steps}; its checkpoint "
        f"is saved in {checkpointer.directory}. Rerun the same command for the final evaluation.",
        exit_code=stop_exit_code)
  results = {"step": total_steps, "epochs": total_steps / steps_per_epoch,
             "loss": config.loss.name, "evaluated_with": _evaluated_with(config)}
  if collapsed_at is not None:
    results["collapsed_at_step"] = collapsed_at
  if config.get("init_from"):   # the encoder it started from (the summary says what "gain" means)
    results["init_from"] = config.init_from
  if task.monitor_every_steps:
    # Resumed after training ended (killed during the final evaluation): the final monitor may
    # be logged already; a new evaluation with other settings logs its own.
    monitor = None
    if start_step == total_steps and not resumed_log["reevaluate"]:
      monitor = _logged_monitor(workdir, total_steps)
    if monitor is None:
      monitor = _monitor(task, state, writer, total_steps, checkpointer, show=False)
    results.update({f"final_{k}": v for k, v in monitor.items()})
  results.update(task.final_evaluation(state))
  writer.write(total_steps, {k: v for k, v in results.items()
                             if isinstance(v, (int, float))}, split="results", once=True)
  if jax.process_index() == 0:   # atomically: a kill mid-write must not leave half a file
    checkpointing.write_json_atomically(os.path.join(workdir, "results.json"), results)
  return results
