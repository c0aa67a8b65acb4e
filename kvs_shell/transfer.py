"""Export a prefix of the store to a JSON Lines file, and import such a file.

File format (UTF-8, one JSON object per line)::

    {"kvs_export": 1, "position": P, "prefix": "...", "exported_at": "2024-...+00:00"}
    {"key": K, "version": V, "value": "...", "written_at": 1.7e9, "node": "node-1", "position": S}
    ...

one line per *live* version, keys in sorted (code point) order, a key's versions
ascending, all as of log position ``P``.  ``written_at``/``node``/``position`` (the
position that wrote the version) are information only: an import writes new versions.

Import goes through ``InsereVarias`` / ``RemoveVarias`` in batches of consecutive file
lines.  Running the same import again -- after a failure, or by mistake -- applies nothing
twice: first, batches whose every version is on the target already (same number, same
value) are skipped, up to the first batch that is not; then each batch carries a request
id derived from its content and number, and the servers answer a known id with its first
outcome (they remember the last ``KEEP_IDS`` (100,000) change ids of the whole cluster;
and only with the same ``batch`` size, which decides where batches start).

Version numbers are kept on a key that is fresh on the target: a gap in the file (a
removed, or retention-dropped, version) is filled with a placeholder value that is
removed right after its batch, by that exact version.  A key that already has versions
on the target gets the file's versions appended, which is reported as *renumbered*.
Filling is capped at ``MAX_FILL`` placeholders per key (a key whose first live version
is 50,000 would otherwise cost 50,000 writes): from the first gap over the cap on, the
key's versions are renumbered, and the key is listed in ``ImportSummary.unfilled``.
Removed versions *after* a key's last live version are not in the file, so the next
insert on the target continues after the last live version.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Callable, Iterator

from .client import LINEARIZABLE, ClientError

FORMAT = 1
MAX_FILL = 1000            # placeholders written per key, at most
DEFAULT_BATCH = 500        # file lines per batch
BATCH_BYTES = 2 * 1024 * 1024  # ...or fewer, once their values reach this size
PLACEHOLDER = "(kvs import: placeholder for a missing version)"
KEEP_IDS = 100_000         # change ids the servers remember (server/applier.py)
REPORT_KEYS = 20           # keys listed by name in a summary
MIN_TEXT = 3               # keys and values: at least 3 code points (SPEC §2)

Progress = Callable[[int, "int | None"], None]


class BadExportFile(ClientError, ValueError):
    """The file is not a valid export; ``line`` is its 1-based line number."""

    def __init__(self, message: str, line: int = 0):
        super().__init__(f"line {line}: {message}" if line else message)
        self.line = line


class ImportFailed(ClientError):
    """The server refused part of an import; ``summary`` says how far it got."""

    def __init__(self, message: str, summary: "ImportSummary"):
        super().__init__(message)
        self.summary = summary


@dataclass
class ExportSummary:
    path: str
    position: int
    prefix: str
    keys: int = 0
    versions: int = 0
    bytes: int = 0             # of UTF-8 written


@dataclass
class ImportSummary:
    path: str
    position: int = 0          # the export's position (from the header)
    prefix: str = ""
    keys: int = 0              # keys with at least one version imported
    versions: int = 0          # file lines (live versions) imported
    total: int = 0             # version lines in the file
    batches: int = 0
    placeholders: int = 0      # gaps filled and removed again
    renumbered: int = 0        # keys whose versions came out different from the file's
    renumbered_keys: list[str] = field(default_factory=list)  # the first REPORT_KEYS
    unfilled: int = 0          # keys whose gaps went over MAX_FILL (renumbered, not filled)
    unfilled_keys: list[str] = field(default_factory=list)
    line: int = 0              # last file line fully imported
    complete: bool = False
    skipped: int = 0           # versions found on the target already (a rerun): not written


# ---------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------
def _header(position: int, prefix: str) -> dict:
    return {"kvs_export": FORMAT, "position": position, "prefix": prefix,
            "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _dump(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n"


def write_export(out: IO[str], items, prefix: str = "", position: Callable[[], int | None] = None,
                 progress: Progress | None = None, summary: ExportSummary | None = None
                 ) -> ExportSummary:
    """Writes ``items`` -- ``(position, ExportedKey)`` as :meth:`Client.export` yields --
    to ``out``.  ``position()`` gives the export's position when no item came."""
    summary = summary or ExportSummary("", 0, prefix)

    def emit(obj: dict) -> None:
        text = _dump(obj)
        out.write(text)
        summary.bytes += len(text.encode("utf-8"))

    wrote_header = False
    last_key = None
    for pos, key in items:
        if not wrote_header:
            summary.position = pos
            emit(_header(pos, prefix))
            wrote_header = True
        for v in key.versions:
            emit({"key": key.key, "version": v.version, "value": v.value,
                  "written_at": v.written_at, "node": v.node, "position": v.seq})
            summary.versions += 1
        if key.key != last_key:   # a key with many versions may span two chunks
            summary.keys += 1
            last_key = key.key
        if progress is not None:
            progress(summary.keys, None)
    if not wrote_header:
        summary.position = (position() if position else None) or 0
        emit(_header(summary.position, prefix))
    return summary


