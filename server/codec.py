"""JSON messages on the broker: encoding, strict decoding, the chain hash.

Every document is a JSON object with a type field ``t``.  Decoding is strict:
anything that is not exactly one of the documented shapes raises
``BadMessage`` and is dropped by the caller, so garbage on our topics can
never reach the store.  Field meanings are documented in the README.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

MAX_DOC_BYTES = 64 * 1024 * 1024  # refuse to even parse anything larger

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_loads = json.loads


class BadMessage(ValueError):
    """A broker payload that is not a well-formed KVS document."""


def encode(doc: dict) -> bytes:
    return _dumps(doc).encode("utf-8")


def chain_hash(payload: bytes) -> str:
    """Hash of a log batch's exact bytes.  Each batch carries the previous
    batch's hash in ``prev``, so equal hashes at a position prove equal logs."""
    return hashlib.blake2b(payload, digest_size=16).hexdigest()


GENESIS_HASH = "0" * 32


# ---------------------------------------------------------------------------
# Items: one change each.
#   {"id": str, "op": "put", "k": str, "v": str, "node": str}
#   {"id": str, "op": "del", "k": str, "ver": int|null, "node": str}
#   {"op": "epoch", "node": str}            (a new sequencer took over)
# ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Batch:
    epoch: int
    leader: str
    first: int
    prev: str
    ts: float
    items: list
    payload: bytes  # the exact bytes; hashed and stored as they are

    @property
    def last(self) -> int:
        return self.first + len(self.items) - 1

    @property
    def hash(self) -> str:
        return chain_hash(self.payload)


@dataclass(frozen=True, slots=True)
class Heartbeat:
    epoch: int
    leader: str
    last: int
    hash: str


@dataclass(frozen=True, slots=True)
class Proposal:
    node: str
    items: list
    ts: float  # when the proposer sent it: old replays are refused


@dataclass(frozen=True, slots=True)
class Presence:
    node: str
    addr: str
    online: bool
    epoch: int
    applied: int
    boot: str = ""  # random id of the process start: tells a stale will from a live server


def _int(d: dict, name: str, lo: int = 0) -> int:
    v = d.get(name)
    if type(v) is not int or v < lo or v > 2**63:
        raise BadMessage(f"field {name!r} must be an integer >= {lo}")
    return v


def _str(d: dict, name: str, allow_empty: bool = False) -> str:
    v = d.get(name)
    if not isinstance(v, str) or (not v and not allow_empty):
        raise BadMessage(f"field {name!r} must be a non-empty string")
    return v


def _item(raw: Any, sequenced: bool) -> dict:
    if not isinstance(raw, dict):
        raise BadMessage("item must be an object")
    op = raw.get("op")
    if op == "put":
        _str(raw, "id"), _str(raw, "k"), _str(raw, "v")
    elif op == "del":
        _str(raw, "id"), _str(raw, "k")
        ver = raw.get("ver")
        if ver is not None and (type(ver) is not int or not -2**31 <= ver < 2**31):
            raise BadMessage("field 'ver' must be an int32 or null")
    elif op == "epoch" and sequenced:
        pass
    else:
        raise BadMessage(f"unknown op {op!r}")
    _str(raw, "node")
    return raw


def _parse(payload: bytes) -> dict:
    if not isinstance(payload, (bytes, bytearray)) or len(payload) > MAX_DOC_BYTES:
        raise BadMessage("payload missing or too large")
    try:
        doc = _loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise BadMessage(f"not JSON: {type(e).__name__}: {e}") from None
    if not isinstance(doc, dict):
        raise BadMessage("not a JSON object")
    return doc


def decode_log(payload: bytes) -> Batch | Heartbeat:
    """A document from the log topic: a sequenced batch or a heartbeat."""
    doc = _parse(payload)
    t = doc.get("t")
    if t == "batch":
        items = doc.get("items")
        if not isinstance(items, list) or not items:
            raise BadMessage("batch needs a non-empty item list")
        ts = doc.get("ts")
        if not isinstance(ts, (int, float)) or isinstance(ts, bool) or not math.isfinite(ts):
            raise BadMessage("field 'ts' must be a finite number")
        return Batch(_int(doc, "epoch", 1), _str(doc, "leader"), _int(doc, "first", 1),
                     _str(doc, "prev"), float(ts), [_item(i, True) for i in items], bytes(payload))
    if t == "hb":
        return Heartbeat(_int(doc, "epoch", 1), _str(doc, "leader"), _int(doc, "last", 0),
                         _str(doc, "hash"))
    raise BadMessage(f"unexpected document type {t!r} on the log topic")


def decode_batch(payload: bytes) -> Batch:
    doc = decode_log(payload)
    if not isinstance(doc, Batch):
        raise BadMessage("expected a batch")
    return doc


def decode_proposal(payload: bytes) -> Proposal:
    doc = _parse(payload)
    if doc.get("t") != "propose":
        raise BadMessage("expected a proposal")
    items = doc.get("items")
    if not isinstance(items, list) or not items:
        raise BadMessage("proposal needs a non-empty item list")
    node = _str(doc, "node")
    ts = doc.get("ts")
    if not isinstance(ts, (int, float)) or isinstance(ts, bool) or not math.isfinite(ts):
        raise BadMessage("field 'ts' must be a finite number")
    items = [_item(i, False) for i in items]
    if any(i["node"] != node for i in items):
        raise BadMessage("proposal items must come from the proposing node")
    return Proposal(node, items, float(ts))


@dataclass(frozen=True, slots=True)
class Ack:
    node: str
    epoch: int
    applied: int


def decode_ack(payload: bytes) -> Ack:
    """A follower's report of the position it applied (and made durable)."""
    doc = _parse(payload)
    if doc.get("t") != "ack":
        raise BadMessage("expected an ack")
    return Ack(_str(doc, "node"), _int(doc, "epoch", 1), _int(doc, "applied", 1))


def decode_presence(payload: bytes) -> Presence:
    doc = _parse(payload)
    if doc.get("t") != "node":
        raise BadMessage("expected a presence document")
    online = doc.get("online")
    if not isinstance(online, bool):
        raise BadMessage("field 'online' must be a boolean")
    boot = doc.get("boot", "")
    if not isinstance(boot, str):
        raise BadMessage("field 'boot' must be a string")
    return Presence(_str(doc, "node"), _str(doc, "addr", allow_empty=True), online,
                    _int(doc, "epoch"), _int(doc, "applied"), boot)


def batch_doc(epoch: int, leader: str, first: int, prev: str, ts: float, items: list) -> bytes:
    return encode({"t": "batch", "epoch": epoch, "leader": leader, "first": first,
                   "prev": prev, "ts": ts, "items": items})


def heartbeat_doc(epoch: int, leader: str, last: int, hash_: str) -> bytes:
    return encode({"t": "hb", "epoch": epoch, "leader": leader, "last": last, "hash": hash_})


def proposal_doc(node: str, items: list, ts: float) -> bytes:
    return encode({"t": "propose", "node": node, "ts": ts, "items": items})


def presence_doc(node: str, addr: str, online: bool, epoch: int, applied: int,
                 boot: str = "") -> bytes:
    return encode({"t": "node", "node": node, "addr": addr, "online": online,
                   "epoch": epoch, "applied": applied, "boot": boot})
