"""A bounded work queue: N worker threads run generations off the event loop, FIFO, with tickets.

Every submitted ticket ends exactly once, with a result or an exception, on its ``future``: done, failed,
cancelled (client gone, ``DELETE /jobs/{id}``, server shutdown) or timed out. A full queue refuses at once
(:class:`QueueFull`, with a Retry-After estimate: the cost of the work ahead, queued and the rest of what
runs, over the device's measured throughput) instead of dropping or blocking. Cancelling a running
ticket resolves its future immediately; the worker notices at the next denoising step (the step callback
raises :class:`~diffsteer.guidance.sampler.GenerationCancelled`) and its late result is discarded.
Interrupting a running ticket (A1111's interrupt and skip) is not a cancel: its denoising ends at the next step
and it finishes with the images as they stand.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from diffsteer.guidance.events import GenerationCancelled, GenerationInterrupted

log = logging.getLogger("diffsteer.service.queue")

MAX_RETRY_AFTER_S = 3600


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the queue is full; retry after {retry_after} s")
        self.retry_after = retry_after


class Cancelled(Exception):
    """The ticket was cancelled (``reason`` says by whom)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class TimedOut(Exception):
    def __init__(self, seconds: float):
        super().__init__(f"the generation did not finish within the request timeout of {seconds:g} s")
        self.seconds = seconds


class ShuttingDown(Exception):
    pass


class Ticket:
    """One unit of work: its state, its deadline, its future and its progress listeners."""

    _ids = itertools.count(1)

    def __init__(self, work: Callable[[Ticket], Any], timeout_s: float, label: str = ""):
        self.number = next(self._ids)
        self.work = work
        self.label = label
        self.timeout_s = timeout_s
        self.submitted = time.monotonic()
        self.deadline = self.submitted + timeout_s
        self.started: float | None = None
        self.finished: float | None = None
        self.state = "queued"  # queued | running | done
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self._lock = threading.Lock()
        self._stop: BaseException | None = None
        self.interrupted: str | None = None  # why its denoising was ended early (the images still come)
        self.listeners: list[Callable[[str, Any], None]] = []
        self.cost = 0.0  # estimated, in backbone evaluations at native size (diffsteer.guidance.cost); 0: unknown
        self.cost_done = 0.0  # of it, the units the device worker has finished

    def add_cost_done(self, cost: float) -> None:
        self.cost_done += cost

    @property
    def cost_left(self) -> float:
        return max(0.0, self.cost - self.cost_done)

    # -- called from any thread --------------------------------------------------------------------------
    def cancel(self, reason: str) -> bool:
        """Stop this ticket (queued: never runs; running: stops at its next step). False if already over."""
        return self._end(Cancelled(reason))

    def expire(self) -> bool:
        return self._end(TimedOut(self.timeout_s))

    def interrupt(self, reason: str) -> bool:
        """End a running ticket's denoising at its next step and decode the images as they stand (A1111's
        interrupt): it finishes with a result. False if it is not running (queued or over)."""
        with self._lock:
            if self.future.done() or self.state != "running" or self._stop is not None:
                return False
            self.interrupted = reason
        return True

    def _end(self, error: BaseException) -> bool:
        with self._lock:
            if self.future.done():
                return False
            if self._stop is None:
                self._stop = error
        self._resolve(error=error)
        return True

    @property
    def stop_reason(self) -> BaseException | None:
        return self._stop

    def check(self) -> None:
        """Raise GenerationCancelled if this ticket was cancelled or timed out (the sampler's step callback)."""
        if self._stop is None and time.monotonic() > self.deadline:
            self.expire()
        if self._stop is not None:
            raise GenerationCancelled(str(self._stop))

    def check_step(self) -> None:
        """:meth:`check`, then raise GenerationInterrupted if this ticket was interrupted (the step callback: the
        sampler ends the denoising there and decodes)."""
        self.check()
        if self.interrupted is not None:
            raise GenerationInterrupted(self.interrupted)

    def emit(self, kind: str, data: Any = None) -> None:
        for listener in list(self.listeners):
            try:
                listener(kind, data)
            except Exception:  # a listener must never break a generation
                log.exception("ticket listener failed")

    # -- internal ----------------------------------------------------------------------------------------
    def _resolve(self, result: Any = None, error: BaseException | None = None) -> None:
        with self._lock:
            if self.future.done():
                return
            self.finished = time.monotonic()
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)
        self.emit("finished", self.future)


