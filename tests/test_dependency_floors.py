"""scripts/check_minimum_versions.py: which versions the floors check installs."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import check_minimum_versions  # noqa: E402


def _pyproject(tmp_path, dependencies, test):
  path = tmp_path / "pyproject.toml"
  path.write_text("[project]\ndependencies = %r\n[project.optional-dependencies]\ntest = %r\n"
                  % (dependencies, test))
  return str(path)


def test_every_floor_becomes_a_pin_with_jaxlib_beside_jax(tmp_path):
  path = _pyproject(tmp_path,
                    ["jax>=0.10.2", "tensorboardX>=2.6.2.2", "orbax-checkpoint[x]>=0.11.17",
                     "old-helper>=1; python_version < '3.0'"],
                    ["pytest>=8", "torch>=2.4"])
  assert check_minimum_versions.floor_pins(path) == [
      "jax==0.10.2", "jaxlib==0.10.2", "tensorboardX==2.6.2.2", "orbax-checkpoint[x]==0.11.17",
      "pytest==8"]  # torch stays the README's CPU wheel; a marker false here is left out
  # --torch-floor: torch's floor first, installed on its own before the rest
  assert check_minimum_versions.floor_pins(path, torch=True)[:3] == [
      "torch==2.4", "jax==0.10.2", "jaxlib==0.10.2"]


@pytest.mark.parametrize("requirement", ["numpy", "numpy<3", "numpy>=1,>=2"])
def test_a_dependency_without_one_floor_is_refused(tmp_path, requirement):
  with pytest.raises(SystemExit, match=f"'{requirement}' in .* has no single '>=' floor"):
    check_minimum_versions.floor_pins(_pyproject(tmp_path, [requirement], []))


def test_the_projects_own_dependencies_all_have_floors():
  pins = check_minimum_versions.floor_pins(os.path.join(ROOT, "pyproject.toml"))
  names = [p.split("==")[0].split("[")[0] for p in pins]
  assert {"jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tensorflow-datasets",
          "pytest"} <= set(names)


def test_a_venv_folder_that_is_not_a_virtual_environment_is_left_alone(tmp_path, capsys):
  folder = tmp_path / "work"
  folder.mkdir()
  (folder / "notes.txt").write_text("mine")
  assert check_minimum_versions.main(["--venv", str(folder)]) == 2
  assert capsys.readouterr().err == (f"check_minimum_versions: --venv {folder} exists and is not "
                                     "a virtual environment; give a new or an empty folder\n")
  assert (folder / "notes.txt").read_text() == "mine"


def test_a_torch_floor_asked_for_where_there_is_none_is_one_line(tmp_path, monkeypatch, capsys):
  _pyproject(tmp_path, ["jax>=0.10.2"], ["pytest>=8"])
  monkeypatch.setattr(check_minimum_versions, "ROOT", str(tmp_path))
  assert check_minimum_versions.main(["--venv", str(tmp_path / "venv"), "--torch-floor"]) == 2
  assert capsys.readouterr().err == ("check_minimum_versions: --torch-floor, but "
                                     "pyproject.toml's `test` extra names no torch floor\n")
  assert not (tmp_path / "venv").exists()
