"""Dynamic batching: jobs submitted by many threads, run in batches by one worker thread.

A :class:`Batcher` owns a bounded queue and one worker thread. The worker takes the
first waiting job, then keeps gathering jobs until it holds ``max_batch`` of them or
``max_wait_s`` has passed since the first one, and hands the list to ``run``. So a
lone request waits at most ``max_wait_s`` more than it would alone, and under load one
backbone call serves many requests. A full queue refuses new jobs (:class:`Overloaded`)
instead of growing memory, and a job still waiting at its deadline is dropped
(:class:`Expired`) instead of being run for a caller that has given up. Nothing here
knows about images or HTTP.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future, InvalidStateError
from typing import Callable

log = logging.getLogger(__name__)


class Overloaded(Exception):
    """The batcher's queue is full: try again later (HTTP 503 with Retry-After)."""


class Expired(Overloaded):
    """The job waited in the queue past its deadline and was not run."""


class Job:
    """One unit of work: ``payload`` (anything ``run`` understands), the
    :class:`~concurrent.futures.Future` that ``run`` completes, and the ``deadline``
    (``time.monotonic()`` seconds, or None) by which it must have left the queue."""

    __slots__ = ("payload", "future", "queued_at", "deadline")

    def __init__(self, payload, deadline: float | None = None):
        self.payload = payload
        self.future: Future = Future()
        self.queued_at = time.monotonic()
        self.deadline = deadline


class Batcher:
    """Gathers jobs into batches for ``run(jobs)``, which must complete every job's future
    (a job it leaves pending, or an exception it raises, fails the jobs still pending with
    that exception: no caller waits forever).

    Args:
        run: called in the worker thread with a list of 1..max_batch :class:`Job`.
        max_batch: most jobs per batch (1 = no batching: one job at a time).
        max_wait_s: longest time, seconds, a batch waits for more jobs after its first.
        max_queue: most jobs waiting; :meth:`submit` raises :class:`Overloaded` beyond it.
        on_batch: optional callback(batch size) after each batch (metrics).
        name: the worker thread's name.

    Raises:
        ValueError: max_batch or max_queue < 1, max_wait_s < 0.
    """

    def __init__(self, run: Callable[[list], None], max_batch: int = 8, max_wait_s: float = 0.005,
                 max_queue: int = 64, on_batch: Callable[[int], None] | None = None, name: str = "batcher"):
        if max_batch < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError(f"bad batcher limits: max_batch={max_batch}, max_queue={max_queue}, "
                             f"max_wait_s={max_wait_s}")
        self.run, self.max_batch, self.max_wait_s = run, max_batch, max_wait_s
        self.on_batch = on_batch
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Jobs waiting (not yet taken into a batch)."""
        return self._queue.qsize()

    def submit(self, payload, deadline: float | None = None) -> Future:
        """Queue ``payload``; returns the future ``run`` completes.

        Args:
            deadline: ``time.monotonic()`` by which the job must be taken into a batch; a
                job still waiting then fails with :class:`Expired` (None: no deadline).
                Cancelling the future before its batch starts also drops the job.

        Raises:
            Overloaded: the queue is full, or the batcher is closed.
        """
        if self._stop.is_set():
            raise Overloaded("the service is shutting down")
        job = Job(payload, deadline)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise Overloaded(f"{self._queue.maxsize} frames are already waiting") from None
        return job.future

    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker after the batch in progress; jobs still queued fail with Overloaded."""
        self._stop.set()
        self._thread.join(timeout)
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(Overloaded("the service is shutting down"))

    def _take(self, timeout: float):
        """The next waiting job that is neither past its deadline nor cancelled, or None."""
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            try:
                job = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                return None
            if job.future.done():  # cancelled by its caller
                continue
            if job.deadline is not None and time.monotonic() > job.deadline:
                waited = time.monotonic() - job.queued_at
                try:
                    job.future.set_exception(Expired(f"waited {waited:.1f} s in the queue, past its deadline"))
                except InvalidStateError:  # cancelled meanwhile
                    pass
                continue
            return job

    def _gather(self) -> list:
        first = self._take(0.1)
        if first is None:
            return []
        jobs = [first]
        deadline = time.monotonic() + self.max_wait_s
        while len(jobs) < self.max_batch:
            job = self._take(max(0.0, deadline - time.monotonic()))
            if job is None:
                break
            jobs.append(job)
        return jobs

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._once()

    def _once(self) -> None:
        """Gather and run one batch. Its jobs (payloads, results) are referenced only while
        this runs: an idle worker keeps nothing of the last batch alive."""
        jobs = self._gather()
        jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]
        if not jobs:
            return
        try:
            self.run(jobs)
        except BaseException as exc:  # noqa: BLE001 - handed to every waiting caller
            log.exception("batch of %d failed", len(jobs))
            for j in jobs:
                if not j.future.done():
                    j.future.set_exception(exc)
        for j in jobs:
            if not j.future.done():
                j.future.set_exception(RuntimeError("the batch left this job unanswered"))
        if self.on_batch is not None:
            self.on_batch(len(jobs))
