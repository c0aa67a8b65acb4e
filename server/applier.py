"""The replicated state machine: committed log entries in, store changes out.

Pure and deterministic (no I/O, no clock): every replica applies the same
entries in the same order and ends with the same store, the same change
counter and the same table of applied change ids.  The table makes a change
apply once even if its proposal reached the log twice (a retry after a lost
forward, or a client's retry through another server): the second copy answers
with the first outcome and changes nothing.

Only the driver calls ``apply`` (on its loop, under ``lock``); readers on the
loop read the store directly, threads that copy the whole store take ``lock``.
"""
from __future__ import annotations

import collections
import threading
from typing import Iterable

from .raft import membership
from .raft.types import CONF, NORMAL, ConfState, Entry
from .store import INT32_MAX, InvalidInput, Version, VersionedStore, check_key, check_value
from .waiters import Outcome

KEEP_IDS = 100_000   # applied change ids remembered (part of the replicated state)
HISTORY_DEFAULT = 1000               # versions per History page when the caller sets none
HISTORY_MAX = 10_000                 # the most a caller may ask for
HISTORY_PAGE_BYTES = 2 * 1024 * 1024  # of values per page: well under the 4 MiB gRPC default


class Applier:
    def __init__(self, store: VersionedStore | None = None) -> None:
        self.store = store if store is not None else VersionedStore()
        self.lock = threading.Lock()
        self.index = 0          # last log index applied
        self.term = 0           # its term
        self.changes = 0        # changes applied so far: each change's position (Version.seq)
        self.conf = ConfState()  # membership as of ``index`` (what a snapshot must carry)
        self._ids: collections.OrderedDict[str, tuple[int, str]] = collections.OrderedDict()
        # Retention, part of the replicated state (log entries set them, snapshots carry them)
        self.keep = 0           # live versions kept per key (0: all)
        self.compacted = 0      # position of the last Compact (0: never)
        # Changes applied, for watchers: (position, op, key, version, value, node, ts, all)
        # tuples; None (the default) records nothing.  The driver takes them after a batch.
        self.feed: list[tuple] | None = None

    def take_changes(self) -> list[tuple]:
        out, self.feed = self.feed, []
        return out or []

    def apply(self, entry: Entry) -> list[tuple[str, Outcome]]:
        """Apply one committed entry; returns (change id, outcome) for its changes."""
        out: list[tuple[str, Outcome]] = []
        if entry.kind == NORMAL and entry.data:
            ts = entry.data.get("ts", 0.0)
            with self.lock:
                for item in entry.data.get("items", ()):
                    out.append((item["id"], self._apply_item(item, ts)))
                self.index, self.term = entry.index, entry.term
        else:
            with self.lock:
                if entry.kind == CONF and entry.data:
                    self.conf = membership.apply(self.conf, entry.data)
                self.index, self.term = entry.index, entry.term
        return out

    def _apply_item(self, item: dict, ts: float) -> Outcome:
        iid = item["id"]
        first = self._ids.get(iid)
        if first is not None:
            return Outcome(*first)
        self.changes += 1
        op = item["op"]
        if op in ("compact", "retain"):
            o = self._retention(item)
            self._remember(iid, o)
            return o
        key = item["k"]
        try:
            check_key(key)
            if op == "put":
                check_value(item["v"])
        except InvalidInput as e:
            o = Outcome(-1, str(e))
        else:
            if op == "put":
                node = item.get("node", "")
                ver = self.store.insert(key, item["v"], self.changes, ts, node)
                o = Outcome(ver, "" if ver > 0 else "version numbers of this key are exhausted")
                if ver > 0:
                    if self.keep:
                        self.store.prune(key, self.keep)
                    if self.feed is not None:
                        self.feed.append((self.changes, "put", key, ver, item["v"], node, ts,
                                          False))
            else:
                ver = item.get("ver")
                known = key in self.store
                removed = self.store.remove(key, ver)
                if removed > 0:
                    o = Outcome(removed)
                    if self.feed is not None:
                        self.feed.append((self.changes, "remove", key, removed, "",
                                          item.get("node", ""), ts, not ver))
                elif not known:
                    o = Outcome(-1, f"key {key!r} is unknown or has no live versions")
                else:
                    o = Outcome(-1, f"key {key!r} has no version {ver}")
        self._remember(iid, o)
        return o

    def _remember(self, iid: str, o: Outcome) -> None:
        self._ids[iid] = (o.version, o.reason)
        if len(self._ids) > KEEP_IDS:
            self._ids.popitem(last=False)

    def _retention(self, item: dict) -> Outcome:
        """``compact`` (drop what was superseded before a position) and ``retain`` (keep
        N live versions per key): the outcome's version is how many versions went."""
        if item["op"] == "retain":
            keep = item.get("keep")
            if not isinstance(keep, int) or isinstance(keep, bool) or not 0 <= keep <= INT32_MAX:
                return Outcome(-1, f"keep-versions must be a whole number >= 0, not {keep!r}")
            self.keep = keep
            return Outcome(self.store.prune_all(keep))
        pos = item.get("pos")
        if not isinstance(pos, int) or isinstance(pos, bool) or pos < 1:
            return Outcome(-1, f"compaction position must be a whole number >= 1, not {pos!r}")
        last = self.changes - 1   # this item is a position too, but no change
        if pos > last:
            return Outcome(-1, f"position {pos} is beyond the last applied position {last}")
        if pos <= self.compacted:
            return Outcome(-1, f"compacted: already compacted at position {self.compacted}")
        self.compacted = pos
        return Outcome(self.store.compact(pos))

    def outcome_of(self, iid: str) -> Outcome | None:
        first = self._ids.get(iid)
        return Outcome(*first) if first is not None else None

    # ---- snapshots and state transfer ---------------------------------------
    def meta(self) -> dict:
        """The replicated state besides the keys (call on the loop)."""
        return {"index": self.index, "term": self.term, "changes": self.changes,
                "conf": conf_to_json(self.conf), "keep": self.keep, "compacted": self.compacted,
                "ids": [[i, v, r] for i, (v, r) in self._ids.items()]}

    def copy_keys(self) -> list[tuple[str, int, list[Version]]]:
        """A consistent copy of every key (any thread)."""
        with self.lock:
            return [(k, mx, list(vs)) for k, mx, vs in self.store.dump()]

    def export(self) -> tuple[dict, list[tuple[str, int, list[Version]]]]:
        """meta() and the keys at one index (any thread)."""
        with self.lock:
            return self.meta(), [(k, mx, list(vs)) for k, mx, vs in self.store.dump()]

    def load(self, keys: Iterable[tuple[str, int, list[Version]]], meta: dict) -> None:
        """Replace everything by a snapshot's keys and metadata."""
        fresh = VersionedStore()
        for key, mx, versions in keys:
            fresh.load_key(key, mx, [v if isinstance(v, Version) else Version(*v) for v in versions])
        self.install(fresh, meta)

    def install(self, store: VersionedStore, meta: dict) -> None:
        """Replace everything by an already built store (a state transfer)."""
        ids = collections.OrderedDict((i, (v, r)) for i, v, r in meta.get("ids", []))
        with self.lock:
            self.store = store
            self.index, self.term = int(meta.get("index", 0)), int(meta.get("term", 0))
            self.changes = int(meta.get("changes", 0))
            self.conf = conf_from_json(meta.get("conf"))
            self._ids = ids
            self.keep = int(meta.get("keep", 0))
            self.compacted = int(meta.get("compacted", 0))
            if self.feed is not None:
                self.feed = []   # what was recorded belongs to the state just replaced


