"""Host-side output of the training loop (sample grids, checkpoint writes) on one worker thread.

The loop dispatches device work asynchronously; anything that waits for a result on the host
(fetching a grid, encoding a PNG, copying the state to host memory for orbax) leaves the GPU
idle while it runs. On an H200 that cost the real loop 40% of the bare iteration at batch 64
(docs/PERFORMANCE.md). Here such work runs in submission order on one thread while the loop goes
on dispatching steps; a failure is raised in the loop at the next submit or at `drain`, so a
full disk still stops the run with its own error.
"""

from __future__ import annotations

import concurrent.futures
from typing import Callable, List


class BackgroundWriter:
  """One worker thread, jobs in submission order, their first error raised in the caller."""

  def __init__(self):
    self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                       thread_name_prefix="cspgan-output")
    self._pending: List[concurrent.futures.Future] = []

  def submit(self, fn: Callable, *args) -> None:
    self._raise_finished()
    self._pending.append(self._pool.submit(fn, *args))

  def _raise_finished(self) -> None:
    done = [f for f in self._pending if f.done()]
    self._pending = [f for f in self._pending if not f.done()]
    for f in done:
      f.result()  # re-raises the job's exception here

  def drain(self) -> None:
    """Waits for every job; raises the first one's error."""
    pending, self._pending = self._pending, []
    for f in pending:
      f.result()

  def close(self) -> None:
    """Waits for the jobs (their errors already raised or moot) and ends the thread."""
    self._pool.shutdown(wait=True)
