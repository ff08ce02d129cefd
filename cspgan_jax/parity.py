"""Numerical parity of the JAX models and training step with the PyTorch reference.

Both sides start from the same weights (PyTorch-initialised or loaded), see the same images and
latents, and every layer's output, loss, parameter, BatchNorm statistic and Adam moment is
compared in PyTorch's key space. Relative error is ||jax - torch|| / ||torch|| over the tensor.
Unless disabled, PyTorch also runs everything in float64. Each row then carries PyTorch's own
float32 error against it (`fp32_floor`: no float32 implementation can be expected closer to
PyTorch than about that) and ours (`jax_vs_fp64`: which of the two is nearer exact).

A tie (docs/PARITY.md) is an activation's input within rounding of zero whose sign our float32
and float64 disagree on: the branch taken differs at that element, and every gradient upstream
with it, by far more than rounding. Each step's ReLU/LeakyReLU inputs (G's pass and D's three)
are compared with float64's; where ours differ at ties, the float64 iteration runs again with our
branch forced there (`aligned`), and a row counts as beyond the bound only if it is beyond it
from both PyTorch's float32 and that branch-aligned float64 run.

With `config.train.dtype = "bfloat16"` both sides run mixed precision: the JAX models in bf16,
PyTorch under CPU bf16 autocast (losses in float32 on both). The floor is then PyTorch's bf16
against its own float32 run (`bf16_floor`), and `jax_vs_fp32` says which is nearer float32.
"""

from __future__ import annotations

import copy
import functools
from typing import List, NamedTuple, Optional

import jax
import numpy as np
from flax import traverse_util

from cspgan_jax import layers, models, torch_port, train


# Two float32 implementations each carry about the floor's error, independently; beyond a few
# times the floor a difference is no longer rounding.
FLOOR_FACTOR = 4.0
TABLE_TOL = 1e-5
# A sign disagreement is a tie when float64's value is within this fraction of its tensor's RMS
# of zero (float32 rounding of a BatchNorm output is ~1e-7 of it); beyond, it is no tie, and
# nothing is forced: a real error stays visible.
TIE_TOL = 1e-5
# Forcing a branch moves everything after it, which can make another tie downstream.
ALIGN_ROUNDS = 4


class Row(NamedTuple):
  group: str          # e.g. "forward G", "step 2", "params D", "adam_nu G"
  name: str           # PyTorch module path or key, or a metric name
  max_abs: float
  rel: float
  floor: Optional[float] = None      # rel error of torch float32 vs float64, where measured
  floor_abs: Optional[float] = None  # its max abs error
  exact: Optional[float] = None      # rel error of jax vs torch float64: who is nearer exact
  aligned: Optional[float] = None    # rel error of jax vs the branch-aligned float64, after ties


class Tie(NamedTuple):
  """An activation input whose sign ours and float64's disagree on, within rounding of zero."""
  step: int
  call: str            # the pass: "G", "D(real)", "D(fake)", "D(fake) after D's step"
  site: str            # the activation, e.g. "D main.7"
  index: tuple         # NCHW
  fp64: float          # in the branch-aligned float64 run
  jax: float
  torch32: float


CALLS = {"G": ("G",), "D": ("D(real)", "D(fake)", "D(fake) after D's step")}


class Rows(list):
  """`run_parity`'s rows, and the ties it found (`ties`), for `format_table`."""
  ties: List[Tie] = []


def _row(group, name, mine, ref, ref64=None, aligned64=None) -> Row:
  if ref64 is None:
    return Row(group, name, *errors(mine, ref))
  floor_abs, floor = errors(ref, ref64)
  aligned = errors(mine, aligned64)[1] if aligned64 is not None else None
  return Row(group, name, *errors(mine, ref), floor, floor_abs, errors(mine, ref64)[1], aligned)


def within_floor(row: Row, tol: float) -> bool:
  """rel <= tol, or within FLOOR_FACTOR x PyTorch's own float32 error where that is larger."""
  return row.rel <= max(tol, FLOOR_FACTOR * (row.floor or 0.0))


def beyond_bound(row: Row, tol: float = TABLE_TOL) -> bool:
  """Not `within_floor` of PyTorch's float32, nor (where ties made one) of the branch-aligned
  float64: its `aligned` error also above max(tol, FLOOR_FACTOR x floor)."""
  if within_floor(row, tol):
    return False
  return row.aligned is None or row.aligned > max(tol, FLOOR_FACTOR * (row.floor or 0.0))


