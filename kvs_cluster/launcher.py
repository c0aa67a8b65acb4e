"""Start and stop Mosquitto brokers and KVS server processes.

Used by the integration tests, the benchmark and ``python -m kvs_cluster``.
Everything listens on 127.0.0.1.  Nothing here sleeps to synchronise: every
wait polls a condition (port open, gRPC health SERVING, process exited) until a
deadline.

Processes started *attached* (the default, used by tests) are remembered in a
module-level registry and SIGKILLed at interpreter exit if they are still
running, so a crashed test run does not leave brokers or servers behind.
Processes started with ``detach=True`` get their own session and are not
registered: they outlive the launcher (``python -m kvs_cluster up``).
"""
from __future__ import annotations

import atexit
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

from kvs_common.channel import make_channel

from . import privdrop
from .tools import find_tool, mosquitto_binary  # noqa: F401 - part of this module's API

if TYPE_CHECKING:  # pragma: no cover - types only: security.py does not import this module
    from .security import Security

PROJECT_ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"

# The server reads KVS_* environment variables (KVS_MQTT_HOST, KVS_DATA_DIR, ...);
# they are scrubbed from the inherited environment so a developer's shell settings
# cannot leak into launched servers (pass ``env=`` to set them on purpose).

# ---------------------------------------------------------------------------
# process registry: kill whatever we started (attached) when Python exits
# ---------------------------------------------------------------------------
_live: dict[int, subprocess.Popen] = {}
_live_lock = threading.Lock()


def _register(proc: subprocess.Popen) -> None:
    with _live_lock:
        _live[proc.pid] = proc


def _unregister(proc: subprocess.Popen) -> None:
    with _live_lock:
        _live.pop(proc.pid, None)


@atexit.register
def _kill_leftovers() -> None:
    with _live_lock:
        procs = list(_live.values())
        _live.clear()
    for proc in procs:
        if proc.poll() is None:
            try:
                proc.kill()
                proc.wait(timeout=5)
            except Exception:  # pragma: no cover - best effort at exit
                pass


# ---------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------
def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago.

    Picked at random below the kernel's ephemeral range: a port the kernel hands out
    (bind to 0) can be taken, before the server binds it, by the next outgoing
    connection of any process (a client connecting to the broker, say)."""
    lo, _ = _ephemeral_range()
    for _ in range(100):
        port = random.randint(max(1024, lo - 12000), lo - 1) if lo > 2048 else 0
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
            return s.getsockname()[1]
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = HOST, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _poll_until(pred, timeout: float, interval: float = 0.02, max_interval: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
        interval = min(interval * 1.5, max_interval)


def _tail(path: Path | None, lines: int = 40) -> str:
    if path is None:
        return "(no log)"
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(log unreadable: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def _wait_or_kill(proc: subprocess.Popen, timeout: float) -> int | None:
    """Wait up to ``timeout`` for an exit, then SIGKILL. Returns the exit code."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    _unregister(proc)
    return proc.returncode


def _terminate(proc: subprocess.Popen, timeout: float) -> int | None:
    """SIGTERM, wait up to ``timeout``, then SIGKILL. Returns the exit code."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
    return _wait_or_kill(proc, timeout)


def _kill(proc: subprocess.Popen) -> int | None:
    if proc.poll() is None:
        try:
            proc.kill()
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)
    _unregister(proc)
    return proc.returncode


def open_private(path: Path, append: bool = True):
    """A log or config file only we can read (0600 whatever the umask): they name
    paths of secrets and, for logs, whatever a process prints."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "ab" if append else "wb")


def private_dir(path: Path) -> Path:
    """``path``, every directory created on the way 0700 (existing ones are left alone)."""
    missing = []
    p = Path(path)
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=0o700)
            d.chmod(0o700)   # whatever the umask
        except FileExistsError:
            pass
    return Path(path)


