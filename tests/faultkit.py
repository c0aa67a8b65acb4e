"""Fault injection for process-level tests: a TCP proxy, a write workload and a checker.

* :class:`TcpProxy` sits between one server and the broker so a test can cut that server off
  (``blackhole``: connections stay open but nothing moves, like a partition; ``reset``: every
  connection is reset and new ones are reset at once) and heal it again.
* :class:`FaultCluster` is a broker plus servers that each reach the broker through their own
  proxy, with kill / pause / restart / cut by index.  It only uses :mod:`kvs_cluster`'s Broker
  and Server and kills everything by PID.
* :class:`Workload` runs writer threads with unique values and records every attempt and every
  acknowledgement; :func:`check_histories` is the pure invariant checker over what the servers
  report, :func:`check_cluster` collects that and also compares the replicas.
"""
from __future__ import annotations

import itertools
import os
import select
import signal
import socket
import struct
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import grpc

import conftest
from conftest import (CHANNEL_OPTIONS, Stubs, assert_replicas_identical, kvs_pb2, kvs_pb2_grpc,
                      trailing, wait_until)
from kvs_cluster import Broker, Server, free_port
from server.transport import message_mac   # the servers' own HMAC, to forge signed garbage

HOST = "127.0.0.1"
WRITE_RPC_TIMEOUT = 20.0   # a write must never take this long; the server's bounds are far lower


# ---------------------------------------------------------------------------
# TCP proxy
# ---------------------------------------------------------------------------
class _Pair:
    """One client connection and its upstream; two pump threads move bytes while flowing."""

    def __init__(self, proxy: "TcpProxy", down: socket.socket):
        self.proxy = proxy
        self.down = down
        self.up: socket.socket | None = None
        self.closed = threading.Event()
        self._close_lock = threading.Lock()

    def run(self) -> None:
        # Upstream is opened only once traffic may flow: a blackholed new connection must not
        # reach the broker at all (and must not be timed out by it for a missing CONNECT).
        if not self.proxy._wait_flowing(self.closed):
            return self.close()
        try:
            self.up = socket.create_connection((HOST, self.proxy.target_port), timeout=5)
            self.up.settimeout(None)
            self.up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            return self.close()
        t = threading.Thread(target=self._pump, args=(self.up, self.down), daemon=True,
                             name=f"proxy-{self.proxy.listen_port}-up2down")
        t.start()
        self._pump(self.down, self.up)
        t.join()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while not self.closed.is_set():
                if not self.proxy._wait_flowing(self.closed):
                    break
                ready, _, _ = select.select([src], [], [], 0.1)
                if not ready:
                    continue
                data = src.recv(65536)
                if not data:
                    # The peer closed: during a cut the other side must not notice (a partition
                    # hides it), so the close is passed on once traffic flows again.
                    self.proxy._wait_flowing(self.closed)
                    break
                # Bytes read just before a cut are held back, not lost (TCP would retransmit).
                if not self.proxy._wait_flowing(self.closed):
                    break
                dst.sendall(data)
        except (OSError, ValueError):
            pass
        self.close()

    def close(self, rst: bool = False) -> None:
        with self._close_lock:
            if self.closed.is_set():
                return
            self.closed.set()
        for s in (self.down, self.up):
            if s is None:
                continue
            try:
                if rst:  # SO_LINGER 0: close sends RST instead of FIN
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()
            except OSError:
                pass
        self.proxy._forget(self)


