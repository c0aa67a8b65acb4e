"""The versioned store: a pure data structure (no I/O, no threads, no clocks).

Every key owns a hash table ``version -> Version`` of its live versions plus a
sorted list of those version numbers (versions are only ever appended in
increasing order, so the list stays sorted for free and ``bisect`` answers
"greatest live version <= v").  ``max_version`` remembers the highest version
the key ever had, so a removed number is never handed out again.

The replicated log is the only caller that mutates a store; all servers apply
the same changes in the same order and therefore hold identical stores.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple

from sortedcontainers import SortedList

INT32_MAX = 2**31 - 1
MIN_LEN = 3  # SPEC §1: keys and values are at least 3 characters (code points)


class InvalidInput(ValueError):
    """A key, value or version the contract does not accept."""


def check_key(key: object, max_len: int | None = None) -> str:
    if not isinstance(key, str):
        raise InvalidInput("key must be a string")
    if len(key) < MIN_LEN:
        raise InvalidInput(f"key must be at least {MIN_LEN} characters (got {len(key)})")
    if max_len is not None and len(key) > max_len:
        raise InvalidInput(f"key longer than the limit of {max_len} characters")
    return key


def check_value(value: object, max_len: int | None = None) -> str:
    if not isinstance(value, str):
        raise InvalidInput("value must be a string")
    if len(value) < MIN_LEN:
        raise InvalidInput(f"value must be at least {MIN_LEN} characters (got {len(value)})")
    if max_len is not None and len(value) > max_len:
        raise InvalidInput(f"value longer than the limit of {max_len} characters")
    return value


class Version(NamedTuple):
    """One live version of a key and where it came from (log metadata)."""

    number: int
    value: str
    seq: int = 0          # log position that created it
    written_at: float = 0.0
    node: str = ""        # server the write came through


@dataclass
class KeyVersions:
    by_number: dict[int, Version] = field(default_factory=dict)
    live: list[int] = field(default_factory=list)  # ascending
    max_version: int = 0


class VersionedStore:
    """Multi-version map ``key -> {version -> value}`` with SPEC §2 semantics."""

    def __init__(self) -> None:
        self._keys: dict[str, KeyVersions] = {}
        # Keys with at least one live version, sorted, for prefix listing.
        self._live_keys: SortedList = SortedList()

    # ---- mutations (called only by the log applier) -------------------------
    def insert(self, key: str, value: str, seq: int = 0, written_at: float = 0.0,
               node: str = "") -> int:
        """Store ``value`` as the next version of ``key``; returns that version,
        or -1 when the key has exhausted the int32 version space."""
        kv = self._keys.get(key)
        if kv is None:
            kv = self._keys[key] = KeyVersions()
        if kv.max_version >= INT32_MAX:
            return -1
        number = kv.max_version + 1
        kv.max_version = number
        if not kv.live:
            self._live_keys.add(key)
        kv.live.append(number)
        kv.by_number[number] = Version(number, value, seq, written_at, node)
        return number

    def remove(self, key: str, version: int | None = None) -> int:
        """Remove exactly ``version`` (when > 0) or every live version.

        Returns the version removed (the highest one for remove-all), or -1
        when the key is unknown, has no live versions, or lacks that version.
        """
        kv = self._keys.get(key)
        if kv is None or not kv.live:
            return -1
        if version is None or version <= 0:
            highest = kv.live[-1]
            kv.live.clear()
            kv.by_number.clear()
        else:
            if version not in kv.by_number:
                return -1
            del kv.by_number[version]
            kv.live.pop(bisect.bisect_left(kv.live, version))
            highest = version
        if not kv.live:
            self._live_keys.remove(key)
        return highest

    # ---- retention (called only by the log applier) -------------------------
    def prune(self, key: str, keep: int) -> int:
        """Drop the oldest live versions of ``key`` beyond the newest ``keep``;
        returns how many were dropped (``max_version`` stays: numbers are never reused)."""
        kv = self._keys.get(key)
        if kv is None or keep <= 0 or len(kv.live) <= keep:
            return 0
        cut = len(kv.live) - keep
        for n in kv.live[:cut]:
            del kv.by_number[n]
        del kv.live[:cut]
        return cut

    def prune_all(self, keep: int) -> int:
        if keep <= 0:
            return 0
        return sum(self.prune(key, keep) for key in list(self._live_keys))

    def compact(self, position: int) -> int:
        """Drop every version superseded by a version written before ``position``
        (etcd's compact): per key the newest version with ``seq < position`` stays, with
        everything written at or after ``position``.  Returns how many were dropped."""
        dropped = 0
        for key in list(self._live_keys):
            kv = self._keys[key]
            live, by = kv.live, kv.by_number
            cut = 0
            while cut + 1 < len(live) and by[live[cut + 1]].seq < position:
                cut += 1
            if cut:
                for n in live[:cut]:
                    del by[n]
                del live[:cut]
                dropped += cut
        return dropped

    # ---- reads ----------------------------------------------------------------
    def get(self, key: str, version: int | None = None) -> Version | None:
        """The greatest live version <= ``version`` (latest when None or <= 0)."""
        kv = self._keys.get(key)
        if kv is None or not kv.live:
            return None
        if version is None or version <= 0:
            return kv.by_number[kv.live[-1]]
        i = bisect.bisect_right(kv.live, version)
        return kv.by_number[kv.live[i - 1]] if i else None

    def history(self, key: str) -> list[Version]:
        """Live versions of ``key``, newest first."""
        kv = self._keys.get(key)
        if kv is None:
            return []
        return [kv.by_number[n] for n in reversed(kv.live)]

    def versions(self, key: str) -> list[Version]:
        """Live versions of ``key``, oldest first (a new list)."""
        kv = self._keys.get(key)
        return [kv.by_number[n] for n in kv.live] if kv else []

    def history_page(self, key: str, before: int = 0) -> Iterator[Version]:
        """Live versions of ``key`` below ``before`` (all when <= 0), newest first,
        lazily: a page costs its own size, not the key's whole history."""
        kv = self._keys.get(key)
        if kv is None:
            return
        live = kv.live
        i = bisect.bisect_left(live, before) if before > 0 else len(live)
        while i > 0:
            i -= 1
            yield kv.by_number[live[i]]

    def max_version(self, key: str) -> int:
        kv = self._keys.get(key)
        return kv.max_version if kv else 0

    def snapshot(self, version: int | None = None) -> Iterator[tuple[str, Version]]:
        """For every key, its value at the greatest live version <= ``version``
        (latest when None or <= 0); keys with nothing qualifying are left out.
        Keys come in sorted order."""
        for key in list(self._live_keys):
            found = self.get(key, version)
            if found is not None:
                yield key, found

    def keys(self, prefix: str = "", limit: int | None = None,
             start_after: str | None = None) -> tuple[list[str], bool]:
        """Sorted live keys starting with ``prefix``; returns (keys, truncated)."""
        lo = prefix if start_after is None or start_after < prefix else start_after
        out: list[str] = []
        for key in self._live_keys.irange(minimum=lo):
            if not key.startswith(prefix):
                break
            if key == start_after:
                continue
            if limit is not None and len(out) >= limit:
                return out, True
            out.append(key)
        return out, False

    def __len__(self) -> int:
        return len(self._live_keys)

    def __contains__(self, key: str) -> bool:
        kv = self._keys.get(key)
        return bool(kv and kv.live)

    # ---- state transfer ---------------------------------------------------
    def dump(self) -> Iterator[tuple[str, int, list[Version]]]:
        """Every key ever written: (key, max_version, live versions ascending).
        Keys without live versions are included: they carry max_version."""
        for key, kv in self._keys.items():
            yield key, kv.max_version, [kv.by_number[n] for n in kv.live]

    def load_key(self, key: str, max_version: int, versions: list[Version]) -> None:
        """Install one key from a dump (replaces whatever the key had)."""
        had_live = key in self
        kv = KeyVersions(max_version=max_version)
        for v in sorted(versions, key=lambda v: v.number):
            # State transfers come from peers: refuse what no store could hold.
            if not 1 <= v.number <= max_version or v.number in kv.by_number:
                raise InvalidInput(f"bad version {v.number} for key {key!r} (max {max_version})")
            kv.by_number[v.number] = v
            kv.live.append(v.number)
        if not 0 <= max_version <= INT32_MAX:
            raise InvalidInput(f"bad max version {max_version} for key {key!r}")
        self._keys[key] = kv
        if had_live and not kv.live:
            self._live_keys.remove(key)
        elif kv.live and not had_live:
            self._live_keys.add(key)

    def total_keys(self) -> int:
        """Keys ever written (including those without live versions)."""
        return len(self._keys)
