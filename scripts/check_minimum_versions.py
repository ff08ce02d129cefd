"""The suite at the lowest versions pyproject.toml allows: every `name>=X` of the package's
dependencies and of its `test` extra installed as `name==X` in a fresh virtual environment,
then the README's test command run there. A floor is a claim that those versions work; this
checks it (pip has no lowest-version resolution of its own).

  python scripts/check_minimum_versions.py                  # venv in /tmp/cspgan-min-venv
  python scripts/check_minimum_versions.py --venv DIR -- -x tests/test_models.py
  python scripts/check_minimum_versions.py --torch-floor    # torch at its floor too

Needs Python >= 3.11 (tomllib), `packaging` (pytest's dependency) and the package registry:
about 10 minutes on a 2-core VM (2026-11-28: a minute of installing, 426 passed in 8:26; 435
later, beside another job, in 13:36). torch stays at the README's CPU wheel, torch==2.13.0,
unless --torch-floor is given: any other version comes from PyPI as a CUDA build with its
nvidia-* packages, about 3 GB (a minute to install here, 5 GB in the environment); with it,
2026-11-28, torch 2.4.0 and every other floor: 438 passed in 7:46 (9:37 with the installs).
Exit status: the suite's.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tomllib
from typing import List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_PIN = "torch==2.13.0"  # the README's: the CPU wheel, installed first


def floor_pins(pyproject: str, torch: bool = False) -> List[str]:
  """`name==X` for every `name>=X` of the dependencies and the `test` extra (torch's only if
  `torch`; it is then the first)."""
  try:
    from packaging.requirements import Requirement
  except ImportError:
    raise SystemExit("check_minimum_versions: needs `packaging` (pip install packaging)") from None

  with open(pyproject, "rb") as f:
    project = tomllib.load(f)["project"]
  pins = []
  for line in project["dependencies"] + project["optional-dependencies"]["test"]:
    req = Requirement(line)
    if (req.name == "torch" and not torch) or (req.marker and not req.marker.evaluate()):
      continue  # torch: the README's wheel; a marker: not for this Python
    floors = [s.version for s in req.specifier if s.operator == ">="]
    if len(floors) != 1:
      raise SystemExit(f"check_minimum_versions: {line!r} in {pyproject} has no single '>=' floor")
    extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
    pin = f"{req.name}{extras}=={floors[0]}"
    if req.name == "torch":  # installed on its own, before the others: the big download
      pins.insert(0, pin)
      continue
    pins.append(pin)
    if req.name == "jax":  # jax names jaxlib's floor loosely; the pair is released together
      pins.append(f"jaxlib=={floors[0]}")
  return pins


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--venv", default="/tmp/cspgan-min-venv",
                      help="where the environment is made (a virtual environment there "
                      "is replaced; any other folder is refused)")
  parser.add_argument("--torch-floor", action="store_true",
                      help="torch at the test extra's floor, a CUDA build from PyPI (about "
                      "3 GB), instead of the README's CPU wheel")
  parser.add_argument("pytest_args", nargs="*",
                      help="after --: pytest's arguments (default: the README's)")
  args = parser.parse_args(argv)
  # `venv --clear` empties the folder: only one that is a virtual environment already.
  if os.path.lexists(args.venv) and not os.path.isfile(os.path.join(args.venv, "pyvenv.cfg")):
    if not (os.path.isdir(args.venv) and not os.listdir(args.venv)):
      print(f"check_minimum_versions: --venv {args.venv} exists and is not a virtual "
            "environment; give a new or an empty folder", file=sys.stderr)
      return 2
  pins = floor_pins(os.path.join(ROOT, "pyproject.toml"), torch=args.torch_floor)
  torch_pin = TORCH_PIN
  if args.torch_floor:
    if not pins or not pins[0].startswith("torch=="):
      print("check_minimum_versions: --torch-floor, but pyproject.toml's `test` extra names no "
            "torch floor", file=sys.stderr)
      return 2
    torch_pin = pins.pop(0)
  python = os.path.join(args.venv, "bin", "python")

  def step(*cmd: str) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)

  try:
    step(sys.executable, "-m", "venv", "--clear", args.venv)
    step(python, "-m", "pip", "install", "-q", torch_pin)
    step(python, "-m", "pip", "install", "-q", *pins)
    step(python, "-m", "pip", "install", "-q", "--no-deps", "-e", ROOT)
    # The plugin matching the floor's jaxlib, for the tests that compile for a GPU.
    step(python, "-m", "cspgan_jax.cli", "compile", "--install-plugin")
    step(python, "-m", "pip", "list", "--format=freeze")
  except subprocess.CalledProcessError as e:
    print(f"check_minimum_versions: {' '.join(e.cmd)} failed (exit {e.returncode})",
          file=sys.stderr)
    return 1
  tests = args.pytest_args or ["-q", "-n", "2", "--dist", "loadfile", "tests"]
  print("+ pytest", " ".join(tests), flush=True)
  return subprocess.run([python, "-m", "pytest", *tests], cwd=ROOT).returncode


if __name__ == "__main__":
  sys.exit(main())
