"""Orbax checkpoints and the `cspgan` command line (convert, sample, parity, errors)."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from cspgan_jax import checkpoint, cli, images, models, torch_reference, train
from cspgan_jax.errors import CheckpointError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _leaves_equal(a, b):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  return len(la) == len(lb) and all(
      np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(x, y) for x, y in zip(la, lb))


@pytest.mark.parametrize("block", models.BLOCKS)
def test_state_round_trips_through_orbax(tmp_path, tiny_config, block):
  config = tiny_config(f"model.block={block}")
  state = train.init_state(config, jax.random.PRNGKey(0))
  step = train.jit_train_step(config)
  real = np.tanh(np.random.RandomState(0).randn(8, 32, 32, 3)).astype(np.float32)
  state, _ = step(state, real, jax.random.PRNGKey(1))
  checkpoint.save(str(tmp_path), state, config)
  restored, stored_config = checkpoint.restore(str(tmp_path))
  assert int(restored.step) == 1 and stored_config.model.block == block
  # The stored config is the run's, every field (info, sample and convert rebuild from it),
  # not the values `_LATER_FIELDS` gives a config written before a field existed.
  assert stored_config.to_dict() == config.to_dict()
  assert _leaves_equal(state, restored)
  # The restored state trains on exactly as the original does.
  a, _ = step(state, real, jax.random.PRNGKey(2))
  b, _ = step(restored, real, jax.random.PRNGKey(2))
  assert _leaves_equal(a, b)


def test_restore_refuses_other_architecture_and_empty_dirs(tmp_path, tiny_config):
  config = tiny_config("train.sync_bn=True", "data.split=all")  # not the fields' old defaults
  checkpoint.save(str(tmp_path), train.init_state(config, jax.random.PRNGKey(0)), config)
  assert checkpoint.read_config(str(tmp_path)).to_dict() == config.to_dict()
  # Each field that shapes the networks. Orbax would read some of these into the other
  # shapes without a word (nz=32: G's first kernel came back (4, 4, 32, 8)).
  other = {"block": "leaky_bn", "discriminator": "avgpool", "nz": 32, "ngf": 16, "ndf": 16,
           "resolution": 64}
  # model.nc is 3 in every valid config (the data are RGB), so it cannot differ here
  fields = set(checkpoint._ARCHITECTURE_FIELDS)  # pylint: disable=protected-access
  assert sorted(other) == sorted(fields - {"nc"})
  for field, value in other.items():
    with pytest.raises(CheckpointError, match=f"different architecture: model.{field}: "
                                              f"checkpoint {config.model[field]!r}, config "
                                              f"{value!r}$"):
      checkpoint.restore(str(tmp_path), tiny_config(f"model.{field}={value}"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(CheckpointError, match="no checkpoint"):
    checkpoint.restore(str(tmp_path / "empty"))
  with pytest.raises(CheckpointError, match="workdir not found"):
    checkpoint.restore(str(tmp_path / "missing"))


def test_a_checkpoint_older_than_some_fields_reads_as_it_ran(tmp_path, tiny_config):
  config = tiny_config()
  old = config.copy_and_resolve_references()
  for group, name in [("model", "edge_layers_as_matmul"), ("train", "sync_bn"),
                      ("train", "xla_options"), ("data", "split")]:
    delattr(old[group], name)
  del old["dist"]
  checkpoint.save(str(tmp_path), train.init_state(config, jax.random.PRNGKey(0)), old)
  stored = checkpoint.read_config(str(tmp_path))
  assert (stored.data.split, stored.train.sync_bn, stored.dist.process_id,
          stored.dist.initialization_timeout) == ("train", False, -1, 300)
  state, _ = checkpoint.restore(str(tmp_path), config)
  assert int(state.step) == 0


def test_later_fields_name_config_fields_with_values_of_their_type():
  """A misspelt `_LATER_FIELDS` entry would fill a field nothing reads, and the stored config
  would still lack the real one."""
  from cspgan_jax import config_lib  # pylint: disable=import-outside-toplevel
  for group, fields in checkpoint._LATER_FIELDS.items():  # pylint: disable=protected-access
    for name, before in fields.items():
      kind = config_lib.FIELD_TYPES[group].get(name)
      assert kind is not None, f"{group}.{name}"
      has_type = config_lib._has_type  # pylint: disable=protected-access
      assert has_type(before, kind), f"{group}.{name}"


# The fields every readable checkpoint's config holds: those of the config when
# `_LATER_FIELDS` began. Any field since has its entry there (README, "A config field").
_FIELDS_OF_EVERY_CHECKPOINT = {
    "model": "block discriminator nz ngf ndf nc resolution bn_momentum bn_epsilon",
    "train": "batch_size epochs num_steps lr_g lr_d beta1 beta2 adam_eps optimizer seed loss "
             "dtype matmul_precision steps_per_dispatch scan_unroll num_samples log_every "
             "sample_every checkpoint_every keep_checkpoints stop_check_every",
    "data": "source name data_dir num_examples synthetic_seed shuffle_seed pipeline "
            "device_budget_gb prefetch reader_threads",
}


def test_a_new_field_has_its_value_for_older_checkpoints():
  """A field added to FIELD_TYPES without a `_LATER_FIELDS` entry made every checkpoint written
  before it unreadable ("holds an unusable config: config lacks the field ..."); no test said."""
  from cspgan_jax import config_lib  # pylint: disable=import-outside-toplevel
  later = checkpoint._LATER_FIELDS  # pylint: disable=protected-access
  missing = [f"{group}.{name}" for group, fields in config_lib.FIELD_TYPES.items()
             for name in fields if name not in later.get(group, {})
             and name not in _FIELDS_OF_EVERY_CHECKPOINT.get(group, "").split()]
  assert not missing, (f"{missing}: give checkpoint._LATER_FIELDS the value that reproduces "
                       "what the code did before each field")


def test_a_reader_that_leaves_early_is_no_error(tmp_path, tiny_config):
  """`cspgan info DIR | head -1`: it said "cspgan: error: Broken pipe (in DIR)", exit 2."""
  config = tiny_config()
  checkpoint.save(str(tmp_path), train.init_state(config, jax.random.PRNGKey(0)), config)
  proc = subprocess.Popen([sys.executable, "-m", "cspgan_jax.cli", "info", str(tmp_path)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"))
  proc.stdout.close()  # before the command writes its first line
  err = proc.communicate(timeout=120)[1]
  assert (proc.returncode, err) == (141, "")


def test_an_empty_step_folder_is_one_line_naming_the_others(tmp_path, tiny_config):
  """As an interrupted copy leaves it: six orbax warnings, then a line that named no remedy."""
  config = tiny_config()
  checkpoint.save(str(tmp_path), train.init_state(config, jax.random.PRNGKey(0)), config)
  (tmp_path / "checkpoints" / "400").mkdir()
  proc = subprocess.run([sys.executable, "-m", "cspgan_jax.cli", "info", str(tmp_path)],
                        capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"))
  assert (proc.returncode, proc.stderr.splitlines()) == (2, [
      f"cspgan: error: checkpoint step 400 in {tmp_path / 'checkpoints'} has no readable config "
      "(KeyError): it is incomplete or damaged; move its folder away to use the others (steps: "
      "0)"])


def test_a_damaged_checkpoint_is_one_line(tmp_path, tiny_config):
  """Truncated array files (a copy cut short): `cspgan sample` says which checkpoint, in one
  line, exit 2, with nothing after it from the reads orbax abandoned."""
  config = tiny_config()
  checkpoint.save(str(tmp_path), train.init_state(config, jax.random.PRNGKey(0)), config)
  data = [os.path.join(d, f) for d, _, files in os.walk(tmp_path / "checkpoints")
          for f in files if os.sep + "d" + os.sep in os.path.join(d, f) + os.sep]
  assert data
  for path in data:
    os.truncate(path, 10)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, "-m", "cspgan_jax.cli", "sample", "--workdir",
                         str(tmp_path), "--out", str(tmp_path / "g.png")],
                        env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("cspgan: error: cannot restore checkpoint step 0"), \
      proc.stderr[-3000:]
  assert not (tmp_path / "g.png").exists()


TENSORSTORE_ENOSPC = (  # how tensorstore reports a full disk through orbax (seen on a tmpfs)
    'RESOURCE_EXHAUSTED: Error writing "d.params.main_5.kernel/0.0.0.0" in OCDBT database at '
    'local file "/run/checkpoints/8.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/ocdbt.'
    'process_0/": Failed writing: "/run/checkpoints/8.orbax-checkpoint-tmp/d/a66f": Failed to '
    "write 13054 bytes to file 14: No space left on device [os_error_code='28']")


def test_a_checkpoint_the_disk_refuses_is_one_line_and_the_earlier_ones_stay(
    tmp_path, config_path, capsys, monkeypatch):
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  save = ocp.CheckpointManager.save

  def full_disk_at_step_8(self, step, *args, **kwargs):
    if step == 8:
      raise ValueError(TENSORSTORE_ENOSPC)
    return save(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk_at_step_8)
  workdir = tmp_path / "run"
  assert cli.main(["train", "--config", config_path("tiny"), "--workdir", str(workdir),
                   "--no-progress"]) == 2
  err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("cspgan:")]
  assert err == [f"cspgan: error: cannot write a checkpoint in {workdir / 'checkpoints'}: "
                 "No space left on device (errno 28)"]
  assert checkpoint.all_steps(str(workdir)) == [4]
  assert int(checkpoint.restore(str(workdir))[0].step) == 4


def test_what_a_failed_write_is_called():
  reason = checkpoint._reason  # pylint: disable=protected-access
  assert reason(ValueError(TENSORSTORE_ENOSPC)) == "No space left on device (errno 28)"
  assert reason(OSError(30, "Read-only file system", "/ro/ckpt")) == (
      "Read-only file system: /ro/ckpt")
  assert reason(ValueError("first line\nsecond")) == "first line"


def test_the_cli_drops_orbax_tracebacks_and_keeps_the_rest(tmp_path):
  """orbax logs each failed save with its traceback (through absl's `exception`, so the
  record's path is absl's); the traceback's frames say it is orbax's."""
  import logging  # pylint: disable=import-outside-toplevel

  def record_raised_in(filename):
    code = compile("raise ValueError('RESOURCE_EXHAUSTED')", filename, "exec")
    try:
      exec(code)  # pylint: disable=exec-used
    except ValueError:
      return logging.LogRecord("absl", logging.ERROR, "/absl/logging/__init__.py", 1,
                               "failed", None, sys.exc_info())
    raise AssertionError("not raised")

  reports = cli._OrbaxFailureReports()  # pylint: disable=protected-access
  site = os.path.join(str(tmp_path), "site-packages")
  assert not reports.filter(record_raised_in(os.path.join(site, "orbax", "checkpoint", "f.py")))
  assert reports.filter(record_raised_in(os.path.join(site, "cspgan_jax", "trainer.py")))
  assert reports.filter(logging.LogRecord("absl", logging.WARNING, "x.py", 1, "warn", None, None))


def test_make_grid_matches_torchvision_semantics():
  x = np.random.RandomState(0).uniform(-1, 1, (10, 4, 5, 3)).astype(np.float32)
  grid = images.make_grid(x)  # 8 per row, padding 2
  assert grid.shape == (2 * 6 + 2, 8 * 7 + 2, 3)
  assert grid.min() == 0.0 and grid.max() == 1.0
  lo, hi = x.min(), x.max()
  np.testing.assert_allclose(grid[2:6, 2:7], (x[0] - lo) / (hi - lo), rtol=1e-6)
  np.testing.assert_allclose(grid[8:12, 9:14], (x[9] - lo) / (hi - lo), rtol=1e-6)
  assert not grid[:2].any() and not grid[8:12, 16:].any()  # padding and the empty cells
  # Fewer images than a row: the row is as wide as they are (torchvision: min(nrow, n))
  assert images.make_grid(x[:4]).shape == (6 + 2, 4 * 7 + 2, 3)
  # save_image's rounding: x * 255 + 0.5, clamped, then truncated
  np.testing.assert_array_equal(images.to_uint8(np.array([0.5, 1 / 510, 0.999, 1.2, -0.1])),
                                [128, 1, 255, 255, 0])
  one = images.make_grid(x[:1])  # torchvision: the image itself, no border
  np.testing.assert_allclose(one, (x[0] - x[0].min()) / (x[0].max() - x[0].min()), rtol=1e-6)


def test_tile_spread_tells_a_collapsed_generator_from_varied_samples():
  from cspgan_jax import synthetic  # pylint: disable=import-outside-toplevel
  rs = np.random.RandomState(0)
  noise = rs.randn(64, 16, 16, 3)
  assert 0.95 < images.tile_spread(noise) <= 1.0  # 0.99: std over 64 draws, ddof 0
  faces = synthetic.cartoon_faces(64, 32, seed=0)
  assert 0.8 < images.tile_spread(faces) < 0.95  # 0.88, docs/PARITY.md
  one = np.repeat(faces[:1], 64, axis=0)
  assert images.tile_spread(one) == 0.0
  assert images.tile_spread(one + 1e-3 * noise[:, :1, :1, :1]) < 0.01  # nearly one image
  assert images.tile_spread(np.zeros((4, 2, 2, 3))) == 0.0  # no pixel varies at all


@pytest.fixture
def torch_files(tmp_path, tiny_config):
  config = tiny_config("model.block=leaky_bn")
  net_g, net_d = torch_reference.build_reference(config.model, seed=5)
  torch.save(torch.nn.DataParallel(net_g).state_dict(), tmp_path / "G.pt")
  torch.save({"netD": net_d.state_dict()}, tmp_path / "D.pt")
  return tmp_path, net_g, net_d


def test_cli_convert_both_ways_sample_and_errors(torch_files, config_path, capsys, monkeypatch):
  tmp, net_g, net_d = torch_files
  wd, out = str(tmp / "wd"), str(tmp / "out")
  tiny = config_path("tiny")
  args = ["convert", "torch2flax", "--netG", str(tmp / "G.pt"), "--netD", str(tmp / "D.pt"),
          "--config", tiny, "--config.model.block=leaky_bn", "--workdir", wd]
  assert cli.main(args) == 0
  assert cli.main(args) == 2  # refuses to write over an existing checkpoint
  assert "already holds a checkpoint" in capsys.readouterr().err
  assert cli.main(["convert", "flax2torch", "--workdir", wd, "--out-dir", out]) == 0
  for name, net in (("netG.pt", net_g), ("netD.pt", net_d)):
    back = torch.load(os.path.join(out, name), weights_only=True)
    ref = net.state_dict()
    assert list(back) == list(ref)
    assert all(torch.equal(back[k], ref[k]) and back[k].dtype == ref[k].dtype for k in ref)
  before = open(os.path.join(out, "netG.pt"), "rb").read()
  assert cli.main(["convert", "flax2torch", "--workdir", wd, "--out-dir", out]) == 2
  assert open(os.path.join(out, "netG.pt"), "rb").read() == before

  # Sampling from given latents equals the reference generator (training-mode BatchNorm).
  z = np.random.RandomState(3).randn(6, 16, 1, 1).astype(np.float32)
  np.save(tmp / "z.npy", z)
  assert cli.main(["sample", "--workdir", wd, "--latents", str(tmp / "z.npy"),
                   "--out", str(tmp / "s.npy")]) == 0
  got = np.load(tmp / "s.npy")
  ref = net_g.train()(torch.from_numpy(z)).detach().numpy().transpose(0, 2, 3, 1)
  assert got.dtype == np.float32 and got.shape == (6, 32, 32, 3)
  assert np.linalg.norm(got - ref) / np.linalg.norm(ref) <= 1e-5
  # With running averages each image is its latent's alone: G runs in chunks (here 4 + 2).
  monkeypatch.setattr(cli, "SAMPLE_CHUNK", 4)
  generate, traced = train.generate, []
  monkeypatch.setattr(train, "generate", lambda c, p, s, z, ra: traced.append(len(z)) or
                      generate(c, p, s, z, ra))
  assert cli.main(["sample", "--workdir", wd, "--latents", str(tmp / "z.npy"),
                   "--running-average", "--out", str(tmp / "s_ra.npy")]) == 0
  got_ra = np.load(tmp / "s_ra.npy")
  # (the train-mode call above moved net_g's running statistics: the saved ones, as converted)
  saved = torch.load(tmp / "G.pt", weights_only=True)
  net_g.load_state_dict({k[len("module."):]: v for k, v in saved.items()})
  ref_ra = net_g.eval()(torch.from_numpy(z)).detach().numpy().transpose(0, 2, 3, 1)
  assert got_ra.shape == (6, 32, 32, 3) and traced == [4, 2]
  assert np.linalg.norm(got_ra - ref_ra) / np.linalg.norm(ref_ra) <= 1e-5
  assert cli.main(["sample", "--workdir", wd, "--n", "9", "--seed", "1",
                   "--out", str(tmp / "grid.png")]) == 0
  # --seed draws the latents, train.sample_latents(PRNGKey(seed), n, nz)
  for seed in (1, 2):
    assert cli.main(["sample", "--workdir", wd, "--n", "4", "--seed", str(seed),
                     "--out", str(tmp / f"seed{seed}.npy")]) == 0
  z2 = np.array(train.sample_latents(jax.random.PRNGKey(2), 4, 16))  # a writable copy
  ref2 = net_g.train()(torch.from_numpy(z2)[:, :, None, None]).detach().numpy()
  got2 = np.load(tmp / "seed2.npy")
  assert np.linalg.norm(got2 - ref2.transpose(0, 2, 3, 1)) / np.linalg.norm(ref2) <= 1e-5
  assert not np.allclose(np.load(tmp / "seed1.npy"), got2)
  (tmp / "s.NPY.npy").write_text("the user's")  # what np.save("s.NPY") would have replaced
  assert cli.main(["sample", "--workdir", wd, "--latents", str(tmp / "z.npy"),
                   "--out", str(tmp / "s.NPY")]) == 0
  np.testing.assert_array_equal(np.load(tmp / "s.NPY"), got)
  assert (tmp / "s.NPY.npy").read_text() == "the user's"
  from PIL import Image
  assert Image.open(tmp / "grid.png").size == (8 * 34 + 2, 2 * 34 + 2)
  # Sampling never changes the checkpoint.
  state, _ = checkpoint.restore(wd)
  assert int(state.g.batch_stats["main_0"]["right_1"]["num_batches_tracked"]) == 0

  capsys.readouterr()
  np.save(tmp / "bad_z.npy", np.zeros((4, 7), np.float32))
  cases = [
      (["sample", "--workdir", wd, "--latents", str(tmp / "bad_z.npy"), "--out",
        str(tmp / "x.npy")], "latents must be shaped (N, 16)"),
      (["sample", "--workdir", wd, "--out", str(tmp / "s.npy")], "exists; not overwriting"),
      (["sample", "--workdir", str(tmp / "nope"), "--out", str(tmp / "y.png")],
       "workdir not found"),
      (["sample", "--workdir", wd, "--step", "3", "--out", str(tmp / "y.png")],
       "no checkpoint at step 3 in "),
      (["convert", "flax2torch", "--workdir", wd, "--step", "3", "--out-dir", str(tmp / "o")],
       "(steps: 0)"),
      (["convert", "torch2flax", "--netG", str(tmp / "G.pt"), "--netD", str(tmp / "D.pt"),
        "--config", tiny, "--workdir", str(tmp / "wd2")], "does not fit the configured model"),
      (["parity", "--config", tiny, "--config.model.blok=relu"], "unknown config field"),
      (["parity", "--config", tiny, "--config.train.lr_g=-0.1"], "train.lr_g must be positive"),
      (["parity", "--config", tiny, "--config.model.block=gelu"], "model.block must be one of"),
      (["parity", "--config", str(tmp / "none.py")], "config file not found"),
      (["parity", "--config", os.path.join(os.path.dirname(tiny), "..", "README.md")],
       "config file must be a Python file defining get_config(): "),
  ]
  for argv, message in cases:
    assert cli.main(argv) == 2, argv
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], (argv, err)
  assert not os.path.exists(tmp / "wd2")


def test_usage_errors_are_one_line(config_path, capsys):
  """argparse printed its usage block before the error; an override written with a space
  (absl's form) was "unrecognized arguments"."""
  tiny = config_path("tiny")
  for argv, line in [
      (["train", "--config", tiny], "the following arguments are required: --workdir (see "
       "`cspgan train --help`)"),
      (["convert", "flax3torch"], "argument direction: invalid choice: 'flax3torch' (choose "
       "from 'torch2flax', 'flax2torch') (see `cspgan convert --help`)")]:
    with pytest.raises(SystemExit) as ended:
      cli.main(argv)
    assert ended.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"cspgan: error: {line}"]
  assert cli.main(["parity", "--config", tiny, "--config.train.lr_d", "-0.1"]) == 2
  assert capsys.readouterr().err.splitlines() == [
      "cspgan: error: train.lr_d must be positive and finite, got -0.1"]


