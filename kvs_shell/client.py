"""Typed KVS client: the only module of the shell that imports grpc.

Everything above this module (commands, completer, renderers) sees plain
dataclasses and :class:`ClientError` subclasses, never grpc objects.

One :class:`Client` talks to one *target*: a single server or a cluster given
as several addresses.  Several addresses use grpc's own multi-address
``ipv4:`` target with the ``round_robin`` policy, so grpc spreads calls over
every READY server and skips one that is down (failover).  Every call gets
a grpc retry policy on UNAVAILABLE, so a call that met a server as it died
(``Stream removed``) goes to another one.  Writes are safe to retry because each
carries a fresh idempotency key (``kvs-request-id`` metadata; a stream's i-th
change is ``<id>.<i>``): a KVS server applies one id once and answers a retry,
through any server, with the first outcome.

The server sends the reason for a -1 / blank answer in the trailing metadata
key ``kvs-error``; every result carries it in ``.error``.

Reads (Consulta, ConsultaVarias, Snapshot) are served from the answering server's
state by default; a client with ``consistency="linearizable"`` sends
``kvs-consistency: linearizable`` on them, and the server answers only after
confirming with a quorum that it has every write acknowledged before (ReadIndex).
Either way a client of several servers keeps its session's order: each answer
carries its server's applied position (``kvs-position``), and every read (also
History and Export) sends the greatest one seen so far as ``kvs-after``, so the
server waits until it has applied that far: a read shows the client's own
writes and never goes back behind an earlier read (read-your-writes, monotonic
reads), whichever server answers.

Security (opt-in, see :class:`Security`): TLS with a given CA (optionally a
client certificate for mutual TLS) and a bearer token sent as
``authorization: Bearer <token>`` metadata on every call; channels, metadata keys
and secret files come from :mod:`kvs_common`.  A refused call raises
:class:`Unauthenticated` (no or unknown credential) or :class:`PermissionDenied`
(known, but its roles do not allow it), each with the server's reason.  A client built without
an explicit ``security`` uses the module default, which ``kvs_shell`` and
``client.sh`` set from their flags / environment (:func:`security_from`).

Long-lived streams (``watch``, ``export``) have no deadline and come back as a
:class:`StreamHandle` that another thread can ``cancel()``.
"""
from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Sequence

import grpc

from kvs_common import wire
from kvs_common.channel import make_channel, read_pem
from kvs_common.secretfile import SecretError, read_secret
from kvs_common.status import fetch_status
from kvs_common.wire import (CLIENT_CERT_ENV, CLIENT_KEY_ENV, CONSISTENCY_LEVELS, LINEARIZABLE,
                             LOCAL, TLS_CA_ENV, TOKEN_ENV, TOKEN_FILE_ENV)
from kvs_proto import kvs_pb2, kvs_pb2_grpc

ERROR_KEY = wire.ERROR
REQUEST_ID_KEY = wire.REQUEST_ID
NODE_KEY = wire.NODE  # optional trailing metadata: the node that answered
CONSISTENCY_KEY = wire.CONSISTENCY  # request metadata of a read
POSITION_KEY = wire.POSITION  # trailing: "<cluster id>/<position>" the server has applied
AFTER_KEY = wire.AFTER  # request metadata of a read: the greatest position seen
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9000
DEFAULT_TIMEOUT = 5.0
MAX_MESSAGE = wire.CLIENT_MAX_MESSAGE


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


class Unauthenticated(ClientError):
    """The server refused the call: missing or wrong token (or client certificate)."""


class PermissionDenied(ClientError):
    """The server knows who we are, and our roles do not allow the call."""


class SecurityConfigError(ClientError, ValueError):
    """A token file / CA file that cannot be read."""


class NoQuorum(ClientError):
    """The server cannot reach a majority of the cluster's voting members."""


def is_no_quorum(reason: str) -> bool:
    return "no quorum" in (reason or "").lower()


class InvalidArgument(ClientError, ValueError):
    """The server refused the request's arguments (e.g. compact beyond the last position)."""


class FailedPrecondition(ClientError):
    """The server cannot do it in its current state (e.g. already compacted past it)."""


class Compacted(FailedPrecondition):
    """A watch start position older than the server keeps: re-read the snapshot, then
    watch from ``oldest`` or later."""

    def __init__(self, message: str, oldest: int = 0):
        super().__init__(message)
        self.oldest = oldest


