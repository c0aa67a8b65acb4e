"""Watch, export/import and retention in the shell's library: the Follower with a fake
client (failover, lag, compaction, stop), the JSON Lines format, the import plan and its
request ids against a fake server; then the real thing against real clusters."""
from __future__ import annotations

import io
import json
import os
import re
import stat
import threading
import time

import pytest

from conftest import wait_until
from fakes import FakeRpcError

from kvs_shell.client import (LINEARIZABLE, Change, Client, ClientError, Compacted, ExportedKey,
                              FailedPrecondition, InvalidArgument, PermissionDenied,
                              ServerUnavailable, VersionInfo, WatchLagged, WatchMessage,
                              Read, Written)
from kvs_shell.transfer import (BadExportFile, ImportFailed, Planner, Record,
                                export_to, import_from, read_export, write_export)
from kvs_shell.watching import Connected, Follower, Reconnecting, Resumed


# ---------------------------------------------------------------------------
# fakes
# ---------------------------------------------------------------------------
class FakeStream:
    """A scripted watch: WatchMessages, then an exception to raise or (block=True) a wait
    until cancelled, else the end of the stream."""

    def __init__(self, server: str, items, block: bool = False):
        self.server = server
        self.items = list(items)
        self.block = block
        self.cancelled = threading.Event()

    def cancel(self):
        self.cancelled.set()

    def __iter__(self):
        for item in self.items:
            if self.cancelled.is_set():
                return
            if isinstance(item, BaseException):
                raise item
            yield item
        if self.block:
            assert self.cancelled.wait(10), "nobody cancelled the stream"


class FakeWatchClient:
    def __init__(self, streams):
        self.streams = list(streams)
        self.calls: list[tuple[str, int]] = []

    def watch(self, prefix, start):
        self.calls.append((prefix, start))
        if not self.streams:
            return FakeStream("none", [ServerUnavailable("no server left")])
        nxt = self.streams.pop(0)
        return nxt(start) if callable(nxt) else nxt


def put(pos, key="w-key", ver=1):
    return Change(pos, "put", key, ver, f"value-{pos}")


def msg(head, *positions):
    return WatchMessage(head, [put(p) for p in positions])


def changes(events):
    return [e.position for e in events if isinstance(e, Change)]


# ---------------------------------------------------------------------------
# Follower
# ---------------------------------------------------------------------------
def test_follower_resumes_across_failover_without_gap_or_duplicate():
    client = FakeWatchClient([
        FakeStream("a:1", [msg(10), msg(12, 11, 12), msg(13, 13),
                           ServerUnavailable("server a:1 is unreachable (connection reset)")]),
        # the next server lags behind and resends what we have already seen
        FakeStream("b:2", [msg(12), msg(13, 12, 13), msg(15, 14, 15)], block=True),
    ])
    f = Follower(client, "w-", initial_backoff=0.001)
    events = []
    for ev in f:
        events.append(ev)
        if changes(events)[-1:] == [15]:
            f.stop()
    assert changes(events) == [11, 12, 13, 14, 15]
    assert client.calls == [("w-", 0), ("w-", 14)]
    kinds = [type(e) for e in events if not isinstance(e, Change)]
    assert kinds == [Connected, Reconnecting, Resumed]
    assert events[0] == Connected("a:1", 10, 11)
    rec = next(e for e in events if isinstance(e, Reconnecting))
    assert rec.next_position == 14 and "unreachable" in rec.reason and not rec.lagged
    assert next(e for e in events if isinstance(e, Resumed)) == Resumed("b:2", 12, 14)
    assert f.dropped == 2 and f.delivered == 5 and f.next_position == 16


def test_follower_with_a_start_position_replays_from_there():
    client = FakeWatchClient([FakeStream("a:1", [msg(4), msg(7, 5, 6, 7)], block=True)])
    f = Follower(client, "", start=5)
    got = []
    for ev in f:
        got.append(ev)
        if changes(got)[-1:] == [7]:
            f.stop()
    assert client.calls == [("", 5)] and changes(got) == [5, 6, 7]
    assert got[0] == Connected("a:1", 4, 5)


