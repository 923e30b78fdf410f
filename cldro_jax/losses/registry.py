"""Training objectives by name: what `--config.loss.name=NAME` trains with.

The trainer, config validation and the start-up "not used by this run" warning all read this one
table, so a loss registered here (from a module named in `--config.imports`) is a training
objective like the built-in ones:

    losses.register_objective("cauchy_nce", cauchy_nce, hyperparameters=("temperature", "gamma"))

See docs/extending.md.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Callable

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
_REQUIRED_KEYWORDS = ("valid", "labels", "axis_name")


def register_objective(name: str, fn: Callable, *, hyperparameters: tuple[str, ...] | list[str],
                       variants: tuple[str, ...] | list[str] = VARIANTS,
                       replace: bool = False) -> Objective:
  """Makes ``fn`` trainable as ``--config.loss.name=name``; returns its entry.

  ``blockwise`` and ``takes_variant`` are read from ``fn``'s signature. A hyperparameter that is
  not a field of the default `config.loss` (e.g. ``gamma``) must be added by the config file
  (``config.loss.gamma = 2.0``) before it can be overridden on the command line.
  """
  if not isinstance(name, str) or not name.isidentifier():
    raise ValueError(f"an objective's name must be an identifier, got {name!r}")
  if name in _OBJECTIVES and not replace and _OBJECTIVES[name].fn is not fn:
    raise ValueError(f"a loss named {name!r} is already registered ({_OBJECTIVES[name].fn}); "
                     "pick another name, or pass replace=True")
  if not callable(fn):
    raise ValueError(f"register_objective({name!r}, fn): fn must be callable, got {fn!r}")
  parameters = inspect.signature(fn).parameters
  accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
  hyperparameters = tuple(hyperparameters)
  missing = [k for k in (*hyperparameters, *_REQUIRED_KEYWORDS)
             if k not in parameters and not accepts_any]
  if missing:
    raise ValueError(f"register_objective({name!r}): {fn.__name__} takes no keyword(s) "
                     f"{missing}; the trainer calls fn(z1, z2, *, <hyperparameters>, variant, "
                     "valid, labels, axis_name)")
  variants = tuple(variants)
  unknown = [v for v in variants if v not in VARIANTS]
  if unknown or not variants:
    raise ValueError(f"register_objective({name!r}): variants must be a non-empty subset of "
                     f"{VARIANTS}, got {variants}")
  takes_variant = "variant" in parameters or accepts_any
  if not takes_variant and variants != ("image",):
    raise ValueError(f"register_objective({name!r}): {fn.__name__} takes no `variant`, so it "
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