# ---------------------------------------------------------------------------
# Broker
# ---------------------------------------------------------------------------
class Broker:
    """A Mosquitto broker with its default settings, listening on 127.0.0.1:port."""

    def __init__(self, port: int, workdir: Path, extra_conf: str = "", detach: bool = False,
                 security: "Security | None" = None):
        self.port = port
        self.workdir = Path(workdir)
        self.extra_conf = extra_conf
        self.detach = detach
        self.security = security
        self.conf_path = self.workdir / f"mosquitto-{port}.conf"
        self.log_path = self.workdir / f"mosquitto-{port}.log"
        self.proc: subprocess.Popen | None = None
        self.user: str | None = None        # the account it runs as, when started by root
        self.files_dir: Path | None = None  # its private copies of our files (root only)

    @classmethod
    def start(cls, port: int | None = None, workdir: Path | str | None = None,
              extra_conf: str = "", timeout: float = 10.0, detach: bool = False,
              security: "Security | None" = None) -> "Broker":
        """``security``: opt-in password_file/acl_file and a TLS-only listener
        (see :class:`kvs_cluster.security.Security`); default: anonymous, plain.
        Started by root, the broker runs as an unprivileged account (see privdrop)."""
        if workdir is None:
            workdir = Path(tempfile.mkdtemp(prefix="kvs-broker-"))
        workdir = private_dir(Path(workdir))
        broker = cls(port or free_port(), workdir, extra_conf, detach=detach, security=security)
        broker._launch(timeout)
        return broker

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def _write_conf(self) -> None:
        # Only what is needed to listen locally; everything else (max_queued_messages
        # 1000, persistence false, ...) stays at Mosquitto's defaults.
        conf = f"listener {self.port} {HOST}\n"
        account = privdrop.broker_account()
        files: dict[str, Path] = {}
        privdrop.remove_copies(self.files_dir)
        self.files_dir = None
        if account is not None:
            self.user = account.pw_name
            conf += f"user {account.pw_name}\n"
            wanted = self.security.broker_files() if self.security else {}
            if wanted:
                self.files_dir, files = privdrop.private_copies(wanted, account)
        conf += self.security.broker_conf(files) if self.security else "allow_anonymous true\n"
        if self.extra_conf:
            conf += self.extra_conf.rstrip("\n") + "\n"
        with open_private(self.conf_path, append=False) as fh:
            fh.write(conf.encode())

    def _launch(self, timeout: float) -> None:
        self._write_conf()
        log = open_private(self.log_path)
        try:
            self.proc = subprocess.Popen(
                [mosquitto_binary(), "-c", str(self.conf_path)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.workdir, start_new_session=self.detach,
            )
        finally:
            log.close()
        if not self.detach:
            _register(self.proc)
        ok = _poll_until(lambda: self.proc.poll() is not None or port_open(self.port), timeout)
        if self.proc.poll() is not None or not ok:
            code = self.proc.poll()
            if code is None:
                _kill(self.proc)
            raise RuntimeError(
                f"mosquitto on port {self.port} did not come up (exit={code}):\n{_tail(self.log_path)}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        code = _terminate(self.proc, timeout)
        self._wait_port_closed()
        self._forget_copies()
        return code

    def kill(self) -> int | None:
        if self.proc is None:
            return None
        code = _kill(self.proc)
        self._wait_port_closed()
        self._forget_copies()
        return code

    def _forget_copies(self) -> None:
        if not self.detach:  # a detached broker's copies go with `kvs_cluster down`
            privdrop.remove_copies(self.files_dir)
            self.files_dir = None

    def _wait_port_closed(self, timeout: float = 5.0) -> None:
        _poll_until(lambda: not port_open(self.port), timeout)

    def restart(self, timeout: float = 10.0) -> "Broker":
        """Stop (if running) and start again on the same port (state is lost: persistence false)."""
        self.stop()
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._launch(max(1.0, deadline - time.monotonic()))
                return self
            except RuntimeError:
                # the port may linger briefly after a stop; retry until the deadline
                if time.monotonic() >= deadline:
                    raise

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def __repr__(self) -> str:
        return f"Broker(port={self.port}, pid={self.pid})"


# ---------------------------------------------------------------------------
# Server
# ---------------------------------------------------------------------------
class Server:
    """One ``python -m server`` process (gRPC on 127.0.0.1:port)."""

    def __init__(self, port: int, broker_port: int, data_dir: Path | None, node_id: str | None,
                 extra_args: Sequence[str], env: Mapping[str, str] | None, log_path: Path,
                 mqtt_host: str = HOST, detach: bool = False, python: str | None = None,
                 security: "Security | None" = None):
        self.security = security
        self.port = port
        self.broker_port = broker_port
        self.data_dir = Path(data_dir) if data_dir else None
        self.node_id = node_id
        self.extra_args = tuple(extra_args)
        self.env = dict(env or {})
        self.log_path = Path(log_path)
        self.mqtt_host = mqtt_host
        self.detach = detach
        self.python = python or sys.executable
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @classmethod
    def start(cls, port: int, broker_port: int, data_dir: Path | str | None = None,
              node_id: str | None = None, extra_args: Iterable[str] = (),
              env: Mapping[str, str] | None = None, log_path: Path | str | None = None,
              mqtt_host: str = HOST, detach: bool = False, python: str | None = None,
              security: "Security | None" = None) -> "Server":
        """``security``: opt-in TLS/token/broker credentials/HMAC flags (file paths only,
        see :class:`kvs_cluster.security.Security`); default: the plain course mode."""
        if log_path is None:
            base = Path(data_dir).parent if data_dir else Path(tempfile.mkdtemp(prefix="kvs-server-"))
            log_path = base / f"server-{port}.log"
        log_path = Path(log_path)
        private_dir(log_path.parent)
        if data_dir is not None:
            private_dir(Path(data_dir))
        server = cls(port, broker_port, Path(data_dir) if data_dir else None, node_id,
                     tuple(extra_args), env, log_path, mqtt_host=mqtt_host, detach=detach,
                     python=python, security=security)
        server._launch()
        return server

    # -- properties ---------------------------------------------------------
    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def command(self) -> list[str]:
        cmd = [self.python, "-m", "server", "--port", str(self.port), "--host", HOST,
               "--mqtt-host", self.mqtt_host, "--mqtt-port", str(self.broker_port)]
        if self.data_dir is not None:
            cmd += ["--data-dir", str(self.data_dir)]
        if self.node_id:
            cmd += ["--node-id", self.node_id]
        if self.security is not None:
            cmd += self.security.server_args()
        cmd += list(self.extra_args)
        return cmd

    # -- lifecycle ----------------------------------------------------------
    def _launch(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KVS_")}
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.env)
        log = open_private(self.log_path)
        try:
            self.starts += 1
            log.write(f"\n===== launcher: start #{self.starts}: {' '.join(self.command())}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.command(), cwd=PROJECT_ROOT, env=env,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=self.detach,
            )
        finally:
            log.close()
        if not self.detach:
            _register(self.proc)

    def wait_ready(self, timeout: float = 30.0) -> "Server":
        """Poll grpc.health.v1 until the overall status is SERVING.

        Raises RuntimeError (with the log tail) if the process exits or the
        deadline passes first."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout
        last = "no answer yet"
        interval = 0.05
        channel = (self.security.channel(self.address) if self.security is not None
                   else make_channel(self.address))
        with channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(
                        f"server {self.address} exited with {self.proc.returncode} before it was "
                        f"ready; log {self.log_path}:\n{_tail(self.log_path)}")
                try:
                    resp = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                    if resp.status == health_pb2.HealthCheckResponse.SERVING:
                        return self
                    last = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
                except grpc.RpcError as exc:
                    last = f"{exc.code().name}: {exc.details()}"
                if time.monotonic() >= deadline:
                    raise RuntimeError(
                        f"server {self.address} not SERVING after {timeout}s (last: {last}); "
                        f"log {self.log_path}:\n{_tail(self.log_path)}")
                time.sleep(interval)
                interval = min(interval * 1.5, 0.5)

    def stop(self, timeout: float = 15.0) -> int | None:
        """Graceful: SIGTERM, then SIGKILL if it has not exited by the deadline."""
        if self.proc is None:
            return None
        return _terminate(self.proc, timeout)

    def kill(self) -> int | None:
        if self.proc is None:
            return None
        return _kill(self.proc)

    def restart(self, timeout: float = 15.0) -> "Server":
        """Stop (if running) and start again with the same arguments and data dir."""
        self.stop(timeout)
        self._launch()
        return self

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)

    def __repr__(self) -> str:
        return f"Server({self.address}, pid={self.pid}, node_id={self.node_id})"


# ---------------------------------------------------------------------------
# Cluster
# ---------------------------------------------------------------------------
class Cluster:
    """A broker plus N servers; a context manager that kills everything it started.

    >>> with Cluster(n=3, workdir=tmp) as c:
    ...     c.wait_ready()
    ...     addresses = [s.address for s in c.servers]

    Plain (the course's mode) unless ``security=Security.ensure(dir, ...)`` is given;
    then use :meth:`channel` and :meth:`metadata` to call the servers.
    """

    def __init__(self, n: int = 3, workdir: Path | str | None = None, base_port: int | None = None,
                 persistent: bool = True, broker_port: int | None = None, extra_args: Sequence[str] = (),
                 env: Mapping[str, str] | None = None, broker_conf: str = "", start: bool = True,
                 security: "Security | None" = None):
        self.security = security
        self.n = n
        self.workdir = private_dir(Path(workdir) if workdir else
                                   Path(tempfile.mkdtemp(prefix="kvs-cluster-")))
        self.base_port = base_port
        self.persistent = persistent
        self.extra_args = tuple(extra_args)
        self.env = dict(env or {})
        self.broker_conf = broker_conf
        self.broker_port = broker_port
        self.broker: Broker | None = None
        self.servers: list[Server] = []
        self._all_servers: list[Server] = []
        if start:
            self.start()

    def start(self) -> "Cluster":
        try:
            self.broker = Broker.start(port=self.broker_port, workdir=self.workdir / "broker",
                                       extra_conf=self.broker_conf, security=self.security)
            for i in range(self.n):
                port = self.base_port + i if self.base_port else None
                self.add_server(port=port)
        except BaseException:
            self.kill_all()
            raise
        return self

    def add_server(self, port: int | None = None, node_id: str | None = None,
                   extra_args: Sequence[str] = (), persistent: bool | None = None) -> Server:
        """Start one more server on this cluster's broker (not waited for: call wait_ready)."""
        assert self.broker is not None, "cluster not started"
        port = port or free_port()
        persistent = self.persistent if persistent is None else persistent
        node_dir = self.workdir / f"node-{port}"
        server = Server.start(
            port, self.broker.port,
            data_dir=(node_dir / "data") if persistent else None,
            node_id=node_id, extra_args=self.extra_args + tuple(extra_args),
            env=self.env, log_path=node_dir / "server.log", security=self.security)
        self.servers.append(server)
        self._all_servers.append(server)
        return server

    @property
    def addresses(self) -> list[str]:
        return [s.address for s in self.servers]

    def channel(self, address: str, options=()):
        """A grpc channel to ``address`` (TLS with the cluster's CA when it uses TLS)."""
        if self.security is not None:
            return self.security.channel(address, options)
        return make_channel(address, options=options)

    def metadata(self) -> list[tuple[str, str]]:
        """Call metadata carrying the client token (empty when tokens are off)."""
        return self.security.metadata() if self.security is not None else []

    def wait_ready(self, timeout: float = 30.0) -> "Cluster":
        deadline = time.monotonic() + timeout
        for server in self.servers:
            server.wait_ready(max(1.0, deadline - time.monotonic()))
        return self

    def stop(self, timeout: float = 15.0) -> dict[str, int | None]:
        """Graceful stop of every server (SIGTERM) then the broker; returns exit codes."""
        codes: dict[str, int | None] = {}
        # signal everybody first so the shutdowns overlap, then wait
        for s in self._all_servers:
            if s.alive():
                try:
                    s.proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for s in self._all_servers:
            codes[s.address] = _wait_or_kill(s.proc, timeout) if s.proc is not None else None
        if self.broker is not None:
            codes["broker"] = self.broker.stop()
        return codes

    def kill_all(self) -> None:
        for s in self._all_servers:
            try:
                s.kill()
            except Exception:
                pass
        if self.broker is not None:
            try:
                self.broker.kill()
            except Exception:
                pass

    def logs(self, lines: int = 60) -> str:
        parts = []
        for s in self._all_servers:
            parts.append(f"----- {s.address} (pid {s.pid}, exit {s.returncode}) {s.log_path}\n"
                         f"{s.log_tail(lines)}")
        if self.broker is not None:
            parts.append(f"----- broker {self.broker.port}\n{_tail(self.broker.log_path, lines)}")
        return "\n".join(parts)

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.stop()
        finally:
            self.kill_all()   # no-op for processes that already exited
