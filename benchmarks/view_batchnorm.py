r"""Both views in one forward pass (per-view BatchNorm, `ViewBatchNorm`) vs one pass per view.

  python benchmarks/view_batchnorm.py                                   # GPU: batch 512, bf16
  python benchmarks/view_batchnorm.py --batch 32 --width 16 --dtype float32   # CPU

Times the jitted forward + backward of encoder + projection head on B images per view (2B rows),
median after warm-up, the variants taking turns in the same process: the reference's two passes (one per view,
BatchNorm statistics and running-average updates per view) and the trainer's single pass over the
interleaved views with the same per-view statistics. The two compute the same numbers
(tests/test_view_norm.py); this measures what the single pass saves. A third column times one
pass with BatchNorm statistics over both views (`bn_over_views`, a different normalisation), for
comparison.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import functools
import statistics
import time

import jax
import jax.numpy as jnp

from cldro_jax.models import heads
from cldro_jax.models import resnet
from cldro_jax.models import view_norm


def median_ms(fns, args, warmup: int, iters: int) -> list[float]:
  """Median time of each function; the functions take turns, so drifting load hits all alike."""
  for fn in fns:
    for _ in range(warmup):
      jax.block_until_ready(fn(*args))
  times = [[] for _ in fns]
  for _ in range(iters):
    for fn, fn_times in zip(fns, times, strict=True):
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      fn_times.append(time.perf_counter() - start)
  return [1e3 * statistics.median(t) for t in times]


def grad_fns(model):
  def objective(z1, z2):   # stands in for the loss: touches both views' projections
    return jnp.mean(jnp.sum(z1 * z2, axis=-1))

  def two_passes(params, batch_stats, view1, view2):
    (_, z1), upd = model.apply({"params": params, "batch_stats": batch_stats}, view1,
                               train=True, mutable=["batch_stats"])
    (_, z2), upd = model.apply({"params": params, **upd}, view2, train=True,
                               mutable=["batch_stats"])
    return objective(z1, z2), upd

  def one_pass(params, batch_stats, view1, view2, num_views):
    both = view_norm.interleave_views(view1, view2)
    (_, z), upd = model.apply({"params": params, "batch_stats": batch_stats}, both, train=True,
                              num_views=num_views, mutable=["batch_stats"])
    return objective(z[0::2], z[1::2]), upd

  def grad(fn):
    return jax.jit(jax.value_and_grad(fn, has_aux=True))
  return (grad(two_passes), grad(functools.partial(one_pass, num_views=2)),
          grad(functools.partial(one_pass, num_views=1)))


def main():
  on_gpu = jax.default_backend() == "gpu"
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default="resnet18,resnet50")
  parser.add_argument("--batch", type=int, default=512 if on_gpu else 32)
  parser.add_argument("--width", type=int, default=64 if on_gpu else 16)
  parser.add_argument("--dtype", default="bfloat16" if on_gpu else "float32")
  parser.add_argument("--warmup", type=int, default=5 if on_gpu else 2)
  parser.add_argument("--iters", type=int, default=30 if on_gpu else 7)
  args = parser.parse_args()
  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  print(f"# {datetime.date.today()}  {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"jax {jax.__version__}; batch {args.batch} per view, width {args.width}, {args.dtype}, "
        f"median of {args.iters} after {args.warmup} warm-up")
  print(f"# command: python benchmarks/{' '.join(['view_batchnorm.py'] + sys.argv[1:])}")
  print("| model | two passes ms | one pass ms | speed-up | one pass, BN over both views ms |")
  print("|---|---:|---:|---:|---:|")
  for name in args.models.split(","):
    model = heads.ContrastiveModel(
        encoder=resnet.get_encoder(name, stem="cifar", width=args.width, dtype=dtype),
        head=heads.ProjectionHead(dtype=dtype))
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    view1 = jax.random.normal(k1, (args.batch, 32, 32, 3))
    view2 = jax.random.normal(k2, (args.batch, 32, 32, 3))
    variables = model.init(k3, view1[:2], train=False)
    inputs = (variables["params"], variables["batch_stats"], view1, view2)
    t_two, t_one, t_merged = median_ms(grad_fns(model), inputs, args.warmup, args.iters)
    print(f"| {name} | {t_two:.2f} | {t_one:.2f} | {t_two / t_one:.2f}x | {t_merged:.2f} |",
          flush=True)


if __name__ == "__main__":
  main()
