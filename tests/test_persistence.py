"""Tests for server/persistence.py: the Raft log (entries + hard state) and snapshots of one data dir."""
from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.persistence import (HDR_SIZE, LOG_MAGIC, DataDir, DataDirLocked, PersistenceError,
                                SnapshotState)
from server.raft.types import CONF, NOOP, NORMAL, Entry, HardState
from server.store import Version, VersionedStore


# ---- helpers -------------------------------------------------------------------------------
def ents(first: int, n: int, term: int = 1, tag: str = "") -> list[Entry]:
    """n contiguous NORMAL entries from ``first``; data unique per (index, tag)."""
    return [Entry(term, i, NORMAL, {"ts": 1.5, "items": [{"k": f"key{i}", "v": f"{tag}ü{i}"}]})
            for i in range(first, first + n)]


def same(a: list[Entry], b: list[Entry]) -> bool:
    """Entries equal in what is stored (tuples come back as lists, size is derived)."""
    return [(e.term, e.index, e.kind, json.loads(json.dumps(e.data))) for e in a] == \
        [(e.term, e.index, e.kind, e.data) for e in b]


def reopen(path: Path, **kw):
    dd = DataDir(path, **kw)
    return dd, dd.load()


def segments(path: Path) -> list[str]:
    return sorted(n for n in os.listdir(path) if n.startswith("log-"))


def snapshots(path: Path) -> list[str]:
    return sorted(n for n in os.listdir(path) if n.startswith("snap-"))


def only_segment(path: Path) -> Path:
    (name,) = segments(path)
    return path / name


def frame_offsets(seg: Path) -> list[int]:
    """Offset of each record in a segment, plus the end offset (walks the framing)."""
    data = seg.read_bytes()
    offs, off = [], len(LOG_MAGIC)
    while off + HDR_SIZE <= len(data):
        offs.append(off)
        (ln,) = struct.unpack_from("<I", data, off + 4)
        off += HDR_SIZE + ln
    return offs + [off]


def sample_store() -> VersionedStore:
    s = VersionedStore()
    s.insert("alpha", "one", seq=1, written_at=1.25, node="n1")
    s.insert("alpha", "two\nlines", seq=2, written_at=2.5, node="n2")
    s.insert("beta", "ünïcødé ✓ 🎉", seq=3, written_at=3.0, node="n1")
    s.insert("gamma", "gone", seq=4)
    s.remove("gamma")                      # no live versions, max_version 1
    s.insert("delta", "x" * 1000, seq=5)
    s.remove("alpha", 1)
    return s


def snap(index: int, term: int = 1, keys=(), **meta) -> SnapshotState:
    return SnapshotState(index=index, term=term, keys=list(keys), meta=meta or {"node": "n1"})


# ---- basics --------------------------------------------------------------------------------
def test_empty_dir(tmp_path):
    path = tmp_path / "new" / "data"          # created, parents too
    dd, rec = reopen(path)
    assert rec.snapshot is None and rec.entries == [] and rec.warnings == []
    assert rec.hard_state == HardState() and rec.last_index == 0
    assert dd.last_index == 0 and dd.snapshot_index == 0
    dd.close()
    dd, rec = reopen(path)
    assert rec.entries == [] and rec.warnings == [] and rec.hard_state == HardState()
    dd.close()


def test_round_trip_entries_and_hard_state(tmp_path):
    log = [Entry(1, 1, NOOP, None),
           Entry(1, 2, CONF, {"op": "add_learner", "node": "n2", "addr": "h:1"}),
           Entry(1, 3, NORMAL, {"ts": 2.0, "items": [{"k": "ünïcødé ✓ 🎉", "v": "\u2028\0x"}]}),
           Entry(1, 4, NORMAL, {"big": "é" * 300_000}),            # > write buffer
           Entry(2, 5, NORMAL, [1, [2, None], {"a": True}])]
    dd, _ = reopen(tmp_path)
    dd.append(log[:2], HardState(1, "n1", 0))
    dd.append(log[2:4], HardState(1, "n1", 2))
    dd.append(log[4:], HardState(2, "", 4))
    dd.sync()
    assert dd.last_index == 5
    dd.close()
    dd, rec = reopen(tmp_path)
    assert rec.warnings == [] and rec.snapshot is None
    assert same(log, rec.entries) and rec.hard_state == HardState(2, "", 4)
    assert rec.entries[3].size > 300_000 and rec.entries[0].size > 0   # approximate data bytes
    dd.append(ents(6, 3, term=2), HardState(2, "", 7))
    dd.append([], HardState(3, "n3", 7))                              # hard state alone
    dd.close()                                                        # close syncs
    dd, rec = reopen(tmp_path)
    assert same(log + ents(6, 3, term=2), rec.entries)
    assert rec.hard_state == HardState(3, "n3", 7) and rec.warnings == []
    assert dd.hard_state == HardState(3, "n3", 7)
    dd.close()


def test_sync_is_noop_without_new_data_and_counts(tmp_path):
    dd, _ = reopen(tmp_path)
    dd.sync()
    dd.append([], None)                          # nothing: no record
    assert dd.unsynced_records == 0
    dd.append(ents(1, 2), HardState(1, "a", 0))
    assert dd.unsynced_records == 2 and dd.unsynced_bytes > 2 * HDR_SIZE
    dd.sync()
    assert dd.unsynced_records == 0 and dd.unsynced_bytes == 0
    dd.sync()
    dd.close()


