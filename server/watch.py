"""Watch fan-out: committed changes to N watchers, each change encoded once.

The driver publishes every applied batch (``publish``); the hub encodes each change
once as a serialized one-change ``WatchResponse`` (protobuf: concatenated messages
merge, so a watcher's message is the join of the changes it wants plus a ``head``
field), keeps them in a bounded ring of recent positions, and pushes them to the live
watchers.  One batch wanted whole by many watchers is joined once and shared.

A watcher is in one of two modes:

* catching up: its next position is at or below the hub's head; ``next_message``
  reads from the ring (pull), a page at a time, until it reaches the head;
* live: ``publish`` appends the batch to the watcher's queue (push); batches a slow
  watcher has not taken yet merge into one message (fewer, larger gRPC messages exactly
  when a watcher cannot keep up).

Switching from one to the other happens on the loop with no await in between, so no
change is missed or repeated.  A live watcher's queue is bounded (messages and
bytes); when ``publish`` would overflow it, the watcher is cancelled with the
position to resume from (RESOURCE_EXHAUSTED) -- ``publish`` never waits for anyone.
A start position below what the ring (or a compaction) keeps is refused with the
oldest available position (FAILED_PRECONDITION "compacted", like etcd's
ErrCompacted); so is a watcher whose server replaced its state by a state transfer.

Runs on the server's one asyncio loop: no locks.
"""
from __future__ import annotations

import asyncio
import bisect
from typing import Callable, Iterable

from kvs_proto import kvs_pb2

RING_CHANGES = 100_000              # recent changes kept for resuming watchers
RING_BYTES = 64 * 1024 * 1024       # ... and at most this many encoded bytes
WATCHER_MESSAGES = 4096             # a live watcher's queue: messages ...
WATCHER_BYTES = 8 * 1024 * 1024     # ... and bytes
PAGE_CHANGES = 1000                 # changes per message while catching up ...
PAGE_BYTES = 1024 * 1024            # ... and bytes
MERGE_BYTES = 256 * 1024            # batches still queued for a watcher merge up to this size
LINGER_FROM = 4                     # with more watchers than this, a woken one waits ...
LINGER = 0.005                      # ... this long for more batches before sending


class WatchError(Exception):
    """Ends a watch; ``code`` is the grpc status name for the service."""
    code = "UNAVAILABLE"


class Compacted(WatchError):
    code = "FAILED_PRECONDITION"

    def __init__(self, start: int, oldest: int, why: str = "") -> None:
        self.oldest = oldest
        super().__init__(f"compacted: position {start} is no longer kept here{why}; oldest"
                         f" available position {oldest} (re-read the snapshot, then watch"
                         f" from its position + 1)")


class Lagged(WatchError):
    code = "RESOURCE_EXHAUSTED"

    def __init__(self, resume: int) -> None:
        self.resume = resume
        super().__init__(f"watcher fell too far behind (its buffer is full); resume from"
                         f" position {resume}")


class Closed(WatchError):
    code = "UNAVAILABLE"


def encode_change(change: tuple) -> bytes:
    pos, op, key, ver, value, node, ts, all_versions = change
    return kvs_pb2.WatchResponse(changes=[kvs_pb2.Change(
        position=pos, op=op, chave=key, versao=ver, valor=value, node=node, written_at=ts,
        all_versions=all_versions)]).SerializeToString()


def encode_head(head: int) -> bytes:
    return kvs_pb2.WatchResponse(head=head).SerializeToString()


class Watcher:
    __slots__ = ("prefix", "allowed", "next", "live", "queue", "queued", "error", "_wake")

    def __init__(self, prefix: str, start: int, allowed: Callable[[str], bool] | None) -> None:
        self.prefix = prefix
        self.allowed = allowed
        self.next = start            # first position not yet handed out (catching up) or queued
        self.live = False
        self.queue: list[tuple[int, bytes]] = []   # (first position, message)
        self.queued = 0              # bytes in queue
        self.error: WatchError | None = None
        self._wake = asyncio.Event()

    def wants(self, key: str) -> bool:
        return key.startswith(self.prefix) and (self.allowed is None or self.allowed(key))

    @property
    def everything(self) -> bool:
        return not self.prefix and self.allowed is None


