"""Security and hostile input (issues 5 and 11), against real processes.

One secured cluster serves most tests (module fixture): a Mosquitto with
``allow_anonymous false``, a password_file, an acl_file and a TLS-only listener
made from ``tools/gen_certs.sh`` certificates, and three servers with gRPC TLS,
an auth file (the admin's token, the shell's certificate), a peer token, broker
credentials (from a file), TLS to the broker and a cluster secret (HMAC of every
broker message).  Further tests drive ``python -m kvs_cluster up/status/down``
and ``./kvs.sh`` (secure by default with mutual TLS; KVS_INSECURE=1 only for the
plain mode; the broker not running as root; the shell showing its security state).

Synchronisation is poll-with-deadline only.  "Quiet and identical" means: every
server in-step with the same applied and commit index, leader, term and cluster
id, and byte-identical Snapshots.  Forged broker traffic is built with the
servers' own codec (well-formed Raft messages, presence and join documents):
only the HMAC may stop it.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from conftest import ROOT, wait_until
from kvs_cluster import Cluster, Security, free_port
from kvs_cluster.security import read_env_file, read_first_line
from kvs_proto import kvs_pb2, kvs_pb2_grpc

import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402

from server import codec  # noqa: E402
from server.raft.types import NORMAL, Entry, Message, MsgType  # noqa: E402
from server.transport import MAC_PROPERTY, message_mac  # noqa: E402

pytestmark = pytest.mark.integration

MAX_MESSAGE = 1024 * 1024          # --max-message for the secured cluster
MAX_KEY = 256                      # --max-key-len
MAX_VALUE = 300_000                # --max-value-len
CLUSTER = "kvs"
BASE = f"kvs/{CLUSTER}"
T_RAFT, T_NODES, T_JOIN = f"{BASE}/raft", f"{BASE}/nodes", f"{BASE}/join"
T_MARKER = f"{BASE}/test-marker"   # no server subscribes to it
ROGUE = "a-rogue"                  # a node id that is no member
GUEST_PASSWORD = "guest-" + uuid.uuid4().hex   # a broker account the ACL gives nothing
WRONG_TOKEN = "wrong-" + uuid.uuid4().hex
OPTS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
RPC_TIMEOUT = 20.0


# ---------------------------------------------------------------------------
# the secured cluster
# ---------------------------------------------------------------------------
class Secure:
    def __init__(self, cluster: Cluster):
        self.c = cluster
        self.sec: Security = cluster.security
        self.md = cluster.metadata()
        self.channels = {a: cluster.channel(a, OPTS) for a in cluster.addresses}

    def kvs(self, i: int) -> kvs_pb2_grpc.KVSStub:
        return kvs_pb2_grpc.KVSStub(self.channels[self.c.addresses[i]])

    def ext(self, i: int) -> kvs_pb2_grpc.KVSExtStub:
        return kvs_pb2_grpc.KVSExtStub(self.channels[self.c.addresses[i]])

    def status(self, i: int):
        return self.ext(i).Status(kvs_pb2.StatusRequest(), metadata=self.md, timeout=5)

    def snapshot(self, i: int) -> list[tuple[str, str, int]]:
        return sorted((t.chave, t.valor, t.versao) for t in
                      self.kvs(i).Snapshot(kvs_pb2.Versao(versao=0), metadata=self.md,
                                           timeout=RPC_TIMEOUT))

    def put(self, i: int, k: str, v: str) -> int:
        return self.kvs(i).Insere(kvs_pb2.ChaveValor(chave=k, valor=v), metadata=self.md,
                                  timeout=RPC_TIMEOUT).versao

    def get(self, i: int, k: str):
        return self.kvs(i).Consulta(kvs_pb2.ChaveVersao(chave=k), metadata=self.md,
                                    timeout=RPC_TIMEOUT)

    def quiet(self, timeout: float = 30.0):
        """Wait until every server is in step at the same applied/commit index,
        leader, term and cluster with identical snapshots; return (status of
        server 0, the snapshot)."""
        n = len(self.c.servers)

        def same():
            for s in self.c.servers:
                assert s.alive(), f"server {s.address} died:\n{s.log_tail()}"
            sts = [self.status(i) for i in range(n)]
            assert all(st.epoch == st.term for st in sts), [(st.epoch, st.term) for st in sts]
            key = {(st.applied_index, st.commit_index, st.leader, st.term, st.state, st.cluster_id)
                   for st in sts}
            if len(key) != 1 or sts[0].state != "in-step" or not sts[0].leader:
                return False
            if sts[0].applied_index != sts[0].commit_index:
                return False
            snaps = [self.snapshot(i) for i in range(n)]
            return (sts[0], snaps[0]) if all(s == snaps[0] for s in snaps) else False

        return wait_until(same, timeout, "servers quiet and identical")

    def settle(self, timeout: float = 30.0):
        """A barrier: a genuine write made after everything published so far reaches
        every server (each server handles broker messages in arrival order)."""
        key = f"sentinel-{uuid.uuid4().hex[:8]}"
        assert self.put(0, key, "barrier") >= 1
        wait_until(lambda: all(self.get(i, key).versao >= 1 for i in range(len(self.c.servers))),
                   timeout, "the barrier write everywhere")
        return self.quiet(timeout)

    def logs(self) -> str:
        return "\n".join(s.log_text() for s in self.c.servers)


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    work = tmp_path_factory.mktemp("secure")
    sec = Security.ensure(work / "sec", tls=True, extra_broker_users={"guest": GUEST_PASSWORD})
    extra = ["--max-message", str(MAX_MESSAGE), "--max-key-len", str(MAX_KEY),
             "--max-value-len", str(MAX_VALUE), "--write-timeout", "5"]
    cluster = Cluster(3, work, persistent=False, extra_args=extra, security=sec)
    s = None
    try:
        cluster.wait_ready(45)
        s = Secure(cluster)
        s.quiet()
        yield s
    finally:
        try:
            cluster.stop()
        finally:
            cluster.kill_all()
            for ch in (s.channels.values() if s else ()):
                ch.close()


# ---------------------------------------------------------------------------
# MQTT test clients
# ---------------------------------------------------------------------------
class MqttProbe:
    """A paho client that records CONNACK, PUBACK reason codes and what it receives."""

    def __init__(self, port: int, ca: Path | None, username: str | None = None,
                 password: str | None = None):
        self.connack = None
        self.connected = threading.Event()
        self.done = threading.Event()
        self.pubacks: dict[int, int] = {}
        self.subacks: list = []
        self.received: list = []
        self._lock = threading.Lock()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"rogue-{uuid.uuid4().hex[:8]}",
                        protocol=mqtt.MQTTv5)
        if username:
            c.username_pw_set(username, password)
        if ca:
            c.tls_set(ca_certs=str(ca))
        c.reconnect_delay_set(5, 10)
        c.on_connect = self._on_connect
        c.on_publish = self._on_publish
        c.on_subscribe = lambda cl, u, mid, rcs, props: self.subacks.append([r.value for r in rcs])
        c.on_message = self._on_message
        self.client = c
        c.connect_async("127.0.0.1", port, keepalive=30)
        c.loop_start()

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self.connack = reason_code
        if not reason_code.is_failure:
            self.connected.set()
        self.done.set()

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        with self._lock:
            self.pubacks[mid] = reason_code.value

    def _on_message(self, client, userdata, msg):
        props = getattr(msg, "properties", None)
        with self._lock:
            self.received.append((msg.topic, bytes(msg.payload), msg.retain,
                                  list(getattr(props, "UserProperty", None) or [])))

    def wait_connack(self, timeout: float = 10.0):
        assert self.done.wait(timeout), "no CONNACK"
        return self.connack

    def publish(self, topic: str, payload: bytes, mac: str | None = None, qos: int = 1,
                retain: bool = False, user_props: list | None = None) -> int:
        props = None
        pairs = list(user_props or []) + ([(MAC_PROPERTY, mac)] if mac else [])
        if pairs:
            props = Properties(PacketTypes.PUBLISH)
            props.UserProperty = pairs
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        return info.mid

    def wait_puback(self, mid: int, timeout: float = 10.0) -> int:
        return wait_until(lambda: self.pubacks.get(mid) is not None and (self.pubacks[mid],),
                          timeout, f"PUBACK {mid}")[0]

    def echo_barrier(self, timeout: float = 20.0) -> None:
        """Publish a unique marker and wait until it comes back: the broker has routed
        everything this client published before it (it handles a client in order)."""
        marker = f"marker-{uuid.uuid4().hex}".encode()
        self.publish(T_MARKER, marker)
        wait_until(lambda: any(p == marker for _, p, _, _ in list(self.received)), timeout,
                   "our own marker back from the broker")

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()


def rogue(secure: Secure, username=None, password=None, subscribe: bool = False) -> MqttProbe:
    p = MqttProbe(secure.c.broker.port, secure.sec.tls_ca, username, password)
    rc = p.wait_connack()
    assert not rc.is_failure, f"rogue with broker credentials refused: {rc}"
    if subscribe:
        p.client.subscribe(f"kvs/{CLUSTER}/#", qos=1)
        wait_until(lambda: p.subacks, 10, "SUBACK")
        assert p.subacks[-1][0] < 0x80, p.subacks
    return p


def kvs_server_password(secure: Secure) -> str:
    return read_first_line(secure.sec.mqtt_password_file)


def hmac_drops(server) -> int:
    """Messages ``server`` dropped for a missing or wrong HMAC, as far as its log
    tells: the transport logs the running total, at most once per 10 s."""
    totals = re.findall(r"without a valid HMAC \((\d+) so far\)", server.log_text())
    return max(map(int, totals), default=0)


def wait_hmac_drops(secure: Secure, p: "MqttProbe", drops0: list[int],
                    resend: list[tuple[str, bytes, str | None]], timeout: float = 40.0) -> None:
    """Wait until every server logged more HMAC drops than ``drops0``.  Each poll
    publishes the ``resend`` messages (topic, payload, mac) once more: the warning
    is rate-limited, so a fresh drop is what makes a new total appear once the
    period is over."""
    def more():
        for topic, payload, mac in resend:
            p.publish(topic, payload, mac=mac)
        return all(hmac_drops(s) > d for s, d in zip(secure.c.servers, drops0))

    wait_until(more, timeout, "HMAC drops logged by every server")


def raft_doc(cid: str, kind: str, frm: str, to: str, **fields) -> bytes:
    """A well-formed Raft message, exactly as a server would publish it."""
    return codec.encode_raft(cid, Message(MsgType(kind), frm, to, **fields))


def put_entry(term: int, index: int, key: str, change_id: str, node: str) -> Entry:
    """A NORMAL entry holding one put of ``key``."""
    return Entry(term, index, NORMAL, {"ts": time.time(), "items": [
        {"op": "put", "id": change_id, "k": key, "v": "pwned", "node": node}]})


# ---------------------------------------------------------------------------
# TLS on both hops
# ---------------------------------------------------------------------------
def test_tls_on_both_hops_replicates(secure: Secure, tmp_path):
    conf = secure.c.broker.conf_path.read_text()
    assert "certfile" in conf and "allow_anonymous false" in conf and "acl_file" in conf
    for s in secure.c.servers:
        assert "--tls-cert" in s.command() and "--mqtt-tls-ca" in s.command()
    # The broker speaks TLS only: a plain MQTT client never gets a CONNACK.
    plain = MqttProbe(secure.c.broker.port, None, "kvs-server", kvs_server_password(secure))
    try:
        assert not plain.connected.wait(2.0)
    finally:
        plain.close()

    # Writes through every server (unary and stream) reach every server.
    n = len(secure.c.servers)
    keys = [f"tls-{i}-{uuid.uuid4().hex[:6]}" for i in range(n)]
    for i, k in enumerate(keys):
        assert secure.put(i, k, f"value-{i}") == 1
    replies = list(secure.kvs(1).InsereVarias(
        iter([kvs_pb2.ChaveValor(chave=k, valor="second") for k in keys]),
        metadata=secure.md, timeout=RPC_TIMEOUT))
    assert [r.versao for r in replies] == [2] * n
    for i in range(n):
        wait_until(lambda i=i: all(secure.get(i, k).versao == 2 for k in keys), 20,
                   f"replication to server {i}")
    secure.quiet()

    # A plaintext gRPC client and a TLS client trusting another CA both fail.
    with grpc.insecure_channel(secure.c.addresses[0]) as ch:
        with pytest.raises(grpc.RpcError) as e:
            kvs_pb2_grpc.KVSStub(ch).Consulta(kvs_pb2.ChaveVersao(chave=keys[0]),
                                              metadata=secure.md, timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    other = Security.ensure(tmp_path / "other", tls=True, token=False, hmac=False,
                            broker_auth=False)
    with other.channel(secure.c.addresses[0]) as ch:
        with pytest.raises(grpc.RpcError) as e:
            kvs_pb2_grpc.KVSStub(ch).Consulta(kvs_pb2.ChaveVersao(chave=keys[0]),
                                              metadata=secure.md, timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE


# ---------------------------------------------------------------------------
# client authentication
# ---------------------------------------------------------------------------
def _every_rpc(md):
    """(name, thunk) for unary and streaming RPCs of all three services."""
    cv = kvs_pb2.ChaveValor(chave="auth-key", valor="forged")
    kv = kvs_pb2.ChaveVersao(chave="auth-key")

    def calls(kvs, ext, rep):
        return [
            ("Insere", lambda: kvs.Insere(cv, metadata=md, timeout=5)),
            ("Remove", lambda: kvs.Remove(kv, metadata=md, timeout=5)),
            ("Consulta", lambda: kvs.Consulta(kv, metadata=md, timeout=5)),
            ("InsereVarias", lambda: list(kvs.InsereVarias(iter([cv, cv]), metadata=md, timeout=5))),
            ("RemoveVarias", lambda: list(kvs.RemoveVarias(iter([kv]), metadata=md, timeout=5))),
            ("ConsultaVarias", lambda: list(kvs.ConsultaVarias(iter([kv]), metadata=md, timeout=5))),
            ("Snapshot", lambda: list(kvs.Snapshot(kvs_pb2.Versao(versao=0), metadata=md, timeout=5))),
            ("Status", lambda: ext.Status(kvs_pb2.StatusRequest(), metadata=md, timeout=5)),
            ("History", lambda: ext.History(kvs_pb2.HistoryRequest(chave="auth-key"), metadata=md,
                                            timeout=5)),
            ("ListKeys", lambda: ext.ListKeys(kvs_pb2.ListKeysRequest(limit=10), metadata=md,
                                              timeout=5)),
            ("MemberList", lambda: ext.MemberList(kvs_pb2.MemberListRequest(), metadata=md,
                                                  timeout=5)),
            ("MemberRemove", lambda: ext.MemberRemove(kvs_pb2.MemberRemoveRequest(node_id=ROGUE),
                                                      metadata=md, timeout=5)),
            ("FetchState", lambda: list(rep.FetchState(kvs_pb2.StateRequest(), metadata=md, timeout=5))),
        ]
    return calls


@pytest.mark.parametrize("md", [
    [], [("authorization", f"Bearer {WRONG_TOKEN}")], [("authorization", "Bearer ")],
    [("authorization", "bearer")], [("authorization", "Basic xyz")],
], ids=["missing", "wrong", "empty", "no-token", "basic"])
def test_wrong_or_missing_token_is_unauthenticated(secure: Secure, md):
    _, before = secure.quiet()
    ch = secure.channels[secure.c.addresses[0]]
    calls = _every_rpc(md)(kvs_pb2_grpc.KVSStub(ch), kvs_pb2_grpc.KVSExtStub(ch),
                           kvs_pb2_grpc.ReplicaStub(ch))
    for name, call in calls:
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, (name, e.value)
        assert e.value.details(), name   # with the reason
    # the right token with a prefix/suffix added is wrong too
    right = secure.md[0][1]
    for bad in (right + "x", right[:-1], " " + right):
        with pytest.raises(grpc.RpcError) as e:
            secure.kvs(0).Consulta(kvs_pb2.ChaveVersao(chave="auth-key"),
                                   metadata=[("authorization", bad)], timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # health checks stay open (launchers and load balancers probe without a token)
    resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    # nothing changed
    _, after = secure.settle()
    assert [t for t in after if not t[0].startswith("sentinel-")] == \
        [t for t in before if not t[0].startswith("sentinel-")]
    assert not any(t[0] == "auth-key" for t in after)


def test_shell_and_client_sh_with_tls_and_token(secure: Secure):
    addr = ",".join(secure.c.addresses)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVS_")}
    env.update(secure.sec.client_env())
    py = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv").exists() else sys.executable
    key = f"shell-{uuid.uuid4().hex[:6]}"
    r = subprocess.run([py, "-m", "kvs_shell", "--timeout", "20", "-s", addr, "-c", f"put {key} hello; get {key}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "hello" in r.stdout
    # --tls-ca but no token: a clear authentication error, exit status 1
    env_ca = {k: v for k, v in env.items() if k != "KVS_TOKEN_FILE"}
    r = subprocess.run([py, "-m", "kvs_shell", "--timeout", "20", "-s", addr, "-c", f"get {key}"], cwd=ROOT,
                       env=env_ca, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "error: not authenticated: " in r.stderr, r.stderr
    r = subprocess.run(["bash", "client.sh", "-p", str(secure.c.servers[1].port), "-o", "consulta",
                        "-k", key, "--token", WRONG_TOKEN], cwd=ROOT, env=env_ca,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "not authenticated" in r.stderr, r.stderr
    r = subprocess.run(["bash", "client.sh", "-p", str(secure.c.servers[2].port), "-o", "consulta",
                        "-k", key, "--tls-ca", str(secure.sec.tls_ca), "--token-file",
                        str(secure.sec.token_file)], cwd=ROOT, env={"PATH": os.environ["PATH"]},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f'Tupla {{ chave: "{key}", valor: "hello", versao: 1 }}'


def test_shell_whoami_and_a_clear_message_for_each_denial(secure: Secure):
    """A read-only user added to auth.json (servers reload it on SIGHUP): the shell's
    whoami shows it, a write says `permission denied: ...`, a wrong token says
    `not authenticated: ...`, and neither changes anything."""
    name = f"reader-{uuid.uuid4().hex[:6]}"
    token_file = secure.sec.add_user(name, ["read-only"])
    for s in secure.c.servers:
        os.kill(s.pid, signal.SIGHUP)
    key = f"denied-{uuid.uuid4().hex[:6]}"
    assert secure.put(0, key, "before") == 1
    py = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv").exists() else sys.executable
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVS_")}
    env.update(KVS_TLS_CA=str(secure.sec.tls_ca), KVS_TOKEN_FILE=str(token_file))
    addr = ",".join(secure.c.addresses)

    def shell(cmds, e=env):
        return subprocess.run([py, "-m", "kvs_shell", "--timeout", "20", "-s", addr, "-c", cmds],
                              cwd=ROOT, env=e, capture_output=True, text=True, timeout=60)

    def whoami_everywhere():   # every server has reloaded (round robin asks them in turn)
        rows = []
        for _ in range(2 * len(secure.c.servers)):
            r = shell("whoami")
            if r.returncode != 0:
                return False
            rows.append(dict(line.split("\t", 1) for line in r.stdout.splitlines()))
        return all(x["name"] == name for x in rows) and rows
    rows = wait_until(whoami_everywhere, 30, "the new user known to every server")[0]
    assert rows["roles"] == "read-only" and rows["method"] == "token" and rows["tls"] == "yes"
    assert rows["read"] == "every key" and rows["write"] == "none"
    r = shell(f"get {key}")
    assert r.returncode == 0 and "before" in r.stdout, r.stderr
    r = shell(f"put {key} after")
    assert r.returncode == 1
    assert "error: permission denied: " in r.stderr and name in r.stderr, r.stderr
    wrong = tmpfile = Path(secure.sec.dir) / "secrets" / f"wrong-{uuid.uuid4().hex[:6]}.token"
    wrong.write_text(WRONG_TOKEN + "\n")
    wrong.chmod(0o600)
    try:
        r = shell(f"get {key}", {**env, "KVS_TOKEN_FILE": str(wrong)})
    finally:
        tmpfile.unlink()
    assert r.returncode == 1 and "error: not authenticated: " in r.stderr, r.stderr
    assert all(secure.get(i, key).valor == "before" for i in range(len(secure.c.servers)))


# ---------------------------------------------------------------------------
# rogue MQTT clients
# ---------------------------------------------------------------------------
def test_broker_refuses_anonymous_and_unauthorised_clients(secure: Secure):
    anon = MqttProbe(secure.c.broker.port, secure.sec.tls_ca)
    try:
        rc = anon.wait_connack()
        assert rc.is_failure, "anonymous client was let in"
    finally:
        anon.close()
    bad = MqttProbe(secure.c.broker.port, secure.sec.tls_ca, "kvs-server", "not-the-password")
    try:
        assert bad.wait_connack().is_failure
    finally:
        bad.close()
    # a valid account without ACL rights: publishing and subscribing are refused
    guest = MqttProbe(secure.c.broker.port, secure.sec.tls_ca, "guest", GUEST_PASSWORD)
    try:
        assert not guest.wait_connack().is_failure
        leader = secure.status(0).leader
        mid = guest.publish(f"{T_RAFT}/{leader}", b'{"t":"raft"}')
        assert guest.wait_puback(mid) == 0x87  # Not authorized
        guest.client.subscribe(f"kvs/{CLUSTER}/#", qos=1)
        wait_until(lambda: guest.subacks, 10, "SUBACK")
        # Mosquitto may grant the subscription but filters delivery by the read ACL:
        # the retained presence documents and the Raft traffic never arrive.
        secure.settle()
        assert guest.subacks[-1][0] == 0x87 or not guest.received, guest.received[:3]
    finally:
        guest.close()


def _node_ids(secure: Secure) -> list[str]:
    return [secure.status(i).node_id for i in range(len(secure.c.servers))]


def test_forged_messages_without_the_cluster_secret_change_nothing(secure: Secure):
    """A rogue holding the servers' broker password (but not the cluster secret)
    publishes well-formed Raft messages (an APP from the real leader with a rogue
    entry that would fit the followers' logs exactly, a rogue leader with a higher
    term, votes and pre-votes with a huge term, proposals), presence and a join
    request -- without a MAC, with a MAC made with a wrong secret, with a bogus MAC."""
    st0, before = secure.quiet()
    drops0 = [hmac_drops(s) for s in secure.c.servers]
    cid, leader, term, commit = st0.cluster_id, st0.leader, st0.term, st0.commit_index
    assert cid and st0.epoch == term
    nodes = _node_ids(secure)
    followers = [n for n in nodes if n != leader]
    assert len(followers) == 2, (leader, nodes)
    huge = 2**40

    def rogue_entry(t: int, n: int, node: str = leader) -> Entry:
        return put_entry(t, commit + 1, "rogue-key", f"rogue:1:{n}", node)

    forged = []
    for f in followers:
        # Quiet, the log ends at (commit, term): this APP is what the leader would send.
        forged += [
            (f"{T_RAFT}/{f}", raft_doc(cid, "app", leader, f, term=term, index=commit,
                                       log_term=term, entries=(rogue_entry(term, 1),),
                                       commit=commit + 1)),
            (f"{T_RAFT}/{f}", raft_doc(cid, "hb", leader, f, term=term, commit=commit + 1)),
        ]
    for n in nodes:
        forged += [
            (f"{T_RAFT}/{n}", raft_doc(cid, "app", ROGUE, n, term=term + 1, index=commit,
                                       log_term=term, entries=(rogue_entry(term + 1, 2, ROGUE),),
                                       commit=commit + 1)),
            (f"{T_RAFT}/{n}", raft_doc(cid, "vote", ROGUE, n, term=huge, index=huge, log_term=huge)),
            (f"{T_RAFT}/{n}", raft_doc(cid, "prevote", ROGUE, n, term=huge, index=huge,
                                       log_term=huge)),
            (f"{T_RAFT}/{n}", raft_doc(cid, "hb", ROGUE, n, term=term + 7, commit=commit + 100)),
            (f"{T_RAFT}/{n}", raft_doc(cid, "snap", ROGUE, n, term=term + 1, index=commit + 100,
                                       log_term=term + 1)),
        ]
    prop = Entry(0, 0, NORMAL, rogue_entry(term, 3).data)
    forged += [
        (f"{T_RAFT}/{leader}", raft_doc(cid, "prop", followers[0], leader, entries=(prop,))),
        (f"{T_RAFT}/{leader}", raft_doc(cid, "prop", ROGUE, leader, entries=(prop,))),
        (f"{T_NODES}/{ROGUE}", codec.presence_doc(ROGUE, "127.0.0.1:1", True, "b00t", cid,
                                                  term + 9, commit + 100, "leader")),
        (f"{T_NODES}/{leader}", codec.presence_doc(leader, "127.0.0.1:1", False, "b00t", cid,
                                                   term, commit, "follower")),
        (T_JOIN, codec.join_doc(ROGUE, "127.0.0.1:1", "b00t", cid, time.time())),
    ]
    for _, payload in forged:   # the codec takes them: only the HMAC can stop them
        if payload.startswith(b'{"t":"raft"'):
            codec.decode_raft(payload)
    p = rogue(secure, "kvs-server", kvs_server_password(secure), subscribe=True)
    try:
        wrong_secret = b"not-the-cluster-secret"
        for topic, payload in forged:
            for mac in (None, message_mac(wrong_secret, topic, payload), "00" * 32):
                mid = p.publish(topic, payload, mac=mac, retain=topic.startswith(T_NODES))
                assert p.wait_puback(mid) < 0x80  # the broker took it: only the HMAC stops it
        p.echo_barrier()
        # every server noticed and dropped them (its raft topic, presence, join)
        wait_hmac_drops(secure, p, drops0, [(T_JOIN, forged[-1][1], None)])
        st1, after = secure.settle()
    finally:
        for topic in (f"{T_NODES}/{ROGUE}", f"{T_NODES}/{leader}"):
            p.publish(topic, b"", retain=True)  # clear our retained junk (dropped too)
        p.echo_barrier()
        p.close()
    assert (st1.leader, st1.term, st1.epoch, st1.cluster_id) == (leader, term, term, cid)
    assert [t for t in after if not t[0].startswith("sentinel-")] == \
        [t for t in before if not t[0].startswith("sentinel-")]
    assert all(secure.get(i, "rogue-key").versao == 0 for i in range(3))
    assert all(m.node_id != ROGUE for m in secure.status(0).members)


def test_replayed_genuine_messages_change_nothing(secure: Secure):
    """A rogue with broker credentials records genuinely signed traffic (proposals,
    appends, heartbeats, their answers, presence) and replays it verbatim, MAC
    included -- on its own topic, and on another server's (where the MAC, bound
    to the topic, does not match).  A replayed PROP may be appended again by the
    leader; the applier applies a change id once, so the data stays the same."""
    p = rogue(secure, "kvs-server", kvs_server_password(secure), subscribe=True)
    try:
        key = f"replay-{uuid.uuid4().hex[:6]}"
        # writes through a follower travel as proposals to the leader, so both get recorded
        follower = next(i for i in range(3) if secure.status(i).leader != secure.status(i).node_id)
        assert secure.put(follower, key, "one") == 1
        assert secure.put(follower, key, "two") == 2
        p.echo_barrier()
        st0, before = secure.quiet()
        nodes = _node_ids(secure)
        recorded = [m for m in list(p.received) if m[3]]  # the signed ones
        kinds = {json.loads(m[1]).get("type") for m in recorded if m[0].startswith(T_RAFT + "/")}
        assert {"prop", "app"} <= kinds, kinds
        drops0 = [hmac_drops(s) for s in secure.c.servers]
        wrong = []
        for topic, payload, _retain, props in recorded:
            mac = next(v for k, v in props if k == MAC_PROPERTY)
            p.publish(topic, payload, mac=mac)
            if topic.startswith(T_RAFT + "/"):
                for n in nodes:
                    if topic != f"{T_RAFT}/{n}":
                        wrong.append((f"{T_RAFT}/{n}", payload, mac))
                        p.publish(*wrong[-1])
        p.echo_barrier()
        # the ones on the wrong topic were dropped by their HMAC, at every server
        by_topic = {t: (t, pl, m) for t, pl, m in wrong}
        assert set(by_topic) == {f"{T_RAFT}/{n}" for n in nodes}
        wait_hmac_drops(secure, p, drops0, list(by_topic.values()))
        st1, after = secure.settle()
    finally:
        p.close()
    assert (st1.leader, st1.term, st1.epoch) == (st0.leader, st0.term, st0.term)
    assert [t for t in after if not t[0].startswith("sentinel-")] == \
        [t for t in before if not t[0].startswith("sentinel-")]
    assert all(secure.get(i, key).versao == 2 for i in range(3))
    assert all(secure.get(i, key).valor == "two" for i in range(3))


# ---------------------------------------------------------------------------
# fuzzing
# ---------------------------------------------------------------------------
_chars = st.characters(exclude_categories=("Cs",))
_short_text = st.text(_chars, max_size=12)
_text = st.one_of(
    _short_text,
    st.text(_chars, min_size=MAX_KEY - 2, max_size=MAX_KEY + 3),
    st.text(st.sampled_from("\x00\x01\x1b\n\r\t \u200b\u202e\ufeff\U0001f600é"), max_size=20),
)
_big = st.sampled_from([MAX_VALUE, MAX_VALUE + 1, 200_000]).map(lambda n: "v" * n) | \
    st.sampled_from([600_000]).map(lambda n: "é" * n)            # > 1 MiB as UTF-8
_value = st.one_of(_text, _text, _text, _big)
_version = st.one_of(st.none(), st.integers(-3, 5),
                     st.sampled_from([-2**31, -2**31 + 1, 2**31 - 1, 2**31 - 2, 0]),
                     st.integers(-2**31, 2**31 - 1))
_op = st.one_of(
    st.tuples(st.just("Insere"), _text, _value),
    st.tuples(st.just("Consulta"), _text, _version),
    st.tuples(st.just("Remove"), _text, _version),
    st.tuples(st.just("InsereVarias"), st.lists(st.tuples(_text, _value), max_size=12)),
    st.tuples(st.just("ConsultaVarias"), st.lists(st.tuples(_text, _version), max_size=20)),
    st.tuples(st.just("RemoveVarias"), st.lists(st.tuples(_text, _version), max_size=12)),
    st.tuples(st.just("Snapshot"), _version),
)


def _cv(k, v):
    return kvs_pb2.ChaveValor(chave=k, valor=v)


def _kv(k, ver):
    return kvs_pb2.ChaveVersao(chave=k) if ver is None else kvs_pb2.ChaveVersao(chave=k, versao=ver)


def _run_op(secure: Secure, server: int, op) -> None:
    kvs = secure.kvs(server)
    md = secure.md
    name = op[0]
    if name == "Insere":
        req = _cv(op[1], op[2])
        size = req.ByteSize()
    elif name in ("Consulta", "Remove"):
        req = _kv(op[1], op[2])
        size = req.ByteSize()
    elif name == "InsereVarias":
        req = [_cv(k, v) for k, v in op[1]]
        size = max([r.ByteSize() for r in req], default=0)
    elif name in ("ConsultaVarias", "RemoveVarias"):
        req = [_kv(k, v) for k, v in op[1]]
        size = max([r.ByteSize() for r in req], default=0)
    else:
        req = kvs_pb2.Versao(versao=op[1] or 0)
        size = 0
    try:
        if name == "Insere":
            r = kvs.Insere(req, metadata=md, timeout=RPC_TIMEOUT)
            k, v = op[1], op[2]
            ok = 3 <= len(k) <= MAX_KEY and 3 <= len(v) <= MAX_VALUE
            assert (r.versao >= 1) if ok else (r.versao == -1), (name, len(k), len(v), r)
        elif name == "Consulta":
            r = kvs.Consulta(req, metadata=md, timeout=RPC_TIMEOUT)
            assert r.versao >= 0 and (r.versao == 0 or r.chave == op[1])
        elif name == "Remove":
            r = kvs.Remove(req, metadata=md, timeout=RPC_TIMEOUT)
            assert r.versao == -1 or r.versao >= 1
        elif name == "Snapshot":
            rows = list(kvs.Snapshot(req, metadata=md, timeout=RPC_TIMEOUT))
            assert rows
        else:
            method = getattr(kvs, name)
            replies = list(method(iter(req), metadata=md, timeout=RPC_TIMEOUT))
            assert len(replies) == len(req), (name, len(req), len(replies))
            if name == "InsereVarias":
                for (k, v), r in zip(op[1], replies):
                    ok = 3 <= len(k) <= MAX_KEY and 3 <= len(v) <= MAX_VALUE
                    assert (r.versao >= 1) if ok else (r.versao == -1), (len(k), len(v), r)
    except grpc.RpcError as e:
        # the only acceptable failure: a request bigger than --max-message
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and size > MAX_MESSAGE - 64, \
            (name, size, e.code(), e.details())


def test_fuzz_grpc_api(secure: Secure):
    started = time.monotonic()
    budget = 30.0

    @settings(max_examples=40, deadline=None, database=None, derandomize=False,
              phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(ops=st.lists(st.tuples(st.integers(0, 2), _op), min_size=1, max_size=6))
    def run(ops):
        if time.monotonic() - started > budget:
            return
        for server, op in ops:
            _run_op(secure, server, op)

    run()
    for s in secure.c.servers:
        assert s.alive(), s.log_tail()
    secure.settle(40)


def _json_values():
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                        st.floats(allow_nan=True, allow_infinity=True), st.text(_chars, max_size=20))
    return st.recursive(scalars, lambda c: st.lists(c, max_size=4) |
                        st.dictionaries(st.text(_chars, max_size=8), c, max_size=4), max_leaves=12)


# The broker documents: field kinds, and the fields a document must have.
_DOCS = {
    "raft": ({"cid": "cid", "type": "type", "frm": "name", "to": "name", "term": "u64",
              "log_term": "u64", "index": "u64", "commit": "u64", "reject": "bool", "hint": "u64",
              "ctx": "str", "entries": "entries"},
             {"cid", "type", "frm", "to"}),
    "node": ({"node": "name", "addr": "str", "online": "bool", "boot": "str", "cid": "cid",
              "term": "u64", "applied": "u64", "role": "str"},
             {"node", "addr", "online"}),
    "join": ({"node": "name", "addr": "str", "boot": "str", "cid": "cid", "ts": "time"},
             {"node", "addr", "boot", "cid", "ts"}),
}
_DECODE = {"raft": codec.decode_raft, "node": codec.decode_presence, "join": codec.decode_join}
_MSG_TYPES = sorted(t.value for t in MsgType)
_u64 = st.integers(0, 1000) | st.integers(0, 2**63 - 1)
_name = st.text(_chars, min_size=1, max_size=10)
_change = st.one_of(
    st.fixed_dictionaries({"op": st.just("put"), "id": _name, "k": _short_text, "v": _short_text,
                           "node": _name}),
    st.fixed_dictionaries({"op": st.just("del"), "id": _name, "k": _short_text,
                           "ver": st.none() | st.integers(-2**31, 2**31 - 1), "node": _name}))
_entry = st.one_of(
    st.tuples(_u64, _u64, st.just("normal"), st.fixed_dictionaries(
        {"ts": st.floats(0, 1e12), "items": st.lists(_change, min_size=1, max_size=3)})),
    st.tuples(_u64, _u64, st.just("conf"), st.fixed_dictionaries(
        {"op": st.sampled_from(["add_learner", "promote", "remove"]), "node": _name,
         "addr": _short_text})),
    st.tuples(_u64, _u64, st.just("noop"), st.none()),
).map(list)
_PUT = {"op": "put", "id": "x", "k": "kkk", "v": "vvv", "node": "n"}
_BAD_ENTRIES = [
    [-1, 1, "normal", {"ts": 1.0, "items": [_PUT]}], [2**64, 1, "noop", None],
    [1, 1, "weird", None], [1, 2], [1, 1, "noop", {}], [1, 1, "normal", {"ts": 1.0, "items": []}],
    [1, 1, "normal", {"ts": -1.0, "items": [_PUT]}],
    [1, 1, "normal", {"ts": 1.0, "items": [dict(_PUT, op="drop_all")]}],
    [1, 1, "normal", {"ts": 1.0, "items": [dict(_PUT, extra=1)]}],
    [1, 1, "normal", {"ts": 1.0, "items": [{"op": "del", "id": "x", "k": "kkk", "ver": 2**40,
                                            "node": "n"}]}],
    [1, 1, "conf", {"op": "add_learner", "node": "x"}], [1, 1, "conf", {"op": "bootstrap",
                                                                      "voters": []}],
]
_not_text = st.one_of(st.integers(), st.none(), st.booleans(), st.lists(st.text(max_size=3),
                                                                         max_size=2))
# values every decoder must refuse for a field of that kind
_WRONG = {
    "cid": _not_text, "str": _not_text, "name": st.just("") | _not_text,
    "type": st.text(_chars, max_size=8).filter(lambda t: t not in _MSG_TYPES) | st.integers()
    | st.none(),
    "u64": st.one_of(st.integers(max_value=-1), st.integers(2**63, 2**70), st.floats(),
                     st.text(max_size=5), st.none(), st.booleans()),
    "bool": st.one_of(st.integers(), st.text(max_size=5), st.none()),
    "time": st.one_of(st.floats(max_value=-1e-9), st.just(float("nan")), st.just(float("inf")),
                      st.text(max_size=5), st.none(), st.booleans()),
    "entries": st.one_of(st.text(max_size=5), st.integers(), st.none(),
                         st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
                         st.lists(st.sampled_from(_BAD_ENTRIES), min_size=1, max_size=2)),
}
# (Mosquitto drops the connection of a client that uses control characters in
# a topic name, so none here: the payloads are what is fuzzed)
_topic_level = st.text(st.characters(min_codepoint=33, max_codepoint=0x2FFF,
                                     exclude_characters="+#/", exclude_categories=("Cc", "Cs")),
                       min_size=1, max_size=8)


def _right(kind: str, nodes: list[str], cid: str):
    if kind == "cid":
        return st.sampled_from([cid, cid, "", "another-cluster"])
    if kind == "name":
        return st.sampled_from(nodes + [ROGUE]) | _name
    return {"type": st.sampled_from(_MSG_TYPES), "u64": _u64, "bool": st.booleans(),
            "str": _short_text, "time": st.floats(0, 1e12),
            "entries": st.lists(_entry, max_size=3)}[kind]


def _refused(decode, payload: bytes) -> bool:
    try:
        decode(payload)
    except codec.BadMessage:
        return True
    return False


@st.composite
def _broker_message(draw, nodes: list[str], cid: str):
    """(topic, payload, signed) on the servers' topics.  Unsigned: anything,
    including well-formed Raft, presence and join documents of our cluster.
    Signed with the real secret: only documents the codec must refuse (random
    bytes, random JSON, or a real shape with a required field missing, a field
    of another type or out of range, or another document's tag), so the codec's
    strictness is what is fuzzed."""
    t = draw(st.sampled_from(sorted(_DOCS)))
    fields, required = _DOCS[t]
    if t == "raft":
        topic = f"{T_RAFT}/" + draw(st.sampled_from(nodes) | _topic_level)
    elif t == "node":
        topic = f"{T_NODES}/" + draw(st.sampled_from(nodes + [ROGUE]) | _topic_level)
    else:
        topic = T_JOIN
    kind = draw(st.sampled_from(["bytes", "json", "shape", "shape"]))
    signed = draw(st.booleans())
    if kind == "bytes":
        payload = draw(st.binary(max_size=300))
    elif kind == "json":
        payload = json.dumps(draw(_json_values())).encode()
    else:
        doc = {"t": t}
        for name, k in fields.items():
            if name in required or draw(st.booleans()):
                doc[name] = draw(_right(k, nodes, cid))
        if signed:
            victim = draw(st.sampled_from(sorted(fields) + ["t"]))
            if victim == "t":
                doc["t"] = draw(st.sampled_from([x for x in _DOCS if x != t]
                                                + ["batch", "propose", "", None]))
            elif victim in required and draw(st.booleans()):
                del doc[victim]
            else:
                doc[victim] = draw(_WRONG[fields[victim]])
        payload = json.dumps(doc).encode()
    if signed:
        assert _refused(_DECODE[t], payload), f"the fuzzer would sign a valid {t}: {payload[:300]!r}"
    return topic, payload, signed


def test_fuzz_mqtt_topics(secure: Secure):
    st0, before = secure.quiet()
    nodes = _node_ids(secure)
    secret = read_first_line(secure.sec.cluster_secret_file).encode()
    p = rogue(secure, "kvs-server", kvs_server_password(secure), subscribe=True)
    started = time.monotonic()
    sent = []
    try:
        @settings(max_examples=300, deadline=None, database=None,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(msg=_broker_message(nodes, st0.cluster_id))
        def run(msg):
            if time.monotonic() - started > 25:
                return
            topic, payload, signed = msg
            p.publish(topic, payload, mac=message_mac(secret, topic, payload) if signed else None)
            sent.append((topic.rsplit("/", 1)[0] if topic != T_JOIN else topic, signed))

        run()
        p.echo_barrier(30)
        for s in secure.c.servers:
            assert s.alive(), s.log_tail()
        st1, after = secure.settle(40)
    finally:
        p.close()
    counts = Counter(sent)
    for where in (T_RAFT, T_NODES, T_JOIN):   # every topic got both kinds
        assert counts[(where, True)] >= 5 and counts[(where, False)] >= 5, counts
    assert (st1.leader, st1.term, st1.epoch) == (st0.leader, st0.term, st0.term)
    assert [t for t in after if not t[0].startswith("sentinel-")] == \
        [t for t in before if not t[0].startswith("sentinel-")]


# ---------------------------------------------------------------------------
# limits
# ---------------------------------------------------------------------------
def test_oversize_requests_get_clean_errors(secure: Secure):
    kvs = secure.kvs(0)
    huge = "x" * (MAX_MESSAGE + 10)
    with pytest.raises(grpc.RpcError) as e:
        kvs.Insere(_cv("big-key", huge), metadata=secure.md, timeout=RPC_TIMEOUT)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.RpcError) as e:
        list(kvs.InsereVarias(iter([_cv("big-ok1", "small"), _cv("big-key", huge)]),
                              metadata=secure.md, timeout=RPC_TIMEOUT))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    long_key = "k" * (MAX_KEY + 1)
    r, call = kvs.Insere.with_call(_cv(long_key, "value"), metadata=secure.md, timeout=RPC_TIMEOUT)
    assert r.versao == -1
    reason = dict(call.trailing_metadata()).get("kvs-error", "")
    assert "key" in reason and str(MAX_KEY) in reason, reason
    r, call = kvs.Insere.with_call(_cv("long-value", "v" * (MAX_VALUE + 1)), metadata=secure.md,
                                   timeout=RPC_TIMEOUT)
    assert r.versao == -1
    assert "value" in dict(call.trailing_metadata()).get("kvs-error", "")
    r, call = kvs.Consulta.with_call(_kv(long_key, None), metadata=secure.md, timeout=RPC_TIMEOUT)
    assert r.versao == 0
    # still serving, and nothing of the above was stored
    assert secure.put(0, "after-big", "fine") >= 1
    health = health_pb2_grpc.HealthStub(secure.channels[secure.c.addresses[0]])
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
        health_pb2.HealthCheckResponse.SERVING
    _, snap = secure.settle()
    # (big-ok1, the stream's first request, may have been stored before the second
    # one broke the stream: the requests of a stream are handled one by one)
    assert not {"big-key", long_key, "long-value"} & {t[0] for t in snap}


# ---------------------------------------------------------------------------
# secrets never leak (runs after the others: every log has seen everything)
# ---------------------------------------------------------------------------
def _secret_strings(sec: Security) -> dict[str, str]:
    out = {"token": read_first_line(sec.token_file),
           "peer token": read_first_line(sec.peer_token_file),
           "cluster secret": read_first_line(sec.cluster_secret_file),
           "broker password": read_first_line(sec.mqtt_password_file),
           "guest password": GUEST_PASSWORD}
    for name in ("tls_key", "client_key"):
        body = "".join(l for l in Path(getattr(sec, name)).read_text().splitlines()
                       if not l.startswith("-----"))
        out[name] = body[10:50]
    return out


def test_secrets_never_in_logs_or_command_lines(secure: Secure):
    sec = secure.sec
    for f in (sec.token_file, sec.peer_token_file, sec.auth_file, sec.cluster_secret_file,
              sec.mqtt_password_file, sec.tls_key, sec.client_key, sec.broker_passwd,
              sec.broker_acl):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    assert stat.S_IMODE(sec.token_file.parent.stat().st_mode) == 0o700
    secrets_ = _secret_strings(sec)
    texts = {f"log {s.log_path}": s.log_text() for s in secure.c.servers}
    texts["broker log"] = secure.c.broker.log_text()
    texts["broker conf"] = secure.c.broker.conf_path.read_text()
    texts["wrong token sent by tests"] = ""
    pids = [s.pid for s in secure.c.servers] + [secure.c.broker.pid]
    for pid in pids:
        for what in ("cmdline", "environ"):
            try:
                texts[f"/proc/{pid}/{what}"] = Path(f"/proc/{pid}/{what}").read_bytes().decode(
                    errors="replace")
            except OSError:
                pass
    assert any("/cmdline" in k for k in texts)
    for where, text in texts.items():
        for name, value in secrets_.items():
            assert value not in text, f"{name} appears in {where}"
        assert WRONG_TOKEN not in text, f"a client's (wrong) token was logged in {where}"


# ---------------------------------------------------------------------------
# the launcher: secure by default, --insecure for the course's plain mode
# ---------------------------------------------------------------------------
def _launcher(*args, timeout=90, env=None):
    py = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv").exists() else sys.executable
    return subprocess.run([py, "-m", "kvs_cluster", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)


def _uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])   # the real uid
    raise AssertionError(f"no Uid line for {pid}")


def _unprivileged_can_list(path: Path) -> bool:
    """Can the account ``nobody`` list ``path``?  (Only meaningful when we are root.)"""
    r = subprocess.run(["runuser", "-u", "nobody", "--", "ls", str(path)], capture_output=True,
                       text=True, timeout=30)
    return r.returncode == 0


def test_launcher_secure_by_default_and_insecure_mode(tmp_path):
    run = tmp_path / "run"
    ports = [free_port(), free_port()]
    spec = ",".join(map(str, ports))
    py = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv").exists() else sys.executable
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("KVS_")}
    try:
        up = _launcher("up", "--dir", str(run), "--servers", spec, "--no-persist", env=base_env)
        assert up.returncode == 0, up.stdout + up.stderr
        state = json.loads((run / "cluster.json").read_text())
        sec = Security.from_json(state["security"])
        assert sec.grpc_tls and sec.mqtt_tls and sec.mutual_tls and sec.cluster_secret_file
        assert sec.token_file and sec.peer_token_file and sec.auth_file
        for f in (sec.token_file, sec.peer_token_file, sec.auth_file, sec.cluster_secret_file,
                  sec.mqtt_password_file, sec.tls_key, sec.client_key):
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
        # umask 077: the run directory, logs and state are the launcher's user's alone
        assert stat.S_IMODE(run.stat().st_mode) == 0o700
        for f in [run / "cluster.json", run / "client.env", Path(state["broker"]["log"]),
                  Path(state["broker"]["conf"])] + [Path(x["log"]) for x in state["servers"]]:
            assert stat.S_IMODE(f.stat().st_mode) & 0o077 == 0, (f, oct(f.stat().st_mode))
        if os.geteuid() == 0:
            assert not _unprivileged_can_list(run)
        # servers get the auth file and the peer token (paths), never a token value
        cmd = Path(f"/proc/{state['servers'][0]['pid']}/cmdline").read_bytes().split(b"\0")
        assert str(sec.auth_file).encode() in cmd and str(sec.peer_token_file).encode() in cmd
        auth = json.loads(sec.auth_file.read_text())
        assert {u["name"]: u["roles"] for u in auth["users"]} == {"admin": ["admin"],
                                                                  "shell": ["admin"]}
        for name, value in _secret_strings_launcher(sec).items():
            assert value not in up.stdout + up.stderr, name
        # the broker dropped root and reads its private copies
        broker_pid = state["broker"]["pid"]
        assert _uid(broker_pid) != 0
        assert state["broker"]["user"] if os.geteuid() == 0 else True
        conf = Path(state["broker"]["conf"]).read_text()
        assert "allow_anonymous false" in conf and "password_file" in conf and "acl_file" in conf
        # clients get the CA, the admin token and the shell's own certificate: no server key
        client_env = read_env_file(run / "client.env")
        assert client_env["KVS_TOKEN_FILE"] == str(sec.token_file)
        assert client_env["KVS_TLS_CA"] == str(sec.tls_ca)
        assert client_env["KVS_CLIENT_CERT"] == str(sec.client_cert)
        assert client_env["KVS_CLIENT_KEY"] == str(sec.client_key)
        assert str(sec.tls_key) not in (run / "client.env").read_text()
        # `. run/client.env` then the shell, exactly as ./kvs.sh will do it
        sh = (f". {shlex.quote(str(run / 'client.env'))} && "
              f"{shlex.quote(py)} -m kvs_shell --timeout 20 -c 'put sec-key val1; get sec-key'")
        r = subprocess.run(["bash", "-c", sh], cwd=ROOT, env=base_env, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert "val1" in r.stdout
        r = subprocess.run([py, "-m", "kvs_shell", "-s", spec, "-c", "get sec-key"], cwd=ROOT,
                           env=base_env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 1  # no TLS, no token: refused
        # mutual TLS: a client with the CA and the admin token but no certificate fails
        # at the handshake, before any request is read
        with sec.channel(f"127.0.0.1:{ports[0]}", client_cert=False) as ch:
            with pytest.raises(grpc.RpcError) as e:
                kvs_pb2_grpc.KVSStub(ch).Consulta(kvs_pb2.ChaveVersao(chave="sec-key"),
                                                  metadata=sec.metadata(), timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value
        # ... and the shell, so configured, says what to give
        env_nocert = {**base_env, **{k: v for k, v in client_env.items()
                                     if k not in ("KVS_CLIENT_CERT", "KVS_CLIENT_KEY")}}
        r = subprocess.run([py, "-m", "kvs_shell", "--timeout", "5", "-c", "get sec-key"],
                           cwd=ROOT, env=env_nocert, capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and "--tls-cert" in r.stderr, r.stderr
        # the shell's certificate alone is an identity too (user "shell")
        env_cert = {k: v for k, v in {**base_env, **client_env}.items() if k != "KVS_TOKEN_FILE"}
        r = subprocess.run([py, "-m", "kvs_shell", "--timeout", "20", "-c", "whoami; get sec-key"],
                           cwd=ROOT, env=env_cert, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        rows = dict(line.split("\t", 1) for line in r.stdout.splitlines() if line.count("\t") == 1)
        assert rows["name"] == "shell" and rows["method"] == "cert" and rows["tls"] == "yes", r.stdout
        st = _launcher("status", "--dir", str(run))
        assert st.returncode == 0, st.stdout + st.stderr
        assert st.stdout.count("state=in-step") == 2, st.stdout
        # running again reuses the secrets
        token = sec.token_file.read_text()
        down = _launcher("down", "--dir", str(run))
        assert down.returncode == 0, down.stdout + down.stderr
        if state["broker"].get("files_dir"):
            assert not Path(state["broker"]["files_dir"]).exists()   # its copies went with it

        up = _launcher("up", "--dir", str(run), "--servers", spec, "--no-persist", "--insecure",
                       env=base_env)
        assert up.returncode == 0, up.stdout + up.stderr
        assert sec.token_file.read_text() == token
        state = json.loads((run / "cluster.json").read_text())
        assert state["security"] is None
        assert "allow_anonymous true" in Path(state["broker"]["conf"]).read_text()
        assert _uid(state["broker"]["pid"]) != 0
        sh = (f". {shlex.quote(str(run / 'client.env'))} && "
              f"{shlex.quote(py)} -m kvs_shell --timeout 20 -c 'put plain-key val2; get plain-key'")
        r = subprocess.run(["bash", "-c", sh], cwd=ROOT, env={**base_env, "KVS_TLS_CA": "/nonexistent"},
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr  # client.env unset KVS_TLS_CA
        assert "val2" in r.stdout
        st = _launcher("status", "--dir", str(run))
        assert st.returncode == 0 and st.stdout.count("state=in-step") == 2, st.stdout
    finally:
        down = _launcher("down", "--dir", str(run))
        assert down.returncode == 0, down.stdout + down.stderr


@pytest.mark.parametrize("value", ["0", "false", "no", "", None, "1"])
def test_kvs_insecure_is_insecure_only_when_1(tmp_path, value):
    """`python -m kvs_cluster up` reads KVS_INSECURE: only "1" turns security off."""
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVS_")}
    if value is not None:
        env["KVS_INSECURE"] = value
    try:
        up = _launcher("up", "--dir", str(run), "--servers", str(free_port()), "--no-persist",
                       "--no-wait", env=env)
        assert up.returncode == 0, up.stdout + up.stderr
        state = json.loads((run / "cluster.json").read_text())
        if value == "1":
            assert state["security"] is None and "security OFF" in up.stdout
        else:
            assert state["security"] and state["security"]["mutual_tls"], up.stdout
    finally:
        down = _launcher("down", "--dir", str(run))
        assert down.returncode == 0, down.stdout + down.stderr


def _kvs_sh(run: Path, port: int, *args: str, insecure: str | None = None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVS_")}
    env.update(KVS_RUN_DIR=str(run), KVS_SERVERS=str(port))
    if insecure is not None:
        env["KVS_INSECURE"] = insecure
    return subprocess.run(["bash", str(ROOT / "kvs.sh"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("insecure", ["no", "1"])
def test_kvs_sh_shell_shows_its_security_state(tmp_path, insecure):
    """./kvs.sh with KVS_INSECURE=no is secure (mutual TLS, the admin's credentials) and
    the shell says so; only KVS_INSECURE=1 gives the plain mode, and the shell says that."""
    run, port = tmp_path / "run", free_port()
    try:
        r = _kvs_sh(run, port, "--timeout", "20", "-c", "whoami; put kvs-sh-key value; "
                    "get kvs-sh-key", insecure=insecure)
        assert r.returncode == 0, r.stdout + r.stderr
        rows = dict(line.split("\t", 1) for line in r.stdout.splitlines() if line.count("\t") == 1)
        if insecure == "1":
            assert rows["tls"] == "no" and rows["connection"] == "plaintext, no credentials", r.stdout
            assert json.loads((run / "cluster.json").read_text())["security"] is None
        else:
            assert rows["tls"] == "yes" and rows["name"] in ("admin", "shell"), r.stdout
            assert rows["roles"] == "admin"
            assert rows["connection"] == "TLS, client certificate, token", r.stdout
        assert "kvs-sh-key\t1\tvalue" in r.stdout
    finally:
        stop = _kvs_sh(run, port, "stop")
        assert stop.returncode == 0, stop.stdout + stop.stderr


def test_shell_history_file_is_0600(tmp_path):
    """The interactive shell's history holds values: created 0600, an old 0644 one tightened."""
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput

    from kvs_shell.app import Shell
    hist = tmp_path / "history"
    hist.write_text("\n# old\n+put k secret\n")
    hist.chmod(0o644)
    old = os.environ.get("KVS_SHELL_HISTORY")
    os.environ["KVS_SHELL_HISTORY"] = str(hist)
    def open_session():
        with create_pipe_input() as inp:
            shell = Shell([f"127.0.0.1:{free_port()}"], timeout=0.3, interactive=True,
                          out=open(os.devnull, "w"), err=open(os.devnull, "w"), color=False)
            try:
                shell.make_session(input=inp, output=DummyOutput())
            finally:
                shell.close()

    try:
        open_session()   # an existing 0644 history is tightened
        assert stat.S_IMODE(hist.stat().st_mode) == 0o600
        hist.unlink()
        open_session()   # a new one is created 0600
        assert stat.S_IMODE(hist.stat().st_mode) == 0o600
    finally:
        if old is None:
            os.environ.pop("KVS_SHELL_HISTORY", None)
        else:
            os.environ["KVS_SHELL_HISTORY"] = old


def _secret_strings_launcher(sec: Security) -> dict[str, str]:
    return {"token": read_first_line(sec.token_file),
            "peer token": read_first_line(sec.peer_token_file),
            "cluster secret": read_first_line(sec.cluster_secret_file),
            "broker password": read_first_line(sec.mqtt_password_file)}
