"""Five training iterations against the PyTorch reference for every block x discriminator.

Tolerance: 1e-5 relative (parameters also 1e-5 absolute), or 4x PyTorch's own float32 error
(its fp32 run vs the same run in fp64) where that is larger. The second arm is needed:
- `leaky_bn`: a conv bias followed by training-mode BatchNorm has an exactly-zero gradient, so
  both frameworks step it by Adam-normalised rounding noise (+-lr); PyTorch's fp32 and fp64
  runs disagree there as much as we disagree with PyTorch.
- `relu` + `avgpool`: rows beyond 1e-5 (D's first BatchNorm) can equal PyTorch's floor: there
  JAX agrees with float64 and PyTorch's float32 is the outlier.

These bounds are for smooth rounding errors, so the images are tanh(N(0, 1)) noise. Real-like
images also produce one-ulp ties, which no smooth bound covers: with the synthetic faces and
seed 0, one of D's 16,384 pre-activations in the avgpool discriminator's fake pass at step 4 is
7.0e-8 in float64; PyTorch's float32 keeps its sign, ours rounds it to -6.0e-8, LeakyReLU takes
the other branch there, and D's first two layers' gradients move by 1e-4 (docs/PARITY.md).
`test_faces_match_pytorch` runs the faces with a seed (1) that holds no tie.
"""

import jax
import numpy as np
import pytest
import torch

from cspgan_jax import losses, models, parity, torch_port, torch_reference, train
from cspgan_jax.errors import CheckpointError, ConfigError

REL_TOL = 1e-5
ABS_TOL = 1e-5
FACES_SEED = 1  # see the docstring: seed 0 holds a one-ulp LeakyReLU tie at step 4 (avgpool)


def assert_within_bounds(rows):
  """Every row within 1e-5 relative or 4x PyTorch's own float32 error; parameters also 1e-5
  absolute (the module docstring says why both arms)."""
  for r in rows:
    assert parity.within_floor(r, REL_TOL), r
    if r.group.startswith("params"):
      assert parity.within_floor_abs(r, ABS_TOL), r


def state_groups_and_params(config):
  """The state groups parity must report for `config`'s model (`bn_stats` where a network has
  BatchNorm statistics) and every parameter's PyTorch name, from the Flax variables: a new
  variant is covered as it is written."""
  groups, params = set(), set()
  for tag, variables in zip("GD", train.variable_shapes(config)):
    groups |= {f"params {tag}", f"adam_mu {tag}", f"adam_nu {tag}"}
    if variables.get("batch_stats"):
      groups.add(f"bn_stats {tag}")
    params |= {f"{tag} {e.torch_key}" for e in torch_port.conversion_table(variables)
               if e.collection == "params"}
  return groups, params


def assert_state_compared(rows, config):
  """Every state group, and every parameter, compared (and nothing else in those groups)."""
  groups, params = state_groups_and_params(config)
  state = {r.group for r in rows if not r.group.startswith(("forward", "step"))}
  assert state == groups
  assert sorted(f"{r.group[-1]} {r.name}" for r in rows if r.group.startswith("params")) == sorted(
      params)


@pytest.mark.parametrize("block", models.BLOCKS)
@pytest.mark.parametrize("kind", models.DISCRIMINATORS)
def test_five_iterations_match_pytorch(tiny_config, block, kind):
  config = tiny_config(f"model.block={block}", f"model.discriminator={kind}")
  rows = parity.run_parity(config, steps=5, seed=0, images_kind="noise")
  assert {f"step {k}" for k in range(1, 6)} <= {r.group for r in rows}
  assert_state_compared(rows, config)
  assert_within_bounds(rows)
  # The bound is not vacuous: test_optax_adam_rounding_breaks_parity exceeds it 30-fold.


@pytest.mark.parametrize("kind", models.DISCRIMINATORS)
def test_d_on_real_and_fake_in_one_pass_matches_pytorch(tiny_config, kind):
  """`train.d_real_fake_together`: D's two passes as one batch of twice the size, each half
  normalised by its own statistics, the running ones moved real first. PyTorch's two passes
  are the reference, at the same bounds; with statistics over the whole batch every
  discriminator with BatchNorm fails."""
  config = tiny_config(f"model.discriminator={kind}", "train.d_real_fake_together=True")
  rows = parity.run_parity(config, steps=5, seed=0, images_kind="noise")
  assert_state_compared(rows, config)
  assert_within_bounds(rows)


