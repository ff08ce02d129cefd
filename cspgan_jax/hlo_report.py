"""What a compiled training step launches: the kernels of an optimized HLO module, by kind.

    python -m cspgan_jax.hlo_report b256_jax-bf16.hlo.txt      # markdown report

`cspgan bench --hlo DIR` writes the optimized HLO of each JAX variant; this reads one back and
answers the questions of the performance work without a profiler: how many convolutions (and,
on a GPU, of which cuDNN kind), how many kernels only move data (copies, transposes, the
channel-split slices of CSPup, concatenations, pads) and how many bytes they write, and which
layer each comes from (from the op's `op_name` metadata). `trace_report` joins a profile to it.

It reads HLO text as XLA prints it (`compiled.as_text()`); only the instructions that become
kernels are counted: those of the entry computation and of control flow it calls (a `lax.scan`
is a while loop), not the insides of fusions, which are read only to classify each fusion.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import sys
from typing import Dict, List, Optional

from cspgan_jax.errors import reader_left

# `%name = type opcode(operands), attributes`; the type may be a tuple with spaces in it.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[^\s=]+)\s*=\s*(?P<type>.+?)\s"
                          r"(?P<op>[a-z][a-z0-9\-]*)\((?P<rest>.*)$")
_COMPUTATION = re.compile(r"^(?P<entry>ENTRY\s+)?%?(?P<name>[^\s(]+)\s*\(.*\{\s*$")
_ARRAY = re.compile(r"\b(pred|s4|s8|s16|s32|s64|u4|u8|u16|u32|u64|f8e4m3fn|f8e5m2|bf16|f16|f32|"
                    r"f64|c64|c128)\[([0-9,]*)\]")
_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2,
          "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8,
          "f64": 8, "c64": 8, "c128": 16}
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLED = re.compile(r"\b(calls|body|condition|to_apply|true_computation|false_computation)="
                     r"%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_FUSION_KIND = re.compile(r"\bkind=(k\w+)")
_BACKEND_KIND = re.compile(r'"kind":"([^"]+)"')
# The model path in op_name: ".../transpose(jvp(Generator))/main_1/right_2/conv_general_dilated".
_LAYER = re.compile(r"(Generator|Discriminator)\)*/(main_\d+(?:/(?:left|right)_\d+)?)")

# Instructions that launch no kernel.
FREE_OPS = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
            "partition-id", "replica-id", "opt-barrier", "add-dependency"}
# Ops that only move or reshape data (a fusion made of these alone is a copy kernel).
MOVE_OPS = {"copy", "transpose", "slice", "dynamic-slice", "dynamic-update-slice", "concatenate",
            "pad", "reshape", "broadcast", "bitcast", "reverse", "parameter", "constant", "tuple",
            "get-tuple-element", "copy-start", "copy-done", "iota"}
# Control flow whose called computations hold kernels of their own.
CONTROL_OPS = {"while", "conditional", "call", "async-start", "async-done"}

CONV_TARGETS = {  # cuDNN custom calls on GPUs
    "__cudnn$convForward": "conv forward", "__cudnn$convBackwardInput": "conv backward-input",
    "__cudnn$convBackwardFilter": "conv backward-filter",
    "__cudnn$convBiasActivationForward": "conv forward (fused bias/act)"}


@dataclasses.dataclass
class Instruction:
  name: str
  op: str
  type: str
  rest: str
  computation: str

  @property
  def op_name(self) -> str:
    m = _OP_NAME.search(self.rest)
    return m.group(1) if m else ""

  @property
  def out_bytes(self) -> int:
    """Bytes of the result (all tuple elements); the bytes a kernel writes."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(self.type):
      n = 1
      for d in dims.split(","):
        if d:
          n *= int(d)
      total += n * _BYTES[dtype]
    return int(total)


def layer_of(op_name: str) -> str:
  """'G main_1/right_2 (bwd)' from an op_name; '' when it names no model layer."""
  m = None
  for m in _LAYER.finditer(op_name):
    pass  # the innermost (last) model path
  if m is None:
    return ""
  net = "G" if m.group(1) == "Generator" else "D"
  direction = " (bwd)" if "transpose(" in op_name[:m.start()] else ""
  return f"{net} {m.group(2)}{direction}"


