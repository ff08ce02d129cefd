"""Checkpoint conversion: exact round trips, DataParallel prefix, clear errors."""

import os

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch

from cspgan_jax import config_lib, layers, models, torch_port, torch_reference, train
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
