"""Typed KVS client: the only module of the shell that imports grpc.

Everything above this module (commands, completer, renderers) sees plain
dataclasses and :class:`ClientError` subclasses, never grpc objects.

One :class:`Client` talks to one *target*: a single server or a cluster given
as several addresses.  Several addresses use grpc's own multi-address
``ipv4:`` target with the ``round_robin`` policy, so grpc spreads calls over
every READY server and skips one that is down (failover).  Read-only calls
also get a grpc retry policy on UNAVAILABLE; writes are never retried by us
(only grpc's transparent retry of calls that never left the client applies),
so a put is never applied twice.

The server sends the reason for a -1 / blank answer in the trailing metadata
key ``kvs-error``; every result carries it in ``.error``.
"""
from __future__ import annotations

import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import grpc

from kvs_proto import kvs_pb2, kvs_pb2_grpc

ERROR_KEY = "kvs-error"
NODE_KEY = "kvs-node"  # optional initial metadata: the node that answered
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9000
DEFAULT_TIMEOUT = 5.0
MAX_MESSAGE = 64 * 1024 * 1024


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------
class ClientError(Exception):
    """A call that did not produce an answer (the command failed)."""


class ServerUnavailable(ClientError):
    """No server could be reached."""


class ServerTimeout(ClientError):
    """The server did not answer within the deadline."""


class RequestTooLarge(ClientError):
    """The request or answer exceeded the gRPC message limit."""


class Unsupported(ClientError):
    """The server does not implement the RPC (e.g. no KVSExt service)."""


class BadTarget(ClientError, ValueError):
    """A server address list that cannot be parsed or resolved."""


# ---------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------
@dataclass
class Written:
    """Answer of Insere / Remove: the version written or removed (-1: refused)."""
    key: str
    version: int
    error: str = ""
    requested: int | None = None  # Remove: the version asked for (None: all)
    value: str | None = None  # Insere: the value sent

    @property
    def ok(self) -> bool:
        return self.version > 0


@dataclass
class Read:
    """Answer of Consulta: the tuple that answered (version 0: nothing qualifies)."""
    key: str
    value: str
    version: int
    requested: int | None = None
    error: str = ""

    @property
    def found(self) -> bool:
        return self.version > 0


@dataclass
class VersionInfo:
    version: int
    value: str
    written_at: float
    node: str
    seq: int


@dataclass
class History:
    key: str
    versions: list[VersionInfo]
    max_version: int
    error: str = ""


@dataclass
class KeyList:
    keys: list[str]
    truncated: bool


@dataclass
class Peer:
    node_id: str
    address: str
    online: bool


@dataclass
class NodeStatus:
    address: str  # the address we asked
    up: bool
    node_id: str = ""
    broker_connected: bool = False
    applied_seq: int = 0
    leader_seq: int = 0
    epoch: int = 0
    leader: str = ""
    state: str = ""
    keys: int = 0
    log_hash: str = ""
    uptime: float = 0.0
    durable: bool = False
    advertised: str = ""
    peers: list[Peer] = field(default_factory=list)
    error: str = ""

    @property
    def lag(self) -> int | None:
        if not self.up:
            return None
        return max(0, self.leader_seq - self.applied_seq)


# ---------------------------------------------------------------------------
# addresses
# ---------------------------------------------------------------------------
def parse_servers(spec: str | int, default_host: str = DEFAULT_HOST) -> list[str]:
    """``9000`` | ``host:9000`` | ``9000,9001`` | ``h1:9000,h2:9001`` -> ["host:port", ...]."""
    text = str(spec).strip()
    if not text:
        raise BadTarget("no server given")
    out: list[str] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if part.isdigit():
            host, port = default_host, part
        else:
            if part.startswith("["):  # [::1]:9000
                host, _, port = part[1:].partition("]:")
            else:
                host, sep, port = part.rpartition(":")
                if not sep:
                    raise BadTarget(f"not a port or host:port: {part!r}")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise BadTarget(f"bad port in {part!r}")
        addr = f"{host or default_host}:{int(port)}"
        if addr not in out:
            out.append(addr)
    if not out:
        raise BadTarget("no server given")
    return out


