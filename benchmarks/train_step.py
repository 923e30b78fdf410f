r"""Image training-step throughput: images/s and model FLOP utilisation (MFU).

  python benchmarks/train_step.py                       # GPU: ResNet-18 and -50, batch 512, bf16
  python benchmarks/train_step.py --models resnet18 --batch 32 --width 16 --dtype float32  # CPU

What is timed is the project's real train step (`cldro_jax.train.make_train_step` with the image
task): uint8 batches already on the device, both SimCLR views made inside the jitted step, one
forward pass per view as the reference (BatchNorm per view; `--views-in-one-pass` times the
trainer's single pass over both views with the same per-view statistics, which
benchmarks/view_batchnorm.py compares on the network alone), the ADNCE loss in `shard_map`,
diagnostics, Adam and the online probe. Median step time after warm-up. Also reported:
  - the share of the step spent in augmentation (the augmentation alone, jitted, same batch),
  - a plain baseline measured in the same process: the same network and optimizer in one jitted
    step with a naive transcription of the reference loss and views made by a cheap flip only —
    the "plain JAX/Flax, no tuning" anchor (docs/benchmarks.md); on the CPU only the ratio means
    anything,
  - the host input pipeline's images/s (uint8 batches from an in-memory CIFAR-sized array).
FLOPs per image per step are counted analytically (2 views x forward+backward ~ 3x forward; the
anchors' ResNet-18 CIFAR 6.7 GFLOP, ResNet-50 CIFAR 15.6 GFLOP); MFU uses the measured bf16 matrix
rate of an H200 (790 TFLOP/s, docs/benchmarks.md) on a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cldro_jax import config_defaults
from cldro_jax import profiling as op_profile
from cldro_jax import train
from cldro_jax.data import augment as augment_lib
from cldro_jax.data import images as images_lib
from cldro_jax.data import pipeline
from cldro_jax.models import resnet
from cldro_jax.tasks import image as image_task
import record  # benchmarks/record.py, beside this script

H200_BF16_FLOPS = 790e12   # measured bf16 matmul rate, docs/benchmarks.md


def synthetic_dataset(n: int, size: int) -> images_lib.ImageDataset:
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, n).astype(np.int32)
  source = images_lib.InMemorySource(images, labels)
  return images_lib.ImageDataset(name="synthetic", pretrain=source, probe_train=source,
                                 test=source, num_classes=10, image_shape=(size, size, 3))


def median_time(fn, args_fn, warmup: int, iters: int) -> float:
  for _ in range(warmup):
    jax.block_until_ready(fn(*args_fn()))
  times = []
  for _ in range(iters):
    args = args_fn()
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def back_to_back_time(fn, args_fn, steps: int) -> float:
  """Seconds per step over `steps` steps dispatched back to back, one wait at the end: what a
  training loop sees, where Python's dispatch of step k+1 overlaps the device's work on step k
  (the median above waits after every step, adding the dispatch time to each)."""
  args = args_fn()
  start = time.perf_counter()
  out = None
  for _ in range(steps):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / steps


def plain_step_fn(model, tx, temperature):
  """A plain transcription: flip-only views, the reference's naive NT-Xent, Adam."""
  def loss_fn(params, batch_stats, images):
    x = images.astype(jnp.float32) / 255.0
    v1, v2 = x, x[:, :, ::-1]
    (_, z1), upd = model.apply({"params": params, "batch_stats": batch_stats}, v1, train=True,
                               mutable=["batch_stats"])
    (_, z2), upd = model.apply({"params": params, **upd}, v2, train=True,
                               mutable=["batch_stats"])
    z = jnp.concatenate([z1, z2])
    z = z / jnp.linalg.norm(z, axis=1, keepdims=True)
    n = z1.shape[0]
    sim = jnp.exp(z @ z.T / temperature)
    mask = ~jnp.eye(2 * n, dtype=bool)
    neg = jnp.sum(jnp.where(mask, sim, 0.0), axis=1)
    pos = jnp.exp(jnp.sum(z1 * z2, axis=1) / temperature)
    pos = jnp.concatenate([pos, pos])
    return -jnp.mean(jnp.log(pos / neg)), upd["batch_stats"]

  @jax.jit
  def step(params, batch_stats, opt_state, images):
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch_stats, images)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss
  return step


