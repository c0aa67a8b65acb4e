"""Secrets, certificates and broker auth files for a local KVS cluster (opt-in).

:meth:`Security.ensure` creates, once, everything a secure local cluster needs
under one directory and reuses it on later calls (idempotent)::

    <dir>/secrets/          (0700)
        cluster.secret      HMAC key for every broker message     (0600)
        client.token        bearer token clients must send        (0600)
        mqtt-kvs-server.password   the broker password of the servers (0600)
    <dir>/broker/
        passwd              Mosquitto password_file (hashed by mosquitto_passwd -U)
        acl                 Mosquitto acl_file: only kvs-server may use kvs/#
    <dir>/tls/              (0700) made by tools/gen_certs.sh
        ca.pem ca.key server.pem server.key

Secrets are generated with :mod:`secrets`, written with mode 0600 and only ever
passed to processes as *file paths* (never on a command line, never logged).
Each piece can be switched off separately (tests use token-only clusters etc.).
"""
from __future__ import annotations

import os
import secrets
import shlex
import subprocess
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Mapping, Sequence

from .launcher import find_tool

PROJECT_ROOT = Path(__file__).resolve().parent.parent
GEN_CERTS = PROJECT_ROOT / "tools" / "gen_certs.sh"
MQTT_USER = "kvs-server"


