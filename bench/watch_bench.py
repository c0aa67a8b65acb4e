#!/usr/bin/env python
"""Benchmark of Watch fan-out, retention (--keep-versions) and export/import.

    .venv/bin/python bench/watch_bench.py            # full run (~10 min on 2 cores)
    .venv/bin/python bench/watch_bench.py --quick    # < 60 s smoke run (small counts, 1 rep)
    .venv/bin/python bench/watch_bench.py --only fanout --reps 5

Phases (``--only fanout,retention,transfer``):

fanout     1 server with a data dir (and 3 servers unless ``--fanout-servers 1``). For W in
           0, 1, 10, 100 watchers (prefix ""), a fixed number of Insere with 64 in flight.
           The writer is a load generator process (bench/loadgen.py's worker loop with a
           count-based Insere added); the W watchers are ONE other asyncio process holding
           all W streams (10 per connection), started fresh for every measurement, so
           neither the writer's nor the harness's CPU is theirs. Figures: write changes/s
           with W watchers and its ratio to W=0 (median of --reps; the W values are
           interleaved rep by rep), delivered changes/s (W x writes / time from the first
           write until the last watcher got the last change), and a completeness check:
           every watcher must receive every position from its first head + 1 to the end
           position once (gaps and duplicates are counted). A watcher cut with
           RESOURCE_EXHAUSTED (it fell behind) resumes from the position the error names,
           as kvs_shell.watching.Follower does; the cuts are counted. CPU seconds of every
           process (server(s), broker, writer, watchers) are read from /proc around each
           measurement. With 3 servers the writes go to the leader and watcher i watches
           server i mod 3.
retention  1 server with a data dir, per configuration: without --keep-versions, and with
           --keep-versions 10. N writes (1,000,000; --quick 20,000) to 100 keys, values of
           32 bytes, through 4 InsereVarias streams in parallel (50,000 items per call).
           VmRSS / VmHWM of the server (/proc/PID/status) before and after (after = once
           the server is idle again, no snapshot being written), write rate, History length
           of one key, data dir size.
transfer   cluster A (1 server, data dir) loaded with 100,000 keys (--quick 2,000): 90 % with
           1 version, 8 % with 2, 2 % with 3 (values ~32 bytes). kvs_shell.transfer.export_to
           to a file, import_from into a fresh cluster B (1 server, data dir), Export on both
           compared (every key's (version, value) list and max_version), then the same import
           again: it must write nothing (B's position, RetentionInfo.position, unchanged).

The harness never asserts speed. Exit status 1 if anything errored or a check failed (a
watcher missed a change, replicas of an export differ, a rerun of an import wrote).
Writes bench/results/watch.json (``--quick``: $TMPDIR/kvs-watch-bench-quick.json unless --out
is given, so a smoke run never overwrites the full figures).
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import itertools
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
for p in (str(ROOT), str(BENCH)):
    if p not in sys.path:
        sys.path.insert(0, p)

import grpc  # noqa: E402

import loadgen  # noqa: E402  (bench/loadgen.py: channels, the JSON-lines worker loop)
from kvs_common.channel import make_channel  # noqa: E402
from kvs_proto import kvs_pb2, kvs_pb2_grpc  # noqa: E402
from harness import cpu_model, make_log, status, wait_until  # noqa: E402  (bench/harness.py)
from worker import WorkerProcess  # noqa: E402  (bench/worker.py)

PY = sys.executable
BROKER_TUNING = "set_tcp_nodelay true"   # as bench/run.py and `kvs_cluster up`
WATCHERS_PER_CONN = 10
# retention, second setting: snapshots (and in-memory log compaction) every 2,000 entries,
# 200 kept behind, so the Raft log held in memory does not hide what retention frees
SMALL_LOG = "--snapshot-every 2000 --log-keep-entries 200"
perf = time.perf_counter
CLK_TCK = os.sysconf("SC_CLK_TCK")


log = make_log("watch-bench")


# =============================================================================
# writer worker: bench/loadgen.py's --serve loop with three more commands
# =============================================================================
async def insere_count(target: str, n: int, concurrency: int = 64, keys: int = 1000,
                       key_prefix: str = "wb-", timeout: float = 30.0) -> dict:
    """Exactly ``n`` Insere, ``concurrency`` in flight (closed loop), cycling over ``keys`` keys."""
    stub = loadgen._stub(target)
    reqs = [kvs_pb2.ChaveValor(chave=f"{key_prefix}{i:06d}", valor=loadgen.VALUE)
            for i in range(min(keys, n) or 1)]
    todo = iter(range(n))
    lats: list[float] = []
    errors = 0
    first_error = None

    async def worker() -> None:
        nonlocal errors, first_error
        for i in todo:   # shared iterator: each index taken once
            t0 = perf()
            try:
                r = await stub.Insere(reqs[i % len(reqs)], timeout=timeout)
            except grpc.RpcError as e:
                errors += 1
                first_error = first_error or f"{e.code()}: {e.details()}"
                continue
            lats.append(perf() - t0)
            if r.versao <= 0:
                errors += 1
                first_error = first_error or f"Insere returned {r.versao}"

    t_start = perf()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    t_end = perf()
    el = t_end - t_start
    return {"kind": "insere_count", "n": n, "concurrency": concurrency, "ok_writes": len(lats),
            "t_start": t_start, "t_end": t_end, "elapsed_s": el, "rate": len(lats) / el if el else 0.0,
            "errors": errors, "first_error": first_error, **loadgen.lat_summary(lats)}


def _value(i: int, length: int) -> str:
    head = f"val-{i:010d}-"
    return (head + "x" * length)[:length] if length >= len(head) else head


class _Tally:
    """Replies and errors of InsereVarias calls (the first error kept for the report)."""

    def __init__(self) -> None:
        self.done = 0
        self.errors = 0
        self.first_error: str | None = None

    def error(self, what: str) -> None:
        self.errors += 1
        self.first_error = self.first_error or what

    def result(self, kind: str, elapsed: float, **extra) -> dict:
        return {"kind": kind, **extra, "replies": self.done, "elapsed_s": elapsed,
                "rate": self.done / elapsed if elapsed else 0.0, "errors": self.errors,
                "first_error": self.first_error}


def _chunks(items, size: int):
    it = iter(items)
    while part := list(itertools.islice(it, size)):
        yield part


async def _insert_streams(target: str, streams: int, items_of, chunk: int,
                          timeout: float) -> tuple[_Tally, float]:
    """``streams`` InsereVarias streams in parallel, stream ``s`` writing ``items_of(s)``;
    each call carries at most ``chunk`` items, then the stream opens a new call."""
    stub = loadgen._stub(target)
    tally = _Tally()

    async def one(s: int) -> None:
        for part in _chunks(items_of(s), chunk):
            got = 0
            try:
                async for r in stub.InsereVarias(iter(part), timeout=timeout):
                    got += 1
                    if r.versao <= 0:
                        tally.error(f"InsereVarias returned {r.versao}")
            except grpc.RpcError as e:
                tally.error(f"{e.code()}: {e.details()}")
            if got != len(part):
                tally.error(f"{got} replies for {len(part)} items")
            tally.done += got

    t0 = perf()
    await asyncio.gather(*(one(s) for s in range(streams)))
    return tally, perf() - t0


async def stream_writes(target: str, total: int, streams: int = 4, keys: int = 100,
                        key_prefix: str = "r", value_len: int = 32, chunk: int = 50_000,
                        timeout: float = 900.0) -> dict:
    """``total`` inserts to ``keys`` keys through ``streams`` InsereVarias streams."""
    def items(s: int):
        return (kvs_pb2.ChaveValor(chave=f"{key_prefix}{i % keys:03d}", valor=_value(i, value_len))
                for i in range(s, total, streams))

    tally, el = await _insert_streams(target, streams, items, chunk, timeout)
    return tally.result("stream_writes", el, total=total, streams=streams, keys=keys,
                        value_len=value_len)


def versions_of(i: int) -> int:
    """Transfer data set: 2 % of the keys have 3 versions, 8 % 2, the rest 1."""
    return 3 if i % 50 == 0 else 2 if i % 10 == 0 else 1


async def load_versions(target: str, keys: int, key_prefix: str = "t", streams: int = 2,
                        chunk: int = 20_000, timeout: float = 900.0) -> dict:
    """Keys ``<prefix>NNNNNN`` with versions_of(i) versions each, values ~32 bytes."""
    def items(s: int):
        for v in (1, 2, 3):
            for i in range(s, keys, streams):
                if versions_of(i) >= v:
                    yield kvs_pb2.ChaveValor(chave=f"{key_prefix}{i:06d}",
                                             valor=f"value-{i:06d}-v{v}-" + "y" * 14)

    tally, el = await _insert_streams(target, streams, items, chunk, timeout)
    return tally.result("load_versions", el, keys=keys)


def writer_main() -> int:
    loadgen.COMMANDS.update({"insere_count": insere_count, "stream_writes": stream_writes,
                             "load_versions": load_versions})
    asyncio.run(loadgen.serve())
    return 0


class Worker(WorkerProcess):
    """The writer worker in its own process; one JSON command per line (as run.py's LoadGen)."""

    def __init__(self):
        super().__init__([PY, str(Path(__file__).resolve()), "--worker", "writer"], "writer", log,
                         cwd=ROOT, timeout=1800.0)


# =============================================================================
# watchers worker: W Watch streams in one asyncio process
# =============================================================================
_RESUME_RE = re.compile(r"resume from position (\d+)")


class WState:
    __slots__ = ("i", "target", "head0", "next", "count", "gaps", "dups", "irregular", "cancelled",
                 "error", "t_first", "t_last", "msgs")

    def __init__(self, i: int, target: str):
        self.i, self.target = i, target
        self.head0 = None
        self.next = None
        self.count = self.gaps = self.dups = self.irregular = self.cancelled = self.msgs = 0
        self.error = None
        self.t_first = self.t_last = None


async def watchers_async(targets: list[str], count: int, per_conn: int, prefix: str) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout
    chans: dict[tuple, grpc.aio.Channel] = {}
    states = [WState(i, targets[i % len(targets)]) for i in range(count)]
    ready = asyncio.Event()
    n_ready = 0
    stopping = False

    def stub_for(st: WState):
        key = (st.target, st.i // (per_conn * len(targets)))
        ch = chans.get(key)
        if ch is None:
            ch = make_channel(st.target, aio=True, options=[
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
                ("grpc.use_local_subchannel_pool", 1)])   # its own TCP connection
            chans[key] = ch
        return kvs_pb2_grpc.KVSExtStub(ch)

    async def run(st: WState) -> None:
        nonlocal n_ready
        stub = stub_for(st)
        start = 0
        while True:
            call = stub.Watch(kvs_pb2.WatchRequest(prefix=prefix, start_position=start))
            try:
                async for msg in call:
                    ch = msg.changes
                    if st.next is None:          # the very first message: where it starts
                        st.head0 = msg.head
                        st.next = msg.head + 1
                        n_ready += 1
                        if n_ready == count:
                            ready.set()
                        continue
                    n = len(ch)
                    if not n:
                        continue
                    st.msgs += 1
                    first, last = ch[0].position, ch[-1].position
                    if last - first + 1 != n:
                        st.irregular += 1        # positions not contiguous inside one message
                    if first > st.next:
                        st.gaps += first - st.next
                    elif first < st.next:        # a resume replayed some: skip them
                        over = min(n, st.next - first)
                        st.dups += over
                        n -= over
                    if n > 0:
                        st.count += n
                        st.next = last + 1
                        now = perf()
                        if st.t_first is None:
                            st.t_first = now
                        st.t_last = now
                if not stopping:
                    st.error = "stream ended by the server without an error"
                return
            except grpc.aio.AioRpcError as e:
                if stopping:
                    return
                if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    st.cancelled += 1
                    m = _RESUME_RE.search(e.details() or "")
                    start = int(m.group(1)) if m else (st.next or 0)
                    continue
                st.error = f"{e.code().name}: {e.details()}"
                if st.next is None:
                    n_ready += 1
                    if n_ready == count:
                        ready.set()
                return

    tasks = [asyncio.ensure_future(run(st)) for st in states]
    if count == 0:
        ready.set()
    try:
        await asyncio.wait_for(ready.wait(), 60)
    except asyncio.TimeoutError:
        pass
    t = os.times()
    out.write(json.dumps({"ready": True, "pid": os.getpid(), "opened": n_ready, "cpu_s": t.user + t.system,
                          "heads": sorted({st.head0 for st in states if st.head0 is not None}),
                          "connections": len(chans)}) + "\n")
    out.flush()
    line = await reader.readline()
    cmd = json.loads(line) if line else {"end": 0, "timeout": 0}
    end, deadline = cmd["end"], perf() + cmd.get("timeout", 60)
    while perf() < deadline and any(st.error is None and (st.next or 0) <= end for st in states):
        await asyncio.sleep(0.01)
    t = os.times()
    cpu_done = t.user + t.system
    stopping = True
    waited_out = [st.i for st in states if st.error is None and (st.next or 0) <= end]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for ch in chans.values():
        await ch.close()
    expected = [end - st.head0 if st.head0 is not None else None for st in states]
    complete = sum(1 for st, e in zip(states, expected)
                   if e is not None and st.count == e and st.gaps == 0 and st.error is None)
    errs = [f"watcher {st.i}: {st.error}" for st in states if st.error][:5]
    res = {
        "watchers": count, "end": end, "connections": len(chans), "cpu_s": cpu_done,
        "heads": sorted({st.head0 for st in states if st.head0 is not None}),
        "expected_each": sorted({e for e in expected if e is not None}),
        "received_total": sum(st.count for st in states),
        "received_min": min((st.count for st in states), default=0),
        "received_max": max((st.count for st in states), default=0),
        "complete": complete, "incomplete": count - complete,
        "gaps_total": sum(st.gaps for st in states), "dups_total": sum(st.dups for st in states),
        "irregular_msgs": sum(st.irregular for st in states),
        "messages_total": sum(st.msgs for st in states),
        "cancelled_total": sum(st.cancelled for st in states),
        "watchers_cancelled": sum(1 for st in states if st.cancelled),
        "not_done_at_deadline": len(waited_out), "errors": errs,
        "t_first_min": min((st.t_first for st in states if st.t_first), default=None),
        "t_last_max": max((st.t_last for st in states if st.t_last), default=None),
        "t_last_min": min((st.t_last for st in states if st.t_last), default=None),
    }
    out.write(json.dumps(res) + "\n")
    out.flush()


def watchers_main(args) -> int:
    targets = [t for t in args.targets.split(",") if t]
    asyncio.run(watchers_async(targets, args.count, args.per_conn, args.prefix))
    return 0


class Watchers:
    """One watchers process for one measurement."""

    def __init__(self, targets: list[str], count: int, per_conn: int = WATCHERS_PER_CONN):
        self.proc = subprocess.Popen(
            [PY, str(Path(__file__).resolve()), "--worker", "watchers", "--targets", ",".join(targets),
             "--count", str(count), "--per-conn", str(per_conn)],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.pid = self.proc.pid
        line = self._line(90)
        if not line.get("ready"):
            raise RuntimeError(f"watchers did not start: {line}")
        self.hello = line
        if line["opened"] != count:
            raise RuntimeError(f"only {line['opened']} of {count} watch streams opened")

    def _line(self, timeout: float) -> dict:
        box: list = []
        t = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()), daemon=True)
        t.start()
        t.join(timeout)
        if not box or not box[0]:
            raise RuntimeError(f"watchers process: no answer within {timeout}s (exit {self.proc.poll()})")
        return json.loads(box[0])

    def finish(self, end: int, timeout: float) -> dict:
        self.proc.stdin.write(json.dumps({"end": end, "timeout": timeout}) + "\n")
        self.proc.stdin.flush()
        res = self._line(timeout + 60)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return res

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# =============================================================================
# small helpers
# =============================================================================
def position(addr: str, timeout: float = 5.0) -> int:
    """The last log position (change number) applied at ``addr`` (RetentionInfo.position;
    Status.applied_seq counts log entries, not positions)."""
    with make_channel(addr) as ch:
        return kvs_pb2_grpc.KVSExtStub(ch).Retention(kvs_pb2.RetentionRequest(set=False),
                                                      timeout=timeout).position


def settle(addrs: list[str], timeout: float = 180.0) -> float:
    """Until every server is in-step at one position, no background snapshot being written."""
    t0 = perf()

    def quiet():
        sts = [status(a) for a in addrs]
        if any(st is None or st.state != "in-step" or st.snapshotting for st in sts):
            return False
        return len({st.applied_seq for st in sts} | {st.leader_seq for st in sts if st.leader_seq}) == 1

    wait_until(quiet, timeout, f"{addrs} quiet")
    return perf() - t0


def cpu_s(pid: int | None) -> float | None:
    """utime + stime of a process (all its threads), seconds."""
    if not pid:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


def mem_kb(pid: int) -> dict:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            out[k] = int(v.split()[0])
    return out


def dir_bytes(path: Path) -> int:
    total = 0
    for dp, _dn, fn in os.walk(path):
        for f in fn:
            try:
                total += os.path.getsize(os.path.join(dp, f))
            except OSError:
                pass
    return total


def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def find_leader(addrs: list[str]) -> str:
    def pick():
        for a in addrs:
            st = status(a)
            if st is not None and st.leader and st.node_id == st.leader and st.state == "in-step":
                return a
        return None
    return wait_until(pick, 60, "a leader")


# =============================================================================
# phases
# =============================================================================
class Ctx:
    def __init__(self, args, quick: bool):
        self.args = args
        self.quick = quick
        self.reps = args.reps or (1 if quick else 3)
        self.watchers = [int(x) for x in args.watchers.split(",")] if args.watchers else [0, 1, 10, 100]
        self.fanout_writes = args.fanout_writes or (1000 if quick else 20_000)
        self.fanout_servers = [int(x) for x in args.fanout_servers.split(",")] if args.fanout_servers \
            else ([1] if quick else [1, 3])
        self.retention_writes = args.retention_writes or (20_000 if quick else 1_000_000)
        self.retention_reps = args.retention_reps or 1
        sets = args.retention_server_args if args.retention_server_args is not None else (
            "" if quick else ";" + SMALL_LOG)
        # each set: extra server flags ("": the defaults), for both configurations
        self.retention_snaps = [x.strip() or None for x in sets.split(";")]
        self.transfer_keys = args.transfer_keys or (2000 if quick else 100_000)
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.workdir: Path | None = None
        self.writer: Worker | None = None

    def fail(self, msg: str) -> None:
        log("ERROR " + msg)
        self.errors.append(msg)

    def warn(self, msg: str) -> None:
        log("WARNING " + msg)
        self.warnings.append(msg)


def fanout_one(ctx: Ctx, c, leader: str, addrs: list[str], w: int) -> dict:
    settle_s = settle(addrs)
    watch_targets = addrs if len(addrs) > 1 else [leader]
    # watcher i -> server i mod n (n = 1: the only server); start it from the leader's list
    # order so W=1 watches the leader
    watch_targets = [leader] + [a for a in watch_targets if a != leader]
    wp = Watchers(watch_targets, w)
    try:
        head0 = position(leader)
        if wp.hello["heads"] and wp.hello["heads"] != [head0]:
            ctx.warn(f"W={w}: watchers started at heads {wp.hello['heads']}, the leader is at {head0}")
        pids = {"server" + (f"[{i}]" if len(c.servers) > 1 else ""): s.pid for i, s in enumerate(c.servers)}
        pids.update({"broker": c.broker.pid, "writer": ctx.writer.pid, "watchers": wp.pid})
        cpu0 = {k: cpu_s(p) for k, p in pids.items()}
        wr = ctx.writer.call("insere_count", target=leader, n=ctx.fanout_writes, concurrency=64,
                             keys=1000, key_prefix="wb-")
        end = position(leader)
        cpu1 = {k: cpu_s(p) for k, p in pids.items()}
        wres = wp.finish(end, timeout=max(30.0, 6.0 * wr["elapsed_s"]))
        # the watchers may still be receiving: their CPU until the last change is in their answer
        cpu0["watchers"], cpu1["watchers"] = wp.hello.get("cpu_s"), wres.get("cpu_s")
        for k in [k for k in pids if k.startswith("server") or k == "broker"]:
            c1 = cpu_s(pids[k])   # the servers' too (a watcher still catching up costs server CPU)
            cpu1[k] = c1 if c1 is not None else cpu1[k]
    finally:
        wp.kill()
    cpu = {k: round(cpu1[k] - cpu0[k], 2) for k in pids if cpu0[k] is not None and cpu1[k] is not None}
    positions = end - head0
    res = {"watchers": w, "writes": wr["ok_writes"], "write_errors": wr["errors"],
           "first_error": wr["first_error"], "write_s": wr["elapsed_s"], "write_rate": wr["rate"],
           "p50_ms": wr["p50_ms"], "p99_ms": wr["p99_ms"], "head0": head0, "end": end,
           "positions": positions, "settle_s": round(settle_s, 3), "cpu_s": cpu, "watch": wres}
    if w:
        t_done = wres.get("t_last_max")
        deliver_s = (t_done - wr["t_start"]) if t_done else None
        res["deliver_s"] = deliver_s
        res["delivered"] = wres["received_total"]
        res["delivered_rate"] = wres["received_total"] / deliver_s if deliver_s else None
        res["tail_ms"] = (t_done - wr["t_end"]) * 1000 if t_done else None
    return res


def phase_fanout(ctx: Ctx, n: int) -> dict:
    from kvs_cluster.launcher import Cluster

    name = f"{n}srv"
    log(f"phase fanout, {n} server(s): W in {ctx.watchers}, {ctx.fanout_writes:,} writes each, "
        f"{ctx.reps} rep(s)")
    out: dict = {"servers": n, "writes_per_run": ctx.fanout_writes, "reps": {}, "summary": {}}
    with Cluster(n=n, workdir=ctx.workdir / f"fanout-{name}", persistent=True,
                 broker_conf=BROKER_TUNING) as c:
        c.wait_ready(timeout=60)
        addrs = c.addresses
        leader = find_leader(addrs)
        out["layout"] = {"writes to": leader, "watcher i watches": "server i mod n, leader first",
                         "servers": addrs}
        ctx.writer.call("insere_count", target=leader, n=500, concurrency=64, key_prefix="wb-")  # warm-up
        reps: dict[int, list[dict]] = {w: [] for w in ctx.watchers}
        for r in range(ctx.reps):
            order = ctx.watchers[r % len(ctx.watchers):] + ctx.watchers[:r % len(ctx.watchers)]
            for w in order:
                try:
                    res = fanout_one(ctx, c, leader, addrs, w)
                except Exception as e:
                    ctx.fail(f"fanout {name} W={w} rep {r}: {type(e).__name__}: {e}")
                    traceback.print_exc()
                    continue
                reps[w].append(res)
                ws = res["watch"]
                log(f"  {name} W={w:3d} rep {r}: writes {res['write_rate']:,.0f}/s"
                    + (f", delivered {res['delivered_rate']:,.0f}/s, complete {ws['complete']}/{w},"
                       f" cut {ws['cancelled_total']}, tail {res['tail_ms']:.0f} ms"
                       if w and res.get("delivered_rate") else "")
                    + f", cpu {res['cpu_s']}")
                check_fanout(ctx, name, r, res)
        dead = [s.address for s in c.servers if not s.alive()]
        if dead:
            ctx.fail(f"fanout {name}: server(s) died: {dead}")
    base = med([x["write_rate"] for x in reps.get(0, [])])

    def srv_cpu(x):
        return sum(v for k, v in x["cpu_s"].items() if k.startswith("server"))

    base_cpu = med([srv_cpu(x) / x["writes"] for x in reps.get(0, []) if x["writes"]])
    for w, rs in reps.items():
        if not rs:
            continue
        rate = med([x["write_rate"] for x in rs])
        # the ratio per rep against the W=0 run of the same rep, then the median
        per_rep = []
        for i, x in enumerate(rs):
            b = reps.get(0, [])
            if i < len(b) and b[i]["write_rate"]:
                per_rep.append(x["write_rate"] / b[i]["write_rate"])
        cpu_keys = rs[0]["cpu_s"].keys()
        s = {"write_rate": rate, "ratio_to_w0": (rate / base) if base and w else (1.0 if w == 0 else None),
             "ratio_to_w0_per_rep_median": med(per_rep) if w else 1.0,
             "p50_ms": med([x["p50_ms"] for x in rs]), "p99_ms": med([x["p99_ms"] for x in rs]),
             "cpu_s_per_1k_writes": {k: round(med([x["cpu_s"].get(k, 0) / x["writes"] * 1000
                                                   for x in rs if x["writes"]]) or 0, 3) for k in cpu_keys},
             "reps": len(rs)}
        if w:
            s.update({
                "delivered_rate": med([x.get("delivered_rate") for x in rs]),
                "deliver_s": med([x.get("deliver_s") for x in rs]),
                "tail_ms": med([x.get("tail_ms") for x in rs]),
                "complete_all_reps": all(x["watch"]["incomplete"] == 0 for x in rs),
                "incomplete_watchers": sum(x["watch"]["incomplete"] for x in rs),
                "gaps": sum(x["watch"]["gaps_total"] for x in rs),
                "dups": sum(x["watch"]["dups_total"] for x in rs),
                "cancelled_total": sum(x["watch"]["cancelled_total"] for x in rs),
                "watchers_cancelled_max": max(x["watch"]["watchers_cancelled"] for x in rs),
                # the servers' extra CPU (over W=0, per write) per watch message sent
                "server_us_per_watch_msg": med([
                    (srv_cpu(x) / x["writes"] - base_cpu) * x["writes"] / x["watch"]["messages_total"] * 1e6
                    for x in rs if base_cpu is not None and x["writes"] and x["watch"]["messages_total"]]),
                "changes_per_msg": med([x["watch"]["received_total"] / x["watch"]["messages_total"]
                                        for x in rs if x["watch"]["messages_total"]]),
            })
        out["summary"][str(w)] = s
        out["reps"][str(w)] = rs
    return out


def check_fanout(ctx: Ctx, name: str, r: int, res: dict) -> None:
    w, ws = res["watchers"], res["watch"]
    where = f"fanout {name} W={w} rep {r}"
    if res["write_errors"]:
        ctx.fail(f"{where}: {res['write_errors']} write error(s), first: {res['first_error']}")
    if res["positions"] != res["writes"]:
        ctx.warn(f"{where}: {res['positions']} positions for {res['writes']} writes")
    if not w:
        return
    if ws["incomplete"] or ws["gaps_total"] or ws["errors"]:
        ctx.fail(f"{where}: SHORTFALL: {ws['incomplete']} of {w} watchers did not get every change "
                 f"(received {ws['received_min']}..{ws['received_max']} of {ws['expected_each']}, "
                 f"gaps {ws['gaps_total']}, not done at deadline {ws['not_done_at_deadline']}, "
                 f"errors {ws['errors']})")
    if ws["dups_total"]:
        ctx.warn(f"{where}: {ws['dups_total']} duplicate changes after resumes (skipped)")
    if ws["cancelled_total"]:
        ctx.warn(f"{where}: {ws['watchers_cancelled']} watcher(s) cut with RESOURCE_EXHAUSTED "
                 f"({ws['cancelled_total']} cuts), resumed")


# ----------------------------------------------------------------------------- retention
def count_history(client, key: str) -> dict:
    live = 0
    before = 0
    pages = 0
    maxv = 0
    while True:
        h = client.history(key, limit=10_000, before_version=before)
        pages += 1
        live += len(h.versions)
        maxv = h.max_version
        if not h.more or not h.versions:
            break
        before = h.versions[-1].version
    return {"key": key, "live_versions": live, "max_version": maxv, "pages": pages}


def _snap_label(snap: str | None) -> str:
    return f" {snap}" if snap else ""


def _snap_args(snap: str | None) -> list[str]:
    return snap.split() if snap else []


def retention_one(ctx: Ctx, keep: int | None, rep: int, snap: str | None = None) -> dict:
    from kvs_cluster.launcher import Cluster
    from kvs_shell.client import Client

    label = (f"keep{keep}" if keep else "all") + _snap_label(snap)
    extra = (["--keep-versions", str(keep)] if keep else []) + _snap_args(snap)
    wd = f"ret-{'keep' + str(keep) if keep else 'all'}-{ctx.retention_snaps.index(snap)}-{rep}"
    with Cluster(n=1, workdir=ctx.workdir / wd, persistent=True,
                 broker_conf=BROKER_TUNING, extra_args=extra) as c:
        c.wait_ready(timeout=60)
        s = c.servers[0]
        addr = s.address
        with Client([addr], timeout=30) as client:
            if keep:
                wait_until(lambda: client.retention().keep_versions == keep, 30,
                           f"retention keep_versions={keep} to be in effect")
            settle([addr])
            before = mem_kb(s.pid)
            cpu0 = cpu_s(s.pid)
            wr = ctx.writer.call("stream_writes", target=addr, total=ctx.retention_writes, streams=4,
                                 keys=100, key_prefix="r", value_len=32)
            cpu1 = cpu_s(s.pid)
            during = mem_kb(s.pid)
            idle_s = settle([addr], timeout=600)
            after = mem_kb(s.pid)
            hist = count_history(client, "r000")
            info = client.retention()
            st = status(addr)
        data = dir_bytes(s.data_dir) if s.data_dir else None
        res = {"config": label, "keep_versions": keep,
               "server_args": extra, "log_entries_applied": st.applied_seq if st else None,
               "snapshots_written": sum(1 for ln in s.log_text().splitlines()
                                        if "snapshot at index" in ln and "written" in ln),
               "data_dir": True, "writes": wr["replies"],
               "write_errors": wr["errors"], "first_error": wr["first_error"], "write_s": wr["elapsed_s"],
               "write_rate": wr["rate"], "server_cpu_s": round(cpu1 - cpu0, 2) if cpu0 is not None else None,
               "rss_before_kb": before["VmRSS"], "hwm_before_kb": before["VmHWM"],
               "rss_end_of_writes_kb": during["VmRSS"],
               "rss_after_kb": after["VmRSS"], "hwm_after_kb": after["VmHWM"],
               "idle_wait_s": round(idle_s, 2), "history": hist, "position": info.position,
               "retention_keep": info.keep_versions, "keys": st.keys if st else None,
               "data_dir_bytes": data}
    if wr["errors"]:
        ctx.fail(f"retention {label}: {wr['errors']} write error(s), first: {wr['first_error']}")
    want = min(keep, ctx.retention_writes // 100) if keep else ctx.retention_writes // 100
    if hist["live_versions"] != want:
        ctx.fail(f"retention {label}: History of r000 has {hist['live_versions']} live versions, "
                 f"expected {want}")
    return res


def phase_retention(ctx: Ctx) -> dict:
    log(f"phase retention: {ctx.retention_writes:,} writes to 100 keys, without and with "
        f"--keep-versions 10, server flag sets {ctx.retention_snaps}, {ctx.retention_reps} rep(s)")
    reps: dict[str, list[dict]] = {}
    for r in range(ctx.retention_reps):
        for snap in ctx.retention_snaps:
            for keep in ((None, 10) if r % 2 == 0 else (10, None)):
                label = (f"keep{keep}" if keep else "all") + _snap_label(snap)
                reps.setdefault(label, [])
                try:
                    res = retention_one(ctx, keep, r, snap)
                except Exception as e:
                    ctx.fail(f"retention {label} rep {r}: {type(e).__name__}: {e}")
                    traceback.print_exc()
                    continue
                reps[label].append(res)
                log(f"  {label:6s} rep {r}: {res['write_rate']:,.0f} writes/s, RSS {res['rss_before_kb']/1024:.0f}"
                    f" -> {res['rss_after_kb']/1024:.0f} MiB, HWM {res['hwm_after_kb']/1024:.0f} MiB, History "
                    f"{res['history']['live_versions']} (max {res['history']['max_version']}), data dir "
                    f"{(res['data_dir_bytes'] or 0)/2**20:.0f} MiB")
    summary = {}
    for label, rs in reps.items():
        if not rs:
            continue
        summary[label] = {k: med([x[k] for x in rs]) for k in (
            "write_rate", "write_s", "server_cpu_s", "rss_before_kb", "hwm_before_kb", "rss_end_of_writes_kb",
            "rss_after_kb", "hwm_after_kb", "data_dir_bytes", "log_entries_applied", "snapshots_written")}
        summary[label]["history_live_versions"] = rs[0]["history"]["live_versions"]
        summary[label]["history_max_version"] = rs[0]["history"]["max_version"]
        summary[label]["reps"] = len(rs)
    return {"writes": ctx.retention_writes, "keys": 100, "value_len": 32, "streams": 4,
            "data_dir": True, "summary": summary, "reps": reps}


# ----------------------------------------------------------------------------- transfer
def export_state(client) -> tuple[dict, int]:
    """key -> (max_version, ((version, value), ...)) via Export; and the export's position."""
    handle = client.export("", consistency="linearizable")
    state: dict[str, list] = {}
    for _pos, k in handle:
        cur = state.get(k.key)
        vs = [(v.version, v.value) for v in k.versions]
        if cur is None:
            state[k.key] = [k.max_version, vs]
        else:   # a key continued in the next chunk
            cur[1].extend(vs)
    return {k: (m, tuple(v)) for k, (m, v) in state.items()}, handle.position or 0


def count_file_keys(path: Path) -> int:
    keys = 0
    prev = None
    with open(path, encoding="utf-8") as f:
        next(f, None)   # header
        for line in f:
            k = json.loads(line)["key"]
            if k != prev:
                keys += 1
                prev = k
    return keys


def compare_states(a: dict, b: dict) -> dict:
    only_a = [k for k in a if k not in b]
    only_b = [k for k in b if k not in a]
    diff = [k for k in a if k in b and a[k] != b[k]]
    return {"keys_a": len(a), "keys_b": len(b), "only_a": len(only_a), "only_b": len(only_b),
            "different": len(diff), "examples": (only_a[:3] + only_b[:3] + diff[:3]),
            "identical": not (only_a or only_b or diff)}


def phase_transfer(ctx: Ctx) -> dict:
    try:
        from kvs_shell import transfer
    except ImportError as e:
        raise RuntimeError(f"kvs_shell.transfer not importable ({e}): export/import not measured")
    out = transfer_once(ctx, transfer, ctx.transfer_keys, "")
    keep_ids = getattr(transfer, "KEEP_IDS", None)
    if out.get("rerun", {}).get("positions_written") and keep_ids and not ctx.quick:
        # the servers remember the last KEEP_IDS change ids (one per imported version): show
        # that below that window the rerun is the no-op it is meant to be
        n_small = 0
        while sum(versions_of(i) for i in range(n_small + 10_000)) <= keep_ids * 0.9:
            n_small += 10_000
        if n_small:
            out["below_id_window"] = transfer_once(ctx, transfer, n_small, "small-")
    return out


def transfer_once(ctx: Ctx, transfer, n: int, tag: str) -> dict:
    from kvs_cluster.launcher import Cluster
    from kvs_shell.client import Client

    expected_versions = sum(versions_of(i) for i in range(n))
    log(f"phase transfer: {n:,} keys ({expected_versions:,} versions), export_to / import_from / rerun")
    out: dict = {"keys": n, "versions": expected_versions, "layout": "A and B: 1 server each, with a data dir",
                 "api": "kvs_shell.transfer.export_to(client, path) / import_from(client, path) "
                        f"(batch {transfer.DEFAULT_BATCH} lines)"}
    path = ctx.workdir / f"{tag}export.jsonl"
    with Cluster(n=1, workdir=ctx.workdir / f"{tag}xfer-A", persistent=True, broker_conf=BROKER_TUNING) as ca, \
            Cluster(n=1, workdir=ctx.workdir / f"{tag}xfer-B", persistent=True, broker_conf=BROKER_TUNING) as cb:
        ca.wait_ready(timeout=60)
        cb.wait_ready(timeout=60)
        a, b = ca.addresses[0], cb.addresses[0]
        ld = ctx.writer.call("load_versions", target=a, keys=n, key_prefix="t", streams=2)
        out["load"] = {k: ld[k] for k in ("replies", "elapsed_s", "rate", "errors")}
        if ld["errors"]:
            ctx.fail(f"transfer: loading A: {ld['errors']} errors, first: {ld['first_error']}")
        settle([a])
        with Client([a], timeout=60) as cla, Client([b], timeout=60) as clb:
            t0 = perf()
            es = transfer.export_to(cla, path)
            t_exp = perf() - t0
            size = path.stat().st_size
            file_keys = count_file_keys(path)
            out["export"] = {"s": t_exp, "keys": file_keys, "summary_keys": es.keys, "versions": es.versions,
                             "position": es.position, "file_bytes": size, "file_mb": size / 1e6,
                             "keys_per_s": file_keys / t_exp, "versions_per_s": es.versions / t_exp}
            log(f"  export_to: {file_keys:,} keys / {es.versions:,} versions in {t_exp:.2f} s, "
                f"{size/1e6:.1f} MB")
            if file_keys != n or es.versions != expected_versions:
                ctx.fail(f"transfer: the export file holds {file_keys} keys / {es.versions} versions, "
                         f"expected {n} / {expected_versions}")
            if es.keys != file_keys:
                ctx.warn(f"transfer: ExportSummary.keys says {es.keys:,}, the file holds {file_keys:,} "
                         f"distinct keys (a key split across two Export chunks is counted twice)")
            settle([b])
            pos_b0 = clb.retention().position
            t0 = perf()
            im = transfer.import_from(clb, path)
            t_imp = perf() - t0
            settle([b])
            pos_b1 = clb.retention().position
            out["import"] = {"s": t_imp, "keys": im.keys, "versions": im.versions, "batches": im.batches,
                             "placeholders": im.placeholders, "renumbered": im.renumbered,
                             "complete": im.complete, "keys_per_s": im.keys / t_imp,
                             "versions_per_s": im.versions / t_imp,
                             "positions_written": pos_b1 - pos_b0}
            log(f"  import_from: {im.keys:,} keys / {im.versions:,} versions in {t_imp:.2f} s "
                f"({pos_b1 - pos_b0:,} positions written)")
            t0 = perf()
            sa, posa = export_state(cla)
            sb, posb = export_state(clb)
            t_ver = perf() - t0
            cmp1 = compare_states(sa, sb)
            out["verify"] = {**cmp1, "s": t_ver, "export_rpc_keys_per_s": (len(sa) + len(sb)) / t_ver}
            if not cmp1["identical"]:
                ctx.fail(f"transfer: A and B differ after the import: {cmp1}")
            # the same import again: must write nothing
            t0 = perf()
            try:
                im2 = transfer.import_from(clb, path)
                rerun_err = None
            except Exception as e:
                im2, rerun_err = None, f"{type(e).__name__}: {e}"
            t_re = perf() - t0
            settle([b])
            pos_b2 = clb.retention().position
            sb2, _ = export_state(clb)
            cmp2 = compare_states(sa, sb2)
            new = pos_b2 - pos_b1
            out["rerun"] = {"s": t_re, "positions_written": new, "error": rerun_err,
                            "renumbered": im2.renumbered if im2 else None,
                            "keys_per_s": (im2.keys / t_re) if im2 else None,
                            "max_version_sum_before": sum(m for m, _ in sb.values()),
                            "max_version_sum_after": sum(m for m, _ in sb2.values()),
                            "still_identical_to_A": cmp2["identical"], "compare": cmp2,
                            "change_ids_remembered": getattr(transfer, "KEEP_IDS", None)}
            log(f"  rerun: {t_re:.2f} s, {new:,} new positions, still identical: {cmp2['identical']}")
            if rerun_err:
                ctx.fail(f"transfer: the rerun of the import failed: {rerun_err}")
            if new:
                ctx.fail(f"transfer: CHECK FAILED: the rerun of the import of {n:,} keys WROTE {new:,} "
                         f"new changes (expected 0); {expected_versions:,} versions imported (one change "
                         f"id each) vs {getattr(transfer, 'KEEP_IDS', '?'):,} change ids the servers "
                         f"remember (FIFO): the first batches' ids were forgotten, and each rewritten "
                         f"batch evicts the ids of the batches after it")
    if not ctx.args.keep:
        path.unlink(missing_ok=True)
    return out


# =============================================================================
# output
# =============================================================================
def fmt(v, d: int = 0) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, (int, float)):
        return f"{v:,.{d}f}"
    return str(v)


def print_tables(doc: dict) -> None:
    m = doc["meta"]
    print(f"KVS watch/retention/transfer bench {m['date']} — {m['mode']} run, {m['cpus']} CPUs, "
          f"load avg start {m['loadavg_start']} end {m.get('loadavg_end')}")
    for name, f in doc.get("fanout", {}).items():
        print(f"\nFan-out, {name} ({f['writes_per_run']:,} Insere at 64 in flight per run, "
              f"median of {max(s['reps'] for s in f['summary'].values()) if f['summary'] else 0} rep(s))")
        rows = [["W", "writes/s", "× W=0", "(per-rep)", "p99 ms", "delivered/s", "tail ms", "complete",
                 "cuts", "chg/msg", "srv µs/msg", "cpu ms/1k writes: server / writer / watchers"]]
        for w, s in f["summary"].items():
            cpu = s["cpu_s_per_1k_writes"]
            srv = sum(v for k, v in cpu.items() if k.startswith("server"))
            rows.append([w, fmt(s["write_rate"]), fmt(s["ratio_to_w0"], 2),
                         fmt(s["ratio_to_w0_per_rep_median"], 2), fmt(s["p99_ms"], 1),
                         fmt(s.get("delivered_rate")) if w != "0" else "",
                         fmt(s.get("tail_ms")) if w != "0" else "",
                         ("yes" if s["complete_all_reps"] else f"NO ({s['incomplete_watchers']} short)")
                         if w != "0" else "",
                         fmt(s.get("cancelled_total")) if w != "0" else "",
                         fmt(s.get("changes_per_msg"), 1) if w != "0" else "",
                         fmt(s.get("server_us_per_watch_msg"), 1) if w != "0" else "",
                         f"{srv*1000:.0f} / {cpu.get('writer', 0)*1000:.0f} / {cpu.get('watchers', 0)*1000:.0f}"])
        _print_rows(rows)
    r = doc.get("retention")
    if r and r["summary"]:
        print(f"\nRetention, 1 server with a data dir, {r['writes']:,} writes to 100 keys "
              f"(32-byte values, 4 InsereVarias streams)")
        rows = [["config", "writes/s", "RSS before MiB", "RSS after MiB", "HWM after MiB",
                 "History r000", "data dir MiB", "log entries", "snapshots"]]
        for label, s in r["summary"].items():
            rows.append([label, fmt(s["write_rate"]), fmt(s["rss_before_kb"] / 1024, 1),
                         fmt(s["rss_after_kb"] / 1024, 1), fmt(s["hwm_after_kb"] / 1024, 1),
                         f"{s['history_live_versions']:,} (max {s['history_max_version']:,})",
                         fmt((s["data_dir_bytes"] or 0) / 2**20, 1), fmt(s["log_entries_applied"]),
                         fmt(s["snapshots_written"])])
        _print_rows(rows)
    t = doc.get("transfer")
    if t and "export" in t:
        print(f"\nTransfer, {t['keys']:,} keys / {t['versions']:,} versions ({t['layout']})")
        rows = [["step", "seconds", "keys/s", "note"],
                ["export_to", fmt(t["export"]["s"], 2), fmt(t["export"]["keys_per_s"]),
                 f"file {t['export']['file_mb']:.1f} MB"]]
        if "import" in t:
            rows.append(["import_from", fmt(t["import"]["s"], 2), fmt(t["import"]["keys_per_s"]),
                         f"{t['import']['positions_written']:,} changes written"])
        if "verify" in t:
            rows.append(["Export A + B, compare", fmt(t["verify"]["s"], 2), fmt(t["verify"]["export_rpc_keys_per_s"]),
                         "identical" if t["verify"]["identical"] else f"DIFFERENT {t['verify']}"])
        if "rerun" in t:
            rr = t["rerun"]
            rows.append(["import_from again", fmt(rr["s"], 2), fmt(rr["keys_per_s"]),
                         f"{rr['positions_written']:,} new changes"
                         + ("" if rr["positions_written"] == 0 else "  <-- SHOULD BE 0")])
        _print_rows(rows)
        small = t.get("below_id_window")
        if small and "rerun" in small:
            print(f"  below the servers' change-id window: {small['keys']:,} keys / {small['versions']:,} "
                  f"versions: export {small['export']['s']:.2f} s, import {small['import']['s']:.2f} s, "
                  f"rerun {small['rerun']['s']:.2f} s writing {small['rerun']['positions_written']:,} "
                  f"changes, identical: {small['verify']['identical'] and small['rerun']['still_identical_to_A']}")
    for w in doc.get("warnings", []):
        print("warning: " + w)
    if doc.get("errors"):
        print(f"ERRORS ({len(doc['errors'])}):")
        for e in doc["errors"]:
            print("  - " + e.splitlines()[0][:400])


def _print_rows(rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for j, r in enumerate(rows):
        print("  ".join(str(c).ljust(wd) if i == 0 else str(c).rjust(wd) for i, (c, wd) in enumerate(zip(r, widths))))
        if j == 0:
            print("  ".join("-" * wd for wd in widths))


# =============================================================================
# main
# =============================================================================
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small counts, 1 rep, 1 server (< 60 s)")
    ap.add_argument("--only", default="fanout,retention,transfer", help="comma list of phases")
    ap.add_argument("--reps", type=int, default=0, help="fan-out repetitions (median; default 3, quick 1)")
    ap.add_argument("--watchers", default="", help="fan-out W values (default 0,1,10,100)")
    ap.add_argument("--fanout-writes", type=int, default=0, help="Insere per fan-out run (20000; quick 1000)")
    ap.add_argument("--fanout-servers", default="", help="cluster sizes for fan-out (default 1,3; quick 1)")
    ap.add_argument("--retention-writes", type=int, default=0, help="default 1000000 (quick 20000)")
    ap.add_argument("--retention-reps", type=int, default=0, help="default 1")
    ap.add_argument("--retention-server-args", default=None,
                    help="';'-separated sets of extra server flags for the retention phase, each run "
                         f"with and without --keep-versions 10 (empty: the defaults); default "
                         f"';{SMALL_LOG}' (quick: '')")
    ap.add_argument("--transfer-keys", type=int, default=0, help="default 100000 (quick 2000)")
    ap.add_argument("--out", default="", help="JSON output (default bench/results/watch.json; "
                                              "--quick: $TMPDIR/kvs-watch-bench-quick.json)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir")
    # internal: the worker processes
    ap.add_argument("--worker", choices=("writer", "watchers"), help=argparse.SUPPRESS)
    ap.add_argument("--targets", default="", help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--per-conn", type=int, default=WATCHERS_PER_CONN, help=argparse.SUPPRESS)
    ap.add_argument("--prefix", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker == "writer":
        return writer_main()
    if args.worker == "watchers":
        return watchers_main(args)

    ctx = Ctx(args, args.quick)
    phases = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(phases) - {"fanout", "retention", "transfer"}
    if unknown:
        ap.error(f"unknown phase(s) {sorted(unknown)}")
    started = dt.datetime.now().astimezone()
    meta = {"date": started.strftime("%Y-%m-%d %H:%M %Z"), "mode": "quick" if args.quick else "full",
            "cpus": os.cpu_count(), "cpu": cpu_model(), "machine": platform.platform(),
            "python": platform.python_version(), "grpcio": grpc.__version__,
            "loadavg_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
            "config": {"reps": ctx.reps, "watchers": ctx.watchers, "fanout_writes": ctx.fanout_writes,
                       "fanout_servers": ctx.fanout_servers, "watchers_per_connection": WATCHERS_PER_CONN,
                       "retention_writes": ctx.retention_writes, "retention_reps": ctx.retention_reps,
                       "retention_server_args": ctx.retention_snaps,
                       "transfer_keys": ctx.transfer_keys, "phases": phases}}
    ctx.workdir = Path(tempfile.mkdtemp(prefix="kvs-watch-bench-"))
    log(f"work dir {ctx.workdir}; mode {meta['mode']}; phases {phases}")
    t_start = perf()
    doc: dict = {"meta": meta}
    ctx.writer = Worker()

    def phase(name: str, run, *args):
        """One phase's figures, or None with the error recorded (the other phases still run)."""
        try:
            return run(ctx, *args)
        except Exception as e:
            ctx.fail(f"phase {name}: {type(e).__name__}: {e}")
            traceback.print_exc()
            return None

    try:
        if "fanout" in phases:
            doc["fanout"] = {}
            for n in ctx.fanout_servers:
                if (r := phase(f"fanout {n}srv", phase_fanout, n)) is not None:
                    doc["fanout"][f"{n}srv"] = r
        for name, run in (("retention", phase_retention), ("transfer", phase_transfer)):
            if name in phases and (r := phase(name, run)) is not None:
                doc[name] = r
    finally:
        ctx.writer.close()
    meta["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    meta["wall_s"] = round(perf() - t_start, 1)
    doc["errors"], doc["warnings"] = ctx.errors, ctx.warnings
    print_tables(doc)
    out = Path(args.out) if args.out else (Path(tempfile.gettempdir()) / "kvs-watch-bench-quick.json"
                                           if args.quick else BENCH / "results" / "watch.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    log(f"wrote {out} in {meta['wall_s']} s total")
    if args.keep or ctx.errors:
        log(f"logs and data kept in {ctx.workdir}")
    else:
        shutil.rmtree(ctx.workdir, ignore_errors=True)
    return 1 if ctx.errors else 0


if __name__ == "__main__":
    sys.exit(main())
