"""gRPC client side of server-to-server calls: state transfer (Replica.FetchState) and
forwarding a member removal to the leader."""
from __future__ import annotations

import threading
from typing import Iterator

import grpc

from kvs_common.channel import bearer, make_channel
from kvs_proto import kvs_pb2, kvs_pb2_grpc

_PEER_OPTIONS = [
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
]


class PeerClients:
    """One cached channel per peer address."""

    def __init__(self, tls_ca: str | None = None, cert: str | None = None,
                 key: str | None = None, peer_token: str | None = None):
        self._tls = (tls_ca, cert, key)
        # Peers call as "peer" (server/auth.py): Replica and forwarded MemberRemove need it.
        self._metadata = bearer(peer_token) if peer_token else None
        self._channels: dict[str, grpc.Channel] = {}
        self._lock = threading.Lock()

    def _channel(self, addr: str) -> grpc.Channel:
        with self._lock:
            ch = self._channels.get(addr)
            if ch is None:
                tls_ca, cert, key = self._tls
                ch = self._channels[addr] = make_channel(addr, tls_ca=tls_ca, cert=cert, key=key,
                                                         options=_PEER_OPTIONS)
            return ch

    def member_remove(self, addr: str, node_id: str, timeout: float = 15.0):
        stub = kvs_pb2_grpc.KVSExtStub(self._channel(addr))
        return stub.MemberRemove(kvs_pb2.MemberRemoveRequest(node_id=node_id), timeout=timeout,
                                 metadata=self._metadata)

    def fetch_state(self, addr: str, timeout: float = 120.0) -> Iterator[bytes]:
        stub = kvs_pb2_grpc.ReplicaStub(self._channel(addr))
        for blob in stub.FetchState(kvs_pb2.StateRequest(), timeout=timeout,
                                    metadata=self._metadata):
            yield blob.payload

    def close(self) -> None:
        with self._lock:
            for ch in self._channels.values():
                ch.close()
            self._channels.clear()
