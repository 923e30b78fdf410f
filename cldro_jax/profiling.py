"""Where a compiled train step's device time goes: a profiler trace split by phase.

    python -m cldro_jax.main --config=... --workdir=DIR --config.profile_steps=10
    python benchmarks/train_step.py --models resnet18 --profile DIR   # (sentence_step.py too)

The trainer labels its step with named scopes (`cldro_jax/train.py`: model, its augment part,
loss, diagnostics, online_probe, optimizer). XLA keeps those names in each instruction's
`op_name` metadata, and the profiler tags every kernel it times with the instruction (`hlo_op`)
and module (`hlo_module`) that launched it. So a trace of a few steps plus the compiled module's
text give the device time per phase, forward and backward apart, and the heaviest operations:
what to optimise first when a GPU figure misses its target. TensorBoard's profile plugin shows the
same trace; this table needs no plugin and prints in the run's own output. The raw trace
(`*.xplane.pb`) stays in DIR for a closer look: `jax.profiler.ProfileData.from_file(PATH)` reads
it on any machine.

Kernel times are summed: kernels that overlap (several streams, or CPU threads) count each, so
the device time per step can exceed the step's wall time; the difference the other way is time
the device waited (launches, host work, synchronisation). With several devices the table is per
device (their mean). Under the profiler a GPU runs its programs without CUDA graphs (XLA's
command buffers are off while profiling, by its source) and with
CUPTI's overhead, so a wall time measured while profiling is longer than the production step's.
"""

from __future__ import annotations

import collections
import dataclasses
import pathlib
import re
from typing import Callable

import jax

# Named scopes of the train step, most specific first: an operation in the augmentation is also
# inside "model" (augmentation runs in the task's forward pass).
SCOPES = ("augment", "loss", "diagnostics", "online_probe", "optimizer", "model")
PHASE_NAMES = {"augment": "augmentation", "loss": "loss", "diagnostics": "diagnostics",
               "online_probe": "online probe", "optimizer": "optimizer", "model": "encoder"}
