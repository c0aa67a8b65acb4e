"""Asking one KVS server for its status, said once (launcher, shell, bench)."""
from __future__ import annotations

from typing import Sequence

from kvs_proto import kvs_pb2, kvs_pb2_grpc


def fetch_status(channel, metadata: Sequence[tuple[str, str]] | None = None,
                 timeout: float = 2.0):
    """The server's ``KVSExt.Status`` (a ``NodeStatus``); raises ``grpc.RpcError``."""
    return kvs_pb2_grpc.KVSExtStub(channel).Status(kvs_pb2.StatusRequest(),
                                                    metadata=metadata or None, timeout=timeout)
