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
if [ "$1" = "-c" ]; then echo "jax 0.11.2 (stand-in)"; exit 0; fi
if [ "$1" = "-m" ]; then exit 0; fi
script=$(basename "$1" .py)
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


def test_everything_comes_back_in_at_most_eight_files(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _executable(bin_dir / "python3", FAKE_PYTHON)
  _executable(bin_dir / "nvidia-smi", "#!/bin/bash\necho 'name, NVIDIA H200 (stand-in)'\n")
  out, work = tmp_path / "out", tmp_path / "work"
  env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(out),
         "WORK": str(work)}
  done = subprocess.run(["bash", "benchmarks/h200.sh"], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=120, check=False)
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