def test_commands_that_need_pytorch_say_so_where_it_is_missing(tmp_path, config_path, capsys,
                                                               monkeypatch):
  """`pip install -e .` (the README's main job) leaves torch out; parity and both conversions
  were a ModuleNotFoundError traceback there, torch2flax after making its workdir."""
  tiny = config_path("tiny")
  out = tmp_path / "out"
  out.mkdir()
  (out / "netG.pt").write_text("mine")
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
  for argv, command in [
      (["parity", "--config", tiny], "parity"),
      (["convert", "torch2flax", "--config", tiny, "--netG", str(tmp_path / "g.pt"), "--netD",
        str(tmp_path / "d.pt"), "--workdir", str(tmp_path / "wd")], "convert torch2flax"),
      (["convert", "flax2torch", "--workdir", str(tmp_path / "wd"), "--out-dir", str(out),
        "--overwrite"], "convert flax2torch")]:
    assert cli.main(argv) == 2, argv
    assert capsys.readouterr().err.splitlines() == [
        f"cspgan: error: {command} needs PyTorch, which is not importable here (import "
        "of torch halted; None in sys.modules): install the CPU wheel, pip install "
        "torch==2.13.0 (or the `torch` extra)"]
  assert not (tmp_path / "wd").exists()
  assert sorted(os.listdir(out)) == ["netG.pt"] and (out / "netG.pt").read_text() == "mine"


