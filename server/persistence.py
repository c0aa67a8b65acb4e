"""Durable storage for one Raft node: a checksummed, segmented log of entries
and hard states, plus snapshots of the whole store.

Pure file I/O: no threads are started here.  The methods are guarded by a
mutex so that ``write_snapshot`` may run on another thread while the driver
keeps calling ``append``/``sync`` (the snapshot is streamed without holding it).

Data directory layout (see docs/persistence.md)::

    LOCK                      flock(LOCK_EX) held while a DataDir is open; holds the pid
    snap-<index:020d>.snap    newest snapshot (store state after log index)
    snap-*.snap.tmp           snapshot being written (removed on load)
    log-<n:010d>.wal          log segments, name order == write order
    reset-staging/, reset/    a reset() being prepared / committed (finished on load)
    quarantine/               data set aside after mid-log corruption or a gap

Segment = magic ``KVSWAL2\\n`` then records ``crc32 u32 | length u32 | payload``
(little-endian; crc32 over length + payload).  payload = one type byte + JSON:
``E`` entries ``[[term, index, kind, data], ...]`` (contiguous), ``H`` hard
state ``[term, vote, commit]``.  Replay is etcd's rule: a later entries record
replaces every stored entry from its first index on.  Each segment starts with
the hard state current when it was created, so deleting older segments never
loses it.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import struct
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import msgspec

from .raft.types import Entry, HardState
from .store import Version

__all__ = [
    "DataDir", "DataDirLocked", "PersistenceError", "Recovered", "SnapshotKeys",
    "SnapshotState", "LOG_MAGIC", "HDR_SIZE",
]

LOG_MAGIC = b"KVSWAL2\n"
OLD_MAGICS = (b"KVSWAL1\n",)       # formats we recognise but cannot read: refuse, never misread
SNAP_FORMAT = "kvs-snapshot"
SNAP_VERSION = 2
MAX_PAYLOAD = 1 << 30              # a length field above this is corruption
REC_ENTRIES = 0x45                 # b"E"
REC_HARD = 0x48                    # b"H"
_HDR = struct.Struct("<II")        # crc, length
_LEN = struct.Struct("<I")
HDR_SIZE = _HDR.size               # 8
_SEG_RE = re.compile(r"^log-(\d{10})\.wal$")
_SNAP_RE = re.compile(r"^snap-(\d{20})\.snap$")
_STAGING = "reset-staging"
_RESET = "reset"
_MANIFEST = "MANIFEST"
_WRITE_BUFFER = 256 * 1024
_SNAP_CHUNK = 1 << 20
SEGMENT_BYTES = 64 << 20           # rotate the active segment beyond this (as etcd)
_json_encode = msgspec.json.Encoder().encode
_json_decode = msgspec.json.decode
_ENC = json.JSONEncoder(separators=(",", ":"), check_circular=False, ensure_ascii=False)


class PersistenceError(Exception):
    """Storage failed or is unusable; after a write failure the DataDir refuses
    further writes (fail-stop)."""


class DataDirLocked(PersistenceError):
    """Another DataDir (in this or another process) holds the directory."""


@dataclass
class SnapshotState:
    index: int            # last log index covered (0 = empty)
    term: int             # term of that entry
    keys: Iterable[tuple[str, int, list[Version]]]   # as VersionedStore.dump() yields
    meta: dict = field(default_factory=dict)          # JSON-able: conf, cluster id, request ids


@dataclass
class Recovered:
    snapshot: SnapshotState | None
    entries: list[Entry]          # contiguous, after snapshot.index, truncations resolved
    hard_state: HardState         # the last one written (HardState() if none)
    warnings: list[str]

    @property
    def last_index(self) -> int:
        if self.entries:
            return self.entries[-1].index
        return self.snapshot.index if self.snapshot else 0


class SnapshotKeys:
    """The keys of a verified snapshot file, read lazily (re-iterable).

    Each iteration re-reads the file: iterate before a later snapshot replaces
    it.  ``len()`` is the number of keys."""

    def __init__(self, path: Path, start: int, count: int) -> None:
        self.path = path
        self._start = start
        self._count = count

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[tuple[str, int, list[Version]]]:
        with open(self.path, "rb", buffering=_SNAP_CHUNK) as f:
            f.seek(self._start)
            for _ in range(self._count):
                key, max_version, versions = json.loads(f.readline())
                yield key, max_version, [Version(*v) for v in versions]


@dataclass
class _Segment:
    number: int
    hi: int = 0          # highest entry index in any of its records (0: none)

    @property
    def name(self) -> str:
        return f"log-{self.number:010d}.wal"


class _Bad(Exception):
    pass


# ---- record encoding ------------------------------------------------------------------
def _frame(kind: int, body: bytes) -> bytes:
    payload = bytes((kind,)) + body
    ln = _LEN.pack(len(payload))
    return _LEN.pack(zlib.crc32(payload, zlib.crc32(ln))) + ln + payload


def _entries_record(entries: Sequence[Entry]) -> bytes:
    # msgspec writes the same JSON as the stdlib, several times faster (every append runs this)
    return _frame(REC_ENTRIES, _json_encode([(e.term, e.index, e.kind, e.data) for e in entries]))


def _hard_record(hs: HardState) -> bytes:
    return _frame(REC_HARD, _json_encode((hs.term, hs.vote, hs.commit)))


def _decode_entries(body: bytes) -> list[Entry]:
    raw = _json_decode(body)
    if not isinstance(raw, list) or not raw:
        raise ValueError("empty entries record")
    out = []
    for item in raw:
        term, index, kind, data = item
        if type(term) is not int or type(index) is not int or term < 0 or index < 1 \
                or not isinstance(kind, str):
            raise ValueError(f"invalid entry {item[:3]!r}")
        if out and index != out[-1].index + 1:
            raise ValueError(f"entries not contiguous at index {index}")
        out.append(Entry(term, index, kind, data, len(_json_encode(data))))
    return out


def _decode_hard(body: bytes) -> HardState:
    term, vote, commit = json.loads(body)
    if type(term) is not int or type(commit) is not int or not isinstance(vote, str) \
            or term < 0 or commit < 0:
        raise ValueError("invalid hard state")
    return HardState(term, vote, commit)


class _Replay:
    """Rebuilds the log from its records in order, with etcd's WAL rule: a
    later entries record replaces every entry from its first index on."""

    def __init__(self, base: int, has_snapshot: bool) -> None:
        self.base = base                   # snapshot index: entries at or below are skipped
        self.has_snapshot = has_snapshot
        self.entries: list[Entry] = []     # entries[i].index == base + 1 + i
        self.hard = HardState()
        self.stored: HardState | None = None   # the last hard-state record read ...
        self.stored_in: int | None = None      # ... and its segment

    def apply(self, payload: bytes, segment: int) -> int:
        """Apply one record; return its highest entry index (0: none).  Raises
        _Bad for an unreadable record or a gap."""
        try:
            if payload[0] == REC_HARD:
                self.hard = self.stored = _decode_hard(payload[1:])
                self.stored_in = segment
                return 0
            if payload[0] != REC_ENTRIES:
                raise ValueError(f"unknown record type {payload[0]}")
            ents = _decode_entries(payload[1:])
        except (ValueError, TypeError) as e:
            raise _Bad(f"undecodable record: {e}") from None
        first, nxt = ents[0].index, self.base + len(self.entries) + 1
        if first > nxt:
            if not self.entries and not self.has_snapshot:
                raise _Bad(f"log starts at index {first} but there is no snapshot "
                           f"covering 1..{first - 1}")
            raise _Bad(f"gap: expected a record starting at index <= {nxt}, "
                       f"found {first}..{ents[-1].index}")
        del self.entries[max(0, first - self.base - 1):]
        self.entries.extend(e for e in ents if e.index > self.base)
        return ents[-1].index


# ---- file helpers ---------------------------------------------------------------------
def _private(path, flags: int) -> int:
    """``open`` opener: files of the data dir are the owner's only, whatever the umask."""
    return os.open(path, flags, 0o600)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unique(path: Path) -> Path:
    if not path.exists():
        return path
    n = 1
    while True:
        cand = path.with_name(f"{path.name}.{n}")
        if not cand.exists():
            return cand
        n += 1


