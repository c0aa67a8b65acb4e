"""An *empty* KVS gRPC server: the same proto, handlers that return a constant.

It is the ceiling the benchmark compares the real server against: whatever the
load generator measures here is the cost of gRPC + protobuf + Python on this
machine, with no store, no replication and no persistence behind it.

    python bench/empty_server.py --port 9100 [--impl aio|sync] [--snapshot-items 100000]

* Insere / Remove           -> Versao(versao=1)
* Consulta                  -> Tupla(chave="const", valor="const", versao=1)
* *Varias                   -> one constant reply per request on the stream
* Snapshot                  -> ``--snapshot-items`` constant Tuplas (pre-built)
* KVSExt.Status             -> state "in-step"; ListKeys / History -> empty
* grpc.health.v1 Health     -> SERVING (so the same readiness probe works)

SIGTERM / SIGINT stop it (exit 0).  It prints ``READY <port>`` on stdout once
it listens.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import threading
from concurrent import futures
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from kvs_proto import kvs_pb2, kvs_pb2_grpc  # noqa: E402

VERSAO = kvs_pb2.Versao(versao=1)
TUPLA = kvs_pb2.Tupla(chave="const", valor="const", versao=1)
HEALTH_OK = health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


def _status(port: int) -> kvs_pb2.NodeStatus:
    return kvs_pb2.NodeStatus(node_id=f"empty-{port}", state="in-step", address=f"127.0.0.1:{port}",
                              leader=f"empty-{port}", broker_connected=True)


# ----------------------------------------------------------------------------- asyncio server
class AioKVS(kvs_pb2_grpc.KVSServicer):
    def __init__(self, snapshot_items: int):
        self.snapshot = [TUPLA] * max(1, snapshot_items)

    async def Insere(self, request, context):
        return VERSAO

    async def Consulta(self, request, context):
        return TUPLA

    async def Remove(self, request, context):
        return VERSAO

    async def InsereVarias(self, request_iterator, context):
        async for _ in request_iterator:
            yield VERSAO

    async def ConsultaVarias(self, request_iterator, context):
        async for _ in request_iterator:
            yield TUPLA

    async def RemoveVarias(self, request_iterator, context):
        async for _ in request_iterator:
            yield VERSAO

    async def Snapshot(self, request, context):
        for t in self.snapshot:
            yield t


class AioExt(kvs_pb2_grpc.KVSExtServicer):
    def __init__(self, port: int):
        self.status = _status(port)

    async def History(self, request, context):
        return kvs_pb2.KeyHistory(chave=request.chave)

    async def ListKeys(self, request, context):
        return kvs_pb2.KeyList()

    async def Status(self, request, context):
        return self.status


class AioHealth(health_pb2_grpc.HealthServicer):
    async def Check(self, request, context):
        return HEALTH_OK

    async def Watch(self, request, context):
        yield HEALTH_OK
        await asyncio.Event().wait()


async def serve_aio(host: str, port: int, snapshot_items: int) -> None:
    server = grpc.aio.server()
    kvs_pb2_grpc.add_KVSServicer_to_server(AioKVS(snapshot_items), server)
    kvs_pb2_grpc.add_KVSExtServicer_to_server(AioExt(port), server)
    health_pb2_grpc.add_HealthServicer_to_server(AioHealth(), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(f"READY {bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0.5)


# ----------------------------------------------------------------------------- sync server
class SyncKVS(kvs_pb2_grpc.KVSServicer):
    def __init__(self, snapshot_items: int):
        self.snapshot = [TUPLA] * max(1, snapshot_items)

    def Insere(self, request, context):
        return VERSAO

    def Consulta(self, request, context):
        return TUPLA

    def Remove(self, request, context):
        return VERSAO

    def InsereVarias(self, request_iterator, context):
        for _ in request_iterator:
            yield VERSAO

    def ConsultaVarias(self, request_iterator, context):
        for _ in request_iterator:
            yield TUPLA

    def RemoveVarias(self, request_iterator, context):
        for _ in request_iterator:
            yield VERSAO

    def Snapshot(self, request, context):
        yield from self.snapshot


class SyncExt(kvs_pb2_grpc.KVSExtServicer):
    def __init__(self, port: int):
        self.status = _status(port)

    def History(self, request, context):
        return kvs_pb2.KeyHistory(chave=request.chave)

    def ListKeys(self, request, context):
        return kvs_pb2.KeyList()

    def Status(self, request, context):
        return self.status


def serve_sync(host: str, port: int, snapshot_items: int) -> None:
    from grpc_health.v1 import health

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    kvs_pb2_grpc.add_KVSServicer_to_server(SyncKVS(snapshot_items), server)
    kvs_pb2_grpc.add_KVSExtServicer_to_server(SyncExt(port), server)
    hs = health.HealthServicer()
    hs.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    server.start()
    print(f"READY {bound}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(0.5).wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--impl", choices=("aio", "sync"), default="aio")
    ap.add_argument("--snapshot-items", type=int, default=int(os.environ.get("KVS_EMPTY_SNAPSHOT", 1000)))
    args = ap.parse_args(argv)
    if args.impl == "aio":
        asyncio.run(serve_aio(args.host, args.port, args.snapshot_items))
    else:
        serve_sync(args.host, args.port, args.snapshot_items)
    return 0


if __name__ == "__main__":
    sys.exit(main())
