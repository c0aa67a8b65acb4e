"""Local cluster control:  python -m kvs_cluster {up,down,status}

    up      start a Mosquitto broker (unless --broker-port points at a running one)
            and KVS servers, detached (they keep running after this command exits);
            pid files, logs and data go under --dir (default ./run).
            Secure by default: on first start it generates (mode 0600, under --dir)
            the shell's token and client certificate (users in auth.json, role
            admin), a peer token for the servers, a cluster secret (HMAC of every
            broker message), the servers' broker password (password_file +
            acl_file) and a CA + server certificate (TLS for gRPC, mutual: clients
            need a certificate of the CA, and TLS for the broker), and writes
            --dir/client.env for clients (`. run/client.env` sets KVS_TOKEN_FILE,
            KVS_TLS_CA, KVS_CLIENT_CERT/KEY, KVS_SHELL_SERVERS).
            --no-mutual-tls: clients need no certificate.  --no-tls: everything
            but TLS.  --insecure (or KVS_INSECURE=1, exactly): the course's plain
            mode (anonymous broker, no credentials, no TLS, unsigned messages).
    status  show what runs (pids, and each server's KVSExt.Status)
    down    stop the servers (SIGTERM, SIGKILL after a deadline), then the broker if
            `up` started it
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from kvs_common.wire import CLIENT_ENV_VARS

from . import privdrop
from .launcher import HOST, PROJECT_ROOT, Broker, Server, free_port, port_open
from .security import Security, env_file_text

STATE_FILE = "cluster.json"
CLIENT_ENV = "client.env"
SERVER_ENV = "server.env"
INSECURE_ENV = "KVS_INSECURE"


def insecure_requested(environ=os.environ) -> bool:
    """KVS_INSECURE turns security off only when it is exactly "1": a typo, "0",
    "false" or "no" must not silently open the cluster."""
    return environ.get(INSECURE_ENV, "") == "1"


# ---------------------------------------------------------------------------
# pid helpers (the processes are not our children once `up` has exited)
# ---------------------------------------------------------------------------
def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int | None, must_contain: str) -> bool:
    """True if ``pid`` runs and its command line contains ``must_contain`` (guards against pid reuse)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    stat = ""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        pass
    if stat and stat.rsplit(")", 1)[-1].split()[0] == "Z":   # zombie
        return False
    return must_contain in _cmdline(pid)


def _stop_pid(pid: int, must_contain: str, timeout: float) -> str:
    if not _alive(pid, must_contain):
        return "not running"
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return "not running"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid, must_contain):
            return "stopped"
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return "stopped"
    return "killed (did not stop within %.0fs)" % timeout


