"""Where a training step's time goes: a profiler trace summed by kernel kind, layer and op.

    python -m cspgan_jax.trace_report DIR            # every trace in and below DIR
    python -m cspgan_jax.trace_report T.trace.json.gz [--hlo T.hlo.txt] [--iters N]

Reads the perfetto/Chrome JSON traces that `cspgan bench --profile DIR` writes: JAX's
(`jax.profiler.trace(..., create_perfetto_trace=True)`) and PyTorch's (`torch.profiler`). A folder
is searched through: bench's `b*_*.trace.json.gz`, and the trainer's profile folders
(`train.profile_steps`: `plugins/profile/<time>/`), where jax's `perfetto_trace.json.gz` and
xprof's `<host>.trace.json.gz` hold the same trace, reported once from the former. Device
time is taken from the GPU's stream lines where there are any; on a CPU, from XLA's thunk events
(JAX) or the outermost `aten::` ops (PyTorch). A JAX kernel carries the name of its HLO
instruction (`hlo_op`), so with the step's optimized HLO (`bench --hlo`, same file name with
`.hlo.txt`; else the trainer's `train_step.hlo.txt` beside the trace) each one gets a kind and a
layer from `hlo_report`.

Besides the sums it gives the device's busy share of the traced span: time between kernels is
launch and host overhead, which several steps per dispatch and command buffers remove. Copies
between host and device (a checkpoint or a sample grid fetched in a trace of the real loop) run
on the copy engines beside the kernels: they are a kind of their own, "host transfer", and left
out of the busy share and the gaps.
"""

from __future__ import annotations

import argparse
import collections
import fnmatch
import gzip
import json
import math
import os
import re
import sys
import zlib
from typing import Dict, List, Optional, Tuple

from cspgan_jax import hlo_report
from cspgan_jax.errors import reader_left

# Lines of a device plane that repeat the kernels' time under other names (xprof's derived lines).
DERIVED_LINES = {"XLA Modules", "XLA Ops", "XLA TraceMe", "Steps", "Framework Name Scope",
                 "Framework Ops", "Source code", "Launch Stats", "TensorFlow Name Scope",
                 "TensorFlow Ops"}
# JAX's `MemcpyD2H` / `MemcpyH2D`, PyTorch's `Memcpy DtoH (Device -> Pageable)`
HOST_TRANSFER = re.compile(r"memcpy ?(d2h|h2d|dtoh|htod)", re.I)
_KINDS_BY_NAME = (  # kernel or op names -> kind (PyTorch's, and library kernels XLA launches)
    ("host transfer", HOST_TRANSFER),
    ("convolution", re.compile(r"conv|cudnn|xmma|implicit_gemm|dgrad|wgrad|fprop|winograd", re.I)),
    ("matmul", re.compile(r"gemm|matmul|aten::mm|aten::addmm|aten::bmm", re.I)),
    ("optimizer", re.compile(r"adam|foreach|multi_tensor", re.I)),
    ("batch norm", re.compile(r"batch_norm|batchnorm|bn_", re.I)),
    ("data movement", re.compile(r"copy|transpose|cat|memcpy|memset|contiguous", re.I)),
)


# The trainer's step HLO beside its trace (profiling imports it from here: jax stays unloaded).
STEP_HLO_FILE = "train_step.hlo.txt"
PERFETTO_TRACE = "perfetto_trace.json.gz"  # jax's, beside xprof's <host>.trace.json.gz
TRACE_PATTERNS = ("*.trace.json*", "perfetto_trace.json*")  # bench's and xprof's; jax's


class InputError(ValueError):
  """A message that names its own file (an --hlo file's, not the trace's)."""


def load_trace(path: str) -> dict:
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rt", encoding="utf-8") as f:
      data = json.load(f)
  except UnicodeDecodeError as e:  # a binary file that is not gzip (or gzip of one)
    raise ValueError(f"not a JSON trace (byte {e.start} is not UTF-8 text)") from e
  except (EOFError, zlib.error) as e:  # gzip's own errors for a cut or corrupt stream
    raise ValueError(f"a corrupt or truncated gzip file ({e})") from e
  # Chrome's trace format: {"traceEvents": [...], ...} or the bare list of events
  events = data.get("traceEvents") if isinstance(data, dict) else data
  if not isinstance(events, list):
    raise ValueError("not a Chrome/perfetto trace (no list of traceEvents)")
  return {**data, "traceEvents": events} if isinstance(data, dict) else {"traceEvents": events}


