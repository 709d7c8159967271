"""Processing off the executor thread, on the newest frame only.

Subscription callbacks must return at once (a slow callback is how ROS perception nodes build
up queues and latency). :class:`LatestFrameWorker` keeps a single slot: ``submit`` puts a job in
it and wakes one processing thread; a job still waiting when a newer one arrives is replaced and
counted as *superseded*. The thread checks each job's age when it takes it (older than
``max_age`` seconds: dropped and counted as *too old*), so latency stays bounded by one
processing time plus one frame interval, whatever the input rate.

Stopping (:meth:`LatestFrameWorker.request_stop`) refuses new jobs, discards a waiting one and
lets the running one finish (the node abandons it instead when rclpy's context is already shut
down, see ``Im2HandsNode._process``). When :meth:`~LatestFrameWorker.run` is on the
main thread, its idle wait wakes every :data:`POLL_S` seconds so that Python signal handlers
(the node's Ctrl-C) run promptly whichever thread the signal was delivered to.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["POLL_S", "Job", "LatestFrameWorker"]

#: Longest idle wait without a look at Python's pending signals (seconds).
POLL_S = 0.25


@dataclass
class Job:
    """One frame to process: ``payload`` is whatever the processing function needs, ``stamp``
    the frame's time (seconds, same clock as the ``now`` given to the worker)."""

    payload: Any
    stamp: float
    extra: dict[str, Any] = field(default_factory=dict)


class LatestFrameWorker:
    """One thread that runs ``process(job)`` on the newest submitted job.

    Args:
        process: called on the worker thread; its exceptions are passed to ``on_error`` and the
            thread goes on with the next job.
        now: clock in seconds (the node's ROS clock), for the age check.
        max_age: jobs older than this when taken are dropped (``on_drop(job, "too_old")``);
            ``0``: no limit.
        on_drop: called with ``(job, reason)`` for superseded and too-old jobs.
        on_error: called with ``(job, exception)``.
        start: start the processing thread now; ``False``: the caller runs :meth:`run` on a
            thread of its choice (the node's ``main`` uses the main thread, where torch's CPU
            kernels run faster than on a second thread: docs/measurements.md).
    """

    def __init__(
        self,
        process: Callable[[Job], None],
        now: Callable[[], float],
        max_age: float = 0.0,
        on_drop: Callable[[Job, str], None] | None = None,
        on_error: Callable[[Job, BaseException], None] | None = None,
        name: str = "im2hands-worker",
        start: bool = True,
    ) -> None:
        self._process = process
        self._now = now
        self.max_age = max_age
        self._on_drop = on_drop or (lambda job, reason: None)
        self._on_error = on_error or (lambda job, exc: None)
        self._cond = threading.Condition()
        self._slot: Job | None = None
        self._busy = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
        self._in_run = False
        if start:
            self._thread = threading.Thread(target=self.run, name=name, daemon=True)
            self._thread.start()

    def submit(self, job: Job) -> None:
        """Offer a job; a job still waiting in the slot is superseded by it."""
        with self._cond:
            if self._stopping:
                return
            old, self._slot = self._slot, job
            self._cond.notify()
        if old is not None:
            self._on_drop(old, "superseded")

    def wait_idle(self, timeout: float) -> bool:
        """Block until idle (or ``timeout`` seconds); whether it became idle."""
        with self._cond:
            return self._cond.wait_for(lambda: self._slot is None and not self._busy, timeout)

    @property
    def stopping(self) -> bool:
        """Whether :meth:`request_stop` was called (new jobs are refused)."""
        return self._stopping

    @property
    def busy(self) -> bool:
        """Whether a job is being processed now."""
        return self._busy

    def request_stop(self) -> None:
        """Make :meth:`run` return after the running job (safe from any thread or callback)."""
        with self._cond:
            self._stopping = True
            self._slot = None
            self._cond.notify_all()

    def stop(self, timeout: float = 30.0) -> bool:
        """Finish the running job, discard a waiting one, end the loop; whether it ended."""
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        if not self._in_run:  # run() never started (or already returned)
            return True
        return self._done.wait(timeout)

    def run(self) -> None:
        """The processing loop (on the worker's own thread, or the caller's with ``start=False``);
        returns after :meth:`stop` / :meth:`request_stop`."""
        self._in_run = True
        try:
            self._loop()
        finally:
            # a job abandoned by an exception that is not an Exception (KeyboardInterrupt from
            # the node's signal handling) leaves nothing running: wait_idle must not hang
            with self._cond:
                self._busy = False
                self._in_run = False
                self._cond.notify_all()
            self._done.set()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._cond.wait_for(
                    lambda: self._slot is not None or self._stopping, POLL_S
                ):
                    pass
                if self._stopping:
                    return
                job, self._slot = self._slot, None
                self._busy = True
            try:
                if self.max_age > 0 and self._now() - job.stamp > self.max_age:
                    self._on_drop(job, "too_old")
                else:
                    self._process(job)
            except Exception as exc:  # the thread must survive anything a frame does
                self._on_error(job, exc)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
