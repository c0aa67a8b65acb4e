"""Watch and retention with real servers and Mosquitto (issue 12).

- a watch resumed on another server after a kill -9 of its own sees every committed
  change exactly once, in order;
- a laggard is cancelled with RESOURCE_EXHAUSTED and resumes without a gap;
- a compacted start position gets FAILED_PRECONDITION "compacted" with the oldest position;
- replicas stay identical after Compact and a retention change, across a state transfer
  and a restart;
- memory stays bounded with --keep-versions (and grows without it).
"""
from __future__ import annotations

import re
import threading
import time
import uuid
from pathlib import Path

import grpc
import pytest

from conftest import stub, wait_until
from kvs_cluster import Cluster
from kvs_proto import kvs_pb2

CV = kvs_pb2.ChaveValor


def uid() -> str:
    return uuid.uuid4().hex[:8]


class Watch:
    """A Watch call read by a thread; keeps every change and how it ended."""

    def __init__(self, s, prefix: str, start: int = 0):
        self.call = s.ext.Watch(kvs_pb2.WatchRequest(prefix=prefix, start_position=start))
        self.heads: list[int] = []
        self.changes: list = []
        self.error: grpc.RpcError | None = None
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        try:
            for msg in self.call:
                self.heads.append(msg.head)
                self.changes.extend(msg.changes)
        except grpc.RpcError as e:
            self.error = e

    def next_position(self) -> int:
        last = self.changes[-1].position if self.changes else 0
        return max(last, self.heads[0] if self.heads else 0) + 1

    def stop(self):
        self.call.cancel()
        self._t.join(10)


def leader_of(stubs):
    def find():
        for s in stubs:
            try:
                if s.status().role == "leader":
                    return s
            except grpc.RpcError:
                pass
        return None
    return wait_until(find, 30, "a leader")


def versions(s, key: str) -> list[tuple]:
    h = s.history(key)
    return sorted((v.versao, v.valor, v.seq) for v in h.versions)


def exported(s) -> tuple:
    """Everything a replica holds, with write metadata, and its retention state."""
    rows = []
    for chunk in s.ext.Export(kvs_pb2.ExportRequest(), timeout=60):
        for k in chunk.keys:
            rows.append((k.chave, k.max_version,
                         tuple((v.versao, v.valor, v.seq, v.written_at, v.node)
                               for v in k.versions)))
    r = s.ext.Retention(kvs_pb2.RetentionRequest(), timeout=10)
    return (r.keep_versions, r.compacted, r.position), rows


# ---------------------------------------------------------------------------
def test_watch_resumed_after_kill_9_sees_every_change_once_in_order(tmp_path):
    with Cluster(n=3, workdir=tmp_path / "c", persistent=True) as c:
        c.wait_ready(timeout=60)
        stubs = [stub(a) for a in c.addresses]
        victim_stub = leader_of(stubs)       # the hardest case: its server also leads
        victim = c.servers[stubs.index(victim_stub)]
        others = [s for s in stubs if s is not victim_stub]
        p = f"w-{uid()}/"
        w1 = Watch(victim_stub, p)
        wait_until(lambda: w1.heads, 10, "the watch's first message")
        acked: list[tuple[str, int]] = []
        stop = threading.Event()

        def writer():
            i = 0
            while not stop.is_set():
                s = others[i % 2]
                try:
                    v = s.kvs.Insere(CV(chave=f"{p}k{i % 7}", valor=f"value-{i}"), timeout=10)
                    if v.versao > 0:
                        acked.append((f"{p}k{i % 7}", v.versao))
                except grpc.RpcError:
                    pass
                i += 1
        t = threading.Thread(target=writer, daemon=True)
        t.start()
        try:
            wait_until(lambda: len(w1.changes) >= 40, 30, "changes before the kill")
            victim.kill()
            wait_until(lambda: w1.error is not None, 20, "the first watch to break")
            resume = w1.next_position()
            n_before = len(acked)
            w2 = Watch(others[0], p, start=resume)
            wait_until(lambda: len(acked) >= n_before + 40, 60, "writes after the failover")
        finally:
            stop.set()
            t.join(30)
        final = list(acked)
        seen = w1.changes + []

        def complete():
            got = {(ch.chave, ch.versao) for ch in seen + w2.changes}
            return set(final) <= got
        wait_until(complete, 30, "every acknowledged write in the watch")
        w2.stop()
        events = w1.changes + w2.changes
        positions = [e.position for e in events]
        assert positions == sorted(set(positions)), "a change seen twice or out of order"
        assert len({(e.chave, e.versao) for e in events}) == len(events)
        assert set(final) <= {(e.chave, e.versao) for e in events}, "an acked write is missing"
        # no gap: the watch saw exactly the positions that wrote the prefix's versions
        written = sorted(seq for k in {k for k, _ in final} for _, _, seq in versions(others[0], k))
        assert [pos for pos in positions if pos <= written[-1]] == written
        assert all(e.op == "put" and e.valor.startswith("value-") for e in events)


