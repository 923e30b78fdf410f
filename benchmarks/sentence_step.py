"""Speed of the unsupervised-SimCSE training step on BERT-base: sentences/s and FLOP utilisation.

    python benchmarks/sentence_step.py                               # CPU: small batch, minutes
    python benchmarks/sentence_step.py --batches 64,512 --dtypes bfloat16,float32   # GPU targets

Random weights of the bert-base-uncased architecture (no checkpoint or data needed: 12 layers,
hidden 768, 110M parameters), random token ids, length 32, both dropout views in one pass.
Two programs per (batch, dtype), each one jitted step with donated state:

  project  the step `python -m cldro_jax.main --config=configs/sts_bert.py` runs: the trainer's
           `make_train_step` on `SentenceTask` (ADNCE t=0.07 mu=0.4 sigma=1.0 "sentence" form in
           `jax.shard_map` with gathered negatives, CL-DRO diagnostics, NaN guard, gradient
           clipping, AdamW + linear decay), batch sharded over the mesh.
  plain    the same encoder with the least glue: two views, plain InfoNCE (t=0.05, optax cross
           entropy), optax.adamw, nothing else. "project / plain" is the cost of the glue.

Time is the median over --repeats steps after --warmup steps (each blocked on). FLOPs per
sentence are the analytic matmul count (`sentence.flops_per_sentence`: 2 views x forward +
backward; ~33 GFLOP for BERT-base at length 32, docs/benchmarks.md); XLA's own count of the compiled
step is printed beside it. MFU = achieved FLOP/s / the device's measured dense matmul rate in the
same dtype (--peak_tflops overrides; the H200's measured bf16 rate is ~790 TFLOP/s).

Anchors (docs/benchmarks.md, one H200, Hugging Face transformers + PyTorch 2.11, random weights):
fp32 1,086 (batch 64) and 1,296 (512) sentences/s; bf16 autocast 1,462 (64) and 6,143 (512);
targets for this project: 3,000 (batch 64) and 9,000 (batch 512) sentences/s in bf16.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

# The recipe comes from configs/sts_bert.py: make the repository root importable when this file
# runs as a script (`python benchmarks/sentence_step.py`).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cldro_jax import profiling as op_profile  # noqa: E402
from cldro_jax import train  # noqa: E402
from cldro_jax.tasks import sentence  # noqa: E402
from configs import sts_bert  # noqa: E402
import record  # noqa: E402  (benchmarks/record.py, beside this script)

SEQ_LEN = 32


def parse_args(argv):
  on_cpu = jax.default_backend() == "cpu"
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batches", default="8" if on_cpu else "64,512",
                      help="comma-separated global batch sizes (sentences per step)")
  parser.add_argument("--dtypes", default="float32,bfloat16",
                      help="comma-separated compute dtypes (float32, bfloat16)")
  parser.add_argument("--programs", default="project,plain", help="project and/or plain")
  parser.add_argument("--architecture", default="bert-base-uncased",
                      choices=sorted(sentence.KNOWN_ARCHITECTURES))
  parser.add_argument("--layers", type=int, default=0,
                      help="override the number of layers (0: the architecture's)")
  parser.add_argument("--warmup", type=int, default=1 if on_cpu else 3)
  parser.add_argument("--repeats", type=int, default=3 if on_cpu else 20)
  parser.add_argument("--peak_tflops", type=float, default=0.0,
                      help="device peak for MFU (0: measure a dense matmul in each dtype)")
  parser.add_argument("--json", default="", help="also write the rows to this file "
                      "(for benchmarks/plot.py)")
  parser.add_argument("--profile", default="", metavar="DIR",
                      help="also trace 3 steps of the project program into DIR and print its "
                      "device time per phase (encoder forward/backward, loss, optimizer) and the "
                      "heaviest operations (cldro_jax/profiling.py)")
  return parser.parse_args(argv)


def measured_matmul_tflops(dtype, size: int) -> float:
  """Dense (size x size) @ (size x size) rate of this device in `dtype`, TFLOP/s."""
  key_a, key_b = jax.random.split(jax.random.key(0))
  a = jax.random.normal(key_a, (size, size), dtype)
  b = jax.random.normal(key_b, (size, size), dtype)
  matmul = jax.jit(lambda x, y: x @ y)
  # A GPU fresh from start-up runs its first matmuls below its sustained clock: warm it up for
  # about half a second (50 products of 8192^2 in bf16 on an H200) before the best of 20, so the
  # MFU denominator is not under-measured (which would inflate MFU).
  on_cpu = jax.default_backend() == "cpu"
  for _ in range(1 if on_cpu else 50):
    jax.block_until_ready(matmul(a, b))
  times = []
  for _ in range(5 if on_cpu else 20):
    start = time.perf_counter()
    jax.block_until_ready(matmul(a, b))
    times.append(time.perf_counter() - start)
  return 2 * size ** 3 / min(times) / 1e12


def random_batch(batch: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Token ids with a [CLS]-like first token and lengths 8..32 (padded to 32, as training)."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(1000, vocab, size=(batch, SEQ_LEN)).astype(np.int32)
  lengths = rng.integers(8, SEQ_LEN + 1, size=batch)
  mask = (np.arange(SEQ_LEN)[None, :] < lengths[:, None]).astype(np.int32)
  ids[:, 0] = 101
  return {"input_ids": np.where(mask == 1, ids, 0).astype(np.int32), "attention_mask": mask}


def bench_config(batch: int, dtype: str):
  config = sts_bert.get_config()
  config.batch_size = batch
  config.model.dtype = dtype
  config.data.source = "sklearn_descr"   # unused: the benchmark feeds its own batches
  config.data.path = ""
  config.total_steps = 1000
  return config


def time_steps(step, state, batch, warmup: int, repeats: int):
  """(median seconds per step, seconds per step dispatched back to back, the final state).

  The median waits after every step, which adds Python's dispatch time to each; back to back,
  as in a training loop, dispatch overlaps the device's work (one wait at the end). Steps donate
  their input state, so the state is threaded through."""
  for _ in range(warmup):
    state = jax.block_until_ready(step(state, batch))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    state = jax.block_until_ready(step(state, batch))
    times.append(time.perf_counter() - start)
  start = time.perf_counter()
  for _ in range(repeats):
    state = step(state, batch)
  state = jax.block_until_ready(state)
  return statistics.median(times), (time.perf_counter() - start) / repeats, state


def profile_text(step, state, batch, trace_dir: str, seconds: float) -> str:
  """The device time of 3 traced steps by phase (cldro_jax/profiling.py), as markdown. A
  profiler that fails (no CUPTI, say) costs this text only, never the measured rows."""
  holder = {"state": state}

  def run_once():
    holder["state"] = step(holder["state"], batch)
    return holder["state"]
  try:
    profile = op_profile.profile_compiled(run_once, step.compiled.as_text(), trace_dir)
    return op_profile.format_tables(profile, seconds * 1e3,
                                    wall_label="the unprofiled median step's wall time")
  except Exception as error:   # pylint: disable=broad-except
    return f"(profile failed: {type(error).__name__}: {error})"


def _rate(per_second: float) -> str:
  return f"{per_second:,.0f}" if per_second >= 100 else f"{per_second:.3g}"


def xla_flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", float("nan")))


def project_program(arch, batch: int, dtype: str, mesh):
  """The trainer's own step on SentenceTask, as `train_and_evaluate` builds it."""
  config = bench_config(batch, dtype)
  task = sentence.SentenceTask(config, mesh, encoder_config=arch)
  schedule = train.make_schedule(config.optim, config.total_steps, 1)
  tx = train.make_full_optimizer(config, schedule)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  with jax.set_mesh(mesh):
    state = jax.jit(functools.partial(train.create_train_state, task, config, tx),
                    out_shardings=replicated)(jax.random.key(config.seed))
    step = jax.jit(train.make_train_step(task, config, tx, schedule, mesh), donate_argnums=(0,),
                   out_shardings=(replicated, replicated))
    global_batch = task.to_global(random_batch(batch, arch.vocab_size))
    compiled = step.lower(state, global_batch).compile()

  def run(state, batch):
    with jax.set_mesh(mesh):
      new_state, _ = compiled(state, batch)
    return new_state
  # XLA counts one device's partitioned program: the step is that on every device of the mesh
  # (replicated work such as the optimizer update is then counted once per device, as it runs).
  run.compiled = compiled   # its text (as_text) names what a profile of the step times
  return run, state, global_batch, xla_flops(compiled) * mesh.size