def test_append_validation(tmp_path):
    dd, _ = reopen(tmp_path)
    with pytest.raises(ValueError):
        dd.append(ents(2, 1))                    # an empty log starts at 1
    with pytest.raises(ValueError):
        dd.append([Entry(1, 1), Entry(1, 3)])    # not contiguous
    dd.append(ents(1, 5), HardState(1, "", 3))
    with pytest.raises(ValueError, match="does not continue"):
        dd.append(ents(7, 1))                    # gap
    with pytest.raises(ValueError, match="committed"):
        dd.append(ents(3, 1, term=2))            # would replace committed entry 3
    dd.append(ents(4, 1, term=2))                # uncommitted suffix: replaced
    assert dd.last_index == 4
    dd.write_snapshot(snap(3))
    with pytest.raises(ValueError):
        dd.append(ents(3, 2, term=2))            # covered by the snapshot
    dd.close()
    dd, rec = reopen(tmp_path)
    assert rec.snapshot.index == 3 and same(ents(4, 1, term=2), rec.entries)
    assert rec.warnings == []
    dd.close()


def test_writes_need_load_first(tmp_path):
    dd = DataDir(tmp_path)
    with pytest.raises(RuntimeError):
        dd.append(ents(1, 1))
    dd.close()
    with pytest.raises(PersistenceError):
        dd.load()


def test_lock_prevents_second_datadir(tmp_path):
    dd = DataDir(tmp_path)
    with pytest.raises(DataDirLocked, match="already in use"):
        DataDir(tmp_path)
    dd.close()
    dd2 = DataDir(tmp_path)                     # released by close()
    dd2.close()
    with DataDir(tmp_path) as dd3:              # context manager
        dd3.load()
        with pytest.raises(DataDirLocked, match=f"pid {os.getpid()}"):
            DataDir(tmp_path)
    DataDir(tmp_path).close()


def test_fsync_off_still_round_trips(tmp_path):
    dd, _ = reopen(tmp_path, fsync=False)
    dd.append(ents(1, 10), HardState(1, "x", 10))
    dd.write_snapshot(snap(10))
    dd.close()
    dd, rec = reopen(tmp_path, fsync=False)
    assert rec.snapshot.index == 10 and rec.entries == [] and rec.hard_state.commit == 10
    dd.close()


def test_old_format_dir_is_refused_untouched(tmp_path):
    old_seg = LOG_MAGIC.replace(b"2", b"1") + b"\x01\x02\x03 some old batch records"
    (tmp_path / "log-0000000001.wal").write_bytes(old_seg)
    with DataDir(tmp_path) as dd:
        with pytest.raises(PersistenceError, match="another format.*KVSWAL2.*Move the directory"):
            dd.load()
    assert (tmp_path / "log-0000000001.wal").read_bytes() == old_seg
    assert not (tmp_path / "quarantine").exists()
    os.unlink(tmp_path / "log-0000000001.wal")
    old_snap = b'{"format":"kvs-snapshot","version":1,"seq":5,"epoch":1,"chain_hash":"h"}\n'
    (tmp_path / "snap-00000000000000000005.snap").write_bytes(old_snap)
    with DataDir(tmp_path) as dd:
        with pytest.raises(PersistenceError, match="snapshot version 1"):
            dd.load()
    assert snapshots(tmp_path) == ["snap-00000000000000000005.snap"]


# ---- truncate-and-replace ------------------------------------------------------------------
def test_truncate_and_replace_within_segment(tmp_path):
    dd, _ = reopen(tmp_path)
    dd.append(ents(1, 6, term=1), HardState(1, "a", 2))
    dd.append(ents(4, 2, term=2, tag="new"), HardState(2, "b", 2))   # replaces 4..6
    dd.append(ents(6, 1, term=2, tag="new"))
    dd.append(ents(5, 3, term=3, tag="newer"), HardState(3, "", 5))  # replaces 5..6
    assert dd.last_index == 7
    dd.close()
    dd, rec = reopen(tmp_path)
    want = ents(1, 3, term=1) + ents(4, 1, term=2, tag="new") + ents(5, 3, term=3, tag="newer")
    assert same(want, rec.entries) and rec.hard_state == HardState(3, "", 5)
    assert rec.warnings == []
    dd.close()


def test_truncate_and_replace_across_segment_boundaries(tmp_path):
    dd, _ = reopen(tmp_path, segment_bytes=400)   # a few records per segment
    dd.append(ents(1, 3, term=1), HardState(1, "a", 1))
    for i in range(4, 20):
        dd.append(ents(i, 1, term=1))
    assert len(segments(tmp_path)) >= 4
    dd.append(ents(5, 2, term=2, tag="b"), HardState(2, "b", 4))   # cuts back several segments
    dd.append(ents(7, 4, term=2, tag="b"))
    dd.close()
    dd, rec = reopen(tmp_path, segment_bytes=400)
    want = ents(1, 4, term=1) + ents(5, 6, term=2, tag="b")
    assert same(want, rec.entries) and rec.warnings == []
    assert rec.hard_state == HardState(2, "b", 4) and dd.last_index == 10
    # The snapshot deletes leading segments only, so a segment with replaced entries
    # above 8 goes no sooner than the one replacing them: the replay gives the same log.
    dd.append([], HardState(2, "b", 8))
    dd.write_snapshot(snap(8))
    assert len(segments(tmp_path)) < 5
    dd.close()
    dd, rec = reopen(tmp_path)
    assert rec.snapshot.index == 8 and same(want[8:], rec.entries) and rec.warnings == []
    assert rec.hard_state == HardState(2, "b", 8)
    dd.close()