class WatchHub:
    def __init__(self, ring_changes: int = RING_CHANGES, ring_bytes: int = RING_BYTES,
                 watcher_messages: int = WATCHER_MESSAGES,
                 watcher_bytes: int = WATCHER_BYTES) -> None:
        self.ring_changes, self.ring_bytes = ring_changes, ring_bytes
        self.watcher_messages, self.watcher_bytes = watcher_messages, watcher_bytes
        self.head = 0                # last position applied
        self.complete_from = 1       # the ring holds every change at positions >= this
        self.compacted = 0           # the store's compaction position (refuses older starts)
        self._pos: list[int] = []    # ring: positions, keys, encoded changes (from _off on)
        self._keys: list[str] = []
        self._data: list[bytes] = []
        self._off = 0
        self._bytes = 0
        self.watchers: set[Watcher] = set()
        self.encoded = 0             # changes encoded (tests: once per change, not per watcher)
        self.lagged = 0              # watchers cancelled for falling behind

    # ---- the driver's side --------------------------------------------------------
    def reset(self, head: int, compacted: int = 0) -> None:
        """The state was replaced (startup from a snapshot, a state transfer): nothing
        before ``head`` + 1 can be replayed; watchers that missed changes end."""
        self._pos, self._keys, self._data, self._off, self._bytes = [], [], [], 0, 0
        self.head, self.complete_from, self.compacted = head, head + 1, compacted
        for w in list(self.watchers):
            if w.next <= head or w.queue:
                self._end(w, Compacted(w.next, head + 1, " (this server took a state transfer)"))

    def publish(self, changes: Iterable[tuple], head: int, compacted: int = 0) -> None:
        """One applied batch: ``changes`` as (position, op, key, version, value, node,
        ts, all_versions), in position order; ``head`` the last position applied."""
        batch_pos: list[int] = []
        batch_keys: list[str] = []
        batch_data: list[bytes] = []
        for c in changes:
            data = encode_change(c)
            batch_pos.append(c[0])
            batch_keys.append(c[2])
            batch_data.append(data)
            self._bytes += len(data)
        self.encoded += len(batch_data)
        self._pos += batch_pos
        self._keys += batch_keys
        self._data += batch_data
        self.head = max(self.head, head)
        self.compacted = compacted
        self._trim()
        if not self.watchers:
            return
        tail = encode_head(self.head)
        whole = None
        for w in list(self.watchers):
            if not w.live:
                continue       # catching up: it reads the ring itself
            if w.everything and (not batch_pos or batch_pos[0] >= w.next):
                if whole is None:
                    whole = b"".join(batch_data) + tail
                picked, msg = batch_pos, whole if batch_data else None
            else:   # a prefix, a permission filter, or a start inside this batch
                idx = [i for i, k in enumerate(batch_keys)
                       if batch_pos[i] >= w.next and w.wants(k)]
                picked = [batch_pos[i] for i in idx]
                msg = b"".join(batch_data[i] for i in idx) + tail if idx else None
            if msg is not None:
                if w.queue and w.queued + len(msg) > self.watcher_bytes:
                    self.lagged += 1
                    self._end(w, Lagged(w.queue[0][0]))
                    continue
                if w.queue and len(w.queue[-1][1]) + len(msg) <= MERGE_BYTES:
                    # not sent yet: one message carries both (concatenated protobuf
                    # messages merge: the changes add up, the later head wins)
                    first, prev = w.queue[-1]
                    w.queue[-1] = (first, prev + msg)
                elif len(w.queue) >= self.watcher_messages:
                    self.lagged += 1
                    self._end(w, Lagged(w.queue[0][0]))
                    continue
                else:
                    w.queue.append((picked[0], msg))
                w.queued += len(msg)
                w._wake.set()
            w.next = max(w.next, self.head + 1)

    def close_all(self, reason: str) -> None:
        for w in list(self.watchers):
            self._end(w, Closed(reason))

    def _trim(self) -> None:
        n = len(self._pos) - self._off
        while n > 0 and (n > self.ring_changes or self._bytes > self.ring_bytes):
            self._bytes -= len(self._data[self._off])
            self.complete_from = self._pos[self._off] + 1
            self._data[self._off] = b""
            self._off += 1
            n -= 1
        if self._off > 4096 and self._off * 2 > len(self._pos):
            del self._pos[:self._off], self._keys[:self._off], self._data[:self._off]
            self._off = 0

    # ---- the service's side ---------------------------------------------------------
    def oldest(self) -> int:
        return max(self.complete_from, self.compacted)

    def open(self, prefix: str, start: int,
             allowed: Callable[[str], bool] | None = None) -> Watcher:
        """A watcher from ``start`` (0: the next change); raises Compacted."""
        if start <= 0:
            start = self.head + 1
        if start < self.oldest() and start <= self.head:
            raise Compacted(start, self.oldest())
        w = Watcher(prefix, start, allowed)
        w.live = start > self.head     # nothing to catch up: publish pushes to it from now
        self.watchers.add(w)
        return w

    def close(self, w: Watcher) -> None:
        self.watchers.discard(w)

    def poll(self, w: Watcher) -> bytes | None:
        """The watcher's next message if one is ready, else None (raises its WatchError
        once it ended)."""
        if w.error is None and not w.live:
            msg = self._page(w)
            if msg is not None:
                return msg
        if w.error is not None:
            raise w.error
        if w.queue:
            _, msg = w.queue.pop(0)
            w.queued -= len(msg)
            return msg
        return None

    async def next_message(self, w: Watcher) -> bytes:
        """The watcher's next message, waiting for one (raises its WatchError).  With many
        watchers, a woken watcher lingers a moment so that the batches applied meanwhile
        go out in the same message: each gRPC message costs its server ~20 us of CPU."""
        while True:
            msg = self.poll(w)
            if msg is not None:
                return msg
            w._wake.clear()
            await w._wake.wait()
            if len(self.watchers) > LINGER_FROM:
                await asyncio.sleep(LINGER)

    def _page(self, w: Watcher) -> bytes | None:
        """Catching up: the next page from the ring, or None once live (or ended)."""
        while w.next <= self.head:
            if w.next < self.complete_from:
                self._end(w, Compacted(w.next, self.oldest(), " (it fell out of the"
                                       " recent-changes ring while catching up)"))
                return None
            i = bisect.bisect_left(self._pos, w.next, lo=self._off)
            parts: list[bytes] = []
            size = seen = 0
            while i < len(self._pos) and seen < PAGE_CHANGES and size < PAGE_BYTES:
                if w.wants(self._keys[i]):
                    parts.append(self._data[i])
                    size += len(self._data[i])
                seen += 1
                i += 1
            w.next = self._pos[i] if i < len(self._pos) else self.head + 1
            if parts:
                return b"".join(parts) + encode_head(w.next - 1)
        w.live = True
        return None

    def _end(self, w: Watcher, error: WatchError) -> None:
        w.error = error
        w.queue.clear()
        w.queued = 0
        self.watchers.discard(w)
        w._wake.set()
