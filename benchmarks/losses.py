"""Speed and memory of the ADNCE loss: dense vs blockwise vs a plain transcription.

    python benchmarks/losses.py                         # device-dependent default sizes
    python benchmarks/losses.py --sizes 512,2048 --dim 128 --block-size 1024
    python benchmarks/losses.py --json losses.json && python benchmarks/plot.py losses.json

Measures forward + backward (value and gradient with respect to both views, jitted) of the
image-variant ADNCE loss (CIFAR-10 hyperparameters t=0.4, mu=0.7, sigma=0.5) for B images per
view (2B anchors), float32, and prints a markdown table:

  plain      the authors' PyTorch formula transcribed naively to jnp (benchmark only):
             normalise, exp(Z Z^T / t), weights from log(exp(.)) * t, a boolean negative mask
             (masked_select needs dynamic shapes in JAX, so the mask multiplies instead), sums.
  dense      cldro_jax.losses.adnce, with a `valid` mask (the padding-capable path).
  blockwise  the same with block_size=--block-size (memory-bounded path).

Time is the median over --repeats runs after --warmup runs. Memory is XLA's compiled
``temp_size_in_bytes`` of the gradient program (what the step needs beyond inputs and
outputs). Ratios are against the plain transcription at the same B. Dense programs whose
similarity matrices would not fit the device are skipped (noted in the table); blockwise runs
at any size (B=65536 on a GPU).
"""
from __future__ import annotations

import argparse
import datetime
import math
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from cldro_jax import losses
import record  # benchmarks/record.py, beside this script

TEMPERATURE, MU, SIGMA = 0.4, 0.7, 0.5
CPU_SIZES = "512,2048,4096"
GPU_SIZES = "512,2048,8192,32768,65536"


def plain_adnce(out_1, out_2):
  """The reference image ADNCE as written in PyTorch, transcribed line by line to jnp."""
  out_1 = out_1 / jnp.maximum(jnp.linalg.norm(out_1, axis=-1, keepdims=True), 1e-12)
  out_2 = out_2 / jnp.maximum(jnp.linalg.norm(out_2, axis=-1, keepdims=True), 1e-12)
  batch_size = out_1.shape[0]
  out = jnp.concatenate([out_1, out_2], axis=0)
  neg = jnp.exp(out @ out.T / TEMPERATURE)
  idx = jnp.arange(2 * batch_size)
  pair = (idx + batch_size) % (2 * batch_size)
  mask = (idx[:, None] != idx[None, :]) & (idx[None, :] != pair[:, None])
  pos = jnp.exp(jnp.sum(out_1 * out_2, axis=-1) / TEMPERATURE)
  pos = jnp.concatenate([pos, pos], axis=0)
  n = 2 * batch_size - 2
  weight = 1.0 / (SIGMA * math.sqrt(2 * math.pi)) * jnp.exp(
      -(jnp.log(neg) * TEMPERATURE - MU) ** 2 / (2 * SIGMA ** 2))
  weight = jnp.where(mask, weight, 0.0)
  weight = weight / (weight.sum(axis=-1, keepdims=True) / n)
  ng = jnp.sum(jnp.where(mask, neg * jax.lax.stop_gradient(weight), 0.0), axis=1)
  return (-jnp.log(pos / (pos + ng))).mean()


def library_adnce(block_size):
  def fn(z1, z2, valid):
    return losses.adnce(z1, z2, temperature=TEMPERATURE, mu=MU, sigma=SIGMA, valid=valid,
                        block_size=block_size)
  return fn


def device_memory_bytes() -> int:
  stats = jax.devices()[0].memory_stats() or {}
  # CPU reports nothing: assume a modest 16 GiB budget rather than the host's full memory.
  return int(stats.get("bytes_limit", 16 * 2 ** 30))