def test_truncate_and_replace_across_restarts(tmp_path):
    dd, _ = reopen(tmp_path)
    dd.append(ents(1, 5, term=1), HardState(1, "a", 2))
    dd.close()
    dd, rec = reopen(tmp_path)
    assert rec.last_index == 5
    dd.append(ents(3, 1, term=2, tag="x"), HardState(2, "b", 2))
    dd.close()
    dd, rec = reopen(tmp_path)
    assert same(ents(1, 2) + ents(3, 1, term=2, tag="x"), rec.entries)
    dd.append(ents(4, 3, term=2, tag="x"))
    dd.close()
    dd, rec = reopen(tmp_path)
    assert same(ents(1, 2) + ents(3, 4, term=2, tag="x"), rec.entries)
    assert rec.hard_state == HardState(2, "b", 2) and rec.warnings == []
    dd.close()


def test_hard_state_survives_compaction(tmp_path):
    """The only hard-state record may sit in a segment the snapshot deletes:
    each new segment starts with the current hard state."""
    dd, _ = reopen(tmp_path)
    dd.append(ents(1, 4), HardState(7, "n2", 4))
    dd.write_snapshot(snap(4))
    assert len(segments(tmp_path)) == 1
    dd.close()
    dd, rec = reopen(tmp_path)
    assert rec.hard_state == HardState(7, "n2", 4) and rec.entries == []
    dd.close()


def test_hard_state_kept_when_last_segment_lost_its_first_record(tmp_path):
    """The newest hard state is only in a segment the snapshot covers, and the
    last segment was torn before its first record: load must carry it over."""
    dd, _ = reopen(tmp_path)
    dd.append(ents(1, 4), HardState(5, "v", 4))
    dd.close()
    (first,) = segments(tmp_path)
    saved = (tmp_path / first).read_bytes()
    dd, _ = reopen(tmp_path)
    dd.write_snapshot(snap(4))                     # rotates, deletes the first segment
    dd.close()
    (tmp_path / first).write_bytes(saved)          # as if its deletion never happened
    os.truncate(tmp_path / segments(tmp_path)[-1], 0)
    for _ in range(2):
        dd, rec = reopen(tmp_path)
        assert rec.hard_state == HardState(5, "v", 4) and rec.entries == []
        assert rec.snapshot.index == 4 and len(segments(tmp_path)) == 1
        dd.close()


def test_commit_lowered_when_the_log_was_cut(tmp_path):
    dd, _ = reopen(tmp_path)
    dd.append(ents(1, 3), HardState(1, "a", 0))
    dd.append(ents(4, 1), HardState(1, "a", 4))   # commit covers entry 4
    dd.close()
    seg = only_segment(tmp_path)
    offs = frame_offsets(seg)                      # H0, E1-3, H, E4, H(commit 4)
    data = seg.read_bytes()
    # Damage entry 4's record but keep the hard state after it readable.
    bad = bytearray(data)
    bad[offs[3] + HDR_SIZE + 3] ^= 0x20
    seg.write_bytes(bytes(bad))
    dd, rec = reopen(tmp_path)
    assert rec.last_index == 3
    assert rec.hard_state == HardState(1, "a", 3)
    assert any("commit index 4" in w and "lowered to 3" in w for w in rec.warnings)
    dd.close()


# ---- snapshots -----------------------------------------------------------------------------
def test_snapshot_round_trip_and_later_entries(tmp_path):
    store = sample_store()
    dd, _ = reopen(tmp_path)
    dd.append(ents(1, 10), HardState(2, "n1", 10))
    dd.write_snapshot(SnapshotState(index=10, term=1, keys=store.dump(),
                                    meta={"conf": {"voters": ["n1", "n2"]}, "ids": [[1, "ü"]]}))
    dd.append(ents(11, 4, term=2), HardState(2, "n1", 12))
    dd.sync()
    assert dd.snapshot_index == 10
    dd.close()

    dd, rec = reopen(tmp_path)
    assert rec.warnings == []
    s = rec.snapshot
    assert (s.index, s.term, s.meta) == (10, 1, {"conf": {"voters": ["n1", "n2"]}, "ids": [[1, "ü"]]})
    assert same(ents(11, 4, term=2), rec.entries) and rec.last_index == 14
    keys = list(s.keys)
    assert keys == list(store.dump())
    assert list(s.keys) == keys and len(s.keys) == 4               # re-iterable
    assert all(isinstance(v, Version) for _, _, vs in keys for v in vs)
    restored = VersionedStore()
    for key, max_version, versions in s.keys:
        restored.load_key(key, max_version, versions)
    assert list(restored.dump()) == list(store.dump())
    assert restored.insert("gamma", "back") == 2                  # max_version survived
    dd.close()


def test_snapshot_is_streamed_from_an_iterator(tmp_path):
    def gen():
        for i in range(3000):
            yield f"key{i:05d}", 1, [Version(1, "v" * 500, i, 0.0, "n")]
    dd, _ = reopen(tmp_path)
    dd.write_snapshot(SnapshotState(0, 0, gen(), {}))
    dd.close()
    dd, rec = reopen(tmp_path)
    assert len(rec.snapshot.keys) == 3000
    assert [k for k, _, _ in rec.snapshot.keys][-1] == "key02999"
    dd.close()