class WatchLagged(ClientError):
    """The server dropped a watch that fell too far behind; watch again from ``resume``."""

    def __init__(self, message: str, resume: int = 0):
        super().__init__(message)
        self.resume = resume


# ---------------------------------------------------------------------------
# security settings
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Security:
    """How to reach the servers: plain (default) or TLS, with or without a token.

    ``tls_ca``/``tls_cert``/``tls_key`` hold PEM *bytes*; ``token`` the bearer token.
    ``repr`` never shows the token."""
    token: str | None = field(default=None, repr=False)
    tls_ca: bytes | None = field(default=None, repr=False)
    tls_cert: bytes | None = field(default=None, repr=False)
    tls_key: bytes | None = field(default=None, repr=False)
    server_name: str | None = None  # name checked against the certificate (default: the host)

    @property
    def tls(self) -> bool:
        return self.tls_ca is not None

    def describe(self) -> str:
        """What this client brings: ``TLS, client certificate, token`` ... ``plaintext, no
        credentials``."""
        parts = ["TLS" if self.tls else "plaintext"]
        if self.tls_cert:
            parts.append("client certificate")
        if self.token:
            parts.append("token")
        if not self.tls_cert and not self.token:
            parts.append("no credentials")
        return ", ".join(parts)


PLAIN = Security()
_default_security = PLAIN


def set_default_security(security: Security | None) -> None:
    """The security every :class:`Client` built without ``security=`` uses."""
    global _default_security
    _default_security = security or PLAIN


def default_security() -> Security:
    return _default_security


def _read_pem(path: str, what: str) -> bytes:
    try:
        return read_pem(path)
    except OSError as exc:
        raise SecurityConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def security_from(token: str | None = None, token_file: str | None = None,
                  tls_ca: str | None = None, tls_cert: str | None = None,
                  tls_key: str | None = None, server_name: str | None = None,
                  environ: dict | None = None) -> Security:
    """Security from flags, falling back to the environment.

    Token: ``token`` > ``token_file`` > $KVS_TOKEN_FILE > $KVS_TOKEN (the server reads
    its token the same way: file first).  TLS: ``tls_ca`` > $KVS_TLS_CA; a client
    certificate (mutual TLS): ``tls_cert``/``tls_key`` > $KVS_CLIENT_CERT/$KVS_CLIENT_KEY."""
    env = os.environ if environ is None else environ
    tok = token.strip() if token and token.strip() else None
    if tok is None:
        path = token_file or env.get(TOKEN_FILE_ENV) or None
        try:
            # the same rules as the servers': not readable by others, long enough
            tok = (read_secret(path, TOKEN_ENV, what="token") if path
                   else _env_token(env))
        except SecretError as exc:
            raise SecurityConfigError(str(exc)) from None
    if tok is not None and any(c in tok for c in "\r\n\0"):
        raise SecurityConfigError("the token must be one line of text")
    ca_path = tls_ca or env.get(TLS_CA_ENV) or None
    cert_path = tls_cert or env.get(CLIENT_CERT_ENV) or None
    key_path = tls_key or env.get(CLIENT_KEY_ENV) or None
    if bool(cert_path) != bool(key_path):
        raise SecurityConfigError("a client certificate needs both --tls-cert and --tls-key")
    if cert_path and not ca_path:
        raise SecurityConfigError("a client certificate needs --tls-ca (or $KVS_TLS_CA)")
    return Security(
        token=tok,
        tls_ca=_read_pem(ca_path, "CA file") if ca_path else None,
        tls_cert=_read_pem(cert_path, "certificate") if cert_path else None,
        tls_key=_read_pem(key_path, "key") if key_path else None,
        server_name=server_name or None)


def _env_token(env) -> str | None:
    value = (env.get(TOKEN_ENV) or "").strip()
    return value or None


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

    @property
    def no_quorum(self) -> bool:
        return is_no_quorum(self.error)


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

    @property
    def no_quorum(self) -> bool:
        return is_no_quorum(self.error)


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
    versions: list[VersionInfo]  # newest first
    max_version: int
    error: str = ""
    more: bool = False  # older live versions remain (ask with before_version=oldest shown)


@dataclass
class KeyList:
    keys: list[str]
    truncated: bool


@dataclass(frozen=True)
class Change:
    """One change of the replicated log, as a watch delivers it."""
    position: int
    op: str  # put | remove
    key: str
    version: int  # written, or removed (remove-all: the highest removed)
    value: str = ""  # put only
    node: str = ""  # the server the write came through
    written_at: float = 0.0  # unix seconds, from the log entry
    all_versions: bool = False  # remove: every live version of the key went


