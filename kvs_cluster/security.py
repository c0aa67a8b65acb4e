"""Credentials, certificates and broker auth files for a local KVS cluster (opt-in).

:meth:`Security.ensure` creates, once, everything a secure local cluster needs
under one directory and reuses it on later calls (idempotent)::

    <dir>/secrets/          (0700)
        admin.token         the shell's bearer token (user "admin", role admin)  (0600)
        peer.token          what servers present to each other; no client has it (0600)
        cluster.secret      key material for the HMAC of every broker message     (0600)
        mqtt-kvs-server.password   the broker password of the servers           (0600)
    <dir>/auth.json         users and roles the servers enforce (--auth-file)    (0600)
    <dir>/broker-auth/      (0700)
        passwd              Mosquitto password_file (hashed by mosquitto_passwd -U)
        acl                 Mosquitto acl_file: only kvs-server may use kvs/#
    <dir>/tls/              (0700) made by tools/gen_certs.sh
        ca.pem ca.key server.pem server.key   the servers' (and the broker's)
        client.pem client.key                 the shell's (CN kvs-shell, clientAuth)

Secrets are generated with :mod:`secrets`, written with mode 0600 and only ever
passed to processes as *file paths* (never on a command line, never logged).
Each piece can be switched off separately (tests use token-only clusters etc.).
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import shlex
import subprocess
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from kvs_common.channel import bearer, make_channel
from kvs_common.secretfile import read_secret, write_secret_file

from .tools import mosquitto_passwd_binary

PROJECT_ROOT = Path(__file__).resolve().parent.parent
GEN_CERTS = PROJECT_ROOT / "tools" / "gen_certs.sh"
MQTT_USER = "kvs-server"
SHELL_CN = "kvs-shell"       # the CN of the shell's client certificate
DEFAULT_ROLES = {
    "admin": {"admin": True},
    "read-write": {"permissions": [{"prefix": "", "access": "readwrite"}]},
    "read-only": {"permissions": [{"prefix": "", "access": "read"}]},
    "app": {"permissions": [{"prefix": "app/", "access": "readwrite"}]},
}


def _secret_file(path: Path, nbytes: int = 32) -> tuple[Path, bool]:
    """Reuse the secret in ``path`` (tightening its mode), or generate one.
    Returns (path, whether it was generated now)."""
    if path.exists() and path.read_text(encoding="utf-8").strip():
        path.chmod(0o600)
        return path, False
    write_secret_file(path, secrets.token_urlsafe(nbytes) + "\n")
    return path, True


def _private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def read_first_line(path: Path | str, what: str = "secret") -> str:
    """The secret in one of our files (refused if others can read it)."""
    value = read_secret(path, "", what=what, min_len=1)
    assert value is not None
    return value


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def auth_doc(users: Iterable[Mapping], roles: Mapping | None = None) -> dict:
    """The --auth-file document: ``users`` and the default ``roles`` (plus ``roles``)."""
    return {"users": [dict(u) for u in users], "roles": {**DEFAULT_ROLES, **dict(roles or {})}}


def hashed_password_lines(users: Mapping[str, str]) -> str:
    """Mosquitto password_file lines for ``users`` (user -> plain password).

    The plain passwords go through a 0600 temp file and ``mosquitto_passwd -U``
    (hash in place), so they never appear on a command line."""
    for user in users:
        if not user or ":" in user or "\n" in user:
            raise ValueError(f"bad broker user name {user!r}")
    with tempfile.TemporaryDirectory(prefix="kvs-passwd-") as tmp:
        plain = Path(tmp) / "passwd"
        write_secret_file(plain, "".join(f"{u}:{p}\n" for u, p in users.items()))
        subprocess.run([mosquitto_passwd_binary(), "-U", str(plain)], check=True,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, timeout=30)
        return plain.read_text(encoding="utf-8")


def generate_certs(tls_dir: Path) -> None:
    """tools/gen_certs.sh DIR (idempotent): CA, server cert for 127.0.0.1/localhost,
    and the shell's client cert (CN kvs-shell)."""
    proc = subprocess.run(["bash", str(GEN_CERTS), str(tls_dir)], stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60,
                          env={**os.environ, "KVS_CLIENT_CN": SHELL_CN})
    if proc.returncode != 0:
        raise RuntimeError(f"tools/gen_certs.sh failed ({proc.returncode}): {proc.stderr.strip()}")