def write_secret_file(path: Path, text: str) -> None:
    """Create ``path`` with mode 0600 (never briefly world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _secret_file(path: Path, nbytes: int = 32) -> Path:
    """Reuse the secret in ``path`` (tightening its mode), or generate one."""
    if path.exists() and path.read_text(encoding="utf-8").strip():
        os.chmod(path, 0o600)
        return path
    write_secret_file(path, secrets.token_urlsafe(nbytes) + "\n")
    return path


def _private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def read_first_line(path: Path | str) -> str:
    return Path(path).read_text(encoding="utf-8").strip().splitlines()[0].strip()


def mosquitto_passwd_binary() -> str:
    return find_tool("mosquitto_passwd", "/usr/bin/mosquitto_passwd")


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
    """tools/gen_certs.sh DIR (idempotent): CA + server cert for 127.0.0.1/localhost."""
    proc = subprocess.run(["bash", str(GEN_CERTS), str(tls_dir)], stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"tools/gen_certs.sh failed ({proc.returncode}): {proc.stderr.strip()}")


@dataclass(frozen=True)
class Security:
    """What a secured local cluster uses; every path is absolute, every piece optional.

    ``None`` for a piece means that piece is off (e.g. ``token_file=None``: clients
    need no token)."""
    dir: Path
    token_file: Path | None = None          # clients' bearer token (servers: --token-file)
    cluster_secret_file: Path | None = None  # HMAC of broker messages (--cluster-secret-file)
    mqtt_username: str | None = None        # servers' broker user (--mqtt-username)
    mqtt_password_file: Path | None = None  # its plain password (--mqtt-password-file)
    broker_passwd: Path | None = None       # Mosquitto password_file (hashed)
    broker_acl: Path | None = None          # Mosquitto acl_file
    tls_ca: Path | None = None              # CA of every certificate below
    tls_cert: Path | None = None            # certificate of servers and of the broker listener
    tls_key: Path | None = None
    grpc_tls: bool = False                  # gRPC servers listen with TLS
    mqtt_tls: bool = False                  # the broker listens with TLS only
    mutual_tls: bool = False                # gRPC clients must present a certificate

    # -- creation ------------------------------------------------------------
    @classmethod
    def ensure(cls, directory: Path | str, *, tls: bool = True, grpc_tls: bool | None = None,
               mqtt_tls: bool | None = None, mutual_tls: bool = False, token: bool = True,
               hmac: bool = True, broker_auth: bool = True,
               extra_broker_users: Mapping[str, str] | None = None) -> "Security":
        """Create (first call) or reuse (later calls) the secrets under ``directory``.

        ``tls`` is the default for ``grpc_tls`` and ``mqtt_tls``.  ``extra_broker_users``
        (name -> password) adds broker accounts that the ACL gives no topic at all
        (tests use one to show that credentials alone do not allow publishing)."""
        d = Path(directory).resolve()
        d.mkdir(parents=True, exist_ok=True)
        grpc_tls = tls if grpc_tls is None else grpc_tls
        mqtt_tls = tls if mqtt_tls is None else mqtt_tls
        sec_dir = _private_dir(d / "secrets")
        kw: dict = {"dir": d, "grpc_tls": grpc_tls, "mqtt_tls": mqtt_tls,
                    "mutual_tls": bool(mutual_tls and grpc_tls)}
        if token:
            kw["token_file"] = _secret_file(sec_dir / "client.token")
        if hmac:
            kw["cluster_secret_file"] = _secret_file(sec_dir / "cluster.secret")
        if broker_auth:
            pw_file = _secret_file(sec_dir / f"mqtt-{MQTT_USER}.password")
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
                      tls_key=tls_dir / "server.key")
        return cls(**kw)

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
            on.append("gRPC TLS" + (" (mutual)" if self.mutual_tls else ""))
        if self.token_file:
            on.append("client token")
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
        if self.token_file:
            a += ["--token-file", str(self.token_file)]
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
        if self.token_file:
            e["KVS_TOKEN_FILE"] = str(self.token_file)
        if self.mqtt_username:
            e.update(KVS_MQTT_USERNAME=self.mqtt_username,
                     KVS_MQTT_PASSWORD_FILE=str(self.mqtt_password_file))
        if self.mqtt_tls:
            e["KVS_MQTT_TLS_CA"] = str(self.tls_ca)
        if self.cluster_secret_file:
            e["KVS_CLUSTER_SECRET_FILE"] = str(self.cluster_secret_file)
        return e

    # -- the broker ----------------------------------------------------------
    def broker_conf(self) -> str:
        """Mosquitto settings (after the ``listener`` line) for this security."""
        lines = []
        if self.mqtt_tls:
            lines += [f"certfile {self.tls_cert}", f"keyfile {self.tls_key}",
                      f"cafile {self.tls_ca}", "tls_version tlsv1.2"]
        if self.mqtt_username:
            lines += ["allow_anonymous false", f"password_file {self.broker_passwd}",
                      f"acl_file {self.broker_acl}"]
        else:
            lines += ["allow_anonymous true"]
        if os.geteuid() == 0 and (self.mqtt_tls or self.mqtt_username):
            # Started as root, Mosquitto switches to user "mosquitto" *before* reading
            # password_file/acl_file/keys, which are 0600 files of ours: stay who we are.
            lines.append("user root")
        return "\n".join(lines) + "\n"

    # -- clients -------------------------------------------------------------
    def token(self) -> str | None:
        return read_first_line(self.token_file) if self.token_file else None

    def metadata(self) -> list[tuple[str, str]]:
        t = self.token()
        return [("authorization", f"Bearer {t}")] if t else []

    def channel(self, address: str, options: Sequence[tuple] = ()):
        """A grpc channel to one server (TLS with our CA when gRPC TLS is on).  The
        token is *not* attached: pass ``metadata=self.metadata()`` per call."""
        import grpc
        opts = list(options) + [("grpc.enable_http_proxy", 0)]
        if not self.grpc_tls:
            return grpc.insecure_channel(address, options=opts)
        creds = grpc.ssl_channel_credentials(
            root_certificates=Path(self.tls_ca).read_bytes(),
            private_key=Path(self.tls_key).read_bytes() if self.mutual_tls else None,
            certificate_chain=Path(self.tls_cert).read_bytes() if self.mutual_tls else None)
        return grpc.secure_channel(address, creds, options=opts)

    def client_env(self) -> dict[str, str]:
        """Environment for ``python -m kvs_shell`` / ``client.sh`` (file paths only)."""
        e: dict[str, str] = {}
        if self.token_file:
            e["KVS_TOKEN_FILE"] = str(self.token_file)
        if self.grpc_tls:
            e["KVS_TLS_CA"] = str(self.tls_ca)
            if self.mutual_tls:
                e.update(KVS_CLIENT_CERT=str(self.tls_cert), KVS_CLIENT_KEY=str(self.tls_key))
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
