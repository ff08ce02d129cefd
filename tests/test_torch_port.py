"""Checkpoint conversion: exact round trips, DataParallel prefix, clear errors."""

import json
import os
import warnings

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch

from cspgan_jax import (checkpoint, cli, config_lib, layers, models, torch_port,
                        torch_reference, train)
from cspgan_jax.errors import CheckpointError


@pytest.mark.parametrize("block,kind,n_g,n_d", [("relu", "dcgan", 41, 26),
                                                ("leaky_bn", "avgpool", 91, 25)])
def test_report_key_layout(config_path, block, kind, n_g, n_d):
  config = config_lib.load_config(config_path("baseline"), [f"model.block={block}",
                                                            f"model.discriminator={kind}"])
  with torch.device("meta"):  # the keys and shapes only
    nets = torch_reference.build_reference(config.model)
  for net, template, n in zip(nets, train.variable_shapes(config), (n_g, n_d)):
    sd = net.state_dict()
    assert len(sd) == n  # the report's key counts (SPEC.md)
    assert [(e.torch_key, e.torch_shape) for e in torch_port.conversion_table(template)] == [
        (k, tuple(v.shape)) for k, v in sd.items()]


@pytest.mark.parametrize("block", models.BLOCKS)
@pytest.mark.parametrize("kind", models.DISCRIMINATORS)
def test_bit_identical_round_trip(tiny_config, block, kind):
  config = tiny_config(f"model.block={block}", f"model.discriminator={kind}")
  nets = torch_reference.build_reference(config.model, seed=1)
  for net, template, role in zip(nets, train.variable_shapes(config), ("netG", "netD")):
    sd = torch_port.module_state_dict(net)
    assert [e.torch_key for e in torch_port.conversion_table(template)] == list(sd)
    variables = torch_port.torch_to_flax(sd, template)
    # Each leaf in the template's dtype and shape (num_batches_tracked stays an integer: as
    # float32 a count past 2**24 would round, and flax_to_torch's cast back would hide it)
    kinds = jax.tree_util.tree_map(lambda a, t: (np.asarray(a).dtype, np.shape(a)) == (
        np.dtype(t.dtype), tuple(t.shape)), variables, template)
    assert all(jax.tree_util.tree_leaves(kinds)), kinds
    back = torch_port.flax_to_torch(variables, config.model, role)
    assert list(back) == list(sd)
    for k in sd:
      assert back[k].dtype == sd[k].dtype and back[k].shape == sd[k].shape, k
      assert back[k].tobytes() == sd[k].tobytes(), k
    net.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


def _flax_variables(**names):
  """Variables of a conv then a BatchNorm, under the names given (None: flax's own)."""
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      with_name = lambda key: {} if names[key] is None else {"name": names[key]}
      x = layers.Conv2d(4, 1, **with_name("conv"))(x)
      return layers.BatchNorm(**with_name("bn"))(x, use_running_average=True)
  return Net().init(jax.random.PRNGKey(0), np.zeros((2, 4, 4, 3), np.float32))


@pytest.mark.parametrize("bn,why", [
    (None, "'BatchNorm_0' is flax's automatic name (a submodule created without name=)"),
    ("right_bn", "module name 'right_bn' is not <attribute>_<index>")])
def test_module_names_that_do_not_convert(bn, why):
  """A forgotten `name=` would otherwise convert to `BatchNorm.0.weight`, a key no PyTorch
  model has; an unmirrored name would end in a traceback."""
  variables = _flax_variables(conv="main_0", bn=bn)
  with pytest.raises(CheckpointError) as e:
    torch_port.flax_to_torch(variables)
  assert str(e.value) == (f"params/{bn or 'BatchNorm_0'}/scale: {why}; name it after the PyTorch "
                          "module path it mirrors, dots as underscores (right.3 -> 'right_3')")
  assert torch_port.flax_to_torch(_flax_variables(conv="main_0", bn="main_1"))


