"""The full config schema, with defaults, and its validation.

Every experiment config (`configs/*.py`) starts from `base_config(domain)` and overrides fields.
`validate_config` rejects keys the schema does not know (a typo in a config file would otherwise
be ignored silently) and values that cannot work, with a message naming the fix. Overrides on the
command line (`--config.loss.mu=0.5`) are checked by ml_collections itself: the config is locked.

Project-wide decisions: loss settings live under `config.loss` as `name, temperature, mu, sigma,
tau_plus, beta`; the device mesh has one axis, `"data"`.
"""

from __future__ import annotations

import difflib
import importlib
import math
from typing import Any

import ml_collections
from ml_collections import config_dict

from cldro_jax import losses
from cldro_jax.losses import registry

DOMAINS = ("image", "sentence", "graph")
# The built-in training objectives of `--config.loss.name` (cldro_jax/losses/__init__.py); a
# module named in `config.imports` may register more (docs/extending.md).
LOSS_NAMES = registry.BUILTIN_OBJECTIVES
# The names `jax.default_matmul_precision` accepts (both spellings).
MATMUL_PRECISIONS = ("highest", "high", "default", "float32", "tensorfloat32", "bfloat16")


def _loss_defaults() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name="adnce",
      temperature=0.5,
      mu=0.7,
      sigma=1.0,
      tau_plus=0.1,
      beta=1.0,
      # Radius of the chi-square ball of chi2_dro (`-f+ + mean + sqrt(eta Var)`); 0 gives the
      # "basic" objective -f+ + mean(f_neg) that Theorem 3.5 contrasts CL with.
      eta=1.0,
      # Column-block size of the memory-bounded loss path; 0 uses the dense path.
      block_size=0,
      # Precision of the loss's similarity matmuls (and its diagnostics') in the trainer, as
      # `jax.default_matmul_precision` takes it. "highest" is true float32 on every backend, as
      # the reference's PyTorch computes its logits; "default" lets NVIDIA GPUs use TF32 and TPUs
      # one bfloat16 pass (cosines to about 3 digits: at t=0.05 logits off by up to ~0.1). The
      # matmul is B x 2B x d, negligible beside the encoder at the recipes' batch sizes.
      matmul_precision="highest",
      # Remove same-label candidates from the negatives (the "oracle" of the sampling-bias
      # experiment; needs labels for every training example).
      use_labels=False,
      # Adaptive ADNCE (cldro_jax/losses/adaptive.py): mu and sigma recomputed every step from
      # the batch's negative cosines instead of fixed. mu_rule "quantile": mu = the mu_quantile
      # quantile of the negatives; sigma_rule "std": sigma = sigma_scale x their std.
      mu_rule="fixed",
      mu_quantile=0.9,
      sigma_rule="fixed",
      sigma_scale=1.0,
  ))


def _optim_defaults() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name="adam",            # adam | adamw | lars | sgd
      lr=1e-3,
      weight_decay=1e-6,      # adam: coupled L2 (PyTorch's Adam); adamw: decoupled, 1-D exempt
      momentum=0.9,           # sgd, lars
      schedule="constant",    # constant | warmup_cosine | linear_decay
      warmup_epochs=0.0,
      min_lr_ratio=0.0,       # cosine floor as a fraction of lr
      grad_clip_norm=0.0,     # 0 disables
  ))