def rows_beyond(rows: List[Row], bfloat16: bool = False) -> Optional[int]:
  """How many rows are beyond the bound, the count `format_table` ends with and `cspgan parity`
  exits on; None where the comparison gives no verdict: without the float64 run (1e-5 alone is
  no bound for a GAN that amplifies rounding) and in bf16 (its rows above PyTorch's bf16 floor
  are expected, `docs/PARITY.md`)."""
  if bfloat16 or all(r.floor is None for r in rows):
    return None
  return sum(beyond_bound(r, TABLE_TOL) for r in rows)


def within_floor_abs(row: Row, tol: float) -> bool:
  """max_abs <= tol, or within FLOOR_FACTOR x PyTorch's own float32 max abs error."""
  return row.max_abs <= max(tol, FLOOR_FACTOR * (row.floor_abs or 0.0))


def errors(a, b):
  """(max |a - b|, ||a - b|| / ||b||) in float64; exact equality gives (0, 0)."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  if a.shape != b.shape:
    raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
  diff = a - b
  max_abs = float(np.max(np.abs(diff))) if diff.size else 0.0
  norm_b, norm_d = float(np.linalg.norm(b)), float(np.linalg.norm(diff))
  rel = norm_d / norm_b if norm_b else (0.0 if norm_d == 0 else float("inf"))
  return max_abs, rel


def _nhwc(x):
  x = np.asarray(x)
  return x.transpose(0, 2, 3, 1) if x.ndim == 4 else x


def _torch_layer_outputs(net, x, autocast: bool = False):
  """{module path: output (NHWC numpy)} of one training-mode forward; `net` is not modified.
  `autocast`: under bf16 autocast on the CPU, as a PyTorch user runs mixed precision."""
  import torch  # pylint: disable=import-outside-toplevel
  outputs = {}
  hooks = [m.register_forward_hook(
      lambda _m, _i, out, name=name: outputs.__setitem__(
          name, _nhwc(out.detach().float().numpy() if autocast else out.detach().numpy())))
           for name, m in net.named_modules() if name]
  try:
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
      net.train()(x)
  finally:
    for h in hooks:
      h.remove()
  return outputs


def _flax_layer_outputs(module, variables, x):
  """{PyTorch module path: output} of every Flax submodule, training mode."""
  _, state = module.apply(variables, x, train=True, mutable=["batch_stats", "intermediates"],
                          capture_intermediates=True)
  return _layer_outputs(state["intermediates"])


def _layer_outputs(intermediates):
  """{PyTorch module path: output} from flax's captured "intermediates" of one pass."""
  flat = traverse_util.flatten_dict(intermediates)
  out = {}
  for path, value in flat.items():
    modules = path[:-1]  # the last element is '__call__' or a sown value's name
    if not (modules and all(torch_port.mirrors_torch(p) for p in modules)):  # flax's Conv
      continue
    if (*modules, layers.BATCH_NORM_OUTPUT) in flat and path[-1] == "__call__":
      # a BatchNorm with its activation: the output is the next PyTorch module's (LeakyReLU)
      prefix, index = torch_port.MODULE_NAME.match(modules[-1]).groups()
      modules = modules[:-1] + (f"{prefix}_{int(index) + 1}",)
    out[torch_port.torch_module_path(modules)] = np.asarray(value[0])
  return out


def forward_rows(tag, module, variables, net, x_jax, x_torch, with_floor=True,
                 bfloat16: bool = False) -> List[Row]:
  """One row per layer with a Flax counterpart, in PyTorch's order of completion.

  `bfloat16`: `module` computes in bf16 and the reference is PyTorch's bf16 autocast; the floor
  is then PyTorch's bf16 against its own float32 (not float64)."""
  # Copies: training-mode forwards move BatchNorm running statistics.
  ref = _torch_layer_outputs(copy.deepcopy(net), x_torch, autocast=bfloat16)
  if not with_floor:
    ref64 = {}
  elif bfloat16:
    ref64 = _torch_layer_outputs(copy.deepcopy(net), x_torch)
  else:
    ref64 = _torch_layer_outputs(copy.deepcopy(net).double(), x_torch.double())
  mine = _flax_layer_outputs(module, variables, x_jax)
  rows = []
  for name in ref:  # PyTorch's module order
    if name in mine:
      rows.append(_row(f"forward {tag}", name, mine[name], ref[name], ref64.get(name)))
  return rows