def _events(trace: dict) -> List[dict]:
  """The trace's events that are JSON objects (anything else in the list is not an event), each
  with a text name and scalar pid / tid: what the sums key and match on (a number or a list
  there was a TypeError)."""
  events = trace.get("traceEvents", [])
  if not isinstance(events, list):
    return []
  found = []
  for e in events:
    if not isinstance(e, dict):
      continue
    if not isinstance(e.get("name", ""), str) or any(isinstance(e.get(k), (list, dict))
                                                     for k in ("pid", "tid")):
      e = {**e, "name": str(e.get("name", "")),
           **{k: str(e[k]) for k in ("pid", "tid") if isinstance(e.get(k), (list, dict))}}
    found.append(e)
  return found


def _args(e: dict) -> dict:
  args = e.get("args")
  return args if isinstance(args, dict) else {}


def _check_times(events: List[dict]) -> None:
  """A complete event's `ts` and `dur` must be finite numbers (microseconds): else every sum
  after them fails or comes out inf / NaN."""
  for e in events:
    if e.get("ph") != "X":
      continue
    for key in ("ts", "dur"):
      value = e.get(key, 0 if key == "dur" else None)  # a complete event may omit dur
      try:
        ok = not isinstance(value, bool) and math.isfinite(float(value))
      except (TypeError, ValueError):
        ok = False
      if not ok:
        raise ValueError(f"event {str(e.get('name', '?'))[:80]!r} has {key} {value!r}, not a "
                         "finite number of microseconds")


def _names(events, key) -> Dict:
  return {(e.get("pid"), e.get("tid")) if key == "thread_name" else e.get("pid"):
          str(_args(e).get("name", ""))
          for e in events if e.get("ph") == "M" and e.get("name") == key}


def kernel_events(trace: dict) -> Tuple[str, List[dict]]:
  """(source, complete events that are device work) for a JAX or a PyTorch trace."""
  events = _events(trace)
  _check_times(events)
  complete = [e for e in events if e.get("ph") == "X" and float(e.get("dur", 0)) > 0
              and not str(e.get("name", "")).startswith("end: ")]
  torch_kernels = [e for e in complete if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
  if torch_kernels:
    return "PyTorch GPU kernels", torch_kernels
  processes, threads = _names(events, "process_name"), _names(events, "thread_name")
  device_pids = {pid for pid, name in processes.items() if name.startswith("/device:")}
  if device_pids:
    on_device = [e for e in complete if e.get("pid") in device_pids]
    lines = {(e.get("pid"), e.get("tid")) for e in on_device}
    streams = {k for k in lines if threads.get(k, "").startswith("Stream")}
    keep = streams or {k for k in lines if threads.get(k, "") not in DERIVED_LINES}
    return "device streams", [e for e in on_device if (e.get("pid"), e.get("tid")) in keep]
  thunks = [e for e in complete if "hlo_op" in _args(e)]
  if thunks:
    return "XLA:CPU thunks", thunks
  cpu_ops = sorted((e for e in complete if e.get("cat") == "cpu_op"
                    and str(e.get("name", "")).startswith("aten::")),
                   key=lambda e: (e.get("tid"), float(e["ts"]), -float(e["dur"])))
  outer, end = [], {}
  for e in cpu_ops:  # the outermost aten ops of each thread (their children are inside them)
    if float(e["ts"]) >= end.get(e.get("tid"), float("-inf")):
      outer.append(e)
      end[e.get("tid")] = float(e["ts"]) + float(e["dur"])
  return "PyTorch CPU ops", outer


def busy_time(events: List[dict]) -> Tuple[float, float]:
  """(union of the events' intervals, span from the first start to the last end), in us."""
  spans = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in events)
  if not spans:
    return 0.0, 0.0
  busy, (cur_start, cur_end) = 0.0, spans[0]
  for start, end in spans[1:]:
    if start > cur_end:
      busy += cur_end - cur_start
      cur_start, cur_end = start, end
    else:
      cur_end = max(cur_end, end)
  busy += cur_end - cur_start
  return busy, spans[-1][1] - spans[0][0]