def parse_hlo(text: str):
  """-> (module name, entry name, {computation: [Instruction]})."""
  module, entry, current = "", "", None
  computations: Dict[str, List[Instruction]] = {}
  for line in text.splitlines():
    if line.startswith("HloModule "):
      module = (line.split()[1:] or [""])[0].rstrip(",")  # a bare "HloModule": no name
      continue
    head = _COMPUTATION.match(line)
    if head and "=" not in line.split("(", 1)[0]:
      current = head.group("name")
      computations[current] = []
      if head.group("entry"):
        entry = current
      continue
    if line.startswith("}"):
      current = None
      continue
    if current is None:
      continue
    m = _INSTRUCTION.match(line)
    if m:
      computations[current].append(Instruction(m.group("name"), m.group("op"), m.group("type"),
                                               m.group("rest"), current))
  if not entry:
    raise ValueError("no ENTRY computation found: not an HLO module's text")
  if current is not None:  # a file cut short would otherwise report part of the program
    raise ValueError(f"the text ends inside computation {current} (cut short?)")
  return module, entry, computations


def _called(inst: Instruction) -> List[str]:
  names = [m.group(2) for m in _CALLED.finditer(inst.rest)]
  for group in _BRANCHES.findall(inst.rest):
    names += [n.strip().lstrip("%") for n in group.split(",") if n.strip()]
  return names


@dataclasses.dataclass
class Kernel:
  """One kernel-level instruction, classified."""
  inst: Instruction
  category: str   # "convolution", "matmul", "elementwise/reduction", "data movement", ...
  detail: str     # conv kind, fusion kind, or the data-movement ops in it
  layer: str

  @property
  def name(self):
    return self.inst.name