def adam_moments(opt_state):
  """(mu, nu) of the ScaleByAdamState inside an optax.adam state."""
  for s in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda s: hasattr(s, "mu")):
    if hasattr(s, "mu"):
      return s.mu, s.nu
  raise ValueError("no Adam state found")


def torch_adam_moments(net, opt):
  mu, nu = {}, {}
  for name, p in net.named_parameters():
    st = opt.state[p]
    mu[name], nu[name] = st["exp_avg"].numpy(), st["exp_avg_sq"].numpy()
  return mu, nu


def _torch_state(net, opt):
  """{group: {key: array}} of a reference network: params, bn_stats, adam_mu, adam_nu."""
  out = {"params": {}, "bn_stats": {}}
  for key, value in torch_port.module_state_dict(net).items():
    out["bn_stats" if torch_port.is_bn_statistic(key) else "params"][key] = value
  out["adam_mu"], out["adam_nu"] = torch_adam_moments(net, opt)
  return out


def _flax_state(model_state: train.ModelState):
  mine = torch_port.flax_to_torch({"params": model_state.params,
                                   "batch_stats": model_state.batch_stats})
  mu, nu = adam_moments(model_state.opt_state)
  return {"params": mine, "bn_stats": mine,
          "adam_mu": torch_port.flax_to_torch({"params": mu}),
          "adam_nu": torch_port.flax_to_torch({"params": nu})}


def state_rows(state: train.GANState, reference, reference64=None, aligned64=None) -> List[Row]:
  """Rows comparing every parameter, BN statistic and Adam moment with the reference.

  `reference` (and the float64 `reference64`, for the floor; `aligned64`, the branch-aligned
  float64 run) map "G"/"D" to (net, optimizer).
  """
  rows = []
  for tag, model_state in (("G", state.g), ("D", state.d)):
    mine = _flax_state(model_state)
    ref = _torch_state(*reference[tag])
    ref64 = _torch_state(*reference64[tag]) if reference64 else None
    al64 = _torch_state(*aligned64[tag]) if aligned64 else None
    for group, values in ref.items():
      for key, value in values.items():
        rows.append(_row(f"{group} {tag}", key, mine[group][key], value,
                         ref64[group][key] if ref64 else None,
                         al64[group][key] if al64 else None))
  return rows


IMAGE_KINDS = ("faces", "noise")


def parity_data(config, steps: int, seed: int, images_kind: str = "faces"):
  """Deterministic images (NHWC, in [-1, 1]) and latents, drawn step by step so that the first
  k iterations of a longer comparison are the same as those of a k-step one.

  "faces": the synthetic cartoon faces through the training input's exact uint8 -> [-1, 1]
  conversion, statistics like real images (flat regions, a mean far from 0). They also make
  one-ulp ties likelier: a pre-activation or a first-step gradient within rounding of zero takes
  a different branch (LeakyReLU, Adam's sign) in different float32 programs (docs/PARITY.md).
  "noise": tanh(N(0, 1)), smooth errors only; the tests bound those tightly.
  """
  if images_kind not in IMAGE_KINDS:
    raise ValueError(f"images_kind must be one of {IMAGE_KINDS}, got {images_kind!r}")
  from cspgan_jax import input_pipeline, synthetic  # pylint: disable=import-outside-toplevel
  rs = np.random.RandomState(seed)
  m, b = config.model, config.train.batch_size
  images, latents = [], []
  for step in range(steps):
    if images_kind == "faces" and m.nc == 3:
      faces = synthetic.cartoon_faces(b, m.resolution, seed=seed, start=step * b)
      images.append(input_pipeline.UNIT_RANGE_TABLE[faces])
    else:
      images.append(np.tanh(rs.randn(b, m.resolution, m.resolution, m.nc)).astype(np.float32))
    latents.append(rs.randn(b, m.nz).astype(np.float32))
  return images, latents


def run_parity(config, net_g_path: Optional[str] = None, net_d_path: Optional[str] = None,
               steps: int = 3, seed: int = 0, with_floor: bool = True,
               log=lambda msg: None, images_kind: str = "faces",
               find_ties: bool = True) -> List[Row]:
  """Builds both implementations from the same weights and compares forward and `steps` steps.
  `find_ties` (float32 with the floor run only): look for ties and compare with the
  branch-aligned float64 run too; it keeps every activation's input of three runs, about twice
  the time and memory of the comparison alone at 128x128."""
  import torch  # pylint: disable=import-outside-toplevel

  torch.use_deterministic_algorithms(True)
  # True float32 on every backend: XLA would use TF32 for float32 convolutions on a GPU.
  config = config.copy_and_resolve_references()
  config.train.matmul_precision = "highest"
  with jax.default_matmul_precision("highest"):
    return _run_parity(config, net_g_path, net_d_path, steps, seed, with_floor, log, images_kind,
                       find_ties)


