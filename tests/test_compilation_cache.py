"""The command line's persistent compilation cache, and the initialiser compiled as one program."""

import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np

from cspgan_jax import checkpoint, compilation_cache, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")


def test_the_cache_folder_follows_the_environment(tmp_path):
  home = str(tmp_path / "home")
  default = os.path.join(home, "cspgan", "jax-compilation-cache")
  assert compilation_cache.chosen_dir({"XDG_CACHE_HOME": home}) == default
  assert compilation_cache.chosen_dir({"XDG_CACHE_HOME": home, "CSPGAN_COMPILATION_CACHE": ""}) \
      == default
  assert compilation_cache.chosen_dir({"CSPGAN_COMPILATION_CACHE": str(tmp_path / "c")}) == str(
      tmp_path / "c")
  for off in ("off", "OFF", "0", "false", "none"):
    assert compilation_cache.chosen_dir({"CSPGAN_COMPILATION_CACHE": off}) is None
  # jax's own variable, where set, decides alone
  assert compilation_cache.chosen_dir({"JAX_COMPILATION_CACHE_DIR": "/x",
                                       "CSPGAN_COMPILATION_CACHE": str(tmp_path)}) is None


def test_an_unwritable_cache_folder_is_one_line_and_no_cache(tmp_path, capsys):
  blocker = tmp_path / "a-file"
  blocker.write_text("")
  before = jax.config.jax_compilation_cache_dir
  assert compilation_cache.enable({"CSPGAN_COMPILATION_CACHE": str(blocker / "cache")}) is None
  assert jax.config.jax_compilation_cache_dir == before  # jax left as it was
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1 and "not kept across runs: cannot write" in err[0], err
  assert blocker.read_text() == ""  # nothing of the user's touched


def _enabled_settings(environ):
  """(returned folder, jax's folder, jax's size cap) after `enable(environ)`; jax's settings
  are restored after, before anything compiles into that folder."""
  names = ("jax_compilation_cache_dir", "jax_compilation_cache_max_size")
  saved = {n: getattr(jax.config, n) for n in names}
  try:
    path = compilation_cache.enable(environ)
    return (path,) + tuple(getattr(jax.config, n) for n in names)
  finally:
    for name, value in saved.items():
      jax.config.update(name, value)


def test_the_cache_is_capped_where_jax_can_lock_it_and_uncapped_where_not(tmp_path, monkeypatch):
  """jax's size cap needs `filelock`: without it every lookup fails with a warning (a fresh
  `pip install -e .` without torch, which brings filelock, met that), so no cap is set then."""
  folder = str(tmp_path / "c")
  default_cap = jax.config.jax_compilation_cache_max_size
  assert _enabled_settings({"CSPGAN_COMPILATION_CACHE": folder}) == (
      folder, folder, compilation_cache.MAX_BYTES)
  monkeypatch.setitem(sys.modules, "filelock", None)  # `import filelock` raises ImportError
  assert _enabled_settings({"CSPGAN_COMPILATION_CACHE": folder}) == (
      folder, folder, default_cap)


