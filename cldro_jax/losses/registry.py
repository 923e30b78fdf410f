"""Training objectives by name: what `--config.loss.name=NAME` trains with.

The trainer, config validation and the start-up "not used by this run" warning all read this one
table, so a loss registered here (from a module named in `--config.imports`) is a training
objective like the built-in ones:

    losses.register_objective("cauchy_nce", cauchy_nce,
                              hyperparameters=("temperature", "mu", "sigma"))

See docs/extending.md.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Callable

from cldro_jax import _registering
from cldro_jax.losses._common import VARIANTS


@dataclasses.dataclass(frozen=True)
class Objective:
  """A loss the trainer can train with.

  fn: ``fn(z1, z2, *, <hyperparameters>, [variant,] valid, labels, axis_name, [block_size])``
    returning the scalar global mean loss (the contract of `losses.infonce`).
  hyperparameters: the `config.loss` fields passed to ``fn`` as keywords of the same name.
  variants: the domains it is defined for ("image", "sentence", "graph").
  blockwise: ``fn`` takes ``block_size`` (the memory-bounded path, `config.loss.block_size`).
  takes_variant: ``fn`` takes ``variant`` (else it is defined in the image form only).
  """
  name: str
  fn: Callable
  hyperparameters: tuple[str, ...]
  variants: tuple[str, ...]
  blockwise: bool
  takes_variant: bool


_OBJECTIVES: dict[str, Objective] = {}
# Keywords the trainer passes itself: not hyperparameter names.
_TRAINER_KEYWORDS = ("variant", "valid", "labels", "axis_name", "block_size")
_REQUIRED_KEYWORDS = ("valid", "labels", "axis_name")
# Names whose trainer logic (adaptive mu/sigma, logged weight statistics) goes by name.
BUILTIN_OBJECTIVES = ("infonce", "adnce", "dcl", "hcl", "kl_dro", "chi2_dro", "mean_variance")


def register_objective(name: str, fn: Callable, *, hyperparameters: tuple[str, ...] | list[str],
                       variants: tuple[str, ...] | list[str] = VARIANTS,
                       replace: bool = False) -> Objective:
  """Makes ``fn`` trainable as ``--config.loss.name=name``; returns its entry.

  ``blockwise`` and ``takes_variant`` are read from ``fn``'s signature: it takes ``block_size``
  and ``variant`` only if it names them (a function taking only ``**kwargs`` gets ``variant``
  unless registered with ``variants=("image",)``, and no ``block_size``). A hyperparameter that
  is not a field of the default `config.loss` (e.g. ``gamma``) must be added by the config file
  (``config.loss.gamma = 2.0``) before it can be overridden on the command line.
  """
  if not isinstance(name, str) or not name.isidentifier():
    raise ValueError(f"an objective's name must be an identifier, got {name!r}")
  if not callable(fn):
    raise ValueError(f"register_objective({name!r}, fn): fn must be callable, got {fn!r}")
  _registering.check_new_entry("loss", {n: o.fn for n, o in _OBJECTIVES.items()}, name, fn,
                               replace, builtin=BUILTIN_OBJECTIVES)
  label = getattr(fn, "__name__", repr(fn))
  hyperparameters = tuple(hyperparameters)
  reserved = [k for k in hyperparameters if k in _TRAINER_KEYWORDS]
  if reserved:
    raise ValueError(f"register_objective({name!r}): {reserved} are passed by the trainer, not "
                     "config.loss hyperparameters")
  parameters = inspect.signature(fn).parameters
  accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
  missing = [k for k in (*hyperparameters, *_REQUIRED_KEYWORDS)
             if k not in parameters and not accepts_any]
  if missing:
    raise ValueError(f"register_objective({name!r}): {label} takes no keyword(s) "
                     f"{missing}; the trainer calls fn(z1, z2, *, <hyperparameters>, variant, "
                     "valid, labels, axis_name)")
  unfilled = [k for k, p in list(parameters.items())[2:]
              if p.default is inspect.Parameter.empty
              and p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
              and k not in hyperparameters and k not in _TRAINER_KEYWORDS]
  if unfilled:
    raise ValueError(f"register_objective({name!r}): {label} requires {unfilled}, which the "
                     "trainer would not pass; list them in hyperparameters=")
  variants = tuple(variants)
  unknown = [v for v in variants if v not in VARIANTS]
  if unknown or not variants:
    raise ValueError(f"register_objective({name!r}): variants must be a non-empty subset of "
                     f"{VARIANTS}, got {variants}")
  takes_variant = "variant" in parameters or (accepts_any and variants != ("image",))
  if not takes_variant and variants != ("image",):
    raise ValueError(f"register_objective({name!r}): {label} takes no `variant`, so it "
                     "can only be registered with variants=('image',)")
  objective = Objective(name=name, fn=fn, hyperparameters=hyperparameters, variants=variants,
                        blockwise="block_size" in parameters, takes_variant=takes_variant)
  _OBJECTIVES[name] = objective
  return objective


def objective_names() -> tuple[str, ...]:
  """Every registered objective's name, built-in ones first."""
  return tuple(_OBJECTIVES)


def get_objective(name: str) -> Objective:
  """The registered objective ``name``; a clear error naming the others and how to add one."""
  try:
    return _OBJECTIVES[name]
  except KeyError:
    raise ValueError(
        f"no loss named {name!r}; registered: {', '.join(_OBJECTIVES)}. A loss of your own is "
        "registered with cldro_jax.losses.register_objective in a module that "
        "--config.imports=MODULE names (docs/extending.md)") from None