def test_snapshot_compaction_deletes_covered_segments_keeps_later(tmp_path):
    dd, _ = reopen(tmp_path)
    dd.append(ents(1, 5), HardState(1, "", 5))
    seg1 = segments(tmp_path)
    dd.write_snapshot(snap(5))
    seg_after_1 = segments(tmp_path)
    assert len(seg_after_1) == 1 and seg_after_1 != seg1        # rotated, old one deleted
    assert seg_after_1 == dd.segment_names()
    dd.append(ents(6, 5), HardState(1, "", 8))
    dd.write_snapshot(snap(8))                                  # entries 9, 10 not covered
    seg_after_2 = segments(tmp_path)
    assert len(seg_after_2) == 2 and seg_after_2[0] == seg_after_1[0]
    assert snapshots(tmp_path) == [f"snap-{8:020d}.snap"]       # older snapshot gone
    dd.append(ents(11, 1), HardState(1, "", 11))
    dd.write_snapshot(snap(11))
    assert len(segments(tmp_path)) == 1 and segments(tmp_path)[0] > seg_after_2[-1]
    # A snapshot with nothing appended since does not rotate again.
    dd.write_snapshot(snap(11))
    assert len(segments(tmp_path)) == 1
    dd.close()
    dd, rec = reopen(tmp_path)
    assert rec.snapshot.index == 11 and rec.entries == [] and rec.warnings == []
    assert dd.last_index == 11 and rec.hard_state.commit == 11
    dd.append(ents(12, 1))
    dd.close()


def test_snapshot_bounds(tmp_path):
    dd, _ = reopen(tmp_path)
    dd.append(ents(1, 5), HardState(1, "", 5))
    with pytest.raises(ValueError, match="reset"):
        dd.write_snapshot(snap(6))                # beyond the log
    dd.write_snapshot(snap(4))
    with pytest.raises(ValueError):
        dd.write_snapshot(snap(3))                # older than the current one
    dd.append(ents(6, 1))
    with pytest.raises(ValueError, match="commit"):
        dd.write_snapshot(snap(6))                # only committed entries are snapshotted
    dd.close()


def test_snapshot_while_log_continues(tmp_path):
    """Appends happen while the snapshot streams (from inside the keys iterator,
    i.e. without the DataDir holding its log mutex during the stream)."""
    dd, _ = reopen(tmp_path)
    dd.append(ents(1, 10), HardState(1, "", 6))

    def keys():
        yield "k01", 1, [Version(1, "one", 1, 0.0, "n")]
        dd.append(ents(11, 2), HardState(1, "", 9))
        dd.sync()
        yield "k02", 1, [Version(1, "two", 2, 0.0, "n")]

    dd.write_snapshot(SnapshotState(6, 1, keys(), {}))
    dd.append(ents(13, 3))
    dd.sync()
    assert len(segments(tmp_path)) == 2           # the one holding 7..10 survives
    dd.close()
    dd, rec = reopen(tmp_path)
    assert rec.warnings == []
    assert rec.snapshot.index == 6 and len(rec.snapshot.keys) == 2
    assert same(ents(7, 9), rec.entries) and rec.hard_state.commit == 9
    dd.append([], HardState(1, "", 15))
    dd.write_snapshot(snap(rec.last_index))        # covers everything: the old segment goes
    assert len(segments(tmp_path)) == 1
    dd.close()


def test_reset(tmp_path):
    dd, _ = reopen(tmp_path)
    dd.append(ents(1, 5), HardState(3, "n1", 2))
    dd.write_snapshot(snap(2))
    keys = [("kkk", 2, [Version(2, "vvv", 999, 0.0, "x")])]
    dd.reset(SnapshotState(1000, 4, keys, {"c": 1}), HardState(4, "n2", 1000))
    assert dd.last_index == 1000 and dd.snapshot_index == 1000
    dd.append(ents(1001, 1, term=4), HardState(4, "n2", 1000))
    dd.close()
    assert sorted(os.listdir(tmp_path)) == ["LOCK", "log-0000000003.wal",
                                            "snap-00000000000000001000.snap"]
    dd, rec = reopen(tmp_path)
    assert rec.snapshot.index == 1000 and rec.snapshot.term == 4 and list(rec.snapshot.keys) == keys
    assert same(ents(1001, 1, term=4), rec.entries) and rec.hard_state == HardState(4, "n2", 1000)
    # reset to an *older* index (diverged tail discarded): the newer snapshot must not win.
    dd.reset(snap(500, term=5), HardState(5, "", 500))
    dd.append(ents(501, 1, term=5))
    dd.close()
    dd, rec = reopen(tmp_path)
    assert rec.snapshot.index == 500 and rec.snapshot.term == 5
    assert same(ents(501, 1, term=5), rec.entries) and rec.warnings == []
    assert rec.hard_state == HardState(5, "", 500)
    assert snapshots(tmp_path) == ["snap-00000000000000000500.snap"]
    with pytest.raises(ValueError):
        dd.reset(snap(10), HardState(5, "", 11))      # commit beyond the snapshot
    dd.close()


def _old_state(tmp_path: Path) -> DataDir:
    dd, _ = reopen(tmp_path)
    dd.append(ents(1, 20), HardState(2, "old", 3))
    dd.write_snapshot(snap(3, keys=[("old", 1, [])]))
    return dd


