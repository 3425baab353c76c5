"""One stream of typed status events, fanned out to every subscriber."""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable

from edge.types import Severity, StatusEvent

log = logging.getLogger(__name__)

Subscriber = Callable[[StatusEvent], None]

_LEVELS = {
    Severity.INFO: logging.INFO,
    Severity.WARNING: logging.WARNING,
    Severity.ERROR: logging.ERROR,
}


class EventBus:
    """Thread-safe publish/subscribe for :class:`StatusEvent`.

    Subscribers run synchronously in the publisher's thread, so they must be
    quick (append to a queue, set a flag). A subscriber that raises is logged
    and kept; it never breaks the publisher. The last ``history`` events are
    kept for late subscribers (the panel's health page).
    """

    def __init__(self, history: int = 500) -> None:
        self._lock = threading.Lock()
        self._subs: list[Subscriber] = []
        self._history: collections.deque[StatusEvent] = collections.deque(maxlen=history)
        self._latest: dict[tuple[str, str], StatusEvent] = {}

    def subscribe(self, fn: Subscriber) -> Callable[[], None]:
        """Add a subscriber; returns a function that removes it."""
        with self._lock:
            self._subs.append(fn)

        def unsubscribe() -> None:
            with self._lock:
                if fn in self._subs:
                    self._subs.remove(fn)

        return unsubscribe

    def publish(self, event: StatusEvent) -> None:
        log.log(_LEVELS[event.severity], "[%s] %s: %s", event.source, event.kind, event.message)
        with self._lock:
            self._history.append(event)
            self._latest[(event.source, event.kind.split(".")[0])] = event
            subs = list(self._subs)
        for fn in subs:
            try:
                fn(event)
            except Exception:
                log.exception("status event subscriber %r failed", fn)

    def emit(
        self,
        kind: str,
        source: str,
        message: str = "",
        severity: Severity = Severity.INFO,
        **data: object,
    ) -> StatusEvent:
        """Build and publish an event in one call."""
        ev = StatusEvent(
            kind=kind, source=source, severity=severity, message=message, data=dict(data)
        )
        self.publish(ev)
        return ev

    def history(self) -> list[StatusEvent]:
        with self._lock:
            return list(self._history)

    def latest(self) -> dict[tuple[str, str], StatusEvent]:
        """Latest event per (source, kind family), e.g. ('camera0', 'camera')."""
        with self._lock:
            return dict(self._latest)
