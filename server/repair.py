"""State transfer between servers (Replica.FetchState): the whole store at one
log index, with the replicated metadata (conf, applied change ids).

Serving side: ``export_chunks`` encodes a consistent copy chunk by chunk.
Fetching side: ``fetch_state`` runs in a worker thread (blocking gRPC) and
returns a verified ``TransferredState``; the driver installs it on its loop.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterator

from . import codec
from .codec import BadMessage
from .applier import conf_from_json
from .raft.types import ConfState
from .store import InvalidInput, Version, VersionedStore


@dataclass
class TransferredState:
    cid: str
    index: int
    term: int
    conf: ConfState
    meta: dict                                  # Applier.meta(): changes, ids
    keys: list[tuple[str, int, list[Version]]]
    store: VersionedStore                       # already built (off the loop)


def export_chunks(header: dict, keys: list, chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
    """Header document, then chunks of keys (a list copied at one index)."""
    header = dict(header, t="state", keys=len(keys))
    yield codec.encode(header)
    chunk, size = [], 0
    for key, mx, versions in keys:
        chunk.append([key, mx, [list(v) for v in versions]])
        size += len(key) + sum(len(v.value) + 40 for v in versions) + 16
        if size >= chunk_bytes:
            yield codec.encode({"t": "keys", "keys": chunk})
            chunk, size = [], 0
    if chunk:
        yield codec.encode({"t": "keys", "keys": chunk})


def _doc(blob: bytes) -> dict:
    try:
        doc = json.loads(blob)
    except ValueError as e:
        raise BadMessage(f"state transfer: not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise BadMessage("state transfer: not an object")
    return doc


def receive(blobs: Iterator[bytes]) -> TransferredState:
    """Decode and verify a state transfer (any thread)."""
    it = iter(blobs)
    header = _doc(next(it))
    if header.get("t") != "state":
        raise BadMessage("state transfer did not start with a header")
    keys: list[tuple[str, int, list[Version]]] = []
    store = VersionedStore()
    try:
        for blob in it:
            doc = _doc(blob)
            for key, mx, versions in doc["keys"]:
                vs = [Version(int(n), str(v), int(s), float(w), str(nd)) for n, v, s, w, nd in versions]
                store.load_key(str(key), int(mx), vs)
                keys.append((key, mx, vs))
    except (KeyError, TypeError, ValueError, InvalidInput) as e:
        raise BadMessage(f"state transfer: malformed keys: {e}") from None
    if len(keys) != header.get("keys"):
        raise BadMessage(f"state transfer incomplete: {len(keys)} of {header.get('keys')} keys")
    meta = header.get("meta") or {}
    return TransferredState(cid=str(header.get("cid", "")), index=int(header["index"]),
                            term=int(header["term"]), conf=conf_from_json(header.get("conf")),
                            meta=meta, keys=keys, store=store)