# torch_bce, the seed's loss, is every other test's
@pytest.mark.parametrize("loss", [name for name in losses.LOSSES if name != "torch_bce"])
def test_each_loss_matches_pytorch(tiny_config, loss):
  """`train.loss`: each loss against its twin in torch_reference.LOSSES (bce_logits: PyTorch's
  BCEWithLogitsLoss on D's output before its Sigmoid)."""
  config = tiny_config(f"train.loss={loss}")
  rows = parity.run_parity(config, steps=3, seed=0, images_kind="noise")
  assert {f"step {k}" for k in range(1, 4)} <= {r.group for r in rows}
  assert_within_bounds(rows)


def test_a_loss_needs_its_pytorch_twin(tiny_config, monkeypatch):
  """A loss without its twin stops parity in one line; with it, the game (here hinge: G's loss
  is -mean(l), no target) is compared like any other. Not named "hinge": a real one may be."""
  relu = jax.nn.relu
  monkeypatch.setitem(losses.LOSSES, "test_hinge", losses.GANLoss(
      d_on_real=lambda l: relu(1 - l).mean(), d_on_fake=lambda l: relu(1 + l).mean(),
      g_on_fake=lambda l: -l.mean()))
  config = tiny_config("train.loss=test_hinge")
  with pytest.raises(ConfigError) as e:
    parity.run_parity(config, steps=1)
  assert str(e.value) == ("train.loss='test_hinge' has no PyTorch twin: add it to "
                          "torch_reference.LOSSES (the twin of losses.LOSSES)")
  monkeypatch.setitem(torch_reference.LOSSES, "test_hinge", torch_reference.GANLoss(
      d_on_real=lambda out: torch.relu(1 - out).mean(),
      d_on_fake=lambda out: torch.relu(1 + out).mean(),
      g_on_fake=lambda out: -out.mean(), on_logits=True))
  rows = parity.run_parity(config, steps=2, seed=0, images_kind="noise")
  assert {"step 1", "step 2"} <= {r.group for r in rows}
  assert_within_bounds(rows)


def test_a_reference_unlike_the_model_names_the_reference(tiny_config, monkeypatch):
  """Without --netG/--netD parity converts torch_reference's own weights: a variant whose two
  sides name or shape a layer differently is said to be the reference's misfit, not a netG's
  (there is no such file)."""
  build, leaky_bn = torch_reference.build_reference, tiny_config("model.block=leaky_bn")
  monkeypatch.setattr(torch_reference, "build_reference",
                      lambda model_config, seed=None: build(leaky_bn.model, seed))
  with pytest.raises(CheckpointError) as e:
    parity.run_parity(tiny_config(), steps=1)
  assert str(e.value).startswith("torch_reference.Generator does not fit the configured model: "
                                 "missing 6: main.0.right.2.weight, main.0.right.3.bias")


def test_edge_layers_as_matmul_match_pytorch(tiny_config):
  """`model.edge_layers_as_matmul`: D's first and last convolutions as im2col + a matmul, G's
  first block's and last transposed ones as a matmul + col2im, against PyTorch's convolutions,
  at the same bounds (the baseline's dcgan D; avgpool's figures, also within them, are in
  docs/PARITY.md)."""
  config = tiny_config("model.edge_layers_as_matmul=True")
  rows = parity.run_parity(config, steps=5, seed=0, images_kind="noise")
  assert {"params G", "params D", "adam_nu G"} <= {r.group for r in rows}
  assert_within_bounds(rows)


@pytest.mark.parametrize("kind", models.DISCRIMINATORS)
def test_faces_match_pytorch(tiny_config, kind):
  config = tiny_config(f"model.discriminator={kind}")
  rows = parity.run_parity(config, steps=5, seed=FACES_SEED, images_kind="faces")
  assert len(rows) > 100
  for r in rows:
    assert parity.within_floor(r, REL_TOL), r


