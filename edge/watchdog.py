"""The backend watchdog: run inference under a deadline and recover without a restart.

:class:`InferenceRunner` owns the live backend and runs it on a worker
thread. The pipeline's call waits at most ``deadline_s``:

- a call that does not return in time raises :class:`BackendTimeoutError`
  (the pipeline turns it into an ERROR verdict), publishes ``backend.hung``
  and abandons that worker (a thread stuck in native code cannot be killed;
  it is left to finish and its backend is dropped);
- a call that raises counts as an error (``backend.error``); after
  ``max_consecutive_errors`` in a row the backend is replaced.

:meth:`InferenceRunner.submit` starts a call and :meth:`InferenceRunner.result`
waits for it, so a caller can do other work while the backend runs: the
free-run loop decides, commits and reports the previous part meanwhile.
:meth:`InferenceRunner.infer` is both in one. One call may wait behind the
running one (the free-run loop queues part N+1 while N runs, so the backend
starts it the moment N returns, with no thread hand-off in between); the
deadline counts from when the backend starts a call, and a call still waiting
when the running one hangs fails at once ("backend recovering").

A call may carry an ``on_return`` hook that the backend's thread runs as soon
as the call returns a result, when no other call waits behind it: the
pipeline finishes the part there (decide, commit, report), so a verdict does
not wait for the hand-off back to the caller's thread. The caller still
collects the call with :meth:`InferenceRunner.result` (which then finds it
done); a hang is detected there, at the deadline, as before.

Replacement happens on a recovery thread while further parts get ERROR
verdicts straight away ("backend recovering"): the candidates (primary, then
fallback) are tried in turn starting after the one that failed, so with a
fallback configured a hang switches to it, and without one the primary is
reloaded. ``backend.recovered`` is published when a backend is back.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge.backends.base import Backend, BackendError, BackendOutput, FloatArray
from edge.events import EventBus
from edge.types import Severity

log = logging.getLogger(__name__)

SOURCE = "backend"


class BackendTimeoutError(BackendError):
    """The backend did not answer within the deadline."""


class BackendRecoveringError(BackendError):
    """No backend is ready: one is being reloaded or replaced."""


@dataclass(frozen=True, slots=True)
class BackendCandidate:
    """A way to get a loaded, warmed-up backend (``load`` raises on failure)."""

    label: str
    """Human name, e.g. ``primary onnxruntime:cpu``."""
    load: Callable[[], Backend]


@dataclass(slots=True)
class InferenceCall:
    """One backend call, started by :meth:`InferenceRunner.submit`."""

    worker: _Worker
    future: concurrent.futures.Future[BackendOutput]
    submitted: float
    """``time.perf_counter()`` when it was submitted."""
    started: float = 0.0
    """``time.perf_counter()`` when the backend started it (0.0 while it waits)."""
    returned: float = 0.0
    """``time.perf_counter()`` when the backend returned (0.0 while it runs)."""
    on_return: Callable[[InferenceCall, BackendOutput], None] | None = None
    """Runs on the backend's thread when the call returns a result and no other call
    waits behind it, before :meth:`InferenceRunner.result` sees it (see ``submit``)."""

    @property
    def latency_ms(self) -> float:
        """The backend's own time: start to return (so far, while it runs; 0 while queued)."""
        if not self.started:
            return 0.0
        end = self.returned or time.perf_counter()
        return (end - self.started) * 1000.0


_Job = tuple[FloatArray, InferenceCall]

RECOVERING = "backend recovering after a fault; no result"

MAX_IN_FLIGHT = 2
"""Calls a worker holds at once: the running one and one waiting behind it."""


