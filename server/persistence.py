"""Durable storage for one KVS server: a checksummed, segmented write-ahead log
of replicated batches plus periodic snapshots of the whole store.

Pure file I/O: no threads are started here, no MQTT, no gRPC.  The methods are
guarded by a mutex so that ``write_snapshot`` may run on another thread while
the applier keeps calling ``append``/``sync`` (the snapshot is streamed without
holding that mutex).

Data directory layout (see docs/persistence.md)::

    LOCK                          flock(LOCK_EX) held while a DataDir is open; holds the pid
    snap-<seq:020d>.snap          newest snapshot (store state after log position seq)
    snap-<seq:020d>.snap.tmp      snapshot being written (removed on load if a crash left it)
    log-<index:010d>.wal          log segments, name order == log order
    quarantine/                   bytes/segments set aside after mid-log corruption or a gap

Log segment = 8-byte magic ``KVSWAL1\\n`` then records, each::

    crc32 u32 | length u32 | first_seq u64 | last_seq u64 | payload (length bytes)

little-endian; crc32 = zlib.crc32 over ``length|first_seq|last_seq|payload``.

Snapshot = JSON lines: a header object, one ``[key, max_version, [[number,
value, seq, written_at, node], ...]]`` array per key, and a footer object
``{"end": true, "keys": N, "bytes": B, "crc32": C}`` whose CRC covers the B
bytes before it.  Written to ``.tmp``, fsynced, renamed, directory fsynced.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import struct
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from .store import Version

__all__ = [
    "DataDir", "DataDirLocked", "PersistenceError", "Recovered", "SnapshotKeys",
    "SnapshotState", "FIRST_SEQ",
]

FIRST_SEQ = 1                      # the log's first position; 0 means "nothing applied"
LOG_MAGIC = b"KVSWAL1\n"
SNAP_FORMAT = "kvs-snapshot"
SNAP_VERSION = 1
MAX_PAYLOAD = 1 << 30              # a length field above this is corruption
_CRC = struct.Struct("<I")
_TAIL = struct.Struct("<IQQ")      # length, first_seq, last_seq (covered by the CRC)
_HDR = struct.Struct("<IIQQ")      # crc, length, first_seq, last_seq
HDR_SIZE = _HDR.size               # 24
_SEG_RE = re.compile(r"^log-(\d{10})\.wal$")
_SNAP_RE = re.compile(r"^snap-(\d{20})\.snap$")
_WRITE_BUFFER = 256 * 1024
_SNAP_CHUNK = 1 << 20
_ENC = json.JSONEncoder(separators=(",", ":"), check_circular=False)
_SEQ_MAX = 2**63 - 1


class PersistenceError(Exception):
    """Storage failed; the DataDir refuses further writes (fail-stop)."""


class DataDirLocked(PersistenceError):
    """Another DataDir (in this or another process) holds the directory."""


@dataclass
class SnapshotState:
    seq: int            # last log position included
    epoch: int
    chain_hash: str
    keys: Iterable[tuple[str, int, list[Version]]]   # as VersionedStore.dump() yields
    meta: dict = field(default_factory=dict)          # free-form, JSON-able


@dataclass
class Recovered:
    snapshot: SnapshotState | None
    batches: list[tuple[int, int, bytes]]   # (first_seq, last_seq, payload) after the snapshot
    warnings: list[str]

    @property
    def last_seq(self) -> int:
        """Last log position the recovered state covers (0: nothing)."""
        if self.batches:
            return self.batches[-1][1]
        return self.snapshot.seq if self.snapshot else 0


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
    index: int
    first: int | None = None   # first/last seq of the records it holds
    last: int | None = None

    @property
    def name(self) -> str:
        return f"log-{self.index:010d}.wal"


class _Bad(Exception):
    pass


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


def _record_ok_at(f, pos: int, size: int) -> bool:
    """Is there a complete record with a valid checksum at ``pos``?"""
    if pos + HDR_SIZE > size:
        return False
    f.seek(pos)
    hdr = f.read(HDR_SIZE)
    crc, ln, first, last = _HDR.unpack(hdr)
    if ln > MAX_PAYLOAD or pos + HDR_SIZE + ln > size or last < first:
        return False
    return zlib.crc32(f.read(ln), zlib.crc32(hdr[4:])) == crc


def _scan_segment(path: Path):
    """Read every valid record of a segment.

    Returns (records, bad, size): records are (offset, first, last, payload);
    bad is None or (offset, reason, torn) where torn means "looks like an
    interrupted write at the end" rather than damage with valid data after it.
    """
    recs: list[tuple[int, int, int, bytes]] = []
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(len(LOG_MAGIC))
        if head != LOG_MAGIC:
            if len(head) < len(LOG_MAGIC) and LOG_MAGIC.startswith(head):
                return recs, (0, "incomplete segment header", True), size
            return recs, (0, "not a KVS log segment (bad magic)", False), size
        off = len(LOG_MAGIC)
        while off < size:
            hdr = f.read(HDR_SIZE)
            if len(hdr) < HDR_SIZE:
                return recs, (off, f"incomplete record header ({len(hdr)} of {HDR_SIZE} bytes)",
                              True), size
            crc, ln, first, last = _HDR.unpack(hdr)
            end = off + HDR_SIZE + ln
            if ln > MAX_PAYLOAD or end > size:
                return recs, (off, f"record of {ln} bytes runs past the end of the file", True), size
            payload = f.read(ln)
            if zlib.crc32(payload, zlib.crc32(hdr[4:])) != crc:
                torn = not _record_ok_at(f, end, size)
                return recs, (off, "checksum mismatch", torn), size
            if last < first:
                return recs, (off, f"invalid seq range {first}..{last}", False), size
            recs.append((off, first, last, payload))
            off = end
    return recs, None, size


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
    if m is None or int(m.group(1)) != header["seq"]:
        raise _Bad("file name does not match the snapshot's seq")
    return SnapshotState(seq=header["seq"], epoch=header["epoch"],
                         chain_hash=header["chain_hash"],
                         keys=SnapshotKeys(path, start, int(footer["keys"])),
                         meta=header.get("meta") or {})


class DataDir:
    """One server's data directory: write-ahead log + snapshots.

    Usage: ``dd = DataDir(path); rec = dd.load()`` (required once before any
    write), then for each applied batch ``dd.append(first, last, payload)``
    and, at a group-commit point, ``dd.sync()`` before acknowledging.
    Any I/O error while writing makes the DataDir refuse further writes
    (raise PersistenceError): after a failed write or fsync the file contents
    are unknown, so the server must stop and recover from disk/peers.
    """

    def __init__(self, path: Path, fsync: bool = True) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
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
        self._snap_mu = threading.Lock()   # one snapshot at a time
        self._loaded = False
        self._closed = False
        self._failed: BaseException | None = None
        self._segments: list[_Segment] = []
        self._active = None                # buffered file of self._segments[-1]
        self._max_index = 0
        self._next_seq: int | None = None
        self._snap_seq: int | None = None
        self._unsynced_records = 0
        self._unsynced_bytes = 0

    # ---- introspection --------------------------------------------------------
    @property
    def next_seq(self) -> int | None:
        """The first_seq the next append must have (None: not known yet)."""
        return self._next_seq

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
        """Read the newest valid snapshot and every valid log record after it,
        repair the log (cut torn/corrupt tails) and open it for appending."""
        with self._snap_mu, self._mu:
            self._check_usable()
            if self._loaded:
                raise RuntimeError("load() may be called only once")
            warnings: list[str] = []
            names = sorted(os.listdir(self.path))
            for name in names:
                if name.startswith("snap-") and name.endswith(".tmp"):
                    os.unlink(self.path / name)
                    warnings.append(f"removed unfinished snapshot {name} (crash while writing it)")
            snapshot = self._load_snapshot(names, warnings)
            batches = self._load_log(names, snapshot, warnings)
            if self.fsync:
                _fsync_dir(self.path)
            self._loaded = True
            return Recovered(snapshot, batches, warnings)

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
                warnings.append(f"snapshot {name} is invalid ({e}); moved to {dest.relative_to(self.path)}")
        if chosen is not None:
            self._snap_seq = chosen.seq
        return chosen

    def _load_log(self, names: list[str], snapshot: SnapshotState | None,
                  warnings: list[str]) -> list[tuple[int, int, bytes]]:
        snap_seq = snapshot.seq if snapshot else None
        expected = snap_seq + 1 if snap_seq is not None else FIRST_SEQ
        indexes = sorted(int(m.group(1)) for n in names if (m := _SEG_RE.match(n)))
        self._max_index = indexes[-1] if indexes else 0
        batches: list[tuple[int, int, bytes]] = []
        for pos, index in enumerate(indexes):
            seg = _Segment(index)
            path = self.path / seg.name
            recs, bad, size = _scan_segment(path)
            for off, first, last, payload in recs:
                if first == expected:
                    batches.append((first, last, payload))
                    expected = last + 1
                elif snap_seq is not None and not batches and last <= snap_seq:
                    pass                      # already in the snapshot
                else:
                    if snap_seq is None and not batches:
                        why = (f"log starts at seq {first} but there is no snapshot covering "
                               f"{FIRST_SEQ}..{first - 1}")
                    else:
                        why = f"gap: expected a record starting at seq {expected}, found {first}..{last}"
                    bad = (off, why, False)
                    break
                if seg.first is None:
                    seg.first = first
                seg.last = last
            last_segment = pos == len(indexes) - 1
            if bad is None:
                self._segments.append(seg)
                continue
            off, why, torn = bad
            later = [_Segment(i).name for i in indexes[pos + 1:]]
            keep = off >= len(LOG_MAGIC) or (torn and last_segment)
            if torn and last_segment:
                if size > off:               # an empty new segment is not worth a warning
                    warnings.append(f"torn tail at offset {off} in {seg.name}: {size - off} "
                                    f"bytes cut off ({why})")
            else:
                moved = []
                if not keep:
                    moved.append(self._quarantine(path).name)
                elif off < size:
                    dest = _unique(self._qdir() / f"{seg.name}.from-{off}")
                    with open(path, "rb") as src, open(dest, "wb") as out:
                        src.seek(off)
                        while chunk := src.read(_SNAP_CHUNK):
                            out.write(chunk)
                    moved.append(dest.name)
                for name in later:
                    moved.append(self._quarantine(self.path / name).name)
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
        # Segments wholly covered by the snapshot (a crash came between the
        # snapshot's rename and their deletion): drop them, keep the newest.
        while len(self._segments) > 1 and snap_seq is not None and \
                (self._segments[0].last is None or self._segments[0].last <= snap_seq):
            os.unlink(self.path / self._segments.pop(0).name)
        if self._segments:
            self._active = open(self.path / self._segments[-1].name, "ab", buffering=_WRITE_BUFFER)
        else:
            self._new_segment()
        self._next_seq = expected
        return batches

    def _qdir(self) -> Path:
        q = self.path / "quarantine"
        q.mkdir(exist_ok=True)
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

    def _new_segment(self) -> None:
        self._max_index += 1
        seg = _Segment(self._max_index)
        f = open(self.path / seg.name, "xb", buffering=_WRITE_BUFFER)
        f.write(LOG_MAGIC)
        f.flush()
        if self.fsync:
            os.fsync(f.fileno())
            _fsync_dir(self.path)   # the new name must survive a crash before its records are acked
        self._segments.append(seg)
        self._active = f

    def append(self, first_seq: int, last_seq: int, payload: bytes) -> None:
        """Buffer one batch record (no fsync; call sync() before acknowledging).
        first_seq must be the position right after the last one appended (or
        after the snapshot; FIRST_SEQ on an empty directory)."""
        if not 0 <= first_seq <= last_seq <= _SEQ_MAX:
            raise ValueError(f"invalid seq range {first_seq}..{last_seq}")
        n = len(payload)
        if n > MAX_PAYLOAD:
            raise ValueError(f"payload of {n} bytes exceeds {MAX_PAYLOAD}")
        tail = _TAIL.pack(n, first_seq, last_seq)
        header = _CRC.pack(zlib.crc32(payload, zlib.crc32(tail))) + tail
        with self._mu:
            self._check_writable()
            if first_seq != self._next_seq:
                raise ValueError(f"append of {first_seq}..{last_seq} is not contiguous: "
                                 f"the log expects seq {self._next_seq} next")
            try:
                self._active.write(header)
                self._active.write(payload)
            except BaseException as e:
                self._failed = e
                raise PersistenceError(f"log write failed: {e}") from e
            seg = self._segments[-1]
            if seg.first is None:
                seg.first = first_seq
            seg.last = last_seq
            self._next_seq = last_seq + 1
            self._unsynced_records += 1
            self._unsynced_bytes += HDR_SIZE + n

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
    def _write_snapshot_file(self, state: SnapshotState) -> Path:
        final = self.path / f"snap-{state.seq:020d}.snap"
        tmp = final.with_name(final.name + ".tmp")
        header = {"format": SNAP_FORMAT, "version": SNAP_VERSION, "seq": state.seq,
                  "epoch": state.epoch, "chain_hash": state.chain_hash, "meta": state.meta}
        try:
            with open(tmp, "wb", buffering=0) as raw:
                crc = 0
                total = 0
                count = 0
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
                if self.fsync:
                    os.fsync(raw.fileno())
            os.replace(tmp, final)
            if self.fsync:
                _fsync_dir(self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return final

    def write_snapshot(self, state: SnapshotState) -> None:
        """Durably write a snapshot of the store at log position ``state.seq``,
        then delete older snapshots and the log segments it fully covers.

        The log is rotated first, so appends may go on (from another thread, or
        from inside ``state.keys``) while the snapshot streams; records after
        ``state.seq`` are kept.  ``state.keys`` must be a consistent view of
        the store at ``state.seq`` (e.g. a copy taken by the applier)."""
        if state.seq < 0:
            raise ValueError("snapshot seq must be >= 0")
        with self._snap_mu:
            with self._mu:
                self._check_writable()
                if self._segments[-1].last is not None:
                    self._sync_locked()
                    self._active.close()
                    self._active = None
                    try:
                        self._new_segment()
                    except BaseException as e:
                        self._failed = e
                        raise PersistenceError(f"log rotation failed: {e}") from e
                boundary = self._segments[-1].index
            self._write_snapshot_file(state)
            with self._mu:
                self._snap_seq = state.seq
                if self._next_seq is None or self._next_seq <= state.seq:
                    self._next_seq = state.seq + 1
                while self._segments[0].index < boundary and (
                        self._segments[0].last is None or self._segments[0].last <= state.seq):
                    os.unlink(self.path / self._segments.pop(0).name)
            self._delete_snapshots(lambda seq: seq < state.seq)

    def reset(self, state: SnapshotState) -> None:
        """Replace everything with ``state`` (after a full state transfer):
        delete all snapshots and log segments, write this snapshot, start an
        empty log continuing at ``state.seq + 1``.  A crash in the middle
        leaves an empty or snapshot-only directory, never a mix."""
        if state.seq < 0:
            raise ValueError("snapshot seq must be >= 0")
        with self._snap_mu, self._mu:
            self._check_writable()
            try:
                self._active.close()
                self._active = None
                for seg in self._segments:
                    os.unlink(self.path / seg.name)
                self._segments = []
                self._delete_snapshots(lambda seq: True)   # fsyncs the dir
                self._unsynced_records = self._unsynced_bytes = 0
                self._write_snapshot_file(state)
                self._new_segment()
            except BaseException as e:
                self._failed = e
                raise PersistenceError(f"reset failed: {e}") from e
            self._snap_seq = state.seq
            self._next_seq = state.seq + 1

    def _delete_snapshots(self, which) -> None:
        for name in os.listdir(self.path):
            m = _SNAP_RE.match(name)
            if m and which(int(m.group(1))):
                os.unlink(self.path / name)
        if self.fsync:
            _fsync_dir(self.path)

    # ---- small metadata files (e.g. the servers this one has seen) ---------------------
    def save_meta(self, name: str, value) -> None:
        """Atomically replace ``meta-<name>.json`` (tmp file, fsync, rename)."""
        final = self.path / f"meta-{name}.json"
        tmp = final.with_suffix(".json.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
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
