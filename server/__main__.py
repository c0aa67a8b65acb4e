"""`python -m server --port P ...`: flags and env, logging, graceful shutdown."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from kvs_common import wire
from kvs_proto import kvs_pb2_grpc

from kvs_common.secretfile import read_secret

from .auth import Authority, Policy
from .node import Node, NodeConfig
from .peers import PeerClients
from .security import server_credentials
from .service import KVSExtServicer, KVSServicer, ReplicaServicer, add_ext_servicer
from .transport import BrokerConfig

DEFAULT_MAX_MESSAGE = wire.DEFAULT_MAX_MESSAGE
# Bounds (docs/security.md): each in-flight RPC may hold a --max-message request.
DEFAULT_MAX_RPCS = 256
DEFAULT_MAX_STREAMS = 128          # per connection
DEFAULT_IDLE_S = 300               # a connection without calls is closed after this
DEFAULT_AGE_S = 3600               # every connection is closed (GOAWAY) after this ...
DEFAULT_AGE_GRACE_S = 300          # ... once its calls ended or after this much more
DEFAULT_HANDSHAKE_S = 5            # TLS handshake + HTTP/2 preface must finish within this


def _nonneg(text: str) -> int:
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {n}")
    return n


def _positive(text: str) -> int:
    n = int(text)
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, not {n}")
    return n


def _opt_int(text: str | None) -> int | None:
    return None if text in (None, "") else _nonneg(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="python -m server", description="KVS server")
    p.add_argument("--port", type=int, required=True, help="gRPC port")
    p.add_argument("--host", default=env("KVS_HOST", "127.0.0.1"), help="gRPC listen address")
    p.add_argument("--advertise", default=env("KVS_ADVERTISE"),
                   help="host:port peers use to reach this server (default HOST:PORT)")
    p.add_argument("--mqtt-host", default=env("KVS_MQTT_HOST", "localhost"))
    p.add_argument("--mqtt-port", type=int, default=int(env("KVS_MQTT_PORT", "1883")))
    p.add_argument("--data-dir", default=env("KVS_DATA_DIR"),
                   help="durable log + snapshots; in-memory only when unset")
    p.add_argument("--node-id", default=env("KVS_NODE_ID"), help="default: node-PORT")
    p.add_argument("--cluster", default=env("KVS_CLUSTER", "kvs"), help="MQTT topic namespace")
    p.add_argument("--max-message", type=int,
                   default=int(env("KVS_MAX_MESSAGE", str(DEFAULT_MAX_MESSAGE))),
                   help="largest gRPC request in bytes (default 4 MiB)")
    p.add_argument("--write-timeout", type=float, default=float(env("KVS_WRITE_TIMEOUT", "10")))
    p.add_argument("--no-fsync", action="store_true", help="skip fsync (benchmarks only)")
    p.add_argument("--max-key-len", type=int, default=int(env("KVS_MAX_KEY_LEN", "4096")),
                   help="longest key in characters (default 4096)")
    p.add_argument("--max-value-len", type=int,
                   default=int(env("KVS_MAX_VALUE_LEN", str(3 * 1024 * 1024))),
                   help="longest value in characters (default 3 Mi; the message limit applies too)")
    sec = p.add_argument_group("security (secrets only from files or the environment)")
    sec.add_argument("--tls-cert", default=env("KVS_TLS_CERT"), help="gRPC server certificate (PEM)")
    sec.add_argument("--tls-key", default=env("KVS_TLS_KEY"), help="gRPC server private key (PEM)")
    sec.add_argument("--tls-client-ca", default=env("KVS_TLS_CLIENT_CA"),
                     help="require client certificates signed by this CA (mutual TLS)")
    sec.add_argument("--tls-ca", default=env("KVS_TLS_CA"),
                     help="CA that signed the peers' certificates (server-to-server repair)")
    sec.add_argument("--token-file", default=env("KVS_TOKEN_FILE"),
                     help="clients must send this bearer token (else $KVS_TOKEN; none: open)")
    sec.add_argument("--peer-token-file", default=env("KVS_PEER_TOKEN_FILE"),
                     help="servers present this token to each other; only it may call Replica")
    sec.add_argument("--auth-file", default=env("KVS_AUTH_FILE"),
                     help="users and roles (JSON, mode 0600); reloaded on SIGHUP")
    sec.add_argument("--mqtt-username", default=env("KVS_MQTT_USERNAME"))
    sec.add_argument("--mqtt-password-file", default=env("KVS_MQTT_PASSWORD_FILE"),
                     help="broker password (else $KVS_MQTT_PASSWORD)")
    sec.add_argument("--mqtt-tls-ca", default=env("KVS_MQTT_TLS_CA"),
                     help="CA of the broker's TLS listener: enables TLS to the broker")
    sec.add_argument("--cluster-secret-file", default=env("KVS_CLUSTER_SECRET_FILE"),
                     help="shared secret: every broker message carries an HMAC "
                          "(else $KVS_CLUSTER_SECRET; none: unsigned)")
    ret = p.add_argument_group("retention and watch")
    ret.add_argument("--keep-versions", type=_nonneg, default=_opt_int(env("KVS_KEEP_VERSIONS")),
                     help="live versions kept per key (0: all); a leader proposes it to the "
                          "cluster when the cluster's policy differs (default: leave it)")
    ret.add_argument("--watch-buffer-bytes", type=_positive,
                     default=int(env("KVS_WATCH_BUFFER_BYTES", str(8 << 20))),
                     help="a watcher's queue; a watcher that falls further behind is cancelled"
                          " (RESOURCE_EXHAUSTED) and resumes")
    ret.add_argument("--watch-history", type=_positive,
                     default=int(env("KVS_WATCH_HISTORY", "100000")),
                     help="recent changes kept in memory for watchers that resume (at most"
                          " 64 MiB of them); an older start position is 'compacted'")
    ret.add_argument("--snapshot-every", type=_positive,
                     default=int(env("KVS_SNAPSHOT_EVERY", "50000")),
                     help="applied changes between snapshots (and log compactions)")
    ret.add_argument("--log-keep-entries", type=_nonneg,
                     default=int(env("KVS_LOG_KEEP_ENTRIES", "5000")),
                     help="entries kept behind a log compaction for slow followers, at most"
                          " 64 MiB of them (a follower further behind takes a state transfer)")
    lim = p.add_argument_group("bounds")
    lim.add_argument("--max-concurrent-rpcs", type=int,
                     default=int(env("KVS_MAX_CONCURRENT_RPCS", str(DEFAULT_MAX_RPCS))),
                     help=f"calls in progress at once; more get RESOURCE_EXHAUSTED "
                          f"(default {DEFAULT_MAX_RPCS})")
    lim.add_argument("--max-streams-per-connection", type=int,
                     default=int(env("KVS_MAX_STREAMS", str(DEFAULT_MAX_STREAMS))),
                     help=f"HTTP/2 streams per connection (default {DEFAULT_MAX_STREAMS})")
    lim.add_argument("--max-connection-idle", type=float,
                     default=float(env("KVS_MAX_CONNECTION_IDLE", str(DEFAULT_IDLE_S))),
                     help=f"seconds a connection without calls stays open (default {DEFAULT_IDLE_S})")
    lim.add_argument("--max-connection-age", type=float,
                     default=float(env("KVS_MAX_CONNECTION_AGE", str(DEFAULT_AGE_S))),
                     help=f"seconds before a connection must reconnect (default {DEFAULT_AGE_S}; "
                          f"its calls get {DEFAULT_AGE_GRACE_S} s more)")
    lim.add_argument("--handshake-timeout", type=float,
                     default=float(env("KVS_HANDSHAKE_TIMEOUT", str(DEFAULT_HANDSHAKE_S))),
                     help=f"seconds for a new connection's TLS handshake and HTTP/2 preface "
                          f"(default {DEFAULT_HANDSHAKE_S})")
    lim.add_argument("--bdp-probe", action="store_true",
                     default=env("KVS_BDP_PROBE", "") == "1",
                     help="let HTTP/2 windows grow (faster large transfers over long links, but "
                          "strangers' requests then cost up to their size in memory before the "
                          "credential is checked); default off: 64 KiB per stream")
    p.add_argument("--log-level", default=env("KVS_LOG_LEVEL", "INFO"))
    a = p.parse_args(argv)
    a.node_id = a.node_id or f"node-{a.port}"
    a.advertise = a.advertise or f"{'127.0.0.1' if a.host in ('0.0.0.0', '::') else a.host}:{a.port}"
    return a


def main(argv: list[str] | None = None) -> int:
    # Data, snapshots and anything else this process creates: owner only.
    os.umask(0o077)
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s [{args.node_id}] %(name)s: %(message)s")
    try:
        return asyncio.run(serve(args))
    except KeyboardInterrupt:
        return 0


async def serve(args: argparse.Namespace) -> int:
    log = logging.getLogger("server")
    loop = asyncio.get_running_loop()

    datadir = None
    if args.data_dir:
        from .persistence import DataDir
        datadir = DataDir(Path(args.data_dir), fsync=not args.no_fsync)

    health_servicer = health.aio.HealthServicer()
    await health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)

    def on_state(state: str) -> None:  # on the loop
        serving = state in ("in-step", "no-quorum")
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        loop.create_task(health_servicer.set("", status))

    try:
        token = read_secret(args.token_file, "KVS_TOKEN", what="client token")
        peer_token = read_secret(args.peer_token_file, "KVS_PEER_TOKEN", what="peer token")
        mqtt_password = read_secret(args.mqtt_password_file, "KVS_MQTT_PASSWORD",
                                    what="broker password")
        cluster_secret = read_secret(args.cluster_secret_file, "KVS_CLUSTER_SECRET",
                                     what="cluster secret")
        auth_sources = (args.auth_file, token, peer_token)
        auth = Authority(Policy.build(*auth_sources) if any(auth_sources) else None,
                         *auth_sources)
    except (OSError, ValueError) as e:
        log.error("cannot read a secret: %s", e)
        return 2
    if token and peer_token and token == peer_token:
        log.error("the client token and the peer token must differ")
        return 2
    if auth.enabled and not (peer_token or token):
        log.warning("no --peer-token-file: peers cannot fetch state from this server")
    cfg = NodeConfig(node_id=args.node_id, address=args.advertise, cluster=args.cluster,
                     write_timeout=args.write_timeout, keep_versions=args.keep_versions,
                     watch_buffer_bytes=args.watch_buffer_bytes,
                     watch_history=args.watch_history, snapshot_every=args.snapshot_every,
                     keep_entries=args.log_keep_entries)
    broker = BrokerConfig(host=args.mqtt_host, port=args.mqtt_port, username=args.mqtt_username,
                          password=mqtt_password, tls_ca=args.mqtt_tls_ca,
                          secret=cluster_secret.encode() if cluster_secret else None)
    # With mutual TLS a server presents its own certificate to its peers.
    mutual = bool(args.tls_ca and args.tls_client_ca)
    peers = PeerClients(args.tls_ca, args.tls_cert if mutual else None,
                        args.tls_key if mutual else None, peer_token or token)
    node = Node(cfg, broker, datadir=datadir, peers=peers, on_state=on_state)

    server = grpc.aio.server(
        interceptors=[auth.interceptor()] if auth.enabled else None,
        maximum_concurrent_rpcs=args.max_concurrent_rpcs,
        options=[("grpc.max_receive_message_length", args.max_message),
                 ("grpc.max_send_message_length", 256 * 1024 * 1024),
                 ("grpc.max_concurrent_streams", args.max_streams_per_connection),
                 ("grpc.max_connection_idle_ms", int(args.max_connection_idle * 1000)),
                 ("grpc.max_connection_age_ms", int(args.max_connection_age * 1000)),
                 ("grpc.max_connection_age_grace_ms", DEFAULT_AGE_GRACE_S * 1000),
                 ("grpc.server_handshake_timeout_ms", int(args.handshake_timeout * 1000)),
                 ("grpc.http2.bdp_probe", int(args.bdp_probe)),
                 ("grpc.so_reuseport", 0)])
    kvs_pb2_grpc.add_KVSServicer_to_server(
        KVSServicer(node, cfg.write_timeout, args.max_key_len, args.max_value_len, auth), server)
    add_ext_servicer(KVSExtServicer(node, peers, auth), server)
    kvs_pb2_grpc.add_ReplicaServicer_to_server(ReplicaServicer(node), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    listen = f"{args.host}:{args.port}"
    try:
        if args.tls_cert and args.tls_key:
            bound = server.add_secure_port(
                listen, server_credentials(args.tls_cert, args.tls_key, args.tls_client_ca))
        else:
            bound = server.add_insecure_port(listen)
    except RuntimeError:
        bound = 0
    if not bound:
        log.error("cannot listen on %s:%s", args.host, args.port)
        return 2

    try:
        await node.start()   # recovery reads the data dir in the persistence thread
    except Exception as e:
        log.error("cannot start: %s", e)
        return 2
    await server.start()
    log.info("serving gRPC on %s:%d%s (broker %s:%d%s, data dir %s, authentication %s, "
             "signed messages %s)",
             args.host, args.port, " with TLS" if args.tls_cert else "", args.mqtt_host,
             args.mqtt_port, " with TLS" if args.mqtt_tls_ca else "",
             args.data_dir or "none: in memory only", "on" if auth.enabled else "off",
             "on" if cluster_secret else "off")

    stop = asyncio.Event()

    def on_signal(signum: int) -> None:
        log.info("signal %d: shutting down", signum)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    loop.add_signal_handler(signal.SIGHUP, auth.reload)
    await stop.wait()
    await health_servicer.enter_graceful_shutdown()
    # watch streams never end by themselves: end them first (UNAVAILABLE: resume elsewhere)
    node.watch.close_all(f"server {node.node} is shutting down; resume on another server")
    await server.stop(grace=2)
    await node.stop()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