def test_follower_resumes_after_lag_at_once():
    client = FakeWatchClient([
        FakeStream("a:1", [msg(1), msg(3, 2, 3), WatchLagged("watch: behind", resume=4)]),
        FakeStream("a:1", [msg(9), msg(9, 4, 5, 9)], block=True),
    ])
    f = Follower(client, initial_backoff=5.0)  # a lagged resume does not back off
    got = []
    t0 = time.monotonic()
    for ev in f:
        got.append(ev)
        if changes(got)[-1:] == [9]:
            f.stop()
    assert time.monotonic() - t0 < 4.0
    assert changes(got) == [2, 3, 4, 5, 9]
    assert client.calls == [("", 0), ("", 4)]
    assert [e.lagged for e in got if isinstance(e, Reconnecting)] == [True]


def test_follower_raises_compacted_to_the_caller():
    client = FakeWatchClient([
        FakeStream("a:1", [msg(1), msg(2, 2), ServerUnavailable("gone")]),
        FakeStream("b:2", [Compacted("watch: compacted ... oldest available position 50",
                                     oldest=50)]),
    ])
    got = []
    with pytest.raises(Compacted) as info:
        for ev in Follower(client, initial_backoff=0.001):
            got.append(ev)
    assert info.value.oldest == 50 and changes(got) == [2]
    assert client.calls[-1] == ("", 3)


def test_follower_does_not_retry_a_refusal():
    client = FakeWatchClient([FakeStream("a:1", [PermissionDenied("permission denied: no")])])
    with pytest.raises(PermissionDenied):
        list(Follower(client))
    assert len(client.calls) == 1


def test_follower_gives_up_after_its_reconnect_deadline():
    now = [0.0]
    client = FakeWatchClient([FakeStream("a:1", [msg(1), ServerUnavailable("down")])])

    def clock():
        now[0] += 1.0  # every look at the clock is one second later
        return now[0]

    f = Follower(client, reconnect_timeout=5.0, initial_backoff=0.0001, max_backoff=0.0001,
                 clock=clock)
    got = []
    with pytest.raises(ServerUnavailable, match="no server answered for 5s"):
        for ev in f:
            got.append(ev)
    attempts = [e.attempt for e in got if isinstance(e, Reconnecting)]
    assert attempts and attempts == list(range(1, len(attempts) + 1)) and len(attempts) <= 5


def test_follower_stop_from_another_thread_ends_a_blocked_stream():
    stream = FakeStream("a:1", [msg(3)], block=True)
    f = Follower(FakeWatchClient([stream]))
    got = []
    t = threading.Thread(target=lambda: got.extend(f))
    t.start()
    wait_until(lambda: got, 5, "the first event")
    f.stop()
    t.join(5)
    assert not t.is_alive() and stream.cancelled.is_set()
    assert got == [Connected("a:1", 3, 4)]


def test_follower_stop_interrupts_the_backoff():
    f = Follower(FakeWatchClient([FakeStream("a:1", [ServerUnavailable("down")])]),
                 initial_backoff=30.0)
    got = []
    t = threading.Thread(target=lambda: got.extend(f))
    t.start()
    wait_until(lambda: got, 5, "reconnecting")
    f.stop()
    t.join(5)
    assert not t.is_alive() and isinstance(got[0], Reconnecting)


# ---------------------------------------------------------------------------
# the JSON Lines format
# ---------------------------------------------------------------------------
def vi(version, value, seq):
    return VersionInfo(version, value, 1700000000.5 + seq, "node-1", seq)


def exported_items():
    return [(42, ExportedKey("exp-a", 3, [vi(1, "one", 1), vi(3, "three\nlines", 7)])),
            (42, ExportedKey("exp-b", 1, [vi(1, "ünï cödé ✓", 2)]))]


def test_write_and_read_export_round_trip():
    out = io.StringIO()
    s = write_export(out, exported_items(), prefix="exp-")
    assert (s.position, s.keys, s.versions) == (42, 2, 3)
    assert s.bytes == len(out.getvalue().encode())
    lines = out.getvalue().splitlines()
    head = json.loads(lines[0])
    assert head["kvs_export"] == 1 and head["position"] == 42 and head["prefix"] == "exp-"
    assert re.match(r"\d{4}-\d\d-\d\dT", head["exported_at"])
    assert json.loads(lines[2]) == {"key": "exp-a", "version": 3, "value": "three\nlines",
                                    "written_at": 1700000007.5, "node": "node-1", "position": 7}
    header, records = read_export(io.StringIO(out.getvalue()))
    assert header["position"] == 42
    assert [(r.line, r.key, r.version, r.value) for r in records] == [
        (2, "exp-a", 1, "one"), (3, "exp-a", 3, "three\nlines"), (4, "exp-b", 1, "ünï cödé ✓")]


