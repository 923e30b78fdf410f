"""The command lines' answers to a new user's mistakes: one clear message naming the fix, a
non-zero exit status, no traceback. Every case here fails before any training starts."""

import importlib.util
import json
import pathlib
import subprocess
import sys

from cldro_jax import checkpointing

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(args, timeout=120):
  return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True,
                        timeout=timeout, check=False)


def _main(*args):
  return _run(["-m", "cldro_jax.main", *args])


def _assert_clean_failure(run, status, *fragments):
  assert run.returncode == status, run.stderr[-2000:]
  assert "Traceback" not in run.stderr, run.stderr[-2000:]
  for fragment in fragments:
    assert fragment in run.stderr, run.stderr[-2000:]


def test_a_config_path_that_does_not_exist_names_the_closest_config(tmp_path):
  # ml_collections deferred this error to the config's first use: two chained tracebacks.
  run = _main("--config=configs/cifar.py", "--config.batch_size=8",
              f"--workdir={tmp_path / 'run'}")
  _assert_clean_failure(run, 2, "config file 'configs/cifar.py' not found",
                        "did you mean --config=configs/cifar10.py?")


def test_a_misspelled_config_argument_gets_one_line_with_a_suggestion(tmp_path):
  run = _main("--config=configs/quickstart.py:run_local", f"--workdir={tmp_path / 'run'}")
  _assert_clean_failure(
      run, 2, "cldro_jax: --config=configs/quickstart.py:run_local: Unknown config argument "
      "'run_local'; did you mean 'runlocal'?")


def test_an_override_with_an_impossible_value_is_reported_without_a_traceback(tmp_path):
  run = _main("--config=configs/quickstart.py:runlocal", "--config.loss.temperature=-1",
              f"--workdir={tmp_path / 'run'}")
  _assert_clean_failure(run, 2, "config.loss.temperature must be > 0, got -1.0")
  assert not (tmp_path / "run").exists()



def test_an_override_below_a_value_is_named_without_a_traceback(tmp_path):
  # ml_collections raised a TypeError ("string indices must be integers") from deep inside.
  run = _main("--config=configs/quickstart.py:runlocal", "--config.loss.name.x=1",
              f"--workdir={tmp_path / 'run'}")
  _assert_clean_failure(run, 2, "cldro_jax: --config.loss.name.x names no field of the config: "
                        "config.loss.name is a value, not a group of fields")


def test_an_error_in_the_config_files_own_code_is_not_blamed_on_an_override(tmp_path):
  # The file reads a field that does not exist: the same AttributeError as an unknown override,
  # which was reported as "a --config override names no field". Its traceback names its line.
  config_file = tmp_path / "my_config.py"
  config_file.write_text("from configs import quickstart\n\n\ndef get_config(arg=None):\n"
                         "  config = quickstart.get_config(arg)\n"
                         "  config.optim.lr = config.optim.learning_rate\n  return config\n")
  run = _main(f"--config={config_file}:runlocal", "--config.loss.name=infonce",
              f"--workdir={tmp_path / 'run'}")
  assert run.returncode == 1, run.stderr[-2000:]
  assert (f"cldro_jax: --config={config_file}:runlocal failed to load (the error is in the "
          "config file, not in a --config. override)") in run.stderr
  assert f'"{config_file}", line 6, in get_config' in run.stderr
  assert "names no field" not in run.stderr and not (tmp_path / "run").exists()

def test_a_workdir_that_is_a_file_is_named(tmp_path):
  afile = tmp_path / "afile"
  afile.write_text("")
  run = _main("--config=configs/quickstart.py:runlocal", f"--workdir={afile}")
  _assert_clean_failure(run, 2, f"--workdir={afile} is a file, not a directory")


def test_a_workdir_under_a_file_or_not_writable_is_refused_before_any_work(tmp_path):
  afile = tmp_path / "afile"
  afile.write_text("")
  run = _main("--config=configs/quickstart.py:runlocal", f"--workdir={afile / 'runs' / 'a'}")
  _assert_clean_failure(run, 2, f"lies under {afile}, which is a file")
  # A read-only file system (or another user's folder): the write probe fails, nothing is left.
  run = _run(["-c", _READ_ONLY_FILE_SYSTEM, "--config=configs/quickstart.py:runlocal",
              f"--workdir={tmp_path / 'new' / 'run'}"])
  _assert_clean_failure(run, 2, f"--workdir={tmp_path / 'new' / 'run'} cannot be written "
                        f"({tmp_path}: Read-only file system)")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


# The command line on a file system where nothing can be created (as a read-only mount answers).
_READ_ONLY_FILE_SYSTEM = """
import errno, tempfile
from absl import app
from cldro_jax import main

def read_only(**_kwargs):
  raise OSError(errno.EROFS, "Read-only file system")

tempfile.mkdtemp = read_only
app.run(main.main, flags_parser=main._parse_flags)
"""


def test_a_batch_that_does_not_divide_over_the_devices_is_one_message(tmp_path):
  # The tests' 8 CPU devices (conftest's XLA_FLAGS reach the command).
  run = _main("--config=configs/quickstart.py:runlocal", "--config.batch_size=12",
              "--config.mesh.num_devices=-1", f"--workdir={tmp_path / 'run'}")
  _assert_clean_failure(run, 1, "cldro_jax: ConfigError: config.batch_size=12 does not divide "
                        "over the 8 devices", "--config.batch_size=8")
  assert not (tmp_path / "run").exists()