def _cli_train(workdir, cache):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, CSPGAN_COMPILATION_CACHE=cache)
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the suite's own cache (conftest) steps aside
  env.pop("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", None)  # jax's default threshold
  env["JAX_DEBUG_LOG_MODULES"] = "jax._src.compiler"  # says each program it loads
  proc = subprocess.run(
      [sys.executable, "-m", "cspgan_jax.cli", "train", "--config", TINY, "--workdir",
       str(workdir), "--no-progress", "--config.train.num_steps=2"],
      env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert f"compiled programs kept in {cache})" in proc.stderr, proc.stderr[-2000:]
  loaded = re.findall(r"Persistent compilation cache hit for '[^']*' with key '([^']+)'",
                      proc.stderr)
  return checkpoint.restore(str(workdir))[0], loaded


def test_a_second_run_loads_its_programs_and_trains_the_same(tmp_path):
  cache = str(tmp_path / "cache")
  first, loaded = _cli_train(tmp_path / "a", cache)
  assert loaded == []
  kept = sorted(f[:-len("-cache")] for f in os.listdir(cache) if f.endswith("-cache"))
  # the initialiser and the training step (jit of shard_map, named `local`) at least
  assert any(f.startswith("jit__init_variables-") for f in kept), kept
  assert any(f.startswith("jit_local-") for f in kept), kept
  # Each program the first run kept, the second loads. Not "the second keeps none": a program
  # that compiles in about 0.6 s, under jax's 1 s threshold, can take over 1 s in the second
  # run on a machine busy otherwise, and be kept then.
  second, loaded = _cli_train(tmp_path / "b", cache)
  assert sorted(set(loaded)) == kept
  la, lb = jax.tree_util.tree_leaves(first), jax.tree_util.tree_leaves(second)
  assert len(la) == len(lb) > 50
  for a, b in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_each_xdist_worker_has_a_compilation_cache_of_its_own(tmp_path):
  """Two workers' processes shared one, where one could read half of an entry the other wrote;
  the session's folder goes at its end."""
  tests = tmp_path / "tests"
  tests.mkdir()
  shutil.copy(os.path.join(REPO, "tests", "conftest.py"), tests)
  for name in ("a", "b"):  # each file on its worker (--dist loadfile), as CI runs the suite
    (tests / f"test_{name}.py").write_text(
        "import os\n"
        f"def test_{name}():\n"
        f"  open({str(tmp_path / name)!r}, 'w').write(os.environ['JAX_COMPILATION_CACHE_DIR'])\n")
  env = {k: v for k, v in os.environ.items()
         if k not in ("JAX_COMPILATION_CACHE_DIR", "CSPGAN_TESTS_JAX_CACHE")}
  proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadfile",
                         "-p", "no:cacheprovider", str(tests)], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stdout[-2000:]
  a, b = ((tmp_path / name).read_text() for name in ("a", "b"))
  assert a != b and os.path.dirname(a) == os.path.dirname(b), (a, b)
  assert not os.path.exists(os.path.dirname(a))


def test_the_initialiser_is_one_program_per_model_and_stays_traceable(tiny_config):
  config = tiny_config()
  train._variables_initializer.cache_clear()  # pylint: disable=protected-access
  g1, d1 = train.init_variables(config, jax.random.PRNGKey(0))
  # another run's settings, the same model: the same program, and the same values
  g2, d2 = train.init_variables(tiny_config("--config.train.lr_g=3e-4"), jax.random.PRNGKey(0))
  assert train._variables_initializer.cache_info().misses == 1  # pylint: disable=protected-access
  for a, b in zip(jax.tree_util.tree_leaves((g1, d1)), jax.tree_util.tree_leaves((g2, d2))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # DCGAN's init: conv kernels N(0, 0.02), BatchNorm scales N(1, 0.02), BatchNorm biases 0
  kernel = np.asarray(g1["params"]["main_1"]["right_2"]["kernel"])
  assert abs(kernel.mean()) < 2e-3 and 0.018 < kernel.std() < 0.022
  assert not np.array_equal(kernel, np.asarray(train.init_variables(
      config, jax.random.PRNGKey(1))[0]["params"]["main_1"]["right_2"]["kernel"]))
  # Inside another trace (eval_shape, jit) it is part of that program (a nested jit could
  # not take the compiler options): same shapes and dtypes.
  shapes = jax.eval_shape(lambda: train.init_variables(config, jax.random.PRNGKey(0)))
  assert jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), shapes) == jax.tree_util.tree_map(
      lambda x: (x.shape, x.dtype), (g1, d1))
  lowered = jax.jit(lambda r: train.init_variables(config, r)).lower(jax.random.PRNGKey(0))
  assert len(jax.tree_util.tree_leaves(lowered.out_info)) == len(jax.tree_util.tree_leaves(
      (g1, d1)))
