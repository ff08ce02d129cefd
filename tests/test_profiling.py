"""`train.profile_steps`: a device trace of a window of the real loop, read by trace_report."""

import os
import re

from cspgan_jax import cli, trace_report, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")


def test_train_traces_exactly_the_asked_steps_with_the_steps_hlo(tmp_path, capsys):
  workdir = tmp_path / "run"
  # No grid or checkpoint inside the window: its kernels would be other programs'.
  assert cli.main(["train", "--config", TINY, "--workdir", str(workdir), "--no-progress",
                   "--config.train.num_steps=8", "--config.train.sample_every=8",
                   "--config.train.checkpoint_every=8", "--config.train.profile_start=2",
                   "--config.train.profile_steps=3"]) == 0
  err = capsys.readouterr().err
  found = re.search(r"traced steps 2-5 into (\S+) \(TensorBoard's Profile tab\); python -m "
                    r"cspgan_jax.trace_report (\S+) --hlo (\S+) --iters 3\n", err)
  assert found, err
  folder, trace, hlo = found.groups()
  assert folder.startswith(str(workdir / trainer.TENSORBOARD_DIR / "plugins" / "profile"))
  assert os.path.dirname(trace) == os.path.dirname(hlo) == folder
  report = trace_report.report_file(trace, hlo)
  # Every kernel of the window is one of the step's, and each ran three times: the window holds
  # those three iterations and nothing of the steps around them.
  assert report.iterations == 3
  kinds = dict(report.grouped(0))
  assert kinds.get("unmatched HLO op", 0.0) < 0.05 * sum(kinds.values()), kinds
  assert "convolution" in kinds
  assert trace_report.main([trace, "--hlo", hlo, "--iters", "3"]) == 0
  assert "3 iteration(s)" in capsys.readouterr().out
  # The workdir alone: the same report, once (xprof's copy of the trace beside it left out).
  assert trace_report.main([str(workdir)]) == 0
  out = capsys.readouterr().out
  assert out.count("### ") == 1 and "3 iteration(s)" in out and "| G main_" in out, out


def test_a_run_ending_inside_the_window_closes_its_trace(tmp_path, capsys):
  workdir = tmp_path / "run"
  assert cli.main(["train", "--config", TINY, "--workdir", str(workdir), "--no-progress",
                   "--config.train.num_steps=4", "--config.train.profile_start=2",
                   "--config.train.profile_steps=10"]) == 0
  err = capsys.readouterr().err
  assert re.search(r"traced steps 2-4 into .* --iters 2\n", err), err
  # Resumed inside a window, a run traces the rest of it; past the window, nothing.
  assert cli.main(["train", "--config", TINY, "--workdir", str(workdir), "--no-progress",
                   "--config.train.num_steps=6", "--config.train.profile_start=2",
                   "--config.train.profile_steps=3"]) == 0
  assert re.search(r"traced steps 4-5 into .* --iters 1\n", capsys.readouterr().err)
  assert cli.main(["train", "--config", TINY, "--workdir", str(workdir), "--no-progress",
                   "--config.train.num_steps=8", "--config.train.profile_start=2",
                   "--config.train.profile_steps=3"]) == 0
  assert "traced steps" not in capsys.readouterr().err


def test_the_window_waits_for_earlier_work_before_it_starts(monkeypatch, tmp_path):
  """The trace starts once the steps before the window are done (else their kernels land in
  it) and stops once the window's are."""
  import jax  # pylint: disable=import-outside-toplevel
  from cspgan_jax import profiling  # pylint: disable=import-outside-toplevel
  order = []
  monkeypatch.setattr(jax, "block_until_ready", lambda x: order.append(("wait", x)))
  monkeypatch.setattr(jax.profiler, "start_trace", lambda *a, **k: order.append("start"))
  monkeypatch.setattr(jax.profiler, "stop_trace", lambda: order.append("stop"))
  t = profiling.StepTrace(str(tmp_path), start=2, steps=3, enabled=True, say=lambda m: None)
  for step in range(0, 8):
    t.before(step, f"state{step}")
    t.after(step + 1, f"out{step}", None)
  assert order == [("wait", "state2"), "start", ("wait", "out4"), "stop"]


def test_a_trace_that_cannot_be_written_is_a_note_not_the_runs_end(monkeypatch, tmp_path):
  """A file where `tensorboard/plugins` belongs: jax's stop_trace fails (JaxRuntimeError
  FAILED_PRECONDITION); once a traceback that ended the run, now a note, and the run goes on."""
  import jax  # pylint: disable=import-outside-toplevel
  from cspgan_jax import profiling  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(jax, "block_until_ready", lambda x: None)
  monkeypatch.setattr(jax.profiler, "start_trace", lambda *a, **k: None)

  def stop_trace():
    raise RuntimeError(f"FAILED_PRECONDITION: {tmp_path}/plugins is not a directory")
  monkeypatch.setattr(jax.profiler, "stop_trace", stop_trace)
  said = []
  t = profiling.StepTrace(str(tmp_path), start=2, steps=1, enabled=True, say=said.append)
  t.before(2, "state")
  t.after(3, "out", None)
  assert len(said) == 1 and "could not be written" in said[0] and "is not a directory" in said[0]
  assert "training goes on" in said[0]
  t.before(3, "state")  # one window a run: nothing more is tried
  # a trace left open by a failing step: its own failure to stop hides not the step's error
  t = profiling.StepTrace(str(tmp_path), start=2, steps=5, enabled=True, say=said.append)
  t.before(2, "state")
  t.stop()
