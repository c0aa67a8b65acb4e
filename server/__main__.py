"""`python -m server --port P ...`: flags and env, logging, graceful shutdown."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from kvs_proto import kvs_pb2_grpc

from .log import LogConfig, ReplicatedLog
from .peers import PeerClients
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
    log = logging.getLogger("server")

    datadir = None
    if args.data_dir:
        from .persistence import DataDir
        datadir = DataDir(Path(args.data_dir), fsync=not args.no_fsync)

    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)

    def on_state(state: str) -> None:
        serving = state in ("in-step", "no-leader")
        health_servicer.set("", health_pb2.HealthCheckResponse.SERVING if serving
                            else health_pb2.HealthCheckResponse.NOT_SERVING)

    cfg = LogConfig(node_id=args.node_id, address=args.advertise, cluster=args.cluster,
                    write_timeout=args.write_timeout)
    broker = BrokerConfig(host=args.mqtt_host, port=args.mqtt_port)
    rlog = ReplicatedLog(cfg, broker, datadir=datadir, peers=PeerClients(), on_state=on_state)

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=128, thread_name_prefix="grpc"),
        options=[("grpc.max_receive_message_length", args.max_message),
                 ("grpc.max_send_message_length", 256 * 1024 * 1024),
                 ("grpc.so_reuseport", 0)])
    kvs_pb2_grpc.add_KVSServicer_to_server(KVSServicer(rlog, cfg.write_timeout), server)
    kvs_pb2_grpc.add_KVSExtServicer_to_server(KVSExtServicer(rlog), server)
    kvs_pb2_grpc.add_ReplicaServicer_to_server(ReplicaServicer(rlog), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(f"{args.host}:{args.port}")
    if not bound:
        log.error("cannot listen on %s:%s", args.host, args.port)
        return 2

    rlog.start()
    server.start()
    log.info("serving gRPC on %s:%d (broker %s:%d, data dir %s)", args.host, args.port,
             args.mqtt_host, args.mqtt_port, args.data_dir or "none: in memory only")

    stop = threading.Event()

    def on_signal(signum, frame):
        log.info("signal %d: shutting down", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stop.wait()
    health_servicer.enter_graceful_shutdown()
    server.stop(grace=2).wait()
    rlog.stop()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
