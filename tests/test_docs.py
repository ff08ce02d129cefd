"""Figures the configs' docstrings repeat from README.md and docs/PERFORMANCE.md agree with them:
each copy is edited by hand (the quickstart's time read 39-52 s in one, 38-52 s in the other)."""

import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*path):
  with open(os.path.join(ROOT, *path), encoding="utf-8") as f:
    return f.read()


def _docstring(name):
  return ast.get_docstring(ast.parse(_read("configs", f"{name}.py")))


def test_quickstart_times_are_the_readmes():
  readme = " ".join(_read("README.md").split())
  doc = " ".join(_docstring("quickstart").split())
  times = re.findall(r"\d+-\d+ s\b", doc)
  assert times, doc  # the docstring still states its times
  for span in times:
    assert span in readme, f"configs/quickstart.py says {span!r}, README.md does not"


@pytest.mark.parametrize("name", ["baseline", "exp3"])
def test_h200_figures_are_the_performance_tables(name):
  """Each `N images/s, [E epochs in] M min` of the docstring is a row of the H200 table in
  docs/PERFORMANCE.md (that rate, M its projection for E epochs) and README.md's table's rate."""
  table = [line for line in _read("docs", "PERFORMANCE.md").splitlines()
           if line.startswith("| 64 |") or line.startswith("| 256 |")]
  readme = _read("README.md")
  doc = " ".join(_docstring(name).split())
  figures = re.findall(r"([\d,]{5,}) images/s, (?:(\d+) epochs in )?([\d.]+) min", doc)
  assert figures, doc
  epochs = None
  for rate, stated_epochs, minutes in figures:
    epochs = stated_epochs or epochs  # "..., 2.8 min" after "10 epochs in 4.3 min"
    rows = [line for line in table if f"| {rate} |" in line]
    assert rows, f"configs/{name}.py: {rate} images/s is no row of docs/PERFORMANCE.md's table"
    projected = [m.strip() for m in rows[0].split("|")[-2].split("/")]  # 10 / 15 / 40 epochs
    assert projected[("10", "15", "40").index(epochs)] == minutes, (name, rate, minutes, rows[0])
    assert rate in readme, f"configs/{name}.py: {rate} images/s is not in README.md"