def idle_gaps(events: List[dict], longest: float) -> List[float]:
  """The device's idle intervals between consecutive kernels (on any of the events' lines
  together), in us, those shorter than `longest`: the cost of launching one kernel after
  another, where the longer ones are the host's pauses between dispatches."""
  spans = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in events)
  gaps, end = [], None
  for start, stop in spans:
    if end is not None and start > end and start - end < longest:
      gaps.append(start - end)
    end = stop if end is None else max(end, stop)
  return gaps


def _normalise(name: str) -> str:
  return re.sub(r"[.\-]", "_", name)


def _known(name: str, by_hlo_name: dict) -> bool:
  return name in by_hlo_name or _normalise(name) in by_hlo_name


class TraceReport:
  """Device time of one trace, per iteration, by kind, layer and op."""

  def __init__(self, trace: dict, hlo: Optional[hlo_report.HloReport] = None,
               iterations: Optional[int] = None):
    self.source, self.events = kernel_events(trace)
    self.hlo = hlo
    by_hlo_name, control = {}, set()
    if hlo is not None:
      by_hlo_name = {**{_normalise(k): v for k, v in hlo.by_name.items()}, **hlo.by_name}
      control = hlo.control
    if self.source == "XLA:CPU thunks":  # a while loop's thunk event spans the thunks inside it
      self.events = [e for e in self.events if _args(e).get("hlo_op") not in control]
    self.rows = collections.defaultdict(lambda: [0.0, 0])  # op -> [us, calls]
    self.info = {}
    kernels = collections.defaultdict(lambda: [0.0, None])  # (op, kernel) -> [us, blocks]
    # Kernels of other programs (in a trace of the real loop: the sampler the output thread's
    # grids run, beside the step) carry their own module's name (XLA:GPU): one row each, a kind
    # of their own, so that the step's figures stay the step's.
    step_module = hlo.module if hlo is not None else ""
    self.matched = 0  # ops the HLO names (none: the HLO is not this trace's program)
    for e in self.events:
      args = _args(e)
      module = args.get("hlo_module")
      if step_module and module and module != step_module:
        op = f"{module} (another program)"
        self.rows[op][0] += float(e["dur"])
        self.rows[op][1] += 1
        self.info[op] = (OTHER_PROGRAM, "-")
        continue
      op = str(args.get("hlo_op") or e.get("name", "?"))
      # A kernel launched inside a command buffer (a CUDA graph) carries the buffer's name, a
      # control op or (XLA:GPU, jax 0.11) a `command_buffer_N` the compiled HLO's text does not
      # show; its own name is then the fusion's, which the HLO does.
      if op in control or (by_hlo_name and not _known(op, by_hlo_name)
                           and _known(e["name"], by_hlo_name)):
        op = e["name"]
      self.rows[op][0] += float(e["dur"])
      self.rows[op][1] += 1
      grid = _GRID.search(str(args.get("kernel_details", "")))
      kernels[(op, e["name"])][0] += float(e["dur"])
      if grid:
        kernels[(op, e["name"])][1] = int(grid[1]) * int(grid[2]) * int(grid[3])
      if op not in self.info:
        kernel = by_hlo_name.get(op) or by_hlo_name.get(_normalise(op))
        if kernel is not None:
          self.info[op] = (kernel.category, kernel.layer or "-")
          self.matched += 1
        else:  # cuDNN's and cuBLAS's kernels are named for what they do
          kind = _kind_by_name(e["name"])
          self.info[op] = ("unmatched HLO op" if "hlo_op" in args and kind == "elementwise/other"
                           else kind, "-")
    # An op's thread blocks (CUPTI's grid, where the trace has it): those of its longest
    # kernel, since a cuDNN call may launch a small helper kernel beside the main one.
    self.blocks = {}
    for (op, _), (us, blocks) in sorted(kernels.items(), key=lambda x: x[1][0]):
      if blocks is not None:
        self.blocks[op] = blocks
    self.iterations = iterations or self._infer_iterations(trace)
    kernels_only = [e for e in self.events if not HOST_TRANSFER.search(str(e.get("name", "")))]
    self.busy_us, self.span_us = busy_time(kernels_only)
    self.gaps = idle_gaps(kernels_only, GAP_US)

  def _infer_iterations(self, trace: dict) -> int:
    """JAX: most instructions run once per iteration, so the commonest call count. PyTorch:
    two Adam steps per iteration, counted on the host: with CUDA, the profiler repeats each
    annotation on the GPU's timeline (`gpu_user_annotation`), which once halved every
    per-iteration figure of the H200 run's PyTorch traces."""
    steps = sum(1 for e in _events(trace)
                if e.get("ph") == "X" and str(e.get("name", "")).startswith("Optimizer.step#")
                and e.get("cat") != "gpu_user_annotation")
    if steps:
      return max(steps // 2, 1)
    counts = collections.Counter(calls for op, (_, calls) in self.rows.items()
                                 if self.info[op][0] != OTHER_PROGRAM)
    return counts.most_common(1)[0][0] if counts else 1

  def step_kernels(self) -> int:
    """Kernels launched, those of other programs left out."""
    return sum(calls for op, (_, calls) in self.rows.items() if self.info[op][0] != OTHER_PROGRAM)

  def other_programs_us(self) -> float:
    return sum(us for op, (us, _) in self.rows.items() if self.info[op][0] == OTHER_PROGRAM)

  def total_us(self) -> float:
    return sum(us for us, _ in self.rows.values())

  def grouped(self, index: int) -> List[Tuple[str, float]]:
    """(kind or layer, us per iteration), largest first."""
    sums = collections.Counter()
    for op, (us, _) in self.rows.items():
      sums[self.info[op][index]] += us / self.iterations
    return sums.most_common()

  def markdown(self, title: str = "", top: int = 12) -> str:
    it, total = self.iterations, self.total_us()
    busy = f"{100 * self.busy_us / self.span_us:.0f}%" if self.span_us else "n/a"
    other = self.other_programs_us()
    lines = [f"### {title or 'trace'}",
             f"{self.source}: {it} iteration(s); kernels {(total - other) / it / 1e3:.3f} "
             f"ms/iteration{f' (other programs: {other / 1e3:.3f} ms in all)' if other else ''}; "
             f"busy {self.busy_us / it / 1e3:.3f} ms of a {self.span_us / it / 1e3:.3f} ms span "
             f"per iteration ({busy}); {self.step_kernels() / it:.0f} kernels/iteration", ""]
    short = [float(e["dur"]) for e in self.events if float(e["dur"]) < SHORT_US]
    if self.gaps or short:
      median = sorted(self.gaps)[len(self.gaps) // 2] if self.gaps else 0.0
      lines += [f"idle between kernels: {sum(self.gaps) / it / 1e3:.3f} ms/iteration in "
                f"{len(self.gaps) / it:.0f} gaps under {GAP_US:g} us (median {median:.1f} us); "
                f"kernels under {SHORT_US:g} us: {len(short) / it:.0f}/iteration, "
                f"{sum(short) / it / 1e3:.3f} ms/iteration", ""]
    lines += ["| kind | ms/iter | share |", "|---|---|---|"]
    lines += [f"| {k} | {us / 1e3:.3f} | {100 * us * it / total:.1f}% |"
              for k, us in self.grouped(0)]
    layers = [(k, us) for k, us in self.grouped(1) if k != "-"]
    if layers:
      lines += ["", "| layer | ms/iter | share |", "|---|---|---|"]
      lines += [f"| {k} | {us / 1e3:.3f} | {100 * us * it / total:.1f}% |"
                for k, us in layers[:top]]
    lines += ["", "| op | kind | layer | ms/iter | calls/iter | blocks |",
              "|---|---|---|---|---|---|"]
    for op, (us, calls) in sorted(self.rows.items(), key=lambda x: -x[1][0])[:top]:
      lines.append(self._op_row(op, us, calls))
    few = self.few_blocks()
    if few:
      lines += ["", f"ops launched on fewer than {FEW_BLOCKS} thread blocks (a quarter of an "
                f"H100's or H200's SMs), {FEW_BLOCKS_MIN_US:g} us or more an iteration: "
                f"{sum(us for _, us in few) / it / 1e3:.3f} ms/iteration",
                "", "| op | kind | layer | ms/iter | calls/iter | blocks |",
                "|---|---|---|---|---|---|"]
      lines += [self._op_row(op, us, self.rows[op][1]) for op, us in few[:top]]
    return "\n".join(lines)

  def _op_row(self, op: str, us: float, calls: int) -> str:
    kind, layer = self.info[op]
    return (f"| {op[:60]} | {kind} | {layer} | {us / self.iterations / 1e3:.3f} | "
            f"{calls / self.iterations:g} | {self.blocks.get(op, '-')} |")

  def few_blocks(self) -> List[Tuple[str, float]]:
    """(op, us) of the kernels that leave most of the chip idle: launched on fewer than
    `FEW_BLOCKS` blocks and long enough to matter, largest first. (In the H200 run a bias
    gradient of 8 MiB ran on 4 blocks for 61 us; a copy's rate would take 3.)"""
    return sorted(((op, us) for op, (us, _) in self.rows.items()
                   if self.blocks.get(op, FEW_BLOCKS) < FEW_BLOCKS
                   and us / self.iterations >= FEW_BLOCKS_MIN_US), key=lambda x: -x[1])


OTHER_PROGRAM = "another program"

# Launch costs: at batch 64 in bf16 the H200 run's trace had 565 kernels an iteration, 342 of
# them under 5 us, and between kernels 0.90 ms/iteration idle in gaps of a median 0.9 us.
GAP_US = 50.0
SHORT_US = 5.0
_GRID = re.compile(r"grid:(\d+),(\d+),(\d+)")
# A quarter of an H100's or H200's 132 SMs: cuDNN's persistent kernels launch 108-132 blocks and
# keep every SM busy; the reductions that did not ran on 1-16.
FEW_BLOCKS = 33
FEW_BLOCKS_MIN_US = 5.0


def _kind_by_name(name: str) -> str:
  for kind, pattern in _KINDS_BY_NAME:
    if pattern.search(name):
      return kind
  return "elementwise/other"


def hlo_beside(path: str) -> Optional[str]:
  """The trace's HLO: the .hlo.txt of its own name (bench's), else the trainer's step's."""
  for candidate in (re.sub(r"\.trace\.json(\.gz)?$", ".hlo.txt", path),
                    os.path.join(os.path.dirname(path), STEP_HLO_FILE)):
    if candidate != path and os.path.isfile(candidate):
      return candidate
  return None


def find_traces(folder: str) -> List[str]:
  """The traces in and below `folder` (hidden names skipped, as glob does; links to folders not
  followed, so a loop of them is not walked forever)."""
  found = []
  for root, dirs, files in os.walk(folder):
    dirs[:] = [d for d in dirs if not d.startswith(".")]
    found += [os.path.join(root, f) for f in files if not f.startswith(".")
              and any(fnmatch.fnmatch(f, p) for p in TRACE_PATTERNS)]
  return sorted(found)


def one_form(paths: List[str]) -> Tuple[List[str], Dict[str, str]]:
  """(each trace once, {trace kept: a line saying what was left out}): a profile folder's
  perfetto_trace.json.gz and xprof's <host>.trace.json.gz are the same trace."""
  by_folder = collections.defaultdict(list)
  for path in paths:
    by_folder[os.path.dirname(path)].append(path)
  kept, notes = [], {}
  for group in by_folder.values():
    perfetto = [p for p in group if os.path.basename(p).startswith("perfetto_trace.json")]
    xprof = [p for p in group if p not in perfetto]
    if len(perfetto) != 1 or not xprof:
      kept += group
    elif len(xprof) == 1:  # the one the trainer's command names is kept
      kept += perfetto
      notes[perfetto[0]] = (f"(xprof's {os.path.basename(xprof[0])} beside it is the same trace: "
                            f"reported once, from {os.path.basename(perfetto[0])})")
    else:  # several hosts' traces: jax's repeats one of them, which one unknown
      kept += xprof
      notes[xprof[0]] = (f"({os.path.basename(perfetto[0])} beside it repeats one of these "
                         f"{len(xprof)} hosts' traces: left out)")
  return sorted(kept), notes


def report_file(path: str, hlo_path: Optional[str] = None, iterations: Optional[int] = None):
  if hlo_path is None:
    hlo_path = hlo_beside(path)
  hlo = None
  if hlo_path:
    try:
      with open(hlo_path, encoding="utf-8") as f:
        hlo = hlo_report.HloReport(f.read())
    except UnicodeDecodeError as e:
      raise InputError(f"{hlo_path}: not a text file (byte {e.start} is not UTF-8)") from e
    except OSError as e:  # the message names the HLO file, not the trace
      raise InputError(f"{hlo_path}: {e.strerror or e}") from e
    except ValueError as e:
      raise InputError(f"{hlo_path}: {e}") from e
  report = TraceReport(load_trace(path), hlo, iterations)
  if not report.rows:  # an empty table would look like a report
    raise ValueError("no device work in it (no GPU kernels, XLA thunks or aten ops)")
  if hlo is not None and not report.matched:  # else every kernel "unmatched" or "another program"
    raise InputError(f"{hlo_path} (module {hlo.module}) names none of the kernels of {path}: "
                     "not this trace's step")
  return report


def _positive_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
  return value


class _Parser(argparse.ArgumentParser):
  """Its errors as one line, in the form of the module's others (not usage, then the error)."""

  def error(self, message):
    print(f"trace_report: error: {message} (see --help)", file=sys.stderr)
    sys.exit(2)


def _title(path: str, given: str) -> str:
  """bench's `b64_jax-bf16`; below the folder given, the trace's folders too (a trainer's
  `plugins/profile/<time>/perfetto_trace.json.gz`)."""
  name = os.path.basename(path).split(".trace")[0]
  if path == given:
    return name
  return os.path.join(os.path.dirname(os.path.relpath(path, given)), name)


def main(argv=None) -> int:
  parser = _Parser(prog="python -m cspgan_jax.trace_report",
                   description=__doc__.splitlines()[0])
  parser.add_argument("path", help="a .trace.json(.gz) file, or a folder searched for them")
  parser.add_argument("--hlo", default=None, help="the step's optimized HLO text (one file)")
  parser.add_argument("--iters", type=_positive_int, default=None,
                      help="iterations traced (default: inferred)")
  args = parser.parse_args(argv)
  notes = {}
  if os.path.isdir(args.path):
    paths, notes = one_form(find_traces(args.path))
    if not paths:
      print(f"trace_report: error: no *.trace.json(.gz) or {PERFETTO_TRACE} in or below "
            f"{args.path}", file=sys.stderr)
      return 2
    if args.hlo and len(paths) > 1:  # one step's HLO cannot be each trace's: not ignored
      print(f"trace_report: error: --hlo takes one trace, and {args.path} holds {len(paths)} "
            "(each reads the .hlo.txt of its own name)", file=sys.stderr)
      return 2
  else:
    paths = [args.path]
  failed = 0
  try:
    for path in paths:
      # One trace that cannot be read (a profiler that lost its device events) is one line, and
      # a folder's other traces are still reported: the exit status says one failed.
      error = None
      try:
        report = report_file(path, args.hlo, args.iters)
      except InputError as e:
        error = str(e)
      except OSError as e:
        error = f"{path}: {e.strerror or e}"
      except ValueError as e:  # json.JSONDecodeError is a ValueError
        error = f"{path}: {e}"
      if error is not None:
        sys.stdout.flush()
        print(f"trace_report: error: {error}", file=sys.stderr)
        failed += 1
        continue
      print(report.markdown(_title(path, args.path)))
      if path in notes:
        print(f"\n{notes[path]}")
      print()
    sys.stdout.flush()
  except BrokenPipeError:  # `... | head`
    return reader_left()
  return 2 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
