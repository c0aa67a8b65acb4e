"""Looking back: times ("5m ago", ISO 8601), paging through History, a key "as of" a
time, and the diff of two versions.

No grpc here: ``client`` is anything with ``history(key, limit=, before_version=)``
returning a ``client.History`` page (newest first, ``more`` when older ones remain).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import difflib
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

VersionInfo = Any  # client.VersionInfo: version, value, written_at, node, seq
History = Any      # client.History: key, versions, max_version, error, more

PAGE = 1000  # versions asked per History call while paging
_AGO = re.compile(r"(\d+(?:\.\d+)?)\s*(s|sec|secs|m|min|mins|h|hr|hrs|d|day|days|w|wk|wks)"
                  r"\s+ago", re.IGNORECASE)
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class TimeError(ValueError):
    """A time that is neither ISO 8601 nor "N{s,m,h,d,w} ago"."""


def parse_time(text: str, now: float | None = None) -> float:
    """Unix seconds of ``text``: ``now``, ``5m ago`` / ``2h ago`` / ``3d ago`` (also s, w),
    or ISO 8601 (``2026-12-01T10:00:00Z``, ``2026-12-01 10:00``; without an offset it is
    local time, as the tables show it)."""
    t = text.strip()
    now = time.time() if now is None else now
    if t.lower() == "now":
        return now
    m = _AGO.fullmatch(t)
    if m:
        return now - float(m.group(1)) * _UNIT[m.group(2)[0].lower()]
    try:
        when = _dt.datetime.fromisoformat(t[:-1] + "+00:00" if t[-1:] in "zZ" and t else t)
    except ValueError:
        raise TimeError(f"invalid time {text!r}: use ISO 8601 (2026-12-01T10:00:00Z) "
                        "or a relative time (30s ago, 5m ago, 2h ago, 3d ago)") from None
    return when.timestamp()  # naive: local time


def collect_history(client, key: str, limit: int | None = None,
                    since: float | None = None, page: int = PAGE) -> History:
    """Pages through ``key``'s history, newest first, until ``limit`` versions, a version
    written before ``since``, or the oldest one.  ``more``: older live versions remain."""
    versions: list[VersionInfo] = []
    before = 0
    while True:
        want = page if limit is None else min(page, limit - len(versions))
        h = client.history(key, limit=want, before_version=before)
        fresh = [v for v in h.versions if before == 0 or v.version < before]
        for v in fresh:
            if since is not None and v.written_at < since:
                return dataclasses.replace(h, versions=versions, more=True)
            versions.append(v)
        full = limit is not None and len(versions) >= limit
        if not h.more or not fresh or full:
            return dataclasses.replace(h, versions=versions, more=h.more and bool(fresh))
        before = fresh[-1].version


def version_at(client, key: str, when: float, page: int = PAGE) -> tuple[VersionInfo | None, int]:
    """The version live at ``when``: the greatest live version written at or before it
    (the first such one newest first), and the key's highest version ever."""
    before = 0
    while True:
        h = client.history(key, limit=page, before_version=before)
        fresh = [v for v in h.versions if before == 0 or v.version < before]
        hit = select_at(fresh, when)
        if hit is not None or not h.more or not fresh:
            return hit, h.max_version
        before = fresh[-1].version


def select_at(versions: list[VersionInfo], when: float) -> VersionInfo | None:
    """The greatest version with ``written_at <= when`` (None: none qualifies)."""
    best = None
    for v in versions:
        if v.written_at <= when and (best is None or v.version > best.version):
            best = v
    return best


def exact_version(client, key: str, version: int | None) -> tuple[VersionInfo | None, int]:
    """Exactly ``version`` of ``key`` (the latest when None) and the highest version ever;
    one History call of one version."""
    h = client.history(key, limit=1, before_version=0 if version is None else version + 1)
    v = h.versions[0] if h.versions else None
    if v is not None and version is not None and v.version != version:
        v = None
    return v, h.max_version


@dataclass
class AsOf:
    """``get KEY --at TIME``: the version live at ``when`` (None: none was)."""
    key: str
    when: float
    version: VersionInfo | None
    max_version: int = 0

    @property
    def found(self) -> bool:
        return self.version is not None


@dataclass
class Diff:
    key: str
    old: VersionInfo
    new: VersionInfo
    lines: list[str] = field(default_factory=list)  # unified diff, no line ends
    as_json: bool = False  # both values were JSON documents, pretty-printed first

    @property
    def identical(self) -> bool:
        return not self.lines


def pretty(value: str) -> tuple[str, bool]:
    """A JSON object or array pretty-printed (sorted keys), so that a diff shows fields."""
    try:
        doc = json.loads(value)
    except ValueError:
        return value, False
    if not isinstance(doc, (dict, list)):
        return value, False
    return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False), True


def diff_versions(key: str, old: VersionInfo, new: VersionInfo, context: int = 3) -> Diff:
    a, ja = pretty(old.value)
    b, jb = pretty(new.value)
    lines = list(difflib.unified_diff(a.splitlines(), b.splitlines(),
                                      fromfile=f"{key}@{old.version}",
                                      tofile=f"{key}@{new.version}", n=context, lineterm=""))
    return Diff(key, old, new, lines, ja and jb)