class HloReport:
  """The kernels of one optimized HLO module."""

  def __init__(self, text: str):
    self.module, self.entry, self.computations = parse_hlo(text)
    self.kernels: List[Kernel] = []
    self.control = set()  # while / call / conditional: containers of kernels, no work of their own
    seen = set()
    todo = [self.entry]
    while todo:  # the entry and the control flow it calls (scan bodies), not fusion insides
      comp = todo.pop()
      if comp in seen or comp not in self.computations:
        continue
      seen.add(comp)
      for inst in self.computations[comp]:
        if inst.op in CONTROL_OPS:
          self.control.add(inst.name)
          todo += _called(inst)
        elif inst.op not in FREE_OPS:
          self.kernels.append(self._classify(inst))
    self.by_name = {k.name: k for k in self.kernels}

  def _body_ops(self, inst: Instruction, seen: Optional[set] = None) -> List[Instruction]:
    # `seen`: each computation once, so that a (corrupt) fusion that calls itself, directly or
    # through another, ends instead of recursing without end.
    seen = set() if seen is None else seen
    body = []
    for comp in _called(inst):
      if comp in seen:
        continue
      seen.add(comp)
      for sub in self.computations.get(comp, []):
        body += [sub] + (self._body_ops(sub, seen) if sub.op == "fusion" else [])
    return body

  def _classify(self, inst: Instruction) -> Kernel:
    layer = layer_of(inst.op_name)
    if not layer and inst.op == "fusion":  # XLA often leaves a fusion without metadata
      layer = next((l for l in map(layer_of, (b.op_name for b in self._body_ops(inst))) if l), "")
    if inst.op == "custom-call":
      target = (_TARGET.search(inst.rest) or [None, ""])[1]
      if target in CONV_TARGETS or "conv" in target.lower():
        return Kernel(inst, "convolution", CONV_TARGETS.get(target, target), layer)
      if "gemm" in target or "matmul" in target:
        return Kernel(inst, "matmul", target, layer)
      return Kernel(inst, "other", target, layer)
    if inst.op == "convolution":
      return Kernel(inst, "convolution", _conv_kind(inst), layer)
    if inst.op == "dot":
      return Kernel(inst, "matmul", "dot", layer)
    if inst.op == "fusion":
      body = self._body_ops(inst)
      ops = {b.op for b in body}
      kind = (_FUSION_KIND.search(inst.rest) or [None, "?"])[1]
      backend = _BACKEND_KIND.search(inst.rest)
      if "convolution" in ops or (backend and "cudnn" in backend.group(1)):
        conv = next((b for b in body if b.op == "convolution"), None)
        return Kernel(inst, "convolution",
                      _conv_kind(conv) if conv else backend.group(1), layer)
      if "dot" in ops or (backend and ("gemm" in backend.group(1) or "triton" in backend.group(1))):
        return Kernel(inst, "matmul", backend.group(1) if backend else "dot fusion", layer)
      if ops <= MOVE_OPS:
        moved = sorted(ops - {"parameter", "constant", "bitcast", "tuple", "get-tuple-element"})
        return Kernel(inst, "data movement", "+".join(moved) or "copy", layer)
      return Kernel(inst, "elementwise/reduction", kind, layer)
    if inst.op in MOVE_OPS:
      return Kernel(inst, "data movement", inst.op, layer)
    if inst.op in ("all-reduce", "all-reduce-start", "all-reduce-done", "all-gather",
                   "reduce-scatter", "collective-permute", "all-to-all"):
      return Kernel(inst, "collective", inst.op, layer)
    if inst.op in ("rng", "rng-bit-generator", "rng-get-and-update-state"):
      return Kernel(inst, "other", inst.op, layer)
    return Kernel(inst, "elementwise/reduction", inst.op, layer)

  # ---- summaries ----

  def counts(self) -> Dict[str, int]:
    return dict(collections.Counter(k.category for k in self.kernels))

  def data_movement(self) -> List[Kernel]:
    return sorted((k for k in self.kernels if k.category == "data movement"),
                  key=lambda k: -k.inst.out_bytes)

  def traffic(self) -> Dict[str, int]:
    """Bytes a step moves, by kernel kind: each kernel's distinct operands read once (in full,
    or the slices of one it only slices) and its result written once (a scan body's kernels
    once: one step). An upper bound for kernels that read part of an operand otherwise or
    update one in place; the figure the bandwidth-bound kernels' time follows. (Before
    2026-11-27's BatchNorm change sliced operands counted in full, as in docs/PERFORMANCE.md's
    earlier tables.)"""
    types = {(i.computation, i.name): i for comp in self.computations.values() for i in comp}
    moved: Dict[str, int] = collections.Counter()
    for k in self.kernels:
      sliced = self._sliced_operands(k.inst)
      reads: Dict[str, int] = {}
      for position, name in enumerate(_operand_list(k.inst)):
        if (k.inst.computation, name) in types:
          whole = types[(k.inst.computation, name)].out_bytes
          reads[name] = max(reads.get(name, 0), sliced.get(position, whole))
      moved[k.category] += sum(reads.values()) + k.inst.out_bytes
    return dict(moved)

  def _sliced_operands(self, inst: Instruction) -> Dict[int, int]:
    """{operand position: bytes of its slices} for the operands the kernel only slices (a
    slice kernel's, or a fusion parameter whose every use slices it)."""
    if inst.op in ("slice", "dynamic-slice"):
      return {0: inst.out_bytes}
    if inst.op != "fusion":
      return {}
    sliced = {}
    for comp in _called(inst):
      body = self.computations.get(comp, [])
      users = collections.defaultdict(list)
      for sub in body:
        for name in _operand_list(sub):
          users[name].append(sub)
      for sub in body:
        position = re.match(r"(\d+)\)", sub.rest) if sub.op == "parameter" else None
        uses = users.get(sub.name, [])
        if position and uses and all(u.op in ("slice", "dynamic-slice")
                                     and _operand_list(u)[0] == sub.name for u in uses):
          sliced[int(position.group(1))] = sum(u.out_bytes for u in uses)
    return sliced

  def data_dependent_loops(self) -> List[Instruction]:
    """While loops without a known trip count. On a GPU each trip copies the loop's predicate to
    the host and waits for it, so the host stops running ahead of the device there."""
    return [i for comp in self.computations.values() for i in comp
            if i.op == "while" and i.name in self.control and "known_trip_count" not in i.rest]

  def copied_inputs(self) -> List[Kernel]:
    """Copies of the entry's parameters: a donated state copied, not updated in place, because
    the old value is still read after the new one is written (or a layout change)."""
    params = {i.name for i in self.computations[self.entry] if i.op == "parameter"}
    return [k for k in self.kernels if k.inst.computation == self.entry and k.inst.op == "copy"
            and _operands(k.inst) & params]

  def parameter_casts(self) -> List[Kernel]:
    """Kernels that round a float32 input of the step (a parameter, as jit names it) to bf16
    and write nothing else: the casts mixed precision makes where the step starts, which
    `train.ModelState.compute_params` moves into the optimizer's update."""
    entry = {i.name: i for i in self.computations[self.entry]}

    def source(name: str) -> Optional[Instruction]:
      inst = entry.get(name)
      while inst is not None and inst.op in ("bitcast", "get-tuple-element"):
        names = _operands(inst)
        inst = entry.get(next(iter(names))) if len(names) == 1 else None
      return inst

    casts = []
    for k in self.kernels:
      if k.inst.computation != self.entry or k.category == "convolution":
        continue
      if {dtype for dtype, _ in _ARRAY.findall(k.inst.type)} != {"bf16"}:
        continue
      params = [i for i in map(source, _operands(k.inst)) if i is not None and
                i.op == "parameter" and i.type.startswith("f32") and "params" in i.name]
      # no more written than the parameters read: not, say, BatchNorm's output using its bias
      if params and k.inst.out_bytes <= sum(i.out_bytes for i in params):
        casts.append(k)
    return casts

  def channel_split_slices(self) -> Dict[str, str]:
    """Each slice in a CSPup block's forward pass (the channel split), and what became of it:
    'own kernel' (a copy of half the input) or 'fused into <fusion kind>'."""
    found = {}
    for k in self.kernels:
      insts = [k.inst] + (self._body_ops(k.inst) if k.inst.op == "fusion" else [])
      for inst in insts:
        layer = layer_of(inst.op_name) or (k.layer if inst is not k.inst else "")
        if inst.op != "slice" or not layer.startswith("G main_") or "(bwd)" in layer:
          continue
        block = layer.split("/")[0]
        fate = "own kernel" if k.category == "data movement" else f"fused into {k.category}"
        found.setdefault(block, set()).add(fate)
    return {block: ", ".join(sorted(f)) for block, f in sorted(found.items())}

  def column_sums(self) -> List[tuple]:
    """(kernel, layer, rows, columns) of each reduction that sums the rows of a matrix into one
    value a column, in one kernel: a per-channel sum (bias gradients, BatchNorm statistics)
    over N*H*W rows, or the last stage of one XLA split. XLA:GPU gives such a kernel a block
    per 64-128 columns, so a long one runs on few of the chip's SMs."""
    found = []
    for k in self.kernels:
      insts = [k.inst] + (self._body_ops(k.inst) if k.inst.op == "fusion" else [])
      by_name = {i.name: i for i in insts}
      for inst in insts:
        if inst.op != "reduce" or "dimensions={0}" not in inst.rest:
          continue
        first = next(iter(re.findall(r"%([\w.\-]+)", inst.rest)), None)
        source = by_name.get(first) or self.by_name.get(first)
        shape = _ARRAY.findall(source.inst.type if isinstance(source, Kernel) else
                               source.type) if source else []
        out = _ARRAY.findall(inst.type)
        if len(shape) == 1 and len(out) == 1 and len(out[0][1].split(",")) == 1:
          dims = [int(d) for d in shape[0][1].split(",") if d]
          if len(dims) == 2:
            found.append((k.name, k.layer, dims[0], dims[1]))
    return found

  def markdown(self, top: int = 15) -> str:
    counts = self.counts()
    lines = [f"HLO module `{self.module}`: {len(self.kernels)} kernel-level instructions", "",
             "| kind | kernels |", "|---|---|"]
    lines += [f"| {c} | {n} |" for c, n in sorted(counts.items(), key=lambda x: -x[1])]
    convs = collections.Counter(k.detail for k in self.kernels if k.category == "convolution")
    if convs:
      relus = sum('"activation_mode":"kRelu"' in k.inst.rest for k in self.kernels
                  if k.category == "convolution")
      lines += ["", "convolutions: " + ", ".join(f"{n} {d}" for d, n in convs.most_common()) +
                (f"; {relus} with the ReLU after them folded in" if relus else "")]
    moves = self.data_movement()
    total = sum(k.inst.out_bytes for k in moves)
    lines += ["", f"data-movement kernels: {len(moves)}, writing {total / 2**20:.1f} MiB per "
              "step (each also reads about as much)"]
    if moves:
      lines += ["", "| kernel | ops | result | MiB | layer |", "|---|---|---|---|---|"]
      for k in moves[:top]:
        lines.append(f"| {k.name} | {k.detail} | `{k.inst.type.split('{')[0]}` | "
                     f"{k.inst.out_bytes / 2**20:.2f} | {k.layer or '-'} |")
    traffic = self.traffic()
    by_kind = ", ".join(f"{c} {b / 2**20:,.0f}"
                        for c, b in sorted(traffic.items(), key=lambda x: -x[1]))
    lines += ["", "traffic (each kernel's operands read, only the slices of those it slices, "
              "and its result written once), MiB per "
              f"step: {by_kind}; total {sum(traffic.values()) / 2**20:,.0f}"]
    copied = self.copied_inputs()
    lines += ["", f"of which copies of the step's inputs: {len(copied)}, "
              f"{sum(k.inst.out_bytes for k in copied) / 2**20:.1f} MiB"]
    casts = self.parameter_casts()
    if casts:
      lines += ["", f"casts of float32 parameters to bf16 where the step starts: {len(casts)}, "
                f"writing {sum(k.inst.out_bytes for k in casts) / 2**20:.1f} MiB"]
    loops = self.data_dependent_loops()
    lines += ["", f"while loops of data-dependent length (a host sync a trip on a GPU): "
              f"{len(loops)}" + (f" ({', '.join(i.name for i in loops)})" if loops else "")]
    reduces = [k for k in self.kernels if k.inst.op in ("all-reduce", "all-reduce-start")]
    if reduces:
      asynchronous = sum(k.inst.op == "all-reduce-start" for k in reduces)
      lines += ["", f"all-reduces over devices: {len(reduces)} ({asynchronous} asynchronous, "
                f"overlapping compute), {sum(k.inst.out_bytes for k in reduces) / 2**20:.1f} "
                "MiB a step"]
    sums = self.column_sums()
    if sums:
      _, layer, rows, cols = max(sums, key=lambda s: (s[2], s[3]))
      lines += ["", f"per-column sums in one kernel (few blocks on a GPU when long): {len(sums)}, "
                f"the longest {rows:,} rows x {cols:,} ({layer or '-'})"]
    split = self.channel_split_slices()
    if split:
      lines += ["", "CSPup channel-split slices (forward): " +
                "; ".join(f"{b}: {f}" for b, f in split.items())]
    return "\n".join(lines)


