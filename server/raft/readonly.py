"""The leader's pending ReadIndex requests (Raft thesis §6.4, etcd readOnly).

A read registered at commit index ``index`` may be served once a quorum of
voters answered a heartbeat sent after it was registered; an answer for a
later request confirms every earlier one too (heartbeats go out in order).
"""
from __future__ import annotations


class PendingReads:
    def __init__(self):
        self._reads: dict[str, tuple[str, int, set]] = {}   # ctx -> (frm, index, acks); ordered
        self.waiting: list[tuple[str, str]] = []   # (ctx, frm): before the leader's first commit

    def add(self, ctx: str, frm: str, index: int, me: str) -> None:
        if ctx not in self._reads:
            self._reads[ctx] = (frm, index, {me})

    def last_ctx(self) -> str:
        return next(reversed(self._reads), "") if self._reads else ""

    def ack(self, ctx: str, voter: str) -> set | None:
        r = self._reads.get(ctx)
        if r is None:
            return None
        r[2].add(voter)
        return r[2]

    def release(self, ctx: str) -> list[tuple[str, str, int]]:
        """(ctx, frm, index) of every read up to and including ``ctx``."""
        out = []
        for c in list(self._reads):
            frm, index, _ = self._reads.pop(c)
            out.append((c, frm, index))
            if c == ctx:
                break
        return out

    def drain(self) -> list[tuple[str, str]]:
        """(ctx, frm) of every read still pending; forgets them."""
        out = [(c, r[0]) for c, r in self._reads.items()] + self.waiting
        self._reads.clear()
        self.waiting = []
        return out