def test_reset_interrupted_before_commit_keeps_old_state(tmp_path):
    live, crash = tmp_path / "live", tmp_path / "crash"
    dd = _old_state(live)

    def keys():
        yield "new", 1, []
        shutil.copytree(live, crash, ignore=shutil.ignore_patterns("LOCK"))   # crash image
        yield "new2", 1, []

    dd.reset(SnapshotState(10, 3, keys(), {}), HardState(3, "", 10))
    dd.close()
    assert (crash / "reset-staging").exists()
    dd, rec = reopen(crash)
    assert rec.snapshot.index == 3 and [k for k, _, _ in rec.snapshot.keys] == ["old"]
    assert same(ents(4, 17), rec.entries) and rec.hard_state == HardState(2, "old", 3)
    assert any("unfinished reset" in w for w in rec.warnings)
    assert not (crash / "reset-staging").exists()
    dd.close()


@pytest.mark.parametrize("moved", [0, 1, 2])
def test_reset_interrupted_after_commit_is_finished_on_load(tmp_path, moved):
    live, crash = tmp_path / "live", tmp_path / "crash"
    dd = _old_state(live)
    real = dd._finish_reset

    def crash_then_finish(warnings):
        shutil.copytree(live, crash, ignore=shutil.ignore_patterns("LOCK"))   # crash image
        # ... possibly part-way through moving the new files into place
        new = sorted(n for n in os.listdir(crash / "reset") if n != "MANIFEST")
        if moved:                                   # old files go before new ones move in
            for old in segments(crash) + snapshots(crash):
                os.unlink(crash / old)
        for name in new[:moved]:
            os.replace(crash / "reset" / name, crash / name)
        real(warnings)

    dd._finish_reset = crash_then_finish
    dd.reset(SnapshotState(10, 3, [("new", 1, [])], {}), HardState(3, "", 10))
    dd.close()
    dd, rec = reopen(crash)
    assert rec.snapshot.index == 10 and [k for k, _, _ in rec.snapshot.keys] == ["new"]
    assert rec.entries == [] and rec.hard_state == HardState(3, "", 10)
    assert any("completed a reset" in w for w in rec.warnings)
    assert not (crash / "reset").exists() and len(segments(crash)) == 1
    assert snapshots(crash) == ["snap-00000000000000000010.snap"]
    dd.close()


def test_corrupt_snapshot_falls_back_to_older_and_reports_gap(tmp_path):
    dd, _ = reopen(tmp_path)
    dd.append(ents(1, 3), HardState(1, "v", 3))
    dd.write_snapshot(snap(3, note="old"))
    older = tmp_path / snapshots(tmp_path)[0]
    keep = older.read_bytes()
    dd.append(ents(4, 3), HardState(1, "v", 6))
    dd.write_snapshot(snap(6, keys=[("abc", 1, [])], note="new"))
    dd.close()
    older.write_bytes(keep)                     # as if the crash came before its deletion
    newest = tmp_path / snapshots(tmp_path)[-1]
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0x40
    newest.write_bytes(bytes(data))
    dd, rec = reopen(tmp_path)
    assert rec.snapshot.meta == {"note": "old"}
    assert any("invalid" in w and "checksum" in w for w in rec.warnings)
    assert (tmp_path / "quarantine" / newest.name).exists()
    # The segments holding 4..6 were deleted with the newest snapshot: no silent gap,
    # but the hard state (a promise) is still there.
    assert rec.entries == [] and rec.hard_state.term == 1 and rec.hard_state.vote == "v"
    dd.close()


def test_unfinished_snapshot_tmp_is_removed(tmp_path):
    dd, _ = reopen(tmp_path)
    dd.append(ents(1, 2))
    dd.close()
    (tmp_path / "snap-00000000000000000099.snap.tmp").write_bytes(b'{"format": "kvs-snap')
    dd, rec = reopen(tmp_path)
    assert rec.snapshot is None and same(ents(1, 2), rec.entries)
    assert any("unfinished snapshot" in w for w in rec.warnings)
    assert not any(n.endswith(".tmp") for n in os.listdir(tmp_path))
    dd.close()


def test_failed_snapshot_leaves_datadir_usable(tmp_path):
    def bad_keys():
        yield "abc", 1, []
        raise RuntimeError("store changed")
    dd, _ = reopen(tmp_path)
    dd.append(ents(1, 3), HardState(1, "", 3))
    with pytest.raises(RuntimeError):
        dd.write_snapshot(SnapshotState(3, 1, bad_keys(), {}))
    assert snapshots(tmp_path) == []
    dd.append(ents(4, 1, tag="still fine"))
    dd.close()
    dd, rec = reopen(tmp_path)
    assert same(ents(1, 3) + ents(4, 1, tag="still fine"), rec.entries) and rec.warnings == []
    dd.close()


# ---- torn tails and corruption -------------------------------------------------------------
def _check_repaired(path: Path, good: list[Entry], hard: HardState | None = None, **kw) -> None:
    """After a repairing load, appending continues cleanly."""
    dd, rec = reopen(path, **kw)
    assert same(good, rec.entries) and rec.warnings == []
    if hard is not None:
        assert rec.hard_state == hard
    nxt = rec.last_index + 1
    dd.append(ents(nxt, 1, term=9, tag="new"))
    dd.close()
    dd, rec = reopen(path, **kw)
    assert same(good + ents(nxt, 1, term=9, tag="new"), rec.entries) and rec.warnings == []
    dd.close()


def _eight_records(path: Path) -> Path:
    """Segment: H0 then 8 entries records (entry i in record i)."""
    dd, _ = reopen(path)
    for i in range(1, 9):
        dd.append(ents(i, 1))
    dd.close()
    return only_segment(path)