def _image_defaults() -> ml_collections.ConfigDict:
  # The data fields belong to the data module (it documents each one).
  from cldro_jax.data import images  # pylint: disable=import-outside-toplevel
  data = images.default_data_config()
  model = ml_collections.ConfigDict(dict(
      name="resnet50",        # resnet18 | resnet34 | resnet50
      stem="cifar",           # cifar (3x3 stride 1, no max-pool) | imagenet
      # Init of the stem conv: torchvision (kaiming normal fan_out, like every other conv) |
      # conv_default (torch's nn.Conv2d default, which the reference's replaced stem keeps).
      stem_init="torchvision",
      width=64,
      head_hidden=512,
      head_out=128,
      dtype="float32",        # compute dtype: float32 | bfloat16 (parameters stay float32)
      bn_over_views=False,    # False: BatchNorm statistics per view (reference); True: over both
      # Per-view BatchNorm in one forward pass over both views (same numbers as the reference's
      # pass per view; benchmarks/view_batchnorm.py measures which is faster on your hardware).
      views_in_one_pass=False,
  ))
  augment = ml_collections.ConfigDict(dict(
      crop_size=32,           # pre-training crop size (STL10 pre-trains on 32x32 crops of 96x96)
      crop_scale=(0.08, 1.0),
      crop_ratio=(3 / 4, 4 / 3),
      flip_prob=0.5,
      jitter_prob=0.8,
      brightness=0.4,
      contrast=0.4,
      saturation=0.4,
      hue=0.1,
      grayscale_prob=0.2,
      blur_prob=0.5,
      blur_kernel=3,
      blur_sigma=(0.1, 2.0),
      mean=(0.4914, 0.4822, 0.4465),
      std=(0.2023, 0.1994, 0.2010),
  ))
  evaluation = ml_collections.ConfigDict(dict(
      every_epochs=1,         # kNN monitor + online probe accuracy (0 disables)
      knn_k=200,
      knn_temperature=0.0,    # 0 = the loss temperature, as the reference
      knn_max_bank=0,         # use at most this many bank images (0 = all)
      online_probe=True,
      online_probe_lr=1e-3,
      batch_size=512,
      probe_image_size=0,     # linear-probe / kNN input size (0 = stored size; STL10: 96)
      # Offline linear probe after training: "reference" (augmented images through the frozen
      # encoder, as the authors' linear.py), "features" (fast, on cached features), or "none".
      linear_probe="reference",
      linear_probe_epochs=100,
      linear_probe_lr=1e-3,
      linear_probe_weight_decay=1e-6,
      linear_probe_batch_size=512,
      # "reference" probe only: let BatchNorm running statistics update while the probe trains
      # (what the authors' linear.py does); False keeps the encoder truly frozen.
      probe_update_bn=False,
      # Also probe the untrained encoder (same seed, same protocol) as a baseline.
      untrained_baseline=False,
  ))
  return ml_collections.ConfigDict(dict(data=data, model=model, augment=augment,
                                        eval=evaluation))


def base_config(domain: str = "image") -> ml_collections.ConfigDict:
  """Every field a config of `domain` may set, with its default."""
  if domain not in DOMAINS:
    raise ValueError(f"Unknown domain {domain!r}; expected one of {DOMAINS}.")
  config = ml_collections.ConfigDict()
  config.domain = domain
  config.seed = 2023
  config.batch_size = 256           # global: examples per step (each gives two views)
  config.total_epochs = 400.0
  config.total_steps = 0            # > 0 overrides total_epochs
  config.log_every_steps = 50
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 3
  config.progress_bar = True
  # A workdir whose latest checkpoint's encoder (parameters and BatchNorm statistics) starts this
  # run instead of a fresh initialisation, e.g. to continue an InfoNCE run with another loss; the
  # optimizer, the online probe and the step start afresh. Used on a first start only (a resume
  # continues from this workdir's own checkpoint). "" = initialise as usual.
  config.init_from = ""
  # Trace this many train steps (after 3 warm-up steps of each start) with jax.profiler into
  # WORKDIR/profile/ and print the step's device time by phase (augmentation, encoder forward and
  # backward, loss, optimizer) with its heaviest operations (cldro_jax/profiling.py). 0 = off.
  config.profile_steps = 0
  # Comma-separated Python modules imported before the config is checked, by the run and by
  # everything that later reads its workdir (probe, load_encoder, resume): where your own losses,
  # encoders and data sources register themselves (docs/extending.md). "" = none.
  config.imports = ""
  config.loss = _loss_defaults()
  config.optim = _optim_defaults()
  config.mesh = ml_collections.ConfigDict(dict(num_devices=-1))   # -1 = all devices
  if domain == "image":
    config.update(_image_defaults())
  else:
    # The sentence and graph schemas live with their tasks, which extend this base.
    from cldro_jax import tasks  # pylint: disable=import-outside-toplevel
    config.update(tasks.domain_defaults(domain))
  return config