def export_to(client, path_or_file, prefix: str = "", progress: Progress | None = None
              ) -> ExportSummary:
    """Exports every live version of the keys starting with ``prefix`` (one consistent
    position) to a path or an open text file.  A path is written to a temporary file
    (mode 0600) in the same directory, renamed over ``path`` only when complete.
    ``progress(keys_done, None)`` after each key (the total is not known up front).
    The export is a linearizable read whatever the client's level: a backup holds every
    write acknowledged before it started, whichever server answers it."""
    handle = client.export(prefix, consistency=LINEARIZABLE)
    if hasattr(path_or_file, "write"):
        summary = ExportSummary(getattr(path_or_file, "name", "") or "", 0, prefix)
        return write_export(path_or_file, handle, prefix, lambda: handle.position, progress,
                            summary)
    path = Path(path_or_file)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent or ".")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as out:
            summary = write_export(out, handle, prefix, lambda: handle.position, progress,
                                   ExportSummary(str(path), 0, prefix))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        handle.cancel()
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return summary


# ---------------------------------------------------------------------------
# reading and validating
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Record:
    """One version line of an export."""
    line: int
    key: str
    version: int
    value: str
    raw: str  # the line as read (without the newline): what a batch's id is made of


def _int(obj: dict, name: str, line: int, minimum: int, required: bool = True) -> int:
    v = obj.get(name)
    if v is None and not required:
        return minimum
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise BadExportFile(f"{name!r} must be an integer >= {minimum}, not {v!r:.60}", line)
    return v


def _text(obj: dict, name: str, line: int) -> str:
    v = obj.get(name)
    if not isinstance(v, str) or len(v) < MIN_TEXT:
        raise BadExportFile(f"{name!r} must be text of at least {MIN_TEXT} characters,"
                            f" not {v!r:.60}", line)
    return v


def _object(text: str, line: int) -> dict:
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise BadExportFile(f"not JSON ({exc})", line) from None
    if not isinstance(obj, dict):
        raise BadExportFile("not a JSON object", line)
    return obj


def read_export(lines) -> tuple[dict, Iterator[Record]]:
    """``(header, records)`` from an iterable of lines, checked as they are read:
    :class:`BadExportFile` names the first bad line.  Memory stays flat (keys must come
    in sorted order, as export writes them, so order is checked line against line)."""
    it = iter(lines)
    first = next(it, None)
    if first is None:
        raise BadExportFile("empty file: no kvs_export header", 1)
    header = _object(first, 1)
    if header.get("kvs_export") != FORMAT:
        raise BadExportFile(f"not a KVS export (format {FORMAT}): the first line needs "
                            f'"kvs_export": {FORMAT}', 1)
    _int(header, "position", 1, 0)
    prefix = header.get("prefix", "")
    if not isinstance(prefix, str):
        raise BadExportFile("'prefix' must be text", 1)

    def records() -> Iterator[Record]:
        prev_key, prev_version = None, 0
        for n, text in enumerate(it, start=2):
            raw = text.rstrip("\r\n")
            if not raw.strip():
                raise BadExportFile("empty line", n)
            obj = _object(raw, n)
            key = _text(obj, "key", n)
            version = _int(obj, "version", n, 1)
            value = _text(obj, "value", n)
            _int(obj, "position", n, 0, required=False)
            if not isinstance(obj.get("written_at", 0), (int, float)) or \
                    isinstance(obj.get("written_at"), bool):
                raise BadExportFile("'written_at' must be a number", n)
            if not isinstance(obj.get("node", ""), str):
                raise BadExportFile("'node' must be text", n)
            if not key.startswith(prefix):
                raise BadExportFile(f"key {key!r:.60} is outside the export's prefix"
                                    f" {prefix!r}", n)
            if prev_key is not None and (key < prev_key or
                                         (key == prev_key and version <= prev_version)):
                raise BadExportFile(f"{key!r:.60} version {version} is out of order (after"
                                    f" {prev_key!r:.60} version {prev_version}); keys must be"
                                    " sorted and a key's versions ascending", n)
            prev_key, prev_version = key, version
            yield Record(n, key, version, value, raw)

    return header, records()