def conf_to_json(conf: ConfState) -> dict:
    return {"voters": sorted(conf.voters), "learners": sorted(conf.learners),
            "addrs": [list(p) for p in conf.addrs]}


def conf_from_json(doc: dict | None) -> ConfState:
    if not doc:
        return ConfState()
    return ConfState(frozenset(str(n) for n in doc.get("voters", [])),
                     frozenset(str(n) for n in doc.get("learners", [])),
                     tuple(sorted((str(n), str(a)) for n, a in doc.get("addrs", []))))


class Reader:
    """The one way to read the store (STYLE §2): key reads on the loop need no lock (only
    the loop applies changes); whole-store copies take the applier's lock (any thread)."""

    def __init__(self, applier: Applier) -> None:
        self._a = applier

    def get(self, key: str, version: int | None = None):
        return self._a.store.get(key, version)

    def history(self, key: str, limit: int = HISTORY_DEFAULT, before: int = 0,
                max_bytes: int = HISTORY_PAGE_BYTES) -> tuple[list[Version], int, bool]:
        """One page of ``key``'s live versions, newest first: those < ``before`` (all when
        0), at most ``limit`` of them and, past the first, at most ``max_bytes`` of values
        (so that no answer nears the gRPC message limit).  Returns (versions, highest
        version ever, whether older live versions remain)."""
        store = self._a.store
        page: list[Version] = []
        size = 0
        more = False
        for v in store.history_page(key, before):
            n = _utf8_len(v.value)
            if len(page) >= limit or (page and size + n > max_bytes):
                more = True
                break
            page.append(v)
            size += n
        return page, store.max_version(key), more

    def keys(self, prefix: str, limit: int, start_after: str | None):
        return self._a.store.keys(prefix, limit, start_after)

    def count(self) -> int:
        return len(self._a.store)

    def export_rows(self, prefix: str = "") -> tuple[int, list[tuple[str, int, list[Version]]]]:
        """(position, every key starting with ``prefix`` that has live versions, with its
        highest version ever and its live versions ascending): one consistent cut."""
        with self._a.lock:
            store = self._a.store
            keys, _ = store.keys(prefix)
            rows = [(k, store.max_version(k), store.versions(k)) for k in keys]
            return self._a.changes, rows

    def snapshot_rows(self, version: int | None) -> list:
        """Every key's value at ``version`` (latest when None), one consistent cut."""
        with self._a.lock:
            return list(self._a.store.snapshot(version))


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))