class TcpProxy:
    """Forwards 127.0.0.1:listen_port to 127.0.0.1:target_port (threads, one pair per connection).

    ``cut("blackhole")``: existing connections stay open but no byte moves either way; new
    connections are accepted and held.  ``cut("reset")``: every connection is reset (RST) and new
    ones are reset right after accept.  ``heal()`` lets traffic flow again (held bytes included)."""

    def __init__(self, listen_port: int | None = None, target_port: int = 0):
        self.listen_port = listen_port or free_port()
        self.target_port = target_port
        self.mode = "flowing"
        self.accepted = 0
        self._flowing = threading.Event()
        self._flowing.set()
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._pairs: set[_Pair] = set()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((HOST, self.listen_port))
        self._listener.listen(64)
        self._thread = threading.Thread(target=self._accept_loop, daemon=True,
                                        name=f"proxy-{self.listen_port}")
        self._thread.start()

    @property
    def port(self) -> int:
        return self.listen_port

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._pairs)

    def cut(self, mode: str = "blackhole") -> None:
        if mode not in ("blackhole", "reset"):
            raise ValueError(f"unknown cut mode {mode!r}")
        with self._lock:
            self.mode = mode
            self._flowing.clear()
            pairs = list(self._pairs) if mode == "reset" else []
        for p in pairs:
            p.close(rst=True)

    def heal(self) -> None:
        with self._lock:
            self.mode = "flowing"
            self._flowing.set()

    def close(self) -> None:
        self._stopped.set()
        self._flowing.set()   # wake waiting pumps so they see the stop
        try:
            self._listener.close()
        except OSError:
            pass
        with self._lock:
            pairs = list(self._pairs)
        for p in pairs:
            p.close()
        self._thread.join(timeout=5)

    # -- internals -------------------------------------------------------------
    def _wait_flowing(self, closed: threading.Event) -> bool:
        """Block while cut; False once the pair or the proxy is closed."""
        while not self._flowing.wait(0.1):
            if closed.is_set() or self._stopped.is_set():
                return False
        return not (closed.is_set() or self._stopped.is_set())

    def _forget(self, pair: _Pair) -> None:
        with self._lock:
            self._pairs.discard(pair)

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                ready, _, _ = select.select([self._listener], [], [], 0.1)
                if not ready:
                    continue
                down, _ = self._listener.accept()
            except (OSError, ValueError):
                return
            down.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pair = _Pair(self, down)
            with self._lock:
                self.accepted += 1
                reset = self.mode == "reset"
                if not reset:
                    self._pairs.add(pair)
            if reset:
                pair.close(rst=True)
                continue
            threading.Thread(target=pair.run, daemon=True,
                             name=f"proxy-{self.listen_port}-pair").start()

    def __enter__(self) -> "TcpProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TcpProxy({self.listen_port}->{self.target_port}, {self.mode})"


# ---------------------------------------------------------------------------
# stubs and status helpers
# ---------------------------------------------------------------------------
def stub(address: str) -> Stubs:
    """Stubs on a channel with its own subchannel pool and a short reconnect back-off: a channel
    to a restarted server must not stay in back-off for seconds."""
    channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS + [
        ("grpc.use_local_subchannel_pool", 1),
        # a server that was down for a while is retried within a second once it is back
        ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 1000)])
    s = Stubs(address, channel, kvs_pb2_grpc.KVSStub(channel), kvs_pb2_grpc.KVSExtStub(channel))
    conftest._open_stubs.append(s)
    return s


def insere_timed(s: Stubs, k: str, v: str, timeout: float = WRITE_RPC_TIMEOUT):
    """(version, kvs-error, seconds) of one Insere; raises grpc.RpcError on transport errors."""
    t0 = time.monotonic()
    reply, call = s.kvs.Insere.with_call(kvs_pb2.ChaveValor(chave=k, valor=v), timeout=timeout)
    return reply.versao, trailing(call).get("kvs-error", ""), time.monotonic() - t0


def status_or_none(s: Stubs, timeout: float = 2.0):
    try:
        return s.ext.Status(kvs_pb2.StatusRequest(), timeout=timeout)
    except grpc.RpcError:
        return None


def describe(sts) -> str:
    return "; ".join("down" if st is None else
                     f"{st.node_id}:{st.role}/t{st.term}/{st.state}/c{st.commit_index}"
                     f"/a{st.applied_index}/leader={st.leader or '-'}" for st in sts)


def formed(sts, n: int) -> bool:
    """Exactly one leader, every server agrees on it and the term, n voting members."""
    if any(st is None for st in sts):
        return False
    leaders = [st for st in sts if st.role == "leader"]
    if len(leaders) != 1:
        return False
    lead = leaders[0]
    if len({(st.leader, st.term) for st in sts}) != 1 or lead.leader != lead.node_id:
        return False
    voters = [m for m in lead.members if m.role == "voter"]
    return len(lead.members) == n and len(voters) == n


def wait_formed(stubs: Sequence[Stubs], n: int, timeout: float = 30.0, what: str = "cluster formed"):
    """Wait until ``stubs`` agree on one leader and term with ``n`` voters; returns
    (index of the leader in ``stubs``, statuses)."""
    last = []

    def pred():
        sts = [status_or_none(s) for s in stubs]
        last[:] = sts
        if formed(sts, n):
            return next(i for i, st in enumerate(sts) if st.role == "leader"), sts
        return None
    try:
        return wait_until(pred, timeout, what, interval=0.1)
    except AssertionError:
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} ({n} voters); "
                             f"last: {describe(last)}") from None


