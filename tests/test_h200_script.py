"""benchmarks/h200.sh, the one GPU call, run here with stand-ins for python3 and nvidia-smi: what
comes back through the device tool (at most 8 files from $OUT) must hold every benchmark's
output, also when a benchmark fails (the pack is rebuilt after each benchmark, so a command cut
short keeps what finished)."""
import os
import pathlib
import stat
import subprocess
import tarfile

ROOT = pathlib.Path(__file__).resolve().parents[1]

FAKE_PYTHON = """#!/bin/bash
# Stand-in for python3: prints a table row naming the benchmark, writes its --json file.
# FAKE_BACKEND=cpu makes the preflight fail (JAX fell back to the CPU); FAKE_SLEEP=N makes each
# benchmark take N seconds.
if [ "$1" = "-c" ]; then
  echo "jax 0.11.2 (stand-in)"
  case "$2" in *default_backend*"'gpu'"*) [ "${FAKE_BACKEND:-gpu}" = gpu ] || exit 1;; esac
  exit 0
fi
if [ "$1" = "-m" ]; then exit 0; fi
script=$(basename "$1" .py)
sleep "${FAKE_SLEEP:-0}"
echo "| $script | row |"
while [ $# -gt 0 ]; do
  if [ "$1" = "--json" ]; then echo '{"benchmark": "x", "rows": []}' > "$2"; fi
  shift
done
[ "$script" = "losses" ] && { echo "Traceback: a failing benchmark" >&2; exit 3; }
exit 0
"""


def _executable(path: pathlib.Path, text: str) -> None:
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _run_script(tmp_path, **env_vars):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(parents=True)
  _executable(bin_dir / "python3", FAKE_PYTHON)
  _executable(bin_dir / "nvidia-smi", "#!/bin/bash\necho 'name, NVIDIA H200 (stand-in)'\n")
  out, work = tmp_path / "out", tmp_path / "work"
  env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(out),
         "WORK": str(work), **env_vars}
  done = subprocess.run(["bash", "benchmarks/h200.sh"], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=120, check=False)
  return done, out


def _limits() -> dict[str, int]:
  return {line.split()[1]: int(line.split()[2])
          for line in (ROOT / "benchmarks" / "h200.sh").read_text().splitlines()
          if line.startswith("run ")}


def test_everything_comes_back_in_at_most_eight_files(tmp_path):
  done, out = _run_script(tmp_path)
  assert done.returncode == 0, done.stderr[-2000:]
  returned = sorted(p.name for p in out.iterdir())
  assert returned == ["bench.tgz", "gpu.txt", "summary.txt"] and len(returned) <= 8
  runs = [line.split()[1] for line in (ROOT / "benchmarks" / "h200.sh").read_text().splitlines()
          if line.startswith("run ")]
  summary = (out / "summary.txt").read_text()
  with tarfile.open(out / "bench.tgz") as tar:
    packed = {pathlib.Path(name).name for name in tar.getnames()}
  for name in runs:   # each benchmark's table, log and (where it writes one) JSON file
    assert f"== {name} " in summary
    assert {f"{name}.txt", f"{name}.log"} <= packed
  assert "!! losses exited with 3" in summary            # a failure is said, the rest still ran
  assert {"train_step_resnet18.json", "sentence_step.json", "losses.json"} <= packed
  assert "NVIDIA H200 (stand-in)" in (out / "gpu.txt").read_text()


def test_a_cpu_fallback_stops_at_once_without_running_a_benchmark(tmp_path):
  # A CUDA plugin that fails to load only warns and JAX runs on the CPU: nine minutes of CPU
  # figures would spend the session's device time. The preflight stops in seconds instead.
  done, out = _run_script(tmp_path, FAKE_BACKEND="cpu")
  assert done.returncode == 2
  assert "preflight failed" in (out / "gpu.txt").read_text()
  assert not (out / "summary.txt").exists() and not (out / "bench.tgz").exists()


def test_unused_seconds_pass_on_and_the_budget_is_never_exceeded(tmp_path):
  limits = _limits()
  assert sum(limits.values()) <= 560   # the stated sum, inside the 580 s budget
  # A budget 30 s above the limits' sum, benchmarks of 2 s each: the first gets its own limit
  # plus the slack, and every later one its own plus what the earlier ones left unused.
  done, out = _run_script(tmp_path, BUDGET=str(sum(limits.values()) + 30), FAKE_SLEEP="2")
  assert done.returncode == 0, done.stderr[-2000:]
  summary = (out / "summary.txt").read_text()
  granted = {line.split()[1]: int(line.split("limit ")[1].split()[0])
             for line in summary.splitlines() if line.startswith("== ")}
  names = list(limits)
  # The first run gets its own limit plus the slack (30 s less the preflight's seconds); each
  # later one its own plus what the earlier ones left (about their limit less 2 s each).
  assert limits[names[0]] < granted[names[0]] <= limits[names[0]] + 30
  for earlier, name in zip(names, names[1:]):
    assert granted[name] - limits[name] > granted[earlier] - limits[earlier]
  # With no time left, each benchmark is skipped and says so, and the script still ends with
  # its files.
  tight, _ = _run_script(tmp_path / "tight", BUDGET="5", FAKE_SLEEP="2")
  assert tight.returncode == 0
  tight_summary = (tmp_path / "tight" / "out" / "summary.txt").read_text()
  assert all(f"!! {name} skipped" in tight_summary for name in names)
  # A budget that is not whole seconds would break the arithmetic and skip every benchmark
  # silently: refused at once.
  bad, _ = _run_script(tmp_path / "bad", BUDGET="5m")
  assert bad.returncode == 2 and "BUDGET must be whole seconds" in bad.stdout