def test_laggard_gets_resource_exhausted_and_resumes_without_gap(tmp_path):
    with Cluster(n=1, workdir=tmp_path / "c", persistent=False,
                 extra_args=("--watch-buffer-bytes", "200000")) as c:
        c.wait_ready(timeout=60)
        s = stub(c.addresses[0])
        p = f"lag-{uid()}/"
        # a watcher that reads nothing: gRPC flow control stops the server's writes and
        # its queue fills up, while the writes go on at full speed
        call = s.ext.Watch(kvs_pb2.WatchRequest(prefix=p))
        first = next(call)
        big = "x" * 60_000
        reqs = [CV(chave=f"{p}k{i}", valor=f"{i}:{big}") for i in range(200)]
        t0 = time.monotonic()
        out = list(s.kvs.InsereVarias(iter(reqs), timeout=60))
        assert all(v.versao == 1 for v in out)
        assert time.monotonic() - t0 < 30
        got = []
        with pytest.raises(grpc.RpcError) as e:
            for msg in call:
                got.extend(msg.changes)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details()
        m = re.search(r"resume from position (\d+)", e.value.details())
        assert m, e.value.details()
        resume = int(m.group(1))
        assert got and resume == got[-1].position + 1 or not got and resume == first.head + 1
        rest = []
        w = Watch(s, p, start=resume)
        wait_until(lambda: len(got) + len(w.changes) >= 200, 30, "the rest after resuming")
        w.stop()
        rest = w.changes
        keys = [ch.chave for ch in got + rest]
        assert keys == [f"{p}k{i}" for i in range(200)], "gap or duplicate across the resume"


def test_compacted_start_position_is_refused_with_the_oldest_position(tmp_path):
    with Cluster(n=1, workdir=tmp_path / "c", persistent=True) as c:
        c.wait_ready(timeout=60)
        s = stub(c.addresses[0])
        for i in range(10):
            s.insere("cmp/key", f"value-{i}")
        pos = s.ext.Retention(kvs_pb2.RetentionRequest(), timeout=5).position
        info = s.ext.Compact(kvs_pb2.CompactRequest(position=pos - 2), timeout=10)
        assert info.compacted == pos - 2 and info.dropped == 6 and info.oldest_watch == pos - 2
        with pytest.raises(grpc.RpcError) as e:
            list(s.ext.Watch(kvs_pb2.WatchRequest(start_position=3), timeout=5))
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert e.value.details().startswith("compacted:")
        assert f"oldest available position {pos - 2}" in e.value.details()
        # the oldest position itself is fine
        w = Watch(s, "cmp/", start=pos - 2)
        wait_until(lambda: len(w.changes) >= 3, 10, "changes from the oldest position")
        w.stop()
        assert [ch.position for ch in w.changes[:3]] == [pos - 2, pos - 1, pos]
        # the version live at the position (7, written at pos - 3) stays, with all newer
        assert [v for v, _, _ in versions(s, "cmp/key")] == [7, 8, 9, 10]
        # Consulta of a compacted version answers as for a removed one
        assert s.consulta("cmp/key", 3) == ("cmp/key", "", 0)
        assert s.consulta("cmp/key", 8)[1] == "value-7"
        # versions are never reused; compacting again at or below is refused
        assert s.insere("cmp/key", "value-10") == 11
        for bad, code in ((pos - 2, grpc.StatusCode.FAILED_PRECONDITION),
                          (10**9, grpc.StatusCode.INVALID_ARGUMENT)):
            with pytest.raises(grpc.RpcError) as e:
                s.ext.Compact(kvs_pb2.CompactRequest(position=bad), timeout=10)
            assert e.value.code() == code, e.value.details()
        # a graceful stop ends open watches at once, saying so (UNAVAILABLE: resume elsewhere)
        w = Watch(s, "cmp/")
        wait_until(lambda: w.heads, 10, "the watch's first message")
        t0 = time.monotonic()
        c.servers[0].stop()
        wait_until(lambda: w.error is not None, 10, "the watch to end")
        assert w.error.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in (w.error.details() or ""), w.error.details()
        assert time.monotonic() - t0 < 5
        # after a restart the compaction still holds (it is in the log and the snapshots)
        c.servers[0].restart()
        c.wait_ready(timeout=60)
        s = stub(c.addresses[0])
        assert s.ext.Retention(kvs_pb2.RetentionRequest(), timeout=5).compacted == pos - 2
        assert [v for v, _, _ in versions(s, "cmp/key")] == [7, 8, 9, 10, 11]