def _run_parity(config, net_g_path, net_d_path, steps, seed, with_floor, log, images_kind,
                find_ties):
  import torch  # pylint: disable=import-outside-toplevel
  dtype = train.compute_dtype(config)
  bf16 = np.dtype(dtype) != np.float32
  from cspgan_jax import torch_reference  # pylint: disable=import-outside-toplevel
  loss = config.train.loss
  torch_reference.get_loss(loss)  # a loss without its PyTorch twin: one line, before any work
  net_g, net_d = torch_reference.build_reference(config.model, seed=seed)
  g_template, d_template = train.variable_shapes(config)
  notes = []
  for path, net, role, template in ((net_g_path, net_g, "netG", g_template),
                                    (net_d_path, net_d, "netD", d_template)):
    if path:
      sd = torch_port.strip_wrapper_prefixes(torch_port.load_torch_state_dict(path, role))
      torch_port.check_keys(sd, torch_port.conversion_table(template), f"{role} ({path})")
      net.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
      notes.append(torch_port.float64_rounding(sd, f"{role} ({path})"))
  # An error in the weights (a count past int32) names the file they came from; without one
  # they are the reference's own, and a misfit is between its modules and ours (a new variant)
  g_vars = torch_port.torch_to_flax(torch_port.module_state_dict(net_g), g_template,
                                    f"netG ({net_g_path})" if net_g_path
                                    else "torch_reference.Generator")
  d_vars = torch_port.torch_to_flax(torch_port.module_state_dict(net_d), d_template,
                                    f"netD ({net_d_path})" if net_d_path
                                    else "torch_reference.Discriminator")
  for note in filter(None, notes):  # once both converted: an error is the one line there is
    log(f"note: {note}")
  gen, disc = models.build_models(config.model, dtype=dtype)
  images, latents = parity_data(config, max(steps, 1), seed, images_kind)

  log("forward passes")
  rows = forward_rows("G", gen, g_vars, net_g, latents[0],
                      torch.from_numpy(latents[0])[:, :, None, None], with_floor, bf16)
  rows += forward_rows("D", disc, d_vars, net_d, images[0],
                       torch.from_numpy(images[0].transpose(0, 3, 1, 2).copy()), with_floor, bf16)

  state = train.create_state(config, g_vars, d_vars)
  reference = _with_optimizers(net_g, net_d, config)
  # The same iterations in float64 (bf16: in float32): how far PyTorch's own result is.
  precise = (lambda net: copy.deepcopy(net)) if bf16 else (lambda net: copy.deepcopy(net).double())
  reference64 = (_with_optimizers(precise(net_g), precise(net_d), config) if with_floor
                 else None)
  # Ties need float64 signs; in bf16 every sign near zero is rounding.
  detect = find_ties and with_floor and not bf16
  sites = {"G": _activation_sites(net_g), "D": _activation_sites(net_d)}
  aligned64 = None  # float64 with our branches at the ties, from the first tie on
  ties = []
  step_fn = train.jit_train_step(config, with_noise=True)
  if detect:  # the same step, each pass's layer outputs its third result
    step_fn = jax.jit(functools.partial(train.train_step_with_noise, config=config, capture=True),
                      donate_argnums=0)
  for k in range(steps):
    log(f"training iteration {k + 1}/{steps}")
    state, metrics, *captured = step_fn(state, images[k], latents[k])
    real = torch.from_numpy(images[k].transpose(0, 3, 1, 2).copy())
    z = torch.from_numpy(latents[k])[:, :, None, None]
    if not detect:
      ref = _reference_iteration(reference, real, z, loss, autocast=bf16)
      if not with_floor:
        ref64 = {}
      else:  # bf16's floor run is PyTorch's float32, float32's is float64
        ref64 = _reference_iteration(reference64, *((real, z) if bf16 else (real.double(),
                                                                             z.double())), loss)
      rows += [_row(f"step {k + 1}", name, metrics[name], ref[name], ref64.get(name))
               for name in ref]
      continue
    start64 = copy.deepcopy(aligned64 or reference64)
    ref, record32 = _recorded_iteration(reference, real, z, loss)
    ref64, record64 = _recorded_iteration(reference64, real.double(), z.double(), loss)
    ours = _our_activation_inputs(captured[0], sites)
    force = {} if aligned64 else _sign_ties(ours, record64)
    ref_aligned = {}
    if aligned64 or force:
      log(f"ties at step {k + 1}: float64 again with our branches there")
      aligned64, ref_aligned, record_aligned, force = _branch_aligned_iteration(
          start64, ours, real.double(), z.double(), loss, force, log)
      ties += _tie_list(k + 1, force, ours, record_aligned, record32)
    rows += [_row(f"step {k + 1}", name, metrics[name], ref[name], ref64[name],
                  ref_aligned.get(name)) for name in ref]
  if steps:
    rows += state_rows(state, reference, reference64, aligned64)
  rows = Rows(rows)
  rows.ties = ties
  return rows