def test_a_pytorch_that_does_not_load_is_one_line_too(tmp_path, capsys, monkeypatch):
  """A wheel whose native libraries fail to load raises what their loader says, which can run
  over several lines; the command's error stays one."""
  (tmp_path / "torch").mkdir()
  (tmp_path / "torch" / "__init__.py").write_text(
      "raise OSError('libtorch_cpu.so: cannot open shared object file\\nsearched: /usr/lib')\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.delitem(sys.modules, "torch")  # put back after the test
  assert cli.main(["convert", "flax2torch", "--workdir", str(tmp_path / "wd"), "--out-dir",
                   str(tmp_path)]) == 2
  assert capsys.readouterr().err.splitlines() == [
      "cspgan: error: convert flax2torch needs PyTorch, which is not importable here "
      "(libtorch_cpu.so: cannot open shared object file): install the CPU wheel, pip install "
      "torch==2.13.0 (or the `torch` extra)"]


def test_cli_parity_prints_table_and_max_rel_err(config_path, capsys):
  assert cli.main(["parity", "--config", config_path("tiny"), "--steps", "2"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines[-1].startswith("max_rel_err=")
  assert float(lines[-1].split("=")[1]) < 1e-5
  assert any(l.startswith("forward G") and "main.0.right.3" in l for l in lines)
  assert any(l.startswith("adam_nu D") for l in lines)
  # without the float64 run: the floor columns empty, no tie search
  assert cli.main(["parity", "--config", config_path("tiny"), "--steps", "1", "--no-floor"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines[1].split()[-1] == "0.00e+00" and lines[-1].startswith("max_rel_err=")


def test_cli_parity_passes_its_options_on(config_path, monkeypatch):
  from cspgan_jax import parity  # pylint: disable=import-outside-toplevel
  seen = {}
  monkeypatch.setattr(parity, "run_parity", lambda config, g, d, **kw: seen.update(
      kw, dtype=config.train.dtype, g=g, d=d) or parity.Rows())
  assert cli.main(["parity", "--config", config_path("tiny"), "--seed", "3", "--images", "noise",
                   "--no-ties", "--no-floor", "--steps", "2", "--dtype", "bfloat16",
                   "--netG", "G.pt", "--netD", "D.pt"]) == 0
  assert {k: seen[k] for k in ("seed", "images_kind", "find_ties", "with_floor", "steps", "dtype",
                               "g", "d")} == {
      "seed": 3, "images_kind": "noise", "find_ties": False, "with_floor": False, "steps": 2,
      "dtype": "bfloat16", "g": "G.pt", "d": "D.pt"}


@pytest.mark.parametrize("args, rows, code, counted", [
    # a row beyond max(1e-5, 4x floor), one within it by its floor, one by the aligned float64
    ([], [("forward G", "a", 3e-5, 1e-6), ("forward G", "b", 3e-5, 1e-5),
          ("step 1", "c", 3e-5, 1e-6, 1e-6)], 1, "1e-05, 4x fp32_floor): 1 of 3 from both"),
    ([], [("forward G", "b", 3e-5, 1e-5)], 0, "1e-05, 4x fp32_floor): 0 of 1"),
    # bf16: rows above PyTorch's bf16 floor are expected; without the float64 run: no verdict
    (["--dtype", "bfloat16"], [("forward G", "a", 3e-1, 1e-2)], 0, "bf16_floor: 1 of 1"),
    (["--no-floor"], [("forward G", "a", 3e-5, None)], 0, "1e-05, 4x fp32_floor): 1 of 1"),
])
def test_cli_parity_exits_1_with_rows_beyond_the_bound(config_path, monkeypatch, capsys, args,
                                                       rows, code, counted):
  from cspgan_jax import parity  # pylint: disable=import-outside-toplevel
  made = parity.Rows(parity.Row(g, n, rel, rel, floor, None, None, *aligned)
                     for g, n, rel, floor, *aligned in rows)
  monkeypatch.setattr(parity, "run_parity", lambda config, g, d, **kw: made)
  assert cli.main(["parity", "--config", config_path("tiny")] + args) == code
  captured = capsys.readouterr()
  assert captured.err.splitlines() == (
      ["cspgan: parity: 1 of 3 rows beyond max(1e-05, 4x fp32_floor), as the table counts them"]
      if code else [])
  assert counted in captured.out.splitlines()[-2]


# ---- what the audit found: inputs, outputs, seeds, locks, reports ----

@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
  """A tiny model's checkpoint (step 0), shared by the tests below that only read it."""
  from cspgan_jax import config_lib  # pylint: disable=import-outside-toplevel
  config = config_lib.load_config(os.path.join(ROOT, "configs", "tiny.py"), [])
  workdir = str(tmp_path_factory.mktemp("saved_run"))
  checkpoint.save(workdir, train.init_state(config, jax.random.PRNGKey(0)), config)
  return workdir


def _one_error_line(capsys):
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1 and err[0].startswith("cspgan: error: "), err
  return err[0]


@pytest.mark.parametrize("latents, message", [
    (lambda p: np.savez(p, z=np.zeros((3, 16))), "an .npz archive"),
    (lambda p: np.save(p, np.full((3, 16), "1.5")), "got dtype <U3"),
    (lambda p: np.save(p, np.zeros((3, 16), [("a", "f4")])), "got dtype [('a', '<f4')]"),
    (lambda p: np.save(p, np.ones((3, 16)) * (1 + 1j)), "got dtype complex128"),
    (lambda p: np.save(p, np.ones((3, 16), bool)), "got dtype bool"),
    (lambda p: np.save(p, np.full((3, 16), 1e300)), "beyond float32's range"),
])
def test_sample_refuses_latents_that_are_not_finite_real_numbers(saved_run, tmp_path, capsys,
                                                                 latents, message):
  """An .npz crashed on `ndim`, text and records in `isfinite`; complex lost its imaginary
  part, and 1e300 became inf in float32: all-NaN images, exit 0."""
  with open(tmp_path / "z.npy", "wb") as f:  # np.savez to a file object: no ".npz" appended
    latents(f)
  assert cli.main(["sample", "--workdir", saved_run, "--latents", str(tmp_path / "z.npy"),
                   "--out", str(tmp_path / "s.npy")]) == 2
  assert message in _one_error_line(capsys)
  assert os.listdir(tmp_path) == ["z.npy"]


def _disk_full_after(nbytes, error):
  """A write that puts `nbytes` on the disk, then fails as a full disk makes it fail."""
  def write(f_or_path, *args, **kwargs):
    del args, kwargs
    if isinstance(f_or_path, str):
      with open(f_or_path, "wb") as f:
        f.write(b"x" * nbytes)
    else:
      f_or_path.write(b"x" * nbytes)
    raise error
  return write


NUMPY_SHORT_WRITE = OSError("196608 requested and 992 written")  # numpy's, without errno
TORCH_SHORT_WRITE = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 "
                                 "vs 0")


@pytest.mark.parametrize("out, error, reason", [
    ("s.npy", OSError(28, "No space left on device"), "No space left on device"),
    ("s.npy", NUMPY_SHORT_WRITE,
     "No space left on device (196608 requested and 992 written)"),
    ("s.png", OSError(28, "No space left on device"), "No space left on device"),
], ids=["npy", "npy-without-errno", "png"])
def test_sample_on_a_full_disk_leaves_the_output_as_it_was(saved_run, tmp_path, capsys,
                                                           monkeypatch, out, error, reason):
  """It wrote in place: a partial file that then blocked a rerun, and a line naming the workdir
  ("196608 requested and 992 written (in WORKDIR)")."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(np, "save", _disk_full_after(992, error))
  monkeypatch.setattr(Image.Image, "save", lambda self, path, **kw: _disk_full_after(992, error)(
      path))
  monkeypatch.setattr(os, "statvfs", lambda path: os.statvfs_result((4096,) * 2 + (0,) * 8))
  target = tmp_path / out
  for existing in (None, b"the user's"):
    if existing:
      target.write_bytes(existing)
    argv = ["sample", "--workdir", saved_run, "--n", "2", "--out", str(target)]
    assert cli.main(argv + ["--overwrite"] * bool(existing)) == 2
    assert _one_error_line(capsys) == f"cspgan: error: cannot write {target}: {reason}"
    assert os.listdir(tmp_path) == ([out] if existing else [])  # no temporary file left
    assert not existing or target.read_bytes() == existing
  monkeypatch.undo()
  target.unlink()
  assert cli.main(["sample", "--workdir", saved_run, "--n", "2", "--out", str(target)]) == 0


def test_flax2torch_writes_both_files_or_neither(saved_run, tmp_path, capsys, monkeypatch):
  """On a full disk netG.pt was written and netD.pt not (blocking a rerun), after torch's
  RuntimeError traceback; with --overwrite and netD.pt a folder, netG.pt was replaced first."""
  out = tmp_path / "out"
  argv = ["convert", "flax2torch", "--workdir", saved_run, "--out-dir", str(out)]
  save = torch.save
  writes = []
  monkeypatch.setattr(torch, "save", lambda obj, path: writes.append(path) or (
      save(obj, path) if len(writes) == 1 else _disk_full_after(64, TORCH_SHORT_WRITE)(path)))
  monkeypatch.setattr(os, "statvfs", lambda path: os.statvfs_result((4096,) * 2 + (0,) * 8))
  assert cli.main(argv) == 2
  assert _one_error_line(capsys) == (f"cspgan: error: cannot write {out / 'netD.pt'}: No space "
                                     f"left on device ({TORCH_SHORT_WRITE})")
  assert not out.exists()  # nor the folder made for them
  monkeypatch.undo()
  assert cli.main(argv) == 0  # nothing left behind to block it
  capsys.readouterr()
  kept = {n: (out / n).read_bytes() for n in ("netG.pt", "netD.pt")}
  (out / "netD.pt").unlink()
  (out / "netD.pt").mkdir()
  assert cli.main(argv + ["--overwrite"]) == 2
  assert _one_error_line(capsys) == (f"cspgan: error: --out-dir: {out / 'netD.pt'} is a folder, "
                                     "not a file")
  assert (out / "netG.pt").read_bytes() == kept["netG.pt"]
  assert sorted(os.listdir(out)) == ["netD.pt", "netG.pt"]


@pytest.mark.parametrize("argv", [
    ["sample", "--workdir", "w", "--out", "s.npy", "--n", "2", "--seed", "9223372036854775808"],
    ["sample", "--workdir", "w", "--out", "s.npy", "--seed", "4294967296"],  # jax: the key of 0
    ["parity", "--config", "c.py", "--seed", "-1"],
    ["parity", "--config", "c.py", "--seed", "99999999999999999999"],
], ids=["sample-int64", "sample-2**32", "parity-negative", "parity-huge"])
def test_a_seed_out_of_range_is_one_line(capsys, argv):
  """OverflowError and ValueError tracebacks (numpy's, jax's), or another seed's images."""
  with pytest.raises(SystemExit) as ended:
    cli.main(argv)
  assert ended.value.code == 2
  assert f"argument --seed: must be from 0 to 4294967295, got {argv[-1]}" in _one_error_line(
      capsys)
  assert cli._seed("4294967295") == 2 ** 32 - 1  # pylint: disable=protected-access


@pytest.mark.parametrize("argv, message", [
    (["info", "{file}"], "workdir {file} is a file, not a directory"),
    (["sample", "--workdir", "{run}", "--n", "2", "--out", "{file}/s.npy"],
     "--out {file}/s.npy: {file} is a file, not a directory"),
    (["convert", "flax2torch", "--workdir", "{run}", "--out-dir", "{file}/sub"],
     "--out-dir {file}/sub: {file} is a file, not a directory"),
    (["convert", "flax2torch", "--workdir", "{run}", "--out-dir", "{file}"],
     "--out-dir {file}: {file} is a file, not a directory"),
    (["prepare-data", "--input", "{run}", "--out", "{file}/data"],
     "--out {file}/data: {file} is a file, not a directory"),
    (["bench", "--config", "{tiny}", "--hlo", "{file}/hlo"],
     "--hlo {file}/hlo: {file} is a file, not a directory"),
], ids=["info", "sample", "flax2torch-under", "flax2torch", "prepare-data", "bench"])
def test_a_file_where_a_folder_belongs_is_named(saved_run, tmp_path, config_path, capsys,
                                                argv, message):
  """"workdir not found" of a file; "File exists: FILE" of an output folder under one."""
  names = dict(file=str(tmp_path / "afile"), run=saved_run, tiny=config_path("tiny"))
  (tmp_path / "afile").write_text("the user's")
  assert cli.main([a.format(**names) for a in argv]) == 2
  assert _one_error_line(capsys) == f"cspgan: error: {message.format(**names)}"
  assert (tmp_path / "afile").read_text() == "the user's"


@pytest.mark.parametrize("value", ["nan", "inf", "0", "-1"])
def test_bench_refuses_a_peak_that_is_not_a_positive_number(config_path, capsys, value):
  """nan printed "nan%" in the table's share-of-peak column."""
  # --e2e 1 is refused after the peak: without the check, refused here, not measured at length
  assert cli.main(["bench", "--config", config_path("tiny"), "--peak-tflops", value,
                   "--e2e", "1"]) == 2
  assert _one_error_line(capsys) == (f"cspgan: error: --peak-tflops must be a positive number, "
                                     f"got {float(value)}")


def test_torch2flax_refuses_a_workdir_a_run_holds_or_cannot_use(torch_files, config_path, capsys):
  """It wrote step 0 beside a running `cspgan train`; a `checkpoints` file ended in orbax's
  "Not a directory" and 8 lines of never-awaited coroutines."""
  from cspgan_jax import trainer  # pylint: disable=import-outside-toplevel
  tmp = torch_files[0]
  argv = lambda wd: ["convert", "torch2flax", "--netG", str(tmp / "G.pt"), "--netD",
                     str(tmp / "D.pt"), "--config", config_path("tiny"),
                     "--config.model.block=leaky_bn", "--workdir", str(wd)]
  (tmp / "busy").mkdir()
  with trainer.workdir_lock(str(tmp / "busy")) as refusal:  # as `cspgan train` holds it
    assert refusal is None
    assert cli.main(argv(tmp / "busy")) == 2
  assert f"workdir {tmp / 'busy'} is in use by another `cspgan train` (pid {os.getpid()}" in (
      _one_error_line(capsys))
  assert checkpoint.latest_step(str(tmp / "busy")) is None
  (tmp / "filed").mkdir()
  (tmp / "filed" / "checkpoints").write_text("the user's")
  assert cli.main(argv(tmp / "filed")) == 2
  assert _one_error_line(capsys) == (f"cspgan: error: {tmp / 'filed' / 'checkpoints'} is a file, "
                                     "where the run keeps a folder: move it away")
  assert (tmp / "filed" / "checkpoints").read_text() == "the user's"


@pytest.mark.parametrize("case", ["held", "under-a-file"])
def test_torch2flax_refuses_a_workdir_before_converting(tmp_path, config_path, capsys,
                                                        monkeypatch, case):
  """Both files were read and converted (seconds at 128x128) before the lock was looked at,
  and before a file in the way of the workdir ended makedirs ("not writable: Not a directory")."""
  from cspgan_jax import torch_port, trainer  # pylint: disable=import-outside-toplevel
  calls = []

  def conversion(name):
    def called(*args, **kwargs):
      calls.append(name)
      raise CheckpointError(f"{name} called")
    return called

  for module, name in ((train, "variable_shapes"), (torch_port, "load_torch_state_dict"),
                       (torch_port, "torch_to_flax")):
    monkeypatch.setattr(module, name, conversion(name))
  (tmp_path / "afile").write_text("the user's")
  workdir = tmp_path / ("busy" if case == "held" else "afile/wd")
  argv = ["convert", "torch2flax", "--netG", str(tmp_path / "G.pt"), "--netD",
          str(tmp_path / "D.pt"), "--config", config_path("tiny"), "--workdir", str(workdir)]
  if case == "held":
    workdir.mkdir()
    with trainer.workdir_lock(str(workdir)) as refusal:  # as `cspgan train` holds it
      assert refusal is None
      assert cli.main(argv) == 2
    message = f"workdir {workdir} is in use by another `cspgan train` (pid {os.getpid()}"
    assert os.listdir(workdir) == [trainer.LOCK_FILE]  # nothing written there
  else:
    assert cli.main(argv) == 2
    message = f"--workdir {workdir}: {tmp_path / 'afile'} is a file, not a directory"
  assert calls == []
  assert message in _one_error_line(capsys)
  assert (tmp_path / "afile").read_text() == "the user's"


def test_the_cli_drops_asyncio_reports_of_abandoned_writes_once_a_checkpoint_failed(
    tmp_path, caplog, monkeypatch):
  """After "cannot write a checkpoint ...: No space left on device", asyncio reported orbax's
  other writes, unread, in up to 27 lines (about 1 run in 3); after "cannot restore", its
  other reads (rarely)."""
  import logging  # pylint: disable=import-outside-toplevel
  for name in ("asyncio", "absl"):  # the filters installed below go when the test ends
    monkeypatch.setattr(logging.getLogger(name), "filters", [])
  reports = cli._AbandonedWriteReports  # pylint: disable=protected-access
  monkeypatch.setattr(reports, "failure_reported", False)
  cli._quiet_orbax_failure_reports()  # pylint: disable=protected-access

  def report(message, error):
    try:
      raise error
    except type(error):
      logging.getLogger("asyncio").error(f"{message}\nfuture: <Future finished>",
                                         exc_info=sys.exc_info())
    return [r.getMessage().split("\n")[0] for r in caplog.records if r.name == "asyncio"]

  unread = ("Future exception was never retrieved", ValueError(TENSORSTORE_ENOSPC))
  assert report(*unread) == [unread[0]]  # no failure said yet: shown
  assert cli.main(["info", str(tmp_path / "missing")]) == 2  # a CheckpointError
  caplog.clear()
  assert report(*unread) == []
  assert report("Task exception was never retrieved", OSError(28, "No space left on device")) == []
  # A damaged checkpoint's other reads (truncated array files), as one CI run reported one
  # after `cspgan sample`'s line; the rest of tensorstore's spec cut here
  read = ValueError('OUT_OF_RANGE: Error opening "zarr" driver: Error reading "g.params.main_2.'
                    'right_3.kernel/.zarray" in OCDBT database at local file "/w/checkpoints/0/'
                    'state/": Requested byte range [0, 6184) is not valid for value of size 10 '
                    '[tensorstore_spec=\'{"driver":"zarr"}\']')
  assert report("Future exception was never retrieved", read) == []
  assert report("Future exception was never retrieved", ValueError("a bug")) == [
      "Future exception was never retrieved"]
