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

from kvs_proto import kvs_pb2_grpc

from .node import Node, NodeConfig
from .peers import PeerClients
from .security import TokenAuthInterceptor, channel_credentials, read_secret, server_credentials
from .service import KVSExtServicer, KVSServicer, ReplicaServicer
from .transport import BrokerConfig

DEFAULT_MAX_MESSAGE = 4 * 1024 * 1024


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
    sec.add_argument("--mqtt-username", default=env("KVS_MQTT_USERNAME"))
    sec.add_argument("--mqtt-password-file", default=env("KVS_MQTT_PASSWORD_FILE"),
                     help="broker password (else $KVS_MQTT_PASSWORD)")
    sec.add_argument("--mqtt-tls-ca", default=env("KVS_MQTT_TLS_CA"),
                     help="CA of the broker's TLS listener: enables TLS to the broker")
    sec.add_argument("--cluster-secret-file", default=env("KVS_CLUSTER_SECRET_FILE"),
                     help="shared secret: every broker message carries an HMAC "
                          "(else $KVS_CLUSTER_SECRET; none: unsigned)")
    p.add_argument("--log-level", default=env("KVS_LOG_LEVEL", "INFO"))
    a = p.parse_args(argv)
    a.node_id = a.node_id or f"node-{a.port}"
    a.advertise = a.advertise or f"{'127.0.0.1' if a.host in ('0.0.0.0', '::') else a.host}:{a.port}"
    return a


def main(argv: list[str] | None = None) -> int:
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
        token = read_secret(args.token_file, "KVS_TOKEN")
        mqtt_password = read_secret(args.mqtt_password_file, "KVS_MQTT_PASSWORD")
        cluster_secret = read_secret(args.cluster_secret_file, "KVS_CLUSTER_SECRET")
    except (OSError, ValueError) as e:
        log.error("cannot read a secret: %s", e)
        return 2
    cfg = NodeConfig(node_id=args.node_id, address=args.advertise, cluster=args.cluster,
                     write_timeout=args.write_timeout)
    broker = BrokerConfig(host=args.mqtt_host, port=args.mqtt_port, username=args.mqtt_username,
                          password=mqtt_password, tls_ca=args.mqtt_tls_ca,
                          secret=cluster_secret.encode() if cluster_secret else None)
    # With mutual TLS a server presents its own certificate to its peers.
    peer_creds = (channel_credentials(args.tls_ca, args.tls_cert if args.tls_client_ca else None,
                                      args.tls_key if args.tls_client_ca else None)
                  if args.tls_ca else None)
    peers = PeerClients(peer_creds, token)
    node = Node(cfg, broker, datadir=datadir, peers=peers, on_state=on_state)

    server = grpc.aio.server(
        interceptors=[TokenAuthInterceptor(token)] if token else None,
        options=[("grpc.max_receive_message_length", args.max_message),
                 ("grpc.max_send_message_length", 256 * 1024 * 1024),
                 ("grpc.so_reuseport", 0)])
    kvs_pb2_grpc.add_KVSServicer_to_server(
        KVSServicer(node, cfg.write_timeout, args.max_key_len, args.max_value_len), server)
    kvs_pb2_grpc.add_KVSExtServicer_to_server(KVSExtServicer(node, peers), server)
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
    log.info("serving gRPC on %s:%d%s (broker %s:%d%s, data dir %s, tokens %s, signed messages %s)",
             args.host, args.port, " with TLS" if args.tls_cert else "", args.mqtt_host,
             args.mqtt_port, " with TLS" if args.mqtt_tls_ca else "",
             args.data_dir or "none: in memory only", "on" if token else "off",
             "on" if cluster_secret else "off")

    stop = asyncio.Event()

    def on_signal(signum: int) -> None:
        log.info("signal %d: shutting down", signum)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    await stop.wait()
    await health_servicer.enter_graceful_shutdown()
    await server.stop(grace=2)
    await node.stop()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