def test_a_total_epochs_override_on_a_fixed_step_config_is_named(tmp_path):
  # The batch that cannot divide stops the run right after the start-up warnings.
  args = ("--config=configs/quickstart.py:runlocal", "--config.batch_size=12",
          "--config.mesh.num_devices=-1", f"--workdir={tmp_path / 'run'}")
  run = _main(*args, "--config.total_epochs=3")
  _assert_clean_failure(run, 1, "WARNING: --config.total_epochs=3.0 is not used: this config "
                        "runs a fixed 4 steps", "Add --config.total_steps=0 to train for "
                        "total_epochs.", "does not divide over the 8 devices")
  run = _main(*args, "--config.total_epochs=3", "--config.total_steps=0")
  _assert_clean_failure(run, 1, "does not divide over the 8 devices")
  assert "total_epochs" not in run.stderr, run.stderr[-2000:]


def test_data_that_cannot_be_used_is_one_message_naming_the_fix(tmp_path):
  import numpy as np  # pylint: disable=import-outside-toplevel
  path = tmp_path / "floats.npz"   # images as floats in [0, 1]: refused with the conversion
  rng = np.random.default_rng(0)
  np.savez(path, x_train=rng.random((8, 4, 4)), y_train=np.arange(8) % 2,
           x_test=rng.random((4, 4, 4)), y_test=np.arange(4) % 2)
  run = _main("--config=configs/quickstart.py:runlocal", "--config.data.source=npz",
              f"--config.data.path={path}", f"--workdir={tmp_path / 'run'}")
  _assert_clean_failure(run, 1, "cldro_jax: ConfigError: ", "floats.npz: x_train")
  assert not (tmp_path / "run").exists()


_RAISE_MISMATCH = """
import sys
from absl import app
from cldro_jax import checkpointing, main, train

def refuse(config, workdir):
  raise checkpointing.CheckpointMismatchError("holds a run started with a different config")

train.train_and_evaluate = refuse
app.run(main.main, flags_parser=main._parse_flags)
"""


def test_a_resume_refused_by_the_checkpoint_check_is_one_message(tmp_path):
  # The trainer's own user-facing errors (config differs from the saved run's, a damaged
  # checkpoint, missing data) came under a 20-80 line traceback.
  run = _run(["-c", _RAISE_MISMATCH, "--config=configs/quickstart.py:runlocal",
              f"--workdir={tmp_path}"])
  _assert_clean_failure(run, 1, "cldro_jax: CheckpointMismatchError: holds a run started with a "
                        "different config")


def test_the_probe_on_a_directory_that_is_no_workdir_says_how_to_make_one(tmp_path):
  run = _run(["-m", "cldro_jax.probe", f"--workdir={tmp_path / 'nothing'}"])
  _assert_clean_failure(run, 2, "is not a cldro_jax workdir",
                        "python -m cldro_jax.main --config=configs/quickstart.py")



def test_the_sts_evaluator_command_line_on_no_workdir_or_without_sts_files(tmp_path):
  # The module's own `__main__` (the tests elsewhere call its main() in-process).
  run = _run(["-m", "cldro_jax.evaluators.sts", f"--workdir={tmp_path}"])
  _assert_clean_failure(run, 2, f"{tmp_path} is not a cldro_jax workdir",
                        "python -m cldro_jax.main --config=configs/sts_minilm.py")
  run = _run(["-m", "cldro_jax.evaluators.sts", f"--model_dir={tmp_path}"])
  _assert_clean_failure(run, 2, "--sts_root is required with --model_dir")

def test_the_probe_before_the_first_checkpoint_suggests_waiting_or_untrained(tmp_path):
  spec = importlib.util.spec_from_file_location("quickstart", REPO_ROOT / "configs/quickstart.py")
  quickstart = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(quickstart)
  (tmp_path / "config.json").write_text(
      json.dumps(checkpointing.config_to_dict(quickstart.get_config("runlocal"))))
  run = _run(["-m", "cldro_jax.probe", f"--workdir={tmp_path}"])
  _assert_clean_failure(run, 2, "No checkpoint in", "--untrained")


def test_ctrl_c_outside_the_training_loop_is_one_line_and_exit_130(tmp_path):
  # Ctrl-C while the data load or the compilation runs (the loop itself saves and stops with its
  # own message): what is saved is kept; no KeyboardInterrupt traceback.
  script = ("import sys\nfrom absl import app\nfrom cldro_jax import main, train\n"
            "def interrupted(*_args):\n  raise KeyboardInterrupt\n"
            "train.train_and_evaluate = interrupted\napp.run(main.main)\n")
  run = _run(["-c", script, "--config=configs/quickstart.py:runlocal",
              f"--workdir={tmp_path / 'run'}"])
  _assert_clean_failure(run, 130, "cldro_jax: interrupted (Ctrl-C)",
                        "Rerun the same command to resume from the last one.")
  # One process of several leaves at once (os._exit), so that the others, waiting for it in a
  # collective, see it gone; a normal exit would first wait minutes at the shutdown barrier.
  several = script.replace("app.run(main.main)",
                           "import jax\njax.process_count = lambda: 2\napp.run(main.main)")
  run = _run(["-c", several, "--config=configs/quickstart.py:runlocal",
              f"--workdir={tmp_path / 'run2'}"])
  assert run.returncode == 1 and "process 0 of 2 failed" in run.stderr, run.stderr[-2000:]


def test_a_config_path_run_from_another_folder_names_the_repository_copy(tmp_path):
  run = subprocess.run([sys.executable, "-m", "cldro_jax.main", "--config=configs/quickstart.py",
                        f"--workdir={tmp_path / 'run'}"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120, check=False)
  _assert_clean_failure(run, 2, f"pass --config={REPO_ROOT / 'configs' / 'quickstart.py'}",
                        f"run from {REPO_ROOT}")