def _resolve_ipv4(addr: str) -> str:
    host, _, port = addr.rpartition(":")
    try:
        socket.inet_aton(host)
        if host.count(".") == 3:
            return addr
    except OSError:
        pass
    try:
        infos = socket.getaddrinfo(host, int(port), socket.AF_INET, socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise BadTarget(f"cannot resolve {host!r}: {exc}") from None
    return f"{infos[0][4][0]}:{port}"


_READ_METHODS = [
    {"service": "kvs.KVS", "method": "Consulta"},
    {"service": "kvs.KVS", "method": "ConsultaVarias"},
    {"service": "kvs.KVS", "method": "Snapshot"},
    {"service": "kvs.KVSExt"},
]
SERVICE_CONFIG = json.dumps({
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [{
        "name": _READ_METHODS,
        "retryPolicy": {
            "maxAttempts": 3, "initialBackoff": "0.05s", "maxBackoff": "0.5s",
            "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"],
        },
    }],
})


def grpc_target(addresses: Sequence[str]) -> str:
    """The grpc target for ``addresses``: ``ipv4:a:p,b:q`` (resolved) for round_robin."""
    return "ipv4:" + ",".join(_resolve_ipv4(a) for a in addresses)


def _channel(target: str) -> grpc.Channel:
    return grpc.insecure_channel(target, options=[
        ("grpc.service_config", SERVICE_CONFIG),
        ("grpc.enable_retries", 1),
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.min_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2000),
        ("grpc.enable_http_proxy", 0),
    ])


def _errors(call) -> str:
    try:
        md = call.trailing_metadata() or ()
    except Exception:  # noqa: BLE001 - a failed call may have none
        return ""
    reasons = []
    for k, v in md:
        if k == ERROR_KEY:
            reasons.append(v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v))
    return "; ".join(reasons)


def _translate(exc: grpc.RpcError, where: str) -> ClientError:
    code = exc.code() if hasattr(exc, "code") else None
    details = (exc.details() if hasattr(exc, "details") else "") or ""
    reason = ""
    try:
        reason = _errors(exc)
    except Exception:  # noqa: BLE001
        pass
    msg = details + (f" ({reason})" if reason and reason not in details else "")
    if code == grpc.StatusCode.UNAVAILABLE:
        low = msg.lower()
        why = ("connection refused" if "connection refused" in low
               else "connection reset" if "reset" in low
               else "timed out connecting" if "timeout" in low or "timed out" in low
               else (msg or "unavailable"))
        return ServerUnavailable(f"server {where} is unreachable ({why})")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ServerTimeout(f"server {where} did not answer in time")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return RequestTooLarge(f"request too large: {msg}")
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return Unsupported(f"server {where} does not support this call: {msg}")
    name = code.name if code is not None else "ERROR"
    return ClientError(f"{name}: {msg}" if msg else name)


def _opt_version(v: int | None) -> dict:
    return {} if v is None else {"versao": int(v)}


