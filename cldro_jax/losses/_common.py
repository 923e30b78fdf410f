"""Shared helpers of the loss library: dtypes, row normalisation, validation.

Everything here is small and pure. Validation happens at trace time: Python numbers and concrete
arrays are checked and raise ``ValueError`` with the fix; traced values (jit arguments) cannot be
inspected when traced, so a jitted caller can change them without recompiling, and an
out-of-range one makes the result NaN (``nan_when_traced_out_of_range``).
"""
from __future__ import annotations

import functools
import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

VARIANTS = ("image", "sentence", "graph")

# Fill value of masked logits. A finite number (not -inf) on purpose: a row whose entries are
# all masked then has a finite logsumexp and a finite (uniform) softmax, so its gradient is
# finite and is zeroed by the row mask afterwards. With -inf the softmax of such a row is 0/0
# and the NaN would leak through `where` into the gradient. -1e30 is far below any real logit
# (|cos/t| <= 1/t) and still exactly representable in float32.
NEG_FILL = -1e30


def compute_dtype(dtype) -> jnp.dtype:
  """float32 for half precision (and integer) inputs, float64 stays float64 when x64 is on."""
  return jnp.promote_types(dtype, jnp.float32)


def l2_normalize_rows(z: jax.Array) -> jax.Array:
  """Rows scaled to unit L2 norm; an all-zero row stays zero (so its cosines are 0).

  The row is first divided by its largest absolute entry (a stop-gradient scale: the result is
  scale invariant, so this changes no derivative) so that the squared norm neither overflows nor
  underflows for any finite input. The gradient with respect to an all-zero row is defined as 0.
  A row holding NaN or inf becomes NaN, so the loss is NaN: a diverged model must not look like
  one whose projections are zero.
  """
  scale = jax.lax.stop_gradient(jnp.max(jnp.abs(z), axis=-1, keepdims=True))
  nonzero = scale != 0   # NaN != 0 holds: NaN rows take the division path and stay NaN
  scaled = z / jnp.where(nonzero, scale, 1.0)
  sq_norm = jnp.sum(scaled * scaled, axis=-1, keepdims=True)  # in [1, d] for nonzero rows
  return jnp.where(nonzero, scaled * jax.lax.rsqrt(jnp.where(nonzero, sq_norm, 1.0)), 0.0)


def gaussian_log_weight(sim: jax.Array, mu, half_inv_var) -> jax.Array:
  """ADNCE's log g(s) = -(s - mu)^2 / (2 sigma^2), up to a constant that cancels in g / mean(g).

  Computed as -(s - b)(s - 2 mu + b) / (2 sigma^2), b = clip(mu, -1, 1): the same as log g when
  mu lies in [-1, 1] (b = mu), and log g + (mu - b)^2 / (2 sigma^2) otherwise. The constant
  keeps the values near 0 at the cosines closest to mu; with mu outside [-1, 1] and a small
  sigma every raw log g would be a large negative number next to which s / t and the
  differences between candidates round away in float32.
  """
  nearest = jnp.clip(mu, -1.0, 1.0)
  return -(sim - nearest) * (sim - 2.0 * mu + nearest) * half_inv_var


def is_traced(x: Any) -> bool:
  return isinstance(x, jax.core.Tracer)


def concrete_scalar(x: Any, name: str, dtype=None) -> float | None:
  """The value of a hyperparameter when known at trace time, else None (traced).

  With ``dtype`` (the loss's compute dtype) the value as the loss will use it, rounded to that
  dtype: the range checks then see what is computed (1e-46 is 0 in float32, 1 - 1e-9 is 1).
  """
  if is_traced(x):
    return None
  if isinstance(x, bool):
    raise ValueError(f"{name} must be a real number, got the bool {x!r}.")
  arr = np.asarray(x)
  if arr.shape != ():
    raise ValueError(f"{name} must be a scalar, got an array of shape {arr.shape}.")
  if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
    raise ValueError(f"{name} must be a real number, got {x!r} of dtype {arr.dtype}.")
  value = float(arr)
  if not np.isfinite(value):
    raise ValueError(f"{name} must be finite, got {value}.")
  if dtype is None:
    return value
  with np.errstate(over="ignore"):
    rounded = float(np.asarray(value, dtype=np.dtype(dtype)))
  if not np.isfinite(rounded):
    raise ValueError(f"{name}={value} overflows {np.dtype(dtype).name}, the dtype the loss "
                     "computes in (its inputs' dtype, at least float32).")
  return rounded


def _as_computed(x: Any, value: float, dtype) -> str:
  """`value` for a message, saying when it is the rounding of what the caller passed."""
  exact = float(np.asarray(x))
  if value == exact:
    return f"{value}"
  return (f"{exact}, which is {value} in {np.dtype(dtype).name} (the dtype the loss computes "
          "in: its inputs' dtype, at least float32)")


def check_positive(x: Any, name: str, dtype=None) -> float | None:
  """Raises unless x > 0 (as computed in `dtype`); returns the value (None when traced)."""
  value = concrete_scalar(x, name, dtype)
  if value is not None and value <= 0:
    raise ValueError(f"{name} must be > 0, got {_as_computed(x, value, dtype)}. Pass a positive "
                     f"number, e.g. {name}=0.5.")
  return value


def check_temperature(x: Any, dtype=None) -> None:
  """t > 0 with a finite 1/t in the compute dtype (the logits are cos * (1/t))."""
  value = check_positive(x, "temperature", dtype)
  if value is not None and dtype is not None:
    with np.errstate(over="ignore", divide="ignore"):
      inverse = np.asarray(1.0, np.dtype(dtype)) / np.asarray(value, np.dtype(dtype))
    if not np.isfinite(inverse):
      raise ValueError(f"temperature={float(np.asarray(x))} is too small: 1/t overflows "
                       f"{np.dtype(dtype).name}, the dtype the loss computes in.")