@pytest.mark.parametrize("damage", ["truncate_mid_record", "truncate_mid_header", "garbage",
                                    "zeros", "flip_last_record", "flip_last_header"])
def test_torn_tail_is_cut_off_and_repaired(tmp_path, damage):
    seg = _eight_records(tmp_path)
    data = bytearray(seg.read_bytes())
    offs = frame_offsets(seg)                       # offs[0] = H0, offs[i] = entry i
    good = ents(1, 8)
    if damage == "truncate_mid_record":
        data = data[: offs[8] + HDR_SIZE + 5]
        good = good[:-1]
    elif damage == "truncate_mid_header":
        data = data[: offs[8] + 5]
        good = good[:-1]
    elif damage == "garbage":
        data += b"\x13\x37garbage that is not a record" * 3
    elif damage == "zeros":
        data += b"\0" * 4096            # file extended with zeros after a crash
    elif damage == "flip_last_record":
        data[-3] ^= 0x01
        good = good[:-1]
    elif damage == "flip_last_header":
        data[offs[8] + 5] ^= 0x80       # inside the length
        good = good[:-1]
    seg.write_bytes(bytes(data))
    dd, rec = reopen(tmp_path)
    assert same(good, rec.entries)
    assert len(rec.warnings) == 1 and "torn tail" in rec.warnings[0], rec.warnings
    assert seg.name in rec.warnings[0]
    end = offs[len(good) + 1]
    assert f"{len(data) - end} bytes cut off" in rec.warnings[0]
    assert seg.stat().st_size == end                             # repaired on disk
    dd.close()
    _check_repaired(tmp_path, good)
    assert not (tmp_path / "quarantine").exists()


def test_torn_segment_header(tmp_path):
    dd, _ = reopen(tmp_path)
    dd.close()
    seg = only_segment(tmp_path)
    seg.write_bytes(LOG_MAGIC[:3])
    dd, rec = reopen(tmp_path)
    assert rec.entries == [] and len(rec.warnings) == 1 and "torn tail" in rec.warnings[0]
    dd.close()
    _check_repaired(tmp_path, [])
    seg.write_bytes(b"")                        # crash right after creating it: silent
    dd, rec = reopen(tmp_path)
    assert rec.warnings == []
    dd.close()
    _check_repaired(tmp_path, [])


def test_corruption_mid_file_is_quarantined(tmp_path):
    dd, _ = reopen(tmp_path)
    for i in range(1, 11):
        dd.append(ents(i, 1), HardState(i, "n1", i - 1))
    dd.close()
    seg = only_segment(tmp_path)
    data = bytearray(seg.read_bytes())
    offs = frame_offsets(seg)                    # H0, then (E i, H i) pairs
    e4 = offs[7]
    data[e4 + HDR_SIZE + 2] ^= 0xFF              # payload of entry 4's record
    seg.write_bytes(bytes(data))
    dd, rec = reopen(tmp_path)
    assert same(ents(1, 3), rec.entries)
    w = [x for x in rec.warnings if "corrupted" in x]
    assert len(w) == 1 and "checksum mismatch" in w[0] and f"offset {e4}" in w[0]
    q = tmp_path / "quarantine" / f"{seg.name}.from-{e4}"
    assert q.read_bytes() == bytes(data[e4:])                     # kept for inspection
    # The newest hard state after the damage is still honoured (term/vote are promises);
    # its commit cannot exceed what was recovered.
    assert rec.hard_state == HardState(10, "n1", 3)
    assert any("taken from a record after the damage" in x for x in rec.warnings)
    dd.close()
    _check_repaired(tmp_path, ents(1, 3), HardState(10, "n1", 3))


def test_corruption_in_older_segment_sets_later_segments_aside(tmp_path):
    dd, _ = reopen(tmp_path, segment_bytes=300)
    for i in range(1, 13):
        dd.append(ents(i, 1))
    dd.close()
    segs = segments(tmp_path)
    assert len(segs) >= 3
    mid = tmp_path / segs[1]
    before = sum(len(frame_offsets(tmp_path / s)) - 2 for s in segs[:1])   # entries in seg 0
    in_mid = len(frame_offsets(mid)) - 2
    data = bytearray(mid.read_bytes())
    data[-1] ^= 0x10                           # last record of the middle segment
    mid.write_bytes(bytes(data))
    dd, rec = reopen(tmp_path, segment_bytes=300)
    assert same(ents(1, before + in_mid - 1), rec.entries)
    assert len(rec.warnings) == 1 and f"{len(segs) - 2} later segment(s)" in rec.warnings[0]
    assert segments(tmp_path) == segs[:2]
    assert all((tmp_path / "quarantine" / s).exists() for s in segs[2:])
    dd.close()
    _check_repaired(tmp_path, ents(1, before + in_mid - 1), segment_bytes=300)


def test_segment_with_bad_magic_is_set_aside_whole(tmp_path):
    dd, _ = reopen(tmp_path, segment_bytes=300)
    for i in range(1, 13):
        dd.append(ents(i, 1))
    dd.close()
    segs = segments(tmp_path)
    first_count = len(frame_offsets(tmp_path / segs[0])) - 2
    with open(tmp_path / segs[1], "r+b") as f:
        f.write(b"NOTALOG!")
    dd, rec = reopen(tmp_path, segment_bytes=300)
    assert same(ents(1, first_count), rec.entries)
    assert len(rec.warnings) == 1 and "bad magic" in rec.warnings[0]
    assert sorted(os.listdir(tmp_path / "quarantine")) == segs[1:]
    assert segments(tmp_path) == segs[:1]
    dd.close()
    _check_repaired(tmp_path, ents(1, first_count), segment_bytes=300)