def test_empty_export_still_has_its_position():
    out = io.StringIO()
    s = write_export(out, [], prefix="none-", position=lambda: 9)
    assert s.position == 9 and json.loads(out.getvalue())["position"] == 9


class FakeExportClient:
    def __init__(self, items, fail_after=None):
        self.items, self.fail_after = items, fail_after
        self.cancelled = False
        self.consistency = None

    def export(self, prefix, consistency=None):
        client = self
        self.consistency = consistency

        class Handle:
            position = None

            def cancel(self):
                client.cancelled = True

            def __iter__(self):
                for i, item in enumerate(client.items):
                    if client.fail_after is not None and i >= client.fail_after:
                        raise ServerUnavailable("server x is unreachable (connection reset)")
                    self.position = item[0]
                    yield item
        return Handle()


def test_export_to_writes_a_private_file_atomically(tmp_path):
    path = tmp_path / "out.jsonl"
    seen = []
    client = FakeExportClient(exported_items())
    s = export_to(client, path, "exp-", progress=lambda done, total: seen.append((done, total)))
    assert s.versions == 3 and s.path == str(path)
    assert client.consistency == LINEARIZABLE  # a backup holds every acknowledged write
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert seen == [(1, None), (2, None)]
    assert os.listdir(tmp_path) == ["out.jsonl"]


