"""The documentation is executable: what README.md and docs/ tell a user to type exists and runs.

- every command line in README.md, docs/*.md and the docstrings of configs/, experiments/ and
  benchmarks/ names a file that exists, passes flags its program defines, and `--config.KEY=`
  overrides that the config schema has, and `configs/x.py:arg` arguments its config file accepts
  (a renamed flag, key or argument fails here, not on a user);
- the loss signatures listed in docs/losses.md are the functions' real signatures;
- benchmarks/h200.sh (the one GPU call) runs real benchmarks with real flags within its limit;
- the README's loss example and docs/losses.md's `jax.shard_map` train step run, and the latter's
  claim holds: on 8 devices it takes the same step as one device on the whole batch.
"""
import ast
import importlib.util
import inspect
import pathlib
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from cldro_jax import config_defaults
from cldro_jax import losses

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DOCSTRING_DIRS = ("configs", "experiments", "benchmarks")


def code_blocks(path: pathlib.Path, language: str) -> list[str]:
  return re.findall(rf"```{language}\n(.*?)```", path.read_text(), flags=re.S)


def documented_texts() -> list[tuple[str, str]]:
  """(where, text) for every doc file and every module docstring users read commands from."""
  texts = [(str(p.relative_to(ROOT)), p.read_text()) for p in DOC_FILES]
  for folder in DOCSTRING_DIRS:
    for path in sorted((ROOT / folder).glob("*.py")):
      docstring = ast.get_docstring(ast.parse(path.read_text()))
      if docstring:
        texts.append((str(path.relative_to(ROOT)), docstring))
  return texts


def command_lines(text: str) -> list[str]:
  """Each `python ...` command, with backslash continuations joined and comments dropped."""
  joined = re.sub(r"\\\n\s*", " ", text)
  commands = []
  for line in joined.splitlines():
    match = re.search(r"python3? (-m [\w.]+|[\w/]+\.py)\b.*", line)
    if match:
      commands.append(match.group(0).split("  #")[0].split(" # ")[0].rstrip(" `|"))
  return commands


def program_source(program: str) -> str | None:
  """The source text that defines `program`'s flags; None for programs of other packages."""
  if program.startswith("-m "):
    module = program[3:]
    if not module.startswith("cldro_jax"):
      return None
    path = ROOT / (module.replace(".", "/") + ".py")
  else:
    path = ROOT / program
  assert path.exists(), f"documented program {program!r} does not exist ({path})"
  source = path.read_text()
  if re.search(r"from experiments import", source):
    source += (ROOT / "experiments" / "common.py").read_text()
  return source


def flag_defined(flag: str, source: str) -> bool:
  argparse_flag = re.search(rf"""add_argument\([^)]*["']--{re.escape(flag)}["']""", source, re.S)
  absl_flag = re.search(rf"""DEFINE_\w+\(\s*["']{re.escape(flag)}["']""", source)
  return bool(argparse_flag or absl_flag)


def has_config_key(dotted: str) -> bool:
  for domain in config_defaults.DOMAINS:
    node = config_defaults.base_config(domain)
    for part in dotted.split("."):
      if not hasattr(node, "keys") or part not in node:
        break
      node = node[part]
    else:
      return True
  return False