def _activation_sites(net):
  """{path of each ReLU/LeakyReLU: path of the module before it}: the activation's input is that
  module's output (a convolution's, or BatchNorm's as `_flax_layer_outputs` names it)."""
  from cspgan_jax import torch_reference  # pylint: disable=import-outside-toplevel
  sites = {}
  for path, module in net.named_modules():
    if isinstance(module, torch_reference.ACTIVATIONS):
      parent, _, index = path.rpartition(".")
      sites[path] = f"{parent}.{int(index) - 1}" if parent else str(int(index) - 1)
  return sites


def _our_activation_inputs(captured, sites):
  """{(tag, activation path, call): our input to it (NCHW)} in the reference's calls (G once;
  D on real, on the fake, and after its step on the fake), from the layer outputs the compared
  step returned (`train_step_with_noise(capture=True)`): the values its branches were taken on.
  (Standalone forwards round otherwise: at 128x128 one missed D tie moved six rows.)"""
  out = {}
  for name, pass_layers in captured.items():
    tag = name[0]
    call = train.CAPTURED_PASSES.index(name) - (1 if tag == "D" else 0)
    outputs = _layer_outputs(jax.device_get(pass_layers))
    for path, before in sites[tag].items():
      out[(tag, path, call)] = np.asarray(outputs[before]).transpose(0, 3, 1, 2)
  return out


def _recorded_iteration(reference, real, z, loss: str, force=None):
  """`_reference_iteration` recording every activation's inputs (`branch_sites`)."""
  from cspgan_jax import torch_reference  # pylint: disable=import-outside-toplevel
  nets = {tag: net for tag, (net, _) in reference.items()}
  with torch_reference.branch_sites(nets, force) as record:
    metrics = _reference_iteration(reference, real, z, loss)
  return metrics, record


def _sign_ties(ours, record64, forced=None):
  """{(tag, path, call): (flat indices, our branch there)} where our activation input's sign
  (x > 0, the branch) differs from float64's within TIE_TOL of its RMS of zero; `forced`'s
  elements (already on our branch) left out."""
  forced = forced or {}
  out = {}
  for (tag, path), calls in record64.items():
    for call, x64 in enumerate(calls):
      mine = ours[(tag, path, call)].reshape(-1)
      x64 = x64.numpy().reshape(-1)
      near_zero = np.abs(x64) <= TIE_TOL * np.sqrt(np.mean(np.square(x64)))
      index = np.nonzero(((mine > 0) != (x64 > 0)) & near_zero)[0]
      if (tag, path, call) in forced:
        index = np.setdiff1d(index, forced[(tag, path, call)][0])
      if index.size:
        out[(tag, path, call)] = (index, mine[index] > 0)
  return out


def _branch_aligned_iteration(start, ours, real, z, loss: str, force, log=lambda msg: None):
  """The float64 iteration from `start` (its references before the step; not modified) with
  our branch at each tie in `force`, again with each tie the forced run reveals (a forced
  branch moves what follows it), at most ALIGN_ROUNDS runs. Returns (references after, metrics,
  record, force), all of the last run made: the ties listed are the ones it forced."""
  for round_ in range(ALIGN_ROUNDS):
    reference = copy.deepcopy(start)
    metrics, record = _recorded_iteration(reference, real, z, loss, force)
    new = _sign_ties(ours, record, force)
    if not new:
      break
    if round_ == ALIGN_ROUNDS - 1:  # no run left for them: say so rather than list them
      log(f"{sum(len(i) for i, _ in new.values())} more ties appeared in the last of "
          f"{ALIGN_ROUNDS} aligned float64 runs and are not forced; rows downstream of them "
          "may stay beyond the bound")
      break
    force = dict(force)
    for key, (index, branch) in new.items():
      old_index, old_branch = force.get(key, (index[:0], branch[:0]))
      force[key] = (np.concatenate([old_index, index]), np.concatenate([old_branch, branch]))
  return reference, metrics, record, force