class _Worker:
    """One backend on its own thread, taking one job at a time."""

    def __init__(self, backend: Backend, label: str) -> None:
        self.backend = backend
        self.label = label
        self.abandoned = threading.Event()
        # a call waits here until the thread takes it: at most two are in flight
        # (one running, one waiting; the None that stops the thread needs room too)
        self._jobs: queue.Queue[_Job | None] = queue.Queue(maxsize=3)
        self._in_flight = 0
        self._count_lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name=f"backend-{label}", daemon=True)
        self._thread.start()

    def submit(
        self,
        x: FloatArray,
        on_return: Callable[[InferenceCall, BackendOutput], None] | None = None,
    ) -> InferenceCall:
        call = InferenceCall(self, concurrent.futures.Future(), time.perf_counter())
        call.on_return = on_return
        if self.abandoned.is_set():
            self._fail(call, BackendRecoveringError(RECOVERING))
            return call
        with self._count_lock:
            busy = self._in_flight >= MAX_IN_FLIGHT
            if not busy:
                self._in_flight += 1
        if busy:
            self._fail(call, BackendError("backend is still busy with the previous parts"))
            return call
        call.future.add_done_callback(self._done)
        self._jobs.put_nowait((x, call))
        return call

    def _done(self, _fut: concurrent.futures.Future[BackendOutput]) -> None:
        with self._count_lock:
            self._in_flight -= 1

    @staticmethod
    def _fail(call: InferenceCall, exc: BaseException) -> None:
        now = time.perf_counter()
        call.started = call.started or now
        call.returned = now
        if call.future.set_running_or_notify_cancel():
            call.future.set_exception(exc)

    def fail_waiting(self, reason: str) -> None:
        """Fail every call still waiting for this worker (it hung or is being replaced)."""
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                self._fail(job[1], BackendRecoveringError(reason))

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                break
            x, call = job
            fut = call.future
            if self.abandoned.is_set():
                self._fail(call, BackendRecoveringError(RECOVERING))
                continue
            if not fut.set_running_or_notify_cancel():
                continue
            call.started = time.perf_counter()
            try:
                out = self.backend.run(x)
            except BaseException as exc:
                call.returned = time.perf_counter()
                fut.set_exception(exc)
            else:
                call.returned = time.perf_counter()
                hook = call.on_return
                # only when no part waits behind this one: the backend goes on to a
                # waiting part at once, and its caller finishes this one meanwhile
                if hook is not None and self._jobs.empty() and not self.abandoned.is_set():
                    try:
                        hook(call, out)
                    except Exception:
                        log.exception("on_return hook of a backend call failed")
                fut.set_result(out)
            if self.abandoned.is_set():
                break
        self._close()

    def _close(self) -> None:
        try:
            self.backend.close()
        except Exception:
            log.exception("closing backend %s failed", self.label)

    def stop(self, timeout_s: float = 2.0) -> None:
        self.abandoned.set()
        self.fail_waiting(RECOVERING)
        # busy or stuck: it exits after its current call (abandoned is set)
        with contextlib.suppress(queue.Full):
            self._jobs.put_nowait(None)
        self._thread.join(timeout=timeout_s)