@dataclass(frozen=True)
class WatchMessage:
    """One message of a watch: the first has no changes and ``head`` = the last position
    the server had applied; each later one the changes of one applied batch (``head`` = the
    batch's last position)."""
    head: int
    changes: list[Change]


@dataclass(frozen=True)
class RetentionInfo:
    """What a server knows of retention (answer of compact and retention)."""
    keep_versions: int  # 0: every live version kept
    compacted: int  # position of the last compaction (0: never)
    position: int  # last position applied on the answering server
    oldest_watch: int  # oldest start position a watch can take there
    dropped: int = 0  # compact / retention set: versions the change dropped


@dataclass
class ExportedKey:
    key: str
    max_version: int  # highest version the key ever had
    versions: list[VersionInfo]  # live versions, ascending


@dataclass
class Peer:
    node_id: str
    address: str
    online: bool


@dataclass
class Member:
    """One member of the Raft configuration, as some server sees it."""
    node_id: str
    address: str = ""
    role: str = ""  # voter | learner
    online: bool = False
    match_index: int = 0  # the leader's view of its log (0: not known by the answering server)
    leader: bool = False


@dataclass
class MemberList:
    members: list[Member]
    leader: str = ""
    cluster_id: str = ""

    @property
    def ids(self) -> list[str]:
        return [m.node_id for m in self.members]


@dataclass
class MemberRemoval:
    """Answer of MemberRemove: ``ok=False`` is a refusal, with the server's reason."""
    node_id: str
    ok: bool
    error: str = ""
    members: list[Member] = field(default_factory=list)

    @property
    def no_quorum(self) -> bool:
        return is_no_quorum(self.error)


@dataclass
class Identity:
    """Who the server takes us for (WhoAmI), and whether this client uses TLS."""
    name: str
    roles: list[str]
    method: str  # token | cert | none | peer
    admin: bool = False
    read_prefixes: list[str] = field(default_factory=list)
    write_prefixes: list[str] = field(default_factory=list)
    tls: bool = False  # the server saw this call arrive over TLS
    server: str = ""   # the server that answered

    def label(self) -> str:
        """``admin [admin] via token``: for the banner and the toolbar."""
        roles = ",".join(self.roles) or "no roles"
        return f"{self.name or 'anonymous'} [{roles}] via {self.method or 'none'}"


def _members(msgs) -> list[Member]:
    return [Member(m.node_id, m.address, m.role, m.online, m.match_index, m.leader) for m in msgs]


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
    snapshotting: bool = False
    # Raft; a server that does not run Raft leaves role empty
    role: str = ""  # leader, follower, candidate, pre-candidate, learner
    term: int = 0
    commit_index: int = 0
    applied_index: int = 0
    members: list[Member] = field(default_factory=list)
    cluster_id: str = ""

    @property
    def raft(self) -> bool:
        return bool(self.role)

    @property
    def lag(self) -> int | None:
        """Entries known committed but not applied yet (Raft), or behind the sequencer."""
        if not self.up:
            return None
        if self.raft:
            return max(0, self.commit_index - self.applied_index)
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


# Reads are idempotent; writes are made so by their request id.  A retry happens
# only on UNAVAILABLE (no server, or the connection broke mid-call) and before any
# reply came back, which is when a round robin should try the next server.
SERVICE_CONFIG = json.dumps({
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [{
        "name": [{"service": "kvs.KVS"}, {"service": "kvs.KVSExt"}],
        "retryPolicy": {
            "maxAttempts": 4, "initialBackoff": "0.05s", "maxBackoff": "0.5s",
            "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"],
        },
    }],
})


def _request_id(given: str | None = None) -> tuple[tuple[str, str]]:
    """Metadata with the idempotency key of one write call (``given``, else a fresh one)."""
    return ((REQUEST_ID_KEY, given or uuid.uuid4().hex),)


def check_consistency(level: str) -> str:
    if level not in CONSISTENCY_LEVELS:
        raise ValueError(f"unknown consistency {level!r} (choose from {', '.join(CONSISTENCY_LEVELS)})")
    return level


def read_metadata(level: str) -> tuple[tuple[str, str], ...] | None:
    """Metadata of a read at ``level``: local reads send none, so they stay what the
    course's contract describes."""
    return ((CONSISTENCY_KEY, LINEARIZABLE),) if level == LINEARIZABLE else None


