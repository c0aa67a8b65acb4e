#!/usr/bin/env python
"""KVS benchmark: the one command.

    .venv/bin/python bench/run.py            # full run (~10 min on 2 cores, 100k keys)
    .venv/bin/python bench/run.py --quick    # < 1 min, 1k keys, what CI runs

It starts its own Mosquitto and servers (kvs_cluster.launcher) on free ports, an *empty*
gRPC server (bench/empty_server.py: same proto, constant answers) and a load generator in
a separate process (bench/loadgen.py), runs the same loads against

    empty   the empty server (this machine's ceiling for gRPC + protobuf + Python)
    1 srv   one KVS server (with a data dir) + broker
    3 srv   three KVS servers (with data dirs) + broker; the client load goes to server A,
            replication lag is measured from A to B and C

and prints a table (every figure also as a ratio to the empty server) plus
bench/results/latest.json.  Extra rows: persistence on vs off (1 server, Insere at 64 in
flight), time for a 100k-key state transfer to a 4th server with an empty data dir, and
the shell's completion latency over the key set, and what TLS costs a client (a new
connection's first call, and a call on an open one: plaintext / TLS / mutual TLS).
Each figure is the median of --reps
repetitions (3 by default, 1 with --quick).

Exit status: 0 when every measurement ran without an error (speed is never asserted),
1 if anything errored (a server did not start, an RPC failed, a -1 answer, ...).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
for _p in (str(ROOT), str(BENCH)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from kvs_common.channel import make_channel  # noqa: E402
from harness import cpu_model, make_log, status, wait_until  # noqa: E402  (bench/harness.py)
from worker import WorkerProcess  # noqa: E402  (bench/worker.py)

PY = sys.executable
# The broker tuning the local cluster uses too (kvs_cluster up): TCP_NODELAY on the
# broker's sockets. Correctness never depends on it; the tests run without it.
BROKER_TUNING = "set_tcp_nodelay true"
perf = time.perf_counter


log = make_log("bench")


# ----------------------------------------------------------------------------- configuration
class Config:
    def __init__(self, quick: bool, args: argparse.Namespace):
        self.quick = quick
        self.reps = args.reps or (1 if quick else 3)
        self.keys = args.keys or (1000 if quick else 100_000)
        self.duration = 0.3 if quick else 3.0          # seconds per unary measurement
        self.warmup = 0.1 if quick else 0.5
        self.stream_items = 1000 if quick else 10_000  # items on one InsereVarias/ConsultaVarias stream
        self.lag_rate = 100.0
        self.lag_count = 40 if quick else 500           # writes per lag measurement (5 s full)
        self.completion_rounds = 20 if quick else 200
        self.insert_keys = 1000                          # Insere cycles over this many keys
        self.snapshot_budget = 5.0 if quick else 30.0   # stop repeating Snapshot after this much time


# ----------------------------------------------------------------------------- load generator process
class LoadGen(WorkerProcess):
    """bench/loadgen.py --serve in its own process; one JSON command per line."""

    def __init__(self):
        super().__init__([PY, str(BENCH / "loadgen.py"), "--serve"], "loadgen", log, cwd=ROOT,
                         timeout=900.0)


# ----------------------------------------------------------------------------- small gRPC helpers


def serving(addr: str, timeout: float = 1.0) -> bool:
    try:
        with make_channel(addr) as ch:
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
            return r.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def wait_keys(addrs: list[str], expected: int, timeout: float) -> float:
    """Poll Status until every server reports `expected` keys and in-step; return seconds waited."""
    t0 = perf()

    def ok():
        for a in addrs:
            s = status(a)
            if s is None or s.keys != expected or s.state != "in-step":
                return False
        return True

    wait_until(ok, timeout, f"{addrs} to hold {expected} keys in-step")
    return perf() - t0


# ----------------------------------------------------------------------------- aggregation
def med(results: list[dict], field: str):
    vals = [r[field] for r in results if r.get(field) is not None]
    return statistics.median(vals) if vals else None


class Run:
    def __init__(self, cfg: Config, lg: LoadGen):
        self.cfg = cfg
        self.lg = lg
        self.figures: dict[str, dict[str, dict]] = {}   # figure -> target -> summary
        self.extra: dict[str, dict] = {}
        self.errors: list[str] = []
        self.settle = None   # called before each figure (cluster phases: wait until replicas are quiet)

    def record(self, figure: str, target: str, reps: list[dict], fields: tuple[str, ...],
               accumulate: bool = False) -> dict:
        """Store the median of each field over `reps` (with accumulate: over all reps so far)."""
        prev = self.figures.get(figure, {}).get(target)
        if accumulate and prev:
            reps = prev["reps"] + reps
        summary = {f: med(reps, f) for f in fields}
        summary["reps"] = reps
        new_errs = sum(r.get("errors", 0) for r in reps)
        summary["errors"] = new_errs
        if new_errs and not accumulate:   # accumulated empty reps are reported by their paired record
            first = next((r.get("first_error") for r in reps if r.get("first_error")), "?")
            self.errors.append(f"{figure} @ {target}: {new_errs} error(s), first: {first}")
        self.figures.setdefault(figure, {})[target] = summary
        return summary

    def fail(self, where: str, exc: BaseException) -> None:
        msg = f"{where}: {type(exc).__name__}: {exc}"
        log("ERROR " + msg)
        self.errors.append(msg)

    def _step(self, figure: str, targets: list[tuple[str, str, list[str]]], fields: tuple[str, ...],
              make_cmd, reps: int, budget: float | None = None, unit: str = "") -> None:
        """Run one figure against every target, interleaved rep by rep (so slow drifts of the
        machine's background load hit both sides of a ratio alike); record medians.

        A target named "empty" while another phase runs is recorded twice: under "empty"
        (accumulated over the whole run) and under "empty~<phase>" (the reps paired with
        that phase, which its ratios use)."""
        got: dict[str, list[dict]] = {name: [] for name, _, _ in targets}
        if self.settle is not None:
            self.settle(figure)
        t0 = perf()
        try:
            for r in range(reps):
                if budget is not None and r > 0 and perf() - t0 > budget:
                    break
                for name, addr, readers in targets:
                    cmd, kw = make_cmd(name, addr, readers, r)
                    got[name].append(self.lg.call(cmd, **kw))
        except Exception as e:
            self.fail(f"{figure} @ {'/'.join(got)}", e)
        others = [n for n in got if n != "empty"]
        for name, reps_ in got.items():
            if not reps_:
                continue
            if name == "empty" and others:
                self.record(figure, "empty", reps_, fields, accumulate=True)
                s = self.record(figure, f"empty~{others[0]}", reps_, fields)
            else:
                s = self.record(figure, name, reps_, fields)
            log(f"  {name:6s} {figure:15s} " + "  ".join(
                f"{f}={s[f]:.2f}" for f in fields if isinstance(s.get(f), (int, float))))

    # -- the common matrix ----------------------------------------------------------------
    def matrix(self, targets: list[tuple[str, str, list[str]]]) -> None:
        """targets: (name, address the load goes to, addresses the lag is observed at)."""
        cfg = self.cfg
        unary_fields = ("rate", "p50_ms", "p99_ms")

        def unary(op: str, conc: int, keys: int, prefix: str):
            return lambda name, addr, readers, r: ("unary", dict(
                target=addr, op=op, concurrency=conc, duration=cfg.duration, warmup=cfg.warmup,
                keys=keys, key_prefix=prefix))

        # reads first, while the store holds exactly the populated keys (Snapshot counts them)
        self._step("consulta_c1", targets, unary_fields, unary("consulta", 1, cfg.keys, "k"), cfg.reps)
        self._step("consulta_c64", targets, unary_fields, unary("consulta", 64, cfg.keys, "k"), cfg.reps)
        self._step("consultavarias", targets, ("rate", "elapsed_s"),
                   lambda name, addr, readers, r: ("stream", dict(
                       target=addr, op="consulta", items=cfg.stream_items, keys=cfg.keys, key_prefix="k")),
                   cfg.reps)
        self._step("snapshot", targets, ("elapsed_s", "tuples", "rate", "first_tuple_ms"),
                   lambda name, addr, readers, r: ("snapshot", dict(target=addr)),
                   cfg.reps, budget=cfg.snapshot_budget)
        # writes: Insere and InsereVarias cycle over cfg.insert_keys keys (versions grow, keys don't)
        self._step("insere_c1", targets, unary_fields, unary("insere", 1, cfg.insert_keys, "ins-"), cfg.reps)
        self._step("insere_c64", targets, unary_fields, unary("insere", 64, cfg.insert_keys, "ins-"), cfg.reps)
        self._step("inserevarias", targets, ("rate", "elapsed_s"),
                   lambda name, addr, readers, r: ("stream", dict(
                       target=addr, op="insere", items=cfg.stream_items, keys=cfg.insert_keys,
                       key_prefix="ivs-")),
                   cfg.reps)
        # replication lag (ack at A -> visible at every reader), ~100 writes/s
        self._step("lag", targets, ("p50_ms", "p99_ms", "lo_p50_ms", "lo_p99_ms", "ack_p50_ms", "achieved_rate"),
                   lambda name, addr, readers, r: ("lag", dict(
                       writer=addr, readers=readers, rate=cfg.lag_rate, count=cfg.lag_count)),
                   cfg.reps)


# ----------------------------------------------------------------------------- phases
def start_empty(workdir: Path, snapshot_items: int, impl: str):
    from kvs_cluster.launcher import free_port

    port = free_port()
    logf = open(workdir / f"empty-{port}.log", "w")
    proc = subprocess.Popen([PY, str(BENCH / "empty_server.py"), "--port", str(port), "--impl", impl,
                             "--snapshot-items", str(snapshot_items)],
                            cwd=ROOT, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    logf.close()
    addr = f"127.0.0.1:{port}"
    try:
        wait_until(lambda: proc.poll() is None and serving(addr) or proc.poll() is not None, 20, "empty server")
        if proc.poll() is not None:
            raise RuntimeError(f"empty server exited with {proc.returncode}")
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, addr


def stop_proc(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def phase_empty(run: Run, empty_addr: str) -> None:
    """The empty server alone (when no server phase runs, e.g. `--only empty`)."""
    log("phase: empty server alone")
    run.matrix([("empty", empty_addr, [empty_addr])])


def populate(run: Run, target_name: str, a: str, addrs: list[str]) -> None:
    cfg = run.cfg
    res = run.lg.call("populate", target=a, n=cfg.keys, key_prefix="k")
    run.record("populate", target_name, [res], ("rate", "elapsed_s"))
    log(f"  {target_name}: populated {cfg.keys} keys in {res['elapsed_s']:.1f} s ({res['rate']:.0f}/s)")
    base = status(a)
    if base is None:
        raise RuntimeError(f"no Status from {a}")
    waited = wait_keys(addrs, base.keys, timeout=120 + cfg.keys / 200)
    run.extra.setdefault("populate_replicated_wait_s", {})[target_name] = waited


def phase_cluster(run: Run, workdir: Path, n: int, args: argparse.Namespace, empty_addr: str | None) -> None:
    from kvs_cluster.launcher import Cluster

    name = f"{n}srv"
    log(f"phase: {n} server(s)")
    with Cluster(n=n, workdir=workdir / name, persistent=True, broker_conf=BROKER_TUNING) as c:
        c.wait_ready(timeout=60)
        addrs = c.addresses
        a = addrs[0]
        run.extra.setdefault("servers", {})[name] = {s.address: s.pid for s in c.servers}
        # A = the sequencer (leader), so "A" means the same thing in every run; the follower
        # path is measured separately below
        sts = {x: status(x) for x in addrs}
        leader = next((x for x, st in sts.items() if st is not None and st.node_id == st.leader), None)
        follower = next((x for x, st in sts.items() if st is not None and st.leader and st.node_id != st.leader),
                        None)
        if leader:
            a = leader
        readers = [x for x in addrs if x != a] or addrs
        run.extra.setdefault("roles", {})[name] = {"A (load, writer)": a, "leader": leader,
                                                   "follower used": follower, "readers": readers}
        try:
            populate(run, name, a, addrs)
        except Exception as e:
            run.fail(f"populate @ {name}", e)
            return
        prof = None
        if args.profile:
            prof = start_profile(run, next(s.pid for s in c.servers if s.address == a), workdir, name)
        try:
            targets = [(name, a, readers)]
            if empty_addr:
                targets.insert(0, ("empty", empty_addr, [empty_addr]))
            run.settle = lambda figure: settle(run, name, figure, addrs)
            run.matrix(targets)
            if n > 1:
                # the same figures with the client's writes entering through a follower (not the
                # sequencer): a client connected to any server sees this path for 2 of 3 servers
                cfg = run.cfg
                w = follower or addrs[1]
                others = [x for x in addrs if x != w]
                for conc in (1, 64):
                    run._step(f"insere_c{conc}_follower", [(name, w, others)], ("rate", "p50_ms", "p99_ms"),
                              lambda nm, addr, readers, r, conc=conc: ("unary", dict(
                                  target=addr, op="insere", concurrency=conc, duration=cfg.duration,
                                  warmup=cfg.warmup, keys=cfg.insert_keys, key_prefix="ins-")),
                              cfg.reps)
                run._step("lag_follower", [(name, w, others)],
                          ("p50_ms", "p99_ms", "lo_p50_ms", "lo_p99_ms", "ack_p50_ms", "achieved_rate"),
                          lambda nm, addr, readers, r: ("lag", dict(
                              writer=addr, readers=readers, rate=cfg.lag_rate, count=cfg.lag_count)),
                          cfg.reps)
        finally:
            run.settle = None
            if prof:
                stop_profile(prof)
        if n == 1 and not args.skip_completion:
            completion(run, name, a)
        if n > 1 and not args.skip_transfer:
            state_transfer(run, c, name)
        dead = [s.address for s in c.servers if not s.alive()]
        if dead:
            run.errors.append(f"{name}: server(s) died during the run: {dead}")
        check_identical(run, name, [s.address for s in c.servers if s.alive()])


def settle(run: Run, name: str, figure: str, addrs: list[str], timeout: float = 120.0) -> None:
    """Before each figure: wait until every server is in-step at the same applied_seq, so a
    figure never pays for the replication backlog of the previous one. The wait is recorded
    (extra.settle_s): it is how long the replicas took to drain after the previous load."""
    t0 = perf()

    def quiet():
        sts = [status(a) for a in addrs]
        # A background snapshot (every 50k changes) still being written is backlog too.
        if any(st is None or st.state != "in-step" or st.snapshotting for st in sts):
            return False
        leaders = {st.leader for st in sts}
        prev = run.extra.setdefault("leader_seen", {}).get(name)
        run.extra["leader_seen"][name] = sorted(leaders)
        if prev is not None and prev != sorted(leaders):
            run.extra.setdefault("leader_changes", []).append(f"{name}: {prev} -> {sorted(leaders)} before {figure}")
            log(f"  NOTE {name}: leadership changed {prev} -> {sorted(leaders)} before {figure}")
        seqs = {st.applied_seq for st in sts} | {st.leader_seq for st in sts if st.leader_seq}
        return len(seqs) == 1

    try:
        wait_until(quiet, timeout, f"{name}: replicas quiet before {figure}")
    except RuntimeError as e:
        run.fail(f"settle before {figure} @ {name}", e)
    run.extra.setdefault("settle_s", {}).setdefault(name, {})[figure] = round(perf() - t0, 3)


def check_identical(run: Run, name: str, addrs: list[str], timeout: float = 30.0) -> None:
    """Once quiet, every server must report the same applied_seq, log_hash and key count."""
    last = {}

    def same():
        nonlocal last
        sts = {a: status(a) for a in addrs}
        last = {a: None if st is None else {"state": st.state, "keys": st.keys, "applied_seq": st.applied_seq,
                                             "log_hash": st.log_hash, "leader": st.leader, "epoch": st.epoch}
                for a, st in sts.items()}
        vals = list(last.values())
        return all(v is not None for v in vals) and all(
            (v["applied_seq"], v["log_hash"], v["keys"], v["state"]) ==
            (vals[0]["applied_seq"], vals[0]["log_hash"], vals[0]["keys"], "in-step") for v in vals)


    try:
        wait_until(same, timeout, f"{name}: replicas identical")
    except RuntimeError:
        run.errors.append(f"{name}: replicas not identical {timeout}s after the load stopped: {last}")
    run.extra.setdefault("final_status", {})[name] = last


def state_transfer(run: Run, c, name: str) -> None:
    """Start one more server with an empty data dir; time until it is SERVING, in-step, same key count."""
    a = c.addresses[0]
    try:
        base = status(a)
        if base is None:
            raise RuntimeError(f"no Status from {a}")
        expected = base.keys
        log(f"  state transfer of {expected} keys to a new server")
        t0 = perf()
        s = c.add_server()
        t_serving = None
        deadline = time.monotonic() + 120 + expected / 500

        def done():
            nonlocal t_serving
            if not s.alive():
                raise RuntimeError(f"new server exited ({s.returncode}):\n{s.log_tail(20)}")
            if t_serving is None and serving(s.address):
                t_serving = perf()
            if t_serving is None:
                return False
            st = status(s.address)
            return st is not None and st.state == "in-step" and st.keys == expected

        while not done():
            if time.monotonic() > deadline:
                raise RuntimeError(f"new server not in-step with {expected} keys in time:\n{s.log_tail(20)}")
            time.sleep(0.02)
        total = perf() - t0
        res = {"keys": expected, "total_s": total, "serving_s": t_serving - t0, "errors": 0}
        run.extra["state_transfer"] = res
        run.record("state_transfer", name, [res], ("total_s", "serving_s", "keys"))
        log(f"  state transfer: {total:.2f} s (SERVING after {t_serving - t0:.2f} s, includes process start)")
    except Exception as e:
        run.fail(f"state transfer @ {name}", e)


def phase_persistence(run: Run, workdir: Path) -> None:
    """Insere at 64 in flight, 1 server without vs with a data dir, interleaved repetitions."""
    from kvs_cluster.launcher import Cluster

    cfg = run.cfg
    log("phase: persistence off vs on (1 server, Insere 64 in flight)")
    with Cluster(n=1, workdir=workdir / "p-off", persistent=False, broker_conf=BROKER_TUNING) as off, \
            Cluster(n=1, workdir=workdir / "p-on", persistent=True, broker_conf=BROKER_TUNING) as on:
        off.wait_ready(timeout=60)
        on.wait_ready(timeout=60)
        reps: dict[str, list] = {"off": [], "on": []}
        for _ in range(cfg.reps):
            for mode, c in (("off", off), ("on", on)):
                reps[mode].append(run.lg.call("unary", target=c.addresses[0], op="insere", concurrency=64,
                                              duration=cfg.duration, warmup=cfg.warmup,
                                              keys=cfg.insert_keys, key_prefix="ins-"))
        for mode in ("off", "on"):
            s = run.record("insere_c64_persist", mode, reps[mode], ("rate", "p50_ms", "p99_ms"))
            log(f"  persistence {mode}: {s['rate']:.0f}/s p99 {s['p99_ms']:.2f} ms")


def phase_tls(run: Run, workdir: Path) -> None:
    """TLS handshake cost (bench/tls_cost.py): one small cluster per mode."""
    import tls_cost

    n = 50 if run.cfg.quick else 300
    log(f"phase: TLS cost ({n} fresh connections per mode)")
    for mode in tls_cost.MODES:
        try:
            fresh, warm = tls_cost.run_mode(mode, workdir / "tls", n)
        except Exception as e:
            run.fail(f"tls cost @ {mode}", e)
            continue
        run.record("tls_connect", mode, [fresh], ("p50_ms", "p99_ms"))
        run.record("tls_warm", mode, [warm], ("p50_ms", "p99_ms"))
        log(f"  {mode:9s}: new connection + Status p50 {fresh['p50_ms']:.2f} ms "
            f"(p99 {fresh['p99_ms']:.2f}); open connection p50 {warm['p50_ms']:.2f} ms")


def completion(run: Run, name: str, a: str) -> None:
    cfg = run.cfg
    try:
        out = subprocess.run([PY, str(BENCH / "completion_probe.py"), "--target", a, "--keys", str(cfg.keys),
                              "--rounds", str(cfg.completion_rounds)],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
        if out.returncode != 0:
            raise RuntimeError(f"completion probe exit {out.returncode}: {out.stderr[-2000:]}")
        res = json.loads(out.stdout.strip().splitlines()[-1])
        if res.get("skipped"):
            log(f"  completion: skipped ({res['skipped']})")
            run.extra["completion"] = res
            return
        run.record("completion", name, [res], ("p50_ms", "p99_ms", "max_ms", "cold_ms", "keys"))
        run.extra["completion"] = {k: v for k, v in res.items() if k != "reps"}
        log(f"  completion: p50 {res['p50_ms']:.2f} ms p99 {res['p99_ms']:.2f} ms over {res.get('keys')} keys")
    except Exception as e:
        run.fail(f"completion @ {name}", e)


# ----------------------------------------------------------------------------- profiling (optional)
def start_profile(run: Run, pid: int, workdir: Path, name: str):
    spy = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
    if not os.path.exists(spy):
        log("  --profile: py-spy not installed (pip install py-spy); skipping")
        return None
    out = BENCH / "results" / f"profile-{name}.svg"
    out.parent.mkdir(parents=True, exist_ok=True)
    p = subprocess.Popen([spy, "record", "--pid", str(pid), "--output", str(out), "--rate", "200",
                          "--nonblocking", "--subprocesses"],
                         stdout=subprocess.DEVNULL, stderr=open(workdir / f"py-spy-{name}.log", "w"))
    run.extra.setdefault("profiles", {})[name] = str(out.relative_to(ROOT))
    return p


def stop_profile(p: subprocess.Popen) -> None:
    import signal as _s

    if p.poll() is None:
        p.send_signal(_s.SIGINT)
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


# ----------------------------------------------------------------------------- output
ROWS = [
    # figure, field, label, unit, higher_is_better
    ("insere_c1", "rate", "Insere 1 in flight", "calls/s", True),
    ("insere_c1", "p50_ms", "  p50", "ms", False),
    ("insere_c1", "p99_ms", "  p99", "ms", False),
    ("insere_c64", "rate", "Insere 64 in flight", "calls/s", True),
    ("insere_c64", "p50_ms", "  p50", "ms", False),
    ("insere_c64", "p99_ms", "  p99", "ms", False),
    ("consulta_c1", "rate", "Consulta 1 in flight", "calls/s", True),
    ("consulta_c1", "p50_ms", "  p50", "ms", False),
    ("consulta_c1", "p99_ms", "  p99", "ms", False),
    ("consulta_c64", "rate", "Consulta 64 in flight", "calls/s", True),
    ("consulta_c64", "p50_ms", "  p50", "ms", False),
    ("consulta_c64", "p99_ms", "  p99", "ms", False),
    ("inserevarias", "rate", "InsereVarias 1 stream", "items/s", True),
    ("consultavarias", "rate", "ConsultaVarias 1 stream", "items/s", True),
    ("snapshot", "elapsed_s", "Snapshot (all keys)", "s", False),
    ("snapshot", "tuples", "  tuples", "", None),
    ("lag", "p50_ms", "Repl. lag A->others p50", "ms", False),
    ("lag", "p99_ms", "Repl. lag A->others p99", "ms", False),
    ("lag", "ack_p50_ms", "  Insere ack at A p50", "ms", False),
    ("insere_c1_follower", "rate", "Insere via follower, 1 in flight", "calls/s", True),
    ("insere_c1_follower", "p50_ms", "  p50", "ms", False),
    ("insere_c64_follower", "rate", "Insere via follower, 64 in flight", "calls/s", True),
    ("insere_c64_follower", "p99_ms", "  p99", "ms", False),
    ("lag_follower", "p50_ms", "Repl. lag via follower p50", "ms", False),
    ("lag_follower", "p99_ms", "Repl. lag via follower p99", "ms", False),
    ("lag_follower", "ack_p50_ms", "  Insere ack at follower p50", "ms", False),
    ("populate", "rate", "Load keys (InsereVarias)", "keys/s", True),
]
TARGETS = ("empty", "1srv", "3srv")
EMPTY_ALIAS = {"lag_follower": "lag", "insere_c1_follower": "insere_c1", "insere_c64_follower": "insere_c64"}


def fmt(v, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if unit in ("calls/s", "items/s", "keys/s", "") and abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def ratio(v, e):
    if v is None or e in (None, 0):
        return None
    return v / e


def build_table(run: Run) -> tuple[list[str], list[list[str]], list[str]]:
    head = ["figure", "unit", "empty", "1 server", "×empty", "3 servers", "×empty"]
    rows = []
    figs = run.figures
    for fig, field, label, unit, _hb in ROWS:
        if fig not in figs:
            continue
        efig = figs.get(EMPTY_ALIAS.get(fig, fig), {})   # follower rows: the same empty floor
        vals = {t: figs[fig].get(t, {}).get(field) for t in TARGETS}
        errs = {t: figs[fig].get(t, {}).get("errors") for t in TARGETS}
        vals["empty"], errs["empty"] = efig.get("empty", {}).get(field), efig.get("empty", {}).get("errors")
        e = vals["empty"]
        cells = ["ERR" if errs[t] else fmt(vals[t], unit) for t in TARGETS]
        e1 = efig.get("empty~1srv", {}).get(field, e)   # the empty reps interleaved with that phase
        e3 = efig.get("empty~3srv", {}).get(field, e)
        r1 = ratio(vals["1srv"], e1)
        r3 = ratio(vals["3srv"], e3)
        rows.append([label, unit, cells[0], cells[1], fmt(r1) if r1 is not None and not errs["1srv"] else "-",
                     cells[2], fmt(r3) if r3 is not None and not errs["3srv"] else "-"])
    notes = []
    p = figs.get("insere_c64_persist", {})
    if p:
        off, on = p.get("off", {}), p.get("on", {})
        rows.append(["Persist. off: Insere 64", "calls/s", "", fmt(off.get("rate"), "calls/s"), "", "", ""])
        rows.append(["  p99", "ms", "", fmt(off.get("p99_ms")), "", "", ""])
        rows.append(["Persist. on: Insere 64", "calls/s", "", fmt(on.get("rate"), "calls/s"),
                     fmt(ratio(on.get("rate"), off.get("rate"))) + " of off", "", ""])
        rows.append(["  p99", "ms", "", fmt(on.get("p99_ms")), "", "", ""])
    tc, tw = figs.get("tls_connect", {}), figs.get("tls_warm", {})
    if tc:
        base = tc.get("plaintext", {}).get("p50_ms")
        for mode, label in (("plaintext", "plaintext"), ("tls", "TLS"), ("mutual", "mutual TLS")):
            c, w = tc.get(mode, {}), tw.get(mode, {})
            extra = (f"+{c['p50_ms'] - base:.2f} ms" if mode != "plaintext" and base is not None
                     and c.get("p50_ms") is not None else "")
            rows.append([f"New conn. + Status, {label} p50", "ms", "", fmt(c.get("p50_ms")), extra,
                         "", ""])
            rows.append([f"  open conn. Status, {label} p50", "ms", "", fmt(w.get("p50_ms")), "",
                         "", ""])
    st = figs.get("state_transfer", {}).get("3srv")
    if st:
        rows.append([f"State transfer ({st['keys']:,.0f} keys)", "s", "", "", "", fmt(st["total_s"]), ""])
        rows.append(["  health SERVING after", "s", "", "", "", fmt(st["serving_s"]), ""])
    comp = figs.get("completion", {}).get("1srv")
    if comp:
        rows.append([f"Shell completion p50 ({comp.get('keys') or 0:,.0f} keys)", "ms", "",
                     fmt(comp.get("p50_ms")), "", "", ""])
        rows.append(["  p99 / max", "ms", "", f"{fmt(comp.get('p99_ms'))} / {fmt(comp.get('max_ms'))}", "", "", ""])
        rows.append(["  first (cold) completion", "ms", "", fmt(comp.get("cold_ms")), "", "", ""])
    elif "completion" in run.extra and run.extra["completion"].get("skipped"):
        notes.append(f"shell completion: skipped — {run.extra['completion']['skipped']}")
    return head, rows, notes


def print_table(run: Run, meta: dict) -> None:
    head, rows, notes = build_table(run)
    title = (f"KVS bench {meta['date']} — {meta['mode']} run, median of {meta['reps']} rep(s), "
             f"{meta['keys']:,} keys, {meta['cpus']} CPUs, load avg at start {meta['loadavg_start']}")
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=title, title_justify="left")
        for i, h in enumerate(head):
            t.add_column(h, justify="left" if i < 2 else "right")
        for r in rows:
            t.add_row(*r)
        Console(width=max(120, shutil.get_terminal_size().columns), soft_wrap=False).print(t)
    except ImportError:
        print(title)
        widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
        for r in [head] + rows:
            print("  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    for n in notes:
        print("note: " + n)
    for n in run.extra.get("leader_changes", []):
        print("note: leadership changed during the run (figures after it measure another layout): " + n)
    print("note: ×empty = figure / the same figure against the empty gRPC server, measured interleaved "
          "rep by rep in the same phase (for latencies and seconds, higher is worse). The load generator "
          "(1 asyncio process), the servers and the broker share the same " + str(meta["cpus"]) + " cores.")
    if run.errors:
        print(f"ERRORS ({len(run.errors)}):")
        for e in run.errors:
            print("  - " + e.splitlines()[0][:300])


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small counts, 1k keys, < 1 min (CI)")
    ap.add_argument("--reps", type=int, default=0, help="repetitions per figure (median reported)")
    ap.add_argument("--keys", type=int, default=0, help="keys loaded before reads/Snapshot/transfer")
    ap.add_argument("--only", default="empty,1,3,persist,tls",
                    help="comma list of phases: empty,1,3,persist,tls (default: all)")
    ap.add_argument("--empty-impl", choices=("aio", "sync"), default="aio")
    ap.add_argument("--skip-transfer", action="store_true")
    ap.add_argument("--skip-completion", action="store_true")
    ap.add_argument("--profile", action="store_true",
                    help="py-spy record server A during each cluster matrix (bench/results/profile-*.svg)")
    ap.add_argument("--out", default="",
                    help="JSON output (default bench/results/latest.json; --quick: latest-quick.json, "
                         "so a CI/quick run never overwrites the last full figures)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs, data dirs)")
    args = ap.parse_args(argv)
    cfg = Config(args.quick, args)
    phases = {p.strip() for p in args.only.split(",") if p.strip()}

    started = dt.datetime.now().astimezone()
    meta = {
        "date": started.strftime("%Y-%m-%d %H:%M %Z"),
        "mode": "quick" if cfg.quick else "full",
        "reps": cfg.reps, "keys": cfg.keys, "cpus": os.cpu_count(),
        "loadavg_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "machine": platform.platform(), "cpu": cpu_model(), "python": platform.python_version(),
        "grpcio": grpc.__version__, "mosquitto": _mosquitto_version(),
        "config": {k: v for k, v in vars(cfg).items()},
        "layout": "client load -> server A (the sequencer/leader); lag A -> every other server (A itself "
                  "with 1 server); *_follower figures: writes through a follower; "
                  "servers have data dirs unless stated; one loadgen process (asyncio) for all loads",
    }
    workdir = Path(tempfile.mkdtemp(prefix="kvs-bench-"))
    log(f"work dir {workdir}; mode {meta['mode']}; reps {cfg.reps}; keys {cfg.keys}")
    t_start = perf()
    lg = LoadGen()
    run = Run(cfg, lg)
    empty_proc = empty_addr = None
    try:
        if "empty" in phases:
            try:
                empty_proc, empty_addr = start_empty(workdir, cfg.keys, args.empty_impl)
                meta["empty_server"] = f"bench/empty_server.py --impl {args.empty_impl} (pid {empty_proc.pid})"
            except Exception as e:
                run.fail("empty server", e)
        server_ok = (ROOT / "server" / "__main__.py").exists()
        cluster_phases = [(n, key) for n, key in ((1, "1"), (3, "3")) if key in phases]
        if empty_addr and not cluster_phases:
            phase_empty(run, empty_addr)
        for n, key in cluster_phases:
            if not server_ok:
                run.fail(f"phase {n}srv", RuntimeError("server/__main__.py missing: `python -m server` cannot run"))
                continue
            try:
                phase_cluster(run, workdir, n, args, empty_addr)
            except Exception as e:
                run.fail(f"phase {n}srv", e)
                traceback.print_exc()
        if "persist" in phases and server_ok:
            try:
                phase_persistence(run, workdir)
            except Exception as e:
                run.fail("phase persistence", e)
        if "tls" in phases and server_ok:
            phase_tls(run, workdir)
    finally:
        lg.close()
        if empty_proc is not None:
            stop_proc(empty_proc)
    meta["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    meta["wall_s"] = round(perf() - t_start, 1)
    print_table(run, meta)
    head, rows, notes = build_table(run)
    doc = {"meta": meta, "figures": run.figures, "extra": run.extra, "errors": run.errors,
           "table": {"head": head, "rows": rows, "notes": notes}}
    out = Path(args.out or BENCH / "results" / ("latest-quick.json" if cfg.quick else "latest.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    log(f"wrote {out} in {meta['wall_s']} s total")
    if args.keep or run.errors:
        log(f"logs and data kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if run.errors else 0


def _mosquitto_version() -> str:
    try:
        from kvs_cluster.launcher import mosquitto_binary

        out = subprocess.run([mosquitto_binary(), "-h"], capture_output=True, text=True, timeout=5)
        return (out.stdout + out.stderr).splitlines()[0].strip()
    except Exception:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