def test_flax_to_torch_checks_against_the_reference(tiny_config):
  """Converted for a model the reference does not build: refused before anything is written."""
  relu, leaky_bn = tiny_config(), tiny_config("model.block=leaky_bn")
  g_vars = jax.tree_util.tree_map(lambda v: np.zeros(v.shape, v.dtype),
                                  train.variable_shapes(relu)[0])
  assert len(torch_port.flax_to_torch(g_vars, relu.model, "netG")) == 25
  with pytest.raises(CheckpointError) as e:
    torch_port.flax_to_torch(g_vars, leaky_bn.model, "netG")
  msg = str(e.value)
  assert "\n" not in msg
  assert msg.startswith("netG converted from Flax (checked against torch_reference) does not fit "
                        "the configured model: missing 36: main.0.right.1.bias")


def test_data_parallel_prefix_and_wrapped_dicts(tmp_path, tiny_config):
  config = tiny_config()
  net_g, net_d = torch_reference.build_reference(config.model, seed=2)
  g_t, _ = train.init_variables(config, jax.random.PRNGKey(0))
  path = tmp_path / "ckpt.pt"
  torch.save({"netG": torch.nn.DataParallel(net_g).state_dict(), "netD": net_d.state_dict()},
             path)
  sd = torch_port.load_torch_state_dict(str(path), "netG")
  assert all(k.startswith("module.") for k in sd)
  flax_vars = torch_port.torch_to_flax(sd, g_t)
  expected = torch_port.torch_to_flax(torch_port.module_state_dict(net_g), g_t)
  jax.tree_util.tree_map(np.testing.assert_array_equal, flax_vars, expected)
  # torch.compile's `_orig_mod.` (inside or outside DataParallel's `module.`), and a state_dict
  # saved in bf16: its values are float32's exactly.
  compiled = {f"_orig_mod.module.{k}": v.to(torch.bfloat16)
              for k, v in net_g.state_dict().items()}
  torch.save(compiled, path)
  flax_vars = torch_port.torch_to_flax(torch_port.load_torch_state_dict(str(path), "netG"), g_t)
  rounded = {k: v.to(torch.bfloat16).float() for k, v in net_g.state_dict().items()}
  expected = torch_port.torch_to_flax({k: v.numpy() for k, v in rounded.items()}, g_t)
  jax.tree_util.tree_map(np.testing.assert_array_equal, flax_vars, expected)


def test_wrong_architecture_names_the_keys(tiny_config):
  relu = tiny_config()
  bn = tiny_config("model.block=leaky_bn")
  net_g, _ = torch_reference.build_reference(bn.model, seed=0)
  g_t, _ = train.init_variables(relu, jax.random.PRNGKey(0))
  with pytest.raises(CheckpointError) as e:
    torch_port.torch_to_flax(torch_port.module_state_dict(net_g), g_t, "netG")
  msg = str(e.value)
  assert "\n" not in msg
  assert "missing 6: main.0.right.2.weight" in msg
  assert "unexpected 36: main.0.right.1.bias" in msg
  assert "mis-shaped 6: main.0.right.3.weight (32, 32, 4, 4) != (32, 32, 1, 1)" in msg