class WorkQueue:
    """``workers`` threads pulling tickets FIFO; at most ``max_waiting`` tickets wait for a thread."""

    def __init__(
        self,
        workers: int,
        max_waiting: int,
        name: str = "diffsteer-worker",
        throughput: Callable[[], float | None] | None = None,
    ):
        """``throughput()``: cost units the device does per second (None while unmeasured), for Retry-After."""
        self.workers = workers
        self.throughput = throughput
        self.max_waiting = max_waiting
        self._cv = threading.Condition()
        self._waiting: collections.deque[Ticket] = collections.deque()
        self._running: set[Ticket] = set()
        self._closed = False
        self._durations: collections.deque[float] = collections.deque(maxlen=32)
        self._threads = [threading.Thread(target=self._loop, name=f"{name}-{i}", daemon=True) for i in range(workers)]
        for thread in self._threads:
            thread.start()

    # -- state -------------------------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Tickets waiting for a worker."""
        with self._cv:
            return sum(1 for t in self._waiting if not t.future.done())

    @property
    def running(self) -> int:
        with self._cv:
            return len(self._running)

    def active(self) -> list[Ticket]:
        with self._cv:
            return [*self._running, *self._waiting]

    def retry_after(self) -> int:
        """Seconds until the work ahead is done: its cost left over the measured throughput; before any
        throughput is measured, the recent mean duration times the tickets ahead per worker."""
        with self._cv:
            return self._retry_after_locked()

    # -- submission --------------------------------------------------------------------------------------
    def submit(self, ticket: Ticket) -> Ticket:
        with self._cv:
            if self._closed:
                raise ShuttingDown("the server is shutting down")
            self._prune()
            if len(self._waiting) >= self.max_waiting and len(self._running) + len(self._waiting) >= self.workers:
                raise QueueFull(self._retry_after_locked())
            self._waiting.append(ticket)
            self._cv.notify()
        return ticket

    def cost_ahead(self) -> float:
        with self._cv:
            return self._cost_ahead_locked()

    def _cost_ahead_locked(self) -> float:
        return sum(t.cost_left for t in (*self._waiting, *self._running) if not t.future.done())

    def _retry_after_locked(self) -> int:
        rate = self.throughput() if self.throughput is not None else None
        cost = self._cost_ahead_locked()
        if rate and cost > 0:
            return int(min(MAX_RETRY_AFTER_S, max(1, math.ceil(cost / rate))))
        mean = sum(self._durations) / len(self._durations) if self._durations else 5.0
        ahead = len(self._waiting) + len(self._running)
        return int(min(MAX_RETRY_AFTER_S, max(1, math.ceil(mean * ahead / self.workers))))

    def _prune(self) -> None:
        """Drop waiting tickets that ended while queued (cancelled or timed out)."""
        if any(t.future.done() for t in self._waiting):
            self._waiting = collections.deque(t for t in self._waiting if not t.future.done())

    # -- workers -----------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._waiting and not self._closed:
                    self._cv.wait()
                if not self._waiting and self._closed:
                    return
                ticket = self._waiting.popleft()
                if ticket.future.done():
                    continue
                if time.monotonic() > ticket.deadline:
                    ticket.expire()
                    continue
                ticket.state = "running"
                ticket.started = time.monotonic()
                self._running.add(ticket)
            ticket.emit("started")
            try:
                result = ticket.work(ticket)
            except GenerationCancelled as e:  # an interrupt outside the denoising loop (ReNO's outer loop) too
                ticket._resolve(error=ticket.stop_reason or Cancelled(str(e) or "cancelled"))
            except BaseException as e:  # noqa: BLE001 - every outcome goes to the future
                ticket._resolve(error=e)
            else:
                ticket._resolve(result=result)
            finally:
                ticket.state = "done"
                with self._cv:
                    self._running.discard(ticket)
                    self._durations.append(time.monotonic() - (ticket.started or time.monotonic()))

    def expire_overdue(self) -> int:
        """Time out every ticket past its deadline (a watchdog calls this); returns how many."""
        now = time.monotonic()
        expired = 0
        for ticket in self.active():
            if now > ticket.deadline and ticket.expire():
                expired += 1
        return expired

    def close(self, timeout: float = 5.0) -> None:
        """Refuse new work, cancel what waits or runs, and join the threads (up to ``timeout``)."""
        with self._cv:
            self._closed = True
            pending = [*self._waiting, *self._running]
            self._cv.notify_all()
        for ticket in pending:
            ticket.cancel("the server is shutting down")
        end = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, end - time.monotonic()))