def time_program(compiled, args, warmup, repeats):
  for _ in range(warmup):
    jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def bench_size(batch, dim, block_size, warmup, repeats, memory_budget):
  rng = np.random.default_rng(batch)
  z1 = jnp.asarray(rng.normal(size=(batch, dim)), jnp.float32)
  z2 = jnp.asarray(rng.normal(size=(batch, dim)), jnp.float32)
  valid = jnp.ones((batch,), bool)
  impls = {
      "plain": (lambda a, b, v: plain_adnce(a, b), True),
      "dense": (library_adnce(None), True),
      f"blockwise ({block_size})": (library_adnce(block_size), False),
  }
  # a dense gradient program holds about three (2B)^2 float32 matrices
  dense_bytes = 3 * (2 * batch) ** 2 * 4
  rows, values = [], {}
  for name, (fn, is_dense) in impls.items():
    if is_dense and dense_bytes > memory_budget:
      rows.append((name, None, None, f"skipped: needs ~{dense_bytes / 2 ** 30:.1f} GiB"))
      continue
    program = jax.jit(jax.value_and_grad(fn, (0, 1)))
    try:
      compiled = program.lower(z1, z2, valid).compile()
      temp = compiled.memory_analysis().temp_size_in_bytes
      if temp > memory_budget:   # the compiler's own count, when the estimate above passed it
        rows.append((name, None, None, f"skipped: needs {temp / 2 ** 30:.1f} GiB"))
        continue
      seconds = time_program(compiled, (z1, z2, valid), warmup, repeats)
      values[name] = float(compiled(z1, z2, valid)[0])
    except Exception as e:  # pylint: disable=broad-except
      # An out-of-memory here must not cost the rows still to come (blockwise at large B).
      if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
        raise
      rows.append((name, None, None, "out of memory"))
      continue
    rows.append((name, seconds, temp, ""))
  # all implementations compute the same loss
  if not values:
    return rows
  # A disagreement is reported in the row's note (and on stderr), not raised: the one GPU call
  # must not lose the sizes still to come (blockwise at B=65536) over it.
  ref_value = next(iter(values.values()))
  mismatched = {name: value for name, value in values.items()
                if not math.isclose(value, ref_value, rel_tol=1e-4)}
  for name, value in mismatched.items():
    print(f"!! B={batch}: {name} gives loss {value}, the first implementation {ref_value}",
          file=sys.stderr, flush=True)
  return [(name, seconds, temp, (note + "; " if note else "") + f"LOSS DIFFERS: {values[name]:.6g}"
           if name in mismatched else note) for name, seconds, temp, note in rows]


def main(argv=None):
  on_gpu = jax.default_backend() == "gpu"
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default=GPU_SIZES if on_gpu else CPU_SIZES,
                      help="comma-separated B (images per view)")
  parser.add_argument("--dim", type=int, default=128)
  parser.add_argument("--block-size", type=int, default=2048 if on_gpu else 512)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--repeats", type=int, default=20 if on_gpu else 5)
  parser.add_argument("--json", default="", help="also write the rows to this file "
                      "(for benchmarks/plot.py)")
  parser.add_argument("--precision", default="highest",
                      choices=["default", "high", "highest"],
                      help="float32 matmul precision of every implementation (the trainer's "
                      "config.loss.matmul_precision, 'highest' by default; 'default' is TF32 on "
                      "NVIDIA GPUs)")
  args = parser.parse_args(argv)
  sizes = [int(s) for s in args.sizes.split(",") if s]
  device = jax.devices()[0]
  print(f"date: {datetime.date.today().isoformat()}  device: {device.device_kind} "
        f"({jax.default_backend()}, {jax.device_count()} device(s))  jax {jax.__version__}")
  print(f"command: python benchmarks/losses.py {' '.join(sys.argv[1:] if argv is None else argv)}")
  print(f"ADNCE image variant, float32 (matmul precision {args.precision}, as the trainer's "
        f"config.loss.matmul_precision), d={args.dim}, forward+backward, median of "
        f"{args.repeats} after {args.warmup} warm-up\n")
  print("| B | implementation | fwd+bwd ms | time vs plain | compiled temp MiB | memory vs plain |")
  print("|---:|---|---:|---:|---:|---:|")
  budget = device_memory_bytes()
  out = record.JsonRecord(args.json, "losses", dim=args.dim, block_size=args.block_size,
                          repeats=args.repeats, warmup=args.warmup, dtype="float32",
                          matmul_precision=args.precision)
  for batch in sizes:
    # Traced (and so compiled) under the precision: it is part of each program.
    with jax.default_matmul_precision(args.precision):
      rows = bench_size(batch, args.dim, args.block_size, args.warmup, args.repeats, budget)
    plain = rows[0] if rows[0][1] is not None else (None, None, None, "")
    for name, seconds, temp, note in rows:
      out.add(batch=batch, implementation=name.split(" ")[0],
              ms=None if seconds is None else seconds * 1e3,
              temp_mib=None if temp is None else temp / 2 ** 20, note=note)
      if seconds is None:
        print(f"| {batch} | {name} | {note} | | | |")
        continue
      t_ratio = f"{seconds / plain[1]:.2f}x" if plain[1] else "n/a"
      m_ratio = f"{temp / plain[2]:.3f}x" if plain[2] else "n/a"
      flag = f" ({note})" if note else ""
      print(f"| {batch} | {name}{flag} | {seconds * 1e3:.2f} | {t_ratio} | {temp / 2 ** 20:.1f} | "
            f"{m_ratio} |", flush=True)


if __name__ == "__main__":
  main()