def test_gap_between_records_stops_load(tmp_path):
    a, c = tmp_path / "a", tmp_path / "c"
    seg_c = _eight_records(c)
    dd, _ = reopen(a)
    dd.append(ents(1, 1))
    dd.append(ents(2, 1))
    dd.close()
    offs = frame_offsets(seg_c)
    with open(only_segment(a), "ab") as f:
        f.write(seg_c.read_bytes()[offs[4]:])    # records of entries 4.. (3 is missing)
    dd, rec = reopen(a)
    assert same(ents(1, 2), rec.entries)
    assert len(rec.warnings) == 1 and "gap" in rec.warnings[0]
    dd.close()
    _check_repaired(a, ents(1, 2))


def test_log_without_snapshot_must_start_at_1(tmp_path):
    dd, _ = reopen(tmp_path)
    dd.append(ents(1, 2), HardState(1, "", 2))
    dd.write_snapshot(snap(2))                  # deletes the segment of 1..2
    dd.append(ents(3, 2))
    dd.close()
    for s in snapshots(tmp_path):
        os.unlink(tmp_path / s)                 # snapshot lost: the log alone is not a state
    dd, rec = reopen(tmp_path)
    assert rec.entries == [] and rec.snapshot is None
    assert any("no snapshot covering 1..2" in w for w in rec.warnings)
    assert rec.hard_state == HardState(1, "", 0)
    dd.close()


# ---- crash simulation (properties) -----------------------------------------------------------
# An op: (back, n, with_hs, commit_frac, size): append n entries starting ``back`` before the
# end (truncate-and-replace when back > 0, never below commit), maybe with a hard state.
OPS = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 4), st.booleans(),
                         st.floats(0.0, 1.0), st.integers(0, 120)), min_size=1, max_size=14)


def _run_ops(path: Path, ops, segment_bytes: int):
    """Apply ``ops``; return the model state after each call and the byte
    position (over all segments concatenated) at which each call ends."""
    dd, _ = reopen(path, fsync=False, segment_bytes=segment_bytes)
    log: list[Entry] = []
    hs = HardState()
    states = [(list(log), hs)]
    between = [None]          # state with call j's entries but not its hard state
    ends = [_stream_size(path)]
    for j, (back, n, with_hs, frac, size) in enumerate(ops):
        first = max(hs.commit + 1, len(log) + 1 - back)
        term = hs.term + 1 if first <= len(log) else max(hs.term, 1)
        new = [Entry(term, i, NORMAL, {"j": j, "v": "ü" * size}) for i in range(first, first + n)]
        if new:
            log = log[:first - 1] + new
        mid = (list(log), hs)
        h = None
        if with_hs:
            h = HardState(term, f"n{j % 3}", hs.commit + round(frac * (len(log) - hs.commit)))
            hs = h
        if not new and h is None:
            continue
        dd.append(new, h)
        dd.sync()
        states.append((list(log), hs))
        between.append(mid)
        ends.append(_stream_size(path))
    dd.close()
    return states, between, ends


def _stream_size(path: Path) -> int:
    return sum((path / s).stat().st_size for s in segments(path))


def _cut(path: Path, at: int) -> None:
    """Keep the first ``at`` bytes of the segments' concatenation (a crash image)."""
    pos = 0
    for name in segments(path):
        size = (path / name).stat().st_size
        if pos >= at and pos > 0:
            os.unlink(path / name)
        elif pos + size > at:
            os.truncate(path / name, at - pos)
        pos += size


def _check_prefix(path: Path, at: int, states, between, ends, segment_bytes: int) -> None:
    done = max((j for j, end in enumerate(ends) if end <= at), default=0)
    allowed = [states[done]]
    if at > ends[done] and done + 1 < len(ends):
        allowed.append(between[done + 1])
    dd, rec = reopen(path, fsync=False, segment_bytes=segment_bytes)
    assert any(same(log, rec.entries) and rec.hard_state == hs for log, hs in allowed), \
        (at, rec.entries, rec.hard_state, rec.warnings)
    if at == ends[done]:
        assert rec.warnings == []
    assert not any("corrupted" in w for w in rec.warnings)     # a cut is a torn tail, never more
    nxt = rec.last_index + 1
    dd.append(ents(nxt, 1, term=99))
    dd.close()
    dd, rec2 = reopen(path, fsync=False, segment_bytes=segment_bytes)
    assert same(rec.entries + ents(nxt, 1, term=99), rec2.entries) and rec2.warnings == []
    dd.close()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS, cut=st.floats(min_value=0.0, max_value=1.0),
       segment_bytes=st.sampled_from([200, 600, 1 << 20]))
def test_any_crash_point_yields_a_prefix(ops, cut, segment_bytes):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        states, between, ends = _run_ops(path, ops, segment_bytes)
        at = round(cut * ends[-1])
        _cut(path, at)
        _check_prefix(path, at, states, between, ends, segment_bytes)


