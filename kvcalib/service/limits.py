"""Per-process limits of synchronous model work (``POST /calibrate`` predict/compress, ``POST /budget``): at most
``sync_concurrency`` computations at once, at most ``sync_queue`` requests waiting for a slot, and a time limit per
request (``sync_timeout``, waiting included).

Python threads cannot be killed, so a computation past its time limit is abandoned, not stopped: the request gets a
503 at once, and the computation finishes in the limiter's own pool while still holding its slot — abandoned work
never adds up beyond ``sync_concurrency``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TypeVar

from kvcalib.service.errors import BusyError, TimeLimitError

T = TypeVar("T")


class SyncLimiter:
    def __init__(self, concurrency: int, queue: int, timeout: float):
        self.concurrency, self.queue, self.timeout = concurrency, queue, timeout
        self._slots = threading.BoundedSemaphore(concurrency)
        self._lock = threading.Lock()
        self._waiting = 0
        self._running = 0
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="kvcalib-sync")

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return self._waiting

    def _acquire(self, deadline: float) -> None:
        if self._slots.acquire(blocking=False):
            return
        with self._lock:
            if self._waiting >= self.queue:
                raise BusyError(f"the server is busy: {self.concurrency} synchronous computations are running and "
                                f"{self._waiting} requests wait (KVCALIB_SYNC_CONCURRENCY, KVCALIB_SYNC_QUEUE); "
                                "retry later, or use mode=full (asynchronous)")
            self._waiting += 1
        try:
            if not self._slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise BusyError(f"the server is busy: no synchronous-work slot freed within {self.timeout:g} s "
                                "(KVCALIB_SYNC_TIMEOUT); retry later, or use mode=full (asynchronous)")
        finally:
            with self._lock:
                self._waiting -= 1

    def _release(self, _future=None) -> None:
        with self._lock:
            self._running -= 1
        self._slots.release()

    def run(self, fn: Callable[[], T]) -> T:
        """``fn()`` in a slot, within the time limit; its exceptions propagate unchanged."""
        deadline = time.monotonic() + self.timeout
        self._acquire(deadline)
        with self._lock:
            self._running += 1
        try:
            future = self._pool.submit(fn)
        except BaseException:
            self._release()
            raise
        future.add_done_callback(self._release)
        try:
            return future.result(timeout=max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            if future.done():  # fn itself raised a TimeoutError
                raise
            raise TimeLimitError(f"the computation took longer than {self.timeout:g} s (KVCALIB_SYNC_TIMEOUT); use "
                                 "mode=full (asynchronous) for long documents") from None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