class _RunsCodeWhenUnpickled:
  """A pickled object whose unpickling creates the folder it names (a stand-in for any code)."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return (os.makedirs, (self.path,))


def test_a_file_holding_code_is_refused_without_running_it(tmp_path):
  """torch.load(weights_only=True): a .pt file is a pickle, and a state_dict needs no code."""
  ran = tmp_path / "code_ran"
  evil = tmp_path / "G.pt"
  torch.save({"netG": _RunsCodeWhenUnpickled(str(ran))}, evil)
  with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
    torch_port.load_torch_state_dict(str(evil), "netG")
  assert not ran.exists()


def test_truncated_and_foreign_files(tmp_path, tiny_config):
  net_g, _ = torch_reference.build_reference(tiny_config().model, seed=0)
  good = tmp_path / "G.pt"
  torch.save(net_g.state_dict(), good)
  truncated = tmp_path / "trunc.pt"
  truncated.write_bytes(good.read_bytes()[:300])
  with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
    torch_port.load_torch_state_dict(str(truncated), "netG")
  with pytest.raises(CheckpointError, match="not found"):
    torch_port.load_torch_state_dict(str(tmp_path / "missing.pt"), "netG")
  other = tmp_path / "list.pt"
  torch.save([1, 2], other)
  with pytest.raises(CheckpointError, match="expected a netG state_dict"):
    torch_port.load_torch_state_dict(str(other), "netG")
  numbered = tmp_path / "numbered.pt"
  torch.save({**net_g.state_dict(), 3: torch.zeros(1)}, numbered)
  with pytest.raises(CheckpointError, match="expected a netG state_dict"):
    torch_port.load_torch_state_dict(str(numbered), "netG")
  text = tmp_path / "notes.pt"
  text.write_text("not a checkpoint")
  with pytest.raises(CheckpointError, match=r"not a readable PyTorch checkpoint \(\w+Error: "):
    torch_port.load_torch_state_dict(str(text), "netG")
  sd = torch_port.module_state_dict(net_g)
  sd.pop("main.3.weight")
  g_t, _ = train.init_variables(tiny_config(), jax.random.PRNGKey(0))
  with pytest.raises(CheckpointError, match=r"missing 1: main\.3\.weight"):
    torch_port.torch_to_flax(sd, g_t)


def _with_one_value(tensor, value):
  """A copy of `tensor` (in float64 where `value` needs it) whose first element is `value`."""
  out = tensor.double() if abs(value) > 1e38 else tensor.clone()
  out.view(-1)[0] = value
  return out


# (role, key, what the tensor becomes, why it is refused). netG's main.3.weight is (8, 3, 4, 4)
_UNUSABLE = [
    ("netD", "main.3.num_batches_tracked", lambda t: torch.tensor(float("nan")),
     "is float32, not an integer count"),
    ("netD", "main.3.num_batches_tracked", lambda t: torch.tensor(3, dtype=torch.bfloat16),
     "is bfloat16, not an integer count"),
    ("netD", "main.3.num_batches_tracked", lambda t: torch.tensor(1 + 2j),
     "is complex64, not an integer count"),
    ("netG", "main.3.weight", lambda t: t.to(torch.complex64),
     "is complex64, not a real floating-point tensor"),
    ("netG", "main.3.weight", lambda t: t.to(torch.int32),
     "is int32, not a real floating-point tensor"),
    ("netG", "main.3.weight", lambda t: t.to_sparse(),
     "is a torch.sparse_coo tensor, not a dense one (save it with .to_dense())"),
    ("netG", "main.3.weight", lambda t: torch.empty(t.shape, device="meta"),
     "is on the meta device: it has a shape but no values"),
    ("netG", "main.3.weight", lambda t: _with_one_value(t, float("nan")),
     "holds NaN or inf values (1 of 384)"),
    ("netD", "main.3.running_var", lambda t: _with_one_value(t, float("inf")),
     "holds NaN or inf values (1 of 16)"),
    ("netG", "main.3.weight", lambda t: _with_one_value(t, 1e300),
     "holds values beyond float32's range (largest magnitude 1e+300)"),
]


@pytest.mark.parametrize("role,key,change,why", _UNUSABLE, ids=[
    "nan-count", "bf16-count", "complex-count", "complex-weight", "int-weight", "sparse-weight",
    "meta-weight", "nan-weight", "inf-running-var", "float64-weight-beyond-float32"])
def test_unusable_tensors_are_one_line_naming_file_and_tensor(tmp_path, tiny_config, role, key,
                                                              change, why):
  """Each once ended in a traceback (NaN count: ValueError; sparse: TypeError; meta:
  NotImplementedError), was read as another value (a complex weight's real part, with a
  ComplexWarning; an int weight as float), or converted silently (NaN, inf, float64 beyond
  float32's range), for PyTorch's BCELoss to fail on many lines later in `parity`. No warning
  comes with the error: torch 2.14 printed one about scanning the sparse tensor."""
  nets = dict(zip(("netG", "netD"), torch_reference.build_reference(tiny_config().model)))
  sd = nets[role].state_dict()
  path = tmp_path / f"{role}.pt"
  torch.save({**sd, key: change(sd[key])}, path)
  with pytest.raises(CheckpointError) as e, warnings.catch_warnings():
    warnings.simplefilter("error")  # a warning ends the load as an unreadable file
    torch_port.load_torch_state_dict(str(path), role)
  assert str(e.value) == f"{path}: {role}'s {key} {why}"


@pytest.mark.parametrize("command", ["convert torch2flax", "parity"])
def test_both_commands_refuse_a_nan_weight_in_one_line(tmp_path, tiny_config, config_path,
                                                       capsys, command):
  """`parity` once ran a whole step on the NaN and died in a 43-line traceback from BCELoss;
  `convert torch2flax` wrote the NaN into a checkpoint."""
  net_g, net_d = torch_reference.build_reference(tiny_config().model)
  sd = net_g.state_dict()
  torch.save({**sd, "main.3.weight": _with_one_value(sd["main.3.weight"], float("nan"))},
             tmp_path / "G.pt")
  torch.save(net_d.state_dict(), tmp_path / "D.pt")
  files = ["--netG", str(tmp_path / "G.pt"), "--netD", str(tmp_path / "D.pt")]
  workdir = tmp_path / "wd"
  rest = (["--workdir", str(workdir)] if command.startswith("convert")
          else ["--steps", "1", "--no-floor", "--no-ties"])
  assert cli.main(command.split() + files + ["--config", config_path("tiny")] + rest) == 2
  assert capsys.readouterr().err.splitlines() == [
      f"cspgan: error: {tmp_path / 'G.pt'}: netG's main.3.weight holds NaN or inf values "
      "(1 of 384)"]
  assert not workdir.exists()


@pytest.mark.parametrize("command", ["convert torch2flax", "parity"])
def test_both_commands_say_once_per_file_that_float64_weights_were_rounded(
    tmp_path, tiny_config, config_path, capsys, monkeypatch, command):
  """Finite float64 weights were rounded to float32 without a word."""
  net_g, net_d = torch_reference.build_reference(tiny_config().model)
  sd_g, sd_d = net_g.state_dict(), net_d.state_dict()
  inexact = sd_g["main.0.right.0.bias"].double()
  inexact[0] = 0.1  # not a float32 value: the rounding changes it
  torch.save({**sd_g, "main.0.right.0.bias": inexact,  # 32 values
              "main.0.right.3.weight": sd_g["main.0.right.3.weight"].double()},  # 1024, exact
             tmp_path / "G.pt")
  torch.save({**sd_d, "main.3.running_var": sd_d["main.3.running_var"].double()},
             tmp_path / "D.pt")
  files = ["--netG", str(tmp_path / "G.pt"), "--netD", str(tmp_path / "D.pt")]
  if command == "parity":  # stopped once both are read: the comparison itself compiles
    from cspgan_jax import parity  # pylint: disable=import-outside-toplevel
    monkeypatch.setattr(parity, "parity_data", lambda *a: _raise(CheckpointError("stop")))
    rest, prefix, status = ["--steps", "0"], "[parity] note: ", 2
  else:
    rest, prefix, status = ["--workdir", str(tmp_path / "wd")], "cspgan: note: ", 0
  assert cli.main(command.split() + files + ["--config", config_path("tiny")] + rest) == status
  notes = [
      f"netG ({tmp_path / 'G.pt'}): 2 float64 tensors (first: main.0.right.0.bias) rounded to "
      "float32; 1 of 1056 values changed",
      f"netD ({tmp_path / 'D.pt'}): 1 float64 tensor (first: main.3.running_var) rounded to "
      "float32; no value changed"]
  assert capsys.readouterr().err.splitlines() == [prefix + n for n in notes] + (
      ["cspgan: error: stop"] if command == "parity" else [])


def _raise(error):
  raise error


def test_parity_names_the_file_of_a_count_past_int32(tmp_path, tiny_config, config_path,
                                                     capsys):
  """As `convert torch2flax` does (parity once said only "netD")."""
  _, net_d = torch_reference.build_reference(tiny_config().model)
  torch.save({**net_d.state_dict(), "main.3.num_batches_tracked": torch.tensor(2 ** 40)},
             tmp_path / "D.pt")
  assert cli.main(["parity", "--config", config_path("tiny"), "--steps", "1", "--no-floor",
                   "--netD", str(tmp_path / "D.pt")]) == 2
  assert capsys.readouterr().err.splitlines() == [
      f"cspgan: error: netD ({tmp_path / 'D.pt'}): main.3.num_batches_tracked=1099511627776 "
      "does not fit int32"]


def test_torch_to_flax_refuses_what_the_model_cannot_hold(tiny_config):
  """Arrays given to the conversion directly (not from a file) are judged the same way."""
  net_g, net_d = torch_reference.build_reference(tiny_config().model)
  g_t, d_t = train.variable_shapes(tiny_config())
  sd = torch_port.module_state_dict(net_g)
  sd["main.3.weight"].flat[5] = -np.inf
  with pytest.raises(CheckpointError, match=r"^netG: main\.3\.weight holds NaN or inf values "
                                            r"\(1 of 384\)$"):
    torch_port.torch_to_flax(sd, g_t, "netG")
  sd = dict(torch_port.module_state_dict(net_d), **{"main.6.num_batches_tracked": np.nan})
  with pytest.raises(CheckpointError, match=r"^netD: main\.6\.num_batches_tracked is float64, "
                                            "not an integer count$"):
    torch_port.torch_to_flax(sd, d_t, "netD")


def test_a_tensor_saved_as_a_negated_view_converts(tmp_path, tiny_config):
  """torch.save keeps a view's negative bit, which numpy() refuses (a RuntimeError once)."""
  net_g, _ = torch_reference.build_reference(tiny_config().model)
  sd = net_g.state_dict()
  negated = torch._neg_view(-sd["main.3.weight"])  # pylint: disable=protected-access
  assert negated.is_neg()
  torch.save({**sd, "main.3.weight": negated}, tmp_path / "G.pt")
  loaded = torch_port.load_torch_state_dict(str(tmp_path / "G.pt"), "netG")
  np.testing.assert_array_equal(loaded["main.3.weight"], sd["main.3.weight"].numpy())


def test_a_checkpoint_whose_arrays_do_not_fit_its_config_is_one_line(tmp_path, tiny_config,
                                                                     capsys):
  """orbax restores arrays at their stored shapes whatever the template: a stored config edited
  (or a state/ folder copied in from a run of another width) once ended in flax's
  ScopeParamShapeError, 37 lines from `sample` and 59 from a resumed `train`."""
  config = tiny_config()
  workdir = tmp_path / "run"
  checkpoint.save(str(workdir), train.init_state(config, jax.random.PRNGKey(0)), config)
  metadata = workdir / "checkpoints" / "0" / "config" / "metadata"
  stored = json.loads(metadata.read_text())
  stored["model"]["ngf"] = 16
  metadata.write_text(json.dumps(stored))
  message = (f"{workdir / 'checkpoints' / '0'}: the checkpoint's arrays do not fit its stored "
             "config: g/params/main_0/left_0/kernel is (4, 4, 32, 8) there, the config's model "
             "needs (4, 4, 64, 8) (and 74 more)")
  for given in (None, tiny_config("model.ngf=16")):  # `sample`'s restore, a resumed `train`'s
    with pytest.raises(CheckpointError) as e:
      checkpoint.restore(str(workdir), given)
    assert str(e.value) == message
  out = tmp_path / "out"
  for argv in (["sample", "--workdir", str(workdir), "--out", str(out / "x.png")],
               ["convert", "flax2torch", "--workdir", str(workdir), "--out-dir", str(out)]):
    assert cli.main(argv) == 2
    assert capsys.readouterr().err.splitlines() == [f"cspgan: error: {message}"]
  assert not out.exists()