def _frame_at(f, pos: int, size: int) -> bytes | None:
    """The payload of a complete record with a valid checksum at ``pos``, else None."""
    if pos + HDR_SIZE > size:
        return None
    f.seek(pos)
    hdr = f.read(HDR_SIZE)
    crc, ln = _HDR.unpack(hdr)
    if ln < 1 or ln > MAX_PAYLOAD or pos + HDR_SIZE + ln > size:
        return None
    payload = f.read(ln)
    return payload if zlib.crc32(payload, zlib.crc32(hdr[4:])) == crc else None


def _scan_segment(path: Path, start: int = len(LOG_MAGIC)):
    """Read the valid records of a segment from ``start`` on.

    Returns (records, bad, size): records are (offset, end, payload); bad is
    None or (offset, reason, torn, resume): torn means "looks like an
    interrupted write at the end" rather than damage with a valid record after
    it; resume is where valid framing continues after the bad record (or None).
    """
    recs: list[tuple[int, int, bytes]] = []
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if start == len(LOG_MAGIC):
            head = f.read(len(LOG_MAGIC))
            if head != LOG_MAGIC:
                if len(head) < len(LOG_MAGIC) and LOG_MAGIC.startswith(head):
                    return recs, (0, "incomplete segment header", True, None), size
                return recs, (0, "not a KVS log segment (bad magic)", False, None), size
        f.seek(start)
        off = start
        while off < size:
            hdr = f.read(HDR_SIZE)
            if len(hdr) < HDR_SIZE:
                return recs, (off, f"incomplete record header ({len(hdr)} of {HDR_SIZE} bytes)",
                              True, None), size
            crc, ln = _HDR.unpack(hdr)
            end = off + HDR_SIZE + ln
            if ln > MAX_PAYLOAD or end > size:
                return recs, (off, f"record of {ln} bytes runs past the end of the file",
                              True, None), size
            payload = f.read(ln)
            if zlib.crc32(payload, zlib.crc32(hdr[4:])) != crc:
                torn = _frame_at(f, end, size) is None
                return recs, (off, "checksum mismatch", torn, None if torn else end), size
            if ln < 1:
                return recs, (off, "empty record", False, end), size
            recs.append((off, end, payload))
            off = end
    return recs, None, size