def grpc_target(addresses: Sequence[str]) -> str:
    """The grpc target for ``addresses``: ``ipv4:a:p,b:q`` (resolved) for round_robin."""
    return "ipv4:" + ",".join(_resolve_ipv4(a) for a in addresses)


def secure_channel(target: str, security: Security, options=(),
                   server_name: str | None = None) -> grpc.Channel:
    """A channel to ``target`` with ``security``: TLS when it has a CA, the token on
    every call when it has one.  ``server_name``: the name the server certificate
    must carry (needed for multi-address ``ipv4:`` targets)."""
    return make_channel(target, tls_ca=security.tls_ca, cert=security.tls_cert,
                        key=security.tls_key, options=options, token=security.token,
                        server_name=security.server_name or server_name)


def _host(address: str) -> str:
    host = address.rpartition(":")[0]
    return host[1:-1] if host.startswith("[") else host


def _channel(target: str, security: Security = PLAIN, server_name: str | None = None) -> grpc.Channel:
    return secure_channel(target, security, options=[
        ("grpc.service_config", SERVICE_CONFIG),
        ("grpc.enable_retries", 1),
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.min_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ], server_name=server_name)


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
    if is_no_quorum(msg):  # a server that answered, not one that is unreachable
        return NoQuorum(f"server {where}: {msg}")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return Unauthenticated(f"not authenticated: {details or 'no valid credential'} (give a "
                               "token with --token-file or $KVS_TOKEN_FILE, or a client "
                               "certificate with --tls-cert/--tls-key)")
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return PermissionDenied(f"permission denied: {details or 'not allowed'} "
                                "(`whoami` shows what this identity may do)")
    if code == grpc.StatusCode.UNAVAILABLE:
        low = msg.lower()
        if "ssl" in low or "tls" in low or "handshake" in low or "certificate" in low:
            return ServerUnavailable(f"server {where}: TLS handshake failed ({msg}); "
                                     "check --tls-ca / $KVS_TLS_CA, or whether the server uses TLS")
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


_OLDEST_RE = re.compile(r"oldest available position (\d+)")
_RESUME_RE = re.compile(r"resume from position (\d+)")


def _call_peer(call) -> str:
    """The server a streaming call reached: grpc's ``peer()`` where the call object has it,
    else ``kvs-node`` in the initial metadata, else ""."""
    peer = ""
    try:
        if hasattr(call, "peer"):
            peer = call.peer() or ""
        else:
            for k, v in call.initial_metadata() or ():
                if k == NODE_KEY:
                    peer = v.decode() if isinstance(v, bytes) else str(v)
    except Exception:  # noqa: BLE001 - not connected (yet)
        return ""
    for prefix in ("ipv4:", "ipv6:"):
        if peer.startswith(prefix):
            return peer[len(prefix):]
    return peer


class StreamHandle:
    """A long-lived server stream (watch, export): iterate it in one thread, ``cancel()``
    it from any other (Ctrl-C) -- the iteration then simply ends.  Errors come out of the
    iteration as :class:`ClientError` subclasses.  ``server`` is the peer that answers
    ("" until the first message).  ``ended(call)`` runs once the stream ended normally."""

    def __init__(self, open_call, convert, translate, ended=None):
        self._open = open_call
        self._convert = convert
        self._translate = translate
        self._ended = ended
        self._lock = threading.Lock()
        self._call = None
        self._cancelled = False
        self.server = ""

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            call = self._call
        if call is not None:
            call.cancel()

    def __iter__(self):
        with self._lock:
            if self._cancelled or self._call is not None:
                return
            self._call = call = self._open()
        try:
            for msg in call:
                if not self.server:
                    self.server = _call_peer(call)
                yield from self._convert(msg)
            if self._ended is not None:
                self._ended(call)
        except grpc.RpcError as exc:
            if self._cancelled:
                return
            raise self._translate(exc) from None
        finally:
            call.cancel()  # the consumer stopped early: free the stream (no-op once done)