def _operand_list(inst: Instruction) -> List[str]:
  """Names of the operands in order (the instructions before the call's closing parenthesis)."""
  depth, end = 1, 0
  for end, ch in enumerate(inst.rest):
    depth += {"(": 1, ")": -1}.get(ch, 0)
    if depth == 0:
      break
  return re.findall(r"%([\w.\-]+)", inst.rest[:end])


def _operands(inst: Instruction) -> set:
  """Names of the operands."""
  return set(_operand_list(inst))


def _conv_kind(inst: Optional[Instruction]) -> str:
  """A CPU `convolution`'s role, from its attributes (a GPU's cuDNN target names it)."""
  if inst is None:
    return "convolution"
  if "lhs_dilate" in inst.rest:
    return "transposed / input-gradient"
  return "convolution"


USAGE = "usage: python -m cspgan_jax.hlo_report FILE.hlo.txt"


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if argv in (["-h"], ["--help"]):
    print(f"{USAGE}\n\n{__doc__.splitlines()[0]}")
    return 0
  if len(argv) != 1:
    print(USAGE, file=sys.stderr)
    return 2
  try:
    with open(argv[0], encoding="utf-8") as f:
      report = HloReport(f.read())
  except UnicodeDecodeError as e:  # a binary file (an image, a compressed trace)
    print(f"hlo_report: error: {argv[0]}: not a text file (byte {e.start} is not UTF-8)",
          file=sys.stderr)
    return 2
  except OSError as e:
    print(f"hlo_report: error: {argv[0]}: {e.strerror or e}", file=sys.stderr)
    return 2
  except ValueError as e:
    print(f"hlo_report: error: {argv[0]}: {e}", file=sys.stderr)
    return 2
  try:
    print(report.markdown())
    sys.stdout.flush()
  except BrokenPipeError:  # `... | head`
    return reader_left()
  return 0


if __name__ == "__main__":
  sys.exit(main())
