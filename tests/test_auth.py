"""Identities, roles and key prefixes (issue 11), against real servers and Mosquitto.

One cluster of three servers with mutual TLS, an auth file (token users and one
certificate user) and a peer token serves every test.  Each client channel
presents a client certificate (mutual TLS requires one); a bearer token, when
sent, names the caller, else the certificate's CN does.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import stat
import subprocess
import uuid
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import ROOT, wait_until
from kvs_cluster import Broker, Server, free_port
from kvs_proto import kvs_pb2, kvs_pb2_grpc

pytestmark = pytest.mark.integration
TIMEOUT = 20.0
USERS = ("admin", "writer", "reader", "app", "mixed", "late")


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def write_private(path: Path, text: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


ROLES = {"admin": {"admin": True},
         "read-write": {"permissions": [{"prefix": "", "access": "readwrite"}]},
         "read-only": {"permissions": [{"prefix": "", "access": "read"}]},
         "app": {"permissions": [{"prefix": "app/", "access": "readwrite"}]}}


def auth_doc(tokens: dict[str, str], users=("admin", "writer", "reader", "app", "mixed")) -> str:
    roles = {"admin": ["admin"], "writer": ["read-write"], "reader": ["read-only"],
             "app": ["app"], "mixed": ["app", "read-only"], "late": ["read-only"]}
    doc = {"users": [{"name": u, "token_sha256": sha(tokens[u]), "roles": roles[u]} for u in users]
           + [{"name": "shell", "cert_cn": "kvs-shell", "roles": ["read-only"]}],
           "roles": ROLES}
    return json.dumps(doc, indent=1)


class Env:
    def __init__(self, work: Path):
        self.work = work
        self.tls = work / "tls"
        subprocess.run(["bash", str(ROOT / "tools" / "gen_certs.sh"), str(self.tls)], check=True,
                       capture_output=True, timeout=60)
        assert (self.tls / "client.pem").exists(), "tools/gen_certs.sh made no client certificate"
        self.tokens = {u: secrets.token_urlsafe(32) for u in USERS + ("peer",)}
        self.auth_file = write_private(work / "auth.json", auth_doc(self.tokens))
        self.peer_file = write_private(work / "peer.token", self.tokens["peer"] + "\n")
        self.broker = None
        self.servers: list[Server] = []
        self.channels: dict[tuple[int, str], grpc.Channel] = {}

    def server_args(self) -> list[str]:
        t = self.tls
        return ["--tls-cert", str(t / "server.pem"), "--tls-key", str(t / "server.key"),
                "--tls-ca", str(t / "ca.pem"), "--tls-client-ca", str(t / "ca.pem"),
                "--auth-file", str(self.auth_file), "--peer-token-file", str(self.peer_file)]

    def channel(self, i: int, cert: str = "client") -> grpc.Channel:
        """A mutual-TLS channel to server i presenting ``cert``.pem (CN kvs-shell for
        "client", CN localhost -- no user -- for "server")."""
        key = (i, cert)
        if key not in self.channels:
            creds = grpc.ssl_channel_credentials(
                (self.tls / "ca.pem").read_bytes(), (self.tls / f"{cert}.key").read_bytes(),
                (self.tls / f"{cert}.pem").read_bytes())
            self.channels[key] = grpc.secure_channel(self.servers[i].address, creds)
        return self.channels[key]

    def md(self, user: str | None):
        return [("authorization", f"Bearer {self.tokens[user]}")] if user else []

    def kvs(self, i=0, cert="client"):
        return kvs_pb2_grpc.KVSStub(self.channel(i, cert))

    def ext(self, i=0, cert="client"):
        return kvs_pb2_grpc.KVSExtStub(self.channel(i, cert))

    def put(self, user, k, v, i=0) -> int:
        return self.kvs(i).Insere(kvs_pb2.ChaveValor(chave=k, valor=v), metadata=self.md(user),
                                  timeout=TIMEOUT).versao

    def get(self, user, k, i=0):
        return self.kvs(i).Consulta(kvs_pb2.ChaveVersao(chave=k), metadata=self.md(user),
                                    timeout=TIMEOUT)

    def snapshot(self, user="admin", i=0) -> list[tuple[str, str, int]]:
        return sorted((t.chave, t.valor, t.versao) for t in self.kvs(i).Snapshot(
            kvs_pb2.Versao(versao=0), metadata=self.md(user), timeout=TIMEOUT) if t.chave)

    def whoami(self, user, i=0, cert="client"):
        return self.ext(i, cert).WhoAmI(kvs_pb2.WhoAmIRequest(), metadata=self.md(user),
                                        timeout=TIMEOUT)

    def healthy(self, i: int) -> bool:
        resp = health_pb2_grpc.HealthStub(self.channel(i)).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=2)
        return resp.status == health_pb2.HealthCheckResponse.SERVING

    def quiet(self) -> list:
        """Every server answers the same Snapshot (replication caught up)."""
        def same():
            snaps = [self.snapshot("admin", i) for i in range(len(self.servers))]
            return snaps[0] if all(s == snaps[0] for s in snaps) else False
        return wait_until(same, 30, "identical snapshots")

    def hup(self) -> None:
        for s in self.servers:
            os.kill(s.pid, signal.SIGHUP)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = Env(tmp_path_factory.mktemp("auth"))
    try:
        e.broker = Broker.start(workdir=e.work / "broker")
        for n in range(3):
            e.servers.append(Server.start(free_port(), e.broker.port,
                                          data_dir=e.work / f"node-{n}" / "data",
                                          extra_args=e.server_args(),
                                          log_path=e.work / f"node-{n}" / "server.log"))
        for i, s in enumerate(e.servers):
            wait_until(lambda i=i: e.healthy(i), 45, f"server {i} SERVING")
        wait_until(lambda: e.put("admin", "boot", "xyz") >= 1, 30, "a first write")
        e.quiet()
        yield e
    finally:
        for ch in e.channels.values():
            ch.close()
        for s in e.servers:
            s.kill()
        if e.broker:
            e.broker.kill()


def code_of(thunk) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        thunk()
    return err.value.code(), err.value.details() or ""


# ---------------------------------------------------------------------------
# roles and prefixes, every RPC class
# ---------------------------------------------------------------------------
def _calls(e: Env, user: str, key: str):
    """(name, access, thunk) for every client RPC touching ``key``."""
    md = e.md(user)
    cv = kvs_pb2.ChaveValor(chave=key, valor="val")
    kv = kvs_pb2.ChaveVersao(chave=key)
    kvs, ext = e.kvs(), e.ext()
    return [
        ("Insere", "write", lambda: kvs.Insere(cv, metadata=md, timeout=TIMEOUT)),
        ("Remove", "write", lambda: kvs.Remove(kv, metadata=md, timeout=TIMEOUT)),
        ("InsereVarias", "write", lambda: list(kvs.InsereVarias(iter([cv]), metadata=md,
                                                                timeout=TIMEOUT))),
        ("RemoveVarias", "write", lambda: list(kvs.RemoveVarias(iter([kv]), metadata=md,
                                                                timeout=TIMEOUT))),
        ("Consulta", "read", lambda: kvs.Consulta(kv, metadata=md, timeout=TIMEOUT)),
        ("ConsultaVarias", "read", lambda: list(kvs.ConsultaVarias(iter([kv]), metadata=md,
                                                                   timeout=TIMEOUT))),
        ("History", "read", lambda: ext.History(kvs_pb2.HistoryRequest(chave=key), metadata=md,
                                                timeout=TIMEOUT)),
    ]


# user -> (may read key, may write key) for a key outside app/ and one inside
EXPECT = {
    "admin": {"other/": (True, True), "app/": (True, True)},
    "writer": {"other/": (True, True), "app/": (True, True)},
    "reader": {"other/": (True, False), "app/": (True, False)},
    "app": {"other/": (False, False), "app/": (True, True)},
    "mixed": {"other/": (True, False), "app/": (True, True)},
}


@pytest.mark.parametrize("user", sorted(EXPECT))
def test_roles_and_prefixes_for_every_rpc(env: Env, user):
    before = env.quiet()
    for prefix, (may_read, may_write) in EXPECT[user].items():
        key = f"{prefix}{user}-{uuid.uuid4().hex[:6]}"
        for name, access, call in _calls(env, user, key):
            allowed = may_read if access == "read" else may_write
            if allowed:
                call()
            else:
                code, details = code_of(call)
                assert code == grpc.StatusCode.PERMISSION_DENIED, (user, name, code, details)
                assert f"may not {access} key '{key}'" in details and user in details, details
    after = env.quiet()
    written = {k for k, _, _ in after} - {k for k, _, _ in before}
    # Only the keys a writer may write appear (Insere then Remove leaves a deleted key out).
    assert all(EXPECT[user][k.split("/")[0] + "/"][1] for k in written), (user, written)


def test_denied_writes_change_nothing(env: Env):
    env.put("admin", "other/guarded", "original")
    before = env.quiet()
    kvs = env.kvs(1)
    for user in ("reader", "app"):
        md = env.md(user)
        for call in (
                lambda: kvs.Insere(kvs_pb2.ChaveValor(chave="other/guarded", valor="xyz"),
                                   metadata=md, timeout=TIMEOUT),
                lambda: kvs.Remove(kvs_pb2.ChaveVersao(chave="other/guarded"), metadata=md,
                                   timeout=TIMEOUT),
                lambda: list(kvs.RemoveVarias(iter([kvs_pb2.ChaveVersao(chave="other/guarded")]),
                                              metadata=md, timeout=TIMEOUT))):
            assert code_of(call)[0] == grpc.StatusCode.PERMISSION_DENIED
    # a barrier write by the admin, then every server still has the original
    env.put("admin", "other/barrier", uuid.uuid4().hex)
    after = env.quiet()
    assert [t for t in after if t[0] != "other/barrier"] == \
        [t for t in before if t[0] != "other/barrier"]
    assert env.get("admin", "other/guarded", 2).valor == "original"


def test_a_denied_stream_item_aborts_the_stream_and_earlier_items_stand(env: Env):
    tag = uuid.uuid4().hex[:6]
    keys = [f"app/{tag}-1", f"app/{tag}-2", f"other/{tag}-3", f"app/{tag}-4"]
    replies = []
    call = env.kvs().InsereVarias(iter([kvs_pb2.ChaveValor(chave=k, valor="str") for k in keys]),
                                  metadata=env.md("app"), timeout=TIMEOUT)
    with pytest.raises(grpc.RpcError) as err:
        for r in call:
            replies.append(r.versao)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert f"other/{tag}-3" in err.value.details()
    assert replies == [1, 1]
    assert [env.get("admin", k).versao for k in keys] == [1, 1, 0, 0]
    # reads too: the stream stops at the first unreadable key
    out = []
    call = env.kvs().ConsultaVarias(iter([kvs_pb2.ChaveVersao(chave=k) for k in keys]),
                                    metadata=env.md("app"), timeout=TIMEOUT)
    with pytest.raises(grpc.RpcError) as err:
        for t in call:
            out.append(t.chave)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert out == keys[:2]


def test_snapshot_and_listkeys_return_only_readable_keys(env: Env):
    tag = uuid.uuid4().hex[:6]
    for k in (f"app/{tag}-a", f"other/{tag}-b", f"app/{tag}-c"):
        env.put("admin", k, "val")
    everything = {k for k, _, _ in env.snapshot("admin")}
    assert {f"app/{tag}-a", f"other/{tag}-b"} <= everything
    app_view = {k for k, _, _ in env.snapshot("app")}
    assert app_view == {k for k in everything if k.startswith("app/")}
    assert {k for k, _, _ in env.snapshot("reader")} == everything
    # ListKeys pages over unreadable keys and still fills the limit
    listed, after = [], ""
    while True:
        page = env.ext().ListKeys(kvs_pb2.ListKeysRequest(limit=2, start_after=after),
                                  metadata=env.md("app"), timeout=TIMEOUT)
        listed += page.keys
        assert len(page.keys) <= 2
        if not page.truncated:
            break
        after = page.keys[-1]
    assert listed == sorted(k for k in everything if k.startswith("app/"))


# ---------------------------------------------------------------------------
# peers, admin-only methods
# ---------------------------------------------------------------------------
def test_only_peers_may_call_replica(env: Env):
    rep = kvs_pb2_grpc.ReplicaStub(env.channel(0))
    for user in ("admin", "writer", "reader", None):   # None: the certificate user
        code, details = code_of(lambda: list(rep.FetchState(
            kvs_pb2.StateRequest(), metadata=env.md(user), timeout=TIMEOUT)))
        assert code == grpc.StatusCode.PERMISSION_DENIED, (user, code)
        assert "peers only" in details
    blobs = list(rep.FetchState(kvs_pb2.StateRequest(), metadata=env.md("peer"), timeout=60))
    assert blobs and blobs[0].payload
    # the peer credential reads and writes no keys
    code, _ = code_of(lambda: env.get("peer", "boot"))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert env.whoami("peer").method == "peer"


def test_member_remove_admin_or_peer_and_forwarded_with_the_peer_token(env: Env):
    req = kvs_pb2.MemberRemoveRequest(node_id="no-such-node")
    for user in ("writer", "reader", "app"):
        code, details = code_of(lambda: env.ext().MemberRemove(req, metadata=env.md(user),
                                                               timeout=TIMEOUT))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "admin only" in details
    leader = env.ext().Status(kvs_pb2.StatusRequest(), metadata=env.md("reader"),
                              timeout=5).leader
    follower = next(i for i in range(3) if env.ext(i).Status(
        kvs_pb2.StatusRequest(), metadata=env.md("reader"), timeout=5).node_id != leader)
    # A follower forwards to the leader as "peer": the leader's own refusal comes back.
    reply = env.ext(follower).MemberRemove(req, metadata=env.md("admin"), timeout=TIMEOUT)
    assert not reply.ok
    assert "UNAUTHENTICATED" not in reply.error and "PERMISSION" not in reply.error, reply.error
    assert reply.error == "not a member", reply.error   # the leader's answer


def test_watch_export_compact_and_retention_follow_the_roles(env: Env):
    tag = uuid.uuid4().hex[:6]
    ext = env.ext()
    # Watch: a prefix the caller can read nothing under is refused at once
    code, details = code_of(lambda: next(ext.Watch(kvs_pb2.WatchRequest(prefix=f"other/{tag}"),
                                                   metadata=env.md("app"), timeout=TIMEOUT)))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "may not read" in details
    # a broader prefix is filtered to the caller's keys
    call = ext.Watch(kvs_pb2.WatchRequest(prefix=""), metadata=env.md("app"), timeout=30)
    head = next(call).head
    env.put("admin", f"other/{tag}-x", "val")
    env.put("admin", f"app/{tag}-y", "val")
    msg = next(call)
    call.cancel()
    assert [c.chave for c in msg.changes] == [f"app/{tag}-y"] and msg.head > head
    # Export: only readable keys
    keys = {k.chave for ch in ext.Export(kvs_pb2.ExportRequest(), metadata=env.md("app"),
                                         timeout=TIMEOUT) for k in ch.keys}
    assert f"app/{tag}-y" in keys and all(k.startswith("app/") for k in keys)
    # Compact and Retention changes: admin only; reading the policy is open to users
    for user in ("writer", "reader", "app"):
        code, details = code_of(lambda: ext.Compact(kvs_pb2.CompactRequest(position=1),
                                                    metadata=env.md(user), timeout=TIMEOUT))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "admin only" in details
        code, _ = code_of(lambda: ext.Retention(kvs_pb2.RetentionRequest(set=True,
                                                                         keep_versions=1),
                                                metadata=env.md(user), timeout=TIMEOUT))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert ext.Retention(kvs_pb2.RetentionRequest(), metadata=env.md(user),
                             timeout=TIMEOUT).keep_versions == 0
    info = ext.Compact(kvs_pb2.CompactRequest(position=1), metadata=env.md("admin"),
                       timeout=TIMEOUT)
    assert info.compacted == 1


# ---------------------------------------------------------------------------
# authentication
# ---------------------------------------------------------------------------
def test_whoami_by_token_and_by_certificate(env: Env):
    me = env.whoami("app")
    assert (me.name, list(me.roles), me.method, me.admin, me.tls) == \
        ("app", ["app"], "token", False, True)
    assert list(me.read_prefixes) == ["app/"] and list(me.write_prefixes) == ["app/"]
    me = env.whoami("mixed")
    assert list(me.read_prefixes) == ["", "app/"] and list(me.write_prefixes) == ["app/"]
    me = env.whoami("admin")
    assert me.admin and list(me.write_prefixes) == [""]
    # no token: the client certificate (CN kvs-shell) names the caller
    me = env.whoami(None)
    assert (me.name, me.method, list(me.roles)) == ("shell", "cert", ["read-only"])
    assert env.get(None, "boot").versao >= 1
    code, _ = code_of(lambda: env.put(None, "other/by-cert", "xyz"))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    # a certificate whose CN is no user, and no token: UNAUTHENTICATED
    code, details = code_of(lambda: env.whoami(None, cert="server"))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "localhost" in details
    # a token wins over the certificate
    assert env.whoami("writer", cert="server").name == "writer"


@pytest.mark.parametrize("cert", ["client", "server"])
def test_unauthenticated_before_unimplemented(env: Env, cert):
    ch = env.channel(0, cert)
    unknown = ch.unary_unary("/kvs.KVS/NoSuchMethod", request_serializer=lambda b: b,
                             response_deserializer=lambda b: b)
    unknown_svc = ch.stream_stream("/kvs.Nope/Nothing", request_serializer=lambda b: b,
                                   response_deserializer=lambda b: b)
    bad = [("authorization", "Bearer " + "x" * 43)]
    for md in (bad, [("authorization", "Basic abc")]) + (([],) if cert == "server" else ()):
        code, details = code_of(lambda: unknown(b"", metadata=md, timeout=5))
        assert code == grpc.StatusCode.UNAUTHENTICATED, (md, code, details)
        code, _ = code_of(lambda: list(unknown_svc(iter([b""]), metadata=md, timeout=5)))
        assert code == grpc.StatusCode.UNAUTHENTICATED
    code, _ = code_of(lambda: unknown(b"", metadata=env.md("reader"), timeout=5))
    assert code == grpc.StatusCode.UNIMPLEMENTED
    # health Check stays open; Watch does not (streams held by strangers)
    hs = health_pb2_grpc.HealthStub(ch)
    assert hs.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == \
        health_pb2.HealthCheckResponse.SERVING
    if cert == "server":
        code, _ = code_of(lambda: next(iter(hs.Watch(health_pb2.HealthCheckRequest(service=""),
                                                     timeout=5))))
        assert code == grpc.StatusCode.UNAUTHENTICATED


# ---------------------------------------------------------------------------
# SIGHUP reload
# ---------------------------------------------------------------------------
def test_sighup_reload_adds_and_removes_users_and_keeps_a_broken_file_out(env: Env):
    def code(user, i):
        try:
            env.whoami(user, i)
            return grpc.StatusCode.OK
        except grpc.RpcError as e:
            return e.code()

    everyone = range(len(env.servers))
    assert all(code("late", i) == grpc.StatusCode.UNAUTHENTICATED for i in everyone)
    original = env.auth_file.read_text()
    try:
        # add "late", drop "reader"
        users = ("admin", "writer", "app", "mixed", "late")
        write_private(env.auth_file, auth_doc(env.tokens, users))
        env.hup()
        wait_until(lambda: all(code("late", i) == grpc.StatusCode.OK for i in everyone), 20,
                   "the added user accepted")
        assert all(code("reader", i) == grpc.StatusCode.UNAUTHENTICATED for i in everyone)
        assert env.get("late", "boot").versao >= 1
        # broken files are refused and the loaded users stay: bad JSON, unknown role,
        # readable by others
        logs0 = [s.log_text().count("not reloaded") for s in env.servers]
        write_private(env.auth_file, "{not json")
        env.hup()
        wait_until(lambda: all(s.log_text().count("not reloaded") > n
                               for s, n in zip(env.servers, logs0)), 20, "reload refused")
        doc = json.loads(auth_doc(env.tokens, users))
        doc["users"][0]["roles"] = ["no-such-role"]
        write_private(env.auth_file, json.dumps(doc))
        logs1 = [s.log_text().count("not reloaded") for s in env.servers]
        env.hup()
        wait_until(lambda: all(s.log_text().count("not reloaded") > n
                               for s, n in zip(env.servers, logs1)), 20, "reload refused")
        write_private(env.auth_file, auth_doc(env.tokens))   # would re-admit "reader"...
        os.chmod(env.auth_file, 0o644)                       # ... but others may read it
        logs2 = [s.log_text().count("not reloaded") for s in env.servers]
        env.hup()
        wait_until(lambda: all(s.log_text().count("not reloaded") > n
                               for s, n in zip(env.servers, logs2)), 20, "reload refused")
        assert "chmod 600" in env.servers[0].log_text()
        assert all(code("late", i) == grpc.StatusCode.OK for i in everyone)
        assert all(code("reader", i) == grpc.StatusCode.UNAUTHENTICATED for i in everyone)
        assert all(s.alive() for s in env.servers)
    finally:
        os.chmod(env.auth_file, 0o600)
        write_private(env.auth_file, original)
        env.hup()
    wait_until(lambda: all(code("reader", i) == grpc.StatusCode.OK for i in everyone), 20,
               "the original users back")


# ---------------------------------------------------------------------------
# data at rest
# ---------------------------------------------------------------------------
def test_data_dir_is_private(env: Env):
    for n in range(3):
        data = env.work / f"node-{n}" / "data"
        assert stat.S_IMODE(data.stat().st_mode) == 0o700
        files = [p for p in data.rglob("*")]
        assert any(p.name == "LOCK" for p in files)
        for p in files:
            want = 0o700 if p.is_dir() else 0o600
            assert stat.S_IMODE(p.stat().st_mode) == want, (p, oct(p.stat().st_mode))