def bench_model(name: str, args, out: record.JsonRecord) -> dict:
  """Times the trainer's step for `name` and returns its table row. The row goes into `out`
  as soon as the step is timed and is completed there afterwards (augmentation share, plain
  step), so a time limit hit while those are measured keeps the step's figures."""
  config = config_defaults.base_config("image")
  config.model.name, config.model.width, config.model.dtype = name, args.width, args.dtype
  config.batch_size = args.batch
  config.mesh.num_devices = -1
  config.eval.online_probe = True
  config.model.views_in_one_pass = args.views_in_one_pass
  mesh = train.make_mesh(-1)
  dataset = synthetic_dataset(max(args.batch, 1024), 32)
  task = image_task.ImageTask(config, mesh, dataset=dataset)
  schedule = train.make_schedule(config.optim, 1000, task.steps_per_epoch)
  tx = train.make_full_optimizer(config, schedule)
  with jax.set_mesh(mesh):
    state = jax.jit(lambda k: train.create_train_state(task, config, tx, k))(
        jax.random.PRNGKey(0))
    step = jax.jit(train.make_train_step(task, config, tx, schedule, mesh), donate_argnums=0)
    batch = task.to_global(dataset.pretrain[np.arange(args.batch)])
    step = step.lower(state, batch).compile()   # compiled once; its text names what the profile times
    holder = {"state": state}

    def run_step(batch):
      holder["state"], metrics = step(holder["state"], batch)
      return metrics["loss"]

    t_step = median_time(run_step, lambda: (batch,), args.warmup, args.iters)
    t_pipelined = back_to_back_time(run_step, lambda: (batch,), args.iters)
    flops = resnet.contrastive_step_flops_per_image(name, image_size=32, stem="cifar",
                                                    width=args.width)
    ips = args.batch / t_step
    row = {"model": name, "step_ms": t_step * 1e3, "images_per_s": ips,
           "images_per_s_back_to_back": args.batch / t_pipelined,
           "plain_images_per_s": None, "ratio_vs_plain": None,
           "augment_share": None, "gflop_per_image": flops / 1e9,
           "mfu": ips * flops / H200_BF16_FLOPS if jax.default_backend() == "gpu" else None}
    # Kept now (JSON row and this line): a time limit hit while the augmentation alone compiles,
    # or while the profile runs, keeps the step's figures.
    out.add(**row)
    mfu = f", MFU {100 * row['mfu']:.1f}%" if row["mfu"] is not None else ""
    print(f"# {name}: {t_step * 1e3:.1f} ms/step, {ips:,.0f} images/s (median step), "
          f"{args.batch / t_pipelined:,.0f} images/s (steps back to back){mfu}", flush=True)
    aug = task.augment
    aug_fn = jax.jit(lambda key, x: augment_lib.two_views(key, x, aug))
    key = jax.random.PRNGKey(1)
    t_aug = median_time(aug_fn, lambda: (key, batch["image"]), args.warmup, args.iters)
    row["augment_share"] = t_aug / t_step
    out.update_last(augment_share=row["augment_share"])
    if args.profile:
      profile_step(name, lambda: run_step(batch), step.as_text(), args, t_step)

  if args.skip_plain:
    return row
  plain_model = image_task.build_model(config.model)
  variables = jax.jit(lambda key: plain_model.init(key, jnp.zeros((2, 32, 32, 3)), train=False))(
      jax.random.PRNGKey(0))
  plain_tx = optax.chain(optax.add_decayed_weights(1e-6), optax.adam(1e-3))
  plain = plain_step_fn(plain_model, plain_tx, 0.5)
  images = jnp.asarray(dataset.pretrain[np.arange(args.batch)]["image"])
  plain_state = {"p": variables["params"], "b": variables["batch_stats"],
                 "o": plain_tx.init(variables["params"])}

  def run_plain(images):
    plain_state["p"], plain_state["b"], plain_state["o"], loss = plain(
        plain_state["p"], plain_state["b"], plain_state["o"], images)
    return loss

  t_plain = median_time(run_plain, lambda: (images,), args.warmup, args.iters)
  plain_figures = {"plain_images_per_s": args.batch / t_plain, "ratio_vs_plain": t_plain / t_step}
  out.update_last(**plain_figures)
  return {**row, **plain_figures}


