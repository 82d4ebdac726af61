"""Bounds on the service's work: admission, a memory budget for decoding, frame costs.

* :class:`Admission` counts inspect requests in the service (from their first byte of
  body to their answer) and refuses one more beyond its limit, before its body is read.
* :class:`MemoryBudget` is a weighted semaphore over bytes: a frame decodes only once
  its decode cost fits into what the frames decoding (or holding decoded pixels) have
  left of the budget; first come, first served, so a large frame is not starved.

Both live on the event loop (no locks): acquire and release them from coroutines only.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections import deque

MIB = 1024 * 1024


class Admission:
    """At most ``limit`` requests admitted at once (``try_enter`` / ``leave``)."""

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"admission limit must be >= 1, got {limit}")
        self.limit, self.active = int(limit), 0

    def try_enter(self) -> bool:
        """Admit one request if fewer than ``limit`` are in; False (refuse it) otherwise."""
        if self.active >= self.limit:
            return False
        self.active += 1
        return True

    def leave(self) -> None:
        self.active -= 1


class MemoryBudget:
    """A FIFO weighted semaphore of ``total`` bytes.

    ``await acquire(n, timeout)`` takes ``n`` bytes (``0 < n <= total``) once they are free
    and every earlier waiter has been served; ``release(n)`` gives them back.
    """

    def __init__(self, total: int):
        if total < 1:
            raise ValueError(f"memory budget must be >= 1 byte, got {total}")
        self.total, self.used = int(total), 0
        self._waiters: deque = deque()

    async def acquire(self, n: int, timeout: float | None = None) -> bool:
        """Take ``n`` bytes; False if they were not free within ``timeout`` seconds (None: wait).

        Raises:
            ValueError: ``n`` is not within 1..total.
        """
        if not 0 < n <= self.total:
            raise ValueError(f"cannot take {n} bytes of a {self.total}-byte budget")
        if not self._waiters and self.used + n <= self.total:
            self.used += n
            return True
        waiter = [n, asyncio.get_running_loop().create_future()]
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter[1]), timeout)
            return True
        except asyncio.TimeoutError:
            if waiter[1].done():  # granted just as the wait ran out: keep it
                return True
            self._waiters.remove(waiter)
            self._wake()
            return False
        except BaseException:
            if waiter[1].done():
                self.release(n)
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
                self._wake()
            raise

    def release(self, n: int) -> None:
        self.used -= n
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.used + self._waiters[0][0] <= self.total:
            n, future = self._waiters.popleft()
            self.used += n
            if not future.done():
                future.set_result(True)

    @property
    def waiting(self) -> int:
        """Requests waiting for bytes."""
        return len(self._waiters)


def answer_cost(width: int, height: int) -> int:
    """Bytes a heatmap answer needs beyond decoding: the frame's float32 anomaly map, the
    map placed in the frame, the overlay and its temporaries (about 32 bytes a frame pixel)."""
    return 32 * width * height + MIB


_background = threading.local()
BACKGROUND_NICE = 10


def background_thread() -> None:
    """Lower the CPU priority of the calling thread (not the process) by
    :data:`BACKGROUND_NICE`, once per thread: image work then yields the CPU to the event
    loop, which answers health checks. Threads the calling thread starts later (a
    backbone's compute pool) inherit it. Linux only (elsewhere, or when not permitted, a
    no-op)."""
    if getattr(_background, "done", False):
        return
    _background.done = True
    if not sys.platform.startswith("linux"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + BACKGROUND_NICE))
    except (OSError, AttributeError):
        pass


_libc = None


def return_free_memory() -> bool:
    """Hand memory freed by finished frames back to the operating system (glibc's
    ``malloc_trim``), so that the resident size falls back after a burst or a large frame
    instead of staying at its peak. True if it ran (Linux with glibc), else a no-op."""
    global _libc
    if not sys.platform.startswith("linux"):
        return False
    try:
        if _libc is None:
            import ctypes

            _libc = ctypes.CDLL("libc.so.6")
        _libc.malloc_trim(0)
        return True
    except (OSError, AttributeError):
        _libc = False
        return False