def wait_settled(stubs: Sequence[Stubs], timeout: float = 45.0, what: str = "cluster settled"):
    """Every server in-step with one commit_index == applied_index, seen twice in a row."""
    prev: list = []
    last: list = []

    def pred():
        nonlocal prev
        sts = [status_or_none(s) for s in stubs]
        last[:] = sts
        if any(st is None for st in sts):
            prev = []
            return None
        key = [(st.state, st.commit_index, st.applied_index) for st in sts]
        stable, prev = key == prev, key
        ok = (stable and all(st.state == "in-step" and st.commit_index == st.applied_index
                             for st in sts)
              and len({st.applied_index for st in sts}) == 1)
        return sts if ok else None
    try:
        return wait_until(pred, timeout, what, interval=0.1)
    except AssertionError:
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; "
                             f"last: {describe(last)}") from None


class StatusMonitor(threading.Thread):
    """Polls every server's status in the background; remembers who claimed leadership in which
    term, to prove there never were two leaders in one term."""

    def __init__(self, stubs: Sequence[Stubs], interval: float = 0.1):
        super().__init__(daemon=True, name="status-monitor")
        self.stubs = list(stubs)
        self.interval = interval
        self.leaders: dict[int, set[str]] = defaultdict(set)   # term -> node ids seen as leader
        self.roles: dict[str, set[str]] = defaultdict(set)      # node id -> roles seen
        self.samples = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            for s in self.stubs:
                st = status_or_none(s, timeout=1.0)
                if st is None:
                    continue
                self.roles[st.node_id].add(st.role)
                if st.role == "leader":
                    self.leaders[st.term].add(st.node_id)
            self.samples += 1
            self._halt.wait(self.interval)

    def stop(self) -> "StatusMonitor":
        self._halt.set()
        self.join(timeout=10)
        return self

    def split_terms(self) -> dict[int, set[str]]:
        return {t: ids for t, ids in self.leaders.items() if len(ids) > 1}


# ---------------------------------------------------------------------------
# cluster behind proxies
# ---------------------------------------------------------------------------
class FaultCluster:
    """A broker and ``n`` persistent servers, each reaching the broker through its own TcpProxy."""

    def __init__(self, workdir: Path, n: int = 3, extra_args: Sequence[str] = (),
                 signed: bool = False):
        """``signed``: every server gets the same ``--cluster-secret-file`` (mode 0600);
        the secret is in ``self.secret`` so tests can forge messages."""
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.extra_args = tuple(extra_args)
        self.secret: bytes | None = None
        if signed:
            self.secret = os.urandom(32).hex().encode()
            path = self.workdir / "cluster.secret"
            path.write_bytes(self.secret + b"\n")
            os.chmod(path, 0o600)
            self.extra_args += ("--cluster-secret-file", str(path))
        self.broker = Broker.start(workdir=self.workdir / "broker")
        self.proxies: list[TcpProxy] = []
        self.servers: list[Server] = []
        self.stubs: list[Stubs] = []
        try:
            for _ in range(n):
                self.add_server()
        except BaseException:
            self.close()
            raise

    def add_server(self) -> Server:
        proxy = TcpProxy(target_port=self.broker.port)
        port = free_port()
        node_dir = self.workdir / f"node-{port}"
        server = Server.start(port, proxy.port, data_dir=node_dir / "data",
                              extra_args=self.extra_args, log_path=node_dir / "server.log")
        self.proxies.append(proxy)
        self.servers.append(server)
        self.stubs.append(stub(server.address))
        return server

    def node_id(self, i: int) -> str:
        return f"node-{self.servers[i].port}"

    def index_of(self, node_id: str) -> int:
        return next(i for i in range(len(self.servers)) if self.node_id(i) == node_id)

    def wait_ready(self, timeout: float = 60.0) -> "FaultCluster":
        deadline = time.monotonic() + timeout
        for s in self.servers:
            s.wait_ready(max(1.0, deadline - time.monotonic()))
        return self

    def formed(self, timeout: float = 30.0, indices: Iterable[int] | None = None):
        """Index (into servers) of the leader once ``indices`` (default all) agree on it."""
        idx = list(range(len(self.servers))) if indices is None else list(indices)
        at, sts = wait_formed([self.stubs[i] for i in idx], len(self.servers), timeout)
        return idx[at], sts

    # -- faults ------------------------------------------------------------------
    def pause(self, i: int) -> None:
        os.kill(self.servers[i].pid, signal.SIGSTOP)

    def resume(self, i: int) -> None:
        if self.servers[i].alive():
            os.kill(self.servers[i].pid, signal.SIGCONT)

    def kill(self, i: int) -> None:
        self.resume(i)
        self.servers[i].kill()

    def stop(self, i: int) -> None:
        self.resume(i)
        self.servers[i].stop()

    def start(self, i: int) -> None:
        """(Re)start server i with its data dir (no wait)."""
        self.servers[i].restart()

    def cut(self, i: int, mode: str = "blackhole") -> None:
        self.proxies[i].cut(mode)

    def heal(self, i: int | None = None) -> None:
        for p in (self.proxies if i is None else [self.proxies[i]]):
            p.heal()

    # -- diagnostics and teardown ---------------------------------------------------
    def logs(self, lines: int = 60) -> str:
        parts = [f"----- {s.address} node-{s.port} (pid {s.pid}, exit {s.returncode})\n"
                 f"{s.log_tail(lines)}" for s in self.servers]
        parts.append(f"----- broker {self.broker.port}\n"
                     + "\n".join(self.broker.log_text().splitlines()[-lines:]))
        return "\n".join(parts)

    def close(self) -> None:
        """Kill everything by PID (paused servers are continued first so they can die at once)."""
        for i, s in enumerate(self.servers):
            try:
                self.kill(i)
            except Exception:
                pass
        for p in self.proxies:
            p.close()
        try:
            self.broker.kill()
        except Exception:
            pass

    def __enter__(self) -> "FaultCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------
