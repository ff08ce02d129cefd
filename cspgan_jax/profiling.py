"""A device trace of a window of training steps (`train.profile_steps`), for TensorBoard's Profile
tab and `python -m cspgan_jax.trace_report`, with the compiled step's HLO beside it so that the
report can name each kernel's layer.

The window is steps `profile_start` to `profile_start + profile_steps` (past compilation and
warm-up): the trace starts before the first dispatch inside it and stops after the dispatch that
reaches its end (or the run's last), each end waiting for the device, so the trace holds exactly
those iterations' work. A run resumed inside the window traces the rest of it. Only process 0
traces.
"""

from __future__ import annotations

import glob
import os
from typing import Callable, Optional

import jax

from cspgan_jax.errors import first_line, io_reason
from cspgan_jax.trace_report import PERFETTO_TRACE, STEP_HLO_FILE


class StepTrace:
  """`before(step, state)` ahead of each dispatch, `after(step, outputs, compiled)` after it."""

  def __init__(self, log_dir: str, start: int, steps: int, enabled: bool,
               say: Callable[[str], None]):
    self.log_dir, self.start, self.steps = log_dir, start, steps
    self.enabled = enabled and steps > 0
    self.say = say
    self.first: Optional[int] = None  # the step the open trace started at

  def before(self, step: int, state) -> None:
    if not self.enabled or self.first is not None:
      return
    if not self.start <= step < self.start + self.steps:
      return
    jax.block_until_ready(state)  # earlier steps' work stays out of the window
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0  # Python frames would swamp the trace
    try:
      jax.profiler.start_trace(self.log_dir, create_perfetto_trace=True,
                               profiler_options=options)
    except Exception as e:  # pylint: disable=broad-except  # e.g. another trace running
      self.enabled = False
      self.say(f"note: no trace of steps {step}+ ({type(e).__name__}: "
               f"{' '.join(str(e).split())[:200]}); training goes on")
      return
    self.first = step

  def after(self, step: int, outputs, compiled, last: bool = False) -> None:
    """Closes the trace after the dispatch that reaches the window's end, or the run's last."""
    if self.first is None or (step < self.start + self.steps and not last):
      return
    first, self.first, self.enabled = self.first, None, False  # one window a run
    jax.block_until_ready(outputs)
    try:
      jax.profiler.stop_trace()
    except Exception as e:  # pylint: disable=broad-except  # the profile folder is unwritable
      # (a file where `plugins` belongs, a full disk): the trace is lost, not the run
      self.say(f"note: the trace of steps {first}-{step} could not be written under "
               f"{self.log_dir} ({_reason(e)}); training goes on")
      return
    folders = sorted(glob.glob(os.path.join(self.log_dir, "plugins", "profile", "*")),
                     key=os.path.getmtime)
    if not folders:
      self.say(f"note: the profiler wrote nothing under {self.log_dir}")
      return
    hlo = os.path.join(folders[-1], STEP_HLO_FILE)
    try:
      with open(hlo, "w") as f:
        f.write(compiled.as_text() or "")
    except OSError as e:  # a full disk: the trace is there, the run goes on
      self.say(f"note: the step's HLO could not be written to {hlo} ({_reason(e)}); the trace "
               f"of steps {first}-{step} is in {folders[-1]}")
      return
    trace = os.path.join(folders[-1], PERFETTO_TRACE)
    self.say(f"traced steps {first}-{step} into {folders[-1]} (TensorBoard's Profile tab); "
             f"python -m cspgan_jax.trace_report {trace} --hlo {hlo} --iters {step - first}")

  def stop(self) -> None:
    """Ends a trace left open by an error."""
    if self.first is not None:
      self.first = None
      try:
        jax.profiler.stop_trace()
      except Exception:  # pylint: disable=broad-except  # the error that stopped the run is
        pass  # the one to report, not this trace's


def _reason(error: BaseException) -> str:
  """One line of why: the system's where the error carries it, else jax's own first line
  (`FAILED_PRECONDITION: ... is not a directory`)."""
  return io_reason(error) or f"{type(error).__name__}: {first_line(error, 200)}"