def test_optax_adam_rounding_breaks_parity(tiny_config):
  # Why the default optimizer is `torch_adam`: optax's mathematically equal Adam rounds D's
  # step differently by one ulp, and the GAN amplifies that into G's gradient (3.6e-3 here).
  def worst(optimizer):  # largest error in units of the bound used above
    config = tiny_config("model.ngf=64", "model.ndf=64", "model.nz=100", "train.batch_size=16",
                         f"train.optimizer={optimizer}")
    rows = parity.run_parity(config, steps=1, images_kind="noise")
    return max(r.rel / max(REL_TOL, parity.FLOOR_FACTOR * r.floor) for r in rows)

  exact, optax_adam = worst("torch_adam"), worst("adam")
  assert optax_adam > 30 * exact, (exact, optax_adam)
  assert optax_adam > 30


def test_bfloat16_iterations_track_pytorch_autocast(config_path, capsys):
  """`cspgan parity --dtype bfloat16`: the JAX models in bf16 against PyTorch's CPU bf16
  autocast, each row's floor PyTorch's bf16 against its own float32. At tiny.py's widths every
  layer of both forward passes is bit for bit PyTorch's (tests/test_models.py covers the real
  widths). The iterations then differ as bf16 gradients do (summation orders; PyTorch takes the
  loss of bf16-rounded sigmoid probabilities, ours of the logits): the losses stay within bf16's
  precision, and after three Adam steps each state group (parameters, Adam moments, BatchNorm
  statistics) is typically as near PyTorch's bf16 run as that run is to its float32 one."""
  import jax
  import numpy as np
  from cspgan_jax import cli
  assert cli.main(["parity", "--config", config_path("tiny"), "--steps", "3",
                   "--dtype", "bfloat16"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines[0].split()[-2:] == ["bf16_floor", "jax_vs_fp32"]
  rows = {}
  for line in lines[1:-2]:
    group, name, _, rel, floor, _ = line.rsplit(None, 5)
    rows.setdefault(group.split()[0], []).append((name, float(rel), float(floor)))
  assert len(rows["forward"]) == 27  # D's two LeakyReLUs after BatchNorm included
  for _, rel, floor in rows["forward"]:  # a GPU's convolutions sum in another order
    assert rel == 0 if jax.default_backend() == "cpu" else rel < 0.6 * floor
  assert all(1e-3 < floor < 1e-2 for _, _, floor in rows["forward"])  # bf16's own error
  assert len(rows["step"]) == 15 and max(rel for _, rel, _ in rows["step"]) < 5e-3
  for group in ("params", "adam_mu", "adam_nu", "bn_stats"):
    ratios = [rel / floor for _, rel, floor in rows[group] if floor > 0]
    assert np.median(ratios) < 1.2, (group, rows[group])
  # Without the float32 run there is no floor to count rows against.
  assert cli.main(["parity", "--config", config_path("tiny"), "--steps", "0", "--dtype",
                   "bfloat16", "--no-floor"]) == 0
  assert capsys.readouterr().out.strip().splitlines()[-2:] == [
      "rows above 1x bf16_floor: not measured (no floor run)", "max_rel_err=0.000e+00"]


# ---- ties: an activation input within rounding of zero, the other side of it in our float32 ----

def plant_tie(config, tmp_path, ours_positive: bool):
  """netG.pt and netD.pt (PyTorch seed 0) where one of D's main.3 BatchNorm outputs on the first
  real batch (noise images, step 1) is within rounding of zero (|x| < 1e-6), our float32 on one
  side of it (positive if `ours_positive`, else <= 0), float64 and PyTorch's float32 on the other
  (as in the quickstart's ties, docs/PARITY.md). Planted through that channel's BatchNorm bias:
  minus the output, then moved so that zero lies between ours and PyTorch's (both float32 carry
  about the same rounding there, from bias - mean * alpha); searched over the channels. Returns
  the paths, the tied element (NCHW) and its float64 and PyTorch float32 values."""
  import copy
  import numpy as np
  net_g, net_d = torch_reference.build_reference(config.model, seed=0)
  images, _ = parity.parity_data(config, 1, 0, "noise")
  real = torch.from_numpy(images[0].transpose(0, 3, 1, 2).copy())
  _, disc = models.build_models(config.model)
  _, d_template = train.variable_shapes(config)
  bias = net_d.main[3].bias

  def values(at):  # (float64, ours, PyTorch's float32) at NHWC `at` with the present biases
    x64 = parity._torch_layer_outputs(copy.deepcopy(net_d).double(), real.double())["main.3"]
    x32 = parity._torch_layer_outputs(copy.deepcopy(net_d), real)["main.3"]
    d_vars = torch_port.torch_to_flax(torch_port.module_state_dict(net_d), d_template, "netD")
    return x64[at], parity._flax_layer_outputs(disc, d_vars, images[0])["main.3"][at], x32[at]

  x64 = parity._torch_layer_outputs(copy.deepcopy(net_d).double(), real.double())["main.3"]
  for c in range(x64.shape[-1]):
    at = np.unravel_index(np.argmin(np.abs(x64[..., c])), x64.shape[:-1]) + (c,)
    with torch.no_grad():
      bias[c] = float(np.float32(-x64[at]))
    v64, mine, v32 = values(at)
    u, w = mine - v64, v32 - v64  # ours' and PyTorch's rounding error
    # the float64 value wanted: zero between ours and PyTorch's, float64 on PyTorch's side
    lo, hi = (-u, min(0.0, -w)) if ours_positive else (max(0.0, -w), -u)
    if lo < hi:
      with torch.no_grad():
        bias[c] = float(np.float32(bias[c].item() + (lo + hi) / 2 - v64))
      v64, mine, v32 = values(at)
    if (lo < hi and abs(v64) < 1e-6 and (mine > 0) == ours_positive
        and (v64 > 0) == (v32 > 0) != ours_positive):
      torch.save(net_g.state_dict(), tmp_path / "netG.pt")
      torch.save(net_d.state_dict(), tmp_path / "netD.pt")
      return (str(tmp_path / "netG.pt"), str(tmp_path / "netD.pt"),
              tuple(int(i) for i in (at[0], c, at[1], at[2])), (float(v64), float(v32)))
    with torch.no_grad():
      bias[c] = 0.0
  raise AssertionError("no tie planted")


@pytest.mark.parametrize("ours_positive", [True, False])
def test_planted_tie_is_found_and_aligned(tiny_config, tmp_path, ours_positive):
  """One tie spoils parity (rows far beyond the bound against PyTorch's float32, whose float64
  it follows); parity finds it, and against the float64 run forced onto our branch there every
  row is within the bound, whichever side of zero our float32 took (<= 0: the negative branch)."""
  config = tiny_config()
  net_g, net_d, index, (v64, v32) = plant_tie(config, tmp_path, ours_positive)
  rows = parity.run_parity(config, net_g, net_d, steps=1, seed=0, images_kind="noise")
  assert [(t.step, t.call, t.site, t.index) for t in rows.ties] == [
      (1, "D(real)", "D main.4", index)]
  tie = rows.ties[0]
  assert abs(tie.fp64) < 1e-6 and (tie.jax > 0) == ours_positive != (tie.fp64 > 0)
  assert (tie.torch32 > 0) == (tie.fp64 > 0)
  assert tie.fp64 == pytest.approx(v64, rel=1e-9) and tie.torch32 == v32  # each its own
  assert any(not parity.within_floor(r, REL_TOL) for r in rows)  # the tie's doing
  for r in rows:
    if r.group.startswith(("step", "params", "adam", "bn_stats")):
      assert r.aligned <= max(REL_TOL, parity.FLOOR_FACTOR * r.floor), r
    assert not parity.beyond_bound(r, REL_TOL), r
  lines = parity.format_table(rows).splitlines()
  assert lines[0].split()[-1] == "jax_vs_aligned"
  assert lines[-3].startswith("tie step 1 D(real): D main.4 input at NCHW ")
  assert lines[-2].startswith(f"rows above max(1e-05, 4x fp32_floor): 0 of {len(rows)} ")
  assert lines[-1].startswith("max_rel_err=")
  if ours_positive:
    # Two steps: step 1's tie stays listed, and step 2's aligned run goes on from step 1's
    # aligned state (from the unaligned one, D's first Adam moments landed beyond the bound)
    two = parity.run_parity(config, net_g, net_d, steps=2, seed=0, images_kind="noise")
    assert (1, "D(real)", "D main.4", index) in [(t.step, t.call, t.site, t.index)
                                                 for t in two.ties]
    assert not [r for r in two if parity.beyond_bound(r, REL_TOL)]
  if ours_positive:  # `--no-ties`: the comparison as it was, the tie counted against us
    plain = parity.run_parity(config, net_g, net_d, steps=1, seed=0, images_kind="noise",
                              find_ties=False)
    assert not plain.ties and all(r.aligned is None for r in plain)
    assert [r.rel for r in plain] == [r.rel for r in rows]
    assert not parity.format_table(plain).splitlines()[-2].startswith(
        "rows above max(1e-05, 4x fp32_floor): 0 ")


def test_the_summary_lines_count_and_pick_the_right_rows():
  """A forward row has no aligned value (no tie search there): beyond the bound, it counts
  even when ties gave other rows one. max_rel_err is the largest. A zero reference with a
  nonzero value is infinitely far, not equal."""
  bad = parity.Row("forward D", "main.0", 1.0, 1e-3, floor=1e-8, floor_abs=1e-8, exact=1e-3)
  good = parity.Row("step 1", "Loss_D", 0.0, 2e-6, floor=1e-8, floor_abs=1e-8, exact=0.0,
                    aligned=0.0)
  assert parity.beyond_bound(bad) and not parity.beyond_bound(good)
  lines = parity.format_table(parity.Rows([bad, good])).splitlines()
  assert lines[-2].startswith("rows above max(1e-05, 4x fp32_floor): 1 of 2 ")
  assert lines[-1] == "max_rel_err=1.000e-03"
  assert parity.errors(np.ones(3), np.zeros(3)) == (1.0, float("inf"))
  assert parity.errors(np.zeros(3), np.zeros(3)) == (0.0, 0.0)


def test_a_tie_is_within_rounding_of_the_tensors_scale_not_of_one():
  """TIE_TOL is relative to the tensor's RMS: 5e-6 against values of 1e-3 is a sign error worth
  reporting, 5e-9 a tie."""
  x64 = np.full(100, 1e-3)
  x64[0], x64[1] = 5e-6, 5e-9
  ours = -x64
  ties = parity._sign_ties({("D", "main.1", 0): ours},  # pylint: disable=protected-access
                           {("D", "main.1"): [torch.from_numpy(x64)]})
  assert list(ties[("D", "main.1", 0)][0]) == [1]


def test_one_forced_branch_spoils_upstream_gradients(tiny_config, monkeypatch):
  """The other way round, where no tie is: the float64 run forced onto the branch our float32
  did not take at one element of D's main.4 input (the smallest |x| of the real pass) moves the
  gradients upstream of it, D's first convolutions and that BatchNorm, beyond the bound: one
  element is enough, which is why a tie must be aligned and not bounded."""
  import numpy as np
  forced = []

  def flip_smallest(ours, record64, forced_already=None):
    if forced or forced_already:
      return {}
    x64 = record64[("D", "main.4")][0].numpy().reshape(-1)
    i = np.argmin(np.abs(x64))
    forced.append(i)
    return {("D", "main.4", 0): (np.array([i]), np.array([not x64[i] > 0]))}

  monkeypatch.setattr(parity, "_sign_ties", flip_smallest)
  rows = parity.run_parity(tiny_config(), steps=1, seed=0, images_kind="noise")
  assert forced
  beyond = {f"{r.group} {r.name}" for r in rows
            if r.aligned is not None and r.aligned > max(REL_TOL, parity.FLOOR_FACTOR * r.floor)}
  assert {"adam_mu D main.0.weight", "adam_mu D main.2.weight", "adam_mu D main.3.bias"} <= beyond
  assert all(parity.within_floor(r, REL_TOL) for r in rows)  # no tie against PyTorch's own


def test_branch_sites_record_without_changing_the_iteration(tiny_config):
  """`branch_sites` without `force` records every activation's inputs and leaves PyTorch's
  iteration bit for bit as it is (parity records the float32 run it compares with)."""
  import copy
  config = tiny_config()
  net_g, net_d = torch_reference.build_reference(config.model, seed=0)
  images, latents = parity.parity_data(config, 1, 0, "noise")
  real = torch.from_numpy(images[0].transpose(0, 3, 1, 2).copy())
  z = torch.from_numpy(latents[0])[:, :, None, None]
  runs = []
  for record in (False, True):
    g, d = copy.deepcopy(net_g), copy.deepcopy(net_d)
    opt_g, opt_d = torch_reference.make_optimizers(g, d, config.train)
    sites = None
    if record:
      with torch_reference.branch_sites({"G": g, "D": d}) as sites:
        metrics = torch_reference.train_iteration(g, d, opt_g, opt_d, real, z)
    else:
      metrics = torch_reference.train_iteration(g, d, opt_g, opt_d, real, z)
    state = {**{f"G {k}": v for k, v in g.state_dict().items()},
             **{f"D {k}": v for k, v in d.state_dict().items()}}
    runs.append((metrics, state, sites))
  (m0, s0, _), (m1, s1, sites) = runs
  assert m0 == m1 and all(torch.equal(s0[k], s1[k]) for k in s0)
  assert not any("forward" in vars(m) for m in list(g.modules()) + list(d.modules()))  # restored
  assert {(tag, path): len(calls) for (tag, path), calls in sites.items()} == {
      ("G", "main.0.right.1"): 1, ("G", "main.0.right.4"): 1, ("G", "main.1.right.1"): 1,
      ("G", "main.1.right.4"): 1, ("G", "main.2.right.1"): 1, ("G", "main.2.right.4"): 1,
      ("D", "main.1"): 3, ("D", "main.4"): 3, ("D", "main.7"): 3}


def test_the_step_returns_each_pass_layer_outputs(tiny_config):
  """`train_step_with_noise(capture=True)`, whose signs parity's tie search reads: the same
  step, plus every layer's output in each pass, by `CAPTURED_PASSES` name (checked against
  standalone forwards of each pass's inputs and parameters)."""
  import functools
  import numpy as np
  config = tiny_config("model.block=leaky_bn")
  state = train.init_state(config, jax.random.PRNGKey(0))
  images, latents = parity.parity_data(config, 1, 0, "noise")
  step = lambda **kw: jax.jit(functools.partial(train.train_step_with_noise, config=config, **kw))
  new_state, metrics, captured = step(capture=True)(state, images[0], latents[0])
  _, plain_metrics = step()(state, images[0], latents[0])
  for name, value in plain_metrics.items():
    np.testing.assert_allclose(metrics[name], value, rtol=1e-6)
  assert set(captured) == set(train.CAPTURED_PASSES)
  gen, disc = models.build_models(config.model)
  g_vars = {"params": state.g.params, "batch_stats": state.g.batch_stats}
  d_vars = {"params": state.d.params, "batch_stats": state.d.batch_stats}
  fake, _ = gen.apply(g_vars, latents[0], train=True, mutable=["batch_stats"])
  passes = {"G": (gen, g_vars, latents[0]), "D(real)": (disc, d_vars, images[0]),
            "D(fake)": (disc, d_vars, fake),
            "D(fake) after D's step": (disc, dict(d_vars, params=new_state.d.params), fake)}
  for name, (module, variables, x) in passes.items():
    ours = parity._layer_outputs(jax.device_get(captured[name]))  # pylint: disable=protected-access
    alone = parity._flax_layer_outputs(module, variables, x)  # pylint: disable=protected-access
    assert ours.keys() == alone.keys() and len(ours) > 5, name
    for path, value in alone.items():
      # rounding apart (a small-variance BatchNorm channel magnifies it), not another pass
      np.testing.assert_allclose(ours[path], value, rtol=1e-3, atol=1e-4, err_msg=f"{name} {path}")


def test_ties_the_last_aligned_run_reveals_are_said_not_listed(tiny_config, monkeypatch):
  """Each forced run may reveal further ties; those of the last allowed run were never forced,
  so they are not listed as ties (the listed ones and the aligned column are that run's)."""
  import numpy as np
  found = []

  def one_more_each_time(ours, record64, forced=None):  # a new element at every look
    x64 = record64[("D", "main.4")][0].numpy().reshape(-1)
    i = np.argsort(np.abs(x64))[len(found)]
    found.append(i)
    return {("D", "main.4", 0): (np.array([i]), np.array([not x64[i] > 0]))}

  monkeypatch.setattr(parity, "_sign_ties", one_more_each_time)
  monkeypatch.setattr(parity, "ALIGN_ROUNDS", 2)
  logs = []
  rows = parity.run_parity(tiny_config(), steps=1, seed=0, images_kind="noise", log=logs.append)
  assert len(found) == 3  # the search's, then one after each of the two aligned runs
  shape = (8, 16, 8, 8)  # D main.4's input at tiny sizes, NCHW
  assert [t.index for t in rows.ties] == [
      tuple(int(v) for v in np.unravel_index(i, shape)) for i in found[:2]]
  assert "1 more ties appeared in the last of 2 aligned float64 runs and are not forced" in (
      "\n".join(logs))