def _unknown_keys(config: Any, schema: Any, prefix: str = "") -> list[str]:
  problems = []
  for key in config.keys():
    name = f"{prefix}{key}"
    if key not in schema:
      close = difflib.get_close_matches(key, list(schema.keys()), n=1)
      hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
      problems.append(f"unknown config key {name!r}{hint}")
    elif isinstance(config[key], (ml_collections.ConfigDict, dict)) and isinstance(
        schema[key], (ml_collections.ConfigDict, dict)):
      problems.extend(_unknown_keys(config[key], schema[key], name + "."))
  return problems


def _check(condition: bool, message: str, problems: list[str]) -> None:
  if not condition:
    problems.append(message)


def _non_finite(config: Any, prefix: str = "config.") -> list[str]:
  """Every float field (or float in a tuple field) that is NaN or infinite: no setting means
  that, and later checks such as `> 0` let inf through."""
  problems = []
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      problems.extend(_non_finite(value, name + "."))
    elif any(isinstance(v, float) and not math.isfinite(v)
             for v in (value if isinstance(value, (tuple, list)) else (value,))):
      problems.append(f"{name} must be finite, got {value}")
  return problems


def _image_problems(config: ml_collections.ConfigDict) -> list[str]:
  """Model, evaluation, augmentation and data settings of an image config that cannot work."""
  problems = []
  model, ev = config.model, config.eval
  _check(model.dtype in ("float32", "bfloat16"), "config.model.dtype must be float32 or bfloat16",
         problems)
  from cldro_jax.models import resnet  # pylint: disable=import-outside-toplevel
  _check(model.name in resnet.encoder_names(),
         f"config.model.name={model.name!r} is not one of {resnet.encoder_names()} (an encoder "
         "of your own: resnet.register_encoder in a module named by --config.imports, "
         "docs/extending.md)", problems)
  _check(model.stem_init in ("torchvision", "conv_default"),
         f"config.model.stem_init={model.stem_init!r} is not torchvision or conv_default", problems)
  for field in ("width", "head_hidden", "head_out"):
    _check(model[field] >= 1, f"config.model.{field} must be >= 1, got {model[field]}", problems)
  _check(ev.linear_probe in ("reference", "features", "none"),
         "config.eval.linear_probe must be reference, features or none", problems)
  _check(ev.every_epochs >= 0,
         f"config.eval.every_epochs must be >= 0 (0: no per-epoch monitor), got "
         f"{ev.every_epochs}", problems)
  for field in ("knn_k", "batch_size", "linear_probe_epochs", "linear_probe_batch_size"):
    _check(ev[field] >= 1, f"config.eval.{field} must be >= 1, got {ev[field]}", problems)
  for field, meaning in (("knn_max_bank", "0: every bank image"),
                         ("probe_image_size", "0: the stored size"),
                         ("knn_temperature", "0: the loss temperature"),
                         ("linear_probe_weight_decay", "0: none")):
    _check(ev[field] >= 0, f"config.eval.{field} must be >= 0 ({meaning}), got {ev[field]}",
           problems)
  for field in ("online_probe_lr", "linear_probe_lr"):
    _check(ev[field] > 0, f"config.eval.{field} must be > 0, got {ev[field]}", problems)
  # The features probe trains on cached features of the frozen encoder: no BatchNorm to update.
  if ev.probe_update_bn and ev.linear_probe == "features":
    problems.append(
        "config.eval.probe_update_bn=True applies to the reference linear probe only, but "
        "config.eval.linear_probe='features' probes cached features of the frozen encoder; "
        "set --config.eval.linear_probe=reference or --config.eval.probe_update_bn=False")
  # pylint: disable=import-outside-toplevel
  from cldro_jax.data import images
  from cldro_jax.tasks import image
  try:
    image.make_augment(config.augment, config.augment.crop_size)
  except (TypeError, ValueError) as err:
    problems.append(str(err))
  try:
    images.resolve_data_config(config.data)
  except ValueError as err:
    problems.append(str(err))
  return problems


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError listing every problem found (unknown keys, impossible values)."""
  domain = config.get("domain", None)
  if domain not in DOMAINS:
    raise ValueError(f"config.domain must be one of {DOMAINS}, got {domain!r}.")
  import_extensions(config)
  schema = base_config(domain)
  loss = config.loss
  names = losses.objective_names()
  objective = losses.get_objective(loss.name) if loss.name in names else None
  problems = []
  if objective is None:   # first: a loss registered by a module not imported explains the rest
    problems.append(
        f"config.loss.name={loss.name!r} is not one of {names} (a loss of your own: "
        "losses.register_objective in a module named by --config.imports, docs/extending.md)")
  # Registered losses' own hyperparameters are fields config files add to config.loss; a file
  # may add one and still train another loss (then the start-up warning names it as unread).
  for name in names:
    for key in losses.get_objective(name).hyperparameters:
      if key in loss and key not in schema.loss:
        schema.loss[key] = loss[key]
  for key in objective.hyperparameters if objective is not None else ():
    if key not in loss:
      problems.append(f"config.loss.name={loss.name!r} reads config.loss.{key}, which this "
                      f"config does not have: add `config.loss.{key} = VALUE` to its config "
                      "file")
  problems += _unknown_keys(config, schema)
  if problems:   # the checks below read the schema's fields
    raise ValueError("Invalid config:\n  " + "\n  ".join(problems))
  problems = _non_finite(config)
  if objective is not None and domain not in objective.variants:
    why = (f" (as in the paper: DCL and HCL have no {domain} form)"
           if loss.name in ("dcl", "hcl") else "")
    problems.append(
        f"config.loss.name={loss.name!r} is defined for "
        f"{' and '.join(v + 's' for v in objective.variants)} only{why}; use one of "
        + ", ".join(
            f"--config.loss.name={n}" for n in names
            if domain in losses.get_objective(n).variants))
  _check(loss.temperature > 0, f"config.loss.temperature must be > 0, got {loss.temperature}",
         problems)
  _check(loss.sigma > 0, f"config.loss.sigma must be > 0, got {loss.sigma}", problems)
  _check(0 <= loss.tau_plus < 1, f"config.loss.tau_plus must be in [0, 1), got {loss.tau_plus}",
         problems)
  _check(loss.eta >= 0, f"config.loss.eta must be >= 0, got {loss.eta}", problems)
  _check(loss.block_size >= 0, "config.loss.block_size must be >= 0 (0 = dense)", problems)
  _check(loss.matmul_precision in MATMUL_PRECISIONS,
         f"config.loss.matmul_precision={loss.matmul_precision!r} is not one of "
         f"{MATMUL_PRECISIONS}", problems)
  if loss.block_size and objective is not None and not objective.blockwise:
    problems.append(
        f"config.loss.name={loss.name!r} has no memory-bounded blockwise path (its function "
        f"takes no block_size); set --config.loss.block_size=0")
  _check(loss.mu_rule in ("fixed", "quantile"),
         f"config.loss.mu_rule={loss.mu_rule!r} is not one of fixed, quantile", problems)
  _check(loss.sigma_rule in ("fixed", "std"),
         f"config.loss.sigma_rule={loss.sigma_rule!r} is not one of fixed, std", problems)
  _check(0.0 <= loss.mu_quantile <= 1.0,
         f"config.loss.mu_quantile must be in [0, 1], got {loss.mu_quantile}", problems)
  _check(loss.sigma_scale > 0, f"config.loss.sigma_scale must be > 0, got {loss.sigma_scale}",
         problems)
  if (loss.mu_rule, loss.sigma_rule) != ("fixed", "fixed") and loss.name != "adnce":
    problems.append(
        f"config.loss.mu_rule/sigma_rule adapt ADNCE's weights, but config.loss.name="
        f"{loss.name!r}; use --config.loss.name=adnce or leave both rules 'fixed'")
  _check(config.batch_size >= 2, "config.batch_size must be >= 2", problems)
  _check(config.seed >= 0, f"config.seed must be >= 0, got {config.seed}", problems)
  _check(config.total_steps > 0 or config.total_epochs > 0,
         "set config.total_epochs or config.total_steps to a positive number", problems)
  _check(config.total_steps >= 0 and config.total_epochs >= 0,
         f"config.total_steps and config.total_epochs must be >= 0 (total_steps=0: use "
         f"total_epochs), got {config.total_steps} and {config.total_epochs}", problems)
  _check(config.optim.warmup_epochs >= 0,
         f"config.optim.warmup_epochs must be >= 0, got {config.optim.warmup_epochs}", problems)
  _check(config.optim.name in ("adam", "adamw", "lars", "sgd"),
         f"config.optim.name={config.optim.name!r} is not one of adam, adamw, lars, sgd", problems)
  _check(config.optim.schedule in ("constant", "warmup_cosine", "linear_decay"),
         f"config.optim.schedule={config.optim.schedule!r} is not one of constant, warmup_cosine,"
         " linear_decay", problems)
  _check(config.optim.lr > 0, "config.optim.lr must be > 0", problems)
  optim = config.optim
  for field, meaning in (("weight_decay", "0: none"), ("grad_clip_norm", "0: no clipping")):
    _check(optim[field] >= 0, f"config.optim.{field} must be >= 0 ({meaning}), got "
           f"{optim[field]}", problems)
  _check(0 <= optim.min_lr_ratio <= 1,
         f"config.optim.min_lr_ratio must be in [0, 1] (the cosine's floor as a fraction of lr), "
         f"got {optim.min_lr_ratio}", problems)
  _check(0 <= optim.momentum < 1, f"config.optim.momentum must be in [0, 1), got "
         f"{optim.momentum}", problems)
  _check(config.profile_steps >= 0,
         f"config.profile_steps must be >= 0 (0: no profile), got {config.profile_steps}",
         problems)
  for field in ("log_every_steps", "checkpoint_every_steps"):
    _check(config[field] >= 1, f"config.{field} must be >= 1, got {config[field]}", problems)
  # 0 would make orbax delete every checkpoint, the earlier ones included.
  _check(config.keep_checkpoints >= 1,
         f"config.keep_checkpoints must be >= 1 (checkpoints kept), got {config.keep_checkpoints}",
         problems)
  _check(config.mesh.num_devices == -1 or config.mesh.num_devices >= 1,
         f"config.mesh.num_devices must be -1 (all devices) or >= 1, got "
         f"{config.mesh.num_devices}", problems)
  if domain == "image":
    problems.extend(_image_problems(config))
  if problems:
    raise ValueError("Invalid config:\n  " + "\n  ".join(problems))


def import_extensions(config: Any) -> None:
  """Imports the modules `config.imports` names (comma-separated), where a run's own losses,
  encoders and data sources register themselves; a clear error when one cannot be imported."""
  for name in filter(None, (part.strip() for part in str(config.get("imports", "")).split(","))):
    try:
      importlib.import_module(name)
    except ImportError as err:
      if err.name is not None and not (name == err.name or name.startswith(err.name + ".")):
        # the module exists but something it imports does not
        raise ValueError(f"importing {name!r} (config.imports) failed: {err}; install what it "
                         "needs") from err
      raise ValueError(
          f"config.imports names the module {name!r}, which cannot be imported ({err}). Install "
          "it, or add the folder that holds it to PYTHONPATH (e.g. PYTHONPATH=$PWD python -m "
          "cldro_jax.main ...)") from err


def unused_settings(config: ml_collections.ConfigDict) -> list[str]:
  """Settings changed from the schema's defaults that this run does not read, with the reason:
  another loss's hyperparameters, an optimizer or schedule option of another optimizer or
  schedule, a data field of another image source. Empty when every changed setting is used."""
  notes = []
  defaults = base_config(config.domain)
  loss = config.loss
  used = set(losses.get_objective(loss.name).hyperparameters
             if loss.name in losses.objective_names() else ())
  unused = [key for key in ("temperature", "mu", "sigma", "tau_plus", "beta", "eta")
            if key not in used and loss[key] != defaults.loss[key]]
  if loss.mu_rule != "quantile" and loss.mu_quantile != defaults.loss.mu_quantile:
    unused.append("mu_quantile")
  if loss.sigma_rule != "std" and loss.sigma_scale != defaults.loss.sigma_scale:
    unused.append("sigma_scale")
  unused += [key for key in loss if key not in defaults.loss and key not in used]
  for key in unused:
    reason = f"not read by --config.loss.name={loss.name}"
    if key == "temperature":
      reason = (f"{loss.name}'s objective does not read it: it sets only the logged diagnostics"
                " and, for images, the kNN monitor's temperature")
    elif key in ("mu_quantile", "sigma_scale"):
      reason = "read only by " + ("mu_rule=quantile" if key == "mu_quantile" else "sigma_rule=std")
    notes.append(f"loss.{key}={loss[key]!r} ({reason})")
  optim = config.optim
  if optim.name not in ("sgd", "lars") and optim.momentum != defaults.optim.momentum:
    notes.append(f"optim.momentum={optim.momentum!r} (read by sgd and lars only, not "
                 f"--config.optim.name={optim.name})")
  if optim.schedule != "warmup_cosine" and optim.min_lr_ratio != defaults.optim.min_lr_ratio:
    notes.append(f"optim.min_lr_ratio={optim.min_lr_ratio!r} (read by the warmup_cosine "
                 f"schedule only, not --config.optim.schedule={optim.schedule})")
  if config.domain == "image":
    ev, ev_defaults = config.eval, defaults.eval
    unread = []
    if ev.linear_probe == "none":
      unread += [(key, "no offline linear probe: --config.eval.linear_probe=none")
                 for key in ("linear_probe_epochs", "linear_probe_lr", "linear_probe_weight_decay",
                             "linear_probe_batch_size", "probe_update_bn", "untrained_baseline")]
    if not ev.online_probe:
      unread.append(("online_probe_lr", "no online probe: --config.eval.online_probe=False"))
    notes.extend(f"eval.{key}={ev[key]!r} ({reason})" for key, reason in unread
                 if ev[key] != ev_defaults[key])
    from cldro_jax.data import images  # pylint: disable=import-outside-toplevel
    notes.extend(f"data.{field} (not read by --config.data.source={config.data.source})"
                 for field in images.unused_fields(config.data))
  return notes


def placeholder(kind):
  """A typed empty field that command-line overrides can still set."""
  return config_dict.placeholder(kind)


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses a config file's argument, `--config=configs/x.py:runlocal,loss=infonce`.

  Flags without a value are booleans set to True; `key=value` pairs are cast to the type of the
  default. Unknown names raise, like unknown config keys.
  """
  values = dict(defaults)
  usage = ",".join(k if isinstance(v, bool) else f"{k}={v}" for k, v in sorted(defaults.items()))
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in values:
      close = difflib.get_close_matches(key, list(values), n=1)
      hint = f"did you mean {close[0]!r}? " if close else ""
      raise ValueError(f"Unknown config argument {key!r}; {hint}this config takes "
                       f"`:{usage}` (any subset, comma-separated)")
    default = values[key]
    if not value and not isinstance(default, bool):
      # `seed` alone would otherwise set seed=True, i.e. 1.
      raise ValueError(f"Config argument {key!r} needs a value, e.g. `{key}={default}`")
    if not value:
      values[key] = True
    elif isinstance(default, bool):
      # A typo such as `runlocal=flase` must not quietly mean False.
      if value.lower() not in ("1", "true", "yes", "0", "false", "no"):
        raise ValueError(f"Config argument {key}={value!r} is not a boolean; write `{key}` "
                         f"(true) or `{key}=false`")
      values[key] = value.lower() in ("1", "true", "yes")
    else:
      try:
        values[key] = type(default)(value)
      except ValueError:
        kind = "an integer" if isinstance(default, int) else "a number"
        raise ValueError(f"Config argument {key}={value!r} is not {kind} "
                         f"(e.g. `{key}={default}`)") from None
  return ml_collections.ConfigDict(values)


def make_runlocal(config: ml_collections.ConfigDict) -> None:
  """Shrinks an image config to seconds on a laptop CPU: same code path, tiny sizes."""
  config.batch_size = 16
  config.total_steps = 4
  config.log_every_steps = 1
  config.checkpoint_every_steps = 2
  config.model.name = "resnet18"
  config.model.width = 4
  config.model.head_hidden = 16
  config.model.head_out = 8
  config.eval.every_epochs = 1
  config.eval.knn_max_bank = 64
  config.eval.batch_size = 32
  config.eval.knn_k = 5
  config.eval.linear_probe = "features"
  config.eval.probe_update_bn = False   # the features probe has no BatchNorm to update
  config.eval.linear_probe_epochs = 2
  config.eval.linear_probe_batch_size = 32
  config.progress_bar = False