# workload
# ---------------------------------------------------------------------------
@dataclass
class Outcome:
    writer: int
    key: str
    value: str
    address: str
    started: float
    seconds: float = 0.0
    version: int | None = None      # > 0: acknowledged
    error: str = ""                 # kvs-error of a -1, or the gRPC status code


@dataclass
class Record:
    """Everything a workload did, shared by its writer threads."""
    attempts: list[Outcome] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, o: Outcome) -> None:
        with self.lock:
            self.attempts.append(o)

    def snapshot(self) -> list[Outcome]:
        with self.lock:
            return list(self.attempts)

    def acked(self, address: str | None = None, since: float = 0.0) -> list[Outcome]:
        return [o for o in self.snapshot() if o.version and o.version > 0
                and (address is None or o.address == address) and o.started >= since]

    def summary(self) -> str:
        snap = self.snapshot()
        errors = defaultdict(int)
        for o in snap:
            if not (o.version and o.version > 0):
                errors[o.error[:60] or "-1"] += 1
        return f"{len(snap)} attempts, {len(self.acked())} acknowledged, failures {dict(errors)}"


class Workload:
    """``writers`` threads inserting unique values ``w<writer>-<n>`` over ``keys`` keys.

    ``targets``: per writer, the addresses it cycles through (round robin); default: writer i
    uses address i mod len(addresses).  Stops by itself after ``max_writes`` attempts per writer
    or ``max_seconds``; each writer uses its own channels."""

    def __init__(self, addresses: Sequence[str], prefix: str, writers: int = 3, keys: int = 5,
                 max_writes: int = 400, max_seconds: float = 60.0,
                 targets: Sequence[Sequence[str]] | None = None, pace: float = 0.0):
        self.prefix = prefix
        self.keys = [f"{prefix}k{i}" for i in range(keys)]
        self.targets = ([list(t) for t in targets] if targets is not None else
                        [[addresses[i % len(addresses)]] for i in range(writers)])
        self.max_writes = max_writes
        self.max_seconds = max_seconds
        self.pace = pace
        self.record = Record()
        self._halt = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(w,), daemon=True,
                                          name=f"writer-{prefix}{w}")
                         for w in range(len(self.targets))]

    def start(self) -> "Workload":
        for t in self._threads:
            t.start()
        return self

    def _run(self, w: int) -> None:
        stubs = {a: stub(a) for a in self.targets[w]}
        cycle = itertools.cycle(self.targets[w])
        deadline = time.monotonic() + self.max_seconds
        for n in range(1, self.max_writes + 1):
            if self._halt.is_set() or time.monotonic() >= deadline:
                break
            address = next(cycle)
            key = self.keys[(w + n) % len(self.keys)]
            o = Outcome(w, key, f"{self.prefix}w{w}-{n}", address, time.monotonic())
            try:
                o.version, o.error, o.seconds = insere_timed(stubs[address], key, o.value)
            except grpc.RpcError as e:
                o.seconds = time.monotonic() - o.started
                o.error = f"rpc {e.code().name}"
            self.record.add(o)
            if not (o.version and o.version > 0):
                # a load generator's back-off, so a dead server is not hammered
                self._halt.wait(0.05)
            elif self.pace:
                self._halt.wait(self.pace)

    def wait_acks(self, n: int, address: str | None = None, since: float = 0.0,
                  timeout: float = 30.0, what: str = "") -> None:
        wait_until(lambda: len(self.record.acked(address, since)) >= n, timeout,
                   f"{n} acknowledged writes{' via ' + address if address else ''} {what} "
                   f"({self.record.summary()})")

    def stop(self) -> Record:
        self._halt.set()
        for t in self._threads:
            t.join(timeout=WRITE_RPC_TIMEOUT + 10)
            assert not t.is_alive(), f"{t.name} did not stop (an RPC hung)"
        return self.record

    def join(self, timeout: float | None = None) -> Record:
        """Wait until the writers finish by themselves (count or time bound)."""
        limit = self.max_seconds + WRITE_RPC_TIMEOUT + 10 if timeout is None else timeout
        for t in self._threads:
            t.join(timeout=limit)
            assert not t.is_alive(), f"{t.name} did not finish"
        return self.record