def test_a_failed_export_leaves_nothing_behind(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text("the previous export\n")
    client = FakeExportClient(exported_items(), fail_after=1)
    with pytest.raises(ServerUnavailable):
        export_to(client, path)
    assert path.read_text() == "the previous export\n"  # untouched
    assert os.listdir(tmp_path) == ["out.jsonl"] and client.cancelled


HEADER = '{"kvs_export": 1, "position": 5, "prefix": "", "exported_at": "2024-01-01T00:00:00+00:00"}'


def line(key, version, value="value", **extra):
    return json.dumps({"key": key, "version": version, "value": value, **extra})


@pytest.mark.parametrize("lines,bad_line,words", [
    ([], 1, "empty file"),
    (['{"kvs_export": 2}'], 1, "not a KVS export"),
    (["[1, 2]"], 1, "not a JSON object"),
    ([HEADER, line("abc", 1), "{not json"], 3, "not JSON"),
    ([HEADER, line("ab", 1)], 2, "'key' must be text of at least 3"),
    ([HEADER, line("abc", 0)], 2, "'version' must be an integer >= 1"),
    ([HEADER, line("abc", True)], 2, "'version' must be an integer"),
    ([HEADER, line("abc", 1, "xy")], 2, "'value'"),
    ([HEADER, line("abc", 2), line("abc", 2)], 3, "out of order"),
    ([HEADER, line("abd", 1), line("abc", 1)], 3, "out of order"),
    ([HEADER, line("abc", 1), ""], 3, "empty line"),
    ([HEADER, line("abc", 1, written_at="noon")], 2, "'written_at'"),
    (['{"kvs_export": 1, "position": 1, "prefix": "p-"}', line("abc", 1)], 2, "outside"),
])
def test_bad_files_name_the_line(lines, bad_line, words):
    with pytest.raises(BadExportFile) as info:
        header, records = read_export(io.StringIO("\n".join(lines) + ("\n" if lines else "")))
        list(records)
    assert info.value.line == bad_line and words in str(info.value)
    assert str(info.value).startswith(f"line {bad_line}: ")


# ---------------------------------------------------------------------------
# the import plan and its ids
# ---------------------------------------------------------------------------
def records(*pairs):
    return [Record(i + 2, k, v, f"val-{k}-{v}", line(k, v, f"val-{k}-{v}"))
            for i, (k, v) in enumerate(pairs)]


def plan(recs, **kw):
    return [[(p.key, p.version, p.record is None) for p in b.puts]
            for b in Planner(**kw).batches(recs)]


def test_gaps_are_filled_with_placeholders():
    got = plan(records(("aaa", 2), ("aaa", 3), ("aaa", 6), ("bbb", 1)), batch=10)
    assert got == [[("aaa", 1, True), ("aaa", 2, False), ("aaa", 3, False), ("aaa", 4, True),
                    ("aaa", 5, True), ("aaa", 6, False), ("bbb", 1, False)]]


def test_placeholders_go_with_their_line_into_its_batch():
    got = plan(records(("aaa", 1), ("aaa", 3), ("bbb", 2)), batch=1)
    assert got == [[("aaa", 1, False)], [("aaa", 2, True), ("aaa", 3, False)],
                   [("bbb", 1, True), ("bbb", 2, False)]]


def test_filling_is_capped_per_key():
    p = Planner(batch=100, max_fill=3)
    got = [[(x.key, x.version, x.record is None) for x in b.puts]
           for b in p.batches(records(("aaa", 3), ("aaa", 5), ("aaa", 9), ("bbb", 9),
                                      ("ccc", 4)))]
    # aaa: 1, 2 filled, 4 filled (3 in all), then the gap 6-8 would pass the cap
    assert got == [[("aaa", 1, True), ("aaa", 2, True), ("aaa", 3, False), ("aaa", 4, True),
                    ("aaa", 5, False), ("aaa", 9, False), ("bbb", 9, False),
                    ("ccc", 1, True), ("ccc", 2, True), ("ccc", 3, True), ("ccc", 4, False)]]
    assert p.unfilled == ["aaa", "bbb"] and p.unfilled_count == 2


def test_request_ids_are_deterministic_and_per_batch():
    recs = records(("aaa", 1), ("aaa", 2), ("bbb", 1), ("ccc", 1))
    ids = [(b.request_id, b.remove_id) for b in Planner(batch=2).batches(recs)]
    again = [(b.request_id, b.remove_id) for b in Planner(batch=2).batches(list(recs))]
    assert ids == again and len({i for pair in ids for i in pair}) == 4
    for rid in (i for pair in ids for i in pair):
        assert re.fullmatch(r"[A-Za-z0-9_-]{8,64}", rid)  # what the servers accept
    changed = recs[:3] + [Record(5, "ccc", 1, "other", line("ccc", 1, "other"))]
    ids2 = [b.request_id for b in Planner(batch=2).batches(changed)]
    assert ids2[0] == ids[0][0] and ids2[1] != ids[1][0]


# ---------------------------------------------------------------------------
# import against a fake server with the servers' request-id rule
# ---------------------------------------------------------------------------
class FakeKVS:
    """Versioned keys; a change with a known id answers its first outcome."""

    def __init__(self):
        self.keys: dict[str, dict[int, str]] = {}
        self.max: dict[str, int] = {}
        self.ids: dict[str, int] = {}
        self.changes = 0
        self.fail_at: int | None = None  # refuse the n-th new change (no quorum)
        self.timeout = 5.0

    def _once(self, rid, fn):
        if rid in self.ids:
            return self.ids[rid]
        if self.fail_at is not None and self.changes + 1 >= self.fail_at:
            return None
        self.changes += 1
        self.ids[rid] = out = fn()
        return out

    def mput(self, pairs, request_id=None, timeout=None):
        out = []
        for i, (k, v) in enumerate(pairs):
            def apply(k=k, v=v):
                ver = self.max.get(k, 0) + 1
                self.max[k] = ver
                self.keys.setdefault(k, {})[ver] = v
                return ver
            ver = self._once(f"{request_id}.{i}", apply)
            out.append(Written(k, -1, "no quorum: test") if ver is None else Written(k, ver))
        return out

    def mdel(self, items, request_id=None, timeout=None):
        out = []
        for i, (k, v) in enumerate(items):
            def apply(k=k, v=v):
                return v if self.keys.get(k, {}).pop(v, None) is not None else -1
            ver = self._once(f"{request_id}.{i}", apply)
            out.append(Written(k, -1, "no quorum: test") if ver is None else Written(k, ver))
        return out

    def mget(self, items):
        out = []
        for k, v in items:
            live = [n for n in self.keys.get(k, {}) if n <= v]
            n = max(live) if live else 0
            out.append(Read(k, self.keys[k][n] if n else "", n, v))
        return out

    def history(self):
        return {k: sorted(vs.items()) for k, vs in self.keys.items() if vs}


def export_text(hist: dict[str, list[tuple[int, str]]], prefix="") -> str:
    out = io.StringIO()
    items = [(7, ExportedKey(k, vs[-1][0], [vi(v, val, v) for v, val in vs]))
             for k, vs in sorted(hist.items())]
    write_export(out, items, prefix)
    return out.getvalue()


SOURCE = {"imp-a": [(1, "a-one"), (2, "a-two")],
          "imp-b": [(3, "b-three"), (5, "b-five")],     # 1, 2 and 4 removed
          "imp-c": [(1, "c-one")]}


def test_import_reproduces_versions_and_a_rerun_writes_nothing(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(export_text(SOURCE))
    kvs = FakeKVS()
    seen = []
    s = import_from(kvs, path, progress=lambda d, t: seen.append((d, t)), batch=2)
    assert kvs.history() == SOURCE
    assert (s.keys, s.versions, s.total, s.placeholders, s.renumbered, s.batches) == (3, 5, 5, 3, 0, 3)
    assert s.complete and s.line == 6 and s.position == 7
    assert seen[0] == (0, 5) and seen[-1] == (5, 5)
    assert [d for d, _t in seen] == sorted(d for d, _t in seen)
    changes_before = kvs.changes
    s2 = import_from(kvs, path, batch=2)
    assert kvs.changes == changes_before and kvs.history() == SOURCE
    assert (s2.versions, s2.renumbered) == (5, 0)


def test_a_rerun_long_after_writes_nothing_even_when_the_ids_are_forgotten(tmp_path):
    """The servers remember the last 100,000 change ids; an import of more versions than
    that must still not be written twice: batches already on the target are skipped."""
    path = tmp_path / "in.jsonl"
    path.write_text(export_text(SOURCE))
    kvs = FakeKVS()
    import_from(kvs, path, batch=2)
    kvs.ids.clear()                      # the cluster forgot every id of the first run
    changes_before = kvs.changes
    s = import_from(kvs, path, batch=2)
    assert kvs.changes == changes_before and kvs.history() == SOURCE
    assert (s.skipped, s.versions, s.keys, s.complete) == (5, 5, 3, True)


def test_import_appends_to_existing_keys_as_renumbered(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(export_text(SOURCE))
    kvs = FakeKVS()
    kvs.mput([("imp-a", "already-here")])
    s = import_from(kvs, path)
    assert s.renumbered == 1 and s.renumbered_keys == ["imp-a"]
    assert kvs.history()["imp-a"] == [(1, "already-here"), (2, "a-one"), (3, "a-two")]
    assert kvs.history()["imp-b"] == SOURCE["imp-b"]


def test_a_bad_line_stops_the_import_before_any_write(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(export_text(SOURCE) + '{"key": "imp-z"}\n')
    kvs = FakeKVS()
    with pytest.raises(BadExportFile, match="line 7: 'version'"):
        import_from(kvs, path)
    assert kvs.changes == 0


def test_a_refused_write_says_how_far_and_a_rerun_finishes(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(export_text(SOURCE))
    kvs = FakeKVS()
    kvs.fail_at = 4  # a-one, a-two (batch 0), placeholder 1 of imp-b; placeholder 2 is refused
    with pytest.raises(ImportFailed) as info:
        import_from(kvs, path, batch=2)
    s = info.value.summary
    assert not s.complete and s.line == 3 and s.versions == 2
    assert "lines up to 3 are imported" in str(info.value) and "no quorum" in str(info.value)
    kvs.fail_at = None
    assert import_from(kvs, path, batch=2).complete
    assert kvs.history() == SOURCE


def test_import_from_a_file_object():
    kvs = FakeKVS()
    s = import_from(kvs, io.StringIO(export_text(SOURCE)))
    assert s.complete and kvs.history() == SOURCE


def test_too_many_gaps_are_reported_and_renumbered(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(export_text({"far-key": [(5000, "late"), (5001, "later")]}))
    kvs = FakeKVS()
    s = import_from(kvs, path)
    assert kvs.history() == {"far-key": [(1, "late"), (2, "later")]}
    assert s.unfilled == 1 and s.unfilled_keys == ["far-key"] and s.renumbered == 1
    assert s.placeholders == 0


def test_a_placeholder_dropped_by_the_target_first_is_fine(tmp_path):
    class Pruning(FakeKVS):  # like a target with a retention policy: old versions go
        def mput(self, pairs, request_id=None, timeout=None):
            out = super().mput(pairs, request_id, timeout)
            for (k, v), w in zip(pairs, out):
                if v.startswith("(kvs import"):
                    self.keys[k].pop(w.version, None)
            return out

    path = tmp_path / "in.jsonl"
    path.write_text(export_text(SOURCE))
    kvs = Pruning()
    assert import_from(kvs, path).complete and kvs.history() == SOURCE


# ---------------------------------------------------------------------------
# client: error translation without a server
# ---------------------------------------------------------------------------
def test_watch_errors_carry_their_positions():
    import grpc
    c = Client("127.0.0.1:1")
    try:
        e = c._watch_failed(FakeRpcError(
            grpc.StatusCode.FAILED_PRECONDITION, "compacted: position 3 is no longer kept here;"
            " oldest available position 120 (re-read the snapshot, ...)"))
        assert isinstance(e, Compacted) and e.oldest == 120
        e = c._watch_failed(FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                         "watcher fell too far behind; resume from position 77"))
        assert isinstance(e, WatchLagged) and e.resume == 77
        e = c._watch_failed(FakeRpcError(grpc.StatusCode.UNAVAILABLE, "Socket closed"))
        assert isinstance(e, ServerUnavailable)
        e = c._ext_failed(FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "beyond"))
        assert isinstance(e, InvalidArgument) and isinstance(e, ClientError)
    finally:
        c.close()


# ---------------------------------------------------------------------------
# real servers
# ---------------------------------------------------------------------------
def _history_of(client: Client, prefix: str) -> dict[str, list[tuple[int, str]]]:
    return {k.key: [(v.version, v.value) for v in k.versions]
            for _pos, k in client.export(prefix, consistency=LINEARIZABLE)}


@pytest.mark.integration
def test_export_import_round_trip_of_10k_keys(cluster3_logs, solo, tmp_path):
    src = Client(cluster3_logs.addresses, timeout=60)
    dst = Client(solo.addresses, timeout=60)
    try:
        prefix = "rt-"
        n = 10_000
        keys = [f"{prefix}{i:05d}" for i in range(n)]
        for i in range(0, n, 2000):  # version 1 of every key
            assert all(w.ok for w in src.mput([(k, f"v1-{k}") for k in keys[i:i + 2000]]))
        multi = keys[::10]  # 1,000 keys get versions 2..4
        for ver in (2, 3, 4):
            assert all(w.ok for w in src.mput([(k, f"v{ver}-{k}") for k in multi]))
        # gaps: version 2 removed from some, version 1 from others, 4 (the last) from a few
        assert all(w.ok for w in src.mdel([(k, 2) for k in multi[::3]]))
        assert all(w.ok for w in src.mdel([(k, 1) for k in multi[1::3]]))
        assert all(w.ok for w in src.mdel([(k, 4) for k in multi[2::9]]))
        gone = keys[5::50]  # and some keys lose everything (not exported)
        assert all(w.ok for w in src.mdel([(k, None) for k in gone]))
        expected = _history_of(src, prefix)
        assert len(expected) == n - len(gone)

        path = tmp_path / "rt.jsonl"
        es = export_to(src, path, prefix)
        assert es.keys == len(expected) and es.versions == sum(map(len, expected.values()))
        head = json.loads(path.open().readline())
        assert head["prefix"] == prefix and head["position"] == es.position > 0

        done = []
        s = import_from(dst, path, progress=lambda d, t: done.append((d, t)))
        assert s.complete and s.renumbered == 0 and s.unfilled == 0
        assert s.versions == es.versions and s.keys == es.keys and s.placeholders > 0
        assert done[-1] == (es.versions, es.versions)
        assert _history_of(dst, prefix) == expected
        # the contract's reads agree too
        k = multi[0]  # versions 1, 3, 4: Consulta(k, 2) answers version 1
        assert dst.get(k, 2).version == 1 and dst.get(k).value == f"v4-{k}"

        before = dst.retention().position
        s2 = import_from(dst, path)
        assert s2.complete and s2.renumbered == 0
        assert dst.retention().position == before  # nothing new in the log
        assert _history_of(dst, prefix) == expected
    finally:
        src.close()
        dst.close()


@pytest.mark.integration
def test_compact_and_retention(solo):
    c = Client(solo.addresses)
    try:
        for i in range(4):
            assert c.put("ret-key", f"value-{i}").ok
        info = c.retention()
        assert info.keep_versions == 0 and info.compacted == 0 and info.position >= 4
        done = c.compact(info.position)
        assert done.compacted == info.position and done.oldest_watch > 1
        with pytest.raises(InvalidArgument, match="beyond"):
            c.compact(info.position + 1000)
        with pytest.raises(FailedPrecondition):  # already compacted past it
            c.compact(1)
        with pytest.raises(Compacted) as exc:
            list(c.watch("ret-", 1))
        assert exc.value.oldest == done.oldest_watch
        assert c.retention(2).keep_versions == 2 and c.retention().keep_versions == 2
        assert c.put("ret-key", "value-4").ok
        wait_until(lambda: [v.version for v in c.history("ret-key").versions] == [5, 4], 10,
                   "retention to keep two versions")
        with pytest.raises(InvalidArgument):
            c.retention(-1)
    finally:
        c.close()


def _collect(follower: Follower, out: list, errors: list):
    try:
        for ev in follower:
            out.append(ev)
    except Exception as exc:  # noqa: BLE001 - the test looks at it
        errors.append(exc)


@pytest.mark.integration
def test_follower_sees_puts_and_removes_in_order(cluster3_logs):
    client = Client(cluster3_logs.addresses)
    f = Follower(client, "fw-")
    events: list = []
    errors: list = []
    t = threading.Thread(target=_collect, args=(f, events, errors), daemon=True)
    t.start()
    try:
        wait_until(lambda: events, 10, "the watch to start")
        assert isinstance(events[0], Connected)
        client.put("fw-one", "first")
        client.put("other-key", "not watched")
        client.put("fw-one", "second")
        client.put("fw-two", "third")
        client.delete("fw-one", 1)
        client.delete("fw-two")
        seen = lambda: [(c.op, c.key, c.version, c.value, c.all_versions)  # noqa: E731
                        for c in events if isinstance(c, Change)]
        wait_until(lambda: len(seen()) >= 5, 10, "five changes")
        assert seen() == [("put", "fw-one", 1, "first", False), ("put", "fw-one", 2, "second", False),
                          ("put", "fw-two", 1, "third", False), ("remove", "fw-one", 1, "", False),
                          ("remove", "fw-two", 1, "", True)]
        positions = [c.position for c in events if isinstance(c, Change)]
        assert positions == sorted(set(positions))
    finally:
        f.stop()
        t.join(10)
        client.close()
    assert not t.is_alive() and not errors


@pytest.mark.integration
def test_follower_survives_the_loss_of_its_server(tmp_path):
    """The follower's client knows servers A and B.  A is killed; if the watch was not on
    A, A comes back and B is killed: either way the watch moves at least once."""
    from kvs_cluster import Cluster
    with Cluster(n=3, workdir=tmp_path / "c") as cluster:
        cluster.wait_ready(60)
        a, b = cluster.servers[0], cluster.servers[1]
        client = Client([a.address, b.address], timeout=10)
        writer = Client(cluster.addresses, timeout=10)
        f = Follower(client, "fo-", reconnect_timeout=60)
        events: list = []
        errors: list = []
        t = threading.Thread(target=_collect, args=(f, events, errors), daemon=True)
        t.start()
        written: list = []

        def write(i):  # retried under one request id: applied once whatever happens
            try:
                [w] = writer.mput([(f"fo-{i % 7:03d}", f"value-{i}")],
                                  request_id=f"fo-test-write-{i:04d}")
            except ClientError:
                return False
            if w.ok:
                written.append((w.key, w.version, f"value-{i}"))
            return w.ok

        def got():
            return [(c.key, c.version, c.value) for c in events if isinstance(c, Change)]

        def resumed():
            return sum(isinstance(e, Resumed) for e in events)

        try:
            wait_until(lambda: events, 20, "the watch to start")
            for i in range(30):
                wait_until(lambda: write(i), 30, f"write {i}")
            a.kill()
            for i in range(30, 60):
                wait_until(lambda: write(i), 60, f"write {i} after killing A")
            wait_until(lambda: len(got()) >= len(written), 60, "every change after killing A")
            if not resumed():  # the watch was on B
                a.restart()
                a.wait_ready(60)
                b.kill()
                for i in range(60, 90):
                    wait_until(lambda: write(i), 60, f"write {i} after killing B")
                wait_until(lambda: len(got()) >= len(written), 60, "every change after killing B")
            assert got() == written  # each once, in order (one writer)
            assert resumed() >= 1 and any(isinstance(e, Reconnecting) for e in events)
            assert not errors
        finally:
            f.stop()
            t.join(10)
            client.close()
            writer.close()
        assert not t.is_alive()