def _last_hard_state(frames: Iterable[bytes]) -> HardState | None:
    hs = None
    for payload in frames:
        if payload[0] == REC_HARD:
            try:
                hs = _decode_hard(payload[1:])
            except (ValueError, TypeError):
                pass
    return hs


def _frames_after(path: Path, start: int) -> list[bytes]:
    """Payloads of the records walkable from ``start`` (until the first bad one)."""
    try:
        recs, _, _ = _scan_segment(path, start)
    except OSError:
        return []
    return [p for _, _, p in recs]


def _snapshot_header(path: Path) -> dict | None:
    """The header line of a snapshot file, or None if unreadable."""
    try:
        with open(path, "rb") as f:
            header = json.loads(f.readline(1 << 20))
    except (OSError, ValueError):
        return None
    return header if isinstance(header, dict) else None


def _read_snapshot(path: Path) -> SnapshotState:
    """Verify a snapshot file (footer + CRC over everything before it) and
    return its state with lazily read keys.  Raises _Bad."""
    m = _SNAP_RE.match(path.name)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        tail_len = min(size, 4096)
        f.seek(size - tail_len)
        tail = f.read(tail_len)
        if not tail.endswith(b"\n"):
            raise _Bad("no footer (file does not end with a newline)")
        i = tail.rfind(b"\n", 0, len(tail) - 1)
        if i < 0 and tail_len < size:
            raise _Bad("footer too long")
        footer_start = size - tail_len + i + 1
        try:
            footer = json.loads(tail[i + 1:])
        except ValueError as e:
            raise _Bad(f"unreadable footer: {e}") from None
        if not isinstance(footer, dict) or footer.get("end") is not True \
                or footer.get("bytes") != footer_start:
            raise _Bad("bad footer")
        f.seek(0)
        crc = 0
        left = footer_start
        while left:
            chunk = f.read(min(left, _SNAP_CHUNK))
            if not chunk:
                raise _Bad("file shorter than its footer says")
            crc = zlib.crc32(chunk, crc)
            left -= len(chunk)
        if crc != footer.get("crc32"):
            raise _Bad("checksum mismatch")
        f.seek(0)
        try:
            header = json.loads(f.readline())
        except ValueError as e:
            raise _Bad(f"unreadable header: {e}") from None
        start = f.tell()
    if not isinstance(header, dict) or header.get("format") != SNAP_FORMAT:
        raise _Bad("not a KVS snapshot")
    if header.get("version") != SNAP_VERSION:
        raise _Bad(f"unsupported snapshot version {header.get('version')!r}")
    if m is None or int(m.group(1)) != header["index"]:
        raise _Bad("file name does not match the snapshot's index")
    return SnapshotState(index=header["index"], term=header["term"],
                         keys=SnapshotKeys(path, start, int(footer["keys"])),
                         meta=header.get("meta") or {})