# ---------------------------------------------------------------------------
# checker
# ---------------------------------------------------------------------------
Histories = dict[str, dict[str, list[tuple[int, str]]]]   # server -> key -> [(version, value)]


def check_histories(histories: Histories, attempts: Iterable[Outcome]) -> list[str]:
    """Violations of the workload's invariants, given every server's history of every
    workload key (no removes in the workload):

    1. every acknowledged write is on every server at its version with its value;
    2. the versions of each key are 1..N without holes (and no version twice);
    3. every stored value was attempted, under the key it was attempted for, and appears at most
       once; no two acknowledgements share (key, version) with different values."""
    attempts = list(attempts)
    problems: list[str] = []
    attempted = {o.value: o.key for o in attempts}
    acks: dict[tuple[str, int], str] = {}
    for o in attempts:
        if o.version and o.version > 0:
            old = acks.setdefault((o.key, o.version), o.value)
            if old != o.value:
                problems.append(f"two writes acknowledged as {o.key} v{o.version}: {old!r}, {o.value!r}")
    for server, keys in sorted(histories.items()):
        for key, versions in sorted(keys.items()):
            got = sorted(v for v, _ in versions)
            if got != list(range(1, len(got) + 1)):
                problems.append(f"{server}: {key} has versions {got[:20]}, not 1..{len(got)}")
        stored: dict[str, list[tuple[str, int]]] = defaultdict(list)
        for key, versions in keys.items():
            for ver, value in versions:
                stored[value].append((key, ver))
        for value, places in sorted(stored.items()):
            if value not in attempted:
                problems.append(f"{server}: value {value!r} at {places} was never written")
            elif len(places) > 1:
                problems.append(f"{server}: value {value!r} stored {len(places)} times: {places}")
            elif places[0][0] != attempted[value]:
                problems.append(f"{server}: value {value!r} under {places[0][0]}, "
                                f"written to {attempted[value]}")
        for (key, ver), value in sorted(acks.items()):
            have = dict(keys.get(key, []))
            if have.get(ver) != value:
                problems.append(f"{server}: acknowledged {key} v{ver}={value!r} missing "
                                f"(has {have.get(ver)!r})")
    return problems


def histories_of(stubs: Sequence[Stubs], keys: Sequence[str]) -> Histories:
    def one(s: Stubs) -> dict[str, list[tuple[int, str]]]:
        return {k: [(v.versao, v.valor) for v in s.history(k).versions] for k in keys}
    with ThreadPoolExecutor(len(stubs)) as pool:
        return dict(zip((s.address for s in stubs), pool.map(one, stubs)))