def check_nonnegative(x: Any, name: str, dtype=None) -> None:
  value = concrete_scalar(x, name, dtype)
  if value is not None and value < 0:
    raise ValueError(f"{name} must be >= 0, got {_as_computed(x, value, dtype)}.")


def check_tau_plus(x: Any, dtype=None) -> None:
  value = concrete_scalar(x, "tau_plus", dtype)
  if value is not None and not 0.0 <= value < 1.0:
    raise ValueError(f"tau_plus (the class prior of DCL/HCL) must lie in [0, 1), got "
                     f"{_as_computed(x, value, dtype)}; the reference default is tau_plus=0.1.")


def check_real(x: Any, name: str, dtype=None) -> None:
  concrete_scalar(x, name, dtype)


def check_variant(variant: str) -> None:
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; use one of {VARIANTS} "
                     "('image': symmetric 2B anchors, 'sentence': SimCSE, 'graph': GraphCL).")


def check_block_size(block_size: int | None) -> None:
  if block_size is None:
    return
  if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral):
    raise ValueError(f"block_size must be None (dense) or a positive int, got {block_size!r}.")
  if block_size < 1:
    raise ValueError(f"block_size must be a positive int, got {block_size}.")


def check_views(z1: Any, z2: Any) -> None:
  """Shapes and dtypes of the two views: (B, d) each, floating, identical shapes."""
  for name, z in (("z1", z1), ("z2", z2)):
    if not hasattr(z, "shape") or not hasattr(z, "dtype"):
      raise ValueError(f"{name} must be an array of shape (B, d), got {type(z).__name__}.")
    if len(z.shape) != 2:
      raise ValueError(f"{name} must be 2-D (B, d) projections, got shape {tuple(z.shape)}; "
                       "flatten extra axes first, e.g. z.reshape(z.shape[0], -1).")
    if not jnp.issubdtype(z.dtype, jnp.floating):
      raise ValueError(f"{name} must be floating point, got dtype {z.dtype}; cast it, e.g. "
                       f"{name}.astype(jnp.float32).")
    if z.shape[1] == 0:
      raise ValueError(f"{name} has shape {tuple(z.shape)}: projections need d >= 1 features "
                       "(an empty projection has no cosine).")
  if tuple(z1.shape) != tuple(z2.shape):
    raise ValueError(f"z1 and z2 must have the same shape (row i of each is the same example), "
                     f"got {tuple(z1.shape)} and {tuple(z2.shape)}.")


def check_row_array(x: Any, name: str, batch: int, kind: str) -> None:
  """`valid` (bool) or `labels` (int) must be a (B,) array matching the local batch."""
  if x is None:
    return
  if not hasattr(x, "shape"):
    raise ValueError(f"{name} must be an array of shape ({batch},), got {type(x).__name__}.")
  if tuple(x.shape) != (batch,):
    raise ValueError(f"{name} must have shape ({batch},) (one entry per row of z1/z2 on this "
                     f"device), got {tuple(x.shape)}.")
  if kind == "bool" and x.dtype != jnp.bool_:
    raise ValueError(f"{name} must be a bool array, got dtype {x.dtype}; use e.g. "
                     f"{name}.astype(bool).")
  if kind == "int" and not jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError(f"{name} must be an integer array, got dtype {x.dtype}.")


def check_enough_rows(batch: int, axis_size: int, valid: Any) -> None:
  """At least two (valid) rows overall, otherwise no anchor has a negative."""
  global_batch = batch * axis_size
  if global_batch < 2:
    raise ValueError(f"a contrastive loss needs at least 2 rows, got a global batch of "
                     f"{global_batch}.")
  if valid is not None and not is_traced(valid) and axis_size == 1:
    n_valid = int(np.asarray(valid).sum())
    if n_valid < 2:
      raise ValueError(f"`valid` marks {n_valid} row(s) as valid; at least 2 are needed so "
                       "that anchors have negatives. Drop the batch or pad it with real rows.")


# Each hyperparameter's valid range, for values known only when the program runs.
_TRACED_RANGES: dict[str, Callable[[jax.Array], jax.Array]] = {
    "temperature": lambda x: x > 0,
    "sigma": lambda x: x > 0,
    "eta": lambda x: x >= 0,
    "tau_plus": lambda x: (x >= 0) & (x < 1),
    "mu": jnp.isfinite,
    "beta": jnp.isfinite,
    "mu_quantile": lambda x: (x >= 0) & (x <= 1),   # adaptive_mu_sigma
    "sigma_scale": lambda x: x > 0,
}


def nan_when_traced_out_of_range(loss_fn: Callable[..., Any]) -> Callable[..., Any]:
  """Makes every floating output (and so its gradient) NaN when a traced hyperparameter lies
  outside its range.

  A Python number is checked when the loss is traced and raises; a traced array (a temperature
  schedule, say) cannot raise, and an out-of-range value would otherwise give a finite, wrong
  loss. NaN is what the trainer's non-finite check, `jax_debug_nans` and `checkify` catch.
  """
  @functools.wraps(loss_fn)
  def checked(*args, **kwargs):
    out = loss_fn(*args, **kwargs)
    in_range = [rule(jnp.asarray(kwargs[name])) for name, rule in _TRACED_RANGES.items()
                if is_traced(kwargs.get(name))]
    if not in_range:
      return out
    # times 1 or NaN: the value is exact when in range, and the gradient is NaN too when not
    factor = jnp.where(functools.reduce(jnp.logical_and, in_range), 1.0, jnp.nan)
    return jax.tree.map(
        lambda x: x * factor.astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
        out)
  return checked
