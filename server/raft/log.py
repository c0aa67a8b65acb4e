"""The in-memory Raft log: a list of entries after a snapshot, plus the
persistence and application cursors the Ready/advance cycle moves.

Cursors (all indexes), in the order they can only be <=:
  applied <= applying <= commit;  stable <= handed <= last_index.
``handed``: entries handed to the driver to persist (Ready.entries);
``stable``: entries the driver confirmed durable (advance);
``applying``: entries handed out in Ready.committed; ``applied``: advanced.
"""
from __future__ import annotations

import logging
from typing import Sequence

from server.raft.types import Entry, SnapshotMeta

log = logging.getLogger(__name__)

# Per-entry framing overhead counted against max_msg_bytes, so that many
# zero-sized entries (NOOP, CONF) still make bounded messages.
ENTRY_OVERHEAD = 32


class RaftLog:
    def __init__(self, snap: SnapshotMeta, entries: Sequence[Entry] = ()):
        self.snap = snap
        self.ents: list[Entry] = list(entries)   # ents[i].index == snap.index + 1 + i
        self.commit = snap.index
        self.applied = snap.index
        self.applying = snap.index
        self.stable = self.last_index
        self.handed = self.last_index

    # ---- reading ----
    @property
    def offset(self) -> int:
        return self.snap.index + 1

    @property
    def last_index(self) -> int:
        return self.snap.index + len(self.ents)

    @property
    def last_term(self) -> int:
        return self.ents[-1].term if self.ents else self.snap.term

    def term_at(self, index: int) -> int | None:
        if index == self.snap.index:
            return self.snap.term
        i = index - self.offset
        if 0 <= i < len(self.ents):
            return self.ents[i].term
        return None

    def match_term(self, index: int, term: int) -> bool:
        return self.term_at(index) == term

    def is_up_to_date(self, index: int, term: int) -> bool:
        last_term = self.last_term
        return term > last_term or (term == last_term and index >= self.last_index)

    def slice(self, lo: int, hi: int) -> list[Entry]:
        """Entries lo..hi inclusive (clamped to what is kept)."""
        off = self.offset
        return self.ents[max(lo - off, 0):max(hi - off + 1, 0)]

    def entries_from(self, lo: int, max_bytes: int) -> list[Entry] | None:
        """Entries from lo, at least one, up to about max_bytes.  None when
        lo was compacted (the caller needs a snapshot)."""
        if lo < self.offset:
            return None
        i = lo - self.offset
        out: list[Entry] = []
        total = 0
        for e in self.ents[i:i + 4096]:
            total += e.size + ENTRY_OVERHEAD
            if out and total > max_bytes:
                break
            out.append(e)
        return out

    # ---- writing ----
    def append(self, entries: Sequence[Entry]) -> None:
        """Append, truncating any entries from entries[0].index on."""
        if not entries:
            return
        first = entries[0].index
        if first <= self.last_index:
            del self.ents[first - self.offset:]
            self.stable = min(self.stable, first - 1)
            self.handed = min(self.handed, first - 1)
        self.ents.extend(entries)

    def maybe_append(self, prev: int, prev_term: int, commit: int,
                     entries: Sequence[Entry]) -> int | None:
        """Follower side of APP: the last new index, or None on mismatch."""
        if not self.match_term(prev, prev_term):
            return None
        last_new = prev + len(entries)
        for k, e in enumerate(entries):
            if self.term_at(e.index) != e.term:
                if e.index <= self.commit:
                    # Would truncate a committed entry: a protocol violation
                    # by the sender.  Refuse the whole message.
                    log.error("conflict at committed index %d; APP ignored", e.index)
                    return None
                self.append(entries[k:])
                break
        self.commit_to(min(commit, last_new))
        return last_new

    def commit_to(self, index: int) -> bool:
        index = min(index, self.last_index)
        if index > self.commit:
            self.commit = index
            return True
        return False

    def stable_to(self, index: int, term: int) -> None:
        """The driver persisted up to (index, term); ignored if since replaced."""
        if self.term_at(index) == term and index > self.stable:
            self.stable = index

    def compact(self, index: int, meta: SnapshotMeta) -> None:
        del self.ents[:index - self.offset + 1]
        self.snap = meta

    def restore(self, meta: SnapshotMeta) -> None:
        """Install a snapshot: keep entries after it only if they agree."""
        if meta.index >= self.snap.index and self.term_at(meta.index) == meta.term:
            del self.ents[:meta.index - self.offset + 1]
        else:
            self.ents = []
        self.snap = meta
        for cursor in ("commit", "applied", "applying", "stable", "handed"):
            setattr(self, cursor, max(getattr(self, cursor), meta.index))
        self.stable = min(self.stable, self.last_index)
        self.handed = min(self.handed, self.last_index)