OTHER = "other (metrics, RNG, copies)"
UNATTRIBUTED = "unattributed (no HLO instruction matched)"
# Device work no instruction of the step launched: host-to-device copies of the next batch,
# memsets of the runtime (untagged events on a GPU's stream lines).
OUTSIDE = "outside the step (transfers, runtime)"
# Lines of a GPU plane that xprof derives from the kernels (jax's own files normally lack
# them); they repeat the stream lines' time. Every other line of a GPU plane holds kernels:
# streams, and a stream the CUPTI tracer renamed "CUPTI overhead".
_DERIVED_LINES = ("XLA Ops", "XLA Modules", "Steps", "Framework Name Scope", "Framework Ops",
                  "Source code", "XLA TraceMe", "Launch Stats", "_counters_")

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([^\s=%]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"(?:^|[\s)}\]])([a-z][a-z0-9\-]*)\(")
_OP_NAME = re.compile(r'op_name="((?:[^"\\]|\\.)*)"')
_CALLED = re.compile(r"\b(?:calls|to_apply|body|condition|branch_computations|"
                     r"true_computation|false_computation)=(\{[^}]*\}|%?[^\s,]+)")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([^\s(]+)\s.*\{\s*$")


@dataclasses.dataclass(frozen=True)
class Instruction:
  name: str
  kind: str          # opcode, with the fusion kind or custom-call target where there is one
  phase: str         # from the op_name metadata (or, for a fusion without it, its contents)
  op_name: str | None = None   # its own op_name metadata, if any


def phase_of(op_name: str) -> str | None:
  """The step phase an operation's `op_name` names, e.g. "encoder backward"; None if none.

  op_name is JAX's name stack: "jit(train_step)/transpose(jvp(model))/ContrastiveModel/...".
  Transformations wrap the scope names ("jvp(model)"); "transpose(" marks the backward pass.
  """
  if not op_name.startswith("jit("):
    return None   # parameters and their copies carry the argument's name instead
  components = op_name.split("/")[1:]
  names = {re.sub(r"^(?:[\w.]+\()*|\)*$", "", c) for c in components}
  backward = any(c.startswith("transpose(") for c in components)
  for scope in SCOPES:
    if scope in names:
      phase = PHASE_NAMES[scope]
      if scope in ("model", "loss", "online_probe"):
        phase += " backward" if backward else " forward"
      return phase
  return OTHER


def _kind(rhs: str) -> str:
  match = _OPCODE.search(rhs)
  opcode = match.group(1) if match else "?"
  if opcode == "fusion":
    kind = re.search(r"kind=(\w+)", rhs)
    return f"fusion {kind.group(1)}" if kind else opcode
  if opcode == "custom-call":
    target = re.search(r'custom_call_target="([^"]*)"', rhs)
    return f"custom-call {target.group(1)}" if target else opcode
  return opcode


def parse_hlo(hlo_text: str) -> dict[str, Instruction]:
  """Every instruction of a compiled module's text (`compiled.as_text()`), by name.

  An instruction's phase comes from its own op_name; XLA's passes make some without one (a
  fusion, a rewritten convolution inside it): those take the phase of the instruction that calls
  their computation, or else the phase most of the computation they call has, or else the phase
  most of their operands have.
  """
  computations: dict[str, list[tuple[str, str, str | None, list[str]]]] = {}
  current: list = []
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header and " = " not in line.split("{")[0]:
      current = computations.setdefault(header.group(1), [])
      continue
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, rhs = match.groups()
    op_name = _OP_NAME.search(rhs)
    called = [c for group in _CALLED.findall(rhs) for c in re.findall(r"%?([^\s{},%]+)", group)]
    current.append((name, rhs, op_name.group(1) if op_name else None, called))

  own = {name: phase_of(op_name) if op_name else None
         for instructions in computations.values() for name, _, op_name, _ in instructions}
  caller_phase: dict[str, str] = {}
  for instructions in computations.values():
    for name, _, _, called in instructions:
      for computation in called:
        if own[name] is not None:
          caller_phase.setdefault(computation, own[name])

  def majority_phase(called: list[str]) -> str | None:
    phases = collections.Counter(own[name] for computation in called
                                 for name, _, _, _ in computations.get(computation, [])
                                 if own[name] is not None)
    return phases.most_common(1)[0][0] if phases else None

  def operands_phase(rhs: str, local: dict[str, str]) -> str | None:
    phases = collections.Counter(local[operand] for operand in re.findall(r"%([^\s,(){}]+)", rhs)
                                 if local.get(operand, OTHER) != OTHER)
    # An operation on a gradient is backward work, whatever forward activations it also reads
    # (a filter-gradient convolution takes the forward input first).
    backward = collections.Counter({p: n for p, n in phases.items() if p.endswith(" backward")})
    phases = backward or phases
    return phases.most_common(1)[0][0] if phases else None

  table = {}
  for computation, instructions in computations.items():
    local: dict[str, str] = {}   # instructions come after their operands in the text
    for name, rhs, op_name, called in instructions:
      local[name] = (own[name] or caller_phase.get(computation) or majority_phase(called)
                     or operands_phase(rhs, local) or OTHER)
      table[name] = Instruction(name=name, kind=_kind(rhs), phase=local[name], op_name=op_name)
  # Computations are printed before their callers: give what is still unknown inside a called
  # computation its caller's phase, now that the callers have theirs (nesting is shallow).
  for _ in range(3):
    resolved_callers = {computation: table[name].phase
                        for instructions in computations.values()
                        for name, _, _, called in instructions for computation in called
                        if table[name].phase != OTHER}
    for computation, instructions in computations.items():
      for name, _, _, _ in instructions:
        if table[name].phase == OTHER and own[name] is None and computation in resolved_callers:
          table[name] = dataclasses.replace(table[name], phase=resolved_callers[computation])
  return table


def module_name(hlo_text: str) -> str:
  match = re.match(r"\s*HloModule\s+([^\s,]+)", hlo_text)
  return match.group(1) if match else ""


@dataclasses.dataclass
class Profile:
  steps: int
  phase_ns: dict[str, float]         # summed kernel time per phase, all steps and devices
  op_ns: dict[str, float]            # summed kernel time per instruction, all steps and devices
  instructions: dict[str, Instruction]
  events: int                        # timed events of the module
  unmatched_examples: list[str]      # names of events no instruction matched (for a bug report)
  trace_file: str
  devices: int = 1                   # device planes whose kernels are summed
  note: str = ""                     # why nothing was found, when the trace says

  def per_step_ms(self, ns: float) -> float:
    """Per step and per device."""
    return ns / self.steps / self.devices / 1e6

  @property
  def device_ms_per_step(self) -> float:
    return self.per_step_ms(sum(ns for phase, ns in self.phase_ns.items() if phase != OUTSIDE))


def _kernel_lines(plane):
  """The lines of a device plane that hold its kernels: on a GPU every line but the derived
  ones, on a TPU "XLA Ops" (derived lines such as "XLA Modules" span whole programs and would
  count twice)."""
  lines = list(plane.lines)
  if plane.name.startswith("/device:GPU"):
    return [line for line in lines if not line.name.startswith(_DERIVED_LINES)]
  return [line for line in lines if line.name == "XLA Ops"]


def _timed_events(profile_data, module: str):
  """(plane name, instruction name candidates, untagged, duration ns) of every kernel of
  `module` in the trace; `untagged`: device work carrying neither hlo_op nor hlo_module (if no
  candidate names an instruction, it is work outside the step)."""
  planes = list(profile_data.planes)
  device_planes = [p for p in planes if p.name.startswith(("/device:GPU", "/device:TPU"))]
  if device_planes:
    lines = [(p.name, line) for p in device_planes for line in _kernel_lines(p)]
  else:   # the CPU backend: the thunk executor's events on the host plane
    lines = [(p.name, line) for p in planes if p.name.startswith("/host:CPU") for line in p.lines]
  for plane_name, line in lines:
    for event in line.events:
      stats = dict(event.stats)
      if "hlo_module" in stats and module and stats["hlo_module"] != module:
        continue
      if not device_planes and "hlo_op" not in stats:
        continue   # host-side bookkeeping, not an operation
      candidates = [str(stats["hlo_op"])] if "hlo_op" in stats else []
      # GPU kernels are named after their instruction with '_' for '.': fusion_3 is fusion.3.
      candidates += [event.name, re.sub(r"_(\d+)$", r".\1", event.name)]
      untagged = "hlo_op" not in stats and "hlo_module" not in stats
      yield plane_name, candidates, untagged, float(event.duration_ns)


def traces_in(trace_dir: str) -> set[pathlib.Path]:
  """The trace files (`*.xplane.pb`) jax.profiler has written under `trace_dir`."""
  return set(pathlib.Path(trace_dir).rglob("*.xplane.pb"))


def read_trace(trace_dir: str, before: set[pathlib.Path], compiled_text: str,
               steps: int) -> Profile:
  """Splits the trace written under `trace_dir` since `before` (`traces_in` before tracing)."""
  written = sorted(traces_in(trace_dir) - before)
  if not written:
    raise RuntimeError(f"jax.profiler wrote no *.xplane.pb under {trace_dir}")
  trace_file = str(written[-1])
  return split_trace(jax.profiler.ProfileData.from_file(trace_file), compiled_text, steps,
                     trace_file)


def profile_compiled(run: Callable[[], object], compiled_text: str, trace_dir: str,
                     steps: int = 3) -> Profile:
  """Runs `run()` (one step, blocking) `steps` times under the profiler; splits its time."""
  pathlib.Path(trace_dir).mkdir(parents=True, exist_ok=True)
  before = traces_in(trace_dir)
  with jax.profiler.trace(trace_dir):
    for _ in range(steps):
      jax.block_until_ready(run())
  return read_trace(trace_dir, before, compiled_text, steps)


def split_trace(profile_data, compiled_text: str, steps: int, trace_file: str = "") -> Profile:
  instructions = parse_hlo(compiled_text)
  module = module_name(compiled_text)
  phase_ns: dict[str, float] = collections.defaultdict(float)
  op_ns: dict[str, float] = collections.defaultdict(float)
  events, unmatched, planes = 0, [], set()
  for plane, candidates, untagged, duration in _timed_events(profile_data, module):
    name = next((c for c in candidates if c in instructions), None)
    if name is None and untagged:
      phase_ns[OUTSIDE] += duration
      continue
    events += 1
    planes.add(plane)
    if name is None:
      phase_ns[UNATTRIBUTED] += duration
      if len(unmatched) < 5 and candidates[0] not in unmatched:
        unmatched.append(candidates[0])
      continue
    phase_ns[instructions[name].phase] += duration
    op_ns[name] += duration
  note = ""
  plane_names = [p.name for p in profile_data.planes]
  if not events and jax.default_backend() == "gpu" and not any(
      n.startswith("/device:GPU") for n in plane_names):
    note = ("the trace has no /device:GPU plane: the profiler recorded no GPU kernel (CUPTI "
            "missing, or not permitted for this user: NVIDIA's ERR_NVGPUCTRPERM)")
  return Profile(steps=steps, phase_ns=dict(phase_ns), op_ns=dict(op_ns),
                 instructions=instructions, events=events, unmatched_examples=unmatched,
                 trace_file=trace_file, devices=max(len(planes), 1), note=note)


def _sanity_warnings(profile: Profile) -> list[str]:
  """Signs that the phase split itself went wrong (a new op_name format, say)."""
  total = sum(ns for phase, ns in profile.phase_ns.items() if phase != OUTSIDE)
  warnings = []
  if profile.phase_ns.get("encoder forward") and not profile.phase_ns.get("encoder backward"):
    warnings.append("no encoder backward time although the encoder ran forward: "
                    "phase_of no longer recognises the backward pass in op_name")
  if profile.phase_ns.get(OTHER, 0.0) > 0.3 * total:
    warnings.append(f"'{OTHER}' holds over 30% of the device time: the named scopes may be "
                    "missing from op_name")
  if warnings:
    heaviest = sorted(profile.op_ns.items(), key=lambda kv: -kv[1])[:3]
    examples = [profile.instructions[name].op_name for name, _ in heaviest]
    warnings.append(f"op_name of the heaviest instructions, to compare: {examples}")
  return warnings


def format_tables(profile: Profile, step_wall_ms: float, top: int = 12, *,
                  wall_label: str = "a wall time") -> str:
  """Markdown: device time per phase (ms per step and share), then the heaviest instructions.

  `wall_label` says what `step_wall_ms` is (a median of unprofiled steps, or the profiled steps'
  own time, which a GPU's profiler lengthens)."""
  total = sum(ns for phase, ns in profile.phase_ns.items() if phase != OUTSIDE)
  if not total:
    return (f"(profile: no kernel of the step found in {profile.trace_file}; "
            f"{profile.events} events{'; ' + profile.note if profile.note else ''})")
  device_ms = profile.device_ms_per_step
  per_device = f", mean of {profile.devices} devices" if profile.devices > 1 else ""
  lines = [f"device time per step {device_ms:.2f} ms (kernels summed{per_device}) against "
           f"{wall_label} of {step_wall_ms:.2f} ms; {profile.steps} profiled steps, trace "
           f"{profile.trace_file}",
           "", "| phase | ms per step | share of device time |", "|---|---|---|"]
  for phase, ns in sorted(profile.phase_ns.items(), key=lambda kv: -kv[1]):
    if phase != OUTSIDE:
      lines.append(f"| {phase} | {profile.per_step_ms(ns):.3f} | {100 * ns / total:.1f}% |")
  if profile.phase_ns.get(OUTSIDE):
    lines.append(f"| {OUTSIDE} | {profile.per_step_ms(profile.phase_ns[OUTSIDE]):.3f} | "
                 "not in the total |")
  if profile.unmatched_examples:
    lines.append(f"\nunattributed event names (parser to extend): {profile.unmatched_examples}")
  lines += [f"\nWARNING: {warning}" for warning in _sanity_warnings(profile)]
  lines += ["", f"| heaviest {top} instructions | kind | phase | ms per step | share |",
            "|---|---|---|---|---|"]
  for name, ns in sorted(profile.op_ns.items(), key=lambda kv: -kv[1])[:top]:
    ins = profile.instructions[name]
    lines.append(f"| {name} | {ins.kind} | {ins.phase} | {profile.per_step_ms(ns):.3f} | "
                 f"{100 * ns / total:.1f}% |")
  return "\n".join(lines)