# ---------------------------------------------------------------------------
# the client
# ---------------------------------------------------------------------------
class Client:
    """A connection to one server or a round-robin cluster of servers."""

    def __init__(self, addresses: Sequence[str] | str, timeout: float = DEFAULT_TIMEOUT):
        if isinstance(addresses, str):
            addresses = parse_servers(addresses)
        self.addresses = list(addresses)
        if not self.addresses:
            raise BadTarget("no server given")
        self.timeout = timeout
        self.target = grpc_target(self.addresses)
        self._channel = _channel(self.target)
        self._kvs = kvs_pb2_grpc.KVSStub(self._channel)
        self._ext = kvs_pb2_grpc.KVSExtStub(self._channel)
        self._state = "idle"  # from the outcome of the last call: idle, connected, down
        self._lock = threading.Lock()
        self._status_channels: dict[str, grpc.Channel] = {}
        self.last_peer = ""  # the server that answered the last call ("" if unknown)
        self.last_latency: float | None = None
        self._closed = False

    # -- connection state ----------------------------------------------------
    @property
    def state(self) -> str:
        return self._state

    @property
    def label(self) -> str:
        return ",".join(self.addresses)

    def wait_ready(self, timeout: float = 5.0) -> bool:
        """True once some server answers (a cheap ListKeys), polling until ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.list_keys("", limit=1, timeout=max(0.2, min(1.0, deadline - time.monotonic())))
                return True
            except Unsupported:
                return True  # it answered
            except ClientError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.1)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._state = "closed"
        self._channel.close()
        with self._lock:
            chans = list(self._status_channels.values())
            self._status_channels.clear()
        for ch in chans:
            ch.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- plumbing ------------------------------------------------------------
    def _note(self, call, started: float) -> None:
        """Latency, and which server answered: grpc's ``peer()`` where the call object has
        it, else the ``kvs-node`` initial metadata if the server sends it."""
        self.last_latency = time.perf_counter() - started
        self._state = "connected"
        peer = ""
        try:
            if hasattr(call, "peer"):
                peer = call.peer() or ""
            else:
                for k, v in call.initial_metadata() or ():
                    if k == NODE_KEY:
                        peer = v.decode() if isinstance(v, bytes) else str(v)
        except Exception:  # noqa: BLE001
            peer = ""
        for prefix in ("ipv4:", "ipv6:"):
            if peer.startswith(prefix):
                peer = peer[len(prefix):]
        self.last_peer = peer

    def _failed(self, exc: grpc.RpcError) -> ClientError:
        err = _translate(exc, self.label)
        if isinstance(err, (ServerUnavailable, ServerTimeout)):
            self._state = "down"
        return err

    def _unary(self, method, request, timeout: float | None = None):
        started = time.perf_counter()
        try:
            resp, call = method.with_call(request, timeout=timeout or self.timeout)
        except grpc.RpcError as exc:
            self.last_latency = time.perf_counter() - started
            raise self._failed(exc) from None
        self._note(call, started)
        return resp, _errors(call)

    def _stream(self, method, requests, timeout: float | None = None):
        started = time.perf_counter()
        call = method(iter(list(requests)), timeout=timeout or self.timeout)
        try:
            out = list(call)
        except grpc.RpcError as exc:
            self.last_latency = time.perf_counter() - started
            raise self._failed(exc) from None
        self._note(call, started)
        return out, _errors(call)

    # -- the KVS contract ----------------------------------------------------
    def put(self, key: str, value: str) -> Written:
        resp, err = self._unary(self._kvs.Insere, kvs_pb2.ChaveValor(chave=key, valor=value))
        return Written(key, resp.versao, err, value=value)

    def get(self, key: str, version: int | None = None) -> Read:
        resp, err = self._unary(self._kvs.Consulta,
                                kvs_pb2.ChaveVersao(chave=key, **_opt_version(version)))
        return Read(key, resp.valor, resp.versao, version, err)

    def delete(self, key: str, version: int | None = None) -> Written:
        resp, err = self._unary(self._kvs.Remove,
                                kvs_pb2.ChaveVersao(chave=key, **_opt_version(version)))
        return Written(key, resp.versao, err, requested=version)

    @staticmethod
    def _spread(err: str, failed: Sequence[bool]) -> list[str]:
        """The stream's trailing reasons per item: the server writes ``#INDEX: reason``
        joined by ``; ``; without indexes every failed item gets the whole text."""
        by_index: dict[int, str] = {}
        for m in re.finditer(r"(?:^|; )#(\d+): (.*?)(?=; #\d+: |$)", err or ""):
            by_index[int(m.group(1))] = m.group(2)
        out = []
        for i, bad in enumerate(failed):
            if i in by_index:
                out.append(by_index[i])
            else:
                out.append((err if not by_index else "") if bad else "")
        return out

    def mput(self, pairs: Sequence[tuple[str, str]]) -> list[Written]:
        resps, err = self._stream(self._kvs.InsereVarias,
                                  (kvs_pb2.ChaveValor(chave=k, valor=v) for k, v in pairs))
        reasons = self._spread(err, [r.versao <= 0 for r in resps])
        return [Written(k, r.versao, e, value=v) for (k, v), r, e in zip(pairs, resps, reasons)]

    def mget(self, items: Sequence[tuple[str, int | None]]) -> list[Read]:
        resps, err = self._stream(
            self._kvs.ConsultaVarias,
            (kvs_pb2.ChaveVersao(chave=k, **_opt_version(v)) for k, v in items))
        reasons = self._spread(err, [r.versao <= 0 for r in resps])
        return [Read(k, r.valor, r.versao, v, e) for (k, v), r, e in zip(items, resps, reasons)]

    def mdel(self, items: Sequence[tuple[str, int | None]]) -> list[Written]:
        resps, err = self._stream(
            self._kvs.RemoveVarias,
            (kvs_pb2.ChaveVersao(chave=k, **_opt_version(v)) for k, v in items))
        reasons = self._spread(err, [r.versao <= 0 for r in resps])
        return [Written(k, r.versao, e, requested=v)
                for (k, v), r, e in zip(items, resps, reasons)]

    def snapshot(self, version: int = 0) -> tuple[list[Read], str]:
        """Every key's tuple at ``version`` (0: latest). Blank tuples are dropped."""
        started = time.perf_counter()
        call = self._kvs.Snapshot(kvs_pb2.Versao(versao=int(version)),
                                  timeout=max(self.timeout, 30.0))
        try:
            rows = [Read(t.chave, t.valor, t.versao, version or None)
                    for t in call if t.chave or t.versao]
        except grpc.RpcError as exc:
            raise self._failed(exc) from None
        self._note(call, started)
        return rows, _errors(call)

    # -- the extension service ------------------------------------------------
    def history(self, key: str) -> History:
        resp, err = self._unary(self._ext.History, kvs_pb2.HistoryRequest(chave=key))
        return History(resp.chave or key,
                       [VersionInfo(v.versao, v.valor, v.written_at, v.node, v.seq)
                        for v in resp.versions],
                       resp.max_version, err)

    def list_keys(self, prefix: str = "", limit: int = 200, start_after: str = "",
                  timeout: float | None = None) -> KeyList:
        resp, _ = self._unary(self._ext.ListKeys,
                              kvs_pb2.ListKeysRequest(prefix=prefix, limit=limit,
                                                      start_after=start_after),
                              timeout=timeout)
        return KeyList(list(resp.keys), bool(resp.truncated))

    def _status_stub(self, address: str):
        with self._lock:
            ch = self._status_channels.get(address)
            if ch is None:
                # one plain channel per server: Status must reach *that* server
                ch = grpc.insecure_channel(_resolve_ipv4(address),
                                           options=[("grpc.enable_http_proxy", 0)])
                self._status_channels[address] = ch
        return kvs_pb2_grpc.KVSExtStub(ch)

    def node_status(self, address: str, timeout: float = 1.5) -> NodeStatus:
        """Status of one server (``up=False`` with the reason when it cannot be reached)."""
        try:
            stub = self._status_stub(address)
            r = stub.Status(kvs_pb2.StatusRequest(), timeout=timeout)
        except BadTarget as exc:
            return NodeStatus(address, False, error=str(exc))
        except grpc.RpcError as exc:
            return NodeStatus(address, False, error=str(_translate(exc, address)))
        return NodeStatus(
            address=address, up=True, node_id=r.node_id, broker_connected=r.broker_connected,
            applied_seq=r.applied_seq, leader_seq=r.leader_seq, epoch=r.epoch, leader=r.leader,
            state=r.state, keys=r.keys, log_hash=r.log_hash, uptime=r.uptime, durable=r.durable,
            advertised=r.address,
            peers=[Peer(p.node_id, p.address, p.online) for p in r.peers])

    def cluster_status(self, timeout: float = 1.5) -> list[NodeStatus]:
        """Status of every configured server, plus every peer they report."""
        from concurrent.futures import ThreadPoolExecutor

        seen: dict[str, NodeStatus] = {}
        todo = list(self.addresses)
        peer_names: dict[str, str] = {}
        with ThreadPoolExecutor(max_workers=8) as pool:
            while todo:
                batch = [a for a in todo if a not in seen]
                todo = []
                for st in pool.map(lambda a: self.node_status(a, timeout), batch):
                    seen[st.address] = st
                    for p in st.peers:
                        if p.address and p.address not in seen and p.address not in batch:
                            peer_names.setdefault(p.address, p.node_id)
                            if p.address not in todo:
                                todo.append(p.address)
        out: list[NodeStatus] = []
        up_ids: set[str] = set()
        for st in seen.values():
            if st.up:
                if st.node_id and st.node_id in up_ids:
                    continue  # the same server reached under two names
                up_ids.add(st.node_id)
            elif not st.node_id:
                st.node_id = peer_names.get(st.address, "")
            out.append(st)
        return out