def test_every_crash_point_of_a_small_log(tmp_path):
    """Exhaustive: every byte offset of a log with truncations across segments."""
    ops = [(0, 3, True, 0.3, 5), (0, 2, False, 0, 40), (2, 2, True, 0.5, 0), (0, 0, True, 0.0, 0),
           (0, 2, False, 0, 60), (3, 3, True, 0.2, 60), (0, 2, False, 0, 3)]
    base = tmp_path / "base"
    states, between, ends = _run_ops(base, ops, 250)
    assert len(segments(base)) >= 3
    for at in range(ends[-1] + 1):
        path = tmp_path / f"cut{at}"
        shutil.copytree(base, path)
        _cut(path, at)
        _check_prefix(path, at, states, between, ends, 250)
        shutil.rmtree(path)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS, where=st.floats(min_value=0.0, max_value=1.0),
       mask=st.integers(min_value=1, max_value=255))
def test_any_flipped_byte_yields_the_prefix_before_it(ops, where, mask):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        states, between, ends = _run_ops(path, ops, 1 << 20)
        seg = only_segment(path)
        data = bytearray(seg.read_bytes())
        pos = min(int(where * len(data)), len(data) - 1)
        data[pos] ^= mask
        seg.write_bytes(bytes(data))
        if bytes(data[:len(LOG_MAGIC)]) == b"KVSWAL1\n":     # now looks like the old format
            with DataDir(path) as dd, pytest.raises(PersistenceError, match="another format"):
                dd.load()
            return
        done = max((j for j, end in enumerate(ends) if end <= pos), default=0)
        allowed = [states[done]] + ([between[done + 1]] if done + 1 < len(ends) else [])
        dd, rec = reopen(path)
        assert rec.warnings
        assert any(same(log, rec.entries) for log, _ in allowed), (pos, rec.entries)
        # The hard state is the newest readable one: never older than the prefix's.
        assert rec.hard_state.term >= min(hs.term for _, hs in allowed)
        assert rec.hard_state.commit <= rec.last_index
        dd.close()
        _check_repaired(path, rec.entries)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=st.lists(st.integers(min_value=0, max_value=120_000), min_size=1, max_size=8),
       copy_after=st.integers(min_value=0, max_value=8), synced=st.booleans())
def test_crash_copy_of_live_dir_is_a_prefix(sizes, copy_after, synced):
    """Copy the data dir while the writer is mid-stream (buffered, maybe
    unsynced, large entries straddling buffer flushes and segment rotations):
    the copy always loads as a prefix of what was appended, and everything
    synced is there."""
    with tempfile.TemporaryDirectory() as tmp:
        live, crash = Path(tmp) / "live", Path(tmp) / "crash"
        dd, _ = reopen(live, segment_bytes=150_000)
        appended, synced_upto = [], 0
        for i, n in enumerate(sizes):
            e = Entry(1, i + 1, NORMAL, {"v": chr(0x41 + i % 26) * n})
            dd.append([e], HardState(1, "", i))
            appended.append(e)
            if synced and i % 2 == 0:
                dd.sync()
                synced_upto = len(appended)
            if i + 1 == copy_after:
                break
        shutil.copytree(live, crash, ignore=shutil.ignore_patterns("LOCK"))
        dd.close()
        dd2, rec = reopen(crash)
        assert same(appended[:len(rec.entries)], rec.entries)
        assert len(rec.entries) >= synced_upto
        assert rec.hard_state.commit <= len(rec.entries)
        dd2.close()


def test_snapshot_under_crash_keeps_older_state(tmp_path):
    """A crash while the snapshot is written (only .tmp exists) loses nothing."""
    live = tmp_path / "live"
    dd, _ = reopen(live)
    dd.append(ents(1, 5), HardState(1, "", 5))
    dd.sync()
    crash = tmp_path / "crash"

    def keys():
        yield "abc", 1, [Version(1, "vvv", 1, 0.0, "n")]
        shutil.copytree(live, crash, ignore=shutil.ignore_patterns("LOCK"))
        yield "abd", 1, [Version(1, "vvv", 2, 0.0, "n")]

    dd.write_snapshot(SnapshotState(5, 1, keys(), {}))
    dd.close()
    dd, rec = reopen(crash)
    assert rec.snapshot is None and same(ents(1, 5), rec.entries)
    assert rec.hard_state == HardState(1, "", 5)
    dd.close()


def test_snapshot_from_another_thread_while_appending(tmp_path):
    """The driver appends (with truncations) and syncs while another thread
    writes snapshots of committed positions; nothing is lost or reordered."""
    dd, _ = reopen(tmp_path, segment_bytes=4096)
    total = 3000
    done = threading.Event()
    errors: list[BaseException] = []
    committed = [0]

    def driver():
        try:
            for i in range(1, total + 1):
                dd.append(ents(i, 2, term=1 + i // 500, tag="t"),   # i+1 is replaced next round
                          HardState(1 + i // 500, "n1", i))
                committed[0] = i
                if i % 64 == 0:
                    dd.sync()
            dd.sync()
        except BaseException as e:      # pragma: no cover - reported below
            errors.append(e)
        finally:
            done.set()

    t = threading.Thread(target=driver)
    t.start()
    snaps = 0
    while not done.is_set() or snaps == 0:
        upto = committed[0]
        dd.write_snapshot(SnapshotState(upto, 1, [("abc", upto, [])], {}))
        snaps += 1
    t.join()
    assert not errors
    dd.close()
    dd, rec = reopen(tmp_path)
    assert rec.warnings == [] and snaps > 1
    assert [e.index for e in rec.entries] == list(range(rec.snapshot.index + 1, total + 2))
    assert all(e.term == 1 + min(e.index, total) // 500 for e in rec.entries)
    assert rec.hard_state == HardState(1 + total // 500, "n1", total)
    dd.close()
