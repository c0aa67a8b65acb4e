"""Clients waiting for their changes (etcd's pkg/wait, plus request-id bookkeeping).

A write registers the id of its change and gets an asyncio future; the applier
triggers the id with the change's Outcome.  A client's retry of the same request
id joins the first attempt's waiter, or is answered from the settled outcomes
kept for recent request ids.  Runs on the server's one event loop: no locks.
"""
from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass
from typing import NamedTuple


class Outcome(NamedTuple):
    version: int
    reason: str = ""
    # False for "we could not find out" answers (expired, no quorum, storage failure,
    # lost in a state transfer): a client's retry must never be answered from those.
    settled: bool = True


@dataclass
class Waiter:
    item: dict                 # the change, as proposed (id, op, k, v|ver, node)
    futures: list              # asyncio futures; a client's retry adds one
    created: float             # monotonic
    deadline: float            # monotonic: fail with "not committed in time" after this
    proposed_at: float = 0.0   # monotonic: last time it was handed to the machine (0: never)


class Waiters:
    def __init__(self, keep_settled: int = 100_000) -> None:
        self._waiting: dict[str, Waiter] = {}
        self._settled: collections.OrderedDict[str, Outcome] = collections.OrderedDict()
        self._keep = keep_settled

    def __len__(self) -> int:
        return len(self._waiting)

    def __iter__(self):
        return iter(list(self._waiting.values()))

    def register(self, item: dict, now: float, timeout: float) -> tuple[asyncio.Future, bool]:
        """A future for change ``item["id"]``; the bool says whether the change is new
        (must be proposed) -- False when a waiter for the id exists already or the
        outcome is settled (then the future is already resolved)."""
        fut = asyncio.get_running_loop().create_future()
        iid = item["id"]
        settled = self._settled.get(iid)
        if settled is not None:
            fut.set_result(settled)
            return fut, False
        w = self._waiting.get(iid)
        if w is not None:
            w.futures.append(fut)
            return fut, False
        self._waiting[iid] = Waiter(item, [fut], now, now + timeout)
        return fut, True

    def trigger(self, iid: str, outcome: Outcome) -> None:
        w = self._waiting.pop(iid, None)
        if w is not None:
            for f in w.futures:
                if not f.done():
                    f.set_result(outcome)
        if outcome.settled and iid.startswith("c:"):
            self._settled[iid] = outcome
            self._settled.move_to_end(iid)
            while len(self._settled) > self._keep:
                self._settled.popitem(last=False)

    def fail(self, iid: str, outcome: Outcome) -> None:
        """An unsettled answer: wakes the waiter, remembers nothing."""
        self.trigger(iid, outcome._replace(settled=False))

    def fail_all(self, outcome: Outcome, older_than: float | None = None) -> int:
        """Fail every waiter (created before ``older_than`` when given); returns how many."""
        ids = [i for i, w in self._waiting.items()
               if older_than is None or w.created <= older_than]
        for i in ids:
            self.fail(i, outcome)
        return len(ids)

    def expire(self, now: float, outcome: Outcome) -> int:
        ids = [i for i, w in self._waiting.items() if now >= w.deadline]
        for i in ids:
            self.fail(i, outcome)
        return len(ids)

    def proposed(self, ids, now: float) -> None:
        """The changes ``ids`` were just handed to the machine."""
        for iid in ids:
            w = self._waiting.get(iid)
            if w is not None:
                w.proposed_at = now

    def due(self, now: float, every: float) -> list[Waiter]:
        """Waiters never proposed, or proposed more than ``every`` seconds ago (a
        forwarded proposal may have been lost: the applier de-duplicates by id)."""
        return [w for w in self._waiting.values() if now - w.proposed_at >= every]