def _tie_list(step, force, ours, record64, record32) -> List[Tie]:
  ties = []
  for (tag, path, call), (index, _) in sorted(force.items()):
    mine = ours[(tag, path, call)]
    x64, x32 = record64[(tag, path)][call], record32[(tag, path)][call]
    for i in index:
      ties.append(Tie(step, CALLS[tag][call], f"{tag} {path}",
                      tuple(int(v) for v in np.unravel_index(i, mine.shape)),
                      float(x64.reshape(-1)[i]), float(mine.reshape(-1)[i]),
                      float(x32.reshape(-1)[i])))
  return ties


def _with_optimizers(net_g, net_d, config):
  from cspgan_jax import torch_reference  # pylint: disable=import-outside-toplevel
  opt_g, opt_d = torch_reference.make_optimizers(net_g, net_d, config.train)
  return {"G": (net_g, opt_g), "D": (net_d, opt_d)}


def _reference_iteration(reference, real, z, loss: str, autocast: bool = False):
  from cspgan_jax import torch_reference  # pylint: disable=import-outside-toplevel
  (net_g, opt_g), (net_d, opt_d) = reference["G"], reference["D"]
  return torch_reference.train_iteration(net_g, net_d, opt_g, opt_d, real, z, autocast, loss)


def format_table(rows: List[Row], bfloat16: bool = False) -> str:
  """A fixed-width table; the last line is `max_rel_err=<largest rel>`. `bfloat16`: the rows of
  a bf16 run, whose floor is PyTorch's bf16 against its float32 (and a row is above it when
  further from PyTorch's bf16 than that). Where `rows` (a `Rows`) holds ties, a last column
  `jax_vs_aligned` and one `tie ...` line per tie follow, and the count is `beyond_bound`'s."""
  floor, exact = ("bf16_floor", "jax_vs_fp32") if bfloat16 else ("fp32_floor", "jax_vs_fp64")
  aligned = any(r.aligned is not None for r in rows)
  lines = [f"{'group':<14} {'layer / quantity':<36} {'max_abs_err':>12} {'rel_err':>10} "
           f"{floor:>10} {exact:>11}" + (f" {'jax_vs_aligned':>14}" if aligned else "")]
  fmt = lambda v, w: f"{v:{w}.2e}" if v is not None else " " * w
  for r in rows:
    lines.append(f"{r.group:<14} {r.name:<36} {r.max_abs:12.3e} {r.rel:10.2e} "
                 f"{fmt(r.floor, 10)} {fmt(r.exact, 11)}" + (f" {fmt(r.aligned, 14)}"
                                                             if aligned else ""))
  for t in getattr(rows, "ties", ()):
    lines.append(f"tie step {t.step} {t.call}: {t.site} input at NCHW {t.index}: "
                 f"fp64 {t.fp64:+.3e} jax {t.jax:+.3e} torch32 {t.torch32:+.3e}")
  if bfloat16 and all(r.floor is None for r in rows):
    lines.append("rows above 1x bf16_floor: not measured (no floor run)")
  elif bfloat16:
    above = [r for r in rows if r.floor is not None and r.rel > r.floor]
    lines.append(f"rows above 1x bf16_floor: {len(above)} of {len(rows)}")
  elif aligned:
    above = [r for r in rows if beyond_bound(r, TABLE_TOL)]
    alone = [r for r in rows if not within_floor(r, TABLE_TOL)]
    lines.append(f"rows above max({TABLE_TOL:g}, {FLOOR_FACTOR:g}x fp32_floor): {len(above)} "
                 f"of {len(rows)} from both PyTorch's float32 and the branch-aligned float64 "
                 f"({len(alone)} from PyTorch's float32 alone)")
  else:
    above = [r for r in rows if not within_floor(r, TABLE_TOL)]
    lines.append(f"rows above max({TABLE_TOL:g}, {FLOOR_FACTOR:g}x fp32_floor): {len(above)} "
                 f"of {len(rows)}")
  lines.append(f"max_rel_err={max_rel(rows):.3e}")
  return "\n".join(lines)


def max_rel(rows: List[Row]) -> float:
  return max((r.rel for r in rows), default=0.0)