def plain_program(arch, batch: int, dtype: str):
  """The same encoder and views with a minimal InfoNCE + AdamW step (no project glue)."""
  config = bench_config(batch, dtype)
  model, _ = sentence.build_model(config.model, arch)
  from cldro_jax.models import bert  # pylint: disable=import-outside-toplevel
  params = jax.jit(lambda key: bert.init_params(model, key))(jax.random.key(0))
  tx = optax.adamw(optax.linear_schedule(config.optim.lr, 0.0, 1000), weight_decay=0.0)
  opt_state = jax.jit(tx.init)(params)

  def step(carry, batch):
    params, opt_state, key = carry
    key, dropout = jax.random.split(key)

    def loss_fn(p):
      z = model.apply({"params": p}, jnp.concatenate([batch["input_ids"]] * 2),
                      jnp.concatenate([batch["attention_mask"]] * 2), train=True, use_mlp=True,
                      rngs={"dropout": dropout})
      z = z / jnp.linalg.norm(z, axis=-1, keepdims=True)
      z1, z2 = jnp.split(z, 2)
      logits = z1 @ z2.T / 0.05
      labels = jnp.arange(z1.shape[0])
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, key

  batch_arrays = jax.device_put(random_batch(batch, arch.vocab_size))
  carry = (params, opt_state, jax.random.key(1))
  compiled = jax.jit(step, donate_argnums=(0,)).lower(carry, batch_arrays).compile()
  return compiled, carry, batch_arrays, xla_flops(compiled)