def _load_state(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None


def _write_pid(path: Path, pid: int) -> None:
    path.write_text(f"{pid}\n")


def _venv_python() -> str:
    venv = PROJECT_ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


# ---------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------
def cmd_up(args: argparse.Namespace) -> int:
    run_dir = Path(args.dir).resolve()
    run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    run_dir.chmod(0o700)   # logs, data and secrets: nobody else's business
    state = _load_state(run_dir)
    if state:
        running = [s["port"] for s in state.get("servers", []) if _alive(s.get("pid"), "server")]
        if running:
            print(f"a cluster from {run_dir} is already running (servers {running}); "
                  f"run `python -m kvs_cluster down --dir {args.dir}` first", file=sys.stderr)
            return 1

    try:
        ports = [int(p) for p in args.servers.split(",") if p.strip()]
    except ValueError:
        print(f"--servers: expected a comma-separated list of ports, got {args.servers!r}", file=sys.stderr)
        return 2
    busy = [p for p in ports if port_open(p)]
    if busy:
        print(f"port(s) already in use: {busy}", file=sys.stderr)
        return 1

    state = {"dir": str(run_dir), "broker": None, "servers": [], "security": None}
    started_broker: Broker | None = None
    external = bool(args.broker_port and port_open(args.broker_port, args.mqtt_host))
    if not external and args.broker_port and args.mqtt_host not in (HOST, "localhost"):
        print(f"no broker reachable at {args.mqtt_host}:{args.broker_port}", file=sys.stderr)
        return 1
    security: Security | None = None
    if not args.insecure:
        try:
            # An external broker has its own accounts and listener: we can only
            # secure what we run (gRPC TLS, client token, signed messages).
            security = Security.ensure(run_dir, tls=not args.no_tls,
                                       mqtt_tls=False if external else None,
                                       mutual_tls=not args.no_mutual_tls,
                                       broker_auth=not external)
        except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as exc:
            print(f"cannot set up security under {run_dir}: {exc}\n"
                  f"(use --insecure for the plain mode)", file=sys.stderr)
            return 1
        state["security"] = security.to_json()
    if external:
        state["broker"] = {"host": args.mqtt_host, "port": args.broker_port, "pid": None, "owned": False}
        broker_host, broker_port = args.mqtt_host, args.broker_port
        print(f"using the broker already running at {args.mqtt_host}:{args.broker_port}"
              + (" (its accounts/ACL/TLS are not managed here)" if security else ""))
    else:
        port = args.broker_port or free_port()
        # Tuning, not correctness: without TCP_NODELAY Mosquitto's small sends wait
        # on delayed ACKs (~40 ms per replicated write); KVS is correct either way.
        started_broker = Broker.start(port=port, workdir=run_dir / "broker", detach=True,
                                      security=security, extra_conf="set_tcp_nodelay true")
        _write_pid(run_dir / "broker.pid", started_broker.pid)
        state["broker"] = {"host": HOST, "port": port, "pid": started_broker.pid, "owned": True,
                           "log": str(started_broker.log_path), "conf": str(started_broker.conf_path),
                           "user": started_broker.user,
                           "files_dir": str(started_broker.files_dir) if started_broker.files_dir else None}
        broker_host, broker_port = HOST, port

    servers: list[Server] = []
    python = _venv_python()
    for port in ports:
        node_dir = run_dir / f"node-{port}"
        data_dir = None if args.no_persist else node_dir / "data"
        srv = Server.start(port, broker_port, data_dir=data_dir, extra_args=args.server_args,
                           log_path=node_dir / "server.log", mqtt_host=broker_host, detach=True,
                           python=python, security=security)
        servers.append(srv)
        _write_pid(run_dir / f"server-{port}.pid", srv.pid)
        state["servers"].append({"port": port, "address": srv.address, "pid": srv.pid,
                                 "log": str(srv.log_path),
                                 "data_dir": str(data_dir) if data_dir else None})
    (run_dir / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    _write_env_files(run_dir, security, [s.address for s in servers], broker_host, broker_port)

    if not args.no_wait:
        deadline = time.monotonic() + args.timeout
        for srv in servers:
            try:
                srv.wait_ready(max(1.0, deadline - time.monotonic()))
            except RuntimeError as exc:
                print(f"error: {exc}", file=sys.stderr)
                print("stopping what was started ...", file=sys.stderr)
                cmd_down(argparse.Namespace(dir=args.dir, timeout=10.0), quiet=True)
                return 1

    b = state["broker"]
    print(f"broker   {b['host']}:{b['port']}" + (f"  (pid {b['pid']}, log {b['log']}"
                                                   + (f", runs as {b['user']}" if b.get("user") else "")
                                                   + ")" if b["owned"] else ""))
    for s in state["servers"]:
        print(f"server   {s['address']}  (pid {s['pid']}, log {s['log']}"
              + (f", data {s['data_dir']})" if s["data_dir"] else ", in-memory only)"))
    print(f"state    {run_dir / STATE_FILE}")
    if security:
        print(f"security {', '.join(security.enabled)}; secrets under {run_dir} (mode 0600)")
    else:
        print("security OFF (--insecure): anonymous broker, no credentials, no TLS, unsigned messages")
    print(f"clients: . {run_dir / CLIENT_ENV} && .venv/bin/python -m kvs_shell")
    print(f"more servers: (set -a; . {run_dir / SERVER_ENV}; ./server.sh PORT)")
    print(f"stop:    .venv/bin/python -m kvs_cluster down --dir {args.dir}")
    return 0


def _write_env_files(run_dir: Path, security: Security | None, addresses: list[str],
                     broker_host: str, broker_port: int) -> None:
    """client.env: what kvs_shell / client.sh need; server.env: what one more
    ./server.sh needs.  Both hold file paths only (the secrets stay in their 0600 files)."""
    client = {"KVS_SHELL_SERVERS": ",".join(addresses)}
    server = {"KVS_MQTT_HOST": broker_host, "KVS_MQTT_PORT": str(broker_port)}
    if security:
        client.update(security.client_env())
        server.update(security.server_env())
    unset = [v for v in CLIENT_ENV_VARS if v not in client]
    text = env_file_text(client, "KVS client settings for the cluster in this directory "
                                 "(written by `python -m kvs_cluster up`).\n"
                                 "Use:  . ./client.env   (sh/bash), then run kvs_shell or client.sh")
    if unset:
        text += f"unset {' '.join(unset)}\n"
    (run_dir / CLIENT_ENV).write_text(text)   # paths only; 0600 under the launcher's umask
    (run_dir / SERVER_ENV).write_text(env_file_text(
        server, "KVS server settings for one more server of this cluster.\n"
                "Use:  (set -a; . ./server.env; ./server.sh PORT)"))


def cmd_status(args: argparse.Namespace) -> int:
    run_dir = Path(args.dir).resolve()
    state = _load_state(run_dir)
    if not state:
        print(f"no cluster recorded under {run_dir}")
        return 1
    b = state["broker"]
    if b["owned"]:
        up = _alive(b["pid"], "mosquitto")
        print(f"broker   {b['host']}:{b['port']}  pid {b['pid']}  {'running' if up else 'NOT running'}")
    else:
        up = port_open(b["port"], b["host"])
        print(f"broker   {b['host']}:{b['port']}  (external)  {'reachable' if up else 'NOT reachable'}")
    any_up = False
    for s in state["servers"]:
        alive = _alive(s["pid"], "server")
        any_up |= alive
        line = f"server   {s['address']}  pid {s['pid']}  {'running' if alive else 'NOT running'}"
        if alive:
            line += "  " + _status_line(s["address"], Security.from_json(state.get("security")))
        print(line)
    return 0 if any_up else 3


def _status_line(address: str, security: Security | None = None) -> str:
    if str(PROJECT_ROOT) not in sys.path:
        sys.path.insert(0, str(PROJECT_ROOT))
    try:
        import grpc

        from kvs_common.channel import make_channel
        from kvs_common.status import fetch_status
    except ImportError as exc:  # stubs not generated
        return f"(no status: {exc})"
    try:
        with (security.channel(address) if security else make_channel(address)) as ch:
            st = fetch_status(ch, security.metadata() if security else None, timeout=2.0)
        return status_text(st)
    except grpc.RpcError as exc:
        return f"(status: {exc.code().name} {exc.details()})"
    except (OSError, ValueError) as exc:  # a secret / CA file went missing or is exposed
        return f"(status: {exc})"


def status_text(st) -> str:
    """One line of a NodeStatus message; Raft servers show role/term/commit/applied."""
    if st.role:
        position = (f"role={st.role} term={st.term} commit={st.commit_index} "
                    f"applied={st.applied_index}")
    else:
        position = f"applied_seq={st.applied_seq}"
    return (f"node={st.node_id} {position} state={st.state} leader={st.leader or '-'} "
            f"keys={st.keys} broker={'up' if st.broker_connected else 'down'}")


def cmd_down(args: argparse.Namespace, quiet: bool = False) -> int:
    run_dir = Path(args.dir).resolve()
    state = _load_state(run_dir)
    if not state:
        if not quiet:
            print(f"no cluster recorded under {run_dir}")
        return 0
    for s in state["servers"]:
        result = _stop_pid(s["pid"], "server", args.timeout)
        if not quiet:
            print(f"server   {s['address']}  pid {s['pid']}: {result}")
        (run_dir / f"server-{s['port']}.pid").unlink(missing_ok=True)
    b = state["broker"]
    if b and b.get("owned"):
        result = _stop_pid(b["pid"], "mosquitto", args.timeout)
        if not quiet:
            print(f"broker   {b['host']}:{b['port']}  pid {b['pid']}: {result}")
        (run_dir / "broker.pid").unlink(missing_ok=True)
        privdrop.remove_copies(b.get("files_dir"))
    (run_dir / STATE_FILE).unlink(missing_ok=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvs_cluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start a broker and servers (detached)")
    up.add_argument("--servers", default="9000,9001,9002", help="gRPC ports, comma-separated")
    up.add_argument("--broker-port", type=int, default=None,
                    help="use the broker on this port if one answers there, else start one on it "
                         "(default: start one on a free port)")
    up.add_argument("--mqtt-host", default=HOST, help="host of an existing broker (with --broker-port)")
    up.add_argument("--dir", default="./run", help="pid files, logs and data (default ./run)")
    up.add_argument("--no-persist", action="store_true", help="servers without a data directory")
    up.add_argument("--no-wait", action="store_true", help="do not wait for the servers to be SERVING")
    up.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for readiness")
    up.add_argument("--insecure", action="store_true", default=insecure_requested(),
                    help="the course's plain mode: anonymous broker, no client credentials, no "
                         "TLS, unsigned broker messages (default: on only if KVS_INSECURE=1)")
    up.add_argument("--no-mutual-tls", action="store_true",
                    help="gRPC clients need no certificate (a token is enough)")
    up.add_argument("--no-tls", action="store_true",
                    help="secure mode without TLS (token, broker password/ACL, signed messages)")
    up.add_argument("server_args", nargs=argparse.REMAINDER,
                    help="after `--`: extra flags for every server")

    st = sub.add_parser("status", help="show what runs")
    st.add_argument("--dir", default="./run")

    down = sub.add_parser("down", help="stop what `up` started")
    down.add_argument("--dir", default="./run")
    down.add_argument("--timeout", type=float, default=15.0)

    args = parser.parse_args(argv)
    os.umask(0o077)  # everything this launcher and its processes create is ours alone
    if args.command == "up":
        if args.server_args and args.server_args[0] == "--":
            args.server_args = args.server_args[1:]
        return cmd_up(args)
    if args.command == "status":
        return cmd_status(args)
    return cmd_down(args)


if __name__ == "__main__":
    sys.exit(main())
