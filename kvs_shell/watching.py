"""Following a key prefix across failover: every change once, in position order.

A :class:`Follower` wraps :meth:`Client.watch`.  It remembers ``next_position`` (the
first message's ``head + 1``, then the last delivered change's position + 1); when the
stream breaks -- the server went away, the connection dropped, or the server cut a
watcher that fell behind (:class:`WatchLagged`) -- it watches again from
``next_position`` through the client's round robin, so a consumer sees no gap and no
duplicate.  :class:`Compacted` goes to the caller: the positions it needs are gone, it
must re-read a snapshot and follow again from there.

No grpc here: any object with ``watch(prefix, start)`` returning an iterable of
:class:`WatchMessage` with ``cancel()`` and ``server`` will do (tests use a fake).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Union

from .client import Change, NoQuorum, ServerTimeout, ServerUnavailable, WatchLagged

RECONNECT_TIMEOUT = 30.0  # s without any server answering before the follower gives up
INITIAL_BACKOFF = 0.05
MAX_BACKOFF = 1.0

# A break worth watching again for; anything else (Compacted, PermissionDenied,
# Unsupported, ...) ends the follow with that error.
RETRYABLE = (ServerUnavailable, ServerTimeout, NoQuorum, WatchLagged)


@dataclass(frozen=True)
class Connected:
    """The first stream started: ``server`` had applied up to ``head``."""
    server: str
    head: int
    next_position: int


@dataclass(frozen=True)
class Reconnecting:
    """The stream broke (``reason``); watching again from ``next_position``."""
    reason: str
    attempt: int
    next_position: int
    lagged: bool = False  # the server cut us for being too slow (not a failure)


@dataclass(frozen=True)
class Resumed:
    """A new stream (maybe another server) continues at ``next_position``."""
    server: str
    head: int
    next_position: int


Event = Union[Change, Connected, Reconnecting, Resumed]


class Follower:
    """Iterate it (in one thread) for :class:`Change` and status events; ``stop()`` from
    any thread ends the iteration.

    ``start``: first position wanted (None: from now).  After ``reconnect_timeout`` s
    with no server answering, :class:`ServerUnavailable` is raised; a successful
    reconnection starts that clock anew."""

    def __init__(self, client, prefix: str = "", start: int | None = None,
                 reconnect_timeout: float = RECONNECT_TIMEOUT,
                 initial_backoff: float = INITIAL_BACKOFF, max_backoff: float = MAX_BACKOFF,
                 clock: Callable[[], float] = time.monotonic):
        self._client = client
        self.prefix = prefix
        self.next_position: int | None = start if start and start > 0 else None
        self.reconnect_timeout = reconnect_timeout
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self._clock = clock
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._handle = None
        self.server = ""  # the server of the current stream
        self.delivered = 0  # changes handed to the consumer
        self.dropped = 0  # changes below next_position a server sent again (not delivered)
        self.reconnects = 0

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            handle = self._handle
        if handle is not None:
            handle.cancel()

    def __iter__(self) -> Iterator[Event]:
        connected_before = False
        attempt = 0
        backoff = self.initial_backoff
        deadline: float | None = None
        while True:
            handle = self._client.watch(self.prefix, self.next_position or 0)
            with self._lock:  # stop() sets the flag first, then looks for a handle
                if self._stop.is_set():
                    return
                self._handle = handle
            lagged = False
            try:
                first = True
                for msg in handle:
                    if first:
                        first = False
                        if self.next_position is None:
                            self.next_position = msg.head + 1
                        self.server = getattr(handle, "server", "") or ""
                        kind = Resumed if connected_before else Connected
                        connected_before = True
                        attempt, backoff, deadline = 0, self.initial_backoff, None
                        yield kind(self.server, msg.head, self.next_position)
                    for change in msg.changes:
                        if change.position < self.next_position:
                            self.dropped += 1  # seen already (a resent or replayed change)
                            continue
                        self.next_position = change.position + 1
                        self.delivered += 1
                        yield change
                reason = "the server ended the stream"
            except WatchLagged as exc:
                reason, lagged = str(exc), True
            except RETRYABLE as exc:
                reason = str(exc)
            finally:
                handle.cancel()  # also when the consumer abandons us mid-stream
                with self._lock:
                    self._handle = None
            if self._stop.is_set():
                return
            now = self._clock()
            if deadline is None:
                deadline = now + self.reconnect_timeout
            elif now >= deadline:
                raise ServerUnavailable(f"watch: no server answered for "
                                        f"{self.reconnect_timeout:g}s (last: {reason})")
            attempt += 1
            self.reconnects += 1
            yield Reconnecting(reason, attempt, self.next_position or 0, lagged)
            if not lagged or attempt > 1:
                # backoff, not synchronisation: stop() interrupts it
                if self._stop.wait(max(0.0, min(backoff, deadline - self._clock()))):
                    return
                backoff = min(backoff * 2, self.max_backoff)


__all__ = ["Change", "Connected", "Event", "Follower", "Reconnecting", "Resumed"]