# ---------------------------------------------------------------------------
# import plan: pure, deterministic from the file content
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Put:
    key: str
    value: str
    version: int  # the version it should get on a fresh key
    record: Record | None  # None: a placeholder


@dataclass
class Batch:
    number: int
    records: list[Record]
    puts: list[Put]

    @property
    def request_id(self) -> str:
        """Idempotency key of the batch's inserts: same lines, same number -> same id."""
        h = hashlib.sha256(f"kvs-import/{FORMAT}/{self.number}\n".encode())
        for r in self.records:
            h.update(r.raw.encode("utf-8"))
            h.update(b"\n")
        return "imp-" + h.hexdigest()[:48]

    @property
    def remove_id(self) -> str:
        """Idempotency key of the removal of the batch's placeholders."""
        return "imr-" + hashlib.sha256(self.request_id.encode()).hexdigest()[:48]


class Planner:
    """Turns records into batches of puts, placeholders filling the gaps of a key.

    Only the file decides the plan (never the target's state), so that a rerun sends the
    same changes under the same ids."""

    def __init__(self, batch: int = DEFAULT_BATCH, batch_bytes: int = BATCH_BYTES,
                 max_fill: int = MAX_FILL):
        if batch < 1:
            raise ValueError("batch must be >= 1")
        self.batch = batch
        self.batch_bytes = batch_bytes
        self.max_fill = max_fill
        self._key: str | None = None
        self._last = 0       # the key's version the plan has reached
        self._filled = 0     # placeholders planned for the key
        self._renumber = False  # the key went over max_fill: no more filling
        self.unfilled: list[str] = []
        self.unfilled_count = 0

    def _plan(self, r: Record) -> list[Put]:
        if r.key != self._key:
            self._key, self._last, self._filled, self._renumber = r.key, 0, 0, False
        gap = r.version - self._last - 1
        puts: list[Put] = []
        if gap > 0 and not self._renumber:
            if self._filled + gap > self.max_fill:
                self._renumber = True
                self.unfilled_count += 1
                if len(self.unfilled) < REPORT_KEYS:
                    self.unfilled.append(r.key)
            else:
                puts = [Put(r.key, PLACEHOLDER, v, None) for v in range(self._last + 1, r.version)]
                self._filled += gap
        self._last = r.version
        puts.append(Put(r.key, r.value, r.version, r))
        return puts

    def batches(self, records) -> Iterator[Batch]:
        number = 0
        current = Batch(number, [], [])
        size = 0
        for r in records:
            current.records.append(r)
            current.puts.extend(self._plan(r))
            size += len(r.value)
            if len(current.records) >= self.batch or size >= self.batch_bytes:
                yield current
                number += 1
                current, size = Batch(number, [], []), 0
        if current.records:
            yield current


# ---------------------------------------------------------------------------
# import
# ---------------------------------------------------------------------------
def _open(path_or_file):
    if hasattr(path_or_file, "read"):
        path_or_file.seek(0)
        return path_or_file, False
    return open(path_or_file, encoding="utf-8"), True


def _count(path_or_file) -> int:
    f, mine = _open(path_or_file)
    try:
        _header, records = read_export(f)
        return sum(1 for _ in records)
    finally:
        if mine:
            f.close()