def profile_step(name: str, run, compiled_text: str, args, t_step: float) -> None:
  """Prints the step's device time by phase (cldro_jax/profiling.py). A profiler that fails
  (no CUPTI, say) costs this table only, never the measured rows."""
  try:
    profile = op_profile.profile_compiled(run, compiled_text, f"{args.profile}/{name}")
    print(f"\n# {name}: where the step's device time goes\n"
          + op_profile.format_tables(profile, t_step * 1e3,
                                     wall_label="the unprofiled median step's wall time")
          + "\n", flush=True)
  except Exception as error:   # pylint: disable=broad-except
    print(f"# {name}: profile failed: {type(error).__name__}: {error}", flush=True)


def bench_host_pipeline(batch: int, steps: int = 50) -> float:
  dataset = synthetic_dataset(50_000, 32)
  batches = pipeline.train_batches(dataset.pretrain, global_batch_size=batch, seed=0,
                                   start_step=0, num_steps=steps + 5)
  for _ in range(5):
    next(batches)
  start = time.perf_counter()
  for _ in range(steps):
    next(batches)
  elapsed = time.perf_counter() - start
  batches.close()
  return steps * batch / elapsed


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  on_gpu = jax.default_backend() == "gpu"
  parser.add_argument("--models", default="resnet18,resnet50")
  parser.add_argument("--batch", type=int, default=512 if on_gpu else 32)
  parser.add_argument("--width", type=int, default=64 if on_gpu else 16)
  parser.add_argument("--dtype", default="bfloat16" if on_gpu else "float32")
  parser.add_argument("--warmup", type=int, default=5 if on_gpu else 2)
  parser.add_argument("--iters", type=int, default=30 if on_gpu else 5)
  parser.add_argument("--views-in-one-pass", action="store_true",
                      help="both views in one forward pass (per-view BatchNorm, ViewBatchNorm)")
  parser.add_argument("--skip-plain", action="store_true",
                      help="do not time the plain baseline step (saves its compilation)")
  parser.add_argument("--json", default="", help="also write the rows to this file "
                      "(for benchmarks/plot.py)")
  parser.add_argument("--profile", default="", metavar="DIR",
                      help="also trace 3 steps into DIR and print the device time per phase "
                      "(augmentation, encoder forward/backward, loss, optimizer) and the heaviest "
                      "operations (cldro_jax/profiling.py)")
  args = parser.parse_args(argv)
  device = jax.devices()[0]
  print(f"# {datetime.date.today()}  {device.device_kind} x{jax.device_count()} "
        f"({jax.default_backend()}), jax {jax.__version__}, host "
        f"{platform.processor() or platform.machine()}")
  print(f"# batch {args.batch} images ({2 * args.batch} views), width {args.width}, "
        f"{args.dtype}, {'both views in one pass' if args.views_in_one_pass else 'a pass per view'}"
        f", median of {args.iters} steps after {args.warmup} warm-up")
  given = sys.argv[1:] if argv is None else argv
  print(f"# command: python benchmarks/{' '.join(['train_step.py'] + given)}")
  print("| model | step ms | images/s | images/s, steps back to back | plain-step images/s | "
        "ours / plain speed | augment share | GFLOP/img | MFU |")
  print("|---|---|---|---|---|---|---|---|---|", flush=True)
  out = record.JsonRecord(args.json, "train_step", batch=args.batch, width=args.width,
                          dtype=args.dtype, views_in_one_pass=args.views_in_one_pass,
                          iters=args.iters, warmup=args.warmup)
  for name in args.models.split(","):   # each row as soon as it is measured
    r = bench_model(name, args, out)
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a (CPU)"
    plain = ("n/a | n/a" if r["plain_images_per_s"] is None else
             f"{r['plain_images_per_s']:,.0f} | {r['ratio_vs_plain']:.2f}x")
    print(f"| {r['model']} | {r['step_ms']:.1f} | {r['images_per_s']:,.0f} | "
          f"{r['images_per_s_back_to_back']:,.0f} | {plain} | "
          f"{100 * r['augment_share']:.1f}% | {r['gflop_per_image']:.2f} | {mfu} |", flush=True)
  host_rate = bench_host_pipeline(args.batch)
  out.data["host_pipeline_images_per_s"] = host_rate
  out.add(model="host input pipeline", images_per_s=host_rate)
  print(f"\nhost input pipeline (uint8, in memory, batch {args.batch}): {host_rate:,.0f} images/s")


if __name__ == "__main__":
  main()
