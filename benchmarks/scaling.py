"""Cost of the multi-device code path: the same global batch on 1 vs N devices.

    python benchmarks/scaling.py                              # CPU: 1 vs 8 host devices
    python benchmarks/scaling.py --devices 1,2,4,8 --batch 128 --width 16 --json scaling.json
    python benchmarks/plot.py scaling.json                  # images/s against devices
    python benchmarks/scaling.py --devices 1 --batch 512 --width 64 --dtype bfloat16 \\
        --steps 50                                            # one GPU, same code path

Each device count runs in a fresh child process (the CPU device count must be fixed before jax
starts: `--xla_force_host_platform_device_count=N`; on a GPU or TPU the real devices are used and
`--devices` picks how many). The child runs the real trainer, `train.train_and_evaluate`, on the
Fashion-MNIST images shipped with the package (quick-start recipe: ADNCE, ResNet-18 CIFAR stem,
online probe, views made on the device), with the global batch fixed, so with N devices each holds
batch/N rows, the loss gathers negatives from all of them and BatchNorm reduces over all of them.
It logs every step; the step time is the median, over the steps after `--warmup`, of the wall
time between consecutive log lines (the whole loop: host batch, global array, jitted step, metric
fetch). The first step's time (compilation included) is reported apart.

On one CPU, N "devices" share the same cores: the table shows what the sharded program, its
collectives and (on the CPU only) the per-step synchronisation cost, not a speed-up. Speed-up
needs real devices. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

import record  # benchmarks/record.py, beside this script

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--devices", default="1,8", help="comma-separated device counts")
  parser.add_argument("--batch", type=int, default=64, help="global batch (images per step)")
  parser.add_argument("--steps", type=int, default=20, help="timed steps")
  parser.add_argument("--warmup", type=int, default=3, help="untimed steps (compilation)")
  parser.add_argument("--model", default="resnet18", help="resnet18 | resnet34 | resnet50")
  parser.add_argument("--width", type=int, default=8, help="ResNet base width (64 = standard)")
  parser.add_argument("--dtype", default="float32", help="float32 | bfloat16")
  parser.add_argument("--json", default="", help="also write the rows to this file "
                      "(for benchmarks/plot.py)")
  parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
  return parser.parse_args(argv)


def run_child(args: argparse.Namespace) -> dict:
  """In the child process: one training run on `args.child` devices; returns its timings."""
  import jax  # pylint: disable=import-outside-toplevel

  from cldro_jax import metrics as metrics_lib  # pylint: disable=import-outside-toplevel
  from cldro_jax import train  # pylint: disable=import-outside-toplevel
  from configs import quickstart  # pylint: disable=import-outside-toplevel

  config = quickstart.get_config()
  config.batch_size = args.batch
  config.total_steps = args.warmup + args.steps
  config.log_every_steps = 1
  config.checkpoint_every_steps = 10**9   # only the final save, after the timed steps
  config.progress_bar = False
  config.mesh.num_devices = args.child
  config.model.name = args.model
  config.model.width = args.width
  config.model.dtype = args.dtype
  config.eval.every_epochs = 0
  config.eval.linear_probe = "none"
  config.eval.untrained_baseline = False
  with tempfile.TemporaryDirectory() as workdir:
    train.train_and_evaluate(config, workdir)
    lines = metrics_lib.read_metrics(workdir, "train")
  # examples_per_sec of a one-step window is batch / (time since the previous log line).
  seconds = [args.batch / r["examples_per_sec"] for r in lines]
  timed = seconds[args.warmup:]
  return {"devices": args.child, "platform": jax.devices()[0].platform, "jax": jax.__version__,
          "device_kind": jax.devices()[0].device_kind, "first_step_s": seconds[0],
          "median_step_s": statistics.median(timed), "min_step_s": min(timed),
          "steps": len(timed)}


def spawn(args: argparse.Namespace, devices: int) -> dict:
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
  argv = [sys.executable, os.path.abspath(__file__), f"--child={devices}",
          f"--batch={args.batch}", f"--steps={args.steps}", f"--warmup={args.warmup}",
          f"--model={args.model}", f"--width={args.width}", f"--dtype={args.dtype}"]
  done = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, check=False)
  if done.returncode != 0:
    raise RuntimeError(f"the {devices}-device run failed:\n{done.stderr[-4000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def table(args: argparse.Namespace, rows: list[dict]) -> str:
  base = rows[0]["median_step_s"]
  header = ("| devices | global batch | per device | median step ms | min step ms | images/s | "
            "step time vs first row | first step s (compile) |")
  out = [header, "|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    out.append(
        f"| {r['devices']} | {args.batch} | {args.batch // r['devices']} | "
        f"{r['median_step_s'] * 1e3:.1f} | {r['min_step_s'] * 1e3:.1f} | "
        f"{args.batch / r['median_step_s']:,.0f} | {r['median_step_s'] / base:.2f}x | "
        f"{r['first_step_s']:.1f} |")
  return "\n".join(out)


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.child:
    print(json.dumps(run_child(args)))
    return
  counts = [int(n) for n in args.devices.split(",")]
  for n in counts:
    if n < 1 or args.batch % n:
      raise SystemExit(f"--batch={args.batch} must divide over {n} devices")
  rows, out = [], None
  for n in counts:
    rows.append(spawn(args, n))
    if out is None:   # this process never starts JAX: its children hold the devices
      out = record.JsonRecord(
          args.json, "scaling", env=record.environment(
              backend=rows[0]["platform"], device_kind=rows[0]["device_kind"],
              device_count=max(counts), jax=rows[0]["jax"]),
          batch=args.batch, model=args.model, width=args.width, dtype=args.dtype,
          steps=args.steps, warmup=args.warmup)
    out.add(**rows[-1], images_per_s=args.batch / rows[-1]["median_step_s"])
  print(f"# {datetime.date.today()}  {rows[0]['platform']} ({rows[0]['device_kind']}), "
        f"{os.cpu_count()} host cores, {platform.processor() or platform.machine()}; "
        f"{args.model} width {args.width} {args.dtype}, {rows[0]['steps']} timed steps after "
        f"{args.warmup} warm-up")
  print(f"# command: python benchmarks/{' '.join(['scaling.py'] + sys.argv[1:])}")
  print(table(args, rows))


if __name__ == "__main__":
  main()