class InferenceRunner:
    """Runs the live backend under a deadline; replaces it on hangs and repeated errors."""

    name = "backend"

    def __init__(
        self,
        candidates: Sequence[BackendCandidate],
        events: EventBus,
        *,
        deadline_s: float,
        max_consecutive_errors: int = 3,
        retry_backoff_s: float = 2.0,
    ) -> None:
        if not candidates:
            raise ValueError("at least one backend candidate is needed")
        self.candidates = list(candidates)
        self.events = events
        self.deadline_s = deadline_s
        self.max_consecutive_errors = max_consecutive_errors
        self.retry_backoff_s = retry_backoff_s
        self._lock = threading.Lock()
        self._worker: _Worker | None = None
        self._active_index = -1
        self._recovering = False
        self._stopping = threading.Event()
        self._errors_in_row = 0
        self._latencies_ms: collections.deque[float] = collections.deque(maxlen=2000)
        self._next_slow_event = 0.0
        self.hangs = 0
        self.errors = 0
        self.recoveries = 0

    # -- lifecycle --------------------------------------------------------------
    def start(self) -> None:
        """Load the first candidate that loads here; raises :class:`BackendError` if none."""
        reasons: list[str] = []
        for i, cand in enumerate(self.candidates):
            try:
                backend = cand.load()
            except Exception as exc:
                reasons.append(f"{cand.label}: {exc}")
                log.warning("backend %s unavailable: %s", cand.label, exc)
                continue
            self._install(i, backend)
            if reasons:
                self.events.emit(
                    "backend.fallback",
                    SOURCE,
                    f"running {cand.label}; " + "; ".join(reasons),
                    Severity.WARNING,
                )
            return
        raise BackendError("no backend could be loaded: " + "; ".join(reasons))

    def stop(self) -> None:
        """Stop the worker and free the backend; a recovery in progress is abandoned."""
        self._stopping.set()
        with self._lock:
            worker, self._worker = self._worker, None
        if worker is not None:
            worker.stop()

    def _install(self, index: int, backend: Backend) -> None:
        worker = _Worker(backend, self.candidates[index].label)
        with self._lock:
            old, self._worker = self._worker, worker
            self._active_index = index
            self._recovering = False
            self._errors_in_row = 0
        if old is not None:
            old.stop(timeout_s=0)

    # -- hot path -----------------------------------------------------------------
    def infer(self, x: FloatArray) -> BackendOutput:
        """Run the live backend on ``x`` within the deadline; raises :class:`BackendError`."""
        return self.result(self.submit(x))

    def submit(
        self,
        x: FloatArray,
        on_return: Callable[[InferenceCall, BackendOutput], None] | None = None,
    ) -> InferenceCall:
        """Start the live backend on ``x`` (returns at once); raises :class:`BackendError`.

        At most two calls are in flight: the running one and one waiting
        behind it (a third fails as busy). Collect them with :meth:`result`
        in submit order.

        ``on_return(call, output)``, when given, runs on the backend's thread
        right after the call returned a result, before :meth:`result` sees
        it, unless another call is already waiting behind it (the backend then
        starts that one at once) or the worker was abandoned. The pipeline
        finishes the part there (decide, commit, report), so its verdict does
        not wait for a hand-off back to the caller's thread. A hook that
        raises is logged; the call's result is unaffected. The deadline counts
        the backend's own time only: once the backend has returned within it,
        :meth:`result` waits for the hook to end.
        """
        with self._lock:
            worker = self._worker
            recovering = self._recovering
        if worker is None or recovering:
            raise BackendRecoveringError(RECOVERING)
        return worker.submit(x, on_return)

    def result(self, call: InferenceCall) -> BackendOutput:
        """The outcome of a :meth:`submit`, waiting at most until its deadline.

        The deadline counts from when the backend started the call (from now
        when it has not started yet: the call before it is collected first, so
        it is about to start); a call whose backend returned within it is not
        a hang even while its ``on_return`` hook still runs (this waits for
        the hook). Raises :class:`BackendTimeoutError` (hang: the backend is
        replaced, a call waiting behind it fails), and :class:`BackendError`
        (the call failed).
        """
        worker, fut = call.worker, call.future
        try:
            start = call.started or time.perf_counter()
            wait_s = max(0.0, start + self.deadline_s - time.perf_counter())
            try:
                out = fut.result(timeout=wait_s)
            except concurrent.futures.TimeoutError:
                if not self._returned_in_time(call):
                    raise
                out = fut.result()  # returned in time: its on_return hook is finishing the part
        except concurrent.futures.TimeoutError:
            self.hangs += 1
            worker.abandoned.set()
            worker.fail_waiting("the backend hung on the previous part; recovering")
            self.events.emit(
                "backend.hung",
                SOURCE,
                f"{worker.label} did not answer within {self.deadline_s * 1000:.0f} ms; recovering",
                Severity.ERROR,
                backend=worker.label,
                deadline_ms=self.deadline_s * 1000,
            )
            self._recover(worker)
            raise BackendTimeoutError(
                f"backend deadline of {self.deadline_s * 1000:.0f} ms exceeded"
            ) from None
        except Exception as exc:
            self.errors += 1
            with self._lock:
                self._errors_in_row += 1
                in_row = self._errors_in_row
            self.events.emit(
                "backend.error",
                SOURCE,
                f"{worker.label}: {exc}",
                Severity.ERROR,
                backend=worker.label,
                errors_in_row=in_row,
            )
            if in_row >= self.max_consecutive_errors:
                self._recover(worker)
            if isinstance(exc, BackendError):
                raise
            raise BackendError(f"{type(exc).__name__}: {exc}") from exc
        latency_ms = call.latency_ms
        self._latencies_ms.append(latency_ms)
        if latency_ms > self.deadline_s * 500.0 and time.monotonic() > self._next_slow_event:
            self._next_slow_event = time.monotonic() + 10.0
            self.events.emit(
                "backend.slow",
                SOURCE,
                f"{worker.label} took {latency_ms:.0f} ms, over half the "
                f"{self.deadline_s * 1000:.0f} ms deadline",
                Severity.WARNING,
                backend=worker.label,
                latency_ms=latency_ms,
            )
        if self._errors_in_row:
            with self._lock:
                self._errors_in_row = 0
        return out

    def _returned_in_time(self, call: InferenceCall) -> bool:
        """Whether a call not done by its deadline had its backend return within it.

        Its result is then on the way (the backend's thread runs the call's
        ``on_return`` hook first): not a hang.
        """
        returned, started = call.returned, call.started
        return bool(returned and started and returned - started <= self.deadline_s)

    # -- recovery -------------------------------------------------------------------
    def _recover(self, failed: _Worker) -> None:
        with self._lock:
            if self._recovering or self._worker is not failed:
                return
            self._recovering = True
            start_index = self._active_index
            self._worker = None
        failed.stop(timeout_s=0)
        threading.Thread(
            target=self._recovery_loop, args=(start_index,), name="backend-recovery", daemon=True
        ).start()

    def _recovery_loop(self, failed_index: int) -> None:
        n = len(self.candidates)
        order = [(failed_index + 1 + k) % n for k in range(n)]
        backoff = self.retry_backoff_s
        while not self._stopping.is_set():
            for i in order:
                cand = self.candidates[i]
                try:
                    backend = cand.load()
                except Exception as exc:
                    log.warning("recovery: %s failed to load: %s", cand.label, exc)
                    continue
                if self._stopping.is_set():
                    backend.close()
                    return
                self._install(i, backend)
                self.recoveries += 1
                self.events.emit(
                    "backend.recovered", SOURCE, f"running {cand.label}", backend=cand.label
                )
                return
            self.events.emit(
                "backend.down",
                SOURCE,
                f"no backend could be loaded; retrying in {backoff:.0f} s",
                Severity.ERROR,
            )
            self._stopping.wait(backoff)
            backoff = min(backoff * 2, 60.0)

    # -- status ---------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        with self._lock:
            return self._worker is not None and not self._recovering

    @property
    def active_label(self) -> str:
        with self._lock:
            if self._worker is None:
                return "recovering" if self._recovering else "none"
            return self._worker.label

    def describe(self) -> dict[str, Any]:
        """The live backend's own description plus the runner's counters."""
        with self._lock:
            worker = self._worker
        info: dict[str, Any] = worker.backend.describe() if worker else {}
        info.update(
            label=self.active_label,
            hangs=self.hangs,
            errors=self.errors,
            recoveries=self.recoveries,
            deadline_ms=self.deadline_s * 1000,
        )
        return info

    def latency_ms(self) -> tuple[float | None, float | None]:
        """(p50, p99) of recent successful backend calls, in ms."""
        data = list(self._latencies_ms)
        if not data:
            return None, None
        p50, p99 = np.percentile(np.asarray(data), [50, 99])
        return float(p50), float(p99)

    def wait_ready(self, timeout_s: float) -> bool:
        """Block until a backend is live (tests, start-up). False on timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.ready:
                return True
            time.sleep(0.01)
        return self.ready


class SystemdNotifier:
    """sd_notify(3) over the ``NOTIFY_SOCKET`` datagram socket, no extra dependency.

    Does nothing when the process was not started by systemd with
    ``Type=notify`` (no ``NOTIFY_SOCKET``). ``watchdog_interval_s`` is half of
    ``WATCHDOG_USEC`` when systemd set one (``WatchdogSec=`` in the unit).
    """

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        import os

        env = dict(os.environ) if environ is None else environ
        addr = env.get("NOTIFY_SOCKET", "")
        if addr.startswith("@"):
            addr = "\0" + addr[1:]  # abstract namespace
        self.address = addr
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        valid = usec.isdigit() and (not pid or pid == str(os.getpid()))
        self.watchdog_interval_s: float | None = int(usec) / 2e6 if valid else None

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, *states: str) -> bool:
        """Send ``KEY=value`` lines (``READY=1``, ``WATCHDOG=1``...); False when not sent."""
        if not self.address:
            return False
        import socket

        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.connect(self.address)
                sock.sendall("\n".join(states).encode())
        except OSError as exc:
            log.debug("sd_notify failed: %s", exc)
            return False
        return True