def check_cluster(stubs: Sequence[Stubs], workloads: Iterable[Workload], settle: float = 45.0) -> None:
    """After the faults are healed: wait until settled, then check the invariants and that
    every replica is identical."""
    workloads = list(workloads)
    t0 = time.monotonic()
    sts = wait_settled(stubs, settle, "settle after heal")
    print(f"\n[check] settled in {time.monotonic() - t0:.2f}s at index {sts[0].applied_index}, "
          f"term {sts[0].term}; " + " | ".join(w.record.summary() for w in workloads), flush=True)
    attempts = [o for w in workloads for o in w.record.snapshot()]
    assert any(o.version and o.version > 0 for o in attempts), \
        "no write was acknowledged: the test exercised nothing"
    keys = [k for w in workloads for k in w.keys]
    problems = check_histories(histories_of(stubs, keys), attempts)
    assert not problems, f"{len(problems)} invariant violations, e.g.:\n" + "\n".join(problems[:15])
    assert_replicas_identical(stubs, consult_all=False, sample=300)


# ---------------------------------------------------------------------------
# a plain MQTT client for tests (proxy self-test, hostile messages)
# ---------------------------------------------------------------------------
class MqttProbe:
    """paho (MQTT 5) client that records what it receives and its connects/disconnects."""

    def __init__(self, port: int, name: str):
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion
        self.received: list[tuple[str, bytes]] = []
        self.connects = 0
        self.disconnects = 0
        self.connected = threading.Event()
        self.subacks = 0
        self._lock = threading.Lock()
        self._subs: list[str] = []
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{name}-{os.getpid()}-{free_port()}",
                        protocol=mqtt.MQTTv5)
        c.reconnect_delay_set(min_delay=0.1, max_delay=0.5)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        self.client = c
        c.connect_async(HOST, port, keepalive=5, clean_start=True)
        c.loop_start()

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            return
        with self._lock:
            self.connects += 1
            for t in self._subs:
                client.subscribe(t, qos=1)
        self.connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.connected.clear()
        with self._lock:
            self.disconnects += 1

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        with self._lock:
            self.subacks += 1

    def _on_message(self, client, userdata, msg):
        with self._lock:
            self.received.append((msg.topic, msg.payload))

    def subscribe(self, topic: str) -> None:
        with self._lock:
            self._subs.append(topic)
            if self.connected.is_set():
                self.client.subscribe(topic, qos=1)

    def payloads(self) -> list[bytes]:
        with self._lock:
            return [p for _, p in self.received]

    def publish(self, topic: str, payload: bytes, retain: bool = False, properties=None,
                timeout: float = 10.0) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain, properties=properties)
        info.wait_for_publish(timeout)

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()


# ---------------------------------------------------------------------------
# hostile broker messages
# ---------------------------------------------------------------------------
def user_properties(*pairs):
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
    props = Properties(PacketTypes.PUBLISH)
    if pairs:
        props.UserProperty = list(pairs)
    return props


def hostile_messages(secret: bytes | None, topic: str) -> list[tuple[bytes, object]]:
    """(payload, properties) pairs no server may be disturbed by: MACs that are non-ASCII,
    duplicated, empty or huge, odd property names, unsigned random bytes, and -- signed with the
    real secret, so they pass the MAC check -- payloads that are not UTF-8, not JSON, or JSON of
    the wrong shape."""
    doc = b'{"type": "heartbeat", "term": 1}'
    out = [
        (doc, user_properties(("kvs-mac", "\u00e9" * 64))),
        (doc, user_properties(("kvs-mac", "\u2603" + "0" * 63))),
        (doc, user_properties(("kvs-mac", "0" * 64), ("kvs-mac", "1" * 64))),
        (doc, user_properties(("kvs-mac", ""))),
        (doc, user_properties(("kvs-mac", "a" * 60_000))),
        (doc, user_properties(("kvs-m\u00e4c", "\u00e9"), ("\u2603", "x"))),
        (os.urandom(512), None),
    ]
    if secret:
        garbage = [b"\xff\xfe\x00\x80 not utf-8", b"not json", b"[]", b'"a string"', b"null",
                   b'{"hello": "world"}', b'{"type": 7, "term": "x", "from": []}', b"{" * 10000,
                   os.urandom(2048)]
        out += [(g, user_properties(("kvs-mac", message_mac(secret, topic, g)))) for g in garbage]
    return out


RETAINED_HOSTILE = (b'{"type": "heartbeat"}', ("kvs-mac", "\u00e9t\u00e9 \u2603 " * 8))
