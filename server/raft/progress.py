"""The leader's view of one follower's log (etcd-io/raft tracker.Progress).

probe: one APP at a time until the follower's match is found;
replicate: APPs pipelined up to max_inflight;
snapshot: waiting for the follower to install a snapshot (no APPs).
"""
from __future__ import annotations

from collections import deque

PROBE = "probe"
REPLICATE = "replicate"
SNAPSHOT = "snapshot"


class Progress:
    __slots__ = ("match", "next", "state", "paused", "inflight", "max_inflight",
                 "pending_snapshot", "snap_elapsed", "last_heard", "stall")

    def __init__(self, next_index: int, max_inflight: int, now: int):
        self.match = 0
        self.next = next_index
        self.state = PROBE
        self.paused = False          # probe: an APP is out, wait for its answer
        self.inflight: deque[int] = deque()   # replicate: last index of each APP out
        self.max_inflight = max_inflight
        self.pending_snapshot = 0
        self.snap_elapsed = 0        # ticks since the SNAP was sent
        self.last_heard = now        # tick of the last response (check-quorum)
        self.stall = 0               # heartbeats answered without match progress

    def become_probe(self) -> None:
        if self.state == SNAPSHOT:
            self.next = max(self.match + 1, self.pending_snapshot + 1)
        else:
            self.next = self.match + 1
        self._reset(PROBE)

    def become_replicate(self) -> None:
        self.next = self.match + 1
        self._reset(REPLICATE)

    def become_snapshot(self, index: int) -> None:
        self._reset(SNAPSHOT)
        self.pending_snapshot = index

    def _reset(self, state: str) -> None:
        self.state = state
        self.paused = False
        self.inflight.clear()
        self.pending_snapshot = 0
        self.snap_elapsed = 0
        self.stall = 0

    def is_paused(self) -> bool:
        if self.state == PROBE:
            return self.paused
        if self.state == REPLICATE:
            return len(self.inflight) >= self.max_inflight
        return True

    def sent(self, last: int, n_entries: int) -> None:
        """An APP went out carrying entries up to ``last``."""
        if self.state == REPLICATE:
            if n_entries:
                self.next = last + 1
                self.inflight.append(last)
        elif self.state == PROBE:
            self.paused = True

    def maybe_update(self, index: int) -> bool:
        """An ack for ``index``; True if match advanced."""
        updated = index > self.match
        if updated:
            self.match = index
            self.paused = False
            self.stall = 0
        self.next = max(self.next, index + 1)
        if self.state == REPLICATE:
            while self.inflight and self.inflight[0] <= index:
                self.inflight.popleft()
        return updated

    def maybe_decr_to(self, rejected: int, hint: int) -> bool:
        """A rejection of the APP whose previous index was ``rejected``; False if stale."""
        if hint < self.match:
            # The follower's log ends before what it acknowledged: its disk lost a tail
            # (e.g. a damaged last record was cut off at restart).  Resend from there;
            # lowering match never lowers commit, and a stale duplicate of an old
            # rejection only costs a resend of entries the follower acknowledges again.
            self.match = hint
            self.next = hint + 1
            self.paused = False
            return True
        if self.state == REPLICATE:
            if rejected <= self.match:
                return False
            self.next = self.match + 1
            return True
        if self.next - 1 != rejected:
            return False
        self.next = max(min(rejected, hint + 1), self.match + 1, 1)
        self.paused = False
        return True