def _write_snapshot_file(state: SnapshotState, directory: Path, fsync: bool) -> Path:
    """Stream ``state`` to ``directory/snap-<index>.snap`` via tmp + fsync + rename."""
    final = directory / f"snap-{state.index:020d}.snap"
    tmp = final.with_name(final.name + ".tmp")
    header = {"format": SNAP_FORMAT, "version": SNAP_VERSION, "index": state.index,
              "term": state.term, "meta": state.meta}
    try:
        with open(tmp, "wb", buffering=0, opener=_private) as raw:
            crc = total = count = 0
            buf = [_ENC.encode(header).encode() + b"\n"]
            buffered = len(buf[0])

            def flush() -> None:
                nonlocal crc, total, buffered
                data = b"".join(buf)
                view = memoryview(data)
                while view:
                    view = view[raw.write(view):]
                crc = zlib.crc32(data, crc)
                total += len(data)
                buf.clear()
                buffered = 0

            for key, max_version, versions in state.keys:
                line = _ENC.encode([key, max_version, versions]).encode() + b"\n"
                buf.append(line)
                buffered += len(line)
                count += 1
                if buffered >= _SNAP_CHUNK:
                    flush()
            flush()
            raw.write(_ENC.encode({"end": True, "keys": count, "bytes": total,
                                   "crc32": crc}).encode() + b"\n")
            if fsync:
                os.fsync(raw.fileno())
        os.replace(tmp, final)
        if fsync:
            _fsync_dir(directory)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return final