def import_from(client, path_or_file, progress: Progress | None = None,
                batch: int = DEFAULT_BATCH, max_fill: int = MAX_FILL) -> ImportSummary:
    """Imports an export file (a path, or a seekable text file) into ``client``'s cluster.

    The whole file is checked first (a bad line raises :class:`BadExportFile` before
    anything is written), then streamed in batches; ``progress(lines_done, lines_total)``
    after each.  A refused write raises :class:`ImportFailed` whose ``summary`` says which
    lines are in; running the same import again (same ``batch``) then goes on safely."""
    name = getattr(path_or_file, "name", None) or str(path_or_file)
    summary = ImportSummary(str(name))
    summary.total = _count(path_or_file)
    f, mine = _open(path_or_file)
    try:
        header, records = read_export(f)
        summary.position, summary.prefix = header["position"], header.get("prefix", "")
        planner = Planner(batch, max_fill=max_fill)
        last_key = None
        renumbered_key = None
        timeout = max(getattr(client, "timeout", 5.0) or 5.0, 60.0)
        checking = True
        if progress is not None:
            progress(0, summary.total)
        for b in planner.batches(records):
            where = f"batch {b.number} (lines {b.records[0].line}-{b.records[-1].line})"
            # Until the first batch that is not on the target yet: a rerun skips what an
            # earlier run wrote (batches go in file order, so after that one none is).
            checking = checking and _already_in(client, b)
            if checking:
                summary.skipped += len(b.records)
                for r in b.records:
                    if r.key != last_key:
                        last_key = r.key
                        summary.keys += 1
                summary.versions += len(b.records)
                summary.batches += 1
                summary.line = b.records[-1].line
                if progress is not None:
                    progress(summary.versions, summary.total)
                continue
            try:
                written = client.mput([(p.key, p.value) for p in b.puts],
                                      request_id=b.request_id, timeout=timeout)
            except ClientError as exc:
                raise ImportFailed(f"import stopped at {where}: {exc}; {_resume_hint(summary)}",
                                   summary) from exc
            if len(written) != len(b.puts):
                raise ImportFailed(f"import stopped at {where}: {len(written)} answers for "
                                   f"{len(b.puts)} inserts; {_resume_hint(summary)}", summary)
            bad = next((w for w in written if not w.ok), None)
            if bad is not None:
                raise ImportFailed(f"import stopped at {where}: insert of {bad.key!r:.60} "
                                   f"refused ({bad.error or 'no reason given'}); "
                                   f"{_resume_hint(summary)}", summary)
            holes = [(p.key, w.version) for p, w in zip(b.puts, written) if p.record is None]
            if holes:
                try:
                    removed = client.mdel(holes, request_id=b.remove_id, timeout=timeout)
                except ClientError as exc:
                    raise ImportFailed(f"import stopped at {where} with its placeholders in"
                                       f" place: {exc}; {_resume_hint(summary)}", summary) from exc
                # -1 without "no quorum": that version is gone already (retention or a
                # compaction on the target dropped the placeholder first) -- fine too
                wrong = next((w for w, (_k, v) in zip(removed, holes)
                              if w.version != v and (w.version > 0 or w.no_quorum)), None)
                if wrong is not None or len(removed) != len(holes):
                    why = (wrong.error or f"removed {wrong.version}") if wrong else "answers missing"
                    raise ImportFailed(f"import stopped at {where}: removing the placeholder"
                                       f" of {holes[0][0]!r:.60} failed ({why}); placeholders"
                                       f" may remain; {_resume_hint(summary)}", summary)
                summary.placeholders += len(holes)
            for p, w in zip(b.puts, written):
                if p.record is None:
                    continue
                if p.key != last_key:
                    last_key = p.key
                    summary.keys += 1
                if w.version != p.record.version and renumbered_key != p.key:
                    renumbered_key = p.key
                    summary.renumbered += 1
                    if len(summary.renumbered_keys) < REPORT_KEYS:
                        summary.renumbered_keys.append(p.key)
            summary.versions += len(b.records)
            summary.batches += 1
            summary.line = b.records[-1].line
            summary.unfilled, summary.unfilled_keys = planner.unfilled_count, list(planner.unfilled)
            if progress is not None:
                progress(summary.versions, summary.total)
    finally:
        if mine:
            f.close()
    summary.complete = True
    return summary


def _already_in(client, b: Batch) -> bool:
    """Every version of the batch is on the target already, at its number, with its value
    (a rerun of an import, or of its first part): the batch is skipped.  This makes a rerun
    write nothing however long ago the first run was -- the request ids alone hold only
    while the servers remember them (the last 100,000 changes).  Only the batches up to the
    first one that is not there are checked (a fresh import pays one read), and keys that
    were renumbered (they existed on the target before) cannot be recognised this way."""
    try:
        found = client.mget([(r.key, r.version) for r in b.records])
    except ClientError:
        return False   # the write path reports the problem
    return len(found) == len(b.records) and all(
        f.version == r.version and f.value == r.value for f, r in zip(found, b.records))


def _resume_hint(summary: ImportSummary) -> str:
    upto = f"lines up to {summary.line} are imported" if summary.line else "nothing was imported"
    return (f"{upto}; running the same import again (same batch size) skips what is in"
            f" and goes on (the servers remember the last {KEEP_IDS:,} change ids)")


__all__ = ["BadExportFile", "Batch", "ExportSummary", "ImportFailed", "ImportSummary",
           "Planner", "Put", "Record", "export_to", "import_from", "read_export",
           "write_export"]