def main(argv=None) -> None:
  args = parse_args(argv)
  arch = sentence.KNOWN_ARCHITECTURES[args.architecture]
  if args.layers:
    import dataclasses  # pylint: disable=import-outside-toplevel
    arch = dataclasses.replace(arch, num_hidden_layers=args.layers)
  device = jax.devices()[0]
  mesh = train.make_mesh(-1)
  on_cpu = jax.default_backend() == "cpu"
  flops_sentence = sentence.flops_per_sentence(arch, SEQ_LEN)
  print(f"# {datetime.date.today()} | {device.platform}: {device.device_kind} x {mesh.size} | "
        f"jax {jax.__version__} | {args.architecture}"
        f"{f' with {args.layers} layer(s)' if args.layers else ''}, length {SEQ_LEN}, "
        f"{flops_sentence / 1e9:.1f} GFLOP/sentence/step (analytic)")
  print(f"# command: python benchmarks/{' '.join(['sentence_step.py'] + sys.argv[1:])}")
  peaks = {}
  for dtype in args.dtypes.split(","):
    peaks[dtype] = args.peak_tflops or measured_matmul_tflops(
        jnp.bfloat16 if dtype == "bfloat16" else jnp.float32, 2048 if on_cpu else 8192)
    source = "given by --peak_tflops" if args.peak_tflops else "measured dense matmul rate"
    print(f"# MFU denominator, {dtype} ({source}): {peaks[dtype]:.3g} TFLOP/s")
  out = record.JsonRecord(args.json, "sentence_step", architecture=args.architecture,
                          layers=args.layers or arch.num_hidden_layers, seq_len=SEQ_LEN,
                          gflop_per_sentence=flops_sentence / 1e9, matmul_tflops=peaks,
                          warmup=args.warmup, repeats=args.repeats)
  print("\n| program | dtype | batch | ms/step | sentences/s | sentences/s, steps back to back | "
        "TFLOP/s | MFU | XLA/analytic FLOPs | project / plain time |")
  print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
  for batch in (int(b) for b in args.batches.split(",")):
    for dtype in args.dtypes.split(","):
      seconds = {}
      for program in args.programs.split(","):
        if program == "project":
          step, state, data, counted = project_program(arch, batch, dtype, mesh)
        elif program == "plain":
          step, state, data, counted = plain_program(arch, batch, dtype)
        else:
          raise ValueError(f"unknown program {program!r}: project or plain")
        seconds[program], back_to_back, state = time_steps(step, state, data, args.warmup,
                                                           args.repeats)
        achieved = flops_sentence * batch / seconds[program] / 1e12
        out.add(program=program, dtype=dtype, batch=batch, ms=seconds[program] * 1e3,
                sentences_per_s=batch / seconds[program],
                sentences_per_s_back_to_back=batch / back_to_back, tflops=achieved,
                mfu=achieved / peaks[dtype], xla_over_analytic=counted / (flops_sentence * batch))
        ratio = (f"{seconds['project'] / seconds['plain']:.2f}"
                 if program == "plain" and "project" in seconds else "")
        print(f"| {program} | {dtype} | {batch} | {seconds[program] * 1e3:.1f} | "
              f"{_rate(batch / seconds[program])} | {_rate(batch / back_to_back)} | "
              f"{achieved:.3g} | "
              f"{achieved / peaks[dtype]:.1%} | {counted / (flops_sentence * batch):.2f} | "
              f"{ratio} |", flush=True)
        # Profiled after the row is kept (printed and in the JSON file): a time limit hit while
        # tracing costs the profile only.
        profile = (profile_text(step, state, data, f"{args.profile}/{program}_{dtype}_{batch}",
                                seconds[program])
                   if args.profile and program == "project" else "")
        del state
        if profile:
          print(f"\n# {program}, {dtype}, batch {batch}: where the step's device time goes\n"
                f"{profile}\n\n| program | dtype | batch | ms/step | sentences/s | sentences/s, "
                "steps back to back | TFLOP/s | MFU | XLA/analytic FLOPs | project / plain time |"
                "\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)


if __name__ == "__main__":
  main()