class DataDir:
    """One node's data directory: Raft log + hard state + snapshots.

    Usage: ``dd = DataDir(path); rec = dd.load()`` (once, before any write),
    then per Raft Ready ``dd.append(ready.entries, ready.hard_state)`` and
    ``dd.sync()`` before sending the messages that depend on them.
    Any I/O error while writing makes the DataDir refuse further writes
    (raise PersistenceError): after a failed write or fsync the file contents
    are unknown, so the server must stop and recover from disk/peers.
    """

    def __init__(self, path: Path, fsync: bool = True, segment_bytes: int = SEGMENT_BYTES) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self.segment_bytes = segment_bytes
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.path, 0o700)   # a launcher may have made it with its umask
        fd = os.open(self.path / "LOCK", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            finally:
                os.close(fd)
            raise DataDirLocked(
                f"data directory {self.path} is already in use (locked by pid {holder}); "
                "two servers cannot share a data directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd: int | None = fd
        self._mu = threading.Lock()        # log state: active segment, counters
        self._snap_mu = threading.Lock()   # one snapshot/reset at a time
        self._loaded = False
        self._closed = False
        self._failed: BaseException | None = None
        self._segments: list[_Segment] = []
        self._active = None                # buffered file of self._segments[-1]
        self._active_bytes = 0
        self._max_number = 0
        self._last = 0                     # last stored entry index (or the snapshot's)
        self._snap_index = 0
        self._hard = HardState()           # last hard state appended
        self._unsynced_records = 0
        self._unsynced_bytes = 0

    # ---- introspection --------------------------------------------------------
    @property
    def last_index(self) -> int:
        return self._last

    @property
    def snapshot_index(self) -> int:
        return self._snap_index

    @property
    def hard_state(self) -> HardState:
        return self._hard

    @property
    def unsynced_records(self) -> int:
        return self._unsynced_records

    @property
    def unsynced_bytes(self) -> int:
        return self._unsynced_bytes

    def segment_names(self) -> list[str]:
        with self._mu:
            return [s.name for s in self._segments]

    # ---- recovery -------------------------------------------------------------
    def load(self) -> Recovered:
        """Read the newest valid snapshot and replay the log after it, repair the
        log (cut torn tails, quarantine what follows mid-log damage) and open it
        for appending."""
        with self._snap_mu, self._mu:
            self._check_usable()
            if self._loaded:
                raise RuntimeError("load() may be called only once")
            self._refuse_old_format()
            warnings: list[str] = []
            self._finish_reset(warnings)
            names = sorted(os.listdir(self.path))
            for name in names:
                if name.startswith("snap-") and name.endswith(".tmp"):
                    os.unlink(self.path / name)
                    warnings.append(f"removed unfinished snapshot {name} (crash while writing it)")
            snapshot = self._load_snapshot(names, warnings)
            entries, hard = self._load_log(names, snapshot, warnings)
            if self.fsync:
                _fsync_dir(self.path)
            self._loaded = True
            return Recovered(snapshot, entries, hard, warnings)

    def _refuse_old_format(self) -> None:
        """Before touching anything: a directory written by the pre-Raft format
        would be misread (its records are batches, not entries)."""
        for name in sorted(os.listdir(self.path)):
            old = None
            if _SEG_RE.match(name):
                with open(self.path / name, "rb") as f:
                    if f.read(len(LOG_MAGIC)) in OLD_MAGICS:
                        old = "log segment"
            elif _SNAP_RE.match(name):
                header = _snapshot_header(self.path / name)
                if header and header.get("format") == SNAP_FORMAT and \
                        header.get("version") != SNAP_VERSION:
                    old = f"snapshot version {header.get('version')!r}"
            if old:
                raise PersistenceError(
                    f"data directory {self.path} holds data in another format ({name}: {old}); "
                    f"this server reads only log format {LOG_MAGIC.strip().decode()} and snapshot "
                    f"version {SNAP_VERSION}. Move the directory away and start with an empty "
                    "one: the server then catches up from its peers.")

    def _finish_reset(self, warnings: list[str]) -> None:
        """Complete (or discard) a reset() that a crash interrupted."""
        staging = self.path / _STAGING
        if staging.exists():
            shutil.rmtree(staging)
            warnings.append("discarded an unfinished reset (crash before it took effect)")
        committed = self.path / _RESET
        if not committed.exists():
            return
        manifest = committed / _MANIFEST
        if manifest.exists():
            keep = set(json.loads(manifest.read_text(encoding="utf-8")))
            for name in os.listdir(self.path):
                if (_SEG_RE.match(name) or _SNAP_RE.match(name)) and name not in keep:
                    os.unlink(self.path / name)
            if self.fsync:
                _fsync_dir(self.path)
            for name in os.listdir(committed):
                if name != _MANIFEST:
                    os.replace(committed / name, self.path / name)
            if self.fsync:
                _fsync_dir(self.path)
            warnings.append("completed a reset that a crash interrupted")
        shutil.rmtree(committed)   # without a manifest it is empty: the manifest goes last
        if self.fsync:
            _fsync_dir(self.path)

    def _load_snapshot(self, names: list[str], warnings: list[str]) -> SnapshotState | None:
        snaps = sorted((n for n in names if _SNAP_RE.match(n)), reverse=True)
        chosen: SnapshotState | None = None
        for name in snaps:
            path = self.path / name
            if chosen is not None:          # older than a valid one: superseded
                os.unlink(path)
                continue
            try:
                chosen = _read_snapshot(path)
            except (_Bad, OSError, ValueError, KeyError, TypeError) as e:
                dest = self._quarantine(path)
                warnings.append(f"snapshot {name} is invalid ({e}); moved to "
                                f"{dest.relative_to(self.path)}")
        if chosen is not None:
            self._snap_index = chosen.index
        return chosen

    def _load_log(self, names: list[str], snapshot: SnapshotState | None,
                  warnings: list[str]) -> tuple[list[Entry], HardState]:
        base = snapshot.index if snapshot else 0
        numbers = sorted(int(m.group(1)) for n in names if (m := _SEG_RE.match(n)))
        self._max_number = numbers[-1] if numbers else 0
        replay = _Replay(base, snapshot is not None)
        for pos, number in enumerate(numbers):
            seg = _Segment(number)
            path = self.path / seg.name
            recs, bad, size = _scan_segment(path)
            for off, end, payload in recs:
                try:
                    seg.hi = max(seg.hi, replay.apply(payload, number))
                except _Bad as e:
                    bad = (off, str(e), False, end)
                    break
            last_segment = pos == len(numbers) - 1
            if bad is None:
                self._segments.append(seg)
                continue
            off, why, torn, resume = bad
            later = [_Segment(n).name for n in numbers[pos + 1:]]
            keep = off >= len(LOG_MAGIC) or (torn and last_segment)
            if torn and last_segment:
                if size > off:               # an empty new segment is not worth a warning
                    warnings.append(f"torn tail at offset {off} in {seg.name}: {size - off} "
                                    f"bytes cut off ({why})")
            else:
                # Term and vote are promises: take the newest readable hard state even
                # from the part set aside, so that a restart never votes twice in a term.
                frames = _frames_after(path, resume) if resume is not None else []
                for name in later:
                    frames += _frames_after(self.path / name, len(LOG_MAGIC))
                late = _last_hard_state(frames)
                if late is not None and late != replay.hard:
                    replay.hard = late
                    warnings.append(f"hard state {late} taken from a record after the damage")
                moved = self._set_aside(path, off if keep else None, later)
                warnings.append(
                    f"log corrupted at offset {off} in {seg.name} ({why}): {size - off} bytes "
                    f"and {len(later)} later segment(s) after it are not trusted; "
                    f"set aside in quarantine/ as {', '.join(moved) or 'nothing'}")
            if keep:
                with open(path, "r+b") as f:
                    if off < len(LOG_MAGIC):     # crash while creating the segment
                        f.truncate(0)
                        f.write(LOG_MAGIC)
                    else:
                        f.truncate(off)
                    f.flush()
                    if self.fsync:
                        os.fsync(f.fileno())
                self._segments.append(seg)
            break
        entries, hard = replay.entries, replay.hard
        last = base + len(entries)
        if hard.commit > last:
            warnings.append(f"commit index {hard.commit} lies beyond the recovered log "
                            f"(last index {last}); lowered to {last}")
            hard = HardState(hard.term, hard.vote, last)
        elif hard.commit < base:             # a snapshot only ever covers committed entries
            hard = HardState(hard.term, hard.vote, base)
        self._last = last
        self._hard = hard
        if self._segments:
            last_seg = self._segments[-1]
            self._active = open(self.path / last_seg.name, "ab", buffering=_WRITE_BUFFER,
                                opener=_private)
            self._active_bytes = self._active.tell()
            # Adopted from the damaged part, clamped, or only in an older segment
            # (the last one was torn before its first record): record it in the last.
            if hard != replay.stored or replay.stored_in != last_seg.number:
                self._active.write(_hard_record(hard))
                self._active_bytes = self._active.tell()
                self._sync_locked()
        else:
            self._new_segment()
        # Segments wholly covered by the snapshot (a crash came between the
        # snapshot's rename and their deletion): drop them, keep the newest.
        while len(self._segments) > 1 and self._segments[0].hi <= base:
            os.unlink(self.path / self._segments.pop(0).name)
        return entries, hard

    def _set_aside(self, path: Path, cut: int | None, later: list[str]) -> list[str]:
        """Move to quarantine/ the segment ``path`` (cut None) or a copy of its
        bytes from ``cut`` on (the caller truncates it), and the ``later`` ones."""
        moved = []
        if cut is None:
            moved.append(self._quarantine(path).name)
        elif cut < path.stat().st_size:
            dest = _unique(self._qdir() / f"{path.name}.from-{cut}")
            with open(path, "rb") as src, open(dest, "wb", opener=_private) as out:
                src.seek(cut)
                shutil.copyfileobj(src, out, _SNAP_CHUNK)
            moved.append(dest.name)
        for name in later:
            moved.append(self._quarantine(self.path / name).name)
        return moved

    def _qdir(self) -> Path:
        q = self.path / "quarantine"
        q.mkdir(mode=0o700, exist_ok=True)
        return q

    def _quarantine(self, path: Path) -> Path:
        dest = _unique(self._qdir() / path.name)
        os.replace(path, dest)
        return dest

    # ---- writing the log --------------------------------------------------------
    def _check_usable(self) -> None:
        if self._closed:
            raise PersistenceError("data directory is closed")
        if self._failed is not None:
            raise PersistenceError(f"data directory failed earlier: {self._failed!r}")

    def _check_writable(self) -> None:
        self._check_usable()
        if not self._loaded:
            raise RuntimeError("call load() before writing")

    def _new_segment(self, directory: Path | None = None) -> None:
        """Create the next segment, starting with the current hard state, durably
        (its name must survive a crash before records in it are relied on)."""
        self._max_number += 1
        seg = _Segment(self._max_number)
        f = open((directory or self.path) / seg.name, "xb", buffering=_WRITE_BUFFER,
                 opener=_private)
        f.write(LOG_MAGIC)
        f.write(_hard_record(self._hard))
        f.flush()
        if self.fsync:
            os.fsync(f.fileno())
            _fsync_dir(directory or self.path)
        self._segments.append(seg)
        self._active = f
        self._active_bytes = f.tell()

    def _rotate_locked(self) -> None:
        try:
            self._sync_locked()
            self._active.close()
            self._active = None
            self._new_segment()
        except BaseException as e:
            self._failed = e
            raise PersistenceError(f"log rotation failed: {e}") from e

    def append(self, entries: Sequence[Entry], hard_state: HardState | None = None) -> None:
        """Buffer ``entries`` and/or ``hard_state`` (no fsync: call sync()).

        ``entries`` must be contiguous; the first may be at or below the last
        stored index: the stored suffix from there is replaced (never committed
        entries, never entries the snapshot covers)."""
        data = b""
        if entries:
            first = entries[0].index
            for i, e in enumerate(entries):
                if e.index != first + i:
                    raise ValueError(f"entries not contiguous: index {e.index} at position {i} "
                                     f"after {first}")
            data = _entries_record(entries)      # encoded outside the lock
        if hard_state is not None:
            data += _hard_record(hard_state)
        if not data:
            return
        with self._mu:
            self._check_writable()
            if entries:
                if not self._snap_index < first <= self._last + 1:
                    raise ValueError(f"append at index {first} does not continue the log "
                                     f"(snapshot {self._snap_index}, last {self._last})")
                if first <= self._hard.commit:
                    raise ValueError(f"append at index {first} would replace committed entries "
                                     f"(commit {self._hard.commit})")
            if self._active_bytes >= self.segment_bytes:
                self._rotate_locked()
            try:
                self._active.write(data)
            except BaseException as e:
                self._failed = e
                raise PersistenceError(f"log write failed: {e}") from e
            if entries:
                seg = self._segments[-1]
                seg.hi = max(seg.hi, entries[-1].index)
                self._last = entries[-1].index
            if hard_state is not None:
                self._hard = hard_state
            self._active_bytes += len(data)
            self._unsynced_records += bool(entries) + (hard_state is not None)
            self._unsynced_bytes += len(data)

    def _sync_locked(self) -> None:
        try:
            self._active.flush()
            if self.fsync:
                os.fdatasync(self._active.fileno())
        except BaseException as e:
            # After a failed fsync the kernel may have dropped the dirty pages:
            # retrying could "succeed" without the data (fsyncgate) -> fail-stop.
            self._failed = e
            raise PersistenceError(f"log sync failed: {e}") from e
        self._unsynced_records = 0
        self._unsynced_bytes = 0

    def sync(self) -> None:
        """Group-commit point: flush and fdatasync everything appended so far.
        Cheap no-op when nothing was appended since the last sync."""
        with self._mu:
            self._check_writable()
            if self._unsynced_records:
                self._sync_locked()

    # ---- snapshots ------------------------------------------------------------------
    def write_snapshot(self, state: SnapshotState) -> None:
        """Durably write a snapshot of the store at ``state.index`` (committed,
        so never truncated later), then delete older snapshots and the log
        segments wholly at or below it.

        The log is rotated first, so appends may go on (from another thread, or
        from inside ``state.keys``) while the snapshot streams.  ``state.keys``
        must be a consistent view of the store at ``state.index``."""
        with self._snap_mu:
            with self._mu:
                self._check_writable()
                if not self._snap_index <= state.index <= self._last:
                    raise ValueError(f"snapshot at {state.index} outside the log "
                                     f"({self._snap_index}..{self._last}); use reset()")
                if state.index > self._hard.commit:
                    raise ValueError(f"snapshot at {state.index} beyond the commit index "
                                     f"{self._hard.commit}")
                if self._segments[-1].hi:
                    self._rotate_locked()
                boundary = self._segments[-1].number
            _write_snapshot_file(state, self.path, self.fsync)
            with self._mu:
                self._snap_index = max(self._snap_index, state.index)
                while self._segments[0].number < boundary and self._segments[0].hi <= state.index:
                    os.unlink(self.path / self._segments.pop(0).name)
            self._delete_snapshots(lambda index: index < state.index)

    def reset(self, state: SnapshotState, hard_state: HardState) -> None:
        """Replace everything by ``state`` + ``hard_state`` (after a state
        transfer); the log continues after ``state.index``.

        Atomic: the new snapshot and segment are prepared in reset-staging/,
        which a rename commits as reset/; only then are the old files replaced.
        A crash before the rename leaves the old state, after it load() finishes
        the job: never a mixture of histories, never a lost vote."""
        if hard_state.commit > state.index:
            raise ValueError(f"commit {hard_state.commit} beyond the snapshot at {state.index}")
        with self._snap_mu, self._mu:
            self._check_writable()
            staging, committed = self.path / _STAGING, self.path / _RESET
            try:
                self._sync_locked()
                self._active.close()
                self._active = None
                if staging.exists():
                    shutil.rmtree(staging)
                staging.mkdir(mode=0o700)
                snap = _write_snapshot_file(state, staging, self.fsync)
                self._segments = []
                self._hard = hard_state
                self._new_segment(staging)
                self._active.close()
                names = [snap.name, self._segments[0].name]
                (staging / _MANIFEST).write_text(json.dumps(names), encoding="utf-8")
                if self.fsync:
                    with open(staging / _MANIFEST, "rb") as f:
                        os.fsync(f.fileno())
                    _fsync_dir(staging)
                os.replace(staging, committed)        # the commit point
                if self.fsync:
                    _fsync_dir(self.path)
                self._finish_reset([])
                self._active = open(self.path / names[1], "ab", buffering=_WRITE_BUFFER,
                                    opener=_private)
                self._active_bytes = self._active.tell()
            except BaseException as e:
                self._failed = e
                raise PersistenceError(f"reset failed: {e}") from e
            self._snap_index = self._last = state.index
            self._unsynced_records = self._unsynced_bytes = 0

    def _delete_snapshots(self, which) -> None:
        for name in os.listdir(self.path):
            m = _SNAP_RE.match(name)
            if m and which(int(m.group(1))):
                os.unlink(self.path / name)
        if self.fsync:
            _fsync_dir(self.path)

    # ---- small metadata files ---------------------------------------------------------
    def save_meta(self, name: str, value) -> None:
        """Atomically replace ``meta-<name>.json`` (tmp file, fsync, rename)."""
        final = self.path / f"meta-{name}.json"
        tmp = final.with_suffix(".json.tmp")
        with open(tmp, "w", encoding="utf-8", opener=_private) as f:
            json.dump(value, f)
            f.flush()
            if self.fsync:
                os.fsync(f.fileno())
        os.replace(tmp, final)
        if self.fsync:
            _fsync_dir(self.path)

    def load_meta(self, name: str):
        """The value saved under ``name``, or None (missing or unreadable)."""
        try:
            return json.loads((self.path / f"meta-{name}.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    # ---- shutdown ---------------------------------------------------------------------
    def close(self) -> None:
        """Sync what was appended, close the log and release the lock (idempotent).
        Waits for a snapshot being written on another thread to finish first, so
        the directory is never released half-way through one."""
        with self._snap_mu, self._mu:
            if self._closed:
                return
            self._closed = True
            try:
                if self._active is not None and self._failed is None and self._unsynced_records:
                    self._sync_locked()
            finally:
                if self._active is not None:
                    try:
                        self._active.close()
                    except OSError:
                        pass
                    self._active = None
                if self._lock_fd is not None:
                    os.close(self._lock_fd)   # releases the flock
                    self._lock_fd = None

    def __enter__(self) -> "DataDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
