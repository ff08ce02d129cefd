"""User-facing errors: the CLI prints each as one line and exits non-zero."""

import sys


class CspganError(Exception):
  """Base class of the errors a user can cause (bad config, file, data or checkpoint)."""


class ConfigError(CspganError):
  """A config file or override that cannot be used."""


class CheckpointError(CspganError):
  """A checkpoint that is missing, unreadable, or does not fit the model."""


class DataError(CspganError):
  """Input data that cannot be used."""


def drop_closed_event_loop_reports() -> None:
  """Once orbax has given up on a checkpoint (a restore that failed, a write the disk refused),
  it closes its event loop while tensorstore's other reads or writes are still in flight; each
  of them, finishing, reports `RuntimeError('Event loop is closed')` through
  `sys.unraisablehook`, a traceback apiece (94 for the tiny model's state) after the one line
  that says what went wrong. Those reports, and only those, are dropped from then on."""
  if getattr(sys.unraisablehook, "drops_closed_event_loop_reports", False):
    return
  previous = sys.unraisablehook

  def hook(unraisable):
    e = unraisable.exc_value
    if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
      previous(unraisable)

  hook.drops_closed_event_loop_reports = True
  sys.unraisablehook = hook