def test_replicas_identical_after_compaction_across_state_transfer_and_restart(tmp_path):
    # small snapshot interval and log tail: a newcomer must take a state transfer
    args = ("--snapshot-every", "100", "--log-keep-entries", "20")
    with Cluster(n=3, workdir=tmp_path / "c", persistent=True, extra_args=args) as c:
        c.wait_ready(timeout=60)
        stubs = [stub(a) for a in c.addresses]
        p = f"rep-{uid()}/"
        for i in range(150):
            stubs[i % 3].insere(f"{p}k{i % 10}", f"value-{i}")
        mid = stubs[0].ext.Retention(kvs_pb2.RetentionRequest(), timeout=5).position
        stubs[1].ext.Compact(kvs_pb2.CompactRequest(position=mid - 50), timeout=10)
        info = stubs[2].ext.Retention(kvs_pb2.RetentionRequest(set=True, keep_versions=4),
                                      timeout=10)
        assert info.keep_versions == 4 and info.dropped > 0
        for i in range(150, 210):
            stubs[i % 3].insere(f"{p}k{i % 10}", f"value-{i}")
        newbie = c.add_server(persistent=True)
        newbie.wait_ready(timeout=90)
        nstub = stub(newbie.address)
        all_stubs = stubs + [nstub]

        def same():
            views = [exported(s) for s in all_stubs]
            return all(v == views[0] for v in views) and views[0]
        view = wait_until(same, 60, "identical replicas after the join")
        assert view[0][:2] == (4, mid - 50)
        rows = view[1]
        assert len(rows) == 10 and all(len(vs) == 4 for _, _, vs in rows)
        assert all(mx == 21 for _, mx, _ in rows)   # 210 writes over 10 keys: numbers kept
        log = Path(newbie.log_path).read_text() if getattr(newbie, "log_path", None) else \
            newbie.log_text()
        assert "state transfer done" in log, "the newcomer should have taken a state transfer"
        # restart every server: the same state comes back from the data dirs
        for srv in c.servers:
            srv.restart()
        c.wait_ready(timeout=90)
        all_stubs = [stub(a) for a in c.addresses]
        view2 = wait_until(same, 60, "identical replicas after the restart")
        assert view2 == view


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_memory_stays_bounded_with_keep_versions(tmp_path):
    """10,000 writes of 4 KiB to 20 keys (40 MB of values): without retention every
    version stays in memory; with --keep-versions 5 the store holds 100 of them."""
    common = ("--watch-history", "2000", "--snapshot-every", "200", "--log-keep-entries", "10")
    growth = {}
    for keep in (None, 5):
        extra = common + (("--keep-versions", str(keep)) if keep is not None else ())
        with Cluster(n=1, workdir=tmp_path / f"k{keep}", persistent=False,
                     extra_args=extra) as c:
            c.wait_ready(timeout=60)
            s = stub(c.addresses[0])
            if keep is not None:
                wait_until(lambda: s.ext.Retention(kvs_pb2.RetentionRequest(),
                                                   timeout=5).keep_versions == keep,
                           20, "the leader to propose --keep-versions")
            pid = c.servers[0].pid
            s.insere("mem/warm", "x" * 2048)
            base = _rss_kib(pid)
            for batch in range(20):
                reqs = [CV(chave=f"mem/k{i % 20}", valor=f"{batch}-{i}-" + "x" * 4096)
                        for i in range(500)]
                assert all(v.versao > 0 for v in s.kvs.InsereVarias(iter(reqs), timeout=60))
            growth[keep] = _rss_kib(pid) - base
            h = s.history("mem/k3")
            assert h.max_version == 500
            assert len(h.versions) == (500 if keep is None else 5)
    print(f"\n[watch] RSS growth after 10k writes of 4 KiB: without retention "
          f"{growth[None] / 1024:.1f} MiB, --keep-versions 5 {growth[5] / 1024:.1f} MiB")
    assert growth[None] > 30 * 1024, growth
    assert growth[5] < growth[None] / 3, growth