def _config_module(config_file: str):
  spec = importlib.util.spec_from_file_location("documented_config", ROOT / config_file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def all_commands() -> list[tuple[str, str]]:
  """The documented commands of this project's programs (another package's, such as tfds's
  download_and_prepare, have no flags here to check)."""
  return [(where, cmd) for where, text in documented_texts() for cmd in command_lines(text)
          if program_source(re.match(r"python3? (-m [\w.]+|[\w/]+\.py)", cmd).group(1))
          is not None]


def test_the_docs_contain_the_commands_this_test_checks():
  commands = all_commands()
  assert len(commands) > 50
  assert any("cldro_jax.main --config=configs/stl10.py" in cmd for _, cmd in commands)


@pytest.mark.parametrize("where,command", all_commands())
def test_documented_command_uses_real_files_flags_and_config_keys(where, command):
  program = re.match(r"python3? (-m [\w.]+|[\w/]+\.py)", command).group(1)
  source = program_source(program)
  for flag in re.findall(r"(?:^|[\s\[])--([\w-]+)", command):
    if flag == "config" or flag.startswith("config."):
      continue
    assert flag_defined(flag, source), f"{where}: `{command}` passes --{flag}, which {program} " \
                                       "does not define"
  for dotted in re.findall(r"--config\.([\w.]+)=", command):
    if dotted == "key":            # the generic form, "[--config.key=value ...]"
      continue
    assert has_config_key(dotted), f"{where}: `{command}` sets config.{dotted}, not a config key"
  for config_file, arg in re.findall(r"--config[= ]([\w/]+\.py)(?::([\w=,.-]+))?", command):
    assert (ROOT / config_file).exists(), f"{where}: `{command}` names missing {config_file}"
    # `configs/x.py:seed=0,loss=infonce`: the file must accept every name and value (a value in
    # capitals, `seed=S`, is a placeholder for the reader).
    if arg and not re.search(r"=[A-Z]+(,|$)", arg):
      try:
        config_defaults.validate_config(_config_module(config_file).get_config(arg))
      except ValueError as err:
        pytest.fail(f"{where}: `{command}`: {config_file} refuses {arg!r}: {err}")


def test_config_keys_named_in_prose_exist():
  # Overrides are also named outside command lines ("set `--config.model.views_in_one_pass`").
  keys = {dotted for _, text in documented_texts()
          for dotted in re.findall(r"--config\.([a-z_]+(?:\.[a-z_]+)+)", text)}
  assert "loss.name" in keys
  missing = sorted(k for k in keys if not has_config_key(k))
  assert not missing, f"documented config keys that no schema has: {missing}"


def _documented_signatures() -> dict[str, str]:
  block = code_blocks(ROOT / "docs" / "losses.md", "python")[0]
  return dict(re.findall(r"^losses\.(\w+)\((.*?)\)(?: ->.*)?(?:\s+#.*)?$", block, flags=re.M))


def test_docs_losses_lists_every_public_loss_with_its_real_signature():
  documented = _documented_signatures()
  for name in ("infonce", "adnce", "dcl", "hcl", "kl_dro", "chi2_dro", "mean_variance",
               "diagnostics", "l2_normalize_rows"):
    assert name in documented, f"docs/losses.md does not list losses.{name}"
  for name, params in documented.items():
    real = inspect.signature(getattr(losses, name))
    shown = []
    keyword_only = False
    for item in [p.strip() for p in params.split(",") if p.strip()]:
      if item == "*":
        keyword_only = True
        continue
      param_name, _, default = item.partition("=")
      shown.append((param_name, default or None, keyword_only))
    actual = [(p.name, None if p.default is inspect.Parameter.empty else repr(p.default),
               p.kind is inspect.Parameter.KEYWORD_ONLY) for p in real.parameters.values()]
    actual = [(n, d.replace("'", '"') if d else d, k) for n, d, k in actual]
    assert shown == actual, f"docs/losses.md shows losses.{name}({params}); real: {real}"


def test_readme_loss_example_runs_and_gives_the_documented_quantities():
  block = next(b for b in code_blocks(ROOT / "README.md", "python") if "losses.adnce" in b)
  namespace = {}
  exec(compile(block, "README.md", "exec"), namespace)  # pylint: disable=exec-used
  assert namespace["grads"].shape == (256, 128)
  assert np.isfinite(float(namespace["loss"]))
  assert {"eta_hat", "mi_lower_bound"} <= set(namespace["diag"])


def test_docs_shard_map_train_step_equals_one_device_on_the_whole_batch():
  block = next(b for b in code_blocks(ROOT / "docs" / "losses.md", "python")
               if "jax.shard_map" in b)
  namespace = {}
  exec(compile(block, "docs/losses.md", "exec"), namespace)  # pylint: disable=exec-used
  assert namespace["mesh"].size == 8
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  params = {"w": 0.3 * jax.random.normal(keys[0], (6, 5))}
  x1 = jax.random.normal(keys[1], (32, 6))
  x2 = x1 + 0.3 * jax.random.normal(keys[2], (32, 6))
  valid = jnp.arange(32) < 29        # padding rows at the end of the last device's shard
  # The example's step reads the global `tx` when it is traced. Adam's first step moves each weight
  # by about the learning rate whatever the gradient's scale, so swap in SGD: then the update is
  # the gradient itself, and a wrong scale (say a psum over the 8 devices) shows.
  namespace["tx"] = optax.sgd(1.0)
  opt_state = namespace["tx"].init(params)
  new_params, _, loss = jax.block_until_ready(
      namespace["train_step"](params, opt_state, x1, x2, valid))

  def one_device_loss(p):
    z1, z2 = namespace["encode"](p, x1[:29]), namespace["encode"](p, x2[:29])
    return losses.adnce(z1, z2, temperature=0.4, mu=0.7, sigma=0.5)

  expected_loss, grads = jax.value_and_grad(one_device_loss)(params)
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
  np.testing.assert_allclose(params["w"] - new_params["w"], grads["w"], rtol=1e-4, atol=1e-7)


def test_gpu_script_runs_real_benchmarks_within_one_device_call():
  # benchmarks/h200.sh is run once on a lent GPU (600 s per command at most, DEVELOPERS.md); a
  # renamed flag or an over-long total would waste that call.
  runs = re.findall(r"^run (\w+) (\d+) (benchmarks/\w+\.py)(.*)$",
                    (ROOT / "benchmarks" / "h200.sh").read_text(), flags=re.M)
  assert len(runs) >= 5
  assert sum(int(limit) for _, limit, _, _ in runs) <= 560
  for name, _, script, flags in runs:
    source = program_source(script)
    for flag in re.findall(r"--([\w-]+)", flags):
      assert flag_defined(flag, source), f"h200.sh run {name}: {script} has no --{flag}"


def test_config_reference_documents_every_field():
  # docs/config.md names every leaf of every domain's schema as `dotted.path`: a field added to
  # base_config without a row there fails here.
  text = (ROOT / "docs" / "config.md").read_text()

  def leaf_paths(node, prefix=""):
    for key, value in node.items():
      if isinstance(value, ml_collections.ConfigDict):
        yield from leaf_paths(value, f"{prefix}{key}.")
      else:
        yield f"{prefix}{key}"

  for domain in config_defaults.DOMAINS:
    paths = list(leaf_paths(config_defaults.base_config(domain)))
    assert "loss.temperature" in paths
    missing = [path for path in paths if f"`{path}`" not in text]
    assert not missing, f"docs/config.md does not document these {domain} config fields: {missing}"