# ---------------------------------------------------------------------------
# the client
# ---------------------------------------------------------------------------
class Client:
    """A connection to one server or a round-robin cluster of servers."""

    def __init__(self, addresses: Sequence[str] | str, timeout: float = DEFAULT_TIMEOUT,
                 security: Security | None = None, consistency: str = LOCAL):
        if isinstance(addresses, str):
            addresses = parse_servers(addresses)
        self.addresses = list(addresses)
        if not self.addresses:
            raise BadTarget("no server given")
        self.timeout = timeout
        self.security = security if security is not None else default_security()
        self.target = grpc_target(self.addresses)
        # addresses are resolved to IPs for round robin: TLS checks the name given
        self._channel = _channel(self.target, self.security, _host(self.addresses[0]))
        self._kvs = kvs_pb2_grpc.KVSStub(self._channel)
        self._ext = kvs_pb2_grpc.KVSExtStub(self._channel)
        self._state = "idle"  # from the outcome of the last call: idle, connected, down
        self._answered = False  # some call of this client has been answered
        self._lock = threading.Lock()
        self._status_channels: dict[str, grpc.Channel] = {}
        self.last_peer = ""  # the server that answered the last call ("" if unknown)
        # Session order over round robin: the greatest (cluster id, applied position)
        # an answer reported; reads send it as kvs-after (see the module's docstring).
        self._seen: tuple[str, int] = ("", 0)
        self.last_latency: float | None = None
        self._closed = False
        self.consistency = consistency

    @property
    def consistency(self) -> str:
        """``local`` or ``linearizable``: how Consulta, ConsultaVarias and Snapshot read."""
        return self._consistency

    @consistency.setter
    def consistency(self, level: str) -> None:
        self._consistency = check_consistency(level)

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
        it, else the ``kvs-node`` metadata if the server sends it."""
        self.last_latency = time.perf_counter() - started
        self._state = "connected"
        self._answered = True
        peer = ""
        try:
            if hasattr(call, "peer"):
                peer = call.peer() or ""
            else:
                for k, v in [*(call.trailing_metadata() or ()), *(call.initial_metadata() or ())]:
                    if k == NODE_KEY:
                        peer = v.decode() if isinstance(v, bytes) else str(v)
        except Exception:  # noqa: BLE001
            peer = ""
        for prefix in ("ipv4:", "ipv6:"):
            if peer.startswith(prefix):
                peer = peer[len(prefix):]
        self.last_peer = peer
        self._saw(call)

    def _saw(self, call) -> None:
        """Keeps the greatest ``kvs-position`` of the cluster the last answer came from
        (a position of another cluster, e.g. one re-created in memory, replaces it)."""
        try:
            md = call.trailing_metadata() or ()
        except Exception:  # noqa: BLE001 - a call object without trailers
            return
        for k, v in md:
            if k != POSITION_KEY:
                continue
            cid, _, pos = (v.decode() if isinstance(v, bytes) else str(v)).rpartition("/")
            if not cid or not pos.isdigit():
                return
            with self._lock:
                seen_cid, seen = self._seen
                if cid != seen_cid or int(pos) > seen:
                    self._seen = (cid, int(pos))
            return

    def _read_md(self, consistency: str | None = None):
        """A read's metadata: its consistency level and, with several servers, the
        greatest position this client has seen (``kvs-after``)."""
        md = list(read_metadata(check_consistency(consistency or self.consistency)) or ())
        cid, pos = self._seen
        if len(self.addresses) > 1 and cid and pos > 0:
            md.append((AFTER_KEY, f"{cid}/{pos}"))
        return tuple(md) or None

    def _failed(self, exc: grpc.RpcError) -> ClientError:
        err = _translate(exc, self.label)
        # A plaintext client meeting a TLS server sees its socket closed; once a
        # call has been answered, a closed socket just means a server went away.
        if (isinstance(err, ServerUnavailable) and not self.security.tls and not self._answered
                and "socket closed" in str(err).lower()):
            err = ServerUnavailable(f"{err}; if the server uses TLS, give --tls-ca (or $KVS_TLS_CA)")
        elif (isinstance(err, ServerUnavailable) and self.security.tls and not self.security.tls_cert
                and not self._answered and "socket closed" in str(err).lower()):
            # a server requiring mutual TLS closes the handshake of a client without a certificate
            err = ServerUnavailable(f"{err}; if the server requires client certificates (mutual "
                                    "TLS), give --tls-cert/--tls-key (or $KVS_CLIENT_CERT/KEY)")
        if isinstance(err, (ServerUnavailable, ServerTimeout)):
            self._state = "down"
        return err

    def _unary(self, method, request, timeout: float | None = None, metadata=None,
               raise_as=None):
        started = time.perf_counter()
        try:
            resp, call = method.with_call(request, timeout=timeout or self.timeout,
                                          metadata=metadata)
        except grpc.RpcError as exc:
            self.last_latency = time.perf_counter() - started
            raise (raise_as or self._failed)(exc) from None
        self._note(call, started)
        return resp, _errors(call)

    def _stream(self, method, requests, timeout: float | None = None, metadata=None):
        started = time.perf_counter()
        call = method(iter(list(requests)), timeout=timeout or self.timeout, metadata=metadata)
        try:
            out = list(call)
        except grpc.RpcError as exc:
            self.last_latency = time.perf_counter() - started
            raise self._failed(exc) from None
        self._note(call, started)
        return out, _errors(call)

    # -- the KVS contract ----------------------------------------------------
    def put(self, key: str, value: str) -> Written:
        resp, err = self._unary(self._kvs.Insere, kvs_pb2.ChaveValor(chave=key, valor=value),
                                metadata=_request_id())
        return Written(key, resp.versao, err, value=value)

    def get(self, key: str, version: int | None = None) -> Read:
        request = kvs_pb2.ChaveVersao(chave=key, **_opt_version(version))
        resp, err = self._unary(self._kvs.Consulta, request, metadata=self._read_md())
        return Read(key, resp.valor, resp.versao, version, err)

    def delete(self, key: str, version: int | None = None) -> Written:
        resp, err = self._unary(self._kvs.Remove,
                                kvs_pb2.ChaveVersao(chave=key, **_opt_version(version)),
                                metadata=_request_id())
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

    def mput(self, pairs: Sequence[tuple[str, str]], request_id: str | None = None,
             timeout: float | None = None) -> list[Written]:
        """Inserts ``pairs`` in one stream.  ``request_id`` (8-64 of ``A-Za-z0-9_-``; default
        a fresh one): the i-th change is ``<id>.<i>``, so resending the same pairs with the
        same id applies nothing twice (while the cluster remembers the id)."""
        resps, err = self._stream(self._kvs.InsereVarias,
                                  (kvs_pb2.ChaveValor(chave=k, valor=v) for k, v in pairs),
                                  timeout=timeout, metadata=_request_id(request_id))
        reasons = self._spread(err, [r.versao <= 0 for r in resps])
        return [Written(k, r.versao, e, value=v) for (k, v), r, e in zip(pairs, resps, reasons)]

    def mget(self, items: Sequence[tuple[str, int | None]]) -> list[Read]:
        resps, err = self._stream(
            self._kvs.ConsultaVarias,
            (kvs_pb2.ChaveVersao(chave=k, **_opt_version(v)) for k, v in items),
            metadata=self._read_md())
        reasons = self._spread(err, [r.versao <= 0 for r in resps])
        return [Read(k, r.valor, r.versao, v, e) for (k, v), r, e in zip(items, resps, reasons)]

    def mdel(self, items: Sequence[tuple[str, int | None]], request_id: str | None = None,
             timeout: float | None = None) -> list[Written]:
        resps, err = self._stream(
            self._kvs.RemoveVarias,
            (kvs_pb2.ChaveVersao(chave=k, **_opt_version(v)) for k, v in items),
            timeout=timeout, metadata=_request_id(request_id))
        reasons = self._spread(err, [r.versao <= 0 for r in resps])
        return [Written(k, r.versao, e, requested=v)
                for (k, v), r, e in zip(items, resps, reasons)]

    def snapshot(self, version: int = 0) -> tuple[list[Read], str]:
        """Every key's tuple at ``version`` (0: latest). Blank tuples are dropped."""
        started = time.perf_counter()
        call = self._kvs.Snapshot(kvs_pb2.Versao(versao=int(version)),
                                  timeout=max(self.timeout, 30.0),
                                  metadata=self._read_md())
        try:
            rows = [Read(t.chave, t.valor, t.versao, version or None)
                    for t in call if t.chave or t.versao]
        except grpc.RpcError as exc:
            raise self._failed(exc) from None
        self._note(call, started)
        return rows, _errors(call)

    # -- the extension service ------------------------------------------------
    def history(self, key: str, limit: int = 0, before_version: int = 0) -> History:
        """One page of ``key``'s live versions, newest first: at most ``limit`` (0: the
        server's default), only those < ``before_version`` (0: from the newest).  The
        server also cuts a page by size; ``more`` says older versions remain."""
        resp, err = self._unary(self._ext.History,
                                kvs_pb2.HistoryRequest(chave=key, limit=max(0, limit),
                                                       before_version=max(0, before_version)),
                                metadata=self._read_md())
        return History(resp.chave or key,
                       [VersionInfo(v.versao, v.valor, v.written_at, v.node, v.seq)
                        for v in resp.versions],
                       resp.max_version, err, bool(resp.more))

    def list_keys(self, prefix: str = "", limit: int = 200, start_after: str = "",
                  timeout: float | None = None) -> KeyList:
        resp, _ = self._unary(self._ext.ListKeys,
                              kvs_pb2.ListKeysRequest(prefix=prefix, limit=limit,
                                                      start_after=start_after),
                              timeout=timeout)
        return KeyList(list(resp.keys), bool(resp.truncated))

    def _status_channel(self, address: str):
        with self._lock:
            ch = self._status_channels.get(address)
            if ch is None:
                # one channel per server: Status must reach *that* server
                ch = secure_channel(_resolve_ipv4(address), self.security,
                                    server_name=_host(address))
                self._status_channels[address] = ch
        return ch

    def whoami(self, timeout: float | None = None) -> Identity:
        """The identity the server sees for this client (KVSExt.WhoAmI)."""
        if not hasattr(kvs_pb2, "WhoAmIRequest"):
            raise Unsupported("these gRPC stubs have no WhoAmI: run ./compile.sh")
        r, _ = self._unary(self._ext.WhoAmI, kvs_pb2.WhoAmIRequest(), timeout=timeout)
        return Identity(r.name, list(r.roles), r.method, r.admin, list(r.read_prefixes),
                        list(r.write_prefixes), r.tls, self.last_peer or self.label)

    def member_list(self, timeout: float | None = None) -> MemberList:
        """The cluster's members as the answering server knows them."""
        resp, _ = self._unary(self._ext.MemberList, kvs_pb2.MemberListRequest(), timeout=timeout)
        return MemberList(_members(resp.members), resp.leader, resp.cluster_id)

    def member_remove(self, node_id: str) -> MemberRemoval:
        """Asks the cluster to remove ``node_id``; a refusal is ``ok=False`` with the reason.
        It carries a request id so that a retry after UNAVAILABLE can be recognised."""
        resp, err = self._unary(self._ext.MemberRemove,
                                kvs_pb2.MemberRemoveRequest(node_id=node_id),
                                metadata=_request_id())
        return MemberRemoval(node_id, bool(resp.ok), resp.error or ("" if resp.ok else err),
                             _members(resp.members))

    # -- watch, export, retention ---------------------------------------------
    def _ext_failed(self, exc: grpc.RpcError) -> ClientError:
        code = exc.code() if hasattr(exc, "code") else None
        details = (exc.details() if hasattr(exc, "details") else "") or ""
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return InvalidArgument(details or "invalid argument")
        if code == grpc.StatusCode.FAILED_PRECONDITION and not is_no_quorum(details):
            return FailedPrecondition(details or "failed precondition")
        return self._failed(exc)

    def _watch_failed(self, exc: grpc.RpcError) -> ClientError:
        code = exc.code() if hasattr(exc, "code") else None
        details = (exc.details() if hasattr(exc, "details") else "") or ""
        text = f"{details} {_errors(exc)}"
        if code == grpc.StatusCode.FAILED_PRECONDITION and "compacted" in text.lower():
            m = _OLDEST_RE.search(text)
            return Compacted(f"watch: {details}", int(m.group(1)) if m else 0)
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            m = _RESUME_RE.search(text)
            return WatchLagged(f"watch: {details}", int(m.group(1)) if m else 0)
        if code == grpc.StatusCode.CANCELLED:  # not by us: the server dropped the stream
            self._state = "down"
            return ServerUnavailable(f"server {self.label} closed the watch ({details or 'cancelled'})")
        return self._ext_failed(exc)

    def watch(self, prefix: str = "", start: int = 0) -> StreamHandle:
        """Changes to keys starting with ``prefix`` from position ``start`` (0: from now):
        a :class:`StreamHandle` of :class:`WatchMessage`, the first with no changes.  No
        deadline (it lasts until cancelled or the server goes); failures come out of the
        iteration as :class:`Compacted`, :class:`WatchLagged`, :class:`ServerUnavailable`,
        ...  Resuming after a break without gaps: :class:`kvs_shell.watching.Follower`."""
        request = kvs_pb2.WatchRequest(prefix=prefix, start_position=max(0, int(start)))

        def convert(resp):
            yield WatchMessage(resp.head, [
                Change(c.position, c.op, c.chave, c.versao, c.valor, c.node, c.written_at,
                       c.all_versions) for c in resp.changes])

        return StreamHandle(lambda: self._ext.Watch(request, timeout=None),
                            convert, self._watch_failed)

    def export(self, prefix: str = "", timeout: float | None = None,
               consistency: str | None = None) -> StreamHandle:
        """Every live version of every key starting with ``prefix``, as of one position: a
        :class:`StreamHandle` of ``(position, ExportedKey)``, keys sorted, versions
        ascending, streamed chunk by chunk (never the whole store in memory).  The handle's
        ``position`` is the export's position once a chunk came (also when no key matched).
        Reads at ``consistency`` (default: this client's level).  No deadline unless
        ``timeout`` is given."""
        request = kvs_pb2.ExportRequest(prefix=prefix)
        md = self._read_md(consistency)

        def convert(chunk):
            if handle.position is None:
                handle.position = chunk.position
            elif chunk.position != handle.position:
                raise ClientError(f"export: chunks of positions {handle.position} and "
                                  f"{chunk.position} in one stream")
            for k in chunk.keys:
                yield chunk.position, ExportedKey(
                    k.chave, k.max_version,
                    [VersionInfo(v.versao, v.valor, v.written_at, v.node, v.seq)
                     for v in k.versions])

        handle = StreamHandle(lambda: self._ext.Export(request, timeout=timeout, metadata=md),
                              convert, self._ext_failed, ended=self._saw)
        handle.position = None
        return handle

    def compact(self, position: int, timeout: float | None = None) -> RetentionInfo:
        """Drops every version superseded by a version written before ``position``, on
        every replica (admin).  :class:`InvalidArgument` beyond the last applied position,
        :class:`FailedPrecondition` when already compacted past it, :class:`NoQuorum`,
        :class:`PermissionDenied`."""
        resp, _ = self._unary(self._ext.Compact, kvs_pb2.CompactRequest(position=int(position)),
                              timeout=timeout or max(self.timeout, 30.0),
                              metadata=_request_id(), raise_as=self._ext_failed)
        return _retention(resp)

    def retention(self, keep: int | None = None) -> RetentionInfo:
        """The retention policy (``keep=None``), or sets it: keep at most ``keep`` live
        versions per key (0: all) on every replica (admin)."""
        if keep is None:
            request, md = kvs_pb2.RetentionRequest(set=False), None
        else:
            if keep < 0:
                raise InvalidArgument("keep must be >= 0 (0: keep every version)")
            request, md = kvs_pb2.RetentionRequest(set=True, keep_versions=int(keep)), _request_id()
        resp, _ = self._unary(self._ext.Retention, request, metadata=md,
                              raise_as=self._ext_failed)
        return _retention(resp)

    def status(self, address: str | None = None, timeout: float = 1.5) -> NodeStatus:
        """Status of the server at ``address``, or of whichever server of the target
        answers (its ``address`` is then the peer that answered)."""
        if address is not None:
            return self.node_status(address, timeout)
        try:
            r, _ = self._unary(self._ext.Status, kvs_pb2.StatusRequest(), timeout=timeout)
        except ClientError as exc:
            return NodeStatus(self.label, False, error=str(exc))
        return _node_status(self.last_peer or self.label, r)

    def node_status(self, address: str, timeout: float = 1.5) -> NodeStatus:
        """Status of one server (``up=False`` with the reason when it cannot be reached)."""
        try:
            r = fetch_status(self._status_channel(address), timeout=timeout)
        except BadTarget as exc:
            return NodeStatus(address, False, error=str(exc))
        except grpc.RpcError as exc:
            return NodeStatus(address, False, error=str(_translate(exc, address)))
        return _node_status(address, r)

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
                    for p in [*st.peers, *st.members]:
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


def _retention(r) -> RetentionInfo:
    return RetentionInfo(r.keep_versions, r.compacted, r.position, r.oldest_watch, r.dropped)


def _node_status(address: str, r) -> NodeStatus:
    return NodeStatus(
        address=address, up=True, node_id=r.node_id, broker_connected=r.broker_connected,
        applied_seq=r.applied_seq, leader_seq=r.leader_seq, epoch=r.epoch, leader=r.leader,
        state=r.state, keys=r.keys, log_hash=r.log_hash, uptime=r.uptime, durable=r.durable,
        advertised=r.address, peers=[Peer(p.node_id, p.address, p.online) for p in r.peers],
        snapshotting=r.snapshotting, role=r.role, term=r.term, commit_index=r.commit_index,
        applied_index=r.applied_index, members=_members(r.members), cluster_id=r.cluster_id)
