"""The one rule the name registries (losses, image encoders, image data sources) share."""
from __future__ import annotations

from typing import Any


def _definition(value: Any) -> tuple[Any, Any] | None:
  qualname = getattr(value, "__qualname__", None)
  return None if qualname is None else (getattr(value, "__module__", None), qualname)


def check_new_entry(kind: str, registry: dict[str, Any], name: str, value: Any,
                    replace: bool, builtin: tuple[str, ...] = ()) -> None:
  """Refuses to register `value` under a name another definition already holds.

  The same definition again is fine: a module imported twice or reloaded in a notebook
  (`importlib.reload`) makes new function objects with the same module and qualified name.
  """
  if name not in registry:
    return
  if name in builtin and registry[name] is not value:
    raise ValueError(f"{name!r} is a built-in {kind}; register yours under another name")
  old = registry[name]
  same = old is value or (_definition(old) is not None and _definition(old) == _definition(value))
  if not same and not replace:
    raise ValueError(f"a {kind} named {name!r} is already registered ({old!r}); pick another "
                     "name, or pass replace=True")