@dataclass(frozen=True)
class Security:
    """What a secured local cluster uses; every path is absolute, every piece optional.

    ``None`` for a piece means that piece is off (e.g. ``auth_file=None``: servers
    check no credential at all)."""
    dir: Path
    token_file: Path | None = None          # the shell's bearer token (user admin in auth.json)
    peer_token_file: Path | None = None     # servers' credential to each other (--peer-token-file)
    auth_file: Path | None = None           # users and roles (--auth-file)
    cluster_secret_file: Path | None = None  # HMAC of broker messages (--cluster-secret-file)
    mqtt_username: str | None = None        # servers' broker user (--mqtt-username)
    mqtt_password_file: Path | None = None  # its plain password (--mqtt-password-file)
    broker_passwd: Path | None = None       # Mosquitto password_file (hashed)
    broker_acl: Path | None = None          # Mosquitto acl_file
    tls_ca: Path | None = None              # CA of every certificate below
    tls_cert: Path | None = None            # certificate of servers and of the broker listener
    tls_key: Path | None = None             # its key: servers and broker only, never a client
    client_cert: Path | None = None         # the shell's certificate (CN kvs-shell)
    client_key: Path | None = None
    grpc_tls: bool = False                  # gRPC servers listen with TLS
    mqtt_tls: bool = False                  # the broker listens with TLS only
    mutual_tls: bool = False                # gRPC clients must present a certificate

    # -- creation ------------------------------------------------------------
    @classmethod
    def ensure(cls, directory: Path | str, *, tls: bool = True, grpc_tls: bool | None = None,
               mqtt_tls: bool | None = None, mutual_tls: bool = False, token: bool = True,
               hmac: bool = True, broker_auth: bool = True,
               extra_broker_users: Mapping[str, str] | None = None) -> "Security":
        """Create (first call) or reuse (later calls) the credentials under ``directory``.

        ``tls`` is the default for ``grpc_tls`` and ``mqtt_tls``.  ``token``: servers
        authenticate every call (auth.json with the admin token and the shell's
        certificate, and a peer token).  ``extra_broker_users`` (name -> password) adds
        broker accounts that the ACL gives no topic at all (tests use one to show that
        credentials alone do not allow publishing)."""
        d = Path(directory).resolve()
        _private_dir(d)
        grpc_tls = tls if grpc_tls is None else grpc_tls
        mqtt_tls = tls if mqtt_tls is None else mqtt_tls
        sec_dir = _private_dir(d / "secrets")
        kw: dict = {"dir": d, "grpc_tls": grpc_tls, "mqtt_tls": mqtt_tls,
                    "mutual_tls": bool(mutual_tls and grpc_tls)}
        if token:
            admin, fresh = _secret_file(sec_dir / "admin.token")
            peer, _ = _secret_file(sec_dir / "peer.token")
            auth = d / "auth.json"
            # auth.json is the operator's to edit (servers reload it on SIGHUP): written
            # when missing, or when the admin token it names was just made.
            if fresh or not auth.exists():
                write_secret_file(auth, json.dumps(auth_doc([
                    {"name": "admin", "token_sha256": token_sha256(read_first_line(admin)),
                     "roles": ["admin"]},
                    {"name": "shell", "cert_cn": SHELL_CN, "roles": ["admin"]},
                ]), indent=2) + "\n")
            auth.chmod(0o600)
            kw.update(token_file=admin, peer_token_file=peer, auth_file=auth)
        if hmac:
            kw["cluster_secret_file"] = _secret_file(sec_dir / "cluster.secret")[0]
        if broker_auth:
            pw_file, _ = _secret_file(sec_dir / f"mqtt-{MQTT_USER}.password")
            broker_dir = _private_dir(d / "broker-auth")
            users = {MQTT_USER: read_first_line(pw_file), **dict(extra_broker_users or {})}
            passwd = broker_dir / "passwd"
            write_secret_file(passwd, hashed_password_lines(users))
            acl = broker_dir / "acl"
            # Users not named here get nothing (Mosquitto denies by default once an
            # acl_file is set); anonymous clients cannot even connect.
            write_secret_file(acl, f"# written by kvs_cluster: only the servers' account may use KVS topics\n"
                                   f"user {MQTT_USER}\ntopic readwrite kvs/#\n")
            kw.update(mqtt_username=MQTT_USER, mqtt_password_file=pw_file,
                      broker_passwd=passwd, broker_acl=acl)
        if grpc_tls or mqtt_tls:
            tls_dir = d / "tls"
            generate_certs(tls_dir)
            kw.update(tls_ca=tls_dir / "ca.pem", tls_cert=tls_dir / "server.pem",
                      tls_key=tls_dir / "server.key", client_cert=tls_dir / "client.pem",
                      client_key=tls_dir / "client.key")
        return cls(**kw)

    def add_user(self, name: str, roles: Sequence[str], *, roles_doc: Mapping | None = None,
                 cert_cn: str | None = None) -> Path | None:
        """Add a user to auth.json (servers pick it up on SIGHUP): with a new token,
        whose file is returned, or (``cert_cn``) identified by its certificate's CN.
        ``roles_doc`` adds or replaces role definitions."""
        if self.auth_file is None:
            raise ValueError("this cluster has no auth file (token=False)")
        doc = json.loads(Path(self.auth_file).read_text(encoding="utf-8"))
        doc["users"] = [u for u in doc.get("users", []) if u.get("name") != name]
        user: dict = {"name": name, "roles": list(roles)}
        token_file = None
        if cert_cn:
            user["cert_cn"] = cert_cn
        else:
            token_file, _ = _secret_file(Path(self.dir) / "secrets" / f"user-{name}.token")
            user["token_sha256"] = token_sha256(read_first_line(token_file))
        doc["users"].append(user)
        doc["roles"] = {**doc.get("roles", {}), **dict(roles_doc or {})}
        write_secret_file(self.auth_file, json.dumps(doc, indent=2) + "\n")
        return token_file

    # -- (de)serialisation for cluster.json: paths only, never secret values --
    def to_json(self) -> dict:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = str(v) if isinstance(v, Path) else v
        return out

    @classmethod
    def from_json(cls, doc: Mapping | None) -> "Security | None":
        if not doc:
            return None
        kw = {}
        for f in fields(cls):
            if f.name in doc:
                v = doc[f.name]
                kw[f.name] = Path(v) if isinstance(v, str) and f.name not in ("mqtt_username",) else v
        return cls(**kw)

    @property
    def enabled(self) -> list[str]:
        on = []
        if self.grpc_tls:
            on.append("gRPC TLS" + (" (mutual: clients need a certificate)" if self.mutual_tls else ""))
        if self.auth_file:
            on.append("per-client credentials and roles (auth.json), peer token")
        if self.mqtt_username:
            on.append("broker password + ACL")
        if self.mqtt_tls:
            on.append("broker TLS")
        if self.cluster_secret_file:
            on.append("signed broker messages (HMAC)")
        return on

    # -- servers -------------------------------------------------------------
    def server_args(self) -> list[str]:
        """Flags for ``python -m server``: file paths only, never a secret value."""
        a: list[str] = []
        if self.grpc_tls:
            a += ["--tls-cert", str(self.tls_cert), "--tls-key", str(self.tls_key),
                  "--tls-ca", str(self.tls_ca)]
            if self.mutual_tls:
                a += ["--tls-client-ca", str(self.tls_ca)]
        if self.auth_file:
            a += ["--auth-file", str(self.auth_file), "--peer-token-file", str(self.peer_token_file)]
        if self.mqtt_username:
            a += ["--mqtt-username", self.mqtt_username,
                  "--mqtt-password-file", str(self.mqtt_password_file)]
        if self.mqtt_tls:
            a += ["--mqtt-tls-ca", str(self.tls_ca)]
        if self.cluster_secret_file:
            a += ["--cluster-secret-file", str(self.cluster_secret_file)]
        return a

    def server_env(self) -> dict[str, str]:
        """The same settings as the environment variables the server reads."""
        e: dict[str, str] = {}
        if self.grpc_tls:
            e.update(KVS_TLS_CERT=str(self.tls_cert), KVS_TLS_KEY=str(self.tls_key),
                     KVS_TLS_CA=str(self.tls_ca))
            if self.mutual_tls:
                e["KVS_TLS_CLIENT_CA"] = str(self.tls_ca)
        if self.auth_file:
            e.update(KVS_AUTH_FILE=str(self.auth_file),
                     KVS_PEER_TOKEN_FILE=str(self.peer_token_file))
        if self.mqtt_username:
            e.update(KVS_MQTT_USERNAME=self.mqtt_username,
                     KVS_MQTT_PASSWORD_FILE=str(self.mqtt_password_file))
        if self.mqtt_tls:
            e["KVS_MQTT_TLS_CA"] = str(self.tls_ca)
        if self.cluster_secret_file:
            e["KVS_CLUSTER_SECRET_FILE"] = str(self.cluster_secret_file)
        return e

    # -- the broker ----------------------------------------------------------
    def broker_files(self) -> dict[str, Path]:
        """Mosquitto setting -> the file it names (what the broker must be able to read)."""
        files: dict[str, Path] = {}
        if self.mqtt_tls:
            files.update(certfile=self.tls_cert, keyfile=self.tls_key, cafile=self.tls_ca)
        if self.mqtt_username:
            files.update(password_file=self.broker_passwd, acl_file=self.broker_acl)
        return files

    def broker_conf(self, files: Mapping[str, Path] | None = None) -> str:
        """Mosquitto settings (after the ``listener`` line); ``files`` replaces the paths
        of :meth:`broker_files` (the broker's private copies)."""
        paths = {**self.broker_files(), **dict(files or {})}
        lines = []
        if self.mqtt_tls:
            lines += [f"certfile {paths['certfile']}", f"keyfile {paths['keyfile']}",
                      f"cafile {paths['cafile']}", "tls_version tlsv1.2"]
        if self.mqtt_username:
            lines += ["allow_anonymous false", f"password_file {paths['password_file']}",
                      f"acl_file {paths['acl_file']}"]
        else:
            lines += ["allow_anonymous true"]
        return "\n".join(lines) + "\n"

    # -- clients -------------------------------------------------------------
    def token(self) -> str | None:
        return read_first_line(self.token_file, "admin token") if self.token_file else None

    def metadata(self) -> list[tuple[str, str]]:
        """Call metadata of the admin (the shell's token)."""
        return list(bearer(self.token()))

    def peer_metadata(self) -> list[tuple[str, str]]:
        """Call metadata of a peer (servers only; tests use it to play one)."""
        return list(bearer(read_first_line(self.peer_token_file, "peer token")
                           if self.peer_token_file else None))

    def channel(self, address: str, options: Sequence[tuple] = (), *, client_cert: bool = True):
        """A grpc channel to one server: TLS with our CA when gRPC TLS is on, and the
        shell's certificate under mutual TLS (``client_cert=False``: none, as a
        stranger would).  The token is *not* attached: pass ``metadata=self.metadata()``."""
        if not self.grpc_tls:
            return make_channel(address, options=options)
        mutual = self.mutual_tls and client_cert
        return make_channel(address, tls_ca=self.tls_ca, options=options,
                            cert=self.client_cert if mutual else None,
                            key=self.client_key if mutual else None)

    def client_env(self) -> dict[str, str]:
        """Environment for ``python -m kvs_shell`` / ``client.sh`` (file paths only;
        the client's own certificate, never a server key)."""
        e: dict[str, str] = {}
        if self.token_file:
            e["KVS_TOKEN_FILE"] = str(self.token_file)
        if self.grpc_tls:
            e["KVS_TLS_CA"] = str(self.tls_ca)
            if self.mutual_tls:
                e.update(KVS_CLIENT_CERT=str(self.client_cert), KVS_CLIENT_KEY=str(self.client_key))
        return e


def env_file_text(env: Mapping[str, str], header: str) -> str:
    """``export NAME='value'`` lines: sourceable by sh/bash, parseable by :func:`read_env_file`."""
    body = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())
    return "".join(f"# {line}\n" for line in header.splitlines()) + body


def read_env_file(path: Path | str) -> dict[str, str]:
    out = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):]
        name, eq, value = line.partition("=")
        if eq:
            parts = shlex.split(value)
            out[name.strip()] = parts[0] if parts else ""
    return out
